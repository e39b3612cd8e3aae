//! A chain of layers linked by `parentFileNameHint` + `parentCID`, read as one disk.
//!
//! Unallocated ranges fall through to the parent; zeroed grains read as zeros and hide
//! it. The chain is opened top-down with a depth cap, loop detection by file identity
//! (device + inode, before following any parent) and a CID check per link.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::disk::{Alloc, Run, VirtualDisk};
use crate::error::{Error, Result};
use crate::format::descriptor::NO_PARENT_CID;
use crate::layer::{push_unallocated, Layer, OpenOptions};
use crate::resolve::resolve_name;

/// Deepest chain we open (ESXi allows 32 snapshots per disk; REDO chains are shorter).
pub const MAX_CHAIN_DEPTH: usize = 255;

/// An opened chain: `layers[0]` is the top (the file named), the last is the base.
#[derive(Debug)]
pub struct Chain {
    /// Layers, top first.
    pub(crate) layers: Vec<Layer>,
    /// Warnings raised while opening (CID mismatches accepted with `ignore_cid`...).
    pub(crate) warnings: Vec<String>,
}

fn file_id(path: &Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).map_err(|e| Error::io("stat", path, 0, e))?;
    Ok((m.dev(), m.ino()))
}

impl Chain {
    /// A disk of one layer read alone (a layer from
    /// [`Layer::from_source`](crate::Layer::from_source)). A delta read alone reads its
    /// parent's ranges as zeros: its warnings say so; join it to its parent with
    /// [`from_layers`](Self::from_layers).
    pub fn from_layer(layer: Layer) -> Chain {
        let warnings = match layer.parent_hint() {
            Some(p) if !layer.is_increment() => vec![format!(
                "`{}` is a delta of `{p}` read alone: what it leaves to its parent reads as zeros",
                layer.path.display()
            )],
            _ => Vec::new(),
        };
        Chain {
            layers: vec![layer],
            warnings,
        }
    }

    /// A chain of layers opened by the caller (from
    /// [`Layer::from_source`](crate::Layer::from_source), say), top first: each layer but
    /// the last must name a parent and the next layer must be it (its content ID the
    /// one the child records, unless `opts.ignore_cid`), and the last must name none.
    pub fn from_layers(layers: Vec<Layer>, opts: &OpenOptions) -> Result<Chain> {
        let Some(base) = layers.last() else {
            return Err(Error::InvalidInput(
                "a chain needs at least one layer".into(),
            ));
        };
        if let Some(p) = base.parent_hint() {
            return Err(Error::chain(
                &base.path,
                format!("its parent `{p}` is not among the layers given"),
            ));
        }
        if layers.len() > MAX_CHAIN_DEPTH {
            return Err(Error::chain(
                &layers[0].path,
                format!("chain deeper than {MAX_CHAIN_DEPTH} layers"),
            ));
        }
        let mut warnings = Vec::new();
        for w in layers.windows(2) {
            let (child, parent) = (&w[0], &w[1]);
            if child.parent_hint().is_none() {
                return Err(Error::chain(
                    &child.path,
                    format!(
                        "it names no parent, but `{}` is given below it",
                        parent.path.display()
                    ),
                ));
            }
            if let Some(msg) = cid_mismatch(child, parent) {
                if !opts.ignore_cid {
                    return Err(Error::Chain {
                        path: child.path.clone(),
                        what: msg,
                        unless: Some(crate::error::Override::IgnoreCid),
                    });
                }
                warnings.push(format!(
                    "`{}`: {msg} (read anyway, as asked)",
                    child.path.display()
                ));
            }
            warnings.extend(size_mismatch(child, parent));
        }
        Ok(Chain { layers, warnings })
    }

