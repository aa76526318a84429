//! Wire-level tests: a minimal initiator written here from RFC 7143's PDU layouts talks to
//! `Server::serve` over loopback and checks the target's PDUs field by field.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use iscsi::{Auth, Server, ServerConfig, TargetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn write_with_r2t_then_read_split_at_max_recv_data_segment_length() {
    let addr = start().await;
    let mut c = Client::login(
        addr,
        "InitialR2T=Yes|ImmediateData=No|MaxBurstLength=2048|MaxRecvDataSegmentLength=1024|",
    )
    .await;
    c.clear_unit_attention().await;
    // WRITE(10) of 8 blocks = 4096 bytes, F=1 W=1 simple.
    let (b, itt) = c.command(0xa1, 4096, &write10(10, 8));
    c.send(b, &[]).await;
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for (r2tsn, offset) in [(0u32, 0u32), (1, 2048)] {
        let r2t = c.recv().await.expect("R2T");
        assert_eq!(r2t.bhs[0], 0x31, "R2T");
        assert_eq!(r2t.u32(16), itt);
        assert_eq!(r2t.u32(36), r2tsn, "R2TSN");
        assert_eq!(r2t.u32(40), offset, "Buffer Offset");
        assert_eq!(
            r2t.u32(44),
            2048,
            "Desired Data Transfer Length = MaxBurstLength"
        );
        let ttt = r2t.u32(20);
        assert_ne!(ttt, 0xffff_ffff);
        // Two Data-Out PDUs of 1024 bytes per R2T, DataSN from 0, F on the last.
        for (datasn, part) in [(0u32, 0u32), (1, 1024)] {
            let mut d = [0u8; 48];
            d[0] = 0x05;
            d[1] = if datasn == 1 { 0x80 } else { 0 };
            d[16..20].copy_from_slice(&itt.to_be_bytes());
            d[20..24].copy_from_slice(&ttt.to_be_bytes());
            d[36..40].copy_from_slice(&datasn.to_be_bytes());
            d[40..44].copy_from_slice(&(offset + part).to_be_bytes());
            let at = (offset + part) as usize;
            c.send(d, &payload[at..at + 1024]).await;
        }
    }
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21, "SCSI Response");
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
    assert_eq!(rsp.bhs[1] & 0x06, 0, "no residual");
    // RFC 7143 11.4.8: ExpDataSN is "the number of R2T and Data-In (read) PDUs the target
    // has sent for the command": the two R2Ts.
    assert_eq!(rsp.u32(36), 2, "ExpDataSN");

    // READ(10) of the same 8 blocks, F=1 R=1.
    let (b, itt) = c.command(0xc1, 4096, &read10(10, 8));
    c.send(b, &[]).await;
    let mut got = Vec::new();
    for datasn in 0..4u32 {
        let d = c.recv().await.expect("Data-In");
        assert_eq!(d.bhs[0], 0x25, "Data-In");
        assert_eq!(d.u32(16), itt);
        assert_eq!(d.u32(36), datasn, "DataSN");
        assert_eq!(d.u32(40), datasn * 1024, "Buffer Offset");
        assert_eq!(
            d.data.len(),
            1024,
            "split at the initiator's MaxRecvDataSegmentLength"
        );
        let last = datasn == 3;
        // F at the end of each 2048-byte burst; S (status) only on the last.
        assert_eq!(d.bhs[1] & 0x80 != 0, datasn % 2 == 1, "F bit");
        assert_eq!(d.bhs[1] & 0x01 != 0, last, "S bit");
        if last {
            assert_eq!(d.bhs[3], 0x00, "GOOD");
        }
        got.extend_from_slice(&d.data);
    }
    assert_eq!(got, payload);
}

#[tokio::test]
async fn read_with_small_edtl_reports_overflow() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let (b, _) = c.command(0xc1, 200, &read10(0, 1));
    c.send(b, &[]).await;
    let d = c.recv().await.expect("Data-In");
    assert_eq!(d.bhs[0], 0x25);
    assert_eq!(d.data.len(), 200);
    assert_eq!(d.bhs[1] & 0x05, 0x05, "S and O (overflow)");
    assert_eq!(d.u32(44), 312, "Residual Count");
}

#[tokio::test]
async fn command_beyond_max_cmdsn_is_ignored_and_nop_is_answered() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    // TEST UNIT READY with CmdSN far beyond MaxCmdSN.
    let (mut b, _) = c.command(0x81, 0, &[0; 6]);
    b[24..28].copy_from_slice(&1_000_000u32.to_be_bytes());
    c.cmdsn -= 1;
    c.send(b, &[]).await;
    // NOP-Out ping with data (RFC 7143 11.18), immediate.
    c.send(c.nop_out(77, 0xffff_ffff), b"ping").await;
    let r = c.recv().await.expect("NOP-In");
    assert_eq!(
        r.bhs[0], 0x20,
        "NOP-In, not a response to the dropped command"
    );
    assert_eq!(r.u32(16), 77);
    assert_eq!(r.u32(20), 0xffff_ffff);
    assert_eq!(r.data, b"ping");
    assert_eq!(r.u32(28), 1, "ExpCmdSN unchanged by the dropped command");
}

#[tokio::test]
async fn unknown_opcode_is_rejected_with_its_header() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let mut b = [0u8; 48];
    b[0] = 0x1c; // not an initiator opcode
    b[16..20].copy_from_slice(&5u32.to_be_bytes());
    c.send(b, &[]).await;
    let r = c.recv().await.expect("Reject");
    assert_eq!(r.bhs[0], 0x3f, "Reject");
    assert_eq!(r.bhs[2], 0x05, "Command not supported");
    assert_eq!(r.data.len(), 48);
    assert_eq!(r.data[0], 0x1c);
}

#[tokio::test]
async fn send_targets_in_a_normal_session() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    // RFC 7143 Appendix C: All "MUST NOT be supported on an operational session".
    c.send(text_bhs(&c, 0x80, 9, 0xffff_ffff), b"SendTargets=All\0")
        .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24);
    assert_eq!(r.bhs[1], 0x80, "F=1 C=0");
    assert_eq!(r.data, b"SendTargets=Reject\0");
    // The empty value names the session's own target.
    c.send(text_bhs(&c, 0x80, 10, 0xffff_ffff), b"SendTargets=\0")
        .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24);
    assert_eq!(r.bhs[1], 0x80, "F=1 C=0");
    let text = String::from_utf8(r.data).expect("text");
    assert_eq!(
        text,
        format!("TargetName={TARGET}\0TargetAddress={addr},1\0")
    );
}

/// A Text Request header: I=1, `flags` (F 80h, C 40h), ITT, TTT and the session's CmdSN.
fn text_bhs(c: &Client, flags: u8, itt: u32, ttt: u32) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x44; // I=1, Text Request
    b[1] = flags;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&ttt.to_be_bytes());
    b[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    b
}

/// RFC 7143 11.10.2, 11.10.4: a Text Request with C=1 is answered empty with F=0 and a TTT
/// other than FFFFFFFFh; the initiator copies that TTT into the request's next part. A part
/// with TTT FFFFFFFFh starts a new request instead.
#[tokio::test]
async fn a_text_request_in_parts_continues_with_the_copied_ttt() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.send(text_bhs(&c, 0x40, 9, 0xffff_ffff), b"SendTar").await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24, "Text Response");
    assert_eq!(r.bhs[1], 0x00, "F=0 C=0");
    assert!(r.data.is_empty());
    let ttt = r.u32(20);
    assert_ne!(ttt, 0xffff_ffff);
    c.send(text_bhs(&c, 0x80, 9, ttt), b"gets=\0").await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24, "Text Response, not a Reject");
    assert_eq!(r.bhs[1], 0x80, "F=1");
    let text = String::from_utf8(r.data).expect("text");
    assert_eq!(
        text,
        format!("TargetName={TARGET}\0TargetAddress={addr},1\0")
    );
    // A first part, then a new request (TTT FFFFFFFFh): the first part is forgotten.
    c.send(text_bhs(&c, 0x40, 10, 0xffff_ffff), b"Bogus").await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[1], 0x00, "F=0");
    c.send(text_bhs(&c, 0x80, 11, 0xffff_ffff), b"SendTargets=\0")
        .await;
    let r = c.recv().await.expect("Text Response");
    let text = String::from_utf8(r.data).expect("text");
    assert!(text.starts_with("TargetName="), "{text:?}");
    // A TTT the target never gave is a Reject (Invalid PDU Field, 09h).
    c.send(text_bhs(&c, 0x80, 12, 0x1234_5678), b"SendTargets=\0")
        .await;
    let r = c.recv().await.expect("Reject");
    assert_eq!((r.bhs[0], r.bhs[2]), (0x3f, 0x09));
}

/// RFC 7143 11.11.1: "A Text Response with the F bit set to 1 in response to a Text Request
/// with the F bit set to 0 is a protocol error": a request with F=0 is answered with F=0 and a
/// TTT other than FFFFFFFFh, which the initiator's next request of the sequence copies; the
/// sequence ends with the answer to a request with F=1.
#[tokio::test]
async fn a_text_request_with_f_0_is_answered_with_f_0_until_one_with_f_1() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.send(text_bhs(&c, 0x00, 9, 0xffff_ffff), b"SendTargets=\0")
        .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24, "Text Response");
    assert_eq!(r.bhs[1], 0x00, "F=0 C=0");
    let ttt = r.u32(20);
    assert_ne!(ttt, 0xffff_ffff, "F=0: a TTT the next request copies");
    assert_eq!(
        String::from_utf8(r.data).expect("text"),
        format!("TargetName={TARGET}\0TargetAddress={addr},1\0")
    );
    // The sequence's next request (empty, F=1) with that TTT: answered F=1, TTT reserved.
    c.send(text_bhs(&c, 0x80, 9, ttt), b"").await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24, "Text Response, not a Reject");
    assert_eq!(r.bhs[1], 0x80, "F=1");
    assert_eq!(r.u32(20), 0xffff_ffff);
    assert!(r.data.is_empty(), "{:?}", r.data);
}

/// RFC 7143 11.10.2: "A Text Request with the C bit set to 1 MUST have the F bit set to 0";
/// RFC 7143 6.2: a key negotiated or declared twice is a protocol error. Both are answered
/// with a Reject, reason Protocol Error (04h, 11.17.1). InitiatorAlias is declarative (13.6):
/// taken without an answer.
#[tokio::test]
async fn text_requests_with_c_and_f_or_a_repeated_key_are_rejected() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let refused: [(u8, &[u8]); 2] = [
        (0xc0, b"SendTargets=\0"),               // C=1 and F=1
        (0x80, b"SendTargets=\0SendTargets=\0"), // a key twice
    ];
    for (itt, (flags, text)) in (9..).zip(refused) {
        c.send(text_bhs(&c, flags, itt, 0xffff_ffff), text).await;
        let r = c.recv().await.expect("Reject");
        assert_eq!((r.bhs[0], r.bhs[2]), (0x3f, 0x04), "Reject, protocol error");
    }
    c.send(
        text_bhs(&c, 0x80, 11, 0xffff_ffff),
        b"InitiatorAlias=host1\0",
    )
    .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24, "Text Response");
    assert!(
        r.data.is_empty(),
        "declarative: no answer, got {:?}",
        r.data
    );
}

/// RFC 7143 13.12: MaxRecvDataSegmentLength is declarative and may be sent in the full
/// feature phase: the target takes it (nothing to answer) and sends no data segment longer
/// from then on; a value out of range (512 to 2^24-1) is answered Reject.
#[tokio::test]
async fn max_recv_data_segment_length_declared_in_the_full_feature_phase_is_honoured() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    c.send(
        text_bhs(&c, 0x80, 9, 0xffff_ffff),
        b"MaxRecvDataSegmentLength=100\0",
    )
    .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24);
    assert_eq!(r.data, b"MaxRecvDataSegmentLength=Reject\0");
    c.send(
        text_bhs(&c, 0x80, 10, 0xffff_ffff),
        b"MaxRecvDataSegmentLength=1024\0",
    )
    .await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.bhs[0], 0x24);
    assert!(
        r.data.is_empty(),
        "declarative: no answer, got {:?}",
        r.data
    );
    // READ(10) of 8 blocks: four Data-In PDUs of 1024 bytes.
    let (b, _) = c.command(0xc1, 4096, &read10(0, 8));
    c.send(b, &[]).await;
    let mut got = 0;
    while got < 4096 {
        let d = c.recv().await.expect("Data-In");
        assert_eq!(d.bhs[0], 0x25, "Data-In");
        assert!(d.data.len() <= 1024, "{} bytes", d.data.len());
        got += d.data.len();
    }
}

