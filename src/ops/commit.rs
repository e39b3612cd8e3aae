//! `commit`: merge the top delta of a chain (or every delta, `--all`) into its parent,
//! offline, crash-safe and re-runnable.
//!
//! # Why the order is safe
//! 1. A state file `<top>.vmdkit-commit` records the parent, its CID before the commit,
//!    the CID it will get, and the files to remove (written atomically, phase `copy`).
//! 2. Every range allocated in the delta(s) is written into the parent. Writing the same
//!    bytes again is harmless, so a killed copy is simply redone by the next run; the
//!    delta is untouched until step 5. The parent's writer syncs grain data before the
//!    tables that point at it (see [`crate::write`]).
//! 3. The parent is flushed, then gets its new CID (so stale children are detected).
//!    A rerun accepts the parent's CID being either the old or the new value, because
//!    the state file says so.
//! 4. The state file moves to phase `remove` (atomically) only after the parent is durable.
//! 5. The delta's files are removed, then the state file. A rerun in phase `remove` only
//!    finishes the removals: nothing is removed before the parent is complete.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{random_cid, CreateType, Descriptor};
use crate::format::Extent;
use crate::image::{resolve_name, OpenOptions};
use crate::io::SourceMode;
use crate::ops::Progress;
use crate::pipeline::{self, PipelineOptions, Unit};
use crate::write::{fault_point, set_cid, LayerWriter};

/// Options of a commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Merge every delta into the base.
    pub all: bool,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
    /// Commit although another delta in the folder names the parent.
    pub force: bool,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Allow committing into a device-backed parent (fullDevice, partitionedDevice,
    /// vmfsRaw).
    pub allow_device_write: bool,
}

/// What a commit did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitReport {
    /// The parent written into.
    pub target: PathBuf,
    /// Bytes of data copied.
    pub data_bytes: u64,
    /// Bytes written as zeros (zeroed grains of the delta).
    pub zero_bytes: u64,
    /// Runs copied.
    pub runs: u64,
    /// Files removed (or that would be).
    pub removed: Vec<PathBuf>,
    /// A previous, interrupted commit was finished.
    pub resumed: bool,
    /// Nothing was changed (dry run).
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    phase: String,
    target: PathBuf,
    target_old_cid: Option<u32>,
    target_new_cid: u32,
    remove: Vec<PathBuf>,
}

fn state_path(top: &Path) -> PathBuf {
    PathBuf::from(format!("{}.vmdkit-commit", top.display()))
}

