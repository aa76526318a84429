//! The file driver's reservation store: APTPL state in a file beside the image, or where the
//! operator configured it.
//!
//! **Where.** By default the image `disk.img` has its state in `disk.img.pr` in the same
//! directory (see [`sidecar_path`]); a configured state file (`FileOptions::reservation_state`)
//! replaces it, and a symlink there is followed to the file it names. A write in progress goes
//! to `<state file>.tmp`. Only one store touches a state file: an exclusive `flock` on
//! `<state file>.lock` (created beside it, never removed; only where this process cannot write
//! the folder, and so cannot write a state file either, does it go without one) keeps out other
//! processes, and a registry keeps out the other stores of this one, whatever the image. A
//! state file's name must not end in `.lock` or `.tmp`.
//!
//! **Format.** One header line, then the state bytes exactly as the SCSI layer gave them (JSON),
//! so `tail -n +2 disk.img.pr` shows the state:
//!
//! ```text
//! sharedisk-pr-v1 <state length in bytes, decimal> <CRC-32C of the state, 8 hex digits>
//! ```
//!
//! **Writing** (a durable compare-and-swap): write the temp file, fsync it, rename it over the
//! sidecar, fsync the directory; only then is the new version reported. A crash at any point
//! leaves the sidecar holding the old state or the new one, never a mix. A non-durable
//! compare-and-swap removes the sidecar, if there may be one (unlink, fsync the directory), and
//! keeps the state in memory; one that follows another non-durable one does no I/O at all.
//!
//! **Failures** are returned (`NoSpace` for ENOSPC/EDQUOT, `WriteFailed` otherwise) and leave the
//! previous state in force, in memory and on disk: a failure before the rename changes nothing on
//! disk, and after it (the directory fsync failed) the previous sidecar is put back (rewritten,
//! or removed if there was none). If even that fails, the error is logged, and the next
//! compare-and-swap rewrites or removes the sidecar whatever it holds.
//!
//! **Opening.** Only a file a store could have written is taken as a state file: an empty one
//! (read as lost state, below: it holds nothing, yet a state file is never empty), or one
//! whose header line starts with this format's magic. Anything else at that path (another
//! image named by mistake, a format of another version, a device or a folder, a file larger
//! than any state could be, a file another process holds locked as a served image does) fails
//! the open before anything beside it is touched, and is never replaced or removed. Then a leftover temp file (a crash during a write: empty, or beginning
//! as a state file does) is removed, and the directory is synced, so what this process acts on
//! (the state file or its absence) is on stable storage. A state file whose header, length
//! or checksum is wrong is *lost* state (SPC-5's loss of persistent reservation information,
//! 5.13.5.3 of the draft at hand): the image opens, [`ReservationStore::lost`] says why,
//! [`ReservationStore::load`] gives version 1 with no state, and an error is logged naming the
//! file. The SCSI layer then fails every command but a few with PERSISTENT RESERVATION
//! INFORMATION LOST until an application client sends REPLACE LOST RESERVATION (or the operator
//! clears the state): the reservations that fence a cluster are never silently dropped. The
//! damaged file is left as it is until the first successful compare-and-swap replaces or
//! removes it (and is put back, byte for byte, if that compare-and-swap fails after the rename
//! or unlink). A state file that cannot be read at all (an I/O or permission error) fails the
//! open.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use super::file::{lock_exclusive, write_error};
use crate::reservation::{next_version, ReservationStore, Stored};
use crate::BlockError;

/// The first word of a sidecar's header line.
const MAGIC: &str = "sharedisk-pr-v1";

/// The sidecar of the image at `image`: the same path with `.pr` appended to the file name
/// (`disk.img` → `disk.img.pr`).
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = OsString::from(image.as_os_str());
    s.push(".pr");
    PathBuf::from(s)
}

/// The three paths the store works with.
#[derive(Debug)]
struct Paths {
    sidecar: PathBuf,
    temp: PathBuf,
    dir: PathBuf,
}

