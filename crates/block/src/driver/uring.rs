//! The io_uring engine of the file driver: one ring per open file.
//!
//! Callers (tokio tasks) hand a request to the ring and await a oneshot channel. The ring runs in
//! one of two ways, chosen when it is made:
//! - **On the runtime** (when the file is opened inside a tokio runtime, as the daemon does).
//!   The caller turns its request into a submission queue entry (SQE) itself and, unless a
//!   caller before it already did, signals an eventfd. A task on the same runtime, woken by
//!   that eventfd (which the ring also signals on every completion queue entry, CQE, through
//!   `IORING_REGISTER_EVENTFD`), submits every SQE queued meanwhile with one `io_uring_enter`,
//!   reaps every CQE and answers the callers, whose tasks then run on the worker that reaped
//!   them. No thread of the driver's own sits between a request and the device.
//!   Measured against the ring thread below, on the project's 2-core VM: the example
//!   `file_engines` (4 KiB random I/O through `Backend`, engines alone, one run) gives 235k
//!   against 36k buffered reads at queue depth 1 (page-cache hits complete in the submitting
//!   call), 615k against 414k at depth 32, and 20.0k against 16.4k direct reads at depth 1;
//!   direct reads at depth 32 are the same (67.9k and 67.7k); writes vary more between runs
//!   than between the two. Over iSCSI with direct I/O (`qemu-img bench`, 4 KiB, depth 32, six
//!   alternating runs each) reads averaged 68.2k against 63.0k and writes 56.6k against
//!   51.4k.
//! - **On a thread of its own** (a file opened outside a runtime). The ring thread loops:
//!   1. take every queued request at once and turn each into an SQE, up to the ring's capacity
//!      (the rest wait in a backlog);
//!   2. submit them all and wait for at least one completion with a single `io_uring_enter`;
//!   3. reap every available CQE, resubmitting the rest of a short read or write (or one the
//!      kernel ended with EAGAIN or EINTR, a bounded number of times) and answering the
//!      finished requests.
//!
//!   To sleep in step 2 and still notice new requests, the thread keeps a read of an eventfd
//!   in the ring; a caller writes the eventfd only when the thread has said it is going to
//!   sleep (a flag checked after the queue push, with sequentially consistent ordering on both
//!   sides, so a wake-up is never lost).
//!
//! Both share the bookkeeping ([`Table`]): whoever holds the table has sole use of the ring's
//! submission and completion queues (the ring thread always; on the runtime, callers and the
//! reaping task take its mutex).
//!
//! Buffer ownership: a request's [`IoBuf`] (a `Vec<u8>` of its own, or memory a frontend lent,
//! kept mapped by the owner handle inside it) moves into a slot of a fixed-size slot table,
//! together with the iovec array the SQE points at (`readv`/`writev`). The slot is neither
//! touched nor freed until the CQE carrying its index has been reaped, and the slot table never
//! grows, so buffer and iovecs stay alive and unmoved for as long as the kernel may access them.
//! A caller that stops waiting only drops its receiver; the buffer is still released by the
//! table, after the completion. When the driver is dropped, the ring is reaped until nothing
//! is in flight before the drop returns (by the ring thread, or on the runtime by the dropping
//! thread itself), so the image's descriptor and lock go with the driver and no queued SQE can
//! name a descriptor number that was closed and reused. A table dropped with requests still in
//! flight (only if the ring itself failed) leaks their buffers rather than free memory the
//! kernel may still write. The file descriptor is kept open by an `Arc<File>` the table holds.
//!
//! Failure: an `io_uring_enter` error that retrying cannot mend (not EINTR, EAGAIN or EBUSY),
//! or a panic of the ring thread, poisons the ring ([`Table::poison`]): every caller is
//! answered with an error at once, and the ring is never entered again, so SQEs the kernel had
//! not taken never go out after their callers were told they failed. Buffers the kernel may
//! hold and the image's descriptor are leaked, not freed or closed (a request must never reach
//! another file that reuses the number); the LU needs a restart of the process. A ring that
//! fails while it is being closed still closes the descriptor: none of its SQEs is submitted
//! after that, and requests the kernel took hold the open file, and with it the image's
//! lock, themselves. Since what the kernel held may still land, [`Ring::failed`] tells the
//! file driver to serve nothing more on any path. A submission the kernel takes only in part
//! leaves the rest in the SQ for the next round.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::IoBuf;
/// The most iovecs one `readv`/`writev` takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// `user_data` of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

enum Op {
    Read,
    Write,
    /// `fdatasync` of the request's offset and `len` bytes on; of the whole file when `len`
    /// is 0.
    Fsync {
        len: u32,
    },
}

