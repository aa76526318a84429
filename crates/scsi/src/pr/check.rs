//! The persistent reservation check on every command (SPC-5 5.14.3, DESIGN.md §4).
//!
//! Which commands conflict is decided from the opcode table's reservation class
//! ([`crate::cdb::ResvClass`]), one column pattern per row of SPC-5 table 67 ("SPC commands that
//! are allowed in the presence of various reservations") and of the SBC-4 4.17 table ("SBC
//! commands that are allowed in the presence of various reservations"), and from SPC-5's table
//! of PERSISTENT RESERVE OUT service actions allowed in the presence of various reservations.
//!
//! Both tables describe a reservation held by *another* I_T nexus: the holder (for All
//! Registrants types, every registered I_T nexus) may send everything. For the others:
//!
//! | class | Write Exclusive | Exclusive Access | registered (RO/AR types) | not registered, WE RO/AR | not registered, EA RO/AR |
//! |---|---|---|---|---|---|
//! | unrestricted, allowed | A | A | A | A | A |
//! | read | A | C | A | A | C |
//! | write | C | C | A | C | C |
//!
//! A registration gives no access under the Write Exclusive and Exclusive Access types; it is
//! what the Registrants Only and All Registrants types look at.
//!
//! Registrations without a reservation restrict nothing here: which PERSISTENT RESERVE OUT
//! service actions an unregistered I_T nexus may send then is the service action's own rule
//! ([`super::out`]). SPC-2 reservations are [`super::spc2`]'s.
//!
//! While the persistent reservation information is lost ([`PrState::lost`]), [`lost_allows`]
//! comes first: the few commands SPC-5 lets through run (and REPLACE LOST RESERVATION is never
//! a RESERVATION CONFLICT then), every other one is CHECK CONDITION with
//! [`super::INFORMATION_LOST`].

use super::PrState;
use crate::cdb::{Access, OpInfo};
use crate::ItNexus;

/// Whether `nexus` may run the command of table row `info` (and CDB `cdb`) under the persistent
/// reservation state `state`; `false` means RESERVATION CONFLICT.
///
/// On the hot path: no allocation, and no look-up of the nexus unless a reservation exists and
/// the command is one that can conflict.
pub fn allowed(state: &PrState, nexus: &ItNexus, info: &OpInfo, cdb: &[u8]) -> bool {
    let Some(resv) = &state.reservation else {
        return true;
    };
    let access = info.resv.access(cdb);
    if matches!(
        access,
        Access::Unrestricted | Access::Allowed | Access::Spc2
    ) {
        return true;
    }
    if state.is_holder(nexus) {
        return true;
    }
    let registered = state.registration(nexus).is_some();
    match access {
        Access::Unrestricted | Access::Allowed | Access::Spc2 => true,
        Access::Read => {
            (resv.ty.registrants_have_access() && registered) || !resv.ty.exclusive_access()
        }
        Access::Write => resv.ty.registrants_have_access() && registered,
        Access::PrOut(sa) => pr_out_allowed(sa, registered),
    }
}

/// While [`PrState::lost`]: whether the command of table row `info` (and CDB `cdb`) still runs.
/// `false` means CHECK CONDITION, DATA PROTECT, PERSISTENT RESERVATION INFORMATION LOST.
///
/// SPC-5 5.13.5.3.2 b) (clause numbers of the SPC-5 draft at hand, "Recoverable loss of
/// persistent reservation information"): every command is terminated except A) PERSISTENT
/// RESERVE OUT with REPLACE LOST RESERVATION and B) the commands of 5.13.5.2 ("Nonvolatile
/// memory considerations"): INQUIRY, LOG SENSE, READ BUFFER, REPORT LUNS, REPORT TARGET PORT
/// GROUPS, REQUEST SENSE, START STOP UNIT with the START bit one and the POWER CONDITION field
/// 0h, and WRITE BUFFER. PERSISTENT RESERVE IN and TEST UNIT READY are not among them. (Rows
/// this logical unit does not have never get here: they fail as unsupported first.)
pub fn lost_allows(info: &OpInfo, cdb: &[u8]) -> bool {
    let byte4 = cdb.get(4).copied().unwrap_or(0);
    match (info.opcode, info.sa) {
        // REQUEST SENSE, INQUIRY, WRITE BUFFER, READ BUFFER, LOG SENSE, REPORT LUNS.
        (0x03 | 0x12 | 0x3B | 0x3C | 0x4D | 0xA0, _) => true,
        // REPORT TARGET PORT GROUPS: MAINTENANCE IN, service action 0Ah.
        (0xA3, Some(0x0A)) => true,
        // START STOP UNIT (SBC-4): POWER CONDITION is byte 4 bits 7..4, START bit 0.
        (0x1B, _) => byte4 & 0xF0 == 0 && byte4 & 0x01 != 0,
        // PERSISTENT RESERVE OUT, REPLACE LOST RESERVATION.
        (0x5F, Some(0x08)) => true,
        _ => false,
    }
}

/// SPC-5's table of PERSISTENT RESERVE OUT service actions allowed in the presence of various
/// reservations, for an I_T nexus that does not hold the reservation (the same for every type).
fn pr_out_allowed(sa: u8, registered: bool) -> bool {
    match sa {
        // REGISTER, REGISTER AND IGNORE EXISTING KEY: allowed from every I_T nexus.
        0x00 | 0x06 => true,
        // RELEASE (GOOD without effect from a registered non-holder), CLEAR,
        // PREEMPT, PREEMPT AND ABORT, REPLACE LOST RESERVATION: allowed from a registered
        // I_T nexus, conflict otherwise. (REPLACE LOST RESERVATION while the information is
        // lost never gets here: see `lost_allows` and the table's note b.)
        0x02 | 0x03 | 0x04 | 0x05 | 0x08 => registered,
        // RESERVE (another nexus holds the reservation), REGISTER AND MOVE (only the holder
        // may move it): conflict.
        _ => false,
    }
}
