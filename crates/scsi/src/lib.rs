//! SCSI device emulation: SPC-5 / SBC-4 direct-access block devices.
//!
//! Transport-agnostic: a frontend (iSCSI, vhost-user) turns its requests into a [`Command`]
//! carrying the I_T nexus, LUN, CDB and the data-out buffer, hands it to [`Target::execute`], and
//! gets back a [`Completion`]: status, sense data and data-in. Every SCSI-level problem (bad CDB,
//! out of range, I/O error) is a CHECK CONDITION with sense data, never an `Err`.
//!
//! The task set lives here, not in the transport (SAM-5): task management functions
//! ([`Target::task_management`]) abort or drain commands of any nexus on a logical unit, so
//! LOGICAL UNIT RESET and (later) PREEMPT AND ABORT work the same for every frontend.
//!
//! # Layout
//! - [`cdb`]: the opcode table (operation code, service action, CDB usage data, data direction,
//!   reservation class) and the parser that turns bytes into a typed [`cdb::Cdb`]. The table
//!   drives dispatch, REPORT SUPPORTED OPERATION CODES and the reserved-bit checks.
//! - [`sense`]: sense data in fixed and descriptor format, with field pointers.
//! - `lu`: [`LogicalUnit`], the per-command pipeline (task set, unit attention, parse, data-out
//!   length check, reservation check, execute) and the SBC-4 commands.
//! - `inquiry`: standard INQUIRY data, the VPD pages and the advertised [`Limits`].
//! - `mode`: mode pages and MODE SENSE / MODE SELECT.
//! - `task`: the LU task set and the per-nexus unit attention queues.
//! - `target`: [`Target`], REPORT LUNS and task management.
//!
//! # Hot path
//! READ and WRITE take the data-out buffer by value down to the block layer and return the
//! block layer's buffer as data-in. Per command the LU takes two short shard locks (task set in
//! and out) and one read lock (the nexus's unit attention state); none is held across an await.
//! Mode parameters are one atomic byte.

pub mod cdb;
mod inquiry;
mod lu;
mod mode;
mod nexus;
mod order;
pub mod pr;
mod reservations;
pub mod sense;
mod target;
mod task;

pub use block::IoBuf;
pub use inquiry::{naa_bits, Limits};
pub use lu::{LogicalUnit, LuConfig, PhysicalBlockSizeError, Ticket};
pub use nexus::{InitiatorPort, ItNexus, ServedPort, TargetPort, Transport};
pub use order::Arrival;
pub use target::Target;

use std::sync::Arc;

/// SAM-5 status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u8);

impl Status {
    pub const GOOD: Status = Status(0x00);
    pub const CHECK_CONDITION: Status = Status(0x02);
    pub const CONDITION_MET: Status = Status(0x04);
    pub const BUSY: Status = Status(0x08);
    pub const RESERVATION_CONFLICT: Status = Status(0x18);
    pub const TASK_SET_FULL: Status = Status(0x28);
    pub const ACA_ACTIVE: Status = Status(0x30);
    pub const TASK_ABORTED: Status = Status(0x40);
}

/// SAM-5 task attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command as a frontend delivers it, with all data-out already received.
#[derive(Debug)]
pub struct Command {
    /// Who sent it.
    pub nexus: Arc<ItNexus>,
    /// The LUN as the 8-byte SAM LUN structure decoded to a plain number (single level,
    /// peripheral or flat addressing).
    pub lun: u64,
    /// The transport's task tag (iSCSI Initiator Task Tag, virtio-scsi request id).
    pub tag: u64,
    pub attr: TaskAttr,
    /// The CDB, exactly as received (up to 32 bytes for iSCSI with AHS, 16 without).
    pub cdb: Vec<u8>,
    /// Data-out from the initiator; its length is what the transport received (its expected
    /// data transfer length), which may differ from what the CDB asks for
    /// ([`Target::data_out_len`]). On a mismatch (FCP-4 9.4.2) WRITE and WRITE AND VERIFY use
    /// the first CDB-length bytes of a longer buffer, or write only the whole blocks of a
    /// shorter one, and complete normally (the transport reports the residual); a partial
    /// block, and every other command (COMPARE AND WRITE, WRITE SAME, UNMAP, MODE SELECT,
    /// VERIFY), fails with INVALID FIELD IN COMMAND INFORMATION UNIT and writes nothing.
    ///
    /// A vector, or memory the transport lends (vhost-user: the guest's buffers): WRITE and
    /// WRITE AND VERIFY hand it to the block layer as it is, with no copy; other commands copy
    /// their parameter list out of it.
    pub data_out: IoBuf,
    /// The transport's expected data-in length (allocation the initiator provided).
    pub data_in_len: u32,
    /// Memory the transport lends for data-in (vhost-user: the guest's buffers), or `None`.
    /// A READ whose whole transfer fits is read straight into it and reported as
    /// [`Response::data_in_placed`]; every other command answers in [`Response::data_in`].
    pub data_in_buf: Option<IoBuf>,
    /// When the command arrived at its LU, if the transport held it before executing it
    /// ([`Target::arrive`]: an iSCSI write collecting Data-Out, in CmdSN order); `None`: it
    /// arrives when executed. Its task attribute then comes from here, not from `attr`.
    pub arrival: Option<Arrival>,
}

