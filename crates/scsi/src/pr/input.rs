//! PERSISTENT RESERVE IN (SPC-5 6.16): READ KEYS, READ RESERVATION, REPORT CAPABILITIES and
//! READ FULL STATUS, built from the state and cut to the ALLOCATION LENGTH. The ADDITIONAL
//! LENGTH (or LENGTH) field always gives the untruncated length (SPC-5 4.2.5.6).
//!
//! See the module documentation of [`crate::pr`].

use super::{transport_id, PrState, Registration};
use crate::sense::Sense;

/// PERSISTENT RESERVE IN service action codes (SPC-5 6.16.1, table 203).
pub mod sa {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// REPORT CAPABILITIES byte 2 (SPC-5 6.16.4): RLR_C (bit 7) 1: REPLACE LOST RESERVATION is
/// supported, and with it the lost persistent reservation condition (see [`super::out`] and
/// [`super`]); CRH (bit 4) 1: RESERVE/RELEASE(6/10) follow SPC-5 5.13.3 ([`super::spc2`]);
/// SIP_C (bit 3) 1: SPEC_I_PT; ATP_C (bit 2) 1: ALL_TG_PT. PTPL_C (bit 0) is added when the
/// reservation store keeps APTPL state across restarts.
const CAPS_BYTE2: u8 = 0x80 | 0x10 | 0x08 | 0x04;

/// ALLOW COMMANDS (REPORT CAPABILITIES byte 3 bits 6..4; SPC-5 6.16.4, the ALLOW COMMANDS
/// table): 001b, "the device server allows the TEST UNIT READY command through Write Exclusive
/// and Exclusive Access persistent reservations and does not provide information about whether
/// [MODE SENSE, READ ATTRIBUTE, READ BUFFER, RECEIVE DIAGNOSTIC RESULTS, REPORT SUPPORTED
/// OPERATION CODES, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, READ DEFECT DATA] are allowed
/// through Write Exclusive persistent reservations". The per-command check ([`super::check`])
/// allows TEST UNIT READY and PERSISTENT RESERVE IN from every I_T nexus under every type, so
/// this row is true; it claims nothing about the other commands, whose classes the opcode table
/// may still refine. (SPC-5 adds 100b and 101b to this table; their row text was not at hand
/// when this was written, so the code stays at the row whose text is known to hold.)
pub const ALLOW_COMMANDS: u8 = 0b001;

/// Run PERSISTENT RESERVE IN: the parameter data for service action `sa`, at most `alloc`
/// bytes. An unknown service action is INVALID FIELD IN CDB pointing at the SERVICE ACTION
/// field (byte 1 bit 4).
pub fn input(state: &PrState, sa: u8, alloc: u16) -> Result<Vec<u8>, Sense> {
    input_with(state, sa, alloc, true)
}

/// [`input`] for a device server that can (`ptpl_c`) or cannot persist through power loss:
/// REPORT CAPABILITIES' PTPL_C bit (the reservation store's
/// [`block::ReservationStore::keeps_aptpl`]).
pub fn input_with(state: &PrState, sa: u8, alloc: u16, ptpl_c: bool) -> Result<Vec<u8>, Sense> {
    let mut data = match sa {
        sa::READ_KEYS => read_keys(state),
        sa::READ_RESERVATION => read_reservation(state),
        sa::REPORT_CAPABILITIES => report_capabilities(state, ptpl_c),
        sa::READ_FULL_STATUS => read_full_status(state),
        _ => return Err(Sense::invalid_field_in_cdb(1, 4)),
    };
    data.truncate(usize::from(alloc));
    Ok(data)
}

/// PRGENERATION and ADDITIONAL LENGTH (the 8-byte header of READ KEYS, READ RESERVATION and
/// READ FULL STATUS), `body` appended.
fn with_header(generation: u32, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&generation.to_be_bytes());
    // The body is bounded by MAX_REGISTRATIONS descriptors of at most 24 + 65539 bytes; it fits.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// READ KEYS (SPC-5 6.16.2): every registered key, in registration order.
fn read_keys(state: &PrState) -> Vec<u8> {
    let body = state
        .registrations
        .iter()
        .flat_map(|r| r.key.to_be_bytes())
        .collect();
    with_header(state.generation, body)
}

/// The key READ RESERVATION and READ FULL STATUS show as the holder's: the holder's key, or
/// zero for All Registrants types (SPC-5 6.16.3).
fn holder_key(state: &PrState) -> u64 {
    state
        .reservation
        .as_ref()
        .and_then(|r| r.holder.as_ref())
        .and_then(|h| state.registrations.iter().find(|g| g.who == *h))
        .map_or(0, |g| g.key)
}

/// READ RESERVATION (SPC-5 6.16.3): ADDITIONAL LENGTH 0 without a reservation, else 16 with
/// the reservation descriptor.
fn read_reservation(state: &PrState) -> Vec<u8> {
    let Some(r) = &state.reservation else {
        return with_header(state.generation, Vec::new());
    };
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&holder_key(state).to_be_bytes());
    body.extend_from_slice(&[0; 4]); // obsolete
    body.push(0); // reserved
    body.push((r.scope << 4) | r.ty.code());
    body.extend_from_slice(&[0; 2]); // obsolete
    with_header(state.generation, body)
}

/// REPORT CAPABILITIES (SPC-5 6.16.4): LENGTH 8.
fn report_capabilities(state: &PrState, ptpl_c: bool) -> Vec<u8> {
    vec![
        0x00,
        0x08, // LENGTH
        CAPS_BYTE2 | u8::from(ptpl_c),
        0x80 | (ALLOW_COMMANDS << 4) | u8::from(state.aptpl), // TMV, ALLOW COMMANDS, PTPL_A
        // PERSISTENT RESERVATION TYPE MASK: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX ...
        0x80 | 0x40 | 0x20 | 0x08 | 0x02,
        0x01, // ... and EX_AC_AR
        0x00,
        0x00,
    ]
}

/// One full status descriptor (SPC-5 6.16.5).
fn full_status_descriptor(state: &PrState, reg: &Registration, out: &mut Vec<u8>) {
    out.extend_from_slice(&reg.key.to_be_bytes());
    out.extend_from_slice(&[0; 4]); // reserved
    let holder = state.reservation.as_ref().filter(|r| match &r.holder {
        Some(h) => *h == reg.who,
        None => r.ty.all_registrants(),
    });
    let all_tg_pt = reg.who.target.is_none();
    out.push((u8::from(all_tg_pt) << 1) | u8::from(holder.is_some())); // ALL_TG_PT, R_HOLDER
    out.push(holder.map_or(0, |r| (r.scope << 4) | r.ty.code())); // SCOPE, TYPE
    out.extend_from_slice(&[0; 4]); // reserved
    let rtpi = reg.who.target.as_ref().map_or(0, |t| t.relative_id);
    out.extend_from_slice(&rtpi.to_be_bytes());
    let tid = transport_id::encode(&reg.who.initiator);
    let len = u32::try_from(tid.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes()); // ADDITIONAL DESCRIPTOR LENGTH
    out.extend_from_slice(&tid);
}

/// READ FULL STATUS (SPC-5 6.16.5): one descriptor per registration.
fn read_full_status(state: &PrState) -> Vec<u8> {
    let mut body = Vec::new();
    for reg in &state.registrations {
        full_status_descriptor(state, reg, &mut body);
    }
    with_header(state.generation, body)
}
