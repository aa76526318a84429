//! The sharedisk block layer.
//!
//! Three parts, as in DESIGN.md §2:
//! - [`Driver`]: where the bytes live (`driver::mem`, `driver::file`; `rbd` later). Byte offsets,
//!   no knowledge of SCSI.
//! - [`Backend`]: the API the SCSI layer calls, in logical blocks. It owns bounds checks, range
//!   locks that make compare-and-write atomic against other writes, and emulation of what a
//!   driver lacks (compare-and-write by read-compare-write under a range lock, write zeroes by
//!   writing zero buffers).
//! - [`ReservationStore`]: where a logical unit's persistent reservation state lives, owned by the
//!   driver ([`Driver::reservation_store`]), a [`MemoryStore`] when the driver has none.
//! - Request accounting ([`StatsSnapshot`], from [`Backend::stats`]) for the daemon's metrics.
//! - [`IoBuf`]: the memory of one read or write, the block layer's own or lent by a frontend
//!   (guest memory), so that data need not be copied on its way to the driver.
//! - [`BlockError`]: what can go wrong below the SCSI layer. The SCSI layer maps every variant to
//!   a status and sense data; none of them is ever reported as GOOD.

mod backend;
mod buf;
pub mod driver;
pub mod range_lock;
pub mod reservation;
pub mod stats;

pub use backend::{
    Backend, Capabilities, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, WRITE_SAME_CHUNK,
};
pub use buf::IoBuf;
pub use reservation::{MemoryStore, ReservationStore, Stored};
pub use stats::{OpKind, StatsSnapshot};

use std::sync::Arc;

use async_trait::async_trait;

