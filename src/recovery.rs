//! Recovery state: what `commit` and `apply` leave beside a disk while they change it (a
//! state file and a journal of table writes), and the pending mark they put in the disk.
//!
//! # Recovery state is input, not truth
//! A state file or a journal is a file in a folder that anybody with write access to the
//! datastore may have written, copied from another disk or left from an older run. So:
//! - **It never names what is acted on.** A command resolves the chain itself, from the
//!   path the user gave, with the extent rules (folder rule, no `..`, no symlink out, no
//!   absolute name unasked). Every path in a state or journal record must then be one of
//!   those files, by canonical path *and* device+inode (`Resolved::admit`); a record
//!   naming anything else makes the whole state refused, before anything is written.
//! - **It is checksummed.** State files carry a CRC-32 of their body (`encode`); the
//!   journal is one CRC-covered record list that also carries the state's token. A torn
//!   or edited state is refused.
//! - **It binds to the exact disk it was written for.** When an operation starts it
//!   writes a random token into the state file and then the same token into the target's
//!   descriptor (`ddb.vmdkit.pending = "OP TOKEN"`). A rerun acts only when the disk still
//!   carries that token. A disk restored from a copy (`cp` keeps the inode) carries no
//!   token or another one: in a phase where the disk may already hold some of the new
//!   data, that is refused with what to do; in the copy phase, where nothing the disk's
//!   tables reference was written yet, the state is void and the command starts afresh
//!   with all the checks of a first run. The files' device, inode and recorded lengths are
//!   checked as well (layers without a descriptor, bare COWD REDO logs, have only those).
//! - **Paths are canonical**, so a rerun from another working folder (cron, a shell) finds
//!   the same state.
//!
//! # The pending mark
//! The token in the descriptor is also what every other command sees: a disk whose
//! descriptor says `ddb.vmdkit.pending` is in the middle of a vmdkit operation. Opening a
//! chain refuses a top layer marked by commit or any layer marked by apply, naming the
//! command that finishes it ([`pending_of`]); `info` and `check` report it. Commands that
//! only read (`OpenOptions::read_pending`) read an apply's hosted sparse target as the
//! one point it holds, before or after (`ops::apply::read_through`), with a warning.
//! The mark is removed by the last descriptor write, which also gives the disk its final
//! CID (`settle`), so the disk is never unmarked while it is half done; in an embedded
//! descriptor the mark never straddles two sectors, so a power cut during that write
//! leaves it whole or gone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::Layer;

/// The descriptor key of the pending mark (in the disk database).
pub const PENDING_KEY: &str = "ddb.vmdkit.pending";

const MAGIC: &str = "vmdkit-state 1";

/// A state file's bytes: a magic line, the JSON body, a line with the body's CRC-32.
pub(crate) fn encode<T: Serialize>(st: &T) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(st).expect("state types serialize");
    let mut out = format!("{MAGIC}\n").into_bytes();
    out.extend_from_slice(&body);
    out.extend_from_slice(format!("\ncrc32 {:08x}\n", crc32fast::hash(&body)).as_bytes());
    out
}

/// Parse a state file written by [`encode`]: the magic, the checksum, then the body.
pub(crate) fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    let bad = |at: usize, what: &str| {
        Error::corrupt(
            path,
            at as u64,
            format!("state file: {what}; it is not acted on"),
        )
    };
    let rest = bytes
        .strip_prefix(format!("{MAGIC}\n").as_bytes())
        .ok_or_else(|| {
            bad(
                0,
                "no vmdkit state header (written by an older vmdkit, or not a state file)",
            )
        })?;
    let tail = rest
        .iter()
        .rposition(|&b| b == b'\n')
        .filter(|&i| i + 1 == rest.len())
        .and_then(|_| rest[..rest.len() - 1].iter().rposition(|&b| b == b'\n'))
        .ok_or_else(|| bad(bytes.len(), "no checksum line"))?;
    let (body, crc_line) = rest.split_at(tail);
    let crc = std::str::from_utf8(crc_line)
        .ok()
        .and_then(|l| l.trim().strip_prefix("crc32 "))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad(MAGIC.len() + 1 + tail, "bad checksum line"))?;
    if crc32fast::hash(body) != crc {
        return Err(bad(MAGIC.len() + 1, "checksum mismatch (torn or edited)"));
    }
    serde_json::from_slice(body).map_err(|e| bad(MAGIC.len() + 1, &format!("unreadable body: {e}")))
}

