//! The device driven through rust-vmm's mock split queues in a `GuestMemoryMmap`, as a guest
//! driver would: requests, malformed chains, sense truncation, task management, events; and
//! the socket's connection life cycle with a vhost-user frontend.
//!
//! Expected bytes are literals from virtio 1.2 section 5.6 and SPC-5 / SBC-4.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::{Device, Gm, Mem, Vring};
use crate::{LunConfig, SocketConfig, VhostScsi};

const QSIZE: u16 = 32;
const CTRL_AT: u64 = 0x0;
const EVENT_AT: u64 = 0x4000;
const REQ_AT: u64 = 0x8000;
/// The second request queue, when the harness has two.
const REQ2_AT: u64 = 0xC000;
/// Response header with the default 96-byte sense buffer (virtio 5.6.6.1).
const RESP: u32 = 12 + 96;
/// Request header with the default 32-byte CDB.
const REQ: u32 = 19 + 32;

fn lu(blocks: u64) -> Arc<scsi::LogicalUnit> {
    lu_on(Arc::new(block::driver::mem::MemDriver::new(blocks * 512)))
}

/// A logical unit of 512-byte blocks on `driver`.
fn lu_on(driver: Arc<dyn block::Driver>) -> Arc<scsi::LogicalUnit> {
    let backend = block::Backend::new(driver, 512).unwrap();
    Arc::new(scsi::LogicalUnit::new(
        backend,
        scsi::LuConfig {
            vendor: "SHAREDSK".into(),
            product: "test".into(),
            revision: "0001".into(),
            serial: "vhost-test".into(),
            id: 0x1234,
        },
    ))
}

/// A socket (never created) with the test nexus and `luns`.
fn socket_config(num_queues: u16, threads: u16, luns: Vec<LunConfig>) -> SocketConfig {
    SocketConfig {
        path: "/nonexistent".into(),
        initiator_name: "vhost:test".into(),
        target_name: "iqn.2026-01.io.sharedisk:vhost".into(),
        relative_port_id: crate::FIRST_RELATIVE_PORT_ID,
        num_queues,
        threads,
        watch_max: crate::DEFAULT_WATCH_MAX,
        luns,
    }
}

struct Queue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    popped: u16,
    vring: Vring,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    gm: Gm,
    vs: VhostScsi,
    dev: Arc<Device>,
    lu: Arc<scsi::LogicalUnit>,
    ctrl: Queue,
    event: Queue,
    req: Queue,
    /// The second request queue (queue 3), with `num_queues` 2.
    req2: Option<Queue>,
    /// Request-queue threads: queue `2 + i` is served by thread `1 + i % threads`.
    threads: u16,
    /// Next free data address.
    heap: u64,
}

/// Lay out a split queue at `at` with the mock (zeroed rings), and a vring over it.
fn queue(gm: &Gm, at: u64) -> Queue {
    let m = gm.memory();
    let q = MockSplitQueue::create(&*m, GuestAddress(at), QSIZE);
    // The used ring right after the whole avail ring (flags, idx, QSIZE entries, used_event;
    // virtio 2.7.6), 4-byte aligned (2.7.2): the mock puts it inside the avail ring when
    // more than half of the avail entries are used.
    let used = (q.avail_addr().0 + 6 + 2 * u64::from(QSIZE) + 3) & !3;
    let v = Vring::new(gm.clone(), 1024).unwrap();
    v.set_queue_size(QSIZE);
    v.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, used)
        .unwrap();
    v.set_queue_ready(true);
    v.set_enabled(true);
    Queue {
        desc: q.desc_table_addr().0,
        avail: q.avail_addr().0,
        used,
        next_desc: 0,
        popped: 0,
        vring: v,
    }
}

/// A descriptor: device-readable unless `write`.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

