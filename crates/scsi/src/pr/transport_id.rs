//! TransportIDs (SPC-5 7.6.4): how PERSISTENT RESERVE OUT names other initiator ports (SPEC_I_PT,
//! REGISTER AND MOVE) and how READ FULL STATUS shows who holds a registration.
//!
//! Only the iSCSI TransportID (PROTOCOL IDENTIFIER 5h, SPC-5 7.6.4.6) is decoded; every other
//! protocol identifier is refused. Both iSCSI formats are supported:
//!
//! - format 00b: `ISCSI NAME`, NUL-terminated and NUL-padded; names an initiator *device*,
//!   so it decodes to an [`InitiatorPort`] with `isid: None` (every session of that initiator);
//! - format 01b: `<iSCSI name>,i,0x<ISID as 12 hex digits>`, NUL-terminated and NUL-padded;
//!   names one initiator *port*. The hex digits are matched case-insensitively.
//!
//! In both formats ADDITIONAL LENGTH counts the bytes after byte 3 and is at least 20 and a
//! multiple of 4 (SPC-5 7.6.4.6).
//!
//! # vhost-user initiators
//!
//! A vhost-user-scsi initiator ([`Transport::Vhost`]) has no SCSI transport of its own; each
//! socket is configured with an initiator name (DESIGN.md §4). READ FULL STATUS shows it as an
//! **iSCSI TransportID of format 00b carrying that configured name**. Why: format 00b is
//! exactly "an initiator device known by a name, without a port qualifier", which is what the
//! configuration gives us; a SAS TransportID would need a 64-bit SAS address we would have to
//! invent (and operators could not recognise it), and the "no specified protocol" identifier
//! carries no name at all. The same rule runs backwards: a format-00b TransportID received from
//! a vhost-user nexus (SPEC_I_PT, REGISTER AND MOVE) names the vhost-user initiator of that name
//! — see [`decode`]'s `device_transport` — so what READ FULL STATUS shows can be fed back.

use crate::{InitiatorPort, Transport};

/// PROTOCOL IDENTIFIER for iSCSI (SPC-5 7.6.2, table 444).
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// The separator of a format-01b iSCSI TransportID: `,i,0x` (SPC-5 7.6.4.6).
const SEPARATOR: &[u8] = b",i,0x";

/// Why a TransportID was refused. `at` and `bit` locate the offending field relative to the
/// first byte of the TransportID; the caller adds the TransportID's offset in the parameter
/// list and reports INVALID FIELD IN PARAMETER LIST with that field pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TidError {
    /// Byte offset of the field in error within the TransportID.
    pub at: usize,
    /// Bit pointer, when the field is narrower than a byte.
    pub bit: Option<u8>,
    pub kind: TidErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TidErrorKind {
    /// Fewer bytes than the header or than ADDITIONAL LENGTH announces.
    Truncated,
    /// A PROTOCOL IDENTIFIER other than iSCSI.
    UnknownProtocol,
    /// FORMAT CODE 10b or 11b.
    UnknownFormat,
    /// ADDITIONAL LENGTH under 20 or not a multiple of 4.
    BadLength,
    /// No NUL terminator inside the TransportID.
    MissingNul,
    /// An empty name, or one that is not UTF-8.
    BadName,
    /// Format 01b without `,i,0x` followed by exactly 12 hex digits.
    BadSeparator,
    /// A reserved field is not zero.
    Reserved,
}

impl TidError {
    const fn new(at: usize, bit: Option<u8>, kind: TidErrorKind) -> Self {
        TidError { at, bit, kind }
    }
}

/// The length of the TransportID starting at `data[0]` (4 + ADDITIONAL LENGTH), read from its
/// header; for walking a list of TransportIDs. Errors when the header itself is short.
pub fn len_at(data: &[u8]) -> Result<usize, TidError> {
    match data.get(2..4) {
        Some(&[hi, lo]) => Ok(4 + usize::from(u16::from_be_bytes([hi, lo]))),
        _ => Err(TidError::new(0, None, TidErrorKind::Truncated)),
    }
}

