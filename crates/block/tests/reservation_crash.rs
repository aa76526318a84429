//! Crash safety of the file driver's reservation sidecar: SIGKILL at random moments of durable
//! compare-and-swaps leaves the old state or the new one, never anything else.
//!
//! A binary of its own: spawning a process while other tests of the same binary hold images open
//! would let the child inherit their descriptors between fork and exec, and with them their
//! `flock`, so that a reopen in those tests could fail for a moment.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::driver::file::{EngineChoice, FileDriver, FileOptions};
use block::driver::sidecar::sidecar_path;
use block::{Driver, ReservationStore, Stored};

fn open(path: &Path) -> FileDriver {
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        ..FileOptions::default()
    };
    FileDriver::open_with(path, Some(1 << 20), &opts).expect("open the image")
}

fn store_of(d: &FileDriver) -> Arc<dyn ReservationStore> {
    d.reservation_store()
        .expect("the file driver has a reservation store")
}

fn temp_path(image: &Path) -> PathBuf {
    let mut s = sidecar_path(image).into_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

// The crash test: a child process (this test binary, re-run with CHILD_DIR set to run only
// `crash_child_process`) loops durable compare-and-swaps of alternating large payloads and prints
// each sequence number once its swap returned; the parent kills it with SIGKILL at random moments
// and reopens the image each time.

const CHILD_DIR: &str = "SHAREDISK_TEST_PR_CRASH_DIR";
const ROUNDS: usize = 40;

/// The payload of swap number `seq`: JSON, 1 MiB or 300 KiB + 7 bytes by turns, its fill byte
/// changing with `seq`, so a mix of two payloads or a torn one cannot pass for either.
fn payload(seq: u64) -> Vec<u8> {
    let len = if seq & 1 == 0 {
        1 << 20
    } else {
        300 * 1024 + 7
    };
    let fill = b'a' + (seq % 26) as u8;
    let mut v = format!("{{\"seq\":{seq:020},\"fill\":\"").into_bytes();
    v.resize(len - 2, fill);
    v.extend_from_slice(b"\"}");
    v
}

/// The sequence number a payload claims.
fn seq_of(state: &[u8]) -> Option<u64> {
    std::str::from_utf8(state.get(7..27)?).ok()?.parse().ok()
}

/// Not a test on its own: the child of `sigkill_at_random_moments_leaves_old_or_new_state`.
#[test]
fn crash_child_process() {
    use std::io::Write;
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let d = open(&Path::new(&dir).join("disk.img"));
        let s = store_of(&d);
        let cur = s.load().await.expect("load");
        let mut seq = seq_of(&cur.state).unwrap_or(0);
        let mut version = cur.version;
        // Straight to the descriptor: the test harness captures only `print!`.
        let mut out = std::io::stdout();
        loop {
            seq += 1;
            version = s
                .compare_and_swap(version, payload(seq), true)
                .await
                .expect("compare_and_swap")
                .expect("no one else swaps");
            writeln!(out, "acked {seq}").expect("stdout");
            out.flush().expect("stdout");
        }
    });
}

/// A small xorshift generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn sigkill_at_random_moments_leaves_old_or_new_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let seed = std::env::var("SHAREDISK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("SHAREDISK_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let exe = std::env::current_exe().expect("test binary");
    let mut on_disk = 0u64; // the payload the sidecar held after the last round
    let (mut mid_write, mut before_first_ack) = (0, 0);
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["crash_child_process", "--exact", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        // The harness may have printed "test crash_child_process ... " on the same line.
        let acked = |line: &str| {
            let (_, n) = line.split_once("acked ")?;
            n.parse().ok()
        };
        let mut last_acked = on_disk;
        match rng.below(4) {
            // During start-up, or anywhere in the first swaps.
            0 => std::thread::sleep(Duration::from_micros(rng.below(40_000))),
            // Between the creation of the temp file and the rename, most of the time.
            1 => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !temp_path(&image).exists() && Instant::now() < deadline {
                    std::thread::yield_now();
                }
                std::thread::sleep(Duration::from_micros(rng.below(500)));
            }
            // Anywhere in the loop, once it runs.
            _ => {
                for line in lines.by_ref() {
                    if let Some(n) = acked(&line.expect("read")) {
                        last_acked = n;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(rng.below(40_000)));
            }
        }
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert!(
            !status.success(),
            "round {round}: the child ended by itself"
        );
        for line in lines {
            if let Some(n) = acked(&line.expect("read")) {
                last_acked = n;
            }
        }
        if last_acked == on_disk {
            before_first_ack += 1;
        }
        if temp_path(&image).exists() {
            mid_write += 1;
        }

        let d = open(&image);
        assert!(!temp_path(&image).exists());
        let got = rt.block_on(store_of(&d).load()).expect("load");
        let seq = if got == Stored::default() {
            0
        } else {
            assert_eq!(got.version, 1);
            let seq = seq_of(&got.state).unwrap_or_else(|| {
                panic!("round {round}: not a payload (seed {seed})");
            });
            assert!(
                got.state == payload(seq),
                "round {round}: payload {seq} is damaged (seed {seed})"
            );
            seq
        };
        // The last swap that returned, or the one in progress when the kill came.
        assert!(
            seq == last_acked || seq == last_acked + 1,
            "round {round}: found payload {seq}, last acknowledged {last_acked} (seed {seed})"
        );
        on_disk = seq;
        drop(d);
    }
    eprintln!(
        "{ROUNDS} kills: {mid_write} left a temp file, {before_first_ack} came before the \
         round's first acknowledged swap; {on_disk} swaps in all"
    );
    assert!(on_disk > 0, "the child never completed a swap");
    assert!(mid_write > 0, "no kill landed in the middle of a write");
}
