//! `measure`: what an export would write, without writing it.
//!
//! The plan is export's own (`plan_output`: the same files, descriptor and layout), and
//! the content is read on the engine the way export reads it, to find the grains that
//! hold data (all-zero grains are never written). So for sparse, split, flat and raw
//! outputs the sizes are exact: `required` is the bytes of the files export then writes
//! (apparent sizes, holes included), `allocated` the bytes of them that hold data.
//!
//! `required` is the space the output takes on a file system (what to have free):
//! holes in thin flat and raw files do not count, thick types count their whole size;
//! `file_size` is what `ls -l` adds up (a thin flat file's apparent size is the disk's).
//!
//! A stream's size depends on how each grain compresses. `required` is then a bound never
//! below the real size (every data grain as libdeflate's compression bound, plus the
//! exact metadata), and `estimate` extrapolates from compressing a sample of the grains
//! spread over the whole disk (one in 8, chosen by a hash of the grain number, so the
//! start of a disk — boot code, binaries — weighs no more than the rest; the first 64
//! data grains stand in only when a small disk leaves the sample too thin); `--exact`
//! compresses them all.

use serde::Serialize;

use crate::chain::{Chain, DeltaView};
use crate::copy::target::{plan_output, ExportFormat, OutputMeta};
use crate::copy::{self as pipeline, is_zero, PipelineOptions, Planner, GRAIN};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::output::{Compressed, Counted};
use crate::format::sparse::SECTOR;
use crate::format::stream::grain_record;
use crate::ops::Progress;

/// Options of a measurement.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MeasureOptions {
    /// The output format measured.
    pub format: ExportFormat,
    /// Measure the increment of the top layer (`export --delta`).
    pub delta: bool,
    /// zlib level of a stream.
    pub level: u32,
    /// Compress every grain of a stream (exact size) instead of a sample.
    pub exact: bool,
    /// The output's file name (names inside descriptors count toward their size).
    pub name: String,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Flat files are allocated whole (zeroedthick, eagerzeroedthick).
    pub thick: bool,
    /// Measure a guest-aware export (see `ExportOptions::guest_aware`).
    pub guest_aware: bool,
}

impl Default for MeasureOptions {
    /// A stream at level 6, estimated from a sample, all cores.
    fn default() -> Self {
        MeasureOptions {
            format: ExportFormat::StreamOptimized,
            delta: false,
            level: 6,
            exact: false,
            name: "disk.vmdk".into(),
            threads: 0,
            thick: false,
            guest_aware: false,
        }
    }
}

/// What an export would write.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Measurement {
    /// The format measured (createType, or `raw`).
    pub format: String,
    /// Virtual size of the disk.
    pub capacity: u64,
    /// Space the output takes on a file system (holes not counted; exact; for a stream
    /// unless `exact`: an upper bound).
    pub required: u64,
    /// Bytes of the output files as `ls -l` adds them (apparent sizes, holes included).
    pub file_size: u64,
    /// Whether `required` and `file_size` are exact.
    pub exact: bool,
    /// Bytes of the output that hold data (a stream: its estimated or exact size).
    pub allocated: u64,
    /// The size with every grain holding data (as `qemu-img measure` reports it); not
    /// for an increment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fully_allocated: Option<u64>,
    /// The output's file name the sizes are for (names are recorded in descriptors).
    pub name: String,
    /// A stream's estimated size from a sample of compressed grains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<u64>,
    /// Grains of data written.
    pub data_grains: u64,
    /// Zeroed grains an increment records.
    pub zeroed_grains: u64,
    /// Output files export would write.
    pub files: Vec<String>,
    /// What a guest-aware measurement found in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::guest::GuestReport>,
}

impl Measurement {
    /// Text for people.
    pub fn write_text(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let h = crate::units::human;
        writeln!(out, "format: {}", self.format)?;
        writeln!(
            out,
            "virtual size: {} ({} bytes)",
            h(self.capacity),
            self.capacity
        )?;
        writeln!(
            out,
            "required size: {} ({} bytes){}, on a file system",
            h(self.required),
            self.required,
            if self.exact { "" } else { ", an upper bound" }
        )?;
        if self.file_size != self.required {
            writeln!(
                out,
                "file size: {} ({} bytes), as ls -l adds it (holes included)",
                h(self.file_size),
                self.file_size
            )?;
        }
        if let Some(e) = self.estimate {
            writeln!(
                out,
                "estimated size: {} ({e} bytes), from a sample of compressed grains",
                h(e)
            )?;
        }
        writeln!(
            out,
            "allocated: {} ({} bytes)",
            h(self.allocated),
            self.allocated
        )?;
        if let Some(f) = self.fully_allocated {
            writeln!(out, "fully allocated size: {} ({f} bytes)", h(f))?;
        }
        writeln!(out, "data grains: {}", self.data_grains)?;
        if self.zeroed_grains > 0 {
            writeln!(out, "zeroed grains: {}", self.zeroed_grains)?;
        }
        if let Some(g) = &self.guest {
            writeln!(
                out,
                "guest-aware: {} ({} bytes) free in the guest left out",
                h(g.left_out),
                g.left_out
            )?;
        }
        writeln!(
            out,
            "files: {} (for an output named `{}`)",
            self.files.join(" "),
            self.name
        )
    }
}

/// Whether grain `g` is in the sample whose compression is measured (one in 8, spread
/// over the disk by a hash).
fn sampled(g: u64) -> bool {
    (g.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) == 0
}

