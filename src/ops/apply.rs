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
//! - Capacities equal (a raw target may be larger), every extent writable, no other delta
//!   names the target as its parent (the change would break it).
//!
//! # Why a killed apply is finished by a rerun (VMDK targets)
//! It is commit's order ([`crate::ops::commit`]): a state file `<target>.vmdkit-apply`
//! records the increment (its parentCID and CID), the target's extent files with their
//! identity and lengths (phase `copy`). Data grains go into grains the target already has
//! (in place) or are appended; zeroed grains become zeroed grain entries; no table or
//! directory is written in this phase. A rerun of the same increment cuts the extents
//! back and writes again: the same bytes land in the same places. Then the table writes
//! go to a checksummed journal, the state moves to `tables`, the journal is applied, the
//! target gets the increment's CID, and the state and journal are removed. A rerun in
//! phase `tables` replays the journal (it does not need the rest of the input). Until the
//! CID is set the target is refused by any other increment, and a state file for another
//! increment refuses this one.
//!
//! Raw targets (files, devices) have no tables: writes are in place and idempotent, so a
//! rerun of the same increment (with `--force`) finishes the job.

use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
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
use crate::write::{
    apply_journal, cut_back_files, fault_point, read_journal, set_cid, write_atomically,
    write_journal, LayerWriter,
};

/// Options of an apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Skip the parentCID check (needed for raw targets, which have no CID), and apply
    /// although other deltas name the target as their parent.
    pub force: bool,
    /// The target is a raw file or block device, not a VMDK.
    pub raw: bool,
    /// Allow writing into block devices and device-backed disks.
    pub allow_device_write: bool,
}

/// What an apply did.
#[derive(Debug, Clone, Default, Serialize)]
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
    /// The bytes consumed (header and descriptor), fed again to the stream reader.
    head: Vec<u8>,
}

fn read_increment(c: &mut Counted<'_>, name: &Path) -> Result<Increment> {
    let mut first = [0u8; 512];
    c.exact(&mut first)?;
    let header = stream_in::parse_first(&first, name)?;
    if !header.compressed() || !header.markers() {
        return Err(Error::InvalidInput(format!(
            "`{}` is not an increment: increments are streamOptimized files written by `export --delta`",
            name.display()
        )));
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
            Error::InvalidInput(format!(
                "`{}` is a full backup, not an increment (it has no parentCID): restore it with `vmdkit import`",
                name.display()
            ))
        })?;
    let cid = d
        .cid()
        .ok_or_else(|| Error::corrupt(name, 512, "the increment's descriptor has no CID"))?;
    let mut head = first.to_vec();
    head.extend_from_slice(&text);
    Ok(Increment {
        capacity: header.capacity_sectors * SECTOR,
        header,
        parent_cid,
        cid,
        head,
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
}

/// An extent file of the target as it was when the apply began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TargetFile {
    path: PathBuf,
    len: u64,
    dev: u64,
    ino: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    phase: Phase,
    target: PathBuf,
    parent_cid: u32,
    cid: u32,
    files: Vec<TargetFile>,
}

const STATE_VERSION: u32 = 1;

fn state_path(target: &Path) -> PathBuf {
    PathBuf::from(format!("{}.vmdkit-apply", target.display()))
}

fn journal_path(state: &Path) -> PathBuf {
    PathBuf::from(format!("{}.journal", state.display()))
}

fn read_state(sp: &Path) -> Result<Option<State>> {
    let b = match std::fs::read(sp) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", sp, 0, e)),
    };
    let st: State = serde_json::from_slice(&b)
        .map_err(|e| Error::corrupt(sp, 0, format!("unreadable apply state: {e}")))?;
    if st.version != STATE_VERSION {
        return Err(Error::corrupt(
            sp,
            0,
            format!("apply state version {} is not {STATE_VERSION}", st.version),
        ));
    }
    Ok(Some(st))
}

fn write_state(sp: &Path, st: &State) -> Result<()> {
    write_atomically(sp, &serde_json::to_vec_pretty(st).expect("serializable"))
}

/// Remove the journal, then the state file (a rerun between the two finds the target
/// with the increment's CID and only removes the state).
fn remove_state(sp: &Path) -> Result<()> {
    for f in [journal_path(sp), sp.to_path_buf()] {
        fault_point();
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &f, 0, e)),
        }
    }
    Ok(())
}

