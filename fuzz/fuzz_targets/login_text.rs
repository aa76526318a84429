//! Any bytes as the key=value text of a Login or Text request: parsing and negotiation must
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = iscsi::fuzzing::login_text(data);
});
