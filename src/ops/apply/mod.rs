//! `apply`: write an increment (`export --delta`) into a restored disk, so a restore is
//! `import` of the full backup followed by `apply` of each increment in order.
//!
//! The increment is read strictly sequentially (a pipe is fine): header and descriptor
//! first, so the checks below happen before any byte of the target changes.
//!
//! # Checks (nothing is written when one fails)
//! - The increment's parentCID must equal the target's CID: the target holds exactly the
//!   content the increment was made against (the restore of the previous backup). The
//!   target already carrying the increment's CID means it was applied: refused. `--force`
//!   skips the check (raw targets, which have no CID, need it).
//! - Capacities equal (a raw target may be larger), every extent writable and not
//!   read-only on the host, no other delta names the target as its parent and no file
//!   that may be one is unreadable, no other operation is pending on the target.
//! - **The whole increment is read and inflated before the first write**: a truncated
//!   tail (bytes lost on tape), a bad deflate stream, a short grain, a grain both zeroed
//!   and stored are found while the target is untouched, byte for byte. A file is read
//!   twice; a pipe is first spooled into an unnamed temporary in the target's folder
//!   (`O_TMPFILE`: it has no name, so nothing is left behind even by a power cut).
//!
//! # Why an interrupted apply is finished by a rerun (VMDK targets)
//! It is commit's order ([`crate::ops::commit`]), with the state treated as untrusted
//! input (`crate::recovery`): a state file `<target>.vmdkit-apply` records a random
//! token, the increment (its parentCID and CID), the target's extent files (canonical
//! paths, identity, lengths) (phase `copy`); then the target's descriptor gets the
//! pending mark with that token, so every command that writes refuses the disk until the
//! apply is finished.
//!
//! # Why the target reads as before or after at every power cut (hosted sparse)
//! In phase `copy` no byte the target's tables reference is written
//! (`LayerWriter::shadow`). The pass that validates the increment also plans the writes
//! with a dry writer: where each extent's new grains (and new tables) will end. New
//! grains are appended below that end; a grain the target already has is written whole
//! (its old bytes under the new) into scratch space from that end on, and its entry is
//! changed in memory only. Zeroed grains are entry changes too. Then, in order, each
//! step durable before the next:
//! 1. the grain data is synced; the table and directory writes go to a checksummed
//!    journal carrying the token (written atomically); the state moves to `tables`
//!    with the moves (grain, old place, scratch place) and the planned ends;
//! 2. the journal is applied (primary tables, sync, redundant copies and directories,
//!    sync): the tables now point at the new grains and the scratch copies;
//! 3. the state moves to `compact`, the journal is removed;
//! 4. each moved grain is copied back to its old place (which no table references now),
//!    synced, the entries pointed back, synced, and each extent cut at its planned end
//!    (which drops the scratch space) (`LayerWriter::compact`);
//! 5. the increment's CID and the mark's removal, in one descriptor write; the state is
//!    removed.
//!
//! A reader (`read_through`, for every command that only reads) of a disk carrying the
//! mark of this state's token: with the journal present (complete: it is renamed into
//! place whole) it lays the journal over the tables and reads the new point without
//! writing; without it, in phase `copy` the tables are the old ones (old point), in phase
//! `compact` they point at the new data in one place or the other (new point); phase
//! `tables` without its journal is refused. Steps 2 and 4 are idempotent, so a power cut
//! during them leaves, for the rerun, the same work to do: phase `tables` replays the
//! journal, phase `compact` the copies (an extent already cut had its copies and entries
//! made durable before the cut: only its entries are set again). The moves come from the
//! state, so a rerun checks them against the disk first (`LayerWriter::check_moves`).
//! A rerun in phase `copy` removes a journal left there first (readers would lay it over
//! what is cut), then cuts the extents back and writes again: the same bytes land in the
//! same places. The file ends byte for byte as an in-place apply leaves it; the price is
//! that rewritten grains are written twice.
//!
//! A state whose token the target does not carry (the disk was restored from a copy),
//! or that names files that are not the target's, is refused.
//!
//! Flat and vmfs targets have no tables to switch: their grains are written in place in
//! phase `copy`, and between the first write and the last the target is refused as
//! pending by readers as well.
//!
//! What an interruption leaves: after the input was validated, only a crash, a signal or
//! an I/O error (a full disk) can stop the writes; the target is then marked, the error
//! (or, for a signal, the message on the way out) says the apply is incomplete and to
//! run the same apply again.
//!
//! Raw targets (files, devices) have no tables and no descriptor to mark: the whole
//! increment is validated first as well, then written in place; a rerun of the same
//! increment (with `--force`) finishes an interrupted one, since the writes are
//! idempotent.

