//! Hosted sparse extents ("KDMV", formats.md §2) and random access to streamOptimized
//! files (§3): the header, the grain directory and tables, zeroed-grain entries,
//! compressed grain records, the footer of GD_AT_END streams.
//!
//! ```text
//! off  size field                 off  size field
//! 0x00  4   magic "KDMV"          0x38  8   gdOffset (GD_AT_END = all ones)
//! 0x04  4   version 1..3          0x40  8   overHead
//! 0x08  4   flags                 0x48  1   uncleanShutdown
//! 0x0C  8   capacity (sectors)    0x49  4   "\n", " ", "\r", "\n"
//! 0x14  8   grainSize (sectors)   0x4D  2   compressAlgorithm (1 = zlib)
//! 0x1C  8   descriptorOffset      0x4F 433  zero
//! 0x24  8   descriptorSize
//! 0x2C  4   numGTEsPerGT
//! 0x30  8   rgdOffset
//! ```

use std::io::Read;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::disk::{Alloc, Run};
use crate::error::{Error, Result};
use crate::io::Source;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// `KDMV` as a little-endian u32.
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
/// `gdOffset` value meaning "the grain directory is at the end; read the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Flag: newline-detector bytes are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1;
/// Flag: a redundant grain directory exists.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag: GTE 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: grains carry an LBA header and metadata is framed by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Incompatible flags we understand.
const KNOWN_INCOMPAT: u32 = FLAG_COMPRESSED | FLAG_MARKERS;
/// Largest grain (sectors) of an uncompressed extent; qemu's limit.
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain (sectors) of a compressed extent: each read inflates one whole grain.
pub const MAX_COMPRESSED_GRAIN_SECTORS: u64 = 0x8000; // 16 MiB
/// Most grain-table entries per table (qemu refuses more; VMware writes 512).
pub const MAX_GTES_PER_GT: u32 = 512;
/// Marker types (formats.md §3.2).
pub const MARKER_EOS: u32 = 0;
/// Grain-table marker.
pub const MARKER_GT: u32 = 1;
/// Grain-directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// The sparse extent header, in native integers (sector units as on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 or 3.
    pub version: u32,
    /// Flag bits.
    pub flags: u32,
    /// Sectors addressed by this extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    /// Sector of the embedded descriptor (0 = none).
    pub descriptor_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub over_head: u64,
    /// Unclean-shutdown byte.
    pub unclean_shutdown: bool,
    /// The four newline-detector bytes.
    pub newline_bytes: [u8; 4],
    /// 0 none, 1 deflate (zlib framing).
    pub compress_algorithm: u16,
}

const _: () = assert!(SECTOR == 512);

