//! Compare the file driver's I/O engines, on their own and behind the default fast paths (page-
//! cache hits and lone writes on the calling thread), buffered and with direct I/O: 4 KiB random
//! reads and writes at queue depth 1 and 32, through `Backend` (range locks and accounting
//! included), a few seconds each. Direct I/O needs a disk file system (not tmpfs before 6.6).
//!
//! ```text
//! cargo run --release -p block --example file_engines -- [PATH] [SECONDS] [SIZE_MIB]
//! ```
//!
//! PATH defaults to `/dev/shm/sharedisk-engines.img` (tmpfs); pass a path on a disk file system
//! to measure that instead. The image is filled first so reads hit data, and removed at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::driver::file::{Engine, EngineChoice, FileDriver, FileOptions};
use block::Backend;

const BS: u32 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/dev/shm/sharedisk-engines.img".into()),
    );
    let secs: f64 = args.next().map_or(Ok(2.0), |s| s.parse())?;
    let size_mib: u64 = args.next().map_or(Ok(256), |s| s.parse())?;
    let size = size_mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _ = std::fs::remove_file(&path);
    println!(
        "file {} ({size_mib} MiB), 4 KiB random I/O, {secs} s per row",
        path.display()
    );
    println!(
        "{:<20} {:<6} {:>3} {:>10} {:>10}",
        "engine", "op", "qd", "IOPS", "MiB/s"
    );
    // (engine, fast paths, direct I/O, opened inside the runtime)
    let setups = [
        (EngineChoice::IoUring, false, false, true),
        (EngineChoice::IoUring, false, false, false),
        (EngineChoice::ThreadPool, false, false, true),
        (EngineChoice::Auto, true, false, true),
        (EngineChoice::IoUring, false, true, true),
        (EngineChoice::IoUring, false, true, false),
        (EngineChoice::ThreadPool, false, true, true),
        (EngineChoice::Auto, true, true, true),
    ];
    for (engine, fast_paths, direct, on_runtime) in setups {
        let opts = FileOptions {
            engine,
            fast_paths,
            direct,
            ..FileOptions::default()
        };
        // The daemon opens its images inside the runtime, and the io_uring engine is then reaped
        // there; opened outside one, the ring gets a thread of its own (the "-thread" rows).
        let driver = if on_runtime {
            let _in_rt = rt.enter();
            FileDriver::open_with(&path, Some(size), &opts)?
        } else {
            FileDriver::open_with(&path, Some(size), &opts)?
        };
        let name = match (driver.engine(), fast_paths, direct, driver.uring_thread()) {
            (_, true, false, _) => "default",
            (Engine::IoUring, false, false, false) => "io_uring",
            (Engine::IoUring, false, false, true) => "io_uring-thread",
            (Engine::ThreadPool, false, false, _) => "thread-pool",
            (_, true, true, _) => "direct",
            (Engine::IoUring, false, true, false) => "direct-uring",
            (Engine::IoUring, false, true, true) => "direct-uring-thread",
            (Engine::ThreadPool, false, true, _) => "direct-pool",
        };
        let backend = Arc::new(Backend::new(Arc::new(driver), BS)?);
        rt.block_on(fill(&backend))?;
        for write in [false, true] {
            for qd in [1u64, 32] {
                let iops = rt.block_on(run(&backend, write, qd, Duration::from_secs_f64(secs)));
                println!(
                    "{:<20} {:<6} {:>3} {:>10.0} {:>10.1}",
                    name,
                    if write { "write" } else { "read" },
                    qd,
                    iops,
                    iops * f64::from(BS) / f64::from(1 << 20)
                );
            }
        }
        drop(backend);
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn fill(b: &Backend) -> Result<(), block::BlockError> {
    let chunk = 256u64;
    let mut lba = 0;
    while lba < b.capacity() {
        let n = chunk.min(b.capacity() - lba);
        b.write(lba, vec![0x5a; (n * u64::from(BS)) as usize], false)
            .await?;
        lba += n;
    }
    b.flush().await
}

async fn run(b: &Arc<Backend>, write: bool, qd: u64, time: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let (b, stop, done) = (b.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let cap = b.capacity();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let lba = x % cap;
                let r = if write {
                    b.write(lba, vec![t as u8; BS as usize], false).await
                } else {
                    b.read(lba, 1).await.map(drop)
                };
                if let Err(e) = r {
                    eprintln!("I/O error: {e}");
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(time).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
