//! `check` and `check --repair`: every layer of a chain, every finding (not only the
//! first), each with the file, the byte offset and what is wrong.
//!
//! Exit codes follow `qemu-img check`: 0 clean, 1 the check could not finish, 2
//! corruption found, 3 only leaks found. Warnings (the unclean-shutdown flag on tables
//! that check out, a stale allocation hint) do not change the code.
//!
//! `--repair` mends only what has one right answer: a directory entry or grain-table
//! entry that one copy has and the other lost (restored from the intact copy), leaked
//! space (a tail truncated, the rest zeroed), the unclean-shutdown flag once the tables
//! check out, a descriptor extent size that disagrees with its sparse header. Table
//! copies are written and synced before the directory entries that point at them, and
//! the header flag last, so an interrupted repair leaves the file no worse.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::cowd::{self, COWD_GTES};
use crate::format::descriptor::{Descriptor, ExtentType, NO_PARENT_CID};
use crate::format::sparse::{self, SparseExtent, SparseHeader, FLAG_REDUNDANT_GD, SECTOR};
use crate::io::{Source, SourceMode};
use crate::layer::{Layer, OpenOptions};
use crate::resolve::resolve_name;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data may read wrong.
    Corruption,
    /// Space nothing refers to.
    Leak,
    /// Worth knowing; not damage.
    Warning,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// Byte offset in it.
    pub offset: u64,
    /// Severity.
    pub severity: Severity,
    /// What is wrong.
    pub what: String,
    /// Mended by `--repair`.
    pub repaired: bool,
}

/// Result of a check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Every finding.
    pub findings: Vec<Finding>,
    /// Set when the check could not finish, with the reason.
    pub incomplete: Option<String>,
    /// Bytes of leaked space found.
    pub leaked_bytes: u64,
    /// Guest byte ranges `[start, end)` whose data is gone (grains past the end of a
    /// truncated file...); repair cannot bring them back.
    pub lost: Vec<(u64, u64)>,
}

/// What `check` may change.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Mend what has one right answer.
    pub repair: bool,
    /// With `repair`: also free leaked grains that hold data (the data is lost).
    pub discard_unreferenced: bool,
}

impl CheckReport {
    /// Exit code as `qemu-img check`.
    pub fn exit_code(&self) -> u8 {
        let open = |s: Severity| self.findings.iter().any(|f| f.severity == s && !f.repaired);
        if self.incomplete.is_some() {
            1
        } else if open(Severity::Corruption) {
            2
        } else if open(Severity::Leak) {
            3
        } else {
            0
        }
    }

    fn add(
        &mut self,
        file: &Path,
        offset: u64,
        severity: Severity,
        what: impl Into<String>,
    ) -> usize {
        self.findings.push(Finding {
            file: file.to_path_buf(),
            offset,
            severity,
            what: what.into(),
            repaired: false,
        });
        self.findings.len() - 1
    }
}

fn rd32(f: &File, path: &Path, sector: u64, n: u64) -> Result<Vec<u32>> {
    crate::format::tables::read_u32s(f, path, sector, n as usize)
}

fn wr32(f: &File, path: &Path, at: u64, v: &[u32]) -> Result<()> {
    let mut b = vec![0u8; v.len() * 4];
    LE::write_u32_into(v, &mut b);
    f.write_all_at(&b, at)
        .map_err(|e| crate::output::write_error(path, at, e))
}

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

