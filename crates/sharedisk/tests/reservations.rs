//! Persistent reservations against the built daemon: the operator's `sharedisk pr show|clear`
//! over the control socket, and APTPL state surviving a `kill -9` at any point of a PERSISTENT
//! RESERVE OUT.

#[path = "../../iscsi/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{defaults, Client};

const BIN: &str = env!("CARGO_BIN_EXE_sharedisk");
const NODE1: &str = "iqn.2026-01.test:node1";
const ISID1: [u8; 6] = [0x80, 0, 0, 0, 0, 1];

/// A daemon serving `image` as LUN 0 of `common::TARGET` on an ephemeral loopback port, with
/// its control socket at `control`; killed (SIGKILL) when dropped.
struct Daemon {
    child: Child,
    portal: std::net::SocketAddr,
    /// Kept open: the daemon writes a second line after the URL.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Daemon {
    fn start(image: &Path, control: &Path) -> Daemon {
        Self::start_with(image, control, &[])
    }

    /// [`Daemon::start`] with more `serve` arguments.
    fn start_with(image: &Path, control: &Path, more: &[&std::ffi::OsStr]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--file"])
            .arg(image)
            .args([
                "--size",
                "16M",
                "--listen",
                "127.0.0.1:0",
                "--name",
                common::TARGET,
            ])
            .arg("--control")
            .arg(control)
            .args(more);
        Self::run(cmd)
    }

