//! `export`: a disk or a whole chain (flattened) to compact files or a pipe.
//!
//! Zero data is never written: grains unallocated in every layer, zeroed grains, holes of
//! flat files and allocated grains whose bytes are all zero are left out of sparse
//! outputs and become holes in flat/raw files.
//!
//! Output kinds:
//! - streamOptimized: VMware's layout (formats.md §3.5a): header with GD_AT_END,
//!   descriptor, grain records, a GT marker + GT after each 512-grain window that has
//!   grains, GD marker + GD, footer marker + footer, EOS. Single pass, no seeking.
//! - monolithicSparse / twoGbMaxExtentSparse: [`SparseLayout`]; grains packed in LBA order
//!   after preallocated tables. To a file the grains are written first and the tables
//!   last (seeking); to a pipe a zero-scan pass computes the tables first. Both give the
//!   same bytes.
//! - monolithicFlat / twoGbMaxExtentFlat / vmfs / raw: flat files with holes; to a pipe,
//!   raw is the plain content and the descriptor-based kinds become a tar stream.
//!
//! All kinds run on the ordered parallel pipeline ([`crate::pipeline`]).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::chain::Chain;
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{Access, CreateType, Descriptor, ExtentLine, ExtentType};
use crate::format::sparse::{sector_entry, GrainEntries, SparseLayout, SECTOR};
use crate::format::stream::{grain_record, StreamWriter};
use crate::ops::manifest::ManifestBuilder;
use crate::ops::output::{check_target, write_error, AtomicFile};
use crate::ops::Progress;
use crate::pipeline::{self, is_zero, PipelineOptions, Planner, Unit};

/// Grain size of every sparse output (VMware's only accepted value for streams).
pub const GRAIN: u64 = 65536;
/// Sectors per extent of the split formats, as VMware writes them (2047 MiB).
pub const SPLIT_SECTORS: u64 = 4_192_256;

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
    /// Parse a format name: createType names (case-insensitive) and short aliases.
    pub fn parse(s: &str) -> Option<ExportFormat> {
        Some(match s.to_ascii_lowercase().as_str() {
            "stream" | "streamoptimized" => ExportFormat::StreamOptimized,
            "sparse" | "monolithicsparse" => ExportFormat::MonolithicSparse,
            "split" | "twogbmaxextentsparse" | "2gbmaxextentsparse" | "2gbsparse" => {
                ExportFormat::TwoGbMaxExtentSparse
            }
            "flat" | "monolithicflat" => ExportFormat::MonolithicFlat,
            "twogbmaxextentflat" | "2gbmaxextentflat" | "splitflat" => {
                ExportFormat::TwoGbMaxExtentFlat
            }
            "vmfs" | "thin" => ExportFormat::Vmfs,
            "raw" => ExportFormat::Raw,
            _ => return None,
        })
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

    fn is_sparse(self) -> bool {
        matches!(
            self,
            ExportFormat::MonolithicSparse | ExportFormat::TwoGbMaxExtentSparse
        )
    }
}

/// Options of an export.
#[derive(Debug, Clone)]
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

/// What an export did.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    /// Files written (empty for a writer).
    pub files: Vec<PathBuf>,
    /// Bytes of output.
    pub bytes_out: u64,
    /// Grains of data written.
    pub grains: u64,
}

// ---------------------------------------------------------------------------------------
// Produce stage

/// What the parallel stage hands the sink for one unit.
enum Piece {
    /// All zeros: nothing to write.
    Hole,
    Data {
        buf: Vec<u8>,
        /// One flag per 64 KiB grain of the unit.
        nonzero: Vec<bool>,
        /// Stream records of the nonzero grains, in order.
        records: Vec<Vec<u8>>,
        crc: Option<crc32fast::Hasher>,
    },
}

struct Producer<'a> {
    disk: &'a dyn VirtualDisk,
    compress: Option<u32>,
    crc: bool,
}

