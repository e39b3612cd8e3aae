//! Sinks: the consumers of the copy engine. Each adapts units, in address order, to the
//! calls of a format writer or to plain files: a stream ([`StreamWriter`]), sparse
//! extents in files, flat files with holes, and sequential outputs (raw content, sparse
//! files laid out by a zero-scan pass, tar streams of several files).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::sparse::{
    embedded_sectors, sector_entry, GrainEntries, SparseLayout, SparseWriter, SECTOR,
};
use crate::format::stream::StreamWriter;
use crate::io::write_error;
use crate::output::AtomicFile;

use super::{OutputFile, Piece, Unit, GRAIN};

/// How flat outputs are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Holes where the content is zero (thin).
    #[default]
    Thin,
    /// Every block allocated (fallocate), zeros not written (zeroedthick).
    Allocate,
    /// Every byte written (eagerzeroedthick).
    WriteZeros,
}

/// What a copy wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct CopyReport {
    /// Files written (empty for a writer).
    pub files: Vec<PathBuf>,
    /// Bytes of output.
    pub bytes_out: u64,
    /// Grains of data written.
    pub grains: u64,
    /// Zeroed grain entries written (increments).
    pub zeroed_grains: u64,
    /// CRC-32 of the whole content, when asked for (`ExportOptions::checksum`) or
    /// computed for a manifest.
    pub crc32: Option<u32>,
}

/// Consumes a copy's pieces in address order.
pub trait Sink: Send {
    /// Take unit `u` and its piece.
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()>;
    /// Complete the output(s).
    fn finish(&mut self) -> Result<CopyReport>;
}

/// Counts bytes through a writer and names it in errors.
struct CountingWriter {
    w: Box<dyn Write + Send>,
    pos: u64,
    name: PathBuf,
    /// For a file: start its writeback as it grows.
    behind: Option<crate::output::WriteBehind>,
}

impl CountingWriter {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| write_error(&self.name, self.pos, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }
    fn zeros(&mut self, n: u64) -> Result<()> {
        for z in crate::io::zero_chunks(n) {
            self.write(z)?;
        }
        Ok(())
    }
    fn pad_to(&mut self, boundary: u64) -> Result<()> {
        let r = self.pos % boundary;
        if r != 0 {
            self.zeros(boundary - r)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| write_error(&self.name, self.pos, e))
    }
}

