#![allow(clippy::unwrap_used)]

//! READ, WRITE, WRITE AND VERIFY, VERIFY, COMPARE AND WRITE, WRITE SAME, SYNCHRONIZE CACHE and
//! PRE-FETCH, with CDBs and sense bytes written out from SBC-4 / SPC-5.

mod common;

use std::sync::Arc;

use block::BlockError;
use common::*;
use scsi::Status;

const BS: usize = 512;

#[tokio::test]
async fn write10_then_read10_returns_the_data() {
    let (t, n) = ready_mem(64, 512).await;
    let data = vec![0xA5u8; 2 * BS];
    // WRITE(10): opcode 2Ah, LBA 5, TRANSFER LENGTH 2.
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 5, 0, 0, 2, 0], data.clone()).await;
    assert_good(&r);
    // READ(10): opcode 28h, LBA 5, TRANSFER LENGTH 2.
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 5, 0, 0, 2, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, data);
}

#[tokio::test]
async fn read6_transfer_length_zero_means_256_blocks() {
    let (t, n) = ready_mem(512, 512).await;
    // READ(6): opcode 08h, LBA 0, TRANSFER LENGTH 0 = 256 blocks (SBC-4 5.17).
    let r = run(&t, &n, &[0x08, 0, 0, 0, 0, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 256 * BS);
}

#[tokio::test]
async fn write6_and_read6_use_21_bit_lba() {
    let (t, n) = ready_mem(0x30000, 512).await;
    let data = vec![0x5Au8; BS];
    // WRITE(6) at LBA 0x012345 (bits 20..16 in byte 1), 1 block.
    let r = run(&t, &n, &[0x0A, 0x01, 0x23, 0x45, 1, 0], data.clone()).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 0x012345, 1).await, data);
}

#[tokio::test]
async fn read12_and_read16_read_the_last_block() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 63, vec![7u8; BS], BS).await;
    // READ(12): LBA 63, TRANSFER LENGTH 1.
    let r = run(&t, &n, &[0xA8, 0, 0, 0, 0, 63, 0, 0, 0, 1, 0, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, vec![7u8; BS]);
    let r = run(&t, &n, &read16(63, 1), vec![]).await;
    assert_eq!(r.data_in, vec![7u8; BS]);
}

#[tokio::test]
async fn read10_beyond_end_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    // READ(10) LBA 63, 2 blocks: one past the end.
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00); // ILLEGAL REQUEST, LBA OUT OF RANGE
}

#[tokio::test]
async fn read16_lba_overflow_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &read16(u64::MAX, 2), vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00); // ILLEGAL REQUEST, LBA OUT OF RANGE
}

#[tokio::test]
async fn read_zero_blocks_at_capacity_is_good_and_beyond_is_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 64, 0, 0, 0, 0], vec![]).await;
    assert_good(&r);
    assert!(r.data_in.is_empty());
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 65, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00); // LBA OUT OF RANGE
}

#[tokio::test]
async fn read10_with_rdprotect_is_invalid_field_with_pointer() {
    let (t, n) = ready_mem(64, 512).await;
    // READ(10) with RDPROTECT=001b (byte 1 bit 5): no protection information here.
    let r = run(&t, &n, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_eq!(
        r.sense,
        vec![
            0x70, // current, fixed format
            0x00, 0x05, // ILLEGAL REQUEST
            0x00, 0x00, 0x00, 0x00, // INFORMATION
            0x0A, // additional length
            0x00, 0x00, 0x00, 0x00, // command specific
            0x24, 0x00, // INVALID FIELD IN CDB
            0x00, // FRU
            0xCD, // SKSV=1, C/D=1, BPV=1, BIT POINTER 5
            0x00, 0x01, // FIELD POINTER: byte 1
        ]
    );
}

#[tokio::test]
async fn read10_with_dpo_and_fua_is_good() {
    let (t, n) = ready_mem(64, 512).await;
    // DPO (0x10) and FUA (0x08): advertised by DPOFUA in MODE SENSE.
    let r = run(&t, &n, &[0x28, 0x18, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_good(&r);
}

#[tokio::test]
async fn read_with_nonzero_control_byte_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    // NACA=1 in the CONTROL byte: ACA is not supported.
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCA, 0x00, 0x09]); // C/D, BPV, bit 2, byte 9
}

