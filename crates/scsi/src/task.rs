//! The task set of a logical unit (SAM-5 4.6.25, 8.x) and the unit attention queues of its
//! I_T nexuses (SAM-5 5.14).
//!
//! Tasks are kept in a few mutex-protected shards keyed by (nexus, tag); a command takes one shard
//! lock briefly to enter and once to leave, never across an await. Each task has a small state
//! machine so task management can tell "not started" (abort: it will never touch the backend)
//! from "running" (abort: wait until it is done, so an aborted write never lands after the TMF
//! answered).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::order::Order;
use crate::sense::Sense;
use crate::ItNexus;

/// The task has started: it may touch the backend.
const STARTED: u8 = 1;
/// Task management aborted it.
const ABORT: u8 = 2;
/// Its outcome is decided (and any backend I/O it did is complete).
const FINISHED: u8 = 4;

/// The control block of one task. The flags are set with atomic OR, so whichever of ABORT and
/// FINISHED comes first decides the outcome: a task finished before the abort is reported with
/// its status (and the abort does not count it); an abort before the finish makes the
/// completion [`crate::Completion::Aborted`].
#[derive(Debug)]
pub struct TaskCtl {
    nexus: Arc<ItNexus>,
    /// The LU-local id of the nexus ([`NexusState::id`]), so the hot path hashes two integers.
    nexus_id: u64,
    tag: u64,
    flags: AtomicU8,
    done: Notify,
}

/// What an abort found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AbortOutcome {
    /// The task had already finished: nothing was aborted.
    TooLate,
    /// Aborted before it started: it never touches the backend.
    NotStarted,
    /// Aborted while running: wait for it before answering.
    Running,
}

impl TaskCtl {
    /// Mark the task started; `false` when it was aborted before it started.
    pub fn start(&self) -> bool {
        let mut cur = self.flags.load(Ordering::SeqCst);
        loop {
            if cur & ABORT != 0 {
                return false;
            }
            match self.flags.compare_exchange(
                cur,
                cur | STARTED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Whether task management has aborted the task.
    pub fn aborted(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & ABORT != 0
    }

    /// Decide the outcome and wake waiters; returns whether the task was aborted. Idempotent.
    pub fn finish(&self) -> bool {
        let prior = self.flags.fetch_or(FINISHED, Ordering::SeqCst);
        self.done.notify_waiters();
        prior & ABORT != 0
    }

    fn abort(&self) -> AbortOutcome {
        let prior = self.flags.fetch_or(ABORT, Ordering::SeqCst);
        if prior & FINISHED != 0 {
            AbortOutcome::TooLate
        } else if prior & STARTED != 0 {
            AbortOutcome::Running
        } else {
            AbortOutcome::NotStarted
        }
    }

    async fn wait_done(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.flags.load(Ordering::SeqCst) & FINISHED != 0 {
                return;
            }
            notified.await;
        }
    }
}

const SHARDS: usize = 8;

type Shard = Mutex<HashMap<(u64, u64), Arc<TaskCtl>>>;

/// The task set of one LU.
pub struct TaskSet {
    shards: [Shard; SHARDS],
    hasher: RandomState,
    /// The order its commands arrived in, for their task attributes.
    pub(crate) order: Arc<Order>,
}

impl Default for TaskSet {
    fn default() -> Self {
        TaskSet {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: RandomState::new(),
            order: Arc::default(),
        }
    }
}

/// Removes the task from the set when the command ends, however it ends.
pub struct TaskGuard<'a> {
    set: &'a TaskSet,
    pub ctl: Arc<TaskCtl>,
}

impl TaskGuard<'_> {
    /// Decide the task's outcome ([`TaskCtl::finish`]), leaving the set first: whoever the
    /// outcome wakes (task management answering, the command's own response) may be followed
    /// at once by a new command with the same tag, which must not find this one still there.
    pub fn finish(&self) -> bool {
        self.set.remove(&self.ctl);
        self.ctl.finish()
    }
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        self.set.remove(&self.ctl);
        self.ctl.finish();
    }
}

