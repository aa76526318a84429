//! The test initiator shared by the wire-level test files: an in-process server on loopback
//! with a memory-backed LU, and a minimal initiator written from RFC 7143's PDU layouts.
//!
//! Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use iscsi::{Auth, Server, ServerConfig, TargetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TARGET: &str = "iqn.2026-01.io.sharedisk:wire";
/// The initiator name and ISID [`Client::login`] logs in with.
pub const INITIATOR: &str = "iqn.2026-01.test:wire";
pub const ISID: [u8; 6] = [0x80, 1, 2, 3, 4, 5];

pub async fn start() -> std::net::SocketAddr {
    start_server().await.0
}

pub async fn start_server() -> (std::net::SocketAddr, Arc<Server>) {
    start_with(Arc::new(block::driver::mem::MemDriver::new(16 << 20))).await
}

pub async fn start_with(driver: Arc<dyn block::Driver>) -> (std::net::SocketAddr, Arc<Server>) {
    start_with_auth(driver, Auth::default(), Auth::default()).await
}

pub async fn start_with_auth(
    driver: Arc<dyn block::Driver>,
    auth: Auth,
    discovery_auth: Auth,
) -> (std::net::SocketAddr, Arc<Server>) {
    start_with_luns(vec![driver], auth, discovery_auth).await
}

/// An LU of 512-byte blocks on `driver`, with serial number and identifier `id`.
pub fn lu_on(driver: Arc<dyn block::Driver>, id: u64) -> scsi::LogicalUnit {
    let backend = block::Backend::new(driver, 512).expect("512-byte blocks");
    scsi::LogicalUnit::new(
        backend,
        scsi::LuConfig {
            vendor: "SHAREDSK".into(),
            product: "memdisk".into(),
            revision: "0001".into(),
            serial: id.to_string(),
            id,
        },
    )
}

/// A target whose LUN n is on `drivers[n]`.
pub async fn start_with_luns(
    drivers: Vec<Arc<dyn block::Driver>>,
    auth: Auth,
    discovery_auth: Auth,
) -> (std::net::SocketAddr, Arc<Server>) {
    let mut t = scsi::Target::new();
    for (n, driver) in (0u64..).zip(drivers) {
        t.add_lu(n, Arc::new(lu_on(driver, n + 1)));
    }
    let server = Server::new(ServerConfig {
        targets: vec![TargetConfig {
            name: TARGET.into(),
            alias: None,
            scsi: Arc::new(t),
            allowed_initiators: None,
            auth,
            tpgt: 1,
        }],
        discovery_auth,
        portals: Vec::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server.clone().serve(listener));
    (addr, server)
}

pub struct Pdu {
    pub bhs: [u8; 48],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[off],
            self.bhs[off + 1],
            self.bhs[off + 2],
            self.bhs[off + 3],
        ])
    }
}

/// How an initiator content with the RFC 7143 defaults answers the target's offers:
/// InitialR2T=Yes (OR), ImmediateData=Yes (AND), and the default burst lengths (the minimum).
pub fn defaults(k: &str) -> &'static str {
    match k {
        "InitialR2T" => "Yes",
        "ImmediateData" => "Yes",
        "MaxBurstLength" => "262144",
        "FirstBurstLength" => "65536",
        _ => "NotUnderstood",
    }
}

pub struct Client {
    pub s: TcpStream,
    pub cmdsn: u32,
    pub itt: u32,
    /// NOP-Ins that only carried a new MaxCmdSN (ITT and TTT FFFFFFFFh, RFC 7143 11.4.11,
    /// 11.19.1), which [`Client::recv`] passed over.
    pub window_nops: u32,
    /// The MaxCmdSN of the last PDU received (bytes 32-35 of every target PDU's header).
    pub max_cmdsn: u32,
}

impl Client {
    pub async fn send(&mut self, bhs: [u8; 48], data: &[u8]) {
        let mut b = bhs;
        let len = (data.len() as u32).to_be_bytes();
        b[5..8].copy_from_slice(&len[1..]); // DataSegmentLength
        self.s.write_all(&b).await.expect("send BHS");
        self.s.write_all(data).await.expect("send data");
        let pad = (4 - data.len() % 4) % 4;
        self.s.write_all(&[0u8; 3][..pad]).await.expect("send pad");
    }

