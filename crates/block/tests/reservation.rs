//! The reservation stores: compare-and-swap semantics (memory store, file driver's sidecar, and
//! the one `Backend` picks), APTPL persistence across a reopen of the file driver, and what
//! happens to damaged or leftover files and failed writes. The crash test (SIGKILL at random
//! moments) is in `reservation_crash.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::driver::file::{EngineChoice, FileDriver, FileOptions};
use block::driver::mem::MemDriver;
use block::driver::sidecar::sidecar_path;
use block::{Backend, BlockError, Driver, MemoryStore, ReservationStore, Stored};

const MIB: u64 = 1 << 20;

/// A state file whose header names the format (so a store wrote it) but whose rest is damaged.
const DAMAGED: &[u8] = b"sharedisk-pr-v1 damaged";

fn open(path: &Path) -> Result<FileDriver, BlockError> {
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        ..FileOptions::default()
    };
    FileDriver::open_with(path, Some(MIB), &opts)
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

async fn cas(
    s: &dyn ReservationStore,
    expected: u64,
    state: &[u8],
    durable: bool,
) -> Result<u64, Stored> {
    s.compare_and_swap(expected, state.to_vec(), durable)
        .await
        .expect("compare_and_swap")
}

fn stored(version: u64, state: &[u8]) -> Stored {
    Stored {
        version,
        state: state.to_vec(),
    }
}

/// The contract every single-holder store keeps, starting from an empty store.
async fn compare_and_swap_semantics(s: Arc<dyn ReservationStore>) {
    let rx = s.watch();
    assert_eq!(s.load().await.expect("load"), Stored::default());
    assert_eq!(s.lost(), None);
    assert_eq!(cas(&*s, 0, b"{\"a\":1}", false).await, Ok(1));
    // A stale version is refused with the current state, which is left as it was.
    assert_eq!(
        cas(&*s, 0, b"{\"b\":2}", false).await,
        Err(stored(1, b"{\"a\":1}"))
    );
    assert_eq!(
        cas(&*s, 7, b"{\"b\":2}", true).await,
        Err(stored(1, b"{\"a\":1}"))
    );
    assert_eq!(s.load().await.expect("load"), stored(1, b"{\"a\":1}"));
    assert_eq!(cas(&*s, 1, b"{\"b\":2}", true).await, Ok(2));
    assert_eq!(cas(&*s, 2, b"", false).await, Ok(3));
    assert_eq!(s.load().await.expect("load"), stored(3, b""));
    // A single holder: nothing changes elsewhere, and the barrier is immediate.
    assert!(!rx.has_changed().expect("the store is alive"));
    assert_eq!(*rx.borrow(), Stored::default());
    tokio::time::timeout(Duration::from_secs(5), s.barrier(3))
        .await
        .expect("the barrier of a single holder is immediate")
        .expect("barrier");
}

