//! Persistent reservation scenarios over iSCSI: two and three initiators (distinct initiator
//! names and ISIDs, so distinct I_T nexuses) replay cluster sequences step by step against an
//! in-process server with a memory-backed LU, and after each step check READ KEYS, READ
//! RESERVATION, READ FULL STATUS (with the iSCSI TransportIDs) and PRGENERATION.
//!
//! Every CDB and parameter list is written here as literal bytes from SPC-5 (6.16 PERSISTENT
//! RESERVE IN, 6.17 PERSISTENT RESERVE OUT); every expected value comes from SPC-5 (5.14
//! persistent reservations, table 67 and SBC-4 4.17 for conflicts) and SAM-5, never from the
//! implementation.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------------------------
// The initiators. ISIDs are of type 10b ("random", RFC 7143 11.12.5): first byte 80h.

const NODE1: &str = "iqn.2026-01.test:node1";
const NODE2: &str = "iqn.2026-01.test:node2";
const NODE3: &str = "iqn.2026-01.test:n3";
const ISID1: [u8; 6] = [0x80, 0xab, 0xcd, 0xef, 0x00, 0x01];
const ISID2: [u8; 6] = [0x80, 0x12, 0x34, 0x56, 0x00, 0x02];
const ISID3: [u8; 6] = [0x80, 0x00, 0x00, 0x03, 0x00, 0x03];
/// NODE1 again, on another ISID: another I_T nexus of the same initiator.
const ISID1B: [u8; 6] = [0x80, 0xab, 0xcd, 0xef, 0x00, 0x02];

// The TransportIDs READ FULL STATUS must report for these nexuses: iSCSI TransportID, FORMAT CODE
// 01b (initiator port: name, ",i,0x", ISID in hexadecimal; SPC-5 7.6.4.6, table 513), byte 0 =
// FORMAT CODE 01b << 6 | PROTOCOL IDENTIFIER 5h (iSCSI) = 45h, byte 1 reserved, bytes 2..3
// ADDITIONAL LENGTH (a multiple of 4, at least 20), then the null-terminated, null-padded
// ISCSI INITIATOR PORT NAME.

/// NODE1/ISID1: 22 + 5 + 12 + 1 = 40 bytes of name: no padding.
const TID1: &[u8] = b"\x45\x00\x00\x28iqn.2026-01.test:node1,i,0x80abcdef0001\0";
/// NODE2/ISID2: 40 bytes of name.
const TID2: &[u8] = b"\x45\x00\x00\x28iqn.2026-01.test:node2,i,0x801234560002\0";
/// NODE3/ISID3: 19 + 5 + 12 + 1 = 37 bytes, null-padded to 40.
const TID3: &[u8] = b"\x45\x00\x00\x28iqn.2026-01.test:n3,i,0x800000030003\0\0\0\0";
/// NODE1/ISID1B.
const TID1B: &[u8] = b"\x45\x00\x00\x28iqn.2026-01.test:node1,i,0x80abcdef0002\0";

// ---------------------------------------------------------------------------------------------
// SPC-5 codes, as literals.

/// SAM-5 status codes.
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;

/// PERSISTENT RESERVE IN service actions (SPC-5 6.16.1, table 191).
const READ_KEYS: u8 = 0x00;
const READ_RESERVATION: u8 = 0x01;
const REPORT_CAPABILITIES: u8 = 0x02;
const READ_FULL_STATUS: u8 = 0x03;

/// PERSISTENT RESERVE OUT service actions (SPC-5 6.17.2, table 208).
const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const RELEASE: u8 = 0x02;
const CLEAR: u8 = 0x03;
const PREEMPT: u8 = 0x04;
const PREEMPT_AND_ABORT: u8 = 0x05;
const REGISTER_AND_IGNORE: u8 = 0x06;

/// Persistent reservation TYPE codes (SPC-5 6.17.3, table 210).
const WRITE_EXCLUSIVE: u8 = 0x1;
const EXCLUSIVE_ACCESS: u8 = 0x3;
const WRITE_EXCLUSIVE_RO: u8 = 0x5;
const EXCLUSIVE_ACCESS_RO: u8 = 0x6;
const WRITE_EXCLUSIVE_AR: u8 = 0x7;
const EXCLUSIVE_ACCESS_AR: u8 = 0x8;
const ALL_TYPES: [u8; 6] = [
    WRITE_EXCLUSIVE,
    EXCLUSIVE_ACCESS,
    WRITE_EXCLUSIVE_RO,
    EXCLUSIVE_ACCESS_RO,
    WRITE_EXCLUSIVE_AR,
    EXCLUSIVE_ACCESS_AR,
];

/// All Registrants types: every registered I_T nexus is a reservation holder, and READ
/// RESERVATION reports a reservation key of zero (SPC-5 5.14.10, 6.16.3.2).
fn all_registrants(ty: u8) -> bool {
    ty == WRITE_EXCLUSIVE_AR || ty == EXCLUSIVE_ACCESS_AR
}

/// Parameter list byte 20 (SPC-5 6.17.4, table 211): SPEC_I_PT bit 3, ALL_TG_PT bit 2, APTPL
/// bit 0.
const APTPL: u8 = 0x01;

/// Unit attention additional sense codes (SPC-5 annex F).
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: (u8, u8) = (0x2f, 0x00);

// ---------------------------------------------------------------------------------------------
// CDBs and parameter lists.

/// PERSISTENT RESERVE IN (SPC-5 6.16.1, table 190).
fn pr_in_cdb(sa: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![
        0x5e, // OPERATION CODE
        sa,   // byte 1: reserved (7..5), SERVICE ACTION (4..0)
        0, 0, 0, 0, 0, // bytes 2..6 reserved
        a[0], a[1], // bytes 7..8 ALLOCATION LENGTH
        0,    // CONTROL
    ]
}

/// PERSISTENT RESERVE OUT (SPC-5 6.17.1, table 207) with a 24-byte parameter list.
fn pr_out_cdb(sa: u8, ty: u8) -> Vec<u8> {
    vec![
        0x5f,      // OPERATION CODE
        sa,        // byte 1: reserved (7..5), SERVICE ACTION (4..0)
        ty & 0x0f, // byte 2: SCOPE (7..4) = 0h LU_SCOPE, TYPE (3..0)
        0,
        0, // bytes 3..4 reserved
        0,
        0,
        0,
        24, // bytes 5..8 PARAMETER LIST LENGTH = 24 (18h)
        0,  // CONTROL
    ]
}

/// The basic PERSISTENT RESERVE OUT parameter list (SPC-5 6.17.4, table 211).
fn pr_out_params(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&rk.to_be_bytes()); // bytes 0..7 RESERVATION KEY
    p.extend_from_slice(&sark.to_be_bytes()); // bytes 8..15 SERVICE ACTION RESERVATION KEY
    p.extend_from_slice(&[0, 0, 0, 0]); // bytes 16..19 obsolete
    p.push(flags); // byte 20: SPEC_I_PT, ALL_TG_PT, APTPL
    p.push(0); // byte 21 reserved
    p.extend_from_slice(&[0, 0]); // bytes 22..23 obsolete
    p
}

