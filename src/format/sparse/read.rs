//! Reading hosted sparse extents and, by random access, streamOptimized files (§2, §3):
//! the grain directory and tables, zeroed-grain entries, compressed grain records.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use crate::disk::{Alloc, Run};
use crate::error::{Error, Result};
use crate::format::stream::read::{inflate_grain, read_footer};
use crate::io::Source;

/// One hosted sparse extent file, opened for reading.
pub struct SparseExtent {
    src: Source,
    header: SparseHeader,
    /// Header as stored at sector 0 (differs from `header` for GD_AT_END streams).
    raw_header: SparseHeader,
    gd: Vec<u32>,
    gts: crate::format::TableCache<u32>,
    grain_bytes: u64,
    len: u64,
    /// A stream without a grain directory: its tables, built once by reading its
    /// records (only the tables that hold grains).
    index: Option<std::collections::BTreeMap<usize, std::sync::Arc<[u32]>>>,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent")
            .field("src", &self.src)
            .field("header", &self.header)
            .finish()
    }
}

impl SparseExtent {
    /// Open a sparse extent from a source, checking every structure that addressing
    /// depends on.
    pub fn open(src: Source) -> Result<SparseExtent> {
        Self::open_with_progress(src, None)
    }

    /// Like [`open`](Self::open); `progress` is told `(bytes read, file length)` while a
    /// stream written without a grain directory is indexed.
    pub fn open_with_progress(src: Source, progress: Option<fn(u64, u64)>) -> Result<SparseExtent> {
        let raw_header = read_header(&src)?;
        let path = src.path().to_path_buf();
        let mut header = raw_header;
        if header.gd_offset == GD_AT_END {
            // A stream whose footer is missing stays refused even when a zero sector
            // (an end-of-stream marker, or tape padding) ends it: what it lost cannot be
            // told from what was never written.
            header = read_footer(&src, &raw_header)?;
        }
        if header.gd_offset == 0 && header.compressed() && header.markers() {
            return Self::indexed(src, header, progress);
        }
        let len = header.capacity_sectors * SECTOR;
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
                        header.capacity_sectors,
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
        let gts = crate::format::TableCache::new(num_gts as usize, header.num_gtes_per_gt as usize);
        Ok(SparseExtent {
            src,
            header,
            raw_header,
            gd,
            gts,
            grain_bytes,
            len,
            index: None,
        })
    }

    /// A streamOptimized file written without a grain directory (its header's and
    /// footer's gdOffset 0) and complete (its end-of-stream marker is there): its records
    /// are read once, in order, and indexed. One that stops before the marker is refused.
    fn indexed(
        src: Source,
        header: SparseHeader,
        progress: Option<fn(u64, u64)>,
    ) -> Result<SparseExtent> {
        let path = src.path().to_path_buf();
        if !(header.compressed() && header.markers()) {
            return Err(Error::corrupt(&path, 56, "no grain directory"));
        }
        let grain_bytes = header.grain_size * SECTOR;
        let len = header.capacity_sectors * SECTOR;
        let per = header.num_gtes_per_gt as usize;
        let num_gts = header.num_gts() as usize;
        let max_cmp = 2 * grain_bytes + 4096;
        let mut index: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        let mut pos = header.over_head.saturating_mul(SECTOR).max(SECTOR);
        let mut last: Option<u64> = None;
        let mut head = [0u8; 16];
        let mut told = 0u64;
        loop {
            if let Some(p) = progress {
                if pos >= told + (64 << 20) {
                    told = pos;
                    p(pos, src.len());
                }
            }
            if pos + 16 > src.len() {
                return Err(Error::corrupt(
                    &path,
                    pos,
                    "the stream has no grain directory and ends before its end-of-stream marker: truncated",
                ));
            }
            src.read_exact_at(&mut head, pos)?;
            let val = LE::read_u64(&head[0..8]);
            let size = u64::from(LE::read_u32(&head[8..12]));
            if size == 0 {
                match LE::read_u32(&head[12..16]) {
                    MARKER_EOS => break,
                    // A table, a directory or a footer: skip the marker and its sectors.
                    _ => pos = pos.saturating_add(SECTOR + val.saturating_mul(SECTOR)),
                }
                continue;
            }
            let g = val / header.grain_size;
            if val % header.grain_size != 0
                || val.saturating_mul(SECTOR) >= len
                || size > max_cmp
                || last.is_some_and(|l| val <= l)
            {
                return Err(Error::corrupt(
                    &path,
                    pos,
                    format!(
                        "grain record (LBA {val}, {size} bytes) is not the next grain of the disk"
                    ),
                ));
            }
            last = Some(val);
            let sector = u32::try_from(pos / SECTOR).map_err(|_| {
                Error::unsupported(&path, "a stream past 2 TiB without a grain directory")
            })?;
            let t = index
                .entry((g / per as u64) as usize)
                .or_insert_with(|| vec![0; per]);
            t[(g % per as u64) as usize] = sector;
            pos = pos.saturating_add((12 + size).div_ceil(SECTOR) * SECTOR);
        }
        if let Some(p) = progress {
            p(src.len(), src.len());
        }
        let mut gd = vec![0u32; num_gts];
        for &i in index.keys() {
            if let Some(e) = gd.get_mut(i) {
                *e = 1; // a table exists (held in `index`)
            }
        }
        Ok(SparseExtent {
            gts: crate::format::TableCache::new(num_gts, per),
            src,
            raw_header: header,
            header,
            gd,
            grain_bytes,
            len,
            index: Some(index.into_iter().map(|(k, v)| (k, v.into())).collect()),
        })
    }

    /// Whether the grain directory was built by reading the records (a stream without
    /// one).
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
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
        if let Some(ix) = &self.index {
            return Ok(ix.get(&i).cloned().unwrap_or_else(|| vec![0u32; n].into()));
        }
        crate::format::cached_table(&self.gts, i, &self.src, self.gd[i], n)
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
        crate::format::map_grains(
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