fn cid_text(c: u32) -> String {
    format!("{c:08x}")
}

/// Apply the increment read from `input` (named `name` in messages) to `target`.
pub fn apply(
    target: &Path,
    input: &mut dyn Read,
    name: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    let inc = read_increment(&mut Counted::new(input, name), name)?;
    let mut report = ApplyReport {
        target: target.to_path_buf(),
        from_cid: cid_text(inc.parent_cid),
        to_cid: cid_text(inc.cid),
        ..Default::default()
    };
    let head = inc.head.clone();
    let mut stream = std::io::Read::chain(&head[..], input);
    let job = Job {
        target,
        inc: &inc,
        name,
        opts,
        progress,
    };
    if opts.raw {
        apply_raw(job, &mut stream, &mut report)?;
    } else {
        apply_vmdk(job, &mut stream, &mut report)?;
    }
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    Ok(report)
}

/// What an apply works with, besides the input and the report.
#[derive(Clone, Copy)]
struct Job<'a> {
    target: &'a Path,
    inc: &'a Increment,
    name: &'a Path,
    opts: &'a ApplyOptions,
    progress: &'a dyn Progress,
}

/// Read the increment's grains: data through `data`, zeroed ranges through `zero`;
/// counts both into `report` and `progress`.
fn read_grains(
    job: Job<'_>,
    stream: &mut dyn Read,
    report: &mut ApplyReport,
    data: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    zero: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let Job {
        inc,
        name,
        progress,
        ..
    } = job;
    let mut c = Counted::new(stream, name);
    let mut first = [0u8; 512];
    c.exact(&mut first)?;
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    stream_in::read_stream_zeroed(
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

fn apply_vmdk(job: Job<'_>, stream: &mut dyn Read, report: &mut ApplyReport) -> Result<()> {
    let Job {
        target,
        inc,
        name,
        opts,
        ..
    } = job;
    let mut locks = LockSet::new();
    locks.lock(target, LockKind::Exclusive)?;
    let chain = Chain::open(
        target,
        &OpenOptions {
            ignore_cid: true,
            ..Default::default()
        },
    )?;
    chain.lock(&mut locks, 0)?;
    crate::guard::test_hold_hook();
    let top = chain.top();
    let sp = state_path(&top.path);
    let state = read_state(&sp)?;
    if let Some(st) = &state {
        if (st.parent_cid, st.cid) != (inc.parent_cid, inc.cid) {
            return Err(Error::chain(
                &sp,
                format!(
                    "an apply of another increment (content ID {} -> {}) was interrupted here; run it again with that increment to finish it first",
                    cid_text(st.parent_cid),
                    cid_text(st.cid)
                ),
            ));
        }
        for f in &st.files {
            let same =
                std::fs::metadata(&f.path).is_ok_and(|m| m.dev() == f.dev && m.ino() == f.ino);
            if !same {
                return Err(Error::chain(
                    &sp,
                    format!(
                        "this apply state belongs to another disk: `{}` is not the file it recorded; refusing to act on it (if no vmdkit apply is running, remove the state file)",
                        f.path.display()
                    ),
                ));
            }
        }
        report.resumed = true;
        // In phase `copy` the target keeps its old CID until the end: another CID means
        // something wrote into it since, and cutting it back would lose that.
        if st.phase == Phase::Copy && top.cid().is_some_and(|c| c != st.parent_cid) {
            return Err(Error::chain(
                &sp,
                format!(
                    "`{}` changed after an apply of this increment was interrupted (its content ID is now {}); refusing to resume over it",
                    top.path.display(),
                    top.cid().map_or("-".into(), cid_text)
                ),
            ));
        }
        if st.phase == Phase::Tables {
            let jp = journal_path(&sp);
            if jp.exists() || top.cid() != Some(inc.cid) {
                apply_journal(&read_journal(&jp)?)?;
            }
            let mut layer = crate::layer::Layer::open(&top.path, &OpenOptions::default())?;
            if layer.cid() != Some(inc.cid) {
                set_cid(&mut layer, inc.cid)?;
            }
            remove_state(&sp)?;
            return Ok(());
        }
    }
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
    let mut writer = LayerWriter::open_with(top, opts.allow_device_write)?;
    writer.check_writable(0, inc.capacity)?;
    let st = match state {
        Some(st) => {
            let lengths: Vec<(PathBuf, u64)> =
                st.files.iter().map(|f| (f.path.clone(), f.len)).collect();
            cut_back_files(&lengths)?;
            // The writer must see the files as they are now.
            writer = LayerWriter::open_with(top, opts.allow_device_write)?;
            st
        }
        None => State {
            version: STATE_VERSION,
            phase: Phase::Copy,
            target: top.path.clone(),
            parent_cid: inc.parent_cid,
            cid: inc.cid,
            files: writer
                .extent_files()
                .into_iter()
                .map(|(path, len)| {
                    let m = std::fs::metadata(&path).map_err(|e| Error::io("stat", &path, 0, e))?;
                    Ok(TargetFile {
                        path,
                        len,
                        dev: m.dev(),
                        ino: m.ino(),
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        },
    };
    write_state(&sp, &st)?;
    let below = |buf: &mut [u8], off: u64| chain.read_below(1, buf, off);
    {
        let w = std::cell::RefCell::new(&mut writer);
        read_grains(
            job,
            stream,
            report,
            &mut |off, b| w.borrow_mut().write_at(b, off, &below),
            &mut |off, len| w.borrow_mut().write_zeroes(off, len, &below),
        )?;
    }
    let journal = writer.take_journal()?;
    drop(writer);
    write_journal(&journal_path(&sp), &journal)?;
    write_state(
        &sp,
        &State {
            phase: Phase::Tables,
            ..st
        },
    )?;
    apply_journal(&journal)?;
    let mut layer = crate::layer::Layer::open(&top.path, &OpenOptions::default())?;
    set_cid(&mut layer, inc.cid)?;
    remove_state(&sp)?;
    Ok(())
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
        return Err(Error::InvalidInput(format!(
            "`{}` already has the content ID {} of the increment `{}`: it was applied already; nothing was written",
            top.path.display(),
            cid_text(inc.cid),
            name.display()
        )));
    }
    if have != Some(inc.parent_cid) && !opts.force {
        return Err(Error::chain(
            &top.path,
            format!(
                "its content ID is {} but the increment `{}` applies to content ID {}: apply increments in order, each onto the restore of the backup before it; nothing was written{}",
                have.map_or("(none)".into(), cid_text),
                name.display(),
                cid_text(inc.parent_cid),
                if have.is_none() {
                    " (a disk without a CID needs --force, once you are sure it holds the increment's parent)"
                } else {
                    ""
                }
            ),
        ));
    }
    if !opts.force {
        if let Some(child) = crate::resolve::children_of(&top.path).into_iter().next() {
            return Err(Error::chain(
                &child,
                format!(
                    "this delta has `{}` as its parent; applying an increment would break it (use --force to apply anyway)",
                    top.path.display()
                ),
            ));
        }
    }
    Ok(())
}

fn apply_raw(job: Job<'_>, stream: &mut dyn Read, report: &mut ApplyReport) -> Result<()> {
    let Job {
        target, inc, opts, ..
    } = job;
    crate::io::refuse_special(target)?;
    let meta = std::fs::metadata(target).map_err(|e| Error::io("stat", target, 0, e))?;
    let block = meta.file_type().is_block_device();
    if block && !opts.allow_device_write {
        return Err(Error::InvalidInput(format!(
            "`{}` is a block device: writing into it needs --allow-device-write",
            target.display()
        )));
    }
    if !opts.force {
        return Err(Error::InvalidInput(format!(
            "a raw target has no content ID to check the increment against (it applies to content ID {}): pass --force once you are sure `{}` holds that content; nothing was written",
            cid_text(inc.parent_cid),
            target.display()
        )));
    }
    let mut locks = LockSet::new();
    locks.lock(target, LockKind::Exclusive)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|e| Error::io("open for writing", target, 0, e))?;
    let size =
        crate::io::device_size(&f).map_err(|e| Error::io("get the size of", target, 0, e))?;
    if size < inc.capacity {
        return Err(Error::InvalidInput(format!(
            "`{}` holds {size} bytes, less than the increment's disk of {} bytes; nothing was written",
            target.display(),
            inc.capacity
        )));
    }
    read_grains(
        job,
        stream,
        report,
        &mut |off, b| {
            f.write_all_at(b, off)
                .map_err(|e| crate::output::write_error(target, off, e))
        },
        &mut |off, len| crate::output::zero_range(&f, target, block, off, len),
    )?;
    f.sync_all().map_err(|e| Error::io("flush", target, 0, e))?;
    Ok(())
}
