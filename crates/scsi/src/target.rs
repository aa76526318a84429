//! A SCSI target device: a set of logical units addressed by LUN, REPORT LUNS (answered by the
//! target, SPC-5 6.33) and task management (SAM-5 7).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cdb::{self, Cdb};
use crate::sense::{cond, Sense};
use crate::{lu, Command, Completion, ItNexus, LogicalUnit, Response, Status, Tmf, TmfResponse};

/// A SCSI target: LUNs to logical units. The same logical unit may sit in several targets (one
/// per frontend port); it keeps one task set and one reservation state.
#[derive(Default)]
pub struct Target {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

/// REPORT LUNS parameter data (SPC-5 6.33): LUN LIST LENGTH, 4 reserved bytes, then 8-byte LUNs
/// (peripheral device addressing below 256, flat space addressing above).
pub(crate) fn report_luns(
    select: u8,
    alloc: u32,
    luns: impl Iterator<Item = u64>,
) -> Result<Vec<u8>, Sense> {
    // SPC-5 6.33: SELECT REPORT 00h, 01h (well known: none), 02h, 10h-12h.
    if !matches!(select, 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
        return Err(Sense::invalid_field_in_cdb(2, 7));
    }
    // SPC-5 6.33: the allocation length "should be at least 16"; a shorter one gets the
    // report truncated (4.2.5.6), its LUN LIST LENGTH unchanged. (SPC-3 refused it.)
    let mut data = vec![0u8; 8];
    // 01h asks for well known LUs and 10h-12h for administrative LUs and their subsidiaries
    // (conglomerates): this target has neither.
    if matches!(select, 0x00 | 0x02) {
        for lun in luns {
            let mut entry = [0u8; 8];
            if lun < 256 {
                entry[1] = lun as u8;
            } else {
                entry[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
                entry[1] = lun as u8;
            }
            data.extend_from_slice(&entry);
        }
    }
    let len = (data.len() - 8) as u32;
    data[0..4].copy_from_slice(&len.to_be_bytes());
    data.truncate(alloc as usize);
    Ok(data)
}

impl Target {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `lu` as `lun`. Replaces any LU already there.
    pub fn add_lu(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }

    /// The logical unit at `lun`.
    pub fn lu(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// The LUNs in ascending order.
    pub fn luns(&self) -> impl Iterator<Item = u64> + '_ {
        self.luns.keys().copied()
    }

    /// Execute one command, as received now.
    pub async fn execute(&self, cmd: Command) -> Completion {
        self.execute_admitted(cmd, None).await
    }

    /// A ticket for a command of `nexus` to `lun` that the transport has just received;
    /// `None` for a LUN that does not exist. See [`crate::Ticket`].
    pub fn admit(&self, nexus: &Arc<ItNexus>, lun: u64) -> Option<crate::Ticket> {
        self.luns.get(&lun).map(|lu| lu.admit(nexus))
    }

    /// A command to `lun` with task attribute `attr` that the transport holds before
    /// executing it arrives now (see [`LogicalUnit::arrive`]); `None` for a LUN that does not
    /// exist.
    pub fn arrive(
        &self,
        nexus: &Arc<ItNexus>,
        lun: u64,
        ticket: Option<&crate::Ticket>,
        attr: crate::TaskAttr,
    ) -> Option<crate::Arrival> {
        self.luns.get(&lun).map(|lu| lu.arrive(nexus, ticket, attr))
    }

    /// Whether task management has ended the command of `nexus` for `lun` that the transport
    /// took `ticket` for with [`Self::admit`] (see [`LogicalUnit::ticket_ended`]).
    pub fn ticket_ended(&self, nexus: &Arc<ItNexus>, lun: u64, ticket: &crate::Ticket) -> bool {
        self.luns
            .get(&lun)
            .is_some_and(|lu| lu.ticket_ended(nexus, ticket))
    }

    /// Execute a command received earlier, when the transport took `ticket` with
    /// [`Self::admit`]: task management that ended it in between makes it
    /// [`Completion::Aborted`].
    pub async fn execute_admitted(
        &self,
        cmd: Command,
        ticket: Option<crate::Ticket>,
    ) -> Completion {
        const REPORT_LUNS: u8 = 0xA0;
        const REQUEST_SENSE: u8 = 0x03;
        let opcode = cmd.cdb.first().copied();
        if opcode == Some(REPORT_LUNS) {
            return Completion::Done(self.report_luns(&cmd));
        }
        let Some(lu) = self.luns.get(&cmd.lun) else {
            return Completion::Done(lu::no_such_lun(&cmd));
        };
        let (nexus, lun) = (cmd.nexus.clone(), cmd.lun);
        let done = lu.execute_admitted(cmd, ticket).await;
        // SPC-5 7.7.7, LUICLR=1 (Extended INQUIRY Data page): REPORTED LUNS DATA HAS CHANGED
        // reported through one LU of the target is cleared on its other LUs for the nexus.
        // Reported with CHECK CONDITION, or by REQUEST SENSE in its data (status GOOD).
        if let Completion::Done(r) = &done {
            let changed = &cond::REPORTED_LUNS_CHANGED;
            let reported = match r.status {
                Status::CHECK_CONDITION => Some(&r.sense[..]),
                Status::GOOD if opcode == Some(REQUEST_SENSE) => Some(&r.data_in[..]),
                _ => None,
            };
            if reported.and_then(Sense::code_of) == Some((changed.key, changed.asc, changed.ascq)) {
                for (_, other) in self.luns.iter().filter(|(&l, _)| l != lun) {
                    other.clear_reported_luns_changed(&nexus);
                }
            }
        }
        done
    }

    /// A frontend did not deliver `resp`, the answer to `nexus`'s command to `lun`: task
    /// management ended the command's task after it had completed, and no status goes out for
    /// an ended task. A unit attention the answer reported is pending again: it was never
    /// reported (SAM-5 5.14).
    ///
    /// `opcode`: the command's operation code (REQUEST SENSE reports a unit attention in its
    /// data, with status GOOD). REPORTED LUNS DATA HAS CHANGED, which reporting clears on every
    /// LU of the target (LUICLR=1), is pending again on all of them.
    pub fn undelivered(&self, nexus: &ItNexus, lun: u64, opcode: Option<u8>, resp: &Response) {
        const UNIT_ATTENTION: u8 = 0x06;
        const REQUEST_SENSE: u8 = 0x03;
        let reported = match resp.status {
            Status::CHECK_CONDITION => &resp.sense[..],
            Status::GOOD if opcode == Some(REQUEST_SENSE) => &resp.data_in[..],
            _ => return,
        };
        let Some((key, asc, ascq)) = Sense::code_of(reported) else {
            return;
        };
        if key != UNIT_ATTENTION {
            return;
        }
        let changed = &cond::REPORTED_LUNS_CHANGED;
        let everywhere = (asc, ascq) == (changed.asc, changed.ascq);
        for (_, lu) in self.luns.iter().filter(|(&l, _)| everywhere || l == lun) {
            lu.put_back_unit_attention(nexus, Sense::new(key, asc, ascq));
        }
    }

    fn report_luns(&self, cmd: &Command) -> Response {
        // Sense format follows the addressed LU's control page when it exists.
        let descriptor = self
            .luns
            .get(&cmd.lun)
            .is_some_and(|lu| lu.descriptor_sense());
        let out = match cdb::parse(&cmd.cdb) {
            Ok((_, Cdb::ReportLuns { select, alloc })) => report_luns(select, alloc, self.luns()),
            Ok(_) => Err(cond::INVALID_OPCODE),
            Err(s) => Err(s),
        };
        match out {
            Ok(data_in) => Response {
                status: Status::GOOD,
                sense: Vec::new(),
                data_in,
                data_in_placed: 0,
            },
            Err(s) => Response {
                status: Status::CHECK_CONDITION,
                sense: s.encode(descriptor),
                data_in: Vec::new(),
                data_in_placed: 0,
            },
        }
    }

    /// The number of data-out bytes the CDB asks for (SAM-5's SCSI protocol data transfer
    /// length), so a transport can report residuals for data-out. 0 for commands without
    /// data-out, for unknown LUNs and for CDBs too short to say.
    pub fn data_out_len(&self, lun: u64, cdb: &[u8]) -> u32 {
        self.luns.get(&lun).map_or(0, |lu| lu.data_out_len(cdb))
    }

    /// The number of bytes of medium data a READ (6/10/12/16) asks for; 0 for other commands,
    /// unknown LUNs, CDBs too short to say, and READs beyond the LU's MAXIMUM TRANSFER LENGTH
    /// (refused before they read anything: SBC-4 6.6.4).
    pub fn read_len(&self, lun: u64, cdb: &[u8]) -> u64 {
        self.luns.get(&lun).map_or(0, |lu| lu.read_len(cdb))
    }

    /// Whether the command `cdb` for `lun` is refused by its CDB alone, before any data-out
    /// is used (see [`LogicalUnit::refuses_cdb`]); also for a LUN with no LU, which answers
    /// LOGICAL UNIT NOT SUPPORTED. A transport need not collect its data-out.
    pub fn refuses_cdb(&self, lun: u64, cdb: &[u8]) -> bool {
        self.luns.get(&lun).is_none_or(|lu| lu.refuses_cdb(cdb))
    }

    /// Run a task management function for `nexus` (SAM-5 7). Functions that abort tasks return
    /// only once every aborted task that had started is finished, so nothing an aborted command
    /// wrote lands after the response.
    pub async fn task_management(&self, nexus: &Arc<ItNexus>, tmf: Tmf) -> TmfResponse {
        let lu = |lun: u64| self.luns.get(&lun);
        match tmf {
            Tmf::AbortTask { lun, tag } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) => {
                    if lu.abort_task(nexus, tag).await {
                        TmfResponse::FunctionComplete
                    } else {
                        TmfResponse::TaskDoesNotExist
                    }
                }
            },
            Tmf::AbortTaskSet { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) => {
                    lu.abort_task_set(nexus).await;
                    TmfResponse::FunctionComplete
                }
            },
            Tmf::ClearTaskSet { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) => {
                    lu.clear_task_set(nexus).await;
                    TmfResponse::FunctionComplete
                }
            },
            // No ACA support (NORMACA=0): SAM-5 7.3.
            Tmf::ClearAca { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(_) => TmfResponse::FunctionRejected,
            },
            Tmf::LogicalUnitReset { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) => {
                    // SAM-5 6.3.5: the UA goes to every I_T nexus, the requester's included
                    // (libiscsi's multipath reset test checks every path).
                    lu.reset(cond::BUS_DEVICE_RESET).await;
                    TmfResponse::FunctionComplete
                }
            },
            Tmf::TargetWarmReset | Tmf::TargetColdReset => {
                // SAM-5 6.3.3/6.3.4: every LU is reset; every nexus gets POWER ON, RESET, OR
                // BUS DEVICE RESET OCCURRED.
                // Every LU's tasks end before the wait for any of them.
                let resets: Vec<_> = self
                    .luns
                    .values()
                    .map(|lu| lu.reset(cond::POWER_ON_RESET))
                    .collect();
                for r in resets {
                    r.await;
                }
                TmfResponse::FunctionComplete
            }
            Tmf::ItNexusReset => {
                let resets: Vec<_> = self.luns.values().map(|lu| lu.nexus_reset(nexus)).collect();
                for r in resets {
                    r.await;
                }
                TmfResponse::FunctionComplete
            }
            Tmf::QueryTask { lun, tag } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) if lu.query_task(nexus, tag) => TmfResponse::FunctionSucceeded,
                Some(_) => TmfResponse::FunctionComplete,
            },
            Tmf::QueryTaskSet { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) if lu.query_task_set(nexus) => TmfResponse::FunctionSucceeded,
                Some(_) => TmfResponse::FunctionComplete,
            },
            Tmf::QueryAsyncEvent { lun } => match lu(lun) {
                None => TmfResponse::IncorrectLun,
                Some(lu) if lu.query_async_event(nexus) => TmfResponse::FunctionSucceeded,
                Some(_) => TmfResponse::FunctionComplete,
            },
        }
    }

    /// The nexus is gone (session closed, connection lost, guest disconnected): its tasks are
    /// aborted (SAM-5 6.3.4: I_T nexus loss), and when a nexus of the same name comes back,
    /// each LU that had seen it first reports I_T NEXUS LOSS OCCURRED (29h/07h) to it.
    pub fn nexus_lost(&self, nexus: &Arc<ItNexus>) {
        for lu in self.luns.values() {
            lu.nexus_lost(nexus);
        }
    }

    /// [`Self::nexus_lost`] for a transport that lets the same I_T nexus come back at once
    /// (iSCSI session reinstatement, RFC 7143 6.3.5): it returns only when no command of the
    /// lost nexus is running or can still start, so none of its writes lands after one of the
    /// next session's. Not bounded: a late write would be wrong whenever it came.
    pub async fn end_nexus(&self, nexus: &Arc<ItNexus>) {
        for lu in self.luns.values() {
            lu.end_nexus(nexus).await;
        }
    }
}
