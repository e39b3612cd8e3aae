//! COWD sparse extents (formats.md §6): ESX 2 `.REDO` logs, ESX 3-6 `-delta.vmdk`
//! snapshot files (createType vmfsSparse) and legacy COWD base disks.
//!
//! ```text
//! off    size  field                     off    size  field
//! 0x000   4    magic "COWD"              0x020  1024  child: parentFileName (NUL-term.)
//! 0x004   4    version 1                 0x020   12   root: cylinders, heads, sectors
//! 0x008   4    flags (3 in VMware files) 0x420   4    parentGeneration
//! 0x00C   4    numSectors (capacity)     0x424   4    generation
//! 0x010   4    grainSize (sectors)       0x428   60   name
//! 0x014   4    gdOffset (sector)         0x464  512   description
//! 0x018   4    numGDEntries              0x664   4    savedGeneration
//! 0x01C   4    freeSector                0x670   4    uncleanShutdown
//! ```
//! Grain tables have a fixed 4096 entries (16 KiB); a GTE is the sector of the grain, 0 =
//! not in this layer. There is no zeroed-grain value.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::disk::{Alloc, Run};
use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::io::Source;

/// `COWD` as a little-endian u32.
pub const COWD_MAGIC: u32 = 0x4457_4f43;
/// Entries per COWD grain table (fixed by the format).
pub const COWD_GTES: u64 = 4096;
/// Header size in bytes.
pub const COWD_HEADER_BYTES: usize = 2048;
/// Largest COWD grain we accept (sectors).
pub const MAX_COWD_GRAIN: u32 = 0x20_0000;

/// The COWD header in native integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowdHeader {
    /// Version (1).
    pub version: u32,
    /// Flags (VMware writes 3).
    pub flags: u32,
    /// Capacity in sectors.
    pub num_sectors: u32,
    /// Sectors per grain.
    pub grain_size: u32,
    /// Sector of the grain directory.
    pub gd_offset: u32,
    /// Directory entries.
    pub num_gd_entries: u32,
    /// Allocation cursor (a hint).
    pub free_sector: u32,
    /// Parent file name (children; empty in ESX 3+ deltas).
    pub parent_file_name: String,
    /// Root variant: cylinders/heads/sectors (all zero for children).
    pub geometry: (u32, u32, u32),
    /// parentGeneration.
    pub parent_generation: u32,
    /// generation.
    pub generation: u32,
    /// Unclean-shutdown flag.
    pub unclean_shutdown: bool,
}

/// Directory entries needed to cover `num_sectors` with grains of `grain_size` sectors
/// (4096 grains per table).
pub fn entries_for(num_sectors: u32, grain_size: u32) -> u64 {
    u64::from(num_sectors).div_ceil(COWD_GTES * u64::from(grain_size.max(1)))
}

/// Directory entries the header's capacity uses.
pub fn directory_entries(h: &CowdHeader) -> u64 {
    entries_for(h.num_sectors, h.grain_size)
}

impl CowdHeader {
    /// A header for a new child of `num_sectors` with grain `grain_size`.
    pub fn new_child(num_sectors: u32, grain_size: u32, parent: &str) -> CowdHeader {
        let num_gd_entries = entries_for(num_sectors, grain_size) as u32;
        let gd_sectors = (u64::from(num_gd_entries) * 4).div_ceil(SECTOR) as u32;
        CowdHeader {
            version: 1,
            flags: 3,
            num_sectors,
            grain_size,
            gd_offset: 4,
            num_gd_entries,
            free_sector: 4 + gd_sectors,
            parent_file_name: parent.to_string(),
            geometry: (0, 0, 0),
            parent_generation: 0,
            generation: 0,
            unclean_shutdown: false,
        }
    }

