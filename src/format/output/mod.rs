//! Output formats: everything vmdkit writes a disk as. Each format is one file in this
//! folder implementing [`OutputFormat`] (its files and descriptor, the sinks that write
//! it to files and to a pipe, its size for `measure`), and one line in
//! [`ExportFormat::spec`], the table the engine looks formats up in.
//!
//! The interface between the copy engine and a format is small: the engine plans the
//! disk into [`Unit`]s, reads and checks each in parallel into a [`Piece`] (zero flags
//! per 64 KiB grain, compressed records when the format asks for them), and hands them
//! in address order to the format's [`Sink`]. A sink never sees a chain, a lock or a
//! thread.
//!
//! Adding a format (say qcow2): a file here with a unit struct implementing
//! [`OutputFormat`]; a variant of [`ExportFormat`] and its line in `spec`; a variant of
//! [`DiskType`] and its line (names, format, allocation) in `DISK_TYPES`. Nothing in the
//! engine, `export`, `import`, `measure` or the command line changes.

mod flat;
pub(crate) use flat::allocate;
mod seq;
mod sparse;
mod stream;
pub(crate) mod tar;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, ExtentLine};
use crate::io::write_error;
use crate::output::AtomicFile;

/// Grain size of every output: 64 KiB.
pub const GRAIN: u64 = 65536;

// ---------------------------------------------------------------------------------------
// What the engine hands a sink

/// One piece of work: `len` bytes at `start`. `read` is false for ranges the map says
/// read as zeros (no I/O needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// First byte.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Whether the range must be read (false: known zeros).
    pub read: bool,
}

/// What the parallel stage hands the sink for one unit.
pub enum Piece {
    /// All zeros: nothing to write.
    Hole,
    /// Bytes with something in them.
    Data {
        /// The unit's bytes.
        buf: Vec<u8>,
        /// One flag per 64 KiB grain of the unit.
        nonzero: Vec<bool>,
        /// Stream records of the nonzero grains, in order (formats that compress).
        records: Vec<Vec<u8>>,
        /// CRC-32 of the unit, when asked for.
        crc: Option<crc32fast::Hasher>,
    },
}

/// One output file: a byte range of the disk and the file's name.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// First byte of the disk it holds.
    pub start: u64,
    /// Bytes of the disk it holds.
    pub len: u64,
    /// File name (no folder).
    pub name: String,
}

/// Consumes a copy's pieces in address order.
pub trait Sink: Send {
    /// Take unit `u` and its piece.
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()>;
    /// Complete the output(s).
    fn finish(&mut self) -> Result<CopyReport>;
}

// ---------------------------------------------------------------------------------------
// The formats

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
    /// The format's implementation: the table every use of a format goes through.
    pub(crate) fn spec(self) -> &'static dyn OutputFormat {
        match self {
            ExportFormat::StreamOptimized => &stream::StreamOptimized,
            ExportFormat::MonolithicSparse => &sparse::HostedSparse::MONOLITHIC,
            ExportFormat::TwoGbMaxExtentSparse => &sparse::HostedSparse::SPLIT,
            ExportFormat::MonolithicFlat => &flat::Flat::MONOLITHIC,
            ExportFormat::TwoGbMaxExtentFlat => &flat::Flat::SPLIT,
            ExportFormat::Vmfs => &flat::Flat::VMFS,
            ExportFormat::Raw => &flat::Flat::RAW,
        }
    }

    /// Parse a format name: any [`DiskType`] name (thin and thick `vmfs` are one format;
    /// the allocation is [`DiskType::format`]'s second half).
    pub fn parse(s: &str) -> Option<ExportFormat> {
        DiskType::parse(s).map(|t| t.format().0)
    }

    /// The createType written (None for outputs without a VMDK descriptor: raw).
    pub(crate) fn create_type(self) -> Option<CreateType> {
        self.spec().create_type()
    }
}

/// How flat outputs are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Holes where the content is zero (thin).
    #[default]
    Thin,
    /// Every block allocated (fallocate), zeros not written (zeroedthick).
    Allocate,
    /// Every byte written (eagerzeroedthick).
    WriteZeros,
}

/// What a copy wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct CopyReport {
    /// Files written (empty for a writer).
    pub files: Vec<PathBuf>,
    /// Bytes of output.
    pub bytes_out: u64,
    /// Grains of data written.
    pub grains: u64,
    /// Zeroed grain entries written (increments).
    pub zeroed_grains: u64,
    /// CRC-32 of the whole content, when asked for (`ExportOptions::checksum`) or
    /// computed for a manifest.
    pub crc32: Option<u32>,
    /// What a guest-aware copy found in the guest and left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::guest::GuestReport>,
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

