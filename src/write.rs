//! Writing into one layer of a chain: hosted sparse (uncompressed), COWD and flat extents.
//!
//! Used by `write` (into the top of a chain) and `commit` (into a parent). Partial grains
//! that are not yet allocated in the layer are first filled from the layers below
//! (copy-on-write). New grains are appended at the grain-aligned end of the file.
//!
//! Crash-safety order, kept by [`LayerWriter::flush`]: grain data is written and synced
//! before any grain-table entry that points at it, and tables before the directory entry
//! that points at them. A crash can therefore leak space (data no table references) but
//! never make a table point at garbage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::cowd::{self, CowdHeader, COWD_GTES};
use crate::format::sparse::{SparseHeader, SECTOR};
use crate::format::tables::{GrainTables, MetaWrite};
use crate::format::Extent;
use crate::hooks::fault_point;
use crate::layer::Layer;

/// Reads the content below the layer being written (for copy-on-write fills).
pub type ReadBelow<'a> = &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync);

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::InvalidInput(format!(
                    "`{}` is read-only: refusing to write",
                    path.display()
                ))
            } else {
                Error::io("open for writing", path, 0, e)
            }
        })
}

fn pwrite(f: &File, path: &Path, buf: &[u8], off: u64) -> Result<()> {
    fault_point();
    f.write_all_at(buf, off)
        .map_err(|e| crate::io::write_error(path, off, e))
}

fn sync(f: &File, path: &Path) -> Result<()> {
    f.sync_data().map_err(|e| Error::io("flush", path, 0, e))
}

/// The bytes of a grain about to be allocated for `data` at extent offset `off`: what the
/// layers below hold there (copy-on-write, when `fill` and the write does not cover the
/// grain), with `data` laid over it. `len` is the extent's length (the last grain may be
/// partial); `base` is the extent's first virtual byte.
#[allow(clippy::too_many_arguments)]
fn new_grain(
    data: &[u8],
    off: u64,
    gstart: u64,
    grain: u64,
    len: u64,
    base: u64,
    fill: bool,
    below: ReadBelow<'_>,
) -> Result<Vec<u8>> {
    let valid = (len - gstart).min(grain) as usize;
    let mut full = vec![0u8; grain as usize];
    let whole = off == gstart && data.len() == valid;
    if fill && !whole {
        below(&mut full[..valid], base + gstart)?;
    }
    let o = (off - gstart) as usize;
    full[o..o + data.len()].copy_from_slice(data);
    Ok(full)
}

/// Writable hosted sparse extent: new grains (and tables) are appended at the
/// grain-aligned end of the file.
struct SparseExtentWriter {
    file: File,
    path: PathBuf,
    h: SparseHeader,
    tables: GrainTables,
    /// Next free sector.
    cursor: u64,
    len: u64,
    grain: u64,
    /// Copy-on-write into the extent itself (see [`LayerWriter::shadow`]).
    shadow: Option<Shadow>,
}

/// A writer that never writes a grain the tables referenced when it opened: such a grain
/// is written whole (its old bytes with the new laid over them) into scratch space past
/// every new grain, and its entry moves there. Until the tables are switched the extent
/// reads as before, byte for byte; [`LayerWriter::compact`] later copies each moved
/// grain back to its old place, so the file ends as an in-place writer leaves it.
#[derive(Debug)]
struct Shadow {
    /// Grains and tables at or past this sector are this writer's own.
    first_new: u64,
    /// Where the next moved grain goes.
    scratch: u64,
    /// New grains and tables must stay below this (where the scratch space starts);
    /// `None` while planning.
    limit: Option<u64>,
    /// Planning: nothing is written, only places are handed out.
    dry: bool,
    moves: Vec<Move>,
}

/// A grain a shadowing writer moved: grain `grain` of extent `extent` (its index in the
/// layer's extents) was at sector `old` and now is at sector `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Move {
    /// The extent's index in the layer.
    pub extent: usize,
    /// The grain's index in the extent.
    pub grain: u64,
    /// Sector of its place before the write.
    pub old: u32,
    /// Sector of its copy in the scratch space.
    pub new: u32,
}

/// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
fn read_zero_fill(f: &File, path: &Path, buf: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, off + done as u64, e)),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Copy `len` bytes of `f` from `from` to `to` (ranges that do not overlap), in the
/// kernel where it can (`copy_file_range`), else through a buffer; bytes past the end
/// of the file read as zeros.
fn copy_within(f: &File, path: &Path, from: u64, to: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    fault_point();
    let (mut done, fd) = (0u64, f.as_raw_fd());
    while done < len {
        let (mut src, mut dst) = ((from + done) as libc::loff_t, (to + done) as libc::loff_t);
        // SAFETY: both offsets point at locals that live across the call; the fd is
        // `f`'s, open for reading and writing; no memory of ours is written.
        let n =
            unsafe { libc::copy_file_range(fd, &mut src, fd, &mut dst, (len - done) as usize, 0) };
        if n <= 0 {
            break; // the end of the file, or no kernel copy here: the buffer does the rest
        }
        done += n as u64;
    }
    let mut buf = vec![0u8; (len - done).min(1 << 20) as usize];
    while done < len {
        let k = (len - done).min(buf.len() as u64) as usize;
        read_zero_fill(f, path, &mut buf[..k], from + done)?;
        f.write_all_at(&buf[..k], to + done)
            .map_err(|e| crate::io::write_error(path, to + done, e))?;
        done += k as u64;
    }
    Ok(())
}

