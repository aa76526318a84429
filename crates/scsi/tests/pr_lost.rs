#![allow(clippy::unwrap_used)]

//! Lost persistent reservation information and PERSISTENT RESERVE OUT with REPLACE LOST
//! RESERVATION: the rules (crate::pr::out, crate::pr::check) and a logical unit whose
//! reservation store lost its state.
//!
//! From SPC-5 (clause numbers of the SPC-5 draft these were written from): 5.13.5.2
//! "Nonvolatile memory considerations", 5.13.5.3.2 "Recoverable loss of persistent reservation
//! information", 5.13.11.3 "Replacing lost reservations", 6.16.3 and table 216 (the basic
//! parameter list), table 66 (PERSISTENT RESERVE OUT service actions allowed in the presence of
//! various reservations), 6.15.4 (RLR_C). CDBs, parameter lists and sense bytes are literals.

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use block::{BlockError, ReservationStore, Stored};
use common::{assert_good, assert_sense, nexus_named, run};
use scsi::cdb::{self, OPS};
use scsi::pr::check::lost_allows;
use scsi::pr::out::{out, Effects, Refusal};
use scsi::pr::{PrState, PrType, Registrant};
use scsi::{ItNexus, LogicalUnit, Status, Target, Tmf};
use tokio::sync::watch;

// ---- the rules --------------------------------------------------------------------------------

fn a() -> ItNexus {
    (*nexus_named("iqn.2026-01.test:a")).clone()
}
fn b() -> ItNexus {
    (*nexus_named("iqn.2026-01.test:b")).clone()
}

/// The basic PERSISTENT RESERVE OUT parameter list (table 214): RESERVATION KEY (0..7),
/// SERVICE ACTION RESERVATION KEY (8..15), obsolete (16..19), byte 20: SPEC_I_PT (bit 3),
/// ALL_TG_PT (bit 2), APTPL (bit 0); byte 21 reserved; obsolete (22..23).
fn basic(rk: u64, sark: u64, byte20: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&rk.to_be_bytes());
    p.extend_from_slice(&sark.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, byte20, 0, 0, 0]);
    p
}

const REPLACE_LOST: u8 = 0x08;