#[tokio::test]
async fn read_above_maximum_transfer_length_is_invalid_field() {
    let (t, n) = ready_mem(40000, 512).await;
    // MAXIMUM TRANSFER LENGTH is 16384 blocks of 512 bytes (8 MiB).
    let r = run(&t, &n, &read16(0, 16385), vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00); // INVALID FIELD IN CDB
    assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x0A]); // TRANSFER LENGTH, byte 10
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 0, 0, 0x40, 0x01, 0], vec![]).await;
    assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x07]); // READ(10): byte 7
}

#[tokio::test]
async fn write_with_partial_block_of_data_out_is_invalid_field_in_command_iu_and_writes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![b'a'; BS], BS).await;
    // WRITE(10) of 1 block with 200 bytes of data-out (FCP-4 9.4.2 b).
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![b'b'; 200]).await;
    assert_sense(&r, 0x05, 0x0E, 0x03); // INVALID FIELD IN COMMAND INFORMATION UNIT
    assert_eq!(read_blocks(&t, &n, 0, 1).await, vec![b'a'; BS]);
}

#[tokio::test]
async fn write_with_no_data_out_is_good_and_writes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![b'a'; BS], BS).await;
    // EDTL 0 for a 1-block WRITE(10): FCP-4 9.4.2 a, the transport reports the overflow.
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 0, 1).await, vec![b'a'; BS]);
}

#[tokio::test]
async fn write_with_fewer_whole_blocks_writes_only_those() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![b'a'; 2 * BS], BS).await;
    // WRITE(10) of 2 blocks with 1 block of data-out.
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0], vec![b'b'; BS]).await;
    assert_good(&r);
    assert_eq!(
        read_blocks(&t, &n, 0, 2).await,
        [vec![b'b'; BS], vec![b'a'; BS]].concat()
    );
}

#[tokio::test]
async fn write_with_longer_data_out_writes_only_what_the_cdb_asks() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![b'a'; 2 * BS], BS).await;
    // WRITE AND VERIFY(10) of 1 block with 10000 bytes of data-out.
    let r = run(
        &t,
        &n,
        &[0x2E, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        vec![b'b'; 10000],
    )
    .await;
    assert_good(&r);
    assert_eq!(
        read_blocks(&t, &n, 0, 2).await,
        [vec![b'b'; BS], vec![b'a'; BS]].concat()
    );
}

#[tokio::test]
async fn write_beyond_end_with_short_data_out_is_still_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 63, 0, 0, 2, 0], vec![0; BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn read_with_unexpected_data_out_ignores_it() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![1u8; BS]).await;
    assert_good(&r);
}

#[tokio::test]
async fn write12_beyond_end_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(
        &t,
        &n,
        &[0xAA, 0, 0, 0, 0, 64, 0, 0, 0, 1, 0, 0],
        vec![0u8; BS],
    )
    .await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn write_with_wrprotect_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let mut c = write16(0, 1);
    c[1] = 0x40; // WRPROTECT=010b
    let r = run(&t, &n, &c, vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCE, 0x00, 0x01]); // bit 6 of byte 1
}

#[tokio::test]
async fn write_fua_reaches_the_driver_as_fua() {
    let d = Arc::new(GatedDriver::new(64 * 512, true));
    let t = target_with(d.clone(), 512);
    let n = nexus();
    ready(&t, &n).await;
    // WRITE(10) with FUA.
    let r = run(&t, &n, &[0x2A, 0x08, 0, 0, 0, 1, 0, 0, 1, 0], vec![0u8; BS]).await;
    assert_good(&r);
    let r = run(&t, &n, &[0x2A, 0x00, 0, 0, 0, 2, 0, 0, 1, 0], vec![0u8; BS]).await;
    assert_good(&r);
    assert_eq!(*d.writes.lock().unwrap(), vec![(512, true), (1024, false)]);
}