#[tokio::test]
async fn memory_store_compare_and_swap() {
    compare_and_swap_semantics(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_compare_and_swap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = open(&dir.path().join("disk.img")).expect("open");
    compare_and_swap_semantics(store_of(&d)).await;
}

/// A driver with no store of its own: its data may outlive the process (a device whose store
/// is not written yet), so the backend's memory store refuses APTPL rather than accept a
/// reservation meant to persist and forget it at restart.
struct NoStore(MemDriver);

#[async_trait::async_trait]
impl Driver for NoStore {
    fn info(&self) -> block::DriverInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(offset, len, unmap).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<block::Extent, BlockError> {
        self.0.block_status(offset, len).await
    }
}

#[tokio::test]
async fn a_driver_without_a_store_gets_a_memory_store_that_refuses_aptpl() {
    let d = NoStore(MemDriver::new(MIB));
    assert!(d.reservation_store().is_none());
    let a = Backend::new(Arc::new(d), 512).expect("backend");
    let b = Backend::new(Arc::new(NoStore(MemDriver::new(MIB))), 512).expect("backend");
    assert!(format!("{:?}", a.reservations()).starts_with("MemoryStore"));
    assert!(!a.reservations().keeps_aptpl());
    assert!(matches!(
        a.reservations()
            .compare_and_swap(0, b"{}".to_vec(), true)
            .await,
        Err(BlockError::Unsupported)
    ));
    assert_eq!(cas(&**a.reservations(), 0, b"{}", false).await, Ok(1));
    // Each backend has its own.
    assert_eq!(
        b.reservations().load().await.expect("load"),
        Stored::default()
    );
}

/// The memory driver's state lives as long as its data, so its store keeps APTPL.
#[tokio::test]
async fn the_memory_driver_keeps_aptpl_as_long_as_its_data() {
    let d = MemDriver::new(MIB);
    let s = d
        .reservation_store()
        .expect("the memory driver has a store");
    assert!(s.keeps_aptpl());
    let b = Backend::new(Arc::new(d), 512).expect("backend");
    assert!(Arc::ptr_eq(b.reservations(), &s));
    compare_and_swap_semantics(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_keeps_the_file_drivers_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    {
        let b = Backend::new(Arc::new(open(&path).expect("open")), 512).expect("backend");
        assert_eq!(cas(&**b.reservations(), 0, b"{}", true).await, Ok(1));
    }
    let b = Backend::new(Arc::new(open(&path).expect("reopen")), 512).expect("backend");
    assert_eq!(
        b.reservations().load().await.expect("load"),
        stored(1, b"{}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_state_survives_a_reopen_in_a_readable_sidecar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let first = br#"{"keys":["0x1"],"generation":1}"#;
    let second = br#"{"keys":["0x1","0x2"],"generation":2}"#;
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        assert_eq!(cas(&*s, 0, first, true).await, Ok(1));
        assert_eq!(cas(&*s, 1, second, true).await, Ok(2));
    }
    // disk.img → disk.img.pr, one header line, then the state as given.
    let side = dir.path().join("disk.img.pr");
    assert_eq!(sidecar_path(&path), side);
    let bytes = std::fs::read(&side).expect("the sidecar exists");
    let text = String::from_utf8(bytes).expect("text");
    let (header, body) = text.split_once('\n').expect("a header line");
    assert!(
        header.starts_with(&format!("sharedisk-pr-v1 {} ", second.len())),
        "{header}"
    );
    assert_eq!(body.as_bytes(), &second[..]);

    let d = open(&path).expect("reopen");
    // Reloaded as version 1, and usable from there.
    let s = store_of(&d);
    assert_eq!(s.load().await.expect("load"), stored(1, second));
    assert_eq!(*s.watch().borrow(), stored(1, second));
    assert_eq!(cas(&*s, 1, first, true).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_durable_state_does_not_survive_and_removes_an_earlier_durable_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let side = sidecar_path(&path);
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        assert_eq!(cas(&*s, 0, b"{\"aptpl\":true}", true).await, Ok(1));
        assert!(side.exists());
        assert_eq!(cas(&*s, 1, b"{\"aptpl\":false}", false).await, Ok(2));
        assert!(!side.exists(), "APTPL off removes the kept state");
        assert_eq!(
            s.load().await.expect("load"),
            stored(2, b"{\"aptpl\":false}")
        );
        assert_eq!(cas(&*s, 2, b"{\"again\":1}", false).await, Ok(3));
    }
    let d = open(&path).expect("reopen");
    assert_eq!(store_of(&d).load().await.expect("load"), Stored::default());
    // Never durable: no sidecar is ever written.
    let s = store_of(&d);
    assert_eq!(cas(&*s, 0, b"{}", false).await, Ok(1));
    assert!(!side.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_file_left_by_a_crash_is_ignored_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let tmp = temp_path(&path);
    // Without a sidecar.
    drop(open(&path).expect("create"));
    std::fs::write(&tmp, b"sharedisk-pr-v1 100 0\n{\"half").expect("write");
    {
        let d = open(&path).expect("open");
        assert!(!tmp.exists());
        let s = store_of(&d);
        assert_eq!(s.load().await.expect("load"), Stored::default());
        assert_eq!(cas(&*s, 0, b"{\"kept\":1}", true).await, Ok(1));
    }
    // Beside a sidecar: a write cut short in its header.
    std::fs::write(&tmp, b"sharedisk-pr-v1 9").expect("write");
    let d = open(&path).expect("open");
    assert!(!tmp.exists());
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"kept\":1}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sidecar_opens_as_lost_state_and_is_left_for_the_operator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let side = sidecar_path(&path);
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        assert_eq!(s.lost(), None);
        assert_eq!(cas(&*s, 0, b"{\"key\":\"0xabc\"}", true).await, Ok(1));
    }
    let good = std::fs::read(&side).expect("read");
    let mut flipped = good.clone();
    *flipped.last_mut().expect("not empty") ^= 0x01;
    let truncated = good.get(..good.len() - 3).expect("long enough").to_vec();
    // A header of this format with a wrong length or checksum after it, a header and nothing
    // else, or an empty file (nothing in it to lose).
    for bad in [
        flipped,
        truncated,
        b"sharedisk-pr-v1 \n".to_vec(),
        b"sharedisk-pr-v1 15 0\n{\"key\":\"0xabc\"}".to_vec(),
        Vec::new(),
    ] {
        std::fs::write(&side, &bad).expect("write");
        // The image opens; the store says its state was lost (naming the file) and holds
        // version 1 with no state. Opening does not touch the damaged file.
        let d = open(&path).unwrap_or_else(|e| panic!("{bad:?}: {e:?}"));
        let s = store_of(&d);
        let why = s.lost().unwrap_or_else(|| panic!("not lost: {bad:?}"));
        assert!(why.contains("disk.img.pr"), "{why}");
        assert_eq!(s.load().await.expect("load"), stored(1, b""));
        drop(d);
        assert_eq!(std::fs::read(&side).expect("still there"), bad);
    }
    std::fs::write(&side, &good).expect("write");
    let d = open(&path).expect("open with the sidecar restored");
    assert_eq!(store_of(&d).lost(), None);
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"key\":\"0xabc\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_swap_replaces_lost_state_durably_or_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let side = sidecar_path(&path);

    // Durable: the new state replaces the damaged file, and is what a reopen finds.
    std::fs::write(&side, DAMAGED).expect("write");
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        assert!(s.lost().is_some());
        assert_eq!(cas(&*s, 1, b"{\"new\":1}", true).await, Ok(2));
        assert_eq!(s.lost(), None);
        assert_eq!(s.load().await.expect("load"), stored(2, b"{\"new\":1}"));
    }
    let d = open(&path).expect("reopen");
    assert_eq!(store_of(&d).lost(), None);
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"new\":1}")
    );
    drop(d);

    // Not durable: the damaged file goes, and a reopen finds nothing stored and nothing lost.
    std::fs::write(&side, DAMAGED).expect("write");
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        assert!(s.lost().is_some());
        assert_eq!(cas(&*s, 1, b"{\"new\":2}", false).await, Ok(2));
        assert_eq!(s.lost(), None);
        assert!(!side.exists());
    }
    let d = open(&path).expect("reopen");
    assert_eq!(store_of(&d).lost(), None);
    assert_eq!(store_of(&d).load().await.expect("load"), Stored::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_over_lost_state_keeps_it_lost_and_the_damaged_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let side = sidecar_path(&path);
    let tmp = temp_path(&path);
    std::fs::write(&side, DAMAGED).expect("write");
    let d = open(&path).expect("open");
    let s = store_of(&d);
    // The temp file cannot be created (a directory is in the way; this works as root too).
    std::fs::create_dir(&tmp).expect("mkdir");
    let r = s.compare_and_swap(1, b"{\"new\":1}".to_vec(), true).await;
    assert!(matches!(r, Err(BlockError::WriteFailed(_))), "{r:?}");
    std::fs::remove_dir(&tmp).expect("rmdir");
    assert!(s.lost().is_some());
    assert_eq!(s.load().await.expect("load"), stored(1, b""));
    assert_eq!(std::fs::read(&side).expect("still there"), DAMAGED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_leaves_the_previous_state_in_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let tmp = temp_path(&path);
    let d = open(&path).expect("open");
    let s = store_of(&d);
    assert_eq!(cas(&*s, 0, b"{\"old\":1}", true).await, Ok(1));
    // The temp file cannot be created (a directory is in the way; this works as root too).
    std::fs::create_dir(&tmp).expect("mkdir");
    let r = s.compare_and_swap(1, b"{\"new\":1}".to_vec(), true).await;
    assert!(matches!(r, Err(BlockError::WriteFailed(_))), "{r:?}");
    assert_eq!(s.load().await.expect("load"), stored(1, b"{\"old\":1}"));
    std::fs::remove_dir(&tmp).expect("rmdir");
    drop(s);
    drop(d);
    let d = open(&path).expect("reopen");
    let s = store_of(&d);
    assert_eq!(s.load().await.expect("load"), stored(1, b"{\"old\":1}"));
    assert_eq!(cas(&*s, 1, b"{\"new\":1}", true).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_compare_and_swap_completes_and_memory_agrees_with_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    {
        let d = open(&path).expect("open");
        let s = store_of(&d);
        // Polled once (so started), then dropped.
        let _ = tokio::time::timeout(
            Duration::ZERO,
            s.compare_and_swap(0, b"{\"abandoned\":1}".to_vec(), true),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.load().await.expect("load").version == 0 {
            assert!(Instant::now() < deadline, "the swap never completed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            s.load().await.expect("load"),
            stored(1, b"{\"abandoned\":1}")
        );
    }
    let d = open(&path).expect("reopen");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"abandoned\":1}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_follows_the_image_not_the_path_it_was_opened_by() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real.img");
    let link = dir.path().join("link.img");
    std::fs::write(&real, vec![0u8; MIB as usize]).expect("image");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    {
        let d = open(&link).expect("open by the link");
        assert_eq!(cas(&*store_of(&d), 0, b"state", true).await, Ok(1));
    }
    // Kept beside the image itself, not beside the link.
    assert!(sidecar_path(&real).exists());
    assert!(!sidecar_path(&link).exists());
    let d = open(&real).expect("open by the real path");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"state")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_where_the_state_is_not_kept_fails_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real.img");
    let link = dir.path().join("link.img");
    std::fs::write(&real, vec![0u8; MIB as usize]).expect("image");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    // A state file beside the link (where the state of an image opened by that path was once
    // kept) would be ignored: the open refuses, naming it and where it belongs.
    std::fs::write(sidecar_path(&link), b"kept reservations").expect("stray");
    let Err(BlockError::Open(e)) = open(&link) else {
        panic!("opened despite a state file beside the link")
    };
    let e = e.to_string();
    assert!(e.contains("link.img.pr"), "{e}");
    assert!(e.contains("real.img.pr"), "{e}");
    assert_eq!(
        std::fs::read(sidecar_path(&link)).expect("left alone"),
        b"kept reservations"
    );
    // So does the default sidecar when another state file is configured.
    std::fs::remove_file(sidecar_path(&link)).expect("remove");
    std::fs::write(sidecar_path(&real), b"kept reservations").expect("stray");
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        reservation_state: Some(dir.path().join("elsewhere.pr")),
        ..FileOptions::default()
    };
    let Err(BlockError::Open(e)) = FileDriver::open_with(&real, None, &opts) else {
        panic!("opened despite a state file beside the image")
    };
    let e = e.to_string();
    assert!(e.contains("real.img.pr"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_state_file_is_where_the_state_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).expect("state dir");
    let state = state_dir.join("disk.pr");
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        reservation_state: Some(state.clone()),
        ..FileOptions::default()
    };
    {
        let d = FileDriver::open_with(&path, Some(MIB), &opts).expect("open");
        let s = store_of(&d);
        assert!(s.keeps_aptpl());
        assert_eq!(cas(&*s, 0, b"state", true).await, Ok(1));
    }
    assert!(state.exists());
    assert!(!sidecar_path(&path).exists());
    let d = FileDriver::open_with(&path, None, &opts).expect("reopen");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"state")
    );
}

