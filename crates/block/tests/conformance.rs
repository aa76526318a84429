//! The driver conformance suite (DESIGN.md §7, level 2): the same tests, through [`Backend`],
//! against every block driver. Each driver gets a module below, made by `suite!`; a new driver
//! (RBD) adds one line.
//!
//! Every driver is wrapped in [`Yielding`], which yields to the scheduler before and after each
//! driver call, so concurrent requests interleave at every await point; the atomicity test
//! depends on that to have a chance of catching a race.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use block::driver::file::{Engine, EngineChoice, FileDriver, FileOptions};
use block::driver::mem::MemDriver;
use block::{
    Backend, BlockError, Driver, DriverInfo, Extent, IoBuf, OpKind, ReservationStore, Stored,
};

/// A device under test, with whatever must outlive it.
struct Harness {
    backend: Arc<Backend>,
    path: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

type Make = fn(u64, u32) -> Harness;

/// Yields around every call of the inner driver.
struct Yielding(Arc<dyn Driver>);

#[async_trait]
impl Driver for Yielding {
    fn info(&self) -> DriverInfo {
        self.0.info()
    }
    fn allocation_unit(&self) -> u64 {
        self.0.allocation_unit()
    }
    fn io_alignment(&self) -> u64 {
        self.0.io_alignment()
    }
    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        self.0.reservation_store()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        tokio::task::yield_now().await;
        let r = self.0.read(offset, len).await;
        tokio::task::yield_now().await;
        r
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        tokio::task::yield_now().await;
        let r = self.0.write(offset, data, fua).await;
        tokio::task::yield_now().await;
        r
    }
    async fn read_into(&self, offset: u64, buf: IoBuf) -> Result<(), BlockError> {
        tokio::task::yield_now().await;
        let r = self.0.read_into(offset, buf).await;
        tokio::task::yield_now().await;
        r
    }
    async fn write_from(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        tokio::task::yield_now().await;
        let r = self.0.write_from(offset, data, fua).await;
        tokio::task::yield_now().await;
        r
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        tokio::task::yield_now().await;
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        tokio::task::yield_now().await;
        self.0.write_zeroes(offset, len, unmap).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.0.block_status(offset, len).await
    }
}

fn harness(driver: Arc<dyn Driver>, bs: u32, dir: Option<tempfile::TempDir>) -> Harness {
    let path = dir.as_ref().map(|d| d.path().join("disk.img"));
    let backend = Backend::new(Arc::new(Yielding(driver)), bs).expect("backend");
    Harness {
        backend: Arc::new(backend),
        path,
        _dir: dir,
    }
}

fn mem(size: u64, bs: u32) -> Harness {
    harness(Arc::new(MemDriver::new(size)), bs, None)
}

fn file_with(size: u64, bs: u32, engine: EngineChoice, fast_paths: bool, direct: bool) -> Harness {
    file_opened(size, bs, engine, fast_paths, direct, true)
}

/// Open `path` (created with `size` bytes) inside the calling runtime (`on_runtime`), or on a
/// thread outside any runtime.
fn open_file(path: &std::path::Path, size: u64, opts: FileOptions, on_runtime: bool) -> FileDriver {
    if on_runtime {
        return FileDriver::open_with(path, Some(size), &opts).expect("open");
    }
    let p = path.to_path_buf();
    std::thread::spawn(move || FileDriver::open_with(&p, Some(size), &opts))
        .join()
        .expect("open thread")
        .expect("open")
}

/// A file driver opened inside the test's runtime (`on_runtime`), as the daemon opens its
/// images, so that io_uring is reaped by a task; or on a thread outside any runtime, where the
/// ring gets a thread of its own.
fn file_opened(
    size: u64,
    bs: u32,
    engine: EngineChoice,
    fast_paths: bool,
    direct: bool,
    on_runtime: bool,
) -> Harness {
    let opts = FileOptions {
        engine,
        fast_paths,
        direct,
        ..FileOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = open_file(&dir.path().join("disk.img"), size, opts, on_runtime);
    if d.engine() == Engine::IoUring {
        assert_eq!(
            d.uring_thread(),
            !on_runtime,
            "io_uring is reaped on the runtime exactly when the image is opened on one"
        );
    }
    let want = match engine {
        EngineChoice::ThreadPool => Some(Engine::ThreadPool),
        EngineChoice::IoUring => Some(Engine::IoUring),
        EngineChoice::Auto => None,
    };
    if let Some(want) = want {
        // The project's machines run Linux 6.1 with io_uring; a silent fallback would make the
        // io_uring suite test the thread pool instead.
        assert_eq!(
            d.engine(),
            want,
            "the file driver did not use the requested engine"
        );
    }
    harness(Arc::new(d), bs, Some(dir))
}

// The engines on their own (every request goes through them), and the default: the fast
// paths (page-cache hits and lone writes on the calling thread) in front of the default engine.
fn file_uring(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::IoUring, false, false)
}

fn file_pool(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::ThreadPool, false, false)
}

fn file_default(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::Auto, true, false)
}

// io_uring reaped by a thread of its own (a driver opened outside a runtime), buffered and
// direct.
fn file_uring_thread(size: u64, bs: u32) -> Harness {
    file_opened(size, bs, EngineChoice::IoUring, false, false, false)
}

fn file_direct_thread(size: u64, bs: u32) -> Harness {
    file_opened(size, bs, EngineChoice::IoUring, false, true, false)
}

// Direct I/O (O_DIRECT): each engine on its own, and the default (lone requests on the calling
// thread in front of io_uring). The temporary folder's file system must take direct I/O at
// 512-byte offsets (ext4 or XFS on a 512-byte-sector disk, as on the project's machines);
// otherwise the 512-byte cases fail at Backend::new, saying so.
fn file_direct(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::IoUring, false, true)
}

