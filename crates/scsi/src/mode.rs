//! Mode parameters (SPC-5 7.5, SBC-4 6.5): the caching, control and informational-exceptions
//! pages, MODE SENSE(6/10) data and MODE SELECT(6/10) parameter lists.
//!
//! The changeable state is three bits (WCE, D_SENSE, SWP) kept in one atomic byte per LU, so the
//! hot path reads it without a lock. Every other field is fixed; MODE SELECT accepts a page only
//! when its unchangeable fields equal the current values (SPC-5 6.11: otherwise INVALID FIELD IN
//! PARAMETER LIST, pointing at the first differing byte).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::sense::{cond, Sense};

/// Caching page: write cache enabled.
pub const WCE: u8 = 0x01;
/// Control page: descriptor format sense data.
pub const D_SENSE: u8 = 0x02;
/// Control page: software write protect.
pub const SWP: u8 = 0x04;

/// Power-on values: write cache on, fixed sense, writable.
pub const DEFAULT: u8 = WCE;

/// SPC-5 6.13 / 7.5.2: PAGE CONTROL field values.
pub const PC_CURRENT: u8 = 0;
pub const PC_CHANGEABLE: u8 = 1;
pub const PC_DEFAULT: u8 = 2;
pub const PC_SAVED: u8 = 3;

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFO_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;

/// The mode state of one LU.
#[derive(Debug)]
pub struct ModeState(AtomicU8);

impl Default for ModeState {
    fn default() -> Self {
        ModeState(AtomicU8::new(DEFAULT))
    }
}

impl ModeState {
    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
    pub fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release);
    }
    /// Replace the state with `f(current)` as one step: if another MODE SELECT changed it
    /// between the read and the write, `f` runs again on what that one left, so neither
    /// change is lost. Returns (old, new).
    pub fn update(&self, mut f: impl FnMut(u8) -> Result<u8, Sense>) -> Result<(u8, u8), Sense> {
        let mut old = self.get();
        loop {
            let new = f(old)?;
            match self
                .0
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok((old, new)),
                Err(now) => old = now,
            }
        }
    }
    pub fn reset(&self) {
        self.set(DEFAULT);
    }
}

/// One mode page as MODE SENSE returns it for `pc` (`flags` = current values).
fn page(code: u8, pc: u8, flags: u8) -> Vec<u8> {
    let (changeable, values) = match pc {
        PC_CHANGEABLE => (true, 0),
        PC_DEFAULT => (false, DEFAULT),
        _ => (false, flags),
    };
    match code {
        CACHING => {
            // SBC-4 7.5.5: page length 12h. Byte 2 bit 2 WCE.
            let mut p = vec![0u8; 20];
            p[0] = CACHING;
            p[1] = 0x12;
            if changeable || values & WCE != 0 {
                p[2] |= 0x04;
            }
            p
        }
        CONTROL => {
            // SPC-5 7.5.8: page length 0Ah.
            let mut p = vec![0u8; 12];
            p[0] = CONTROL;
            p[1] = 0x0A;
            if changeable || values & D_SENSE != 0 {
                p[2] |= 0x04; // D_SENSE
            }
            if changeable || values & SWP != 0 {
                p[4] |= 0x08; // SWP
            }
            if !changeable {
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1h: unrestricted reordering
                p[8] = 0xFF; // BUSY TIMEOUT PERIOD: unlimited
                p[9] = 0xFF;
            }
            p
        }
        _ => {
            // SPC-5 7.5.12: informational exceptions control page, length 0Ah; DEXCPT set
            // (no informational exception reporting).
            let mut p = vec![0u8; 12];
            p[0] = INFO_EXCEPTIONS;
            p[1] = 0x0A;
            if !changeable {
                p[2] = 0x08;
            }
            p
        }
    }
}

/// The parameters of a MODE SENSE command.
#[derive(Debug, Clone, Copy)]
pub struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
}