/// Guest byte range `[a, b)` of grain `g` (clipped to the capacity).
fn grain_range(h: &SparseHeader, g: u64) -> (u64, u64) {
    let gb = h.grain_size * SECTOR;
    let a = g * gb;
    (a, (a + gb).min(h.capacity * SECTOR))
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

/// Check (and optionally repair) one hosted sparse extent file. Plain checks open the
/// file read-only and never write.
fn check_sparse(path: &Path, pass: Pass, r: &mut CheckReport) -> Result<()> {
    let repair = pass == Pass::Tables;
    let src = Source::open(path, SourceMode::Pread)?;
    let h = match sparse::read_header(&src) {
        Ok(h) => h,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, format!("header: {e}"));
            return Ok(());
        }
    };
    if h.compressed() {
        return check_stream(path, src, &h, r);
    }
    let flen = src.len();
    // Directory at the end (uncompressed, as qemu reads it): the footer's header counts,
    // and the footer's three sectors are metadata.
    let at_end = h.gd_offset == sparse::GD_AT_END;
    let h = if at_end {
        match SparseExtent::open(Source::open(path, SourceMode::Pread)?) {
            Ok(e) => *e.header(),
            Err(e) => {
                r.add(path, 0, Severity::Corruption, e.to_string());
                return Ok(());
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
    let gt_sectors = (per * 4).div_ceil(SECTOR);
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
        return Ok(());
    }
    let mut gd = rd32(&f, path, h.gd_offset, n)?;
    let has_rgd = h.flags & FLAG_REDUNDANT_GD != 0;
    let mut rgd = None;
    if has_rgd {
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
    let table_ok = |e: u32| e == 0 || (u64::from(e) >= 1 && u64::from(e) + gt_sectors <= fsect);
    // Directory entries sharing a table: one of them is wrong, and nothing says which.
    let mut undecided = vec![false; n as usize];
    for (which, dir, base) in [
        ("", Some(&gd), h.gd_offset),
        ("redundant ", rgd.as_ref(), h.rgd_offset),
    ] {
        let Some(dir) = dir else { continue };
        let mut first: HashMap<u32, usize> = HashMap::new();
        for (i, &e) in dir.iter().enumerate() {
            if e == 0 {
                continue;
            }
            if let Some(&j) = first.get(&e) {
                r.add(
                    path,
                    base * SECTOR + 4 * i as u64,
                    Severity::Corruption,
                    format!("{which}grain directory entries {j} and {i} both point at the table at sector {e}"),
                );
                undecided[i] = true;
                undecided[j] = true;
            } else {
                first.insert(e, i);
            }
        }
    }
    let mut new_tables_at = flen.div_ceil(h.grain_size * SECTOR) * h.grain_size;
    let mut gd_dirty = false;
    let mut rgd_dirty = false;
    for i in 0..n as usize {
        let p = gd[i];
        let pok = table_ok(p);
        if !pok {
            r.add(
                path,
                h.gd_offset * SECTOR + 4 * i as u64,
                Severity::Corruption,
                format!("grain directory entry {i} points at sector {p}, outside the file"),
            );
        }
        let Some(rg) = rgd.as_mut() else { continue };
        let q = rg[i];
        let qok = table_ok(q);
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
            continue; // both point at tables (their own copies); compared below
        }
        let idx = r.add(
            path,
            h.gd_offset * SECTOR + 4 * i as u64,
            Severity::Corruption,
            format!("grain directory entry {i} is {p}, the redundant copy says {q}"),
        );
        if repair && undecided[i] {
            r.findings[idx]
                .what
                .push_str("; not repaired: the intact copy's table is shared with another entry");
        }
        if repair && (p_good != q_good) && !undecided[i] {
            // Restore the lost copy: a fresh table at the end with the intact one's entries.
            let from = if q_good { q } else { p };
            let t = rd32(&f, path, u64::from(from), per)?;
            let at = new_tables_at;
            new_tables_at += gt_sectors.div_ceil(h.grain_size) * h.grain_size;
            wr32(&f, path, at * SECTOR, &t)?;
            f.sync_data().map_err(|e| Error::io("flush", path, 0, e))?;
            let at32 =
                u32::try_from(at).map_err(|_| Error::unsupported(path, "file past 2 TiB"))?;
            if q_good {
                gd[i] = at32;
                gd_dirty = true;
            } else {
                rg[i] = at32;
                rgd_dirty = true;
            }
            r.findings[idx].repaired = true;
        }
    }
    if (gd_dirty || rgd_dirty) && new_tables_at * SECTOR > flen {
        // New tables live past the old end: make them part of the file before any
        // directory entry points at them.
        f.set_len(new_tables_at * SECTOR)
            .map_err(|e| Error::io("extend", path, flen, e))?;
        f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
    }
    if gd_dirty {
        wr32(&f, path, h.gd_offset * SECTOR, &gd)?;
    }
    if let (true, Some(rg)) = (rgd_dirty, &rgd) {
        wr32(&f, path, h.rgd_offset * SECTOR, rg)?;
    }
    let fsect = if gd_dirty || rgd_dirty {
        new_tables_at.max(fsect)
    } else {
        fsect
    };
    // Tables: in bounds, primary against redundant, grains in bounds, no overlap, no reuse.
    let grain = h.grain_size;
    let mut used: HashMap<u32, (usize, usize)> = HashMap::new();
    for i in 0..n as usize {
        let p = gd[i];
        if p == 0 || !table_ok(p) {
            continue;
        }
        meta.push((u64::from(p), u64::from(p) + gt_sectors));
        if let Some(rg) = &rgd {
            if rg[i] != 0 && table_ok(rg[i]) {
                meta.push((u64::from(rg[i]), u64::from(rg[i]) + gt_sectors));
            }
        }
    }
    // How often each grain sector appears in any table (a restore source must be unique).
    let mut seen_count: HashMap<u32, u32> = HashMap::new();
    if repair {
        for i in 0..n as usize {
            for dir in [Some(&gd), rgd.as_ref()].into_iter().flatten() {
                if dir[i] != 0 && table_ok(dir[i]) {
                    for e in rd32(&f, path, u64::from(dir[i]), per)? {
                        if e > 1 {
                            *seen_count.entry(e).or_default() += 1;
                        }
                    }
                }
            }
        }
    }
    let over = h.over_head;
    let total_grains = fsect.saturating_sub(over) / grain;
    let mut leak_map: Vec<bool> = vec![true; total_grains.min(1 << 28) as usize];
    for &(a, b) in &meta {
        let (a, b) = (a.max(over), b.min(fsect));
        if a < b {
            let (ka, kb) = ((a - over) / grain, (b - over).div_ceil(grain));
            for k in ka..kb.min(leak_map.len() as u64) {
                leak_map[k as usize] = false;
            }
        }
    }
    let mut lost: Vec<(u64, u64)> = Vec::new();
    for i in 0..n as usize {
        let p = gd[i];
        if p == 0 || !table_ok(p) {
            continue;
        }
        let mut t = rd32(&f, path, u64::from(p), per)?;
        let mut rt = match &rgd {
            Some(rg) if rg[i] != 0 && table_ok(rg[i]) => {
                Some(rd32(&f, path, u64::from(rg[i]), per)?)
            }
            _ => None,
        };
        let mut t_dirty = false;
        let mut rt_dirty = false;
        for j in 0..per as usize {
            let g = i as u64 * per + j as u64;
            let e = t[j];
            let entry_at = u64::from(p) * SECTOR + 4 * j as u64;
            if let Some(rt) = rt.as_mut() {
                if rt[j] != e {
                    let idx = r.add(
                        path,
                        entry_at,
                        Severity::Corruption,
                        format!(
                            "grain {g}: table says sector {e}, the redundant table says {}",
                            rt[j]
                        ),
                    );
                    let from = e.max(rt[j]);
                    let sound = from == 1
                        || (u64::from(from) >= over
                            && u64::from(from) + grain <= fsect
                            && !meta
                                .iter()
                                .any(|&(a, b)| u64::from(from) < b && u64::from(from) + grain > a)
                            && seen_count.get(&from) == Some(&1));
                    if repair && (e == 0) != (rt[j] == 0) && !undecided[i] && sound {
                        // The allocated copy wins: data is written before tables, and the
                        // grain it names is in the file and used by nothing else.
                        if e == 0 {
                            t[j] = rt[j];
                            t_dirty = true;
                        } else {
                            rt[j] = e;
                            rt_dirty = true;
                        }
                        r.findings[idx].repaired = true;
                    } else if repair {
                        r.findings[idx]
                            .what
                            .push_str("; not repaired: nothing shows which copy is right");
                    }
                }
            }
            let e = t[j];
            if e == 0 || (e == 1 && h.zero_grain()) || g >= h.num_grains() {
                continue;
            }
            let s = u64::from(e);
            let valid = ((h.capacity - g * grain).min(grain)).max(1);
            if s + valid > fsect {
                let (a, b) = grain_range(&h, g);
                lost.push((a, b));
                r.add(
                    path,
                    entry_at,
                    Severity::Corruption,
                    format!(
                        "grain {g} at sector {s} lies past the end of the file: guest bytes {a:#x}..{b:#x} are lost"
                    ),
                );
                continue;
            }
            if let Some(&(a, b)) = meta.iter().find(|&&(a, b)| s < b && s + grain > a) {
                r.add(
                    path,
                    entry_at,
                    Severity::Corruption,
                    format!("grain {g} at sector {s} overlaps metadata (sectors {a}..{b})"),
                );
            }
            if let Some(&(pi, pj)) = used.get(&e) {
                r.add(
                    path,
                    entry_at,
                    Severity::Corruption,
                    format!(
                        "grain {g} at sector {s} is also grain {}",
                        pi as u64 * per + pj as u64
                    ),
                );
            } else {
                used.insert(e, (i, j));
            }
            if s >= over {
                let k = ((s - over) / grain) as usize;
                if k < leak_map.len() {
                    leak_map[k] = false;
                }
            }
        }
        if t_dirty {
            f.sync_data().map_err(|e| Error::io("flush", path, 0, e))?;
            wr32(&f, path, u64::from(p) * SECTOR, &t)?;
        }
        if let (true, Some(rt), Some(rg)) = (rt_dirty, &rt, &rgd) {
            f.sync_data().map_err(|e| Error::io("flush", path, 0, e))?;
            wr32(&f, path, u64::from(rg[i]) * SECTOR, rt)?;
        }
    }
    r.lost.extend(lost);
    // Orphaned tables: a block no directory entry points at that reads as a grain table
    // (in the metadata area, or where a writer appends tables: at a leaked grain). The
    // grains it names are guest data whose directory entry was lost, not leaks.
    let mut covered = vec![false; over.min(fsect) as usize];
    for &(a, b) in &meta {
        for s in a.min(covered.len() as u64)..b.min(covered.len() as u64) {
            covered[s as usize] = true;
        }
    }
    let mut candidates: Vec<u64> = (1..over.min(fsect).saturating_sub(gt_sectors - 1))
        .filter(|&s| !(s..s + gt_sectors).any(|x| covered[x as usize]))
        .collect();
    candidates.extend(
        leak_map
            .iter()
            .enumerate()
            .filter(|(_, &l)| l)
            .map(|(k, _)| over + k as u64 * grain)
            .take(1 << 16),
    );
    let mut orphans = 0u64;
    let mut s_iter = candidates.into_iter().peekable();
    while let Some(s) = s_iter.next() {
        if s + gt_sectors > fsect {
            continue;
        }
        let t = rd32(&f, path, s, per)?;
        if !looks_like_table(&h, &t, fsect) {
            continue;
        }
        // Only grains no live table reaches are lost: a table whose grains are all
        // reachable is a stale copy (e.g. the old place of a repaired table).
        let named: Vec<u64> = t
            .iter()
            .map(|&e| u64::from(e))
            .filter(|&e| e >= over)
            .filter(|&e| leak_map.get(((e - over) / grain) as usize) == Some(&true))
            .collect();
        if named.is_empty() {
            continue;
        }
        orphans += 1;
        for &e in &named {
            let k = ((e - over) / grain) as usize;
            if k < leak_map.len() {
                leak_map[k] = false;
            }
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
    let _ = orphans;
    // Leaks: grain-sized pieces after overHead that nothing refers to.
    let leaked: Vec<usize> = leak_map
        .iter()
        .enumerate()
        .filter(|(_, &l)| l)
        .map(|(k, _)| k)
        .collect();
    if !leaked.is_empty() {
        let bytes = leaked.len() as u64 * grain * SECTOR;
        r.leaked_bytes += bytes;
        let first = over + leaked[0] as u64 * grain;
        let idx = r.add(
            path,
            first * SECTOR,
            Severity::Leak,
            format!(
                "{} grains ({bytes} bytes) allocated but referenced by nothing",
                leaked.len()
            ),
        );
        // Only reclaim when nothing else is wrong: a damaged table makes live grains
        // look leaked.
        let clean = !r
            .findings
            .iter()
            .any(|x| x.file == path && x.severity == Severity::Corruption && !x.repaired);
        if let (Pass::Rest { discard_data }, true) = (pass, clean) {
            let gbytes = (grain * SECTOR) as usize;
            let mut buf = vec![0u8; gbytes];
            let mut holding_data = 0u64;
            let mut freed = vec![false; leak_map.len()];
            for &k in &leaked {
                let at = (over + k as u64 * grain) * SECTOR;
                let n = f
                    .read_at(&mut buf, at)
                    .map_err(|e| Error::io("read", path, at, e))?;
                let has_data = buf[..n].iter().any(|&b| b != 0);
                if has_data && !discard_data {
                    holding_data += 1;
                    continue;
                }
                freed[k] = true;
            }
            // A freed tail is cut off; freed grains inside the file become holes.
            let mut keep = leak_map.len();
            while keep > 0 && freed[keep - 1] {
                keep -= 1;
            }
            for k in (0..keep).filter(|&k| freed[k]) {
                let at = (over + k as u64 * grain) * SECTOR;
                punch_hole(&f, path, at, grain * SECTOR)?;
            }
            if keep < leak_map.len() {
                let end = (over + keep as u64 * grain) * SECTOR;
                f.set_len(end.min(flen))
                    .map_err(|e| Error::io("truncate", path, end, e))?;
            }
            if holding_data == 0 {
                r.findings[idx].repaired = true;
            } else {
                r.findings[idx].what.push_str(&format!(
                    "; {holding_data} of them hold data and were kept (they may be guest data whose table entry was lost); \
                     pass --discard-unreferenced to free them, losing that data"
                ));
            }
        }
    }
    if h.unclean_shutdown {
        let clean = !r
            .findings
            .iter()
            .any(|x| x.file == path && x.severity == Severity::Corruption && !x.repaired);
        let idx = r.add(
            path,
            72,
            Severity::Warning,
            "unclean-shutdown flag set (the disk was not closed cleanly)",
        );
        if matches!(pass, Pass::Rest { .. }) && clean {
            f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
            f.write_all_at(&[0], 72)
                .map_err(|e| crate::output::write_error(path, 72, e))?;
            r.findings[idx].repaired = true;
        }
    }
    if pass != Pass::Look {
        f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
    }
    Ok(())
}

/// Give `len` bytes at `off` back to the file system (a hole; zeros where the file
/// system cannot punch).
fn punch_hole(f: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    if let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
        // SAFETY: fallocate on a valid writable fd; no memory is touched.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    let z = vec![0u8; len as usize];
    f.write_all_at(&z, off)
        .map_err(|e| crate::output::write_error(path, off, e))
}

/// Check a sparse extent; with `repair`, mend tables first, re-check from scratch, and
/// only then (when no corruption remains) reclaim leaks and clear the unclean flag.
fn check_sparse_file(path: &Path, opts: &CheckOptions, r: &mut CheckReport) -> Result<()> {
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

/// Streams: every grain record inflates to its grain; VMware-layout streams end with
/// footer marker, footer and end-of-stream marker.
fn check_stream(path: &Path, src: Source, h: &SparseHeader, r: &mut CheckReport) -> Result<()> {
    let ext = match SparseExtent::open(src) {
        Ok(e) => e,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, e.to_string());
            return Ok(());
        }
    };
    if h.markers() {
        walk_markers(path, &ext, r)?;
    }
    let mut runs = Vec::new();
    ext.map(0, 0..ext.len(), 0, &mut runs)?;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for run in runs {
        if let crate::disk::Alloc::Compressed { offset, .. } = run.alloc {
            let gstart = run.start / ext.grain_bytes() * ext.grain_bytes();
            if let Some(prev) = seen.insert(offset, gstart) {
                r.add(
                    path,
                    offset,
                    Severity::Corruption,
                    format!(
                        "grain record at {offset:#x} serves both LBA {} and {}",
                        prev / SECTOR,
                        gstart / SECTOR
                    ),
                );
                continue;
            }
            if let Err(e) = ext.read_grain(offset, gstart) {
                r.add(path, offset, Severity::Corruption, e.to_string());
            }
        }
    }
    Ok(())
}

/// Walk a marker stream from `overHead`: grain records in ascending LBA order, each GT
/// marker's table where the directory says, the GD marker's directory equal to the one in
/// use, then footer marker, footer and end-of-stream marker. qemu's layout (tables up
/// front, no markers) ends at the first zero sector.
fn walk_markers(path: &Path, ext: &SparseExtent, r: &mut CheckReport) -> Result<()> {
    let src = ext.source();
    let h = ext.header();
    let len = src.len();
    let mut pos = h.over_head * SECTOR;
    let mut last_lba: Option<u64> = None;
    let mut sector = [0u8; 512];
    let mut saw_footer = false;
    let gts_in_dir: Vec<u64> = ext
        .gd()
        .iter()
        .filter(|&&e| e != 0)
        .map(|&e| u64::from(e))
        .collect();
    while pos + 512 <= len {
        src.read_exact_at(&mut sector, pos)?;
        let val = LE::read_u64(&sector[0..8]);
        let size = u64::from(LE::read_u32(&sector[8..12]));
        if size > 0 {
            if last_lba.is_some_and(|l| val <= l) {
                r.add(path, pos, Severity::Warning, format!("grain record for LBA {val} follows LBA {} (not in ascending order: streaming readers refuse it)", last_lba.unwrap_or(0)));
            }
            last_lba = Some(val);
            pos += (12 + size).div_ceil(SECTOR) * SECTOR;
            continue;
        }
        let kind = LE::read_u32(&sector[12..16]);
        match kind {
            0 => {
                if h.gd_offset != 0
                    && ext.raw_header().gd_offset == sparse::GD_AT_END
                    && !saw_footer
                {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        "end-of-stream marker before the footer",
                    );
                }
                return Ok(());
            }
            1 => {
                if val != (u64::from(h.num_gtes_per_gt) * 4).div_ceil(SECTOR) {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        format!(
                            "grain-table marker says {val} sectors, a table has {}",
                            (u64::from(h.num_gtes_per_gt) * 4).div_ceil(SECTOR)
                        ),
                    );
                }
                if !gts_in_dir.contains(&(pos / SECTOR + 1)) {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        "grain table after this marker is not in the grain directory",
                    );
                }
            }
            2 => {
                if pos / SECTOR + 1 != h.gd_offset {
                    r.add(path, pos, Severity::Corruption, format!("grain-directory marker at sector {}, but the directory in use is at sector {}", pos / SECTOR, h.gd_offset));
                }
            }
            3 => {
                saw_footer = true;
                let mut f = [0u8; 512];
                src.read_exact_at(&mut f, pos + SECTOR)?;
                if SparseHeader::parse(&f).is_none() {
                    r.add(
                        path,
                        pos + SECTOR,
                        Severity::Corruption,
                        "footer marker not followed by a footer",
                    );
                }
            }
            4 => {}
            k => {
                r.add(
                    path,
                    pos,
                    Severity::Corruption,
                    format!("unknown marker type {k}"),
                );
                return Ok(());
            }
        }
        pos += SECTOR + val.saturating_mul(SECTOR).min(len);
    }
    r.add(
        path,
        len,
        Severity::Warning,
        "the stream ends without an end-of-stream marker (ESXi refuses such streams)",
    );
    Ok(())
}

