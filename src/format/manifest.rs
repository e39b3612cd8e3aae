//! Manifests: the CRC-32 of each 1 MiB block of logical content and of the whole, so a
//! copy restored from tape can be checked (`vmdkit verify`), naming every range that
//! differs.
//!
//! Text format, one item per line:
//! ```text
//! vmdkit-manifest 1
//! capacity 10485760
//! block-size 1048576
//! 0 1a2b3c4d          <- block index, CRC-32 (hex) of that block
//! ...
//! total 89abcdef      <- CRC-32 of the whole content
//! ```
//!
//! A guest-aware export leaves out grains the guest's file systems call free; its
//! manifest is version 2, says `omitted-grain 65536`, and gives a block with omitted
//! grains a third field: the mask of them (hex, bit i = the block's grain i). Its CRCs
//! are of the content with those grains zeroed, and `verify` zeroes them in what it
//! reads before comparing, so only what was kept is compared, whatever a restore left
//! in the omitted grains.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Block size of manifests.
pub const BLOCK: u64 = 1 << 20;

/// The grain size of omitted-grain masks (at most 64 grains in a block).
pub const OMITTED_GRAIN: u64 = 64 << 10;

/// Builds a manifest as blocks arrive in order.
pub struct ManifestBuilder {
    capacity: u64,
    next: u64,
    total: crc32fast::Hasher,
    zero_block: crc32fast::Hasher,
    zero_crc: u32,
    out: Vec<u8>,
    /// Omitted-grain masks by block (guest-aware exports).
    omitted: Option<Box<dyn Fn(u64) -> u64 + Send>>,
}

impl ManifestBuilder {
    /// A builder for a disk of `capacity` bytes.
    pub fn new(capacity: u64) -> ManifestBuilder {
        ManifestBuilder::with_omitted(capacity, None)
    }

    /// A builder for a guest-aware export: `omitted(block index)` is the mask of the
    /// block's grains left out (their bytes must arrive zeroed).
    pub fn with_omitted(
        capacity: u64,
        omitted: Option<Box<dyn Fn(u64) -> u64 + Send>>,
    ) -> ManifestBuilder {
        let zeros = vec![0u8; BLOCK as usize];
        let mut zero_block = crc32fast::Hasher::new();
        zero_block.update(&zeros);
        let mut out = Vec::new();
        let _ = match omitted {
            None => write!(
                out,
                "vmdkit-manifest 1\ncapacity {capacity}\nblock-size {BLOCK}\n"
            ),
            Some(_) => write!(
                out,
                "vmdkit-manifest 2\ncapacity {capacity}\nblock-size {BLOCK}\n\
                 omitted-grain {OMITTED_GRAIN}\n"
            ),
        };
        ManifestBuilder {
            capacity,
            next: 0,
            total: crc32fast::Hasher::new(),
            zero_crc: zero_block.clone().finalize(),
            zero_block,
            out,
            omitted,
        }
    }

    fn block_len(&self, index: u64) -> u64 {
        (self.capacity - index * BLOCK).min(BLOCK)
    }

    /// The next block's bytes (`start` must be the next block's offset).
    pub fn data(&mut self, start: u64, buf: &[u8]) {
        let mut h = crc32fast::Hasher::new();
        h.update(buf);
        self.block(start, h);
    }

    /// The next unit of a copy: a block hashed already, or `len` bytes of zeros.
    pub fn unit(&mut self, start: u64, len: u64, h: Option<crc32fast::Hasher>) {
        match h {
            Some(h) => self.block(start, h),
            None => self.zeros(start, len),
        }
    }

    /// The next block, hashed already (by a pipeline worker).
    pub fn block(&mut self, start: u64, h: crc32fast::Hasher) {
        debug_assert_eq!(start, self.next * BLOCK);
        let crc = h.clone().finalize();
        self.total.combine(&h);
        self.line(crc);
    }

    fn line(&mut self, crc: u32) {
        match self.omitted.as_ref().map_or(0, |f| f(self.next)) {
            0 => writeln!(self.out, "{} {crc:08x}", self.next),
            mask => writeln!(self.out, "{} {crc:08x} {mask:x}", self.next),
        }
        .expect("writing to a Vec");
        self.next += 1;
    }