fn be32(b: &[u8], at: usize) -> u32 {
    let s: [u8; 4] = b
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .unwrap_or_else(|| panic!("4 bytes at {at} in {} bytes", b.len()));
    u32::from_be_bytes(s)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let s: [u8; 8] = b
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .unwrap_or_else(|| panic!("8 bytes at {at} in {} bytes", b.len()));
    u64::from_be_bytes(s)
}

// ---------------------------------------------------------------------------------------------
// An initiator.

/// What a command ended with.
struct Reply {
    status: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
}

impl Reply {
    /// (SENSE KEY, ASC, ASCQ) from fixed (70h) or descriptor (72h) sense data (SPC-5 4.4).
    fn sense_code(&self) -> (u8, u8, u8) {
        let s = &self.sense;
        let at = |i: usize| *s.get(i).unwrap_or(&0);
        match at(0) & 0x7f {
            0x70 | 0x71 => (at(2) & 0x0f, at(12), at(13)),
            0x72 | 0x73 => (at(1) & 0x0f, at(2), at(3)),
            _ => panic!("no sense data: {s:02x?}"),
        }
    }

    fn describe(&self) -> String {
        if self.status == CHECK_CONDITION {
            format!("CHECK CONDITION {:02x?}", self.sense_code())
        } else {
            format!("status {:02x}h", self.status)
        }
    }

    #[track_caller]
    fn expect(&self, status: u8, what: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: expected status {status:02x}h, got {}",
            self.describe()
        );
    }
}

/// One I_T nexus: a session of `name` with `isid`.
struct Node {
    c: Client,
}

/// What READ FULL STATUS says about one registration (SPC-5 6.16.5.2, table 200).
#[derive(Debug)]
struct FullStatus {
    key: u64,
    all_tg_pt: bool,
    r_holder: bool,
    scope_type: u8,
    rel_port: u16,
    tid: Vec<u8>,
}

impl Node {
    /// Log in and consume the unit attention a new I_T nexus starts with.
    async fn login(addr: std::net::SocketAddr, name: &str, isid: [u8; 6]) -> Node {
        let mut c = Client::login_as(addr, name, "", isid, defaults).await;
        c.clear_unit_attention().await;
        Node { c }
    }

    /// Send a command (data-out as immediate data, simple task attribute) and wait for its end.
    async fn exec(&mut self, cdb: &[u8], out: &[u8], alloc: u32) -> Reply {
        let itt = self.send_command(cdb, out, alloc).await;
        self.wait(itt).await
    }

    async fn send_command(&mut self, cdb: &[u8], out: &[u8], alloc: u32) -> u32 {
        // F=1, R if data-in, W if data-out, ATTR 001b simple (RFC 7143 11.3.1).
        let mut flags = 0x81;
        if alloc > 0 {
            flags |= 0x40;
        }
        if !out.is_empty() {
            flags |= 0x20;
        }
        let edtl = if out.is_empty() {
            alloc
        } else {
            out.len() as u32
        };
        let (b, itt) = self.c.command(flags, edtl, cdb);
        self.c.send(b, out).await;
        itt
    }

    async fn wait(&mut self, itt: u32) -> Reply {
        let mut data = Vec::new();
        loop {
            let p = self.c.recv().await.expect("a response in time");
            match p.bhs[0] & 0x3f {
                0x25 => {
                    // SCSI Data-In; S=1 carries the status (RFC 7143 11.7).
                    assert_eq!(p.u32(16), itt, "Data-In for the command");
                    data.extend_from_slice(&p.data);
                    if p.bhs[1] & 0x01 != 0 {
                        return Reply {
                            status: p.bhs[3],
                            sense: Vec::new(),
                            data,
                        };
                    }
                }
                0x21 => {
                    // SCSI Response: data segment = SenseLength (2 bytes) + sense data
                    // (RFC 7143 11.4.7).
                    assert_eq!(p.u32(16), itt, "SCSI Response for the command");
                    let sense = match p.data.get(..2) {
                        Some(l) => {
                            let n = usize::from(u16::from_be_bytes([l[0], l[1]]));
                            p.data.get(2..2 + n).expect("sense data").to_vec()
                        }
                        None => Vec::new(),
                    };
                    return Reply {
                        status: p.bhs[3],
                        sense,
                        data,
                    };
                }
                0x20 => {
                    // NOP-In ping: answer it (RFC 7143 11.19).
                    let ttt = p.u32(20);
                    if ttt != 0xffff_ffff {
                        let n = self.c.nop_out(0xffff_ffff, ttt);
                        self.c.send(n, &[]).await;
                    }
                }
                op => panic!("unexpected PDU opcode {op:02x}h"),
            }
        }
    }

    async fn pr_out(&mut self, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) -> Reply {
        self.exec(&pr_out_cdb(sa, ty), &pr_out_params(rk, sark, flags), 0)
            .await
    }

    async fn pr_out_ok(&mut self, what: &str, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) {
        self.pr_out(sa, ty, rk, sark, flags)
            .await
            .expect(GOOD, what);
    }

    async fn pr_in(&mut self, sa: u8) -> Vec<u8> {
        let r = self.exec(&pr_in_cdb(sa, 8192), &[], 8192).await;
        r.expect(
            GOOD,
            &format!("PERSISTENT RESERVE IN service action {sa:02x}h"),
        );
        r.data
    }

    /// READ KEYS (SPC-5 6.16.2, table 193): PRGENERATION and the keys, sorted (the standard
    /// gives no order).
    async fn read_keys(&mut self) -> (u32, Vec<u64>) {
        let d = self.pr_in(READ_KEYS).await;
        let gen = be32(&d, 0);
        let len = be32(&d, 4) as usize;
        assert!(len.is_multiple_of(8), "ADDITIONAL LENGTH is 8 per key");
        assert_eq!(
            d.len(),
            8 + len,
            "READ KEYS: header + ADDITIONAL LENGTH bytes"
        );
        let mut keys: Vec<u64> = (0..len / 8).map(|i| be64(&d, 8 + 8 * i)).collect();
        keys.sort_unstable();
        (gen, keys)
    }

    /// READ RESERVATION (SPC-5 6.16.3, tables 194 and 195): PRGENERATION and (key, byte 21 =
    /// SCOPE << 4 | TYPE) when a reservation exists.
    async fn read_reservation(&mut self) -> (u32, Option<(u64, u8)>) {
        let d = self.pr_in(READ_RESERVATION).await;
        let gen = be32(&d, 0);
        match be32(&d, 4) {
            0 => {
                assert_eq!(d.len(), 8, "no reservation: header only");
                (gen, None)
            }
            0x10 => {
                assert_eq!(d.len(), 24, "header + one 16-byte descriptor");
                assert_eq!(&d[16..21], &[0; 5], "bytes 16..19 obsolete, 20 reserved");
                assert_eq!(&d[22..24], &[0; 2], "bytes 22..23 obsolete");
                (gen, Some((be64(&d, 8), d[21])))
            }
            n => panic!("READ RESERVATION ADDITIONAL LENGTH {n}: must be 0 or 10h"),
        }
    }

