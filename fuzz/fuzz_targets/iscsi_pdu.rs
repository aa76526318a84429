//! Any bytes as an iSCSI PDU (basic header segment, AHS, data segment): parsing must never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = iscsi::fuzzing::pdu(data);
});
