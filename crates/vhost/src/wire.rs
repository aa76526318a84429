//! virtio-scsi wire formats (virtio 1.2, 5.6): the device configuration layout, request and
//! response headers, and the LUN addressing of the `lun` field.
//!
//! Every structure is little-endian and packed as the specification draws it; they are built
//! and parsed here byte by byte, so nothing depends on the host's layout rules.

pub use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN, VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_S_ABORTED, VIRTIO_SCSI_S_ACA, VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_S_HEAD, VIRTIO_SCSI_S_INCORRECT_LUN, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_ORDERED,
    VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_S_RESET, VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_EVENTS_MISSED, VIRTIO_SCSI_T_NO_EVENT, VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA, VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, VIRTIO_SCSI_T_TRANSPORT_RESET,
};

/// Task management: the function completed (virtio 5.6.6.2; 0, the value of
/// VIRTIO_SCSI_S_OK, which the bindings do not repeat under this name).
pub const VIRTIO_SCSI_S_FUNCTION_COMPLETE: u32 = 0;

/// Default (and initial) CDB size in the request header (virtio 5.6.4: `cdb_size`).
pub const CDB_SIZE: u32 = 32;
/// Default (and initial) sense buffer size in the response header (`sense_size`).
pub const SENSE_SIZE: u32 = 96;
/// Largest CDB size a driver may configure: 260 bytes, the longest CDB SPC-5 allows
/// (variable-length CDBs, 4.2.4).
pub const MAX_CDB_SIZE: u32 = 260;
/// Largest sense size a driver may configure: 252 bytes, the longest sense data SPC-5 allows
/// (4.4.1).
pub const MAX_SENSE_SIZE: u32 = 252;

/// `virtio_scsi_cmd_req` without the CDB: lun (8), id (8), task_attr, prio, crn.
pub const CMD_REQ_FIXED: u32 = 19;
/// `virtio_scsi_cmd_resp` without the sense buffer: sense_len (4), resid (4),
/// status_qualifier (2), status, response.
pub const CMD_RESP_FIXED: u32 = 12;
/// `virtio_scsi_ctrl_tmf_req`: type, subtype, lun, id.
pub const TMF_REQ: u32 = 24;
/// `virtio_scsi_ctrl_tmf_resp`: response.
pub const TMF_RESP: u32 = 1;
/// `virtio_scsi_ctrl_an_req`: type, lun, event_requested.
pub const AN_REQ: u32 = 16;
/// `virtio_scsi_ctrl_an_resp` (packed): event_actual, response.
pub const AN_RESP: u32 = 5;
/// `virtio_scsi_event`: event, lun, reason.
pub const EVENT_SIZE: u32 = 16;
/// `virtio_scsi_config`: nine little-endian fields, 36 bytes.
pub const CONFIG_SIZE: usize = 36;
/// Offset of `sense_size` in the configuration space (driver-writable).
pub const CONFIG_SENSE_SIZE: usize = 20;
/// Offset of `cdb_size` in the configuration space (driver-writable).
pub const CONFIG_CDB_SIZE: usize = 24;

/// The device configuration space (virtio 5.6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub num_queues: u32,
    pub seg_max: u32,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub event_info_size: u32,
    pub sense_size: u32,
    pub cdb_size: u32,
    pub max_channel: u16,
    pub max_target: u16,
    pub max_lun: u32,
}

impl Config {
    pub fn to_bytes(self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let words = [
            self.num_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            self.event_info_size,
            self.sense_size,
            self.cdb_size,
        ];
        for (chunk, w) in b.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        b[28..30].copy_from_slice(&self.max_channel.to_le_bytes());
        b[30..32].copy_from_slice(&self.max_target.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_lun.to_le_bytes());
        b
    }
}

/// Where a virtio-scsi `lun` field points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address {
    /// Byte 0 is not 1: no such target (the driver gets VIRTIO_SCSI_S_BAD_TARGET).
    BadTarget,
    /// Target `.0`; `.1` is the LUN, or `None` when bytes 2-7 are not a single-level LUN in
    /// peripheral or flat space addressing (no logical unit can answer there).
    Lun(u8, Option<u64>),
}

