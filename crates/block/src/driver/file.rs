//! The file driver: a regular file (or a block device) as the backing store.
//!
//! **Opening.** The image is opened read-write and locked with `flock(LOCK_EX | LOCK_NB)` before
//! anything else, so a second sharedisk (or a second open in the same process) fails at once
//! with an error naming the path, instead of serving the same image behind the first one's back
//! (DESIGN.md §4). A missing image is created sparse when a size is given. A block device is
//! sized with `BLKGETSIZE64`.
//!
//! **Data path.** Every read and write is vectored (`preadv2`/`pwritev2`, io_uring
//! `readv`/`writev`) over an [`IoBuf`]: a buffer of the driver's own, or memory a frontend
//! lent (a vhost-user guest's buffers), which the kernel then reads into or writes from
//! directly. Reads, writes and flushes go to an [`Engine`]:
//! - [`Engine::IoUring`]: one ring per image with batched submission and reaping, results
//!   delivered to the async caller through oneshot channels. Opened inside a tokio runtime (as
//!   the daemon opens its images) the ring is driven by a task on that runtime; opened outside
//!   one, by a thread of its own (see the `uring` module and [`FileDriver::uring_thread`]);
//! - [`Engine::ThreadPool`]: `pread`/`pwrite`/`fdatasync` on tokio's blocking thread pool.
//!
//! [`EngineChoice::Auto`] (the default) picks the engine the benchmark in
//! `examples/file_engines.rs` found faster, and falls back to the thread pool, with a warning in
//! the log, when io_uring is unavailable at run time (ENOSYS, EPERM, missing opcodes).
//! The benchmark (`cargo run --release -p block --example file_engines -- PATH 2 256`: 4 KiB
//! random I/O through `Backend`, 2 s per row, a 256 MiB file) on a 2-core VM shared with other
//! builds, IOPS, range over four runs on tmpfs and two on ext4:
//!
//! | file on | op | QD | io_uring | thread pool |
//! |---|---|---|---|---|
//! | tmpfs | read | 32 | 209k – 298k | 106k – 127k |
//! | tmpfs | write | 32 | 205k – 261k | 88k – 140k |
//! | ext4 | read | 32 | 398k – 541k | 104k – 117k |
//! | ext4 | write | 32 | 87k – 91k | 67k – 85k |
//! | tmpfs | read | 1 | 14k – 56k | 36k – 115k |
//! | tmpfs | write | 1 | 16k – 102k | 28k – 52k |
//! | ext4 | read | 1 | 31k – 187k | 38k – 39k |
//! | ext4 | write | 1 | 12k – 31k | 26k – 29k |
//!
//! At queue depth 32, which is where a SCSI target lives (DESIGN.md §6), io_uring wins every
//! run, by 1.5x to 4x: one system call carries a whole batch, and page-cache hits are served
//! inline by the ring (these figures are of the ring on a thread of its own). At queue depth 1 both engines pay two thread hand-offs per request
//! and the figures are dominated by scheduling noise on the loaded machine; neither wins
//! consistently. io_uring is therefore the default engine. (These figures are of the engines on
//! their own; the fast paths below now serve cached reads and lone writes in front of them.)
//!
//! **Fast paths** ([`FileOptions::fast_paths`], on by default; the conformance suite runs the
//! engines with and without them):
//! - *Page-cache hits inline.* Before a read goes to the engine, the calling thread tries
//!   `preadv2` with `RWF_NOWAIT`, which copies what the page cache holds and never waits for
//!   the device (it answers EAGAIN instead); only a miss, or the part of a read past what was
//!   cached, goes to the engine. A cached 4 KiB read then costs one system call on the caller's
//!   thread instead of two thread hand-offs. A file system that refuses `RWF_NOWAIT` (tmpfs on
//!   Linux 6.1) has its reads paced as direct I/O's are: on the calling thread at queue depth
//!   1, through the engine otherwise (on tmpfs, `qemu-img bench -d 1` over iSCSI read 3.1k
//!   IOPS with every read through the engine).
//! - *A lone write on the calling thread.* Writes cannot be served without blocking: ext4
//!   refuses `RWF_NOWAIT` for buffered writes (EOPNOTSUPP) and a `pwrite` can block on dirty-
//!   page throttling. io_uring, for its part, hands such a write to one of its own workers, so
//!   a write through the ring crosses three threads. When no other write is in flight, the write
//!   runs on the calling thread inside `tokio::task::block_in_place`, which first hands the
//!   worker's other tasks to another thread, so a write that does block stalls no one else (on a
//!   current-thread runtime, where that is impossible, it goes to the blocking pool). Once
//!   writes queue up, the ring's batching takes them. The example `file_engines`, 4 KiB random
//!   writes on ext4: io_uring alone 10.0k IOPS at queue depth 1 and 70.5k at 32; the thread pool
//!   alone 14.5k and 48.6k; the default 132.6k and 82.5k.
//! - *Every write on a frontend's I/O thread.* A frontend thread that drives its requests
//!   itself ([`crate::IoThreadScope`]: the vhost-user request queue threads; the iSCSI
//!   connection reader while it polls a new command) writes in place whatever else is in
//!   flight, as QEMU's and vhost-device-scsi's own threads do: a write into the page cache
//!   costs less there than the hand-offs to another thread, and only that queue or connection
//!   waits for it. The sync step of a FUA write, which waits for the device, still goes to
//!   the engine.
//!
//! **Direct I/O** ([`FileOptions::direct`]). The image is opened `O_DIRECT`: reads and writes
//! go to the device past the host's page cache, as QEMU's `cache=none` does. That is what an
//! image on storage that several hosts see needs (no host serves a stale cached copy), and it
//! keeps a large image from crowding out the host's memory. The kernel says how requests must
//! be aligned (`statx` STATX_DIOALIGN): the logical block size must be a multiple of the
//! offset alignment, which [`crate::Backend::new`] checks through [`Driver::io_alignment`], so
//! a misaligned request never reaches the device (it would fail, not be served wrong). Memory
//! that is not aligned (a vector of the SCSI layer's, a guest's buffers split off a page)
//! goes through an aligned bounce buffer; memory that is, such as a guest's page-aligned
//! buffers, is handed to the kernel as it is. No request is served from the page cache; a
//! request goes to the engine (io_uring runs direct I/O asynchronously, without a worker
//! thread), except at queue depth 1 with the fast paths on, where it runs on the calling
//! thread (`DirectPace`: it waits for the device either way, and the two thread hand-offs of
//! the engine cost as much again). `cargo run --release -p block --example file_engines --
//! /var/tmp/e.img 3 1024` on this project's 2-core VM (ext4 on virtio), direct 4 KiB random
//! I/O, IOPS: io_uring alone 14.2k reads and 10.7k writes at depth 1, 63.1k and 30.2k at 32;
//! the default 19.2k and 16.9k at depth 1, 68.8k and 42.2k at 32; fio (io_uring, direct) on
//! the same file 20.9k reads and 15.3k writes at depth 1, 82k reads at 32. A flush is still an
//! `fdatasync` (the device's write cache, and metadata of blocks written for the first time).
//!
//! **Durability.** A FUA write is written, then its range is synced: an `fdatasync` of that
//! range through io_uring (what `RWF_DSYNC` does after a write: the range reaches stable
//! storage without first writing back the image's other dirty pages), of the whole image on
//! the thread pool. What fails in the first step (ENOSPC at allocation) fails that write only.
//! Flush is `fdatasync`. A sync reports the image's writeback errors, from whichever write:
//! a failed one fails every later flush and FUA write, and one that ran beside it (the kernel
//! tells one of them only), see `driver/sync_latch.rs`.
//!
//! **Reservations.** The persistent reservation state (APTPL) is kept in a state file,
//! written crash-safely (see [`super::sidecar`]): the one [`FileOptions::reservation_state`]
//! names, else the sidecar `<image>.pr` beside a regular file, named after the image's
//! canonical path (a symlink or another spelling of the path finds the same state). A block
//! device has no default: `/dev` does not survive a reboot, and two device nodes of one disk
//! would keep two states. Without a configured state file it refuses APTPL (PTPL_C is 0).
//! A state file where the state is not kept (beside the path as given, or beside a block
//! device) fails the open rather than be ignored.
//!
//! **Errors.** Short reads and writes continue with the rest. A read that reaches the end of the
//! file (an image truncated underneath) is `ReadFailed`; every I/O error is `ReadFailed` or
//! `WriteFailed`, except ENOSPC/EDQUOT which are `NoSpace`. A failed I/O is never success.
//!
//! **Thin provisioning.** At open the driver probes `fallocate(PUNCH_HOLE | KEEP_SIZE)` beyond the
//! end of the file (which changes nothing); when the file system supports it, `discard` punches
//! holes and `discard_zeroes` is reported (holes read as zeros). Write zeroes punches with unmap,
//! otherwise uses `FALLOC_FL_ZERO_RANGE`, and writes zeros in 1 MiB chunks when the file system
//! refuses both. Block status comes from the file system's extent map (`FS_IOC_FIEMAP`), where
//! every allocated extent is mapped, including the unwritten ones `FALLOC_FL_ZERO_RANGE` leaves
//! (zeros written without unmap are written blocks, SBC-4 WRITE SAME); where the file system has
//! no FIEMAP (tmpfs), from `lseek(SEEK_DATA / SEEK_HOLE)`. Block devices are reported fully
//! mapped and without discard.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::sidecar::{sidecar_path, SidecarStore};
use super::sync_latch::SyncLatch;
use super::uring::Ring;
use crate::{BlockError, Driver, DriverInfo, Extent, IoBuf, ReservationStore};

