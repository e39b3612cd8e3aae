//! Walking a chain for `check`: each layer's descriptor, extents and files, the CID
//! links, and at the end the readers' own verdict.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::cowd::check_cowd;
use super::sparse::check_sparse_file;
use super::{CheckOptions, CheckReport, Severity};
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, ExtentType, NO_PARENT_CID};
use crate::format::sparse::{self, SECTOR};
use crate::io::{Source, SourceMode};
use crate::layer::{Layer, OpenOptions};
use crate::resolve::resolve_name;

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

/// Check `disk` and every parent below it, as `opts` says.
pub fn check_with(disk: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let repair = opts.repair;
    let mut r = CheckReport::default();
    let mut locks = crate::guard::LockSet::new();
    let kind = if repair {
        crate::guard::LockKind::Exclusive
    } else {
        crate::guard::LockKind::Shared
    };
    let mut next = Some(disk.to_path_buf());
    let mut seen = Vec::new();
    let mut child: Option<(PathBuf, Option<u32>)> = None;
    while let Some(path) = next.take() {
        if seen.contains(&path) || seen.len() > crate::chain::MAX_CHAIN_DEPTH {
            r.add(
                &path,
                0,
                Severity::Corruption,
                "parent loop or chain too deep",
            );
            break;
        }
        seen.push(path.clone());
        if let Err(e) = crate::io::refuse_special(&path) {
            r.incomplete = Some(e.to_string());
            break;
        }
        locks.lock(&path, kind)?;
        let mut head = [0u8; 4];
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                r.incomplete = Some(format!("cannot open `{}`: {e}", path.display()));
                break;
            }
        };
        let _ = f.read_exact_at(&mut head, 0);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or(PathBuf::from("."), Path::to_path_buf);
        let (cid, parent_cid, parent_hint) = if &head == b"COWD" {
            check_cowd(&path, repair, &mut r)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (None, None, name.strip_suffix(".REDO").map(str::to_string))
        } else if &head == b"KDMV" || &head == b"vmdk" {
            check_sparse_file(&path, opts, &mut r)?;
            match Layer::open(
                &path,
                &OpenOptions {
                    ignore_cid: true,
                    mode: SourceMode::Pread,
                    ..Default::default()
                },
            ) {
                Ok(l) => (
                    l.cid(),
                    l.descriptor.parent_cid(),
                    l.parent_hint().map(str::to_string),
                ),
                Err(_) => (None, None, None),
            }
        } else {
            let text = std::fs::read(&path).map_err(|e| Error::io("read", &path, 0, e))?;
            let mut d = match Descriptor::parse(
                &text[..text
                    .len()
                    .min(crate::format::descriptor::MAX_DESCRIPTOR_BYTES)],
                &path,
            ) {
                Ok(d) => d,
                Err(e) => {
                    r.add(&path, 0, Severity::Corruption, e.to_string());
                    break;
                }
            };
            let mut desc_dirty = false;
            for (k, line) in d
                .extents()
                .into_iter()
                .cloned()
                .enumerate()
                .collect::<Vec<_>>()
            {
                let Some(name) = line.file.clone() else {
                    continue;
                };
                let p = match resolve_name(
                    &dir,
                    &name,
                    d.create_type().is_some_and(|c| c.is_device()),
                    "extent",
                    &path,
                    &mut Vec::new(),
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        r.add(&path, 0, Severity::Corruption, e.to_string());
                        continue;
                    }
                };
                if let Err(e) = crate::resolve::confine(
                    &p,
                    &dir,
                    d.create_type()
                        .unwrap_or(crate::format::descriptor::CreateType::Custom),
                    &OpenOptions::default(),
                    &format!("extent {}", k + 1),
                    &path,
                ) {
                    r.incomplete = Some(e.to_string());
                    continue;
                }
                let Ok(meta) = std::fs::metadata(&p) else {
                    r.add(
                        &path,
                        0,
                        Severity::Corruption,
                        format!("extent {}: `{name}` is missing", k + 1),
                    );
                    continue;
                };
                if let Err(e) = crate::io::refuse_special(&p) {
                    if !meta.file_type().is_block_device() {
                        r.add(
                            &path,
                            0,
                            Severity::Corruption,
                            format!("extent {}: {e}", k + 1),
                        );
                        continue;
                    }
                }
                locks.lock(&p, kind)?;
                match line.kind {
                    ExtentType::Sparse => {
                        check_sparse_file(&p, opts, &mut r)?;
                        if let Ok(src) = Source::open(&p, SourceMode::Pread) {
                            if let Ok(h) = sparse::read_header(&src) {
                                if h.capacity != line.sectors {
                                    let idx = r.add(&path, 0, Severity::Corruption, format!("extent {}: descriptor says {} sectors, `{name}` holds {}", k + 1, line.sectors, h.capacity));
                                    if repair {
                                        d.extents_mut()[k].sectors = h.capacity;
                                        desc_dirty = true;
                                        r.findings[idx].repaired = true;
                                    }
                                }
                            }
                        }
                    }
                    ExtentType::VmfsSparse => check_cowd(&p, repair, &mut r)?,
                    ExtentType::Flat
                    | ExtentType::Vmfs
                    | ExtentType::VmfsRaw
                    | ExtentType::VmfsRdm => {
                        let need = (line.offset.unwrap_or(0) + line.sectors).saturating_mul(SECTOR);
                        let have = if meta.is_file() { meta.len() } else { u64::MAX };
                        if have < need {
                            r.add(
                                &p,
                                have,
                                Severity::Corruption,
                                format!("flat extent is {have} bytes, the descriptor needs {need}"),
                            );
                        }
                    }
                    _ => {}
                }
            }
            if desc_dirty {
                let mut l = Layer::open(
                    &path,
                    &OpenOptions {
                        ignore_cid: true,
                        mode: SourceMode::Pread,
                        ..Default::default()
                    },
                )
                .map_err(|e| Error::InvalidInput(format!("reopening after repair: {e}")))?;
                l.descriptor = d.clone();
                crate::write::write_descriptor(&l)?;
            }
            (
                d.cid(),
                d.parent_cid(),
                d.get("parentFileNameHint")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            )
        };
        if let Some((cpath, want)) = child.take() {
            if want.is_some() && want != cid && want != Some(NO_PARENT_CID) {
                r.add(
                    &cpath,
                    0,
                    Severity::Corruption,
                    format!(
                        "parentCID {:08x} does not match the CID {} of parent `{}`",
                        want.unwrap_or(0),
                        cid.map_or("-".into(), |c| format!("{c:08x}")),
                        path.display()
                    ),
                );
            }
        }
        if let Some(h) = parent_hint {
            let resolved = resolve_name(&dir, &h, false, "parent", &path, &mut Vec::new())
                .and_then(|p| {
                    crate::resolve::confine(
                        &p,
                        &dir,
                        crate::format::descriptor::CreateType::Custom,
                        &OpenOptions::default(),
                        "parent",
                        &path,
                    )
                    .map(|()| p)
                });
            match resolved {
                Ok(p) if p.exists() => {
                    child = Some((path.clone(), parent_cid.filter(|_| &head != b"COWD")));
                    next = Some(p);
                }
                Ok(p) => {
                    r.add(
                        &path,
                        0,
                        Severity::Corruption,
                        format!("parent `{h}` is missing (looked for `{}`)", p.display()),
                    );
                }
                Err(e) => {
                    r.add(&path, 0, Severity::Corruption, e.to_string());
                }
            }
        }
    }
    // check agrees with the readers: a disk they refuse is never clean.
    if r.incomplete.is_none() {
        let opened = crate::chain::Chain::open(
            disk,
            &OpenOptions {
                ignore_cid: true,
                ..Default::default()
            },
        );
        match opened {
            Ok(chain) => {
                for l in &chain.layers {
                    if let Some(msg) = crate::chain::missing_parent_hint(l) {
                        r.add(&l.path, 0, Severity::Corruption, msg);
                    }
                }
            }
            Err(e) if e.kind() == crate::error::ErrorKind::Io => {
                r.incomplete = Some(e.to_string());
            }
            Err(e) => {
                if !r
                    .findings
                    .iter()
                    .any(|f| f.severity == Severity::Corruption && !f.repaired)
                {
                    r.add(
                        disk,
                        0,
                        Severity::Corruption,
                        format!("the disk cannot be opened: {e}"),
                    );
                }
            }
        }
    }
    Ok(r)
}
