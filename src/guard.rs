//! Safety rails shared by every command that changes or creates files: file identity,
//! advisory locks, the registry of temporaries (removed on signals and by later runs).
//!
//! # Locks
//! A command that changes a disk takes an exclusive `flock(2)` on every file it changes
//! and a shared one on every file it only reads, without waiting: a second writer (or a
//! reader while a writer runs) gets [`Error::Busy`] at once. `flock` locks belong to an
//! open file description, so one process must lock each file once: [`LockSet`] keeps one
//! descriptor per file (device + inode) and upgrades shared to exclusive in place. The
//! locks are advisory: they order vmdkit processes (and `flock(1)` scripts), not other
//! tools.
//!
//! # Temporaries
//! Every temporary (outputs, replaced descriptors, state files, journals) is written by
//! [`crate::output::AtomicFile`] under `.NAME.vmdkit-tmp.PID.N` beside the target. Each is
//! registered here while it exists; the binary removes the registered ones when it gets
//! SIGINT, SIGTERM or SIGHUP.
//!
//! Its writer holds an exclusive `flock` on the temporary for the temporary's whole life
//! (until it is renamed into place or removed). Staleness is decided by that lock, never
//! by the PID in the name: a PID says nothing about a vmdkit in another PID namespace (a
//! container) or on another host sharing the datastore (NFS carries `flock` as a byte-range
//! lock), and PIDs are reused. [`sweep_stale_temporaries`] removes only temporaries whose
//! lock it can take itself, i.e. whose writer is gone, and it takes that lock before the
//! unlink so a writer cannot start between the test and the removal.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A file's identity: device and inode (after following links).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    /// The identity of `path` (following links), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Refuse `target` when it is one of `sources` (same device and inode, through links
/// and hard links), whatever `--force` says.
pub fn refuse_source_as_target(target: &Path, sources: &[PathBuf]) -> Result<()> {
    let Some(t) = FileId::of(target) else {
        return Ok(());
    };
    for s in sources {
        if FileId::of(s) == Some(t) {
            return Err(Error::refused(
                target,
                format!(
                    "`{}` is `{}`, a file of the source disk: refusing to write over its own input (even when forced)",
                    target.display(),
                    s.display()
                ),
                None,
            ));
        }
    }
    Ok(())
}

/// Lock kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockKind {
    /// Others may read (take shared locks) too.
    Shared,
    /// Nobody else may lock.
    Exclusive,
}

/// Locks held by one operation; released when dropped.
#[derive(Debug, Default)]
pub struct LockSet {
    held: HashMap<FileId, (File, LockKind, PathBuf)>,
}

impl LockSet {
    /// No locks yet.
    pub fn new() -> LockSet {
        LockSet::default()
    }

    /// Take (or upgrade to) `kind` on `path`, without waiting.
    pub fn lock(&mut self, path: &Path, kind: LockKind) -> Result<()> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, 0, e))?;
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some((_, have, _)) = self.held.get(&id) {
            if *have >= kind {
                return Ok(());
            }
        }
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            // Nothing to lock on (and opening a FIFO would block).
            return Ok(());
        }
        let file = match self.held.remove(&id) {
            Some((f, _, _)) => f,
            None => File::open(path).map_err(|e| Error::io("open", path, 0, e))?,
        };
        let op = match kind {
            LockKind::Shared => libc::LOCK_SH,
            LockKind::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        // A lock can look taken for an instant after its holder let it go: a process
        // that forked (a library user spawning a program) shares the open file with the
        // child until the child execs. So "busy" is believed only when it lasts 100 ms;
        // a second vmdkit that really holds the file is still refused at once to a person.
        let mut tries = 0;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io("lock", path, 0, e));
            }
            tries += 1;
            if tries > 20 {
                return Err(Error::Busy(path.to_path_buf()));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.held.insert(id, (file, kind, path.to_path_buf()));
        Ok(())
    }

    /// Shared locks on every file in `paths`.
    pub fn shared_all<'a>(&mut self, paths: impl IntoIterator<Item = &'a PathBuf>) -> Result<()> {
        for p in paths {
            self.lock(p, LockKind::Shared)?;
        }
        Ok(())
    }

    /// Exclusive locks on every file in `paths`.
    pub fn exclusive_all<'a>(
        &mut self,
        paths: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Result<()> {
        for p in paths {
            self.lock(p, LockKind::Exclusive)?;
        }
        Ok(())
    }
}

static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static NOTE: Mutex<Option<String>> = Mutex::new(None);

/// What a signal interrupts (an apply between its first and last write): the binary
/// prints it on its way out, so Ctrl-C says what was left and what finishes it.
pub fn set_interrupt_note(note: Option<String>) {
    if let Ok(mut n) = NOTE.lock() {
        *n = note;
    }
}

