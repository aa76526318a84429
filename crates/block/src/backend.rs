//! [`Backend`]: the block-layer API the SCSI layer calls, in logical blocks.

use std::sync::Arc;

use crate::{BlockError, Driver, Extent};

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
pub struct Backend {
    driver: Arc<dyn Driver>,
    block_size: u32,
    capacity: u64,
}

impl Backend {
    /// Wrap `driver` with logical blocks of `block_size` bytes (512 or 4096).
    pub fn new(driver: Arc<dyn Driver>, block_size: u32) -> Result<Self, BlockError> {
        if !(block_size == 512 || block_size == 4096) {
            return Err(BlockError::Open(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("Logical block size {block_size} is not 512 or 4096"),
            )));
        }
        let capacity = driver.info().size / u64::from(block_size);
        Ok(Self {
            driver,
            block_size,
            capacity,
        })
    }

    /// Bytes per logical block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of logical blocks.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// What may be advertised.
    pub fn capabilities(&self) -> Capabilities {
        let info = self.driver.info();
        Capabilities {
            thin: info.discard,
            unmapped_reads_zero: info.discard && info.discard_zeroes,
            max_compare_and_write_blocks: 255,
        }
    }

    fn range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), BlockError> {
        let out = || BlockError::OutOfRange {
            lba,
            blocks,
            capacity: self.capacity,
        };
        let end = lba.checked_add(blocks).ok_or_else(out)?;
        if end > self.capacity {
            return Err(out());
        }
        let bs = u64::from(self.block_size);
        Ok((lba * bs, blocks * bs))
    }

    /// Read `blocks` logical blocks at `lba`.
    pub async fn read(&self, lba: u64, blocks: u32) -> Result<Vec<u8>, BlockError> {
        let (off, len) = self.range(lba, u64::from(blocks))?;
        let len = usize::try_from(len).map_err(|_| BlockError::OutOfRange {
            lba,
            blocks: u64::from(blocks),
            capacity: self.capacity,
        })?;
        self.driver.read(off, len).await
    }

    /// Write `data` (a whole number of blocks) at `lba`; `fua` makes it stable before returning.
    pub async fn write(&self, lba: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let blocks = self.whole_blocks(data.len())?;
        let (off, _) = self.range(lba, blocks)?;
        self.driver.write(off, data, fua).await
    }

    /// Make every completed write stable.
    pub async fn flush(&self) -> Result<(), BlockError> {
        self.driver.flush().await
    }

    /// Deallocate `blocks` at `lba` (UNMAP). A no-op success on drivers without holes is not
    /// allowed: callers check [`Capabilities::thin`] first.
    pub async fn discard(&self, lba: u64, blocks: u64) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        if !self.driver.info().discard {
            return Err(BlockError::Unsupported);
        }
        self.driver.discard(off, len).await
    }

    /// Make `blocks` at `lba` read as zeros; `unmap` allows deallocation.
    pub async fn write_zeroes(&self, lba: u64, blocks: u64, unmap: bool) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        self.driver.write_zeroes(off, len, unmap).await
    }

    /// Write the one-block `pattern` to each of `blocks` blocks at `lba`.
    pub async fn write_same(
        &self,
        lba: u64,
        blocks: u64,
        pattern: Vec<u8>,
    ) -> Result<(), BlockError> {
        let (off, len) = self.range(lba, blocks)?;
        if pattern.len() != self.block_size as usize {
            return Err(BlockError::BadBufferLength {
                expected: u64::from(self.block_size),
                got: pattern.len() as u64,
            });
        }
        let mut data = Vec::with_capacity(len as usize);
        for _ in 0..blocks {
            data.extend_from_slice(&pattern);
        }
        self.driver.write(off, data, false).await
    }

    /// Atomically compare the blocks at `lba` with `compare` and, when equal, write `write`.
    pub async fn compare_and_write(
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
        let (off, len) = self.range(lba, blocks)?;
        // NOTE: not yet atomic against other writers; the range lock comes with the I/O path.
        let current = self.driver.read(off, len as usize).await?;
        if let Some(i) = current.iter().zip(&compare).position(|(a, b)| a != b) {
            return Err(BlockError::Miscompare { offset: i as u64 });
        }
        self.driver.write(off, write, fua).await
    }

    /// The mapped/deallocated extent starting at `lba`, in blocks: `(blocks, mapped)`.
    pub async fn block_status(&self, lba: u64) -> Result<(u64, bool), BlockError> {
        let (off, len) = self.range(lba, self.capacity.saturating_sub(lba))?;
        let Extent { len, mapped } = self.driver.block_status(off, len).await?;
        Ok((len / u64::from(self.block_size), mapped))
    }

    fn whole_blocks(&self, bytes: usize) -> Result<u64, BlockError> {
        let bs = self.block_size as usize;
        if bytes % bs != 0 {
            return Err(BlockError::BadBufferLength {
                expected: (bytes / bs * bs) as u64,
                got: bytes as u64,
            });
        }
        Ok((bytes / bs) as u64)
    }
}
