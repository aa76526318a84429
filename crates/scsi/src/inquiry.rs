//! INQUIRY data (SPC-5 6.7) and the vital product data pages (SPC-5 7.7, SBC-4 6.6), plus the
//! device limits that VPD 0xB0 advertises and the command handlers enforce.
//!
//! The limits live in one place ([`Limits`]) so what is advertised is what is checked.

use block::Capabilities;

use crate::nexus::{ItNexus, Transport};
use crate::sense::Sense;
use crate::LuConfig;

/// The limits advertised in the Block Limits VPD page (SBC-4 6.6.4) and enforced by the
/// command handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per logical block.
    pub block_size: u32,
    /// Logical blocks per physical block exponent (READ CAPACITY(16) LBPPBE).
    pub lbppbe: u8,
    /// MAXIMUM TRANSFER LENGTH, in blocks.
    pub max_transfer: u32,
    /// OPTIMAL TRANSFER LENGTH, in blocks.
    pub opt_transfer: u32,
    /// MAXIMUM COMPARE AND WRITE LENGTH, in blocks (1..=255).
    pub max_caw: u8,
    /// MAXIMUM UNMAP LBA COUNT (0 when not thin).
    pub max_unmap_lbas: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (0 when not thin).
    pub max_unmap_descriptors: u32,
    /// MAXIMUM WRITE SAME LENGTH, in blocks.
    pub max_write_same: u64,
    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP deallocate.
    pub thin: bool,
    /// Deallocated blocks read as zeros.
    pub lbprz: bool,
    /// OPTIMAL UNMAP GRANULARITY, in blocks: the backend's allocation unit (an unmap of less
    /// reads back as zeros but may stay mapped).
    pub unmap_granularity: u32,
}

impl Limits {
    /// Data buffers are capped at 8 MiB per command.
    const MAX_TRANSFER_BYTES: u32 = 8 << 20;

    pub fn new(block_size: u32, caps: Capabilities) -> Self {
        let block_size = block_size.max(1);
        let max_transfer = (Self::MAX_TRANSFER_BYTES / block_size).max(1);
        // By default 4 KiB physical blocks ("512e" for 512-byte LUs): initiators then align
        // their I/O to the page-sized unit the backing stores allocate in.
        // `LogicalUnit::with_physical_block_size` chooses otherwise per LU.
        let lbppbe = if block_size < 4096 {
            (4096 / block_size).trailing_zeros() as u8
        } else {
            0
        };
        let max_caw = caps
            .max_compare_and_write_blocks
            .min(255)
            .min(max_transfer)
            .max(1) as u8;
        Limits {
            block_size,
            lbppbe,
            max_transfer,
            opt_transfer: ((256 << 10) / block_size).max(1),
            max_caw,
            max_unmap_lbas: if caps.thin { 1 << 20 } else { 0 },
            max_unmap_descriptors: if caps.thin { 256 } else { 0 },
            // 0xFFFF as LIO advertises: WRITE SAME(10) cannot express more, and libiscsi
            // pairs a larger value with a single 32 MiB WRITE.
            max_write_same: 0xFFFF,
            thin: caps.thin,
            lbprz: caps.thin && caps.unmapped_reads_zero,
            unmap_granularity: 1,
        }
    }

    pub fn lbppb(&self) -> u32 {
        1u32 << self.lbppbe
    }
}

/// SPC-5 7.7 VPD pages this device returns, in ascending order.
pub const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2];

/// Version descriptors (SPC-5 table 32): SAM-5, SPC-4, SBC-3, SPC-5, SBC-4 and the transport.
fn version_descriptors(t: Transport) -> [u16; 6] {
    let transport = match t {
        Transport::Iscsi => 0x0960, // iSCSI (no version claimed)
        Transport::Vhost => 0x0C00, // SAS (no version claimed)
    };
    [0x00A0, 0x0460, 0x04C0, 0x05C0, 0x0600, transport]
}

/// Copy `s` into `dst`, space padded, keeping only printable ASCII (SPC-5 4.3.1).
fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst
        .iter_mut()
        .zip(s.bytes().filter(|c| (0x20..0x7F).contains(c)))
    {
        *d = c;
    }
}