fn write_state(path: &Path, st: &State) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let text = serde_json::to_vec_pretty(st).expect("serializable");
    fault_point();
    std::fs::write(&tmp, &text).map_err(|e| Error::io("write", &tmp, 0, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("flush", &tmp, 0, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, 0, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn remove_files(files: &[PathBuf]) -> Result<()> {
    for f in files {
        fault_point();
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", f, 0, e)),
        }
    }
    Ok(())
}

/// The parent a file names, if it is a delta (descriptor hint, or REDO naming).
fn names_parent(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
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
        let l = crate::image::Layer::open(
            path,
            &OpenOptions {
                ignore_cid: true,
                mode: SourceMode::Pread,
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

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Deltas in `disk`'s folder that name `disk` as their parent.
pub fn children_of(disk: &Path) -> Vec<PathBuf> {
    let dir = match disk.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| !same_file(p, disk))
        .filter(|p| names_parent(p).is_some_and(|parent| same_file(&parent, disk)))
        .collect()
}

/// Commit `top` into its parent (or, with `all`, every delta into the base).
pub fn commit(top: &Path, opts: &CommitOptions, progress: &dyn Progress) -> Result<CommitReport> {
    let sp = state_path(top);
    let state: Option<State> = match std::fs::read(&sp) {
        Ok(b) => Some(
            serde_json::from_slice(&b)
                .map_err(|e| Error::corrupt(&sp, 0, format!("unreadable commit state: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", &sp, 0, e)),
    };
    if let Some(st) = &state {
        if st.phase == "remove" {
            if opts.dry_run {
                return Ok(CommitReport {
                    target: st.target.clone(),
                    removed: st.remove.clone(),
                    resumed: true,
                    dry_run: true,
                    ..Default::default()
                });
            }
            remove_files(&st.remove)?;
            remove_files(std::slice::from_ref(&sp))?;
            return Ok(CommitReport {
                target: st.target.clone(),
                removed: st.remove.clone(),
                resumed: true,
                ..Default::default()
            });
        }
    }
    let mut chain = Chain::open(
        top,
        &OpenOptions {
            ignore_cid: true,
            mode: SourceMode::Pread,
        },
    )?;
    let n = chain.layers.len();
    if n < 2 {
        return Err(Error::InvalidInput(format!(
            "`{}` has no parent: nothing to commit into",
            top.display()
        )));
    }
    let target = if opts.all { n - 1 } else { 1 };
    let tl = &chain.layers[target];
    // Parents we cannot write into.
    if tl.create_type == CreateType::StreamOptimized
        || tl
            .extents
            .iter()
            .any(|e| matches!(&e.extent, Extent::Sparse(s) if s.header().compressed()))
    {
        return Err(Error::unsupported(&tl.path, "commit into a streamOptimized disk (its grains are compressed and append-only); export it to another format first"));
    }
    if tl
        .extents
        .iter()
        .any(|e| matches!(e.extent, Extent::SeSparse(_)))
    {
        return Err(Error::unsupported(
            &tl.path,
            "commit into an SESparse delta (SESparse is read-only here)",
        ));
    }
    if tl.create_type == CreateType::VmfsPassthroughRawDeviceMap {
        return Err(Error::unsupported(
            &tl.path,
            "commit into a physical-mode RDM",
        ));
    }
    for f in tl.files() {
        if std::fs::metadata(&f)
            .map(|m| m.permissions().readonly())
            .unwrap_or(false)
        {
            return Err(Error::InvalidInput(format!(
                "parent file `{}` is read-only: refusing to commit into it",
                f.display()
            )));
        }
    }
    // CID links of the merged part: each must match, except that a resumed commit may
    // already have given the target its new CID.
    for d in 0..target {
        let child = &chain.layers[d];
        let parent = &chain.layers[d + 1];
        if child.bare_cowd {
            continue;
        }
        let want = child.descriptor.parent_cid();
        let have = parent.cid();
        let resumed_ok = d + 1 == target
            && state
                .as_ref()
                .is_some_and(|s| have == Some(s.target_new_cid) || have == s.target_old_cid);
        if want != have && !resumed_ok {
            return Err(Error::chain(
                &child.path,
                format!(
                    "parentCID {} does not match the CID {} of parent `{}`: the parent changed after this delta was made; refusing to commit",
                    want.map_or("-".into(), |c| format!("{c:08x}")),
                    have.map_or("-".into(), |c| format!("{c:08x}")),
                    parent.path.display()
                ),
            ));
        }
    }
    // Siblings: another delta naming the target (or a layer we remove) would be corrupted.
    if state.is_none() && !opts.force {
        let members: Vec<&Path> = chain.layers.iter().map(|l| l.path.as_path()).collect();
        for l in chain.layers[1..=target].iter() {
            let dir = match l.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if members.iter().any(|m| same_file(m, &p)) {
                    continue;
                }
                if let Some(parent) = names_parent(&p) {
                    if same_file(&parent, &l.path) {
                        return Err(Error::chain(
                            &p,
                            format!(
                                "this delta also has `{}` as its parent; committing would corrupt it (use --force to commit anyway)",
                                l.path.display()
                            ),
                        ));
                    }
                }
            }
        }
    }

    // Plan: every range decided above the target.
    let cap = chain.capacity().min(chain.layers[target].capacity);
    let runs: Vec<_> = chain
        .map(0..cap)?
        .into_iter()
        .filter(|r| (r.depth as usize) < target)
        .collect();
    let mut units = Vec::new();
    let mut report = CommitReport {
        target: chain.layers[target].path.clone(),
        ..Default::default()
    };
    for r in &runs {
        report.runs += 1;
        let read = !r.alloc.reads_as_zero();
        if read {
            report.data_bytes += r.len;
        } else {
            report.zero_bytes += r.len;
        }
        let mut p = r.start;
        while p < r.end() {
            let len = (r.end() - p).min(pipeline::DEFAULT_UNIT - p % pipeline::DEFAULT_UNIT);
            units.push(Unit {
                start: p,
                len,
                read,
            });
            p += len;
        }
    }
    let mut remove = Vec::new();
    for l in &chain.layers[..target] {
        // The descriptor first, then extents: a half-removed delta is never openable.
        remove.push(l.path.clone());
        for f in l.files() {
            if f != l.path {
                remove.push(f);
            }
        }
    }
    report.removed = remove.clone();
    if opts.dry_run {
        report.dry_run = true;
        return Ok(report);
    }

    let st = State {
        version: 1,
        phase: "copy".into(),
        target: chain.layers[target].path.clone(),
        target_old_cid: state
            .as_ref()
            .map_or(chain.layers[target].cid(), |s| s.target_old_cid),
        target_new_cid: state.as_ref().map_or_else(random_cid, |s| s.target_new_cid),
        remove: remove.clone(),
    };
    report.resumed = state.is_some();
    progress.set_total(report.data_bytes + report.zero_bytes);
    write_state(&sp, &st)?;

    let mut writer = LayerWriter::open_with(&chain.layers[target], opts.allow_device_write)?;
    {
        let chain_ref = &chain;
        let below = move |buf: &mut [u8], off: u64| chain_ref.read_below(target + 1, buf, off);
        let popts = PipelineOptions {
            threads: opts.threads,
            ..Default::default()
        };
        let mut it = units.into_iter();
        pipeline::run(
            &mut it,
            popts,
            |u| {
                if !u.read {
                    return Ok(None);
                }
                let mut buf = vec![0u8; u.len as usize];
                chain_ref.read_at(&mut buf, u.start)?;
                Ok(Some(buf))
            },
            |u, data| {
                match data {
                    Some(b) => writer.write_at(&b, u.start, &below)?,
                    None => writer.write_zeroes(u.start, u.len, &below)?,
                }
                progress.inc(u.len);
                Ok(())
            },
        )?;
    }
    writer.flush()?;
    drop(writer);
    if chain.layers[target].cid() != Some(st.target_new_cid) {
        set_cid(&mut chain.layers[target], st.target_new_cid)?;
    }
    let st = State {
        phase: "remove".into(),
        ..st
    };
    write_state(&sp, &st)?;
    drop(chain);
    remove_files(&st.remove)?;
    remove_files(std::slice::from_ref(&sp))?;
    Ok(report)
}
