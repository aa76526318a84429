//! The operator's control socket: `sharedisk pr show|clear` and `sharedisk lu add|remove|list`
//! talk to a running daemon over a Unix socket, one JSON request line and one JSON answer line
//! per connection.
//!
//! The socket is created mode 0600: whoever can use it can drop a cluster's fencing.
//!
//! Where it is: `--control PATH` (or `control` in the config file); otherwise the default,
//! `$SHAREDISK_CONTROL`, else `$XDG_RUNTIME_DIR/sharedisk.sock`, else `/run/sharedisk.sock`.
//! A daemon that cannot have the default socket (another daemon holds it, or the directory is
//! not writable) serves without one and says so in its log; a socket asked for by name must
//! work or the daemon does not start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::registry::{AddLu, Listing, Registry, RemoveLu};

/// The default control socket path.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHAREDISK_CONTROL") {
        return PathBuf::from(p);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("sharedisk.sock"),
        None => PathBuf::from("/run/sharedisk.sock"),
    }
}

/// One served LU, as the control socket names it.
pub struct ServedLu {
    /// `TARGET-IQN/LUN`, or `vhost:SOCKET/TARGET/LUN` for an LU only vhost-user sockets serve:
    /// its first place.
    pub name: String,
    /// The names of its other places.
    pub also: Vec<String>,
    pub image: PathBuf,
    pub lu: Arc<scsi::LogicalUnit>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
enum Request {
    /// `cwd`: the operator's working folder, which an image path `lu` is relative to.
    PrShow {
        lu: Option<String>,
        #[serde(default)]
        cwd: Option<PathBuf>,
    },
    PrClear {
        lu: Option<String>,
        #[serde(default)]
        cwd: Option<PathBuf>,
    },
    LuAdd(AddLu),
    LuRemove(RemoveLu),
    LuList,
    LuRescan {
        lu: Option<String>,
        cwd: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Answer {
    Ok {
        lu: String,
        image: PathBuf,
        state: scsi::pr::PrState,
    },
    /// An LU was added or removed: what to tell the operator.
    Done(String),
    Lus(Listing),
    Error(String),
}

/// A bound control socket; the file is removed when it is dropped.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    /// The socket's owner: the user the daemon runs as.
    owner: u32,
    /// The socket's (device, inode): on drop the path is removed only if it is still this one.
    socket: (u64, u64),
}

impl Drop for Control {
    fn drop(&mut self) {
        vhost_scsi::remove_socket(&self.path, self.socket);
    }
}

impl Control {
    /// Bind `path`. A socket nobody answers on is stale and replaced; one a live daemon
    /// answers on is an error, and so is any other kind of file there (never removed).
    ///
    /// The socket is bound inside a fresh private (0700) folder next to `path`, made 0600,
    /// then renamed to `path`, so there is no moment at which another user could connect.
    pub async fn bind(path: &Path) -> anyhow::Result<Control> {
        use std::os::unix::fs::MetadataExt;
        let (listener, socket) = vhost_scsi::bind_socket(path, 0o600, "control socket")?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("Cannot use the control socket {}", path.display()))?;
        let listener = UnixListener::from_std(listener)
            .with_context(|| format!("Cannot use the control socket {}", path.display()))?;
        let owner = std::fs::metadata(path)
            .with_context(|| format!("Cannot read the control socket {}", path.display()))?;
        Ok(Control {
            listener,
            path: path.to_path_buf(),
            owner: owner.uid(),
            socket,
        })
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer requests until the future is dropped. Only root and the daemon's own user are
    /// answered (checked with the peer's credentials, besides the socket's mode), and a
    /// request has [`REQUEST_TIME`] to arrive.
    pub async fn serve(self, lus: Arc<Registry>) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "Control socket accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == self.owner => {}
                other => {
                    tracing::warn!(peer = ?other, "Control request from another user refused");
                    continue;
                }
            }
            let lus = lus.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &lus).await {
                    tracing::warn!(error = %format!("{e:#}"), "Control request failed");
                }
            });
        }
    }
}

/// Longest request line accepted: room for a few paths of PATH_MAX (4096) bytes each,
/// JSON-escaped.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a control connection may take to send its request, and to read the answer.
/// What the request asks for is not bounded: a removal waits for the LU's commands and its
/// flush, and cut short it would leave the operator without an answer (the daemon's stop
/// waits for it a bounded time: `Registry::close`).
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

