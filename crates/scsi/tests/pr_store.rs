//! A logical unit over reservation stores that behave in particular ways:
//! - one that cannot persist through power loss (a block device with no reservation state
//!   file): REPORT CAPABILITIES says PTPL_C 0, and a PERSISTENT RESERVE OUT with APTPL set to
//!   one is refused, never accepted and then lost. SPC-5 6.16.4 (REPORT CAPABILITIES byte 2),
//!   6.17.3 and table 216 (the basic parameter list: byte 20 bit 0 APTPL);
//! - one whose write goes on after its caller stops waiting (as the file driver's sidecar
//!   write does on a blocking thread): an operator's clear whose caller gives up still ends
//!   with the state in memory and in the store agreeing.
//!
//! CDBs, parameter lists and sense bytes are literals.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use async_trait::async_trait;
use block::{BlockError, MemoryStore, ReservationStore, Stored};
use common::{assert_good, lu_over_store, nexus, ready, run};
use scsi::{LogicalUnit, Target};
use tokio::sync::watch;

fn target_over(lu: Arc<LogicalUnit>) -> Target {
    let mut t = Target::new();
    t.add_lu(0, lu);
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
    let t = target_over(lu_over_store(Arc::new(MemoryStore::without_aptpl())));
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

/// A memory store whose compare-and-swap waits for a permit in a task of its own, which goes
/// on when the caller stops waiting.
#[derive(Debug)]
struct DetachedStore {
    inner: Arc<MemoryStore>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl ReservationStore for DetachedStore {
    async fn load(&self) -> Result<Stored, BlockError> {
        self.inner.load().await
    }
    async fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError> {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        tokio::spawn(async move {
            gate.acquire().await.expect("gate").forget();
            inner.compare_and_swap(expected, state, durable).await
        })
        .await
        .expect("store task")
    }
    fn watch(&self) -> watch::Receiver<Stored> {
        self.inner.watch()
    }
    async fn barrier(&self, version: u64) -> Result<(), BlockError> {
        self.inner.barrier(version).await
    }
}

#[tokio::test]
async fn an_operators_clear_whose_caller_gives_up_still_finishes() {
    let store = Arc::new(DetachedStore {
        inner: Arc::new(MemoryStore::new()),
        gate: Arc::new(tokio::sync::Semaphore::new(1)),
    });
    let lu = lu_over_store(store.clone());
    let t = target_over(lu.clone());
    let n = nexus();
    ready(&t, &n).await;
    // REGISTER key ABh (uses the one permit).
    assert_good(&run(&t, &n, &pr_out(0x00), basic(0xAB, 0x00)).await);
    assert_eq!(lu.persistent_reservations().registrations.len(), 1);

    // The clear reaches the store, whose write waits; its caller gives up (as the control
    // socket's time limit does) and drops it.
    let clear = lu.clear_reservations_by_operator();
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(100), clear).await;
    assert!(
        gave_up.is_err(),
        "the clear cannot finish while the store waits"
    );
    // The write then goes through.
    store.gate.add_permits(1);
    // Hang guard only: the clear settles in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lu.persistent_reservations().registrations.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store holds the cleared state, the LU still checks commands against the old"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Memory and store agree: generation 2 (REGISTER, then the clear), no registrations.
    let mem = lu.persistent_reservations();
    assert_eq!(mem.generation, 2);
    assert_eq!(store.inner.load().await.expect("load").version, 2);
    // The registrant was told: UNIT ATTENTION, RESERVATIONS PREEMPTED (2Ah/03h).
    let r = run(&t, &n, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(r.sense[2] & 0x0F, 0x06);
    assert_eq!(r.sense[12..14], [0x2A, 0x03]);
    // READ KEYS: PRGENERATION 2, ADDITIONAL LENGTH 0.
    let r = run(&t, &n, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0, 16, 0], vec![]).await;
    assert_eq!(r.data_in, vec![0, 0, 0, 2, 0, 0, 0, 0]);
}

/// REGISTER AND MOVE (SPC-5 5.14.8) may name any target port the LU is served through, as a
/// frontend recorded it (`LogicalUnit::add_target_port`), not only one a nexus has used since
/// the LU started: after a restart the destination has usually not logged in yet.
#[tokio::test]
async fn register_and_move_names_a_port_the_lu_is_served_through_before_anyone_used_it() {
    let lu = common::lu_over_store(Arc::new(block::MemoryStore::new()));
    // A second port of the target: relative target port identifier 2.
    let second = scsi::TargetPort {
        name: "iqn.2026-01.io.sharedisk:disk0".into(),
        tpgt: 2,
        relative_id: 2,
    };
    lu.add_target_port(second.clone(), scsi::Transport::Iscsi);
    let t = target_over(lu.clone());
    let a = common::nexus_named("iqn.2026-01.test:a");
    common::ready(&t, &a).await;
    // REGISTER (00h) SARK 10h; RESERVE (01h) type 6h (Exclusive Access, Registrants Only).
    common::assert_good(&common::run(&t, &a, &pr_out(0x00), basic(0x10, 0)).await);
    let mut reserve = pr_out(0x01);
    reserve[2] = 0x06;
    let mut rk = basic(0, 0);
    rk[..8].copy_from_slice(&0x10u64.to_be_bytes()); // RESERVATION KEY 10h
    common::assert_good(&common::run(&t, &a, &reserve, rk).await);
    // REGISTER AND MOVE (07h), type 6h: RESERVATION KEY 10h, SERVICE ACTION RESERVATION KEY
    // 20h, RELATIVE TARGET PORT IDENTIFIER 2, TransportID (SPC-5 7.6.4.6, format 01b:
    // 45h, additional length 0018h) "iqn.2026-01.test:b,i,0x400000000001" padded to 4 bytes.
    let name = b"iqn.2026-01.test:b,i,0x400000000001";
    let mut tid = vec![0x45, 0x00];
    let padded = (name.len() + 1).div_ceil(4) * 4;
    tid.extend_from_slice(&(padded as u16).to_be_bytes());
    tid.extend_from_slice(name);
    tid.resize(4 + padded, 0);
    let mut p = Vec::new();
    p.extend_from_slice(&0x10u64.to_be_bytes());
    p.extend_from_slice(&0x20u64.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // reserved, UNREG 0 APTPL 0
    p.extend_from_slice(&2u16.to_be_bytes());
    p.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(&tid);
    let mut cdb = pr_out(0x07);
    cdb[2] = 0x06;
    cdb[5..9].copy_from_slice(&(p.len() as u32).to_be_bytes());
    common::assert_good(&common::run(&t, &a, &cdb, p).await);
    let pr = lu.persistent_reservations();
    let holder = pr
        .reservation
        .as_ref()
        .and_then(|r| r.holder.as_ref())
        .expect("a holder");
    assert_eq!(holder.initiator.name, "iqn.2026-01.test:b");
    assert_eq!(holder.target.as_ref(), Some(&second));
}

/// REGISTER AND MOVE from `a` to the initiator named `name` by a format-00b TransportID
/// (SPC-5 7.6.4.6: 05h, additional length a multiple of 4, the NUL-terminated iSCSI name) at
/// RELATIVE TARGET PORT IDENTIFIER `rtpi`, RESERVATION KEY 10h, SERVICE ACTION RESERVATION KEY
/// 20h, reservation type `ty`.
async fn register_and_move(
    t: &Target,
    a: &Arc<scsi::ItNexus>,
    ty: u8,
    rtpi: u16,
    name: &[u8],
) -> scsi::Response {
    let mut tid = vec![0x05, 0x00];
    let padded = (name.len() + 1).div_ceil(4).max(5) * 4;
    tid.extend_from_slice(&(padded as u16).to_be_bytes());
    tid.extend_from_slice(name);
    tid.resize(4 + padded, 0);
    let mut p = Vec::new();
    p.extend_from_slice(&0x10u64.to_be_bytes());
    p.extend_from_slice(&0x20u64.to_be_bytes());
    p.extend_from_slice(&[0, 0x02]); // reserved, UNREG 1 APTPL 0
    p.extend_from_slice(&rtpi.to_be_bytes());
    p.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(&tid);
    let mut cdb = pr_out(0x07);
    cdb[2] = ty;
    cdb[5..9].copy_from_slice(&(p.len() as u32).to_be_bytes());
    common::run(t, a, &cdb, p).await
}

/// `a` registers with key 10h and reserves with type `ty`.
async fn register_and_reserve(t: &Target, a: &Arc<scsi::ItNexus>, ty: u8) {
    common::assert_good(&common::run(t, a, &pr_out(0x00), basic(0x10, 0)).await);
    let mut reserve = pr_out(0x01);
    reserve[2] = ty;
    let mut rk = basic(0, 0);
    rk[..8].copy_from_slice(&0x10u64.to_be_bytes());
    common::assert_good(&common::run(t, a, &reserve, rk).await);
}

fn vhost_port() -> scsi::TargetPort {
    scsi::TargetPort {
        name: "iqn.2026-01.io.sharedisk:vhost".into(),
        tpgt: 0x8000,
        relative_id: 0x8000,
    }
}

/// A reservation an iSCSI initiator moves to a vhost-user socket's port goes to that socket's
/// guest: the format-00b TransportID names an initiator of the destination port's transport,
/// not of the sender's (SPC-5 5.14.9: the reservation moves to the named I_T nexus).
#[tokio::test]
async fn register_and_move_from_iscsi_to_a_vhost_port_hands_the_guest_the_reservation() {
    let lu = common::lu_over_store(Arc::new(block::MemoryStore::new()));
    lu.add_target_port(vhost_port(), scsi::Transport::Vhost);
    let t = target_over(lu.clone());
    let a = common::nexus_named("iqn.2026-01.test:a");
    let guest = Arc::new(scsi::ItNexus {
        initiator: scsi::InitiatorPort {
            transport: scsi::Transport::Vhost,
            name: "iqn.2026-01.test:guest".into(),
            isid: None,
        },
        target: vhost_port(),
    });
    common::ready(&t, &a).await;
    common::ready(&t, &guest).await;
    register_and_reserve(&t, &a, 0x01).await; // Write Exclusive
    common::assert_good(&register_and_move(&t, &a, 0x01, 0x8000, b"iqn.2026-01.test:guest").await);
    // The guest holds it: its WRITE(10) of one block is GOOD; the mover's conflicts.
    let write = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    common::assert_good(&common::run(&t, &guest, &write, vec![0; 512]).await);
    let r = common::run(&t, &a, &write, vec![0; 512]).await;
    assert_eq!(r.status, scsi::Status::RESERVATION_CONFLICT);
}

/// A port the LU was taken off (`LogicalUnit::remove_target_port`) can no longer be named:
/// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (05h/26h/00h) pointing at RELATIVE TARGET
/// PORT IDENTIFIER (byte 18), and the reservation stays where it was.
#[tokio::test]
async fn register_and_move_to_a_port_the_lu_left_is_refused() {
    let lu = common::lu_over_store(Arc::new(block::MemoryStore::new()));
    lu.add_target_port(vhost_port(), scsi::Transport::Vhost);
    lu.remove_target_port(&vhost_port());
    let t = target_over(lu.clone());
    let a = common::nexus_named("iqn.2026-01.test:a");
    common::ready(&t, &a).await;
    register_and_reserve(&t, &a, 0x01).await;
    let r = register_and_move(&t, &a, 0x01, 0x8000, b"iqn.2026-01.test:guest").await;
    common::assert_sense(&r, 0x05, 0x26, 0x00);
    // Sense-key specific: SKSV, C/D 0 (parameter list), FIELD POINTER 18 (SPC-5 4.4.2.4.2).
    assert_eq!(&r.sense[15..18], &[0x80, 0x00, 18]);
    let pr = lu.persistent_reservations();
    assert_eq!(
        pr.reservation
            .as_ref()
            .and_then(|r| r.holder.as_ref())
            .map(|h| h.initiator.name.as_str()),
        Some("iqn.2026-01.test:a")
    );
}
