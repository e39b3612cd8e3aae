//! Inflating a pipe stream's grain records in batches: on a pool in the background (two
//! batches in flight while the reader reads on), or on the caller's thread without one.
//! Grains leave in stream order, either as pieces or already laid out in the engine's
//! units (no copy between inflating and the sink).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::Emit;
use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::format::stream::read::{inflate_grain, inflate_grain_into};
use crate::mem::{buffers, is_zero};

/// Receives whole units `(start, buffer)`; the buffer is the receiver's (taken from
/// `mem::buffers`, so it can go back there).
pub type PutUnit<'a> = &'a mut dyn FnMut(u64, Vec<u8>) -> Result<()>;

/// Where a stream's grains go.
pub enum Out<'a> {
    /// `(virtual offset, bytes)` pieces, one per grain, in order.
    Pieces(Emit<'a>),
    /// Units of the given length (a multiple of the grain size), aligned, the disk's
    /// last one shorter; what no grain covers is zeros; units all zeros are left out.
    Units(usize, PutUnit<'a>),
}

/// Grain records: (LBA, record with its 12-byte head).
pub(super) type Records = Vec<(u64, Vec<u8>)>;

/// What a batch became.
enum Made {
    /// Grain after grain, `grain` bytes each.
    Grains(Vec<u8>),
    /// Units `(start, buffer)`, `None` for one all zeros.
    Units(Vec<(u64, Option<Vec<u8>>)>),
}

type Inflated = (Records, Result<Made>);

/// The fixed facts of one stream.
#[derive(Clone)]
struct Shape {
    grain: usize,
    cap: u64,
    /// Unit length in units mode.
    unit: Option<usize>,
    name: PathBuf,
}

pub(super) struct Inflater<'p, 'o> {
    pool: Option<&'p rayon::ThreadPool>,
    shape: Shape,
    base: u64,
    out: Out<'o>,
    pending: std::collections::VecDeque<std::sync::mpsc::Receiver<Inflated>>,
    /// Buffers of emitted batches (pieces mode), for the next ones (fresh buffers cost
    /// page faults).
    spare: Vec<Vec<u8>>,
    /// Record buffers of emitted batches, for the next records.
    records: Vec<Vec<u8>>,
}

/// Record buffers kept for reuse (one batch's worth).
const KEEP_RECORDS: usize = 64;

impl<'p, 'o> Inflater<'p, 'o> {
    pub(super) fn new(
        pool: Option<&'p rayon::ThreadPool>,
        grain: usize,
        cap: u64,
        base: u64,
        name: &Path,
        out: Out<'o>,
    ) -> Result<Self> {
        let unit = match &out {
            Out::Pieces(_) => None,
            Out::Units(u, _) => {
                if *u == 0 || *u % grain != 0 || base != 0 {
                    return Err(Error::InvalidInput(format!(
                        "units of {u} bytes cannot hold {grain}-byte grains"
                    )));
                }
                Some(*u)
            }
        };
        Ok(Inflater {
            pool,
            shape: Shape {
                grain,
                cap,
                unit,
                name: name.to_path_buf(),
            },
            base,
            out,
            pending: Default::default(),
            spare: Vec::new(),
            records: Vec::new(),
        })
    }

    /// A buffer for the next record (reused: fresh ones cost page faults).
    pub(super) fn record_buf(&mut self) -> Vec<u8> {
        self.records.pop().unwrap_or_default()
    }

    /// Whether a batch may end between grains at LBAs `a` and `b` (in units mode, a
    /// unit's grains stay in one batch).
    pub(super) fn may_cut(&self, a: u64, b: u64) -> bool {
        let span = self.shape.unit.unwrap_or(self.shape.grain) as u64;
        a * SECTOR / span != b * SECTOR / span
    }

    pub(super) fn push(&mut self, batch: Records) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let spare = self.spare.pop().unwrap_or_default();
        let Some(pool) = self.pool else {
            let made = self.shape.make(&batch, spare);
            return self.emit((batch, made));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let shape = self.shape.clone();
        pool.spawn(move || {
            let made = shape.make(&batch, spare);
            let _ = tx.send((batch, made));
        });
        self.pending.push_back(rx);
        while self.pending.len() > 2 {
            self.next()?;
        }
        Ok(())
    }

    fn next(&mut self) -> Result<()> {
        let Some(rx) = self.pending.pop_front() else {
            return Ok(());
        };
        let done = rx
            .recv()
            .map_err(|_| Error::corrupt(&self.shape.name, 0, "a grain could not be inflated"))?;
        self.emit(done)
    }

    fn emit(&mut self, (batch, made): Inflated) -> Result<()> {
        match (made?, &mut self.out) {
            (Made::Grains(out), Out::Pieces(emit)) => {
                let grain = self.shape.grain;
                for ((lba, _), g) in batch.iter().zip(out.chunks(grain)) {
                    let start = lba * SECTOR;
                    let want = (self.shape.cap - start).min(grain as u64) as usize;
                    emit(self.base + start, &g[..want])?;
                }
                self.spare.push(out);
            }
            (Made::Units(units), Out::Units(_, put)) => {
                for (start, buf) in units {
                    if let Some(buf) = buf {
                        put(start, buf)?;
                    }
                }
            }
            _ => unreachable!("a batch is made for its inflater's output"),
        }
        let room = KEEP_RECORDS.saturating_sub(self.records.len());
        self.records
            .extend(batch.into_iter().take(room).map(|(_, rec)| rec));
        Ok(())
    }

    /// Hand out every batch still in flight.
    pub(super) fn drain(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.next()?;
        }
        Ok(())
    }
}

