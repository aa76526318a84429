#![allow(clippy::unwrap_used)]

//! INQUIRY and VPD pages, READ CAPACITY, MODE SENSE/SELECT, REPORT SUPPORTED OPERATION CODES,
//! REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, REPORT LUNS, REQUEST SENSE, unit attentions and
//! sense formats. Expected bytes are written out from SPC-5 / SBC-4.

mod common;

use std::sync::Arc;

use common::*;
use scsi::{Completion, Status};

const BS: usize = 512;

#[tokio::test]
async fn inquiry_standard_data_36_bytes() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0, 0, 0, 36, 0], vec![]).await;
    assert_good(&r);
    let mut want = vec![
        0x00, // PERIPHERAL QUALIFIER 0, DEVICE TYPE 0 (direct access)
        0x00, // not removable
        0x06, // VERSION: SPC-4
        0x12, // HISUP, RESPONSE DATA FORMAT 2
        91,   // ADDITIONAL LENGTH (96 - 5)
        0x00, 0x10, // MULTIP
        0x02, // CMDQUE
    ];
    want.extend_from_slice(b"SHAREDSK");
    want.extend_from_slice(b"sharedisk       ");
    want.extend_from_slice(b"0001");
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn inquiry_standard_data_has_version_descriptors() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0, 0, 1, 4, 0], vec![]).await;
    assert_eq!(r.data_in.len(), 96);
    assert_eq!(
        &r.data_in[58..74],
        &[
            0x00, 0xA0, // SAM-5
            0x04, 0x60, // SPC-4
            0x04, 0xC0, // SBC-3
            0x05, 0xC0, // SPC-5
            0x06, 0x00, // SBC-4
            0x09, 0x60, // iSCSI
            0x00, 0x00, 0x00, 0x00,
        ]
    );
}

#[tokio::test]
async fn inquiry_page_code_without_evpd_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0, 0x80, 0, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x02]); // byte 2, bit 7
}

#[tokio::test]
async fn inquiry_cmddt_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x02, 0, 0, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC9, 0x00, 0x01]); // byte 1, bit 1
}

#[tokio::test]
async fn vpd_supported_pages_lists_every_page_sorted() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x00, 0, 255, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0x00, 0, 7, 0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]
    );
}

#[tokio::test]
async fn vpd_unit_serial_number() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x80, 0, 255, 0], vec![]).await;
    assert_eq!(r.data_in, [&[0, 0x80, 0, 6][..], b"SD0001"].concat());
}

#[tokio::test]
async fn vpd_device_identification_has_naa_and_target_port_designators() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x83, 0, 255, 0], vec![]).await;
    let mut want = vec![0, 0x83, 0, 0];
    // NAA, binary, LU: NAA 3h (locally assigned) + 60 bits of the LU id.
    want.extend_from_slice(&[
        0x01, 0x03, 0x00, 0x08, 0x31, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF,
    ]);
    // T10 vendor ID, ASCII, LU.
    want.extend_from_slice(&[0x02, 0x01, 0x00, 14]);
    want.extend_from_slice(b"SHAREDSKSD0001");
    // Relative target port: iSCSI, PIV, target port association, type 4h, port 1.
    want.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0, 0, 1]);
    // SCSI name string of the target port (UTF-8), NUL terminated, padded to 40.
    want.extend_from_slice(&[0x53, 0x98, 0x00, 40]);
    want.extend_from_slice(b"iqn.2026-01.io.sharedisk:disk0,t,0x0001\0");
    // SCSI name string of the target device, padded to 32.
    want.extend_from_slice(&[0x53, 0xA8, 0x00, 32]);
    want.extend_from_slice(b"iqn.2026-01.io.sharedisk:disk0\0\0");
    let len = (want.len() - 4) as u16;
    want[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn vpd_block_limits_on_a_full_512_byte_disk() {
    let (t, n) = ready_thick(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0xB0, 0, 255, 0], vec![]).await;
    let mut want = vec![
        0, 0xB0, 0x00, 0x3C, // page length 60
        0x00, // WSNZ=0
        255,  // MAXIMUM COMPARE AND WRITE LENGTH
        0x00, 0x08, // OPTIMAL TRANSFER LENGTH GRANULARITY: 8 blocks (4 KiB physical)
        0x00, 0x00, 0x40, 0x00, // MAXIMUM TRANSFER LENGTH 16384 (8 MiB)
        0x00, 0x00, 0x02, 0x00, // OPTIMAL TRANSFER LENGTH 512 (256 KiB)
        0x00, 0x00, 0x00, 0x00, // MAXIMUM PREFETCH LENGTH: no limit
        0, 0, 0, 0, // MAXIMUM UNMAP LBA COUNT: no UNMAP
        0, 0, 0, 0, // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        0, 0, 0, 0, // OPTIMAL UNMAP GRANULARITY
        0, 0, 0, 0, // UNMAP GRANULARITY ALIGNMENT
        0, 0, 0, 0, 0, 0, 0xFF, 0xFF, // MAXIMUM WRITE SAME LENGTH 65535
    ];
    want.resize(64, 0);
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn vpd_block_limits_advertises_unmap_when_thin() {
    // A thin disk that allocates in 4 KiB units: OPTIMAL UNMAP GRANULARITY is 8 blocks.
    let t = target_with(Arc::new(ThinDriver::new(1024 * 512, 4096)), 512);
    let n = nexus();
    ready(&t, &n).await;
    let r = run(&t, &n, &[0x12, 0x01, 0xB0, 0, 255, 0], vec![]).await;
    assert_eq!(
        &r.data_in[20..32],
        &[
            0x00, 0x10, 0x00, 0x00, // MAXIMUM UNMAP LBA COUNT 1Mi
            0x00, 0x00, 0x01, 0x00, // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT 256
            0x00, 0x00, 0x00, 0x08, // OPTIMAL UNMAP GRANULARITY 8
        ]
    );
}

#[tokio::test]
async fn vpd_block_device_characteristics_is_non_rotating() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0xB1, 0, 255, 0], vec![]).await;
    // SBC-4 6.6.2: PAGE LENGTH 3Ch; MEDIUM ROTATION RATE 0001h (non-rotating, bytes 4-5);
    // byte 8 bit 0 VBULS=1 (VERIFY byte checks of unmapped LBAs are supported).
    let mut want = vec![0, 0xB1, 0x00, 0x3C, 0x00, 0x01, 0, 0, 0x01];
    want.resize(64, 0);
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn vpd_logical_block_provisioning_full_and_thin() {
    let (t, n) = ready_thick(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0xB2, 0, 255, 0], vec![]).await;
    assert_eq!(r.data_in, vec![0, 0xB2, 0, 4, 0, 0x00, 0x00, 0]);
    let (t, _) = thin_target(64, 512);
    ready(&t, &n).await;
    let r = run(&t, &n, &[0x12, 0x01, 0xB2, 0, 255, 0], vec![]).await;
    // LBPU, LBPWS, LBPWS10, LBPRZ=001b; PROVISIONING TYPE 010b (thin).
    assert_eq!(r.data_in, vec![0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0]);
}

