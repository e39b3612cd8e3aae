//! A disk that is written and read coherently: a chain whose top layer is written
//! through a [`LayerWriter`], and read through the same writer's tables, so every read
//! sees every write before it, flushed or not (an open [`Chain`] caches its tables and
//! would not). The layers below are only read.
//!
//! Durability is the writer's: grain data is synced before the tables that point at it,
//! tables before directories ([`LayerWriter::flush`]); until a flush, a crash loses the
//! writes since the last one but never makes the layer point at garbage.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::chain::Chain;
use crate::disk::{Run, VirtualDisk};
use crate::error::{Error, Result};
use crate::layer::OpenOptions;
use crate::write::LayerWriter;

/// A chain open for writing into its top layer, read coherently.
pub struct WritableDisk {
    chain: Chain,
    writer: Mutex<LayerWriter>,
    dirty: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for WritableDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritableDisk")
            .field("top", &self.chain.top().path)
            .finish()
    }
}

impl WritableDisk {
    /// Open the chain whose top is `top` for writing into that top layer (the caller
    /// holds its locks).
    pub fn open(top: &Path, opts: &OpenOptions) -> Result<WritableDisk> {
        let d = Self::open_with(top, opts, false)?;
        d.writer()?.check_writable(0, d.capacity())?;
        Ok(d)
    }

    /// Like [`open`](Self::open), with `opts` for the chain, and `allow_device`
    /// permitting writes into device-backed disks; what may be written is checked per
    /// write ([`check_writable`](Self::check_writable)).
    pub fn open_with(top: &Path, opts: &OpenOptions, allow_device: bool) -> Result<WritableDisk> {
        let chain = Chain::open(
            top,
            &OpenOptions {
                mode: crate::io::SourceMode::Pread,
                ..*opts
            },
        )?;
        let writer = LayerWriter::open_with(chain.top(), allow_device)?;
        Ok(WritableDisk {
            chain,
            writer: Mutex::new(writer),
            dirty: false.into(),
        })
    }

    /// The top layer's writer (see [`parts`](Self::parts)).
    pub fn writer_mut(&mut self) -> &mut LayerWriter {
        match self.writer.get_mut() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        }
    }

    /// The top layer's writer and a reader of what lies under it, for the commands that
    /// drive the writer themselves (apply's copy-on-write writes and journal, commit's
    /// journal): their writes go through this model's one writer.
    pub fn parts(
        &mut self,
    ) -> (
        &mut LayerWriter,
        impl Fn(&mut [u8], u64) -> Result<()> + Sync + '_,
    ) {
        let chain = &self.chain;
        let writer = match self.writer.get_mut() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        (writer, move |buf: &mut [u8], off: u64| {
            chain.read_below(1, buf, off)
        })
    }

    /// Refuse, before anything is written, a range past the capacity or over an
    /// extent that cannot be written.
    pub fn check_writable(&self, off: u64, len: u64) -> Result<()> {
        self.writer()?.check_writable(off, len)
    }

    /// Give the top layer a new content ID (written at once), as VMware does on the first
    /// write after an open: children made before it no longer match.
    pub fn new_cid(&mut self) -> Result<()> {
        crate::write::set_cid(
            &mut self.chain.layers[0],
            crate::format::descriptor::random_cid(),
        )
    }

    /// The chain (its layers as opened; the top's tables there are not current).
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, LayerWriter>> {
        self.writer.lock().map_err(|_| {
            Error::chain(
                &self.chain.top().path,
                "a write failed half way in another thread",
            )
        })
    }

    fn below(&self) -> impl Fn(&mut [u8], u64) -> Result<()> + Sync + '_ {
        move |buf: &mut [u8], off: u64| self.chain.read_below(1, buf, off)
    }

    /// Write `data` at `off` into the top layer.
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        let below = self.below();
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        self.writer()?.write_at(data, off, &below)
    }

    /// Write zeros over `[off, off+len)` (zeroed grains where the format has them).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        let below = self.below();
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        self.writer()?.write_zeroes(off, len, &below)
    }

    /// Make every write so far durable.
    pub fn flush(&self) -> Result<()> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.writer()?.flush()?;
        }
        Ok(())
    }
}

impl VirtualDisk for WritableDisk {
    fn capacity(&self) -> u64 {
        self.chain.capacity()
    }

    fn granularity(&self) -> u64 {
        self.chain.granularity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let below = self.below();
        self.writer()?.read_at(buf, offset, &below)
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let top = self.writer()?.map_at(range)?;
        let mut out = Vec::new();
        for (start, len, alloc) in top {
            match alloc {
                Some(alloc) => crate::disk::push_run(
                    &mut out,
                    Run {
                        start,
                        len,
                        alloc,
                        depth: 0,
                    },
                ),
                None if self.chain.layers.len() > 1 => {
                    for r in self.chain.map_below(1, start..start + len)? {
                        crate::disk::push_run(&mut out, r);
                    }
                }
                None => crate::disk::push_run(
                    &mut out,
                    Run {
                        start,
                        len,
                        alloc: crate::disk::Alloc::Unallocated,
                        depth: 0,
                    },
                ),
            }
        }
        Ok(out)
    }

    fn source_files(&self) -> Vec<PathBuf> {
        self.chain.source_files()
    }
}
