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
//!
//! Limits: at most 1024 connections at once (`MAX_CONNECTIONS`; more are closed as accepted);
//! the login phase must finish within 30 s (`LOGIN_TIMEOUT`); in the full feature phase a PDU
//! whose first byte has arrived must be complete within 30 s (`PDU_TIMEOUT`), a write's data
//! must come within 30 s of being asked for (see [`Server::set_data_out_timeout`]), and an idle
//! initiator is pinged (see [`Server::set_nop_interval`]).

mod chap;
mod login;
mod pdu;
mod session;
mod text;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::login::{Kind, Login, Outcome, LOGIN_MAX_DATA};
use crate::pdu::Framing;

/// Time allowed for the whole login phase, from accepting the connection to the last Login
/// Response written.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed to receive the rest of a PDU once its first byte has arrived in the full
/// feature phase; a connection that stalls inside a PDU is dropped.
const PDU_TIMEOUT: Duration = Duration::from_secs(30);
/// See [`Server::set_data_out_timeout`].
const DATA_OUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one server serves at once (in login or full feature phase); one accepted
/// beyond it is closed at once, with a log line.
const MAX_CONNECTIONS: usize = 1024;
/// Default idle time before a NOP-In ping, and the time allowed for its answer.
const NOP_INTERVAL: Duration = Duration::from_secs(15);
/// How often a login that reinstates a session says it is still waiting for the old one's
/// commands to finish (the wait itself is not bounded).
const REINSTATE_WARN: Duration = Duration::from_secs(10);

/// One CHAP identity: the name and the secret (RFC 7143 12.1.3, RFC 1994). Its `Debug`
/// shows the name only, so no log or error message carries the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSecret")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
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

impl TargetConfig {
    /// The target port its sessions are I_T nexuses through: `<name>,t,0x<TPGT>`, whose
    /// RELATIVE TARGET PORT IDENTIFIER is the TPGT (1 for TPGT 0, as 0 is reserved).
    pub fn port(&self) -> scsi::TargetPort {
        scsi::TargetPort {
            name: self.name.clone(),
            tpgt: self.tpgt,
            relative_id: self.tpgt.max(1),
        }
    }
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

impl Entry {
    fn key(&self) -> SessionKey {
        (self.target, self.info.initiator.clone(), self.info.isid)
    }
}

/// What names a session for reinstatement: target, initiator name and ISID.
type SessionKey = (Option<usize>, String, [u8; 6]);

#[derive(Default)]
struct Registry {
    next_id: u64,
    sessions: HashMap<u64, Entry>,
    /// The newest login of each session: the one registered, or the one waiting to reinstate
    /// it. Only that login may register.
    claims: HashMap<SessionKey, u64>,
}

impl Registry {
    /// Forget `key`'s claim if it is still login `id`'s (not a newer login's).
    fn drop_claim(&mut self, key: &SessionKey, id: u64) {
        if self.claims.get(key) == Some(&id) {
            self.claims.remove(key);
        }
    }
}

/// A login's claim on its session; dropped unregistered (superseded, timed out), it gives the
/// claim up.
struct Claim<'a> {
    registry: &'a Mutex<Registry>,
    key: SessionKey,
    id: u64,
    registered: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.registered {
            return;
        }
        if let Ok(mut r) = self.registry.lock() {
            r.drop_claim(&self.key, self.id);
        }
    }
}

/// An iSCSI target server.
pub struct Server {
    config: ServerConfig,
    registry: Mutex<Registry>,
    next_tsih: AtomicU16,
    shutdown: watch::Sender<bool>,
    nop_interval_ms: AtomicU64,
    login_timeout_ms: AtomicU64,
    pdu_timeout_ms: AtomicU64,
    data_out_timeout_ms: AtomicU64,
    max_connections: AtomicUsize,
    /// Connections being served.
    connections: AtomicUsize,
    /// Woken when the last connection being served ends (see [`Server::closed`]).
    idle: tokio::sync::Notify,
    /// Test hook: a connection's task panics right after its session is registered (1), or
    /// once its session has run, before it ends (2).
    #[cfg(test)]
    panic_in_sessions: std::sync::atomic::AtomicU8,
}