/// What is known of the sidecar on disk; guarded by the writer lock.
#[derive(Debug)]
struct Disk {
    /// The sidecar holds the current state.
    current: bool,
    /// A sidecar may exist (false only once its absence is on stable storage).
    may_exist: bool,
    /// The sidecar is the damaged file found at open (the current state is lost): its bytes,
    /// to put back if a compare-and-swap fails after the rename or unlink.
    damaged: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Inner {
    paths: Paths,
    /// Serialises compare-and-swaps; held for the whole of one, on a blocking thread.
    writer: Mutex<Disk>,
    /// The current state; held only to read or replace it. Replaced only under `writer`.
    current: Mutex<Stored>,
    /// Why the state on disk at open was lost; cleared (under `writer`) by the first successful
    /// compare-and-swap.
    lost: Mutex<Option<String>>,
    /// The image, open (and so locked) for as long as its state is kept here.
    _image: Arc<File>,
    /// This store's hold on its state file among the stores of this process.
    _claim: Claim,
    /// This store's hold on its state file among processes.
    _lock: StateLock,
}

/// The state files the stores of this process keep, by canonical path: two LUs given the same
/// state file (a daemon's `lu add` naming another LU's) would overwrite each other's state.
static CLAIMED: Mutex<std::collections::BTreeSet<PathBuf>> =
    Mutex::new(std::collections::BTreeSet::new());

/// One store's hold on its state file; released when dropped.
#[derive(Debug)]
struct Claim(PathBuf);

impl Claim {
    fn take(dir: &Path, state: &Path) -> Result<Claim, BlockError> {
        let key = match (fs::canonicalize(dir), state.file_name()) {
            (Ok(d), Some(name)) => d.join(name),
            _ => state.to_path_buf(),
        };
        let mut claimed = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
        if !claimed.insert(key.clone()) {
            return Err(BlockError::Open(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already keeps the reservation state of another image served here",
                    state.display()
                ),
            )));
        }
        Ok(Claim(key))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// A state file's hold among processes: an exclusive `flock` on `<state file>.lock`, which is
/// never removed (a lock file removed while another process waits on it would let two hold
/// it). The image's own lock does not cover a configured state file: two daemons serving
/// different images could be given the same one, and would replace each other's state.
#[derive(Debug)]
struct StateLock {
    /// The lock file, open (and so locked) for as long as the store lives.
    _file: Option<File>,
}

impl StateLock {
    fn take(lock: PathBuf, state: &Path) -> Result<StateLock, BlockError> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock)
        {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS)
                ) =>
            {
                // flock needs no write access: a lock file this process may only read (another
                // user made it) locks as well.
                match File::open(&lock) {
                    Ok(f) => f,
                    // A folder this process can write (so it could replace the state file)
                    // but a lock it cannot take: refused, not run unguarded.
                    Err(e2) if folder_writable(&lock) => {
                        return Err(BlockError::Open(io::Error::new(
                            e2.kind(),
                            format!(
                                "Cannot open the reservation state lock {}: {e2}",
                                lock.display()
                            ),
                        )))
                    }
                    // No lock file, and none can be made: the folder is not writable by this
                    // process, which then cannot write a state file there either (an APTPL
                    // update fails and says so), so there is nothing to guard.
                    Err(_) => {
                        tracing::warn!(
                            path = %lock.display(),
                            error = %e,
                            "cannot create the reservation state lock; updates of the state \
                             file will fail too"
                        );
                        return Ok(StateLock { _file: None });
                    }
                }
            }
            Err(e) => {
                return Err(BlockError::Open(io::Error::new(
                    e.kind(),
                    format!("Cannot open {}: {e}", lock.display()),
                )))
            }
        };
        match lock_exclusive(&file, &lock) {
            Err(BlockError::Open(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(BlockError::Open(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} already keeps the reservation state of an image another process \
                         serves (it holds {}); give each image its own state file",
                        state.display(),
                        lock.display()
                    ),
                )))
            }
            Err(e) => Err(e),
            Ok(()) => Ok(StateLock { _file: Some(file) }),
        }
    }
}

