//! A logical unit: an SBC-4 direct-access block device over a [`block::Backend`].
//!
//! Every command goes through the same steps (SAM-5 5.14, SPC-5 5.13, DESIGN.md §3-4):
//! 1. enter the LU's task set (an overlapped tag is ABORTED COMMAND / OVERLAPPED COMMANDS
//!    ATTEMPTED);
//! 2. report a pending unit attention, except to INQUIRY, REPORT LUNS and REQUEST SENSE;
//! 3. parse the CDB against the opcode table ([`crate::cdb`]);
//! 4. check that the data-out the transport received is what the CDB asks for;
//! 5. the reservation check ([`LogicalUnit::reservation_check`]), fed by the table row (and,
//!    while the persistent reservation information is lost, its own termination: [`crate::pr`]);
//! 6. start the task (a task aborted before this point never touches the backend);
//! 7. execute.
//!
//! Block layer errors map to sense data in [`block_error`], an exhaustive match.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use block::{Backend, BlockError, IoBuf};

use crate::cdb::{self, Cdb, DataDir, OpInfo};
use crate::inquiry::{self, Limits};
use crate::mode::{self, ModeState};
use crate::pr::out::Refusal;
use crate::pr::{self, PrState};
use crate::reservations::{Failure, Reservations};
use crate::sense::{cond, key, Sense};
use crate::task::{NexusState, Nexuses, TaskCtl, TaskSet};
use crate::{Command, Completion, ItNexus, Response, ServedPort, Status, TargetPort};

/// Per-LU identity and settings.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// T10 vendor identification (8 ASCII characters, space padded on the wire).
    pub vendor: String,
    /// Product identification (16 characters).
    pub product: String,
    /// Product revision level (4 characters).
    pub revision: String,
    /// Unit serial number (VPD 0x80); stable for the life of the LU.
    pub serial: String,
    /// A 64-bit value from which the NAA identifier (VPD 0x83) is made; stable per LU.
    pub id: u64,
}

/// A logical unit.
pub struct LogicalUnit {
    backend: Backend,
    config: LuConfig,
    limits: Limits,
    mode: ModeState,
    tasks: TaskSet,
    nexuses: Nexuses,
    /// The image refused a deallocation UNMAP asked for, and that was logged (once: an
    /// initiator's discards would repeat it for every range).
    unmap_refused: AtomicBool,
    /// Bumped by task management that ends every nexus's tasks (LOGICAL UNIT RESET, target
    /// resets, CLEAR TASK SET), before it aborts the task set: see [`Ticket`].
    reset_epoch: AtomicU64,
    /// Held for writing by task management that moves more than one of the counters a
    /// [`Ticket`] reads (the `cleared` of other nexuses, then the epoch that ends their
    /// commands), and for reading by [`LogicalUnit::admit`] as it reads them: a ticket sees
    /// all of one function's moves or none. Without it, a command received between the two
    /// moves would be ended by the function without its initiator being told, and a nexus
    /// seen for the first time as the function counted the others likewise.
    epochs: std::sync::RwLock<()>,
    /// Run while CLEAR TASK SET or PREEMPT AND ABORT holds `epochs` for writing, between its
    /// moves.
    #[cfg(test)]
    between_moves: std::sync::Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Persistent and SPC-2 reservations: the snapshot every command is checked against.
    resv: Arc<Reservations>,
    /// The target ports the frontends serve this LU through ([`LogicalUnit::add_target_port`]):
    /// what REGISTER AND MOVE's RELATIVE TARGET PORT IDENTIFIER may name, even before an
    /// initiator has logged in through the port.
    ports: std::sync::Mutex<Vec<ServedPort>>,
}

/// Proof of when a transport received a command, for SAM-5's rule that task management ends
/// every task in the task set, including those the transport holds before execution (an
/// iSCSI write still collecting Data-Out, a command waiting for a CmdSN gap). A transport takes
/// it with [`LogicalUnit::admit`] (or [`crate::Target::admit`]) on receipt and hands it to
/// [`LogicalUnit::execute_admitted`]; a command a reset, ABORT TASK SET, CLEAR TASK SET or
/// I_T NEXUS RESET ended in between then never runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    reset_epoch: u64,
    nexus_id: u64,
    abort_epoch: u64,
    cleared: u64,
}

type Outcome = Result<Vec<u8>, Sense>;

/// Largest buffer used by commands that walk a range (VERIFY, WRITE SAME with a pattern).
const CHUNK_BYTES: u32 = 1 << 20;

/// A physical block size that is not a power-of-two multiple of the logical block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Physical block size {bytes} is not a power-of-two multiple (at most 2^15, and at most 8 MiB) of the {logical}-byte logical block")]
pub struct PhysicalBlockSizeError {
    pub bytes: u32,
    pub logical: u32,
}

