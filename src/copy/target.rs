//! What a copy writes: the output formats (createTypes and raw), their file names, the
//! descriptor an output gets, and [`export_fed`], which plans an output of any format
//! and drives the engine into the matching sink. export, import and create use it.
//!
//! Zero data is never written: grains unallocated in every layer, zeroed grains, holes of
//! flat files and allocated grains whose bytes are all zero are left out of sparse
//! outputs and become holes in flat/raw files.
//!
//! Output kinds:
//! - streamOptimized: VMware's layout (formats.md §3.5a), written by
//!   [`crate::format::stream::StreamWriter`]. Single pass, no seeking.
//! - monolithicSparse / twoGbMaxExtentSparse: [`crate::format::sparse::SparseLayout`];
//!   grains packed in LBA order after preallocated tables. To a file the grains are
//!   written first and the tables as the copy passes them (seeking); to a pipe a
//!   zero-scan pass computes the tables first. Both give the same bytes.
//! - monolithicFlat / twoGbMaxExtentFlat / vmfs / raw: flat files with holes; to a pipe,
//!   raw is the plain content and the descriptor-based kinds become a tar stream.

use std::io::Write;
use std::path::PathBuf;

use crate::chain::Chain;
use crate::copy::Progress;
use crate::copy::{self as pipeline, OutputFile, Piece, PipelineOptions, Producer};
pub use crate::copy::{CopyReport as ExportReport, Feed};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, Descriptor, ExtentLine};
use crate::format::manifest::ManifestBuilder;
pub use crate::format::output::{DiskType, ExportFormat, Prealloc};
use crate::format::output::{FileOutput, PipeOutput};
use crate::format::sparse::SECTOR;
use crate::output::check_target;

pub use super::GRAIN;
pub use crate::format::sparse::SPLIT_SECTORS;

/// Options of an export.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Output format.
    pub format: ExportFormat,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// zlib level for streamOptimized (0-9).
    pub level: u32,
    /// Write a manifest here.
    pub manifest: Option<PathBuf>,
    /// Overwrite existing outputs.
    pub force: bool,
    /// Pipeline unit (bytes; a multiple of 64 KiB dividing the split size). Tests vary it.
    pub unit: u64,
    /// Allocation of flat outputs written to files.
    pub prealloc: Prealloc,
    /// An increment: the source is a `crate::chain::DeltaView` (only the top layer's grains are read)
    /// and its zero grains become zeroed entries; streamOptimized only.
    pub delta: bool,
    /// The increment's `parentFileNameHint` (default: the parent layer's file name).
    pub parent_hint: Option<String>,
    /// Compute the CRC-32 of the whole content (the report's `crc32`) even without a
    /// manifest.
    pub checksum: bool,
    /// Leave out the grains every file system in the guest calls free (partition
    /// tables, ext2/3/4, FAT, NTFS read through the chain; see the README): the output
    /// then reads as the source with those grains zeroed, file-identical, not
    /// byte-identical, and says so in its descriptor (`ddb.vmdkit.guestAware`).
    pub guest_aware: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: ExportFormat::TwoGbMaxExtentSparse,
            threads: 0,
            level: 6,
            manifest: None,
            force: false,
            unit: pipeline::DEFAULT_UNIT,
            prealloc: Prealloc::Thin,
            delta: false,
            parent_hint: None,
            checksum: false,
            guest_aware: false,
        }
    }
}

/// Where the output goes.
pub enum Dest {
    /// Files: DST itself (descriptor, monolithic file or raw file) and extents beside it.
    Path(PathBuf),
    /// A non-seekable writer (stdout); `name` is the file name to record inside
    /// (descriptor extent lines, tar member names).
    Writer {
        /// The writer.
        w: Box<dyn Write + Send>,
        /// File name used inside the output.
        name: String,
    },
}

/// What an output's descriptor is made from: DDB keys and a CID.
#[derive(Debug, Clone)]
pub struct OutputMeta {
    /// `ddb.*` entries to keep (keys with the prefix).
    pub ddb: Vec<(String, String)>,
    /// The output's CID.
    pub cid: u32,
    /// How a `vmfs` output is provisioned: thin ones get `ddb.thinProvisioned = "1"`.
    pub provisioning: Provisioning,
    /// An increment's parent link: the content ID its parent must have and the
    /// `parentFileNameHint`.
    pub parent: Option<(u32, String)>,
    /// The grains a guest-aware output leaves out (its manifest names them).
    pub omitted: Option<std::sync::Arc<crate::guest::FreeMap>>,
}