/// Which I/O engine to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The faster engine on the benchmark, falling back to the thread pool when io_uring is
    /// unavailable.
    #[default]
    Auto,
    /// io_uring, falling back to the thread pool (with a warning) when it is unavailable.
    IoUring,
    /// The thread pool.
    ThreadPool,
}

/// The engine a driver ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring: a ring per image, driven by a task on the runtime or by a thread of its own.
    IoUring,
    /// `pread`/`pwrite` on tokio's blocking pool.
    ThreadPool,
}

/// The engine [`EngineChoice::Auto`] prefers; see the module docs and the benchmark.
pub const DEFAULT_ENGINE: Engine = Engine::IoUring;

/// Options for [`FileDriver::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// The I/O engine.
    pub engine: EngineChoice,
    /// Submission queue entries of the io_uring (the most requests in flight at once).
    pub ring_entries: u32,
    /// Serve page-cache hits and lone writes on the calling thread,
    /// whatever the engine; with direct I/O, requests at queue depth 1 on the calling thread.
    /// See the module docs.
    pub fast_paths: bool,
    /// Direct I/O (`O_DIRECT`): every read and write goes to the device, past the page cache;
    /// see the module docs.
    pub direct: bool,
    /// Where to keep the persistent reservation state (APTPL). `None`: beside a regular file
    /// (`<image>.pr`, named after the image's canonical path); a block device then has no
    /// state file and refuses APTPL. See the module docs.
    pub reservation_state: Option<PathBuf>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            engine: EngineChoice::Auto,
            ring_entries: 256,
            fast_paths: true,
            direct: false,
            reservation_state: None,
        }
    }
}

/// One `preadv2` / `pwritev2` of `buf` from byte `done` on, at `offset + done`; the bytes it
/// moved.
fn vectored(
    file: &File,
    buf: &mut IoBuf,
    offset: u64,
    done: usize,
    write: bool,
    flags: libc::c_int,
) -> io::Result<usize> {
    let off = offset
        .checked_add(done as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or(io::ErrorKind::InvalidInput)?;
    let iov = buf.iovecs(done);
    let n_iov = iov.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: `iov` describes the rest of `buf` (a vector it owns, or lent memory that its
    // owner handle keeps mapped), exclusively borrowed for this synchronous call, and `file`
    // keeps the descriptor open.
    let n = unsafe {
        if write {
            libc::pwritev2(file.as_raw_fd(), iov.as_ptr(), n_iov, off, flags)
        } else {
            libc::preadv2(file.as_raw_fd(), iov.as_ptr(), n_iov, off, flags)
        }
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The most iovecs one call takes (Linux UIO_MAXIOV); a longer list continues as a short
/// transfer does.
const IOV_MAX: usize = 1024;

/// Copy into `buf` what the page cache holds of the file from `offset` on, without waiting for
/// the device (`preadv2` with `RWF_NOWAIT`). Returns the bytes read from the start of `buf`:
/// fewer than asked (or 0) when the kernel would have to wait, at the end of the file, or on
/// any error, which the engine then meets and reports itself; and whether the file refuses
/// `RWF_NOWAIT` altogether (EOPNOTSUPP: tmpfs on Linux 6.1, for one).
fn read_cached(file: &File, buf: &mut IoBuf, offset: u64) -> (usize, bool) {
    let mut done = 0usize;
    while done < buf.len() {
        match vectored(file, buf, offset, done, false, libc::RWF_NOWAIT) {
            Ok(n) if n > 0 => done += n,
            Err(e) if done == 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP) => return (0, true),
            _ => break,
        }
    }
    (done, false)
}

/// Move all of `buf` from byte `done` on to (`write`) or from the file at `offset + done`,
/// continuing after short transfers: the synchronous path of the thread pool and of the
/// calling thread. A read that reaches the end of the file is `UnexpectedEof`; a write that
/// moves nothing is `WriteZero`.
fn transfer(
    file: &File,
    buf: &mut IoBuf,
    offset: u64,
    mut done: usize,
    write: bool,
) -> io::Result<()> {
    while done < buf.len() {
        match vectored(file, buf, offset, done, write, 0) {
            Ok(0) if write => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "Write transferred nothing",
                ))
            }
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "Read past the end of the file",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write all of `data` at `offset` ([`transfer`]).
fn write_at(file: &File, data: &mut IoBuf, offset: u64) -> io::Result<()> {
    transfer(file, data, offset, 0, true)
}

/// `tokio::task::block_in_place` panics on a current-thread runtime; there the pool takes a
/// lone write instead.
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Counts one request in flight while it lives; `others` is how many were in flight already.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    others: usize,
}

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let others = count.fetch_add(1, Ordering::AcqRel);
        Self { count, others }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What direct I/O needs of a request: file offsets and lengths in multiples of `offset`, and
/// memory whose segments start at multiples of `memory` and are multiples of `offset` long
/// (`statx` STATX_DIOALIGN; Linux refuses anything else with EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirectAlign {
    memory: usize,
    offset: usize,
}

impl DirectAlign {
    /// Ask the kernel. Without STATX_DIOALIGN (Linux before 6.1), a block device takes its
    /// logical block size for both, a file 4096 (which every device's block size divides).
    fn of(file: &File, block_device: bool) -> io::Result<Self> {
        // SAFETY: an all-zero statx is a valid value of the plain C struct.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: `file` keeps the descriptor open; the empty path with AT_EMPTY_PATH names
        // it; `stx` is writable for the call.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
            if stx.stx_dio_offset_align == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the file system does not support direct I/O",
                ));
            }
            return Ok(Self {
                memory: (stx.stx_dio_mem_align as usize).max(1),
                offset: stx.stx_dio_offset_align as usize,
            });
        }
        let n = if block_device {
            logical_block_size(file)?
        } else {
            4096
        };
        Ok(Self {
            memory: n,
            offset: n,
        })
    }

    /// An error unless `offset` and `len` are multiples of the alignment.
    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        if offset % self.offset as u64 != 0 || len % self.offset != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "Range {offset}+{len} is not aligned to the {} bytes direct I/O needs",
                    self.offset
                ),
            ));
        }
        Ok(())
    }

    /// Whether the kernel takes `buf`'s memory as it is.
    fn fits(&self, buf: &IoBuf) -> bool {
        buf.segments_aligned(self.memory, self.offset)
    }
}

