#![allow(clippy::unwrap_used)]

//! PERSISTENT RESERVE OUT rules (crate::pr::out), one behaviour per test. Parameter lists and
//! expected sense bytes are written out from SPC-5 (6.17, 5.14, 4.4.3), never from the code's
//! own constants.

use scsi::pr::out::{out, Effects, Refusal};
use scsi::pr::{PrState, PrType, Registrant};
use scsi::{InitiatorPort, ItNexus, TargetPort, Transport};

// ---- fixtures -------------------------------------------------------------------------------

fn port(name: &str, isid: u8) -> InitiatorPort {
    InitiatorPort {
        transport: Transport::Iscsi,
        name: name.into(),
        isid: Some([0x80, 0, 0, 0, 0, isid]),
    }
}

fn tport(rtpi: u16) -> TargetPort {
    TargetPort {
        name: "iqn.2026-01.io.sharedisk:t".into(),
        tpgt: rtpi,
        relative_id: rtpi,
    }
}

fn nexus(name: &str, isid: u8, rtpi: u16) -> ItNexus {
    ItNexus {
        initiator: port(name, isid),
        target: tport(rtpi),
    }
}

fn a() -> ItNexus {
    nexus("iqn.a", 1, 1)
}
fn a2() -> ItNexus {
    nexus("iqn.a", 2, 1)
}
fn b() -> ItNexus {
    nexus("iqn.b", 1, 1)
}
fn c() -> ItNexus {
    nexus("iqn.c", 1, 2)
}

/// The basic PERSISTENT RESERVE OUT parameter list (SPC-5 6.17.3, table 216): RESERVATION KEY
/// (0..7), SERVICE ACTION RESERVATION KEY (8..15), obsolete (16..19), byte 20: SPEC_I_PT (bit
/// 3), ALL_TG_PT (bit 2), APTPL (bit 0); byte 21 reserved; obsolete (22..23).
fn basic(rk: u64, sark: u64, byte20: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&rk.to_be_bytes());
    p.extend_from_slice(&sark.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, byte20, 0, 0, 0]);
    p
}

const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const RELEASE: u8 = 0x02;
const CLEAR: u8 = 0x03;
const PREEMPT: u8 = 0x04;
const PREEMPT_AND_ABORT: u8 = 0x05;
const REGISTER_IGNORE: u8 = 0x06;
const REGISTER_AND_MOVE: u8 = 0x07;
const REPLACE_LOST: u8 = 0x08;

const WE: u8 = 0x1;
const EA: u8 = 0x3;
const WE_RO: u8 = 0x5;
const EA_RO: u8 = 0x6;
const WE_AR: u8 = 0x7;
const EA_AR: u8 = 0x8;

fn run(s: &PrState, n: &ItNexus, sa: u8, ty: u8, p: &[u8]) -> Result<Effects, Refusal> {
    out(s, n, sa, 0, ty, p)
}

/// Apply and return the new state, asserting success.
fn ok(s: &PrState, n: &ItNexus, sa: u8, ty: u8, p: &[u8]) -> PrState {
    match run(s, n, sa, ty, p) {
        Ok(e) => e.state,
        Err(r) => panic!("expected GOOD, got {r:?}"),
    }
}

fn keys(s: &PrState) -> Vec<u64> {
    s.registrations.iter().map(|r| r.key).collect()
}

/// Fixed-format sense of a CHECK CONDITION refusal (SPC-5 4.4.3).
fn sense(r: Result<Effects, Refusal>) -> Vec<u8> {
    match r {
        Err(Refusal::Check(s)) => s.encode(false),
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

/// SPC-5 4.4.3 fixed format: 70h, key, ADDITIONAL SENSE LENGTH 0Ah, ASC/ASCQ, SKS.
fn fixed(key: u8, asc: u8, ascq: u8, sks: [u8; 3]) -> Vec<u8> {
    vec![
        0x70, 0, key, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, asc, ascq, 0, sks[0], sks[1], sks[2],
    ]
}

fn conflict(r: Result<Effects, Refusal>) {
    assert_eq!(r.err(), Some(Refusal::Conflict));
}

fn registered(pairs: &[(&ItNexus, u64)]) -> PrState {
    let mut s = PrState::default();
    for (n, k) in pairs {
        s = ok(&s, n, REGISTER_IGNORE, 0, &basic(0, *k, 0));
    }
    s
}

// ---- REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-5 5.14.7) -----------------------------

#[test]
fn register_from_unregistered_nexus_adds_key_and_bumps_generation() {
    let e = run(&PrState::default(), &a(), REGISTER, 0, &basic(0, 0x1111, 0)).unwrap();
    assert!(e.changed);
    assert_eq!(keys(&e.state), [0x1111]);
    assert_eq!(e.state.generation, 1);
    assert_eq!(e.state.registrations[0].who, Registrant::of(&a()));
}

#[test]
fn register_from_unregistered_nexus_with_nonzero_reservation_key_conflicts() {
    conflict(run(
        &PrState::default(),
        &a(),
        REGISTER,
        0,
        &basic(5, 0x1111, 0),
    ));
}

#[test]
fn register_zero_key_from_unregistered_nexus_does_nothing_not_even_the_generation() {
    let e = run(&PrState::default(), &a(), REGISTER, 0, &basic(0, 0, 0)).unwrap();
    assert!(!e.changed);
    assert_eq!(e.state.generation, 0);
}

#[test]
fn reregister_with_wrong_reservation_key_conflicts() {
    // libiscsi prout_reregister_key_fails: REGISTER with RESERVATION KEY 0 from a registered
    // nexus.
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &a(), REGISTER, 0, &basic(0, 0x11, 0)));
}

