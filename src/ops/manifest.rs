//! `verify`: re-read a disk and compare every 1 MiB block with a manifest written by
//! `export --manifest` (`crate::format::manifest`), naming every range that differs.

use crate::copy::{self as pipeline, PipelineOptions};
use crate::disk::VirtualDisk;
use crate::error::Result;
use crate::ops::Progress;

pub use crate::format::manifest::Manifest;
use crate::format::manifest::{ManifestBuilder, BLOCK};

/// Result of [`verify`].
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct Verification {
    /// Byte ranges whose blocks differ (adjacent blocks merged).
    pub differing: Vec<std::ops::Range<u64>>,
    /// Set when the capacities differ (then nothing else is compared past the shorter).
    pub capacity_mismatch: Option<String>,
    /// Whether the whole-content CRC matched.
    pub total_matches: bool,
}

impl Verification {
    /// Everything matched.
    pub fn ok(&self) -> bool {
        self.differing.is_empty() && self.capacity_mismatch.is_none() && self.total_matches
    }

    /// One line per differing range (bytes and 1 MiB blocks), and a capacity mismatch.
    pub fn write_text(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for r in &self.differing {
            // As people write ranges: from - to, both ends inclusive in the hex.
            let (a, b) = (r.start / BLOCK, (r.end - 1) / BLOCK);
            let blocks = if a == b {
                format!("1 MiB block {a}")
            } else {
                format!("1 MiB blocks {a}-{b}")
            };
            writeln!(
                out,
                "differs: {} - {} (bytes {:#x}-{:#x}, {blocks})",
                crate::units::human(r.start),
                crate::units::human(r.end),
                r.start,
                r.end - 1,
            )?;
        }
        if let Some(msg) = &self.capacity_mismatch {
            writeln!(out, "differs: {msg}")?;
        }
        Ok(())
    }
}

/// Re-read `disk` and compare every block with `m`.
pub fn verify(
    disk: &dyn VirtualDisk,
    m: &Manifest,
    popts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<Verification> {
    // A guest-aware export's manifest: its omitted grains are zeroed in what is read,
    // as they were in what it hashed.
    let omitted = omitted_of(m);
    let view = crate::guest::GuestView::new(disk, &omitted);
    let b = ManifestBuilder::new(disk.capacity());
    let b = pipeline::manifest_of(&view, b, popts, progress)?;
    compare(disk.capacity(), &b.finish(), m)
}

fn omitted_of(m: &Manifest) -> crate::guest::FreeMap {
    crate::guest::FreeMap::from_masks(m.omitted.iter().copied(), BLOCK)
}

/// Read a disk arriving on a pipe (a stream or sparse file, a tar of one, or with
/// `raw_size` that many raw bytes: a backup on its way from tape, checked without
/// restoring it) and compare it with `m`.
pub fn verify_reader(
    input: &mut (dyn std::io::Read + Send),
    raw_size: Option<u64>,
    m: &Manifest,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Verification> {
    let mut pipe = crate::copy::feed::PipeInput::open(input, raw_size)?;
    let cap = pipe.capacity;
    verify_feed(&mut pipe, cap, m, threads, progress)
}

fn verify_feed(
    feed: &mut dyn pipeline::Feed,
    capacity: u64,
    m: &Manifest,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Verification> {
    let mut b = ManifestBuilder::new(capacity);
    let omitted = omitted_of(m);
    let pool = pipeline::pool(threads)?;
    // The pipe is read and inflated on a thread of its own, the blocks hashed on the
    // pool, the manifest built here in order.
    pipeline::ordered(
        &pool,
        pool.current_num_threads() * 8,
        &mut |sp| pipeline::feed_units(feed, &pool, capacity, sp),
        &|(u, buf): (pipeline::Unit, Option<Vec<u8>>)| {
            Ok((
                u,
                buf.map(|mut buf| {
                    omitted.zero_in(&mut buf, u.start);
                    let mut h = crc32fast::Hasher::new();
                    h.update(&buf);
                    pipeline::buffers::give(buf);
                    h
                }),
            ))
        },
        &mut |(u, h)| {
            b.unit(u.start, u.len, h);
            if u.read {
                progress.inc(u.len);
            }
            Ok(())
        },
    )?;
    compare(capacity, &b.finish(), m)
}

fn compare(capacity: u64, text: &[u8], m: &Manifest) -> Result<Verification> {
    let mut v = Verification::default();
    if capacity != m.capacity {
        v.capacity_mismatch = Some(format!(
            "capacity is {capacity} bytes, the manifest says {}",
            m.capacity
        ));
    }
    let text = std::str::from_utf8(text).expect("ascii");
    let ours = Manifest::parse(text, std::path::Path::new("<computed>"))?;
    for (i, (a, e)) in ours.blocks.iter().zip(&m.blocks).enumerate() {
        if a != e {
            let start = i as u64 * BLOCK;
            let end = (start + BLOCK).min(capacity);
            match v.differing.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => v.differing.push(start..end),
            }
        }
    }
    v.total_matches = ours.total == m.total;
    Ok(v)
}