#[tokio::test]
async fn vpd_extended_inquiry_page_length_is_60() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x86, 0, 255, 0], vec![]).await;
    // SPC-5 7.7.7: byte 5 HEADSUP (bit 2), ORDSUP (bit 1), SIMPSUP (bit 0): all three task
    // attributes; byte 6 V_SUP; byte 7 LUICLR.
    assert_eq!(&r.data_in[..8], &[0, 0x86, 0, 0x3C, 0, 0x07, 0x01, 0x01]);
    assert_eq!(r.data_in.len(), 64);
}

#[tokio::test]
async fn vpd_unknown_page_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x99, 0, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn inquiry_truncates_to_allocation_length() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x12, 0x01, 0x83, 0, 5, 0], vec![]).await;
    assert_eq!(r.data_in.len(), 5);
    let r = run(&t, &n, &[0x12, 0, 0, 0, 0, 0], vec![]).await;
    assert_good(&r);
    assert!(r.data_in.is_empty());
}

#[tokio::test]
async fn inquiry_to_missing_lun_reports_qualifier_3() {
    let t = mem_target(64, 512);
    let n = nexus();
    let mut c = cmd(&n, 1, &[0x12, 0, 0, 0, 36, 0], vec![], 36);
    c.lun = 5;
    let Completion::Done(r) = t.execute(c).await else {
        panic!()
    };
    assert_eq!(r.data_in[0], 0x7F);
    let mut c = cmd(&n, 1, &[0x00, 0, 0, 0, 0, 0], vec![], 0);
    c.lun = 5;
    let Completion::Done(r) = t.execute(c).await else {
        panic!()
    };
    assert_sense(&r, 0x05, 0x25, 0x00); // LOGICAL UNIT NOT SUPPORTED
    let mut c = cmd(&n, 1, &[0x03, 0, 0, 0, 252, 0], vec![], 252);
    c.lun = 5;
    let Completion::Done(r) = t.execute(c).await else {
        panic!()
    };
    assert_good(&r);
    assert_eq!(
        r.data_in,
        vec![0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x25, 0x00, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn inquiry_for_a_vpd_page_of_a_missing_lun_answers_that_pages_header() {
    let t = mem_target(64, 512);
    let n = nexus();
    // EVPD=1, page 83h.
    let mut c = cmd(&n, 1, &[0x12, 0x01, 0x83, 0, 255, 0], vec![], 255);
    c.lun = 5;
    let Completion::Done(r) = t.execute(c).await else {
        panic!()
    };
    assert_good(&r);
    // SPC-5 4.5.3, 7.7.1: qualifier 011b, type 1Fh; the page code asked for; no page data.
    assert_eq!(r.data_in, vec![0x7F, 0x83, 0x00, 0x00]);
}

#[tokio::test]
async fn read_capacity10_reports_last_lba_and_block_length() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(r.data_in, vec![0, 0, 0, 63, 0, 0, 2, 0]);
}

#[tokio::test]
async fn read_capacity16_on_thin_disk_sets_lbpme_lbprz_and_exponent() {
    let (t, _) = thin_target(1024, 512);
    let n = nexus();
    ready(&t, &n).await;
    let r = run(
        &t,
        &n,
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        vec![],
    )
    .await;
    let mut want = vec![
        0, 0, 0, 0, 0, 0, 0x03, 0xFF, // RETURNED LOGICAL BLOCK ADDRESS 1023
        0, 0, 0x02, 0x00, // LOGICAL BLOCK LENGTH 512
        0x00, // no protection
        0x03, // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 3 (4 KiB physical)
        0xC0, // LBPME, LBPRZ
        0x00,
    ];
    want.resize(32, 0);
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn read_capacity16_truncates_to_allocation_length() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(
        &t,
        &n,
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0],
        vec![],
    )
    .await;
    assert_eq!(r.data_in, vec![0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
}

#[tokio::test]
async fn unknown_service_action_is_invalid_field_pointing_at_it() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(
        &t,
        &n,
        &[0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        vec![],
    )
    .await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCC, 0x00, 0x01]); // byte 1, bit 4
}

#[tokio::test]
async fn unknown_opcode_is_invalid_command_operation_code() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0xC7, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x20, 0x00);
    // PERSISTENT RESERVE IN, READ KEYS (SPC-5 6.16.2): GOOD, PRGENERATION 0 and ADDITIONAL
    // LENGTH 0 on a fresh LU.
    let r = run(&t, &n, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0], vec![]).await;
    assert_eq!(r.status, Status::GOOD);
    assert_eq!(r.data_in, [0, 0, 0, 0, 0, 0, 0, 0]);
    // PERSISTENT RESERVE OUT, REPLACE LOST RESERVATION (08h, TYPE 1h) is supported; with
    // nothing lost it is ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h;
    // SPC-5 "Replacing lost reservations"). A reserved service action (09h) is INVALID FIELD
    // IN CDB (SPC-5 6.17.1), not an unknown operation code.
    let r = run(
        &t,
        &n,
        &[0x5F, 0x08, 0x01, 0, 0, 0, 0, 0, 24, 0],
        vec![0; 24],
    )
    .await;
    assert_sense(&r, 0x05, 0x26, 0x04);
    let r = run(&t, &n, &[0x5F, 0x09, 0, 0, 0, 0, 0, 0, 24, 0], vec![0; 24]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

const MS6_ALL: [u8; 6] = [0x1A, 0, 0x3F, 0, 255, 0];

#[tokio::test]
async fn mode_sense6_all_pages_current() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &MS6_ALL, vec![]).await;
    let mut want = vec![
        55,   // MODE DATA LENGTH
        0x00, // MEDIUM TYPE
        0x10, // DEVICE-SPECIFIC PARAMETER: DPOFUA
        0x08, // BLOCK DESCRIPTOR LENGTH
        0, 0, 0, 64, 0, 0, 0x02, 0x00, // 64 blocks of 512 bytes
    ];
    // Caching page: WCE.
    want.extend_from_slice(&[0x08, 0x12, 0x04]);
    want.resize(want.len() + 17, 0);
    // Control page: QAM 1h, busy timeout FFFFh.
    want.extend_from_slice(&[0x0A, 0x0A, 0x00, 0x10, 0x00, 0x00, 0, 0, 0xFF, 0xFF, 0, 0]);
    // Informational exceptions control: DEXCPT.
    want.extend_from_slice(&[0x1C, 0x0A, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.data_in, want);
}

