//! [`Backend`]: the block-layer API the SCSI layer calls, in logical blocks, and the I/O path
//! under it (DESIGN.md §2, "block I/O path").
//!
//! Every request goes through the same steps:
//! 1. **Bounds and shape.** `lba + blocks` is computed with checked arithmetic and compared with
//!    the capacity; data buffers must be a whole number of logical blocks. Nothing that comes from
//!    the wire can make this layer panic or overflow.
//! 2. **Range lock.** Every request that writes (write, write same, write zeroes, discard) holds a
//!    *shared* lock over its byte range for the duration of the driver I/O; COMPARE AND WRITE
//!    holds an *exclusive* one (see [`crate::range_lock`]). That makes the emulated
//!    read-compare-write one atomic step against every overlapping write, for any length up to
//!    [`MAX_COMPARE_AND_WRITE_BLOCKS`]. Reads take no lock.
//! 3. **Emulation** of what the driver lacks: compare-and-write by read-compare-write under the
//!    exclusive lock; write same by writing the pattern in chunks of at most
//!    [`WRITE_SAME_CHUNK`] bytes (never the whole range at once); write zeroes with unmap by the
//!    driver's discard when discarded blocks read as zeros.
//! 4. **Accounting** (see [`crate::stats`]): operations, bytes, errors, miscompares and requests in
//!    flight, per backend, readable with [`Backend::stats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::range_lock::{LockMode, RangeLock};
use crate::reservation::{MemoryStore, ReservationStore};
use crate::stats::{OpKind, Stats, StatsSnapshot};
use crate::{BlockError, Driver, DriverInfo, Extent, IoBuf};

/// The largest COMPARE AND WRITE the block layer emulates, in logical blocks. SBC-4 6.6.5: the
/// MAXIMUM COMPARE AND WRITE LENGTH field of the Block Limits VPD page is one byte.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 255;

/// The largest read the block layer performs in one request (32 MiB): the buffer is allocated
/// up front, so a huge transfer length from the wire must not reach the allocator. The SCSI layer
/// advertises at most this as the MAXIMUM TRANSFER LENGTH (SBC-4 6.6.5) and rejects longer
/// transfers itself; a longer read here is `BadBufferLength`.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

/// The most bytes write same puts in one driver write (1 MiB).
pub const WRITE_SAME_CHUNK: usize = 1 << 20;

/// What the SCSI layer may advertise for this backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// UNMAP / WRITE SAME with UNMAP deallocate.
    pub thin: bool,
    /// Deallocated blocks read as zeros (LBPRZ).
    pub unmapped_reads_zero: bool,
    /// Largest COMPARE AND WRITE, in logical blocks, that is atomic.
    pub max_compare_and_write_blocks: u32,
}

/// A block device as the SCSI layer sees it: a driver plus the I/O path.
///
/// A caller runs each operation's future to its end. A write-type operation dropped midway
/// would release its range lock while its driver I/O (an io_uring slot, a job on the
/// blocking pool) carries on, and could land after an overlapping COMPARE AND WRITE had
/// compared. The SCSI layer never drops one: task management waits for running tasks. The
/// one exception is a bug: a command whose future panicked is answered INTERNAL TARGET
/// FAILURE and its future dropped, and a driver I/O it had in flight may land after that.
pub struct Backend {
    driver: Arc<dyn Driver>,
    info: DriverInfo,
    block_size: u32,
    /// Logical blocks: at open, then as [`Backend::refresh_capacity`] finds the device grown.
    capacity: AtomicU64,
    /// Held by a rescan ([`Backend::refresh_capacity`]) throughout.
    rescan: tokio::sync::Mutex<()>,
    locks: RangeLock,
    stats: Stats,
    reservations: Arc<dyn ReservationStore>,
}