#[tokio::test]
async fn a_memory_store_without_aptpl_refuses_a_durable_state() {
    let s = MemoryStore::without_aptpl();
    assert!(!s.keeps_aptpl());
    assert!(matches!(
        s.compare_and_swap(0, b"x".to_vec(), true).await,
        Err(BlockError::Unsupported)
    ));
    assert_eq!(s.load().await.expect("load"), Stored::default());
    assert_eq!(cas(&s, 0, b"x", false).await, Ok(1));
    assert!(MemoryStore::new().keeps_aptpl());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_images_cannot_share_a_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        reservation_state: Some(dir.path().join("shared.pr")),
        ..FileOptions::default()
    };
    let first = FileDriver::open_with(&dir.path().join("a.img"), Some(MIB), &opts).expect("a");
    let Err(BlockError::Open(e)) =
        FileDriver::open_with(&dir.path().join("b.img"), Some(MIB), &opts)
    else {
        panic!("a second image opened with the first one's state file")
    };
    assert!(
        e.to_string()
            .contains("already keeps the reservation state"),
        "{e}"
    );
    // Released with the first.
    drop(first);
    FileDriver::open_with(&dir.path().join("b.img"), Some(MIB), &opts).expect("b, once a is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_opened_by_a_relative_path_finds_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("disk.img");
    {
        let d = open(&real).expect("open");
        assert_eq!(cas(&*store_of(&d), 0, b"state", true).await, Ok(1));
    }
    // `disk.img` from its own folder: `disk.img.pr` and the canonical sidecar are one file.
    std::env::set_current_dir(dir.path()).expect("cd");
    let d = open(Path::new("disk.img")).expect("open by a relative path");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"state")
    );
}

