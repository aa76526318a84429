//! Which syncs of one image may report success.
//!
//! Linux records a failed writeback in the file's mapping and reports it to the next sync
//! (`fdatasync` of the file or of a range of it) of each open file description, once; the image has
//! one. So of two syncs that run at the same time, one may take the error and the other return
//! 0 although the data it was to cover is lost, and a sync after the error returns 0 as well.
//! [`SyncLatch`] keeps both from being reported as success: a failed sync latches, every sync
//! that starts after that fails at once, and a sync whose system call succeeded reports success
//! only after every sync started before it returned has ended without failing.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

/// The syncs of one image in flight, and whether one has failed.
#[derive(Debug, Default)]
pub(crate) struct SyncLatch {
    state: Mutex<State>,
    ended: Notify,
}

#[derive(Debug, Default)]
struct State {
    failed: bool,
    next: u64,
    running: BTreeSet<u64>,
}

/// One sync between [`SyncLatch::begin`] and [`Sync::end`]. Dropped without `end` (its caller
/// gave up waiting), its result is unknown and may have been an error: that latches.
#[derive(Debug)]
pub(crate) struct Sync<'a> {
    latch: &'a SyncLatch,
    id: u64,
    ended: bool,
}

fn latched() -> io::Error {
    io::Error::other("An earlier flush of this image failed; its data may not be on stable storage")
}

impl SyncLatch {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a sync has failed.
    pub(crate) fn failed(&self) -> bool {
        self.lock().failed
    }

    /// An error when a sync has failed.
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.failed() {
            return Err(latched());
        }
        Ok(())
    }

    /// Start a sync; an error when one has failed already.
    pub(crate) fn begin(&self) -> io::Result<Sync<'_>> {
        let mut st = self.lock();
        if st.failed {
            return Err(latched());
        }
        let id = st.next;
        st.next += 1;
        st.running.insert(id);
        Ok(Sync {
            latch: self,
            id,
            ended: false,
        })
    }

    fn finish(&self, id: u64, failed: bool) -> u64 {
        let next = {
            let mut st = self.lock();
            st.running.remove(&id);
            st.failed |= failed;
            st.next
        };
        self.ended.notify_waiters();
        next
    }
}

impl Sync<'_> {
    /// The sync's system call returned `r`. An error is latched and returned. A success is
    /// returned once every sync started before now has ended, if none of them failed.
    pub(crate) async fn end(mut self, r: io::Result<()>) -> io::Result<()> {
        self.ended = true;
        let upto = self.latch.finish(self.id, r.is_err());
        if let Err(e) = r {
            tracing::error!(error = %e, "sync failed; every later flush of this image fails");
            return Err(e);
        }
        loop {
            let notified = self.latch.ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.latch.lock();
                if st.failed {
                    return Err(latched());
                }
                if st.running.first().is_none_or(|&first| first >= upto) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

impl Drop for Sync<'_> {
    fn drop(&mut self) {
        if !self.ended {
            tracing::error!("a sync was abandoned before its result was known; every later flush of this image fails");
            self.latch.finish(self.id, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn eio() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    fn poll<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_sync_that_succeeded_while_another_failed_fails_too() {
        let l = SyncLatch::default();
        let a = l.begin().expect("begin a");
        let b = l.begin().expect("begin b");
        // a's fdatasync returned 0 and b's took the writeback error: a waits for b.
        let mut a_end = pin!(a.end(Ok(())));
        assert!(
            poll(a_end.as_mut()).is_pending(),
            "a waits for b, which overlapped it"
        );
        let mut b_end = pin!(b.end(eio()));
        assert!(matches!(poll(b_end.as_mut()), Poll::Ready(Err(_))));
        assert!(
            matches!(poll(a_end.as_mut()), Poll::Ready(Err(_))),
            "a covered data whose loss b was told of"
        );
        assert!(l.failed());
        assert!(l.begin().is_err(), "every later sync fails at once");
    }

    #[test]
    fn syncs_that_overlap_only_successes_succeed() {
        let l = SyncLatch::default();
        let a = l.begin().expect("begin a");
        let b = l.begin().expect("begin b");
        let mut a_end = pin!(a.end(Ok(())));
        assert!(poll(a_end.as_mut()).is_pending());
        // c starts after a returned and before b did: a does not wait for it, b does.
        let c = l.begin().expect("begin c");
        let mut b_end = pin!(b.end(Ok(())));
        assert!(poll(b_end.as_mut()).is_pending(), "b waits for c");
        assert!(matches!(poll(a_end.as_mut()), Poll::Ready(Ok(()))));
        let mut c_end = pin!(c.end(Ok(())));
        assert!(matches!(poll(c_end.as_mut()), Poll::Ready(Ok(()))));
        assert!(matches!(poll(b_end.as_mut()), Poll::Ready(Ok(()))));
        assert!(!l.failed());
    }

    #[test]
    fn an_abandoned_sync_latches() {
        let l = SyncLatch::default();
        let a = l.begin().expect("begin a");
        let b = l.begin().expect("begin b");
        let mut b_end = pin!(b.end(Ok(())));
        assert!(poll(b_end.as_mut()).is_pending());
        drop(a);
        assert!(
            matches!(poll(b_end.as_mut()), Poll::Ready(Err(_))),
            "a may have taken the error"
        );
        assert!(l.begin().is_err());
    }
}