/// A zeroed heap block aligned for direct I/O: the bounce buffer for memory that is not.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the block is plain memory owned by this value; it is only accessed through the
// `IoBuf` lent from it (system calls) or, after that, through `bytes`.
unsafe impl Send for Aligned {}
// SAFETY: see `Send`; `&Aligned` gives no access to the memory.
unsafe impl Sync for Aligned {}

impl Aligned {
    /// `len` bytes aligned to `align` (at least a page), filled by `fill`, lent as an `IoBuf`,
    /// with the handle that owns them.
    fn buffer(len: usize, align: usize, fill: impl FnOnce(&mut [u8])) -> (IoBuf, Arc<Self>) {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(4096))
            .expect("a transfer is far below isize::MAX");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `alloc_zeroed` gave `len` (or more) initialised bytes, which nothing else
        // refers to yet.
        fill(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) });
        let owner = Arc::new(Self { ptr, layout });
        // SAFETY: the block is `len` bytes of this process's heap, freed only when the last
        // handle (the buffer holds one) is dropped.
        let buf = unsafe { IoBuf::lent([(ptr.as_ptr(), len)], owner.clone()) };
        (buf, owner)
    }

    /// The block, once no request uses it any more (the caller has its buffer back).
    fn bytes(&self) -> &[u8] {
        // SAFETY: the block is `layout.size()` initialised (zeroed) bytes that live as long
        // as `self`; the caller's only other way in, the lent buffer, is no longer used.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `buffer` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn logical_block_size(file: &File) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `n`.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut n as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("BLKSSZGET gave no block size"))
}

/// Direct requests in a row that run on the calling thread once the engine has seen that the
/// initiator waits for each request before sending the next.
const INLINE_RUN: u32 = 16;

/// Whether a direct request runs on the calling thread. At queue depth 1 it should: it waits
/// for the device either way, and the hand-offs to the engine's thread and back cost as much
/// again. At any greater depth it must not, or the frontend thread that blocks stops reading
/// the next requests and the depth collapses to 1. The calling thread never sees what arrives
/// while it blocks, so the depth is measured on the engine: a request that went there with
/// nothing else in flight, during whose flight no other request arrived, grants the next
/// [`INLINE_RUN`] lone requests the calling thread; any request that finds another in flight
/// ends the run.
#[derive(Default)]
struct DirectPace {
    in_flight: AtomicUsize,
    arrivals: std::sync::atomic::AtomicU64,
    inline_left: std::sync::atomic::AtomicU32,
}

/// One request's turn; counts it in flight while it lives.
struct Turn<'a> {
    pace: &'a DirectPace,
    inline: bool,
    lone: bool,
    arrival: u64,
}

