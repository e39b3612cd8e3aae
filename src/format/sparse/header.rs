//! The hosted sparse extent header ("KDMV", formats.md §2): one struct, parsed from and
//! written to its 512 bytes, with the checks that addressing depends on.
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

use byteorder::{ByteOrder, LittleEndian as LE};

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
    pub capacity_sectors: u64,
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
            capacity_sectors: capacity,
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
            capacity_sectors: LE::read_u64(&b[12..20]),
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
    pub fn to_bytes(self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u32(&mut b[0..4], SPARSE_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u64(&mut b[12..20], self.capacity_sectors);
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
        self.capacity_sectors.div_ceil(self.grain_size.max(1))
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
        if self.capacity_sectors == 0 {
            return Err(Error::corrupt(path, 12, "capacity is 0 sectors"));
        }
        if self.capacity_sectors.checked_mul(SECTOR).is_none() {
            return Err(Error::corrupt(
                path,
                12,
                format!(
                    "capacity {} sectors overflows a byte count",
                    self.capacity_sectors
                ),
            ));
        }
        Ok(())
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