impl Backend {
    /// Wrap `driver` with logical blocks of `block_size` bytes (512 or 4096). The reservation
    /// store is the driver's, or a fresh [`MemoryStore`] when it has none.
    pub fn new(driver: Arc<dyn Driver>, block_size: u32) -> Result<Self, BlockError> {
        if !(block_size == 512 || block_size == 4096) {
            return Err(BlockError::Open(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("Logical block size {block_size} is not 512 or 4096"),
            )));
        }
        let align = driver.io_alignment();
        if align > 1 && u64::from(block_size) % align != 0 {
            return Err(BlockError::Open(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "Logical block size {block_size} is not a multiple of the {align} bytes \
                     the image's I/O must be aligned to (direct I/O on this device)"
                ),
            )));
        }
        let info = driver.info();
        let capacity = info.size / u64::from(block_size);
        let reservations = driver
            .reservation_store()
            .unwrap_or_else(|| Arc::new(MemoryStore::without_aptpl()));
        Ok(Self {
            driver,
            info,
            block_size,
            capacity: AtomicU64::new(capacity),
            rescan: tokio::sync::Mutex::new(()),
            locks: RangeLock::new(),
            stats: Stats::default(),
            reservations,
        })
    }

    /// Bytes per logical block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of logical blocks.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Ask the driver for the device's size again (it was grown underneath: a resized image
    /// file or block device) and serve the new number of logical blocks from now on. Returns the
    /// capacity before and after; a device that shrank is an error and changes nothing.
    pub async fn refresh_capacity(&self) -> Result<(u64, u64), BlockError> {
        // One at a time, from the driver's look to the new capacity: two at once could
        // otherwise see the older look lose to the newer and call it a shrink, in the driver
        // (which stores its size) or here. The drivers rely on it (see Driver::refresh_size).
        let _one_at_a_time = self.rescan.lock().await;
        let size = self.driver.refresh_size().await?;
        let now = size / u64::from(self.block_size);
        let before = self.capacity.fetch_max(now, Ordering::AcqRel);
        if now < before {
            return Err(BlockError::Open(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the device shrank from {before} to {now} blocks; only growing is served"),
            )));
        }
        Ok((before, now))
    }

    /// What the driver reported at open time.
    pub fn driver_info(&self) -> DriverInfo {
        self.info
    }

    /// What may be advertised.
    pub fn capabilities(&self) -> Capabilities {
        let info = self.info;
        Capabilities {
            thin: info.discard,
            unmapped_reads_zero: info.discard && info.discard_zeroes,
            max_compare_and_write_blocks: self.max_compare_and_write_blocks(),
        }
    }

    /// The driver's allocation unit in logical blocks (at least 1): discards of whole, aligned
    /// units deallocate; smaller ones only zero. For OPTIMAL UNMAP GRANULARITY (SBC-4 6.6.5).
    pub fn unmap_granularity_blocks(&self) -> u32 {
        let unit = self.driver.allocation_unit() / u64::from(self.block_size);
        u32::try_from(unit).unwrap_or(u32::MAX).max(1)
    }

    /// Where this LU's persistent reservation state is kept (DESIGN.md §4).
    pub fn reservations(&self) -> &Arc<dyn ReservationStore> {
        &self.reservations
    }

    /// A copy of the request counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn max_compare_and_write_blocks(&self) -> u32 {
        match self.info.native_compare_and_write {
            0 => MAX_COMPARE_AND_WRITE_BLOCKS,
            n => (n / self.block_size).min(MAX_COMPARE_AND_WRITE_BLOCKS),
        }
    }

    /// Byte offset and length of `blocks` blocks at `lba`, checked against the capacity. As
    /// `capacity * block_size <= driver size`, `offset + length` cannot overflow afterwards.
    fn range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), BlockError> {
        let out = || BlockError::OutOfRange {
            lba,
            blocks,
            capacity: self.capacity(),
        };
        let end = lba.checked_add(blocks).ok_or_else(out)?;
        if end > self.capacity() {
            return Err(out());
        }
        let bs = u64::from(self.block_size);
        let off = lba.checked_mul(bs).ok_or_else(out)?;
        let len = blocks.checked_mul(bs).ok_or_else(out)?;
        Ok((off, len))
    }

    /// Read `blocks` logical blocks at `lba`.
    pub async fn read(&self, lba: u64, blocks: u32) -> Result<Vec<u8>, BlockError> {
        let op = self.stats.start(OpKind::Read);
        let r = self.do_read(lba, blocks).await;
        let n = r.as_ref().map_or(0, |d| d.len() as u64);
        op.finish(r, n)
    }

    async fn do_read(&self, lba: u64, blocks: u32) -> Result<Vec<u8>, BlockError> {
        let (off, len) = self.range(lba, u64::from(blocks))?;
        let len = usize::try_from(len).map_err(|_| BlockError::OutOfRange {
            lba,
            blocks: u64::from(blocks),
            capacity: self.capacity(),
        })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        check_transfer(len as u64)?;
        let data = self.driver.read(off, len).await?;
        check_read_len(&data, len)?;
        Ok(data)
    }

    /// Read `buf.len()` bytes (a whole number of blocks) at `lba` straight into `buf`, memory a
    /// frontend lent (see [`IoBuf`]).
    pub async fn read_into(&self, lba: u64, buf: IoBuf) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::Read);
        let n = buf.len() as u64;
        let r = self.do_read_into(lba, buf).await;
        op.finish(r, n)
    }

    async fn do_read_into(&self, lba: u64, buf: IoBuf) -> Result<(), BlockError> {
        let blocks = self.whole_blocks(buf.len())?;
        let (off, len) = self.range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        check_transfer(len)?;
        self.driver.read_into(off, buf).await
    }

    /// Write `data` (a whole number of blocks; a vector, or memory a frontend lent) at `lba`;
    /// `fua` makes it stable before returning.
    pub async fn write(
        &self,
        lba: u64,
        data: impl Into<IoBuf>,
        fua: bool,
    ) -> Result<(), BlockError> {
        let data = data.into();
        let op = self.stats.start(OpKind::Write);
        let n = data.len() as u64;
        let r = self.do_write(lba, data, fua).await;
        op.finish(r, n)
    }

    async fn do_write(&self, lba: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        let blocks = self.whole_blocks(data.len())?;
        let (off, len) = self.range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        let end = off.checked_add(len).ok_or(BlockError::OutOfRange {
            lba,
            blocks,
            capacity: self.capacity(),
        })?;
        let _g = self.locks.lock(off, end, LockMode::Shared).await;
        self.driver.write_from(off, data, fua).await
    }

    /// Make every completed write stable.
    pub async fn flush(&self) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::Flush);
        op.finish(self.driver.flush().await, 0)
    }

    /// Deallocate `blocks` at `lba` (UNMAP). A no-op success on drivers without holes is not
    /// allowed: callers check [`Capabilities::thin`] first.
    pub async fn discard(&self, lba: u64, blocks: u64) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::Discard);
        let r = self.do_discard(lba, blocks).await;
        op.finish(r, 0)
    }

    async fn do_discard(&self, lba: u64, blocks: u64) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        if !self.info.discard {
            return Err(BlockError::Unsupported);
        }
        if len == 0 {
            return Ok(());
        }
        let _g = self.locks.lock(off, off + len, LockMode::Shared).await;
        self.driver.discard(off, len).await
    }

    /// Make `blocks` at `lba` read as zeros; `unmap` allows deallocation.
    pub async fn write_zeroes(&self, lba: u64, blocks: u64, unmap: bool) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::WriteZeroes);
        let r = self.do_write_zeroes(lba, blocks, unmap).await;
        op.finish(r, 0)
    }

    async fn do_write_zeroes(&self, lba: u64, blocks: u64, unmap: bool) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.locks.lock(off, off + len, LockMode::Shared).await;
        self.zero_range(off, len, unmap).await
    }

    /// Zero `[off, off + len)`; the caller holds the range lock.
    async fn zero_range(&self, off: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        if unmap && self.info.discard && self.info.discard_zeroes {
            match self.driver.discard(off, len).await {
                Err(BlockError::Unsupported) => {}
                r => return r,
            }
        }
        self.driver.write_zeroes(off, len, unmap).await
    }

    /// Write the one-block `pattern` to each of `blocks` blocks at `lba`.
    pub async fn write_same(
        &self,
        lba: u64,
        blocks: u64,
        pattern: Vec<u8>,
    ) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::WriteSame);
        let r = self.do_write_same(lba, blocks, pattern).await;
        let n = if r.is_ok() {
            blocks.saturating_mul(u64::from(self.block_size))
        } else {
            0
        };
        op.finish(r, n)
    }

    async fn do_write_same(
        &self,
        lba: u64,
        blocks: u64,
        pattern: Vec<u8>,
    ) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        let bs = self.block_size as usize;
        if pattern.len() != bs {
            return Err(BlockError::BadBufferLength {
                expected: u64::from(self.block_size),
                got: pattern.len() as u64,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let _g = self.locks.lock(off, end, LockMode::Shared).await;
        if pattern.iter().all(|&b| b == 0) {
            return self.zero_range(off, len, false).await;
        }
        // One chunk of the pattern repeated, built once and copied per driver write: memory
        // stays at two chunks whatever the length of the range.
        let chunk_blocks = (WRITE_SAME_CHUNK / bs).max(1) as u64;
        let first = blocks.min(chunk_blocks) as usize;
        let chunk = pattern.repeat(first);
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(chunk.len() as u64) as usize;
            let data = chunk.get(..n).unwrap_or(&chunk).to_vec();
            self.driver.write(pos, data, false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Atomically compare the blocks at `lba` with `compare` and, when equal, write `write`.
    ///
    /// On a difference nothing is written and the result is
    /// `Err(BlockError::Miscompare { offset })` with the byte offset of the first difference
    /// (SBC-4 5.3: reported in the INFORMATION field). Atomic against every other write through
    /// this backend to an overlapping range, for up to
    /// [`Capabilities::max_compare_and_write_blocks`] blocks.
    pub async fn compare_and_write(
        &self,
        lba: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
        fua: bool,
    ) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::CompareAndWrite);
        let n = write.len() as u64;
        let r = self.do_compare_and_write(lba, compare, write, fua).await;
        op.finish(r, n)
    }

    /// Atomically OR `data` into the blocks at `lba` (SBC-4 ORWRITE(16)): read, OR, write under
    /// an exclusive range lock, so no other write to an overlapping range lands in between.
    pub async fn or_write(&self, lba: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let op = self.stats.start(OpKind::OrWrite);
        let n = data.len() as u64;
        let r = self.do_or_write(lba, data, fua).await;
        op.finish(r, n)
    }

    async fn do_or_write(&self, lba: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let blocks = self.whole_blocks(data.len())?;
        check_transfer(data.len() as u64)?;
        let (off, len) = self.range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.locks.lock(off, off + len, LockMode::Exclusive).await;
        let mut current = self.driver.read(off, data.len()).await?;
        check_read_len(&current, data.len())?;
        for (c, d) in current.iter_mut().zip(&data) {
            *c |= d;
        }
        self.driver.write(off, current, fua).await
    }

    async fn do_compare_and_write(
        &self,
        lba: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
        fua: bool,
    ) -> Result<(), BlockError> {
        if compare.len() != write.len() {
            return Err(BlockError::BadBufferLength {
                expected: compare.len() as u64,
                got: write.len() as u64,
            });
        }
        let blocks = self.whole_blocks(compare.len())?;
        let max = self.max_compare_and_write_blocks();
        if blocks > u64::from(max) {
            return Err(BlockError::BadBufferLength {
                expected: u64::from(max) * u64::from(self.block_size),
                got: compare.len() as u64,
            });
        }
        let (off, len) = self.range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        // Exclusive for a native one too: OR WRITE is emulated here, read then write under
        // the same lock, and must not interleave with it.
        let _g = self.locks.lock(off, off + len, LockMode::Exclusive).await;
        if self.info.native_compare_and_write != 0 {
            return self
                .driver
                .compare_and_write(off, compare, write, fua)
                .await;
        }
        let current = self.driver.read(off, compare.len()).await?;
        check_read_len(&current, compare.len())?;
        if let Some(i) = current.iter().zip(&compare).position(|(a, b)| a != b) {
            return Err(BlockError::Miscompare { offset: i as u64 });
        }
        self.driver.write(off, write, fua).await
    }

    /// The mapped/deallocated extent starting at `lba`, in blocks: `(blocks, mapped)`.
    ///
    /// `blocks` is at least 1. A driver extent that ends inside a block is rounded so that a
    /// block is never reported deallocated while part of it is mapped.
    pub async fn block_status(&self, lba: u64) -> Result<(u64, bool), BlockError> {
        let op = self.stats.start(OpKind::BlockStatus);
        let r = self.do_block_status(lba).await;
        op.finish(r, 0)
    }

    async fn do_block_status(&self, lba: u64) -> Result<(u64, bool), BlockError> {
        let remaining = self.capacity().saturating_sub(lba);
        if remaining == 0 {
            return Err(BlockError::OutOfRange {
                lba,
                blocks: 1,
                capacity: self.capacity(),
            });
        }
        let (off, len) = self.range(lba, remaining)?;
        let Extent { len: got, mapped } = self.driver.block_status(off, len).await?;
        let bs = u64::from(self.block_size);
        let got = got.min(len);
        let blocks = if mapped { got.div_ceil(bs) } else { got / bs };
        if blocks == 0 {
            // A hole shorter than one block, or a driver that answered nothing: the block is
            // (partly) mapped.
            return Ok((1, true));
        }
        Ok((blocks.min(remaining), mapped))
    }

    fn whole_blocks(&self, bytes: usize) -> Result<u64, BlockError> {
        let bs = self.block_size as usize;
        if bytes.checked_rem(bs) != Some(0) {
            return Err(BlockError::BadBufferLength {
                expected: (bytes / bs * bs) as u64,
                got: bytes as u64,
            });
        }
        Ok((bytes / bs) as u64)
    }
}

/// A transfer the block layer buffers or hands to the driver in one request may be at most
/// [`MAX_TRANSFER_BYTES`] long.
fn check_transfer(len: u64) -> Result<(), BlockError> {
    if len > u64::from(MAX_TRANSFER_BYTES) {
        return Err(BlockError::BadBufferLength {
            expected: u64::from(MAX_TRANSFER_BYTES),
            got: len,
        });
    }
    Ok(())
}

/// A driver that returns fewer bytes than asked has failed; never pass short data up.
fn check_read_len(data: &[u8], len: usize) -> Result<(), BlockError> {
    if data.len() != len {
        return Err(BlockError::ReadFailed(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "Driver returned {} bytes where {len} were asked",
                data.len()
            ),
        )));
    }
    Ok(())
}
