//! A logical unit whose reservation store cannot persist through power loss (a block device
//! with no reservation state file): REPORT CAPABILITIES says PTPL_C 0, and a PERSISTENT RESERVE
//! OUT with APTPL set to one is refused, never accepted and then lost.
//!
//! SPC-5 6.16.4 (REPORT CAPABILITIES byte 2), 6.17.3 and table 216 (the basic parameter list:
//! byte 20 bit 0 APTPL), 6.17.5 (REGISTER AND MOVE: byte 17 bit 0 APTPL). CDBs, parameter
//! lists and sense bytes are literals.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use async_trait::async_trait;
use block::driver::mem::MemDriver;
use block::{Backend, BlockError, Driver, DriverInfo, Extent, MemoryStore, ReservationStore};
use common::{assert_good, config, nexus, ready, run};
use scsi::{LogicalUnit, Target};

/// The memory driver's data with a store that refuses APTPL.
struct NoAptpl(MemDriver, Arc<MemoryStore>);

#[async_trait]
impl Driver for NoAptpl {
    fn info(&self) -> DriverInfo {
        self.0.info()
    }
    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        Some(self.1.clone())
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, BlockError> {
        self.0.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.0.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.0.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, unmap: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(o, l, unmap).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Extent, BlockError> {
        self.0.block_status(o, l).await
    }
}

fn target() -> Target {
    let driver = NoAptpl(
        MemDriver::new(64 * 512),
        Arc::new(MemoryStore::without_aptpl()),
    );
    let backend = Backend::new(Arc::new(driver), 512).expect("backend");
    let mut t = Target::new();
    t.add_lu(0, Arc::new(LogicalUnit::new(backend, config())));
    t
}

/// PERSISTENT RESERVE OUT (10): SERVICE ACTION, scope/type 0, PARAMETER LIST LENGTH 24.
fn pr_out(sa: u8) -> [u8; 10] {
    [0x5F, sa, 0x00, 0, 0, 0, 0, 0, 24, 0]
}

/// The basic parameter list: RESERVATION KEY 0, SERVICE ACTION RESERVATION KEY `sark`,
/// byte 20 as given.
fn basic(sark: u64, byte20: u8) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p.extend_from_slice(&sark.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, byte20, 0, 0, 0]);
    p
}

#[tokio::test]
async fn without_ptpl_c_aptpl_is_refused_and_nothing_is_registered() {
    let t = target();
    let n = nexus();
    ready(&t, &n).await;
    // REPORT CAPABILITIES: byte 2 RLR_C, CRH, SIP_C, ATP_C; PTPL_C (bit 0) 0.
    let r = run(&t, &n, &[0x5E, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in[2], 0x9C);
    // REGISTER with APTPL=1: CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST
    // (26h/00h), SKSV, C/D 0, BPV, bit 0; FIELD POINTER 20.
    for sa in [0x00, 0x06] {
        let r = run(&t, &n, &pr_out(sa), basic(0xAB, 0x01)).await;
        assert_eq!(r.status, scsi::Status::CHECK_CONDITION, "sa {sa:#x}");
        assert_eq!(
            r.sense,
            vec![0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x26, 0x00, 0, 0x88, 0x00, 0x14],
            "sa {sa:#x}"
        );
    }
    // READ KEYS: PRGENERATION 0, ADDITIONAL LENGTH 0.
    let r = run(&t, &n, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0, 16, 0], vec![]).await;
    assert_eq!(r.data_in, vec![0, 0, 0, 0, 0, 0, 0, 0]);
    // The same REGISTER without APTPL registers.
    assert_good(&run(&t, &n, &pr_out(0x00), basic(0xAB, 0x00)).await);
    let r = run(&t, &n, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0, 16, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0xAB]
    );
    // RESERVE ignores byte 20 (APTPL is a field of the register service actions only).
    let mut reserve = pr_out(0x01);
    reserve[2] = 0x01; // LU_SCOPE, type 1 (Write Exclusive)
    let mut p = basic(0, 0x01);
    p[..8].copy_from_slice(&0xABu64.to_be_bytes());
    assert_good(&run(&t, &n, &reserve, p).await);
}