async fn answer(stream: UnixStream, registry: &Registry) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIME, rd.read_line(&mut line))
        .await
        .context("The request did not arrive in time")??;
    let lus = || registry.served();
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(_) if line.len() as u64 >= MAX_REQUEST && !line.ends_with('\n') => {
            Answer::Error(format!("Request longer than {MAX_REQUEST} bytes"))
        }
        Err(e) => Answer::Error(format!("Bad request: {e}")),
        Ok(Request::LuAdd(req)) => match registry.add_vhost_lu(req).await {
            Ok(done) => Answer::Done(done),
            Err(e) => Answer::Error(e),
        },
        Ok(Request::LuRemove(req)) => match registry.remove_vhost_lu(req).await {
            Ok(done) => Answer::Done(done),
            Err(e) => Answer::Error(e),
        },
        Ok(Request::LuList) => Answer::Lus(registry.list()),
        Ok(Request::LuRescan { lu, cwd }) => match find(&lus(), lu.as_deref(), cwd.as_deref()) {
            Err(e) => Answer::Error(e),
            Ok(s) => match s.lu.refresh_capacity().await {
                Err(e) => Answer::Error(format!("Cannot rescan {}: {e}", s.image.display())),
                Ok((before, now)) if before == now => {
                    Answer::Done(format!("{}: {now} blocks, unchanged", s.name))
                }
                Ok((before, now)) => {
                    registry.capacity_changed(&s.lu);
                    tracing::warn!(lu = %s.name, before, now, "Capacity grown by the operator");
                    Answer::Done(format!(
                        "{}: {now} blocks (was {before}); initiators are told the capacity changed",
                        s.name
                    ))
                }
            },
        },
        Ok(Request::PrShow { lu, cwd }) => match find(&lus(), lu.as_deref(), cwd.as_deref()) {
            Err(e) => Answer::Error(e),
            Ok(s) => Answer::Ok {
                lu: s.name.clone(),
                image: s.image.clone(),
                state: (*s.lu.persistent_reservations()).clone(),
            },
        },
        // Clearing drops another host's fence: the LU is always named, so that a daemon which
        // answers on a socket the operator did not mean, serving one LU, clears nothing.
        Ok(Request::PrClear { lu: None, .. }) => {
            Answer::Error(format!("Name the logical unit to clear: {}", names(&lus())))
        }
        Ok(Request::PrClear { lu, cwd }) => match find(&lus(), lu.as_deref(), cwd.as_deref()) {
            Err(e) => Answer::Error(e),
            Ok(s) => match s.lu.clear_reservations_by_operator().await {
                Err(e) => Answer::Error(format!("Cannot clear the reservations: {e}")),
                Ok(old) => {
                    tracing::warn!(lu = %s.name, "Persistent reservations cleared by the operator");
                    Answer::Ok {
                        lu: s.name.clone(),
                        image: s.image.clone(),
                        state: (*old).clone(),
                    }
                }
            },
        },
    };
    let mut out = serde_json::to_vec(&answer)?;
    out.push(b'\n');
    tokio::time::timeout(REQUEST_TIME, wr.write_all(&out))
        .await
        .context("The answer was not read in time")??;
    Ok(())
}

/// The LU an operator means: `TARGET-IQN/LUN`, its URL `iscsi://ADDR:PORT/TARGET-IQN/LUN`, or
/// its image path (relative to the operator's working folder `cwd`, when the client sent it);
/// may be left out when the daemon serves one LU.
fn find<'a>(
    lus: &'a [ServedLu],
    want: Option<&str>,
    cwd: Option<&Path>,
) -> Result<&'a ServedLu, String> {
    let Some(want) = want else {
        return match lus {
            [one] => Ok(one),
            _ => Err(format!(
                "This daemon serves {} logical units; name one: {}",
                lus.len(),
                names(lus)
            )),
        };
    };
    let by_name = want
        .strip_prefix("iscsi://")
        .and_then(|rest| rest.split_once('/').map(|(_, path)| path))
        .unwrap_or(want);
    let image = match cwd {
        Some(cwd) => std::fs::canonicalize(cwd.join(want)).ok(),
        None => std::fs::canonicalize(want).ok(),
    };
    lus.iter()
        .find(|s| {
            s.name == by_name
                || s.also.iter().any(|n| n == by_name)
                || image.as_deref() == Some(s.image.as_path())
        })
        .ok_or_else(|| format!("No logical unit {want} here; served: {}", names(lus)))
}

fn names(lus: &[ServedLu]) -> String {
    lus.iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Send one request to the daemon at `path`; its answer.
fn request(path: &Path, request: &Request) -> anyhow::Result<Answer> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "No sharedisk daemon answers on {} (start it with --control, or pass the same --control here)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str::<Answer>(&answer).context("The daemon's answer is unreadable")
}

/// `sharedisk pr show|clear`: send the request to the daemon at `path` and print the answer.
pub fn pr_client(path: &Path, clear: bool, lu: Option<String>, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let cwd = Some(std::env::current_dir().context("Cannot read the working folder")?);
    let req = if clear {
        Request::PrClear { lu, cwd }
    } else {
        Request::PrShow { lu, cwd }
    };
    match request(path, &req)? {
        Answer::Error(e) => bail!("{e}"),
        Answer::Ok { lu, image, state } => {
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &state)?;
                writeln!(out)?;
            } else {
                if clear {
                    writeln!(
                        out,
                        "Cleared the persistent reservations of {lu}; they were:"
                    )?;
                }
                write!(out, "{}", describe(&lu, &image, &state))?;
            }
            Ok(())
        }
        Answer::Done(_) | Answer::Lus(_) => bail!("The daemon's answer does not fit the request"),
    }
}

