//! Positional read sources: a file read with `pread`, a read-only memory map, an
//! in-memory buffer (tests, fuzzing), or anything a program plugs in through [`ReadAt`].
//!
//! Every read is positional (`&self`, no cursor) so rayon workers can share one source.
//!
//! # The mmap contract
//! A file is mapped only when it is opened read-only for reading a disk, never when it is
//! a target of a write (commit, extend, repair), never for stdin or a pipe. If another
//! process truncates a mapped file while we read it, the process gets SIGBUS; callers that
//! cannot accept that use [`SourceMode::Pread`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// How to read a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    /// Memory-map regular files. Every page read stays resident (and counted in RSS)
    /// until the map is dropped, so this is for small files and library users who want it.
    Mmap,
    /// Positional reads (the default): as fast here as the map for the copy engine's
    /// 1 MiB units, and the memory of a run is bounded by its buffers, not by the disk.
    #[default]
    Pread,
}

/// Anything that reads bytes at an offset: the source of a disk that is not a local
/// file (an HTTP range reader, an object store, a block device API, a buffer).
///
/// Reads are positional and may come from many threads at once. Implementations fill
/// `buf` from `offset` as far as they can and return how many bytes they read; fewer than
/// asked only at the end. [`Layer::from_source`](crate::Layer::from_source) opens a disk
/// from one.
///
/// ```
/// use vmdkit::ReadAt;
///
/// /// A disk image held in memory.
/// struct Bytes(Vec<u8>);
///
/// impl ReadAt for Bytes {
///     fn len(&self) -> u64 {
///         self.0.len() as u64
///     }
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
///         let from = (offset as usize).min(self.0.len());
///         let n = buf.len().min(self.0.len() - from);
///         buf[..n].copy_from_slice(&self.0[from..from + n]);
///         Ok(n)
///     }
/// }
/// # let b = Bytes(vec![1, 2, 3]);
/// # let mut x = [0u8; 4];
/// # assert_eq!(b.read_at(&mut x, 1).unwrap(), 2);
/// ```
pub trait ReadAt: Send + Sync {
    /// The number of bytes there are.
    fn len(&self) -> u64;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read into `buf` from `offset`; returns the bytes read (fewer only at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

enum Backing {
    File(File),
    Mmap(memmap2::Mmap, File),
    Mem(Arc<[u8]>),
    Custom(Arc<dyn ReadAt>),
}

/// A read-only byte source with a known length.
pub struct Source {
    backing: Backing,
    len: u64,
    path: PathBuf,
    /// Bytes laid over the file's on reads (a complete journal of table writes not yet
    /// applied: see [`Source::with_patches`]), sorted by offset.
    patches: Vec<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl Source {
    /// Open `path` read-only.
    pub fn open(path: &Path, mode: SourceMode) -> Result<Source> {
        refuse_special(path)?;
        let file = File::open(path).map_err(|e| Error::io("open", path, 0, e))?;
        Self::from_file(file, path, mode)
    }

    /// Wrap an open file (read-only use).
    pub fn from_file(file: File, path: &Path, mode: SourceMode) -> Result<Source> {
        let meta = file.metadata().map_err(|e| Error::io("stat", path, 0, e))?;
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            device_size(&file).map_err(|e| Error::io("get the size of", path, 0, e))?
        };
        let backing = if mode == SourceMode::Mmap && meta.file_type().is_file() && len > 0 {
            // SAFETY: the file is opened read-only by us for reading a disk; vmdkit never
            // writes through this mapping and never maps a file it is about to change
            // (see the module docs). Concurrent external truncation is outside the contract.
            match unsafe { memmap2::Mmap::map(&file) } {
                Ok(m) => Backing::Mmap(m, file),
                Err(_) => Backing::File(file),
            }
        } else {
            Backing::File(file)
        };
        Ok(Source {
            backing,
            len,
            path: path.to_path_buf(),
            patches: Vec::new(),
        })
    }

    /// An in-memory source (tests and fuzzing).
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>, name: &str) -> Source {
        let bytes: Arc<[u8]> = bytes.into();
        Source {
            len: bytes.len() as u64,
            backing: Backing::Mem(bytes),
            path: PathBuf::from(name),
            patches: Vec::new(),
        }
    }

    /// A source that reads through `reader`; `name` names it in errors.
    pub fn from_reader(reader: Arc<dyn ReadAt>, name: &Path) -> Source {
        Source {
            len: reader.len(),
            backing: Backing::Custom(reader),
            path: name.to_path_buf(),
            patches: Vec::new(),
        }
    }

    /// This source with `patches` (byte offset, bytes) laid over what it reads, later
    /// patches over earlier ones: the file as it will be once those writes are made,
    /// without making them. Bytes past the source's length are left out.
    pub fn with_patches(mut self, patches: Vec<(u64, Vec<u8>)>) -> Source {
        self.patches = patches;
        self
    }

    fn overlay(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        for (at, bytes) in &self.patches {
            let p_end = at.saturating_add(bytes.len() as u64);
            if *at >= end || p_end <= offset {
                continue;
            }
            let from = (*at).max(offset);
            let to = p_end.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path this source was opened from (used in error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Start reading `len` bytes at `offset` from storage into the page cache, without
    /// waiting (`posix_fadvise(WILLNEED)`): a hint, so a later read does not stall on the
    /// disk. Nothing for sources in memory.
    pub fn will_need(&self, offset: u64, len: u64) {
        let Some(f) = self.file() else {
            return;
        };
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: an advisory syscall on an open descriptor; it reads nothing into our
        // memory and a failure changes nothing.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
    }

    /// The underlying file, when there is one.
    pub fn file(&self) -> Option<&File> {
        match &self.backing {
            Backing::File(f) | Backing::Mmap(_, f) => Some(f),
            Backing::Mem(_) | Backing::Custom(_) => None,
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`; reading past the end is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at_zero_fill(buf, offset)?;
        if n < buf.len() {
            return Err(Error::corrupt(
                &self.path,
                offset,
                format!(
                    "needed {} bytes but the file ends at {:#x} (truncated file?)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`; bytes past the end of the source read as
    /// zeros. Returns how many bytes came from the source.
    pub fn read_at_zero_fill(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let avail = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if avail == 0 {
            return Ok(0);
        }
        match &self.backing {
            Backing::Mem(m) => {
                let o = offset as usize;
                head.copy_from_slice(&m[o..o + avail]);
            }
            Backing::Mmap(m, _) => {
                let o = offset as usize;
                head.copy_from_slice(&m[o..o + avail]);
            }
            Backing::Custom(r) => {
                let mut done = 0;
                while done < head.len() {
                    match r.read_at(&mut head[done..], offset + done as u64) {
                        Ok(0) => {
                            head[done..].fill(0);
                            return Ok(done);
                        }
                        Ok(n) => done += n.min(head.len() - done),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(Error::io("read", &self.path, offset + done as u64, e))
                        }
                    }
                }
            }
            Backing::File(f) => {
                let mut done = 0;
                while done < head.len() {
                    match f.read_at(&mut head[done..], offset + done as u64) {
                        Ok(0) => {
                            // The file shrank under us: the rest reads as zeros.
                            head[done..].fill(0);
                            return Ok(done);
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(Error::io("read", &self.path, offset + done as u64, e))
                        }
                    }
                }
            }
        }
        if !self.patches.is_empty() {
            self.overlay(head, offset);
        }
        Ok(avail)
    }

    /// Find the next data region at or after `offset` (SEEK_DATA/SEEK_HOLE). Returns
    /// `(data_start, data_end)`, or `None` when only a hole remains. Sources that cannot
    /// tell report everything as data.
    pub fn next_data(&self, offset: u64) -> Option<(u64, u64)> {
        if offset >= self.len {
            return None;
        }
        let Some(file) = self.file() else {
            return Some((offset, self.len));
        };
        seek_data(file, offset, self.len)
    }
}

fn seek_data(file: &File, offset: u64, len: u64) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Some((offset, len));
    };
    // SAFETY: lseek on a valid fd owned by `file`; it does not touch memory. The shared
    // file position it moves is never used by us (all reads are positional).
    let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if d < 0 {
        let err = std::io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) {
            None
        } else {
            Some((offset, len))
        };
    }
    // SAFETY: as above.
    let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
    let end = if h < 0 { len } else { (h as u64).min(len) };
    Some(((d as u64).min(len), end))
}

/// Refuse what is not a disk file before opening it: folders, pipes and sockets (opening
/// a FIFO blocks until a writer comes), character devices (`/dev/zero` never ends).
/// Regular files and block devices pass.
pub fn refuse_special(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, 0, e))?;
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() || ft.is_socket() {
        "a pipe or socket (import reads streams from `-`)"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        return Ok(());
    };
    Err(Error::InvalidInput(format!(
        "`{}` is {what}, not a disk file",
        path.display()
    )))
}

