//! iSCSI target (RFC 7143).
//!
//! [`Server`] accepts connections on a listener and runs login, discovery and full-feature
//! sessions for the configured [`TargetConfig`]s. SCSI commands go to the target's
//! [`scsi::Target`]; this crate owns only the transport.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

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

/// An iSCSI target server.
pub struct Server {
    config: ServerConfig,
}

impl Server {
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Self { config })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Accept and serve connections until the listener fails.
    pub async fn serve(self: Arc<Self>, _listener: TcpListener) -> std::io::Result<()> {
        Err(std::io::Error::other("iSCSI target not implemented yet"))
    }
}
