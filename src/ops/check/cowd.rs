//! Checking COWD files (ESX 2 REDO logs, vmfsSparse deltas).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use super::{rd32, CheckReport, Severity};
use crate::error::{Error, Result};
use crate::format::cowd::{self, COWD_GTES};
use crate::format::sparse::SECTOR;
use crate::io::{Source, SourceMode};

/// COWD: directory and tables inside the file, grains inside, not shared, not on tables.
pub(super) fn check_cowd(path: &Path, repair: bool, r: &mut CheckReport) -> Result<()> {
    let src = Source::open(path, SourceMode::Pread)?;
    let h = match cowd::read_header(&src) {
        Ok(h) => h,
        Err(e) => {
            r.add(path, 0, Severity::Corruption, format!("header: {e}"));
            return Ok(());
        }
    };
    let fsect = src.len() / SECTOR;
    let n = cowd::directory_entries(&h);
    let gd_at = u64::from(h.gd_offset);
    if gd_at < 4 || gd_at + (n * 4).div_ceil(SECTOR) > fsect {
        r.add(
            path,
            20,
            Severity::Corruption,
            format!("grain directory at sector {gd_at} lies outside the file"),
        );
        return Ok(());
    }
    let f = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
    let gd = rd32(&f, path, gd_at, n)?;
    let mut meta = vec![(0u64, 4u64), (gd_at, gd_at + (n * 4).div_ceil(SECTOR))];
    for &e in &gd {
        if e != 0 {
            meta.push((u64::from(e), u64::from(e) + 32));
        }
    }
    let mut used: HashMap<u32, u64> = HashMap::new();
    for (i, &e) in gd.iter().enumerate() {
        if e == 0 {
            continue;
        }
        if u64::from(e) + 32 > fsect {
            r.add(
                path,
                gd_at * SECTOR + 4 * i as u64,
                Severity::Corruption,
                format!("grain table {i} at sector {e} lies past the end of the file"),
            );
            continue;
        }
        let t = rd32(&f, path, u64::from(e), COWD_GTES)?;
        for (j, &g) in t.iter().enumerate() {
            if g == 0 {
                continue;
            }
            let at = u64::from(e) * SECTOR + 4 * j as u64;
            let grain_no = i as u64 * COWD_GTES + j as u64;
            let s = u64::from(g);
            if s + u64::from(h.grain_size) > fsect {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} lies past the end of the file"),
                );
            } else if meta
                .iter()
                .any(|&(a, b)| s < b && s + u64::from(h.grain_size) > a)
            {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} overlaps metadata"),
                );
            }
            if let Some(prev) = used.insert(g, grain_no) {
                r.add(
                    path,
                    at,
                    Severity::Corruption,
                    format!("grain {grain_no} at sector {s} is also grain {prev}"),
                );
            }
        }
    }
    // Leaks: sectors no header, directory, table or grain covers.
    let mut spans: Vec<(u64, u64)> = meta.clone();
    spans.extend(
        used.keys()
            .map(|&g| (u64::from(g), u64::from(g) + u64::from(h.grain_size))),
    );
    spans.sort_unstable();
    let mut covered_to = 0u64;
    let mut leaked = 0u64;
    let mut first_leak = None;
    for (a, b) in spans {
        if a > covered_to {
            leaked += a.min(fsect) - covered_to.min(fsect);
            first_leak.get_or_insert(covered_to);
        }
        covered_to = covered_to.max(b);
    }
    if covered_to < fsect {
        leaked += fsect - covered_to;
        first_leak.get_or_insert(covered_to);
    }
    if leaked > 0 {
        let idx = r.add(
            path,
            first_leak.unwrap_or(0) * SECTOR,
            Severity::Leak,
            format!(
                "{} sectors ({} bytes) allocated but referenced by nothing",
                leaked,
                leaked * SECTOR
            ),
        );
        let tail_only = leaked == fsect.saturating_sub(covered_to);
        let clean = !r
            .findings
            .iter()
            .any(|x| x.file == path && x.severity == Severity::Corruption);
        if repair && tail_only && clean {
            // A leaked tail (a crash after allocating, before the table update) is cut.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io("open for writing", path, 0, e))?;
            f.set_len(covered_to * SECTOR)
                .map_err(|e| Error::io("truncate", path, covered_to * SECTOR, e))?;
            f.sync_all().map_err(|e| Error::io("flush", path, 0, e))?;
            r.findings[idx].repaired = true;
        } else {
            r.leaked_bytes += leaked * SECTOR;
        }
    }
    if u64::from(h.free_sector) > fsect + 1 {
        r.add(
            path,
            28,
            Severity::Warning,
            format!(
                "freeSector {} is past the end of the file ({fsect} sectors)",
                h.free_sector
            ),
        );
    }
    if h.unclean_shutdown {
        r.add(path, 0x670, Severity::Warning, "unclean-shutdown flag set");
    }
    Ok(())
}
