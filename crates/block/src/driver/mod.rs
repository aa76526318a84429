//! Block drivers: where the bytes live.
//!
//! - [`mem`]: a sparse RAM disk, for tests and conformance runs.
//! - [`file`](mod@file): a file or block device, with io_uring or a thread pool underneath; its
//!   persistent reservation state in a sidecar file ([`sidecar`]).

pub mod file;
pub mod mem;
pub mod sidecar;
mod sync_latch;
mod uring;