#[tokio::test]
async fn write_and_verify_writes_with_fua() {
    let d = Arc::new(GatedDriver::new(64 * 512, true));
    let t = target_with(d.clone(), 512);
    let n = nexus();
    ready(&t, &n).await;
    // WRITE AND VERIFY(10), BYTCHK=01b (byte 1 bit 1), LBA 3, 1 block.
    let r = run(&t, &n, &[0x2E, 0x02, 0, 0, 0, 3, 0, 0, 1, 0], vec![9u8; BS]).await;
    assert_good(&r);
    assert_eq!(*d.writes.lock().unwrap(), vec![(3 * 512, true)]);
}

#[tokio::test]
async fn write_and_verify12_and_16_write_the_data() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(
        &t,
        &n,
        &[0xAE, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0],
        vec![1u8; BS],
    )
    .await;
    assert_good(&r);
    let mut c = write16(2, 1);
    c[0] = 0x8E;
    let r = run(&t, &n, &c, vec![2u8; BS]).await;
    assert_good(&r);
    assert_eq!(
        read_blocks(&t, &n, 1, 2).await,
        [vec![1u8; BS], vec![2u8; BS]].concat()
    );
}

#[tokio::test]
async fn write_and_verify_with_bytchk_10b_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x2E, 0x04, 0, 0, 0, 0, 0, 0, 1, 0], vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn verify10_bytchk_matching_data_is_good() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![3u8; 2 * BS], BS).await;
    // VERIFY(10) BYTCHK=01b, LBA 0, 2 blocks.
    let r = run(
        &t,
        &n,
        &[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 2, 0],
        vec![3u8; 2 * BS],
    )
    .await;
    assert_good(&r);
}

#[tokio::test]
async fn verify10_mismatch_is_miscompare_with_offset() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![3u8; 2 * BS], BS).await;
    let mut d = vec![3u8; 2 * BS];
    d[700] = 4;
    let r = run(&t, &n, &[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 2, 0], d).await;
    assert_eq!(r.status, Status::CHECK_CONDITION);
    assert_eq!(
        r.sense,
        vec![
            0xF0, // VALID, current, fixed
            0x00, 0x0E, // MISCOMPARE
            0x00, 0x00, 0x02, 0xBC, // INFORMATION: byte 700
            0x0A, 0, 0, 0, 0, 0x1D, 0x00, // MISCOMPARE DURING VERIFY OPERATION
            0, 0, 0, 0,
        ]
    );
}

#[tokio::test]
async fn verify16_bytchk_11b_compares_one_block_with_each() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 4, vec![6u8; 3 * BS], BS).await;
    let mut c = read16(4, 3);
    c[0] = 0x8F;
    c[1] = 0x06; // BYTCHK=11b
    let r = run(&t, &n, &c, vec![6u8; BS]).await;
    assert_good(&r);
    let r = run(&t, &n, &c, vec![7u8; BS]).await;
    assert_sense(&r, 0x0E, 0x1D, 0x00);
}

#[tokio::test]
async fn verify12_without_bytchk_checks_range_only() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0xAF, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], vec![]).await;
    assert_good(&r);
    let r = run(&t, &n, &[0xAF, 0, 0, 0, 0, 1, 0, 0, 0, 64, 0, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn verify_with_vrprotect_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x2F, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

fn caw(lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = vec![0x89, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, blocks, 0, 0]);
    c
}

#[tokio::test]
async fn compare_and_write_of_zero_blocks_with_data_is_invalid_field_in_cdb() {
    // 256 blocks do not fit the one-byte NUMBER OF LOGICAL BLOCKS: an initiator that asks for
    // them sends 0 with 2 x 256 blocks of data-out.
    let (t, n) = ready_mem(1024, 512).await;
    let r = run(&t, &n, &caw(0, 0), vec![b'A'; 512 * BS]).await;
    assert_eq!(r.status, scsi::Status(0x02)); // CHECK CONDITION
    assert_eq!(
        &r.sense[..18],
        &[
            0x70, 0, 0x05, // current, fixed format; ILLEGAL REQUEST
            0, 0, 0, 0, 10, 0, 0, 0, 0, // INFORMATION, ADDITIONAL SENSE LENGTH 10
            0x24, 0x00, // INVALID FIELD IN CDB
            0,    // FRU
            0xCF, 0x00,
            0x0D, // SKSV, C/D = CDB, BPV, bit 7 (left-most bit of the field); byte 13
        ]
    );
}

#[tokio::test]
async fn compare_and_write_zero_blocks_without_data_is_good() {
    // SBC-4 5.3: NUMBER OF LOGICAL BLOCKS zero is not an error.
    let (t, n) = ready_mem(64, 512).await;
    assert_good(&run(&t, &n, &caw(0, 0), vec![]).await);
}

#[tokio::test]
async fn compare_and_write_matching_writes_new_data() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 8, vec![b'A'; 2 * BS], BS).await;
    let data = [vec![b'A'; 2 * BS], vec![b'B'; 2 * BS]].concat();
    let r = run(&t, &n, &caw(8, 2), data).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 8, 2).await, vec![b'B'; 2 * BS]);
}

