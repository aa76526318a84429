//! A memory-backed driver, for tests and the SCSI conformance runs.
//!
//! The device is sparse: a map from chunk index to a [`CHUNK`]-byte buffer. A chunk exists only
//! once something non-discarded was written to it, so a large device costs only what is written.
//! Discard really deallocates: chunks wholly inside the range are dropped, the covered part of
//! the others is zeroed, and a chunk that is then all zeros is dropped too. Absent chunks read as
//! zeros (`discard_zeroes`), and [`Driver::block_status`] reports present chunks as mapped and
//! absent ones as deallocated, so the mapping granularity is one chunk.
//!
//! Write zeroes without unmap zeroes the chunks that exist in place, so they stay mapped, and
//! leaves absent ones absent (they already read as zeros): zeroing a whole large device must not
//! allocate it.
//!
//! Every operation runs under one `RwLock` and completes without awaiting, so each driver call is
//! atomic by itself; atomicity *across* calls (compare-and-write) is the block layer's business.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;

use crate::{BlockError, Driver, DriverInfo, Extent, MemoryStore, ReservationStore};

/// Bytes per allocation chunk: the granularity of allocation, discard and block status.
pub const CHUNK: u64 = 4096;
const CHUNK_USIZE: usize = CHUNK as usize;

type Chunk = Box<[u8; CHUNK_USIZE]>;

/// A sparse RAM disk.
pub struct MemDriver {
    size: u64,
    chunks: RwLock<BTreeMap<u64, Chunk>>,
    /// Its reservation state lives as long as its data: APTPL is kept, in memory.
    reservations: Arc<MemoryStore>,
}

impl MemDriver {
    /// A zero-filled (fully deallocated) disk of `size` bytes. Memory is used only for what is
    /// written.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            chunks: RwLock::new(BTreeMap::new()),
            reservations: Arc::new(MemoryStore::new()),
        }
    }

    /// Bytes of memory held by allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        let n = self
            .chunks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        n.saturating_mul(CHUNK)
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<u64> {
        offset
            .checked_add(len)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "Range {offset}+{len} is beyond the end of the {} byte device",
                        self.size
                    ),
                )
            })
    }
}

/// The pieces of `[offset, end)` that fall in each chunk: `(chunk index, start in chunk, length)`.
fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / CHUNK;
        let within = pos % CHUNK;
        let n = (CHUNK - within).min(end - pos);
        pos += n;
        Some((idx, within as usize, n as usize))
    })
}

fn zero_piece(chunks: &mut BTreeMap<u64, Chunk>, idx: u64, within: usize, n: usize) {
    let now_empty = match chunks.get_mut(&idx) {
        None => false,
        Some(c) => {
            if let Some(s) = c.get_mut(within..within + n) {
                s.fill(0);
            }
            c.iter().all(|&b| b == 0)
        }
    };
    if now_empty {
        chunks.remove(&idx);
    }
}

fn poisoned<T>(_: PoisonError<T>) -> std::io::Error {
    std::io::Error::other("Memory driver lock poisoned")
}