    /// A NOP-Out (RFC 7143 11.18), immediate, at the current CmdSN: a ping of ours (an ITT,
    /// TTT 0xffffffff) or the answer to the target's (ITT 0xffffffff, the ping's TTT).
    pub fn nop_out(&self, itt: u32, ttt: u32) -> [u8; 48] {
        let mut n = [0u8; 48];
        n[0] = 0x40; // I=1, NOP-Out
        n[1] = 0x80; // F=1
        n[16..20].copy_from_slice(&itt.to_be_bytes());
        n[20..24].copy_from_slice(&ttt.to_be_bytes());
        n[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        n
    }

    /// The next PDU, passing over (and counting in `window_nops`) the NOP-Ins that only tell
    /// a new MaxCmdSN: the target sends one whenever a command ends with no response of its
    /// own (task management ended it), and may send one more than needed.
    pub async fn recv(&mut self) -> Option<Pdu> {
        loop {
            let p = self.recv_any().await?;
            if p.bhs[0] & 0x3f == 0x20 && p.u32(16) == 0xffff_ffff && p.u32(20) == 0xffff_ffff {
                self.window_nops += 1;
                continue;
            }
            return Some(p);
        }
    }

    /// The next PDU, whatever it is.
    pub async fn recv_any(&mut self) -> Option<Pdu> {
        let mut bhs = [0u8; 48];
        tokio::time::timeout(Duration::from_secs(2), self.s.read_exact(&mut bhs))
            .await
            .ok()?
            .ok()?;
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let mut data = vec![0; len + (4 - len % 4) % 4];
        self.s.read_exact(&mut data).await.ok()?;
        data.truncate(len);
        self.max_cmdsn = u32::from_be_bytes([bhs[32], bhs[33], bhs[34], bhs[35]]);
        Some(Pdu { bhs, data })
    }

    /// Log in to the test target in one operational-stage exchange (CSG=1 → NSG=3).
    pub async fn login(addr: std::net::SocketAddr, keys: &str) -> Client {
        Self::login_isid(addr, keys, ISID).await
    }

    /// [`Client::login`] with no keys, but the Login Response's status if the target turns the
    /// login away (see [`Client::try_login_as`]).
    pub async fn try_login(addr: std::net::SocketAddr) -> Result<Client, u16> {
        Self::try_login_as(addr, INITIATOR, "", ISID, defaults).await
    }

    /// Log in, answering the target's own offers (RFC 7143 6.2) as an initiator content with
    /// the RFC 7143 defaults does: InitialR2T=Yes (OR), ImmediateData=Yes (AND), and the
    /// default burst lengths (the minimum).
    pub async fn login_isid(addr: std::net::SocketAddr, keys: &str, isid: [u8; 6]) -> Client {
        Self::login_answering(addr, keys, isid, defaults).await
    }

    /// Log in with `keys` in one operational-stage request (CSG=1 → NSG=3), then answer each
    /// key the target offers with `answer` until it agrees to the transit.
    pub async fn login_answering(
        addr: std::net::SocketAddr,
        keys: &str,
        isid: [u8; 6],
        answer: impl Fn(&str) -> &'static str,
    ) -> Client {
        Self::login_as(addr, INITIATOR, keys, isid, answer).await
    }

    /// Log in as initiator `name` with `isid`, as [`Client::login_answering`] does.
    pub async fn login_as(
        addr: std::net::SocketAddr,
        name: &str,
        keys: &str,
        isid: [u8; 6],
        answer: impl Fn(&str) -> &'static str,
    ) -> Client {
        match Self::try_login_as(addr, name, keys, isid, answer).await {
            Ok(c) => c,
            Err(status) => panic!("login failed with status {status:#06x}"),
        }
    }

    /// A TCP connection to `addr`, not logged in; CmdSN and ITT start at 1.
    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        Client {
            s,
            cmdsn: 1,
            itt: 1,
            window_nops: 0,
            max_cmdsn: 0,
        }
    }

