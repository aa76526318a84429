//! Persistent reservations (SPC-5 5.14) and SPC-2 reservations (SPC-5 5.13.3), as pure
//! functions over a plain, serialisable state value (DESIGN.md §4).
//!
//! Nothing here does I/O or holds a lock. The logical unit keeps the current [`PrState`] as a
//! snapshot, asks [`check::allowed`] on every command, runs PERSISTENT RESERVE OUT through
//! [`out::out`] (which returns the new state, the unit attentions for other nexuses and the
//! nexuses whose tasks to abort), stores the new state through the block driver's reservation
//! store, and answers PERSISTENT RESERVE IN with [`input::input`].
//!
//! - [`out`]: PERSISTENT RESERVE OUT: parameter list parsing and every service action.
//! - [`input`]: PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES,
//!   READ FULL STATUS.
//! - [`transport_id`]: iSCSI TransportIDs (SPC-5 7.6.4.6, both formats); vhost-user initiators
//!   appear as iSCSI format 00b with their configured name.
//! - [`check`]: which commands conflict with which reservation (SPC-5 5.14.3, table 67 and
//!   SBC-4 4.17), fed by the opcode table.
//! - [`spc2`]: RESERVE(6/10) and RELEASE(6/10) and their interplay with persistent
//!   reservations.
//!
//! # Lost persistent reservation information
//! When the state kept through power loss cannot be read back (the file driver's sidecar is
//! damaged: [`block::ReservationStore::lost`]), the logical unit starts with
//! [`PrState::lost`] set: SPC-5's recoverable lost persistent reservation condition
//! (5.13.5.3.2 "Recoverable loss of persistent reservation information", in the clause numbers
//! of the SPC-5 draft this was written from). Every command but INQUIRY, LOG SENSE, READ BUFFER,
//! REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE, START STOP UNIT with START 1 and
//! POWER CONDITION 0h, WRITE BUFFER (5.13.5.2) and PERSISTENT RESERVE OUT with REPLACE LOST
//! RESERVATION then ends in CHECK CONDITION, DATA PROTECT, PERSISTENT RESERVATION INFORMATION
//! LOST ([`INFORMATION_LOST`], [`check::lost_allows`]). Only a successful REPLACE LOST
//! RESERVATION ([`out`], 5.13.11.3 "Replacing lost reservations") ends the condition; no reset
//! or nexus loss does, and no unit attention marks either edge. The operator's `sharedisk pr
//! clear` replaces the whole state and so ends it too.

use serde::{Deserialize, Serialize};

use crate::sense::{key, Sense};
use crate::{InitiatorPort, ItNexus, TargetPort};

/// CHECK CONDITION sense for commands terminated while [`PrState::lost`]: DATA PROTECT (7h),
/// PERSISTENT RESERVATION INFORMATION LOST (44h/01h) (SPC-5 5.13.5.3.2 b)).
pub const INFORMATION_LOST: Sense = Sense::new(key::DATA_PROTECT, 0x44, 0x01);

pub mod check;
pub mod input;
pub mod out;
pub mod spc2;
pub mod transport_id;

/// Persistent reservation types (SPC-5 6.17.2, table 214 of the TYPE field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrType {
    /// 1h
    WriteExclusive,
    /// 3h
    ExclusiveAccess,
    /// 5h
    WriteExclusiveRegistrantsOnly,
    /// 6h
    ExclusiveAccessRegistrantsOnly,
    /// 7h
    WriteExclusiveAllRegistrants,
    /// 8h
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// The TYPE code.
    pub const fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 0x1,
            PrType::ExclusiveAccess => 0x3,
            PrType::WriteExclusiveRegistrantsOnly => 0x5,
            PrType::ExclusiveAccessRegistrantsOnly => 0x6,
            PrType::WriteExclusiveAllRegistrants => 0x7,
            PrType::ExclusiveAccessAllRegistrants => 0x8,
        }
    }

    /// The type for a TYPE code; `None` for reserved or obsolete codes.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// All Registrants types: every registrant is a reservation holder (SPC-5 5.14.10).
    pub const fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants Only and All Registrants types: registered nexuses get the access the
    /// holder has.
    pub const fn registrants_have_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Exclusive Access types: reads conflict too, not only writes.
    pub const fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// Whom a registration belongs to: an initiator port on a target port.
///
/// `initiator.isid == None` on an iSCSI registrant means every ISID of that initiator name (a
/// SPEC_I_PT TransportID of format 00b names the initiator device, not one port); `target ==
/// None` means every target port (ALL_TG_PT).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registrant {
    pub initiator: InitiatorPort,
    pub target: Option<TargetPort>,
}