impl Shape {
    fn make(&self, batch: &[(u64, Vec<u8>)], spare: Vec<u8>) -> Result<Made> {
        match self.unit {
            None => self.grains(batch, spare).map(Made::Grains),
            Some(unit) => self.units(batch, unit).map(Made::Units),
        }
    }

    fn bad(&self, lba: u64, why: String) -> Error {
        Error::corrupt(&self.name, 0, format!("grain at LBA {lba}: {why}"))
    }

    /// Inflate each grain into its `grain` bytes of one buffer.
    fn grains(&self, batch: &[(u64, Vec<u8>)], mut out: Vec<u8>) -> Result<Vec<u8>> {
        let grain = self.grain;
        out.resize(batch.len() * grain, 0);
        out.par_chunks_mut(grain)
            .zip(batch.par_iter())
            .try_for_each(|(out, (lba, cmp))| {
                let want = (self.cap - lba * SECTOR).min(grain as u64) as usize;
                inflate_grain_into(&cmp[12..], want, out)
                    .map(|_| ())
                    .map_err(|w| self.bad(*lba, w))
            })?;
        Ok(out)
    }

    /// Inflate the grains straight into the units they fall in (one task per unit);
    /// the gaps between them are zeroed.
    fn units(&self, batch: &[(u64, Vec<u8>)], unit: usize) -> Result<Vec<(u64, Option<Vec<u8>>)>> {
        let unit_of = |lba: u64| lba * SECTOR / unit as u64 * unit as u64;
        let mut groups = Vec::new();
        let mut rest = batch;
        while let Some(&(first, _)) = rest.first() {
            let us = unit_of(first);
            let n = rest.iter().take_while(|(l, _)| unit_of(*l) == us).count();
            groups.push((us, &rest[..n]));
            rest = &rest[n..];
        }
        groups
            .into_par_iter()
            .map(|(us, recs)| {
                let len = (self.cap - us).min(unit as u64) as usize;
                let mut buf = buffers::take(len);
                let mut filled = 0;
                for (lba, cmp) in recs {
                    let start = lba * SECTOR;
                    let o = (start - us) as usize;
                    let want = (self.cap - start).min(self.grain as u64) as usize;
                    buf[filled..o].fill(0);
                    let slot = &mut buf[o..o + want];
                    if want == self.grain {
                        inflate_grain_into(&cmp[12..], want, slot)
                            .map_err(|w| self.bad(*lba, w))?;
                    } else {
                        // The disk's last grain, cut by the capacity: it may inflate
                        // whole.
                        let g = inflate_grain(&cmp[12..], want, self.grain)
                            .map_err(|w| self.bad(*lba, w))?;
                        slot.copy_from_slice(&g);
                    }
                    filled = o + want;
                }
                buf[filled..].fill(0);
                if is_zero(&buf) {
                    buffers::give(buf);
                    return Ok((us, None));
                }
                Ok((us, Some(buf)))
            })
            .collect()
    }
}
