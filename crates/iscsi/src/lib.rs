//! iSCSI target (RFC 7143).
//!
//! [`Server`] accepts connections on a listener and runs login, discovery and full-feature
//! sessions for the configured [`TargetConfig`]s. SCSI commands go to the target's
//! [`scsi::Target`]; this crate owns only the transport.
//!
//! Layout:
//! - `pdu`: BHS/AHS/data-segment framing and digests;
//! - `text`: `key=value` text and the negotiation of operational keys;
//! - `chap`: CHAP (MD5) with hex/base64 values;
//! - `login`: the login phase as a pure state machine;
//! - `session`: the full feature phase, a reader task and a writer task per connection.
//!
//! Sessions: one connection each (MaxConnections=1, ErrorRecoveryLevel=0). The server keeps a
//! small registry of sessions (locked only at login and logout, never on the I/O path) for
//! session reinstatement (RFC 7143 6.3.5: a new login with the same initiator name and ISID
//! ends the old session), TARGET COLD RESET (which drops every connection of the target) and
//! [`Server::sessions`].

mod chap;
mod login;
mod pdu;
mod session;
mod text;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::login::{Kind, Login, Outcome, LOGIN_MAX_DATA};
use crate::pdu::Framing;

/// Time allowed for the whole login phase.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle time before a NOP-In ping, and the time allowed for its answer.
const NOP_INTERVAL: Duration = Duration::from_secs(15);
/// Time allowed for a reinstated session to end.
const REINSTATE_TIMEOUT: Duration = Duration::from_secs(10);

/// One CHAP identity: the name and the secret (RFC 7143 12.1.3, RFC 1994).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSecret {
    pub user: String,
    pub secret: String,
}

/// Authentication required by a target (or by discovery).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// When set, the initiator must authenticate with CHAP as this user.
    pub chap: Option<ChapSecret>,
    /// When set (with `chap`), the target authenticates itself to the initiator (mutual CHAP).
    pub mutual: Option<ChapSecret>,
}

/// One iSCSI target as served.
#[derive(Clone)]
pub struct TargetConfig {
    /// The target name (iqn./eui./naa.).
    pub name: String,
    pub alias: Option<String>,
    /// The SCSI target device behind it.
    pub scsi: Arc<scsi::Target>,
    /// Initiator names allowed to log in; `None` admits any.
    pub allowed_initiators: Option<Vec<String>>,
    pub auth: Auth,
    /// Target portal group tag.
    pub tpgt: u16,
}

/// The server's configuration.
#[derive(Clone)]
pub struct ServerConfig {
    pub targets: Vec<TargetConfig>,
    /// Authentication for discovery sessions.
    pub discovery_auth: Auth,
    /// Addresses announced in SendTargets (TargetAddress); the listener's own address when empty.
    pub portals: Vec<SocketAddr>,
}

/// One logged-in session, as listed by [`Server::sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub initiator: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// The target name; `None` for a discovery session.
    pub target: Option<String>,
    pub peer: SocketAddr,
}

struct Entry {
    info: SessionInfo,
    target: Option<usize>,
    kill: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    sessions: HashMap<u64, Entry>,
}

/// An iSCSI target server.
pub struct Server {
    config: ServerConfig,
    registry: Mutex<Registry>,
    next_tsih: AtomicU16,
    shutdown: watch::Sender<bool>,
    nop_interval_ms: AtomicU64,
}

