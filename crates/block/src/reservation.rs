//! The reservation store: where a logical unit's persistent reservation state lives
//! (DESIGN.md §4, "storage of the state belongs to the driver").
//!
//! The SCSI layer owns the rules and serialises its state into opaque bytes; the block layer only
//! keeps those bytes with a version and swaps them atomically. A driver that can keep the state
//! somewhere better than process memory returns its store from
//! [`Driver::reservation_store`](crate::Driver::reservation_store); [`Backend`](crate::Backend)
//! falls back to a [`MemoryStore`] for the others.
//!
//! - [`MemoryStore`]: process memory only. Nothing survives a restart, with or without APTPL,
//!   which is true of the memory driver's data too.
//! - The file driver's store (`driver::sidecar`): APTPL state in a state file (by default a
//!   sidecar next to the image), written crash-safely; state without APTPL in memory. A block
//!   device has no default place for it: without a configured state file its store is a
//!   [`MemoryStore::without_aptpl`], and APTPL is refused.
//! - The RBD driver (DESIGN.md §5) will keep it in a RADOS object shared by many hosts; that is
//!   what [`ReservationStore::watch`] and [`ReservationStore::barrier`] are for. Both stores here
//!   serve a single holder: they never report changes and their barrier is immediate.

use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::BlockError;

/// A stored reservation state: opaque bytes (the SCSI layer serialises its state) and a version.
///
/// Version 0 with an empty state means nothing is stored yet. Every successful
/// [`ReservationStore::compare_and_swap`] increases the version by one; a state reloaded from
/// stable storage at open has version 1.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// The version of `state`, for [`ReservationStore::compare_and_swap`].
    pub version: u64,
    /// The serialised state, as the SCSI layer wrote it.
    pub state: Vec<u8>,
}

/// Where one logical unit's persistent reservation state is kept.
#[async_trait]
pub trait ReservationStore: Send + Sync + std::fmt::Debug {
    /// The current state and its version.
    async fn load(&self) -> Result<Stored, BlockError>;

    /// Replace the state if its version is still `expected`: `Ok(Ok(new_version))`, or
    /// `Ok(Err(current))` when another holder changed it first.
    ///
    /// `durable`: keep it across restarts (APTPL); when false, any state kept from before is
    /// removed from stable storage (state without APTPL does not survive a restart), and the new
    /// state lives in memory only. Returns only after a durable state is on stable storage.
    ///
    /// An `Err` leaves the previous state (and version) in force.
    async fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError>;

    /// Changes made by other holders (other processes/hosts serving the same image), newest first
    /// seen. Single-process stores never send: their receiver holds the state at open and never
    /// changes.
    fn watch(&self) -> watch::Receiver<Stored>;

    /// Resolves when every other holder of this LU has seen `version` and has no command in
    /// flight that it forbids. Trivial (immediate) for single-holder stores.
    async fn barrier(&self, version: u64) -> Result<(), BlockError>;

    /// Whether the state this store kept on stable storage was lost: `Some(why)` when it found
    /// a state there that it cannot read back (the file driver's sidecar failing its header,
    /// length or checksum check). [`ReservationStore::load`] then returns version 1 with no
    /// state, and the SCSI layer enters SPC-5's recoverable lost persistent reservation
    /// condition (5.13.5.3.2 of the draft at hand) until an application client replaces the
    /// state. `None` again after the first successful
    /// [`ReservationStore::compare_and_swap`]. Stores that cannot lose a state keep the
    /// default, `None`.
    fn lost(&self) -> Option<String> {
        None
    }

    /// Whether this store keeps a durable state across restarts as well as the LU's data
    /// (SPC-5 PTPL_C). `false`: the SCSI layer refuses APTPL (INVALID FIELD IN PARAMETER
    /// LIST) rather than accept a state it would lose while the data stays.
    fn keeps_aptpl(&self) -> bool {
        true
    }
}

/// The next version after `v`.
pub(crate) fn next_version(v: u64) -> Result<u64, BlockError> {
    v.checked_add(1).ok_or_else(|| {
        BlockError::WriteFailed(std::io::Error::other(
            "Reservation state version counter exhausted",
        ))
    })
}

/// A reservation store in process memory, for drivers that have nowhere better.
///
/// [`MemoryStore::new`] accepts `durable` with no stable storage to go to: its state never
/// survives a restart, and neither does the data of a driver that keeps its data in memory
/// (the memory driver). [`MemoryStore::without_aptpl`] is for a driver whose data does
/// survive: it refuses a durable compare-and-swap ([`ReservationStore::keeps_aptpl`] is
/// false), so APTPL is refused rather than silently lost. It has a single holder, so
/// [`ReservationStore::watch`] never changes and [`ReservationStore::barrier`] is immediate.
#[derive(Debug)]
pub struct MemoryStore {
    current: Mutex<Stored>,
    changes: watch::Sender<Stored>,
    aptpl: bool,
}

impl MemoryStore {
    /// An empty store (version 0, no state) that lives as long as the memory driver's data.
    pub fn new() -> Self {
        Self {
            current: Mutex::new(Stored::default()),
            changes: watch::Sender::new(Stored::default()),
            aptpl: true,
        }
    }

    /// An empty store for a driver whose data outlives the process: state without APTPL only.
    pub fn without_aptpl() -> Self {
        Self {
            aptpl: false,
            ..Self::new()
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ReservationStore for MemoryStore {
    async fn load(&self) -> Result<Stored, BlockError> {
        Ok(self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError> {
        if durable && !self.aptpl {
            return Err(BlockError::Unsupported);
        }
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.version != expected {
            return Ok(Err(cur.clone()));
        }
        let version = next_version(cur.version)?;
        *cur = Stored { version, state };
        Ok(Ok(version))
    }

    fn watch(&self) -> watch::Receiver<Stored> {
        self.changes.subscribe()
    }

    async fn barrier(&self, _version: u64) -> Result<(), BlockError> {
        Ok(())
    }

    fn keeps_aptpl(&self) -> bool {
        self.aptpl
    }
}