    /// READ FULL STATUS (SPC-5 6.16.5, tables 199 and 200).
    async fn read_full_status(&mut self) -> (u32, Vec<FullStatus>) {
        let d = self.pr_in(READ_FULL_STATUS).await;
        let gen = be32(&d, 0);
        let len = be32(&d, 4) as usize;
        assert_eq!(
            d.len(),
            8 + len,
            "READ FULL STATUS: header + ADDITIONAL LENGTH bytes"
        );
        let mut out = Vec::new();
        let mut at = 8;
        while at < d.len() {
            let desc = d.get(at..at + 24).expect("a 24-byte descriptor header");
            assert_eq!(&desc[8..12], &[0; 4], "bytes 8..11 reserved");
            assert_eq!(desc[12] & 0xfc, 0, "byte 12 bits 7..2 reserved");
            assert_eq!(&desc[14..18], &[0; 4], "bytes 14..17 reserved");
            let n = be32(desc, 20) as usize; // ADDITIONAL DESCRIPTOR LENGTH
            let tid = d
                .get(at + 24..at + 24 + n)
                .expect("the TransportID")
                .to_vec();
            out.push(FullStatus {
                key: be64(desc, 0),
                all_tg_pt: desc[12] & 0x02 != 0,
                r_holder: desc[12] & 0x01 != 0,
                scope_type: desc[13],
                rel_port: u16::from_be_bytes([desc[18], desc[19]]),
                tid,
            });
            at += 24 + n;
        }
        (gen, out)
    }

    /// REPORT CAPABILITIES (SPC-5 6.16.4, table 196): the 8 bytes.
    async fn report_capabilities(&mut self) -> Vec<u8> {
        let d = self.pr_in(REPORT_CAPABILITIES).await;
        assert_eq!(d.len(), 8, "REPORT CAPABILITIES is 8 bytes");
        assert_eq!(&d[0..2], &[0x00, 0x08], "LENGTH = 8");
        d
    }

    /// The relative target port identifier of this nexus's target port: the designator of
    /// type 4h, association 01b (target port) in the Device Identification VPD page
    /// (SPC-5 7.7.6.1, 7.7.6.7).
    async fn relative_port(&mut self) -> u16 {
        // INQUIRY, EVPD=1, PAGE CODE 83h, ALLOCATION LENGTH 1024.
        let r = self
            .exec(&[0x12, 0x01, 0x83, 0x04, 0x00, 0x00], &[], 1024)
            .await;
        r.expect(GOOD, "INQUIRY VPD 83h");
        let d = r.data;
        let end = 4 + usize::from(u16::from_be_bytes([d[2], d[3]]));
        let mut at = 4;
        while at + 4 <= end.min(d.len()) {
            let (assoc, ty, len) = (
                (d[at + 1] >> 4) & 0x3,
                d[at + 1] & 0x0f,
                usize::from(d[at + 3]),
            );
            if assoc == 1 && ty == 4 && len == 4 {
                return u16::from_be_bytes([d[at + 6], d[at + 7]]);
            }
            at += 4 + len;
        }
        panic!("no relative target port designator in VPD page 83h");
    }

    /// READ(10) of one 512-byte block.
    async fn read(&mut self, lba: u32) -> Reply {
        self.exec(&read10(lba, 1), &[], 512).await
    }

    /// WRITE(10) of one 512-byte block filled with `fill`.
    async fn write(&mut self, lba: u32, fill: u8) -> Reply {
        self.exec(&write10(lba, 1), &[fill; 512], 0).await
    }

    /// The unit attentions pending for this nexus, in the order reported: TEST UNIT READY (allowed
    /// under every reservation, SPC-5 table 67) until GOOD.
    async fn unit_attentions(&mut self) -> Vec<(u8, u8)> {
        let mut uas = Vec::new();
        for _ in 0..8 {
            let r = self.exec(&[0x00, 0, 0, 0, 0, 0], &[], 0).await;
            if r.status == GOOD {
                return uas;
            }
            let (key, asc, ascq) = r.sense_code();
            assert_eq!(
                (r.status, key),
                (CHECK_CONDITION, 0x06),
                "TEST UNIT READY: only UNIT ATTENTION may stop it, got {}",
                r.describe()
            );
            uas.push((asc, ascq));
        }
        panic!("TEST UNIT READY never returned GOOD; unit attentions {uas:02x?}");
    }

    /// Log out (reason 0: close the session, RFC 7143 11.14) and wait for the response.
    async fn logout(mut self) {
        let mut b = [0u8; 48];
        b[0] = 0x46; // I=1, Logout Request
        b[1] = 0x80; // F=1, reason 0
        let itt = self.c.next_itt();
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        b[24..28].copy_from_slice(&self.c.cmdsn.to_be_bytes());
        self.c.send(b, &[]).await;
        let r = self.c.recv().await.expect("Logout Response");
        assert_eq!(r.bhs[0], 0x26, "Logout Response");
        assert_eq!(r.bhs[2], 0, "closed successfully");
    }
}

// ---------------------------------------------------------------------------------------------
// The state check run after every step.

/// A registration as READ FULL STATUS must show it.
struct Reg {
    key: u64,
    holder: bool,
    tid: &'static [u8],
}

fn reg(key: u64, holder: bool, tid: &'static [u8]) -> Reg {
    Reg { key, holder, tid }
}

/// TransportIDs are equal as SPC-5 7.6.4.6 defines them: bytes 0..1 exactly (FORMAT CODE,
/// PROTOCOL IDENTIFIER, reserved); ADDITIONAL LENGTH the length of the rest, a multiple of 4 and
/// at least 20; the name up to its null terminator equal, ignoring case (iSCSI names compare
/// case-insensitively, RFC 7143 4.2.7.1, and the case of the ISID's hexadecimal digits is left
/// open); only null bytes after it (null padding, at least the minimum).
fn same_tid(got: &[u8], want: &[u8]) -> bool {
    let name = |t: &[u8]| -> Option<(Vec<u8>, bool)> {
        let body = t.get(4..)?;
        let nul = body.iter().position(|&b| b == 0)?;
        let padded = body[nul..].iter().all(|&b| b == 0);
        Some((body[..nul].to_ascii_lowercase(), padded))
    };
    let len_ok = got.len() >= 24
        && (got.len() - 4).is_multiple_of(4)
        && usize::from(u16::from_be_bytes([got[2], got[3]])) == got.len() - 4;
    len_ok
        && got.len() >= want.len()
        && got.get(..2) == want.get(..2)
        && matches!((name(got), name(want)), (Some((g, true)), Some((w, true))) if g == w)
}