/// Fixed-format sense of a CHECK CONDITION refusal (SPC-5 4.4.3): 70h, key, ADDITIONAL SENSE
/// LENGTH 0Ah, ASC/ASCQ, sense-key specific bytes.
fn sense(r: Result<Effects, Refusal>) -> Vec<u8> {
    match r {
        Err(Refusal::Check(s)) => s.encode(false),
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

fn fixed(key: u8, asc: u8, ascq: u8, sks: [u8; 3]) -> Vec<u8> {
    vec![
        0x70, 0, key, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, asc, ascq, 0, sks[0], sks[1], sks[2],
    ]
}

/// DATA PROTECT (7h), PERSISTENT RESERVATION INFORMATION LOST (44h/01h).
fn information_lost() -> Vec<u8> {
    fixed(0x07, 0x44, 0x01, [0, 0, 0])
}

#[test]
fn replace_lost_reservation_registers_the_sender_reserves_and_zeroes_the_generation() {
    // 5.13.11.3: remove every registration without unit attentions, register the sending
    // I_T nexus with SERVICE ACTION RESERVATION KEY, establish a reservation of TYPE for it,
    // PRgeneration zero, stop terminating commands. APTPL is valid (6.16.3).
    for (ty, code) in [
        (PrType::WriteExclusive, 0x1),
        (PrType::ExclusiveAccess, 0x3),
        (PrType::WriteExclusiveRegistrantsOnly, 0x5),
        (PrType::ExclusiveAccessRegistrantsOnly, 0x6),
        (PrType::WriteExclusiveAllRegistrants, 0x7),
        (PrType::ExclusiveAccessAllRegistrants, 0x8),
    ] {
        for aptpl in [0x00, 0x01] {
            let e = out(
                &PrState::lost(),
                &a(),
                REPLACE_LOST,
                0,
                code,
                &basic(0, 0xAB, aptpl),
            )
            .unwrap();
            assert!(e.changed);
            assert!(e.unit_attentions.is_empty());
            assert!(e.abort.is_empty());
            let s = &e.state;
            assert!(!s.lost);
            assert_eq!(s.generation, 0);
            assert_eq!(s.aptpl, aptpl == 0x01);
            assert_eq!(s.registrations.len(), 1);
            assert_eq!(s.registrations[0].who, Registrant::of(&a()));
            assert_eq!(s.registrations[0].key, 0xAB);
            let r = s.reservation.as_ref().unwrap();
            assert_eq!(r.ty, ty);
            assert_eq!(r.scope, 0);
            // 5.13.10: the holder is the nexus that sent it; every registrant for All
            // Registrants types.
            assert!(s.is_holder(&a()));
            assert!(!s.is_holder(&b()));
        }
    }
}

#[test]
fn after_replace_lost_reservation_read_keys_and_read_reservation_show_the_new_state() {
    let s = out(
        &PrState::lost(),
        &a(),
        REPLACE_LOST,
        0,
        0x5,
        &basic(0, 0x0123_4567_89AB_CDEF, 0),
    )
    .unwrap()
    .state;
    // READ KEYS (6.15.2): PRGENERATION 0, ADDITIONAL LENGTH 8, the key.
    assert_eq!(
        scsi::pr::input::input(&s, 0x00, 100).unwrap(),
        [0, 0, 0, 0, 0, 0, 0, 8, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    );
    // READ RESERVATION (6.15.3): PRGENERATION 0, ADDITIONAL LENGTH 16, the holder's key,
    // obsolete, reserved, SCOPE 0h / TYPE 5h, obsolete.
    assert_eq!(
        scsi::pr::input::input(&s, 0x01, 100).unwrap(),
        [
            0, 0, 0, 0, 0, 0, 0, 16, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0, 0, 0, 0, 0,
            0x05, 0, 0
        ]
    );
}

#[test]
fn while_lost_every_other_service_action_is_information_lost() {
    // 5.13.5.3.2 b): every command but REPLACE LOST RESERVATION (and the 5.13.5.2 list).
    for sa in [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06] {
        assert_eq!(
            sense(out(&PrState::lost(), &a(), sa, 0, 0x1, &basic(0, 0x10, 0))),
            information_lost(),
            "service action {sa:02x}h"
        );
    }
    // REGISTER AND MOVE has its own parameter list; it is refused before it is read.
    assert_eq!(
        sense(out(&PrState::lost(), &a(), 0x07, 0, 0x1, &[0; 24])),
        information_lost()
    );
}

#[test]
fn replace_lost_reservation_cdb_and_parameter_list_checks() {
    let lost = PrState::lost();
    let run = |ty: u8, p: &[u8]| out(&lost, &a(), REPLACE_LOST, 0, ty, p);
    // TYPE 2h (obsolete): INVALID FIELD IN CDB, byte 2 bit 3 (SKSV, C/D, BPV: CBh 00h 02h).
    assert_eq!(
        sense(run(0x2, &basic(0, 1, 0))),
        fixed(0x05, 0x24, 0x00, [0xCB, 0x00, 0x02])
    );
    // SCOPE 1h (not LU_SCOPE): INVALID FIELD IN CDB, byte 2 bit 7 (CFh 00h 02h).
    assert_eq!(
        sense(out(&lost, &a(), REPLACE_LOST, 1, 0x1, &basic(0, 1, 0))),
        fixed(0x05, 0x24, 0x00, [0xCF, 0x00, 0x02])
    );
    // PARAMETER LIST LENGTH not 24: PARAMETER LIST LENGTH ERROR (1Ah/00h).
    assert_eq!(
        sense(run(0x1, &[0; 23])),
        fixed(0x05, 0x1A, 0x00, [0, 0, 0])
    );
    // SPEC_I_PT one: INVALID FIELD IN PARAMETER LIST, byte 20 bit 3 (8Bh 00h 14h).
    assert_eq!(
        sense(run(0x1, &basic(0, 1, 0x08))),
        fixed(0x05, 0x26, 0x00, [0x8B, 0x00, 0x14])
    );
    // ALL_TG_PT one: invalid for this service action (table 216): byte 20 bit 2 (8Ah 00h 14h).
    assert_eq!(
        sense(run(0x1, &basic(0, 1, 0x04))),
        fixed(0x05, 0x26, 0x00, [0x8A, 0x00, 0x14])
    );
    // RESERVATION KEY "shall contain zero": INVALID FIELD IN PARAMETER LIST at byte 0 (80h 00h
    // 00h), not RESERVATION CONFLICT (5.13.5.3.2 a)).
    assert_eq!(
        sense(run(0x1, &basic(0x10, 1, 0))),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x00])
    );
    // SERVICE ACTION RESERVATION KEY zero: no key to register; byte 8 (80h 00h 08h).
    assert_eq!(
        sense(run(0x1, &basic(0, 0, 0))),
        fixed(0x05, 0x26, 0x00, [0x80, 0x00, 0x08])
    );
}

#[test]
fn replace_lost_reservation_when_nothing_was_lost_changes_nothing() {
    // 5.13.11.3: ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
    let s = out(&PrState::default(), &a(), 0x06, 0, 0, &basic(0, 0x10, 0x01))
        .unwrap()
        .state;
    assert_eq!(
        sense(out(&s, &a(), REPLACE_LOST, 0, 0x1, &basic(0, 0x20, 0))),
        fixed(0x05, 0x26, 0x04, [0, 0, 0])
    );
}

// ---- which commands run while the information is lost -----------------------------------------

/// (command, CDB, runs while lost). 5.13.5.2's list (INQUIRY, LOG SENSE, READ BUFFER, REPORT
/// LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE, START STOP UNIT with START 1 and POWER
/// CONDITION 0h, WRITE BUFFER) and REPLACE LOST RESERVATION run; everything else this LU has
/// is terminated, PERSISTENT RESERVE IN and TEST UNIT READY included.
#[rustfmt::skip]
const LOST_ROWS: &[(&str, &[u8], bool)] = &[
    ("INQUIRY", &[0x12, 0, 0, 0, 36, 0], true),
    ("REPORT LUNS", &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], true),
    ("REQUEST SENSE", &[0x03, 0, 0, 0, 252, 0], true),
    ("START STOP UNIT (START 1, POWER CONDITION 0h)", &[0x1B, 0, 0, 0, 0x01, 0], true),
    ("START STOP UNIT (START 1, LOEJ 1)", &[0x1B, 0, 0, 0, 0x03, 0], true),
    ("START STOP UNIT (START 0)", &[0x1B, 0, 0, 0, 0x00, 0], false),
    ("START STOP UNIT (START 1, POWER CONDITION 1h)", &[0x1B, 0, 0, 0, 0x11, 0], false),
    ("PERSISTENT RESERVE OUT, REPLACE LOST RESERVATION", &[0x5F, 0x08, 0x01, 0, 0, 0, 0, 0, 24, 0], true),
    ("TEST UNIT READY", &[0x00, 0, 0, 0, 0, 0], false),
    ("PERSISTENT RESERVE IN, READ KEYS", &[0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0], false),
    ("PERSISTENT RESERVE IN, READ RESERVATION", &[0x5E, 0x01, 0, 0, 0, 0, 0, 0x10, 0, 0], false),
    ("PERSISTENT RESERVE IN, REPORT CAPABILITIES", &[0x5E, 0x02, 0, 0, 0, 0, 0, 0x10, 0, 0], false),
    ("PERSISTENT RESERVE IN, READ FULL STATUS", &[0x5E, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0], false),
    ("PERSISTENT RESERVE OUT, REGISTER", &[0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], false),
    ("PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY", &[0x5F, 0x06, 0, 0, 0, 0, 0, 0, 24, 0], false),
    ("PERSISTENT RESERVE OUT, CLEAR", &[0x5F, 0x03, 0, 0, 0, 0, 0, 0, 24, 0], false),
    ("RESERVE(6)", &[0x16, 0, 0, 0, 0, 0], false),
    ("RELEASE(6)", &[0x17, 0, 0, 0, 0, 0], false),
    ("READ(10)", &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], false),
    ("WRITE(10)", &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], false),
    ("READ CAPACITY(10)", &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], false),
    ("MODE SENSE(6)", &[0x1A, 0, 0x3F, 0, 255, 0], false),
    ("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 00b)", &[0x1E, 0, 0, 0, 0x00, 0], false),
    ("REPORT SUPPORTED OPERATION CODES", &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], false),
];