/// A memory disk whose writes wait until the test opens the gate, and whose reads, with a
/// read gate, wait (counted) until that one opens.
struct GatedDriver {
    inner: block::driver::mem::MemDriver,
    gate: tokio::sync::Semaphore,
    entered: tokio::sync::Notify,
    read_gate: Option<tokio::sync::watch::Receiver<bool>>,
    reads_entered: std::sync::atomic::AtomicUsize,
}

impl GatedDriver {
    fn new(read_gate: Option<tokio::sync::watch::Receiver<bool>>) -> Self {
        Self {
            inner: block::driver::mem::MemDriver::new(16 << 20),
            gate: tokio::sync::Semaphore::new(0),
            entered: tokio::sync::Notify::new(),
            read_gate,
            reads_entered: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl block::Driver for GatedDriver {
    fn info(&self) -> block::DriverInfo {
        self.inner.info()
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, block::BlockError> {
        if let Some(mut gate) = self.read_gate.clone() {
            self.reads_entered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            gate.wait_for(|open| *open).await.expect("read gate");
        }
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), block::BlockError> {
        self.entered.notify_one();
        let _permit = self.gate.acquire().await.expect("gate");
        self.inner.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), block::BlockError> {
        self.inner.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.inner.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), block::BlockError> {
        self.inner.write_zeroes(o, l, u).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<block::Extent, block::BlockError> {
        self.inner.block_status(o, l).await
    }
}

/// A target on a [`GatedDriver`] and a logged-in session whose WRITE(10) of one block of
/// `byte` to LBA 0, sent with its data as immediate data, has stopped inside the driver; with
/// the write's ITT.
async fn a_write_held_in_the_backend(
    byte: u8,
) -> (
    Arc<GatedDriver>,
    std::net::SocketAddr,
    Arc<Server>,
    Client,
    u32,
) {
    let driver = Arc::new(GatedDriver::new(None));
    let (addr, server) = start_with(driver.clone()).await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1));
    let entered = driver.entered.notified();
    c.send(b, &[byte; 512]).await;
    entered.await;
    (driver, addr, server, c, itt)
}

#[tokio::test]
async fn reads_beyond_the_data_in_budget_of_a_connection_get_task_set_full() {
    // 40 READ(10)s of 16384 blocks (8 MiB, the largest transfer the Block Limits VPD page
    // allows at 512-byte blocks) are in the CmdSN window at once, and the disk holds them.
    // Each would hold 8 MiB of data-in until the initiator reads it: 320 MiB. The budget is
    // 64 MiB per connection: 8 run, the other 32 are answered TASK SET FULL (SAM-5 5.3) at
    // once, without reaching the disk.
    const READS: u32 = 40;
    const LEN: u32 = 8 << 20;
    let (open, gate) = tokio::sync::watch::channel(false);
    let driver = Arc::new(GatedDriver::new(Some(gate)));
    let (addr, _server) = start_with(driver.clone()).await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let read = |c: &mut Client| {
        // F=1, R=1, ATTR=SIMPLE; EDTL 8 MiB; READ(10) of LBA 0, 16384 blocks.
        c.command(0xC1, LEN, &read10(0, 16384))
    };
    let mut itts = Vec::new();
    for _ in 0..READS {
        let (b, itt) = read(&mut c);
        c.send(b, &[]).await;
        itts.push(itt);
    }
    let entered = || {
        driver
            .reads_entered
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    // The 32 refused ones are answered while the 8 wait in the disk: SCSI Response (21h),
    // status TASK SET FULL (28h), no data.
    let mut full = Vec::new();
    while full.len() < (READS - 8) as usize {
        let p = c.recv().await.expect("SCSI Response");
        assert_eq!((p.bhs[0], p.bhs[3]), (0x21, 0x28), "TASK SET FULL");
        full.push(p.u32(16));
    }
    assert_eq!(entered(), 8, "READs inside the disk");
    // With the budget spent, a READ beyond MAXIMUM TRANSFER LENGTH (16384 blocks here) is
    // still refused for what it is (SBC-4 6.6.4), not TASK SET FULL, which invites a retry:
    // READ(10) of 16385 blocks.
    let (b, too_long) = c.command(0xC1, LEN, &read10(0, 16385));
    c.send(b, &[]).await;
    let p = c.recv().await.expect("SCSI Response");
    // ILLEGAL REQUEST (byte 2), INVALID FIELD IN CDB 24h/00h (12, 13), field pointer C=1
    // BPV=1 bit 7 at CDB byte 7 (15-17).
    let sense = check_condition_sense(&p, too_long);
    assert_eq!(
        (sense[2] & 0x0F, sense[12], sense[13], &sense[15..18]),
        (0x05, 0x24, 0x00, &[0xCF, 0x00, 0x07][..])
    );
    // Open the disk: the 8 complete, GOOD, with all their data, and no other READ ran.
    open.send(true).expect("open the read gate");
    let mut got = std::collections::HashMap::new();
    let mut good = Vec::new();
    while good.len() < 8 {
        let p = c.recv().await.expect("Data-In");
        assert_eq!(p.bhs[0], 0x25, "Data-In");
        let itt = p.u32(16);
        let n = got.entry(itt).or_insert(0usize);
        *n += p.data.len();
        if p.bhs[1] & 0x01 != 0 {
            // S: the status is in this last Data-In PDU (RFC 7143 11.7.1).
            assert_eq!(p.bhs[3], 0, "GOOD");
            assert_eq!(*n, LEN as usize, "data of ITT {itt:#x}");
            good.push(itt);
        }
    }
    let mut answered: Vec<u32> = full.iter().chain(&good).copied().collect();
    answered.sort_unstable();
    itts.sort_unstable();
    assert_eq!(answered, itts, "one answer per READ");
    assert_eq!(entered(), 8);
    // Their data out, the budget is back: the next READ runs.
    let (b, _) = read(&mut c);
    c.send(b, &[]).await;
    let mut n = 0;
    loop {
        let p = c.recv().await.expect("Data-In");
        assert_eq!(p.bhs[0], 0x25, "Data-In");
        n += p.data.len();
        if p.bhs[1] & 0x01 != 0 {
            assert_eq!((p.bhs[3], n), (0, LEN as usize));
            break;
        }
    }
    assert_eq!(entered(), 9);
}

fn abort_task(c: &Client, itt: u32, ref_itt: u32, ref_cmdsn: u32) -> [u8; 48] {
    // ABORT TASK (RFC 7143 11.5), immediate.
    let mut t = [0u8; 48];
    t[0] = 0x42; // I=1, Task Management Function Request
    t[1] = 0x81; // F=1, function 1 (ABORT TASK)
    t[16..20].copy_from_slice(&itt.to_be_bytes());
    t[20..24].copy_from_slice(&ref_itt.to_be_bytes()); // Referenced Task Tag
    t[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    t[32..36].copy_from_slice(&ref_cmdsn.to_be_bytes()); // RefCmdSN
    t
}

#[tokio::test]
async fn abort_task_of_a_write_inside_the_backend_completes_and_suppresses_its_response() {
    // WRITE(10) of one block with its data as immediate data; it stops inside the driver.
    let (driver, _addr, _server, mut c, itt) = a_write_held_in_the_backend(0x5A).await;
    let t = abort_task(&c, 100, itt, c.cmdsn - 1);
    c.send(t, &[]).await;
    // The TMF waits for the write it cannot stop; let the write finish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    driver.gate.add_permits(1);
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22, "Task Management Function Response");
    assert_eq!(r.u32(16), 100, "ITT of the TMF");
    // Whichever came first in the SCSI layer, the initiator must be able to tell: either the
    // task was aborted (Function complete, no response of its own follows), or it finished
    // (Task does not exist) and its response came before this one.
    assert_eq!(
        r.bhs[2], 0,
        "Function complete: the abort reached the task first"
    );
    assert!(
        c.recv().await.is_none(),
        "no SCSI Response for the aborted task"
    );
}

#[tokio::test]
async fn abort_task_still_collecting_data() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1));
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31);
    // ABORT TASK (RFC 7143 11.5), immediate.
    let mut t = [0u8; 48];
    t[0] = 0x42;
    t[1] = 0x81; // F=1, function 1
    t[16..20].copy_from_slice(&100u32.to_be_bytes());
    t[20..24].copy_from_slice(&itt.to_be_bytes()); // Referenced Task Tag
    t[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    t[32..36].copy_from_slice(&(c.cmdsn - 1).to_be_bytes()); // RefCmdSN
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22);
    assert_eq!(r.bhs[2], 0, "Function complete");
    assert_eq!(r.u32(16), 100);
    // No SCSI Response for the aborted task follows.
    assert!(c.recv().await.is_none());
}

/// SAM-5 7.2: ABORT TASK names a task by its logical unit and tag; for a task collecting data
/// for LUN 0, an ABORT TASK with LUN 1 names no task (RFC 7143 11.6.1: Task does not exist,
/// 1), and the write goes on.
#[tokio::test]
async fn abort_task_with_another_lun_does_not_abort_the_task() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1));
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31);
    let mut t = abort_task(&c, 100, itt, c.cmdsn - 1);
    t[8..16].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // LUN 1 (SAM-5 4.7: peripheral)
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22);
    assert_eq!(r.bhs[2], 1, "Task does not exist");
    // The write is still there: its Data-Out completes it.
    c.send(data_out(itt, r2t.u32(20), 0, 0, true), &[0x5A; 512])
        .await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21, "SCSI Response");
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
}

/// The same with the task inside the backend and LUN 1 an LU of the target: LU 1 has no task
/// of that tag, so the answer is Task does not exist (RFC 7143 11.5.1 c) at once, not after
/// LUN 0's task ends; a second such request is answered too.
#[tokio::test]
async fn abort_task_naming_another_lu_is_answered_while_the_task_runs() {
    let driver = Arc::new(GatedDriver::new(None));
    let other: Arc<dyn block::Driver> = Arc::new(block::driver::mem::MemDriver::new(1 << 20));
    let (addr, _server) = start_with_luns(
        vec![driver.clone(), other],
        Auth::default(),
        Auth::default(),
    )
    .await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    // WRITE(10) of one block with its data as immediate data: it stops inside LU 0's driver.
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1));
    let entered = driver.entered.notified();
    c.send(b, &[0x5A; 512]).await;
    entered.await;
    for tmf_itt in [100, 101] {
        let mut t = abort_task(&c, tmf_itt, itt, c.cmdsn - 1);
        t[8..16].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // LUN 1 (SAM-5 4.7: peripheral)
        c.send(t, &[]).await;
        let r = c.recv().await.expect("TMF Response while the write waits");
        assert_eq!((r.bhs[0], r.u32(16)), (0x22, tmf_itt), "the TMF's response");
        assert_eq!(r.bhs[2], 1, "Task does not exist");
    }
    driver.gate.add_permits(1);
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(
        (rsp.bhs[0], rsp.u32(16)),
        (0x21, itt),
        "the write's response"
    );
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
}

#[tokio::test]
async fn logout_closes_the_session() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let mut b = [0u8; 48];
    b[0] = 0x46; // I=1, Logout Request
    b[1] = 0x80; // reason 0: close the session
    b[16..20].copy_from_slice(&3u32.to_be_bytes());
    b[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    c.send(b, &[]).await;
    let r = c.recv().await.expect("Logout Response");
    assert_eq!(r.bhs[0], 0x26);
    assert_eq!(r.bhs[2], 0, "closed successfully");
    let mut buf = [0u8; 1];
    let n = c.s.read(&mut buf).await.expect("read after logout");
    assert_eq!(n, 0, "connection closed");
}

#[tokio::test]
async fn oversized_data_segment_ends_the_connection() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let mut b = [0u8; 48];
    b[0] = 0x40; // NOP-Out
    b[1] = 0x80;
    b[5..8].copy_from_slice(&[0xff, 0xff, 0xff]); // 16 MiB - 1 > MaxRecvDataSegmentLength
    c.s.write_all(&b).await.expect("send");
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), c.s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

async fn closed(c: &mut Client) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), c.s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn idle_session_is_pinged_and_dropped_when_the_ping_is_unanswered() {
    let (addr, server) = start_server().await;
    server.set_nop_interval(Duration::from_millis(200));
    let mut c = Client::login(addr, "").await;
    let ping = c.recv().await.expect("NOP-In ping");
    assert_eq!(ping.bhs[0], 0x20, "NOP-In");
    assert_eq!(
        ping.u32(16),
        0xffff_ffff,
        "ITT reserved: a ping, not a response"
    );
    assert_ne!(ping.u32(20), 0xffff_ffff, "TTT asks for an answer");
    assert!(closed(&mut c).await, "unanswered ping ends the connection");
}

#[tokio::test]
async fn answered_ping_keeps_the_session() {
    let (addr, server) = start_server().await;
    server.set_nop_interval(Duration::from_millis(200));
    let mut c = Client::login(addr, "").await;
    for _ in 0..3 {
        let ping = c.recv().await.expect("NOP-In ping");
        // NOP-Out answer: immediate, ITT 0xffffffff, TTT copied (RFC 7143 11.18).
        c.send(c.nop_out(0xffff_ffff, ping.u32(20)), &[]).await;
    }
    assert_eq!(server.sessions().len(), 1);
}

