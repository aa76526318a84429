//! What the daemon serves: the config file schema, the quick-start command line, and the
//! validated [`Plan`] both turn into.
//!
//! Validation happens before anything is opened or bound, so a bad deployment fails with one
//! clear message and leaves nothing behind. The rules:
//! - target and initiator names are iSCSI names (RFC 7143 4.2.7.1: `iqn.`, `eui.`, `naa.`);
//! - target names are unique, LUNs and portals are unique within a target, images are unique
//!   overall;
//! - a logical block is 512 or 4096 bytes, and a new image's size is a whole number of blocks;
//! - an image that does not exist needs a size to be created with;
//! - a target with a portal outside the loopback network must have an initiator ACL or CHAP,
//!   so a fresh deployment never exposes a disk to anyone who can reach the port;
//! - CHAP secrets are at least 12 bytes (RFC 7143 12.1.3 asks for 96 bits), and mutual CHAP
//!   needs one-way CHAP and a different secret; no secret that authenticates initiators (a
//!   target's or discovery's `chap`) is any target's `mutual` secret (RFC 7143 9.2.1);
//! - vhost-user sockets (`[[vhost]]`) are unique, each has an initiator name (1 to 223
//!   printable ASCII characters, no spaces), 1 to 62 request queues, an avail-ring watch
//!   (`watch_us`) of 0 to 10000 µs and at least one LU, with (target, LUN) unique per socket.
//!   A socket's LU names an image: when an iSCSI target serves that image the socket serves
//!   the same logical unit (and the `[[vhost.lu]]` entry carries no LU settings of its own);
//!   otherwise the entry's settings make the LU, and every socket that names the image must
//!   give the same settings;
//! - with vhost-user sockets configured, iSCSI TPGTs stay below 0x8000: an iSCSI target's port
//!   is its TPGT, and the sockets' relative target port identifiers are in 0x8000..=0xFFFF;
//! - a socket's relative target port identifier is its `relative_port_id` (quick start:
//!   `--vhost-relative-port-id`), which must be in 0x8000..=0xFFFF, or else is derived from its
//!   resolved path ([`canonical_socket_path`], [`crate::identity::vhost_port_id`]). Either way
//!   it does not depend on the order of the sockets, so registrations an APTPL state file keeps
//!   for a socket's I_T nexus still match it after the sockets are reordered, added or removed
//!   (SPC-5 5.14.5); no two sockets have the same one.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::size::parse_size;

/// The default portal: loopback, the IANA iSCSI port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3260";
/// The prefix of target names the daemon makes up for the quick start.
pub const DEFAULT_IQN_PREFIX: &str = "iqn.2026-01.io.sharedisk:";

/// The config file (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Authentication for discovery (SendTargets) sessions.
    #[serde(default)]
    pub discovery_auth: AuthConfig,
    /// The targets, at least one.
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// The operator's control socket (`sharedisk pr …`); relative to the config file.
    pub control: Option<PathBuf>,
    /// vhost-user-scsi sockets.
    #[serde(default, rename = "vhost")]
    pub vhost: Vec<VhostConfig>,
}

/// One `[[vhost]]`: a vhost-user-scsi socket, its own I_T nexus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostConfig {
    /// The socket to create (relative to the config file).
    pub socket: PathBuf,
    /// The initiator name of the socket's I_T nexus; `vhost:<absolute socket path>` when absent.
    pub initiator: Option<String>,
    /// Request queues offered (QEMU's `num_queues` may be at most this); default 8.
    pub num_queues: Option<u16>,
    /// Threads serving the request queues, 1 to `num_queues`; default half the host's
    /// cores, at most `num_queues` (`vhost_scsi::default_threads`).
    pub threads: Option<u16>,
    /// The longest a request-queue thread watches its avail rings after a drain, in µs, 0 to
    /// 10000; 0: never (a kick for every request that finds the thread asleep). Default 600
    /// (`vhost_scsi::DEFAULT_WATCH_MAX`).
    pub watch_us: Option<u64>,
    /// The socket's relative target port identifier, 0x8000 to 0xFFFF; derived from the
    /// socket's path when absent. Read wider than a `u16`, so that a value out of range gets
    /// the config's own message.
    pub relative_port_id: Option<i64>,
    #[serde(default, rename = "lu")]
    pub lus: Vec<VhostLuConfig>,
}

/// One `[[vhost.lu]]`: an image at a virtio-scsi target and LUN.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostLuConfig {
    /// The virtio-scsi target id, default 0.
    #[serde(default)]
    pub target: u8,
    pub lun: u16,
    pub file: PathBuf,
    /// LU settings, for an image no iSCSI target serves (see [`LuConfig`]).
    pub size: Option<SizeValue>,
    pub block_size: Option<u32>,
    pub physical_block_size: Option<u32>,
    pub serial: Option<String>,
    pub id: Option<IdValue>,
    pub direct: Option<bool>,
    pub reservation_state: Option<PathBuf>,
}

/// One `[[target]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    pub alias: Option<String>,
    /// Addresses to listen on; `["127.0.0.1:3260"]` when absent.
    pub portals: Option<Vec<String>>,
    /// Initiator names allowed to log in; any initiator when absent.
    pub allowed_initiators: Option<Vec<String>>,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Target portal group tag; 1 when absent.
    pub tpgt: Option<u16>,
    #[serde(default, rename = "lu")]
    pub lus: Vec<LuConfig>,
}

/// CHAP settings of a target or of discovery.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The initiator must authenticate as this user with this secret.
    pub chap: Option<ChapConfig>,
    /// The target authenticates itself to the initiator with these (mutual CHAP).
    pub mutual: Option<ChapConfig>,
}

/// One CHAP identity. Its `Debug` shows the name only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for ChapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// One `[[target.lu]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuConfig {
    pub lun: u64,
    pub file: PathBuf,
    /// Size of the image to create when the file does not exist (`"10G"` or a number of bytes).
    pub size: Option<SizeValue>,
    /// 512 (default) or 4096.
    pub block_size: Option<u32>,
    /// Physical block size advertised to initiators: a power-of-two multiple of the block
    /// size; default 4096 (or the block size when larger).
    pub physical_block_size: Option<u32>,
    /// Unit serial number (VPD 0x80); derived when absent.
    pub serial: Option<String>,
    /// The 64-bit value behind the NAA identifier (VPD 0x83); derived when absent.
    pub id: Option<IdValue>,
    /// Direct I/O (`O_DIRECT`, past the host's page cache); default false.
    pub direct: Option<bool>,
    /// The file that keeps the LU's persistent reservation state (APTPL), relative to the
    /// config file; default `<image>.pr` beside a regular file. A block device has no default:
    /// without one it refuses APTPL.
    pub reservation_state: Option<PathBuf>,
}

/// A size: bytes as a number, or a string with a suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// An identifier: a number, or a string in hex (`"0x..."`) or decimal.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IdValue {
    Number(u64),
    Text(String),
}

/// What to serve, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub discovery_auth: iscsi::Auth,
    pub targets: Vec<TargetPlan>,
    /// The control socket, when one was asked for (otherwise the default, best effort).
    pub control: Option<PathBuf>,
    /// vhost-user-scsi sockets.
    pub vhost: Vec<VhostPlan>,
}

/// Default request queues of a vhost-user socket.
pub const DEFAULT_VHOST_QUEUES: u16 = 8;

/// The initiator name a vhost-user socket gets when none is configured: `vhost:` and the
/// socket's resolved path ([`canonical_socket_path`]), so that it stays the same however the
/// path is spelled from one start to the next (registrations a state file keeps are matched
/// against it), made a valid name ([`crate::identity::vhost_initiator`]). The path as given
/// when its folder does not exist (binding then fails).
pub fn default_vhost_initiator(socket: &Path) -> String {
    let resolved = canonical_socket_path(socket).unwrap_or_else(|_| socket.to_path_buf());
    crate::identity::vhost_initiator(&resolved)
}

/// One vhost-user socket, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostPlan {
    pub socket: PathBuf,
    pub initiator: String,
    pub num_queues: u16,
    /// Request-queue threads; `None`: the default for `num_queues`.
    pub threads: Option<u16>,
    /// The avail-ring watch's longest window (`vhost_scsi::SocketConfig::watch_max`).
    pub watch_max: Duration,
    /// The configured relative target port identifier; `None`: derived from the socket's path
    /// (see [`VhostPlan::port_id`]).
    pub relative_port_id: Option<u16>,
    pub lus: Vec<VhostLuPlan>,
}