mod raw;
use raw::apply_raw;

use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID};
use crate::format::sparse::{SparseHeader, SECTOR};
use crate::format::stream::pipe::{self as stream_in, Counted};
use crate::guard::{LockKind, LockSet};
use crate::layer::OpenOptions;
use crate::ops::Progress;
use crate::recovery::{self, journal_path, FileRecord, Resolved};
use crate::write::{apply_journal, cut_back_files, write_journal, LayerWriter, Move};

/// Options of an apply.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ApplyOptions {
    /// Skip the parentCID check (needed for raw targets, which have no CID), and apply
    /// although other deltas name the target as their parent.
    pub force: bool,
    /// The target is a raw file or block device, not a VMDK.
    pub raw: bool,
    /// Allow writing into block devices and device-backed disks.
    pub allow_device_write: bool,
    /// Follow extent names that lead out of the target's folder
    /// ([`OpenOptions::allow_outside_paths`](crate::OpenOptions::allow_outside_paths)).
    pub allow_outside_paths: bool,
    /// Worker threads inflating the increment's grains (0 = all cores).
    pub threads: usize,
}

/// What an apply did.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct ApplyReport {
    /// The disk written.
    #[serde(rename = "file")]
    pub target: PathBuf,
    /// The content ID the target had (the increment's parentCID).
    pub from_cid: String,
    /// The content ID it has now (the increment's CID).
    pub to_cid: String,
    /// Bytes of data grains written.
    pub data_bytes: u64,
    /// Bytes of zeroed grains written.
    pub zero_bytes: u64,
    /// An interrupted apply of this increment was finished.
    pub resumed: bool,
}

impl ApplyReport {
    /// One line saying what was done.
    pub fn summary(&self) -> String {
        format!(
            "applied to `{}`: {} bytes of data, {} bytes of zeros; content ID {} -> {}{}",
            self.target.display(),
            self.data_bytes,
            self.zero_bytes,
            self.from_cid,
            self.to_cid,
            if self.resumed {
                " (finished an interrupted apply)"
            } else {
                ""
            }
        )
    }
}

/// The increment's header and links, read from the start of the input.
struct Increment {
    header: SparseHeader,
    parent_cid: u32,
    cid: u32,
    capacity: u64,
}

fn read_increment(c: &mut Counted<'_>, name: &Path) -> Result<Increment> {
    let mut first = [0u8; 512];
    c.exact(&mut first)?;
    let header = stream_in::parse_first(&first, name)?;
    if !header.compressed() || !header.markers() {
        return Err(Error::not_applicable(
            name,
            "is not an increment: increments are streamOptimized files written by an incremental export",
        ));
    }
    if header.descriptor_offset != 1 || header.descriptor_size == 0 {
        return Err(Error::corrupt(
            name,
            0,
            "the stream has no descriptor after its header: an increment records its parentCID there",
        ));
    }
    let n = header
        .descriptor_size
        .saturating_mul(SECTOR)
        .min(MAX_DESCRIPTOR_BYTES as u64) as usize;
    let mut text = vec![0u8; n];
    c.exact(&mut text)?;
    let d = Descriptor::parse(&text, name)?;
    let parent_cid = d
        .parent_cid()
        .filter(|&p| p != NO_PARENT_CID)
        .ok_or_else(|| {
            Error::not_applicable(
                name,
                "is a full backup, not an increment (it has no parentCID): restore it with an import",
            )
        })?;
    let cid = d
        .cid()
        .ok_or_else(|| Error::corrupt(name, 512, "the increment's descriptor has no CID"))?;
    Ok(Increment {
        capacity: header.capacity_sectors * SECTOR,
        header,
        parent_cid,
        cid,
    })
}