/// COWD: directory and tables inside the file, grains inside, not shared, not on tables.
fn check_cowd(path: &Path, repair: bool, r: &mut CheckReport) -> Result<()> {
    let src = Source::open(path, SourceMode::Pread)?;
    let h = match cowd::read_header(&src) {
        Ok(h) => h,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, format!("header: {e}"));
            return Ok(());
        }
    };
    let fsect = src.len() / SECTOR;
    let n = cowd::directory_entries(&h);
    let gd_at = u64::from(h.gd_offset);
    if gd_at < 4 || gd_at + (n * 4).div_ceil(SECTOR) > fsect {
        r.add(
            path,
            20,
            Severity::Corruption,
            format!("grain directory at sector {gd_at} lies outside the file"),
        );
        return Ok(());
    }
    let f = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
    let gd = rd32(&f, path, gd_at, n)?;
    let mut meta = vec![(0u64, 4u64), (gd_at, gd_at + (n * 4).div_ceil(SECTOR))];
    for &e in &gd {
        if e != 0 {
            meta.push((u64::from(e), u64::from(e) + 32));
        }
    }
    let mut used: HashMap<u32, u64> = HashMap::new();
    for (i, &e) in gd.iter().enumerate() {
        if e == 0 {
            continue;
        }
        if u64::from(e) + 32 > fsect {
            r.add(
                path,
                gd_at * SECTOR + 4 * i as u64,
                Severity::Corruption,
                format!("grain table {i} at sector {e} lies past the end of the file"),
            );
            continue;
        }
        let t = rd32(&f, path, u64::from(e), COWD_GTES)?;
        for (j, &g) in t.iter().enumerate() {
            if g == 0 {
                continue;
            }
            let at = u64::from(e) * SECTOR + 4 * j as u64;
            let grain_no = i as u64 * COWD_GTES + j as u64;
            let s = u64::from(g);
            if s + u64::from(h.grain_size) > fsect {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} lies past the end of the file"),
                );
            } else if meta
                .iter()
                .any(|&(a, b)| s < b && s + u64::from(h.grain_size) > a)
            {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} overlaps metadata"),
                );
            }
            if let Some(prev) = used.insert(g, grain_no) {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} is also grain {prev}"),
                );
            }
        }
    }
    // Leaks: sectors no header, directory, table or grain covers.
    let mut spans: Vec<(u64, u64)> = meta.clone();
    spans.extend(
        used.keys()
            .map(|&g| (u64::from(g), u64::from(g) + u64::from(h.grain_size))),
    );
    spans.sort_unstable();
    let mut covered_to = 0u64;
    let mut leaked = 0u64;
    let mut first_leak = None;
    for (a, b) in spans {
        if a > covered_to {
            leaked += a.min(fsect) - covered_to.min(fsect);
            first_leak.get_or_insert(covered_to);
        }
        covered_to = covered_to.max(b);
    }
    if covered_to < fsect {
        leaked += fsect - covered_to;
        first_leak.get_or_insert(covered_to);
    }
    if leaked > 0 {
        let idx = r.add(
            path,
            first_leak.unwrap_or(0) * SECTOR,
            Severity::Leak,
            format!(
                "{} sectors ({} bytes) allocated but referenced by nothing",
                leaked,
                leaked * SECTOR
            ),
        );
        let tail_only = leaked == fsect.saturating_sub(covered_to);
        let clean = !r
            .findings
            .iter()
            .any(|x| x.file == path && x.severity == Severity::Corruption);
        if repair && tail_only && clean {
            // A leaked tail (a crash after allocating, before the table update) is cut.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io("open for writing", path, 0, e))?;
            f.set_len(covered_to * SECTOR)
                .map_err(|e| Error::io("truncate", path, covered_to * SECTOR, e))?;
            f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
            r.findings[idx].repaired = true;
        } else {
            r.leaked_bytes += leaked * SECTOR;
        }
    }
    if u64::from(h.free_sector) > fsect + 1 {
        r.add(
            path,
            28,
            Severity::Warning,
            format!(
                "freeSector {} is past the end of the file ({fsect} sectors)",
                h.free_sector
            ),
        );
    }
    if h.unclean_shutdown {
        r.add(path, 0x670, Severity::Warning, "unclean-shutdown flag set");
    }
    Ok(())
}