fn file_direct_pool(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::ThreadPool, false, true)
}

fn file_direct_default(size: u64, bs: u32) -> Harness {
    file_with(size, bs, EngineChoice::Auto, true, true)
}

const MIB: u64 = 1 << 20;

fn block_of(value: u64, bs: u32) -> Vec<u8> {
    value.to_le_bytes().repeat(bs as usize / 8)
}

fn value_of(block: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&block[..8]);
    u64::from_le_bytes(b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- data path -------------------------------------------------------------------------------

async fn read_write_round_trip(make: Make) {
    for bs in [512, 4096] {
        let h = make(8 * MIB, bs);
        let b = &h.backend;
        let data = pattern(3 * bs as usize, 7);
        b.write(5, data.clone(), false).await.expect("write");
        assert_eq!(b.read(5, 3).await.expect("read"), data);
        assert_eq!(b.read(4, 1).await.expect("read"), vec![0; bs as usize]);
    }
}

/// Separate allocations of `sizes` bytes lent as one buffer, twice over the same memory: one
/// for the I/O, one for the test to look through.
fn lent(sizes: &[usize]) -> (IoBuf, IoBuf) {
    let mut parts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xEE; n]).collect();
    let segs: Vec<(*mut u8, usize)> = parts
        .iter_mut()
        .map(|v| (v.as_mut_ptr(), v.len()))
        .collect();
    let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(std::sync::Mutex::new(parts));
    // SAFETY: the vectors live, never resized, in `owner`, which both buffers hold; the test
    // touches them only through the buffers.
    unsafe {
        (
            IoBuf::lent(segs.clone(), owner.clone()),
            IoBuf::lent(segs, owner),
        )
    }
}