/// Where an apply stands (recorded in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Grains are being written; the target's tables are untouched.
    Copy,
    /// The data is durable and the journal of table writes complete: replay it.
    Tables,
    /// The journal is applied (the disk reads the new point): grains the apply moved
    /// are being copied back to their places ([`LayerWriter::compact`]).
    Compact,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    phase: Phase,
    /// Binds the state to the target: the same token is in its pending mark.
    token: String,
    /// The target (canonical).
    target: PathBuf,
    parent_cid: u32,
    cid: u32,
    /// The target's extent files before the apply (a rerun cuts them back to these
    /// lengths).
    files: Vec<FileRecord>,
    /// Grains moved to scratch space (phases `tables` and `compact`).
    #[serde(default)]
    moves: Vec<Move>,
    /// Where each extent's new grains end, in sectors (where it is cut at the end).
    #[serde(default)]
    ends: Vec<u64>,
}

#[cfg(any(test, feature = "fuzzing"))]
/// Parse an apply state file's bytes (the fuzz target's body).
pub(crate) fn parse_state(path: &Path, b: &[u8]) -> Result<()> {
    recovery::decode::<State>(path, b).map(|_| ())
}

#[cfg(any(test, feature = "fuzzing"))]
/// Read an increment from bytes as `apply` validates it before the first write: header,
/// descriptor and links, then every grain and zeroed range (the fuzz target's body;
/// `budget` caps the bytes it lets through).
pub(crate) fn validate_bytes(data: &[u8], budget: u64) -> Result<()> {
    let name = Path::new("<increment>");
    let mut input: &[u8] = data;
    let inc = read_increment(&mut Counted::new(&mut input, name), name)?;
    let mut input: &[u8] = data;
    let mut c = Counted::new(&mut input, name);
    let mut first = [0u8; 512];
    c.exact(&mut first)?;
    let mut seen = 0u64;
    let mut count = |n: u64| -> Result<()> {
        seen = seen.saturating_add(n);
        if seen > budget {
            return Err(Error::InvalidInput("fuzz cap".into()));
        }
        Ok(())
    };
    let count = std::cell::RefCell::new(&mut count);
    stream_in::read_stream_zeroed(
        &mut c,
        &inc.header,
        0,
        &mut |_, b| (count.borrow_mut())(b.len() as u64),
        Some(&mut |_, len| (count.borrow_mut())(len / 4096)),
    )
    .map(|_| ())
}

fn state_path(target: &Path) -> PathBuf {
    PathBuf::from(format!("{}.vmdkit-apply", target.display()))
}

fn cid_text(c: u32) -> String {
    format!("{c:08x}")
}

/// Apply the increment read from `input` (named `name` in messages) to `target`. The
/// input is spooled into an unnamed temporary in the target's folder and validated
/// whole before the target is touched; [`apply_file`] reads a file in place instead.
pub fn apply(
    target: &Path,
    input: &mut dyn Read,
    name: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    let dir = if opts.raw && is_block_device(target) {
        std::env::temp_dir()
    } else {
        crate::io::folder_of(target)
    };
    let mut spool =
        tempfile::tempfile_in(&dir).map_err(|e| Error::io("create a temporary in", &dir, 0, e))?;
    std::io::copy(input, &mut spool).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            Error::io(
                "spool the increment into (the disk is full; nothing was written)",
                &dir,
                0,
                e,
            )
        } else {
            Error::io("read", name, 0, e)
        }
    })?;
    apply_file_handle(target, spool, name, opts, progress)
}

/// Apply the increment in the file `inc` to `target` (validated whole before the target
/// is touched).
pub fn apply_file(
    target: &Path,
    inc: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    crate::io::refuse_special(inc)?;
    let f = std::fs::File::open(inc).map_err(|e| Error::io("open", inc, 0, e))?;
    apply_file_handle(target, f, inc, opts, progress)
}

fn is_block_device(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// The increment from its first byte (a positional reader over the file).
fn from_start(f: &std::fs::File) -> impl Read + '_ {
    struct At<'a>(&'a std::fs::File, u64);
    impl Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read_at(buf, self.1)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    std::io::BufReader::with_capacity(1 << 20, At(f, 0))
}

fn apply_file_handle(
    target: &Path,
    f: std::fs::File,
    name: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    let inc = read_increment(&mut Counted::new(&mut from_start(&f), name), name)?;
    let mut report = ApplyReport {
        target: target.to_path_buf(),
        from_cid: cid_text(inc.parent_cid),
        to_cid: cid_text(inc.cid),
        ..Default::default()
    };
    let job = Job {
        target,
        inc: &inc,
        name,
        opts,
        progress,
        input: &f,
    };
    if opts.raw {
        apply_raw(job, &mut report)?;
    } else {
        apply_vmdk(job, &mut report)?;
    }
    Ok(report)
}

