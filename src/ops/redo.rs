//! `redo add` (a new empty delta on top of a chain) and `write` (bytes into the top).

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chain::Chain;
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::cowd::CowdHeader;
use crate::format::descriptor::{random_cid, CreateType, Descriptor, ExtentLine, ExtentType};
use crate::format::sparse::SECTOR;
use crate::guard::{LockKind, LockSet};
use crate::io::SourceMode;
use crate::layer::OpenOptions;
use crate::output::{check_target, AtomicFile};

/// Delta styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedoStyle {
    /// ESX 2 `DISK.REDO` (bare COWD, parent named in the header).
    Redo,
    /// ESX 3-6 `name-000001.vmdk` + `name-000001-delta.vmdk` (COWD behind a descriptor).
    VmfsSparse,
    /// Workstation-style hosted sparse child `name-000001.vmdk`.
    Hosted,
}

impl RedoStyle {
    /// Parse a style name.
    pub fn parse(s: &str) -> Option<RedoStyle> {
        match s.to_ascii_lowercase().as_str() {
            "redo" | "cowd" => Some(RedoStyle::Redo),
            "vmfssparse" | "delta" => Some(RedoStyle::VmfsSparse),
            "hosted" | "sparse" => Some(RedoStyle::Hosted),
            _ => None,
        }
    }
}

use crate::io::file_name_of as file_name;

/// The folder of `p` as a prefix to join names to (empty for a bare file name, so
/// printed paths stay as the user wrote them).
fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::new(),
    }
}

/// `name` without `.vmdk` and without a trailing `-NNNNNN` snapshot number.
fn base_stem(name: &str) -> String {
    let s = name.strip_suffix(".vmdk").unwrap_or(name);
    match s.rsplit_once('-') {
        Some((head, num)) if num.len() == 6 && num.bytes().all(|b| b.is_ascii_digit()) => {
            head.to_string()
        }
        _ => s.to_string(),
    }
}

/// Options of [`add_opts`].
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct AddOptions {
    /// The delta's style; `None`: the chain's own (a REDO log on a REDO log, vmfsSparse on
    /// vmfsSparse, hosted on hosted disks, an ESX 2 REDO log on an ESX base).
    pub style: Option<RedoStyle>,
    /// Add a delta although the disk already has one (a second branch: writing either
    /// then diverges from the other).
    pub branch: bool,
    /// Follow extent and parent names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`]).
    pub allow_outside_paths: bool,
}

impl AddOptions {
    /// The options with `style` (and no branch).
    pub fn style(style: RedoStyle) -> AddOptions {
        AddOptions {
            style: Some(style),
            ..Default::default()
        }
    }
}

/// Add an empty delta of `style` on top of `disk`; returns the new top's path.
pub fn add(disk: &Path, style: RedoStyle) -> Result<PathBuf> {
    add_opts(disk, &AddOptions::style(style))
}

/// The style of the deltas a chain already has (see [`AddOptions::style`]).
fn own_style(top: &crate::layer::Layer) -> RedoStyle {
    match top.create_type {
        _ if top.bare_cowd => RedoStyle::Redo,
        CreateType::VmfsSparse => RedoStyle::VmfsSparse,
        ct if ct.as_str().to_ascii_lowercase().starts_with("vmfs") || ct.is_device() => {
            RedoStyle::Redo
        }
        _ => RedoStyle::Hosted,
    }
}

/// The next snapshot number for `stem` in `dir`: one past every number any file there
/// carries (deltas, their extents, state files, temporaries) and past the parent's own,
/// so a name that was used and freed is not handed out again while anything of it (or
/// a later one) is left.
fn next_number(dir: &Path, stem: &str, parent_name: &str) -> u32 {
    let number_in = |name: &str| -> Option<u32> {
        let rest = name
            .trim_start_matches('.')
            .strip_prefix(stem)?
            .strip_prefix('-')?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        (digits.len() == 6).then(|| digits.parse().ok()).flatten()
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut max = number_in(parent_name).unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = number_in(&name) {
                // The empty extent of an add cut short (no descriptor) holds no number.
                let orphan = name.strip_suffix("-delta.vmdk").is_some_and(|d| {
                    !dir.join(format!("{d}.vmdk")).exists() && empty_cowd(&e.path())
                });
                if !orphan {
                    max = max.max(n);
                }
            }
        }
    }
    max + 1
}