impl Registrant {
    /// The registrant that exactly one nexus makes (no ALL_TG_PT).
    pub fn of(nexus: &ItNexus) -> Self {
        Registrant {
            initiator: nexus.initiator.clone(),
            target: Some(nexus.target.clone()),
        }
    }

    /// Whether `nexus` is one of this registrant's I_T nexuses.
    pub fn matches(&self, nexus: &ItNexus) -> bool {
        let i = &self.initiator;
        let n = &nexus.initiator;
        i.transport == n.transport
            && i.name == n.name
            && (i.isid.is_none() || i.isid == n.isid)
            && self.target.as_ref().is_none_or(|t| *t == nexus.target)
    }
}

/// One registration: a registrant and its reservation key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub who: Registrant,
    pub key: u64,
}

/// The persistent reservation, when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub ty: PrType,
    /// Always 0h (LU_SCOPE) today; kept for READ RESERVATION.
    pub scope: u8,
    /// The holder for the types other than All Registrants (an entry of
    /// [`PrState::registrations`]); `None` for All Registrants types, where every registrant
    /// holds the reservation.
    pub holder: Option<Registrant>,
}

/// The persistent reservation state of one logical unit: what every host serving the LU must
/// agree on. A plain value: the logical unit stores it (serialised) through the block driver's
/// reservation store, and the rules in this module map one state to the next.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrState {
    /// PRGENERATION (SPC-5 6.16.2): bumped by every PR OUT that changes registrations, not by
    /// RESERVE, RELEASE or a failed command.
    pub generation: u32,
    /// Activate Persist Through Power Loss, from the last successful REGISTER, REGISTER AND
    /// IGNORE EXISTING KEY or REGISTER AND MOVE.
    pub aptpl: bool,
    /// In the order they were made (READ KEYS and READ FULL STATUS list them in this order).
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// The recoverable lost persistent reservation condition (see the module documentation):
    /// the state kept through power loss could not be read back, so registrations, reservation
    /// and generation are unknown (empty and zero here) and commands are terminated until
    /// REPLACE LOST RESERVATION. Set only by the logical unit when it loads a lost state; a
    /// stored state never has it set. Absent in states stored before it existed (`false`).
    #[serde(default)]
    pub lost: bool,
}

impl PrState {
    /// The registration of `nexus`, if it has one.
    pub fn registration(&self, nexus: &ItNexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.who.matches(nexus))
    }

    /// Whether `nexus` holds the reservation (for All Registrants types: is registered).
    pub fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) => match &r.holder {
                Some(h) => h.matches(nexus),
                None => r.ty.all_registrants() && self.registration(nexus).is_some(),
            },
        }
    }

    /// Whether there is nothing to enforce (no registration, no reservation): the common case,
    /// which the per-command check answers first. (A lost state is empty too; the logical unit
    /// looks at [`PrState::lost`] before anything else.)
    pub fn is_empty(&self) -> bool {
        self.registrations.is_empty() && self.reservation.is_none()
    }

    /// Whether a state read back from the reservation store is one the rules could have made:
    /// not lost, at most [`out::MAX_REGISTRATIONS`] registrations, no registrant twice, and a
    /// reservation of LU scope whose holder (for the types that have one) is registered, or
    /// with registrants (All Registrants). A state that is not (edited by hand, written by a
    /// bug) would make commands misbehave in ways no initiator can repair, so it is treated as
    /// lost.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.lost {
            return Err("a stored state is never marked lost".into());
        }
        if self.registrations.len() > out::MAX_REGISTRATIONS {
            return Err(format!(
                "{} registrations, more than the {} allowed",
                self.registrations.len(),
                out::MAX_REGISTRATIONS
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = self.registrations.iter().find(|r| !seen.insert(&r.who)) {
            return Err(format!(
                "{} is registered twice",
                twice.who.initiator.port_name()
            ));
        }
        let Some(r) = &self.reservation else {
            return Ok(());
        };
        if r.scope != 0 {
            return Err(format!("reservation scope {:#x}, not LU_SCOPE", r.scope));
        }
        match (&r.holder, r.ty.all_registrants()) {
            (None, true) if !self.registrations.is_empty() => Ok(()),
            (None, true) => Err("an All Registrants reservation with no registrant".into()),
            (Some(h), false) if self.registrations.iter().any(|g| g.who == *h) => Ok(()),
            (Some(h), false) => Err(format!(
                "the reservation holder {} is not registered",
                h.initiator.port_name()
            )),
            (Some(_), true) => Err("an All Registrants reservation with one holder".into()),
            (None, false) => Err("a reservation of a type that has a holder, without one".into()),
        }
    }

    /// The state of a logical unit whose persistent reservation information was lost: nothing
    /// known, [`PrState::lost`] set.
    pub fn lost() -> Self {
        PrState {
            lost: true,
            ..PrState::default()
        }
    }
}
