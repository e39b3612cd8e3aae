//! Walking a chain for `check`: each layer's descriptor, extents and files, the CID
//! links, and at the end the readers' own verdict. The walk goes on past damage (the
//! chain opener stops at the first error), with the same name rules ([`crate::resolve`])
//! and loop detection by device and inode.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::cowd::check_cowd;
use super::sparse::check_sparse_file;
use super::{CheckOptions, CheckReport, Severity};
use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use crate::format::sparse::{self, SECTOR};
use crate::guard::{FileId, LockKind, LockSet};
use crate::io::folder_of;
use crate::io::{Source, SourceMode};
use crate::layer::{Layer, OpenOptions};
use crate::resolve::{confine, resolve_name};

/// Check `disk` and every parent below it.
pub fn check(disk: &Path, repair: bool) -> Result<CheckReport> {
    check_with(
        disk,
        &CheckOptions {
            repair,
            ..Default::default()
        },
    )
}

/// What one layer says about its place in the chain.
#[derive(Default)]
struct Links {
    cid: Option<u32>,
    parent_cid: Option<u32>,
    parent_hint: Option<String>,
}

/// The walk's state.
struct Walk<'a> {
    opts: &'a CheckOptions,
    r: CheckReport,
    locks: LockSet,
    kind: LockKind,
}

/// Check `disk` and every parent below it, as `opts` says.
pub fn check_with(disk: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    if opts.repair {
        // A disk in the middle of an interrupted commit or apply holds data its tables do
        // not reference yet: "repairing" it would take what the rerun needs.
        if let Ok(c) =
            crate::chain::Chain::open(disk, &OpenOptions::for_recovery(opts.allow_outside_paths))
        {
            if let Some(m) = c.layers.iter().find_map(crate::recovery::pending_message) {
                return Err(crate::error::Error::refused(
                    disk,
                    format!("{m}; refusing to repair it before that (nothing was changed)"),
                    None,
                ));
            }
        }
    }
    if opts.repair && !opts.force {
        // Files the host marks read-only are refused before any repair writes (as
        // commit refuses them), root or not.
        let files =
            crate::chain::Chain::open(disk, &OpenOptions::for_recovery(opts.allow_outside_paths))
                .map(|c| c.layers.iter().flat_map(|l| l.files()).collect::<Vec<_>>())
                .unwrap_or_else(|_| vec![disk.to_path_buf()]);
        for f in files {
            if std::fs::metadata(&f).is_ok_and(|m| m.is_file() && m.permissions().readonly()) {
                return Err(crate::error::Error::refused(
                    &f,
                    format!(
                        "`{}` is read-only: refusing to repair it; nothing was changed (make it writable)",
                        f.display()
                    ),
                    Some(crate::error::Override::Force),
                ));
            }
        }
    }
    let mut w = Walk {
        opts,
        r: CheckReport {
            repair: opts.repair,
            ..Default::default()
        },
        locks: LockSet::new(),
        kind: if opts.repair {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        },
    };
    let mut next = Some(disk.to_path_buf());
    let mut seen: Vec<FileId> = Vec::new();
    let mut child: Option<(PathBuf, Option<u32>)> = None;
    while let Some(path) = next.take() {
        let id = FileId::of(&path);
        if id.is_some_and(|id| seen.contains(&id)) || seen.len() > crate::chain::MAX_CHAIN_DEPTH {
            w.r.add(
                &path,
                0,
                Severity::Corruption,
                "parent loop or chain too deep",
            );
            break;
        }
        seen.extend(id);
        let Some((links, cowd)) = w.layer(&path)? else {
            break;
        };
        if let Some((cpath, want)) = child.take() {
            if want.is_some() && want != links.cid && want != Some(NO_PARENT_CID) {
                w.r.add(
                    &cpath,
                    0,
                    Severity::Corruption,
                    format!(
                        "parentCID {:08x} does not match the CID {} of parent `{}`",
                        want.unwrap_or(0),
                        links.cid.map_or("-".into(), |c| format!("{c:08x}")),
                        path.display()
                    ),
                );
            }
        }
        if let Some(p) = w.parent(&path, links.parent_hint.as_deref()) {
            child = Some((path.clone(), links.parent_cid.filter(|_| !cowd)));
            next = Some(p);
        }
    }
    w.agree_with_readers(disk);
    Ok(w.r)
}

