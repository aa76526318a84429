//! A block device served by the daemon: its derived identity (the NAA identifier's value,
//! VPD 0x83) comes from the path it is configured by, so a `/dev/disk/by-id`-style link keeps
//! it when the device behind the link gets another name (as `/dev/sdb` may become `/dev/sdc`
//! at a reboot). Needs root and loop devices, as CI has. In a test binary of its own:
//! `losetup` runs as a child process, and a child holds the parent's descriptors between its
//! fork and exec.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_sharedisk");

/// Held by each test: loop devices are the machine's, and one test's "reboot" must not see
/// the other's devices come and go.
static LOOPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A loop device over `backing`, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(backing: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup failed (a block device test needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(
            String::from_utf8(out.stdout).expect("path").trim(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Serve `file` until the LU is opened; the `id=` its log line gives.
fn served_id(file: &Path, control: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--file"])
        .arg(file)
        .arg("--control")
        .arg(control)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sharedisk");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut id = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("log line");
        if line.contains("Opened logical unit") {
            id = id_in(&line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    id.expect("the daemon logged the LU it opened, with its id")
}

/// The `id=` of a daemon's "Opened logical unit" log line.
fn id_in(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("id="))
        .map(str::to_owned)
}

/// A 1 MiB backing file in `dir`, a loop device over it, and a link to the device (as
/// `/dev/disk/by-id` holds): (backing file, device, link).
fn disk_behind_link(dir: &Path) -> (PathBuf, Loop, PathBuf) {
    let backing = dir.join("backing.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).expect("backing");
    let device = Loop::attach(&backing);
    let link = dir.join("by-id-disk");
    std::os::unix::fs::symlink(&device.0, &link).expect("symlink");
    (backing, device, link)
}

/// The id the daemon derives from `path` (the NAA identifier's value): its 64-bit FNV-1a
/// hash, as `0x` and 16 hex digits.
fn derived_id(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!("{:#018x}", fnv1a64(path.as_os_str().as_bytes()))
}

/// 64-bit FNV-1a, written out here from its definition (offset basis 0xcbf29ce484222325,
/// prime 0x100000001b3) rather than taken from the daemon's code.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn a_block_device_keeps_its_identity_when_its_name_behind_a_link_changes() {
    let _one_at_a_time = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, first, link) = disk_behind_link(dir.path());
    let spare = dir.path().join("spare.img");
    std::fs::write(&spare, vec![0u8; 1 << 20]).expect("spare");
    let control = dir.path().join("control.sock");

    let before = served_id(&link, &control);
    // The id comes from the link's path, not from the device it resolves to.
    assert_eq!(before, derived_id(&link), "{}", first.0.display());

    // "Reboot": the same disk comes back under another device name.
    let old_name = first.0.clone();
    drop(first);
    let _taken = Loop::attach(&spare);
    let second = Loop::attach(&backing);
    assert_ne!(second.0, old_name, "the disk got the same device name");
    std::fs::remove_file(&link).expect("rm link");
    std::os::unix::fs::symlink(&second.0, &link).expect("symlink");
    assert_eq!(served_id(&link, &control), before);
}

/// `sharedisk lu add` of a block device by a link derives the LU's identity from the link,
/// as `serve` does: an LU added at run time is the same disk to its initiators as one
/// configured.
#[test]
fn a_block_device_added_at_run_time_takes_its_identity_from_its_link() {
    let _one_at_a_time = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_backing, _first, link) = disk_behind_link(dir.path());
    let control = dir.path().join("control.sock");
    let socket = dir.path().join("vm.sock");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--size", "1M", "--file"])
        .arg(dir.path().join("other.img"))
        .arg("--vhost-user")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sharedisk");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut opened = || loop {
        let line = lines
            .next()
            .expect("the daemon logs the LUs it opens")
            .expect("log line");
        if line.contains("Opened logical unit") {
            return line;
        }
    };
    opened(); // other.img
    while !control.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = Command::new(BIN)
        .args(["lu", "add", "--lun", "1", "--vhost-user"])
        .arg(&socket)
        .arg("--file")
        .arg(&link)
        .arg("--control")
        .arg(&control)
        .output()
        .expect("run sharedisk lu add");
    let line = opened();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = id_in(&line).expect("id= in the log line");
    assert_eq!(id, derived_id(&link), "{line}");
}