#[tokio::test]
async fn mode_sense6_changeable_control_page_shows_d_sense_and_swp() {
    let (t, n) = ready_mem(64, 512).await;
    // DBD=1, PC=01b (changeable), page 0Ah.
    let r = run(&t, &n, &[0x1A, 0x08, 0x4A, 0, 255, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        vec![15, 0, 0x10, 0, 0x0A, 0x0A, 0x04, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn mode_sense_saved_values_is_saving_parameters_not_supported() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x1A, 0, 0xFF, 0, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x39, 0x00);
}

#[tokio::test]
async fn mode_sense_unknown_page_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x1A, 0, 0x19, 0, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCD, 0x00, 0x02]);
}

#[tokio::test]
async fn mode_sense_of_a_page_with_subpage_ffh_returns_that_page() {
    let (t, n) = ready_mem(64, 512).await;
    // SPC-5 mode page code usage: page 08h, subpage FFh = every subpage of the caching page,
    // which has only subpage 00h. DBD=1.
    let r = run(&t, &n, &[0x1A, 0x08, 0x08, 0xFF, 255, 0], vec![]).await;
    assert_good(&r);
    let mut want = vec![23, 0, 0x10, 0]; // header: 23 more bytes, DPOFUA, no block descriptor
    want.extend_from_slice(&[0x08, 0x12, 0x04]); // caching page, WCE
    want.resize(want.len() + 17, 0);
    assert_eq!(r.data_in, want);
    // Subpage 01h of the caching page does not exist: INVALID FIELD IN CDB, byte 3.
    let r = run(&t, &n, &[0x1A, 0x08, 0x08, 0x01, 255, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x03]); // SKSV, C/D, BPV, bit 7; byte 3
}

#[tokio::test]
async fn mode_sense6_truncates_to_allocation_length() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x1A, 0, 0x3F, 0, 4, 0], vec![]).await;
    assert_eq!(r.data_in, vec![55, 0, 0x10, 8]);
}

#[tokio::test]
async fn mode_sense10_llbaa_returns_long_block_descriptor() {
    let (t, n) = ready_mem(64, 512).await;
    // MODE SENSE(10), LLBAA, caching page.
    let r = run(&t, &n, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], vec![]).await;
    let mut want = vec![
        0, 42, // MODE DATA LENGTH: 44 - 2
        0, 0x10, // DPOFUA
        0x01, 0, // LONGLBA
        0, 16, // BLOCK DESCRIPTOR LENGTH
        0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 2, 0, 0x08, 0x12, 0x04,
    ];
    want.resize(44, 0);
    assert_eq!(r.data_in, want);
}

fn control_page(dsense: bool, swp: bool) -> Vec<u8> {
    vec![
        0,
        0,
        0,
        0, // MODE SELECT(6) header
        0x0A,
        0x0A,
        if dsense { 0x04 } else { 0 },
        0x10,
        if swp { 0x08 } else { 0 },
        0,
        0,
        0,
        0xFF,
        0xFF,
        0,
        0,
    ]
}

#[tokio::test]
async fn mode_select_swp_write_protects_the_medium() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(false, true);
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await;
    assert_good(&r);
    let r = run(&t, &n, &MS6_ALL, vec![]).await;
    assert_eq!(r.data_in[2], 0x90); // WP, DPOFUA
    let r = run(&t, &n, &write16(0, 1), vec![0u8; BS]).await;
    assert_sense(&r, 0x07, 0x27, 0x00); // DATA PROTECT, WRITE PROTECTED
    let r = run(&t, &n, &read16(0, 1), vec![]).await;
    assert_good(&r);
    let p = control_page(false, false);
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await;
    assert_good(&r);
    let r = run(&t, &n, &write16(0, 1), vec![0u8; BS]).await;
    assert_good(&r);
}

/// SPC-5 6.11: with PF (byte 1 bit 4) zero the pages are in a vendor-specific format, which
/// this device does not have: a list sent that way is INVALID FIELD IN CDB pointing at PF,
/// and changes nothing. An empty list with PF zero is fine.
#[tokio::test]
async fn mode_select_without_pf_is_refused_and_changes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(false, true);
    let r = run(&t, &n, &[0x15, 0x00, 0, 0, p.len() as u8, 0], p).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    // SKSV, C/D (CDB), BPV, BIT POINTER 4; FIELD POINTER byte 1.
    assert_eq!(&r.sense[15..18], &[0xCC, 0x00, 0x01]);
    assert_good(&run(&t, &n, &write16(0, 1), vec![0u8; BS]).await);
    assert_good(&run(&t, &n, &[0x15, 0x00, 0, 0, 0, 0], vec![]).await);
}

