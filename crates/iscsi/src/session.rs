//! The full feature phase of one session (one connection: MaxConnections=1, ERL 0).
//!
//! Two tasks per connection, no lock shared with other connections:
//! - the **reader** (this module's [`run`]) reads PDUs through a buffered reader, applies the
//!   CmdSN window (RFC 7143 3.2.2.1), collects data-out (immediate, unsolicited, R2T-solicited)
//!   and spawns each command into the SCSI layer, so many commands run at once;
//! - the **writer** ([`writer`]) owns the socket's write half behind a buffered writer. Spawned
//!   commands and the reader send it [`Out`] messages; it numbers StatSN, stamps
//!   ExpCmdSN/MaxCmdSN, splits data-in at the initiator's MaxRecvDataSegmentLength and
//!   MaxBurstLength, and flushes only when no more messages are ready (batching).
//!
//! Bounded memory: at most [`QUEUE_DEPTH`] non-immediate commands are admitted (MaxCmdSN
//! shrinks as commands are outstanding, held ones included) and at most [`MAX_IMMEDIATE`]
//! immediate ones, counted from admission until answered whether they collect data or execute.
//! A write's buffer holds what has arrived, grown once per sequence to that sequence's end, so
//! a command that announces data and sends none holds nothing: unsolicited data is at most
//! FirstBurstLength per command, and the data solicited by R2Ts of one connection at most
//! [`MAX_SOLICITED`] from the first R2T until the write is answered, beyond it by at most
//! two writes (see [`MAX_SOLICITED`]). Each write is at most [`MAX_WRITE`].
//! Answers queued for the writer are bounded too: the reader stops taking PDUs while more than
//! [`MAX_QUEUED`] messages or [`MAX_QUEUED_BYTES`] of data wait to be sent (an initiator that
//! sends READs and does not read the answers), and gives up on the connection when the writer
//! makes no room for [`WRITER_STALL`]. The data-in of READs, from before each runs until its
//! data is written out, is at most [`MAX_READING`]: a READ beyond it is answered TASK SET
//! FULL. What one connection holds is then at most that, the data-out above, and the small
//! data-in of the other commands the window lets run at once. Task management functions
//! waiting for the tasks they end are at most [`MAX_TMF`]; the reader waits for one to end
//! before it takes the next.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use scsi::{Command, Completion, ItNexus, Response, TaskAttr, Tmf, TmfResponse};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch};

use crate::login::{Established, Kind};
use crate::pdu::{self, op, reject, Bhs, Framing, Pdu, RESERVED_TAG};
use crate::text::{self, Params};
use crate::Server;

/// Commands admitted at once (the CmdSN window when none is outstanding).
pub const QUEUE_DEPTH: u32 = 128;
/// Largest EDTL of a write buffered by the transport.
pub const MAX_WRITE: u32 = 32 * 1024 * 1024;
/// Messages queued for the writer beyond which the reader stops reading PDUs (an initiator
/// that sends but does not read cannot make the target buffer without limit).
const MAX_QUEUED: usize = 1024;
/// Data bytes (data-in, PDU data segments) queued for the writer beyond which the reader stops
/// reading PDUs: without it, [`MAX_QUEUED`] reads of 8 MiB would be 8 GiB held for one
/// initiator that does not read.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// How long the reader waits for the writer to drain before giving up on the connection.
const WRITER_STALL: Duration = Duration::from_secs(30);
/// Data-out bytes one connection's writes hold from their first R2T until they are answered
/// (collecting, then waiting for their turn or running). A write's first R2T waits for
/// budget unless the write is older than every write that holds budget or still collects
/// data, or is a HEAD OF QUEUE write while no other holds budget. The writes holding budget
/// wait only for older commands and for HEAD OF QUEUE ones (which wait for nothing, SAM-5
/// 8.6), so the oldest write not yet answered either holds budget or may take it, and so
/// may a HEAD OF QUEUE write: the wait can never close into a cycle. One write of each kind
/// is over budget at a time, so a connection holds at most this plus two writes.
pub const MAX_SOLICITED: u64 = 64 * 1024 * 1024;
/// Data-in bytes the READs of one connection hold at once, from before each runs until its
/// data is written out. Without it the CmdSN window ([`QUEUE_DEPTH`]) lets 128 READs of the
/// largest transfer (8 MiB, the Block Limits VPD page) hold 1 GiB for one initiator that does
/// not read its answers. A READ that does not fit is answered TASK SET FULL without running;
/// one always fits when no READ holds any (the largest transfer is below this).
pub const MAX_READING: u64 = 64 * 1024 * 1024;
/// Immediate SCSI commands admitted at once, from admission (collecting data or executing)
/// until answered; more are rejected (RFC 7143 11.17.1, reason 0x06).
const MAX_IMMEDIATE: u32 = 16;
/// Write commands of one connection still collecting data-out. The CmdSN window admits at
/// most [`QUEUE_DEPTH`] non-immediate commands and [`MAX_IMMEDIATE`] immediate ones, so this
/// guards that invariant; a command beyond it is refused like one beyond either limit.
const MAX_COLLECTING: usize = QUEUE_DEPTH as usize + MAX_IMMEDIATE as usize;
/// Unsolicited Data-Out PDUs kept for one write held for its CmdSN ([`Held::Pdu`]); each
/// carries some data (a write of FirstBurstLength in 512-byte PDUs is 512 of them at most).
const MAX_HELD_DATA_OUT: usize = 512;
/// Longest text (SendTargets) request or response kept.
const MAX_TEXT: usize = 64 * 1024;
/// Task management functions of one connection still waiting for the tasks they end. The
/// reader takes the next one only when one of them is done: immediate requests bypass the
/// CmdSN window, and without this an initiator could pile up one waiting function per PDU
/// while a slow command runs.
const MAX_TMF: usize = 16;

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("Reading a PDU failed")]
    Pdu(#[from] pdu::PduError),
    #[error("Connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("Protocol error: {0}")]
    Protocol(&'static str),
    #[error("NOP-In ping not answered")]
    PingTimeout,
    #[error("PDU not completed within {0:?}")]
    PduTimeout(Duration),
    #[error("Data-Out asked for not sent within {0:?}")]
    DataOutTimeout(Duration),
}

/// Sequence-number handling of an outgoing PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sn {
    /// Carries StatSN and advances it (responses).
    Status,
    /// Carries the next StatSN without advancing it (R2T, NOP-In pings).
    Peek,
}

/// A message to the writer.
#[derive(Debug)]
pub enum Out {
    Pdu {
        bhs: Bhs,
        data: Vec<u8>,
        sn: Sn,
    },
    /// A command's completion: data-in (when the R bit was set), status, sense, residuals.
    Result(Box<ScsiResult>),
    /// The initiator declared a new MaxRecvDataSegmentLength in the full feature phase (a
    /// Text Request, RFC 7143 13.12): every PDU queued after this one respects it.
    MaxData(u32),
    /// Flush everything queued, then stop.
    Close,
}

/// Everything the writer needs to answer a SCSI command.
#[derive(Debug)]
pub struct ScsiResult {
    pub itt: u32,
    pub lun: [u8; 8],
    pub resp: Response,
    /// Expected data-in length: EDTL when the R bit was set, otherwise 0.
    pub edtl_in: u32,
    /// For writes: (overflow, count) from EDTL against the CDB's data-out length.
    pub write_residual: Option<(bool, u32)>,
    /// R2Ts sent for the command (counted in the SCSI Response's ExpDataSN).
    pub r2ts: u32,
    /// A READ's share of its connection's [`MAX_READING`], given back once the writer has
    /// written its data out.
    pub reading: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// SAM-5 5.3: TASK SET FULL, for a command the transport lacks the resources to take.
fn task_set_full() -> Response {
    Response {
        status: scsi::Status::TASK_SET_FULL,
        sense: Vec::new(),
        data_in: Vec::new(),
        data_in_placed: 0,
    }
}

impl ScsiResult {
    /// The answer to a command the transport ends before the SCSI layer sees it.
    fn early(itt: u32, lun: [u8; 8], resp: Response) -> Out {
        Out::Result(Box::new(Self::fields(itt, lun, resp)))
    }

    /// `resp` for `itt`, with no data-in, residual or R2T.
    fn fields(itt: u32, lun: [u8; 8], resp: Response) -> Self {
        Self {
            itt,
            lun,
            resp,
            edtl_in: 0,
            write_residual: None,
            r2ts: 0,
            reading: None,
        }
    }
}

/// What is queued for the writer: messages, and the data bytes they carry.
#[derive(Debug, Default)]
struct Backlog {
    msgs: AtomicUsize,
    bytes: AtomicUsize,
}

impl Backlog {
    /// Whether more than `1 / 2^shift` of either limit is queued.
    fn over(&self, shift: u32) -> bool {
        self.msgs.load(Ordering::Acquire) > MAX_QUEUED >> shift
            || self.bytes.load(Ordering::Acquire) > MAX_QUEUED_BYTES >> shift
    }

