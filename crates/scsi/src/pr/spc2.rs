//! SPC-2 reservations: RESERVE(6/10) and RELEASE(6/10) of the whole logical unit (SPC-2
//! RESERVE and RELEASE), and how they meet persistent reservations (SPC-5 5.13.3 with CRH = 1, SPC-2 5.5.1).
//!
//! The logical unit keeps the holder (one I_T nexus, or none) outside [`super::PrState`]: an
//! SPC-2 reservation is not persistent. It releases it on LOGICAL UNIT RESET, on a target
//! reset (which resets every LU), on I_T nexus loss of the holder (iSCSI logout, a session
//! that ends, I_T NEXUS RESET) and at power on (SAM-5 6.3; libiscsi's Reserve6 tests).
//!
//! - [`reserve`] and [`release`] run RESERVE and RELEASE.
//! - [`allowed`] is the check for every command while an SPC-2 reservation is held, in place
//!   of [`super::check::allowed`] (no persistent reservation can exist meanwhile: PERSISTENT
//!   RESERVE OUT conflicts, and RESERVE conflicts while there are registrations).

use super::out::Refusal;
use super::PrState;
use crate::cdb::{Access, OpInfo};
use crate::ItNexus;

/// What RESERVE or RELEASE did; every outcome is GOOD status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spc2Outcome {
    /// The sending I_T nexus now holds the SPC-2 reservation (there was none).
    Reserved,
    /// The SPC-2 reservation the sending I_T nexus held is released.
    Released,
    /// Nothing changed: RESERVE by the holder again, RELEASE when the nexus holds nothing,
    /// or RESERVE/RELEASE from a persistent reservation holder or a registrant of a Registrants
    /// Only / All Registrants reservation (SPC-5 5.13.3).
    NoChange,
}

/// SPC-5 5.13.3 (CRH = 1): RESERVE and RELEASE complete with GOOD status and change nothing
/// when sent through
/// a) an I_T nexus that is a persistent reservation holder, or
/// b) a registered I_T nexus while a Registrants Only or All Registrants type persistent
///    reservation is present.
fn crh_exempt(pr: &PrState, nexus: &ItNexus) -> bool {
    match &pr.reservation {
        None => false,
        Some(r) => {
            pr.is_holder(nexus)
                || (r.ty.registrants_have_access() && pr.registration(nexus).is_some())
        }
    }
}

/// RESERVE(6) or RESERVE(10) from `nexus`, while `holder` holds the SPC-2 reservation (if
/// anyone does) and `pr` is the persistent reservation state.
pub fn reserve(
    pr: &PrState,
    holder: Option<&ItNexus>,
    nexus: &ItNexus,
) -> Result<Spc2Outcome, Refusal> {
    if !pr.is_empty() {
        if crh_exempt(pr, nexus) {
            return Ok(Spc2Outcome::NoChange);
        }
        // SPC-5 5.13.3: "in all other cases" processed as SPC-2 says, and SPC-2 5.5.1: while
        // any I_T nexus is registered (or a persistent reservation exists), every RESERVE and
        // RELEASE conflicts, whoever sends it.
        return Err(Refusal::Conflict);
    }
    match holder {
        None => Ok(Spc2Outcome::Reserved),
        // SPC-2 RESERVE: a RESERVE from the holder supersedes its own reservation; it stays.
        Some(h) if h == nexus => Ok(Spc2Outcome::NoChange),
        // SPC-2 RESERVE: reserved by another initiator.
        Some(_) => Err(Refusal::Conflict),
    }
}

/// RELEASE(6) or RELEASE(10) from `nexus`, as [`reserve`].
pub fn release(
    pr: &PrState,
    holder: Option<&ItNexus>,
    nexus: &ItNexus,
) -> Result<Spc2Outcome, Refusal> {
    if !pr.is_empty() {
        if crh_exempt(pr, nexus) {
            // SPC-5 5.13.3: GOOD, and the persistent reservation is not released.
            return Ok(Spc2Outcome::NoChange);
        }
        // SPC-2 5.5.1, as for RESERVE.
        return Err(Refusal::Conflict);
    }
    match holder {
        Some(h) if h == nexus => Ok(Spc2Outcome::Released),
        // SPC-2 RELEASE: a RELEASE from an I_T nexus that does not hold the reservation (or
        // when there is none) is GOOD and releases nothing.
        _ => Ok(Spc2Outcome::NoChange),
    }
}

/// Whether `nexus` may run the command of table row `info` (CDB `cdb`) while `holder` holds
/// the SPC-2 reservation; `false` means RESERVATION CONFLICT. Ask it for every nexus, the
/// holder included.
///
/// - PERSISTENT RESERVE IN and OUT conflict from every I_T nexus, the holder included (SPC-2
///   5.5.1: "all PERSISTENT RESERVE IN and all PERSISTENT RESERVE OUT commands shall conflict
///   regardless of initiator or service action").
/// - The holder may send everything else.
/// - From another I_T nexus, only what an SPC-2 reservation leaves open: INQUIRY, REPORT LUNS,
///   REQUEST SENSE, PREVENT ALLOW MEDIUM REMOVAL with PREVENT 00b, and RELEASE (GOOD without
///   effect, see [`release`]). Everything else conflicts, TEST UNIT READY, READ CAPACITY,
///   MODE SENSE and RESERVE included (libiscsi's Reserve6 tests expect MODE SENSE and RESERVE
///   from the second initiator to conflict).
pub fn allowed(holder: &ItNexus, nexus: &ItNexus, info: &OpInfo, cdb: &[u8]) -> bool {
    if matches!(info.opcode, 0x5E | 0x5F) {
        return false;
    }
    if holder == nexus {
        return true;
    }
    match info.resv.access(cdb) {
        Access::Unrestricted => true,
        // RELEASE(6), RELEASE(10).
        Access::Spc2 => matches!(info.opcode, 0x17 | 0x57),
        Access::Allowed | Access::Read | Access::Write | Access::PrOut(_) => false,
    }
}
