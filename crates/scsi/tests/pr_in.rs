#![allow(clippy::unwrap_used)]

//! PERSISTENT RESERVE IN parameter data (crate::pr::input), byte for byte from SPC-5 6.16.

use scsi::pr::input::input;
use scsi::pr::{PrState, PrType, Registrant, Registration, Reservation};
use scsi::{InitiatorPort, TargetPort, Transport};

fn who(name: &str, isid: Option<u8>, rtpi: Option<u16>) -> Registrant {
    Registrant {
        initiator: InitiatorPort {
            transport: Transport::Iscsi,
            name: name.into(),
            isid: isid.map(|i| [0x80, 0, 0, 0, 0, i]),
        },
        target: rtpi.map(|r| TargetPort {
            name: "iqn.t".into(),
            tpgt: r,
            relative_id: r,
        }),
    }
}

fn two_registrants(generation: u32) -> PrState {
    PrState {
        generation,
        aptpl: false,
        registrations: vec![
            Registration {
                who: who("iqn.a", Some(1), Some(1)),
                key: 0x0123_4567_89AB_CDEF,
            },
            Registration {
                who: who("iqn.b", Some(2), None),
                key: 0x10,
            },
        ],
        reservation: None,
        lost: false,
    }
}

#[test]
fn read_keys_without_registrations_is_the_header_only() {
    // SPC-5 6.16.2 table 204: PRGENERATION, ADDITIONAL LENGTH 0.
    let d = input(&PrState::default(), 0x00, 16384).unwrap();
    assert_eq!(d, [0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn read_keys_lists_every_key_in_registration_order() {
    let d = input(&two_registrants(7), 0x00, 16384).unwrap();
    assert_eq!(
        d,
        [
            0x00, 0x00, 0x00, 0x07, // PRGENERATION
            0x00, 0x00, 0x00, 0x10, // ADDITIONAL LENGTH: two 8-byte keys
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, // first key
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, // second key
        ]
    );
}

#[test]
fn read_keys_truncated_to_8_keeps_the_full_additional_length() {
    // libiscsi test_prin_read_keys_truncate; SPC-5 6.16.2: ADDITIONAL LENGTH is not altered by
    // the allocation length.
    let d = input(&two_registrants(7), 0x00, 8).unwrap();
    assert_eq!(d, [0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x10]);
    let d = input(&two_registrants(7), 0x00, 12).unwrap();
    assert_eq!(d.len(), 12);
    assert!(input(&two_registrants(7), 0x00, 0).unwrap().is_empty());
}

#[test]
fn read_reservation_without_reservation_has_additional_length_zero() {
    // SPC-5 6.16.3 table 205.
    let d = input(&two_registrants(3), 0x01, 16384).unwrap();
    assert_eq!(d, [0, 0, 0, 3, 0, 0, 0, 0]);
}

#[test]
fn read_reservation_shows_the_holders_key_scope_and_type() {
    let mut s = two_registrants(3);
    s.reservation = Some(Reservation {
        ty: PrType::ExclusiveAccess,
        scope: 0,
        holder: Some(who("iqn.a", Some(1), Some(1))),
    });
    let d = input(&s, 0x01, 16384).unwrap();
    // SPC-5 6.16.3 table 206.
    assert_eq!(
        d,
        [
            0x00, 0x00, 0x00, 0x03, // PRGENERATION
            0x00, 0x00, 0x00, 0x10, // ADDITIONAL LENGTH 16
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, // RESERVATION KEY
            0x00, 0x00, 0x00, 0x00, // obsolete
            0x00, // reserved
            0x03, // SCOPE 0h (LU_SCOPE), TYPE 3h (Exclusive Access)
            0x00, 0x00, // obsolete
        ]
    );
}

#[test]
fn read_reservation_of_all_registrants_shows_key_zero() {
    let mut s = two_registrants(3);
    s.reservation = Some(Reservation {
        ty: PrType::WriteExclusiveAllRegistrants,
        scope: 0,
        holder: None,
    });
    let d = input(&s, 0x01, 16384).unwrap();
    assert_eq!(&d[8..16], &[0; 8]); // SPC-5 6.16.3: RESERVATION KEY zero for All Registrants
    assert_eq!(d[21], 0x07);
}

#[test]
fn report_capabilities_bits() {
    // SPC-5 6.16.4 table 207: LENGTH 0008h; byte 2: RLR_C 1, CRH 1, SIP_C 1, ATP_C 1, PTPL_C 1
    // = 9Dh; byte 3: TMV 1, ALLOW COMMANDS 001b, PTPL_A = 90h/91h; type mask WR_EX_AR,
    // EX_AC_RO, WR_EX_RO, EX_AC, WR_EX = EAh and EX_AC_AR = 01h.
    let d = input(&PrState::default(), 0x02, 16384).unwrap();
    assert_eq!(d, [0x00, 0x08, 0x9D, 0x90, 0xEA, 0x01, 0x00, 0x00]);
    let s = PrState {
        aptpl: true,
        ..PrState::default()
    };
    assert_eq!(input(&s, 0x02, 16384).unwrap()[3], 0x91);
    assert_eq!(input(&s, 0x02, 4).unwrap(), [0x00, 0x08, 0x9D, 0x91]);
}

#[test]
fn read_full_status_has_one_descriptor_per_registration() {
    let mut s = two_registrants(9);
    s.reservation = Some(Reservation {
        ty: PrType::WriteExclusiveRegistrantsOnly,
        scope: 0,
        holder: Some(who("iqn.a", Some(1), Some(1))),
    });
    let d = input(&s, 0x03, 16384).unwrap();
    // SPC-5 6.16.5 tables 209 and 210; TransportIDs SPC-5 7.6.4.6.
    let mut want = vec![
        0x00, 0x00, 0x00, 0x09, // PRGENERATION
        0x00, 0x00, 0x00, 0x68, // ADDITIONAL LENGTH: 2 * (24 + 28) = 104
        // descriptor 1: the holder
        0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, // RESERVATION KEY
        0x00, 0x00, 0x00, 0x00, // reserved
        0x01, // ALL_TG_PT 0, R_HOLDER 1
        0x05, // SCOPE 0, TYPE 5h
        0x00, 0x00, 0x00, 0x00, // reserved
        0x00, 0x01, // RELATIVE TARGET PORT IDENTIFIER 1
        0x00, 0x00, 0x00, 0x1C, // ADDITIONAL DESCRIPTOR LENGTH 28
        0x45, 0x00, 0x00, 0x18, // iSCSI, format 01b, ADDITIONAL LENGTH 24
    ];
    want.extend_from_slice(b"iqn.a,i,0x800000000001\0\0");
    want.extend_from_slice(&[
        // descriptor 2: ALL_TG_PT, not a holder
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, // RESERVATION KEY
        0x00, 0x00, 0x00, 0x00, // reserved
        0x02, // ALL_TG_PT 1, R_HOLDER 0
        0x00, // SCOPE, TYPE: not a holder
        0x00, 0x00, 0x00, 0x00, // reserved
        0x00, 0x00, // RELATIVE TARGET PORT IDENTIFIER: 0 with ALL_TG_PT
        0x00, 0x00, 0x00, 0x1C, // ADDITIONAL DESCRIPTOR LENGTH 28
        0x45, 0x00, 0x00, 0x18,
    ]);
    want.extend_from_slice(b"iqn.b,i,0x800000000002\0\0");
    assert_eq!(d, want);
}

#[test]
fn read_full_status_marks_every_registrant_holder_of_all_registrants() {
    let mut s = two_registrants(1);
    s.reservation = Some(Reservation {
        ty: PrType::ExclusiveAccessAllRegistrants,
        scope: 0,
        holder: None,
    });
    let d = input(&s, 0x03, 16384).unwrap();
    assert_eq!(&d[20..22], &[0x01, 0x08]); // R_HOLDER, TYPE 8h
    assert_eq!(&d[8 + 52 + 12..8 + 52 + 14], &[0x03, 0x08]); // ALL_TG_PT, R_HOLDER, TYPE 8h
}

#[test]
fn read_full_status_shows_a_vhost_initiator_by_its_configured_name() {
    let s = PrState {
        generation: 1,
        aptpl: false,
        registrations: vec![Registration {
            who: Registrant {
                initiator: InitiatorPort {
                    transport: Transport::Vhost,
                    name: "iqn.vm1".into(),
                    isid: None,
                },
                target: None,
            },
            key: 1,
        }],
        reservation: None,
        lost: false,
    };
    let d = input(&s, 0x03, 16384).unwrap();
    // iSCSI TransportID format 00b (05h), ADDITIONAL LENGTH 20, the name NUL-padded.
    let mut tid = vec![0x05, 0x00, 0x00, 0x14];
    tid.extend_from_slice(b"iqn.vm1");
    tid.resize(24, 0);
    assert_eq!(&d[28..32], &[0, 0, 0, 24]);
    assert_eq!(&d[32..], &tid[..]);
}

#[test]
fn unknown_service_actions_are_invalid_field_in_cdb() {
    // libiscsi test_prin_serviceaction_range: 04h..1Fh fail. INVALID FIELD IN CDB pointing at
    // byte 1 bit 4 (SERVICE ACTION): SKSV | C/D | BPV | 4 = CCh, 00h, 01h.
    for sa in 0x04..0x20 {
        let s = input(&PrState::default(), sa, 16384).unwrap_err();
        assert_eq!(
            s.encode(false),
            [0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x24, 0x00, 0, 0xCC, 0x00, 0x01]
        );
    }
}
