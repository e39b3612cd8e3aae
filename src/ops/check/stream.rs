//! Checking streams: every grain record inflates; VMware-layout marker sequences.

use std::collections::HashMap;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{CheckReport, Severity};
use crate::error::Result;
use crate::format::sparse::{self, SparseExtent, SparseHeader, SECTOR};
use crate::io::Source;

/// Streams: every grain record inflates to its grain; VMware-layout streams end with
/// footer marker, footer and end-of-stream marker.
pub(super) fn check_stream(
    path: &Path,
    src: Source,
    h: &SparseHeader,
    r: &mut CheckReport,
) -> Result<()> {
    let ext = match SparseExtent::open(src) {
        Ok(e) => e,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, e.to_string());
            return Ok(());
        }
    };
    if h.markers() {
        walk_markers(path, &ext, r)?;
    }
    let mut runs = Vec::new();
    ext.map(0, 0..ext.len(), 0, &mut runs)?;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for run in runs {
        if let crate::disk::Alloc::Compressed { offset, .. } = run.alloc {
            let gstart = run.start / ext.grain_bytes() * ext.grain_bytes();
            if let Some(prev) = seen.insert(offset, gstart) {
                r.add(
                    path,
                    offset,
                    Severity::Corruption,
                    format!(
                        "grain record at {offset:#x} serves both LBA {} and {}",
                        prev / SECTOR,
                        gstart / SECTOR
                    ),
                );
                continue;
            }
            if let Err(e) = ext.read_grain(offset, gstart) {
                r.add(path, offset, Severity::Corruption, e.to_string());
            }
        }
    }
    Ok(())
}

/// Walk a marker stream from `overHead`: grain records in ascending LBA order, each GT
/// marker's table where the directory says, the GD marker's directory equal to the one in
/// use, then footer marker, footer and end-of-stream marker. qemu's layout (tables up
/// front, no markers) ends at the first zero sector.
fn walk_markers(path: &Path, ext: &SparseExtent, r: &mut CheckReport) -> Result<()> {
    let src = ext.source();
    let h = ext.header();
    let len = src.len();
    let mut pos = h.over_head * SECTOR;
    let mut last_lba: Option<u64> = None;
    let mut sector = [0u8; 512];
    let mut saw_footer = false;
    let gts_in_dir: Vec<u64> = ext
        .gd()
        .iter()
        .filter(|&&e| e != 0)
        .map(|&e| u64::from(e))
        .collect();
    while pos + 512 <= len {
        src.read_exact_at(&mut sector, pos)?;
        let val = LE::read_u64(&sector[0..8]);
        let size = u64::from(LE::read_u32(&sector[8..12]));
        if size > 0 {
            if last_lba.is_some_and(|l| val <= l) {
                r.add(path, pos, Severity::Warning, format!("grain record for LBA {val} follows LBA {} (not in ascending order: streaming readers refuse it)", last_lba.unwrap_or(0)));
            }
            last_lba = Some(val);
            pos += (12 + size).div_ceil(SECTOR) * SECTOR;
            continue;
        }
        let kind = LE::read_u32(&sector[12..16]);
        match kind {
            0 => {
                if h.gd_offset != 0
                    && ext.raw_header().gd_offset == sparse::GD_AT_END
                    && !saw_footer
                {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        "end-of-stream marker before the footer",
                    );
                }
                return Ok(());
            }
            1 => {
                if val != (u64::from(h.num_gtes_per_gt) * 4).div_ceil(SECTOR) {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        format!(
                            "grain-table marker says {val} sectors, a table has {}",
                            (u64::from(h.num_gtes_per_gt) * 4).div_ceil(SECTOR)
                        ),
                    );
                }
                if !gts_in_dir.contains(&(pos / SECTOR + 1)) {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        "grain table after this marker is not in the grain directory",
                    );
                }
            }
            2 => {
                let want = (h.num_gts() * 4).div_ceil(SECTOR);
                if val != want {
                    r.add(
                        path,
                        pos,
                        Severity::Corruption,
                        format!(
                            "grain-directory marker says {val} sectors, the directory has {want}"
                        ),
                    );
                }
                if pos / SECTOR + 1 != h.gd_offset {
                    r.add(path, pos, Severity::Corruption, format!("grain-directory marker at sector {}, but the directory in use is at sector {}", pos / SECTOR, h.gd_offset));
                }
            }
            3 => {
                saw_footer = true;
                let mut f = [0u8; 512];
                src.read_exact_at(&mut f, pos + SECTOR)?;
                if SparseHeader::parse(&f).is_none() {
                    r.add(
                        path,
                        pos + SECTOR,
                        Severity::Corruption,
                        "footer marker not followed by a footer",
                    );
                }
            }
            4 => {}
            k => {
                r.add(
                    path,
                    pos,
                    Severity::Corruption,
                    format!("unknown marker type {k}"),
                );
                return Ok(());
            }
        }
        if val.saturating_mul(SECTOR) > len - pos - SECTOR {
            r.add(
                path,
                pos,
                Severity::Corruption,
                format!("marker of {val} sectors runs past the end of the file"),
            );
            return Ok(());
        }
        pos += SECTOR + val * SECTOR;
    }
    r.add(
        path,
        len,
        Severity::Warning,
        "the stream ends without an end-of-stream marker (ESXi refuses such streams)",
    );
    Ok(())
}
