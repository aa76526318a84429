//! [`IoBuf`]: the memory one read or write transfers, either a buffer of the block layer's own
//! or memory a frontend lends (a vhost-user guest's buffers, mapped into this process), so that
//! data goes between the frontend's memory and the driver without an intermediate copy.
//!
//! A lent buffer is a list of segments (pointer, length) plus an owner handle that keeps the
//! mapping alive: a driver may hold the buffer past the caller's interest (an io_uring request
//! whose caller stopped waiting) and the memory is never unmapped under it. The segments are
//! only ever accessed through raw pointers (system calls, `ptr::copy_nonoverlapping`), never
//! as Rust references: the lender's other users (the guest) may access the same bytes at any
//! time, as they may with any DMA buffer.

use std::any::Any;
use std::sync::Arc;

/// One segment of lent memory.
#[derive(Debug, Clone, Copy)]
struct Seg {
    ptr: *mut u8,
    len: usize,
}

enum Inner {
    Owned(Vec<u8>),
    Lent {
        segs: Vec<Seg>,
        len: usize,
        _owner: Arc<dyn Any + Send + Sync>,
    },
}

/// The memory of one transfer; see the module docs.
pub struct IoBuf {
    inner: Inner,
}

// SAFETY: an owned buffer is a `Vec<u8>`. A lent one is raw memory that `IoBuf::lent`'s
// contract makes valid for as long as its owner handle lives (which the `IoBuf` holds), from
// any thread; it is only accessed through raw pointers, so no reference to it is shared.
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` only reads the segment list or copies out of the memory (see `Send`).
unsafe impl Sync for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Owned(v) => write!(f, "IoBuf::Owned({} bytes)", v.len()),
            Inner::Lent { segs, len, .. } => {
                write!(f, "IoBuf::Lent({len} bytes in {} segments)", segs.len())
            }
        }
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        Self::from(Vec::new())
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> Self {
        Self {
            inner: Inner::Owned(v),
        }
    }
}

impl IoBuf {
    /// Memory lent by a frontend: `segs` as (address, length) pairs, in order.
    ///
    /// # Safety
    /// Every segment must be memory of this process, valid for reads and writes of its length,
    /// for as long as `owner` lives; nothing may unmap or free it before then.
    pub unsafe fn lent(
        segs: impl IntoIterator<Item = (*mut u8, usize)>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        let segs: Vec<Seg> = segs
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(ptr, len)| Seg { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        Self {
            inner: Inner::Lent {
                segs,
                len,
                _owner: owner,
            },
        }
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Owned(v) => v.len(),
            Inner::Lent { len, .. } => *len,
        }
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the memory is lent (not the block layer's own).
    pub fn is_lent(&self) -> bool {
        matches!(self.inner, Inner::Lent { .. })
    }

    /// Keep only the first `len` bytes (no effect when it is already shorter).
    pub fn truncate(&mut self, len: usize) {
        match &mut self.inner {
            Inner::Owned(v) => v.truncate(len),
            Inner::Lent {
                segs, len: total, ..
            } => {
                if len >= *total {
                    return;
                }
                let mut left = len;
                let mut keep = 0;
                for s in segs.iter_mut() {
                    if left == 0 {
                        break;
                    }
                    s.len = s.len.min(left);
                    left -= s.len;
                    keep += 1;
                }
                segs.truncate(keep);
                *total = len;
            }
        }
    }

    /// The bytes as a vector of the caller's own: the buffer itself when owned, a copy when
    /// lent.
    pub fn into_vec(self) -> Vec<u8> {
        match self.inner {
            Inner::Owned(v) => v,
            Inner::Lent { len, .. } => {
                let mut v = vec![0; len];
                self.copy_to(0, &mut v);
                v
            }
        }
    }

    /// Copy `dst.len()` bytes from `offset` into `dst`; returns how many there were (fewer at
    /// the end of the buffer).
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        self.visit(offset, dst.len(), |ptr, at, n| {
            if let Some(d) = dst.get_mut(at..at + n) {
                // SAFETY: `ptr` points at `n` readable bytes of this buffer (see `visit`), and
                // `d` is a distinct, exclusively borrowed slice of `n` bytes.
                unsafe { std::ptr::copy_nonoverlapping(ptr, d.as_mut_ptr(), n) };
                done += n;
            }
        });
        done
    }

    /// Copy `src` into the buffer at `offset`; returns how many bytes fitted.
    pub fn copy_from(&mut self, offset: usize, src: &[u8]) -> usize {
        if let Inner::Owned(v) = &mut self.inner {
            let Some(d) = v.get_mut(offset..) else {
                return 0;
            };
            let n = d.len().min(src.len());
            d[..n].copy_from_slice(&src[..n]);
            return n;
        }
        let mut done = 0;
        self.visit(offset, src.len(), |ptr, at, n| {
            if let Some(s) = src.get(at..at + n) {
                // SAFETY: `ptr` points at `n` writable bytes of lent memory (see `visit` and
                // `IoBuf::lent`), which no Rust reference covers; `s` is `n` bytes of the
                // caller's slice, a different allocation.
                unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), ptr, n) };
                done += n;
            }
        });
        done
    }

    /// Visit the pieces of `[offset, offset + count)` that exist: `f(pointer, position from
    /// offset, length)`.
    fn visit(&self, offset: usize, count: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        match &self.inner {
            Inner::Owned(v) => {
                let n = v.len().saturating_sub(offset).min(count);
                if n > 0 {
                    // `offset < len` here, so the pointer stays inside the vector; it is only
                    // read through (copy_to).
                    f(v.as_ptr().wrapping_add(offset).cast_mut(), 0, n);
                }
            }
            Inner::Lent { segs, .. } => {
                let mut pos = 0usize; // start of the segment within the buffer
                let mut done = 0usize;
                for s in segs {
                    if done == count {
                        break;
                    }
                    let end = pos + s.len;
                    let at = offset + done;
                    if end > at {
                        let skip = at - pos;
                        let n = (s.len - skip).min(count - done);
                        f(s.ptr.wrapping_add(skip), done, n);
                        done += n;
                    }
                    pos = end;
                }
            }
        }
    }

    /// Whether every segment starts at a multiple of `start` and is a multiple of `len` long
    /// (what direct I/O asks of memory).
    pub(crate) fn segments_aligned(&self, start: usize, len: usize) -> bool {
        let ok = |ptr: *const u8, n: usize| (ptr as usize) % start == 0 && n % len == 0;
        match &self.inner {
            Inner::Owned(v) => ok(v.as_ptr(), v.len()),
            Inner::Lent { segs, .. } => segs.iter().all(|s| ok(s.ptr, s.len)),
        }
    }

    /// The buffer from byte `skip` on, as iovecs for a vectored system call or io_uring. The
    /// pointers stay valid while `self` lives and is not truncated or converted.
    pub(crate) fn iovecs(&mut self, skip: usize) -> Vec<libc::iovec> {
        match &mut self.inner {
            Inner::Owned(v) => match v.get_mut(skip..) {
                Some(rest) if !rest.is_empty() => vec![libc::iovec {
                    iov_base: rest.as_mut_ptr().cast(),
                    iov_len: rest.len(),
                }],
                _ => Vec::new(),
            },
            Inner::Lent { .. } => {
                let mut out = Vec::new();
                let len = self.len();
                self.visit(skip, len.saturating_sub(skip), |ptr, _, n| {
                    out.push(libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: n,
                    });
                });
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pair = Arc<std::sync::Mutex<(Vec<u8>, Vec<u8>)>>;

    /// Two separate heap blocks lent as one buffer, the vectors kept alive by the owner.
    fn lent(a: usize, b: usize) -> (IoBuf, Pair) {
        let keep = Arc::new(std::sync::Mutex::new((vec![0u8; a], vec![0u8; b])));
        let (pa, pb) = {
            let mut g = keep.lock().expect("lock");
            (g.0.as_mut_ptr(), g.1.as_mut_ptr())
        };
        // SAFETY: both vectors live in `keep`, which the buffer holds, and are never resized.
        let buf = unsafe { IoBuf::lent([(pa, a), (pb, b)], keep.clone()) };
        (buf, keep)
    }

    #[test]
    fn lent_segments_copy_in_and_out_across_the_boundary() {
        let (mut buf, keep) = lent(3, 5);
        assert_eq!(buf.len(), 8);
        assert!(buf.is_lent());
        assert_eq!(buf.copy_from(1, &[1, 2, 3, 4]), 4);
        {
            let g = keep.lock().expect("lock");
            assert_eq!(g.0, [0, 1, 2]);
            assert_eq!(g.1, [3, 4, 0, 0, 0]);
        }
        let mut out = [9u8; 6];
        assert_eq!(buf.copy_to(2, &mut out), 6);
        assert_eq!(out, [2, 3, 4, 0, 0, 0]);
        // Past the end: only what exists.
        assert_eq!(buf.copy_from(6, &[7, 7, 7]), 2);
        assert_eq!(buf.into_vec(), [0, 1, 2, 3, 4, 0, 7, 7]);
    }

    #[test]
    fn truncate_and_iovecs_follow_the_segments() {
        let (mut buf, _keep) = lent(3, 5);
        let v = buf.iovecs(2);
        assert_eq!(v.iter().map(|i| i.iov_len).collect::<Vec<_>>(), [1, 5]);
        buf.truncate(4);
        assert_eq!(buf.len(), 4);
        let v = buf.iovecs(0);
        assert_eq!(v.iter().map(|i| i.iov_len).collect::<Vec<_>>(), [3, 1]);
        assert!(buf.iovecs(4).is_empty());
        let mut owned = IoBuf::from(vec![1, 2, 3]);
        assert_eq!(owned.iovecs(1)[0].iov_len, 2);
        owned.truncate(1);
        assert_eq!(owned.into_vec(), [1]);
    }
}
