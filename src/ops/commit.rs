//! `commit`: merge the top delta of a chain (or every delta, `--all`) into its parent,
//! offline, crash-safe and re-runnable.
//!
//! # Why the order is safe
//! 0. The delta is locked (exclusive `flock`) before anything is read; then every merged
//!    layer and the target exclusively, the layers below shared (see [`crate::guard`]).
//! 1. A state file `<top>.vmdkit-commit` records the parent, its CID before the commit,
//!    the CID it will get, the delta's files with their identity (device, inode, size,
//!    mtime: a state file never acts on another delta that later took the same name),
//!    and the parent's extent lengths (written atomically, phase `copy`).
//! 2. Every range allocated in the delta(s) is written into the parent: into grains the
//!    parent already has, in place; new grains are appended. No table or directory of
//!    the parent is written in this phase. A killed copy is redone by the next run after
//!    cutting the parent's extents back to the recorded lengths (nothing references what
//!    was appended), so the rerun allocates the same places and nothing leaks.
//! 3. The data is synced; the table and directory writes that make it visible go to a
//!    journal `<top>.vmdkit-commit.journal` (checksummed, written atomically), and only
//!    then the state moves to phase `tables`. The journal is applied and synced. A
//!    rerun in phase `tables` replays the whole journal: the same bytes again.
//! 4. The parent gets its new CID (so stale children are detected); a rerun accepts the
//!    parent's CID being the old or the new value, because the state file says so.
//! 5. The state moves to phase `remove` only after the parent is durable; the delta's
//!    files are removed, then the journal and the state file. A rerun in phase `remove`
//!    only finishes the removals of files that are still the recorded ones.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::copy::{self as pipeline, PipelineOptions, Unit};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{random_cid, CreateType};
use crate::format::Extent;
use crate::guard::{LockKind, LockSet};
use crate::layer::{Layer, OpenOptions};
use crate::ops::Progress;
pub use crate::resolve::children_of;
use crate::resolve::same_file;
use crate::write::{
    apply_journal, cut_back_files, fault_point, read_journal, set_cid, write_atomically,
    write_journal, LayerWriter,
};

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

impl CommitReport {
    /// What a dry run would do: the target, data and zeros, the files to remove.
    pub fn write_plan(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        writeln!(out, "would write into: {}", self.target.display())?;
        writeln!(out, "data: {} bytes in {} runs", self.data_bytes, self.runs)?;
        writeln!(out, "zeros: {} bytes", self.zero_bytes)?;
        for f in &self.removed {
            writeln!(out, "would remove: {}", f.display())?;
        }
        Ok(())
    }

