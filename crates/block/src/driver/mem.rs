//! A memory-backed driver, for tests.

use std::sync::RwLock;

use async_trait::async_trait;

use crate::{BlockError, Driver, DriverInfo, Extent};

/// A RAM disk.
pub struct MemDriver {
    data: RwLock<Vec<u8>>,
}

impl MemDriver {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            data: RwLock::new(vec![0; size as usize]),
        }
    }
}

fn poisoned() -> BlockError {
    BlockError::ReadFailed(std::io::Error::other("Memory driver lock poisoned"))
}

#[async_trait]
impl Driver for MemDriver {
    fn info(&self) -> DriverInfo {
        let size = self.data.read().map(|d| d.len() as u64).unwrap_or(0);
        DriverInfo {
            size,
            discard: false,
            discard_zeroes: false,
            native_compare_and_write: 0,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let data = self.data.read().map_err(|_| poisoned())?;
        let start = offset as usize;
        Ok(data[start..start + len].to_vec())
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> Result<(), BlockError> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(&buf);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let start = offset as usize;
        data[start..start + len as usize].fill(0);
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent, BlockError> {
        Ok(Extent { len, mapped: true })
    }
}
