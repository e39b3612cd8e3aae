//! The last phase of a commit: removing the merged deltas, resumable from any point (the
//! state names them; what is left of them is proved merged before anything goes).

use super::*;

/// The delta's files as they can still be resolved from its descriptor at `top`, for the
/// removals of phase `remove` (extents may already be gone): the descriptor itself and
/// the extents it names in its folder. A file that is not a text descriptor is all of
/// its delta.
pub(super) fn remaining_delta_files(top: &Path) -> Result<Vec<PathBuf>> {
    let meta = match std::fs::symlink_metadata(top) {
        Ok(m) => m,
        Err(_) => return Ok(vec![]),
    };
    let mut files = vec![top.to_path_buf()];
    if !meta.is_file() || meta.len() > crate::format::descriptor::MAX_DESCRIPTOR_BYTES as u64 {
        return Ok(files);
    }
    let b = std::fs::read(top).map_err(|e| Error::io("read", top, 0, e))?;
    if b.starts_with(b"KDMV") || b.starts_with(b"COWD") {
        return Ok(files);
    }
    let Ok(d) = crate::format::descriptor::Descriptor::parse(&b, top) else {
        return Ok(files);
    };
    let dir = crate::io::folder_of(top);
    for e in d.extents() {
        let Some(name) = &e.file else { continue };
        let p = crate::resolve::resolve_name(&dir, name, false, "extent", top, &mut vec![])?;
        if p.exists() && !files.iter().any(|f| same_file(f, &p)) {
            files.push(p);
        }
    }
    Ok(files)
}

/// A state in phase `remove` found beside an intact delta: before anything of the delta
/// is removed, prove that the parent alone holds the delta's content (every range the
/// merged layers hold reads the same through the chain and from the parent down). A
/// state that cannot show this (planted, or for another parent) is refused, not acted on.
pub(super) fn prove_merged(top: &Path, sp: &Path, st: &State, outside: bool) -> Result<()> {
    use crate::disk::VirtualDisk;
    let chain = Chain::open(top, &OpenOptions::for_recovery(outside))?;
    let target = chain
        .layers
        .iter()
        .position(|l| recovery::canonical(&l.path).is_ok_and(|p| p == st.target))
        .filter(|&t| t > 0)
        .ok_or_else(|| {
            Error::chain(
                sp,
                "this commit state names a parent that is not below the delta; it is not acted on",
            )
        })?;
    let cap = chain.capacity().min(chain.layers[target].capacity);
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for r in chain
        .map(0..cap)?
        .into_iter()
        .filter(|r| (r.depth as usize) < target)
    {
        let mut off = r.start;
        while off < r.end() {
            let n = (r.end() - off).min(a.len() as u64) as usize;
            chain.read_at(&mut a[..n], off)?;
            chain.read_below(target, &mut b[..n], off)?;
            if a[..n] != b[..n] {
                return Err(Error::chain(
                    sp,
                    format!(
                        "this commit state says the delta was merged, but `{}` does not hold the delta's content at guest offset {off:#x}; \
                         nothing was removed (if no vmdkit commit is running, move the state file away and commit again)",
                        chain.layers[target].path.display()
                    ),
                ));
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Where the delta's descriptor is moved when its removal begins: a hidden name beside
/// it, so the delta is no longer a disk anyone opens, while a rerun can still resolve
/// its extents (and the layers below it, with `--all`) from it.
pub(super) fn removing_path(top: &Path) -> PathBuf {
    crate::io::join_in(
        &crate::io::folder_of(top),
        format!(".{}.vmdkit-removing", crate::io::file_name_of(top)),
    )
}

/// The parent a merged layer names: by its descriptor, or, for an ESX 2 REDO log (whose
/// link is its name), by the name it had (`original`).
pub(super) fn parent_of(file: &Path, original: &Path) -> Option<PathBuf> {
    let mut magic = [0u8; 4];
    let cowd = std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"COWD";
    if cowd {
        let name = crate::io::file_name_of(original);
        return name
            .strip_suffix(".REDO")
            .map(|p| crate::io::join_in(&crate::io::folder_of(original), p));
    }
    crate::dependents::names_parent(file)
}

/// The merged deltas that can still be resolved, walking from the delta's descriptor
/// (under its name `top` or its removal name) down the parents named, until the target:
/// each layer's files (descriptor first).
pub(super) fn remaining_layers(top: &Path, target: &Path) -> Result<Vec<Vec<PathBuf>>> {
    let mut layers = Vec::new();
    let hidden = removing_path(top);
    let (mut cur, mut original) = if hidden.exists() {
        (hidden, top.to_path_buf())
    } else {
        (top.to_path_buf(), top.to_path_buf())
    };
    while cur.exists() && !same_file(&cur, target) && layers.len() < crate::chain::MAX_CHAIN_DEPTH {
        layers.push(remaining_delta_files(&cur)?);
        match parent_of(&cur, &original) {
            Some(p) => {
                original = p.clone();
                cur = p;
            }
            None => break,
        }
    }
    Ok(layers)
}

/// Remove the delta's files that are still there and still the recorded ones: first
/// the delta's descriptor moves to its removal name (the delta is no longer a disk:
/// the parent, which holds everything, is the top now), then the deepest merged layer's
/// files go first, each layer's extents before its descriptor (so a rerun can still
/// resolve what is left), then the journal and the state file; every step durable.
pub(super) fn finish_removal(top: &Path, sp: &Path, st: &State) -> Result<()> {
    let recorded = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            st.delta
                .iter()
                .any(|r| r.dev == m.dev() && r.ino == m.ino())
        })
    };
    let hidden = removing_path(top);
    if top.exists() {
        if !recorded(top) {
            return Err(Error::chain(
                sp,
                format!(
                    "this commit state belongs to an earlier delta: `{}` is now a different file; \
                     it is left in place and nothing was done (if no vmdkit commit is running, move the state file away)",
                    top.display()
                ),
            ));
        }
        crate::hooks::fault_point();
        std::fs::rename(top, &hidden).map_err(|e| Error::io("move aside", top, 0, e))?;
        crate::io::sync_folder(&crate::io::folder_of(top))?;
    }
    let layers = remaining_layers(top, &st.target)?;
    for m in &st.delta {
        if m.path.exists() && !m.unchanged() {
            return Err(Error::chain(
                sp,
                format!(
                    "this commit state belongs to an earlier delta: `{}` is now a different file (or was changed); \
                     it is left in place and nothing was done (if no vmdkit commit is running, move the state file away)",
                    m.path.display()
                ),
            ));
        }
    }
    for files in layers.iter().rev() {
        let (desc, extents) = files.split_first().expect("a layer has its descriptor");
        let extents: Vec<PathBuf> = extents.iter().filter(|p| recorded(p)).cloned().collect();
        crate::output::remove_durably(&extents)?;
        if recorded(desc) {
            crate::output::remove_durably(std::slice::from_ref(desc))?;
        }
    }
    recovery::remove_state_files(&[journal_path(sp), sp.to_path_buf()])
}