#[tokio::test]
async fn compare_and_write_miscompare_reports_offset_and_writes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 8, vec![b'A'; 2 * BS], BS).await;
    let mut data = [vec![b'A'; 2 * BS], vec![b'B'; 2 * BS]].concat();
    data[2 * BS - 27] = b'C';
    let r = run(&t, &n, &caw(8, 2), data).await;
    assert_eq!(
        r.sense,
        vec![
            0xF0, 0x00, 0x0E, // VALID, MISCOMPARE
            0x00, 0x00, 0x03, 0xE5, // INFORMATION: 997 = 1024 - 27
            0x0A, 0, 0, 0, 0, 0x1D, 0x00, // MISCOMPARE DURING VERIFY OPERATION
            0, 0, 0, 0,
        ]
    );
    assert_eq!(read_blocks(&t, &n, 8, 2).await, vec![b'A'; 2 * BS]);
}

#[tokio::test]
async fn compare_and_write_of_255_blocks_and_of_zero_blocks_is_good() {
    let (t, n) = ready_mem(1024, 512).await;
    // MAXIMUM COMPARE AND WRITE LENGTH from the backend is 255.
    let r = run(&t, &n, &caw(0, 255), vec![0u8; 2 * 255 * BS]).await;
    assert_good(&r);
    let mut c = caw(0, 0);
    c[13] = 0; // NUMBER OF LOGICAL BLOCKS 0: nothing to do
    let r = run(&t, &n, &c, vec![]).await;
    assert_good(&r);
}

#[tokio::test]
async fn compare_and_write_with_wrong_data_out_length_writes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &caw(0, 1), vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x0E, 0x03);
}

#[tokio::test]
async fn compare_and_write_with_too_much_data_out_writes_nothing() {
    let (t, n) = ready_mem(64, 512).await;
    // NUMBER OF LOGICAL BLOCKS 1 with 4 blocks of data-out.
    let r = run(&t, &n, &caw(0, 1), vec![0u8; 4 * BS]).await;
    assert_sense(&r, 0x05, 0x0E, 0x03);
}

#[tokio::test]
async fn compare_and_write_beyond_end_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &caw(63, 2), vec![0u8; 4 * BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

fn ws16(lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x93;
    c[1] = flags;
    c
}

#[tokio::test]
async fn write_same16_repeats_the_block() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &ws16(2, 5, 0), vec![0x42u8; BS]).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 2, 5).await, vec![0x42u8; 5 * BS]);
    assert_eq!(read_blocks(&t, &n, 7, 1).await, vec![0u8; BS]);
}

#[tokio::test]
async fn write_same10_zero_blocks_writes_to_the_end() {
    let (t, n) = ready_mem(64, 512).await;
    // WRITE SAME(10), LBA 60, NUMBER OF LOGICAL BLOCKS 0 (WSNZ=0: through the last LBA).
    let r = run(&t, &n, &[0x41, 0, 0, 0, 0, 60, 0, 0, 0, 0], vec![1u8; BS]).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 60, 4).await, vec![1u8; 4 * BS]);
}