struct Request {
    op: Op,
    offset: u64,
    buf: IoBuf,
    /// Bytes of `buf` already transferred (by the caller) before the request was queued.
    done: usize,
    reply: oneshot::Sender<io::Result<IoBuf>>,
}

struct Slot {
    req: Request,
    /// Bytes already transferred.
    done: usize,
    /// The iovecs of the part still to transfer, which the SQE in flight points at.
    iov: Vec<libc::iovec>,
    /// Completions that said "try again" (EAGAIN, EINTR) so far.
    retries: u32,
}

/// Completions saying "try again" (EAGAIN, EINTR: nothing was transferred) a request is
/// resubmitted for before its error is passed on. The kernel retries buffered I/O itself; a
/// device under pressure (a full request queue for direct I/O) or a signal can still end one
/// so, and neither is an I/O error of the medium to report to an initiator.
const MAX_RETRIES: u32 = 16;

type Reply = oneshot::Sender<io::Result<IoBuf>>;

/// A ring serving one file.
pub(crate) struct Ring {
    mode: Mode,
    /// Set when the ring is poisoned ([`Table::poison`]).
    failed: Arc<AtomicBool>,
}

enum Mode {
    Task(Arc<TaskRing>),
    Thread {
        shared: Arc<Shared>,
        thread: Option<JoinHandle<()>>,
    },
}