/// Decode the 8-byte `lun` field (virtio 5.6.6.1): byte 0 is 1, byte 1 the target, bytes 2-3
/// a single-level SAM LUN (SAM-5 4.7.6: peripheral device addressing 00b with bus 0, or flat
/// space addressing 01b), bytes 4-7 zero.
pub fn decode_lun(l: [u8; 8]) -> Address {
    let [one, target, b2, b3, rest @ ..] = l;
    if one != 1 {
        return Address::BadTarget;
    }
    if rest != [0; 4] {
        return Address::Lun(target, None);
    }
    let lun = match b2 >> 6 {
        0b00 if b2 == 0 => Some(u64::from(b3)),
        0b01 => Some((u64::from(b2 & 0x3F) << 8) | u64::from(b3)),
        _ => None,
    };
    Address::Lun(target, lun)
}

/// The `lun` field for target `target`, LUN `lun` (flat space addressing, as Linux sends it).
pub fn encode_lun(target: u8, lun: u16) -> [u8; 8] {
    let [hi, lo] = (lun & 0x3FFF).to_be_bytes();
    [1, target, 0x40 | hi, lo, 0, 0, 0, 0]
}

/// The `lun` field of an event about target `target`, LUN `lun`: the LUN as REPORT LUNS lists
/// it (peripheral device addressing below 256, flat space addressing above; SAM-5 4.7.7).
/// Linux takes `(lun[2] << 8) | lun[3]` as the number of the LUN to add or remove, the
/// number its REPORT LUNS scan gives the same LUN, so a flat address below 256 would make it
/// add LUN 1 as LUN 16385 (QEMU and Linux's vhost-scsi encode events this way too).
pub fn event_lun(target: u8, lun: u16) -> [u8; 8] {
    let [hi, lo] = (lun & 0x3FFF).to_be_bytes();
    let b2 = if lun < 256 { 0 } else { 0x40 | hi };
    [1, target, b2, lo, 0, 0, 0, 0]
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

fn lun_at(b: &[u8], at: usize) -> [u8; 8] {
    let mut l = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        l.copy_from_slice(s);
    }
    l
}

/// `virtio_scsi_cmd_req`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdReq {
    pub lun: [u8; 8],
    pub tag: u64,
    pub task_attr: u8,
    pub cdb: Vec<u8>,
}

impl CmdReq {
    /// Parse a header of `CMD_REQ_FIXED + cdb_size` bytes (shorter input reads as zeros; the
    /// caller checks the length).
    pub fn parse(b: &[u8]) -> CmdReq {
        CmdReq {
            lun: lun_at(b, 0),
            tag: le64(b, 8),
            task_attr: b.get(16).copied().unwrap_or(0),
            cdb: b.get(CMD_REQ_FIXED as usize..).unwrap_or(&[]).to_vec(),
        }
    }
}

/// `virtio_scsi_cmd_resp` with its sense buffer of `sense_size` bytes: the sense data is
/// truncated to `sense_size` and `sense_len` says how much of it there is.
pub fn cmd_resp(response: u8, status: u8, resid: u32, sense: &[u8], sense_size: u32) -> Vec<u8> {
    let size = sense_size as usize;
    let mut b = vec![0u8; CMD_RESP_FIXED as usize + size];
    let n = sense.len().min(size);
    b[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    b[4..8].copy_from_slice(&resid.to_le_bytes());
    // status_qualifier (8..10) stays 0.
    b[10] = status;
    b[11] = response;
    if let (Some(dst), Some(src)) = (b.get_mut(12..12 + n), sense.get(..n)) {
        dst.copy_from_slice(src);
    }
    b
}

/// The control queue request type (the first 4 bytes of every control request).
pub fn ctrl_type(b: &[u8]) -> u32 {
    le32(b, 0)
}

/// `virtio_scsi_ctrl_tmf_req`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfReq {
    pub subtype: u32,
    pub lun: [u8; 8],
    pub tag: u64,
}

impl TmfReq {
    pub fn parse(b: &[u8]) -> TmfReq {
        TmfReq {
            subtype: le32(b, 4),
            lun: lun_at(b, 8),
            tag: le64(b, 16),
        }
    }
}

/// `virtio_scsi_ctrl_an_req`'s LUN.
pub fn an_lun(b: &[u8]) -> [u8; 8] {
    lun_at(b, 4)
}

/// `virtio_scsi_ctrl_an_resp`.
pub fn an_resp(event_actual: u32, response: u8) -> [u8; AN_RESP as usize] {
    let [a, b, c, d] = event_actual.to_le_bytes();
    [a, b, c, d, response]
}

