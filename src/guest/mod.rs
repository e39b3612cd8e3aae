//! Guest-aware shrink: which grains of a disk every file system in it calls free.
//!
//! `scan` reads the partition table (`table`) and, in each partition of a kind that
//! may hold one, the file system's own allocation map (`ext`, `fat`, `ntfs`), through
//! the disk it is given (a chain's merged view, never a layer alone). What comes out
//! is a [`FreeMap`]: the grains of which every byte is free in a recognised file
//! system. [`GuestView`] lays it over the disk: those grains map as unallocated and
//! read as zeros, so every output, pipe, manifest and measurement made from the view
//! leaves them out, and nothing else changes.
//!
//! What is trusted, and what is not: a grain is left out only when a parser proved it
//! free. Everything a parser did not prove free is copied: the first MiB, the table
//! sectors, gaps between partitions, partitions of other types, space past a file
//! system's end, file-system metadata, and the whole partition when anything in it is
//! unexpected (a journal to replay, a dirty or hibernated volume, an unknown feature,
//! a field out of range, copies of a map that disagree). The parsers read only
//! metadata: superblocks, descriptors, bitmaps, FATs, `$Bitmap`.

mod ext;
mod fat;
mod ntfs;
mod table;

use std::ops::Range;

use crate::disk::{Alloc, Run, VirtualDisk};
use crate::error::{Error, Result};

/// The granularity of what is left out: one grain of the sparse formats (64 KiB).
pub(crate) const GRAIN: u64 = 64 << 10;

/// The disk's first MiB is always copied.
const KEEP_HEAD: u64 = 1 << 20;

/// The DDB key an output made from a guest-aware view carries.
pub(crate) const DDB_KEY: &str = "ddb.vmdkit.guestAware";

/// What a guest-aware scan found in one partition (or the whole disk, when it has no
/// partition table).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct GuestPartition {
    /// Partition number (MBR: 1-4 primary, 5 and up logical; GPT: entry index + 1),
    /// or none for a file system on the whole disk.
    pub number: Option<u32>,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The table's type for it (`0x83`, a GPT type GUID, `whole disk`).
    pub partition_type: String,
    /// The file system recognised in it, if any.
    pub file_system: Option<String>,
    /// Why the partition was copied whole, when it was.
    pub copied_whole: Option<String>,
    /// Bytes left out (whole free grains).
    pub left_out: u64,
}

/// What a guest-aware scan found on a disk.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct GuestReport {
    /// `gpt`, `mbr` or `none`.
    pub table: String,
    /// Why the whole disk was copied, when the table itself was not trusted.
    pub note: Option<String>,
    /// The partitions, in disk order.
    pub partitions: Vec<GuestPartition>,
    /// Bytes left out in all.
    pub left_out: u64,
}

/// Grains free in the guest: sorted, disjoint, grain-aligned byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FreeMap {
    ranges: Vec<Range<u64>>,
}

impl FreeMap {
    /// From grain-aligned ranges in any order (overlaps merged).
    pub(crate) fn from_ranges(mut ranges: Vec<Range<u64>>) -> FreeMap {
        ranges.retain(|r| r.start < r.end);
        ranges.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            debug_assert!(r.start % GRAIN == 0 && r.end % GRAIN == 0);
            match out.last_mut() {
                Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
                _ => out.push(r),
            }
        }
        FreeMap { ranges: out }
    }

    /// Bytes left out.
    pub(crate) fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The free ranges meeting `range`, clipped to it.
    pub(crate) fn within(&self, range: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges[first..]
            .iter()
            .take_while(move |r| r.start < range.end)
            .map(move |r| r.start.max(range.start)..r.end.min(range.end))
    }

    /// Zero the free bytes of `buf`, which holds the disk's bytes from `offset`.
    pub(crate) fn zero_in(&self, buf: &mut [u8], offset: u64) {
        for r in self.within(offset..offset + buf.len() as u64) {
            buf[(r.start - offset) as usize..(r.end - offset) as usize].fill(0);
        }
    }

    /// Which grains of the `block`-byte block at `start` are free, as a bit mask (bit i
    /// = grain i of the block). `block / GRAIN` must be at most 64.
    pub(crate) fn mask(&self, start: u64, block: u64) -> u64 {
        let mut m = 0u64;
        for r in self.within(start..start + block) {
            for g in (r.start - start) / GRAIN..(r.end - start).div_ceil(GRAIN) {
                m |= 1 << g;
            }
        }
        m
    }

    /// From per-block masks (see [`FreeMap::mask`]).
    pub(crate) fn from_masks(masks: impl Iterator<Item = (u64, u64)>, block: u64) -> FreeMap {
        let mut ranges = Vec::new();
        for (index, m) in masks {
            for g in 0..(block / GRAIN).min(64) {
                if m & (1 << g) != 0 {
                    let s = index * block + g * GRAIN;
                    ranges.push(s..s + GRAIN);
                }
            }
        }
        FreeMap::from_ranges(ranges)
    }
}