#[test]
fn register_with_matching_key_changes_it() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), REGISTER, 0, &basic(0x10, 0x11, 0));
    assert_eq!(keys(&s), [0x11]);
    assert_eq!(s.generation, 2);
}

#[test]
fn register_and_ignore_existing_key_changes_it_whatever_the_reservation_key() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), REGISTER_IGNORE, 0, &basic(0xDEAD, 0x12, 0));
    assert_eq!(keys(&s), [0x12]);
}

#[test]
fn register_zero_key_unregisters() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), REGISTER, 0, &basic(0x10, 0, 0));
    assert_eq!(keys(&s), [0x20]);
    assert_eq!(s.generation, 3);
}

#[test]
fn aptpl_follows_the_last_register() {
    let s = ok(&PrState::default(), &a(), REGISTER, 0, &basic(0, 1, 0x01));
    assert!(s.aptpl);
    let s = ok(&s, &b(), REGISTER, 0, &basic(0, 2, 0x00));
    assert!(!s.aptpl);
}

#[test]
fn nexuses_of_one_initiator_with_different_isids_register_separately() {
    let s = registered(&[(&a(), 0x10), (&a2(), 0x20)]);
    assert_eq!(keys(&s), [0x10, 0x20]);
}

#[test]
fn all_tg_pt_registers_the_initiator_port_on_every_target_port() {
    let s = ok(
        &PrState::default(),
        &a(),
        REGISTER,
        0,
        &basic(0, 0x10, 0x04),
    );
    assert_eq!(s.registrations[0].who.target, None);
    let a_on_t2 = nexus("iqn.a", 1, 2);
    assert_eq!(s.registration(&a_on_t2).map(|r| r.key), Some(0x10));
    // A second REGISTER from the same port through the other target port is a key change.
    conflict(run(&s, &a_on_t2, REGISTER, 0, &basic(0, 0x11, 0)));
}

#[test]
fn unregistering_the_holder_releases_a_registrants_only_reservation_with_unit_attention() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE_RO, &basic(0x10, 0, 0));
    let e = run(&s, &a(), REGISTER, 0, &basic(0x10, 0, 0)).unwrap();
    assert_eq!(e.state.reservation, None);
    // RESERVATIONS RELEASED: UNIT ATTENTION, 2Ah/04h.
    assert_eq!(e.unit_attentions.len(), 1);
    assert_eq!(e.unit_attentions[0].0, Registrant::of(&b()));
    let s = e.unit_attentions[0].1;
    assert_eq!((s.key, s.asc, s.ascq), (0x06, 0x2A, 0x04));
}

#[test]
fn unregistering_the_holder_of_write_exclusive_releases_it_silently() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(&s, &a(), REGISTER, 0, &basic(0x10, 0, 0)).unwrap();
    assert_eq!(e.state.reservation, None);
    assert!(e.unit_attentions.is_empty());
}

#[test]
fn all_registrants_reservation_survives_until_the_last_registrant_goes() {
    // libiscsi verify_persistent_reserve_ownership, resvn_is_shared.
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, EA_AR, &basic(0x10, 0, 0));
    let s = ok(&s, &a(), REGISTER, 0, &basic(0x10, 0, 0));
    assert!(s.reservation.is_some());
    assert!(s.is_holder(&b()));
    let s = ok(&s, &b(), REGISTER, 0, &basic(0x20, 0, 0));
    assert_eq!(s.reservation, None);
}

// ---- SPEC_I_PT (SPC-5 6.17.3, TransportIDs SPC-5 7.6.4.6) ----------------------------------

/// iSCSI TransportID format 00b for "iqn.d" (SPC-5 7.6.4.6): 05h, 00h, ADDITIONAL LENGTH 20,
/// the name NUL-padded to 20 bytes.
fn tid_00b_iqn_d() -> Vec<u8> {
    let mut t = vec![0x05, 0x00, 0x00, 0x14];
    t.extend_from_slice(b"iqn.d");
    t.resize(24, 0);
    t
}

/// iSCSI TransportID format 01b for "iqn.e,i,0x800000000001" (SPC-5 7.6.4.6): 45h, 00h,
/// ADDITIONAL LENGTH 24 (23 bytes of text and NUL, padded to 24).
fn tid_01b_iqn_e() -> Vec<u8> {
    let mut t = vec![0x45, 0x00, 0x00, 0x18];
    t.extend_from_slice(b"iqn.e,i,0x800000000001");
    t.resize(28, 0);
    t
}

fn spec_i_pt(sark: u64, tids: &[Vec<u8>]) -> Vec<u8> {
    let mut p = basic(0, sark, 0x08);
    let all: Vec<u8> = tids.concat();
    p.extend_from_slice(&(all.len() as u32).to_be_bytes()); // TRANSPORTID PARAMETER DATA LENGTH
    p.extend_from_slice(&all);
    p
}