/// RFC 7143 11.18: a NOP-Out may answer the target's ping (its TTT copied) and ask for a
/// NOP-In of its own (a valid ITT) at once: it is both answered and taken as the answer.
#[tokio::test]
async fn a_ping_answered_by_a_nop_out_that_asks_for_an_answer_keeps_the_session() {
    let (addr, server) = start_server().await;
    server.set_nop_interval(Duration::from_millis(200));
    let mut c = Client::login(addr, "").await;
    for itt in 7..10u32 {
        let ping = c.recv().await.expect("NOP-In ping");
        assert_eq!((ping.bhs[0], ping.u32(16)), (0x20, 0xffff_ffff), "a ping");
        c.send(c.nop_out(itt, ping.u32(20)), &[]).await;
        let echo = c.recv().await.expect("NOP-In answer");
        assert_eq!(
            (echo.bhs[0], echo.u32(16)),
            (0x20, itt),
            "the answer to ITT {itt}"
        );
        assert_eq!(echo.u32(20), 0xffff_ffff, "an answer, TTT reserved");
    }
    assert!(!closed(&mut c).await, "the pings were answered");
    assert_eq!(server.sessions().len(), 1);
}

/// A write whose data the target asked for with an R2T and never got ends the connection once
/// the data-out timeout passes, even while the initiator answers every ping: otherwise the
/// write, its place in the LU's order and its buffer would be held for as long as the
/// initiator liked.
#[tokio::test]
async fn a_write_whose_data_never_comes_ends_the_connection() {
    let (addr, server) = start_server().await;
    server.set_nop_interval(Duration::from_millis(200));
    server.set_data_out_timeout(Duration::from_millis(600));
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    // WRITE(10) of one block, F and W set, no immediate data: InitialR2T=Yes, so the target
    // asks for the data with an R2T (opcode 0x31).
    let (w, _) = c.command(0xa1, 512, &write10(0, 1));
    c.send(w, &[]).await;
    let mut r2t = false;
    for _ in 0..50 {
        let Some(p) = c.recv().await else { break };
        match p.bhs[0] & 0x3f {
            0x31 => r2t = true,
            0x20 => {
                // Answer the ping: ITT 0xffffffff, its TTT.
                c.send(c.nop_out(0xffff_ffff, p.u32(20)), &[]).await;
            }
            other => panic!("unexpected PDU {other:#x}"),
        }
    }
    assert!(r2t, "no R2T");
    assert!(
        closed(&mut c).await,
        "the connection outlived the data-out timeout"
    );
}

#[tokio::test]
async fn login_with_the_same_isid_reinstates_the_session() {
    let (addr, server) = start_server().await;
    let mut old = Client::login(addr, "").await;
    let _new = Client::login(addr, "").await;
    assert!(closed(&mut old).await, "the old connection is closed");
    assert_eq!(server.sessions().len(), 1);
    let _other = Client::login_isid(addr, "", [0x80, 9, 9, 9, 9, 9]).await;
    assert_eq!(server.sessions().len(), 2);
}

/// RFC 7143 6.3.5 (session reinstatement) with SAM-5 6.3.4 (I_T nexus loss ends the nexus's
/// tasks): a login that reinstates a session while one of the old session's writes is still in
/// the backend completes only after that write has finished, so the old write cannot land on
/// top of what the new session writes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstatement_waits_for_the_old_sessions_write_in_the_backend() {
    // WRITE(10) of 0xAA to LBA 0, as immediate data; it stops inside the driver.
    let (driver, addr, _server, old, _) = a_write_held_in_the_backend(0xAA).await;
    // The connection is lost and the initiator logs in again with the same ISID.
    drop(old);
    let login = tokio::spawn(async move { Client::login(addr, "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !login.is_finished(),
        "the reinstating login completed while the old session's write was in the backend"
    );
    driver.gate.add_permits(16);
    let mut new = login.await.expect("login task");
    new.clear_unit_attention().await;
    // The new session writes 0xBB to the same block and reads it back.
    let (b, _) = new.command(0xa1, 512, &write10(0, 1));
    new.send(b, &[0xBB; 512]).await;
    let r = new.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    assert_eq!(r.bhs[3], 0, "GOOD");
    let data: Vec<u8> = read_data_in(&mut new, 512)
        .await
        .iter()
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(
        data,
        vec![0xBB; 512],
        "the new session's data, not the old one's"
    );
}

/// RFC 7143 6.3.5, with an initiator that retries its login while the first attempt still
/// waits for the old session's write: of the two logins reinstating one session only the newer
/// gets in. Were the older let in too, two sessions would share one I_T nexus, and the end of
/// the abandoned one would end the other's commands and reservations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_logins_reinstating_one_session_only_the_newer_gets_in() {
    let (driver, addr, server, old, _) = a_write_held_in_the_backend(0xAA).await;
    drop(old);
    // Both as `Client::login`: the same initiator name and ISID as the old session.
    let first = tokio::spawn(Client::try_login(addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn(Client::try_login(addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished() && !second.is_finished());
    // The old session's write finishes; the gate then holds writes again.
    driver.gate.add_permits(1);
    let mut second = second
        .await
        .expect("login task")
        .expect("the newer login gets in");
    // Status-Class 3, Status-Detail 1: Service Unavailable (RFC 7143 11.13.5).
    assert_eq!(
        first.await.expect("login task").err(),
        Some(0x0301),
        "the older login is turned away"
    );
    assert_eq!(server.sessions().len(), 1);
    second.clear_unit_attention().await;
    let (b, _) = second.command(0xa1, 512, &write10(0, 1));
    second.send(b, &[0xBB; 512]).await;
    let r = second.recv().await.expect("SCSI Response");
    assert_eq!((r.bhs[0], r.bhs[3]), (0x21, 0), "SCSI Response, GOOD");
}

/// A login still waiting for the old session when the server shuts down does not get in:
/// no session outlives `Server::shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_waiting_to_reinstate_across_shutdown_does_not_get_in() {
    let (driver, addr, server, old, _) = a_write_held_in_the_backend(0xAA).await;
    drop(old);
    let login = tokio::spawn(Client::try_login(addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!login.is_finished());
    server.shutdown();
    driver.gate.add_permits(16);
    // Status-Class 3, Status-Detail 1: Service Unavailable (RFC 7143 11.13.5).
    assert_eq!(
        login.await.expect("login task").err(),
        Some(0x0301),
        "a login got in after shutdown"
    );
    assert!(server.sessions().is_empty());
}

/// The refusal of a login whose last request completed it (RFC 7143 11.13): the session
/// never came to be, so the response names the request's stage and no TSIH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_final_login_response_keeps_the_request_s_stage_and_no_tsih() {
    let (driver, addr, server, old, _) = a_write_held_in_the_backend(0xAA).await;
    drop(old);
    // One request that completes the login (T=1, CSG=1, NSG=3), with every key the target
    // would otherwise offer, so that its response is the final one.
    let (mut c, _) = Client::start_login(
        addr,
        INITIATOR,
        "InitialR2T=Yes|ImmediateData=Yes|MaxBurstLength=262144|FirstBurstLength=65536|",
        ISID,
    )
    .await;
    // The login waits for the old session, whose write is held; the server then shuts down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown();
    driver.gate.add_permits(16);
    let r = c.recv().await.expect("Login Response");
    assert_eq!(r.bhs[0], 0x23, "Login Response");
    // Status-Class 3, Status-Detail 1: Service Unavailable.
    assert_eq!(&r.bhs[36..38], &[0x03, 0x01]);
    // T=0, C=0, CSG=1 (the request's stage), NSG=0.
    assert_eq!(r.bhs[1], 0x04, "flags");
    assert_eq!(&r.bhs[14..16], &[0, 0], "TSIH: no session was made");
}

/// `Server::shutdown` ends every session and every connection still logging in, and
/// `Server::closed` returns only once the sessions' commands have settled in the backend: the
/// daemon flushes its images after that, so no write lands after the final flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_connection_and_closed_waits_for_the_backend() {
    let (driver, addr, server, mut session, _) = a_write_held_in_the_backend(0xAA).await;
    // A connection in the login phase that has sent nothing yet.
    let mut logging_in = tokio::net::TcpStream::connect(addr).await.expect("connect");
    server.shutdown();
    for (what, stream) in [
        ("logging in", &mut logging_in),
        ("of the session", &mut session.s),
    ] {
        // The held write's response is suppressed, so nothing arrives before the end. A
        // connection still in the listen backlog when the listener closes is reset instead.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
        let closed = match &read {
            Ok(Ok(0)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            _ => false,
        };
        assert!(closed, "the connection {what} is closed: {read:?}");
    }
    let closed = tokio::spawn({
        let server = server.clone();
        async move { server.closed().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !closed.is_finished(),
        "closed returned while a write was still in the backend"
    );
    driver.gate.add_permits(16);
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("closed returns once the write has settled")
        .expect("closed task");
    assert!(server.sessions().is_empty());
}

#[tokio::test]
async fn target_cold_reset_drops_every_connection() {
    let addr = start().await;
    let mut a = Client::login(addr, "").await;
    let mut b = Client::login_isid(addr, "", [0x80, 7, 7, 7, 7, 7]).await;
    let mut t = [0u8; 48];
    t[0] = 0x42; // I=1, TMF Request
    t[1] = 0x87; // F=1, TARGET COLD RESET
    t[16..20].copy_from_slice(&50u32.to_be_bytes());
    t[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    t[24..28].copy_from_slice(&a.cmdsn.to_be_bytes());
    a.send(t, &[]).await;
    let r = a.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22);
    assert_eq!(r.bhs[2], 0, "Function complete");
    assert!(closed(&mut a).await);
    assert!(closed(&mut b).await);
}

#[tokio::test]
async fn unsupported_tmf_function_is_answered_not_supported() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let mut t = [0u8; 48];
    t[0] = 0x42;
    t[1] = 0x83; // F=1, CLEAR ACA
    t[16..20].copy_from_slice(&51u32.to_be_bytes());
    t[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[2], 5, "Task management function not supported");
}

/// Send 20,000 NOP-Out pings of 4 KiB from `c` without reading a response (each is answered
/// with its data): the target stops reading `c` once its answers back up (backpressure), which
/// blocks the task.
fn flood_with_pings(mut c: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let payload = vec![0x5au8; 4096];
        for i in 0..20_000u32 {
            c.send(c.nop_out(i, 0xffff_ffff), &payload).await;
        }
    })
}

/// A session whose reader waits for an initiator that does not read its responses still ends
/// at once when told to (here by `Server::shutdown`), not after the writer stall limit (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_held_by_backpressure_ends_at_once_on_shutdown() {
    let (addr, server) = start_server().await;
    let flood = Client::login(addr, "").await;
    let flooder = flood_with_pings(flood);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !flooder.is_finished(),
        "the target stopped reading the flooder"
    );
    server.shutdown();
    // The writer still gets its 5 s to drain before it is dropped; the stall limit is 30 s.
    tokio::time::timeout(Duration::from_secs(15), server.closed())
        .await
        .expect("the session ends without waiting out the writer stall");
    flooder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiator_that_never_reads_does_not_stall_others() {
    let addr = start().await;
    let flood = Client::login(addr, "").await;
    let flooder = flood_with_pings(flood);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The flooder is blocked by backpressure (the target stopped reading it).
    assert!(!flooder.is_finished());
    let mut c = Client::login_isid(addr, "", [0x80, 3, 3, 3, 3, 3]).await;
    c.send(c.nop_out(1, 0xffff_ffff), b"hi").await;
    let r = c.recv().await.expect("NOP-In");
    assert_eq!(r.data, b"hi");
    flooder.abort();
}

