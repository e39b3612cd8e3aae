//! `cat`: the logical content as raw bytes, to a writer (stdout) or to a file where
//! zero grains become holes and the file is sized exactly. Both run on the copy engine
//! with its raw sinks (the same ones `export --format raw` uses).

use std::io::Write;
use std::path::Path;

use crate::copy::{self as pipeline, PipelineOptions, Producer};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::output::{ExportFormat, FileOutput, PipeOutput, Prealloc};
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
        pipeline::Content::Disk(disk),
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
    let cap = disk.capacity();
    let raw = ExportFormat::Raw.spec();
    let sink = raw.pipe_sink(PipeOutput {
        w: out,
        capacity: cap,
        name: "<stdout>".into(),
        files: raw.files(cap, "<stdout>"),
        descriptor: None,
        delta: false,
        mtime: 0,
        nonzero_grains: None,
    })?;
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
    let cap = disk.capacity();
    let raw = ExportFormat::Raw.spec();
    let sink = raw.file_sink(FileOutput {
        capacity: cap,
        dir: crate::io::folder_of(target),
        files: raw.files(cap, &name),
        descriptor: None,
        descriptor_path: target.to_path_buf(),
        force,
        prealloc: Prealloc::Thin,
        delta: false,
    })?;
    copy(disk, sink, opts, progress)
}
