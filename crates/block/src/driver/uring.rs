//! The io_uring engine of the file driver: one dedicated ring thread per open file.
//!
//! Callers (tokio tasks) append a request to a shared queue and await a oneshot channel. The
//! ring thread loops:
//! 1. take every queued request at once and turn each into a submission queue entry (SQE), up to
//!    the ring's capacity (the rest wait in a backlog);
//! 2. submit them all and wait for at least one completion with a single `io_uring_enter`;
//! 3. reap every available completion (CQE), resubmitting the rest of a short read or write and
//!    answering the finished requests.
//!
//! So submissions and completions are both batched: at queue depth 32 one system call carries
//! many requests. To sleep in step 2 and still notice new requests, the thread keeps a read of an
//! eventfd in the ring; a caller writes the eventfd only when the thread has said it is going to
//! sleep (a flag checked after the queue push, with sequentially consistent ordering on both
//! sides, so a wake-up is never lost).
//!
//! Buffer ownership: a request's [`IoBuf`] (a `Vec<u8>` of its own, or memory a frontend lent,
//! kept mapped by the owner handle inside it) moves into a slot of a fixed-size slot table owned
//! by the ring thread, together with the iovec array the SQE points at (`readv`/`writev`). The
//! slot is neither touched nor freed until the CQE carrying its index has been reaped, and the
//! slot table never grows, so buffer and iovecs stay alive and unmoved for as long as the kernel
//! may access them. A caller that stops waiting only drops its receiver; the buffer is still
//! released by the ring thread, after the completion. On shutdown the thread keeps reaping until
//! nothing is in flight. The file descriptor is kept open by an `Arc<File>` the thread holds.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};
use tokio::sync::oneshot;

use crate::IoBuf;
/// The most iovecs one `readv`/`writev` takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// `user_data` of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

enum Op {
    Read,
    Write { dsync: bool },
    Fsync,
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
}

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
        // An eventfd write of 1 cannot block or fail short of counter overflow, which would
        // itself mean a wake-up is pending; nothing to do on error.
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }
}

