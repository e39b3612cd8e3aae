//! The one copy engine: plan from `map()` (metadata only, [`plan`]), produce in parallel
//! on rayon (read, zero-detect, compress, checksum: [`Producer`]), one [`Sink`]
//! consuming the results in address order. export, import (from disks and from pipes),
//! cat, verify and commit all run on it.
//!
//! Dependencies point one way: commands (`ops`) use the engine and the formats; the
//! engine's sinks adapt units to the format writers' calls; the format writers know
//! nothing of either.
//!
//! Work moves in windows of `window` units. While the pool produces window k+1, the sink
//! consumes window k (`rayon::join`), so reading/compressing and writing overlap.
//! Memory: at most two windows of produced units are alive, i.e. about
//! `2 × window × unit_bytes` (plus compressed output of the same order); with the
//! defaults (`window = 4 × threads`, 1 MiB units) that is 16 MiB on 2 threads.

use rayon::prelude::*;

pub mod feed;
pub(crate) mod guest;
mod ordered;
mod plan;
pub mod target;

pub use crate::format::output::{CopyReport, OutputFile, Piece, Sink, Unit, GRAIN};
pub use ordered::{ordered, Spawner};
pub use plan::{manifest_of, scan, Planner, UnitSource, DEFAULT_UNIT};

use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::format::stream::grain_record;

/// Progress reporting hook (the CLI draws a bar; the library only counts). The engine
/// counts the bytes it reads (units the map says hold data); ranges known to be zeros
/// pass without a count, so a bar's total is the data and its ETA the reading's.
pub trait Progress: Sync {
    /// `n` more bytes of content are done.
    fn inc(&self, n: u64);
    /// The total is now known to be `n` bytes.
    fn set_total(&self, _n: u64) {}
}

/// No progress reporting.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn inc(&self, _n: u64) {}
}

/// Pipeline settings.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PipelineOptions {
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Unit size in bytes.
    pub unit: u64,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            threads: 0,
            unit: DEFAULT_UNIT,
        }
    }
}

/// The most worker threads a run uses: more than a few per core only adds memory (each
/// thread's window share) and switching, and a huge `--threads` must not start 100000.
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

/// `threads` (0 = all cores) capped at [`max_threads`].
pub fn capped_threads(threads: usize) -> usize {
    threads.min(max_threads())
}

/// Units per worker thread in one window: 4 MiB of units (4 of the default 1 MiB); a
/// pipe's units come over in batches of a window. Smaller units (64 KiB for increments)
/// get more of them.
fn window_per_thread(unit: u64) -> usize {
    (4 * DEFAULT_UNIT / unit.max(1)).clamp(4, 64) as usize
}

/// Build the rayon pool for `threads` (0 = all cores; capped at [`max_threads`]).
pub fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    let threads = capped_threads(threads);
    let mut b = rayon::ThreadPoolBuilder::new();
    if threads > 0 {
        b = b.num_threads(threads);
    }
    b.build()
        .map_err(|e| Error::InvalidInput(format!("cannot start worker threads: {e}")))
}

/// Run the pipeline over every unit `planner` yields: `produce` runs in parallel,
/// `sink` sees every unit and its product in address order (see [`ordered`]; the planner
/// runs on a thread of its own).
pub fn run<O, P, S>(
    planner: &mut (dyn UnitSource + Send),
    opts: PipelineOptions,
    produce: P,
    mut sink: S,
) -> Result<()>
where
    O: Send,
    P: Fn(&Unit) -> Result<O> + Sync,
    S: FnMut(Unit, O) -> Result<()> + Send,
{
    let pool = pool(opts.threads)?;
    ordered::ordered(
        &pool,
        ahead(&pool, opts.unit),
        &mut |sp| {
            while let Some(u) = planner.next_unit()? {
                sp.push(u, u.read)?;
            }
            Ok(())
        },
        &|u: Unit| produce(&u).map(|o| (u, o)),
        &mut |(u, o)| sink(u, o),
    )
}

