//! Writing a streamOptimized file in VMware's layout (formats.md §3, the ESXi checklist
//! of §3.8), in one pass, to any [`Write`]: header (version 3, compressed, markers,
//! directory at the end), embedded descriptor, padding to `overHead`; then, in ascending
//! LBA order, grain records, each table's GT marker and table after its grains; then the
//! GD marker and directory, the footer marker and footer, and the end-of-stream marker.
//!
//! Its use is shown by the tests at the end of this file (`write_grain` in ascending
//! order, then `finish`).
//!
//! The writer knows nothing of chains or the copy engine: it takes grains (or records
//! already compressed with [`grain_record`], which is how the parallel engine uses it).

use std::io::Write;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::sparse::{
    SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE, FLAG_ZERO_GRAIN, GD_AT_END,
    MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};

/// Grain size of the streams vmdkit writes (128 sectors), as VMware writes them.
pub const STREAM_GRAIN_BYTES: u64 = 65536;
/// Grain-table entries per table.
const GTES: u64 = 512;

/// Shannon entropy of the byte histogram above which a grain is stored, not deflated.
/// Random or already-compressed data measures ~7.99 bits/byte; text ~4-5, machine code ~6.
/// Deflating such data costs most of the stream's time and gains nothing (level 6 output
/// is even a few bytes larger than stored blocks).
const STORE_ENTROPY: f64 = 7.9;

/// Whether `data` looks incompressible (byte entropy above 7.9 bits).
///
/// Measured on a sample: the first 256 bytes of every KiB (16 KiB of a 64 KiB grain),
/// counted into four histograms in turn (no store-to-load stall between neighbouring
/// bytes). The sample's entropy is within 0.02 bits of the whole grain's for uniform
/// data (random data measures 7.99) and far from the threshold for text (4-5) and code
/// (about 6); a mixed grain decided wrongly only costs compression, never content.
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 4096 {
        return false;
    }
    let mut hist = [[0u32; 256]; 4];
    let mut n = 0u32;
    for block in data.chunks(1024) {
        let sample = &block[..block.len().min(256)];
        let mut quads = sample.chunks_exact(4);
        for q in &mut quads {
            hist[0][q[0] as usize] += 1;
            hist[1][q[1] as usize] += 1;
            hist[2][q[2] as usize] += 1;
            hist[3][q[3] as usize] += 1;
        }
        for &b in quads.remainder() {
            hist[0][b as usize] += 1;
        }
        n += sample.len() as u32;
    }
    let n = f64::from(n);
    let h: f64 = (0..256)
        .map(|i| hist[0][i] + hist[1][i] + hist[2][i] + hist[3][i])
        .filter(|&c| c > 0)
        .map(|c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    h > STORE_ENTROPY
}

/// A stream grain record: LBA (sectors), compressed size, one zlib stream, zero padding to
/// a sector. Incompressible grains get a zlib stream of stored blocks (still zlib, as
/// readers need). `level` is zlib's 0-9, applied by libdeflate, which compresses a whole
/// buffer (a grain's shape) several times faster than zlib at the same level, with
/// output within a few percent (`cargo bench --bench pipeline` compares them).
pub fn grain_record(lba: u64, data: &[u8], level: u32) -> Result<Vec<u8>> {
    thread_local! {
        static DEFLATER: std::cell::RefCell<Option<(u32, libdeflater::Compressor)>> =
            const { std::cell::RefCell::new(None) };
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let level = if level > 0 && looks_incompressible(data) {
        0
    } else {
        level.min(9)
    };
    DEFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            let lvl = libdeflater::CompressionLvl::new(level as i32)
                .map_err(|e| Error::InvalidInput(format!("compression level {level}: {e:?}")))?;
            *cell = Some((level, libdeflater::Compressor::new(lvl)));
        }
        let (_, c) = cell.as_mut().expect("set above");
        // Compress into a per-thread scratch buffer, then copy out only the record's
        // bytes: a fresh zeroed buffer per grain cost more than the copy.
        let bound = c.zlib_compress_bound(data.len());
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < bound {
                scratch.resize(bound, 0);
            }
            let n = c
                .zlib_compress(data, &mut scratch[..bound])
                .map_err(|e| Error::InvalidInput(format!("compression failed: {e:?}")))?;
            let padded = (12 + n).div_ceil(512) * 512;
            let mut rec = Vec::with_capacity(padded);
            rec.extend_from_slice(&lba.to_le_bytes());
            rec.extend_from_slice(&(n as u32).to_le_bytes());
            rec.extend_from_slice(&scratch[..n]);
            rec.resize(padded, 0);
            Ok(rec)
        })
    })
}

