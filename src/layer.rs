//! One layer of a chain: a descriptor and its extents, opened for reading.
//!
//! A layer is opened from a text descriptor, or from a hosted sparse file (with its
//! embedded descriptor, or without one: a split extent opened on its own).

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::io::folder_of;
use crate::resolve::{confine, rdm_owner, resolve_name};

use crate::disk::{push_run, Alloc, Run};
use crate::error::{Error, Result};
use crate::format::cowd::CowdExtent;
use crate::format::descriptor::{
    Access, CreateType, Descriptor, ExtentLine, ExtentType, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID,
};
use crate::format::sesparse::SeSparseExtent;
use crate::format::sparse::{self, SparseExtent, SECTOR, SPARSE_MAGIC};
use crate::format::{Extent, FlatExtent};
use crate::io::{ReadAt, Source, SourceMode};
use std::sync::Arc;

/// An extent of a layer with its place in the virtual disk.
#[derive(Debug)]
pub(crate) struct ExtentSlot {
    /// First virtual byte.
    pub(crate) start: u64,
    /// The descriptor line it came from.
    pub(crate) line: ExtentLine,
    /// The file opened for it (None for ZERO).
    pub(crate) path: Option<PathBuf>,
    /// The reader.
    pub(crate) extent: Extent,
}

/// One opened layer of a chain: a base disk or a delta, with its descriptor and extents.
#[derive(Debug)]
pub struct Layer {
    /// The file the user (or the parent hint) named.
    pub(crate) path: PathBuf,
    /// Its descriptor (embedded or separate; synthesized for a bare sparse extent).
    pub(crate) descriptor: Descriptor,
    /// Whether the descriptor is embedded in a sparse extent.
    pub(crate) embedded: bool,
    /// The createType (canonical).
    pub(crate) create_type: CreateType,
    /// Extents in order.
    pub(crate) extents: Vec<ExtentSlot>,
    /// Capacity in bytes.
    pub(crate) capacity: u64,
    /// Things a user should know (path fallbacks, size disagreements...).
    pub(crate) notes: Vec<String>,
    /// A bare COWD file (ESX 2 REDO log): linked to its parent by name, without CIDs.
    pub(crate) bare_cowd: bool,
}

/// Options for opening disks.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Read through a parent whose CID does not match the child's parentCID.
    pub ignore_cid: bool,
    /// How to read files.
    pub mode: SourceMode,
    /// Follow extent and parent names (through links or absolute paths) that lead out of
    /// the descriptor's folder (`--allow-outside-paths`). Without it only block devices
    /// named by device and RDM createTypes may lie outside.
    pub allow_outside_paths: bool,
    /// Open a chain although a layer carries a pending mark of an interrupted vmdkit
    /// operation (the commands that finish or report it; see `crate::recovery`).
    pub ignore_pending: bool,
    /// Read a disk an interrupted `vmdkit apply` left marked, as it reads before or after
    /// that apply (hosted sparse targets, whose tables switch through a journal), instead
    /// of refusing it; the chain's warnings then say so and what finishes it. For
    /// commands that only read; a command that writes must refuse such a disk.
    pub read_pending: bool,
    /// Told `(bytes read, file length)` while a stream written without a grain directory
    /// is indexed (its records read once at open).
    pub index_progress: Option<fn(u64, u64)>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            ignore_cid: false,
            mode: SourceMode::Pread,
            allow_outside_paths: false,
            ignore_pending: false,
            read_pending: false,
            index_progress: None,
        }
    }
}

impl OpenOptions {
    /// What the commands that finish or judge an interrupted operation open a disk with:
    /// CIDs not enforced (a commit in progress changes them) and pending marks not
    /// refused (they are the reason to open it).
    pub(crate) fn for_recovery(allow_outside_paths: bool) -> OpenOptions {
        OpenOptions {
            ignore_cid: true,
            allow_outside_paths,
            ignore_pending: true,
            ..Default::default()
        }
    }
}

