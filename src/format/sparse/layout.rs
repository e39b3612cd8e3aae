//! Where vmdkit (and qemu, and VMware's hosted products) put things in a hosted sparse
//! file it writes, and the grain-table entries of one being written.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;

/// Sectors per extent of the split formats, as VMware writes them (2047 MiB).
pub const SPLIT_SECTORS: u64 = 4_192_256;
use crate::error::{Error, Result};

/// Layout of a hosted sparse extent as vmdkit (and qemu, and VMware's hosted products)
/// write it: header, optional embedded descriptor, redundant GD + GTs, GD + GTs, padding
/// to a grain boundary (`overHead`), then grains packed in ascending LBA order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseLayout {
    /// Capacity in sectors.
    pub capacity_sectors: u64,
    /// Grain size in sectors.
    pub grain: u64,
    /// Entries per grain table.
    pub gtes: u64,
    /// Grains (the last may be partial).
    pub num_grains: u64,
    /// Grain tables.
    pub num_gts: u64,
    /// Sectors of one grain directory.
    pub gd_sectors: u64,
    /// Sector of the embedded descriptor (0 = none).
    pub desc_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub desc_sectors: u64,
    /// Sector of the redundant grain directory.
    pub rgd: u64,
    /// Sector of the grain directory.
    pub gd: u64,
    /// First grain sector.
    pub over_head: u64,
}

impl SparseLayout {
    /// Lay out an extent of `capacity` sectors with `desc_sectors` of embedded descriptor
    /// (0 for split extents, which carry none).
    pub fn new(capacity: u64, desc_sectors: u64) -> SparseLayout {
        let grain = 128;
        let gtes = 512;
        let num_grains = capacity.div_ceil(grain);
        let num_gts = num_grains.div_ceil(gtes);
        let gd_sectors = (num_gts * 4).div_ceil(SECTOR);
        let desc_offset = if desc_sectors > 0 { 1 } else { 0 };
        let rgd = 1 + desc_sectors;
        let gd = rgd + gd_sectors + 4 * num_gts;
        let end = gd + gd_sectors + 4 * num_gts;
        SparseLayout {
            capacity_sectors: capacity,
            grain,
            gtes,
            num_grains,
            num_gts,
            gd_sectors,
            desc_offset,
            desc_sectors,
            rgd,
            gd,
            over_head: end.div_ceil(grain) * grain,
        }
    }

    /// The header for this layout.
    pub fn header(&self) -> SparseHeader {
        let mut h = SparseHeader::new(self.capacity_sectors, self.grain);
        h.descriptor_offset = self.desc_offset;
        h.descriptor_size = self.desc_sectors;
        h.num_gtes_per_gt = self.gtes as u32;
        h.rgd_offset = self.rgd;
        h.gd_offset = self.gd;
        h.over_head = self.over_head;
        h
    }

    /// Sector of the k-th allocated grain.
    pub fn grain_sector(&self, k: u64) -> u64 {
        self.over_head + k * self.grain
    }

    /// Total file size when `allocated` grains are stored.
    pub fn file_bytes(&self, allocated: u64) -> u64 {
        self.grain_sector(allocated) * SECTOR
    }

    /// Sector of the first table of the redundant (`redundant`) or primary copy.
    fn tables_at(&self, redundant: bool) -> u64 {
        (if redundant { self.rgd } else { self.gd }) + self.gd_sectors
    }

    /// The writes that put table `i` (both copies) in place: (byte offset, bytes).
    pub fn table_writes(&self, i: u64, t: &[u32]) -> [(u64, Vec<u8>); 2] {
        let mut b = vec![0u8; t.len() * 4];
        LE::write_u32_into(t, &mut b);
        [
            ((self.tables_at(true) + 4 * i) * SECTOR, b.clone()),
            ((self.tables_at(false) + 4 * i) * SECTOR, b),
        ]
    }

