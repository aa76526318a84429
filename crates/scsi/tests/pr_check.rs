//! The persistent reservation check (`scsi::pr::check::allowed`) against SPC-5 5.14.3 table 67
//! ("SPC commands that are allowed in the presence of various reservations"), the SBC-4 4.17
//! table ("SBC commands that are allowed in the presence of various reservations") and SPC-5's
//! table of PERSISTENT RESERVE OUT service actions allowed in the presence of various
//! reservations.
//!
//! The rows are transcribed from the tables as literals, one CDB per row; every row of the
//! opcode table must have one (so a new command cannot go unchecked).

#![allow(clippy::unwrap_used)]

use scsi::cdb::{self, OPS};
use scsi::pr::{check, PrState, PrType, Registrant, Registration, Reservation};
use scsi::{InitiatorPort, ItNexus, TargetPort, Transport};

const A: bool = true; // Allowed
const C: bool = false; // Conflict

fn nexus(name: &str) -> ItNexus {
    ItNexus {
        initiator: InitiatorPort {
            transport: Transport::Iscsi,
            name: name.into(),
            isid: Some([0x40, 0, 0, 0, 0, 1]),
        },
        target: TargetPort {
            name: "iqn.2026-01.io.sharedisk:disk0".into(),
            tpgt: 1,
            relative_id: 1,
        },
    }
}

fn holder() -> ItNexus {
    nexus("iqn.2026-01.test:holder")
}
fn registered() -> ItNexus {
    nexus("iqn.2026-01.test:registered")
}
fn stranger() -> ItNexus {
    nexus("iqn.2026-01.test:stranger")
}

/// `holder` and `registered` registered; `holder` holds a reservation of type `ty` (for All
/// Registrants types both hold it).
fn state(ty: PrType) -> PrState {
    PrState {
        generation: 2,
        aptpl: false,
        registrations: vec![
            Registration {
                who: Registrant::of(&holder()),
                key: 0x1111,
            },
            Registration {
                who: Registrant::of(&registered()),
                key: 0x2222,
            },
        ],
        reservation: Some(Reservation {
            ty,
            scope: 0,
            holder: if ty.all_registrants() {
                None
            } else {
                Some(Registrant::of(&holder()))
            },
        }),
        lost: false,
    }
}

fn check_cdb(st: &PrState, who: &ItNexus, cdb: &[u8]) -> bool {
    let (info, _) = cdb::parse(cdb).unwrap_or_else(|e| panic!("{cdb:02x?} parses: {e:?}"));
    check::allowed(st, who, info, cdb)
}

const ALL_TYPES: [PrType; 6] = [
    PrType::WriteExclusive,
    PrType::ExclusiveAccess,
    PrType::WriteExclusiveRegistrantsOnly,
    PrType::ExclusiveAccessRegistrantsOnly,
    PrType::WriteExclusiveAllRegistrants,
    PrType::ExclusiveAccessAllRegistrants,
];

/// One row of the tables: the command's CDB and its five columns — reservation held by another
/// I_T nexus, of type Write Exclusive | Exclusive Access (from any I_T nexus) | a Registrants
/// Only or All Registrants type, from a registered I_T nexus | not registered, Write Exclusive
/// RO/AR | not registered, Exclusive Access RO/AR.
struct Row {
    name: &'static str,
    cdb: &'static [u8],
    cols: [bool; 5],
}

const fn row(name: &'static str, cdb: &'static [u8], cols: [bool; 5]) -> Row {
    Row { name, cdb, cols }
}

