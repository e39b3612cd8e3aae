//! How names in descriptors and on disk become paths: the descriptor's folder, the folder
//! rule (nothing outside it unless asked), and the naming conventions that link files
//! without a descriptor hint (`X.REDO` is a child of `X`; an RDM's mapping file belongs
//! to the descriptor that names it); finding the deltas that name a disk as parent.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, Descriptor, ExtentType};
use crate::layer::{Layer, OpenOptions};

/// The folder a path lives in (`.` for a bare name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `name` in the folder `dir`, without the `./` that joining onto the current folder
/// (what [`folder_of`] gives for a bare name) would add: paths shown to people and
/// written in reports read as they were typed.
pub fn join_in(dir: &Path, name: impl AsRef<Path>) -> PathBuf {
    if dir == Path::new(".") && name.as_ref().is_relative() {
        name.as_ref().to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The last component of a path, as text (empty when there is none).
pub fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Resolve a file name from a descriptor against `dir`.
///
/// `..` components are refused. An absolute path is used as is only for device-backed
/// createTypes; otherwise (ESXi's `/vmfs/volumes/...` hints) the same base name in `dir`
/// is used, and a note says so.
pub fn resolve_name(
    dir: &Path,
    name: &str,
    allow_absolute: bool,
    what: &str,
    descriptor: &Path,
    notes: &mut Vec<String>,
) -> Result<PathBuf> {
    let p = Path::new(name);
    if name.is_empty() {
        return Err(Error::chain(
            descriptor,
            format!("{what} has an empty file name"),
        ));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::chain(
            descriptor,
            format!(
                "{what} `{name}` has a `..` component; refusing to leave the descriptor's folder"
            ),
        ));
    }
    if p.is_absolute() {
        if allow_absolute {
            return Ok(p.to_path_buf());
        }
        let Some(base) = p.file_name() else {
            return Err(Error::chain(
                descriptor,
                format!("{what} `{name}` names no file"),
            ));
        };
        let local = join_in(dir, base);
        notes.push(format!(
            "{what} `{name}` is an absolute path; using `{}` from the descriptor's folder",
            local.display()
        ));
        return Ok(local);
    }
    Ok(join_in(dir, p))
}

/// The folder rule: after following links, an extent must lie inside the descriptor's
/// folder, unless it is a block device named by a device or RDM createType, or the caller
/// allowed outside paths. A missing file passes here (opening it reports it).
pub fn confine(
    p: &Path,
    dir: &Path,
    ct: CreateType,
    opts: &OpenOptions,
    what: &str,
    descriptor: &Path,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if opts.allow_outside_paths {
        return Ok(());
    }
    let Ok(real) = fs::canonicalize(p) else {
        return Ok(());
    };
    let real_dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if real.starts_with(&real_dir) {
        return Ok(());
    }
    let block = fs::metadata(&real).is_ok_and(|m| m.file_type().is_block_device());
    let device_type = ct.is_device()
        || matches!(
            ct,
            CreateType::VmfsRawDeviceMap | CreateType::VmfsPassthroughRawDeviceMap
        );
    if block && device_type {
        return Ok(());
    }
    Err(Error::chain(
        descriptor,
        format!(
            "{what}: `{}` leads to `{}`, outside the descriptor's folder `{}`{}; refusing to follow it \
             (pass --allow-outside-paths if the disk's files are kept elsewhere)",
            p.display(),
            real.display(),
            real_dir.display(),
            if block { "" } else { " (only block devices of device and RDM descriptors may be)" }
        ),
    ))
}

/// The RDM descriptor in `dir` whose VMFSRDM extent is the mapping file `map`, when
/// `map` is a link (to a device) rather than a VMDK of its own.
pub fn rdm_owner(dir: &Path, map: &str) -> Option<String> {
    let p = join_in(dir, map);
    if !fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
        return None;
    }
    let mut head = [0u8; 4];
    if let Ok(mut f) = fs::File::open(&p) {
        use std::io::Read;
        let _ = f.read_exact(&mut head);
        if &head == b"KDMV" || &head == b"COWD" {
            return None;
        }
    }
    for e in fs::read_dir(dir).ok()?.flatten() {
        let q = e.path();
        if fs::symlink_metadata(&q)
            .map(|m| !m.is_file() || m.len() > 65536)
            .unwrap_or(true)
        {
            continue;
        }
        let Ok(text) = fs::read(&q) else { continue };
        let Ok(d) = Descriptor::parse(&text, &q) else {
            continue;
        };
        if d.extents()
            .iter()
            .any(|x| x.kind == ExtentType::VmfsRdm && x.file.as_deref() == Some(map))
        {
            return q.file_name().map(|n| n.to_string_lossy().into_owned());
        }
    }
    None
}

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

/// Whether two paths are the same file (device and inode, through links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
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