impl LogicalUnit {
    pub fn new(backend: Backend, config: LuConfig) -> Self {
        let limits = Limits {
            unmap_granularity: backend.unmap_granularity_blocks(),
            ..Limits::new(backend.block_size(), backend.capabilities())
        };
        let resv = Arc::new(Reservations::new(config.id));
        Self {
            backend,
            config,
            limits,
            mode: ModeState::default(),
            tasks: TaskSet::default(),
            nexuses: Nexuses::default(),
            unmap_refused: AtomicBool::new(false),
            reset_epoch: AtomicU64::new(0),
            epochs: std::sync::RwLock::new(()),
            #[cfg(test)]
            between_moves: std::sync::Mutex::new(None),
            resv,
            ports: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Load the persistent reservation state the block driver's store holds (APTPL state
    /// kept across a restart) and follow changes other holders of the LU store. Call once,
    /// before serving.
    ///
    /// A state the store lost (a damaged sidecar) is not an error: the LU serves in the lost
    /// persistent reservation condition (see [`crate::pr`]), which is logged here.
    pub async fn restore_reservations(&self) -> Result<(), String> {
        let lost = self
            .resv
            .restore(self.backend.reservations())
            .await
            .map_err(|f| match f {
                Failure::Store(e) => format!("Cannot load the reservation state: {e}"),
                Failure::Corrupt(e) => format!("The stored reservation state is unreadable: {e}"),
                Failure::Refused(_) => "Reservation state refused".into(),
            })?;
        if let Some(why) = lost {
            tracing::error!(
                serial = %self.config.serial,
                reason = %why,
                "Persistent reservation information lost: every command but INQUIRY, LOG \
                 SENSE, READ BUFFER, REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE, \
                 START STOP UNIT and WRITE BUFFER fails with DATA PROTECT, PERSISTENT \
                 RESERVATION INFORMATION LOST until an initiator sends PERSISTENT RESERVE OUT \
                 REPLACE LOST RESERVATION or the operator runs `sharedisk pr clear`"
            );
        }
        Ok(())
    }

    /// The persistent reservation state now (operators: `sharedisk pr show`).
    pub fn persistent_reservations(&self) -> Arc<PrState> {
        self.resv.snapshot().pr.clone()
    }

    /// An operator's way out of a stale reservation (`sharedisk pr clear`): remove every
    /// registration and the reservation as a CLEAR would, bump the generation, and tell every
    /// registrant (RESERVATIONS PREEMPTED, SPC-5 5.14.11.3's unit attention for CLEAR).
    /// Unlike a CLEAR it also turns APTPL off: with nothing left to keep, the state file is
    /// removed (PTPL_A 0), and the next REGISTER with APTPL set keeps state again. It also
    /// ends a lost persistent reservation condition (the empty state it stores is not lost).
    /// Returns the state it replaced.
    ///
    /// The clear runs in a task of its own, so dropping this future (the control socket's
    /// time limit, the operator's client going away) never stops it between storing the new
    /// state and making it the one commands are checked against, or before the registrants
    /// are told.
    pub async fn clear_reservations_by_operator(self: &Arc<Self>) -> Result<Arc<PrState>, String> {
        let lu = self.clone();
        tokio::spawn(async move { lu.clear_now().await })
            .await
            .unwrap_or_else(|e| Err(format!("the clear did not finish: {e}")))
    }

    async fn clear_now(&self) -> Result<Arc<PrState>, String> {
        let _change = self.resv.lock().await;
        let old = self
            .resv
            .replace(self.backend.reservations(), |old| PrState {
                generation: old.generation.wrapping_add(1),
                ..PrState::default()
            })
            .await
            .map_err(|f| format!("{f:?}"))?;
        for r in &old.registrations {
            self.nexuses
                .broadcast(cond::RESERVATIONS_PREEMPTED, |n| r.who.matches(n));
        }
        tracing::warn!(
            serial = %self.config.serial,
            generation = old.generation,
            registrations = old.registrations.len(),
            reservation = ?old.reservation,
            lost = old.lost,
            "Operator cleared the persistent reservations"
        );
        Ok(old)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// Advertise `bytes`-sized physical blocks (READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL
    /// BLOCK EXPONENT, VPD 0xB0 OPTIMAL TRANSFER LENGTH GRANULARITY): a power of two, at least
    /// the logical block size, at most 2^15 logical blocks and at most the MAXIMUM TRANSFER
    /// LENGTH (a transfer of one physical block must be possible). The OPTIMAL TRANSFER
    /// LENGTH grows to one physical block when it was shorter, so it stays a multiple of the
    /// granularity (SBC-4 6.6.4). The default is 4096 bytes (or the logical block size, when
    /// larger).
    pub fn with_physical_block_size(mut self, bytes: u32) -> Result<Self, PhysicalBlockSizeError> {
        let bs = self.backend.block_size();
        let err = PhysicalBlockSizeError { bytes, logical: bs };
        if bytes < bs || !bytes.is_power_of_two() {
            return Err(err);
        }
        let blocks = bytes / bs;
        if blocks > 1 << 15 || blocks > self.limits.max_transfer {
            return Err(err);
        }
        self.limits.lbppbe = blocks.trailing_zeros() as u8;
        self.limits.opt_transfer = self.limits.opt_transfer.max(blocks);
        Ok(self)
    }

    /// The limits this LU advertises (VPD 0xB0) and enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// See [`crate::Target::data_out_len`].
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        cdb::data_out_len(cdb, self.backend.block_size())
    }

    /// See [`crate::Target::read_len`].
    pub fn read_len(&self, cdb: &[u8]) -> u64 {
        let bs = self.backend.block_size();
        let len = cdb::read_len(cdb, bs);
        if len > u64::from(self.limits.max_transfer) * u64::from(bs) {
            return 0;
        }
        len
    }

    /// Whether this LU refuses `cdb` by the CDB alone, before it uses any data-out: an
    /// unknown or unsupported operation code, an invalid field, a transfer length beyond its
    /// limits (what [`Self::execute`] checks before the data-out). A transport need not
    /// collect the data-out of such a command before it executes it.
    pub fn refuses_cdb(&self, cdb: &[u8]) -> bool {
        let want = cdb::data_out_len(cdb, self.backend.block_size()) as usize;
        self.check_cdb(cdb, want).is_err()
    }

    /// What the CDB alone decides, with `data_out_len` bytes of data-out: it parses, its
    /// operation code is supported here, and its transfer fields are within this LU's limits.
    fn check_cdb(&self, cdb: &[u8], data_out_len: usize) -> Result<(&'static OpInfo, Cdb), Sense> {
        let (info, parsed) = cdb::parse(cdb)?;
        if !self.supported(info) {
            return Err(cond::INVALID_OPCODE);
        }
        self.check_transfer_field(info, &parsed, data_out_len)?;
        Ok((info, parsed))
    }

    /// Tell `nexus` that the LUN inventory of a target it reaches this LU through changed
    /// (SPC-5: REPORTED LUNS DATA HAS CHANGED, 3Fh/0Eh), on its next command to this LU.
    pub fn reported_luns_changed(&self, nexus: &ItNexus) {
        self.nexuses
            .broadcast(cond::REPORTED_LUNS_CHANGED, |n| n == nexus);
    }

    /// `s`, a unit attention a command of `nexus` reported, never reached it: pending again.
    pub(crate) fn put_back_unit_attention(&self, nexus: &ItNexus, s: Sense) {
        if let Some(ns) = self.nexuses.peek(nexus) {
            ns.put_back(s);
        }
    }

    /// REPORTED LUNS DATA HAS CHANGED was reported to `nexus` through another LU of a target
    /// this one is in: it is no longer pending here (LUICLR=1).
    pub(crate) fn clear_reported_luns_changed(&self, nexus: &ItNexus) {
        if let Some(ns) = self.nexuses.peek(nexus) {
            ns.remove(cond::REPORTED_LUNS_CHANGED);
        }
    }

    /// Look at the image's size again after it was grown underneath (`sharedisk lu rescan`):
    /// the LU serves its new end from now on, and when the number of logical blocks changed,
    /// every nexus is told on its next command (SBC-4 4.9: CAPACITY DATA HAS CHANGED, 2Ah/09h),
    /// so that it reads the capacity again. Returns the capacity in logical blocks before and
    /// after. A smaller image is refused, and nothing changes.
    pub async fn refresh_capacity(&self) -> Result<(u64, u64), String> {
        let (before, now) = self.backend.refresh_capacity().await.map_err(|e| {
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
        })?;
        if now != before {
            self.capacity_changed();
            tracing::info!(
                serial = %self.config.serial,
                before,
                now,
                "Capacity changed; initiators are told (CAPACITY DATA HAS CHANGED)"
            );
        }
        Ok((before, now))
    }

    /// Tell every nexus that the capacity changed (SBC-4 4.9: CAPACITY DATA HAS CHANGED).
    pub fn capacity_changed(&self) {
        self.nexuses
            .broadcast(cond::CAPACITY_DATA_CHANGED, |_| true);
    }

    pub(crate) fn descriptor_sense(&self) -> bool {
        self.mode.get() & mode::D_SENSE != 0
    }

    fn check(&self, s: Sense) -> Response {
        Response {
            status: Status::CHECK_CONDITION,
            sense: s.encode(self.descriptor_sense()),
            data_in: Vec::new(),
            data_in_placed: 0,
        }
    }

    /// Record that a frontend of `transport` serves this LU through target port `port` (an
    /// iSCSI target's portal group, a vhost-user socket). Once is enough.
    pub fn add_target_port(&self, port: TargetPort, transport: crate::Transport) {
        ServedPort::add(&mut self.served_ports(), &port, transport);
    }

    /// Record that no frontend serves this LU through `port` any more (the LU was taken off
    /// a vhost-user socket): REGISTER AND MOVE can no longer name it.
    pub fn remove_target_port(&self, port: &TargetPort) {
        self.served_ports().retain(|p| p.port != *port);
    }

    /// The target ports the frontends serve this LU through ([`Self::add_target_port`]).
    pub fn target_ports(&self) -> Vec<ServedPort> {
        self.served_ports().clone()
    }

    fn served_ports(&self) -> std::sync::MutexGuard<'_, Vec<ServedPort>> {
        self.ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A ticket for a command of `nexus` that the transport has just received (see [`Ticket`]).
    pub fn admit(&self, nexus: &Arc<ItNexus>) -> Ticket {
        // The nexus's state exists before the counters are read: a function that moves them
        // after this counts it.
        let ns = self.nexuses.get(nexus);
        let _moves = self.epochs.read().unwrap_or_else(PoisonError::into_inner);
        Ticket {
            reset_epoch: self.reset_epoch.load(Ordering::SeqCst),
            nexus_id: ns.id,
            abort_epoch: ns.abort_epoch.load(Ordering::SeqCst),
            cleared: ns.cleared.load(Ordering::SeqCst),
        }
    }

    /// A command with task attribute `attr` that the transport holds before executing it
    /// (an iSCSI write collecting Data-Out) arrives now: pass it in [`Command::arrival`], so
    /// that the commands received after it are ordered after it (SAM-5 8.6). Commands
    /// executed as they are received need none.
    ///
    /// `ticket` is the one the transport took for it on receipt: task management that ends
    /// the command while the transport holds it also takes it out of the order, so the
    /// commands after it do not wait for data its initiator may never send.
    pub fn arrive(
        &self,
        nexus: &Arc<ItNexus>,
        ticket: Option<&Ticket>,
        attr: crate::TaskAttr,
    ) -> crate::Arrival {
        // Without a ticket nothing would end it, so nothing may retire it either.
        let Some(ticket) = ticket else {
            return self.tasks.order.arrive(attr);
        };
        let ns = self.nexuses.get(nexus);
        self.tasks
            .order
            .arrive_held(attr, ns.id, || self.ended(&ns, ticket))
    }

    /// Whether task management has ended the command of `nexus` that the transport took
    /// `ticket` for (a reset of the LU, or an abort of the nexus's tasks: ABORT TASK SET,
    /// CLEAR TASK SET from any nexus), before the command reached the task set: a transport
    /// still collecting its data can answer QUERY TASK truthfully.
    pub fn ticket_ended(&self, nexus: &Arc<ItNexus>, ticket: &Ticket) -> bool {
        self.ended(&self.nexuses.get(nexus), ticket)
    }

    /// Whether a reset of the LU, or an abort of the tasks of the nexus whose state is `ns`,
    /// came after `ticket` was taken (or the nexus is another one now).
    fn ended(&self, ns: &NexusState, ticket: &Ticket) -> bool {
        self.reset_epoch.load(Ordering::SeqCst) != ticket.reset_epoch
            || ns.id != ticket.nexus_id
            || ns.abort_epoch.load(Ordering::SeqCst) != ticket.abort_epoch
    }

    /// Execute one command addressed to this LU, as received now.
    pub async fn execute(&self, cmd: Command) -> Completion {
        self.execute_admitted(cmd, None).await
    }

    /// Execute a command the transport received earlier, when it took `ticket`: a command
    /// that task management ended in the meantime completes as [`Completion::Aborted`].
    pub async fn execute_admitted(&self, mut cmd: Command, ticket: Option<Ticket>) -> Completion {
        // Arrival first, before anything awaits: a transport that polls this once as it
        // receives the command (iSCSI) makes commands arrive in the order it received them.
        // Dropped last, once the command is over: then the commands its attribute holds back
        // may start.
        // One the transport held has kept its place, unless task management ended it (its
        // ticket then ends it below, and the place it takes now holds no one back).
        let arrival = match cmd.arrival.take() {
            Some(a) if a.of(&self.tasks.order) && a.enter_task_set() => a,
            _ => self.tasks.order.arrive(cmd.attr),
        };
        let ns = self.nexuses.get(&cmd.nexus);
        let Some(guard) = self.tasks.enter(&cmd.nexus, ns.id, cmd.tag) else {
            return Completion::Done(self.check(cond::OVERLAPPED_COMMANDS));
        };
        // Checked after entering the task set, while task management bumps the epoch before
        // it scans the set: either the scan sees this task, or this sees the new epoch.
        if let Some(t) = ticket {
            if self.ended(&ns, &t) {
                guard.finish();
                // Ended before it had a place in the task set or the order (held for a
                // CmdSN gap, waiting for its transport, or received as the function ran): if
                // another initiator cleared it, its initiator learns it here.
                if ns.cleared.load(Ordering::SeqCst) != t.cleared {
                    ns.tell_cleared();
                }
                return Completion::Aborted;
            }
        }
        // The LU never establishes an ACA condition (standard INQUIRY NormACA=0), so a command
        // with the ACA task attribute has none to run in: it is refused before it runs, with
        // nothing of its nexus's state (unit attentions) touched.
        if cmd.attr == crate::TaskAttr::Aca {
            if guard.finish() {
                return Completion::Aborted;
            }
            return Completion::Done(self.check(cond::INVALID_MESSAGE_ERROR));
        }
        // SAM-5 8.6: wait for the turn the task attribute gives (at once for the usual SIMPLE
        // command). Task management may end the task meanwhile; it has not started, so it
        // ends before it touches anything, its nexus's unit attentions included.
        arrival.turn(|| guard.ctl.aborted()).await;
        if guard.ctl.aborted() {
            guard.finish();
            return Completion::Aborted;
        }
        // The unit attention the command reports, if it takes one: put back if the command
        // ends aborted (its report never reaches the initiator).
        let mut reported = None;
        let out = match CatchPanic::new(self.run(cmd, &ns, &guard.ctl, &mut reported)).await {
            Ok(out) => out,
            Err(()) => {
                // A bug met by this command: it fails alone, with an answer, instead of
                // ending the frontend's connection or task without one.
                let serial = &self.config.serial;
                tracing::error!(%serial, "A command panicked; answered INTERNAL TARGET FAILURE");
                Some(self.check(cond::INTERNAL_TARGET_FAILURE))
            }
        };
        let aborted = guard.finish();
        match out {
            Some(r) if !aborted => Completion::Done(r),
            _ => {
                if let Some(ua) = reported {
                    ns.put_back(ua);
                }
                Completion::Aborted
            }
        }
    }

    /// The response to a reservation-changing command the rules refused, or GOOD.
    fn refusal(&self, r: Result<(), Refusal>) -> Response {
        match r {
            Ok(()) => Response::default(),
            Err(Refusal::Conflict) => conflict(),
            Err(Refusal::Check(s)) => self.check(s),
        }
    }

    /// PERSISTENT RESERVE OUT (SPC-5 6.17): the new state is stored and published before GOOD;
    /// then the unit attentions go out, and PREEMPT AND ABORT ends the preempted nexuses'
    /// tasks (SPC-5 5.14.11.2.5), waiting for those running so none completes after GOOD.
    async fn persistent_reserve_out(
        &self,
        nexus: &Arc<ItNexus>,
        tag: u64,
        cdb: (u8, u8, u8),
        param: &[u8],
    ) -> Response {
        // The target ports this LU is reached through (REGISTER AND MOVE names one): those
        // the frontends serve it through, and any a nexus has used.
        let mut ports = self.target_ports();
        self.nexuses.for_each(|n, _| {
            ServedPort::add(&mut ports, &n.target, n.initiator.transport);
        });
        let eff = match self
            .resv
            .out(self.backend.reservations(), nexus, cdb, param, &ports)
            .await
        {
            Ok(eff) => eff,
            Err(Failure::Refused(r)) => return self.refusal(Err(r)),
            Err(f) => {
                tracing::error!(serial = %self.config.serial, failure = ?f, "PERSISTENT RESERVE OUT could not store the new state");
                return self.check(cond::INTERNAL_TARGET_FAILURE);
            }
        };
        for (who, sense) in &eff.unit_attentions {
            self.nexuses
                .broadcast(*sense, |n| n != &**nexus && who.matches(n));
        }
        if !eff.abort.is_empty() {
            let preempted = |n: &ItNexus| eff.abort.iter().any(|r| r.matches(n));
            // Commands the transport holds for the preempted nexuses end too (see Ticket),
            // the issuer's own when it is one of them (a key of zero under an All
            // Registrants reservation): those it received before this command, and those
            // after it that the task set would have let run beside it. Only the others were
            // cleared by another initiator.
            let held = {
                let _moves = self.epochs.write().unwrap_or_else(PoisonError::into_inner);
                self.tasks.order.retire(|| {
                    let mut ended = Vec::new();
                    self.nexuses.for_each(|n, st| {
                        if preempted(n) {
                            if n != &**nexus {
                                st.cleared.fetch_add(1, Ordering::SeqCst);
                            }
                            self.between_moves();
                            st.abort_epoch.fetch_add(1, Ordering::SeqCst);
                            ended.push(st.id);
                        }
                    });
                    move |id| ended.contains(&id)
                })
            };
            let owners = self
                .tasks
                .abort(|n, t| preempted(n) && !(n == &**nexus && t == tag))
                .await;
            // SAM-5 5.6 with TAS=0: the other nexuses whose tasks were aborted are told.
            self.tell_cleared(nexus, &owners, &held);
        }
        Response::default()
    }

    async fn run(
        &self,
        cmd: Command,
        ns: &NexusState,
        ctl: &TaskCtl,
        reported: &mut Option<Sense>,
    ) -> Option<Response> {
        let Command {
            nexus,
            lun,
            tag,
            cdb,
            data_out,
            mut data_in_buf,
            ..
        } = cmd;
        let opcode = cdb.first().copied().unwrap_or(0);
        // SAM-5 5.14: INQUIRY, REPORT LUNS and REQUEST SENSE are not terminated by a UA.
        if !matches!(opcode, 0x12 | 0xA0 | 0x03) {
            if let Some(ua) = ns.take() {
                *reported = Some(ua);
                return Some(self.check(ua));
            }
        }
        let (info, parsed) = match self.check_cdb(&cdb, data_out.len()) {
            Ok(p) => p,
            Err(s) => return Some(self.check(s)),
        };
        let mut data_out = data_out;
        if info.dir == DataDir::Out {
            let want = cdb::data_out_len(&cdb, self.backend.block_size());
            if let Err(s) = self.fit_data_out(&parsed, &mut data_out, want) {
                return Some(self.check(s));
            }
        }
        // Commands that change reservations run one at a time per LU; the lock is taken before
        // the task starts, so task management can end a waiting one without waiting for it.
        let _change = match parsed {
            Cdb::PersistentReserveOut { .. } | Cdb::Reserve | Cdb::Release => {
                Some(self.resv.lock().await)
            }
            _ => None,
        };
        if let Err(r) = self.resv.allowed(&nexus, info, &cdb) {
            return Some(self.refusal(Err(r)));
        }
        if !ctl.start() {
            return None;
        }
        let out = match parsed {
            Cdb::RequestSense { desc, alloc } => {
                *reported = ns.take();
                let s = reported.unwrap_or(Sense::new(key::NO_SENSE, 0x00, 0x00));
                let mut d = s.encode(desc);
                d.truncate(alloc as usize);
                Ok(d)
            }
            Cdb::PersistentReserveOut { sa, scope, ty, .. } => {
                return Some(
                    self.persistent_reserve_out(&nexus, tag, (sa, scope, ty), &data_out.into_vec())
                        .await,
                );
            }
            Cdb::Reserve => return Some(self.refusal(self.resv.reserve(&nexus))),
            Cdb::Release => return Some(self.refusal(self.resv.release(&nexus))),
            // Straight into the transport's memory when it lent some and the whole transfer
            // fits; otherwise as every other command, into a buffer of data-in.
            Cdb::Read { lba, blocks, .. }
                if blocks > 0
                    && data_in_buf.as_ref().is_some_and(|b| {
                        b.len() as u64 >= u64::from(blocks) * u64::from(self.backend.block_size())
                    }) =>
            {
                let buf = data_in_buf.take().unwrap_or_default();
                return Some(match self.read_lent(lba, blocks, buf).await {
                    Ok(placed) => Response {
                        status: Status::GOOD,
                        sense: Vec::new(),
                        data_in: Vec::new(),
                        data_in_placed: placed,
                    },
                    Err(s) => self.check(s),
                });
            }
            other => self.dispatch(other, &nexus, lun, data_out).await,
        };
        Some(match out {
            Ok(data_in) => Response {
                status: Status::GOOD,
                sense: Vec::new(),
                data_in,
                data_in_placed: 0,
            },
            Err(s) => self.check(s),
        })
    }

    /// Whether this LU implements the table row (UNMAP only with thin provisioning: SBC-4
    /// 5.32.1, LBPU).
    pub(crate) fn supported(&self, info: &OpInfo) -> bool {
        info.opcode != 0x42 || self.limits.thin
    }

    async fn dispatch(&self, c: Cdb, nexus: &Arc<ItNexus>, lun: u64, data_out: IoBuf) -> Outcome {
        match c {
            Cdb::TestUnitReady | Cdb::StartStopUnit | Cdb::PreventAllow => Ok(Vec::new()),
            Cdb::RequestSense { .. } => Ok(Vec::new()),
            Cdb::PersistentReserveIn { sa, alloc } => {
                let ptpl_c = self.backend.reservations().keeps_aptpl();
                pr::input::input_with(&self.resv.snapshot().pr, sa, alloc, ptpl_c)
            }
            // Answered in `run`, which can return RESERVATION CONFLICT.
            Cdb::PersistentReserveOut { .. } | Cdb::Reserve | Cdb::Release => {
                Err(cond::INTERNAL_TARGET_FAILURE)
            }
            Cdb::Inquiry { evpd, page, alloc } => {
                let mut d = if evpd {
                    inquiry::vpd(
                        page,
                        &self.config,
                        nexus,
                        &self.limits,
                        self.backend.capacity(),
                    )?
                } else {
                    inquiry::standard(&self.config, nexus)
                };
                d.truncate(alloc as usize);
                Ok(d)
            }
            Cdb::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => {
                let req = mode::SenseRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                };
                let mut d = mode::sense_data(
                    &req,
                    self.mode.get(),
                    self.backend.capacity(),
                    self.backend.block_size(),
                )?;
                d.truncate(alloc as usize);
                Ok(d)
            }
            Cdb::ModeSelect { ten, .. } => {
                let data = data_out.into_vec();
                let block_size = self.backend.block_size();
                let (old, new) = self
                    .mode
                    .update(|old| mode::select(ten, &data, old, block_size))?;
                if new != old {
                    // SPC-5 5.14 / SAM-5: MODE PARAMETERS CHANGED to the other I_T nexuses.
                    self.nexuses
                        .broadcast(cond::MODE_PARAMETERS_CHANGED, |n| n != &**nexus);
                }
                if old & mode::WCE != 0 && new & mode::WCE == 0 {
                    // Write-through from now on: what was written into the cache before goes
                    // to stable storage before GOOD, since an initiator that believes the cache
                    // off sends no SYNCHRONIZE CACHE for it. (The new parameters stand even if
                    // this fails, and the others were told of them above.)
                    self.flush_cache().await?;
                }
                Ok(Vec::new())
            }
            Cdb::ReadCapacity10 => {
                let last = self.backend.capacity().saturating_sub(1);
                let last = u32::try_from(last).unwrap_or(u32::MAX);
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&self.backend.block_size().to_be_bytes());
                Ok(d)
            }
            Cdb::ReadCapacity16 { alloc } => {
                // SBC-4 5.21.2 READ CAPACITY (16) parameter data.
                let mut d = vec![0u8; 32];
                let last = self.backend.capacity().saturating_sub(1);
                d[0..8].copy_from_slice(&last.to_be_bytes());
                d[8..12].copy_from_slice(&self.backend.block_size().to_be_bytes());
                d[13] = self.limits.lbppbe & 0x0F;
                if self.limits.thin {
                    d[14] |= 0x80; // LBPME
                }
                if self.limits.lbprz {
                    d[14] |= 0x40; // LBPRZ
                }
                d.truncate(alloc as usize);
                Ok(d)
            }
            Cdb::Read { lba, blocks, .. } => {
                self.check_transfer(blocks)?;
                self.check_range(lba, u64::from(blocks))?;
                if blocks == 0 {
                    return Ok(Vec::new());
                }
                self.backend
                    .read(lba, blocks)
                    .await
                    .map_err(|e| block_error(e, cond::INVALID_OPCODE))
            }
            Cdb::Write { lba, blocks, fua } => {
                self.write(lba, blocks, fua, data_out).await?;
                Ok(Vec::new())
            }
            Cdb::WriteVerify { lba, blocks, .. } => {
                // The data reaches the medium before GOOD, which is what the verify step
                // checks (SBC-4 5.46); a compare against the buffer just written adds nothing.
                self.write(lba, blocks, true, data_out).await?;
                Ok(Vec::new())
            }
            Cdb::Verify {
                lba,
                blocks,
                bytchk,
            } => self.verify(lba, blocks, bytchk, &data_out.into_vec()).await,
            Cdb::PreFetch { lba, blocks } => {
                self.check_range(lba, u64::from(blocks))?;
                Ok(Vec::new())
            }
            Cdb::SyncCache { lba, blocks } => {
                self.check_range(lba, u64::from(blocks))?;
                self.flush_cache().await?;
                Ok(Vec::new())
            }
            Cdb::WriteSame {
                lba,
                blocks,
                unmap,
                anchor,
                ndob,
                ten,
            } => {
                self.write_same(lba, blocks, unmap, anchor, ndob, ten, data_out.into_vec())
                    .await
            }
            Cdb::Unmap { anchor, .. } => self.unmap(anchor, &data_out.into_vec()).await,
            Cdb::CompareAndWrite { lba, blocks, fua } => {
                self.compare_and_write(lba, blocks, fua, data_out.into_vec())
                    .await
            }
            Cdb::OrWrite { lba, blocks, fua } => {
                self.check_write(lba, blocks)?;
                if blocks == 0 {
                    return Ok(Vec::new());
                }
                self.backend
                    .or_write(lba, data_out.into_vec(), self.fua(fua))
                    .await
                    .map_err(|e| block_error(e, cond::INVALID_OPCODE))?;
                Ok(Vec::new())
            }
            Cdb::GetLbaStatus { lba, alloc } => self.get_lba_status(lba, alloc).await,
            Cdb::ReportLuns { select, alloc } => {
                crate::target::report_luns(select, alloc, std::iter::once(lun))
            }
            Cdb::Rsoc {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => {
                let mut d = self.rsoc(rctd, options, opcode, sa)?;
                d.truncate(alloc as usize);
                Ok(d)
            }
            Cdb::Rstmf { repd, alloc } => {
                // SPC-5 6.39: ATS, ATSS, CTSS, LURS, QTS, TRS; QAES, QTSS, ITNRS.
                let mut d = vec![0xDE, 0x07, 0x00, 0x00];
                if repd {
                    d[3] = 0x0C;
                    d.extend_from_slice(&[0u8; 12]);
                }
                d.truncate(alloc as usize);
                Ok(d)
            }
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.backend.capacity() => Ok(()),
            _ => Err(cond::LBA_OUT_OF_RANGE),
        }
    }

    /// SBC-4 6.6.4: a TRANSFER LENGTH above MAXIMUM TRANSFER LENGTH is INVALID FIELD IN CDB,
    /// pointing at the TRANSFER LENGTH field.
    fn check_transfer_field(
        &self,
        info: &OpInfo,
        c: &Cdb,
        data_out_len: usize,
    ) -> Result<(), Sense> {
        if let Cdb::CompareAndWrite { blocks, .. } = *c {
            // SBC-4 5.3: NUMBER OF LOGICAL BLOCKS above MAXIMUM COMPARE AND WRITE LENGTH is an
            // invalid field. Checked before the data-out length so that this, not the size
            // mismatch, is reported. A zero count with data attached is an initiator asking for
            // 256 blocks, which the one-byte field cannot hold: also an invalid field.
            if blocks > u32::from(self.limits.max_caw) || (blocks == 0 && data_out_len != 0) {
                return Err(Sense::invalid_field_in_cdb(13, 7));
            }
            return Ok(());
        }
        if let Cdb::PersistentReserveOut { param_len, .. } = *c {
            // No list this LU could use is longer: refused before its data is taken.
            if param_len > pr::out::MAX_PARAM_LIST {
                return Err(cond::PARAM_LIST_LENGTH_ERROR);
            }
            return Ok(());
        }
        let blocks = match *c {
            Cdb::Read { blocks, .. }
            | Cdb::Write { blocks, .. }
            | Cdb::WriteVerify { blocks, .. }
            | Cdb::OrWrite { blocks, .. }
            // SBC-4 6.6.4: MAXIMUM TRANSFER LENGTH bounds VERIFY whatever BYTCHK says, which
            // also bounds how long a reset can wait for one.
            | Cdb::Verify { blocks, .. } => blocks,
            _ => return Ok(()),
        };
        if blocks > self.limits.max_transfer {
            let field = match info.opcode >> 5 {
                0 => 4,     // 6-byte CDBs
                1 | 2 => 7, // 10-byte
                5 => 6,     // 12-byte
                _ => 10,    // 16-byte
            };
            return Err(Sense::invalid_field_in_cdb(field, 7));
        }
        Ok(())
    }

    /// The same check where the field position is not at hand (defence in depth).
    fn check_transfer(&self, blocks: u32) -> Result<(), Sense> {
        if blocks > self.limits.max_transfer {
            return Err(cond::INVALID_FIELD_IN_CDB);
        }
        Ok(())
    }

    /// The checks of a command that writes `blocks` taken from its data-out at `lba`: not
    /// write protected, within MAXIMUM TRANSFER LENGTH, within the capacity, in that order.
    fn check_write(&self, lba: u64, blocks: u32) -> Result<(), Sense> {
        self.check_writable()?;
        self.check_transfer(blocks)?;
        self.check_range(lba, u64::from(blocks))
    }

    fn check_writable(&self) -> Result<(), Sense> {
        if self.mode.get() & mode::SWP != 0 {
            // SPC-5 7.5.8: SWP set, writes fail with DATA PROTECT, WRITE PROTECTED.
            return Err(cond::WRITE_PROTECTED);
        }
        Ok(())
    }

    /// With the write cache disabled (WCE=0) every write is forced unit access.
    fn fua(&self, fua: bool) -> bool {
        fua || self.mode.get() & mode::WCE == 0
    }

    /// Reconcile the data-out the transport received with what the CDB asks for (`want`
    /// bytes). FCP-4 9.4.2 allows either (a) processing the command without the data beyond
    /// what was transferred or (b) INVALID FIELD IN COMMAND INFORMATION UNIT without touching
    /// the medium. WRITE and WRITE AND VERIFY take (a) when the data-out is longer (the first
    /// `want` bytes are used) or a whole number of blocks shorter (only those blocks are
    /// written); libiscsi 1.19's residual tests require GOOD there. Everything else, and a
    /// partial block, takes (b).
    fn fit_data_out(&self, c: &Cdb, data: &mut IoBuf, want: u32) -> Result<(), Sense> {
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        if data.len() == want {
            return Ok(());
        }
        let bs = self.backend.block_size() as usize;
        match c {
            Cdb::Write { .. } | Cdb::WriteVerify { .. } => {
                if data.len() > want {
                    data.truncate(want);
                    Ok(())
                } else if data.len() / bs.max(1) * bs == data.len() {
                    Ok(())
                } else {
                    Err(cond::INVALID_FIELD_IN_CMD_IU)
                }
            }
            _ => Err(cond::INVALID_FIELD_IN_CMD_IU),
        }
    }

    /// WRITE `blocks` at `lba` as the CDB says; `data` may hold fewer whole blocks when the
    /// transport received less (see [`Self::fit_data_out`]): only those are written.
    async fn write(&self, lba: u64, blocks: u32, fua: bool, data: IoBuf) -> Result<(), Sense> {
        self.check_write(lba, blocks)?;
        if blocks == 0 || data.is_empty() {
            return Ok(());
        }
        self.backend
            .write(lba, data, self.fua(fua))
            .await
            .map_err(|e| block_error(e, cond::INVALID_OPCODE))
    }

    /// READ `blocks` at `lba` straight into `buf` (memory the transport lent, at least as long
    /// as the transfer); the bytes placed.
    async fn read_lent(&self, lba: u64, blocks: u32, mut buf: IoBuf) -> Result<usize, Sense> {
        self.check_transfer(blocks)?;
        self.check_range(lba, u64::from(blocks))?;
        let len = u64::from(blocks) * u64::from(self.backend.block_size());
        let len = usize::try_from(len).map_err(|_| cond::INVALID_FIELD_IN_CDB)?;
        buf.truncate(len);
        self.backend
            .read_into(lba, buf)
            .await
            .map_err(|e| block_error(e, cond::INVALID_OPCODE))?;
        Ok(len)
    }

    /// Write the LU's cache to stable storage (SYNCHRONIZE CACHE's work).
    async fn flush_cache(&self) -> Result<(), Sense> {
        self.backend
            .flush()
            .await
            .map_err(|e| block_error(e, cond::INVALID_OPCODE))
    }

    /// Flush after an operation that has no FUA of its own, when the write cache is off.
    async fn flush_if_write_through(&self) -> Result<(), Sense> {
        if self.mode.get() & mode::WCE == 0 {
            self.flush_cache().await?;
        }
        Ok(())
    }

    fn chunk_blocks(&self) -> u64 {
        u64::from((CHUNK_BYTES / self.backend.block_size().max(1)).max(1))
    }

    async fn verify(&self, lba: u64, blocks: u32, bytchk: u8, data: &[u8]) -> Outcome {
        self.check_range(lba, u64::from(blocks))?;
        self.check_transfer(blocks)?;
        // SBC-4 VERIFY (10): a logical unit with a cache "shall write referenced cached logical blocks
        // to the medium", as SYNCHRONIZE CACHE would, before it verifies them. With the write
        // cache off, every write already reached stable storage before its GOOD.
        if blocks != 0 && self.mode.get() & mode::WCE != 0 {
            self.flush_cache().await?;
        }
        let bs = u64::from(self.backend.block_size());
        let chunk = self.chunk_blocks();
        let mut done = 0u64;
        let total = u64::from(blocks);
        while done < total {
            let n = chunk.min(total - done);
            let got = self
                .backend
                .read(lba + done, n as u32)
                .await
                .map_err(|e| block_error(e, cond::INVALID_OPCODE))?;
            let base = done * bs;
            let diff = match bytchk {
                1 => {
                    let start = usize::try_from(base).unwrap_or(usize::MAX);
                    let want = data.get(start..).unwrap_or(&[]);
                    got.iter().zip(want).position(|(a, b)| a != b)
                }
                3 => got
                    .chunks(bs as usize)
                    .flat_map(|blk| blk.iter().zip(data))
                    .position(|(a, b)| a != b),
                _ => None,
            };
            if let Some(i) = diff {
                // SBC-4 5.40: INFORMATION = offset of the first miscompared byte.
                return Err(cond::MISCOMPARE_DURING_VERIFY.with_info(base + i as u64));
            }
            done += n;
        }
        Ok(Vec::new())
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_same(
        &self,
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        ten: bool,
        pattern: Vec<u8>,
    ) -> Outcome {
        if anchor {
            // SBC-4 5.50: ANC_SUP is zero, so ANCHOR=1 is an invalid field.
            return Err(Sense::invalid_field_in_cdb(1, 4));
        }
        if unmap && !self.limits.thin {
            // Without LBPWS/LBPWS10 an UNMAP request is refused rather than silently written.
            return Err(Sense::invalid_field_in_cdb(1, 3));
        }
        self.check_writable()?;
        let cap = self.backend.capacity();
        // Also with NUMBER OF LOGICAL BLOCKS zero: LBA `cap` is past the last one.
        if lba >= cap {
            return Err(cond::LBA_OUT_OF_RANGE);
        }
        // SBC-4 5.50: NUMBER OF LOGICAL BLOCKS zero (WSNZ=0) means through the last LBA.
        let n = if blocks == 0 {
            cap - lba
        } else {
            u64::from(blocks)
        };
        if n > self.limits.max_write_same {
            let at = if ten { 7 } else { 10 };
            return Err(Sense::invalid_field_in_cdb(at, 7));
        }
        self.check_range(lba, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        // SBC-4 5.50, table "ANCHOR bit, UNMAP bit, and ANC_SUP bit relationships": UNMAP=1 with
        // ANCHOR=0 is an unmap operation on a thin LU (it should deallocate), whatever the
        // pattern; with LBPRZ the range then reads as zeros (as LIO does; libiscsi's
        // WriteSame10.UnmapUntilEnd sends a pattern of FFh bytes with UNMAP and expects zeros
        // back).
        let zero = ndob || (unmap && self.limits.lbprz) || pattern.iter().all(|&b| b == 0);
        let r = if zero {
            match self.backend.write_zeroes(lba, n, unmap).await {
                // The image stopped taking deallocation after it was opened (its file system
                // refused a punch): the blocks are written as zeros instead, which is what
                // they read as either way.
                Err(BlockError::Unsupported) if unmap => {
                    self.backend.write_zeroes(lba, n, false).await
                }
                r => r,
            }
        } else {
            let chunk = self.chunk_blocks();
            let mut done = 0u64;
            let mut r = Ok(());
            while done < n && r.is_ok() {
                let k = chunk.min(n - done);
                r = self
                    .backend
                    .write_same(lba + done, k, pattern.clone())
                    .await;
                done += k;
            }
            r
        };
        r.map_err(|e| block_error(e, Sense::invalid_field_in_cdb(1, 3)))?;
        self.flush_if_write_through().await?;
        Ok(Vec::new())
    }

    async fn unmap(&self, anchor: bool, p: &[u8]) -> Outcome {
        if anchor {
            return Err(Sense::invalid_field_in_cdb(1, 0));
        }
        self.check_writable()?;
        let ranges = parse_unmap(p, &self.limits, self.backend.capacity())?;
        for (lba, num) in ranges {
            match self.backend.discard(lba, num).await {
                Ok(()) => {}
                // The image stopped taking deallocation after it was opened (its file system
                // refused a punch): the blocks stay mapped, with their data, which UNMAP
                // allows (SBC-4 5.31: the device server may deallocate them); the command is
                // still one this LU supports, so no INVALID COMMAND OPERATION CODE.
                Err(BlockError::Unsupported) => {
                    if !self.unmap_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            serial = %self.config.serial,
                            "UNMAP: the image refused to deallocate blocks; they stay mapped \
                             (logged once)"
                        );
                    }
                }
                Err(e) => return Err(block_error(e, cond::INVALID_OPCODE)),
            }
        }
        // With the write cache off, deallocated blocks stay deallocated across a power loss
        // once GOOD is sent, as written ones do: otherwise their old data could come back.
        self.flush_if_write_through().await?;
        Ok(Vec::new())
    }

    async fn compare_and_write(&self, lba: u64, blocks: u32, fua: bool, data: Vec<u8>) -> Outcome {
        self.check_writable()?;
        if blocks > u32::from(self.limits.max_caw) {
            // SBC-4 5.3: above MAXIMUM COMPARE AND WRITE LENGTH.
            return Err(Sense::invalid_field_in_cdb(13, 7));
        }
        self.check_range(lba, u64::from(blocks))?;
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let mut compare = data;
        let half = compare.len() / 2;
        let write = compare.split_off(half);
        self.backend
            .compare_and_write(lba, compare, write, self.fua(fua))
            .await
            .map_err(|e| block_error(e, cond::INVALID_OPCODE))?;
        Ok(Vec::new())
    }

    async fn get_lba_status(&self, lba: u64, alloc: u32) -> Outcome {
        let cap = self.backend.capacity();
        if lba >= cap {
            return Err(cond::LBA_OUT_OF_RANGE);
        }
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, 64) as usize;
        let mut d = vec![0u8; 8];
        let mut cur = lba;
        let mut n = 0;
        while n < max_desc && cur < cap {
            // A fully provisioned LU (LBPME=0) maps every block (SBC-4 4.7.2), whatever holes
            // its image has.
            let status = if self.limits.thin {
                self.backend.block_status(cur).await
            } else {
                Err(BlockError::Unsupported)
            };
            let (len, mapped) = match status {
                Ok(x) => x,
                Err(BlockError::Unsupported) => (cap - cur, true),
                Err(e) => return Err(block_error(e, cond::INVALID_OPCODE)),
            };
            let len = len.clamp(1, cap - cur).min(u64::from(u32::MAX));
            // SBC-4 5.7.3 LBA status descriptor: 0h mapped, 1h deallocated.
            d.extend_from_slice(&cur.to_be_bytes());
            d.extend_from_slice(&(len as u32).to_be_bytes());
            d.extend_from_slice(&[if mapped { 0x00 } else { 0x01 }, 0, 0, 0]);
            cur += len;
            n += 1;
        }
        let plen = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&plen.to_be_bytes());
        d.truncate(alloc as usize);
        Ok(d)
    }

    /// REPORT SUPPORTED OPERATION CODES (SPC-5 6.36).
    fn rsoc(&self, rctd: bool, options: u8, opcode: u8, sa: u16) -> Outcome {
        // Command timeouts descriptor (SPC-5 6.36.4): length 0Ah, no timeouts given.
        const TIMEOUTS: [u8; 12] = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let one = |info: Option<&OpInfo>| -> Vec<u8> {
            match info {
                Some(info) if self.supported(info) => {
                    let mut d = vec![0u8, 0x03, 0, 0];
                    if rctd {
                        d[1] |= 0x80;
                    }
                    d[2..4].copy_from_slice(&(info.usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(info.usage);
                    if matches!(info.opcode, 0x41 | 0x93) && !self.limits.thin {
                        // WRITE SAME's UNMAP bit (byte 1 bit 3) is refused, as a reserved bit
                        // is, on an LU without thin provisioning: not a bit it uses.
                        d[5] &= !0x08;
                    }
                    if rctd {
                        d.extend_from_slice(&TIMEOUTS);
                    }
                    d
                }
                _ => vec![0, 0x01, 0, 0],
            }
        };
        let has_sa = cdb::has_service_actions(opcode);
        let sa8 = u8::try_from(sa).ok();
        match options {
            0 => {
                let mut d = vec![0u8; 4];
                for info in cdb::OPS.iter().filter(|i| self.supported(i)) {
                    let s = u16::from(info.sa.unwrap_or(0)).to_be_bytes();
                    let mut flags = 0;
                    if rctd {
                        flags |= 0x02;
                    }
                    if info.sa.is_some() {
                        flags |= 0x01;
                    }
                    let l = (info.usage.len() as u16).to_be_bytes();
                    d.extend_from_slice(&[info.opcode, 0, s[0], s[1], 0, flags, l[0], l[1]]);
                    if rctd {
                        d.extend_from_slice(&TIMEOUTS);
                    }
                }
                let len = (d.len() - 4) as u32;
                d[0..4].copy_from_slice(&len.to_be_bytes());
                Ok(d)
            }
            1 if has_sa => Err(Sense::invalid_field_in_cdb(2, 2)),
            1 => Ok(one(cdb::lookup(opcode, 0))),
            2 if !has_sa => Err(Sense::invalid_field_in_cdb(2, 2)),
            2 | 3 if has_sa => Ok(one(sa8.and_then(|s| {
                cdb::OPS
                    .iter()
                    .find(|i| i.opcode == opcode && i.sa == Some(s))
            }))),
            3 => Ok(one(cdb::lookup(opcode, 0))),
            _ => Err(Sense::invalid_field_in_cdb(2, 2)),
        }
    }

    // ---- task management (called by the target) ----

    /// ABORT TASK: `false` when the task is not in the task set or finished first (SAM-5 7.2:
    /// TASK DOES NOT EXIST, and its status is sent normally).
    pub(crate) async fn abort_task(&self, nexus: &ItNexus, tag: u64) -> bool {
        !self
            .tasks
            .abort(|n, t| t == tag && n == nexus)
            .await
            .is_empty()
    }

    pub(crate) async fn abort_task_set(&self, nexus: &ItNexus) {
        self.end_nexus_tasks(nexus);
        self.tasks.abort(|n, _| n == nexus).await;
    }

    /// Commands of `nexus` received but not yet executing are ended too (see [`Ticket`]).
    fn end_nexus_tasks(&self, nexus: &ItNexus) {
        if let Some(ns) = self.nexuses.peek(nexus) {
            self.tasks.order.retire(|| {
                ns.abort_epoch.fetch_add(1, Ordering::SeqCst);
                |id| id == ns.id
            });
        }
    }

    /// Every command received and not yet executing is ended (see [`Ticket`]): a reset of the
    /// task set. Returns the state ids of the nexuses whose held commands (an iSCSI write
    /// collecting data) it ended.
    fn end_all_tasks(&self) -> Vec<u64> {
        self.tasks.order.retire(|| {
            self.reset_epoch.fetch_add(1, Ordering::SeqCst);
            |_| true
        })
    }

    /// COMMANDS CLEARED BY ANOTHER INITIATOR to every nexus but `by` whose commands were
    /// aborted: those in the task set (`owners`), and those their transport held (`held`, by
    /// nexus state id), whose initiators would otherwise wait for them in vain. A nexus whose
    /// only ended command had no place in the order yet (one waiting for a CmdSN gap, or one
    /// received just as the function ended it) is told when that command comes to execute
    /// (`execute_admitted`).
    fn tell_cleared(&self, by: &ItNexus, owners: &[Arc<ItNexus>], held: &[u64]) {
        self.nexuses.for_each(|n, st| {
            if n != by && (held.contains(&st.id) || owners.iter().any(|o| &**o == n)) {
                st.tell_cleared();
            }
        });
    }

    /// Between the moves of a function holding `epochs` for writing: a test's pause there.
    fn between_moves(&self) {
        #[cfg(test)]
        if let Some(f) = &*self
            .between_moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            f();
        }
    }

    /// CLEAR TASK SET with TST=000b: every task of every nexus; the others are told with
    /// COMMANDS CLEARED BY ANOTHER INITIATOR (SAM-5 7.4).
    pub(crate) async fn clear_task_set(&self, nexus: &ItNexus) {
        let held = {
            let _moves = self.epochs.write().unwrap_or_else(PoisonError::into_inner);
            // Before the reset epoch moves: a command that sees its ticket ended by it sees
            // this.
            self.nexuses.for_each(|n, st| {
                if n != nexus {
                    st.cleared.fetch_add(1, Ordering::SeqCst);
                }
            });
            self.between_moves();
            self.end_all_tasks()
        };
        let owners = self.tasks.abort(|_, _| true).await;
        self.tell_cleared(nexus, &owners, &held);
    }

    /// LOGICAL UNIT RESET (SAM-5 7.7, 6.3.5): abort every task, reset the mode pages, and
    /// queue `ua` (BUS DEVICE RESET FUNCTION OCCURRED) for every nexus. All of it happens when
    /// this is called; the future waits for the running tasks (a target reset ends the tasks
    /// of every LU before it waits for any: see [`TaskSet::abort`]). A command that arrives
    /// meanwhile comes after the reset: it reports the reset's unit attention, and what it
    /// changes (a MODE SELECT) stands.
    ///
    /// The reset's effects come before the tickets move: a command whose ticket the reset
    /// does not end (admitted after the move) finds all of them, never the mode pages of
    /// before or no unit attention yet. A command whose ticket it ends and which took the
    /// unit attention meanwhile puts it back when it ends unanswered.
    pub(crate) fn reset(&self, ua: Sense) -> impl std::future::Future<Output = ()> + Send + '_ {
        // SPC-2 reservations end with a reset; persistent reservations do not (SPC-5 5.14.1).
        self.resv.release_spc2_if(|_| true);
        self.mode.reset();
        self.nexuses.reset(ua, |_| true);
        self.end_all_tasks();
        let aborted = self.tasks.abort(|_, _| true);
        async move {
            aborted.await;
        }
    }

    /// I_T NEXUS RESET on this LU: like [`Self::reset`], the nexus's tasks end and I_T NEXUS
    /// LOSS OCCURRED is pending for it when this is called, so that no command it sends
    /// meanwhile completes before being told.
    pub(crate) fn nexus_reset<'a>(
        &'a self,
        nexus: &'a ItNexus,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        self.resv.release_spc2_if(|h| h == nexus);
        self.nexuses.reset(cond::IT_NEXUS_LOSS, |n| n == nexus);
        self.end_nexus_tasks(nexus);
        let aborted = self.tasks.abort(move |n, _| n == nexus);
        async move {
            aborted.await;
        }
    }

    pub(crate) fn query_task(&self, nexus: &ItNexus, tag: u64) -> bool {
        self.tasks.contains(nexus, tag)
    }

    pub(crate) fn query_task_set(&self, nexus: &ItNexus) -> bool {
        self.tasks.any_of(nexus)
    }

    /// A nexus the LU has not seen (or has forgotten) gets POWER ON, RESET, OR BUS DEVICE
    /// RESET OCCURRED with its first command, so it has one pending.
    pub(crate) fn query_async_event(&self, nexus: &ItNexus) -> bool {
        self.nexuses.peek(nexus).is_none_or(|s| s.has_pending())
    }

    pub(crate) fn nexus_lost(&self, nexus: &ItNexus) {
        // The epoch first, as every function that ends a nexus's tasks does: a command that
        // took the nexus's state before `lose` replaces it, and enters the task set after the
        // scan below, sees it ended instead of running after the loss.
        self.end_nexus_tasks(nexus);
        self.resv.release_spc2_if(|h| h == nexus);
        self.tasks.abort_now(|n| n == nexus);
        self.nexuses.lose(nexus);
    }

    /// [`Self::nexus_lost`], after the nexus's tasks are aborted and the running ones have
    /// finished: a command admitted before this and not yet started sees the new abort epoch,
    /// so none of the nexus's commands reaches the medium after this returns.
    pub(crate) async fn end_nexus(&self, nexus: &ItNexus) {
        self.end_nexus_tasks(nexus);
        self.tasks.abort(|n, _| n == nexus).await;
        self.nexus_lost(nexus);
    }
}

