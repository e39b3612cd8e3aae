//! Error type of the library.
//!
//! Every error names the file it is about and, where there is one, the byte offset
//! (or descriptor line) and what is wrong. The cause of an I/O failure sits in
//! `#[source]`, not in the message, so `anyhow`'s `{:#}` prints it once.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broad classification of errors, stable for callers and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operating-system I/O call failed.
    Io,
    /// A file's bytes contradict its format.
    Corrupt,
    /// A descriptor line could not be parsed or is ambiguous.
    Descriptor,
    /// A parent/child link is broken (missing parent, CID mismatch, loop, depth).
    Chain,
    /// The file is valid but uses something vmdkit does not support.
    Unsupported,
    /// The caller asked for something impossible (bad argument, out of range).
    InvalidInput,
    /// An output already exists (and the caller did not ask to overwrite it).
    AlreadyExists,
    /// Another process holds a lock on a file this command needs.
    Busy,
    /// The command refused to go ahead to keep data safe (a read-only target, a file
    /// others depend on, a device, an increment that does not fit); nothing was changed.
    /// [`Error::overridable_by`] says whether an option lets it go ahead.
    Refused,
    /// The disk is not the kind the command works on (a commit of a disk without a
    /// parent, an apply of a full backup, an RDM query of a plain disk...).
    NotApplicable,
}

/// An option that lets a refused command go ahead: the caller decides how to spell it
/// (the `vmdkit` binary names its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Override {
    /// The command's `force` option: overwrite, or go ahead although others depend on
    /// the file or its identity cannot be checked.
    Force,
    /// Write into a block device (`allow_device_write`).
    AllowDeviceWrite,
    /// Read through a parent whose content ID does not match
    /// ([`OpenOptions::ignore_cid`](crate::OpenOptions::ignore_cid)).
    IgnoreCid,
    /// Add a second delta to a disk that has one (`branch`).
    Branch,
    /// Accept a capacity larger than any VMware product makes (`large`).
    Large,
    /// Follow names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`](crate::OpenOptions::allow_outside_paths)).
    AllowOutsidePaths,
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed.
    #[error("failed to {op} `{}` at offset {offset:#x}", .path.display())]
    Io {
        /// What was being done ("read", "open", "write"...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Byte offset in that file (0 when not meaningful).
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Bytes in a file contradict its format.
    #[error("`{}`: {what} (at byte offset {offset:#x})", .path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// Byte offset of the bad field.
        offset: u64,
        /// What is wrong, with the value and the limit.
        what: String,
    },
    /// A descriptor line is bad.
    #[error("`{}` line {line}: {what}", .path.display())]
    Descriptor {
        /// The descriptor file.
        path: PathBuf,
        /// 1-based line number (0 = the file as a whole).
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A chain link is broken.
    #[error("`{}`: {what}", .path.display())]
    Chain {
        /// The child whose link is broken.
        path: PathBuf,
        /// What is wrong.
        what: String,
        /// The option that reads through anyway, if one does (a content ID mismatch).
        unless: Option<Override>,
    },
    /// Valid but unsupported.
    #[error("`{}`: unsupported: {what}", .path.display())]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// An argument is out of range or contradictory.
    #[error("{0}")]
    InvalidInput(String),
    /// The output exists already.
    #[error("`{}` already exists", .0.display())]
    AlreadyExists(PathBuf),
    /// The disk is not the kind the command works on; nothing was changed.
    #[error("`{}` {what}", .path.display())]
    NotApplicable {
        /// The file concerned.
        path: PathBuf,
        /// What it is and what the command needs, as a predicate ("is a delta; ...").
        what: String,
    },
    /// Refused to keep data safe; nothing was changed.
    #[error("{}", refused_text(.path.as_deref(), .what))]
    Refused {
        /// The file concerned, when there is one.
        path: Option<PathBuf>,
        /// What was refused and why.
        what: String,
        /// The option that lets the command go ahead anyway, if one does.
        unless: Option<Override>,
    },
    /// Another process holds a lock on a file (see `crate::guard`).
    #[error("`{}` is in use by another process (locked); try again when it has finished", .0.display())]
    Busy(PathBuf),
}

/// A refusal's message, naming its file first unless the text names it already.
fn refused_text(path: Option<&Path>, what: &str) -> String {
    match path {
        Some(p) if !what.contains(&format!("`{}`", p.display())) => {
            format!("`{}`: {what}", p.display())
        }
        _ => what.to_string(),
    }
}

impl Error {
    /// The broad kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Descriptor { .. } => ErrorKind::Descriptor,
            Error::Chain { .. } => ErrorKind::Chain,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Refused { .. } => ErrorKind::Refused,
            Error::NotApplicable { .. } => ErrorKind::NotApplicable,
        }
    }

    /// The option that would let the refused command go ahead, if one would.
    pub fn overridable_by(&self) -> Option<Override> {
        match self {
            Error::AlreadyExists(_) => Some(Override::Force),
            Error::Refused { unless, .. } => *unless,
            Error::Chain { unless, .. } => *unless,
            _ => None,
        }
    }

    /// The file the error is about, when it names one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Descriptor { path, .. }
            | Error::Chain { path, .. }
            | Error::Unsupported { path, .. }
            | Error::NotApplicable { path, .. } => Some(path),
            Error::AlreadyExists(p) | Error::Busy(p) => Some(p),
            Error::Refused { path, .. } => path.as_deref(),
            Error::InvalidInput(_) => None,
        }
    }

    /// The byte offset in [`file`](Self::file) the error is about, when it names one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            // An I/O error's offset is 0 when no offset matters (open, stat).
            Error::Io { offset, .. } => Some(*offset).filter(|&o| o != 0),
            Error::Corrupt { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// The I/O error underneath, if this is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether this is a broken pipe on output (the reader went away).
    pub fn is_broken_pipe(&self) -> bool {
        self.io_error()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    }

    pub(crate) fn io(op: &'static str, path: &Path, offset: u64, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn chain(path: &Path, what: impl Into<String>) -> Self {
        Error::Chain {
            path: path.to_path_buf(),
            what: what.into(),
            unless: None,
        }
    }

    /// A refusal about `path` that `unless` overrides.
    pub(crate) fn refused(path: &Path, what: impl Into<String>, unless: Option<Override>) -> Self {
        Error::Refused {
            path: Some(path.to_path_buf()),
            what: what.into(),
            unless,
        }
    }

    /// `path` is not the kind of disk the command works on.
    pub(crate) fn not_applicable(path: &Path, what: impl Into<String>) -> Self {
        Error::NotApplicable {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}