/// Read a state file; `None` when there is none. Bounded: a state is a few KiB, and a
/// file of more than 16 MiB under the name is not one.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("stat", path, 0, e)),
    };
    if !meta.is_file() || meta.len() > 16 << 20 {
        return Err(Error::corrupt(
            path,
            0,
            "state file: not a regular file of at most 16 MiB; it is not acted on",
        ));
    }
    let b = std::fs::read(path).map_err(|e| Error::io("read", path, 0, e))?;
    decode(path, &b).map(Some)
}

/// Write a state file atomically and durably.
pub(crate) fn write<T: Serialize>(path: &Path, st: &T) -> Result<()> {
    crate::write::write_atomically(path, &encode(st))
}

/// A fresh random token binding a state to the disk it marks.
pub(crate) fn new_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// A file as an operation found it: canonical path, identity and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
}

impl FileRecord {
    /// Record `path` as it is now (canonical path).
    pub fn of(path: &Path) -> Result<FileRecord> {
        let path = canonical(path)?;
        let m = std::fs::metadata(&path).map_err(|e| Error::io("stat", &path, 0, e))?;
        Ok(FileRecord {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            path,
        })
    }

    /// Same device and inode as recorded (content may have changed).
    pub fn same_inode(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Same file, untouched: identity, length and mtime as recorded.
    pub fn unchanged(&self) -> bool {
        FileRecord::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// The canonical (absolute, links resolved) path of an existing file.
pub(crate) fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::io("resolve the path of", p, 0, e))
}

/// The files a command resolved itself: the only ones a state or journal may name.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    files: Vec<(PathBuf, u64, u64)>,
}

impl Resolved {
    /// The files of `layers` (descriptor and extents), as the command opened them.
    pub fn of_layers<'a>(layers: impl IntoIterator<Item = &'a Layer>) -> Result<Resolved> {
        let mut r = Resolved::default();
        for l in layers {
            for f in l.files() {
                r.add(&f)?;
            }
        }
        Ok(r)
    }

    /// Add one file the command resolved itself.
    pub fn add(&mut self, f: &Path) -> Result<()> {
        let c = canonical(f)?;
        let m = std::fs::metadata(&c).map_err(|e| Error::io("stat", &c, 0, e))?;
        if !self.files.iter().any(|(p, _, _)| *p == c) {
            self.files.push((c, m.dev(), m.ino()));
        }
        Ok(())
    }

    /// `named`, a path read from the state file `state`, if it is one of the resolved
    /// files (same canonical path and the same device and inode); otherwise the refusal.
    pub fn admit(&self, state: &Path, named: &Path) -> Result<PathBuf> {
        let refuse = || {
            Error::chain(
                state,
                format!(
                    "this recovery state names `{}`, which is not a file of the disk this command resolved; \
                     it is not acted on (if no vmdkit is running on this disk, move the state file away and check the disk)",
                    named.display()
                ),
            )
        };
        let c = std::fs::canonicalize(named).map_err(|_| refuse())?;
        let m = std::fs::metadata(&c).map_err(|_| refuse())?;
        self.files
            .iter()
            .find(|(p, d, i)| *p == c && *d == m.dev() && *i == m.ino())
            .map(|(p, _, _)| p.clone())
            .ok_or_else(refuse)
    }
}

/// What a pending mark says: the operation and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// `commit` or `apply`.
    pub op: String,
    /// The token of the state file that goes with it.
    pub token: String,
}

/// The pending mark of a layer, if its descriptor has one.
pub fn pending_of(layer: &Layer) -> Option<Pending> {
    let v = layer.descriptor.ddb(PENDING_KEY)?;
    let mut it = v.split_whitespace();
    Some(Pending {
        op: it.next().unwrap_or("").to_string(),
        token: it.next().unwrap_or("").to_string(),
    })
}