impl DirectPace {
    fn arrive(&self, allowed: bool) -> Turn<'_> {
        let arrival = self.arrivals.fetch_add(1, Ordering::AcqRel) + 1;
        let lone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        let inline = allowed
            && lone
            && self
                .inline_left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        if !lone {
            self.inline_left.store(0, Ordering::Release);
        }
        Turn {
            pace: self,
            inline,
            lone,
            arrival,
        }
    }

    /// A request that went to the engine is done: grant a run when it was alone throughout.
    fn engine_done(&self, turn: &Turn<'_>) {
        if turn.lone && self.arrivals.load(Ordering::Acquire) == turn.arrival {
            self.inline_left.store(INLINE_RUN, Ordering::Release);
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.pace.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Io {
    Ring(Ring),
    Pool,
}

/// A file-backed driver.
pub struct FileDriver {
    file: Arc<File>,
    io: Io,
    fast_paths: bool,
    /// The alignment direct I/O needs, when the image is open with `O_DIRECT`.
    direct: Option<DirectAlign>,
    /// Writes in flight, for the choice of path (see the module docs).
    writes_in_flight: AtomicUsize,
    /// Whether direct I/O, and reads of a file that refuses `RWF_NOWAIT`, run on the calling
    /// thread.
    pace: DirectPace,
    /// Cleared once the file refuses `RWF_NOWAIT` reads: its reads then take the path direct
    /// I/O takes (see [`FileDriver::paced_io`]).
    nowait_reads: AtomicBool,
    /// The image's size in bytes: at open, then as [`Driver::refresh_size`] finds it grown.
    size: AtomicU64,
    block_device: bool,
    punch: bool,
    /// The file system's block size (`st_blksize`).
    alloc_unit: u64,
    /// Cleared once the file system refuses `FALLOC_FL_ZERO_RANGE`.
    zero_range: AtomicBool,
    /// The syncs in flight (a flush's `fdatasync`, a FUA write's of its range), latched by the
    /// first that fails. Linux reports a writeback error to one sync only and may already have
    /// dropped the dirty pages, so neither a sync that ran beside the failed one nor a later one
    /// proves anything: from then on every flush and FUA write fails until the image is
    /// reopened. See [`SyncLatch`].
    syncs: SyncLatch,
    /// The persistent reservation state: a [`SidecarStore`], or a memory store without APTPL
    /// for a block device with no state file.
    reservations: Arc<dyn ReservationStore>,
    /// Run once by the next FUA write between its write and its sync.
    #[cfg(test)]
    between_fua_steps: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

const ZERO_CHUNK: u64 = 1 << 20;

impl FileDriver {
    /// `fdatasync` of the image, through the engine.
    async fn datasync(&self) -> io::Result<()> {
        match &self.io {
            Io::Ring(r) => r.fdatasync().await,
            Io::Pool => {
                let file = self.file.clone();
                blocking(move || file.sync_data()).await
            }
        }
    }

    /// `fdatasync` of the image's `len` bytes at `offset`: io_uring syncs just that range (the
    /// sync a write with `RWF_DSYNC` ends with); the thread pool, which has no system call for
    /// a durable sync of a range, syncs the whole image.
    async fn datasync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.io {
            Io::Ring(r) => r.fdatasync_range(offset, len).await,
            Io::Pool => self.datasync().await,
        }
    }

    /// Run `sync` (an `fdatasync` of the image or of a range) as one of the image's syncs:
    /// refused when one has failed, latched when it fails ([`SyncLatch`]). Nothing of `sync`
    /// runs when it is refused.
    async fn synced(
        &self,
        sync: impl std::future::Future<Output = io::Result<()>>,
    ) -> Result<(), BlockError> {
        let ticket = self.syncs.begin().map_err(BlockError::WriteFailed)?;
        ticket.end(sync.await).await.map_err(write_error)
    }

    /// A buffered write of all of `data` at `offset`; see the module docs for the path it
    /// takes. `alone`: no other write of the image is in flight.
    async fn buffered_write(&self, offset: u64, data: IoBuf, alone: bool) -> io::Result<()> {
        let mut data = data;
        match &self.io {
            _ if self.fast_paths && crate::on_io_thread() => {
                write_at(&self.file, &mut data, offset)
            }
            Io::Ring(r) if !alone => r.write_back(offset, data).await.map(drop),
            _ if alone && on_multi_thread_runtime() => {
                tokio::task::block_in_place(|| write_at(&self.file, &mut data, offset))
            }
            Io::Ring(_) | Io::Pool => {
                let file = self.file.clone();
                blocking(move || write_at(&file, &mut data, offset)).await
            }
        }
    }

    /// Fill `buf` from byte `done` on through the engine (io_uring or the thread pool).
    async fn read_engine(&self, offset: u64, buf: IoBuf, done: usize) -> Result<IoBuf, BlockError> {
        match &self.io {
            Io::Ring(r) => r.read(offset, buf, done).await,
            Io::Pool => {
                let file = self.file.clone();
                let mut buf = buf;
                blocking(move || transfer(&file, &mut buf, offset, done, false).map(|()| buf)).await
            }
        }
        .map_err(BlockError::ReadFailed)
    }

    /// A read or write of all of `buf` that may block (direct I/O; a read of a file that
    /// cannot be read without waiting, `nowait_reads`): on the calling thread when
    /// [`DirectPace`] says the initiator waits for each request before the next, through the
    /// engine otherwise.
    async fn paced_io(&self, offset: u64, buf: IoBuf, write: bool) -> io::Result<IoBuf> {
        let mut buf = buf;
        let turn = self.pace.arrive(self.fast_paths);
        if turn.inline {
            if crate::on_io_thread() {
                return transfer(&self.file, &mut buf, offset, 0, write).map(|()| buf);
            }
            if on_multi_thread_runtime() {
                return tokio::task::block_in_place(|| {
                    transfer(&self.file, &mut buf, offset, 0, write)
                })
                .map(|()| buf);
            }
        }
        let r = match (&self.io, write) {
            (Io::Ring(r), false) => r.read(offset, buf, 0).await,
            (Io::Ring(r), true) => r.write_back(offset, buf).await,
            (Io::Pool, _) => {
                let file = self.file.clone();
                blocking(move || transfer(&file, &mut buf, offset, 0, write).map(|()| buf)).await
            }
        };
        self.pace.engine_done(&turn);
        r
    }

    /// Fill `buf` with the bytes at `offset`: what the page cache holds on the calling thread,
    /// the rest through the engine.
    async fn read_buf(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf, BlockError> {
        self.check(offset, buf.len() as u64)
            .map_err(BlockError::ReadFailed)?;
        if let Some(align) = self.direct {
            align
                .check(offset, buf.len())
                .map_err(BlockError::ReadFailed)?;
            if align.fits(&buf) {
                return self
                    .paced_io(offset, buf, false)
                    .await
                    .map_err(BlockError::ReadFailed);
            }
            let (bounce, mem) = Aligned::buffer(buf.len(), align.memory, |_| {});
            self.paced_io(offset, bounce, false)
                .await
                .map_err(BlockError::ReadFailed)?;
            buf.copy_from(0, mem.bytes());
            return Ok(buf);
        }
        if self.fast_paths && !self.nowait_reads.load(Ordering::Relaxed) {
            return self
                .paced_io(offset, buf, false)
                .await
                .map_err(BlockError::ReadFailed);
        }
        let got = if self.fast_paths {
            let (got, refused) = read_cached(&self.file, &mut buf, offset);
            if refused {
                self.nowait_reads.store(false, Ordering::Relaxed);
                tracing::info!(
                    "the image's file system cannot read without waiting (RWF_NOWAIT); reads \
                     at queue depth 1 run on the calling thread, as direct I/O's do"
                );
            }
            got
        } else {
            0
        };
        if got == buf.len() {
            return Ok(buf);
        }
        self.read_engine(offset, buf, got).await
    }

    /// Write `data` at `offset`; see the module docs for the path it takes.
    ///
    /// A FUA write is written first without a sync, so that what fails there (ENOSPC when a
    /// block cannot be allocated) fails the write alone; then its range is synced
    /// ([`FileDriver::datasync_range`]), not written again: a second write could put this
    /// write's data back over an overlapping write that completed in between. A failed sync
    /// reports the image's writeback errors, whichever write they came from, so it is latched
    /// ([`SyncLatch`]).
    async fn write_buf(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.check(offset, len).map_err(BlockError::WriteFailed)?;
        if fua {
            self.syncs.check().map_err(BlockError::WriteFailed)?;
        }
        let mut data = data;
        if let Some(align) = self.direct {
            align
                .check(offset, data.len())
                .map_err(BlockError::WriteFailed)?;
            if !align.fits(&data) {
                let (bounce, _) = Aligned::buffer(data.len(), align.memory, |b| {
                    data.copy_to(0, b);
                });
                data = bounce;
            }
            self.paced_io(offset, data, true)
                .await
                .map_err(write_error)?;
        } else {
            let in_flight = InFlight::enter(&self.writes_in_flight);
            let alone = self.fast_paths && in_flight.others == 0;
            self.buffered_write(offset, data, alone)
                .await
                .map_err(write_error)?;
        }
        if fua {
            #[cfg(test)]
            if let Some(between) = self
                .between_fua_steps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                between();
            }
            self.synced(self.datasync_range(offset, len)).await?;
        }
        Ok(())
    }

    /// Open `path`; when it does not exist and `create_size` is given, create a sparse file of
    /// that many bytes. Uses the default [`FileOptions`].
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Self, BlockError> {
        Self::open_with(path, create_size, &FileOptions::default())
    }

    /// [`FileDriver::open`] with options.
    pub fn open_with(
        path: &Path,
        create_size: Option<u64>,
        opts: &FileOptions,
    ) -> Result<Self, BlockError> {
        let (file, created) = open_or_create(path, create_size.is_some(), opts.direct)?;
        lock_exclusive(&file, path)?;
        if let Some(size) = create_size {
            // Created here, or empty: created by an open that could not size it (it ended
            // between the two steps, or its `set_len` failed), which every later open would
            // otherwise find too small to serve. Sized under the lock.
            let empty = file.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
            if created || empty {
                file.set_len(size).map_err(BlockError::Open)?;
            }
        }
        let meta = file.metadata().map_err(BlockError::Open)?;
        let ft = meta.file_type();
        let (size, block_device) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_block_device() {
            (block_device_size(&file).map_err(BlockError::Open)?, true)
        } else {
            return Err(BlockError::Open(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file or a block device", path.display()),
            )));
        };
        let direct = if opts.direct {
            Some(DirectAlign::of(&file, block_device).map_err(|e| {
                BlockError::Open(io::Error::new(
                    e.kind(),
                    format!("{}: no direct I/O: {e}", path.display()),
                ))
            })?)
        } else {
            None
        };
        let punch = !block_device && probe_punch(&file, size);
        let file = Arc::new(file);
        let reservations = reservation_store(path, block_device, opts, &file)?;
        let want_ring = match opts.engine {
            EngineChoice::Auto => DEFAULT_ENGINE == Engine::IoUring,
            EngineChoice::IoUring => true,
            EngineChoice::ThreadPool => false,
        };
        let io = if want_ring {
            match Ring::new(file.clone(), opts.ring_entries.max(2)) {
                Ok(r) => Io::Ring(r),
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "io_uring unavailable, using the thread pool"
                    );
                    Io::Pool
                }
            }
        } else {
            Io::Pool
        };
        tracing::info!(
            path = %path.display(),
            size,
            engine = if matches!(io, Io::Ring(_)) { "io_uring" } else { "thread-pool" },
            thin = punch,
            direct = ?direct.map(|d| d.offset),
            "opened image"
        );
        Ok(Self {
            file,
            io,
            fast_paths: opts.fast_paths,
            direct,
            writes_in_flight: AtomicUsize::new(0),
            pace: DirectPace::default(),
            nowait_reads: AtomicBool::new(true),
            size: AtomicU64::new(size),
            block_device,
            punch,
            alloc_unit: std::os::unix::fs::MetadataExt::blksize(&meta),
            zero_range: AtomicBool::new(!block_device),
            syncs: SyncLatch::default(),
            reservations,
            #[cfg(test)]
            between_fua_steps: Default::default(),
        })
    }

    /// Whether the io_uring engine is reaped by a thread of its own, as it is when the file was
    /// opened outside a tokio runtime (or on one without I/O); `false` when it is reaped on the
    /// runtime, and for the thread pool. See the `uring` module.
    pub fn uring_thread(&self) -> bool {
        matches!(&self.io, Io::Ring(r) if r.on_thread())
    }

    /// The engine in use.
    pub fn engine(&self) -> Engine {
        match self.io {
            Io::Ring(_) => Engine::IoUring,
            Io::Pool => Engine::ThreadPool,
        }
    }

    /// The range must lie in the image, and the image must not have failed: once its io_uring
    /// ring failed, requests the ring held may still reach the file after their callers were
    /// told they failed, so no request goes anywhere else either (a write on the calling
    /// thread could land before such a late one and be overwritten by it).
    fn check(&self, offset: u64, len: u64) -> io::Result<u64> {
        if let Io::Ring(r) = &self.io {
            if r.failed() {
                return Err(io::Error::other(
                    "The image's io_uring ring failed; the image needs a restart of the process",
                ));
            }
        }
        let size = self.size.load(Ordering::Acquire);
        offset
            .checked_add(len)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("Range {offset}+{len} is beyond the end of the {size} byte image"),
                )
            })
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK);
            self.write(pos, vec![0; n as usize], false).await?;
            pos += n;
        }
        Ok(())
    }
}

