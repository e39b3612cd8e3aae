//! SESparse deltas (formats.md §7), read-only: ESXi 6.5+ / VMFS6 snapshots.
//!
//! Constant header at sector 0 (all u64, offsets and sizes in sectors), volatile header,
//! a grain directory of u64 entries (0, or `0x10000000 << 32 | GT index`) and grain tables
//! of 4096 u64 entries whose top nibble says: 0 unallocated, 1 unmapped (zeros), 2 zero,
//! 3 allocated (grain index scrambled across the low bits, §7.3).

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::disk::{Alloc, Run};
use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::io::Source;

/// Constant-header magic.
pub const SESPARSE_MAGIC: u64 = 0x0000_0000_cafe_babe;
/// Volatile-header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0x0000_0000_cafe_cafe;
/// The only version we (and qemu) read.
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
const GRAIN_SECTORS: u64 = 8;
const GT_SECTORS: u64 = 64;
const GTES: u64 = 4096;
/// Most directory entries (qemu's cap: 32 Mi).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;

/// The constant header at sector 0: 26 little-endian u64 fields, then padding to 512
/// bytes. Offsets and sizes are in sectors.
///
/// ```text
/// off   field                    off   field
/// 0x00  magic 0xcafebabe         0x68  journalHeaderSize
/// 0x08  version 0x200000001      0x70  journalOffset
/// 0x10  capacity                 0x78  journalSize
/// 0x18  grainSize (8)            0x80  grainDirOffset
/// 0x20  grainTableSize (64)      0x88  grainDirSize
/// 0x28  flags (0)                0x90  grainTablesOffset
/// 0x30  reserved1..4 (4 x u64)   0x98  grainTablesSize
/// 0x50  volatileHeaderOffset     0xA0  freeBitmapOffset, 0xA8 freeBitmapSize
/// 0x58  volatileHeaderSize       0xB0  backmapOffset,    0xB8 backmapSize
/// 0x60  journalHeaderOffset      0xC0  grainsOffset,     0xC8 grainsSize
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeSparseHeader {
    /// `0xcafebabe`.
    pub magic: u64,
    /// `0x0000000200000001`.
    pub version: u64,
    /// Capacity in sectors.
    pub capacity_sectors: u64,
    /// Grain size in sectors (always 8).
    pub grain_size: u64,
    /// Grain table size in sectors (always 64).
    pub grain_table_size: u64,
    /// Flags (always 0).
    pub flags: u64,
    /// Reserved words.
    pub reserved: [u64; 4],
    /// Volatile header sector.
    pub volatile_offset: u64,
    /// Volatile header size in sectors.
    pub volatile_size: u64,
    /// Journal header sector.
    pub journal_header_offset: u64,
    /// Journal header size in sectors.
    pub journal_header_size: u64,
    /// Journal sector.
    pub journal_offset: u64,
    /// Journal size in sectors.
    pub journal_size: u64,
    /// Grain directory sector.
    pub gd_offset: u64,
    /// Grain directory size in sectors.
    pub gd_size: u64,
    /// Grain tables area sector.
    pub gt_offset: u64,
    /// Grain tables area size in sectors.
    pub gt_size: u64,
    /// Free bitmap sector.
    pub free_bitmap_offset: u64,
    /// Free bitmap size in sectors.
    pub free_bitmap_size: u64,
    /// Backmap sector.
    pub backmap_offset: u64,
    /// Backmap size in sectors.
    pub backmap_size: u64,
    /// Grains area sector.
    pub grains_offset: u64,
    /// Grains area size in sectors.
    pub grains_size: u64,
}

impl SeSparseHeader {
    /// Decode the first 512 bytes of an SESparse file (no checks).
    pub fn parse(b: &[u8; 512]) -> SeSparseHeader {
        let f = |o: usize| LE::read_u64(&b[o..o + 8]);
        SeSparseHeader {
            magic: f(0x00),
            version: f(0x08),
            capacity_sectors: f(0x10),
            grain_size: f(0x18),
            grain_table_size: f(0x20),
            flags: f(0x28),
            reserved: [f(0x30), f(0x38), f(0x40), f(0x48)],
            volatile_offset: f(0x50),
            volatile_size: f(0x58),
            journal_header_offset: f(0x60),
            journal_header_size: f(0x68),
            journal_offset: f(0x70),
            journal_size: f(0x78),
            gd_offset: f(0x80),
            gd_size: f(0x88),
            gt_offset: f(0x90),
            gt_size: f(0x98),
            free_bitmap_offset: f(0xa0),
            free_bitmap_size: f(0xa8),
            backmap_offset: f(0xb0),
            backmap_size: f(0xb8),
            grains_offset: f(0xc0),
            grains_size: f(0xc8),
        }
    }