/// Whether this process may create files in the folder of `path` (`access(2)`, `W_OK`).
fn folder_writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a live NUL-terminated path for the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Remove the temp file a crash left during a write, if it is one: a regular file, empty or
/// beginning as a state file does (a write stops anywhere). Anything else of that name (another
/// program's file beside an image named by mistake, or a link) is left alone; a durable
/// compare-and-swap then fails to create its temp file and says so (see `write_file`).
fn remove_leftover_temp(temp: &Path) {
    use std::io::Read;
    let Ok(meta) = fs::symlink_metadata(temp) else {
        return;
    };
    let mut head = Vec::new();
    let ours = meta.file_type().is_file()
        && File::open(temp)
            .and_then(|f| f.take(MAGIC.len() as u64 + 1).read_to_end(&mut head))
            .is_ok()
        && format!("{MAGIC} ").as_bytes().starts_with(&head);
    if !ours {
        tracing::warn!(
            path = %temp.display(),
            "a file that is not a reservation state write has the name of one; left alone"
        );
        return;
    }
    match fs::remove_file(temp) {
        Ok(()) => tracing::info!(
            path = %temp.display(),
            "removed a reservation state write left over from a crash"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Not fatal: a durable compare-and-swap will report it.
        Err(e) => tracing::warn!(
            path = %temp.display(),
            error = %e,
            "cannot remove a leftover reservation state temp file"
        ),
    }
}

/// Follow `path` through symlinks (at most 40, as the kernel does) to the file it names, which
/// need not exist yet. A relative link is relative to the folder of the link.
fn resolve_links(path: &Path) -> io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// The most a state file can hold: 2048 registrations (the SCSI layer's limit) of a few hundred
/// bytes of JSON each fit many times over. A larger file was not written by a store.
const MAX_STATE_FILE: u64 = 16 << 20;

/// The prefix of every format's header line.
const MAGIC_PREFIX: &str = "sharedisk-pr-v";

/// The bytes of the state file at `path`, `None` when there is none. Only a file a store could
/// have written is read, and so may later be replaced: an empty file, or one whose header names
/// this format. Anything else (another image, a typo, a format of another version, something
/// that is not a regular file, a file larger than any state) fails the open and is left alone.
fn read_state_file(path: &Path) -> Result<Option<Vec<u8>>, BlockError> {
    use std::io::Read;
    let refuse = |why: String| {
        Err(BlockError::Open(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a sharedisk reservation state file ({why}); it is left as it is: \
                 name another file, or move this one away",
                path.display()
            ),
        )))
    };
    let cannot_read = |e: io::Error| {
        BlockError::Open(io::Error::new(
            e.kind(),
            format!("Cannot read {}: {e}", path.display()),
        ))
    };
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot_read(e)),
    };
    let meta = f.metadata().map_err(cannot_read)?;
    if !meta.file_type().is_file() {
        return refuse("not a regular file".into());
    }
    // An image a process serves holds an exclusive lock on itself (the file driver's, or
    // another program's): whatever its first bytes say, it is not a state file to read, nor
    // to replace later. The shared lock taken to ask goes with `f`.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor `f` owns, with no pointer arguments.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return refuse("another process holds it locked: an image it serves?".into());
            }
        }
    }
    if meta.len() > MAX_STATE_FILE {
        return refuse(format!(
            "{} bytes, more than any state ({MAX_STATE_FILE})",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    Read::by_ref(&mut f)
        .take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return refuse(format!("more than {MAX_STATE_FILE} bytes"));
    }
    // An empty file holds nothing to lose; a header of this format, however damaged the rest,
    // is a state file.
    if bytes.is_empty() || bytes.starts_with(format!("{MAGIC} ").as_bytes()) {
        return Ok(Some(bytes));
    }
    if let Some(rest) = bytes.strip_prefix(MAGIC_PREFIX.as_bytes()) {
        let version: String = rest
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .map(|&b| char::from(b))
            .collect();
        if !version.is_empty() && rest.get(version.len()) == Some(&b' ') {
            return Err(BlockError::Open(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds reservation state in format v{version}, which this version of \
                     sharedisk (format {MAGIC}) does not read; it is left as it is",
                    path.display()
                ),
            )));
        }
    }
    refuse(format!("it does not start with \"{MAGIC} \""))
}

