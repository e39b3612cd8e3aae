//! `import` (restore): any disk or chain, or a stream on stdin, into a disk ESX or a
//! hosted product can use, or onto a raw device; and `create`, a new empty disk.

use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::chain::Chain;
use crate::copy::feed::PipeInput;
use crate::copy::target::DiskType;
use crate::copy::target::{
    export_fed, Dest, ExportOptions, ExportReport, Feed, OutputMeta, Provisioning,
};
use crate::copy::{self as pipeline, Piece, PipelineOptions, Producer, Sink, Unit};
use crate::disk::{VirtualDisk, ZeroDisk};
use crate::error::{Error, Result};
use crate::format::descriptor::random_cid;
use crate::format::sparse::SECTOR;
use crate::ops::Progress;

/// Import options.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Target type.
    pub kind: DiskType,
    /// Adapter type to set (geometry recomputed), or keep the source's.
    pub adapter: Option<String>,
    /// Overwrite existing outputs.
    pub force: bool,
    /// Worker threads.
    pub threads: usize,
    /// Permit capacities over 62 TiB.
    pub large: bool,
    /// Leave out what the guest's file systems call free (see
    /// [`ExportOptions::guest_aware`]); from disks and files, not from a pipe.
    pub guest_aware: bool,
}

impl Default for ImportOptions {
    /// A twoGbMaxExtentSparse disk (VMware Workstation's default), the source's adapter.
    fn default() -> Self {
        ImportOptions {
            kind: DiskType::TwoGbMaxExtentSparse,
            adapter: None,
            force: false,
            threads: 0,
            large: false,
            guest_aware: false,
        }
    }
}

fn meta_for(
    mut meta: OutputMeta,
    kind: DiskType,
    adapter: Option<&str>,
    capacity: u64,
) -> OutputMeta {
    if let Some(a) = adapter {
        meta.set_adapter(a, capacity);
    }
    if matches!(kind, DiskType::ZeroedThick | DiskType::EagerZeroedThick) {
        meta.provisioning = Provisioning::Thick;
    }
    meta
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Import a disk or chain (flattened) into `dst`.
pub fn import_disk(
    chain: &Chain,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    crate::format::check_capacity(chain.capacity(), opts.large, &chain.top().path)?;
    let (format, prealloc) = opts.kind.format();
    let guest = crate::copy::guest::Guest::scan(chain, opts.guest_aware)?;
    let mut meta = meta_for(
        OutputMeta::from_chain(chain),
        opts.kind,
        opts.adapter.as_deref(),
        chain.capacity(),
    );
    guest.mark(&mut meta);
    let view = guest.view(chain);
    if opts.kind == DiskType::Raw && is_existing_target(dst)? {
        return Ok(guest.report(raw_in_place(&view, None, dst, opts, progress)?));
    }
    let eo = ExportOptions {
        format,
        threads: opts.threads,
        force: opts.force,
        prealloc,
        ..Default::default()
    };
    let report = export_fed(
        &view,
        None,
        &meta,
        now(),
        Dest::Path(dst.to_path_buf()),
        &eo,
        progress,
    )?;
    Ok(guest.report(report))
}

/// Create an empty disk of `capacity` bytes.
pub fn create(
    dst: &Path,
    capacity: u64,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    if capacity == 0 || capacity % SECTOR != 0 {
        return Err(Error::InvalidInput(format!(
            "size {capacity} is not a positive multiple of 512 bytes"
        )));
    }
    crate::format::check_capacity(capacity, opts.large, dst)?;
    let (format, prealloc) = opts.kind.format();
    let adapter = opts.adapter.clone().unwrap_or_else(|| "lsilogic".into());
    let mut meta = OutputMeta {
        ddb: vec![("ddb.virtualHWVersion".into(), "4".into())],
        cid: random_cid(),
        provisioning: Provisioning::Thin,
        parent: None,
        omitted: None,
    };
    meta.set_adapter(&adapter, capacity);
    let meta = meta_for(meta, opts.kind, None, capacity);
    let eo = ExportOptions {
        format,
        threads: opts.threads,
        force: opts.force,
        prealloc,
        ..Default::default()
    };
    export_fed(
        &ZeroDisk(capacity),
        None,
        &meta,
        now(),
        Dest::Path(dst.to_path_buf()),
        &eo,
        progress,
    )
}

/// Import a stream read from `input` (stdin): streamOptimized, a sparse file with its
/// tables first, or export's tar stream; with `raw_size`, raw bytes of that disk size.
pub fn import_stream(
    input: &mut (dyn Read + Send),
    raw_size: Option<u64>,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    if opts.guest_aware {
        // Before a byte of the pipe is read.
        return Err(Error::not_applicable(
            Path::new("<stdin>"),
            "is a pipe: a guest-aware import reads the file systems' maps before their data, \
             and a pipe gives its bytes once, in order; import from the file instead",
        ));
    }
    let pipe = PipeInput::open(input, raw_size)?;
    if let Some(d) = &pipe.descriptor {
        refuse_increment(d, Path::new("<stdin>"))?;
    }
    let meta = OutputMeta {
        ddb: pipe
            .descriptor
            .as_ref()
            .map(|d| d.ddb_entries())
            .unwrap_or_default(),
        cid: pipe.descriptor.as_ref().map_or_else(random_cid, kept_cid),
        provisioning: Provisioning::Thin,
        parent: None,
        omitted: None,
    };
    finish_stream(pipe, meta, dst, opts, progress)
}

/// A restore keeps the content ID the backup recorded (so increments made later apply
/// to the restored disk, `fffffffe` of a never-written disk included); a stream without
/// one gets a fresh ID.
fn kept_cid(d: &crate::format::descriptor::Descriptor) -> u32 {
    d.cid()
        .filter(|&c| c != crate::format::descriptor::NO_PARENT_CID)
        .unwrap_or_else(random_cid)
}

/// An increment (a stream with a parent) holds only what changed: importing it alone
/// would make a disk of holes where the parent's data belongs.
fn refuse_increment(d: &crate::format::descriptor::Descriptor, name: &Path) -> Result<()> {
    match d.parent_cid() {
        Some(c) if c != crate::format::descriptor::NO_PARENT_CID => Err(Error::not_applicable(
            name,
            format!("is an increment (parentCID {c:08x}): restore the full backup, then apply this increment to the restored disk"),
        )),
        _ => Ok(()),
    }
}

fn finish_stream(
    mut feed: PipeInput<'_>,
    meta: OutputMeta,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let (format, prealloc) = opts.kind.format();
    let cap = feed.capacity;
    crate::format::check_capacity(cap, opts.large, Path::new("<stdin>"))?;
    let meta = meta_for(meta, opts.kind, opts.adapter.as_deref(), cap);
    if opts.kind == DiskType::Raw && is_existing_target(dst)? {
        return raw_in_place(&ZeroDisk(cap), Some(&mut feed), dst, opts, progress);
    }
    let eo = ExportOptions {
        format,
        threads: opts.threads,
        force: opts.force,
        prealloc,
        ..Default::default()
    };
    export_fed(
        &ZeroDisk(cap),
        Some(&mut feed),
        &meta,
        now(),
        Dest::Path(dst.to_path_buf()),
        &eo,
        progress,
    )
}

/// Whether a raw target exists (a block device, or a stand-in file) and is written in
/// place.
fn is_existing_target(dst: &Path) -> Result<bool> {
    match std::fs::metadata(dst) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dst.starts_with("/dev") {
                return Err(Error::InvalidInput(format!(
                    "device `{}` does not exist",
                    dst.display()
                )));
            }
            Ok(false)
        }
        Err(e) => Err(Error::io("stat", dst, 0, e)),
    }
}

