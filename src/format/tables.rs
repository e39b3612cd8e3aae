//! Grain tables being changed: a grain directory (with the redundant copy hosted sparse
//! files keep), tables loaded on demand and cached, entries set, and the writes that
//! make the changes durable handed back in crash-safe order (tables, then directories).
//! Hosted sparse and COWD writers both use it; `check` and `extend` use its readers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;

/// Read `n` little-endian u32 entries at `sector` of an open file.
pub fn read_u32s(f: &File, path: &Path, sector: u64, n: usize) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    let at = sector * SECTOR;
    f.read_exact_at(&mut raw, at)
        .map_err(|e| Error::io("read", path, at, e))?;
    let mut v = vec![0u32; n];
    LE::read_u32_into(&raw, &mut v);
    Ok(v)
}

/// Little-endian bytes of `v`.
pub fn u32s_bytes(v: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; v.len() * 4];
    LE::write_u32_into(v, &mut b);
    b
}

/// One metadata write: byte offset and bytes.
pub type MetaWrite = (u64, Vec<u8>);

/// A directory (and optional redundant copy) with its tables, being changed.
#[derive(Debug)]
pub struct GrainTables {
    path: PathBuf,
    per: usize,
    gd_at: u64,
    rgd_at: Option<u64>,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    tables: BTreeMap<usize, Vec<u32>>,
    rtables: BTreeMap<usize, Vec<u32>>,
    dirty: BTreeSet<usize>,
    gd_dirty: bool,
}

impl GrainTables {
    /// Load `n` directory entries at sector `gd_at` (and the redundant copy at `rgd_at`)
    /// of `file`; tables hold `per` entries.
    pub fn load(
        file: &File,
        path: &Path,
        gd_at: u64,
        rgd_at: Option<u64>,
        n: usize,
        per: usize,
    ) -> Result<GrainTables> {
        Ok(GrainTables {
            path: path.to_path_buf(),
            per,
            gd_at,
            rgd_at,
            gd: read_u32s(file, path, gd_at, n)?,
            rgd: rgd_at.map(|r| read_u32s(file, path, r, n)).transpose()?,
            tables: BTreeMap::new(),
            rtables: BTreeMap::new(),
            dirty: BTreeSet::new(),
            gd_dirty: false,
        })
    }

    /// Entries per table.
    pub fn per_table(&self) -> usize {
        self.per
    }

    /// Whether directory entry `gdi` points at a table (or one was made for it).
    pub fn has_table(&self, gdi: usize) -> bool {
        self.gd[gdi] != 0 || self.tables.contains_key(&gdi)
    }

    /// Table `gdi`, loaded (both copies) when first needed. A directory entry without a
    /// table gets new, empty tables at the sectors `alloc` gives (primary, then the
    /// redundant copy when there is one).
    fn table(
        &mut self,
        file: &File,
        gdi: usize,
        alloc: &mut dyn FnMut() -> Result<u32>,
    ) -> Result<&mut Vec<u32>> {
        if !self.tables.contains_key(&gdi) {
            let per = self.per;
            let t = if self.gd[gdi] == 0 {
                self.gd[gdi] = alloc()?;
                if self.rgd.is_some() {
                    let r = alloc()?;
                    if let Some(rgd) = self.rgd.as_mut() {
                        rgd[gdi] = r;
                    }
                    self.rtables.insert(gdi, vec![0; per]);
                }
                self.gd_dirty = true;
                self.dirty.insert(gdi);
                vec![0; per]
            } else {
                let t = read_u32s(file, &self.path, u64::from(self.gd[gdi]), per)?;
                if let Some(r) = self.rgd.as_ref().map(|r| r[gdi]).filter(|&r| r != 0) {
                    let mut rt = read_u32s(file, &self.path, u64::from(r), per)?;
                    // The primary copy is written (and synced) first, and writers only
                    // turn entries 0 and 1 into others: a redundant entry still 0 or 1
                    // where the primary has moved on is one a power cut left behind.
                    // Mend those from the primary with this writer's table writes; any
                    // other difference is damage, left for `check` to judge.
                    let mut lagging = false;
                    for (r, &p) in rt.iter_mut().zip(&t) {
                        if *r != p && *r <= 1 {
                            *r = p;
                            lagging = true;
                        }
                    }
                    if lagging {
                        self.dirty.insert(gdi);
                    }
                    self.rtables.insert(gdi, rt);
                }
                t
            };
            self.tables.insert(gdi, t);
        }
        Ok(self.tables.get_mut(&gdi).expect("inserted"))
    }

    /// Make sure grain `g`'s table exists (new tables where `alloc` says).
    pub fn ensure_table(
        &mut self,
        file: &File,
        g: u64,
        alloc: &mut dyn FnMut() -> Result<u32>,
    ) -> Result<()> {
        let gdi = (g / self.per as u64) as usize;
        self.table(file, gdi, alloc).map(|_| ())
    }

