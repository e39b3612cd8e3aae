//! Outputs written safely: to a temporary name beside the target, renamed into place
//! only when complete, removed if dropped before [`AtomicFile::commit`]. An existing
//! target is refused unless `force`.
//!
//! [`AtomicFile`] is the one temporary type of the crate: exports, imports, replaced
//! descriptors, manifests, state files and journals all go through it. Its writer holds an
//! exclusive `flock` on the temporary until the rename (see [`crate::guard`] for why
//! staleness is judged by that lock), and [`AtomicFile::commit`] makes the rename durable
//! (the file is synced before it, its folder after it).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{sync_folder, write_error};

/// A file being written under a temporary name.
#[derive(Debug)]
pub struct AtomicFile {
    /// An exclusive lock on the file being replaced (with `--force`), held until the
    /// rename: nobody reads or writes it half-replaced through vmdkit.
    _replaced: Option<crate::guard::LockSet>,
    /// The temporary, open and locked until it is renamed (the lock marks it live).
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

/// Refuse `target` if it exists and `force` is off.
pub fn check_target(target: &Path, force: bool) -> Result<()> {
    if !force && target.symlink_metadata().is_ok() {
        return Err(Error::AlreadyExists(target.to_path_buf()));
    }
    Ok(())
}

impl AtomicFile {
    /// Start writing `target` (created under a temporary name in the same folder).
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
        check_target(target, force)?;
        let replaced = if target.exists() {
            let mut l = crate::guard::LockSet::new();
            l.lock(target, crate::guard::LockKind::Exclusive)?;
            Some(l)
        } else {
            None
        };
        Self::start(target, replaced)
    }

    /// Start replacing `target` (which may exist) whose locks the caller already holds:
    /// a descriptor, a state file, a journal.
    pub fn replace(target: &Path) -> Result<AtomicFile> {
        Self::start(target, None)
    }

    fn start(target: &Path, replaced: Option<crate::guard::LockSet>) -> Result<AtomicFile> {
        let dir = crate::io::folder_of(target);
        let name = target.file_name().ok_or_else(|| {
            Error::InvalidInput(format!("`{}` is not a file name", target.display()))
        })?;
        crate::guard::sweep_stale_temporaries(&dir);
        for i in 0..1000u32 {
            let tmp = dir.join(format!(
                ".{}.vmdkit-tmp.{}.{}",
                name.to_string_lossy(),
                std::process::id(),
                i
            ));
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    // Lock it, then make sure the name is still this file: a sweep in
                    // another process may have taken the lock and removed the name in
                    // the instant between the create and the lock. Then take the next.
                    let locked = crate::guard::try_flock(&file, libc::LOCK_EX)
                        .map_err(|e| Error::io("lock", &tmp, 0, e))?;
                    if !locked || !same_inode(&file, &tmp) {
                        continue;
                    }
                    crate::guard::register_temporary(&tmp);
                    return Ok(AtomicFile {
                        _replaced: replaced,
                        file: Some(file),
                        tmp,
                        target: target.to_path_buf(),
                        done: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create", &tmp, 0, e)),
            }
        }
        Err(Error::InvalidInput(format!(
            "could not pick a temporary name for `{}`",
            target.display()
        )))
    }

    /// The open file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("open until commit")
    }

    /// The temporary path (for error messages).
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flush to stable storage, rename into place, and make the rename durable (fsync of
    /// the folder). The temporary stays open, and so locked, until it has its final name.
    pub fn commit(mut self, force: bool) -> Result<()> {
        let f = self.file.take().expect("open until commit");
        f.sync_all()
            .map_err(|e| Error::io("flush", &self.tmp, 0, e))?;
        // Re-check: the target may have appeared while we wrote.
        check_target(&self.target, force)?;
        crate::hooks::fault_point();
        std::fs::rename(&self.tmp, &self.target)
            .map_err(|e| Error::io("rename into place", &self.target, 0, e))?;
        crate::guard::unregister_temporary(&self.tmp);
        self.done = true;
        drop(f);
        sync_folder(&crate::io::folder_of(&self.target))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
            crate::guard::unregister_temporary(&self.tmp);
        }
    }
}

/// Whether `path` names the open `file` (same device and inode).
fn same_inode(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Remove files in order (a missing one is fine), each removal made durable (an fsync of
/// its folder) before the next: a file system may persist removals out of order, and
/// the order is what recovery relies on (a journal never outlives its state file; a
/// descriptor never outlives its extents' removal unless they were removed first).
pub fn remove_durably(files: &[PathBuf]) -> Result<()> {
    for f in files {
        crate::hooks::fault_point();
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("remove", f, 0, e)),
        }
        sync_folder(&crate::io::folder_of(f))?;
    }
    Ok(())
}

/// Replace `target` (whose locks the caller holds) with `bytes`, atomically and durably:
/// temporary, fsync, rename, fsync of the folder. `mode` sets the permissions first.
pub fn replace_atomically(
    target: &Path,
    bytes: &[u8],
    mode: Option<std::fs::Permissions>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = AtomicFile::replace(target)?;
    f.file()
        .write_all_at(bytes, 0)
        .map_err(|e| write_error(f.tmp_path(), 0, e))?;
    if let Some(m) = mode {
        let _ = f.file().set_permissions(m);
    }
    f.commit(true)
}

/// Starts the kernel's writeback of a file written front to back, every 32 MiB
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it does not wait), so the disk writes while
/// the CPU compresses and the final fsync finds little left to do. Measured on the 1 GiB
/// stream export of `benches/compare.sh`: that fsync took 0.17 s of a 1.38 s run.
pub struct WriteBehind {
    file: File,
    started: u64,
}

impl WriteBehind {
    const STEP: u64 = 32 << 20;
    /// Bytes that may still sit in a writer's buffer when it reports its position.
    const SLACK: u64 = 1 << 20;

    /// Write-behind for `file` (a duplicate handle is kept).
    pub fn new(file: &File) -> Option<WriteBehind> {
        Some(WriteBehind {
            file: file.try_clone().ok()?,
            started: 0,
        })
    }

    /// The writer has written (or buffered) everything before `pos`.
    pub fn advance(&mut self, pos: u64) {
        if pos < self.started + Self::STEP {
            return;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it only starts writeback of the
        // given range, and a failure changes nothing (fsync still makes it durable).
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.started as libc::off64_t,
                (pos - self.started) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.started = pos.saturating_sub(Self::SLACK);
    }
}

/// Zero a range of a device or stand-in file cheaply: BLKZEROOUT on block devices, a
/// punched hole on files, written zeros where neither works.
pub fn zero_range(f: &std::fs::File, path: &Path, block: bool, off: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let ok = if block {
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) from the pointer we pass,
        // which points at a live local array; fd is valid.
        unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) == 0 }
    } else {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(Error::InvalidInput("range too large".into()));
        };
        // SAFETY: fallocate on a valid writable fd; no memory is touched.
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            ) == 0
        }
    };
    if ok {
        return Ok(());
    }
    let z = vec![0u8; (1 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(z.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(f, &z[..n], off + done)
            .map_err(|e| crate::io::write_error(path, off + done, e))?;
        done += n as u64;
    }
    Ok(())
}