async fn lent_buffers_are_written_from_and_read_into_in_place(make: Make) {
    for bs in [512usize, 4096] {
        let h = make(8 * MIB, bs as u32);
        let b = &h.backend;
        // Four blocks in segments that cut blocks anywhere.
        let sizes = [100, bs - 100 + 7, 2 * bs - 7 - 50, bs + 50];
        let data = pattern(4 * bs, 3);
        let (mut src, _) = lent(&sizes);
        assert_eq!(src.copy_from(0, &data), data.len());
        b.write(9, src, false)
            .await
            .expect("write from lent memory");
        assert_eq!(b.read(9, 4).await.expect("read"), data);
        if let Some(path) = &h.path {
            // Drop the last two blocks from the page cache, so that a read finds the first
            // part cached and the rest not (the fast path then hands the rest to the engine).
            let f = std::fs::File::open(path).expect("open");
            use std::os::fd::AsRawFd;
            // SAFETY: fdatasync and fadvise take a descriptor `f` keeps open, and integers.
            unsafe {
                libc::fdatasync(f.as_raw_fd());
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    (11 * bs) as i64,
                    (2 * bs) as i64,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        let (dst, look) = lent(&sizes);
        b.read_into(9, dst).await.expect("read into lent memory");
        let mut got = vec![0u8; 4 * bs];
        assert_eq!(look.copy_to(0, &mut got), got.len());
        assert_eq!(got, data);
        // Bounds and shape are checked as for owned buffers.
        let (short, _) = lent(&[bs - 1]);
        assert!(matches!(
            b.read_into(0, short).await,
            Err(BlockError::BadBufferLength { .. })
        ));
        let (past, _) = lent(&[2 * bs]);
        let last = 8 * MIB / bs as u64 - 1;
        assert!(matches!(
            b.write(last, past, false).await,
            Err(BlockError::OutOfRange { .. })
        ));
    }
}

async fn unwritten_blocks_read_zero(make: Make) {
    let h = make(8 * MIB, 512);
    let got = h.backend.read(100, 64).await.expect("read");
    assert!(got.iter().all(|&x| x == 0));
}

async fn fua_write_is_readable_and_flush_succeeds(make: Make) {
    let h = make(8 * MIB, 512);
    let data = pattern(4096, 3);
    h.backend
        .write(8, data.clone(), true)
        .await
        .expect("fua write");
    h.backend.flush().await.expect("flush");
    assert_eq!(h.backend.read(8, 8).await.expect("read"), data);
}

async fn zero_length_requests_do_nothing(make: Make) {
    let h = make(MIB, 512);
    assert_eq!(h.backend.read(0, 0).await.expect("read"), Vec::<u8>::new());
    h.backend.write(0, Vec::new(), false).await.expect("write");
    h.backend
        .write_zeroes(0, 0, true)
        .await
        .expect("write zeroes");
    h.backend
        .compare_and_write(0, Vec::new(), Vec::new(), false)
        .await
        .expect("caw");
}

// ---- bounds and shape ------------------------------------------------------------------------

async fn requests_beyond_the_end_are_out_of_range(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    let cap = b.capacity();
    assert_eq!(cap, 2048);
    let out = |r: Result<(), BlockError>| matches!(r, Err(BlockError::OutOfRange { .. }));
    assert!(matches!(
        b.read(cap, 1).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.read(u64::MAX, 2).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(out(b.write(cap - 1, vec![0; 1024], false).await));
    assert!(out(b.write(u64::MAX, vec![0; 512], false).await));
    assert!(out(b.write_zeroes(1, u64::MAX, false).await));
    assert!(out(b.write_same(cap, 1, vec![1; 512]).await));
    assert!(out(b.write_same(u64::MAX - 1, 3, vec![1; 512]).await));
    assert!(out(b
        .compare_and_write(cap, vec![0; 512], vec![0; 512], false)
        .await));
    assert!(matches!(
        b.block_status(cap).await,
        Err(BlockError::OutOfRange { .. })
    ));
    if b.capabilities().thin {
        assert!(out(b.discard(cap - 1, 2).await));
    }
    // Nothing was written by any of them.
    let last = b.read(cap - 1, 1).await.expect("read");
    assert!(last.iter().all(|&x| x == 0));
}

async fn reads_longer_than_the_maximum_transfer_are_rejected(make: Make) {
    let h = make(64 * MIB, 512);
    let blocks = block::MAX_TRANSFER_BYTES / 512 + 1;
    assert!(matches!(
        h.backend.read(0, blocks).await,
        Err(BlockError::BadBufferLength { .. })
    ));
    assert!(matches!(
        h.backend.read(0, u32::MAX).await,
        Err(BlockError::OutOfRange { .. })
    ));
}

/// Whether the file system holding `dir` punches holes, found without the driver's code: a
/// scratch file of 64 KiB of data, a 4 KiB hole punched in its middle (`fallocate` with
/// PUNCH_HOLE | KEEP_SIZE), which must then read zero. A file system that cannot says
/// EOPNOTSUPP; any other error fails the test.
fn file_system_punches_holes(dir: &std::path::Path) -> bool {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("punch-probe");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create the probe file");
    f.write_all(&[0xA5; 65536]).expect("write the probe file");
    f.sync_all().expect("sync the probe file");
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes a descriptor, kept open by `f`, and plain integers.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, 16384, 4096) };
    let punched = if r == 0 {
        let mut back = vec![0xFFu8; 65536];
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.read_exact(&mut back).expect("read the probe file back");
        assert!(
            back[16384..20480].iter().all(|&b| b == 0),
            "the hole reads zero"
        );
        assert!(back[..16384]
            .iter()
            .chain(&back[20480..])
            .all(|&b| b == 0xA5));
        true
    } else {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "fallocate: {e}");
        false
    };
    std::fs::remove_file(&path).expect("remove the probe file");
    punched
}

/// A file image is thin exactly when its file system punches holes (on the project's machines,
/// ext4 or XFS: always), so that the thin-provisioning tests below, which branch on the
/// capability, do run. The memory driver frees what is discarded: thin.
async fn thin_exactly_where_the_file_system_punches_holes(make: Make) {
    let h = make(MIB, 512);
    let thin = h.backend.capabilities().thin;
    match h.path.as_deref().and_then(|p| p.parent()) {
        Some(dir) => assert_eq!(
            thin,
            file_system_punches_holes(dir),
            "thin provisioning of a file image in {}",
            dir.display()
        ),
        None => assert!(thin, "the memory driver is thin"),
    }
}

async fn thin_devices_report_an_unmap_granularity(make: Make) {
    let h = make(MIB, 512);
    let g = h.backend.unmap_granularity_blocks();
    assert!(g >= 1);
    if h.backend.capabilities().thin {
        // 512-byte blocks on a driver allocating in units of at least 4 KiB.
        assert!(g >= 8, "{g}");
    }
}

async fn partial_block_buffers_are_rejected(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    assert!(matches!(
        b.write(0, vec![1; 513], false).await,
        Err(BlockError::BadBufferLength { .. })
    ));
    assert!(matches!(
        b.write_same(0, 4, vec![1; 511]).await,
        Err(BlockError::BadBufferLength { .. })
    ));
    assert!(matches!(
        b.compare_and_write(0, vec![0; 512], vec![0; 1024], false)
            .await,
        Err(BlockError::BadBufferLength { .. })
    ));
    assert!(matches!(
        b.compare_and_write(0, vec![0; 100], vec![0; 100], false)
            .await,
        Err(BlockError::BadBufferLength { .. })
    ));
    assert!(b.read(0, 2).await.expect("read").iter().all(|&x| x == 0));
}

// ---- thin provisioning -----------------------------------------------------------------------

async fn discard_reads_zero(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    b.write(0, vec![0xaa; 256 * 1024], false)
        .await
        .expect("write");
    if !b.capabilities().thin {
        assert!(matches!(
            b.discard(0, 8).await,
            Err(BlockError::Unsupported)
        ));
        return;
    }
    assert!(b.capabilities().unmapped_reads_zero);
    // An unaligned range: whole chunks go, the edges are zeroed.
    b.discard(3, 300).await.expect("discard");
    let got = b.read(0, 512).await.expect("read");
    assert!(got[..3 * 512].iter().all(|&x| x == 0xaa));
    assert!(got[3 * 512..303 * 512].iter().all(|&x| x == 0));
    assert!(got[303 * 512..].iter().all(|&x| x == 0xaa));
}

async fn write_zeroes_reads_zero_with_and_without_unmap(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    b.write(0, vec![0x55; 64 * 1024], false)
        .await
        .expect("write");
    b.write_zeroes(1, 10, false).await.expect("zeroes");
    b.write_zeroes(20, 50, true).await.expect("zeroes+unmap");
    let got = b.read(0, 128).await.expect("read");
    for (i, blk) in got.chunks(512).enumerate() {
        let zero = (1..11).contains(&i) || (20..70).contains(&i);
        let want = if zero { 0 } else { 0x55 };
        assert!(blk.iter().all(|&x| x == want), "block {i}");
    }
}

async fn write_zeroes_of_the_whole_device_is_cheap_and_reads_zero(make: Make) {
    let h = make(64 * MIB, 4096);
    let b = &h.backend;
    b.write(7, vec![9; 4096], false).await.expect("write");
    b.write_zeroes(0, b.capacity(), false)
        .await
        .expect("zeroes");
    assert!(b.read(7, 1).await.expect("read").iter().all(|&x| x == 0));
}

async fn block_status_tells_holes_from_data(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    if !b.capabilities().thin {
        let (n, mapped) = b.block_status(0).await.expect("status");
        assert!(mapped && n >= 1);
        return;
    }
    // 64 KiB in: aligned for every file system's and the memory driver's allocation unit.
    b.write(128, vec![1; 8 * 512], false).await.expect("write");
    assert_eq!(b.block_status(0).await.expect("status"), (128, false));
    assert_eq!(b.block_status(128).await.expect("status"), (8, true));
    let (n, mapped) = b.block_status(136).await.expect("status");
    assert!(!mapped);
    assert_eq!(n, b.capacity() - 136);
    // Discard makes it a hole again.
    b.discard(128, 8).await.expect("discard");
    let (n, mapped) = b.block_status(0).await.expect("status");
    assert!(!mapped);
    assert_eq!(n, b.capacity());
}

async fn zeros_written_without_unmap_stay_mapped(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    if !b.capabilities().thin {
        return;
    }
    // 64 KiB of data 64 KiB in, zeroed without unmap: SBC-4 WRITE SAME with UNMAP=0 writes
    // every block, so the blocks stay mapped; with unmap they are deallocated.
    b.write(128, vec![1; 128 * 512], false)
        .await
        .expect("write");
    b.write_zeroes(128, 128, false).await.expect("zeroes");
    assert_eq!(b.block_status(128).await.expect("status"), (128, true));
    b.write_zeroes(128, 128, true).await.expect("zeroes+unmap");
    let (n, mapped) = b.block_status(0).await.expect("status");
    assert!(!mapped);
    assert_eq!(n, b.capacity());
}

async fn block_status_of_the_last_block(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    let last = b.capacity() - 1;
    assert_eq!(b.block_status(last).await.expect("status").0, 1);
}

// ---- write same ------------------------------------------------------------------------------

async fn write_same_repeats_the_pattern_beyond_one_chunk(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    let p = pattern(512, 42);
    let blocks = 2 * 2048 + 3; // two 1 MiB chunks and a bit
    b.write_same(10, blocks, p.clone())
        .await
        .expect("write same");
    for lba in [10, 11, 10 + 2047, 10 + 2048, 10 + blocks - 1] {
        assert_eq!(b.read(lba, 1).await.expect("read"), p, "lba {lba}");
    }
    assert!(b.read(9, 1).await.expect("read").iter().all(|&x| x == 0));
    assert!(b
        .read(10 + blocks, 1)
        .await
        .expect("read")
        .iter()
        .all(|&x| x == 0));
}

async fn write_same_of_zeros_reads_zero(make: Make) {
    let h = make(8 * MIB, 512);
    let b = &h.backend;
    b.write(0, vec![3; 8192], false).await.expect("write");
    b.write_same(2, 10, vec![0; 512]).await.expect("write same");
    let got = b.read(0, 16).await.expect("read");
    assert!(got[..1024].iter().all(|&x| x == 3));
    assert!(got[1024..6144].iter().all(|&x| x == 0));
    assert!(got[6144..].iter().all(|&x| x == 3));
}

// ---- compare and write -----------------------------------------------------------------------

async fn caw_advertises_more_than_one_block(make: Make) {
    let h = make(MIB, 512);
    let max = h.backend.capabilities().max_compare_and_write_blocks;
    assert!((2..=255).contains(&max), "{max}");
}

async fn caw_writes_when_the_data_matches(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    let old = pattern(2048, 1);
    let new = pattern(2048, 2);
    b.write(4, old.clone(), false).await.expect("write");
    b.compare_and_write(4, old, new.clone(), true)
        .await
        .expect("caw");
    assert_eq!(b.read(4, 4).await.expect("read"), new);
}

async fn caw_miscompare_reports_first_difference_and_writes_nothing(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    let old = pattern(2048, 1);
    b.write(4, old.clone(), false).await.expect("write");
    let mut cmp = old.clone();
    cmp[700] ^= 1;
    cmp[1500] ^= 1;
    let r = b.compare_and_write(4, cmp, pattern(2048, 9), false).await;
    assert!(
        matches!(r, Err(BlockError::Miscompare { offset: 700 })),
        "{r:?}"
    );
    assert_eq!(b.read(4, 4).await.expect("read"), old);
    assert_eq!(b.stats().miscompares, 1);
}

async fn caw_of_the_maximum_length_works_and_one_more_is_rejected(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    let max = b.capabilities().max_compare_and_write_blocks as usize;
    let new = pattern(max * 512, 5);
    b.compare_and_write(0, vec![0; max * 512], new.clone(), false)
        .await
        .expect("caw");
    assert_eq!(b.read(0, max as u32).await.expect("read"), new);
    let len = (max + 1) * 512;
    assert!(matches!(
        b.compare_and_write(0, vec![0; len], vec![0; len], false)
            .await,
        Err(BlockError::BadBufferLength { .. })
    ));
}

/// Blocks 0..2 are the CAW range, blocks 1..3 the plain-write range. Plain writes (write, write
/// same, write zeroes, discard) set blocks 1 and 2 to the same fresh marker (or zeros); a CAW reads (counter, marker) from blocks 0..2 and writes
/// (counter + 1, marker). If every CAW is atomic against the writes and the other CAWs:
/// - blocks 1 and 2 always hold the same marker when nothing is in flight (a plain write landing
///   between a CAW's compare and its write would leave block 1 with the old marker);
/// - block 0 counts exactly the successful CAWs (no lost update).
async fn caw_is_atomic_against_overlapping_writes_of_every_kind(make: Make) {
    const ROUNDS: u64 = 150;
    const TASKS: u64 = 3;
    let h = make(MIB, 512);
    let b = h.backend.clone();
    let mut successes = 0u64;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let bc = b.clone();
            tasks.push(tokio::spawn(async move {
                let b = bc;
                let mut tries = 0;
                loop {
                    let cur = b.read(0, 2).await.expect("read");
                    let counter = value_of(&cur[..512]);
                    let mut new = block_of(counter + 1, 512);
                    new.extend_from_slice(&cur[512..]);
                    match b.compare_and_write(0, cur, new, false).await {
                        Ok(()) => return 1u64,
                        Err(BlockError::Miscompare { .. }) if tries < 1000 => tries += 1,
                        Err(e) => panic!("caw failed: {e:?}"),
                    }
                }
            }));
            let bw = b.clone();
            tasks.push(tokio::spawn(async move {
                let b = bw;
                // Every kind of write leaves blocks 1 and 2 equal.
                let marker = 1_000_000 + round * TASKS + t;
                let r = match (round + t) % 4 {
                    0 => {
                        let mut both = block_of(marker, 512);
                        both.extend_from_slice(&block_of(marker, 512));
                        b.write(1, both, false).await
                    }
                    1 => b.write_same(1, 2, block_of(marker, 512)).await,
                    2 => b.write_zeroes(1, 2, false).await,
                    _ if b.capabilities().thin => b.discard(1, 2).await,
                    _ => b.write_zeroes(1, 2, true).await,
                };
                r.expect("write");
                0u64
            }));
        }
        for t in tasks {
            successes += t.await.expect("task");
        }
        let got = b.read(0, 3).await.expect("read");
        assert_eq!(
            value_of(&got[512..1024]),
            value_of(&got[1024..]),
            "round {round}: a write landed inside a compare-and-write"
        );
        assert_eq!(
            value_of(&got[..512]),
            successes,
            "round {round}: lost update"
        );
    }
    assert_eq!(successes, ROUNDS * TASKS);
    assert_eq!(b.stats().in_flight, 0);
}