/// The file driver's [`ReservationStore`] (see the module docs). A single holder: its
/// [`ReservationStore::watch`] never changes and its barrier is immediate.
#[derive(Debug)]
pub struct SidecarStore {
    inner: Arc<Inner>,
    changes: watch::Sender<Stored>,
}

/// A step of a write or removal that failed, and whether the sidecar had changed by then.
enum Failed {
    /// Before the rename or unlink: the sidecar is as it was.
    Before(io::Error),
    /// The rename or unlink happened, the directory fsync failed: the sidecar is uncertain.
    After(io::Error),
}

impl SidecarStore {
    /// Open the store whose state file is `sidecar`, for the image whose descriptor `file`
    /// holds the image's exclusive lock. Removes a leftover temp file and loads the state file
    /// if there is one.
    pub(crate) fn open(sidecar: PathBuf, file: Arc<File>) -> Result<Self, BlockError> {
        let open_err = |path: &Path, e: io::Error| {
            BlockError::Open(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        // A state file that is a symlink (to a folder on persistent storage) is followed: the
        // writes go where the reads come from, not over the link.
        let sidecar = resolve_links(&sidecar).map_err(|e| open_err(&sidecar, e))?;
        let mut temp = OsString::from(sidecar.as_os_str());
        temp.push(".tmp");
        let mut lock = OsString::from(sidecar.as_os_str());
        lock.push(".lock");
        let dir = match sidecar.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The name of another store's lock or temp file is no state file: this store would
        // replace it, and with it that store's guard.
        let name = sidecar
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if name
            .as_deref()
            .is_some_and(|n| n.ends_with(".lock") || n.ends_with(".tmp"))
        {
            return Err(open_err(
                &sidecar,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a reservation state file's name must not end in .lock or .tmp (the names \
                     of a state file's lock and of a write in progress)",
                ),
            ));
        }
        // A file that is not a state file is refused before anything beside it is created or
        // removed (read again below, under the lock).
        read_state_file(&sidecar)?;
        let claim = Claim::take(&dir, &sidecar)?;
        let lock = StateLock::take(PathBuf::from(lock), &sidecar)?;
        let paths = Paths {
            sidecar,
            temp: PathBuf::from(temp),
            dir,
        };
        remove_leftover_temp(&paths.temp);
        // What the folder shows now (the state file, or its absence) may be a rename or unlink
        // the previous process made and had not yet synced when it died. This process acts on
        // it (and, with no file, stores the next APTPL-off state with no I/O at all), so it
        // must be on stable storage first, or a power loss could bring back an older file.
        // A folder that cannot be synced (not readable by this process, a file system that
        // does not sync folders) is not fatal: the state file may then still be there as far
        // as stable storage knows, so the next APTPL-off change removes it and syncs again.
        let unsynced = match sync_dir(&paths.dir) {
            Ok(()) => false,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::EINVAL)
                ) =>
            {
                tracing::warn!(
                    path = %paths.dir.display(),
                    error = %e,
                    "cannot sync the reservation state file's folder at open"
                );
                true
            }
            Err(e) => return Err(open_err(&paths.dir, e)),
        };
        let mut lost = None;
        let mut damaged = None;
        let (stored, on_disk) = match read_state_file(&paths.sidecar)? {
            None => (Stored::default(), false),
            Some(bytes) => match decode(&bytes) {
                Ok(state) => {
                    tracing::info!(
                        path = %paths.sidecar.display(),
                        bytes = state.len(),
                        "loaded persistent reservation state"
                    );
                    (Stored { version: 1, state }, true)
                }
                Err(why) => {
                    let why = format!(
                        "reservation state file {} is damaged ({why})",
                        paths.sidecar.display()
                    );
                    tracing::error!(
                        path = %paths.sidecar.display(),
                        reason = %why,
                        "PERSISTENT RESERVATION INFORMATION LOST: the APTPL reservation state \
                         cannot be read back; commands fail until an initiator sends REPLACE \
                         LOST RESERVATION or the operator clears the reservations (or restores \
                         the file and restarts)"
                    );
                    lost = Some(why);
                    damaged = Some(bytes);
                    (
                        Stored {
                            version: 1,
                            state: Vec::new(),
                        },
                        false,
                    )
                }
            },
        };
        Ok(Self {
            changes: watch::Sender::new(stored.clone()),
            inner: Arc::new(Inner {
                paths,
                writer: Mutex::new(Disk {
                    current: on_disk,
                    may_exist: on_disk || damaged.is_some() || unsynced,
                    damaged,
                }),
                current: Mutex::new(stored),
                lost: Mutex::new(lost),
                _image: file,
                _claim: claim,
                _lock: lock,
            }),
        })
    }
}

