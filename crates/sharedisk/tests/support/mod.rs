//! What the tests that run the built daemon share: signalling it and waiting for its exit.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// Run `sharedisk serve` on a 16 MiB image in `dir`, on loopback, with `more` arguments, to
/// its exit, expecting it to refuse to start because `precious` (a file holding "data") is
/// given as a socket path: it leaves the file alone and serves nothing ("Listening" is logged
/// as a portal starts serving, and the URLs are printed once everything serves). Returns its
/// stderr.
#[allow(dead_code)] // not every test binary uses it
pub fn refused_for_a_file_that_is_not_a_socket(
    dir: &Path,
    more: &[&OsStr],
    precious: &Path,
) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sharedisk"))
        .args(["serve", "--file"])
        .arg(dir.join("disk.img"))
        .args(["--size", "16M", "--listen", "127.0.0.1:0"])
        .args(more)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run sharedisk");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(precious).expect("still there"), b"data");
    assert!(!err.contains("Listening"), "{err}");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    err
}