/// Read the whole increment, inflating every grain, writing nothing: damage is found
/// while the target is untouched. Given a target that can be written copy-on-write
/// (hosted sparse), the same pass plans the writes with a dry writer and returns where
/// each extent's new grains will end ([`LayerWriter::shadow`]).
fn validate(job: Job<'_>, target: Option<&crate::layer::Layer>) -> Result<Option<Vec<u64>>> {
    let quiet = Job {
        progress: &crate::copy::NoProgress,
        ..job
    };
    let mut scratch = ApplyReport::default();
    let mut planner = match target {
        Some(t) => {
            let mut w = LayerWriter::open_with(t, job.opts.allow_device_write)?;
            w.shadow(true, None)?;
            Some(w)
        }
        None => None,
    };
    let no_read = |buf: &mut [u8], _: u64| {
        buf.fill(0);
        Ok(())
    };
    let planned: std::cell::RefCell<Result<()>> = std::cell::RefCell::new(Ok(()));
    let planner = std::cell::RefCell::new(planner.as_mut());
    let step = |f: &mut dyn FnMut(&mut LayerWriter) -> Result<()>| {
        if let Some(w) = planner.borrow_mut().as_mut() {
            if planned.borrow().is_ok() {
                let r = f(w);
                *planned.borrow_mut() = r;
            }
        }
        Ok(())
    };
    read_grains(
        quiet,
        &mut scratch,
        &mut |off, b| step(&mut |w| w.write_at(b, off, &no_read)),
        &mut |off, len| step(&mut |w| w.write_zeroes(off, len, &no_read)),
    )
    .map_err(|e| damaged(job.name, e))?;
    planned.into_inner()?;
    Ok(planner.into_inner().map(|w| w.plan()))
}

fn damaged(name: &Path, e: Error) -> Error {
    Error::chain(
        name,
        format!("the increment is damaged or incomplete ({e}); nothing was written: apply a good copy of it"),
    )
}

/// An error after the target was marked: say that the apply is incomplete and how to
/// finish it.
fn incomplete(target: &Path, name: &Path, e: Error) -> Error {
    Error::chain(
        target,
        format!(
            "the apply is incomplete ({e}). The disk is marked: until the same apply is run again, commands that \
             write refuse it and commands that read read it as one point (before or after the apply) where they can: \
             `vmdkit apply {} {}` (with a good copy of the same increment)",
            target.display(),
            name.display()
        ),
    )
}

/// What an apply works with, besides the input and the report.
#[derive(Clone, Copy)]
struct Job<'a> {
    target: &'a Path,
    inc: &'a Increment,
    name: &'a Path,
    opts: &'a ApplyOptions,
    progress: &'a dyn Progress,
    /// The increment (a file or the spool), read from its start by each pass.
    input: &'a std::fs::File,
}

/// Read the increment's grains: data through `data`, zeroed ranges through `zero`;
/// counts both into `report` and `progress`.
fn read_grains(
    job: Job<'_>,
    report: &mut ApplyReport,
    data: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    zero: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let Job {
        inc,
        name,
        progress,
        input,
        ..
    } = job;
    let mut stream = from_start(input);
    let mut c = Counted::new(&mut stream, name);
    let mut first = [0u8; 512];
    c.exact(&mut first)?;
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    // The grains inflate on the engine's pool (`threads`) while this thread reads on and
    // writes in order.
    let pool = crate::copy::pool(job.opts.threads)?;
    stream_in::read_stream_on(
        Some(&pool),
        &mut c,
        &inc.header,
        0,
        &mut |off, b| {
            data(off, b)?;
            data_bytes += b.len() as u64;
            progress.inc(b.len() as u64);
            Ok(())
        },
        Some(&mut |off, len| {
            zero(off, len)?;
            zero_bytes += len;
            progress.inc(len);
            Ok(())
        }),
    )?;
    report.data_bytes = data_bytes;
    report.zero_bytes = zero_bytes;
    Ok(())
}

