//! What a program undoes when a signal ends it in the middle of a command.
//!
//! Outputs are written under temporary names (`.NAME.vmdkit-tmp.PID.N`) and renamed
//! into place when complete; a server's overlay is flushed on the way out. A program that
//! ends on SIGINT or SIGTERM (the library installs no handler: that is the program's
//! choice) calls [`interrupted`] from its handler, says what it returns, and exits.

use std::path::{Path, PathBuf};

/// What [`interrupted`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Interrupted {
    /// Temporaries of unfinished outputs that were removed.
    pub removed: usize,
    /// What the interrupted command left and what finishes it (an apply between its
    /// first and last write, a server's overlay), when it left something.
    pub note: Option<String>,
}

/// Finish what must be finished (flush a served overlay) and remove the temporaries of
/// unfinished outputs. Safe to call from any thread, once.
pub fn interrupted() -> Interrupted {
    crate::guard::run_shutdown_hook();
    Interrupted {
        removed: crate::guard::remove_registered_temporaries(),
        note: crate::guard::interrupt_note(),
    }
}

/// Every vmdkit temporary in `dir`, with whether its writer still holds it (a vmdkit
/// writing now, on this host or another sharing the folder). The others are removed by
/// the next command that writes into `dir`.
pub fn temporaries(dir: &Path) -> Vec<(PathBuf, bool)> {
    crate::guard::temporaries(dir)
}

/// Say what an interruption from now on leaves (returned by [`interrupted`]): a program
/// running a long command of its own sets it before it starts.
pub fn set_interrupt_note(note: impl Into<String>) {
    crate::guard::set_interrupt_note(Some(note.into()));
}

/// Remove the temporaries in `dir` that no writer holds (what the next command writing
/// into `dir` does first).
pub fn sweep(dir: &Path) {
    crate::guard::sweep_stale_temporaries(dir);
}