/// Size of a block device (or any file) by seeking to its end.
pub fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    let end = f.seek(std::io::SeekFrom::End(0))?;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(end)
}

// ---------------------------------------------------------------------------------------
// File-system primitives every layer above uses (paths, writes, folders).

/// The folder a path lives in (`.` for a bare name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `name` in the folder `dir`, without the `./` that joining onto the current folder
/// (what [`folder_of`] gives for a bare name) would add: paths shown to people and
/// written in reports read as they were typed.
pub fn join_in(dir: &Path, name: impl AsRef<Path>) -> PathBuf {
    if dir == Path::new(".") && name.as_ref().is_relative() {
        name.as_ref().to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The last component of a path, as text (empty when there is none).
pub fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether two paths are the same file (device and inode, through links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Map a write error: disk full gets a clear message.
pub fn write_error(path: &Path, offset: u64, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::io("write (the disk is full)", path, offset, e);
    }
    Error::io("write", path, offset, e)
}

/// `n` zero bytes as slices of a static buffer (for writers that count what they write).
pub fn zero_chunks(mut n: u64) -> impl Iterator<Item = &'static [u8]> {
    static Z: [u8; 65536] = [0; 65536];
    std::iter::from_fn(move || {
        (n > 0).then(|| {
            let k = n.min(Z.len() as u64) as usize;
            n -= k as u64;
            &Z[..k]
        })
    })
}

/// Make the names in `dir` durable (after a rename, a create or an unlink in it).
pub fn sync_folder(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("flush the folder", dir, 0, e))
}