impl TaskSet {
    fn shard(&self, tag: u64) -> &Shard {
        let i = (self.hasher.hash_one(tag) as usize) % SHARDS;
        // `i < SHARDS` by construction.
        &self.shards[i]
    }

    /// Enter a task; `None` when the nexus already has a task with this tag (overlapped command,
    /// SAM-5 5.11.2).
    pub fn enter(&self, nexus: &Arc<ItNexus>, nexus_id: u64, tag: u64) -> Option<TaskGuard<'_>> {
        let ctl = Arc::new(TaskCtl {
            nexus: nexus.clone(),
            nexus_id,
            tag,
            flags: AtomicU8::new(0),
            done: Notify::new(),
        });
        let mut map = self.shard(tag).lock().unwrap_or_else(|e| e.into_inner());
        let key = (nexus_id, tag);
        if map.contains_key(&key) {
            return None;
        }
        map.insert(key, ctl.clone());
        Some(TaskGuard { set: self, ctl })
    }

    fn remove(&self, ctl: &Arc<TaskCtl>) {
        let mut map = self
            .shard(ctl.tag)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (ctl.nexus_id, ctl.tag);
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, ctl)) {
            map.remove(&key);
        }
    }

    fn matching(&self, pred: impl Fn(&TaskCtl) -> bool) -> Vec<Arc<TaskCtl>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(map.values().filter(|c| pred(c)).cloned());
        }
        out
    }

    /// Whether `nexus` has the task `tag` in the set.
    pub fn contains(&self, nexus: &ItNexus, tag: u64) -> bool {
        !self
            .matching(|c| c.tag == tag && *c.nexus == *nexus)
            .is_empty()
    }

    /// Whether `nexus` has any task in the set.
    pub fn any_of(&self, nexus: &ItNexus) -> bool {
        !self.matching(|c| *c.nexus == *nexus).is_empty()
    }

    /// Abort every task matching `pred` now, then (the future) wait for the running ones to
    /// finish. Returns the nexuses whose tasks were aborted (tasks that had already finished
    /// do not count).
    ///
    /// The tasks are chosen and marked when this is called, not when the future is first
    /// polled: task management that ends tasks on several LUs marks them all before it waits
    /// for any, so a command that enters a task set after the function was received is never
    /// its business.
    pub fn abort(
        &self,
        pred: impl Fn(&ItNexus, u64) -> bool,
    ) -> impl std::future::Future<Output = Vec<Arc<ItNexus>>> + Send + '_ {
        let tasks = self.matching(|c| pred(&c.nexus, c.tag));
        let mut wait = Vec::new();
        let mut owners: Vec<Arc<ItNexus>> = Vec::new();
        for t in &tasks {
            match t.abort() {
                AbortOutcome::TooLate => continue,
                AbortOutcome::Running => wait.push(t.clone()),
                // It never touches the backend: it leaves the set now, not when its future
                // next runs, so its tag is free as soon as the function is answered. (One
                // running stays until it finishes: a later function must wait for it too.)
                AbortOutcome::NotStarted => self.remove(t),
            }
            if !owners.iter().any(|n| **n == *t.nexus) {
                owners.push(t.nexus.clone());
            }
        }
        // Those waiting for their turn (task attributes) have not started: they end now.
        self.order.kick();
        async move {
            for t in wait {
                t.wait_done().await;
            }
            owners
        }
    }

    /// Abort every task matching `pred` without waiting (the nexus is gone).
    pub fn abort_now(&self, pred: impl Fn(&ItNexus) -> bool) {
        for t in self.matching(|c| pred(&c.nexus)) {
            if t.abort() == AbortOutcome::NotStarted {
                self.remove(&t);
            }
        }
        self.order.kick();
    }
}

