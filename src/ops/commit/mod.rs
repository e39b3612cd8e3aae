//! `commit`: merge the top delta of a chain (or every delta, `--all`) into its parent,
//! offline, crash-safe and re-runnable. A delta that has a child of its own (a middle
//! snapshot: `vm-000002` under the running `vm-000003`) is merged as VMware's snapshot
//! delete does it: into its parent, and the child is re-pointed at that parent.
//!
//! # Why the order is safe
//! 0. The delta is locked (exclusive `flock`) before anything is read; then every merged
//!    layer, the target and the children to re-point exclusively, the layers below shared
//!    (see `crate::guard`). Deltas that name a changed file as parent, or files that may
//!    be such deltas but cannot be read, refuse the commit (unless `--force`).
//! 1. A state file `<top>.vmdkit-commit` records a random token, the parent (canonical
//!    path), its CID before and after, the delta's files and the parent's extent files
//!    with their identity and lengths, and the children to re-point (phase `copy`). Then
//!    the parent's descriptor gets the pending mark with the same token (see
//!    `crate::recovery`: the state is untrusted input; the mark binds it to this disk).
//! 2. Every range allocated in the delta(s) is written into the parent: into grains the
//!    parent already has, in place (the child above still shadows them, so the chain
//!    reads the same); new grains are appended. No table or directory of the parent is
//!    written in this phase. A killed copy is redone by the next run after cutting the
//!    parent's extents back to the recorded lengths (nothing references what was
//!    appended), so the rerun allocates the same places and nothing leaks.
//! 3. The data is synced; the table and directory writes that make it visible go to a
//!    journal `<top>.vmdkit-commit.journal` (checksummed, carrying the token, written
//!    atomically), and only then the state moves to phase `tables`. The journal is
//!    applied and synced. A rerun in phase `tables` replays the whole journal: the same
//!    bytes again, into files it admits only when they are the parent's own.
//! 4. The parent gets its new CID and loses the mark in one descriptor write (so stale
//!    children are detected). Each child gets the parent's name and new CID as its
//!    parentFileNameHint and parentCID (descriptor replaced atomically; its data is not
//!    touched, and the parent now holds the merged delta's content beneath it, so the
//!    child reads exactly as before).
//! 5. The state moves to phase `remove` only then. The delta's descriptor is moved aside
//!    (`.NAME.vmdkit-removing`, folder fsynced): from then on the parent is the top, and
//!    it already reads the same. The merged layers' extents are removed, deepest layer
//!    first, each layer's extents before its descriptor, then the journal and the state
//!    file, each removal durable before the next. A rerun in phase `remove` re-resolves
//!    what is left from the descriptor (under either name) and removes only files that
//!    are both resolved and recorded; when it finds the delta still intact under its
//!    name, it first proves the parent alone reads what the chain reads over the
//!    delta's ranges (a planted state claiming a merge that never happened is refused).
//!
//! Until the delta is moved aside a reader still opens it: its parentCID is the
//! parent's old CID, and the parent already has the new one. Readers accept exactly that
//! mismatch when the commit state beside the delta says so (past the copy phase, this
//! parent, these two CIDs): the delta shadows only ranges the parent now holds too, so
//! the chain reads as before (`recovery::commit_explains`).

mod remove;
use remove::*;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::copy::{self as pipeline, PipelineOptions, Planner};
use crate::disk::VirtualDisk;
use crate::error::{Error, Result};
use crate::format::descriptor::{random_cid, CreateType};
use crate::format::Extent;
use crate::guard::{LockKind, LockSet};
use crate::io::same_file;
use crate::layer::{Layer, OpenOptions};
use crate::ops::Progress;
use crate::recovery::{self, journal_path, FileRecord, Resolved};
use crate::write::{apply_journal, cut_back_files, write_journal, LayerWriter};

/// Options of a commit.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    /// Merge every delta into the base.
    pub all: bool,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
    /// Commit although another delta in the folder names the parent (or a file that may
    /// be one cannot be read).
    pub force: bool,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Allow committing into a device-backed parent (fullDevice, partitionedDevice,
    /// vmfsRaw).
    pub allow_device_write: bool,
    /// Follow extent and parent names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`](crate::OpenOptions::allow_outside_paths)).
    pub allow_outside_paths: bool,
}