/// Add an empty delta on top of `disk`; returns the new top's path. A disk that already
/// has a delta (or a file that may be one and cannot be read) is refused unless
/// `opts.branch`.
pub fn add_opts(disk: &Path, opts: &AddOptions) -> Result<PathBuf> {
    let mut locks = LockSet::new();
    locks.lock(disk, LockKind::Shared)?;
    let chain = Chain::open(
        disk,
        &OpenOptions {
            ignore_cid: false,
            mode: SourceMode::Pread,
            allow_outside_paths: opts.allow_outside_paths,
            ..Default::default()
        },
    )?;
    locks.shared_all(&chain.source_files())?;
    let top = chain.top();
    let style = opts.style.unwrap_or_else(|| own_style(top));
    if !opts.branch {
        let (children, unknown) = crate::dependents::dependents_of(disk);
        let redo = PathBuf::from(format!("{}.REDO", disk.display()));
        if let Some(c) = children.first().or(redo.exists().then_some(&redo)) {
            return Err(Error::refused(
                disk,
                format!(
                    "it already has the delta `{}`: a second one would start a branch; add to the top of the chain (to `{}`) instead",
                    c.display(),
                    c.display()
                ),
                Some(crate::error::Override::Branch),
            ));
        }
        if let Some((p, why)) = unknown.first() {
            return Err(Error::refused(
                p,
                format!(
                    "{why}; it may be a delta of `{}`. Refusing to add another while that is unknown (fix or move it)",
                    disk.display()
                ),
                Some(crate::error::Override::Branch),
            ));
        }
    }
    if top.create_type == CreateType::VmfsPassthroughRawDeviceMap {
        return Err(Error::unsupported(
            disk,
            "a physical-mode (pass-through) RDM cannot have a REDO log or snapshot: SCSI commands go straight to the device",
        ));
    }
    let cap = chain.capacity();
    let dir = dir_of(disk);
    let parent_name = file_name(disk);
    crate::format::descriptor::check_file_name(&parent_name)?;
    let ddb = child_ddb(top);
    let parent_cid = top.cid().unwrap_or(0xffff_fffe);
    match style {
        RedoStyle::Redo => {
            // DISK.REDO: the name is the link, so a disk has at most one.
            let parent = disk.to_path_buf();
            let new = PathBuf::from(format!("{}.REDO", disk.display()));
            if new.symlink_metadata().is_ok() {
                return Err(Error::chain(
                    disk,
                    format!(
                        "`{}` exists: an ESX 2 REDO log is named after its parent, so a disk cannot have two; \
                         add to `{}` instead, or add a hosted or vmfsSparse delta for a branch",
                        new.display(),
                        new.display()
                    ),
                ));
            }
            let sectors = u32::try_from(cap / SECTOR).map_err(|_| {
                Error::unsupported(disk, "a COWD REDO log holds at most 2^32-1 sectors (2 TiB)")
            })?;
            let h = CowdHeader::new_child(sectors, 1, &file_name(&parent));
            let f = AtomicFile::create(&new, false)?;
            let mut b = h.to_bytes();
            b.resize((h.free_sector as u64 * SECTOR) as usize, 0);
            f.file()
                .write_all_at(&b, 0)
                .map_err(|e| Error::io("write", f.tmp_path(), 0, e))?;
            f.commit(false)?;
            Ok(new)
        }
        RedoStyle::VmfsSparse | RedoStyle::Hosted => {
            let stem = base_stem(&parent_name);
            // Temporaries a crash left do not hold a number (a live writer's do).
            crate::guard::sweep_stale_temporaries(&crate::io::folder_of(disk));
            let mut n = next_number(&dir, &stem, &parent_name);
            let (desc, delta, reuse_delta) = loop {
                let d = crate::io::join_in(&dir, format!("{stem}-{n:06}.vmdk"));
                let x = crate::io::join_in(&dir, format!("{stem}-{n:06}-delta.vmdk"));
                if !d.exists() && !x.exists() {
                    break (d, x, false);
                }
                // An add cut short after its empty delta extent took its name and before
                // its descriptor did: the extent holds nothing and nothing names it.
                if !d.exists() && style == RedoStyle::VmfsSparse && empty_cowd(&x) {
                    break (d, x, true);
                }
                n += 1;
                if n > 999_999 {
                    return Err(Error::InvalidInput("no free snapshot number".into()));
                }
            };
            let cid = random_cid();
            if style == RedoStyle::VmfsSparse {
                let sectors = u32::try_from(cap / SECTOR)
                    .map_err(|_| Error::unsupported(disk, "a vmfsSparse delta holds at most 2^32-1 sectors (2 TiB); a hosted delta has no such limit"))?;
                check_target(&delta, reuse_delta)?;
                let h = CowdHeader::new_child(sectors, 1, "");
                let fd = AtomicFile::create(&delta, reuse_delta)?;
                let mut b = h.to_bytes();
                b.resize((h.free_sector as u64 * SECTOR) as usize, 0);
                fd.file()
                    .write_all_at(&b, 0)
                    .map_err(|e| Error::io("write", fd.tmp_path(), 0, e))?;
                let d = child_descriptor(
                    CreateType::VmfsSparse,
                    ExtentType::VmfsSparse,
                    file_name(&delta),
                    cap,
                    (cid, parent_cid, &parent_name),
                    &ddb,
                );
                let fdesc = AtomicFile::create(&desc, false)?;
                fdesc
                    .file()
                    .write_all_at(d.to_text().as_bytes(), 0)
                    .map_err(|e| Error::io("write", fdesc.tmp_path(), 0, e))?;
                fd.commit(reuse_delta)?;
                fdesc.commit(false)?;
            } else {
                let d = child_descriptor(
                    CreateType::MonolithicSparse,
                    ExtentType::Sparse,
                    file_name(&desc),
                    cap,
                    (cid, parent_cid, &parent_name),
                    &ddb,
                );
                write_hosted_child(&desc, &d, cap, false)?;
            }
            Ok(desc)
        }
    }
}

