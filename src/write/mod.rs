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

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::format::Extent;
use crate::layer::Layer;

/// Reads the content below the layer being written (for copy-on-write fills).
pub type ReadBelow<'a> = &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync);

mod extent;
mod journal;

pub use extent::Move;
use extent::*;
pub use journal::*;

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
