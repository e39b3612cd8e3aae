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
        let local = dir.join(base);
        notes.push(format!(
            "{what} `{name}` is an absolute path; using `{}` from the descriptor's folder",
            local.display()
        ));
        return Ok(local);
    }
    Ok(dir.join(p))
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
    let p = dir.join(map);
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
    let dir = folder_of(path);
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut head = vec![0u8; 4];
    use std::io::Read;
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let name = path.file_name()?.to_string_lossy().into_owned();
    if &head == b"COWD" {
        return name.strip_suffix(".REDO").map(|p| dir.join(p));
    }
    let text = if &head == b"KDMV" {
        let l = Layer::open(
            path,
            &OpenOptions {
                ignore_cid: true,
                ..Default::default()
            },
        )
        .ok()?;
        l.descriptor.to_text().into_bytes()
    } else if meta.len() <= 1 << 20 {
        std::fs::read(path).ok()?
    } else {
        return None;
    };
    let d = Descriptor::parse(&text, path).ok()?;
    let hint = d.get("parentFileNameHint")?;
    resolve_name(&dir, hint, false, "parent", path, &mut Vec::new()).ok()
}

/// Whether two paths are the same file (device and inode, through links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Deltas in `disk`'s folder that name `disk` as their parent.
pub fn children_of(disk: &Path) -> Vec<PathBuf> {
    let dir = folder_of(disk);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| !same_file(p, disk))
        .filter(|p| names_parent(p).is_some_and(|parent| same_file(&parent, disk)))
        .collect()
}
