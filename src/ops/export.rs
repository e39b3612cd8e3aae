//! `export`: a disk or a whole chain (flattened) to compact files or a pipe, in any
//! format vmdkit writes (`crate::copy::target`), on the copy engine; or, with
//! `--delta`, an increment: the grains the top layer holds, to apply on a restored parent.

use crate::chain::{Chain, DeltaView};
use crate::copy::guest::Guest;
use crate::copy::{PipelineOptions, Progress};
use crate::disk::VirtualDisk;
use crate::error::Result;
use crate::format::manifest::ManifestBuilder;
pub use crate::guest::{GuestPartition, GuestReport};

pub use crate::copy::target::Prealloc;
pub(crate) use crate::copy::target::{export_fed, OutputMeta, GRAIN};
pub use crate::copy::target::{Dest, ExportFormat, ExportOptions, ExportReport};

/// Export `chain` to `dest`; with `opts.delta`, only what its top layer holds (an
/// increment: `DeltaView`, `OutputMeta::for_delta`).
///
/// ```
/// use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};
/// use vmdkit::{Chain, NoProgress, OpenOptions, VirtualDisk};
///
/// # fn main() -> vmdkit::Result<()> {
/// # let top = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo-000001.vmdk");
/// let chain = Chain::open(top.as_ref(), &OpenOptions::default())?;
/// let dir = tempfile::tempdir().unwrap();
/// let mut opts = ExportOptions::default();
/// opts.format = ExportFormat::StreamOptimized;
/// let report = export(&chain, Dest::Path(dir.path().join("backup.vmdk")), &opts, &NoProgress)?;
/// assert_eq!(report.files, [dir.path().join("backup.vmdk")]);
///
/// // The backup reads as the chain did.
/// let backup = Chain::open(&dir.path().join("backup.vmdk"), &OpenOptions::default())?;
/// let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
/// chain.read_at(&mut a, 0)?;
/// backup.read_at(&mut b, 0)?;
/// assert_eq!(a, b);
/// # Ok(())
/// # }
/// ```
pub fn export(
    chain: &Chain,
    dest: Dest,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let mtime = std::fs::metadata(&chain.top().path)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    // Guest-aware: the free map is read from the chain's newest state (for an
    // increment, the delta's own point in time: the chain as opened).
    let guest = Guest::scan(chain, opts.guest_aware)?;
    if opts.delta {
        return export_delta(chain, &guest, dest, opts, mtime, progress);
    }
    let mut meta = OutputMeta::from_chain(chain);
    if opts.prealloc != Prealloc::Thin {
        meta.provisioning = crate::copy::target::Provisioning::Thick;
    }
    guest.mark(&mut meta);
    let report = export_fed(&guest.view(chain), None, &meta, mtime, dest, opts, progress)?;
    Ok(guest.report(report))
}

/// An increment: the top layer's grains on the engine; its manifest (checked after
/// `apply`) covers the whole chain's content, so it is made by a second, read-only pass.
fn export_delta(
    chain: &Chain,
    guest: &Guest,
    dest: Dest,
    opts: &ExportOptions,
    mtime: u64,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let mut meta = OutputMeta::for_delta(chain, opts.parent_hint.as_deref())?;
    guest.mark(&mut meta);
    let manifest_file = match &opts.manifest {
        Some(m) => {
            crate::guard::refuse_source_as_target(m, &chain.source_files())?;
            Some(crate::output::AtomicFile::create(m, opts.force)?)
        }
        None => None,
    };
    let delta_opts = ExportOptions {
        unit: GRAIN,
        manifest: None,
        checksum: false,
        ..opts.clone()
    };
    let delta = DeltaView::new(chain, GRAIN);
    let view = guest.view(&delta);
    let mut report = export_fed(&view, None, &meta, mtime, dest, &delta_opts, progress)?;
    if opts.manifest.is_some() || opts.checksum {
        let popts = PipelineOptions {
            threads: opts.threads,
            ..Default::default()
        };
        let b = ManifestBuilder::with_omitted(chain.capacity(), meta.omitted_masks());
        let whole = guest.view(chain);
        let b = crate::copy::manifest_of(&whole, b, popts, &crate::copy::NoProgress)?;
        report.crc32 = Some(b.total());
        if let Some(f) = manifest_file {
            use std::os::unix::fs::FileExt;
            f.file()
                .write_all_at(&b.finish(), 0)
                .map_err(|e| crate::io::write_error(f.tmp_path(), 0, e))?;
            f.commit(opts.force)?;
        }
    }
    Ok(guest.report(report))
}
