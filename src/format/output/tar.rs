//! Writing tar streams (ustar; GNU sparse members, format 1.0 over PAX, for flat files
//! with holes), as GNU tar and bsdtar read them: how a multi-file output goes down a
//! pipe.

use super::{OutputFile, GRAIN};
use crate::error::{Error, Result};

/// A tar member header (ustar; sizes past 8 GiB use the base-256 extension that GNU tar
/// and bsdtar read).
pub(crate) fn tar_header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::InvalidInput(format!("cannot name tar member `{name}`: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// The data runs of flat file `p` (offset in the file, length) from a zero-scan bitmap,
/// or None when it has no hole worth a sparse member or the map would be too large
/// (then the member is sent whole).
pub(crate) fn sparse_member_runs(p: &OutputFile, bits: &[u64]) -> Option<Vec<(u64, u64)>> {
    /// Sparse maps larger than this (about 800k runs) are not worth holding.
    const MAX_MAP_BYTES: usize = 16 << 20;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut map_bytes = 0usize;
    let g0 = p.start / GRAIN;
    let grains = p.len.div_ceil(GRAIN);
    for j in 0..grains {
        let g = g0 + j;
        if bits[(g / 64) as usize] >> (g % 64) & 1 == 0 {
            continue;
        }
        let off = j * GRAIN;
        let len = GRAIN.min(p.len - off);
        match runs.last_mut() {
            Some(r) if r.0 + r.1 == off => r.1 += len,
            _ => {
                runs.push((off, len));
                map_bytes += 42;
                if map_bytes > MAX_MAP_BYTES {
                    return None;
                }
            }
        }
    }
    let data: u64 = runs.iter().map(|r| r.1).sum();
    (data < p.len).then_some(runs)
}

/// A PAX extended-header record: `LEN key=value\n`, LEN counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut n = body.len() + 1;
    while format!("{n}").len() + body.len() != n {
        n += 1;
    }
    format!("{n}{body}")
}

/// The head of a GNU sparse (format 1.0, PAX) tar member for flat file `name` of `size`
/// bytes holding data in `runs`: the PAX header naming the real file and size, the
/// ustar header of the member, and the sparse map block; the runs' bytes follow. GNU tar
/// and bsdtar restore such a member with holes where no run is.
pub(crate) fn sparse_member_head(
    name: &str,
    size: u64,
    runs: &[(u64, u64)],
    mtime: u64,
) -> Result<Vec<u8>> {
    let mut map = format!("{}\n", runs.len() + 1);
    for (o, l) in runs {
        map.push_str(&format!("{o}\n{l}\n"));
    }
    // A last, empty run at the end gives the file its full size (as GNU tar writes it).
    map.push_str(&format!("{size}\n0\n"));
    let mut map = map.into_bytes();
    map.resize(map.len().div_ceil(512) * 512, 0);
    let data: u64 = runs.iter().map(|r| r.1).sum();
    let records = [
        pax_record("GNU.sparse.major", "1"),
        pax_record("GNU.sparse.minor", "0"),
        pax_record("GNU.sparse.name", name),
        pax_record("GNU.sparse.realsize", &size.to_string()),
    ]
    .concat();
    let mut pax = tar::Header::new_ustar();
    pax.set_path(format!("PaxHeaders.0/{name}"))
        .map_err(|e| Error::InvalidInput(format!("cannot name tar member `{name}`: {e}")))?;
    pax.set_size(records.len() as u64);
    pax.set_mode(0o644);
    pax.set_mtime(mtime);
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_cksum();
    let mut out = pax.as_bytes().to_vec();
    out.extend_from_slice(records.as_bytes());
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&tar_header(
        &format!("GNUSparseFile.0/{name}"),
        map.len() as u64 + data,
        mtime,
    )?);
    out.extend_from_slice(&map);
    Ok(out)
}