/// `virtio_scsi_event`.
pub fn event(event: u32, lun: [u8; 8], reason: u32) -> [u8; EVENT_SIZE as usize] {
    let mut b = [0u8; EVENT_SIZE as usize];
    b[0..4].copy_from_slice(&event.to_le_bytes());
    b[4..12].copy_from_slice(&lun);
    b[12..16].copy_from_slice(&reason.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_addressing() {
        // Linux virtio_scsi: lun[0] = 1, lun[1] = target, lun[2] = (lun >> 8) | 0x40,
        // lun[3] = lun & 0xff (flat space addressing, SAM-5 4.7.7.4).
        assert_eq!(
            decode_lun([1, 0, 0x40, 0, 0, 0, 0, 0]),
            Address::Lun(0, Some(0))
        );
        assert_eq!(
            decode_lun([1, 3, 0x41, 0x02, 0, 0, 0, 0]),
            Address::Lun(3, Some(0x102))
        );
        // Peripheral device addressing, bus 0 (SAM-5 4.7.7.2).
        assert_eq!(
            decode_lun([1, 0, 0x00, 0x05, 0, 0, 0, 0]),
            Address::Lun(0, Some(5))
        );
        // Peripheral addressing with a bus identifier, logical unit addressing, a second
        // level: no logical unit.
        assert_eq!(
            decode_lun([1, 0, 0x01, 0x05, 0, 0, 0, 0]),
            Address::Lun(0, None)
        );
        assert_eq!(
            decode_lun([1, 0, 0x80, 0x05, 0, 0, 0, 0]),
            Address::Lun(0, None)
        );
        assert_eq!(
            decode_lun([1, 0, 0x40, 0x05, 0, 1, 0, 0]),
            Address::Lun(0, None)
        );
        assert_eq!(decode_lun([0, 0, 0x40, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(encode_lun(2, 0x123), [1, 2, 0x41, 0x23, 0, 0, 0, 0]);
    }

    #[test]
    fn event_lun_is_the_report_luns_address() {
        // LUN 1: peripheral device addressing, bus 0 (SAM-5 4.7.7.2): 00h 01h.
        assert_eq!(event_lun(0, 1), [1, 0, 0x00, 0x01, 0, 0, 0, 0]);
        // LUN 255, the last one peripheral addressing reaches: 00h FFh.
        assert_eq!(event_lun(3, 255), [1, 3, 0x00, 0xFF, 0, 0, 0, 0]);
        // LUN 256 and up: flat space addressing (SAM-5 4.7.7.4): 01b in the top bits.
        assert_eq!(event_lun(0, 256), [1, 0, 0x41, 0x00, 0, 0, 0, 0]);
        assert_eq!(event_lun(2, 0x3FFF), [1, 2, 0x7F, 0xFF, 0, 0, 0, 0]);
        // Each decodes to the LUN it names.
        for lun in [0u16, 1, 255, 256, 0x3FFF] {
            assert_eq!(
                decode_lun(event_lun(1, lun)),
                Address::Lun(1, Some(u64::from(lun)))
            );
        }
    }

    #[test]
    fn config_layout() {
        // virtio 5.6.4: le32 num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size,
        // sense_size, cdb_size; le16 max_channel, max_target; le32 max_lun.
        let c = Config {
            num_queues: 2,
            seg_max: 126,
            max_sectors: 0x4000,
            cmd_per_lun: 128,
            event_info_size: 16,
            sense_size: 96,
            cdb_size: 32,
            max_channel: 0,
            max_target: 1,
            max_lun: 0x3FFF,
        };
        assert_eq!(
            c.to_bytes(),
            [
                2, 0, 0, 0, 126, 0, 0, 0, 0, 0x40, 0, 0, 128, 0, 0, 0, 16, 0, 0, 0, 96, 0, 0, 0,
                32, 0, 0, 0, 0, 0, 1, 0, 0xFF, 0x3F, 0, 0
            ]
        );
    }

    #[test]
    fn response_truncates_sense() {
        let sense = [0x70u8; 20];
        let r = cmd_resp(0, 0x02, 7, &sense, 8);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[0..12], &[8, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0x02, 0]);
        assert_eq!(&r[12..], &[0x70; 8]);
    }
}