#[test]
fn the_commands_that_run_while_the_information_is_lost() {
    for &(name, c, runs) in LOST_ROWS {
        let (info, _) = cdb::parse(c).unwrap_or_else(|e| panic!("{name} parses: {e:?}"));
        assert_eq!(lost_allows(info, c), runs, "{name}");
    }
}

#[test]
fn no_other_opcode_table_row_runs_while_the_information_is_lost() {
    // Of the rows this LU has, only these: REQUEST SENSE, INQUIRY, START STOP UNIT (with its
    // fields), PERSISTENT RESERVE OUT / REPLACE LOST RESERVATION, REPORT LUNS.
    for op in OPS {
        let zeros = vec![0u8; op.cdb_len()];
        let mut c = zeros.clone();
        c[0] = op.opcode;
        if let Some(sa) = op.sa {
            c[1] = sa;
        }
        let listed = matches!(
            (op.opcode, op.sa),
            (0x03, _) | (0x12, _) | (0xA0, _) | (0x5F, Some(0x08))
        );
        if op.opcode == 0x1B {
            continue; // its fields decide: the table above
        }
        assert_eq!(lost_allows(op, &c), listed, "{} {:?}", op.name, op.sa);
    }
}

// ---- a logical unit whose store lost its state ------------------------------------------------