impl SparseHeader {
    /// A header with VMware's usual newline bytes and everything else from the caller.
    pub fn new(capacity: u64, grain_size: u64) -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GD,
            capacity,
            grain_size,
            descriptor_offset: 0,
            descriptor_size: 0,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: 0,
            over_head: 0,
            unclean_shutdown: false,
            newline_bytes: *b"\n \r\n",
            compress_algorithm: 0,
        }
    }

    /// Decode 512 bytes (no validation beyond the magic).
    pub fn parse(b: &[u8; 512]) -> Option<SparseHeader> {
        if LE::read_u32(&b[0..4]) != SPARSE_MAGIC {
            return None;
        }
        Some(SparseHeader {
            version: LE::read_u32(&b[4..8]),
            flags: LE::read_u32(&b[8..12]),
            capacity: LE::read_u64(&b[12..20]),
            grain_size: LE::read_u64(&b[20..28]),
            descriptor_offset: LE::read_u64(&b[28..36]),
            descriptor_size: LE::read_u64(&b[36..44]),
            num_gtes_per_gt: LE::read_u32(&b[44..48]),
            rgd_offset: LE::read_u64(&b[48..56]),
            gd_offset: LE::read_u64(&b[56..64]),
            over_head: LE::read_u64(&b[64..72]),
            unclean_shutdown: b[72] != 0,
            newline_bytes: [b[73], b[74], b[75], b[76]],
            compress_algorithm: LE::read_u16(&b[77..79]),
        })
    }

    /// Encode to 512 bytes.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u32(&mut b[0..4], SPARSE_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u64(&mut b[12..20], self.capacity);
        LE::write_u64(&mut b[20..28], self.grain_size);
        LE::write_u64(&mut b[28..36], self.descriptor_offset);
        LE::write_u64(&mut b[36..44], self.descriptor_size);
        LE::write_u32(&mut b[44..48], self.num_gtes_per_gt);
        LE::write_u64(&mut b[48..56], self.rgd_offset);
        LE::write_u64(&mut b[56..64], self.gd_offset);
        LE::write_u64(&mut b[64..72], self.over_head);
        b[72] = self.unclean_shutdown as u8;
        b[73..77].copy_from_slice(&self.newline_bytes);
        LE::write_u16(&mut b[77..79], self.compress_algorithm);
        b
    }

    /// Grains compressed (bit 16).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
    /// Grain records and markers (bit 17).
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }
    /// GTE 1 means a zeroed grain (bit 2).
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }
    /// Number of grains (the last may be partial).
    pub fn num_grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size.max(1))
    }
    /// Number of grain tables = grain-directory entries.
    pub fn num_gts(&self) -> u64 {
        self.num_grains()
            .div_ceil(u64::from(self.num_gtes_per_gt.max(1)))
    }
    /// Bytes of one grain table.
    pub fn gt_bytes(&self) -> u64 {
        u64::from(self.num_gtes_per_gt) * 4
    }

    /// Check the fields that do not depend on the file; `path` names it in errors.
    pub fn validate(&self, src: &Source) -> Result<()> {
        let path = src.path();
        if !(1..=3).contains(&self.version) {
            return Err(Error::unsupported(
                path,
                format!("sparse header version {} (only 1 to 3 exist)", self.version),
            ));
        }
        let unknown = self.flags & 0xffff_0000 & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(Error::unsupported(
                path,
                format!("incompatible header flags {unknown:#x}"),
            ));
        }
        if self.markers() && !self.compressed() {
            return Err(Error::corrupt(
                path,
                8,
                "header flags set grain markers (bit 17) without compression (bit 16)",
            ));
        }
        if self.compressed() && self.compress_algorithm != 1 {
            return Err(Error::unsupported(
                path,
                format!(
                    "compression algorithm {} (only 1, deflate, exists)",
                    self.compress_algorithm
                ),
            ));
        }
        let max_grain = if self.compressed() {
            MAX_COMPRESSED_GRAIN_SECTORS
        } else {
            MAX_GRAIN_SECTORS
        };
        if self.grain_size == 0 || self.grain_size > max_grain {
            return Err(Error::corrupt(
                path,
                20,
                format!(
                    "grain size {} sectors is outside 1..={max_grain}",
                    self.grain_size
                ),
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > MAX_GTES_PER_GT {
            return Err(Error::corrupt(
                path,
                44,
                format!(
                    "{} entries per grain table is outside 1..={MAX_GTES_PER_GT}",
                    self.num_gtes_per_gt
                ),
            ));
        }
        if self.capacity == 0 {
            return Err(Error::corrupt(path, 12, "capacity is 0 sectors"));
        }
        if self.capacity.checked_mul(SECTOR).is_none() {
            return Err(Error::corrupt(
                path,
                12,
                format!("capacity {} sectors overflows a byte count", self.capacity),
            ));
        }
        Ok(())
    }
}

/// One hosted sparse extent file, opened for reading.
pub struct SparseExtent {
    src: Source,
    header: SparseHeader,
    /// Header as stored at sector 0 (differs from `header` for GD_AT_END streams).
    raw_header: SparseHeader,
    gd: Vec<u32>,
    gts: super::TableCache<u32>,
    grain_bytes: u64,
    len: u64,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent")
            .field("src", &self.src)
            .field("header", &self.header)
            .finish()
    }
}

