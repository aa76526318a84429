//! Any bytes as a guest's virtqueues (descriptor tables, avail rings, buffer contents) handed
//! to the vhost-user-scsi device's control and request queues: the daemon must never panic or
//! hang, whatever the guest writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_scsi::fuzzing::queues(data);
});