#[tokio::test]
async fn mode_select_d_sense_switches_to_descriptor_sense() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(true, false);
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await;
    assert_good(&r);
    let r = run(&t, &n, &read16(64, 1), vec![]).await;
    assert_eq!(
        r.sense,
        vec![0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0] // ILLEGAL REQUEST, LBA OUT OF RANGE
    );
    // Field pointers travel in a sense key specific descriptor.
    let r = run(&t, &n, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_eq!(
        r.sense,
        vec![
            0x72, 0x05, 0x24, 0x00, 0, 0, 0,
            8, // INVALID FIELD IN CDB, 8 bytes of descriptors
            0x02, 0x06, 0, 0, 0xCD, 0x00, 0x01, 0, // SKS: C/D, BPV, bit 5, byte 1
        ]
    );
}

#[tokio::test]
async fn miscompare_in_descriptor_format_carries_information_descriptor() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(true, false);
    assert_good(&run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await);
    let mut c = read16(0, 1);
    c[0] = 0x8F;
    c[1] = 0x02;
    let mut d = vec![0u8; BS];
    d[3] = 1;
    let r = run(&t, &n, &c, d).await;
    assert_eq!(
        r.sense,
        vec![
            0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 12, // MISCOMPARE DURING VERIFY OPERATION
            0x00, 0x0A, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 3, // INFORMATION 3, VALID
        ]
    );
}

#[tokio::test]
async fn mode_select_wce_off_makes_every_write_fua() {
    let d = Arc::new(GatedDriver::new(64 * 512, true));
    let t = target_with(d.clone(), 512);
    let n = nexus();
    ready(&t, &n).await;
    let mut p = vec![0, 0, 0, 0, 0x08, 0x12];
    p.resize(24, 0);
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, 24, 0], p).await;
    assert_good(&r);
    assert_good(&run(&t, &n, &write16(0, 1), vec![0u8; BS]).await);
    assert_eq!(*d.writes.lock().unwrap(), vec![(0, true)]);
}

#[tokio::test]
async fn mode_select_changing_a_fixed_field_is_invalid_field_in_parameter_list() {
    let (t, n) = ready_mem(64, 512).await;
    let mut p = control_page(false, false);
    p[7] = 0x00; // QUEUE ALGORITHM MODIFIER 0h: not changeable
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
    assert_eq!(&r.sense[15..18], &[0x8C, 0x00, 0x07]); // C/D=0, BPV, bit 4, byte 7
}