/// Standard INQUIRY data (SPC-5 6.7.2), 96 bytes.
pub fn standard(cfg: &LuConfig, nexus: &ItNexus) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // PERIPHERAL QUALIFIER 000b, DEVICE TYPE 00h (direct access block)
    d[2] = 0x06; // VERSION: SPC-4 (libiscsi and older initiators reject newer values)
    d[3] = 0x12; // HISUP, RESPONSE DATA FORMAT 2
    d[4] = 91; // ADDITIONAL LENGTH
    d[6] = 0x10; // MULTIP: the LU may be reached through several target ports
    d[7] = 0x02; // CMDQUE
    ascii(&mut d[8..16], &cfg.vendor);
    ascii(&mut d[16..32], &cfg.product);
    ascii(&mut d[32..36], &cfg.revision);
    for (i, v) in version_descriptors(nexus.initiator.transport)
        .iter()
        .enumerate()
    {
        let at = 58 + 2 * i;
        d[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data for a LUN that does not exist (SPC-5 4.5.3): qualifier 011b.
pub fn no_lun() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x7F;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    d
}

/// The NAA designator made from the LU id: NAA 3h, locally assigned (SPC-5 7.7.6.6.4). It
/// holds the id's low 60 bits ([`naa_bits`]).
pub fn naa(id: u64) -> [u8; 8] {
    ((0x3u64 << 60) | naa_bits(id)).to_be_bytes()
}

/// The part of an LU id its NAA designator holds: two ids that agree in it name the same LU
/// to every initiator.
pub fn naa_bits(id: u64) -> u64 {
    id & 0x0FFF_FFFF_FFFF_FFFF
}

/// A VPD page, or INVALID FIELD IN CDB for a page this device does not have.
pub fn vpd(
    page: u8,
    cfg: &LuConfig,
    nexus: &ItNexus,
    limits: &Limits,
    capacity: u64,
) -> Result<Vec<u8>, Sense> {
    let mut d = vec![0u8, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&VPD_PAGES),
        0x80 => {
            let mut s = vec![0u8; cfg.serial.len().min(252)];
            ascii(&mut s, &cfg.serial);
            d.extend_from_slice(&s);
        }
        0x83 => device_identification(&mut d, cfg, nexus),
        0x86 => {
            // SPC-5 7.7.7 Extended INQUIRY Data, page length 3Ch.
            let mut p = [0u8; 60];
            p[1] = 0x07; // HEADSUP, ORDSUP, SIMPSUP: every task attribute but ACA (order.rs)
            p[2] = 0x01; // V_SUP: volatile cache, flushed by SYNCHRONIZE CACHE
            p[3] = 0x01; // LUICLR
            d.extend_from_slice(&p);
        }
        0xB0 => {
            // SBC-4 6.6.4 Block Limits, page length 3Ch.
            let mut p = [0u8; 60];
            p[1] = limits.max_caw;
            let gran = u16::try_from(limits.lbppb()).unwrap_or(1);
            p[2..4].copy_from_slice(&gran.to_be_bytes());
            p[4..8].copy_from_slice(&limits.max_transfer.to_be_bytes());
            p[8..12].copy_from_slice(&limits.opt_transfer.to_be_bytes());
            // MAXIMUM PREFETCH LENGTH stays 0 (no limit): PRE-FETCH only checks the range.
            p[16..20].copy_from_slice(&limits.max_unmap_lbas.to_be_bytes());
            p[20..24].copy_from_slice(&limits.max_unmap_descriptors.to_be_bytes());
            if limits.thin {
                p[24..28].copy_from_slice(&limits.unmap_granularity.to_be_bytes());
            }
            p[32..40].copy_from_slice(&limits.max_write_same.to_be_bytes());
            d.extend_from_slice(&p);
        }
        0xB1 => {
            // SBC-4 6.6.2 Block Device Characteristics: MEDIUM ROTATION RATE 1 = non-rotating;
            // VBULS (byte 8 bit 0): VERIFY with a byte check compares an unmapped LBA as the
            // zeros it reads as (LBPRZ), rather than failing with MISCOMPARE VERIFY OF
            // UNMAPPED LBA, which VBULS=0 would require.
            let mut p = [0u8; 60];
            p[1] = 0x01;
            p[4] = 0x01;
            d.extend_from_slice(&p);
        }
        0xB2 => {
            // SBC-4 6.6.6 Logical Block Provisioning, page length 4.
            let mut b5 = 0u8;
            if limits.thin {
                b5 |= 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
            }
            if limits.lbprz {
                b5 |= 0x04; // LBPRZ 001b
            }
            let ptype = if limits.thin { 0x02 } else { 0x00 }; // thin / full
            d.extend_from_slice(&[0x00, b5, ptype, 0x00]);
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, 7)),
    }
    let _ = capacity;
    let len = u16::try_from(d.len() - 4).unwrap_or(u16::MAX);
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(d)
}

/// SPC-5 7.7.6 Device Identification VPD page designators.
fn device_identification(d: &mut Vec<u8>, cfg: &LuConfig, nexus: &ItNexus) {
    let proto = match nexus.initiator.transport {
        Transport::Iscsi => 0x5, // iSCSI
        Transport::Vhost => 0x6, // SAS
    };
    // NAA, binary, associated with the LU.
    d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    d.extend_from_slice(&naa(cfg.id));
    // T10 vendor ID based, ASCII: vendor (8) + serial.
    let mut t10 = vec![0u8; 8];
    ascii(&mut t10, &cfg.vendor);
    let mut serial = vec![0u8; cfg.serial.len().min(200)];
    ascii(&mut serial, &cfg.serial);
    t10.extend_from_slice(&serial);
    d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    d.extend_from_slice(&t10);
    // Relative target port, PIV=1, associated with the target port.
    let rel = nexus.target.relative_id.to_be_bytes();
    d.extend_from_slice(&[(proto << 4) | 0x01, 0x94, 0x00, 0x04, 0, 0, rel[0], rel[1]]);
    // SCSI name string of the target port and of the target device (UTF-8, null terminated,
    // padded to a multiple of 4: SPC-5 7.7.6.11).
    let port = nexus.target.port_name();
    name_string(d, proto, 0x98, &port);
    name_string(d, proto, 0xA8, &nexus.target.name);
}

fn name_string(d: &mut Vec<u8>, proto: u8, assoc_type: u8, name: &str) {
    let mut s: Vec<u8> = name.bytes().take(251).collect();
    s.push(0);
    while s.len() & 3 != 0 {
        s.push(0);
    }
    d.extend_from_slice(&[(proto << 4) | 0x03, assoc_type, 0x00, s.len() as u8]);
    d.extend_from_slice(&s);
}