/// The plan was broken: new grains would reach the scratch space (a bug, never input).
fn past_plan(path: &Path) -> Error {
    Error::chain(
        path,
        "the writes do not follow the plan made for them (new grains would reach the scratch space); nothing was switched",
    )
}

/// Sector numbers handed out from a cursor, in whole grains (tables take a grain each,
/// as qemu and VMware lay them out when they grow a file).
fn take_sectors(cursor: &mut u64, sectors: u64, grain: u64, path: &Path) -> Result<u32> {
    let at = *cursor;
    *cursor += sectors.div_ceil(grain) * grain;
    u32::try_from(at).map_err(|_| {
        Error::unsupported(
            path,
            "the file would grow past 2 TiB (32-bit sector numbers in its tables)",
        )
    })
}

impl SparseExtentWriter {
    fn open(path: &Path, h: SparseHeader) -> Result<SparseExtentWriter> {
        if h.compressed() {
            return Err(Error::unsupported(
                path,
                "writing into a compressed (streamOptimized) extent",
            ));
        }
        let file = open_rw(path)?;
        let redundant =
            h.flags & crate::format::sparse::FLAG_REDUNDANT_GD != 0 && h.rgd_offset != 0;
        let tables = GrainTables::load(
            &file,
            path,
            h.gd_offset,
            redundant.then_some(h.rgd_offset),
            h.num_gts() as usize,
            h.num_gtes_per_gt as usize,
        )?;
        let grain = h.grain_size * SECTOR;
        // New grains go right after what the tables reference, not after the file's
        // end: a tail a power cut left unreferenced (grains written, their tables not)
        // is reused, and cut off once this writer's tables are durable (`trim_to`).
        let used = tables.referenced_end(&file, h.grain_size)?;
        let cursor = (used * SECTOR).max(h.over_head * SECTOR).div_ceil(grain) * grain / SECTOR;
        Ok(SparseExtentWriter {
            file,
            path: path.to_path_buf(),
            len: h.capacity_sectors * SECTOR,
            grain,
            h,
            tables,
            cursor,
            shadow: None,
        })
    }

    fn set_gte(&mut self, g: u64, v: u32) -> Result<()> {
        let (cursor, gs, path) = (&mut self.cursor, self.h.grain_size, &self.path);
        let limit = self.shadow.as_ref().and_then(|s| s.limit);
        let table_sectors = (self.tables.per_table() as u64 * 4).div_ceil(SECTOR);
        self.tables.set(&self.file, g, v, &mut || {
            let at = take_sectors(cursor, table_sectors, gs, path)?;
            if limit.is_some_and(|l| *cursor > l) {
                return Err(past_plan(path));
            }
            Ok(at)
        })
    }

    /// Move grain `g` (at sector `old`, referenced before this writer) to the scratch
    /// space with `data` laid over it at grain offset `o`.
    fn move_grain(&mut self, g: u64, old: u32, data: &[u8], o: usize) -> Result<()> {
        let sh = self.shadow.as_mut().expect("shadowing");
        let at = take_sectors(
            &mut sh.scratch,
            self.h.grain_size,
            self.h.grain_size,
            &self.path,
        )?;
        if !sh.dry {
            let valid = (self.len - g * self.grain).min(self.grain) as usize;
            if o == 0 && data.len() >= valid {
                // The whole grain is new: its old bytes are not needed.
                pwrite(&self.file, &self.path, data, u64::from(at) * SECTOR)?;
            } else {
                let mut full = vec![0u8; self.grain as usize];
                read_zero_fill(&self.file, &self.path, &mut full, u64::from(old) * SECTOR)?;
                full[o..o + data.len()].copy_from_slice(data);
                pwrite(&self.file, &self.path, &full, u64::from(at) * SECTOR)?;
            }
        }
        sh.moves.push(Move {
            extent: 0,
            grain: g,
            old,
            new: at,
        });
        self.set_gte(g, at)
    }

    /// Write `data` at extent-relative `off` (within one grain).
    fn write_in_grain(
        &mut self,
        data: &[u8],
        off: u64,
        base: u64,
        below: ReadBelow<'_>,
    ) -> Result<()> {
        let g = off / self.grain;
        let gstart = g * self.grain;
        let gte = self.tables.get(&self.file, g)?;
        let dry = self.shadow.as_ref().is_some_and(|s| s.dry);
        if gte >= 2
            && self
                .shadow
                .as_ref()
                .is_some_and(|s| u64::from(gte) < s.first_new)
        {
            return self.move_grain(g, gte, data, (off - gstart) as usize);
        }
        if gte >= 2 || (gte == 1 && !self.h.zero_grain()) {
            if dry {
                return Ok(());
            }
            return pwrite(
                &self.file,
                &self.path,
                data,
                u64::from(gte) * SECTOR + (off - gstart),
            );
        }
        let s = take_sectors(
            &mut self.cursor,
            self.h.grain_size,
            self.h.grain_size,
            &self.path,
        )?;
        if let Some(sh) = &self.shadow {
            if sh.limit.is_some_and(|l| self.cursor > l) {
                return Err(past_plan(&self.path));
            }
        }
        if !dry {
            // A zeroed grain (gte 1) reads as zeros: nothing to fill from below.
            let full = new_grain(
                data,
                off,
                gstart,
                self.grain,
                self.len,
                base,
                gte == 0,
                below,
            )?;
            pwrite(&self.file, &self.path, &full, u64::from(s) * SECTOR)?;
        }
        self.set_gte(g, s)
    }

