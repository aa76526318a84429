//! The virtio-scsi device of one vhost-user connection: a [`VhostUserBackend`] with the control
//! queue (0), the event queue (1) and the request queues (2..).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
#[cfg(test)]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sg::{self, Sg};

/// The queue this thread is draining (the device's address and the queue index), whose used
/// entries wait for one interrupt at the end of the drain, and whether one is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Draining {
    device: usize,
    queue: usize,
    owed: bool,
}

/// How a watch of the avail rings ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// A chain is available; the rings were last seen empty this long after the watch began.
    Caught(Duration),
    /// The window (which began then) passed with none.
    Missed(std::time::Instant),
    /// No request queue was there to watch, or none could be read.
    Unwatched,
}

/// How a queue's drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// No chain is available: the thread may watch the ring, then ask for a kick.
    Empty,
    /// Chains are left that cannot be popped now: no room (the completion that makes room
    /// wakes the thread) or an avail index out of range (until the driver resets the
    /// device). The queue's notifications stay off.
    Held,
}

/// The window a watch that missed grows to from below it (see [`Watch`]).
const WATCH_GROW_FROM: Duration = Duration::from_micros(50);

/// How many late kicks in a row (see [`Watch`]) halve the window.
const WATCH_LATE_RUN: u8 = 3;

/// The avail-ring watch of one worker thread, sized much as KVM sizes its halt polling. A watch
/// that catches a chain leaves the window as it is; one that ends with none (the thread then
/// waits in epoll for a kick) is judged when a kick comes with a chain waiting on one of the
/// thread's request queues (a kick for a chain served meanwhile says nothing of the guest's
/// pace). A kick within the maximum ([`crate::SocketConfig::watch_max`]) of the watch's start
/// would have been caught by a longer watch: the window doubles (to at least
/// [`WATCH_GROW_FROM`], or the maximum when that is below it), up to the maximum. A later kick
/// says the guest may not be that busy, and [`WATCH_LATE_RUN`] of them in a row say it is not:
/// the window halves, to none below [`WATCH_GROW_FROM`]. An early kick breaks the run, and so
/// does a catch in the second half of the window (a watch half as long would have missed it);
/// an earlier catch does not, so a guest that offers requests in bursts far apart is watched
/// about as long as a burst takes. So a guest that offers requests close together is watched
/// for as long as it needs, and one that offers them further apart than the maximum costs the
/// thread no watching after [`WATCH_LATE_RUN`] late kicks per halving from the maximum down
/// below [`WATCH_GROW_FROM`]: a dozen requests at the default 600 µs, 27 at the 10 ms limit
/// (at a fixed window a thread spent up to that window after every request, most of its time
/// at a gap just beyond it). A kick is early when it comes within the maximum, so a larger
/// maximum keeps watching a guest whose requests come further apart; one below what a kick
/// takes to wake the thread in effect turns the watch off. A single late kick
/// does not halve: under TCG on a busy host a guest at QD1 offers most requests well within the
/// maximum but many late (the kick's own path and the thread's wake-up are in the measured gap:
/// in bench/vhost.sh's QD1 rows half the kicks that judged a missed watch came later than
/// 600 µs), and halving at each made the next watches miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watch {
    window: Duration,
    /// The longest window ([`crate::SocketConfig::watch_max`]); zero: never watch.
    max: Duration,
    /// When the last watch began that ended without a chain, until a kick judges it.
    missed: Option<std::time::Instant>,
    /// Late kicks since the last early kick or catch in the second half of a window.
    late: u8,
}

impl Watch {
    const fn new(max: Duration) -> Self {
        Watch {
            window: max,
            max,
            missed: None,
            late: 0,
        }
    }

    /// The thread served its queues: `needed` whether a watch caught a chain in the second
    /// half of its window, `missed` when the last watch began if it ended with none (a kick
    /// judges it).
    fn served(&mut self, needed: bool, missed: Option<std::time::Instant>) {
        if needed {
            self.late = 0;
        }
        // With no watch (a maximum of zero) there is no miss for a kick to judge.
        self.missed = missed.filter(|_| !self.max.is_zero());
    }

    /// Whether a watch of `window` needed its second half for a catch: `after` its start the
    /// rings were last seen empty. (A watch of no window needed nothing.)
    fn needed(window: Duration, after: Duration) -> bool {
        !window.is_zero() && after >= window / 2
    }

    /// A kick of the guest woke the thread at `now`: judge the watch that missed, if one did.
    fn kicked(&mut self, now: std::time::Instant) {
        let Some(start) = self.missed.take() else {
            return;
        };
        if now.saturating_duration_since(start) <= self.max {
            self.late = 0;
            self.window = (self.window * 2).clamp(WATCH_GROW_FROM.min(self.max), self.max);
            return;
        }
        self.late += 1;
        if self.late < WATCH_LATE_RUN {
            return;
        }
        self.late = 0;
        self.window = if self.window / 2 < WATCH_GROW_FROM {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }
}

thread_local! {
    static DRAINING: std::cell::Cell<Option<Draining>> = const { std::cell::Cell::new(None) };
}
use crate::wire::{self, Address};

pub(crate) type Mem = GuestMemoryMmap<()>;
pub(crate) type Gm = GuestMemoryAtomic<Mem>;
pub(crate) type Vring = VringRwLock<Gm>;

/// VHOST_USER_F_PROTOCOL_FEATURES (vhost-user: feature bit 30).
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// The largest data-out a request hands the SCSI layer: the 8 MiB data buffer it accepts per
/// command (VPD 0xB0 MAXIMUM TRANSFER LENGTH), plus room for parameter lists. Of a request
/// whose CDB asks for more, nothing is copied: the SCSI layer refuses it by its CDB.
const MAX_DATA_OUT: u64 = 16 << 20;
/// The data-out a connection may have in flight (guest buffers its commands hold).
/// A request that would go above it waits in the ring until completions make room (one
/// request is always let in when nothing is held).
const DATA_OUT_BUDGET: u64 = 64 << 20;
/// Largest virtqueue the driver may configure.
pub(crate) const MAX_QUEUE_SIZE: u16 = 1024;
// A chain as long as the largest queue: seg_max (below) counts on it.
const _: () = assert!(MAX_QUEUE_SIZE as usize == sg::MAX_DESCRIPTORS);
/// How long GET_VRING_BASE lets the commands in flight complete normally before it aborts
/// the nexus's tasks, and how often it then says it is still waiting. It never returns with a
/// command in flight: the command's buffers are lent to the driver (zero copy), so a read the
/// kernel finishes late would fill memory the guest has taken back, and a late write would
/// store whatever the guest put there since. QEMU's own devices drain the same way.
const STOP_BOUNDS: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(10));
/// How often a device reset, or a closed connection, says it is still waiting for commands
/// in flight (neither returns before they end, for the same reason as a stop).
const STUCK_WARN: Duration = Duration::from_secs(10);
/// `max_sectors` in the configuration space, in 512-byte units: 8 MiB, the SCSI layer's
/// largest data buffer.
const MAX_SECTORS: u32 = (8 << 20) / 512;

/// Warnings a guest's own requests cause (a malformed chain, an unknown request type, buffers
/// outside its memory) are at most this many a second, across the daemon: a guest cannot
/// flood the host's log. The next one let through says how many were left out.
const GUEST_WARNINGS_PER_SECOND: u32 = 10;

static GUEST_WARNINGS: WarnLimit = WarnLimit::new(GUEST_WARNINGS_PER_SECOND);

/// A per-second budget of log lines (see [`GUEST_WARNINGS_PER_SECOND`]).
struct WarnLimit {
    per_second: u32,
    second: AtomicU64,
    count: AtomicU32,
    dropped: AtomicU64,
}