/// What to tell a user about a layer marked pending: what was interrupted and what
/// finishes it.
pub fn pending_message(layer: &Layer) -> Option<String> {
    let p = pending_of(layer)?;
    let name = layer.path.display();
    Some(match p.op.as_str() {
        "apply" => format!(
            "`{name}` is in the middle of an interrupted `vmdkit apply`: it is refused (commands that only read it read a \
             sparse target as before or after the apply; a flat or raw one is half written) until the same \
             `vmdkit apply {name} INCREMENT` is run again with the same increment to finish it"
        ),
        "commit" => format!(
            "`{name}` is the parent of an interrupted `vmdkit commit`: read alone, its content may be neither the old nor the new point. \
             Run the same `vmdkit commit` again on the delta above it (its state file `*.vmdkit-commit` is in this folder) to finish it"
        ),
        other => format!("`{name}` is marked as in the middle of a vmdkit operation `{other}`"),
    })
}

/// The note for a delta whose parent no longer matches it because an interrupted
/// `vmdkit commit` merged it and had not removed it yet: its state file
/// `<delta>.vmdkit-commit` is beside it (a well-formed one; nothing in it is acted on,
/// it only explains).
pub fn commit_pending_note(delta: &Path) -> Option<String> {
    let sp = PathBuf::from(format!("{}.vmdkit-commit", delta.display()));
    let _: serde_json::Value = read(&sp).ok()??;
    Some(format!(
        "`{}` was merged into its parent by an interrupted `vmdkit commit` (its state file `{}` is beside it) and is being removed: \
         run the same `vmdkit commit {}` again to finish it; until then read the parent",
        delta.display(),
        sp.display(),
        delta.display()
    ))
}

/// Whether the commit state beside `delta` (a well-formed, checksummed one, past its copy
/// phase) explains a CID mismatch between a child whose parentCID is `want` and
/// `parent`: it merged into exactly this parent (canonical path), the parent has the new
/// CID the commit gave it, and the child names the CID the parent had before.
pub fn commit_explains(delta: &Path, parent: &Layer, want: Option<u32>) -> bool {
    let sp = PathBuf::from(format!("{}.vmdkit-commit", delta.display()));
    let Ok(Some(v)) = read::<serde_json::Value>(&sp) else {
        return false;
    };
    let phase_ok = matches!(v["phase"].as_str(), Some("tables") | Some("remove"));
    let target_ok = canonical(&parent.path)
        .is_ok_and(|p| v["target"].as_str().is_some_and(|t| Path::new(t) == p));
    let new_ok = parent.cid().map(u64::from) == v["target_new_cid"].as_u64();
    let old_ok = want.map(u64::from) == v["target_old_cid"].as_u64();
    // Between the two writes of an embedded descriptor's `settle` the parent has its new
    // CID and still this commit's mark.
    let mark_ok = pending_of(parent)
        .is_none_or(|p| p.op == "commit" && v["token"].as_str() == Some(p.token.as_str()));
    phase_ok && target_ok && new_ok && old_ok && mark_ok
}

/// A raw file that an interrupted `vmdkit apply --raw` was writing in place (its state
/// file `<raw>.vmdkit-apply` is beside it): what to tell the user.
pub fn raw_pending_note(raw: &Path) -> Option<String> {
    let sp = PathBuf::from(format!("{}.vmdkit-apply", raw.display()));
    let _: serde_json::Value = read(&sp).ok()??;
    Some(format!(
        "`{}` is in the middle of an interrupted `vmdkit apply` (in-place writes into a raw target cannot be made atomic): \
         its content may be neither the old nor the new point. Run the same apply into `{}` (of the same increment, as a raw target, forced) again to finish it",
        raw.display(),
        raw.display()
    ))
}

/// Give `layer` the pending mark `op token` (durably), before the first write of an
/// operation. Layers without a descriptor (bare COWD) cannot carry it.
pub(crate) fn mark(layer: &mut Layer, op: &str, token: &str) -> Result<()> {
    if layer.bare_cowd {
        return Ok(());
    }
    let value = format!("{op} {token}");
    let before = layer.descriptor.to_text().len();
    layer.descriptor.set_ddb(PENDING_KEY, &value);
    let after = layer.descriptor.to_text().len();
    // An embedded descriptor is written in place, and a power cut may leave any of its
    // sectors old or new: the mark (appended last) must not straddle two sectors, or a
    // half-written mark line would make the descriptor unreadable. Blank lines move it
    // to the next sector; removing it later then changes that one sector only.
    const S: usize = crate::format::sparse::SECTOR as usize;
    if layer.embedded && before % S != 0 && before / S != (after - 1) / S {
        layer.descriptor.remove_ddb(PENDING_KEY);
        layer.descriptor.push_blank_lines(S - before % S);
        layer.descriptor.set_ddb(PENDING_KEY, &value);
    }
    crate::write::write_descriptor(layer)
}