/// Read and check the header at sector 0 of `src`.
pub fn read_header(src: &Source) -> Result<SparseHeader> {
    let mut b = [0u8; 512];
    src.read_exact_at(&mut b, 0)?;
    if &b[0..4] == b"vmdk" {
        return Err(Error::corrupt(
            src.path(),
            0,
            "magic is `vmdk` (lowercase): the writer never finished this file",
        ));
    }
    let h = SparseHeader::parse(&b)
        .ok_or_else(|| Error::corrupt(src.path(), 0, "bad magic: not a hosted sparse extent"))?;
    h.validate(src)?;
    Ok(h)
}

impl SparseExtent {
    /// Open a sparse extent from a source, checking every structure that addressing
    /// depends on.
    pub fn open(src: Source) -> Result<SparseExtent> {
        let raw_header = read_header(&src)?;
        let path = src.path().to_path_buf();
        let mut header = raw_header;
        if header.gd_offset == GD_AT_END {
            header = read_footer(&src, &raw_header)?;
        }
        let len = header.capacity * SECTOR;
        // Grains start at or after overHead: a file that ends before it was cut short.
        // (An empty qemu stream ends exactly at overHead.)
        if raw_header.over_head.saturating_mul(SECTOR) > src.len() {
            return Err(Error::corrupt(
                &path,
                64,
                format!(
                    "file is {} bytes, shorter than its {} sectors of metadata (overHead): truncated",
                    src.len(),
                    raw_header.over_head
                ),
            ));
        }
        let grain_bytes = header.grain_size * SECTOR;
        let num_gts = header.num_gts();
        let gd_bytes = num_gts
            .checked_mul(4)
            .ok_or_else(|| Error::corrupt(&path, 12, "grain directory size overflows"))?;
        let gd_start = header
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|s| s.checked_add(gd_bytes).is_some_and(|e| e <= src.len()))
            .ok_or_else(|| {
                Error::corrupt(
                    &path,
                    56,
                    format!(
                        "grain directory ({num_gts} entries at sector {}) does not fit in the {}-byte file (capacity {} sectors, grain {}, {} per table)",
                        header.gd_offset,
                        src.len(),
                        header.capacity,
                        header.grain_size,
                        header.num_gtes_per_gt
                    ),
                )
            })?;
        // Bounded by the file length just checked.
        let mut raw = vec![0u8; gd_bytes as usize];
        src.read_exact_at(&mut raw, gd_start)?;
        let mut gd = vec![0u32; num_gts as usize];
        LE::read_u32_into(&raw, &mut gd);
        for (i, &e) in gd.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let end = u64::from(e) * SECTOR + header.gt_bytes();
            if end > src.len() {
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
        let gts = super::TableCache::new(num_gts as usize, header.num_gtes_per_gt as usize);
        Ok(SparseExtent {
            src,
            header,
            raw_header,
            gd,
            gts,
            grain_bytes,
            len,
        })
    }

