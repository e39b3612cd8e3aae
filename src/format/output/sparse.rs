//! Hosted sparse outputs: monolithicSparse (one file, descriptor embedded) and
//! twoGbMaxExtentSparse (a descriptor and 2 GB extents), in the layout of
//! [`SparseLayout`]: grains packed in ascending order after preallocated tables. To files
//! the grains go first and each table as the copy passes it (seeking back); to a pipe the
//! zero-scan pass lays the tables out first. Both give the same bytes.

use std::path::PathBuf;

use super::seq::{SeqFile, SeqSink};
use super::{
    commit_all, data_runs, descriptor_file, split_files, CopyReport, Counted, CountingWriter,
    FileOutput, OutputFile, OutputFormat, Piece, PipeOutput, Sink, Sizes, Unit, WrittenFile, GRAIN,
};
use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, ExtentLine, ExtentType};
use crate::format::sparse::{
    embedded_sectors, sector_entry, GrainEntries, SparseLayout, SparseWriter, SECTOR,
};
use crate::output::AtomicFile;

/// monolithicSparse or twoGbMaxExtentSparse.
pub(crate) struct HostedSparse {
    split: bool,
}

impl HostedSparse {
    pub(crate) const MONOLITHIC: HostedSparse = HostedSparse { split: false };
    pub(crate) const SPLIT: HostedSparse = HostedSparse { split: true };
}

impl OutputFormat for HostedSparse {
    fn create_type(&self) -> Option<CreateType> {
        Some(if self.split {
            CreateType::TwoGbMaxExtentSparse
        } else {
            CreateType::MonolithicSparse
        })
    }

    fn files(&self, cap: u64, name: &str) -> Vec<OutputFile> {
        if self.split {
            split_files(cap, name, 's')
        } else {
            vec![OutputFile {
                start: 0,
                len: cap,
                name: name.to_string(),
            }]
        }
    }

    fn extent_lines(&self, _: u64, _: &str, files: &[OutputFile]) -> Vec<ExtentLine> {
        files
            .iter()
            .map(|p| ExtentLine::rw(ExtentType::Sparse, p.len / SECTOR, p.name.clone()))
            .collect()
    }

    fn separate_descriptor(&self) -> bool {
        self.split
    }

    fn needs_scan(&self, _: &PipeOutput) -> bool {
        true
    }

    fn file_sink(&self, out: FileOutput) -> Result<Box<dyn Sink>> {
        let (embedded, descriptor_file) = match out.descriptor {
            Some(d) if self.split => (None, Some((out.descriptor_path, d))),
            d => (d, None),
        };
        Ok(Box::new(SparseFileSink {
            pieces: out.files,
            dir: out.dir,
            embedded,
            descriptor_file,
            cur: None,
            behind: None,
            next: 0,
            pending: vec![],
            force: out.force,
            report: CopyReport::default(),
        }))
    }

    fn pipe_sink(&self, out: PipeOutput) -> Result<Box<dyn Sink>> {
        let bits = out.nonzero_grains.expect("laid out from the zero scan");
        let embedded = if self.split {
            None
        } else {
            out.descriptor.clone()
        };
        let desc_sectors = embedded.as_deref().map_or(0, embedded_sectors);
        let how = out
            .files
            .iter()
            .map(|p| {
                let (l, g, k) = sparse_plan(p, desc_sectors, &bits)?;
                Ok(SeqFile::Sparse(l, g, k))
            })
            .collect::<Result<Vec<_>>>()?;
        // A split disk goes down a pipe as a tar stream: its descriptor, then its extents.
        let tar = self.split.then(|| {
            (
                out.name.clone(),
                out.descriptor.clone().expect("a descriptor"),
                out.mtime,
            )
        });
        Ok(Box::new(SeqSink::new(
            CountingWriter::to_pipe(out.w),
            out.files,
            how,
            embedded,
            tar,
        )?))
    }

    fn measure(&self, c: &Counted<'_>) -> Sizes {
        let descriptor = c.descriptor.unwrap_or_default();
        let (embedded, separate) = if self.split {
            (0, descriptor.len() as u64)
        } else {
            (embedded_sectors(descriptor), 0)
        };
        let mut required = separate;
        let mut full = separate;
        for (p, n) in c.files.iter().zip(c.data_grains) {
            let layout = SparseLayout::new(p.len / SECTOR, embedded);
            required += layout.file_bytes(*n);
            full += layout.file_bytes(layout.num_grains);
        }
        Sizes {
            required,
            file_size: required,
            allocated: required,
            fully_allocated: Some(full),
            estimate: None,
        }
    }
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
        for run in data_runs(nonzero) {
            let first = (u.start - base) / GRAIN + run.start as u64;
            let from = run.start * GRAIN as usize;
            let to = (run.end * GRAIN as usize).min(buf.len());
            w.write_grains(first, &buf[from..to])?;
            self.report.grains += run.len() as u64;
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
            self.report.bytes_out += text.len() as u64;
            pending.push(descriptor_file(&path, &text, self.force)?);
        }
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
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