/// A disk with the guest's free grains unallocated and reading as zeros.
pub(crate) struct GuestView<'a> {
    inner: &'a dyn VirtualDisk,
    free: &'a FreeMap,
}

impl<'a> GuestView<'a> {
    pub(crate) fn new(inner: &'a dyn VirtualDisk, free: &'a FreeMap) -> GuestView<'a> {
        GuestView { inner, free }
    }
}

impl VirtualDisk for GuestView<'_> {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let runs = self.inner.map(range)?;
        if self.free.is_empty() {
            return Ok(runs);
        }
        let mut out = Vec::with_capacity(runs.len());
        for run in runs {
            let mut pos = run.start;
            let piece = |out: &mut Vec<Run>, a: u64, b: u64, alloc: Alloc| {
                let alloc = match alloc {
                    Alloc::Data { extent, offset } => Alloc::Data {
                        extent,
                        offset: offset + (a - run.start),
                    },
                    Alloc::Hole { extent, offset } => Alloc::Hole {
                        extent,
                        offset: offset + (a - run.start),
                    },
                    other => other,
                };
                crate::disk::push_run(
                    out,
                    Run {
                        start: a,
                        len: b - a,
                        alloc,
                        depth: run.depth,
                    },
                );
            };
            for f in self.free.within(run.start..run.end()) {
                if f.start > pos {
                    piece(&mut out, pos, f.start, run.alloc);
                }
                piece(&mut out, f.start, f.end, Alloc::Unallocated);
                pos = f.end;
            }
            if pos < run.end() {
                piece(&mut out, pos, run.end(), run.alloc);
            }
        }
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)?;
        self.free.zero_in(buf, offset);
        Ok(())
    }

    fn source_files(&self) -> Vec<std::path::PathBuf> {
        self.inner.source_files()
    }

    fn will_need(&self, range: std::ops::Range<u64>) {
        self.inner.will_need(range)
    }
}

/// Why a parser stopped: the disk could not be read (an error the command reports), or
/// the file system is not one it can prove anything about (the partition is copied
/// whole, and the reason said).
pub(crate) enum Decline {
    Io(Error),
    Whole(String),
}

impl From<Error> for Decline {
    fn from(e: Error) -> Decline {
        Decline::Io(e)
    }
}

pub(crate) type Parsed<T> = std::result::Result<T, Decline>;

/// Copy the partition whole, saying why.
pub(crate) fn whole<T>(why: impl Into<String>) -> Parsed<T> {
    Err(Decline::Whole(why.into()))
}

/// A partition (or the whole disk) as the parsers see it: reads are relative to its
/// start and may not leave it.
pub(crate) struct Volume<'a> {
    disk: &'a dyn VirtualDisk,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

impl<'a> Volume<'a> {
    pub(crate) fn new(disk: &'a dyn VirtualDisk, start: u64, len: u64) -> Volume<'a> {
        Volume { disk, start, len }
    }

    /// `len` bytes at `offset` of the volume; a read past its end declines.
    pub(crate) fn read(&self, offset: u64, len: usize) -> Parsed<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf)?;
        Ok(buf)
    }

    pub(crate) fn read_into(&self, offset: u64, buf: &mut [u8]) -> Parsed<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return whole(format!(
                    "a structure at byte {offset:#x} of the partition lies past its end"
                ))
            }
        }
        self.disk.read_at(buf, self.start + offset)?;
        Ok(())
    }
}

/// Collects a file system's free byte ranges (relative to its volume, in increasing
/// order, adjacent ones joined) and keeps only the whole disk grains inside them, so
/// memory follows the free grains' runs, not the file system's blocks.
pub(crate) struct FreeRuns {
    base: u64,
    pending: Option<Range<u64>>,
    out: Vec<Range<u64>>,
}

impl FreeRuns {
    pub(crate) fn new(base: u64) -> FreeRuns {
        FreeRuns {
            base,
            pending: None,
            out: Vec::new(),
        }
    }

