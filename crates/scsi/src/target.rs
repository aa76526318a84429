//! A SCSI target device: a set of logical units addressed by LUN.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{lu, Command, Completion, ItNexus, LogicalUnit, Response, Status, Tmf, TmfResponse};

/// A SCSI target: LUNs to logical units. The same logical unit may sit in several targets (one
/// per frontend port); it keeps one task set and one reservation state.
#[derive(Default)]
pub struct Target {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
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

    /// Execute one command.
    pub async fn execute(&self, cmd: Command) -> Completion {
        const REPORT_LUNS: u8 = 0xA0;
        if cmd.cdb.first() == Some(&REPORT_LUNS) {
            return Completion::Done(self.report_luns(&cmd));
        }
        match self.luns.get(&cmd.lun) {
            Some(lu) => lu.execute(cmd).await,
            None => Completion::Done(lu::no_such_lun(&cmd)),
        }
    }

    fn report_luns(&self, cmd: &Command) -> Response {
        // SPC-5 6.33: LUN LIST LENGTH, 4 reserved bytes, then 8-byte LUNs (peripheral device
        // addressing for LUNs below 256, flat space addressing above).
        let mut data = Vec::with_capacity(8 + 8 * self.luns.len());
        data.extend_from_slice(&((8 * self.luns.len()) as u32).to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        for &lun in self.luns.keys() {
            let mut entry = [0u8; 8];
            if lun < 256 {
                entry[1] = lun as u8;
            } else {
                entry[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
                entry[1] = lun as u8;
            }
            data.extend_from_slice(&entry);
        }
        let alloc = cmd
            .cdb
            .get(6..10)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        data.truncate(alloc.min(cmd.data_in_len) as usize);
        Response {
            status: Status::GOOD,
            sense: Vec::new(),
            data_in: data,
        }
    }

    /// The number of data-out bytes the CDB asks for (SAM-5's SCSI protocol data transfer
    /// length), so a transport can report residuals for data-out. 0 for commands without
    /// data-out, for unknown LUNs and for CDBs too short to say.
    pub fn data_out_len(&self, lun: u64, cdb: &[u8]) -> u32 {
        self.luns.get(&lun).map_or(0, |lu| lu.data_out_len(cdb))
    }

    /// Run a task management function for `nexus`.
    pub async fn task_management(&self, _nexus: &Arc<ItNexus>, tmf: Tmf) -> TmfResponse {
        match tmf {
            Tmf::AbortTask { lun, .. }
            | Tmf::AbortTaskSet { lun }
            | Tmf::ClearTaskSet { lun }
            | Tmf::LogicalUnitReset { lun }
                if !self.luns.contains_key(&lun) =>
            {
                TmfResponse::IncorrectLun
            }
            _ => TmfResponse::FunctionComplete,
        }
    }

    /// The nexus is gone (session closed, connection lost, guest disconnected).
    pub fn nexus_lost(&self, _nexus: &Arc<ItNexus>) {}
}