/// See [`set_interrupt_note`].
pub fn interrupt_note() -> Option<String> {
    NOTE.lock().ok().and_then(|n| n.clone())
}

type Hook = Box<dyn Fn() + Send>;
static SHUTDOWN: Mutex<Option<Hook>> = Mutex::new(None);

/// Something to do before the process ends on a signal (the binary runs it before it
/// removes the temporaries): `serve --overlay` makes the overlay's writes durable.
pub fn set_shutdown_hook(hook: Option<Box<dyn Fn() + Send>>) {
    if let Ok(mut h) = SHUTDOWN.lock() {
        *h = hook;
    }
}

/// Run the hook set by [`set_shutdown_hook`], once.
pub fn run_shutdown_hook() {
    let hook = SHUTDOWN.lock().ok().and_then(|mut h| h.take());
    if let Some(h) = hook {
        h();
    }
}

/// Record a temporary file so a signal can remove it.
pub fn register_temporary(path: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.push(path.to_path_buf());
    }
}

/// Forget a temporary (renamed into place or removed).
pub fn unregister_temporary(path: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.retain(|p| p != path);
    }
}

/// Remove every registered temporary (called by the binary on SIGINT/SIGTERM/SIGHUP).
/// Returns how many were removed.
pub fn remove_registered_temporaries() -> usize {
    let list = match TEMPS.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    list.iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// The temporary-name pattern: `.NAME.vmdkit-tmp.PID` or `.NAME.vmdkit-tmp.PID.N`.
/// Returns the PID when `name` is one.
pub fn temporary_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let i = rest.rfind(".vmdkit-tmp.")?;
    let tail = &rest[i + ".vmdkit-tmp.".len()..];
    let pid = tail.split('.').next()?;
    let n = tail.split('.').nth(1);
    if tail.split('.').count() > 2 || n.is_some_and(|n| n.parse::<u32>().is_err()) {
        return None;
    }
    pid.parse().ok()
}

/// Take `flock(op | LOCK_NB)` on `file`: `Ok(true)` when taken, `Ok(false)` when another
/// open file (this process's or another's) holds a conflicting lock.
pub(crate) fn try_flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

/// A temporary whose writer is gone, locked by us (so no writer can hold it), or `None`
/// when its writer still holds it (or it cannot be opened: then it is left alone).
fn lock_if_stale(path: &Path) -> Option<File> {
    let f = File::open(path).ok()?;
    match try_flock(&f, libc::LOCK_EX) {
        Ok(true) => Some(f),
        _ => None,
    }
}

/// Every vmdkit temporary in `dir`, with whether its writer still holds it (a running
/// vmdkit on this host, in a container or on another host sharing the folder).
pub fn temporaries(dir: &Path) -> Vec<(PathBuf, bool)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<(PathBuf, bool)> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            temporary_pid(&name)?;
            let p = e.path();
            let alive = lock_if_stale(&p).is_none();
            Some((p, alive))
        })
        .collect();
    v.sort();
    v
}

/// Remove the temporaries in `dir` that no writer holds (before writing into it). Each is
/// locked before it is removed, and the removal made durable.
pub fn sweep_stale_temporaries(dir: &Path) {
    let mut removed = false;
    for (p, alive) in temporaries(dir) {
        if alive {
            continue;
        }
        // Hold its lock across the unlink: a writer that got the name meanwhile would
        // hold the lock, and then we would not have it.
        if let Some(_held) = lock_if_stale(&p) {
            removed |= std::fs::remove_file(&p).is_ok();
        }
    }
    if removed {
        let _ = crate::io::sync_folder(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised() {
        assert_eq!(temporary_pid(".a.vmdk.vmdkit-tmp.123.0"), Some(123));
        assert_eq!(temporary_pid(".a.vmdk.vmdkit-tmp.77"), Some(77));
        assert_eq!(temporary_pid("a.vmdk.vmdkit-tmp.77"), None);
        assert_eq!(temporary_pid(".a.vmdk"), None);
        assert_eq!(temporary_pid(".a.vmdk.vmdkit-tmp.x"), None);
    }

    #[test]
    fn a_second_exclusive_lock_is_busy_and_shared_locks_coexist() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let mut a = LockSet::new();
        a.lock(&p, LockKind::Shared).unwrap();
        let mut b = LockSet::new();
        b.lock(&p, LockKind::Shared).unwrap();
        let mut c = LockSet::new();
        assert!(matches!(
            c.lock(&p, LockKind::Exclusive),
            Err(Error::Busy(_))
        ));
        drop(b);
        // Upgrading our own shared lock works once nobody else holds one.
        a.lock(&p, LockKind::Exclusive).unwrap();
        assert!(matches!(c.lock(&p, LockKind::Shared), Err(Error::Busy(_))));
    }
}
