//! Reading disks strictly sequentially from a pipe (import from stdin): streamOptimized
//! (VMware's layout with markers and footer, and qemu's with tables up front), hosted
//! sparse files whose tables come before their grains (what export and `qemu-img convert`
//! write), and the tar stream `export` writes for split and flat formats.
//!
//! Every reader hands out `(virtual offset, bytes)` pieces in ascending order; memory is
//! bounded by one batch of grains (plus, for uncompressed sparse streams, 8 bytes per
//! allocated grain of the index built from the tables).

use std::io::Read;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, ExtentType, MAX_DESCRIPTOR_BYTES};
use crate::format::sparse::{SparseHeader, GD_AT_END, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR};

mod inflate;
use inflate::Inflater;
pub use inflate::{Out, PutUnit};

/// Receives content pieces in ascending offset order.
pub type Emit<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<()>;

/// A reader that counts bytes, for error offsets.
pub struct Counted<'a> {
    r: &'a mut dyn Read,
    /// Bytes consumed.
    pub pos: u64,
    name: &'a Path,
}

impl<'a> Counted<'a> {
    /// Wrap a reader; `name` is used in errors.
    pub fn new(r: &'a mut dyn Read, name: &'a Path) -> Counted<'a> {
        Counted { r, pos: 0, name }
    }

    /// Fill `buf`; returns false at a clean end of input before any byte.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => {
                    if n == 0 {
                        return Ok(false);
                    }
                    return Err(Error::corrupt(
                        self.name,
                        self.pos,
                        format!("input ends in the middle of a {}-byte record", buf.len()),
                    ));
                }
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.name, self.pos, e)),
            }
        }
        Ok(true)
    }

    /// Fill `buf` or fail.
    pub fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        if !self.fill(buf)? {
            return Err(Error::corrupt(self.name, self.pos, "input ends early"));
        }
        Ok(())
    }

    /// Append exactly `n` bytes to `v` or fail (the new bytes are not zeroed first).
    pub fn append(&mut self, v: &mut Vec<u8>, n: u64) -> Result<()> {
        v.reserve(n as usize);
        let mut left = n;
        while left > 0 {
            match (&mut self.r).take(left).read_to_end(v) {
                Ok(0) => {
                    return Err(Error::corrupt(
                        self.name,
                        self.pos,
                        format!("input ends in the middle of a record, {left} bytes short"),
                    ))
                }
                Ok(k) => {
                    left -= k as u64;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.name, self.pos, e)),
            }
        }
        Ok(())
    }

    /// Skip forward to absolute position `to`.
    pub fn skip_to(&mut self, to: u64) -> Result<()> {
        if to < self.pos {
            return Err(Error::unsupported(
                self.name,
                format!("the data needs to go back to byte {to:#x} (at {:#x}); a pipe cannot: pass the file instead", self.pos),
            ));
        }
        let mut left = to - self.pos;
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.exact(&mut buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Read to the end (so the writer upstream does not see a broken pipe).
    pub fn drain(&mut self) {
        let _ = std::io::copy(&mut self.r, &mut std::io::sink());
    }
}

/// Read the descriptor area of a sparse stream (after the header sector).
fn read_embedded(r: &mut Counted<'_>, h: &SparseHeader) -> Result<Option<Descriptor>> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let start = h.descriptor_offset.saturating_mul(SECTOR);
    let size = h
        .descriptor_size
        .saturating_mul(SECTOR)
        .min(MAX_DESCRIPTOR_BYTES as u64);
    r.skip_to(start)?;
    let mut b = vec![0u8; size as usize];
    r.exact(&mut b)?;
    Ok(Descriptor::parse(&b, r.name).ok())
}

/// The header of a sparse stream, already read (`first` = sector 0).
pub fn parse_first(first: &[u8; 512], name: &Path) -> Result<SparseHeader> {
    let src = crate::io::Source::from_bytes(first.to_vec(), &name.to_string_lossy());
    // A header alone: validate fields without touching the rest.
    let h = SparseHeader::parse(first).ok_or_else(|| {
        Error::corrupt(
            name,
            0,
            format!(
                "bad magic: not a VMDK stream; {}",
                crate::format::detect::not_a_vmdk_hint(first, &[])
            ),
        )
    })?;
    h.validate(&src)?;
    Ok(h)
}

/// Read a streamOptimized stream (after its first sector `h`), emitting grains at
/// `base + lba*512`. Grains are inflated in parallel batches.
pub fn read_stream(
    r: &mut Counted<'_>,
    h: &SparseHeader,
    base: u64,
    emit: Emit<'_>,
) -> Result<Option<Descriptor>> {
    read_stream_zeroed(r, h, base, emit, None)
}

/// Receives zeroed ranges `(virtual offset, length)`.
pub type EmitZeroed<'a> = &'a mut dyn FnMut(u64, u64) -> Result<()>;

/// Like [`read_stream`]; with `zeroed`, a stream whose header enables zeroed-grain
/// entries (flag bit 2, what `export --delta` writes) also reports its zeroed grains.
/// They are only in the grain tables, which VMware's layout writes after their grains
/// with no index of their own: the GD at the end says which table is which, so the
/// zeroed entries of each table are kept (by the table's sector) until the GD arrives,
/// and reported then, after every data grain.
///
/// A stream whose header puts the GD at the end (VMware's layout) must end with its
/// footer: one that stops before is truncated and refused, never read as complete.
pub fn read_stream_zeroed(
    r: &mut Counted<'_>,
    h: &SparseHeader,
    base: u64,
    emit: Emit<'_>,
    zeroed: Option<EmitZeroed<'_>>,
) -> Result<Option<Descriptor>> {
    read_stream_on(None, r, h, base, emit, zeroed)
}

/// Like [`read_stream_zeroed`], inflating each batch of grains on `pool` (the caller's
/// `--threads`; the global pool without one). The caller must not be a worker of `pool`
/// that others wait on.
pub fn read_stream_on(
    pool: Option<&rayon::ThreadPool>,
    r: &mut Counted<'_>,
    h: &SparseHeader,
    base: u64,
    emit: Emit<'_>,
    zeroed: Option<EmitZeroed<'_>>,
) -> Result<Option<Descriptor>> {
    read_stream_to(pool, r, h, base, Out::Pieces(emit), zeroed)
}

/// Like [`read_stream_on`] (at offset 0, no zeroed grains), handing out whole units of
/// `unit` bytes with the grains inflated in place (see [`Out::Units`]): the engine's
/// input without a copy. `unit` must be a multiple of the stream's grain size
/// ([`units_fit`]).
pub fn read_stream_units(
    pool: Option<&rayon::ThreadPool>,
    r: &mut Counted<'_>,
    h: &SparseHeader,
    unit: usize,
    put: PutUnit<'_>,
) -> Result<Option<Descriptor>> {
    read_stream_to(pool, r, h, 0, Out::Units(unit, put), None)
}

/// Whether units of `unit` bytes hold whole grains of `h`'s stream.
pub fn units_fit(h: &SparseHeader, unit: u64) -> bool {
    let grain = h.grain_size * SECTOR;
    unit >= grain && unit % grain == 0
}

fn read_stream_to(
    pool: Option<&rayon::ThreadPool>,
    r: &mut Counted<'_>,
    h: &SparseHeader,
    base: u64,
    out: Out<'_>,
    mut zeroed: Option<EmitZeroed<'_>>,
) -> Result<Option<Descriptor>> {
    if !h.markers() {
        return Err(Error::unsupported(r.name, "a compressed stream without grain markers cannot be read from a pipe; pass the file instead"));
    }
    let desc = read_embedded(r, h)?;
    r.skip_to(h.over_head.saturating_mul(SECTOR).max(SECTOR))?;
    let grain = (h.grain_size * SECTOR) as usize;
    let cap = h.capacity_sectors * SECTOR;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut last: Option<u64> = None;
    let mut inflater = Inflater::new(pool, grain, cap, base, r.name, out)?;
    let mut sector = [0u8; 512];
    let needs_footer = h.gd_offset == GD_AT_END;
    let mut saw_footer = false;
    let want_zeroed = zeroed.is_some() && h.zero_grain();
    // Tables holding zeroed entries, by the sector they start at: the GD names them.
    let mut zero_tables: std::collections::HashMap<u64, Vec<u16>> = Default::default();
    // Stored grains (ascending, as records must come) and zeroed runs seen, to refuse a
    // grain that is both.
    let mut stored_lbas: Vec<u64> = Vec::new();
    let mut zeroed_runs: Vec<(u64, u64)> = Vec::new();
    loop {
        if !r.fill(&mut sector)? {
            break;
        }
        let at = r.pos - 512;
        let val = LE::read_u64(&sector[0..8]);
        let size = u64::from(LE::read_u32(&sector[8..12]));
        if size == 0 {
            let kind = LE::read_u32(&sector[12..16]);
            if kind == 0 {
                break; // end-of-stream marker (or qemu's zero tail)
            }
            match kind {
                MARKER_GT if want_zeroed => {
                    let entries = read_table_zeroed(r, h, val, at)?;
                    if !entries.is_empty() {
                        zero_tables.insert(at / SECTOR + 1, entries);
                    }
                }
                MARKER_GD if want_zeroed => {
                    inflater.push(std::mem::take(&mut batch))?;
                    inflater.drain()?;
                    let z = zeroed.as_mut().expect("want_zeroed");
                    let name = r.name;
                    // A grain both zeroed (table entry 1) and stored (a record) is
                    // corrupt input: which one is meant cannot be known.
                    let stored = &stored_lbas;
                    read_directory_zeroed(
                        r,
                        h,
                        val,
                        at,
                        base,
                        &mut zero_tables,
                        &mut |off, len| {
                            let lo = (off - base) / SECTOR;
                            let hi = (off + len - base) / SECTOR;
                            let i = stored.partition_point(|&l| l < lo);
                            if stored.get(i).is_some_and(|&l| l < hi) {
                                return Err(Error::corrupt(
                                name,
                                at,
                                format!(
                                    "grain at LBA {} is both zeroed in its grain table and stored as a record",
                                    stored[i]
                                ),
                            ));
                            }
                            zeroed_runs.push((lo, hi));
                            z(off, len)
                        },
                    )?;
                }
                _ => {
                    saw_footer |= kind == MARKER_FOOTER;
                    // GT, GD, footer and progress markers: skip what follows.
                    r.skip_to(r.pos + val.saturating_mul(SECTOR).min(1 << 30))?;
                }
            }
            continue;
        }
        let (lba, rec) = next_record(r, h, &sector, at, &mut last, inflater.record_buf())?;
        if want_zeroed {
            if zeroed_runs.iter().any(|&(lo, hi)| lo <= lba && lba < hi) {
                return Err(Error::corrupt(
                    r.name,
                    at,
                    format!("grain at LBA {lba} is both zeroed in its grain table and stored as a record"),
                ));
            }
            stored_lbas.push(lba);
        }
        if batch.len() >= 64 && batch.last().is_some_and(|&(l, _)| inflater.may_cut(l, lba)) {
            inflater.push(std::mem::take(&mut batch))?;
        }
        batch.push((lba, rec));
    }
    inflater.push(std::mem::take(&mut batch))?;
    inflater.drain()?;
    if needs_footer && !saw_footer {
        return Err(Error::corrupt(
            r.name,
            r.pos,
            "the stream ends before its footer (its header puts the grain directory at the end): truncated, or cut short on the way; nothing after this point was read",
        ));
    }
    if !zero_tables.is_empty() {
        return Err(Error::corrupt(
            r.name,
            r.pos,
            format!(
                "{} grain tables with zeroed entries are not named by a grain directory",
                zero_tables.len()
            ),
        ));
    }
    Ok(desc)
}

/// The grain record whose first sector `sector` was read at `at` (its LBA checked: a
/// grain start inside the disk, after the `last` one), read whole, its 12-byte head kept
/// (`Inflater` skips it rather than copy the grain down), in `rec` (a buffer to reuse).
fn next_record(
    r: &mut Counted<'_>,
    h: &SparseHeader,
    sector: &[u8; 512],
    at: u64,
    last: &mut Option<u64>,
    mut rec: Vec<u8>,
) -> Result<(u64, Vec<u8>)> {
    let grain = h.grain_size * SECTOR;
    let cap = h.capacity_sectors * SECTOR;
    let max_cmp = 2 * grain + 4096;
    let lba = LE::read_u64(&sector[0..8]);
    let size = u64::from(LE::read_u32(&sector[8..12]));
    if size > max_cmp {
        return Err(Error::corrupt(
            r.name,
            at + 8,
            format!("compressed grain size {size} is outside 1..={max_cmp}"),
        ));
    }
    if lba % h.grain_size != 0 || lba.saturating_mul(SECTOR) >= cap {
        return Err(Error::corrupt(
            r.name,
            at,
            format!("grain record LBA {lba} is not a grain start inside the disk"),
        ));
    }
    if last.is_some_and(|l| lba <= l) {
        return Err(Error::unsupported(
            r.name,
            format!("grain records out of order at LBA {lba}; pass the file instead"),
        ));
    }
    *last = Some(lba);
    let total = (12 + size).div_ceil(SECTOR) * SECTOR;
    rec.clear();
    rec.extend_from_slice(sector);
    r.append(&mut rec, total - 512)?;
    rec.truncate(12 + size as usize);
    Ok((lba, rec))
}

/// Read the grain table after a GT marker at `at` (`val` sectors) and return the indices
/// of its zeroed entries (value 1).
fn read_table_zeroed(r: &mut Counted<'_>, h: &SparseHeader, val: u64, at: u64) -> Result<Vec<u16>> {
    let gtes = u64::from(h.num_gtes_per_gt);
    let want = (gtes * 4).div_ceil(SECTOR);
    if val != want {
        return Err(Error::corrupt(
            r.name,
            at,
            format!("grain table marker of {val} sectors; the header's tables take {want}"),
        ));
    }
    let mut t = vec![0u8; (val * SECTOR) as usize];
    r.exact(&mut t)?;
    Ok((0..gtes as usize)
        .filter(|&j| LE::read_u32(&t[j * 4..j * 4 + 4]) == 1)
        .map(|j| j as u16)
        .collect())
}

/// Read the GD after a GD marker at `at` (`val` sectors) sector by sector, reporting the
/// zeroed grains of every table in `tables` it names (consecutive grains merged).
fn read_directory_zeroed(
    r: &mut Counted<'_>,
    h: &SparseHeader,
    val: u64,
    at: u64,
    base: u64,
    tables: &mut std::collections::HashMap<u64, Vec<u16>>,
    zeroed: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let gts = h.num_gts();
    let want = (gts * 4).div_ceil(SECTOR);
    if val != want {
        return Err(Error::corrupt(
            r.name,
            at,
            format!("grain directory marker of {val} sectors; the header's directory takes {want}"),
        ));
    }
    let grain = h.grain_size * SECTOR;
    let cap = h.capacity_sectors * SECTOR;
    let gtes = u64::from(h.num_gtes_per_gt);
    let mut run: Option<(u64, u64)> = None;
    let mut sector = [0u8; 512];
    for s in 0..val {
        r.exact(&mut sector)?;
        for k in 0..128u64 {
            let i = s * 128 + k;
            if i >= gts {
                break;
            }
            let e = u64::from(LE::read_u32(&sector[k as usize * 4..k as usize * 4 + 4]));
            let Some(entries) = tables.remove(&e) else {
                continue;
            };
            for j in entries {
                let off = (i * gtes + u64::from(j)) * grain;
                if off >= cap {
                    return Err(Error::corrupt(
                        r.name,
                        e * SECTOR,
                        format!(
                            "zeroed grain {} lies past the capacity",
                            i * gtes + u64::from(j)
                        ),
                    ));
                }
                let len = grain.min(cap - off);
                run = match run {
                    Some((a, l)) if a + l == off => Some((a, l + len)),
                    Some((a, l)) => {
                        zeroed(base + a, l)?;
                        Some((off, len))
                    }
                    None => Some((off, len)),
                };
            }
        }
    }
    if let Some((a, l)) = run {
        zeroed(base + a, l)?;
    }
    Ok(())
}

/// The data of a GNU sparse 1.0 member: the map (decimal lines: count, then offset and
/// length of each run; padded to 512 bytes), then each run's bytes, emitted at `base +
/// offset`. Runs must be in order, inside `len`, and the map of sane size.
fn read_sparse_member(c: &mut Counted<'_>, base: u64, len: u64, emit: Emit<'_>) -> Result<()> {
    let bad =
        |at: u64, what: &str| Error::corrupt(c.name, at, format!("sparse tar member: {what}"));
    // The map is read a block at a time until it has all its numbers: the count on the
    // first line, then two numbers per run (newlines counted as the blocks arrive).
    let mut text = Vec::new();
    let mut block = [0u8; 512];
    let numbers = |t: &[u8]| -> Vec<u64> {
        let s = String::from_utf8_lossy(t);
        let mut v = Vec::new();
        for l in s.split('\n') {
            match l.trim_matches('\0').parse() {
                Ok(n) => v.push(n),
                Err(_) => break,
            }
        }
        v
    };
    let mut lines = 0u64;
    let mut count: Option<u64> = None;
    loop {
        if text.len() > 16 << 20 {
            return Err(bad(0, "sparse map larger than 16 MiB"));
        }
        c.exact(&mut block)?;
        text.extend_from_slice(&block);
        lines += block.iter().filter(|&&b| b == b'\n').count() as u64;
        if count.is_none() && lines > 0 {
            let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
            count = Some(
                numbers(first)
                    .first()
                    .copied()
                    .ok_or_else(|| bad(0, "no run count"))?,
            );
        }
        if count.is_some_and(|n| lines > n.saturating_mul(2)) {
            break;
        }
    }
    let v = numbers(&text);
    let n = v[0] as usize;
    if v.len() < 1 + 2 * n {
        return Err(bad(0, "map shorter than its count"));
    }
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for k in 0..n {
        let (off, l) = (v[1 + 2 * k], v[2 + 2 * k]);
        if off < at || off.checked_add(l).is_none_or(|e| e > len) {
            return Err(bad(off, "run out of order or past the file's size"));
        }
        let mut done = 0;
        while done < l {
            let m = (l - done).min(buf.len() as u64) as usize;
            c.exact(&mut buf[..m])?;
            emit(base + off + done, &buf[..m])?;
            done += m as u64;
        }
        at = off + l;
    }
    Ok(())
}

/// Read an uncompressed hosted sparse file from a pipe: its tables must come before its
/// grains, and grains must be in ascending LBA order (as export and qemu-img convert
/// write them). `limit` is the number of bytes the file has (tar members), or None.
pub fn read_sparse(
    r: &mut Counted<'_>,
    h: &SparseHeader,
    base: u64,
    emit: Emit<'_>,
) -> Result<Option<Descriptor>> {
    let name = r.name;
    if h.gd_offset == GD_AT_END {
        return Err(Error::unsupported(
            name,
            "grain directory at the end: pass the file instead",
        ));
    }
    let desc = read_embedded(r, h)?;
    let per = u64::from(h.num_gtes_per_gt);
    let num_gts = h.num_gts();
    // From a pipe the directory is held whole: cap it (256 MiB covers 64 Mi tables,
    // 2 PiB of 64 KiB grains) rather than trusting the header.
    const MAX_PIPE_DIRECTORY: u64 = 256 << 20;
    let gd_bytes = num_gts.saturating_mul(4);
    if gd_bytes > MAX_PIPE_DIRECTORY {
        return Err(Error::corrupt(
            name,
            12,
            format!(
                "a grain directory of {num_gts} entries (capacity {} sectors) is more than vmdkit reads from a pipe; pass the file instead",
                h.capacity_sectors
            ),
        ));
    }
    // Use whichever directory comes first (the redundant one, in the usual layout); its
    // tables then follow in the stream.
    let dir = if h.rgd_offset != 0 && h.rgd_offset < h.gd_offset {
        h.rgd_offset
    } else {
        h.gd_offset
    };
    if dir.saturating_mul(SECTOR) + gd_bytes > h.over_head.saturating_mul(SECTOR) {
        return Err(Error::unsupported(
            name,
            "the tables do not come before the grains; pass the file instead",
        ));
    }
    r.skip_to(dir * SECTOR)?;
    let mut raw = vec![0u8; gd_bytes as usize];
    r.exact(&mut raw)?;
    let mut gd = vec![0u32; num_gts as usize];
    LE::read_u32_into(&raw, &mut gd);
    let mut order: Vec<(u32, usize)> = gd
        .iter()
        .enumerate()
        .filter(|(_, &s)| s != 0)
        .map(|(i, &s)| (s, i))
        .collect();
    order.sort_unstable();
    // (file sector, grain index) of every allocated grain.
    let mut grains: Vec<(u32, u64)> = Vec::new();
    let mut t = vec![0u8; (per * 4) as usize];
    for (s, i) in order {
        if u64::from(s) + (per * 4).div_ceil(SECTOR) > h.over_head {
            return Err(Error::unsupported(
                name,
                "a grain table lies after the first grain; pass the file instead",
            ));
        }
        r.skip_to(u64::from(s) * SECTOR)?;
        r.exact(&mut t)?;
        for j in 0..per as usize {
            let e = LE::read_u32(&t[j * 4..j * 4 + 4]);
            let g = i as u64 * per + j as u64;
            if e >= 2 && g < h.num_grains() {
                grains.push((e, g));
            }
        }
    }
    grains.sort_unstable();
    let grain = h.grain_size * SECTOR;
    let cap = h.capacity_sectors * SECTOR;
    let mut buf = vec![0u8; grain as usize];
    let mut last: Option<u64> = None;
    for (s, g) in grains {
        if last.is_some_and(|l| g <= l) {
            return Err(Error::unsupported(
                name,
                "grains are not stored in ascending order; pass the file instead",
            ));
        }
        last = Some(g);
        r.skip_to(u64::from(s) * SECTOR)?;
        let valid = (cap - g * grain).min(grain) as usize;
        r.exact(&mut buf[..valid])?;
        emit(base + g * grain, &buf[..valid])?;
    }
    Ok(desc)
}

/// Read export's tar stream: the descriptor member first, then each extent.
pub fn read_tar(input: &mut dyn Read, name: &Path, emit: Emit<'_>) -> Result<()> {
    let mut ar = tar::Archive::new(input);
    let mut entries = ar
        .entries()
        .map_err(|e| Error::io("read tar", name, 0, e))?;
    let mut first = entries
        .next()
        .ok_or_else(|| Error::corrupt(name, 0, "empty tar stream"))?
        .map_err(|e| Error::io("read tar", name, 0, e))?;
    if first.size() > MAX_DESCRIPTOR_BYTES as u64 {
        return Err(Error::corrupt(
            name,
            0,
            "the tar stream does not start with a descriptor",
        ));
    }
    let mut text = Vec::new();
    first
        .read_to_end(&mut text)
        .map_err(|e| Error::io("read tar", name, 0, e))?;
    drop(first);
    let d = Descriptor::parse(&text, name)?;
    let lines: Vec<_> = d.extents().into_iter().cloned().collect();
    let mut starts = Vec::new();
    let mut cap = 0u64;
    for l in &lines {
        starts.push(cap);
        cap = cap
            .checked_add(
                l.sectors
                    .checked_mul(SECTOR)
                    .ok_or_else(|| Error::corrupt(name, 0, "extent size overflows"))?,
            )
            .ok_or_else(|| Error::corrupt(name, 0, "extent sizes overflow"))?;
    }
    let mut next = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io("read tar", name, 0, e))?;
        let path = entry
            .path()
            .map_err(|e| Error::io("read tar", name, 0, e))?
            .into_owned();
        let mut member = path.to_string_lossy().into_owned();
        // A GNU sparse member (format 1.0, in PAX records): the real name and size are in
        // the records, the data starts with the map of its runs.
        let mut sparse_size: Option<u64> = None;
        if let Ok(Some(exts)) = entry.pax_extensions() {
            let mut major = None;
            for e in exts.flatten() {
                match (e.key().unwrap_or(""), e.value().unwrap_or("")) {
                    ("GNU.sparse.major", v) => major = Some(v.to_string()),
                    ("GNU.sparse.name", v) => member = v.to_string(),
                    ("GNU.sparse.realsize", v) => sparse_size = v.parse().ok(),
                    _ => {}
                }
            }
            if sparse_size.is_some() && major.as_deref() != Some("1") {
                return Err(Error::unsupported(
                    name,
                    format!("tar member `{member}`: GNU sparse format other than 1.0"),
                ));
            }
        }
        let Some(i) = lines
            .iter()
            .position(|l| l.file.as_deref() == Some(member.as_str()))
        else {
            return Err(Error::corrupt(
                name,
                0,
                format!("tar member `{member}` is not an extent of the descriptor"),
            ));
        };
        if i < next {
            return Err(Error::corrupt(
                name,
                0,
                format!("tar member `{member}` out of order"),
            ));
        }
        next = i + 1;
        let base = starts[i];
        let line = &lines[i];
        let mpath = Path::new(&member);
        let mut c = Counted::new(&mut entry, mpath);
        match line.kind {
            ExtentType::Sparse => {
                let mut s = [0u8; 512];
                c.exact(&mut s)?;
                let h = parse_first(&s, mpath)?;
                if h.compressed() {
                    read_stream(&mut c, &h, base, emit)?;
                } else {
                    read_sparse(&mut c, &h, base, emit)?;
                }
            }
            ExtentType::Flat | ExtentType::Vmfs if sparse_size.is_some() => {
                let len = line.sectors.saturating_mul(SECTOR);
                if line.offset.unwrap_or(0) != 0 || sparse_size != Some(len) {
                    return Err(Error::corrupt(
                        name,
                        0,
                        format!("sparse tar member `{member}` does not match its extent line"),
                    ));
                }
                read_sparse_member(&mut c, base, len, emit)?;
            }
            ExtentType::Flat | ExtentType::Vmfs => {
                c.skip_to(line.offset.unwrap_or(0).saturating_mul(SECTOR))?;
                let len = line.sectors.saturating_mul(SECTOR);
                let mut buf = vec![0u8; 1 << 20];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    c.exact(&mut buf[..n])?;
                    emit(base + done, &buf[..n])?;
                    done += n as u64;
                }
            }
            k => {
                return Err(Error::unsupported(
                    name,
                    format!("{} extents in a tar stream", k.as_str()),
                ))
            }
        }
        c.drain();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
