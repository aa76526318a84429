//! PERSISTENT RESERVE OUT (SPC-5 6.17): every service action as a pure function of the state.
//! See the module documentation of [`crate::pr`].
//!
//! [`out`] checks, in this order, and stops at the first failure:
//! 0. while the persistent reservation information is lost ([`PrState::lost`]), every service
//!    action but REPLACE LOST RESERVATION is CHECK CONDITION, DATA PROTECT, PERSISTENT
//!    RESERVATION INFORMATION LOST (the logical unit's per-command check says so first);
//! 1. the CDB: SERVICE ACTION (09h..1Fh reserved: INVALID FIELD IN CDB at byte 1 bit 4), then
//!    SCOPE and TYPE for the service actions that create or preempt a reservation (RESERVE,
//!    PREEMPT, PREEMPT AND ABORT, REPLACE LOST RESERVATION): INVALID FIELD IN CDB at byte 2
//!    bit 7 (SCOPE other than LU_SCOPE) or bit 3 (a reserved or obsolete TYPE). RELEASE only
//!    compares them with the holder's reservation (step 4);
//! 2. the parameter list: its length (24 bytes unless SPEC_I_PT is one or the service action
//!    is REGISTER AND MOVE: PARAMETER LIST LENGTH ERROR), SPEC_I_PT on a service action other
//!    than REGISTER, reserved bits, TransportIDs (INVALID FIELD IN PARAMETER LIST with a field
//!    pointer);
//! 3. the registration of the sending I_T nexus and its RESERVATION KEY (RESERVATION
//!    CONFLICT, SPC-5 6.17.3 and the register behaviour tables of 5.14.7);
//! 4. the service action itself.
//!
//! # Registrants
//! A registration belongs to a [`Registrant`]: usually one I_T nexus, but ALL_TG_PT=1 makes
//! it cover the initiator port on every target port, and a SPEC_I_PT TransportID of format 00b
//! covers every ISID of an iSCSI initiator. Such a registration is one unit: a later REGISTER
//! from any I_T nexus it covers changes or removes the key for all of them (as other targets
//! do), READ KEYS lists its key once, and READ FULL STATUS shows one descriptor for it.
//!
//! # PRGENERATION
//! Incremented (wrapping) by every successful REGISTER, REGISTER AND IGNORE EXISTING KEY,
//! CLEAR, PREEMPT, PREEMPT AND ABORT and REGISTER AND MOVE (SPC-5 6.17.2, table 213, column
//! "PRGENERATION field incremented"); not by RESERVE or RELEASE, not by a command that fails,
//! and not by a REGISTER from an unregistered I_T nexus with SERVICE ACTION RESERVATION KEY
//! zero, which "does nothing except return GOOD status" (SPC-5 5.14.7, register behaviours).
//! REPLACE LOST RESERVATION sets it to zero ("e) set the PRgeneration value to zero", SPC-5
//! "Replacing lost reservations"; table 213's column says "Yes" for it, the clause that
//! describes the processing is explicit).
//!
//! # REPLACE LOST RESERVATION
//! SPC-5 "Replacing lost reservations" (5.13.11.3 in the clause numbers of the SPC-5 draft this
//! was written from) and the basic parameter list (6.16.3 there, table 216):
//! - nothing lost ([`PrState::lost`] false): CHECK CONDITION, ILLEGAL REQUEST, INVALID RELEASE
//!   OF PERSISTENT RESERVATION (26h/04h);
//! - SPEC_I_PT one: INVALID FIELD IN PARAMETER LIST (byte 20 bit 3), as for every service
//!   action but REGISTER; ALL_TG_PT one: INVALID FIELD IN PARAMETER LIST (byte 20 bit 2), the
//!   bit being "invalid" for this service action in table 216;
//! - RESERVATION KEY "shall contain zero" and the command is never a RESERVATION CONFLICT while
//!   the information is lost: a key other than zero is INVALID FIELD IN PARAMETER LIST (byte
//!   0); SERVICE ACTION RESERVATION KEY is the new key to register: zero is INVALID FIELD IN
//!   PARAMETER LIST (byte 8), as there is no registration with key zero;
//! - then, as one change: every registration goes (no unit attention), the sending I_T nexus
//!   is registered with SERVICE ACTION RESERVATION KEY, the reservation (if any was known) is
//!   released and a new one of SCOPE and TYPE is established for the sending I_T nexus (the
//!   holder; every registrant for the All Registrants types), PRGENERATION is set to zero,
//!   APTPL is taken from the parameter list, and the lost condition ends.
//!
//! # Unit attentions
//! [`Effects::unit_attentions`] names registrants; the logical unit queues each sense for every
//! I_T nexus a registrant matches except the one that sent the command:
//! - RESERVATIONS RELEASED (2Ah/04h): RELEASE of a Registrants Only or All Registrants
//!   reservation (SPC-5 5.14.11.2.2), to every other registrant; the holder of a Registrants
//!   Only reservation unregistering (SPC-5 5.14.7, registering and unregistering), to every remaining
//!   registrant; PREEMPT that changes the type or scope, to every registrant not removed (the
//!   sender's too, for its other nexuses).
//! - RESERVATIONS PREEMPTED (2Ah/03h): CLEAR, to every registrant (SPC-5 5.14.11.2.6).
//! - REGISTRATIONS PREEMPTED (2Ah/05h): PREEMPT and PREEMPT AND ABORT, to every registrant
//!   they remove (SPC-5 5.14.11.2.4): the sender's own is removed only when the reservation is
//!   not preempted and SERVICE ACTION RESERVATION KEY names it ("Removing registrations").
//!
//! REGISTER AND MOVE queues none: the reservation keeps its type and scope, and SPC-5 5.14.8
//! names no unit attention for it (the source sent the command, the destination gains).