    /// Connect and send the first Login Request of a normal session to the test target, as
    /// initiator `name` with `isid` and `keys` (`|`-separated): one operational-stage request
    /// that asks to go to the full feature phase (CSG=1 → NSG=3). Returns the request's BHS.
    pub async fn start_login(
        addr: std::net::SocketAddr,
        name: &str,
        keys: &str,
        isid: [u8; 6],
    ) -> (Client, [u8; 48]) {
        let mut c = Client::connect(addr).await;
        let mut b = [0u8; 48];
        b[0] = 0x43; // I=1, Login Request
        b[1] = 0x87; // T=1, CSG=1, NSG=3
        b[8..14].copy_from_slice(&isid); // ISID
        b[16..20].copy_from_slice(&0u32.to_be_bytes()); // ITT
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        let text = format!(
            "InitiatorName={name}\0SessionType=Normal\0TargetName={TARGET}\0{}",
            keys.replace('|', "\0")
        );
        c.send(b, text.as_bytes()).await;
        (c, b)
    }

    /// [`Client::login_as`], but a Login Response with a non-zero status (RFC 7143 11.13.5)
    /// is returned as that status. The connection closing (or going silent) without a Login
    /// Response panics: RFC 7143 6.7 has a target answer a login it refuses.
    pub async fn try_login_as(
        addr: std::net::SocketAddr,
        name: &str,
        keys: &str,
        isid: [u8; 6],
        answer: impl Fn(&str) -> &'static str,
    ) -> Result<Client, u16> {
        let (mut c, b) = Self::start_login(addr, name, keys, isid).await;
        for _ in 0..3 {
            let r = c
                .recv()
                .await
                .expect("a Login Response before the connection closes");
            assert_eq!(r.bhs[0], 0x23, "Login Response");
            let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]); // Status-Class, -Detail
            if status != 0 {
                return Err(status);
            }
            if r.bhs[1] == 0x87 {
                return Ok(c); // T=1 CSG=1 NSG=3
            }
            assert_eq!(r.bhs[1], 0x04, "T=0 CSG=1: the target offers keys");
            let text = String::from_utf8(r.data).expect("text");
            let offered: Vec<(&str, &str)> = text
                .split('\0')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| {
                    matches!(
                        *k,
                        "InitialR2T" | "ImmediateData" | "MaxBurstLength" | "FirstBurstLength"
                    ) && !keys.contains(&format!("{k}="))
                })
                .collect();
            // The burst lengths' result function is the minimum (RFC 7143 13.13, 13.14): a
            // number answered is never above the one offered.
            let reply: String = offered
                .iter()
                .map(|&(k, ours)| {
                    let mine = answer(k);
                    let v = match (mine.parse::<u32>(), ours.parse::<u32>()) {
                        (Ok(a), Ok(b)) => a.min(b).to_string(),
                        _ => mine.to_string(),
                    };
                    format!("{k}={v}\0")
                })
                .collect();
            let mut b = b;
            b[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
            b[8..14].copy_from_slice(&isid);
            c.send(b, reply.as_bytes()).await;
        }
        panic!("the target never agreed to the full feature phase");
    }

    /// Consume the unit attention a new I_T nexus gets on its first command (SAM-5: power on or
    /// reset), so the test's own commands see the status they are about: TEST UNIT READY until
    /// GOOD, at most a few times.
    pub async fn clear_unit_attention(&mut self) {
        for _ in 0..4 {
            let (b, _) = self.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]); // F, TEST UNIT READY
            self.send(b, &[]).await;
            let r = self.recv().await.expect("SCSI Response");
            assert_eq!(r.bhs[0], 0x21, "SCSI Response");
            if r.bhs[3] == 0x00 {
                return; // GOOD
            }
        }
        panic!("TEST UNIT READY never returned GOOD");
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// A SCSI Command BHS (RFC 7143 11.3).
    pub fn command(&mut self, flags: u8, edtl: u32, cdb: &[u8]) -> ([u8; 48], u32) {
        let itt = self.next_itt();
        let mut b = [0u8; 48];
        b[0] = 0x01; // SCSI Command
        b[1] = flags; // F R W ATTR
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        b[20..24].copy_from_slice(&edtl.to_be_bytes()); // EDTL
        b[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        self.cmdsn += 1;
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        (b, itt)
    }
}

pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}
