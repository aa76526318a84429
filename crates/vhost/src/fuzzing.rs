//! Entry point for the fuzz target `vhost_queues` (fuzz/): what a malicious guest controls (the
//! descriptor tables, the avail rings, the bytes its buffers hold) built from arbitrary input
//! and handed to the device's control and request queues. The daemon must not panic, and
//! must not touch memory outside the guest's (vm-memory checks every access).
//!
//! Layout of the guest's 1 MiB: the control queue's descriptor table, avail and used rings at
//! 0x0000/0x0100/0x0200, the event queue's at 0x0400/0x0500/0x0600, the request queue's at
//! 0x1000/0x1100/0x1200 (queue size 16), and the input's remaining bytes from 0x2000 on. The
//! input is, per queue (control, event, request): one byte of how many heads to make
//! available (low 5 bits), 16 descriptors of 8 bytes (address: 3 bytes, so that one in
//! sixteen lies in guest memory; length: 2 bytes, its top bit making it 2^31 + the rest;
//! flags: 1 byte, as the raw field's low byte; next: 2 bytes), then the heads (2 bytes each);
//! then one byte of options and LU changes (bit 2: the device has a second request queue,
//! served by the first one's thread, laid out from the same bytes as the first at
//! 0x1800/0x1900/0x1A00, so both queues' chains share the guest's buffers; bit 0: add LUN 2 and
//! bit 1: remove LUN 1 after the queues ran, each posting an event into the event queue's
//! buffers).

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::device::{lock, Device, Gm, Mem, Vring};
use crate::{LunConfig, SocketConfig, VhostScsi};

const QSIZE: u16 = 16;
const MEM: u64 = 1 << 20;
const DATA_AT: u64 = 0x2000;

/// Run `data` as a guest's queues against a device with two LUs (LUN 0 and 1 of target 0)
/// on memory disks. Returns the used index of each request queue afterwards (none when the
/// input could not be laid out).
pub fn queues(data: &[u8]) -> Vec<u16> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let lu = |blocks, bs| scsi::fuzzing::memory_lu(blocks, bs, "vhost-fuzz");
    let (Some(lu0), Some(lu1)) = (lu(64, 512), lu(8, 4096)) else {
        return Vec::new();
    };
    let Ok(mem) = Mem::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return Vec::new();
    };
    let gm: Gm = GuestMemoryAtomic::new(mem);
    let mut rest = data;
    let ctrl = guest_queue(&gm, 0x0000, &mut rest);
    let event = guest_queue(&gm, 0x0400, &mut rest);
    let req_bytes = rest;
    let req = guest_queue(&gm, 0x1000, &mut rest);
    let (Some(ctrl), Some(event), Some(req)) = (ctrl, event, req) else {
        return Vec::new();
    };
    let changes = rest.first().copied().unwrap_or(0);
    rest = rest.get(1..).unwrap_or_default();
    let mut reqs = vec![req];
    if changes & 4 != 0 {
        let Some(req2) = guest_queue(&gm, 0x1800, &mut { req_bytes }) else {
            return Vec::new();
        };
        reqs.push(req2);
    }
    let m = gm.memory();
    let n = rest.len().min((MEM - DATA_AT) as usize);
    let _ = m.write_slice(&rest[..n], GuestAddress(DATA_AT));

    let Ok(vs) = VhostScsi::new(
        SocketConfig {
            path: "/nonexistent".into(),
            initiator_name: "vhost:fuzz".into(),
            target_name: "iqn.2026-01.io.sharedisk:vhost-fuzz".into(),
            relative_port_id: crate::FIRST_RELATIVE_PORT_ID,
            num_queues: reqs.len() as u16,
            threads: 1,
            watch_max: crate::DEFAULT_WATCH_MAX,
            luns: vec![
                LunConfig {
                    target: 0,
                    lun: 0,
                    lu: lu0,
                },
                LunConfig {
                    target: 0,
                    lun: 1,
                    lu: lu1,
                },
            ],
        },
        rt.handle().clone(),
    ) else {
        return Vec::new();
    };
    let dev = Device::new(vs.shared.clone(), gm.clone(), std::sync::Arc::default());
    dev.acked_features(dev.features());
    *lock(&vs.shared.current) = Some(dev.clone());

    let ctrl_event = [ctrl, event];
    let _ = dev.handle_event(0, EventSet::IN, &ctrl_event, 0);
    let _ = dev.handle_event(1, EventSet::IN, &ctrl_event, 0);
    // A kick of the first request queue; with two, one of the second as well (the thread
    // serves both on either).
    for i in 0..reqs.len() as u16 {
        let _ = dev.handle_event(i, EventSet::IN, &reqs, 1);
    }
    if changes & 1 != 0 {
        if let Some(l) = lu(8, 512) {
            let _ = vs.add_lu(0, 2, l);
        }
    }
    if changes & 2 != 0 {
        let _ = vs.remove_lu(0, 1);
    }
    // Commands that had to wait run on the runtime; let them finish, then deliver the wake
    // their completions send the queue's thread.
    rt.block_on(async {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    });
    if dev.wake_pending(1) {
        let _ = dev.handle_event(dev.wake_event(), EventSet::IN, &reqs, 1);
    }
    // The socket's `current` device refers back to the socket's shared state; a disconnect
    // clears it, as here.
    *lock(&vs.shared.current) = None;
    reqs.iter()
        .map(|v| {
            v.get_ref()
                .get_queue()
                .used_idx(&*m, std::sync::atomic::Ordering::Acquire)
                .map_or(0, |i| i.0)
        })
        .collect()
}