impl Inner {
    fn current(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The whole compare-and-swap, on a blocking thread: once started it runs to the end even if
    /// the caller goes away, so memory and disk never part.
    fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError> {
        let mut disk = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let version = {
            let cur = self.current();
            if cur.version != expected {
                return Ok(Err(cur.clone()));
            }
            next_version(cur.version)?
        };
        if durable {
            self.settle(&mut disk, write_sidecar(&self.paths, &state))?;
            disk.current = true;
            disk.may_exist = true;
        } else if disk.may_exist {
            self.settle(&mut disk, remove_sidecar(&self.paths))?;
            disk.current = false;
            disk.may_exist = false;
        } else {
            disk.current = false;
        }
        disk.damaged = None;
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = None;
        *self.current() = Stored { version, state };
        Ok(Ok(version))
    }

    /// After a failed write or removal, put the previous sidecar back if it had changed.
    fn settle(&self, disk: &mut Disk, r: Result<(), Failed>) -> Result<(), BlockError> {
        let e = match r {
            Ok(()) => return Ok(()),
            Err(Failed::Before(e)) => e,
            Err(Failed::After(e)) => {
                let undo = if let Some(raw) = &disk.damaged {
                    write_file(&self.paths, &[raw])
                } else if disk.current {
                    let prev = self.current().state.clone();
                    write_sidecar(&self.paths, &prev)
                } else {
                    remove_sidecar(&self.paths)
                };
                if let Err(Failed::Before(u) | Failed::After(u)) = undo {
                    tracing::error!(
                        path = %self.paths.sidecar.display(),
                        error = %u,
                        "cannot restore the reservation state file after a failed update; \
                         the next update rewrites or removes it"
                    );
                    disk.current = false;
                    disk.may_exist = true;
                }
                e
            }
        };
        tracing::error!(
            path = %self.paths.sidecar.display(),
            error = %e,
            "reservation state update failed; the previous state stays in force"
        );
        Err(write_error(e))
    }
}

/// Temp file, fsync, rename over the sidecar, fsync the directory.
fn write_sidecar(p: &Paths, state: &[u8]) -> Result<(), Failed> {
    let header = format!("{MAGIC} {} {:08x}\n", state.len(), crc32c(state));
    write_file(p, &[header.as_bytes(), state])
}

/// Write `parts` as the sidecar: temp file, fsync, rename over the sidecar, fsync the directory.
///
/// The temp file is created new (`O_EXCL`, which also refuses a link at its name): whatever
/// else is there (another program's file, a link to one, which the open left alone) is neither
/// written through nor removed, and the write fails.
fn write_file(p: &Paths, parts: &[&[u8]]) -> Result<(), Failed> {
    let mut created = false;
    let mut write_temp = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p.temp)?;
        created = true;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()
    };
    if let Err(e) = write_temp().and_then(|()| fs::rename(&p.temp, &p.sidecar)) {
        if created {
            let _ = fs::remove_file(&p.temp);
        }
        return Err(Failed::Before(e));
    }
    sync_dir(&p.dir).map_err(Failed::After)
}

