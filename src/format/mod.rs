//! On-disk formats, each reader beside its writer: descriptors, hosted sparse extents,
//! streamOptimized files (random access, pipes, writing), flat extents, COWD (ESX 2 REDO
//! logs, vmfsSparse deltas), SESparse (read-only), grain tables being changed, VMware's
//! geometry rules and vmdkit's manifest format. Nothing here knows the copy engine or a
//! command.
//!
//! [`Extent`] is one extent of a layer; [`crate::layer::Layer`] concatenates them.

pub mod cowd;
pub mod descriptor;
pub mod detect;
pub mod geometry;
pub mod manifest;
pub mod output;
pub mod sesparse;
pub mod sparse;
pub mod stream;
pub mod tables;

use std::ops::Range;
use std::path::Path;

/// The largest capacity any VMware product makes (62 TiB, VMFS 5 and later). Larger ones
/// are refused where a disk is made or grown (`import`, `create`, `extend`) unless asked
/// for: a header claiming more is far more often damage or a hostile file than a disk,
/// and its metadata alone would be written for hours.
pub const MAX_CAPACITY: u64 = 62 << 40;

/// Refuse a capacity over [`MAX_CAPACITY`] unless `large`; `what` names the source of
/// the number in the message.
pub fn check_capacity(capacity: u64, large: bool, what: &Path) -> Result<()> {
    if capacity > MAX_CAPACITY && !large {
        return Err(crate::error::Error::refused(
            what,
            format!(
                "`{}`: a capacity of {capacity} bytes ({}) is more than any VMware product makes (62 TiB); nothing was written",
                what.display(),
                crate::units::human(capacity)
            ),
            Some(crate::error::Override::Large),
        ));
    }
    Ok(())
}

use byteorder::ByteOrder;

use crate::disk::{push_run, Alloc, Run};
use crate::error::Result;
use crate::io::Source;
use cowd::CowdExtent;
use sesparse::SeSparseExtent;
use sparse::SparseExtent;

/// A bounded cache of grain tables, shared by the readers' threads.
///
/// Direct-mapped: table `i` lives in slot `i % slots`, so memory is bounded by the slot
/// count (about [`TableCache::BUDGET_BYTES`] of tables per extent), never by the disk's
/// capacity, and a sequential walk (map, export) evicts as it goes. A table read twice
/// costs one more small `pread`.
pub(crate) struct TableCache<E> {
    slots: Box<[CacheSlot<E>]>,
}

/// One slot: which table it holds, and the table.
type CacheSlot<E> = std::sync::Mutex<Option<(usize, std::sync::Arc<[E]>)>>;

impl<E: Copy + Default> TableCache<E> {
    /// Bytes of tables one extent may keep.
    pub(crate) const BUDGET_BYTES: usize = 4 << 20;

    /// A cache for `tables` tables of `entries` entries each.
    pub(crate) fn new(tables: usize, entries: usize) -> TableCache<E> {
        let per = (entries * std::mem::size_of::<E>()).max(1);
        let n = (Self::BUDGET_BYTES / per).clamp(1, tables.max(1));
        TableCache {
            slots: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
        }
    }

    /// Table `i`, from the cache or from `load`.
    pub(crate) fn get(
        &self,
        i: usize,
        load: impl FnOnce() -> Result<Vec<E>>,
    ) -> Result<std::sync::Arc<[E]>> {
        let slot = &self.slots[i % self.slots.len()];
        if let Ok(g) = slot.lock() {
            if let Some((j, t)) = g.as_ref() {
                if *j == i {
                    return Ok(t.clone());
                }
            }
        }
        let t: std::sync::Arc<[E]> = load()?.into();
        if let Ok(mut g) = slot.lock() {
            *g = Some((i, t.clone()));
        }
        Ok(t)
    }
}