impl Ring {
    /// Set up a ring of `entries` SQEs over `file`: reaped by a task when called inside a tokio
    /// runtime, by a thread of its own otherwise. Fails when the kernel has no io_uring
    /// (ENOSYS), forbids it (EPERM, `kernel.io_uring_disabled`) or lacks the operations the
    /// driver needs.
    pub(crate) fn new(file: Arc<File>, entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks opcode {code}"),
                ));
            }
        }
        let cap = ring.params().sq_entries() as usize;
        let failed = Arc::new(AtomicBool::new(false));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            match TaskRing::events(&rt, &ring) {
                Ok(events) => {
                    let table = Table::new(file, cap, cap, failed.clone());
                    return Ok(Self {
                        mode: Mode::Task(TaskRing::start(&rt, ring, events, table)),
                        failed,
                    });
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "io_uring cannot be reaped on this runtime; using a ring thread"
                ),
            }
        }
        let table = Table::new(file, cap.saturating_sub(1), cap, failed.clone());
        let (shared, thread) = RingThread::start(ring, table)?;
        Ok(Self {
            mode: Mode::Thread {
                shared,
                thread: Some(thread),
            },
            failed,
        })
    }

    /// Poison a ring reaped by a task as a failed `io_uring_enter` does (a ring thread owns
    /// its table, out of a test's reach).
    #[cfg(test)]
    pub(crate) fn poison(&self) {
        let Mode::Task(t) = &self.mode else {
            panic!("only a ring reaped by a task can be poisoned from outside");
        };
        let replies = {
            let mut table = t.table();
            table.poison(&io::Error::other("poisoned by a test"));
            table.take_replies()
        };
        answer(replies);
    }

    /// Whether the ring failed ([`Table::poison`]): requests it held may still reach the file,
    /// after their callers were told they failed, so nothing else may write the file either.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Whether the ring is reaped by a thread of its own (it was made outside a tokio runtime,
    /// or on one without I/O) rather than by a task on the runtime.
    pub(crate) fn on_thread(&self) -> bool {
        matches!(self.mode, Mode::Thread { .. })
    }

    async fn call(&self, op: Op, offset: u64, buf: IoBuf, done: usize) -> io::Result<IoBuf> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            op,
            offset,
            buf,
            done,
            reply,
        };
        match &self.mode {
            Mode::Task(t) => t.submit(req),
            Mode::Thread { shared, .. } => shared.submit(req),
        }
        rx.await
            .map_err(|_| io::Error::other("io_uring ring ended"))?
    }

    /// Fill `buf` from byte `done` on with the file's bytes from `offset + done`, and give it
    /// back.
    pub(crate) async fn read(&self, offset: u64, buf: IoBuf, done: usize) -> io::Result<IoBuf> {
        self.call(Op::Read, offset, buf, done).await
    }

    /// Write all of `data` at `offset` and give it back.
    pub(crate) async fn write_back(&self, offset: u64, data: IoBuf) -> io::Result<IoBuf> {
        self.call(Op::Write, offset, data, 0).await
    }

    /// `fdatasync` of the whole file.
    pub(crate) async fn fdatasync(&self) -> io::Result<()> {
        self.call(Op::Fsync { len: 0 }, 0, IoBuf::default(), 0)
            .await
            .map(drop)
    }

    /// `fdatasync` of `len` bytes at `offset` (IORING_OP_FSYNC with a range, what a write with
    /// `RWF_DSYNC` does after writing): that range's dirty pages are written and waited for,
    /// then what an `fdatasync` does after writeback (the metadata to find the data, the
    /// device's cache), and the file's writeback errors since the last check are reported.
    /// The whole file when `len` does not fit the request's 32 bits.
    pub(crate) async fn fdatasync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        // The kernel syncs from `offset` to `offset + len` inclusive (`vfs_fsync_range`):
        // one byte less is exactly the range, except for a 1-byte range, which 0 would turn
        // into the whole file.
        let (offset, len) = match u32::try_from(len) {
            Ok(1) => (offset, 1),
            Ok(l) if l > 1 => (offset, l - 1),
            _ => (0, 0),
        };
        self.call(Op::Fsync { len }, offset, IoBuf::default(), 0)
            .await
            .map(drop)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        match &mut self.mode {
            Mode::Task(t) => {
                t.close();
                t.shutdown.store(true, Ordering::SeqCst);
                t.wake();
            }
            Mode::Thread { shared, thread } => {
                shared.shutdown.store(true, Ordering::SeqCst);
                shared.wake();
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Write 1 to an eventfd. An eventfd write of 1 cannot block or fail short of counter
/// overflow, which would itself mean a wake-up is pending; nothing to do on error.
fn signal(fd: &impl AsRawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: a write of 8 bytes from a live local buffer to a descriptor the caller keeps open.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn eventfd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether an `io_uring_enter` error only means "try again later".
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// The requests of one ring, in flight or waiting for room, and the moves between them. Whoever
/// holds a `Table` has sole use of its ring's submission and completion queues: the methods
/// taking a ring rely on it.
struct Table {
    /// `None` once the ring is closed (`Ring::drop` on the runtime): nothing more is submitted,
    /// so the image is closed, and its lock released, when its driver goes. Requests already in
    /// the kernel hold a file reference of their own.
    file: Option<Arc<File>>,
    /// Fixed size: never reallocated while buffers in it are in flight.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    backlog: VecDeque<Request>,
    reaped: Vec<(u64, i32)>,
    /// Answers to send once the table is let go of.
    replies: Vec<(Reply, io::Result<IoBuf>)>,
    /// Whether SQEs were pushed since the last submission, or are left in the SQ.
    pushed: bool,
    /// Set by [`Table::poison`]: the ring is entered no more ([`Table::poisoned`]). Shared with
    /// the ring's owner as [`Ring::failed`].
    failed: Arc<AtomicBool>,
}

impl Table {
    fn new(file: Arc<File>, slots_n: usize, cap: usize, failed: Arc<AtomicBool>) -> Self {
        let slots_n = slots_n.max(1);
        Self {
            file: Some(file),
            slots: (0..slots_n).map(|_| None).collect(),
            free: (0..slots_n).rev().collect(),
            in_flight: 0,
            backlog: VecDeque::new(),
            reaped: Vec::with_capacity(cap.saturating_mul(2)),
            replies: Vec::new(),
            pushed: false,
            failed,
        }
    }

    fn poisoned(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn idle(&self) -> bool {
        self.in_flight == 0 && self.backlog.is_empty()
    }

    /// Turn backlog requests into SQEs while slots and SQ entries last.
    fn start_backlog(&mut self, ring: &IoUring) {
        if self.poisoned() {
            self.fail_backlog(&io::Error::other("the io_uring ring failed"));
            return;
        }
        while let Some(idx) = self.free.pop() {
            let Some(req) = self.backlog.pop_front() else {
                self.free.push(idx);
                break;
            };
            if let Some(slot) = self.slots.get_mut(idx) {
                let done = req.done.min(req.buf.len());
                *slot = Some(Slot {
                    req,
                    done,
                    iov: Vec::new(),
                    retries: 0,
                });
            }
            self.in_flight += 1;
            if !self.push_slot(ring, idx) {
                // SQ full: submit what is there and try once more.
                let _ = ring.submit();
                if !self.push_slot(ring, idx) {
                    // Give the request back; it goes out on the next round.
                    if let Some(Some(slot)) = self.slots.get_mut(idx).map(Option::take) {
                        self.backlog.push_front(slot.req);
                    }
                    self.in_flight -= 1;
                    self.free.push(idx);
                    break;
                }
            }
        }
    }

    /// Push the SQE for (the rest of) slot `idx`; `false` when the SQ is full. On a closed
    /// ring the slot's request fails instead.
    fn push_slot(&mut self, ring: &IoUring, idx: usize) -> bool {
        let file = match &self.file {
            Some(file) if !self.poisoned() => file,
            _ => {
                self.finish(idx, Err(io::Error::other("the io_uring ring is closed")));
                return true;
            }
        };
        let fd = types::Fd(file.as_raw_fd());
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            return true;
        };
        let offset = slot.req.offset.saturating_add(slot.done as u64);
        slot.iov = slot.req.buf.iovecs(slot.done);
        // At most IOV_MAX iovecs per call; a longer list continues as a short transfer does.
        let n_iov = slot.iov.len().min(IOV_MAX) as u32;
        let iov = slot.iov.as_ptr();
        let entry = match slot.req.op {
            Op::Read => opcode::Readv::new(fd, iov, n_iov).offset(offset).build(),
            Op::Write => opcode::Writev::new(fd, iov, n_iov).offset(offset).build(),
            Op::Fsync { len } => opcode::Fsync::new(fd)
                .offset(offset)
                .len(len)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(idx as u64);
        // SAFETY: the holder of the table has sole use of the submission queue (see `Table`).
        // The entry points at `slots[idx].iov`, whose iovecs describe the rest of the buffer
        // owned by `slots[idx].req.buf` (a vector of its own, or lent memory kept mapped by the
        // owner handle in the buffer). That slot is not touched, and the slot table is never
        // resized, until the CQE with `user_data == idx` is reaped in `reap` (a table dropped
        // before that leaks the slots); the file descriptor is open because the table holds
        // `self.file`, and a submitted request holds the file itself.
        let ok = unsafe { ring.submission_shared().push(&entry) }.is_ok();
        self.pushed |= ok;
        ok
    }

    /// Reap every available CQE; `on_other` gets the tokens that are not slots.
    fn reap(&mut self, ring: &IoUring, mut on_other: impl FnMut(u64)) {
        self.reaped.clear();
        // SAFETY: the holder of the table has sole use of the completion queue (see `Table`).
        let cq = unsafe { ring.completion_shared() };
        self.reaped.extend(cq.map(|c| (c.user_data(), c.result())));
        let reaped = std::mem::take(&mut self.reaped);
        for &(token, res) in &reaped {
            match usize::try_from(token) {
                Ok(idx) if idx < self.slots.len() => self.complete(ring, idx, res),
                _ => on_other(token),
            }
        }
        self.reaped = reaped;
    }

    fn complete(&mut self, ring: &IoUring, idx: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            tracing::error!(idx, "io_uring completion for an empty slot");
            return;
        };
        let outcome: Option<io::Result<()>> =
            if (res == -libc::EAGAIN || res == -libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                None
            } else if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if matches!(slot.req.op, Op::Fsync { .. }) {
                Some(Ok(()))
            } else if res == 0 && slot.done < slot.req.buf.len() {
                Some(Err(match slot.req.op {
                    Op::Read => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "Read past the end of the file",
                    ),
                    _ => io::Error::new(io::ErrorKind::WriteZero, "Write transferred nothing"),
                }))
            } else {
                slot.done = slot.done.saturating_add(res as usize);
                (slot.done >= slot.req.buf.len()).then_some(Ok(()))
            };
        match outcome {
            None => {
                // Short transfer, or try again: continue with the rest.
                if !self.push_slot(ring, idx) {
                    let _ = ring.submit();
                    if !self.push_slot(ring, idx) {
                        self.finish(
                            idx,
                            Err(io::Error::other("io_uring queue full on resubmission")),
                        );
                    }
                }
            }
            Some(r) => self.finish(idx, r),
        }
    }

    fn finish(&mut self, idx: usize, r: io::Result<()>) {
        if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
            self.in_flight -= 1;
            self.free.push(idx);
            self.replies
                .push((slot.req.reply, r.map(|()| slot.req.buf)));
        }
    }

    fn fail_backlog(&mut self, e: &io::Error) {
        for req in self.backlog.drain(..) {
            let err = io::Error::new(e.kind(), format!("io_uring: {e}"));
            self.replies.push((req.reply, Err(err)));
        }
    }

    /// Submit what was pushed. `Err` only for an error that is not transient. When the kernel
    /// takes only part of the SQ (it stops at the first entry it cannot allocate a request for,
    /// and says EAGAIN only if that was the first), `pushed` stays set for the rest.
    fn submit(&mut self, ring: &IoUring) -> io::Result<()> {
        if self.poisoned() || !std::mem::take(&mut self.pushed) {
            return Ok(());
        }
        match ring.submit() {
            Ok(_) => {
                // SAFETY: the holder of the table has sole use of the submission queue.
                self.pushed = !unsafe { ring.submission_shared() }.is_empty();
                Ok(())
            }
            Err(e) if transient(&e) => {
                // The entries stay in the SQ; the next submission or reap takes them.
                self.pushed = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The ring failed in a way that retrying cannot mend (a non-transient `io_uring_enter`
    /// error, or a panic of the ring thread). Every caller gets an error now, and the ring is
    /// never entered again: SQEs still in the SQ must not go out later, when their callers have
    /// been told their I/O failed. What the kernel may still hold is kept: the slots stay
    /// occupied (and are leaked with the table), and the image's descriptor is leaked open, so
    /// that no request can ever reach another file that reuses its number. The image's lock
    /// is leaked with it: the LU needs a restart of the process.
    fn poison(&mut self, e: &io::Error) {
        if self.failed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(
            error = %e,
            in_flight = self.in_flight,
            "io_uring ring failed: its requests fail, and the image stays open until the process ends"
        );
        self.fail_backlog(e);
        for slot in self.slots.iter_mut().flatten() {
            let (orphan, _) = oneshot::channel();
            let reply = std::mem::replace(&mut slot.req.reply, orphan);
            let err = io::Error::new(e.kind(), format!("io_uring: {e}"));
            self.replies.push((reply, Err(err)));
        }
        if let Some(file) = &self.file {
            std::mem::forget(Arc::clone(file));
        }
    }

    /// The answers gathered so far, to send once the table is let go of.
    fn take_replies(&mut self) -> Vec<(Reply, io::Result<IoBuf>)> {
        std::mem::take(&mut self.replies)
    }
}

/// Send answers; a caller that stopped waiting simply drops its buffer here.
fn answer(replies: Vec<(Reply, io::Result<IoBuf>)>) {
    for (reply, r) in replies {
        let _ = reply.send(r);
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // The kernel may still read or write these buffers: never free them.
            tracing::error!(
                in_flight = self.in_flight,
                "io_uring ring dropped with requests in flight; their buffers are leaked"
            );
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// A ring reaped by a task on the runtime.
struct TaskRing {
    table: Mutex<Table>,
    /// Closed (in `TaskRing::drop`) only when nothing is in flight; otherwise leaked with the
    /// table's slots.
    ring: ManuallyDrop<IoUring>,
    /// Signalled by the kernel on every CQE (`IORING_REGISTER_EVENTFD`), by callers whose
    /// SQEs wait to be submitted, and by `Ring::drop`.
    events: AsyncFd<OwnedFd>,
    shutdown: AtomicBool,
    /// Set by the caller that signalled `events` for SQEs to submit, cleared by the reaping
    /// task before it submits: callers in between need not signal again.
    kicked: AtomicBool,
    /// Set when the reaping task has ended; later requests fail at once.
    dead: AtomicBool,
}

impl TaskRing {
    /// Start reaping `ring` on `rt`, woken by `events` (from [`TaskRing::events`]).
    fn start(
        rt: &tokio::runtime::Handle,
        ring: IoUring,
        events: AsyncFd<OwnedFd>,
        table: Table,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            table: Mutex::new(table),
            ring: ManuallyDrop::new(ring),
            events,
            shutdown: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        });
        // The guard is moved into the task before it is spawned, so it runs however the task
        // ends: also when the runtime drops it before its first poll.
        let stopped = Stopped(this.clone());
        rt.spawn(async move {
            let stopped = stopped;
            stopped.0.reap_loop().await;
        });
        this
    }

    /// An eventfd the ring signals on every CQE, registered with `rt`'s reactor.
    fn events(rt: &tokio::runtime::Handle, ring: &IoUring) -> io::Result<AsyncFd<OwnedFd>> {
        let efd = eventfd(libc::EFD_NONBLOCK)?;
        let _in_rt = rt.enter();
        // A runtime built without I/O has no reactor, and tokio panics instead of answering an
        // error: ask it to no harm.
        let registered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: `efd` is an open eventfd that the `AsyncFd` owns from here on, so it stays
            // open, and is the same descriptor, for the `AsyncFd`'s whole life.
            unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
        }))
        .map_err(|_| io::Error::other("the runtime has no I/O reactor"))?
        .map_err(|e| e.into_parts().1)?;
        ring.submitter()
            .register_eventfd(registered.get_ref().as_raw_fd())?;
        Ok(registered)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        signal(self.events.get_ref());
    }

    fn submit(&self, req: Request) {
        let replies = {
            let mut t = self.table();
            if self.dead.load(Ordering::SeqCst) {
                t.backlog.push_back(req);
                t.fail_backlog(&io::Error::other("the io_uring reaping task has ended"));
            } else {
                t.backlog.push_back(req);
                t.start_backlog(&self.ring);
            }
            t.take_replies()
        };
        answer(replies);
        if !self.kicked.swap(true, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Close the ring, as its driver goes or its reaping task ends: start nothing more (waiting
    /// requests fail), and wait here for what the kernel holds, so that the image's descriptor,
    /// and its lock, are gone when the driver is (a request in flight holds a reference to the
    /// file). The wait needs no task of the runtime: the kernel completes the requests, and this
    /// thread reaps them (as does the reaping task meanwhile, if it runs). The table is not held
    /// while waiting.
    fn close(&self) {
        let file = {
            let mut t = self.table();
            t.fail_backlog(&io::Error::other("the io_uring ring is closed"));
            // Kept open until the drain below: SQEs already pushed name its descriptor, which
            // must not be closed (and its number reused) before they are submitted.
            t.file.take()
        };
        loop {
            let (replies, drained) = {
                let mut t = self.table();
                if let Err(e) = t.submit(&self.ring) {
                    t.poison(&e);
                }
                t.reap(&self.ring, |_| {});
                (t.take_replies(), t.in_flight == 0 || t.poisoned())
            };
            answer(replies);
            if drained {
                break;
            }
            // Wait for a completion without holding the table, so that the reaping task (if
            // it still runs) is not held up, nor the worker it runs on: either of us may reap a
            // given CQE, and the table's count says when all are in. The task may also take
            // the eventfd's count first, so the wait is bounded; draining it before the next
            // reap means a CQE posted after that reap signals it again.
            let mut pfd = libc::pollfd {
                fd: self.events.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, a live local, for a descriptor `self.events` keeps open.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            let mut buf = [0u8; 8];
            // SAFETY: a read of 8 bytes into a live local buffer from an open, non-blocking
            // eventfd (EAGAIN when nothing is pending).
            let _ = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
        }
        drop(file);
    }

    async fn reap_loop(&self) {
        loop {
            let mut ready = match self.events.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring eventfd failed; the ring is stopped");
                    break;
                }
            };
            // Drain the eventfd before reaping, so a CQE posted after the reap signals it
            // again; `try_io` clears the readiness only on EAGAIN.
            let drained = ready.try_io(|fd| {
                let mut buf = [0u8; 8];
                // SAFETY: a read of 8 bytes into a live local buffer from an open eventfd.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if drained.is_err() {
                continue;
            }
            self.kicked.store(false, Ordering::SeqCst);
            let (replies, idle, retry, poisoned) = {
                let mut t = self.table();
                t.reap(&self.ring, |token| {
                    tracing::error!(token, "io_uring completion for an unknown request")
                });
                t.start_backlog(&self.ring);
                if let Err(e) = t.submit(&self.ring) {
                    t.poison(&e);
                }
                (t.take_replies(), t.idle(), t.pushed, t.poisoned())
            };
            answer(replies);
            if poisoned {
                break;
            }
            if retry {
                // The kernel refused the batch for now (EAGAIN, EBUSY): come back for it, since
                // with nothing in flight no completion would.
                self.wake();
            }
            if idle && self.shutdown.load(Ordering::SeqCst) {
                break;
            }
        }
    }
}

/// Ends a ring's reaping task however the task ends, also when the runtime drops it unfinished
/// or unstarted: from then on `submit` fails requests at once, and what callers pushed before is
/// submitted and waited for by `close`.
struct Stopped(Arc<TaskRing>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.dead.store(true, Ordering::SeqCst);
        self.0.close();
    }
}

impl Drop for TaskRing {
    fn drop(&mut self) {
        let in_flight = self.table().in_flight;
        if in_flight == 0 {
            // SAFETY: dropped once, here; nothing is in flight, so the kernel holds no pointer
            // into the table's buffers.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
        }
        // Otherwise the ring is leaked with the table's slots (see `Table`'s drop), so that
        // requests the kernel still holds complete into memory that stays allocated.
    }
}

// SAFETY: a slot's iovecs point into its own request's buffer, which is `Send`; they are read
// only by whoever holds the slot's table (see `Table`), never through a copy on another thread.
unsafe impl Send for Slot {}

struct Shared {
    queue: Mutex<Vec<Request>>,
    sleeping: AtomicBool,
    shutdown: AtomicBool,
    /// Set when the ring thread has ended; requests queued after that are failed by the caller.
    dead: AtomicBool,
    wake: File,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Vec<Request>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        // See `signal`.
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }

    fn submit(&self, req: Request) {
        self.queue().push(req);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
        if self.dead.load(Ordering::SeqCst) {
            drop(std::mem::take(&mut *self.queue()));
        }
    }
}

/// A ring reaped by a thread of its own.
struct RingThread {
    /// Declared before `ring`, so the slots go (or are leaked) while the ring is still open.
    table: Table,
    ring: IoUring,
    shared: Arc<Shared>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
}

impl RingThread {
    /// `table` has one slot fewer than the ring has SQ entries: one is kept for the eventfd
    /// read.
    fn start(ring: IoUring, table: Table) -> io::Result<(Arc<Shared>, JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            wake: File::from(eventfd(0)?),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("block-uring".into())
            .spawn(move || {
                let mut t = RingThread {
                    table,
                    ring,
                    shared: s.clone(),
                    wake_buf: Box::new([0; 8]),
                    wake_armed: false,
                };
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run()));
                if ended.is_err() {
                    // The kernel may still own buffers in `t`: leak them (and the ring) rather
                    // than free memory it could write to, but answer every caller.
                    tracing::error!("io_uring thread panicked; the file driver fails all I/O");
                    t.table
                        .poison(&io::Error::other("the io_uring thread panicked"));
                    answer(t.table.take_replies());
                    std::mem::forget(t);
                }
                s.dead.store(true, Ordering::SeqCst);
                // Dropping the queued senders fails the waiting callers.
                drop(std::mem::take(&mut *s.queue()));
            })?;
        Ok((shared, thread))
    }

    fn run(&mut self) {
        loop {
            let batch = std::mem::take(&mut *self.shared.queue());
            self.table.backlog.extend(batch);
            if self.shared.shutdown.load(Ordering::SeqCst) && self.table.idle() && !self.wake_armed
            {
                break;
            }
            if !self.wake_armed && !self.shared.shutdown.load(Ordering::SeqCst) {
                self.arm_wake();
            }
            self.table.start_backlog(&self.ring);

            self.shared.sleeping.store(true, Ordering::SeqCst);
            // Without the eventfd read armed (only if the SQ was full) and nothing in flight, a
            // blocking wait could never end: poll instead.
            let can_sleep = self.wake_armed || self.table.in_flight > 0;
            let want = usize::from(can_sleep && self.shared.queue().is_empty());
            if want == 0 {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                if !can_sleep {
                    std::thread::yield_now();
                }
            }
            self.table.pushed = false;
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => {
                    // Ends the thread: its callers fail, later ones at once (`dead`).
                    self.table.poison(&e);
                    answer(self.table.take_replies());
                    break;
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            let mut woken = false;
            self.table
                .reap(&self.ring, |token| woken |= token == WAKE_TOKEN);
            if woken {
                self.wake_armed = false;
            }
            answer(self.table.take_replies());
        }
        if self.wake_armed {
            // Unreachable by the loop's exit condition; if it ever happened the kernel could
            // still write to the buffer, so it must outlive the ring.
            Box::leak(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.shared.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is a heap allocation owned by this thread that is neither moved nor
        // freed while `wake_armed` is true (see the end of `run`), and the eventfd is kept open
        // by `shared`, which this thread holds.
        if unsafe { self.ring.submission().push(&e) }.is_ok() {
            self.wake_armed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn write_request(offset: u64, byte: u8) -> (Request, oneshot::Receiver<io::Result<IoBuf>>) {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            op: Op::Write,
            offset,
            buf: IoBuf::from(vec![byte; 4096]),
            done: 0,
            reply,
        };
        (req, rx)
    }

    /// A 1 MiB image of zeros in a folder of its own (kept while the folder handle lives).
    fn image() -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk.img"))
            .expect("open");
        file.set_len(1 << 20).expect("size");
        (dir, Arc::new(file))
    }

    /// What a failed `io_uring_enter` leaves (an SQE pushed and not taken by the kernel, a
    /// request waiting for room) and what poisoning the table does with it.
    #[test]
    fn a_poisoned_ring_fails_every_caller_and_never_sends_what_it_held() {
        let (_dir, file) = image();
        let fd = file.as_raw_fd();
        let ring = IoUring::new(4).expect("ring");
        // One slot: the first request gets its SQE, the second waits in the backlog.
        let mut t = Table::new(file.clone(), 1, 4, Arc::default());
        let (first, mut first_rx) = write_request(0, 0xA5);
        let (second, mut second_rx) = write_request(4096, 0x5A);
        t.backlog.push_back(first);
        t.backlog.push_back(second);
        t.start_backlog(&ring);
        assert_eq!((t.in_flight, t.backlog.len(), t.pushed), (1, 1, true));

        // EBADR: the kernel dropped completions (one of the errors no retry mends).
        t.poison(&io::Error::from_raw_os_error(libc::EBADR));
        answer(t.take_replies());
        assert!(
            matches!(first_rx.try_recv(), Ok(Err(_))),
            "the pushed request fails"
        );
        assert!(
            matches!(second_rx.try_recv(), Ok(Err(_))),
            "the waiting one too"
        );

        // Nothing more is entered or pushed: a later request fails at once.
        t.submit(&ring).expect("submit is a no-op");
        // SAFETY: this test holds the table, so it has sole use of the SQ.
        let unsent = || unsafe { ring.submission_shared() }.len();
        assert_eq!(unsent(), 1, "the SQE stays unsent");
        let (third, mut third_rx) = write_request(8192, 0x33);
        t.backlog.push_back(third);
        t.start_backlog(&ring);
        answer(t.take_replies());
        assert!(matches!(third_rx.try_recv(), Ok(Err(_))));
        assert_eq!(unsent(), 1);
        assert_eq!(
            t.in_flight, 1,
            "the slot the kernel may hold stays occupied"
        );

        // The image's descriptor outlives every handle on it, so its number is never reused.
        let check = file.try_clone().expect("clone");
        drop(t.file.take());
        drop(file);
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags, -1, "fd {fd} is still open");
        // The table goes with its slot leaked, the ring with its SQE unsent: nothing was written.
        drop(t);
        drop(ring);
        let mut got = vec![0xFFu8; 3 * 4096];
        check.read_exact_at(&mut got, 0).expect("read back");
        assert!(got.iter().all(|&b| b == 0), "a poisoned ring wrote nothing");
    }

    /// A completion saying "try again" (EAGAIN, EINTR) resubmits the rest of the request (from
    /// what a short transfer already moved) rather than fail it, up to [`MAX_RETRIES`] times;
    /// after that the error is passed on.
    #[test]
    fn a_try_again_completion_resubmits_a_bounded_number_of_times() {
        let (_dir, file) = image();
        let ring = IoUring::new(4).expect("ring");
        let mut t = Table::new(file.clone(), 1, 4, Arc::default());
        // The kernel takes the SQE and completes it; its real CQE is discarded, what it wrote
        // is wiped, and this test answers for the kernel instead.
        let go = |t: &mut Table| {
            t.submit(&ring).expect("submit");
            ring.submit_and_wait(1).expect("wait");
            // SAFETY: this test holds the table, so it has sole use of the CQ.
            unsafe { ring.completion_shared() }.for_each(drop);
            file.write_all_at(&[0u8; 8192], 0).expect("wipe");
        };
        let (req, mut rx) = write_request(0, 0xA5);
        t.backlog.push_back(req);
        t.start_backlog(&ring);
        // A short transfer of the first half: the rest goes out from byte 2048.
        go(&mut t);
        t.complete(&ring, 0, 2048);
        for errno in [libc::EAGAIN, libc::EINTR] {
            go(&mut t);
            t.complete(&ring, 0, -errno);
            answer(t.take_replies());
            assert!(
                rx.try_recv().is_err(),
                "errno {errno}: answered, not retried"
            );
            assert_eq!(t.in_flight, 1, "errno {errno}: the request left its slot");
        }
        // The resubmission goes out and completes for real.
        t.submit(&ring).expect("submit");
        ring.submit_and_wait(1).expect("wait");
        t.reap(&ring, |_| {});
        answer(t.take_replies());
        assert!(
            matches!(rx.try_recv(), Ok(Ok(_))),
            "the retried write succeeds"
        );
        let mut got = vec![0u8; 4096];
        file.read_exact_at(&mut got, 0).expect("read back");
        assert!(
            got[..2048].iter().all(|&b| b == 0) && got[2048..].iter().all(|&b| b == 0xA5),
            "the retry wrote exactly the half the short transfer had not"
        );

        // A request the kernel keeps refusing gets its error in the end.
        let (req, mut rx) = write_request(4096, 0x5A);
        t.backlog.push_back(req);
        t.start_backlog(&ring);
        for _ in 0..MAX_RETRIES {
            go(&mut t);
            t.complete(&ring, 0, -libc::EAGAIN);
        }
        go(&mut t);
        t.complete(&ring, 0, -libc::EAGAIN);
        answer(t.take_replies());
        match rx.try_recv() {
            Ok(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EAGAIN)),
            other => panic!("still retried after {MAX_RETRIES}: {other:?}"),
        }
        assert_eq!(t.in_flight, 0);
    }
}