#[tokio::test]
async fn mode_select_with_sp_is_invalid_field_in_cdb() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(false, false);
    let r = run(&t, &n, &[0x15, 0x11, 0, 0, p.len() as u8, 0], p).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn mode_select_raises_mode_parameters_changed_on_other_nexuses() {
    let (t, a) = ready_mem(64, 512).await;
    let b = nexus_named("iqn.1993-08.org.debian:01:b");
    ready(&t, &b).await;
    let p = control_page(false, true);
    assert_good(&run(&t, &a, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await);
    let r = run(&t, &b, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x2A, 0x01); // UNIT ATTENTION, MODE PARAMETERS CHANGED
    assert_good(&run(&t, &a, &[0x00, 0, 0, 0, 0, 0], vec![]).await);
}

#[tokio::test]
async fn mode_select10_with_block_descriptor_of_other_size_is_invalid() {
    let (t, n) = ready_mem(64, 512).await;
    let p = vec![0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
    let r = run(&t, &n, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, 16, 0], p).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
}

#[tokio::test]
async fn first_command_of_a_nexus_gets_power_on_reset() {
    let t = mem_target(64, 512);
    let n = nexus();
    let r = run(&t, &n, &read16(0, 1), vec![]).await;
    assert_eq!(
        r.sense,
        vec![
            0x70, 0, 0x06, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, // UNIT ATTENTION
            0x29, 0x00, // POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
            0, 0, 0, 0,
        ]
    );
    assert_good(&run(&t, &n, &read16(0, 1), vec![]).await);
}

#[tokio::test]
async fn inquiry_and_report_luns_do_not_report_unit_attention() {
    let t = mem_target(64, 512);
    let n = nexus();
    assert_good(&run(&t, &n, &[0x12, 0, 0, 0, 36, 0], vec![]).await);
    assert_good(&run(&t, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], vec![]).await);
    let r = run(&t, &n, &[0x00, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x06, 0x29, 0x00);
}

#[tokio::test]
async fn request_sense_returns_the_unit_attention_then_no_sense() {
    let t = mem_target(64, 512);
    let n = nexus();
    let r = run(&t, &n, &[0x03, 0, 0, 0, 252, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(
        r.data_in,
        vec![0x70, 0, 0x06, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0]
    );
    let r = run(&t, &n, &[0x03, 0x01, 0, 0, 252, 0], vec![]).await;
    // DESC=1: descriptor format NO SENSE.
    assert_eq!(r.data_in, vec![0x72, 0x00, 0x00, 0x00, 0, 0, 0, 0]);
}

#[tokio::test]
async fn report_luns_lists_lun_0() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn report_luns_of_administrative_lus_is_empty() {
    let (t, n) = ready_mem(64, 512).await;
    // SPC-5 6.33 SELECT REPORT 10h, 11h, 12h: administrative LUs and their subsidiaries
    // (conglomerates). There are none: LUN LIST LENGTH 0.
    for select in [0x10, 0x11, 0x12] {
        let r = run(
            &t,
            &n,
            &[0xA0, 0, select, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            vec![],
        )
        .await;
        assert_good(&r);
        assert_eq!(
            r.data_in,
            vec![0, 0, 0, 0, 0, 0, 0, 0],
            "SELECT REPORT {select:#x}"
        );
    }
    // 02h: every LU the nexus can reach, LUN 0.
    let r = run(&t, &n, &[0xA0, 0, 0x02, 0, 0, 0, 0, 0, 1, 0, 0, 0], vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn report_luns_sense_follows_the_addressed_lus_d_sense() {
    let (t, n) = ready_mem(64, 512).await;
    let p = control_page(true, false);
    assert_good(&run(&t, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], p).await);
    // SELECT REPORT 03h (reserved): INVALID FIELD IN CDB, in descriptor format (72h).
    let r = run(&t, &n, &[0xA0, 0, 0x03, 0, 0, 0, 0, 0, 0, 16, 0, 0], vec![]).await;
    assert_eq!(r.sense[..4], [0x72, 0x05, 0x24, 0x00]);
}

/// SPC-5 6.33: the allocation length "should be at least 16" (SPC-3 made a shorter one an
/// invalid field); a shorter one gets the report truncated to it (SPC-5 4.2.5.6), with the
/// LUN LIST LENGTH still that of the whole list.
#[tokio::test]
async fn report_luns_allocation_below_16_truncates_the_report() {
    let (t, n) = ready_mem(64, 512).await;
    // ALLOCATION LENGTH 8: the header alone, LUN LIST LENGTH 8 (one LUN, LUN 0).
    let r = run(&t, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, vec![0, 0, 0, 8, 0, 0, 0, 0]);
    // ALLOCATION LENGTH 4: the LUN LIST LENGTH field alone.
    let r = run(&t, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, vec![0, 0, 0, 8]);
}

fn rsoc(options: u8, rctd: bool, opcode: u8, sa: u16) -> Vec<u8> {
    let s = sa.to_be_bytes();
    vec![
        0xA3,
        0x0C,
        options | if rctd { 0x80 } else { 0 },
        opcode,
        s[0],
        s[1],
        0,
        0,
        0xFF,
        0xFF,
        0,
        0,
    ]
}

#[tokio::test]
async fn rsoc_all_lists_commands_with_cdb_lengths() {
    let (t, n) = ready_thick(64, 512).await;
    let r = run(&t, &n, &rsoc(0, false, 0, 0), vec![]).await;
    assert_good(&r);
    let d = &r.data_in;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len, d.len() - 4);
    assert_eq!(len % 8, 0);
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    assert!(descs.contains(&&[0x28, 0, 0, 0, 0, 0x00, 0, 10][..])); // READ(10)
    assert!(descs.contains(&&[0x9E, 0, 0, 0x10, 0, 0x01, 0, 16][..])); // READ CAPACITY(16), SERVACTV
    assert!(descs.contains(&&[0x89, 0, 0, 0, 0, 0x00, 0, 16][..])); // COMPARE AND WRITE
                                                                    // UNMAP only on thin LUs.
    assert!(!descs.iter().any(|d| d[0] == 0x42));
}

#[tokio::test]
async fn rsoc_all_with_rctd_adds_timeouts_descriptors() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(0, true, 0, 0), vec![]).await;
    let d = &r.data_in[4..];
    assert_eq!(d.len() % 20, 0);
    for desc in d.chunks(20) {
        assert_eq!(desc[5] & 0x02, 0x02); // CTDP
        assert_eq!(&desc[8..10], &[0x00, 0x0A]); // timeouts descriptor length
    }
}

#[tokio::test]
async fn rsoc_one_command_read10_reports_usage_data() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(1, false, 0x28, 0), vec![]).await;
    assert_eq!(
        r.data_in,
        vec![
            0, 0x03, 0, 10, // SUPPORT 011b, CDB SIZE 10
            0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00,
        ]
    );
}

/// REPORT SUPPORTED OPERATION CODES, one command (reporting options 001b), on a thin LU.
async fn usage_data(opcode: u8) -> Vec<u8> {
    let (t, _) = thin_target(1024, 512);
    let n = nexus();
    ready(&t, &n).await;
    let r = run(&t, &n, &rsoc(1, false, opcode, 0), vec![]).await;
    assert_good(&r);
    r.data_in
}