    /// One line saying what was done.
    pub fn summary(&self) -> String {
        format!(
            "committed into `{}`: {} bytes of data, {} bytes of zeros{}; removed {}",
            self.target.display(),
            self.data_bytes,
            self.zero_bytes,
            if self.resumed {
                " (finished an interrupted commit)"
            } else {
                ""
            },
            self.removed
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Where a commit stands (recorded in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Grain data is being written into the parent; its tables are untouched.
    Copy,
    /// The data is durable and the journal of table writes is complete: replay it.
    Tables,
    /// The parent is complete and durable; the delta's files are being removed.
    Remove,
}

/// A file of the delta, as it was when the commit began: a state file acts only on the
/// very files it was written for (a later `redo add` may reuse the names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Member {
    fn of(path: &Path) -> Result<Member> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|e| Error::io("stat", path, 0, e))?;
        Ok(Member {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }

    /// `Some(true)` when the file is there and unchanged, `Some(false)` when another file
    /// stands under the name, `None` when it is gone.
    fn matches(&self) -> Option<bool> {
        let now = Member::of(&self.path).ok()?;
        Some(now == *self)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    phase: Phase,
    target: PathBuf,
    target_old_cid: Option<u32>,
    target_new_cid: u32,
    /// The delta's files (descriptor first), to remove at the end.
    remove: Vec<Member>,
    /// The parent's extent files and their lengths before the copy: a rerun in phase
    /// `copy` cuts them back, so grains the interrupted run appended do not leak.
    target_lengths: Vec<(PathBuf, u64)>,
}

const STATE_VERSION: u32 = 2;

fn state_path(top: &Path) -> PathBuf {
    PathBuf::from(format!("{}.vmdkit-commit", top.display()))
}

fn journal_path(state: &Path) -> PathBuf {
    PathBuf::from(format!("{}.journal", state.display()))
}

fn write_state(path: &Path, st: &State) -> Result<()> {
    let text = serde_json::to_vec_pretty(st).expect("serializable");
    write_atomically(path, &text)
}

fn read_state(sp: &Path) -> Result<Option<State>> {
    let b = match std::fs::read(sp) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", sp, 0, e)),
    };
    let v: serde_json::Value = serde_json::from_slice(&b)
        .map_err(|e| Error::corrupt(sp, 0, format!("unreadable commit state: {e}")))?;
    if v.get("version").and_then(|v| v.as_u64()) != Some(u64::from(STATE_VERSION)) {
        return Err(Error::chain(
            sp,
            "commit state written by an older vmdkit, which did not record which delta it belongs to; \
             it cannot be resumed safely. Check the disk, then remove this file",
        ));
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| Error::corrupt(sp, 0, format!("unreadable commit state: {e}")))
}

/// A state file acts only on the delta it was written for: every recorded file still
/// there must be the same file (device, inode, size, mtime); in phases before `remove`
/// all must still be there.
fn verify_members(sp: &Path, st: &State) -> Result<()> {
    for m in &st.remove {
        match m.matches() {
            Some(true) => {}
            Some(false) => {
                return Err(Error::chain(
                    sp,
                    format!(
                        "this commit state belongs to an earlier delta, but `{}` is now a different file; \
                         refusing to act on it (if no vmdkit commit is running, remove the state file and commit again)",
                        m.path.display()
                    ),
                ))
            }
            None if st.phase != Phase::Remove => {
                return Err(Error::chain(
                    sp,
                    format!(
                        "an interrupted commit recorded `{}`, which is gone; it cannot be finished",
                        m.path.display()
                    ),
                ))
            }
            None => {}
        }
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

/// Remove the delta's files (those still there and still the recorded files), the
/// journal, then the state file.
fn finish_removal(sp: &Path, st: &State) -> Result<()> {
    let mine: Vec<PathBuf> = st
        .remove
        .iter()
        .filter(|m| m.matches() == Some(true))
        .map(|m| m.path.clone())
        .collect();
    remove_files(&mine)?;
    remove_files(&[journal_path(sp), sp.to_path_buf()])
}

/// Commit `top` into its parent (or, with `all`, every delta into the base).
pub fn commit(top: &Path, opts: &CommitOptions, progress: &dyn Progress) -> Result<CommitReport> {
    let sp = state_path(top);
    let mut locks = LockSet::new();
    // The delta first: a second commit or a write into it fails here, before anything
    // is read or decided.
    if top.exists() {
        locks.lock(top, LockKind::Exclusive)?;
    }
    let state = read_state(&sp)?;
    if let Some(done) = resume(&sp, state.as_ref(), opts, &mut locks)? {
        return Ok(done);
    }
    let mut chain = Chain::open(
        top,
        &OpenOptions {
            ignore_cid: true,
            ..Default::default()
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
    // Lock before deciding anything: the merged deltas and the target exclusively, the
    // layers below shared.
    chain.lock(&mut locks, target)?;
    crate::guard::test_hold_hook();
    refuse_target(&chain.layers[target])?;
    check_links(&chain, target, state.as_ref())?;
    if state.is_none() && !opts.force {
        check_siblings(&chain, target)?;
    }
    let (units, runs, mut report) = plan(&chain, target)?;
    let remove = files_to_remove(&chain, target);
    report.removed = remove.clone();
    if opts.dry_run {
        report.dry_run = true;
        report.resumed = state.is_some();
        return Ok(report);
    }

    let mut writer = LayerWriter::open_with(&chain.layers[target], opts.allow_device_write)?;
    for r in &runs {
        writer.check_writable(r.start, r.len)?;
    }
    let st = match state {
        Some(st) => st,
        None => State {
            version: STATE_VERSION,
            phase: Phase::Copy,
            target: chain.layers[target].path.clone(),
            target_old_cid: chain.layers[target].cid(),
            target_new_cid: random_cid(),
            remove: remove
                .iter()
                .map(|p| Member::of(p))
                .collect::<Result<Vec<_>>>()?,
            target_lengths: writer.extent_files(),
        },
    };
    report.resumed = st.phase != Phase::Copy || std::fs::metadata(&sp).is_ok();
    progress.set_total(report.data_bytes + report.zero_bytes);
    write_state(&sp, &st)?;
    copy_into(&chain, target, &mut writer, units, opts, progress)?;
    // Data is durable; record the table writes, then move to phase `tables`, then apply
    // them. A crash before the phase change redoes the copy (after cutting the appended
    // grains off); after it, the journal is replayed.
    let journal = writer.take_journal()?;
    drop(writer);
    write_journal(&journal_path(&sp), &journal)?;
    let st = State {
        phase: Phase::Tables,
        ..st
    };
    write_state(&sp, &st)?;
    apply_journal(&journal)?;
    finish_target(&sp, &st, &mut chain.layers[target])?;
    drop(chain);
    Ok(report)
}

/// An interrupted commit: finish it when it is past the copy (phases `tables` and
/// `remove`, returning its report), or prepare a redo of the copy (cut the parent back).
fn resume(
    sp: &Path,
    state: Option<&State>,
    opts: &CommitOptions,
    locks: &mut LockSet,
) -> Result<Option<CommitReport>> {
    let Some(st) = state else {
        return Ok(None);
    };
    verify_members(sp, st)?;
    let existing: Vec<PathBuf> = st
        .remove
        .iter()
        .filter(|m| m.path.exists())
        .map(|m| m.path.clone())
        .collect();
    locks.exclusive_all(&existing)?;
    let done = CommitReport {
        target: st.target.clone(),
        removed: st.remove.iter().map(|m| m.path.clone()).collect(),
        resumed: true,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    match st.phase {
        Phase::Copy if opts.dry_run => Ok(None),
        Phase::Copy => {
            cut_back(st, locks)?;
            Ok(None)
        }
        _ if opts.dry_run => Ok(Some(done)),
        Phase::Remove => {
            finish_removal(sp, st)?;
            Ok(Some(done))
        }
        Phase::Tables => {
            let targets: Vec<PathBuf> = std::iter::once(st.target.clone())
                .chain(st.target_lengths.iter().map(|(p, _)| p.clone()))
                .collect();
            locks.exclusive_all(&targets)?;
            apply_journal(&read_journal(&journal_path(sp))?)?;
            let mut layer = Layer::open(
                &st.target,
                &OpenOptions {
                    ignore_cid: true,
                    ..Default::default()
                },
            )?;
            finish_target(sp, st, &mut layer)?;
            Ok(Some(done))
        }
    }
}

/// Phase `copy` was interrupted: the parent's tables are untouched (they are only
/// written from the journal), so what the run appended is referenced by nothing. Cut
/// it off, and the rerun allocates the same places again.
fn cut_back(st: &State, locks: &mut LockSet) -> Result<()> {
    let targets: Vec<PathBuf> = st.target_lengths.iter().map(|(p, _)| p.clone()).collect();
    locks.exclusive_all(&targets)?;
    cut_back_files(&st.target_lengths)
}

/// Parents we cannot write into.
fn refuse_target(tl: &Layer) -> Result<()> {
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
    Ok(())
}

/// CID links of the merged part: each must match, except that a resumed commit may
/// already have given the target its new CID.
fn check_links(chain: &Chain, target: usize, state: Option<&State>) -> Result<()> {
    for d in 0..target {
        let child = &chain.layers[d];
        let parent = &chain.layers[d + 1];
        if child.bare_cowd {
            continue;
        }
        let want = child.descriptor.parent_cid();
        let have = parent.cid();
        let resumed_ok = d + 1 == target
            && state.is_some_and(|s| have == Some(s.target_new_cid) || have == s.target_old_cid);
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
    Ok(())
}

/// Siblings: another delta naming the target (or a layer we remove) would be corrupted.
fn check_siblings(chain: &Chain, target: usize) -> Result<()> {
    let members: Vec<&Path> = chain.layers.iter().map(|l| l.path.as_path()).collect();
    for l in chain.layers[1..=target].iter() {
        if let Some(p) = children_of(&l.path)
            .into_iter()
            .find(|p| !members.iter().any(|m| same_file(m, p)))
        {
            return Err(Error::chain(
                &p,
                format!(
                    "this delta also has `{}` as its parent; committing would corrupt it (use --force to commit anyway)",
                    l.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Plan: every range decided above the target, as engine units; the runs; the report.
fn plan(chain: &Chain, target: usize) -> Result<(Vec<Unit>, Vec<crate::disk::Run>, CommitReport)> {
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
    Ok((units, runs, report))
}

/// The merged deltas' files, each descriptor before its extents: a half-removed delta is
/// never openable.
fn files_to_remove(chain: &Chain, target: usize) -> Vec<PathBuf> {
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
    remove
}

/// Copy every planned unit into the target on the engine (reads in parallel, writes in
/// order); data grains synced before the caller journals the tables.
fn copy_into(
    chain: &Chain,
    target: usize,
    writer: &mut LayerWriter,
    units: Vec<Unit>,
    opts: &CommitOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let chain_ref = chain;
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
    Ok(())
}

/// The parent's data and tables are durable: give it its new CID, then remove the
/// delta.
fn finish_target(sp: &Path, st: &State, target: &mut Layer) -> Result<()> {
    if target.cid() != Some(st.target_new_cid) {
        set_cid(target, st.target_new_cid)?;
    }
    let st = State {
        phase: Phase::Remove,
        ..st.clone()
    };
    write_state(sp, &st)?;
    finish_removal(sp, &st)
}