/// Whether `x` is a COWD extent with no grain allocated (what `redo add` writes first).
fn empty_cowd(x: &Path) -> bool {
    let Ok(src) = crate::io::Source::open(x, SourceMode::Pread) else {
        return false;
    };
    let Ok(ext) = crate::format::cowd::CowdExtent::open(src) else {
        return false;
    };
    let mut runs = Vec::new();
    let e = crate::format::Extent::Cowd(Box::new(ext));
    e.map(0, 0..e.len(), 0, &mut runs).is_ok()
        && runs
            .iter()
            .all(|r| r.alloc == crate::disk::Alloc::Unallocated)
}

/// Make `new`, an empty hosted sparse child of the chain whose top is `disk`, in the same
/// folder (its parent is named by file name, as VMware names them): the overlay `serve
/// --overlay` writes into. An existing `new` is refused; `disk` is only read.
pub(crate) fn new_overlay(disk: &Path, new: &Path) -> Result<()> {
    if crate::io::folder_of(disk).canonicalize().ok()
        != crate::io::folder_of(new).canonicalize().ok()
    {
        return Err(Error::InvalidInput(format!(
            "the overlay `{}` must be in the folder of `{}` (a delta names its parent by file name)",
            new.display(),
            disk.display()
        )));
    }
    let chain = Chain::open(disk, &OpenOptions::default())?;
    let top = chain.top();
    let parent_name = file_name(disk);
    crate::format::descriptor::check_file_name(&parent_name)?;
    crate::format::descriptor::check_file_name(&file_name(new))?;
    let cap = chain.capacity();
    let ddb = child_ddb(top);
    let d = child_descriptor(
        CreateType::MonolithicSparse,
        ExtentType::Sparse,
        file_name(new),
        cap,
        (random_cid(), top.cid().unwrap_or(0xffff_fffe), &parent_name),
        &ddb,
    );
    write_hosted_child(new, &d, cap, true)
}

