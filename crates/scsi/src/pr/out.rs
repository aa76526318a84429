//! PERSISTENT RESERVE OUT (SPC-5 6.17): every service action as a pure function of the state.
//! See the module documentation of [`crate::pr`].

use super::{PrState, Registrant};
use crate::sense::Sense;
use crate::ItNexus;

/// What a PERSISTENT RESERVE OUT did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effects {
    /// The state after the command (equal to the old one when nothing changed).
    pub state: PrState,
    /// Whether `state` differs from the old state and must be stored before GOOD is returned.
    pub changed: bool,
    /// Unit attentions to queue: for every nexus the registrant matches, except the nexus that
    /// sent the command.
    pub unit_attentions: Vec<(Registrant, Sense)>,
    /// PREEMPT AND ABORT: end every task of the nexuses these registrants match (except the
    /// PERSISTENT RESERVE OUT command itself), as SAM-5 ABORT TASK SET does.
    pub abort: Vec<Registrant>,
}

/// Why a PERSISTENT RESERVE OUT was refused; the state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// Run PERSISTENT RESERVE OUT from `nexus`. `sa` (service action), `scope` and `ty` are the
/// CDB's fields (byte 1 bits 4..0, byte 2 bits 7..4 and 3..0); `param` is the parameter list,
/// exactly PARAMETER LIST LENGTH bytes.
pub fn out(
    state: &PrState,
    nexus: &ItNexus,
    sa: u8,
    scope: u8,
    ty: u8,
    param: &[u8],
) -> Result<Effects, Refusal> {
    let _ = (state, nexus, sa, scope, ty, param);
    Err(Refusal::Check(crate::sense::cond::INVALID_OPCODE))
}