/// The disk types: each with the names it is chosen by (the first is how it is shown;
/// matched without regard to case), the format written and how flat files are
/// allocated. A new output format adds its line here and in [`ExportFormat::spec`].
const DISK_TYPES: &[(DiskType, &[&str], ExportFormat, Prealloc)] = &[
    (
        DiskType::Thin,
        &["thin", "vmfs", "vmfsthin"],
        ExportFormat::Vmfs,
        Prealloc::Thin,
    ),
    (
        DiskType::ZeroedThick,
        &["zeroedthick", "thick", "preallocated"],
        ExportFormat::Vmfs,
        Prealloc::Allocate,
    ),
    (
        DiskType::EagerZeroedThick,
        &["eagerzeroedthick"],
        ExportFormat::Vmfs,
        Prealloc::WriteZeros,
    ),
    (
        DiskType::MonolithicSparse,
        &["monolithicSparse", "sparse"],
        ExportFormat::MonolithicSparse,
        Prealloc::Thin,
    ),
    (
        DiskType::TwoGbMaxExtentSparse,
        &[
            "twoGbMaxExtentSparse",
            "2gbmaxextentsparse",
            "2gbsparse",
            "split",
        ],
        ExportFormat::TwoGbMaxExtentSparse,
        Prealloc::Thin,
    ),
    (
        DiskType::MonolithicFlat,
        &["monolithicFlat", "flat"],
        ExportFormat::MonolithicFlat,
        Prealloc::Thin,
    ),
    (
        DiskType::TwoGbMaxExtentFlat,
        &[
            "twoGbMaxExtentFlat",
            "2gbmaxextentflat",
            "2gbflat",
            "splitflat",
        ],
        ExportFormat::TwoGbMaxExtentFlat,
        Prealloc::Thin,
    ),
    (
        DiskType::StreamOptimized,
        &["streamOptimized", "stream"],
        ExportFormat::StreamOptimized,
        Prealloc::Thin,
    ),
    (DiskType::Raw, &["raw"], ExportFormat::Raw, Prealloc::Thin),
];

impl DiskType {
    /// Every name [`parse`](Self::parse) takes, for messages and help.
    pub const NAMES: &'static str = "thin (vmfs), zeroedthick (thick), eagerzeroedthick, monolithicSparse (sparse), twoGbMaxExtentSparse (2gbsparse, split), monolithicFlat (flat), twoGbMaxExtentFlat (2gbflat), streamOptimized (stream), raw";

    /// Parse a type name.
    pub fn parse(s: &str) -> Option<DiskType> {
        DISK_TYPES
            .iter()
            .find(|(_, names, ..)| names.iter().any(|n| n.eq_ignore_ascii_case(s)))
            .map(|(t, ..)| *t)
    }

    /// Every name [`parse`](Self::parse) takes, each type's own name first.
    pub fn names() -> impl Iterator<Item = &'static str> {
        DISK_TYPES
            .iter()
            .flat_map(|(_, names, ..)| names.iter().copied())
    }

    /// Parse, or explain which names exist.
    pub fn parse_or_explain(s: &str) -> Result<DiskType> {
        Self::parse(s).ok_or_else(|| {
            Error::InvalidInput(format!("unknown disk type `{s}` (one of: {})", Self::NAMES))
        })
    }

    /// The output format written and how its flat files are allocated.
    pub fn format(self) -> (ExportFormat, Prealloc) {
        let (_, _, f, p) = DISK_TYPES
            .iter()
            .find(|(t, ..)| *t == self)
            .expect("every disk type is in the table");
        (*f, *p)
    }
}

/// An output format.
pub(crate) trait OutputFormat: Sync {
    /// Its createType; None for an output without a VMDK descriptor (raw).
    fn create_type(&self) -> Option<CreateType>;

    /// The files a disk of `cap` bytes written under `name` is made of, in address
    /// order, covering the disk (the descriptor file, when separate, is not one).
    fn files(&self, cap: u64, name: &str) -> Vec<OutputFile>;

    /// The descriptor's extent lines for those files.
    fn extent_lines(&self, cap: u64, name: &str, files: &[OutputFile]) -> Vec<ExtentLine>;

