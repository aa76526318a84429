//! Data digests (RFC 7143 13.1, DataDigest=CRC32C) on the wire, with the test initiator: a data
//! segment the initiator sends is checked, one the target sends carries the right digest, and
//! a data segment whose digest is wrong is rejected (11.17.1, reason 02h), its command ends
//! with a CRC error and nothing is written.
//! (libiscsi 1.19, which the conformance run uses, ignores the `data_digest` URL key.)

mod common;

use common::{read10, write10, Client, ISID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The digest as it goes on the wire: RFC 3720 B.4 (kept by RFC 7143) gives 32 bytes of zeros
/// the CRC 0x8A9136AA, sent as the bytes `aa 36 91 8a`.
fn digest(data: &[u8]) -> [u8; 4] {
    crc32c::crc32c(data).to_le_bytes()
}

/// Send `bhs` with `data` (a multiple of 4 bytes here) and its data digest, or a wrong one.
async fn send(c: &mut Client, bhs: [u8; 48], data: &[u8], good: bool) {
    let mut b = bhs;
    b[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    let mut d = digest(data);
    if !good {
        d[0] ^= 0x01;
    }
    c.s.write_all(&b).await.expect("send BHS");
    if !data.is_empty() {
        c.s.write_all(data).await.expect("send data");
        c.s.write_all(&d).await.expect("send digest");
    }
}

/// Receive one PDU with its data digest (present when its data segment is not empty),
/// checking the digest.
async fn recv(c: &mut Client) -> ([u8; 48], Vec<u8>) {
    let mut bhs = [0u8; 48];
    c.s.read_exact(&mut bhs).await.expect("BHS");
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut data = vec![0; len + (4 - len % 4) % 4];
    c.s.read_exact(&mut data).await.expect("data");
    if len > 0 {
        let mut d = [0u8; 4];
        c.s.read_exact(&mut d).await.expect("data digest");
        assert_eq!(d, digest(&data), "the target's data digest");
    }
    data.truncate(len);
    (bhs, data)
}

/// READ(10) of one 512-byte block at LBA 7: its data (status in the last Data-In or a SCSI
/// Response after it).
async fn read_block(c: &mut Client) -> Vec<u8> {
    let (b, _) = c.command(0xC0, 512, &read10(7, 1)); // F, R
    send(c, b, &[], true).await;
    let (bhs, data) = recv(c).await;
    assert_eq!(bhs[0] & 0x3f, 0x25, "Data-In");
    if bhs[1] & 0x01 == 0 {
        let (r, _) = recv(c).await;
        assert_eq!((r[0] & 0x3f, r[3]), (0x21, 0x00), "SCSI Response, GOOD");
    } else {
        assert_eq!(bhs[3], 0x00, "GOOD in the last Data-In");
    }
    data
}

#[tokio::test]
async fn data_digests_are_sent_checked_and_a_bad_one_is_rejected() {
    assert_eq!(digest(&[0u8; 32]), [0xaa, 0x36, 0x91, 0x8a]);
    let addr = common::start().await;
    let (mut c, b) = Client::start_login(
        addr,
        common::INITIATOR,
        "HeaderDigest=None|DataDigest=CRC32C|InitialR2T=Yes|ImmediateData=Yes|\
         MaxBurstLength=262144|FirstBurstLength=65536",
        ISID,
    )
    .await;
    // Login PDUs carry no digests (they start once the full feature phase does).
    let mut texts = String::new();
    for _ in 0..3 {
        let r = c.recv().await.expect("Login Response");
        assert_eq!(r.bhs[0], 0x23, "Login Response");
        assert_eq!(
            u16::from_be_bytes([r.bhs[36], r.bhs[37]]),
            0,
            "login status"
        );
        texts.push_str(&String::from_utf8(r.data).expect("text"));
        if r.bhs[1] == 0x87 {
            break;
        }
        let mut b = b;
        b[16..20].copy_from_slice(&1u32.to_be_bytes());
        c.send(b, &[]).await;
    }
    assert!(texts.contains("DataDigest=CRC32C"), "{texts:?}");
    // The new nexus's unit attention (power on) comes with sense data: a data segment, with
    // its digest.
    let (b, _) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]); // F, TEST UNIT READY
    send(&mut c, b, &[], true).await;
    let (r, sense) = recv(&mut c).await;
    assert_eq!((r[0] & 0x3f, r[3]), (0x21, 0x02), "CHECK CONDITION");
    assert!(!sense.is_empty(), "the unit attention's sense data");

    // A WRITE(10) of one block with immediate data and its digest: GOOD (the SCSI Response has
    // no data segment, so no digest).
    let block: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    let (b, _) = c.command(0xA0, 512, &write10(7, 1)); // F, W
    send(&mut c, b, &block, true).await;
    let (r, _) = recv(&mut c).await;
    assert_eq!((r[0] & 0x3f, r[3]), (0x21, 0x00), "SCSI Response, GOOD");
    assert_eq!(read_block(&mut c).await, block);

    // The same write of other data with a wrong digest: Reject, reason 02h (data digest
    // error), the rejected BHS as its data; then the task ends with CHECK CONDITION, ABORTED
    // COMMAND, PROTOCOL SERVICE CRC ERROR (11.4.7.2: 0Bh, 47h/05h); nothing written.
    let other = vec![0x5Au8; 512];
    let (b, itt) = c.command(0xA0, 512, &write10(7, 1));
    send(&mut c, b, &other, false).await;
    let (r, data) = recv(&mut c).await;
    assert_eq!(r[0] & 0x3f, 0x3f, "Reject");
    assert_eq!(r[2], 0x02, "reason: data digest error");
    assert_eq!(data.len(), 48, "the rejected header");
    assert_eq!(data[16..20], itt.to_be_bytes());
    let (r, sense) = recv(&mut c).await;
    assert_eq!(
        (r[0] & 0x3f, r[3]),
        (0x21, 0x02),
        "SCSI Response, CHECK CONDITION"
    );
    assert_eq!(r[16..20], itt.to_be_bytes());
    // The data segment is SenseLength (2 bytes) then fixed format sense data: key at byte
    // 2, ASC/ASCQ at bytes 12 and 13.
    assert_eq!(
        (sense[2 + 2] & 0x0f, sense[2 + 12], sense[2 + 13]),
        (0x0b, 0x47, 0x05)
    );
    // The command was received (its header is sound): its CmdSN is used up, and the next
    // command runs.
    assert_eq!(read_block(&mut c).await, block);
}
