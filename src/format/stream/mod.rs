//! streamOptimized files (formats.md §3): compressed grain records framed by markers.
//! [`read`] holds what random access needs beyond the sparse reader; [`pipe`] reads a
//! stream strictly in order (from stdin); [`mod@write`] writes one.

pub mod pipe;
pub mod read;
pub mod write;

pub use write::{grain_record, StreamWriter};
