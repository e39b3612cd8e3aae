//! `cat`: the logical content as raw bytes, to a writer (stdout) or to a file where
//! zero grains become holes and the file is sized exactly. Both run on the copy engine
//! with its raw sinks (the same ones `export --format raw` uses).

use std::io::Write;
use std::path::Path;

use crate::copy::sink::{self, FileKind, Prealloc, SeqKind};
use crate::copy::{self as pipeline, OutputFile, PipelineOptions, Producer};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::ops::Progress;
use crate::output::check_target;

fn copy(
    disk: &dyn VirtualDisk,
    mut sink: Box<dyn pipeline::Sink>,
    opts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let producer = Producer {
        disk,
        compress: None,
        crc: false,
    };
    pipeline::drive(
        disk,
        opts,
        &producer,
        sink.as_mut(),
        &mut |_, _| {},
        progress,
    )?;
    sink.finish()?;
    Ok(())
}

/// Write the whole disk to `out` sequentially (zeros written out).
pub fn cat_to_writer(
    disk: &dyn VirtualDisk,
    out: Box<dyn Write + Send>,
    opts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&disk.source_files())?;
    let kind = SeqKind::Files {
        files: vec![OutputFile {
            start: 0,
            len: disk.capacity(),
            name: "<stdout>".into(),
        }],
        nonzero_grains: None,
        sparse_extents: false,
        embedded: None,
        tar: None,
    };
    let sink = sink::to_writer(out, kind, disk.capacity())?;
    copy(disk, sink, opts, progress)
}

/// Write the disk to a new file at `target`: zero grains are skipped (holes), the file
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
    check_target(target, force)?;
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&sources)?;
    let name = target
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("`{}` is not a file name", target.display())))?
        .to_string_lossy()
        .into_owned();
    let file = OutputFile {
        start: 0,
        len: disk.capacity(),
        name,
    };
    let sink = sink::to_files(
        FileKind::Flat {
            prealloc: Prealloc::Thin,
        },
        disk.capacity(),
        crate::io::folder_of(target),
        vec![file],
        None,
        force,
    )?;
    copy(disk, sink, opts, progress)
}