async fn or_write_ors_into_the_blocks(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    b.write(8, vec![0x0F; 1024], false).await.expect("write");
    b.or_write(8, vec![0xA0; 1024], true)
        .await
        .expect("or_write");
    assert_eq!(b.read(8, 2).await.expect("read"), vec![0xAF; 1024]);
    assert!(matches!(
        b.or_write(2047, vec![0; 1024], false).await,
        Err(BlockError::OutOfRange { .. })
    ));
}

async fn concurrent_or_writes_lose_no_bits(make: Make) {
    // Eight writers each OR their own bit into the same two blocks at once; a read-OR-write
    // that is not atomic loses some of them.
    const ROUNDS: usize = 40;
    let h = make(MIB, 512);
    let b = h.backend.clone();
    for round in 0..ROUNDS {
        b.write_zeroes(0, 2, false).await.expect("zero");
        let tasks: Vec<_> = (0..8u8)
            .map(|bit| {
                let b = b.clone();
                tokio::spawn(async move { b.or_write(0, vec![1 << bit; 1024], false).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("or_write");
        }
        assert_eq!(
            b.read(0, 2).await.expect("read"),
            vec![0xFF; 1024],
            "round {round}: an OR was lost"
        );
    }
}

// ---- accounting ------------------------------------------------------------------------------

async fn stats_count_ops_bytes_and_errors(make: Make) {
    let h = make(MIB, 512);
    let b = &h.backend;
    b.write(0, vec![1; 1024], false).await.expect("write");
    b.read(0, 2).await.expect("read");
    let _ = b.read(b.capacity(), 1).await;
    let s = b.stats();
    assert_eq!(s.ops_of(OpKind::Write), 1);
    assert_eq!(s.ops_of(OpKind::Read), 2);
    assert_eq!(s.errors_of(OpKind::Read), 1);
    assert_eq!(s.bytes_written, 1024);
    assert_eq!(s.bytes_read, 1024);
    assert_eq!(s.in_flight, 0);
}

async fn reservation_store_compare_and_swap(make: Make) {
    let h = make(MIB, 512);
    let s = h.backend.reservations();
    assert_eq!(s.load().await.expect("load"), Stored::default());
    let swap = |expected: u64, state: &[u8], durable: bool| {
        s.compare_and_swap(expected, state.to_vec(), durable)
    };
    assert_eq!(swap(0, b"{}", false).await.expect("cas"), Ok(1));
    let stale = swap(0, b"[]", true).await.expect("cas");
    assert_eq!(
        stale,
        Err(Stored {
            version: 1,
            state: b"{}".to_vec()
        })
    );
    assert_eq!(swap(1, b"[]", true).await.expect("cas"), Ok(2));
    assert_eq!(swap(2, b"{}", false).await.expect("cas"), Ok(3));
    assert_eq!(s.load().await.expect("load").version, 3);
    s.barrier(3).await.expect("barrier");
}

macro_rules! suite {
    ($driver:ident: $($test:ident),* $(,)?) => {
        mod $driver {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::$driver).await
                }
            )*
        }
    };
}

