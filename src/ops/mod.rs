//! The commands: info/map, cat, export (and increments), apply, measure, import, create, extend, geometry, redo add and
//! write, commit, check, verify (manifests), rdm, ls. Each depends on the copy engine
//! ([`crate::copy`]) and the formats, never on another command except through the small
//! shared modules ([`crate::output`], [`crate::resolve`], [`crate::guard`]).

pub mod apply;
pub mod cat;
pub mod check;
pub mod commit;
pub mod export;
pub mod extend;
pub mod geometry;
pub mod import;
pub mod info;
pub mod ls;
pub mod manifest;
pub mod measure;
pub mod rdm;
pub mod redo;

pub use crate::copy::{NoProgress, Progress};

/// Bytes in binary units, for people.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