/// A device-readable descriptor.
fn rd(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

/// A device-writable descriptor.
fn wr(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

impl Harness {
    fn new() -> Harness {
        Harness::with_lu(lu(64))
    }

    fn with_lu(lu: Arc<scsi::LogicalUnit>) -> Harness {
        Harness::with_queues(lu, 1, 1)
    }

    /// A harness whose device has `num_queues` request queues (1 or 2) served by `threads`
    /// threads.
    fn with_queues(lu: Arc<scsi::LogicalUnit>, num_queues: u16, threads: u16) -> Harness {
        let config = socket_config(
            num_queues,
            threads,
            vec![LunConfig {
                target: 0,
                lun: 0,
                lu: lu.clone(),
            }],
        );
        Harness::with_config(lu, config)
    }

    /// A harness whose device serves `config` (its `num_queues` 1 or 2) with `lu` in it.
    fn with_config(lu: Arc<scsi::LogicalUnit>, config: SocketConfig) -> Harness {
        let (num_queues, threads) = (config.num_queues, config.threads);
        assert!(num_queues == 1 || num_queues == 2);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mem: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let gm: Gm = GuestMemoryAtomic::new(mem);
        let vs = VhostScsi::new(config, rt.handle().clone()).unwrap();
        let dev = Device::new(vs.shared.clone(), gm.clone(), Arc::default());
        dev.acked_features(dev.features());
        *crate::device::lock(&vs.shared.current) = Some(dev.clone());
        Harness {
            ctrl: queue(&gm, CTRL_AT),
            event: queue(&gm, EVENT_AT),
            req: queue(&gm, REQ_AT),
            req2: (num_queues == 2).then(|| queue(&gm, REQ2_AT)),
            threads,
            rt,
            gm,
            vs,
            dev,
            lu,
            heap: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.heap;
        self.heap += (u64::from(len) + 0xFFF) & !0xFFF;
        a
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.gm
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    fn get(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.gm
            .memory()
            .read_slice(&mut b, GuestAddress(addr))
            .unwrap();
        b
    }

    fn queue(&mut self, which: usize) -> &mut Queue {
        match which {
            0 => &mut self.ctrl,
            1 => &mut self.event,
            2 => &mut self.req,
            _ => self.req2.as_mut().expect("a second request queue"),
        }
    }

    /// The worker thread of request queue `which` (2 or 3) and its index among the thread's
    /// vrings, as vhost-user-backend deals them out from `queues_per_thread`.
    fn thread_of(&self, which: usize) -> (usize, u16) {
        let t = usize::from(self.threads);
        (1 + (which - 2) % t, ((which - 2) / t) as u16)
    }

    /// The vrings of request-queue thread `thread`, in queue order.
    fn thread_vrings(&self, thread: usize) -> Vec<Vring> {
        let mut v = vec![self.req.vring.clone()];
        v.extend(self.req2.as_ref().map(|q| q.vring.clone()));
        (2..2 + v.len())
            .zip(v)
            .filter(|&(q, _)| self.thread_of(q).0 == thread)
            .map(|(_, v)| v)
            .collect()
    }

    /// Make raw descriptors `raw` (the first is the head) available on `which` (0 control,
    /// 1 event, 2 request), at descriptor index `base` on: a split queue as a driver fills
    /// it (virtio 2.7.5 and 2.7.6).
    fn publish(&mut self, which: usize, base: u16, raw: &[(u64, u32, u16, u16)]) {
        let gm = self.gm.clone();
        let m = gm.memory();
        let q = self.queue(which);
        for (i, &(addr, len, flags, next)) in raw.iter().enumerate() {
            let at = q.desc + 16 * u64::from(base + i as u16);
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&d, GuestAddress(at)).unwrap();
        }
        let idx: u16 = m.read_obj(GuestAddress(q.avail + 2)).unwrap();
        m.write_obj(base, GuestAddress(q.avail + 4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(q.avail + 2))
            .unwrap();
        q.next_desc = (base + raw.len() as u16) % QSIZE;
    }

    /// Make `descs` one available chain on `which`.
    fn add_chain(&mut self, which: usize, descs: &[D]) {
        let base = self.queue(which).next_desc;
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = if d.write {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { base + i as u16 + 1 };
                (d.addr, d.len, flags, next)
            })
            .collect();
        self.publish(which, base, &raw);
    }

    /// An indirect descriptor table (virtio 2.7.5.3) holding `descs`; returns its address.
    fn indirect(&mut self, descs: &[D]) -> u64 {
        let a = self.alloc(16 * descs.len() as u32);
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.put(a + 16 * i as u64, &raw);
        }
        a
    }

    /// Hold every request's completion (after the SCSI layer answered, before the guest is
    /// written) until the returned sender says `true`.
    fn hold(&self) -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        *self.dev.hooks.before_complete.lock().unwrap() = Some(rx);
        tx
    }

    /// Wait until `n` requests reached the hold.
    fn wait_reached(&self, n: usize) {
        wait_count(&self.dev.hooks.reached, n, "not reached");
    }

    fn reached(&self) -> usize {
        self.dev
            .hooks
            .reached
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait for a completion to wake the request queue's thread, then deliver the wake as its
    /// epoll loop does.
    fn wake_request_queue(&self) {
        self.wake_thread(1);
    }

    /// Wait for a completion to wake request-queue thread `thread`, then deliver the wake as
    /// its epoll loop does.
    fn wake_thread(&self, thread: usize) {
        let start = Instant::now();
        while !self.dev.wake_pending(thread) {
            assert!(start.elapsed() < Duration::from_secs(10), "no wake");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.dev
            .handle_event(
                self.dev.wake_event(),
                EventSet::IN,
                &self.thread_vrings(thread),
                thread,
            )
            .unwrap();
    }

    /// [`Self::kick`] of request queue `which` on a thread of its own, which it returns.
    fn kick_in_thread(&self, which: usize) -> std::thread::JoinHandle<()> {
        let (thread, local) = self.thread_of(which);
        let (dev, vrings) = (self.dev.clone(), self.thread_vrings(thread));
        std::thread::spawn(move || {
            dev.handle_event(local, EventSet::IN, &vrings, thread)
                .unwrap();
        })
    }

    fn kick(&self, which: usize) {
        let r = match which {
            0 => self.dev.handle_event(
                0,
                EventSet::IN,
                &[self.ctrl.vring.clone(), self.event.vring.clone()],
                0,
            ),
            1 => self.dev.handle_event(
                1,
                EventSet::IN,
                &[self.ctrl.vring.clone(), self.event.vring.clone()],
                0,
            ),
            q => {
                let (thread, local) = self.thread_of(q);
                self.dev
                    .handle_event(local, EventSet::IN, &self.thread_vrings(thread), thread)
            }
        };
        r.unwrap();
    }

    /// Wait for the next used element of `which`: (head, len).
    fn wait_used(&mut self, which: usize) -> (u32, u32) {
        let gm = self.gm.clone();
        let q = self.queue(which);
        let start = Instant::now();
        while gm
            .memory()
            .read_obj::<u16>(GuestAddress(q.used + 2))
            .unwrap()
            == q.popped
        {
            assert!(start.elapsed() < Duration::from_secs(10), "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = q.used + 4 + 8 * u64::from(q.popped % QSIZE);
        let m = gm.memory();
        let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
        q.popped = q.popped.wrapping_add(1);
        (id, len)
    }

    fn used_count(&mut self, which: usize) -> u16 {
        let gm = self.gm.clone();
        let q = self.queue(which);
        gm.memory().read_obj(GuestAddress(q.used + 2)).unwrap()
    }

    /// A request header for `lun` (8 bytes), tag, CDB.
    fn header(&mut self, lun: [u8; 8], tag: u64, cdb: &[u8]) -> u64 {
        let mut h = vec![0u8; REQ as usize];
        h[0..8].copy_from_slice(&lun);
        h[8..16].copy_from_slice(&tag.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        let a = self.alloc(REQ);
        self.put(a, &h);
        a
    }

    /// Run one command: data-out in one descriptor (if any), data-in of `din` bytes in one
    /// descriptor (if any). Returns (used len, response header, data-in).
    fn command(
        &mut self,
        lun: [u8; 8],
        cdb: &[u8],
        dout: &[u8],
        din: u32,
    ) -> (u32, Vec<u8>, Vec<u8>) {
        let h = self.header(lun, 7, cdb);
        let mut descs = vec![rd(h, REQ)];
        if !dout.is_empty() {
            let a = self.alloc(dout.len() as u32);
            self.put(a, dout);
            descs.push(rd(a, dout.len() as u32));
        }
        let r = self.alloc(RESP);
        descs.push(wr(r, RESP));
        let d = self.alloc(din.max(1));
        if din > 0 {
            descs.push(wr(d, din));
        }
        self.add_chain(2, &descs);
        self.kick(2);
        let (_, len) = self.wait_used(2);
        (len, self.get(r, RESP), self.get(d, din))
    }

    /// What the LU's block layer holds at `lba`, `blocks` long.
    fn stored(&self, lba: u64, blocks: u32) -> Vec<u8> {
        let lu = self.lu.clone();
        self.rt
            .block_on(async move { lu.backend().read(lba, blocks).await.expect("read") })
    }

    /// Clear the power-on unit attention of the socket's nexus.
    fn tur(&mut self) -> (u32, Vec<u8>) {
        let (len, resp, _) = self.command(LUN0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        (len, resp)
    }

    /// Put task management function `subtype` for `lun`'s `tag` on the control queue and kick
    /// it, without waiting: the response byte's address and the control queue's used index
    /// before it.
    fn send_tmf(&mut self, subtype: u32, lun: [u8; 8], tag: u64) -> (u64, u16) {
        let mut req = [0u8; 24];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..16].copy_from_slice(&lun);
        req[16..24].copy_from_slice(&tag.to_le_bytes());
        let a = self.alloc(24);
        self.put(a, &req);
        let tr = self.alloc(1);
        self.put(tr, &[0xEE]);
        self.add_chain(0, &[rd(a, 24), wr(tr, 1)]);
        let ctrl0 = self.used_count(0);
        self.kick(0);
        (tr, ctrl0)
    }

    /// Wait until the control queue's used index moves past `ctrl0`.
    fn wait_control_used(&mut self, ctrl0: u16) {
        let start = Instant::now();
        while self.used_count(0) == ctrl0 {
            assert!(start.elapsed() < Duration::from_secs(10), "no TMF response");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn tmf(&mut self, subtype: u32, lun: [u8; 8], tag: u64) -> (u32, u8) {
        let (r, _) = self.send_tmf(subtype, lun, tag);
        let (_, len) = self.wait_used(0);
        (len, self.get(r, 1)[0])
    }
}

/// Target 0, LUN 0 as Linux addresses it: flat space addressing (0x40 in byte 2).
const LUN0: [u8; 8] = [1, 0, 0x40, 0, 0, 0, 0, 0];

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn power_on_unit_attention_then_good_with_sense_truncated_to_sense_size() {
    let mut h = Harness::new();
    // The driver shrinks the sense buffer to 8 bytes (virtio 5.6.4: sense_size is writable).
    h.dev.set_config(20, &[8, 0, 0, 0]).unwrap();
    assert_eq!(h.dev.get_config(20, 4), vec![8, 0, 0, 0]);
    let h2 = h.header(LUN0, 1, &[0x00, 0, 0, 0, 0, 0]);
    let r = h.alloc(20);
    h.add_chain(2, &[rd(h2, REQ), wr(r, 20)]);
    h.kick(2);
    let (_, len) = h.wait_used(2);
    assert_eq!(len, 20);
    let resp = h.get(r, 20);
    // sense_len 8, resid 0, status_qualifier 0, status CHECK CONDITION (02h), response OK.
    assert_eq!(&resp[0..12], &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0]);
    // Fixed format sense (SPC-5 4.4.3), cut to 8 bytes: 70h, 0, UNIT ATTENTION (6h), INFORMATION,
    // ADDITIONAL SENSE LENGTH 0Ah. The ASC (29h POWER ON, RESET) is past the cut.
    assert_eq!(&resp[12..20], &[0x70, 0, 0x06, 0, 0, 0, 0, 0x0A]);
    // Back to 96 bytes: the next TEST UNIT READY is GOOD.
    h.dev.set_config(20, &[96, 0, 0, 0]).unwrap();
    let (len, resp) = h.tur();
    assert_eq!(len, RESP);
    assert_eq!(&resp[0..12], &[0; 12]);
    // Read-only fields refuse writes.
    assert!(h.dev.set_config(0, &[4, 0, 0, 0]).is_err());
    assert!(h.dev.set_config(20, &[0, 1, 0, 0]).is_err());
}

/// The driver may shrink the CDB field (virtio 1.2 5.6.4: cdb_size is writable): a request
/// header is then 19 + cdb_size bytes, and what follows it in the chain is data-out.
#[test]
fn the_cdb_size_the_driver_writes_is_where_the_data_out_begins() {
    let mut h = Harness::new();
    h.tur();
    // cdb_size is the 4 bytes at offset 24 of the config space (virtio 1.2 5.6.4).
    h.dev.set_config(24, &[16, 0, 0, 0]).unwrap();
    assert_eq!(h.dev.get_config(24, 4), vec![16, 0, 0, 0]);
    // One device-readable descriptor: a 35-byte header (LUN 8, tag 8, task attribute, prio,
    // crn, CDB 16) whose CDB is WRITE(10) LBA 3, 1 block (SBC-4 5.40), then the 512 bytes of
    // data-out. Read as a 51-byte header, 16 bytes of data would be taken for the CDB and the
    // rest would fall short of the block (VIRTIO_SCSI_S_OVERRUN).
    let data: Vec<u8> = (0..512u32).map(|i| (i * 13 % 251) as u8).collect();
    let mut req = vec![0u8; 35];
    req[0..8].copy_from_slice(&LUN0);
    req[8..16].copy_from_slice(&9u64.to_le_bytes());
    req[19..29].copy_from_slice(&[0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0]);
    req.extend_from_slice(&data);
    let a = h.alloc(req.len() as u32);
    h.put(a, &req);
    let r = h.alloc(RESP);
    h.put(r, &[0xEE; 12]);
    h.add_chain(2, &[rd(a, req.len() as u32), wr(r, RESP)]);
    h.kick(2);
    let (_, len) = h.wait_used(2);
    assert_eq!(len, RESP);
    // sense_len 0, resid 0, status_qualifier 0, status GOOD, response VIRTIO_SCSI_S_OK.
    assert_eq!(&h.get(r, 12), &[0; 12]);
    assert_eq!(h.stored(3, 1), data);
    // 0, and 261 (more than the longest CDB, a variable-length one of 260 bytes), are
    // refused, and the size stays.
    assert!(h.dev.set_config(24, &[0, 0, 0, 0]).is_err());
    assert!(h.dev.set_config(24, &[5, 1, 0, 0]).is_err());
    assert_eq!(h.dev.get_config(24, 4), vec![16, 0, 0, 0]);
    h.dev.set_config(24, &[4, 1, 0, 0]).unwrap();
    assert_eq!(h.dev.get_config(24, 4), vec![4, 1, 0, 0], "260 is taken");
}

#[test]
fn write_and_read_round_trip_with_residuals() {
    let mut h = Harness::new();
    h.tur();
    // WRITE(10) LBA 1, 2 blocks (SBC-4 5.40), data-out over two descriptors.
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let hd = h.header(LUN0, 2, &[0x2A, 0, 0, 0, 0, 1, 0, 0, 2, 0]);
    let (a, b) = (h.alloc(300), h.alloc(724));
    h.put(a, &data[..300]);
    h.put(b, &data[300..]);
    let r = h.alloc(RESP);
    h.add_chain(2, &[rd(hd, REQ), rd(a, 300), rd(b, 724), wr(r, RESP)]);
    h.kick(2);
    let (_, len) = h.wait_used(2);
    assert_eq!(len, RESP);
    assert_eq!(&h.get(r, 12), &[0; 12]);
    // The block layer has it.
    let stored = h.stored(1, 2);
    assert_eq!(stored, data);

    // READ(10) LBA 1, 2 blocks into two data-in descriptors.
    let hd = h.header(LUN0, 3, &[0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0]);
    let r = h.alloc(RESP);
    let (a, b) = (h.alloc(512), h.alloc(512));
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(a, 512), wr(b, 512)]);
    h.kick(2);
    let (_, len) = h.wait_used(2);
    assert_eq!(len, RESP + 1024, "used length: response header and data-in");
    assert_eq!(&h.get(r, 12), &[0; 12]);
    assert_eq!([h.get(a, 512), h.get(b, 512)].concat(), data);

    // READ(10) of 1 block into a 1024-byte buffer: underrun, resid 512.
    let (len, resp, din) = h.command(LUN0, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[], 1024);
    assert_eq!(len, RESP + 512);
    assert_eq!(&resp[0..12], &[0, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&din[..512], &data[..512]);

    // READ(10) of 2 blocks into a 512-byte buffer: VIRTIO_SCSI_S_OVERRUN (1) (virtio 5.6.6.1:
    // the CDB requires more data than the buffers hold), and nothing is read.
    let (len, resp, din) = h.command(LUN0, &[0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0], &[], 512);
    assert_eq!(len, RESP);
    assert_eq!(resp[11], 1, "VIRTIO_SCSI_S_OVERRUN");
    assert_eq!(din, vec![0; 512], "nothing read into the buffer");
    // READ(6) with TRANSFER LENGTH 0 reads 256 blocks (SBC-4 5.15): not into 128 KiB - 512.
    let (len, resp, _) = h.command(LUN0, &[0x08, 0, 0, 0, 0, 0], &[], 255 * 512);
    assert_eq!((len, resp[11]), (RESP, 1));

    // WRITE(10) of 1 block with 1024 bytes of data-out: the first block is written, resid 512.
    let (len, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0], &[0xAB; 1024], 0);
    assert_eq!(len, RESP);
    assert_eq!(&resp[0..12], &[0, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);

    // WRITE(10) of 2 blocks with only 512 bytes of data-out: VIRTIO_SCSI_S_OVERRUN (1)
    // (virtio 5.6.6.1: the CDB requires more data than the buffers hold), and nothing is
    // written.
    let (len, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 5, 0, 0, 2, 0], &[0xCD; 512], 0);
    assert_eq!(len, RESP);
    assert_eq!(resp[11], 1, "VIRTIO_SCSI_S_OVERRUN");
    let stored = h.stored(5, 2);
    assert_eq!(stored, vec![0; 1024], "not written");
}

/// A socket configured without the avail-ring watch (`watch_max` zero) never watches, and
/// serves each request on its kick.
#[test]
fn a_socket_without_a_watch_serves_each_request_on_its_kick() {
    let lu = lu(64);
    let mut config = socket_config(
        1,
        1,
        vec![LunConfig {
            target: 0,
            lun: 0,
            lu: lu.clone(),
        }],
    );
    config.watch_max = Duration::ZERO;
    let mut h = Harness::with_config(lu, config);
    let windows = |h: &Harness| -> Vec<Duration> { h.dev.watch_windows() };
    assert_eq!(windows(&h), [Duration::ZERO; 2]);
    h.tur();
    for tag in 2..6u64 {
        // WRITE(10) LBA `tag`, 1 block (SBC-4 5.40), then READ(10) of it (SBC-4 5.16).
        let block = vec![tag as u8; 512];
        let hd = h.header(LUN0, tag, &[0x2A, 0, 0, 0, 0, tag as u8, 0, 0, 1, 0]);
        let (a, r) = (h.alloc(512), h.alloc(RESP));
        h.put(a, &block);
        h.add_chain(2, &[rd(hd, REQ), rd(a, 512), wr(r, RESP)]);
        h.kick(2);
        assert_eq!(h.wait_used(2).1, RESP);
        assert_eq!(&h.get(r, 12), &[0; 12]);
        let hd = h.header(LUN0, 100 + tag, &[0x28, 0, 0, 0, 0, tag as u8, 0, 0, 1, 0]);
        let (r, d) = (h.alloc(RESP), h.alloc(512));
        h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 512)]);
        h.kick(2);
        assert_eq!(h.wait_used(2).1, RESP + 512);
        assert_eq!(h.get(d, 512), block);
    }
    assert_eq!(
        windows(&h),
        [Duration::ZERO; 2],
        "no kick grows a window of no maximum"
    );
}

/// `watch_max` up to 10 ms is served; beyond, the socket is refused with the reason.
#[test]
fn a_watch_longer_than_the_limit_is_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let config = |us: u64| {
        let mut c = socket_config(1, 1, Vec::new());
        c.watch_max = Duration::from_micros(us);
        c
    };
    assert!(VhostScsi::new(config(10_000), rt.handle().clone()).is_ok());
    assert!(VhostScsi::new(config(0), rt.handle().clone()).is_ok());
    let e = VhostScsi::new(config(10_001), rt.handle().clone())
        .err()
        .expect("refused");
    assert_eq!(e, crate::ConfigError::Watch(10_001));
    assert_eq!(
        e.to_string(),
        "the avail-ring watch (watch_us; quick start: --vhost-watch-us) must be 0 to 10000 µs, not 10001 µs"
    );
}

#[test]
fn malformed_chains_get_failure_or_nothing() {
    let mut h = Harness::new();
    h.tur();
    let hd = h.header(LUN0, 4, &[0x00, 0, 0, 0, 0, 0]);
    let r = h.alloc(RESP);

    // A readable descriptor after a writable one (virtio 2.7.4.2): returned with length 0,
    // nothing written.
    h.put(r, &[0xEE; 12]);
    h.add_chain(2, &[wr(r, RESP), rd(hd, REQ)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, 0);
    assert_eq!(h.get(r, 12), vec![0xEE; 12]);

    // No room for the response header: length 0.
    h.add_chain(2, &[rd(hd, REQ), wr(r, 50)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, 0);

    // A request header shorter than 19 + cdb_size: VIRTIO_SCSI_S_FAILURE (9).
    h.add_chain(2, &[rd(hd, 20), wr(r, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r, 12), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);

    // Data-out outside guest memory: VIRTIO_SCSI_S_FAILURE, the daemon keeps running.
    let hw = h.header(LUN0, 5, &[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0]);
    h.add_chain(2, &[rd(hw, REQ), rd((4 << 20) - 100, 512), wr(r, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r, 12)[11], 9);

    // A response descriptor outside guest memory: nothing can be written; length 0.
    h.add_chain(2, &[rd(hd, REQ), wr(u64::MAX - 10, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, 0);

    // A chain that loops on itself: the iterator stops after the queue size; readable only,
    // so there is no response room.
    let base = h.req.next_desc;
    h.publish(2, base, &[(hd, REQ, VRING_DESC_F_NEXT as u16, base)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, 0);

    // A WRITE(10) of 1 block with 2 GiB of data-out, most of it outside guest memory: only
    // the block the CDB asks for is taken (from inside memory) and written; the rest is the
    // residual (0x7FFF_FFFF - 512, little-endian at bytes 4..8), S_OK, GOOD.
    h.add_chain(2, &[rd(hw, REQ), rd(0x20_0000, u32::MAX / 2), wr(r, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(
        h.get(r, 12),
        vec![0, 0, 0, 0, 0xFF, 0xFD, 0xFF, 0x7F, 0, 0, 0, 0]
    );

    // Still serving.
    let (len, resp) = h.tur();
    assert_eq!((len, resp[11], resp[10]), (RESP, 0, 0));
}

/// An avail index more than a queue size ahead of the device (virtio 2.7.13.3 forbids it)
/// cannot be popped; the request queue's thread must not spin on it (found by the
/// `vhost_queues` fuzz target: the thread looped at 100% CPU forever).
#[test]
fn an_avail_index_beyond_the_queue_size_stalls_the_queue_without_spinning() {
    let mut h = Harness::new();
    h.tur();
    let used_before = h.used_count(2);
    let idx: u16 =
        h.gm.memory()
            .read_obj(GuestAddress(h.req.avail + 2))
            .unwrap();
    h.gm.memory()
        .write_obj(idx.wrapping_add(QSIZE + 5), GuestAddress(h.req.avail + 2))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dev = h.dev.clone();
    let vring = h.req.vring.clone();
    std::thread::spawn(move || {
        let r = dev.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 1);
        let _ = tx.send(r.is_ok());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the kick must return"
    );
    // Nothing was popped or answered.
    assert_eq!(h.used_count(2), used_before);
}

/// Two virtio targets behind one socket (a config file may do that): each request goes to
/// the LU its LUN field addresses, and max_target tells the driver to scan both.
#[test]
fn each_virtio_target_of_a_socket_is_its_own_lu() {
    let (l0, l1) = (lu(64), lu(64));
    let config = socket_config(
        1,
        1,
        vec![
            LunConfig {
                target: 0,
                lun: 0,
                lu: l0.clone(),
            },
            LunConfig {
                target: 1,
                lun: 0,
                lu: l1.clone(),
            },
        ],
    );
    let mut h = Harness::with_config(l0, config);
    // max_target (u16 at offset 30 of the config space, virtio 1.2 5.6.4) is 1.
    assert_eq!(h.dev.get_config(30, 2), vec![1, 0]);
    // Target 1, LUN 0 in the LUN field: [1, target, 40h | LUN >> 8, LUN & FFh, 0...].
    let t1 = [1, 1, 0x40, 0, 0, 0, 0, 0];
    for target in [LUN0, t1] {
        // Each target's LU has its own power-on unit attention for the nexus: TEST UNIT
        // READY is CHECK CONDITION (02h) once, then GOOD.
        let tur = |h: &mut Harness| h.command(target, &[0x00, 0, 0, 0, 0, 0], &[], 0).1[10];
        assert_eq!(tur(&mut h), 0x02);
        assert_eq!(tur(&mut h), 0);
    }
    // WRITE(10) LBA 5, 1 block (SBC-4 5.40): a pattern through target 0, then other data
    // through target 1, each GOOD; each lands on its own target's LU.
    let pattern = vec![0x3Cu8; 512];
    let (_, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 5, 0, 0, 1, 0], &pattern, 0);
    assert_eq!(&resp[..12], &[0; 12]);
    let data = vec![0xA5u8; 512];
    let (_, resp, _) = h.command(t1, &[0x2A, 0, 0, 0, 0, 5, 0, 0, 1, 0], &data, 0);
    assert_eq!(&resp[..12], &[0; 12]);
    let on = |l: &Arc<scsi::LogicalUnit>| {
        let l = l.clone();
        h.rt.block_on(async move { l.backend().read(5, 1).await.expect("read") })
    };
    assert_eq!(on(&l1), data);
    assert_eq!(on(&h.lu), pattern);
    // READ(10) of the same block through target 0 reads target 0's LU: GOOD, the pattern.
    let (_, resp, din) = h.command(LUN0, &[0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0], &[], 512);
    assert_eq!(&resp[..12], &[0; 12]);
    assert_eq!(din, pattern);
}

#[test]
fn unknown_target_and_lun() {
    let mut h = Harness::new();
    h.tur();
    // Target 5 does not exist: VIRTIO_SCSI_S_BAD_TARGET (3).
    let (len, resp, _) = h.command([1, 5, 0x40, 0, 0, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((len, resp[11]), (RESP, 3));
    // Byte 0 other than 1: BAD_TARGET.
    let (_, resp, _) = h.command([0, 0, 0x40, 0, 0, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp[11], 3);
    // LUN 7 of target 0: the SCSI layer answers, CHECK CONDITION, ILLEGAL REQUEST, LOGICAL
    // UNIT NOT SUPPORTED (25h/00h, SPC-5 table 49).
    let (_, resp, _) = h.command([1, 0, 0x40, 7, 0, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp[10..12], [0x02, 0]);
    assert_eq!(resp[12 + 2] & 0x0F, 0x05);
    assert_eq!(resp[12 + 12..12 + 14], [0x25, 0x00]);
    // REPORT LUNS (SPC-5 6.33) on LUN 0: one LUN, 0.
    let (len, resp, din) = h.command(LUN0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[], 16);
    assert_eq!((len, resp[10], resp[11]), (RESP + 16, 0, 0));
    assert_eq!(din, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn task_management_and_async_notification() {
    let mut h = Harness::new();
    h.tur();
    // LOGICAL UNIT RESET (subtype 5): VIRTIO_SCSI_S_FUNCTION_COMPLETE (0), one byte used.
    assert_eq!(h.tmf(5, LUN0, 0), (1, 0));
    // SAM-5 6.3.5: the next command reports BUS DEVICE RESET FUNCTION OCCURRED (29h/03h).
    let (_, resp) = h.tur();
    assert_eq!(resp[10], 0x02);
    assert_eq!(resp[12 + 12..12 + 14], [0x29, 0x03]);
    // ABORT TASK (0) of a tag not in the task set: FUNCTION COMPLETE.
    assert_eq!(h.tmf(0, LUN0, 99), (1, 0));
    // QUERY TASK (6) of that tag: FUNCTION COMPLETE (not found); QUERY TASK SET (7) likewise.
    assert_eq!(h.tmf(6, LUN0, 99), (1, 0));
    assert_eq!(h.tmf(7, LUN0, 0), (1, 0));
    // CLEAR ACA (2): no ACA, FUNCTION REJECTED (11).
    assert_eq!(h.tmf(2, LUN0, 0), (1, 11));
    // A LUN without a logical unit: INCORRECT LUN (12); a target that does not exist: BAD
    // TARGET (3); an unknown subtype: FUNCTION REJECTED.
    assert_eq!(h.tmf(5, [1, 0, 0x40, 9, 0, 0, 0, 0], 0), (1, 12));
    assert_eq!(h.tmf(5, [1, 4, 0x40, 0, 0, 0, 0, 0], 0), (1, 3));
    assert_eq!(h.tmf(42, LUN0, 0), (1, 11));
    // I_T NEXUS RESET (4): complete; the nexus then sees I_T NEXUS LOSS OCCURRED (29h/07h).
    assert_eq!(h.tmf(4, LUN0, 0), (1, 0));
    let (_, resp) = h.tur();
    assert_eq!(resp[12 + 12..12 + 14], [0x29, 0x07]);

    // AN_QUERY (type 1): event_actual 0, response OK; 5 bytes used.
    let mut req = [0u8; 16];
    req[0] = 1;
    req[4..12].copy_from_slice(&LUN0);
    req[12] = 0xFF;
    let a = h.alloc(16);
    h.put(a, &req);
    let r = h.alloc(5);
    h.put(r, &[0xEE; 5]);
    h.add_chain(0, &[rd(a, 16), wr(r, 5)]);
    h.kick(0);
    assert_eq!(h.wait_used(0).1, 5);
    assert_eq!(h.get(r, 5), vec![0, 0, 0, 0, 0]);
}

#[test]
fn abort_task_of_a_running_command_does_not_block_the_request_queue() {
    let mut h = Harness::new();
    h.tur();
    // Many commands in flight, then a LOGICAL UNIT RESET while more arrive: every chain comes
    // back (OK or ABORTED), the reset completes, and the queue keeps serving.
    let mut sent = 0;
    for i in 0..8u64 {
        let hd = h.header(LUN0, 100 + i, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
        let r = h.alloc(RESP);
        let d = h.alloc(4096);
        h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 4096)]);
        sent += 1;
    }
    h.kick(2);
    assert_eq!(h.tmf(5, LUN0, 0), (1, 0));
    for _ in 0..sent {
        h.wait_used(2);
    }
    let (_, resp) = h.tur();
    assert_eq!(resp[12 + 12..12 + 14], [0x29, 0x03]);
    let (_, resp) = h.tur();
    assert_eq!(resp[10..12], [0, 0]);
}

/// virtio 5.6.6.3.3: a parameter change is an event VIRTIO_SCSI_T_PARAM_CHANGE (3) naming the
/// LUN, with the unit attention's ASC in bits 7..0 of the reason and its ASCQ in bits 15..8.
#[test]
fn a_parameter_change_is_posted_with_its_asc_and_ascq() {
    let mut h = Harness::new();
    let e = h.alloc(16);
    h.add_chain(1, &[wr(e, 16)]);
    h.kick(1);
    h.vs.param_change(0, 0, 0x2A, 0x09);
    assert_eq!(h.wait_used(1), (0, 16));
    // event 3; lun [1, target 0, 00h, 00h, 0...]; reason 092Ah, little-endian.
    assert_eq!(
        h.get(e, 16),
        vec![3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x2A, 0x09, 0, 0]
    );
}

/// Events go only to a driver that negotiated their feature (virtio 1.2 5.6.6.3: transport
/// reset events with VIRTIO_SCSI_F_HOTPLUG, parameter changes with VIRTIO_SCSI_F_CHANGE); a
/// driver without it keeps its event buffers, and is not told of events lost.
#[test]
fn events_go_only_to_a_driver_that_negotiated_their_feature() {
    let mut h = Harness::new();
    let all = h.dev.features();
    // Feature bits 1 (VIRTIO_SCSI_F_HOTPLUG) and 2 (VIRTIO_SCSI_F_CHANGE).
    let (hotplug, change) = (1u64 << 1, 1u64 << 2);
    let e = h.alloc(16);
    h.add_chain(1, &[wr(e, 16)]);
    h.kick(1);
    h.dev.acked_features(all & !(hotplug | change));
    h.vs.add_lu(0, 1, lu(8)).unwrap();
    h.vs.param_change(0, 0, 0x2A, 0x09);
    assert_eq!(h.used_count(1), 0, "neither feature: no event");
    h.dev.acked_features(all & !hotplug);
    assert!(h.vs.remove_lu(0, 1).is_some());
    assert_eq!(
        h.used_count(1),
        0,
        "no VIRTIO_SCSI_F_HOTPLUG: no transport reset"
    );
    h.vs.param_change(0, 0, 0x2A, 0x09);
    assert_eq!(h.wait_used(1), (0, 16));
    // event VIRTIO_SCSI_T_PARAM_CHANGE (3), without VIRTIO_SCSI_T_EVENTS_MISSED (8000_0000h).
    assert_eq!(le32(&h.get(e, 16), 0), 3);
    let e = h.alloc(16);
    h.add_chain(1, &[wr(e, 16)]);
    h.dev.acked_features(all & !change);
    h.vs.param_change(0, 0, 0x2A, 0x09);
    assert_eq!(
        h.used_count(1),
        1,
        "no VIRTIO_SCSI_F_CHANGE: no parameter change"
    );
    h.vs.add_lu(0, 1, lu(8)).unwrap();
    assert_eq!(h.wait_used(1), (1, 16));
    // event VIRTIO_SCSI_T_TRANSPORT_RESET (1), reason RESCAN (1) at byte 12.
    let ev = h.get(e, 16);
    assert_eq!((le32(&ev, 0), le32(&ev, 12)), (1, 1));
}

/// An LU served at two places of one socket (a config file may do that) is still reached
/// through the socket's port when one of them is removed, and no longer when both are.
#[test]
fn the_socket_port_stays_with_an_lu_until_its_last_place_goes() {
    let l = lu(8);
    let h = Harness::with_lu(l.clone());
    let through_socket = |l: &Arc<scsi::LogicalUnit>| {
        l.target_ports()
            .iter()
            .any(|p| p.transport == scsi::Transport::Vhost)
    };
    h.vs.add_lu(0, 1, l.clone()).unwrap();
    assert!(h.vs.remove_lu(0, 1).is_some());
    assert!(through_socket(&l), "still served at target 0 LUN 0");
    assert!(h.vs.remove_lu(0, 0).is_some());
    assert!(!through_socket(&l));
}

#[test]
fn hotplug_events_in_kept_buffers() {
    let mut h = Harness::new();
    // The driver gives two event buffers and kicks (virtio 5.6.6.3).
    let e1 = h.alloc(16);
    let e2 = h.alloc(16);
    h.add_chain(1, &[wr(e1, 16)]);
    h.add_chain(1, &[wr(e2, 16)]);
    h.kick(1);
    assert_eq!(h.used_count(1), 0, "buffers are kept until an event");

    let added = lu(8);
    h.vs.add_lu(0, 1, added.clone()).unwrap();
    assert_eq!(h.wait_used(1), (0, 16));
    // REGISTER AND MOVE may name the socket's port while the LU is there, and not after.
    let through_socket = |l: &Arc<scsi::LogicalUnit>| {
        l.target_ports()
            .iter()
            .any(|p| p.transport == scsi::Transport::Vhost)
    };
    assert!(through_socket(&added));
    // event VIRTIO_SCSI_T_TRANSPORT_RESET (1), lun [1, 0, 00h, 01h, 0...] (LUN 1 as REPORT
    // LUNS gives it: peripheral device addressing), reason RESCAN (1).
    assert_eq!(
        h.get(e1, 16),
        vec![1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    );
    // The new LU answers.
    let (_, resp, _) = h.command([1, 0, 0x40, 1, 0, 0, 0, 0], &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp[11], 0);
    assert!(h.vs.add_lu(0, 1, lu(8)).is_err(), "occupied");
    assert!(h.vs.add_lu(3, 0, lu(8)).is_err(), "above max_target");

    assert!(h.vs.remove_lu(0, 1).is_some());
    assert!(!through_socket(&added));
    assert_eq!(h.wait_used(1), (1, 16));
    // reason REMOVED (2).
    assert_eq!(
        h.get(e2, 16),
        vec![1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0]
    );
    assert!(h.vs.remove_lu(0, 1).is_none());

    // No buffer left: the next event is lost, and the next buffer reports
    // VIRTIO_SCSI_T_NO_EVENT with VIRTIO_SCSI_T_EVENTS_MISSED (8000_0000h).
    h.vs.add_lu(0, 2, lu(8)).unwrap();
    let e3 = h.alloc(16);
    h.add_chain(1, &[wr(e3, 16)]);
    h.kick(1);
    assert_eq!(h.wait_used(1).1, 16);
    assert_eq!(le32(&h.get(e3, 16), 0), 0x8000_0000);
}

#[test]
fn adding_or_removing_an_lu_is_a_reported_luns_change_on_the_others() {
    let mut h = Harness::new();
    // Take what is pending on LUN 0 (the nexus's power on).
    for _ in 0..4 {
        if h.tur().1[10] == 0 {
            break;
        }
    }
    assert_eq!(h.tur().1[10], 0, "LUN 0 has nothing pending");
    for change in ["add", "remove"] {
        if change == "add" {
            h.vs.add_lu(0, 1, lu(8)).unwrap();
        } else {
            assert!(h.vs.remove_lu(0, 1).is_some());
        }
        // LUN 0: CHECK CONDITION, UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh).
        let (_, resp) = h.tur();
        assert_eq!(resp[10], 0x02, "{change}: CHECK CONDITION");
        assert_eq!(resp[12 + 2] & 0x0F, 0x06, "{change}: UNIT ATTENTION");
        assert_eq!(resp[12 + 12..12 + 14], [0x3F, 0x0E], "{change}");
        assert_eq!(h.tur().1[10], 0, "{change}: reported once");
    }
}

#[test]
fn a_command_that_meets_the_removal_of_its_lu_does_not_run_on_it() {
    let mut h = Harness::new();
    let added = lu(8);
    h.vs.add_lu(0, 1, added.clone()).unwrap();
    // The LU goes between the request's target lookup and its ticket; the unit attention
    // its removal leaves for the nexus there (I_T NEXUS LOSS) is then taken by another
    // command, so nothing but the LU's removal can stop the request.
    let vs = h.vs.clone();
    let rt = h.rt.handle().clone();
    let gone = added.clone();
    *h.dev.hooks.before_admit.lock().unwrap() = Some(Box::new(move || {
        assert!(vs.remove_lu(0, 1).is_some());
        let tur = scsi::Command {
            nexus: vs.shared.nexus.clone(),
            lun: 1,
            tag: 99,
            attr: scsi::TaskAttr::Simple,
            cdb: vec![0; 6],
            data_out: Vec::new().into(),
            data_in_len: 0,
            data_in_buf: None,
            arrival: None,
        };
        rt.block_on(gone.execute(tur));
    }));
    // WRITE(10) of LBA 0, 1 block, to target 0 LUN 1.
    let (_, resp, _) = h.command(
        [1, 0, 0x40, 1, 0, 0, 0, 0],
        &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[0xEE; 512],
        0,
    );
    assert!(
        h.dev.hooks.before_admit.lock().unwrap().is_none(),
        "the hook ran"
    );
    // VIRTIO_SCSI_S_OK with CHECK CONDITION: ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED
    // (25h/00h), fixed format at byte 12.
    assert_eq!(resp[11], 0, "VIRTIO_SCSI_S_OK");
    assert_eq!(resp[10], 0x02, "CHECK CONDITION");
    assert_eq!(resp[12 + 2] & 0x0F, 0x05);
    assert_eq!(resp[12 + 12..12 + 14], [0x25, 0x00]);
    // Nothing reached the removed LU.
    let stored =
        h.rt.block_on(async move { added.backend().read(0, 1).await.expect("read") });
    assert_eq!(stored, vec![0; 512]);
}

#[test]
fn config_space() {
    let h = Harness::new();
    let c = h.dev.get_config(0, 36);
    // num_queues 1, seg_max 1022, max_sectors 16384, cmd_per_lun 1024, event_info_size 16,
    // sense_size 96, cdb_size 32, max_channel 0, max_target 0, max_lun 16383.
    assert_eq!(
        c,
        vec![
            1, 0, 0, 0, 0xFE, 0x03, 0, 0, 0, 0x40, 0, 0, 0, 4, 0, 0, 16, 0, 0, 0, 96, 0, 0, 0, 32,
            0, 0, 0, 0, 0, 0, 0, 0xFF, 0x3F, 0, 0
        ]
    );
    assert_eq!(h.dev.get_config(32, 8), Vec::<u8>::new(), "past the end");
    // Features: VERSION_1 (32), INDIRECT_DESC (28), EVENT_IDX (29), HOTPLUG (1), CHANGE (2),
    // VHOST_USER_F_PROTOCOL_FEATURES (30).
    assert_eq!(
        h.dev.features(),
        (1 << 32) | (1 << 28) | (1 << 29) | (1 << 1) | (1 << 2) | (1 << 30)
    );
    // Thread 0: queues 0 and 1; thread 1: queue 2.
    assert_eq!(h.dev.queues_per_thread(), vec![0b11, 0b100]);
}

#[test]
fn disconnect_loses_the_nexus_and_the_socket_accepts_again() {
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost.sock");
    let lu = lu(8);
    let vs = VhostScsi::new(
        SocketConfig {
            path: path.clone(),
            initiator_name: "vhost:test".into(),
            target_name: "iqn.2026-01.io.sharedisk:vhost".into(),
            relative_port_id: crate::FIRST_RELATIVE_PORT_ID,
            num_queues: 2,
            threads: 1,
            watch_max: crate::DEFAULT_WATCH_MAX,
            luns: vec![LunConfig {
                target: 0,
                lun: 0,
                lu: lu.clone(),
            }],
        },
        rt.handle().clone(),
    )
    .unwrap();
    let nexus = vs.nexus().clone();
    let server = vs.spawn().unwrap();
    let tur = |lu: &Arc<scsi::LogicalUnit>| {
        let cmd = scsi::Command {
            nexus: nexus.clone(),
            lun: 0,
            tag: 1,
            attr: scsi::TaskAttr::Simple,
            cdb: vec![0; 6],
            data_out: Vec::new().into(),
            data_in_len: 0,
            data_in_buf: None,
            arrival: None,
        };
        let lu = lu.clone();
        match rt.block_on(async move { lu.execute(cmd).await }) {
            scsi::Completion::Done(r) => r,
            scsi::Completion::Aborted => panic!("aborted"),
        }
    };
    // The socket's nexus has seen its power-on unit attention.
    assert_eq!(tur(&lu).status, scsi::Status::CHECK_CONDITION);
    assert_eq!(tur(&lu).status, scsi::Status::GOOD);
    for _ in 0..2 {
        let f = Frontend::connect(&path, 4).unwrap();
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        assert_ne!(features & (1 << 32), 0);
        drop(f);
        // SAM-5 6.3.4: the nexus is lost, so its next command sees I_T NEXUS LOSS OCCURRED.
        let start = Instant::now();
        loop {
            let r = tur(&lu);
            if r.status == scsi::Status::CHECK_CONDITION {
                assert_eq!(r.sense[12..14], [0x29, 0x07]);
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "nexus not lost");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    server.stop();
    assert!(!path.exists(), "socket removed");
}

#[test]
fn hotplug_events_survive_a_stopped_and_restarted_event_queue() {
    let mut h = Harness::new();
    let e1 = h.alloc(16);
    h.add_chain(1, &[wr(e1, 16)]);
    h.kick(1);
    // The VM is stopped and continued: GET_VRING_BASE stops the queue, SET_VRING_BASE and
    // SET_VRING_KICK start it again (the same vring, ready again). With EVENT_IDX the driver
    // does not kick: it has already given its buffers.
    h.dev.stop_vring(1).unwrap();
    h.event.vring.set_queue_ready(true);
    let added = lu(8);
    h.vs.add_lu(0, 1, added.clone()).unwrap();
    assert_eq!(h.wait_used(1), (0, 16));
    // REGISTER AND MOVE may name the socket's port while the LU is there, and not after.
    let through_socket = |l: &Arc<scsi::LogicalUnit>| {
        l.target_ports()
            .iter()
            .any(|p| p.transport == scsi::Transport::Vhost)
    };
    assert!(through_socket(&added));
    // VIRTIO_SCSI_T_TRANSPORT_RESET (1), lun [1, 0, 00h, 01h, 0...], reason RESCAN (1).
    assert_eq!(
        h.get(e1, 16),
        vec![1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    );
}

/// A device reset disables every queue (vhost-user-backend does, before telling the device):
/// from then on an event must not be written into the event queue's buffers, which the driver
/// has forgotten; it is counted as missed instead.
#[test]
fn no_event_is_written_into_a_disabled_event_queue() {
    let mut h = Harness::new();
    let e1 = h.alloc(16);
    h.put(e1, &[0xEE; 16]);
    h.add_chain(1, &[wr(e1, 16)]);
    h.kick(1);
    let used = h.used_count(1);
    h.event.vring.set_enabled(false);
    h.dev.reset_device();
    h.vs.add_lu(0, 1, lu(8)).unwrap();
    assert_eq!(h.used_count(1), used, "no used entry on the disabled queue");
    assert_eq!(h.get(e1, 16), vec![0xEE; 16], "the buffer is untouched");
}

/// Wait until `counter`, one of the device's test hook counts, reaches `n`.
fn wait_count(counter: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    let start = Instant::now();
    while counter.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A test gate (see `Hooks`), closed, and a guard that opens it however the test ends, so
/// that a task held there lets the runtime shut down.
fn closed_gate() -> (Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>, impl Drop) {
    struct Open(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);
    impl Drop for Open {
        fn drop(&mut self) {
            *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.0 .1.notify_all();
        }
    }
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    (gate.clone(), Open(gate))
}

/// Once a chain's used entry is written the driver owns its head again and may offer it at
/// once (virtio 1.2 2.7.13; Linux frees descriptors last in, first out), while the task that
/// answered it has not ended yet: that is a new request, not a duplicate of one in flight.
#[test]
fn a_head_given_back_may_be_offered_again_before_its_task_ends() {
    let mut h = Harness::new();
    h.tur();
    let (gate, _open) = closed_gate();
    *h.dev.hooks.after_complete.lock().unwrap() = Some(gate.clone());
    let tur = [0x00, 0, 0, 0, 0, 0];
    let hd = h.header(LUN0, 21, &tur);
    let r = h.alloc(RESP);
    let base = h.queue(2).next_desc;
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).0, u32::from(base));
    wait_count(&h.dev.hooks.completed, 1, "not held after its completion");
    // Its task still holds its place; the driver offers the same head again.
    *h.dev.hooks.after_complete.lock().unwrap() = None;
    let hd2 = h.header(LUN0, 22, &tur);
    let r2 = h.alloc(RESP);
    h.put(r2, &[0xEE; 12]);
    h.queue(2).next_desc = base;
    h.add_chain(2, &[rd(hd2, REQ), wr(r2, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).0, u32::from(base));
    // virtio_scsi_cmd_resp: sense_len, resid, status_qualifier, then status (byte 10) and
    // response (byte 11): GOOD, VIRTIO_SCSI_S_OK, not VIRTIO_SCSI_S_FAILURE (9).
    assert_eq!(h.get(r2, 12)[10..12], [0x00, 0x00]);
}

#[test]
fn disconnect_waits_for_a_completion_being_written_and_drops_later_ones() {
    let mut h = Harness::new();
    h.tur();
    // A completion held after its epoch check, before its guest writes.
    let (gate, _open) = closed_gate();
    *h.dev.hooks.in_complete.lock().unwrap() = Some(gate.clone());
    let hd = h.header(LUN0, 11, &[0x00, 0, 0, 0, 0, 0]);
    let r = h.alloc(RESP);
    h.put(r, &[0xEE; 12]);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP)]);
    h.kick(2);
    wait_count(&h.dev.hooks.inside, 1, "not held in its completion");
    // The disconnect cannot get between that check and the writes: it waits for them.
    let dev = h.dev.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let t = std::thread::spawn(move || {
        dev.disconnect();
        done2.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "disconnect returned while a completion was being written"
    );
    let used_before = h.used_count(2);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    t.join().unwrap();
    // The completion that had passed its check landed before the disconnect returned.
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(used_before + 1, h.used_count(2));
    assert_eq!(h.get(r, 12), vec![0; 12]);
    // A chain popped before a disconnect and completing after it is never answered.
    *h.dev.hooks.in_complete.lock().unwrap() = None;
    let (hold, rx) = tokio::sync::watch::channel(false);
    *h.dev.hooks.before_complete.lock().unwrap() = Some(rx);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP)]);
    h.kick(2);
    h.wait_reached(1);
    h.dev.disconnect();
    hold.send_replace(true);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.used_count(2), used_before + 1);
}

const TUR: [u8; 6] = [0x00, 0, 0, 0, 0, 0];

#[test]
fn at_most_a_queue_size_in_flight_and_a_completion_resumes_the_queue() {
    queue_size_in_flight_then_resumed(Harness::new(), 2);
}

#[test]
fn a_completion_resumes_the_second_queue_of_a_thread_serving_two() {
    queue_size_in_flight_then_resumed(Harness::with_queues(lu(64), 2, 1), 3);
}

/// A queue size of held requests on request queue `which`; one more chain stays in the ring
/// until a completion wakes the queue's thread, which then runs it.
fn queue_size_in_flight_then_resumed(mut h: Harness, which: usize) {
    h.tur();
    let hold = h.hold();
    let popped = h.queue(which).vring.queue_next_avail();
    // A queue size of requests in flight, each one indirect descriptor (so each head is
    // distinct), all held before completion.
    let mut tables = Vec::new();
    for i in 0..QSIZE {
        let hd = h.header(LUN0, 1000 + u64::from(i), &TUR);
        let r = h.alloc(RESP);
        let t = h.indirect(&[rd(hd, REQ), wr(r, RESP)]);
        h.publish(which, i, &[(t, 32, VRING_DESC_F_INDIRECT as u16, 0)]);
        tables.push(t);
    }
    h.kick(which);
    h.wait_reached(usize::from(QSIZE));
    // The driver offers head 0 again (a driver may not; the ring lets it): the queue is full,
    // so it stays in the ring.
    h.publish(
        which,
        0,
        &[(tables[0], 32, VRING_DESC_F_INDIRECT as u16, 0)],
    );
    h.kick(which);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        h.queue(which).vring.queue_next_avail(),
        popped.wrapping_add(QSIZE),
        "popped beyond the queue size"
    );
    assert_eq!(h.reached(), usize::from(QSIZE));
    // The completions make room and wake the queue's thread, which pops head 0 again (now
    // free) and runs it.
    hold.send_replace(true);
    for _ in 0..QSIZE {
        assert_eq!(h.wait_used(which).1, RESP);
    }
    h.wake_thread(h.thread_of(which).0);
    assert_eq!(h.wait_used(which), (0, RESP));
    assert_eq!(h.reached(), usize::from(QSIZE) + 1);
}

/// A TEST UNIT READY chain on request queue `which`; returns its response buffer.
fn tur_chain(h: &mut Harness, which: usize, tag: u64) -> u64 {
    let hd = h.header(LUN0, tag, &TUR);
    let r = h.alloc(RESP);
    h.put(r, &[0xEE; 12]);
    h.add_chain(which, &[rd(hd, REQ), wr(r, RESP)]);
    r
}

#[test]
fn one_thread_serves_both_its_queues_on_a_kick_of_either() {
    let mut h = Harness::with_queues(lu(64), 2, 1);
    h.tur();
    // Thread 0: queues 0 and 1; thread 1: queues 2 and 3, its vrings 0 and 1.
    assert_eq!(h.dev.queues_per_thread(), vec![0b11, 0b1100]);
    // A chain on each queue, one kick (queue 2's): both are answered, GOOD (status 0,
    // response VIRTIO_SCSI_S_OK 0; virtio 5.6.6.1).
    let r2 = tur_chain(&mut h, 2, 41);
    let r3 = tur_chain(&mut h, 3, 42);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.wait_used(3).1, RESP);
    assert_eq!(h.get(r2, 12), vec![0; 12]);
    assert_eq!(h.get(r3, 12), vec![0; 12]);
    // The kick of queue 3 (the thread's event 1) serves queue 3.
    let r3 = tur_chain(&mut h, 3, 43);
    h.kick(3);
    assert_eq!(h.wait_used(3).1, RESP);
    assert_eq!(h.get(r3, 12), vec![0; 12]);
    assert_eq!(
        h.used_count(2),
        2,
        "queue 2 answered the first TUR and one more"
    );
}

#[test]
fn a_queue_not_ready_is_left_alone_while_its_threads_other_queue_is_served() {
    let mut h = Harness::with_queues(lu(64), 2, 1);
    h.tur();
    let popped = h.queue(3).vring.queue_next_avail();
    h.queue(3).vring.set_queue_ready(false);
    let r3 = tur_chain(&mut h, 3, 51);
    let r2 = tur_chain(&mut h, 2, 52);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r2, 12), vec![0; 12]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        h.queue(3).vring.queue_next_avail(),
        popped,
        "queue 3 was popped"
    );
    assert_eq!(h.used_count(3), 0);
    // Once the driver has set it up, its kick serves it.
    h.queue(3).vring.set_queue_ready(true);
    h.kick(3);
    assert_eq!(h.wait_used(3).1, RESP);
    assert_eq!(h.get(r3, 12), vec![0; 12]);
}

#[test]
fn request_queues_are_dealt_out_to_the_threads_in_turn() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let config = |num_queues, threads| socket_config(num_queues, threads, Vec::new());
    let masks = |num_queues, threads| {
        let vs = VhostScsi::new(config(num_queues, threads), rt.handle().clone()).unwrap();
        let mem: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        Device::new(
            vs.shared.clone(),
            GuestMemoryAtomic::new(mem),
            Arc::default(),
        )
        .queues_per_thread()
    };
    // Five request queues (2..=6) on two threads: 2, 4, 6 and 3, 5.
    assert_eq!(masks(5, 2), vec![0b11, 0b101_0100, 0b010_1000]);
    // One thread per queue.
    assert_eq!(masks(3, 3), vec![0b11, 0b100, 0b1000, 0b1_0000]);
    // All 62 on one thread: bits 2..=63.
    assert_eq!(masks(62, 1), vec![0b11, !0b11]);
    for (q, t) in [(2, 0), (2, 3), (1, 2)] {
        assert!(
            matches!(
                VhostScsi::new(config(q, t), rt.handle().clone()),
                Err(crate::ConfigError::Threads(..))
            ),
            "{q} queues, {t} threads"
        );
    }
    let d = crate::default_threads(8);
    assert!((1..=8).contains(&d), "{d}");
    assert_eq!(crate::default_threads(1), 1);
}

#[test]
fn a_head_offered_again_while_in_flight_gets_failure_and_is_not_run() {
    let mut h = Harness::new();
    h.tur();
    let hold = h.hold();
    let base = h.req.next_desc;
    let hd = h.header(LUN0, 21, &TUR);
    let r = h.alloc(RESP);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP)]);
    h.kick(2);
    h.wait_reached(1);
    // The same head again, now with other buffers and another tag.
    let hd2 = h.header(LUN0, 22, &TUR);
    let r2 = h.alloc(RESP);
    h.put(r2, &[0xEE; 12]);
    h.publish(
        2,
        base,
        &[
            (hd2, REQ, VRING_DESC_F_NEXT as u16, base + 1),
            (r2, RESP, VRING_DESC_F_WRITE as u16, 0),
        ],
    );
    h.kick(2);
    // VIRTIO_SCSI_S_FAILURE (9) in the new buffers; the SCSI layer never saw it.
    assert_eq!(h.wait_used(2), (u32::from(base), RESP));
    assert_eq!(h.get(r2, 12), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.reached(), 1);
    // The request in flight completes into its own buffers: GOOD.
    h.put(r, &[0xEE; 12]);
    hold.send_replace(true);
    assert_eq!(h.wait_used(2), (u32::from(base), RESP));
    assert_eq!(h.get(r, 12), vec![0; 12]);
}

/// With a data-out budget of 1024 bytes and completions held: three WRITE(10)s of one block
/// (SBC-4 5.40), tags 30-32 at LBAs 10-12, 512 bytes of data-out each, on request queue 2.
/// Two fit the budget and reach the hold; the third stays in the ring. Returns the hold and
/// the response addresses.
fn three_writes_over_a_budget_of_two(
    h: &mut Harness,
) -> (tokio::sync::watch::Sender<bool>, Vec<u64>) {
    h.dev
        .data_out_budget
        .store(1024, std::sync::atomic::Ordering::Relaxed);
    let hold = h.hold();
    let mut resps = Vec::new();
    for i in 0..3u8 {
        let hd = h.header(
            LUN0,
            30 + u64::from(i),
            &[0x2A, 0, 0, 0, 0, 10 + i, 0, 0, 1, 0],
        );
        let d = h.alloc(512);
        h.put(d, &[0x50 + i; 512]);
        let r = h.alloc(RESP);
        h.add_chain(2, &[rd(hd, REQ), rd(d, 512), wr(r, RESP)]);
        resps.push(r);
    }
    h.kick(2);
    h.wait_reached(2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.reached(), 2);
    (hold, resps)
}

#[test]
fn data_out_budget_holds_requests_in_the_ring_until_completions() {
    let mut h = Harness::new();
    h.tur();
    let popped = h.req.vring.queue_next_avail();
    let (hold, resps) = three_writes_over_a_budget_of_two(&mut h);
    assert_eq!(h.req.vring.queue_next_avail(), popped.wrapping_add(2));
    hold.send_replace(true);
    h.wait_used(2);
    h.wait_used(2);
    h.wake_request_queue();
    assert_eq!(h.wait_used(2).1, RESP);
    for r in resps {
        assert_eq!(h.get(r, 12), vec![0; 12]);
    }
    let stored = h.stored(12, 1);
    assert_eq!(stored, vec![0x52; 512]);
}

/// virtio 1.2 5.6.6.2: "the device MUST complete the selected commands ... upon receiving an
/// 'abort task' ... TMF. Such effects MUST take place before the TMF itself is successfully
/// completed". A request the driver made available before the function, which the device
/// had not taken in (its data-out did not fit the budget), is no exception: the response
/// waits until it is taken in and returned, so it never runs after the driver has been told
/// it was aborted.
#[test]
fn task_management_waits_for_the_requests_still_in_the_avail_ring() {
    let mut h = Harness::new();
    h.tur();
    let req0 = h.used_count(2);
    // Tag 32 stays in the ring.
    let (hold, _) = three_writes_over_a_budget_of_two(&mut h);
    // ABORT TASK (subtype 0) of tag 32.
    let (tr, ctrl0) = h.send_tmf(0, LUN0, 32);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        h.used_count(0),
        ctrl0,
        "ABORT TASK answered while its task was still in the avail ring"
    );
    hold.send_replace(true);
    h.wait_used(2);
    h.wait_used(2);
    h.wake_request_queue();
    h.wait_control_used(ctrl0);
    assert_eq!(
        h.used_count(2),
        req0.wrapping_add(3),
        "tag 32 not returned before the TMF response"
    );
    // FUNCTION COMPLETE (0).
    assert_eq!(h.get(tr, 1), vec![0]);
}

#[test]
fn only_the_data_out_the_cdb_asks_for_is_copied() {
    let mut h = Harness::new();
    h.tur();
    // WRITE(10) of one block with 1024 bytes of data-out whose second half is outside guest
    // memory: only the first 512 bytes are read, GOOD, resid 512.
    let hd = h.header(LUN0, 40, &[0x2A, 0, 0, 0, 0, 20, 0, 0, 1, 0]);
    let d = h.alloc(512);
    h.put(d, &[0x77; 512]);
    let r = h.alloc(RESP);
    h.add_chain(2, &[rd(hd, REQ), rd(d, 512), rd(8 << 20, 512), wr(r, RESP)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r, 12), vec![0, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn task_management_answers_after_the_requests_it_affected_are_returned() {
    let mut h = Harness::new();
    h.tur();
    for (subtype, tag) in [(0u32, 50u64), (1, 51), (5, 52)] {
        // A READ(10) the SCSI layer has answered, whose completion is not yet written.
        let hold = h.hold();
        let reached = h.reached();
        let hd = h.header(LUN0, tag, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let r = h.alloc(RESP);
        let d = h.alloc(512);
        h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 512)]);
        h.kick(2);
        h.wait_reached(reached + 1);
        // ABORT TASK (0) of its tag, ABORT TASK SET (1), LOGICAL UNIT RESET (5): the
        // response waits for the request's used ring entry (virtio 5.6.6.2: the driver takes
        // the TMF's completion to mean the requests it affected are done).
        let req0 = h.used_count(2);
        let (tr, ctrl0) = h.send_tmf(subtype, LUN0, tag);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.used_count(0), ctrl0, "TMF {subtype} answered first");
        hold.send_replace(true);
        h.wait_control_used(ctrl0);
        assert_eq!(
            h.used_count(2),
            req0.wrapping_add(1),
            "request returned before the TMF"
        );
        assert_eq!(h.wait_used(0).1, 1);
        // FUNCTION COMPLETE (0).
        assert_eq!(h.get(tr, 1), vec![0]);
        h.wait_used(2);
        // A LU reset leaves BUS DEVICE RESET FUNCTION OCCURRED for the next command.
        h.tur();
    }
}

impl Harness {
    /// A TEST UNIT READY on the request queue, not waited for; returns its response buffer.
    fn send_tur(&mut self, tag: u64) -> u64 {
        let hd = self.header(LUN0, tag, &TUR);
        let r = self.alloc(RESP);
        self.put(r, &[0xEE; 12]);
        self.add_chain(2, &[rd(hd, REQ), wr(r, RESP)]);
        self.kick(2);
        r
    }
}

/// Run `f` on a thread of its own; the handle says when it returned.
fn in_thread(f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        f();
        Instant::now()
    })
}

/// A queue stop, then a device reset, each run by [`waits_until_closing`]: whether each ended.
fn stop_and_reset_until_closing(dev: &Arc<Device>, why: &str) -> (bool, bool) {
    let d = dev.clone();
    let stopped = waits_until_closing(dev, Box::new(move || d.stop_vring(2).unwrap()), why);
    let d = dev.clone();
    let reset = waits_until_closing(dev, Box::new(move || d.reset_device()), why);
    (stopped, reset)
}

/// Run `f` (a queue stop or a device reset of `dev`) in a thread of its own: it must still be
/// waiting after 300 ms (`why` says for what), and is given 10 s to end once the socket is
/// closing. Returns whether it ended.
fn waits_until_closing(dev: &Arc<Device>, f: Box<dyn FnOnce() + Send>, why: &str) -> bool {
    dev.closing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let t = in_thread(f);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!t.is_finished(), "returned {why}");
    dev.closing.store(true, std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    while !t.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    t.is_finished()
}

#[test]
fn stopping_the_first_queue_returns_every_queues_commands_once() {
    let mut h = Harness::new();
    h.tur();
    let hold = h.hold();
    let r = h.send_tur(60);
    h.wait_reached(1);
    let used = h.used_count(2);
    // GET_VRING_BASE of the control queue (QEMU stops the queues in order): the request in
    // flight on the request queue comes back before it returns.
    let dev = h.dev.clone();
    let stop = in_thread(move || dev.stop_vring(0).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!stop.is_finished(), "stopped with a request in flight");
    let released = Instant::now();
    hold.send_replace(true);
    let returned = stop.join().unwrap();
    assert!(returned > released);
    assert_eq!(h.used_count(2), used.wrapping_add(1));
    assert_eq!(h.get(r, 12), vec![0; 12]);
    // The later queues find nothing in flight and stop without waiting: with the hold closed
    // again, no command could complete, yet their stops return; and none returns the request
    // a second time.
    let hold = h.hold();
    let reached = h.reached();
    let dev = h.dev.clone();
    let later = std::thread::spawn(move || {
        dev.stop_vring(1).unwrap();
        dev.stop_vring(2).unwrap();
    });
    let start = Instant::now();
    while !later.is_finished() {
        // A guard against a hang only: the hold stays closed whatever the stops wait for.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a later queue's stop waited with nothing in flight"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    later.join().unwrap();
    assert_eq!(h.reached(), reached, "a command reached the hold");
    assert_eq!(
        h.used_count(2),
        used.wrapping_add(1),
        "a request returned twice"
    );
    hold.send_replace(true);
}

/// A driver whose reads wait until the test opens the gate: storage slower than the stop's
/// grace and abort times.
struct SlowReads {
    inner: block::driver::mem::MemDriver,
    gate: tokio::sync::watch::Receiver<bool>,
    started: std::sync::atomic::AtomicUsize,
}

impl SlowReads {
    /// Wait until a read has reached the driver (10 s as a guard against a hang only).
    fn wait_started(&self) {
        let start = Instant::now();
        while self.started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the read reached the driver"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[async_trait::async_trait]
impl block::Driver for SlowReads {
    fn info(&self) -> block::DriverInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, block::BlockError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), block::BlockError> {
        self.inner.write(offset, data, fua).await
    }
    async fn read_into(&self, offset: u64, buf: block::IoBuf) -> Result<(), block::BlockError> {
        assert!(buf.is_lent(), "the guest's buffer itself");
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.gate.clone().wait_for(|open| *open).await;
        self.inner.read_into(offset, buf).await
    }
    async fn flush(&self) -> Result<(), block::BlockError> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), block::BlockError> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), block::BlockError> {
        self.inner.write_zeroes(o, l, u).await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<block::Extent, block::BlockError> {
        self.inner.block_status(o, l).await
    }
}

/// A READ's data-in goes from the driver straight into the guest's buffer (zero copy), so a
/// stop (GET_VRING_BASE) must not return while the read is in flight, however long past its
/// grace and abort times: the guest takes the memory back after the stop, and a read the
/// kernel finished then would overwrite it.
#[test]
fn a_stop_waits_for_a_read_into_guest_memory_however_long_it_takes() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let drv = Arc::new(SlowReads {
        inner: block::driver::mem::MemDriver::new(64 * 512),
        gate,
        started: 0.into(),
    });
    let mut h = Harness::with_lu(lu_on(drv.clone()));
    h.tur();
    // WRITE(10) (SBC-4 5.40) of 0x5A to LBA 0.
    let (_, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0x5A; 512], 0);
    assert_eq!(resp[10..12], [0, 0], "VIRTIO_SCSI_S_OK, GOOD");
    *h.dev.stop_bounds.lock().unwrap() = (Duration::from_millis(100), Duration::from_millis(100));
    // READ(10) (SBC-4 5.15) of LBA 0 into a guest buffer holding 0xEE; it stops in the driver.
    let hd = h.header(LUN0, 90, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let r = h.alloc(RESP);
    let d = h.alloc(512);
    h.put(d, &[0xEE; 512]);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 512)]);
    let used = h.used_count(2);
    h.kick(2);
    drv.wait_started();
    let dev = h.dev.clone();
    let stop = in_thread(move || dev.stop_vring(2).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !stop.is_finished(),
        "the stop returned with a read into guest memory in flight"
    );
    let released = Instant::now();
    open.send_replace(true);
    assert!(stop.join().unwrap() > released);
    // The read ended before the stop returned: its data is in the buffer and its head is back.
    assert_eq!(h.get(d, 512), vec![0x5A; 512]);
    assert_eq!(h.used_count(2), used.wrapping_add(1));
}

