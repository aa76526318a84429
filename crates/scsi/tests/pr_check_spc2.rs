//! SPC-2 reservations (`scsi::pr::spc2`): RESERVE/RELEASE (SPC-2), their meeting with
//! persistent reservations (SPC-5 5.13.3 with CRH = 1, SPC-2 5.5.1), and the commands another
//! I_T nexus may send while one is held. Rows are literals; every row of the opcode table has
//! one.

#![allow(clippy::unwrap_used)]

use scsi::cdb::{self, OPS};
use scsi::pr::out::Refusal;
use scsi::pr::spc2::{self, Spc2Outcome};
use scsi::pr::{PrState, PrType, Registrant, Registration, Reservation};
use scsi::{InitiatorPort, ItNexus, TargetPort, Transport};

const A: bool = true; // Allowed
const C: bool = false; // Conflict

fn nexus(name: &str, isid: u8) -> ItNexus {
    ItNexus {
        initiator: InitiatorPort {
            transport: Transport::Iscsi,
            name: name.into(),
            isid: Some([0x40, 0, 0, 0, 0, isid]),
        },
        target: TargetPort {
            name: "iqn.2026-01.io.sharedisk:disk0".into(),
            tpgt: 1,
            relative_id: 1,
        },
    }
}

fn one() -> ItNexus {
    nexus("iqn.2026-01.test:one", 1)
}
fn two() -> ItNexus {
    nexus("iqn.2026-01.test:two", 1)
}

fn registered(who: &[&ItNexus]) -> PrState {
    PrState {
        generation: who.len() as u32,
        aptpl: false,
        registrations: who
            .iter()
            .zip(1u64..)
            .map(|(n, key)| Registration {
                who: Registrant::of(n),
                key,
            })
            .collect(),
        reservation: None,
        lost: false,
    }
}

/// `one` and `two` registered, `one` holds a reservation of type `ty`.
fn reserved(ty: PrType) -> PrState {
    let mut st = registered(&[&one(), &two()]);
    st.reservation = Some(Reservation {
        ty,
        scope: 0,
        holder: (!ty.all_registrants()).then(|| Registrant::of(&one())),
    });
    st
}

// ---- RESERVE and RELEASE without persistent reservations (SPC-2 RESERVE, RELEASE) ----

#[test]
fn reserve_when_unreserved_reserves() {
    let pr = PrState::default();
    assert_eq!(spc2::reserve(&pr, None, &one()), Ok(Spc2Outcome::Reserved));
}

#[test]
fn reserve_again_by_the_holder_is_good() {
    let pr = PrState::default();
    assert_eq!(
        spc2::reserve(&pr, Some(&one()), &one()),
        Ok(Spc2Outcome::NoChange)
    );
}

#[test]
fn reserve_by_another_nexus_conflicts() {
    let pr = PrState::default();
    assert_eq!(
        spc2::reserve(&pr, Some(&one()), &two()),
        Err(Refusal::Conflict)
    );
    // The same initiator name through another session (ISID) is another I_T nexus.
    let other_session = nexus("iqn.2026-01.test:one", 2);
    assert_eq!(
        spc2::reserve(&pr, Some(&one()), &other_session),
        Err(Refusal::Conflict)
    );
}

#[test]
fn release_by_the_holder_releases() {
    let pr = PrState::default();
    assert_eq!(
        spc2::release(&pr, Some(&one()), &one()),
        Ok(Spc2Outcome::Released)
    );
}

#[test]
fn release_by_another_nexus_is_good_without_effect() {
    // SPC-2 RELEASE: GOOD, and the reservation stays.
    let pr = PrState::default();
    assert_eq!(
        spc2::release(&pr, Some(&one()), &two()),
        Ok(Spc2Outcome::NoChange)
    );
}

#[test]
fn release_when_unreserved_is_good() {
    let pr = PrState::default();
    assert_eq!(spc2::release(&pr, None, &one()), Ok(Spc2Outcome::NoChange));
}

// ---- with persistent reservations (SPC-5 5.13.3, CRH = 1; SPC-2 5.5.1) ----