/// The disk database a new child takes from its parent: all but what belongs to the
/// parent alone (its thin flag, its long content ID, its parent links, vmdkit's marks).
fn child_ddb(top: &crate::layer::Layer) -> Vec<(String, String)> {
    top.descriptor
        .ddb_entries()
        .into_iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !k.contains("thinprovisioned")
                && !k.contains("longcontentid")
                && !k.contains("parent")
                && !k.contains("vmdkit")
        })
        .collect()
}

/// Write the empty monolithicSparse child `path` with descriptor `d` (atomically).
/// `zeroed_grains`: with zeroed-grain entries (version 2, flag bit 2, as qemu's
/// `zeroed_grain=on` writes them), so zeros over whole grains cost a table entry.
fn write_hosted_child(path: &Path, d: &Descriptor, cap: u64, zeroed_grains: bool) -> Result<()> {
    let text = d.to_text().into_bytes();
    let f = AtomicFile::create(path, false)?;
    let file = f
        .file()
        .try_clone()
        .map_err(|e| Error::io("open", f.tmp_path(), 0, e))?;
    let (file, _, _) =
        crate::format::sparse::SparseWriter::new(file, cap, Some(&text), f.tmp_path()).finish()?;
    if zeroed_grains {
        let mut h = [0u8; 12];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io("read", f.tmp_path(), 0, e))?;
        h[4..8].copy_from_slice(&2u32.to_le_bytes());
        let flags = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"))
            | crate::format::sparse::FLAG_ZERO_GRAIN;
        h[8..12].copy_from_slice(&flags.to_le_bytes());
        file.write_all_at(&h, 0)
            .map_err(|e| Error::io("write", f.tmp_path(), 0, e))?;
    }
    f.commit(false)
}

/// The descriptor of a new child: one extent `file` of `kind` holding `cap` bytes,
/// `(cid, parent_cid, parent_name)` linking it to its parent.
fn child_descriptor(
    ct: CreateType,
    kind: ExtentType,
    file: String,
    cap: u64,
    (cid, parent_cid, parent_name): (u32, u32, &str),
    ddb: &[(String, String)],
) -> Descriptor {
    let line = ExtentLine::rw(kind, cap / SECTOR, file);
    Descriptor::new(ct, cid, Some((parent_cid, parent_name)), vec![line], ddb)
}

/// What to write with [`fn@write`].
pub enum WriteData<'a> {
    /// Bytes from a reader (a file or stdin), up to its end.
    Reader(&'a mut dyn Read),
    /// `len` zero bytes (zeroed grains where the format has them).
    Zeros(u64),
}

/// Write into the top layer of `disk`'s chain at `offset`. The top's CID changes first
/// (as VMware does on the first write after opening), so stale children are detected.
/// Returns the bytes written.
pub fn write(disk: &Path, offset: u64, data: WriteData<'_>, ignore_cid: bool) -> Result<u64> {
    write_opts(
        disk,
        offset,
        data,
        &WriteOptions {
            ignore_cid,
            ..Default::default()
        },
    )
}

/// Options of [`write_opts`].
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct WriteOptions {
    /// Read through a parent whose CID does not match.
    pub ignore_cid: bool,
    /// Permit writing into block devices and device-backed disks.
    pub allow_device_write: bool,
    /// Write although other deltas name this disk as their parent (it breaks them).
    pub force: bool,
    /// Follow extent and parent names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`]).
    pub allow_outside_paths: bool,
}

/// Input held until it has been validated: in memory when small, else in an unnamed
/// temporary file in the disk's folder (gone when closed, even on a crash).
enum Spooled {
    Mem(Vec<u8>),
    File(std::fs::File, u64),
}

