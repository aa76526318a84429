//! Block drivers.

pub mod file;
pub mod mem;
