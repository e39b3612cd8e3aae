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
pub use crate::copy::sink::Prealloc;
use crate::copy::sink::{self, FileKind, SeqKind};
use crate::copy::Progress;
use crate::copy::{self as pipeline, OutputFile, Piece, PipelineOptions, Producer};
pub use crate::copy::{CopyReport as ExportReport, Feed};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{Access, CreateType, Descriptor, ExtentLine, ExtentType};
use crate::format::manifest::ManifestBuilder;
use crate::format::sparse::SECTOR;
use crate::output::check_target;

pub use super::GRAIN;
pub use crate::format::sparse::SPLIT_SECTORS;

/// Output formats of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Compressed stream (`stream`).
    StreamOptimized,
    /// One hosted sparse file (`sparse`).
    MonolithicSparse,
    /// Descriptor + 2 GB sparse extents (`split`).
    TwoGbMaxExtentSparse,
    /// Descriptor + one flat file (`flat`).
    MonolithicFlat,
    /// Descriptor + 2 GB flat extents.
    TwoGbMaxExtentFlat,
    /// ESX descriptor + `-flat.vmdk` (thin: holes).
    Vmfs,
    /// Plain raw content.
    Raw,
}

impl ExportFormat {
    /// Parse a format name: any [`DiskType`] name (thin and thick `vmfs` are one format;
    /// the allocation is [`DiskType::format`]'s second half).
    pub fn parse(s: &str) -> Option<ExportFormat> {
        DiskType::parse(s).map(|t| t.format().0)
    }

    /// The createType written (None for raw).
    pub fn create_type(self) -> Option<CreateType> {
        Some(match self {
            ExportFormat::StreamOptimized => CreateType::StreamOptimized,
            ExportFormat::MonolithicSparse => CreateType::MonolithicSparse,
            ExportFormat::TwoGbMaxExtentSparse => CreateType::TwoGbMaxExtentSparse,
            ExportFormat::MonolithicFlat => CreateType::MonolithicFlat,
            ExportFormat::TwoGbMaxExtentFlat => CreateType::TwoGbMaxExtentFlat,
            ExportFormat::Vmfs => CreateType::Vmfs,
            ExportFormat::Raw => return None,
        })
    }

    /// Whether the output is made of hosted sparse extents.
    pub fn is_sparse(self) -> bool {
        matches!(
            self,
            ExportFormat::MonolithicSparse | ExportFormat::TwoGbMaxExtentSparse
        )
    }
}

/// The one vocabulary of disk types every command that writes a disk takes (`export`,
/// `import`, `create`; vmkfstools `-d`): createType names, vmkfstools names and short
/// aliases, case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// `vmfs` descriptor + `-flat.vmdk` with holes (vmkfstools `thin`).
    Thin,
    /// `vmfs` flat file fully allocated, zeros not written (`zeroedthick`).
    ZeroedThick,
    /// `vmfs` flat file with every byte written (`eagerzeroedthick`).
    EagerZeroedThick,
    /// One hosted sparse file (`monolithicSparse`, `sparse`).
    MonolithicSparse,
    /// Descriptor + 2 GB sparse extents (`twoGbMaxExtentSparse`, `2gbsparse`, `split`).
    TwoGbMaxExtentSparse,
    /// Descriptor + one flat file (`monolithicFlat`, `flat`).
    MonolithicFlat,
    /// Descriptor + 2 GB flat extents (`twoGbMaxExtentFlat`, `2gbflat`, `splitflat`).
    TwoGbMaxExtentFlat,
    /// Plain file or block device (`raw`).
    Raw,
    /// streamOptimized (`stream`).
    StreamOptimized,
}

impl DiskType {
    /// Every name [`parse`](Self::parse) takes, for messages and help.
    pub const NAMES: &'static str = "thin (vmfs), zeroedthick (thick), eagerzeroedthick, monolithicSparse (sparse), twoGbMaxExtentSparse (2gbsparse, split), monolithicFlat (flat), twoGbMaxExtentFlat (2gbflat), streamOptimized (stream), raw";