/// Unlink the sidecar (if it is there), fsync the directory. The directory is synced even when
/// the sidecar is already gone: an earlier unlink may not have reached stable storage.
fn remove_sidecar(p: &Paths) -> Result<(), Failed> {
    match fs::remove_file(&p.sidecar) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Failed::Before(e)),
    }
    sync_dir(&p.dir).map_err(Failed::After)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The state in a sidecar's bytes, or why they are not a valid sidecar.
fn decode(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let (head, rest) = bytes.split_at(nl);
    let body = rest.get(1..).unwrap_or_default();
    let head = std::str::from_utf8(head).map_err(|_| "header is not text")?;
    let mut words = head.split(' ');
    let (Some(MAGIC), Some(len), Some(crc), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(format!("header {head:?} is not \"{MAGIC} LENGTH CRC32C\""));
    };
    let len: u64 = len.parse().map_err(|_| format!("bad length {len:?}"))?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| format!("bad checksum {crc:?}"))?;
    if body.len() as u64 != len {
        return Err(format!(
            "{} bytes of state where the header says {len}",
            body.len()
        ));
    }
    let got = crc32c(body);
    if got != crc {
        return Err(format!(
            "checksum {got:08x} where the header says {crc:08x}"
        ));
    }
    Ok(body.to_vec())
}

/// CRC-32C (Castagnoli), the checksum iSCSI digests use too.
fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[async_trait]
impl ReservationStore for SidecarStore {
    async fn load(&self) -> Result<Stored, BlockError> {
        Ok(self.inner.current().clone())
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        state: Vec<u8>,
        durable: bool,
    ) -> Result<Result<u64, Stored>, BlockError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.compare_and_swap(expected, state, durable))
            .await
            .map_err(|e| BlockError::WriteFailed(io::Error::other(e)))?
    }

    fn watch(&self) -> watch::Receiver<Stored> {
        self.changes.subscribe()
    }

    async fn barrier(&self, _version: u64) -> Result<(), BlockError> {
        Ok(())
    }

    fn lost(&self) -> Option<String> {
        self.inner
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // The CRC-32C check value of the CRC catalogue: "123456789" → 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros → 0x8A9136AA.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn a_sidecar_decodes_to_its_state() {
        let state = br#"{"generation":3}"#;
        let file = format!("{MAGIC} {} {:08x}\n", state.len(), crc32c(state));
        let mut bytes = file.into_bytes();
        bytes.extend_from_slice(state);
        assert_eq!(decode(&bytes).as_deref(), Ok(&state[..]));
    }

    #[test]
    fn damaged_sidecars_are_refused_not_read_as_empty() {
        let good = format!("{MAGIC} 2 {:08x}\n{{}}", crc32c(b"{}"));
        assert!(decode(good.as_bytes()).is_ok());
        for bad in [
            "".to_string(),
            "{}".to_string(),
            format!("{MAGIC} 2 {:08x}\n{{", crc32c(b"{}")),
            format!("{MAGIC} 2 {:08x}\n{{}}}}", crc32c(b"{}")),
            format!("{MAGIC} 2 {:08x}\n{{]", crc32c(b"{}")),
            format!("sharedisk-pr-v9 2 {:08x}\n{{}}", crc32c(b"{}")),
            format!("{MAGIC} 2\n{{}}"),
            format!("{MAGIC} 99999999999999999999999 0\n{{}}"),
            format!("{MAGIC} 2 zz\n{{}}"),
        ] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(decode(b"\xff\xfe 2 0\n{}").is_err());
    }
}
