//! Any bytes as a sequence of SCSI commands from two initiators, run through the whole
//! dispatcher against memory-backed LUs: executing them must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    scsi::fuzzing::execute(data);
});
