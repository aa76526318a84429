//! Request accounting: per-backend counters, readable at any time without a lock.
//!
//! Each counter is a relaxed atomic; a snapshot is therefore not a consistent cut across
//! counters, which is what metrics scrapers expect anyway. `in_flight` is kept by an RAII guard so
//! a cancelled request is still accounted as finished.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of request the block layer accounts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`crate::Backend::read`].
    Read,
    /// [`crate::Backend::write`].
    Write,
    /// [`crate::Backend::flush`].
    Flush,
    /// [`crate::Backend::discard`].
    Discard,
    /// [`crate::Backend::write_zeroes`].
    WriteZeroes,
    /// [`crate::Backend::write_same`].
    WriteSame,
    /// [`crate::Backend::compare_and_write`].
    CompareAndWrite,
    /// [`crate::Backend::block_status`].
    BlockStatus,
    /// [`crate::Backend::or_write`].
    OrWrite,
}

const KINDS: usize = 9;

impl OpKind {
    /// Every kind, in the order of [`StatsSnapshot::ops`].
    pub const ALL: [OpKind; KINDS] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::WriteSame,
        OpKind::CompareAndWrite,
        OpKind::BlockStatus,
        OpKind::OrWrite,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// A short lower-case name, e.g. for a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::WriteSame => "write_same",
            OpKind::CompareAndWrite => "compare_and_write",
            OpKind::BlockStatus => "block_status",
            OpKind::OrWrite => "or_write",
        }
    }
}

/// Live counters of one backend.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    ops: [AtomicU64; KINDS],
    errors: [AtomicU64; KINDS],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    miscompares: AtomicU64,
    in_flight: AtomicU64,
}

/// A copy of a backend's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Requests started, per [`OpKind`] (indexed as [`OpKind::ALL`]).
    pub ops: [u64; KINDS],
    /// Requests that ended in an error, per [`OpKind`] (a miscompare is not an error).
    pub errors: [u64; KINDS],
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes, write same and compare-and-write (not zeroing or
    /// discard).
    pub bytes_written: u64,
    /// Compare-and-write requests that found different data.
    pub miscompares: u64,
    /// Requests started and not yet finished.
    pub in_flight: u64,
}

impl StatsSnapshot {
    /// Requests started of one kind.
    pub fn ops_of(&self, kind: OpKind) -> u64 {
        self.ops.get(kind.index()).copied().unwrap_or(0)
    }

    /// Failed requests of one kind.
    pub fn errors_of(&self, kind: OpKind) -> u64 {
        self.errors.get(kind.index()).copied().unwrap_or(0)
    }
}

pub(crate) struct InFlight<'a> {
    stats: &'a Stats,
    kind: OpKind,
}

impl Stats {
    pub(crate) fn start(&self, kind: OpKind) -> InFlight<'_> {
        if let Some(c) = self.ops.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats: self, kind }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            ops: self.ops.each_ref().map(load),
            errors: self.errors.each_ref().map(load),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            miscompares: load(&self.miscompares),
            in_flight: load(&self.in_flight),
        }
    }
}

impl InFlight<'_> {
    /// Account the outcome of the request; `bytes` is what it read or wrote on success.
    pub(crate) fn finish<T>(
        self,
        r: Result<T, crate::BlockError>,
        bytes: u64,
    ) -> Result<T, crate::BlockError> {
        let s = self.stats;
        match &r {
            Ok(_) => match self.kind {
                OpKind::Read => {
                    s.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                }
                OpKind::Write | OpKind::WriteSame | OpKind::CompareAndWrite | OpKind::OrWrite => {
                    s.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                }
                OpKind::Flush | OpKind::Discard | OpKind::WriteZeroes | OpKind::BlockStatus => {}
            },
            Err(crate::BlockError::Miscompare { .. }) => {
                s.miscompares.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                if let Some(c) = s.errors.get(self.kind.index()) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