#[test]
fn spec_i_pt_registers_the_sender_and_every_transport_id() {
    let s = ok(
        &PrState::default(),
        &a(),
        REGISTER,
        0,
        &spec_i_pt(0x77, &[tid_00b_iqn_d(), tid_01b_iqn_e()]),
    );
    assert_eq!(keys(&s), [0x77, 0x77, 0x77]);
    assert_eq!(s.generation, 1);
    // Format 00b covers every ISID of iqn.d; format 01b only ISID 800000000001.
    assert!(s.registration(&nexus("iqn.d", 9, 1)).is_some());
    assert!(s.registration(&nexus("iqn.e", 1, 1)).is_some());
    assert!(s.registration(&nexus("iqn.e", 2, 1)).is_none());
    // Without ALL_TG_PT only on the target port that received the command.
    assert!(s.registration(&nexus("iqn.d", 9, 2)).is_none());
}

#[test]
fn spec_i_pt_naming_a_registered_nexus_fails_and_registers_nobody() {
    let s = registered(&[(&nexus("iqn.e", 1, 1), 0x5)]);
    let p = spec_i_pt(0x77, &[tid_00b_iqn_d(), tid_01b_iqn_e()]);
    // INVALID FIELD IN PARAMETER LIST, field pointer at the second TransportID (byte 28 + 24 =
    // 52 = 0034h): SKSV=1, C/D=0, BPV=0.
    assert_eq!(
        sense(run(&s, &a(), REGISTER, 0, &p)),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x34])
    );
}

#[test]
fn spec_i_pt_with_the_same_transport_id_twice_fails() {
    let p = spec_i_pt(0x77, &[tid_00b_iqn_d(), tid_00b_iqn_d()]);
    assert_eq!(
        sense(run(&PrState::default(), &a(), REGISTER, 0, &p)),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x34])
    );
}

#[test]
fn spec_i_pt_from_a_registered_nexus_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let mut p = spec_i_pt(0x77, &[tid_00b_iqn_d()]);
    p[..8].copy_from_slice(&0x10u64.to_be_bytes());
    // Field pointer byte 20 bit 3 (SPEC_I_PT): SKSV | BPV | 3 = 8Bh.
    assert_eq!(
        sense(run(&s, &a(), REGISTER, 0, &p)),
        fixed(0x05, 0x26, 0x00, [0x8B, 0x00, 0x14])
    );
}

#[test]
fn spec_i_pt_with_register_and_ignore_existing_key_is_invalid_field_in_parameter_list() {
    // SPC-5 6.17.3: SPEC_I_PT set to one for any service action except REGISTER is INVALID
    // FIELD IN PARAMETER LIST; nobody is registered.
    let p = spec_i_pt(0x77, &[tid_00b_iqn_d()]);
    // Field pointer byte 20 bit 3 (SPEC_I_PT): SKSV | BPV | 3 = 8Bh.
    assert_eq!(
        sense(run(&PrState::default(), &a(), REGISTER_IGNORE, 0, &p)),
        fixed(0x05, 0x26, 0x00, [0x8B, 0x00, 0x14])
    );
}

#[test]
fn spec_i_pt_with_reserve_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let p = basic(0x10, 0, 0x08);
    assert_eq!(
        sense(run(&s, &a(), RESERVE, WE, &p)),
        fixed(0x05, 0x26, 0x00, [0x8B, 0x00, 0x14])
    );
}

#[test]
fn spec_i_pt_with_unknown_protocol_points_at_protocol_identifier() {
    let mut t = tid_00b_iqn_d();
    t[0] = 0x06; // SAS
                 // TransportID at byte 28 (1Ch), PROTOCOL IDENTIFIER bits 3..0: bit pointer 3.
    assert_eq!(
        sense(run(
            &PrState::default(),
            &a(),
            REGISTER,
            0,
            &spec_i_pt(1, &[t])
        )),
        fixed(0x05, 0x26, 0x00, [0x8B, 0x00, 0x1C])
    );
}

#[test]
fn spec_i_pt_transport_id_longer_than_the_list_is_invalid() {
    let mut t = tid_00b_iqn_d();
    t[3] = 0x18; // ADDITIONAL LENGTH 24, but only 20 bytes follow
                 // Points at ADDITIONAL LENGTH (byte 28 + 2 = 1Eh).
    assert_eq!(
        sense(run(
            &PrState::default(),
            &a(),
            REGISTER,
            0,
            &spec_i_pt(1, &[t])
        )),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x1E])
    );
}

#[test]
fn spec_i_pt_length_mismatch_is_parameter_list_length_error() {
    let mut p = spec_i_pt(1, &[tid_00b_iqn_d()]);
    p.push(0);
    // PARAMETER LIST LENGTH ERROR: ILLEGAL REQUEST, 1Ah/00h.
    assert_eq!(
        sense(run(&PrState::default(), &a(), REGISTER, 0, &p)),
        fixed(0x05, 0x1A, 0x00, [0, 0, 0])
    );
}

// ---- parameter list and CDB checks ----------------------------------------------------------

#[test]
fn parameter_list_length_other_than_24_is_parameter_list_length_error() {
    for len in [0usize, 23, 25, 32] {
        let mut p = basic(0, 1, 0);
        p.resize(len, 0);
        assert_eq!(
            sense(run(&PrState::default(), &a(), REGISTER, 0, &p)),
            fixed(0x05, 0x1A, 0x00, [0, 0, 0]),
            "length {len}"
        );
    }
}