/// `lu remove`: the removal ends the socket's tasks on the LU, but one already in the driver
/// finishes; `settle_removed` returns only after it has, so the daemon's flush that follows
/// covers it.
#[test]
fn settling_a_removed_lu_waits_for_the_command_still_in_its_driver() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let drv = Arc::new(SlowReads {
        inner: block::driver::mem::MemDriver::new(64 * 512),
        gate,
        started: 0.into(),
    });
    let mut h = Harness::new();
    h.vs.add_lu(0, 1, lu_on(drv.clone())).unwrap();
    const LUN1: [u8; 8] = [1, 0, 0x40, 1, 0, 0, 0, 0];
    // Take the new LU's unit attention (power on) for this nexus.
    let (_, resp, _) = h.command(LUN1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp[12 + 2] & 0x0F, 0x06, "UNIT ATTENTION first");
    // READ(10) of LBA 0 to target 0 LUN 1; it stops in the driver.
    let hd = h.header(
        [1, 0, 0x40, 1, 0, 0, 0, 0],
        91,
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    );
    let r = h.alloc(RESP);
    let d = h.alloc(512);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 512)]);
    h.kick(2);
    drv.wait_started();
    let removed = h.vs.remove_lu(0, 1).expect("the LU was there");
    let (vs, rt) = (h.vs.clone(), h.rt.handle().clone());
    let settle = in_thread(move || rt.block_on(vs.settle_removed(&removed)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !settle.is_finished(),
        "settled with the LU's command still in the driver"
    );
    let released = Instant::now();
    open.send_replace(true);
    assert!(settle.join().unwrap() > released);
}

