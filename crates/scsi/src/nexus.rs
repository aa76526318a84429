//! I_T nexus identity (SAM-5 4.6): an initiator port and a target port.

use serde::{Deserialize, Serialize};

/// The transport protocol of a port, for TransportIDs (SPC-5 7.6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    Iscsi,
    /// vhost-user-scsi: no SCSI transport of its own. Each socket is configured with an
    /// initiator name, which READ FULL STATUS shows as an iSCSI TransportID of format 00b
    /// (see [`crate::pr::transport_id`]).
    Vhost,
}

/// An initiator port. For iSCSI its name is `<initiator name>,i,0x<ISID>` (RFC 7143 13.8).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitiatorPort {
    pub transport: Transport,
    /// The initiator (device) name, e.g. `iqn.1993-08.org.debian:01:abc`.
    pub name: String,
    /// The iSCSI session identifier; `None` for transports without one.
    pub isid: Option<[u8; 6]>,
}

impl InitiatorPort {
    /// The port's name: `<initiator name>,i,0x<ISID>` (RFC 7143 13.8, ISID in lower-case hex),
    /// or the bare initiator name for transports without an ISID.
    pub fn port_name(&self) -> String {
        match self.isid {
            Some(isid) => {
                let hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
                format!("{},i,0x{hex}", self.name)
            }
            None => self.name.clone(),
        }
    }

    /// The port as names are compared: an iSCSI initiator name case folded (RFC 3722, as
    /// the iSCSI frontend folds the names it logs in), others as they are.
    pub fn folded(mut self) -> Self {
        if self.transport == Transport::Iscsi {
            self.name = self.name.to_lowercase();
        }
        self
    }
}

/// A target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetPort {
    /// The target name, e.g. `iqn.2026-01.io.sharedisk:disk0`.
    pub name: String,
    /// Target portal group tag (iSCSI) — part of the port name `<name>,t,0x<tpgt>`.
    pub tpgt: u16,
    /// RELATIVE TARGET PORT IDENTIFIER (SPC-5 7.7.3.7), unique per target, never 0.
    pub relative_id: u16,
}

/// A target port an LU is served through, with the transport that serves it: REGISTER AND
/// MOVE's format-00b TransportID names an initiator of that transport (SPC-5 6.17.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPort {
    pub port: TargetPort,
    pub transport: Transport,
}

impl ServedPort {
    /// Add `port`, served by `transport`, to `ports` unless it is there already (a port is
    /// known by its identity, whatever transport was recorded with it first).
    pub(crate) fn add(ports: &mut Vec<ServedPort>, port: &TargetPort, transport: Transport) {
        if !ports.iter().any(|p| p.port == *port) {
            ports.push(ServedPort {
                port: port.clone(),
                transport,
            });
        }
    }
}

impl TargetPort {
    /// The iSCSI target port name, `<target name>,t,0x<TPGT>` (RFC 7143 13.8), four hex
    /// digits.
    pub fn port_name(&self) -> String {
        format!("{},t,0x{:04x}", self.name, self.tpgt)
    }
}

/// An I_T nexus: the unit that holds unit attentions, SPC-2 reservations and PR registrations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItNexus {
    pub initiator: InitiatorPort,
    pub target: TargetPort,
}