/// Thin or thick provisioning of a `vmfs` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provisioning {
    /// Space allocated as data arrives (holes).
    #[default]
    Thin,
    /// The whole flat file allocated up front (zeroedthick, eagerzeroedthick).
    Thick,
}

impl OutputMeta {
    /// The source chain's DDB keys (the base layer's, which hold the disk's real
    /// settings, then keys only children have) and the chain's content ID
    /// ([`Chain::content_id`]): a copy of the content keeps the ID that names it, so an
    /// increment made from the next delta applies to the restored copy.
    pub fn from_chain(chain: &Chain) -> OutputMeta {
        let mut ddb: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for layer in chain.layers.iter().rev() {
            for (k, v) in layer.descriptor.ddb_entries() {
                if seen.insert(k.to_ascii_lowercase()) {
                    ddb.push((k, v));
                }
            }
        }
        OutputMeta {
            ddb,
            cid: chain.content_id(0),
            provisioning: Provisioning::Thin,
            parent: None,
            omitted: None,
        }
    }

    /// A guest-aware output: it leaves out the grains of `free`, says so in its
    /// descriptor, and its manifest names them.
    pub fn mark_guest_aware(&mut self, free: std::sync::Arc<crate::guest::FreeMap>) {
        let key = crate::guest::DDB_KEY;
        self.ddb.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.ddb.push((key.to_string(), "1".to_string()));
        self.omitted = Some(free);
    }

    /// The manifest's omitted-grain masks by block, for a guest-aware output.
    pub fn omitted_masks(&self) -> Option<Box<dyn Fn(u64) -> u64 + Send>> {
        let free = self.omitted.clone()?;
        let block = crate::format::manifest::BLOCK;
        Some(Box::new(move |i| free.mask(i * block, block)))
    }

    /// The metadata of an increment of `chain`'s top layer: its content ID, and as parent
    /// the content ID of the layers below with the name `hint` (default: the parent's
    /// file name).
    pub fn for_delta(chain: &Chain, hint: Option<&str>) -> Result<OutputMeta> {
        if chain.layers.len() < 2 {
            return Err(Error::not_applicable(
                &chain.top().path,
                "has no parent: an increment holds what a delta adds to its parent; export it in full instead",
            ));
        }
        let hint = match hint {
            Some(h) => h.to_string(),
            None => chain.layers[1]
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        crate::format::descriptor::check_file_name(&hint)?;
        Ok(OutputMeta {
            parent: Some((chain.content_id(1), hint)),
            ..OutputMeta::from_chain(chain)
        })
    }

    /// Use `adapter` and recompute the geometry for it (formats.md §9).
    pub fn set_adapter(&mut self, adapter: &str, capacity: u64) {
        self.ddb.retain(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k != "ddb.adaptertype" && !k.starts_with("ddb.geometry.")
        });
        let g = crate::format::geometry::compute(capacity / SECTOR, adapter);
        self.ddb
            .push(("ddb.adapterType".into(), adapter.to_string()));
        self.ddb
            .push(("ddb.geometry.cylinders".into(), g.cylinders.to_string()));
        self.ddb
            .push(("ddb.geometry.heads".into(), g.heads.to_string()));
        self.ddb
            .push(("ddb.geometry.sectors".into(), g.sectors.to_string()));
    }
}