/// A frontend may place a request queue's avail ring so that its index is in guest memory and
/// its entries are not (vhost-user-backend does not check). No pop can read such an entry: the
/// queue is ignored, not polled for ever by the thread that serves it.
#[test]
fn a_queue_whose_avail_ring_leaves_guest_memory_is_ignored_not_spun_on() {
    let h = Harness::new();
    // Guest memory ends at 4 MiB: avail->flags and avail->idx are its last 4 bytes.
    let avail = (4u64 << 20) - 4;
    let v = Vring::new(h.gm.clone(), 1024).unwrap();
    v.set_queue_size(QSIZE);
    v.set_queue_info(0x20_0000, avail, 0x21_0000).unwrap();
    v.set_queue_ready(true);
    v.set_enabled(true);
    h.put(avail + 2, &1u16.to_le_bytes()); // avail->idx = 1: one chain offered
    let (dev, v2) = (h.dev.clone(), v.clone());
    let t = in_thread(move || dev.handle_event(0, EventSet::IN, &[v2], 1).unwrap());
    let start = Instant::now();
    while !t.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let returned = t.is_finished();
    v.set_queue_ready(false); // frees a thread still spinning, so the test ends either way
    t.join().unwrap();
    assert!(
        returned,
        "the queue's thread still polls an entry no pop can read"
    );
}

