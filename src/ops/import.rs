//! `import` (restore): any disk or chain, or a stream on stdin, into a disk ESX or a
//! hosted product can use, or onto a raw device; and `create`, a new empty disk.

use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::chain::Chain;
pub use crate::copy::target::DiskType;
use crate::copy::target::{
    export_fed, Dest, ExportOptions, ExportReport, Feed, OutputMeta, Provisioning,
};
use crate::copy::{self as pipeline, is_zero, PipelineOptions, Planner, Unit};
use crate::disk::{VirtualDisk, ZeroDisk};
use crate::error::{Error, Result};
use crate::format::descriptor::random_cid;
use crate::format::sparse::SECTOR;
use crate::format::stream::pipe::{self as stream_in, Counted};
use crate::ops::Progress;

/// Import options.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Target type.
    pub kind: DiskType,
    /// Adapter type to set (geometry recomputed), or keep the source's.
    pub adapter: Option<String>,
    /// Overwrite existing outputs.
    pub force: bool,
    /// Worker threads.
    pub threads: usize,
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
    let (format, prealloc) = opts.kind.format();
    let meta = meta_for(
        OutputMeta::from_chain(chain),
        opts.kind,
        opts.adapter.as_deref(),
        chain.capacity(),
    );
    if opts.kind == DiskType::Raw && is_existing_target(dst)? {
        return raw_in_place(chain, None, dst, opts, progress);
    }
    let eo = ExportOptions {
        format,
        threads: opts.threads,
        force: opts.force,
        prealloc,
        ..Default::default()
    };
    export_fed(
        chain,
        None,
        &meta,
        now(),
        Dest::Path(dst.to_path_buf()),
        &eo,
        progress,
    )
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
    let (format, prealloc) = opts.kind.format();
    let adapter = opts.adapter.clone().unwrap_or_else(|| "lsilogic".into());
    let mut meta = OutputMeta {
        ddb: vec![("ddb.virtualHWVersion".into(), "4".into())],
        cid: random_cid(),
        provisioning: Provisioning::Thin,
        parent: None,
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

/// Groups ascending `(offset, bytes)` pieces into 1 MiB units.
struct Units<'a> {
    unit: Option<(u64, Vec<u8>)>,
    cap: u64,
    put: &'a mut dyn FnMut(Unit, Vec<u8>) -> Result<()>,
}

impl Units<'_> {
    fn piece(&mut self, mut off: u64, mut data: &[u8]) -> Result<()> {
        const U: u64 = pipeline::DEFAULT_UNIT;
        while !data.is_empty() {
            if off >= self.cap {
                return Err(Error::InvalidInput(format!(
                    "stream data at {off:#x} lies past the capacity {:#x}",
                    self.cap
                )));
            }
            let ustart = off / U * U;
            match &self.unit {
                Some((s, _)) if *s == ustart => {}
                Some((s, _)) if *s > ustart => {
                    return Err(Error::InvalidInput("stream data out of order".into()));
                }
                _ => {
                    self.flush()?;
                    let len = (self.cap - ustart).min(U);
                    self.unit = Some((ustart, vec![0u8; len as usize]));
                }
            }
            let (s, buf) = self.unit.as_mut().expect("set");
            let o = (off - *s) as usize;
            let n = data.len().min(buf.len() - o);
            buf[o..o + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            off += n as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((s, buf)) = self.unit.take() {
            if !is_zero(&buf) {
                (self.put)(
                    Unit {
                        start: s,
                        len: buf.len() as u64,
                        read: true,
                    },
                    buf,
                )?;
            }
        }
        Ok(())
    }
}

/// What arrives on stdin.
enum StdinKind {
    Stream(crate::format::sparse::SparseHeader),
    Sparse(crate::format::sparse::SparseHeader),
    Tar,
}

struct StdinFeed<'a> {
    input: &'a mut dyn Read,
    head: Vec<u8>,
    kind: StdinKind,
    cap: u64,
}

impl Feed for StdinFeed<'_> {
    fn run(&mut self, put: &mut dyn FnMut(Unit, Vec<u8>) -> Result<()>) -> Result<()> {
        let name = Path::new("<stdin>");
        let mut units = Units {
            unit: None,
            cap: self.cap,
            put,
        };
        let head = std::mem::take(&mut self.head);
        let mut chained = std::io::Read::chain(&head[..], &mut self.input);
        let mut emit = |off: u64, data: &[u8]| units.piece(off, data);
        match &self.kind {
            StdinKind::Tar => {
                stream_in::read_tar(&mut chained, name, &mut emit)?;
                let _ = std::io::copy(&mut chained, &mut std::io::sink());
            }
            StdinKind::Stream(h) | StdinKind::Sparse(h) => {
                let mut c = Counted::new(&mut chained, name);
                let mut s = [0u8; 512];
                c.exact(&mut s)?;
                if matches!(self.kind, StdinKind::Stream(_)) {
                    stream_in::read_stream(&mut c, h, 0, &mut emit)?;
                } else {
                    stream_in::read_sparse(&mut c, h, 0, &mut emit)?;
                }
                c.drain();
            }
        }
        units.flush()
    }
}

