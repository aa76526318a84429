//! `Target::data_out_len`: the data-out byte count each CDB asks for (SAM-5 SCSI protocol data
//! transfer length), which transports use for residuals.

mod common;

use common::*;

#[test]
fn data_out_len_of_every_data_out_command() {
    let t = mem_target(64, 512);
    let cases: &[(&[u8], u32)] = &[
        // WRITE(6), 0 blocks = 256.
        (&[0x0A, 0, 0, 0, 0, 0], 256 * 512),
        (&[0x0A, 0, 0, 0, 3, 0], 3 * 512),
        // WRITE(10) 2 blocks.
        (&[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0], 1024),
        // WRITE(12) 1 block.
        (&[0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], 512),
        // WRITE(16) 4 blocks.
        (&[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], 2048),
        // WRITE AND VERIFY(10/12/16).
        (&[0x2E, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512),
        (&[0xAE, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0], 1024),
        (&[0x8E, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0], 1536),
        // VERIFY(10): BYTCHK 00b none, 01b all blocks, 11b one block.
        (&[0x2F, 0x00, 0, 0, 0, 0, 0, 0, 8, 0], 0),
        (&[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], 8 * 512),
        (&[0x2F, 0x06, 0, 0, 0, 0, 0, 0, 8, 0], 512),
        (&[0xAF, 0x02, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0], 1024),
        (
            &[0x8F, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0],
            1024,
        ),
        // COMPARE AND WRITE: 2 x NUMBER OF LOGICAL BLOCKS.
        (&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0], 3072),
        // WRITE SAME(10/16): one block; NDOB none.
        (&[0x41, 0, 0, 0, 0, 0, 0, 0, 9, 0], 512),
        (&[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0], 512),
        (&[0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0], 0),
        // UNMAP and MODE SELECT: PARAMETER LIST LENGTH.
        (&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], 24),
        (&[0x15, 0x10, 0, 0, 28, 0], 28),
        (&[0x55, 0x10, 0, 0, 0, 0, 0, 0x01, 0x02, 0], 258),
        // ORWRITE(16).
        (&[0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], 512),
        // No data-out: READ(10), INQUIRY, a truncated CDB, nothing.
        (&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 0),
        (&[0x12, 0, 0, 0, 36, 0], 0),
        (&[0x2A, 0, 0], 0),
        (&[], 0),
    ];
    for &(cdb, want) in cases {
        assert_eq!(t.data_out_len(0, cdb), want, "cdb {cdb:02x?}");
    }
    assert_eq!(t.data_out_len(7, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0]), 0);
}

#[test]
fn data_out_len_uses_the_logical_block_size() {
    let t = mem_target(8, 4096);
    assert_eq!(t.data_out_len(0, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0]), 8192);
}
