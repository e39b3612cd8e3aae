//! The ordered parallel pipeline: plan from `map()` (metadata only), produce in parallel
//! on rayon (read, zero-detect, compress), one sink consuming results in order.
//!
//! Work moves in windows of `window` units. While the pool produces window k+1, the sink
//! consumes window k (`rayon::join`), so reading/compressing and writing overlap.
//! Memory: at most two windows of produced units are alive, i.e. about
//! `2 × window × unit_bytes` (plus compressed output of the same order); with the
//! defaults (`window = 4 × threads`, 1 MiB units) that is 16 MiB on 2 threads.

use rayon::prelude::*;

use crate::disk::VirtualDisk;
use crate::error::{Error, Result};

/// One piece of work: `len` bytes at `start`. `read` is false for ranges the map says
/// read as zeros (no I/O needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// First byte.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Whether the range must be read (false: known zeros).
    pub read: bool,
}

/// Default unit size: 1 MiB (16 grains of 64 KiB).
pub const DEFAULT_UNIT: u64 = 1 << 20;

/// How much address space one `map()` call plans at once.
const PLAN_SLICE: u64 = 1 << 30;

/// Plans units over `[0, capacity)` lazily, one map slice at a time. Read units are
/// aligned to `unit` and at most `unit` long; hole units may be long.
pub struct Planner<'a> {
    disk: &'a dyn VirtualDisk,
    unit: u64,
    pos: u64,
    cap: u64,
    queue: std::collections::VecDeque<Unit>,
}

impl<'a> Planner<'a> {
    /// A planner over the whole disk.
    pub fn new(disk: &'a dyn VirtualDisk, unit: u64) -> Planner<'a> {
        Planner {
            disk,
            unit: unit.max(512),
            pos: 0,
            cap: disk.capacity(),
            queue: Default::default(),
        }
    }

    fn fill(&mut self) -> Result<()> {
        let start = self.pos;
        let end = (start + PLAN_SLICE).min(self.cap);
        self.pos = end;
        let runs = self.disk.map(start..end)?;
        // For each unit-aligned block: does any run in it need reading?
        let mut need: Vec<(u64, u64)> = Vec::new(); // merged data ranges
        for r in &runs {
            if !r.alloc.reads_as_zero() {
                match need.last_mut() {
                    Some(l) if l.1 == r.start => l.1 = r.end(),
                    _ => need.push((r.start, r.end())),
                }
            }
        }
        let mut cur = start;
        let u = self.unit;
        for (a, b) in need {
            let a_al = a / u * u;
            let a_al = a_al.max(cur);
            if a_al > cur {
                self.push(cur, a_al - cur, false);
            }
            let b_al = b.div_ceil(u).saturating_mul(u).min(end);
            let mut p = a_al;
            while p < b_al {
                let e = ((p / u + 1) * u).min(b_al);
                self.push(p, e - p, true);
                p = e;
            }
            cur = cur.max(b_al);
        }
        if cur < end {
            self.push(cur, end - cur, false);
        }
        Ok(())
    }

    fn push(&mut self, start: u64, len: u64, read: bool) {
        if len == 0 {
            return;
        }
        if !read {
            if let Some(last) = self.queue.back_mut() {
                if !last.read && last.start + last.len == start {
                    last.len += len;
                    return;
                }
            }
        }
        self.queue.push_back(Unit { start, len, read });
    }

    /// The next unit, if any.
    pub fn next_unit(&mut self) -> Result<Option<Unit>> {
        while self.queue.is_empty() {
            if self.pos >= self.cap {
                return Ok(None);
            }
            self.fill()?;
        }
        // Merge adjacent hole units across slices.
        let mut u = self.queue.pop_front().expect("not empty");
        if !u.read {
            loop {
                if self.queue.is_empty() && self.pos < self.cap {
                    self.fill()?;
                }
                match self.queue.front() {
                    Some(n) if !n.read && n.start == u.start + u.len => {
                        u.len += n.len;
                        self.queue.pop_front();
                    }
                    _ => break,
                }
            }
        }
        Ok(Some(u))
    }
}

/// Pipeline settings.
#[derive(Debug, Clone, Copy)]
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

/// A source of units in address order.
pub trait Units {
    /// The next unit, or None at the end.
    fn next_unit(&mut self) -> Result<Option<Unit>>;
}

impl Units for Planner<'_> {
    fn next_unit(&mut self) -> Result<Option<Unit>> {
        Planner::next_unit(self)
    }
}

impl Units for std::vec::IntoIter<Unit> {
    fn next_unit(&mut self) -> Result<Option<Unit>> {
        Ok(self.next())
    }
}

/// Run the pipeline over every unit `planner` yields: `produce` runs in parallel,
/// `sink` sees every unit and its product in address order.
pub fn run<O, P, S>(
    planner: &mut dyn Units,
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
    let window = pool.current_num_threads() * 4;
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