/// Give `layer` its final CID and remove its mark, durably. A descriptor file is
/// replaced whole (one rename). An embedded descriptor is written in place, where a
/// power cut keeps each sector old or new, so it takes two writes: the CID first (the
/// mark stays: the operation's rerun still finishes it), then the mark's removal, which
/// changes only the mark's own sector ([`mark`]). Neither write moves a line: no state on
/// the way reads as a torn descriptor.
pub(crate) fn settle(layer: &mut Layer, cid: u32) -> Result<()> {
    let cid = format!("{cid:08x}");
    if layer.embedded && pending_of(layer).is_some() && layer.descriptor.get("CID") != Some(&cid) {
        layer.descriptor.set("CID", &cid, false);
        crate::write::write_descriptor(layer)?;
    }
    layer.descriptor.remove_ddb(PENDING_KEY);
    layer.descriptor.set("CID", &cid, false);
    crate::write::write_descriptor(layer)
}

/// Whether `layer` carries the mark of `op` with `token`; layers without a descriptor
/// answer `true` (their binding is the files' identity and lengths alone).
pub(crate) fn carries(layer: &Layer, op: &str, token: &str) -> bool {
    layer.bare_cowd || pending_of(layer).is_some_and(|p| p.op == op && p.token == token)
}

/// The journal beside a state file: `<state>.journal`.
pub(crate) fn journal_path(state: &Path) -> PathBuf {
    PathBuf::from(format!("{}.journal", state.display()))
}

/// The journal of the state file `sp` (phase `tables`), bound to the state's `token`,
/// every record's file admitted as one of `layer`'s own (its path replaced by the
/// admitted one). `op` names the operation in the refusal.
pub(crate) fn admitted_journal(
    sp: &Path,
    token: &str,
    layer: &Layer,
    op: &str,
) -> Result<Vec<crate::write::JournalRecord>> {
    let jp = journal_path(sp);
    let (found, mut records) = crate::write::read_journal(&jp)?;
    if found != token {
        return Err(Error::corrupt(
            &jp,
            0,
            format!("journal of another {op} (its token is not the state's); it is not acted on"),
        ));
    }
    let allowed = Resolved::of_layers([layer])?;
    for r in &mut records {
        r.file = allowed.admit(&jp, &r.file)?;
    }
    Ok(records)
}

/// Files the host marks read-only (mode 0444) are refused by the commands that write a
/// disk in place, even for root (who could write them anyway), unless `force`.
pub(crate) fn refuse_read_only_files(layer: &Layer, force: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if force {
        return Ok(());
    }
    for f in layer.files() {
        let Ok(m) = std::fs::metadata(&f) else {
            continue;
        };
        if m.is_file() && m.permissions().readonly() {
            return Err(Error::refused(
                &f,
                format!(
                    "`{}` is read-only (mode {:o}): refusing to write into it; nothing was written (make it writable)",
                    f.display(),
                    m.permissions().mode() & 0o7777
                ),
                Some(crate::error::Override::Force),
            ));
        }
    }
    Ok(())
}

/// The removal of the files of an operation's state (journal, state file), durably.
pub(crate) fn remove_state_files(files: &[PathBuf]) -> Result<()> {
    crate::output::remove_durably(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A state file reads back as written, and no single changed byte of it is
        /// taken for a state (the checksum, the magic or the parser catches it).
        #[test]
        fn a_state_reads_back_and_no_edited_byte_passes(
            token in "[0-9a-f]{32}",
            paths in proptest::collection::vec("[a-z/]{1,40}", 0..6),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let body = serde_json::json!({"token": token, "paths": paths});
            let b = encode(&body);
            let p = Path::new("x.vmdkit-apply");
            prop_assert_eq!(decode::<serde_json::Value>(p, &b).unwrap(), body.clone());
            let mut e = b.clone();
            let i = at.index(e.len());
            e[i] ^= flip;
            if let Ok(v) = decode::<serde_json::Value>(p, &e) {
                // Only a change the JSON reader cannot see (whitespace) may pass, and it
                // then means the same.
                prop_assert_eq!(v, body);
            }
        }
    }
}
