//! Shared helpers for the command tests: LUs over the memory driver and over small test drivers
//! (thin provisioning, failing I/O, gated writes, a given reservation store), and a one-call
//! way to run a CDB.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use block::driver::mem::MemDriver;
use block::{Backend, BlockError, Driver, DriverInfo, Extent, ReservationStore};
use scsi::{
    Command, Completion, InitiatorPort, ItNexus, LogicalUnit, LuConfig, Response, Status, Target,
    TargetPort, TaskAttr, Transport,
};

pub fn config() -> LuConfig {
    LuConfig {
        vendor: "SHAREDSK".into(),
        product: "sharedisk".into(),
        revision: "0001".into(),
        serial: "SD0001".into(),
        id: 0x0123_4567_89AB_CDEF,
    }
}

pub fn nexus_named(initiator: &str) -> Arc<ItNexus> {
    Arc::new(ItNexus {
        initiator: InitiatorPort {
            transport: Transport::Iscsi,
            name: initiator.into(),
            isid: Some([0x40, 0, 0, 0, 0, 1]),
        },
        target: TargetPort {
            name: "iqn.2026-01.io.sharedisk:disk0".into(),
            tpgt: 1,
            relative_id: 1,
        },
    })
}

pub fn nexus() -> Arc<ItNexus> {
    nexus_named("iqn.1993-08.org.debian:01:a")
}

pub fn target_with(driver: Arc<dyn Driver>, block_size: u32) -> Target {
    let backend = Backend::new(driver, block_size).expect("valid block size");
    let mut t = Target::new();
    t.add_lu(0, Arc::new(LogicalUnit::new(backend, config())));
    t
}

/// A target with LUN 0 on a memory disk of `blocks` blocks of `block_size` bytes.
pub fn mem_target(blocks: u64, block_size: u32) -> Target {
    target_with(
        Arc::new(MemDriver::new(blocks * u64::from(block_size))),
        block_size,
    )
}

/// A target with LUN 0 on a thin test disk.
pub fn thin_target(blocks: u64, block_size: u32) -> (Target, Arc<ThinDriver>) {
    let d = Arc::new(ThinDriver::new(blocks * u64::from(block_size), 512));
    (target_with(d.clone(), block_size), d)
}

pub fn cmd(n: &Arc<ItNexus>, tag: u64, cdb: &[u8], data_out: Vec<u8>, data_in_len: u32) -> Command {
    Command {
        nexus: n.clone(),
        lun: 0,
        tag,
        attr: TaskAttr::Simple,
        cdb: cdb.to_vec(),
        data_out: data_out.into(),
        data_in_len,
        data_in_buf: None,
        arrival: None,
    }
}

pub async fn run(t: &Target, n: &Arc<ItNexus>, cdb: &[u8], data_out: Vec<u8>) -> Response {
    match t.execute(cmd(n, 1, cdb, data_out, 1 << 24)).await {
        Completion::Done(r) => r,
        Completion::Aborted => panic!("command unexpectedly aborted"),
    }
}

/// Send TEST UNIT READY until the power-on unit attention is consumed.
pub async fn ready(t: &Target, n: &Arc<ItNexus>) {
    for _ in 0..8 {
        if run(t, n, &[0x00, 0, 0, 0, 0, 0], vec![]).await.status == Status::GOOD {
            return;
        }
    }
    panic!("unit attentions do not clear");
}

/// A target with one ready nexus.
/// A ready target with LUN 0 on a thick (fully provisioned, no discard) memory disk.
pub async fn ready_thick(blocks: u64, block_size: u32) -> (Target, Arc<ItNexus>) {
    let d = Arc::new(ThickDriver(MemDriver::new(blocks * u64::from(block_size))));
    let t = target_with(d, block_size);
    let n = nexus();
    ready(&t, &n).await;
    (t, n)
}

/// A memory disk that reports no thin provisioning (no discard), like a fully allocated image.
pub struct ThickDriver(pub MemDriver);