#[tokio::test]
async fn write_same_beyond_end_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x41, 0, 0, 0, 0, 63, 0, 0, 2, 0], vec![1u8; BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
    let r = run(&t, &n, &ws16(u64::MAX, 1, 0), vec![1u8; BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn write_same_above_maximum_write_same_length_is_invalid_field() {
    let (t, n) = ready_mem(70000, 512).await;
    // MAXIMUM WRITE SAME LENGTH is 65536.
    let r = run(&t, &n, &ws16(0, 65537, 0), vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x0A]); // byte 10 bit 7
                                                       // Zero blocks from LBA 0 covers 70000 > 65536 blocks.
    let r = run(&t, &n, &ws16(0, 0, 0), vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn write_same16_ndob_writes_zeros_without_data_out() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 0, vec![9u8; 4 * BS], BS).await;
    let r = run(&t, &n, &ws16(1, 2, 0x01), vec![]).await;
    assert_good(&r);
    assert_eq!(
        read_blocks(&t, &n, 0, 4).await,
        [vec![9u8; BS], vec![0u8; 2 * BS], vec![9u8; BS]].concat()
    );
}

#[tokio::test]
async fn write_same_unmap_without_thin_provisioning_is_invalid_field() {
    let (t, n) = ready_thick(64, 512).await;
    let r = run(&t, &n, &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0], vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn write_same_anchor_is_invalid_field() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &ws16(0, 1, 0x18), vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
}

#[tokio::test]
async fn write_same_with_wrong_data_out_length_is_invalid_field_in_command_iu() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &ws16(0, 1, 0), vec![0u8; 2 * BS]).await;
    assert_sense(&r, 0x05, 0x0E, 0x03);
}

#[tokio::test]
async fn write_same_with_half_a_block_of_data_out_is_invalid_field_in_command_iu() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(
        &t,
        &n,
        &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        vec![1u8; BS / 2],
    )
    .await;
    assert_sense(&r, 0x05, 0x0E, 0x03);
    assert_eq!(read_blocks(&t, &n, 0, 1).await, vec![0u8; BS]);
}

#[tokio::test]
async fn synchronize_cache_is_good_and_checks_the_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![]).await;
    assert_good(&r);
    let mut c = read16(60, 10);
    c[0] = 0x91;
    let r = run(&t, &n, &c, vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn prefetch10_is_good_within_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &[0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0], vec![]).await;
    assert_good(&r);
}

#[tokio::test]
async fn logical_block_size_4096_reads_and_writes_4096_byte_blocks() {
    let (t, n) = ready_mem(16, 4096).await;
    let r = run(&t, &n, &[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0], vec![8u8; 4096]).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 1, 1).await, vec![8u8; 4096]);
    // READ CAPACITY(10): last LBA 15, block length 4096.
    let r = run(&t, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(r.data_in, vec![0, 0, 0, 15, 0, 0, 0x10, 0]);
}

async fn failing(make: fn() -> BlockError) -> (scsi::Target, Arc<scsi::ItNexus>) {
    let t = target_with(
        Arc::new(FailingDriver {
            size: 64 * 512,
            make,
        }),
        512,
    );
    let n = nexus();
    ready(&t, &n).await;
    (t, n)
}

#[tokio::test]
async fn read_failure_is_medium_error_unrecovered_read_error() {
    let (t, n) = failing(|| BlockError::ReadFailed(std::io::Error::other("x"))).await;
    let r = run(&t, &n, &read16(0, 1), vec![]).await;
    assert_sense(&r, 0x03, 0x11, 0x00); // MEDIUM ERROR, UNRECOVERED READ ERROR
}

#[tokio::test]
async fn write_failure_is_medium_error_write_error() {
    let (t, n) = failing(|| BlockError::WriteFailed(std::io::Error::other("x"))).await;
    let r = run(&t, &n, &write16(0, 1), vec![0u8; BS]).await;
    assert_sense(&r, 0x03, 0x0C, 0x00); // MEDIUM ERROR, WRITE ERROR
    let r = run(&t, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![]).await;
    assert_sense(&r, 0x03, 0x0C, 0x00); // SYNCHRONIZE CACHE failure is never GOOD
}

#[tokio::test]
async fn no_space_is_data_protect_space_allocation_failed() {
    let (t, n) = failing(|| BlockError::NoSpace).await;
    let r = run(&t, &n, &write16(0, 1), vec![0u8; BS]).await;
    assert_sense(&r, 0x07, 0x27, 0x07); // DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
}