pin_project_lite::pin_project! {
    /// A future whose panic, raised while it is polled, is its output (`Err`) instead of
    /// unwinding into the caller. Task, range-lock and buffer guards are released by the unwind
    /// as they are on any early return.
    struct CatchPanic<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchPanic<F> {
    fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.project().inner;
        // A future that panicked is never polled again: its output is the `Err`.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// RESERVATION CONFLICT status, without sense data (SAM-5 5.3.1).
fn conflict() -> Response {
    Response {
        status: Status::RESERVATION_CONFLICT,
        ..Response::default()
    }
}

/// Parse and validate an UNMAP parameter list (SBC-4 5.32.2: an 8-byte header, then 16-byte
/// block descriptors) against the advertised limits and the capacity. Every descriptor is
/// checked before anything is unmapped; descriptors of zero blocks are dropped.
pub(crate) fn parse_unmap(
    p: &[u8],
    limits: &Limits,
    capacity: u64,
) -> Result<Vec<(u64, u64)>, Sense> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    // SBC-4 5.32.1: a non-zero PARAMETER LIST LENGTH below 8 is a parameter list length error.
    if p.len() < 8 {
        return Err(cond::PARAM_LIST_LENGTH_ERROR);
    }
    let bd_len = usize::from(u16::from_be_bytes([
        p.get(2).copied().unwrap_or(0),
        p.get(3).copied().unwrap_or(0),
    ]));
    let avail = p.len() - 8;
    let bd_len = bd_len.min(avail) / 16 * 16;
    let descs = p.get(8..8 + bd_len).unwrap_or(&[]);
    let count = descs.len() / 16;
    if count as u64 > u64::from(limits.max_unmap_descriptors) {
        return Err(Sense::invalid_field_in_param(2, Some(7)));
    }
    let mut ranges = Vec::with_capacity(count);
    let mut total = 0u64;
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let mut lba = [0u8; 8];
        for (dst, src) in lba.iter_mut().zip(d) {
            *dst = *src;
        }
        let mut num = [0u8; 4];
        for (dst, src) in num.iter_mut().zip(d.iter().skip(8)) {
            *dst = *src;
        }
        let (lba, num) = (u64::from_be_bytes(lba), u64::from(u32::from_be_bytes(num)));
        match lba.checked_add(num) {
            Some(end) if end <= capacity => {}
            _ => return Err(cond::LBA_OUT_OF_RANGE),
        }
        total = total.saturating_add(num);
        if total > u64::from(limits.max_unmap_lbas) {
            return Err(Sense::invalid_field_in_param(
                (8 + i * 16 + 8) as u16,
                Some(7),
            ));
        }
        if num > 0 {
            ranges.push((lba, num));
        }
    }
    Ok(ranges)
}

