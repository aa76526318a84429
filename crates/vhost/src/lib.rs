//! vhost-user-scsi: QEMU guests reach sharedisk's SCSI disks through a virtio-scsi device whose
//! queues live in this process (virtio 1.2 section 5.6, the vhost-user protocol), built on the
//! rust-vmm crates (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`).
//!
//! # Model
//! - A [`VhostScsi`] is one vhost-user socket. It is **one I_T nexus**: initiator port
//!   [`scsi::Transport::Vhost`] with the configured initiator name and no ISID, target port with
//!   the configured name and a relative target port identifier. The daemon gives each
//!   vhost-user socket one in [`FIRST_RELATIVE_PORT_ID`] (0x8000) to 0xFFFF (configured, or
//!   derived from the socket's path), and an iSCSI target's is its TPGT (1 for TPGT 0; below
//!   0x8000), so the two ranges never meet on one LU.
//! - Behind the socket sit logical units addressed as virtio-scsi does: the request's `lun`
//!   field is `[1, target, LUN (SAM single level, flat or peripheral addressing), 0, 0, 0, 0]`.
//!   Each virtio target id is a [`scsi::Target`] (so REPORT LUNS lists that target's LUNs).
//!   The same `Arc<scsi::LogicalUnit>` may sit behind several sockets and iSCSI targets: one
//!   task set, one reservation state, one set of range locks.
//! - A missing virtio target (or a `lun` field whose first byte is not 1) is answered with
//!   VIRTIO_SCSI_S_BAD_TARGET. A missing LUN on a target that exists is answered by the SCSI
//!   layer (LOGICAL UNIT NOT SUPPORTED; INQUIRY with peripheral qualifier 011b), which is what
//!   Linux's LUN scan expects; BAD_TARGET there would hide the target's other LUNs.
//! - When the frontend disconnects (QEMU exits or is killed) the nexus is lost: its tasks are
//!   aborted and every command the connection had in flight is waited for (so none of its
//!   writes lands after the next connection's), then [`scsi::Target::nexus_lost`] drops its
//!   unit attention state and releases its SPC-2 reservations (persistent reservations stay),
//!   and only then does the socket accept the next connection, without a restart.
//! - A virtio device reset (VHOST_USER_RESET_DEVICE: the guest's driver resets the device, the
//!   VM reboots) is an I_T nexus reset, as the I_T NEXUS RESET function is: the nexus's tasks
//!   are aborted and waited for (up to 10 s), its SPC-2 reservations released, and its next
//!   command reports I_T NEXUS LOSS OCCURRED.
//!
//! # Queues and threads
//! Queue 0 is the control queue, 1 the event queue, 2.. the request queues (`num_queues` of
//! them). vhost-user-backend runs one epoll thread per entry of
//! `VhostUserBackend::queues_per_thread`: thread 0 serves the control and event queues, and the
//! request queues are dealt out in turn to [`SocketConfig::threads`] threads (queue `2 + i` to
//! thread `1 + i % threads`), which pop them in parallel. A thread serves all its queues in one
//! loop: a kick of any of them, or a completion that makes room on one, drains every one that is
//! ready, and the thread watches all their avail rings after a drain, so none waits for another's
//! kick. Fewer threads than queues spare the host's cores for the guest's vCPUs, and spare
//! writers to one image its inode lock (see [`default_threads`]). The thread validates the
//! chain, copies the header and data-out, takes the task-set ticket ([`scsi::Target::admit`]) and runs the command on the spot until it first has
//! to wait, as the iSCSI frontend does: a read the page cache holds, or a write with no other
//! write in flight, completes on the queue's thread with no task and no thread hop, and the
//! used entries of everything that completed during one drain of the queue share one interrupt
//! (interrupts are what a guest pays most for). After a drain the thread sends that interrupt
//! and watches the avail ring for a moment (at most [`SocketConfig::watch_max`]; not at all when
//! that is zero) before it turns the guest's notifications back on, so a busy guest does not
//! pay a kick (an exit) for every request. A command that waits (io_uring, range locks,
//! the reservation lock) becomes a task on the daemon's tokio runtime: the SCSI and block
//! layers are async, and a queue's thread must keep popping while its earlier commands wait for
//! the disk, or a guest's queue depth would collapse to 1. The task writes the response and
//! data-in into guest memory and returns the chain to the used ring (with the EVENT_IDX
//! suppression the driver asked for). Task management
//! runs as a task too, so an ABORT TASK or LOGICAL UNIT RESET that waits for running commands
//! blocks neither the control queue nor the request queues. Its response is written only once
//! every request of the connection it may have ended (ABORT TASK: that LU and tag; ABORT TASK
//! SET, CLEAR TASK SET, LOGICAL UNIT RESET: that LU; I_T NEXUS RESET: all) has its used ring
//! entry written, aborted or not: Linux's driver takes a completed TMF to mean exactly that.
//!
//! When the frontend stops the queues (GET_VRING_BASE: the VM is stopped, migrated, or its
//! driver resets the device) the first stop lets every chain in flight on the connection come
//! back normally for up to 5 s, then aborts the nexus's tasks and waits for the running ones
//! however long they take (a warning every 10 s); the later stops find nothing left. It never
//! returns with a command in flight: its guest buffers are lent to the driver, so a transfer
//! the kernel finished late would touch memory the guest has taken back. A device reset and a
//! closed connection wait the same way. Only the socket being closed ([`Server::stop`], as
//! on SIGTERM) ends these waits early, so that a command stuck in the backend cannot keep the
//! daemon from exiting.
//!
//! # Data path
//! A READ or WRITE lends the guest's data-in or data-out buffers to the SCSI layer as
//! `block::IoBuf`s (pointers into the mapped guest memory, checked by vm-memory and kept
//! mapped by the buffer): the file driver transfers between them and the image with no copy
//! in between (`sg.rs`). Other commands copy their parameter list out of guest memory and
//! their data-in into it.
//!
//! # A guest that misbehaves
//! Every guest address goes through vm-memory's checked accessors; descriptor chains come from
//! virtio-queue's iterator (indirect tables, loops and 4 GiB bound checked there). A chain with
//! a readable descriptor after a writable one, or without room for the response header, goes
//! back with length 0; a short or unreadable request header, data-out over 16 MiB or outside
//! guest memory gets VIRTIO_SCSI_S_FAILURE; a READ (or WRITE) whose CDB asks for more data
//! than the driver's buffers hold gets VIRTIO_SCSI_S_OVERRUN before anything is read (or
//! written), as with QEMU; any other command's data-in larger than the buffers gets the part
//! that fits and VIRTIO_SCSI_S_OVERRUN. Nothing a guest sends reaches a panic.
//!
//! What a guest can make the daemon hold is bounded: a queue has at most its queue size of
//! chains in flight; a head the driver offers again while it is in flight is answered with
//! VIRTIO_SCSI_S_FAILURE and never run (the request in flight keeps its buffers); only the
//! data-out the CDB asks for is copied (the rest is reported as residual); a READ reads into
//! the guest's own buffers, never into one of the daemon's for data the guest has no room
//! for; and a connection
//! holds at most 64 MiB of copied data-out. A chain that does not fit stays in the ring, and
//! the completion that makes room wakes the queue's thread (an eventfd registered with its
//! epoll loop), so a queue never waits for a kick that may not come.
//!
//! # Events and run-time LU changes
//! With VIRTIO_SCSI_F_HOTPLUG negotiated, [`VhostScsi::add_lu`] and [`VhostScsi::remove_lu`]
//! post VIRTIO_SCSI_T_TRANSPORT_RESET events (reason RESCAN / REMOVED) into the buffers the
//! driver keeps on the event queue; an event that finds no buffer sets
//! VIRTIO_SCSI_T_EVENTS_MISSED on the next one (Linux then rescans). An event names the LUN as
//! REPORT LUNS does ([`wire::event_lun`]): Linux adds or removes the LUN that number gives.
//! Without a connected frontend the map changes and no event is sent; the next guest finds
//! the LU when it scans. Either way the socket's nexus gets REPORTED LUNS DATA HAS CHANGED
//! (3Fh/0Eh) on its next command to each other LU of the target (SPC-5), the way a guest
//! without hotplug learns of the change. A request that looked its target up before a removal
//! checks the map again once it holds its ticket, so it never runs on the removed LU.
//! The daemon calls them for `sharedisk lu add|remove`; tested here
//! against mock queues and in `scripts/guest` (vhost-user/hotplug) against a Linux guest.
//! With VIRTIO_SCSI_F_CHANGE negotiated, [`VhostScsi::param_change`] posts a
//! VIRTIO_SCSI_T_PARAM_CHANGE event with the unit attention's ASC and ASCQ; the daemon sends
//! CAPACITY DATA HAS CHANGED (2Ah/09h) for `sharedisk lu rescan`, on which Linux rescans the
//! device and takes its new size. The unit attention is queued as well, for a driver without
//! the feature.

