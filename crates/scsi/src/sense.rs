//! Sense data (SPC-5 4.4): one [`Sense`] value, encoded in fixed format (response code 70h,
//! SPC-5 4.4.3) or descriptor format (72h, SPC-5 4.4.2) depending on the control mode page's
//! D_SENSE bit or REQUEST SENSE's DESC bit.
//!
//! Descriptor format carries the INFORMATION descriptor (type 00h) and the SENSE KEY SPECIFIC
//! descriptor (type 02h); fixed format carries the same values at bytes 3..7 and 15..18.

/// Sense keys (SPC-5 4.4.8, table 52).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0B;
    pub const MISCOMPARE: u8 = 0x0E;
}

/// One sense condition: key, additional sense code and qualifier, optional INFORMATION and
/// SENSE KEY SPECIFIC data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (VALID set when present).
    pub info: Option<u64>,
    /// The three SENSE KEY SPECIFIC bytes, SKSV (bit 7 of the first) included.
    pub sks: Option<[u8; 3]>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            sks: None,
        }
    }

    /// INVALID FIELD IN CDB (24h/00h) with a field pointer to `byte`, `bit` of the CDB
    /// (SPC-5 4.4.2.4.2: SKSV=1, C/D=1, BPV=1).
    pub const fn invalid_field_in_cdb(byte: u16, bit: u8) -> Self {
        Self::field_pointer(0x24, 0x00, true, byte, Some(bit))
    }

    /// INVALID FIELD IN PARAMETER LIST (26h/00h) with a field pointer into the parameter data
    /// (C/D=0).
    pub const fn invalid_field_in_param(byte: u16, bit: Option<u8>) -> Self {
        Self::field_pointer(0x26, 0x00, false, byte, bit)
    }

    /// An ILLEGAL REQUEST with a field pointer (SPC-5 4.4.2.4.2).
    pub const fn field_pointer(asc: u8, ascq: u8, cdb: bool, byte: u16, bit: Option<u8>) -> Self {
        let mut b0 = 0x80; // SKSV
        if cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x07); // BPV, BIT POINTER
        }
        let fp = byte.to_be_bytes();
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc,
            ascq,
            info: None,
            sks: Some([b0, fp[0], fp[1]]),
        }
    }

    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    /// The sense key, ASC and ASCQ of encoded sense data, fixed (70h/71h) or descriptor
    /// (72h/73h) format (SPC-5 4.4).
    pub(crate) fn code_of(sense: &[u8]) -> Option<(u8, u8, u8)> {
        let b = |i: usize| sense.get(i).copied();
        match b(0)? & 0x7F {
            0x70 | 0x71 => Some((b(2)? & 0x0F, b(12)?, b(13)?)),
            0x72 | 0x73 => Some((b(1)? & 0x0F, b(2)?, b(3)?)),
            _ => None,
        }
    }

    /// Encode as fixed (`descriptor == false`) or descriptor format sense data.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut s = vec![0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                // SPC-5 4.4.2.2 information sense data descriptor.
                s.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
                s.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sks {
                // SPC-5 4.4.2.4 sense key specific sense data descriptor.
                s.extend_from_slice(&[0x02, 0x06, 0x00, 0x00, sks[0], sks[1], sks[2], 0x00]);
            }
            s[7] = (s.len() - 8) as u8;
            s
        } else {
            let mut s = vec![0u8; 18];
            s[0] = 0x70;
            s[2] = self.key & 0x0F;
            if let Some(info) = self.info {
                // The fixed format INFORMATION field has four bytes; VALID only if it fits.
                if let Ok(v) = u32::try_from(info) {
                    s[0] |= 0x80;
                    s[3..7].copy_from_slice(&v.to_be_bytes());
                }
            }
            s[7] = 10;
            s[12] = self.asc;
            s[13] = self.ascq;
            if let Some(sks) = self.sks {
                s[15..18].copy_from_slice(&sks);
            }
            s
        }
    }
}

/// Commonly used conditions (ASC/ASCQ from SPC-5 table F.2).
pub mod cond {
    use super::{key, Sense};

    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    pub const INVALID_FIELD_IN_PARAM: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// A command with the ACA task attribute while no ACA condition exists.
    pub const INVALID_MESSAGE_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x49, 0x00);
    pub const INVALID_FIELD_IN_CMD_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03);
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOC_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1D, 0x00);
    pub const POWER_ON_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    pub const IT_NEXUS_LOSS: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x01);
    pub const CAPACITY_DATA_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x09);
    pub const COMMANDS_CLEARED_BY_ANOTHER: Sense = Sense::new(key::UNIT_ATTENTION, 0x2F, 0x00);
    pub const REPORTED_LUNS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x3F, 0x0E);
    pub const OVERLAPPED_COMMANDS: Sense = Sense::new(key::ABORTED_COMMAND, 0x4E, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    // Persistent reservations (SPC-5 5.14).
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x05);
    pub const INVALID_RELEASE_OF_PR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
}
