//! Running a [`Plan`]: open the images, build the SCSI targets, bind the portals, announce the
//! URLs, serve until SIGINT or SIGTERM (SIGHUP is ignored), then flush every backend.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::config::{canonical_image_path, LuPlan, Plan};
use crate::control;
use crate::identity;
use crate::registry;

/// T10 vendor identification in INQUIRY.
const VENDOR: &str = "SHAREDSK";
/// Product identification in INQUIRY.
const PRODUCT: &str = "sharedisk";

fn open_lu(plan: &LuPlan) -> anyhow::Result<Arc<scsi::LogicalUnit>> {
    let path = &plan.file;
    let opts = block::driver::file::FileOptions {
        direct: plan.direct,
        reservation_state: plan.reservation_state.clone(),
        ..Default::default()
    };
    let driver =
        block::driver::file::FileDriver::open_with(path, plan.size, &opts).map_err(|e| {
            let busy = matches!(
                &e,
                block::BlockError::Open(io) if io.kind() == std::io::ErrorKind::WouldBlock
            );
            let e = anyhow::Error::new(e);
            if busy {
                e.context(format!(
                    "Image {} is in use: another process holds its lock (is another sharedisk \
                     serving it?)",
                    path.display()
                ))
            } else {
                e.context(format!("Cannot open image {}", path.display()))
            }
        })?;
    let canonical = canonical_image_path(path)
        .with_context(|| format!("Cannot resolve image path {}", path.display()))?;
    let backend = block::Backend::new(Arc::new(driver), plan.block_size)
        .with_context(|| format!("Cannot use image {}", path.display()))?;
    if backend.capacity() == 0 {
        bail!(
            "Image {} is smaller than one {}-byte block",
            path.display(),
            plan.block_size
        );
    }
    if let Some(size) = plan.size {
        let actual = backend.capacity() * u64::from(plan.block_size);
        if actual != size {
            tracing::warn!(
                image = %path.display(),
                actual,
                requested = size,
                "Image exists with another size; serving it as it is"
            );
        }
    }
    let (serial, id) = identity::derive(
        &identity_path(path, &canonical),
        plan.serial.as_deref(),
        plan.id,
    );
    tracing::info!(
        image = %canonical.display(),
        lun = plan.lun,
        blocks = backend.capacity(),
        block_size = plan.block_size,
        direct = plan.direct,
        %serial,
        id = format_args!("{id:#018x}"),
        "Opened logical unit"
    );
    let lu = scsi::LogicalUnit::new(
        backend,
        scsi::LuConfig {
            vendor: VENDOR.into(),
            product: PRODUCT.into(),
            revision: env!("CARGO_PKG_VERSION").chars().take(4).collect(),
            serial,
            id,
        },
    );
    let lu = match plan.physical_block_size {
        Some(bytes) => lu
            .with_physical_block_size(bytes)
            .with_context(|| format!("Cannot use image {}", path.display()))?,
        None => lu,
    };
    Ok(Arc::new(lu))
}

/// The target port name of every vhost-user socket (VPD 0x83); the ports differ by their
/// relative target port identifier, which is also their TPGT.
const VHOST_TARGET_NAME: &str = "iqn.2026-01.io.sharedisk:vhost";

/// The path an LU's derived identity comes from: the image's canonical path, except for a
/// block device, whose canonical name (`/dev/sdb`) may be another disk's after a reboot while
/// the path it was configured by (`/dev/disk/by-id/…`, made absolute) stays with the disk.
fn identity_path(given: &std::path::Path, canonical: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::metadata(canonical).is_ok_and(|m| m.file_type().is_block_device());
    match (block, std::path::absolute(given)) {
        (true, Ok(p)) => p,
        _ => canonical.to_path_buf(),
    }
}

/// A line for each registration of `pr` (restored from the state file) made through a target
/// port that is not among `ports` (those the LU is served through): its initiator cannot reach it, so under a Registrants Only
/// or All Registrants reservation it gets RESERVATION CONFLICT, and a reservation it holds
/// stays until preempted. The usual cause is a vhost-user socket whose relative target port
/// identifier changed (its path, or an upgrade from numbering by position).
fn unreachable_registrations(pr: &scsi::pr::PrState, ports: &[scsi::ServedPort]) -> Vec<String> {
    pr.registrations
        .iter()
        .filter_map(|r| {
            let port = r.who.target.as_ref()?;
            if ports.iter().any(|p| p.port == *port) {
                return None;
            }
            let hint = if port.name == VHOST_TARGET_NAME {
                format!(
                    "; if it was a vhost-user socket's, set relative_port_id = {:#06x} on that \
                     socket",
                    port.relative_id
                )
            } else {
                String::new()
            };
            Some(format!(
                "Restored registration (key {:#x}) of {} was made through target port {} \
                 (relative port id {:#06x}), which this daemon does not serve: that initiator \
                 cannot use it{}{hint}",
                r.key,
                r.who.initiator.port_name(),
                port.port_name(),
                port.relative_id,
                match &pr.reservation {
                    Some(res) if res.holder.as_ref() == Some(&r.who) => {
                        ", and the reservation it holds stays until preempted or cleared"
                    }
                    _ => "",
                },
            ))
        })
        .collect()
}