/// The output's descriptor: the kept DDB keys (parent links, the thin flag and the long
/// content ID dropped, then set afresh), defaults for a missing adapter and geometry,
/// the CID, no parent link.
pub fn output_descriptor(
    meta: &OutputMeta,
    capacity: u64,
    ct: CreateType,
    extents: Vec<ExtentLine>,
) -> Descriptor {
    let cid = meta.cid;
    let mut ddb: Vec<(String, String)> = meta
        .ddb
        .iter()
        .filter(|(k, _)| {
            let lk = k.to_ascii_lowercase();
            lk.starts_with("ddb.")
                && !(lk.contains("parent")
                    || lk == "ddb.thinprovisioned"
                    || lk == "ddb.longcontentid")
        })
        .cloned()
        .collect();
    if !ddb
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ddb.virtualHWVersion"))
    {
        ddb.insert(0, ("ddb.virtualHWVersion".into(), "4".into()));
    }
    if !ddb
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ddb.adapterType"))
    {
        ddb.push(("ddb.adapterType".into(), "lsilogic".into()));
    }
    if !ddb
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ddb.geometry.cylinders"))
    {
        let adapter = ddb
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("ddb.adapterType"))
            .map_or("lsilogic".to_string(), |(_, v)| v.clone());
        let g = crate::format::geometry::compute(capacity / SECTOR, &adapter);
        ddb.push(("ddb.geometry.cylinders".into(), g.cylinders.to_string()));
        ddb.push(("ddb.geometry.heads".into(), g.heads.to_string()));
        ddb.push(("ddb.geometry.sectors".into(), g.sectors.to_string()));
    }
    if ct == CreateType::Vmfs && meta.provisioning == Provisioning::Thin {
        ddb.push(("ddb.thinProvisioned".into(), "1".into()));
    }
    let long = format!(
        "{:08x}{:08x}{:08x}{cid:08x}",
        crc32fast::hash(&cid.to_le_bytes()),
        crc32fast::hash(&(cid ^ 0x5555_5555).to_le_bytes()),
        crc32fast::hash(&(cid ^ 0xaaaa_aaaa).to_le_bytes())
    );
    ddb.push(("ddb.longContentID".into(), long));
    let parent = meta.parent.as_ref().map(|(c, h)| (*c, h.as_str()));
    Descriptor::new(ct, cid, parent, extents, &ddb)
}

/// Refuse options that make no sense before anything is opened for writing.
fn check_options(opts: &ExportOptions, cap: u64) -> Result<()> {
    if opts.level > 9 {
        return Err(Error::InvalidInput(format!(
            "compression level {} is outside 0..=9",
            opts.level
        )));
    }
    if opts.unit % GRAIN != 0 || (SPLIT_SECTORS * SECTOR) % opts.unit != 0 {
        return Err(Error::InvalidInput(
            "pipeline unit must be a multiple of 64 KiB dividing 2047 MiB".into(),
        ));
    }
    if cap % SECTOR != 0 {
        return Err(Error::InvalidInput(
            "capacity is not a whole number of sectors".into(),
        ));
    }
    if opts.delta && (opts.format != ExportFormat::StreamOptimized || opts.unit != GRAIN) {
        return Err(Error::InvalidInput(
            "an increment is written as a streamOptimized file".into(),
        ));
    }
    Ok(())
}

/// The files an output is made of: what export writes and `measure` sizes.
#[derive(Debug, Clone)]
pub struct OutputPlan {
    /// The data files (extents, or the one monolithic/stream/raw file).
    pub pieces: Vec<OutputFile>,
    /// The descriptor text (None for raw).
    pub descriptor: Option<Vec<u8>>,
    /// Whether the descriptor is a file of its own (split and flat formats).
    pub separate_descriptor: bool,
}

/// Plan an output of `format` named `name` for a disk of `cap` bytes.
pub fn plan_output(format: ExportFormat, meta: &OutputMeta, cap: u64, name: &str) -> OutputPlan {
    let spec = format.spec();
    let pieces = spec.files(cap, name);
    let descriptor = spec.create_type().map(|ct| {
        output_descriptor(meta, cap, ct, spec.extent_lines(cap, name, &pieces))
            .to_text()
            .into_bytes()
    });
    OutputPlan {
        pieces,
        descriptor,
        separate_descriptor: spec.separate_descriptor(),
    }
}