/// Check, from `obs`'s nexus: PRGENERATION in all three answers, READ KEYS, READ RESERVATION
/// (`res`: key as READ RESERVATION reports it, and TYPE; scope is always LU_SCOPE 0h), READ FULL
/// STATUS (every registration with its key, R_HOLDER, SCOPE/TYPE for holders, ALL_TG_PT 0, the
/// relative target port and the TransportID).
async fn check(obs: &mut Node, step: &str, gen: u32, res: Option<(u64, u8)>, regs: &[Reg]) {
    let port = obs.relative_port().await;

    let (g, keys) = obs.read_keys().await;
    assert_eq!(g, gen, "{step}: READ KEYS PRGENERATION");
    let mut want: Vec<u64> = regs.iter().map(|r| r.key).collect();
    want.sort_unstable();
    assert_eq!(keys, want, "{step}: READ KEYS");

    let (g, r) = obs.read_reservation().await;
    assert_eq!(g, gen, "{step}: READ RESERVATION PRGENERATION");
    assert_eq!(
        r,
        res.map(|(k, t)| (k, t & 0x0f)),
        "{step}: READ RESERVATION (key, SCOPE/TYPE)"
    );

    let (g, full) = obs.read_full_status().await;
    assert_eq!(g, gen, "{step}: READ FULL STATUS PRGENERATION");
    assert_eq!(
        full.len(),
        regs.len(),
        "{step}: READ FULL STATUS descriptors {full:02x?}"
    );
    for want in regs {
        let got = full
            .iter()
            .find(|f| same_tid(&f.tid, want.tid))
            .unwrap_or_else(|| {
                panic!(
                    "{step}: no descriptor with TransportID {:?} in {full:02x?}",
                    String::from_utf8_lossy(want.tid)
                )
            });
        assert_eq!(
            got.key, want.key,
            "{step}: RESERVATION KEY of {:?}",
            got.tid
        );
        assert_eq!(
            got.r_holder, want.holder,
            "{step}: R_HOLDER of {:?}",
            got.tid
        );
        assert!(!got.all_tg_pt, "{step}: ALL_TG_PT (never requested)");
        assert_eq!(
            got.rel_port, port,
            "{step}: RELATIVE TARGET PORT IDENTIFIER"
        );
        if want.holder {
            let (_, ty) = res.expect("a holder implies a reservation");
            assert_eq!(
                got.scope_type,
                ty & 0x0f,
                "{step}: SCOPE (0h) and TYPE of the holder"
            );
        }
    }
}

/// The memory disk of the fixture (16 MiB, 512-byte blocks).
async fn server() -> std::net::SocketAddr {
    start_server().await.0
}

// ---------------------------------------------------------------------------------------------
// 1. Pacemaker fence_scsi.

// fence_scsi keys are per node; these are arbitrary.
const FENCE_K1: u64 = 0x0000_0000_6a2b_0001;
const FENCE_K2: u64 = 0x0000_0000_6a2b_0002;

/// Both nodes register with APTPL and node 1 reserves Write Exclusive – Registrants Only, as
/// fence_scsi's "on" does; both can write.
async fn fence_setup(addr: std::net::SocketAddr) -> (Node, Node) {
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    let mut n2 = Node::login(addr, NODE2, ISID2).await;
    check(&mut n1, "fresh LU", 0, None, &[]).await;

    // REGISTER AND IGNORE EXISTING KEY, SARK = own key, APTPL=1: each bumps PRGENERATION
    // (SPC-5 6.16.2).
    n1.pr_out_ok(
        "node 1 registers",
        REGISTER_AND_IGNORE,
        0,
        0,
        FENCE_K1,
        APTPL,
    )
    .await;
    n2.pr_out_ok(
        "node 2 registers",
        REGISTER_AND_IGNORE,
        0,
        0,
        FENCE_K2,
        APTPL,
    )
    .await;
    let regs = [reg(FENCE_K1, false, TID1), reg(FENCE_K2, false, TID2)];
    check(&mut n2, "both registered", 2, None, &regs).await;
    // APTPL was requested: PTPL_A (byte 3 bit 0) reports it active (SPC-5 6.16.4).
    let caps = n1.report_capabilities().await;
    assert_eq!(caps[3] & 0x01, 0x01, "PTPL_A after REGISTER with APTPL=1");

    // RESERVE type 5: PRGENERATION unchanged (SPC-5 6.16.2).
    n1.pr_out_ok(
        "node 1 reserves",
        RESERVE,
        WRITE_EXCLUSIVE_RO,
        FENCE_K1,
        0,
        0,
    )
    .await;
    let regs = [reg(FENCE_K1, true, TID1), reg(FENCE_K2, false, TID2)];
    check(
        &mut n2,
        "node 1 holds type 5",
        2,
        Some((FENCE_K1, WRITE_EXCLUSIVE_RO)),
        &regs,
    )
    .await;

    // Write Exclusive – Registrants Only: every registrant may write (SBC-4 4.17).
    n1.write(8, 0x11)
        .await
        .expect(GOOD, "node 1 (holder) writes");
    n2.write(9, 0x22)
        .await
        .expect(GOOD, "node 2 (registrant) writes");
    assert!(
        n1.unit_attentions().await.is_empty(),
        "nothing for node 1 yet"
    );
    assert!(
        n2.unit_attentions().await.is_empty(),
        "nothing for node 2 yet"
    );
    (n1, n2)
}

/// Node 1 is fenced: its key is gone, it cannot write or come back with its old key, it still
/// reads (type 5 lets unregistered nexuses read), node 2 holds the reservation.
async fn fenced(n1: &mut Node, n2: &mut Node) {
    // SPC-5 5.14.11.4.3: node 1's registration removed, the reservation now node 2's, same type.
    check(
        n2,
        "node 1 fenced",
        3,
        Some((FENCE_K2, WRITE_EXCLUSIVE_RO)),
        &[reg(FENCE_K2, true, TID2)],
    )
    .await;
    assert!(
        n2.unit_attentions().await.is_empty(),
        "no unit attention for the preempting nexus"
    );

    n1.write(8, 0x33)
        .await
        .expect(RESERVATION_CONFLICT, "fenced node 1 writes");
    let r = n1.read(8).await;
    r.expect(GOOD, "fenced node 1 reads (type 5: reads allowed)");
    assert_eq!(r.data, vec![0x11; 512], "node 1's last good write is there");
    let (g, keys) = n1.read_keys().await;
    assert_eq!((g, keys), (3, vec![FENCE_K2]), "node 1 sees its key gone");

    // An unregistered nexus cannot RESERVE, nor REGISTER with a non-zero RESERVATION KEY
    // (SPC-5 5.14.7, table 60): RESERVATION CONFLICT, PRGENERATION unchanged.
    n1.pr_out(RESERVE, WRITE_EXCLUSIVE_RO, FENCE_K1, 0, 0)
        .await
        .expect(RESERVATION_CONFLICT, "fenced node 1 RESERVE");
    n1.pr_out(REGISTER, 0, FENCE_K1, FENCE_K1, APTPL)
        .await
        .expect(
            RESERVATION_CONFLICT,
            "fenced node 1 REGISTER with its old key",
        );
    n1.pr_out(PREEMPT_AND_ABORT, WRITE_EXCLUSIVE_RO, FENCE_K1, FENCE_K2, 0)
        .await
        .expect(RESERVATION_CONFLICT, "fenced node 1 preempts back");

    n2.write(10, 0x44).await.expect(GOOD, "node 2 writes");
    check(
        n2,
        "after node 1's attempts",
        3,
        Some((FENCE_K2, WRITE_EXCLUSIVE_RO)),
        &[reg(FENCE_K2, true, TID2)],
    )
    .await;
}

#[tokio::test]
async fn fence_scsi_preempt_and_abort_fences_a_node() {
    let addr = server().await;
    let (mut n1, mut n2) = fence_setup(addr).await;

    // fence_scsi "off" for node 1, run on node 2: PREEMPT AND ABORT, RK = own key, SARK = the
    // victim's key, TYPE 5.
    n2.pr_out_ok(
        "node 2 preempts and aborts node 1",
        PREEMPT_AND_ABORT,
        WRITE_EXCLUSIVE_RO,
        FENCE_K2,
        FENCE_K1,
        0,
    )
    .await;
    // Node 1 lost its registration: REGISTRATIONS PREEMPTED (SPC-5 5.14.11.4.3 e)); it had no
    // task to abort, so nothing else.
    assert_eq!(n1.unit_attentions().await, vec![REGISTRATIONS_PREEMPTED]);
    fenced(&mut n1, &mut n2).await;
}