/// Unit attention state of one I_T nexus.
#[derive(Debug)]
pub struct NexusState {
    /// Unique for the life of the process; a nexus that is lost and comes back gets a new one.
    pub id: u64,
    /// Bumped by task management that ends this nexus's tasks on the LU (ABORT TASK SET,
    /// I_T NEXUS RESET), before it aborts the task set: see [`crate::Ticket`].
    pub abort_epoch: AtomicU64,
    /// Bumped when another nexus's CLEAR TASK SET or PREEMPT AND ABORT ends this nexus's
    /// tasks, before the epochs that end them: a command whose ticket is older was cleared
    /// by another initiator ([`crate::Ticket`]).
    pub cleared: AtomicU64,
    /// `cleared` as of the last COMMANDS CLEARED BY ANOTHER INITIATOR established here, so
    /// one clearing is told once however many of the nexus's commands it ended.
    told: AtomicU64,
    pending: AtomicBool,
    queue: Mutex<VecDeque<Sense>>,
    /// Set while the nexus is lost and has not come back ([`Nexuses::lose`]).
    lost: AtomicBool,
}

/// SAM-5 5.14: a queue of at most this many UAs per nexus; further ones are dropped (the
/// initiator still sees the oldest, and the same condition is never queued twice).
const UA_QUEUE_MAX: usize = 8;

impl NexusState {
    fn with(s: Sense) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let st = NexusState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            abort_epoch: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
            told: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            lost: AtomicBool::new(false),
        };
        st.push(s);
        st
    }

    pub fn push(&self, s: Sense) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.contains(&s) && q.len() < UA_QUEUE_MAX {
            q.push_back(s);
        }
        self.pending.store(true, Ordering::Release);
    }

    /// COMMANDS CLEARED BY ANOTHER INITIATOR (SAM-5 5.6, TAS=0) for the clearings of this
    /// nexus's tasks by others so far (`cleared`), unless they were told already: the
    /// function that ended its tasks and a command of it found ended later may both tell,
    /// and one clearing is told once, by whichever comes first.
    pub fn tell_cleared(&self) {
        let now = self.cleared.load(Ordering::SeqCst);
        if self.told.fetch_max(now, Ordering::SeqCst) < now {
            self.push(crate::sense::cond::COMMANDS_CLEARED_BY_ANOTHER);
        }
    }

    /// Put back `s`, which a command took and then could not report (it was aborted: its
    /// CHECK CONDITION never reaches the initiator, so the condition is not cleared, SAM-5
    /// 5.14). It is reported first again, unless a reset since subsumes it; after the
    /// reset's own condition otherwise.
    pub fn put_back(&self, s: Sense) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.contains(&s) {
            return;
        }
        let after_reset = q.front().is_some_and(|f| f.asc == 0x29);
        if after_reset && subsumed_by_reset(&s) {
            return;
        }
        q.insert(usize::from(after_reset), s);
        q.truncate(UA_QUEUE_MAX);
        self.pending.store(true, Ordering::Release);
    }

    /// Drop the pending unit attention `s`, if queued.
    pub fn remove(&self, s: Sense) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|&x| x != s);
        self.pending.store(!q.is_empty(), Ordering::Release);
    }

    /// Take the oldest unit attention, if any.
    pub fn take(&self) -> Option<Sense> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let s = q.pop_front();
        self.pending.store(!q.is_empty(), Ordering::Release);
        s
    }

    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// A reset of the nexus or the LU (SAM-5 6.3): `s` (POWER ON, RESET, OR BUS DEVICE RESET
    /// OCCURRED family, 29h) is reported first. The conditions it subsumes go: an earlier
    /// reset's, and COMMANDS CLEARED BY ANOTHER INITIATOR (the reset ended every task). The
    /// others stay queued behind it: an initiator that never learned that the capacity
    /// changed, or that its registration was preempted, would not learn it from the reset.
    fn reset_to(&self, s: Sense) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|x| !subsumed_by_reset(x));
        q.push_front(s);
        q.truncate(UA_QUEUE_MAX);
        self.pending.store(true, Ordering::Release);
    }

    /// The pending unit attentions a reset does not subsume, oldest first.
    fn survivors(&self) -> Vec<Sense> {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.iter()
            .filter(|x| !subsumed_by_reset(x))
            .copied()
            .collect()
    }
}