/// Restore onto an existing device or stand-in file, in place: data written, zero ranges
/// zeroed (never left holding old data), size checked first.
fn raw_in_place(
    disk: &dyn VirtualDisk,
    feed: Option<&mut dyn Feed>,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let sources = disk.source_files();
    crate::guard::refuse_source_as_target(dst, &sources)?;
    let meta = std::fs::metadata(dst).map_err(|e| Error::io("stat", dst, 0, e))?;
    let block = meta.file_type().is_block_device();
    if !block && !opts.force {
        return Err(Error::AlreadyExists(dst.to_path_buf()));
    }
    let mut locks = crate::guard::LockSet::new();
    locks.shared_all(&sources)?;
    locks.lock(dst, crate::guard::LockKind::Exclusive)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(dst)
        .map_err(|e| Error::io("open for writing", dst, 0, e))?;
    let size = crate::io::device_size(&f).map_err(|e| Error::io("get the size of", dst, 0, e))?;
    let cap = disk.capacity();
    if size < cap {
        return Err(Error::InvalidInput(format!(
            "`{}` holds {size} bytes, less than the disk's {cap}",
            dst.display()
        )));
    }
    let eager = opts.kind == DiskType::EagerZeroedThick;
    let mut sink = InPlace {
        f,
        dst,
        // Zero ranges of a block device are zeroed cheaply (BLKZEROOUT) unless every
        // byte is to be written (eagerzeroedthick).
        cheap_zeros: block && !eager,
        report: ExportReport {
            files: vec![dst.to_path_buf()],
            ..Default::default()
        },
    };
    let producer = Producer {
        disk,
        compress: None,
        crc: false,
    };
    let popts = PipelineOptions {
        threads: opts.threads,
        ..Default::default()
    };
    let content = match feed {
        Some(feed) => pipeline::Content::Feed(feed),
        None => pipeline::Content::Disk(disk),
    };
    pipeline::drive(
        content,
        popts,
        &producer,
        &mut sink,
        &mut |_, _| {},
        progress,
    )?;
    sink.finish()
}

/// The engine's sink for an in-place restore: data written where it lies, every other
/// range zeroed (a device keeps no old data), synced at the end.
struct InPlace<'a> {
    f: std::fs::File,
    dst: &'a Path,
    cheap_zeros: bool,
    report: ExportReport,
}

impl Sink for InPlace<'_> {
    fn put(&mut self, u: &Unit, p: &Piece) -> Result<()> {
        match p {
            Piece::Data { buf, nonzero, .. } => {
                self.f
                    .write_all_at(buf, u.start)
                    .map_err(|e| crate::io::write_error(self.dst, u.start, e))?;
                self.report.bytes_out += buf.len() as u64;
                self.report.grains += nonzero.iter().filter(|&&n| n).count() as u64;
                Ok(())
            }
            Piece::Hole => {
                crate::output::zero_range(&self.f, self.dst, self.cheap_zeros, u.start, u.len)
            }
        }
    }

    fn finish(&mut self) -> Result<ExportReport> {
        self.f
            .sync_all()
            .map_err(|e| Error::io("flush", self.dst, 0, e))?;
        Ok(std::mem::take(&mut self.report))
    }
}