#[test]
fn reserved_bits_in_the_parameter_list_are_invalid_field_in_parameter_list() {
    // byte 20 bit 7 -> 8Fh 00h 14h; byte 20 bit 1 -> 89h 00h 14h; byte 21 -> 8Fh 00h 15h.
    let cases: [(u8, usize, [u8; 3]); 3] = [
        (0x10, 20, [0x8F, 0x00, 0x14]),
        (0x02, 20, [0x89, 0x00, 0x14]),
        (0x01, 21, [0x8F, 0x00, 0x15]),
    ];
    for (bits, at, sks) in cases {
        let mut p = basic(0, 1, 0);
        p[at] |= bits;
        assert_eq!(
            sense(run(&PrState::default(), &a(), REGISTER, 0, &p)),
            fixed(0x05, 0x26, 0x00, sks)
        );
    }
}

#[test]
fn invalid_type_is_invalid_field_in_cdb_at_byte_2_bit_3() {
    let s = registered(&[(&a(), 0x10)]);
    for ty in [0x0, 0x2, 0x4, 0x9, 0xF] {
        // INVALID FIELD IN CDB (24h/00h), SKSV | C/D | BPV | bit 3 = CBh, byte 0002h.
        assert_eq!(
            sense(run(&s, &a(), RESERVE, ty, &basic(0x10, 0, 0))),
            fixed(0x05, 0x24, 0x00, [0xCB, 0x00, 0x02])
        );
    }
}

#[test]
fn scope_other_than_lu_scope_is_invalid_field_in_cdb_at_byte_2_bit_7() {
    let s = registered(&[(&a(), 0x10)]);
    let r = out(&s, &a(), RESERVE, 0x1, WE, &basic(0x10, 0, 0));
    assert_eq!(sense(r), fixed(0x05, 0x24, 0x00, [0xCF, 0x00, 0x02]));
}

#[test]
fn register_ignores_type_and_scope() {
    let r = out(
        &PrState::default(),
        &a(),
        REGISTER,
        0xF,
        0xF,
        &basic(0, 1, 0),
    );
    assert!(r.is_ok());
}

#[test]
fn reserved_service_actions_are_invalid_field_in_cdb() {
    // SPC-5 6.17.2 table 213: 09h..1Fh reserved. SERVICE ACTION: byte 1 bits 4..0: CCh 00h 01h.
    for sa in [0x09, 0x1F] {
        assert_eq!(
            sense(run(&PrState::default(), &a(), sa, WE, &basic(0, 0, 0))),
            fixed(0x05, 0x24, 0x00, [0xCC, 0x00, 0x01])
        );
    }
}

#[test]
fn replace_lost_reservation_when_nothing_was_lost_is_invalid_release_of_persistent_reservation() {
    // SPC-5 "Replacing lost reservations": "If the device server has not detected that
    // persistent reservation information has been lost ... ILLEGAL REQUEST ... INVALID RELEASE
    // OF PERSISTENT RESERVATION" (26h/04h; no field pointer). Nothing changes.
    let s0 = registered(&[(&a(), 0x10)]);
    let s1 = ok(&s0, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    for s in [PrState::default(), s0, s1] {
        assert_eq!(
            sense(run(&s, &a(), REPLACE_LOST, WE, &basic(0, 0x20, 0))),
            fixed(0x05, 0x26, 0x04, [0, 0, 0])
        );
        assert_eq!(
            sense(run(&s, &b(), REPLACE_LOST, EA_AR, &basic(0, 0x20, 0x01))),
            fixed(0x05, 0x26, 0x04, [0, 0, 0])
        );
    }
}

// ---- RESERVE / RELEASE (SPC-5 5.14.9, 5.14.11.2.2) ------------------------------------------

#[test]
fn reserve_every_type_then_release_leaves_the_generation_alone() {
    let s0 = registered(&[(&a(), 0x10)]);
    for ty in [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR] {
        let s = ok(&s0, &a(), RESERVE, ty, &basic(0x10, 0, 0));
        let r = s.reservation.clone().unwrap();
        assert_eq!(r.ty.code(), ty);
        assert_eq!(r.holder.is_none(), ty == WE_AR || ty == EA_AR);
        assert_eq!(s.generation, s0.generation);
        let s = ok(&s, &a(), RELEASE, ty, &basic(0x10, 0, 0));
        assert_eq!(s.reservation, None);
        assert_eq!(s.generation, s0.generation);
    }
}

#[test]
fn reserve_from_an_unregistered_nexus_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &b(), RESERVE, WE, &basic(0, 0, 0)));
}

#[test]
fn reserve_with_the_wrong_key_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &a(), RESERVE, WE, &basic(0x11, 0, 0)));
}

#[test]
fn holder_reserving_again_with_the_same_type_is_good_and_changes_nothing() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    let e = run(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0)).unwrap();
    assert!(!e.changed);
}

#[test]
fn holder_reserving_with_another_type_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    conflict(run(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0)));
}

#[test]
fn another_registrant_reserving_conflicts() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE_RO, &basic(0x10, 0, 0));
    conflict(run(&s, &b(), RESERVE, WE_RO, &basic(0x20, 0, 0)));
}

#[test]
fn every_registrant_holds_an_all_registrants_reservation() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE_AR, &basic(0x10, 0, 0));
    assert!(s.is_holder(&b()));
    // b reserving the same type is the holder re-reserving: GOOD, no change.
    assert!(
        !run(&s, &b(), RESERVE, WE_AR, &basic(0x20, 0, 0))
            .unwrap()
            .changed
    );
    // and b may release it for everyone.
    let e = run(&s, &b(), RELEASE, WE_AR, &basic(0x20, 0, 0)).unwrap();
    assert_eq!(e.state.reservation, None);
}