impl Layer {
    /// Reopen this layer's hosted sparse extents with `records` (an admitted journal of
    /// table and directory writes, see [`crate::write::JournalRecord`]) laid over their
    /// bytes: the layer as it reads once the journal is applied, with nothing written.
    pub(crate) fn overlay(&mut self, records: &[crate::write::JournalRecord]) -> Result<()> {
        for slot in &mut self.extents {
            let (Extent::Sparse(_), Some(p)) = (&slot.extent, &slot.path) else {
                continue;
            };
            let canon = crate::recovery::canonical(p)?;
            let patches: Vec<(u64, Vec<u8>)> = records
                .iter()
                .filter(|r| !r.bytes.is_empty() && crate::io::same_file(&r.file, &canon))
                .map(|r| (r.offset, r.bytes.clone()))
                .collect();
            if patches.is_empty() {
                continue;
            }
            let src = Source::open(p, SourceMode::Pread)?.with_patches(patches);
            slot.extent = Extent::Sparse(Box::new(SparseExtent::open(src)?));
        }
        Ok(())
    }

    /// Open a one-file layer (monolithicSparse, streamOptimized (a stream backup), or a
    /// hosted sparse delta) from anything that reads at an offset: `name` names it in
    /// errors and reports. [`Chain::from_layers`](crate::Chain::from_layers) joins a delta
    /// opened this way to its parent (the content IDs checked), and
    /// [`Chain::from_layer`](crate::Chain::from_layer) makes a base a readable disk.
    pub fn from_source(name: &str, reader: Arc<dyn ReadAt>, opts: &OpenOptions) -> Result<Layer> {
        let path = Path::new(name);
        let src = Source::from_reader(reader, path);
        let mut magic = [0u8; 4];
        let n = src.read_at_zero_fill(&mut magic, 0)?;
        if n < 4 || u32::from_le_bytes(magic) != SPARSE_MAGIC {
            return Err(Error::unsupported(
                path,
                "only a hosted sparse or streamOptimized disk (one file, `KDMV` magic) opens from a reader",
            ));
        }
        let mut layer = Self::open_sparse_file(path, src, opts)?;
        for slot in &mut layer.extents {
            slot.path = None;
        }
        Ok(layer)
    }