    /// The layers, top first (the file named) down to the base.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// What a person should know about how the chain was opened (a content ID
    /// mismatch read through as asked, a size disagreement, a pending operation).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Open `path` and every parent below it.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut seen: Vec<((u64, u64), PathBuf)> = Vec::new();
        let mut warnings = Vec::new();
        let mut next = path.to_path_buf();
        loop {
            let id = file_id(&next)?;
            if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
                let names: Vec<String> = seen
                    .iter()
                    .map(|(_, p)| format!("`{}`", p.display()))
                    .collect();
                return Err(Error::chain(
                    &next,
                    format!(
                        "parent loop: `{}` is already in the chain ({} -> `{}`)",
                        first.display(),
                        names.join(" -> "),
                        next.display()
                    ),
                ));
            }
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::chain(
                    &next,
                    format!("chain deeper than {MAX_CHAIN_DEPTH} layers"),
                ));
            }
            seen.push((id, next.clone()));
            // A delta an interrupted commit is removing (extents first) may be missing
            // an extent: say that, not just what is missing.
            let layer =
                Layer::open(&next, opts).map_err(
                    |e| match crate::recovery::commit_pending_note(&next)
                        .or_else(|| crate::recovery::commit_pending_note(path))
                    {
                        Some(note) => Error::chain(&next, note),
                        None => e,
                    },
                )?;
            let parent = parent_of(&layer, path, opts, &mut warnings)?;
            layers.push(layer);
            let Some(p) = parent else { break };
            next = p;
        }
        // A layer in the middle of an interrupted apply (any layer: the content through it
        // may be neither point), or the top in the middle of an interrupted commit into it
        // (read through its child it is whole; read alone it may be neither point).
        // A reader may read an apply's target that can be read as one point (see
        // `ops::apply::read_through`); the chain's warnings then say so.
        let mut pending_notes = Vec::new();
        if !opts.ignore_pending {
            for (i, l) in layers.iter_mut().enumerate() {
                if let Some(p) = crate::recovery::pending_of(l) {
                    if i == 0 || p.op != "commit" {
                        if opts.read_pending && p.op == "apply" {
                            if let Some(note) = crate::ops::apply::read_through(l) {
                                pending_notes.push(note);
                                continue;
                            }
                        }
                        let m = crate::recovery::pending_message(l).unwrap_or_default();
                        return Err(Error::chain(&l.path, m));
                    }
                }
            }
        }
        check_links(&layers, path, opts, &mut warnings)?;
        warnings.extend(pending_notes);
        Ok(Chain { layers, warnings })
    }

    /// A raw disk image (a plain file of whole sectors, or a block device) read as a disk:
    /// a one-layer chain over it as a flat extent (holes found with SEEK_HOLE, as for thin
    /// flat files). Its content ID is derived from the file's identity.
    pub fn open_raw(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        use std::os::unix::fs::FileTypeExt;
        if !opts.ignore_pending {
            if let Some(note) = crate::recovery::raw_pending_note(path) {
                return Err(Error::chain(path, note));
            }
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, 0, e))?;
        let block = meta.file_type().is_block_device();
        if !block && !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "`{}` is neither a regular file nor a block device; a raw stream is imported from standard input, with its size given (`< {}`)",
                path.display(),
                path.display()
            )));
        }
        let size = if block {
            let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
            crate::io::device_size(&f).map_err(|e| Error::io("get the size of", path, 0, e))?
        } else {
            meta.len()
        };
        if size == 0 || size % 512 != 0 {
            return Err(Error::InvalidInput(format!(
                "raw image `{}` holds {size} bytes, not a whole number of 512-byte sectors",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::InvalidInput(format!("`{}` is not a file", path.display())))?;
        let mut h = crc32fast::Hasher::new();
        h.update(b"vmdkit raw");
        h.update(&meta.dev().to_le_bytes());
        h.update(&meta.ino().to_le_bytes());
        h.update(&size.to_le_bytes());
        h.update(&meta.mtime().to_le_bytes());
        let mut cid = h.finalize();
        while cid >= 0xffff_fffe {
            cid = cid.wrapping_mul(2_654_435_761).wrapping_add(1);
        }
        use crate::format::descriptor::{CreateType, Descriptor, ExtentLine, ExtentType};
        let (ct, kind) = if block {
            (CreateType::FullDevice, ExtentType::Flat)
        } else {
            (CreateType::MonolithicFlat, ExtentType::Flat)
        };
        let mut line = ExtentLine::rw(kind, size / 512, name);
        line.offset = Some(0);
        let d = Descriptor::new(ct, cid, None, vec![line], &[]);
        let layer = Layer::from_descriptor(path, d, false, opts)?;
        Ok(Chain {
            layers: vec![layer],
            warnings: Vec::new(),
        })
    }

    /// Only the layer at `path`, for reporting on a disk whose chain cannot be opened
    /// (a missing parent): `why` becomes the chain's warning.
    pub fn top_only(path: &Path, opts: &OpenOptions, why: String) -> Result<Chain> {
        Ok(Chain {
            layers: vec![Layer::open(path, opts)?],
            warnings: vec![why],
        })
    }

    /// The content ID of the disk the layers from `depth` down present: what an export of
    /// it records as its CID, and what an increment of the layer above records as its
    /// parentCID, so a restore chains (`export`, `import`, `export --delta`, `apply`).
    ///
    /// It is the layer's own CID, which VMware changes on every first write after an open
    /// and children record as their parentCID: it already names this content. Layers
    /// without one (ESX 2 REDO logs, whose links are by name only; a `fffffffe` never
    /// written disk is kept as it is) get an ID derived from the ID below and the files'
    /// size and modification time, stable while the layer is unchanged.
    pub fn content_id(&self, depth: usize) -> u32 {
        let Some(layer) = self.layers.get(depth) else {
            return NO_PARENT_CID;
        };
        match layer.cid() {
            Some(c) if c != NO_PARENT_CID && !layer.bare_cowd => c,
            _ => {
                let mut h = crc32fast::Hasher::new();
                h.update(b"vmdkit content id");
                h.update(&self.content_id(depth + 1).to_le_bytes());
                for f in layer.files() {
                    if let Ok(m) = std::fs::metadata(&f) {
                        h.update(&m.len().to_le_bytes());
                        h.update(&m.mtime().to_le_bytes());
                        h.update(&m.mtime_nsec().to_le_bytes());
                    }
                }
                let mut c = h.finalize();
                while c >= 0xffff_fffe {
                    c = c.wrapping_mul(2_654_435_761).wrapping_add(1);
                }
                c
            }
        }
    }

    /// Lock every file of the chain: layers `0..=through` exclusively (they are about to
    /// be written), the ones below shared (they are read).
    pub(crate) fn lock(&self, locks: &mut crate::guard::LockSet, through: usize) -> Result<()> {
        use crate::guard::LockKind;
        for (i, l) in self.layers.iter().enumerate() {
            let kind = if i <= through {
                LockKind::Exclusive
            } else {
                LockKind::Shared
            };
            for f in l.files() {
                locks.lock(&f, kind)?;
            }
        }
        Ok(())
    }

    /// The top layer.
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The base layer.
    pub fn base(&self) -> &Layer {
        self.layers.last().expect("a chain has a layer")
    }

    fn map_from(&self, depth: usize, range: Range<u64>, out: &mut Vec<Run>) -> Result<()> {
        let base_depth = (self.layers.len() - 1) as u32;
        self.map_until(depth, self.layers.len(), base_depth, range, out)
    }

    /// What the layers above `depth` decide in `range` (clipped to the capacity); the
    /// rest is `Unallocated` at depth `depth`. Never reads the layers from `depth` down:
    /// a commit plans with it while it writes into the layer at `depth`.
    pub(crate) fn map_above(&self, depth: usize, range: Range<u64>) -> Result<Vec<Run>> {
        let end = range.end.min(self.capacity());
        let mut out = Vec::new();
        if range.start < end {
            self.map_until(0, depth, depth as u32, range.start..end, &mut out)?;
        }
        Ok(out)
    }

    /// Runs of the layers from `depth` to before `stop`; what none of them holds is
    /// `Unallocated` at `unallocated_depth`.
    fn map_until(
        &self,
        depth: usize,
        stop: usize,
        unallocated_depth: u32,
        range: Range<u64>,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        if depth >= stop.min(self.layers.len()) {
            push_unallocated(out, range.start, range.end - range.start, unallocated_depth);
            return Ok(());
        }
        let layer = &self.layers[depth];
        let last = depth + 1 == stop.min(self.layers.len());
        let mut runs = Vec::new();
        layer.map_into(range.clone(), &mut runs)?;
        let mut pos = range.start;
        for r in runs {
            if r.alloc == Alloc::Unallocated {
                if last {
                    push_unallocated(out, r.start, r.len, unallocated_depth);
                } else {
                    self.map_until(depth + 1, stop, unallocated_depth, r.start..r.end(), out)?;
                }
            } else {
                crate::disk::push_run(
                    out,
                    Run {
                        depth: depth as u32,
                        ..r
                    },
                );
            }
            pos = r.end();
        }
        if pos < range.end {
            // Past this layer's capacity: nothing here.
            if last {
                push_unallocated(out, pos, range.end - pos, unallocated_depth);
            } else {
                self.map_until(depth + 1, stop, unallocated_depth, pos..range.end, out)?;
            }
        }
        Ok(())
    }

    /// Read the content the layers from `depth` down present (zeros past the last).
    pub(crate) fn read_below(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        if depth >= self.layers.len() {
            buf.fill(0);
            return Ok(());
        }
        self.read_from(depth, buf, offset)
    }

    /// Allocation runs as seen from layer `depth` down.
    pub(crate) fn map_below(&self, depth: usize, range: Range<u64>) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        if depth < self.layers.len() && range.start < range.end {
            self.map_from(depth, range, &mut out)?;
        }
        Ok(out)
    }

    fn read_from(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let layer = &self.layers[depth];
        let end = offset + buf.len() as u64;
        let mut runs = Vec::new();
        layer.map_into(offset..end, &mut runs)?;
        let mut pos = offset;
        let last = depth + 1 == self.layers.len();
        for r in &runs {
            let sub = &mut buf[(r.start - offset) as usize..(r.end() - offset) as usize];
            if r.alloc == Alloc::Unallocated && !last {
                self.read_from(depth + 1, sub, r.start)?;
            } else {
                layer.read_run(r, sub)?;
            }
            pos = r.end();
        }
        if pos < end {
            let sub = &mut buf[(pos - offset) as usize..];
            if last {
                sub.fill(0);
            } else {
                self.read_from(depth + 1, sub, pos)?;
            }
        }
        Ok(())
    }
}