/// A server with `n` targets (one LU each, the first named [`TARGET`]).
async fn start_many(n: usize) -> std::net::SocketAddr {
    let targets = (0..n)
        .map(|i| {
            let lu = lu_on(
                Arc::new(block::driver::mem::MemDriver::new(1 << 20)),
                i as u64,
            );
            let mut t = scsi::Target::new();
            t.add_lu(0, Arc::new(lu));
            TargetConfig {
                name: if i == 0 {
                    TARGET.into()
                } else {
                    format!("iqn.2026-01.io.sharedisk:a-rather-long-target-name-{i:04}")
                },
                alias: None,
                scsi: Arc::new(t),
                allowed_initiators: None,
                auth: Auth::default(),
                tpgt: 1,
            }
        })
        .collect();
    let server = Server::new(ServerConfig {
        targets,
        discovery_auth: Auth::default(),
        portals: vec!["192.0.2.1:3260".parse().expect("portal")],
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server.serve(listener));
    addr
}

/// Log in to a discovery session (RFC 7143 4.3), declaring `mrdsl`.
async fn discovery(addr: std::net::SocketAddr, mrdsl: u32) -> Client {
    let mut c = Client::connect(addr).await;
    let mut b = [0u8; 48];
    b[0] = 0x43; // I=1, Login Request
    b[1] = 0x87; // T=1, CSG=1, NSG=3
    b[8..14].copy_from_slice(&[0x80, 4, 4, 4, 4, 4]);
    b[24..28].copy_from_slice(&1u32.to_be_bytes());
    let text = format!(
        "InitiatorName=iqn.2026-01.test:disc\0SessionType=Discovery\0MaxRecvDataSegmentLength={mrdsl}\0"
    );
    c.send(b, text.as_bytes()).await;
    let r = c.recv().await.expect("login response");
    assert_eq!(&r.bhs[36..38], &[0, 0], "status success");
    c
}

fn text_request(c: &Client, itt: u32, ttt: u32, data: &[u8]) -> ([u8; 48], Vec<u8>) {
    let mut b = [0u8; 48];
    b[0] = 0x44; // I=1, Text Request
    b[1] = 0x80; // F=1
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&ttt.to_be_bytes());
    b[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    (b, data.to_vec())
}

#[tokio::test]
async fn long_send_targets_answer_continues_with_the_c_bit() {
    let addr = start_many(40).await;
    let mut c = discovery(addr, 512).await;
    let (b, d) = text_request(&c, 5, 0xffff_ffff, b"SendTargets=All\0");
    c.send(b, &d).await;
    let mut all = Vec::new();
    loop {
        let r = c.recv().await.expect("Text Response");
        assert_eq!(r.bhs[0], 0x24);
        assert!(
            r.data.len() <= 512,
            "never above the initiator's MaxRecvDataSegmentLength"
        );
        all.extend_from_slice(&r.data);
        if r.bhs[1] & 0x80 != 0 {
            assert_eq!(r.u32(20), 0xffff_ffff, "final response: TTT reserved");
            break;
        }
        assert_eq!(r.bhs[1] & 0x40, 0x40, "C=1 while more follows");
        // Ask for the rest with an empty Text Request carrying the TTT (RFC 7143 11.10.4).
        let (b, d) = text_request(&c, 5, r.u32(20), b"");
        c.send(b, &d).await;
    }
    let text = String::from_utf8(all).expect("text");
    assert_eq!(text.matches("TargetName=").count(), 40);
    assert_eq!(text.matches("TargetAddress=192.0.2.1:3260,1").count(), 40);
}

#[tokio::test]
async fn send_targets_for_one_name_and_for_an_unknown_name() {
    let addr = start_many(3).await;
    let mut c = discovery(addr, 8192).await;
    let (b, d) = text_request(
        &c,
        6,
        0xffff_ffff,
        format!("SendTargets={TARGET}\0").as_bytes(),
    );
    c.send(b, &d).await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(
        String::from_utf8(r.data).expect("text"),
        format!("TargetName={TARGET}\0TargetAddress=192.0.2.1:3260,1\0")
    );
    // The name in capitals: the same target (RFC 3722 case folding).
    let (b, d) = text_request(
        &c,
        9,
        0xffff_ffff,
        format!("SendTargets={}\0", TARGET.to_uppercase()).as_bytes(),
    );
    c.send(b, &d).await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(
        String::from_utf8(r.data).expect("text"),
        format!("TargetName={TARGET}\0TargetAddress=192.0.2.1:3260,1\0")
    );
    let (b, d) = text_request(&c, 7, 0xffff_ffff, b"SendTargets=iqn.2026-01.nope\0");
    c.send(b, &d).await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.data, b"SendTargets=Reject\0");
    let (b, d) = text_request(&c, 8, 0xffff_ffff, b"SendTargetsPlease=All\0");
    c.send(b, &d).await;
    let r = c.recv().await.expect("Text Response");
    assert_eq!(r.data, b"SendTargetsPlease=NotUnderstood\0");
}

#[tokio::test]
async fn scsi_command_in_a_discovery_session_is_rejected() {
    let addr = start_many(1).await;
    let mut c = discovery(addr, 8192).await;
    let (b, _) = c.command(0x81, 0, &[0; 6]);
    c.send(b, &[]).await;
    let r = c.recv().await.expect("Reject");
    assert_eq!(r.bhs[0], 0x3f);
    assert_eq!(r.bhs[2], 0x04, "protocol error");
}

fn data_out(itt: u32, ttt: u32, datasn: u32, offset: u32, last: bool) -> [u8; 48] {
    // Data-Out (RFC 7143 11.7).
    let mut d = [0u8; 48];
    d[0] = 0x05;
    d[1] = if last { 0x80 } else { 0 }; // F
    d[16..20].copy_from_slice(&itt.to_be_bytes());
    d[20..24].copy_from_slice(&ttt.to_be_bytes());
    d[36..40].copy_from_slice(&datasn.to_be_bytes()); // DataSN
    d[40..44].copy_from_slice(&offset.to_be_bytes()); // Buffer Offset
    d
}

#[tokio::test]
async fn immediate_then_unsolicited_then_solicited_data() {
    let addr = start().await;
    let mut c = Client::login(
        addr,
        "InitialR2T=No|ImmediateData=Yes|FirstBurstLength=1024|MaxBurstLength=2048|",
    )
    .await;
    c.clear_unit_attention().await;
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    // WRITE(10) of 8 blocks, F=0 (unsolicited Data-Out follows), 512 bytes immediate.
    let (b, itt) = c.command(0x21, 4096, &write10(20, 8));
    c.send(b, &payload[..512]).await;
    // The rest of the first burst: unsolicited, TTT 0xffffffff, DataSN 0, F=1.
    c.send(
        data_out(itt, 0xffff_ffff, 0, 512, true),
        &payload[512..1024],
    )
    .await;
    let mut offset = 1024u32;
    for (r2tsn, len) in [(0u32, 2048u32), (1, 1024)] {
        let r2t = c.recv().await.expect("R2T");
        assert_eq!(r2t.bhs[0], 0x31);
        assert_eq!(r2t.u32(36), r2tsn, "R2TSN");
        assert_eq!(r2t.u32(40), offset, "Buffer Offset");
        assert_eq!(r2t.u32(44), len, "Desired Data Transfer Length");
        let ttt = r2t.u32(20);
        let end = (offset + len) as usize;
        c.send(
            data_out(itt, ttt, 0, offset, true),
            &payload[offset as usize..end],
        )
        .await;
        offset += len;
    }
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21);
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
    let (b, _) = c.command(0xc1, 4096, &read10(20, 8));
    c.send(b, &[]).await;
    let mut got = Vec::new();
    while got.len() < 4096 {
        let d = c.recv().await.expect("Data-In");
        got.extend_from_slice(&d.data);
    }
    assert_eq!(got, payload);
}

/// The PDU answering a NOP-Out ping sent now: the next one the target sends, unless it had
/// already queued another, as PDUs are handled in the order they arrive.
async fn next_after_ping(c: &mut Client) -> Pdu {
    c.send(c.nop_out(0x7e57, 0xffff_ffff), &[]).await;
    c.recv().await.expect("a PDU")
}

/// Assert that `p` is the NOP-In answering [`next_after_ping`]: nothing came before it.
fn assert_ping_answer(p: &Pdu, what: &str) {
    assert_eq!((p.bhs[0] & 0x3f, p.u32(16)), (0x20, 0x7e57), "{what}");
}

#[tokio::test]
async fn out_of_order_data_sn_ends_the_task_with_check_condition() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=No|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0x21, 1536, &write10(0, 3));
    c.send(b, &[]).await;
    c.send(data_out(itt, 0xffff_ffff, 1, 0, false), &[0; 512])
        .await; // DataSN 1, expected 0
                // RFC 7143 11.4: the response waits for the Data-Out with the F bit set that ends the
                // unsolicited data still expected.
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "no response while unsolicited data is still expected");
    c.send(data_out(itt, 0xffff_ffff, 1, 512, false), &[0; 512])
        .await;
    c.send(data_out(itt, 0xffff_ffff, 2, 1024, true), &[0; 512])
        .await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21);
    assert_eq!(rsp.bhs[3], 0x02, "CHECK CONDITION");
    // SenseLength, then fixed sense: ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (47h/05h).
    assert_eq!(rsp.data[2 + 2] & 0x0f, 0x0b);
    assert_eq!(&rsp.data[2 + 12..2 + 14], &[0x47, 0x05]);
    // The session goes on.
    let (b, _) = c.command(0x81, 0, &[0; 6]);
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response to TEST UNIT READY");
    assert_eq!(r.bhs[3], 0x00);
}

/// A write whose CmdSN is ahead of ExpCmdSN is held until the gap fills (RFC 7143 4.2.2.1);
/// its unsolicited Data-Out follows it on the connection meanwhile (11.4) and is its data,
/// kept for it: once the gap fills, the write completes with that data, with no R2T and no
/// wait for data already sent.
#[tokio::test]
async fn unsolicited_data_of_a_write_held_for_its_cmdsn_is_kept_for_it() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=No|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    // CmdSN n is skipped: the write goes with n + 1.
    let gap = c.cmdsn;
    c.cmdsn += 1;
    let (b, itt) = c.command(0x21, 1024, &write10(8, 2)); // F=0 (data follows), W=1, SIMPLE
    c.send(b, &[]).await;
    c.send(data_out(itt, 0xffff_ffff, 0, 0, false), &[0xA5; 512])
        .await;
    c.send(data_out(itt, 0xffff_ffff, 1, 512, true), &[0x5A; 512])
        .await;
    // Nothing is answered while the write is held: a ping (immediate) comes back first.
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "the write waits for CmdSN n");
    // TEST UNIT READY with CmdSN n fills the gap.
    let mut t = [0u8; 48];
    t[0] = 0x01;
    t[1] = 0x80; // F=1
    t[16..20].copy_from_slice(&0x7000u32.to_be_bytes());
    t[24..28].copy_from_slice(&gap.to_be_bytes());
    c.send(t, &[]).await;
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let r = c.recv().await.expect("SCSI Responses, no R2T");
        assert_eq!(
            r.bhs[0], 0x21,
            "a SCSI Response, got opcode {:#x}",
            r.bhs[0]
        );
        assert_eq!(r.bhs[3], 0x00, "GOOD");
        answered.push(r.u32(16));
    }
    answered.sort_unstable();
    assert_eq!(answered, [itt, 0x7000]);
    // The blocks hold the Data-Outs' bytes.
    let (b, _) = c.command(0xc1, 1024, &read10(8, 2));
    c.send(b, &[]).await;
    let mut got = Vec::new();
    while got.len() < 1024 {
        let d = c.recv().await.expect("Data-In");
        assert_eq!(d.bhs[0], 0x25, "Data-In");
        got.extend_from_slice(&d.data);
    }
    assert_eq!(&got[..512], &[0xA5; 512][..]);
    assert_eq!(&got[512..], &[0x5A; 512][..]);
}

/// A held write that gets more unsolicited data than FirstBurstLength allows ends, once the
/// gap fills, as a write that runs at once would: CHECK CONDITION, ABORTED COMMAND,
/// UNEXPECTED UNSOLICITED DATA (0Ch/0Ch, RFC 7143 11.4.7.2).
#[tokio::test]
async fn a_held_write_with_too_much_unsolicited_data_ends_with_unexpected_unsolicited_data() {
    let addr = start().await;
    let mut c = Client::login(
        addr,
        "InitialR2T=No|ImmediateData=No|FirstBurstLength=512|MaxBurstLength=512|",
    )
    .await;
    c.clear_unit_attention().await;
    let gap = c.cmdsn;
    c.cmdsn += 1;
    let (b, itt) = c.command(0x21, 1024, &write10(8, 2)); // F=0, W=1, SIMPLE
    c.send(b, &[]).await;
    c.send(data_out(itt, 0xffff_ffff, 0, 0, false), &[0xA5; 512])
        .await;
    // Beyond the first burst of 512 bytes.
    c.send(data_out(itt, 0xffff_ffff, 1, 512, true), &[0x5A; 512])
        .await;
    let mut t = [0u8; 48];
    t[0] = 0x01;
    t[1] = 0x80; // F=1: TEST UNIT READY with CmdSN n fills the gap
    t[16..20].copy_from_slice(&0x7000u32.to_be_bytes());
    t[24..28].copy_from_slice(&gap.to_be_bytes());
    c.send(t, &[]).await;
    let mut write = None;
    for _ in 0..2 {
        let r = c.recv().await.expect("SCSI Responses");
        assert_eq!(
            r.bhs[0], 0x21,
            "a SCSI Response, got opcode {:#x}",
            r.bhs[0]
        );
        if r.u32(16) == itt {
            write = Some(r);
        }
    }
    let r = write.expect("the write's response");
    assert_eq!(r.bhs[3], 0x02, "CHECK CONDITION");
    assert_eq!(sense_of(&r), (0x0b, 0x0c, 0x0c));
}