    /// Open one layer (no parent) from `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Layer> {
        let src = Source::open(path, opts.mode)?;
        let mut magic = [0u8; 4];
        let n = src.read_at_zero_fill(&mut magic, 0)?;
        if n == 4 && u32::from_le_bytes(magic) == SPARSE_MAGIC || &magic == b"vmdk" {
            return Self::open_sparse_file(path, src, opts);
        }
        if &magic == b"COWD" {
            return Self::open_cowd_file(path, src);
        }
        if src.is_empty() {
            return Err(Error::corrupt(path, 0, "empty file: not a VMDK"));
        }
        // What it is when it is not a VMDK (a qcow2 image, a gzip file, a raw disk...).
        let hint = || {
            let mut head = vec![0u8; 65536.min(src.len() as usize)];
            let _ = src.read_at_zero_fill(&mut head, 0);
            let n = 512.min(src.len() as usize);
            let mut tail = vec![0u8; n];
            let _ = src.read_at_zero_fill(&mut tail, src.len() - n as u64);
            crate::format::detect::not_a_vmdk_hint(&head, &tail)
        };
        if src.len() > MAX_DESCRIPTOR_BYTES as u64 {
            return Err(Error::corrupt(
                path,
                0,
                format!(
                    "not a VMDK: no sparse magic, and at {} bytes too large to be a descriptor (limit {MAX_DESCRIPTOR_BYTES}); {}",
                    src.len(),
                    hint()
                ),
            ));
        }
        let mut text = vec![0u8; src.len() as usize];
        src.read_exact_at(&mut text, 0)?;
        let d = match Descriptor::parse(&text, path) {
            Ok(d) => d,
            Err(e) => {
                let h = hint();
                let binary = text.contains(&0);
                return Err(
                    if binary || crate::format::detect::foreign_format(&text, &[]).is_some() {
                        Error::corrupt(path, 0, format!("not a VMDK ({e}); {h}"))
                    } else {
                        e
                    },
                );
            }
        };
        if d.get("createType").is_none() && d.extents().is_empty() {
            return Err(Error::corrupt(
                path,
                0,
                format!("not a VMDK (no createType, no extent lines); {}", hint()),
            ));
        }
        drop(src);
        Self::from_descriptor(path, d, false, opts)
    }

    /// A COWD file without a descriptor: an ESX 2 REDO log (`X.REDO` is a child of `X`),
    /// or a legacy COWD base. The parent name in the header is used when it resolves,
    /// the naming rule otherwise; disagreements become notes.
    fn open_cowd_file(path: &Path, src: Source) -> Result<Layer> {
        let ext = CowdExtent::open(src)?;
        let h = ext.header().clone();
        let dir = folder_of(path);
        let mut notes = Vec::new();
        let fname = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let by_rule = fname
            .strip_suffix(".REDO")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let from_header = (!h.parent_file_name.is_empty()).then(|| h.parent_file_name.clone());
        let mut scratch = Vec::new();
        let resolves = |n: &str, scratch: &mut Vec<String>| {
            resolve_name(&dir, n, false, "parent", path, scratch)
                .ok()
                .filter(|p| p.exists())
        };
        let header_path = from_header
            .as_deref()
            .and_then(|n| resolves(n, &mut scratch));
        let rule_path = by_rule
            .as_deref()
            .and_then(|n| resolves(n, &mut Vec::new()));
        let parent: Option<String> = match (&from_header, header_path, &by_rule, rule_path) {
            (Some(hn), Some(hp), rule, rp) => {
                notes.append(&mut scratch);
                if let (Some(r), Some(rp)) = (rule, rp) {
                    if rp != hp {
                        notes.push(format!(
                            "the COWD header names parent `{hn}`, the file name implies `{r}`; using the header's"
                        ));
                    }
                }
                Some(
                    hp.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| hn.clone()),
                )
            }
            (hn, None, Some(r), Some(_)) => {
                if let Some(hn) = hn {
                    notes.push(format!(
                        "the COWD header names parent `{hn}`, which is not here; using `{r}` by the naming rule"
                    ));
                }
                Some(r.clone())
            }
            (Some(hn), None, _, None) => {
                return Err(Error::chain(
                    path,
                    format!(
                        "parent `{hn}` named in the COWD header not found (looked in `{}`){}",
                        dir.display(),
                        by_rule
                            .as_deref()
                            .map(|r| format!(", nor `{r}` by the naming rule"))
                            .unwrap_or_default()
                    ),
                ))
            }
            (None, None, Some(r), None) => {
                return Err(Error::chain(
                    path,
                    format!(
                        "parent `{r}` not found (looked for `{r}` in `{}`)",
                        dir.display()
                    ),
                ))
            }
            // Impossible combinations (a path without a name).
            _ => None,
        };
        // ESX 2 names an RDM's REDO after its mapping file (`vm-rdm.vmdk.REDO`), a link
        // to the device: the parent is the descriptor that maps it.
        let parent = parent.map(|p| match rdm_owner(&dir, &p) {
            Some(owner) => {
                notes.push(format!(
                    "`{p}` is a raw device mapping file; its descriptor `{owner}` is the parent"
                ));
                owner
            }
            None => p,
        });
        let line = ExtentLine {
            access: Access::Rw,
            sectors: u64::from(h.num_sectors),
            kind: ExtentType::VmfsSparse,
            file: Some(fname),
            offset: None,
            extra: vec![],
        };
        let ct = if parent.is_some() {
            CreateType::VmfsSparse
        } else {
            CreateType::Custom
        };
        if parent.is_some() {
            notes.push(
                "ESX 2 REDO log (COWD, no descriptor): linked to its parent by name, no CID check"
                    .into(),
            );
        } else {
            notes.push(format!(
                "legacy COWD base disk (geometry {}/{}/{})",
                h.geometry.0, h.geometry.1, h.geometry.2
            ));
        }
        let d = Descriptor::new(
            ct,
            0xffff_fffe,
            parent.as_deref().map(|p| (0xffff_fffe, p)),
            vec![line.clone()],
            &[],
        );
        let capacity = ext.len();
        Ok(Layer {
            path: path.to_path_buf(),
            descriptor: d,
            embedded: false,
            create_type: ct,
            extents: vec![ExtentSlot {
                start: 0,
                line,
                path: Some(path.to_path_buf()),
                extent: Extent::Cowd(Box::new(ext)),
            }],
            capacity,
            notes,
            bare_cowd: true,
        })
    }

    fn open_sparse_file(path: &Path, src: Source, opts: &OpenOptions) -> Result<Layer> {
        let h = sparse::read_header(&src)?;
        let mut notes = Vec::new();
        let mut desc = None;
        if h.descriptor_offset != 0 && h.descriptor_size != 0 {
            let off = h.descriptor_offset.checked_mul(SECTOR);
            let size = h
                .descriptor_size
                .checked_mul(SECTOR)
                .map(|s| s.min(MAX_DESCRIPTOR_BYTES as u64));
            match (off, size) {
                (Some(off), Some(size)) if off < src.len() => {
                    let size = size.min(src.len() - off) as usize;
                    let mut b = vec![0u8; size];
                    src.read_exact_at(&mut b, off)?;
                    let d = Descriptor::parse(&b, path)?;
                    // A header-only area of zeros (qemu's split extents) means no descriptor.
                    if !d.header_entries().is_empty() || !d.extents().is_empty() {
                        desc = Some(d);
                    }
                }
                _ => {
                    return Err(Error::corrupt(
                        path,
                        28,
                        format!(
                            "embedded descriptor at sector {} lies outside the {}-byte file",
                            h.descriptor_offset,
                            src.len()
                        ),
                    ))
                }
            }
        }
        let default_type = if h.compressed() {
            CreateType::StreamOptimized
        } else {
            CreateType::MonolithicSparse
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let self_line = ExtentLine {
            access: Access::Rw,
            sectors: h.capacity_sectors,
            kind: ExtentType::Sparse,
            file: Some(name),
            offset: None,
            extra: vec![],
        };
        let mut d = match desc {
            Some(d) => d,
            None => {
                notes.push(
                    "no embedded descriptor (a split extent opened on its own?): treated as a standalone disk"
                        .into(),
                );
                Descriptor::new(
                    default_type,
                    0xffff_fffe,
                    None,
                    vec![self_line.clone()],
                    &[],
                )
            }
        };
        let ct = d.create_type().unwrap_or(default_type);
        if d.extents().len() > 1 {
            return Err(Error::unsupported(
                path,
                format!(
                    "the embedded descriptor lists {} extents; open the disk's descriptor file instead",
                    d.extents().len()
                ),
            ));
        }
        if let Some(e) = d.extents().first() {
            if e.sectors != h.capacity_sectors {
                notes.push(format!(
                    "embedded descriptor says {} sectors, header says {}; using the header",
                    e.sectors, h.capacity_sectors
                ));
            }
        }
        // The embedded extent line names this file, perhaps by an old name: ignore it.
        let line = d
            .extents()
            .first()
            .map(|e| (*e).clone())
            .unwrap_or(self_line);
        d.set_extents(vec![line.clone()]);
        let ext = SparseExtent::open_with_progress(src, opts.index_progress)?;
        if ext.is_indexed() {
            notes.push(
                "the stream was written without a grain directory: its grain records were read once and indexed".into(),
            );
        }
        let capacity = ext.len();
        Ok(Layer {
            path: path.to_path_buf(),
            descriptor: d,
            embedded: true,
            create_type: ct,
            extents: vec![ExtentSlot {
                start: 0,
                line,
                path: Some(path.to_path_buf()),
                extent: Extent::Sparse(Box::new(ext)),
            }],
            capacity,
            notes,
            bare_cowd: false,
        })
    }

    /// Build a layer from a parsed text descriptor at `path`.
    pub(crate) fn from_descriptor(
        path: &Path,
        d: Descriptor,
        embedded: bool,
        opts: &OpenOptions,
    ) -> Result<Layer> {
        let Some(ct_text) = d.get("createType") else {
            return Err(Error::Descriptor {
                path: path.to_path_buf(),
                line: 0,
                what: "no createType".into(),
            });
        };
        let ct = CreateType::parse(ct_text)
            .ok_or_else(|| Error::unsupported(path, format!("createType `{ct_text}`")))?;
        let lines: Vec<ExtentLine> = d.extents().into_iter().cloned().collect();
        if lines.is_empty() {
            return Err(Error::Descriptor {
                path: path.to_path_buf(),
                line: 0,
                what: "the descriptor lists no extents".into(),
            });
        }
        let dir = folder_of(path);
        let mut notes = Vec::new();
        let mut extents = Vec::with_capacity(lines.len());
        let mut start = 0u64;
        for (i, line) in lines.into_iter().enumerate() {
            let what = format!("extent {}", i + 1);
            if line.sectors == 0 {
                return Err(Error::Descriptor {
                    path: path.to_path_buf(),
                    line: 0,
                    what: format!("{what} has a size of 0 sectors"),
                });
            }
            let declared = line
                .sectors
                .checked_mul(SECTOR)
                .ok_or_else(|| Error::Descriptor {
                    path: path.to_path_buf(),
                    line: 0,
                    what: format!("{what}: size {} sectors overflows", line.sectors),
                })?;
            let (ext, epath) = if line.access == Access::NoAccess || line.kind == ExtentType::Zero {
                (Extent::Zero { len: declared }, None)
            } else {
                let name = line.file.as_deref().unwrap_or("");
                let p = resolve_name(
                    &dir,
                    name,
                    ct.is_device() || opts.allow_outside_paths,
                    &what,
                    path,
                    &mut notes,
                )?;
                confine(&p, &dir, ct, opts.allow_outside_paths, &what, path)?;
                let ext = match line.kind {
                    ExtentType::Sparse => {
                        let src = open_extent(&p, opts, &what, name, &dir, path)?;
                        let s = SparseExtent::open_with_progress(src, opts.index_progress)?;
                        if s.len() != declared {
                            notes.push(format!(
                                "{what}: descriptor says {} sectors, `{}` header says {}; using the header",
                                line.sectors,
                                p.display(),
                                s.len() / SECTOR
                            ));
                        }
                        Extent::Sparse(Box::new(s))
                    }
                    ExtentType::Flat
                    | ExtentType::Vmfs
                    | ExtentType::VmfsRaw
                    | ExtentType::VmfsRdm => {
                        let src = open_extent(&p, opts, &what, name, &dir, path)?;
                        flat_extent(src, &line, declared, &what, &p, path, &mut notes)?
                    }
                    ExtentType::VmfsSparse => {
                        let src = open_extent(&p, opts, &what, name, &dir, path)?;
                        let c = CowdExtent::open(src)?;
                        if c.len() != declared {
                            notes.push(format!(
                                "{what}: descriptor says {} sectors, `{}` header says {}; using the header",
                                line.sectors,
                                p.display(),
                                c.len() / SECTOR
                            ));
                        }
                        Extent::Cowd(Box::new(c))
                    }
                    ExtentType::SeSparse => {
                        let src = open_extent(&p, opts, &what, name, &dir, path)?;
                        Extent::SeSparse(Box::new(SeSparseExtent::open(src)?))
                    }
                    ExtentType::Zero => unreachable!("handled above"),
                };
                (ext, Some(p))
            };
            let len = ext.len();
            extents.push(ExtentSlot {
                start,
                line,
                path: epath,
                extent: ext,
            });
            start = start.checked_add(len).ok_or_else(|| Error::Descriptor {
                path: path.to_path_buf(),
                line: 0,
                what: "total size of the extents overflows".into(),
            })?;
        }
        Ok(Layer {
            path: path.to_path_buf(),
            descriptor: d,
            embedded,
            create_type: ct,
            extents,
            capacity: start,
            notes,
            bare_cowd: false,
        })
    }

    /// CID of this layer.
    pub fn cid(&self) -> Option<u32> {
        self.descriptor.cid()
    }

    /// parentCID of this layer (None when there is no parent).
    pub fn parent_cid(&self) -> Option<u32> {
        self.descriptor.parent_cid().filter(|&c| c != NO_PARENT_CID)
    }

    /// Whether this is an increment (`export --delta`): a streamOptimized file with a
    /// parent link. It is a backup of a delta's changes, not a snapshot: nothing runs on
    /// it, so it is never counted as a child of the disk it names.
    pub fn is_increment(&self) -> bool {
        self.create_type == crate::format::descriptor::CreateType::StreamOptimized
            && self
                .descriptor
                .parent_cid()
                .is_some_and(|c| c != crate::format::descriptor::NO_PARENT_CID)
    }

    /// The file this layer was opened from (its descriptor, or its one sparse file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its createType as VMware spells it (`monolithicSparse`, `vmfsSparse`,
    /// `streamOptimized`...).
    pub fn disk_type(&self) -> &'static str {
        self.create_type.as_str()
    }

    /// Its capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// What a person should know about it (a path fallback, a size disagreement...).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The parent hint, if the layer names a parent.
    pub fn parent_hint(&self) -> Option<&str> {
        self.descriptor
            .get("parentFileNameHint")
            .filter(|s| !s.is_empty())
    }

    /// Grain size in bytes (the largest of the extents').
    pub fn grain_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| e.extent.grain_bytes())
            .max()
            .unwrap_or(512)
    }

    /// Files of this layer (descriptor and extents), without repeats.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.path.clone()];
        for e in &self.extents {
            if let Some(p) = &e.path {
                if !v.contains(p) {
                    v.push(p.clone());
                }
            }
        }
        v
    }

    /// Bytes these files occupy on disk (allocated blocks).
    pub fn bytes_on_disk(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.files()
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Allocation runs of this layer alone (depth 0), clipped to its capacity.
    pub fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        self.map_into(range, &mut out)?;
        Ok(out)
    }

    /// Like [`map`](Self::map), appending to `out`.
    pub(crate) fn map_into(&self, range: Range<u64>, out: &mut Vec<Run>) -> Result<()> {
        let end = range.end.min(self.capacity);
        if range.start >= end {
            return Ok(());
        }
        // Extents are sorted by start: find the first that ends after range.start.
        let first = self
            .extents
            .partition_point(|e| e.start + e.extent.len() <= range.start);
        for (i, slot) in self.extents.iter().enumerate().skip(first) {
            if slot.start >= end {
                break;
            }
            let rel_start = range.start.max(slot.start) - slot.start;
            let rel_end = end.min(slot.start + slot.extent.len()) - slot.start;
            slot.extent.map(i, rel_start..rel_end, slot.start, out)?;
        }
        Ok(())
    }

    /// Read the bytes of one run of this layer into `buf` (`buf.len() == run.len`).
    pub(crate) fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        match run.alloc {
            Alloc::Data { extent, offset } => self.extents[extent].extent.read_data(buf, offset),
            Alloc::Compressed { extent, offset } => {
                let slot = &self.extents[extent];
                slot.extent
                    .read_compressed(buf, offset, run.start - slot.start)
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// Open an extent's file; a missing file is a chain error naming the folder searched.
fn open_extent(
    p: &Path,
    opts: &OpenOptions,
    what: &str,
    name: &str,
    dir: &Path,
    descriptor: &Path,
) -> Result<Source> {
    Source::open(p, opts.mode).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            // A mapping file (RDM) is a link to a device: name the device.
            match std::fs::read_link(p) {
                Ok(target) => Error::chain(
                    descriptor,
                    format!(
                        "{what}: `{name}` maps device `{}`, which is missing (refusing to read it as an empty disk)",
                        target.display()
                    ),
                ),
                Err(_) => Error::chain(
                    descriptor,
                    format!("{what}: file `{name}` is missing (looked in `{}`)", dir.display()),
                ),
            }
        }
        e => e,
    })
}