    #[cfg(test)]
    /// Encode to 512 bytes.
    pub fn to_bytes(self) -> [u8; 512] {
        let mut b = [0u8; 512];
        let fields = [
            self.magic,
            self.version,
            self.capacity_sectors,
            self.grain_size,
            self.grain_table_size,
            self.flags,
            self.reserved[0],
            self.reserved[1],
            self.reserved[2],
            self.reserved[3],
            self.volatile_offset,
            self.volatile_size,
            self.journal_header_offset,
            self.journal_header_size,
            self.journal_offset,
            self.journal_size,
            self.gd_offset,
            self.gd_size,
            self.gt_offset,
            self.gt_size,
            self.free_bitmap_offset,
            self.free_bitmap_size,
            self.backmap_offset,
            self.backmap_size,
            self.grains_offset,
            self.grains_size,
        ];
        LE::write_u64_into(&fields, &mut b[..fields.len() * 8]);
        b
    }
}

/// The volatile header (at `volatileHeaderOffset`): magic `0xcafecafe`, then
/// freeGtNumber, nextTxnSeqNumber, replayJournal (u64 each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeSparseVolatileHeader {
    /// `0xcafecafe`.
    pub magic: u64,
    /// Next free grain table.
    pub free_gt_number: u64,
    /// Next journal transaction.
    pub next_txn_seq_number: u64,
    /// Non-zero: the journal must be replayed (the delta was not closed cleanly).
    pub replay_journal: u64,
}

impl SeSparseVolatileHeader {
    /// Decode the first 32 bytes of the volatile header sector.
    pub fn parse(b: &[u8; 512]) -> SeSparseVolatileHeader {
        let f = |o: usize| LE::read_u64(&b[o..o + 8]);
        SeSparseVolatileHeader {
            magic: f(0),
            free_gt_number: f(8),
            next_txn_seq_number: f(16),
            replay_journal: f(24),
        }
    }
}

/// An SESparse extent opened for reading.
pub struct SeSparseExtent {
    src: Source,
    header: SeSparseHeader,
    gd: Vec<u64>,
    gts: super::TableCache<u64>,
    len: u64,
}

impl std::fmt::Debug for SeSparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeSparseExtent")
            .field("src", &self.src)
            .field("header", &self.header)
            .finish()
    }
}