    fn add(&self, bytes: usize) {
        self.msgs.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, bytes: usize) {
        self.msgs.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Out {
    /// The data bytes this message holds.
    fn bytes(&self) -> usize {
        match self {
            Out::Pdu { data, .. } => data.len(),
            Out::Result(r) => r.resp.data_in.len() + r.resp.sense.len(),
            Out::MaxData(_) | Out::Close => 0,
        }
    }
}

/// The sending side of the writer's queue, counting what is queued.
#[derive(Clone)]
struct Sender {
    tx: mpsc::UnboundedSender<Out>,
    queued: Arc<Backlog>,
}

impl Sender {
    fn send_pdu(&self, bhs: Bhs, data: Vec<u8>, sn: Sn) {
        self.send(Out::Pdu { bhs, data, sn });
    }

    fn send(&self, out: Out) {
        let bytes = out.bytes();
        self.queued.add(bytes);
        // The writer only goes away when the connection is closing.
        if self.tx.send(out).is_err() {
            self.queued.sub(bytes);
        }
    }
}

/// CmdSN state shared by the reader and the writer of one connection.
#[derive(Debug)]
pub struct Shared {
    /// ExpCmdSN (high 32 bits) and the number of non-immediate SCSI commands admitted and not
    /// yet answered (low 32 bits), in one word so MaxCmdSN is always computed from a
    /// consistent pair: admitting a command advances ExpCmdSN and counts it in one atomic add,
    /// so MaxCmdSN never moves backwards and never advertises a slot the reader would refuse
    /// (RFC 7143 3.2.2.1: commands up to the advertised MaxCmdSN must be accepted).
    window: AtomicU64,
    /// All SCSI commands executing (for Logout).
    executing: AtomicU32,
    /// Immediate SCSI commands admitted and not yet answered (see [`MAX_IMMEDIATE`]).
    immediate: AtomicU32,
    /// Commands handed to the SCSI layer, by ITT. Locked once when a command starts and once
    /// when it ends; only this connection's tasks use it. A task a task management function
    /// ended leaves it with the function's response (its ITT is free again) and gets no
    /// response of its own (RFC 7143 4.2.3.3), whatever the SCSI layer returns.
    running: Mutex<HashMap<u32, Running>>,
    /// Told by the writer each time it can do no more at once: it has written out everything
    /// queued, the socket cannot take more for now, or it has ended (`writer_stalled`). A
    /// reader waiting in [`busy_poll`] waits for this, and for nothing else.
    writer_waits: tokio::sync::Notify,
    /// Whether the writer can send nothing more until the initiator reads, or ever: its last
    /// write or flush found the socket full ([`Watched`]; cleared when the socket takes bytes
    /// again), or it has ended ([`WriterEnded`]). Set before it says so on `writer_waits`.
    writer_stalled: AtomicBool,
    /// Data-in bytes of READs, from before a READ runs until the writer has written its data
    /// (see [`MAX_READING`]).
    reading: Arc<tokio::sync::Semaphore>,
    /// Data-out bytes held by this connection's writes (see [`MAX_SOLICITED`]).
    solicited: AtomicU64,
    /// The [`WriteTask::seq`] of each write holding some of `solicited`, and whether it is a
    /// HEAD OF QUEUE one.
    holders: Mutex<BTreeMap<u64, bool>>,
    /// Told when a write answered gives its budget back: the reader then sends the R2Ts
    /// that waited for it.
    budget_freed: tokio::sync::Notify,
    /// A NOP-In that carries MaxCmdSN ([`Shared::window_reopened`]) is queued and not yet
    /// stamped: one is enough, as the writer stamps the value current when it writes it.
    window_nop: AtomicBool,
}

#[derive(Debug)]
struct Running {
    lun: u64,
    /// Unique for the life of the process: a TMF marks the tasks that were running when it
    /// arrived, not a later task that reuses one's ITT.
    id: u64,
    /// A TMF response that must follow this task's own response: ABORT TASK found the task
    /// already completed in the SCSI layer ("task does not exist") before its response was
    /// queued. Sending the TMF response first would tell the initiator the task is gone while
    /// its response is still to come, and initiators drop such late responses. Several ABORT
    /// TASKs may name it meanwhile: each gets its response, in the order they came.
    then: Vec<Bhs>,
}

impl Shared {
    fn new(exp: u32) -> Self {
        Self {
            window: AtomicU64::new(u64::from(exp) << 32),
            executing: AtomicU32::new(0),
            immediate: AtomicU32::new(0),
            running: Mutex::new(HashMap::new()),
            writer_waits: tokio::sync::Notify::new(),
            writer_stalled: AtomicBool::new(false),
            reading: Arc::new(tokio::sync::Semaphore::new(MAX_READING as usize)),
            solicited: AtomicU64::new(0),
            holders: Mutex::new(BTreeMap::new()),
            budget_freed: tokio::sync::Notify::new(),
            window_nop: AtomicBool::new(false),
        }
    }
    /// A window place reopened with nothing of the command's own to tell the initiator (it
    /// was ended by task management, which answers no status for it). RFC 7143 11.4.11: "When
    /// MaxCmdSN changes at the target while the target has no pending PDUs to convey this
    /// information to the initiator, it MUST generate a NOP-In to carry the new MaxCmdSN":
    /// ITT and TTT FFFFFFFFh, none wanted back (11.19.1), StatSN not advanced. At most one is
    /// queued at a time.
    fn window_reopened(&self, tx: &Sender) {
        if !self.window_nop.swap(true, Ordering::AcqRel) {
            tx.send_pdu(nop_in(RESERVED_TAG, RESERVED_TAG), Vec::new(), Sn::Peek);
        }
    }
    fn holders(&self) -> MutexGuard<'_, BTreeMap<u64, bool>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The write `seq` (HEAD OF QUEUE: `head`) takes `bytes` of [`MAX_SOLICITED`].
    fn solicit(&self, seq: u64, bytes: u64, head: bool) {
        self.holders().insert(seq, head);
        self.solicited.fetch_add(bytes, Ordering::AcqRel);
    }
    /// The write `seq` gives back the `bytes` of [`MAX_SOLICITED`] it holds.
    fn unsolicit(&self, seq: u64, bytes: u64) {
        if bytes > 0 {
            self.holders().remove(&seq);
            self.solicited.fetch_sub(bytes, Ordering::AcqRel);
            self.budget_freed.notify_one();
        }
    }
    fn running(&self) -> MutexGuard<'_, HashMap<u32, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn exp(&self) -> u32 {
        (self.window.load(Ordering::Acquire) >> 32) as u32
    }
    /// MaxCmdSN = ExpCmdSN + free slots - 1: the window shrinks while commands are
    /// outstanding and never moves backwards (ExpCmdSN and the count rise together).
    fn max(&self) -> u32 {
        let w = self.window.load(Ordering::Acquire);
        let (exp, out) = ((w >> 32) as u32, (w as u32).min(QUEUE_DEPTH));
        exp.wrapping_add(QUEUE_DEPTH - out).wrapping_sub(1)
    }
    /// The next CmdSN has arrived; `counted` when it is a non-immediate SCSI command, which
    /// stays outstanding until [`Self::uncount`]. ExpCmdSN wraps modulo 2^32 (the high half of
    /// the word overflows out of the u64).
    fn advance(&self, counted: bool) {
        self.window
            .fetch_add((1 << 32) | u64::from(counted), Ordering::AcqRel);
    }
    /// A counted command has been answered (or refused).
    fn uncount(&self) {
        self.window.fetch_sub(1, Ordering::AcqRel);
    }
    /// An admitted command has been answered, refused or dropped: free its slot.
    fn release(&self, slot: Slot) {
        match slot {
            Slot::Window => self.uncount(),
            Slot::Immediate => {
                self.immediate.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// The limit an admitted SCSI command counts against until it is answered or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Non-immediate: one place of the CmdSN window (MaxCmdSN shrinks while it is held).
    Window,
    /// Immediate: one of [`MAX_IMMEDIATE`].
    Immediate,
}

/// Where a CmdSN falls relative to the window (RFC 7143 3.2.2.1, serial arithmetic RFC 1982).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// CmdSN == ExpCmdSN: deliver now.
    Now,
    /// Inside the window but ahead: hold until the gap is filled.
    Later,
    /// Outside [ExpCmdSN, MaxCmdSN]: silently ignore.
    Drop,
}

/// Classify `cmdsn` against the window [exp, max].
pub fn window(cmdsn: u32, exp: u32, max: u32) -> Window {
    let d = cmdsn.wrapping_sub(exp);
    let width = max.wrapping_sub(exp);
    if d == 0 && width < 0x8000_0000 {
        Window::Now
    } else if width < 0x8000_0000 && d <= width {
        Window::Later
    } else {
        Window::Drop
    }
}

/// A held non-immediate PDU, or a CmdSN to treat as received (an ABORT TASK for a command
/// not yet received, RFC 7143 11.5.1).
enum Held {
    /// With the ticket taken when it arrived (see [`scsi::Ticket`]), for SCSI commands, and
    /// the unsolicited Data-Out PDUs of a write that came while it was held (RFC 7143 11.4:
    /// they follow the command on its connection whatever its CmdSN), taken in order once it
    /// runs.
    Pdu(Box<Pdu>, Option<scsi::Ticket>, HeldData),
    Skip,
}

/// The unsolicited Data-Out PDUs of a write held for its CmdSN ([`Held::Pdu`]): at most
/// [`MAX_HELD_DATA_OUT`] of them and FirstBurstLength bytes in all. Beyond that the initiator
/// sent more unsolicited data than it may: none is kept any more, and the write, once it runs,
/// ends as it would have, with UNEXPECTED UNSOLICITED DATA (RFC 7143 11.4.7.2), once the PDU
/// with the F bit is in.
#[derive(Default)]
struct HeldData {
    pdus: Vec<Pdu>,
    /// More came than may be kept.
    over: bool,
    /// A PDU with the F bit came (kept or not).
    last: bool,
}

/// How a write that ended while data-out was still expected is answered. RFC 7143 11.4: when
/// an error is found while data from the initiator is still expected, the target waits for
/// the Data-Out PDU with the F bit set that ends the last expected sequence before it sends
/// the response; no R2T is sent for it meanwhile.
enum Ending {
    /// With this response: its data failed a digest (11.17.1), or broke a rule of the
    /// transfer (11.4.7.2), or the transport refused it.
    Answer(Response),
    /// By running without its data-out, as one the SCSI layer refuses by its CDB alone does.
    Refused,
}

impl WriteTask {
    /// The TTT of the sequence it is receiving: 0xffffffff for unsolicited data, else its
    /// R2T's.
    fn expected_ttt(&self) -> u32 {
        if self.unsolicited {
            RESERVED_TAG
        } else {
            self.ttt
        }
    }

    /// Whether Data-Out `bhs`, with `len` bytes of data, ends the sequence this task is
    /// receiving: it has the F bit set, or it is of that sequence (its TTT) and reaches its
    /// end. An F bit on data with another TTT counts too: its initiator, wrong about which
    /// sequence it answers (unsolicited data for an R2T), sends no more, and waiting for more
    /// would end the connection for want of data instead of the task.
    fn ends_sequence(&self, bhs: &Bhs, len: usize) -> bool {
        let end = u64::from(bhs.u32_at(40)) + len as u64;
        bhs.final_bit() || (bhs.field20() == self.expected_ttt() && end >= u64::from(self.seq_end))
    }
}

/// A write collecting its data-out.
struct WriteTask {
    lun: u64,
    lun_raw: [u8; 8],
    cdb: Vec<u8>,
    attr: TaskAttr,
    edtl: u32,
    spdtl: u32,
    slot: Slot,
    /// Data-out received so far; grown as data arrives (never ahead of it by more than the
    /// sequence the initiator is sending), so a command that announces data and sends none
    /// holds no buffer.
    buf: Vec<u8>,
    /// End offset of the current sequence (unsolicited or the outstanding R2T).
    seq_end: u32,
    /// The current sequence is unsolicited (TTT 0xffffffff).
    unsolicited: bool,
    ttt: u32,
    datasn: u32,
    r2tsn: u32,
    /// Bytes this task has asked for with R2Ts and holds until it is answered (see
    /// [`MAX_SOLICITED`]).
    solicited: u64,
    /// Its rank among the connection's writes, in the order they arrived.
    seq: u64,
    /// It ended before its data-out was all in: how it is answered once the data still
    /// expected has arrived (see [`Ending`]). Data-Out for it is then discarded.
    ending: Option<Ending>,
    /// Taken when the command arrived: task management from any session that ends it while
    /// its data is still arriving makes it complete as aborted (SAM-5 7.x).
    ticket: Option<scsi::Ticket>,
    /// Its place in the LU's arrival order, taken in CmdSN order: the commands after it
    /// keep their task attributes' order with it while its data arrives (SAM-5 8.6).
    arrival: Option<scsi::Arrival>,
    /// When the initiator was last asked for data (the command's arrival, each R2T): see
    /// [`crate::Server::set_data_out_timeout`].
    asked: std::time::Instant,
}

struct Conn {
    server: Arc<Server>,
    kind: Kind,
    initiator: String,
    nexus: Option<Arc<ItNexus>>,
    target: Option<Arc<scsi::Target>>,
    params: Params,
    local: SocketAddr,
    cid: u16,
    shared: Arc<Shared>,
    tx: Sender,
    writer: Option<tokio::task::JoinHandle<Result<(), std::io::Error>>>,
    held: BTreeMap<u32, Held>,
    tasks: HashMap<u32, WriteTask>,
    next_ttt: u32,
    ping: Option<u32>,
    text_in: Vec<u8>,
    /// The TTT the initiator's next Text Request of the sequence under way carries: the one
    /// of the empty answer to a part sent with C=1, which it copies into the request's next
    /// part, or the one of the answer with F=0 to a request with F=0, which it copies into
    /// its next request of the sequence (RFC 7143 11.10.4, 11.11.1).
    text_in_ttt: Option<u32>,
    /// The rest of a long Text Response, and the TTT of the part sent (which the initiator's
    /// empty request for the next one carries).
    text_out: Option<(u32, Vec<u8>)>,
    /// The next [`WriteTask::seq`].
    next_seq: u64,
    /// Tasks waiting to send their next R2T, oldest first.
    r2t_wait: VecDeque<u32>,
    /// One permit per task management function under way (see [`MAX_TMF`]).
    tmf_slots: Arc<tokio::sync::Semaphore>,
}

enum Flow {
    Continue,
    Close,
}

/// Run the full feature phase until logout, connection loss or `kill`.
#[allow(clippy::too_many_arguments)]
pub async fn run<R, W>(
    server: Arc<Server>,
    est: Established,
    nexus: Option<Arc<ItNexus>>,
    (mut rd, fd): (BufReader<R>, Option<std::os::fd::RawFd>),
    wr: BufWriter<W>,
    mut kill: watch::Receiver<bool>,
    local: SocketAddr,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (mut conn, rx) = Conn::new(server, &est, nexus, local);
    let queued = conn.tx.queued.clone();
    let send_framing = Framing {
        header_digest: est.params.header_digest,
        data_digest: est.params.data_digest,
        max_data: est.params.max_send_dsl,
    };
    let recv_framing = Framing {
        header_digest: est.params.header_digest,
        data_digest: est.params.data_digest,
        max_data: est.params.max_recv_dsl,
    };
    conn.writer = Some(tokio::spawn(writer(
        wr,
        rx,
        queued.clone(),
        conn.shared.clone(),
        send_framing,
        est.params.max_burst,
        est.next_statsn,
    )));
    let ping_idle = conn.server.nop_interval();
    let pdu_timeout = conn.server.pdu_timeout();
    let data_out_timeout = conn.server.data_out_timeout();
    // Writes are looked at for overdue data at most this often (a scan of the tasks
    // collecting data), and at least once per ping interval of an idle connection.
    let data_out_every = (data_out_timeout / 4).min(Duration::from_secs(1));
    let mut data_out_check = std::time::Instant::now() + data_out_every;
    let mut pace = Pace::default();
    let mut handled = 0u32;
    let result = loop {
        // Backpressure: stop reading while the writer is far behind.
        if queued.over(0) {
            let start = tokio::time::Instant::now();
            while queued.over(1) && start.elapsed() <= WRITER_STALL && !*kill.borrow() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Told to end (shutdown, reinstatement, TARGET COLD RESET): at once, not after
            // the stall.
            if *kill.borrow() {
                break Ok(());
            }
            if queued.over(1) {
                break Err(SessionError::Protocol("Initiator does not read responses"));
            }
        }
        // A command has just been handled: watch for the next one for a moment before
        // sleeping in the reactor (see BUSY_POLL).
        let free = std::time::Instant::now();
        if free >= data_out_check {
            data_out_check = free + data_out_every;
            if conn.data_out_overdue(free, data_out_timeout) {
                break Err(SessionError::DataOutTimeout(data_out_timeout));
            }
        }
        let idle = rd.buffer().is_empty();
        // Not while a command of this connection waits: a queue-depth-1 initiator waits for
        // its answer before it sends more, and the task that will answer it, spawned on this
        // worker, runs only once the reader yields.
        let waiting = conn.shared.executing.load(Ordering::Acquire) > 0;
        // Decided on every pass, so that a wait the reader could not watch (a command
        // executing) is never timed as one of the trial's.
        let watch = pace.worth_watching(idle && !waiting && fd.is_some());
        if let (true, Some(fd)) = (watch, fd) {
            busy_poll(fd, &queued, &conn.shared).await;
        }
        // Wait for the next PDU's first byte, pinging an idle initiator (keep-alive), or
        // for an answered write's budget when R2Ts wait for it.
        let shared = conn.shared.clone();
        let ready = tokio::select! {
            biased;
            _ = kill.changed() => break Ok(()),
            _ = shared.budget_freed.notified(), if !conn.r2t_wait.is_empty() => {
                conn.pump_r2t();
                continue;
            }
            r = tokio::time::timeout(ping_idle, async { rd.fill_buf().await.map(|b| b.is_empty()) }) => r,
        };
        match ready {
            Err(_) => {
                if conn.ping.is_some() {
                    break Err(SessionError::PingTimeout);
                }
                conn.send_ping();
                continue;
            }
            Ok(Err(e)) => break Err(e.into()),
            Ok(Ok(true)) => break Ok(()),
            Ok(Ok(false)) => {}
        }
        if idle {
            pace.record(handled, free, std::time::Instant::now());
            handled = 0;
        }
        // Once a PDU has started, the rest must follow in time: a peer stalling inside a PDU
        // would otherwise hold the connection (and its session) forever.
        let pdu = tokio::select! {
            biased;
            _ = kill.changed() => break Ok(()),
            p = tokio::time::timeout(pdu_timeout, pdu::read_pdu(&mut rd, recv_framing)) => p,
        };
        let pdu = match pdu {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => break Err(e.into()),
            Err(_) => break Err(SessionError::PduTimeout(pdu_timeout)),
        };
        handled = handled.saturating_add(1);
        match conn.handle(pdu).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    tracing::debug!(
        watching = pace.trial.epochs[1],
        sleeping = pace.trial.epochs[0],
        "queue-depth-1 epochs of the reader, by whether it watched the socket"
    );
    conn.finish().await;
    result
}

/// Poll `task` once on the reader, as the PDU that starts it is handled, and spawn it only if
/// it has to wait: what it does before its first wait happens before the next PDU is read.
/// A spawned task is polled again (when its worker gets to it), registering its real waker,
/// and a future finds on each poll whatever happened meanwhile: nothing done while it held
/// the no-op one is missed. `io_thread`: the block layer may write in place
/// ([`block::IoThreadScope`]).
fn run_here_first(task: impl std::future::Future<Output = ()> + Send + 'static, io_thread: bool) {
    let mut task = Box::pin(task);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let pending = {
        let _scope = block::IoThreadScope::enter(io_thread);
        std::future::Future::poll(task.as_mut(), &mut cx).is_pending()
    };
    if pending {
        tokio::spawn(task);
    }
}

/// How long a connection's reader watches for the next PDU after handling one before it
/// sleeps in the reactor, when the initiator's recent pace says the next one is due within
/// that ([`Pace`]). An initiator that waits for one command's response before it sends the next
/// (queue depth 1) sends it some tens of microseconds later (QEMU's client on a 2-core virtual
/// machine: mostly 60 to 120 µs); a reader that sleeps meanwhile is woken, which on a virtual
/// machine costs about as much again. At most this much of one worker's time per PDU, and only
/// on a connection in that pace: a busier one finds its next PDU at once, an idle one costs
/// nothing. 150 µs rather than 50: `qemu-img bench -d 1` over loopback gave about 1.5 times
/// the reads and 1.3 times the writes a second (medians of 5 alternating runs each).
const BUSY_POLL: Duration = Duration::from_micros(150);

/// The initiator's recent pace as the reader of its connection sees it: how long the reader
/// has waited for the next PDU once it was free (a moving average), and for how many waits in
/// a row it handled a single PDU before it was free again; and whether watching has lately
/// made its commands come faster ([`Trial`]).
#[derive(Debug, Default)]
struct Pace {
    avg_ns: u64,
    singles: u32,
    /// Whether the pace allowed a watch at the last decision ([`Pace::worth_watching`]): the
    /// cycle that ends at the next record is then one of a queue-depth-1 initiator.
    paced: bool,
    /// When the reader last found the next PDU.
    last: Option<std::time::Instant>,
    trial: Trial,
}

/// Commands in one measurement of a way of waiting ([`Trial`]).
const EPOCH: u32 = 64;

/// Epochs in the shortest round of a [`Trial`]: the last two compare the two ways of
/// waiting.
const ROUND: u32 = 8;

/// Epochs in the longest round: each round that confirms the choice is twice as long as the
/// one before, up to this.
const LONGEST_ROUND: u32 = 64;

/// Whether watching the socket ([`busy_poll`]) pays, found by trying. A watch pays when the
/// host has a CPU to spare: the initiator's next command is then seen the moment it arrives,
/// where a sleeping reader is woken (on a virtual machine, about as long again as the wait).
/// When every CPU has other work, the watch takes CPU the initiator, or whatever else runs,
/// needs: on the project's 2-core VM with the test suite running beside it, `qemu-img bench -d
/// 1` over loopback read about 0.6 times as many blocks a second with watches as without
/// (median of 16 alternating runs), where on the idle machine it read about 2.5 times as many.
///
/// So the reader measures. It waits one way (its choice) for a round of epochs of [`EPOCH`]
/// queue-depth-1 commands each; in the last two it times its choice and then the other way,
/// and keeps the other from the next round on when its commands came more than a tenth
/// faster (the median cycle of the epoch, so that a pause of the initiator, or a moment
/// the reader's CPU was taken, does not decide). An epoch the pace gate interrupts starts
/// over.
/// A round is [`ROUND`] epochs after a change of choice, and twice the last one's length
/// (up to [`LONGEST_ROUND`]) after a round that kept it: what the trial costs is one epoch in
/// 64 spent the slower way while nothing changes, and a change is noticed within 64 epochs.
/// Against always watching, alternating runs of `qemu-img bench -d 1` reads: 1.48 times the
/// reads a second with the test suite running beside it (median of 16 pairs), 0.96 times on
/// the idle machine (10 pairs of 30,000 reads: the probes' cost).
#[derive(Debug)]
struct Trial {
    /// Whether the reader prefers to sleep; it starts by watching.
    sleep: bool,
    /// The length of the current round in epochs ([`ROUND`] when 0), the current epoch in
    /// it, and the epoch's cycles so far (nanoseconds, the first `commands`).
    round: u32,
    epoch: u32,
    commands: u32,
    cycles: [u32; EPOCH as usize],
    /// The median cycle of the round's next-to-last epoch (the preferred way), in
    /// nanoseconds.
    base: u32,
    /// Epochs measured so far, sleeping ([0]) and watching ([1]).
    epochs: [u64; 2],
}

impl Default for Trial {
    fn default() -> Self {
        Trial {
            sleep: false,
            round: 0,
            epoch: 0,
            commands: 0,
            cycles: [0; EPOCH as usize],
            base: 0,
            epochs: [0; 2],
        }
    }
}

impl Trial {
    /// Whether the reader watches in the current epoch: the preferred way but in a round's
    /// last epoch.
    fn watching(&self) -> bool {
        self.sleep == (self.epoch == self.round_len() - 1)
    }

    fn round_len(&self) -> u32 {
        self.round.max(ROUND)
    }

    /// One queue-depth-1 command's cycle (from the reader finding one to finding the next)
    /// took `cycle`.
    fn cycle(&mut self, cycle: Duration) {
        let Some(slot) = self.cycles.get_mut(self.commands as usize) else {
            self.commands = 0;
            return;
        };
        *slot = u32::try_from(cycle.as_nanos()).unwrap_or(u32::MAX);
        self.commands += 1;
        if self.commands < EPOCH {
            return;
        }
        self.epochs[usize::from(self.watching())] += 1;
        self.commands = 0;
        self.cycles.sort_unstable();
        let median = self.cycles[EPOCH as usize / 2];
        let len = self.round_len();
        if self.epoch == len - 2 {
            self.base = median;
        }
        if self.epoch == len - 1 {
            // The other way was more than a tenth faster.
            if u64::from(median) * 10 < u64::from(self.base) * 9 {
                self.sleep = !self.sleep;
                self.round = ROUND;
            } else {
                self.round = (len * 2).min(LONGEST_ROUND);
            }
            self.epoch = 0;
        } else {
            self.epoch += 1;
        }
    }
}

impl Pace {
    /// The reader, free again at `free` after handling `pdus` PDUs, found the next at `now`.
    ///
    /// A wait the reader slept through on the trial's account (the pace allowed a watch) does
    /// not move the mean wait: it counts the wake-up, and would close the gate that lets the
    /// trial measure (an initiator 200 µs behind a watching reader can be 350 µs behind a
    /// sleeping one).
    fn record(&mut self, pdus: u32, free: std::time::Instant, now: std::time::Instant) {
        let paced = std::mem::take(&mut self.paced);
        // The trial's way of waiting has not changed since the decision: it changes only
        // in `cycle`, below.
        let slept_for_trial = paced && !self.trial.watching();
        if paced {
            if let Some(last) = self.last {
                self.trial.cycle(now.saturating_duration_since(last));
            }
        } else {
            // The gate interrupted the epoch: it starts over.
            self.trial.commands = 0;
        }
        self.last = Some(now);
        let waited = now.saturating_duration_since(free);
        self.singles = if pdus == 1 {
            self.singles.saturating_add(1)
        } else {
            0
        };
        if slept_for_trial {
            return;
        }
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        // avg += (ns - avg) / 32: slow to move, so that a few long waits in a busy stream
        // do not start a watch that would steal the CPU the initiator needs.
        self.avg_ns = self.avg_ns - self.avg_ns / 32 + ns.min(1_000_000_000) / 32;
    }

    /// Whether watching is likely to pay: the initiator sends one command at a time (a
    /// pipelining one sends bursts, keeps the CPU busy, and a watch would take CPU it needs),
    /// and its next PDU has lately come a while after the reader was free (below 20 µs it
    /// comes about as fast as a look), but not so long after that a watch would mostly end
    /// empty (a sleeping reader's wait counts its wake-up too, hence the margin above
    /// [`BUSY_POLL`]; a watch then spends at most half of the wait).
    ///
    /// And, at that pace, whether watching is the way of waiting that has lately been faster,
    /// or the one on trial ([`Trial`]).
    ///
    /// `may`: the reader could watch now (it is idle, no command of its connection executes).
    fn worth_watching(&mut self, may: bool) -> bool {
        self.paced = may
            && self.singles >= 8
            && (20_000..=2 * BUSY_POLL.as_nanos() as u64).contains(&self.avg_ns);
        self.paced && self.trial.watching()
    }
}

/// Watch the socket `fd` for received bytes for at most [`BUSY_POLL`]. It first waits until
/// the writer can do no more at once (`queued`, [`Shared::writer_waits`]), so that the
/// response just queued goes out before the watch begins, then peeks without blocking and
/// without the reactor.
///
/// The wait has no timer of its own: the writer says so each time it has written out what is
/// queued, each time the socket cannot take more (an initiator that does not read now is not
/// waited for: the reader reads on), and when it ends. A timer would cost more than the watch
/// saves: registering one earlier than the runtime's next deadline wakes a parked worker, a
/// cross-CPU wake-up per command; so would yielding instead of waiting for the writer's word.
async fn busy_poll(fd: std::os::fd::RawFd, queued: &Backlog, shared: &Shared) {
    let paused = shared.writer_waits.notified();
    tokio::pin!(paused);
    // A `Notified` receives every `notify_waiters` made after its creation, and the writer
    // sets `writer_stalled` before it notifies: either the flag is seen below or the
    // notification completes `paused`. A writer that found the socket full before this wait
    // began is not waited for: nothing would tell of it until the initiator reads again,
    // which an initiator that has stopped reading never does.
    if queued.msgs.load(Ordering::Acquire) > 0 && !shared.writer_stalled.load(Ordering::Acquire) {
        paused.await;
    }
    let start = std::time::Instant::now();
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: `fd` is the connection's socket, open while its read half lives (the caller
        // holds it); `byte` is a live, writable one-byte buffer for this synchronous call.
        let n = unsafe {
            libc::recv(
                fd,
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // Data (n > 0), end of stream (0) or an error other than "nothing yet": stop looking.
        if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
            return;
        }
        if start.elapsed() >= BUSY_POLL {
            return;
        }
        std::hint::spin_loop();
    }
}

impl Conn {
    /// The reader's state for a session just logged in, and the receiving end of its
    /// writer's queue.
    fn new(
        server: Arc<Server>,
        est: &Established,
        nexus: Option<Arc<ItNexus>>,
        local: SocketAddr,
    ) -> (Self, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tx = Sender {
            tx,
            queued: Arc::new(Backlog::default()),
        };
        let target = match est.kind {
            Kind::Normal(i) => server.config.targets.get(i).map(|t| t.scsi.clone()),
            Kind::Discovery => None,
        };
        let conn = Conn {
            server,
            kind: est.kind,
            initiator: est.initiator_name.clone(),
            nexus,
            target,
            params: est.params.clone(),
            local,
            cid: est.cid,
            shared: Arc::new(Shared::new(est.exp_cmdsn)),
            tx,
            writer: None,
            held: BTreeMap::new(),
            tasks: HashMap::new(),
            next_ttt: 1,
            ping: None,
            text_in: Vec::new(),
            text_in_ttt: None,
            text_out: None,
            next_seq: 0,
            r2t_wait: VecDeque::new(),
            tmf_slots: Arc::new(tokio::sync::Semaphore::new(MAX_TMF)),
        };
        (conn, rx)
    }

    fn send(&self, out: Out) {
        // The writer only goes away when the connection is closing.
        self.tx.send(out);
    }

    fn send_pdu(&self, bhs: Bhs, data: Vec<u8>, sn: Sn) {
        self.tx.send_pdu(bhs, data, sn);
    }

    fn reject(&self, reason: u8, bhs: &Bhs) {
        // RFC 7143 11.17: the data segment is the rejected PDU's header.
        let mut b = Bhs::new(op::REJECT);
        b.0[1] = 0x80;
        b.0[2] = reason;
        b.set_u32(16, RESERVED_TAG);
        self.send_pdu(b, bhs.0.to_vec(), Sn::Status);
    }

    fn send_ping(&mut self) {
        let ttt = self.alloc_ttt();
        self.ping = Some(ttt);
        // RFC 7143 11.19: a ping carries a valid TTT and ITT 0xffffffff; StatSN not advanced.
        self.send_pdu(nop_in(RESERVED_TAG, ttt), Vec::new(), Sn::Peek);
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    async fn finish(&mut self) {
        self.send(Out::Close);
        if let Some(mut w) = self.writer.take() {
            // An initiator that stopped reading must not keep the session alive.
            if tokio::time::timeout(Duration::from_secs(5), &mut w)
                .await
                .is_err()
            {
                w.abort();
            }
        }
    }

    async fn handle(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        let flow = self.handle_pdu(pdu).await;
        if !self.r2t_wait.is_empty() {
            self.pump_r2t();
        }
        flow
    }

    async fn handle_pdu(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        if pdu.data_digest_bad {
            // RFC 7143 7.8 / 11.17.1: Reject with "data digest error" and discard the data.
            self.reject(reject::DATA_DIGEST, &pdu.bhs);
            match pdu.bhs.opcode() {
                // At ERL 0 a Data-Out cannot be asked for again, so its task ends with CHECK
                // CONDITION, PROTOCOL SERVICE CRC ERROR.
                op::DATA_OUT => return self.data_out_arrived(pdu),
                // The header is sound (its own digest held): the request was received and
                // takes its CmdSN, or the gap would hold every later command until the
                // initiator gave up on this one. A SCSI command ends with PROTOCOL SERVICE
                // CRC ERROR once its unsolicited data is in (11.17.1); any other request
                // is dropped (`process`).
                op::NOP_OUT | op::SCSI_CMD | op::TMF_REQ | op::TEXT_REQ | op::LOGOUT_REQ => {}
                _ => return Ok(Flow::Continue),
            }
        }
        match pdu.bhs.opcode() {
            op::NOP_OUT | op::SCSI_CMD | op::TMF_REQ | op::TEXT_REQ | op::LOGOUT_REQ => {
                self.ordered(pdu).await
            }
            op::DATA_OUT => self.data_out_arrived(pdu),
            op::SNACK => {
                // ERL 0: SNACK is not supported (RFC 7143 11.16).
                self.reject(reject::PROTOCOL_ERROR, &pdu.bhs);
                Ok(Flow::Continue)
            }
            _ => {
                self.reject(reject::NOT_SUPPORTED, &pdu.bhs);
                Ok(Flow::Continue)
            }
        }
    }

    /// Apply the CmdSN window to a request, then process it and any held ones it releases.
    async fn ordered(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        let bhs = pdu.bhs;
        // NOP-Out answering a ping (ITT 0xffffffff) is never ordered (RFC 7143 11.18).
        if bhs.immediate() || (bhs.opcode() == op::NOP_OUT && bhs.itt() == RESERVED_TAG) {
            if let Flow::Close = self.process(pdu, true, None).await? {
                return Ok(Flow::Close);
            }
            return self.drain().await;
        }
        match window(bhs.cmdsn(), self.shared.exp(), self.shared.max()) {
            Window::Drop => {
                tracing::debug!(cmdsn = bhs.cmdsn(), "CmdSN outside the window: ignored");
                Ok(Flow::Continue)
            }
            Window::Later | Window::Now => {
                // A CmdSN already held is a duplicate, ignored (RFC 7143 3.2.2.1), and one an
                // ABORT TASK already settled stays settled (11.5.1).
                if self.held.contains_key(&bhs.cmdsn()) {
                    tracing::debug!(cmdsn = bhs.cmdsn(), "Duplicate CmdSN: ignored");
                    return Ok(Flow::Continue);
                }
                let ticket = self.admit(&pdu);
                self.held.insert(
                    bhs.cmdsn(),
                    Held::Pdu(Box::new(pdu), ticket, HeldData::default()),
                );
                self.drain().await
            }
        }
    }

    /// Process held requests in CmdSN order while the next one expected is there.
    async fn drain(&mut self) -> Result<Flow, SessionError> {
        while let Some(next) = self.held.remove(&self.shared.exp()) {
            // A SCSI command is counted as outstanding in the same step that advances
            // ExpCmdSN; `scsi_command` uncounts it if it refuses the command.
            let counted = matches!(&next, Held::Pdu(p, ..) if p.bhs.opcode() == op::SCSI_CMD);
            self.shared.advance(counted);
            if let Held::Pdu(p, ticket, data) = next {
                let (itt, seq) = (p.bhs.itt(), self.next_seq);
                if let Flow::Close = self.process(*p, false, ticket).await? {
                    return Ok(Flow::Close);
                }
                // Its data, if it became a task collecting data; not another task's that has
                // its ITT (then this one was refused as a duplicate).
                if self.tasks.get(&itt).is_none_or(|t| t.seq < seq) {
                    continue;
                }
                if data.over {
                    self.fail_task(itt, 0x0c, 0x0c, None);
                    if data.last {
                        self.end_task(itt);
                    }
                    continue;
                }
                for d in data.pdus {
                    if let Flow::Close = self.data_out_pdu(d)? {
                        return Ok(Flow::Close);
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// A ticket for a SCSI command PDU received now (`None` for other PDUs, discovery
    /// sessions and unknown LUNs).
    fn admit(&self, pdu: &Pdu) -> Option<scsi::Ticket> {
        if pdu.bhs.opcode() != op::SCSI_CMD {
            return None;
        }
        let (target, nexus) = (self.target.as_ref()?, self.nexus.as_ref()?);
        target.admit(nexus, pdu::decode_lun(pdu.bhs.lun()))
    }

    async fn process(
        &mut self,
        pdu: Pdu,
        immediate: bool,
        ticket: Option<scsi::Ticket>,
    ) -> Result<Flow, SessionError> {
        if pdu.data_digest_bad && pdu.bhs.opcode() != op::SCSI_CMD {
            // Rejected as it arrived (`handle_pdu`); its CmdSN is now used up.
            return Ok(Flow::Continue);
        }
        match pdu.bhs.opcode() {
            op::NOP_OUT => {
                self.nop_out(&pdu);
                Ok(Flow::Continue)
            }
            op::SCSI_CMD => {
                // An immediate command is received now; a held one when it arrived.
                let ticket = ticket.or_else(|| self.admit(&pdu));
                self.scsi_command(pdu, immediate, ticket);
                Ok(Flow::Continue)
            }
            op::TMF_REQ => {
                // Never closed, so acquiring only waits.
                let Ok(slot) = self.tmf_slots.clone().acquire_owned().await else {
                    return Ok(Flow::Close);
                };
                Ok(self.tmf(&pdu, slot))
            }
            op::TEXT_REQ => {
                self.text(&pdu);
                Ok(Flow::Continue)
            }
            op::LOGOUT_REQ => Ok(self.logout(&pdu).await),
            _ => Ok(Flow::Continue),
        }
    }

    fn nop_out(&mut self, pdu: &Pdu) {
        let itt = pdu.bhs.itt();
        // The answer to our ping carries its TTT (RFC 7143 11.18), whether or not it also
        // asks for a NOP-In of its own (a valid ITT).
        if self.ping == Some(pdu.bhs.field20()) {
            self.ping = None;
        }
        if itt == RESERVED_TAG {
            // Wants no answer.
            return;
        }
        // RFC 7143 11.19: echo the ping data, TTT 0xffffffff.
        let mut b = nop_in(itt, RESERVED_TAG);
        b.set_lun(pdu.bhs.lun());
        let mut data = pdu.data.clone();
        data.truncate(self.params.max_send_dsl as usize);
        self.send_pdu(b, data, Sn::Status);
    }
}

/// A NOP-In header (RFC 7143 11.19), F set, with `itt` and `ttt`.
fn nop_in(itt: u32, ttt: u32) -> Bhs {
    let mut b = Bhs::new(op::NOP_IN);
    b.0[1] = 0x80;
    b.set_u32(16, itt);
    b.set_u32(20, ttt);
    b
}

/// Build the CDB from the header and an Extended CDB AHS (RFC 7143 11.2.2.3, 11.3.5).
///
/// Each AHS is AHSLength (2 bytes), AHSType (1 byte) and AHSLength bytes of AHS-specific
/// content, of which the Extended CDB AHS uses the first as a reserved byte and the rest as
/// CDB bytes 16 and up; each AHS is padded to 4 bytes. At most 16 more CDB bytes are taken
/// (32 in all); other AHS types (the bidirectional read length) are skipped.
pub fn cdb_of(pdu: &Pdu) -> Result<Vec<u8>, ()> {
    let mut cdb = pdu.bhs.0[32..48].to_vec();
    let mut ahs = pdu.ahs.as_slice();
    while !ahs.is_empty() {
        let hdr = ahs.get(..3).ok_or(())?;
        let len = usize::from(u16::from_be_bytes([hdr[0], hdr[1]]));
        let ty = hdr[2];
        let total = 3 + len;
        let padded = total + pdu::pad_len(total);
        if ty == 1 {
            let ext = ahs.get(4..total).ok_or(())?;
            if ext.len() > 16 {
                return Err(());
            }
            cdb.extend_from_slice(ext);
        } else if ahs.len() < total {
            return Err(());
        }
        ahs = ahs.get(padded..).unwrap_or_default();
    }
    Ok(cdb)
}

impl Conn {
    fn scsi_command(&mut self, pdu: Pdu, immediate: bool, ticket: Option<scsi::Ticket>) {
        let bhs = pdu.bhs;
        // Non-immediate commands were counted as outstanding by `drain`. Immediate ones count
        // from here, collecting data or executing, until answered (RFC 7143 11.17.1: "too many
        // immediate commands" is reject reason 0x06). Only this task admits, so the check
        // and the increment cannot race past the limit.
        let slot = if immediate {
            if self.shared.immediate.load(Ordering::Acquire) >= MAX_IMMEDIATE {
                self.reject(reject::IMMEDIATE_REJECT, &bhs);
                return;
            }
            self.shared.immediate.fetch_add(1, Ordering::AcqRel);
            Slot::Immediate
        } else {
            Slot::Window
        };
        let (Some(target), Some(nexus)) = (self.target.clone(), self.nexus.clone()) else {
            // Discovery sessions carry no SCSI commands (RFC 7143 4.3).
            self.shared.release(slot);
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return;
        };
        let Ok(cdb) = cdb_of(&pdu) else {
            self.shared.release(slot);
            self.reject(reject::INVALID_FIELD, &bhs);
            return;
        };
        let flags = bhs.flags();
        let read = flags & 0x40 != 0;
        let write = flags & 0x20 != 0;
        let attr = match flags & 7 {
            0 | 1 => TaskAttr::Simple,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            _ => TaskAttr::Aca,
        };
        let itt = bhs.itt();
        let edtl = bhs.field20();
        let lun_raw = bhs.lun();
        let lun = pdu::decode_lun(lun_raw);
        if itt == RESERVED_TAG
            || self.tasks.contains_key(&itt)
            || self.shared.running().contains_key(&itt)
        {
            // RFC 7143 11.2.1.8: ITTs are unique among outstanding tasks, and 0xffffffff is
            // reserved.
            self.shared.release(slot);
            self.reject(reject::INVALID_FIELD, &bhs);
            return;
        }
        // A write the SCSI layer refuses by its CDB (a transfer beyond MAXIMUM TRANSFER
        // LENGTH, an invalid field, no such LU) runs without its data-out, as LIO does: none
        // is solicited and immediate data is dropped. When unsolicited data follows, it runs
        // once that is in, discarded (`Ending::Refused`).
        let crc_error = pdu.data_digest_bad;
        let imm = pdu.data.len() as u32;
        // Unsolicited data follows unless F=1 or InitialR2T=Yes (RFC 7143 11.3.4).
        let unsol_end = if write && !self.params.initial_r2t && flags & 0x80 == 0 {
            self.params.first_burst.min(edtl)
        } else {
            imm
        };
        let follows = unsol_end > imm;
        let refused = !write || edtl == 0 || target.refuses_cdb(lun, &cdb);
        let mut ending = match (crc_error, refused) {
            // Data it does not take, damaged: it ends as one with damaged data does.
            (true, _) => Some(Ending::Answer(check_condition(0x0b, 0x47, 0x05))),
            (false, true) => Some(Ending::Refused),
            (false, false) => None,
        };
        if !follows && matches!(ending, Some(Ending::Refused)) {
            let cmd = Command {
                nexus,
                lun,
                tag: u64::from(itt),
                attr,
                cdb,
                data_out: Vec::new().into(),
                data_in_len: if read { edtl } else { 0 },
                data_in_buf: None,
                arrival: None,
            };
            // RFC 7143 11.4.5: the residual compares the data-out the CDB asks for with what
            // was expected (EDTL with the W bit, otherwise none), whatever the W bit says; the
            // SCSI layer gets what was collected (nothing) and writes only whole blocks of it.
            let spdtl = target.data_out_len(lun, &cmd.cdb);
            let expected = if write { edtl } else { 0 };
            let wr = (write || spdtl > 0).then_some((spdtl > expected, spdtl.abs_diff(expected)));
            self.execute(
                target,
                cmd,
                ticket,
                lun_raw,
                if read { edtl } else { 0 },
                wr,
                slot,
                (0, 0),
                0,
            );
            return;
        }
        // Immediate data only when negotiated, never beyond FirstBurstLength or EDTL
        // (RFC 7143 13.11, 13.14).
        if !refused
            && ((imm > 0 && !self.params.immediate_data)
                || imm > self.params.first_burst
                || imm > edtl)
        {
            self.shared.release(slot);
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return;
        }
        if edtl > MAX_WRITE && ending.is_none() {
            // ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h).
            ending = Some(Ending::Answer(check_condition(0x05, 0x24, 0x00)));
        }
        // Answered now, with no data still to come; or once it is in (below).
        if let (Some(Ending::Answer(resp)), false) = (&ending, follows) {
            self.shared.release(slot);
            self.send(ScsiResult::early(itt, lun_raw, resp.clone()));
            return;
        }
        let spdtl = target.data_out_len(lun, &cdb);
        if self.tasks.len() >= MAX_COLLECTING {
            self.shared.release(slot);
            match slot {
                Slot::Immediate => self.reject(reject::IMMEDIATE_REJECT, &bhs),
                // SAM-5 5.3: TASK SET FULL when resources for a new command are lacking.
                Slot::Window => self.send(ScsiResult::early(itt, lun_raw, task_set_full())),
            }
            return;
        }
        // The immediate data is all that has arrived; the buffer grows with the data-out. One
        // that ended keeps none, and takes a place in the arrival order only if it runs.
        let buf = if ending.is_some() {
            Vec::new()
        } else {
            pdu.data
        };
        let arrival = match ending {
            Some(Ending::Answer(_)) => None,
            _ => target.arrive(&nexus, lun, ticket.as_ref(), attr),
        };
        let draining = ending.is_some();
        let task = WriteTask {
            lun,
            lun_raw,
            cdb,
            attr,
            edtl,
            spdtl,
            slot,
            buf,
            seq_end: unsol_end.max(imm),
            unsolicited: true,
            ttt: RESERVED_TAG,
            datasn: 0,
            r2tsn: 0,
            solicited: 0,
            seq: self.next_seq,
            ending,
            ticket,
            arrival,
            asked: std::time::Instant::now(),
        };
        self.next_seq += 1;
        self.tasks.insert(itt, task);
        if !draining {
            self.advance_write(itt);
        }
    }

    /// After data arrived for `itt`: execute when complete, or ask for more with an R2T
    /// once the current sequence is done.
    fn advance_write(&mut self, itt: u32) {
        let max_burst = self.params.max_burst;
        let Some(task) = self.tasks.get(&itt) else {
            return;
        };
        let got = task.buf.len() as u32;
        let (edtl, seq_end, solicited, seq, attr) =
            (task.edtl, task.seq_end, task.solicited, task.seq, task.attr);
        if task.ending.is_some() {
            return; // it waits for the end of the data still expected, with no R2T
        }
        if got >= edtl {
            // Its budget stays held until it is answered.
            if let Some(t) = self.tasks.remove(&itt) {
                self.run_task(itt, t);
            }
            return;
        }
        if got < seq_end {
            return; // the current sequence is still arriving
        }
        // RFC 7143 11.8: one R2T at a time (MaxOutstandingR2T=1), at most MaxBurstLength.
        let len = (edtl - got).min(max_burst);
        // The first R2T reserves everything the task still needs, so a started write never
        // waits for budget again.
        let need = u64::from(edtl - got);
        if solicited == 0 {
            let held = self.shared.solicited.load(Ordering::Acquire);
            let head = attr == TaskAttr::HeadOfQueue;
            let may_exceed = || {
                let holders = self.shared.holders();
                let oldest = self
                    .tasks
                    .values()
                    .all(|t| t.seq >= seq || t.ending.is_some())
                    && holders.keys().next().is_none_or(|&h| h > seq);
                oldest || (head && !holders.values().any(|&h| h))
            };
            if held + need > MAX_SOLICITED && !may_exceed() {
                if !self.r2t_wait.contains(&itt) {
                    self.r2t_wait.push_back(itt);
                }
                return;
            }
            self.shared.solicit(seq, need, head);
        }
        let ttt = self.alloc_ttt();
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        if solicited == 0 {
            task.solicited = need;
        }
        task.unsolicited = false;
        task.asked = std::time::Instant::now();
        task.ttt = ttt;
        task.seq_end = got + len;
        task.datasn = 0;
        let r2tsn = task.r2tsn;
        task.r2tsn = task.r2tsn.wrapping_add(1);
        let mut b = Bhs::new(op::R2T);
        b.0[1] = 0x80;
        b.set_lun(task.lun_raw);
        b.set_u32(16, itt);
        b.set_u32(20, ttt);
        b.set_u32(36, r2tsn);
        b.set_u32(40, got);
        b.set_u32(44, len);
        self.send_pdu(b, Vec::new(), Sn::Peek);
    }

    /// Whether a write has waited longer than `limit` for data it asked for (one waiting for
    /// budget, in `r2t_wait`, waits for this target, not for its initiator).
    fn data_out_overdue(&self, now: std::time::Instant, limit: Duration) -> bool {
        self.tasks.iter().any(|(itt, t)| {
            now.saturating_duration_since(t.asked) > limit && !self.r2t_wait.contains(itt)
        })
    }

    /// Remove a task collecting data that ends without running, returning what it solicited
    /// to the budget.
    fn take_task(&mut self, itt: u32) -> Option<WriteTask> {
        let t = self.tasks.remove(&itt)?;
        self.shared.unsolicit(t.seq, t.solicited);
        Some(t)
    }

    /// Send the R2Ts that waited for budget, while budget lasts: HEAD OF QUEUE writes first,
    /// each tried every time (one may go over the budget while no other holds some, and the
    /// commands holding it wait for every one of them), then the others oldest first (the
    /// oldest may go over the budget), stopping at the first that does not fit. A write not
    /// waiting yet (new, or its unsolicited data just ended) takes budget that fits without
    /// queueing behind these; none waits for ever, as the oldest may always go over.
    fn pump_r2t(&mut self) {
        let tasks = &self.tasks;
        let key = |itt: &u32| {
            tasks
                .get(itt)
                .map_or((false, 0), |t| (t.attr != TaskAttr::HeadOfQueue, t.seq))
        };
        self.r2t_wait.make_contiguous().sort_by_key(key);
        let mut still = VecDeque::new();
        let mut blocked = false;
        while let Some(itt) = self.r2t_wait.pop_front() {
            let Some(head) = self
                .tasks
                .get(&itt)
                .map(|t| t.attr == TaskAttr::HeadOfQueue)
            else {
                continue;
            };
            if blocked && !head {
                still.push_back(itt);
                continue;
            }
            self.advance_write(itt);
            if self.r2t_wait.back() == Some(&itt) {
                // Still no budget: it keeps its place.
                self.r2t_wait.pop_back();
                still.push_back(itt);
                blocked |= !head;
            }
        }
        self.r2t_wait = still;
    }

    /// A Data-Out PDU as it arrives: kept with its write if that is held for its CmdSN (see
    /// [`Held::Pdu`]), taken at once otherwise.
    fn data_out_arrived(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        let itt = pdu.bhs.itt();
        if !self.tasks.contains_key(&itt) && pdu.bhs.field20() == RESERVED_TAG {
            let first_burst = self.params.first_burst as usize;
            let held = self.held.values_mut().find_map(|h| match h {
                Held::Pdu(p, _, data)
                    if p.bhs.opcode() == op::SCSI_CMD
                        && p.bhs.itt() == itt
                        && p.bhs.flags() & 0x20 != 0 =>
                {
                    Some(data)
                }
                _ => None,
            });
            if let Some(data) = held {
                data.last |= pdu.bhs.final_bit();
                let bytes: usize = data.pdus.iter().map(|d| d.data.len()).sum();
                data.over |=
                    data.pdus.len() >= MAX_HELD_DATA_OUT || bytes + pdu.data.len() > first_burst;
                if data.over {
                    data.pdus = Vec::new();
                } else {
                    data.pdus.push(pdu);
                }
                return Ok(Flow::Continue);
            }
        }
        self.data_out_pdu(pdu)
    }

    /// A Data-Out PDU for a task collecting data, or for none: one whose data failed its
    /// digest (already rejected as it arrived) ends its task.
    fn data_out_pdu(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        if pdu.data_digest_bad {
            self.fail_task(pdu.bhs.itt(), 0x47, 0x05, Some((&pdu.bhs, pdu.data.len())));
            return Ok(Flow::Continue);
        }
        self.data_out(pdu)
    }

    fn data_out(&mut self, pdu: Pdu) -> Result<Flow, SessionError> {
        let bhs = pdu.bhs;
        let itt = bhs.itt();
        let ttt = bhs.field20();
        let Some(task) = self.tasks.get_mut(&itt) else {
            // Data for a task that was aborted or already answered: discard (RFC 7143
            // 4.2.3.3).
            return Ok(Flow::Continue);
        };
        if task.ending.is_some() {
            // Discarded; the PDU that ends the sequence still arriving ends the data still
            // expected, and the task is answered (RFC 7143 11.4).
            if task.ends_sequence(&bhs, pdu.data.len()) {
                self.end_task(itt);
            }
            return Ok(Flow::Continue);
        }
        if ttt != task.expected_ttt() {
            if ttt == RESERVED_TAG {
                // Unsolicited data where none is allowed (InitialR2T=Yes, or after the first
                // burst ended): the task ends with UNEXPECTED UNSOLICITED DATA (0Ch/0Ch, RFC
                // 7143 11.4.7.2).
                self.fail_task(itt, 0x0c, 0x0c, Some((&bhs, pdu.data.len())));
            } else {
                self.reject(reject::INVALID_FIELD, &bhs);
            }
            return Ok(Flow::Continue);
        }
        // RFC 7143 7.9: a DataSN out of order means an earlier Data-Out was lost to a digest
        // error, handled as in 7.8; at ERL 0 the task ends with CHECK CONDITION, ABORTED
        // COMMAND / PROTOCOL SERVICE CRC ERROR (11.4.7.2). Later Data-Out for it is discarded.
        if bhs.u32_at(36) != task.datasn {
            self.fail_task(itt, 0x47, 0x05, Some((&bhs, pdu.data.len())));
            return Ok(Flow::Continue);
        }
        let offset = bhs.u32_at(40);
        let len = pdu.data.len() as u32;
        let got = task.buf.len() as u32;
        // DataPDUInOrder=Yes: each PDU continues where the last ended, within the sequence;
        // otherwise the task ends with INCORRECT AMOUNT OF DATA (0Ch/0Dh, RFC 7143 11.4.7.2),
        // or for unsolicited data beyond the first burst UNEXPECTED UNSOLICITED DATA
        // (0Ch/0Ch).
        if offset != got || got.checked_add(len).is_none_or(|end| end > task.seq_end) {
            let within_edtl = got.checked_add(len).is_some_and(|end| end <= task.edtl);
            let ascq = if task.unsolicited && offset == got && within_edtl {
                0x0c
            } else {
                0x0d
            };
            self.fail_task(itt, 0x0c, ascq, Some((&bhs, pdu.data.len())));
            return Ok(Flow::Continue);
        }
        if task.buf.capacity() < task.seq_end as usize {
            // Data of this sequence is arriving: room for the rest of it (at most
            // FirstBurstLength unsolicited, or what an R2T asked for), once.
            task.buf
                .reserve_exact((task.seq_end as usize).saturating_sub(task.buf.len()));
        }
        task.buf.extend_from_slice(&pdu.data);
        task.datasn = task.datasn.wrapping_add(1);
        if bhs.final_bit() {
            // The sequence ended (possibly early): the next R2T starts where data stopped.
            task.seq_end = task.buf.len() as u32;
        }
        self.advance_write(itt);
        Ok(Flow::Continue)
    }

    /// End a task still collecting data with CHECK CONDITION, ABORTED COMMAND and the given
    /// additional sense code, because of `pdu`, a Data-Out header and its data's length. The
    /// answer waits for the end of the sequence still arriving, if one is and that PDU did not
    /// end it (RFC 7143 11.4); a task that already ended keeps its first answer.
    fn fail_task(&mut self, itt: u32, asc: u8, ascq: u8, pdu: Option<(&Bhs, usize)>) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let expecting = task.ending.is_some() || (task.buf.len() as u32) < task.seq_end;
        let arriving = expecting && !pdu.is_some_and(|(b, len)| task.ends_sequence(b, len));
        if task.ending.is_none() {
            task.ending = Some(Ending::Answer(check_condition(0x0b, asc, ascq)));
            task.buf = Vec::new();
        }
        if !arriving {
            self.end_task(itt);
        }
    }

    /// Answer a task that ended while collecting data (see [`Ending`]), now that no more is
    /// expected.
    fn end_task(&mut self, itt: u32) {
        let Some(mut t) = self.tasks.remove(&itt) else {
            return;
        };
        let ended = match (&self.target, &self.nexus) {
            (Some(target), Some(nexus)) => {
                self.ticket_ended(target, nexus, t.lun, t.ticket.as_ref())
            }
            _ => false,
        };
        match t.ending.take() {
            // Task management ended it meanwhile: it ends as any task it ends, with no
            // status (the SCSI layer sees its ticket ended, and tells a nexus whose task
            // another one cleared).
            Some(Ending::Answer(_)) if ended => self.run_task(itt, t),
            Some(Ending::Answer(resp)) => {
                self.shared.unsolicit(t.seq, t.solicited);
                self.shared.release(t.slot);
                self.send(Out::Result(Box::new(ScsiResult {
                    r2ts: t.r2tsn,
                    ..ScsiResult::fields(itt, t.lun_raw, resp)
                })));
            }
            Some(Ending::Refused) | None => self.run_task(itt, t),
        }
    }

    /// Run a write whose data-out is in (or, refused, none is taken).
    fn run_task(&self, itt: u32, t: WriteTask) {
        let (Some(target), Some(nexus)) = (self.target.clone(), self.nexus.clone()) else {
            return;
        };
        let wr = Some((t.spdtl > t.edtl, t.spdtl.abs_diff(t.edtl)));
        let held = (t.seq, t.solicited);
        let cmd = Command {
            nexus,
            lun: t.lun,
            tag: u64::from(itt),
            attr: t.attr,
            cdb: t.cdb,
            data_out: t.buf.into(),
            data_in_len: 0,
            data_in_buf: None,
            arrival: t.arrival,
        };
        self.execute(
            target, cmd, t.ticket, t.lun_raw, 0, wr, t.slot, held, t.r2tsn,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        target: Arc<scsi::Target>,
        cmd: Command,
        ticket: Option<scsi::Ticket>,
        lun: [u8; 8],
        edtl_in: u32,
        write_residual: Option<(bool, u32)>,
        slot: Slot,
        (seq, solicited): (u64, u64),
        r2ts: u32,
    ) {
        // A READ takes its share of the connection's data-in budget first, or is answered
        // TASK SET FULL without running (SAM-5 5.3: the resources for it are lacking), as SCST
        // does. Never waited for: a command waiting here would have no place in the task set
        // or the arrival order that task attributes and task management go by.
        let want = target.read_len(cmd.lun, &cmd.cdb).min(MAX_READING) as u32;
        let reading = if want > 0 {
            match self.shared.reading.clone().try_acquire_many_owned(want) {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.shared.release(slot);
                    self.shared.unsolicit(seq, solicited);
                    self.send(ScsiResult::early(cmd.tag as u32, lun, task_set_full()));
                    return;
                }
            }
        } else {
            None
        };
        let tx = self.tx.clone();
        let shared = self.shared.clone();
        let itt = cmd.tag as u32;
        shared.executing.fetch_add(1, Ordering::AcqRel);
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        shared.running().insert(
            itt,
            Running {
                lun: cmd.lun,
                id,
                then: Vec::new(),
            },
        );
        let (nexus, lun_id, opcode) = (cmd.nexus.clone(), cmd.lun, cmd.cdb.first().copied());
        let task = async move {
            let done = target.execute_admitted(cmd, ticket).await;
            shared.release(slot);
            shared.unsolicit(seq, solicited);
            {
                // Send under the lock, so a TMF response can never overtake it unnoticed.
                let mut running = shared.running();
                // Gone (or another task's, reusing the ITT): a task management function ended
                // this task and answered for it.
                let entry = match running.get(&itt) {
                    Some(r) if r.id == id => running.remove(&itt),
                    _ => None,
                };
                let ours = entry.is_some();
                let then = entry.map(|r| r.then).unwrap_or_default();
                match done {
                    Completion::Done(resp) if ours => {
                        tx.send(Out::Result(Box::new(ScsiResult {
                            itt,
                            lun,
                            resp,
                            edtl_in,
                            write_residual,
                            r2ts,
                            reading,
                        })));
                    }
                    // Ended by task management, which answers no status for it (a function
                    // of this connection may have had its response stamped already). One
                    // that had completed first loses its answer here: a unit attention in it
                    // stays pending.
                    _ => {
                        if let Completion::Done(resp) = &done {
                            target.undelivered(&nexus, lun_id, opcode, resp);
                        }
                        if slot == Slot::Window {
                            shared.window_reopened(&tx);
                        }
                    }
                }
                for bhs in then {
                    tx.send_pdu(bhs, Vec::new(), Sn::Status);
                }
            }
            shared.executing.fetch_sub(1, Ordering::AcqRel);
        };
        // Run the command here until it first has to wait: a read the page cache holds
        // completes without a task spawn and a thread hop. Only a command that waits gets a
        // task of its own, which its worker polls again with the real waker (see
        // `run_here_first`).
        //
        // The file driver writes into the page cache right here too (`block::IoThreadScope`)
        // instead of handing the write to another thread (`block_in_place` or the ring) and
        // waiting: the commands behind this one wait for the reader anyway, and the hand-off
        // costs more than the write. 4 KiB writes at queue depth 32 (qemu-img bench over
        // iSCSI): 82k IOPS handed off, 190k in place. A write that blocks (dirty-page
        // throttling) holds this connection's reader, which is backpressure on its
        // initiator, and this worker, whose queued tasks the other workers take over.
        run_here_first(task, true);
    }

    /// Whether task management has ended the task whose ticket is `ticket` (one without a
    /// ticket never ends that way).
    fn ticket_ended(
        &self,
        target: &scsi::Target,
        nexus: &Arc<ItNexus>,
        lun: u64,
        ticket: Option<&scsi::Ticket>,
    ) -> bool {
        ticket.is_some_and(|t| target.ticket_ended(nexus, lun, t))
    }

    /// Drop transport-side tasks still collecting data that `pred` selects.
    fn drop_tasks(&mut self, pred: impl Fn(u64) -> bool) {
        let shared = self.shared.clone();
        self.tasks.retain(|_, t| {
            let keep = !pred(t.lun);
            if !keep {
                shared.unsolicit(t.seq, t.solicited);
                shared.release(t.slot);
            }
            keep
        });
    }

    /// Whether `refsn` is a CmdSN inside the window [ExpCmdSN, MaxCmdSN] that has not
    /// arrived and comes before `tmf_cmdsn`, the CmdSN of the TMF referring to it (which, for
    /// an immediate TMF, is itself at most one past MaxCmdSN: RFC 7143 3.2.2.1).
    fn not_yet_received(&self, refsn: u32, tmf_cmdsn: u32) -> bool {
        let (exp, max) = (self.shared.exp(), self.shared.max());
        let width = max.wrapping_sub(exp);
        if width >= 0x8000_0000 {
            return false; // the window is closed
        }
        let ref_d = refsn.wrapping_sub(exp);
        let tmf_d = tmf_cmdsn.wrapping_sub(exp);
        ref_d <= width
            && ref_d < tmf_d
            && tmf_d <= width.saturating_add(1)
            && !self.held.contains_key(&refsn)
    }

    /// Whether a SCSI command held for its CmdSN matches `pred` and is still alive: task
    /// management has not ended it since it arrived (see [`scsi::Ticket`]).
    fn held_command(
        &self,
        target: &scsi::Target,
        nexus: &Arc<ItNexus>,
        pred: impl Fn(&Pdu) -> bool,
    ) -> bool {
        self.held.values().any(|h| {
            matches!(h, Held::Pdu(p, ticket, _) if p.bhs.opcode() == op::SCSI_CMD
                && pred(p)
                && !self.ticket_ended(target, nexus, pdu::decode_lun(p.bhs.lun()), ticket.as_ref()))
        })
    }

    fn tmf(&mut self, pdu: &Pdu, slot: tokio::sync::OwnedSemaphorePermit) -> Flow {
        let bhs = pdu.bhs;
        let func = bhs.flags() & 0x7f;
        let lun = pdu::decode_lun(bhs.lun());
        let rtt = bhs.field20();
        let mut b = Bhs::new(op::TMF_RESP);
        b.0[1] = 0x80;
        b.set_u32(16, bhs.itt());
        let (Some(target), Some(nexus)) = (self.target.clone(), self.nexus.clone()) else {
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return Flow::Continue;
        };
        let respond = |this: &Self, mut b: Bhs, code: u8| {
            b.0[2] = code;
            this.send_pdu(b, Vec::new(), Sn::Status);
        };
        // RFC 7143 11.6.1 response codes.
        const COMPLETE: u8 = 0;
        const TASK_DOES_NOT_EXIST: u8 = 1;
        const NOT_SUPPORTED: u8 = 5;
        const REASSIGN_NOT_SUPPORTED: u8 = 4;
        // RFC 7144 (iSCSI SCSI features update): the query functions' positive answer.
        const SUCCEEDED: u8 = 7;
        let tmf = match func {
            1 => {
                // ABORT TASK (RFC 7143 11.5.1). A task is named by its logical unit and its
                // tag (SAM-5 7.2): one still collecting data for another LUN is not this one.
                if self.tasks.get(&rtt).is_some_and(|t| t.lun == lun) {
                    if let Some(t) = self.take_task(rtt) {
                        self.shared.release(t.slot);
                    }
                    respond(self, b, COMPLETE);
                    return Flow::Continue;
                }
                let refsn = bhs.u32_at(32);
                // Only a SCSI command is a task: a held task management request or Logout
                // with that ITT is not this one's to end.
                if let Some((&sn, _)) = self.held.iter().find(|(_, h)| {
                    matches!(h, Held::Pdu(p, ..)
                            if p.bhs.opcode() == op::SCSI_CMD
                                && p.bhs.itt() == rtt
                                && pdu::decode_lun(p.bhs.lun()) == lun)
                }) {
                    self.held.insert(sn, Held::Skip);
                    respond(self, b, COMPLETE);
                    return Flow::Continue;
                }
                // RFC 7143 11.5.1 b): a task not received yet whose RefCmdSN is inside the
                // valid CmdSN window and precedes the TMF's own CmdSN: consider the CmdSN
                // received and answer "Function complete". Anything else (c: outside the
                // window, or a CmdSN already received for another task) is not this task.
                if self.not_yet_received(refsn, bhs.cmdsn()) {
                    self.held.insert(refsn, Held::Skip);
                    respond(self, b, COMPLETE);
                    return Flow::Continue;
                }
                // Neither collecting data nor executing: it completed (or never existed).
                if !self.shared.running().contains_key(&rtt) {
                    respond(self, b, TASK_DOES_NOT_EXIST);
                    return Flow::Continue;
                }
                Tmf::AbortTask {
                    lun,
                    tag: u64::from(rtt),
                }
            }
            // The writes they end stop collecting data now, and Data-Out that still comes
            // for them is discarded (`data_out`). "Task Management Actions on Task Sets" (RFC
            // 3720 10.6.2, kept in RFC 7143) has the target wait for the Data-Out of every
            // outstanding R2T first, but the Linux initiator stops sending that Data-Out once
            // it has sent the function (iscsi_check_tmf_restrictions): waiting for it would
            // hold the function until the initiator gave up.
            2 => {
                self.drop_tasks(|l| l == lun);
                Tmf::AbortTaskSet { lun }
            }
            4 => {
                self.drop_tasks(|l| l == lun);
                Tmf::ClearTaskSet { lun }
            }
            5 => {
                self.drop_tasks(|l| l == lun);
                Tmf::LogicalUnitReset { lun }
            }
            6 => {
                self.drop_tasks(|_| true);
                Tmf::TargetWarmReset
            }
            7 => {
                self.drop_tasks(|_| true);
                Tmf::TargetColdReset
            }
            8 => {
                respond(self, b, REASSIGN_NOT_SUPPORTED);
                return Flow::Continue;
            }
            // RFC 7144: function codes 9-12 carry the SAM-4/5 functions.
            9 => {
                // QUERY TASK: a task still collecting data (or held for its CmdSN) exists as
                // far as the initiator knows, though the SCSI layer has not seen it yet,
                // unless task management has ended it since it arrived (another nexus's
                // CLEAR TASK SET or LOGICAL UNIT RESET): then it will be dropped when its data
                // is complete, and does not exist.
                // A task is named by its LUN and its tag (SAM-5 7.2), as for ABORT TASK.
                let collecting = self.tasks.get(&rtt).is_some_and(|t| {
                    t.lun == lun && !self.ticket_ended(&target, &nexus, t.lun, t.ticket.as_ref())
                });
                if collecting
                    || self.held_command(&target, &nexus, |p| {
                        p.bhs.itt() == rtt && pdu::decode_lun(p.bhs.lun()) == lun
                    })
                {
                    respond(self, b, SUCCEEDED);
                    return Flow::Continue;
                }
                Tmf::QueryTask {
                    lun,
                    tag: u64::from(rtt),
                }
            }
            10 => {
                // QUERY TASK SET: likewise for any task of the LU.
                let raw = bhs.lun();
                if self.tasks.values().any(|t| {
                    t.lun == lun && !self.ticket_ended(&target, &nexus, t.lun, t.ticket.as_ref())
                }) || self.held_command(&target, &nexus, |p| p.bhs.lun() == raw)
                {
                    respond(self, b, SUCCEEDED);
                    return Flow::Continue;
                }
                Tmf::QueryTaskSet { lun }
            }
            11 => {
                // I_T NEXUS RESET: every task of this session ends, as for a reset of the
                // nexus (SAM-5 6.3.4).
                self.drop_tasks(|_| true);
                Tmf::ItNexusReset
            }
            12 => Tmf::QueryAsyncEvent { lun },
            _ => {
                respond(self, b, NOT_SUPPORTED);
                return Flow::Continue;
            }
        };
        // The tasks a function ends are those received before it (RFC 7143 11.5.1: a lower
        // CmdSN), so they are chosen now, before the next PDU is read: the running ones
        // here, and in the SCSI layer by the first poll below, which marks them there.
        let ends = {
            let running = self.shared.running();
            running
                .iter()
                .filter(|(itt, r)| match tmf {
                    // The task on the LUN the function names: a task of that tag on another
                    // LU is not the one it asks about (its answer, "task does not exist",
                    // must not wait for that task).
                    Tmf::AbortTask { lun, tag } => u64::from(**itt) == tag && r.lun == lun,
                    Tmf::AbortTaskSet { lun }
                    | Tmf::ClearTaskSet { lun }
                    | Tmf::LogicalUnitReset { lun } => r.lun == lun,
                    Tmf::TargetWarmReset | Tmf::TargetColdReset | Tmf::ItNexusReset => true,
                    Tmf::ClearAca { .. }
                    | Tmf::QueryTask { .. }
                    | Tmf::QueryTaskSet { .. }
                    | Tmf::QueryAsyncEvent { .. } => false,
                })
                .map(|(_, r)| r.id)
                .collect::<Vec<u64>>()
        };
        let tx = self.tx.clone();
        let shared = self.shared.clone();
        let server = self.server.clone();
        let kind = self.kind;
        let task = async move {
            let _slot = slot;
            let r = target.task_management(&nexus, tmf).await;
            let code = match r {
                TmfResponse::FunctionComplete => COMPLETE,
                TmfResponse::FunctionSucceeded => SUCCEEDED,
                TmfResponse::TaskDoesNotExist => 1,
                TmfResponse::IncorrectLun => 2,
                TmfResponse::FunctionRejected => 255,
            };
            {
                // Tasks the function ended get no response of their own: mark them, and send
                // the TMF response under the same lock.
                let mut running = shared.running();
                // The SCSI layer's answer is authoritative: the first of "abort" and "finish"
                // decides a task's fate there. FUNCTION COMPLETE means its completion is
                // `Aborted` (no response of its own), TASK DOES NOT EXIST that it finished.
                b.0[2] = code;
                if let Tmf::AbortTask { tag, .. } = tmf {
                    // Completed in the SCSI layer, response not yet queued: the TMF response
                    // goes out right after it (see `Running::then`). The task it names, not a
                    // later one that has taken its ITT since.
                    let pending = u32::try_from(tag)
                        .ok()
                        .and_then(|t| running.get_mut(&t))
                        .filter(|r| ends.contains(&r.id));
                    if let (1, Some(r)) = (code, pending) {
                        r.then.push(b);
                        return;
                    }
                }
                if code == 0 {
                    // Only functions that end tasks chose any; the queries change nothing.
                    // The tasks it ended are over as the initiator sees it, their ITTs free
                    // again (RFC 7143 11.2.1.8): they leave `running`, and get no response.
                    // An ABORT TASK response waiting for one of them (`Running::then`) goes
                    // out now, before this one.
                    running.retain(|_, r| {
                        if !ends.contains(&r.id) {
                            return true;
                        }
                        for bhs in r.then.drain(..) {
                            tx.send_pdu(bhs, Vec::new(), Sn::Status);
                        }
                        false
                    });
                }
                tx.send_pdu(b, Vec::new(), Sn::Status);
            }
            // RFC 7143 11.5.1: after TARGET COLD RESET the target drops all its connections.
            if tmf == Tmf::TargetColdReset {
                if let Kind::Normal(i) = kind {
                    server.kill_target_sessions(i);
                }
            }
        };
        run_here_first(task, false);
        Flow::Continue
    }

    fn text(&mut self, pdu: &Pdu) {
        let bhs = pdu.bhs;
        let itt = bhs.itt();
        let ttt = bhs.field20();
        let mut b = Bhs::new(op::TEXT_RESP);
        b.set_lun(bhs.lun());
        b.set_u32(16, itt);
        let (f, c) = (bhs.flags() & 0x80 != 0, bhs.flags() & 0x40 != 0);
        // "A Text Request with the C bit set to 1 MUST have the F bit set to 0" (RFC 7143
        // 11.10.2).
        if f && c {
            self.reset_text();
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return;
        }
        if ttt != RESERVED_TAG {
            // Continuing a long response (RFC 7143 11.10.4).
            if let Some((t, rest)) = self.text_out.take() {
                if t == ttt {
                    // Its last part has the F bit of the request that asks for it.
                    self.send_text(b, rest, f);
                    return;
                }
            }
            // The next part of a request sent with C=1, or the next request of a sequence
            // answered with F=0: the initiator copied the TTT of our answer (RFC 7143
            // 11.10.4, 11.11.1).
            if self.text_in_ttt.take() != Some(ttt) {
                self.text_in.clear();
                self.reject(reject::INVALID_FIELD, &bhs);
                return;
            }
        } else {
            // TTT 0xffffffff: a new request; whatever was under way is reset (RFC 7143
            // 11.10.4).
            self.reset_text();
        }
        if self.text_in.len() + pdu.data.len() > MAX_TEXT {
            self.text_in.clear();
            self.reject(reject::OUT_OF_RESOURCES, &bhs);
            return;
        }
        self.text_in.extend_from_slice(&pdu.data);
        if c {
            // C=1: more request text follows; answer empty with F=0 and a TTT for the
            // initiator to continue with (RFC 7143 11.10.2, 11.10.4).
            let ttt = self.alloc_ttt();
            self.text_in_ttt = Some(ttt);
            b.set_u32(20, ttt);
            self.send_pdu(b, Vec::new(), Sn::Status);
            return;
        }
        let input = std::mem::take(&mut self.text_in);
        let pairs = match text::parse(&input) {
            Ok(p) => p,
            Err(_) => {
                self.reject(reject::PROTOCOL_ERROR, &bhs);
                return;
            }
        };
        // A key declared or negotiated twice in one request is a protocol error (RFC 7143
        // 6.2); SendTargets twice would also build its list twice.
        let mut seen = std::collections::HashSet::new();
        if !pairs.iter().all(|(k, _)| seen.insert(k.as_str())) {
            self.reject(reject::PROTOCOL_ERROR, &bhs);
            return;
        }
        let mut reply = Vec::new();
        let mut max_data = None;
        for (k, v) in &pairs {
            match k.as_str() {
                "SendTargets" => self.send_targets(v, &mut reply),
                // Declarative, of use ALL (RFC 7143 13.6): taken, not answered.
                "InitiatorAlias" => {}
                // Declarative and allowed in the full feature phase (RFC 7143 13.12): taken as
                // at login, without an answer, or answered Reject when out of range.
                "MaxRecvDataSegmentLength" => {
                    match text::negotiate(&mut self.params, k, v, false) {
                        text::Answer::Silent => max_data = Some(self.params.max_send_dsl),
                        text::Answer::Value(a) => reply.push((k.clone(), a)),
                        text::Answer::NotOperational => {}
                    }
                }
                _ => reply.push((k.clone(), "NotUnderstood".to_string())),
            }
        }
        // The new limit holds from this response on (PDUs queued before it keep the old one).
        if let Some(n) = max_data {
            self.send(Out::MaxData(n));
        }
        self.send_text(b, text::encode(&reply), f);
    }

    /// Forget the text request or response under way.
    fn reset_text(&mut self) {
        self.text_in.clear();
        self.text_in_ttt = None;
        self.text_out = None;
    }

    /// Send a Text Response with `data`, in parts of at most the initiator's
    /// MaxRecvDataSegmentLength (C=1 and a TTT for each but the last). The last part has F=1
    /// only if the request it answers had (`last`): "A Text Response with the F bit set to 1
    /// in response to a Text Request with the F bit set to 0 is a protocol error" (RFC 7143
    /// 11.11.1); with F=0 it carries a TTT the initiator's next request of the sequence copies.
    fn send_text(&mut self, mut b: Bhs, mut data: Vec<u8>, last: bool) {
        let max = self.params.max_send_dsl as usize;
        if data.len() > max {
            let rest = data.split_off(max);
            let ttt = self.alloc_ttt();
            b.0[1] = 0x40; // C=1, F=0
            b.set_u32(20, ttt);
            self.text_out = Some((ttt, rest));
        } else if last {
            b.0[1] = 0x80; // F=1
            b.set_u32(20, RESERVED_TAG);
        } else {
            let ttt = self.alloc_ttt();
            b.0[1] = 0; // C=0, F=0: the sequence goes on
            b.set_u32(20, ttt);
            self.text_in_ttt = Some(ttt);
        }
        self.send_pdu(b, data, Sn::Status);
    }

    /// SendTargets (RFC 7143 Appendix C): `All` lists every target this initiator may log in
    /// to, in a discovery session only ("MUST NOT be supported on an operational session");
    /// a name lists that target; empty (normal sessions) the session's target. Anything else
    /// is answered `Reject`.
    fn send_targets(&self, v: &str, reply: &mut Vec<(String, String)>) {
        let targets = &self.server.config.targets;
        let visible = |t: &crate::TargetConfig| {
            t.allowed_initiators
                .as_ref()
                .is_none_or(|a| a.iter().any(|n| n == &self.initiator))
        };
        let chosen: Vec<&crate::TargetConfig> = match (v, self.kind) {
            ("All", Kind::Discovery) => targets.iter().filter(|t| visible(t)).collect(),
            ("All", Kind::Normal(_)) => Vec::new(),
            ("", Kind::Normal(i)) => targets.get(i).into_iter().collect(),
            // Case folded, as at login (RFC 3722).
            (name, _) => targets
                .iter()
                .filter(|t| t.name == name.to_lowercase() && visible(t))
                .collect(),
        };
        if chosen.is_empty() {
            reply.push(("SendTargets".into(), "Reject".into()));
            return;
        }
        let portals = if self.server.config.portals.is_empty() {
            vec![self.local]
        } else {
            self.server.config.portals.clone()
        };
        for t in chosen {
            reply.push(("TargetName".into(), t.name.clone()));
            for p in &portals {
                let addr = match p {
                    SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
                    SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
                };
                reply.push(("TargetAddress".into(), format!("{addr},{}", t.tpgt)));
            }
        }
    }

    async fn logout(&mut self, pdu: &Pdu) -> Flow {
        let bhs = pdu.bhs;
        let reason = bhs.flags() & 0x7f;
        let mut b = Bhs::new(op::LOGOUT_RESP);
        b.0[1] = 0x80;
        b.set_u32(16, bhs.itt());
        // RFC 7143 11.14.1 / 11.15.1.
        let code = match reason {
            0 => 0,
            1 if bhs.u16_at(20) == self.cid => 0,
            1 => 1, // CID not found
            _ => 2, // connection recovery is not supported (ERL 0)
        };
        b.0[2] = code;
        if code != 0 {
            self.send_pdu(b, Vec::new(), Sn::Status);
            return Flow::Continue;
        }
        // Commands still collecting data are dropped; the ones executing are answered before
        // the Logout Response (RFC 7143 11.14: the response follows all outstanding tasks).
        self.drop_tasks(|_| true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.shared.executing.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Time2Wait / Time2Retain: nothing to reconnect to at ERL 0.
        b.set_u16(40, 0);
        b.set_u16(42, 0);
        self.send_pdu(b, Vec::new(), Sn::Status);
        Flow::Close
    }
}

/// CHECK CONDITION with fixed-format sense data (SPC-5 4.4.3).
fn check_condition(key: u8, asc: u8, ascq: u8) -> Response {
    Response {
        status: scsi::Status::CHECK_CONDITION,
        sense: vec![
            0x70, // current error, fixed format
            0, key, // SENSE KEY
            0, 0, 0, 0, 10, // ADDITIONAL SENSE LENGTH
            0, 0, 0, 0, asc,  // ADDITIONAL SENSE CODE
            ascq, // ADDITIONAL SENSE CODE QUALIFIER
            0, 0, 0, 0,
        ],
        data_in: Vec::new(),
        data_in_placed: 0,
    }
}

/// The writer task: serialise [`Out`] messages, flushing when the queue runs dry.
async fn writer<W: AsyncWrite + Unpin>(
    w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<Backlog>,
    shared: Arc<Shared>,
    framing: Framing,
    max_burst: u32,
    mut statsn: u32,
) -> Result<(), std::io::Error> {
    let _ended = WriterEnded(shared.clone());
    let mut w = Watched {
        inner: w,
        shared: shared.clone(),
    };
    // Both are at least 512 by negotiation (RFC 7143 13.12, 13.13); the floor only guards
    // against a zero that would never make progress.
    let mut framing = framing;
    let mut max_data = framing.max_data.max(512);
    let max_burst = max_burst.max(512);
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            queued.sub(msg.bytes());
            match msg {
                Out::Close => {
                    w.flush().await?;
                    break 'outer;
                }
                Out::MaxData(n) => {
                    framing.max_data = n;
                    max_data = n.max(512);
                }
                Out::Pdu { mut bhs, data, sn } => {
                    if bhs.opcode() == op::NOP_IN
                        && bhs.itt() == RESERVED_TAG
                        && bhs.field20() == RESERVED_TAG
                    {
                        // Cleared before the stamp, by a read-modify-write: a place reopened
                        // after it queues another, and one whose `window_reopened` found the
                        // flag still set is seen by the stamp (the two swaps are ordered, and
                        // the earlier one's release carries the window's change).
                        shared.window_nop.swap(false, Ordering::AcqRel);
                    }
                    stamp(&mut bhs, &shared, &mut statsn, sn);
                    pdu::write_pdu(&mut w, &mut bhs, &data, framing).await?;
                }
                Out::Result(r) => {
                    write_result(
                        &mut w,
                        *r,
                        &shared,
                        &mut statsn,
                        framing,
                        max_data,
                        max_burst,
                    )
                    .await?;
                }
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
        shared.writer_waits.notify_waiters();
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

/// Marks the writer ended and says so to a reader waiting for it ([`busy_poll`]), however
/// the writer ends: done, failed, or dropped with its task.
struct WriterEnded(Arc<Shared>);

impl Drop for WriterEnded {
    fn drop(&mut self) {
        self.0.writer_stalled.store(true, Ordering::Release);
        self.0.writer_waits.notify_waiters();
    }
}

/// The writer's output, which tells a reader waiting for the writer ([`busy_poll`]) each time
/// the socket cannot take more for now: the writer then waits for the initiator, and the
/// reader must not wait for the writer (an initiator blocked sending to a reader that does
/// not read would never read what the writer sends).
struct Watched<W> {
    inner: W,
    shared: Arc<Shared>,
}

impl<W> Watched<W> {
    fn pending<T>(&self, p: std::task::Poll<T>) -> std::task::Poll<T> {
        let blocked = p.is_pending();
        self.shared.writer_stalled.store(blocked, Ordering::Release);
        if blocked {
            self.shared.writer_waits.notify_waiters();
        }
        p
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.pending(p)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.pending(p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.pending(p)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.pending(p)
    }
}

fn stamp(bhs: &mut Bhs, shared: &Shared, statsn: &mut u32, sn: Sn) {
    bhs.set_u32(24, *statsn);
    if sn == Sn::Status {
        *statsn = statsn.wrapping_add(1);
    }
    bhs.set_u32(28, shared.exp());
    bhs.set_u32(32, shared.max());
}

/// Data-In PDUs and/or a SCSI Response for one command (RFC 7143 11.4, 11.7).
async fn write_result<W: AsyncWrite + Unpin>(
    w: &mut W,
    r: ScsiResult,
    shared: &Shared,
    statsn: &mut u32,
    framing: Framing,
    max_data: u32,
    max_burst: u32,
) -> Result<(), std::io::Error> {
    let produced = r.resp.data_in.len();
    let send = produced.min(r.edtl_in as usize);
    // Residuals (RFC 7143 11.4.5): for data-in, what was produced against EDTL; for writes,
    // the CDB's transfer length against EDTL.
    let (res_flags, residual) = match r.write_residual {
        Some((true, n)) if n > 0 => (0x04, n),
        Some((false, n)) if n > 0 => (0x02, n),
        Some(_) => (0, 0),
        None => {
            let edtl = r.edtl_in as usize;
            if produced > edtl {
                (0x04, u32::try_from(produced - edtl).unwrap_or(u32::MAX))
            } else if produced < edtl {
                (0x02, u32::try_from(edtl - produced).unwrap_or(u32::MAX))
            } else {
                (0, 0)
            }
        }
    };
    let status_in_data = r.resp.sense.is_empty() && send > 0;
    let data = r.resp.data_in.get(..send).unwrap_or_default();
    // Each PDU carries at most the initiator's MaxRecvDataSegmentLength (RFC 7143 13.12) and
    // each Data-In sequence at most MaxBurstLength (13.13); the F bit marks the last PDU of a
    // sequence (11.7.1), so a read longer than MaxBurstLength is several sequences.
    let max_data = max_data as usize;
    let max_burst = max_burst as usize;
    let mut datasn = 0u32;
    let mut offset = 0usize;
    let mut burst_used = 0usize;
    while offset < send {
        let room = max_burst.saturating_sub(burst_used).max(1);
        let len = (send - offset).min(max_data).min(room);
        let end = offset + len;
        let last = end == send;
        burst_used += len;
        let burst_end = burst_used >= max_burst || last;
        let mut b = Bhs::new(op::DATA_IN);
        let mut flags = 0u8;
        if burst_end {
            flags |= 0x80; // F: end of a sequence
            burst_used = 0;
        }
        if last && status_in_data {
            flags |= 0x01 | res_flags; // S, with O/U
            b.0[3] = r.resp.status.0;
            b.set_u32(44, residual);
        }
        b.0[1] = flags;
        b.set_lun(r.lun);
        b.set_u32(16, r.itt);
        b.set_u32(20, RESERVED_TAG);
        b.set_u32(36, datasn);
        // `send` is at most EDTL, a u32.
        b.set_u32(40, u32::try_from(offset).unwrap_or(u32::MAX));
        let sn = if last && status_in_data {
            Sn::Status
        } else {
            Sn::Peek
        };
        stamp(&mut b, shared, statsn, sn);
        if sn == Sn::Peek {
            b.set_u32(24, 0); // StatSN is reserved without the S bit
        }
        pdu::write_pdu(
            w,
            &mut b,
            data.get(offset..end).unwrap_or_default(),
            framing,
        )
        .await?;
        datasn = datasn.wrapping_add(1);
        offset = end;
    }
    // The data is in the socket or the writer's buffer: the READ's budget goes back.
    drop(r.reading);
    if status_in_data {
        return Ok(());
    }
    let mut b = Bhs::new(op::SCSI_RESP);
    b.0[1] = 0x80 | res_flags;
    b.0[2] = 0x00; // Response: command completed at target
    b.0[3] = r.resp.status.0;
    b.set_u32(16, r.itt);
    // ExpDataSN: the R2T and Data-In PDUs sent for the command (RFC 7143 11.4.8).
    b.set_u32(36, datasn.wrapping_add(r.r2ts));
    b.set_u32(44, residual);
    let mut seg = Vec::new();
    if !r.resp.sense.is_empty() {
        // RFC 7143 11.4.7: SenseLength, then the sense data.
        let n = r
            .resp
            .sense
            .len()
            .min(usize::from(u16::MAX))
            .min(max_data.saturating_sub(2));
        seg.extend_from_slice(&(n as u16).to_be_bytes());
        seg.extend_from_slice(r.resp.sense.get(..n).unwrap_or_default());
    }
    stamp(&mut b, shared, statsn, Sn::Status);
    pdu::write_pdu(w, &mut b, &seg, framing).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader's clock in a test: each wait ends where the last one did plus the handling.
    struct Clock(std::time::Instant);

    impl Clock {
        fn new() -> Self {
            Clock(std::time::Instant::now())
        }

        /// The reader handled `pdus` PDUs in 10 µs, then waited `waited` for the next.
        fn wait(&mut self, p: &mut Pace, pdus: u32, waited: Duration) {
            let free = self.0 + Duration::from_micros(10);
            self.0 = free + waited;
            p.record(pdus, free, self.0);
        }
    }

    #[test]
    fn the_reader_watches_only_at_a_queue_depth_1_pace() {
        let mut p = Pace::default();
        let mut c = Clock::new();
        assert!(!p.worth_watching(true), "a new connection");
        // An initiator answering each response 40 µs later: after a while, worth it.
        for _ in 0..200 {
            c.wait(&mut p, 1, Duration::from_micros(40));
        }
        assert!(p.worth_watching(true));
        // The same gaps between bursts of several commands: a pipelining initiator.
        c.wait(&mut p, 5, Duration::from_micros(40));
        assert!(!p.worth_watching(true));
        for _ in 0..7 {
            c.wait(&mut p, 1, Duration::from_micros(40));
        }
        assert!(
            !p.worth_watching(true),
            "eight single commands in a row first"
        );
        c.wait(&mut p, 1, Duration::from_micros(40));
        assert!(p.worth_watching(true));
        // A fast stream (the next PDU 3 µs after the reader is free): not needed.
        for _ in 0..200 {
            c.wait(&mut p, 1, Duration::from_micros(3));
        }
        assert!(!p.worth_watching(true));
        // A few long waits in that stream do not start it.
        for _ in 0..3 {
            c.wait(&mut p, 1, Duration::from_micros(150));
        }
        assert!(!p.worth_watching(true));
        // An idle connection (seconds between commands): a watch would end empty.
        for _ in 0..200 {
            c.wait(&mut p, 1, Duration::from_secs(5));
        }
        assert!(!p.worth_watching(true));
    }

    /// A reader whose initiator has sent 200 single commands, each `us` after it was free.
    fn paced_at(us: u64) -> (Pace, Clock) {
        let mut p = Pace::default();
        let mut c = Clock::new();
        for _ in 0..200 {
            c.wait(&mut p, 1, Duration::from_micros(us));
        }
        (p, c)
    }

    /// Runs `epochs` epochs of a queue-depth-1 initiator whose next command comes `watched`
    /// after the reader is free when it watches and `slept` when it sleeps; returns how many
    /// of them the reader watched in.
    fn run_epochs(p: &mut Pace, c: &mut Clock, epochs: u32, watched: u64, slept: u64) -> u32 {
        let mut watching = 0;
        for _ in 0..epochs * EPOCH {
            let w = p.worth_watching(true);
            assert!(p.paced, "the pace allows watching throughout");
            watching += u32::from(w);
            c.wait(p, 1, Duration::from_micros(if w { watched } else { slept }));
        }
        watching / EPOCH
    }

    #[test]
    fn the_reader_keeps_the_faster_way_of_waiting() {
        let (mut p, mut c) = paced_at(60);
        // Watching is faster (an idle host): the reader watches in every epoch but the last
        // of each round, which tries sleeping; rounds of 8, 16, 32, then 64 epochs.
        let rounds = ROUND + 2 * ROUND + 4 * ROUND + 2 * LONGEST_ROUND;
        assert_eq!(run_epochs(&mut p, &mut c, rounds, 60, 150), rounds - 5);
        assert_eq!(p.trial.round_len(), LONGEST_ROUND);
        // Sleeping becomes faster (every CPU busy): by the end of the round, it sleeps, and
        // the next round is a short one.
        run_epochs(&mut p, &mut c, LONGEST_ROUND, 150, 60);
        assert!(p.trial.sleep);
        assert_eq!(
            run_epochs(&mut p, &mut c, ROUND, 150, 60),
            1,
            "tries watching once"
        );
        assert!(p.trial.sleep);
        assert_eq!(p.trial.round_len(), 2 * ROUND);
        // A difference of less than a tenth changes nothing.
        run_epochs(&mut p, &mut c, 2 * ROUND + 4 * ROUND, 60, 64);
        assert!(p.trial.sleep);
        // The host is idle again: it goes back to watching within a longest round.
        run_epochs(&mut p, &mut c, LONGEST_ROUND, 60, 150);
        assert!(!p.trial.sleep);
        // An initiator 200 µs behind a watching reader and 400 µs behind a sleeping one: the
        // trial's sleeping epochs do not close the gate (run_epochs checks it stays open),
        // and the reader keeps watching.
        run_epochs(&mut p, &mut c, 2 * LONGEST_ROUND, 200, 400);
        assert!(!p.trial.sleep);
        let total = rounds + 4 * LONGEST_ROUND + 7 * ROUND;
        assert_eq!(p.trial.epochs.iter().sum::<u64>(), u64::from(total));
        // A wait the reader could not watch (a command executing) is not timed.
        assert!(!p.worth_watching(false));
        c.wait(&mut p, 1, Duration::from_micros(60));
        assert_eq!(p.trial.commands, 0, "the epoch starts over");
    }

    #[test]
    fn a_few_slow_commands_do_not_decide() {
        let (mut p, mut c) = paced_at(60);
        // Watching is faster (70 µs against 160 µs), but one command in four of the watching
        // epochs is held up 600 µs (the initiator paused, or lost its CPU): their mean is
        // slower than sleeping's, their median is not.
        for i in 0..LONGEST_ROUND * EPOCH {
            let w = p.worth_watching(true);
            assert!(p.paced);
            let us = match (w, i % 4) {
                (true, 0) => 600,
                (true, _) => 70,
                (false, _) => 160,
            };
            c.wait(&mut p, 1, Duration::from_micros(us));
        }
        assert!(!p.trial.sleep, "still watching");
        assert_eq!(p.trial.epochs, [3, u64::from(LONGEST_ROUND - 3)]);
    }

    #[test]
    fn cmdsn_equal_to_exp_is_delivered() {
        assert_eq!(window(10, 10, 137), Window::Now);
    }

    #[test]
    fn cmdsn_ahead_inside_the_window_is_held() {
        assert_eq!(window(11, 10, 137), Window::Later);
        assert_eq!(window(137, 10, 137), Window::Later);
    }

    #[test]
    fn cmdsn_beyond_max_or_below_exp_is_dropped() {
        assert_eq!(window(138, 10, 137), Window::Drop); // MaxCmdSN + 1
        assert_eq!(window(9, 10, 137), Window::Drop); // ExpCmdSN - 1
    }

    #[test]
    fn window_wraps_with_serial_arithmetic() {
        assert_eq!(window(0xffff_fffe, 0xffff_fffe, 5), Window::Now);
        assert_eq!(window(3, 0xffff_fffe, 5), Window::Later);
        assert_eq!(window(6, 0xffff_fffe, 5), Window::Drop);
    }

    #[test]
    fn closed_window_drops_everything() {
        // MaxCmdSN = ExpCmdSN - 1: the window is empty (RFC 7143 3.2.2.1).
        assert_eq!(window(10, 10, 9), Window::Drop);
    }

    fn command_with_ahs(ahs: Vec<u8>) -> Pdu {
        let mut p = Pdu::default();
        p.bhs.0[0] = 0x01; // SCSI Command
        p.bhs.0[32] = 0x7f; // variable-length CDB opcode
        p.ahs = ahs;
        p
    }

    #[test]
    fn extended_cdb_ahs_extends_the_cdb_to_32_bytes() {
        // AHSLength 17 (reserved byte + 16 CDB bytes), AHSType 1 (Extended CDB), reserved,
        // then CDB bytes 16..31; 20 bytes in all, already a multiple of 4.
        let mut ahs = vec![0x00, 0x11, 0x01, 0x00];
        ahs.extend(16u8..32);
        let cdb = cdb_of(&command_with_ahs(ahs)).expect("valid AHS");
        assert_eq!(cdb.len(), 32);
        assert_eq!(cdb[0], 0x7f);
        assert_eq!(cdb[16], 16);
        assert_eq!(cdb[31], 31);
    }

    #[test]
    fn extended_cdb_beyond_32_bytes_is_refused() {
        let mut ahs = vec![0x00, 0x15, 0x01, 0x00]; // AHSLength 21: 20 CDB bytes
        ahs.extend([0u8; 20]);
        assert!(cdb_of(&command_with_ahs(ahs)).is_err());
    }

    #[test]
    fn ahs_length_beyond_the_segment_is_refused() {
        let ahs = vec![0x00, 0x40, 0x01, 0x00, 0, 0, 0, 0]; // claims 64 bytes, has 5
        assert!(cdb_of(&command_with_ahs(ahs)).is_err());
    }

    #[test]
    fn max_cmdsn_shrinks_with_outstanding_commands() {
        let s = Shared::new(100);
        assert_eq!(s.max(), 100 + QUEUE_DEPTH - 1);
        for _ in 0..3 {
            s.advance(true);
        }
        assert_eq!(s.exp(), 103);
        assert_eq!(s.max(), 103 + QUEUE_DEPTH - 4);
        s.uncount();
        assert_eq!(s.max(), 103 + QUEUE_DEPTH - 3);
    }

    #[test]
    fn max_cmdsn_never_moves_backwards_while_commands_are_admitted() {
        // Admitting a command advances ExpCmdSN and counts it in one step: MaxCmdSN stays put.
        let s = Shared::new(0xffff_fffe);
        let before = s.max();
        s.advance(true);
        s.advance(true);
        assert_eq!(s.exp(), 0); // wrapped modulo 2^32
        assert_eq!(s.max(), before);
    }

    /// A reader for a normal session on a server with one 16 MiB LU, as a login with these
    /// operational parameters leaves it; the test holds the writer's queue.
    fn conn(params: Params) -> (Conn, mpsc::UnboundedReceiver<Out>) {
        let driver = block::driver::mem::MemDriver::new(16 << 20);
        let backend = block::Backend::new(Arc::new(driver), 512).expect("512-byte blocks");
        let lu = scsi::LogicalUnit::new(
            backend,
            scsi::LuConfig {
                vendor: "SHAREDSK".into(),
                product: "memdisk".into(),
                revision: "0001".into(),
                serial: "1".into(),
                id: 1,
            },
        );
        let mut t = scsi::Target::new();
        t.add_lu(0, Arc::new(lu));
        let server = Server::new(crate::ServerConfig {
            targets: vec![crate::TargetConfig {
                name: "iqn.2026-01.io.sharedisk:unit".into(),
                alias: None,
                scsi: Arc::new(t),
                allowed_initiators: None,
                auth: crate::Auth::default(),
                tpgt: 1,
            }],
            discovery_auth: crate::Auth::default(),
            portals: Vec::new(),
        });
        let nexus = Arc::new(ItNexus {
            initiator: scsi::InitiatorPort {
                transport: scsi::Transport::Iscsi,
                name: "iqn.2026-01.test:unit".into(),
                isid: Some([0x80, 0, 0, 0, 0, 1]),
            },
            target: scsi::TargetPort {
                name: "iqn.2026-01.io.sharedisk:unit".into(),
                tpgt: 1,
                relative_id: 1,
            },
        });
        let est = Established {
            kind: Kind::Normal(0),
            initiator_name: "iqn.2026-01.test:unit".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 1,
            params,
            exp_cmdsn: 1,
            next_statsn: 1,
            cid: 0,
        };
        let local = "127.0.0.1:3260".parse().expect("address");
        Conn::new(server, &est, Some(nexus), local)
    }

    /// Negotiated as an initiator offering InitialR2T=No and ImmediateData=Yes would.
    fn unsolicited_params() -> Params {
        Params {
            initial_r2t: false,
            immediate_data: true,
            first_burst: 65_536,
            max_burst: 262_144,
            ..Params::default()
        }
    }

    /// A WRITE(10) SCSI Command PDU (RFC 7143 11.3) for `blocks` 512-byte blocks at LBA 0,
    /// F=0 (unsolicited Data-Out would follow), with `data` as immediate data.
    fn write_cmd(immediate: bool, itt: u32, cmdsn: u32, blocks: u16, data: &[u8]) -> Pdu {
        let mut b = Bhs::default();
        b.0[0] = if immediate { 0x41 } else { 0x01 }; // I bit, opcode SCSI Command
        b.0[1] = 0x21; // F=0 R=0 W=1, ATTR simple
        b.0[16..20].copy_from_slice(&itt.to_be_bytes()); // ITT
        let edtl = u32::from(blocks) * 512;
        b.0[20..24].copy_from_slice(&edtl.to_be_bytes()); // EDTL
        b.0[24..28].copy_from_slice(&cmdsn.to_be_bytes()); // CmdSN
        b.0[32] = 0x2a; // WRITE(10)
        b.0[39..41].copy_from_slice(&blocks.to_be_bytes()); // TRANSFER LENGTH
        Pdu {
            bhs: b,
            ahs: Vec::new(),
            data: data.to_vec(),
            data_digest_bad: false,
        }
    }

    fn outs(rx: &mut mpsc::UnboundedReceiver<Out>) -> Vec<Out> {
        let mut v = Vec::new();
        while let Ok(o) = rx.try_recv() {
            v.push(o);
        }
        v
    }

    /// Bytes held by the buffers of commands collecting data.
    fn buffered(c: &Conn) -> usize {
        c.tasks.values().map(|t| t.buf.capacity()).sum()
    }

    #[tokio::test]
    async fn immediate_writes_waiting_for_data_are_limited_and_hold_no_buffer() {
        let (mut c, mut rx) = conn(unsolicited_params());
        // 3000 immediate WRITE(10)s of 1 MiB that announce unsolicited data and send none.
        for itt in 0..3000u32 {
            c.handle(write_cmd(true, itt, 1, 2048, &[])).await.ok();
        }
        let outs = outs(&mut rx);
        let rejects = outs
            .iter()
            .filter(|o| {
                matches!(o, Out::Pdu { bhs, data, .. }
                if bhs.opcode() == 0x3f // Reject
                    && bhs.0[2] == 0x06 // Immediate command reject: too many
                    && data.len() == 48)
            })
            .count();
        assert_eq!(
            rejects,
            3000 - 16,
            "all beyond the 16 admitted are rejected"
        );
        assert_eq!(outs.len(), rejects, "nothing else is sent");
        assert_eq!(c.tasks.len(), 16);
        assert_eq!(buffered(&c), 0, "no data arrived, so no buffer is held");
    }

    #[tokio::test]
    async fn non_immediate_writes_waiting_for_data_stay_inside_the_window() {
        let (mut c, mut rx) = conn(unsolicited_params());
        for i in 0..3000u32 {
            c.handle(write_cmd(false, i, 1 + i, 2048, &[0xa5; 512]))
                .await
                .ok();
        }
        // Beyond MaxCmdSN they are ignored (RFC 7143 3.2.2.1), not buffered.
        assert!(outs(&mut rx).is_empty());
        assert_eq!(c.tasks.len(), QUEUE_DEPTH as usize);
        assert!(c.held.is_empty());
        let budget = QUEUE_DEPTH as usize * 512;
        assert!(
            buffered(&c) <= budget,
            "{} bytes buffered for {budget} bytes received",
            buffered(&c)
        );
        assert_eq!(
            c.shared.max(),
            c.shared.exp().wrapping_sub(1),
            "window closed"
        );
    }

    /// An ABORT TASK (RFC 7143 11.5) for `rtt`, immediate.
    fn abort_task(itt: u32, rtt: u32, cmdsn: u32, refcmdsn: u32) -> Pdu {
        let mut b = Bhs::default();
        b.0[0] = 0x42; // I=1, Task Management Function Request
        b.0[1] = 0x81; // F=1, function 1: ABORT TASK
        b.0[16..20].copy_from_slice(&itt.to_be_bytes()); // ITT
        b.0[20..24].copy_from_slice(&rtt.to_be_bytes()); // Referenced Task Tag
        b.0[24..28].copy_from_slice(&cmdsn.to_be_bytes()); // CmdSN
        b.0[32..36].copy_from_slice(&refcmdsn.to_be_bytes()); // RefCmdSN
        Pdu {
            bhs: b,
            ..Pdu::default()
        }
    }

    #[tokio::test]
    async fn aborting_an_immediate_write_frees_its_slot() {
        let (mut c, mut rx) = conn(unsolicited_params());
        for itt in 0..16u32 {
            c.handle(write_cmd(true, itt, 1, 8, &[])).await.ok();
        }
        c.handle(abort_task(1000, 3, 1, 1)).await.ok();
        let sent = outs(&mut rx);
        assert!(
            matches!(&sent[..], [Out::Pdu { bhs, .. }] if bhs.opcode() == 0x22 && bhs.0[2] == 0),
            "Function complete: {sent:?}"
        );
        c.handle(write_cmd(true, 16, 1, 8, &[])).await.ok();
        assert!(outs(&mut rx).is_empty(), "admitted, not rejected");
        assert_eq!(c.tasks.len(), 16);
    }

    fn tmf_responses(outs: &[Out]) -> Vec<u8> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Pdu { bhs, .. } if bhs.opcode() == 0x22 => Some(bhs.0[2]),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn abort_task_outside_the_window_does_not_exist_and_settles_nothing() {
        let (mut c, mut rx) = conn(unsolicited_params());
        // ExpCmdSN is 1, MaxCmdSN 128. RefCmdSNs beyond MaxCmdSN, behind ExpCmdSN, and inside
        // the window but not before the TMF's own CmdSN; TMF CmdSNs anywhere.
        let cases = [(129, 0x4000_0000), (0, 5), (0xffff_0000, 2), (5, 5), (5, 3)];
        for (i, (refsn, cmdsn)) in cases.into_iter().enumerate() {
            c.handle(abort_task(500 + i as u32, 77, cmdsn, refsn))
                .await
                .ok();
        }
        for i in 0..10_000u32 {
            c.handle(abort_task(
                1000 + i,
                77,
                0x7fff_0000,
                i.wrapping_mul(40_000),
            ))
            .await
            .ok();
        }
        let codes = tmf_responses(&outs(&mut rx));
        assert_eq!(codes.len(), 10_005);
        // Response 1: Task does not exist (RFC 7143 11.6.1).
        assert!(codes.iter().all(|&r| r == 1), "{codes:?}");
        assert!(c.held.is_empty(), "no CmdSN was settled");
    }

    #[tokio::test]
    async fn abort_task_for_another_lun_leaves_a_held_command_alone() {
        let (mut c, mut rx) = conn(unsolicited_params());
        // WRITE for LUN 0 with CmdSN 3 while ExpCmdSN is 1: held.
        c.handle(write_cmd(false, 7, 3, 1, &[0; 512])).await.ok();
        assert!(matches!(c.held.get(&3), Some(Held::Pdu(..))));
        // ABORT TASK of ITT 7 on LUN 1 (SAM-5 7.2: a task is its LUN and tag): no such task.
        let mut t = abort_task(700, 7, 4, 3);
        t.bhs.0[8..16].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        c.handle(t).await.ok();
        assert_eq!(
            tmf_responses(&outs(&mut rx)),
            vec![1],
            "Task does not exist"
        );
        assert!(matches!(c.held.get(&3), Some(Held::Pdu(..))), "still held");
    }

    /// A WRITE(10) of `blocks` 512-byte blocks at LBA 0, non-immediate, with task attribute
    /// `attr` (RFC 7143 11.3.1.1: 1 SIMPLE, 2 ORDERED) and no immediate data; `last` sets F
    /// (no unsolicited Data-Out follows).
    fn write_attr(itt: u32, cmdsn: u32, blocks: u16, attr: u8, last: bool) -> Pdu {
        let mut p = write_cmd(false, itt, cmdsn, blocks, &[]);
        p.bhs.0[1] = if last { 0x80 } else { 0 } | 0x20 | attr; // F, W=1, ATTR
        p
    }

    /// The R2Ts sent (RFC 7143 11.8): (ITT, TTT, Buffer Offset, Desired Data Transfer Length).
    fn r2ts(outs: &[Out]) -> Vec<(u32, u32, u32, u32)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Pdu { bhs, .. } if bhs.opcode() == 0x31 => Some((
                    bhs.u32_at(16),
                    bhs.u32_at(20),
                    bhs.u32_at(40),
                    bhs.u32_at(44),
                )),
                _ => None,
            })
            .collect()
    }

    /// A Data-Out (RFC 7143 11.7) with F=1 and DataSN 0 carrying `len` bytes at `offset`.
    fn data_out_pdu(itt: u32, ttt: u32, offset: u32, len: u32) -> Pdu {
        let mut b = Bhs::default();
        b.0[0] = 0x05; // Data-Out
        b.0[1] = 0x80; // F=1
        b.0[16..20].copy_from_slice(&itt.to_be_bytes());
        b.0[20..24].copy_from_slice(&ttt.to_be_bytes());
        b.0[40..44].copy_from_slice(&offset.to_be_bytes());
        Pdu {
            bhs: b,
            ahs: Vec::new(),
            data: vec![0x5a; len as usize],
            data_digest_bad: false,
        }
    }

    /// A TEST UNIT READY (CDB all zero, F=1, no data), non-immediate.
    fn tur_cmd(itt: u32, cmdsn: u32) -> Pdu {
        let mut tur = write_cmd(false, itt, cmdsn, 0, &[]);
        tur.bhs.0[1] = 0x81;
        tur.bhs.0[32..48].fill(0);
        tur
    }

    /// CmdSN 1, a TEST UNIT READY, takes the new nexus's unit attention (CHECK CONDITION).
    async fn take_unit_attention(c: &mut Conn, rx: &mut mpsc::UnboundedReceiver<Out>) {
        c.handle(tur_cmd(99, 1)).await.ok();
        assert_eq!(answered(&outs(rx)), vec![(99, 2)], "the unit attention");
    }

    /// Another initiator's nexus through the same target port.
    fn other_nexus() -> Arc<ItNexus> {
        Arc::new(ItNexus {
            initiator: scsi::InitiatorPort {
                transport: scsi::Transport::Iscsi,
                name: "iqn.2026-01.test:other".into(),
                isid: Some([0x80, 0, 0, 0, 0, 2]),
            },
            target: scsi::TargetPort {
                name: "iqn.2026-01.io.sharedisk:unit".into(),
                tpgt: 1,
                relative_id: 1,
            },
        })
    }

    /// The one SCSI Response queued: its ITT, status, and the sense key, ASC and ASCQ of its
    /// fixed format sense data (bytes 2, 12 and 13; zeros without sense).
    fn the_result(outs: &[Out]) -> (u32, u8, (u8, u8, u8)) {
        let r: Vec<&ScsiResult> = outs
            .iter()
            .filter_map(|o| match o {
                Out::Result(r) => Some(&**r),
                _ => None,
            })
            .collect();
        assert_eq!(r.len(), 1, "one SCSI Response");
        let s = |i: usize| r[0].resp.sense.get(i).copied().unwrap_or(0);
        (r[0].itt, r[0].resp.status.0, (s(2) & 0x0f, s(12), s(13)))
    }

    /// The ITTs of the SCSI Responses queued, with their status.
    fn answered(outs: &[Out]) -> Vec<(u32, u8)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Result(r) => Some((r.itt, r.resp.status.0)),
                _ => None,
            })
            .collect()
    }

    /// 8 MiB of 512-byte blocks: the largest write the test LU takes (Block Limits VPD).
    const BIG: u16 = 16384;
    /// How many [`BIG`] writes fill [`MAX_SOLICITED`].
    const FILL: u32 = (MAX_SOLICITED / (8 << 20)) as u32;

    /// A reader whose writes get one R2T each ([`BIG`] at most), past its unit attention.
    async fn big_burst_conn() -> (Conn, mpsc::UnboundedReceiver<Out>) {
        let mut params = unsolicited_params();
        params.max_burst = 8 << 20;
        let (mut c, mut rx) = conn(params);
        take_unit_attention(&mut c, &mut rx).await;
        (c, rx)
    }

    /// [`FILL`] SIMPLE writes of [`BIG`], ITT 0 up and CmdSN `cmdsn` up, each sent its R2T
    /// (returned) and none its data yet: together they hold the whole budget.
    async fn solicit_budget(
        c: &mut Conn,
        rx: &mut mpsc::UnboundedReceiver<Out>,
        cmdsn: u32,
    ) -> Vec<(u32, u32, u32, u32)> {
        let mut all = Vec::new();
        for i in 0..FILL {
            c.handle(write_attr(i, cmdsn + i, BIG, 1, true)).await.ok();
            let r = r2ts(&outs(rx));
            assert_eq!(r.len(), 1, "write {i}: {r:?}");
            let (itt, _, offset, len) = r[0];
            assert_eq!((itt, offset, len), (i, 0, 8 << 20));
            all.extend(r);
        }
        all
    }

    /// [`solicit_budget`], then all the writes' data.
    async fn fill_budget(c: &mut Conn, rx: &mut mpsc::UnboundedReceiver<Out>, cmdsn: u32) {
        for (itt, ttt, offset, len) in solicit_budget(c, rx, cmdsn).await {
            c.handle(data_out_pdu(itt, ttt, offset, len)).await.ok();
        }
    }

    /// Another nexus's ORDERED command, arrived at LUN 0 and not finished while the result
    /// lives: SIMPLE commands that arrive after it wait for it (SAM-5 8.6.3).
    fn ordered_from_another_nexus(c: &Conn) -> scsi::Arrival {
        let target = c.target.clone().expect("normal session");
        target
            .arrive(&other_nexus(), 0, None, TaskAttr::Ordered)
            .expect("LUN 0")
    }

    #[tokio::test]
    async fn a_write_holds_its_budget_until_answered_and_the_oldest_still_gets_its_r2t() {
        let (mut c, mut rx) = big_burst_conn().await;
        // An ORDERED write that sends its unsolicited first burst later: no R2T yet.
        c.handle(write_attr(100, 2, BIG, 2, false)).await.ok();
        assert!(r2ts(&outs(&mut rx)).is_empty());
        // SIMPLE writes that fill the budget, whose data all arrives: they wait for their
        // turn behind the ORDERED one, holding their buffers.
        fill_budget(&mut c, &mut rx, 3).await;
        tokio::task::yield_now().await;
        assert!(
            answered(&outs(&mut rx)).is_empty(),
            "behind the ORDERED write"
        );
        // Two more writes: no R2T while the waiting writes hold the budget.
        c.handle(write_attr(50, 3 + FILL, 1, 1, true)).await.ok();
        c.handle(write_attr(51, 4 + FILL, 1, 1, true)).await.ok();
        assert!(r2ts(&outs(&mut rx)).is_empty(), "over budget");
        // The ORDERED write's first burst (FirstBurstLength 64 KiB, unsolicited, TTT
        // FFFFFFFFh): it is the oldest still collecting, so it gets its R2T over the budget;
        // the writes holding it wait for it.
        c.handle(data_out_pdu(100, 0xffff_ffff, 0, 65_536))
            .await
            .ok();
        let r = r2ts(&outs(&mut rx));
        assert_eq!(r.len(), 1, "{r:?}");
        let (itt, ttt, offset, len) = r[0];
        assert_eq!((itt, offset, len), (100, 65_536, (8 << 20) - 65_536));
        c.handle(data_out_pdu(100, ttt, offset, len)).await.ok();
        // Once the ORDERED write has its data and is answered, writes 50 and 51 still wait:
        // older writes hold the budget. They are answered GOOD, their budget comes back and
        // the reader is told, which sends both their R2Ts.
        let mut done = Vec::new();
        while done.len() < FILL as usize + 1 {
            let o = outs(&mut rx);
            done.extend(answered(&o));
            assert!(r2ts(&o).is_empty(), "{:?}", r2ts(&o));
            if done.len() == FILL as usize + 1 {
                break;
            }
            tokio::time::timeout(Duration::from_secs(10), c.shared.budget_freed.notified())
                .await
                .expect("an answered write gives its budget back");
            tokio::task::yield_now().await;
        }
        assert!(done.iter().all(|&(_, status)| status == 0), "{done:?}");
        c.pump_r2t();
        let r = r2ts(&outs(&mut rx));
        assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![50, 51]);
        assert_eq!(c.shared.solicited.load(Ordering::Acquire), 1024);
    }

    /// Writes that have their data and wait (here behind another nexus's ORDERED command)
    /// keep their budget, and a younger write is not let over it: only a write older than
    /// every holder may be, or each would get its R2T in turn and the budget would bound
    /// nothing.
    #[tokio::test]
    async fn a_younger_write_is_not_let_over_the_budget_that_waiting_writes_hold() {
        let (mut c, mut rx) = big_burst_conn().await;
        // Another nexus's ORDERED command has arrived and not finished.
        let blocker = ordered_from_another_nexus(&c);
        fill_budget(&mut c, &mut rx, 2).await;
        tokio::task::yield_now().await;
        assert!(answered(&outs(&mut rx)).is_empty(), "they wait");
        // The only write still collecting, but younger than those holding the budget.
        c.handle(write_attr(50, 2 + FILL, 1, 1, true)).await.ok();
        assert!(r2ts(&outs(&mut rx)).is_empty(), "not let over the budget");
        // The ORDERED command ends: the writes run, give their budget back, and the
        // waiting write gets its R2T.
        drop(blocker);
        let mut done = Vec::new();
        while done.len() < FILL as usize {
            tokio::time::timeout(Duration::from_secs(10), c.shared.budget_freed.notified())
                .await
                .expect("an answered write gives its budget back");
            tokio::task::yield_now().await;
            done.extend(answered(&outs(&mut rx)));
        }
        c.pump_r2t();
        let r = r2ts(&outs(&mut rx));
        assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![50]);
    }

    /// The write that may go over the budget is tried first by the R2T pump, whatever order
    /// the waiting writes' sequences ended in: otherwise a younger write that does not fit
    /// would stop the pump before it, and the writes holding the budget would wait for it
    /// for ever.
    #[tokio::test]
    async fn the_oldest_waiting_write_gets_its_r2t_first() {
        let (mut c, mut rx) = big_burst_conn().await;
        let _blocker = ordered_from_another_nexus(&c);
        // X and A wait for their unsolicited first bursts (F=0).
        c.handle(write_attr(10, 2, 1, 1, false)).await.ok();
        c.handle(write_attr(11, 3, BIG, 1, false)).await.ok();
        // Younger writes fill the budget and wait behind the other nexus's ORDERED command.
        fill_budget(&mut c, &mut rx, 4).await;
        // B waits for budget; then A's first burst ends while X is older: A waits behind B.
        c.handle(write_attr(50, 4 + FILL, 1, 1, true)).await.ok();
        c.handle(data_out_pdu(11, 0xffff_ffff, 0, 65_536))
            .await
            .ok();
        assert!(r2ts(&outs(&mut rx)).is_empty());
        let mut waiting: Vec<u32> = c.r2t_wait.iter().copied().collect();
        waiting.sort_unstable();
        assert_eq!(waiting, [11, 50]);
        // X's data comes: A is now older than every holder and every write collecting.
        c.handle(data_out_pdu(10, 0xffff_ffff, 0, 512)).await.ok();
        let r = r2ts(&outs(&mut rx));
        assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![11], "{r:?}");
    }

    /// A HEAD OF QUEUE write holds back every SIMPLE and ORDERED command from the moment
    /// it arrives (SAM-5 8.6.3), the writes holding the budget included: it gets its R2T
    /// over the budget, or they would wait for it while it waits for them.
    #[tokio::test]
    async fn a_head_of_queue_write_gets_its_r2t_over_the_budget() {
        let (mut c, mut rx) = big_burst_conn().await;
        // The budget's writes have their R2Ts, not yet their data.
        let r2t = solicit_budget(&mut c, &mut rx, 2).await;
        // HEAD OF QUEUE (task attribute 3), one block, all solicited.
        c.handle(write_attr(70, 2 + FILL, 1, 3, true)).await.ok();
        let z = r2ts(&outs(&mut rx));
        assert_eq!(z.iter().map(|r| r.0).collect::<Vec<_>>(), vec![70], "{z:?}");
        // Everyone's data: all run, the HEAD OF QUEUE write first, and all are GOOD.
        for (itt, ttt, offset, len) in r2t.into_iter().chain(z) {
            c.handle(data_out_pdu(itt, ttt, offset, len)).await.ok();
        }
        let mut done = Vec::new();
        for _ in 0..1000 {
            done.extend(answered(&outs(&mut rx)));
            if done.len() == FILL as usize + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(done.len(), FILL as usize + 1, "{done:?}");
        assert!(done.iter().all(|&(_, status)| status == 0), "{done:?}");
    }

    /// A second HEAD OF QUEUE write waits while the first holds budget, and is tried when
    /// that one is answered even though an older SIMPLE write waiting before it still does not
    /// fit: the writes holding the budget wait for it.
    #[tokio::test]
    async fn a_second_head_of_queue_write_gets_its_r2t_once_the_first_is_answered() {
        let (mut c, mut rx) = big_burst_conn().await;
        let r2t = solicit_budget(&mut c, &mut rx, 2).await;
        // A SIMPLE write that waits for budget, then two HEAD OF QUEUE writes: the first
        // goes over the budget, the second waits.
        c.handle(write_attr(60, 2 + FILL, 1, 1, true)).await.ok();
        c.handle(write_attr(70, 3 + FILL, 1, 3, true)).await.ok();
        c.handle(write_attr(71, 4 + FILL, 1, 3, true)).await.ok();
        let h0 = r2ts(&outs(&mut rx));
        assert_eq!(
            h0.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![70],
            "{h0:?}"
        );
        // The budget's writes get their data and wait for the HEAD OF QUEUE writes.
        for (itt, ttt, offset, len) in r2t {
            c.handle(data_out_pdu(itt, ttt, offset, len)).await.ok();
        }
        let (itt, ttt, offset, len) = h0[0];
        c.handle(data_out_pdu(itt, ttt, offset, len)).await.ok();
        tokio::task::yield_now().await;
        // Its budget came back (the reader pumps after each PDU, and when told): the pump
        // reaches the second past the SIMPLE one.
        c.pump_r2t();
        let o = outs(&mut rx);
        assert_eq!(answered(&o), vec![(70, 0)]);
        let h1 = r2ts(&o);
        assert_eq!(
            h1.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![71],
            "{h1:?}"
        );
    }

    /// The Rejects sent (RFC 7143 11.17): (reason, ITT of the rejected header).
    fn rejects(outs: &[Out]) -> Vec<(u8, u32)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Pdu { bhs, data, .. } if bhs.opcode() == 0x3f => {
                    Some((bhs.0[2], u32::from_be_bytes(data[16..20].try_into().ok()?)))
                }
                _ => None,
            })
            .collect()
    }

    /// RFC 7143 11.17.1: immediate data that fails its data digest is rejected (reason 02h,
    /// data digest error) and the task ends with a CRC error status (11.4.7.2: CHECK
    /// CONDITION, ABORTED COMMAND 0Bh, PROTOCOL SERVICE CRC ERROR 47h/05h) once the data
    /// still to come is in. The command was received: its CmdSN is used up, and the commands
    /// after it run.
    #[tokio::test]
    async fn a_write_whose_immediate_data_fails_its_digest_ends_with_a_crc_error() {
        let (mut c, mut rx) = conn(unsolicited_params());
        // F=0, 2 blocks, one of them immediate: one block of unsolicited data follows.
        let mut w = write_cmd(false, 7, 1, 2, &[0xa5; 512]);
        w.data_digest_bad = true;
        c.handle(w).await.ok();
        let o = outs(&mut rx);
        assert_eq!(rejects(&o), vec![(0x02, 7)]);
        assert!(
            answered(&o).is_empty(),
            "not before the unsolicited data is in"
        );
        c.handle(data_out_pdu(7, 0xffff_ffff, 512, 512)).await.ok();
        // CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR.
        assert_eq!(the_result(&outs(&mut rx)), (7, 0x02, (0x0b, 0x47, 0x05)));
        assert!(c.tasks.is_empty());
        // CmdSN 2, F=1, all immediate with a bad digest: ended at once.
        let mut w = write_cmd(false, 8, 2, 1, &[0xa5; 512]);
        w.bhs.0[1] |= 0x80;
        w.data_digest_bad = true;
        c.handle(w).await.ok();
        let o = outs(&mut rx);
        assert_eq!(rejects(&o), vec![(0x02, 8)]);
        assert_eq!(answered(&o), vec![(8, 0x02)]);
        // CmdSN 3 is not held behind a gap: it runs (and takes the unit attention).
        c.handle(tur_cmd(9, 3)).await.ok();
        assert_eq!(answered(&outs(&mut rx)), vec![(9, 0x02)]);
        assert!(c.held.is_empty());
        assert_eq!(c.shared.exp(), 4);
    }

    /// A write the transport will not buffer (EDTL beyond MAX_WRITE) is refused, but not
    /// before the unsolicited data still expected is in (RFC 7143 11.4); that data is
    /// discarded as it arrives.
    #[tokio::test]
    async fn a_write_beyond_max_write_is_answered_after_its_unsolicited_data() {
        let (mut c, mut rx) = conn(unsolicited_params());
        let mut w = write_cmd(false, 7, 1, 1, &[0xa5; 512]);
        w.bhs.0[20..24].copy_from_slice(&(MAX_WRITE + 512).to_be_bytes()); // EDTL
        c.handle(w).await.ok();
        assert!(
            answered(&outs(&mut rx)).is_empty(),
            "unsolicited data follows"
        );
        c.handle(data_out_pdu(7, 0xffff_ffff, 512, 4096)).await.ok();
        // Answered at the Data-Out with the F bit set: CHECK CONDITION, ILLEGAL REQUEST,
        // INVALID FIELD IN CDB (24h/00h).
        assert_eq!(the_result(&outs(&mut rx)), (7, 0x02, (0x05, 0x24, 0x00)));
        assert!(c.tasks.is_empty());
        assert_eq!(buffered(&c), 0);
    }

    /// A Data-Out that fails its task and reaches the end of its sequence ends the data
    /// expected even without the F bit: the task is answered at once.
    #[tokio::test]
    async fn a_failing_data_out_that_ends_its_sequence_is_answered_at_once() {
        let (mut c, mut rx) = conn(unsolicited_params());
        take_unit_attention(&mut c, &mut rx).await;
        // 2 blocks, no immediate data: 1024 bytes of unsolicited data follow.
        c.handle(write_cmd(false, 7, 2, 2, &[])).await.ok();
        let mut d = data_out_pdu(7, 0xffff_ffff, 0, 1024);
        d.bhs.0[1] = 0; // F=0
        d.bhs.0[36..40].copy_from_slice(&3u32.to_be_bytes()); // DataSN 3, expected 0
        c.handle(d).await.ok();
        assert_eq!(answered(&outs(&mut rx)), vec![(7, 0x02)]);
        assert!(c.tasks.is_empty());
    }

    /// A write that failed and waits for the rest of its data, then is ended by another
    /// nexus's task management: it ends as the tasks that function ends do, with no status,
    /// its window place reopened.
    #[tokio::test]
    async fn a_failed_write_that_another_nexus_ends_is_answered_with_no_status() {
        let (mut c, mut rx) = conn(unsolicited_params());
        take_unit_attention(&mut c, &mut rx).await;
        // 3 blocks, no immediate data; the first Data-Out has DataSN 3 (expected 0), F=0.
        c.handle(write_cmd(false, 7, 2, 3, &[])).await.ok();
        let mut d = data_out_pdu(7, 0xffff_ffff, 0, 512);
        d.bhs.0[1] = 0;
        d.bhs.0[36..40].copy_from_slice(&3u32.to_be_bytes());
        c.handle(d).await.ok();
        assert!(answered(&outs(&mut rx)).is_empty(), "data still expected");
        let target = c.target.clone().expect("normal session");
        let r = target
            .task_management(&other_nexus(), Tmf::LogicalUnitReset { lun: 0 })
            .await;
        assert_eq!(r, TmfResponse::FunctionComplete);
        let max = c.shared.max();
        c.handle(data_out_pdu(7, 0xffff_ffff, 512, 1024)).await.ok();
        tokio::task::yield_now().await;
        let o = outs(&mut rx);
        assert!(answered(&o).is_empty(), "no status for an ended task");
        assert!(c.tasks.is_empty());
        assert_eq!(c.shared.max(), max.wrapping_add(1), "its place reopened");
    }

    /// The same for a NOP-Out that takes a CmdSN (I=0): rejected, its CmdSN used up, no
    /// NOP-In.
    #[tokio::test]
    async fn a_nop_out_whose_data_fails_its_digest_uses_up_its_cmdsn() {
        let (mut c, mut rx) = conn(unsolicited_params());
        let mut b = Bhs::default();
        b.0[0] = 0x00; // NOP-Out, I=0
        b.0[1] = 0x80;
        b.0[16..20].copy_from_slice(&5u32.to_be_bytes()); // ITT
        b.0[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes()); // TTT
        b.0[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        let nop = Pdu {
            bhs: b,
            ahs: Vec::new(),
            data: vec![1, 2, 3, 4],
            data_digest_bad: true,
        };
        c.handle(nop).await.ok();
        let o = outs(&mut rx);
        assert_eq!(rejects(&o), vec![(0x02, 5)]);
        assert_eq!(o.len(), 1, "no NOP-In");
        assert_eq!(c.shared.exp(), 2);
        assert!(c.held.is_empty());
    }

    /// RFC 7143 11.4.11: "When MaxCmdSN changes at the target while the target has no
    /// pending PDUs to convey this information to the initiator, it MUST generate a NOP-In
    /// to carry the new MaxCmdSN." A command another nexus's LOGICAL UNIT RESET ends gets no
    /// response, so its window slot reopens with a NOP-In (11.19.1: ITT and TTT FFFFFFFFh).
    #[tokio::test]
    async fn a_window_slot_reopened_by_another_nexus_s_reset_is_told_with_a_nop_in() {
        let (mut c, mut rx) = conn(unsolicited_params());
        take_unit_attention(&mut c, &mut rx).await;
        // An ORDERED write still waiting for its unsolicited data, and two TEST UNIT READYs
        // behind it.
        c.handle(write_attr(100, 2, 1, 2, false)).await.ok();
        c.handle(tur_cmd(5, 3)).await.ok();
        c.handle(tur_cmd(6, 4)).await.ok();
        tokio::task::yield_now().await;
        assert!(outs(&mut rx).is_empty(), "the TEST UNIT READYs wait");
        let max = c.shared.max();
        let other = other_nexus();
        let target = c.target.clone().expect("normal session");
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            target.task_management(&other, Tmf::LogicalUnitReset { lun: 0 }),
        )
        .await
        .expect("the reset ends");
        assert_eq!(r, TmfResponse::FunctionComplete);
        tokio::task::yield_now().await;
        let o = outs(&mut rx);
        assert!(
            answered(&o).is_empty(),
            "no response for the aborted command"
        );
        let nops: Vec<_> = o
            .iter()
            .filter_map(|o| match o {
                Out::Pdu { bhs, sn, .. } if bhs.opcode() == 0x20 => {
                    Some((bhs.u32_at(16), bhs.u32_at(20), *sn))
                }
                _ => None,
            })
            .collect();
        // One NOP-In for both (the writer, not running here, stamps the MaxCmdSN current
        // when it writes it).
        assert_eq!(nops, vec![(0xffff_ffff, 0xffff_ffff, Sn::Peek)]);
        assert_eq!(c.shared.max(), max.wrapping_add(2), "the places reopened");
    }

    #[tokio::test]
    async fn abort_task_of_a_command_not_yet_received_settles_its_cmdsn() {
        let (mut c, mut rx) = conn(unsolicited_params());
        // RefCmdSN 3 inside [1, 128] and before the TMF's CmdSN 4.
        c.handle(abort_task(600, 77, 4, 3)).await.ok();
        assert_eq!(tmf_responses(&outs(&mut rx)), vec![0], "Function complete");
        assert!(matches!(c.held.get(&3), Some(Held::Skip)));
        // Asking again for the same CmdSN finds it settled already: nothing more is held.
        c.handle(abort_task(601, 78, 4, 3)).await.ok();
        assert_eq!(
            tmf_responses(&outs(&mut rx)),
            vec![1],
            "Task does not exist"
        );
        assert_eq!(c.held.len(), 1);
    }

    #[tokio::test]
    async fn a_write_buffer_grows_only_when_its_data_arrives() {
        let (mut c, mut rx) = conn(unsolicited_params());
        c.handle(write_cmd(false, 7, 1, 2048, &[])).await.ok();
        assert_eq!(buffered(&c), 0, "1 MiB announced, nothing arrived");
        // Data-Out (RFC 7143 11.7): unsolicited (TTT 0xffffffff), DataSN 0, offset 0, F=0.
        let mut b = Bhs::default();
        b.0[0] = 0x05; // Data-Out
        b.0[16..20].copy_from_slice(&7u32.to_be_bytes()); // ITT
        b.0[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes()); // TTT
        let pdu = Pdu {
            bhs: b,
            data: vec![0x5a; 512],
            ..Pdu::default()
        };
        c.handle(pdu).await.ok();
        assert!(outs(&mut rx).is_empty());
        // Room for the unsolicited sequence (FirstBurstLength), not the whole write.
        assert_eq!(buffered(&c), 65_536);
    }

    /// Poll `f` once, as the runtime would, without a waker.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn the_reader_does_not_wait_for_a_writer_that_has_ended() {
        use std::os::fd::AsRawFd;
        let shared = Arc::new(Shared::new(0));
        let queued = Backlog::default();
        queued.add(0); // queued for the writer, never taken
        let (watched, _peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let fd = watched.as_raw_fd();

        // While the writer lives, the reader waits for its word.
        let ended = WriterEnded(shared.clone());
        let wait = busy_poll(fd, &queued, &shared);
        tokio::pin!(wait);
        assert!(poll_once(wait.as_mut()).is_pending());
        // It ends (a write failed, or its task was dropped): the reader goes on.
        drop(ended);
        assert!(poll_once(wait.as_mut()).is_ready());

        // A writer that ended before the reader looks is not waited for either.
        let late = busy_poll(fd, &queued, &shared);
        tokio::pin!(late);
        assert!(poll_once(late.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn the_reader_does_not_wait_for_a_writer_the_initiator_does_not_read() {
        use std::os::fd::AsRawFd;
        let shared = Arc::new(Shared::new(0));
        let queued = Arc::new(Backlog::default());
        // The initiator's end of the connection, never read: 64 MiB of responses fill it.
        let (ours, _initiator) = tokio::net::UnixStream::pair().expect("socket pair");
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..64 {
            let data = vec![0u8; 1 << 20];
            queued.add(data.len());
            tx.send(Out::Pdu {
                bhs: Bhs::new(op::NOP_IN),
                data,
                sn: Sn::Peek,
            })
            .expect("writer's queue");
        }
        let framing = Framing {
            header_digest: false,
            data_digest: false,
            max_data: 1 << 24,
        };
        let writer = tokio::spawn(writer(
            BufWriter::new(ours),
            rx,
            queued.clone(),
            shared.clone(),
            framing,
            1 << 24,
            0,
        ));
        let (watched, _peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        // First the writer runs once the reader waits, and is held up by the full socket;
        // then a later wait begins with the writer held up already (no word will come until
        // the initiator reads). The reader must stop waiting both times (the bound only ends
        // a hang of this test).
        for when in ["during the wait", "before the wait"] {
            tokio::time::timeout(
                Duration::from_secs(60),
                busy_poll(watched.as_raw_fd(), &queued, &shared),
            )
            .await
            .unwrap_or_else(|_| panic!("the reader waited for a writer held up {when}"));
            assert!(!writer.is_finished(), "the writer is still held up");
            assert!(queued.msgs.load(Ordering::Acquire) > 0);
        }
        drop(tx);
        writer.abort();
    }
}
