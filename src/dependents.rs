//! Finding the deltas that name a disk as their parent (in its folder), so that a
//! command changing the disk refuses to break them, or re-points them.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::descriptor::Descriptor;
use crate::io::{file_name_of, folder_of, join_in, same_file};
use crate::layer::{Layer, OpenOptions};
use crate::resolve::resolve_name;

/// The parent a file names, if it is a delta (descriptor hint, or REDO naming).
pub fn names_parent(path: &Path) -> Option<PathBuf> {
    names_parent_checked(path).ok().flatten()
}

/// Like [`names_parent`], but a file that may be a delta and cannot be read or parsed is
/// an error (its reason), not "no parent": the caller cannot know what it depends on.
pub fn names_parent_checked(path: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let dir = folder_of(path);
    let meta = fs::metadata(path).map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut head = vec![0u8; 4];
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    if meta.len() < 4 {
        return Ok(None);
    }
    f.read_exact(&mut head)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let name = file_name_of(path);
    if &head == b"COWD" {
        return Ok(name.strip_suffix(".REDO").map(|p| join_in(&dir, p)));
    }
    let text = if &head == b"KDMV" {
        let l = Layer::open(
            path,
            &OpenOptions {
                ignore_cid: true,
                ..Default::default()
            },
        )
        .map_err(|e| format!("cannot open it: {e}"))?;
        // An increment names the disk it applies to, but is not a delta of it.
        if l.is_increment() {
            return Ok(None);
        }
        l.descriptor.to_text().into_bytes()
    } else if meta.len() <= 1 << 20 {
        fs::read(path).map_err(|e| format!("cannot read it: {e}"))?
    } else {
        return Ok(None);
    };
    let looks_like_descriptor = text
        .windows(14)
        .take(4096)
        .any(|w| w.eq_ignore_ascii_case(b"DescriptorFile"))
        || text.windows(10).take(4096).any(|w| w == b"createType");
    let d = match Descriptor::parse(&text, path) {
        Ok(d) => d,
        Err(e) if looks_like_descriptor => {
            return Err(format!("its descriptor does not parse: {e}"))
        }
        Err(_) => return Ok(None),
    };
    let Some(hint) = d.get("parentFileNameHint") else {
        return Ok(None);
    };
    resolve_name(&dir, hint, false, "parent", path, &mut Vec::new())
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Deltas in `disk`'s folder that name `disk` as their parent, and the files that may be
/// deltas but could not be read (each with the reason): what depends on them is unknown.
/// Only files named like disks (`*.vmdk`, `*.REDO`) can be unknown.
pub fn dependents_of(disk: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let dir = folder_of(disk);
    let Ok(rd) = fs::read_dir(&dir) else {
        return (vec![], vec![]);
    };
    let mut children = Vec::new();
    let mut unknown = Vec::new();
    // Named as the user named the disk: bare names beside a bare name.
    let bare = disk.parent().is_none_or(|p| p.as_os_str().is_empty());
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| {
            if bare {
                PathBuf::from(e.file_name())
            } else {
                e.path()
            }
        })
        .collect();
    paths.sort();
    for p in paths {
        // vmdkit's own temporaries are outputs not yet in place, never deltas.
        if same_file(&p, disk) || crate::guard::temporary_pid(&file_name_of(&p)).is_some() {
            continue;
        }
        match names_parent_checked(&p) {
            Ok(Some(parent)) if same_file(&parent, disk) => children.push(p),
            Ok(_) => {}
            Err(why) => {
                let n = file_name_of(&p).to_ascii_lowercase();
                if (n.ends_with(".vmdk") || n.ends_with(".redo")) && !n.starts_with('.') {
                    unknown.push((p, why));
                }
            }
        }
    }
    (children, unknown)
}

/// Refuse to change `disk` when deltas name it as their parent or when a file that may
/// be one cannot be read (unknown counts as a child), unless `force`. `doing` says what
/// would break them ("writing into it").
pub fn refuse_dependents(disk: &Path, force: bool, doing: &str) -> Result<()> {
    if force {
        return Ok(());
    }
    let (children, unknown) = dependents_of(disk);
    if let Some(c) = children.first() {
        return Err(Error::refused(
            c,
            format!(
                "this delta has `{}` as its parent; {doing} would break it",
                disk.display()
            ),
            Some(crate::error::Override::Force),
        ));
    }
    if let Some((p, why)) = unknown.first() {
        return Err(Error::refused(
            p,
            format!(
                "{why}; it may be a delta of `{}`, which {doing} would break. Refusing while that is unknown (fix or move the file)",
                disk.display()
            ),
            Some(crate::error::Override::Force),
        ));
    }
    Ok(())
}
