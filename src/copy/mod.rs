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
pub mod plan;
pub mod target;

pub use crate::format::output::{CopyReport, OutputFile, Piece, Sink, Unit, GRAIN};
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

/// Units per worker thread in one window: 4 MiB of units (4 of the default 1 MiB) keeps
/// the pipeline's memory at about 2 x 4 MiB per thread; the window's tail is short
/// because stream records are made grain by grain in parallel (measured: 8 or 16 MiB per
/// thread gained nothing more). Smaller units (64 KiB for increments) get more of them.
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
/// `sink` sees every unit and its product in address order.
pub fn run<O, P, S>(
    planner: &mut dyn UnitSource,
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
    let window = pool.current_num_threads() * window_per_thread(opts.unit);
    let mut pending: Vec<(Unit, Result<O>)> = Vec::new();
    loop {
        let mut next = Vec::with_capacity(window);
        // A window holds `window` read units (holes ride along for free).
        let mut reads = 0;
        while reads < window {
            match planner.next_unit()? {
                Some(u) => {
                    reads += usize::from(u.read);
                    next.push(u);
                }
                None => break,
            }
        }
        if next.is_empty() && pending.is_empty() {
            return Ok(());
        }
        let to_sink = std::mem::take(&mut pending);
        let (produced, sunk) = pool.install(|| {
            rayon::join(
                || next.par_iter().map(&produce).collect::<Vec<Result<O>>>(),
                || -> Result<()> {
                    for (u, o) in to_sink {
                        sink(u, o?)?;
                    }
                    Ok(())
                },
            )
        });
        sunk?;
        pending = next.into_iter().zip(produced).collect();
    }
}

/// Unit buffers recycled from the sink back to the readers: a fresh 1 MiB buffer per
/// unit cost page faults and page clearing (about 4% of a stream export's CPU). At most
/// two windows' worth are kept, so the memory bound is the pipeline's.
pub(crate) mod buffers {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    const KEEP: usize = 64;

    /// A buffer of exactly `len` bytes (contents unspecified: the caller fills it all).
    pub(crate) fn take(len: usize) -> Vec<u8> {
        let reused = POOL.lock().ok().and_then(|mut p| p.pop());
        match reused {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Hand a buffer back for reuse.
    pub(crate) fn give(b: Vec<u8>) {
        if b.capacity() > super::DEFAULT_UNIT as usize * 2 {
            return;
        }
        if let Ok(mut p) = POOL.lock() {
            if p.len() < KEEP {
                p.push(b);
            }
        }
    }
}

/// Whether a buffer is all zeros (64-byte blocks OR-ed as words; vectorizes well).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

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
            let pool = pool(popts.threads)?;
            let window = pool.current_num_threads() * window_per_thread(popts.unit);
            let mut next = 0u64;
            let cap = producer.disk.capacity();
            feed_batches(feed, &pool, window, &mut |mut batch| {
                put_batch(&pool, &mut batch, &mut next, producer, &mut deliver)
            })?;
            if next < cap {
                let gap = Unit {
                    start: next,
                    len: cap - next,
                    read: false,
                };
                deliver(gap, Piece::Hole)?;
            }
            Ok(())
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

/// Run `feed` on a thread of its own (reading the pipe, parsing, inflating on `pool`)
/// and hand its units to `consume` on this thread in batches of up to `window`, in order:
/// reading and inflating the next batches overlap with consuming this one (two batches
/// in flight at most, so memory stays bounded). An error on either side stops both; the
/// consumer's comes first (the feed then only saw the consumer go away).
pub fn feed_batches(
    feed: &mut dyn Feed,
    pool: &rayon::ThreadPool,
    window: usize,
    consume: &mut dyn FnMut(Vec<(Unit, Vec<u8>)>) -> Result<()>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Unit, Vec<u8>)>>(1);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut batch = Vec::with_capacity(window);
            let gone = || Error::InvalidInput("the consumer stopped".into());
            feed.run(pool, &mut |u, buf| {
                batch.push((u, buf));
                if batch.len() >= window {
                    tx.send(std::mem::replace(&mut batch, Vec::with_capacity(window)))
                        .map_err(|_| gone())?;
                }
                Ok(())
            })?;
            if !batch.is_empty() {
                tx.send(batch).map_err(|_| gone())?;
            }
            Ok(())
        });
        let mut consumed = Ok(());
        for batch in rx.iter() {
            consumed = consume(batch);
            if consumed.is_err() {
                break;
            }
        }
        drop(rx);
        let read: Result<()> = reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        consumed.and(read)
    })
}

/// Make the pieces of a batch of pushed units in parallel, then put them (and the holes
/// between them) into the sink in order.
fn put_batch(
    pool: &rayon::ThreadPool,
    batch: &mut Vec<(Unit, Vec<u8>)>,
    next: &mut u64,
    producer: &Producer<'_>,
    deliver: &mut dyn FnMut(Unit, Piece) -> Result<()>,
) -> Result<()> {
    let made: Vec<(Unit, Result<Piece>)> = pool.install(|| {
        batch
            .par_drain(..)
            .map(|(u, buf)| (u, producer.piece(&u, buf)))
            .collect()
    });
    for (u, p) in made {
        let p = p?;
        if u.start > *next {
            let gap = Unit {
                start: *next,
                len: u.start - *next,
                read: false,
            };
            deliver(gap, Piece::Hole)?;
        }
        *next = u.start + u.len;
        deliver(u, p)?;
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