/// Read `n` little-endian u32 table entries at `sector` of `src`, through `cache`: the
/// grain tables of hosted sparse and COWD extents.
pub(crate) fn cached_table(
    cache: &TableCache<u32>,
    i: usize,
    src: &Source,
    sector: u32,
    n: usize,
) -> Result<std::sync::Arc<[u32]>> {
    cache.get(i, || {
        let mut raw = vec![0u8; n * 4];
        src.read_exact_at(&mut raw, u64::from(sector) * sparse::SECTOR)?;
        let mut t = vec![0u32; n];
        byteorder::LittleEndian::read_u32_into(&raw, &mut t);
        Ok(t)
    })
}

/// Map `rel` (extent-relative, clipped to `len`) over a two-level grain table, pushing
/// runs at `base + rel` into `out`. `table(gdi)` gives directory entry `gdi`'s table, or
/// None when the entry is empty (its whole range is unallocated); `entry(table, g, gdi)`
/// says what grain `g` is, with `Data`/`Compressed` offsets at the grain's start. Offsets
/// of partial grains and the extent index are filled in here. Hosted sparse, COWD and
/// SESparse extents all map through this.
#[allow(clippy::too_many_arguments)]
pub(crate) fn map_grains<T>(
    index: usize,
    len: u64,
    grain: u64,
    per_table: u64,
    rel: Range<u64>,
    base: u64,
    out: &mut Vec<Run>,
    table: impl Fn(usize) -> Result<Option<T>>,
    entry: impl Fn(&T, u64, usize) -> Result<Alloc>,
) -> Result<()> {
    let end = rel.end.min(len);
    let span = grain * per_table;
    let mut pos = rel.start;
    while pos < end {
        let gdi = (pos / span) as usize;
        let table_end = ((gdi as u64 + 1) * span).min(end);
        let Some(t) = table(gdi)? else {
            push_run(out, mk(base + pos, table_end - pos, Alloc::Unallocated));
            pos = table_end;
            continue;
        };
        while pos < table_end {
            let g = pos / grain;
            let gstart = g * grain;
            let stop = (gstart + grain).min(table_end);
            let alloc = match entry(&t, g, gdi)? {
                Alloc::Data { offset, .. } => Alloc::Data {
                    extent: index,
                    offset: offset + (pos - gstart),
                },
                Alloc::Compressed { offset, .. } => Alloc::Compressed {
                    extent: index,
                    offset,
                },
                a => a,
            };
            push_run(out, mk(base + pos, stop - pos, alloc));
            pos = stop;
        }
    }
    Ok(())
}

/// A flat extent: `len` bytes at `offset` in a file or device.
#[derive(Debug)]
pub struct FlatExtent {
    /// The file or device.
    pub src: Source,
    /// Byte offset of the extent in the file.
    pub offset: u64,
    /// Virtual length in bytes.
    pub len: u64,
}

impl FlatExtent {
    fn map(&self, index: usize, rel: Range<u64>, base: u64, out: &mut Vec<Run>) {
        let end = rel.end.min(self.len);
        let mut pos = rel.start;
        while pos < end {
            let file_pos = self.offset + pos;
            let (d0, d1) = match self.src.next_data(file_pos) {
                Some((a, b)) => (a.saturating_sub(self.offset), b.saturating_sub(self.offset)),
                None => (end, end),
            };
            let d0 = d0.clamp(pos, end);
            let d1 = d1.clamp(d0, end);
            if d0 > pos {
                push_run(
                    out,
                    mk(
                        base + pos,
                        d0 - pos,
                        Alloc::Hole {
                            extent: index,
                            offset: self.offset + pos,
                        },
                    ),
                );
            }
            if d1 > d0 {
                push_run(
                    out,
                    mk(
                        base + d0,
                        d1 - d0,
                        Alloc::Data {
                            extent: index,
                            offset: self.offset + d0,
                        },
                    ),
                );
            }
            if d1 <= pos {
                // No progress possible (cannot happen with a sane lseek): treat as data.
                push_run(
                    out,
                    mk(
                        base + pos,
                        end - pos,
                        Alloc::Data {
                            extent: index,
                            offset: self.offset + pos,
                        },
                    ),
                );
                break;
            }
            pos = d1;
        }
    }
}