    /// Decode the 2048-byte header (magic checked).
    pub fn parse(b: &[u8]) -> Option<CowdHeader> {
        if b.len() < COWD_HEADER_BYTES || LE::read_u32(&b[0..4]) != COWD_MAGIC {
            return None;
        }
        let name_area = &b[0x20..0x420];
        let end = name_area
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_area.len());
        let name = &name_area[..end];
        // A root header keeps binary geometry here; only printable text is a name.
        let printable =
            !name.is_empty() && name.iter().all(|&c| (0x20..0x7f).contains(&c) || c >= 0x80);
        Some(CowdHeader {
            version: LE::read_u32(&b[4..8]),
            flags: LE::read_u32(&b[8..12]),
            num_sectors: LE::read_u32(&b[12..16]),
            grain_size: LE::read_u32(&b[16..20]),
            gd_offset: LE::read_u32(&b[20..24]),
            num_gd_entries: LE::read_u32(&b[24..28]),
            free_sector: LE::read_u32(&b[28..32]),
            parent_file_name: if printable {
                String::from_utf8_lossy(name).into_owned()
            } else {
                String::new()
            },
            geometry: if printable {
                (0, 0, 0)
            } else {
                (
                    LE::read_u32(&b[32..36]),
                    LE::read_u32(&b[36..40]),
                    LE::read_u32(&b[40..44]),
                )
            },
            parent_generation: LE::read_u32(&b[0x420..0x424]),
            generation: LE::read_u32(&b[0x424..0x428]),
            unclean_shutdown: LE::read_u32(&b[0x670..0x674]) != 0,
        })
    }

    /// Encode to 2048 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; COWD_HEADER_BYTES];
        LE::write_u32(&mut b[0..4], COWD_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u32(&mut b[12..16], self.num_sectors);
        LE::write_u32(&mut b[16..20], self.grain_size);
        LE::write_u32(&mut b[20..24], self.gd_offset);
        LE::write_u32(&mut b[24..28], self.num_gd_entries);
        LE::write_u32(&mut b[28..32], self.free_sector);
        if !self.parent_file_name.is_empty() {
            let n = self.parent_file_name.len().min(1023);
            b[0x20..0x20 + n].copy_from_slice(&self.parent_file_name.as_bytes()[..n]);
        } else {
            LE::write_u32(&mut b[32..36], self.geometry.0);
            LE::write_u32(&mut b[36..40], self.geometry.1);
            LE::write_u32(&mut b[40..44], self.geometry.2);
        }
        LE::write_u32(&mut b[0x420..0x424], self.parent_generation);
        LE::write_u32(&mut b[0x424..0x428], self.generation);
        LE::write_u32(&mut b[0x670..0x674], self.unclean_shutdown as u32);
        b
    }
}

/// A COWD extent opened for reading.
pub struct CowdExtent {
    src: Source,
    header: CowdHeader,
    gd: Vec<u32>,
    gts: super::TableCache<u32>,
    grain_bytes: u64,
    len: u64,
}

impl std::fmt::Debug for CowdExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowdExtent")
            .field("src", &self.src)
            .field("header", &self.header)
            .finish()
    }
}

/// Read and check a COWD header.
pub fn read_header(src: &Source) -> Result<CowdHeader> {
    let path = src.path();
    let mut b = vec![0u8; COWD_HEADER_BYTES];
    src.read_exact_at(&mut b, 0)?;
    let h = CowdHeader::parse(&b)
        .ok_or_else(|| Error::corrupt(path, 0, "bad magic: not a COWD extent"))?;
    if h.version != 1 {
        return Err(Error::unsupported(
            path,
            format!("COWD version {} (only 1 exists)", h.version),
        ));
    }
    if h.num_sectors == 0 {
        return Err(Error::corrupt(path, 12, "capacity is 0 sectors"));
    }
    if h.grain_size == 0 || h.grain_size > MAX_COWD_GRAIN {
        return Err(Error::corrupt(
            path,
            16,
            format!(
                "grain size {} sectors is outside 1..={MAX_COWD_GRAIN}",
                h.grain_size
            ),
        ));
    }
    let need = directory_entries(&h);
    if u64::from(h.num_gd_entries) < need {
        return Err(Error::corrupt(
            path,
            24,
            format!(
                "{} grain directory entries cannot cover {} sectors (need {need})",
                h.num_gd_entries, h.num_sectors
            ),
        ));
    }
    Ok(h)
}

