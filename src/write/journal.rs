//! The journal of table and directory writes that makes a switch atomic (apply, commit),
//! and descriptor writes.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::sparse::SECTOR;
use crate::format::Extent;
use crate::hooks::fault_point;
use crate::layer::Layer;

use super::*;

/// One metadata write of a journal (see [`LayerWriter::take_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// The extent file.
    pub file: PathBuf,
    /// Byte offset in it.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Cut `file` to `len` when it is longer (only ever past what its tables reference), and
/// make that durable.
pub(super) fn trim_to(file: &File, path: &Path, len: u64) -> Result<()> {
    let now = file
        .metadata()
        .map_err(|e| Error::io("stat", path, 0, e))?
        .len();
    if now > len {
        fault_point();
        file.set_len(len)
            .map_err(|e| Error::io("truncate", path, len, e))?;
        sync(file, path)?;
    }
    Ok(())
}

/// Apply journal records (idempotent: replaying them again writes the same bytes), then
/// sync every file touched. A record without bytes cuts its file to `offset` when it is
/// longer (the unreferenced tail of a sparse extent).
pub fn apply_journal(records: &[JournalRecord]) -> Result<()> {
    let mut files: Vec<(PathBuf, File)> = Vec::new();
    for r in records {
        let i = match files.iter().position(|(p, _)| *p == r.file) {
            Some(i) => i,
            None => {
                files.push((r.file.clone(), open_rw(&r.file)?));
                files.len() - 1
            }
        };
        if r.bytes.is_empty() {
            continue;
        }
        pwrite(&files[i].1, &r.file, &r.bytes, r.offset)?;
    }
    for (p, f) in &files {
        sync(f, p)?;
    }
    // Cuts last, once every table write is durable.
    for r in records.iter().filter(|r| r.bytes.is_empty()) {
        if let Some((p, f)) = files.iter().find(|(p, _)| *p == r.file) {
            trim_to(f, p, r.offset)?;
        }
    }
    Ok(())
}

/// Give `layer` a new CID and write its descriptor back (atomically for a separate
/// descriptor file; in place in the descriptor area for an embedded one). Bare COWD
/// layers have no CID: nothing happens.
pub fn set_cid(layer: &mut Layer, cid: u32) -> Result<()> {
    if layer.bare_cowd {
        return Ok(());
    }
    layer.descriptor.set("CID", &format!("{cid:08x}"), false);
    write_descriptor(layer)
}

/// Write `layer.descriptor` back to where it lives.
pub fn write_descriptor(layer: &Layer) -> Result<()> {
    let text = layer.descriptor.to_text();
    if layer.embedded {
        let Some(Extent::Sparse(s)) = layer.extents.first().map(|e| &e.extent) else {
            return Err(Error::unsupported(
                &layer.path,
                "embedded descriptor outside a sparse extent",
            ));
        };
        let h = s.raw_header();
        let room = (h.descriptor_size * SECTOR) as usize;
        if text.len() > room {
            return Err(Error::unsupported(
                &layer.path,
                format!(
                    "descriptor of {} bytes does not fit the {room}-byte embedded area",
                    text.len()
                ),
            ));
        }
        let mut b = text.into_bytes();
        b.resize(room, 0);
        let f = open_rw(&layer.path)?;
        pwrite(&f, &layer.path, &b, h.descriptor_offset * SECTOR)?;
        return sync(&f, &layer.path);
    }
    // Separate file: temporary beside it, fsync, rename, fsync of the folder (keeps the
    // old on any failure).
    let perms = std::fs::metadata(&layer.path)
        .map_err(|e| Error::io("stat", &layer.path, 0, e))?
        .permissions();
    if perms.readonly() {
        return Err(Error::refused(
            &layer.path,
            format!("`{}` is read-only: refusing to write", layer.path.display()),
            None,
        ));
    }
    crate::output::replace_atomically(&layer.path, text.as_bytes(), Some(perms))
}

/// Write `bytes` to `path` atomically and durably (see [`crate::output::AtomicFile`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    fault_point();
    crate::output::replace_atomically(path, bytes, None)
}

/// Journal file: `VMDKJRN2`, the token of the state it belongs to (u32 length, bytes),
/// records (u32 path length, path, u64 offset, u32 length, bytes), then the CRC-32 of
/// everything before it. Written atomically before the state moves to phase `tables`.
/// The paths are the recovering command's own (canonical); a reader admits them only
/// when they are files of the disk it resolved ([`crate::recovery`]).
pub fn write_journal(path: &Path, token: &str, records: &[JournalRecord]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut b = b"VMDKJRN2".to_vec();
    b.extend_from_slice(&(token.len() as u32).to_le_bytes());
    b.extend_from_slice(token.as_bytes());
    for r in records {
        let file = std::fs::canonicalize(&r.file).unwrap_or_else(|_| r.file.clone());
        let p = file.as_os_str().as_bytes();
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&r.bytes);
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    write_atomically(path, &b)
}

/// A journal's bytes parsed: its token and records (magic, checksum and every length
/// checked against the bytes there are; nothing is sized by a field alone).
pub fn parse_journal(path: &Path, b: &[u8]) -> Result<(String, Vec<JournalRecord>)> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |at: usize, what: &str| Error::corrupt(path, at as u64, format!("journal: {what}"));
    if b.len() < 16 || &b[..8] != b"VMDKJRN2" {
        return Err(bad(0, "bad magic (not a vmdkit journal, or an older one)"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad(body.len(), "checksum mismatch"));
    }
    let mut i = 8;
    let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
        let s = i
            .checked_add(n)
            .and_then(|e| body.get(*i..e))
            .ok_or_else(|| bad(*i, "truncated record"))?;
        *i += n;
        Ok(s)
    };
    let n = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
    let token = String::from_utf8_lossy(take(&mut i, n)?).into_owned();
    let mut out = Vec::new();
    while i < body.len() {
        let n = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
        let file = PathBuf::from(std::ffi::OsStr::from_bytes(take(&mut i, n)?));
        let offset = u64::from_le_bytes(take(&mut i, 8)?.try_into().expect("8"));
        let len = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
        let bytes = take(&mut i, len)?.to_vec();
        out.push(JournalRecord {
            file,
            offset,
            bytes,
        });
    }
    Ok((token, out))
}

/// Read a journal written by [`write_journal`] (see [`parse_journal`]).
pub fn read_journal(path: &Path) -> Result<(String, Vec<JournalRecord>)> {
    let b = std::fs::read(path).map_err(|e| Error::io("read", path, 0, e))?;
    parse_journal(path, &b)
}

/// Cut files back to recorded lengths (a journaled writer's rerun: what the interrupted
/// run appended is referenced by no table, so nothing is lost and nothing leaks).
pub fn cut_back_files(lengths: &[(PathBuf, u64)]) -> Result<()> {
    for (p, len) in lengths {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| Error::io("open for writing", p, 0, e))?;
        let meta = f.metadata().map_err(|e| Error::io("stat", p, 0, e))?;
        if meta.len() > *len && meta.is_file() {
            f.set_len(*len)
                .map_err(|e| Error::io("truncate", p, *len, e))?;
            f.sync_all().map_err(|e| Error::io("flush", p, 0, e))?;
        }
    }
    Ok(())
}