fn mk(start: u64, len: u64, alloc: Alloc) -> Run {
    Run {
        start,
        len,
        alloc,
        depth: 0,
    }
}

/// One extent of a layer.
#[derive(Debug)]
pub enum Extent {
    /// Raw bytes in a file or device (FLAT, VMFS, VMFSRAW, VMFSRDM).
    Flat(FlatExtent),
    /// Hosted sparse or stream extent.
    Sparse(Box<SparseExtent>),
    /// COWD extent (REDO log, vmfsSparse delta).
    Cowd(Box<CowdExtent>),
    /// SESparse delta.
    SeSparse(Box<SeSparseExtent>),
    /// Zeros, nothing stored (ZERO, NOACCESS).
    Zero {
        /// Virtual length in bytes.
        len: u64,
    },
}

impl Extent {
    /// Virtual length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Flat(f) => f.len,
            Extent::Sparse(s) => s.len(),
            Extent::Cowd(c) => c.len(),
            Extent::SeSparse(s) => s.len(),
            Extent::Zero { len } => *len,
        }
    }

    /// Grain size in bytes (512 where there are no grains).
    pub fn grain_bytes(&self) -> u64 {
        match self {
            Extent::Sparse(s) => s.grain_bytes(),
            Extent::Cowd(c) => c.grain_bytes(),
            Extent::SeSparse(_) => 4096,
            _ => 512,
        }
    }

    /// Runs of the extent-relative range `rel`, placed at `base + rel`.
    pub fn map(&self, index: usize, rel: Range<u64>, base: u64, out: &mut Vec<Run>) -> Result<()> {
        match self {
            Extent::Flat(f) => {
                f.map(index, rel, base, out);
                Ok(())
            }
            Extent::Sparse(s) => s.map(index, rel, base, out),
            Extent::Cowd(c) => c.map(index, rel, base, out),
            Extent::SeSparse(s) => s.map(index, rel, base, out),
            Extent::Zero { len } => {
                let end = rel.end.min(*len);
                if end > rel.start {
                    push_run(out, mk(base + rel.start, end - rel.start, Alloc::Zero));
                }
                Ok(())
            }
        }
    }

    /// Hint that the `len` bytes at `file_offset` of this extent's file (a `Data` or
    /// `Compressed` run) will be read soon.
    pub fn will_need(&self, file_offset: u64, len: u64) {
        match self {
            Extent::Flat(f) => f.src.will_need(file_offset, len),
            Extent::Sparse(s) => s.source().will_need(file_offset, len),
            Extent::Cowd(c) => c.source().will_need(file_offset, len),
            Extent::SeSparse(s) => s.source().will_need(file_offset, len),
            Extent::Zero { .. } => {}
        }
    }

    /// Read bytes of a `Data` run at `file_offset`.
    pub fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        match self {
            Extent::Flat(f) => f.src.read_at_zero_fill(buf, file_offset).map(|_| ()),
            Extent::Sparse(s) => s.read_data(buf, file_offset),
            Extent::Cowd(c) => c.source().read_at_zero_fill(buf, file_offset).map(|_| ()),
            Extent::SeSparse(s) => s.source().read_at_zero_fill(buf, file_offset).map(|_| ()),
            Extent::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Read part of a compressed grain: `rel` is the extent-relative offset of `buf[0]`.
    pub fn read_compressed(&self, buf: &mut [u8], record: u64, rel: u64) -> Result<()> {
        match self {
            Extent::Sparse(s) => {
                let gb = s.grain_bytes();
                let gstart = rel / gb * gb;
                let grain = s.read_grain(record, gstart)?;
                let from = (rel - gstart) as usize;
                let n = buf.len().min(grain.len().saturating_sub(from));
                buf[..n].copy_from_slice(&grain[from..from + n]);
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}