/// Whether a reset's unit attention replaces the pending condition `s` ([`NexusState::reset_to`]).
fn subsumed_by_reset(s: &Sense) -> bool {
    s.asc == 0x29 || *s == crate::sense::cond::COMMANDS_CLEARED_BY_ANOTHER
}

/// How many lost nexuses an LU remembers (for their I_T NEXUS LOSS OCCURRED unit attention)
/// until they come back; beyond that the longest gone is forgotten, and comes back as a new
/// nexus (POWER ON, RESET, OR BUS DEVICE RESET OCCURRED). Bounds the memory that initiators
/// logging in with ever new names or ISIDs can take.
const LOST_MAX: usize = 1024;

/// The nexuses an LU has seen, with their unit attentions.
#[derive(Default)]
pub struct Nexuses {
    inner: RwLock<Seen>,
}

#[derive(Default)]
struct Seen {
    map: HashMap<ItNexus, Arc<NexusState>>,
    /// Nexuses lost, oldest first, with the id of the state [`Nexuses::lose`] gave them. Entries
    /// whose nexus came back or was lost again since are dropped at the next `lose`.
    lost: VecDeque<(ItNexus, u64)>,
}

impl Nexuses {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Seen> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Seen> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of `nexus`; a nexus seen for the first time starts with POWER ON, RESET, OR
    /// BUS DEVICE RESET OCCURRED (SAM-5 5.14, 6.3.1), one that was lost with what
    /// [`Nexuses::lose`] left it.
    pub fn get(&self, nexus: &ItNexus) -> Arc<NexusState> {
        if let Some(s) = self.read().map.get(nexus) {
            // Under the read lock, so that `lose` never drops a nexus that is back.
            if s.lost.load(Ordering::Relaxed) {
                s.lost.store(false, Ordering::Relaxed);
            }
            return s.clone();
        }
        let mut seen = self.write();
        let s = seen
            .map
            .entry(nexus.clone())
            .or_insert_with(|| Arc::new(NexusState::with(crate::sense::cond::POWER_ON_RESET)));
        s.lost.store(false, Ordering::Relaxed);
        s.clone()
    }

    /// The state of `nexus` if it has been seen.
    pub fn peek(&self, nexus: &ItNexus) -> Option<Arc<NexusState>> {
        self.read().map.get(nexus).cloned()
    }

    /// Queue `s` for every known nexus for which `pred` holds.
    pub fn broadcast(&self, s: Sense, pred: impl Fn(&ItNexus) -> bool) {
        for (n, st) in self.read().map.iter() {
            if pred(n) {
                st.push(s);
            }
        }
    }

    /// Run `f` on every known nexus that is not lost (one that is gone reaches the LU through
    /// no port until it comes back).
    pub fn for_each(&self, mut f: impl FnMut(&ItNexus, &NexusState)) {
        for (n, st) in self.read().map.iter() {
            if !st.lost.load(Ordering::Relaxed) {
                f(n, st);
            }
        }
    }

    /// Establish the reset's unit attention `s` on the nexuses for which `pred` holds, first
    /// in their queues ([`NexusState::reset_to`]).
    pub fn reset(&self, s: Sense, pred: impl Fn(&ItNexus) -> bool) {
        for (n, st) in self.read().map.iter() {
            if pred(n) {
                st.reset_to(s);
            }
        }
    }