mod device;
pub mod fuzzing;
mod sg;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use device::{lock, Device, Shared};

/// The lowest relative target port identifier the daemon gives a vhost-user socket (it gives
/// them 0x8000 to 0xFFFF); iSCSI target ports use their TPGT, below it.
pub const FIRST_RELATIVE_PORT_ID: u16 = 0x8000;
/// The most request queues a socket offers (the queue masks of vhost-user-backend are 64
/// bits wide, and two queues are the control and event queues).
pub const MAX_QUEUES: u16 = 62;
/// The highest LUN flat space addressing reaches (SAM-5 4.7.7.4).
pub const MAX_LUN: u16 = 0x3FFF;

/// A logical unit behind a socket.
#[derive(Clone)]
pub struct LunConfig {
    /// Virtio target id (byte 1 of the `lun` field).
    pub target: u8,
    /// LUN within the target, at most [`MAX_LUN`].
    pub lun: u16,
    pub lu: Arc<scsi::LogicalUnit>,
}

/// One vhost-user-scsi socket.
#[derive(Clone)]
pub struct SocketConfig {
    /// Where the socket is created (an existing socket file is replaced).
    pub path: PathBuf,
    /// The initiator name of the socket's I_T nexus (READ FULL STATUS shows it).
    pub initiator_name: String,
    /// The target port's name (VPD 0x83 SCSI name strings).
    pub target_name: String,
    /// RELATIVE TARGET PORT IDENTIFIER, unique among the target ports of each LU; also the
    /// port's TPGT in its name string.
    pub relative_port_id: u16,
    /// Request queues offered (1..=[`MAX_QUEUES`]); QEMU's `num_queues` may be at most this.
    pub num_queues: u16,
    /// Threads that serve the request queues (1..=`num_queues`): queue `2 + i` is served by
    /// thread `1 + i % threads`. See [`default_threads`].
    pub threads: u16,
    /// The longest a request-queue thread watches its avail rings after a drain before it
    /// asks for a kick and sleeps, up to [`WATCH_LIMIT`]; [`DEFAULT_WATCH_MAX`] unless an
    /// operator chose otherwise. Zero: no watch, a kick for every request that finds the
    /// thread asleep (what vhost-device-scsi does), for hosts whose cores are short.
    pub watch_max: Duration,
    pub luns: Vec<LunConfig>,
}

