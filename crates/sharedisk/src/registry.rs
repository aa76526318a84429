//! What a running daemon serves, as its control socket sees and changes it: every logical unit
//! (one per image, whichever frontends serve it), the places it is served at (iSCSI target and
//! LUN, vhost-user socket, virtio target and LUN), the iSCSI targets and the vhost-user sockets.
//!
//! vhost-user sockets take and give up LUs while the daemon runs (`sharedisk lu add|remove`):
//! [`Registry::add_vhost_lu`] opens the image as `serve` does (or reuses the LU that already
//! serves it, so there is still one task set, one reservation state and one set of range locks
//! per image) and puts it on the socket, whose device tells a connected guest (a
//! VIRTIO_SCSI_T_TRANSPORT_RESET event). [`Registry::remove_vhost_lu`] takes it off again; an
//! image that nothing serves any more is flushed and closed (its lock released). iSCSI targets
//! serve what the configuration lists.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{self, LuPlan};
use crate::control::ServedLu;

/// Where a logical unit is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// An iSCSI target (index into the targets) and LUN.
    Iscsi { target: usize, lun: u64 },
    /// A vhost-user socket (index into the sockets), virtio target and LUN.
    Vhost { socket: usize, target: u8, lun: u16 },
}

/// One logical unit and where it is served.
struct Entry {
    /// Canonical image path.
    image: PathBuf,
    lu: Arc<scsi::LogicalUnit>,
    /// Opened with direct I/O.
    direct: bool,
    places: Vec<Place>,
}

struct Socket {
    /// As configured (how logs, URLs and LU names show it).
    path: PathBuf,
    /// Canonical, to recognise it whichever way an operator names it.
    canonical: PathBuf,
    device: vhost_scsi::VhostScsi,
}

struct IscsiTarget {
    name: String,
    /// The first portal, as bound.
    portal: Option<SocketAddr>,
}

/// What the daemon serves; built by `serve::run` as it opens and binds, then shared with the
/// control socket.
#[derive(Default)]
pub struct State {
    lus: Vec<Entry>,
    sockets: Vec<Socket>,
    targets: Vec<IscsiTarget>,
}

impl State {
    /// The LU that serves `image` (canonical path), if any.
    pub fn lu(&self, image: &Path) -> Option<&Arc<scsi::LogicalUnit>> {
        self.entry(image).map(|e| &e.lu)
    }

    fn entry(&self, image: &Path) -> Option<&Entry> {
        self.lus.iter().find(|e| e.image == image)
    }

    /// Record that `lu` (the image `image`, canonical, opened with direct I/O or not) is
    /// served at `place`.
    pub fn serve(
        &mut self,
        image: PathBuf,
        lu: Arc<scsi::LogicalUnit>,
        direct: bool,
        place: Place,
    ) {
        match self.lus.iter_mut().find(|e| e.image == image) {
            Some(e) => e.places.push(place),
            None => self.lus.push(Entry {
                image,
                lu,
                direct,
                places: vec![place],
            }),
        }
    }

    /// A new iSCSI target; returns its index.
    pub fn add_target(&mut self, name: String) -> usize {
        self.targets.push(IscsiTarget { name, portal: None });
        self.targets.len() - 1
    }

    /// The address target `index`'s first portal is bound to.
    pub fn set_portal(&mut self, index: usize, portal: SocketAddr) {
        if let Some(t) = self.targets.get_mut(index) {
            t.portal = Some(portal);
        }
    }

    /// A vhost-user socket now served; returns its index.
    pub fn add_socket(&mut self, path: PathBuf, device: vhost_scsi::VhostScsi) -> usize {
        let canonical = std::fs::canonicalize(&path)
            .or_else(|_| std::path::absolute(&path))
            .unwrap_or_else(|_| path.clone());
        self.sockets.push(Socket {
            path,
            canonical,
            device,
        });
        self.sockets.len() - 1
    }

    fn place_name(&self, p: Place) -> String {
        match p {
            Place::Iscsi { target, lun } => format!("{}/{lun}", self.targets[target].name),
            Place::Vhost {
                socket,
                target,
                lun,
            } => format!(
                "vhost:{}/{target}/{lun}",
                self.sockets[socket].path.display()
            ),
        }
    }