/// Fixed sense after the SCSI Response's SenseLength: (sense key, ASC, ASCQ).
fn sense_of(rsp: &Pdu) -> (u8, u8, u8) {
    (rsp.data[2 + 2] & 0x0f, rsp.data[2 + 12], rsp.data[2 + 13])
}

/// A write refused by its CDB (here: a LUN with no LU) whose unsolicited data is still to
/// come is answered only once that data is in (RFC 7143 11.4), and nothing is written.
#[tokio::test]
async fn a_refused_write_is_answered_after_its_unsolicited_data() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=No|ImmediateData=Yes|").await;
    c.clear_unit_attention().await;
    let (mut b, itt) = c.command(0x21, 1536, &write10(0, 3));
    b[9] = 5; // LUN 5: no such LU
    c.send(b, &[0xee; 512]).await; // one block immediate, two unsolicited to follow
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "no response while unsolicited data is still expected");
    c.send(data_out(itt, 0xffff_ffff, 0, 512, false), &[0xee; 512])
        .await;
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "no response before the Data-Out with the F bit set");
    c.send(data_out(itt, 0xffff_ffff, 1, 1024, true), &[0xee; 512])
        .await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!((rsp.bhs[0], rsp.u32(16)), (0x21, itt));
    assert_eq!(rsp.bhs[3], 0x02, "CHECK CONDITION");
    // ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
    assert_eq!(sense_of(&rsp), (0x05, 0x25, 0x00));
    // LUN 0 was not written.
    let (b, _) = c.command(0xc1, 1536, &read10(0, 3));
    c.send(b, &[]).await;
    let mut got = Vec::new();
    while got.len() < 1536 {
        let d = c.recv().await.expect("Data-In");
        got.extend_from_slice(&d.data);
    }
    assert!(got.iter().all(|&x| x == 0), "nothing written");
}

/// A Data-Out that breaks the rules in the middle of an R2T's sequence ends its task, but
/// the response waits for the sequence's last PDU (F bit set), and no further R2T is sent
/// (RFC 7143 11.4).
#[tokio::test]
async fn a_failed_solicited_sequence_is_answered_after_its_last_data_out() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|MaxBurstLength=2048|").await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0xa1, 4096, &write10(0, 8));
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!((r2t.bhs[0], r2t.u32(40), r2t.u32(44)), (0x31, 0, 2048));
    let ttt = r2t.u32(20);
    c.send(data_out(itt, ttt, 0, 0, false), &[0xee; 1024]).await;
    // DataSN 5 where 1 is expected: the task ends (11.4.7.2, at ErrorRecoveryLevel 0).
    c.send(data_out(itt, ttt, 5, 1024, false), &[0xee; 512])
        .await;
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "no response while the R2T's data is still expected");
    // Unsolicited data of the R2T's length without the F bit: not of the R2T's sequence, so
    // reaching its end does not end it.
    c.send(data_out(itt, 0xffff_ffff, 0, 0, false), &[0xee; 2048])
        .await;
    let p = next_after_ping(&mut c).await;
    assert_ping_answer(&p, "data of another sequence does not end this one");
    c.send(data_out(itt, ttt, 2, 1536, true), &[0xee; 512])
        .await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(
        (rsp.bhs[0], rsp.u32(16)),
        (0x21, itt),
        "the response, no R2T"
    );
    assert_eq!(rsp.bhs[3], 0x02, "CHECK CONDITION");
    // ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (47h/05h).
    assert_eq!(sense_of(&rsp), (0x0b, 0x47, 0x05));
    assert_eq!(rsp.u32(36), 1, "ExpDataSN counts the one R2T");
}

/// A memory driver with a bug: a write whose data starts with 0xEE panics.
struct BuggyDriver(block::driver::mem::MemDriver);

#[async_trait::async_trait]
impl block::Driver for BuggyDriver {
    fn info(&self) -> block::DriverInfo {
        self.0.info()
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, block::BlockError> {
        self.0.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), block::BlockError> {
        assert_ne!(d.first(), Some(&0xEE), "the driver's bug");
        self.0.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), block::BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.0.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), block::BlockError> {
        self.0.write_zeroes(o, l, u).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<block::Extent, block::BlockError> {
        self.0.block_status(o, l).await
    }
}

/// A command that meets a bug (a panic) below the SCSI layer fails alone, with CHECK
/// CONDITION, instead of ending the session without an answer; the session goes on.
#[tokio::test]
async fn a_command_that_panics_fails_alone_with_internal_target_failure() {
    let (addr, _server) = start_with(Arc::new(BuggyDriver(block::driver::mem::MemDriver::new(
        16 << 20,
    ))))
    .await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let (b, _) = c.command(0xa1, 512, &write10(0, 1));
    c.send(b, &[0xEE; 512]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    assert_eq!(r.bhs[3], 0x02, "CHECK CONDITION");
    // SenseLength, then fixed sense: HARDWARE ERROR (4h), INTERNAL TARGET FAILURE (44h/00h).
    assert_eq!(r.data[2 + 2] & 0x0f, 0x04);
    assert_eq!(&r.data[2 + 12..2 + 14], &[0x44, 0x00]);
    // The session goes on: another write succeeds.
    let (b, _) = c.command(0xa1, 512, &write10(0, 1));
    c.send(b, &[0x11; 512]).await;
    let r = c.recv().await.expect("SCSI Response to the next WRITE");
    assert_eq!((r.bhs[0], r.bhs[3]), (0x21, 0x00), "SCSI Response, GOOD");
}

fn chap_auth() -> Auth {
    Auth {
        chap: Some(iscsi::ChapSecret {
            user: "user".into(),
            secret: "secretsecret".into(),
        }),
        mutual: None,
    }
}

/// Send one Login Request with T=1 CSG=0 NSG=3 and `text`; returns the response.
async fn login_skipping_security(addr: std::net::SocketAddr, text: &str) -> (Client, Pdu) {
    let mut c = Client::connect(addr).await;
    let mut b = [0u8; 48];
    b[0] = 0x43; // I=1, Login Request
    b[1] = 0x83; // T=1, CSG=0 (security), NSG=3 (full feature)
    b[8..14].copy_from_slice(&[0x80, 6, 6, 6, 6, 6]); // ISID
    b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    c.send(b, text.replace('|', "\0").as_bytes()).await;
    let r = c.recv().await.expect("login response");
    (c, r)
}

/// A Login Request whose data segment is beyond 8192 bytes, the limit of the login phase
/// (MaxRecvDataSegmentLength's default, RFC 7143 13.12), is answered with a Login Response
/// of status 0200h (initiator error) carrying its ITT, and the connection closes; so is a
/// PDU other than a Login Request (status 020Bh, invalid during login), with its own ITT.
#[tokio::test]
async fn a_login_request_with_too_much_data_or_another_pdu_is_answered_and_refused() {
    let addr = start().await;
    for (opcode, data_len, status) in [(0x43u8, 9000u32, [0x02, 0x00]), (0x40, 0, [0x02, 0x0b])] {
        let mut c = Client::connect(addr).await;
        let mut b = [0u8; 48];
        b[0] = opcode; // I=1, Login Request (43h) or NOP-Out (40h)
        b[1] = 0x83; // T=1, CSG=0, NSG=3
        b[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]); // DataSegmentLength
        b[8..14].copy_from_slice(&[0x80, 6, 6, 6, 6, 6]); // ISID
        b[16..20].copy_from_slice(&0x1234u32.to_be_bytes()); // ITT
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        c.s.write_all(&b).await.expect("send");
        let r = c.recv().await.expect("Login Response");
        assert_eq!(r.bhs[0], 0x23, "Login Response");
        assert_eq!(&r.bhs[36..38], &status, "Status-Class and Status-Detail");
        assert_eq!(r.u32(16), 0x1234, "the request's ITT");
        assert!(closed(&mut c).await, "the connection closes");
    }
}

#[tokio::test]
async fn auth_method_none_before_the_target_name_cannot_bypass_chap() {
    let driver = Arc::new(block::driver::mem::MemDriver::new(1 << 20));
    let (addr, server) = start_with_auth(driver, chap_auth(), Auth::default()).await;
    let (mut c, r) = login_skipping_security(
        addr,
        &format!("InitiatorName=iqn.2026-01.test:wire|AuthMethod=None|TargetName={TARGET}|"),
    )
    .await;
    assert_eq!(r.bhs[0], 0x23, "Login Response");
    assert_eq!(r.bhs[1] & 0x80, 0, "T=0: no transit");
    assert_eq!(r.bhs[36], 0x02, "Status-Class: initiator error");
    assert_eq!(r.bhs[37], 0x01, "Status-Detail: authentication failure");
    assert!(closed(&mut c).await);
    assert!(server.sessions().is_empty());
}

#[tokio::test]
async fn auth_method_none_before_the_session_type_cannot_bypass_discovery_chap() {
    let driver = Arc::new(block::driver::mem::MemDriver::new(1 << 20));
    let (addr, server) = start_with_auth(driver, Auth::default(), chap_auth()).await;
    let (mut c, r) = login_skipping_security(
        addr,
        "InitiatorName=iqn.2026-01.test:wire|AuthMethod=None|SessionType=Discovery|",
    )
    .await;
    assert_eq!(r.bhs[1] & 0x80, 0, "T=0: no transit");
    assert_eq!(&r.bhs[36..38], &[0x02, 0x01], "authentication failure");
    assert!(closed(&mut c).await);
    assert!(server.sessions().is_empty());
}

#[tokio::test]
async fn abort_task_with_a_ref_cmdsn_beyond_the_tmf_s_does_not_swallow_a_later_command() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let exp = c.cmdsn;
    // Immediate ABORT TASK for an unknown ITT: RefCmdSN ExpCmdSN+5 (inside the window) but
    // the TMF's own CmdSN far beyond MaxCmdSN, so RefCmdSN does not precede a valid CmdSN.
    let mut t = abort_task(&c, 100, 0x0bad_0bad, exp + 5);
    t[24..28].copy_from_slice(&(exp + 0x4000_0000).to_be_bytes()); // CmdSN
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22, "Task Management Function Response");
    assert_eq!(r.bhs[2], 1, "Task does not exist");
    // The six commands ExpCmdSN..ExpCmdSN+5 are all answered.
    for _ in 0..6 {
        let (b, _) = c.command(0x81, 0, &[0; 6]); // F, TEST UNIT READY
        c.send(b, &[]).await;
        let r = c.recv().await.expect("SCSI Response");
        assert_eq!(r.bhs[0], 0x21, "SCSI Response");
        assert_eq!(r.bhs[3], 0x00, "GOOD");
    }
}

#[tokio::test]
async fn abort_task_with_a_ref_cmdsn_outside_the_window_does_not_exist() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    let exp = c.cmdsn;
    // RefCmdSN beyond MaxCmdSN (the window is 128 wide), TMF CmdSN further still.
    let mut t = abort_task(&c, 101, 0x0bad_0bad, exp + 1000);
    t[24..28].copy_from_slice(&(exp + 2000).to_be_bytes()); // CmdSN
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[2], 1, "Task does not exist");
}

/// RFC 7143 3.2.2.1: a non-immediate command whose CmdSN duplicates one held in the window is
/// ignored, not put in the held one's place. With ExpCmdSN = N: TEST UNIT READY (ITT a) at
/// N+1 is held; a second one (ITT b) at N+1 is a duplicate; then N arrives and both held
/// CmdSNs run. a and N are answered, b never.
#[tokio::test]
async fn a_duplicate_cmdsn_in_the_window_is_ignored() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let tur = [0x00, 0, 0, 0, 0, 0];
    let n = c.cmdsn;
    c.cmdsn = n + 1;
    let (a, a_itt) = c.command(0x80, 0, &tur); // F, TEST UNIT READY, CmdSN N+1
    c.send(a, &[]).await;
    c.cmdsn = n + 1;
    let (b, b_itt) = c.command(0x80, 0, &tur); // the same CmdSN again
    c.send(b, &[]).await;
    c.cmdsn = n;
    let (first, first_itt) = c.command(0x80, 0, &tur); // CmdSN N
    c.send(first, &[]).await;
    let mut got = Vec::new();
    while let Some(p) = c.recv().await {
        got.push((p.bhs[0], p.u32(16), p.bhs[3]));
    }
    got.sort();
    let mut want = vec![(0x21, first_itt, 0x00), (0x21, a_itt, 0x00)];
    want.sort();
    assert_eq!(got, want, "no answer for ITT {b_itt:#x}, the duplicate");
}