/// Counts made while reading.
#[derive(Default)]
struct Counts {
    /// Data grains per output piece.
    per_piece: Vec<u64>,
    /// Grains per 512-grain stream table with a data or zeroed entry.
    tables: std::collections::BTreeSet<u64>,
    zeroed: u64,
    data_bytes: u64,
    sample_grains: u64,
    sample_bytes: u64,
    /// The first data grains read, measured in case the spread sample is too thin.
    early_grains: u64,
    early_bytes: u64,
    compressed_all: u64,
}

/// Measure an export of `chain`.
pub fn measure(
    chain: &Chain,
    opts: &MeasureOptions,
    progress: &dyn Progress,
) -> Result<Measurement> {
    let format = opts.format;
    if opts.delta && format != ExportFormat::StreamOptimized {
        return Err(Error::InvalidInput(
            "an increment is written as a streamOptimized file".into(),
        ));
    }
    if opts.level > 9 {
        return Err(Error::InvalidInput(format!(
            "compression level {} must be 0 to 9",
            opts.level
        )));
    }
    let mut meta = if opts.delta {
        OutputMeta::for_delta(chain, None)?
    } else {
        OutputMeta::from_chain(chain)
    };
    let guest = crate::copy::guest::Guest::scan(chain, opts.guest_aware)?;
    guest.mark(&mut meta);
    let cap = chain.capacity();
    crate::format::descriptor::check_file_name(&opts.name)?;
    let plan = plan_output(format, &meta, cap, &opts.name);
    let delta;
    let source: &dyn VirtualDisk = if opts.delta {
        delta = DeltaView::new(chain, GRAIN);
        &delta
    } else {
        chain
    };
    let view = guest.view(source);
    let disk: &dyn VirtualDisk = &view;
    let stream = format == ExportFormat::StreamOptimized;
    let popts = PipelineOptions {
        threads: opts.threads,
        unit: if opts.delta {
            GRAIN
        } else {
            pipeline::DEFAULT_UNIT
        },
    };
    let mut counts = Counts {
        per_piece: vec![0; plan.pieces.len()],
        ..Default::default()
    };
    let mut planner = Planner::new(disk, popts.unit);
    let (level, exact) = (opts.level, opts.exact);
    let seen = std::sync::atomic::AtomicU64::new(0);
    pipeline::run(
        &mut planner,
        popts,
        |u| {
            // Per grain: (grain, holds data, compressed record size if measured, in the
            // spread sample).
            let mut out: Vec<(u64, bool, Option<u64>, bool)> = Vec::new();
            if !u.read {
                return Ok(out);
            }
            let mut buf = vec![0u8; u.len as usize];
            disk.read_at(&mut buf, u.start)?;
            for (i, g) in buf.chunks(GRAIN as usize).enumerate() {
                let grain = u.start / GRAIN + i as u64;
                let data = !is_zero(g);
                let early =
                    data && stream && seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 64;
                let spread = sampled(grain);
                let size = if data && stream && (exact || early || spread) {
                    Some(grain_record(grain * GRAIN / SECTOR, g, level)?.len() as u64)
                } else {
                    None
                };
                out.push((grain, data, size, spread));
            }
            Ok(out)
        },
        |u, grains| {
            for (g, data, size, spread) in grains {
                let start = g * GRAIN;
                if data {
                    // Pieces are in address order and cover the disk.
                    let piece = plan.pieces.partition_point(|p| p.start + p.len <= start);
                    counts.per_piece[piece] += 1;
                    counts.data_bytes += GRAIN.min(cap - start);
                    counts.tables.insert(g / 512);
                } else if opts.delta {
                    counts.zeroed += 1;
                    counts.tables.insert(g / 512);
                }
                if let Some(s) = size {
                    if spread {
                        counts.sample_grains += 1;
                        counts.sample_bytes += s;
                    } else {
                        counts.early_grains += 1;
                        counts.early_bytes += s;
                    }
                    counts.compressed_all += s;
                }
            }
            if u.read {
                progress.inc(u.len);
            }
            Ok(())
        },
    )?;
    let data_grains: u64 = counts.per_piece.iter().sum();
    let sizes = format.spec().measure(&Counted {
        capacity: cap,
        files: &plan.pieces,
        descriptor: plan.descriptor.as_deref(),
        data_grains: &counts.per_piece,
        data_bytes: counts.data_bytes,
        tables: counts.tables.len() as u64,
        delta: opts.delta,
        thick: opts.thick,
        compressed: Compressed {
            exact: exact.then_some(counts.compressed_all),
            sample: (counts.sample_grains, counts.sample_bytes),
            early: (counts.early_grains, counts.early_bytes),
        },
    });
    let mut m = Measurement {
        format: format
            .create_type()
            .map_or("raw".to_string(), |c| c.as_str().to_string()),
        capacity: cap,
        required: sizes.required,
        file_size: sizes.file_size,
        exact: sizes.estimate.is_none(),
        allocated: sizes.allocated,
        fully_allocated: sizes.fully_allocated,
        name: opts.name.clone(),
        estimate: sizes.estimate,
        data_grains,
        zeroed_grains: counts.zeroed,
        files: plan.pieces.iter().map(|p| p.name.clone()).collect(),
        guest: guest.found(),
    };
    if plan.separate_descriptor {
        m.files.insert(0, opts.name.clone());
    }
    Ok(m)
}