/// What `sharedisk lu` asks.
pub enum LuRequest {
    Add(AddLu),
    Remove(RemoveLu),
    List {
        json: bool,
    },
    /// The LU (as `pr` names it) and the operator's working folder.
    Rescan {
        lu: Option<String>,
        cwd: PathBuf,
    },
}

/// `sharedisk lu add|remove|list`: send the request to the daemon at `path` and print the
/// answer.
pub fn lu_client(path: &Path, lu: LuRequest) -> anyhow::Result<()> {
    use std::io::Write;
    let (req, json) = match lu {
        LuRequest::Add(a) => (Request::LuAdd(a), false),
        LuRequest::Remove(r) => (Request::LuRemove(r), false),
        LuRequest::List { json } => (Request::LuList, json),
        LuRequest::Rescan { lu, cwd } => (Request::LuRescan { lu, cwd: Some(cwd) }, false),
    };
    let mut out = std::io::stdout().lock();
    match request(path, &req)? {
        Answer::Error(e) => bail!("{e}"),
        Answer::Done(text) => writeln!(out, "{text}")?,
        Answer::Lus(list) if json => {
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
        }
        Answer::Lus(list) => write!(out, "{}", describe_listing(&list))?,
        Answer::Ok { .. } => bail!("The daemon's answer does not fit the request"),
    }
    Ok(())
}

/// The human-readable `lu list` text.
fn describe_listing(list: &Listing) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let lu = |o: &mut String, at: &str, l: &crate::registry::LuListing| {
        let _ = writeln!(
            o,
            "  {at:<18} {}  {} blocks of {} bytes, serial {}, pr name {}{}",
            l.image.display(),
            l.blocks,
            l.block_size,
            l.serial,
            l.name,
            if l.direct { ", direct I/O" } else { "" }
        );
    };
    for s in &list.vhost {
        let _ = writeln!(
            o,
            "vhost-user socket {} (initiator {}, targets 0 to {}, {})",
            s.socket.display(),
            s.initiator,
            s.max_target,
            if s.connected {
                "guest connected"
            } else {
                "no guest connected"
            }
        );
        if s.lus.is_empty() {
            let _ = writeln!(o, "  no logical unit");
        }
        for l in &s.lus {
            let at = format!("target {} LUN {}", l.target.unwrap_or(0), l.lun);
            lu(&mut o, &at, l);
        }
    }
    for t in &list.iscsi {
        let _ = writeln!(
            o,
            "iSCSI target {}{}",
            t.target,
            t.portal.map(|p| format!(" on {p}")).unwrap_or_default()
        );
        for l in &t.lus {
            lu(&mut o, &format!("LUN {}", l.lun), l);
        }
    }
    if list.vhost.is_empty() && list.iscsi.is_empty() {
        let _ = writeln!(o, "Nothing is served");
    }
    o
}

fn registrant(r: &scsi::pr::Registrant) -> String {
    match &r.target {
        Some(t) => format!(
            "{} via {} (relative port {})",
            r.initiator.port_name(),
            t.port_name(),
            t.relative_id
        ),
        None => format!("{} via every target port", r.initiator.port_name()),
    }
}

/// The human-readable `pr show` text.
pub fn describe(lu: &str, image: &Path, s: &scsi::pr::PrState) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "LU {lu} ({})", image.display());
    if s.lost {
        let _ = writeln!(
            o,
            "PERSISTENT RESERVATION INFORMATION LOST: the stored (APTPL) state could not be read \
             back; commands fail with DATA PROTECT, 44h/01h until an initiator sends PERSISTENT \
             RESERVE OUT REPLACE LOST RESERVATION, or `sharedisk pr clear` (or restoring the \
             file and restarting)"
        );
    }
    let _ = writeln!(
        o,
        "generation {}, APTPL {}",
        s.generation,
        if s.aptpl { "on" } else { "off" }
    );
    match &s.reservation {
        None => {
            let _ = writeln!(o, "reservation: none");
        }
        Some(r) => {
            let holder = match &r.holder {
                Some(h) => registrant(h),
                None => "every registrant".into(),
            };
            let _ = writeln!(
                o,
                "reservation: type {:x}h {:?}, held by {holder}",
                r.ty.code(),
                r.ty
            );
        }
    }
    if s.registrations.is_empty() {
        let _ = writeln!(o, "registrations: none");
    } else {
        let _ = writeln!(o, "registrations:");
        for r in &s.registrations {
            let _ = writeln!(o, "  key 0x{:016x}  {}", r.key, registrant(&r.who));
        }
    }
    o
}