/// Map a block layer error to sense data (exhaustive: a new variant cannot silently become the
/// wrong status). `unsupported` is what the command's standard names when the backend cannot do
/// the operation.
pub(crate) fn block_error(e: BlockError, unsupported: Sense) -> Sense {
    match e {
        BlockError::OutOfRange { .. } => cond::LBA_OUT_OF_RANGE,
        BlockError::Miscompare { offset } => cond::MISCOMPARE_DURING_VERIFY.with_info(offset),
        BlockError::Unsupported => unsupported,
        BlockError::NoSpace => cond::SPACE_ALLOC_FAILED,
        BlockError::ReadFailed(_) => cond::UNRECOVERED_READ_ERROR,
        BlockError::WriteFailed(_) => cond::WRITE_ERROR,
        BlockError::BadBufferLength { .. } | BlockError::Open(_) => cond::INTERNAL_TARGET_FAILURE,
    }
}

/// The response for a command to a LUN that does not exist (SPC-5 4.5.3): INQUIRY data with
/// qualifier 011b, REQUEST SENSE data saying LOGICAL UNIT NOT SUPPORTED, and CHECK CONDITION
/// for everything else.
pub(crate) fn no_such_lun(cmd: &Command) -> Response {
    if cmd.cdb.first() == Some(&0x03) {
        let desc = cmd.cdb.get(1).is_some_and(|b| b & 0x01 != 0);
        let mut d = cond::LUN_NOT_SUPPORTED.encode(desc);
        d.truncate(usize::from(cmd.cdb.get(4).copied().unwrap_or(0)));
        return Response {
            status: Status::GOOD,
            sense: Vec::new(),
            data_in: d,
            data_in_placed: 0,
        };
    }
    if cmd.cdb.first() == Some(&0x12) {
        let evpd = cmd.cdb.get(1).is_some_and(|b| b & 0x01 != 0);
        let mut d = if evpd {
            // The header of the page asked for, with nothing in it.
            vec![0x7F, cmd.cdb.get(2).copied().unwrap_or(0), 0, 0]
        } else {
            inquiry::no_lun()
        };
        let alloc = match cmd.cdb.get(3..5) {
            Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
            _ => 0,
        };
        d.truncate(alloc);
        return Response {
            status: Status::GOOD,
            sense: Vec::new(),
            data_in: d,
            data_in_placed: 0,
        };
    }
    Response {
        status: Status::CHECK_CONDITION,
        sense: cond::LUN_NOT_SUPPORTED.encode(false),
        data_in: Vec::new(),
        data_in_placed: 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use block::driver::mem::MemDriver;

    use super::*;
    use crate::{InitiatorPort, TaskAttr, Transport};

    fn nexus(name: &str) -> Arc<ItNexus> {
        Arc::new(ItNexus {
            initiator: InitiatorPort {
                transport: Transport::Iscsi,
                name: name.into(),
                isid: None,
            },
            target: TargetPort {
                name: "iqn.2024-01.test:t".into(),
                tpgt: 1,
                relative_id: 1,
            },
        })
    }

    const TUR: [u8; 6] = [0x00, 0, 0, 0, 0, 0]; // TEST UNIT READY

    fn tur(n: &Arc<ItNexus>) -> Command {
        Command {
            nexus: n.clone(),
            lun: 0,
            tag: 1,
            attr: TaskAttr::Simple,
            cdb: TUR.to_vec(),
            data_out: IoBuf::default(),
            data_in_len: 0,
            data_in_buf: None,
            arrival: None,
        }
    }

    /// Run TEST UNIT READY until no unit attention is left; its last answer is GOOD.
    async fn ready(lu: &LogicalUnit, n: &Arc<ItNexus>) {
        for _ in 0..8 {
            if let Completion::Done(r) = lu.execute(tur(n)).await {
                if r.status == Status::GOOD {
                    return;
                }
            }
        }
        panic!("unit attentions do not clear");
    }

    /// What ends `b`'s commands in [`received_during`]: `a`'s CLEAR TASK SET, or `a`'s
    /// PREEMPT AND ABORT of `b`'s registration.
    #[derive(Clone, Copy)]
    enum Clearing {
        ClearTaskSet,
        PreemptAndAbort,
    }

    /// Run PERSISTENT RESERVE OUT service action `sa` (byte 1) with TYPE `ty` (byte 2) and
    /// the 24-byte parameter list (SPC-5 6.17.3): RESERVATION KEY `key`, SERVICE ACTION
    /// RESERVATION KEY `sa_key`; GOOD expected.
    async fn pr_out(lu: &LogicalUnit, n: &Arc<ItNexus>, sa: u8, ty: u8, key: u8, sa_key: u8) {
        let mut param = vec![0u8; 24];
        param[7] = key;
        param[15] = sa_key;
        let cmd = Command {
            cdb: vec![0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0],
            data_out: param.into(),
            ..tur(n)
        };
        match lu.execute(cmd).await {
            Completion::Done(r) => assert_eq!(r.status, Status::GOOD, "{r:02x?}"),
            Completion::Aborted => panic!("PERSISTENT RESERVE OUT aborted"),
        }
    }

    /// The state a command received while another nexus's CLEAR TASK SET or PREEMPT AND
    /// ABORT runs must be in afterwards (SAM-5 5.6 with TAS=0): it either runs (it came after
    /// the function), or it is ended and its nexus is told COMMANDS CLEARED BY ANOTHER
    /// INITIATOR (UNIT ATTENTION, 2Fh/00h) before it reports GOOD again. Ended without that,
    /// its initiator waits for it in vain.
    ///
    /// The command is received (`admit`) while the function is paused between its moves of
    /// `cleared` and the epoch that ends the command. `known` says whether the receiving
    /// nexus had been seen before the function started.
    async fn received_during(how: Clearing, known: bool) {
        let lu = Arc::new(LogicalUnit::new(
            Backend::new(Arc::new(MemDriver::new(64 * 512)), 512).unwrap(),
            LuConfig {
                vendor: "SHAREDSK".into(),
                product: "sharedisk".into(),
                revision: "0001".into(),
                serial: "SD0001".into(),
                id: 1,
            },
        ));
        let (a, b) = (nexus("iqn.2024-01.test:a"), nexus("iqn.2024-01.test:b"));
        ready(&lu, &a).await;
        if known {
            ready(&lu, &b).await;
        }
        if let Clearing::PreemptAndAbort = how {
            // REGISTER (service action 00h): a with key 0Ah, b with key 0Bh.
            pr_out(&lu, &a, 0x00, 0x00, 0, 0x0A).await;
            pr_out(&lu, &b, 0x00, 0x00, 0, 0x0B).await;
        }
        let (paused, pause) = std::sync::mpsc::channel();
        *lu.between_moves.lock().unwrap() = Some(Box::new(move || {
            paused.send(()).unwrap();
            // Long enough for the other thread's `admit` to finish, were it not held.
            std::thread::sleep(Duration::from_millis(300));
        }));
        let clearing = {
            let (lu, a) = (lu.clone(), a.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(async {
                        match how {
                            Clearing::ClearTaskSet => lu.clear_task_set(&a).await,
                            // PREEMPT AND ABORT (05h), TYPE 1h (Write Exclusive), of key 0Bh.
                            Clearing::PreemptAndAbort => {
                                pr_out(&lu, &a, 0x05, 0x01, 0x0A, 0x0B).await
                            }
                        }
                    });
            })
        };
        pause.recv_timeout(Duration::from_secs(10)).unwrap();
        let ticket = lu.admit(&b);
        clearing.join().unwrap();
        *lu.between_moves.lock().unwrap() = None;
        let ran = match lu.execute_admitted(tur(&b), Some(ticket)).await {
            Completion::Done(_) => true,
            Completion::Aborted => false,
        };
        // b's unit attentions, in order, until TEST UNIT READY is GOOD (fixed format sense:
        // ASC and ASCQ at bytes 12 and 13).
        let mut told = Vec::new();
        for _ in 0..8 {
            let Completion::Done(r) = lu.execute(tur(&b)).await else {
                panic!("a later command was aborted");
            };
            if r.status == Status::GOOD {
                break;
            }
            told.extend(r.sense.get(12..14).map(|s| (s[0], s[1])));
        }
        assert!(
            ran || told.contains(&(0x2F, 0x00)),
            "a command ended by another's clearing whose nexus is not told: {told:02x?}"
        );
    }

    #[tokio::test]
    async fn a_command_received_while_clear_task_set_runs_runs_or_is_told_cleared() {
        received_during(Clearing::ClearTaskSet, true).await;
    }

    #[tokio::test]
    async fn a_first_command_of_a_new_nexus_received_while_clear_task_set_runs_runs_or_is_told_cleared(
    ) {
        received_during(Clearing::ClearTaskSet, false).await;
    }

    #[tokio::test]
    async fn a_command_received_while_preempt_and_abort_runs_runs_or_is_told_cleared() {
        received_during(Clearing::PreemptAndAbort, true).await;
    }
}