    /// `nexus` is lost (SAM-5 6.3.4): when it comes back, it is a new nexus (a state with a
    /// new id, so a command admitted before the loss is recognised as ended) whose first
    /// command reports I_T NEXUS LOSS OCCURRED. Unit attentions raised for it meanwhile are
    /// queued behind that one. A nexus this LU has never seen stays unseen: it will start with
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED, which it was never shown.
    pub fn lose(&self, nexus: &ItNexus) {
        let mut seen = self.write();
        if !seen.map.contains_key(nexus) {
            return;
        }
        let st = NexusState::with(crate::sense::cond::IT_NEXUS_LOSS);
        st.lost.store(true, Ordering::Relaxed);
        // What the nexus had not been told yet, behind the loss (see `NexusState::reset_to`).
        if let Some(old) = seen.map.get(nexus) {
            for s in old.survivors() {
                st.push(s);
            }
        }
        let id = st.id;
        seen.map.insert(nexus.clone(), Arc::new(st));
        // Only nexuses still lost count against the bound: drop the entries of those that came
        // back or were lost again since (this one's included).
        let Seen { map, lost } = &mut *seen;
        lost.retain(|(n, id)| {
            map.get(n)
                .is_some_and(|s| s.id == *id && s.lost.load(Ordering::Relaxed))
        });
        lost.push_back((nexus.clone(), id));
        while lost.len() > LOST_MAX {
            if let Some((n, _)) = lost.pop_front() {
                map.remove(&n);
            }
        }
    }

    /// How many nexuses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.read().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InitiatorPort, TargetPort, Transport};

    fn nexus() -> Arc<ItNexus> {
        Arc::new(ItNexus {
            initiator: InitiatorPort {
                transport: Transport::Iscsi,
                name: "i".into(),
                isid: None,
            },
            target: TargetPort {
                name: "t".into(),
                tpgt: 1,
                relative_id: 1,
            },
        })
    }

    fn named(name: &str) -> ItNexus {
        let mut n = (*nexus()).clone();
        n.initiator.name = name.into();
        n
    }

    /// A unit attention put back by an aborted command is reported next, after a reset's
    /// condition that came meanwhile, and not at all when that reset subsumes it. Senses as
    /// SAM-5/SPC-5 give them: 6h with 29h/00h (power on), 29h/03h (bus device reset), 2Ah/09h
    /// (capacity data has changed).
    #[test]
    fn a_unit_attention_put_back_is_reported_next() {
        let ua = |asc, ascq| Sense::new(0x06, asc, ascq);
        let st = NexusState::with(ua(0x29, 0x00));
        st.push(ua(0x2A, 0x09));
        let s = st.take().expect("power on");
        st.put_back(s);
        assert_eq!(st.take(), Some(ua(0x29, 0x00)));
        let s = st.take().expect("capacity changed");
        st.push(ua(0x2A, 0x01));
        st.put_back(s);
        assert_eq!(st.take(), Some(ua(0x2A, 0x09)), "before the later one");
        assert_eq!(st.take(), Some(ua(0x2A, 0x01)));
        assert_eq!(st.take(), None);
        // A reset in between: its condition first, then the one put back.
        st.push(ua(0x2A, 0x09));
        let s = st.take().expect("capacity changed");
        st.reset_to(ua(0x29, 0x03));
        st.put_back(s);
        assert_eq!(st.take(), Some(ua(0x29, 0x03)));
        assert_eq!(st.take(), Some(ua(0x2A, 0x09)));
        // The reset subsumes an earlier power on: that one goes.
        let st = NexusState::with(ua(0x29, 0x00));
        let s = st.take().expect("power on");
        st.reset_to(ua(0x29, 0x03));
        st.put_back(s);
        assert_eq!(st.take(), Some(ua(0x29, 0x03)));
        assert_eq!(st.take(), None);
        assert!(!st.has_pending());
    }

    #[test]
    fn lost_nexuses_are_remembered_up_to_a_bound_and_one_that_came_back_is_kept() {
        let set = Nexuses::default();
        let back = named("back");
        set.get(&back);
        set.lose(&back);
        // Back before the others are lost: its I_T NEXUS LOSS OCCURRED (29h/07h) waits.
        let st = set.get(&back);
        for i in 0..LOST_MAX + 100 {
            let n = named(&format!("gone-{i}"));
            set.get(&n);
            set.lose(&n);
        }
        assert_eq!(
            set.len(),
            LOST_MAX + 1,
            "the bound, and the nexus that came back"
        );
        assert!(
            Arc::ptr_eq(&set.get(&back), &st),
            "the returned nexus kept its state"
        );
        assert_eq!(st.take(), Some(crate::sense::cond::IT_NEXUS_LOSS));
        // The most recently lost are remembered; the oldest come back as new nexuses.
        let newest = set.get(&named(&format!("gone-{}", LOST_MAX + 99)));
        assert_eq!(newest.take(), Some(crate::sense::cond::IT_NEXUS_LOSS));
        let oldest = set.get(&named("gone-0"));
        assert_eq!(oldest.take(), Some(crate::sense::cond::POWER_ON_RESET));
    }

