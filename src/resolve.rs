//! How names in descriptors and on disk become paths: the descriptor's folder, the folder
//! rule (nothing outside it unless asked), and the naming conventions that link files
//! without a descriptor hint (`X.REDO` is a child of `X`; an RDM's mapping file belongs
//! to the descriptor that names it).

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::descriptor::{CreateType, Descriptor, ExtentType};
use crate::io::join_in;

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
    allow_outside_paths: bool,
    what: &str,
    descriptor: &Path,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if allow_outside_paths {
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
    Err(Error::Chain {
        path: descriptor.to_path_buf(),
        what: format!(
            "{what}: `{}` leads to `{}`, outside the descriptor's folder `{}`{}; refusing to follow it",
            p.display(),
            real.display(),
            real_dir.display(),
            if block { "" } else { " (only block devices of device and RDM descriptors may be)" }
        ),
        unless: Some(crate::error::Override::AllowOutsidePaths),
    })
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