fn open_with_state(image: &Path, state: &Path) -> Result<FileDriver, BlockError> {
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        reservation_state: Some(state.to_path_buf()),
        ..FileOptions::default()
    };
    FileDriver::open_with(image, Some(MIB), &opts)
}

/// An image another open serves (it holds the image's lock) is never read as a state file,
/// even when its first bytes look like one (a guest can write anything there): the open that
/// names it fails, and the image is left byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_image_is_never_taken_for_a_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("a.img.pr");
    // A served image whose first bytes are an empty state file of this format.
    let mut bytes = b"sharedisk-pr-v1 0 00000000\n".to_vec();
    bytes.resize(MIB as usize, 0);
    std::fs::write(&image, &bytes).expect("image");
    let served = open(&image).expect("serve the image");
    let e = open_with_state(&dir.path().join("b.img"), &image)
        .err()
        .expect("the open that names a served image as its state file fails");
    assert!(format!("{e:?}").contains("locked"), "{e:?}");
    drop(served);
    assert_eq!(std::fs::read(&image).expect("read"), bytes);
}

/// A state file named by mistake (another image the daemon serves, any other file) would be
/// taken for damaged state, and the first update (REPLACE LOST RESERVATION, `pr clear`) would
/// remove or replace it. Only a file a store could have written is used; anything else fails
/// the open and is left byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_state_file_fails_the_open_and_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let image_bytes = vec![0xA5u8; MIB as usize];
    std::fs::write(&a, &image_bytes).expect("a");
    let served_a = open(&a).expect("serve a");
    let not_state = dir.path().join("notes.pr");
    let newer = dir.path().join("newer.pr");
    // The header of a later format (v2): this version must not read it, nor overwrite it.
    std::fs::write(&newer, b"sharedisk-pr-v2 2 00000000\n{}").expect("newer");
    for (state, bytes, why) in [
        (
            &a,
            image_bytes.clone(),
            "not a sharedisk reservation state file",
        ),
        (
            &not_state,
            b"{\"key\":\"0xabc\"}".to_vec(),
            "not a sharedisk reservation state file",
        ),
        (
            &newer,
            b"sharedisk-pr-v2 2 00000000\n{}".to_vec(),
            "format v2",
        ),
    ] {
        if state == &not_state {
            std::fs::write(state, &bytes).expect("write");
        }
        let Err(BlockError::Open(e)) = open_with_state(&b, state) else {
            panic!("b opened with {} as its state file", state.display())
        };
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(std::fs::read(state).expect("still there"), bytes);
    }
    // Not a regular file, or larger than any state: refused too.
    let folder = dir.path().join("folder.pr");
    std::fs::create_dir(&folder).expect("mkdir");
    let huge = dir.path().join("huge.pr");
    let f = std::fs::File::create(&huge).expect("huge");
    std::io::Write::write_all(&mut &f, b"sharedisk-pr-v1 0 00000000\n").expect("header");
    f.set_len(17 << 20).expect("set_len");
    for (state, why) in [
        (&folder, "not a regular file"),
        (&huge, "more than any state"),
    ] {
        let Err(BlockError::Open(e)) = open_with_state(&b, state) else {
            panic!("b opened with {} as its state file", state.display())
        };
        assert!(e.to_string().contains(why), "{e}");
    }
    assert_eq!(std::fs::metadata(&huge).expect("huge").len(), 17 << 20);
    drop(served_a);
    assert_eq!(std::fs::read(&a).expect("a"), image_bytes);
    // Nothing was made beside the refused files (no lock file beside the image).
    assert!(!dir.path().join("a.img.lock").exists());
    assert!(!dir.path().join("notes.pr.lock").exists());
}