impl Write for CountingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.pos += n as u64;
        if let Some(wb) = &mut self.behind {
            wb.advance(self.pos);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// streamOptimized, VMware layout, strictly sequential: the stream writer fed by the engine: records were compressed in parallel.
///
/// For an increment (`delta`), every unit the plan reads is a grain the top layer holds:
/// its zero grains become zeroed grain entries (they must hide the parent on restore);
/// units not read belong to the parent and are left out.
struct StreamSink {
    w: Option<StreamWriter<CountingWriter>>,
    delta: bool,
}

impl StreamSink {
    fn new(
        out: CountingWriter,
        capacity: u64,
        descriptor: &[u8],
        delta: bool,
    ) -> Result<StreamSink> {
        let name = out.name.clone();
        Ok(StreamSink {
            w: Some(StreamWriter::with_zeroed(
                out, capacity, descriptor, &name, delta,
            )?),
            delta,
        })
    }
}

impl Sink for StreamSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        let w = self.w.as_mut().expect("open until finish");
        let first = u.start / GRAIN;
        match p {
            Piece::Hole if self.delta && u.read => {
                for g in first..(u.start + u.len).div_ceil(GRAIN) {
                    w.write_zeroed(g)?;
                }
            }
            Piece::Hole => {}
            Piece::Data {
                nonzero, records, ..
            } => {
                let mut recs = records.iter();
                for (i, nz) in nonzero.iter().enumerate() {
                    if *nz {
                        let rec = recs.next().expect("one record per nonzero grain");
                        w.write_record(first + i as u64, rec)?;
                    } else if self.delta {
                        w.write_zeroed(first + i as u64)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<CopyReport> {
        let w = self.w.take().expect("finish once");
        let zeroed = w.zeroed();
        let (_, bytes_out, grains) = w.finish()?;
        Ok(CopyReport {
            files: vec![],
            bytes_out,
            grains,
            zeroed_grains: zeroed,
            crc32: None,
        })
    }
}

/// A file written under a temporary name, kept until every output is complete.
struct WrittenFile(AtomicFile);

fn commit_all(pending: Vec<WrittenFile>, force: bool) -> Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = Vec::new();
    // Extents first, the descriptor (pushed last) last: an interrupted rename sequence
    // never leaves a descriptor pointing at missing extents. A rename that fails takes
    // back the files already renamed: no partial output stays behind.
    for p in pending {
        let target = p.0.target().to_path_buf();
        if let Err(e) = p.0.commit(force) {
            let _ = crate::output::remove_durably(&names);
            return Err(e);
        }
        names.push(target);
    }
    Ok(names)
}

/// Sparse extents written to files: grains first, tables last.
struct SparseFileSink {
    pieces: Vec<OutputFile>,
    dir: PathBuf,
    embedded: Option<Vec<u8>>,
    descriptor_file: Option<(PathBuf, Vec<u8>)>,
    /// The extent being written: its index, its file, its writer.
    cur: Option<(usize, AtomicFile, SparseWriter)>,
    /// Writeback of the current extent, started as it grows.
    behind: Option<crate::output::WriteBehind>,
    next: usize,
    pending: Vec<WrittenFile>,
    force: bool,
    report: CopyReport,
}

impl SparseFileSink {
    fn open_next(&mut self) -> Result<()> {
        let i = self.next;
        let p = &self.pieces[i];
        let f = AtomicFile::create(&crate::io::join_in(&self.dir, &p.name), self.force)?;
        let file = f
            .file()
            .try_clone()
            .map_err(|e| Error::io("open", f.tmp_path(), 0, e))?;
        self.behind = crate::output::WriteBehind::new(&file);
        let w = SparseWriter::new(file, p.len, self.embedded.as_deref(), f.tmp_path());
        self.cur = Some((i, f, w));
        self.next += 1;
        Ok(())
    }

    fn close_cur(&mut self) -> Result<()> {
        if let Some((_, f, w)) = self.cur.take() {
            let (_, size, _) = w.finish()?;
            self.report.bytes_out += size;
            self.pending.push(WrittenFile(f));
        }
        Ok(())
    }

    /// Make the extent containing `pos` current (closing and creating those before it).
    fn seek_extent(&mut self, pos: u64) -> Result<()> {
        loop {
            if let Some((i, ..)) = &self.cur {
                let p = &self.pieces[*i];
                if pos < p.start + p.len {
                    return Ok(());
                }
                self.close_cur()?;
            }
            if self.next >= self.pieces.len() {
                return Ok(());
            }
            self.open_next()?;
        }
    }
}

impl Sink for SparseFileSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.seek_extent(u.start)?;
        let Piece::Data { buf, nonzero, .. } = p else {
            return Ok(());
        };
        let (i, _, w) = self.cur.as_mut().expect("an extent covers every unit");
        let base = self.pieces[*i].start;
        let mut g = 0;
        while g < nonzero.len() {
            if !nonzero[g] {
                g += 1;
                continue;
            }
            let run_start = g;
            while g < nonzero.len() && nonzero[g] {
                g += 1;
            }
            let first = (u.start - base) / GRAIN + run_start as u64;
            let from = run_start * GRAIN as usize;
            let to = (g * GRAIN as usize).min(buf.len());
            w.write_grains(first, &buf[from..to])?;
            self.report.grains += (g - run_start) as u64;
        }
        if let Some(wb) = &mut self.behind {
            wb.advance(w.file_bytes());
        }
        // Tables wholly before this unit's end are complete: written and forgotten.
        w.flush_tables_before((u.start + u.len - base) / GRAIN)
    }

    fn finish(&mut self) -> Result<CopyReport> {
        self.seek_extent(u64::MAX)?;
        self.close_cur()?;
        let mut pending = std::mem::take(&mut self.pending);
        if let Some((path, text)) = self.descriptor_file.take() {
            let f = AtomicFile::create(&path, self.force)?;
            f.file()
                .write_all_at(&text, 0)
                .map_err(|e| write_error(f.tmp_path(), 0, e))?;
            self.report.bytes_out += text.len() as u64;
            pending.push(WrittenFile(f));
        }
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
}

/// Flat extents (or one raw file) written to files with holes.
struct FlatFileSink {
    prealloc: Prealloc,
    pieces: Vec<OutputFile>,
    dir: PathBuf,
    files: Vec<Option<AtomicFile>>,
    /// Writeback of each file, started as the copy passes.
    behind: Vec<Option<crate::output::WriteBehind>>,
    descriptor_file: Option<(PathBuf, Vec<u8>)>,
    force: bool,
    report: CopyReport,
}

impl FlatFileSink {
    fn file(&mut self, i: usize) -> Result<&AtomicFile> {
        if self.files[i].is_none() {
            let f = AtomicFile::create(
                &crate::io::join_in(&self.dir, &self.pieces[i].name),
                self.force,
            )?;
            if self.prealloc != Prealloc::Thin {
                allocate(f.file(), f.tmp_path(), self.pieces[i].len)?;
            }
            self.files[i] = Some(f);
        }
        Ok(self.files[i].as_ref().expect("just opened"))
    }

    /// Write `buf` at virtual offset `pos`, across extents as needed.
    fn write_virtual(&mut self, buf: &[u8], pos: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let j = self.pieces.partition_point(|x| x.start + x.len <= at);
            let (pb, pl) = (self.pieces[j].start, self.pieces[j].len);
            let n = (buf.len() - done).min((pb + pl - at) as usize);
            let f = self.file(j)?;
            f.file()
                .write_all_at(&buf[done..done + n], at - pb)
                .map_err(|e| write_error(f.tmp_path(), at - pb, e))?;
            if self.behind[j].is_none() {
                self.behind[j] = self.files[j]
                    .as_ref()
                    .and_then(|f| crate::output::WriteBehind::new(f.file()));
            }
            if let Some(wb) = &mut self.behind[j] {
                wb.advance(at - pb + n as u64);
            }
            done += n;
        }
        Ok(())
    }
}

/// Allocate `len` bytes of a file (fallocate); where the filesystem cannot, the file is
/// only sized (by `set_len` later). A full disk is an error.
pub fn allocate(f: &std::fs::File, path: &std::path::Path, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(l) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    if l == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a valid, open, writable fd; no memory is touched.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, l) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(write_error(path, 0, e));
        }
    }
    Ok(())
}

