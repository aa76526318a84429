//! PDU framing (RFC 7143 11.2): the 48-byte Basic Header Segment, Additional Header Segments,
//! the data segment with its padding, and the optional CRC32C digests.
//!
//! Every length comes from the peer, so [`read_pdu`] checks each one against a limit before it
//! allocates: the AHS is at most 255 words by construction, the data segment at most the
//! negotiated MaxRecvDataSegmentLength of this side. Field accessors work on a fixed-size
//! array, so no access can go out of bounds.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Reserved tag value (RFC 7143 11.2.1.8, 11.18.4).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes (RFC 7143 11.2.1.2).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_REJECT: u8 = 0x06;
    pub const INVALID_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
}

/// Errors reading a PDU. Each one ends the connection (RFC 7143 7.8: at ErrorRecoveryLevel 0
/// a framing or header digest error means the connection, and the session, has failed).
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("Connection I/O failed")]
    Io(#[from] std::io::Error),
    /// With the header of the PDU, whose data was not read.
    #[error("Data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLong { len: u32, max: u32, bhs: Box<Bhs> },
    #[error("Header digest mismatch")]
    HeaderDigest,
}

/// The Basic Header Segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op={:#04x} itt={:#x})", self.opcode(), self.itt())
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// A header with the given opcode (target PDUs never set the I bit).
    pub fn new(opcode: u8) -> Self {
        let mut b = Bhs::default();
        b.0[0] = opcode & 0x3f;
        b
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I bit: an immediate command (RFC 7143 11.2.1.1).
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes (the field counts 4-byte words).
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    pub fn set_data_len(&mut self, len: u32) {
        let b = len.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }
    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.0[8..16].copy_from_slice(&lun);
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        match self.0.get(off..off + 2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 0,
        }
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        match self.0.get(off..off + 4) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        if let Some(b) = self.0.get_mut(off..off + 2) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        if let Some(b) = self.0.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    /// Initiator Task Tag (bytes 16-19).
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// Bytes 20-23: Target Transfer Tag, Expected Data Transfer Length, Referenced Task Tag, or
    /// CID depending on the opcode.
    pub fn field20(&self) -> u32 {
        self.u32_at(20)
    }
    /// CmdSN of a request (bytes 24-27).
    pub fn cmdsn(&self) -> u32 {
        self.u32_at(24)
    }
}

/// A whole PDU as received.
#[derive(Debug, Clone, Default)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
    /// The data digest did not match (the caller decides, RFC 7143 7.8: Reject and discard).
    pub data_digest_bad: bool,
}

/// Padding after a data segment of `len` bytes (RFC 7143 11.2.3).
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// CRC32C of the concatenated parts (RFC 7143 13.1, 11.2.4: the digest covers the data and
/// its padding; the result is sent in little-endian byte order, as RFC 7143 Appendix B's
/// examples show).
pub fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

/// Framing settings of one direction.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment accepted (receive) or allowed (send).
    pub max_data: u32,
}

/// Parse the fixed parts of a PDU from a complete byte buffer (used by the fuzz entry point and
/// tests). Returns the PDU and the number of bytes it took.
pub fn parse(buf: &[u8], framing: Framing) -> Result<(Pdu, usize), ParseError> {
    let bhs_bytes = buf.get(..BHS_LEN).ok_or(ParseError::Short)?;
    let mut bhs = Bhs::default();
    bhs.0.copy_from_slice(bhs_bytes);
    let mut pos = BHS_LEN;
    let ahs_len = bhs.ahs_len();
    let ahs = buf
        .get(pos..pos + ahs_len)
        .ok_or(ParseError::Short)?
        .to_vec();
    pos += ahs_len;
    if framing.header_digest {
        let d = buf.get(pos..pos + 4).ok_or(ParseError::Short)?;
        if crc(&[&bhs.0, &ahs]) != u32::from_le_bytes([d[0], d[1], d[2], d[3]]) {
            return Err(ParseError::HeaderDigest);
        }
        pos += 4;
    }
    let len = bhs.data_len();
    if len > framing.max_data {
        return Err(ParseError::DataTooLong);
    }
    let len = len as usize;
    let padded = len + pad_len(len);
    let seg = buf.get(pos..pos + padded).ok_or(ParseError::Short)?;
    pos += padded;
    let mut bad = false;
    if framing.data_digest && len > 0 {
        let d = buf.get(pos..pos + 4).ok_or(ParseError::Short)?;
        bad = crc(&[seg]) != u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        pos += 4;
    }
    let data = seg.get(..len).ok_or(ParseError::Short)?.to_vec();
    Ok((
        Pdu {
            bhs,
            ahs,
            data,
            data_digest_bad: bad,
        },
        pos,
    ))
}

