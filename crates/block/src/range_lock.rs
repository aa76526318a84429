//! Range locks over byte ranges of a device.
//!
//! COMPARE AND WRITE (SBC-4 5.3) must be one atomic step against every other write to an
//! overlapping range. Without a native compare-and-write the block layer emulates it as
//! read-compare-write, so it takes an *exclusive* lock over its range; every other writer
//! (WRITE, WRITE SAME, write zeroes, discard) takes a *shared* lock over its range. Shared locks
//! never conflict with each other, so ordinary writes run fully in parallel; an exclusive lock
//! conflicts with every overlapping lock. Reads take no lock.
//!
//! The lock is fair in arrival order: each request is appended to the list with a sequence
//! number the moment it arrives, and is granted once no *earlier* conflicting entry remains. So a
//! stream of writes cannot starve a compare-and-write (later writes queue behind it) and, as a
//! request only ever waits for earlier ones, there is no deadlock.
//!
//! Cost on the hot path: one short `Mutex` critical section to append (a scan of the entries in
//! flight, at most the queue depth) and one to remove. No lock is held across driver I/O except
//! the range lock itself. Waiters park on a [`Notify`]; a release wakes them only when some entry
//! is actually waiting, so the non-overlapping path never touches the waker list.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

/// Whether a lock excludes every overlapping request or only exclusive ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Compatible with other shared locks (ordinary writes).
    Shared,
    /// Conflicts with every overlapping lock (compare-and-write).
    Exclusive,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    start: u64,
    end: u64,
    mode: LockMode,
    waiting: bool,
}

impl Entry {
    fn conflicts(&self, start: u64, end: u64, mode: LockMode) -> bool {
        let overlaps = self.start < end && start < self.end;
        overlaps && (self.mode == LockMode::Exclusive || mode == LockMode::Exclusive)
    }
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    entries: Vec<Entry>,
}

/// A set of byte-range locks.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Notify,
}

/// A held range lock; dropping it releases the range.
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    seq: u64,
}

impl RangeLock {
    /// An empty lock set.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The critical sections below cannot panic, but a poisoned lock must not take the
        // I/O path down with it: the entries are still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock `[start, end)` in `mode`, waiting for every earlier conflicting holder or waiter.
    /// Cancellation-safe: dropping the future removes the request.
    pub async fn lock(&self, start: u64, end: u64, mode: LockMode) -> RangeGuard<'_> {
        let guard = {
            let mut st = self.state();
            let seq = st.next_seq;
            st.next_seq = st.next_seq.wrapping_add(1);
            let blocked = st.entries.iter().any(|e| e.conflicts(start, end, mode));
            st.entries.push(Entry {
                seq,
                start,
                end,
                mode,
                waiting: blocked,
            });
            // From here on the guard owns the entry: a cancelled wait still removes it.
            let guard = RangeGuard { lock: self, seq };
            if !blocked {
                // The hot path: nothing overlapping in flight.
                return guard;
            }
            guard
        };
        loop {
            // Register for the wake-up before looking, so a release between the look and the
            // await is not lost (a `Notified` sees every `notify_waiters` after its creation).
            let notified = self.released.notified();
            {
                let mut st = self.state();
                let State { entries, .. } = &mut *st;
                let Some(pos) = entries.iter().position(|e| e.seq == guard.seq) else {
                    // Cannot happen: only the guard's drop removes its entry.
                    return guard;
                };
                // Entries are appended in sequence order, so the earlier ones are those before
                // `pos`.
                let blocked = entries
                    .get(..pos)
                    .unwrap_or_default()
                    .iter()
                    .any(|e| e.conflicts(start, end, mode));
                if let Some(me) = entries.get_mut(pos) {
                    me.waiting = blocked;
                }
                if !blocked {
                    return guard;
                }
            }
            notified.await;
        }
    }

    /// Number of entries (held or waiting); for tests and metrics.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// `true` when nothing is locked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let wake = {
            let mut st = self.lock.state();
            if let Some(pos) = st.entries.iter().position(|e| e.seq == self.seq) {
                // `remove`, not `swap_remove`: the list must stay in arrival order.
                st.entries.remove(pos);
            }
            st.entries.iter().any(|e| e.waiting)
        };
        if wake {
            self.lock.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn shared_locks_do_not_conflict() {
        let l = RangeLock::new();
        let _a = l.lock(0, 10, LockMode::Shared).await;
        let _b = l.lock(5, 15, LockMode::Shared).await;
        assert_eq!(l.len(), 2);
    }

    #[tokio::test]
    async fn exclusive_waits_for_overlapping_shared() {
        let l = Arc::new(RangeLock::new());
        let a = l.lock(0, 10, LockMode::Shared).await;
        let l2 = l.clone();
        let t = tokio::spawn(async move {
            let _g = l2.lock(9, 12, LockMode::Exclusive).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_finished());
        drop(a);
        t.await.expect("task completes");
        assert!(l.is_empty());
    }

    #[tokio::test]
    async fn non_overlapping_exclusive_is_granted_at_once() {
        let l = RangeLock::new();
        let _a = l.lock(0, 10, LockMode::Exclusive).await;
        let _b = l.lock(10, 20, LockMode::Exclusive).await;
        assert_eq!(l.len(), 2);
    }

    #[tokio::test]
    async fn later_shared_queues_behind_waiting_exclusive() {
        let l = Arc::new(RangeLock::new());
        let a = l.lock(0, 10, LockMode::Shared).await;
        let l2 = l.clone();
        let x = tokio::spawn(async move {
            let _g = l2.lock(0, 10, LockMode::Exclusive).await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let l3 = l.clone();
        let s = tokio::spawn(async move {
            let _g = l3.lock(5, 6, LockMode::Shared).await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!x.is_finished());
        assert!(!s.is_finished());
        drop(a);
        x.await.expect("exclusive completes");
        s.await.expect("shared completes");
        assert!(l.is_empty());
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_no_entry() {
        let l = RangeLock::new();
        let a = l.lock(0, 10, LockMode::Exclusive).await;
        let r = tokio::time::timeout(Duration::from_millis(10), l.lock(0, 1, LockMode::Shared));
        assert!(r.await.is_err());
        drop(a);
        assert!(l.is_empty());
    }
}