    /// `[start, end)` of the volume is free. Calls come in increasing order.
    pub(crate) fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        match &mut self.pending {
            Some(p) if p.end == start => p.end = end,
            _ => {
                self.flush();
                self.pending = Some(start..end);
            }
        }
    }

    fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            let (a, b) = (self.base + p.start, self.base + p.end);
            let (a, b) = (a.div_ceil(GRAIN) * GRAIN, b / GRAIN * GRAIN);
            if a < b {
                match self.out.last_mut() {
                    Some(l) if l.end == a => l.end = b,
                    _ => self.out.push(a..b),
                }
            }
        }
    }

    pub(crate) fn finish(mut self) -> Vec<Range<u64>> {
        self.flush();
        self.out
    }
}

/// What a file-system parser proved: its name and its free grains.
pub(crate) struct Found {
    pub(crate) fs: String,
    pub(crate) free: Vec<Range<u64>>,
}

/// Scan `disk` (a chain's merged view): its free grains and what was found.
pub(crate) fn scan(disk: &dyn VirtualDisk) -> Result<(FreeMap, GuestReport)> {
    let t = table::read(disk)?;
    let mut report = GuestReport {
        table: t.kind.to_string(),
        note: t.note,
        ..Default::default()
    };
    let mut all = Vec::new();
    for p in t.parts {
        let mut gp = GuestPartition {
            number: p.number,
            start: p.start,
            length: p.len,
            partition_type: p.type_name,
            ..Default::default()
        };
        if !p.probe {
            gp.copied_whole =
                Some("not a partition type that holds a file system vmdkit reads".into());
        } else {
            let vol = Volume::new(disk, p.start, p.len);
            match probe(&vol) {
                Ok(found) => {
                    // Never past the partition, whatever a parser says, and never in
                    // the disk's first MiB (tables, boot code, boot loaders).
                    let (lo, hi) = (p.start.max(KEEP_HEAD), p.start.saturating_add(p.len));
                    let free: Vec<Range<u64>> = found
                        .free
                        .into_iter()
                        .map(|r| {
                            r.start.max(lo).div_ceil(GRAIN) * GRAIN..r.end.min(hi) / GRAIN * GRAIN
                        })
                        .filter(|r| r.start < r.end)
                        .collect();
                    gp.file_system = Some(found.fs);
                    gp.left_out = free.iter().map(|r| r.end - r.start).sum();
                    all.extend(free);
                }
                Err(Decline::Io(e)) => return Err(e),
                Err(Decline::Whole(why)) => {
                    let (fs, why) = match why.split_once(": ") {
                        Some((fs, why)) if KNOWN.contains(&fs) => {
                            (Some(fs.to_string()), why.to_string())
                        }
                        _ => (None, why),
                    };
                    gp.file_system = fs;
                    gp.copied_whole = Some(why);
                }
            }
        }
        report.partitions.push(gp);
    }
    let free = FreeMap::from_ranges(all);
    report.left_out = free.bytes();
    Ok((free, report))
}

/// File-system names a declining parser puts before its reason (`"ext4: ..."`).
const KNOWN: &[&str] = &[
    "ext2", "ext3", "ext4", "FAT", "FAT12", "FAT16", "FAT32", "NTFS",
];

/// Which file system `vol` holds, and its free grains; declines when none is known.
pub(crate) fn probe(vol: &Volume) -> Parsed<Found> {
    // A partition reformatted from one file system to another may keep the old one's
    // signature where the new one does not write: with both an ext superblock and a
    // FAT or NTFS boot sector, which is live cannot be told, and the wrong one's maps
    // would call the other's data free.
    // The first 2 KiB (boot sector, ext superblock) are read once, for every reader.
    let head = vol.read(0, vol.len.min(2048) as usize)?;
    if head.len() < 512 {
        return whole("no file system vmdkit reads (ext2/3/4, FAT, NTFS) found");
    }
    if head.len() == 2048
        && le16(&head, 1024 + 56) == 0xEF53
        && table::boot_sector_of_a_volume(&head)
    {
        return whole("both an ext superblock and a FAT or NTFS boot sector are present");
    }
    if let Some(found) = ext::probe(vol, &head)? {
        return Ok(found);
    }
    if let Some(found) = ntfs::probe(vol, &head)? {
        return Ok(found);
    }
    if let Some(found) = fat::probe(vol, &head)? {
        return Ok(found);
    }
    whole("no file system vmdkit reads (ext2/3/4, FAT, NTFS) found")
}

/// Little-endian fields of a byte slice (callers check lengths first).
pub(crate) fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