/// Push an unallocated run (used for ranges past a layer's capacity).
pub(crate) fn push_unallocated(out: &mut Vec<Run>, start: u64, len: u64, depth: u32) {
    push_run(
        out,
        Run {
            start,
            len,
            alloc: Alloc::Unallocated,
            depth,
        },
    );
}

/// A flat extent (flat, vmfs, raw device) of `declared` bytes at the line's offset in
/// `src`; a file shorter than that reads as zeros past its end (a note says so).
fn flat_extent(
    src: Source,
    line: &ExtentLine,
    declared: u64,
    what: &str,
    p: &Path,
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<Extent> {
    let offset = line
        .offset
        .unwrap_or(0)
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::Descriptor {
            path: path.to_path_buf(),
            line: 0,
            what: format!("{what}: offset overflows"),
        })?;
    let Some(end) = offset.checked_add(declared) else {
        return Err(Error::Descriptor {
            path: path.to_path_buf(),
            line: 0,
            what: format!(
                "{what}: offset {} sectors plus size {} sectors overflows",
                line.offset.unwrap_or(0),
                line.sectors
            ),
        });
    };
    if end > src.len() {
        notes.push(format!(
            "{what}: `{}` is {} bytes, shorter than the extent ({} bytes from offset {}); the rest reads as zeros",
            p.display(),
            src.len(),
            declared,
            offset
        ));
    }
    Ok(Extent::Flat(FlatExtent {
        src,
        offset,
        len: declared,
    }))
}