fn orwrite16(lba: u64, blocks: u32) -> Vec<u8> {
    // ORWRITE(16), SBC-4 5.15: opcode 8Bh, LBA in bytes 2..10, TRANSFER LENGTH in 10..14.
    let mut c = vec![0x8B, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[tokio::test]
async fn orwrite_ors_the_data_into_the_blocks() {
    let (t, n) = ready_mem(64, 512).await;
    write_blocks(&t, &n, 3, vec![0x0F; 2 * BS], BS).await;
    assert_good(&run(&t, &n, &orwrite16(3, 2), vec![0x50; 2 * BS]).await);
    assert_eq!(read_blocks(&t, &n, 3, 2).await, vec![0x5F; 2 * BS]);
}

#[tokio::test]
async fn orwrite_with_orprotect_is_invalid_field_in_cdb() {
    let (t, n) = ready_mem(64, 512).await;
    let mut c = orwrite16(0, 1);
    c[1] = 0x20; // ORPROTECT 001b: no protection information on this LU
    let r = run(&t, &n, &c, vec![0; BS]).await;
    assert_sense(&r, 0x05, 0x24, 0x00); // ILLEGAL REQUEST, INVALID FIELD IN CDB
}

#[tokio::test]
async fn orwrite_beyond_the_end_is_lba_out_of_range() {
    let (t, n) = ready_mem(64, 512).await;
    let r = run(&t, &n, &orwrite16(63, 2), vec![0; 2 * BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00); // ILLEGAL REQUEST, LBA OUT OF RANGE
}

#[tokio::test]
async fn verify_without_bytchk_longer_than_maximum_transfer_length_is_invalid_field() {
    // VPD 0xB0 advertises MAXIMUM TRANSFER LENGTH 16384 blocks of 512 bytes (8 MiB); SBC-4
    // 6.6.4 applies it to VERIFY whatever BYTCHK says.
    let (t, n) = ready_mem(32768, 512).await;
    // VERIFY(16): opcode 8Fh, BYTCHK 00b, LBA 0, VERIFICATION LENGTH 16385 (00004001h).
    let cdb = [
        0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x40, 0x01, 0, 0,
    ];
    let r = run(&t, &n, &cdb, vec![]).await;
    assert_eq!(
        &r.sense[..18],
        &[
            0x70, 0, 0x05, // current, fixed format; ILLEGAL REQUEST
            0, 0, 0, 0, 10, 0, 0, 0, 0, // INFORMATION, ADDITIONAL SENSE LENGTH 10
            0x24, 0x00, // INVALID FIELD IN CDB
            0,    // FRU
            0xCF, 0x00, 0x0A, // SKSV, C/D = CDB, BPV, bit 7; field pointer byte 10
        ]
    );
    // 16384 blocks is within the limit.
    let ok = [
        0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x40, 0x00, 0, 0,
    ];
    assert_good(&run(&t, &n, &ok, vec![]).await);
}

/// SBC-3 (revision 35d) made FUA_NV (byte 1 bit 1 of READ and WRITE (10/12/16) and COMPARE
/// AND WRITE) and SYNC_NV (byte 1 bit 2 of SYNCHRONIZE CACHE (10/16)) obsolete. Initiators
/// written to older revisions still set them: the commands complete normally. The reserved bit
/// beside FUA_NV is still refused, and REPORT SUPPORTED OPERATION CODES reports FUA_NV as a bit
/// the device server ignores (zero in the CDB USAGE DATA, SPC-5 6.36.3).
#[tokio::test]
async fn obsolete_fua_nv_and_sync_nv_bits_are_accepted_and_ignored() {
    let (t, n) = ready_mem(64, 512).await;
    let data = vec![0x3Cu8; BS];
    // WRITE(10) / READ(10), FUA_NV=1 (byte 1 = 02h), LBA 1, TRANSFER LENGTH 1.
    assert_good(&run(&t, &n, &[0x2A, 0x02, 0, 0, 0, 1, 0, 0, 1, 0], data.clone()).await);
    let r = run(&t, &n, &[0x28, 0x02, 0, 0, 0, 1, 0, 0, 1, 0], vec![]).await;
    assert_good(&r);
    assert_eq!(r.data_in, data);
    // WRITE(12) / READ(12) (AAh / A8h), FUA=1 and FUA_NV=1 (0Ah), LBA 1, TRANSFER LENGTH 1.
    let cdb12 = |op: u8| [op, 0x0A, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
    assert_good(&run(&t, &n, &cdb12(0xAA), data.clone()).await);
    assert_good(&run(&t, &n, &cdb12(0xA8), vec![]).await);
    // WRITE(16) / READ(16) (8Ah / 88h), FUA_NV=1, LBA 1, TRANSFER LENGTH 1.
    let cdb16 = |op: u8| [op, 0x02, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
    assert_good(&run(&t, &n, &cdb16(0x8A), data.clone()).await);
    assert_good(&run(&t, &n, &cdb16(0x88), vec![]).await);
    // COMPARE AND WRITE (89h), FUA_NV=1, LBA 1, NUMBER OF LOGICAL BLOCKS 1 (byte 13): the
    // block holds 3Ch, so it compares equal and C3h is written.
    let mut caw = data.clone();
    caw.extend_from_slice(&[0xC3; BS]);
    let cdb = [0x89, 0x02, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
    assert_good(&run(&t, &n, &cdb, caw).await);
    assert_eq!(read_blocks(&t, &n, 1, 1).await, vec![0xC3; BS]);
    // SYNCHRONIZE CACHE(10) (35h) and (16) (91h), SYNC_NV=1 (byte 1 = 04h).
    assert_good(&run(&t, &n, &[0x35, 0x04, 0, 0, 0, 0, 0, 0, 0, 0], vec![]).await);
    let sync16 = [0x91, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_good(&run(&t, &n, &sync16, vec![]).await);
    // READ(10) with byte 1 bit 2 (reserved) set: ILLEGAL REQUEST, INVALID FIELD IN CDB
    // (24h/00h), SENSE KEY SPECIFIC: SKSV=1, C/D=1, BPV=1, BIT POINTER 2 (CAh), byte 1.
    let r = run(&t, &n, &[0x28, 0x04, 0, 0, 0, 1, 0, 0, 1, 0], vec![]).await;
    assert_sense(&r, 0x05, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xCA, 0x00, 0x01]);
    // REPORT SUPPORTED OPERATION CODES (A3h/0Ch), REPORTING OPTIONS 001b, READ(10): the one
    // command descriptor is a 4-byte header and the CDB USAGE DATA; its byte 1 shows DPO and
    // FUA (18h), not FUA_NV.
    let rsoc = [0xA3, 0x0C, 0x01, 0x28, 0, 0, 0, 0, 0, 64, 0, 0];
    let r = run(&t, &n, &rsoc, vec![]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[2..4], &[0x00, 0x0A], "CDB SIZE 10");
    assert_eq!(&r.data_in[4..6], &[0x28, 0x18]);
}

/// MAXIMUM TRANSFER LENGTH (16384 blocks of 512 bytes) bounds every command that transfers
/// medium data (SBC-4 6.6.4), writes as well as reads: WRITE(16), WRITE AND VERIFY(16) and
/// ORWRITE(16) of 16385 blocks, with all their data, are INVALID FIELD IN CDB with the
/// field pointer at TRANSFER LENGTH (byte 10, bit 7), and write nothing.
#[tokio::test]
async fn writes_above_maximum_transfer_length_are_invalid_field_and_write_nothing() {
    let (t, n) = ready_mem(40000, 512).await;
    // LBA 0, TRANSFER LENGTH 00004001h.
    for opcode in [0x8A, 0x8E, 0x8B] {
        let cdb = [
            opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x40, 0x01, 0, 0,
        ];
        let r = run(&t, &n, &cdb, vec![0xA5; 16385 * BS]).await;
        assert_sense(&r, 0x05, 0x24, 0x00);
        assert_eq!(&r.sense[15..18], &[0xCF, 0x00, 0x0A], "opcode {opcode:02x}");
    }
    assert_eq!(read_blocks(&t, &n, 0, 1).await, vec![0; BS]);
    assert_eq!(read_blocks(&t, &n, 16384, 1).await, vec![0; BS]);
}