/// Import a stream read from `input` (stdin): streamOptimized, a sparse file with its
/// tables first, or export's tar stream.
pub fn import_stream(
    input: &mut dyn Read,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let name = Path::new("<stdin>");
    let mut first = [0u8; 512];
    let mut c = Counted::new(input, name);
    c.exact(&mut first)?;
    let (kind, cap, meta, head) = if &first[257..262] == b"ustar" {
        // Tar: the descriptor is the first member; read it here for capacity and DDB.
        let size = u64::from_str_radix(
            std::str::from_utf8(&first[124..135])
                .unwrap_or("0")
                .trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap_or(0);
        if size > crate::format::descriptor::MAX_DESCRIPTOR_BYTES as u64 {
            return Err(Error::corrupt(
                name,
                124,
                "the tar stream does not start with a descriptor",
            ));
        }
        let mut text = vec![0u8; (size.div_ceil(512) * 512) as usize];
        c.exact(&mut text)?;
        text.truncate(size as usize);
        let d = crate::format::descriptor::Descriptor::parse(&text, name)?;
        let cap: u64 = d
            .extents()
            .iter()
            .map(|e| e.sectors.saturating_mul(SECTOR))
            .sum();
        // Re-feed the bytes consumed so the tar reader sees a whole archive.
        let mut head = first.to_vec();
        head.extend_from_slice(&text);
        head.resize(512 + (size.div_ceil(512) * 512) as usize, 0);
        refuse_increment(&d, name)?;
        let meta = OutputMeta {
            ddb: d.ddb_entries(),
            cid: kept_cid(&d),
            provisioning: Provisioning::Thin,
            parent: None,
        };
        (StdinKind::Tar, cap, meta, head)
    } else {
        let h = stream_in::parse_first(&first, name)?;
        let mut head = first.to_vec();
        let mut ddb = Vec::new();
        let mut cid = random_cid();
        // The embedded descriptor follows the header: read it now for the DDB keys, the
        // CID, and to refuse an increment.
        if h.descriptor_offset == 1 && h.descriptor_size > 0 {
            let n = h
                .descriptor_size
                .saturating_mul(SECTOR)
                .min(crate::format::descriptor::MAX_DESCRIPTOR_BYTES as u64)
                as usize;
            let mut d = vec![0u8; n];
            c.exact(&mut d)?;
            if let Ok(desc) = crate::format::descriptor::Descriptor::parse(&d, name) {
                refuse_increment(&desc, name)?;
                ddb = desc.ddb_entries();
                cid = kept_cid(&desc);
            }
            head.extend_from_slice(&d);
        }
        // validate() has checked that capacity * 512 does not overflow.
        let cap = h.capacity_sectors * SECTOR;
        let kind = if h.compressed() {
            StdinKind::Stream(h)
        } else {
            StdinKind::Sparse(h)
        };
        (
            kind,
            cap,
            OutputMeta {
                ddb,
                cid,
                provisioning: Provisioning::Thin,
                parent: None,
            },
            head,
        )
    };
    finish_stream(input, head, kind, cap, meta, dst, opts, progress)
}

/// A restore keeps the content ID the backup recorded (so increments made later apply
/// to the restored disk); a stream without one gets a fresh ID.
fn kept_cid(d: &crate::format::descriptor::Descriptor) -> u32 {
    d.cid()
        .filter(|&c| c < 0xffff_fffe)
        .unwrap_or_else(random_cid)
}

/// An increment (a stream with a parent) holds only what changed: importing it alone
/// would make a disk of holes where the parent's data belongs.
fn refuse_increment(d: &crate::format::descriptor::Descriptor, name: &Path) -> Result<()> {
    match d.parent_cid() {
        Some(c) if c != crate::format::descriptor::NO_PARENT_CID => Err(Error::InvalidInput(format!(
            "`{}` is an increment (`export --delta`, parentCID {c:08x}): restore the full backup with `import`, then add this with `vmdkit apply DISK -`",
            name.display()
        ))),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_stream(
    input: &mut dyn Read,
    head: Vec<u8>,
    kind: StdinKind,
    cap: u64,
    meta: OutputMeta,
    dst: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let (format, prealloc) = opts.kind.format();
    let meta = meta_for(meta, opts.kind, opts.adapter.as_deref(), cap);
    // The bytes already consumed are fed again in front of the rest.
    let mut feed = StdinFeed {
        input,
        head,
        kind,
        cap,
    };
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
    let mut next = 0u64;
    let mut report = ExportReport {
        files: vec![dst.to_path_buf()],
        ..Default::default()
    };
    let mut put = |u: Unit, buf: Option<Vec<u8>>| -> Result<()> {
        if u.start > next {
            crate::output::zero_range(&f, dst, block && !eager, next, u.start - next)?;
        }
        match buf {
            Some(b) if !is_zero(&b) => {
                f.write_all_at(&b, u.start)
                    .map_err(|e| crate::output::write_error(dst, u.start, e))?;
                report.bytes_out += b.len() as u64;
            }
            _ => crate::output::zero_range(&f, dst, block && !eager, u.start, u.len)?,
        }
        next = u.start + u.len;
        progress.inc(u.len);
        Ok(())
    };
    match feed {
        Some(feed) => feed.run(&mut |u, b| put(u, Some(b)))?,
        None => {
            let mut planner = Planner::new(disk, pipeline::DEFAULT_UNIT);
            pipeline::run(
                &mut planner,
                PipelineOptions {
                    threads: opts.threads,
                    ..Default::default()
                },
                |u| {
                    if !u.read {
                        return Ok(None);
                    }
                    let mut b = vec![0u8; u.len as usize];
                    disk.read_at(&mut b, u.start)?;
                    Ok(Some(b))
                },
                &mut put,
            )?;
        }
    }
    if next < cap {
        crate::output::zero_range(&f, dst, block && !eager, next, cap - next)?;
    }
    f.sync_all().map_err(|e| Error::io("flush", dst, 0, e))?;
    Ok(report)
}

pub use crate::units::parse_size;