/// ABORT TASK names a task, a SCSI command: a LOGICAL UNIT RESET held for its CmdSN (behind a
/// gap) with the Referenced Task Tag's ITT is not ended by it. It runs once the gap fills.
#[tokio::test]
async fn abort_task_does_not_end_a_held_task_management_request() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let n = c.cmdsn;
    // LOGICAL UNIT RESET (function 5), non-immediate, ITT 7, CmdSN N+1: held.
    let mut reset = tmf_request(&c, 5, 7, 0xffff_ffff);
    reset[0] = 0x02; // I=0
    reset[24..28].copy_from_slice(&(n + 1).to_be_bytes());
    c.send(reset, &[]).await;
    // ABORT TASK for ITT 7, immediate.
    c.send(abort_task(&c, 100, 7, n + 1), &[]).await;
    let r = c.recv().await.expect("TMF Response to ABORT TASK");
    assert_eq!(r.u32(16), 100);
    assert_eq!(r.bhs[2], 1, "Task does not exist: a reset is not a task");
    // Fill the gap: a TEST UNIT READY at N; the reset then runs.
    let (tur, tur_itt) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    c.send(tur, &[]).await;
    let mut got = Vec::new();
    while let Some(p) = c.recv().await {
        got.push((p.bhs[0], p.u32(16), p.bhs[2]));
    }
    got.sort();
    assert_eq!(
        got,
        vec![(0x21, tur_itt, 0x00), (0x22, 7, 0x00)],
        "the TEST UNIT READY answered, and the reset: Function complete"
    );
}

/// RFC 7143 11.2.1.8: the Initiator Task Tag 0xffffffff is reserved: a SCSI Command carrying
/// it is rejected (Reject, reason 09h: Invalid PDU field).
#[tokio::test]
async fn a_scsi_command_with_the_reserved_itt_is_rejected() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let (mut b, _) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    b[16..20].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    c.send(b, &[]).await;
    let r = c.recv().await.expect("Reject");
    assert_eq!(r.bhs[0], 0x3f, "Reject");
    assert_eq!(r.bhs[2], 0x09, "Invalid PDU field");
}

#[tokio::test]
async fn write_cdb_without_the_w_bit_reports_the_overflow() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    // WRITE(10) of one block with F=1, R=0, W=0 and EDTL 0: nothing is sent or expected.
    let (b, itt) = c.command(0x80, 0, &write10(3, 1));
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    assert_eq!(r.u32(16), itt);
    assert_eq!(r.bhs[2], 0x00, "command completed at target");
    assert_eq!(
        r.bhs[3], 0x00,
        "GOOD: no whole block was received, none is written"
    );
    assert_eq!(r.bhs[1] & 0x06, 0x04, "O (overflow), not U");
    assert_eq!(r.u32(44), 512, "Residual Count: the bytes the CDB wanted");
}

#[tokio::test]
async fn write_cdb_without_the_w_bit_writes_nothing() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let (b, _) = c.command(0xa1, 512, &write10(4, 1)); // F, W: write a pattern
    c.send(b, &[0x77; 512]).await;
    assert_eq!(c.recv().await.expect("SCSI Response").bhs[3], 0x00);
    // The same WRITE(10) with W=0 and EDTL 512, carrying no data.
    let (b, _) = c.command(0x80, 512, &write10(4, 1));
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[1] & 0x06, 0x04, "O (overflow)");
    assert_eq!(r.u32(44), 512, "Residual Count");
    let (b, _) = c.command(0xc1, 512, &read10(4, 1));
    c.send(b, &[]).await;
    let d = c.recv().await.expect("Data-In");
    assert_eq!(d.data, vec![0x77; 512], "the block is unchanged");
}

/// Read `len` bytes from LBA 0 and return the Data-In PDUs.
async fn read_data_in(c: &mut Client, len: u32) -> Vec<Pdu> {
    let (b, itt) = c.command(0xc1, len, &read10(0, (len / 512) as u16)); // F, R
    c.send(b, &[]).await;
    let mut pdus = Vec::new();
    loop {
        let d = c.recv().await.expect("Data-In");
        assert_eq!(d.bhs[0], 0x25, "Data-In");
        assert_eq!(d.u32(16), itt);
        let status = d.bhs[1] & 0x01 != 0;
        pdus.push(d);
        if status {
            return pdus;
        }
    }
}

#[tokio::test]
async fn data_in_sequences_end_at_max_burst_length_below_the_segment_length() {
    let addr = start().await;
    // MaxBurstLength 1024 < the initiator's MaxRecvDataSegmentLength 8192.
    let mut c = Client::login(addr, "MaxBurstLength=1024|MaxRecvDataSegmentLength=8192|").await;
    c.clear_unit_attention().await;
    let pdus = read_data_in(&mut c, 4096).await;
    assert_eq!(pdus.len(), 4, "one 1024-byte sequence per PDU");
    for (i, d) in pdus.iter().enumerate() {
        assert_eq!(d.u32(36), i as u32, "DataSN");
        assert_eq!(d.u32(40), 1024 * i as u32, "Buffer Offset");
        assert_eq!(d.data.len(), 1024, "no more than MaxBurstLength");
        assert_eq!(d.bhs[1] & 0x80, 0x80, "F: every PDU ends a sequence");
    }
}

#[tokio::test]
async fn data_in_sequences_split_into_segments_and_end_at_max_burst_length() {
    let addr = start().await;
    // MaxBurstLength 1536: each sequence is a 1024-byte PDU and a 512-byte PDU.
    let mut c = Client::login(addr, "MaxBurstLength=1536|MaxRecvDataSegmentLength=1024|").await;
    c.clear_unit_attention().await;
    let pdus = read_data_in(&mut c, 3072).await;
    let got: Vec<(u32, usize, bool)> = pdus
        .iter()
        .map(|d| (d.u32(40), d.data.len(), d.bhs[1] & 0x80 != 0))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 1024, false),
            (1024, 512, true), // end of the first 1536-byte sequence
            (1536, 1024, false),
            (2560, 512, true), // end of the second, with status
        ]
    );
}

/// An immediate Task Management Function Request (RFC 7143 11.5) for LUN 0.
fn tmf_request(c: &Client, function: u8, itt: u32, ref_itt: u32) -> [u8; 48] {
    let mut t = [0u8; 48];
    t[0] = 0x42; // I=1, Task Management Function Request
    t[1] = 0x80 | function; // F=1, function
    t[16..20].copy_from_slice(&itt.to_be_bytes());
    t[20..24].copy_from_slice(&ref_itt.to_be_bytes()); // Referenced Task Tag
    t[24..28].copy_from_slice(&c.cmdsn.to_be_bytes());
    t[32..36].copy_from_slice(&(c.cmdsn - 1).to_be_bytes()); // RefCmdSN
    t
}

async fn tmf_response(c: &mut Client, function: u8, itt: u32, ref_itt: u32) -> u8 {
    let t = tmf_request(c, function, itt, ref_itt);
    c.send(t, &[]).await;
    let r = c.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22, "Task Management Function Response");
    assert_eq!(r.u32(16), itt);
    r.bhs[2]
}

// RFC 7143 11.5.1 / RFC 7144 function codes and 11.6.1 / RFC 7144 response codes.
const QUERY_TASK: u8 = 9;
const QUERY_TASK_SET: u8 = 10;
const I_T_NEXUS_RESET: u8 = 11;
const QUERY_ASYNC_EVENT: u8 = 12;
const FUNCTION_COMPLETE: u8 = 0;
const FUNCTION_SUCCEEDED: u8 = 7;

#[tokio::test]
async fn query_task_and_query_task_set_report_a_write_waiting_for_data() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    assert_eq!(
        tmf_response(&mut c, QUERY_TASK, 200, 0x1234).await,
        FUNCTION_COMPLETE,
        "no such task"
    );
    assert_eq!(
        tmf_response(&mut c, QUERY_TASK_SET, 201, 0xffff_ffff).await,
        FUNCTION_COMPLETE,
        "no task at all"
    );
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1)); // F, W
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31, "R2T");
    assert_eq!(
        tmf_response(&mut c, QUERY_TASK, 202, itt).await,
        FUNCTION_SUCCEEDED
    );
    assert_eq!(
        tmf_response(&mut c, QUERY_TASK_SET, 203, 0xffff_ffff).await,
        FUNCTION_SUCCEEDED
    );
    // The queries left the task alone: its data completes it.
    c.send(data_out(itt, r2t.u32(20), 0, 0, true), &[0x11; 512])
        .await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21, "SCSI Response");
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
}

#[tokio::test]
async fn i_t_nexus_reset_ends_the_tasks_and_query_async_event_sees_the_unit_attention() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    assert_eq!(
        tmf_response(&mut c, QUERY_ASYNC_EVENT, 300, 0xffff_ffff).await,
        FUNCTION_COMPLETE,
        "nothing pending"
    );
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1)); // F, W
    c.send(b, &[]).await;
    assert_eq!(c.recv().await.expect("R2T").bhs[0], 0x31);
    assert_eq!(
        tmf_response(&mut c, I_T_NEXUS_RESET, 301, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        tmf_response(&mut c, QUERY_TASK, 302, itt).await,
        FUNCTION_COMPLETE,
        "the write is gone"
    );
    assert_eq!(
        tmf_response(&mut c, QUERY_ASYNC_EVENT, 303, 0xffff_ffff).await,
        FUNCTION_SUCCEEDED,
        "a unit attention is pending"
    );
    // SAM-5: the next command reports UNIT ATTENTION, I_T NEXUS LOSS OCCURRED (29h/07h).
    let (b, _) = c.command(0x80, 0, &[0; 6]); // F, TEST UNIT READY
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response, none for the write");
    assert_eq!(r.bhs[3], 0x02, "CHECK CONDITION");
    assert_eq!(r.data[2 + 2] & 0x0f, 0x06, "UNIT ATTENTION");
    assert_eq!(&r.data[2 + 12..2 + 14], &[0x29, 0x07]);
}

#[tokio::test]
async fn target_offers_initial_r2t_no_and_immediate_data_yes_to_an_initiator_that_omits_them() {
    let addr = start().await;
    let mut c = Client::connect(addr).await;
    let mut b = [0u8; 48];
    b[0] = 0x43; // I=1, Login Request
    b[1] = 0x87; // T=1, CSG=1, NSG=3
    b[8..14].copy_from_slice(&[0x80, 2, 2, 2, 2, 2]); // ISID
    b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    let text = format!("InitiatorName=iqn.2026-01.test:wire\0TargetName={TARGET}\0");
    c.send(b, text.as_bytes()).await;
    let r = c.recv().await.expect("Login Response");
    assert_eq!(
        r.bhs[1], 0x04,
        "T=0 CSG=1: no full feature phase before the answers"
    );
    let text = String::from_utf8(r.data).expect("text");
    for kv in [
        "InitialR2T=No\0",
        "ImmediateData=Yes\0",
        "MaxBurstLength=1048576\0",
        "FirstBurstLength=262144\0",
    ] {
        assert!(text.contains(kv), "{kv} offered in {text:?}");
    }
    // Answer with the results: InitialR2T OR -> No, ImmediateData AND -> Yes.
    c.send(
        b,
        b"InitialR2T=No\0ImmediateData=Yes\0MaxBurstLength=1048576\0FirstBurstLength=4096\0",
    )
    .await;
    let r = c.recv().await.expect("Login Response");
    assert_eq!(r.bhs[1], 0x87, "T=1 CSG=1 NSG=3");
    assert!(r.data.is_empty(), "answers are not answered");
    c.clear_unit_attention().await;
    // WRITE(10) of 8 blocks: 512 bytes immediate, then unsolicited Data-Out up to
    // FirstBurstLength (4096, the whole write) with no R2T.
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    let (b, itt) = c.command(0x21, 4096, &write10(40, 8)); // W, F=0
    c.send(b, &payload[..512]).await;
    c.send(data_out(itt, 0xffff_ffff, 0, 512, true), &payload[512..])
        .await;
    let rsp = c.recv().await.expect("SCSI Response, not an R2T");
    assert_eq!(rsp.bhs[0], 0x21, "SCSI Response");
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
}

/// RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength, so an initiator that
/// settles MaxBurstLength at 131072 is offered FirstBurstLength 131072 at most, and a write
/// of that much immediate data (what both sides agreed) succeeds.
#[tokio::test]
async fn the_first_burst_offered_stays_within_the_max_burst_the_initiator_settled() {
    let addr = start().await;
    let (mut c, b) = Client::start_login(
        addr,
        "iqn.2026-01.test:wire",
        "MaxBurstLength=131072|",
        [0x80, 7, 7, 7, 7, 7],
    )
    .await;
    let r = c.recv().await.expect("Login Response");
    let text = String::from_utf8(r.data).expect("text");
    assert!(text.contains("MaxBurstLength=131072\0"), "{text:?}");
    assert!(text.contains("FirstBurstLength=131072\0"), "{text:?}");
    // The initiator takes the offer (Minimum with its own 262144).
    c.send(
        b,
        b"InitialR2T=No\0ImmediateData=Yes\0FirstBurstLength=131072\0",
    )
    .await;
    let r = c.recv().await.expect("Login Response");
    assert_eq!(r.bhs[1], 0x87, "T=1 CSG=1 NSG=3");
    c.clear_unit_attention().await;
    // WRITE(10) of 256 blocks, all 131072 bytes as immediate data (F=1: no Data-Out follows).
    let (b, _) = c.command(0xa1, 131_072, &write10(0, 256));
    c.send(b, &vec![0x5a; 131_072]).await;
    let rsp = c.recv().await.expect("SCSI Response");
    assert_eq!(rsp.bhs[0], 0x21, "SCSI Response, not a Reject");
    assert_eq!(rsp.bhs[3], 0x00, "GOOD");
}

