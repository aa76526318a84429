//! `sharedisk lu add|remove|list` against the built daemon: LUs put on and taken off
//! vhost-user sockets over the control socket while the daemon runs, with no guest connected
//! and with a frontend connected; the same LU reused for an image the daemon already serves
//! (one reservation state); an image nothing serves any more closed; and every bad request
//! answered with a clear error that changes nothing.

#[path = "../../iscsi/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sharedisk");
const WAIT: Duration = Duration::from_secs(30);

/// Two vhost-user sockets: vm1.sock serves a.img (also iSCSI LUN 0) at target 0 LUN 0 and
/// c.img at target 1 LUN 0, so it takes targets 0 and 1; vm2.sock serves a.img at target 0
/// LUN 0 and takes target 0 only.
const CONFIG: &str = r#"
control = "control.sock"

[[target]]
name = "iqn.2026-01.io.sharedisk:wire"
portals = ["127.0.0.1:0"]
[[target.lu]]
lun = 0
file = "a.img"
size = "16M"

[[vhost]]
socket = "vm1.sock"
num_queues = 1
[[vhost.lu]]
lun = 0
file = "a.img"
[[vhost.lu]]
target = 1
lun = 0
file = "c.img"
size = "1M"

[[vhost]]
socket = "vm2.sock"
num_queues = 1
[[vhost.lu]]
lun = 0
file = "a.img"
"#;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    portal: std::net::SocketAddr,
    /// Kept open: the daemon writes its lines there.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("sharedisk.toml");
        std::fs::write(&config, CONFIG).expect("write config");
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sharedisk");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut lines = Vec::new();
        // The URL, the two sockets, the hint.
        for _ in 0..4 {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("the daemon's lines");
            lines.push(line.trim().to_string());
        }
        let portal = lines[0]
            .strip_prefix("iscsi://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("not a URL: {lines:?}"))
            .parse()
            .expect("ADDR:PORT");
        assert_eq!(
            lines[1],
            format!("vhost-user:{}", dir.path().join("vm1.sock").display())
        );
        Daemon {
            child,
            dir,
            portal,
            _stdout: stdout,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sharedisk ARGS --control …`, run in the daemon's folder: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(self.path("control.sock"))
            .current_dir(self.dir.path())
            .output()
            .expect("run sharedisk");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A command that must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "{args:?} failed: {err}");
        out
    }

    /// A command that must fail with `want` in its message, and change nothing.
    fn fails(&self, args: &[&str], want: &str) {
        let before = self.list();
        let (ok, out, err) = self.run(args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
        assert_eq!(self.list(), before, "{args:?} changed what is served");
    }

    fn list(&self) -> Value {
        let out = self.ok(&["lu", "list", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON ({e}): {out}"))
    }

    /// (target, LUN, image file name) of every LU of socket `i`.
    fn socket_lus(&self, i: usize) -> Vec<(u64, u64, String)> {
        let list = self.list();
        list["vhost"][i]["lus"]
            .as_array()
            .expect("lus")
            .iter()
            .map(|l| {
                let image = Path::new(l["image"].as_str().expect("image"))
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned();
                (
                    l["target"].as_u64().expect("target"),
                    l["lun"].as_u64().expect("lun"),
                    image,
                )
            })
            .collect()
    }

    fn wait_connected(&self, i: usize, want: bool) {
        let deadline = Instant::now() + WAIT;
        while self.list()["vhost"][i]["connected"] != want {
            assert!(
                Instant::now() < deadline,
                "socket {i} connected never {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether another process holds `image`'s lock (the file driver's exclusive `flock`).
fn locked(image: &Path) -> bool {
    let status = Command::new("flock")
        .args(["--nonblock", "--exclusive"])
        .arg(image)
        .arg("true")
        .status()
        .expect("run flock (util-linux)");
    !status.success()
}

/// Wait until `image` is unlocked (a removed LU's last reference may be dropped a moment
/// after the answer).
fn wait_unlocked(image: &Path) {
    let deadline = Instant::now() + WAIT;
    while locked(image) {
        assert!(
            Instant::now() < deadline,
            "{} is still locked",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lu(n: (u64, u64, &str)) -> (u64, u64, String) {
    (n.0, n.1, n.2.to_string())
}

#[test]
fn lus_come_and_go_on_a_vhost_socket_without_a_guest() {
    let d = Daemon::start();
    let vm1 = d.path("vm1.sock");
    let vm1 = vm1.to_str().expect("UTF-8");
    assert_eq!(
        d.socket_lus(0),
        vec![lu((0, 0, "a.img")), lu((1, 0, "c.img"))]
    );
    let list = d.list();
    assert_eq!(list["vhost"][0]["max_target"], 1);
    assert_eq!(list["vhost"][0]["connected"], false);
    assert_eq!(list["vhost"][1]["max_target"], 0);
    assert_eq!(list["iscsi"][0]["target"], common::TARGET);
    assert_eq!(list["iscsi"][0]["portal"], d.portal.to_string());
    assert_eq!(list["iscsi"][0]["lus"][0]["lun"], 0);

    // A new image, created sparse with --size; the socket and the file named relative to the
    // operator's folder.
    let out = d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        "vm1.sock",
        "--lun",
        "1",
        "--file",
        "b.img",
        "--size",
        "8M",
    ]);
    assert!(out.contains("Added"), "{out}");
    assert!(out.contains("opened"), "{out}");
    assert!(out.contains("no guest is connected"), "{out}");
    let b = d.path("b.img");
    assert_eq!(std::fs::metadata(&b).expect("b.img created").len(), 8 << 20);
    assert!(locked(&b), "the daemon holds the new image's lock");
    assert_eq!(
        d.socket_lus(0),
        vec![
            lu((0, 0, "a.img")),
            lu((0, 1, "b.img")),
            lu((1, 0, "c.img"))
        ]
    );
    let added = &d.list()["vhost"][0]["lus"][1];
    assert_eq!(added["blocks"], 16384);
    assert_eq!(added["block_size"], 512);
    // `pr` knows it, by its name and by its image.
    let name = format!("vhost:{vm1}/0/1");
    assert_eq!(added["name"], name.as_str());
    let shown = d.ok(&["pr", "show", &name]);
    assert!(shown.contains("b.img"), "{shown}");
    assert!(shown.contains("registrations: none"), "{shown}");
    assert_eq!(d.ok(&["pr", "show", b.to_str().expect("UTF-8")]), shown);
    // Its human list line.
    let text = d.ok(&["lu", "list"]);
    assert!(
        text.contains("target 0 LUN 1") && text.contains(&b.display().to_string()),
        "{text}"
    );

    // Gone again: nothing else serves it, so it is closed.
    let out = d.ok(&["lu", "remove", "--vhost-user", vm1, "--lun", "1"]);
    assert!(out.contains("flushed and closed"), "{out}");
    wait_unlocked(&b);
    assert_eq!(
        d.socket_lus(0),
        vec![lu((0, 0, "a.img")), lu((1, 0, "c.img"))]
    );
    let (ok, _, err) = d.run(&["pr", "show", &name]);
    assert!(!ok && err.contains("No logical unit"), "{err}");

    // Closed means it can be opened again, now with 4096-byte blocks, at the second target.
    let out = d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        vm1,
        "--target",
        "1",
        "--lun",
        "7",
        "--file",
        b.to_str().expect("UTF-8"),
        "--block-size",
        "4096",
    ]);
    assert!(out.contains("target 1 LUN 7"), "{out}");
    let relisted = d.list();
    let again = &relisted["vhost"][0]["lus"][2];
    assert_eq!(
        (again["target"].clone(), again["lun"].clone()),
        (1.into(), 7.into())
    );
    assert_eq!(again["block_size"], 4096);
    assert_eq!(again["blocks"], 2048);

    // An LU the configuration put there goes the same way.
    let c = d.path("c.img");
    assert!(locked(&c));
    let out = d.ok(&[
        "lu",
        "remove",
        "--vhost-user",
        vm1,
        "--target",
        "1",
        "--lun",
        "0",
    ]);
    assert!(out.contains("flushed and closed"), "{out}");
    wait_unlocked(&c);
    assert_eq!(
        d.socket_lus(0),
        vec![lu((0, 0, "a.img")), lu((1, 7, "b.img"))]
    );
}

#[test]
fn an_lu_added_with_direct_io_is_listed_so_and_a_shared_one_keeps_its_mode() {
    let d = Daemon::start();
    let vm1 = d.path("vm1.sock");
    let vm1 = vm1.to_str().expect("UTF-8");
    let vm2 = d.path("vm2.sock");
    let vm2 = vm2.to_str().expect("UTF-8");
    fn add<'a>(sock: &'a str, lun: &'a str, file: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "lu",
            "add",
            "--vhost-user",
            sock,
            "--lun",
            lun,
            "--file",
            file,
        ];
        v.extend_from_slice(extra);
        v
    }
    d.ok(&add(vm1, "5", "d.img", &["--size", "1M", "--direct"]));
    let listed = |d: &Daemon, file: &str| {
        let list = d.list();
        list["vhost"]
            .as_array()
            .expect("sockets")
            .iter()
            .flat_map(|s| s["lus"].as_array().expect("lus").clone())
            .find(|l| l["image"].as_str().is_some_and(|i| i.ends_with(file)))
            .unwrap_or_else(|| panic!("{file} not listed: {list}"))
    };
    assert_eq!(listed(&d, "d.img")["direct"], true);
    assert_eq!(listed(&d, "c.img")["direct"], false);
    assert!(d
        .ok(&["lu", "list"])
        .contains("d.img  2048 blocks of 512 bytes, serial"));
    assert!(d.ok(&["lu", "list"]).contains(", direct I/O"));
    // The same image elsewhere is the same LU, opened once: its mode cannot change.
    d.fails(
        &add(vm2, "5", "c.img", &["--direct"]),
        "already served (as vhost:",
    );
    d.fails(&add(vm2, "5", "c.img", &["--direct"]), "without direct I/O");
    d.ok(&add(vm2, "5", "d.img", &["--direct"]));
    d.ok(&add(vm2, "6", "c.img", &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_already_served_is_the_same_lu() {
    let d = Daemon::start();
    let vm2 = d.path("vm2.sock");
    let vm2 = vm2.to_str().expect("UTF-8");

    // An initiator registers over iSCSI (PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING
    // KEY (06h), SARK 0xABCD): the LU's one reservation state.
    let mut c = common::Client::login_as(
        d.portal,
        "iqn.2026-01.test:node1",
        "",
        [0x80, 0, 0, 0, 0, 1],
        common::defaults,
    )
    .await;
    c.clear_unit_attention().await;
    // PERSISTENT RESERVE OUT (SPC-5 6.17.1): service action 06h, PARAMETER LIST LENGTH 24.
    let cdb = [0x5F, 0x06, 0, 0, 0, 0, 0, 0, 0x18, 0];
    // Parameter list (SPC-5 6.17.3): RESERVATION KEY 0, SERVICE ACTION RESERVATION KEY ABCDh.
    let mut params = [0u8; 24];
    params[8..16].copy_from_slice(&0xABCDu64.to_be_bytes());
    let (bhs, _) = c.command(0xA1, 24, &cdb); // F=1, W=1, SIMPLE
    c.send(bhs, &params).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!((r.bhs[0], r.bhs[3]), (0x21, 0x00), "GOOD");

    // a.img is iSCSI LUN 0 and LUN 0 of both sockets; a socket serves an image once.
    d.fails(
        &[
            "lu",
            "add",
            "--vhost-user",
            vm2,
            "--lun",
            "1",
            "--file",
            "a.img",
        ],
        "already serves image",
    );
    // c.img is vm1's only: vm2 takes the same LU, whose settings are its own.
    d.fails(
        &[
            "lu",
            "add",
            "--vhost-user",
            vm2,
            "--lun",
            "1",
            "--file",
            "c.img",
            "--block-size",
            "4096",
        ],
        "with 512-byte blocks, not 4096",
    );
    d.fails(
        &[
            "lu",
            "add",
            "--vhost-user",
            vm2,
            "--lun",
            "1",
            "--file",
            "c.img",
            "--size",
            "2M",
        ],
        "with 1048576 bytes, not 2097152",
    );
    let out = d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        vm2,
        "--lun",
        "1",
        "--file",
        "c.img",
    ]);
    let vm1 = d.path("vm1.sock");
    let c_name = format!("vhost:{}/1/0", vm1.display());
    assert!(
        out.contains(&format!("the LU that serves it as {c_name}, shared")),
        "{out}"
    );
    let list = d.list();
    assert_eq!(list["vhost"][1]["lus"][1]["name"], c_name.as_str());
    assert_eq!(
        list["vhost"][1]["lus"][1]["serial"],
        list["vhost"][0]["lus"][1]["serial"]
    );
    // pr knows it by either place.
    let shown = d.ok(&["pr", "show", &c_name]);
    assert_eq!(d.ok(&["pr", "show", &format!("vhost:{vm2}/0/1")]), shown);

    // Off vm1: vm2 still serves it, so it stays open, and pr now names it by vm2.
    let out = d.ok(&[
        "lu",
        "remove",
        "--vhost-user",
        "vm1.sock",
        "--target",
        "1",
        "--lun",
        "0",
    ]);
    assert!(
        out.contains(&format!("still served as vhost:{vm2}/0/1")),
        "{out}"
    );
    assert!(locked(&d.path("c.img")));
    assert!(d
        .ok(&["pr", "show", &format!("vhost:{vm2}/0/1")])
        .contains("c.img"));

    // The iSCSI LU behind vm2's LUN 0: its registration shows through the vhost name.
    let shown = d.ok(&["pr", "show", &format!("vhost:{vm2}/0/0")]);
    assert!(
        shown.contains(&format!("LU {}/0", common::TARGET)),
        "{shown}"
    );
    assert!(shown.contains("key 0x000000000000abcd"), "{shown}");
    // Taking it off vm2 leaves it with iSCSI and vm1, registration and all.
    let out = d.ok(&["lu", "remove", "--vhost-user", vm2, "--lun", "0"]);
    assert!(
        out.contains(&format!("still served as {}/0", common::TARGET)),
        "{out}"
    );
    let a = d.path("a.img");
    assert!(d
        .ok(&["pr", "show", a.to_str().expect("UTF-8")])
        .contains("key 0x000000000000abcd"));
    // And back: the same LU again.
    let out = d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        vm2,
        "--lun",
        "0",
        "--file",
        "a.img",
    ]);
    assert!(
        out.contains(&format!("as {}/0, shared", common::TARGET)),
        "{out}"
    );
    assert!(d
        .ok(&["pr", "show", &format!("vhost:{vm2}/0/0")])
        .contains("key 0x000000000000abcd"));
}

#[test]
fn every_bad_request_is_a_clear_error() {
    let d = Daemon::start();
    let vm1 = d.path("vm1.sock");
    let vm1 = vm1.to_str().expect("UTF-8");
    let add = |extra: &[&str]| {
        let mut v = vec!["lu", "add"];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let fails = |args: Vec<String>, want: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        d.fails(&args, want);
    };

    // Sockets: one the daemon does not serve, and an iSCSI target.
    fails(
        add(&[
            "--vhost-user",
            "vm3.sock",
            "--lun",
            "1",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "No vhost-user socket vm3.sock here; this daemon serves: ",
    );
    fails(
        add(&[
            "--vhost-user",
            common::TARGET,
            "--lun",
            "1",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "is an iSCSI target: LUs are added and removed at run time on vhost-user sockets only",
    );
    // Where: a LUN taken, above 16383, a target above the socket's highest.
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--lun",
            "0",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "target 0 LUN 0 is taken (it serves ",
    );
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--lun",
            "16384",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "LUN 16384 is above 16383",
    );
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--target",
            "2",
            "--lun",
            "0",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "target 2 is above the socket's highest target 1",
    );
    fails(
        add(&[
            "--vhost-user",
            "vm2.sock",
            "--target",
            "1",
            "--lun",
            "0",
            "--file",
            "n.img",
            "--size",
            "1M",
        ]),
        "target 1 is above the socket's highest target 0",
    );
    // The image: missing without a size, a bad block size, a size that is not whole blocks,
    // a bad size, locked by another process.
    fails(
        add(&["--vhost-user", vm1, "--lun", "1", "--file", "n.img"]),
        "n.img does not exist; give a size to create it",
    );
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--lun",
            "1",
            "--file",
            "n.img",
            "--size",
            "1M",
            "--block-size",
            "1024",
        ]),
        "block size 1024 is not 512 or 4096",
    );
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--lun",
            "1",
            "--file",
            "n.img",
            "--size",
            "6K",
            "--block-size",
            "4096",
        ]),
        "size 6144 is not a whole number of 4096-byte blocks",
    );
    fails(
        add(&[
            "--vhost-user",
            vm1,
            "--lun",
            "1",
            "--file",
            "n.img",
            "--size",
            "1X",
        ]),
        "unknown suffix",
    );
    assert!(!d.path("n.img").exists(), "no failed add created the image");
    let held = d.path("held.img");
    std::fs::write(&held, vec![0u8; 1 << 20]).expect("write held.img");
    // A process that holds the lock on its own descriptor, and nothing else does once it is
    // killed.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 9<"$0" && flock --exclusive 9 && exec sleep 60"#)
        .arg(&held)
        .spawn()
        .expect("run sh and flock (util-linux)");
    let deadline = Instant::now() + WAIT;
    while !locked(&held) {
        assert!(Instant::now() < deadline, "flock never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    fails(
        add(&["--vhost-user", vm1, "--lun", "1", "--file", "held.img"]),
        "is in use: another process holds its lock",
    );
    let _ = holder.kill();
    let _ = holder.wait();
    // Once free, the same image is added.
    d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        vm1,
        "--lun",
        "1",
        "--file",
        "held.img",
    ]);

    // Removing what is not there.
    let remove = |extra: &[&str]| {
        let mut v = vec!["lu", "remove"];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    fails(
        remove(&["--vhost-user", vm1, "--lun", "5"]),
        "has no LU at target 0 LUN 5; it serves target 0 LUN 0, target 0 LUN 1, target 1 LUN 0",
    );
    fails(
        remove(&["--vhost-user", "vm3.sock", "--lun", "0"]),
        "No vhost-user socket vm3.sock here",
    );
    fails(
        remove(&["--vhost-user", common::TARGET, "--lun", "0"]),
        "is an iSCSI target",
    );

    // The command line itself.
    let (ok, _, err) = d.run(&["lu", "add", "--lun", "1", "--file", "x.img"]);
    assert!(!ok && err.contains("--vhost-user"), "{err}");
    let (ok, _, err) = d.run(&[
        "lu",
        "add",
        "--vhost-user",
        vm1,
        "--lun",
        "99999",
        "--file",
        "x",
    ]);
    assert!(!ok && err.contains("--lun"), "{err}");
    // No daemon there.
    let out = Command::new(BIN)
        .args(["lu", "list", "--control"])
        .arg(d.path("nobody.sock"))
        .output()
        .expect("run sharedisk");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("No sharedisk daemon answers"));
}

#[test]
fn a_connected_frontend_does_not_stop_a_change() {
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;
    let d = Daemon::start();
    let vm2 = d.path("vm2.sock");
    let f = Frontend::connect(&vm2, 3).expect("connect");
    f.set_owner().expect("SET_OWNER");
    d.wait_connected(1, true);
    // The frontend has acked no feature, so no event is posted; the map changes all the same.
    let out = d.ok(&[
        "lu",
        "add",
        "--vhost-user",
        "vm2.sock",
        "--lun",
        "3",
        "--file",
        "e.img",
        "--size",
        "1M",
    ]);
    assert!(
        out.contains("the connected guest is sent a transport reset event (RESCAN)"),
        "{out}"
    );
    assert_eq!(
        d.socket_lus(1),
        vec![lu((0, 0, "a.img")), lu((0, 3, "e.img"))]
    );
    let out = d.ok(&["lu", "remove", "--vhost-user", "vm2.sock", "--lun", "3"]);
    assert!(out.contains("(REMOVED)"), "{out}");
    wait_unlocked(&d.path("e.img"));
    drop(f);
    d.wait_connected(1, false);

    // SIGTERM after the changes: a clean exit.
    let mut d = d;
    support::signal(&d.child, "-TERM");
    let status = support::wait_exit(&mut d.child, WAIT);
    assert!(status.success(), "{status:?}");
}

/// `sharedisk lu rescan` after the operator grows an image: the LU serves the new size, an
/// initiator logged in over iSCSI gets CAPACITY DATA HAS CHANGED (SBC-4 4.9: 06h/2Ah/09h) on
/// its next command, and READ CAPACITY shows the new last LBA. A shrunk image is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_image_is_rescanned_and_initiators_are_told() {
    let d = Daemon::start();
    let mut c = common::Client::login(d.portal, "").await;
    c.clear_unit_attention().await;
    // a.img is 16 MiB: 32768 blocks of 512 bytes.
    let out = d.ok(&["lu", "rescan", "a.img"]);
    assert!(out.contains("32768 blocks, unchanged"), "{out}");

    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("a.img"))
        .expect("open a.img")
        .set_len(32 << 20)
        .expect("grow a.img");
    let out = d.ok(&["lu", "rescan", "a.img"]);
    assert!(out.contains("65536 blocks (was 32768)"), "{out}");

    // TEST UNIT READY: CHECK CONDITION, UNIT ATTENTION, CAPACITY DATA HAS CHANGED.
    let (b, _) = c.command(0x80, 0, &[0x00, 0, 0, 0, 0, 0]);
    c.send(b, &[]).await;
    let r = c.recv().await.expect("SCSI Response");
    assert_eq!((r.bhs[0], r.bhs[3]), (0x21, 0x02), "CHECK CONDITION");
    // Sense data after the 2-byte SenseLength: fixed format, key at 2, ASC/ASCQ at 12/13.
    assert_eq!(
        (r.data[2 + 2] & 0x0f, r.data[2 + 12], r.data[2 + 13]),
        (0x06, 0x2A, 0x09)
    );
    // READ CAPACITY(10): last LBA 65535 (0xFFFF), 512-byte blocks.
    let (b, _) = c.command(0xC0, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    c.send(b, &[]).await;
    let r = c.recv().await.expect("Data-In");
    assert_eq!(r.bhs[0], 0x25, "Data-In");
    assert_eq!(r.data, [0, 0, 0xFF, 0xFF, 0, 0, 0x02, 0x00]);

    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("a.img"))
        .expect("open a.img")
        .set_len(8 << 20)
        .expect("shrink a.img");
    let (ok, _, err) = d.run(&["lu", "rescan", "a.img"]);
    assert!(!ok);
    assert!(err.contains("shrank"), "{err}");
}
