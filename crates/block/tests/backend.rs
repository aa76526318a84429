//! The I/O path against a driver that fails on purpose: errors reach the caller (never success),
//! are counted, and a failed compare-and-write writes nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use block::driver::mem::MemDriver;
use block::{Backend, BlockError, Driver, DriverInfo, Extent, OpKind};

#[derive(Default)]
struct Faults {
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    short_reads: AtomicBool,
    writes: AtomicUsize,
}

struct Faulty {
    inner: MemDriver,
    faults: Arc<Faults>,
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(5)
}

#[async_trait]
impl Driver for Faulty {
    fn info(&self) -> DriverInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            return Err(BlockError::ReadFailed(eio()));
        }
        let mut d = self.inner.read(offset, len).await?;
        if self.faults.short_reads.load(Ordering::SeqCst) {
            d.truncate(len / 2);
        }
        Ok(d)
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.faults.writes.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_writes.load(Ordering::SeqCst) {
            return Err(BlockError::WriteFailed(eio()));
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        if self.faults.fail_writes.load(Ordering::SeqCst) {
            return Err(BlockError::WriteFailed(eio()));
        }
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, unmap).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.inner.block_status(offset, len).await
    }
}

fn faulty() -> (Backend, Arc<Faults>) {
    faulty_of(1 << 20)
}

fn faulty_of(size: u64) -> (Backend, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let d = Faulty {
        inner: MemDriver::new(size),
        faults: faults.clone(),
    };
    (Backend::new(Arc::new(d), 512).expect("backend"), faults)
}

#[tokio::test]
async fn a_failed_read_is_read_failed_and_counted() {
    let (b, f) = faulty();
    f.fail_reads.store(true, Ordering::SeqCst);
    assert!(matches!(b.read(0, 1).await, Err(BlockError::ReadFailed(_))));
    assert_eq!(b.stats().errors_of(OpKind::Read), 1);
    assert_eq!(b.stats().bytes_read, 0);
}

#[tokio::test]
async fn a_short_read_from_the_driver_is_read_failed() {
    let (b, f) = faulty();
    f.short_reads.store(true, Ordering::SeqCst);
    assert!(matches!(b.read(0, 2).await, Err(BlockError::ReadFailed(_))));
}

#[tokio::test]
async fn a_failed_write_or_flush_is_write_failed() {
    let (b, f) = faulty();
    f.fail_writes.store(true, Ordering::SeqCst);
    assert!(matches!(
        b.write(0, vec![1; 512], true).await,
        Err(BlockError::WriteFailed(_))
    ));
    assert!(matches!(b.flush().await, Err(BlockError::WriteFailed(_))));
    assert!(matches!(
        b.write_same(0, 4, vec![1; 512]).await,
        Err(BlockError::WriteFailed(_))
    ));
    let s = b.stats();
    assert_eq!(s.errors_of(OpKind::Write), 1);
    assert_eq!(s.errors_of(OpKind::Flush), 1);
    assert_eq!(s.errors_of(OpKind::WriteSame), 1);
    assert_eq!(s.bytes_written, 0);
    assert_eq!(s.in_flight, 0);
}

#[tokio::test]
async fn caw_whose_read_fails_writes_nothing() {
    let (b, f) = faulty();
    f.fail_reads.store(true, Ordering::SeqCst);
    let r = b
        .compare_and_write(0, vec![0; 512], vec![1; 512], false)
        .await;
    assert!(matches!(r, Err(BlockError::ReadFailed(_))));
    assert_eq!(f.writes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn caw_miscompare_is_not_counted_as_an_error() {
    let (b, f) = faulty();
    let r = b
        .compare_and_write(0, vec![1; 512], vec![2; 512], false)
        .await;
    assert!(matches!(r, Err(BlockError::Miscompare { offset: 0 })));
    assert_eq!(f.writes.load(Ordering::SeqCst), 0);
    let s = b.stats();
    assert_eq!(s.miscompares, 1);
    assert_eq!(s.errors_of(OpKind::CompareAndWrite), 0);
}

#[tokio::test]
async fn write_same_writes_in_bounded_chunks() {
    let (b, f) = faulty_of(4 << 20);
    // One driver write per WRITE_SAME_CHUNK bytes, never one for the whole range.
    b.write_same(0, b.capacity(), vec![7; 512])
        .await
        .expect("write same");
    let chunks = (b.capacity() * 512).div_ceil(block::WRITE_SAME_CHUNK as u64);
    assert_eq!(chunks, 4);
    assert_eq!(f.writes.load(Ordering::SeqCst) as u64, chunks);
    assert_eq!(
        b.read(b.capacity() - 1, 1).await.expect("read"),
        vec![7; 512]
    );
}