/// On an LU without thin provisioning WRITE SAME refuses UNMAP=1 as a reserved bit (INVALID
/// FIELD IN CDB), so its usage data has a zero there (SPC-5 6.36.3: a one only for a bit the
/// device server evaluates); NDOB stays.
#[tokio::test]
async fn rsoc_write_same_usage_data_has_no_unmap_bit_without_thin_provisioning() {
    let (t, n) = ready_thick(1024, 512).await;
    for (opcode, byte1) in [(0x93u8, 0x01u8), (0x41, 0x00)] {
        let r = run(&t, &n, &rsoc(1, false, opcode, 0), vec![]).await;
        assert_good(&r);
        // One-command format: 4 header bytes, then the CDB USAGE DATA from its opcode.
        assert_eq!(r.data_in[4], opcode);
        assert_eq!(
            r.data_in[5], byte1,
            "WRITE SAME byte 1 usage of {opcode:#04x}"
        );
    }
    // And UNMAP=1 is refused: WRITE SAME(16), UNMAP (byte 1 bit 3), LBA 0, one block.
    let cdb = [0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    let r = run(&t, &n, &cdb, vec![0; 512]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn rsoc_usage_data_of_the_cluster_commands_follows_sbc4() {
    // Each CDB USAGE DATA below is the SBC-4 CDB layout with a one in every bit this device
    // evaluates: LBA and length fields, DPO/FUA, UNMAP/NDOB and GROUP NUMBER; zeros in
    // reserved bits, WRPROTECT (no protection information) and ANCHOR (ANC_SUP = 0).
    assert_eq!(
        usage_data(0x89).await,
        vec![
            0, 0x03, 0, 16,   // SUPPORT 011b, CDB SIZE 16
            0x89, // COMPARE AND WRITE (SBC-4 5.3)
            0x18, // WRPROTECT 000b, DPO, FUA
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // LOGICAL BLOCK ADDRESS
            0x00, 0x00, 0x00, // reserved
            0xFF, // NUMBER OF LOGICAL BLOCKS
            0x1F, // GROUP NUMBER
            0x00, // CONTROL
        ]
    );
    assert_eq!(
        usage_data(0x93).await,
        vec![
            0, 0x03, 0, 16,   // SUPPORT 011b, CDB SIZE 16
            0x93, // WRITE SAME(16) (SBC-4 5.50)
            0x09, // WRPROTECT 000b, ANCHOR 0, UNMAP, NDOB
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // LOGICAL BLOCK ADDRESS
            0xFF, 0xFF, 0xFF, 0xFF, // NUMBER OF LOGICAL BLOCKS
            0x1F, // GROUP NUMBER
            0x00, // CONTROL
        ]
    );
    assert_eq!(
        usage_data(0x41).await,
        vec![
            0, 0x03, 0, 10,   // SUPPORT 011b, CDB SIZE 10
            0x41, // WRITE SAME(10) (SBC-4 5.49)
            0x08, // WRPROTECT 000b, ANCHOR 0, UNMAP
            0xFF, 0xFF, 0xFF, 0xFF, // LOGICAL BLOCK ADDRESS
            0x1F, // GROUP NUMBER
            0xFF, 0xFF, // NUMBER OF LOGICAL BLOCKS
            0x00, // CONTROL
        ]
    );
    assert_eq!(
        usage_data(0x42).await,
        vec![
            0, 0x03, 0, 10,   // SUPPORT 011b, CDB SIZE 10
            0x42, // UNMAP (SBC-4 5.32)
            0x00, // ANCHOR 0
            0x00, 0x00, 0x00, 0x00, // reserved
            0x1F, // GROUP NUMBER
            0xFF, 0xFF, // PARAMETER LIST LENGTH
            0x00, // CONTROL
        ]
    );
    assert_eq!(
        usage_data(0x91).await,
        vec![
            0, 0x03, 0, 16,   // SUPPORT 011b, CDB SIZE 16
            0x91, // SYNCHRONIZE CACHE(16) (SBC-4 5.27)
            0x02, // IMMED
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // LOGICAL BLOCK ADDRESS
            0xFF, 0xFF, 0xFF, 0xFF, // NUMBER OF LOGICAL BLOCKS
            0x1F, // GROUP NUMBER
            0x00, // CONTROL
        ]
    );
}

#[tokio::test]
async fn write_same16_with_anchor_is_invalid_field_pointing_at_the_anchor_bit() {
    let (t, _) = thin_target(1024, 512);
    let n = nexus();
    ready(&t, &n).await;
    // WRITE SAME(16) with ANCHOR (byte 1 bit 4) and UNMAP, LBA 0, 1 block.
    let cdb = [0x93, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    let r = run(&t, &n, &cdb, vec![0; 512]).await;
    assert_eq!(
        &r.sense[..18],
        &[
            0x70, 0, 0x05, // current, fixed format; ILLEGAL REQUEST
            0, 0, 0, 0, 10, 0, 0, 0, 0, // INFORMATION, ADDITIONAL SENSE LENGTH 10
            0x24, 0x00, // INVALID FIELD IN CDB
            0,    // FRU
            0xCC, 0x00, 0x01, // SKSV, C/D = CDB, BPV, bit 4; field pointer byte 1
        ]
    );
}

#[tokio::test]
async fn rsoc_one_command_with_rctd_appends_timeouts() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(1, true, 0x00, 0), vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0x83, 0, 6, 0, 0, 0, 0, 0, 0, 0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn rsoc_option_1_on_opcode_with_service_actions_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(1, false, 0x9E, 0x10), vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn rsoc_option_2_on_opcode_without_service_actions_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(2, false, 0x28, 0), vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn rsoc_option_2_reports_service_action() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(2, false, 0x9E, 0x12), vec![]).await;
    assert_eq!(&r.data_in[..6], &[0, 0x03, 0, 16, 0x9E, 0x12]);
}

#[tokio::test]
async fn rsoc_option_3_unsupported_command_reports_not_supported() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &rsoc(3, false, 0xC7, 0), vec![]).await;
    assert_eq!(r.data_in, vec![0, 0x01, 0, 0]);
}

#[tokio::test]
async fn report_supported_tmfs() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], vec![]).await;
    // ATS, ATSS, CTSS, LURS, QTS, TRS; QAES, QTSS, ITNRS.
    assert_eq!(r.data_in, vec![0xDE, 0x07, 0x00, 0x00]);
}

#[tokio::test]
async fn start_stop_and_prevent_allow_are_good() {
    let (t, n) = ready_mem(64, 512).await;
    assert_good(&run(&t, &n, &[0x1B, 0, 0, 0, 0x01, 0], vec![]).await);
    assert_good(&run(&t, &n, &[0x1E, 0, 0, 0, 0x01, 0], vec![]).await);
}