#[test]
fn a_closed_connection_is_done_before_the_next_is_accepted() {
    let mut h = Harness::new();
    h.tur();
    let hold = h.hold();
    // A WRITE(10) of one block whose command is still in flight when the frontend goes.
    let hd = h.header(LUN0, 70, &[0x2A, 0, 0, 0, 0, 30, 0, 0, 1, 0]);
    let d = h.alloc(512);
    h.put(d, &[0x11; 512]);
    let r = h.alloc(RESP);
    h.add_chain(2, &[rd(hd, REQ), rd(d, 512), wr(r, RESP)]);
    h.kick(2);
    h.wait_reached(1);
    h.dev.disconnect();
    let (vs, dev) = (h.vs.clone(), h.dev.clone());
    let end = in_thread(move || {
        vs.end_connection(&dev);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !end.is_finished(),
        "the next connection could start with a command of the last one in flight"
    );
    hold.send_replace(true);
    end.join().unwrap();
    // The nexus is lost: its next command sees I_T NEXUS LOSS OCCURRED (29h/07h, SAM-5 6.3.4).
    let (_, resp) = h.tur();
    assert_eq!(resp[12 + 12..12 + 14], [0x29, 0x07]);
}

/// A queue stop and a device reset wait for the commands in flight however long they take,
/// but not past the socket's closing (the daemon told to stop): a command stuck in the
/// backend must not keep the process from exiting.
#[test]
fn a_stop_and_a_reset_give_up_waiting_when_the_socket_closes() {
    let mut h = Harness::new();
    h.tur();
    *h.dev.stop_bounds.lock().unwrap() = (Duration::from_millis(50), Duration::from_millis(50));
    let hold = h.hold();
    h.send_tur(80);
    h.wait_reached(1);
    let gave_up = stop_and_reset_until_closing(&h.dev, "with a command in flight");
    hold.send_replace(true); // frees a wait still running, so the test ends either way
    assert_eq!(
        gave_up,
        (true, true),
        "(queue stop, device reset) ended after the socket closed"
    );
}

#[test]
fn a_device_reset_is_an_i_t_nexus_reset() {
    let mut h = Harness::new();
    h.tur();
    // RESERVE(6) (SPC-2 7.21): the socket's nexus holds the logical unit.
    let (_, resp, _) = h.command(LUN0, &[0x16, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(resp[10..12], [0, 0]);
    let other = Arc::new(scsi::ItNexus {
        initiator: scsi::InitiatorPort {
            transport: scsi::Transport::Iscsi,
            name: "iqn.2026-01.io.sharedisk:other".into(),
            isid: Some([0x80, 0, 0, 0, 0, 1]),
        },
        target: scsi::TargetPort {
            name: "iqn.2026-01.io.sharedisk:disk".into(),
            tpgt: 1,
            relative_id: 1,
        },
    });
    let tur = |h: &Harness| {
        let cmd = scsi::Command {
            nexus: other.clone(),
            lun: 0,
            tag: 1,
            attr: scsi::TaskAttr::Simple,
            cdb: TUR.to_vec(),
            data_out: Vec::new().into(),
            data_in_len: 0,
            data_in_buf: None,
            arrival: None,
        };
        let lu = h.lu.clone();
        match h.rt.block_on(async move { lu.execute(cmd).await }) {
            scsi::Completion::Done(r) => r.status,
            scsi::Completion::Aborted => panic!("aborted"),
        }
    };
    // The other nexus: its power-on unit attention, then RESERVATION CONFLICT (SPC-2 5.5.1).
    assert_eq!(tur(&h), scsi::Status::CHECK_CONDITION);
    assert_eq!(tur(&h), scsi::Status::RESERVATION_CONFLICT);
    // The driver resets the device (VHOST_USER_RESET_DEVICE).
    h.dev.reset_device();
    // The reservation went with the nexus reset (SPC-2 5.5.1, SAM-5 6.3.4).
    assert_eq!(tur(&h), scsi::Status::GOOD);
    // The socket's nexus: I_T NEXUS LOSS OCCURRED (29h/07h, SPC-5 table 49).
    let (_, resp) = h.tur();
    assert_eq!(resp[10], 0x02);
    assert_eq!(resp[12 + 12..12 + 14], [0x29, 0x07]);
}

/// A memory disk that records how the block layer hands it data: into / from memory lent by
/// the frontend, or through buffers of the block layer's own.
struct Recorder {
    inner: block::driver::mem::MemDriver,
    lent_reads: std::sync::atomic::AtomicUsize,
    lent_writes: std::sync::atomic::AtomicUsize,
    own_buffers: std::sync::atomic::AtomicUsize,
}

/// A harness whose LU is a 64-block [`Recorder`], and the recorder.
fn recorded() -> (Arc<Recorder>, Harness) {
    let rec = Arc::new(Recorder {
        inner: block::driver::mem::MemDriver::new(64 * 512),
        lent_reads: 0.into(),
        lent_writes: 0.into(),
        own_buffers: 0.into(),
    });
    let h = Harness::with_lu(lu_on(rec.clone()));
    (rec, h)
}

#[async_trait::async_trait]
impl block::Driver for Recorder {
    fn info(&self) -> block::DriverInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, block::BlockError> {
        self.own_buffers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), block::BlockError> {
        self.own_buffers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.write(offset, data, fua).await
    }
    async fn read_into(&self, offset: u64, buf: block::IoBuf) -> Result<(), block::BlockError> {
        if buf.is_lent() {
            self.lent_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        } else {
            self.own_buffers
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.read_into(offset, buf).await
    }
    async fn write_from(
        &self,
        offset: u64,
        data: block::IoBuf,
        fua: bool,
    ) -> Result<(), block::BlockError> {
        if data.is_lent() {
            self.lent_writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        } else {
            self.own_buffers
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.write_from(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), block::BlockError> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), block::BlockError> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), block::BlockError> {
        self.inner.write_zeroes(offset, len, unmap).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<block::Extent, block::BlockError> {
        self.inner.block_status(offset, len).await
    }
}

#[test]
fn reads_and_writes_go_between_guest_buffers_and_the_driver_without_a_copy() {
    use std::sync::atomic::Ordering::SeqCst;
    let (rec, mut h) = recorded();
    h.tur();
    // WRITE(10) (SBC-4 5.40) LBA 2, 2 blocks: the driver is handed the guest's buffer.
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 13 % 241) as u8).collect();
    let (len, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 2, 0, 0, 2, 0], &data, 0);
    assert_eq!(len, RESP);
    assert_eq!(&resp[0..12], &[0; 12]);
    assert_eq!(rec.lent_writes.load(SeqCst), 1);
    // READ(16) (SBC-4 5.17) LBA 2, 2 blocks: the driver reads into the guest's buffer; the
    // used length counts the data-in (virtio 5.6.6.1).
    let (len, resp, din) = h.command(
        LUN0,
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0],
        &[],
        1024,
    );
    assert_eq!(len, RESP + 1024);
    assert_eq!(&resp[0..12], &[0; 12]);
    assert_eq!(din, data);
    assert_eq!(rec.lent_reads.load(SeqCst), 1);
    assert_eq!(rec.own_buffers.load(SeqCst), 0, "no intermediate buffer");
    // A READ whose transfer does not fit the guest's buffers (2 blocks into 512 bytes) is
    // refused, VIRTIO_SCSI_S_OVERRUN (1), before it reads anything into a buffer of its own.
    let (len, resp, _) = h.command(LUN0, &[0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0], &[], 512);
    assert_eq!(len, RESP);
    assert_eq!(resp[11], 1);
    assert_eq!(rec.lent_reads.load(SeqCst), 1);
    assert_eq!(rec.own_buffers.load(SeqCst), 0, "no buffer of the daemon's");
}

/// A harness whose LU is on a [`SlowReads`] driver, with a READ(10) of LBA 0 (tag `tag`)
/// stopped inside the driver; returns the harness, the driver's gate and the address of the
/// read's response header.
fn a_read_held_in_the_driver(tag: u64) -> (Harness, tokio::sync::watch::Sender<bool>, u64) {
    let (open, gate) = tokio::sync::watch::channel(false);
    let drv = Arc::new(SlowReads {
        inner: block::driver::mem::MemDriver::new(64 * 512),
        gate,
        started: 0.into(),
    });
    let mut h = Harness::with_lu(lu_on(drv.clone()));
    h.tur();
    // READ(10) (SBC-4 5.15) of LBA 0, one block.
    let hd = h.header(LUN0, tag, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let r = h.alloc(RESP);
    let d = h.alloc(512);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr(d, 512)]);
    h.kick(2);
    drv.wait_started();
    (h, open, r)
}