/// Export any disk with descriptor metadata `meta` (`mtime` dates tar members); when
/// `feed` is given it pushes the content and `chain` only supplies the capacity (files
/// only).
pub fn export_fed(
    chain: &dyn VirtualDisk,
    feed: Option<&mut dyn Feed>,
    meta: &OutputMeta,
    mtime: u64,
    dest: Dest,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let cap = chain.capacity();
    check_options(opts, cap)?;
    let format = opts.format;
    let popts = PipelineOptions {
        threads: opts.threads,
        unit: opts.unit,
    };
    let sources = chain.source_files();
    // The manifest's temporary first: a manifest that cannot be written (no such
    // folder, not writable, exists without --force) refuses the export before any work.
    let manifest_file = match &opts.manifest {
        Some(m) => {
            crate::guard::refuse_source_as_target(m, &sources)?;
            Some(crate::output::AtomicFile::create(m, opts.force)?)
        }
        None => None,
    };
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&sources)?;
    let mut manifest = (opts.manifest.is_some() || opts.checksum)
        .then(|| ManifestBuilder::with_omitted(cap, meta.omitted_masks()));
    let name = match &dest {
        Dest::Path(p) => p
            .file_name()
            .ok_or_else(|| Error::InvalidInput(format!("`{}` is not a file name", p.display())))?
            .to_string_lossy()
            .into_owned(),
        Dest::Writer { name, .. } => name.clone(),
    };
    crate::format::descriptor::check_file_name(&name)?;
    let OutputPlan {
        pieces,
        descriptor,
        separate_descriptor,
    } = plan_output(format, meta, cap, &name);
    let spec = format.spec();
    let producer = Producer {
        disk: chain,
        compress: spec.compresses().then_some(opts.level),
        crc: manifest.is_some(),
    };

    let mut observe = |u: &pipeline::Unit, p: &Piece| {
        if let Some(m) = manifest.as_mut() {
            match p {
                Piece::Hole => m.zeros(u.start, u.len),
                Piece::Data { crc, .. } => m.block(u.start, crc.clone().expect("crc requested")),
            }
        }
    };
    let mut sink = match dest {
        Dest::Path(path) => {
            let dir = crate::io::folder_of(&path);
            // Refuse before doing any work.
            {
                use std::os::unix::ffi::OsStrExt;
                if path.as_os_str().as_bytes().ends_with(b"/") || !dir.is_dir() {
                    return Err(Error::InvalidInput(format!(
                        "`{}` is not a file in an existing folder; nothing was written",
                        path.display()
                    )));
                }
            }
            crate::guard::refuse_source_as_target(&path, &sources)?;
            check_target(&path, opts.force)?;
            for p in &pieces {
                crate::guard::refuse_source_as_target(&dir.join(&p.name), &sources)?;
                check_target(&dir.join(&p.name), opts.force)?;
            }
            debug_assert_eq!(separate_descriptor, spec.separate_descriptor());
            spec.file_sink(FileOutput {
                capacity: cap,
                dir,
                files: pieces,
                descriptor,
                descriptor_path: path,
                force: opts.force,
                prealloc: opts.prealloc,
                delta: opts.delta,
            })?
        }
        Dest::Writer { .. } if feed.is_some() => {
            return Err(Error::InvalidInput(
                "a streamed source can only be imported to files".into(),
            ));
        }
        Dest::Writer { w, name: _ } => {
            let mut out = PipeOutput {
                w,
                capacity: cap,
                name: name.clone(),
                files: pieces,
                descriptor,
                delta: opts.delta,
                mtime,
                nonzero_grains: None,
            };
            // A layout that depends on which grains hold data (sparse extents; flat files
            // in a tar, which become GNU sparse members so a thin disk stays small on
            // tape) is planned by a zero-scan pass first.
            if spec.needs_scan(&out) {
                out.nonzero_grains = Some(pipeline::scan(chain, popts, &crate::copy::NoProgress)?);
            }
            spec.pipe_sink(out)?
        }
    };
    let content = match feed {
        Some(f) => pipeline::Content::Feed(f),
        None => pipeline::Content::Disk(chain),
    };
    pipeline::drive(
        content,
        popts,
        &producer,
        sink.as_mut(),
        &mut observe,
        progress,
    )?;
    // The manifest's bytes are written (and can fail for space) before the outputs take
    // their names; its own rename follows theirs.
    let crc = manifest.map(|m| {
        let total = m.total();
        (total, m.finish())
    });
    if let (Some(f), Some((_, bytes))) = (&manifest_file, &crc) {
        use std::os::unix::fs::FileExt;
        f.file()
            .write_all_at(bytes, 0)
            .map_err(|e| crate::io::write_error(f.tmp_path(), 0, e))?;
    }
    let mut report = sink.finish()?;
    report.crc32 = crc.map(|(t, _)| t);
    if let Some(f) = manifest_file {
        f.commit(opts.force)?;
    }
    Ok(report)
}