impl Walk<'_> {
    /// Check one layer; its links and whether it is a bare COWD file, or None when the
    /// walk cannot go on.
    fn layer(&mut self, path: &Path) -> Result<Option<(Links, bool)>> {
        if let Err(e) = crate::io::refuse_special(path) {
            self.r.incomplete = Some(e.to_string());
            return Ok(None);
        }
        self.locks.lock(path, self.kind)?;
        let mut head = [0u8; 4];
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.r.incomplete = Some(format!("cannot open `{}`: {e}", path.display()));
                return Ok(None);
            }
        };
        let _ = f.read_exact_at(&mut head, 0);
        if &head == b"COWD" {
            check_cowd(path, self.opts.repair, &mut self.r)?;
            let name = crate::io::file_name_of(path);
            let links = Links {
                parent_hint: name.strip_suffix(".REDO").map(str::to_string),
                ..Default::default()
            };
            return Ok(Some((links, true)));
        }
        if &head == b"KDMV" || &head == b"vmdk" {
            check_sparse_file(path, self.opts, &mut self.r)?;
            let links = match Layer::open(path, &open_options(self.opts)) {
                Ok(l) => Links {
                    cid: l.cid(),
                    parent_cid: l.descriptor.parent_cid(),
                    parent_hint: l.parent_hint().map(str::to_string),
                },
                Err(_) => Links::default(),
            };
            return Ok(Some((links, false)));
        }
        Ok(self.descriptor(path)?.map(|l| (l, false)))
    }

    /// A text descriptor: every extent, and extent sizes mended from sparse headers.
    fn descriptor(&mut self, path: &Path) -> Result<Option<Links>> {
        let text = std::fs::read(path).map_err(|e| Error::io("read", path, 0, e))?;
        let limit = text
            .len()
            .min(crate::format::descriptor::MAX_DESCRIPTOR_BYTES);
        let mut d = match Descriptor::parse(&text[..limit], path) {
            Ok(d) => d,
            Err(e) if !looks_like_descriptor(&text[..limit]) => {
                // Not a VMDK at all: the check cannot run (exit 1), it found no damage.
                self.r.incomplete = Some(format!(
                    "`{}` is not a VMDK (no sparse, stream or COWD magic, and not a descriptor: {e})",
                    path.display()
                ));
                return Ok(None);
            }
            Err(e) => {
                self.r.add(path, 0, Severity::Corruption, e.to_string());
                return Ok(None);
            }
        };
        let mut desc_dirty = false;
        let lines: Vec<ExtentLine> = d.extents().into_iter().cloned().collect();
        for (k, line) in lines.iter().enumerate() {
            if let Some(sectors) = self.extent(path, &d, k, line)? {
                d.extents_mut()[k].sectors = sectors;
                desc_dirty = true;
            }
        }
        if desc_dirty {
            let mut l = Layer::open(path, &open_options(self.opts))
                .map_err(|e| Error::InvalidInput(format!("reopening after repair: {e}")))?;
            l.descriptor = d.clone();
            crate::write::write_descriptor(&l)?;
        }
        Ok(Some(Links {
            cid: d.cid(),
            parent_cid: d.parent_cid(),
            parent_hint: d
                .get("parentFileNameHint")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        }))
    }

    /// Extent `k` of descriptor `d` at `path`; returns the size to write back into the
    /// descriptor when repair mends it from the extent's header.
    fn extent(
        &mut self,
        path: &Path,
        d: &Descriptor,
        k: usize,
        line: &ExtentLine,
    ) -> Result<Option<u64>> {
        let Some(name) = line.file.clone() else {
            return Ok(None);
        };
        let dir = folder_of(path);
        let ct = d.create_type();
        let device = ct.is_some_and(|c| c.is_device());
        let p = match resolve_name(&dir, &name, device, "extent", path, &mut Vec::new()) {
            Ok(p) => p,
            Err(e) => {
                self.r.add(path, 0, Severity::Corruption, e.to_string());
                return Ok(None);
            }
        };
        let what = format!("extent {}", k + 1);
        let ct = ct.unwrap_or(CreateType::Custom);
        if let Err(e) = confine(&p, &dir, ct, self.opts.allow_outside_paths, &what, path) {
            self.r.incomplete = Some(e.to_string());
            return Ok(None);
        }
        let Ok(meta) = std::fs::metadata(&p) else {
            let msg = format!("{what}: `{name}` is missing");
            self.r.add(path, 0, Severity::Corruption, msg);
            return Ok(None);
        };
        if let Err(e) = crate::io::refuse_special(&p) {
            if !meta.file_type().is_block_device() {
                self.r
                    .add(path, 0, Severity::Corruption, format!("{what}: {e}"));
                return Ok(None);
            }
        }
        self.locks.lock(&p, self.kind)?;
        match line.kind {
            ExtentType::Sparse => {
                check_sparse_file(&p, self.opts, &mut self.r)?;
                let header = Source::open(&p, SourceMode::Pread)
                    .ok()
                    .and_then(|src| sparse::read_header(&src).ok());
                if let Some(h) = header.filter(|h| h.capacity_sectors != line.sectors) {
                    let msg = format!(
                        "{what}: descriptor says {} sectors, `{name}` holds {}",
                        line.sectors, h.capacity_sectors
                    );
                    let idx = self.r.add(path, 0, Severity::Corruption, msg);
                    if self.opts.repair {
                        self.r.findings[idx].repaired = true;
                        return Ok(Some(h.capacity_sectors));
                    }
                }
            }
            ExtentType::VmfsSparse => check_cowd(&p, self.opts.repair, &mut self.r)?,
            ExtentType::Flat | ExtentType::Vmfs | ExtentType::VmfsRaw | ExtentType::VmfsRdm => {
                let need = (line.offset.unwrap_or(0) + line.sectors).saturating_mul(SECTOR);
                let have = if meta.is_file() { meta.len() } else { u64::MAX };
                if have < need {
                    let msg = format!("flat extent is {have} bytes, the descriptor needs {need}");
                    self.r.add(&p, have, Severity::Corruption, msg);
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// The parent `hint` names, when it resolves inside the folder and exists (else a
    /// finding).
    fn parent(&mut self, path: &Path, hint: Option<&str>) -> Option<PathBuf> {
        let h = hint?;
        let dir = folder_of(path);
        let resolved =
            resolve_name(&dir, h, false, "parent", path, &mut Vec::new()).and_then(|p| {
                confine(
                    &p,
                    &dir,
                    CreateType::Custom,
                    self.opts.allow_outside_paths,
                    "parent",
                    path,
                )
                .map(|()| p)
            });
        match resolved {
            Ok(p) if p.exists() => Some(p),
            Ok(p) => {
                let msg = format!("parent `{h}` is missing (looked for `{}`)", p.display());
                self.r.add(path, 0, Severity::Corruption, msg);
                None
            }
            Err(e) => {
                self.r.add(path, 0, Severity::Corruption, e.to_string());
                None
            }
        }
    }

    /// check agrees with the readers: a disk they refuse is never clean.
    fn agree_with_readers(&mut self, disk: &Path) {
        if self.r.incomplete.is_some() {
            return;
        }
        match crate::chain::Chain::open(disk, &open_options(self.opts)) {
            Ok(chain) => {
                for l in &chain.layers {
                    if let Some(msg) = crate::chain::missing_parent_hint(l) {
                        self.r.add(&l.path, 0, Severity::Corruption, msg);
                    }
                    self.stored_inside_files(l);
                }
            }
            Err(e) if e.kind() == crate::error::ErrorKind::Io => {
                self.r.incomplete = Some(e.to_string());
            }
            Err(e) => {
                let open = |f: &super::Finding| f.severity == Severity::Corruption && !f.repaired;
                if !self.r.findings.iter().any(open) {
                    let msg = format!("the disk cannot be opened: {e}");
                    self.r.add(disk, 0, Severity::Corruption, msg);
                }
            }
        }
    }
}

impl Walk<'_> {
    /// Extents this walk has no checker of its own for (SESparse): every grain the
    /// layer's map places must lie inside its file, or the readers fail on it.
    fn stored_inside_files(&mut self, l: &crate::layer::Layer) {
        use crate::disk::Alloc;
        use crate::format::Extent;
        if !l
            .extents
            .iter()
            .any(|e| matches!(e.extent, Extent::SeSparse(_)))
        {
            return;
        }
        let runs = match l.map(0..l.capacity) {
            Ok(r) => r,
            Err(e) => {
                self.r.add(
                    &l.path,
                    0,
                    Severity::Corruption,
                    format!("its grain maps cannot be read: {e}"),
                );
                return;
            }
        };
        let mut past: Vec<(usize, u64, u64)> = Vec::new();
        for r in &runs {
            let (extent, end) = match r.alloc {
                Alloc::Data { extent, offset } | Alloc::Hole { extent, offset } => {
                    (extent, offset.saturating_add(r.len))
                }
                Alloc::Compressed { extent, offset } => (extent, offset.saturating_add(12)),
                _ => continue,
            };
            let Some(slot) = l.extents.get(extent) else {
                continue;
            };
            if !matches!(slot.extent, Extent::SeSparse(_)) {
                continue;
            }
            let Some(len) = slot
                .path
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
            else {
                continue;
            };
            if end > len {
                match past.iter_mut().find(|(e, _, _)| *e == extent) {
                    Some(p) => p.2 += 1,
                    None => past.push((extent, r.start, 1)),
                }
            }
        }
        for (extent, first, n) in past {
            let file = l.extents[extent]
                .path
                .clone()
                .unwrap_or_else(|| l.path.clone());
            self.r.add(
                &file,
                0,
                Severity::Corruption,
                format!("{n} stored runs lie past the end of the file (the first at guest offset {first:#x}); readers fail on them"),
            );
        }
    }
}

/// Whether text that failed to parse was meant as a descriptor (a damaged one is
/// corruption; anything else is just not a VMDK).
fn looks_like_descriptor(text: &[u8]) -> bool {
    let t = String::from_utf8_lossy(&text[..text.len().min(64 << 10)]).to_ascii_lowercase();
    t.contains("descriptorfile")
        || t.contains("createtype")
        || t.lines().any(|l| {
            let w = l.split_whitespace().next().unwrap_or("");
            matches!(w, "rw" | "rdonly" | "noaccess")
        })
}

fn open_options(opts: &CheckOptions) -> OpenOptions {
    OpenOptions {
        ignore_cid: true,
        allow_outside_paths: opts.allow_outside_paths,
        ..Default::default()
    }
}
