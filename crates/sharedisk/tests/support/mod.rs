//! What the tests that run the built daemon share: signalling it and waiting for its exit.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Send `sig` (as `kill` spells it, e.g. "-TERM") to `child`.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

/// Wait at most `within` for `child` to exit; its status.
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}