fn open_or_create(path: &Path, may_create: bool, direct: bool) -> Result<(File, bool), BlockError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    match o.open(path) {
        Ok(f) => Ok((f, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && may_create => {
            // `create_new`: never truncate a file that appeared in the meantime. Mode 0600:
            // the disk's data is for the daemon, not for every local user.
            match o.create_new(true).mode(0o600).open(path) {
                Ok(f) => Ok((f, true)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    open_or_create(path, false, direct)
                }
                Err(e) => Err(open_error(e, path, direct)),
            }
        }
        Err(e) => Err(open_error(e, path, direct)),
    }
}

/// An open that failed; EINVAL on an `O_DIRECT` open is a file system without direct I/O.
fn open_error(e: io::Error, path: &Path, direct: bool) -> BlockError {
    if direct && e.raw_os_error() == Some(libc::EINVAL) {
        return BlockError::Open(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: the file system does not support direct I/O (O_DIRECT)",
                path.display()
            ),
        ));
    }
    BlockError::Open(e)
}

/// Take an exclusive `flock` on `file` (at `path`) without waiting: an `Open` error of kind
/// `WouldBlock` when another open file description holds it.
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), BlockError> {
    // SAFETY: flock only takes a descriptor, which `file` keeps open for the call.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::Open(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another process", path.display()),
        )));
    }
    Err(BlockError::Open(io::Error::new(
        e.kind(),
        format!("Cannot lock {}: {e}", path.display()),
    )))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`, alive and
    // writable for the whole call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: fallocate only takes a descriptor, kept open by `file`, and plain integers.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Whether the file system punches holes: punch one page past the end of the file, which
/// changes no data (and, with KEEP_SIZE, not the size either).
fn probe_punch(file: &File, size: u64) -> bool {
    let Some(at) = size.checked_next_multiple_of(4096) else {
        return false;
    };
    match fallocate(file, PUNCH, at, 4096) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "file system does not punch holes; no thin provisioning");
            false
        }
    }
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek only takes a descriptor, kept open by `file`, and integers. Moving the file
    // position is harmless: all data I/O is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(r).map_err(|_| io::ErrorKind::InvalidData.into())
}

/// The reservation store of the image opened at `path` (see the module docs): the state file
/// `opts` names, else the sidecar of a regular file's canonical path; a block device without
/// a state file gets a memory store that refuses APTPL. A state file found where an earlier
/// version kept it, or beside a block device, is an error: serving without it would
/// silently drop the reservations it holds.
fn reservation_store(
    path: &Path,
    block_device: bool,
    opts: &FileOptions,
    file: &Arc<File>,
) -> Result<Arc<dyn ReservationStore>, BlockError> {
    let open_err = |e: io::Error| {
        BlockError::Open(io::Error::new(
            e.kind(),
            format!("Cannot resolve the image path {}: {e}", path.display()),
        ))
    };
    let canonical = fs::canonicalize(path).map_err(open_err)?;
    let chosen = match &opts.reservation_state {
        Some(p) => Some(p.clone()),
        None if block_device => None,
        None => Some(sidecar_path(&canonical)),
    };
    // The same file under two spellings (a relative path, a symlinked folder, a symlink the
    // store follows) is no stray: files are compared by identity, through links.
    let identity = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let kept = chosen.as_deref().and_then(identity);
    for stray in [sidecar_path(path), sidecar_path(&canonical)] {
        let Some(id) = identity(&stray) else { continue };
        if Some(id) == kept {
            continue;
        }
        let fix = match &chosen {
            Some(c) => format!("move it to {}", c.display()),
            None => "configure a reservation state file on persistent storage and move it there"
                .to_string(),
        };
        return Err(BlockError::Open(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} holds persistent reservation state for {}, but the state is not kept \
                 there: {fix}, or remove it if its reservations are no longer wanted",
                stray.display(),
                path.display()
            ),
        )));
    }
    Ok(match chosen {
        Some(state) => Arc::new(SidecarStore::open(state, file.clone())?),
        None => {
            tracing::warn!(
                path = %path.display(),
                "Block device without a reservation state file: APTPL (persist through power \
                 loss) is refused; configure a state file on persistent storage to allow it"
            );
            Arc::new(crate::reservation::MemoryStore::without_aptpl())
        }
    })
}

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`, whose header is 32 bytes.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_EXTENT_LAST`: no extent of the file follows this one.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents asked for in one `FS_IOC_FIEMAP` call.
const FIEMAP_BATCH: usize = 32;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `struct fiemap` with room for [`FIEMAP_BATCH`] extents.
#[repr(C)]
#[derive(Default)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// The file's extents that overlap `offset .. offset + len`, in file order, at most
/// [`FIEMAP_BATCH`] of them; `None` when the file system has no FIEMAP.
fn fiemap(file: &File, offset: u64, len: u64) -> io::Result<Option<Vec<FiemapExtent>>> {
    let mut map = Fiemap {
        start: offset,
        length: len,
        extent_count: FIEMAP_BATCH as u32,
        ..Fiemap::default()
    };
    // SAFETY: `map` is a `struct fiemap` with room for `extent_count` extents, writable for
    // the whole call; the descriptor is kept open by `file`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map as *mut Fiemap) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No FIEMAP here (ENOTTY, EOPNOTSUPP; ENOSYS from some FUSE file systems; EINVAL
            // where the file system refuses the request as such): SEEK_DATA instead.
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS | libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    let n = (map.mapped_extents as usize).min(FIEMAP_BATCH);
    Ok(Some(map.extents[..n].to_vec()))
}

/// The extent at `offset`, at most `len` long, from the file system's extent map (FIEMAP).
/// Every extent counts as mapped, whether its blocks hold data, are allocated but unwritten
/// (what `FALLOC_FL_ZERO_RANGE` leaves, which SEEK_DATA reports as a hole although the blocks
/// stay allocated) or are still delayed in the page cache. `None` when the file system has no
/// FIEMAP.
fn map_extent(file: &File, offset: u64, len: u64) -> io::Result<Option<Extent>> {
    let end = offset.saturating_add(len);
    // `offset .. mapped_to` is known to be mapped.
    let mut mapped_to = offset;
    while mapped_to < end {
        let Some(extents) = fiemap(file, mapped_to, end - mapped_to)? else {
            return Ok(None);
        };
        let full = extents.len() == FIEMAP_BATCH;
        let before = mapped_to;
        for e in &extents {
            let e_end = e.logical.saturating_add(e.length);
            if e_end <= mapped_to {
                continue;
            }
            if e.logical > mapped_to {
                // A hole at `mapped_to`.
                if mapped_to == offset {
                    return Ok(Some(Extent {
                        len: (e.logical - offset).min(len),
                        mapped: false,
                    }));
                }
                return Ok(Some(Extent {
                    len: mapped_to - offset,
                    mapped: true,
                }));
            }
            mapped_to = e_end;
        }
        let last = extents
            .last()
            .is_some_and(|e| e.flags & FIEMAP_EXTENT_LAST != 0);
        if !full || last || mapped_to == before {
            break;
        }
    }
    if mapped_to == offset {
        // No extent at or after `offset` within the range: a hole to its end.
        return Ok(Some(Extent { len, mapped: false }));
    }
    Ok(Some(Extent {
        len: (mapped_to - offset).min(len),
        mapped: true,
    }))
}

/// The extent at `offset`, at most `len` long: from FIEMAP ([`map_extent`]) where the file
/// system has it, from SEEK_DATA/SEEK_HOLE ([`seek_extent`]) where it does not.
fn file_extent(file: &File, offset: u64, len: u64) -> io::Result<Extent> {
    match map_extent(file, offset, len)? {
        Some(e) => Ok(e),
        None => seek_extent(file, offset, len),
    }
}

/// The extent at `offset` from SEEK_DATA/SEEK_HOLE, at most `len` long.
fn seek_extent(file: &File, offset: u64, len: u64) -> io::Result<Extent> {
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(d) if d <= offset => {
            let h = lseek(file, offset, libc::SEEK_HOLE)?;
            Ok(Extent {
                len: h.saturating_sub(offset).min(len).max(1),
                mapped: true,
            })
        }
        Ok(d) => Ok(Extent {
            len: (d - offset).min(len),
            mapped: false,
        }),
        // No data at or after `offset`: a hole to the end.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Extent { len, mapped: false }),
        // SEEK_DATA not supported here: say mapped.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Extent { len, mapped: true }),
        Err(e) => Err(e),
    }
}

pub(crate) fn write_error(e: io::Error) -> BlockError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockError::NoSpace,
        _ => BlockError::WriteFailed(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

#[async_trait]
impl Driver for FileDriver {
    /// Look at the image's size again: a regular file's length, a block device's size. A grown
    /// image is served to its new end from now on; one that shrank is refused (blocks an
    /// initiator was told of would vanish under it) and the size stays.
    async fn refresh_size(&self) -> Result<u64, BlockError> {
        let now = if self.block_device {
            block_device_size(&self.file)
        } else {
            self.file.metadata().map(|m| m.len())
        }
        .map_err(BlockError::Open)?;
        let before = self.size.load(Ordering::Acquire);
        if now < before {
            return Err(BlockError::Open(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the image shrank from {before} to {now} bytes; only growing is served"),
            )));
        }
        self.size.store(now, Ordering::Release);
        Ok(now)
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.size.load(Ordering::Acquire),
            discard: self.punch,
            discard_zeroes: self.punch,
            native_compare_and_write: 0,
        }
    }

    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        Some(self.reservations.clone())
    }

    fn io_alignment(&self) -> u64 {
        self.direct.map_or(1, |d| d.offset as u64)
    }

    fn allocation_unit(&self) -> u64 {
        if self.punch {
            self.alloc_unit
        } else {
            0
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        Ok(self.read_buf(offset, vec![0; len].into()).await?.into_vec())
    }

    async fn read_into(&self, offset: u64, buf: IoBuf) -> Result<(), BlockError> {
        self.read_buf(offset, buf).await.map(drop)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.write_buf(offset, data.into(), fua).await
    }

    async fn write_from(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        self.write_buf(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.synced(self.datasync()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len).map_err(BlockError::WriteFailed)?;
        if !self.punch {
            return Err(BlockError::Unsupported);
        }
        let file = self.file.clone();
        blocking(move || fallocate(&file, PUNCH, offset, len))
            .await
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => BlockError::Unsupported,
                _ => write_error(e),
            })
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.check(offset, len).map_err(BlockError::WriteFailed)?;
        if len == 0 {
            return Ok(());
        }
        if unmap && self.punch {
            match self.discard(offset, len).await {
                Err(BlockError::Unsupported) => {}
                r => return r,
            }
        }
        if self.zero_range.load(Ordering::Relaxed) {
            let file = self.file.clone();
            match blocking(move || fallocate(&file, ZERO_RANGE, offset, len)).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) =>
                {
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(write_error(e)),
            }
        }
        self.write_zero_buffers(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.check(offset, len).map_err(BlockError::ReadFailed)?;
        if self.block_device || len == 0 {
            return Ok(Extent { len, mapped: true });
        }
        let file = self.file.clone();
        blocking(move || file_extent(&file, offset, len))
            .await
            .map_err(BlockError::ReadFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn direct_requests_run_inline_only_after_the_engine_saw_queue_depth_one() {
        let pace = DirectPace::default();
        // Nothing measured yet: the first lone request goes to the engine.
        let t = pace.arrive(true);
        assert!(!t.inline);
        pace.engine_done(&t);
        drop(t);
        // It was alone throughout: the next INLINE_RUN lone requests run inline, then the
        // engine measures again.
        for _ in 0..INLINE_RUN {
            assert!(pace.arrive(true).inline);
        }
        let probe = pace.arrive(true);
        assert!(!probe.inline);
        // Another request arrives while the probe is in flight: queue depth 2. Neither runs
        // inline, and the probe's completion grants nothing.
        let second = pace.arrive(true);
        assert!(!second.inline);
        pace.engine_done(&probe);
        drop(probe);
        pace.engine_done(&second);
        drop(second);
        assert!(!pace.arrive(true).inline);
    }

    #[test]
    fn a_request_that_finds_another_in_flight_ends_the_inline_run() {
        let pace = DirectPace::default();
        let t = pace.arrive(true);
        pace.engine_done(&t);
        drop(t);
        let first = pace.arrive(true);
        assert!(first.inline);
        // A second request while the first (inline, on another thread) is still in flight.
        let second = pace.arrive(true);
        assert!(!second.inline);
        drop(first);
        drop(second);
        assert!(!pace.arrive(true).inline, "the run ended");
        // Without the fast paths, never inline.
        let pace = DirectPace::default();
        let t = pace.arrive(false);
        pace.engine_done(&t);
        drop(t);
        assert!(!pace.arrive(false).inline);
    }

    #[test]
    fn a_full_file_system_is_no_space_not_a_write_error() {
        let e = write_error(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, BlockError::NoSpace));
        let e = write_error(io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(matches!(e, BlockError::NoSpace));
    }

    #[test]
    fn other_write_errors_keep_their_cause() {
        let e = write_error(io::Error::from_raw_os_error(libc::EIO));
        let BlockError::WriteFailed(io) = e else {
            panic!("{e:?}");
        };
        assert_eq!(io.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn allocated_extents_in_a_row_are_one_mapped_run() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(1 << 20).expect("set_len");
        // Data, then allocated but unwritten blocks, then data again: three extents on ext4 or
        // XFS, one run of mapped blocks for GET LBA STATUS; then a hole to the end.
        f.write_all_at(&[1; 4096], 0).expect("write");
        if fallocate(&f, ZERO_RANGE, 4096, 8192).is_err() {
            f.write_all_at(&[0; 8192], 4096).expect("write");
        }
        f.write_all_at(&[1; 4096], 12288).expect("write");
        let e = file_extent(&f, 0, 1 << 20).expect("extent");
        assert_eq!(
            e,
            Extent {
                len: 16384,
                mapped: true
            }
        );
        let e = file_extent(&f, 8192, (1 << 20) - 8192).expect("extent");
        assert_eq!(
            e,
            Extent {
                len: 8192,
                mapped: true
            }
        );
        let e = file_extent(&f, 16384, (1 << 20) - 16384).expect("extent");
        assert_eq!(
            e,
            Extent {
                len: (1 << 20) - 16384,
                mapped: false
            }
        );
        // A range that starts in a hole ends where the next extent starts.
        f.write_all_at(&[1; 4096], 65536).expect("write");
        let e = file_extent(&f, 16384, (1 << 20) - 16384).expect("extent");
        assert_eq!(
            e,
            Extent {
                len: 65536 - 16384,
                mapped: false
            }
        );
    }

    #[tokio::test]
    async fn zeroes_written_without_unmap_stay_mapped() {
        // SBC-4 WRITE SAME with UNMAP=0 writes every block, so GET LBA STATUS must then say
        // mapped, even where the file system keeps the zeros as allocated, unwritten blocks.
        let dir = tempfile::tempdir().expect("tempdir");
        let d = FileDriver::open(&dir.path().join("img"), Some(1 << 20)).expect("open");
        d.write(0, vec![1; 65536], false).await.expect("write");
        d.discard(0, 65536).await.expect("discard");
        let e = d.block_status(0, 1 << 20).await.expect("status");
        assert!(!e.mapped, "{e:?}");
        d.write_zeroes(0, 65536, false).await.expect("zeroes");
        let e = d.block_status(0, 1 << 20).await.expect("status");
        assert_eq!(
            e,
            Extent {
                len: 65536,
                mapped: true
            }
        );
        assert_eq!(d.read(0, 65536).await.expect("read"), vec![0; 65536]);
        // With unmap, the blocks go back to the file system.
        d.write_zeroes(0, 65536, true).await.expect("zeroes");
        let e = d.block_status(0, 1 << 20).await.expect("status");
        assert!(!e.mapped, "{e:?}");
    }

    /// A file system that refuses `RWF_NOWAIT` reads (tmpfs on Linux 6.1): the driver notices
    /// at the first read and paces the later ones as direct I/O's (on the calling thread at
    /// queue depth 1, through the engine beside others); every read still returns the file's
    /// bytes. Where the kernel takes `RWF_NOWAIT` on tmpfs, the cached path stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_a_file_that_refuses_nowait_are_paced_and_right() {
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .expect("a folder in /dev/shm (tmpfs)");
        let path = dir.path().join("img");
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &pattern).expect("write the image");
        let refuses = {
            let f = std::fs::File::open(&path).expect("open");
            let mut b = IoBuf::from(vec![0u8; 4096]);
            matches!(read_cached(&f, &mut b, 0), (0, true))
        };
        let d = FileDriver::open(&path, None).expect("open");
        assert!(
            d.nowait_reads.load(Ordering::SeqCst),
            "not known before a read"
        );
        for (off, len) in [(0, 4096), (4096, 512), (65536, 131072), (1040384, 8192)] {
            let got = d.read(off as u64, len).await.expect("read");
            assert_eq!(got, &pattern[off..off + len], "read of {len} at {off}");
        }
        assert_eq!(d.nowait_reads.load(Ordering::SeqCst), !refuses);
        // Reads beside each other (the engine's part of the pacing).
        let (a, b, c, e) = tokio::join!(
            d.read(0, 65536),
            d.read(65536, 65536),
            d.read(131072, 65536),
            d.read(196608, 65536)
        );
        for (i, r) in [a, b, c, e].into_iter().enumerate() {
            let off = i * 65536;
            assert_eq!(r.expect("read"), &pattern[off..off + 65536]);
        }
    }

    #[test]
    fn an_empty_image_left_by_an_open_that_did_not_size_it_is_sized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::File::create(&path).expect("create empty");
        let d = FileDriver::open(&path, Some(1 << 20)).expect("open");
        assert_eq!(d.info().size, 1 << 20);
        drop(d);
        // One that holds data is served as it is, whatever size is asked.
        let d = FileDriver::open(&path, Some(2 << 20)).expect("open");
        assert_eq!(d.info().size, 1 << 20);
    }

    #[test]
    fn a_created_image_is_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let _d = FileDriver::open(&path, Some(1 << 20)).expect("open");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_hole_at_the_end_of_a_file_is_reported_to_the_end() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(1 << 20).expect("set_len");
        f.write_all_at(&[1; 4096], 0).expect("write");
        let e = seek_extent(&f, 0, 1 << 20).expect("data extent");
        assert!(e.mapped);
        assert_eq!(e.len, 4096);
        let e = seek_extent(&f, 4096, (1 << 20) - 4096).expect("hole extent");
        assert_eq!(
            e,
            Extent {
                len: (1 << 20) - 4096,
                mapped: false
            }
        );
    }

    /// Poll `f` once, on this thread, with a waker that does nothing.
    fn poll_once<F: std::future::Future>(f: F) -> std::task::Poll<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.as_mut().poll(&mut cx)
    }

    #[test]
    fn an_io_thread_scope_ends_with_its_setting_restored() {
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(!crate::on_io_thread());
                {
                    let _outer = crate::IoThreadScope::enter(true);
                    assert!(crate::on_io_thread());
                    {
                        let _inner = crate::IoThreadScope::enter(false);
                        assert!(!crate::on_io_thread());
                    }
                    assert!(crate::on_io_thread());
                }
                assert!(!crate::on_io_thread());
            });
        });
    }

    #[test]
    fn a_write_on_a_frontends_io_thread_is_done_in_place_even_behind_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = FileOptions {
            engine: EngineChoice::IoUring,
            ..FileOptions::default()
        };
        let d = FileDriver::open_with(&dir.path().join("img"), Some(1 << 20), &opts).expect("open");
        assert_eq!(d.engine(), Engine::IoUring);
        // A request handed to the ring thread is pending after one poll, unless that thread
        // happened to finish it in between (rare, on a loaded machine): of ten tries, at least
        // one must be pending.
        let handed_to_the_ring = |offset: u64, fua: bool| {
            (0..10).any(|_| poll_once(d.write(offset, vec![1; 4096], fua)).is_pending())
        };
        // Another write in flight: an ordinary thread hands this one to the ring and waits.
        d.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        std::thread::scope(|s| {
            s.spawn(|| assert!(handed_to_the_ring(0, false)));
        });
        // On a frontend's I/O thread it is written at once; a FUA write still goes to the ring.
        std::thread::scope(|s| {
            s.spawn(|| {
                let _io_thread = crate::IoThreadScope::enter(true);
                assert!(matches!(
                    poll_once(d.write(4096, vec![2; 4096], false)),
                    std::task::Poll::Ready(Ok(()))
                ));
                assert!(handed_to_the_ring(8192, true));
            });
        });
        let mut got = vec![0u8; 4096];
        d.file.read_exact_at(&mut got, 4096).expect("read");
        assert_eq!(got, vec![2; 4096]);
    }

    /// Whatever lands on a FUA write's range between its write and its sync (another
    /// initiator's overlapping write, completed in between) is what the range holds after the
    /// sync: the sync writes no data of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fua_writes_sync_does_not_write_its_data_again() {
        for engine in [EngineChoice::IoUring, EngineChoice::ThreadPool] {
            for fast_paths in [true, false] {
                let dir = tempfile::tempdir().expect("tempdir");
                let opts = FileOptions {
                    engine,
                    fast_paths,
                    ..FileOptions::default()
                };
                let d = FileDriver::open_with(&dir.path().join("img"), Some(1 << 20), &opts)
                    .expect("open");
                let file = d.file.clone();
                *d.between_fua_steps.lock().expect("hook") = Some(Box::new(move || {
                    file.write_all_at(&[2; 4096], 4096)
                        .expect("the other write");
                }));
                d.write(4096, vec![1; 4096], true).await.expect("FUA write");
                let mut got = vec![0u8; 4096];
                d.file.read_exact_at(&mut got, 4096).expect("read");
                assert!(
                    got.iter().all(|&b| b == 2),
                    "{engine:?}, fast paths {fast_paths}: the range holds {:?}, not the other write's 2s",
                    &got[..8]
                );
            }
        }
    }

    /// Once the image's ring failed, requests it held may still land; no other path (a lone
    /// write on the calling thread, zeroing, a read from the page cache) may serve the image.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_reaches_the_image_after_its_ring_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = FileDriver::open(&dir.path().join("img"), Some(1 << 20)).expect("open");
        let Io::Ring(ring) = &d.io else {
            panic!("the default engine on this kernel is io_uring");
        };
        d.write(0, vec![1; 4096], false).await.expect("write");
        ring.poison();
        assert!(
            d.write(0, vec![2; 4096], false).await.is_err(),
            "lone write"
        );
        assert!(
            d.write_zeroes(0, 4096, false).await.is_err(),
            "write zeroes"
        );
        assert!(d.read(0, 4096).await.is_err(), "read");
        let mut got = vec![0u8; 4096];
        d.file.read_exact_at(&mut got, 0).expect("read");
        assert!(
            got.iter().all(|&b| b == 1),
            "the image holds {:?}",
            &got[..8]
        );
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_later_flush_and_fua_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = FileDriver::open(&dir.path().join("img"), Some(1 << 20)).expect("open");
        d.write(0, vec![1; 4096], true).await.expect("FUA write");
        d.flush().await.expect("flush");
        // A flush whose fdatasync failed with EIO: the kernel may have dropped the dirty pages.
        let sync = d.syncs.begin().expect("begin");
        let r = sync.end(Err(io::Error::from_raw_os_error(libc::EIO))).await;
        assert_eq!(
            r.expect_err("the sync's own error").raw_os_error(),
            Some(libc::EIO)
        );
        assert!(matches!(d.flush().await, Err(BlockError::WriteFailed(_))));
        assert!(matches!(
            d.write(0, vec![2; 4096], true).await,
            Err(BlockError::WriteFailed(_))
        ));
        let mut got = vec![0; 4096];
        d.file.read_exact_at(&mut got, 0).expect("read");
        assert_eq!(
            got,
            vec![1; 4096],
            "a FUA write refused by the latch writes nothing"
        );
        // Plain writes still reach the page cache; the next flush reports the loss.
        d.write(0, vec![3; 4096], false).await.expect("plain write");
        assert!(matches!(d.flush().await, Err(BlockError::WriteFailed(_))));
    }
}