/// A line for each registration of `pr` (restored from the state file) made through the
/// target port of one of `sockets` (vhost-user sockets: relative target port identifier,
/// initiator name, path) by an initiator name other than the one that socket's nexus has
/// now: the guest on that socket is no longer that registrant. The usual cause is a changed
/// `initiator`, or a default name made from the path as written (before it came from the
/// resolved path).
fn renamed_vhost_registrations(
    pr: &scsi::pr::PrState,
    sockets: &[(u16, &str, &std::path::Path)],
) -> Vec<String> {
    pr.registrations
        .iter()
        .filter_map(|r| {
            let port = r.who.target.as_ref()?;
            if port.name != VHOST_TARGET_NAME {
                return None;
            }
            let &(id, now, path) = sockets.iter().find(|s| s.0 == port.relative_id)?;
            if r.who.initiator.name == now {
                return None;
            }
            Some(format!(
                "Restored registration (key {:#x}) of {} was made through vhost-user socket {} \
                 (relative port id {id:#06x}), whose initiator is now named {now}: that guest \
                 is no longer the registrant; set initiator = {:?} on that socket to keep it",
                r.key,
                r.who.initiator.name,
                path.display(),
                r.who.initiator.name,
            ))
        })
        .collect()
}

/// Open `lu`'s image as an LU (exclusive lock, sparse creation with its size, identity) with
/// its persistent reservations restored: for the images a `Plan` lists, and for those
/// `sharedisk lu add` names.
pub(crate) async fn open_restored(lu: &LuPlan) -> anyhow::Result<Arc<scsi::LogicalUnit>> {
    // Opening may create the image, locks it and its reservation state, reads that state and
    // syncs folders: file system calls that can take long (a slow or remote file system), so
    // they run on the blocking pool, not on a runtime worker whose other tasks would wait
    // (`sharedisk lu add` opens images while the daemon serves).
    let plan = lu.clone();
    let opened = tokio::task::spawn_blocking(move || open_lu(&plan))
        .await
        .context("The thread that opened the image failed")??;
    opened
        .restore_reservations()
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("Cannot use image {}", lu.file.display()))?;
    Ok(opened)
}