    /// The metadata of sectors `[0, overHead)`, handed to `put` as writes (byte offset,
    /// bytes) in ascending order: header, descriptor, both directories (in pieces of at
    /// most 1 MiB) and the tables `entries` holds. Everything else reads as zeros: holes
    /// in a file, zeros in a stream, so a 16 TiB disk's empty tables cost neither memory
    /// nor disk.
    pub fn for_each_metadata_write(
        &self,
        entries: &GrainEntries,
        descriptor: Option<&[u8]>,
        mut put: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        put(0, &self.header().to_bytes())?;
        if let Some(d) = descriptor {
            let n = d.len().min((self.desc_sectors * SECTOR) as usize);
            put(self.desc_offset * SECTOR, &d[..n])?;
        }
        const CHUNK: u64 = 1 << 18; // entries per directory piece
        for redundant in [true, false] {
            let dir = if redundant { self.rgd } else { self.gd };
            let tables = self.tables_at(redundant);
            let mut i = 0;
            while i < self.num_gts {
                let n = (self.num_gts - i).min(CHUNK);
                let gd: Vec<u32> = (i..i + n).map(|j| (tables + 4 * j) as u32).collect();
                let mut b = vec![0u8; gd.len() * 4];
                LE::write_u32_into(&gd, &mut b);
                put(dir * SECTOR + 4 * i, &b)?;
                i += n;
            }
            for (i, t) in entries.tables() {
                let mut b = vec![0u8; t.len() * 4];
                LE::write_u32_into(t, &mut b);
                put((tables + 4 * i) * SECTOR, &b)?;
            }
        }
        Ok(())
    }

    #[cfg(any(test, feature = "fuzzing"))]
    /// The bytes of sectors `[0, overHead)` (small layouts and tests; writers use
    /// [`for_each_metadata_write`](Self::for_each_metadata_write)).
    pub fn metadata(&self, entries: &GrainEntries, descriptor: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![0u8; (self.over_head * SECTOR) as usize];
        let _ = self.for_each_metadata_write(entries, descriptor, |at, bytes| {
            b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            Ok(())
        });
        b
    }
}

/// Grain-table entries of an extent being written, kept only for tables that have one:
/// memory follows the data, not the capacity.
#[derive(Debug, Clone, Default)]
pub struct GrainEntries {
    per: u64,
    tables: std::collections::BTreeMap<u64, Box<[u32]>>,
}

impl GrainEntries {
    /// No entries; tables of `per` entries.
    pub fn new(per: u64) -> GrainEntries {
        GrainEntries {
            per,
            tables: Default::default(),
        }
    }

    /// Set grain `g`'s entry.
    pub fn set(&mut self, g: u64, v: u32) {
        let per = self.per;
        let t = self
            .tables
            .entry(g / per)
            .or_insert_with(|| vec![0; per as usize].into_boxed_slice());
        t[(g % per) as usize] = v;
    }

    /// Tables holding entries, by index.
    pub fn tables(&self) -> impl Iterator<Item = (u64, &[u32])> {
        self.tables.iter().map(|(i, t)| (*i, &t[..]))
    }

    /// Remove and return the tables with index below `i` (complete once the writer is
    /// past them).
    pub fn take_before(&mut self, i: u64) -> Vec<(u64, Box<[u32]>)> {
        let rest = self.tables.split_off(&i);
        std::mem::replace(&mut self.tables, rest)
            .into_iter()
            .collect()
    }
}

/// Sector number `s` as a 32-bit grain-table entry, or an error saying to split the disk.
pub fn sector_entry(path: &std::path::Path, s: u64) -> Result<u32> {
    u32::try_from(s).map_err(|_| {
        Error::unsupported(
            path,
            "a monolithic sparse file cannot hold grains past 2 TiB of file (32-bit sector \
             numbers in its tables); export to twoGbMaxExtentSparse (split) instead",
        )
    })
}