use super::transport_id::{self, TidError};
use super::{PrState, PrType, Registrant, Registration, Reservation};
use crate::sense::{cond, Sense};
use crate::{InitiatorPort, ItNexus, ServedPort, TargetPort};

/// PERSISTENT RESERVE OUT service action codes (SPC-5 6.17.2, table 213).
pub mod sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
    pub const REPLACE_LOST_RESERVATION: u8 = 0x08;
}

/// LU_SCOPE (SPC-5 6.17.3.3, table 215): the only scope.
pub const LU_SCOPE: u8 = 0x0;

/// At most this many registrations per logical unit; a REGISTER that would exceed it fails
/// with INSUFFICIENT REGISTRATION RESOURCES (SPC-5 5.14.7). It bounds the stored state and the
/// READ FULL STATUS data.
pub const MAX_REGISTRATIONS: usize = 2048;

/// The longest PERSISTENT RESERVE OUT parameter list accepted (SPC-5 6.17.1 PARAMETER LIST
/// LENGTH): room for the 28-byte header and [`MAX_REGISTRATIONS`] TransportIDs of up to
/// 508 bytes each (the longest iSCSI TransportID, a 223-byte name with ",i,0x" and an ISID,
/// is 248). A longer list cannot be used, and is refused (PARAMETER LIST LENGTH ERROR) before
/// its data is taken.
pub const MAX_PARAM_LIST: u32 = 1 << 20;

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
///
/// REGISTER AND MOVE names its destination target port by RELATIVE TARGET PORT IDENTIFIER; this
/// form knows the target ports that appear in `nexus` and in the registrations. A logical unit
/// that knows all its target ports calls [`out_with_ports`].
pub fn out(
    state: &PrState,
    nexus: &ItNexus,
    sa: u8,
    scope: u8,
    ty: u8,
    param: &[u8],
) -> Result<Effects, Refusal> {
    let mut ports = vec![ServedPort {
        port: nexus.target.clone(),
        transport: nexus.initiator.transport,
    }];
    for r in &state.registrations {
        if let Some(t) = &r.who.target {
            ServedPort::add(&mut ports, t, r.who.initiator.transport);
        }
    }
    out_with_ports(state, nexus, sa, scope, ty, param, &ports)
}