/// Serve `plan` until a signal. `hint` is printed after the URLs (one line on how to reach
/// them).
pub async fn run(plan: Plan, hint: impl Fn(&[String]) -> String) -> anyhow::Result<()> {
    // Catch the signals before anything is announced: a supervisor may send SIGTERM as soon as
    // it reads the URL, and the default action would end the process without a flush.
    let mut term = signal(SignalKind::terminate()).context("Cannot catch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("Cannot catch SIGINT")?;
    // A hangup (the terminal it was started from closing) does not stop the disks: its
    // default action would end the process without an orderly stop. There is no
    // configuration to reload.
    let mut hup = signal(SignalKind::hangup()).context("Cannot catch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::warn!("SIGHUP ignored (sharedisk reloads nothing; SIGTERM stops it)");
        }
    });
    let mut targets = Vec::new();
    // One logical unit per image, whichever frontends serve it: one task set, one reservation
    // state, one set of range locks.
    let mut served = registry::State::default();
    for t in &plan.targets {
        let mut target = scsi::Target::new();
        let index = served.add_target(t.name.clone());
        for lu in &t.lus {
            let opened = open_restored(lu).await?;
            let image = canonical_image_path(&lu.file).unwrap_or_else(|_| lu.file.clone());
            served.serve(
                image,
                opened.clone(),
                lu.direct,
                registry::Place::Iscsi {
                    target: index,
                    lun: lu.lun,
                },
            );
            target.add_lu(lu.lun, opened);
        }
        targets.push(iscsi::TargetConfig {
            name: t.name.clone(),
            alias: t.alias.clone(),
            scsi: Arc::new(target),
            allowed_initiators: t.allowed_initiators.clone(),
            auth: t.auth.clone(),
            tpgt: t.tpgt,
        });
    }

    // One server per listen address, with the targets that list it.
    let mut by_portal: BTreeMap<SocketAddr, Vec<iscsi::TargetConfig>> = BTreeMap::new();
    for (t, config) in plan.targets.iter().zip(&targets) {
        for p in &t.portals {
            by_portal.entry(*p).or_default().push(config.clone());
        }
    }
    // Everything that can fail is bound or opened before anything is served: a start that
    // fails has served no command, so it needs no orderly stop.
    let mut listeners = Vec::new();
    let mut iscsi_servers = Vec::new();
    let mut bound = BTreeMap::new();
    for (addr, targets) in by_portal {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("Cannot listen on {addr}"))?;
        let local = listener
            .local_addr()
            .with_context(|| format!("Cannot read the address bound for {addr}"))?;
        bound.insert(addr, local);
        let count = targets.len();
        let server = iscsi::Server::new(iscsi::ServerConfig {
            targets,
            discovery_auth: plan.discovery_auth.clone(),
            // Announce the bound address; a wildcard address is left to the server, which
            // answers with the address the initiator reached.
            portals: if local.ip().is_unspecified() {
                Vec::new()
            } else {
                vec![local]
            },
        });
        iscsi_servers.push(server.clone());
        listeners.push((local, count, listener, server));
    }

    // vhost-user sockets: images no iSCSI target serves are opened here, once.
    let mut vhost_bound = Vec::new();
    let mut vhost_lines = Vec::new();
    let port_ids = plan.vhost_port_ids()?;
    for ((i, v), &relative_port_id) in plan.vhost.iter().enumerate().zip(&port_ids) {
        let mut luns = Vec::new();
        for l in &v.lus {
            let image = canonical_image_path(&l.lu.file).unwrap_or_else(|_| l.lu.file.clone());
            let lu = match served.lu(&image) {
                Some(lu) => lu.clone(),
                None => open_restored(&l.lu).await?,
            };
            // Socket `i` is added as the i-th, below.
            served.serve(
                image,
                lu.clone(),
                l.lu.direct,
                registry::Place::Vhost {
                    socket: i,
                    target: l.target,
                    lun: l.lun,
                },
            );
            luns.push(vhost_scsi::LunConfig {
                target: l.target,
                lun: l.lun,
                lu,
            });
        }
        let threads = v
            .threads
            .unwrap_or_else(|| vhost_scsi::default_threads(v.num_queues));
        let device = vhost_scsi::VhostScsi::new(
            vhost_scsi::SocketConfig {
                path: v.socket.clone(),
                initiator_name: v.initiator.clone(),
                target_name: VHOST_TARGET_NAME.into(),
                relative_port_id,
                num_queues: v.num_queues,
                threads,
                watch_max: v.watch_max,
                luns,
            },
            tokio::runtime::Handle::current(),
        )
        .with_context(|| format!("vhost-user socket {}", v.socket.display()))?;
        let device = device.bind()?;
        let index = served.add_socket(v.socket.clone(), device.device().clone());
        debug_assert_eq!(index, i);
        vhost_lines.push(format!("vhost-user:{}", v.socket.display()));
        vhost_bound.push((device, v, relative_port_id, threads));
    }

    let control = match &plan.control {
        Some(path) => Some(control::Control::bind(path).await?),
        None => {
            let path = control::default_path();
            match control::Control::bind(&path).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Serving without a control socket (`sharedisk pr` and `sharedisk lu` will not reach this daemon)");
                    None
                }
            }
        }
    };
    if let Some(c) = &control {
        tracing::info!(path = %c.path().display(), "Control socket");
    }

    let mut urls = Vec::new();
    for (index, t) in plan.targets.iter().enumerate() {
        let portal = t.portals.first().and_then(|p| bound.get(p));
        if let Some(portal) = portal {
            served.set_portal(index, *portal);
            for lu in &t.lus {
                urls.push(format!("iscsi://{portal}/{}/{}", t.name, lu.lun));
            }
        }
    }
    let registry = Arc::new(registry::Registry::new(served));
    let sockets: Vec<(u16, &str, &std::path::Path)> = plan
        .vhost
        .iter()
        .zip(&port_ids)
        .map(|(v, &id)| (id, v.initiator.as_str(), v.socket.as_path()))
        .collect();
    for lu in registry.served() {
        let ports = lu.lu.target_ports();
        let pr = lu.lu.persistent_reservations();
        let lines = unreachable_registrations(&pr, &ports)
            .into_iter()
            .chain(renamed_vhost_registrations(&pr, &sockets));
        for line in lines {
            tracing::warn!(lu = %lu.name, image = %lu.image.display(), "{line}");
        }
    }

    // Serve. From here on a failure ends in the orderly stop, like a signal.
    let mut servers = JoinSet::new();
    for (local, targets, listener, server) in listeners {
        tracing::info!(portal = %local, targets, "Listening");
        servers.spawn(async move { (local, server.serve(listener).await) });
    }
    let mut vhost_servers = Vec::new();
    let mut started = Ok(());
    for (device, v, relative_port_id, threads) in vhost_bound {
        match device.start() {
            Ok(server) => {
                tracing::info!(
                    socket = %v.socket.display(),
                    initiator = %v.initiator,
                    relative_port_id,
                    num_queues = v.num_queues,
                    threads,
                    watch_us = v.watch_max.as_micros(),
                    "vhost-user-scsi socket ready"
                );
                vhost_servers.push(server);
            }
            Err(e) => {
                started = Err(anyhow::Error::new(e).context(format!(
                    "Cannot serve the vhost-user socket {}",
                    v.socket.display()
                )));
                break;
            }
        }
    }
    let control_task = control.map(|c| tokio::spawn(c.serve(registry.clone())));
    let started = started.and_then(|()| announce(&urls, &vhost_lines, &hint(&urls)));

    let outcome = match started {
        Err(e) => Err(e),
        Ok(()) => tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
            Some(done) = servers.join_next() => match done {
                Ok((addr, Ok(()))) => Err(anyhow::anyhow!("The server on {addr} stopped")),
                Ok((addr, Err(e))) => Err(anyhow::Error::new(e).context(format!("The server on {addr} failed"))),
                Err(e) => Err(anyhow::Error::new(e).context("A server task failed")),
            },
        },
    };
    // A second signal ends the process at once: the way out when the orderly stop below
    // waits for a backend that does not answer.
    let again = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    let stopped = stop(
        &registry,
        iscsi_servers,
        servers,
        vhost_servers,
        control_task,
    );
    match unless_signalled(stopped, again).await {
        Ok(stopped) => outcome.and(stopped),
        Err(signal) => {
            tracing::error!(
                signal,
                "Second signal: exiting without waiting for the sessions to end or flushing the images"
            );
            // Not through the runtime's drop, which would wait for the blocking tasks.
            std::process::exit(1)
        }
    }
}