/// Around a state file the store creates its lock (`.lock`) and its temp file (`.tmp`): a state
/// file named like one is refused, and a file at the temp file's name that a store did not
/// write (beside an image named by mistake, another program's) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_names_beside_a_state_file_are_not_taken_from_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    for name in ["other.pr.lock", "other.pr.tmp"] {
        let Err(BlockError::Open(e)) = open_with_state(&img, &dir.path().join(name)) else {
            panic!("{name} taken as a state file")
        };
        assert!(
            e.to_string().contains("must not end in .lock or .tmp"),
            "{e}"
        );
    }
    let state = dir.path().join("disk.pr");
    let temp = dir.path().join("disk.pr.tmp");
    std::fs::write(&temp, b"another program's data").expect("write");
    let d = open_with_state(&img, &state).expect("open");
    assert_eq!(
        std::fs::read(&temp).expect("left alone"),
        b"another program's data"
    );
    // Nor does a write take it: it fails, and the file stays as it was.
    let store = store_of(&d);
    assert!(
        store
            .compare_and_swap(0, b"{}".to_vec(), true)
            .await
            .is_err(),
        "a durable write went through another program's file"
    );
    assert_eq!(
        std::fs::read(&temp).expect("still there"),
        b"another program's data"
    );
    drop(store);
    drop(d);
    // A link at that name: what it points to is not written through it.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"victim's data").expect("write");
    std::fs::remove_file(&temp).expect("remove");
    std::os::unix::fs::symlink(&victim, &temp).expect("symlink");
    let d = open_with_state(&img, &state).expect("open");
    assert!(store_of(&d)
        .compare_and_swap(0, b"{}".to_vec(), true)
        .await
        .is_err());
    assert_eq!(std::fs::read(&victim).expect("victim"), b"victim's data");
    assert!(std::fs::symlink_metadata(&temp).expect("link").is_symlink());
    drop(d);
    std::fs::remove_file(&temp).expect("remove");
    // What a store's write leaves when a crash cuts it short is removed.
    for cut in [&b""[..], b"sharedisk-pr", b"sharedisk-pr-v1 12 0000"] {
        std::fs::write(&temp, cut).expect("write");
        drop(open_with_state(&img, &state).expect("open"));
        assert!(!temp.exists(), "{cut:?} left behind");
    }
}