/// The parent `layer` names, resolved in its folder (or outside it, as asked), which
/// must exist; None for a base. `top` is the disk opened (for an interrupted commit's
/// note).
fn parent_of(
    layer: &Layer,
    top: &Path,
    opts: &OpenOptions,
    warnings: &mut Vec<String>,
) -> Result<Option<PathBuf>> {
    let path = top;
    match layer.parent_hint() {
        Some(hint) => {
            let dir = crate::io::folder_of(&layer.path);
            let mut notes = Vec::new();
            let abs = Path::new(hint);
            let p = if opts.allow_outside_paths && abs.is_absolute() && abs.exists() {
                abs.to_path_buf()
            } else {
                resolve_name(&dir, hint, false, "parent", &layer.path, &mut notes)?
            };
            crate::resolve::confine(
                &p,
                &dir,
                crate::format::descriptor::CreateType::Custom,
                opts.allow_outside_paths,
                "parent",
                &layer.path,
            )?;
            if !p.exists() {
                if let Some(note) = crate::recovery::commit_pending_note(&layer.path)
                    .or_else(|| crate::recovery::commit_pending_note(path))
                {
                    return Err(Error::chain(&layer.path, note));
                }
                return Err(Error::chain(
                    &layer.path,
                    format!(
                        "parent `{hint}` not found (looked for `{}` in `{}`)",
                        p.file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default(),
                        dir.display()
                    ),
                ));
            }
            warnings.extend(notes);
            Ok(Some(p))
        }
        None => {
            if let Some(msg) = missing_parent_hint(layer) {
                warnings.push(msg);
            }
            Ok(None)
        }
    }
}

