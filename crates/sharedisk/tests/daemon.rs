//! The quick-start contract, against the built binary: `sharedisk serve` on loopback with an
//! ephemeral port prints the LU's URL first, refuses what it must refuse with a clear error,
//! and stops cleanly on SIGTERM.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sharedisk");
const WAIT: Duration = Duration::from_secs(30);

/// A running daemon, killed when dropped.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
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
        Self { child, lines }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .expect("the daemon printed a line in time")
    }

    fn signal(&self, sig: &str) {
        support::signal(&self.child, sig);
    }

    fn wait(&mut self) -> ExitStatus {
        support::wait_exit(&mut self.child, WAIT)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the daemon to completion; it must exit by itself.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sharedisk");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Split `iscsi://ADDR:PORT/IQN/LUN` into its parts.
fn parse_url(url: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix("iscsi://")
        .unwrap_or_else(|| panic!("not an iscsi URL: {url:?}"));
    let mut parts = rest.splitn(3, '/');
    let portal = parts.next().unwrap_or_default().to_string();
    let iqn = parts.next().unwrap_or_default().to_string();
    let lun = parts.next().unwrap_or_default().to_string();
    (portal, iqn, lun)
}

#[test]
fn serve_prints_the_lu_url_then_how_to_reach_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let d = Daemon::start(&[
        "serve",
        "--file",
        path_str(&image),
        "--size",
        "64M",
        "--listen",
        "127.0.0.1:0",
    ]);

    let url = d.line();
    let hint = d.line();

    let (portal, iqn, lun) = parse_url(&url);
    assert!(portal.starts_with("127.0.0.1:"), "{url}");
    assert_ne!(portal, "127.0.0.1:0", "the URL names the bound port: {url}");
    assert_eq!(iqn, "iqn.2026-01.io.sharedisk:disk");
    assert_eq!(lun, "0");
    TcpStream::connect(&portal).expect("the portal accepts connections");
    for client in ["iscsi-ls", "iscsi-test-cu", "iscsiadm"] {
        assert!(hint.contains(client), "{hint}");
    }
}

#[test]
fn serve_creates_a_sparse_image_of_the_given_size() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("new.img");
    let d = Daemon::start(&[
        "serve",
        "--file",
        path_str(&image),
        "--size",
        "1G",
        "--listen",
        "127.0.0.1:0",
        "--block-size",
        "4096",
    ]);

    d.line();

    let meta = std::fs::metadata(&image).expect("image created");
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "the image is sparse");
}

#[test]
fn sigterm_stops_the_daemon_with_success() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let mut d = Daemon::start(&[
        "serve",
        "--file",
        path_str(&image),
        "--size",
        "16M",
        "--listen",
        "127.0.0.1:0",
    ]);
    let url = d.line();
    let (portal, _, _) = parse_url(&url);
    // A connection that has not started its login: the daemon closes it instead of waiting
    // for it (the login phase may last 30 s).
    let mut idle = TcpStream::connect(&portal).expect("connect");
    idle.set_read_timeout(Some(WAIT)).expect("read timeout");

    // A hangup does not stop it: the portal still accepts.
    d.signal("-HUP");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(&portal).is_ok(),
        "still serving after SIGHUP"
    );

    d.signal("-TERM");

    // Closed (or reset, if it was still in the listen backlog), not timed out.
    let read = idle.read(&mut [0u8; 1]);
    let closed = match &read {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed, "the idle connection is closed: {read:?}");
    assert!(d.wait().success(), "exit status after SIGTERM");
    assert!(
        TcpStream::connect(&portal).is_err(),
        "the listener is closed after shutdown"
    );
}

#[test]
fn a_missing_image_without_size_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("missing.img");

    let (status, out, err) = run_to_exit(&["serve", "--file", path_str(&image)]);

    assert!(!status.success());
    assert_eq!(out, "", "nothing on stdout");
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("--size"), "{err}");
    assert!(!image.exists(), "no image was created");
}

#[test]
fn a_non_loopback_address_without_acl_or_chap_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");

    let (status, out, err) = run_to_exit(&[
        "serve",
        "--file",
        path_str(&image),
        "--size",
        "16M",
        "--listen",
        "0.0.0.0:0",
    ]);

    assert!(!status.success());
    assert_eq!(out, "");
    assert!(err.contains("outside the loopback network"), "{err}");
    assert!(!image.exists(), "refused before creating anything");
}

#[test]
fn a_second_daemon_on_the_same_image_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("shared.img");
    let args = [
        "serve",
        "--file",
        path_str(&image),
        "--size",
        "16M",
        "--listen",
        "127.0.0.1:0",
    ];
    let first = Daemon::start(&args);
    first.line();

    let (status, out, err) = run_to_exit(&args);

    assert!(
        !status.success(),
        "the second daemon must not serve the image"
    );
    assert_eq!(out, "", "no URL from the second daemon");
    assert!(
        err.contains("in use") || err.to_lowercase().contains("lock"),
        "{err}"
    );
}

#[test]
fn a_config_file_serves_every_lu_of_every_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("sharedisk.toml");
    std::fs::write(
        &config,
        r#"
        [[target]]
        name = "iqn.2026-01.com.example:one"
        portals = ["127.0.0.1:0"]
        [[target.lu]]
        lun = 0
        file = "a.img"
        size = "8M"
        [[target.lu]]
        lun = 5
        file = "b.img"
        size = "8M"
        block_size = 4096

        [[target]]
        name = "iqn.2026-01.com.example:two"
        portals = ["127.0.0.1:0"]
        allowed_initiators = ["iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"]
        [[target.lu]]
        lun = 0
        file = "c.img"
        size = "8M"
        "#,
    )
    .expect("write config");
    let d = Daemon::start(&["serve", "--config", path_str(&config)]);

    let urls: Vec<String> = (0..3).map(|_| d.line()).collect();
    let hint = d.line();

    let parsed: Vec<_> = urls.iter().map(|u| parse_url(u)).collect();
    assert_eq!(parsed[0].1, "iqn.2026-01.com.example:one");
    assert_eq!(parsed[0].2, "0");
    assert_eq!(parsed[1].2, "5");
    assert_eq!(parsed[2].1, "iqn.2026-01.com.example:two");
    assert!(hint.contains("iscsi-ls"), "{hint}");
    assert!(dir.path().join("b.img").exists());
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
        [[target]]
        name = "iqn.2026-01.com.example:one"
        [[target.lu]]
        lun = 0
        file = "a.img"
        size = "8M"
        colour = "blue"
        "#,
    )
    .expect("write config");

    let (status, _, err) = run_to_exit(&["serve", "--config", path_str(&config)]);

    assert!(!status.success());
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");
}
