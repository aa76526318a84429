//! The opcode table and the CDB parser.
//!
//! One table ([`OPS`]) lists every supported command: operation code, service action, CDB usage
//! data (SPC-5 6.36.3: the CDB length and, per bit, whether the device server uses it), data
//! direction and reservation class. The same table drives
//! - parsing: a CDB bit that the usage data marks unused (reserved, or a field this device does
//!   not support, such as RDPROTECT) is rejected with INVALID FIELD IN CDB and a field pointer to
//!   that bit (SPC-5 4.4.2.4.2), so the reserved-bit checks can never disagree with what
//!   REPORT SUPPORTED OPERATION CODES reports;
//! - REPORT SUPPORTED OPERATION CODES;
//! - the per-command reservation check (DESIGN.md §4), through [`OpInfo::resv`].
//!
//! The CDB is copied into a fixed 32-byte array before parsing, so every field access below is a
//! constant index into that array and cannot panic whatever the initiator sends.

use crate::sense::{cond, Sense};

/// Direction of the data transfer of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    In,
    Out,
}

/// How a command relates to reservations: which column pattern of SPC-5 5.14.3 table 67 ("SPC
/// commands that are allowed in the presence of various reservations") or of the SBC-4 4.17
/// table ("SBC commands that are allowed in the presence of various reservations") its row has.
///
/// Both tables have the same columns: the persistent reservation is held by another I_T nexus
/// and is Write Exclusive, or Exclusive Access (from any I_T nexus); or it is of a Registrants
/// Only or All Registrants type and the command comes from a registered I_T nexus, or from one
/// that is not registered (Write Exclusive forms, Exclusive Access forms). A = allowed,
/// C = conflict. [`crate::pr::check`] turns the class into the answer; [`crate::pr::spc2`] uses
/// it for SPC-2 reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResvClass {
    /// A A A A A, and allowed under an SPC-2 reservation held by another I_T nexus too (SPC-2
    /// 5.5.1): INQUIRY, REPORT LUNS, REQUEST SENSE.
    Unrestricted,
    /// A A A A A under persistent reservations, but conflicts with an SPC-2 reservation held by
    /// another I_T nexus: TEST UNIT READY, READ CAPACITY, PERSISTENT RESERVE IN.
    Allowed,
    /// A C A A C: reads the medium or the device's data (READ, VERIFY, MODE SENSE, …).
    Read,
    /// C C A C C: changes the medium or the LU's state (WRITE, UNMAP, MODE SELECT, …).
    Write,
    /// PREVENT ALLOW MEDIUM REMOVAL (SBC-4 4.17): [`ResvClass::Unrestricted`] with PREVENT 00b,
    /// [`ResvClass::Write`] otherwise.
    PreventAllow,
    /// START STOP UNIT (SBC-4 4.17): [`ResvClass::Allowed`] with START 1 and POWER CONDITION 0h,
    /// [`ResvClass::Write`] otherwise.
    StartStop,
    /// PERSISTENT RESERVE OUT: by service action, from SPC-5's table of PERSISTENT RESERVE OUT
    /// service actions allowed in the presence of various reservations.
    PrOut,
    /// RESERVE(6/10) and RELEASE(6/10): never a conflict at the check; [`crate::pr::spc2`]
    /// decides (SPC-5 5.13.3, CRH = 1).
    Spc2,
}

/// What a command's [`ResvClass`] comes to once its CDB fields are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// See [`ResvClass::Unrestricted`].
    Unrestricted,
    /// See [`ResvClass::Allowed`].
    Allowed,
    /// See [`ResvClass::Read`].
    Read,
    /// See [`ResvClass::Write`].
    Write,
    /// PERSISTENT RESERVE OUT with this service action.
    PrOut(u8),
    /// See [`ResvClass::Spc2`].
    Spc2,
}

impl ResvClass {
    /// The access of a command of this class with this CDB (only the fields the SBC-4 table
    /// names are read; a short CDB reads as zeros there, and never panics).
    pub fn access(self, cdb: &[u8]) -> Access {
        let byte = |i: usize| cdb.get(i).copied().unwrap_or(0);
        match self {
            ResvClass::Unrestricted => Access::Unrestricted,
            ResvClass::Allowed => Access::Allowed,
            ResvClass::Read => Access::Read,
            ResvClass::Write => Access::Write,
            // SBC-4 PREVENT ALLOW MEDIUM REMOVAL: PREVENT is byte 4 bits 1..0.
            ResvClass::PreventAllow if byte(4) & 0x03 == 0 => Access::Unrestricted,
            ResvClass::PreventAllow => Access::Write,
            // SBC-4 START STOP UNIT: POWER CONDITION is byte 4 bits 7..4, START bit 0.
            ResvClass::StartStop if byte(4) & 0xF0 == 0 && byte(4) & 0x01 != 0 => Access::Allowed,
            ResvClass::StartStop => Access::Write,
            ResvClass::PrOut => Access::PrOut(byte(1) & 0x1F),
            ResvClass::Spc2 => Access::Spc2,
        }
    }
}

