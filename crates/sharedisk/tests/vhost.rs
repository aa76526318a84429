//! `sharedisk serve --vhost-user SOCKET`, against the built binary: each socket is announced
//! after the iSCSI URL, speaks vhost-user (features as the virtio-scsi device offers them),
//! accepts a new frontend after one goes, and disappears on SIGTERM.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_sharedisk");
const WAIT: Duration = Duration::from_secs(30);

struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn vhost_user_sockets_serve_and_accept_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("disk.img");
    let s1 = dir.path().join("vm1.sock");
    let s2 = dir.path().join("vm2.sock");
    let control = dir.path().join("control.sock");
    let mut child = Command::new(BIN)
        .args(["serve", "--file"])
        .arg(&img)
        .args(["--size", "16M", "--listen", "127.0.0.1:0", "--control"])
        .arg(&control)
        .arg("--vhost-user")
        .arg(&s1)
        .arg("--vhost-user")
        .arg(&s2)
        .args([
            "--vhost-initiator",
            "iqn.2026-01.com.example:vm1",
            "--vhost-queues",
            "2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sharedisk");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut d = Daemon { child, lines };
    let line = || d.lines.recv_timeout(WAIT).expect("a line in time");
    assert!(line().starts_with("iscsi://127.0.0.1:"));
    assert_eq!(line(), format!("vhost-user:{}", s1.display()));
    assert_eq!(line(), format!("vhost-user:{}", s2.display()));
    assert!(line().starts_with("Reach it with"));

    for socket in [&s1, &s2, &s1] {
        let f = Frontend::connect(socket, 4).expect("connect");
        f.set_owner().expect("SET_OWNER");
        let features = f.get_features().expect("GET_FEATURES");
        // VIRTIO_F_VERSION_1 (32), VIRTIO_RING_F_INDIRECT_DESC (28), VIRTIO_RING_F_EVENT_IDX
        // (29), VHOST_USER_F_PROTOCOL_FEATURES (30), VIRTIO_SCSI_F_HOTPLUG (1) and _CHANGE (2).
        assert_eq!(
            features,
            (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 1) | (1 << 2)
        );
        drop(f);
    }

    support::signal(&d.child, "-TERM");
    let status = support::wait_exit(&mut d.child, WAIT);
    assert!(status.success(), "{status:?}");
    assert!(!s1.exists() && !s2.exists(), "sockets removed");
}

#[test]
fn a_start_that_fails_on_a_later_socket_has_served_nothing_and_leaves_no_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s1 = dir.path().join("vm1.sock");
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"data").expect("write");
    let control = dir.path().join("control.sock");
    let more: [&std::ffi::OsStr; 6] = [
        "--control".as_ref(),
        control.as_ref(),
        "--vhost-user".as_ref(),
        s1.as_ref(),
        "--vhost-user".as_ref(),
        precious.as_ref(),
    ];
    let err = support::refused_for_a_file_that_is_not_a_socket(dir.path(), &more, &precious);
    // Nothing was served: no socket was ready either.
    assert!(!err.contains("socket ready"), "{err}");
    // The socket bound for the first path is gone with the daemon.
    assert!(!s1.exists());
}

/// `--vhost-watch-us` beyond 10 ms is refused at start with the limit named, and no socket is
/// created.
#[test]
fn a_watch_beyond_the_limit_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vm.sock");
    let mut child = Command::new(BIN)
        .args(["serve", "--file"])
        .arg(dir.path().join("disk.img"))
        .args(["--size", "1M", "--listen", "127.0.0.1:0", "--control"])
        .arg(dir.path().join("control.sock"))
        .arg("--vhost-user")
        .arg(&sock)
        .args(["--vhost-watch-us", "10001"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sharedisk");
    let status = support::wait_exit(&mut child, WAIT);
    assert!(!status.success(), "{status:?}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(
        err.contains("the avail-ring watch (watch_us; quick start: --vhost-watch-us) must be 0 to 10000 µs, not 10001 µs"),
        "{err}"
    );
    assert!(!sock.exists(), "no socket created");
}