/// A configured state file that is a link to the image's own default state file is that file,
/// not a stray beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_link_to_the_default_state_file_is_no_stray() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    {
        let d = open(&img).expect("open");
        assert_eq!(cas(&*store_of(&d), 0, b"{\"kept\":1}", true).await, Ok(1));
    }
    let link = dir.path().join("state-link.pr");
    std::os::unix::fs::symlink(sidecar_path(&img), &link).expect("symlink");
    let d = open_with_state(&img, &link).expect("open through the link");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"kept\":1}")
    );
}

/// A state file configured as a symlink (to a folder on persistent storage) is followed: the
/// state is written where the link points and read back from there, and the link stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_state_file_is_followed_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    let persistent = dir.path().join("persistent");
    std::fs::create_dir(&persistent).expect("dir");
    let target = persistent.join("disk.pr");
    let link = dir.path().join("disk-state.pr");
    // A relative link: relative to the link's folder.
    std::os::unix::fs::symlink("persistent/disk.pr", &link).expect("symlink");
    {
        let d = open_with_state(&img, &link).expect("open");
        assert_eq!(cas(&*store_of(&d), 0, b"{\"x\":1}", true).await, Ok(1));
    }
    let meta = std::fs::symlink_metadata(&link).expect("link");
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert!(target.exists(), "the state is not where the link points");
    let d = open_with_state(&img, &link).expect("reopen");
    assert_eq!(
        store_of(&d).load().await.expect("load"),
        stored(1, b"{\"x\":1}")
    );
    // The state file by its real name is the same file: a second image cannot have it.
    drop(d);
    let first = open_with_state(&img, &link).expect("open");
    let Err(BlockError::Open(e)) = open_with_state(&dir.path().join("other.img"), &target) else {
        panic!("a second image opened with the first one's state file by its real name")
    };
    assert!(e.to_string().contains("already keeps"), "{e}");
    drop(first);
}

/// Another process that keeps its state in the same file holds `<state file>.lock`: the open
/// fails instead of both replacing each other's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_another_process_keeps_fails_the_open() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("shared.pr");
    let lock = dir.path().join("shared.pr.lock");
    // What another process's store holds: its own open of the lock file, flock'ed.
    let other = std::fs::File::create(&lock).expect("lock file");
    // SAFETY: flock only takes a descriptor, which `other` keeps open for the call.
    let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0);
    let Err(BlockError::Open(e)) = open_with_state(&dir.path().join("a.img"), &state) else {
        panic!("opened with a state file another process holds")
    };
    assert!(e.to_string().contains("another process"), "{e}");
    drop(other);
    let d = open_with_state(&dir.path().join("a.img"), &state).expect("open once it is free");
    assert_eq!(cas(&*store_of(&d), 0, b"{}", true).await, Ok(1));
    assert!(lock.exists());
}