/// Send task management function `subtype` for tag `tag` on the control queue without
/// waiting for its answer; then let the held read go and return the response byte of the
/// read's header (virtio 5.6.6.1) once both are back.
fn response_of_a_held_read_after_tmf(subtype: u32, tag: u64) -> u8 {
    let (mut h, open, r) = a_read_held_in_the_driver(tag);
    let mut req = [0u8; 24];
    // Type VIRTIO_SCSI_T_TMF (0) in bytes 0..4.
    req[4..8].copy_from_slice(&subtype.to_le_bytes());
    req[8..16].copy_from_slice(&LUN0);
    req[16..24].copy_from_slice(&tag.to_le_bytes());
    let a = h.alloc(24);
    h.put(a, &req);
    let t = h.alloc(1);
    h.add_chain(0, &[rd(a, 24), wr(t, 1)]);
    h.kick(0);
    // The function reaches the task set while the read is still in the driver.
    std::thread::sleep(Duration::from_millis(200));
    open.send_replace(true);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.wait_used(0).1, 1);
    assert_eq!(h.get(t, 1), [0], "VIRTIO_SCSI_S_FUNCTION_COMPLETE");
    h.get(r, 12)[11]
}

/// virtio 1.2 5.6.6.1: VIRTIO_SCSI_S_ABORTED (2) is for a request cancelled by ABORT TASK or
/// ABORT TASK SET; VIRTIO_SCSI_S_RESET (4) for one cancelled "due to a bus or device reset
/// (including a task management function)". A Linux guest retries the second (DID_RESET)
/// and fails the first (DID_ABORT) with an I/O error.
#[test]
fn a_request_the_guests_own_abort_ends_is_aborted_and_one_a_reset_ends_is_reset() {
    // ABORT TASK (subtype 0) of the held read's tag.
    assert_eq!(response_of_a_held_read_after_tmf(0, 81), 2);
    // ABORT TASK SET (1).
    assert_eq!(response_of_a_held_read_after_tmf(1, 82), 2);
    // LOGICAL UNIT RESET (5).
    assert_eq!(response_of_a_held_read_after_tmf(5, 83), 4);
    // I_T NEXUS RESET (4).
    assert_eq!(response_of_a_held_read_after_tmf(4, 84), 4);
    // CLEAR TASK SET (3): neither ABORT TASK nor ABORT TASK SET, so a task management
    // function that resets (every nexus's tasks end): VIRTIO_SCSI_S_RESET, which the guest
    // retries.
    assert_eq!(response_of_a_held_read_after_tmf(3, 86), 4);
}