    /// Parse a type name.
    pub fn parse(s: &str) -> Option<DiskType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "thin" | "vmfs" | "vmfsthin" => DiskType::Thin,
            "zeroedthick" | "thick" | "preallocated" => DiskType::ZeroedThick,
            "eagerzeroedthick" => DiskType::EagerZeroedThick,
            "monolithicsparse" | "sparse" => DiskType::MonolithicSparse,
            "twogbmaxextentsparse" | "2gbmaxextentsparse" | "2gbsparse" | "split" => {
                DiskType::TwoGbMaxExtentSparse
            }
            "monolithicflat" | "flat" => DiskType::MonolithicFlat,
            "twogbmaxextentflat" | "2gbmaxextentflat" | "2gbflat" | "splitflat" => {
                DiskType::TwoGbMaxExtentFlat
            }
            "raw" => DiskType::Raw,
            "streamoptimized" | "stream" => DiskType::StreamOptimized,
            _ => return None,
        })
    }

    /// Parse, or explain which names exist.
    pub fn parse_or_explain(s: &str) -> Result<DiskType> {
        Self::parse(s).ok_or_else(|| {
            Error::InvalidInput(format!("unknown disk type `{s}` (one of: {})", Self::NAMES))
        })
    }

    /// The output format written and how its flat files are allocated.
    pub fn format(self) -> (ExportFormat, Prealloc) {
        match self {
            DiskType::Thin => (ExportFormat::Vmfs, Prealloc::Thin),
            DiskType::ZeroedThick => (ExportFormat::Vmfs, Prealloc::Allocate),
            DiskType::EagerZeroedThick => (ExportFormat::Vmfs, Prealloc::WriteZeros),
            DiskType::MonolithicSparse => (ExportFormat::MonolithicSparse, Prealloc::Thin),
            DiskType::TwoGbMaxExtentSparse => (ExportFormat::TwoGbMaxExtentSparse, Prealloc::Thin),
            DiskType::MonolithicFlat => (ExportFormat::MonolithicFlat, Prealloc::Thin),
            DiskType::TwoGbMaxExtentFlat => (ExportFormat::TwoGbMaxExtentFlat, Prealloc::Thin),
            DiskType::Raw => (ExportFormat::Raw, Prealloc::Thin),
            DiskType::StreamOptimized => (ExportFormat::StreamOptimized, Prealloc::Thin),
        }
    }
}

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

// ---------------------------------------------------------------------------------------
// Naming and descriptors

fn stem_of(name: &str) -> String {
    let n = name.strip_suffix(".vmdk").unwrap_or(name);
    n.to_string()
}

