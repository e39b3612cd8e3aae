//! streamOptimized: one compressed file in VMware's layout (formats.md §3), written in
//! one pass without seeking, so the same sink writes a file and a pipe. The engine's
//! workers compress the grains (`compresses`); the sink only places the records.

use super::{
    CopyReport, Counted, CountingWriter, FileOutput, OutputFile, OutputFormat, Piece, PipeOutput,
    Sink, Sizes, Unit, GRAIN,
};
use crate::error::Result;
use crate::format::descriptor::{CreateType, ExtentLine, ExtentType};
use crate::format::sparse::{SparseLayout, SECTOR};
use crate::format::stream::StreamWriter;
use crate::output::AtomicFile;

/// The streamOptimized format.
pub(crate) struct StreamOptimized;

impl OutputFormat for StreamOptimized {
    fn create_type(&self) -> Option<CreateType> {
        Some(CreateType::StreamOptimized)
    }

    fn files(&self, cap: u64, name: &str) -> Vec<OutputFile> {
        vec![OutputFile {
            start: 0,
            len: cap,
            name: name.to_string(),
        }]
    }

    fn extent_lines(&self, cap: u64, name: &str, _: &[OutputFile]) -> Vec<ExtentLine> {
        vec![ExtentLine::rw(
            ExtentType::Sparse,
            cap / SECTOR,
            name.to_string(),
        )]
    }

    fn separate_descriptor(&self) -> bool {
        false
    }

    fn compresses(&self) -> bool {
        true
    }

    fn needs_scan(&self, _: &PipeOutput) -> bool {
        false
    }

    fn file_sink(&self, out: FileOutput) -> Result<Box<dyn Sink>> {
        let path = crate::io::join_in(&out.dir, &out.files[0].name);
        let f = AtomicFile::create(&path, out.force)?;
        let w = CountingWriter::to_file(&f)?;
        let descriptor = out.descriptor.expect("a stream has a descriptor");
        Ok(Box::new(StreamFileSink {
            inner: StreamSink::new(w, out.capacity, &descriptor, out.delta)?,
            file: Some(f),
            force: out.force,
        }))
    }

    fn pipe_sink(&self, out: PipeOutput) -> Result<Box<dyn Sink>> {
        let descriptor = out.descriptor.expect("a stream has a descriptor");
        Ok(Box::new(StreamSink::new(
            CountingWriter::to_pipe(out.w),
            out.capacity,
            &descriptor,
            out.delta,
        )?))
    }

    fn measure(&self, c: &Counted<'_>) -> Sizes {
        let desc = c.descriptor.unwrap_or_default();
        let layout = SparseLayout::new(c.capacity / SECTOR, 0);
        let desc_sectors = (desc.len() as u64).div_ceil(SECTOR);
        let head = (1 + desc_sectors).div_ceil(128) * 128 * SECTOR;
        let gd = (layout.num_gts * 4).div_ceil(SECTOR) * SECTOR;
        let tail = SECTOR + gd + 3 * SECTOR;
        let table = SECTOR + 2048;
        let meta_bytes = head + c.tables * table + tail;
        let bound = record_bound();
        let data_grains: u64 = c.data_grains.iter().sum();
        let fully_allocated =
            (!c.delta).then(|| head + layout.num_gts * table + tail + layout.num_grains * bound);
        if let Some(all) = c.compressed.exact {
            let required = meta_bytes + all;
            return Sizes {
                required,
                file_size: required,
                allocated: required,
                fully_allocated,
                estimate: None,
            };
        }
        // The spread sample; the early grains join it only when it is thin.
        let (sample, early) = (c.compressed.sample, c.compressed.early);
        let (n, b) = if sample.0 >= 64 {
            sample
        } else {
            (sample.0 + early.0, sample.1 + early.1)
        };
        let e = if n > 0 {
            meta_bytes + (data_grains as f64 * b as f64 / n as f64).ceil() as u64
        } else {
            meta_bytes + data_grains * bound
        };
        // At most: every data grain its zlib bound.
        let bounded = meta_bytes + data_grains * bound;
        Sizes {
            required: bounded,
            file_size: bounded,
            allocated: e,
            fully_allocated,
            estimate: Some(e),
        }
    }
}

/// The biggest record a grain can make: its zlib bound with the 12-byte record header,
/// padded to a sector.
fn record_bound() -> u64 {
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    (12 + c.zlib_compress_bound(GRAIN as usize) as u64).div_ceil(SECTOR) * SECTOR
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
        let name = out.name().to_path_buf();
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