/// [`SocketConfig::watch_max`] by default. Measured with bench/vhost.sh (guest fio, TCG): 50 µs
/// lifted 4 KiB random reads at QD16 by half, 200 µs the QD1 rows and writes as well. At
/// 200 µs a guest at QD1 still offered its next request after the watch had ended 39-63% of
/// the time (and paid a kick for it); at 600 µs about 1%, and every row rose (four runs
/// alternating the two). How long each watch lasts within this is the thread's choice (the
/// `device` module's `Watch`).
pub const DEFAULT_WATCH_MAX: Duration = Duration::from_micros(600);

/// The longest [`SocketConfig::watch_max`] accepted: a watch is a thread that yields its core
/// over and over, and a longer one only keeps it from sleeping between requests further apart.
pub const WATCH_LIMIT: Duration = Duration::from_millis(10);

/// Whether `watch_max` can be served: the check [`VhostScsi::new`] makes, for a configuration
/// read before sockets exist.
pub fn check_watch(watch_max: Duration) -> Result<(), ConfigError> {
    if watch_max > WATCH_LIMIT {
        return Err(ConfigError::Watch(watch_max.as_micros()));
    }
    Ok(())
}

/// The request-queue threads a socket with `num_queues` request queues gets when none are
/// configured: half the host's cores (at least one), at most one per queue. A queue's thread
/// spins on its avail ring after each drain unless the socket's watch is off (see the module
/// documentation and [`SocketConfig::watch_max`]), and the guest's
/// vCPUs need cores too. On a 2-core host with a 2-vCPU guest (bench/vhost.sh's rows, two
/// queues, four alternating runs each), one thread serving both queues did 4 KiB random reads
/// at QD16 15% faster than a thread per queue (medians 43.2k and 37.5k IOPS) and writes 11%
/// faster (27.6k and 24.8k); two threads also contend for the image's inode lock.
pub fn default_threads(num_queues: u16) -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let half = u16::try_from((cores / 2).max(1)).unwrap_or(u16::MAX);
    half.min(num_queues).max(1)
}