    #[test]
    fn a_nexus_lost_and_back_again_and_again_does_not_push_out_another_lost_one() {
        let set = Nexuses::default();
        let gone = named("gone");
        set.get(&gone);
        set.lose(&gone);
        let flapping = named("flapping");
        for _ in 0..2 * LOST_MAX {
            set.get(&flapping);
            set.lose(&flapping);
        }
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.get(&gone).take(),
            Some(crate::sense::cond::IT_NEXUS_LOSS)
        );
    }

    #[test]
    fn a_nexus_an_lu_never_saw_is_not_remembered_as_lost() {
        let set = Nexuses::default();
        let never = named("never");
        set.lose(&never);
        assert_eq!(set.len(), 0);
        assert_eq!(
            set.get(&never).take(),
            Some(crate::sense::cond::POWER_ON_RESET)
        );
    }

    #[test]
    fn lost_nexuses_are_not_listed_until_they_come_back() {
        let set = Nexuses::default();
        let n = named("n");
        set.get(&n);
        set.lose(&n);
        let mut listed = 0;
        set.for_each(|_, _| listed += 1);
        assert_eq!(listed, 0);
        set.get(&n);
        set.for_each(|_, _| listed += 1);
        assert_eq!(listed, 1);
    }

    #[test]
    fn task_aborted_before_start_never_starts() {
        let set = TaskSet::default();
        let n = nexus();
        let Some(g) = set.enter(&n, 1, 7) else {
            panic!("enter")
        };
        assert_eq!(g.ctl.abort(), AbortOutcome::NotStarted);
        assert!(!g.ctl.start());
        assert!(g.ctl.finish());
    }

    #[test]
    fn abort_after_finish_is_too_late_and_outcome_stands() {
        let set = TaskSet::default();
        let n = nexus();
        let Some(g) = set.enter(&n, 1, 7) else {
            panic!("enter")
        };
        assert!(g.ctl.start());
        assert!(!g.ctl.finish());
        assert_eq!(g.ctl.abort(), AbortOutcome::TooLate);
    }

    #[test]
    fn abort_while_running_makes_the_completion_aborted() {
        let set = TaskSet::default();
        let n = nexus();
        let Some(g) = set.enter(&n, 1, 7) else {
            panic!("enter")
        };
        assert!(g.ctl.start());
        assert_eq!(g.ctl.abort(), AbortOutcome::Running);
        assert!(g.ctl.finish());
    }

    #[test]
    fn same_tag_twice_on_one_nexus_is_refused_until_the_first_leaves() {
        let set = TaskSet::default();
        let n = nexus();
        let first = set.enter(&n, 1, 7);
        assert!(first.is_some());
        assert!(set.enter(&n, 1, 7).is_none());
        assert!(set.enter(&n, 2, 7).is_some());
        drop(first);
        assert!(set.enter(&n, 1, 7).is_some());
    }

    #[test]
    fn unit_attentions_are_queued_once_and_taken_in_order() {
        let st = NexusState::with(crate::sense::cond::POWER_ON_RESET);
        st.push(crate::sense::cond::MODE_PARAMETERS_CHANGED);
        st.push(crate::sense::cond::MODE_PARAMETERS_CHANGED);
        assert_eq!(st.take(), Some(crate::sense::cond::POWER_ON_RESET));
        assert_eq!(st.take(), Some(crate::sense::cond::MODE_PARAMETERS_CHANGED));
        assert_eq!(st.take(), None);
        assert!(!st.has_pending());
    }
}
