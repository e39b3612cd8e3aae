//! Flat outputs: monolithicFlat and twoGbMaxExtentFlat (hosted), vmfs (ESX: a
//! descriptor and `-flat.vmdk`), and raw content with no descriptor at all. To files,
//! zero grains are holes (thin) or allocated (zeroedthick) or written
//! (eagerzeroedthick); to a pipe, raw is the plain content and the others a tar stream
//! whose flat files are GNU sparse members.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::seq::{SeqFile, SeqSink};
use super::tar::sparse_member_runs;
use super::{
    commit_all, data_runs, descriptor_file, split_files, CopyReport, Counted, CountingWriter,
    FileOutput, OutputFile, OutputFormat, Piece, PipeOutput, Prealloc, Sink, Sizes, Unit,
    WrittenFile, GRAIN,
};
use crate::error::Result;
use crate::format::descriptor::{Access, CreateType, ExtentLine, ExtentType};
use crate::format::sparse::SECTOR;
use crate::io::write_error;
use crate::output::AtomicFile;

/// The flat formats and raw.
pub(crate) struct Flat {
    /// The createType; None for raw.
    create_type: Option<CreateType>,
}

impl Flat {
    pub(crate) const MONOLITHIC: Flat = Flat {
        create_type: Some(CreateType::MonolithicFlat),
    };
    pub(crate) const SPLIT: Flat = Flat {
        create_type: Some(CreateType::TwoGbMaxExtentFlat),
    };
    pub(crate) const VMFS: Flat = Flat {
        create_type: Some(CreateType::Vmfs),
    };
    pub(crate) const RAW: Flat = Flat { create_type: None };
}

impl OutputFormat for Flat {
    fn create_type(&self) -> Option<CreateType> {
        self.create_type
    }

    fn files(&self, cap: u64, name: &str) -> Vec<OutputFile> {
        let stem = name.strip_suffix(".vmdk").unwrap_or(name);
        match self.create_type {
            Some(CreateType::TwoGbMaxExtentFlat) => split_files(cap, name, 'f'),
            Some(_) => vec![OutputFile {
                start: 0,
                len: cap,
                name: format!("{stem}-flat.vmdk"),
            }],
            None => vec![OutputFile {
                start: 0,
                len: cap,
                name: name.to_string(),
            }],
        }
    }

    fn extent_lines(&self, _: u64, _: &str, files: &[OutputFile]) -> Vec<ExtentLine> {
        let vmfs = self.create_type == Some(CreateType::Vmfs);
        files
            .iter()
            .map(|p| ExtentLine {
                access: Access::Rw,
                sectors: p.len / SECTOR,
                kind: if vmfs {
                    ExtentType::Vmfs
                } else {
                    ExtentType::Flat
                },
                file: Some(p.name.clone()),
                offset: (!vmfs).then_some(0),
                extra: vec![],
            })
            .collect()
    }

    fn separate_descriptor(&self) -> bool {
        self.create_type.is_some()
    }

    fn needs_scan(&self, _: &PipeOutput) -> bool {
        // Its flat files go into a tar as sparse members, holes left out.
        self.create_type.is_some()
    }

    fn file_sink(&self, out: FileOutput) -> Result<Box<dyn Sink>> {
        let descriptor_file = out.descriptor.map(|d| (out.descriptor_path, d));
        Ok(Box::new(FlatFileSink {
            prealloc: out.prealloc,
            files: out.files.iter().map(|_| None).collect(),
            behind: out.files.iter().map(|_| None).collect(),
            pieces: out.files,
            dir: out.dir,
            descriptor_file,
            force: out.force,
            report: CopyReport::default(),
        }))
    }

    fn pipe_sink(&self, out: PipeOutput) -> Result<Box<dyn Sink>> {
        let how = out
            .files
            .iter()
            .map(|p| match &out.nonzero_grains {
                Some(bits) => sparse_member_runs(p, bits).map_or(SeqFile::Flat, SeqFile::Member),
                None => SeqFile::Flat,
            })
            .collect();
        let tar = out.descriptor.map(|d| (out.name.clone(), d, out.mtime));
        Ok(Box::new(SeqSink::new(
            CountingWriter::to_pipe(out.w),
            out.files,
            how,
            None,
            tar,
        )?))
    }

    fn measure(&self, c: &Counted<'_>) -> Sizes {
        // The files' apparent size is the disk's; a thin one takes only its data on a file
        // system, a thick one all of it.
        let separate = c.descriptor.map_or(0, |d| d.len() as u64);
        let file_size = c.capacity + separate;
        let allocated = c.data_bytes + separate;
        Sizes {
            required: if c.thick { file_size } else { allocated },
            file_size,
            allocated,
            fully_allocated: Some(file_size),
            estimate: None,
        }
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
        for run in data_runs(nonzero) {
            let from = run.start * GRAIN as usize;
            let to = (run.end * GRAIN as usize).min(buf.len());
            self.write_virtual(&buf[from..to], u.start + from as u64)?;
            self.report.grains += run.len() as u64;
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
            pending.push(descriptor_file(&path, &text, self.force)?);
        }
        self.report.bytes_out = self.pieces.iter().map(|p| p.len).sum();
        self.report.files = commit_all(pending, self.force)?;
        Ok(std::mem::take(&mut self.report))
    }
}