/// Whether `num_queues` request queues (and `threads` threads for them, when set) can be
/// served: the check [`VhostScsi::new`] makes, for a configuration read before sockets exist.
pub fn check_queues(num_queues: u16, threads: Option<u16>) -> Result<(), ConfigError> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(ConfigError::Queues(num_queues));
    }
    match threads {
        Some(t) if t == 0 || t > num_queues => Err(ConfigError::Threads(t, num_queues)),
        _ => Ok(()),
    }
}

/// A socket configuration that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("num_queues must be 1 to {MAX_QUEUES}, not {0}")]
    Queues(u16),
    #[error("threads must be 1 to num_queues ({1}), not {0}")]
    Threads(u16, u16),
    #[error("the avail-ring watch (watch_us; quick start: --vhost-watch-us) must be 0 to {limit} µs, not {0} µs", limit = WATCH_LIMIT.as_micros())]
    Watch(u128),
    #[error("LUN {0} is above {MAX_LUN}")]
    Lun(u16),
    #[error("target {0} LUN {1} is configured twice")]
    Duplicate(u8, u16),
    #[error("target {0} is above the socket's highest target {1} (fixed when it was created)")]
    Target(u8, u8),
    #[error("the relative target port identifier must not be 0")]
    RelativePortId,
    #[error("the initiator name must not be empty")]
    InitiatorName,
}