/// Read units a run holds at once, made or being made (the memory bound of the
/// pipeline): four windows' worth, 16 MiB per thread. Measured on the stream export of
/// the benchmark disks (2 threads): two windows kept 1.80-1.85 cores busy, four
/// 1.87-1.92, eight no more than four; the RSS went from 32 to about 60 MiB.
fn ahead(pool: &rayon::ThreadPool, unit: u64) -> usize {
    4 * pool.current_num_threads() * window_per_thread(unit)
}

pub(crate) use crate::mem::buffers;
pub use crate::mem::is_zero;

/// The parallel stage of a copy: reads a unit, finds its zero grains, compresses and
/// checksums what the sink needs.
pub struct Producer<'a> {
    /// The disk read.
    pub disk: &'a dyn VirtualDisk,
    /// zlib level of the stream records to make, or None.
    pub compress: Option<u32>,
    /// Whether to checksum each unit (manifests).
    pub crc: bool,
}

impl Producer<'_> {
    /// Read unit `u` and make its piece.
    pub fn produce(&self, u: &Unit) -> Result<Piece> {
        if !u.read {
            return Ok(Piece::Hole);
        }
        let mut buf = buffers::take(u.len as usize);
        self.disk.read_at(&mut buf, u.start)?;
        self.piece(u, buf)
    }

    /// The piece of unit `u` whose bytes are `buf` (zero flags, records, checksum).
    pub fn piece(&self, u: &Unit, buf: Vec<u8>) -> Result<Piece> {
        let nonzero: Vec<bool> = buf.chunks(GRAIN as usize).map(|g| !is_zero(g)).collect();
        if !nonzero.contains(&true) {
            return Ok(Piece::Hole);
        }
        let mut records = Vec::new();
        if let Some(level) = self.compress {
            // Grain by grain in parallel: rayon steals single grains, so the end of a
            // window does not wait on one unit of text while other workers idle.
            records = buf
                .par_chunks(GRAIN as usize)
                .enumerate()
                .filter(|(i, _)| nonzero[*i])
                .map(|(i, g)| grain_record((u.start + i as u64 * GRAIN) / SECTOR, g, level))
                .collect::<Result<Vec<_>>>()?;
        }
        let crc = self.crc.then(|| {
            let mut h = crc32fast::Hasher::new();
            h.update(&buf);
            h
        });
        Ok(Piece::Data {
            buf,
            nonzero,
            records,
            crc,
        })
    }
}