/// The child's parentCID against its parent's CID, when they differ (ESX 2 REDO logs
/// carry no CIDs: they are linked by name only).
fn cid_mismatch(child: &Layer, parent: &Layer) -> Option<String> {
    let (want, have) = (child.descriptor.parent_cid(), parent.cid());
    (want != have && !child.bare_cowd).then(|| {
        format!(
            "parentCID {} does not match the CID {} of parent `{}`",
            fmt_cid(want),
            fmt_cid(have),
            parent.path.display()
        )
    })
}

/// A child whose size is not its parent's (a warning: the chain still reads).
fn size_mismatch(child: &Layer, parent: &Layer) -> Option<String> {
    (child.capacity != parent.capacity).then(|| {
        format!(
            "`{}` is {} bytes but its parent `{}` is {} bytes",
            child.path.display(),
            child.capacity,
            parent.path.display(),
            parent.capacity
        )
    })
}

/// Content IDs (child against parent) and sizes along the chain: a mismatch is refused
/// unless asked to read anyway, or an interrupted commit explains it.
fn check_links(
    layers: &[Layer],
    path: &Path,
    opts: &OpenOptions,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for w in layers.windows(2) {
        let (child, parent) = (&w[0], &w[1]);
        let want = child.descriptor.parent_cid();
        if let Some(msg) = cid_mismatch(child, parent) {
            let msg = format!("{msg}: the parent changed after this child was made");
            if opts.ignore_cid {
                warnings.push(format!(
                    "`{}`: {msg} (read anyway, as asked)",
                    child.path.display()
                ));
            } else if crate::recovery::commit_explains(&child.path, parent, want)
                || crate::recovery::commit_explains(path, parent, want)
            {
                // An interrupted commit merged this delta into its parent and gave
                // the parent its new CID: the delta still shadows only what the
                // parent now holds too, so reading through it reads the same.
                warnings.push(format!(
                    "`{}`: merged into `{}` by an interrupted `vmdkit commit` that has not removed it yet; run the same commit again to finish",
                    child.path.display(),
                    parent.path.display()
                ));
            } else if let Some(note) = crate::recovery::commit_pending_note(&child.path)
                .or_else(|| crate::recovery::commit_pending_note(path))
            {
                return Err(Error::chain(&child.path, note));
            } else {
                return Err(Error::Chain {
                    path: child.path.clone(),
                    what: msg,
                    unless: Some(crate::error::Override::IgnoreCid),
                });
            }
        }
        warnings.extend(size_mismatch(child, parent));
    }
    Ok(())
}