#[test]
fn release_with_another_type_is_invalid_release_of_persistent_reservation() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    // ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
    let r = run(&s, &a(), RELEASE, WE, &basic(0x10, 0, 0));
    assert_eq!(
        sense(r),
        vec![0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x26, 0x04, 0, 0, 0, 0]
    );
}

#[test]
fn release_by_a_registrant_that_does_not_hold_it_is_good_and_changes_nothing() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    let e = run(&s, &b(), RELEASE, EA, &basic(0x20, 0, 0)).unwrap();
    assert!(!e.changed);
}

#[test]
fn release_without_a_reservation_is_good() {
    let s = registered(&[(&a(), 0x10)]);
    assert!(
        !run(&s, &a(), RELEASE, EA, &basic(0x10, 0, 0))
            .unwrap()
            .changed
    );
}

#[test]
fn release_with_a_reserved_type_is_good_from_a_non_holder_and_invalid_release_from_the_holder() {
    // SPC-5 5.14.11.2.2: a registered nexus that holds no reservation releases nothing and
    // gets GOOD, whatever SCOPE and TYPE say; the holder's SCOPE and TYPE must match its
    // reservation, else INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h). TYPE 0 is
    // reserved (SPC-5 table 212).
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    assert!(
        !run(&s, &a(), RELEASE, 0, &basic(0x10, 0, 0))
            .unwrap()
            .changed
    );
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    assert!(
        !run(&s, &b(), RELEASE, 0, &basic(0x20, 0, 0))
            .unwrap()
            .changed
    );
    assert_eq!(
        sense(run(&s, &a(), RELEASE, 0, &basic(0x10, 0, 0))),
        vec![0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x26, 0x04, 0, 0, 0, 0]
    );
    // SCOPE other than LU_SCOPE (0h) from the holder: the same.
    assert_eq!(
        sense(out(&s, &a(), RELEASE, 0x1, EA, &basic(0x10, 0, 0))),
        vec![0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x26, 0x04, 0, 0, 0, 0]
    );
}

#[test]
fn release_from_an_unregistered_nexus_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &b(), RELEASE, EA, &basic(0, 0, 0)));
}

#[test]
fn releasing_a_registrants_only_reservation_tells_the_other_registrants() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, EA_RO, &basic(0x10, 0, 0));
    let e = run(&s, &a(), RELEASE, EA_RO, &basic(0x10, 0, 0)).unwrap();
    // Every registrant gets RESERVATIONS RELEASED; the LU skips the sender's own nexus.
    let who: Vec<_> = e.unit_attentions.iter().map(|(w, _)| w.clone()).collect();
    assert_eq!(who, [Registrant::of(&a()), Registrant::of(&b())]);
    for (_, s) in &e.unit_attentions {
        assert_eq!((s.key, s.asc, s.ascq), (0x06, 0x2A, 0x04));
    }
}

#[test]
fn releasing_write_exclusive_tells_nobody() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(&s, &a(), RELEASE, WE, &basic(0x10, 0, 0)).unwrap();
    assert!(e.unit_attentions.is_empty());
}

// ---- CLEAR (SPC-5 5.14.11.2.6) --------------------------------------------------------------

#[test]
fn clear_removes_everything_bumps_generation_once_and_tells_every_registrant() {
    // libiscsi test_prout_clear_simple: generation incremented once for CLEAR, not for
    // RESERVE.
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let g = s.generation;
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    let e = run(&s, &a(), CLEAR, 0, &basic(0x10, 0, 0)).unwrap();
    assert!(e.state.registrations.is_empty());
    assert_eq!(e.state.reservation, None);
    assert_eq!(e.state.generation, g + 1);
    assert_eq!(e.unit_attentions.len(), 2);
    for (_, s) in &e.unit_attentions {
        // RESERVATIONS PREEMPTED, 2Ah/03h.
        assert_eq!((s.key, s.asc, s.ascq), (0x06, 0x2A, 0x03));
    }
}

#[test]
fn clear_with_the_wrong_key_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &a(), CLEAR, 0, &basic(0x11, 0, 0)));
}

#[test]
fn clear_from_an_unregistered_nexus_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &b(), CLEAR, 0, &basic(0, 0, 0)));
}

// ---- PREEMPT / PREEMPT AND ABORT (SPC-5 5.14.11.2.4, 5.14.11.2.5) ---------------------------

#[test]
fn preempt_without_reservation_removes_the_registrations_of_the_key() {
    // libiscsi test_prout_preempt_rm_reg: k2 preempts k1, generation + 1, k2 remains.
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let g = s.generation;
    let e = run(&s, &b(), PREEMPT, EA, &basic(0x20, 0x10, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x20]);
    assert_eq!(e.state.generation, g + 1);
    assert_eq!(e.state.reservation, None);
    assert_eq!(e.unit_attentions.len(), 1);
    assert_eq!(e.unit_attentions[0].0, Registrant::of(&a()));
    let ua = e.unit_attentions[0].1;
    // REGISTRATIONS PREEMPTED, 2Ah/05h.
    assert_eq!((ua.key, ua.asc, ua.ascq), (0x06, 0x2A, 0x05));
    assert!(e.abort.is_empty());
}