/// Reserved bits of START STOP UNIT (SBC-4 5.25: byte 1 bits 7-1, byte 2) and PREVENT ALLOW
/// MEDIUM REMOVAL (SPC-5 6.15: byte 4 bits 7-2) set: ILLEGAL REQUEST, INVALID FIELD IN CDB,
/// with the sense-key-specific field pointer (SPC-5 4.4.2.4.2) at the bit.
#[tokio::test]
async fn start_stop_and_prevent_allow_refuse_reserved_bits_with_a_field_pointer() {
    let (t, n) = ready_mem(64, 512).await;
    for (cdb, sks) in [
        // START STOP UNIT, byte 1 bit 1: SKSV | C/D | BPV | bit 1 = C9h, byte 0001h.
        ([0x1B, 0x02, 0, 0, 0x01, 0], [0xC9, 0x00, 0x01]),
        // START STOP UNIT, byte 2 bit 0: C8h, byte 0002h.
        ([0x1B, 0, 0x01, 0, 0x01, 0], [0xC8, 0x00, 0x02]),
        // PREVENT ALLOW MEDIUM REMOVAL, byte 4 bit 2: CAh, byte 0004h.
        ([0x1E, 0, 0, 0, 0x04, 0], [0xCA, 0x00, 0x04]),
    ] {
        let r = run(&t, &n, &cdb, vec![]).await;
        assert_eq!(r.status, Status::CHECK_CONDITION, "{cdb:02x?}");
        // Fixed format (70h), ILLEGAL REQUEST (5h), additional length 0Ah, ASC/ASCQ 24h/00h,
        // then the three sense-key-specific bytes.
        assert_eq!(
            r.sense,
            [0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x24, 0x00, 0, sks[0], sks[1], sks[2]],
            "{cdb:02x?}"
        );
    }
}

#[tokio::test]
async fn overlapped_tag_is_aborted_command() {
    let d = Arc::new(GatedDriver::new(64 * 512, false));
    let t = Arc::new(target_with(d.clone(), 512));
    let n = nexus();
    ready(&t, &n).await;
    let t2 = t.clone();
    let n2 = n.clone();
    let first = tokio::spawn(async move {
        t2.execute(cmd(&n2, 7, &write16(0, 1), vec![0u8; BS], 0))
            .await
    });
    d.entered.notified().await;
    let Completion::Done(r) = t
        .execute(cmd(&n, 7, &read16(0, 1), vec![], BS as u32))
        .await
    else {
        panic!()
    };
    assert_sense(&r, 0x0B, 0x4E, 0x00); // ABORTED COMMAND, OVERLAPPED COMMANDS ATTEMPTED
    d.gate.add_permits(1);
    assert!(matches!(first.await.unwrap(), Completion::Done(r) if r.status == Status::GOOD));
}

#[tokio::test]
async fn physical_block_size_of_512_on_a_512_byte_lu_reports_exponent_0() {
    let backend = block::Backend::new(Arc::new(block::driver::mem::MemDriver::new(64 * 512)), 512)
        .expect("valid block size");
    let lu = scsi::LogicalUnit::new(backend, config())
        .with_physical_block_size(512)
        .expect("512 is a valid physical block size");
    let mut t = scsi::Target::new();
    t.add_lu(0, Arc::new(lu));
    let n = nexus();
    ready(&t, &n).await;
    // READ CAPACITY(16): SERVICE ACTION 10h, ALLOCATION LENGTH 32.
    let r = run(
        &t,
        &n,
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        vec![],
    )
    .await;
    assert_eq!(r.data_in[13], 0x00); // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0
                                     // VPD 0xB0: OPTIMAL TRANSFER LENGTH GRANULARITY (bytes 6..8) is 1 block.
    let r = run(&t, &n, &[0x12, 0x01, 0xB0, 0, 255, 0], vec![]).await;
    assert_eq!(&r.data_in[6..8], &[0x00, 0x01]);
}

#[test]
fn physical_block_size_must_be_a_power_of_two_multiple_of_the_logical_block() {
    let lu = || {
        let d = Arc::new(block::driver::mem::MemDriver::new(64 * 4096));
        scsi::LogicalUnit::new(block::Backend::new(d, 4096).expect("valid"), config())
    };
    assert!(lu().with_physical_block_size(512).is_err()); // smaller than a logical block
    assert!(lu().with_physical_block_size(12288).is_err()); // not a power of two
    assert!(lu().with_physical_block_size(4096 << 16).is_err()); // exponent above 15
    assert!(lu().with_physical_block_size(16384).is_ok());
    // 2^11 logical blocks, but 8 MiB is the MAXIMUM TRANSFER LENGTH (2048 blocks of 4096).
    assert!(lu().with_physical_block_size(8 << 20).is_ok());
    assert!(lu().with_physical_block_size(16 << 20).is_err());
}

#[tokio::test]
async fn a_large_physical_block_keeps_the_optimal_transfer_a_multiple_of_it() {
    let backend = block::Backend::new(Arc::new(block::driver::mem::MemDriver::new(64 * 512)), 512)
        .expect("valid block size");
    let lu = scsi::LogicalUnit::new(backend, config())
        .with_physical_block_size(1 << 20)
        .expect("1 MiB is a valid physical block size");
    let mut t = scsi::Target::new();
    t.add_lu(0, Arc::new(lu));
    let n = nexus();
    ready(&t, &n).await;
    // VPD B0h (SBC-4 6.6.4): OPTIMAL TRANSFER LENGTH GRANULARITY (bytes 6-7) 2048 blocks
    // (1 MiB of 512-byte blocks); MAXIMUM TRANSFER LENGTH (8-11) 16384 blocks (8 MiB);
    // OPTIMAL TRANSFER LENGTH (12-15) one physical block, 2048, not less.
    let r = run(&t, &n, &[0x12, 0x01, 0xB0, 0, 255, 0], vec![]).await;
    assert_eq!(&r.data_in[6..8], &[0x08, 0x00]);
    assert_eq!(&r.data_in[8..12], &[0x00, 0x00, 0x40, 0x00]);
    assert_eq!(&r.data_in[12..16], &[0x00, 0x00, 0x08, 0x00]);
}

