#![allow(clippy::unwrap_used)]

//! Thin provisioning: UNMAP, WRITE SAME with UNMAP, GET LBA STATUS (SBC-4 4.7, 5.7, 5.32, 5.50).

mod common;

use common::*;

const BS: usize = 512;

fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let bd = (ranges.len() * 16) as u16;
    let mut p = Vec::new();
    p.extend_from_slice(&(bd + 6).to_be_bytes()); // UNMAP DATA LENGTH
    p.extend_from_slice(&bd.to_be_bytes()); // UNMAP BLOCK DESCRIPTOR DATA LENGTH
    p.extend_from_slice(&[0; 4]);
    for &(lba, n) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: u16) -> Vec<u8> {
    let l = len.to_be_bytes();
    vec![0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9E, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

async fn thin_ready() -> (
    scsi::Target,
    std::sync::Arc<scsi::ItNexus>,
    std::sync::Arc<ThinDriver>,
) {
    let (t, d) = thin_target(64, 512);
    let n = nexus();
    ready(&t, &n).await;
    (t, n, d)
}

#[tokio::test]
async fn unmap_deallocates_and_get_lba_status_reports_it() {
    let (t, n, _) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![0xAB; 16 * BS], BS).await;
    let p = unmap_params(&[(8, 8)]);
    let r = run(&t, &n, &unmap_cdb(p.len() as u16), p).await;
    assert_good(&r);
    assert_eq!(read_blocks(&t, &n, 8, 8).await, vec![0u8; 8 * BS]);
    let r = run(&t, &n, &get_lba_status(0, 56), vec![]).await;
    assert_good(&r);
    assert_eq!(
        r.data_in,
        vec![
            0, 0, 0, 36, // PARAMETER DATA LENGTH: 4 + 2 descriptors
            0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, // LBA 0
            0, 0, 0, 8, // 8 blocks
            0x00, 0, 0, 0, // mapped
            0, 0, 0, 0, 0, 0, 0, 8, // LBA 8
            0, 0, 0, 56, // 56 blocks
            0x01, 0, 0, 0, // deallocated
        ]
    );
}

#[tokio::test]
async fn get_lba_status_truncates_to_allocation_length() {
    let (t, n, _) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![1; 8 * BS], BS).await;
    let r = run(&t, &n, &get_lba_status(0, 24), vec![]).await;
    assert_eq!(
        r.data_in,
        vec![0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn get_lba_status_beyond_end_is_lba_out_of_range() {
    let (t, n, _) = thin_ready().await;
    let r = run(&t, &n, &get_lba_status(64, 24), vec![]).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
}

#[tokio::test]
async fn get_lba_status_on_full_disk_reports_everything_mapped() {
    let (t, n) = ready_thick(64, 512).await;
    let r = run(&t, &n, &get_lba_status(10, 24), vec![]).await;
    assert_eq!(
        &r.data_in[8..24],
        &[0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 54, 0, 0, 0, 0]
    );
}

/// SBC-4 4.7.2: every LBA of a fully provisioned LU (LBPME=0) is mapped, even where its image
/// has holes.
#[tokio::test]
async fn get_lba_status_on_a_full_lu_over_an_image_with_holes_reports_everything_mapped() {
    let d = std::sync::Arc::new(ThinDriver::thick(64 * 512, 512));
    let t = target_with(d.clone(), 512);
    let n = nexus();
    ready(&t, &n).await;
    write_blocks(&t, &n, 0, vec![1; 8 * BS], BS).await; // blocks 8.. stay holes
    let r = run(&t, &n, &get_lba_status(0, 40), vec![]).await;
    assert_good(&r);
    assert_eq!(
        r.data_in,
        vec![
            0, 0, 0, 20, // PARAMETER DATA LENGTH: 4 + 1 descriptor
            0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, // LBA 0
            0, 0, 0, 64, // 64 blocks
            0x00, 0, 0, 0, // mapped
        ]
    );
}

/// An image that stops taking deallocation after it was opened: UNMAP still answers GOOD (the
/// blocks stay mapped, which SBC-4 5.31 allows), not INVALID COMMAND OPERATION CODE for a
/// command the LU reports as supported; WRITE SAME with UNMAP writes the zeros instead.
#[tokio::test]
async fn deallocation_refused_at_run_time_keeps_unmap_and_write_same_good() {
    let (t, n, d) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![0xAB; 16 * BS], BS).await;
    d.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
    let p = unmap_params(&[(0, 4)]);
    assert_good(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await);
    assert_eq!(
        read_blocks(&t, &n, 0, 4).await,
        vec![0xAB; 4 * BS],
        "still mapped"
    );
    // WRITE SAME(16), UNMAP (byte 1 bit 3), LBA 4, 4 blocks, a zero block.
    let mut c = read16(4, 4);
    c[0] = 0x93;
    c[1] = 0x08;
    assert_good(&run(&t, &n, &c, vec![0u8; BS]).await);
    assert_eq!(read_blocks(&t, &n, 4, 4).await, vec![0u8; 4 * BS]);
}

#[tokio::test]
async fn unmap_with_zero_parameter_list_length_is_good() {
    let (t, n, d) = thin_ready().await;
    let r = run(&t, &n, &unmap_cdb(0), vec![]).await;
    assert_good(&r);
    assert!(d.discards.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unmap_zero_blocks_is_good_and_discards_nothing() {
    let (t, n, d) = thin_ready().await;
    let p = unmap_params(&[(3, 0), (64, 0)]);
    assert_good(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await);
    assert!(d.discards.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unmap_short_parameter_list_is_parameter_list_length_error() {
    let (t, n, _) = thin_ready().await;
    let r = run(&t, &n, &unmap_cdb(4), vec![0; 4]).await;
    assert_sense(&r, 0x05, 0x1A, 0x00); // PARAMETER LIST LENGTH ERROR
}

#[tokio::test]
async fn unmap_beyond_end_is_lba_out_of_range_and_unmaps_nothing() {
    let (t, n, d) = thin_ready().await;
    let p = unmap_params(&[(0, 8), (60, 8)]);
    let r = run(&t, &n, &unmap_cdb(p.len() as u16), p).await;
    assert_sense(&r, 0x05, 0x21, 0x00);
    assert!(d.discards.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unmap_more_descriptors_than_advertised_is_invalid_field_in_parameter_list() {
    let (t, n, _) = thin_ready().await;
    let ranges: Vec<(u64, u32)> = (0..257).map(|_| (0, 0)).collect();
    let p = unmap_params(&ranges);
    let r = run(&t, &n, &unmap_cdb(p.len() as u16), p).await;
    assert_sense(&r, 0x05, 0x26, 0x00);
}

#[tokio::test]
async fn unmap_on_fully_provisioned_lu_is_invalid_command_operation_code() {
    let (t, n) = ready_thick(64, 512).await;
    let p = unmap_params(&[(0, 1)]);
    let r = run(&t, &n, &unmap_cdb(p.len() as u16), p).await;
    assert_sense(&r, 0x05, 0x20, 0x00);
}

#[tokio::test]
async fn unmap_listed_in_rsoc_on_thin_lu() {
    let (t, n, _) = thin_ready().await;
    let r = run(
        &t,
        &n,
        &[0xA3, 0x0C, 0x01, 0x42, 0, 0, 0, 0, 0, 64, 0, 0],
        vec![],
    )
    .await;
    assert_eq!(
        r.data_in,
        // SUPPORT 011b, CDB SIZE 10; UNMAP with ANCHOR (byte 1 bit 0) not supported.
        vec![0, 0x03, 0, 10, 0x42, 0x00, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x00]
    );
}

#[tokio::test]
async fn write_same16_unmap_with_zero_block_deallocates() {
    let (t, n, d) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![7; 16 * BS], BS).await;
    let mut c = read16(0, 16);
    c[0] = 0x93;
    c[1] = 0x08; // UNMAP
    assert_good(&run(&t, &n, &c, vec![0u8; BS]).await);
    assert_eq!(*d.discards.lock().unwrap(), vec![(0, 16 * 512)]);
    assert_eq!(read_blocks(&t, &n, 0, 16).await, vec![0u8; 16 * BS]);
    let r = run(&t, &n, &get_lba_status(0, 24), vec![]).await;
    assert_eq!(r.data_in[20], 0x01); // deallocated
}

#[tokio::test]
async fn write_same10_unmap_is_supported_when_thin() {
    let (t, n, d) = thin_ready().await;
    assert_good(&run(&t, &n, &[0x41, 0x08, 0, 0, 0, 1, 0, 0, 7, 0], vec![0u8; BS]).await);
    assert_eq!(*d.discards.lock().unwrap(), vec![(512, 7 * 512)]);
}

#[tokio::test]
async fn write_same_unmap_with_nonzero_pattern_deallocates_on_an_lbprz_disk() {
    let (t, n, d) = thin_ready().await;
    // WRITE SAME(10): opcode 41h, UNMAP (byte 1 bit 3), LBA 0, NUMBER OF LOGICAL BLOCKS 2,
    // with a pattern of 05h bytes. SBC-4 5.50: UNMAP=1, ANCHOR=0 is an unmap operation, so
    // with LBPRZ the blocks are deallocated and read as zeros.
    assert_good(&run(&t, &n, &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 2, 0], vec![5u8; BS]).await);
    assert_eq!(*d.discards.lock().unwrap(), vec![(0, 2 * 512)]);
    assert_eq!(read_blocks(&t, &n, 0, 2).await, vec![0u8; 2 * BS]);
}

#[tokio::test]
async fn write_same_of_zero_blocks_at_the_capacity_is_lba_out_of_range() {
    let (t, n, _) = thin_ready().await;
    // WRITE SAME(16): opcode 93h, LBA 64 (the capacity of this 64-block LU, one past the last
    // LBA), NUMBER OF LOGICAL BLOCKS 0 ("through the last LBA").
    let mut c = read16(64, 0);
    c[0] = 0x93;
    let r = run(&t, &n, &c, vec![0u8; BS]).await;
    assert_sense(&r, 0x05, 0x21, 0x00); // ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE
}

#[tokio::test]
async fn unmap_with_the_write_cache_off_is_flushed_before_good() {
    let (t, n, d) = thin_ready().await;
    // MODE SELECT(6), PF: the caching page (08h, length 12h) with WCE 0.
    let mut p = vec![0, 0, 0, 0, 0x08, 0x12];
    p.resize(24, 0);
    assert_good(&run(&t, &n, &[0x15, 0x10, 0, 0, 24, 0], p).await);
    let before = d.flushes.load(std::sync::atomic::Ordering::Relaxed);
    let p = unmap_params(&[(8, 8)]);
    assert_good(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await);
    assert_eq!(*d.discards.lock().unwrap(), vec![(8 * 512, 8 * 512)]);
    assert_eq!(
        d.flushes.load(std::sync::atomic::Ordering::Relaxed),
        before + 1,
        "one flush after the deallocation"
    );
}

#[tokio::test]
async fn write_same16_unmap_ndob_deallocates_without_data_out() {
    let (t, n, d) = thin_ready().await;
    let mut c = read16(4, 4);
    c[0] = 0x93;
    c[1] = 0x09; // UNMAP, NDOB
    assert_good(&run(&t, &n, &c, vec![]).await);
    assert_eq!(*d.discards.lock().unwrap(), vec![(4 * 512, 4 * 512)]);
}

/// The Block Device Characteristics VPD page says VBULS=1 (SBC-4 6.6.2), so VERIFY with a
/// byte check (BYTCHK 01b) of unmapped LBAs compares the zeros they read as (LBPRZ): equal
/// data is GOOD, other data MISCOMPARE DURING VERIFY OPERATION (1Dh/00h) with the offset of
/// the first differing byte in INFORMATION, never MISCOMPARE VERIFY OF UNMAPPED LBA (1Dh/01h).
#[tokio::test]
async fn verify_with_byte_check_compares_unmapped_lbas_as_zeros() {
    let (t, n, _) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![0xAB; 4 * BS], BS).await;
    let p = unmap_params(&[(0, 4)]);
    assert_good(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await);
    // VERIFY(10), BYTCHK 01b (byte 1 = 02h), LBA 1, VERIFICATION LENGTH 2.
    let verify = [0x2F, 0x02, 0, 0, 0, 1, 0, 0, 2, 0];
    assert_good(&run(&t, &n, &verify, vec![0; 2 * BS]).await);
    let mut data = vec![0u8; 2 * BS];
    data[600] = 0x01;
    let r = run(&t, &n, &verify, data).await;
    assert_sense(&r, 0x0E, 0x1D, 0x00);
    // Fixed format: VALID (byte 0 bit 7) and INFORMATION (bytes 3-6) = 600.
    assert_eq!(r.sense[0] & 0x80, 0x80);
    assert_eq!(&r.sense[3..7], &600u32.to_be_bytes());
}

/// MAXIMUM UNMAP LBA COUNT (VPD B0h bytes 20-23) is 1,048,576 (100000h) blocks: SBC-4 5.32
/// refuses a parameter list whose descriptors together ask for more with INVALID FIELD IN
/// PARAMETER LIST (26h/00h); the field pointer names the NUMBER OF LOGICAL BLOCKS of the
/// descriptor that goes over (byte 16 for the first descriptor, 32 for the second), bit 7.
/// Exactly the limit is GOOD.
#[tokio::test]
async fn unmap_of_more_blocks_than_advertised_is_invalid_field_in_parameter_list() {
    let (t, n) = ready_mem(1 << 21, 512).await;
    let check = |r: &scsi::Response, byte: u8| {
        assert_sense(r, 0x05, 0x26, 0x00);
        // SKSV=1, C/D=0 (parameter list), BPV=1, bit 7; FIELD POINTER.
        assert_eq!(&r.sense[15..18], &[0x8F, 0x00, byte]);
    };
    let p = unmap_params(&[(0, 0x10_0001)]);
    check(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await, 16);
    let p = unmap_params(&[(0, 0x8_0000), (0x8_0000, 0x8_0001)]);
    check(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await, 32);
    let p = unmap_params(&[(0, 0x10_0000)]);
    assert_good(&run(&t, &n, &unmap_cdb(p.len() as u16), p).await);
}

/// MODE SELECT(6), PF, with the caching page (08h, length 12h) whose WCE (byte 2 bit 2) is
/// `wce`.
async fn select_wce(t: &scsi::Target, n: &std::sync::Arc<scsi::ItNexus>, wce: bool) {
    let mut p = vec![0, 0, 0, 0, 0x08, 0x12, if wce { 0x04 } else { 0 }];
    p.resize(24, 0);
    assert_good(&run(t, n, &[0x15, 0x10, 0, 0, 24, 0], p).await);
}

fn flushes(d: &ThinDriver) -> usize {
    d.flushes.load(std::sync::atomic::Ordering::Relaxed)
}

/// Turning the write cache off makes every later write reach stable storage before GOOD, and
/// the initiator then sends no SYNCHRONIZE CACHE: what the cache held before goes to stable
/// storage before the MODE SELECT's GOOD. Selecting it off again has nothing to flush.
#[tokio::test]
async fn mode_select_turning_the_write_cache_off_flushes_it_before_good() {
    let (t, n, d) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![0x5A; BS], BS).await;
    let before = flushes(&d);
    select_wce(&t, &n, false).await;
    assert_eq!(flushes(&d), before + 1, "one flush as the cache goes off");
    select_wce(&t, &n, false).await;
    select_wce(&t, &n, true).await;
    assert_eq!(
        flushes(&d),
        before + 1,
        "no flush when the cache stays off or goes on"
    );
}

/// SBC-4 VERIFY (10): a logical unit with a cache writes the cached blocks the command names
/// to the medium before it verifies them; with the cache off they are there already.
#[tokio::test]
async fn verify_writes_the_cache_to_the_medium_first_when_the_write_cache_is_on() {
    let (t, n, d) = thin_ready().await;
    write_blocks(&t, &n, 0, vec![0x5A; BS], BS).await;
    // VERIFY(10): opcode 2Fh, BYTCHK 00b (no data-out), LBA 0, VERIFICATION LENGTH 1.
    let verify = [0x2F, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let before = flushes(&d);
    assert_good(&run(&t, &n, &verify, vec![]).await);
    assert_eq!(flushes(&d), before + 1, "the cache went to the medium");
    select_wce(&t, &n, false).await;
    let before = flushes(&d);
    assert_good(&run(&t, &n, &verify, vec![]).await);
    assert_eq!(flushes(&d), before, "nothing cached to write with WCE off");
}
