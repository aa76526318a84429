//! Hold a persistent reservation on a sharedisk LU until stdin closes, for bench/reservations.sh.
//!
//!   pr_hold ADDR:PORT REGISTRANT-IQN
//!
//! Logs in to the target `iqn.2026-01.io.sharedisk:wire` as `iqn.2026-01.io.sharedisk:holder`,
//! registers itself and REGISTRANT-IQN (every ISID of it: a SPEC_I_PT TransportID of format
//! 00b) with one REGISTER, reserves Write Exclusive – Registrants Only (type 5h), prints
//! "held", and keeps the session until stdin closes. The registrant's reads and writes are
//! then allowed as a registrant's: every one of its commands goes through the reservation
//! check's registered-nexus path.

#[path = "../../iscsi/tests/common/mod.rs"]
mod common;

use std::io::Read;

/// Send PERSISTENT RESERVE OUT (SPC-5 6.17.1; scope 0h) with `params` as immediate data and
/// return the SCSI status.
async fn pr_out(c: &mut common::Client, sa: u8, ty: u8, params: &[u8]) -> u8 {
    let len = u32::try_from(params.len())
        .expect("short list")
        .to_be_bytes();
    let cdb = [0x5F, sa, ty, 0, 0, len[0], len[1], len[2], len[3], 0];
    let (b, _) = c.command(0xA1, params.len() as u32, &cdb);
    c.send(b, params).await;
    let r = c.recv().await.expect("SCSI Response");
    r.bhs[3]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(portal), Some(registrant)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: pr_hold ADDR:PORT REGISTRANT-IQN");
        std::process::exit(2);
    };
    let portal = portal.parse().expect("ADDR:PORT");
    let mut c = common::Client::login_as(
        portal,
        "iqn.2026-01.io.sharedisk:holder",
        "",
        [0x80, 0, 0, 0, 0, 7],
        common::defaults,
    )
    .await;
    c.clear_unit_attention().await;

    // REGISTER (00h) with SPEC_I_PT (SPC-5 6.17.3): RESERVATION KEY 0, SERVICE ACTION
    // RESERVATION KEY 0xBE0C, byte 20 SPEC_I_PT (08h), then TRANSPORTID PARAMETER DATA LENGTH
    // and one iSCSI TransportID of format 00b (SPC-5 7.6.4.6): byte 0 = 05h (protocol
    // identifier iSCSI), ADDITIONAL LENGTH, the NUL-terminated name padded to a multiple of 4.
    let key: u64 = 0xBE0C;
    let mut name = registrant.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 16 {
        name.push(0);
    }
    let mut tid = vec![0x05, 0x00];
    tid.extend_from_slice(&(name.len() as u16).to_be_bytes());
    tid.extend_from_slice(&name);
    let mut p = vec![0u8; 24];
    p[8..16].copy_from_slice(&key.to_be_bytes());
    p[20] = 0x08;
    p.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(&tid);
    assert_eq!(
        pr_out(&mut c, 0x00, 0x00, &p).await,
        0x00,
        "REGISTER with SPEC_I_PT"
    );

    // RESERVE (01h), type 5h, with the key.
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    assert_eq!(pr_out(&mut c, 0x01, 0x05, &p).await, 0x00, "RESERVE");
    println!("held");

    // Hold the session (and answer nothing else) until stdin closes.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}