/// Where a copy's content comes from.
pub enum Content<'a> {
    /// Read from a disk, at the units its map plans (metadata first: what reads as zero
    /// is never read).
    Disk(&'a dyn VirtualDisk),
    /// Pushed by a sequential source (a pipe: [`Feed`]); what it skips reads as zero.
    Feed(&'a mut dyn Feed),
}

/// The one copy driver: `content` through `producer` (in parallel: reads or inflation,
/// zero detection, compression, checksums) into `sink`, in address order; `observe` sees
/// every unit and its piece first (manifests). The sink sees the whole capacity of
/// `producer.disk`, holes included.
pub fn drive(
    content: Content<'_>,
    popts: PipelineOptions,
    producer: &Producer<'_>,
    sink: &mut dyn Sink,
    observe: &mut (dyn FnMut(&Unit, &Piece) + Send),
    progress: &dyn Progress,
) -> Result<()> {
    let mut deliver = |u: Unit, p: Piece| -> Result<()> {
        observe(&u, &p);
        sink.put(&u, &p)?;
        if u.read {
            progress.inc(u.len);
        }
        if let Piece::Data { buf, .. } = p {
            buffers::give(buf);
        }
        Ok(())
    };
    match content {
        Content::Disk(disk) => {
            let mut planner = Planner::new(disk, popts.unit);
            run(&mut planner, popts, |u| producer.produce(u), deliver)
        }
        Content::Feed(feed) => {
            // The same pipeline as a disk's: the pipe's reader is the source.
            let pool = pool(popts.threads)?;
            let cap = producer.disk.capacity();
            ordered::ordered(
                &pool,
                ahead(&pool, popts.unit),
                &mut |sp| feed_units(feed, &pool, cap, sp),
                &|(u, buf): (Unit, Option<Vec<u8>>)| match buf {
                    Some(buf) => producer.piece(&u, buf).map(|p| (u, p)),
                    None => Ok((u, Piece::Hole)),
                },
                &mut |(u, p)| deliver(u, p),
            )
        }
    }
}

/// Content pushed from a sequential source (import from a pipe) instead of read from a
/// disk: `run` calls `put(unit, bytes)` for 1 MiB-aligned units in ascending order (units
/// it skips are zeros).
pub trait Feed: Send {
    /// Push every unit; parallel work (inflating) goes to `pool`.
    fn run(
        &mut self,
        pool: &rayon::ThreadPool,
        put: &mut dyn FnMut(Unit, Vec<u8>) -> Result<()>,
    ) -> Result<()>;
}

/// Push a feed's units (with their buffers) and the holes between them (and after the
/// last, up to `cap`) into a pipeline, in order: the source of a pipe's copy.
pub fn feed_units<O>(
    feed: &mut dyn Feed,
    pool: &rayon::ThreadPool,
    cap: u64,
    sp: &mut Spawner<'_, '_, (Unit, Option<Vec<u8>>), O>,
) -> Result<()>
where
    O: Send,
{
    let mut pos = 0u64;
    let hole = |sp: &mut Spawner<'_, '_, _, O>, start: u64, end: u64| {
        let u = Unit {
            start,
            len: end - start,
            read: false,
        };
        sp.push((u, None), false)
    };
    feed.run(pool, &mut |u, buf| {
        if u.start > pos {
            hole(sp, pos, u.start)?;
        }
        pos = u.start + u.len;
        sp.push((u, Some(buf)), true)
    })?;
    if pos < cap {
        hole(sp, pos, cap)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::disk::{Alloc, Run};
    use std::ops::Range;

    /// An in-memory disk whose map says Data for grains holding data, Zero for the rest
    /// (a model for the planner and the sinks).
    pub(crate) struct MemDisk(pub Vec<u8>);

    impl VirtualDisk for MemDisk {
        fn capacity(&self) -> u64 {
            self.0.len() as u64
        }
        fn granularity(&self) -> u64 {
            GRAIN
        }
        fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
            let mut out = Vec::new();
            let mut p = range.start;
            while p < range.end.min(self.capacity()) {
                let g_end = ((p / GRAIN + 1) * GRAIN)
                    .min(range.end)
                    .min(self.capacity());
                let data = !is_zero(&self.0[p as usize..g_end as usize]);
                let alloc = if data {
                    Alloc::Data {
                        extent: 0,
                        offset: p,
                    }
                } else {
                    Alloc::Zero
                };
                crate::disk::push_run(
                    &mut out,
                    Run {
                        start: p,
                        len: g_end - p,
                        alloc,
                        depth: 0,
                    },
                );
                p = g_end;
            }
            Ok(out)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    /// 8 MiB with data in grains 3, 40-41 and the last one.
    pub(crate) fn sample() -> MemDisk {
        let mut v = vec![0u8; 8 << 20];
        for g in [3usize, 40, 41, 127] {
            let a = g * GRAIN as usize;
            v[a..a + GRAIN as usize].fill(g as u8 + 1);
        }
        MemDisk(v)
    }

    #[test]
    fn the_planner_reads_only_units_with_data_and_merges_holes() {
        let d = sample();
        let mut p = Planner::new(&d, DEFAULT_UNIT);
        let mut units = Vec::new();
        while let Some(u) = p.next_unit().unwrap() {
            units.push(u);
        }
        // Contiguous cover of the disk, in order.
        let mut at = 0;
        for u in &units {
            assert_eq!(u.start, at);
            at += u.len;
        }
        assert_eq!(at, d.capacity());
        // Read units are the 1 MiB units holding grains 3, 40-41 and 127; the rest is
        // holes, merged (never two hole units in a row).
        let reads: Vec<u64> = units
            .iter()
            .filter(|u| u.read)
            .map(|u| u.start >> 20)
            .collect();
        assert_eq!(reads, vec![0, 2, 7]);
        assert!(units.iter().all(|u| !u.read || u.len == DEFAULT_UNIT));
        assert!(units.windows(2).all(|w| w[0].read || w[1].read));
    }

    /// The planner asks the disk to start reading exactly the units it will hand out to
    /// read (never a hole), each before it is handed out, and all those starting within
    /// the read-ahead distance of the one handed out.
    #[test]
    fn the_planner_hints_the_read_units_ahead_and_nothing_else() {
        struct Hinted(MemDisk, std::sync::Mutex<Vec<Range<u64>>>);
        impl VirtualDisk for Hinted {
            fn capacity(&self) -> u64 {
                self.0.capacity()
            }
            fn granularity(&self) -> u64 {
                GRAIN
            }
            fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
                self.0.map(range)
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                self.0.read_at(buf, offset)
            }
            fn will_need(&self, range: Range<u64>) {
                self.1.lock().unwrap().push(range);
            }
        }
        let mut v = vec![0u8; 64 << 20];
        for g in (0..1024usize).filter(|g| g % 37 == 0 || (300..420).contains(g)) {
            v[g * GRAIN as usize] = 1;
        }
        let d = Hinted(MemDisk(v), Default::default());
        let mut p = Planner::new(&d, DEFAULT_UNIT);
        let mut reads = Vec::new();
        while let Some(u) = p.next_unit().unwrap() {
            let hinted = d.1.lock().unwrap().clone();
            let covered = |a: u64, b: u64| hinted.iter().any(|h| h.start <= a && b <= h.end);
            if u.read {
                reads.push(u.start..u.start + u.len);
                assert!(covered(u.start, u.start + u.len), "{u:?} not hinted before");
            }
            if !u.read {
                continue;
            }
            // Every read unit within the read-ahead of a read unit is hinted already.
            let mut q = Planner::new(&d.0, DEFAULT_UNIT);
            while let Some(w) = q.next_unit().unwrap() {
                if w.read && w.start >= u.start && w.start < u.start + u.len + plan::READ_AHEAD {
                    assert!(
                        covered(w.start, w.start + w.len),
                        "{w:?} not hinted ahead of {u:?}"
                    );
                }
            }
        }
        let hinted = d.1.lock().unwrap().clone();
        assert!(!hinted.is_empty());
        for h in &hinted {
            assert!(
                reads.iter().any(|r| r.start <= h.start && h.end <= r.end),
                "{h:?} hinted outside the read units"
            );
        }
        // Each byte once.
        let total: u64 = hinted.iter().map(|h| h.end - h.start).sum();
        assert_eq!(total, reads.iter().map(|r| r.end - r.start).sum::<u64>());
    }

    #[test]
    fn the_raw_sequential_sink_writes_the_content_in_order() {
        let d = sample();
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let raw_sink = || {
            let raw = crate::format::output::ExportFormat::Raw.spec();
            raw.pipe_sink(crate::format::output::PipeOutput {
                w: Box::new(Shared(out.clone())),
                capacity: d.capacity(),
                name: "raw".into(),
                files: raw.files(d.capacity(), "raw"),
                descriptor: None,
                delta: false,
                mtime: 0,
                nonzero_grains: None,
            })
            .unwrap()
        };
        let producer = Producer {
            disk: &d,
            compress: None,
            crc: false,
        };
        for threads in [1, 2] {
            out.lock().unwrap().clear();
            let mut s = raw_sink();
            let popts = PipelineOptions {
                threads,
                ..Default::default()
            };
            drive(
                Content::Disk(&d),
                popts,
                &producer,
                s.as_mut(),
                &mut |_, _| {},
                &NoProgress,
            )
            .unwrap();
            let r = s.finish().unwrap();
            assert_eq!(r.grains, 4);
            assert_eq!(*out.lock().unwrap(), d.0);
        }
    }
}