/// Build MODE SENSE data (SPC-5 6.13/6.14, 7.5.4-7.5.6).
pub fn sense_data(
    req: &SenseRequest,
    flags: u8,
    capacity: u64,
    block_size: u32,
) -> Result<Vec<u8>, Sense> {
    if req.pc == PC_SAVED {
        return Err(cond::SAVING_NOT_SUPPORTED);
    }
    let codes: &[u8] = match (req.page, req.subpage) {
        (ALL_PAGES, 0x00 | 0xFF) => &[CACHING, CONTROL, INFO_EXCEPTIONS],
        // SPC-5 table "Mode page code usage": subpage FFh asks for every subpage of the
        // page; these pages have only subpage 00h.
        (CACHING, 0x00 | 0xFF) => &[CACHING],
        (CONTROL, 0x00 | 0xFF) => &[CONTROL],
        (INFO_EXCEPTIONS, 0x00 | 0xFF) => &[INFO_EXCEPTIONS],
        (CACHING | CONTROL | INFO_EXCEPTIONS | ALL_PAGES, _) => {
            return Err(Sense::invalid_field_in_cdb(3, 7))
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, 5)),
    };
    let hdr_len = if req.ten { 8 } else { 4 };
    let mut d = vec![0u8; hdr_len];
    // Device-specific parameter (SBC-4 6.5.1): WP, DPOFUA.
    let dsp = 0x10 | if flags & SWP != 0 { 0x80 } else { 0 };
    if req.ten {
        d[3] = dsp;
    } else {
        d[2] = dsp;
    }
    if !req.dbd {
        if req.ten && req.llbaa {
            // SPC-5 7.5.6.3 long LBA block descriptor.
            d[4] = 0x01; // LONGLBA
            d.extend_from_slice(&capacity.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&block_size.to_be_bytes());
            d[7] = 16;
        } else {
            // SBC-4 6.5.2 short LBA block descriptor; FFFFFFFFh when the count does not fit.
            let n = u32::try_from(capacity).unwrap_or(u32::MAX);
            d.extend_from_slice(&n.to_be_bytes());
            let bl = block_size.to_be_bytes();
            d.extend_from_slice(&[0, bl[1], bl[2], bl[3]]);
            if req.ten {
                d[7] = 8;
            } else {
                d[3] = 8;
            }
        }
    }
    for &c in codes {
        d.extend_from_slice(&page(c, req.pc, flags));
    }
    if req.ten {
        let len = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        d[0] = (d.len() - 1) as u8;
    }
    Ok(d)
}

