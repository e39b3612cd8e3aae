//! Writing a hosted sparse extent (monolithicSparse, or one extent of a split disk) in
//! the layout of [`SparseLayout`]: grains packed in ascending order after the metadata,
//! each grain table written as soon as the grains it covers are all in (so memory is one
//! table span, not the disk), the header, descriptor and directories last.
//!
//! Its use is shown by the tests at the end of this file (`write_grains` in ascending
//! order, then `finish`).
//!
//! It knows nothing of chains or the copy engine; the engine's sparse sink feeds it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{sector_entry, GrainEntries, SparseLayout, SECTOR};
use crate::error::{Error, Result};
use crate::io::write_error;

/// Grain size of the sparse files vmdkit writes (128 sectors).
const GRAIN_BYTES: u64 = 65536;

/// Writes one hosted sparse extent; see the module docs.
pub struct SparseWriter {
    file: File,
    name: PathBuf,
    layout: SparseLayout,
    descriptor: Option<Vec<u8>>,
    entries: GrainEntries,
    /// Grains stored so far.
    stored: u64,
    /// Next grain index a write may start at.
    next_grain: u64,
}

impl SparseWriter {
    /// An extent of `capacity` bytes with `descriptor` embedded (None for the extents of
    /// a split disk); `name` names it in errors.
    pub fn new(file: File, capacity: u64, descriptor: Option<&[u8]>, name: &Path) -> SparseWriter {
        let desc_sectors = descriptor.map_or(0, embedded_sectors);
        let layout = SparseLayout::new(capacity / SECTOR, desc_sectors);
        SparseWriter {
            file,
            name: name.to_path_buf(),
            entries: GrainEntries::new(layout.gtes),
            layout,
            descriptor: descriptor.map(<[u8]>::to_vec),
            stored: 0,
            next_grain: 0,
        }
    }

    /// Store `data` (whole grains; the last grain of the extent may be short) as grains
    /// `first..`; grains come in ascending order. Tables wholly before `first` are
    /// complete and written out.
    pub fn write_grains(&mut self, first: u64, data: &[u8]) -> Result<()> {
        let n = data.len().div_ceil(GRAIN_BYTES as usize) as u64;
        if first < self.next_grain || first + n > self.layout.num_grains {
            return Err(Error::InvalidInput(format!(
                "sparse grains {first}..{} out of order or past the extent's {} grains",
                first + n,
                self.layout.num_grains
            )));
        }
        self.flush_tables_before(first)?;
        let at = self.layout.grain_sector(self.stored) * SECTOR;
        for j in 0..n {
            let e = sector_entry(&self.name, self.layout.grain_sector(self.stored + j))?;
            self.entries.set(first + j, e);
        }
        self.file
            .write_all_at(data, at)
            .map_err(|e| write_error(&self.name, at, e))?;
        self.stored += n;
        self.next_grain = first + n;
        Ok(())
    }

    /// Bytes of the file up to the end of the last grain stored.
    pub fn file_bytes(&self) -> u64 {
        self.layout.file_bytes(self.stored)
    }

    /// Write the tables that cover only grains below `grain` (they are complete).
    pub fn flush_tables_before(&mut self, grain: u64) -> Result<()> {
        for (t, entries) in self.entries.take_before(grain / self.layout.gtes) {
            for (at, bytes) in self.layout.table_writes(t, &entries) {
                self.file
                    .write_all_at(&bytes, at)
                    .map_err(|e| write_error(&self.name, at, e))?;
            }
        }
        Ok(())
    }

    /// Write the remaining tables, the directories, the descriptor and the header; size
    /// the file. Returns the file, its size in bytes and the grains stored.
    pub fn finish(self) -> Result<(File, u64, u64)> {
        let (file, name) = (&self.file, &self.name);
        self.layout.for_each_metadata_write(
            &self.entries,
            self.descriptor.as_deref(),
            |at, bytes| {
                file.write_all_at(bytes, at)
                    .map_err(|e| write_error(name, at, e))
            },
        )?;
        let size = self.layout.file_bytes(self.stored);
        file.set_len(size).map_err(|e| write_error(name, size, e))?;
        Ok((self.file, size, self.stored))
    }
}

/// Descriptor sectors reserved in a monolithic sparse file (at least 20, as VMware).
pub fn embedded_sectors(text: &[u8]) -> u64 {
    (text.len() as u64).div_ceil(SECTOR).max(20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::VirtualDisk;

    /// A file written grain by grain reads back through the sparse reader.
    #[test]
    fn a_sparse_file_written_alone_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.vmdk");
        let desc = crate::format::descriptor::Descriptor::new(
            crate::format::descriptor::CreateType::MonolithicSparse,
            0x1234_5678,
            None,
            vec![crate::format::descriptor::ExtentLine::rw(
                crate::format::descriptor::ExtentType::Sparse,
                80 << 11,
                "s.vmdk",
            )],
            &[],
        )
        .to_text();
        let f = File::create(&p).unwrap();
        let mut w = SparseWriter::new(f, 80 << 20, Some(desc.as_bytes()), &p);
        w.write_grains(3, &vec![7u8; 65536]).unwrap();
        // Past the first table's span (512 grains = 32 MiB): the first table is written.
        w.write_grains(600, &vec![8u8; 2 * 65536]).unwrap();
        assert!(w.write_grains(10, &[1u8; 512]).is_err(), "out of order");
        let (_, size, grains) = w.finish().unwrap();
        assert_eq!((std::fs::metadata(&p).unwrap().len(), grains), (size, 3));
        let chain = crate::Chain::open(&p, &Default::default()).unwrap();
        let mut all = vec![0u8; 80 << 20];
        chain.read_at(&mut all, 0).unwrap();
        assert!(all[3 * 65536..4 * 65536].iter().all(|&b| b == 7));
        assert!(all[600 * 65536..602 * 65536].iter().all(|&b| b == 8));
        assert_eq!(all.iter().filter(|&&b| b != 0).count(), 3 * 65536);
    }
}