/// Print the URLs, then the line on how to reach them.
fn announce(urls: &[String], vhost_lines: &[String], hint: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for url in urls.iter().chain(vhost_lines) {
        writeln!(out, "{url}").context("Cannot write to stdout")?;
    }
    writeln!(out, "{hint}").context("Cannot write to stdout")?;
    out.flush().context("Cannot write to stdout")
}

/// `stop` to its end, or the name of the signal that came first.
async fn unless_signalled<T>(
    stop: impl std::future::Future<Output = T>,
    signal: impl std::future::Future<Output = &'static str>,
) -> Result<T, &'static str> {
    tokio::select! {
        biased;
        name = signal => Err(name),
        done = stop => Ok(done),
    }
}

/// The orderly stop: no LU comes or goes any more, no frontend serves a command any more, then
/// every image is flushed, last, so that no write a frontend acknowledged lands after it. The
/// iSCSI sessions end with none of their commands left in the backend; a vhost-user guest's
/// commands still stuck there when its socket closes are not waited for (the guest was never
/// told they completed).
async fn stop(
    registry: &registry::Registry,
    iscsi_servers: Vec<Arc<iscsi::Server>>,
    mut servers: JoinSet<(SocketAddr, std::io::Result<()>)>,
    vhost_servers: Vec<vhost_scsi::Server>,
    control_task: Option<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    registry.close().await;
    // iSCSI: the listeners close, every session ends (its commands abort or finish in the
    // backend) and every connection still logging in closes.
    for s in &iscsi_servers {
        s.shutdown();
    }
    // vhost-user: the connections close (their guests lose their nexus) and the sockets go.
    // Each on its own: one that fails (a bug) does not leave the others serving through
    // the final flush.
    let vhost = tokio::task::spawn_blocking(move || {
        let mut failed = 0;
        for s in vhost_servers {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.stop())).is_err() {
                failed += 1;
            }
        }
        failed
    });
    for s in &iscsi_servers {
        s.closed().await;
    }
    // A failure here still ends in the flush below: it never hurts, and what was
    // acknowledged must reach the disk.
    let stopped = match vhost.await {
        Ok(0) => Ok(()),
        Ok(n) => Err(anyhow::anyhow!("{n} vhost-user socket(s) failed to stop")),
        Err(e) => Err(anyhow::Error::new(e).context("Cannot stop the vhost-user sockets")),
    };
    servers.abort_all();
    while servers.join_next().await.is_some() {}
    if let Some(t) = control_task {
        t.abort();
        let _ = t.await;
    }

    let mut flushed = stopped;
    for lu in &registry.lus() {
        if let Err(e) = lu.backend().flush().await {
            tracing::error!(error = %e, serial = %lu.config().serial, "Flush failed");
            if flushed.is_ok() {
                flushed = Err(anyhow::Error::new(e).context("Cannot flush a logical unit"));
            }
        }
    }
    flushed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_signal_ends_a_stop_that_does_not_end() {
        let r = unless_signalled(std::future::pending::<()>(), async { "SIGTERM" }).await;
        assert_eq!(r, Err("SIGTERM"));
    }

    #[tokio::test]
    async fn a_stop_that_ends_gives_its_outcome() {
        let r = unless_signalled(async { 7 }, std::future::pending()).await;
        assert_eq!(r, Ok(7));
    }

    fn registrant(name: &str, port: Option<scsi::TargetPort>) -> scsi::pr::Registrant {
        scsi::pr::Registrant {
            initiator: scsi::InitiatorPort {
                transport: scsi::Transport::Vhost,
                name: name.into(),
                isid: None,
            },
            target: port,
        }
    }

    fn vhost_port(id: u16) -> scsi::TargetPort {
        scsi::TargetPort {
            name: "iqn.2026-01.io.sharedisk:vhost".into(),
            tpgt: id,
            relative_id: id,
        }
    }

    /// A registration restored through a vhost-user socket's port under another initiator
    /// name than the socket's nexus has now is named, with the setting that keeps it; one
    /// under the same name, and those through other ports, are not.
    #[test]
    fn restored_registrations_of_a_renamed_vhost_initiator_are_named() {
        let pr = scsi::pr::PrState {
            registrations: vec![
                scsi::pr::Registration {
                    who: registrant("vhost:./vm1.sock", Some(vhost_port(0xfb8c))),
                    key: 0xab,
                },
                scsi::pr::Registration {
                    who: registrant("vhost:/run/vm2.sock", Some(vhost_port(0x8bbb))),
                    key: 0xcd,
                },
                scsi::pr::Registration {
                    who: registrant("vhost:/run/vm3.sock", Some(vhost_port(0x8000))),
                    key: 0xef,
                },
            ],
            ..scsi::pr::PrState::default()
        };
        let vm1 = std::path::Path::new("/run/vm1.sock");
        let vm2 = std::path::Path::new("/run/vm2.sock");
        let sockets = [
            (0xfb8c, "vhost:/run/vm1.sock", vm1),
            (0x8bbb, "vhost:/run/vm2.sock", vm2),
        ];
        let lines = renamed_vhost_registrations(&pr, &sockets);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert!(l.contains("key 0xab"), "{l}");
        assert!(l.contains(r#"set initiator = "vhost:./vm1.sock""#), "{l}");
    }

    /// Registrations restored through a port the daemon no longer serves (a vhost-user socket
    /// whose id changed) are named, with the setting that would bring the port back; those
    /// through a served port, and ALL_TG_PT ones, are not.
    #[test]
    fn restored_registrations_through_a_port_not_served_are_named() {
        let gone = registrant("vhost:/run/vm1.sock", Some(vhost_port(0x8000)));
        let pr = scsi::pr::PrState {
            registrations: vec![
                scsi::pr::Registration {
                    who: gone.clone(),
                    key: 0xab,
                },
                scsi::pr::Registration {
                    who: registrant("vhost:/run/vm2.sock", Some(vhost_port(0xfb8c))),
                    key: 0xcd,
                },
                scsi::pr::Registration {
                    who: registrant("iqn.2026-01.test:all-ports", None),
                    key: 0xef,
                },
            ],
            reservation: Some(scsi::pr::Reservation {
                ty: scsi::pr::PrType::WriteExclusive,
                scope: 0,
                holder: Some(gone),
            }),
            ..scsi::pr::PrState::default()
        };
        let served = |id| scsi::ServedPort {
            port: vhost_port(id),
            transport: scsi::Transport::Vhost,
        };
        let lines = unreachable_registrations(&pr, &[served(0xfb8c)]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert!(l.contains("key 0xab"), "{l}");
        assert!(l.contains("vhost:/run/vm1.sock"), "{l}");
        assert!(l.contains("relative_port_id = 0x8000"), "{l}");
        assert!(l.contains("the reservation it holds"), "{l}");
        assert!(unreachable_registrations(&pr, &[served(0xfb8c), served(0x8000)]).is_empty());
    }
}
