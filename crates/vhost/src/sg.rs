//! A descriptor chain split into its device-readable and device-writable parts, and checked
//! copies between those scatter-gather lists and host buffers.
//!
//! Every access goes through vm-memory's checked `read_slice` / `write_slice`: an address or
//! length outside the guest's memory is an error, never an access outside it.

use std::ops::Deref;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Why a descriptor chain cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A device-readable descriptor follows a device-writable one (virtio 2.7.4.2).
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A copy touched an address the guest's memory does not have.
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    /// The chain is shorter than the copy.
    #[error("the descriptors are shorter than needed")]
    TooShort,
    /// The chain has more than [`MAX_DESCRIPTORS`] descriptors.
    #[error("the chain has more descriptors than seg_max allows")]
    TooManyDescriptors,
}

/// Most descriptors a chain may have: the request and response headers and the `seg_max`
/// data segments the device's configuration announces (`seg_max` = this - 2), as QEMU's own
/// limit (VIRTQUEUE_MAX_SIZE). An indirect table may hold 65,535 entries (virtio 2.7.5.3);
/// without a limit, one small table shared by every chain would make each request cost
/// megabytes of segment lists.
pub const MAX_DESCRIPTORS: usize = 1024;

/// A list of guest memory segments, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sg {
    segs: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Sg {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.segs.push((addr, len));
            self.len += u64::from(len);
        }
    }

    /// Visit the pieces of `[offset, offset + count)`: `f(address, start in the caller's
    /// buffer, length)`.
    fn walk(
        &self,
        offset: u64,
        count: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let end = offset
            .checked_add(count as u64)
            .ok_or(ChainError::TooShort)?;
        if end > self.len {
            return Err(ChainError::TooShort);
        }
        let mut pos = 0u64; // start of the current segment within the list
        let mut done = 0usize; // bytes of the caller's buffer handled
        for &(addr, len) in &self.segs {
            if done == count {
                break;
            }
            let seg_end = pos + u64::from(len);
            if seg_end > offset + done as u64 {
                let skip = offset + done as u64 - pos;
                let n = ((u64::from(len) - skip) as usize).min(count - done);
                let at = addr.checked_add(skip).ok_or(ChainError::OutOfMemory)?;
                f(at, done, n)?;
                done += n;
            }
            pos = seg_end;
        }
        if done == count {
            Ok(())
        } else {
            Err(ChainError::TooShort)
        }
    }

    /// Copy `buf.len()` bytes from `offset` in the list into `buf`.
    pub fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let count = buf.len();
        self.walk(offset, count, |addr, start, n| {
            let dst = buf.get_mut(start..start + n).ok_or(ChainError::TooShort)?;
            mem.read_slice(dst, addr)
                .map_err(|_| ChainError::OutOfMemory)
        })
    }

    /// Copy `buf` to `offset` in the list.
    pub fn write_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        self.walk(offset, buf.len(), |addr, start, n| {
            let src = buf.get(start..start + n).ok_or(ChainError::TooShort)?;
            mem.write_slice(src, addr)
                .map_err(|_| ChainError::OutOfMemory)
        })
    }
}

impl Sg {
    /// `[offset, offset + count)` of the list lent to the block layer as it is: pointers into
    /// the guest's memory as this process maps it, kept mapped by the `Arc` of `mem` the buffer
    /// holds (see `scsi::IoBuf`). `None` when a piece is not in guest memory; the copying path
    /// then meets the same range and reports it.
    pub fn lend(
        &self,
        mem: &Arc<GuestMemoryMmap<()>>,
        offset: u64,
        count: usize,
    ) -> Option<scsi::IoBuf> {
        let mut segs = Vec::with_capacity(self.segs.len());
        let mut ok = true;
        let walked = self.walk(offset, count, |addr, _, n| {
            let mut got = 0usize;
            for slice in GuestMemoryBackend::get_slices(&**mem, addr, n) {
                let Ok(slice) = slice else {
                    ok = false;
                    break;
                };
                got += slice.len();
                segs.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
            }
            ok &= got == n;
            Ok(())
        });
        if walked.is_err() || !ok {
            return None;
        }
        let owner: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
        // SAFETY: every segment is a range vm-memory checked to lie inside one region of
        // `mem`'s mappings; those stay mapped while an `Arc` of `mem` lives, and the buffer
        // holds one. The memory is only accessed through raw pointers (it is shared with the
        // guest).
        Some(unsafe { scsi::IoBuf::lent(segs, owner) })
    }
}

/// Split a chain into its device-readable and device-writable descriptors. The chain
/// iterator follows indirect tables and stops at a loop, a nested indirect table or a chain
/// longer than 2^32 bytes (what it yielded so far is used, and the length checks of the
/// caller then refuse a request that does not fit). A chain of more than
/// [`MAX_DESCRIPTORS`] is refused.
pub fn split<M>(chain: DescriptorChain<M>) -> Result<(Sg, Sg), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable = Sg::default();
    let mut writable = Sg::default();
    let mut seen_writable = false;
    for (i, desc) in chain.enumerate() {
        if i == MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            seen_writable = true;
            writable.push(desc.addr(), desc.len());
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            readable.push(desc.addr(), desc.len());
        }
    }
    Ok((readable, writable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn copies_across_segments_and_refuses_outside_memory() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap_or_default();
        let mut sg = Sg::default();
        sg.push(GuestAddress(0x1000), 3);
        sg.push(GuestAddress(0x1800), 5);
        assert_eq!(sg.len(), 8);
        sg.write_at(&mem, 1, &[1, 2, 3, 4]).expect("in memory");
        let mut b = [0u8; 8];
        sg.read_at(&mem, 0, &mut b).expect("in memory");
        assert_eq!(b, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert_eq!(sg.read_at(&mem, 5, &mut b), Err(ChainError::TooShort));
        let mut bad = Sg::default();
        bad.push(GuestAddress(0x1FFE), 4);
        assert_eq!(bad.write_at(&mem, 0, &[0; 4]), Err(ChainError::OutOfMemory));
        // Lent as it is: what the guest's memory holds, no copy.
        let shared = Arc::new(mem.clone());
        let lent = sg.lend(&shared, 1, 4).expect("in memory");
        assert!(lent.is_lent());
        assert_eq!(lent.into_vec(), [1, 2, 3, 4]);
        let mut lent = sg.lend(&shared, 0, 8).expect("in memory");
        lent.copy_from(0, &[9; 8]);
        sg.read_at(&mem, 0, &mut b).expect("in memory");
        assert_eq!(b, [9; 8]);
        assert!(bad.lend(&shared, 0, 4).is_none());
        assert!(sg.lend(&shared, 5, 4).is_none());
        let mut wrap = Sg::default();
        wrap.push(GuestAddress(u64::MAX - 1), 4);
        assert_eq!(
            wrap.read_at(&mem, 3, &mut [0u8; 1]),
            Err(ChainError::OutOfMemory)
        );
    }
}