thread_local! {
    static IO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is, for now, a frontend's I/O thread (see [`IoThreadScope`]).
pub fn on_io_thread() -> bool {
    IO_THREAD.with(std::cell::Cell::get)
}

/// For a synchronous stretch of code, say whether the thread counts as a frontend's own I/O
/// thread: one that drives its requests itself (polling them in place) and would rather a
/// driver did short blocking work on it, such as a write into the page cache, than hand the
/// work to other threads and wait for it there. The previous setting comes back when the scope
/// is dropped. The vhost-user request queue threads say so while they handle their queues'
/// events; the iSCSI connection reader, a task on the runtime, while it polls a command it has
/// just received (the commands behind it wait for the reader either way). The runtime's
/// workers otherwise are not I/O threads.
pub struct IoThreadScope {
    before: bool,
}

impl IoThreadScope {
    /// Enter the scope; `io_thread` is what [`on_io_thread`] says until it is dropped.
    pub fn enter(io_thread: bool) -> Self {
        let before = IO_THREAD.with(|c| c.replace(io_thread));
        Self { before }
    }
}

impl Drop for IoThreadScope {
    fn drop(&mut self) {
        IO_THREAD.with(|c| c.set(self.before));
    }
}

/// Everything that can fail in the block layer or a driver.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the last logical block.
    #[error("Access beyond the end of the device: block {lba} + {blocks} > {capacity}")]
    OutOfRange {
        lba: u64,
        blocks: u64,
        capacity: u64,
    },
    /// A buffer whose length is not what the request needs.
    #[error("Buffer of {got} bytes where {expected} were needed")]
    BadBufferLength { expected: u64, got: u64 },
    /// Compare-and-write found different data; `offset` is the byte offset of the first
    /// difference from the start of the compared range.
    #[error("Compare failed at byte {offset}")]
    Miscompare { offset: u64 },
    /// The driver cannot do this operation (e.g. discard on a driver without holes).
    #[error("Operation not supported by the driver")]
    Unsupported,
    /// The backing store is full (thin provisioning ran out of space).
    #[error("No space left on the backing store")]
    NoSpace,
    /// A read from the backing store failed.
    #[error("Read from the backing store failed")]
    ReadFailed(#[source] std::io::Error),
    /// A write (or flush, discard, zeroing) to the backing store failed.
    #[error("Write to the backing store failed")]
    WriteFailed(#[source] std::io::Error),
    /// The driver could not be opened or configured.
    #[error("Cannot open the backing store")]
    Open(#[source] std::io::Error),
}

/// What a driver can do, reported once at open time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverInfo {
    /// Size of the device in bytes.
    pub size: u64,
    /// `discard` deallocates (punches holes).
    pub discard: bool,
    /// Deallocated ranges read back as zeros.
    pub discard_zeroes: bool,
    /// The largest native atomic compare-and-write, in bytes; 0 when the driver has none and the
    /// block layer must emulate it under a range lock.
    pub native_compare_and_write: u32,
}

/// One extent as reported by [`Driver::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes starting at the queried offset.
    pub len: u64,
    /// `true` when the range is allocated (mapped); `false` when deallocated (a hole).
    pub mapped: bool,
}

/// A block driver: byte-addressed storage. Offsets and lengths are already checked against the
/// device size and aligned to the logical block size by [`Backend`].
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Static facts about the device.
    fn info(&self) -> DriverInfo;
    /// The alignment, in bytes, every request's offset and length must have (direct I/O needs
    /// the device's); [`Backend::new`] refuses a logical block size it does not divide.
    fn io_alignment(&self) -> u64 {
        1
    }
    /// The unit in which the driver allocates and deallocates, in bytes (a discard smaller
    /// than this, or not aligned to it, may leave the range mapped though it reads as zeros);
    /// 0 when unknown. The SCSI layer may advertise it as the OPTIMAL UNMAP GRANULARITY.
    fn allocation_unit(&self) -> u64 {
        0
    }
    /// Where this device keeps its persistent reservation state; `None` (the default) when it
    /// has nowhere to keep it, and [`Backend`] uses a fresh [`MemoryStore`] that refuses APTPL
    /// ([`MemoryStore::without_aptpl`]): a device whose data outlives the process must not
    /// accept reservations meant to persist through power loss that it then forgets.
    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        None
    }
    /// Look at the device's size again, after it was grown underneath: the size in bytes now,
    /// which [`Driver::info`] reports from then on. The default: the size never changes.
    /// [`Backend::refresh_capacity`] calls it one call at a time, so a driver need not guard
    /// against an older look being stored over a newer one.
    async fn refresh_size(&self) -> Result<u64, BlockError> {
        Ok(self.info().size)
    }
    /// Read `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError>;
    /// Write `data` at `offset`; with `fua` the data is on stable storage before this returns.
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError>;
    /// Read `buf.len()` bytes at `offset` straight into `buf` (memory a frontend may have lent:
    /// see [`IoBuf`]). Drivers that can do I/O into a caller's memory override this; the
    /// default reads into a buffer of its own and copies.
    async fn read_into(&self, offset: u64, mut buf: IoBuf) -> Result<(), BlockError> {
        let data = self.read(offset, buf.len()).await?;
        if data.len() != buf.len() {
            return Err(BlockError::BadBufferLength {
                expected: buf.len() as u64,
                got: data.len() as u64,
            });
        }
        buf.copy_from(0, &data);
        Ok(())
    }
    /// Write `data` (memory a frontend may have lent) at `offset`, as [`Driver::write`] does.
    /// The default copies it into a vector first.
    async fn write_from(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        self.write(offset, data.into_vec(), fua).await
    }
    /// Make every completed write stable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// Deallocate the range. Only called when [`DriverInfo::discard`] is true.
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Make the range read as zeros; with `unmap` the driver may deallocate it.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError>;
    /// The extent that starts at `offset`, at most `len` bytes long.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError>;
    /// Native atomic compare-and-write; only called when
    /// [`DriverInfo::native_compare_and_write`] is non-zero.
    async fn compare_and_write(
        &self,
        _offset: u64,
        _compare: Vec<u8>,
        _write: Vec<u8>,
        _fua: bool,
    ) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }
}
