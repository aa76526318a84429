#![allow(clippy::unwrap_used)]

//! Arbitrary bytes from the wire never panic: random CDBs (biased towards supported opcodes)
//! with random data-out through the whole dispatcher, and the fuzzing entry point.

mod common;

use common::*;
use scsi::{Completion, Status};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35,
    0x41, 0x42, 0x55, 0x5A, 0x88, 0x89, 0x8A, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8,
    0xAA, 0xAE, 0xAF,
];

fn random_cdb(rng: &mut XorShift) -> Vec<u8> {
    let len = (rng.next() % 33) as usize;
    let mut c: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
    if let Some(first) = c.first_mut() {
        if rng.next() & 3 != 0 {
            *first = OPCODES[(rng.next() as usize) % OPCODES.len()];
        }
    }
    // Small LBAs and lengths often, so commands reach the backend.
    if rng.next() & 1 == 0 {
        for b in c.iter_mut().skip(2).take(7) {
            *b = 0;
        }
    }
    c
}

#[tokio::test]
async fn random_cdbs_never_panic_and_always_answer() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (thin, _) = thin_target(64, 512);
    let targets = [mem_target(64, 512), mem_target(8, 4096), thin];
    let n = nexus();
    for i in 0..10_000u64 {
        let t = &targets[(i % 3) as usize];
        let cdb = random_cdb(&mut rng);
        let want = t.data_out_len(0, &cdb) as usize;
        let data_len = match rng.next() % 3 {
            0 => want.min(1 << 20),
            1 => (rng.next() % 2048) as usize,
            _ => 0,
        };
        let data: Vec<u8> = (0..data_len).map(|_| rng.byte() & 1).collect();
        let c = cmd(&n, i, &cdb, data, (rng.next() % 4096) as u32);
        match t.execute(c).await {
            Completion::Done(r) => {
                if r.status == Status::CHECK_CONDITION {
                    assert!(r.sense.len() >= 8, "sense for {cdb:02x?}");
                }
            }
            Completion::Aborted => panic!("nothing aborts here"),
        }
    }
}

#[test]
fn fuzzing_entry_point_accepts_arbitrary_bytes() {
    let mut rng = XorShift(42);
    scsi::fuzzing::cdb(&[]);
    for _ in 0..50_000 {
        let len = (rng.next() % 64) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        scsi::fuzzing::cdb(&data);
    }
}

#[test]
fn execution_fuzzing_entry_point_accepts_arbitrary_bytes() {
    let mut rng = XorShift(7);
    scsi::fuzzing::execute(&[]);
    // One well-formed command: flags 0 (first nexus, LU 0), a 10-byte WRITE(10) of one
    // block at LBA 0 (SBC-4 5.36), 512 bytes of data-out, no data-in.
    let mut input = vec![0x00, 10, 0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x02, 0x00];
    input.extend([0xA5; 512]);
    input.extend([0, 0]);
    scsi::fuzzing::execute(&input);
    for _ in 0..2_000 {
        let len = (rng.next() % 256) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        // Mostly supported opcodes, so commands reach their executors.
        if let Some(b) = data.get_mut(2) {
            *b = OPCODES[(rng.next() as usize) % OPCODES.len()];
        }
        scsi::fuzzing::execute(&data);
    }
}