/// Another initiator's LOGICAL UNIT RESET on the shared LU (SAM-5: every task of every nexus
/// ends) cancels the guest's read: VIRTIO_SCSI_S_RESET (4), which the guest retries.
#[test]
fn a_request_another_initiators_reset_ends_is_reset() {
    let (mut h, open, r) = a_read_held_in_the_driver(85);
    let other = Arc::new(scsi::ItNexus {
        initiator: scsi::InitiatorPort {
            transport: scsi::Transport::Iscsi,
            name: "iqn.2026-01.test:other".into(),
            isid: Some([0x40, 0, 0, 0, 0, 1]),
        },
        target: scsi::TargetPort {
            name: "iqn.2026-01.io.sharedisk:disk0".into(),
            tpgt: 1,
            relative_id: 1,
        },
    });
    let target = h.vs.shared.target(0).expect("target 0");
    let reset = h.rt.spawn(async move {
        target
            .task_management(&other, scsi::Tmf::LogicalUnitReset { lun: 0 })
            .await
    });
    std::thread::sleep(Duration::from_millis(200));
    open.send_replace(true);
    assert_eq!(h.wait_used(2).1, RESP);
    h.rt.block_on(reset).expect("reset");
    assert_eq!(h.get(r, 12)[11], 4, "VIRTIO_SCSI_S_RESET");
}

/// virtio 1.2 5.6.6.3: "The device MUST set bit 31 in event if events were lost". An event
/// put into a buffer outside guest memory is lost, so the next event carries
/// VIRTIO_SCSI_T_EVENTS_MISSED (80000000h).
#[test]
fn an_event_lost_in_a_buffer_outside_guest_memory_is_reported_missed() {
    let mut h = Harness::new();
    // One event buffer at 8 MiB, past the end of guest memory.
    h.add_chain(1, &[wr(8 << 20, 16)]);
    h.kick(1);
    h.vs.add_lu(0, 1, lu(8)).unwrap();
    assert_eq!(h.wait_used(1).1, 0, "nothing written");
    // The next buffer the driver gives says so at once: VIRTIO_SCSI_T_NO_EVENT (0) with bit
    // 31 set.
    let e = h.alloc(16);
    h.add_chain(1, &[wr(e, 16)]);
    h.kick(1);
    assert_eq!(h.wait_used(1).1, 16);
    assert_eq!(le32(&h.get(e, 16), 0), 0x8000_0000);
}

/// A data-in buffer the device cannot write (past the end of guest memory) still gets a
/// response header, VIRTIO_SCSI_S_FAILURE (9): a Linux guest reads the header whatever the
/// used length says (virtscsi_complete_cmd). The READ does not run: it would read into a
/// buffer of the daemon's, which such requests could fill the daemon's memory with.
#[test]
fn a_data_in_buffer_outside_guest_memory_gets_a_failure_header() {
    use std::sync::atomic::Ordering::SeqCst;
    let (rec, mut h) = recorded();
    h.tur();
    // READ(10) (SBC-4 5.15) of one block into a buffer that ends past guest memory (4 MiB).
    let hd = h.header(LUN0, 79, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let r = h.alloc(RESP);
    h.put(r, &[0xEE; 12]);
    h.add_chain(2, &[rd(hd, REQ), wr(r, RESP), wr((4 << 20) - 256, 512)]);
    h.kick(2);
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r, 12)[11], 9, "VIRTIO_SCSI_S_FAILURE");
    assert_eq!(
        rec.own_buffers.load(SeqCst),
        0,
        "read into the daemon's memory"
    );
    assert_eq!(rec.lent_reads.load(SeqCst), 0);
}

/// virtio 1.2 5.6.6.1: with both data-out and data-in buffers and VIRTIO_SCSI_F_INOUT not
/// negotiated (the device does not offer it: feature bit 0), the request is returned at once
/// with VIRTIO_SCSI_S_FAILURE (9) and not run.
#[test]
fn a_bidirectional_request_fails_without_running() {
    let mut h = Harness::new();
    h.tur();
    assert_eq!(h.dev.features() & 1, 0, "VIRTIO_SCSI_F_INOUT not offered");
    // WRITE(10) (SBC-4 5.40) of LBA 9, one block of 77h, with a 512-byte data-in buffer too.
    let (len, resp, _) = h.command(LUN0, &[0x2A, 0, 0, 0, 0, 9, 0, 0, 1, 0], &[0x77; 512], 512);
    assert_eq!(len, RESP);
    assert_eq!(resp[11], 9, "VIRTIO_SCSI_S_FAILURE");
    let stored = h.stored(9, 1);
    assert_eq!(stored, vec![0; 512], "not written");
}

/// What may already be at a vhost-user socket's path: another kind of file is never removed
/// (a mistyped path must not cost a file, the served image least of all), a socket a live
/// process answers on is not taken over, a stale socket is replaced. The new socket is
/// mode 0660 whatever the umask, and a stop removes the path only while it is still the
/// server's own socket.
#[test]
fn a_socket_path_in_use_or_not_a_socket_is_refused_and_only_our_socket_is_removed() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind =
        |path: &std::path::Path| crate::bind_socket(path, crate::SOCKET_MODE, "vhost-user socket");
    let dir = tempfile::tempdir().unwrap();
    // A regular file.
    let file = dir.path().join("disk.img");
    std::fs::write(&file, b"data").unwrap();
    let e = bind(&file).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"data",
        "the file is untouched"
    );
    // A live socket.
    let live = dir.path().join("live.sock");
    let other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let e = bind(&live).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    assert!(std::fs::symlink_metadata(&live)
        .unwrap()
        .file_type()
        .is_socket());
    // A stale socket (its listener gone; the file stays).
    drop(other);
    let (_l, _) = bind(&live).expect("a stale socket is replaced");
    let mode = std::fs::metadata(&live).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "no staging folder left behind"
    );

    // A server's stop leaves alone a socket another process bound at the path since.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let path = dir.path().join("vm.sock");
    let mut cfg = socket_config(2, 1, Vec::new());
    cfg.path = path.clone();
    let server = VhostScsi::new(cfg.clone(), rt.handle().clone())
        .unwrap()
        .spawn()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let newer = std::os::unix::net::UnixListener::bind(&path).unwrap();
    server.stop();
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the newer socket stays"
    );
    drop(newer);
    std::fs::remove_file(&path).unwrap();
    // Its own socket it removes.
    let server = VhostScsi::new(cfg, rt.handle().clone())
        .unwrap()
        .spawn()
        .unwrap();
    assert!(std::fs::symlink_metadata(&path).is_ok());
    server.stop();
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "removed at the stop"
    );
}