#[async_trait]
impl Driver for ThickDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            discard: false,
            discard_zeroes: false,
            ..self.0.info()
        }
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, BlockError> {
        self.0.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.0.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }
    async fn write_zeroes(&self, o: u64, l: u64, _unmap: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(o, l, false).await
    }
    async fn block_status(&self, _: u64, l: u64) -> Result<Extent, BlockError> {
        Ok(Extent {
            len: l,
            mapped: true,
        })
    }
}

/// The memory driver's data with the given reservation store.
pub struct WithStore(pub MemDriver, pub Arc<dyn ReservationStore>);

#[async_trait]
impl Driver for WithStore {
    fn info(&self) -> DriverInfo {
        self.0.info()
    }
    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        Some(self.1.clone())
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, BlockError> {
        self.0.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.0.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.0.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, unmap: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(o, l, unmap).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Extent, BlockError> {
        self.0.block_status(o, l).await
    }
}

/// A logical unit of 64 512-byte blocks in memory whose reservations live in `store`.
pub fn lu_over_store(store: Arc<dyn ReservationStore>) -> Arc<LogicalUnit> {
    let driver = WithStore(MemDriver::new(64 * 512), store);
    let backend = Backend::new(Arc::new(driver), 512).unwrap();
    Arc::new(LogicalUnit::new(backend, config()))
}

pub async fn ready_mem(blocks: u64, block_size: u32) -> (Target, Arc<ItNexus>) {
    let t = mem_target(blocks, block_size);
    let n = nexus();
    ready(&t, &n).await;
    (t, n)
}

pub fn assert_good(r: &Response) {
    assert_eq!(r.status, Status::GOOD, "sense: {:02x?}", r.sense);
    assert!(r.sense.is_empty());
}

/// Assert CHECK CONDITION with fixed-format sense `key/asc/ascq`.
pub fn assert_sense(r: &Response, key: u8, asc: u8, ascq: u8) {
    assert_eq!(
        r.status,
        Status::CHECK_CONDITION,
        "data: {:02x?}",
        r.data_in
    );
    assert_eq!(
        r.sense.first().map(|b| b & 0x7F),
        Some(0x70),
        "fixed format expected"
    );
    assert_eq!(
        (r.sense[2] & 0x0F, r.sense[12], r.sense[13]),
        (key, asc, ascq),
        "sense: {:02x?}",
        r.sense
    );
}

/// READ(16) of `blocks` at `lba`.
pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// WRITE(16) of `blocks` at `lba`.
pub fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x8A;
    c
}

pub async fn read_blocks(t: &Target, n: &Arc<ItNexus>, lba: u64, blocks: u32) -> Vec<u8> {
    let r = run(t, n, &read16(lba, blocks), vec![]).await;
    assert_good(&r);
    r.data_in
}

pub async fn write_blocks(t: &Target, n: &Arc<ItNexus>, lba: u64, data: Vec<u8>, bs: usize) {
    let r = run(t, n, &write16(lba, (data.len() / bs) as u32), data).await;
    assert_good(&r);
}

/// A thin-provisioned in-memory driver: discard deallocates (reads zero), block_status reports
/// mapped / deallocated extents at `grain` bytes.
pub struct ThinDriver {
    data: Mutex<Vec<u8>>,
    mapped: Mutex<Vec<bool>>,
    grain: u64,
    pub discards: Mutex<Vec<(u64, u64)>>,
    pub flushes: std::sync::atomic::AtomicUsize,
    /// Says it cannot deallocate (DriverInfo::discard false): a fully provisioned LU over an
    /// image that still has holes.
    pub thick: bool,
    /// Once set, deallocation fails with `Unsupported` (a file system that stopped taking
    /// punches after the image was opened).
    pub refuse: std::sync::atomic::AtomicBool,
}

impl ThinDriver {
    pub fn new(size: u64, grain: u64) -> Self {
        ThinDriver {
            data: Mutex::new(vec![0; size as usize]),
            mapped: Mutex::new(vec![false; (size / grain) as usize]),
            grain,
            discards: Mutex::new(Vec::new()),
            flushes: Default::default(),
            thick: false,
            refuse: Default::default(),
        }
    }