    /// The socket an operator means by `given` (a path, relative to `cwd`).
    fn socket(&self, given: &str, cwd: &Path) -> Result<usize, String> {
        let path = cwd.join(given);
        let canonical = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(i) = self.sockets.iter().position(|s| s.canonical == canonical) {
            return Ok(i);
        }
        let by_name = given
            .strip_prefix("iscsi://")
            .and_then(|rest| rest.split_once('/').map(|(_, path)| path))
            .unwrap_or(given);
        let by_name = by_name.split('/').next().unwrap_or(by_name);
        if self.targets.iter().any(|t| t.name == by_name) {
            return Err(format!(
                "{given} is an iSCSI target: LUs are added and removed at run time on vhost-user \
                 sockets only (an iSCSI target serves the LUs its configuration lists)"
            ));
        }
        let served: Vec<String> = self
            .sockets
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        Err(if served.is_empty() {
            format!("No vhost-user socket {given} here: this daemon serves no vhost-user socket")
        } else {
            format!(
                "No vhost-user socket {given} here; this daemon serves: {}",
                served.join(", ")
            )
        })
    }

    /// What is at `target`/`lun` of socket `socket`.
    fn at(&self, socket: usize, target: u8, lun: u16) -> Option<usize> {
        let want = Place::Vhost {
            socket,
            target,
            lun,
        };
        self.lus.iter().position(|e| e.places.contains(&want))
    }

    /// The places of socket `socket`, in (target, LUN) order.
    fn socket_places(&self, socket: usize) -> Vec<(u8, u16, usize)> {
        let mut v: Vec<(u8, u16, usize)> = self
            .lus
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                e.places.iter().filter_map(move |p| match *p {
                    Place::Vhost {
                        socket: s,
                        target,
                        lun,
                    } if s == socket => Some((target, lun, i)),
                    _ => None,
                })
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn lu_listing(&self, e: &Entry, target: Option<u8>, lun: u64) -> LuListing {
        let backend = e.lu.backend();
        LuListing {
            target,
            lun,
            image: e.image.clone(),
            block_size: backend.block_size(),
            blocks: backend.capacity(),
            serial: e.lu.config().serial.clone(),
            direct: e.direct,
            name: self.place_name(e.places[0]),
        }
    }
}

/// An LU in `sharedisk lu list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LuListing {
    /// The virtio target (vhost-user sockets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u8>,
    pub lun: u64,
    pub image: PathBuf,
    pub block_size: u32,
    pub blocks: u64,
    pub serial: String,
    /// Served with direct I/O.
    #[serde(default)]
    pub direct: bool,
    /// The name `sharedisk pr` knows the LU by.
    pub name: String,
}

/// A vhost-user socket in `sharedisk lu list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketListing {
    pub socket: PathBuf,
    pub initiator: String,
    /// The highest virtio target an LU may be added at.
    pub max_target: u8,
    /// Whether a frontend (QEMU) is connected.
    pub connected: bool,
    pub lus: Vec<LuListing>,
}

/// An iSCSI target in `sharedisk lu list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetListing {
    pub target: String,
    pub portal: Option<SocketAddr>,
    pub lus: Vec<LuListing>,
}

/// `sharedisk lu list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub vhost: Vec<SocketListing>,
    pub iscsi: Vec<TargetListing>,
}

/// `sharedisk lu add`, as the control socket receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddLu {
    /// The socket, as the operator gave it (relative to `cwd`).
    pub socket: String,
    pub target: u8,
    pub lun: u16,
    /// The image (relative to `cwd`).
    pub file: PathBuf,
    /// Size to create the image with.
    pub size: Option<u64>,
    pub block_size: Option<u32>,
    /// Direct I/O; `None` when not given.
    #[serde(default)]
    pub direct: Option<bool>,
    /// The reservation state file (relative to `cwd`); `None` when not given.
    #[serde(default)]
    pub reservation_state: Option<PathBuf>,
    /// The operator's working folder.
    pub cwd: PathBuf,
}

/// `sharedisk lu remove`, as the control socket receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveLu {
    pub socket: String,
    pub target: u8,
    pub lun: u16,
    pub cwd: PathBuf,
}

