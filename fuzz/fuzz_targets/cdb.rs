//! Any bytes as a SCSI CDB: parsing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scsi::fuzzing::cdb(data);
});