    /// `len` bytes of zeros from `start` (whole blocks, or the tail).
    pub fn zeros(&mut self, start: u64, len: u64) {
        debug_assert_eq!(start, self.next * BLOCK);
        let end = start + len;
        while self.next * BLOCK < end {
            let n = self.block_len(self.next);
            if n == BLOCK {
                self.total.combine(&self.zero_block);
                self.line(self.zero_crc);
            } else {
                let z = vec![0u8; n as usize];
                self.data(self.next * BLOCK, &z);
            }
        }
    }

    /// CRC-32 of everything added so far (the whole content once complete).
    pub fn total(&self) -> u32 {
        self.total.clone().finalize()
    }

    /// Finish: the whole text.
    pub fn finish(mut self) -> Vec<u8> {
        let _ = writeln!(self.out, "total {:08x}", self.total.finalize());
        self.out
    }
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Capacity in bytes.
    pub capacity: u64,
    /// CRC per block.
    pub blocks: Vec<u32>,
    /// CRC of the whole.
    pub total: u32,
    /// Blocks with grains a guest-aware export left out: (block index, mask of its
    /// 64 KiB grains left out). Empty for a plain export.
    pub omitted: Vec<(u64, u64)>,
}

impl Manifest {
    /// Parse manifest text.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let bad = |line: usize, what: &str| Error::Descriptor {
            path: path.to_path_buf(),
            line,
            what: what.to_string(),
        };
        let mut lines = text.lines().enumerate();
        let v2 = match lines.next() {
            Some((_, "vmdkit-manifest 1")) => false,
            Some((_, "vmdkit-manifest 2")) => true,
            _ => {
                return Err(bad(
                    1,
                    "not a vmdkit manifest (first line must be `vmdkit-manifest 1` or `2`)",
                ))
            }
        };
        let mut omitted = Vec::new();
        let mut grain_line = false;
        let mut capacity = None;
        let mut blocks = Vec::new();
        let mut total = None;
        for (i, l) in lines {
            let n = i + 1;
            let mut it = l.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some("capacity"), Some(v), None) => {
                    capacity = Some(v.parse::<u64>().map_err(|_| bad(n, "bad capacity"))?)
                }
                (Some("block-size"), Some(v), None) => {
                    if v.parse::<u64>().ok() != Some(BLOCK) {
                        return Err(bad(n, "unsupported block size"));
                    }
                }
                (Some("total"), Some(v), None) => {
                    total = Some(u32::from_str_radix(v, 16).map_err(|_| bad(n, "bad total CRC"))?)
                }
                (Some("omitted-grain"), Some(v), None) if v2 => {
                    if v.parse::<u64>().ok() != Some(OMITTED_GRAIN) {
                        return Err(bad(n, "unsupported omitted-grain size"));
                    }
                    grain_line = true;
                }
                (Some(idx), Some(v), mask) if mask.is_none() || v2 => {
                    if mask.is_some() && it.next().is_some() {
                        return Err(bad(n, "unrecognized line"));
                    }
                    let idx: u64 = idx.parse().map_err(|_| bad(n, "bad block index"))?;
                    if idx != blocks.len() as u64 {
                        return Err(bad(n, "blocks out of order"));
                    }
                    blocks.push(u32::from_str_radix(v, 16).map_err(|_| bad(n, "bad block CRC"))?);
                    if let Some(m) = mask {
                        let m =
                            u64::from_str_radix(m, 16).map_err(|_| bad(n, "bad omitted mask"))?;
                        if m >> (BLOCK / OMITTED_GRAIN) != 0 {
                            return Err(bad(n, "omitted mask names grains past the block"));
                        }
                        if m != 0 {
                            omitted.push((idx, m));
                        }
                    }
                }
                (None, _, _) => {}
                _ => return Err(bad(n, "unrecognized line")),
            }
        }
        let capacity = capacity.ok_or_else(|| bad(0, "no capacity line"))?;
        let total = total.ok_or_else(|| bad(0, "no total line (manifest cut short?)"))?;
        if blocks.len() as u64 != capacity.div_ceil(BLOCK) {
            return Err(bad(0, "number of blocks does not match the capacity"));
        }
        if v2 && !grain_line {
            return Err(bad(0, "no omitted-grain line"));
        }
        Ok(Manifest {
            capacity,
            blocks,
            total,
            omitted,
        })
    }
}