impl SeSparseExtent {
    /// Open and check the headers and directory.
    pub fn open(src: Source) -> Result<SeSparseExtent> {
        let path = src.path().to_path_buf();
        let mut b = [0u8; 512];
        src.read_exact_at(&mut b, 0)?;
        let h = SeSparseHeader::parse(&b);
        if h.magic != SESPARSE_MAGIC {
            return Err(Error::corrupt(
                &path,
                0,
                "bad magic: not an SESparse extent",
            ));
        }
        if h.version != SESPARSE_VERSION {
            return Err(Error::unsupported(
                &path,
                format!("SESparse version {:#x}", h.version),
            ));
        }
        if h.grain_size != GRAIN_SECTORS {
            return Err(Error::unsupported(
                &path,
                format!(
                    "SESparse grain size {} sectors (only 8 exists)",
                    h.grain_size
                ),
            ));
        }
        if h.grain_table_size != GT_SECTORS {
            return Err(Error::unsupported(
                &path,
                format!(
                    "SESparse grain table size {} sectors (only 64 exists)",
                    h.grain_table_size
                ),
            ));
        }
        if h.flags != 0 {
            return Err(Error::unsupported(
                &path,
                format!("SESparse flags {:#x}", h.flags),
            ));
        }
        let len = h
            .capacity_sectors
            .checked_mul(SECTOR)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                Error::corrupt(
                    &path,
                    16,
                    format!("capacity {} sectors is 0 or overflows", h.capacity_sectors),
                )
            })?;
        let mut v = [0u8; 512];
        let vat = h
            .volatile_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt(&path, 80, "volatile header offset overflows"))?;
        src.read_exact_at(&mut v, vat)?;
        let vh = SeSparseVolatileHeader::parse(&v);
        if vh.magic != SESPARSE_VOLATILE_MAGIC {
            return Err(Error::corrupt(&path, vat, "bad volatile header magic"));
        }
        if vh.replay_journal != 0 {
            return Err(Error::unsupported(&path, "the journal must be replayed first (replayJournal is set: the delta was not closed cleanly)"));
        }
        let needed = len.div_ceil(GRAIN_SECTORS * SECTOR * GTES);
        let entries = h.gd_size.saturating_mul(SECTOR / 8);
        if entries < needed || needed > MAX_GD_ENTRIES {
            return Err(Error::corrupt(&path, 136, format!("grain directory of {entries} entries cannot cover the capacity (need {needed})")));
        }
        let gd_at = h
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|a| a.checked_add(needed * 8).is_some_and(|e| e <= src.len()));
        let Some(gd_at) = gd_at else {
            return Err(Error::corrupt(
                &path,
                128,
                format!(
                    "grain directory at sector {} lies outside the {}-byte file",
                    h.gd_offset,
                    src.len()
                ),
            ));
        };
        let mut raw = vec![0u8; (needed * 8) as usize];
        src.read_exact_at(&mut raw, gd_at)?;
        let mut gd = vec![0u64; needed as usize];
        LE::read_u64_into(&raw, &mut gd);
        for (i, &e) in gd.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let at = gd_at + 8 * i as u64;
            if e >> 32 != 0x1000_0000 {
                return Err(Error::corrupt(
                    &path,
                    at,
                    format!("grain directory entry {i} is {e:#x}: top bits must be 0x10000000"),
                ));
            }
            let gt_sector = (e & 0xffff_ffff)
                .checked_mul(GT_SECTORS)
                .and_then(|s| s.checked_add(h.gt_offset))
                .filter(|s| {
                    s.checked_add(GT_SECTORS)
                        .and_then(|e| e.checked_mul(SECTOR))
                        .is_some_and(|e| e <= src.len())
                });
            let Some(gt_sector) = gt_sector else {
                return Err(Error::corrupt(&path, at, format!("grain table {i} (entry {e:#x}, tables at sector {}) lies past the end of the {}-byte file", h.gt_offset, src.len())));
            };
            if (gt_sector + GT_SECTORS) * SECTOR > src.len() {
                return Err(Error::corrupt(&path, at, format!("grain table {i} at sector {gt_sector} lies past the end of the {}-byte file", src.len())));
            }
        }
        Ok(SeSparseExtent {
            gts: super::TableCache::new(needed as usize, GTES as usize),
            src,
            header: h,
            gd,
            len,
        })
    }

    /// Virtual length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// The source.
    pub fn source(&self) -> &Source {
        &self.src
    }

    fn gt(&self, i: usize) -> Result<std::sync::Arc<[u64]>> {
        self.gts.get(i, || {
            let sector = self.header.gt_offset + (self.gd[i] & 0xffff_ffff) * GT_SECTORS;
            let mut raw = vec![0u8; (GTES * 8) as usize];
            self.src.read_exact_at(&mut raw, sector * SECTOR)?;
            let mut t = vec![0u64; GTES as usize];
            LE::read_u64_into(&raw, &mut t);
            Ok(t)
        })
    }

    /// Allocation runs of `rel`, placed at `base + rel`.
    pub fn map(
        &self,
        index: usize,
        rel: std::ops::Range<u64>,
        base: u64,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        let grain = GRAIN_SECTORS * SECTOR;
        super::map_grains(
            index,
            self.len,
            grain,
            GTES,
            rel,
            base,
            out,
            |gdi| {
                if self.gd[gdi] == 0 {
                    Ok(None)
                } else {
                    self.gt(gdi).map(Some)
                }
            },
            |t, g, gdi| {
                let gt_sector = self.header.gt_offset + (self.gd[gdi] & 0xffff_ffff) * GT_SECTORS;
                let gti = (g % GTES) as usize;
                let v = t[gti];
                let entry_at = gt_sector * SECTOR + 8 * gti as u64;
                Ok(match v >> 60 {
                    0 if v == 0 => Alloc::Unallocated,
                    1 | 2 => Alloc::Zero,
                    3 => {
                        let idx = ((v & 0x0fff_0000_0000_0000) >> 48)
                            | ((v & 0x0000_ffff_ffff_ffff) << 12);
                        let sector = idx
                            .checked_mul(GRAIN_SECTORS)
                            .and_then(|s| s.checked_add(self.header.grains_offset));
                        let off = sector
                            .and_then(|s| s.checked_mul(SECTOR))
                            .filter(|o| o.checked_add(grain).is_some_and(|e| e <= self.src.len()));
                        let Some(off) = off else {
                            return Err(Error::corrupt(
                                self.src.path(),
                                entry_at,
                                format!("grain {g} (entry {v:#x}) lies past the end of the {}-byte file", self.src.len()),
                            ));
                        };
                        Alloc::Data {
                            extent: index,
                            offset: off,
                        }
                    }
                    _ => {
                        return Err(Error::corrupt(
                            self.src.path(),
                            entry_at,
                            format!("grain table entry {v:#x} has an unknown type"),
                        ))
                    }
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_field_by_field() {
        let mut h = SeSparseHeader {
            magic: SESPARSE_MAGIC,
            version: SESPARSE_VERSION,
            capacity_sectors: 2048,
            grain_size: 8,
            grain_table_size: 64,
            ..Default::default()
        };
        // Every field a distinct value, so a swapped offset shows.
        let b0 = h.to_bytes();
        let mut words = [0u64; 26];
        LE::read_u64_into(&b0[..208], &mut words);
        for (i, w) in words.iter_mut().enumerate().skip(5) {
            *w = 1000 + i as u64;
        }
        let mut b = [0u8; 512];
        LE::write_u64_into(&words, &mut b[..208]);
        h = SeSparseHeader::parse(&b);
        assert_eq!(h.gd_offset, 1000 + 16);
        assert_eq!(h.volatile_offset, 1000 + 10);
        assert_eq!(h.grains_size, 1000 + 25);
        assert_eq!(h.to_bytes(), b);
    }
}
