//! Task attributes (SAM-5 8.6): when a command of an LU's task set may start.
//!
//! - SIMPLE: once every HEAD OF QUEUE command, and every ORDERED command that arrived before
//!   it, has completed (8.6.2).
//! - ORDERED: once every HEAD OF QUEUE command, and every command that arrived before it, has
//!   completed; so the commands after it wait for it in turn (8.6.3).
//! - HEAD OF QUEUE: at once (8.6.4).
//!
//! The task set is one for all I_T nexuses (the control mode page's TST is 000b), so "before"
//! is the order in which commands arrive at the LU, whichever nexus sends them. A command
//! arrives when the LU is handed it ([`crate::LogicalUnit::execute_admitted`]), or earlier,
//! when a transport holds it before it can execute (an iSCSI write collecting Data-Out
//! arrives in CmdSN order, [`crate::LogicalUnit::arrive`]); it leaves when it completes or is
//! dropped ([`Arrival`] is a guard). SIMPLE commands with no ORDERED or HEAD OF QUEUE command
//! around, the usual traffic, never wait: a short lock on arrival, one to see it is their turn,
//! one on leaving.
//!
//! A command waiting for its turn has not started, so task management ends it without waiting
//! for it ([`Order::kick`] wakes it to find that out). A command a transport still holds (its
//! data has not all come) is ended by task management through its ticket, and leaves the
//! order at once ([`Order::retire`]): its initiator may never send the rest, and the commands
//! after it must not wait for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::TaskAttr;

/// The arrival order of one LU's task set.
#[derive(Debug, Default)]
pub(crate) struct Order {
    inner: Mutex<Inner>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    /// The number the next command to arrive gets.
    next: u64,
    /// Commands that have arrived and not left, by arrival number.
    live: BTreeMap<u64, Live>,
    /// The ORDERED ones among them.
    ordered: BTreeSet<u64>,
    /// How many of them are HEAD OF QUEUE.
    heads: usize,
}

#[derive(Debug)]
struct Live {
    attr: TaskAttr,
    /// Still held by its transport (not yet in the task set), with the id of its nexus's
    /// state on the LU ([`crate::task::NexusState::id`]): task management that ends it
    /// retires it.
    held: Option<u64>,
}

impl Inner {
    fn insert(&mut self, seq: u64, attr: TaskAttr, held: Option<u64>) {
        self.live.insert(seq, Live { attr, held });
        match attr {
            TaskAttr::Ordered => {
                self.ordered.insert(seq);
            }
            TaskAttr::HeadOfQueue => self.heads += 1,
            TaskAttr::Simple | TaskAttr::Aca => {}
        }
    }

    /// Take `seq` out; `None` when it had already left (retired).
    fn remove(&mut self, seq: u64) -> Option<Live> {
        let live = self.live.remove(&seq)?;
        match live.attr {
            TaskAttr::Ordered => {
                self.ordered.remove(&seq);
            }
            TaskAttr::HeadOfQueue => self.heads -= 1,
            TaskAttr::Simple | TaskAttr::Aca => {}
        }
        Some(live)
    }

    fn may_start(&self, seq: u64, attr: TaskAttr) -> bool {
        match attr {
            TaskAttr::HeadOfQueue => true,
            TaskAttr::Ordered => {
                self.heads == 0 && self.live.first_key_value().map(|(&s, _)| s) == Some(seq)
            }
            // ACA is refused before it waits for a turn (the LU has no ACA: lu.rs); it would
            // be a SIMPLE one here.
            TaskAttr::Simple | TaskAttr::Aca => {
                self.heads == 0 && self.ordered.first().is_none_or(|&o| o > seq)
            }
        }
    }
}

/// A command's place in its LU's arrival order, held from arrival until the command completes
/// or is dropped.
#[derive(Debug)]
pub struct Arrival {
    order: Arc<Order>,
    seq: u64,
    attr: TaskAttr,
}