/// [`out`], with the target ports of the SCSI target device (for REGISTER AND MOVE's RELATIVE
/// TARGET PORT IDENTIFIER).
pub fn out_with_ports(
    state: &PrState,
    nexus: &ItNexus,
    sa: u8,
    scope: u8,
    ty: u8,
    param: &[u8],
    target_ports: &[ServedPort],
) -> Result<Effects, Refusal> {
    // 0. Lost information: only REPLACE LOST RESERVATION runs.
    if state.lost && sa != sa::REPLACE_LOST_RESERVATION {
        return Err(check(super::INFORMATION_LOST));
    }
    // 1. The CDB.
    if sa > sa::REPLACE_LOST_RESERVATION {
        // 09h..1Fh reserved.
        return Err(check(Sense::invalid_field_in_cdb(1, 4)));
    }
    // RELEASE uses SCOPE and TYPE too, but only to compare them with the reservation its
    // holder releases (SPC-5 5.14.11.2.2): from a nexus that holds none they are not looked
    // at, and from the holder any value that differs, a reserved one included, is INVALID
    // RELEASE OF PERSISTENT RESERVATION. (`sg_persist --release` sends TYPE 0 unless told.)
    let uses_type = matches!(
        sa,
        sa::RESERVE | sa::PREEMPT | sa::PREEMPT_AND_ABORT | sa::REPLACE_LOST_RESERVATION
    );
    let pr_type = if uses_type {
        if scope != LU_SCOPE {
            return Err(check(Sense::invalid_field_in_cdb(2, 7)));
        }
        Some(PrType::from_code(ty).ok_or(check(Sense::invalid_field_in_cdb(2, 3)))?)
    } else {
        None
    };

    // 2. The parameter list.
    if sa == sa::REGISTER_AND_MOVE {
        let p = parse_move(param, nexus)?;
        return register_and_move(state, nexus, &p, target_ports);
    }
    let p = parse_basic(param, sa, nexus)?;

    // 3 and 4.
    match (sa, pr_type) {
        (sa::REGISTER, _) => register(state, nexus, &p, false),
        (sa::REGISTER_AND_IGNORE_EXISTING_KEY, _) => register(state, nexus, &p, true),
        (sa::RESERVE, Some(ty)) => reserve(state, nexus, &p, ty),
        (sa::RELEASE, _) => release(state, nexus, &p, scope, ty),
        (sa::CLEAR, _) => clear(state, nexus, &p),
        (sa::PREEMPT, Some(ty)) => preempt(state, nexus, &p, ty, false),
        (sa::PREEMPT_AND_ABORT, Some(ty)) => preempt(state, nexus, &p, ty, true),
        (sa::REPLACE_LOST_RESERVATION, Some(ty)) => replace_lost(state, nexus, &p, ty),
        // Every service action that uses TYPE has it parsed above.
        _ => Err(check(Sense::invalid_field_in_cdb(1, 4))),
    }
}

const fn check(s: Sense) -> Refusal {
    Refusal::Check(s)
}

const fn length_error() -> Refusal {
    Refusal::Check(cond::PARAM_LIST_LENGTH_ERROR)
}

/// For a device server that cannot persist through power loss (REPORT CAPABILITIES PTPL_C
/// 0): the refusal of a parameter list whose APTPL bit is one (SPC-5 6.17.3: INVALID FIELD IN
/// PARAMETER LIST, pointing at the bit), or `None` when the service action has no APTPL bit
/// or it is zero. REGISTER, REGISTER AND IGNORE EXISTING KEY and REPLACE LOST RESERVATION
/// carry it in byte 20 of the basic parameter list, REGISTER AND MOVE in byte 17 of its own;
/// the other service actions ignore it. Checked after [`out`]'s own checks.
pub fn unsupported_aptpl(sa: u8, param: &[u8]) -> Option<Refusal> {
    let at = match sa {
        sa::REGISTER | sa::REGISTER_AND_IGNORE_EXISTING_KEY | sa::REPLACE_LOST_RESERVATION => 20,
        sa::REGISTER_AND_MOVE => 17,
        _ => return None,
    };
    (param.get(at)? & 0x01 != 0).then(|| param_field(at, Some(0)))
}

const fn param_field(byte: usize, bit: Option<u8>) -> Refusal {
    // Parameter lists of PERSISTENT RESERVE OUT are bounded by the 32-bit PARAMETER LIST
    // LENGTH; a field pointer has 16 bits, so a pointer past 65535 saturates.
    let byte = if byte > 0xFFFF { 0xFFFF } else { byte as u16 };
    Refusal::Check(Sense::invalid_field_in_param(byte, bit))
}