/// A layer that names a parent CID but no parent file: read as a base, though its
/// unallocated ranges belong to a parent nobody can find.
pub fn missing_parent_hint(layer: &Layer) -> Option<String> {
    let c = layer.parent_cid()?;
    if layer.parent_hint().is_some() || layer.bare_cowd {
        return None;
    }
    Some(format!(
        "`{}` has parentCID {c:08x} but no parentFileNameHint: it is a delta whose parent is not named; read as a base disk, the ranges it does not hold read as zeros",
        layer.path.display()
    ))
}

fn fmt_cid(c: Option<u32>) -> String {
    c.map_or("(none)".to_string(), |c| format!("{c:08x}"))
}

impl VirtualDisk for Chain {
    fn capacity(&self) -> u64 {
        self.top().capacity
    }

    fn granularity(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.grain_bytes())
            .max()
            .unwrap_or(512)
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let end = range.end.min(self.capacity());
        let mut out = Vec::new();
        if range.start < end {
            self.map_from(0, range.start..end, &mut out)?;
        }
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.capacity())
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "read of {} bytes at {offset:#x} is past the disk's capacity {:#x}",
                    buf.len(),
                    self.capacity()
                ))
            })?;
        self.read_from(0, buf, offset)
    }

    fn source_files(&self) -> Vec<PathBuf> {
        self.layers.iter().flat_map(|l| l.files()).collect()
    }

    fn will_need(&self, range: Range<u64>) {
        let Ok(runs) = self.map(range) else {
            return;
        };
        for r in runs {
            if let Alloc::Data { extent, offset } | Alloc::Compressed { extent, offset } = r.alloc {
                if let Some(slot) = self.layers[r.depth as usize].extents.get(extent) {
                    slot.extent.will_need(offset, r.len);
                }
            }
        }
    }
}

/// The top layer of a chain as an increment sees it: every 64 KiB grain the top layer
/// touches (data, zeroed or partly) maps as data to read, the rest as unallocated (the
/// parent's). Reads return the whole chain's content, so a grain the top layer holds only
/// partly carries the parent's bytes around its own: restoring the parent and writing
/// these grains gives the chain's content exactly.
pub struct DeltaView<'a> {
    chain: &'a Chain,
    grain: u64,
}

impl<'a> DeltaView<'a> {
    /// A view of `chain`'s top layer in `grain`-byte grains.
    pub fn new(chain: &'a Chain, grain: u64) -> DeltaView<'a> {
        DeltaView {
            chain,
            grain: grain.max(512),
        }
    }
}

impl VirtualDisk for DeltaView<'_> {
    fn capacity(&self) -> u64 {
        self.chain.capacity()
    }

    fn granularity(&self) -> u64 {
        self.grain
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Run>> {
        let cap = self.capacity();
        let end = range.end.min(cap);
        let mut out = Vec::new();
        if range.start >= end {
            return Ok(out);
        }
        let g = self.grain;
        // Widen to whole grains so a grain touched anywhere is found.
        let wide = range.start / g * g..end.div_ceil(g).saturating_mul(g).min(cap);
        let mut runs = Vec::new();
        self.chain.top().map_into(wide, &mut runs)?;
        let mut pos = range.start;
        let put = |out: &mut Vec<Run>, start: u64, stop: u64, present: bool| {
            let (start, stop) = (start.max(range.start), stop.min(end));
            if start < stop {
                let alloc = if present {
                    Alloc::Data {
                        extent: 0,
                        offset: start,
                    }
                } else {
                    Alloc::Unallocated
                };
                crate::disk::push_run(
                    out,
                    Run {
                        start,
                        len: stop - start,
                        alloc,
                        depth: if present { 0 } else { 1 },
                    },
                );
            }
        };
        for r in runs.iter().filter(|r| r.alloc.is_present()) {
            let a = (r.start / g * g).max(pos);
            let b = r.end().div_ceil(g).saturating_mul(g).min(cap);
            if b <= pos {
                continue;
            }
            put(&mut out, pos, a, false);
            put(&mut out, a, b, true);
            pos = b.max(pos);
        }
        put(&mut out, pos, end, false);
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.chain.read_at(buf, offset)
    }

    fn source_files(&self) -> Vec<PathBuf> {
        self.chain.source_files()
    }

    fn will_need(&self, range: Range<u64>) {
        self.chain.will_need(range)
    }
}