impl Producer<'_> {
    fn produce(&self, u: &Unit) -> Result<Piece> {
        if !u.read {
            return Ok(Piece::Hole);
        }
        let mut buf = vec![0u8; u.len as usize];
        self.disk.read_at(&mut buf, u.start)?;
        self.piece(u, buf)
    }

    fn piece(&self, u: &Unit, buf: Vec<u8>) -> Result<Piece> {
        let nonzero: Vec<bool> = buf.chunks(GRAIN as usize).map(|g| !is_zero(g)).collect();
        if !nonzero.contains(&true) {
            return Ok(Piece::Hole);
        }
        let mut records = Vec::new();
        if let Some(level) = self.compress {
            for (i, g) in buf.chunks(GRAIN as usize).enumerate() {
                if nonzero[i] {
                    let lba = (u.start + i as u64 * GRAIN) / SECTOR;
                    records.push(grain_record(lba, g, level)?);
                }
            }
        }
        let crc = self.crc.then(|| {
            let mut h = crc32fast::Hasher::new();
            h.update(&buf);
            h
        });
        Ok(Piece::Data {
            buf,
            nonzero,
            records,
            crc,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Naming and descriptors

/// One output extent: a byte range of the disk and its file name.
#[derive(Debug, Clone)]
struct Piece0 {
    start: u64,
    len: u64,
    name: String,
}

fn stem_of(name: &str) -> String {
    let n = name.strip_suffix(".vmdk").unwrap_or(name);
    n.to_string()
}

fn plan_extents(format: ExportFormat, capacity: u64, name: &str) -> Vec<Piece0> {
    let stem = stem_of(name);
    let split = |suffix: char| {
        let size = SPLIT_SECTORS * SECTOR;
        let n = capacity.div_ceil(size).max(1);
        (0..n)
            .map(|i| Piece0 {
                start: i * size,
                len: (capacity - i * size).min(size),
                name: format!("{stem}-{suffix}{:03}.vmdk", i + 1),
            })
            .collect()
    };
    match format {
        ExportFormat::TwoGbMaxExtentSparse => split('s'),
        ExportFormat::TwoGbMaxExtentFlat => split('f'),
        ExportFormat::MonolithicFlat | ExportFormat::Vmfs => vec![Piece0 {
            start: 0,
            len: capacity,
            name: format!("{stem}-flat.vmdk"),
        }],
        ExportFormat::StreamOptimized | ExportFormat::MonolithicSparse | ExportFormat::Raw => {
            vec![Piece0 {
                start: 0,
                len: capacity,
                name: name.to_string(),
            }]
        }
    }
}

/// A content ID for the output: derived from the source chain's CIDs and the output
/// kind, so the same source exports to the same bytes (thread-count invariance, stdout
/// equal to file), never equal to the source's CID nor to `ffffffff`/`fffffffe`.
fn output_cid(chain: &Chain, format: ExportFormat) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(b"vmdkit export");
    h.update(&chain.capacity().to_le_bytes());
    h.update(format!("{format:?}").as_bytes());
    for l in &chain.layers {
        h.update(&l.cid().unwrap_or(0).to_le_bytes());
        h.update(l.create_type.as_str().as_bytes());
    }
    let mut c = h.finalize();
    while c >= 0xffff_fffe || Some(c) == chain.top().cid() {
        c = c.wrapping_mul(2_654_435_761).wrapping_add(1);
    }
    c
}

/// What an output's descriptor is made from: DDB keys and a CID.
#[derive(Debug, Clone)]
pub struct OutputMeta {
    /// `ddb.*` entries to keep (keys with the prefix). The internal key `vmdkit.thick`
    /// marks thick outputs (no `ddb.thinProvisioned`).
    pub ddb: Vec<(String, String)>,
    /// The output's CID.
    pub cid: u32,
}

impl OutputMeta {
    fn thin(&self) -> bool {
        !self
            .ddb
            .iter()
            .any(|(k, v)| k == "vmdkit.thick" && v == "1")
    }

    /// The source chain's DDB keys (the base layer's, which hold the disk's real
    /// settings, then keys only children have) and a fresh CID.
    pub fn from_chain(chain: &Chain, format: ExportFormat) -> OutputMeta {
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
            cid: output_cid(chain, format),
        }
    }

    /// Use `adapter` and recompute the geometry for it (formats.md §9).
    pub fn set_adapter(&mut self, adapter: &str, capacity: u64) {
        self.ddb.retain(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k != "ddb.adaptertype" && !k.starts_with("ddb.geometry.")
        });
        let g = crate::ops::geometry::compute(capacity / SECTOR, adapter);
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
        let g = crate::ops::geometry::compute(capacity / SECTOR, &adapter);
        ddb.push(("ddb.geometry.cylinders".into(), g.cylinders.to_string()));
        ddb.push(("ddb.geometry.heads".into(), g.heads.to_string()));
        ddb.push(("ddb.geometry.sectors".into(), g.sectors.to_string()));
    }
    if ct == CreateType::Vmfs && meta.thin() {
        ddb.push(("ddb.thinProvisioned".into(), "1".into()));
    }
    let long = format!(
        "{:08x}{:08x}{:08x}{cid:08x}",
        crc32fast::hash(&cid.to_le_bytes()),
        crc32fast::hash(&(cid ^ 0x5555_5555).to_le_bytes()),
        crc32fast::hash(&(cid ^ 0xaaaa_aaaa).to_le_bytes())
    );
    ddb.push(("ddb.longContentID".into(), long));
    Descriptor::new(ct, cid, None, extents, &ddb)
}