fn apply_vmdk(job: Job<'_>, report: &mut ApplyReport) -> Result<()> {
    let Job {
        target,
        inc,
        name,
        opts,
        ..
    } = job;
    let mut locks = LockSet::new();
    locks.lock(target, LockKind::Exclusive)?;
    let mut chain = Chain::open(target, &OpenOptions::for_recovery(opts.allow_outside_paths))?;
    chain.lock(&mut locks, 0)?;
    crate::hooks::test_hold_hook();
    let sp = state_path(&chain.top().path);
    let mut state: Option<State> = recovery::read(&sp)?;
    if let Some(st) = &state {
        if !resume_check(&sp, st, &chain, inc)? {
            // Void: nothing of the interrupted run reached the disk. Start afresh.
            recovery::remove_state_files(&[journal_path(&sp), sp.clone()])?;
            state = None;
        }
    }
    if state.is_none() {
        if let Some(l) = chain
            .layers
            .iter()
            .find(|l| recovery::pending_of(l).is_some())
        {
            return Err(Error::chain(
                &l.path,
                recovery::pending_message(l).unwrap_or_default()
                    + if l.path == chain.top().path && !sp.exists() {
                        " (its state file is missing: the operation cannot be finished; restore the disk from its backup)"
                    } else {
                        ""
                    },
            ));
        }
    }
    if let Some(st) = &state {
        report.resumed = true;
        if st.phase != Phase::Copy {
            let finished =
                recovery::pending_of(chain.top()).is_none() && chain.top().cid() == Some(inc.cid);
            if finished {
                // Crashed between the last descriptor write and removing the state.
                return recovery::remove_state_files(&[journal_path(&sp), sp.clone()])
                    .map_err(|e| incomplete(target, name, e));
            }
            let done = (|| {
                if st.phase == Phase::Tables {
                    let journal = recovery::admitted_journal(&sp, &st.token, chain.top(), "apply")?;
                    apply_journal(&journal)?;
                }
                switched(&mut chain, &sp, st.clone(), inc.cid, opts, true)
            })();
            return done.map_err(|e| incomplete(target, name, e));
        }
    }
    let top = chain.top();
    if top.capacity != inc.capacity {
        return Err(Error::InvalidInput(format!(
            "`{}` holds {} bytes but the increment `{}` is for a disk of {}; nothing was written",
            top.path.display(),
            top.capacity,
            name.display(),
            inc.capacity
        )));
    }
    if state.is_none() {
        check_links(top, inc, name, opts)?;
    }
    recovery::refuse_read_only_files(top, opts.force)?;
    let writer = LayerWriter::open_with(top, opts.allow_device_write)?;
    writer.check_writable(0, inc.capacity)?;
    let shadows = writer.can_shadow();
    drop(writer);
    // Every grain of the increment, before the first write (and the plan of the writes).
    let plan = validate(job, shadows.then_some(top))?;
    let st = match state {
        Some(st) => {
            // A journal of the interrupted run (complete, but the state never reached
            // phase `tables`) goes first: readers would lay it over what is cut now.
            let lengths: Vec<(PathBuf, u64)> =
                st.files.iter().map(|f| (f.path.clone(), f.len)).collect();
            recovery::remove_state_files(&[journal_path(&sp)])
                .and_then(|()| cut_back_files(&lengths))
                .map_err(|e| incomplete(target, name, e))?;
            st
        }
        None => {
            let w = LayerWriter::open_with(top, opts.allow_device_write)?;
            let st = State {
                phase: Phase::Copy,
                token: recovery::new_token(),
                target: recovery::canonical(&top.path)?,
                parent_cid: inc.parent_cid,
                cid: inc.cid,
                files: w
                    .extent_files()
                    .iter()
                    .map(|(p, _)| FileRecord::of(p))
                    .collect::<Result<Vec<_>>>()?,
                moves: Vec::new(),
                ends: Vec::new(),
            };
            drop(w);
            recovery::write(&sp, &st)?;
            let marked = recovery::mark(&mut chain.layers[0], "apply", &st.token);
            if let Err(e) = marked {
                // Nothing was written into the disk: the state is void.
                let _ = recovery::remove_state_files(std::slice::from_ref(&sp));
                return Err(e);
            }
            st
        }
    };
    crate::guard::set_interrupt_note(Some(format!(
        "the apply into `{}` is incomplete; the disk is marked (commands that write refuse it) until the same apply is run again: `vmdkit apply {} {}`",
        target.display(),
        target.display(),
        name.display()
    )));
    let r = write_grains(job, &mut chain, &sp, st, plan.as_deref(), report);
    crate::guard::set_interrupt_note(None);
    r.map_err(|e| incomplete(target, name, e))
}