impl Order {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command with attribute `attr` arrives now, as it enters the task set.
    pub(crate) fn arrive(self: &Arc<Self>, attr: TaskAttr) -> Arrival {
        self.take_place(attr, None, || false)
    }

    /// A command of the nexus whose state id is `nexus` arrives now and stays with its
    /// transport until it can execute. `ended` (read under this order's lock, so that it is
    /// either seen here or retired by [`Self::retire`]) says task management has ended it
    /// already: it then takes no place at all.
    pub(crate) fn arrive_held(
        self: &Arc<Self>,
        attr: TaskAttr,
        nexus: u64,
        ended: impl FnOnce() -> bool,
    ) -> Arrival {
        self.take_place(attr, Some(nexus), ended)
    }

    /// The next arrival number, and a place under it unless `ended`.
    fn take_place(
        self: &Arc<Self>,
        attr: TaskAttr,
        held: Option<u64>,
        ended: impl FnOnce() -> bool,
    ) -> Arrival {
        let mut inner = self.lock();
        let seq = inner.next;
        inner.next += 1;
        if !ended() {
            inner.insert(seq, attr, held);
        }
        Arrival {
            order: self.clone(),
            seq,
            attr,
        }
    }

    /// Task management ends commands: `end` moves the epochs that end their tickets and
    /// returns which nexuses (by state id) it ended the commands of; those their transports
    /// still hold leave the order now. `end` runs under this order's lock, so a command
    /// arriving at the same time ([`Self::arrive_held`]) either took its ticket before it and
    /// is retired here or finds itself ended, or took it after it and keeps its place: a
    /// command task management did not end never loses its place. Returns the state ids of
    /// the nexuses that had such commands (once each): they are told their commands were
    /// cleared, as those of commands in the task set.
    pub(crate) fn retire<P: Fn(u64) -> bool>(&self, end: impl FnOnce() -> P) -> Vec<u64> {
        let mut owners = Vec::new();
        {
            let mut inner = self.lock();
            let nexus = end();
            let gone: Vec<(u64, u64)> = inner
                .live
                .iter()
                .filter_map(|(&s, l)| l.held.filter(|&n| nexus(n)).map(|n| (s, n)))
                .collect();
            for (s, n) in gone {
                inner.remove(s);
                if !owners.contains(&n) {
                    owners.push(n);
                }
            }
        }
        self.kick();
        owners
    }

    /// Wake every command waiting for its turn, so that those task management ended find out.
    pub(crate) fn kick(&self) {
        self.changed.notify_waiters();
    }
}

impl Arrival {
    /// The transport's command enters the task set: it is no longer held. `false` when it
    /// has no place (task management ended it while it was held).
    pub(crate) fn enter_task_set(&self) -> bool {
        let mut inner = self.order.lock();
        match inner.live.get_mut(&self.seq) {
            Some(l) => {
                l.held = None;
                true
            }
            None => false,
        }
    }

    /// Wait until the rules above let this command start, or `ended` says task management
    /// ended it (checked each time a command leaves or [`Order::kick`] is called).
    pub(crate) async fn turn(&self, ended: impl Fn() -> bool) {
        if self.order.lock().may_start(self.seq, self.attr) {
            return;
        }
        loop {
            let changed = self.order.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.order.lock().may_start(self.seq, self.attr) || ended() {
                return;
            }
            changed.await;
        }
    }

    /// Whether this is a place in `order`.
    pub(crate) fn of(&self, order: &Arc<Order>) -> bool {
        Arc::ptr_eq(&self.order, order)
    }