impl WarnLimit {
    const fn new(per_second: u32) -> Self {
        WarnLimit {
            per_second,
            second: AtomicU64::new(0),
            count: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether one more line may go out this second; if so, how many were left out since the
    /// last one that did.
    fn allow(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let second = self.second.load(Ordering::Relaxed);
        if second != now
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` for what a guest's requests cause, within [`GUEST_WARNINGS`].
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        if let Some(suppressed) = GUEST_WARNINGS.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

/// What the vhost-user connections of one socket share: the socket's I_T nexus and its LUN
/// map, which outlive any one connection.
pub(crate) struct Shared {
    pub nexus: Arc<scsi::ItNexus>,
    /// Virtio target id to the SCSI target device behind it (its LUNs).
    pub targets: ArcSwap<BTreeMap<u8, Arc<scsi::Target>>>,
    /// Serialises changes of `targets`.
    pub update: Mutex<()>,
    pub runtime: tokio::runtime::Handle,
    /// Request queues.
    pub num_queues: u16,
    /// Threads serving the request queues (1..=`num_queues`).
    pub threads: u16,
    /// See [`crate::SocketConfig::watch_max`].
    pub watch_max: Duration,
    /// Largest virtio target id (`max_target` in the configuration space).
    pub max_target: u8,
    /// The device of the connection now served, for events.
    pub current: Mutex<Option<Arc<Device>>>,
}

impl Shared {
    pub fn target(&self, id: u8) -> Option<Arc<scsi::Target>> {
        self.targets.load().get(&id).cloned()
    }

    /// SAM-5 6.3.4 I_T nexus loss on every logical unit behind the socket.
    pub fn nexus_lost(&self) {
        for t in self.targets.load().values() {
            t.nexus_lost(&self.nexus);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct QueueState {
    /// Bumped when the queue is stopped: completions from before are dropped.
    epoch: AtomicU64,
    /// Held by the queue's thread through each drain of the queue (every pop until its chain
    /// is answered or in flight (`enter`), and the interrupt at the end), and by a queue stop
    /// or device reset while it takes the count of what is in flight: a chain popped just
    /// before the queue was stopped is waited for, never run after GET_VRING_BASE has
    /// returned with it counted as consumed.
    pop: Mutex<()>,
    /// The queue's vring, kept by its thread when it first serves it: task management reads
    /// how far the driver has filled the avail ring ([`Device::unpopped`]).
    vring: std::sync::OnceLock<Vring>,
    /// How far the queue's thread has taken the avail ring in, [`taken`]: every chain
    /// before that position is in flight (`enter`) or answered. Written under `pop`, before
    /// each pop.
    taken: AtomicU64,
}

/// The value of [`QueueState::taken`]: the epochs it was written in (their low 24 bits
/// each), and the position in the avail ring.
fn taken(epochs: Epochs, next_avail: u16) -> u64 {
    (taken_epochs(epochs) << 16) | u64::from(next_avail)
}

/// The epochs part of a [`taken`] value, unshifted.
fn taken_epochs(epochs: Epochs) -> u64 {
    const MASK: u64 = (1 << 24) - 1;
    ((epochs.device & MASK) << 24) | (epochs.queue & MASK)
}

/// The position in a [`taken`] value, if it was written in `epochs`.
fn taken_at(t: u64, epochs: Epochs) -> Option<u16> {
    (t >> 16 == taken_epochs(epochs)).then_some((t & 0xffff) as u16)
}

/// What a connection has in flight: every chain popped and handed to a task (a request, a
/// task management function) until its used ring entry is written or dropped.
#[derive(Default)]
struct Inflight {
    next: u64,
    entries: HashMap<u64, Entry>,
    queues: Vec<QueueInflight>,
    /// Data-out held by the entries, in bytes.
    bytes: u64,
}

#[derive(Default)]
struct QueueInflight {
    count: usize,
    /// Heads in flight, with the epochs they were popped in (after a reset the driver reuses
    /// heads whose old completions are dropped).
    heads: HashSet<(u16, Epochs)>,
    /// The queue stopped popping for want of room: a completion wakes its thread.
    waiting: bool,
}

/// One chain in flight.
struct Entry {
    queue: usize,
    head: u16,
    epochs: Epochs,
    /// The logical unit a request addresses (its address, as identity), 0 for none.
    lu: usize,
    tag: u64,
    bytes: u64,
    /// This connection's own ABORT TASK or ABORT TASK SET covered the request: aborted, it is
    /// answered VIRTIO_SCSI_S_ABORTED; aborted by anything else (a reset, another initiator's
    /// task management, PREEMPT AND ABORT, a stop), VIRTIO_SCSI_S_RESET.
    abort_tmf: bool,
    /// Its head left the queue's heads in flight as its used entry was written (see
    /// [`Token::complete`]): the driver owns it again from then.
    head_released: bool,
}

#[derive(Default)]
struct Events {
    /// The event queue, once the driver has kicked it; kept across stop/start and device
    /// resets (vhost-user-backend keeps one vring object per queue for the connection).
    vring: Option<Vring>,
    /// An event found no buffer: the next one carries VIRTIO_SCSI_T_EVENTS_MISSED.
    missed: bool,
}

/// The device one vhost-user connection drives.
pub struct Device {
    me: Weak<Device>,
    shared: Arc<Shared>,
    mem: Gm,
    acked: AtomicU64,
    event_idx: AtomicBool,
    sense_size: AtomicU32,
    cdb_size: AtomicU32,
    /// Bumped by a device reset and on disconnect: completions from before are dropped.
    epoch: AtomicU64,
    queues: Vec<QueueState>,
    events: Mutex<Events>,
    /// Held for reading by every return of a chain to the driver, from the check of the
    /// epochs through the guest-memory writes to the used ring entry; for writing by whatever
    /// bumps an epoch (queue stop, device reset, disconnect). So once the bump is done, no
    /// completion from before it touches guest memory or the rings.
    gate: RwLock<()>,
    inflight: Mutex<Inflight>,
    /// Notified whenever an entry leaves `inflight`.
    left: tokio::sync::Notify,
    /// One per worker thread (see `queues_per_thread`): written when a completion makes room
    /// on a queue of that thread that had stopped popping; registered with the thread's epoll
    /// as event [`Device::wake_event`].
    wakes: Vec<Option<EventFd>>,
    /// One per worker thread: how long it watches its request queues' avail rings.
    watches: Vec<Mutex<Watch>>,
    /// [`DATA_OUT_BUDGET`]; lowered by tests.
    pub(crate) data_out_budget: AtomicU64,
    /// Entries below this id were waited for by a queue stop already.
    stopped_upto: AtomicU64,
    /// Bumped when a queue stop begins: task management waiting for chains to be taken in
    /// ([`Device::taken_in`]) waits no more, so the stop never waits for it in turn.
    stops: AtomicU64,
    /// Set when the socket is being closed (the server's stop flag): every wait for commands
    /// in flight (queue stop, device reset, closed connection) gives up, so that a command
    /// stuck in the backend cannot keep the process from exiting.
    pub(crate) closing: Arc<AtomicBool>,
    /// [`STOP_BOUNDS`]; shortened by tests.
    pub(crate) stop_bounds: Mutex<(Duration, Duration)>,
    #[cfg(test)]
    pub(crate) hooks: Hooks,
}

/// A flag to wait on until it is true (tests).
#[cfg(test)]
pub(crate) type TestGate = Arc<(Mutex<bool>, std::sync::Condvar)>;

/// Block until `gate` is true.
#[cfg(test)]
fn wait_open(gate: &TestGate) {
    let (m, cv) = &**gate;
    let mut open = lock(m);
    while !*open {
        open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
    }
}

/// Test hooks: hold request completions at chosen points.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Hooks {
    /// When set, a request's task waits here, before it completes, until the value is true.
    pub before_complete: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
    /// Requests that reached `before_complete`.
    pub reached: AtomicUsize,
    /// When set, a request's completion blocks here until the flag is true: with the gate
    /// held, after its epoch check and before its writes.
    pub in_complete: Mutex<Option<TestGate>>,
    /// Completions that reached `in_complete`.
    pub inside: AtomicUsize,
    /// Run once by the next request between its target lookup and its ticket.
    pub before_admit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// When set, the next chain popped from a request queue waits here, once, until the
    /// flag is true.
    pub after_pop: Mutex<Option<TestGate>>,
    /// When set, a request's task waits here, its used entry written and its token still
    /// held, until the flag is true.
    pub after_complete: Mutex<Option<TestGate>>,
    /// Requests that reached `after_complete`.
    pub completed: AtomicUsize,
}

/// The epochs a chain was popped in: its completion is written only while they are current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Epochs {
    device: u64,
    queue: u64,
}

/// A chain in flight: where its completion goes, if the queue still exists then. Dropping it
/// ends the entry in [`Inflight`].
struct Token {
    dev: Arc<Device>,
    id: u64,
    queue: usize,
    epochs: Epochs,
}

impl Token {
    /// Give the chain back (see [`Device::complete`]). Its head leaves the heads in flight
    /// first: once the used entry is written the driver may make that head available again
    /// at once (virtio 1.2 2.7.13), before this token is dropped, and that is no duplicate.
    fn complete(&self, vring: &Vring, head: u16, write: impl FnOnce() -> u32) {
        self.dev.release_head(self.id);
        self.dev
            .complete(self.queue, self.epochs, vring, head, write);
        #[cfg(test)]
        if self.queue >= 2 {
            let hook = lock(&self.dev.hooks.after_complete).clone();
            if let Some(h) = hook {
                self.dev.hooks.completed.fetch_add(1, Ordering::SeqCst);
                wait_open(&h);
            }
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.dev.leave(self.id);
    }
}

/// The requests a task management function may end (requests of this connection: the one
/// I_T nexus).
#[derive(Debug, Clone, Copy)]
enum Affects {
    Nothing,
    /// ABORT TASK: the request with this tag to this logical unit.
    Task(usize, u64),
    /// ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET: every request to the logical unit.
    Lu(usize),
    /// I_T NEXUS RESET: every request.
    All,
}

impl Affects {
    fn covers(self, e: &Entry) -> bool {
        let request = e.queue >= 2 && e.lu != 0;
        match self {
            Affects::Nothing => false,
            Affects::Task(lu, tag) => request && e.lu == lu && e.tag == tag,
            Affects::Lu(lu) => request && e.lu == lu,
            Affects::All => e.queue >= 2,
        }
    }
}

/// Why a chain cannot go in flight now.
enum Refused {
    /// The data-out budget is spent: the chain goes back to the ring until a completion.
    Full,
    /// The device is being dropped.
    Gone,
}

/// How an in-flight entry names the logical unit at `lun` of `target` (see [`Entry::lu`]):
/// its address, 0 for none.
fn lu_identity(target: &scsi::Target, lun: u64) -> usize {
    target.lu(lun).map_or(0, |lu| Arc::as_ptr(lu) as usize)
}

fn status_byte(response: u32) -> u8 {
    response as u8
}

impl Device {
    pub(crate) fn new(shared: Arc<Shared>, mem: Gm, closing: Arc<AtomicBool>) -> Arc<Device> {
        let nq = 2 + usize::from(shared.num_queues);
        let queues = (0..nq).map(|_| QueueState::default()).collect();
        let inflight = Inflight {
            queues: (0..nq).map(|_| QueueInflight::default()).collect(),
            ..Inflight::default()
        };
        // Thread 0 and each request-queue thread; an eventfd that cannot be made leaves its
        // thread's queues to the driver's kicks.
        let threads = 1 + usize::from(shared.threads);
        let wakes = (0..threads)
            .map(|_| EventFd::new(EFD_NONBLOCK).ok())
            .collect();
        let watches = (0..threads)
            .map(|_| Mutex::new(Watch::new(shared.watch_max)))
            .collect();
        Arc::new_cyclic(|me| Device {
            me: me.clone(),
            shared,
            mem,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            sense_size: AtomicU32::new(wire::SENSE_SIZE),
            cdb_size: AtomicU32::new(wire::CDB_SIZE),
            epoch: AtomicU64::new(0),
            queues,
            events: Mutex::new(Events::default()),
            gate: RwLock::new(()),
            inflight: Mutex::new(inflight),
            left: tokio::sync::Notify::new(),
            wakes,
            watches,
            data_out_budget: AtomicU64::new(DATA_OUT_BUDGET),
            stopped_upto: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            stop_bounds: Mutex::new(STOP_BOUNDS),
            closing,
            #[cfg(test)]
            hooks: Hooks::default(),
        })
    }

    /// The `handle_event` event number of the wake eventfds: past the queues and the
    /// vhost-user-backend's own exit event.
    pub(crate) fn wake_event(&self) -> u16 {
        2 + self.shared.num_queues + 1
    }

    /// The wake eventfd of worker thread `thread`.
    pub(crate) fn wake_fd(&self, thread: usize) -> Option<RawFd> {
        self.wake(thread).map(AsRawFd::as_raw_fd)
    }

    fn wake(&self, thread: usize) -> Option<&EventFd> {
        self.wakes.get(thread).and_then(Option::as_ref)
    }

    /// Whether the wake eventfd of `thread` was written since it was last read (tests and
    /// the fuzzing entry point).
    pub(crate) fn wake_pending(&self, thread: usize) -> bool {
        self.wake(thread).is_some_and(|fd| fd.read().is_ok())
    }

    /// The worker thread that serves `queue`: thread 0 the control and event queues, and
    /// request queue `2 + i` thread `1 + i % threads` (see `queues_per_thread`).
    fn thread_of(&self, queue: usize) -> usize {
        match queue {
            0 | 1 => 0,
            q => 1 + (q - 2) % usize::from(self.shared.threads.max(1)),
        }
    }

    /// The queues worker thread `thread` serves, in ascending order: the order of the vrings
    /// vhost-user-backend hands the thread, whose index in it is the thread's event number
    /// for the queue.
    fn thread_queues(&self, thread: usize) -> std::iter::StepBy<std::ops::Range<usize>> {
        let threads = usize::from(self.shared.threads.max(1));
        match thread {
            0 => (0..2).step_by(1),
            t if t <= threads => (1 + t..2 + usize::from(self.shared.num_queues)).step_by(threads),
            _ => (0..0).step_by(1),
        }
    }

    /// Entry `id` is about to give its chain back: its head is no longer in flight. The
    /// entry itself (its room, what task management waits for) ends with its [`Token`].
    fn release_head(&self, id: u64) {
        let mut guard = lock(&self.inflight);
        let inf = &mut *guard;
        if let Some(e) = inf.entries.get_mut(&id) {
            if !std::mem::replace(&mut e.head_released, true) {
                if let Some(q) = inf.queues.get_mut(e.queue) {
                    q.heads.remove(&(e.head, e.epochs));
                }
            }
        }
    }

    /// Entry `id` addresses logical unit `lu` (see [`Entry::lu`]) after all: the LUN map
    /// changed between its admission and its ticket.
    fn relabel(&self, id: u64, lu: usize) {
        if let Some(e) = lock(&self.inflight).entries.get_mut(&id) {
            e.lu = lu;
        }
    }

    /// Whether `head` of `queue`, popped in `epochs`, is still in flight.
    fn head_in_flight(&self, queue: usize, head: u16, epochs: Epochs) -> bool {
        lock(&self.inflight)
            .queues
            .get(queue)
            .is_some_and(|q| q.heads.contains(&(head, epochs)))
    }

    /// Whether `queue` may pop another chain with at most `limit` in flight; when not, the
    /// next completion on it wakes its thread.
    fn room(&self, queue: usize, limit: usize) -> bool {
        let mut inf = lock(&self.inflight);
        let Some(q) = inf.queues.get_mut(queue) else {
            return false;
        };
        if q.count < limit {
            true
        } else {
            q.waiting = true;
            false
        }
    }

    /// Put a chain in flight, holding `bytes` of data-out.
    fn enter(
        &self,
        queue: usize,
        head: u16,
        epochs: Epochs,
        lu: usize,
        tag: u64,
        bytes: u64,
    ) -> Result<Token, Refused> {
        let dev = self.me.upgrade().ok_or(Refused::Gone)?;
        let budget = self.data_out_budget.load(Ordering::Relaxed);
        let mut guard = lock(&self.inflight);
        let inf = &mut *guard;
        let Some(q) = inf.queues.get_mut(queue) else {
            return Err(Refused::Gone);
        };
        if bytes > 0 && inf.bytes > 0 && inf.bytes.saturating_add(bytes) > budget {
            q.waiting = true;
            return Err(Refused::Full);
        }
        q.count += 1;
        q.heads.insert((head, epochs));
        inf.bytes += bytes;
        let id = inf.next;
        inf.next += 1;
        inf.entries.insert(
            id,
            Entry {
                queue,
                head,
                epochs,
                lu,
                tag,
                bytes,
                abort_tmf: false,
                head_released: false,
            },
        );
        Ok(Token {
            dev,
            id,
            queue,
            epochs,
        })
    }

    /// Mark the requests in flight that this connection's own ABORT TASK or ABORT TASK SET
    /// covers (see [`Entry::abort_tmf`]).
    fn mark_abort_tmf(&self, affects: Affects) {
        for e in lock(&self.inflight).entries.values_mut() {
            if affects.covers(e) {
                e.abort_tmf = true;
            }
        }
    }

    /// The response for request `id`, aborted: VIRTIO_SCSI_S_ABORTED when this connection's
    /// ABORT TASK or ABORT TASK SET ended it, VIRTIO_SCSI_S_RESET otherwise (virtio 1.2
    /// 5.6.6.1: "cancelled due to a bus or device reset (including a task management
    /// function)"), which a Linux guest retries where it fails an aborted one.
    fn aborted_response(&self, id: u64) -> u32 {
        if lock(&self.inflight)
            .entries
            .get(&id)
            .is_some_and(|e| e.abort_tmf)
        {
            wire::VIRTIO_SCSI_S_ABORTED
        } else {
            wire::VIRTIO_SCSI_S_RESET
        }
    }

    /// Entry `id` is done: free its room, wake the queues that wait for room, tell waiters.
    fn leave(&self, id: u64) {
        let mut wake: Vec<usize> = Vec::new();
        {
            let mut guard = lock(&self.inflight);
            let inf = &mut *guard;
            if let Some(e) = inf.entries.remove(&id) {
                inf.bytes -= e.bytes;
                if let Some(q) = inf.queues.get_mut(e.queue) {
                    q.count -= 1;
                    if !e.head_released {
                        q.heads.remove(&(e.head, e.epochs));
                    }
                }
            }
            for (i, q) in inf.queues.iter_mut().enumerate() {
                if std::mem::take(&mut q.waiting) {
                    wake.push(self.thread_of(i));
                }
            }
        }
        wake.sort_unstable();
        wake.dedup();
        for t in wake {
            if let Some(fd) = self.wake(t) {
                let _ = fd.write(1);
            }
        }
        self.left.notify_waiters();
    }

    /// The connection is gone: nothing in flight may touch its rings or memory any more.
    /// Returns once no completion is being written.
    pub(crate) fn disconnect(&self) {
        {
            let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        lock(&self.events).vring = None;
    }

    fn epochs(&self, queue: usize) -> Epochs {
        Epochs {
            device: self.epoch.load(Ordering::SeqCst),
            queue: self
                .queues
                .get(queue)
                .map_or(u64::MAX, |q| q.epoch.load(Ordering::SeqCst)),
        }
    }

    /// Return `head` of `queue` to the driver, if the epochs it was popped in are still
    /// current: `write` puts the response into guest memory and says how many bytes it wrote
    /// (the used length). The check, the writes and the used ring entry happen under the
    /// gate, so a stop, reset or disconnect is either before all of them or after.
    fn complete(
        &self,
        queue: usize,
        epochs: Epochs,
        vring: &Vring,
        head: u16,
        write: impl FnOnce() -> u32,
    ) {
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if self.epochs(queue) != epochs {
            return;
        }
        #[cfg(test)]
        if queue >= 2 {
            let hook = lock(&self.hooks.in_complete).clone();
            if let Some(h) = hook {
                self.hooks.inside.fetch_add(1, Ordering::SeqCst);
                wait_open(&h);
            }
        }
        let len = write();
        // On the thread draining this very queue, the interrupt waits for the end of the
        // drain, which sends one for all its completions.
        let me = self as *const Self as usize;
        let deferred = DRAINING.with(|d| match d.get() {
            Some(mut dr) if dr.device == me && dr.queue == queue => {
                dr.owed = true;
                d.set(Some(dr));
                true
            }
            _ => false,
        });
        if deferred {
            Self::add_used(vring, head, len);
        } else {
            Self::used(vring, head, len);
        }
    }

    fn config(&self) -> wire::Config {
        let queue_size = u32::from(MAX_QUEUE_SIZE);
        wire::Config {
            num_queues: u32::from(self.shared.num_queues),
            // Two descriptors of a chain carry the request and response headers.
            seg_max: queue_size - 2,
            max_sectors: MAX_SECTORS,
            cmd_per_lun: queue_size,
            event_info_size: wire::EVENT_SIZE,
            sense_size: self.sense_size.load(Ordering::Relaxed),
            cdb_size: self.cdb_size.load(Ordering::Relaxed),
            max_channel: 0,
            max_target: u16::from(self.shared.max_target),
            // Flat space addressing reaches LUN 16383 (SAM-5 4.7.7.4).
            max_lun: 0x3FFF,
        }
    }

    /// Return a chain to the driver with `len` bytes written, and notify it if it asked.
    fn used(vring: &Vring, head: u16, len: u32) {
        if Self::add_used(vring, head, len) {
            Self::notify(vring);
        }
    }

    fn add_used(vring: &Vring, head: u16, len: u32) -> bool {
        match vring.get_mut().add_used(head, len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot return a buffer to the used ring");
                false
            }
        }
    }

    /// Interrupt the driver if it asked to be (with EVENT_IDX: if the used index passed its
    /// used_event since the last interrupt).
    fn notify(vring: &Vring) {
        let notify = vring.get_mut().needs_notification().unwrap_or(true);
        if notify {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(error = %e, "Cannot notify the driver");
            }
        }
    }

    /// Serve `queues` (the ready queues of worker thread `thread`) until no chain is available
    /// on any: pop and handle each one's chains, then, for request queues, watch their avail
    /// rings for the thread's [`Watch`] window (a busy guest usually offers its next request
    /// within that, and so does not pay a kick, an exit that is dear above all under TCG); with
    /// VIRTIO_RING_F_EVENT_IDX notifications are off meanwhile, and a chain that arrived
    /// before they were back on is served too. At most a queue size of chains is in flight
    /// per queue, and the data-out held stays within the budget: without room the chain stays
    /// in the ring (that queue's notifications stay off) and the completion that makes room
    /// wakes the thread, which serves again.
    fn serve(&self, thread: usize, queues: &[(usize, &Vring)]) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let watch = self.watches.get(thread);
        let window = watch.map_or(Duration::ZERO, |w| lock(w).window);
        let mut empty: Vec<(usize, &Vring)> = Vec::with_capacity(queues.len());
        let mut missed;
        let mut needed = false;
        loop {
            empty.clear();
            missed = None;
            for &(queue, vring) in queues {
                // Checked on every round: a queue may be stopped while another is served.
                if !Self::ready(vring) {
                    continue;
                }
                if event_idx {
                    let _ = vring.disable_notification();
                }
                if self.drain(queue, vring) == Drained::Empty {
                    empty.push((queue, vring));
                }
            }
            match self.poll_avail(&empty, window) {
                Watched::Caught(after) => {
                    needed |= Watch::needed(window, after);
                    continue;
                }
                Watched::Missed(start) => missed = Some(start),
                Watched::Unwatched => {}
            }
            if !event_idx {
                break;
            }
            let mut more = false;
            for &(queue, vring) in &empty {
                // Under the pop lock, and only while the queue is ready: enabling writes the
                // used ring's avail_event, which must not happen once a queue stop (which
                // makes the queue not ready, then takes this lock) or a device reset has
                // given the rings back to the driver.
                let Some(state) = self.queues.get(queue) else {
                    continue;
                };
                let _popping = lock(&state.pop);
                if Self::ready(vring) {
                    more |= matches!(vring.enable_notification(), Ok(true));
                }
            }
            if !more {
                break;
            }
        }
        if let Some(w) = watch {
            lock(w).served(needed, missed);
        }
    }

    /// Each thread's watch window now.
    #[cfg(test)]
    pub(crate) fn watch_windows(&self) -> Vec<Duration> {
        self.watches.iter().map(|w| lock(w).window).collect()
    }

    /// Whether the driver has set `vring` up and enabled it.
    fn ready(vring: &Vring) -> bool {
        let st = vring.get_ref();
        st.get_queue().ready() && st.is_enabled()
    }

    /// Pop every available chain of `vring` (queue `queue`) and handle it. Requests complete
    /// on this thread while it drains (see `request`): their used entries are batched into
    /// one interrupt at the end.
    fn drain(&self, queue: usize, vring: &Vring) -> Drained {
        // Held through the pops and the interrupt for what completed meanwhile: a queue stop
        // waiting for the lock returns (and the frontend drops the call fd) only once the
        // driver has been told of the chains answered here.
        let Some(state) = self.queues.get(queue) else {
            return Drained::Held;
        };
        let _popping = lock(&state.pop);
        let me = self as *const Self as usize;
        DRAINING.with(|d| {
            d.set(Some(Draining {
                device: me,
                queue,
                owed: false,
            }))
        });
        let drained = self.pop_all(queue, vring);
        if DRAINING.with(|d| d.take()).is_some_and(|dr| dr.owed) {
            Self::notify(vring);
        }
        drained
    }

    fn pop_all(&self, queue: usize, vring: &Vring) -> Drained {
        let limit = usize::from(vring.get_ref().get_queue().size());
        let mem = self.mem.memory().into_inner();
        loop {
            // Read before the pop: a stop or reset after this point makes the chain's
            // completion stale, never the other way round.
            let epochs = self.epochs(queue);
            // Every chain before this position is in flight or answered.
            if let Some(state) = self.queues.get(queue) {
                let next = vring.get_ref().get_queue().next_avail();
                state.taken.store(taken(epochs, next), Ordering::SeqCst);
            }
            if !self.room(queue, limit) {
                return Drained::Held;
            }
            // Checked under the pop lock (see `drain`), before each pop: a ring disabled
            // (SET_VRING_ENABLE 0, a device reset) or stopped meanwhile passes no more chains.
            if !Self::ready(vring) {
                return Drained::Held;
            }
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            #[cfg(test)]
            if chain.is_some() && queue >= 2 {
                let hook = lock(&self.hooks.after_pop).take();
                if let Some(h) = hook {
                    wait_open(&h);
                }
            }
            let Some(chain) = chain else {
                let ahead = Self::avail_ahead(vring, &mem);
                if ahead.is_none() {
                    // The avail index is more than a queue size ahead of what was popped
                    // (virtio 2.7.13.3 forbids it): no pop can ever consume it. Stop here
                    // rather than spin on it; the queue stays stalled until the driver
                    // resets the device.
                    guest_warn!(queue, "Driver's avail index is out of range; queue ignored");
                    return Drained::Held;
                }
                if Self::ready(vring) && !vring.get_ref().get_queue().is_valid(&*mem) {
                    // The rings are not (all) in guest memory, so a chain the index offers
                    // cannot be read: the same, rather than poll an entry no pop can reach.
                    guest_warn!(
                        queue,
                        "Queue's rings are outside guest memory; queue ignored"
                    );
                    return Drained::Held;
                }
                if vring.get_ref().get_queue().avail_ring() == 0 && ahead.is_some_and(|n| n > 0) {
                    // Guest address 0 is memory a driver may use, but the queue library
                    // takes an avail ring there for one not set up and pops nothing from
                    // it: the same again.
                    guest_warn!(queue, "Queue's avail ring is at address 0; queue ignored");
                    return Drained::Held;
                }
                return Drained::Empty;
            };
            let head = chain.head_index();
            if self.head_in_flight(queue, head, epochs) {
                // A driver may not make a head available again before it is used (virtio
                // 2.7.13); never run it twice.
                guest_warn!(queue, head, "Driver offered a head already in flight");
                self.refuse_duplicate(queue, epochs, vring, &mem, chain);
                continue;
            }
            let handled = match queue {
                0 => {
                    self.control(epochs, vring, &mem, chain);
                    true
                }
                1 => true,
                q => self.request(q, epochs, vring, &mem, chain),
            };
            if !handled {
                // No room for its data-out: back to the ring, until a completion.
                vring.get_mut().get_queue_mut().go_to_previous_position();
                return Drained::Held;
            }
        }
    }

    /// Watch the avail rings of the request queues among `queues` for `window` (yielding,
    /// not sleeping), until one has a chain available. A window of zero looks once.
    fn poll_avail(&self, queues: &[(usize, &Vring)], window: Duration) -> Watched {
        let watched = || queues.iter().filter(|&&(q, _)| q >= 2).map(|&(_, v)| v);
        if watched().next().is_none() {
            return Watched::Unwatched;
        }
        let mem = self.mem.memory().into_inner();
        let start = std::time::Instant::now();
        // When the rings were last seen empty (a yield may keep the thread away for long; the
        // chain came after this).
        let mut empty_at = Duration::ZERO;
        loop {
            let mut valid = false;
            for vring in watched() {
                match Self::avail_ahead(vring, &mem) {
                    Some(0) => valid = true,
                    Some(_) => return Watched::Caught(empty_at),
                    None => {}
                }
            }
            if !valid {
                return Watched::Unwatched;
            }
            empty_at = start.elapsed();
            if empty_at >= window {
                return Watched::Missed(start);
            }
            std::thread::yield_now();
        }
    }

    /// How many chains the driver has made available that were not popped yet; `None` when
    /// the avail index cannot be read or is more than a queue size ahead, which a pop
    /// refuses.
    fn avail_ahead(vring: &Vring, mem: &Mem) -> Option<u16> {
        let st = vring.get_ref();
        let q = st.get_queue();
        let idx = q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .ok()?;
        let ahead = idx.0.wrapping_sub(q.next_avail());
        (ahead <= q.size()).then_some(ahead)
    }

    /// One request queue request (virtio 5.6.6.1).
    /// A head the driver offered while it is in flight: answered with VIRTIO_SCSI_S_FAILURE
    /// in the buffers the chain has now (the request in flight keeps the ones it had).
    fn refuse_duplicate(
        &self,
        queue: usize,
        epochs: Epochs,
        vring: &Vring,
        mem: &Arc<Mem>,
        chain: DescriptorChain<Arc<Mem>>,
    ) {
        let head = chain.head_index();
        let wr = sg::split(chain).map(|(_, wr)| wr).unwrap_or_default();
        let (resp, len) = if queue == 0 {
            (
                vec![status_byte(wire::VIRTIO_SCSI_S_FAILURE)],
                wire::TMF_RESP,
            )
        } else {
            let sense_size = self.sense_size.load(Ordering::Relaxed);
            let r = wire::cmd_resp(
                status_byte(wire::VIRTIO_SCSI_S_FAILURE),
                0,
                0,
                &[],
                sense_size,
            );
            (r, wire::CMD_RESP_FIXED + sense_size)
        };
        self.complete(queue, epochs, vring, head, || {
            if wr.len() >= u64::from(len) && wr.write_at(&**mem, 0, &resp).is_ok() {
                len
            } else {
                0
            }
        });
    }

    /// One request queue request (virtio 5.6.6.1). `false` when its data-out does not fit
    /// the budget now: nothing was done and the chain goes back to the ring.
    fn request(
        &self,
        queue: usize,
        epochs: Epochs,
        vring: &Vring,
        mem: &Arc<Mem>,
        chain: DescriptorChain<Arc<Mem>>,
    ) -> bool {
        let head = chain.head_index();
        let unanswered = || {
            self.complete(queue, epochs, vring, head, || 0);
            true
        };
        let (rd, wr) = match sg::split(chain) {
            Ok(x) => x,
            Err(e) => {
                guest_warn!(queue, head, error = %e, "Malformed request chain");
                return unanswered();
            }
        };
        let sense_size = self.sense_size.load(Ordering::Relaxed);
        let cdb_size = self.cdb_size.load(Ordering::Relaxed);
        let resp_len = wire::CMD_RESP_FIXED + sense_size;
        let req_len = wire::CMD_REQ_FIXED + cdb_size;
        if wr.len() < u64::from(resp_len) {
            // Nowhere to put a response: the chain goes back unanswered.
            guest_warn!(
                queue,
                head,
                writable = wr.len(),
                "Request without room for its response"
            );
            return unanswered();
        }
        let fail = |response: u32| {
            let r = wire::cmd_resp(status_byte(response), 0, 0, &[], sense_size);
            self.complete(queue, epochs, vring, head, || {
                match wr.write_at(&**mem, 0, &r) {
                    Ok(()) => resp_len,
                    Err(_) => 0,
                }
            });
            true
        };
        let mut hdr = vec![0u8; req_len as usize];
        if rd.len() < u64::from(req_len) || rd.read_at(&**mem, 0, &mut hdr).is_err() {
            guest_warn!(
                queue,
                head,
                readable = rd.len(),
                "Request header missing or unreadable"
            );
            return fail(wire::VIRTIO_SCSI_S_FAILURE);
        }
        let req = wire::CmdReq::parse(&hdr);
        let data_out_len = rd.len() - u64::from(req_len);
        let data_in_cap = wr.len() - u64::from(resp_len);
        if data_out_len > 0 && data_in_cap > 0 {
            // Both directions, and VIRTIO_SCSI_F_INOUT is not offered: "immediately returned
            // with a response equal to VIRTIO_SCSI_S_FAILURE" (virtio 1.2 5.6.6.1).
            guest_warn!(
                queue,
                head,
                "Bidirectional request without VIRTIO_SCSI_F_INOUT"
            );
            return fail(wire::VIRTIO_SCSI_S_FAILURE);
        }
        let (vt, lun) = match wire::decode_lun(req.lun) {
            Address::BadTarget => return fail(wire::VIRTIO_SCSI_S_BAD_TARGET),
            // A LUN no logical unit can have: the SCSI target answers LOGICAL UNIT NOT
            // SUPPORTED (and REPORT LUNS) as for any missing LUN.
            Address::Lun(t, lun) => (t, lun.unwrap_or(u64::MAX)),
        };
        let Some(target) = self.shared.target(vt) else {
            return fail(wire::VIRTIO_SCSI_S_BAD_TARGET);
        };
        // Only what the CDB asks for is copied: the SCSI layer uses no more, and the rest is
        // reported as residual.
        let expected_out = u64::from(target.data_out_len(lun, &req.cdb));
        if data_out_len < expected_out {
            // The CDB asks for more data-out than the driver gave: VIRTIO_SCSI_S_OVERRUN
            // (virtio 1.2 5.6.6.1: "requires more data than is available in the datain and
            // dataout buffers"), and nothing of it is written (as QEMU does), rather than a
            // part of the write acknowledged.
            guest_warn!(
                queue,
                head,
                data_out_len,
                expected_out,
                "Data-out shorter than the CDB"
            );
            return fail(wire::VIRTIO_SCSI_S_OVERRUN);
        }
        // Likewise a READ whose data-in buffers cannot hold what it reads: refused before
        // anything is read (as QEMU does), so that no request makes the daemon hold data the
        // guest has no room for (a READ into the guest's buffers needs no buffer of its own).
        let read = target.read_len(lun, &req.cdb);
        if read > data_in_cap {
            guest_warn!(
                queue,
                head,
                read,
                data_in_cap,
                "Data-in buffers shorter than the READ"
            );
            return fail(wire::VIRTIO_SCSI_S_OVERRUN);
        }
        let mut copy = data_out_len.min(expected_out);
        if copy > MAX_DATA_OUT {
            // More than any command takes: a WRITE beyond MAXIMUM TRANSFER LENGTH (QEMU shows
            // the guest its own config space, whose max_sectors allows 32 MiB; INVALID FIELD
            // IN CDB), or a PERSISTENT RESERVE OUT list longer than any (PARAMETER LIST LENGTH
            // ERROR); every other command's data-out is far smaller. Nothing is copied, and
            // the SCSI layer refuses the command by its CDB, which the guest reports as an
            // error of that command rather than of the transport.
            tracing::debug!(queue, head, data_out_len, "Request data-out too large");
            copy = 0;
        }
        let lu_id = lu_identity(&target, lun);
        let token = match self.enter(queue, head, epochs, lu_id, req.tag, copy) {
            Ok(t) => t,
            Err(Refused::Full) => return false,
            Err(Refused::Gone) => return true,
        };
        // Zero copy: data-out and data-in are the guest's own buffers, lent to the SCSI layer
        // (a WRITE's data goes from them to the block driver, a READ's from the driver into
        // them). Data-out outside guest memory fails the request here.
        let Some(data_out) = rd.lend(mem, u64::from(req_len), copy as usize) else {
            guest_warn!(queue, head, "Request data-out outside guest memory");
            fail(wire::VIRTIO_SCSI_S_FAILURE);
            drop(token);
            return true;
        };
        // Likewise data-in buffers outside guest memory: the command does not run, so that
        // no READ the guest cannot receive reads into a buffer of the daemon's instead.
        let data_in_buf = if data_in_cap > 0 {
            let Some(buf) = wr.lend(mem, u64::from(resp_len), data_in_cap as usize) else {
                guest_warn!(queue, head, "Request data-in outside guest memory");
                fail(wire::VIRTIO_SCSI_S_FAILURE);
                drop(token);
                return true;
            };
            Some(buf)
        } else {
            None
        };
        let nexus = self.shared.nexus.clone();
        #[cfg(test)]
        if let Some(f) = lock(&self.hooks.before_admit).take() {
            f();
        }
        let ticket = target.admit(&nexus, lun);
        // `remove_lu` swaps the LUN map before it ends the nexus's tasks on the LU. A ticket
        // taken before that end is void, so the command is aborted; one taken after it would
        // be valid on the removed LU, but then the swap is seen here: the command goes to
        // the target as it is now (LOGICAL UNIT NOT SUPPORTED, or the LU added since).
        let now = self.shared.target(vt);
        let (target, ticket) = match now {
            Some(now) if lu_identity(&now, lun) == lu_id => (target, ticket),
            Some(now) => {
                // Its entry names the LU it runs on before it takes that LU's ticket: task
                // management of that LU that could end the ticket then waits for its answer.
                self.relabel(token.id, lu_identity(&now, lun));
                let ticket = now.admit(&nexus, lun);
                (now, ticket)
            }
            None => {
                self.relabel(token.id, 0);
                (Arc::new(scsi::Target::new()), None)
            }
        };
        let attr = match u32::from(req.task_attr) {
            wire::VIRTIO_SCSI_S_ORDERED => scsi::TaskAttr::Ordered,
            wire::VIRTIO_SCSI_S_HEAD => scsi::TaskAttr::HeadOfQueue,
            wire::VIRTIO_SCSI_S_ACA => scsi::TaskAttr::Aca,
            _ => scsi::TaskAttr::Simple,
        };
        let cmd = scsi::Command {
            nexus,
            lun,
            tag: req.tag,
            attr,
            cdb: req.cdb,
            data_out,
            data_in_len: u32::try_from(data_in_cap).unwrap_or(u32::MAX),
            data_in_buf,
            arrival: None,
        };
        let vring = vring.clone();
        let mem = mem.clone();
        let task = async move {
            let done = target.execute_admitted(cmd, ticket).await;
            #[cfg(test)]
            {
                let hold = lock(&token.dev.hooks.before_complete).clone();
                if let Some(mut rx) = hold {
                    token.dev.hooks.reached.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.wait_for(|open| *open).await;
                }
            }
            // `data_in` is what still has to be copied into the guest's buffers; `placed` is
            // the data-in length counted in the used entry (read straight into them, or copied).
            let (resp, data_in, placed) = match &done {
                scsi::Completion::Aborted => (
                    wire::cmd_resp(
                        status_byte(token.dev.aborted_response(token.id)),
                        0,
                        0,
                        &[],
                        sense_size,
                    ),
                    &[][..],
                    0,
                ),
                scsi::Completion::Done(r) => {
                    // One of the two is 0: data-in was read into the guest's buffers, or
                    // produced in a buffer of the SCSI layer's.
                    let produced = (r.data_in_placed as u64).max(r.data_in.len() as u64);
                    let n = produced.min(data_in_cap) as usize;
                    // More data-in than the driver's buffers hold: the transfer is cut to
                    // them and the driver is told (virtio 5.6.6.1: VIRTIO_SCSI_S_OVERRUN).
                    let response = if produced > data_in_cap {
                        wire::VIRTIO_SCSI_S_OVERRUN
                    } else {
                        wire::VIRTIO_SCSI_S_OK
                    };
                    // virtio 5.6.6.1: resid is the part of the transfer that did not
                    // happen: data-in buffers left unfilled, or data-out the guest sent
                    // beyond what the CDB asks for (less than it asks for never runs).
                    let resid = if data_in_cap > 0 {
                        data_in_cap - n as u64
                    } else {
                        data_out_len.saturating_sub(expected_out)
                    };
                    (
                        wire::cmd_resp(
                            status_byte(response),
                            r.status.0,
                            u32::try_from(resid).unwrap_or(u32::MAX),
                            &r.sense,
                            sense_size,
                        ),
                        r.data_in.get(..n).unwrap_or(&[]),
                        n,
                    )
                }
            };
            token.complete(&vring, head, || {
                if let Err(e) = wr.write_at(&*mem, u64::from(resp_len), data_in) {
                    // The data-in buffers are not all guest memory: the header still tells
                    // the driver, which reads it whatever the used length says.
                    guest_warn!(head, error = %e, "Cannot write data-in to guest memory");
                    let failed = wire::cmd_resp(
                        status_byte(wire::VIRTIO_SCSI_S_FAILURE),
                        0,
                        0,
                        &[],
                        sense_size,
                    );
                    return match wr.write_at(&*mem, 0, &failed) {
                        Ok(()) => resp_len,
                        Err(_) => 0,
                    };
                }
                match wr.write_at(&*mem, 0, &resp) {
                    Ok(()) => resp_len + placed as u32,
                    Err(e) => {
                        guest_warn!(head, error = %e, "Cannot write a response to guest memory");
                        0
                    }
                }
            });
        };
        // Run the command here until it first has to wait: a read the page cache holds, or a
        // write with no other write in flight, completes on this thread without a task spawn
        // or a thread hop, and its used entry joins this drain's one interrupt. Only a command
        // that waits becomes a task; tokio polls a new task at once, so the real waker
        // replaces the no-op one before anything can be missed. The runtime's context is
        // entered so the layers below may spawn or ask for its flavour.
        let _rt = self.shared.runtime.enter();
        let mut task = Box::pin(task);
        // Tests that hold a completion inside `complete` (blocking its thread) need it off the
        // thread that drives the queue.
        #[cfg(test)]
        if lock(&self.hooks.in_complete).is_some() || lock(&self.hooks.after_complete).is_some() {
            self.shared.runtime.spawn(task);
            return true;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            self.shared.runtime.spawn(task);
        }
        true
    }

    /// One control queue request (virtio 5.6.6.2).
    fn control(
        &self,
        epochs: Epochs,
        vring: &Vring,
        mem: &Arc<Mem>,
        chain: DescriptorChain<Arc<Mem>>,
    ) {
        let head = chain.head_index();
        let unanswered = || self.complete(0, epochs, vring, head, || 0);
        let (rd, wr) = match sg::split(chain) {
            Ok(x) => x,
            Err(e) => {
                guest_warn!(head, error = %e, "Malformed control chain");
                return unanswered();
            }
        };
        let mut ty = [0u8; 4];
        if rd.read_at(&**mem, 0, &mut ty).is_err() {
            guest_warn!(head, "Control request without a type");
            return unanswered();
        }
        match wire::ctrl_type(&ty) {
            wire::VIRTIO_SCSI_T_TMF => self.tmf(epochs, vring, mem, head, &rd, wr),
            wire::VIRTIO_SCSI_T_AN_QUERY | wire::VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                if wr.len() < u64::from(wire::AN_RESP) {
                    guest_warn!(
                        head,
                        "Asynchronous notification request without room for its response"
                    );
                    return unanswered();
                }
                let mut req = [0u8; wire::AN_REQ as usize];
                let response = if rd.read_at(&**mem, 0, &mut req).is_err() {
                    wire::VIRTIO_SCSI_S_FAILURE
                } else {
                    match wire::decode_lun(wire::an_lun(&req)) {
                        Address::Lun(t, _) if self.shared.target(t).is_some() => {
                            wire::VIRTIO_SCSI_S_OK
                        }
                        _ => wire::VIRTIO_SCSI_S_BAD_TARGET,
                    }
                };
                // No asynchronous notification is supported: event_actual 0.
                let resp = wire::an_resp(0, status_byte(response));
                self.complete(0, epochs, vring, head, || {
                    match wr.write_at(&**mem, 0, &resp) {
                        Ok(()) => wire::AN_RESP,
                        Err(_) => 0,
                    }
                });
            }
            other => {
                guest_warn!(head, ty = other, "Unknown control request type");
                unanswered();
            }
        }
    }

    /// A task management request. It runs as a task of its own: an ABORT TASK or a reset
    /// waits for the commands it ends, and neither the control queue nor the request queues
    /// wait with it.
    fn tmf(&self, epochs: Epochs, vring: &Vring, mem: &Arc<Mem>, head: u16, rd: &Sg, wr: Sg) {
        if wr.len() < u64::from(wire::TMF_RESP) {
            guest_warn!(
                head,
                "Task management request without room for its response"
            );
            return self.complete(0, epochs, vring, head, || 0);
        }
        let answer = |response: u32| {
            self.complete(0, epochs, vring, head, || {
                match wr.write_at(&**mem, 0, &[status_byte(response)]) {
                    Ok(()) => wire::TMF_RESP,
                    Err(_) => 0,
                }
            });
        };
        let mut buf = [0u8; wire::TMF_REQ as usize];
        if rd.read_at(&**mem, 0, &mut buf).is_err() {
            return answer(wire::VIRTIO_SCSI_S_FAILURE);
        }
        let req = wire::TmfReq::parse(&buf);
        let (vt, lun) = match wire::decode_lun(req.lun) {
            Address::BadTarget => return answer(wire::VIRTIO_SCSI_S_BAD_TARGET),
            Address::Lun(t, lun) => (t, lun.unwrap_or(u64::MAX)),
        };
        let Some(target) = self.shared.target(vt) else {
            return answer(wire::VIRTIO_SCSI_S_BAD_TARGET);
        };
        let tag = req.tag;
        let tmf = match req.subtype {
            wire::VIRTIO_SCSI_T_TMF_ABORT_TASK => scsi::Tmf::AbortTask { lun, tag },
            wire::VIRTIO_SCSI_T_TMF_ABORT_TASK_SET => scsi::Tmf::AbortTaskSet { lun },
            wire::VIRTIO_SCSI_T_TMF_CLEAR_ACA => scsi::Tmf::ClearAca { lun },
            wire::VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET => scsi::Tmf::ClearTaskSet { lun },
            wire::VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => scsi::Tmf::ItNexusReset,
            wire::VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => scsi::Tmf::LogicalUnitReset { lun },
            wire::VIRTIO_SCSI_T_TMF_QUERY_TASK => scsi::Tmf::QueryTask { lun, tag },
            wire::VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => scsi::Tmf::QueryTaskSet { lun },
            other => {
                guest_warn!(head, subtype = other, "Unknown task management function");
                return answer(wire::VIRTIO_SCSI_S_FUNCTION_REJECTED);
            }
        };
        // The requests whose used ring entries must be written before the response: Linux
        // (virtscsi_tmf) takes a completed TMF to mean every request it affected is back.
        let lu_id = lu_identity(&target, lun);
        let affects = match tmf {
            scsi::Tmf::AbortTask { .. } => Affects::Task(lu_id, tag),
            scsi::Tmf::AbortTaskSet { .. }
            | scsi::Tmf::ClearTaskSet { .. }
            | scsi::Tmf::LogicalUnitReset { .. } => Affects::Lu(lu_id),
            scsi::Tmf::ItNexusReset => Affects::All,
            _ => Affects::Nothing,
        };
        // Requests the driver made available before this function, which their queues'
        // threads have not taken in yet (a thread busy with a write it runs itself, a popped
        // chain not yet in flight, the data-out budget full): the function waits until they
        // are in flight, then ends (or queries) them like the rest, so none runs after its
        // response.
        let stops = self.stops.load(Ordering::SeqCst);
        let unpopped = self.unpopped(mem);
        let Ok(token) = self.enter(0, head, epochs, 0, tag, 0) else {
            return;
        };
        let shared = self.shared.clone();
        let vring = vring.clone();
        let mem = mem.clone();
        self.shared.runtime.spawn(async move {
            token.dev.taken_in(&unpopped, stops).await;
            // Once every request it may end is in flight, before it ends any.
            if matches!(
                tmf,
                scsi::Tmf::AbortTask { .. } | scsi::Tmf::AbortTaskSet { .. }
            ) {
                token.dev.mark_abort_tmf(affects);
            }
            let nexus = shared.nexus.clone();
            let r = if tmf == scsi::Tmf::ItNexusReset {
                // The I_T nexus is the socket's, across every target behind it.
                let targets: Vec<_> = shared.targets.load().values().cloned().collect();
                for t in targets {
                    t.task_management(&nexus, scsi::Tmf::ItNexusReset).await;
                }
                scsi::TmfResponse::FunctionComplete
            } else {
                target.task_management(&nexus, tmf).await
            };
            // Every request of this connection that the function may have ended was in flight
            // when it returned (popped before; a later one was admitted after the function's
            // epoch bump and is not affected): wait for their completions to be written.
            let upto = lock(&token.dev.inflight).next;
            token.dev.settle(upto, |e| affects.covers(e)).await;
            tracing::info!(?tmf, response = ?r, "Task management");
            let response = match r {
                scsi::TmfResponse::FunctionComplete => wire::VIRTIO_SCSI_S_FUNCTION_COMPLETE,
                // SAM-5 7.2: ABORT TASK for a task not in the task set completes.
                scsi::TmfResponse::TaskDoesNotExist => wire::VIRTIO_SCSI_S_FUNCTION_COMPLETE,
                scsi::TmfResponse::FunctionSucceeded => wire::VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
                scsi::TmfResponse::FunctionRejected => wire::VIRTIO_SCSI_S_FUNCTION_REJECTED,
                scsi::TmfResponse::IncorrectLun => wire::VIRTIO_SCSI_S_INCORRECT_LUN,
            };
            token.complete(&vring, head, || {
                match wr.write_at(&*mem, 0, &[status_byte(response)]) {
                    Ok(()) => wire::TMF_RESP,
                    Err(_) => 0,
                }
            });
        });
    }

    /// For each request queue with chains available that its thread has not taken in: the
    /// queue, its epochs now, and the avail index to take in up to.
    fn unpopped(&self, mem: &Mem) -> Vec<(usize, Epochs, u16)> {
        let mut out = Vec::new();
        for (queue, state) in self.queues.iter().enumerate().skip(2) {
            let Some(vring) = state.vring.get() else {
                continue;
            };
            let epochs = self.epochs(queue);
            if !Self::ready(vring) {
                continue;
            }
            let st = vring.get_ref();
            let q = st.get_queue();
            let Ok(idx) = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) else {
                continue;
            };
            // From where the thread has taken chains in, not from where it popped: a chain
            // popped and not yet in flight counts as not taken in.
            let from = taken_at(state.taken.load(Ordering::SeqCst), epochs)
                .unwrap_or_else(|| q.next_avail());
            let ahead = idx.0.wrapping_sub(from);
            if ahead != 0 && ahead < 0x8000 {
                out.push((queue, epochs, idx.0));
            }
        }
        out
    }

    /// Wait until the queues' threads have taken in the chains `unpopped` lists, unless the
    /// queue is stopped, disabled or reset, a queue stop has begun since `stops` was read,
    /// or the socket is closing. (A driver that never kicks a queue with chains in it, or
    /// moves its index out of range, keeps its own function waiting until one of these.)
    async fn taken_in(&self, unpopped: &[(usize, Epochs, u16)], stops: u64) {
        for &(queue, epochs, upto) in unpopped {
            let Some(state) = self.queues.get(queue) else {
                continue;
            };
            loop {
                let caught_up = taken_at(state.taken.load(Ordering::SeqCst), epochs)
                    .is_some_and(|pos| pos.wrapping_sub(upto) < 0x8000);
                if caught_up
                    || self.epochs(queue) != epochs
                    || self.stops.load(Ordering::SeqCst) != stops
                    || self.closing.load(Ordering::SeqCst)
                    || !state.vring.get().is_some_and(Self::ready)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Run `f` on the runtime from a thread outside it and wait at most `limit` for it;
    /// `false` when it did not finish in time (it is cancelled).
    fn run_bounded(&self, f: impl Future<Output = ()> + Send + 'static, limit: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let task = self.shared.runtime.spawn(async move {
            f.await;
            let _ = tx.send(());
        });
        let done = rx.recv_timeout(limit).is_ok();
        if !done {
            task.abort();
        }
        done
    }

    /// Run `f` on the runtime from a thread outside it and wait for it to end, saying every
    /// `warn_every` that `what` is still waiting, with how many chains are in flight. Only
    /// the socket being closed (`closing`) ends the wait early.
    fn run_to_end(
        &self,
        f: impl Future<Output = ()> + Send + 'static,
        warn_every: Duration,
        what: &'static str,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.runtime.spawn(async move {
            f.await;
            let _ = tx.send(());
        });
        let step = Duration::from_millis(100).min(warn_every);
        self.wait_unless_closing(
            || match rx.recv_timeout(step) {
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            },
            warn_every,
            |waited| {
                let left = lock(&self.inflight).entries.len();
                tracing::warn!(
                    what,
                    left,
                    seconds = waited.as_secs(),
                    "Still waiting for commands in flight"
                );
            },
            || tracing::warn!(what, "Socket closed while commands are still running"),
        );
    }

    /// Call `attempt` (which waits a little when it gives nothing) until it gives a value, or
    /// until the socket is closing (the daemon told to stop), when `closed` is called and
    /// `None` returned. `still(waited)` is called every `warn_every` meanwhile.
    fn wait_unless_closing<T>(
        &self,
        mut attempt: impl FnMut() -> Option<T>,
        warn_every: Duration,
        still: impl Fn(Duration),
        closed: impl FnOnce(),
    ) -> Option<T> {
        let start = std::time::Instant::now();
        let mut warned = Duration::ZERO;
        loop {
            if let Some(v) = attempt() {
                return Some(v);
            }
            if self.closing.load(Ordering::SeqCst) {
                closed();
                return None;
            }
            let waited = start.elapsed();
            if waited >= warned + warn_every {
                warned = waited;
                still(waited);
            }
        }
    }

    /// End every task of the socket's I_T nexus, on every logical unit behind it, and wait
    /// for the running ones (ABORT TASK SET on each: no unit attention, reservations stay).
    async fn abort_nexus_tasks(&self) {
        let nexus = self.shared.nexus.clone();
        let targets: Vec<_> = self.shared.targets.load().values().cloned().collect();
        for t in targets {
            let luns: Vec<u64> = t.luns().collect();
            for lun in luns {
                t.task_management(&nexus, scsi::Tmf::AbortTaskSet { lun })
                    .await;
            }
        }
    }

    /// GET_VRING_BASE of any queue: every chain in flight on the connection gets a grace
    /// time to come back normally, then the nexus's tasks are aborted so their ABORTED
    /// completions are written too, and the stop waits for the running ones however long they
    /// take (see [`STOP_BOUNDS`]), saying so every few seconds. Done once for all queues: the
    /// frontend stops them one after another, and the later stops find only what was popped
    /// since.
    fn quiesce_for_stop(&self, index: u32) {
        self.stops.fetch_add(1, Ordering::SeqCst);
        let (from, upto) = {
            // After the chain the queue's thread may be handling (see `QueueState::pop`).
            let popping = self
                .queues
                .get(index as usize)
                .map(|q| self.wait_pop(q, "queue stop"));
            if matches!(popping, Some(None)) {
                return;
            }
            let inf = lock(&self.inflight);
            (self.stopped_upto.load(Ordering::SeqCst), inf.next)
        };
        let pending = |inf: &Inflight| inf.entries.keys().filter(|&&id| id >= from).count();
        if pending(&lock(&self.inflight)) == 0 {
            return;
        }
        let Some(dev) = self.me.upgrade() else {
            return;
        };
        let (grace, abort) = *lock(&self.stop_bounds);
        let d = dev.clone();
        if !self.run_bounded(async move { d.settle(upto, |_| true).await }, grace) {
            tracing::warn!(
                queue = index,
                "Queue stopped with commands in flight; aborting the nexus's tasks"
            );
            let d = dev.clone();
            self.run_to_end(
                async move {
                    d.abort_nexus_tasks().await;
                    d.settle(upto, |_| true).await;
                },
                abort,
                "queue stop",
            );
        }
        self.stopped_upto.fetch_max(upto, Ordering::SeqCst);
    }

    /// Queue `q`'s pop lock (see [`QueueState::pop`]), for `what`: waited for as long as the
    /// queue's thread holds it (a chain it handles in place may wait for the disk), saying so
    /// every [`STUCK_WARN`]. `None` when the socket is closing (the daemon told to stop): the
    /// vhost-user handler thread is then free to end the connection. The daemon's exit still
    /// waits for the queue's thread when it joins it, so that a write the thread is making
    /// lands before the final flush.
    fn wait_pop<'q>(&self, q: &'q QueueState, what: &'static str) -> Option<MutexGuard<'q, ()>> {
        self.wait_unless_closing(
            || match q.pop.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    // Rare (a stop or reset) and short (one pop) unless the disk is stuck.
                    std::thread::sleep(Duration::from_millis(1));
                    None
                }
            },
            STUCK_WARN,
            |waited| {
                tracing::warn!(
                    what,
                    seconds = waited.as_secs(),
                    "Still waiting for a queue's thread to finish handling a request"
                );
            },
            || {
                tracing::warn!(
                    what,
                    "Socket closed while a queue's thread is still handling a request"
                )
            },
        )
    }

    /// The connection is gone (after [`Device::disconnect`], its worker threads joined): end
    /// the nexus's tasks and wait until every chain it had in flight is finished, so that no
    /// write of this connection lands after one of the next connection's (a restarted VM
    /// rewriting the same blocks). Not bounded, as a late write would be wrong whenever it
    /// came: it warns every 10 s, and only the socket being closed (`closing`) ends the wait.
    pub(crate) fn drain_after_disconnect(&self) {
        let Some(dev) = self.me.upgrade() else {
            return;
        };
        let upto = lock(&self.inflight).next;
        self.run_to_end(
            async move {
                dev.abort_nexus_tasks().await;
                dev.settle(upto, |_| true).await;
            },
            STUCK_WARN,
            "closed connection",
        );
    }

    /// Wait until no entry put in flight before `upto` and matching `pred` is left.
    async fn settle(&self, upto: u64, pred: impl Fn(&Entry) -> bool) {
        loop {
            let notified = std::pin::pin!(self.left.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            let pending = lock(&self.inflight)
                .entries
                .iter()
                .any(|(&id, e)| id < upto && pred(e));
            if !pending {
                return;
            }
            notified.await;
        }
    }

    /// Queue a `virtio_scsi_event` in the driver's next event buffer (virtio 5.6.6.3), when it
    /// negotiated the feature the event belongs to: VIRTIO_SCSI_F_HOTPLUG for transport
    /// resets, VIRTIO_SCSI_F_CHANGE for parameter changes. Without a buffer the event is lost
    /// and the next one says so (VIRTIO_SCSI_T_EVENTS_MISSED), which makes Linux rescan the
    /// bus.
    pub(crate) fn post_event(&self, event: u32, lun: [u8; 8], reason: u32) {
        let needs = match event {
            wire::VIRTIO_SCSI_T_TRANSPORT_RESET => 1 << wire::VIRTIO_SCSI_F_HOTPLUG,
            wire::VIRTIO_SCSI_T_PARAM_CHANGE => 1 << wire::VIRTIO_SCSI_F_CHANGE,
            _ => (1 << wire::VIRTIO_SCSI_F_HOTPLUG) | (1 << wire::VIRTIO_SCSI_F_CHANGE),
        };
        if self.acked.load(Ordering::SeqCst) & needs == 0 {
            return;
        }
        let mut ev = lock(&self.events);
        let Some(vring) = ev.vring.clone() else {
            ev.missed = true;
            return;
        };
        // Under the gate from the pop to the used entry, and only while the queue is ready
        // and enabled: a queue stop (GET_VRING_BASE) and a device reset make the queue not
        // ready or disabled first and then take the gate, so each is either before the pop
        // (nothing is popped) or after the used entry (they wait for it).
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if !Self::ready(&vring) {
            ev.missed = true;
            return;
        }
        let mem = self.mem.memory().into_inner();
        let pop = || {
            vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone())
        };
        // With no buffer, ask the driver to kick when it adds one: with EVENT_IDX it kicks
        // only when the device's avail_event says so (virtio 2.7.10), and the kick is what
        // reports the lost event. A buffer added meanwhile is taken at once.
        let chain = pop().or_else(|| {
            matches!(vring.enable_notification(), Ok(true))
                .then(pop)
                .flatten()
        });
        let Some(chain) = chain else {
            ev.missed = true;
            return;
        };
        let head = chain.head_index();
        let wr = match sg::split(chain) {
            Ok((_, wr)) if wr.len() >= u64::from(wire::EVENT_SIZE) => wr,
            _ => {
                guest_warn!(head, "Event buffer too small or malformed");
                ev.missed = true;
                return Self::used(&vring, head, 0);
            }
        };
        let flag = if ev.missed {
            wire::VIRTIO_SCSI_T_EVENTS_MISSED
        } else {
            0
        };
        let len = match wr.write_at(&*mem, 0, &wire::event(event | flag, lun, reason)) {
            Ok(()) => {
                ev.missed = false;
                wire::EVENT_SIZE
            }
            Err(_) => {
                // The buffer is outside guest memory: this event is lost, and the next one
                // says so (virtio 5.6.6.3: bit 31 when events were lost).
                guest_warn!(head, "Event buffer outside guest memory");
                ev.missed = true;
                0
            }
        };
        Self::used(&vring, head, len);
    }

    fn event_kick(&self, vring: &Vring) {
        let missed = {
            let mut ev = lock(&self.events);
            ev.vring = Some(vring.clone());
            ev.missed
        };
        if missed {
            self.post_event(wire::VIRTIO_SCSI_T_NO_EVENT, [0; 8], 0);
        }
    }

    /// Serve the queues of worker thread `thread` (`vrings` are its vrings, in the order of
    /// [`Device::thread_queues`]) after a kick of one of its request queues (`kicked`) or a
    /// wake: every one of its request queues, or on thread 0 the control queue.
    fn serve_thread(&self, thread: usize, vrings: &[Vring], kicked: bool) {
        let queues: Vec<(usize, &Vring)> = self
            .thread_queues(thread)
            .zip(vrings)
            .filter(|&(q, _)| q != 1)
            .collect();
        for &(q, vring) in &queues {
            if let Some(state) = self.queues.get(q) {
                state.vring.get_or_init(|| vring.clone());
            }
        }
        if kicked {
            self.judge_kick(thread, &queues);
        }
        self.serve(thread, &queues);
    }

    /// A kick woke worker thread `thread`: if its last watch missed, the kick judges it when a
    /// chain waits on one of the thread's request queues (`queues`). A kick for a chain served
    /// since (a watch caught it, or a drain of the thread's other queue took it) says nothing
    /// of the guest's pace; a chain waiting does (the last serve left the queues empty, so it
    /// came after the watch began), even one whose own kick an earlier serve of this batch
    /// answered.
    fn judge_kick(&self, thread: usize, queues: &[(usize, &Vring)]) {
        let Some(w) = self.watches.get(thread) else {
            return;
        };
        let mut w = lock(w);
        if w.missed.is_none() {
            return;
        }
        let mem = self.mem.memory().into_inner();
        let waiting = queues.iter().any(|&(q, v)| {
            q >= 2 && Self::ready(v) && Self::avail_ahead(v, &mem).is_some_and(|n| n > 0)
        });
        if waiting {
            w.kicked(std::time::Instant::now());
        }
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 + usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << wire::VIRTIO_SCSI_F_HOTPLUG)
            // VIRTIO_SCSI_T_PARAM_CHANGE events (`VhostScsi::param_change`). QEMU passes the
            // bit through to the guest (its `param_change` property, on by default).
            | (1 << wire::VIRTIO_SCSI_F_CHANGE)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let upto = {
            // After the chains the queues' threads may be handling (see `QueueState::pop`);
            // the rings are disabled by now, so none is popped after.
            let popping: Option<Vec<_>> = self
                .queues
                .iter()
                .map(|q| self.wait_pop(q, "device reset"))
                .collect();
            let Some(_popping) = popping else {
                return;
            };
            let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.epoch.fetch_add(1, Ordering::SeqCst);
            lock(&self.inflight).next
        };
        self.sense_size.store(wire::SENSE_SIZE, Ordering::Relaxed);
        self.cdb_size.store(wire::CDB_SIZE, Ordering::Relaxed);
        // The driver starts afresh: no event was missed by it. The vring object stays (see
        // `stop_vring`).
        lock(&self.events).missed = false;
        // The driver has forgotten every request: an I_T nexus reset (SAM-5 6.3.4), as the
        // I_T NEXUS RESET function does. The nexus's tasks end (waited for: none of the old
        // session's writes lands after the new session's), its SPC-2 reservations are
        // released, and its next command reports I_T NEXUS LOSS OCCURRED. Not bounded, though
        // this runs on the vhost-user handler thread: the driver reuses the memory of the
        // requests it forgot, which the commands still running may have lent to the kernel.
        let Some(dev) = self.me.upgrade() else {
            return;
        };
        self.run_to_end(
            async move {
                let nexus = dev.shared.nexus.clone();
                let targets: Vec<_> = dev.shared.targets.load().values().cloned().collect();
                for t in targets {
                    t.task_management(&nexus, scsi::Tmf::ItNexusReset).await;
                }
                dev.settle(upto, |_| true).await;
            },
            STUCK_WARN,
            "device reset",
        );
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config().to_bytes();
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        cfg.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// The driver may write `sense_size` and `cdb_size` (virtio 5.6.4); nothing else.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "read-only or invalid virtio-scsi config field",
            )
        };
        let field = match (offset as usize, buf) {
            (wire::CONFIG_SENSE_SIZE, &[a, b, c, d]) => (
                &self.sense_size,
                u32::from_le_bytes([a, b, c, d]),
                wire::MAX_SENSE_SIZE,
            ),
            (wire::CONFIG_CDB_SIZE, &[a, b, c, d]) => (
                &self.cdb_size,
                u32::from_le_bytes([a, b, c, d]),
                wire::MAX_CDB_SIZE,
            ),
            _ => return Err(invalid()),
        };
        let (slot, value, max) = field;
        if value == 0 || value > max {
            return Err(invalid());
        }
        slot.store(value, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, _mem: Gm) -> io::Result<()> {
        // The handler replaces the mapping inside the `GuestMemoryAtomic` this device holds.
        Ok(())
    }

    /// Thread 0 serves the control and event queues; the request queues are dealt out to
    /// the request-queue threads in turn (see `Device::thread_queues`).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..=usize::from(self.shared.threads))
            .map(|t| self.thread_queues(t).fold(0u64, |mask, q| mask | 1u64 << q))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// GET_VRING_BASE: the queue stops (vhost-user-backend has made it not ready, so nothing
    /// more is popped from it). The commands in flight come back first (see
    /// `quiesce_for_stop`: not bounded, once for all queues); any later completion is dropped.
    fn stop_vring(&self, index: u32) -> io::Result<()> {
        self.quiesce_for_stop(index);
        if let Some(q) = self.queues.get(index as usize) {
            let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
            q.epoch.fetch_add(1, Ordering::SeqCst);
        }
        // The event queue's vring stays known: it is the same object when the frontend starts
        // the queue again (a VM stopped and continued), and a driver using VIRTIO_RING_F_EVENT_IDX
        // may never kick again. While the queue is stopped an event finds no buffer (the
        // queue is not ready) and the next one reports VIRTIO_SCSI_T_EVENTS_MISSED.
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // The file driver may write into the page cache on this thread (see
        // `block::IoThreadScope`) rather than hand the write to others and wait.
        let _io_thread = block::IoThreadScope::enter(true);
        // Errors returned here end the worker thread: report problems to the driver instead.
        if evset != EventSet::IN {
            tracing::warn!(?evset, "Unexpected vring event");
            return Ok(());
        }
        if device_event == self.wake_event() {
            // A completion made room on a queue of this thread that had stopped popping.
            if let Some(fd) = self.wake(thread_id) {
                let _ = fd.read();
            }
            self.serve_thread(thread_id, vrings, false);
            return Ok(());
        }
        let local = usize::from(device_event);
        let queue = self.thread_queues(thread_id).nth(local);
        let (Some(queue), Some(vring)) = (queue, vrings.get(local)) else {
            tracing::warn!(device_event, thread_id, "Event for an unknown vring");
            return Ok(());
        };
        match queue {
            0 => self.serve(thread_id, &[(0, vring)]),
            1 => self.event_kick(vring),
            _ => self.serve_thread(thread_id, vrings, true),
        }
        Ok(())
    }
}

#[cfg(test)]
mod warn_limit_tests {
    use super::WarnLimit;

    #[test]
    fn at_most_the_budget_goes_out_each_second_and_the_next_says_how_many_were_left_out() {
        let l = WarnLimit::new(3);
        let first: Vec<Option<u64>> = (0..10).map(|_| l.allow_at(100)).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        assert_eq!(l.allow_at(101), Some(7), "the seven left out");
        assert_eq!(l.allow_at(101), Some(0));
    }
}

#[cfg(test)]
mod watch_tests {
    use super::Watch;
    use std::time::{Duration, Instant};

    const US: Duration = Duration::from_micros(1);

    /// Watches of `w`'s window that each miss, judged by a kick each, `gaps` after their start.
    fn judge(w: &mut Watch, gaps: &[Duration]) {
        for &gap in gaps {
            let t0 = Instant::now();
            w.served(false, Some(t0));
            w.kicked(t0 + gap);
            assert_eq!(w.missed, None, "a kick judges the miss once");
        }
    }

    fn with(window: Duration) -> Watch {
        Watch {
            window,
            ..Watch::new(crate::DEFAULT_WATCH_MAX)
        }
    }

    fn judged(window: Duration, gaps: &[Duration]) -> Duration {
        let mut w = with(window);
        judge(&mut w, gaps);
        w.window
    }

    #[test]
    fn a_kick_within_the_longest_watch_doubles_the_window_up_to_it() {
        assert_eq!(
            judged(Duration::ZERO, &[300 * US]),
            50 * US,
            "from none to the least"
        );
        assert_eq!(judged(20 * US, &[300 * US]), 50 * US);
        assert_eq!(judged(100 * US, &[300 * US]), 200 * US);
        assert_eq!(judged(400 * US, &[450 * US]), 600 * US, "capped at 600 µs");
        assert_eq!(
            judged(600 * US, &[600 * US]),
            600 * US,
            "600 µs is still within"
        );
    }

    #[test]
    fn three_late_kicks_in_a_row_halve_the_window_to_none_below_the_least() {
        let late = 601 * US;
        assert_eq!(
            judged(600 * US, &[late, late]),
            600 * US,
            "two are not enough"
        );
        assert_eq!(judged(600 * US, &[late, late, late]), 300 * US);
        assert_eq!(
            judged(600 * US, &[late; 6]),
            150 * US,
            "three more halve again"
        );
        let far = Duration::from_millis(5);
        assert_eq!(judged(100 * US, &[far; 3]), 50 * US);
        assert_eq!(
            judged(99 * US, &[far; 3]),
            Duration::ZERO,
            "49.5 µs is below 50"
        );
        assert_eq!(judged(Duration::ZERO, &[far; 3]), Duration::ZERO);
    }

    #[test]
    fn an_early_kick_or_a_catch_late_in_the_window_breaks_a_run_of_late_kicks() {
        let late = Duration::from_millis(1);
        let mut w = with(600 * US);
        // Late, late, early (the window is at the maximum already), late, late.
        judge(&mut w, &[late, late, 300 * US, late, late]);
        assert_eq!(w.window, 600 * US);
        judge(&mut w, &[late]);
        assert_eq!(w.window, 300 * US, "the third in a row since the early one");
        let mut w = with(600 * US);
        judge(&mut w, &[late, late]);
        w.served(Watch::needed(600 * US, 400 * US), None);
        judge(&mut w, &[late, late]);
        assert_eq!(
            w.window,
            600 * US,
            "a catch late in the window starts the count again"
        );
        let mut w = with(600 * US);
        judge(&mut w, &[late, late]);
        w.served(Watch::needed(600 * US, 200 * US), None);
        judge(&mut w, &[late]);
        assert_eq!(w.window, 300 * US, "one early in it does not");
        assert!(
            Watch::needed(600 * US, 300 * US),
            "the second half begins at 300 µs"
        );
        assert!(!Watch::needed(600 * US, 299 * US));
        assert!(
            !Watch::needed(Duration::ZERO, 10 * US),
            "a watch of no window needs nothing"
        );
    }

    /// A guest offering two requests 50 µs apart every 5 ms: each serve catches the second
    /// and then watches in vain until the next pair's kick.
    #[test]
    fn bursts_far_apart_are_watched_about_as_long_as_a_burst_takes() {
        let mut w = Watch::new(crate::DEFAULT_WATCH_MAX);
        let mut t = Instant::now();
        for _ in 0..30 {
            assert!(
                w.window > 50 * US,
                "the second of each pair is still caught"
            );
            let needed = Watch::needed(w.window, 50 * US);
            w.served(needed, Some(t + 50 * US));
            t += 5 * Duration::from_millis(1);
            w.kicked(t);
        }
        // 600 -> 300 -> 150 -> 75 µs, where the catch at 50 µs is in the second half.
        assert_eq!(w.window, 75 * US);
    }

    /// A socket configured without the watch: no kick, early or late, opens a window.
    #[test]
    fn a_watch_of_no_maximum_never_opens() {
        let mut w = Watch::new(Duration::ZERO);
        assert_eq!(w.window, Duration::ZERO);
        w.served(false, Some(Instant::now()));
        assert_eq!(w.missed, None, "no miss for a kick to judge");
        judge(
            &mut w,
            &[
                Duration::ZERO,
                US,
                700 * US,
                700 * US,
                700 * US,
                Duration::ZERO,
            ],
        );
        assert_eq!(w.window, Duration::ZERO);
        assert!(!Watch::needed(w.window, Duration::ZERO));
    }

    /// A maximum below the window a missed watch grows to (50 µs): the window grows to the
    /// maximum, never past it.
    #[test]
    fn a_maximum_below_the_growth_floor_caps_the_window() {
        let mut w = Watch::new(30 * US);
        assert_eq!(w.window, 30 * US);
        // Three late kicks: 30 halves to 15, below 50 µs, so to none.
        judge(&mut w, &[40 * US, 40 * US, 40 * US]);
        assert_eq!(w.window, Duration::ZERO);
        // An early kick (within the maximum) grows it again, to the maximum.
        judge(&mut w, &[20 * US]);
        assert_eq!(w.window, 30 * US);
        judge(&mut w, &[10 * US]);
        assert_eq!(w.window, 30 * US);
    }

    #[test]
    fn a_kick_after_a_watch_that_caught_changes_nothing() {
        let mut w = Watch::new(crate::DEFAULT_WATCH_MAX);
        assert_eq!(w.window, 600 * US, "a new device watches as long as it may");
        w.served(true, None);
        w.kicked(Instant::now() + Duration::from_secs(1));
        assert_eq!(w, Watch::new(crate::DEFAULT_WATCH_MAX));
    }

    /// A guest offering a request every 700 µs (just beyond the longest watch), then one every
    /// 250 µs, as the thread sees them: each watch catches or misses, and each miss is judged
    /// by the next kick.
    #[test]
    fn sparse_requests_stop_the_watch_and_close_ones_bring_it_back() {
        let mut w = Watch::new(crate::DEFAULT_WATCH_MAX);
        let mut t = Instant::now();
        let mut watched = Duration::ZERO;
        for _ in 0..20 {
            // The window passes before the request 700 µs later: a miss, then a kick.
            watched += w.window;
            w.served(false, Some(t));
            t += 700 * US;
            w.kicked(t);
        }
        assert_eq!(w.window, Duration::ZERO);
        // Three each of 600, 300, 150 and 75 µs, then nothing: no more watching at this pace.
        assert_eq!(watched, 3375 * US);
        let mut misses = 0;
        for _ in 0..20 {
            t += 250 * US;
            if w.window >= 250 * US {
                w.served(true, None);
            } else {
                misses += 1;
                w.served(false, Some(t - 250 * US));
            }
            w.kicked(t);
        }
        // 0 -> 50 -> 100 -> 200 -> 400 µs, which catches every one after.
        assert_eq!(misses, 4);
        assert_eq!(w.window, 400 * US);
    }
}