/// SPC-5 table 67 and the SBC-4 4.17 table, for every command the opcode table has
/// (PERSISTENT RESERVE OUT is in [`PR_OUT`]).
#[rustfmt::skip]
const ROWS: &[Row] = &[
    // SPC-5 table 67.
    row("TEST UNIT READY", &[0x00, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    row("REQUEST SENSE", &[0x03, 0, 0, 0, 252, 0], [A, A, A, A, A]),
    row("INQUIRY", &[0x12, 0, 0, 0, 36, 0], [A, A, A, A, A]),
    row("MODE SELECT(6)", &[0x15, 0x10, 0, 0, 0, 0], [C, C, A, C, C]),
    row("MODE SENSE(6)", &[0x1A, 0, 0x3F, 0, 255, 0], [A, C, A, A, C]),
    row("MODE SELECT(10)", &[0x55, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], [C, C, A, C, C]),
    row("MODE SENSE(10)", &[0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 255, 0], [A, C, A, A, C]),
    row("PERSISTENT RESERVE IN, READ KEYS", &[0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0], [A, A, A, A, A]),
    row("PERSISTENT RESERVE IN, READ RESERVATION", &[0x5E, 0x01, 0, 0, 0, 0, 0, 0x10, 0, 0], [A, A, A, A, A]),
    row("PERSISTENT RESERVE IN, REPORT CAPABILITIES", &[0x5E, 0x02, 0, 0, 0, 0, 0, 0x10, 0, 0], [A, A, A, A, A]),
    row("PERSISTENT RESERVE IN, READ FULL STATUS", &[0x5E, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0], [A, A, A, A, A]),
    row("REPORT LUNS", &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], [A, A, A, A, A]),
    row("REPORT SUPPORTED OPERATION CODES", &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], [A, C, A, A, C]),
    row("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], [A, C, A, A, C]),
    // SPC-5 5.13.3 (CRH = 1): RESERVE and RELEASE pass the check; scsi::pr::spc2 decides.
    row("RESERVE(6)", &[0x16, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    row("RELEASE(6)", &[0x17, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    row("RESERVE(10)", &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    row("RELEASE(10)", &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    // SBC-4 4.17 table.
    row("READ(6)", &[0x08, 0, 0, 0, 1, 0], [A, C, A, A, C]),
    row("READ(10)", &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], [A, C, A, A, C]),
    row("READ(12)", &[0xA8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [A, C, A, A, C]),
    row("READ(16)", &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [A, C, A, A, C]),
    row("WRITE(6)", &[0x0A, 0, 0, 0, 1, 0], [C, C, A, C, C]),
    row("WRITE(10)", &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], [C, C, A, C, C]),
    row("WRITE(12)", &[0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("WRITE(16)", &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("WRITE AND VERIFY(10)", &[0x2E, 0, 0, 0, 0, 0, 0, 0, 1, 0], [C, C, A, C, C]),
    row("WRITE AND VERIFY(12)", &[0xAE, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("WRITE AND VERIFY(16)", &[0x8E, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("VERIFY(10)", &[0x2F, 0, 0, 0, 0, 0, 0, 0, 1, 0], [A, C, A, A, C]),
    row("VERIFY(12)", &[0xAF, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [A, C, A, A, C]),
    row("VERIFY(16)", &[0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [A, C, A, A, C]),
    row("COMPARE AND WRITE", &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("ORWRITE(16)", &[0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("WRITE SAME(10)", &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], [C, C, A, C, C]),
    row("WRITE SAME(16)", &[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [C, C, A, C, C]),
    row("UNMAP", &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], [C, C, A, C, C]),
    row("SYNCHRONIZE CACHE(10)", &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], [C, C, A, C, C]),
    row("SYNCHRONIZE CACHE(16)", &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [C, C, A, C, C]),
    row("PRE-FETCH(10)", &[0x34, 0, 0, 0, 0, 0, 0, 0, 1, 0], [A, C, A, A, C]),
    row("PRE-FETCH(16)", &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [A, C, A, A, C]),
    row("GET LBA STATUS", &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], [A, C, A, A, C]),
    row("READ CAPACITY(10)", &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], [A, A, A, A, A]),
    row("READ CAPACITY(16)", &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], [A, A, A, A, A]),
    // PREVENT field (byte 4 bits 1..0) 00b, and not 00b.
    row("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 00b)", &[0x1E, 0, 0, 0, 0x00, 0], [A, A, A, A, A]),
    row("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 01b)", &[0x1E, 0, 0, 0, 0x01, 0], [C, C, A, C, C]),
    row("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 11b)", &[0x1E, 0, 0, 0, 0x03, 0], [C, C, A, C, C]),
    // START 1 and POWER CONDITION 0h, and the others (byte 4: POWER CONDITION 7..4, START 0).
    row("START STOP UNIT (START 1, POWER CONDITION 0h)", &[0x1B, 0, 0, 0, 0x01, 0], [A, A, A, A, A]),
    row("START STOP UNIT (START 0, POWER CONDITION 0h)", &[0x1B, 0, 0, 0, 0x00, 0], [C, C, A, C, C]),
    row("START STOP UNIT (START 1, POWER CONDITION 1h)", &[0x1B, 0, 0, 0, 0x11, 0], [C, C, A, C, C]),
    row("START STOP UNIT (START 0, LOEJ 1)", &[0x1B, 0, 0, 0, 0x02, 0], [C, C, A, C, C]),
];

/// SPC-5's table of PERSISTENT RESERVE OUT service actions allowed in the presence of various
/// reservations (any type), from an I_T nexus that does not hold the reservation:
/// (service action, from a registered I_T nexus, from an I_T nexus not registered).
const PR_OUT: &[(&str, u8, bool, bool)] = &[
    ("REGISTER", 0x00, A, A),
    ("RESERVE", 0x01, C, C),
    ("RELEASE", 0x02, A, C),
    ("CLEAR", 0x03, A, C),
    ("PREEMPT", 0x04, A, C),
    ("PREEMPT AND ABORT", 0x05, A, C),
    ("REGISTER AND IGNORE EXISTING KEY", 0x06, A, A),
    ("REGISTER AND MOVE", 0x07, C, C),
    // Note b: while the information is lost, processed as the lost condition says (see the
    // lost tests in pr_lost.rs); otherwise as here.
    ("REPLACE LOST RESERVATION", 0x08, A, C),
];

fn pr_out_cdb(sa: u8, ty: PrType) -> [u8; 10] {
    // SPC-5 6.17.1: scope LU_SCOPE (0h), the reservation's type, PARAMETER LIST LENGTH 24.
    [0x5F, sa, ty.code(), 0, 0, 0, 0, 0, 24, 0]
}

/// The column of a row that applies to a nexus that does not hold the reservation.
fn column(ty: PrType, is_registered: bool) -> usize {
    match (ty, is_registered) {
        (PrType::WriteExclusive, _) => 0,
        (PrType::ExclusiveAccess, _) => 1,
        (_, true) => 2,
        (t, false) if t.exclusive_access() => 4,
        (_, false) => 3,
    }
}

#[test]
fn every_opcode_table_row_has_a_reservation_row() {
    for op in OPS {
        let in_rows = ROWS
            .iter()
            .any(|r| cdb::parse(r.cdb).is_ok_and(|(i, _)| i.opcode == op.opcode && i.sa == op.sa));
        let in_pr_out = op.opcode == 0x5F && PR_OUT.iter().any(|&(_, sa, _, _)| op.sa == Some(sa));
        assert!(in_rows || in_pr_out, "{} {:?} has no row", op.name, op.sa);
    }
}

#[test]
fn the_holder_may_send_every_command_under_every_type() {
    for ty in ALL_TYPES {
        let st = state(ty);
        for r in ROWS {
            assert!(check_cdb(&st, &holder(), r.cdb), "{ty:?} {}", r.name);
        }
        for &(name, sa, _, _) in PR_OUT {
            assert!(
                check_cdb(&st, &holder(), &pr_out_cdb(sa, ty)),
                "{ty:?} {name}"
            );
        }
    }
}

#[test]
fn a_registered_nexus_that_does_not_hold_the_reservation() {
    for ty in ALL_TYPES {
        let st = state(ty);
        for r in ROWS {
            // All Registrants: every registrant holds the reservation (SPC-5 5.14.10).
            let want = ty.all_registrants() || r.cols[column(ty, true)];
            assert_eq!(
                check_cdb(&st, &registered(), r.cdb),
                want,
                "{ty:?} {}",
                r.name
            );
        }
    }
}

#[test]
fn a_nexus_that_is_not_registered() {
    for ty in ALL_TYPES {
        let st = state(ty);
        for r in ROWS {
            let want = r.cols[column(ty, false)];
            assert_eq!(
                check_cdb(&st, &stranger(), r.cdb),
                want,
                "{ty:?} {}",
                r.name
            );
        }
    }
}

#[test]
fn persistent_reserve_out_by_service_action() {
    for ty in ALL_TYPES {
        let st = state(ty);
        for &(name, sa, from_registered, from_stranger) in PR_OUT {
            let cdb = pr_out_cdb(sa, ty);
            let want = ty.all_registrants() || from_registered;
            assert_eq!(check_cdb(&st, &registered(), &cdb), want, "{ty:?} {name}");
            assert_eq!(
                check_cdb(&st, &stranger(), &cdb),
                from_stranger,
                "{ty:?} {name}"
            );
        }
    }
}

/// The same tables for READ(10), WRITE(10), TEST UNIT READY and PERSISTENT RESERVE IN, written
/// out as (type, nexus role) → outcome, so the column mapping above is checked too.
#[test]
fn read_write_tur_and_pr_in_for_every_type_and_role() {
    use PrType::*;
    const READ10: &[u8] = &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const WRITE10: &[u8] = &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const TUR: &[u8] = &[0x00, 0, 0, 0, 0, 0];
    const PRIN: &[u8] = &[0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0];
    // (type, role, READ(10), WRITE(10)); role: h = holder, r = registered, u = not registered.
    let grid: &[(PrType, char, bool, bool)] = &[
        (WriteExclusive, 'h', A, A),
        (WriteExclusive, 'r', A, C),
        (WriteExclusive, 'u', A, C),
        (ExclusiveAccess, 'h', A, A),
        (ExclusiveAccess, 'r', C, C),
        (ExclusiveAccess, 'u', C, C),
        (WriteExclusiveRegistrantsOnly, 'h', A, A),
        (WriteExclusiveRegistrantsOnly, 'r', A, A),
        (WriteExclusiveRegistrantsOnly, 'u', A, C),
        (ExclusiveAccessRegistrantsOnly, 'h', A, A),
        (ExclusiveAccessRegistrantsOnly, 'r', A, A),
        (ExclusiveAccessRegistrantsOnly, 'u', C, C),
        (WriteExclusiveAllRegistrants, 'h', A, A),
        (WriteExclusiveAllRegistrants, 'r', A, A),
        (WriteExclusiveAllRegistrants, 'u', A, C),
        (ExclusiveAccessAllRegistrants, 'h', A, A),
        (ExclusiveAccessAllRegistrants, 'r', A, A),
        (ExclusiveAccessAllRegistrants, 'u', C, C),
    ];
    for &(ty, role, read, write) in grid {
        let st = state(ty);
        let who = match role {
            'h' => holder(),
            'r' => registered(),
            _ => stranger(),
        };
        assert_eq!(check_cdb(&st, &who, READ10), read, "{ty:?} {role} READ(10)");
        assert_eq!(
            check_cdb(&st, &who, WRITE10),
            write,
            "{ty:?} {role} WRITE(10)"
        );
        // TEST UNIT READY and PERSISTENT RESERVE IN: allowed from every I_T nexus.
        assert!(check_cdb(&st, &who, TUR), "{ty:?} {role} TEST UNIT READY");
        assert!(
            check_cdb(&st, &who, PRIN),
            "{ty:?} {role} PERSISTENT RESERVE IN"
        );
    }
}

#[test]
fn registrations_without_a_reservation_restrict_nothing() {
    let mut st = state(PrType::ExclusiveAccess);
    st.reservation = None;
    for who in [holder(), registered(), stranger()] {
        for r in ROWS {
            assert!(check_cdb(&st, &who, r.cdb), "{}", r.name);
        }
        for &(name, sa, _, _) in PR_OUT {
            let cdb = pr_out_cdb(sa, PrType::WriteExclusive);
            assert!(check_cdb(&st, &who, &cdb), "{name}");
        }
    }
}

#[test]
fn an_empty_state_allows_everything() {
    let st = PrState::default();
    for r in ROWS {
        assert!(check_cdb(&st, &stranger(), r.cdb), "{}", r.name);
    }
}

#[test]
fn the_same_initiator_through_another_session_is_another_nexus() {
    // SPC-5: the holder is an I_T nexus; the same initiator name with another ISID is
    // a different initiator port.
    let st = state(PrType::ExclusiveAccess);
    let mut other = holder();
    other.initiator.isid = Some([0x40, 0, 0, 0, 0, 2]);
    assert!(!check_cdb(&st, &other, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
    assert!(check_cdb(
        &st,
        &holder(),
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    ));
}

#[test]
fn a_short_cdb_does_not_panic() {
    // The check may be handed any CDB with its table row: fields it reads past the end are 0.
    let st = state(PrType::WriteExclusive);
    let prevent = cdb::lookup(0x1E, 0).unwrap();
    let start = cdb::lookup(0x1B, 0).unwrap();
    let prout = cdb::lookup(0x5F, 0x00).unwrap();
    assert!(check::allowed(&st, &stranger(), prevent, &[0x1E]));
    assert!(!check::allowed(&st, &stranger(), start, &[]));
    assert!(check::allowed(&st, &stranger(), prout, &[]));
}