/// Decode one TransportID, exactly `data` (its length is 4 + ADDITIONAL LENGTH; extra bytes
/// are an error, use [`len_at`] to split a list).
///
/// A format-00b TransportID names an initiator device, not a port; it decodes to
/// `device_transport` with `isid: None`. Pass the transport of the nexus that sent the
/// TransportID: from an iSCSI nexus it names every session of that iSCSI initiator, from a
/// vhost-user nexus it names the vhost-user initiator of that configured name (the module
/// documentation says why).
pub fn decode(data: &[u8], device_transport: Transport) -> Result<InitiatorPort, TidError> {
    use TidErrorKind::*;
    let b0 = *data.first().ok_or(TidError::new(0, None, Truncated))?;
    // SPC-5 7.6.4.1 table 446: FORMAT CODE bits 7..6, reserved bits 5..4, PROTOCOL IDENTIFIER
    // bits 3..0.
    if b0 & 0x0F != PROTOCOL_ISCSI {
        return Err(TidError::new(0, Some(3), UnknownProtocol));
    }
    if b0 & 0x30 != 0 {
        return Err(TidError::new(0, Some(5), Reserved));
    }
    let format = b0 >> 6;
    if format > 1 {
        return Err(TidError::new(0, Some(7), UnknownFormat));
    }
    if data.get(1).copied().unwrap_or(0) != 0 {
        return Err(TidError::new(1, Some(7), Reserved));
    }
    let total = len_at(data)?;
    let add_len = total - 4;
    if add_len < 20 || add_len % 4 != 0 {
        return Err(TidError::new(2, None, BadLength));
    }
    if data.len() != total {
        return Err(TidError::new(2, None, Truncated));
    }
    let body = data.get(4..).unwrap_or(&[]);
    // The name (and for 01b the separator and ISID) end at the first NUL; the rest is padding.
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(TidError::new(4, None, MissingNul))?;
    let text = body.get(..nul).unwrap_or(&[]);
    if format == 0 {
        let name = std::str::from_utf8(text).map_err(|_| TidError::new(4, None, BadName))?;
        if name.is_empty() {
            return Err(TidError::new(4, None, BadName));
        }
        return Ok(InitiatorPort {
            transport: device_transport,
            name: name.to_owned(),
            isid: None,
        }
        .folded());
    }
    // Format 01b: <name>,i,0x<12 hex digits>. The name cannot contain ',' (RFC 3720 3.2.6.2
    // restricts iSCSI names to a-z, 0-9, '-', '.', ':'), so the first ",i,0x" is the separator.
    let sep = text
        .windows(SEPARATOR.len())
        .position(|w| w.eq_ignore_ascii_case(SEPARATOR))
        .ok_or(TidError::new(4, None, BadSeparator))?;
    let name = text.get(..sep).unwrap_or(&[]);
    let name = std::str::from_utf8(name).map_err(|_| TidError::new(4, None, BadName))?;
    if name.is_empty() {
        return Err(TidError::new(4, None, BadName));
    }
    let hex_at = sep + SEPARATOR.len();
    let hex = text.get(hex_at..).unwrap_or(&[]);
    let isid = parse_isid(hex).ok_or(TidError::new(4 + hex_at, None, BadSeparator))?;
    Ok(InitiatorPort {
        transport: Transport::Iscsi,
        name: name.to_owned(),
        isid: Some(isid),
    }
    .folded())
}

/// Exactly 12 hex digits (either case) to the 6-byte ISID.
fn parse_isid(hex: &[u8]) -> Option<[u8; 6]> {
    if hex.len() != 12 {
        return None;
    }
    let mut isid = [0u8; 6];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let hi = (pair.first()?.to_ascii_lowercase() as char).to_digit(16)?;
        let lo = (pair.get(1)?.to_ascii_lowercase() as char).to_digit(16)?;
        *isid.get_mut(i)? = (hi * 16 + lo) as u8;
    }
    Some(isid)
}