/// One row of the opcode table.
#[derive(Debug)]
pub struct OpInfo {
    pub opcode: u8,
    /// The service action, for operation codes that have them.
    pub sa: Option<u8>,
    pub name: &'static str,
    /// CDB USAGE DATA (SPC-5 6.36.3); its length is the CDB length.
    pub usage: &'static [u8],
    pub dir: DataDir,
    pub resv: ResvClass,
}

impl OpInfo {
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }
}

const fn op(
    opcode: u8,
    sa: Option<u8>,
    name: &'static str,
    usage: &'static [u8],
    dir: DataDir,
    resv: ResvClass,
) -> OpInfo {
    OpInfo {
        opcode,
        sa,
        name,
        usage,
        dir,
        resv,
    }
}

use DataDir::{In, None as NoData, Out};
use ResvClass::{
    Allowed, PrOut, PreventAllow, Read as RRead, Spc2, StartStop, Unrestricted, Write as RWrite,
};

const FF: u8 = 0xFF;

/// Every supported command, sorted by operation code and service action.
pub static OPS: &[OpInfo] = &[
    op(
        0x00,
        None,
        "TEST UNIT READY",
        &[0x00, 0, 0, 0, 0, 0],
        NoData,
        // SPC-5 table 67: allowed under every persistent reservation type (path checkers rely
        // on it); SPC-2 5.5.1: conflicts with another I_T nexus's SPC-2 reservation.
        Allowed,
    ),
    op(
        0x03,
        None,
        "REQUEST SENSE",
        &[0x03, 0x01, 0, 0, FF, 0],
        In,
        Unrestricted,
    ),
    op(
        0x08,
        None,
        "READ(6)",
        &[0x08, 0x1F, FF, FF, FF, 0],
        In,
        RRead,
    ),
    op(
        0x0A,
        None,
        "WRITE(6)",
        &[0x0A, 0x1F, FF, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x12,
        None,
        "INQUIRY",
        &[0x12, 0x01, FF, FF, FF, 0],
        In,
        Unrestricted,
    ),
    op(
        0x15,
        None,
        "MODE SELECT(6)",
        &[0x15, 0x10, 0, 0, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x16,
        None,
        "RESERVE(6)",
        // SPC-2 RESERVE(6): bytes 1..4 are obsolete (the SCSI-2 third-party and extent forms,
        // which this device does not support).
        &[0x16, 0, 0, 0, 0, 0],
        NoData,
        Spc2,
    ),
    op(
        0x17,
        None,
        "RELEASE(6)",
        // SPC-2 RELEASE(6): bytes 1..4 are obsolete.
        &[0x17, 0, 0, 0, 0, 0],
        NoData,
        Spc2,
    ),
    op(
        0x1A,
        None,
        "MODE SENSE(6)",
        &[0x1A, 0x08, FF, FF, FF, 0],
        In,
        RRead,
    ),
    op(
        0x1B,
        None,
        "START STOP UNIT",
        &[0x1B, 0x01, 0, 0x0F, 0xF7, 0],
        NoData,
        StartStop,
    ),
    op(
        0x1E,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        &[0x1E, 0, 0, 0, 0x03, 0],
        NoData,
        PreventAllow,
    ),
    op(
        0x25,
        None,
        "READ CAPACITY(10)",
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        In,
        // SBC-4 4.17: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x28,
        None,
        "READ(10)",
        &[0x28, 0x18, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        In,
        RRead,
    ),
    op(
        0x2A,
        None,
        "WRITE(10)",
        &[0x2A, 0x18, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x2E,
        None,
        "WRITE AND VERIFY(10)",
        &[0x2E, 0x16, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x2F,
        None,
        "VERIFY(10)",
        &[0x2F, 0x16, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        Out,
        RRead,
    ),
    op(
        0x34,
        None,
        "PRE-FETCH(10)",
        &[0x34, 0x02, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        NoData,
        RRead,
    ),
    op(
        0x35,
        None,
        "SYNCHRONIZE CACHE(10)",
        &[0x35, 0x02, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        NoData,
        RWrite,
    ),
    op(
        0x41,
        None,
        "WRITE SAME(10)",
        // ANCHOR is not supported (ANC_SUP = 0): left out, so it is refused as invalid.
        &[0x41, 0x08, FF, FF, FF, FF, 0x1F, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x42,
        None,
        "UNMAP",
        &[0x42, 0x00, 0, 0, 0, 0, 0x1F, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x55,
        None,
        "MODE SELECT(10)",
        &[0x55, 0x10, 0, 0, 0, 0, 0, FF, FF, 0],
        Out,
        RWrite,
    ),
    op(
        0x56,
        None,
        "RESERVE(10)",
        // SPC-2 RESERVE(10): 3RDPTY (byte 1 bit 4) is not supported, so left out: 3RDPTY=1 is
        // INVALID FIELD IN CDB. With 3RDPTY zero the LONGID bit (byte 1 bit 1) and PARAMETER
        // LIST LENGTH (bytes 7..8) "shall be ignored": accepted, and no parameter data is
        // taken. Byte 1 bit 0 and byte 2 are obsolete; byte 3 (THIRD-PARTY DEVICE ID) belongs
        // to the unsupported third-party form.
        &[0x56, 0x02, 0, 0, 0, 0, 0, FF, FF, 0],
        NoData,
        Spc2,
    ),
    op(
        0x57,
        None,
        "RELEASE(10)",
        // SPC-2 RELEASE(10): as RESERVE(10).
        &[0x57, 0x02, 0, 0, 0, 0, 0, FF, FF, 0],
        NoData,
        Spc2,
    ),
    op(
        0x5A,
        None,
        "MODE SENSE(10)",
        &[0x5A, 0x18, FF, FF, 0, 0, 0, FF, FF, 0],
        In,
        RRead,
    ),
    op(
        0x5E,
        Some(0x00),
        "PERSISTENT RESERVE IN",
        // SPC-5 6.16.1: SERVICE ACTION (byte 1 bits 4..0), ALLOCATION LENGTH (bytes 7..8);
        // READ KEYS.
        &[0x5E, 0x00, 0, 0, 0, 0, 0, FF, FF, 0],
        In,
        // SPC-5 table 67: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x5E,
        Some(0x01),
        "PERSISTENT RESERVE IN",
        // SPC-5 6.16.1: SERVICE ACTION (byte 1 bits 4..0), ALLOCATION LENGTH (bytes 7..8);
        // READ RESERVATION.
        &[0x5E, 0x01, 0, 0, 0, 0, 0, FF, FF, 0],
        In,
        // SPC-5 table 67: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x5E,
        Some(0x02),
        "PERSISTENT RESERVE IN",
        // SPC-5 6.16.1: SERVICE ACTION (byte 1 bits 4..0), ALLOCATION LENGTH (bytes 7..8);
        // REPORT CAPABILITIES.
        &[0x5E, 0x02, 0, 0, 0, 0, 0, FF, FF, 0],
        In,
        // SPC-5 table 67: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x5E,
        Some(0x03),
        "PERSISTENT RESERVE IN",
        // SPC-5 6.16.1: SERVICE ACTION (byte 1 bits 4..0), ALLOCATION LENGTH (bytes 7..8);
        // READ FULL STATUS.
        &[0x5E, 0x03, 0, 0, 0, 0, 0, FF, FF, 0],
        In,
        // SPC-5 table 67: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x5F,
        Some(0x00),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); REGISTER.
        &[0x5F, 0x00, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x01),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); RESERVE.
        &[0x5F, 0x01, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x02),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); RELEASE.
        &[0x5F, 0x02, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x03),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); CLEAR.
        &[0x5F, 0x03, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x04),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); PREEMPT.
        &[0x5F, 0x04, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x05),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); PREEMPT AND ABORT.
        &[0x5F, 0x05, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x06),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); REGISTER AND IGNORE EXISTING KEY.
        &[0x5F, 0x06, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x07),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); REGISTER AND MOVE.
        &[0x5F, 0x07, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x5F,
        Some(0x08),
        "PERSISTENT RESERVE OUT",
        // SPC-5 6.17.1: SERVICE ACTION, SCOPE and TYPE (byte 2), PARAMETER LIST LENGTH (bytes
        // 5..8); REPLACE LOST RESERVATION.
        &[0x5F, 0x08, FF, 0, 0, FF, FF, FF, FF, 0],
        Out,
        PrOut,
    ),
    op(
        0x88,
        None,
        "READ(16)",
        &[
            0x88, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        In,
        RRead,
    ),
    op(
        0x89,
        None,
        "COMPARE AND WRITE",
        &[
            0x89, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0x1F, 0,
        ],
        Out,
        RWrite,
    ),
    op(
        0x8A,
        None,
        "WRITE(16)",
        &[
            0x8A, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        Out,
        RWrite,
    ),
    op(
        0x8B,
        None,
        "ORWRITE(16)",
        &[
            0x8B, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        Out,
        RWrite,
    ),
    op(
        0x8E,
        None,
        "WRITE AND VERIFY(16)",
        &[
            0x8E, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        Out,
        RWrite,
    ),
    op(
        0x8F,
        None,
        "VERIFY(16)",
        &[
            0x8F, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        Out,
        RRead,
    ),
    op(
        0x90,
        None,
        "PRE-FETCH(16)",
        &[
            0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        NoData,
        RRead,
    ),
    op(
        0x91,
        None,
        "SYNCHRONIZE CACHE(16)",
        &[
            0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        NoData,
        RWrite,
    ),
    op(
        0x93,
        None,
        "WRITE SAME(16)",
        &[
            0x93, 0x09, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
        ],
        Out,
        RWrite,
    ),
    op(
        0x9E,
        Some(0x10),
        "READ CAPACITY(16)",
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        In,
        // SBC-4 4.17: allowed under every persistent reservation type.
        Allowed,
    ),
    op(
        0x9E,
        Some(0x12),
        "GET LBA STATUS(16)",
        &[
            0x9E, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
        ],
        In,
        RRead,
    ),
    op(
        0xA0,
        None,
        "REPORT LUNS",
        &[0xA0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        In,
        Unrestricted,
    ),
    op(
        0xA3,
        Some(0x0C),
        "REPORT SUPPORTED OPERATION CODES",
        &[0xA3, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        In,
        // SPC-5 table 67: A C A A C (conflicts where reads do).
        RRead,
    ),
    op(
        0xA3,
        Some(0x0D),
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        &[0xA3, 0x0D, 0x80, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        In,
        // SPC-5 table 67: A C A A C.
        RRead,
    ),
    op(
        0xA8,
        None,
        "READ(12)",
        &[0xA8, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
        In,
        RRead,
    ),
    op(
        0xAA,
        None,
        "WRITE(12)",
        &[0xAA, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
        Out,
        RWrite,
    ),
    op(
        0xAE,
        None,
        "WRITE AND VERIFY(12)",
        &[0xAE, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
        Out,
        RWrite,
    ),
    op(
        0xAF,
        None,
        "VERIFY(12)",
        &[0xAF, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
        Out,
        RRead,
    ),
];

/// Whether `opcode` has service actions (its table rows carry one).
pub fn has_service_actions(opcode: u8) -> bool {
    OPS.iter().any(|o| o.opcode == opcode && o.sa.is_some())
}

/// The table row for `opcode` (and `sa` when the opcode has service actions).
pub fn lookup(opcode: u8, sa: u8) -> Option<&'static OpInfo> {
    OPS.iter()
        .find(|o| o.opcode == opcode && o.sa.is_none_or(|s| s == sa))
}

/// A parsed CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cdb {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        len: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    StartStopUnit,
    PreventAllow,
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// WRITE AND VERIFY; `bytchk` 0 or 1.
    WriteVerify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    /// VERIFY; `bytchk` 0 (no data-out), 1 (compare `blocks`) or 3 (compare one block with each).
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        ten: bool,
    },
    Unmap {
        anchor: bool,
        len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// ORWRITE(16) (SBC-4 5.15): OR the data-out into the blocks.
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    Rsoc {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    Rstmf {
        repd: bool,
        alloc: u32,
    },
    /// PERSISTENT RESERVE IN (SPC-5 6.16): service action 00h..03h.
    PersistentReserveIn {
        sa: u8,
        alloc: u16,
    },
    /// PERSISTENT RESERVE OUT (SPC-5 6.17): service action 00h..08h, SCOPE (byte 2 bits 7..4),
    /// TYPE (byte 2 bits 3..0), PARAMETER LIST LENGTH.
    PersistentReserveOut {
        sa: u8,
        scope: u8,
        ty: u8,
        param_len: u32,
    },
    /// RESERVE(6) or RESERVE(10) of the whole logical unit (SPC-2).
    Reserve,
    /// RELEASE(6) or RELEASE(10) (SPC-2).
    Release,
}

/// A CDB copied into a fixed-size buffer; accessors take constant indexes.
struct Raw([u8; 32]);

impl Raw {
    fn new(cdb: &[u8]) -> Self {
        let mut b = [0u8; 32];
        for (d, s) in b.iter_mut().zip(cdb) {
            *d = *s;
        }
        Raw(b)
    }
    fn b(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.b(i), self.b(i + 1)])
    }
    fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.b(i), self.b(i + 1), self.b(i + 2), self.b(i + 3)])
    }
    fn be64(&self, i: usize) -> u64 {
        (u64::from(self.be32(i)) << 32) | u64::from(self.be32(i + 4))
    }
    fn bit(&self, i: usize, mask: u8) -> bool {
        self.b(i) & mask != 0
    }
}

/// Bits of CDB byte `i` of `opcode` that are accepted and ignored: FUA_NV (byte 1 bit 1) of
/// READ and WRITE (10/12/16) and COMPARE AND WRITE, and SYNC_NV (byte 1 bit 2) of SYNCHRONIZE
/// CACHE (10/16). SBC-3 made both obsolete; initiators written to older revisions still set
/// them, and a write cache that is never non-volatile has nothing for them to select. Their
/// CDB USAGE DATA bits stay zero, as SPC-5 6.36.3 asks for a bit the device server ignores.
fn ignored(opcode: u8, i: usize) -> u8 {
    match (opcode, i) {
        (0x28 | 0x2A | 0xA8 | 0xAA | 0x88 | 0x8A | 0x89, 1) => 0x02,
        (0x35 | 0x91, 1) => 0x04,
        _ => 0,
    }
}

/// Find the table row for `cdb` and check its length and reserved bits.
pub fn classify(cdb: &[u8]) -> Result<&'static OpInfo, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(cond::INVALID_OPCODE);
    };
    let sa = cdb.get(1).copied().unwrap_or(0) & 0x1F;
    let Some(info) = lookup(opcode, sa) else {
        if has_service_actions(opcode) {
            // SPC-5 4.2.5.1: an unsupported service action is an invalid field at its position.
            return Err(Sense::invalid_field_in_cdb(1, 4));
        }
        return Err(cond::INVALID_OPCODE);
    };
    if cdb.len() < info.cdb_len() {
        return Err(cond::INVALID_FIELD_IN_CDB);
    }
    for (i, (&byte, &usage)) in cdb.iter().zip(info.usage).enumerate().skip(1) {
        let allowed = if i == 1 && info.sa.is_some() {
            usage | 0x1F
        } else {
            usage | ignored(info.opcode, i)
        };
        let bad = byte & !allowed;
        if bad != 0 {
            let bit = 7 - bad.leading_zeros() as u8;
            return Err(Sense::invalid_field_in_cdb(i as u16, bit));
        }
    }
    Ok(info)
}

/// Parse `cdb` into a typed command.
pub fn parse(cdb: &[u8]) -> Result<(&'static OpInfo, Cdb), Sense> {
    let info = classify(cdb)?;
    let r = Raw::new(cdb);
    let c = match (info.opcode, info.sa) {
        (0x00, _) => Cdb::TestUnitReady,
        (0x03, _) => Cdb::RequestSense {
            desc: r.bit(1, 0x01),
            alloc: u32::from(r.b(4)),
        },
        (0x12, _) => {
            let evpd = r.bit(1, 0x01);
            if !evpd && r.b(2) != 0 {
                // SPC-5 6.7.1: PAGE CODE must be zero when EVPD is zero.
                return Err(Sense::invalid_field_in_cdb(2, 7));
            }
            Cdb::Inquiry {
                evpd,
                page: r.b(2),
                alloc: u32::from(r.be16(3)),
            }
        }
        (0x15 | 0x55, _) => {
            let ten = info.opcode == 0x55;
            let len = if ten {
                u32::from(r.be16(7))
            } else {
                u32::from(r.b(4))
            };
            // SPC-5 6.11: with PF zero the pages after the header are vendor specific; this
            // device has none, so a list in that format is refused (as LIO does) rather than
            // read as the standard pages.
            if !r.bit(1, 0x10) && len != 0 {
                return Err(Sense::invalid_field_in_cdb(1, 4));
            }
            Cdb::ModeSelect { ten, len }
        }
        (0x1A, _) => Cdb::ModeSense {
            ten: false,
            dbd: r.bit(1, 0x08),
            llbaa: false,
            pc: r.b(2) >> 6,
            page: r.b(2) & 0x3F,
            subpage: r.b(3),
            alloc: u32::from(r.b(4)),
        },
        (0x5A, _) => Cdb::ModeSense {
            ten: true,
            dbd: r.bit(1, 0x08),
            llbaa: r.bit(1, 0x10),
            pc: r.b(2) >> 6,
            page: r.b(2) & 0x3F,
            subpage: r.b(3),
            alloc: u32::from(r.be16(7)),
        },
        (0x1B, _) => Cdb::StartStopUnit,
        (0x1E, _) => Cdb::PreventAllow,
        (0x25, _) => Cdb::ReadCapacity10,
        (0x9E, Some(0x10)) => Cdb::ReadCapacity16 { alloc: r.be32(10) },
        (0x9E, _) => Cdb::GetLbaStatus {
            lba: r.be64(2),
            alloc: r.be32(10),
        },
        (0x08, _) => Cdb::Read {
            lba: u64::from(u32::from_be_bytes([0, r.b(1) & 0x1F, r.b(2), r.b(3)])),
            blocks: six_len(r.b(4)),
            fua: false,
        },
        (0x0A, _) => Cdb::Write {
            lba: u64::from(u32::from_be_bytes([0, r.b(1) & 0x1F, r.b(2), r.b(3)])),
            blocks: six_len(r.b(4)),
            fua: false,
        },
        (0x28 | 0xA8 | 0x88, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::Read {
                lba,
                blocks,
                fua: r.bit(1, 0x08),
            }
        }
        (0x2A | 0xAA | 0x8A, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::Write {
                lba,
                blocks,
                fua: r.bit(1, 0x08),
            }
        }
        (0x2E | 0xAE | 0x8E, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            let bytchk = (r.b(1) >> 1) & 0x03;
            if bytchk > 1 {
                // SBC-4 5.46: BYTCHK 10b and 11b are reserved for WRITE AND VERIFY.
                return Err(Sense::invalid_field_in_cdb(1, 2));
            }
            Cdb::WriteVerify {
                lba,
                blocks,
                bytchk,
            }
        }
        (0x2F | 0xAF | 0x8F, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            let bytchk = (r.b(1) >> 1) & 0x03;
            if bytchk == 2 {
                // SBC-4 5.40 table 117: BYTCHK 10b is reserved.
                return Err(Sense::invalid_field_in_cdb(1, 2));
            }
            Cdb::Verify {
                lba,
                blocks,
                bytchk,
            }
        }
        (0x34 | 0x90, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::PreFetch { lba, blocks }
        }
        (0x35 | 0x91, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::SyncCache { lba, blocks }
        }
        (0x41 | 0x93, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::WriteSame {
                lba,
                blocks,
                anchor: r.bit(1, 0x10),
                unmap: r.bit(1, 0x08),
                ndob: info.opcode == 0x93 && r.bit(1, 0x01),
                ten: info.opcode == 0x41,
            }
        }
        (0x42, _) => Cdb::Unmap {
            anchor: r.bit(1, 0x01),
            len: u32::from(r.be16(7)),
        },
        (0x8B, _) => {
            let (lba, blocks) = lba_len(&r, info.opcode);
            Cdb::OrWrite {
                lba,
                blocks,
                fua: r.bit(1, 0x08),
            }
        }
        (0x89, _) => Cdb::CompareAndWrite {
            lba: r.be64(2),
            blocks: u32::from(r.b(13)),
            fua: r.bit(1, 0x08),
        },
        (0xA0, _) => Cdb::ReportLuns {
            select: r.b(2),
            alloc: r.be32(6),
        },
        (0xA3, Some(0x0C)) => Cdb::Rsoc {
            rctd: r.bit(2, 0x80),
            options: r.b(2) & 0x07,
            opcode: r.b(3),
            sa: r.be16(4),
            alloc: r.be32(6),
        },
        (0xA3, _) => Cdb::Rstmf {
            repd: r.bit(2, 0x80),
            alloc: r.be32(6),
        },
        (0x5E, Some(sa)) => Cdb::PersistentReserveIn {
            sa,
            alloc: r.be16(7),
        },
        (0x5F, Some(sa)) => Cdb::PersistentReserveOut {
            sa,
            scope: r.b(2) >> 4,
            ty: r.b(2) & 0x0F,
            param_len: r.be32(5),
        },
        (0x16 | 0x56, _) => Cdb::Reserve,
        (0x17 | 0x57, _) => Cdb::Release,
        _ => return Err(cond::INVALID_OPCODE),
    };
    Ok((info, c))
}

/// READ(6)/WRITE(6): a TRANSFER LENGTH of 0 means 256 blocks (SBC-4 5.17).
fn six_len(b: u8) -> u32 {
    if b == 0 {
        256
    } else {
        u32::from(b)
    }
}

/// LBA and TRANSFER LENGTH of the 10-, 12- and 16-byte READ/WRITE-shaped CDBs.
fn lba_len(r: &Raw, opcode: u8) -> (u64, u32) {
    match opcode >> 5 {
        // Group 1 (10-byte): LBA at 2..6, length at 7..9.
        1 | 2 => (u64::from(r.be32(2)), u32::from(r.be16(7))),
        // Group 5 (12-byte): LBA at 2..6, length at 6..10.
        5 => (u64::from(r.be32(2)), r.be32(6)),
        // Group 4 (16-byte): LBA at 2..10, length at 10..14.
        _ => (r.be64(2), r.be32(10)),
    }
}

/// The number of data-out bytes `cdb` asks for, computed from the raw fields (no validation),
/// for transports' residual accounting. 0 for commands without data-out.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> u32 {
    let r = Raw::new(cdb);
    let blocks = |n: u32| n.saturating_mul(block_size);
    let Some(&opcode) = cdb.first() else {
        return 0;
    };
    match opcode {
        0x0A => blocks(six_len(r.b(4))),
        0x2A | 0xAA | 0x8A | 0x2E | 0xAE | 0x8E => blocks(lba_len(&r, opcode).1),
        0x2F | 0xAF | 0x8F => match (r.b(1) >> 1) & 0x03 {
            1 => blocks(lba_len(&r, opcode).1),
            3 => block_size,
            _ => 0,
        },
        0x89 => blocks(u32::from(r.b(13))).saturating_mul(2),
        0x8B => blocks(r.be32(10)),
        0x41 => block_size,
        0x93 => {
            if r.bit(1, 0x01) {
                0
            } else {
                block_size
            }
        }
        0x42 | 0x55 => u32::from(r.be16(7)),
        0x15 => u32::from(r.b(4)),
        // SPC-5 6.17.1: PARAMETER LIST LENGTH.
        0x5F => r.be32(5),
        _ => 0,
    }
}

/// The number of bytes of medium data a READ (6/10/12/16) `cdb` asks for, computed from the
/// raw fields (no validation), so a transport can refuse one its buffers cannot hold before
/// anything is read. 0 for every other command.
pub fn read_len(cdb: &[u8], block_size: u32) -> u64 {
    let r = Raw::new(cdb);
    let blocks = match cdb.first() {
        Some(0x08) => six_len(r.b(4)),
        Some(&opcode @ (0x28 | 0xA8 | 0x88)) => lba_len(&r, opcode).1,
        _ => 0,
    };
    u64::from(blocks) * u64::from(block_size)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_its_opcode_and_service_action_in_the_usage_data() {
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(op.usage.first(), Some(&op.opcode), "{}", op.name);
            if let Some(sa) = op.sa {
                assert_eq!(op.usage.get(1).map(|b| b & 0x1F), Some(sa), "{}", op.name);
            }
            assert!(matches!(op.usage.len(), 6 | 10 | 12 | 16), "{}", op.name);
            // Sorted and unique, as REPORT SUPPORTED OPERATION CODES lists them.
            if let Some(prev) = i.checked_sub(1).and_then(|j| OPS.get(j)) {
                assert!((prev.opcode, prev.sa) < (op.opcode, op.sa), "{}", op.name);
            }
        }
    }

    #[test]
    fn a_cdb_of_the_usage_data_itself_parses() {
        // The usage data sets every bit the device server accepts, so it must parse (except
        // where field values are checked, which a usage pattern of all ones may trip).
        for op in OPS {
            let r = classify(op.usage);
            assert!(r.is_ok(), "{}: {:?}", op.name, r);
        }
    }

    #[test]
    fn persistent_reserve_in_read_full_status() {
        // SPC-5 6.16.1: 5Eh, SERVICE ACTION 03h, ALLOCATION LENGTH 0102h.
        let (_, c) = parse(&[0x5E, 0x03, 0, 0, 0, 0, 0, 0x01, 0x02, 0]).unwrap();
        assert_eq!(
            c,
            Cdb::PersistentReserveIn {
                sa: 3,
                alloc: 0x0102
            }
        );
    }

    /// The fixed format sense data (SPC-5 4.4.3) that `parse` rejects `cdb` with.
    fn sense_of(cdb: &[u8]) -> Vec<u8> {
        match parse(cdb) {
            Ok((info, _)) => panic!("{cdb:02x?} parsed as {}", info.name),
            Err(sense) => sense.encode(false),
        }
    }

    /// Fixed format sense data (SPC-5 4.4.3), 18 bytes: byte 0 RESPONSE CODE 70h
    /// (current, VALID 0), byte 2 SENSE KEY 5h (ILLEGAL REQUEST), byte 7 ADDITIONAL SENSE
    /// LENGTH 0Ah, bytes 12..13 ASC/ASCQ, bytes 15..17 SENSE KEY SPECIFIC. For a field pointer
    /// (SPC-5 4.4.2.4.2) byte 15 is SKSV (80h) | C/D (40h, the error is in the CDB)
    /// | BPV (08h) | BIT POINTER (bits 2..0), bytes 16..17 the FIELD POINTER (the CDB byte).
    fn illegal_request(asc: u8, ascq: u8, sks: [u8; 3]) -> Vec<u8> {
        let [s0, s1, s2] = sks;
        vec![
            0x70, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00, asc, ascq,
            0x00, s0, s1, s2,
        ]
    }

    #[test]
    fn persistent_reserve_in_service_actions_04h_and_up_are_invalid_field_in_cdb() {
        // SPC-5 4.2.5.1: an unsupported service action is INVALID FIELD IN CDB (24h/00h);
        // field pointer byte 1, bit 4 (the service action's top bit): CCh = SKSV|C/D|BPV|4.
        for sa in 0x04..=0x1F {
            assert_eq!(
                sense_of(&[0x5E, sa, 0, 0, 0, 0, 0, 0, 0x10, 0]),
                illegal_request(0x24, 0x00, [0xCC, 0x00, 0x01]),
                "service action {sa:02x}"
            );
        }
    }

    #[test]
    fn persistent_reserve_in_reserved_bits_have_field_pointers() {
        // INVALID FIELD IN CDB (24h/00h) at byte 1 bit 5 (reserved above the service action):
        // CDh = SKSV|C/D|BPV|5.
        assert_eq!(
            sense_of(&[0x5E, 0x20, 0, 0, 0, 0, 0, 0, 0x10, 0]),
            illegal_request(0x24, 0x00, [0xCD, 0x00, 0x01])
        );
        // Byte 2 bit 0: C8h = SKSV|C/D|BPV|0.
        assert_eq!(
            sense_of(&[0x5E, 0x00, 0x01, 0, 0, 0, 0, 0, 0x10, 0]),
            illegal_request(0x24, 0x00, [0xC8, 0x00, 0x02])
        );
        // Byte 6 bit 7: CFh = SKSV|C/D|BPV|7.
        assert_eq!(
            sense_of(&[0x5E, 0x00, 0, 0, 0, 0, 0x80, 0, 0x10, 0]),
            illegal_request(0x24, 0x00, [0xCF, 0x00, 0x06])
        );
    }

    #[test]
    fn persistent_reserve_out_reserve_fields() {
        // SPC-5 6.17.1: 5Fh, RESERVE (01h), SCOPE 0h / TYPE 5h, PARAMETER LIST LENGTH 24.
        let cdb = [0x5F, 0x01, 0x05, 0, 0, 0, 0, 0, 0x18, 0];
        let (info, c) = parse(&cdb).unwrap();
        assert_eq!(
            c,
            Cdb::PersistentReserveOut {
                sa: 1,
                scope: 0,
                ty: 5,
                param_len: 24
            }
        );
        assert_eq!(info.dir, DataDir::Out);
        assert_eq!(data_out_len(&cdb, 512), 24);
    }

    #[test]
    fn persistent_reserve_out_scope_type_and_a_four_byte_length() {
        // Byte 2 = 21h: SCOPE 2h, TYPE 1h (values are checked by the service action, not
        // here); PARAMETER LIST LENGTH 01020304h in bytes 5..8.
        let cdb = [0x5F, 0x07, 0x21, 0, 0, 0x01, 0x02, 0x03, 0x04, 0];
        let (_, c) = parse(&cdb).unwrap();
        assert_eq!(
            c,
            Cdb::PersistentReserveOut {
                sa: 7,
                scope: 2,
                ty: 1,
                param_len: 0x0102_0304
            }
        );
        assert_eq!(data_out_len(&cdb, 4096), 0x0102_0304);
    }

    #[test]
    fn persistent_reserve_out_service_actions_09h_and_up_and_reserved_bytes() {
        // SPC-5 6.17.1: service action 09h is unsupported: INVALID FIELD IN CDB (24h/00h),
        // byte 1 bit 4 (CCh = SKSV|C/D|BPV|4).
        assert_eq!(
            sense_of(&[0x5F, 0x09, 0, 0, 0, 0, 0, 0, 0x18, 0]),
            illegal_request(0x24, 0x00, [0xCC, 0x00, 0x01])
        );
        // Bytes 3..4 are reserved: byte 3 bit 2 (CAh), byte 4 bit 0 (C8h).
        assert_eq!(
            sense_of(&[0x5F, 0x00, 0, 0x04, 0, 0, 0, 0, 0x18, 0]),
            illegal_request(0x24, 0x00, [0xCA, 0x00, 0x03])
        );
        assert_eq!(
            sense_of(&[0x5F, 0x00, 0, 0, 0x01, 0, 0, 0, 0x18, 0]),
            illegal_request(0x24, 0x00, [0xC8, 0x00, 0x04])
        );
    }

    #[test]
    fn reserve_and_release_6() {
        assert_eq!(parse(&[0x16, 0, 0, 0, 0, 0]).unwrap().1, Cdb::Reserve);
        assert_eq!(parse(&[0x17, 0, 0, 0, 0, 0]).unwrap().1, Cdb::Release);
        // SPC-2 RESERVE(6): byte 1 is obsolete (SCSI-2's 3RDPTY at bit 4, EXTENT at bit 0):
        // INVALID FIELD IN CDB (24h/00h), byte 1 bit 4 (CCh = SKSV|C/D|BPV|4) and bit 0 (C8h).
        assert_eq!(
            sense_of(&[0x16, 0x10, 0, 0, 0, 0]),
            illegal_request(0x24, 0x00, [0xCC, 0x00, 0x01])
        );
        assert_eq!(
            sense_of(&[0x17, 0x01, 0, 0, 0, 0]),
            illegal_request(0x24, 0x00, [0xC8, 0x00, 0x01])
        );
        assert_eq!(data_out_len(&[0x16, 0, 0, 0, 0, 0], 512), 0);
    }

    #[test]
    fn reserve_and_release_10_third_party_is_invalid_field_in_cdb() {
        // SPC-2 RESERVE(10) / RELEASE(10): 3RDPTY is byte 1 bit 4: INVALID FIELD IN CDB
        // (24h/00h), CCh = SKSV|C/D|BPV|4, field pointer 0001h.
        assert_eq!(
            sense_of(&[0x56, 0x10, 0, 0x07, 0, 0, 0, 0, 0, 0]),
            illegal_request(0x24, 0x00, [0xCC, 0x00, 0x01])
        );
        assert_eq!(
            sense_of(&[0x57, 0x10, 0, 0x07, 0, 0, 0, 0, 0, 0]),
            illegal_request(0x24, 0x00, [0xCC, 0x00, 0x01])
        );
        // THIRD-PARTY DEVICE ID (byte 3) belongs to the third-party form: 07h's highest set
        // bit, byte 3 bit 2 (CAh).
        assert_eq!(
            sense_of(&[0x56, 0, 0, 0x07, 0, 0, 0, 0, 0, 0]),
            illegal_request(0x24, 0x00, [0xCA, 0x00, 0x03])
        );
    }

    #[test]
    fn reserve_10_without_third_party_ignores_longid_and_parameter_list_length() {
        // SPC-2 RESERVE(10): with 3RDPTY zero, LONGID and PARAMETER LIST LENGTH are ignored.
        let cdb = [0x56, 0x02, 0, 0, 0, 0, 0, 0x00, 0x08, 0];
        assert_eq!(parse(&cdb).unwrap().1, Cdb::Reserve);
        assert_eq!(data_out_len(&cdb, 512), 0);
        let cdb = [0x57, 0x02, 0, 0, 0, 0, 0, 0x00, 0x08, 0];
        assert_eq!(parse(&cdb).unwrap().1, Cdb::Release);
    }

    #[test]
    fn short_cdb_is_invalid_field_in_cdb() {
        // READ(10) cut to 3 bytes: INVALID FIELD IN CDB (24h/00h), no field pointer (SKSV 0).
        assert_eq!(
            classify(&[0x28, 0, 0]).err().map(|s| s.encode(false)),
            Some(illegal_request(0x24, 0x00, [0x00, 0x00, 0x00]))
        );
        // No CDB at all: INVALID COMMAND OPERATION CODE (20h/00h).
        assert_eq!(
            classify(&[]).err().map(|s| s.encode(false)),
            Some(illegal_request(0x20, 0x00, [0x00, 0x00, 0x00]))
        );
    }
}
