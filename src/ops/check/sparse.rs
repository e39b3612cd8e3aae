//! Checking (and repairing) one hosted sparse extent, in phases: the directories and
//! their redundant copies, the tables and their copies and the grains they name, orphaned
//! tables, leaks, the unclean-shutdown flag. Plain checks open the file read-only.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{rd32, wr32, CheckOptions, CheckReport, Finding, Severity};
use crate::error::{Error, Result};
use crate::format::sparse::{self, SparseExtent, SparseHeader, FLAG_REDUNDANT_GD, SECTOR};
use crate::io::{Source, SourceMode};

/// What `--repair` may do in one pass over a sparse extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Only look.
    Look,
    /// Restore directory and table entries that one copy lost.
    Tables,
    /// Reclaim leaks, clear the unclean flag (only after a clean re-check).
    Rest {
        /// Also free leaked grains that hold data (`--discard-unreferenced`).
        discard_data: bool,
    },
}

/// Check a sparse extent; with `repair`, mend tables first, re-check from scratch, and
/// only then (when no corruption remains) reclaim leaks and clear the unclean flag.
pub(super) fn check_sparse_file(
    path: &Path,
    opts: &CheckOptions,
    r: &mut CheckReport,
) -> Result<()> {
    if !opts.repair {
        return check_sparse(path, Pass::Look, r);
    }
    let mut a = CheckReport::default();
    check_sparse(path, Pass::Tables, &mut a)?;
    let declined: Vec<Finding> = a
        .findings
        .iter()
        .filter(|f| !f.repaired && f.what.contains("not repaired"))
        .cloned()
        .collect();
    r.findings
        .extend(a.findings.into_iter().filter(|f| f.repaired));
    let mut b = CheckReport::default();
    check_sparse(
        path,
        Pass::Rest {
            discard_data: opts.discard_unreferenced,
        },
        &mut b,
    )?;
    // Report what is left (and the fixes of this pass) as found after the table repair;
    // a finding repair declined keeps its reason.
    for f in b.findings.iter_mut() {
        if let Some(d) = declined
            .iter()
            .find(|d| d.offset == f.offset && d.what.starts_with(&f.what))
        {
            f.what = d.what.clone();
        }
    }
    let repaired_leaks = b
        .findings
        .iter()
        .any(|f| f.severity == Severity::Leak && f.repaired);
    r.findings.extend(b.findings);
    r.lost.extend(b.lost);
    if !repaired_leaks {
        r.leaked_bytes += b.leaked_bytes;
    }
    Ok(())
}

/// One pass over one extent.
fn check_sparse(path: &Path, pass: Pass, r: &mut CheckReport) -> Result<()> {
    let src = Source::open(path, SourceMode::Pread)?;
    let h = match sparse::read_header(&src) {
        Ok(h) => h,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, format!("header: {e}"));
            return Ok(());
        }
    };
    if h.compressed() {
        return super::stream::check_stream(path, src, &h, r);
    }
    let Some(mut c) = SparseCheck::open(path, src.len(), h, pass, r)? else {
        return Ok(());
    };
    c.shared_tables(r);
    c.directories(r)?;
    c.tables(r)?;
    c.orphans(r)?;
    c.leaks(r)?;
    c.unclean_flag(r)?;
    if pass != Pass::Look {
        c.f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
    }
    Ok(())
}

/// The state of one pass: the file, its directories, what is metadata, what is leaked.
struct SparseCheck<'a> {
    path: &'a Path,
    pass: Pass,
    f: File,
    h: SparseHeader,
    flen: u64,
    /// File size in sectors (grows when repair appends tables).
    fsect: u64,
    per: u64,
    gt_sectors: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    /// Sector ranges grains must not overlap.
    meta: Vec<(u64, u64)>,
    /// Directory entries whose copies cannot be told apart: never repaired.
    undecided: Vec<bool>,
    /// Per grain-sized piece after overHead: referenced by nothing (yet).
    leak_map: Vec<bool>,
}