impl Server {
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            registry: Mutex::new(Registry::default()),
            next_tsih: AtomicU16::new(1),
            shutdown: watch::channel(false).0,
            nop_interval_ms: AtomicU64::new(NOP_INTERVAL.as_millis() as u64),
        })
    }

    /// Keep-alive: after `interval` without a PDU from the initiator a session sends a NOP-In
    /// ping (RFC 7143 11.19), and ends when the next `interval` passes without any PDU.
    /// Applies to sessions that start afterwards. Default 15 s.
    pub fn set_nop_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.nop_interval_ms.store(ms, Ordering::Relaxed);
    }

    fn nop_interval(&self) -> Duration {
        Duration::from_millis(self.nop_interval_ms.load(Ordering::Relaxed))
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The sessions currently in the full feature phase.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        match self.registry.lock() {
            Ok(r) => r.sessions.values().map(|e| e.info.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Stop accepting connections ([`Server::serve`] returns) and end every session.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        if let Ok(r) = self.registry.lock() {
            for e in r.sessions.values() {
                e.kill.send_replace(true);
            }
        }
    }

    /// Accept and serve connections until [`Server::shutdown`]. Accept errors (such as running
    /// out of file descriptors) are logged and retried.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut stop = self.shutdown.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let accepted = tokio::select! {
                _ = stop.changed() => return Ok(()),
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, a connection reset before accept, ...: transient.
                    tracing::warn!(error = %e, "iSCSI accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(stream, peer).await {
                    tracing::debug!(%peer, error = %e, "iSCSI connection ended");
                }
            });
        }
    }

    fn alloc_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Signal every session of target `index` to end (TARGET COLD RESET).
    fn kill_target_sessions(&self, index: usize) {
        if let Ok(r) = self.registry.lock() {
            for e in r.sessions.values() {
                if e.target == Some(index) {
                    e.kill.send_replace(true);
                }
            }
        }
    }

    /// Register a new session, first ending any session with the same initiator name, ISID
    /// and target (session reinstatement, RFC 7143 6.3.5).
    async fn register(
        &self,
        info: SessionInfo,
        target: Option<usize>,
    ) -> (u64, watch::Receiver<bool>, watch::Sender<bool>) {
        let old: Vec<watch::Receiver<bool>> = match self.registry.lock() {
            Ok(r) => r
                .sessions
                .values()
                .filter(|e| {
                    e.target == target
                        && e.info.initiator == info.initiator
                        && e.info.isid == info.isid
                })
                .map(|e| {
                    e.kill.send_replace(true);
                    e.done.clone()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for mut d in old {
            let _ = tokio::time::timeout(REINSTATE_TIMEOUT, d.wait_for(|x| *x)).await;
        }
        let (kill_tx, kill_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let id = match self.registry.lock() {
            Ok(mut r) => {
                r.next_id += 1;
                let id = r.next_id;
                r.sessions.insert(
                    id,
                    Entry {
                        info,
                        target,
                        kill: kill_tx,
                        done: done_rx,
                    },
                );
                id
            }
            Err(_) => 0,
        };
        (id, kill_rx, done_tx)
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut r) = self.registry.lock() {
            r.sessions.remove(&id);
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), session::SessionError> {
        let local = stream.local_addr()?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 * 1024, r);
        let mut wr = BufWriter::with_capacity(256 * 1024, w);
        let framing = Framing {
            header_digest: false,
            data_digest: false,
            max_data: LOGIN_MAX_DATA,
        };
        let mut login = Login::new(&self.config, self.alloc_tsih());
        let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
        let (est, id, kill, done, nexus) = loop {
            let pdu = tokio::time::timeout_at(deadline, pdu::read_pdu(&mut rd, framing))
                .await
                .map_err(|_| session::SessionError::Protocol("Login timed out"))??;
            let (mut bhs, data, outcome) = login.step(&pdu);
            let reg = match &outcome {
                Outcome::Done(est) => {
                    let (target, tname, nexus) = match est.kind {
                        Kind::Normal(i) => {
                            let t = self.config.targets.get(i);
                            let nexus = t.map(|t| {
                                Arc::new(scsi::ItNexus {
                                    initiator: scsi::InitiatorPort {
                                        transport: scsi::Transport::Iscsi,
                                        name: est.initiator_name.clone(),
                                        isid: Some(est.isid),
                                    },
                                    target: scsi::TargetPort {
                                        name: t.name.clone(),
                                        tpgt: t.tpgt,
                                        relative_id: t.tpgt.max(1),
                                    },
                                })
                            });
                            (Some(i), t.map(|t| t.name.clone()), nexus)
                        }
                        Kind::Discovery => (None, None, None),
                    };
                    let info = SessionInfo {
                        initiator: est.initiator_name.clone(),
                        isid: est.isid,
                        tsih: est.tsih,
                        target: tname,
                        peer,
                    };
                    Some((self.register(info, target).await, nexus))
                }
                _ => None,
            };
            pdu::write_pdu(&mut wr, &mut bhs, &data, framing).await?;
            wr.flush().await?;
            match (outcome, reg) {
                (Outcome::Done(est), Some(((id, kill, done), nexus))) => {
                    break (est, id, kill, done, nexus)
                }
                (Outcome::Fail(status), _) => {
                    tracing::info!(%peer, status = format!("{status:#06x}"), "iSCSI login failed");
                    return Ok(());
                }
                _ => {}
            }
        };
        tracing::debug!(%peer, initiator = %est.initiator_name, params = ?est.params, "iSCSI session established");
        let target = match est.kind {
            Kind::Normal(i) => self.config.targets.get(i).map(|t| t.scsi.clone()),
            Kind::Discovery => None,
        };
        let result = session::run(self.clone(), *est, nexus.clone(), rd, wr, kill, local).await;
        self.unregister(id);
        if let (Some(t), Some(n)) = (target, nexus) {
            t.nexus_lost(&n);
        }
        done.send_replace(true);
        result
    }
}

/// Entry points for fuzz targets: they run the parsers on arbitrary bytes and must never
/// panic.
pub mod fuzzing {
    use super::*;

    /// Parse `data` as a PDU stream with and without digests, and any SCSI Command's CDB.
    pub fn pdu(data: &[u8]) {
        for (hd, dd) in [(false, false), (true, true)] {
            let framing = Framing {
                header_digest: hd,
                data_digest: dd,
                max_data: 1 << 20,
            };
            let mut rest = data;
            while let Ok((p, used)) = pdu::parse(rest, framing) {
                let _ = session::cdb_of(&p);
                let _ = pdu::decode_lun(p.bhs.lun());
                rest = rest.get(used..).unwrap_or_default();
            }
        }
    }

    /// Parse `data` as login text, negotiate every key, and run it through the login state
    /// machine as the text of a Login Request.
    pub fn login_text(data: &[u8]) {
        if let Ok(pairs) = text::parse(data) {
            let mut p = text::Params::default();
            for (k, v) in &pairs {
                let _ = text::negotiate(&mut p, k, v, false);
                let _ = text::negotiate(&mut p, k, v, true);
                let _ = chap::decode_binary(v);
            }
            p.finish();
        }
        let config = ServerConfig {
            targets: vec![TargetConfig {
                name: "iqn.2026-01.io.sharedisk:fuzz".into(),
                alias: Some("fuzz".into()),
                scsi: Arc::new(scsi::Target::new()),
                allowed_initiators: None,
                auth: Auth {
                    chap: Some(ChapSecret {
                        user: "u".into(),
                        secret: "s".into(),
                    }),
                    mutual: None,
                },
                tpgt: 1,
            }],
            discovery_auth: Auth::default(),
            portals: Vec::new(),
        };
        for flags in [0x81u8, 0x87, 0x01, 0x44] {
            let mut login = Login::new(&config, 1);
            let mut bhs = pdu::Bhs::new(pdu::op::LOGIN_REQ);
            bhs.0[1] = flags;
            let req = pdu::Pdu {
                bhs,
                ahs: Vec::new(),
                data: data.to_vec(),
                data_digest_bad: false,
            };
            let _ = login.step(&req);
            let _ = login.step(&req);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The fuzz entry points survive random input and mutations of valid input.
    #[test]
    fn fuzz_entry_points_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7143);
        let mut login = b"InitiatorName=iqn.x\0TargetName=iqn.2026-01.io.sharedisk:fuzz\0AuthMethod=CHAP\0CHAP_A=5\0CHAP_N=u\0CHAP_R=0x00\0HeaderDigest=CRC32C\0MaxBurstLength=512\0".to_vec();
        let mut pdu = vec![0u8; 48];
        pdu[0] = 0x01; // SCSI Command
        pdu[4] = 2; // TotalAHSLength: 8 bytes
        pdu[7] = 4; // DataSegmentLength
        pdu.extend_from_slice(&[0, 5, 1, 0, 1, 2, 3, 4]); // Extended CDB AHS
        pdu.extend_from_slice(&[1, 2, 3, 4]);
        for _ in 0..5000 {
            let n = rng.gen_range(0..200);
            let random: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            super::fuzzing::pdu(&random);
            super::fuzzing::login_text(&random);
            for buf in [&mut login, &mut pdu] {
                let mut m = buf.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..m.len());
                    m[i] = rng.gen();
                }
                super::fuzzing::pdu(&m);
                super::fuzzing::login_text(&m);
            }
        }
        login.clear();
        pdu.clear();
    }
}
