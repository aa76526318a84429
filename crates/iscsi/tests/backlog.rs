//! An initiator that sends READs and never reads the answers holds a bounded share of the
//! target's memory: the reader stops taking PDUs once the data queued for the writer passes a
//! byte limit, not only a count of messages (1024 answers of 1 MiB would be 1 GiB). Measured
//! as the growth of this process's resident memory; a test binary of its own, so that no
//! other test allocates beside it.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use block::Driver;
use common::Client;

/// This process's resident set, in bytes (`VmRSS` in /proc/self/status).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_an_initiator_does_not_read_hold_bounded_memory() {
    const MIB: usize = 1 << 20;
    let driver = Arc::new(block::driver::mem::MemDriver::new(16 << 20));
    // Data, so that each answer's buffer is written (and resident), not untouched zeros.
    driver.write(0, vec![0xAA; MIB], false).await.expect("fill");
    let (addr, _server) = common::start_with(driver).await;
    let mut c = Client::login(addr, "").await;
    let before = rss();
    let flood = tokio::spawn(async move {
        for _ in 0..3000 {
            // READ(10) of LBA 0, 2048 blocks (1 MiB); F=1, R=1, ATTR=SIMPLE; EDTL 1 MiB.
            let (b, _) = c.command(0xC1, MIB as u32, &[0x28, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0]);
            c.send(b, &[]).await;
        }
        c
    });
    // The target answers as fast as it can until it stops reading; nothing is read here.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss().saturating_sub(before);
    // The limit is 64 MiB queued, plus the commands the CmdSN window (128) lets run.
    assert!(
        grown < 400 * MIB as u64,
        "{} MiB held for an initiator that does not read",
        grown >> 20
    );
    flood.abort();
}