/// Phase `copy` onwards: the grains, the journal, the tables, the CID.
fn write_grains(
    job: Job<'_>,
    chain: &mut Chain,
    sp: &Path,
    st: State,
    plan: Option<&[u64]>,
    report: &mut ApplyReport,
) -> Result<()> {
    // The read-write disk model over the target; apply drives its writer (copy-on-write
    // into scratch space, the journal) itself.
    let mut rw = crate::rw::WritableDisk::open_with(
        &chain.top().path,
        &OpenOptions::for_recovery(job.opts.allow_outside_paths),
        job.opts.allow_device_write,
    )?;
    let (moves, journal) = {
        let (writer, below) = rw.parts();
        if let Some(plan) = plan {
            writer.shadow(false, Some(plan))?;
        }
        {
            let w = std::cell::RefCell::new(&mut *writer);
            read_grains(
                job,
                report,
                &mut |off, b| w.borrow_mut().write_at(b, off, &below),
                &mut |off, len| w.borrow_mut().write_zeroes(off, len, &below),
            )?;
        }
        (writer.take_moves(), writer.take_journal()?)
    };
    drop(rw);
    write_journal(&journal_path(sp), &st.token, &journal)?;
    let st = State {
        phase: Phase::Tables,
        moves,
        ends: plan.map(<[u64]>::to_vec).unwrap_or_default(),
        ..st
    };
    recovery::write(sp, &st)?;
    apply_journal(&journal)?;
    switched(chain, sp, st, job.inc.cid, job.opts, false)
}

/// The journal is applied: the moved grains go back to their places (phase
/// `compact`; the journal goes first, so no reader lays it over the copies), then the
/// CID and the mark, and the state goes. `resumed`: the moves come from a state file
/// and are checked against the disk first.
fn switched(
    chain: &mut Chain,
    sp: &Path,
    st: State,
    cid: u32,
    opts: &ApplyOptions,
    resumed: bool,
) -> Result<()> {
    if !st.moves.is_empty() {
        let mut w = LayerWriter::open_with(chain.top(), opts.allow_device_write)?;
        if resumed {
            w.check_moves(&st.moves, &st.ends)?;
        }
        if st.phase != Phase::Compact {
            recovery::write(
                sp,
                &State {
                    phase: Phase::Compact,
                    ..st.clone()
                },
            )?;
        }
        recovery::remove_state_files(&[journal_path(sp)])?;
        w.compact(&st.moves, &st.ends)?;
    }
    finish(&mut chain.layers[0], cid)?;
    recovery::remove_state_files(&[journal_path(sp), sp.to_path_buf()])
}

/// A layer an interrupted apply left marked, made to read as one whole point when it
/// can be: a hosted sparse target (its old grains are never written before the switch)
/// whose state file is this mark's. With the apply's journal complete it reads as after
/// the apply (the journal laid over its tables, nothing written); without one, in phase
/// `copy` as before it, in phase `compact` as after it. Returns what to tell the user,
/// or `None` when the layer cannot be read as one point (it is then refused).
pub(crate) fn read_through(layer: &mut crate::layer::Layer) -> Option<String> {
    let p = recovery::pending_of(layer).filter(|p| p.op == "apply")?;
    // What `LayerWriter::can_shadow` needs, seen without opening anything for writing.
    let sparse = layer
        .extents
        .iter()
        .all(|e| matches!(&e.extent, crate::format::Extent::Sparse(s) if !s.header().compressed()));
    if !sparse {
        return None;
    }
    let sp = state_path(&recovery::canonical(&layer.path).ok()?);
    let st: State = recovery::read(&sp).ok()??;
    if st.token != p.token {
        return None;
    }
    let after = if std::fs::symlink_metadata(journal_path(&sp)).is_ok() {
        let records = recovery::admitted_journal(&sp, &st.token, layer, "apply").ok()?;
        layer.overlay(&records).ok()?;
        true
    } else {
        match st.phase {
            Phase::Copy => false,
            Phase::Compact => true,
            // The journal of phase `tables` is gone: the tables may be half switched.
            Phase::Tables => return None,
        }
    };
    Some(format!(
        "`{}` is in the middle of an interrupted `vmdkit apply` (content ID {} -> {}); it reads as it is {} that apply.          Run the same `vmdkit apply {} INCREMENT` again with that increment to finish it",
        layer.path.display(),
        cid_text(st.parent_cid),
        cid_text(st.cid),
        if after { "after" } else { "before" },
        layer.path.display()
    ))
}