/// A vhost-user-scsi device served on one socket: its I_T nexus and LUN map, and the
/// connections that come and go.
#[derive(Clone)]
pub struct VhostScsi {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl VhostScsi {
    /// A device for `config`, whose commands run on `runtime`.
    pub fn new(
        config: SocketConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<VhostScsi, ConfigError> {
        check_queues(config.num_queues, Some(config.threads))?;
        check_watch(config.watch_max)?;
        if config.relative_port_id == 0 {
            return Err(ConfigError::RelativePortId);
        }
        if config.initiator_name.is_empty() {
            return Err(ConfigError::InitiatorName);
        }
        let mut targets: BTreeMap<u8, scsi::Target> = BTreeMap::new();
        for l in &config.luns {
            if l.lun > MAX_LUN {
                return Err(ConfigError::Lun(l.lun));
            }
            let t = targets.entry(l.target).or_default();
            if t.lu(u64::from(l.lun)).is_some() {
                return Err(ConfigError::Duplicate(l.target, l.lun));
            }
            t.add_lu(u64::from(l.lun), l.lu.clone());
        }
        let port = scsi::TargetPort {
            name: config.target_name.clone(),
            tpgt: config.relative_port_id,
            relative_id: config.relative_port_id,
        };
        for l in &config.luns {
            l.lu.add_target_port(port.clone(), scsi::Transport::Vhost);
        }
        let max_target = targets.keys().next_back().copied().unwrap_or(0);
        let nexus = Arc::new(scsi::ItNexus {
            initiator: scsi::InitiatorPort {
                transport: scsi::Transport::Vhost,
                name: config.initiator_name,
                isid: None,
            },
            target: port,
        });
        Ok(VhostScsi {
            shared: Arc::new(Shared {
                nexus,
                targets: ArcSwap::from_pointee(
                    targets.into_iter().map(|(k, t)| (k, Arc::new(t))).collect(),
                ),
                update: Mutex::new(()),
                runtime,
                num_queues: config.num_queues,
                threads: config.threads,
                watch_max: config.watch_max,
                max_target,
                current: Mutex::new(None),
            }),
            path: config.path,
        })
    }

    /// The socket's I_T nexus.
    pub fn nexus(&self) -> &Arc<scsi::ItNexus> {
        &self.shared.nexus
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest virtio target [`VhostScsi::add_lu`] accepts: the highest the socket started
    /// with (its configuration space's `max_target`).
    pub fn max_target(&self) -> u8 {
        self.shared.max_target
    }

    /// Whether a frontend is connected now (an event reaches its guest only then).
    pub fn connected(&self) -> bool {
        lock(&self.shared.current).is_some()
    }

    /// Put `lu` at `target`/`lun` while the guest runs, and tell the guest (a
    /// VIRTIO_SCSI_T_TRANSPORT_RESET event, reason RESCAN). `target` may not exceed the highest
    /// target the socket started with (the guest learnt `max_target` then).
    pub fn add_lu(
        &self,
        target: u8,
        lun: u16,
        lu: Arc<scsi::LogicalUnit>,
    ) -> Result<(), ConfigError> {
        if lun > MAX_LUN {
            return Err(ConfigError::Lun(lun));
        }
        if target > self.shared.max_target {
            return Err(ConfigError::Target(target, self.shared.max_target));
        }
        {
            let _g = lock(&self.shared.update);
            let mut map = (**self.shared.targets.load()).clone();
            let mut t = copy_target(map.get(&target).map(|t| &**t), None);
            if t.lu(u64::from(lun)).is_some() {
                return Err(ConfigError::Duplicate(target, lun));
            }
            lu.add_target_port(self.shared.nexus.target.clone(), scsi::Transport::Vhost);
            t.add_lu(u64::from(lun), lu);
            map.insert(target, Arc::new(t));
            self.shared.targets.store(Arc::new(map));
        }
        tracing::info!(socket = %self.path.display(), target, lun, "Logical unit added");
        self.luns_changed(target, lun);
        self.event(target, lun, wire::VIRTIO_SCSI_EVT_RESET_RESCAN);
        Ok(())
    }

    /// Take the LU at `target`/`lun` away while the guest runs: the socket's nexus loses it
    /// (its tasks there end), and the guest is told (VIRTIO_SCSI_T_TRANSPORT_RESET, reason
    /// REMOVED). Returns the LU, or `None` when there was none.
    pub fn remove_lu(&self, target: u8, lun: u16) -> Option<Arc<scsi::LogicalUnit>> {
        let removed = {
            let _g = lock(&self.shared.update);
            let mut map = (**self.shared.targets.load()).clone();
            let old = map.get(&target)?.clone();
            let lu = old.lu(u64::from(lun))?.clone();
            let t = copy_target(Some(&old), Some(u64::from(lun)));
            if t.luns().next().is_some() {
                map.insert(target, Arc::new(t));
            } else {
                map.remove(&target);
            }
            // Served at no other place of this socket (the daemon puts an image at one place
            // of a socket only; checked all the same), the LU is no longer reached through the
            // socket's port: REGISTER AND MOVE may not name it.
            let elsewhere = map.values().any(|t| {
                t.luns()
                    .any(|l| t.lu(l).is_some_and(|other| Arc::ptr_eq(other, &lu)))
            });
            if !elsewhere {
                lu.remove_target_port(&self.shared.nexus.target);
            }
            self.shared.targets.store(Arc::new(map));
            lu
        };
        let mut only = scsi::Target::new();
        only.add_lu(u64::from(lun), removed.clone());
        only.nexus_lost(&self.shared.nexus);
        tracing::info!(socket = %self.path.display(), target, lun, "Logical unit removed");
        self.luns_changed(target, lun);
        self.event(target, lun, wire::VIRTIO_SCSI_EVT_RESET_REMOVED);
        Some(removed)
    }

    /// Wait until none of the socket's commands runs on `lu`, an LU [`Self::remove_lu`] took
    /// away. The removal ended its tasks there, but one already running finishes (a write in
    /// the driver, say); after this none reaches the medium, so a flush that follows covers
    /// every write the guest was answered for. Not bounded: a stuck I/O holds it.
    pub async fn settle_removed(&self, lu: &Arc<scsi::LogicalUnit>) {
        let mut only = scsi::Target::new();
        only.add_lu(0, lu.clone());
        only.end_nexus(&self.shared.nexus).await;
    }

    /// The LUN inventory of `target` changed at `lun`: the socket's nexus gets REPORTED LUNS
    /// DATA HAS CHANGED on the target's other LUs (SPC-5), for a guest that did not
    /// negotiate VIRTIO_SCSI_F_HOTPLUG and so gets no event.
    fn luns_changed(&self, target: u8, lun: u16) {
        let Some(t) = self.shared.target(target) else {
            return;
        };
        for other in t.luns().filter(|&l| l != u64::from(lun)) {
            if let Some(lu) = t.lu(other) {
                lu.reported_luns_changed(&self.shared.nexus);
            }
        }
    }

    /// Tell the connected guest that a parameter of the LU at `target`/`lun` changed, as the
    /// unit attention `asc`/`ascq` says (virtio 5.6.6.3.3: a VIRTIO_SCSI_T_PARAM_CHANGE event,
    /// reason ASC | ASCQ << 8), when it negotiated VIRTIO_SCSI_F_CHANGE. The unit attention
    /// itself is the LU's to queue.
    pub fn param_change(&self, target: u8, lun: u16, asc: u8, ascq: u8) {
        let dev = lock(&self.shared.current).clone();
        if let Some(dev) = dev {
            dev.post_event(
                wire::VIRTIO_SCSI_T_PARAM_CHANGE,
                wire::event_lun(target, lun),
                u32::from(asc) | u32::from(ascq) << 8,
            );
        }
    }

    fn event(&self, target: u8, lun: u16, reason: u32) {
        let dev = lock(&self.shared.current).clone();
        if let Some(dev) = dev {
            dev.post_event(
                wire::VIRTIO_SCSI_T_TRANSPORT_RESET,
                wire::event_lun(target, lun),
                reason,
            );
        }
    }

    /// Create the socket, mode 0660, without serving it yet: a guest that connects waits
    /// until [`Bound::start`]. What may already be at the path: see [`bind_socket`].
    pub fn bind(self) -> std::io::Result<Bound> {
        let (listener, socket) = bind_socket(&self.path, SOCKET_MODE, "vhost-user socket")?;
        Ok(Bound {
            device: self,
            listener: Some(Listener::from(listener)),
            socket,
        })
    }

    /// [`VhostScsi::bind`] then [`Bound::start`].
    pub fn spawn(self) -> std::io::Result<Server> {
        self.bind()?.start()
    }

    fn serve(
        &self,
        listener: &mut Listener,
        stop: Arc<AtomicBool>,
        conn: &Mutex<Option<ShutdownHandle>>,
    ) {
        let socket = self.path.display().to_string();
        while !stop.load(Ordering::SeqCst) {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
            // The stop flag also ends the device's waits for stuck commands.
            let dev = Device::new(self.shared.clone(), mem.clone(), stop.clone());
            let mut daemon = match VhostUserDaemon::new(socket.clone(), dev.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(%socket, error = %e, "Cannot set up a vhost-user device");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            // The wake eventfds: a completion that makes room on a queue that had stopped
            // popping (in-flight limit, data-out budget) wakes the queue's thread.
            for (thread, h) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some(fd) = dev.wake_fd(thread) {
                    if let Err(e) =
                        h.register_listener(fd, EventSet::IN, u64::from(dev.wake_event()))
                    {
                        tracing::warn!(%socket, thread, error = %e, "Cannot register a wake event");
                    }
                }
            }
            let started = daemon.start(listener);
            let exit = |daemon: &VhostUserDaemon<Arc<Device>>| {
                for h in daemon.get_epoll_handlers() {
                    h.send_exit_event();
                }
            };
            if let Err(e) = started {
                exit(&daemon);
                if !stop.load(Ordering::SeqCst) {
                    tracing::error!(%socket, error = %e, "vhost-user accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if stop.load(Ordering::SeqCst) {
                exit(&daemon);
                break;
            }
            *lock(conn) = daemon.shutdown_handle();
            if stop.load(Ordering::SeqCst) {
                daemon.request_shutdown();
            }
            *lock(&self.shared.current) = Some(dev.clone());
            tracing::info!(%socket, initiator = %self.shared.nexus.initiator.name, "vhost-user frontend connected");
            let result = daemon.wait();
            *lock(conn) = None;
            *lock(&self.shared.current) = None;
            // No completion writes to the old rings from here on; then the worker threads
            // stop (dropping the daemon joins them), so nothing pops either.
            dev.disconnect();
            exit(&daemon);
            drop(daemon);
            self.end_connection(&dev);
            match result {
                // QEMU went away: the usual end of a connection.
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => {
                    tracing::info!(%socket, "vhost-user frontend disconnected; I_T nexus lost")
                }
                Err(e) => {
                    tracing::warn!(%socket, error = %e, "vhost-user connection failed; I_T nexus lost")
                }
            }
        }
    }
}

impl VhostScsi {
    /// After a connection: its commands end (aborted, and waited for: none of its writes may
    /// land after the next connection's), then the nexus is lost. The socket being closed cuts
    /// the wait short.
    fn end_connection(&self, dev: &Device) {
        dev.drain_after_disconnect();
        self.shared.nexus_lost();
    }
}

/// A copy of `t`'s LUN map, without `except`.
fn copy_target(t: Option<&scsi::Target>, except: Option<u64>) -> scsi::Target {
    let mut n = scsi::Target::new();
    if let Some(t) = t {
        for lun in t.luns() {
            if Some(lun) != except {
                if let Some(lu) = t.lu(lun) {
                    n.add_lu(lun, lu.clone());
                }
            }
        }
    }
    n
}

/// A socket being served.
pub struct Server {
    device: VhostScsi,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    /// The socket's file identity (device, inode): at the stop the path is removed only if it
    /// is still this socket, not one another process bound there since.
    socket: (u64, u64),
}

/// A device whose socket exists but is not served yet ([`VhostScsi::bind`]); dropped, it
/// removes its socket.
pub struct Bound {
    device: VhostScsi,
    listener: Option<Listener>,
    socket: (u64, u64),
}

impl Bound {
    /// The device to be served.
    pub fn device(&self) -> &VhostScsi {
        &self.device
    }

    /// Serve connections one after another on a thread of its own, until [`Server::stop`].
    pub fn start(mut self) -> std::io::Result<Server> {
        let mut listener = self.listener.take().expect("a Bound is started once");
        let stop = Arc::new(AtomicBool::new(false));
        let conn: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
        let (stop2, conn2, me) = (stop.clone(), conn.clone(), self.device.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || me.serve(&mut listener, stop2, &conn2));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                remove_socket(&self.device.path, self.socket);
                return Err(e);
            }
        };
        Ok(Server {
            device: self.device.clone(),
            stop,
            conn,
            thread: Some(thread),
            socket: self.socket,
        })
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.listener.is_some() {
            remove_socket(&self.device.path, self.socket);
        }
    }
}

/// The mode of a vhost-user socket: its owner and group may connect, nobody else (whoever
/// connects drives the guest's I_T nexus, its LUs and reservations).
const SOCKET_MODE: u32 = 0o660;

/// Bind a Unix socket at `path` (`what` names it in errors: "vhost-user socket", "control
/// socket"). A socket nobody answers on is stale and replaced; one that a live process answers
/// on is an error, and so is any other kind of file there (a mistyped path must never cost a
/// file). The socket is bound inside a fresh private (0700) folder next to `path`, given
/// `mode`, then renamed to `path`, so nobody can connect before its mode is set. Returns the
/// listener and the socket's (device, inode).
pub fn bind_socket(
    path: &Path,
    mode: u32,
    what: &str,
) -> std::io::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let err = |doing: &str, e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("{doing} the {what} {}: {e}", path.display()),
        )
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; choose another {what} path",
                    path.display()
                ),
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("Another process answers on the {what} {}", path.display()),
                ));
            }
            // Stale only when nothing listens on it: a socket this process may not connect
            // to (EACCES) may well be another daemon's, live.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "Cannot tell whether the {what} {} is in use ({e}); remove it if it is stale",
                        path.display()
                    ),
                ));
            }
        }
        std::fs::remove_file(path).map_err(|e| err("Cannot remove the stale", e))?;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".sharedisk-socket.")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(|e| err("Cannot create", e))?;
    let staged = private.path().join("socket");
    let listener =
        std::os::unix::net::UnixListener::bind(&staged).map_err(|e| err("Cannot create", e))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("Cannot set the mode of", e))?;
    std::fs::rename(&staged, path).map_err(|e| err("Cannot create", e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| err("Cannot read", e))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Remove the socket [`bind_socket`] bound at `path`, whose (device, inode) it returned as
/// `socket`, unless another process has bound its own at the path since: that one is left.
pub fn remove_socket(path: &Path, socket: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == socket) {
        let _ = std::fs::remove_file(path);
    }
}

impl Server {
    /// The device served.
    pub fn device(&self) -> &VhostScsi {
        &self.device
    }

    /// Close the connection (its nexus is lost), stop accepting and remove the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.conn).take() {
            h.shutdown();
        }
        // Wake the accept.
        let _ = UnixStream::connect(&self.device.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_socket(&self.device.path, self.socket);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}