impl CowdExtent {
    /// Open and check the directory.
    pub fn open(src: Source) -> Result<CowdExtent> {
        let header = read_header(&src)?;
        let path = src.path().to_path_buf();
        // Only the entries that cover the capacity are used.
        let n = directory_entries(&header);
        let gd_start = u64::from(header.gd_offset) * SECTOR;
        if gd_start + n * 4 > src.len() || header.gd_offset < 4 {
            return Err(Error::corrupt(
                &path,
                20,
                format!(
                    "grain directory ({n} entries at sector {}) does not fit in the {}-byte file",
                    header.gd_offset,
                    src.len()
                ),
            ));
        }
        let mut raw = vec![0u8; (n * 4) as usize];
        src.read_exact_at(&mut raw, gd_start)?;
        let mut gd = vec![0u32; n as usize];
        LE::read_u32_into(&raw, &mut gd);
        for (i, &e) in gd.iter().enumerate() {
            if e != 0 && u64::from(e) * SECTOR + COWD_GTES * 4 > src.len() {
                return Err(Error::corrupt(
                    &path,
                    gd_start + 4 * i as u64,
                    format!(
                        "grain table {i} at sector {e} lies past the end of the {}-byte file",
                        src.len()
                    ),
                ));
            }
        }
        Ok(CowdExtent {
            grain_bytes: u64::from(header.grain_size) * SECTOR,
            len: u64::from(header.num_sectors) * SECTOR,
            gts: super::TableCache::new(n as usize, COWD_GTES as usize),
            src,
            header,
            gd,
        })
    }

    /// The header.
    pub fn header(&self) -> &CowdHeader {
        &self.header
    }
    /// The source.
    pub fn source(&self) -> &Source {
        &self.src
    }
    /// Virtual length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }

    /// Grain table `i`.
    pub fn gt(&self, i: usize) -> Result<std::sync::Arc<[u32]>> {
        super::cached_table(&self.gts, i, &self.src, self.gd[i], COWD_GTES as usize)
    }

    /// Allocation runs of the extent-relative range `rel`, placed at `base + rel`.
    pub fn map(
        &self,
        index: usize,
        rel: std::ops::Range<u64>,
        base: u64,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        super::map_grains(
            index,
            self.len,
            self.grain_bytes,
            COWD_GTES,
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
                let gte = t[(g % COWD_GTES) as usize];
                if gte == 0 {
                    return Ok(Alloc::Unallocated);
                }
                let gstart = g * self.grain_bytes;
                let off = u64::from(gte) * SECTOR;
                let valid = (self.len - gstart).min(self.grain_bytes);
                if off + valid > self.src.len() {
                    return Err(Error::corrupt(
                        self.src.path(),
                        u64::from(self.gd[gdi]) * SECTOR + 4 * (g % COWD_GTES),
                        format!(
                            "grain {g} at sector {gte} lies past the end of the {}-byte file",
                            self.src.len()
                        ),
                    ));
                }
                Ok(Alloc::Data {
                    extent: index,
                    offset: off,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut h = CowdHeader::new_child(409_600, 1, "base.vmdk");
        h.free_sector = 1234;
        h.generation = 7;
        h.unclean_shutdown = true;
        let b = h.to_bytes();
        assert_eq!(b.len(), COWD_HEADER_BYTES);
        assert_eq!(&b[0..4], b"COWD");
        let back = CowdHeader::parse(&b).expect("parses");
        assert_eq!(back, h);
        assert_eq!(directory_entries(&back), 100);
        assert_eq!(back.to_bytes(), b);
    }
}
