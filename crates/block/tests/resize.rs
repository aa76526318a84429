//! A grown image: the file driver and the backend serve its new end once told to look again
//! (`Driver::refresh_size`, `Backend::refresh_capacity`), never before, and refuse one that
//! shrank.

use std::sync::Arc;

use block::driver::file::{EngineChoice, FileDriver, FileOptions};
use block::{Backend, BlockError, Driver};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_image_is_served_to_its_new_end_once_rescanned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let opts = FileOptions {
        engine: EngineChoice::ThreadPool,
        ..FileOptions::default()
    };
    let driver = Arc::new(FileDriver::open_with(&path, Some(MIB), &opts).expect("open"));
    let b = Backend::new(driver.clone(), 512).expect("backend");
    assert_eq!(b.capacity(), 2048);

    // The operator grows the file (truncate -s 2M): not served until rescanned.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for resize")
        .set_len(2 * MIB)
        .expect("grow");
    assert_eq!(b.capacity(), 2048);
    assert!(matches!(
        b.read(3000, 1).await,
        Err(BlockError::OutOfRange { .. })
    ));

    assert_eq!(b.refresh_capacity().await.expect("rescan"), (2048, 4096));
    assert_eq!(b.capacity(), 4096);
    assert_eq!(driver.info().size, 2 * MIB);
    b.write(4095, vec![0xA5; 512], false)
        .await
        .expect("write the new last block");
    assert_eq!(b.read(4095, 1).await.expect("read it"), vec![0xA5; 512]);
    // Unchanged: the same capacity twice.
    assert_eq!(b.refresh_capacity().await.expect("rescan"), (4096, 4096));

    // Shrunk underneath: refused, and the capacity stays.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for resize")
        .set_len(MIB)
        .expect("shrink");
    assert!(b.refresh_capacity().await.is_err());
    assert_eq!(b.capacity(), 4096);
    assert_eq!(driver.info().size, 2 * MIB);
}