/// The result of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Send this status (and sense, and data-in) to the initiator.
    Done(Response),
    /// The task was aborted by a task management function or another nexus; per SAM-5 the
    /// transport sends no status for it (TAS = 0).
    Aborted,
}

/// Status, sense and data-in of a completed command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub status: Status,
    /// Sense data (fixed or descriptor format), empty when there is none.
    pub sense: Vec<u8>,
    /// Data-in as the command produced it (bounded by the CDB's allocation or transfer length).
    /// The transport sends at most its expected length of it and reports the residual: underflow
    /// when shorter, overflow when longer (RFC 7143 11.4.5).
    pub data_in: Vec<u8>,
    /// Bytes of data-in the command put straight into [`Command::data_in_buf`] (from its
    /// start); `data_in` is then empty.
    pub data_in_placed: usize,
}

impl Default for Status {
    fn default() -> Self {
        Status::GOOD
    }
}

/// SAM-5 task management functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tmf {
    AbortTask { lun: u64, tag: u64 },
    AbortTaskSet { lun: u64 },
    ClearTaskSet { lun: u64 },
    ClearAca { lun: u64 },
    LogicalUnitReset { lun: u64 },
    TargetWarmReset,
    TargetColdReset,
    ItNexusReset,
    QueryTask { lun: u64, tag: u64 },
    QueryTaskSet { lun: u64 },
    QueryAsyncEvent { lun: u64 },
}

/// SAM-5 service responses to a task management function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    FunctionComplete,
    FunctionSucceeded,
    FunctionRejected,
    IncorrectLun,
    /// ABORT TASK for a tag that is not in the task set (already completed or never seen).
    TaskDoesNotExist,
}

/// Entry points for fuzz targets: run the parsers, and whole command sequences, on arbitrary
/// bytes. None of them may panic.
pub mod fuzzing {
    use std::sync::Arc;

    /// An LU on a memory disk of `blocks` blocks of `block_size` bytes, for the fuzzing entry
    /// points of this crate and of the frontends; `None` for a block size the block layer
    /// refuses.
    pub fn memory_lu(
        blocks: u64,
        block_size: u32,
        serial: &str,
    ) -> Option<Arc<crate::LogicalUnit>> {
        let driver = Arc::new(block::driver::mem::MemDriver::new(
            blocks * u64::from(block_size),
        ));
        let backend = block::Backend::new(driver, block_size).ok()?;
        Some(Arc::new(crate::LogicalUnit::new(
            backend,
            crate::LuConfig {
                vendor: "SHAREDSK".into(),
                product: "fuzz".into(),
                revision: "0001".into(),
                serial: serial.into(),
                id: 0x5348_4152_4544_0001,
            },
        )))
    }

    /// An iSCSI I_T nexus of initiator `name` (ISID ending in `isid`) and the fuzz target.
    fn nexus(name: &str, isid: u8) -> crate::ItNexus {
        crate::ItNexus {
            initiator: crate::InitiatorPort {
                transport: crate::Transport::Iscsi,
                name: name.into(),
                isid: Some([0x80, 0, 0, 0, 0, isid]),
            },
            target: crate::TargetPort {
                name: "iqn.2026-01.io.sharedisk:target".into(),
                tpgt: 1,
                relative_id: 1,
            },
        }
    }