#[test]
fn preempt_of_the_holder_takes_the_reservation_with_the_new_type() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20), (&c(), 0x30)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(&s, &b(), PREEMPT, EA, &basic(0x20, 0x10, 0)).unwrap();
    let r = e.state.reservation.clone().unwrap();
    assert_eq!(r.ty, PrType::ExclusiveAccess);
    assert!(e.state.is_holder(&b()));
    assert_eq!(keys(&e.state), [0x20, 0x30]);
    // a: REGISTRATIONS PREEMPTED; b and c (kept their registrations, type changed):
    // RESERVATIONS RELEASED, which the logical unit leaves out for the sending nexus itself.
    let uas: Vec<_> = e
        .unit_attentions
        .iter()
        .map(|(w, s)| (w.clone(), s.ascq))
        .collect();
    assert_eq!(
        uas,
        [
            (Registrant::of(&a()), 0x05),
            (Registrant::of(&b()), 0x04),
            (Registrant::of(&c()), 0x04)
        ]
    );
}

#[test]
fn preempt_that_changes_the_type_tells_the_senders_other_nexuses() {
    // SPC-5 5.14.11.2.4: RESERVATIONS RELEASED for every I_T nexus whose registration was not
    // removed "except for the I_T nexus on which the PERSISTENT RESERVE OUT command was
    // received". a registered with ALL_TG_PT=1 (byte 20 bit 2), so its nexus on target port 2
    // must be told: the registrant is in the list (the logical unit skips the sending nexus).
    let s = ok(
        &PrState::default(),
        &a(),
        REGISTER_IGNORE,
        0,
        &basic(0, 0xA, 0x04),
    );
    let s = ok(&s, &b(), REGISTER_IGNORE, 0, &basic(0, 0xB, 0));
    let s = ok(&s, &b(), RESERVE, WE, &basic(0xB, 0, 0));
    let e = run(&s, &a(), PREEMPT, WE_RO, &basic(0xA, 0xB, 0)).unwrap();
    let me = s.registration(&nexus("iqn.a", 1, 2)).unwrap().who.clone();
    assert!(
        e.unit_attentions
            .iter()
            .any(|(w, s)| *w == me && (s.key, s.asc, s.ascq) == (0x06, 0x2A, 0x04)),
        "{:?}",
        e.unit_attentions
    );
}

#[test]
fn preempt_that_only_removes_registrations_removes_the_senders_own_too() {
    // SPC-5 "Removing registrations" (no reservation, or the key does not name the holder):
    // "Remove the registrations for all I_T nexuses specified by the SERVICE ACTION
    // RESERVATION KEY field", with no exception for the sender (unlike preempting a
    // reservation). a and b share key 11h; a preempts with 11h.
    let s = registered(&[(&a(), 0x11), (&b(), 0x11), (&c(), 0x30)]);
    let e = run(&s, &a(), PREEMPT, WE, &basic(0x11, 0x11, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x30]);
    assert_eq!(e.state.reservation, None);
    assert_eq!(e.state.generation, s.generation.wrapping_add(1));
    // REGISTRATIONS PREEMPTED to both (the logical unit leaves out the sending nexus).
    let uas: Vec<_> = e
        .unit_attentions
        .iter()
        .map(|(w, s)| (w.clone(), s.ascq))
        .collect();
    assert_eq!(
        uas,
        [(Registrant::of(&a()), 0x05), (Registrant::of(&b()), 0x05)]
    );
}

#[test]
fn preempt_removing_the_last_all_registrants_registrations_ends_the_reservation() {
    // An All Registrants reservation with a non-zero SERVICE ACTION RESERVATION KEY only
    // removes registrations (SPC-5 5.14.11.2.4); when the key names every registrant, the
    // sender included, none is left and the reservation goes with the last (5.14.10).
    let s = registered(&[(&a(), 0x11), (&b(), 0x11)]);
    let s = ok(&s, &a(), RESERVE, WE_AR, &basic(0x11, 0, 0));
    let e = run(&s, &a(), PREEMPT, WE_AR, &basic(0x11, 0x11, 0)).unwrap();
    assert!(keys(&e.state).is_empty());
    assert_eq!(e.state.reservation, None);
    // With a registrant left, the reservation stays.
    let s = registered(&[(&a(), 0x11), (&b(), 0x11), (&c(), 0x30)]);
    let s = ok(&s, &a(), RESERVE, WE_AR, &basic(0x11, 0, 0));
    let e = run(&s, &a(), PREEMPT, WE_AR, &basic(0x11, 0x11, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x30]);
    assert_eq!(
        e.state.reservation.unwrap().ty,
        PrType::WriteExclusiveAllRegistrants
    );
}

#[test]
fn preempt_of_the_holder_with_the_same_type_sends_no_reservations_released() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20), (&c(), 0x30)]);
    let s = ok(&s, &a(), RESERVE, WE_RO, &basic(0x10, 0, 0));
    let e = run(&s, &b(), PREEMPT, WE_RO, &basic(0x20, 0x10, 0)).unwrap();
    assert_eq!(e.unit_attentions.len(), 1);
    assert_eq!(e.unit_attentions[0].1.ascq, 0x05);
}

#[test]
fn preempt_self_changes_the_type_and_keeps_the_registration() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(&s, &a(), PREEMPT, EA_RO, &basic(0x10, 0x10, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x10]);
    assert_eq!(
        e.state.reservation.as_ref().map(|r| r.ty),
        Some(PrType::ExclusiveAccessRegistrantsOnly)
    );
    assert!(e.state.is_holder(&a()));
    assert_eq!(e.state.generation, s.generation + 1);
}

