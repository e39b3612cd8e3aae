//! The writers of one extent each: hosted sparse (with copy-on-write into scratch space
//! for an atomic switch), COWD, flat; and the file primitives they share.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::cowd::{self, CowdHeader, COWD_GTES};
use crate::format::sparse::{SparseHeader, SECTOR};
use crate::format::tables::{GrainTables, MetaWrite};
use crate::hooks::fault_point;

use super::ReadBelow;

pub(super) fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::refused(
                    path,
                    format!("`{}` is read-only: refusing to write", path.display()),
                    None,
                )
            } else {
                Error::io("open for writing", path, 0, e)
            }
        })
}

pub(super) fn pwrite(f: &File, path: &Path, buf: &[u8], off: u64) -> Result<()> {
    fault_point();
    f.write_all_at(buf, off)
        .map_err(|e| crate::io::write_error(path, off, e))
}

pub(super) fn sync(f: &File, path: &Path) -> Result<()> {
    f.sync_data().map_err(|e| Error::io("flush", path, 0, e))
}

/// The bytes of a grain about to be allocated for `data` at extent offset `off`: what the
/// layers below hold there (copy-on-write, when `fill` and the write does not cover the
/// grain), with `data` laid over it. `len` is the extent's length (the last grain may be
/// partial); `base` is the extent's first virtual byte.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_grain(
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
pub(super) struct SparseExtentWriter {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) h: SparseHeader,
    pub(super) tables: GrainTables,
    /// Next free sector.
    pub(super) cursor: u64,
    pub(super) len: u64,
    pub(super) grain: u64,
    /// Copy-on-write into the extent itself (see [`LayerWriter::shadow`]).
    pub(super) shadow: Option<Shadow>,
}

/// A writer that never writes a grain the tables referenced when it opened: such a grain
/// is written whole (its old bytes with the new laid over them) into scratch space past
/// every new grain, and its entry moves there. Until the tables are switched the extent
/// reads as before, byte for byte; [`LayerWriter::compact`] later copies each moved
/// grain back to its old place, so the file ends as an in-place writer leaves it.
#[derive(Debug)]
pub(super) struct Shadow {
    /// Grains and tables at or past this sector are this writer's own.
    pub(super) first_new: u64,
    /// Where the next moved grain goes.
    pub(super) scratch: u64,
    /// New grains and tables must stay below this (where the scratch space starts);
    /// `None` while planning.
    pub(super) limit: Option<u64>,
    /// Planning: nothing is written, only places are handed out.
    pub(super) dry: bool,
    pub(super) moves: Vec<Move>,
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
pub(super) fn read_zero_fill(f: &File, path: &Path, buf: &mut [u8], off: u64) -> Result<()> {
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
pub(super) fn copy_within(f: &File, path: &Path, from: u64, to: u64, len: u64) -> Result<()> {
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
pub(super) fn past_plan(path: &Path) -> Error {
    Error::chain(
        path,
        "the writes do not follow the plan made for them (new grains would reach the scratch space); nothing was switched",
    )
}

/// Sector numbers handed out from a cursor, in whole grains (tables take a grain each,
/// as qemu and VMware lay them out when they grow a file).
pub(super) fn take_sectors(cursor: &mut u64, sectors: u64, grain: u64, path: &Path) -> Result<u32> {
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
    pub(super) fn open(path: &Path, h: SparseHeader) -> Result<SparseExtentWriter> {
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

    pub(super) fn set_gte(&mut self, g: u64, v: u32) -> Result<()> {
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
    pub(super) fn move_grain(&mut self, g: u64, old: u32, data: &[u8], o: usize) -> Result<()> {
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
    pub(super) fn write_in_grain(
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
    pub(super) fn zero_grain(&mut self, g: u64) -> Result<bool> {
        if self.h.zero_grain() && self.tables.get(&self.file, g)? < 2 {
            self.set_gte(g, 1)?;
            return Ok(true);
        }
        Ok(false)
    }

    pub(super) fn metadata_writes(&mut self) -> (Vec<MetaWrite>, Vec<MetaWrite>) {
        self.tables.take_writes()
    }
}

/// Writable COWD extent (one sector grains by default; 4096-entry tables, no redundant
/// copy; the header's freeSector kept current).
pub(super) struct CowdExtentWriter {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) h: CowdHeader,
    pub(super) tables: GrainTables,
    pub(super) cursor: u64,
    pub(super) len: u64,
    pub(super) grain: u64,
}

impl CowdExtentWriter {
    pub(super) fn open(path: &Path) -> Result<CowdExtentWriter> {
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

    pub(super) fn write_in_grain(
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
    pub(super) fn metadata_writes(&mut self) -> (Vec<MetaWrite>, Vec<MetaWrite>) {
        let (tables, mut dirs) = self.tables.take_writes();
        // qemu leaves freeSector stale; we keep it current (formats.md §6.3).
        self.h.free_sector = u32::try_from(self.cursor).unwrap_or(u32::MAX);
        dirs.push((28, self.h.free_sector.to_le_bytes().to_vec()));
        (tables, dirs)
    }
}

/// Write metadata writes in crash-safe order: grain data synced first, then the tables,
/// a sync, the directories, a sync.
pub(super) fn flush_metadata(
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
pub(super) struct FlatExtentWriter {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) offset: u64,
}

pub(super) enum ExtentWriter {
    Sparse(Box<SparseExtentWriter>),
    Cowd(Box<CowdExtentWriter>),
    Flat(FlatExtentWriter),
    ReadOnly(String),
}