/// A reservation store that lost what it kept: version 1, no state, [`ReservationStore::lost`]
/// until the first compare-and-swap. Records the `durable` flag of every compare-and-swap.
#[derive(Debug)]
struct LostStore {
    current: Mutex<Stored>,
    lost: Mutex<Option<String>>,
    durable: Mutex<Vec<bool>>,
    changes: watch::Sender<Stored>,
}

impl LostStore {
    fn new() -> Self {
        Self::holding(b"", Some("test: the state was lost"))
    }

    /// A store at version 1 holding `state`, and saying `lost`.
    fn holding(state: &[u8], lost: Option<&str>) -> Self {
        let s = Stored {
            version: 1,
            state: state.to_vec(),
        };
        LostStore {
            current: Mutex::new(s.clone()),
            lost: Mutex::new(lost.map(String::from)),
            durable: Mutex::new(Vec::new()),
            changes: watch::Sender::new(s),
        }
    }
}

#[async_trait]
impl ReservationStore for LostStore {
    async fn load(&self) -> Result<Stored, BlockError> {
        Ok(self.current.lock().unwrap().clone())
    }
    async fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError> {
        let mut cur = self.current.lock().unwrap();
        if cur.version != expected {
            return Ok(Err(cur.clone()));
        }
        *cur = Stored {
            version: expected + 1,
            state,
        };
        *self.lost.lock().unwrap() = None;
        self.durable.lock().unwrap().push(durable);
        Ok(Ok(expected + 1))
    }
    fn watch(&self) -> watch::Receiver<Stored> {
        self.changes.subscribe()
    }
    async fn barrier(&self, _version: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn lost(&self) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn lu_over(store: &Arc<LostStore>) -> Arc<LogicalUnit> {
    common::lu_over_store(store.clone())
}

#[tokio::test]
async fn a_stored_state_that_does_not_parse_is_lost_but_another_format_is_refused() {
    // Checksummed by the store, yet cut short: the information is lost.
    let store = Arc::new(LostStore::holding(
        br#"{"format": 1, "state": {"generation": 4, "aptpl": tr"#,
        None,
    ));
    let lu = lu_over(&store);
    lu.restore_reservations()
        .await
        .expect("lost is not an error");
    assert!(lu.persistent_reservations().lost);
    // Another version's state (format 2) is not loss: the LU does not start on it.
    let store = Arc::new(LostStore::holding(br#"{"format": 2, "state": {}}"#, None));
    assert!(lu_over(&store).restore_reservations().await.is_err());
    // A good state of this format is not lost.
    let store = Arc::new(LostStore::holding(
        br#"{"format": 1, "state": {"generation": 4, "aptpl": true, "registrations": [], "reservation": null}}"#,
        None,
    ));
    let lu = lu_over(&store);
    lu.restore_reservations().await.expect("restores");
    assert!(!lu.persistent_reservations().lost);
}

/// A registration as the store keeps it (JSON), for initiator `name` with ISID 1, through the
/// iSCSI target port `iqn.2026-01.test:t,t,0x0001`.
fn stored_registration(name: &str, key: u64) -> String {
    format!(
        r#"{{"who": {{"initiator": {{"transport": "Iscsi", "name": "{name}", "isid": [0,0,0,0,0,1]}},
            "target": {{"name": "iqn.2026-01.test:t", "tpgt": 1, "relative_id": 1}}}}, "key": {key}}}"#
    )
}