pub(crate) fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_runs_keep_only_whole_grains_and_join_pieces() {
        // A volume starting at sector 63 (old MBR alignment): blocks never line up with
        // grains, so only grains wholly inside a joined free run are left out.
        let base = 63 * 512;
        let mut f = FreeRuns::new(base);
        f.push(0, 4096);
        f.push(4096, 200 << 10); // joins the first
        f.push(300 << 10, 301 << 10); // too small for a grain
        let got = f.finish();
        let (a, b) = (
            base.div_ceil(GRAIN) * GRAIN,
            (base + (200 << 10)) / GRAIN * GRAIN,
        );
        assert_eq!(got, vec![a..b]);
        assert!(a >= base && b <= base + (200 << 10));
    }

    /// A disk whose runs alternate data, zeros and unallocated every `step` bytes, and
    /// whose byte at `i` is `i % 251 + 1` where data is.
    struct Striped {
        cap: u64,
        step: u64,
    }

    impl Striped {
        fn alloc_at(&self, pos: u64) -> Alloc {
            match (pos / self.step) % 3 {
                0 => Alloc::Data {
                    extent: 0,
                    offset: pos,
                },
                1 => Alloc::Zero,
                _ => Alloc::Unallocated,
            }
        }
    }

    impl VirtualDisk for Striped {
        fn capacity(&self) -> u64 {
            self.cap
        }
        fn granularity(&self) -> u64 {
            512
        }
        fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
            let mut out = Vec::new();
            let mut p = range.start;
            while p < range.end.min(self.cap) {
                let e = ((p / self.step + 1) * self.step)
                    .min(range.end)
                    .min(self.cap);
                crate::disk::push_run(
                    &mut out,
                    Run {
                        start: p,
                        len: e - p,
                        alloc: self.alloc_at(p),
                        depth: 0,
                    },
                );
                p = e;
            }
            Ok(out)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let pos = offset + i as u64;
                *b = match self.alloc_at(pos) {
                    Alloc::Data { .. } => (pos % 251 + 1) as u8,
                    _ => 0,
                };
            }
            Ok(())
        }
    }

    proptest::proptest! {
        /// The view against a model: every byte maps as the disk does except in free
        /// grains, which map unallocated and read as zeros; runs cover the asked range
        /// in order; data offsets follow their bytes.
        #[test]
        fn the_view_leaves_out_exactly_the_free_grains(
            grains in proptest::collection::vec(0u64..64, 0..12),
            step in 1u64..40,
            start in 0u64..(64 * GRAIN),
            len in 1u64..(16 * GRAIN),
        ) {
            let disk = Striped { cap: 64 * GRAIN, step: step * 4096 };
            let free = FreeMap::from_ranges(grains.iter().map(|g| g * GRAIN..(g + 1) * GRAIN).collect());
            let view = GuestView::new(&disk, &free);
            let end = (start + len).min(disk.cap);
            let is_free = |p: u64| grains.contains(&(p / GRAIN));
            let runs = view.map(start..end).unwrap();
            let mut pos = start;
            for r in &runs {
                proptest::prop_assert_eq!(r.start, pos);
                for p in (r.start..r.end()).step_by(512) {
                    let want = if is_free(p) { Alloc::Unallocated } else { disk.alloc_at(p) };
                    let got = match r.alloc {
                        Alloc::Data { extent, offset } => Alloc::Data { extent, offset: offset + (p - r.start) },
                        a => a,
                    };
                    proptest::prop_assert_eq!(got, want, "at {}", p);
                }
                pos = r.end();
            }
            proptest::prop_assert_eq!(pos, end.max(start));
            let mut buf = vec![0xAAu8; (end - start) as usize];
            view.read_at(&mut buf, start).unwrap();
            for (i, &b) in buf.iter().enumerate() {
                let p = start + i as u64;
                let want = if is_free(p) { 0 } else {
                    match disk.alloc_at(p) { Alloc::Data { .. } => (p % 251 + 1) as u8, _ => 0 }
                };
                proptest::prop_assert_eq!(b, want, "byte {}", p);
            }
        }
    }

    #[test]
    fn masks_round_trip() {
        let m = FreeMap::from_ranges(vec![GRAIN..3 * GRAIN, (1 << 20) + 15 * GRAIN..(2 << 20)]);
        assert_eq!(m.mask(0, 1 << 20), 0b110);
        assert_eq!(m.mask(1 << 20, 1 << 20), 1 << 15);
        let back = FreeMap::from_masks([(0, 0b110), (1, 1 << 15)].into_iter(), 1 << 20);
        assert_eq!(back, m);
        let mut buf = vec![1u8; 4 * GRAIN as usize];
        m.zero_in(&mut buf, 0);
        assert!(buf[..GRAIN as usize].iter().all(|&b| b == 1));
        assert!(buf[GRAIN as usize..3 * GRAIN as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(buf[3 * GRAIN as usize..].iter().all(|&b| b == 1));
    }
}
