//! `cat`: the logical content as raw bytes, to a writer (stdout) or to a file where
//! zero ranges become holes and the file is sized exactly.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::copy::{self as pipeline, is_zero, PipelineOptions, Planner};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::ops::Progress;
use crate::output::{write_error, AtomicFile};

/// A produced unit: its bytes, or None when it is all zeros.
type Chunk = Option<Vec<u8>>;

fn produce(disk: &dyn VirtualDisk, u: &pipeline::Unit) -> Result<Chunk> {
    if !u.read {
        return Ok(None);
    }
    let mut buf = vec![0u8; u.len as usize];
    disk.read_at(&mut buf, u.start)?;
    Ok(if is_zero(&buf) { None } else { Some(buf) })
}

/// Write the whole disk to `out` sequentially (zeros written out).
pub fn cat_to_writer(
    disk: &dyn VirtualDisk,
    out: &mut (dyn Write + Send),
    opts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut planner = Planner::new(disk, opts.unit);
    let stdout = Path::new("<stdout>");
    pipeline::run(
        &mut planner,
        opts,
        |u| produce(disk, u),
        |u, chunk| {
            match chunk {
                Some(b) => out
                    .write_all(&b)
                    .map_err(|e| write_error(stdout, u.start, e))?,
                None => {
                    let mut left = u.len;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        out.write_all(&zeros[..n])
                            .map_err(|e| write_error(stdout, u.start + u.len - left, e))?;
                        left -= n as u64;
                        progress.inc(n as u64);
                    }
                    return Ok(());
                }
            }
            progress.inc(u.len);
            Ok(())
        },
    )?;
    out.flush()
        .map_err(|e| write_error(stdout, disk.capacity(), e))
}

/// Write the disk to a new file at `target`: zero ranges are skipped (holes), the file
/// is sized to the capacity, written under a temporary name and renamed when complete.
pub fn cat_to_file(
    disk: &dyn VirtualDisk,
    target: &Path,
    force: bool,
    opts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let sources = disk.source_files();
    crate::guard::refuse_source_as_target(target, &sources)?;
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&sources)?;
    let out = AtomicFile::create(target, force)?;
    let file = out.file();
    let tmp = out.tmp_path().to_path_buf();
    let mut planner = Planner::new(disk, opts.unit);
    pipeline::run(
        &mut planner,
        opts,
        |u| produce(disk, u),
        |u, chunk| {
            if let Some(b) = chunk {
                file.write_all_at(&b, u.start)
                    .map_err(|e| write_error(&tmp, u.start, e))?;
            }
            progress.inc(u.len);
            Ok(())
        },
    )?;
    file.set_len(disk.capacity())
        .map_err(|e| Error::io("set the length of", &tmp, disk.capacity(), e))?;
    out.commit(force)
}