/// The daemon's served LUs, shared by the control socket's requests.
pub struct Registry {
    state: Mutex<State>,
    /// Held through an add or a remove, so they run one at a time.
    changes: tokio::sync::Mutex<()>,
    /// Set as the daemon starts to shut down, before it waits for `changes`: an add or
    /// remove that has not begun will not (no change after that).
    closing: std::sync::atomic::AtomicBool,
}

/// How long the daemon's stop waits for an add or remove under way (a removal waits for the
/// LU's commands and its flush, unbounded) before it goes on without it.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Registry {
    pub fn new(state: State) -> Registry {
        Registry {
            state: Mutex::new(state),
            changes: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every LU, named for `sharedisk pr` by its first place (and also by its others).
    pub fn served(&self) -> Vec<ServedLu> {
        let s = self.state();
        s.lus
            .iter()
            .map(|e| ServedLu {
                name: s.place_name(e.places[0]),
                also: e.places[1..].iter().map(|&p| s.place_name(p)).collect(),
                image: e.image.clone(),
                lu: e.lu.clone(),
            })
            .collect()
    }

    /// `lu`'s capacity changed (`sharedisk lu rescan`): the guests of the vhost-user sockets
    /// that serve it get a parameter change event, CAPACITY DATA HAS CHANGED (2Ah/09h), on
    /// which Linux rescans the device. iSCSI initiators learn it from the unit attention.
    pub fn capacity_changed(&self, lu: &Arc<scsi::LogicalUnit>) {
        let s = self.state();
        for e in s.lus.iter().filter(|e| Arc::ptr_eq(&e.lu, lu)) {
            for place in &e.places {
                if let Place::Vhost {
                    socket,
                    target,
                    lun,
                } = *place
                {
                    s.sockets[socket]
                        .device
                        .param_change(target, lun, 0x2A, 0x09);
                }
            }
        }
    }

    /// Every LU served now.
    pub fn lus(&self) -> Vec<Arc<scsi::LogicalUnit>> {
        self.state().lus.iter().map(|e| e.lu.clone()).collect()
    }

    /// No change from now on (the daemon is shutting down); waits for one under way, at
    /// most [`CLOSE_WAIT`]: a removal stuck on a backend that does not answer must not keep
    /// every other LU from its final flush.
    pub async fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if tokio::time::timeout(CLOSE_WAIT, self.changes.lock())
            .await
            .is_err()
        {
            tracing::warn!(
                seconds = CLOSE_WAIT.as_secs(),
                "A logical unit's addition or removal is still under way; stopping without it"
            );
        }
    }

    /// Whether the daemon is shutting down, for an add or remove holding `changes`.
    fn closed(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `sharedisk lu list`.
    pub fn list(&self) -> Listing {
        let s = self.state();
        let vhost = s
            .sockets
            .iter()
            .enumerate()
            .map(|(i, sock)| SocketListing {
                socket: sock.path.clone(),
                initiator: sock.device.nexus().initiator.name.clone(),
                max_target: sock.device.max_target(),
                connected: sock.device.connected(),
                lus: s
                    .socket_places(i)
                    .into_iter()
                    .map(|(t, l, e)| s.lu_listing(&s.lus[e], Some(t), u64::from(l)))
                    .collect(),
            })
            .collect();
        let iscsi = s
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut lus: Vec<LuListing> = s
                    .lus
                    .iter()
                    .flat_map(|e| {
                        e.places.iter().filter_map(move |p| match *p {
                            Place::Iscsi { target, lun } if target == i => Some((e, lun)),
                            _ => None,
                        })
                    })
                    .map(|(e, lun)| s.lu_listing(e, None, lun))
                    .collect();
                lus.sort_by_key(|l| l.lun);
                TargetListing {
                    target: t.name.clone(),
                    portal: t.portal,
                    lus,
                }
            })
            .collect();
        Listing { vhost, iscsi }
    }

    /// `sharedisk lu add`: returns what to tell the operator.
    pub async fn add_vhost_lu(&self, req: AddLu) -> Result<String, String> {
        let _changing = self.changes.lock().await;
        if self.closed() {
            return Err("The daemon is shutting down".into());
        }
        // Everything is checked before the image is opened (opening may create it).
        let (socket, image, given, existing, what) = {
            let s = self.state();
            let socket = s.socket(&req.socket, &req.cwd)?;
            let sock = &s.sockets[socket];
            let what = format!("vhost-user socket {}", sock.path.display());
            if req.lun > vhost_scsi::MAX_LUN {
                return Err(format!(
                    "{what}: LUN {} is above {}",
                    req.lun,
                    vhost_scsi::MAX_LUN
                ));
            }
            let max = sock.device.max_target();
            if req.target > max {
                return Err(format!(
                    "{what}: target {} is above the socket's highest target {max} (fixed when \
                     the socket was created: configure an LU at a higher target to make room)",
                    req.target
                ));
            }
            if let Some(e) = s.at(socket, req.target, req.lun) {
                return Err(format!(
                    "{what}: target {} LUN {} is taken (it serves {}); remove it first",
                    req.target,
                    req.lun,
                    s.lus[e].image.display()
                ));
            }
            let file = req.cwd.join(&req.file);
            let image = config::canonical_image_path(&file)
                .map_err(|e| format!("Bad image path {}: {e}", file.display()))?;
            let existing = match s.entry(&image) {
                None => None,
                Some(e) => {
                    if let Some(&(t, l, _)) = s
                        .socket_places(socket)
                        .iter()
                        .find(|&&(_, _, i)| s.lus[i].image == image)
                    {
                        return Err(format!(
                            "{what} already serves image {} at target {t} LUN {l}",
                            image.display()
                        ));
                    }
                    let name = s.place_name(e.places[0]);
                    let backend = e.lu.backend();
                    if let Some(bs) = req.block_size.filter(|&bs| bs != backend.block_size()) {
                        return Err(format!(
                            "Image {} is already served (as {name}) with {}-byte blocks, not \
                             {bs}: the same LU is reused; leave out --block-size",
                            image.display(),
                            backend.block_size()
                        ));
                    }
                    if let Some(d) = req.direct.filter(|&d| d != e.direct) {
                        return Err(format!(
                            "Image {} is already served (as {name}) {} direct I/O: the same LU \
                             is reused; leave out --direct",
                            image.display(),
                            if d { "without" } else { "with" }
                        ));
                    }
                    if req.reservation_state.is_some() {
                        return Err(format!(
                            "Image {} is already served (as {name}) and keeps its reservation \
                             state where it was opened with: the same LU is reused; leave out \
                             --reservation-state",
                            image.display()
                        ));
                    }
                    let bytes = backend.capacity() * u64::from(backend.block_size());
                    if let Some(size) = req.size.filter(|&size| size != bytes) {
                        return Err(format!(
                            "Image {} is already served (as {name}) with {bytes} bytes, not \
                             {size}: the same LU is reused; leave out --size",
                            image.display()
                        ));
                    }
                    Some((e.lu.clone(), name, e.direct))
                }
            };
            let what = format!("{what}, target {} LUN {}", req.target, req.lun);
            (socket, image, file, existing, what)
        };
        let (lu, reused, direct) = match existing {
            Some((lu, name, direct)) => (lu, Some(name), direct),
            None => {
                // Opened by the path given, as `serve` opens a configured one: a block
                // device's identity comes from it (`/dev/disk/by-id/…`), not from the device
                // name it resolves to today.
                let plan = LuPlan {
                    lun: u64::from(req.lun),
                    file: given,
                    size: req.size,
                    block_size: req.block_size.unwrap_or(512),
                    physical_block_size: None,
                    direct: req.direct.unwrap_or(false),
                    serial: None,
                    id: None,
                    reservation_state: req.reservation_state.as_ref().map(|p| req.cwd.join(p)),
                };
                config::check_lu_plan(&what, &plan).map_err(|e| format!("{e:#}"))?;
                let lu = crate::serve::open_restored(&plan)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                (lu, None, plan.direct)
            }
        };
        let backend = lu.backend();
        let size = format!(
            "{} blocks of {} bytes, serial {}",
            backend.capacity(),
            backend.block_size(),
            lu.config().serial
        );
        let mut s = self.state();
        let sock = &s.sockets[socket];
        let where_ = format!(
            "target {} LUN {} of vhost-user socket {}",
            req.target,
            req.lun,
            sock.path.display()
        );
        let connected = sock.device.connected();
        sock.device
            .add_lu(req.target, req.lun, lu.clone())
            .map_err(|e| format!("vhost-user socket {}: {e}", sock.path.display()))?;
        tracing::info!(image = %image.display(), socket = %sock.path.display(), target = req.target, lun = req.lun, "Operator added a logical unit");
        s.serve(
            image.clone(),
            lu,
            direct,
            Place::Vhost {
                socket,
                target: req.target,
                lun: req.lun,
            },
        );
        let how = match reused {
            Some(name) => format!("the LU that serves it as {name}, shared"),
            None => "opened".into(),
        };
        let guest = if connected {
            "the connected guest is sent a transport reset event (RESCAN)"
        } else {
            "no guest is connected; the next one finds it when it scans"
        };
        Ok(format!(
            "Added {} ({how}; {size}) at {where_}; {guest}",
            image.display()
        ))
    }

    /// `sharedisk lu remove`: returns what to tell the operator.
    pub async fn remove_vhost_lu(&self, req: RemoveLu) -> Result<String, String> {
        let changing = self.changes.lock().await;
        if self.closed() {
            return Err("The daemon is shutting down".into());
        }
        let device;
        let (lu, image, closing, message) = {
            let mut s = self.state();
            let socket = s.socket(&req.socket, &req.cwd)?;
            let sock = &s.sockets[socket];
            let what = format!("vhost-user socket {}", sock.path.display());
            let Some(e) = s.at(socket, req.target, req.lun) else {
                let served: Vec<String> = s
                    .socket_places(socket)
                    .iter()
                    .map(|(t, l, _)| format!("target {t} LUN {l}"))
                    .collect();
                return Err(format!(
                    "{what} has no LU at target {} LUN {}; it serves {}",
                    req.target,
                    req.lun,
                    if served.is_empty() {
                        "none".into()
                    } else {
                        served.join(", ")
                    }
                ));
            };
            let connected = sock.device.connected();
            device = sock.device.clone();
            if sock.device.remove_lu(req.target, req.lun).is_none() {
                // The registry and the device's map change together, under `changes`.
                tracing::error!(socket = %sock.path.display(), target = req.target, lun = req.lun, "The device had no LU where the registry had one");
            }
            let image = s.lus[e].image.clone();
            tracing::info!(image = %image.display(), socket = %sock.path.display(), target = req.target, lun = req.lun, "Operator removed a logical unit");
            let place = Place::Vhost {
                socket,
                target: req.target,
                lun: req.lun,
            };
            s.lus[e].places.retain(|&p| p != place);
            let guest = if connected {
                "the connected guest is sent a transport reset event (REMOVED)"
            } else {
                "no guest is connected"
            };
            let lu = s.lus[e].lu.clone();
            if s.lus[e].places.is_empty() {
                s.lus.remove(e);
                (
                    lu,
                    image.clone(),
                    true,
                    format!(
                        "Removed {} from target {} LUN {} of {what} ({guest}); nothing else \
                         serves it: flushed and closed",
                        image.display(),
                        req.target,
                        req.lun
                    ),
                )
            } else {
                let others: Vec<String> =
                    s.lus[e].places.iter().map(|&p| s.place_name(p)).collect();
                (
                    lu,
                    image.clone(),
                    false,
                    format!(
                        "Removed {} from target {} LUN {} of {what} ({guest}); flushed; still \
                         served as {}",
                        image.display(),
                        req.target,
                        req.lun,
                        others.join(", ")
                    ),
                )
            }
        };
        // Flushed either way: the guest's own SYNCHRONIZE CACHE as it lets go of the disk comes
        // after the LU has left the socket. First the socket's commands still running on the
        // LU finish, so none of their writes lands after the flush. On a task of its own, so
        // the flush completes even if the operator's request times out; the last reference
        // (the image's lock) goes with it when nothing else serves the image.
        let flushed = tokio::spawn(async move {
            device.settle_removed(&lu).await;
            lu.backend().flush().await
        })
        .await;
        match flushed {
            Ok(Ok(())) if closing => {
                tracing::info!(image = %image.display(), "Closed logical unit");
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(image = %image.display(), error = %e, "Flush failed");
                return Err(format!(
                    "Removed, but the flush of {} failed: {e}",
                    image.display()
                ));
            }
            Err(e) => return Err(format!("Removed, but the flush did not run: {e}")),
        }
        drop(changing);
        Ok(message)
    }
}