    /// The effective header (the footer's for GD_AT_END streams).
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }
    /// The header as stored at sector 0.
    pub fn raw_header(&self) -> &SparseHeader {
        &self.raw_header
    }
    /// The source.
    pub fn source(&self) -> &Source {
        &self.src
    }
    /// Virtual length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the extent is empty (never: capacity 0 is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }
    /// The grain directory.
    pub fn gd(&self) -> &[u32] {
        &self.gd
    }

    /// Grain table `i` (loaded once, then shared).
    pub fn gt(&self, i: usize) -> Result<std::sync::Arc<[u32]>> {
        let n = self.header.num_gtes_per_gt as usize;
        super::cached_table(&self.gts, i, &self.src, self.gd[i], n)
    }

    /// The grain-table entry of grain `g`, with the file offset of that entry.
    pub fn gte(&self, g: u64) -> Result<(u32, u64)> {
        let per = u64::from(self.header.num_gtes_per_gt);
        let gdi = (g / per) as usize;
        let gti = (g % per) as usize;
        if self.gd[gdi] == 0 {
            return Ok((0, 0));
        }
        let t = self.gt(gdi)?;
        Ok((t[gti], u64::from(self.gd[gdi]) * SECTOR + 4 * gti as u64))
    }

    /// Allocation runs for the extent-relative byte range `rel`, appended to `out` with
    /// virtual starts `base + rel`, depth 0.
    pub fn map(
        &self,
        index: usize,
        rel: std::ops::Range<u64>,
        base: u64,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        let per = u64::from(self.header.num_gtes_per_gt);
        super::map_grains(
            index,
            self.len,
            self.grain_bytes,
            per,
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
            |t, g, gdi| self.classify(t[(g % per) as usize], g, gdi),
        )
    }

    /// What a grain-table entry means, with bounds checks against the file.
    fn classify(&self, gte: u32, g: u64, gdi: usize) -> Result<Alloc> {
        if gte == 0 {
            return Ok(Alloc::Unallocated);
        }
        if gte == 1 && self.header.zero_grain() {
            return Ok(Alloc::Zero);
        }
        let off = u64::from(gte) * SECTOR;
        let per = u64::from(self.header.num_gtes_per_gt);
        let entry_at = u64::from(self.gd[gdi]) * SECTOR + 4 * (g % per);
        if self.header.compressed() {
            if off >= self.src.len() {
                return Err(Error::corrupt(
                    self.src.path(),
                    entry_at,
                    format!(
                        "grain {g} record at sector {gte} lies past the end of the {}-byte file",
                        self.src.len()
                    ),
                ));
            }
            return Ok(Alloc::Compressed {
                extent: 0,
                offset: off,
            });
        }
        let valid = (self.len - g * self.grain_bytes).min(self.grain_bytes);
        if off + valid > self.src.len() {
            return Err(Error::corrupt(
                self.src.path(),
                entry_at,
                format!(
                    "grain {g} at sector {gte} lies past the end of the {}-byte file",
                    self.src.len()
                ),
            ));
        }
        Ok(Alloc::Data {
            extent: 0,
            offset: off,
        })
    }

    /// Read uncompressed data at a file offset found by [`map`](Self::map).
    pub fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.src.read_at_zero_fill(buf, file_offset).map(|_| ())
    }

    /// Inflate the grain whose record starts at `record` (extent-relative grain start
    /// `grain_start`), returning the whole grain (short for a partial last grain).
    pub fn read_grain(&self, record: u64, grain_start: u64) -> Result<Vec<u8>> {
        let path = self.src.path();
        let want = (self.len - grain_start).min(self.grain_bytes) as usize;
        let max_cmp = 2 * self.grain_bytes + 4096;
        let (data_at, cmp_len) = if self.header.markers() {
            let mut h = [0u8; 12];
            self.src.read_exact_at(&mut h, record)?;
            let lba = LE::read_u64(&h[0..8]);
            let size = u64::from(LE::read_u32(&h[8..12]));
            if lba != grain_start / SECTOR {
                return Err(Error::corrupt(
                    path,
                    record,
                    format!(
                        "grain record says LBA {lba} but the grain table puts it at sector {}",
                        grain_start / SECTOR
                    ),
                ));
            }
            if size == 0 || size > max_cmp {
                return Err(Error::corrupt(
                    path,
                    record + 8,
                    format!("compressed grain size {size} is outside 1..={max_cmp}"),
                ));
            }
            if record + 12 + size > self.src.len() {
                return Err(Error::corrupt(
                    path,
                    record + 8,
                    format!(
                        "compressed grain of {size} bytes runs past the end of the {}-byte file",
                        self.src.len()
                    ),
                ));
            }
            (record + 12, size)
        } else {
            (record, max_cmp.min(self.src.len() - record))
        };
        let mut cmp = vec![0u8; cmp_len as usize];
        self.src.read_exact_at(&mut cmp, data_at)?;
        inflate_grain(&cmp, want, self.grain_bytes as usize)
            .map_err(|what| Error::corrupt(path, record, what))
    }
}