    /// Make grain `g` a zeroed grain when the format has them and the grain stores
    /// nothing yet; a grain that stores data is overwritten with zeros instead (turning
    /// its entry to 1 would leave its space referenced by nothing: a leak).
    fn zero_grain(&mut self, g: u64) -> Result<bool> {
        if self.h.zero_grain() && self.tables.get(&self.file, g)? < 2 {
            self.set_gte(g, 1)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn metadata_writes(&mut self) -> (Vec<MetaWrite>, Vec<MetaWrite>) {
        self.tables.take_writes()
    }
}

/// Writable COWD extent (one sector grains by default; 4096-entry tables, no redundant
/// copy; the header's freeSector kept current).
struct CowdExtentWriter {
    file: File,
    path: PathBuf,
    h: CowdHeader,
    tables: GrainTables,
    cursor: u64,
    len: u64,
    grain: u64,
}

impl CowdExtentWriter {
    fn open(path: &Path) -> Result<CowdExtentWriter> {
        let file = open_rw(path)?;
        let src = crate::io::Source::from_file(
            file.try_clone()
                .map_err(|e| Error::io("open", path, 0, e))?,
            path,
            crate::io::SourceMode::Pread,
        )?;
        let h = cowd::read_header(&src)?;
        let n = cowd::directory_entries(&h) as usize;
        let tables = GrainTables::load(
            &file,
            path,
            u64::from(h.gd_offset),
            None,
            n,
            COWD_GTES as usize,
        )?;
        let cursor = (src.len().div_ceil(SECTOR)).max(u64::from(h.free_sector));
        Ok(CowdExtentWriter {
            file,
            path: path.to_path_buf(),
            len: u64::from(h.num_sectors) * SECTOR,
            grain: u64::from(h.grain_size) * SECTOR,
            h,
            tables,
            cursor,
        })
    }

    fn write_in_grain(
        &mut self,
        data: &[u8],
        off: u64,
        base: u64,
        below: ReadBelow<'_>,
    ) -> Result<()> {
        let g = off / self.grain;
        let gstart = g * self.grain;
        // COWD places a new table before the grain that needs it.
        let (cursor, path) = (&mut self.cursor, &self.path);
        self.tables.ensure_table(&self.file, g, &mut || {
            take_sectors(cursor, COWD_GTES * 4 / SECTOR, 1, path)
        })?;
        let gte = self.tables.get(&self.file, g)?;
        if gte != 0 {
            return pwrite(
                &self.file,
                &self.path,
                data,
                u64::from(gte) * SECTOR + (off - gstart),
            );
        }
        let full = new_grain(data, off, gstart, self.grain, self.len, base, true, below)?;
        let at = take_sectors(&mut self.cursor, self.grain / SECTOR, 1, &self.path)?;
        pwrite(&self.file, &self.path, &full, u64::from(at) * SECTOR)?;
        let (cursor, path) = (&mut self.cursor, &self.path);
        self.tables.set(&self.file, g, at, &mut || {
            take_sectors(cursor, COWD_GTES * 4 / SECTOR, 1, path)
        })
    }

    /// WrittenFile metadata writes: tables, then the directory and the header's freeSector.
    fn metadata_writes(&mut self) -> (Vec<MetaWrite>, Vec<MetaWrite>) {
        let (tables, mut dirs) = self.tables.take_writes();
        // qemu leaves freeSector stale; we keep it current (formats.md §6.3).
        self.h.free_sector = u32::try_from(self.cursor).unwrap_or(u32::MAX);
        dirs.push((28, self.h.free_sector.to_le_bytes().to_vec()));
        (tables, dirs)
    }
}

/// Write metadata writes in crash-safe order: grain data synced first, then the tables,
/// a sync, the directories, a sync.
fn flush_metadata(
    file: &File,
    path: &Path,
    (tables, dirs): (Vec<MetaWrite>, Vec<MetaWrite>),
) -> Result<()> {
    sync(file, path)?;
    for (off, b) in &tables {
        pwrite(file, path, b, *off)?;
    }
    sync(file, path)?;
    for (off, b) in &dirs {
        pwrite(file, path, b, *off)?;
    }
    sync(file, path)
}

/// Writable flat extent.
struct FlatExtentWriter {
    file: File,
    path: PathBuf,
    offset: u64,
}

enum ExtentWriter {
    Sparse(Box<SparseExtentWriter>),
    Cowd(Box<CowdExtentWriter>),
    Flat(FlatExtentWriter),
    ReadOnly(String),
}

/// Writes into one layer.
pub struct LayerWriter {
    extents: Vec<(u64, u64, ExtentWriter)>,
    capacity: u64,
    path: PathBuf,
}

impl LayerWriter {
    /// Open `layer`'s files for writing. The layer must have been opened with positional
    /// reads (never write a mapped file). `allow_device` permits writing into fullDevice,
    /// partitionedDevice and vmfsRaw disks (their extents are host devices).
    pub fn open_with(layer: &Layer, allow_device: bool) -> Result<LayerWriter> {
        if layer.create_type.is_device() && !allow_device {
            return Err(Error::refused(
                &layer.path,
                format!(
                    "refusing to write into a {} disk (it names host devices directly); a REDO log added on top takes writes instead",
                    layer.create_type.as_str()
                ),
                Some(crate::error::Override::AllowDeviceWrite),
            ));
        }
        let mut extents = Vec::new();
        for slot in &layer.extents {
            use std::os::unix::fs::FileTypeExt;
            if let Some(p) = &slot.path {
                let block = std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device());
                if block && !allow_device {
                    return Err(Error::refused(
                        &layer.path,
                        format!(
                            "extent `{}` is the block device `{}`; refusing to write into a device",
                            slot.line.file.as_deref().unwrap_or(""),
                            std::fs::canonicalize(p)
                                .unwrap_or_else(|_| p.clone())
                                .display()
                        ),
                        Some(crate::error::Override::AllowDeviceWrite),
                    ));
                }
            }
            let len = slot.extent.len();
            let w = match (&slot.extent, &slot.path) {
                (_, _) if slot.line.access != crate::format::descriptor::Access::Rw => {
                    ExtentWriter::ReadOnly(format!(
                        "extent `{}` is {}",
                        slot.line.file.as_deref().unwrap_or(""),
                        slot.line.access.as_str()
                    ))
                }
                (Extent::Sparse(s), Some(p))
                    if s.header().version >= 3 && !s.header().compressed() =>
                {
                    let _ = p;
                    ExtentWriter::ReadOnly(
                        "a version-3 sparse extent carries change tracking that a write would leave stale; it is read-only here (qemu opens it read-only too)"
                            .into(),
                    )
                }
                (Extent::Sparse(s), Some(p)) => {
                    ExtentWriter::Sparse(Box::new(SparseExtentWriter::open(p, *s.header())?))
                }
                (Extent::Cowd(_), Some(p)) => {
                    ExtentWriter::Cowd(Box::new(CowdExtentWriter::open(p)?))
                }
                (Extent::Flat(f), Some(p)) => ExtentWriter::Flat(FlatExtentWriter {
                    file: open_rw(p)?,
                    path: p.clone(),
                    offset: f.offset,
                }),
                (Extent::SeSparse(_), _) => {
                    ExtentWriter::ReadOnly("SESparse extents are read-only".into())
                }
                _ => ExtentWriter::ReadOnly("a ZERO extent stores nothing".into()),
            };
            extents.push((slot.start, len, w));
        }
        Ok(LayerWriter {
            extents,
            capacity: layer.capacity,
            path: layer.path.clone(),
        })
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.capacity) {
            return Err(Error::InvalidInput(format!(
                "write of {len} bytes at {off:#x} is past the capacity {:#x} of `{}`",
                self.capacity,
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Refuse, before anything is written, a range that is past the capacity or touches
    /// an extent that cannot be written.
    pub fn check_writable(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        let end = off + len;
        for (start, elen, w) in &self.extents {
            if *start < end && start + elen > off {
                if let ExtentWriter::ReadOnly(why) = w {
                    return Err(Error::InvalidInput(format!(
                        "`{}`: {why}; nothing was written",
                        self.path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Write `data` at virtual offset `off`. `below` reads the layers under this one.
    pub fn write_at(&mut self, data: &[u8], off: u64, below: ReadBelow<'_>) -> Result<()> {
        self.check(off, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let i = self.extents.partition_point(|e| e.0 + e.1 <= pos);
            let (start, len, w) = &mut self.extents[i];
            let rel = pos - *start;
            let n = match w {
                ExtentWriter::Sparse(s) => {
                    let g_end = (rel / s.grain + 1) * s.grain;
                    let n = ((g_end.min(*len) - rel) as usize).min(data.len() - done);
                    s.write_in_grain(&data[done..done + n], rel, *start, below)?;
                    n
                }
                ExtentWriter::Cowd(c) => {
                    let g_end = (rel / c.grain + 1) * c.grain;
                    // Whole grains in a row go through one grain at a time; COWD grains
                    // are small (one sector by default).
                    let n = ((g_end.min(*len) - rel) as usize).min(data.len() - done);
                    c.write_in_grain(&data[done..done + n], rel, *start, below)?;
                    n
                }
                ExtentWriter::Flat(f) => {
                    let n = ((*len - rel) as usize).min(data.len() - done);
                    pwrite(&f.file, &f.path, &data[done..done + n], f.offset + rel)?;
                    n
                }
                ExtentWriter::ReadOnly(why) => {
                    return Err(Error::InvalidInput(format!(
                        "`{}`: {why}",
                        self.path.display()
                    )))
                }
            };
            done += n;
        }
        Ok(())
    }

    /// Read `buf` at virtual offset `off` as this layer reads now, its own writes
    /// included (the tables this writer holds, durable or not); `below` reads what the
    /// layer does not hold.
    pub fn read_at(&mut self, buf: &mut [u8], off: u64, below: ReadBelow<'_>) -> Result<()> {
        self.check(off, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let i = self.extents.partition_point(|e| e.0 + e.1 <= pos);
            let (start, len, w) = &mut self.extents[i];
            let rel = pos - *start;
            let out = &mut buf[done..];
            let n = match w {
                ExtentWriter::Sparse(s) => {
                    let g = rel / s.grain;
                    let gstart = g * s.grain;
                    let n = (((gstart + s.grain).min(*len) - rel) as usize).min(out.len());
                    let gte = s.tables.get(&s.file, g)?;
                    if gte >= 2 || (gte == 1 && !s.h.zero_grain()) {
                        let at = u64::from(gte) * SECTOR + (rel - gstart);
                        read_zero_fill(&s.file, &s.path, &mut out[..n], at)?;
                    } else if gte == 1 {
                        out[..n].fill(0);
                    } else {
                        below(&mut out[..n], pos)?;
                    }
                    n
                }
                ExtentWriter::Cowd(c) => {
                    let g = rel / c.grain;
                    let gstart = g * c.grain;
                    let n = (((gstart + c.grain).min(*len) - rel) as usize).min(out.len());
                    let gte = c.tables.get(&c.file, g)?;
                    if gte == 0 {
                        below(&mut out[..n], pos)?;
                    } else {
                        let at = u64::from(gte) * SECTOR + (rel - gstart);
                        read_zero_fill(&c.file, &c.path, &mut out[..n], at)?;
                    }
                    n
                }
                ExtentWriter::Flat(f) => {
                    let n = ((*len - rel) as usize).min(out.len());
                    read_zero_fill(&f.file, &f.path, &mut out[..n], f.offset + rel)?;
                    n
                }
                ExtentWriter::ReadOnly(why) => {
                    return Err(Error::unsupported(
                        &self.path,
                        format!("reading through a writer: {why}"),
                    ))
                }
            };
            done += n;
        }
        Ok(())
    }

    /// What this layer holds over `range` now, its own writes included: runs of
    /// `Some(alloc)` (data, zeroed grains) and `None` (the layers below decide).
    pub fn map_at(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<(u64, u64, Option<crate::disk::Alloc>)>> {
        use crate::disk::Alloc;
        let mut out: Vec<(u64, u64, Option<Alloc>)> = Vec::new();
        let mut push = |a: u64, n: u64, k: Option<Alloc>| match out.last_mut() {
            Some((s, l, last))
                if *s + *l == a
                    && std::mem::discriminant(last) == std::mem::discriminant(&k)
                    && last.as_ref().map(std::mem::discriminant)
                        == k.as_ref().map(std::mem::discriminant) =>
            {
                *l += n
            }
            _ => out.push((a, n, k)),
        };
        let end = range.end.min(self.capacity);
        let mut pos = range.start;
        while pos < end {
            let i = self.extents.partition_point(|e| e.0 + e.1 <= pos);
            let (start, len, w) = &mut self.extents[i];
            let rel = pos - *start;
            let ext_end = (*start + *len).min(end);
            let (n, k) = match w {
                ExtentWriter::Sparse(s) => {
                    let g = rel / s.grain;
                    let n = ((g + 1) * s.grain).min(*len) - rel;
                    let gte = s.tables.get(&s.file, g)?;
                    let k = match gte {
                        0 => None,
                        1 if s.h.zero_grain() => Some(Alloc::Zero),
                        e => Some(Alloc::Data {
                            extent: i,
                            offset: u64::from(e) * SECTOR + rel - g * s.grain,
                        }),
                    };
                    (n, k)
                }
                ExtentWriter::Cowd(c) => {
                    let g = rel / c.grain;
                    let n = ((g + 1) * c.grain).min(*len) - rel;
                    let gte = c.tables.get(&c.file, g)?;
                    let k = (gte != 0).then_some(Alloc::Data {
                        extent: i,
                        offset: u64::from(gte) * SECTOR + rel - g * c.grain,
                    });
                    (n, k)
                }
                ExtentWriter::Flat(f) => (
                    *len - rel,
                    Some(Alloc::Data {
                        extent: i,
                        offset: f.offset + rel,
                    }),
                ),
                ExtentWriter::ReadOnly(_) => (*len - rel, Some(Alloc::Zero)),
            };
            let n = n.min(ext_end - pos);
            push(pos, n, k);
            pos += n;
        }
        Ok(out)
    }

    /// Write zeros over `[off, off+len)`: zeroed grains where the format has them.
    pub fn write_zeroes(&mut self, off: u64, len: u64, below: ReadBelow<'_>) -> Result<()> {
        self.check(off, len)?;
        let zeros = vec![0u8; 1 << 20];
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let i = self.extents.partition_point(|e| e.0 + e.1 <= pos);
            let (start, elen, w) = &mut self.extents[i];
            if let ExtentWriter::Sparse(s) = w {
                let rel = pos - *start;
                let g = rel / s.grain;
                let gstart = g * s.grain;
                let gend = (gstart + s.grain).min(*elen);
                if rel == gstart && end - pos >= gend - gstart && s.zero_grain(g)? {
                    pos = *start + gend;
                    continue;
                }
            }
            let (s0, l0) = (*start, *elen);
            let n = (end - pos).min(zeros.len() as u64).min(s0 + l0 - pos);
            // Keep zero runs grain-sized for sparse so whole grains can become zeroed grains.
            let n = match &self.extents[i].2 {
                ExtentWriter::Sparse(s) => n.min(((pos - s0) / s.grain + 1) * s.grain - (pos - s0)),
                _ => n,
            };
            self.write_at(&zeros[..n as usize], pos, below)?;
            pos += n;
        }
        Ok(())
    }

    /// Make the grain data durable and hand back, instead of writing them, the
    /// metadata writes (tables, directories) that would make it visible: commit records
    /// them in a journal first, so a rerun replays exactly these writes (no grain is
    /// written twice, nothing leaks). Apply them with [`apply_journal`].
    pub fn take_journal(&mut self) -> Result<Vec<JournalRecord>> {
        let mut tables = Vec::new();
        let mut dirs = Vec::new();
        for (_, _, w) in &mut self.extents {
            let ((t, d), path, file) = match w {
                ExtentWriter::Sparse(s) => (s.metadata_writes(), &s.path, &s.file),
                ExtentWriter::Cowd(c) => (c.metadata_writes(), &c.path, &c.file),
                ExtentWriter::Flat(f) => ((vec![], vec![]), &f.path, &f.file),
                ExtentWriter::ReadOnly(_) => continue,
            };
            sync(file, path)?;
            let rec = |(offset, bytes)| JournalRecord {
                file: path.clone(),
                offset,
                bytes,
            };
            tables.extend(t.into_iter().map(rec));
            dirs.extend(d.into_iter().map(rec));
        }
        tables.extend(dirs);
        // Last: cut each sparse extent after what its tables now reference (a record
        // without bytes; see [`apply_journal`]).
        for (_, _, w) in &self.extents {
            if let ExtentWriter::Sparse(s) = w {
                // A shadowing writer's moved grains lie past its new ones.
                let end = s
                    .shadow
                    .as_ref()
                    .map_or(s.cursor, |sh| sh.scratch.max(s.cursor));
                tables.push(JournalRecord {
                    file: s.path.clone(),
                    offset: end * SECTOR,
                    bytes: Vec::new(),
                });
            }
        }
        Ok(tables)
    }

    /// Whether this layer can be written without touching a grain its tables reference
    /// (every extent hosted sparse): see [`shadow`](Self::shadow).
    pub fn can_shadow(&self) -> bool {
        !self.extents.is_empty()
            && self
                .extents
                .iter()
                .all(|(_, _, w)| matches!(w, ExtentWriter::Sparse(_)))
    }

    /// Write without touching what the tables reference (apply's atomic switch): a
    /// write into a grain the tables already reference goes, with the grain's old
    /// bytes, to scratch space past every new grain, and its entry moves there (a
    /// [`Move`]). `plan` is where that space starts in each extent: what a `dry` run of
    /// the same writes (nothing written, places handed out) left in [`plan`](Self::plan).
    /// Then nothing the old tables reference is written before the journal switches
    /// them, and [`compact`](Self::compact) moves the grains back afterwards.
    pub fn shadow(&mut self, dry: bool, plan: Option<&[u64]>) -> Result<()> {
        if !self.can_shadow() {
            return Err(Error::unsupported(
                &self.path,
                "copy-on-write into a layer that is not hosted sparse",
            ));
        }
        for (i, (_, _, w)) in self.extents.iter_mut().enumerate() {
            if let ExtentWriter::Sparse(s) = w {
                let start = match plan {
                    Some(p) => *p.get(i).ok_or_else(|| past_plan(&s.path))?,
                    // Planning: the scratch space's place does not matter, only that it
                    // is past what the tables reference.
                    None => s.cursor,
                };
                if start < s.cursor {
                    return Err(past_plan(&s.path));
                }
                s.shadow = Some(Shadow {
                    first_new: s.cursor,
                    scratch: start,
                    limit: plan.map(|_| start),
                    dry,
                    moves: Vec::new(),
                });
            }
        }
        Ok(())
    }

    /// Where each extent's new grains end (in sectors): after a `dry`
    /// [`shadow`](Self::shadow) run, the start of the scratch space of the real one.
    pub fn plan(&self) -> Vec<u64> {
        self.extents
            .iter()
            .map(|(_, _, w)| match w {
                ExtentWriter::Sparse(s) => s.cursor,
                _ => 0,
            })
            .collect()
    }

    /// The grains a shadowing writer moved so far.
    pub fn take_moves(&mut self) -> Vec<Move> {
        let mut out = Vec::new();
        for (i, (_, _, w)) in self.extents.iter_mut().enumerate() {
            if let ExtentWriter::Sparse(s) = w {
                if let Some(sh) = s.shadow.as_mut() {
                    out.extend(sh.moves.drain(..).map(|m| Move { extent: i, ..m }));
                }
            }
        }
        out
    }

    /// Check moves read back from a state file (untrusted) before [`compact`]
    /// acts on them: each names a grain of a hosted sparse extent that now points at its
    /// old or its new place, the old place lies below `ends` (where the extent will be
    /// cut) and the new one at or past it, no two moves share a grain or a place, and no
    /// other grain or table lies in an old place or past `ends`. Then copying the moved
    /// grains back and cutting the extent can only touch the moved grains.
    ///
    /// [`compact`]: Self::compact
    pub fn check_moves(&mut self, moves: &[Move], ends: &[u64]) -> Result<()> {
        use std::collections::HashMap;
        let bad = |p: &Path, what: String| {
            Error::chain(
                p,
                format!("the interrupted apply's state does not fit this disk ({what}); it is not acted on"),
            )
        };
        if ends.len() != self.extents.len() {
            return Err(bad(&self.path, "another number of extents".into()));
        }
        for (i, (_, _, w)) in self.extents.iter_mut().enumerate() {
            let ExtentWriter::Sparse(s) = w else {
                if moves.iter().any(|m| m.extent == i) {
                    return Err(bad(&self.path, format!("extent {i} is not hosted sparse")));
                }
                continue;
            };
            let end = ends[i];
            let gs = s.h.grain_size;
            let mut by_grain: HashMap<u64, &Move> = HashMap::new();
            let mut olds: HashMap<u32, u64> = HashMap::new();
            for m in moves.iter().filter(|m| m.extent == i) {
                let (old, new) = (u64::from(m.old), u64::from(m.new));
                if old < s.h.over_head.max(1) || old + gs > end || new < end {
                    return Err(bad(
                        &s.path,
                        format!("grain {} moved from sector {old} to {new}", m.grain),
                    ));
                }
                if by_grain.insert(m.grain, m).is_some() || olds.insert(m.old, m.grain).is_some() {
                    return Err(bad(&s.path, format!("grain {} moved twice", m.grain)));
                }
            }
            if s.tables.tables_end() > end {
                return Err(bad(&s.path, "a table lies past the new end".into()));
            }
            let grains = s.h.capacity_sectors.div_ceil(gs.max(1));
            for g in 0..grains {
                let e = s.tables.get(&s.file, g)?;
                match by_grain.get(&g) {
                    Some(m) if e == m.old || e == m.new => {}
                    Some(m) => {
                        return Err(bad(
                            &s.path,
                            format!(
                                "grain {g} points at sector {e}, neither {} nor {}",
                                m.old, m.new
                            ),
                        ))
                    }
                    None if e >= 2 && (u64::from(e) + gs > end || olds.contains_key(&e)) => {
                        return Err(bad(
                            &s.path,
                            format!("grain {g} at sector {e} is in the way"),
                        ))
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// After the switch (the tables point at the moved grains, durably): copy each moved
    /// grain back to its old place (which no table references now), make that durable,
    /// point the entries back (primary tables, sync, redundant ones, sync), and cut each
    /// extent at `ends` (sectors: the plan), which drops the scratch space. Every state
    /// on the way reads the same: both places hold the new bytes before any entry moves
    /// back. Rerun after a power cut: an extent already cut has had its grains copied and
    /// its entries moved durably (the cut comes last); its entries are set again.
    pub fn compact(&mut self, moves: &[Move], ends: &[u64]) -> Result<()> {
        for (i, (_, _, w)) in self.extents.iter_mut().enumerate() {
            let ExtentWriter::Sparse(s) = w else { continue };
            let end = *ends.get(i).ok_or_else(|| past_plan(&s.path))? * SECTOR;
            let mine: Vec<&Move> = moves.iter().filter(|m| m.extent == i).collect();
            let len = s
                .file
                .metadata()
                .map_err(|e| Error::io("stat", &s.path, 0, e))?
                .len();
            if len > end {
                // Runs of grains moved from consecutive places to consecutive places
                // (the usual case: an increment rewrites a stretch of the disk) go back
                // in one copy each, in the kernel.
                let gs = s.h.grain_size;
                let mut i = 0;
                while i < mine.len() {
                    let mut n = 1;
                    while i + n < mine.len()
                        && n < 128
                        && u64::from(mine[i + n].old) == u64::from(mine[i].old) + n as u64 * gs
                        && u64::from(mine[i + n].new) == u64::from(mine[i].new) + n as u64 * gs
                    {
                        n += 1;
                    }
                    copy_within(
                        &s.file,
                        &s.path,
                        u64::from(mine[i].new) * SECTOR,
                        u64::from(mine[i].old) * SECTOR,
                        n as u64 * s.grain,
                    )?;
                    i += n;
                }
            }
            for m in &mine {
                s.tables
                    .set(&s.file, m.grain, m.old, &mut || Err(past_plan(&s.path)))?;
            }
            let writes = s.tables.take_writes();
            flush_metadata(&s.file, &s.path, writes)?;
            trim_to(&s.file, &s.path, end)?;
        }
        Ok(())
    }

    /// The files of extents this writer can change, with their current lengths.
    pub fn extent_files(&self) -> Vec<(PathBuf, u64)> {
        self.extents
            .iter()
            .filter_map(|(_, _, w)| match w {
                ExtentWriter::Sparse(s) => Some((s.path.clone(), s.file.metadata().ok()?.len())),
                ExtentWriter::Cowd(c) => Some((c.path.clone(), c.file.metadata().ok()?.len())),
                ExtentWriter::Flat(f) => Some((f.path.clone(), f.file.metadata().ok()?.len())),
                ExtentWriter::ReadOnly(_) => None,
            })
            .collect()
    }

    /// Make everything written durable (data before tables, tables before directories).
    pub fn flush(&mut self) -> Result<()> {
        for (_, _, w) in &mut self.extents {
            match w {
                ExtentWriter::Sparse(s) if s.tables.is_dirty() => {
                    let w = s.metadata_writes();
                    flush_metadata(&s.file, &s.path, w)?;
                    trim_to(&s.file, &s.path, s.cursor * SECTOR)?;
                }
                ExtentWriter::Cowd(c) if c.tables.is_dirty() => {
                    let w = c.metadata_writes();
                    flush_metadata(&c.file, &c.path, w)?
                }
                ExtentWriter::Sparse(_) | ExtentWriter::Cowd(_) => {}
                ExtentWriter::Flat(f) => sync(&f.file, &f.path)?,
                ExtentWriter::ReadOnly(_) => {}
            }
        }
        Ok(())
    }
}

/// One metadata write of a journal (see [`LayerWriter::take_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// The extent file.
    pub file: PathBuf,
    /// Byte offset in it.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Cut `file` to `len` when it is longer (only ever past what its tables reference), and
/// make that durable.
fn trim_to(file: &File, path: &Path, len: u64) -> Result<()> {
    let now = file
        .metadata()
        .map_err(|e| Error::io("stat", path, 0, e))?
        .len();
    if now > len {
        fault_point();
        file.set_len(len)
            .map_err(|e| Error::io("truncate", path, len, e))?;
        sync(file, path)?;
    }
    Ok(())
}

/// Apply journal records (idempotent: replaying them again writes the same bytes), then
/// sync every file touched. A record without bytes cuts its file to `offset` when it is
/// longer (the unreferenced tail of a sparse extent).
pub fn apply_journal(records: &[JournalRecord]) -> Result<()> {
    let mut files: Vec<(PathBuf, File)> = Vec::new();
    for r in records {
        let i = match files.iter().position(|(p, _)| *p == r.file) {
            Some(i) => i,
            None => {
                files.push((r.file.clone(), open_rw(&r.file)?));
                files.len() - 1
            }
        };
        if r.bytes.is_empty() {
            continue;
        }
        pwrite(&files[i].1, &r.file, &r.bytes, r.offset)?;
    }
    for (p, f) in &files {
        sync(f, p)?;
    }
    // Cuts last, once every table write is durable.
    for r in records.iter().filter(|r| r.bytes.is_empty()) {
        if let Some((p, f)) = files.iter().find(|(p, _)| *p == r.file) {
            trim_to(f, p, r.offset)?;
        }
    }
    Ok(())
}

/// Give `layer` a new CID and write its descriptor back (atomically for a separate
/// descriptor file; in place in the descriptor area for an embedded one). Bare COWD
/// layers have no CID: nothing happens.
pub fn set_cid(layer: &mut Layer, cid: u32) -> Result<()> {
    if layer.bare_cowd {
        return Ok(());
    }
    layer.descriptor.set("CID", &format!("{cid:08x}"), false);
    write_descriptor(layer)
}

/// Write `layer.descriptor` back to where it lives.
pub fn write_descriptor(layer: &Layer) -> Result<()> {
    let text = layer.descriptor.to_text();
    if layer.embedded {
        let Some(Extent::Sparse(s)) = layer.extents.first().map(|e| &e.extent) else {
            return Err(Error::unsupported(
                &layer.path,
                "embedded descriptor outside a sparse extent",
            ));
        };
        let h = s.raw_header();
        let room = (h.descriptor_size * SECTOR) as usize;
        if text.len() > room {
            return Err(Error::unsupported(
                &layer.path,
                format!(
                    "descriptor of {} bytes does not fit the {room}-byte embedded area",
                    text.len()
                ),
            ));
        }
        let mut b = text.into_bytes();
        b.resize(room, 0);
        let f = open_rw(&layer.path)?;
        pwrite(&f, &layer.path, &b, h.descriptor_offset * SECTOR)?;
        return sync(&f, &layer.path);
    }
    // Separate file: temporary beside it, fsync, rename, fsync of the folder (keeps the
    // old on any failure).
    let perms = std::fs::metadata(&layer.path)
        .map_err(|e| Error::io("stat", &layer.path, 0, e))?
        .permissions();
    if perms.readonly() {
        return Err(Error::InvalidInput(format!(
            "`{}` is read-only: refusing to write",
            layer.path.display()
        )));
    }
    crate::output::replace_atomically(&layer.path, text.as_bytes(), Some(perms))
}

/// Write `bytes` to `path` atomically and durably (see [`crate::output::AtomicFile`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    fault_point();
    crate::output::replace_atomically(path, bytes, None)
}

/// Journal file: `VMDKJRN2`, the token of the state it belongs to (u32 length, bytes),
/// records (u32 path length, path, u64 offset, u32 length, bytes), then the CRC-32 of
/// everything before it. Written atomically before the state moves to phase `tables`.
/// The paths are the recovering command's own (canonical); a reader admits them only
/// when they are files of the disk it resolved ([`crate::recovery`]).
pub fn write_journal(path: &Path, token: &str, records: &[JournalRecord]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut b = b"VMDKJRN2".to_vec();
    b.extend_from_slice(&(token.len() as u32).to_le_bytes());
    b.extend_from_slice(token.as_bytes());
    for r in records {
        let file = std::fs::canonicalize(&r.file).unwrap_or_else(|_| r.file.clone());
        let p = file.as_os_str().as_bytes();
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&r.bytes);
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    write_atomically(path, &b)
}

/// A journal's bytes parsed: its token and records (magic, checksum and every length
/// checked against the bytes there are; nothing is sized by a field alone).
pub fn parse_journal(path: &Path, b: &[u8]) -> Result<(String, Vec<JournalRecord>)> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |at: usize, what: &str| Error::corrupt(path, at as u64, format!("journal: {what}"));
    if b.len() < 16 || &b[..8] != b"VMDKJRN2" {
        return Err(bad(0, "bad magic (not a vmdkit journal, or an older one)"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad(body.len(), "checksum mismatch"));
    }
    let mut i = 8;
    let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
        let s = i
            .checked_add(n)
            .and_then(|e| body.get(*i..e))
            .ok_or_else(|| bad(*i, "truncated record"))?;
        *i += n;
        Ok(s)
    };
    let n = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
    let token = String::from_utf8_lossy(take(&mut i, n)?).into_owned();
    let mut out = Vec::new();
    while i < body.len() {
        let n = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
        let file = PathBuf::from(std::ffi::OsStr::from_bytes(take(&mut i, n)?));
        let offset = u64::from_le_bytes(take(&mut i, 8)?.try_into().expect("8"));
        let len = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
        let bytes = take(&mut i, len)?.to_vec();
        out.push(JournalRecord {
            file,
            offset,
            bytes,
        });
    }
    Ok((token, out))
}

/// Read a journal written by [`write_journal`] (see [`parse_journal`]).
pub fn read_journal(path: &Path) -> Result<(String, Vec<JournalRecord>)> {
    let b = std::fs::read(path).map_err(|e| Error::io("read", path, 0, e))?;
    parse_journal(path, &b)
}

/// Cut files back to recorded lengths (a journaled writer's rerun: what the interrupted
/// run appended is referenced by no table, so nothing is lost and nothing leaks).
pub fn cut_back_files(lengths: &[(PathBuf, u64)]) -> Result<()> {
    for (p, len) in lengths {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| Error::io("open for writing", p, 0, e))?;
        let meta = f.metadata().map_err(|e| Error::io("stat", p, 0, e))?;
        if meta.len() > *len && meta.is_file() {
            f.set_len(*len)
                .map_err(|e| Error::io("truncate", p, *len, e))?;
            f.sync_all().map_err(|e| Error::io("flush", p, 0, e))?;
        }
    }
    Ok(())
}
