//! A block device served by the file driver (a loop device over a temp file; needs root and
//! loop devices, as CI has): no reservation state is kept beside it under `/dev`, APTPL is
//! refused unless a state file is configured, and a configured one keeps it. In a test binary
//! of its own: `losetup` runs as a child process, and a child holds the parent's descriptors,
//! and so image locks, between its fork and exec, which would trip the lock checks of tests
//! running beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::driver::file::{EngineChoice, FileDriver, FileOptions};
use block::driver::sidecar::sidecar_path;
use block::{BlockError, Driver, ReservationStore, Stored};

const MIB: u64 = 1 << 20;

fn opts(state: Option<PathBuf>) -> FileOptions {
    FileOptions {
        engine: EngineChoice::ThreadPool,
        reservation_state: state,
        ..FileOptions::default()
    }
}

fn store_of(d: &FileDriver) -> Arc<dyn ReservationStore> {
    d.reservation_store()
        .expect("the file driver has a reservation store")
}

/// A loop device over a file in `dir`, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(backing: &Path) -> Loop {
        let out = std::process::Command::new("losetup")
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
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_device_keeps_no_state_beside_it_unless_told_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing.img");
    std::fs::write(&backing, vec![0u8; MIB as usize]).expect("backing");
    let dev = Loop::attach(&backing);
    {
        // No state file: APTPL is refused, and nothing is written under /dev.
        let d = FileDriver::open_with(&dev.0, None, &opts(None)).expect("open the block device");
        let s = store_of(&d);
        assert!(!s.keeps_aptpl());
        assert!(matches!(
            s.compare_and_swap(0, b"x".to_vec(), true).await,
            Err(BlockError::Unsupported)
        ));
        assert!(!sidecar_path(&dev.0).exists());
    }
    // With a state file, APTPL state is kept there and found again.
    let state = dir.path().join("dev.pr");
    let opts = opts(Some(state.clone()));
    {
        let d = FileDriver::open_with(&dev.0, None, &opts).expect("open with a state file");
        let s = store_of(&d);
        assert!(s.keeps_aptpl());
        let r = s.compare_and_swap(0, b"state".to_vec(), true).await;
        assert_eq!(r.expect("stored"), Ok(1));
    }
    assert!(state.exists());
    let d = FileDriver::open_with(&dev.0, None, &opts).expect("reopen");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        Stored {
            version: 1,
            state: b"state".to_vec()
        }
    );
}