#[test]
fn preempt_with_zero_key_and_no_all_registrants_reservation_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    // SERVICE ACTION RESERVATION KEY at byte 8: 80h 00h 08h.
    let want = fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x08]);
    assert_eq!(sense(run(&s, &a(), PREEMPT, EA, &basic(0x10, 0, 0))), want);
    let s = ok(&s, &b(), RESERVE, WE, &basic(0x20, 0, 0));
    assert_eq!(sense(run(&s, &a(), PREEMPT, EA, &basic(0x10, 0, 0))), want);
}

#[test]
fn preempt_with_zero_key_under_all_registrants_removes_everyone_else() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20), (&c(), 0x30)]);
    let s = ok(&s, &b(), RESERVE, EA_AR, &basic(0x20, 0, 0));
    let e = run(&s, &a(), PREEMPT_AND_ABORT, WE_RO, &basic(0x10, 0, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x10]);
    let r = e.state.reservation.clone().unwrap();
    assert_eq!(r.ty, PrType::WriteExclusiveRegistrantsOnly);
    assert_eq!(r.holder, Some(Registrant::of(&a())));
    // SPC-5 5.14.11.2.6: "If the SERVICE ACTION RESERVATION KEY field is set to zero and an
    // all registrants persistent reservation is present, the device server shall abort all
    // commands for all registered I_T nexuses": the sender's too (the LU keeps this one).
    assert_eq!(
        e.abort,
        [
            Registrant::of(&a()),
            Registrant::of(&b()),
            Registrant::of(&c())
        ]
    );
}

#[test]
fn preempt_with_nonzero_key_under_all_registrants_only_removes_registrations() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &b(), RESERVE, WE_AR, &basic(0x20, 0, 0));
    let e = run(&s, &a(), PREEMPT, EA, &basic(0x10, 0x20, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x10]);
    assert_eq!(
        e.state.reservation.as_ref().map(|r| r.ty),
        Some(PrType::WriteExclusiveAllRegistrants)
    );
}

#[test]
fn preempt_naming_no_registration_conflicts() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x20)]);
    conflict(run(&s, &a(), PREEMPT, EA, &basic(0x10, 0x99, 0)));
}

#[test]
fn preempt_from_an_unregistered_nexus_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    conflict(run(&s, &b(), PREEMPT, EA, &basic(0, 0x10, 0)));
}

#[test]
fn preempt_removes_every_registration_sharing_the_key() {
    let s = registered(&[(&a(), 0x10), (&a2(), 0x10), (&b(), 0x20)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(&s, &b(), PREEMPT_AND_ABORT, WE, &basic(0x20, 0x10, 0)).unwrap();
    assert_eq!(keys(&e.state), [0x20]);
    assert_eq!(e.abort, [Registrant::of(&a()), Registrant::of(&a2())]);
    assert!(e.state.is_holder(&b()));
}

#[test]
fn preempt_and_abort_self_lists_the_sender_for_abort() {
    // The LU aborts the sender's other tasks, not the PERSISTENT RESERVE OUT itself.
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, EA, &basic(0x10, 0, 0));
    let e = run(&s, &a(), PREEMPT_AND_ABORT, EA, &basic(0x10, 0x10, 0)).unwrap();
    assert_eq!(e.abort, [Registrant::of(&a())]);
    assert!(e.unit_attentions.is_empty());
}

// ---- REGISTER AND MOVE (SPC-5 5.14.8, parameter list SPC-5 6.17.5) --------------------------

/// REGISTER AND MOVE parameter list (SPC-5 6.17.5, table 218): RESERVATION KEY, SERVICE ACTION
/// RESERVATION KEY, reserved byte 16, byte 17 UNREG (bit 1) APTPL (bit 0), RELATIVE TARGET
/// PORT IDENTIFIER (18..19), TRANSPORTID PARAMETER DATA LENGTH (20..23), TransportID.
fn moving(rk: u64, sark: u64, b17: u8, rtpi: u16, tid: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&rk.to_be_bytes());
    p.extend_from_slice(&sark.to_be_bytes());
    p.extend_from_slice(&[0, b17]);
    p.extend_from_slice(&rtpi.to_be_bytes());
    p.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(tid);
    p
}

/// iSCSI TransportID format 01b for iqn.b ISID 800000000001 (nexus b()).
fn tid_b() -> Vec<u8> {
    let mut t = vec![0x45, 0x00, 0x00, 0x18];
    t.extend_from_slice(b"iqn.b,i,0x800000000001");
    t.resize(28, 0);
    t
}

/// iSCSI TransportID format 01b for iqn.a ISID 800000000001 (nexus a()): 45h (PROTOCOL
/// IDENTIFIER 5h, FORMAT CODE 01b), reserved, ADDITIONAL LENGTH 0018h, then the name, ",i,0x"
/// and the ISID, NUL-padded to 24 bytes (SPC-5 7.6.4.6).
fn tid_a() -> Vec<u8> {
    let mut t = vec![0x45, 0x00, 0x00, 0x18];
    t.extend_from_slice(b"iqn.a,i,0x800000000001");
    t.resize(28, 0);
    t
}