    /// The task attribute the command arrived with.
    pub fn attr(&self) -> TaskAttr {
        self.attr
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let wake = {
            let mut inner = self.order.lock();
            // Someone may be waiting only while an ORDERED or HEAD OF QUEUE command is live, or
            // this one was the last of them. A retired one has left already.
            inner.remove(self.seq).is_some()
                && (!inner.ordered.is_empty() || inner.heads > 0 || self.attr != TaskAttr::Simple)
        };
        if wake {
            self.order.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(a: &Arrival) -> bool {
        a.order.lock().may_start(a.seq, a.attr)
    }

    #[test]
    fn simple_commands_never_wait_for_each_other() {
        let o = Arc::new(Order::default());
        let a = o.arrive(TaskAttr::Simple);
        let b = o.arrive(TaskAttr::Simple);
        assert!(starts(&a) && starts(&b));
    }

    #[test]
    fn ordered_waits_for_every_older_command_and_the_younger_wait_for_it() {
        let o = Arc::new(Order::default());
        let s1 = o.arrive(TaskAttr::Simple);
        let ord = o.arrive(TaskAttr::Ordered);
        let s2 = o.arrive(TaskAttr::Simple);
        assert!(starts(&s1));
        assert!(!starts(&ord), "an older SIMPLE command is live");
        assert!(!starts(&s2), "an older ORDERED command is live");
        drop(s1);
        assert!(starts(&ord));
        assert!(!starts(&s2));
        drop(ord);
        assert!(starts(&s2));
    }

    #[test]
    fn head_of_queue_starts_at_once_and_holds_the_others() {
        let o = Arc::new(Order::default());
        let s1 = o.arrive(TaskAttr::Simple);
        let h = o.arrive(TaskAttr::HeadOfQueue);
        let s2 = o.arrive(TaskAttr::Simple);
        let ord = o.arrive(TaskAttr::Ordered);
        assert!(starts(&h), "HEAD OF QUEUE waits for nothing");
        // s1 was already able to start before h arrived; one that had not started waits.
        assert!(!starts(&s2));
        drop(h);
        assert!(starts(&s2));
        assert!(!starts(&ord));
        drop(s1);
        drop(s2);
        assert!(starts(&ord));
    }

    #[test]
    fn a_retired_held_command_holds_no_one_back_and_takes_no_place() {
        let o = Arc::new(Order::default());
        let held = o.arrive_held(TaskAttr::Ordered, 7, || false);
        let other = o.arrive_held(TaskAttr::Simple, 8, || false);
        let later = o.arrive(TaskAttr::Simple);
        assert!(!starts(&later));
        assert_eq!(
            o.retire(|| |n| n == 7),
            vec![7],
            "the nexus whose command it ended"
        );
        assert!(
            starts(&later),
            "the retired ORDERED command still holds it back"
        );
        assert!(
            !held.enter_task_set(),
            "the retired command has no place left"
        );
        assert!(
            other.enter_task_set(),
            "another nexus's command keeps its place"
        );
        // Ended already when it arrives: no place at all.
        let dead = o.arrive_held(TaskAttr::Ordered, 7, || true);
        assert!(starts(&later) && !dead.enter_task_set());
        // Once in the task set, a command is no longer the transport's to retire.
        let ord = o.arrive_held(TaskAttr::Ordered, 9, || false);
        assert!(ord.enter_task_set());
        assert_eq!(
            o.retire(|| |_| true),
            Vec::<u64>::new(),
            "nothing held is left"
        );
        assert!(ord.enter_task_set(), "retired from the task set");
    }

    #[tokio::test]
    async fn a_waiting_command_wakes_when_its_elders_leave() {
        let o = Arc::new(Order::default());
        let s1 = o.arrive(TaskAttr::Simple);
        let ord = o.arrive(TaskAttr::Ordered);
        let waiter = tokio::spawn(async move { ord.turn(|| false).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(s1);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the ORDERED command was not woken")
            .expect("the waiter panicked");
    }

    #[tokio::test]
    async fn a_kick_ends_the_wait_of_an_ended_command() {
        let o = Arc::new(Order::default());
        let _s1 = o.arrive(TaskAttr::Simple);
        let ord = o.arrive(TaskAttr::Ordered);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let e = ended.clone();
        let waiter = tokio::spawn(async move {
            ord.turn(|| e.load(std::sync::atomic::Ordering::SeqCst))
                .await
        });
        tokio::task::yield_now().await;
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        o.kick();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the ended command still waits")
            .expect("the waiter panicked");
    }
}