/// Validate a MODE SELECT parameter list against the current `flags` and return the new flags.
/// `ten` selects the 8-byte header of MODE SELECT(10).
pub fn select(ten: bool, data: &[u8], flags: u8, block_size: u32) -> Result<u8, Sense> {
    if data.is_empty() {
        return Ok(flags);
    }
    let hdr_len = if ten { 8 } else { 4 };
    let header = data.get(..hdr_len).ok_or(cond::PARAM_LIST_LENGTH_ERROR)?;
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([
            header.get(6).copied().unwrap_or(0),
            header.get(7).copied().unwrap_or(0),
        ]))
    } else {
        usize::from(header.get(3).copied().unwrap_or(0))
    };
    let long = ten && header.get(4).is_some_and(|b| b & 0x01 != 0);
    let bd_end = hdr_len
        .checked_add(bd_len)
        .ok_or(cond::PARAM_LIST_LENGTH_ERROR)?;
    let bds = data
        .get(hdr_len..bd_end)
        .ok_or(cond::PARAM_LIST_LENGTH_ERROR)?;
    // Block descriptors: only the current logical block length is accepted. SBC-4 6.5.2:
    // the short descriptor's LOGICAL BLOCK LENGTH is bytes 5-7 after a reserved byte 4; the
    // long one's is bytes 12-15.
    let (bd_size, bl_off) = if long { (16, 12) } else { (8, 5) };
    if bds.len() % bd_size != 0 {
        return Err(Sense::invalid_field_in_param(
            if ten { 6 } else { 3 } as u16,
            Some(7),
        ));
    }
    for (i, bd) in bds.chunks(bd_size).enumerate() {
        let reserved = if long {
            0
        } else {
            bd.get(4).copied().unwrap_or(0)
        };
        if reserved != 0 {
            let at = hdr_len + i * bd_size + 4;
            let bit = 7 - reserved.leading_zeros() as u8;
            return Err(Sense::invalid_field_in_param(at as u16, Some(bit)));
        }
        let bl = bd.get(bl_off..bd_size).unwrap_or(&[]);
        let mut v = 0u32;
        for &b in bl {
            v = (v << 8) | u32::from(b);
        }
        if v != block_size && v != 0 {
            let at = hdr_len + i * bd_size + bl_off;
            return Err(Sense::invalid_field_in_param(at as u16, Some(7)));
        }
    }
    let mut new = flags;
    let mut off = bd_end;
    while off < data.len() {
        if off + 2 > data.len() {
            // SPC-5 6.11: a page cut short of its PAGE LENGTH byte is a truncated page.
            return Err(cond::PARAM_LIST_LENGTH_ERROR);
        }
        let code_byte = data.get(off).copied().unwrap_or(0);
        if code_byte & 0x40 != 0 {
            // SPF: no subpages are implemented.
            return Err(Sense::invalid_field_in_param(off as u16, Some(6)));
        }
        let code = code_byte & 0x3F;
        if !matches!(code, CACHING | CONTROL | INFO_EXCEPTIONS) {
            return Err(Sense::invalid_field_in_param(off as u16, Some(5)));
        }
        let current = page(code, PC_CURRENT, flags);
        let changeable = page(code, PC_CHANGEABLE, flags);
        let len = usize::from(data.get(off + 1).copied().unwrap_or(0)) + 2;
        if len != current.len() {
            return Err(Sense::invalid_field_in_param((off + 1) as u16, Some(7)));
        }
        let p = data
            .get(off..off + len)
            .ok_or(cond::PARAM_LIST_LENGTH_ERROR)?;
        // Byte 0 carries PS (reserved in MODE SELECT) and the page code; compare from byte 2.
        for i in 2..len {
            let (Some(&v), Some(&c), Some(&m)) = (p.get(i), current.get(i), changeable.get(i))
            else {
                break;
            };
            let diff = (v ^ c) & !m;
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(Sense::invalid_field_in_param((off + i) as u16, Some(bit)));
            }
        }
        let byte = |i: usize| p.get(i).copied().unwrap_or(0);
        match code {
            CACHING => new = set_bit(new, WCE, byte(2) & 0x04 != 0),
            CONTROL => {
                new = set_bit(new, D_SENSE, byte(2) & 0x04 != 0);
                new = set_bit(new, SWP, byte(4) & 0x08 != 0);
            }
            _ => {}
        }
        off += len;
    }
    Ok(new)
}

fn set_bit(flags: u8, bit: u8, on: bool) -> u8 {
    if on {
        flags | bit
    } else {
        flags & !bit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_raced_by_another_keeps_both_changes() {
        let state = ModeState(AtomicU8::new(WCE));
        let mut calls = 0;
        // This MODE SELECT sets D_SENSE; on its first attempt another one clears WCE between
        // the read and the write.
        let (old, new) = state
            .update(|old| {
                calls += 1;
                if calls == 1 {
                    state.set(old & !WCE);
                }
                Ok(old | D_SENSE)
            })
            .expect("no error");
        assert_eq!(calls, 2, "the raced attempt is redone");
        assert_eq!((old, new), (0, D_SENSE));
        assert_eq!(state.get(), D_SENSE, "WCE stays cleared, D_SENSE set");
    }

    #[test]
    fn a_refused_update_changes_nothing() {
        let state = ModeState(AtomicU8::new(WCE));
        let e = state.update(|_| Err(cond::PARAM_LIST_LENGTH_ERROR));
        assert!(e.is_err());
        assert_eq!(state.get(), WCE);
    }
}