fn stored_state(registrations: &[String], reservation: &str) -> Vec<u8> {
    format!(
        r#"{{"format": 1, "state": {{"generation": 9, "aptpl": true,
            "registrations": [{}], "reservation": {reservation}}}}}"#,
        registrations.join(",")
    )
    .into_bytes()
}

/// SPC-5 6.16.2 (READ KEYS): "Regardless of the APTPL bit value the PRgeneration value shall be
/// set to zero by a power on". The registrations and the reservation kept through power loss
/// stay; the generation read back starts again at zero.
#[tokio::test]
async fn a_state_kept_through_power_loss_starts_with_generation_zero() {
    let holder = r#"{"initiator": {"transport": "Iscsi", "name": "iqn.2026-01.test:a", "isid": [0,0,0,0,0,1]},
        "target": {"name": "iqn.2026-01.test:t", "tpgt": 1, "relative_id": 1}}"#;
    let store = Arc::new(LostStore::holding(
        &stored_state(
            &[stored_registration("iqn.2026-01.test:a", 0xAB)],
            &format!(r#"{{"ty": "WriteExclusive", "scope": 0, "holder": {holder}}}"#),
        ),
        None,
    ));
    let lu = lu_over(&store);
    lu.restore_reservations().await.expect("restores");
    let pr = lu.persistent_reservations();
    assert!(!pr.lost);
    assert_eq!(pr.generation, 0);
    assert_eq!(pr.registrations.len(), 1);
    assert_eq!(pr.registrations[0].key, 0xAB);
    assert!(pr.reservation.is_some());
}

/// A state of this format that the rules could not have made (edited by hand, written by a
/// bug) is not run on: it is lost, as a damaged one is.
#[tokio::test]
async fn a_stored_state_the_rules_could_not_make_is_lost() {
    let a = stored_registration("iqn.2026-01.test:a", 1);
    let b_holder = r#"{"initiator": {"transport": "Iscsi", "name": "iqn.2026-01.test:b", "isid": [0,0,0,0,0,1]},
        "target": {"name": "iqn.2026-01.test:t", "tpgt": 1, "relative_id": 1}}"#;
    let good = stored_state(std::slice::from_ref(&a), "null");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // The holder is not registered.
        (
            "holder not registered",
            stored_state(
                std::slice::from_ref(&a),
                &format!(r#"{{"ty": "WriteExclusive", "scope": 0, "holder": {b_holder}}}"#),
            ),
        ),
        // The same I_T nexus registered twice.
        (
            "registered twice",
            stored_state(
                &[a.clone(), stored_registration("iqn.2026-01.test:a", 2)],
                "null",
            ),
        ),
        // A scope other than LU_SCOPE (0h).
        (
            "scope",
            stored_state(
                std::slice::from_ref(&a),
                r#"{"ty": "WriteExclusiveAllRegistrants", "scope": 2, "holder": null}"#,
            ),
        ),
        // All Registrants with nobody registered.
        (
            "no registrant",
            stored_state(
                &[],
                r#"{"ty": "WriteExclusiveAllRegistrants", "scope": 0, "holder": null}"#,
            ),
        ),
        // A field this version does not know: a newer version's state of the same format
        // number would otherwise lose it silently at the next change.
        (
            "unknown field",
            String::from_utf8(good.clone())
                .expect("utf-8")
                .replacen(r#""aptpl": true"#, r#""aptpl": true, "epoch": 3"#, 1)
                .into_bytes(),
        ),
        // Marked lost: a stored state never is.
        (
            "lost",
            String::from_utf8(good.clone())
                .expect("utf-8")
                .replacen(r#""aptpl": true"#, r#""aptpl": true, "lost": true"#, 1)
                .into_bytes(),
        ),
    ];
    for (name, bytes) in cases {
        let lu = lu_over(&Arc::new(LostStore::holding(&bytes, None)));
        lu.restore_reservations()
            .await
            .unwrap_or_else(|e| panic!("{name}: lost is not an error: {e}"));
        assert!(lu.persistent_reservations().lost, "{name}: not lost");
    }
    // States the rules do make: one registration and no reservation; All Registrants with one
    // registrant; a holder that is registered.
    let a_holder = r#"{"initiator": {"transport": "Iscsi", "name": "iqn.2026-01.test:a", "isid": [0,0,0,0,0,1]},
        "target": {"name": "iqn.2026-01.test:t", "tpgt": 1, "relative_id": 1}}"#;
    for (name, bytes) in [
        ("no reservation", good),
        (
            "All Registrants",
            stored_state(
                std::slice::from_ref(&a),
                r#"{"ty": "ExclusiveAccessAllRegistrants", "scope": 0, "holder": null}"#,
            ),
        ),
        (
            "registered holder",
            stored_state(
                std::slice::from_ref(&a),
                &format!(
                    r#"{{"ty": "WriteExclusiveRegistrantsOnly", "scope": 0, "holder": {a_holder}}}"#
                ),
            ),
        ),
    ] {
        let lu = lu_over(&Arc::new(LostStore::holding(&bytes, None)));
        lu.restore_reservations().await.expect("restores");
        assert!(!lu.persistent_reservations().lost, "{name}");
        assert!(lu.persistent_reservations().reservation.is_some() || name == "no reservation");
    }
}