/// Counts one served connection until dropped.
struct ConnectionSlot(Arc<Server>);

impl ConnectionSlot {
    /// Count one more connection; with the count before it.
    fn enter(server: &Arc<Server>) -> (Self, usize) {
        let before = server.connections.fetch_add(1, Ordering::AcqRel);
        (Self(server.clone()), before)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Server {
    pub fn new(config: ServerConfig) -> Arc<Self> {
        // Each LU learns the target ports it is served through.
        for t in &config.targets {
            for lun in t.scsi.luns() {
                if let Some(lu) = t.scsi.lu(lun) {
                    lu.add_target_port(t.port(), scsi::Transport::Iscsi);
                }
            }
        }
        Arc::new(Self {
            config,
            registry: Mutex::new(Registry::default()),
            next_tsih: AtomicU16::new(1),
            shutdown: watch::channel(false).0,
            nop_interval_ms: AtomicU64::new(millis(NOP_INTERVAL)),
            login_timeout_ms: AtomicU64::new(millis(LOGIN_TIMEOUT)),
            pdu_timeout_ms: AtomicU64::new(millis(PDU_TIMEOUT)),
            data_out_timeout_ms: AtomicU64::new(millis(DATA_OUT_TIMEOUT)),
            max_connections: AtomicUsize::new(MAX_CONNECTIONS),
            connections: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            #[cfg(test)]
            panic_in_sessions: std::sync::atomic::AtomicU8::new(0),
        })
    }

    /// Shorter limits for tests (see [`LOGIN_TIMEOUT`], [`PDU_TIMEOUT`], [`MAX_CONNECTIONS`]).
    #[cfg(test)]
    pub(crate) fn set_limits(&self, login: Duration, pdu: Duration, connections: usize) {
        self.login_timeout_ms
            .store(millis(login), Ordering::Relaxed);
        self.pdu_timeout_ms.store(millis(pdu), Ordering::Relaxed);
        self.max_connections.store(connections, Ordering::Relaxed);
    }

    fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn pdu_timeout(&self) -> Duration {
        Duration::from_millis(self.pdu_timeout_ms.load(Ordering::Relaxed))
    }

    /// Keep-alive: after `interval` without a PDU from the initiator a session sends a NOP-In
    /// ping (RFC 7143 11.19), and ends when the next `interval` passes without any PDU.
    /// Applies to sessions that start afterwards. Default 15 s.
    pub fn set_nop_interval(&self, interval: Duration) {
        self.nop_interval_ms
            .store(millis(interval), Ordering::Relaxed);
    }

    /// A write whose data the initiator was asked for (an R2T, or the unsolicited data its
    /// command announced) and has not sent within `timeout` ends its connection (RFC 7143
    /// 6.1.4.1 leaves the timeout to the target; at ErrorRecoveryLevel 0 the recovery is the
    /// connection's). Without it an initiator that answers pings but never sends the data
    /// would hold the write, its buffer and its place in the LU's order (an ORDERED write holds
    /// every later command back) until task management or the connection ended it. Applies to
    /// sessions that start afterwards. Default 30 s.
    pub fn set_data_out_timeout(&self, timeout: Duration) {
        self.data_out_timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }

    pub(crate) fn data_out_timeout(&self) -> Duration {
        Duration::from_millis(self.data_out_timeout_ms.load(Ordering::Relaxed))
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

    /// Wait until no connection is served any more. After [`Server::shutdown`] that is once every
    /// session has ended with its commands settled in the backend (a command still running
    /// there is waited for, however long it takes), and every connection still logging in has
    /// closed.
    pub async fn closed(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            // Registered before the count is read, so a connection ending in between wakes it.
            woken.as_mut().enable();
            if self.connections.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
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
            let limit = self.max_connections.load(Ordering::Relaxed);
            let (slot, before) = ConnectionSlot::enter(&self);
            if before >= limit {
                // Through the slot, whose drop wakes `closed` if this was the last one.
                drop(slot);
                tracing::warn!(%peer, limit, "iSCSI connection refused: too many connections");
                drop(stream);
                continue;
            }
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(stream, peer, slot).await {
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
    /// and target (session reinstatement, RFC 7143 6.3.5). `None` if a newer login of the same
    /// session took over while this one waited (only the newest may reinstate it, so that two
    /// sessions never share one I_T nexus), or if the server is shutting down.
    async fn register(
        &self,
        info: SessionInfo,
        target: Option<usize>,
    ) -> Option<(u64, watch::Receiver<bool>, watch::Sender<bool>)> {
        let key: SessionKey = (target, info.initiator.clone(), info.isid);
        let (id, old) = {
            let mut r = self.registry.lock().ok()?;
            r.next_id += 1;
            let id = r.next_id;
            // The claim and the end of the old session are one step: a login that claims
            // later supersedes this one, whether or not the old session is gone yet.
            r.claims.insert(key.clone(), id);
            let old: Vec<watch::Receiver<bool>> = r
                .sessions
                .values()
                .filter(|e| e.key() == key)
                .map(|e| {
                    e.kill.send_replace(true);
                    e.done.clone()
                })
                .collect();
            (id, old)
        };
        let mut claim = Claim {
            registry: &self.registry,
            key,
            id,
            registered: false,
        };
        // Not bounded: the old session's commands still running in the backend must finish
        // before this session may write (see `connection`); the initiator's own login timeout
        // ends the wait if it gives up first.
        for mut d in old {
            let mut waited = Duration::ZERO;
            while tokio::time::timeout(REINSTATE_WARN, d.wait_for(|x| *x))
                .await
                .is_err()
            {
                waited += REINSTATE_WARN;
                tracing::warn!(
                    initiator = %info.initiator,
                    seconds = waited.as_secs(),
                    "Session reinstatement waits for the old session's commands to finish"
                );
            }
        }
        let (kill_tx, kill_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let mut r = self.registry.lock().ok()?;
        // `shutdown` sets its flag before it ends the registered sessions under this lock, so
        // a login either registers before that (and is ended) or sees the flag.
        if r.claims.get(&claim.key) != Some(&id) || *self.shutdown.borrow() {
            return None;
        }
        r.sessions.insert(
            id,
            Entry {
                info,
                target,
                kill: kill_tx,
                done: done_rx,
            },
        );
        claim.registered = true;
        Some((id, kill_rx, done_tx))
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut r) = self.registry.lock() {
            if let Some(e) = r.sessions.remove(&id) {
                r.drop_claim(&e.key(), id);
            }
        }
    }

    /// Serve one connection, counted by `slot` until it has ended: for a session, until its
    /// ending ([`Ending::run`]) is over.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnectionSlot,
    ) -> Result<(), session::SessionError> {
        let local = stream.local_addr()?;
        stream.set_nodelay(true)?;
        // For the reader's busy poll; the descriptor lives as long as the read half does.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let (r, w) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 * 1024, r);
        let mut wr = BufWriter::with_capacity(256 * 1024, w);
        let framing = Framing {
            header_digest: false,
            data_digest: false,
            max_data: LOGIN_MAX_DATA,
        };
        let mut login = Login::new(&self.config, self.alloc_tsih());
        // The whole login phase, writes and the wait for a reinstated session included, has
        // one deadline.
        let deadline = tokio::time::Instant::now() + self.login_timeout();
        let timed_out = |_| session::SessionError::Protocol("Login timed out");
        let mut stop = self.shutdown.subscribe();
        let (est, id, kill, done, nexus) = loop {
            // A connection still logging in when the server shuts down just closes.
            let pdu = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(()),
                p = tokio::time::timeout_at(deadline, pdu::read_pdu(&mut rd, framing)) => p,
            };
            let (mut bhs, mut data, outcome) = match pdu.map_err(timed_out)? {
                Ok(pdu) => login.step(&pdu),
                // A Login Request whose data segment is beyond the login phase's limit
                // (8192 bytes, RFC 7143 13.12) breaks the login's rules: answered as an
                // initiator error (its data unread; the connection then closes).
                Err(pdu::PduError::DataTooLong { bhs, .. })
                    if bhs.opcode() == pdu::op::LOGIN_REQ =>
                {
                    login.fail_request(&bhs, login::status::INITIATOR_ERROR)
                }
                Err(e) => return Err(e.into()),
            };
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
                                    target: t.port(),
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
                    // Cancelling the wait for an old session registers nothing.
                    let reg = tokio::time::timeout_at(deadline, self.register(info, target))
                        .await
                        .map_err(timed_out)?;
                    if reg.is_none() {
                        // Turned away: a newer login took the session over, or the server is
                        // shutting down. Either way the initiator may try again later.
                        (bhs, data) = login.refuse(login::status::SERVICE_UNAVAILABLE);
                    }
                    reg.map(|r| (r, nexus))
                }
                _ => None,
            };
            let written = tokio::time::timeout_at(deadline, async {
                pdu::write_pdu(&mut wr, &mut bhs, &data, framing).await?;
                wr.flush().await
            })
            .await;
            let written = match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(timed_out(e)),
            };
            if let Err(e) = written {
                if let Some(((id, _, _), _)) = &reg {
                    self.unregister(*id);
                }
                return Err(e);
            }
            match (outcome, reg) {
                (Outcome::Done(est), Some(((id, kill, done), nexus))) => {
                    break (est, id, kill, done, nexus)
                }
                (Outcome::Fail(status), _) => {
                    tracing::info!(%peer, status = format!("{status:#06x}"), "iSCSI login failed");
                    return Ok(());
                }
                (Outcome::Done(est), None) => {
                    tracing::info!(%peer, initiator = %est.initiator_name, "iSCSI login turned away: a newer login took the session over, or the server is shutting down");
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
        let ending = SessionEnd(Some(Ending {
            server: self.clone(),
            id,
            done,
            nexus: target.zip(nexus.clone()),
            _slot: slot,
        }));
        #[cfg(test)]
        if self.panic_in_sessions.load(Ordering::Relaxed) == 1 {
            panic!("a bug in the session");
        }
        let result = session::run(self.clone(), *est, nexus, (rd, Some(fd)), wr, kill, local).await;
        #[cfg(test)]
        if self.panic_in_sessions.load(Ordering::Relaxed) == 2 {
            panic!("a bug after the session");
        }
        ending.finish().await;
        result
    }
}

/// What ends a registered session once its connection is over.
struct Ending {
    server: Arc<Server>,
    id: u64,
    done: watch::Sender<bool>,
    nexus: Option<(Arc<scsi::Target>, Arc<scsi::ItNexus>)>,
    /// The connection is counted until the ending is over, so that [`Server::closed`] does not
    /// return while the session's commands may still be running in the backend.
    _slot: ConnectionSlot,
}

impl Ending {
    /// End the nexus (its commands aborted or finished in the backend, its SPC-2 reservation
    /// released), leave the registry, then say so: a login that reinstates this session waits
    /// for `done` (it finds the session in the registry until then), so that none of this
    /// session's commands still running in the backend lands after the next session's.
    async fn run(self) {
        if let Some((t, n)) = &self.nexus {
            t.end_nexus(n).await;
        }
        self.leave();
    }

    /// Leave the registry and say the session has ended.
    fn leave(self) {
        self.server.unregister(self.id);
        self.done.send_replace(true);
    }
}

/// Ends a session however its connection's task ends: [`SessionEnd::finish`] when it returns;
/// when it unwinds (a bug) or is dropped, the ending runs on a task of its own, so that a
/// session never stays registered with its nexus alive and a reinstating login never goes
/// ahead of the old session's commands.
struct SessionEnd(Option<Ending>);

impl SessionEnd {
    async fn finish(mut self) {
        if let Some(e) = self.0.take() {
            e.run().await;
        }
    }
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let Some(e) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(e.run());
            }
            // No runtime (it is shutting down): nothing can wait for the backend any more.
            Err(_) => e.leave(),
        }
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

    /// The target every [`session`] input logs in to: LUN 0 on a 64-block memory disk,
    /// served on loopback by a runtime of its own for the life of the process.
    fn session_server() -> Option<&'static (tokio::runtime::Runtime, SocketAddr)> {
        static SERVER: std::sync::OnceLock<Option<(tokio::runtime::Runtime, SocketAddr)>> =
            std::sync::OnceLock::new();
        SERVER
            .get_or_init(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .ok()?;
                let mut t = scsi::Target::new();
                t.add_lu(0, scsi::fuzzing::memory_lu(64, 512, "iscsi-fuzz")?);
                let server = Server::new(ServerConfig {
                    targets: vec![TargetConfig {
                        name: SESSION_TARGET.into(),
                        alias: None,
                        scsi: Arc::new(t),
                        allowed_initiators: None,
                        auth: Auth::default(),
                        tpgt: 1,
                    }],
                    discovery_auth: Auth::default(),
                    portals: Vec::new(),
                });
                let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).ok()?;
                let addr = listener.local_addr().ok()?;
                rt.spawn(server.serve(listener));
                Some((rt, addr))
            })
            .as_ref()
    }

    const SESSION_TARGET: &str = "iqn.2026-01.io.sharedisk:fuzz";

    /// Log in to a normal session (answering whatever the target offers with its own value),
    /// then send `data` as the rest of the connection's bytes: PDUs of the full feature phase
    /// (SCSI commands, Data-Out, task management, NOP-Out, text, logout, or garbage), and
    /// read what comes back until the target closes the connection. A panic anywhere in the
    /// target (libFuzzer turns one in any thread into a crash) is a failure; so is a
    /// connection the target never closes after the initiator's end of it closed (the
    /// fuzzer's timeout). Returns how many bytes the target sent after the login (none when
    /// the login failed).
    pub fn session(data: &[u8]) -> usize {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some((_, addr)) = session_server() else {
            return 0;
        };
        let addr = *addr;
        // A client runtime of its own per input: the server's keeps serving.
        let Ok(client) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return 0;
        };
        client.block_on(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return 0;
            };
            let mut keys = format!(
                "InitiatorName=iqn.2026-01.io.sharedisk:fuzzer\0SessionType=Normal\0\
                 TargetName={SESSION_TARGET}\0"
            );
            for round in 0..4u32 {
                let mut bhs = [0u8; 48];
                bhs[0] = 0x43; // I=1, Login Request (RFC 7143 11.12)
                bhs[1] = 0x87; // T=1, CSG=1 (operational), NSG=3 (full feature)
                bhs[5..8].copy_from_slice(&(keys.len() as u32).to_be_bytes()[1..]);
                bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]); // ISID
                bhs[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
                bhs[28..32].copy_from_slice(&round.to_be_bytes()); // ExpStatSN
                let mut pdu = bhs.to_vec();
                pdu.extend_from_slice(keys.as_bytes());
                pdu.resize(pdu.len().div_ceil(4) * 4, 0);
                if s.write_all(&pdu).await.is_err() {
                    return 0;
                }
                let mut rh = [0u8; 48];
                if s.read_exact(&mut rh).await.is_err() {
                    return 0;
                }
                let len = usize::from(rh[5]) << 16 | usize::from(rh[6]) << 8 | usize::from(rh[7]);
                let mut text = vec![0u8; len.div_ceil(4) * 4];
                if s.read_exact(&mut text).await.is_err() || rh[36] != 0 {
                    return 0;
                }
                if rh[1] & 0x80 != 0 && rh[1] & 0x03 == 3 {
                    break; // T=1 NSG=3: full feature phase
                }
                text.truncate(len);
                // Accept every value the target offered.
                keys = String::from_utf8_lossy(&text).into_owned();
            }
            let _ = s.write_all(data).await;
            let _ = s.shutdown().await;
            let mut sink = vec![0u8; 64 * 1024];
            let mut got = 0;
            while let Ok(n @ 1..) = s.read(&mut sink).await {
                got += n;
            }
            got
        })
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
    use std::net::SocketAddr;
    use std::time::Duration;

    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{Auth, ChapSecret, Server, ServerConfig};

    #[test]
    fn a_chap_secret_never_shows_in_debug_output() {
        let auth = Auth {
            chap: Some(ChapSecret {
                user: "alice".into(),
                secret: "very-secret-1".into(),
            }),
            mutual: None,
        };
        let shown = format!("{auth:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(!shown.contains("very-secret-1"), "{shown}");
    }

    /// A server for discovery sessions only, with the given limits.
    async fn start(login: Duration, pdu: Duration, connections: usize) -> SocketAddr {
        let server = Server::new(ServerConfig {
            targets: Vec::new(),
            discovery_auth: Auth::default(),
            portals: Vec::new(),
        });
        server.set_limits(login, pdu, connections);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(server.serve(listener));
        addr
    }

    /// A discovery Login Request (RFC 7143 11.12) with the given flags.
    fn login_request(flags: u8) -> Vec<u8> {
        login_request_with(
            flags,
            "InitiatorName=iqn.2026-01.test:lib\0SessionType=Discovery\0",
        )
    }

    /// A Login Request (RFC 7143 11.12) with the given flags and text.
    fn login_request_with(flags: u8, text: &str) -> Vec<u8> {
        let mut b = vec![0u8; 48];
        b[0] = 0x43; // I=1, Login Request
        b[1] = flags; // T C . . CSG NSG
        b[7] = text.len() as u8; // DataSegmentLength
        b[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 9]); // ISID
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        b.extend_from_slice(text.as_bytes());
        b.resize(b.len().div_ceil(4) * 4, 0); // padding
        b
    }

    /// Read one Login Response's BHS and data segment; returns the BHS.
    async fn login_response(s: &mut TcpStream) -> [u8; 48] {
        let mut bhs = [0u8; 48];
        s.read_exact(&mut bhs).await.expect("Login Response");
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        s.read_exact(&mut data).await.expect("Login Response data");
        bhs
    }

    /// Whether the target closes the connection within `within`.
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// `closed` is woken by whichever slot is the last to go, whatever the order: a
    /// connection turned away at the limit is counted and uncounted through a slot too.
    #[tokio::test]
    async fn closed_wakes_when_the_last_of_overlapping_slots_goes() {
        let server = Server::new(ServerConfig {
            targets: Vec::new(),
            discovery_auth: Auth::default(),
            portals: Vec::new(),
        });
        let (served, _) = super::ConnectionSlot::enter(&server);
        let (turned_away, before) = super::ConnectionSlot::enter(&server);
        assert_eq!(before, 1);
        let closed = tokio::spawn({
            let server = server.clone();
            async move { server.closed().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closed.is_finished());
        drop(served);
        drop(turned_away);
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("closed returns once no slot is left")
            .expect("closed task");
    }

    /// A server with one target, LUN 0 `lu`, whose connections' tasks panic as the test hook
    /// `when` says, and a connection logged in to it.
    async fn panicking_sessions(
        lu: std::sync::Arc<scsi::LogicalUnit>,
        when: u8,
    ) -> (std::sync::Arc<Server>, TcpStream) {
        let name = "iqn.2026-01.test:panic";
        let mut t = scsi::Target::new();
        t.add_lu(0, lu);
        let server = Server::new(ServerConfig {
            targets: vec![super::TargetConfig {
                name: name.into(),
                alias: None,
                scsi: std::sync::Arc::new(t),
                allowed_initiators: None,
                auth: Auth::default(),
                tpgt: 1,
            }],
            discovery_auth: Auth::default(),
            portals: Vec::new(),
        });
        server
            .panic_in_sessions
            .store(when, std::sync::atomic::Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(server.clone().serve(listener));

        // With the keys the target would otherwise offer, so that one exchange logs in.
        let text = format!(
            "InitiatorName=iqn.2026-01.test:lib\0SessionType=Normal\0TargetName={name}\0\
             InitialR2T=No\0ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=65536\0"
        );
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&login_request_with(0x87, &text)) // T=1, CSG=1, NSG=3
            .await
            .expect("send");
        let r = login_response(&mut s).await;
        assert_eq!(&r[36..38], &[0, 0], "logged in");
        assert_eq!(r[1], 0x87, "T=1, CSG=1, NSG=3: full feature phase");
        (server, s)
    }

    /// A session whose connection's task panics (a bug) still ends: it leaves the registry,
    /// its nexus ends, and the server counts no connection any more.
    #[tokio::test]
    async fn a_session_whose_task_panics_still_ends() {
        let lu = scsi::fuzzing::memory_lu(64, 512, "panic").expect("memory LU");
        let (server, mut s) = panicking_sessions(lu, 1).await;
        assert!(closed(&mut s, Duration::from_secs(10)).await);

        // The connection stays counted until the session has ended: once `closed` returns,
        // the session has left the registry (and its nexus has ended before that).
        tokio::time::timeout(Duration::from_secs(10), server.closed())
            .await
            .expect("no connection is counted");
        assert!(
            server.sessions().is_empty(),
            "the session left the registry"
        );
    }

    /// A memory driver whose writes wait for a permit.
    struct GatedDriver {
        inner: block::driver::mem::MemDriver,
        gate: tokio::sync::Semaphore,
        entered: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl block::Driver for GatedDriver {
        fn info(&self) -> block::DriverInfo {
            self.inner.info()
        }
        async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, block::BlockError> {
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

    /// When a session's task panics with a command still in the backend, the connection stays
    /// counted until that command has settled: `Server::closed` (after which the daemon
    /// flushes) does not return before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_that_panics_is_counted_until_its_commands_settle() {
        let driver = std::sync::Arc::new(GatedDriver {
            inner: block::driver::mem::MemDriver::new(1 << 20),
            gate: tokio::sync::Semaphore::new(0),
            entered: tokio::sync::Notify::new(),
        });
        let backend = block::Backend::new(driver.clone(), 512).expect("512-byte blocks");
        let lu = std::sync::Arc::new(scsi::LogicalUnit::new(
            backend,
            scsi::LuConfig {
                vendor: "SHAREDSK".into(),
                product: "gated".into(),
                revision: "0001".into(),
                serial: "gated".into(),
                id: 1,
            },
        ));
        let (server, mut s) = panicking_sessions(lu, 2).await;
        // TEST UNIT READY (CmdSN 1) takes the new nexus's unit attention (29h/00h), which would
        // otherwise fail the write before it reaches the driver.
        let mut t = [0u8; 48];
        t[0] = 0x01; // SCSI Command
        t[1] = 0x81; // F=1, ATTR simple
        t[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
        t[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        s.write_all(&t).await.expect("send");
        let mut r = [0u8; 48];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut r))
            .await
            .expect("SCSI Response in time")
            .expect("SCSI Response");
        let sense = u32::from_be_bytes([0, r[5], r[6], r[7]]) as usize;
        let mut rest = vec![0u8; sense.div_ceil(4) * 4];
        s.read_exact(&mut rest).await.expect("sense data");
        // SCSI Command (RFC 7143 11.3): F=1, W=1, ATTR simple; EDTL 512; WRITE(10) of one block
        // at LBA 0, its data as immediate data.
        let mut b = vec![0u8; 48];
        b[0] = 0x01;
        b[1] = 0xa1;
        b[5..8].copy_from_slice(&[0x00, 0x02, 0x00]); // DataSegmentLength 512
        b[16..20].copy_from_slice(&2u32.to_be_bytes()); // ITT
        b[20..24].copy_from_slice(&512u32.to_be_bytes()); // Expected Data Transfer Length
        b[24..28].copy_from_slice(&2u32.to_be_bytes()); // CmdSN
        b[32..42].copy_from_slice(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]); // WRITE(10), 1 block
        b.extend_from_slice(&[0xAA; 512]);
        let entered = driver.entered.notified();
        s.write_all(&b).await.expect("send");
        tokio::time::timeout(Duration::from_secs(10), entered)
            .await
            .expect("the write reaches the driver");
        // The connection goes; the session's task then panics with the write in the backend.
        drop(s);
        let closed = tokio::spawn({
            let server = server.clone();
            async move { server.closed().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !closed.is_finished(),
            "closed returned while the session's write was still in the backend"
        );
        driver.gate.add_permits(1);
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("closed returns once the write has settled")
            .expect("closed task");
        assert!(server.sessions().is_empty());
    }

    #[tokio::test]
    async fn a_pdu_stalled_after_its_first_bytes_drops_the_connection() {
        let addr = start(Duration::from_secs(30), Duration::from_millis(200), 16).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&login_request(0x87)).await.expect("send"); // T=1 CSG=1 NSG=3
        let r = login_response(&mut s).await;
        assert_eq!(&r[36..38], &[0, 0], "logged in");
        // The first 10 bytes of a NOP-Out, and nothing more.
        s.write_all(&[0x40, 0x80, 0, 0, 0, 0, 0, 0, 0, 0])
            .await
            .expect("send");
        assert!(closed(&mut s, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_login_that_does_not_finish_in_time_is_dropped() {
        let addr = start(Duration::from_millis(300), Duration::from_secs(30), 16).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // T=0 CSG=1: the login goes on, PDU by PDU, but never ends.
        s.write_all(&login_request(0x04)).await.expect("send");
        let r = login_response(&mut s).await;
        assert_eq!(r[1] & 0x80, 0, "no transit");
        assert!(closed(&mut s, Duration::from_secs(5)).await);
        // A connection that sends part of a Login Request and stalls.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&login_request(0x87)[..20]).await.expect("send");
        assert!(closed(&mut s, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let addr = start(Duration::from_secs(30), Duration::from_secs(30), 2).await;
        let a = TcpStream::connect(addr).await.expect("connect");
        let _b = TcpStream::connect(addr).await.expect("connect");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        assert!(
            closed(&mut c, Duration::from_secs(5)).await,
            "third refused"
        );
        // Once one ends, a new connection is served.
        drop(a);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut d = TcpStream::connect(addr).await.expect("connect");
        d.write_all(&login_request(0x87)).await.expect("send");
        let r = login_response(&mut d).await;
        assert_eq!(&r[36..38], &[0, 0], "logged in");
    }

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

    /// The session entry point logs in and reaches the full feature phase: a NOP-Out that
    /// asks for an answer (RFC 7143 11.18) gets a 48-byte NOP-In, a Logout Request (11.14) a
    /// 48-byte Logout Response, and garbage after the login ends the connection.
    #[test]
    fn fuzz_session_entry_point_reaches_the_full_feature_phase() {
        let mut nop = [0u8; 48];
        nop[0] = 0x40; // I=1, NOP-Out
        nop[1] = 0x80; // F=1
        nop[16..20].copy_from_slice(&7u32.to_be_bytes()); // ITT
        nop[20..24].copy_from_slice(&[0xFF; 4]); // TTT 0xFFFFFFFF: not an answer
        nop[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        assert_eq!(super::fuzzing::session(&nop), 48);
        let mut logout = [0u8; 48];
        logout[0] = 0x46; // I=1, Logout Request
        logout[1] = 0x80; // F=1, reason 0: close the session
        logout[16..20].copy_from_slice(&8u32.to_be_bytes()); // ITT
        logout[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        assert_eq!(super::fuzzing::session(&logout), 48);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7143);
        for _ in 0..200 {
            let n = rng.gen_range(0..400);
            let random: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            super::fuzzing::session(&random);
        }
    }
}