fn plan_extents(format: ExportFormat, capacity: u64, name: &str) -> Vec<OutputFile> {
    let stem = stem_of(name);
    let split = |suffix: char| {
        let size = SPLIT_SECTORS * SECTOR;
        let n = capacity.div_ceil(size).max(1);
        (0..n)
            .map(|i| OutputFile {
                start: i * size,
                len: (capacity - i * size).min(size),
                name: format!("{stem}-{suffix}{:03}.vmdk", i + 1),
            })
            .collect()
    };
    match format {
        ExportFormat::TwoGbMaxExtentSparse => split('s'),
        ExportFormat::TwoGbMaxExtentFlat => split('f'),
        ExportFormat::MonolithicFlat | ExportFormat::Vmfs => vec![OutputFile {
            start: 0,
            len: capacity,
            name: format!("{stem}-flat.vmdk"),
        }],
        ExportFormat::StreamOptimized | ExportFormat::MonolithicSparse | ExportFormat::Raw => {
            vec![OutputFile {
                start: 0,
                len: capacity,
                name: name.to_string(),
            }]
        }
    }
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
        }
    }

    /// The metadata of an increment of `chain`'s top layer: its content ID, and as parent
    /// the content ID of the layers below with the name `hint` (default: the parent's
    /// file name).
    pub fn for_delta(chain: &Chain, hint: Option<&str>) -> Result<OutputMeta> {
        if chain.layers.len() < 2 {
            return Err(Error::InvalidInput(format!(
                "`{}` has no parent: an increment holds what a delta adds to its parent; export it in full instead",
                chain.top().path.display()
            )));
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

fn extent_lines(format: ExportFormat, pieces: &[OutputFile]) -> Vec<ExtentLine> {
    pieces
        .iter()
        .map(|p| ExtentLine {
            access: Access::Rw,
            sectors: p.len / SECTOR,
            kind: match format {
                ExportFormat::Vmfs => ExtentType::Vmfs,
                ExportFormat::MonolithicFlat | ExportFormat::TwoGbMaxExtentFlat => ExtentType::Flat,
                _ => ExtentType::Sparse,
            },
            file: Some(p.name.clone()),
            offset: matches!(
                format,
                ExportFormat::MonolithicFlat | ExportFormat::TwoGbMaxExtentFlat
            )
            .then_some(0),
            extra: vec![],
        })
        .collect()
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
    let pieces = plan_extents(format, cap, name);
    let descriptor = describe(format, meta, cap, name, &pieces);
    OutputPlan {
        pieces,
        descriptor,
        separate_descriptor: matches!(
            format,
            ExportFormat::TwoGbMaxExtentSparse
                | ExportFormat::MonolithicFlat
                | ExportFormat::TwoGbMaxExtentFlat
                | ExportFormat::Vmfs
        ),
    }
}

/// The descriptor text of an output named `name` (None for raw).
fn describe(
    format: ExportFormat,
    meta: &OutputMeta,
    cap: u64,
    name: &str,
    pieces: &[OutputFile],
) -> Option<Vec<u8>> {
    let ct = format.create_type()?;
    let lines = match format {
        ExportFormat::StreamOptimized | ExportFormat::MonolithicSparse => vec![ExtentLine::rw(
            ExtentType::Sparse,
            cap / SECTOR,
            name.to_string(),
        )],
        _ => extent_lines(format, pieces),
    };
    Some(
        output_descriptor(meta, cap, ct, lines)
            .to_text()
            .into_bytes(),
    )
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
    let mut manifest =
        (opts.manifest.is_some() || opts.checksum).then(|| ManifestBuilder::new(cap));
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
    let embedded = match format {
        ExportFormat::MonolithicSparse => descriptor.clone(),
        _ => None,
    };
    let producer = Producer {
        disk: chain,
        compress: (format == ExportFormat::StreamOptimized).then_some(opts.level),
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
            let descriptor_file = separate_descriptor.then(|| {
                (
                    path.clone(),
                    descriptor.clone().expect("descriptor formats"),
                )
            });
            let kind = match format {
                ExportFormat::StreamOptimized => FileKind::Stream {
                    descriptor: descriptor.clone().expect("stream descriptor"),
                    delta: opts.delta,
                },
                f if f.is_sparse() => FileKind::Sparse {
                    embedded: embedded.clone(),
                },
                _ => FileKind::Flat {
                    prealloc: opts.prealloc,
                },
            };
            sink::to_files(kind, cap, dir, pieces, descriptor_file, opts.force)?
        }
        Dest::Writer { .. } if feed.is_some() => {
            return Err(Error::InvalidInput(
                "a streamed source can only be imported to files".into(),
            ));
        }
        Dest::Writer { w, name: _ } => {
            let kind = match format {
                ExportFormat::StreamOptimized => SeqKind::Stream {
                    descriptor: descriptor.clone().expect("stream descriptor"),
                    delta: opts.delta,
                },
                // Sparse extents are laid out from a zero-scan pass; flat files in a tar
                // use it too, to become GNU sparse members (a thin disk stays small on
                // tape).
                _ => SeqKind::Files {
                    nonzero_grains: if format != ExportFormat::Raw {
                        Some(pipeline::scan(chain, popts, &crate::copy::NoProgress)?)
                    } else {
                        None
                    },
                    sparse_extents: format.is_sparse(),
                    files: pieces,
                    embedded: embedded.clone(),
                    tar: (!matches!(format, ExportFormat::Raw | ExportFormat::MonolithicSparse))
                        .then(|| {
                            (
                                name.clone(),
                                descriptor.clone().expect("tar formats have a descriptor"),
                                mtime,
                            )
                        }),
                },
            };
            sink::to_writer(w, kind, cap)?
        }
    };
    match feed {
        Some(f) => {
            pipeline::drive_feed(f, popts, &producer, sink.as_mut(), &mut observe, progress)?
        }
        None => pipeline::drive(
            chain,
            popts,
            &producer,
            sink.as_mut(),
            &mut observe,
            progress,
        )?,
    }
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