/// Errors of [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Buffer ends inside the PDU")]
    Short,
    #[error("Data segment too long")]
    DataTooLong,
    #[error("Header digest mismatch")]
    HeaderDigest,
}

/// Read one PDU. Every length is checked before anything is allocated.
pub async fn read_pdu<R: AsyncRead + Unpin>(r: &mut R, framing: Framing) -> Result<Pdu, PduError> {
    let mut bhs = Bhs::default();
    r.read_exact(&mut bhs.0).await?;
    // TotalAHSLength is one byte of 4-byte words: at most 1020 bytes, no check needed.
    let mut ahs = vec![0; bhs.ahs_len()];
    r.read_exact(&mut ahs).await?;
    if framing.header_digest {
        let mut d = [0; 4];
        r.read_exact(&mut d).await?;
        if crc(&[&bhs.0, &ahs]) != u32::from_le_bytes(d) {
            return Err(PduError::HeaderDigest);
        }
    }
    let len = bhs.data_len();
    if len > framing.max_data {
        return Err(PduError::DataTooLong {
            len,
            max: framing.max_data,
            bhs: Box::new(bhs),
        });
    }
    let len = len as usize;
    let mut data = vec![0; len + pad_len(len)];
    r.read_exact(&mut data).await?;
    let mut bad = false;
    if framing.data_digest && len > 0 {
        let mut d = [0; 4];
        r.read_exact(&mut d).await?;
        bad = crc(&[&data]) != u32::from_le_bytes(d);
    }
    data.truncate(len);
    Ok(Pdu {
        bhs,
        ahs,
        data,
        data_digest_bad: bad,
    })
}

/// Write one PDU (the data length field is set here from `data`).
pub async fn write_pdu<W: AsyncWrite + Unpin>(
    w: &mut W,
    bhs: &mut Bhs,
    data: &[u8],
    framing: Framing,
) -> std::io::Result<()> {
    bhs.set_data_len(data.len() as u32);
    w.write_all(&bhs.0).await?;
    if framing.header_digest {
        w.write_all(&crc(&[&bhs.0]).to_le_bytes()).await?;
    }
    if !data.is_empty() {
        let pad = &[0u8; 3][..pad_len(data.len())];
        w.write_all(data).await?;
        w.write_all(pad).await?;
        if framing.data_digest {
            w.write_all(&crc(&[data, pad]).to_le_bytes()).await?;
        }
    }
    Ok(())
}