/// A target whose LUN 0 restored a lost reservation state; its store; the LU.
async fn lost_target() -> (Target, Arc<LostStore>, Arc<LogicalUnit>) {
    let store = Arc::new(LostStore::new());
    let lu = lu_over(&store);
    lu.restore_reservations()
        .await
        .expect("a lost state is not an error");
    assert!(lu.persistent_reservations().lost);
    let mut t = Target::new();
    t.add_lu(0, lu.clone());
    (t, store, lu)
}

/// REQUEST SENSE: GOOD, and takes the power-on unit attention (SPC-5 6.39).
async fn take_unit_attention(t: &Target, n: &Arc<ItNexus>) {
    assert_good(&run(t, n, &[0x03, 0, 0, 0, 252, 0], vec![]).await);
}

const RLR_WE: [u8; 10] = [0x5F, 0x08, 0x01, 0, 0, 0, 0, 0, 24, 0];

#[tokio::test]
async fn a_logical_unit_with_lost_information_terminates_commands_until_replace_lost_reservation() {
    let (t, store, lu) = lost_target().await;
    let n = nexus_named("iqn.2026-01.test:a");
    let other = nexus_named("iqn.2026-01.test:b");
    take_unit_attention(&t, &n).await;
    take_unit_attention(&t, &other).await;

    for &(name, c, runs) in LOST_ROWS {
        if c[0] == 0x5F && c[1] == 0x08 {
            continue; // below
        }
        let data_out = if c[0] == 0x5F { vec![0; 24] } else { vec![] };
        let data_out = if c[0] == 0x2A { vec![0; 512] } else { data_out };
        let r = run(&t, &n, c, data_out).await;
        if runs {
            assert_eq!(r.status, Status::GOOD, "{name}: {:02x?}", r.sense);
        } else {
            assert_sense(&r, 0x07, 0x44, 0x01);
        }
    }
    // Task management does not end the condition (only REPLACE LOST RESERVATION does).
    t.task_management(&n, Tmf::LogicalUnitReset { lun: 0 })
        .await;
    take_unit_attention(&t, &n).await;
    take_unit_attention(&t, &other).await;
    assert_sense(
        &run(&t, &n, &[0x00, 0, 0, 0, 0, 0], vec![]).await,
        0x07,
        0x44,
        0x01,
    );

    // A bad REPLACE LOST RESERVATION changes nothing: RESERVATION KEY must be zero.
    let r = run(&t, &n, &RLR_WE, basic(0x77, 0xA1, 0x01)).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
    assert!(lu.persistent_reservations().lost);

    // REPLACE LOST RESERVATION from a nexus that is not registered (nothing is known): GOOD,
    // a Write Exclusive reservation held by it, APTPL on, stored durably.
    assert_good(&run(&t, &n, &RLR_WE, basic(0, 0xA1, 0x01)).await);
    assert!(!lu.persistent_reservations().lost);
    assert_eq!(store.lost(), None);
    assert_eq!(*store.durable.lock().unwrap(), [true]);

    // Service is back. READ KEYS: generation 0, the one key.
    let r = run(&t, &n, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(
        r.data_in,
        [0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0xA1]
    );
    // No unit attention for the other nexus (5.13.11.3 a)); the new reservation applies to it:
    // reads are allowed, writes are RESERVATION CONFLICT (18h) under Write Exclusive.
    let r = run(&t, &other, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_good(&r);
    let r = run(&t, &other, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![0; 512]).await;
    assert_eq!(r.status, Status::RESERVATION_CONFLICT);
    assert_good(&run(&t, &n, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![0; 512]).await);
    // REPORT CAPABILITIES (6.15.4): RLR_C, CRH, SIP_C, ATP_C, PTPL_C = 9Dh; PTPL_A now set.
    let r = run(&t, &n, &[0x5E, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], vec![]).await;
    assert_eq!(r.data_in, [0x00, 0x08, 0x9D, 0x91, 0xEA, 0x01, 0x00, 0x00]);

    // Nothing is lost any more: another REPLACE LOST RESERVATION is INVALID RELEASE OF
    // PERSISTENT RESERVATION (from the holder).
    let r = run(&t, &n, &RLR_WE, basic(0, 0xA2, 0)).await;
    assert_sense(&r, 0x05, 0x26, 0x04);
}

#[tokio::test]
async fn replace_lost_reservation_is_never_a_reservation_conflict_while_lost() {
    // Table 66 note b and 5.13.5.3.2 a): from a nexus that is not registered it would be a
    // conflict under a reservation; while the information is lost it is processed.
    let (t, store, _lu) = lost_target().await;
    let n = nexus_named("iqn.2026-01.test:c");
    take_unit_attention(&t, &n).await;
    // Exclusive Access - All Registrants (8h), APTPL off: kept in memory only.
    assert_good(
        &run(
            &t,
            &n,
            &[0x5F, 0x08, 0x08, 0, 0, 0, 0, 0, 24, 0],
            basic(0, 5, 0),
        )
        .await,
    );
    assert_eq!(*store.durable.lock().unwrap(), [false]);
    // READ RESERVATION: generation 0, ADDITIONAL LENGTH 16, key zero (All Registrants), TYPE 8h.
    let r = run(&t, &n, &[0x5E, 0x01, 0, 0, 0, 0, 0, 0x10, 0, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        [0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0]
    );
}

#[tokio::test]
async fn the_operators_clear_ends_the_lost_condition() {
    let (t, _store, lu) = lost_target().await;
    let n = nexus_named("iqn.2026-01.test:a");
    take_unit_attention(&t, &n).await;
    assert_sense(
        &run(&t, &n, &[0x00, 0, 0, 0, 0, 0], vec![]).await,
        0x07,
        0x44,
        0x01,
    );
    let old = lu.clear_reservations_by_operator().await.unwrap();
    assert!(old.lost);
    assert!(!lu.persistent_reservations().lost);
    assert_good(&run(&t, &n, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
    let r = run(&t, &n, &RLR_WE, basic(0, 1, 0)).await;
    assert_sense(&r, 0x05, 0x26, 0x04);
}

/// A state names the logical unit that stored it (`"lu"`, the id behind its NAA identifier).
/// One that names another id is still this LU's state: a derived id follows the image's path,
/// which can change under the same disk (a block device renamed at a reboot), and calling the
/// state lost would stop every initiator's I/O. It is restored, with a warning.
#[tokio::test]
async fn a_state_that_names_another_id_is_restored_not_lost() {
    let state = |lu: &str| {
        format!(
            r#"{{"format": 1, "lu": "{lu}", "state": {{"generation": 1, "aptpl": true,
                "registrations": [{}], "reservation": null}}}}"#,
            stored_registration("iqn.2026-01.test:a", 7)
        )
        .into_bytes()
    };
    // This LU's id is 0x0123456789abcdef (`common::config`); the first names another.
    for lu_id in ["0x0123456789abcdee", "0x0123456789abcdef"] {
        let lu = lu_over(&Arc::new(LostStore::holding(&state(lu_id), None)));
        lu.restore_reservations().await.expect("restores");
        let pr = lu.persistent_reservations();
        assert!(!pr.lost, "{lu_id}");
        assert_eq!(pr.registrations.len(), 1, "{lu_id}");
        assert_eq!(pr.registrations[0].key, 7, "{lu_id}");
    }
}