fn extent_lines(format: ExportFormat, pieces: &[Piece0]) -> Vec<ExtentLine> {
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

/// Descriptor sectors reserved in a monolithic sparse/stream file.
fn embedded_sectors(text: &[u8]) -> u64 {
    (text.len() as u64).div_ceil(SECTOR).max(20)
}

// ---------------------------------------------------------------------------------------
// Sinks

trait Sink: Send {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()>;
    fn finish(&mut self) -> Result<ExportReport>;
}

/// Counts bytes through a writer and names it in errors.
struct Out {
    w: Box<dyn Write + Send>,
    pos: u64,
    name: PathBuf,
}

impl Out {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| write_error(&self.name, self.pos, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }
    fn zeros(&mut self, mut n: u64) -> Result<()> {
        static Z: [u8; 65536] = [0; 65536];
        while n > 0 {
            let k = n.min(Z.len() as u64) as usize;
            self.write(&Z[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
    fn pad_to(&mut self, boundary: u64) -> Result<()> {
        let r = self.pos % boundary;
        if r != 0 {
            self.zeros(boundary - r)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| write_error(&self.name, self.pos, e))
    }
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// streamOptimized, VMware layout, strictly sequential: the stream writer fed by the engine: records were compressed in parallel.
struct StreamSink {
    w: Option<StreamWriter<Out>>,
}

impl StreamSink {
    fn new(out: Out, capacity: u64, descriptor: &[u8]) -> Result<StreamSink> {
        let name = out.name.clone();
        Ok(StreamSink {
            w: Some(StreamWriter::new(out, capacity, descriptor, &name)?),
        })
    }
}

impl Sink for StreamSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        let Piece::Data {
            nonzero, records, ..
        } = p
        else {
            return Ok(());
        };
        let w = self.w.as_mut().expect("open until finish");
        let first = u.start / GRAIN;
        let mut recs = records.iter();
        for (i, _) in nonzero.iter().enumerate().filter(|(_, nz)| **nz) {
            let rec = recs.next().expect("one record per nonzero grain");
            w.write_record(first + i as u64, rec)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ExportReport> {
        let w = self.w.take().expect("finish once");
        let (_, bytes_out, grains) = w.finish()?;
        Ok(ExportReport {
            files: vec![],
            bytes_out,
            grains,
        })
    }
}

/// A file written under a temporary name, kept until every output is complete.
struct Pending(AtomicFile);

fn commit_all(pending: Vec<Pending>, force: bool) -> Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    // Extents first, the descriptor (pushed last) last: an interrupted rename sequence
    // never leaves a descriptor pointing at missing extents.
    for p in pending {
        names.push(p.0.target().to_path_buf());
        p.0.commit(force)?;
    }
    Ok(names)
}

/// Sparse extents written to files: grains first, tables last.
struct SparseFileSink {
    pieces: Vec<Piece0>,
    dir: PathBuf,
    embedded: Option<Vec<u8>>,
    descriptor_file: Option<(PathBuf, Vec<u8>)>,
    cur: Option<(usize, AtomicFile, SparseLayout, GrainEntries, u64)>,
    next: usize,
    pending: Vec<Pending>,
    force: bool,
    report: ExportReport,
}

impl SparseFileSink {
    fn open_next(&mut self) -> Result<()> {
        let i = self.next;
        let p = &self.pieces[i];
        let desc_sectors = self.embedded.as_deref().map_or(0, embedded_sectors);
        let layout = SparseLayout::new(p.len / SECTOR, desc_sectors);
        let f = AtomicFile::create(&self.dir.join(&p.name), self.force)?;
        self.cur = Some((i, f, layout, GrainEntries::new(layout.gtes), 0));
        self.next += 1;
        Ok(())
    }

    fn close_cur(&mut self) -> Result<()> {
        if let Some((_, f, layout, gtes, k)) = self.cur.take() {
            let file = f.file();
            layout.for_each_metadata_write(&gtes, self.embedded.as_deref(), |at, bytes| {
                file.write_all_at(bytes, at)
                    .map_err(|e| write_error(f.tmp_path(), at, e))
            })?;
            let size = layout.file_bytes(k);
            file.set_len(size)
                .map_err(|e| write_error(f.tmp_path(), size, e))?;
            self.report.bytes_out += size;
            self.pending.push(Pending(f));
        }
        Ok(())
    }

    /// Make the extent containing `pos` current (closing and creating those before it).
    fn seek_extent(&mut self, pos: u64) -> Result<()> {
        loop {
            if let Some((i, ..)) = &self.cur {
                let p = &self.pieces[*i];
                if pos < p.start + p.len {
                    return Ok(());
                }
                self.close_cur()?;
            }
            if self.next >= self.pieces.len() {
                return Ok(());
            }
            self.open_next()?;
        }
    }
}

impl Sink for SparseFileSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.seek_extent(u.start)?;
        let Piece::Data { buf, nonzero, .. } = p else {
            return Ok(());
        };
        let (i, f, layout, gtes, k) = self.cur.as_mut().expect("an extent covers every unit");
        let base = self.pieces[*i].start;
        let mut g = 0;
        while g < nonzero.len() {
            if !nonzero[g] {
                g += 1;
                continue;
            }
            let run_start = g;
            while g < nonzero.len() && nonzero[g] {
                g += 1;
            }
            let first_local = (u.start - base) / GRAIN + run_start as u64;
            let at = layout.grain_sector(*k) * SECTOR;
            for j in 0..(g - run_start) as u64 {
                let e = sector_entry(f.target(), layout.grain_sector(*k + j))?;
                gtes.set(first_local + j, e);
            }
            let from = run_start * GRAIN as usize;
            let to = (g * GRAIN as usize).min(buf.len());
            f.file()
                .write_all_at(&buf[from..to], at)
                .map_err(|e| write_error(f.tmp_path(), at, e))?;
            *k += (g - run_start) as u64;
            self.report.grains += (g - run_start) as u64;
        }
        // Tables wholly before this unit's end are complete: write them now and forget
        // them, so memory stays bounded by one table's span, not the disk.
        let done_to = (u.start + u.len - base) / GRAIN / layout.gtes;
        for (t, entries) in gtes.take_before(done_to) {
            for (at, bytes) in layout.table_writes(t, &entries) {
                f.file()
                    .write_all_at(&bytes, at)
                    .map_err(|e| write_error(f.tmp_path(), at, e))?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ExportReport> {
        self.seek_extent(u64::MAX)?;
        self.close_cur()?;
        let mut pending = std::mem::take(&mut self.pending);
        if let Some((path, text)) = self.descriptor_file.take() {
            let f = AtomicFile::create(&path, self.force)?;
            f.file()
                .write_all_at(&text, 0)
                .map_err(|e| write_error(f.tmp_path(), 0, e))?;
            self.report.bytes_out += text.len() as u64;
            pending.push(Pending(f));
        }
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
}

/// Flat extents (or one raw file) written to files with holes.
struct FlatFileSink {
    prealloc: Prealloc,
    pieces: Vec<Piece0>,
    dir: PathBuf,
    files: Vec<Option<AtomicFile>>,
    descriptor_file: Option<(PathBuf, Vec<u8>)>,
    force: bool,
    report: ExportReport,
}

impl FlatFileSink {
    fn file(&mut self, i: usize) -> Result<&AtomicFile> {
        if self.files[i].is_none() {
            let f = AtomicFile::create(&self.dir.join(&self.pieces[i].name), self.force)?;
            if self.prealloc != Prealloc::Thin {
                allocate(f.file(), f.tmp_path(), self.pieces[i].len)?;
            }
            self.files[i] = Some(f);
        }
        Ok(self.files[i].as_ref().expect("just opened"))
    }

    /// Write `buf` at virtual offset `pos`, across extents as needed.
    fn write_virtual(&mut self, buf: &[u8], pos: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let j = self.pieces.partition_point(|x| x.start + x.len <= at);
            let (pb, pl) = (self.pieces[j].start, self.pieces[j].len);
            let n = (buf.len() - done).min((pb + pl - at) as usize);
            let f = self.file(j)?;
            f.file()
                .write_all_at(&buf[done..done + n], at - pb)
                .map_err(|e| write_error(f.tmp_path(), at - pb, e))?;
            done += n;
        }
        Ok(())
    }
}

/// Allocate `len` bytes of a file (fallocate); where the filesystem cannot, the file is
/// only sized (by `set_len` later). A full disk is an error.
pub fn allocate(f: &std::fs::File, path: &std::path::Path, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(l) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    if l == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a valid, open, writable fd; no memory is touched.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, l) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(write_error(path, 0, e));
        }
    }
    Ok(())
}

impl Sink for FlatFileSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        if self.prealloc == Prealloc::WriteZeros {
            // eagerzeroedthick: every byte written, zeros too.
            match p {
                Piece::Data { buf, .. } => self.write_virtual(buf, u.start)?,
                Piece::Hole => {
                    let z = vec![0u8; (1 << 20).min(u.len) as usize];
                    let mut done = 0;
                    while done < u.len {
                        let n = (u.len - done).min(z.len() as u64) as usize;
                        self.write_virtual(&z[..n], u.start + done)?;
                        done += n as u64;
                    }
                }
            }
            return Ok(());
        }
        let Piece::Data { buf, nonzero, .. } = p else {
            return Ok(());
        };
        let mut g = 0;
        while g < nonzero.len() {
            if !nonzero[g] {
                g += 1;
                continue;
            }
            let s = g;
            while g < nonzero.len() && nonzero[g] {
                g += 1;
            }
            let from = s * GRAIN as usize;
            let to = (g * GRAIN as usize).min(buf.len());
            self.write_virtual(&buf[from..to], u.start + from as u64)?;
            self.report.grains += (g - s) as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ExportReport> {
        let mut pending = Vec::new();
        for i in 0..self.files.len() {
            self.file(i)?;
            let f = self.files[i].take().expect("opened");
            let len = self.pieces[i].len;
            f.file()
                .set_len(len)
                .map_err(|e| write_error(f.tmp_path(), len, e))?;
            pending.push(Pending(f));
        }
        if let Some((path, text)) = self.descriptor_file.take() {
            let f = AtomicFile::create(&path, self.force)?;
            f.file()
                .write_all_at(&text, 0)
                .map_err(|e| write_error(f.tmp_path(), 0, e))?;
            pending.push(Pending(f));
        }
        self.report.bytes_out = self.pieces.iter().map(|p| p.len).sum();
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
}

/// A tar member header (ustar; sizes past 8 GiB use the base-256 extension that GNU tar
/// and bsdtar read).
fn tar_header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::InvalidInput(format!("cannot name tar member `{name}`: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// Sequential outputs built from known extent sizes: raw content, flat extents in tar,
/// sparse extents (tables computed by the zero-scan pass) alone or in tar.
struct SeqSink {
    out: Out,
    pieces: Vec<Piece0>,
    /// Per piece: for sparse, (layout, gtes, allocated grains); None for flat.
    sparse: Vec<Option<(SparseLayout, GrainEntries, u64)>>,
    embedded: Option<Vec<u8>>,
    tar: bool,
    mtime: u64,
    cur: Option<usize>,
    /// Position inside the current piece (flat: virtual bytes written; sparse: grains).
    done: u64,
    grains: u64,
}

impl SeqSink {
    fn begin(&mut self, i: usize) -> Result<()> {
        let p = &self.pieces[i];
        match &self.sparse[i] {
            Some((layout, gtes, k)) => {
                if self.tar {
                    let h = tar_header(&p.name, layout.file_bytes(*k), self.mtime)?;
                    self.out.write(&h)?;
                }
                // In order, the gaps (empty tables, padding) streamed as zeros.
                let mut pos = 0u64;
                let out = &mut self.out;
                layout.for_each_metadata_write(gtes, self.embedded.as_deref(), |at, bytes| {
                    out.zeros(at - pos)?;
                    out.write(bytes)?;
                    pos = at + bytes.len() as u64;
                    Ok(())
                })?;
                self.out.zeros(layout.over_head * SECTOR - pos)?;
            }
            None => {
                if self.tar {
                    let h = tar_header(&p.name, p.len, self.mtime)?;
                    self.out.write(&h)?;
                }
            }
        }
        self.cur = Some(i);
        self.done = 0;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let Some(i) = self.cur.take() else {
            return Ok(());
        };
        match &self.sparse[i] {
            Some((_, _, k)) => {
                if self.done != *k {
                    return Err(Error::InvalidInput(format!(
                        "the source changed between the zero-scan pass and the write pass ({} grains planned, {} found in extent {})",
                        k, self.done, self.pieces[i].name
                    )));
                }
            }
            None => {
                let rest = self.pieces[i].len - self.done;
                self.out.zeros(rest)?;
            }
        }
        if self.tar {
            self.out.pad_to(512)?;
        }
        Ok(())
    }

    fn seek_piece(&mut self, pos: u64) -> Result<()> {
        loop {
            let next = match self.cur {
                Some(i) if pos < self.pieces[i].start + self.pieces[i].len => return Ok(()),
                Some(i) => i + 1,
                None => 0,
            };
            self.end()?;
            if next >= self.pieces.len() {
                return Ok(());
            }
            self.begin(next)?;
        }
    }
}

impl Sink for SeqSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.seek_piece(u.start)?;
        let i = self.cur.expect("a piece covers every unit");
        let base = self.pieces[i].start;
        if self.sparse[i].is_some() {
            let Piece::Data { buf, nonzero, .. } = p else {
                return Ok(());
            };
            for (g, chunk) in buf.chunks(GRAIN as usize).enumerate() {
                if nonzero[g] {
                    self.out.write(chunk)?;
                    self.out.zeros(GRAIN - chunk.len() as u64)?;
                    self.done += 1;
                    self.grains += 1;
                }
            }
        } else {
            let at = u.start - base;
            self.out.zeros(at - self.done)?;
            match p {
                Piece::Data { buf, nonzero, .. } => {
                    self.out.write(buf)?;
                    self.grains += nonzero.iter().filter(|&&n| n).count() as u64;
                }
                Piece::Hole => self.out.zeros(u.len)?,
            }
            self.done = at + u.len;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ExportReport> {
        self.seek_piece(u64::MAX)?;
        self.end()?;
        if self.tar {
            self.out.zeros(1024)?;
        }
        self.out.flush()?;
        Ok(ExportReport {
            files: vec![],
            bytes_out: self.out.pos,
            grains: self.grains,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Driver

fn drive(
    disk: &dyn VirtualDisk,
    popts: PipelineOptions,
    producer: &Producer<'_>,
    sink: &mut dyn Sink,
    mut manifest: Option<&mut ManifestBuilder>,
    progress: &dyn Progress,
) -> Result<()> {
    let mut planner = Planner::new(disk, popts.unit);
    pipeline::run(
        &mut planner,
        popts,
        |u| producer.produce(u),
        |u, p| {
            if let Some(m) = manifest.as_deref_mut() {
                match &p {
                    Piece::Hole => m.zeros(u.start, u.len),
                    Piece::Data { crc, .. } => {
                        m.block(u.start, crc.clone().expect("crc requested"))
                    }
                }
            }
            sink.put(&u, &p)?;
            progress.inc(u.len);
            Ok(())
        },
    )
}

/// Content pushed from a sequential source (import from a pipe) instead of read from a
/// disk: `run` calls `put(unit, bytes)` for 1 MiB-aligned units in ascending order (units
/// it skips are zeros).
pub trait Feed {
    /// Push every unit.
    fn run(&mut self, put: &mut dyn FnMut(Unit, Vec<u8>) -> Result<()>) -> Result<()>;
}

fn drive_feed(
    feed: &mut dyn Feed,
    producer: &Producer<'_>,
    sink: &mut dyn Sink,
    mut manifest: Option<&mut ManifestBuilder>,
    progress: &dyn Progress,
) -> Result<()> {
    let mut next = 0u64;
    let cap = producer.disk.capacity();
    feed.run(&mut |u: Unit, buf: Vec<u8>| {
        if u.start > next {
            let gap = Unit {
                start: next,
                len: u.start - next,
                read: false,
            };
            if let Some(m) = manifest.as_deref_mut() {
                m.zeros(gap.start, gap.len);
            }
            sink.put(&gap, &Piece::Hole)?;
            progress.inc(gap.len);
        }
        let p = producer.piece(&u, buf)?;
        if let Some(m) = manifest.as_deref_mut() {
            match &p {
                Piece::Hole => m.zeros(u.start, u.len),
                Piece::Data { crc, .. } => m.block(u.start, crc.clone().expect("crc requested")),
            }
        }
        sink.put(&u, &p)?;
        progress.inc(u.len);
        next = u.start + u.len;
        Ok(())
    })?;
    if next < cap {
        let gap = Unit {
            start: next,
            len: cap - next,
            read: false,
        };
        if let Some(m) = manifest {
            m.zeros(gap.start, gap.len);
        }
        sink.put(&gap, &Piece::Hole)?;
    }
    Ok(())
}

/// The zero-scan pass: which 64 KiB grains hold non-zero data.
fn scan(
    disk: &dyn VirtualDisk,
    popts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<Vec<u64>> {
    let grains = disk.capacity().div_ceil(GRAIN);
    let mut bits = vec![0u64; grains.div_ceil(64) as usize];
    let producer = Producer {
        disk,
        compress: None,
        crc: false,
    };
    let mut planner = Planner::new(disk, popts.unit);
    pipeline::run(
        &mut planner,
        popts,
        |u| {
            Ok(match producer.produce(u)? {
                Piece::Hole => Vec::new(),
                Piece::Data { nonzero, .. } => nonzero,
            })
        },
        |u, nonzero| {
            let first = u.start / GRAIN;
            for (i, nz) in nonzero.iter().enumerate() {
                if *nz {
                    let g = first + i as u64;
                    bits[(g / 64) as usize] |= 1 << (g % 64);
                }
            }
            progress.inc(u.len);
            Ok(())
        },
    )?;
    Ok(bits)
}

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

/// Export any disk with descriptor metadata `meta` (`mtime` dates tar members); when
/// `feed` is given it pushes the content and `chain` only supplies the capacity (files
/// only).
pub fn export_fed(
    chain: &dyn VirtualDisk,
    mut feed: Option<&mut dyn Feed>,
    meta: &OutputMeta,
    mtime: u64,
    dest: Dest,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let cap = chain.capacity();
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
    let format = opts.format;
    let popts = PipelineOptions {
        threads: opts.threads,
        unit: opts.unit,
    };
    let sources = chain.source_files();
    if let Some(m) = &opts.manifest {
        crate::guard::refuse_source_as_target(m, &sources)?;
        check_target(m, opts.force)?;
    }
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&sources)?;
    let mut manifest = opts.manifest.as_ref().map(|_| ManifestBuilder::new(cap));
    let name = match &dest {
        Dest::Path(p) => p
            .file_name()
            .ok_or_else(|| Error::InvalidInput(format!("`{}` is not a file name", p.display())))?
            .to_string_lossy()
            .into_owned(),
        Dest::Writer { name, .. } => name.clone(),
    };
    crate::format::descriptor::check_file_name(&name)?;
    let pieces = plan_extents(format, cap, &name);
    let descriptor = format.create_type().map(|ct| {
        let lines = match format {
            ExportFormat::StreamOptimized | ExportFormat::MonolithicSparse => vec![ExtentLine {
                access: Access::Rw,
                sectors: cap / SECTOR,
                kind: ExtentType::Sparse,
                file: Some(name.clone()),
                offset: None,
                extra: vec![],
            }],
            _ => extent_lines(format, &pieces),
        };
        output_descriptor(meta, cap, ct, lines)
            .to_text()
            .into_bytes()
    });
    let embedded = match format {
        ExportFormat::MonolithicSparse => descriptor.clone(),
        _ => None,
    };
    let producer = Producer {
        disk: chain,
        compress: (format == ExportFormat::StreamOptimized).then_some(opts.level),
        crc: manifest.is_some(),
    };

    let report = match dest {
        Dest::Path(path) => {
            let dir = crate::resolve::folder_of(&path);
            // Refuse before doing any work.
            crate::guard::refuse_source_as_target(&path, &sources)?;
            check_target(&path, opts.force)?;
            for p in &pieces {
                crate::guard::refuse_source_as_target(&dir.join(&p.name), &sources)?;
                check_target(&dir.join(&p.name), opts.force)?;
            }
            let separate_descriptor = matches!(
                format,
                ExportFormat::TwoGbMaxExtentSparse
                    | ExportFormat::MonolithicFlat
                    | ExportFormat::TwoGbMaxExtentFlat
                    | ExportFormat::Vmfs
            );
            let descriptor_file = if separate_descriptor {
                Some((
                    path.clone(),
                    descriptor.clone().expect("descriptor formats"),
                ))
            } else {
                None
            };
            let mut sink: Box<dyn Sink> = match format {
                ExportFormat::StreamOptimized => {
                    let f = AtomicFile::create(&path, opts.force)?;
                    let w = f
                        .file()
                        .try_clone()
                        .map_err(|e| Error::io("open", f.tmp_path(), 0, e))?;
                    let out = Out {
                        w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
                        pos: 0,
                        name: f.tmp_path().to_path_buf(),
                    };
                    let inner = StreamSink::new(
                        out,
                        cap,
                        descriptor.as_deref().expect("stream descriptor"),
                    )?;
                    Box::new(FileWrapped {
                        inner,
                        file: Some(f),
                        force: opts.force,
                    })
                }
                f if f.is_sparse() => Box::new(SparseFileSink {
                    pieces: pieces.clone(),
                    dir: dir.clone(),
                    embedded: embedded.clone(),
                    descriptor_file,
                    cur: None,
                    next: 0,
                    pending: vec![],
                    force: opts.force,
                    report: ExportReport::default(),
                }),
                _ => Box::new(FlatFileSink {
                    prealloc: opts.prealloc,
                    files: pieces.iter().map(|_| None).collect(),
                    pieces: pieces.clone(),
                    dir: dir.clone(),
                    descriptor_file,
                    force: opts.force,
                    report: ExportReport::default(),
                }),
            };
            match feed.as_deref_mut() {
                Some(f) => drive_feed(f, &producer, sink.as_mut(), manifest.as_mut(), progress)?,
                None => drive(
                    chain,
                    popts,
                    &producer,
                    sink.as_mut(),
                    manifest.as_mut(),
                    progress,
                )?,
            }
            sink.finish()?
        }
        Dest::Writer { .. } if feed.is_some() => {
            return Err(Error::InvalidInput(
                "a streamed source can only be imported to files".into(),
            ));
        }
        Dest::Writer { w, name: _ } => {
            let mut out = Out {
                w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
                pos: 0,
                name: PathBuf::from("<stdout>"),
            };
            let mut sink: Box<dyn Sink> = match format {
                ExportFormat::StreamOptimized => Box::new(StreamSink::new(
                    out,
                    cap,
                    descriptor.as_deref().expect("stream descriptor"),
                )?),
                _ => {
                    let tar = !matches!(format, ExportFormat::Raw | ExportFormat::MonolithicSparse);
                    let sparse = if format.is_sparse() {
                        let bits = scan(chain, popts, &crate::ops::NoProgress)?;
                        let desc_sectors = embedded.as_deref().map_or(0, embedded_sectors);
                        pieces
                            .iter()
                            .map(|p| {
                                let layout = SparseLayout::new(p.len / SECTOR, desc_sectors);
                                let mut gtes = GrainEntries::new(layout.gtes);
                                let mut k = 0u64;
                                let g0 = p.start / GRAIN;
                                for j in 0..layout.num_grains {
                                    let g = g0 + j;
                                    if bits[(g / 64) as usize] >> (g % 64) & 1 == 1 {
                                        let e = sector_entry(
                                            std::path::Path::new(&p.name),
                                            layout.grain_sector(k),
                                        )?;
                                        gtes.set(j, e);
                                        k += 1;
                                    }
                                }
                                Ok(Some((layout, gtes, k)))
                            })
                            .collect::<Result<Vec<_>>>()?
                    } else {
                        vec![None; pieces.len()]
                    };
                    if tar {
                        let d = descriptor.clone().expect("tar formats have a descriptor");
                        out.write(&tar_header(&name, d.len() as u64, mtime)?)?;
                        out.write(&d)?;
                        out.pad_to(512)?;
                    }
                    Box::new(SeqSink {
                        out,
                        pieces: pieces.clone(),
                        sparse,
                        embedded: embedded.clone(),
                        tar,
                        mtime,
                        cur: None,
                        done: 0,
                        grains: 0,
                    })
                }
            };
            drive(
                chain,
                popts,
                &producer,
                sink.as_mut(),
                manifest.as_mut(),
                progress,
            )?;
            sink.finish()?
        }
    };
    if let (Some(m), Some(path)) = (manifest, &opts.manifest) {
        let f = AtomicFile::create(path, opts.force)?;
        let text = m.finish();
        f.file()
            .write_all_at(&text, 0)
            .map_err(|e| write_error(f.tmp_path(), 0, e))?;
        f.commit(opts.force)?;
    }
    Ok(report)
}

/// A single-file stream output: commit the temporary file after the stream is complete.
struct FileWrapped {
    inner: StreamSink,
    file: Option<AtomicFile>,
    force: bool,
}

impl Sink for FileWrapped {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.inner.put(u, p)
    }
    fn finish(&mut self) -> Result<ExportReport> {
        let mut r = self.inner.finish()?;
        let f = self.file.take().expect("finish once");
        r.files = vec![f.target().to_path_buf()];
        f.commit(self.force)?;
        Ok(r)
    }
}