#[test]
fn register_and_move_gives_the_reservation_to_a_new_registrant() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, EA_RO, &basic(0x10, 0, 0));
    let e = run(
        &s,
        &a(),
        REGISTER_AND_MOVE,
        0,
        &moving(0x10, 0x20, 0, 1, &tid_b()),
    )
    .unwrap();
    assert_eq!(keys(&e.state), [0x10, 0x20]);
    assert!(e.state.is_holder(&b()));
    assert!(!e.state.is_holder(&a()));
    assert_eq!(
        e.state.reservation.as_ref().map(|r| r.ty),
        Some(PrType::ExclusiveAccessRegistrantsOnly)
    );
    assert_eq!(e.state.generation, s.generation + 1);
    assert!(e.unit_attentions.is_empty());
}

#[test]
fn register_and_move_with_unreg_drops_the_source() {
    let s = registered(&[(&a(), 0x10), (&b(), 0x5)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    let e = run(
        &s,
        &a(),
        REGISTER_AND_MOVE,
        0,
        &moving(0x10, 0x20, 0x02, 1, &tid_b()),
    )
    .unwrap();
    // b keeps its place and takes the new key; a is gone.
    assert_eq!(keys(&e.state), [0x20]);
    assert!(e.state.is_holder(&b()));
}

#[test]
fn register_and_move_with_no_reservation_is_invalid_field_in_cdb() {
    // SPC-5 5.14.8: "If a PERSISTENT RESERVE OUT command with a REGISTER AND MOVE service
    // action is received and there is no persistent reservation established, the device server
    // shall terminate the command with CHECK CONDITION status, with the sense key set to
    // ILLEGAL REQUEST and the additional sense code set to INVALID FIELD IN CDB."
    // 24h/00h; SKSV | C/D | bit 4 = CCh, byte 0001h (SERVICE ACTION).
    let s = registered(&[(&a(), 0x10), (&c(), 0x30)]);
    let r = run(
        &s,
        &a(),
        REGISTER_AND_MOVE,
        0,
        &moving(0x10, 0x20, 0, 1, &tid_b()),
    );
    assert_eq!(sense(r), fixed(0x05, 0x24, 0x00, [0xCC, 0x00, 0x01]));
}

#[test]
fn register_and_move_by_a_non_holder_conflicts() {
    let s = registered(&[(&a(), 0x10), (&c(), 0x30)]);
    let s = ok(&s, &c(), RESERVE, WE, &basic(0x30, 0, 0));
    conflict(run(
        &s,
        &a(),
        REGISTER_AND_MOVE,
        0,
        &moving(0x10, 0x20, 0, 1, &tid_b()),
    ));
}

#[test]
fn register_and_move_of_an_all_registrants_reservation_conflicts() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, WE_AR, &basic(0x10, 0, 0));
    conflict(run(
        &s,
        &a(),
        REGISTER_AND_MOVE,
        0,
        &moving(0x10, 0x20, 0, 1, &tid_b()),
    ));
}

#[test]
fn register_and_move_to_itself_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    assert_eq!(
        sense(run(
            &s,
            &a(),
            REGISTER_AND_MOVE,
            0,
            &moving(0x10, 0x20, 0, 1, &tid_a())
        )),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x18])
    );
}

#[test]
fn register_and_move_to_the_sender_through_another_target_port_is_invalid_field_in_parameter_list()
{
    // The TransportID names the sender's own initiator port (iqn.a, ISID 800000000001); the
    // RELATIVE TARGET PORT IDENTIFIER names port 2, which c() registered through. Still the
    // sender's initiator port: 26h/00h at the TransportID, byte 24 (18h).
    let s = registered(&[(&a(), 0x10), (&c(), 0x30)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    assert_eq!(
        sense(run(
            &s,
            &a(),
            REGISTER_AND_MOVE,
            0,
            &moving(0x10, 0x20, 0, 2, &tid_a())
        )),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x18])
    );
}

#[test]
fn register_and_move_to_an_unknown_target_port_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    // RELATIVE TARGET PORT IDENTIFIER at byte 18 (12h).
    assert_eq!(
        sense(run(
            &s,
            &a(),
            REGISTER_AND_MOVE,
            0,
            &moving(0x10, 0x20, 0, 9, &tid_b())
        )),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x12])
    );
}

#[test]
fn register_and_move_with_zero_key_is_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let s = ok(&s, &a(), RESERVE, WE, &basic(0x10, 0, 0));
    assert_eq!(
        sense(run(
            &s,
            &a(),
            REGISTER_AND_MOVE,
            0,
            &moving(0x10, 0, 0, 1, &tid_b())
        )),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x08])
    );
}

#[test]
fn register_and_move_length_must_match_the_transport_id_length() {
    let s = registered(&[(&a(), 0x10)]);
    let mut p = moving(0x10, 0x20, 0, 1, &tid_b());
    p.pop();
    assert_eq!(
        sense(run(&s, &a(), REGISTER_AND_MOVE, 0, &p)),
        fixed(0x05, 0x1A, 0x00, [0, 0, 0])
    );
}

#[test]
fn register_and_move_reserved_bits_are_invalid_field_in_parameter_list() {
    let s = registered(&[(&a(), 0x10)]);
    let p = moving(0x10, 0x20, 0x04, 1, &tid_b());
    assert_eq!(
        sense(run(&s, &a(), REGISTER_AND_MOVE, 0, &p)),
        fixed(0x05, 0x26, 0x00, [0x8F, 0x00, 0x11])
    );
}