/// MODE SELECT(6) with a short LBA mode parameter block descriptor (SBC-4 6.5.2: NUMBER OF
/// LOGICAL BLOCKS bytes 0-3, reserved byte 4, LOGICAL BLOCK LENGTH bytes 5-7) whose length
/// is not the LU's: INVALID FIELD IN PARAMETER LIST (26h/00h), the field pointer on the
/// field's first byte, 5, plus the 4-byte header = parameter list byte 9 (SPC-5 4.4.2.4.2).
/// A non-zero reserved byte 4 is pointed at itself (byte 8). A page cut off after its page
/// code is a truncated parameter list: PARAMETER LIST LENGTH ERROR (1Ah/00h).
#[tokio::test]
async fn mode_select6_block_descriptor_and_truncated_page_errors_point_right() {
    let (t, n) = ready_mem(64, 512).await;
    // Header: MODE DATA LENGTH 0, MEDIUM TYPE 0, DEVICE-SPECIFIC 0, BLOCK DESCRIPTOR LENGTH 8.
    // Descriptor: 0 blocks, LOGICAL BLOCK LENGTH 001000h (4096).
    let p = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0x00, 0x10, 0x00];
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, 12, 0], p).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
    // SENSE KEY SPECIFIC: SKSV=1, C/D=0 (parameter list), BPV=1, bit 7; FIELD POINTER 9.
    assert_eq!(&r.sense[15..18], &[0x8F, 0x00, 0x09]);
    // LOGICAL BLOCK LENGTH 512 (000200h), reserved byte 4 = 01h: pointer byte 8, bit 0.
    let p = vec![0, 0, 0, 8, 0, 0, 0, 0, 0x01, 0x00, 0x02, 0x00];
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, 12, 0], p).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
    assert_eq!(&r.sense[15..18], &[0x88, 0x00, 0x08]);
    // The same descriptor with the reserved byte zero is accepted.
    let p = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0x00, 0x02, 0x00];
    assert_good(&run(&t, &n, &[0x15, 0x10, 0, 0, 12, 0], p).await);
    // No descriptor, then one byte of a page (08h, the caching page's code) and no more.
    let r = run(&t, &n, &[0x15, 0x10, 0, 0, 5, 0], vec![0, 0, 0, 0, 0x08]).await;
    assert_sense(&r, 0x05, 0x1A, 0x00);
}

/// The Extended INQUIRY Data page says LUICLR=1 (byte 7 bit 0): REPORTED LUNS DATA HAS
/// CHANGED (3Fh/0Eh), once reported to a nexus through one LU of the target, is cleared for
/// that nexus on the target's other LUs (SPC-5 7.7.7), so a guest is not told once per LU.
/// Another nexus still has its own.
#[tokio::test]
async fn reported_luns_data_has_changed_is_cleared_on_every_lu_once_reported() {
    let lu = || {
        let driver = Arc::new(block::driver::mem::MemDriver::new(64 * 512));
        let backend = block::Backend::new(driver, 512).expect("valid block size");
        Arc::new(scsi::LogicalUnit::new(backend, config()))
    };
    let mut t = scsi::Target::new();
    let (lu0, lu1, lu2) = (lu(), lu(), lu());
    t.add_lu(0, lu0.clone());
    t.add_lu(1, lu1.clone());
    t.add_lu(2, lu2.clone());
    let (a, b) = (nexus(), nexus_named("iqn.1993-08.org.debian:01:b"));
    let tur = |n: &Arc<scsi::ItNexus>, lun: u64| {
        let mut c = cmd(n, 1, &[0x00, 0, 0, 0, 0, 0], Vec::new(), 0);
        c.lun = lun;
        let t = &t;
        async move {
            match t.execute(c).await {
                scsi::Completion::Done(r) => r,
                scsi::Completion::Aborted => panic!("aborted"),
            }
        }
    };
    for n in [&a, &b] {
        for lun in 0..3 {
            tur(n, lun).await; // POWER ON, RESET
        }
    }
    // The inventory changed (LUN 2 is new, say): both nexuses are told on LUs 0 and 1.
    for lu in [&lu0, &lu1] {
        lu.reported_luns_changed(&a);
        lu.reported_luns_changed(&b);
    }
    assert_sense(&tur(&a, 0).await, 0x06, 0x3F, 0x0E);
    assert_good(&tur(&a, 1).await);
    assert_sense(&tur(&b, 1).await, 0x06, 0x3F, 0x0E);
    assert_good(&tur(&b, 0).await);
    // Reported by REQUEST SENSE (status GOOD, the sense data in its data-in) counts too.
    for lu in [&lu0, &lu1] {
        lu.reported_luns_changed(&a);
    }
    // REQUEST SENSE (SPC-5 6.39), DESC 0, ALLOCATION LENGTH 252.
    let mut c = cmd(&a, 1, &[0x03, 0, 0, 0, 252, 0], Vec::new(), 252);
    c.lun = 0;
    let r = match t.execute(c).await {
        scsi::Completion::Done(r) => r,
        scsi::Completion::Aborted => panic!("aborted"),
    };
    assert_good(&r);
    // Fixed format (70h): SENSE KEY in byte 2, ASC and ASCQ in bytes 12 and 13.
    assert_eq!(
        (r.data_in[0], r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x70, 0x06, 0x3F, 0x0E)
    );
    assert_good(&tur(&a, 1).await);
}

/// PERSISTENT RESERVE OUT (SPC-5 6.17.1) with a PARAMETER LIST LENGTH longer than any list
/// the LU can use (1 MiB + 1: more than the header and 2048 TransportIDs of 508 bytes) is
/// PARAMETER LIST LENGTH ERROR (1Ah/00h) whatever data-out came with it, so a transport need
/// not take the data. REGISTER (service action 00h), length 00100001h in bytes 5-8.
#[tokio::test]
async fn persistent_reserve_out_with_an_overlong_parameter_list_is_a_length_error() {
    let (t, n) = ready_mem(64, 512).await;
    let cdb = [0x5F, 0x00, 0x00, 0, 0, 0x00, 0x10, 0x00, 0x01, 0];
    assert!(t.refuses_cdb(0, &cdb), "refused by the CDB alone");
    let r = run(&t, &n, &cdb, vec![]).await;
    assert_sense(&r, 0x05, 0x1A, 0x00);
    // At 1 MiB the CDB is fine: the list itself decides.
    let cdb = [0x5F, 0x00, 0x00, 0, 0, 0x00, 0x10, 0x00, 0x00, 0];
    assert!(!t.refuses_cdb(0, &cdb));
}