/// A marker sector: `num_sectors` of metadata of `kind` follow.
pub fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    LE::write_u64(&mut m[0..8], num_sectors);
    LE::write_u32(&mut m[12..16], kind);
    m
}

/// Writes one streamOptimized file; see the module docs.
pub struct StreamWriter<W: Write> {
    w: W,
    name: PathBuf,
    pos: u64,
    header: SparseHeader,
    gd: Vec<u32>,
    /// Table being filled: its index and entries.
    table: u64,
    gt: Vec<u32>,
    table_used: bool,
    last_grain: Option<u64>,
    grains: u64,
    zeroed: u64,
}

impl<W: Write> StreamWriter<W> {
    #[cfg(test)]
    /// Start a stream of `capacity` bytes (a multiple of 512) with `descriptor` embedded;
    /// `name` names the output in errors.
    pub fn new(w: W, capacity: u64, descriptor: &[u8], name: &Path) -> Result<StreamWriter<W>> {
        Self::with_zeroed(w, capacity, descriptor, name, false)
    }

    /// Like [`new`](Self::new); with `zeroed_grains` the header sets flag bit 2 (grain
    /// table entry 1 means a zeroed grain, formats.md §2.2) so
    /// [`write_zeroed`](Self::write_zeroed) can mark grains that read as zeros and hide a
    /// parent: the representation of an increment's zeroed grains (`export --delta`).
    pub fn with_zeroed(
        w: W,
        capacity: u64,
        descriptor: &[u8],
        name: &Path,
        zeroed_grains: bool,
    ) -> Result<StreamWriter<W>> {
        let mut h = SparseHeader::new(capacity / SECTOR, STREAM_GRAIN_BYTES / SECTOR);
        h.version = 3;
        h.flags = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;
        if zeroed_grains {
            h.flags |= FLAG_ZERO_GRAIN;
        }
        h.compress_algorithm = 1;
        h.descriptor_offset = 1;
        h.descriptor_size = (descriptor.len() as u64).div_ceil(SECTOR);
        h.rgd_offset = 0;
        h.gd_offset = GD_AT_END;
        h.over_head = (1 + h.descriptor_size).div_ceil(128) * 128;
        let mut s = StreamWriter {
            w,
            name: name.to_path_buf(),
            pos: 0,
            header: h,
            gd: vec![0; h.num_gts() as usize],
            table: 0,
            gt: vec![0; GTES as usize],
            table_used: false,
            last_grain: None,
            grains: 0,
            zeroed: 0,
        };
        s.put(&h.to_bytes())?;
        s.put(descriptor)?;
        s.zeros(h.over_head * SECTOR - s.pos)?;
        Ok(s)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| crate::io::write_error(&self.name, self.pos, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, n: u64) -> Result<()> {
        for z in crate::io::zero_chunks(n) {
            self.put(z)?;
        }
        Ok(())
    }

    fn end_table(&mut self) -> Result<()> {
        if self.table_used {
            self.put(&marker(4, MARKER_GT))?;
            self.gd[self.table as usize] = (self.pos / SECTOR) as u32;
            let mut b = vec![0u8; 2048];
            LE::write_u32_into(&self.gt, &mut b);
            self.put(&b)?;
            self.gt.fill(0);
            self.table_used = false;
        }
        Ok(())
    }

    /// Append grain `grain` (its index: bytes `grain * 64 KiB ..`) as a record made by
    /// [`grain_record`]. Grains come in ascending order.
    pub fn write_record(&mut self, grain: u64, record: &[u8]) -> Result<()> {
        self.next_grain(grain)?;
        let sector = u32::try_from(self.pos / SECTOR).map_err(|_| {
            Error::InvalidInput(
                "stream output exceeds 2 TiB of compressed data (32-bit grain table entries)"
                    .into(),
            )
        })?;
        self.gt[(grain % GTES) as usize] = sector;
        self.table_used = true;
        self.put(record)?;
        self.grains += 1;
        Ok(())
    }

    /// Check that `grain` comes after the last one and inside the disk; close the table
    /// of the previous grain when `grain` is in another.
    fn next_grain(&mut self, grain: u64) -> Result<()> {
        if self.last_grain.is_some_and(|l| grain <= l) || grain >= self.header.num_grains() {
            return Err(Error::InvalidInput(format!(
                "stream grain {grain} out of order or past the capacity (grains go in ascending order below {})",
                self.header.num_grains()
            )));
        }
        self.last_grain = Some(grain);
        if grain / GTES != self.table {
            self.end_table()?;
            self.table = grain / GTES;
        }
        Ok(())
    }

    /// Mark grain `grain` zeroed (table entry 1: reads as zeros, hides a parent). Only
    /// in a stream made [`with_zeroed`](Self::with_zeroed) grains; in ascending order
    /// with the data grains.
    pub fn write_zeroed(&mut self, grain: u64) -> Result<()> {
        if !self.header.zero_grain() {
            return Err(Error::InvalidInput(
                "zeroed grains need a stream made with zeroed-grain entries".into(),
            ));
        }
        self.next_grain(grain)?;
        self.gt[(grain % GTES) as usize] = 1;
        self.table_used = true;
        self.zeroed += 1;
        Ok(())
    }

    /// Grains marked zeroed so far.
    pub fn zeroed(&self) -> u64 {
        self.zeroed
    }

    #[cfg(any(test, feature = "fuzzing"))]
    /// Compress `data` (one grain, or the shorter last one) at zlib `level` and append it
    /// as grain `grain`.
    pub fn write_grain(&mut self, grain: u64, data: &[u8], level: u32) -> Result<()> {
        let rec = grain_record(grain * STREAM_GRAIN_BYTES / SECTOR, data, level)?;
        self.write_record(grain, &rec)
    }

    /// Write the last table, the directory, the footer and the end-of-stream marker;
    /// flush, and hand back the writer with the bytes and grains written.
    pub fn finish(mut self) -> Result<(W, u64, u64)> {
        self.end_table()?;
        let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(SECTOR);
        self.put(&marker(gd_sectors, MARKER_GD))?;
        let gd_at = self.pos / SECTOR;
        let mut b = vec![0u8; (gd_sectors * SECTOR) as usize];
        LE::write_u32_into(&self.gd, &mut b[..self.gd.len() * 4]);
        self.put(&b)?;
        self.put(&marker(1, MARKER_FOOTER))?;
        let mut footer = self.header;
        footer.gd_offset = gd_at;
        self.put(&footer.to_bytes())?;
        self.put(&[0u8; 512])?; // end-of-stream marker
        self.w
            .flush()
            .map_err(|e| crate::io::write_error(&self.name, self.pos, e))?;
        Ok((self.w, self.pos, self.grains))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::VirtualDisk;

    /// A stream written grain by grain reads back (through the sparse reader) as the
    /// content it was given; holes read as zeros.
    #[test]
    fn a_stream_written_alone_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.vmdk");
        let desc = crate::format::descriptor::Descriptor::new(
            crate::format::descriptor::CreateType::StreamOptimized,
            0x1234_5678,
            None,
            vec![crate::format::descriptor::ExtentLine::rw(
                crate::format::descriptor::ExtentType::Sparse,
                4096,
                "s.vmdk",
            )],
            &[],
        )
        .to_text();
        let f = std::fs::File::create(&p).unwrap();
        let mut w = StreamWriter::new(f, 2 << 20, desc.as_bytes(), &p).unwrap();
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"vmdkit "[(i % 7) as usize])
            .collect();
        w.write_grain(1, &text, 6).unwrap();
        w.write_grain(31, &vec![0xabu8; 65536], 1).unwrap();
        assert!(w.write_grain(2, &text, 6).is_err(), "out of order");
        let (_, bytes, grains) = w.finish().unwrap();
        assert_eq!((std::fs::metadata(&p).unwrap().len(), grains), (bytes, 2));
        let chain = crate::Chain::open(&p, &Default::default()).unwrap();
        let mut all = vec![0u8; 2 << 20];
        chain.read_at(&mut all, 0).unwrap();
        assert!(all[..65536].iter().all(|&b| b == 0));
        assert_eq!(&all[65536..131072], &text[..]);
        assert!(all[31 * 65536..].iter().all(|&b| b == 0xab));
    }
}