/// One LU behind a vhost-user socket: where the guest sees it, and the LU (its `lun` field is
/// unused; the image identifies it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostLuPlan {
    pub target: u8,
    pub lun: u16,
    pub lu: LuPlan,
    /// Whether the entry gave LU settings of its own.
    pub has_settings: bool,
}

/// One target, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPlan {
    pub name: String,
    pub alias: Option<String>,
    pub portals: Vec<SocketAddr>,
    pub allowed_initiators: Option<Vec<String>>,
    pub auth: iscsi::Auth,
    pub tpgt: u16,
    pub lus: Vec<LuPlan>,
}

/// One logical unit, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuPlan {
    pub lun: u64,
    pub file: PathBuf,
    /// Size to create the image with when it does not exist.
    pub size: Option<u64>,
    pub block_size: u32,
    pub physical_block_size: Option<u32>,
    pub serial: Option<String>,
    pub id: Option<u64>,
    /// Open the image with direct I/O.
    pub direct: bool,
    /// The reservation state file; `None`: the driver's default (see
    /// `block::driver::file::FileOptions::reservation_state`).
    pub reservation_state: Option<PathBuf>,
}

impl FileConfig {
    /// Parse a config file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Read and parse a config file. A file holding CHAP secrets that users other than its
    /// owner may read is loaded, with a warning.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Cannot read config file {}", path.display()))?;
        let config =
            Self::parse(&text).with_context(|| format!("Bad config file {}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            if config.has_secrets() && secrets_exposed(meta.permissions().mode()) {
                tracing::warn!(
                    config = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "The config file holds CHAP secrets and users other than its owner may read \
                     it; make it mode 0600"
                );
            }
        }
        Ok(config)
    }

    /// Whether any CHAP secret is configured.
    fn has_secrets(&self) -> bool {
        let set = |a: &AuthConfig| a.chap.is_some() || a.mutual.is_some();
        set(&self.discovery_auth) || self.targets.iter().any(|t| set(&t.auth))
    }

    /// Turn into a plan; relative image paths are taken from `base` (the config file's folder).
    pub fn into_plan(self, base: &Path) -> anyhow::Result<Plan> {
        let mut targets = Vec::new();
        for t in self.targets {
            let what = format!("Target {}", t.name);
            let portals = match t.portals {
                None => vec![DEFAULT_LISTEN.parse().context("Default portal")?],
                Some(list) => list
                    .iter()
                    .map(|p| {
                        p.parse::<SocketAddr>()
                            .with_context(|| format!("{what}: portal {p:?} is not an ADDRESS:PORT"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let mut lus = Vec::new();
            for lu in t.lus {
                let lu_what = format!("{what}, LUN {}", lu.lun);
                let size = size_value(lu.size, &lu_what)?;
                let id = id_value(lu.id, &lu_what)?;
                lus.push(LuPlan {
                    lun: lu.lun,
                    file: base.join(&lu.file),
                    size,
                    block_size: lu.block_size.unwrap_or(512),
                    physical_block_size: lu.physical_block_size,
                    serial: lu.serial,
                    id,
                    direct: lu.direct.unwrap_or(false),
                    reservation_state: lu.reservation_state.map(|p| base.join(p)),
                });
            }
            targets.push(TargetPlan {
                name: t.name,
                alias: t.alias,
                portals,
                allowed_initiators: t.allowed_initiators,
                auth: t.auth.into_auth(),
                tpgt: t.tpgt.unwrap_or(1),
                lus,
            });
        }
        let mut vhost = Vec::new();
        for v in self.vhost {
            let socket = base.join(&v.socket);
            let what = format!("vhost-user socket {}", socket.display());
            let mut lus = Vec::new();
            for lu in v.lus {
                let lu_what = format!("{what}, target {} LUN {}", lu.target, lu.lun);
                let has_settings = lu.size.is_some()
                    || lu.block_size.is_some()
                    || lu.physical_block_size.is_some()
                    || lu.serial.is_some()
                    || lu.id.is_some()
                    || lu.direct.is_some()
                    || lu.reservation_state.is_some();
                lus.push(VhostLuPlan {
                    target: lu.target,
                    lun: lu.lun,
                    has_settings,
                    lu: LuPlan {
                        lun: u64::from(lu.lun),
                        file: base.join(&lu.file),
                        size: size_value(lu.size, &lu_what)?,
                        block_size: lu.block_size.unwrap_or(512),
                        physical_block_size: lu.physical_block_size,
                        serial: lu.serial,
                        id: id_value(lu.id, &lu_what)?,
                        direct: lu.direct.unwrap_or(false),
                        reservation_state: lu.reservation_state.map(|p| base.join(p)),
                    },
                });
            }
            let relative_port_id = v
                .relative_port_id
                .map(check_port_id)
                .transpose()
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            vhost.push(VhostPlan {
                relative_port_id,
                initiator: v
                    .initiator
                    .unwrap_or_else(|| default_vhost_initiator(&socket)),
                socket,
                num_queues: v.num_queues.unwrap_or(DEFAULT_VHOST_QUEUES),
                threads: v.threads,
                watch_max: v
                    .watch_us
                    .map_or(vhost_scsi::DEFAULT_WATCH_MAX, Duration::from_micros),
                lus,
            });
        }
        let plan = Plan {
            discovery_auth: self.discovery_auth.into_auth(),
            targets,
            control: self.control.map(|c| base.join(c)),
            vhost,
        };
        plan.validate()?;
        Ok(plan)
    }
}

impl AuthConfig {
    fn into_auth(self) -> iscsi::Auth {
        let secret = |c: ChapConfig| iscsi::ChapSecret {
            user: c.user,
            secret: c.secret,
        };
        iscsi::Auth {
            chap: self.chap.map(secret),
            mutual: self.mutual.map(secret),
        }
    }
}

fn size_value(v: Option<SizeValue>, what: &str) -> anyhow::Result<Option<u64>> {
    Ok(match v {
        None => None,
        Some(SizeValue::Bytes(n)) => Some(n),
        Some(SizeValue::Text(s)) => Some(
            parse_size(&s)
                .map_err(anyhow::Error::msg)
                .with_context(|| what.to_string())?,
        ),
    })
}

fn id_value(v: Option<IdValue>, what: &str) -> anyhow::Result<Option<u64>> {
    Ok(match v {
        None => None,
        Some(IdValue::Number(n)) => Some(n),
        Some(IdValue::Text(s)) => Some(parse_id(&s).with_context(|| what.to_string())?),
    })
}

fn parse_id(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.with_context(|| format!("id {s:?} is not a 64-bit number (decimal or 0x hex)"))
}

/// Check an iSCSI name (RFC 7143 4.2.7.1, RFC 3720 3.2.6.3): `iqn.YYYY-MM.reversed.domain[:x]`,
/// `eui.` + 16 hex digits, or `naa.` + 16 or 32 hex digits; at most 223 bytes, made of lower-case
/// letters, digits, `-`, `.` and `:` (names are compared in lower case, RFC 3722 2).
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{name:?} is not a valid iSCSI name: {why}"));
    if name.is_empty() || name.len() > 223 {
        return bad("it must be 1 to 223 bytes long");
    }
    // iSCSI names are compared in their normalised, lower-case form (RFC 3722 2, RFC 7143
    // 4.2.7.1), which is what initiators send: an upper-case name here would never match.
    let hex_digit = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if let Some(hex) = name.strip_prefix("eui.") {
        if hex.len() != 16 || !hex.bytes().all(hex_digit) {
            return bad("eui. must be followed by 16 lower-case hex digits");
        }
        return Ok(());
    }
    if let Some(hex) = name.strip_prefix("naa.") {
        if !(hex.len() == 16 || hex.len() == 32) || !hex.bytes().all(hex_digit) {
            return bad("naa. must be followed by 16 or 32 lower-case hex digits");
        }
        return Ok(());
    }
    let Some(rest) = name.strip_prefix("iqn.") else {
        return bad("it must start with iqn., eui. or naa.");
    };
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':'))
    {
        return bad("only lower-case letters, digits, '-', '.' and ':' are allowed");
    }
    let date = rest.get(..7).unwrap_or("");
    let db = date.as_bytes();
    let date_ok = db.len() == 7
        && db[..4].iter().all(u8::is_ascii_digit)
        && db[4] == b'-'
        && db[5..].iter().all(u8::is_ascii_digit)
        && matches!(
            &date[5..],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        );
    if !date_ok {
        return bad("iqn. must be followed by a date YYYY-MM");
    }
    let authority = rest[7..].strip_prefix('.').unwrap_or("");
    let domain = authority.split(':').next().unwrap_or("");
    if domain.is_empty() || domain.split('.').any(str::is_empty) {
        return bad("iqn.YYYY-MM. must be followed by a reversed domain name");
    }
    Ok(())
}

fn check_chap(what: &str, c: &iscsi::ChapSecret) -> anyhow::Result<()> {
    if c.user.is_empty() {
        bail!("{what}: the CHAP user name is empty");
    }
    if c.secret.len() < 12 {
        bail!(
            "{what}: the CHAP secret of {:?} is shorter than 12 bytes",
            c.user
        );
    }
    if c.secret.len() > 255 {
        bail!(
            "{what}: the CHAP secret of {:?} is longer than 255 bytes",
            c.user
        );
    }
    Ok(())
}

fn check_auth(what: &str, auth: &iscsi::Auth) -> anyhow::Result<()> {
    if let Some(c) = &auth.chap {
        check_chap(what, c)?;
    }
    if let Some(m) = &auth.mutual {
        let Some(c) = &auth.chap else {
            bail!("{what}: mutual CHAP needs one-way CHAP too (set auth.chap)");
        };
        check_chap(what, m)?;
        if m.secret == c.secret {
            bail!("{what}: the mutual CHAP secret must differ from the initiator's secret");
        }
    }
    Ok(())
}

/// Whether a file of `mode` may be read by users other than its owner (its group or others).
fn secrets_exposed(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// The path an image will have once it exists: canonical when it does, its canonical folder
/// plus its name when it does not.
pub fn canonical_image_path(path: &Path) -> std::io::Result<PathBuf> {
    if path.exists() {
        return path.canonicalize();
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("The path has no file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize()?,
        _ => std::env::current_dir()?,
    };
    Ok(parent.join(name))
}

impl TargetPlan {
    /// Whether every portal is on the loopback network.
    pub fn loopback_only(&self) -> bool {
        self.portals.iter().all(|p| p.ip().is_loopback())
    }
}

impl Plan {
    /// Check every rule in the module docs. Touches the file system only to read: whether
    /// images exist, and the folders of vhost-user sockets (resolved for their derived port
    /// identifiers).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.targets.is_empty() && self.vhost.is_empty() {
            bail!("No target is configured (add a [[target]] with at least one [[target.lu]])");
        }
        check_auth("Discovery", &self.discovery_auth)?;
        let mut names = HashSet::new();
        let mut images = HashSet::new();
        let mut serials = HashSet::new();
        let mut ids = HashSet::new();
        for t in &self.targets {
            check_iscsi_name(&t.name).map_err(anyhow::Error::msg)?;
            let what = format!("Target {}", t.name);
            if !names.insert(t.name.as_str()) {
                bail!("{what} is configured twice");
            }
            if t.portals.is_empty() {
                bail!("{what}: no portal to listen on");
            }
            // TargetAlias goes out as login text: UTF-8 of at most 255 bytes (RFC 7143
            // 13.6), and nothing that would end or break its key=value pair.
            if let Some(a) = &t.alias {
                if a.len() > 255 || a.chars().any(char::is_control) {
                    bail!("{what}: alias must be at most 255 bytes, with no control characters");
                }
            }
            let mut portals = HashSet::new();
            if let Some(p) = t.portals.iter().find(|p| !portals.insert(*p)) {
                bail!("{what}: portal {p} is listed twice");
            }
            if let Some(list) = &t.allowed_initiators {
                if list.is_empty() {
                    bail!(
                        "{what}: allowed_initiators is empty and would admit no one; \
                         list initiator names, or leave it out to admit any (loopback only)"
                    );
                }
                for name in list {
                    check_iscsi_name(name)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("{what}: allowed_initiators"))?;
                }
            }
            check_auth(&what, &t.auth)?;
            if !t.loopback_only() && t.allowed_initiators.is_none() && t.auth.chap.is_none() {
                let outside: Vec<String> = t
                    .portals
                    .iter()
                    .filter(|p| !p.ip().is_loopback())
                    .map(ToString::to_string)
                    .collect();
                bail!(
                    "{what} listens on {} outside the loopback network but has neither an \
                     initiator ACL nor CHAP; configure allowed_initiators or auth.chap \
                     (with serve: --allow-initiator, or --chap-user and SHAREDISK_CHAP_SECRET)",
                    outside.join(", ")
                );
            }
            if !self.vhost.is_empty() && t.tpgt >= VHOST_FIRST_PORT_ID {
                bail!(
                    "{what}: tpgt {} is at or above {VHOST_FIRST_PORT_ID:#x}, where the \
                     vhost-user sockets' relative target port identifiers start",
                    t.tpgt
                );
            }
            if t.lus.is_empty() {
                bail!("{what}: no logical unit (add a [[target.lu]])");
            }
            let mut luns = HashSet::new();
            for lu in &t.lus {
                let what = format!("{what}, LUN {}", lu.lun);
                if !luns.insert(lu.lun) {
                    bail!("{what} is configured twice");
                }
                if lu.lun >= 16384 {
                    bail!("{what}: LUNs go from 0 to 16383");
                }
                let canonical = check_lu(&what, lu, &mut serials, &mut ids)?;
                if !images.insert(canonical.clone()) {
                    bail!("{what}: image {} is served twice", canonical.display());
                }
            }
        }
        self.check_secret_directions()?;
        self.check_portal_overlap()?;
        self.validate_vhost(&images, &mut serials, &mut ids)?;
        self.check_state_files()
    }

    /// Reservation state files are unique, and none is an image.
    fn check_state_files(&self) -> anyhow::Result<()> {
        let lus = self
            .targets
            .iter()
            .flat_map(|t| &t.lus)
            .chain(self.vhost.iter().flat_map(|v| v.lus.iter().map(|l| &l.lu)));
        let resolved = lus
            .map(|lu| Ok((lu, canonical_image_path(&lu.file)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let images: HashSet<&PathBuf> = resolved.iter().map(|(_, image)| image).collect();
        let mut states: std::collections::HashMap<PathBuf, &PathBuf> = Default::default();
        for (lu, image) in &resolved {
            let (state, canonical) = match &lu.reservation_state {
                Some(state) => (
                    state.clone(),
                    canonical_image_path(state).with_context(|| {
                        format!("Bad reservation state path {}", state.display())
                    })?,
                ),
                // A block device has no default state file; a regular file (or one still to
                // be created) keeps its state beside it, where the driver puts it.
                None if is_block_device(image) => continue,
                None => {
                    let state = block::driver::sidecar::sidecar_path(image);
                    (state.clone(), state)
                }
            };
            if images.contains(&canonical) {
                bail!(
                    "Reservation state file {} of image {} is an image",
                    state.display(),
                    image.display()
                );
            }
            match states.insert(canonical, image) {
                // The same image named by several sockets gives the same settings.
                Some(other) if other != image => bail!(
                    "Reservation state file {} is given to images {} and {}",
                    state.display(),
                    other.display(),
                    image.display()
                ),
                _ => {}
            }
        }
        Ok(())
    }

    /// Two portals (of any targets: the daemon listens once per address) that the system
    /// cannot both bind: a wildcard address and another address on the same port (`[::]`
    /// listens on IPv4 as well, unless net.ipv6.bindv6only is set). Port 0 (any free port)
    /// overlaps nothing.
    fn check_portal_overlap(&self) -> anyhow::Result<()> {
        let portals: std::collections::BTreeSet<SocketAddr> = self
            .targets
            .iter()
            .flat_map(|t| t.portals.iter().copied())
            .filter(|p| p.port() != 0)
            .collect();
        // net.ipv6.bindv6only=1 makes `[::]` listen on IPv6 only.
        let dual_stack = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
            .map_or(true, |v| v.trim() != "1");
        for wild in portals.iter().filter(|p| p.ip().is_unspecified()) {
            let covers = |p: &SocketAddr| match wild.is_ipv6() {
                true => p.is_ipv6() || dual_stack,
                false => p.is_ipv4(),
            };
            if let Some(other) = portals
                .iter()
                .find(|p| *p != wild && p.port() == wild.port() && covers(p))
            {
                bail!(
                    "Portals {wild} and {other} overlap: {wild} already listens on every \
                     address{} of port {}; list one of them",
                    if wild.is_ipv6() && other.is_ipv4() {
                        ", IPv4 ones too,"
                    } else {
                        ""
                    },
                    wild.port()
                );
            }
        }
        Ok(())
    }

    /// What the plan allows that is legal but weak, one sentence each, for the log: a target
    /// outside the loopback network with an initiator ACL and no CHAP admits whoever claims a
    /// listed name (an InitiatorName is not proof of identity).
    /// So is a CHAP secret longer than 16 bytes: RFC 7143 sets no upper bound, but the
    /// Microsoft iSCSI initiator takes secrets of 12 to 16 bytes only.
    pub fn warnings(&self) -> Vec<String> {
        let acl_only = self
            .targets
            .iter()
            .filter(|t| {
                !t.loopback_only() && t.allowed_initiators.is_some() && t.auth.chap.is_none()
            })
            .map(|t| {
                format!(
                    "Target {} listens outside the loopback network with an initiator ACL but \
                     no CHAP: anyone who reaches the port can claim a listed initiator name; \
                     configure auth.chap",
                    t.name
                )
            });
        let long = self.auths().flat_map(|(what, auth)| {
            [("CHAP", &auth.chap), ("mutual CHAP", &auth.mutual)]
                .into_iter()
                .filter_map(move |(kind, c)| {
                    let c = c.as_ref().filter(|c| c.secret.len() > 16)?;
                    Some(format!(
                        "{what}: the {kind} secret of user {} is {} bytes; the Microsoft iSCSI \
                         initiator takes 12 to 16",
                        c.user,
                        c.secret.len()
                    ))
                })
        });
        acl_only.chain(long).collect()
    }

    /// Every authentication setting, with what it belongs to: discovery's, then each
    /// target's.
    fn auths(&self) -> impl Iterator<Item = (String, &iscsi::Auth)> {
        std::iter::once(("Discovery".to_string(), &self.discovery_auth)).chain(
            self.targets
                .iter()
                .map(|t| (format!("Target {}", t.name), &t.auth)),
        )
    }

    /// RFC 7143 9.2.1: "Any CHAP secret used for initiator authentication MUST NOT be
    /// configured for authentication of any target, and vice versa": no one-way secret (the
    /// initiators', discovery's included) may be any target's mutual secret.
    fn check_secret_directions(&self) -> anyhow::Result<()> {
        for (target_side, auth) in self.auths() {
            let Some(m) = &auth.mutual else { continue };
            for (initiator_side, other) in self.auths() {
                if other.chap.as_ref().is_some_and(|c| c.secret == m.secret) {
                    bail!(
                        "{target_side}: its mutual CHAP secret is also the initiators' CHAP \
                         secret of {initiator_side}; a secret must serve one direction only \
                         (RFC 7143 9.2.1)"
                    );
                }
            }
        }
        Ok(())
    }

    /// The `[[vhost]]` rules of the module docs; `iscsi_images` are the images iSCSI targets
    /// serve.
    fn validate_vhost(
        &self,
        iscsi_images: &HashSet<PathBuf>,
        serials: &mut HashSet<String>,
        ids: &mut HashSet<u64>,
    ) -> anyhow::Result<()> {
        let mut sockets = HashSet::new();
        // Relative target port identifiers taken, and by which socket.
        let mut port_ids: std::collections::HashMap<u16, &VhostPlan> = Default::default();
        // Images only vhost-user sockets serve, with the settings the first one gave.
        let mut own: std::collections::HashMap<PathBuf, LuPlan> = Default::default();
        for v in &self.vhost {
            let what = format!("vhost-user socket {}", v.socket.display());
            // The same socket however its path is spelled.
            let resolved = canonical_socket_path(&v.socket).unwrap_or_else(|_| v.socket.clone());
            if !sockets.insert(resolved) {
                bail!("{what} is configured twice");
            }
            if let Some(id) = v.relative_port_id {
                check_port_id(i64::from(id)).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            }
            let id = v.port_id()?;
            if let Some(other) = port_ids.insert(id, v) {
                let how = |v: &VhostPlan| match v.relative_port_id {
                    Some(_) => "configured",
                    None => "derived from its path",
                };
                bail!(
                    "vhost-user sockets {} ({}) and {} ({}) have the same relative target port \
                     identifier {id:#06x}; set relative_port_id (quick start: \
                     --vhost-relative-port-id) on one of them to a value from 0x8000 to 0xFFFF \
                     that no other socket has",
                    other.socket.display(),
                    how(other),
                    v.socket.display(),
                    how(v)
                );
            }
            let name_ok = !v.initiator.is_empty()
                && v.initiator.len() <= 223
                && v.initiator.bytes().all(|b| b.is_ascii_graphic());
            if !name_ok {
                bail!(
                    "{what}: initiator {:?} must be 1 to 223 printable ASCII characters \
                     without spaces",
                    v.initiator
                );
            }
            if let Err(e) = vhost_scsi::check_queues(v.num_queues, v.threads) {
                bail!("{what}: {e}");
            }
            if let Err(e) = vhost_scsi::check_watch(v.watch_max) {
                bail!("{what}: {e}");
            }
            if v.lus.is_empty() {
                bail!("{what}: no logical unit (add a [[vhost.lu]])");
            }
            let mut addrs = HashSet::new();
            let mut here = HashMap::new();
            for l in &v.lus {
                let what = format!("{what}, target {} LUN {}", l.target, l.lun);
                if !addrs.insert((l.target, l.lun)) {
                    bail!("{what} is configured twice");
                }
                if l.lun >= 16384 {
                    bail!("{what}: LUNs go from 0 to 16383");
                }
                let canonical = canonical_image_path(&l.lu.file)
                    .with_context(|| format!("{what}: bad image path {}", l.lu.file.display()))?;
                // One image is one LU, and a socket is one I_T nexus: the same LU at two
                // places of one socket would be one disk the guest sees twice, whose places
                // `lu remove` could not take apart (as `lu add` refuses it).
                if let Some((t, lun)) = here.insert(canonical.clone(), (l.target, l.lun)) {
                    bail!(
                        "{what}: image {} is served at target {t} LUN {lun} of this socket \
                         already",
                        canonical.display()
                    );
                }
                if iscsi_images.contains(&canonical) {
                    if l.has_settings {
                        bail!(
                            "{what}: image {} is an iSCSI target's LU; give its settings there, \
                             not here",
                            canonical.display()
                        );
                    }
                    continue;
                }
                match own.get(&canonical) {
                    Some(first) => {
                        let same = first.size == l.lu.size
                            && first.block_size == l.lu.block_size
                            && first.physical_block_size == l.lu.physical_block_size
                            && first.serial == l.lu.serial
                            && first.id == l.lu.id
                            && first.direct == l.lu.direct
                            && first.reservation_state == l.lu.reservation_state;
                        if !same {
                            bail!(
                                "{what}: image {} is configured with other settings elsewhere",
                                canonical.display()
                            );
                        }
                    }
                    None => {
                        check_lu(&what, &l.lu, serials, ids)?;
                        own.insert(canonical, l.lu.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The lowest relative target port identifier of a vhost-user socket; they go up to 0xFFFF.
pub const VHOST_FIRST_PORT_ID: u16 = 0x8000;

/// A configured relative target port identifier of a vhost-user socket, if it is one: from
/// 0x8000 to 0xFFFF.
pub fn check_port_id(id: i64) -> Result<u16, String> {
    match u16::try_from(id) {
        Ok(id) if id >= VHOST_FIRST_PORT_ID => Ok(id),
        _ => Err(format!(
            "relative_port_id {id} is not from 0x8000 to 0xFFFF (32768 to 65535): \
             vhost-user sockets' relative target port identifiers are kept at or above 0x8000, \
             so that none is an iSCSI target's port, whose identifier is its TPGT, below 0x8000"
        )),
    }
}

/// The path a vhost-user socket is bound at, resolved: its canonical folder plus its name, as
/// for an image that does not exist yet (a stale socket left at the path does not change it;
/// the daemon refuses a symlink there). A socket's derived relative target port identifier
/// comes from this path, so it is the same however the path is spelled (relative to another
/// folder, through a symlinked folder) and whether or not a stale socket is there.
pub fn canonical_socket_path(path: &Path) -> std::io::Result<PathBuf> {
    canonical_image_path(path)
}

impl VhostPlan {
    /// The socket's relative target port identifier: the configured one, or the one derived
    /// from its resolved path ([`crate::identity::vhost_port_id`]). Never its place in the
    /// config: registrations an APTPL state file keeps are matched against it at restart.
    pub fn port_id(&self) -> anyhow::Result<u16> {
        if let Some(id) = self.relative_port_id {
            return Ok(id);
        }
        let resolved = canonical_socket_path(&self.socket).with_context(|| {
            format!(
                "vhost-user socket {}: bad socket path (its folder must exist)",
                self.socket.display()
            )
        })?;
        Ok(crate::identity::vhost_port_id(&resolved))
    }
}

impl Plan {
    /// The relative target port identifier of each vhost-user socket, in the order of
    /// [`Plan::vhost`] (see [`VhostPlan::port_id`]).
    pub fn vhost_port_ids(&self) -> anyhow::Result<Vec<u16>> {
        self.vhost.iter().map(VhostPlan::port_id).collect()
    }
}

/// Check the settings of an LU added while the daemon runs (`sharedisk lu add`), as a
/// configured one's are; returns its canonical image path.
pub fn check_lu_plan(what: &str, lu: &LuPlan) -> anyhow::Result<PathBuf> {
    check_lu(what, lu, &mut HashSet::new(), &mut HashSet::new())
}

/// Check one LU's settings; returns its canonical image path.
fn check_lu(
    what: &str,
    lu: &LuPlan,
    serials: &mut HashSet<String>,
    ids: &mut HashSet<u64>,
) -> anyhow::Result<PathBuf> {
    if !matches!(lu.block_size, 512 | 4096) {
        bail!("{what}: block size {} is not 512 or 4096", lu.block_size);
    }
    if let Some(p) = lu.physical_block_size {
        // READ CAPACITY(16) carries it as a 4-bit exponent of logical blocks, and one
        // physical block must fit in the MAXIMUM TRANSFER LENGTH (8 MiB).
        let ok = p >= lu.block_size
            && p.is_power_of_two()
            && (p / lu.block_size).trailing_zeros() <= 15
            && p <= 8 << 20;
        if !ok {
            bail!(
                "{what}: physical block size {p} is not a power-of-two multiple of \
                 the {}-byte block size (at most 2^15 blocks and 8 MiB)",
                lu.block_size
            );
        }
    }
    if let Some(size) = lu.size {
        if size == 0 {
            bail!("{what}: size 0 holds no block");
        }
        if size % u64::from(lu.block_size) != 0 {
            bail!(
                "{what}: size {size} is not a whole number of {}-byte blocks",
                lu.block_size
            );
        }
    }
    if !lu.file.exists() && lu.size.is_none() {
        bail!(
            "{what}: image {} does not exist; give a size to create it",
            lu.file.display()
        );
    }
    let canonical = canonical_image_path(&lu.file)
        .with_context(|| format!("{what}: bad image path {}", lu.file.display()))?;
    if let Some(serial) = &lu.serial {
        if serial.is_empty() || serial.len() > 32 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("{what}: serial {serial:?} must be 1 to 32 printable ASCII characters");
        }
        if !serials.insert(serial.clone()) {
            bail!("{what}: serial {serial:?} is used twice");
        }
    }
    if let Some(id) = lu.id {
        // Compared as the NAA identifier holds them: ids that differ only in their top four
        // bits would show initiators (multipath above all) one disk where there are two.
        if !ids.insert(scsi::naa_bits(id)) {
            bail!(
                "{what}: id {id:#x} is used twice (the NAA identifier holds an id's low 60 bits, so ids that differ only in the top hex digit are the same)"
            );
        }
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> anyhow::Result<Plan> {
        let dir = tempfile::tempdir().expect("temp dir");
        FileConfig::parse(text)?.into_plan(dir.path())
    }

    fn err(text: &str) -> String {
        match plan(text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    const CHAP: &str = r#"chap = { user = "alice", secret = "twelve-bytes-or-more" }"#;

    #[test]
    fn reservation_state_files_are_relative_to_the_config_unique_and_not_images() {
        let p = plan(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            reservation_state = "a.pr"
            "#,
        )
        .expect("valid");
        let state = p.targets[0].lus[0].reservation_state.as_ref().expect("set");
        assert!(state.is_absolute() && state.ends_with("a.pr"), "{state:?}");
        // Its folder must exist: a missing one is found at start, not at the first APTPL.
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            reservation_state = "no-such-folder/a.pr"
            "#);
        assert!(e.contains("Bad reservation state path"), "{e}");
        assert!(e.contains("no-such-folder/a.pr"), "{e}");
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            reservation_state = "one.pr"
            [[target.lu]]
            lun = 1
            file = "b.img"
            size = "1M"
            reservation_state = "one.pr"
            "#);
        assert!(e.contains("one.pr is given to images"), "{e}");
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            reservation_state = "b.img"
            [[target.lu]]
            lun = 1
            file = "b.img"
            size = "1M"
            "#);
        assert!(e.contains("b.img of image"), "{e}");
        assert!(e.contains("is an image"), "{e}");
        // The default state file (the image's path with .pr) is another LU's image: the
        // first APTPL change would replace that image with the state.
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            [[target.lu]]
            lun = 1
            file = "a.img.pr"
            size = "1M"
            "#);
        assert!(e.contains("a.img.pr of image"), "{e}");
        assert!(e.contains("is an image"), "{e}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../sharedisk.example.toml");
        let p = plan(text).expect("the example config is valid");
        assert_eq!(p.targets.len(), 2);
        assert_eq!(p.targets[0].lus.len(), 2);
        assert_eq!(p.targets[0].lus[1].block_size, 4096);
        assert!(p.targets[1].auth.mutual.is_some());
        assert_eq!(p.vhost.len(), 2);
        assert_eq!(p.vhost[0].initiator, "iqn.2026-01.com.example:vm1");
        assert_eq!(p.vhost[0].num_queues, 4);
        assert_eq!(p.vhost[0].threads, Some(2));
        assert_eq!(p.vhost[1].threads, None);
        assert_eq!(p.vhost[0].lus.len(), 2);
        assert_eq!((p.vhost[0].lus[1].target, p.vhost[0].lus[1].lun), (0, 1));
        assert_eq!(p.vhost[1].num_queues, DEFAULT_VHOST_QUEUES);
        assert!(p.vhost[1].initiator.starts_with("vhost:"));
        assert!(p.vhost[1].initiator.ends_with("vm2.sock"));
    }

    #[test]
    fn the_default_vhost_initiator_is_the_same_however_the_path_is_spelled() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("folder");
        let plain = dir.path().join("vm1.sock");
        let roundabout = dir.path().join("sub").join("..").join("vm1.sock");
        assert_eq!(
            default_vhost_initiator(&plain),
            default_vhost_initiator(&roundabout)
        );
        let resolved = canonical_socket_path(&plain).expect("resolved");
        assert_eq!(
            default_vhost_initiator(&plain),
            format!("vhost:{}", resolved.display())
        );
        assert!(resolved.is_absolute());
    }

    const QUORUM: &str = r#"
[[target]]
name = "iqn.2026-01.com.example:a"
[[target.lu]]
lun = 0
file = "quorum.img"
size = "1M"
"#;

    #[test]
    fn vhost_only_config_is_valid() {
        let p = plan(
            r#"
[[vhost]]
socket = "a.sock"
[[vhost.lu]]
target = 2
lun = 300
file = "x.img"
size = "1M"
"#,
        )
        .expect("valid");
        assert!(p.targets.is_empty());
        assert_eq!((p.vhost[0].lus[0].target, p.vhost[0].lus[0].lun), (2, 300));
    }

    #[test]
    fn vhost_lu_of_an_iscsi_image_takes_no_settings() {
        let e = err(&format!(
            "{QUORUM}\n[[vhost]]\nsocket = \"a.sock\"\n[[vhost.lu]]\nlun = 0\nfile = \"quorum.img\"\nblock_size = 4096\n"
        ));
        assert!(e.contains("give its settings there"), "{e}");
    }

    #[test]
    fn vhost_only_image_needs_the_same_settings_everywhere() {
        let e = err(r#"
[[vhost]]
socket = "a.sock"
[[vhost.lu]]
lun = 0
file = "x.img"
size = "1M"
[[vhost]]
socket = "b.sock"
[[vhost.lu]]
lun = 0
file = "x.img"
size = "2M"
"#);
        assert!(e.contains("other settings"), "{e}");
    }

    #[test]
    fn direct_io_is_an_lu_setting_off_by_default() {
        let p = plan(
            r#"
[[target]]
name = "iqn.2026-01.io.sharedisk:t"
[[target.lu]]
lun = 0
file = "a.img"
size = "1M"
direct = true
[[target.lu]]
lun = 1
file = "b.img"
size = "1M"
[[vhost]]
socket = "a.sock"
[[vhost.lu]]
lun = 0
file = "c.img"
size = "1M"
direct = true
"#,
        )
        .expect("valid");
        assert!(p.targets[0].lus[0].direct);
        assert!(!p.targets[0].lus[1].direct);
        assert!(p.vhost[0].lus[0].lu.direct);
        // A vhost-only image served twice must say the same both times.
        let e = err(r#"
[[vhost]]
socket = "a.sock"
[[vhost.lu]]
lun = 0
file = "x.img"
size = "1M"
direct = true
[[vhost]]
socket = "b.sock"
[[vhost.lu]]
lun = 0
file = "x.img"
size = "1M"
"#);
        assert!(e.contains("other settings"), "{e}");
    }

    #[test]
    fn vhost_rules() {
        let one = |body: &str| format!("{QUORUM}\n[[vhost]]\nsocket = \"a.sock\"\n{body}");
        let lu0 = "[[vhost.lu]]\nlun = 0\nfile = \"quorum.img\"\n";
        assert!(err(&one("")).contains("no logical unit"));
        assert!(err(&one(&format!("num_queues = 0\n{lu0}"))).contains("num_queues"));
        assert!(err(&one(&format!("num_queues = 63\n{lu0}"))).contains("num_queues"));
        assert!(err(&one(&format!("threads = 0\n{lu0}"))).contains("threads must be 1 to"));
        assert!(err(&one(&format!("num_queues = 2\nthreads = 3\n{lu0}"))).contains("threads"));
        assert!(err(&one(&format!("threads = 9\n{lu0}"))).contains("num_queues (8)"));
        let watch = |body: &str| plan(&one(&format!("{body}{lu0}"))).map(|p| p.vhost[0].watch_max);
        assert_eq!(
            watch("").expect("a valid socket"),
            Duration::from_micros(600),
            "the default"
        );
        assert_eq!(
            watch("watch_us = 0\n").expect("a valid socket"),
            Duration::ZERO
        );
        assert_eq!(
            watch("watch_us = 10000\n").expect("a valid socket"),
            Duration::from_millis(10)
        );
        assert!(err(&one(&format!("watch_us = 10001\n{lu0}")))
            .contains("--vhost-watch-us) must be 0 to 10000 µs, not 10001 µs"));
        let e = err(&one(&format!("watch_us = -1\n{lu0}")));
        assert!(e.contains("watch_us") && e.contains("expected u64"), "{e}");
        assert_eq!(
            plan(&one(&format!("num_queues = 4\nthreads = 2\n{lu0}")))
                .expect("a valid socket")
                .vhost[0]
                .threads,
            Some(2)
        );
        assert!(err(&one(&format!("initiator = \"a b\"\n{lu0}"))).contains("initiator"));
        assert!(err(&one(&format!("{lu0}{lu0}"))).contains("twice"));
        assert!(
            err(&one("[[vhost.lu]]\nlun = 16384\nfile = \"quorum.img\"\n")).contains("0 to 16383")
        );
        let twice = format!("{}\n[[vhost]]\nsocket = \"a.sock\"\n{lu0}", one(lu0));
        assert!(err(&twice).contains("configured twice"));
        // iSCSI TPGTs stay below the vhost-user relative port identifiers.
        let high = format!(
            "{}tpgt = 32768\n[[target.lu]]\nlun = 0\nfile = \"q.img\"\nsize = \"1M\"\n[[vhost]]\nsocket = \"a.sock\"\n{lu0}",
            "[[target]]\nname = \"iqn.2026-01.com.example:a\"\n"
        );
        let high = high.replace("file = \"quorum.img\"", "file = \"q.img\"");
        assert!(err(&high).contains("tpgt"), "{}", err(&high));
        // One image at two places of one socket.
        let two_places = one(&format!(
            "{lu0}[[vhost.lu]]\nlun = 1\nfile = \"quorum.img\"\n"
        ));
        assert!(
            err(&two_places).contains("served at target 0 LUN 0 of this socket"),
            "{}",
            err(&two_places)
        );
        // The same image behind two sockets and iSCSI is one LU: accepted.
        let shared = format!("{}\n[[vhost]]\nsocket = \"b.sock\"\n{lu0}", one(lu0));
        plan(&shared).expect("valid");
    }

    /// A `[[vhost]]` at `socket` with `extra` settings, serving `x.img` (the same LU on every
    /// socket).
    fn socket(socket: &str, extra: &str) -> String {
        format!(
            "[[vhost]]\nsocket = \"{socket}\"\n{extra}[[vhost.lu]]\nlun = 0\nfile = \"x.img\"\nsize = \"1M\"\n"
        )
    }

    #[test]
    fn the_same_socket_under_two_spellings_is_configured_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("folder");
        let text = format!(
            "{}{}",
            socket("vm1.sock", ""),
            socket("sub/../vm1.sock", "")
        );
        let e = FileConfig::parse(&text)
            .and_then(|c| c.into_plan(dir.path()))
            .map(|p| format!("accepted: {p:?}"))
            .unwrap_or_else(|e| format!("{e:#}"));
        assert!(e.contains("is configured twice"), "{e}");
    }

    /// Each socket of `text`, read from `dir`, with its relative target port identifier.
    fn port_ids(dir: &Path, text: &str) -> Vec<(PathBuf, u16)> {
        let p = FileConfig::parse(text)
            .and_then(|c| c.into_plan(dir))
            .expect("valid");
        let ids = p.vhost_port_ids().expect("port ids");
        p.vhost.iter().map(|v| v.socket.clone()).zip(ids).collect()
    }

    // FNV-1a 64 of the 9 bytes of "/vm1.sock", worked apart from this code (Python:
    // h = 0xcbf29ce484222325; for b in p: h = ((h ^ b) * 0x100000001b3) % 2**64, which gives
    // identity.rs's reference vectors for "", "a" and "foobar") is 0xf5ba_a4a2_95d1_fb8c. Its low
    // 15 bits are 0x7b8c, so the socket's relative target port identifier is
    // 0x8000 | 0x7b8c = 0xfb8c. "/vm2.sock" hashes to 0xbbf4_f827_11ea_8bbb: 0x8bbb. And
    // "/vm540.sock" hashes to 0x05ed_51c1_3bfd_7b8c, whose low 15 bits are 0x7b8c too: it
    // collides with "/vm1.sock" (the first such /vmN.sock).
    const VM1_PORT_ID: u16 = 0xfb8c;
    const VM2_PORT_ID: u16 = 0x8bbb;

    #[test]
    fn a_socket_keeps_its_relative_port_id_whatever_the_order_of_the_sockets() {
        let vm1 = socket("/vm1.sock", "");
        let vm2 = socket("/vm2.sock", "");
        let dir = tempfile::tempdir().expect("temp dir");
        let want = [
            (PathBuf::from("/vm1.sock"), VM1_PORT_ID),
            (PathBuf::from("/vm2.sock"), VM2_PORT_ID),
        ];
        let in_order = port_ids(dir.path(), &format!("{vm1}{vm2}"));
        let mut swapped = port_ids(dir.path(), &format!("{vm2}{vm1}"));
        swapped.reverse();
        assert_eq!(swapped, in_order);
        assert_eq!(in_order, want);
        // A socket added before them, or one of them removed, changes neither.
        let vm3 = socket("/vm3.sock", "");
        assert_eq!(port_ids(dir.path(), &format!("{vm3}{vm1}{vm2}"))[1..], want);
        assert_eq!(port_ids(dir.path(), &vm2), want[1..]);

        // Relative to the config's folder: the same for the path spelled otherwise, and with a
        // stale socket left at it (a daemon killed with SIGKILL leaves one).
        let (a, b) = (socket("a.sock", ""), socket("b.sock", ""));
        let ab = port_ids(dir.path(), &format!("{a}{b}"));
        let mut ba = port_ids(dir.path(), &format!("{b}{a}"));
        ba.reverse();
        assert_eq!(ab, ba);
        assert_ne!(ab[0].1, ab[1].1);
        let absolute = dir.path().join("a.sock");
        let a_again = socket(absolute.to_str().expect("utf-8"), "");
        assert_eq!(port_ids(dir.path(), &a_again)[0].1, ab[0].1);
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert_eq!(
            port_ids(dir.path(), &socket("sub/../a.sock", ""))[0].1,
            ab[0].1
        );
        drop(std::os::unix::net::UnixListener::bind(&absolute).expect("bind"));
        assert!(absolute.exists(), "the stale socket stays");
        assert_eq!(port_ids(dir.path(), &format!("{b}{a}"))[1], ab[0]);
    }

    #[test]
    fn a_configured_relative_port_id_is_used() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "{}{}{}",
            socket("/vm1.sock", ""),
            socket("/vm2.sock", "relative_port_id = 0x8001\n"),
            socket("/vm3.sock", "relative_port_id = 65535\n"),
        );
        let ids: Vec<u16> = port_ids(dir.path(), &text)
            .into_iter()
            .map(|s| s.1)
            .collect();
        assert_eq!(ids, [VM1_PORT_ID, 0x8001, 0xFFFF]);
    }

    #[test]
    fn a_relative_port_id_out_of_range_is_refused() {
        for bad in ["0x7fff", "0", "1", "-1", "0x10000"] {
            let e = err(&socket("/vm1.sock", &format!("relative_port_id = {bad}\n")));
            assert!(e.contains("vhost-user socket /vm1.sock"), "{bad}: {e}");
            assert!(e.contains("is not from 0x8000 to 0xFFFF"), "{bad}: {e}");
            assert!(e.contains("iSCSI target's port"), "{bad}: {e}");
            assert!(e.contains("below 0x8000"), "{bad}: {e}");
        }
        let e = err(&socket("/vm1.sock", "relative_port_id = 0x7fff\n"));
        assert!(e.contains("relative_port_id 32767 is not"), "{e}");
    }

    #[test]
    fn two_sockets_with_one_relative_port_id_are_refused() {
        let both = |a: &str, b: &str| {
            err(&format!(
                "{}{}",
                socket("/vm1.sock", a),
                socket("/vm2.sock", b)
            ))
        };
        let e = both("relative_port_id = 0x8123\n", "relative_port_id = 0x8123\n");
        assert!(
            e.contains(
                "vhost-user sockets /vm1.sock (configured) and /vm2.sock (configured) have the \
                 same relative target port identifier 0x8123"
            ),
            "{e}"
        );
        assert!(e.contains("set relative_port_id"), "{e}");
        assert!(e.contains("--vhost-relative-port-id"), "{e}");
        // A configured identifier that is another socket's derived one.
        let e = both("", "relative_port_id = 0xfb8c\n");
        assert!(
            e.contains("/vm1.sock (derived from its path) and /vm2.sock (configured)"),
            "{e}"
        );
        assert!(e.contains("0xfb8c"), "{e}");
        // Two derived identifiers that collide: "/vm1.sock" and "/vm540.sock" (see above).
        let e = err(&format!(
            "{}{}",
            socket("/vm1.sock", ""),
            socket("/vm540.sock", "")
        ));
        assert!(
            e.contains(
                "/vm1.sock (derived from its path) and /vm540.sock (derived from its path) have \
                 the same relative target port identifier 0xfb8c"
            ),
            "{e}"
        );
        assert!(e.contains("set relative_port_id"), "{e}");
        // Setting one resolves it.
        let fixed = format!(
            "{}{}",
            socket("/vm1.sock", ""),
            socket("/vm540.sock", "relative_port_id = 0x8540\n")
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let ids: Vec<u16> = port_ids(dir.path(), &fixed)
            .into_iter()
            .map(|s| s.1)
            .collect();
        assert_eq!(ids, [VM1_PORT_ID, 0x8540]);
    }

    #[test]
    fn readme_shows_the_example_config() {
        let readme = include_str!("../../../README.md");
        let example = include_str!("../sharedisk.example.toml");
        let body: String = example
            .lines()
            .skip_while(|l| {
                l.starts_with("# sharedisk configuration") || l.starts_with("# Relative")
            })
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            readme.contains(&body),
            "README.md and sharedisk.example.toml differ"
        );
    }

    #[test]
    fn minimal_target_gets_defaults() {
        let p = plan(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "db.img"
            size = "1G"
            "#,
        )
        .expect("valid");
        let t = &p.targets[0];
        assert_eq!(t.portals, vec!["127.0.0.1:3260".parse().expect("addr")]);
        assert_eq!(t.tpgt, 1);
        assert_eq!(t.allowed_initiators, None);
        assert_eq!(t.lus[0].size, Some(1 << 30));
        assert_eq!(t.lus[0].block_size, 512);
        assert!(t.lus[0].file.is_absolute());
    }

    #[test]
    fn size_may_be_a_number_and_id_hex() {
        let p = plan(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 3
            file = "db.img"
            size = 1048576
            id = "0xFEDCBA9876543210"
            serial = "DB0003"
            "#,
        )
        .expect("valid");
        let lu = &p.targets[0].lus[0];
        assert_eq!(lu.size, Some(1 << 20));
        assert_eq!(lu.id, Some(0xFEDC_BA98_7654_3210));
        assert_eq!(lu.serial.as_deref(), Some("DB0003"));
    }

    #[test]
    fn a_size_of_zero_is_refused_however_it_is_written() {
        for size in ["0", "\"0\""] {
            let e = err(&format!(
                r#"
                [[target]]
                name = "iqn.2026-01.com.example:db"
                [[target.lu]]
                lun = 0
                file = "zero.img"
                size = {size}
                "#
            ));
            assert!(e.contains("size"), "{e}");
        }
    }

    #[test]
    fn ids_that_give_the_same_naa_identifier_are_refused() {
        // The NAA 3h designator (SPC-5 7.7.6.6.4) has room for 60 bits of the id: these two
        // differ only above them.
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = 1048576
            id = "0x1000000000000001"
            [[target.lu]]
            lun = 1
            file = "b.img"
            size = 1048576
            id = "0x2000000000000001"
            "#);
        assert!(e.contains("is used twice"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portal = ["127.0.0.1:3260"]
            "#);
        assert!(e.contains("unknown field `portal`"), "{e}");
    }

    #[test]
    fn overlapping_portals_are_refused() {
        let target = |name: &str, portals: &str| {
            format!(
                "[[target]]\nname = \"iqn.2026-01.com.example:{name}\"\nportals = [{portals}]\n\
                 allowed_initiators = [\"iqn.2026-01.com.example:i\"]\n[[target.lu]]\nlun = 0\nfile = \"{name}.img\"\nsize = \"1M\"\n"
            )
        };
        let e = err(&target("a", r#""0.0.0.0:3260", "127.0.0.1:3260""#));
        assert!(
            e.contains("Portals 0.0.0.0:3260 and 127.0.0.1:3260 overlap"),
            "{e}"
        );
        // Across targets, and [::] with an IPv4 address (where [::] listens on IPv4 too, as it
        // does unless net.ipv6.bindv6only is set).
        let two = format!(
            "{}{}",
            target("a", r#""[::]:3260""#),
            target("b", r#""127.0.0.1:3260""#)
        );
        let v6only =
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1");
        if v6only {
            plan(&two).expect("[::] is IPv6 only here");
        } else {
            assert!(err(&two).contains("overlap"), "{}", err(&two));
        }
        // Other ports, an IPv6 address beside 0.0.0.0, and port 0 are fine.
        plan(&target("a", r#""0.0.0.0:3260", "127.0.0.1:3261""#)).expect("other ports");
        plan(&target("a", r#""0.0.0.0:3260", "[::1]:3260""#)).expect("IPv6 beside 0.0.0.0");
        plan(&target("a", r#""0.0.0.0:0", "127.0.0.1:0""#)).expect("any free port");
    }

    #[test]
    fn a_bad_alias_is_refused() {
        let with = |alias: &str| {
            format!(
                "[[target]]\nname = \"iqn.2026-01.com.example:a\"\nalias = \"{alias}\"\n\
                 [[target.lu]]\nlun = 0\nfile = \"a.img\"\nsize = \"1M\"\n"
            )
        };
        plan(&with("Payroll disks")).expect("a plain alias");
        assert!(err(&with("a\\u0000b")).contains("no control characters"));
        assert!(err(&with(&"x".repeat(256))).contains("at most 255 bytes"));
    }

    #[test]
    fn duplicate_lun_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            [[target.lu]]
            lun = 0
            file = "b.img"
            size = "1M"
            "#);
        assert!(e.contains("LUN 0 is configured twice"), "{e}");
    }

    #[test]
    fn same_image_twice_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            [[target.lu]]
            lun = 1
            file = "./a.img"
            size = "1M"
            "#);
        assert!(e.contains("is served twice"), "{e}");
    }

    #[test]
    fn duplicate_target_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "b.img"
            size = "1M"
            "#);
        assert!(e.contains("configured twice"), "{e}");
    }

    #[test]
    fn missing_image_without_size_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "nowhere.img"
            "#);
        assert!(e.contains("does not exist; give a size"), "{e}");
    }

    #[test]
    fn bad_target_name_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-13.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("not a valid iSCSI name"), "{e}");
    }

    #[test]
    fn bad_block_size_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            block_size = 1024
            "#);
        assert!(e.contains("block size 1024 is not 512 or 4096"), "{e}");
    }

    #[test]
    fn physical_block_size_must_be_a_power_of_two_multiple_of_the_block_size() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            block_size = 4096
            physical_block_size = 512
            "#);
        assert!(e.contains("physical block size 512 is not"), "{e}");
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            physical_block_size = 1536
            "#);
        assert!(e.contains("physical block size 1536 is not"), "{e}");
        // 2^15 blocks of 512 bytes, but 16 MiB: more than one 8 MiB transfer.
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            physical_block_size = 16777216
            "#);
        assert!(e.contains("physical block size 16777216 is not"), "{e}");
    }

    #[test]
    fn size_not_a_whole_number_of_blocks_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = 6144
            block_size = 4096
            "#);
        assert!(e.contains("not a whole number of 4096-byte blocks"), "{e}");
    }

    #[test]
    fn short_chap_secret_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            auth.chap = { user = "alice", secret = "short" }
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("shorter than 12 bytes"), "{e}");
    }

    #[test]
    fn mutual_chap_without_chap_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            auth.mutual = { user = "target", secret = "twelve-bytes-or-more" }
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("mutual CHAP needs one-way CHAP"), "{e}");
    }

    #[test]
    fn a_secret_used_in_both_directions_is_refused() {
        // RFC 7143 9.2.1: a secret for initiator authentication MUST NOT also authenticate a
        // target. Here one target's mutual (target) secret is another's initiator secret.
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:a"
            auth.chap = { user = "alice", secret = "alice-secret-1" }
            auth.mutual = { user = "target", secret = "shared-secret-2" }
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            [[target]]
            name = "iqn.2026-01.com.example:b"
            auth.chap = { user = "bob", secret = "shared-secret-2" }
            [[target.lu]]
            lun = 0
            file = "b.img"
            size = "1M"
            "#);
        assert!(e.contains("one direction only"), "{e}");
    }

    #[test]
    fn secrets_are_exposed_to_anyone_but_the_owner() {
        assert!(!super::secrets_exposed(0o100600));
        assert!(!super::secrets_exposed(0o100400));
        assert!(super::secrets_exposed(0o100640));
        assert!(super::secrets_exposed(0o100604));
        let c = FileConfig::parse(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            auth.chap = { user = "alice", secret = "alice-secret-1" }
            "#,
        )
        .expect("parse");
        assert!(c.has_secrets());
        let shown = format!("{c:?}");
        assert!(!shown.contains("alice-secret-1"), "{shown}");
        let c = FileConfig::parse(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            "#,
        )
        .expect("parse");
        assert!(!c.has_secrets());
    }

    #[test]
    fn an_acl_without_chap_outside_loopback_is_warned_about() {
        let acl_only_on = |portal: &str| {
            plan(&format!(
                r#"
                [[target]]
                name = "iqn.2026-01.com.example:db"
                portals = ["{portal}"]
                allowed_initiators = ["iqn.2026-01.com.example:host1"]
                [[target.lu]]
                lun = 0
                file = "a.img"
                size = "1M"
                "#
            ))
            .expect("valid")
            .warnings()
        };
        let w = acl_only_on("192.0.2.1:3260");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("no CHAP"), "{w:?}");
        // On loopback, nothing to say.
        assert!(acl_only_on("127.0.0.1:3260").is_empty());
    }

    #[test]
    fn a_chap_secret_longer_than_16_bytes_is_warned_about() {
        let with_secret = |secret: &str| {
            plan(&format!(
                r#"
                [[target]]
                name = "iqn.2026-01.com.example:db"
                auth.chap = {{ user = "alice", secret = "{secret}" }}
                [[target.lu]]
                lun = 0
                file = "a.img"
                size = "1M"
                "#
            ))
            .expect("valid")
            .warnings()
        };
        assert!(with_secret("sixteen-bytes-ok").is_empty());
        let w = with_secret("seventeen-bytes-x");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("17 bytes"), "{w:?}");
    }

    #[test]
    fn the_same_portal_twice_in_a_target_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["127.0.0.1:3260", "127.0.0.1:3260"]
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn empty_acl_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            allowed_initiators = []
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("would admit no one"), "{e}");
    }

    #[test]
    fn bad_portal_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["localhost"]
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("is not an ADDRESS:PORT"), "{e}");
    }

    #[test]
    fn non_loopback_portal_without_acl_or_chap_is_refused() {
        let e = err(r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["127.0.0.1:3260", "0.0.0.0:3260"]
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#);
        assert!(e.contains("outside the loopback network"), "{e}");
        assert!(e.contains("0.0.0.0:3260"), "{e}");
    }

    #[test]
    fn non_loopback_portal_with_acl_is_accepted() {
        plan(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["[::]:3260"]
            allowed_initiators = ["iqn.1993-08.org.debian:01:abcdef"]
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#,
        )
        .expect("an ACL is enough");
    }

    #[test]
    fn non_loopback_portal_with_chap_is_accepted() {
        plan(&format!(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["0.0.0.0:3260"]
            auth.{CHAP}
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#
        ))
        .expect("CHAP is enough");
    }

    #[test]
    fn loopback_portals_admit_any_initiator() {
        let p = plan(
            r#"
            [[target]]
            name = "iqn.2026-01.com.example:db"
            portals = ["127.0.0.1:3260", "[::1]:3260", "127.0.0.2:3261"]
            [[target.lu]]
            lun = 0
            file = "a.img"
            size = "1M"
            "#,
        )
        .expect("loopback needs no ACL");
        assert!(p.targets[0].loopback_only());
    }

    #[test]
    fn no_target_is_refused() {
        assert!(err("").contains("No target is configured"));
    }

    #[test]
    fn iscsi_names() {
        for good in [
            "iqn.2026-01.com.example:db",
            "iqn.1993-08.org.debian:01:abcdef0123",
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
            "iqn.2026-01.io.sharedisk",
            // RFC 3720 3.2.6.3.2's examples, in the lower case names are compared in
            // (RFC 3722 2: normalised by stringprep).
            "eui.02004567a425678d",
            "naa.52004567ba64678d",
        ] {
            assert_eq!(check_iscsi_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "disk0",
            "iqn.2026-1.com.example",
            "iqn.2026-01",
            "iqn.2026-01.",
            "iqn.2026-01.com..example",
            "iqn.2026-01.com.Example:db",
            "iqn.2026-01.com.example:a b",
            "eui.1234",
            "naa.xyz",
            // Upper case would never match the lower-case name an initiator sends.
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
        ] {
            assert!(check_iscsi_name(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