impl Sink for FlatFileSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        if self.prealloc == Prealloc::WriteZeros {
            // eagerzeroedthick: every byte written, zeros too.
            match p {
                Piece::Data { buf, .. } => self.write_virtual(buf, u.start)?,
                Piece::Hole => {
                    let z = vec![0u8; (1 << 20).min(u.len) as usize];
                    let mut done = 0;
                    while done < u.len {
                        let n = (u.len - done).min(z.len() as u64) as usize;
                        self.write_virtual(&z[..n], u.start + done)?;
                        done += n as u64;
                    }
                }
            }
            return Ok(());
        }
        let Piece::Data { buf, nonzero, .. } = p else {
            return Ok(());
        };
        let mut g = 0;
        while g < nonzero.len() {
            if !nonzero[g] {
                g += 1;
                continue;
            }
            let s = g;
            while g < nonzero.len() && nonzero[g] {
                g += 1;
            }
            let from = s * GRAIN as usize;
            let to = (g * GRAIN as usize).min(buf.len());
            self.write_virtual(&buf[from..to], u.start + from as u64)?;
            self.report.grains += (g - s) as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<CopyReport> {
        let mut pending = Vec::new();
        for i in 0..self.files.len() {
            self.file(i)?;
            let f = self.files[i].take().expect("opened");
            let len = self.pieces[i].len;
            f.file()
                .set_len(len)
                .map_err(|e| write_error(f.tmp_path(), len, e))?;
            pending.push(WrittenFile(f));
        }
        if let Some((path, text)) = self.descriptor_file.take() {
            let f = AtomicFile::create(&path, self.force)?;
            f.file()
                .write_all_at(&text, 0)
                .map_err(|e| write_error(f.tmp_path(), 0, e))?;
            pending.push(WrittenFile(f));
        }
        self.report.bytes_out = self.pieces.iter().map(|p| p.len).sum();
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
}

/// A tar member header (ustar; sizes past 8 GiB use the base-256 extension that GNU tar
/// and bsdtar read).
fn tar_header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512]> {
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
fn sparse_member_runs(p: &OutputFile, bits: &[u64]) -> Option<Vec<(u64, u64)>> {
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
fn sparse_member_head(name: &str, size: u64, runs: &[(u64, u64)], mtime: u64) -> Result<Vec<u8>> {
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

/// Sequential outputs built from known extent sizes: raw content, flat extents in tar,
/// sparse extents (tables computed by the zero-scan pass) alone or in tar.
struct SeqSink {
    out: CountingWriter,
    pieces: Vec<OutputFile>,
    /// Per piece: for sparse, (layout, gtes, allocated grains); None for flat.
    sparse: Vec<Option<(SparseLayout, GrainEntries, u64)>>,
    /// Per flat piece in a tar: its data runs (piece-relative offset, length), sent as a
    /// GNU sparse member; None: sent whole.
    holes: Vec<Option<Vec<(u64, u64)>>>,
    embedded: Option<Vec<u8>>,
    tar: bool,
    mtime: u64,
    cur: Option<usize>,
    /// Position inside the current piece (flat: virtual bytes written; sparse: grains).
    done: u64,
    grains: u64,
}

impl SeqSink {
    fn begin(&mut self, i: usize) -> Result<()> {
        let p = &self.pieces[i];
        match &self.sparse[i] {
            Some((layout, gtes, k)) => {
                if self.tar {
                    let h = tar_header(&p.name, layout.file_bytes(*k), self.mtime)?;
                    self.out.write(&h)?;
                }
                // In order, the gaps (empty tables, padding) streamed as zeros.
                let mut pos = 0u64;
                let out = &mut self.out;
                layout.for_each_metadata_write(gtes, self.embedded.as_deref(), |at, bytes| {
                    out.zeros(at - pos)?;
                    out.write(bytes)?;
                    pos = at + bytes.len() as u64;
                    Ok(())
                })?;
                self.out.zeros(layout.over_head * SECTOR - pos)?;
            }
            None => match &self.holes[i] {
                Some(runs) => {
                    let head = sparse_member_head(&p.name, p.len, runs, self.mtime)?;
                    self.out.write(&head)?;
                }
                None if self.tar => {
                    let h = tar_header(&p.name, p.len, self.mtime)?;
                    self.out.write(&h)?;
                }
                None => {}
            },
        }
        self.cur = Some(i);
        self.done = 0;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let Some(i) = self.cur.take() else {
            return Ok(());
        };
        match &self.sparse[i] {
            Some((_, _, k)) => {
                if self.done != *k {
                    return Err(Error::InvalidInput(format!(
                        "the source changed between the zero-scan pass and the write pass ({} grains planned, {} found in extent {})",
                        k, self.done, self.pieces[i].name
                    )));
                }
            }
            None => match &self.holes[i] {
                Some(runs) => {
                    let planned: u64 = runs.iter().map(|r| r.1).sum();
                    if self.done != planned {
                        return Err(Error::InvalidInput(format!(
                            "the source changed between the zero-scan pass and the write pass ({planned} bytes of data planned, {} found in `{}`)",
                            self.done, self.pieces[i].name
                        )));
                    }
                }
                None => {
                    let rest = self.pieces[i].len - self.done;
                    self.out.zeros(rest)?;
                }
            },
        }
        if self.tar {
            self.out.pad_to(512)?;
        }
        Ok(())
    }

    fn seek_piece(&mut self, pos: u64) -> Result<()> {
        loop {
            let next = match self.cur {
                Some(i) if pos < self.pieces[i].start + self.pieces[i].len => return Ok(()),
                Some(i) => i + 1,
                None => 0,
            };
            self.end()?;
            if next >= self.pieces.len() {
                return Ok(());
            }
            self.begin(next)?;
        }
    }
}

impl Sink for SeqSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.seek_piece(u.start)?;
        let i = self.cur.expect("a piece covers every unit");
        let base = self.pieces[i].start;
        if self.sparse[i].is_some() {
            let Piece::Data { buf, nonzero, .. } = p else {
                return Ok(());
            };
            for (g, chunk) in buf.chunks(GRAIN as usize).enumerate() {
                if nonzero[g] {
                    self.out.write(chunk)?;
                    self.out.zeros(GRAIN - chunk.len() as u64)?;
                    self.done += 1;
                    self.grains += 1;
                }
            }
        } else if self.holes[i].is_some() {
            // A GNU sparse member: only the data grains' bytes, in order.
            let Piece::Data { buf, nonzero, .. } = p else {
                return Ok(());
            };
            for (g, chunk) in buf.chunks(GRAIN as usize).enumerate() {
                if nonzero[g] {
                    self.out.write(chunk)?;
                    self.done += chunk.len() as u64;
                    self.grains += 1;
                }
            }
        } else {
            let at = u.start - base;
            self.out.zeros(at - self.done)?;
            match p {
                Piece::Data { buf, nonzero, .. } => {
                    self.out.write(buf)?;
                    self.grains += nonzero.iter().filter(|&&n| n).count() as u64;
                }
                Piece::Hole => self.out.zeros(u.len)?,
            }
            self.done = at + u.len;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<CopyReport> {
        self.seek_piece(u64::MAX)?;
        self.end()?;
        if self.tar {
            self.out.zeros(1024)?;
        }
        self.out.flush()?;
        Ok(CopyReport {
            files: vec![],
            bytes_out: self.out.pos,
            grains: self.grains,
            ..Default::default()
        })
    }
}

/// A single-file stream output: commit the temporary file after the stream is complete.
struct StreamFileSink {
    inner: StreamSink,
    file: Option<AtomicFile>,
    force: bool,
}

impl Sink for StreamFileSink {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        self.inner.put(u, p)
    }
    fn finish(&mut self) -> Result<CopyReport> {
        let mut r = self.inner.finish()?;
        let f = self.file.take().expect("finish once");
        r.files = vec![f.target().to_path_buf()];
        f.commit(self.force)?;
        Ok(r)
    }
}

/// What output files hold.
#[derive(Debug, Clone)]
pub enum FileKind {
    /// One streamOptimized file with this descriptor embedded.
    Stream {
        /// The descriptor text.
        descriptor: Vec<u8>,
        /// An increment: zero grains the plan reads become zeroed entries.
        delta: bool,
    },
    /// Hosted sparse extents (with this descriptor embedded, for a monolithic file).
    Sparse {
        /// The embedded descriptor, if any.
        embedded: Option<Vec<u8>>,
    },
    /// Flat files (raw content) allocated as `prealloc` says.
    Flat {
        /// Holes, allocated blocks or written zeros.
        prealloc: Prealloc,
    },
}

/// A sink writing `files` (ranges of a disk of `capacity` bytes) into `dir`, each under a
/// temporary name until all are complete, then `descriptor_file` (path, text) last.
pub fn to_files(
    kind: FileKind,
    capacity: u64,
    dir: PathBuf,
    files: Vec<OutputFile>,
    descriptor_file: Option<(PathBuf, Vec<u8>)>,
    force: bool,
) -> Result<Box<dyn Sink>> {
    Ok(match kind {
        FileKind::Stream { descriptor, delta } => {
            let f = AtomicFile::create(&crate::io::join_in(&dir, &files[0].name), force)?;
            let w = f
                .file()
                .try_clone()
                .map_err(|e| Error::io("open", f.tmp_path(), 0, e))?;
            let out = CountingWriter {
                behind: crate::output::WriteBehind::new(&w),
                w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
                pos: 0,
                name: f.tmp_path().to_path_buf(),
            };
            Box::new(StreamFileSink {
                inner: StreamSink::new(out, capacity, &descriptor, delta)?,
                file: Some(f),
                force,
            })
        }
        FileKind::Sparse { embedded } => Box::new(SparseFileSink {
            pieces: files,
            dir,
            embedded,
            descriptor_file,
            cur: None,
            behind: None,
            next: 0,
            pending: vec![],
            force,
            report: CopyReport::default(),
        }),
        FileKind::Flat { prealloc } => Box::new(FlatFileSink {
            prealloc,
            files: files.iter().map(|_| None).collect(),
            behind: files.iter().map(|_| None).collect(),
            pieces: files,
            dir,
            descriptor_file,
            force,
            report: CopyReport::default(),
        }),
    })
}

/// What a sequential output holds.
#[derive(Debug, Clone)]
pub enum SeqKind {
    /// A streamOptimized file with this descriptor.
    Stream {
        /// The descriptor text.
        descriptor: Vec<u8>,
        /// An increment (see [`FileKind::Stream`]).
        delta: bool,
    },
    /// `files` one after the other: raw content, or hosted sparse extents laid out from a
    /// zero-scan bitmap (`nonzero_grains`, one bit per 64 KiB grain); with `tar`, as a
    /// ustar stream of the descriptor and every file.
    Files {
        /// The files.
        files: Vec<OutputFile>,
        /// The zero-scan bitmap: sparse extents are laid out from it; flat files in a tar
        /// become GNU sparse members (holes not sent).
        nonzero_grains: Option<Vec<u64>>,
        /// The files are hosted sparse extents (else flat).
        sparse_extents: bool,
        /// The embedded descriptor of a monolithic sparse file.
        embedded: Option<Vec<u8>>,
        /// (descriptor name, descriptor text, mtime of the members) for a tar stream.
        tar: Option<(String, Vec<u8>, u64)>,
    },
}

/// A sink writing to a non-seekable writer (a pipe).
pub fn to_writer(w: Box<dyn Write + Send>, kind: SeqKind, capacity: u64) -> Result<Box<dyn Sink>> {
    let mut out = CountingWriter {
        behind: None,
        w: Box::new(std::io::BufWriter::with_capacity(1 << 20, w)),
        pos: 0,
        name: PathBuf::from("<stdout>"),
    };
    let kind_parts = match kind {
        SeqKind::Stream { descriptor, delta } => {
            return Ok(Box::new(StreamSink::new(
                out,
                capacity,
                &descriptor,
                delta,
            )?))
        }
        SeqKind::Files {
            files,
            nonzero_grains,
            sparse_extents,
            embedded,
            tar,
        } => (files, nonzero_grains, embedded, tar, sparse_extents),
    };
    let (files, nonzero_grains, embedded, tar, sparse_extents) = kind_parts;
    let holes = match (&nonzero_grains, &tar) {
        (Some(bits), Some(_)) if !sparse_extents => {
            files.iter().map(|p| sparse_member_runs(p, bits)).collect()
        }
        _ => vec![None; files.len()],
    };
    let sparse = match nonzero_grains.filter(|_| sparse_extents) {
        Some(bits) => {
            let desc_sectors = embedded.as_deref().map_or(0, embedded_sectors);
            files
                .iter()
                .map(|p| sparse_plan(p, desc_sectors, &bits).map(Some))
                .collect::<Result<Vec<_>>>()?
        }
        None => vec![None; files.len()],
    };
    let mtime = tar.as_ref().map_or(0, |t| t.2);
    if let Some((name, d, mtime)) = &tar {
        out.write(&tar_header(name, d.len() as u64, *mtime)?)?;
        out.write(d)?;
        out.pad_to(512)?;
    }
    Ok(Box::new(SeqSink {
        out,
        pieces: files,
        sparse,
        holes,
        embedded,
        tar: tar.is_some(),
        mtime,
        cur: None,
        done: 0,
        grains: 0,
    }))
}

/// The layout and grain-table entries of sparse extent `p`, from a zero-scan bitmap.
fn sparse_plan(
    p: &OutputFile,
    desc_sectors: u64,
    bits: &[u64],
) -> Result<(SparseLayout, GrainEntries, u64)> {
    let layout = SparseLayout::new(p.len / SECTOR, desc_sectors);
    let mut gtes = GrainEntries::new(layout.gtes);
    let mut k = 0u64;
    let g0 = p.start / GRAIN;
    for j in 0..layout.num_grains {
        let g = g0 + j;
        if bits[(g / 64) as usize] >> (g % 64) & 1 == 1 {
            let e = sector_entry(std::path::Path::new(&p.name), layout.grain_sector(k))?;
            gtes.set(j, e);
            k += 1;
        }
    }
    Ok((layout, gtes, k))
}