/// Check `disk` and every parent below it.
pub fn check(disk: &Path, repair: bool) -> Result<CheckReport> {
    check_with(
        disk,
        &CheckOptions {
            repair,
            ..Default::default()
        },
    )
}

/// Check `disk` and every parent below it, as `opts` says.
pub fn check_with(disk: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let repair = opts.repair;
    let mut r = CheckReport::default();
    let mut locks = crate::guard::LockSet::new();
    let kind = if repair {
        crate::guard::LockKind::Exclusive
    } else {
        crate::guard::LockKind::Shared
    };
    let mut next = Some(disk.to_path_buf());
    let mut seen = Vec::new();
    let mut child: Option<(PathBuf, Option<u32>)> = None;
    while let Some(path) = next.take() {
        if seen.contains(&path) || seen.len() > crate::chain::MAX_CHAIN_DEPTH {
            r.add(
                &path,
                0,
                Severity::Corruption,
                "parent loop or chain too deep",
            );
            break;
        }
        seen.push(path.clone());
        if let Err(e) = crate::io::refuse_special(&path) {
            r.incomplete = Some(e.to_string());
            break;
        }
        locks.lock(&path, kind)?;
        let mut head = [0u8; 4];
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                r.incomplete = Some(format!("cannot open `{}`: {e}", path.display()));
                break;
            }
        };
        let _ = f.read_exact_at(&mut head, 0);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or(PathBuf::from("."), Path::to_path_buf);
        let (cid, parent_cid, parent_hint) = if &head == b"COWD" {
            check_cowd(&path, repair, &mut r)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (None, None, name.strip_suffix(".REDO").map(str::to_string))
        } else if &head == b"KDMV" || &head == b"vmdk" {
            check_sparse_file(&path, opts, &mut r)?;
            match Layer::open(
                &path,
                &OpenOptions {
                    ignore_cid: true,
                    mode: SourceMode::Pread,
                    ..Default::default()
                },
            ) {
                Ok(l) => (
                    l.cid(),
                    l.descriptor.parent_cid(),
                    l.parent_hint().map(str::to_string),
                ),
                Err(_) => (None, None, None),
            }
        } else {
            let text = std::fs::read(&path).map_err(|e| Error::io("read", &path, 0, e))?;
            let mut d = match Descriptor::parse(
                &text[..text
                    .len()
                    .min(crate::format::descriptor::MAX_DESCRIPTOR_BYTES)],
                &path,
            ) {
                Ok(d) => d,
                Err(e) => {
                    r.add(&path, 0, Severity::Corruption, e.to_string());
                    break;
                }
            };
            let mut desc_dirty = false;
            for (k, line) in d
                .extents()
                .into_iter()
                .cloned()
                .enumerate()
                .collect::<Vec<_>>()
            {
                let Some(name) = line.file.clone() else {
                    continue;
                };
                let p = match resolve_name(
                    &dir,
                    &name,
                    d.create_type().is_some_and(|c| c.is_device()),
                    "extent",
                    &path,
                    &mut Vec::new(),
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        r.add(&path, 0, Severity::Corruption, e.to_string());
                        continue;
                    }
                };
                if let Err(e) = crate::resolve::confine(
                    &p,
                    &dir,
                    d.create_type()
                        .unwrap_or(crate::format::descriptor::CreateType::Custom),
                    &OpenOptions::default(),
                    &format!("extent {}", k + 1),
                    &path,
                ) {
                    r.incomplete = Some(e.to_string());
                    continue;
                }
                let Ok(meta) = std::fs::metadata(&p) else {
                    r.add(
                        &path,
                        0,
                        Severity::Corruption,
                        format!("extent {}: `{name}` is missing", k + 1),
                    );
                    continue;
                };
                if let Err(e) = crate::io::refuse_special(&p) {
                    if !meta.file_type().is_block_device() {
                        r.add(
                            &path,
                            0,
                            Severity::Corruption,
                            format!("extent {}: {e}", k + 1),
                        );
                        continue;
                    }
                }
                locks.lock(&p, kind)?;
                match line.kind {
                    ExtentType::Sparse => {
                        check_sparse_file(&p, opts, &mut r)?;
                        if let Ok(src) = Source::open(&p, SourceMode::Pread) {
                            if let Ok(h) = sparse::read_header(&src) {
                                if h.capacity != line.sectors {
                                    let idx = r.add(&path, 0, Severity::Corruption, format!("extent {}: descriptor says {} sectors, `{name}` holds {}", k + 1, line.sectors, h.capacity));
                                    if repair {
                                        d.extents_mut()[k].sectors = h.capacity;
                                        desc_dirty = true;
                                        r.findings[idx].repaired = true;
                                    }
                                }
                            }
                        }
                    }
                    ExtentType::VmfsSparse => check_cowd(&p, repair, &mut r)?,
                    ExtentType::Flat
                    | ExtentType::Vmfs
                    | ExtentType::VmfsRaw
                    | ExtentType::VmfsRdm => {
                        let need = (line.offset.unwrap_or(0) + line.sectors).saturating_mul(SECTOR);
                        let have = if meta.is_file() { meta.len() } else { u64::MAX };
                        if have < need {
                            r.add(
                                &p,
                                have,
                                Severity::Corruption,
                                format!("flat extent is {have} bytes, the descriptor needs {need}"),
                            );
                        }
                    }
                    _ => {}
                }
            }
            if desc_dirty {
                let mut l = Layer::open(
                    &path,
                    &OpenOptions {
                        ignore_cid: true,
                        mode: SourceMode::Pread,
                        ..Default::default()
                    },
                )
                .map_err(|e| Error::InvalidInput(format!("reopening after repair: {e}")))?;
                l.descriptor = d.clone();
                crate::write::write_descriptor(&l)?;
            }
            (
                d.cid(),
                d.parent_cid(),
                d.get("parentFileNameHint")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            )
        };
        if let Some((cpath, want)) = child.take() {
            if want.is_some() && want != cid && want != Some(NO_PARENT_CID) {
                r.add(
                    &cpath,
                    0,
                    Severity::Corruption,
                    format!(
                        "parentCID {:08x} does not match the CID {} of parent `{}`",
                        want.unwrap_or(0),
                        cid.map_or("-".into(), |c| format!("{c:08x}")),
                        path.display()
                    ),
                );
            }
        }
        if let Some(h) = parent_hint {
            let resolved = resolve_name(&dir, &h, false, "parent", &path, &mut Vec::new())
                .and_then(|p| {
                    crate::resolve::confine(
                        &p,
                        &dir,
                        crate::format::descriptor::CreateType::Custom,
                        &OpenOptions::default(),
                        "parent",
                        &path,
                    )
                    .map(|()| p)
                });
            match resolved {
                Ok(p) if p.exists() => {
                    child = Some((path.clone(), parent_cid.filter(|_| &head != b"COWD")));
                    next = Some(p);
                }
                Ok(p) => {
                    r.add(
                        &path,
                        0,
                        Severity::Corruption,
                        format!("parent `{h}` is missing (looked for `{}`)", p.display()),
                    );
                }
                Err(e) => {
                    r.add(&path, 0, Severity::Corruption, e.to_string());
                }
            }
        }
    }
    // check agrees with the readers: a disk they refuse is never clean.
    if r.incomplete.is_none() {
        let opened = crate::chain::Chain::open(
            disk,
            &OpenOptions {
                ignore_cid: true,
                ..Default::default()
            },
        );
        match opened {
            Ok(chain) => {
                for l in &chain.layers {
                    if let Some(msg) = crate::chain::missing_parent_hint(l) {
                        r.add(&l.path, 0, Severity::Corruption, msg);
                    }
                }
            }
            Err(e) if e.kind() == crate::error::ErrorKind::Io => {
                r.incomplete = Some(e.to_string());
            }
            Err(e) => {
                if !r
                    .findings
                    .iter()
                    .any(|f| f.severity == Severity::Corruption && !f.repaired)
                {
                    r.add(
                        disk,
                        0,
                        Severity::Corruption,
                        format!("the disk cannot be opened: {e}"),
                    );
                }
            }
        }
    }
    Ok(r)
}