    /// Whether the descriptor is a file of its own; else embedded in the first file (or
    /// there is none).
    fn separate_descriptor(&self) -> bool;

    /// Whether the engine's workers compress each grain into a stream record for it.
    fn compresses(&self) -> bool {
        false
    }

    /// Whether its layout depends on which grains hold data, so that written to a pipe
    /// (no seeking back) it needs the engine's zero-scan pass first.
    fn needs_scan(&self, to: &PipeOutput) -> bool;

    /// A sink writing the output's files into a folder.
    fn file_sink(&self, out: FileOutput) -> Result<Box<dyn Sink>>;

    /// A sink writing the output to a pipe: itself when it is one file, else a tar
    /// stream of its files.
    fn pipe_sink(&self, out: PipeOutput) -> Result<Box<dyn Sink>>;

    /// Its sizes, from what the measuring pass counted.
    fn measure(&self, c: &Counted<'_>) -> Sizes;
}

/// An output to files.
pub(crate) struct FileOutput {
    /// The disk's capacity.
    pub capacity: u64,
    /// The folder the files go into.
    pub dir: PathBuf,
    /// The files, from [`OutputFormat::files`].
    pub files: Vec<OutputFile>,
    /// The descriptor text (VMDK formats).
    pub descriptor: Option<Vec<u8>>,
    /// The descriptor's own file, when separate.
    pub descriptor_path: PathBuf,
    /// Overwrite existing files.
    pub force: bool,
    /// How flat files are allocated.
    pub prealloc: Prealloc,
    /// An increment: zero grains the plan reads become zeroed entries (streams).
    pub delta: bool,
}

/// An output to a pipe.
pub(crate) struct PipeOutput {
    /// Where the bytes go.
    pub w: Box<dyn Write + Send>,
    /// The disk's capacity.
    pub capacity: u64,
    /// The output's name (tar members, descriptor).
    pub name: String,
    /// The files, from [`OutputFormat::files`].
    pub files: Vec<OutputFile>,
    /// The descriptor text (VMDK formats).
    pub descriptor: Option<Vec<u8>>,
    /// An increment (streams).
    pub delta: bool,
    /// Modification time of tar members.
    pub mtime: u64,
    /// The zero-scan bitmap (one bit per grain), when [`OutputFormat::needs_scan`].
    pub nonzero_grains: Option<Vec<u64>>,
}

/// What `measure`'s pass counted over the disk, for [`OutputFormat::measure`].
pub(crate) struct Counted<'a> {
    /// The disk's capacity.
    pub capacity: u64,
    /// The output's files.
    pub files: &'a [OutputFile],
    /// The descriptor text.
    pub descriptor: Option<&'a [u8]>,
    /// Data grains per file.
    pub data_grains: &'a [u64],
    /// Bytes of data.
    pub data_bytes: u64,
    /// Grain tables (of 512 grains) holding an entry.
    pub tables: u64,
    /// An increment.
    pub delta: bool,
    /// Flat files allocated whole.
    pub thick: bool,
    /// Compressed sizes: (grains, bytes) of every data grain when exact, else of a
    /// spread sample and of the first grains.
    pub compressed: Compressed,
}

/// Compressed record sizes the measuring pass took.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Compressed {
    /// Every data grain was compressed: the sum of the records.
    pub exact: Option<u64>,
    /// (grains, bytes) of the spread sample.
    pub sample: (u64, u64),
    /// (grains, bytes) of the first data grains.
    pub early: (u64, u64),
}

/// An output's sizes (see `Measurement`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sizes {
    /// Bytes it needs on a file system.
    pub required: u64,
    /// Bytes its files are long.
    pub file_size: u64,
    /// Bytes its files occupy.
    pub allocated: u64,
    /// Its size with every grain holding data, where that is meaningful.
    pub fully_allocated: Option<u64>,
    /// An estimate (a stream measured from a sample), else exact.
    pub estimate: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Shared by the sinks

/// Counts bytes through a writer and names it in errors.
pub(crate) struct CountingWriter {
    w: Box<dyn Write + Send>,
    pos: u64,
    name: PathBuf,
    /// For a file: start its writeback as it grows.
    behind: Option<crate::output::WriteBehind>,
}