/// What a commit did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct CommitReport {
    /// The parent written into (`file` in JSON, as every command names the disk it
    /// changed).
    #[serde(rename = "file")]
    pub target: PathBuf,
    /// Bytes of data copied.
    pub data_bytes: u64,
    /// Bytes written as zeros (zeroed grains of the delta).
    pub zero_bytes: u64,
    /// Runs copied.
    pub runs: u64,
    /// Files removed (or that would be).
    pub removed: Vec<PathBuf>,
    /// Deltas re-pointed at the target (the merged delta was their parent).
    pub repointed: Vec<PathBuf>,
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
        for f in &self.repointed {
            writeln!(out, "would re-point at the target: {}", f.display())?;
        }
        Ok(())
    }

    /// One line saying what was done.
    pub fn summary(&self) -> String {
        format!(
            "committed into `{}`: {} bytes of data, {} bytes of zeros{}; removed {}{}",
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
                .join(", "),
            self.repointed
                .iter()
                .map(|p| format!("; re-pointed `{}` at it", p.display()))
                .collect::<String>()
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    phase: Phase,
    /// Binds the state to the target: the same token is in its pending mark.
    token: String,
    /// The delta the user named (canonical).
    top: PathBuf,
    /// The parent written into (canonical).
    target: PathBuf,
    target_old_cid: Option<u32>,
    target_new_cid: u32,
    /// The merged deltas' files (each descriptor first), removed at the end.
    delta: Vec<FileRecord>,
    /// The parent's extent files before the copy: a rerun in phase `copy` cuts them back
    /// to these lengths, so grains the interrupted run appended do not leak.
    extents: Vec<FileRecord>,
    /// Deltas above the top to re-point at the target (canonical).
    children: Vec<FileRecord>,
}

#[cfg(any(test, feature = "fuzzing"))]
/// Parse a commit state file's bytes (the fuzz target's body).
pub(crate) fn parse_state(path: &Path, b: &[u8]) -> Result<()> {
    recovery::decode::<State>(path, b).map(|_| ())
}

fn state_path(top: &Path) -> PathBuf {
    PathBuf::from(format!("{}.vmdkit-commit", top.display()))
}

/// The state's recorded delta files must be exactly the files the command resolves from
/// the delta now, each unchanged; otherwise the state is another delta's (or planted).
fn verify_delta(sp: &Path, st: &State, resolved: &[PathBuf]) -> Result<()> {
    let mut now = Resolved::default();
    for f in resolved {
        now.add(f)?;
    }
    for m in &st.delta {
        now.admit(sp, &m.path)?;
        if !m.unchanged() {
            return Err(Error::chain(
                sp,
                format!(
                    "this commit state belongs to an earlier delta: `{}` is now a different file (or was changed); \
                     refusing to act on it (if no vmdkit commit is running, move the state file away and commit again)",
                    m.path.display()
                ),
            ));
        }
    }
    if st.delta.len() != resolved.len() {
        return Err(Error::chain(
            sp,
            "this commit state records other files than the delta has now; refusing to act on it",
        ));
    }
    Ok(())
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
    let mut state: Option<State> = recovery::read(&sp)?;
    if let Some(st) = &state {
        if st.phase == Phase::Remove {
            let report = CommitReport {
                target: st.target.clone(),
                removed: st.delta.iter().map(|m| m.path.clone()).collect(),
                repointed: st.children.iter().map(|m| m.path.clone()).collect(),
                resumed: true,
                dry_run: opts.dry_run,
                ..Default::default()
            };
            if st.top != recovery::canonical(top).unwrap_or_default() && top.exists() {
                return Err(Error::chain(
                    &sp,
                    "this commit state was written for another delta; it is not acted on",
                ));
            }
            if !opts.dry_run {
                let existing: Vec<PathBuf> = remaining_layers(top, &st.target)?
                    .into_iter()
                    .flatten()
                    .collect();
                locks.exclusive_all(&existing)?;
                if top.exists() {
                    prove_merged(top, &sp, st, opts.allow_outside_paths)?;
                }
                finish_removal(top, &sp, st)?;
            }
            return Ok(report);
        }
    }
    let mut chain = Chain::open(top, &OpenOptions::for_recovery(opts.allow_outside_paths))?;
    let n = chain.layers.len();
    if n < 2 {
        return Err(Error::not_applicable(
            top,
            "has no parent: nothing to commit into",
        ));
    }
    let target = if opts.all { n - 1 } else { 1 };
    // Lock before deciding anything: the merged deltas and the target exclusively, the
    // layers below shared.
    chain.lock(&mut locks, target)?;
    crate::hooks::test_hold_hook();
    if let Some(st) = &state {
        if !resume_check(&sp, st, &chain, target)? {
            // Void: nothing of the interrupted run reached the parent. Start afresh.
            recovery::remove_state_files(&[journal_path(&sp), sp.clone()])?;
            state = None;
        }
    }
    refuse_target(&chain.layers[target])?;
    if state.is_none() {
        // A layer in the middle of another operation (an interrupted apply or commit).
        if let Some(l) = chain.layers[..=target]
            .iter()
            .find(|l| recovery::pending_of(l).is_some())
        {
            let m = recovery::pending_message(l).unwrap_or_default();
            return Err(Error::chain(&l.path, m));
        }
    }
    check_links(&chain, target, state.as_ref())?;
    let children = match &state {
        Some(st) => st.children.iter().map(|c| c.path.clone()).collect(),
        None => check_dependents(&chain, target, opts.force)?,
    };
    locks.exclusive_all(&children)?;
    let (runs, mut report) = plan(&chain, target)?;
    let remove = files_to_remove(&chain, target);
    report.removed = remove.clone();
    report.repointed = children.clone();
    if opts.dry_run {
        report.dry_run = true;
        report.resumed = state.is_some();
        return Ok(report);
    }

    // The read-write disk model over the parent; commit drives its writer (the journal)
    // itself.
    let open_target = |chain: &Chain| {
        crate::rw::WritableDisk::open_with(
            &chain.layers[target].path,
            &OpenOptions::for_recovery(opts.allow_outside_paths),
            opts.allow_device_write,
        )
    };
    let mut rw = open_target(&chain)?;
    for r in &runs {
        rw.check_writable(r.start, r.len)?;
    }
    report.resumed = state.is_some();
    let st = match state {
        Some(st) => {
            // Phase `tables`: the journal finishes it.
            if st.phase == Phase::Tables {
                drop(rw);
                let journal =
                    recovery::admitted_journal(&sp, &st.token, &chain.layers[target], "commit")?;
                apply_journal(&journal)?;
                finish_target(top, &sp, &st, &mut chain.layers[target])?;
                return Ok(report);
            }
            let lengths: Vec<(PathBuf, u64)> =
                st.extents.iter().map(|f| (f.path.clone(), f.len)).collect();
            cut_back_files(&lengths)?;
            rw = open_target(&chain)?;
            st
        }
        None => {
            let st = State {
                phase: Phase::Copy,
                token: recovery::new_token(),
                top: recovery::canonical(top)?,
                target: recovery::canonical(&chain.layers[target].path)?,
                target_old_cid: chain.layers[target].cid(),
                target_new_cid: random_cid(),
                delta: remove
                    .iter()
                    .map(|p| FileRecord::of(p))
                    .collect::<Result<Vec<_>>>()?,
                extents: rw
                    .writer_mut()
                    .extent_files()
                    .iter()
                    .map(|(p, _)| FileRecord::of(p))
                    .collect::<Result<Vec<_>>>()?,
                children: children
                    .iter()
                    .map(|p| FileRecord::of(p))
                    .collect::<Result<Vec<_>>>()?,
            };
            recovery::write(&sp, &st)?;
            recovery::mark(&mut chain.layers[target], "commit", &st.token)?;
            st
        }
    };
    progress.set_total(report.data_bytes + report.zero_bytes);
    copy_into(&chain, target, rw.writer_mut(), opts, progress)?;
    // Data is durable; record the table writes, then move to phase `tables`, then apply
    // them. A crash before the phase change redoes the copy (after cutting the appended
    // grains off); after it, the journal is replayed.
    let journal = rw.writer_mut().take_journal()?;
    drop(rw);
    write_journal(&journal_path(&sp), &st.token, &journal)?;
    let st = State {
        phase: Phase::Tables,
        ..st
    };
    recovery::write(&sp, &st)?;
    apply_journal(&journal)?;
    finish_target(top, &sp, &st, &mut chain.layers[target])?;
    drop(chain);
    Ok(report)
}

/// A state found beside the delta (phases `copy` and `tables`): act on it only when it is
/// this delta's and this parent's, bound by the token. `Ok(false)`: the state is void
/// (phase `copy`, and the parent carries no mark and has its recorded extent files at
/// their recorded lengths: nothing of the interrupted run is in it).
fn resume_check(sp: &Path, st: &State, chain: &Chain, target: usize) -> Result<bool> {
    let tl = &chain.layers[target];
    let resolved = files_to_remove(chain, target);
    verify_delta(sp, st, &resolved)?;
    let tfiles = Resolved::of_layers([tl])?;
    let tpath = tfiles.admit(sp, &st.target)?;
    if !same_file(&tpath, &tl.path) {
        return Err(Error::chain(
            sp,
            format!(
                "this commit state was written for a commit into `{}`, not into `{}`; it is not acted on",
                st.target.display(),
                tl.path.display()
            ),
        ));
    }
    for f in &st.extents {
        tfiles.admit(sp, &f.path)?;
    }
    let marked = recovery::carries(tl, "commit", &st.token);
    let finished_target = st.phase == Phase::Tables
        && recovery::pending_of(tl).is_none()
        && tl.cid() == Some(st.target_new_cid);
    if marked || finished_target {
        for f in &st.extents {
            let now = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
            if !f.same_inode() || now < f.len {
                return Err(replaced(sp, tl));
            }
        }
        return Ok(true);
    }
    if st.phase == Phase::Copy
        && st
            .extents
            .iter()
            .all(|f| f.same_inode() && std::fs::metadata(&f.path).is_ok_and(|m| m.len() == f.len))
    {
        return Ok(false);
    }
    Err(replaced(sp, tl))
}

fn replaced(sp: &Path, tl: &Layer) -> Error {
    Error::chain(
        sp,
        format!(
            "`{}` is not the disk this interrupted commit was writing into (it does not carry the commit's mark: \
             restored from a copy, or replaced). Nothing was done. If the parent was restored on purpose and holds \
             the content the delta was made on, move this state file and its journal away and commit again",
            tl.path.display()
        ),
    )
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
            return Err(Error::refused(
                &f,
                format!(
                    "parent file `{}` is read-only: refusing to commit into it",
                    f.display()
                ),
                None,
            ));
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

/// What depends on the files the commit changes or removes. A delta naming the target
/// or a merged middle layer (another branch) would be corrupted: refused unless `force`.
/// Children of the top are re-pointed at the target (returned). A file that may be a
/// delta but cannot be read is unknown: refused, naming it, unless `force`.
fn check_dependents(chain: &Chain, target: usize, force: bool) -> Result<Vec<PathBuf>> {
    let is_member = |p: &Path| chain.layers.iter().any(|l| same_file(&l.path, p));
    let mut repoint = Vec::new();
    for (i, l) in chain.layers[..=target].iter().enumerate() {
        let (children, unknown) = crate::dependents::dependents_of(&l.path);
        for c in children.into_iter().filter(|p| !is_member(p)) {
            if i == 0 {
                repoint.push(c);
            } else if !force {
                return Err(Error::refused(
                    &c,
                    format!(
                        "this delta also has `{}` as its parent; committing would corrupt it",
                        l.path.display()
                    ),
                    Some(crate::error::Override::Force),
                ));
            }
        }
        if let Some((p, why)) = unknown.into_iter().find(|(p, _)| !is_member(p)) {
            if !force {
                return Err(Error::refused(
                    &p,
                    format!(
                        "{why}; it may be a delta of `{}`, which this commit changes. Refusing while that is unknown \
                         (fix or move the file)",
                        l.path.display()
                    ),
                    Some(crate::error::Override::Force),
                ));
            }
        }
    }
    let top = chain.top();
    let tl = &chain.layers[target];
    for c in &repoint {
        let child = Layer::open(
            c,
            // Children are re-pointed only in the parent's own folder.
            &OpenOptions::for_recovery(false),
        )?;
        if child.bare_cowd {
            return Err(Error::chain(
                c,
                format!(
                    "this REDO log names `{}` as its parent by its file name (ESX 2 naming) and cannot be re-pointed; \
                     commit it first (`vmdkit commit {}`), then `{}`",
                    top.path.display(),
                    c.display(),
                    top.path.display()
                ),
            ));
        }
        if !top.bare_cowd && child.parent_cid() != top.cid() {
            return Err(Error::refused(
                c,
                format!(
                    "this delta names `{}` as its parent but its parentCID does not match that disk's CID: \
                     it is already stale; refusing to commit under it (move it away first)",
                    top.path.display()
                ),
                Some(crate::error::Override::Force),
            ));
        }
        if !same_folder(c, &tl.path) {
            return Err(Error::chain(
                c,
                format!(
                    "this delta of `{}` would have to name `{}`, which is in another folder; refusing",
                    top.path.display(),
                    tl.path.display()
                ),
            ));
        }
    }
    Ok(repoint)
}

fn same_folder(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(crate::io::folder_of(p)).ok();
    canon(a).is_some() && canon(a) == canon(b)
}

/// Point `child` (a delta of the merged top) at the target: its parentFileNameHint and
/// parentCID, in one atomic descriptor write. Idempotent: a child already pointing at
/// the target with its new CID is left alone. A recorded child that names neither is
/// refused.
fn repoint(sp: &Path, st: &State, c: &FileRecord, tl: &Layer) -> Result<()> {
    let named = crate::dependents::names_parent(&c.path);
    let to_top = named
        .as_deref()
        .is_some_and(|p| std::fs::canonicalize(p).is_ok_and(|p| p == st.top));
    let mut child = Layer::open(&c.path, &OpenOptions::for_recovery(false))?;
    let to_target = named.as_deref().is_some_and(|p| same_file(p, &tl.path));
    if to_target && child.parent_cid() == Some(st.target_new_cid) {
        return Ok(());
    }
    if !to_top && !to_target {
        return Err(Error::chain(
            sp,
            format!(
                "the commit recorded `{}` as a child to re-point, but it names neither the merged delta nor its parent; it is not touched",
                c.path.display()
            ),
        ));
    }
    let name = crate::io::file_name_of(&tl.path);
    child.descriptor.set("parentFileNameHint", &name, true);
    child
        .descriptor
        .set("parentCID", &format!("{:08x}", st.target_new_cid), false);
    crate::write::write_descriptor(&child)
}

/// What the layers above the target decide (the runs the copy pass's planner,
/// [`Planner::decided_above`], will cut into units), and the report's counts of them.
fn plan(chain: &Chain, target: usize) -> Result<(Vec<crate::disk::Run>, CommitReport)> {
    let cap = chain.capacity().min(chain.layers[target].capacity);
    let runs: Vec<_> = chain
        .map_above(target, 0..cap)?
        .into_iter()
        .filter(|r| (r.depth as usize) < target)
        .collect();
    let mut report = CommitReport {
        target: chain.layers[target].path.clone(),
        ..Default::default()
    };
    for r in &runs {
        report.runs += 1;
        if r.alloc.reads_as_zero() {
            report.zero_bytes += r.len;
        } else {
            report.data_bytes += r.len;
        }
    }
    Ok((runs, report))
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
    opts: &CommitOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let chain_ref = chain;
    let below = move |buf: &mut [u8], off: u64| chain_ref.read_below(target + 1, buf, off);
    let popts = PipelineOptions {
        threads: opts.threads,
        ..Default::default()
    };
    let cap = chain.capacity().min(chain.layers[target].capacity);
    let mut planner = Planner::decided_above(chain, target as u32, cap, pipeline::DEFAULT_UNIT);
    pipeline::run(
        &mut planner,
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

/// The parent's data and tables are durable: give it its new CID and drop its mark (one
/// descriptor write), re-point the children, then remove the delta.
fn finish_target(top: &Path, sp: &Path, st: &State, target: &mut Layer) -> Result<()> {
    let done = recovery::pending_of(target).is_none() && target.cid() == Some(st.target_new_cid);
    if !done && !target.bare_cowd {
        recovery::settle(target, st.target_new_cid)?;
    }
    for c in &st.children {
        repoint(sp, st, c, target)?;
    }
    let st = State {
        phase: Phase::Remove,
        ..st.clone()
    };
    recovery::write(sp, &st)?;
    finish_removal(top, sp, &st)
}