/// Decode a SAM-5 LUN structure (RFC 7143 11.2.1.4 carries it as is) into a plain LUN:
/// peripheral device addressing (method 00b) and flat space addressing (01b) of the first
/// level, with no second level (bytes 2-7 zero). Other methods, and LUNs of more levels
/// (SAM-5 4.7.5: another logical unit, which no LU of a target here is), yield a value no LU
/// has, which the SCSI layer reports as such.
pub fn decode_lun(l: [u8; 8]) -> u64 {
    if l[2..] != [0; 6] {
        return u64::MAX;
    }
    match l[0] >> 6 {
        0 if l[0] == 0 => u64::from(l[1]),
        1 => (u64::from(l[0] & 0x3f) << 8) | u64::from(l[1]),
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing() -> Framing {
        Framing {
            header_digest: false,
            data_digest: false,
            max_data: 8192,
        }
    }

    #[test]
    fn scsi_command_bhs_fields() {
        // RFC 7143 11.3: a READ(10) SCSI Command PDU.
        let mut b = [0u8; 48];
        b[0] = 0x01; // opcode SCSI Command, I=0
        b[1] = 0xc1; // F=1 R=1 W=0 ATTR=1 (simple)
        b[4] = 0x00; // TotalAHSLength
        b[5..8].copy_from_slice(&[0x00, 0x00, 0x00]); // DataSegmentLength
        b[8..16].copy_from_slice(&[0x00, 0x02, 0, 0, 0, 0, 0, 0]); // LUN 2
        b[16..20].copy_from_slice(&[0x00, 0x00, 0x00, 0x07]); // ITT
        b[20..24].copy_from_slice(&[0x00, 0x00, 0x10, 0x00]); // EDTL 4096
        b[24..28].copy_from_slice(&[0x00, 0x00, 0x00, 0x05]); // CmdSN
        b[28..32].copy_from_slice(&[0x00, 0x00, 0x00, 0x09]); // ExpStatSN
        b[32] = 0x28; // CDB: READ(10)
        let (pdu, used) = parse(&b, framing()).expect("valid PDU");
        assert_eq!(used, 48);
        assert_eq!(pdu.bhs.opcode(), op::SCSI_CMD);
        assert!(!pdu.bhs.immediate());
        assert!(pdu.bhs.final_bit());
        assert_eq!(pdu.bhs.itt(), 7);
        assert_eq!(pdu.bhs.field20(), 4096);
        assert_eq!(pdu.bhs.cmdsn(), 5);
        assert_eq!(pdu.bhs.u32_at(28), 9); // ExpStatSN
        assert_eq!(decode_lun(pdu.bhs.lun()), 2);
    }

    #[test]
    fn data_segment_is_padded_to_four_bytes() {
        let mut b = vec![0u8; 48];
        b[0] = 0x40; // NOP-Out, immediate
        b[7] = 5; // DataSegmentLength 5
        b.extend_from_slice(b"hello\0\0\0"); // 5 bytes + 3 padding
        let (pdu, used) = parse(&b, framing()).expect("valid PDU");
        assert_eq!(used, 56);
        assert_eq!(pdu.data, b"hello");
    }

    #[test]
    fn oversized_data_segment_is_refused() {
        let mut b = vec![0u8; 48];
        b[5..8].copy_from_slice(&[0x00, 0x20, 0x01]); // 8193 bytes
        assert_eq!(parse(&b, framing()).err(), Some(ParseError::DataTooLong));
    }

    #[test]
    fn ahs_is_counted_in_words() {
        let mut b = vec![0u8; 48];
        b[4] = 2; // TotalAHSLength: 2 words = 8 bytes
        b.extend_from_slice(&[0, 5, 0x01, 0, 1, 2, 3, 4]);
        let (pdu, used) = parse(&b, framing()).expect("valid PDU");
        assert_eq!(used, 56);
        assert_eq!(pdu.ahs.len(), 8);
    }

    #[test]
    fn crc32c_matches_rfc_3720_vector() {
        // RFC 3720 B.4: 32 bytes of zeros give the CRC bytes aa 36 91 8a on the wire.
        assert_eq!(crc(&[&[0u8; 32]]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    }

    #[test]
    fn lun_encodings() {
        assert_eq!(decode_lun([0x00, 0x05, 0, 0, 0, 0, 0, 0]), 5); // peripheral
        assert_eq!(decode_lun([0x41, 0x02, 0, 0, 0, 0, 0, 0]), 0x102); // flat space
        assert_eq!(decode_lun([0x80, 0x01, 0, 0, 0, 0, 0, 0]), u64::MAX); // LUN addressing

        // A second level (bytes 2-3) or any later byte set: a different logical unit (SAM-5
        // 4.7.5), not LUN 1 or 0.
        assert_eq!(decode_lun([0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0]), u64::MAX);
        assert_eq!(decode_lun([0x00, 0x00, 0, 0, 0, 0, 0, 0x01]), u64::MAX);
        assert_eq!(decode_lun([0x40, 0x00, 0x40, 0x01, 0, 0, 0, 0]), u64::MAX);
    }
}