    /// The entry of grain `g` (0 when its directory entry has no table).
    pub fn get(&mut self, file: &File, g: u64) -> Result<u32> {
        let gdi = (g / self.per as u64) as usize;
        if !self.has_table(gdi) {
            return Ok(0);
        }
        let i = (g % self.per as u64) as usize;
        Ok(self.table(file, gdi, &mut || unreachable!("table exists"))?[i])
    }

    /// Set grain `g`'s entry (both copies); `alloc` places new tables.
    pub fn set(
        &mut self,
        file: &File,
        g: u64,
        v: u32,
        alloc: &mut dyn FnMut() -> Result<u32>,
    ) -> Result<()> {
        let gdi = (g / self.per as u64) as usize;
        let i = (g % self.per as u64) as usize;
        self.table(file, gdi, alloc)?[i] = v;
        if let Some(rt) = self.rtables.get_mut(&gdi) {
            rt[i] = v;
        }
        self.dirty.insert(gdi);
        Ok(())
    }

    /// The sector just past everything the directories reference: their tables (both
    /// copies) and every grain a table entry points at (entries of 2 and more; `grain`
    /// sectors each). Reads each table once, without keeping it. What lies past this in
    /// the file is referenced by nothing: a writer's tail a crash cut off.
    pub fn referenced_end(&self, file: &File, grain: u64) -> Result<u64> {
        let table_sectors = (self.per as u64 * 4).div_ceil(SECTOR);
        let mut end = 0u64;
        let dirs = std::iter::once(&self.gd).chain(self.rgd.as_ref());
        for dir in dirs {
            for &t in dir.iter().filter(|&&t| t != 0) {
                let t = u64::from(t);
                end = end.max(t + table_sectors);
                for e in read_u32s(file, &self.path, t, self.per)? {
                    if e >= 2 {
                        end = end.max(u64::from(e) + grain);
                    }
                }
            }
        }
        Ok(end)
    }

    /// The sector just past every table the directories (both copies) point at.
    pub fn tables_end(&self) -> u64 {
        let table_sectors = (self.per as u64 * 4).div_ceil(SECTOR);
        std::iter::once(&self.gd)
            .chain(self.rgd.as_ref())
            .flat_map(|d| d.iter())
            .filter(|&&t| t != 0)
            .map(|&t| u64::from(t) + table_sectors)
            .max()
            .unwrap_or(0)
    }

    /// Whether anything changed since the last [`take_writes`](Self::take_writes).
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.gd_dirty
    }

    /// The pending writes in two groups: the primary tables, then the redundant tables
    /// and the directories; the in-memory state counts as clean afterwards. Write them in
    /// this order, syncing after each group, with grain data synced before either: at a
    /// power cut the primary copy is then never older than the redundant one, which a
    /// later writer mends from it (see `GrainTables::table`), and no directory entry
    /// points at a table not yet written.
    pub fn take_writes(&mut self) -> (Vec<MetaWrite>, Vec<MetaWrite>) {
        let mut tables = Vec::new();
        let mut rest = Vec::new();
        for &gdi in &self.dirty {
            tables.push((
                u64::from(self.gd[gdi]) * SECTOR,
                u32s_bytes(&self.tables[&gdi]),
            ));
            if let (Some(r), Some(rt)) = (&self.rgd, self.rtables.get(&gdi)) {
                rest.push((u64::from(r[gdi]) * SECTOR, u32s_bytes(rt)));
            }
        }
        if self.gd_dirty {
            rest.push((self.gd_at * SECTOR, u32s_bytes(&self.gd)));
            if let (Some(r), Some(at)) = (&self.rgd, self.rgd_at) {
                rest.push((at * SECTOR, u32s_bytes(r)));
            }
        }
        self.dirty.clear();
        self.gd_dirty = false;
        (tables, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries set through the cache come back, new tables land where `alloc` says, and
    /// the writes list tables before directories, both copies.
    #[test]
    fn set_get_and_crash_safe_write_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(64 * 512).unwrap();
        // Directory of 2 entries at sector 1, redundant copy at sector 2.
        let mut t = GrainTables::load(&f, &p, 1, Some(2), 2, 8).unwrap();
        let mut next = 10u32;
        let mut alloc = || {
            next += 1;
            Ok(next - 1)
        };
        assert_eq!(t.get(&f, 9).unwrap(), 0);
        t.set(&f, 9, 77, &mut alloc).unwrap();
        assert_eq!(t.get(&f, 9).unwrap(), 77);
        assert!(t.is_dirty());
        let (tables, rest) = t.take_writes();
        assert_eq!(
            tables.iter().map(|w| w.0).collect::<Vec<_>>(),
            vec![10 * 512]
        );
        // The redundant table after the primary, then both directories.
        assert_eq!(
            rest.iter().map(|w| w.0).collect::<Vec<_>>(),
            vec![11 * 512, 512, 1024]
        );
        assert_eq!(&rest[1].1[4..8], &10u32.to_le_bytes());
        assert_eq!(&rest[2].1[4..8], &11u32.to_le_bytes());
        assert!(!t.is_dirty());
    }
}