#[tokio::test]
async fn an_initiator_answering_initial_r2t_yes_gets_r2ts() {
    let addr = start().await;
    let answer = |k: &str| match k {
        "InitialR2T" => "Yes",
        "ImmediateData" => "No",
        "MaxBurstLength" => "262144",
        "FirstBurstLength" => "65536",
        _ => "NotUnderstood",
    };
    let mut c = Client::login_answering(addr, "", [0x80, 2, 2, 2, 2, 3], answer).await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1)); // F, W
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31, "R2T: InitialR2T=Yes is the result");
    assert_eq!(r2t.u32(16), itt);
}

#[tokio::test]
async fn lu_reset_from_another_session_ends_a_write_still_collecting_data() {
    // SAM-5 7.7: LOGICAL UNIT RESET ends every task in the task set, whichever I_T nexus it
    // came from, including a write whose Data-Out has not all arrived.
    let addr = start().await;
    let mut a = Client::login_isid(
        addr,
        "InitialR2T=Yes|ImmediateData=No|",
        [0x80, 1, 2, 3, 4, 5],
    )
    .await;
    a.clear_unit_attention().await;
    let mut b = Client::login_isid(addr, "", [0x80, 9, 9, 9, 9, 9]).await;
    b.clear_unit_attention().await;
    // A: WRITE(10) of block 7, which waits for its data (R2T).
    let (w, itt) = a.command(0xa1, 512, &write10(7, 1));
    a.send(w, &[]).await;
    let r2t = a.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31, "R2T");
    let ttt = r2t.u32(20);
    // B: LOGICAL UNIT RESET (function 5) of LUN 0, immediate.
    let mut t = [0u8; 48];
    t[0] = 0x42; // I=1, Task Management Function Request
    t[1] = 0x85; // F=1, LOGICAL UNIT RESET
    t[16..20].copy_from_slice(&77u32.to_be_bytes());
    t[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes()); // Referenced Task Tag: reserved
    t[24..28].copy_from_slice(&b.cmdsn.to_be_bytes());
    b.send(t, &[]).await;
    let r = b.recv().await.expect("TMF Response");
    assert_eq!(r.bhs[0], 0x22);
    assert_eq!(r.bhs[2], 0, "Function complete");
    // A's data arrives after the reset: the write must not land and gets no response.
    a.send(data_out(itt, ttt, 0, 0, true), &[0xEE; 512]).await;
    no_response_but_the_window(&mut a).await;
    // B (past its reset unit attention) reads block 7: still zeros.
    b.clear_unit_attention().await;
    let (rd, _) = b.command(0xc1, 512, &read10(7, 1));
    b.send(rd, &[]).await;
    let d = b.recv().await.expect("Data-In");
    assert_eq!(d.bhs[0], 0x25, "Data-In");
    assert_eq!(d.data, vec![0u8; 512]);
}

// RFC 7143 11.5.1 function codes not covered above.
const ABORT_TASK_SET: u8 = 2;
const CLEAR_TASK_SET: u8 = 4;
const TARGET_WARM_RESET: u8 = 6;

/// A WRITE(10) of one block at LBA 0 on `c`, waiting for its data (the R2T has come): its
/// ITT and the R2T's Target Transfer Tag.
async fn write_waiting_for_data(c: &mut Client) -> (u32, u32) {
    let (b, itt) = c.command(0xa1, 512, &write10(0, 1)); // F, W
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(r2t.bhs[0], 0x31, "R2T");
    (itt, r2t.u32(20))
}

/// The write `w` of `c` was ended by another nexus's task management: its data, sent now, is
/// not written and gets no response (SAM-5: TAS 0).
async fn ended_by_another(c: &mut Client, w: (u32, u32)) {
    c.send(data_out(w.0, w.1, 0, 0, true), &[0xEE; 512]).await;
    no_response_but_the_window(c).await;
}

/// A command of `c` ended by another nexus's task management gets no response; the window
/// place it frees is told with a NOP-In that wants no answer (RFC 7143 11.4.11; 11.19.1:
/// ITT and TTT FFFFFFFFh).
async fn no_response_but_the_window(c: &mut Client) {
    let (nops, max) = (c.window_nops, c.max_cmdsn);
    assert!(c.recv().await.is_none(), "no response for the ended write");
    assert_eq!(c.window_nops, nops + 1, "one NOP-In for the reopened place");
    assert_eq!(
        c.max_cmdsn,
        max.wrapping_add(1),
        "its MaxCmdSN counts the place"
    );
}

/// Block 0 read on `c`.
async fn block0(c: &mut Client) -> Vec<u8> {
    let (rd, _) = c.command(0xc1, 512, &read10(0, 1)); // F, R
    c.send(rd, &[]).await;
    let d = c.recv().await.expect("Data-In");
    assert_eq!(d.bhs[0], 0x25, "Data-In");
    d.data
}

/// TEST UNIT READY on `c`: the SCSI Response's status and, for CHECK CONDITION, the sense key,
/// ASC and ASCQ of its fixed-format sense data (after the 2-byte SenseLength, RFC 7143 11.4.7).
async fn test_unit_ready(c: &mut Client) -> (u8, Option<(u8, u8, u8)>) {
    let (b, _) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]); // F, TEST UNIT READY
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    let sense = (r.bhs[3] == 0x02).then(|| (r.data[2 + 2] & 0x0f, r.data[2 + 12], r.data[2 + 13]));
    (r.bhs[3], sense)
}

