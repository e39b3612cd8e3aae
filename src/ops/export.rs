//! `export`: a disk or a whole chain (flattened) to compact files or a pipe, in any
//! format vmdkit writes ([`crate::copy::target`]), on the copy engine.

use crate::chain::Chain;
use crate::copy::Progress;
use crate::error::Result;

pub use crate::copy::sink::Prealloc;
pub use crate::copy::target::{
    export_fed, output_descriptor, Dest, ExportFormat, ExportOptions, ExportReport, Feed,
    OutputMeta, GRAIN, SPLIT_SECTORS,
};

/// Export `chain` to `dest`.
pub fn export(
    chain: &Chain,
    dest: Dest,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let meta = OutputMeta::from_chain(chain, opts.format);
    let mtime = std::fs::metadata(&chain.top().path)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    export_fed(chain, None, &meta, mtime, dest, opts, progress)
}