macro_rules! suites {
    ($($driver:ident),*) => {
        $(
            suite!($driver:
                read_write_round_trip,
                lent_buffers_are_written_from_and_read_into_in_place,
                unwritten_blocks_read_zero,
                fua_write_is_readable_and_flush_succeeds,
                zero_length_requests_do_nothing,
                requests_beyond_the_end_are_out_of_range,
                partial_block_buffers_are_rejected,
                reads_longer_than_the_maximum_transfer_are_rejected,
                thin_exactly_where_the_file_system_punches_holes,
                thin_devices_report_an_unmap_granularity,
                discard_reads_zero,
                write_zeroes_reads_zero_with_and_without_unmap,
                write_zeroes_of_the_whole_device_is_cheap_and_reads_zero,
                block_status_tells_holes_from_data,
                zeros_written_without_unmap_stay_mapped,
                block_status_of_the_last_block,
                write_same_repeats_the_pattern_beyond_one_chunk,
                write_same_of_zeros_reads_zero,
                caw_advertises_more_than_one_block,
                caw_writes_when_the_data_matches,
                caw_miscompare_reports_first_difference_and_writes_nothing,
                caw_of_the_maximum_length_works_and_one_more_is_rejected,
                caw_is_atomic_against_overlapping_writes_of_every_kind,
                stats_count_ops_bytes_and_errors,
                or_write_ors_into_the_blocks,
                concurrent_or_writes_lose_no_bits,
                reservation_store_compare_and_swap,
            );
        )*
    };
}