/// A chain may have at most seg_max + 2 descriptors (the configuration says seg_max 1022): a
/// READ(10) of one block whose chain, in an indirect table, has 1024 descriptors (request,
/// response, 1022 one-byte data-in segments) is served; one with 1025 is returned unanswered
/// (used length 0) with its response buffer untouched, so no table of up to 65,535 entries
/// costs the daemon more than that.
#[test]
fn a_chain_with_more_descriptors_than_seg_max_allows_is_refused() {
    let mut h = Harness::new();
    h.tur();
    for (n, served) in [(1024usize, true), (1025, false)] {
        let hd = h.header(LUN0, n as u64, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let r = h.alloc(RESP);
        h.put(r, &[0xEE; 12]);
        let data = h.alloc((n - 2) as u32);
        let mut descs = vec![rd(hd, REQ), wr(r, RESP)];
        descs.extend((0..n - 2).map(|i| wr(data + i as u64, 1)));
        let t = h.indirect(&descs);
        let base = h.queue(2).next_desc;
        let table_len = 16 * n as u32;
        h.publish(2, base, &[(t, table_len, VRING_DESC_F_INDIRECT as u16, 0)]);
        h.kick(2);
        let (_, len) = h.wait_used(2);
        if served {
            // GOOD, response VIRTIO_SCSI_S_OK, residual 1022 - 512 = 510 (bytes 4..8).
            assert_eq!(len, RESP + 512, "{n} descriptors");
            assert_eq!(&h.get(r, 12), &[0, 0, 0, 0, 0xFE, 0x01, 0, 0, 0, 0, 0, 0]);
        } else {
            assert_eq!(len, 0, "{n} descriptors");
            assert_eq!(h.get(r, 12), vec![0xEE; 12]);
        }
    }
}

/// A driver may put a ring at guest address 0, but the queue library takes an avail ring
/// there for one not set up and pops nothing from it. With chains announced in it (avail
/// idx 1), the queue is set aside with a warning, and the kick returns: the queue's thread
/// does not spin on an entry no pop can reach (which also kept it from ever seeing the
/// socket's end).
#[test]
fn a_queue_whose_avail_ring_is_at_address_0_is_set_aside_not_spun_on() {
    use virtio_queue::QueueT as _;
    let h = Harness::new();
    let (desc, used) = {
        let st = h.req.vring.get_ref();
        (st.get_queue().desc_table(), st.get_queue().used_ring())
    };
    h.req.vring.set_queue_info(desc, 0, used).unwrap();
    // The avail ring's idx (bytes 2..4 of the ring, virtio 2.7.6) says one chain is there.
    h.put(2, &1u16.to_le_bytes());
    let (tx, rx) = std::sync::mpsc::channel();
    let kicked = std::thread::spawn(move || {
        h.kick(2);
        let _ = tx.send(());
        h
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the queue's thread is still spinning"
    );
    drop(kicked.join());
}

/// With VIRTIO_RING_F_EVENT_IDX the driver kicks after adding a buffer only when the device's
/// avail_event (after the used ring, virtio 2.7.10) says so. An event that finds no buffer
/// asks for that kick, so the buffer the driver adds next reports the lost event at once
/// (VIRTIO_SCSI_T_EVENTS_MISSED, virtio 5.6.6.3) instead of waiting for another event.
#[test]
fn an_event_without_a_buffer_asks_the_driver_to_kick_for_the_next_one() {
    let mut h = Harness::new();
    h.event.vring.set_queue_event_idx(true);
    let e1 = h.alloc(16);
    h.add_chain(1, &[wr(e1, 16)]);
    h.kick(1);
    // Two LUs added: the first event takes the buffer, the second finds none.
    h.vs.add_lu(0, 1, lu(8)).unwrap();
    assert_eq!(h.wait_used(1).1, 16);
    h.vs.add_lu(0, 2, lu(8)).unwrap();
    // The driver adds a buffer (avail idx 1 -> 2) and kicks only if vring_need_event
    // (virtio 2.7.10.1): (new - avail_event - 1) < (new - old), in u16 arithmetic.
    let e2 = h.alloc(16);
    h.add_chain(1, &[wr(e2, 16)]);
    let used = h.event.used;
    let avail_event = u16::from_le_bytes(
        h.get(used + 4 + 8 * u64::from(QSIZE), 2)
            .try_into()
            .unwrap(),
    );
    let (new, old) = (2u16, 1u16);
    let kicks = new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old);
    assert!(
        kicks,
        "avail_event {avail_event}: the driver would not kick"
    );
    h.kick(1);
    assert_eq!(h.wait_used(1).1, 16);
    // VIRTIO_SCSI_T_NO_EVENT (0) with bit 31: events were lost.
    assert_eq!(le32(&h.get(e2, 16), 0), 0x8000_0000);
}

/// Give `vring` a call eventfd, as the frontend does (SET_VRING_CALL); returns the test's end
/// of it (non-blocking: a read fails while no interrupt was signalled).
fn give_call_fd(vring: &Vring) -> vmm_sys_util::eventfd::EventFd {
    let call = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(call.try_clone().unwrap());
    // SAFETY: `fd` is a descriptor of its own (a duplicate), owned by the File from here on.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    vring.set_call(Some(file));
    call
}

/// VIRTIO_F_EVENT_IDX on a request queue (virtio 1.2 2.7.10): the device interrupts only when
/// the used index passes the driver's used_event, and once it has served the queue it asks
/// for a kick at the next chain through avail_event.
#[test]
fn a_request_queue_with_event_idx_interrupts_and_asks_for_kicks_as_the_driver_set() {
    let mut h = Harness::new();
    h.tur();
    h.dev.set_event_idx(true);
    h.req.vring.set_queue_event_idx(true);
    let call = give_call_fd(&h.req.vring);
    let (avail, used) = (h.req.avail, h.req.used);
    // used_event is the u16 after the avail ring's entries, avail_event the u16 after the
    // used ring's (virtio 1.2 2.7.6, 2.7.8).
    let used_event_at = avail + 4 + 2 * u64::from(QSIZE);
    let avail_event_at = used + 4 + 8 * u64::from(QSIZE);
    let u = h.used_count(2);
    // The driver wants an interrupt once the used index passes u + 1: not for the next
    // answer (u -> u + 1), but for the one after (u + 1 -> u + 2).
    h.put(used_event_at, &u.wrapping_add(1).to_le_bytes());
    for (tag, interrupt) in [(11, false), (12, true)] {
        let r = tur_chain(&mut h, 2, tag);
        h.kick(2);
        assert_eq!(h.wait_used(2).1, RESP);
        assert_eq!(h.get(r, 12), vec![0; 12]);
        let signalled = call.read().ok();
        assert_eq!(
            signalled.is_some(),
            interrupt,
            "tag {tag}: interrupt {signalled:?}"
        );
    }
    // Served and no chain left: avail_event is the next chain's avail index, so the driver's
    // vring_need_event(avail_event, new, old) holds for that chain and it kicks.
    let next = h.req.vring.queue_next_avail();
    let avail_event = u16::from_le_bytes(h.get(avail_event_at, 2).try_into().unwrap());
    assert_eq!(avail_event, next);
    let (new, old) = (next.wrapping_add(1), next);
    assert!(new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old));
}

/// Put a TEST UNIT READY chain (tag 5) on request queue 2 and kick it: the queue's thread pops
/// it and stops right after (the `after_pop` hook), holding the queue's pop lock until the
/// returned guard is dropped (which opens the gate however the test ends). Returns the guard,
/// the chain's response address, and the thread handling the kick.
fn hold_a_popped_chain(h: &mut Harness) -> (impl Drop, u64, std::thread::JoinHandle<()>) {
    let (gate, open) = closed_gate();
    *h.dev.hooks.after_pop.lock().unwrap() = Some(gate);
    let popped = h.req.vring.queue_next_avail();
    let r = tur_chain(h, 2, 5);
    let kicked = h.kick_in_thread(2);
    // Popped, and the hook taken by that thread (the pop moves the queue on before the hook
    // is taken: another request queue's pop in between would take it).
    let start = Instant::now();
    while h.req.vring.queue_next_avail() == popped
        || h.dev.hooks.after_pop.lock().unwrap().is_some()
    {
        assert!(start.elapsed() < Duration::from_secs(10), "not popped");
        std::thread::sleep(Duration::from_millis(1));
    }
    (open, r, kicked)
}

/// Two request queues on two threads are served in parallel: while the first queue's thread
/// is held between a pop and its request, the second queue's thread serves its own.
#[test]
fn a_thread_held_in_its_queue_does_not_hold_up_another_threads_queue() {
    let mut h = Harness::with_queues(lu(64), 2, 2);
    h.tur();
    // Thread 0: the control and event queues; thread 1: queue 2; thread 2: queue 3.
    assert_eq!(h.dev.queues_per_thread(), vec![0b11, 0b100, 0b1000]);
    let (open, r2, kicked) = hold_a_popped_chain(&mut h);
    let r3 = tur_chain(&mut h, 3, 6);
    // Kicked from another thread: were queue 3 held up by queue 2, the kick would block, and
    // `wait_used` would fail the test after its 10 s rather than the test hang.
    let kicked3 = h.kick_in_thread(3);
    assert_eq!(h.wait_used(3).1, RESP);
    // GOOD: sense_len 0, resid 0, status 0, response VIRTIO_SCSI_S_OK (over the EEh the
    // response buffer was filled with).
    assert_eq!(h.get(r3, 12), vec![0; 12]);
    assert!(
        !kicked.is_finished(),
        "the first queue's thread is still held"
    );
    kicked3.join().unwrap();
    drop(open);
    kicked.join().unwrap();
    assert_eq!(h.wait_used(2).1, RESP);
    assert_eq!(h.get(r2, 12), vec![0; 12]);
}

/// ABORT TASK of a request the queue's thread has popped but not yet put in flight: the
/// function waits for it to be taken in, so it is returned before the function's response,
/// never run after it.
#[test]
fn task_management_waits_for_a_chain_popped_but_not_yet_in_flight() {
    let mut h = Harness::new();
    h.tur();
    let used = h.used_count(2);
    let (open, _r, kicked) = hold_a_popped_chain(&mut h);
    // ABORT TASK (subtype 0) of tag 5, the popped TEST UNIT READY.
    let (tr, ctrl0) = h.send_tmf(0, LUN0, 5);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        h.used_count(0),
        ctrl0,
        "ABORT TASK answered while its task was popped but not in flight"
    );
    drop(open);
    kicked.join().unwrap();
    h.wait_control_used(ctrl0);
    assert_eq!(
        h.used_count(2),
        used.wrapping_add(1),
        "tag 5 not returned before the TMF response"
    );
    // FUNCTION COMPLETE (0).
    assert_eq!(h.get(tr, 1), vec![0]);
}

/// GET_VRING_BASE while the queue's thread has popped a chain and not yet put it in flight:
/// vhost-user-backend marks the ring not ready, calls `stop_vring`, then reports next_avail,
/// which counts the chain as consumed. The stop waits for that chain, so it is answered before
/// the stop returns, rather than run afterwards (into buffers the driver has taken back) with
/// its answer dropped and the driver waiting for it in vain.
#[test]
fn a_queue_stop_waits_for_a_chain_popped_just_before_it() {
    let mut h = Harness::new();
    h.tur();
    let used = h.used_count(2);
    let call = give_call_fd(&h.req.vring);
    let (open, r, kicked) = hold_a_popped_chain(&mut h);
    // GET_VRING_BASE of the queue: not ready, stop_vring, then the call fd is dropped.
    h.req.vring.set_queue_ready(false);
    let (dev, vring) = (h.dev.clone(), h.req.vring.clone());
    let stop = std::thread::spawn(move || {
        dev.stop_vring(2).unwrap();
        vring.set_call(None);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stop.is_finished(),
        "the stop did not wait for the popped chain"
    );
    drop(open);
    kicked.join().unwrap();
    stop.join().unwrap();
    assert_eq!(
        h.used_count(2),
        used.wrapping_add(1),
        "the chain was answered"
    );
    // The interrupt for it went out on the call fd before the stop returned: its counter is 1.
    assert_eq!(call.read().ok(), Some(1), "the driver was told");
    // VIRTIO_SCSI_S_OK, GOOD: the response header's status (byte 10) and response (11).
    assert_eq!(h.get(r, 12)[10..12], [0, 0]);
}

/// A queue stop and a device reset wait for the queue's thread to finish the chain it popped
/// (see `a_queue_stop_waits_for_a_chain_popped_just_before_it`), but not past the socket's
/// closing: a thread stuck in one chain (a write in place waiting for the disk) must not keep
/// the vhost-user handler thread from ending the connection.
#[test]
fn a_stop_and_a_reset_waiting_for_a_queue_thread_give_up_when_the_socket_closes() {
    let mut h = Harness::new();
    h.tur();
    let (open, _, kicked) = hold_a_popped_chain(&mut h);
    let gave_up = stop_and_reset_until_closing(&h.dev, "while the queue's thread held a chain");
    // Frees the queue's thread (and a wait still running), so the test ends either way.
    drop(open);
    kicked.join().unwrap();
    assert_eq!(
        gave_up,
        (true, true),
        "(queue stop, device reset) ended after the socket closed"
    );
}

/// A WRITE beyond MAXIMUM TRANSFER LENGTH (8 MiB) is refused by its CDB, whatever its size:
/// QEMU gives the guest its own config space (max_sectors 0xFFFF, 32 MiB), so a guest may
/// send one. It gets CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB (SBC-4 6.6.4),
/// not a transport failure, and nothing is written.
#[test]
fn a_write_beyond_the_maximum_transfer_length_is_an_invalid_field_whatever_its_size() {
    let mut h = Harness::with_lu(lu(40_000));
    h.tur();
    // WRITE(16), LBA 0, TRANSFER LENGTH 9000h blocks (18 MiB of 512-byte blocks).
    let cdb = [
        0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x90, 0x00, 0, 0,
    ];
    let hdr = h.header(LUN0, 7, &cdb);
    // 18 data-out descriptors of 1 MiB over the same guest buffer, full of 0xAB.
    let buf = h.alloc(1 << 20);
    h.put(buf, &vec![0xAB; 1 << 20]);
    let mut descs = vec![rd(hdr, REQ)];
    descs.extend((0..18).map(|_| rd(buf, 1 << 20)));
    let r = h.alloc(RESP);
    descs.push(wr(r, RESP));
    h.add_chain(2, &descs);
    h.kick(2);
    h.wait_used(2);
    let resp = h.get(r, RESP);
    // virtio_scsi_cmd_resp: sense_len (0..4), resid (4..8), status_qualifier (8..10), status
    // (10), response (11: VIRTIO_SCSI_S_OK), sense from byte 12.
    assert_eq!((resp[10], resp[11]), (0x02, 0), "CHECK CONDITION, S_OK");
    let sense = &resp[12..];
    // Fixed format: ILLEGAL REQUEST, 24h/00h, field pointer C=1 BPV=1 bit 7 of CDB byte 10.
    assert_eq!(
        (sense[2] & 0x0F, sense[12], sense[13], &sense[15..18]),
        (0x05, 0x24, 0x00, &[0xCF, 0x00, 0x0A][..])
    );
    assert_eq!(h.stored(0, 8), vec![0; 8 * 512], "nothing written");
}