/// (type, whose command: 'h' holder, 'r' registered non-holder (a registrant under All
/// Registrants types, so a holder there), 'u' not registered) → RESERVE/RELEASE outcome; the
/// same for RESERVE and RELEASE.
#[test]
fn reserve_and_release_under_a_persistent_reservation() {
    use PrType::*;
    const GOOD: Result<Spc2Outcome, Refusal> = Ok(Spc2Outcome::NoChange);
    const CONFLICT: Result<Spc2Outcome, Refusal> = Err(Refusal::Conflict);
    let rows: &[(PrType, char, Result<Spc2Outcome, Refusal>)] = &[
        // a) the persistent reservation holder: GOOD, nothing changes.
        (WriteExclusive, 'h', GOOD),
        (ExclusiveAccess, 'h', GOOD),
        (WriteExclusiveRegistrantsOnly, 'h', GOOD),
        (ExclusiveAccessRegistrantsOnly, 'h', GOOD),
        (WriteExclusiveAllRegistrants, 'h', GOOD),
        (ExclusiveAccessAllRegistrants, 'h', GOOD),
        // b) registered, with a Registrants Only / All Registrants reservation: GOOD.
        (WriteExclusiveRegistrantsOnly, 'r', GOOD),
        (ExclusiveAccessRegistrantsOnly, 'r', GOOD),
        (WriteExclusiveAllRegistrants, 'r', GOOD),
        (ExclusiveAccessAllRegistrants, 'r', GOOD),
        // Otherwise SPC-2: registrations exist, so RESERVATION CONFLICT.
        (WriteExclusive, 'r', CONFLICT),
        (ExclusiveAccess, 'r', CONFLICT),
        (WriteExclusive, 'u', CONFLICT),
        (ExclusiveAccess, 'u', CONFLICT),
        (WriteExclusiveRegistrantsOnly, 'u', CONFLICT),
        (ExclusiveAccessRegistrantsOnly, 'u', CONFLICT),
        (WriteExclusiveAllRegistrants, 'u', CONFLICT),
        (ExclusiveAccessAllRegistrants, 'u', CONFLICT),
    ];
    for &(ty, role, want) in rows {
        let pr = reserved(ty);
        let who = match role {
            'h' => one(),
            'r' => two(),
            _ => nexus("iqn.2026-01.test:three", 1),
        };
        assert_eq!(
            spc2::reserve(&pr, None, &who),
            want,
            "{ty:?} {role} RESERVE"
        );
        assert_eq!(
            spc2::release(&pr, None, &who),
            want,
            "{ty:?} {role} RELEASE"
        );
    }
}

#[test]
fn registrations_without_a_reservation_make_reserve_and_release_conflict() {
    // SPC-2 5.5.1: "still registered by any initiator": every RESERVE and RELEASE conflicts,
    // the registrant's own included (no persistent reservation, so no CRH exception).
    let pr = registered(&[&one()]);
    for who in [one(), two()] {
        assert_eq!(spc2::reserve(&pr, None, &who), Err(Refusal::Conflict));
        assert_eq!(spc2::release(&pr, None, &who), Err(Refusal::Conflict));
    }
}

// ---- the check while an SPC-2 reservation is held ----