#[async_trait]
impl Driver for MemDriver {
    fn reservation_store(&self) -> Option<Arc<dyn ReservationStore>> {
        Some(self.reservations.clone())
    }
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.size,
            discard: true,
            discard_zeroes: true,
            native_compare_and_write: 0,
        }
    }

    fn allocation_unit(&self) -> u64 {
        CHUNK
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let end = self
            .check(offset, len as u64)
            .map_err(BlockError::ReadFailed)?;
        let chunks = self
            .chunks
            .read()
            .map_err(|e| BlockError::ReadFailed(poisoned(e)))?;
        let mut out = vec![0u8; len];
        let mut at = 0usize;
        for (idx, within, n) in pieces(offset, end) {
            if let (Some(c), Some(dst)) = (chunks.get(&idx), out.get_mut(at..at + n)) {
                if let Some(src) = c.get(within..within + n) {
                    dst.copy_from_slice(src);
                }
            }
            at += n;
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> Result<(), BlockError> {
        let end = self
            .check(offset, buf.len() as u64)
            .map_err(BlockError::WriteFailed)?;
        let mut chunks = self
            .chunks
            .write()
            .map_err(|e| BlockError::WriteFailed(poisoned(e)))?;
        let mut at = 0usize;
        for (idx, within, n) in pieces(offset, end) {
            let c = chunks
                .entry(idx)
                .or_insert_with(|| Box::new([0u8; CHUNK_USIZE]));
            if let (Some(dst), Some(src)) = (c.get_mut(within..within + n), buf.get(at..at + n)) {
                dst.copy_from_slice(src);
            }
            at += n;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let end = self.check(offset, len).map_err(BlockError::WriteFailed)?;
        let mut chunks = self
            .chunks
            .write()
            .map_err(|e| BlockError::WriteFailed(poisoned(e)))?;
        // Whole chunks inside the range go at once (without visiting every index of a huge
        // range); the partial chunks at either end are zeroed.
        let first_whole = offset.div_ceil(CHUNK);
        let end_whole = end / CHUNK;
        if first_whole < end_whole {
            let doomed: Vec<u64> = chunks
                .range(first_whole..end_whole)
                .map(|(&k, _)| k)
                .collect();
            for k in doomed {
                chunks.remove(&k);
            }
            let head_end = (first_whole * CHUNK).min(end);
            for (idx, within, n) in pieces(offset, head_end) {
                zero_piece(&mut chunks, idx, within, n);
            }
            for (idx, within, n) in pieces((end_whole * CHUNK).max(offset), end) {
                zero_piece(&mut chunks, idx, within, n);
            }
        } else {
            for (idx, within, n) in pieces(offset, end) {
                zero_piece(&mut chunks, idx, within, n);
            }
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        if unmap {
            return self.discard(offset, len).await;
        }
        // Chunks that exist are zeroed in place and stay mapped (the blocks were written);
        // absent ones already read as zeros and stay absent.
        let end = self.check(offset, len).map_err(BlockError::WriteFailed)?;
        let mut chunks = self
            .chunks
            .write()
            .map_err(|e| BlockError::WriteFailed(poisoned(e)))?;
        for (&idx, c) in chunks.range_mut(offset / CHUNK..end.div_ceil(CHUNK)) {
            let from = (idx * CHUNK).max(offset);
            let to = ((idx + 1) * CHUNK).min(end);
            let within = (from - idx * CHUNK) as usize;
            if let Some(s) = c.get_mut(within..within + (to - from) as usize) {
                s.fill(0);
            }
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        let end = self.check(offset, len).map_err(BlockError::ReadFailed)?;
        if len == 0 {
            return Ok(Extent {
                len: 0,
                mapped: false,
            });
        }
        let chunks = self
            .chunks
            .read()
            .map_err(|e| BlockError::ReadFailed(poisoned(e)))?;
        let first = offset / CHUNK;
        let mapped = chunks.contains_key(&first);
        let stop = if mapped {
            // Run of consecutive present chunks.
            let mut next = first;
            for (&k, _) in chunks.range(first..) {
                if k != next {
                    break;
                }
                next = k + 1;
            }
            next.saturating_mul(CHUNK)
        } else {
            chunks
                .range(first..)
                .next()
                .map_or(u64::MAX, |(&k, _)| k.saturating_mul(CHUNK))
        };
        Ok(Extent {
            len: stop.min(end) - offset,
            mapped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_huge_device_costs_only_what_is_written() {
        let d = MemDriver::new(1 << 50);
        d.write(1 << 40, vec![1; 8192], false).await.expect("write");
        assert_eq!(d.allocated_bytes(), 8192);
    }

    #[tokio::test]
    async fn zeroes_without_unmap_keep_written_chunks_mapped() {
        let d = MemDriver::new(1 << 50);
        d.write(4096, vec![1; 8192], false).await.expect("write");
        // Zero a huge range that covers the second chunk whole and the first in part.
        d.write_zeroes(6144, (1 << 50) - 6144, false)
            .await
            .expect("zeroes");
        assert_eq!(d.allocated_bytes(), 8192);
        let got = d.read(4096, 8192).await.expect("read");
        assert!(got[..2048].iter().all(|&b| b == 1));
        assert!(got[2048..].iter().all(|&b| b == 0));
        let e = d.block_status(4096, 8192).await.expect("status");
        assert_eq!(
            e,
            Extent {
                len: 8192,
                mapped: true
            }
        );
        d.write_zeroes(0, 1 << 50, true).await.expect("unmap");
        assert_eq!(d.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn discard_of_a_huge_range_frees_every_chunk() {
        let d = MemDriver::new(1 << 50);
        d.write(0, vec![1; 8192], false).await.expect("write");
        d.write(1 << 45, vec![1; 512], false).await.expect("write");
        d.discard(0, 1 << 50).await.expect("discard");
        assert_eq!(d.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn partial_discard_keeps_the_rest_of_the_chunk() {
        let d = MemDriver::new(1 << 20);
        d.write(0, vec![7; 4096], false).await.expect("write");
        d.discard(512, 512).await.expect("discard");
        let got = d.read(0, 4096).await.expect("read");
        assert_eq!(&got[..512], &[7; 512][..]);
        assert_eq!(&got[512..1024], &[0; 512][..]);
        assert_eq!(&got[1024..], &[7; 3072][..]);
        assert_eq!(d.allocated_bytes(), 4096);
    }

    #[tokio::test]
    async fn access_beyond_the_end_is_an_error_not_a_panic() {
        let d = MemDriver::new(4096);
        assert!(d.read(4096, 1).await.is_err());
        assert!(d.write(u64::MAX, vec![0; 2], false).await.is_err());
        assert!(d.block_status(4000, 200).await.is_err());
    }
}