impl CountingWriter {
    /// A writer into a new output file (its temporary), with its writeback started as
    /// it grows.
    pub(crate) fn to_file(f: &AtomicFile) -> Result<CountingWriter> {
        let w = f
            .file()
            .try_clone()
            .map_err(|e| Error::io("open", f.tmp_path(), 0, e))?;
        Ok(CountingWriter {
            behind: crate::output::WriteBehind::new(&w),
            w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
            pos: 0,
            name: f.tmp_path().to_path_buf(),
        })
    }

    /// A writer into a pipe.
    pub(crate) fn to_pipe(w: Box<dyn Write + Send>) -> CountingWriter {
        CountingWriter {
            behind: None,
            w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
            pos: 0,
            name: PathBuf::from("<stdout>"),
        }
    }

    /// The name it goes by in errors.
    pub(crate) fn name(&self) -> &Path {
        &self.name
    }

    pub(crate) fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| write_error(&self.name, self.pos, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }
    pub(crate) fn zeros(&mut self, n: u64) -> Result<()> {
        for z in crate::io::zero_chunks(n) {
            self.write(z)?;
        }
        Ok(())
    }
    pub(crate) fn pad_to(&mut self, boundary: u64) -> Result<()> {
        let r = self.pos % boundary;
        if r != 0 {
            self.zeros(boundary - r)?;
        }
        Ok(())
    }
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| write_error(&self.name, self.pos, e))
    }
}

impl Write for CountingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.pos += n as u64;
        if let Some(wb) = &mut self.behind {
            wb.advance(self.pos);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A file written under a temporary name, kept until every output is complete.
pub(crate) struct WrittenFile(pub(crate) AtomicFile);

pub(crate) fn commit_all(pending: Vec<WrittenFile>, force: bool) -> Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = Vec::new();
    // Extents first, the descriptor (pushed last) last: an interrupted rename sequence
    // never leaves a descriptor pointing at missing extents. A rename that fails takes
    // back the files already renamed: no partial output stays behind.
    for p in pending {
        let target = p.0.target().to_path_buf();
        if let Err(e) = p.0.commit(force) {
            let _ = crate::output::remove_durably(&names);
            return Err(e);
        }
        names.push(target);
    }
    Ok(names)
}

/// Write a descriptor file (text) under its temporary name; it is renamed last.
pub(crate) fn descriptor_file(path: &Path, text: &[u8], force: bool) -> Result<WrittenFile> {
    use std::os::unix::fs::FileExt;
    let f = AtomicFile::create(path, force)?;
    f.file()
        .write_all_at(text, 0)
        .map_err(|e| write_error(f.tmp_path(), 0, e))?;
    Ok(WrittenFile(f))
}

/// The 2 GB extents of a split output named `name` (`NAME-s001.vmdk`...; `suffix` is
/// `s` for sparse, `f` for flat).
pub(crate) fn split_files(cap: u64, name: &str, suffix: char) -> Vec<OutputFile> {
    let stem = name.strip_suffix(".vmdk").unwrap_or(name);
    let size = crate::format::sparse::SPLIT_SECTORS * crate::format::sparse::SECTOR;
    let n = cap.div_ceil(size).max(1);
    (0..n)
        .map(|i| OutputFile {
            start: i * size,
            len: (cap - i * size).min(size),
            name: format!("{stem}-{suffix}{:03}.vmdk", i + 1),
        })
        .collect()
}

/// The runs of grains holding data in a unit (`nonzero`: one flag per grain), as grain
/// index ranges: what a sink writes with one call each.
pub(crate) fn data_runs(nonzero: &[bool]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut g = 0;
    std::iter::from_fn(move || {
        while g < nonzero.len() && !nonzero[g] {
            g += 1;
        }
        let start = g;
        while g < nonzero.len() && nonzero[g] {
            g += 1;
        }
        (start < g).then_some(start..g)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every disk type has its line, and the names listed for people are the names
    /// parsed.
    #[test]
    fn the_disk_type_table_is_whole_and_named_as_help_says() {
        for (t, names, ..) in DISK_TYPES {
            for n in *names {
                assert_eq!(DiskType::parse(n), Some(*t), "{n}");
                assert_eq!(DiskType::parse(&n.to_uppercase()), Some(*t), "{n}");
            }
            let _ = t.format();
        }
        for shown in DiskType::NAMES
            .split([',', '(', ')', ' '])
            .filter(|w| !w.is_empty())
        {
            assert!(DiskType::parse(shown).is_some(), "{shown}");
        }
        assert_eq!(DiskType::parse("qcow2"), None);
    }
}
