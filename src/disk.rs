//! The read model: [`VirtualDisk`], allocation [`Run`]s and [`Alloc`] states.

use std::ops::Range;

use crate::error::Result;

/// What one range of a disk is, answered from metadata only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// Not present in this layer: the parent decides (zeros at the base).
    Unallocated,
    /// Reads as zeros and hides the parent (zeroed grain, `ZERO` extent).
    Zero,
    /// Stored uncompressed at `offset` bytes in extent file `extent` of the layer.
    Data {
        /// Index of the extent in its layer.
        extent: usize,
        /// Byte offset in the extent's file.
        offset: u64,
    },
    /// Stored in a filesystem hole of a flat extent: allocated in this layer (hides a
    /// parent) but reads as zeros, so copying it can be skipped.
    Hole {
        /// Index of the extent in its layer.
        extent: usize,
        /// Byte offset in the extent's file.
        offset: u64,
    },
    /// A compressed grain whose record starts at `offset` in extent `extent`.
    Compressed {
        /// Index of the extent in its layer.
        extent: usize,
        /// Byte offset of the grain record in the extent's file.
        offset: u64,
    },
}

impl Alloc {
    /// Whether reads of this range return zeros without touching data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self, Alloc::Unallocated | Alloc::Zero | Alloc::Hole { .. })
    }

    /// Whether this layer decides the content (everything but `Unallocated`).
    pub fn is_present(&self) -> bool {
        !matches!(self, Alloc::Unallocated)
    }
}

/// A maximal range of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte (virtual offset).
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// State of the range.
    pub alloc: Alloc,
    /// Layer that decides it: 0 = the top of the chain. For `Unallocated` runs it is the
    /// depth of the base (as `qemu-img map` reports).
    pub depth: u32,
}

impl Run {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A virtual disk: a single layer or a whole chain.
pub trait VirtualDisk: Send + Sync {
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// Allocation granularity in bytes (the grain size; 512 for flat disks).
    fn granularity(&self) -> u64;
    /// Allocation runs covering `range` (clipped to the capacity), in order, from
    /// metadata alone.
    fn map(&self, range: Range<u64>) -> Result<Vec<Run>>;
    /// Read exactly `buf.len()` bytes at `offset`. Many threads may call this at once.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The files this disk reads (descriptors and extents of every layer): outputs must
    /// never be one of them, and commands lock them while they read.
    fn source_files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
    /// A hint that `range` will be read soon: a disk backed by files may start reading
    /// the data behind it from storage now, so the read does not wait for the disk.
    /// Never needed for correctness; the default does nothing.
    fn will_need(&self, _range: Range<u64>) {}
}

/// Append `run` to `out`, merging it into the last run when they continue each other.
pub(crate) fn push_run(out: &mut Vec<Run>, run: Run) {
    if run.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == run.start && last.depth == run.depth {
            let merged = match (last.alloc, run.alloc) {
                (Alloc::Unallocated, Alloc::Unallocated) | (Alloc::Zero, Alloc::Zero) => true,
                (
                    Alloc::Data {
                        extent: e1,
                        offset: o1,
                    },
                    Alloc::Data {
                        extent: e2,
                        offset: o2,
                    },
                )
                | (
                    Alloc::Hole {
                        extent: e1,
                        offset: o1,
                    },
                    Alloc::Hole {
                        extent: e2,
                        offset: o2,
                    },
                ) => e1 == e2 && o1 + last.len == o2,
                _ => false,
            };
            if merged {
                last.len += run.len;
                return;
            }
        }
    }
    out.push(run);
}

/// A disk of zeros (nothing allocated): the source of `create`, and a stand-in capacity
/// for outputs fed from a stream.
#[derive(Debug, Clone, Copy)]
pub struct ZeroDisk(pub u64);

impl VirtualDisk for ZeroDisk {
    fn capacity(&self) -> u64 {
        self.0
    }
    fn granularity(&self) -> u64 {
        512
    }
    fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let end = range.end.min(self.0);
        Ok(if range.start < end {
            vec![Run {
                start: range.start,
                len: end - range.start,
                alloc: Alloc::Unallocated,
                depth: 0,
            }]
        } else {
            vec![]
        })
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}