suites!(
    mem,
    file_uring,
    file_uring_thread,
    file_pool,
    file_default,
    file_direct,
    file_direct_thread,
    file_direct_pool,
    file_direct_default
);

// ---- file driver only ------------------------------------------------------------------------

mod file_only {
    use super::*;

    fn open(path: &std::path::Path, engine: EngineChoice) -> Result<FileDriver, BlockError> {
        let opts = FileOptions {
            engine,
            ..FileOptions::default()
        };
        FileDriver::open_with(path, Some(MIB), &opts)
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_image_fails_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let _first = FileDriver::open(&path, Some(MIB)).expect("first open");
        let err = match FileDriver::open(&path, None) {
            Ok(_) => panic!("second open succeeded"),
            Err(e) => e,
        };
        let BlockError::Open(io) = &err else {
            panic!("{err:?}");
        };
        let msg = io.to_string();
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[tokio::test]
    async fn the_image_can_be_reopened_after_the_driver_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        {
            let d = FileDriver::open(&path, Some(MIB)).expect("open");
            d.write(4096, vec![7; 4096], true).await.expect("write");
        }
        let d = FileDriver::open(&path, None).expect("reopen");
        assert_eq!(d.read(4096, 4096).await.expect("read"), vec![7; 4096]);
    }

    #[tokio::test]
    async fn a_missing_image_without_a_size_is_an_open_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = FileDriver::open(&dir.path().join("nope.img"), None);
        assert!(matches!(r, Err(BlockError::Open(_))));
    }

    #[tokio::test]
    async fn a_directory_is_not_an_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = FileDriver::open(dir.path(), None);
        assert!(matches!(r, Err(BlockError::Open(_))));
    }

    #[tokio::test]
    async fn a_new_image_is_sparse_and_of_the_given_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let d = FileDriver::open(&path, Some(64 * MIB)).expect("open");
        assert_eq!(d.info().size, 64 * MIB);
        let meta = std::fs::metadata(&path).expect("metadata");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.blocks(), 0);
    }

    async fn truncated_image_read_fails(engine: EngineChoice) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let d = open(&path, engine).expect("open");
        d.write(0, vec![1; 4096], false).await.expect("write");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for truncate")
            .set_len(4096)
            .expect("truncate");
        let r = d.read(8192, 4096).await;
        assert!(matches!(r, Err(BlockError::ReadFailed(_))), "{r:?}");
        // A read that straddles the new end is short, and still an error.
        let r = d.read(0, 8192).await;
        assert!(matches!(r, Err(BlockError::ReadFailed(_))), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_an_image_truncated_underneath_is_read_failed_uring() {
        truncated_image_read_fails(EngineChoice::IoUring).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_an_image_truncated_underneath_is_read_failed_pool() {
        truncated_image_read_fails(EngineChoice::ThreadPool).await;
    }

    #[tokio::test]
    async fn the_requested_engine_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(&dir.path().join("a.img"), EngineChoice::ThreadPool).expect("open");
        assert_eq!(p.engine(), Engine::ThreadPool);
        // io_uring is there on the project's machines (Linux 6.1); the pool is only the
        // fallback for kernels without it.
        let u = open(&dir.path().join("b.img"), EngineChoice::IoUring).expect("open");
        assert_eq!(u.engine(), Engine::IoUring);
    }

    // One thread: the requests below are queued for submission while the test runs (the
    // reaping task cannot run in between), so dropping the driver finds them pending.
    #[tokio::test]
    async fn abandoned_requests_and_dropping_the_driver_are_clean() {
        // (engine, direct I/O, opened on the runtime)
        let cases = [
            (EngineChoice::IoUring, false, true),
            (EngineChoice::IoUring, true, true),
            (EngineChoice::IoUring, false, false),
            (EngineChoice::IoUring, true, false),
            (EngineChoice::ThreadPool, false, true),
        ];
        for (engine, direct, on_runtime) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("disk.img");
            let opts = FileOptions {
                engine,
                direct,
                fast_paths: false,
                ..FileOptions::default()
            };
            let d = open_file(&path, MIB, opts.clone(), on_runtime);
            assert_eq!(
                d.uring_thread(),
                engine == EngineChoice::IoUring && !on_runtime
            );
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for i in 0..64u64 {
                // Polled once (so submitted, or queued for submission), then dropped, without
                // yielding to the runtime: the engine keeps the buffer until the I/O completes.
                let mut w = d.write(i * 4096, vec![1; 4096], false);
                let _ = w.as_mut().poll(&mut cx);
                let mut r = d.read(i * 4096, 4096);
                let _ = r.as_mut().poll(&mut cx);
            }
            drop(d);
            // Nothing of the dropped driver reaches another file: an image opened now likely
            // gets the descriptor number the dropped one had, and a request still waiting to be
            // submitted against that number would write into it.
            let other_path = dir.path().join("other.img");
            let other = FileDriver::open_with(&other_path, Some(MIB), &opts).expect("other");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let seen = other.read(0, 64 * 4096).await.expect("read other");
            assert!(
                seen.iter().all(|&b| b == 0),
                "a request of the dropped driver wrote into another image ({engine:?}, direct {direct})"
            );
            drop(other);
            // The lock went with the driver, at once: nothing the kernel held was left open.
            let again = FileDriver::open_with(&path, Some(MIB), &opts)
                .unwrap_or_else(|e| panic!("reopen ({engine:?}, direct {direct}): {e}"));
            again.flush().await.expect("flush");
        }
    }

    #[test]
    fn a_runtime_without_io_gets_a_ring_thread_that_works() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = FileOptions {
                engine: EngineChoice::IoUring,
                fast_paths: false,
                ..FileOptions::default()
            };
            let d = FileDriver::open_with(&dir.path().join("disk.img"), Some(MIB), &opts)
                .expect("open");
            assert_eq!(d.engine(), Engine::IoUring);
            assert!(
                d.uring_thread(),
                "no reactor to reap on: the ring has its own thread"
            );
            d.write(4096, vec![7; 4096], false).await.expect("write");
            assert_eq!(d.read(4096, 4096).await.expect("read"), vec![7; 4096]);
        });
    }

    /// A driver opened inside a runtime that goes away before the ring's task first ran (a
    /// tool that opens an image in a short `block_on`): its requests must fail at once on
    /// another runtime, not wait for a task that no longer exists.
    #[test]
    fn a_runtime_gone_before_its_ring_task_ran_fails_requests_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let opts = FileOptions {
            engine: EngineChoice::IoUring,
            fast_paths: false,
            ..FileOptions::default()
        };
        let current = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let first = current();
        // `block_on` returns without yielding: the ring's task is spawned, never polled.
        let d = first.block_on(async { FileDriver::open_with(&path, Some(MIB), &opts) });
        let d = d.expect("open");
        assert_eq!(d.engine(), Engine::IoUring);
        assert!(
            !d.uring_thread(),
            "opened on a runtime with I/O: reaped by a task"
        );
        drop(first);
        let answer = current().block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), d.read(0, 4096)).await
        });
        assert!(
            matches!(answer, Ok(Err(_))),
            "the read must fail at once, got {answer:?}"
        );
        drop(d);
        // The image is closed with its driver: it opens again.
        FileDriver::open_with(&path, None, &opts).expect("reopen");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_requests_complete_on_the_ring() {
        let h = file_uring(8 * MIB, 4096);
        let mut tasks = Vec::new();
        for i in 0..512u64 {
            let b = h.backend.clone();
            tasks.push(tokio::spawn(async move {
                b.write(i, block_of(i, 4096), false).await.expect("write");
                let got = b.read(i, 1).await.expect("read");
                assert_eq!(value_of(&got), i);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert!(h.path.is_some());
    }

    /// `len` bytes of page-aligned memory lent as a buffer, and a second handle on it.
    fn page_aligned(len: usize) -> (IoBuf, IoBuf) {
        struct Block(*mut u8, std::alloc::Layout);
        // SAFETY: plain heap memory owned by the value, used only through the buffers.
        unsafe impl Send for Block {}
        // SAFETY: as for Send; `&Block` gives no access.
        unsafe impl Sync for Block {}
        impl Drop for Block {
            fn drop(&mut self) {
                // SAFETY: allocated below with this layout, freed once.
                unsafe { std::alloc::dealloc(self.0, self.1) }
            }
        }
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Block(ptr, layout));
        // SAFETY: the block lives in `owner`, which both buffers hold.
        unsafe {
            (
                IoBuf::lent([(ptr, len)], owner.clone()),
                IoBuf::lent([(ptr, len)], owner),
            )
        }
    }

    /// How many of the file's pages in `[offset, offset + len)` the page cache holds
    /// (mincore on a shared mapping, which itself reads nothing).
    fn cached_pages(path: &std::path::Path, offset: usize, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).expect("open");
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, unmapped below;
        // mincore writes one byte per page into `vec`, which has that many.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len / 4096];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    /// Ask the kernel to drop the file's clean cached pages in `[offset, offset + len)`
    /// (POSIX_FADV_DONTNEED keeps dirty pages and pages under writeback).
    fn drop_clean_pages(path: &std::path::Path, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).expect("open");
        // SAFETY: plain system call on an open descriptor.
        let r = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
    }

    /// A FUA write puts its own range on stable storage; through io_uring (a ranged
    /// `fdatasync`) it leaves the image's other dirty pages to writeback (an `fdatasync` of
    /// the whole image would write them all first: a FUA write in a busy image could then take
    /// as long as writing back everything). The thread pool has no durable sync of a range, so
    /// there the whole image is synced. Seen through the page cache: after the FUA write, the
    /// FUA range is clean (dropped on request) and the earlier plain write still dirty (kept)
    /// or, with `ranged` false, clean too. Needs a file system with writeback (not tmpfs)
    /// under the temporary folder.
    async fn a_fua_write_syncs_its_range(engine: EngineChoice, fast_paths: bool, ranged: bool) {
        let opts = FileOptions {
            engine,
            fast_paths,
            ..FileOptions::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let d = FileDriver::open_with(&path, Some(8 * MIB), &opts).expect("open");
        if ranged {
            assert_eq!(d.engine(), Engine::IoUring, "a ranged sync needs io_uring");
        }
        d.write(0, pattern(MIB as usize, 3), false)
            .await
            .expect("plain write");
        let fua = pattern(64 * 1024, 4);
        d.write(4 * MIB, fua.clone(), true)
            .await
            .expect("fua write");
        drop_clean_pages(&path, 4 * MIB, fua.len() as u64);
        assert_eq!(
            cached_pages(&path, 4 * MIB as usize, fua.len()),
            0,
            "the FUA write's pages are on stable storage, so clean"
        );
        drop_clean_pages(&path, 0, MIB);
        assert_eq!(
            cached_pages(&path, 0, MIB as usize) > 0,
            ranged,
            "the earlier plain write is still dirty when only the FUA write's range was synced"
        );
        assert_eq!(d.read(4 * MIB, fua.len()).await.expect("read"), fua);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fua_write_syncs_only_its_own_range_uring() {
        a_fua_write_syncs_its_range(EngineChoice::IoUring, false, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fua_write_syncs_the_whole_image_on_the_pool() {
        a_fua_write_syncs_its_range(EngineChoice::ThreadPool, false, false).await;
    }

    /// A lone FUA write is written on the calling thread (`block_in_place`), its range synced
    /// through io_uring.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fua_write_syncs_only_its_own_range_calling_thread() {
        a_fua_write_syncs_its_range(EngineChoice::Auto, true, true).await;
    }

    fn open_direct(path: &std::path::Path, engine: EngineChoice) -> FileDriver {
        let opts = FileOptions {
            engine,
            direct: true,
            ..FileOptions::default()
        };
        FileDriver::open_with(path, Some(8 * MIB), &opts).expect("open with direct I/O")
    }

    async fn direct_io_goes_past_the_page_cache(engine: EngineChoice) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let d = open_direct(&path, engine);
        let align = d.io_alignment();
        assert!(
            align.is_power_of_two() && (512..=4096).contains(&align),
            "{align}"
        );
        // Page-aligned memory (handed to the kernel as it is) and a vector (bounced).
        let data = pattern(64 * 1024, 5);
        let (mut src, _) = page_aligned(data.len());
        assert_eq!(src.copy_from(0, &data), data.len());
        d.write_from(MIB, src, false)
            .await
            .expect("write from aligned memory");
        d.write(2 * MIB, data.clone(), true)
            .await
            .expect("fua write of a vector");
        let (dst, look) = page_aligned(data.len());
        d.read_into(MIB, dst)
            .await
            .expect("read into aligned memory");
        let mut got = vec![0u8; data.len()];
        look.copy_to(0, &mut got);
        assert_eq!(got, data);
        assert_eq!(d.read(2 * MIB, data.len()).await.expect("read"), data);
        // None of it went through the page cache.
        assert_eq!(cached_pages(&path, MIB as usize, data.len()), 0);
        assert_eq!(cached_pages(&path, 2 * MIB as usize, data.len()), 0);
        // What another process writes through the page cache reads back here (the kernel
        // writes dirty pages back before a direct read of them), and the reverse.
        let other = pattern(4096, 9);
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open"),
            &other,
            3 * MIB,
        )
        .expect("buffered write");
        assert_eq!(d.read(3 * MIB, 4096).await.expect("read"), other);
        let mut back = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&path).expect("open"),
            &mut back,
            MIB,
        )
        .expect("buffered read");
        assert_eq!(back, data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_io_goes_past_the_page_cache_uring() {
        direct_io_goes_past_the_page_cache(EngineChoice::IoUring).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_io_goes_past_the_page_cache_pool() {
        direct_io_goes_past_the_page_cache(EngineChoice::ThreadPool).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_io_refuses_misaligned_requests_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let d = open_direct(&path, EngineChoice::IoUring);
        let align = d.io_alignment() as usize;
        let r = d.read(100, align).await;
        assert!(
            matches!(&r, Err(BlockError::ReadFailed(e)) if e.kind() == std::io::ErrorKind::InvalidInput),
            "{r:?}"
        );
        let r = d.read(0, align + 100).await;
        assert!(matches!(r, Err(BlockError::ReadFailed(_))), "{r:?}");
        let r = d.write(align as u64 / 2, vec![1; align], false).await;
        assert!(
            matches!(&r, Err(BlockError::WriteFailed(e)) if e.kind() == std::io::ErrorKind::InvalidInput),
            "{r:?}"
        );
        assert!(d
            .read(0, 2 * align)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0));
    }

    /// A driver whose requests must be 4096-byte aligned.
    struct Needs4k(MemDriver);

    #[async_trait]
    impl Driver for Needs4k {
        fn info(&self) -> DriverInfo {
            self.0.info()
        }
        fn io_alignment(&self) -> u64 {
            4096
        }
        async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
            self.0.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            self.0.flush().await
        }
        async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.0.discard(offset, len).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
            self.0.write_zeroes(offset, len, unmap).await
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
            self.0.block_status(offset, len).await
        }
    }

    #[test]
    fn a_block_size_the_drivers_alignment_does_not_divide_is_refused() {
        let d: Arc<dyn Driver> = Arc::new(Needs4k(MemDriver::new(MIB)));
        let e = Backend::new(d.clone(), 512)
            .err()
            .expect("512-byte blocks refused");
        assert!(e.to_string().contains("Cannot open"), "{e}");
        let BlockError::Open(io) = &e else {
            panic!("{e:?}")
        };
        assert!(io.to_string().contains("4096"), "{io}");
        assert_eq!(Backend::new(d, 4096).expect("4096").block_size(), 4096);
    }
}