    /// [`Self::new`], but saying it cannot deallocate (see [`Self::thick`]).
    pub fn thick(size: u64, grain: u64) -> Self {
        ThinDriver {
            thick: true,
            ..Self::new(size, grain)
        }
    }

    fn set_mapped(&self, offset: u64, len: u64, m: bool) {
        let mut map = self.mapped.lock().unwrap();
        for g in (offset / self.grain)..((offset + len).div_ceil(self.grain)) {
            map[g as usize] = m;
        }
    }
}

#[async_trait]
impl Driver for ThinDriver {
    fn allocation_unit(&self) -> u64 {
        self.grain
    }
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.data.lock().unwrap().len() as u64,
            discard: !self.thick,
            discard_zeroes: !self.thick,
            native_compare_and_write: 0,
        }
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let d = self.data.lock().unwrap();
        Ok(d[offset as usize..offset as usize + len].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), BlockError> {
        self.set_mapped(offset, data.len() as u64, true);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BlockError::Unsupported);
        }
        self.discards.lock().unwrap().push((offset, len));
        self.set_mapped(offset, len, false);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        if unmap {
            return self.discard(offset, len).await;
        }
        self.set_mapped(offset, len, true);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        let map = self.mapped.lock().unwrap();
        let first = (offset / self.grain) as usize;
        let m = map[first];
        let mut end = first;
        while end < map.len() && map[end] == m && ((end - first) as u64) * self.grain < len {
            end += 1;
        }
        Ok(Extent {
            len: (((end - first) as u64) * self.grain).min(len),
            mapped: m,
        })
    }
}

/// A driver whose every operation fails with the error `make` returns.
pub struct FailingDriver {
    pub size: u64,
    pub make: fn() -> BlockError,
}

#[async_trait]
impl Driver for FailingDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.size,
            discard: false,
            discard_zeroes: false,
            native_compare_and_write: 0,
        }
    }
    async fn read(&self, _: u64, _: usize) -> Result<Vec<u8>, BlockError> {
        Err((self.make)())
    }
    async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> Result<(), BlockError> {
        Err((self.make)())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Err((self.make)())
    }
    async fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err((self.make)())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Err((self.make)())
    }
    async fn block_status(&self, _: u64, _: u64) -> Result<Extent, BlockError> {
        Err((self.make)())
    }
}

/// A memory driver whose writes wait until the test opens the gate, recording FUA flags.
pub struct GatedDriver {
    pub inner: MemDriver,
    pub gate: tokio::sync::Semaphore,
    pub entered: tokio::sync::Notify,
    pub writes: Mutex<Vec<(u64, bool)>>,
}

impl GatedDriver {
    pub fn new(size: u64, open: bool) -> Self {
        GatedDriver {
            inner: MemDriver::new(size),
            gate: tokio::sync::Semaphore::new(if open { 1 << 20 } else { 0 }),
            entered: tokio::sync::Notify::new(),
            writes: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Driver for GatedDriver {
    fn info(&self) -> DriverInfo {
        self.inner.info()
    }
    async fn read(&self, o: u64, l: usize) -> Result<Vec<u8>, BlockError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.entered.notify_one();
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        self.writes.lock().unwrap().push((o, fua));
        self.inner.write(o, d, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.inner.discard(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(o, l, u).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Extent, BlockError> {
        self.inner.block_status(o, l).await
    }
}

/// A target over a [`GatedDriver`] of 64 blocks of 512 bytes, with two nexuses whose power-on
/// unit attentions are cleared.
pub async fn gated() -> (Arc<Target>, Arc<GatedDriver>, Arc<ItNexus>, Arc<ItNexus>) {
    let d = Arc::new(GatedDriver::new(64 * 512, false));
    let t = Arc::new(target_with(d.clone(), 512));
    let a = nexus();
    let b = nexus_named("iqn.1993-08.org.debian:01:b");
    ready(&t, &a).await;
    ready(&t, &b).await;
    (t, d, a, b)
}