/// Lay out one queue at `at` from the input (see the module's documentation); `None` when
/// guest memory cannot be written.
fn guest_queue(gm: &Gm, at: u64, rest: &mut &[u8]) -> Option<Vring> {
    let mut take = |n: usize| {
        let (head, tail) = rest.split_at(n.min(rest.len()));
        *rest = tail;
        let mut b = [0u8; 8];
        b[..head.len()].copy_from_slice(head);
        b
    };
    let m = gm.memory();
    let heads = take(1)[0] & 0x1F;
    let (desc, avail, used) = (at, at + 0x100, at + 0x200);
    for i in 0..u64::from(QSIZE) {
        let b = take(8);
        let addr = u64::from(u32::from_le_bytes([b[0], b[1], b[2], 0]));
        let len16 = u16::from_le_bytes([b[3], b[4]]);
        let len = if len16 & 0x8000 != 0 {
            0x8000_0000 | u32::from(len16 & 0x7FFF)
        } else {
            u32::from(len16)
        };
        let flags = u16::from(b[5]);
        let next = u16::from_le_bytes([b[6], b[7]]);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&d, GuestAddress(desc + 16 * i)).ok()?;
    }
    for i in 0..u64::from(heads) {
        let b = take(2);
        let head = u16::from_le_bytes([b[0], b[1]]);
        m.write_obj(head, GuestAddress(avail + 4 + 2 * (i % u64::from(QSIZE))))
            .ok()?;
    }
    m.write_obj(u16::from(heads), GuestAddress(avail + 2))
        .ok()?;
    let v = Vring::new(gm.clone(), 1024).ok()?;
    v.set_queue_size(QSIZE);
    v.set_queue_info(desc, avail, used).ok()?;
    v.set_queue_ready(true);
    v.set_enabled(true);
    Some(v)
}

#[cfg(test)]
mod tests {
    /// The entry point takes any bytes, including none and a short input.
    #[test]
    fn arbitrary_bytes() {
        super::queues(&[]);
        super::queues(&[0xFF; 7]);
        // One writable 16-byte event buffer at 0x3000 on the event queue, then both LU
        // changes: two events, the second one missed.
        let mut input = vec![0u8; 1 + 16 * 8]; // control queue: nothing available
        input.push(1); // event queue: one head
        input.extend([0x00, 0x30, 0x00, 16, 0, 2, 0, 0]); // 0x3000, 16 bytes, WRITE
        input.extend([0u8; 15 * 8]);
        input.extend([0, 0]); // head 0
        input.extend([0u8; 1 + 16 * 8]); // request queue: nothing available
        input.push(3); // add LUN 2, remove LUN 1
        super::queues(&input);
        // The WRITE(10) seed's one request is answered; with a second request queue that
        // copies the first (options bit 2), on each queue.
        let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/vhost_queues");
        let seed = |name: &str| std::fs::read(format!("{seeds}/{name}")).expect("the seed");
        assert_eq!(super::queues(&seed("write10")), vec![1]);
        assert_eq!(super::queues(&seed("two_queues_write10")), vec![1, 1]);
        assert_eq!(super::queues(&seed("two_queues_two_requests")), vec![2, 2]);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..600)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            super::queues(&bytes);
        }
    }
}