    /// Start `cmd` (a `sharedisk serve`); the portal of the first URL it prints.
    fn run(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sharedisk");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut url = String::new();
        let mut stdout = BufReader::new(stdout);
        stdout
            .read_line(&mut url)
            .expect("the daemon prints its URL");
        let portal = url
            .trim()
            .strip_prefix("iscsi://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("not a URL: {url:?}"))
            .parse()
            .expect("ADDR:PORT");
        Daemon {
            child,
            portal,
            _stdout: stdout,
        }
    }

    fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sharedisk pr ARGS --control CONTROL`: (success, stdout, stderr).
fn pr(control: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("pr")
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .expect("run sharedisk pr");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pr_json(control: &Path) -> serde_json::Value {
    let (ok, out, err) = pr(control, &["show", "--json"]);
    assert!(ok, "pr show --json: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON ({e}): {out}"))
}

async fn login(portal: std::net::SocketAddr) -> Client {
    let mut c = Client::login_as(portal, NODE1, "", ISID1, defaults).await;
    c.clear_unit_attention().await;
    c
}

/// PERSISTENT RESERVE OUT (SPC-5 6.17.1): SERVICE ACTION `sa`, SCOPE 0h (LU_SCOPE) and TYPE
/// `ty`, PARAMETER LIST LENGTH 24 (18h).
fn pr_out_cdb(sa: u8, ty: u8) -> [u8; 10] {
    [0x5F, sa, ty, 0, 0, 0, 0, 0, 0x18, 0]
}

/// The basic PR OUT parameter list (SPC-5 6.17.3, table 226): RESERVATION KEY (bytes 0..7),
/// SERVICE ACTION RESERVATION KEY (8..15), obsolete (16..19), byte 20 with APTPL in bit 0.
fn pr_out_params(rk: u64, sark: u64, aptpl: bool) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[20] = u8::from(aptpl);
    p
}

/// Send a PERSISTENT RESERVE OUT with its parameter list as immediate data; the ITT.
async fn send_pr_out(c: &mut Client, sa: u8, ty: u8, params: &[u8]) -> u32 {
    // F=1, W=1, ATTR=SIMPLE; EDTL 24.
    let (b, itt) = c.command(0xA1, 24, &pr_out_cdb(sa, ty));
    c.send(b, params).await;
    itt
}

/// The SCSI status of the next SCSI Response.
async fn status(c: &mut Client) -> u8 {
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    r.bhs[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pr_show_and_clear_reach_a_running_daemon() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    let d = Daemon::start(&dir.path().join("disk.img"), &control);

    let (ok, out, _) = pr(&control, &["show"]);
    assert!(ok);
    assert!(out.contains("generation 0, APTPL off"), "{out}");
    assert!(out.contains("reservation: none"), "{out}");
    assert!(out.contains("registrations: none"), "{out}");

    let mut c = login(d.portal).await;
    // REGISTER AND IGNORE EXISTING KEY (06h), SARK 1111h, APTPL; then RESERVE (01h) type 5h
    // (Write Exclusive, Registrants Only) with that key.
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 0x1111, true)).await;
    assert_eq!(status(&mut c).await, 0x00);
    send_pr_out(&mut c, 0x01, 0x05, &pr_out_params(0x1111, 0, false)).await;
    assert_eq!(status(&mut c).await, 0x00);

    let (ok, out, _) = pr(&control, &["show"]);
    assert!(ok);
    assert!(out.contains("generation 1, APTPL on"), "{out}");
    assert!(out.contains("reservation: type 5h"), "{out}");
    assert!(
        out.contains("key 0x0000000000001111  iqn.2026-01.test:node1,i,0x800000000001 via iqn.2026-01.io.sharedisk:wire,t,0x0001"),
        "{out}"
    );
    // The same LU by its name, by its URL and by its image path.
    let by_name = pr(&control, &["show", &format!("{}/0", common::TARGET)]);
    assert!(by_name.0 && by_name.1 == out, "{by_name:?}");
    let url = format!("iscsi://{}/{}/0", d.portal, common::TARGET);
    assert_eq!(pr(&control, &["show", &url]).1, out);
    let image = dir.path().join("disk.img");
    assert_eq!(
        pr(&control, &["show", image.to_str().expect("UTF-8")]).1,
        out
    );
    let json = pr_json(&control);
    assert_eq!(json["generation"], 1);
    assert_eq!(json["registrations"][0]["key"], 0x1111);

    // Clearing names its LU, even where the daemon serves only one: the command line asks
    // for it, and the daemon refuses a request without it (one from another client).
    let (ok, _, err) = pr(&control, &["clear"]);
    assert!(!ok, "pr clear without an LU");
    assert!(err.contains("<LU>"), "{err}");
    let answer = {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&control).expect("control socket");
        s.write_all(b"{\"command\": \"pr-clear\", \"lu\": null}\n")
            .expect("request");
        let mut line = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut line)
            .expect("answer");
        line
    };
    assert!(
        answer.contains("Name the logical unit to clear"),
        "{answer}"
    );
    assert_eq!(pr_json(&control)["generation"], 1, "nothing cleared");
    let (ok, out, _) = pr(&control, &["clear", &format!("{}/0", common::TARGET)]);
    assert!(ok);
    assert!(
        out.starts_with("Cleared the persistent reservations"),
        "{out}"
    );
    let json = pr_json(&control);
    assert_eq!(json["generation"], 2, "the clear is a change: {json}");
    assert!(json["registrations"].as_array().is_some_and(Vec::is_empty));
    assert!(json["reservation"].is_null());
    // The registrant is told: UNIT ATTENTION, RESERVATIONS PREEMPTED (2Ah/03h).
    let (b, _) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[3], 0x02, "CHECK CONDITION");
    // Sense data after the 2-byte SenseLength (RFC 7143 11.4.7.2), fixed format.
    assert_eq!(r.data[2 + 2] & 0x0f, 0x06, "UNIT ATTENTION");
    assert_eq!((r.data[2 + 12], r.data[2 + 13]), (0x2A, 0x03));

    // Errors: an unknown LU, and no daemon.
    let (ok, _, err) = pr(&control, &["show", "iqn.2026-01.io.sharedisk:nope/0"]);
    assert!(!ok);
    assert!(err.contains("No logical unit"), "{err}");
    let (ok, _, err) = pr(&dir.path().join("nobody.sock"), &["show"]);
    assert!(!ok);
    assert!(err.contains("No sharedisk daemon answers"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aptpl_state_survives_kill_9_at_any_point_of_a_pr_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let control = dir.path().join("control.sock");

    // Register with APTPL and reserve type 5h.
    let d = Daemon::start(&image, &control);
    let mut c = login(d.portal).await;
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 1, true)).await;
    assert_eq!(status(&mut c).await, 0x00);
    send_pr_out(&mut c, 0x01, 0x05, &pr_out_params(1, 0, false)).await;
    assert_eq!(status(&mut c).await, 0x00);
    drop(c);
    d.kill9();

    let (mut acknowledged, mut unacknowledged) = (0, 0);
    for round in 0..24u64 {
        let d = Daemon::start(&image, &control);
        let before = pr_json(&control);
        let key = before["registrations"][0]["key"]
            .as_u64()
            .unwrap_or_else(|| panic!("round {round}: the registration survived: {before}"));
        // SPC-5 6.16.2: a power on (the daemon's start) sets PRgeneration to zero.
        assert_eq!(before["generation"], 0, "round {round}: {before}");
        assert_eq!(before["aptpl"], true);
        assert!(!before["reservation"].is_null(), "round {round}: {before}");

        // Same initiator name and ISID: the same I_T nexus as before the restart.
        let mut c = login(d.portal).await;
        // REGISTER (00h) key → key + 1, APTPL; SIGKILL a varying time after sending it.
        send_pr_out(&mut c, 0x00, 0x00, &pr_out_params(key, key + 1, true)).await;
        // 0 to 80 ms: early rounds kill before the state is stored (fsync, rename, fsync of
        // the folder), late ones after the answer.
        let wait = Duration::from_micros(round * round * 150);
        let answered = tokio::time::timeout(wait, c.recv()).await.ok().flatten();
        let good = answered.is_some_and(|r| r.bhs[0] == 0x21 && r.bhs[3] == 0x00);
        d.kill9();

        let d = Daemon::start(&image, &control);
        let after = pr_json(&control);
        let now = after["registrations"][0]["key"].as_u64();
        assert_eq!(after["generation"], 0, "round {round}: {after}");
        let (old, new) = (Some(key), Some(key + 1));
        assert!(
            now == old || now == new,
            "round {round}: the state is neither the old nor the new one: {after}"
        );
        if good {
            acknowledged += 1;
            assert_eq!(now, new, "round {round}: an acknowledged change was lost");
        } else {
            unacknowledged += 1;
        }
        assert_eq!(after["registrations"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            after["reservation"]["ty"], "WriteExclusiveRegistrantsOnly",
            "{after}"
        );
        drop(d);
    }
    eprintln!("kill -9 rounds: {acknowledged} after the answer, {unacknowledged} before it");
    // The rounds cover both sides of the answer.
    assert!(
        acknowledged > 0 && unacknowledged > 0,
        "{acknowledged} / {unacknowledged}"
    );
}

/// The SCSI status, and for CHECK CONDITION the fixed-format sense key, ASC and ASCQ, of the
/// next SCSI Response.
async fn outcome(c: &mut Client) -> (u8, u8, u8, u8) {
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!(r.bhs[0], 0x21, "SCSI Response");
    if r.bhs[3] != 0x02 {
        return (r.bhs[3], 0, 0, 0);
    }
    // Sense data after the 2-byte SenseLength (RFC 7143 11.4.7.2), fixed format (SPC-5 4.4.3).
    (
        r.bhs[3],
        r.data[2 + 2] & 0x0f,
        r.data[2 + 12],
        r.data[2 + 13],
    )
}

/// A command without data, and its outcome.
async fn no_data(c: &mut Client, cdb: &[u8]) -> (u8, u8, u8, u8) {
    let (b, _) = c.command(0x81, 0, cdb); // F, ATTR=SIMPLE
    c.send(b, &[]).await;
    outcome(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sidecar_is_lost_information_until_replace_lost_reservation() {
    const TUR: [u8; 6] = [0x00, 0, 0, 0, 0, 0];
    // CHECK CONDITION, DATA PROTECT (7h), PERSISTENT RESERVATION INFORMATION LOST (44h/01h):
    // SPC-5 "Recoverable loss of persistent reservation information".
    const LOST: (u8, u8, u8, u8) = (0x02, 0x07, 0x44, 0x01);
    const GOOD: (u8, u8, u8, u8) = (0x00, 0, 0, 0);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let control = dir.path().join("control.sock");

    // An APTPL registration and a Write Exclusive reservation, kept in disk.img.pr.
    let d = Daemon::start(&image, &control);
    let mut c = login(d.portal).await;
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 0x1111, true)).await;
    assert_eq!(status(&mut c).await, 0x00);
    send_pr_out(&mut c, 0x01, 0x01, &pr_out_params(0x1111, 0, false)).await;
    assert_eq!(status(&mut c).await, 0x00);
    drop(c);
    d.kill9();

    // The sidecar of the stopped daemon is damaged: one bit of its state flips.
    let side = dir.path().join("disk.img.pr");
    let mut bytes = std::fs::read(&side).expect("the sidecar exists");
    *bytes.last_mut().expect("not empty") ^= 0x01;
    std::fs::write(&side, &bytes).expect("write");

    // The daemon starts, in the lost condition, and says so.
    let d = Daemon::start(&image, &control);
    let (ok, out, err) = pr(&control, &["show"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("PERSISTENT RESERVATION INFORMATION LOST"),
        "{out}"
    );
    let json = pr_json(&control);
    assert_eq!(json["lost"], true, "{json}");
    assert!(json["registrations"].as_array().is_some_and(Vec::is_empty));

    let mut c = Client::login_as(d.portal, NODE1, "", ISID1, defaults).await;
    // The new nexus's power-on unit attention comes first (UNIT ATTENTION, 29h).
    assert_eq!(no_data(&mut c, &TUR).await.1, 0x06);
    assert_eq!(no_data(&mut c, &TUR).await, LOST);
    // PERSISTENT RESERVE OUT other than REPLACE LOST RESERVATION: REGISTER AND IGNORE EXISTING
    // KEY.
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 0x3333, true)).await;
    assert_eq!(outcome(&mut c).await, LOST);
    // START STOP UNIT with START 1 and POWER CONDITION 0h is one of the commands that still run.
    assert_eq!(no_data(&mut c, &[0x1B, 0, 0, 0, 0x01, 0]).await, GOOD);
    assert_eq!(no_data(&mut c, &[0x1B, 0, 0, 0, 0x00, 0]).await, LOST);

    // REPLACE LOST RESERVATION (08h), TYPE 5h, RESERVATION KEY 0, new key 2222h, APTPL.
    send_pr_out(&mut c, 0x08, 0x05, &pr_out_params(0, 0x2222, true)).await;
    assert_eq!(outcome(&mut c).await, GOOD);
    assert_eq!(no_data(&mut c, &TUR).await, GOOD);
    let json = pr_json(&control);
    assert_eq!(json["lost"], false, "{json}");
    assert_eq!(json["generation"], 0, "{json}");
    assert_eq!(json["aptpl"], true, "{json}");
    assert_eq!(json["registrations"][0]["key"], 0x2222, "{json}");
    assert_eq!(
        json["reservation"]["ty"], "WriteExclusiveRegistrantsOnly",
        "{json}"
    );
    // Nothing is lost now: INVALID RELEASE OF PERSISTENT RESERVATION (5h, 26h/04h).
    send_pr_out(&mut c, 0x08, 0x05, &pr_out_params(0, 0x4444, true)).await;
    assert_eq!(outcome(&mut c).await, (0x02, 0x05, 0x26, 0x04));
    drop(c);
    d.kill9();

    // The replaced state was stored whole (APTPL): a restart finds it, not lost.
    let _d = Daemon::start(&image, &control);
    let json = pr_json(&control);
    assert_eq!(json["lost"], false, "{json}");
    assert_eq!(json["registrations"][0]["key"], 0x2222, "{json}");
    let (_, out, _) = pr(&control, &["show"]);
    assert!(!out.contains("LOST"), "{out}");
}

#[test]
fn a_control_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let precious = dir.path().join("precious.img");
    std::fs::write(&precious, b"data").expect("write");
    // The control socket is bound before any portal serves: a start that fails has served
    // nothing.
    support::refused_for_a_file_that_is_not_a_socket(
        dir.path(),
        &["--control".as_ref(), precious.as_ref()],
        &precious,
    );
}

#[test]
fn the_control_socket_is_for_its_owner_only() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    let _d = Daemon::start(&dir.path().join("disk.img"), &control);
    let meta = std::fs::symlink_metadata(&control).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing is left of the private folder it was made in.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sharedisk-socket."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_daemon_that_stops_leaves_a_control_socket_another_has_bound_since() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    let mut first = Daemon::start(&dir.path().join("one.img"), &control);
    // The operator removes the first daemon's socket and starts a second on the same path.
    std::fs::remove_file(&control).expect("remove the socket");
    let _second = Daemon::start(&dir.path().join("two.img"), &control);
    let (ok, out, err) = pr(&control, &["show"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("two.img"), "{out}");

    // The first stops cleanly (SIGTERM) and must not take the second's socket with it.
    support::signal(&first.child, "-TERM");
    let status = support::wait_exit(&mut first.child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let (ok, out, err) = pr(&control, &["show"]);
    assert!(ok, "the second daemon's socket is gone: {out}{err}");
    assert!(out.contains("two.img"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_reservation_state_file_keeps_the_aptpl_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    let image = dir.path().join("disk.img");
    std::fs::create_dir(dir.path().join("state")).expect("mkdir");
    let state = dir.path().join("state/disk.pr");
    let args = [
        std::ffi::OsStr::new("--reservation-state"),
        state.as_os_str(),
    ];
    let d = Daemon::start_with(&image, &control, &args);
    let mut c = login(d.portal).await;
    // REGISTER AND IGNORE EXISTING KEY (06h), SARK 1111h, APTPL.
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 0x1111, true)).await;
    assert_eq!(status(&mut c).await, 0x00);
    drop(c);
    d.kill9();
    // Kept in the configured file, not beside the image.
    let kept = std::fs::read_to_string(&state).expect("the state file");
    assert!(kept.starts_with("sharedisk-pr-v1 "), "{kept}");
    assert!(!dir.path().join("disk.img.pr").exists());
    // A restart with the same file finds the registration.
    let _d = Daemon::start_with(&image, &control, &args);
    let json = pr_json(&control);
    assert_eq!(json["registrations"][0]["key"], 0x1111, "{json}");
    assert_eq!(json["aptpl"], true, "{json}");
}

#[test]
fn pr_show_and_clear_find_an_image_path_from_the_operators_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).expect("mkdir a");
    std::fs::create_dir(&b).expect("mkdir b");
    let control = dir.path().join("control.sock");
    let config = dir.path().join("sharedisk.toml");
    std::fs::write(
        &config,
        r#"control = "control.sock"
[[target]]
name = "iqn.2026-01.test:a"
portals = ["127.0.0.1:0"]
[[target.lu]]
lun = 0
file = "a/disk.img"
size = "1M"
[[target]]
name = "iqn.2026-01.test:b"
portals = ["127.0.0.1:0"]
[[target.lu]]
lun = 0
file = "b/disk.img"
size = "1M"
"#,
    )
    .expect("config");
    // The daemon runs in folder a; the operator in folder b names b's image.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(&config).current_dir(&a);
    let _d = Daemon::run(cmd);
    for verb in ["show", "clear"] {
        let out = Command::new(BIN)
            .args(["pr", verb, "disk.img", "--control"])
            .arg(&control)
            .current_dir(&b)
            .output()
            .expect("run sharedisk pr");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("iqn.2026-01.test:b/0"), "pr {verb}: {text}");
        assert!(!text.contains("iqn.2026-01.test:a/0"), "pr {verb}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_by_a_relative_path_keeps_aptpl_state_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    // `serve --file disk.img` from the image's folder, as the README's quick start does.
    let start = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--file", "disk.img", "--size", "16M"])
            .args(["--listen", "127.0.0.1:0", "--name", common::TARGET])
            .arg("--control")
            .arg(&control)
            .current_dir(dir.path());
        Daemon::run(cmd)
    };
    let d = start();
    let mut c = login(d.portal).await;
    // REGISTER AND IGNORE EXISTING KEY (06h), SARK 2222h, APTPL.
    send_pr_out(&mut c, 0x06, 0x00, &pr_out_params(0, 0x2222, true)).await;
    assert_eq!(status(&mut c).await, 0x00);
    drop(c);
    d.kill9();
    assert!(dir.path().join("disk.img.pr").exists());
    let _d = start();
    let json = pr_json(&control);
    assert_eq!(json["registrations"][0]["key"], 0x2222, "{json}");
}