/// (command, CDB, from the holder, from another I_T nexus).
#[rustfmt::skip]
const ROWS: &[(&str, &[u8], bool, bool)] = &[
    ("TEST UNIT READY", &[0x00, 0, 0, 0, 0, 0], A, C),
    ("REQUEST SENSE", &[0x03, 0, 0, 0, 252, 0], A, A),
    ("READ(6)", &[0x08, 0, 0, 0, 1, 0], A, C),
    ("WRITE(6)", &[0x0A, 0, 0, 0, 1, 0], A, C),
    ("INQUIRY", &[0x12, 0, 0, 0, 36, 0], A, A),
    ("MODE SELECT(6)", &[0x15, 0x10, 0, 0, 0, 0], A, C),
    ("RESERVE(6)", &[0x16, 0, 0, 0, 0, 0], A, C),
    ("RELEASE(6)", &[0x17, 0, 0, 0, 0, 0], A, A),
    ("MODE SENSE(6)", &[0x1A, 0, 0x3F, 0, 255, 0], A, C),
    ("START STOP UNIT (START 1)", &[0x1B, 0, 0, 0, 0x01, 0], A, C),
    ("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 00b)", &[0x1E, 0, 0, 0, 0x00, 0], A, A),
    ("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 01b)", &[0x1E, 0, 0, 0, 0x01, 0], A, C),
    ("READ CAPACITY(10)", &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], A, C),
    ("READ(10)", &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("WRITE(10)", &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("WRITE AND VERIFY(10)", &[0x2E, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("VERIFY(10)", &[0x2F, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("PRE-FETCH(10)", &[0x34, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("SYNCHRONIZE CACHE(10)", &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], A, C),
    ("WRITE SAME(10)", &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], A, C),
    ("UNMAP", &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], A, C),
    ("MODE SELECT(10)", &[0x55, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], A, C),
    ("RESERVE(10)", &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], A, C),
    ("RELEASE(10)", &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], A, A),
    ("MODE SENSE(10)", &[0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 255, 0], A, C),
    // SPC-2 5.5.1: PERSISTENT RESERVE IN/OUT conflict regardless of initiator.
    ("PERSISTENT RESERVE IN, READ KEYS", &[0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0], C, C),
    ("PERSISTENT RESERVE IN, READ RESERVATION", &[0x5E, 0x01, 0, 0, 0, 0, 0, 0x10, 0, 0], C, C),
    ("PERSISTENT RESERVE IN, REPORT CAPABILITIES", &[0x5E, 0x02, 0, 0, 0, 0, 0, 0x10, 0, 0], C, C),
    ("PERSISTENT RESERVE IN, READ FULL STATUS", &[0x5E, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0], C, C),
    ("PERSISTENT RESERVE OUT, REGISTER", &[0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, RESERVE", &[0x5F, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, RELEASE", &[0x5F, 0x02, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, CLEAR", &[0x5F, 0x03, 0, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, PREEMPT", &[0x5F, 0x04, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, PREEMPT AND ABORT", &[0x5F, 0x05, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY", &[0x5F, 0x06, 0, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, REGISTER AND MOVE", &[0x5F, 0x07, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("PERSISTENT RESERVE OUT, REPLACE LOST RESERVATION", &[0x5F, 0x08, 0x01, 0, 0, 0, 0, 0, 24, 0], C, C),
    ("READ(16)", &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("COMPARE AND WRITE", &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("WRITE(16)", &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("ORWRITE(16)", &[0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("WRITE AND VERIFY(16)", &[0x8E, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("VERIFY(16)", &[0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("PRE-FETCH(16)", &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("SYNCHRONIZE CACHE(16)", &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], A, C),
    ("WRITE SAME(16)", &[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("READ CAPACITY(16)", &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], A, C),
    ("GET LBA STATUS", &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], A, C),
    ("REPORT LUNS", &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], A, A),
    ("REPORT SUPPORTED OPERATION CODES", &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], A, C),
    ("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], A, C),
    ("READ(12)", &[0xA8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("WRITE(12)", &[0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("WRITE AND VERIFY(12)", &[0xAE, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
    ("VERIFY(12)", &[0xAF, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], A, C),
];

fn allowed(holder: &ItNexus, who: &ItNexus, cdb: &[u8]) -> bool {
    let (info, _) = cdb::parse(cdb).unwrap_or_else(|e| panic!("{cdb:02x?} parses: {e:?}"));
    spc2::allowed(holder, who, info, cdb)
}

#[test]
fn every_opcode_table_row_has_an_spc2_row() {
    for op in OPS {
        let found = ROWS.iter().any(|(_, c, _, _)| {
            cdb::parse(c).is_ok_and(|(i, _)| i.opcode == op.opcode && i.sa == op.sa)
        });
        assert!(found, "{} {:?} has no row", op.name, op.sa);
    }
}

#[test]
fn commands_while_an_spc2_reservation_is_held() {
    for &(name, c, from_holder, from_other) in ROWS {
        assert_eq!(
            allowed(&one(), &one(), c),
            from_holder,
            "{name} from the holder"
        );
        assert_eq!(
            allowed(&one(), &two(), c),
            from_other,
            "{name} from another nexus"
        );
    }
}

/// libiscsi 1.19 test_reserve6_2initiators, replayed against the rules with the holder kept
/// as the logical unit keeps it.
#[test]
fn libiscsi_reserve6_two_initiators() {
    let pr = PrState::default();
    let mut holder: Option<ItNexus> = None;
    let mut run = |who: &ItNexus, reserve: bool| {
        let r = if reserve {
            spc2::reserve(&pr, holder.as_ref(), who)
        } else {
            spc2::release(&pr, holder.as_ref(), who)
        };
        match r {
            Ok(Spc2Outcome::Reserved) => holder = Some(who.clone()),
            Ok(Spc2Outcome::Released) => holder = None,
            _ => {}
        }
        (r, holder.clone())
    };
    const MODE_SENSE6: &[u8] = &[0x1A, 0, 0x3F, 0, 255, 0];
    let (sd, sd2) = (one(), two());
    // RESERVE6 from the first initiator, twice.
    assert_eq!(run(&sd, true).0, Ok(Spc2Outcome::Reserved));
    assert_eq!(run(&sd, true).0, Ok(Spc2Outcome::NoChange));
    // RESERVE6 from the second: RESERVATION CONFLICT (the check and RESERVE agree).
    assert!(!allowed(&sd, &sd2, &[0x16, 0, 0, 0, 0, 0]));
    assert_eq!(run(&sd2, true).0, Err(Refusal::Conflict));
    // RELEASE6 from the second: GOOD, a no-op.
    assert!(allowed(&sd, &sd2, &[0x17, 0, 0, 0, 0, 0]));
    assert_eq!(
        run(&sd2, false),
        (Ok(Spc2Outcome::NoChange), Some(sd.clone()))
    );
    // MODE SENSE(6): GOOD from the first, RESERVATION CONFLICT from the second.
    assert!(allowed(&sd, &sd, MODE_SENSE6));
    assert!(!allowed(&sd, &sd2, MODE_SENSE6));
    assert_eq!(run(&sd2, true).0, Err(Refusal::Conflict));
    // RELEASE6 from the first; then the second can reserve and release.
    assert_eq!(run(&sd, false), (Ok(Spc2Outcome::Released), None));
    assert_eq!(
        run(&sd2, true),
        (Ok(Spc2Outcome::Reserved), Some(sd2.clone()))
    );
    assert_eq!(run(&sd2, false), (Ok(Spc2Outcome::Released), None));
}