    /// Parse `data` as a CDB, compute its data-out length, and run the parameter-list parsers
    /// (MODE SELECT, UNMAP, PERSISTENT RESERVE OUT, TransportIDs) and MODE SENSE page building
    /// on the same bytes.
    pub fn cdb(data: &[u8]) {
        let _ = crate::cdb::parse(data);
        let _ = crate::cdb::data_out_len(data, 512);
        let _ = crate::cdb::data_out_len(data, 4096);
        let flags = data.first().copied().unwrap_or(0) & 0x07;
        let _ = crate::mode::select(false, data, flags, 512);
        let _ = crate::mode::select(true, data, flags, 4096);
        for pc in 0..4 {
            let req = crate::mode::SenseRequest {
                ten: data.get(1).is_some_and(|b| b & 1 != 0),
                dbd: data.get(1).is_some_and(|b| b & 2 != 0),
                llbaa: data.get(1).is_some_and(|b| b & 4 != 0),
                pc,
                page: data.get(2).copied().unwrap_or(0) & 0x3F,
                subpage: data.get(3).copied().unwrap_or(0),
            };
            let _ = crate::mode::sense_data(&req, flags, u64::MAX, 512);
        }
        let limits = crate::Limits::new(
            512,
            block::Capabilities {
                thin: true,
                unmapped_reads_zero: true,
                max_compare_and_write_blocks: 255,
            },
        );
        let _ = crate::lu::parse_unmap(data, &limits, 1 << 20);
        // PERSISTENT RESERVE OUT: the bytes as the parameter list (with CDB fields from its
        // first bytes), against an empty state and against the state it made; and as a
        // TransportID.
        let nexus = nexus("iqn.2026-01.io.sharedisk:fuzz", 1);
        let sa = data.first().copied().unwrap_or(0) & 0x1F;
        let scope_type = data.get(1).copied().unwrap_or(0);
        let state = crate::pr::PrState::default();
        if let Ok(e) =
            crate::pr::out::out(&state, &nexus, sa, scope_type >> 4, scope_type & 0x0F, data)
        {
            let _ = crate::pr::out::out(
                &e.state,
                &nexus,
                sa ^ 1,
                scope_type >> 4,
                scope_type & 0x0F,
                data,
            );
        }
        let _ = crate::pr::transport_id::decode(data, crate::Transport::Iscsi);
    }

    /// Run `data` as a sequence of commands, from two I_T nexuses, against LUs on memory disks
    /// (64 blocks of 512 bytes and 8 of 4096), through the whole dispatcher: CDB checks,
    /// reservations, unit attentions, every executor, the block layer. Each command is
    /// `[flags, cdb_len, cdb.., out_len (2 bytes, big-endian), out.., in_len (2 bytes)]`;
    /// `flags` bit 0 picks the nexus and bit 1 the LU. A panic, or a CHECK CONDITION without
    /// sense data, is a failure.
    pub fn execute(data: &[u8]) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
            return;
        };
        rt.block_on(execute_on(data));
    }

    async fn run_one(
        target: &crate::Target,
        nexus: &Arc<crate::ItNexus>,
        lun: u64,
        tag: u64,
        cdb: Vec<u8>,
        out: Vec<u8>,
        in_len: u32,
    ) {
        let cmd = crate::Command {
            nexus: nexus.clone(),
            lun,
            tag,
            attr: crate::TaskAttr::Simple,
            cdb,
            data_out: out.into(),
            data_in_len: in_len,
            data_in_buf: None,
            arrival: None,
        };
        if let crate::Completion::Done(r) = target.execute(cmd).await {
            assert!(
                r.status != crate::Status::CHECK_CONDITION || r.sense.len() >= 8,
                "CHECK CONDITION without sense data"
            );
        }
    }

    async fn execute_on(data: &[u8]) {
        let mut target = crate::Target::new();
        for (lun, blocks, bs) in [(0u64, 64u64, 512u32), (1, 8, 4096)] {
            let Some(lu) = memory_lu(blocks, bs, "fuzz") else {
                return;
            };
            target.add_lu(lun, lu);
        }
        let nexuses = [
            Arc::new(nexus("iqn.2026-01.io.sharedisk:fuzz-a", 1)),
            Arc::new(nexus("iqn.2026-01.io.sharedisk:fuzz-b", 2)),
        ];
        // The power-on unit attentions first, so that the input's commands reach their
        // executors.
        let mut tag = 0u64;
        for n in &nexuses {
            for lun in 0..2 {
                tag += 1;
                run_one(&target, n, lun, tag, vec![0; 6], Vec::new(), 0).await;
            }
        }
        let mut rest = data;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            head
        };
        while let [flags, cdb_len] = take(2) {
            let (flags, cdb_len) = (*flags, *cdb_len);
            let cdb = take(usize::from(cdb_len % 33)).to_vec();
            let out_len = match take(2) {
                [a, b] => usize::from(u16::from_be_bytes([*a, *b])),
                _ => 0,
            };
            let out = take(out_len).to_vec();
            let in_len = match take(2) {
                [a, b] => u32::from(u16::from_be_bytes([*a, *b])),
                _ => 0,
            };
            tag += 1;
            let n = &nexuses[usize::from(flags & 1)];
            run_one(
                &target,
                n,
                u64::from((flags >> 1) & 1),
                tag,
                cdb,
                out,
                in_len,
            )
            .await;
        }
    }
}