/// Encode the TransportID of `port` for READ FULL STATUS: format 01b when it has an ISID,
/// format 00b otherwise (an iSCSI initiator device, or a vhost-user initiator: see the module
/// documentation). NUL-terminated, NUL-padded to a multiple of 4, at least 24 bytes in all.
pub fn encode(port: &InitiatorPort) -> Vec<u8> {
    // Format 01b carries the port name `name,i,0x<ISID>`; format 00b the bare name.
    let mut text = port.port_name().into_bytes();
    let format: u8 = if port.isid.is_some() { 1 } else { 0 };
    text.push(0);
    let mut add_len = text.len().max(20);
    add_len = add_len.div_ceil(4) * 4;
    // An iSCSI name is at most 223 bytes (RFC 7143 4.2.7.1); a configured name longer than a
    // TransportID can carry is cut (ADDITIONAL LENGTH is 16 bits), still NUL-terminated.
    if add_len > 0xFFFC {
        add_len = 0xFFFC;
        text.truncate(add_len - 1);
        text.push(0);
    }
    text.resize(add_len, 0);
    let mut out = Vec::with_capacity(4 + add_len);
    out.push((format << 6) | PROTOCOL_ISCSI);
    out.push(0);
    out.extend_from_slice(&(add_len as u16).to_be_bytes());
    out.extend_from_slice(&text);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn iscsi(name: &str, isid: Option<[u8; 6]>) -> InitiatorPort {
        InitiatorPort {
            transport: Transport::Iscsi,
            name: name.into(),
            isid,
        }
    }

    #[test]
    fn format_00b_bytes_per_spc5_7_6_4_6() {
        // SPC-5 7.6.4.6, table 451: byte 0 = FORMAT CODE 00b | PROTOCOL IDENTIFIER 5h, byte 1
        // reserved, ADDITIONAL LENGTH, then the NUL-terminated name padded to a multiple of
        // four and at least 20 bytes.
        let got = encode(&iscsi("iqn.a", None));
        let mut want = vec![0x05, 0x00, 0x00, 0x14];
        want.extend_from_slice(b"iqn.a");
        want.resize(24, 0);
        assert_eq!(got, want);
        assert_eq!(
            decode(&want, Transport::Iscsi).unwrap(),
            iscsi("iqn.a", None)
        );
    }

    #[test]
    fn format_01b_bytes_per_spc5_7_6_4_6() {
        // SPC-5 7.6.4.6, table 452: byte 0 = 01b << 6 | 5h = 45h; name, ",i,0x", 12 hex digits
        // of the ISID, NUL, padding to a multiple of 4.
        let port = iscsi(
            "iqn.2000-01.x:y",
            Some([0x80, 0x12, 0x34, 0x56, 0x78, 0x9A]),
        );
        let got = encode(&port);
        let text = b"iqn.2000-01.x:y,i,0x80123456789a\0"; // 33 bytes -> 36
        let mut want = vec![0x45, 0x00, 0x00, 36];
        want.extend_from_slice(text);
        want.resize(40, 0);
        assert_eq!(got, want);
        assert_eq!(decode(&want, Transport::Iscsi).unwrap(), port);
    }

    #[test]
    fn format_01b_isid_hex_is_case_insensitive() {
        let mut tid = vec![0x45, 0x00, 0x00, 24];
        tid.extend_from_slice(b"iqn.q,I,0X0A0b0C0d0E0f\0");
        tid.resize(28, 0);
        let port = decode(&tid, Transport::Iscsi).unwrap();
        assert_eq!(port.isid, Some([0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F]));
        assert_eq!(port.name, "iqn.q");
    }

    /// iSCSI names compare case folded (RFC 3722): a TransportID naming an initiator with
    /// capitals names the one that logged in under the lower-case name, in either format.
    #[test]
    fn iscsi_names_are_case_folded() {
        let mut tid = vec![0x45, 0x00, 0x00, 24];
        tid.extend_from_slice(b"IQN.Q,i,0x0a0b0c0d0e0f\0");
        tid.resize(28, 0);
        assert_eq!(decode(&tid, Transport::Iscsi).unwrap().name, "iqn.q");
        let mut tid = vec![0x05, 0x00, 0x00, 20];
        tid.extend_from_slice(b"IQN.Q:Host\0");
        tid.resize(24, 0);
        assert_eq!(decode(&tid, Transport::Iscsi).unwrap().name, "iqn.q:host");
    }

    #[test]
    fn vhost_initiator_is_format_00b_with_its_configured_name() {
        let port = InitiatorPort {
            transport: Transport::Vhost,
            name: "iqn.2026-01.io.sharedisk:guest1".into(),
            isid: None,
        };
        let tid = encode(&port);
        assert_eq!(tid[0], 0x05); // FORMAT CODE 00b, PROTOCOL IDENTIFIER iSCSI
        assert_eq!(decode(&tid, Transport::Vhost).unwrap(), port);
    }

    #[test]
    fn refusals_point_at_the_field() {
        use TidErrorKind::*;
        let mut good = vec![0x05, 0x00, 0x00, 0x14];
        good.extend_from_slice(b"iqn.a");
        good.resize(24, 0);

        let mut sas = good.clone();
        sas[0] = 0x06; // SAS
        assert_eq!(
            decode(&sas, Transport::Iscsi).unwrap_err(),
            TidError::new(0, Some(3), UnknownProtocol)
        );

        let mut fmt = good.clone();
        fmt[0] = 0x85; // FORMAT CODE 10b
        assert_eq!(
            decode(&fmt, Transport::Iscsi).unwrap_err().kind,
            UnknownFormat
        );

        let mut short = good.clone();
        short[3] = 0x10; // ADDITIONAL LENGTH 16 < 20
        short.truncate(20);
        assert_eq!(
            decode(&short, Transport::Iscsi).unwrap_err(),
            TidError::new(2, None, BadLength)
        );

        let mut odd = good.clone();
        odd[3] = 0x15; // not a multiple of 4
        odd.push(0);
        assert_eq!(decode(&odd, Transport::Iscsi).unwrap_err().kind, BadLength);

        let mut no_nul = vec![0x05, 0x00, 0x00, 0x14];
        no_nul.extend_from_slice(&[b'a'; 20]);
        assert_eq!(
            decode(&no_nul, Transport::Iscsi).unwrap_err(),
            TidError::new(4, None, MissingNul)
        );

        let mut sep = vec![0x45, 0x00, 0x00, 24];
        sep.extend_from_slice(b"iqn.q;i;0x0a0b0c0d0e0f\0");
        sep.resize(28, 0);
        assert_eq!(
            decode(&sep, Transport::Iscsi).unwrap_err().kind,
            BadSeparator
        );

        let mut digits = vec![0x45, 0x00, 0x00, 24];
        digits.extend_from_slice(b"iqn.q,i,0x0a0b0c0d0e\0");
        digits.resize(28, 0);
        assert_eq!(
            decode(&digits, Transport::Iscsi).unwrap_err().kind,
            BadSeparator
        );

        assert_eq!(
            decode(&good[..23], Transport::Iscsi).unwrap_err().kind,
            Truncated
        );
        assert_eq!(decode(&[], Transport::Iscsi).unwrap_err().kind, Truncated);
        assert_eq!(
            decode(&[0x05], Transport::Iscsi).unwrap_err().kind,
            Truncated
        );
    }
}