/// A memory disk that can hold one write inside the backend until the test opens the gate, and
/// records whether that write reached the medium.
struct HoldDriver {
    inner: block::driver::mem::MemDriver,
    hold_next: AtomicBool,
    gate: tokio::sync::Semaphore,
    entered: tokio::sync::Notify,
    landed: AtomicBool,
}

#[async_trait::async_trait]
impl block::Driver for HoldDriver {
    fn info(&self) -> block::DriverInfo {
        self.inner.info()
    }
    // The memory disk's store, which keeps APTPL as long as its data (the fence_scsi
    // sequence registers with APTPL set).
    fn reservation_store(&self) -> Option<std::sync::Arc<dyn block::ReservationStore>> {
        self.inner.reservation_store()
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, block::BlockError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), block::BlockError> {
        if self.hold_next.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.acquire().await.expect("gate").forget();
            self.inner.write(o, d, fua).await?;
            self.landed.store(true, Ordering::SeqCst);
            return Ok(());
        }
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

/// PREEMPT AND ABORT while node 1 has a write inside the backend: the write is aborted (no
/// GOOD for it unless it reached the medium) and never reaches the medium after the GOOD of the
/// PREEMPT AND ABORT (SPC-5 5.14.11.4.4: the preempted nexus's tasks are aborted as part of the
/// service action).
#[tokio::test]
async fn fence_scsi_preempt_and_abort_with_a_write_in_flight() {
    let driver = Arc::new(HoldDriver {
        inner: block::driver::mem::MemDriver::new(16 << 20),
        hold_next: AtomicBool::new(false),
        gate: tokio::sync::Semaphore::new(0),
        entered: tokio::sync::Notify::new(),
        landed: AtomicBool::new(false),
    });
    let (addr, _server) = start_with(driver.clone()).await;
    let (mut n1, mut n2) = fence_setup(addr).await;

    // Node 1's WRITE(10) of LBA 20 stops inside the backend.
    driver.hold_next.store(true, Ordering::SeqCst);
    let entered = driver.entered.notified();
    let write_itt = n1.send_command(&write10(20, 1), &[0xa5; 512], 0).await;
    entered.await;

    // Node 2 preempts and aborts node 1.
    let pa_itt = n2
        .send_command(
            &pr_out_cdb(PREEMPT_AND_ABORT, WRITE_EXCLUSIVE_RO),
            &pr_out_params(FENCE_K2, FENCE_K1, 0),
            0,
        )
        .await;
    let early = tokio::time::timeout(Duration::from_millis(500), n2.wait(pa_itt)).await;
    let landed_at_good = match early {
        Ok(r) => {
            // Answered while the write is still held: it must have been cancelled for good.
            r.expect(GOOD, "PREEMPT AND ABORT");
            let landed = driver.landed.load(Ordering::SeqCst);
            driver.gate.add_permits(1);
            landed
        }
        Err(_) => {
            // The target waits for the write it cannot stop; let it finish.
            driver.gate.add_permits(1);
            let r = n2.wait(pa_itt).await;
            r.expect(GOOD, "PREEMPT AND ABORT");
            driver.landed.load(Ordering::SeqCst)
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        driver.landed.load(Ordering::SeqCst),
        landed_at_good,
        "the preempted write reached the medium after GOOD of PREEMPT AND ABORT"
    );

    // Node 1's write: aborted (no response with TAS=0, TASK ABORTED with TAS=1), or completed
    // before the preemption took effect — GOOD only if it reached the medium.
    match tokio::time::timeout(Duration::from_millis(500), n1.wait(write_itt)).await {
        Err(_) => {}
        Ok(r) => {
            assert!(
                r.status == TASK_ABORTED || (r.status == GOOD && landed_at_good),
                "node 1's preempted write: {} (reached the medium: {landed_at_good})",
                r.describe()
            );
        }
    }
    let r = n2.read(20).await;
    r.expect(GOOD, "node 2 reads LBA 20");
    let want = if landed_at_good { 0xa5 } else { 0x00 };
    assert_eq!(
        r.data,
        vec![want; 512],
        "LBA 20 holds the write iff it landed"
    );

    // REGISTRATIONS PREEMPTED, and COMMANDS CLEARED BY ANOTHER INITIATOR if its write was
    // aborted (SAM-5 5.6, TAS=0); nothing else.
    let uas = n1.unit_attentions().await;
    assert!(
        uas.contains(&REGISTRATIONS_PREEMPTED),
        "unit attentions {uas:02x?}"
    );
    assert!(
        uas.iter().all(
            |ua| *ua == REGISTRATIONS_PREEMPTED || *ua == COMMANDS_CLEARED_BY_ANOTHER_INITIATOR
        ),
        "unit attentions {uas:02x?}"
    );
    fenced(&mut n1, &mut n2).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Windows Failover Clustering arbitration.
//
// [MS-CSVP] 3.2.4.16–3.2.4.24 (CprepDiskPRRegister, PRReserve, IsPRPresent, PRPreempt,
// PRClear): each node registers with REGISTER AND IGNORE EXISTING KEY and an arbitrary random
// key, reads the reservation, the owner reserves, a challenger preempts. The public
// specification does not name the reservation type; Windows uses a Registrants Only type, so
// the sequence runs for both (5h and 6h).

const WIN_K1: u64 = 0x9f3c_5e21_07ad_44b8;
const WIN_K2: u64 = 0x2b71_c0de_5a19_e603;
const WIN_K3: u64 = 0xd40e_8812_f3c7_0b5d;

async fn windows_arbitration(ty: u8) {
    let addr = server().await;
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    let mut n2 = Node::login(addr, NODE2, ISID2).await;
    let mut n3 = Node::login(addr, NODE3, ISID3).await;
    let step = |s: &str| format!("type {ty:x}h: {s}");

    n1.pr_out_ok(
        &step("node 1 registers"),
        REGISTER_AND_IGNORE,
        0,
        0,
        WIN_K1,
        0,
    )
    .await;
    n2.pr_out_ok(
        &step("node 2 registers"),
        REGISTER_AND_IGNORE,
        0,
        0,
        WIN_K2,
        0,
    )
    .await;
    n3.pr_out_ok(
        &step("node 3 registers"),
        REGISTER_AND_IGNORE,
        0,
        0,
        WIN_K3,
        0,
    )
    .await;
    // CprepDiskIsPRPresent: nothing reserved yet.
    let (g, r) = n1.read_reservation().await;
    assert_eq!((g, r), (3, None), "{}", step("no reservation"));

    // The owner reserves.
    n1.pr_out_ok(&step("node 1 reserves"), RESERVE, ty, WIN_K1, 0, 0)
        .await;
    let regs = [
        reg(WIN_K1, true, TID1),
        reg(WIN_K2, false, TID2),
        reg(WIN_K3, false, TID3),
    ];
    check(&mut n2, &step("node 1 owns"), 3, Some((WIN_K1, ty)), &regs).await;

    // The challenger reads the reservation, then preempts the owner's key with the same type.
    let (_, r) = n2.read_reservation().await;
    assert_eq!(
        r,
        Some((WIN_K1, ty)),
        "{}",
        step("node 2 sees node 1's reservation")
    );
    n2.pr_out_ok(&step("node 2 preempts"), PREEMPT, ty, WIN_K2, WIN_K1, 0)
        .await;
    let regs = [reg(WIN_K2, true, TID2), reg(WIN_K3, false, TID3)];
    check(&mut n3, &step("node 2 owns"), 4, Some((WIN_K2, ty)), &regs).await;

    // SPC-5 5.14.11.4.3: node 1 lost its registration (REGISTRATIONS PREEMPTED); node 3 kept
    // its own and the type did not change (no RESERVATIONS RELEASED); node 2 sent it.
    assert_eq!(
        n1.unit_attentions().await,
        vec![REGISTRATIONS_PREEMPTED],
        "{}",
        step("node 1")
    );
    assert!(
        n3.unit_attentions().await.is_empty(),
        "{}",
        step("node 3 has no unit attention")
    );
    assert!(
        n2.unit_attentions().await.is_empty(),
        "{}",
        step("node 2 has no unit attention")
    );

    // Node 1, unregistered: writes conflict; reads only under type 5 (SBC-4 4.17).
    n1.write(0, 0x01)
        .await
        .expect(RESERVATION_CONFLICT, &step("node 1 writes"));
    let want = if ty == WRITE_EXCLUSIVE_RO {
        GOOD
    } else {
        RESERVATION_CONFLICT
    };
    n1.read(0).await.expect(want, &step("node 1 reads"));
    // Node 3, a registrant: reads and writes.
    n3.write(0, 0x03).await.expect(GOOD, &step("node 3 writes"));
    n3.read(0).await.expect(GOOD, &step("node 3 reads"));

    // The defeated owner rejoins as a registrant and may write again.
    n1.pr_out_ok(
        &step("node 1 registers again"),
        REGISTER_AND_IGNORE,
        0,
        0,
        WIN_K1,
        0,
    )
    .await;
    let regs = [
        reg(WIN_K1, false, TID1),
        reg(WIN_K2, true, TID2),
        reg(WIN_K3, false, TID3),
    ];
    check(&mut n1, &step("node 1 back"), 5, Some((WIN_K2, ty)), &regs).await;
    n1.write(0, 0x01)
        .await
        .expect(GOOD, &step("node 1 writes again"));
}

#[tokio::test]
async fn windows_cluster_arbitration_write_exclusive_registrants_only() {
    windows_arbitration(WRITE_EXCLUSIVE_RO).await;
}

#[tokio::test]
async fn windows_cluster_arbitration_exclusive_access_registrants_only() {
    windows_arbitration(EXCLUSIVE_ACCESS_RO).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Each type, through its whole life, from one nexus.

async fn lifecycle(ty: u8) {
    const K1: u64 = 0x1111_0000_0000_0001;
    const K2: u64 = 0x2222_0000_0000_0002;
    const K3: u64 = 0x3333_0000_0000_0003;
    let ar = all_registrants(ty);
    // READ RESERVATION reports key 0 for an All Registrants reservation (SPC-5 6.16.3.2).
    let held = |k: u64| Some((if ar { 0 } else { k }, ty));
    let step = |s: &str| format!("type {ty:x}h: {s}");

    let addr = server().await;
    let mut a = Node::login(addr, NODE1, ISID1).await;
    check(&mut a, &step("fresh"), 0, None, &[]).await;

    a.pr_out_ok(
        &step("register and ignore"),
        REGISTER_AND_IGNORE,
        0,
        0,
        K1,
        0,
    )
    .await;
    check(
        &mut a,
        &step("registered"),
        1,
        None,
        &[reg(K1, false, TID1)],
    )
    .await;

    a.pr_out_ok(&step("reserve"), RESERVE, ty, K1, 0, 0).await;
    check(
        &mut a,
        &step("reserved"),
        1,
        held(K1),
        &[reg(K1, true, TID1)],
    )
    .await;
    // The holder may RESERVE again with the same type and scope (SPC-5 5.14.9: no change);
    // another type is a RESERVATION CONFLICT.
    a.pr_out_ok(&step("reserve again"), RESERVE, ty, K1, 0, 0)
        .await;
    let other = if ty == EXCLUSIVE_ACCESS {
        WRITE_EXCLUSIVE
    } else {
        EXCLUSIVE_ACCESS
    };
    a.pr_out(RESERVE, other, K1, 0, 0)
        .await
        .expect(RESERVATION_CONFLICT, &step("reserve with another type"));
    // RELEASE with the wrong type: ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION
    // (SPC-5 5.14.11.2.2).
    let r = a.pr_out(RELEASE, other, K1, 0, 0).await;
    r.expect(CHECK_CONDITION, &step("release with another type"));
    assert_eq!(
        r.sense_code(),
        (0x05, 0x26, 0x04),
        "{}",
        step("release with another type")
    );
    // A wrong RESERVATION KEY from a registered nexus: RESERVATION CONFLICT (SPC-5 5.14.7).
    a.pr_out(RELEASE, ty, K2, 0, 0)
        .await
        .expect(RESERVATION_CONFLICT, &step("release with a wrong key"));
    check(
        &mut a,
        &step("still reserved"),
        1,
        held(K1),
        &[reg(K1, true, TID1)],
    )
    .await;

    a.pr_out_ok(&step("release"), RELEASE, ty, K1, 0, 0).await;
    check(&mut a, &step("released"), 1, None, &[reg(K1, false, TID1)]).await;

    // REGISTER with the current key replaces it.
    a.pr_out_ok(&step("re-register"), REGISTER, 0, K1, K2, 0)
        .await;
    check(&mut a, &step("new key"), 2, None, &[reg(K2, false, TID1)]).await;

    a.pr_out_ok(&step("reserve with the new key"), RESERVE, ty, K2, 0, 0)
        .await;
    check(
        &mut a,
        &step("reserved again"),
        2,
        held(K2),
        &[reg(K2, true, TID1)],
    )
    .await;

    // CLEAR: every registration and the reservation gone, PRGENERATION + 1.
    a.pr_out_ok(&step("clear"), CLEAR, 0, K2, 0, 0).await;
    check(&mut a, &step("cleared"), 3, None, &[]).await;
    // Unregistered now: RESERVE is a RESERVATION CONFLICT.
    a.pr_out(RESERVE, ty, K2, 0, 0)
        .await
        .expect(RESERVATION_CONFLICT, &step("reserve after clear"));

    a.pr_out_ok(
        &step("register after clear"),
        REGISTER_AND_IGNORE,
        0,
        0,
        K3,
        0,
    )
    .await;
    a.pr_out_ok(&step("reserve after clear"), RESERVE, ty, K3, 0, 0)
        .await;
    check(
        &mut a,
        &step("reserved a third time"),
        4,
        held(K3),
        &[reg(K3, true, TID1)],
    )
    .await;

    // Preempt self (SPC-5 5.14.11.4.3). For the holder's own key the preempting nexus keeps its
    // registration and gets the new reservation (same type); for an All Registrants
    // reservation a SERVICE ACTION RESERVATION KEY of zero preempts it, removing every other
    // registration (none here). PRGENERATION + 1 each time.
    let sark = if ar { 0 } else { K3 };
    a.pr_out_ok(&step("preempt self"), PREEMPT, ty, K3, sark, 0)
        .await;
    check(
        &mut a,
        &step("preempted self"),
        5,
        held(K3),
        &[reg(K3, true, TID1)],
    )
    .await;
    a.pr_out_ok(
        &step("preempt and abort self"),
        PREEMPT_AND_ABORT,
        ty,
        K3,
        sark,
        0,
    )
    .await;
    check(
        &mut a,
        &step("preempted and aborted self"),
        6,
        held(K3),
        &[reg(K3, true, TID1)],
    )
    .await;

    // The holder reads and writes throughout.
    a.write(3, 0x5a).await.expect(GOOD, &step("holder writes"));
    a.read(3).await.expect(GOOD, &step("holder reads"));

    // Unregistering the holder releases a reservation it alone holds (SPC-5 5.14.11.2.3 / 5.14.10).
    a.pr_out_ok(&step("unregister"), REGISTER, 0, K3, 0, 0)
        .await;
    check(&mut a, &step("unregistered"), 7, None, &[]).await;
    assert!(
        a.unit_attentions().await.is_empty(),
        "{}",
        step("no unit attention for itself")
    );
}

#[tokio::test]
async fn lifecycle_write_exclusive() {
    lifecycle(WRITE_EXCLUSIVE).await;
}

#[tokio::test]
async fn lifecycle_exclusive_access() {
    lifecycle(EXCLUSIVE_ACCESS).await;
}

#[tokio::test]
async fn lifecycle_write_exclusive_registrants_only() {
    lifecycle(WRITE_EXCLUSIVE_RO).await;
}

#[tokio::test]
async fn lifecycle_exclusive_access_registrants_only() {
    lifecycle(EXCLUSIVE_ACCESS_RO).await;
}

#[tokio::test]
async fn lifecycle_write_exclusive_all_registrants() {
    lifecycle(WRITE_EXCLUSIVE_AR).await;
}

#[tokio::test]
async fn lifecycle_exclusive_access_all_registrants() {
    lifecycle(EXCLUSIVE_ACCESS_AR).await;
}

// ---------------------------------------------------------------------------------------------
// 3b. Conflicts per type: the holder, a registered nexus and an unregistered nexus.

/// (read allowed, write allowed) for a registered non-holder and for an unregistered nexus
/// (SPC-5 5.14.3 table 67 and SBC-4 4.17: READ is a read, WRITE a write; under the All
/// Registrants types a registrant is a holder).
fn access(ty: u8) -> ((bool, bool), (bool, bool)) {
    match ty {
        WRITE_EXCLUSIVE => ((true, false), (true, false)),
        EXCLUSIVE_ACCESS => ((false, false), (false, false)),
        WRITE_EXCLUSIVE_RO => ((true, true), (true, false)),
        EXCLUSIVE_ACCESS_RO => ((true, true), (false, false)),
        WRITE_EXCLUSIVE_AR => ((true, true), (true, false)),
        EXCLUSIVE_ACCESS_AR => ((true, true), (false, false)),
        _ => unreachable!("not a type"),
    }
}

#[tokio::test]
async fn conflicts_per_type_for_a_registrant_and_an_unregistered_nexus() {
    const KA: u64 = 0xa;
    const KB: u64 = 0xb;
    let status = |ok: bool| if ok { GOOD } else { RESERVATION_CONFLICT };
    for ty in ALL_TYPES {
        let step = |s: &str| format!("type {ty:x}h: {s}");
        let ar = all_registrants(ty);
        let addr = server().await;
        let mut a = Node::login(addr, NODE1, ISID1).await;
        let mut b = Node::login(addr, NODE2, ISID2).await;
        let mut c = Node::login(addr, NODE3, ISID3).await;
        a.pr_out_ok(&step("A registers"), REGISTER_AND_IGNORE, 0, 0, KA, 0)
            .await;
        b.pr_out_ok(&step("B registers"), REGISTER_AND_IGNORE, 0, 0, KB, 0)
            .await;
        a.pr_out_ok(&step("A reserves"), RESERVE, ty, KA, 0, 0)
            .await;
        let regs = [reg(KA, true, TID1), reg(KB, ar, TID2)];
        let res = Some((if ar { 0 } else { KA }, ty));
        check(&mut c, &step("A holds"), 2, res, &regs).await;

        a.read(1).await.expect(GOOD, &step("holder reads"));
        a.write(1, 0xaa).await.expect(GOOD, &step("holder writes"));
        let ((reg_r, reg_w), (unreg_r, unreg_w)) = access(ty);
        b.read(1)
            .await
            .expect(status(reg_r), &step("registrant reads"));
        b.write(1, 0xbb)
            .await
            .expect(status(reg_w), &step("registrant writes"));
        c.read(1)
            .await
            .expect(status(unreg_r), &step("unregistered reads"));
        c.write(1, 0xcc)
            .await
            .expect(status(unreg_w), &step("unregistered writes"));
        // TEST UNIT READY and PERSISTENT RESERVE IN are allowed for everyone (table 67).
        assert!(c.unit_attentions().await.is_empty(), "{}", step("C: TUR"));
        c.read_keys().await;

        // PR OUT from the unregistered nexus, other than REGISTER: RESERVATION CONFLICT
        // (SPC-5 5.14.7).
        c.pr_out(RESERVE, ty, KA, 0, 0)
            .await
            .expect(RESERVATION_CONFLICT, &step("unregistered RESERVE"));
        c.pr_out(RELEASE, ty, KA, 0, 0)
            .await
            .expect(RESERVATION_CONFLICT, &step("unregistered RELEASE"));
        c.pr_out(CLEAR, 0, KA, 0, 0)
            .await
            .expect(RESERVATION_CONFLICT, &step("unregistered CLEAR"));

        if ar {
            // B holds the All Registrants reservation too: its RESERVE of the same type is a
            // no-op (SPC-5 5.14.9).
            b.pr_out_ok(&step("B (a holder) reserves"), RESERVE, ty, KB, 0, 0)
                .await;
        } else {
            // B is not the holder: RESERVE conflicts (SPC-5 5.14.9); RELEASE is GOOD and
            // releases nothing (SPC-5 5.14.11.2.2).
            b.pr_out(RESERVE, ty, KB, 0, 0)
                .await
                .expect(RESERVATION_CONFLICT, &step("non-holder RESERVE"));
            b.pr_out_ok(&step("non-holder RELEASE"), RELEASE, ty, KB, 0, 0)
                .await;
        }
        check(&mut c, &step("unchanged"), 2, res, &regs).await;
        assert!(
            a.unit_attentions().await.is_empty(),
            "{}",
            step("A: no unit attention")
        );
        assert!(
            b.unit_attentions().await.is_empty(),
            "{}",
            step("B: no unit attention")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Reconnecting: the I_T nexus is the initiator port (name + ISID) and the target port, so a
// new session with the same ISID is the same nexus, and another ISID is another nexus
// (SAM-5 4.6, RFC 7143 4.4.1; SPC-5 5.14.1: registrations survive the loss of the nexus).

#[tokio::test]
async fn reconnect_with_the_same_isid_keeps_the_registration_and_the_reservation() {
    const K: u64 = 0x0123_4567_89ab_cdef;
    const K9: u64 = 0x99;
    let addr = server().await;
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    let mut n2 = Node::login(addr, NODE2, ISID2).await;
    n1.pr_out_ok("node 1 registers", REGISTER_AND_IGNORE, 0, 0, K, 0)
        .await;
    n1.pr_out_ok("node 1 reserves", RESERVE, EXCLUSIVE_ACCESS, K, 0, 0)
        .await;
    n1.write(5, 0x15).await.expect(GOOD, "holder writes");
    n2.write(5, 0x25)
        .await
        .expect(RESERVATION_CONFLICT, "unregistered node 2 writes");

    // Log out, log in again with the same ISID.
    n1.logout().await;
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    check(
        &mut n1,
        "after logout and login",
        1,
        Some((K, EXCLUSIVE_ACCESS)),
        &[reg(K, true, TID1)],
    )
    .await;
    n1.write(5, 0x16)
        .await
        .expect(GOOD, "still the holder after a logout");

    // Drop the connection without logging out, log in again with the same ISID.
    drop(n1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    check(
        &mut n1,
        "after a dropped connection",
        1,
        Some((K, EXCLUSIVE_ACCESS)),
        &[reg(K, true, TID1)],
    )
    .await;
    n1.write(5, 0x17)
        .await
        .expect(GOOD, "still the holder after a dropped connection");

    // The same initiator on another ISID is another nexus: unregistered.
    let mut other = Node::login(addr, NODE1, ISID1B).await;
    other
        .write(5, 0x18)
        .await
        .expect(RESERVATION_CONFLICT, "another ISID writes");
    other.read(5).await.expect(
        RESERVATION_CONFLICT,
        "another ISID reads (Exclusive Access)",
    );
    other
        .pr_out(RELEASE, EXCLUSIVE_ACCESS, K, 0, 0)
        .await
        .expect(
            RESERVATION_CONFLICT,
            "another ISID releases with the holder's key",
        );
    other
        .pr_out_ok("another ISID registers", REGISTER_AND_IGNORE, 0, 0, K9, 0)
        .await;
    let regs = [reg(K, true, TID1), reg(K9, false, TID1B)];
    check(
        &mut other,
        "two nexuses of one initiator",
        2,
        Some((K, EXCLUSIVE_ACCESS)),
        &regs,
    )
    .await;
    other.write(5, 0x19).await.expect(
        RESERVATION_CONFLICT,
        "a registered non-holder writes (Exclusive Access)",
    );
    let r = n1.read(5).await;
    r.expect(GOOD, "holder reads");
    assert_eq!(r.data, vec![0x17; 512]);
}

// ---------------------------------------------------------------------------------------------
// REPORT CAPABILITIES.

#[tokio::test]
async fn report_capabilities_advertises_all_six_types() {
    let addr = server().await;
    let mut n = Node::login(addr, NODE1, ISID1).await;
    let caps = n.report_capabilities().await;
    // Byte 2: CRH bit 4, SIP_C bit 3, ATP_C bit 2, PTPL_C bit 0 — SPEC_I_PT, ALL_TG_PT and
    // APTPL are implemented (issue 3), so SIP_C, ATP_C and PTPL_C are one.
    assert_eq!(caps[2] & 0x0d, 0x0d, "SIP_C, ATP_C, PTPL_C");
    // Byte 3: TMV bit 7 (the type mask is valid), PTPL_A bit 0 (nothing registered with APTPL).
    assert_eq!(caps[3] & 0x81, 0x80, "TMV=1, PTPL_A=0");
    // Bytes 4..5 PERSISTENT RESERVATION TYPE MASK (table 197): WR_EX_AR 80h, EX_AC_RO 40h,
    // WR_EX_RO 20h, EX_AC 08h, WR_EX 02h in byte 4; EX_AC_AR 01h in byte 5.
    assert_eq!(&caps[4..6], &[0xea, 0x01], "all six types");
    assert_eq!(&caps[6..8], &[0, 0], "bytes 6..7 reserved");
}

/// Type changes by PREEMPT give the remaining registrants RESERVATIONS RELEASED (SPC-5
/// 5.14.11.4.3 f)).
#[tokio::test]
async fn preempt_changing_the_type_tells_the_other_registrants() {
    const K1: u64 = 0x51;
    const K2: u64 = 0x52;
    const K3: u64 = 0x53;
    let addr = server().await;
    let mut n1 = Node::login(addr, NODE1, ISID1).await;
    let mut n2 = Node::login(addr, NODE2, ISID2).await;
    let mut n3 = Node::login(addr, NODE3, ISID3).await;
    n1.pr_out_ok("node 1 registers", REGISTER_AND_IGNORE, 0, 0, K1, 0)
        .await;
    n2.pr_out_ok("node 2 registers", REGISTER_AND_IGNORE, 0, 0, K2, 0)
        .await;
    n3.pr_out_ok("node 3 registers", REGISTER_AND_IGNORE, 0, 0, K3, 0)
        .await;
    n1.pr_out_ok("node 1 reserves", RESERVE, WRITE_EXCLUSIVE_RO, K1, 0, 0)
        .await;
    n2.pr_out_ok(
        "node 2 preempts with type 6",
        PREEMPT,
        EXCLUSIVE_ACCESS_RO,
        K2,
        K1,
        0,
    )
    .await;
    let regs = [reg(K2, true, TID2), reg(K3, false, TID3)];
    check(
        &mut n2,
        "node 2 holds type 6",
        4,
        Some((K2, EXCLUSIVE_ACCESS_RO)),
        &regs,
    )
    .await;
    assert_eq!(
        n1.unit_attentions().await,
        vec![REGISTRATIONS_PREEMPTED],
        "node 1"
    );
    assert_eq!(
        n3.unit_attentions().await,
        vec![RESERVATIONS_RELEASED],
        "node 3"
    );
    assert!(n2.unit_attentions().await.is_empty(), "node 2");
}

/// The TransportID comparison itself, on hand-written TransportIDs.
#[test]
fn transport_id_comparison() {
    assert!(same_tid(TID1, TID1));
    // Upper-case ISID digits.
    assert!(same_tid(
        b"\x45\x00\x00\x28iqn.2026-01.test:node1,i,0x80ABCDEF0001\0",
        TID1
    ));
    // More null padding than the minimum.
    assert!(same_tid(
        b"\x45\x00\x00\x2ciqn.2026-01.test:node1,i,0x80abcdef0001\0\0\0\0\0",
        TID1
    ));
    // FORMAT CODE 00b (name only), another ISID, a wrong ADDITIONAL LENGTH, no terminator.
    assert!(!same_tid(
        b"\x05\x00\x00\x28iqn.2026-01.test:node1,i,0x80abcdef0001\0",
        TID1
    ));
    assert!(!same_tid(TID1B, TID1));
    assert!(!same_tid(
        b"\x45\x00\x00\x24iqn.2026-01.test:node1,i,0x80abcdef0001\0",
        TID1
    ));
    assert!(!same_tid(
        b"\x45\x00\x00\x28iqn.2026-01.test:node1,i,0x80abcdef00011",
        TID1
    ));
    assert!(same_tid(TID3, TID3));
}