/// The tables are durable: the increment's CID and no mark, in one descriptor write.
fn finish(top: &mut crate::layer::Layer, cid: u32) -> Result<()> {
    if top.bare_cowd || (top.cid() == Some(cid) && recovery::pending_of(top).is_none()) {
        return Ok(());
    }
    recovery::settle(top, cid)
}

/// A state found beside the target: act on it only when it is this target's and this
/// increment's, bound by the token. `Ok(false)`: the state is void (phase `copy`, no
/// mark, every extent file the recorded one at its recorded length: nothing of the
/// interrupted run is in the disk).
fn resume_check(sp: &Path, st: &State, chain: &Chain, inc: &Increment) -> Result<bool> {
    let top = chain.top();
    let allowed = Resolved::of_layers([top])?;
    let t = allowed.admit(sp, &st.target)?;
    if !crate::io::same_file(&t, &top.path) {
        return Err(Error::chain(
            sp,
            "this apply state was written for another disk; it is not acted on",
        ));
    }
    for f in &st.files {
        allowed.admit(sp, &f.path)?;
    }
    if (st.parent_cid, st.cid) != (inc.parent_cid, inc.cid) {
        return Err(Error::chain(
            sp,
            format!(
                "an apply of another increment (content ID {} -> {}) was interrupted here; run it again with that increment to finish it first",
                cid_text(st.parent_cid),
                cid_text(st.cid)
            ),
        ));
    }
    // In phase `copy` the target keeps its old CID until the end: another CID means
    // something wrote into it since (another tool; vmdkit refuses a marked disk), and
    // cutting it back would lose that.
    if st.phase == Phase::Copy && top.cid().is_some_and(|c| c != st.parent_cid) {
        return Err(Error::chain(
            sp,
            format!(
                "`{}` changed after an apply of this increment was interrupted (its content ID is now {}); refusing to resume over it",
                top.path.display(),
                top.cid().map_or("-".into(), cid_text)
            ),
        ));
    }
    let marked = recovery::carries(top, "apply", &st.token);
    let finished =
        st.phase != Phase::Copy && recovery::pending_of(top).is_none() && top.cid() == Some(st.cid);
    let lengths_ok = |exact: bool| {
        st.files.iter().all(|f| {
            f.same_inode()
                && std::fs::metadata(&f.path).is_ok_and(|m| {
                    if exact {
                        m.len() == f.len
                    } else {
                        m.len() >= f.len
                    }
                })
        })
    };
    if (marked || finished) && lengths_ok(false) {
        return Ok(true);
    }
    if st.phase == Phase::Copy && !marked && recovery::pending_of(top).is_none() && lengths_ok(true)
    {
        return Ok(false);
    }
    Err(Error::chain(
        sp,
        format!(
            "`{}` is not the disk this interrupted apply was writing into (it does not carry the apply's mark, \
             or its files changed: restored from a copy, or replaced). Nothing was done. If the disk was restored \
             on purpose, move this state file (and its journal) away, then apply the increments it needs in order",
            top.path.display()
        ),
    ))
}

/// The target must hold the increment's parent: its CID is the increment's parentCID.
fn check_links(
    top: &crate::layer::Layer,
    inc: &Increment,
    name: &Path,
    opts: &ApplyOptions,
) -> Result<()> {
    let have = top.cid().filter(|_| !top.bare_cowd);
    if have == Some(inc.cid) {
        return Err(Error::refused(
            &top.path,
            format!(
                "`{}` already has the content ID {} of the increment `{}`: it was applied already; nothing was written",
                top.path.display(),
                cid_text(inc.cid),
                name.display()
            ),
            None,
        ));
    }
    if have != Some(inc.parent_cid) && !opts.force {
        return Err(Error::Chain {
            path: top.path.clone(),
            what: format!(
                "its content ID is {} but the increment `{}` applies to content ID {}: apply increments in order, each onto the restore of the backup before it; nothing was written{}",
                have.map_or("(none)".into(), cid_text),
                name.display(),
                cid_text(inc.parent_cid),
                if have.is_none() {
                    " (a disk without a CID can be forced, once you are sure it holds the increment's parent)"
                } else {
                    ""
                }
            ),
            unless: have.is_none().then_some(crate::error::Override::Force),
        });
    }
    crate::dependents::refuse_dependents(&top.path, opts.force, "applying an increment")
}
