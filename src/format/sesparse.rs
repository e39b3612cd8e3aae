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

/// The fields of the constant header we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeSparseHeader {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Volatile header sector.
    pub volatile_offset: u64,
    /// Grain directory sector.
    pub gd_offset: u64,
    /// Grain directory size in sectors.
    pub gd_size: u64,
    /// Grain tables area sector.
    pub gt_offset: u64,
    /// Grain tables area size in sectors.
    pub gt_size: u64,
    /// Grains area sector.
    pub grains_offset: u64,
    /// Grains area size in sectors.
    pub grains_size: u64,
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
        let f = |o: usize| LE::read_u64(&b[o..o + 8]);
        if f(0) != SESPARSE_MAGIC {
            return Err(Error::corrupt(
                &path,
                0,
                "bad magic: not an SESparse extent",
            ));
        }
        if f(8) != SESPARSE_VERSION {
            return Err(Error::unsupported(
                &path,
                format!("SESparse version {:#x}", f(8)),
            ));
        }
        if f(24) != GRAIN_SECTORS {
            return Err(Error::unsupported(
                &path,
                format!("SESparse grain size {} sectors (only 8 exists)", f(24)),
            ));
        }
        if f(32) != GT_SECTORS {
            return Err(Error::unsupported(
                &path,
                format!(
                    "SESparse grain table size {} sectors (only 64 exists)",
                    f(32)
                ),
            ));
        }
        if f(40) != 0 {
            return Err(Error::unsupported(
                &path,
                format!("SESparse flags {:#x}", f(40)),
            ));
        }
        let h = SeSparseHeader {
            capacity: f(16),
            volatile_offset: f(80),
            gd_offset: f(128),
            gd_size: f(136),
            gt_offset: f(144),
            gt_size: f(152),
            grains_offset: f(192),
            grains_size: f(200),
        };
        let len = h
            .capacity
            .checked_mul(SECTOR)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                Error::corrupt(
                    &path,
                    16,
                    format!("capacity {} sectors is 0 or overflows", h.capacity),
                )
            })?;
        let mut v = [0u8; 512];
        let vat = h
            .volatile_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt(&path, 80, "volatile header offset overflows"))?;
        src.read_exact_at(&mut v, vat)?;
        if LE::read_u64(&v[0..8]) != SESPARSE_VOLATILE_MAGIC {
            return Err(Error::corrupt(&path, vat, "bad volatile header magic"));
        }
        if LE::read_u64(&v[24..32]) != 0 {
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
    /// Whether empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The source.
    pub fn source(&self) -> &Source {
        &self.src
    }
    /// The header fields.
    pub fn header(&self) -> &SeSparseHeader {
        &self.header
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