fn be64(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = p.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

fn be32(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = p.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn byte(p: &[u8], at: usize) -> u8 {
    p.get(at).copied().unwrap_or(0)
}

/// The basic parameter list (SPC-5 6.17.3, table 216) and, with SPEC_I_PT, its TransportIDs
/// (SPC-5 6.17.3, the additional parameter data: TRANSPORTID PARAMETER DATA LENGTH, then the
/// TransportIDs).
struct Basic {
    rk: u64,
    sark: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
    /// With SPEC_I_PT: each TransportID's offset in the parameter list and what it names.
    tids: Vec<(usize, InitiatorPort)>,
}

fn parse_basic(p: &[u8], sa: u8, nexus: &ItNexus) -> Result<Basic, Refusal> {
    if p.len() < 24 {
        return Err(length_error());
    }
    let b20 = byte(p, 20);
    let spec_i_pt = b20 & 0x08 != 0;
    if spec_i_pt && sa != sa::REGISTER {
        // SPC-5 6.17.3: SPEC_I_PT set to one for any service action except REGISTER is
        // INVALID FIELD IN PARAMETER LIST (REGISTER AND IGNORE EXISTING KEY included).
        return Err(param_field(20, Some(3)));
    }
    if !spec_i_pt && p.len() != 24 {
        // SPC-5 6.17.3: PARAMETER LIST LENGTH shall be 24 (18h) unless SPEC_I_PT is one.
        return Err(length_error());
    }
    // Byte 20: reserved bits 7..4 and 1; byte 21 reserved. Bytes 16..19 and 22..23 are
    // obsolete and ignored.
    if b20 & 0xF0 != 0 {
        return Err(param_field(20, Some(7)));
    }
    if b20 & 0x02 != 0 {
        return Err(param_field(20, Some(1)));
    }
    if byte(p, 21) != 0 {
        return Err(param_field(21, Some(7)));
    }
    let mut tids = Vec::new();
    if spec_i_pt {
        // TRANSPORTID PARAMETER DATA LENGTH at bytes 24..27, then the TransportIDs.
        if p.len() < 28 {
            return Err(length_error());
        }
        let tpdl = be32(p, 24) as usize;
        if 28usize.checked_add(tpdl) != Some(p.len()) {
            return Err(length_error());
        }
        let mut off = 28;
        while off < p.len() {
            let rest = p.get(off..).unwrap_or(&[]);
            let len = transport_id::len_at(rest).map_err(|e| tid_refusal(off, e))?;
            let tid = rest.get(..len).ok_or_else(|| param_field(off + 2, None))?;
            let port = transport_id::decode(tid, nexus.initiator.transport)
                .map_err(|e| tid_refusal(off, e))?;
            tids.push((off, port));
            off += len;
        }
    }
    Ok(Basic {
        rk: be64(p, 0),
        sark: be64(p, 8),
        spec_i_pt,
        all_tg_pt: b20 & 0x04 != 0,
        aptpl: b20 & 0x01 != 0,
        tids,
    })
}

fn tid_refusal(off: usize, e: TidError) -> Refusal {
    param_field(off + e.at, e.bit)
}

/// The REGISTER AND MOVE parameter list (SPC-5 6.17.5, table 218).
struct Move {
    rk: u64,
    sark: u64,
    unreg: bool,
    aptpl: bool,
    rtpi: u16,
    dest: InitiatorPort,
}

fn parse_move(p: &[u8], nexus: &ItNexus) -> Result<Move, Refusal> {
    if p.len() < 24 {
        return Err(length_error());
    }
    let tpdl = be32(p, 20) as usize;
    if 24usize.checked_add(tpdl) != Some(p.len()) {
        return Err(length_error());
    }
    if byte(p, 16) != 0 {
        return Err(param_field(16, Some(7)));
    }
    let b17 = byte(p, 17);
    if b17 & 0xFC != 0 {
        return Err(param_field(17, Some(7)));
    }
    let tid = p.get(24..).unwrap_or(&[]);
    let dest =
        transport_id::decode(tid, nexus.initiator.transport).map_err(|e| tid_refusal(24, e))?;
    Ok(Move {
        rk: be64(p, 0),
        sark: be64(p, 8),
        unreg: b17 & 0x02 != 0,
        aptpl: b17 & 0x01 != 0,
        rtpi: u16::from_be_bytes([byte(p, 18), byte(p, 19)]),
        dest,
    })
}

/// Whether every I_T nexus `b` covers is covered by `a`.
fn covers(a: &Registrant, b: &Registrant) -> bool {
    a.initiator.transport == b.initiator.transport
        && a.initiator.name == b.initiator.name
        && (a.initiator.isid.is_none() || a.initiator.isid == b.initiator.isid)
        && (a.target.is_none() || a.target == b.target)
}

/// Whether some I_T nexus is covered by both `a` and `b`.
fn overlaps(a: &Registrant, b: &Registrant) -> bool {
    let i = (&a.initiator, &b.initiator);
    i.0.transport == i.1.transport
        && i.0.name == i.1.name
        && (i.0.isid.is_none() || i.1.isid.is_none() || i.0.isid == i.1.isid)
        && (a.target.is_none() || b.target.is_none() || a.target == b.target)
}

/// The registration of `nexus` checked against RESERVATION KEY: RESERVATION CONFLICT when the
/// nexus is not registered or the key differs (SPC-5 6.17.3).
fn registered(state: &PrState, nexus: &ItNexus, rk: u64) -> Result<usize, Refusal> {
    let i = state
        .registrations
        .iter()
        .position(|r| r.who.matches(nexus))
        .ok_or(Refusal::Conflict)?;
    match state.registrations.get(i) {
        Some(r) if r.key == rk => Ok(i),
        _ => Err(Refusal::Conflict),
    }
}

fn effects(
    old: &PrState,
    state: PrState,
    unit_attentions: Vec<(Registrant, Sense)>,
    abort: Vec<Registrant>,
) -> Effects {
    Effects {
        changed: state != *old,
        state,
        unit_attentions,
        abort,
    }
}

fn unchanged(old: &PrState) -> Effects {
    effects(old, old.clone(), Vec::new(), Vec::new())
}

fn bump(state: &mut PrState) {
    state.generation = state.generation.wrapping_add(1);
}

/// Remove registration `i`, and with it the reservation if its holder goes (SPC-5 5.14.7,
/// unregistering; 5.14.10 for All Registrants: the reservation survives until the last
/// registrant goes). Unit attentions for what that releases go to `ua`.
fn unregister(state: &mut PrState, i: usize, ua: &mut Vec<(Registrant, Sense)>) {
    if i >= state.registrations.len() {
        return;
    }
    let gone = state.registrations.remove(i);
    let Some(res) = &state.reservation else {
        return;
    };
    match &res.holder {
        Some(h) if *h == gone.who => {
            let ty = res.ty;
            state.reservation = None;
            // Only the Registrants Only types tell the other registrants: their access
            // changes (they no longer get the holder's access).
            if matches!(
                ty,
                PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
            ) {
                for r in &state.registrations {
                    ua.push((r.who.clone(), cond::RESERVATIONS_RELEASED));
                }
            }
        }
        None if res.ty.all_registrants() && state.registrations.is_empty() => {
            state.reservation = None;
        }
        _ => {}
    }
}

/// REGISTER (`ignore == false`) and REGISTER AND IGNORE EXISTING KEY (SPC-5 5.14.7, the
/// register behaviour tables).
fn register(old: &PrState, nexus: &ItNexus, p: &Basic, ignore: bool) -> Result<Effects, Refusal> {
    let mut st = old.clone();
    let mut ua = Vec::new();
    match st.registrations.iter().position(|r| r.who.matches(nexus)) {
        None => {
            // Unregistered: REGISTER needs RESERVATION KEY zero.
            if !ignore && p.rk != 0 {
                return Err(Refusal::Conflict);
            }
            if p.sark == 0 {
                // "Do nothing except return GOOD status."
                return Ok(unchanged(old));
            }
            let target = |t: &TargetPort| (!p.all_tg_pt).then(|| t.clone());
            let mine = Registrant {
                initiator: nexus.initiator.clone(),
                target: target(&nexus.target),
            };
            if st.registrations.iter().any(|r| overlaps(&r.who, &mine)) {
                // ALL_TG_PT=1 from a nexus whose initiator port is already registered
                // through another target port.
                return Err(param_field(20, Some(2)));
            }
            let mut new = vec![mine];
            for (off, port) in &p.tids {
                let r = Registrant {
                    initiator: port.clone(),
                    target: target(&nexus.target),
                };
                // SPEC_I_PT is all or nothing (SPC-5 6.17.3): a TransportID naming an I_T
                // nexus that is already registered, or one named twice (or the sender's own),
                // fails the whole command.
                if new.iter().any(|n| overlaps(n, &r))
                    || st.registrations.iter().any(|e| overlaps(&e.who, &r))
                {
                    return Err(param_field(*off, None));
                }
                new.push(r);
            }
            if st.registrations.len() + new.len() > MAX_REGISTRATIONS {
                return Err(check(cond::INSUFFICIENT_REGISTRATION_RESOURCES));
            }
            st.registrations
                .extend(new.into_iter().map(|who| Registration { who, key: p.sark }));
        }
        Some(i) => {
            let key = st.registrations.get(i).map_or(0, |r| r.key);
            if !ignore && p.rk != key {
                return Err(Refusal::Conflict);
            }
            if p.spec_i_pt {
                // SPEC_I_PT=1 from a registered I_T nexus (SPC-5 5.14.7).
                return Err(param_field(20, Some(3)));
            }
            if p.sark == 0 {
                unregister(&mut st, i, &mut ua);
            } else if let Some(r) = st.registrations.get_mut(i) {
                r.key = p.sark;
            }
        }
    }
    st.aptpl = p.aptpl;
    bump(&mut st);
    Ok(effects(old, st, ua, Vec::new()))
}

/// RESERVE (SPC-5 5.14.9): no effect on PRGENERATION.
fn reserve(old: &PrState, nexus: &ItNexus, p: &Basic, ty: PrType) -> Result<Effects, Refusal> {
    let i = registered(old, nexus, p.rk)?;
    match &old.reservation {
        None => {
            let mut st = old.clone();
            let holder = if ty.all_registrants() {
                None
            } else {
                old.registrations.get(i).map(|r| r.who.clone())
            };
            st.reservation = Some(Reservation {
                ty,
                scope: LU_SCOPE,
                holder,
            });
            Ok(effects(old, st, Vec::new(), Vec::new()))
        }
        // The holder reserving again with the same type and scope: nothing to do; anything
        // else conflicts (SPC-5 5.14.9).
        Some(r) if old.is_holder(nexus) && r.ty == ty && r.scope == LU_SCOPE => Ok(unchanged(old)),
        Some(_) => Err(Refusal::Conflict),
    }
}

/// RELEASE (SPC-5 5.14.11.2.2): no effect on PRGENERATION.
fn release(
    old: &PrState,
    nexus: &ItNexus,
    p: &Basic,
    scope: u8,
    ty: u8,
) -> Result<Effects, Refusal> {
    registered(old, nexus, p.rk)?;
    let Some(r) = &old.reservation else {
        return Ok(unchanged(old));
    };
    if !old.is_holder(nexus) {
        // Not an error: nothing is released.
        return Ok(unchanged(old));
    }
    if r.ty.code() != ty || r.scope != scope {
        return Err(check(cond::INVALID_RELEASE_OF_PR));
    }
    let mut st = old.clone();
    st.reservation = None;
    let mut ua = Vec::new();
    if r.ty.registrants_have_access() {
        for reg in &st.registrations {
            ua.push((reg.who.clone(), cond::RESERVATIONS_RELEASED));
        }
    }
    Ok(effects(old, st, ua, Vec::new()))
}

/// CLEAR (SPC-5 5.14.11.2.6).
fn clear(old: &PrState, nexus: &ItNexus, p: &Basic) -> Result<Effects, Refusal> {
    registered(old, nexus, p.rk)?;
    let mut st = old.clone();
    let ua = st
        .registrations
        .drain(..)
        .map(|r| (r.who, cond::RESERVATIONS_PREEMPTED))
        .collect();
    st.reservation = None;
    bump(&mut st);
    Ok(effects(old, st, ua, Vec::new()))
}

/// PREEMPT and PREEMPT AND ABORT (SPC-5 5.14.11.2.4 and 5.14.11.2.5).
fn preempt(
    old: &PrState,
    nexus: &ItNexus,
    p: &Basic,
    ty: PrType,
    abort: bool,
) -> Result<Effects, Refusal> {
    let me = registered(old, nexus, p.rk)?;
    let me = old
        .registrations
        .get(me)
        .map(|r| r.who.clone())
        .ok_or(Refusal::Conflict)?;
    let mut st = old.clone();
    let mut ua = Vec::new();

    let holder_key = old.reservation.as_ref().and_then(|r| {
        r.holder
            .as_ref()
            .and_then(|h| old.registrations.iter().find(|g| g.who == *h))
            .map(|g| g.key)
    });
    let all_registrants = old
        .reservation
        .as_ref()
        .is_some_and(|r| r.ty.all_registrants());

    // Which registrations SERVICE ACTION RESERVATION KEY identifies, and whether the
    // reservation is preempted.
    let (identified, preempts): (Vec<Registrant>, bool) = if all_registrants && p.sark == 0 {
        // All Registrants, key zero: every other registration goes and the reservation is
        // preempted (SPC-5 5.14.11.2.4, preempting an All Registrants reservation).
        let others = old
            .registrations
            .iter()
            .filter(|r| r.who != me)
            .map(|r| r.who.clone())
            .collect();
        (others, true)
    } else {
        if p.sark == 0 {
            // No reservation, or one of the other types: key zero names nobody (SPC-5
            // 5.14.11.2.4, removing registrations): INVALID FIELD IN PARAMETER LIST.
            return Err(param_field(8, None));
        }
        let ids: Vec<Registrant> = old
            .registrations
            .iter()
            .filter(|r| r.key == p.sark)
            .map(|r| r.who.clone())
            .collect();
        let preempts = !all_registrants && holder_key == Some(p.sark);
        if ids.is_empty() {
            // SERVICE ACTION RESERVATION KEY matches no registration.
            return Err(Refusal::Conflict);
        }
        (ids, preempts)
    };

    // Remove the identified registrations. Preempting the reservation keeps the sender's own
    // (SPC-5 5.14.11.2.4, preempting: "except the I_T nexus that is being used for the
    // PERSISTENT RESERVE OUT command"); only removing registrations has no such exception, so
    // a key that names the sender removes it too ("Removing registrations"). The unit
    // attentions go to every nexus that lost its registration; the logical unit leaves out
    // the sending one, not the sender's other nexuses (ALL_TG_PT).
    let removed: Vec<Registrant> = identified
        .iter()
        .filter(|w| !(preempts && **w == me))
        .cloned()
        .collect();
    st.registrations.retain(|r| !removed.contains(&r.who));
    for w in &removed {
        ua.push((w.clone(), cond::REGISTRATIONS_PREEMPTED));
    }
    if !preempts && all_registrants && st.registrations.is_empty() {
        // The last registrant of an All Registrants reservation is gone, and with it the
        // reservation (SPC-5 5.14.10).
        st.reservation = None;
    }

    if preempts {
        let (old_ty, old_scope) = old
            .reservation
            .as_ref()
            .map_or((ty, LU_SCOPE), |r| (r.ty, r.scope));
        st.reservation = Some(Reservation {
            ty,
            scope: LU_SCOPE,
            holder: (!ty.all_registrants()).then(|| me.clone()),
        });
        if old_ty != ty || old_scope != LU_SCOPE {
            // Every nexus whose registration was not removed but the sending one (which the
            // logical unit leaves out), so the sender's other nexuses (ALL_TG_PT) too.
            for r in &st.registrations {
                ua.push((r.who.clone(), cond::RESERVATIONS_RELEASED));
            }
        }
    }
    bump(&mut st);
    let aborted = if abort {
        // The sender's own tasks are aborted too when the key names it, and with key zero
        // under an All Registrants reservation, whose commands end "for all registered I_T
        // nexuses" (SPC-5 5.14.11.2.6); the logical unit keeps this command itself.
        if all_registrants && p.sark == 0 {
            old.registrations.iter().map(|r| r.who.clone()).collect()
        } else {
            identified
        }
    } else {
        Vec::new()
    };
    Ok(effects(old, st, ua, aborted))
}

/// REPLACE LOST RESERVATION (SPC-5 "Replacing lost reservations"; see the module docs).
fn replace_lost(old: &PrState, nexus: &ItNexus, p: &Basic, ty: PrType) -> Result<Effects, Refusal> {
    if !old.lost {
        return Err(check(cond::INVALID_RELEASE_OF_PR));
    }
    if p.all_tg_pt {
        return Err(param_field(20, Some(2)));
    }
    if p.rk != 0 {
        return Err(param_field(0, None));
    }
    if p.sark == 0 {
        return Err(param_field(8, None));
    }
    let me = Registrant::of(nexus);
    let st = PrState {
        generation: 0,
        aptpl: p.aptpl,
        registrations: vec![Registration {
            who: me.clone(),
            key: p.sark,
        }],
        reservation: Some(Reservation {
            ty,
            scope: LU_SCOPE,
            holder: (!ty.all_registrants()).then_some(me),
        }),
        lost: false,
    };
    Ok(effects(old, st, Vec::new(), Vec::new()))
}

/// REGISTER AND MOVE (SPC-5 5.14.8).
fn register_and_move(
    old: &PrState,
    nexus: &ItNexus,
    p: &Move,
    target_ports: &[ServedPort],
) -> Result<Effects, Refusal> {
    let src = registered(old, nexus, p.rk)?;
    let src = old
        .registrations
        .get(src)
        .map(|r| r.who.clone())
        .ok_or(Refusal::Conflict)?;
    // With no reservation there is nothing to move: INVALID FIELD IN CDB (SPC-5 5.14.8),
    // pointing at the SERVICE ACTION. Only the holder of a reservation that is not All
    // Registrants may move one.
    let Some(res) = &old.reservation else {
        return Err(check(Sense::invalid_field_in_cdb(1, 4)));
    };
    if res.ty.all_registrants() || !old.is_holder(nexus) {
        return Err(Refusal::Conflict);
    }
    if p.sark == 0 {
        return Err(param_field(8, None));
    }
    let served = target_ports
        .iter()
        .find(|t| t.port.relative_id == p.rtpi)
        .ok_or(param_field(18, None))?;
    // The TransportID names an initiator reached through that port: a format-00b one (no
    // ISID) an initiator of the port's transport, whichever transport sent the command; a
    // format-01b one an iSCSI initiator port, which only an iSCSI port reaches.
    let mut initiator = p.dest.clone();
    if initiator.isid.is_none() {
        initiator.transport = served.transport;
    } else if served.transport != initiator.transport {
        return Err(param_field(24, None));
    }
    let dest = Registrant {
        initiator,
        target: Some(served.port.clone()),
    };
    // The destination may not share a registration with the source, nor be the initiator port
    // the command came from, through whichever target port (SPC-5 5.14.8: the TransportID
    // names the initiator port of the I_T nexus that received the command).
    let sender_anywhere = Registrant {
        initiator: nexus.initiator.clone(),
        target: None,
    };
    if overlaps(&src, &dest) || overlaps(&sender_anywhere, &dest) {
        return Err(param_field(24, None));
    }
    let mut st = old.clone();
    let holder = match st.registrations.iter().position(|r| covers(&r.who, &dest)) {
        Some(i) => {
            // Already registered: it takes SERVICE ACTION RESERVATION KEY.
            let Some(r) = st.registrations.get_mut(i) else {
                return Err(Refusal::Conflict);
            };
            r.key = p.sark;
            r.who.clone()
        }
        None => {
            if st.registrations.iter().any(|r| overlaps(&r.who, &dest)) {
                // Partly covered by registrations of single ISIDs: ambiguous.
                return Err(param_field(24, None));
            }
            if st.registrations.len() >= MAX_REGISTRATIONS {
                return Err(check(cond::INSUFFICIENT_REGISTRATION_RESOURCES));
            }
            st.registrations.push(Registration {
                who: dest.clone(),
                key: p.sark,
            });
            dest
        }
    };
    st.reservation = Some(Reservation {
        ty: res.ty,
        scope: res.scope,
        holder: Some(holder),
    });
    if p.unreg {
        st.registrations.retain(|r| r.who != src);
    }
    st.aptpl = p.aptpl;
    bump(&mut st);
    Ok(effects(old, st, Vec::new(), Vec::new()))
}
