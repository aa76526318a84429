//! Any bytes as what an initiator sends after logging in (PDUs of the full feature phase, or
//! garbage), over loopback TCP to a running target: the target must never panic, and must
//! close the connection once the initiator's side closed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iscsi::fuzzing::session(data);
});
