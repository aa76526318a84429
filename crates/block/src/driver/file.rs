//! The file driver: a regular file (or block device) as the backing store.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{BlockError, Driver, DriverInfo, Extent};

/// A file-backed driver.
pub struct FileDriver {
    file: Arc<File>,
    size: u64,
}

impl FileDriver {
    /// Open `path`; when it does not exist and `create_size` is given, create a sparse file of
    /// that many bytes.
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Self, BlockError> {
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists && create_size.is_some())
            .truncate(false)
            .open(path)
            .map_err(BlockError::Open)?;
        if !exists {
            if let Some(size) = create_size {
                file.set_len(size).map_err(BlockError::Open)?;
            }
        }
        let size = file.metadata().map_err(BlockError::Open)?.len();
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

#[async_trait]
impl Driver for FileDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.size,
            discard: false,
            discard_zeroes: false,
            native_compare_and_write: 0,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
        .map_err(BlockError::ReadFailed)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let file = self.file.clone();
        blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(BlockError::WriteFailed)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let file = self.file.clone();
        blocking(move || file.sync_data())
            .await
            .map_err(BlockError::WriteFailed)
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        self.write(offset, vec![0; len as usize], false).await
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent, BlockError> {
        Ok(Extent { len, mapped: true })
    }
}