impl<'a> SparseCheck<'a> {
    /// Open the file (read-only unless repairing) and load the directories; `None` when
    /// the primary directory itself lies outside the file (reported).
    fn open(
        path: &'a Path,
        flen: u64,
        h: SparseHeader,
        pass: Pass,
        r: &mut CheckReport,
    ) -> Result<Option<SparseCheck<'a>>> {
        // Directory at the end (uncompressed, as qemu reads it): the footer's header
        // counts, and the footer's three sectors are metadata.
        let at_end = h.gd_offset == sparse::GD_AT_END;
        let h = if at_end {
            match SparseExtent::open(Source::open(path, SourceMode::Pread)?) {
                Ok(e) => *e.header(),
                Err(e) => {
                    r.add(path, 0, Severity::Corruption, e.to_string());
                    return Ok(None);
                }
            }
        } else {
            h
        };
        let f = if pass != Pass::Look {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io("open for writing", path, 0, e))?
        } else {
            File::open(path).map_err(|e| Error::io("open", path, 0, e))?
        };
        let n = h.num_gts();
        let per = u64::from(h.num_gtes_per_gt);
        let gd_sectors = (n * 4).div_ceil(SECTOR);
        let fsect = flen / SECTOR;
        let dir_ok = |at: u64| at.checked_add(gd_sectors).is_some_and(|e| e <= fsect) && at >= 1;
        if !dir_ok(h.gd_offset) {
            r.add(
                path,
                56,
                Severity::Corruption,
                format!(
                    "grain directory at sector {} ({gd_sectors} sectors) lies outside the file",
                    h.gd_offset
                ),
            );
            return Ok(None);
        }
        let gd = rd32(&f, path, h.gd_offset, n)?;
        let mut rgd = None;
        if h.flags & FLAG_REDUNDANT_GD != 0 {
            if dir_ok(h.rgd_offset) {
                rgd = Some(rd32(&f, path, h.rgd_offset, n)?);
            } else {
                r.add(
                    path,
                    48,
                    Severity::Corruption,
                    format!(
                        "redundant grain directory at sector {} lies outside the file",
                        h.rgd_offset
                    ),
                );
            }
        }
        // Metadata regions (sector ranges, clipped to the file) grains must not overlap.
        let clip = |a: u64, len: u64| (a.min(fsect), a.saturating_add(len).min(fsect));
        let mut meta: Vec<(u64, u64)> = vec![(0, 1), clip(h.gd_offset, gd_sectors)];
        if h.descriptor_offset > 0 {
            meta.push(clip(h.descriptor_offset, h.descriptor_size));
        }
        if rgd.is_some() {
            meta.push(clip(h.rgd_offset, gd_sectors));
        }
        if at_end {
            meta.push((fsect.saturating_sub(3), fsect));
        }
        Ok(Some(SparseCheck {
            path,
            pass,
            f,
            h,
            flen,
            fsect,
            per,
            gt_sectors: (per * 4).div_ceil(SECTOR),
            undecided: vec![false; n as usize],
            gd,
            rgd,
            meta,
            leak_map: Vec::new(),
        }))
    }

    fn repairing_tables(&self) -> bool {
        self.pass == Pass::Tables
    }

    fn table_ok(&self, e: u32) -> bool {
        e == 0 || (u64::from(e) >= 1 && u64::from(e) + self.gt_sectors <= self.fsect)
    }

    /// Directory entries sharing a table: one of them is wrong, and nothing says which.
    fn shared_tables(&mut self, r: &mut CheckReport) {
        let (gd_at, rgd_at) = (self.h.gd_offset, self.h.rgd_offset);
        for (which, dir, base) in [
            ("", Some(&self.gd), gd_at),
            ("redundant ", self.rgd.as_ref(), rgd_at),
        ] {
            let Some(dir) = dir else { continue };
            let mut first: HashMap<u32, usize> = HashMap::new();
            for (i, &e) in dir.iter().enumerate().filter(|(_, &e)| e != 0) {
                if let Some(&j) = first.get(&e) {
                    r.add(
                        self.path,
                        base * SECTOR + 4 * i as u64,
                        Severity::Corruption,
                        format!("{which}grain directory entries {j} and {i} both point at the table at sector {e}"),
                    );
                    self.undecided[i] = true;
                    self.undecided[j] = true;
                } else {
                    first.insert(e, i);
                }
            }
        }
    }

    /// Primary against redundant directory: entries outside the file, and entries one
    /// copy lost (restored from the intact copy's table when repairing).
    fn directories(&mut self, r: &mut CheckReport) -> Result<()> {
        let (path, h) = (self.path, self.h);
        let mut new_tables_at = self.flen.div_ceil(h.grain_size * SECTOR) * h.grain_size;
        let (mut gd_dirty, mut rgd_dirty) = (false, false);
        for i in 0..self.gd.len() {
            let p = self.gd[i];
            let pok = self.table_ok(p);
            if !pok {
                r.add(
                    path,
                    h.gd_offset * SECTOR + 4 * i as u64,
                    Severity::Corruption,
                    format!("grain directory entry {i} points at sector {p}, outside the file"),
                );
            }
            let Some(q) = self.rgd.as_ref().map(|rg| rg[i]) else {
                continue;
            };
            let qok = self.table_ok(q);
            if !qok {
                r.add(
                    path,
                    h.rgd_offset * SECTOR + 4 * i as u64,
                    Severity::Corruption,
                    format!(
                        "redundant grain directory entry {i} points at sector {q}, outside the file"
                    ),
                );
            }
            let (p_good, q_good) = (pok && p != 0, qok && q != 0);
            if p == q || (p_good && q_good) {
                continue; // both point at tables (their own copies); compared later
            }
            let idx = r.add(
                path,
                h.gd_offset * SECTOR + 4 * i as u64,
                Severity::Corruption,
                format!("grain directory entry {i} is {p}, the redundant copy says {q}"),
            );
            if !self.repairing_tables() {
                continue;
            }
            if self.undecided[i] {
                r.findings[idx].what.push_str(
                    "; not repaired: the intact copy's table is shared with another entry",
                );
            } else if p_good != q_good {
                // Restore the lost copy: a fresh table at the end with the intact one's
                // entries, synced before any directory entry points at it.
                let from = if q_good { q } else { p };
                let t = rd32(&self.f, path, u64::from(from), self.per)?;
                let at = new_tables_at;
                new_tables_at += self.gt_sectors.div_ceil(h.grain_size) * h.grain_size;
                wr32(&self.f, path, at * SECTOR, &t)?;
                self.f
                    .sync_data()
                    .map_err(|e| Error::io("flush", path, 0, e))?;
                let at32 =
                    u32::try_from(at).map_err(|_| Error::unsupported(path, "file past 2 TiB"))?;
                if q_good {
                    self.gd[i] = at32;
                    gd_dirty = true;
                } else if let Some(rg) = self.rgd.as_mut() {
                    rg[i] = at32;
                    rgd_dirty = true;
                }
                r.findings[idx].repaired = true;
            }
        }
        if !(gd_dirty || rgd_dirty) {
            return Ok(());
        }
        if new_tables_at * SECTOR > self.flen {
            // New tables live past the old end: make them part of the file first.
            self.f
                .set_len(new_tables_at * SECTOR)
                .map_err(|e| Error::io("extend", path, self.flen, e))?;
            self.f
                .sync_all()
                .map_err(|e| Error::io("flush", path, 0, e))?;
        }
        if gd_dirty {
            wr32(&self.f, path, h.gd_offset * SECTOR, &self.gd)?;
        }
        if let (true, Some(rg)) = (rgd_dirty, &self.rgd) {
            wr32(&self.f, path, h.rgd_offset * SECTOR, rg)?;
        }
        self.fsect = new_tables_at.max(self.fsect);
        Ok(())
    }

    /// Tables: primary against redundant (lost entries restored from the allocated copy
    /// when it is sound), grains in bounds, not on metadata, not used twice.
    fn tables(&mut self, r: &mut CheckReport) -> Result<()> {
        let n = self.gd.len();
        for i in 0..n {
            let p = self.gd[i];
            if p == 0 || !self.table_ok(p) {
                continue;
            }
            self.meta
                .push((u64::from(p), u64::from(p) + self.gt_sectors));
            if let Some(q) = self.rgd.as_ref().map(|rg| rg[i]) {
                if q != 0 && self.table_ok(q) {
                    self.meta
                        .push((u64::from(q), u64::from(q) + self.gt_sectors));
                }
            }
        }
        let seen_count = self.entry_counts()?;
        let (over, grain) = (self.h.over_head, self.h.grain_size);
        let total_grains = self.fsect.saturating_sub(over) / grain;
        self.leak_map = vec![true; total_grains.min(1 << 28) as usize];
        for &(a, b) in &self.meta.clone() {
            self.mark_used(a, b);
        }
        let mut used: HashMap<u32, u64> = HashMap::new();
        for i in 0..n {
            self.table(i, &seen_count, &mut used, r)?;
        }
        Ok(())
    }

    /// Sectors `[a, b)` are referenced: not leaked.
    fn mark_used(&mut self, a: u64, b: u64) {
        let (over, grain) = (self.h.over_head, self.h.grain_size);
        let (a, b) = (a.max(over), b.min(self.fsect));
        if a < b {
            let (ka, kb) = ((a - over) / grain, (b - over).div_ceil(grain));
            for k in ka..kb.min(self.leak_map.len() as u64) {
                self.leak_map[k as usize] = false;
            }
        }
    }

    /// How often each grain sector appears in any table (a restore source must be
    /// unique); only needed when repairing.
    fn entry_counts(&self) -> Result<HashMap<u32, u32>> {
        let mut seen_count: HashMap<u32, u32> = HashMap::new();
        if !self.repairing_tables() {
            return Ok(seen_count);
        }
        for i in 0..self.gd.len() {
            for dir in [Some(&self.gd), self.rgd.as_ref()].into_iter().flatten() {
                if dir[i] != 0 && self.table_ok(dir[i]) {
                    for e in rd32(&self.f, self.path, u64::from(dir[i]), self.per)? {
                        if e > 1 {
                            *seen_count.entry(e).or_default() += 1;
                        }
                    }
                }
            }
        }
        Ok(seen_count)
    }

    /// Whether a grain pointer can be trusted as a restore source.
    fn sound_source(&self, e: u32, seen_count: &HashMap<u32, u32>) -> bool {
        let s = u64::from(e);
        let grain = self.h.grain_size;
        e == 1
            || (s >= self.h.over_head
                && s + grain <= self.fsect
                && !self.meta.iter().any(|&(a, b)| s < b && s + grain > a)
                && seen_count.get(&e) == Some(&1))
    }

    /// One table (and its redundant copy).
    fn table(
        &mut self,
        i: usize,
        seen_count: &HashMap<u32, u32>,
        used: &mut HashMap<u32, u64>,
        r: &mut CheckReport,
    ) -> Result<()> {
        let (path, per) = (self.path, self.per);
        let p = self.gd[i];
        if p == 0 || !self.table_ok(p) {
            return Ok(());
        }
        let mut t = rd32(&self.f, path, u64::from(p), per)?;
        let rp = self
            .rgd
            .as_ref()
            .map(|rg| rg[i])
            .filter(|&q| q != 0 && self.table_ok(q));
        let mut rt = rp
            .map(|q| rd32(&self.f, path, u64::from(q), per))
            .transpose()?;
        let (mut t_dirty, mut rt_dirty) = (false, false);
        for j in 0..per as usize {
            let g = i as u64 * per + j as u64;
            let entry_at = u64::from(p) * SECTOR + 4 * j as u64;
            if let Some(rt) = rt.as_mut() {
                let (e, q) = (t[j], rt[j]);
                if q != e {
                    let idx = r.add(
                        path,
                        entry_at,
                        Severity::Corruption,
                        format!("grain {g}: table says sector {e}, the redundant table says {q}"),
                    );
                    let sound = self.sound_source(e.max(q), seen_count);
                    if self.repairing_tables()
                        && (e == 0) != (q == 0)
                        && !self.undecided[i]
                        && sound
                    {
                        // The allocated copy wins: data is written before tables, and the
                        // grain it names is in the file and used by nothing else.
                        if e == 0 {
                            t[j] = q;
                            t_dirty = true;
                        } else {
                            rt[j] = e;
                            rt_dirty = true;
                        }
                        r.findings[idx].repaired = true;
                    } else if self.repairing_tables() {
                        r.findings[idx]
                            .what
                            .push_str("; not repaired: nothing shows which copy is right");
                    }
                }
            }
            self.grain(g, t[j], entry_at, used, r);
        }
        if t_dirty {
            self.f
                .sync_data()
                .map_err(|e| Error::io("flush", path, 0, e))?;
            wr32(&self.f, path, u64::from(p) * SECTOR, &t)?;
        }
        if let (true, Some(rt), Some(q)) = (rt_dirty, &rt, rp) {
            self.f
                .sync_data()
                .map_err(|e| Error::io("flush", path, 0, e))?;
            wr32(&self.f, path, u64::from(q) * SECTOR, rt)?;
        }
        Ok(())
    }

    /// The grain entry `e` of grain `g`: in the file, off metadata, used once.
    fn grain(
        &mut self,
        g: u64,
        e: u32,
        entry_at: u64,
        used: &mut HashMap<u32, u64>,
        r: &mut CheckReport,
    ) {
        let (path, h) = (self.path, self.h);
        if e == 0 || (e == 1 && h.zero_grain()) || g >= h.num_grains() {
            return;
        }
        let grain = h.grain_size;
        let s = u64::from(e);
        let valid = ((h.capacity_sectors - g * grain).min(grain)).max(1);
        if s + valid > self.fsect {
            let (a, b) = grain_range(&h, g);
            r.lost.push((a, b));
            r.add(
                path,
                entry_at,
                Severity::Corruption,
                format!(
                    "grain {g} at sector {s} lies past the end of the file: guest bytes {a:#x}-{:#x} are lost", b - 1
                ),
            );
            return;
        }
        if let Some(&(a, b)) = self.meta.iter().find(|&&(a, b)| s < b && s + grain > a) {
            r.add(
                path,
                entry_at,
                Severity::Corruption,
                format!(
                    "grain {g} at sector {s} overlaps metadata (sectors {a}-{})",
                    b - 1
                ),
            );
        }
        if let Some(&other) = used.get(&e) {
            r.add(
                path,
                entry_at,
                Severity::Corruption,
                format!("grain {g} at sector {s} is also grain {other}"),
            );
        } else {
            used.insert(e, g);
        }
        self.mark_used(s, s + 1);
    }

    /// Orphaned tables: a block no directory entry points at that reads as a grain table
    /// (in the metadata area, or where a writer appends tables: at a leaked grain). The
    /// grains it names are guest data whose directory entry was lost, not leaks.
    fn orphans(&mut self, r: &mut CheckReport) -> Result<()> {
        let (path, h, fsect, gt_sectors) = (self.path, self.h, self.fsect, self.gt_sectors);
        let (over, grain) = (h.over_head, h.grain_size);
        let mut covered = vec![false; over.min(fsect) as usize];
        for &(a, b) in &self.meta {
            for s in a.min(covered.len() as u64)..b.min(covered.len() as u64) {
                covered[s as usize] = true;
            }
        }
        let mut candidates: Vec<u64> = (1..over.min(fsect).saturating_sub(gt_sectors - 1))
            .filter(|&s| !(s..s + gt_sectors).any(|x| covered[x as usize]))
            .collect();
        candidates.extend(
            self.leak_map
                .iter()
                .enumerate()
                .filter(|(_, &l)| l)
                .map(|(k, _)| over + k as u64 * grain)
                .take(1 << 16),
        );
        // Tables one directory copy points at are not orphans, nor is anything read
        // across them: an entry whose copies disagree is reported (and repaired from
        // the intact copy) on its own, and the grains that copy's tables name are live.
        let pointed: Vec<u64> = self
            .gd
            .iter()
            .chain(self.rgd.iter().flatten())
            .map(|&t| u64::from(t))
            .filter(|&t| t != 0 && t + gt_sectors <= fsect)
            .collect();
        for &t in &pointed {
            let tab = rd32(&self.f, path, t, self.per)?;
            if looks_like_table(&h, &tab, fsect) {
                for e in tab.iter().map(|&e| u64::from(e)).filter(|&e| e >= over) {
                    if self.leak_map.get(((e - over) / grain) as usize) == Some(&true) {
                        self.mark_used(e, e + 1);
                    }
                }
            }
        }
        candidates.retain(|&s| {
            !pointed
                .iter()
                .any(|&t| s < t + gt_sectors && t < s + gt_sectors)
        });
        let mut s_iter = candidates.into_iter().peekable();
        while let Some(s) = s_iter.next() {
            if s + gt_sectors > fsect {
                continue;
            }
            let t = rd32(&self.f, path, s, self.per)?;
            if !looks_like_table(&h, &t, fsect) {
                continue;
            }
            // Only grains no live table reaches are lost: a table whose grains are all
            // reachable is a stale copy (e.g. the old place of a repaired table).
            let named: Vec<u64> = t
                .iter()
                .map(|&e| u64::from(e))
                .filter(|&e| e >= over)
                .filter(|&e| self.leak_map.get(((e - over) / grain) as usize) == Some(&true))
                .collect();
            if named.is_empty() {
                continue;
            }
            for &e in &named {
                self.mark_used(e, e + 1);
            }
            r.add(
                path,
                s * SECTOR,
                Severity::Corruption,
                format!(
                    "orphaned grain table at sector {s}: no directory entry points at it, and it names {} grains of guest data (where they belong is lost; not repairable)",
                    named.len()
                ),
            );
            // Skip the candidates inside this table.
            while s_iter.peek().is_some_and(|&x| x < s + gt_sectors) {
                s_iter.next();
            }
        }
        Ok(())
    }

    /// Whether this file has corruption no repair has fixed (leaks are then not
    /// reclaimed: a damaged table makes live grains look leaked).
    fn corrupt(&self, r: &CheckReport) -> bool {
        r.findings
            .iter()
            .any(|x| x.file == self.path && x.severity == Severity::Corruption && !x.repaired)
    }

    /// Leaks: grain-sized pieces after overHead that nothing refers to.
    fn leaks(&mut self, r: &mut CheckReport) -> Result<()> {
        let leaked: Vec<usize> = self
            .leak_map
            .iter()
            .enumerate()
            .filter(|(_, &l)| l)
            .map(|(k, _)| k)
            .collect();
        if leaked.is_empty() {
            return Ok(());
        }
        let (over, grain) = (self.h.over_head, self.h.grain_size);
        let bytes = leaked.len() as u64 * grain * SECTOR;
        r.leaked_bytes += bytes;
        let first = over + leaked[0] as u64 * grain;
        let idx = r.add(
            self.path,
            first * SECTOR,
            Severity::Leak,
            format!(
                "{} grains ({bytes} bytes) allocated but referenced by nothing",
                leaked.len()
            ),
        );
        let Pass::Rest { discard_data } = self.pass else {
            return Ok(());
        };
        if self.corrupt(r) {
            r.findings[idx].what.push_str(
                "; not reclaimed: corruption that repair could not fix remains, and a damaged table can make live grains look leaked",
            );
            return Ok(());
        }
        let holding_data = self.reclaim(&leaked, discard_data)?;
        if holding_data == 0 {
            r.findings[idx].repaired = true;
        } else {
            r.findings[idx].what.push_str(&format!(
                "; {holding_data} of them hold data and were kept (they may be guest data whose table entry was lost); \
                 a repair that discards unreferenced grains frees them, losing that data"
            ));
        }
        Ok(())
    }

    /// Free leaked grains (those of zeros, or all with `discard_data`): a freed tail is
    /// cut off, freed grains inside the file become holes. Returns how many were kept
    /// because they hold data.
    fn reclaim(&self, leaked: &[usize], discard_data: bool) -> Result<u64> {
        let (path, over, grain) = (self.path, self.h.over_head, self.h.grain_size);
        let mut buf = vec![0u8; (grain * SECTOR) as usize];
        let mut holding_data = 0u64;
        let mut freed = vec![false; self.leak_map.len()];
        for &k in leaked {
            let at = (over + k as u64 * grain) * SECTOR;
            let n = self
                .f
                .read_at(&mut buf, at)
                .map_err(|e| Error::io("read", path, at, e))?;
            if buf[..n].iter().any(|&b| b != 0) && !discard_data {
                holding_data += 1;
                continue;
            }
            freed[k] = true;
        }
        let mut keep = freed.len();
        while keep > 0 && freed[keep - 1] {
            keep -= 1;
        }
        for k in (0..keep).filter(|&k| freed[k]) {
            let at = (over + k as u64 * grain) * SECTOR;
            // A hole (zeros where the file system cannot punch).
            crate::output::zero_range(&self.f, path, false, at, grain * SECTOR)?;
        }
        if keep < freed.len() {
            let end = (over + keep as u64 * grain) * SECTOR;
            self.f
                .set_len(end.min(self.flen))
                .map_err(|e| Error::io("truncate", path, end, e))?;
        }
        Ok(holding_data)
    }

    /// The unclean-shutdown flag: a warning; cleared once the tables check out.
    fn unclean_flag(&self, r: &mut CheckReport) -> Result<()> {
        if !self.h.unclean_shutdown {
            return Ok(());
        }
        let clean = !self.corrupt(r);
        let idx = r.add(
            self.path,
            72,
            Severity::Warning,
            "unclean-shutdown flag set (the disk was not closed cleanly)",
        );
        if matches!(self.pass, Pass::Rest { .. }) && clean {
            let path = self.path;
            self.f
                .sync_all()
                .map_err(|e| Error::io("flush", path, 0, e))?;
            self.f
                .write_all_at(&[0], 72)
                .map_err(|e| crate::io::write_error(path, 72, e))?;
            r.findings[idx].repaired = true;
        }
        Ok(())
    }
}

/// Guest byte range `[a, b)` of grain `g` (clipped to the capacity).
fn grain_range(h: &SparseHeader, g: u64) -> (u64, u64) {
    let gb = h.grain_size * SECTOR;
    let a = g * gb;
    (a, (a + gb).min(h.capacity_sectors * SECTOR))
}

/// Whether `t` looks like a grain table of a file of `fsect` sectors: every entry empty,
/// a zeroed grain, or a grain-aligned sector past the overhead inside the file; at least
/// one grain.
fn looks_like_table(h: &SparseHeader, t: &[u32], fsect: u64) -> bool {
    let mut grains = 0;
    for &e in t {
        let e = u64::from(e);
        if e == 0 || (e == 1 && h.zero_grain()) {
            continue;
        }
        if e < h.over_head || e >= fsect || (e - h.over_head) % h.grain_size != 0 {
            return false;
        }
        grains += 1;
    }
    grains > 0
}