/// A ring thread serving one file.
pub(crate) struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// Set up a ring of `entries` SQEs over `file` and start its thread. Fails when the kernel
    /// has no io_uring (ENOSYS), forbids it (EPERM, `kernel.io_uring_disabled`) or lacks the
    /// operations the driver needs.
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
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            wake,
        });
        let cap = ring.params().sq_entries() as usize;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("block-uring".into())
            .spawn(move || {
                let mut t = RingThread::new(ring, file, s.clone(), cap);
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run()));
                if ended.is_err() {
                    // The kernel may still own buffers in `t`: leak them (and the ring) rather
                    // than free memory it could write to.
                    tracing::error!("io_uring thread panicked; the file driver fails all I/O");
                    std::mem::forget(t);
                }
                s.dead.store(true, Ordering::SeqCst);
                // Dropping the queued senders fails the waiting callers.
                drop(std::mem::take(&mut *s.queue()));
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    async fn call(&self, op: Op, offset: u64, buf: IoBuf, done: usize) -> io::Result<IoBuf> {
        let (reply, rx) = oneshot::channel();
        self.shared.queue().push(Request {
            op,
            offset,
            buf,
            done,
            reply,
        });
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
        if self.shared.dead.load(Ordering::SeqCst) {
            drop(std::mem::take(&mut *self.shared.queue()));
        }
        rx.await
            .map_err(|_| io::Error::other("io_uring thread ended"))?
    }

    /// Fill `buf` from byte `done` on with the file's bytes from `offset + done`, and give it
    /// back.
    pub(crate) async fn read(&self, offset: u64, buf: IoBuf, done: usize) -> io::Result<IoBuf> {
        self.call(Op::Read, offset, buf, done).await
    }

    pub(crate) async fn write(&self, offset: u64, data: IoBuf, dsync: bool) -> io::Result<()> {
        self.write_back(offset, data, dsync).await.map(drop)
    }

    /// A write that gives the buffer back (for a bounce buffer's owner, or a caller that
    /// reuses it).
    pub(crate) async fn write_back(
        &self,
        offset: u64,
        data: IoBuf,
        dsync: bool,
    ) -> io::Result<IoBuf> {
        self.call(Op::Write { dsync }, offset, data, 0).await
    }

    pub(crate) async fn fdatasync(&self) -> io::Result<()> {
        self.call(Op::Fsync, 0, IoBuf::default(), 0).await.map(drop)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct RingThread {
    ring: IoUring,
    file: Arc<File>,
    shared: Arc<Shared>,
    /// Fixed size: never reallocated while buffers in it are in flight.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    backlog: VecDeque<Request>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    reaped: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(ring: IoUring, file: Arc<File>, shared: Arc<Shared>, cap: usize) -> Self {
        // One SQ entry is kept for the eventfd read.
        let slots_n = cap.saturating_sub(1).max(1);
        Self {
            ring,
            file,
            shared,
            slots: (0..slots_n).map(|_| None).collect(),
            free: (0..slots_n).rev().collect(),
            in_flight: 0,
            backlog: VecDeque::new(),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            reaped: Vec::with_capacity(cap.saturating_mul(2)),
        }
    }

    fn run(&mut self) {
        loop {
            let batch = std::mem::take(&mut *self.shared.queue());
            self.backlog.extend(batch);
            if self.shared.shutdown.load(Ordering::SeqCst)
                && self.in_flight == 0
                && self.backlog.is_empty()
                && !self.wake_armed
            {
                break;
            }
            if !self.wake_armed && !self.shared.shutdown.load(Ordering::SeqCst) {
                self.arm_wake();
            }
            self.start_backlog();

            self.shared.sleeping.store(true, Ordering::SeqCst);
            // Without the eventfd read armed (only if the SQ was full) and nothing in flight, a
            // blocking wait could never end: poll instead.
            let can_sleep = self.wake_armed || self.in_flight > 0;
            let want = usize::from(can_sleep && self.shared.queue().is_empty());
            if want == 0 {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                if !can_sleep {
                    std::thread::yield_now();
                }
            }
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring submission failed");
                    self.fail_backlog(&e);
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
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

    /// Turn backlog requests into SQEs while slots and SQ entries last.
    fn start_backlog(&mut self) {
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
                });
            }
            self.in_flight += 1;
            if !self.push_slot(idx) {
                // SQ full: submit what is there and try once more.
                let _ = self.ring.submit();
                if !self.push_slot(idx) {
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

    /// Push the SQE for (the rest of) slot `idx`; `false` when the SQ is full.
    fn push_slot(&mut self, idx: usize) -> bool {
        let fd = types::Fd(self.file.as_raw_fd());
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
            Op::Write { dsync } => {
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Writev::new(fd, iov, n_iov)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(idx as u64);
        // SAFETY: the entry points at `slots[idx].iov`, whose iovecs describe the rest of the
        // buffer owned by `slots[idx].req.buf` (a vector of its own, or lent memory kept
        // mapped by the owner handle in the buffer). That slot is not touched, and the slot
        // table is never resized, until the CQE with `user_data == idx` is reaped in `reap`;
        // the file descriptor stays open because this thread holds `self.file`.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
    }

    fn reap(&mut self) {
        self.reaped.clear();
        self.reaped
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let reaped = std::mem::take(&mut self.reaped);
        for &(token, res) in &reaped {
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                continue;
            }
            self.complete(token as usize, res);
        }
        self.reaped = reaped;
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            tracing::error!(idx, "io_uring completion for an empty slot");
            return;
        };
        let outcome: Option<io::Result<()>> = if res < 0 {
            Some(Err(io::Error::from_raw_os_error(-res)))
        } else if matches!(slot.req.op, Op::Fsync) {
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
                // Short transfer: continue with the rest.
                if !self.push_slot(idx) {
                    let _ = self.ring.submit();
                    if !self.push_slot(idx) {
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
            // The caller may have stopped waiting; then the buffer is simply dropped here.
            let _ = slot.req.reply.send(r.map(|()| slot.req.buf));
        }
    }

    fn fail_backlog(&mut self, e: &io::Error) {
        for req in self.backlog.drain(..) {
            let _ = req
                .reply
                .send(Err(io::Error::new(e.kind(), format!("io_uring: {e}"))));
        }
    }
}
