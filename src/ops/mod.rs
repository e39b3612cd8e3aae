//! Operations built on the read model: info/map, cat, export.

pub mod cat;
pub mod check;
pub mod commit;
pub mod export;
pub mod extend;
pub mod geometry;
pub mod import;
pub mod info;
pub mod ls;
pub mod manifest;
pub mod output;
pub mod rdm;
pub mod redo;

/// Progress reporting hook (the CLI draws a bar; the library only counts).
pub trait Progress: Sync {
    /// `n` more bytes of logical content are done.
    fn inc(&self, n: u64);
    /// The total is now known to be `n` bytes.
    fn set_total(&self, _n: u64) {}
}

/// No progress reporting.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn inc(&self, _n: u64) {}
}
