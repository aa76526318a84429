//! A logical unit whose image grew (`LogicalUnit::refresh_capacity`, the daemon's `lu rescan`):
//! every I_T nexus gets CAPACITY DATA HAS CHANGED on its next command (SBC-4 4.9; SPC-5 sense
//! 06h/2Ah/09h), READ CAPACITY reports the new last LBA, and the new blocks are served.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use block::driver::mem::MemDriver;
use block::{BlockError, Driver, DriverInfo, Extent};
use common::*;
use scsi::Target;

/// A memory disk whose visible size the test grows, as an operator grows an image file.
struct Growing {
    inner: MemDriver,
    size: AtomicU64,
}

#[async_trait]
impl Driver for Growing {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.size.load(Ordering::Acquire),
            ..self.inner.info()
        }
    }
    async fn refresh_size(&self) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Acquire))
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, BlockError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.inner.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.inner.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(o, l, unmap).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Extent, BlockError> {
        self.inner.block_status(o, l).await
    }
}

/// READ CAPACITY(10): RETURNED LOGICAL BLOCK ADDRESS (bytes 0-3) and BLOCK LENGTH (4-7).
const READ_CAPACITY_10: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[tokio::test]
async fn a_grown_lu_tells_every_nexus_and_serves_its_new_end() {
    let d = Arc::new(Growing {
        inner: MemDriver::new(4096 * 512),
        size: AtomicU64::new(2048 * 512),
    });
    let backend = block::Backend::new(d.clone(), 512).expect("backend");
    let lu = Arc::new(scsi::LogicalUnit::new(backend, config()));
    let mut t = Target::new();
    t.add_lu(0, lu.clone());
    let (a, b) = (
        nexus_named("iqn.2026-01.test:a"),
        nexus_named("iqn.2026-01.test:b"),
    );
    ready(&t, &a).await;
    ready(&t, &b).await;
    let r = run(&t, &a, &READ_CAPACITY_10, vec![]).await;
    // Last LBA 2047 (0x7FF), 512-byte blocks.
    assert_eq!(r.data_in, [0, 0, 0x07, 0xFF, 0, 0, 0x02, 0x00]);

    // Nothing grew: no unit attention.
    assert_eq!(lu.refresh_capacity().await, Ok((2048, 2048)));
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);

    d.size.store(4096 * 512, Ordering::Release);
    assert_eq!(lu.refresh_capacity().await, Ok((2048, 4096)));
    for n in [&a, &b] {
        // UNIT ATTENTION, CAPACITY DATA HAS CHANGED (2Ah/09h), once.
        assert_sense(
            &run(&t, n, &[0x00, 0, 0, 0, 0, 0], vec![]).await,
            0x06,
            0x2A,
            0x09,
        );
        let r = run(&t, n, &READ_CAPACITY_10, vec![]).await;
        // Last LBA 4095 (0xFFF).
        assert_eq!(r.data_in, [0, 0, 0x0F, 0xFF, 0, 0, 0x02, 0x00]);
    }
    // WRITE(10) and READ(10) of the new last block, LBA 4095.
    let w = run(
        &t,
        &a,
        &[0x2A, 0, 0, 0, 0x0F, 0xFF, 0, 0, 1, 0],
        vec![0x5A; 512],
    )
    .await;
    assert_good(&w);
    let r = run(&t, &b, &[0x28, 0, 0, 0, 0x0F, 0xFF, 0, 0, 1, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, vec![0x5A; 512]);

    // Smaller: refused; nothing changes and nobody is told.
    d.size.store(1024 * 512, Ordering::Release);
    assert!(lu.refresh_capacity().await.is_err());
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
    let r = run(&t, &a, &READ_CAPACITY_10, vec![]).await;
    assert_eq!(r.data_in, [0, 0, 0x0F, 0xFF, 0, 0, 0x02, 0x00]);
}