impl Spooled {
    fn read(r: &mut dyn Read, dir: &Path, limit: u64) -> Result<Spooled> {
        const IN_MEMORY: u64 = 64 << 20;
        let mut mem = Vec::new();
        let took = r
            .take(IN_MEMORY + 1)
            .read_to_end(&mut mem)
            .map_err(|e| Error::io("read", Path::new("<input>"), 0, e))?;
        if (took as u64) <= IN_MEMORY {
            return Ok(Spooled::Mem(mem));
        }
        let mut f = tempfile::tempfile_in(dir)
            .map_err(|e| Error::io("create a temporary in", dir, 0, e))?;
        std::io::Write::write_all(&mut f, &mem).map_err(|e| Error::io("write", dir, 0, e))?;
        // Copy at most one byte past the limit: enough to know the input is too long.
        let rest = std::io::copy(
            &mut r.take(limit.saturating_sub(mem.len() as u64) + 1),
            &mut f,
        )
        .map_err(|e| Error::io("read", Path::new("<input>"), mem.len() as u64, e))?;
        Ok(Spooled::File(f, mem.len() as u64 + rest))
    }

    fn len(&self) -> u64 {
        match self {
            Spooled::Mem(m) => m.len() as u64,
            Spooled::File(_, n) => *n,
        }
    }
}

/// Write into the top layer of `disk`'s chain. Everything is validated before the first
/// byte changes (the range, every extent it touches, children that would break, the
/// input's length); the disk is locked for the whole write.
pub fn write_opts(
    disk: &Path,
    offset: u64,
    data: WriteData<'_>,
    opts: &WriteOptions,
) -> Result<u64> {
    let mut locks = LockSet::new();
    locks.lock(disk, LockKind::Exclusive)?;
    // The read-write disk model: the top written through its writer, read coherently.
    let mut rw = crate::rw::WritableDisk::open_with(
        disk,
        &OpenOptions {
            ignore_cid: opts.ignore_cid,
            allow_outside_paths: opts.allow_outside_paths,
            ..Default::default()
        },
        opts.allow_device_write,
    )?;
    rw.chain().lock(&mut locks, 0)?;
    if offset % SECTOR != 0 {
        return Err(Error::InvalidInput(format!(
            "offset {offset} is not a multiple of 512"
        )));
    }
    let cap = rw.capacity();
    if offset > cap {
        return Err(Error::InvalidInput(format!(
            "offset {offset} is past the end of the disk ({cap} bytes)"
        )));
    }
    // The input, whole, before anything changes.
    let (input, len) = match data {
        WriteData::Zeros(len) => (None, len),
        WriteData::Reader(r) => {
            let sp = Spooled::read(r, &dir_of(disk), cap - offset)?;
            let n = sp.len();
            (Some(sp), n)
        }
    };
    if offset.checked_add(len).is_none_or(|e| e > cap) {
        return Err(Error::InvalidInput(format!(
            "{len} bytes at offset {offset} run past the end of the disk ({cap} bytes); nothing was written"
        )));
    }
    rw.check_writable(offset, len)?;
    crate::dependents::refuse_dependents(
        disk,
        opts.force,
        "writing into it (write into the top of the chain instead)",
    )?;
    crate::recovery::refuse_read_only_files(rw.chain().top(), opts.force)?;
    if len == 0 {
        return Ok(0);
    }
    rw.new_cid()?;
    match input {
        None => rw.write_zeroes(offset, len)?,
        Some(Spooled::Mem(m)) => rw.write_at(&m, offset)?,
        Some(Spooled::File(f, n)) => {
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < n {
                let k = (n - done).min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..k], done)
                    .map_err(|e| Error::io("read", Path::new("<spooled input>"), done, e))?;
                rw.write_at(&buf[..k], offset + done)?;
                done += k as u64;
            }
        }
    }
    rw.flush()?;
    Ok(len)
}
