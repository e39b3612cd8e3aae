//! Sequential outputs: files of known sizes written one after another to a pipe, alone
//! (raw content, one sparse file) or as a tar stream (a descriptor and its extents).
//! Sparse files are laid out beforehand from the engine's zero-scan pass, so their
//! tables go out before their grains; flat files in a tar become GNU sparse members.

use super::tar::{sparse_member_head, tar_header};
use super::{CopyReport, CountingWriter, OutputFile, Piece, Sink, Unit, GRAIN};
use crate::error::{Error, Result};
use crate::format::sparse::{GrainEntries, SparseLayout, SECTOR};

/// How one file of a sequential output is written.
pub(crate) enum SeqFile {
    /// Flat content, every byte (holes as zeros).
    Flat,
    /// Flat content as a GNU sparse tar member holding only these data runs (offset in
    /// the file, length).
    Member(Vec<(u64, u64)>),
    /// A hosted sparse file laid out from the zero-scan bitmap: its layout, grain-table
    /// entries and the number of data grains.
    Sparse(SparseLayout, GrainEntries, u64),
}

impl SeqSink {
    /// Write `files` to `out`, each as `how` says; with `tar` = (descriptor name, its text,
    /// mtime), as a tar stream that starts with the descriptor.
    pub(crate) fn new(
        mut out: CountingWriter,
        files: Vec<OutputFile>,
        how: Vec<SeqFile>,
        embedded: Option<Vec<u8>>,
        tar: Option<(String, Vec<u8>, u64)>,
    ) -> Result<SeqSink> {
        let mtime = tar.as_ref().map_or(0, |t| t.2);
        if let Some((name, d, mtime)) = &tar {
            out.write(&tar_header(name, d.len() as u64, *mtime)?)?;
            out.write(d)?;
            out.pad_to(512)?;
        }
        let mut sparse = Vec::new();
        let mut holes = Vec::new();
        for h in how {
            match h {
                SeqFile::Flat => {
                    sparse.push(None);
                    holes.push(None);
                }
                SeqFile::Member(runs) => {
                    sparse.push(None);
                    holes.push(Some(runs));
                }
                SeqFile::Sparse(l, g, k) => {
                    sparse.push(Some((l, g, k)));
                    holes.push(None);
                }
            }
        }
        Ok(SeqSink {
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
        })
    }
}

/// Sequential outputs built from known extent sizes: raw content, flat extents in tar,
/// sparse extents (tables computed by the zero-scan pass) alone or in tar.
pub(crate) struct SeqSink {
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