/// Inflate one zlib stream into a grain: at most `grain` bytes, zero-filled up to `want`.
pub fn inflate_grain(
    cmp: &[u8],
    want: usize,
    grain: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(want);
    let mut d = flate2::read::ZlibDecoder::new(cmp);
    let n = (&mut d)
        .take(grain as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("compressed grain does not inflate: {e}"))?;
    if n > grain {
        return Err(format!(
            "compressed grain inflates past the {grain}-byte grain size"
        ));
    }
    out.truncate(want);
    out.resize(want, 0);
    Ok(out)
}

/// Read the footer of a GD_AT_END stream (formats.md §3.3).
fn read_footer(src: &Source, header: &SparseHeader) -> Result<SparseHeader> {
    // Uncompressed files may put the directory at the end too (qemu reads them): the
    // footer is found the same way, by the file's last three sectors.
    let path = src.path();
    let len = src.len();
    if len < 3 * 512 + 512 {
        return Err(Error::corrupt(path, 0, "stream too short to hold a footer"));
    }
    let at = (len & !511) - 1536;
    let mut b = [0u8; 1536];
    src.read_exact_at(&mut b, at)?;
    let marker_ok = LE::read_u32(&b[8..12]) == 0 && LE::read_u32(&b[12..16]) == MARKER_FOOTER;
    let eos_ok = b[1024..1040].iter().all(|&x| x == 0);
    let footer = SparseHeader::parse(b[512..1024].try_into().expect("512 bytes"));
    match footer {
        Some(f) if marker_ok && eos_ok => {
            f.validate(src)?;
            if f.gd_offset == GD_AT_END {
                return Err(Error::corrupt(
                    path,
                    at + 512 + 56,
                    "footer also says the grain directory is at the end",
                ));
            }
            if f.capacity != header.capacity || f.grain_size != header.grain_size {
                return Err(Error::corrupt(
                    path,
                    at + 512,
                    "footer disagrees with the header on capacity or grain size",
                ));
            }
            Ok(f)
        }
        _ => Err(Error::corrupt(
            path,
            at,
            "invalid footer: the header puts the grain directory at the end, but the file does not end with footer marker, footer and end-of-stream marker (truncated or unfinished stream?)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut h = SparseHeader::new(204800, 128);
        h.descriptor_offset = 1;
        h.descriptor_size = 20;
        h.rgd_offset = 21;
        h.gd_offset = 38;
        h.over_head = 128;
        let b = h.to_bytes();
        assert_eq!(SparseHeader::parse(&b), Some(h));
        // Bytes as in formats.md §2.1 (qemu's 100M image).
        assert_eq!(
            &b[0..16],
            &[0x4b, 0x44, 0x4d, 0x56, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0x20, 3, 0]
        );
        assert_eq!(&b[0x48..0x50], &[0, 0x0a, 0x20, 0x0d, 0x0a, 0, 0, 0]);
    }
}

/// Layout of a hosted sparse extent as vmdkit (and qemu, and VMware's hosted products)
/// write it: header, optional embedded descriptor, redundant GD + GTs, GD + GTs, padding
/// to a grain boundary (`overHead`), then grains packed in ascending LBA order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseLayout {
    /// Capacity in sectors.
    pub capacity: u64,
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
            capacity,
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
        let mut h = SparseHeader::new(self.capacity, self.grain);
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

    /// Grain `g`'s entry (0 when unset).
    pub fn get(&self, g: u64) -> u32 {
        self.tables
            .get(&(g / self.per))
            .map_or(0, |t| t[(g % self.per) as usize])
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
