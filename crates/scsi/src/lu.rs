//! A logical unit: a direct-access block device over a [`block::Backend`].

use block::{Backend, BlockError};

use crate::{Command, Completion, Response, Status};

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
}

impl LogicalUnit {
    pub fn new(backend: Backend, config: LuConfig) -> Self {
        Self { backend, config }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// See [`crate::Target::data_out_len`].
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        let bs = self.backend.block_size();
        match (cdb.first(), cdb.len()) {
            (Some(0x2A), 10..) => u32::from(u16::from_be_bytes([cdb[7], cdb[8]])) * bs,
            (Some(0x8A), 16..) => {
                u32::from_be_bytes([cdb[10], cdb[11], cdb[12], cdb[13]]).saturating_mul(bs)
            }
            _ => 0,
        }
    }

    /// Execute one command addressed to this LU.
    pub async fn execute(&self, cmd: Command) -> Completion {
        Completion::Done(self.run(&cmd).await)
    }

    async fn run(&self, cmd: &Command) -> Response {
        let cdb = &cmd.cdb;
        let Some(&op) = cdb.first() else {
            return check(0x05, 0x20, 0x00);
        };
        let need = match op {
            0x28 | 0x2A => 10,
            0x88 | 0x8A | 0x9E => 16,
            0x12 | 0x00 => 6,
            0x25 => 10,
            _ => 0,
        };
        if cdb.len() < need {
            return check(0x05, 0x24, 0x00);
        }
        let be32 = |i: usize| u32::from_be_bytes([cdb[i], cdb[i + 1], cdb[i + 2], cdb[i + 3]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        match op {
            0x00 => good(Vec::new()),
            0x12 => {
                let mut d = vec![0u8; 36];
                d[2] = 0x06; // SPC-4
                d[3] = 0x02;
                d[4] = 31;
                d[7] = 0x02; // CMDQUE
                pad(&mut d[8..16], &self.config.vendor);
                pad(&mut d[16..32], &self.config.product);
                pad(&mut d[32..36], &self.config.revision);
                let alloc = u16::from_be_bytes([cdb[3], cdb[4]]) as usize;
                d.truncate(alloc);
                good(d)
            }
            0x25 => {
                let last = self
                    .backend
                    .capacity()
                    .saturating_sub(1)
                    .min(u64::from(u32::MAX));
                let mut d = (last as u32).to_be_bytes().to_vec();
                d.extend_from_slice(&self.backend.block_size().to_be_bytes());
                good(d)
            }
            0x9E if cdb[1] & 0x1f == 0x10 => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&self.backend.capacity().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&self.backend.block_size().to_be_bytes());
                d.truncate(be32(10) as usize);
                good(d)
            }
            0x28 | 0x88 => {
                let (lba, len) = if op == 0x28 {
                    (
                        u64::from(be32(2)),
                        u32::from(u16::from_be_bytes([cdb[7], cdb[8]])),
                    )
                } else {
                    (be64(2), be32(10))
                };
                match self.backend.read(lba, len).await {
                    Ok(d) => good(d),
                    Err(e) => error(&e),
                }
            }
            0x2A | 0x8A => {
                let (lba, len) = if op == 0x2A {
                    (
                        u64::from(be32(2)),
                        u32::from(u16::from_be_bytes([cdb[7], cdb[8]])),
                    )
                } else {
                    (be64(2), be32(10))
                };
                let bytes = u64::from(len) * u64::from(self.backend.block_size());
                if cmd.data_out.len() as u64 != bytes {
                    return check(0x05, 0x0E, 0x03);
                }
                match self
                    .backend
                    .write(lba, cmd.data_out.clone(), cdb[1] & 0x08 != 0)
                    .await
                {
                    Ok(()) => good(Vec::new()),
                    Err(e) => error(&e),
                }
            }
            _ => check(0x05, 0x20, 0x00),
        }
    }
}

fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = c;
    }
}

fn good(data_in: Vec<u8>) -> Response {
    Response {
        status: Status::GOOD,
        sense: Vec::new(),
        data_in,
    }
}

/// CHECK CONDITION with fixed-format sense (SPC-5 4.4.3).
fn check(key: u8, asc: u8, ascq: u8) -> Response {
    let mut sense = vec![0u8; 18];
    sense[0] = 0x70;
    sense[2] = key;
    sense[7] = 10;
    sense[12] = asc;
    sense[13] = ascq;
    Response {
        status: Status::CHECK_CONDITION,
        sense,
        data_in: Vec::new(),
    }
}

fn error(e: &BlockError) -> Response {
    match e {
        BlockError::OutOfRange { .. } => check(0x05, 0x21, 0x00),
        BlockError::ReadFailed(_) => check(0x03, 0x11, 0x00),
        _ => check(0x03, 0x0C, 0x00),
    }
}

/// The response for a command to a LUN that does not exist (SPC-5 4.5.3).
pub(crate) fn no_such_lun(cmd: &Command) -> Response {
    if cmd.cdb.first() == Some(&0x12) {
        // INQUIRY: peripheral qualifier 011b, device type 1Fh.
        let mut d = vec![0u8; 36];
        d[0] = 0x7f;
        d[2] = 0x06;
        d[3] = 0x02;
        d[4] = 31;
        d.truncate(cmd.data_in_len as usize);
        return good(d);
    }
    check(0x05, 0x25, 0x00)
}