/// ABORT TASK SET (2) ends the requester's tasks only, CLEAR TASK SET (4) every nexus's, and
/// TARGET WARM RESET (6) every task and leaves every nexus POWER ON, RESET, OR BUS DEVICE
/// RESET OCCURRED (SAM-5 6.3.3: 06h/29h/00h): each function code reaches its own function.
#[tokio::test]
async fn abort_task_set_clear_task_set_and_target_warm_reset_each_do_their_own() {
    let addr = start().await;
    let keys = "InitialR2T=Yes|ImmediateData=No|";
    let mut a = Client::login(addr, keys).await;
    let mut b = Client::login_isid(addr, keys, [0x80, 9, 9, 9, 9, 9]).await;
    a.clear_unit_attention().await;
    b.clear_unit_attention().await;

    // ABORT TASK SET from A: A's write ends, B's stays and completes.
    let wa = write_waiting_for_data(&mut a).await;
    let wb = write_waiting_for_data(&mut b).await;
    assert_eq!(
        tmf_response(&mut a, ABORT_TASK_SET, 400, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        tmf_response(&mut a, QUERY_TASK, 401, wa.0).await,
        FUNCTION_COMPLETE,
        "A's write is gone"
    );
    assert_eq!(
        test_unit_ready(&mut a).await,
        (0x00, None),
        "no unit attention for A"
    );
    assert_eq!(
        tmf_response(&mut b, QUERY_TASK, 409, wb.0).await,
        FUNCTION_SUCCEEDED,
        "B's write stays"
    );
    b.send(data_out(wb.0, wb.1, 0, 0, true), &[0x11; 512]).await;
    let rsp = b.recv().await.expect("SCSI Response");
    assert_eq!((rsp.bhs[0], rsp.bhs[3]), (0x21, 0x00), "B's write: GOOD");

    // CLEAR TASK SET from A: B's write ends too.
    let wb = write_waiting_for_data(&mut b).await;
    assert_eq!(
        tmf_response(&mut a, CLEAR_TASK_SET, 402, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        test_unit_ready(&mut a).await,
        (0x00, None),
        "no unit attention for A"
    );
    // B's write, still waiting for its data, no longer exists for QUERY TASK or QUERY TASK
    // SET.
    assert_eq!(
        tmf_response(&mut b, QUERY_TASK, 410, wb.0).await,
        FUNCTION_COMPLETE,
        "B's write is gone"
    );
    assert_eq!(
        tmf_response(&mut b, QUERY_TASK_SET, 411, 0xffff_ffff).await,
        FUNCTION_COMPLETE,
        "B has no task"
    );
    ended_by_another(&mut b, wb).await;
    assert_eq!(block0(&mut a).await, vec![0x11; 512]);

    // TARGET WARM RESET from A: every task ends, and both nexuses get 06h/29h/00h.
    let wb = write_waiting_for_data(&mut b).await;
    assert_eq!(
        tmf_response(&mut a, TARGET_WARM_RESET, 403, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        test_unit_ready(&mut a).await,
        (0x02, Some((0x06, 0x29, 0x00)))
    );
    ended_by_another(&mut b, wb).await;
    assert_eq!(
        test_unit_ready(&mut b).await,
        (0x02, Some((0x06, 0x29, 0x00)))
    );
    assert_eq!(block0(&mut a).await, vec![0x11; 512]);
}

/// SAM-5 8.6.3 with RFC 7143 3.2.2.1: a write arrives at the LU in CmdSN order, while its
/// Data-Out is still to come, so an ORDERED READ sent after it waits for it and reads its
/// data; a HEAD OF QUEUE command waits for neither (ATTR, byte 1 bits 2-0: 2h ORDERED, 3h HEAD
/// OF QUEUE).
#[tokio::test]
async fn an_ordered_read_waits_for_an_older_write_still_collecting_data() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    let w = write_waiting_for_data(&mut c).await;
    let (rd, rd_itt) = c.command(0xc2, 512, &read10(0, 1)); // F, R, ORDERED
    c.send(rd, &[]).await;
    let (tur, tur_itt) = c.command(0x83, 0, &[0x00, 0, 0, 0, 0, 0]); // F, HEAD OF QUEUE
    c.send(tur, &[]).await;
    let r = c
        .recv()
        .await
        .expect("the HEAD OF QUEUE command's response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    assert_eq!(
        r.u32(16),
        tur_itt,
        "the HEAD OF QUEUE command answered first"
    );
    assert_eq!(r.bhs[3], 0x00, "GOOD");
    c.send(data_out(w.0, w.1, 0, 0, true), &[0x5A; 512]).await;
    let r = c.recv().await.expect("the write's response");
    assert_eq!(
        (r.bhs[0], r.u32(16), r.bhs[3]),
        (0x21, w.0, 0x00),
        "the write, GOOD"
    );
    let d = c.recv().await.expect("the ORDERED read's Data-In");
    assert_eq!((d.bhs[0], d.u32(16)), (0x25, rd_itt), "Data-In of the read");
    assert_eq!(
        d.data,
        vec![0x5A; 512],
        "the ORDERED read ran after the write"
    );
}

/// RFC 7143 11.2.1.8: an ITT is free again once its task has ended, and ABORT TASK's
/// "Function complete" says it has. A READ waiting its turn (behind an ORDERED command that
/// waits for a write held in the backend) is aborted; a command that reuses its ITT right
/// after the response is taken and answered. (Here the aborted task has ended by the time
/// the response is out; the connection no longer relies on that.)
#[tokio::test]
async fn an_itt_is_free_again_once_abort_task_says_function_complete() {
    let (driver, _addr, _server, mut c, w) = a_write_held_in_the_backend(0x11).await;
    let (o, o_itt) = c.command(0x82, 0, &[0x00, 0, 0, 0, 0, 0]); // F, ORDERED TEST UNIT READY
    c.send(o, &[]).await;
    let (r, x) = c.command(0xc0, 512, &read10(0, 1)); // F, R, SIMPLE READ(10)
    c.send(r, &[]).await;
    c.send(abort_task(&c, 100, x, c.cmdsn - 1), &[]).await;
    let t = c.recv().await.expect("TMF Response");
    assert_eq!(
        (t.bhs[0], t.u32(16), t.bhs[2]),
        (0x22, 100, 0),
        "Task Management Function Response, Function complete"
    );
    // The same ITT again, for a READ that waits like the first.
    let (mut again, _) = c.command(0xc0, 512, &read10(0, 1));
    again[16..20].copy_from_slice(&x.to_be_bytes());
    c.send(again, &[]).await;
    driver.gate.add_permits(1);
    let mut got = Vec::new();
    while let Some(p) = c.recv().await {
        // SCSI Response (21h) or Data-In with status (25h, S bit): ITT and status.
        got.push((p.bhs[0], p.u32(16), p.bhs[3]));
    }
    got.sort();
    let mut want = vec![(0x21, w, 0x00), (0x21, o_itt, 0x00), (0x25, x, 0x00)];
    want.sort();
    assert_eq!(
        got, want,
        "the write, the TEST UNIT READY and the second READ answered GOOD; no Reject (3Fh)"
    );
}

/// RFC 7143 11.5.1: task management ends the tasks received before it (a lower CmdSN), not
/// those after it. An immediate ABORT TASK SET carries the CmdSN the next command takes, so a
/// WRITE sent right behind it, and running by the time the function runs, is not ended: it gets
/// its GOOD, and only the write before the function is aborted.
#[tokio::test]
async fn abort_task_set_leaves_a_command_sent_after_it_alone() {
    let (driver, _addr, _server, mut c, _a) = a_write_held_in_the_backend(0x11).await;
    // ABORT TASK SET, immediate: its CmdSN is that of the next command.
    c.send(tmf_request(&c, ABORT_TASK_SET, 100, 0xffff_ffff), &[])
        .await;
    let (w, b_itt) = c.command(0xa1, 512, &write10(1, 1)); // F, W; immediate data
    let entered = driver.entered.notified();
    c.send(w, &[0x22; 512]).await;
    // Both writes wait in the backend, the function for the first; give it time to run, then
    // let them through.
    entered.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    driver.gate.add_permits(2);
    let mut got = Vec::new();
    while let Some(p) = c.recv().await {
        got.push((p.bhs[0], p.u32(16), p.bhs[2], p.bhs[3]));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (0x21, b_itt, 0x00, 0x00), // SCSI Response, the later write: GOOD
            (0x22, 100, 0x00, 0x00),   // TMF Response: Function complete
        ],
        "the write before the function gets no response, the one after it its GOOD"
    );
}

/// Task management functions waiting for a command are bounded per connection: with 16 of
/// them waiting for a write held in the backend, the reader takes nothing more (a NOP-Out
/// ping behind a 17th is not answered) until the write ends; then every function is answered,
/// and the ping.
#[tokio::test]
async fn waiting_task_management_functions_are_bounded_per_connection() {
    let (driver, _addr, _server, mut c, _w) = a_write_held_in_the_backend(0x11).await;
    for i in 0..17 {
        c.send(tmf_request(&c, ABORT_TASK_SET, 100 + i, 0xffff_ffff), &[])
            .await;
    }
    // NOP-Out ping (RFC 7143 11.18), immediate, ITT 77.
    c.send(c.nop_out(77, 0xffff_ffff), &[]).await;
    assert!(
        c.recv().await.is_none(),
        "the reader took PDUs past 16 waiting functions"
    );
    driver.gate.add_permits(1);
    let mut tmf = 0;
    let mut nop = 0;
    while let Some(p) = c.recv().await {
        match p.bhs[0] {
            0x22 => tmf += 1,
            0x20 => nop += 1,
            other => panic!("unexpected PDU {other:#x}"),
        }
    }
    assert_eq!((tmf, nop), (17, 1));
}

/// SAM-5 7.9 and 7.10: a command held for a CmdSN gap that another nexus's CLEAR TASK SET
/// ended does not exist for QUERY TASK or QUERY TASK SET (FUNCTION COMPLETE); before that,
/// QUERY TASK finds it only under its own LUN (a task is named by LUN and tag, SAM-5 7.2).
#[tokio::test]
async fn query_task_does_not_report_a_held_command_that_task_management_ended() {
    let addr = start().await;
    let mut a = Client::login_isid(addr, "", [0x80, 1, 2, 3, 4, 5]).await;
    a.clear_unit_attention().await;
    let mut b = Client::login_isid(addr, "", [0x80, 9, 9, 9, 9, 9]).await;
    b.clear_unit_attention().await;
    // A: TEST UNIT READY one CmdSN ahead of the next expected: held for the gap.
    a.cmdsn += 1;
    let (tur, itt) = a.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    a.send(tur, &[]).await;
    a.cmdsn -= 2; // the TMFs below are immediate, at the gap's CmdSN
    assert_eq!(
        tmf_response(&mut a, QUERY_TASK, 300, itt).await,
        FUNCTION_SUCCEEDED
    );
    // Under another LUN (1, which this target does not have: RFC 7143 11.6.1 code 2).
    let mut q = tmf_request(&a, QUERY_TASK, 301, itt);
    q[8..16].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    a.send(q, &[]).await;
    let r = a.recv().await.expect("TMF Response");
    assert_eq!(
        (r.bhs[0], r.bhs[2]),
        (0x22, 2),
        "LUN does not exist, not SUCCEEDED"
    );
    // B: CLEAR TASK SET of LUN 0 ends every nexus's tasks, the held one included.
    assert_eq!(
        tmf_response(&mut b, CLEAR_TASK_SET, 77, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        tmf_response(&mut a, QUERY_TASK, 302, itt).await,
        FUNCTION_COMPLETE
    );
    assert_eq!(
        tmf_response(&mut a, QUERY_TASK_SET, 303, 0xffff_ffff).await,
        FUNCTION_COMPLETE
    );
}

/// A LUN with a second level (SAM-5 4.7.5) addresses another logical unit than its first
/// level does; the target has none there. TEST UNIT READY to LUN 00 00 00 01 00 00 00 00 (LUN
/// 0, then 1) with LUN 0 present: CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT
/// SUPPORTED (25h/00h); INQUIRY there: peripheral qualifier 011b, device type 1Fh (7Fh,
/// SPC-5 6.7.2).
#[tokio::test]
async fn a_lun_with_a_second_level_reaches_no_logical_unit() {
    let addr = start().await;
    let mut c = Client::login(addr, "").await;
    c.clear_unit_attention().await;
    let two_levels = [0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0];
    let (mut b, itt) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    b[8..16].copy_from_slice(&two_levels);
    c.send(b, &[]).await;
    let p = c.recv().await.expect("SCSI Response");
    let sense = check_condition_sense(&p, itt);
    assert_eq!((sense[2] & 0x0F, sense[12], sense[13]), (0x05, 0x25, 0x00));
    // INQUIRY, allocation length 36.
    let (mut b, _) = c.command(0xC0, 36, &[0x12, 0, 0, 0, 36, 0]);
    b[8..16].copy_from_slice(&two_levels);
    c.send(b, &[]).await;
    let p = c.recv().await.expect("Data-In");
    assert_eq!(p.bhs[0], 0x25, "Data-In");
    assert_eq!(p.data.first(), Some(&0x7F));
}

/// The SCSI Response that ends a write whose data-out broke the rules: CHECK CONDITION,
/// ABORTED COMMAND (0Bh) with `asc`/`ascq` (RFC 7143 11.4.7.2), in fixed format after the
/// 2-byte SenseLength.
async fn expect_data_out_error(c: &mut Client, itt: u32, asc: u8, ascq: u8) {
    let r = c.recv().await.expect("SCSI Response");
    let sense = check_condition_sense(&r, itt);
    assert_eq!((sense[2] & 0x0F, sense[12], sense[13]), (0x0B, asc, ascq));
}

/// The sense data of `r`, which must be the SCSI Response (21h) to `itt` with status CHECK
/// CONDITION (02h): its data segment after the 2-byte SenseLength (RFC 7143 11.4.7).
fn check_condition_sense(r: &Pdu, itt: u32) -> &[u8] {
    assert_eq!(
        (r.bhs[0], r.bhs[3], r.u32(16)),
        (0x21, 0x02, itt),
        "SCSI Response, CHECK CONDITION"
    );
    r.data.get(2..).unwrap_or_default()
}

/// WRITE(10) of 8 blocks (4096 bytes, F=1 W=1), whose R2T (31h) must ask for `asked` bytes;
/// one Data-Out with F=1 answers it with `sent` bytes and TTT `ttt`, or the R2T's own TTT.
/// Gives the write's ITT.
async fn answer_an_r2t(c: &mut Client, asked: u32, ttt: Option<u32>, sent: usize) -> u32 {
    let (b, itt) = c.command(0xa1, 4096, &write10(0, 8));
    c.send(b, &[]).await;
    let r2t = c.recv().await.expect("R2T");
    assert_eq!(
        (r2t.bhs[0], r2t.u32(44)),
        (0x31, asked),
        "R2T, Desired Data Transfer Length"
    );
    let ttt = ttt.unwrap_or(r2t.u32(20));
    c.send(data_out(itt, ttt, 0, 0, true), &vec![0x5A; sent])
        .await;
    itt
}

/// Unsolicited Data-Out (TTT 0xffffffff) where none is allowed: with InitialR2T=Yes, after the
/// target sent its R2T; and beyond FirstBurstLength with InitialR2T=No. The task ends with
/// UNEXPECTED UNSOLICITED DATA (0Ch/0Ch); data past the end of an R2T's sequence is
/// INCORRECT AMOUNT OF DATA (0Ch/0Dh).
#[tokio::test]
async fn unsolicited_data_where_none_is_allowed_is_unexpected_unsolicited_data() {
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    // WRITE(10) of 8 blocks, F=1 W=1: the target asks for the data; unsolicited Data-Out
    // answers.
    let itt = answer_an_r2t(&mut c, 4096, Some(0xffff_ffff), 4096).await;
    expect_data_out_error(&mut c, itt, 0x0c, 0x0c).await;
    // The same with its R2T's TTT, but 512 bytes more than the R2T asked for.
    let itt = answer_an_r2t(&mut c, 4096, None, 4608).await;
    expect_data_out_error(&mut c, itt, 0x0c, 0x0d).await;
    // Past its R2T's sequence but within EDTL: with MaxBurstLength 2048 the first R2T of a
    // 4096-byte write asks for 2048; 2560 bytes answer it.
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|MaxBurstLength=2048|").await;
    c.clear_unit_attention().await;
    let itt = answer_an_r2t(&mut c, 2048, None, 2560).await;
    expect_data_out_error(&mut c, itt, 0x0c, 0x0d).await;

    let mut c = Client::login(
        addr,
        "InitialR2T=No|ImmediateData=Yes|FirstBurstLength=4096|",
    )
    .await;
    c.clear_unit_attention().await;
    // WRITE(10) of 16 blocks (8192 bytes), F=0: 512 bytes immediate, then unsolicited
    // Data-Out of 4096 bytes, which ends at 4608, past the first burst of 4096.
    let (b, itt) = c.command(0x21, 8192, &write10(0, 16));
    c.send(b, &[0x5A; 512]).await;
    c.send(data_out(itt, 0xffff_ffff, 0, 512, true), &[0x5A; 4096])
        .await;
    expect_data_out_error(&mut c, itt, 0x0c, 0x0c).await;
    // Nothing of them was written.
    let (b, _) = c.command(0xc1, 512, &read10(0, 1));
    c.send(b, &[]).await;
    let d = c.recv().await.expect("Data-In");
    assert_eq!(d.data, vec![0; 512]);
}

/// A write the SCSI layer refuses by its CDB is answered without its data-out being asked
/// for: WRITE(10) of 16385 blocks (beyond MAXIMUM TRANSFER LENGTH, 16384 blocks of 512 bytes)
/// gets CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB with the field pointer at
/// TRANSFER LENGTH (byte 7, bit 7) at once, not an R2T for 8 MiB. With immediate and
/// unsolicited data (InitialR2T=No), the data that follows the answer is discarded and the
/// session goes on.
#[tokio::test]
async fn a_write_refused_by_its_cdb_is_answered_without_its_data() {
    const LEN: u32 = 16385 * 512;
    let check = |r: &Pdu, itt: u32| {
        // Not an R2T (31h): the answer.
        let sense = check_condition_sense(r, itt);
        assert_eq!(
            (sense[2] & 0x0F, sense[12], sense[13], &sense[15..18]),
            (0x05, 0x24, 0x00, &[0xCF, 0x00, 0x07][..])
        );
    };
    let addr = start().await;
    let mut c = Client::login(addr, "InitialR2T=Yes|ImmediateData=No|").await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0xa1, LEN, &write10(0, 16385)); // F=1 W=1
    c.send(b, &[]).await;
    check(&c.recv().await.expect("SCSI Response"), itt);

    let mut c = Client::login(
        addr,
        "InitialR2T=No|ImmediateData=Yes|FirstBurstLength=65536|",
    )
    .await;
    c.clear_unit_attention().await;
    let (b, itt) = c.command(0x21, LEN, &write10(0, 16385)); // F=0 W=1
    c.send(b, &[0x5A; 8192]).await;
    c.send(data_out(itt, 0xffff_ffff, 0, 8192, true), &[0x5A; 8192])
        .await;
    check(&c.recv().await.expect("SCSI Response"), itt);
    // Nothing was written, and the session still serves.
    let (b, _) = c.command(0xc1, 512, &read10(0, 1));
    c.send(b, &[]).await;
    let d = c.recv().await.expect("Data-In");
    assert_eq!((d.bhs[0], d.data.clone()), (0x25, vec![0; 512]));
}
