//! `check` and `check --repair`: every layer of a chain, every finding (not only the
//! first), each with the file, the byte offset and what is wrong.
//!
//! Exit codes follow `qemu-img check`: 0 clean, 1 the check could not finish, 2
//! corruption found, 3 only leaks found. Warnings (the unclean-shutdown flag on tables
//! that check out, a stale allocation hint) do not change the code.
//!
//! `--repair` mends only what has one right answer: a directory entry or grain-table
//! entry that one copy has and the other lost (restored from the intact copy), leaked
//! space (a tail truncated, the rest zeroed), the unclean-shutdown flag once the tables
//! check out, a descriptor extent size that disagrees with its sparse header. Table
//! copies are written and synced before the directory entries that point at them, and
//! the header flag last, so an interrupted repair leaves the file no worse.

mod chain;
mod cowd;
mod sparse;
mod stream;

pub use chain::{check, check_with};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};
use serde::Serialize;

use crate::error::Result;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data may read wrong.
    Corruption,
    /// Space nothing refers to.
    Leak,
    /// Worth knowing; not damage.
    Warning,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// Byte offset in it.
    pub offset: u64,
    /// Severity.
    pub severity: Severity,
    /// What is wrong.
    pub what: String,
    /// Mended by `--repair`.
    pub repaired: bool,
}

/// Result of a check.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct CheckReport {
    /// Every finding.
    pub findings: Vec<Finding>,
    /// Set when the check could not finish, with the reason.
    pub incomplete: Option<String>,
    /// Bytes of leaked space found.
    pub leaked_bytes: u64,
    /// Guest byte ranges `[start, end)` whose data is gone (grains past the end of a
    /// truncated file...); repair cannot bring them back.
    pub lost: Vec<(u64, u64)>,
    /// The check ran with `--repair` (what is left was declined or cannot be mended).
    #[serde(skip)]
    pub repair: bool,
}

/// What `check` may change.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct CheckOptions {
    /// Mend what has one right answer.
    pub repair: bool,
    /// With `repair`: also free leaked grains that hold data (the data is lost).
    pub discard_unreferenced: bool,
    /// With `repair`: write into files the host marks read-only (refused otherwise).
    pub force: bool,
    /// Follow extent and parent names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`](crate::OpenOptions::allow_outside_paths)).
    pub allow_outside_paths: bool,
}

impl CheckReport {
    /// The lost guest ranges, sorted, adjacent and overlapping ones merged.
    pub fn merged_lost(&self) -> Vec<(u64, u64)> {
        let mut v = self.lost.clone();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, b) in v {
            match out.last_mut() {
                Some(l) if a <= l.1 => l.1 = l.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }

    /// The report as JSON: `exit_code`, `findings` (each `file`, `offset`, `severity`,
    /// `what`, `repaired`), `incomplete`, `leaked_bytes`, `lost` (guest byte ranges, each
    /// `start` and `length`).
    pub fn write_json(
        &self,
        file: &std::path::Path,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let v = serde_json::json!({
            "file": file,
            "exit_code": self.exit_code(),
            "findings": self.findings,
            "incomplete": self.incomplete,
            "leaked_bytes": self.leaked_bytes,
            "lost": self
                .merged_lost()
                .into_iter()
                .map(|(a, b)| crate::units::ByteRange::from_ends(a, b))
                .collect::<Vec<_>>(),
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)
    }

    /// The report as text, as `qemu-img check` words it: one line per finding, then the
    /// lost guest data and a summary.
    pub fn write_text(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        // A truncated file fails grain by grain: show the first findings of a file and
        // severity, then count the rest (all of them are in --json).
        const SHOWN: usize = 20;
        let mut shown: Vec<((&std::path::Path, Severity), usize)> = Vec::new();
        for f in &self.findings {
            let key = (f.file.as_path(), f.severity);
            let n = match shown.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    shown.push((key, 1));
                    1
                }
            };
            if n > SHOWN {
                continue;
            }
            let sev = match f.severity {
                Severity::Corruption => "ERROR",
                Severity::Leak => "Leak",
                Severity::Warning => "Warning",
            };
            writeln!(
                out,
                "{sev}: `{}` at {:#x}: {}{}",
                f.file.display(),
                f.offset,
                f.what,
                if f.repaired { " (repaired)" } else { "" }
            )?;
        }
        if let Some(why) = &self.incomplete {
            writeln!(out, "The check could not finish: {why}")?;
        }
        for ((file, sev), n) in &shown {
            if *n > SHOWN {
                writeln!(
                    out,
                    "... and {} more {} findings in `{}` (the JSON report lists all)",
                    n - SHOWN,
                    match sev {
                        Severity::Corruption => "error",
                        Severity::Leak => "leak",
                        Severity::Warning => "warning",
                    },
                    file.display()
                )?;
            }
        }
        let lost = self.merged_lost();
        if !lost.is_empty() {
            let total: u64 = lost.iter().map(|(a, b)| b - a).sum();
            writeln!(
                out,
                "Lost guest data: {total} bytes ({}) in {} range{}; repair cannot bring them back:",
                crate::units::human(total),
                lost.len(),
                if lost.len() == 1 { "" } else { "s" }
            )?;
            for (a, b) in lost.iter().take(SHOWN) {
                writeln!(
                    out,
                    "  {} - {} (bytes {a:#x}-{:#x}, {})",
                    crate::units::human(*a),
                    crate::units::human(*b),
                    b - 1,
                    crate::units::human(b - a)
                )?;
            }
            if lost.len() > SHOWN {
                writeln!(out, "  ... and {} more ranges", lost.len() - SHOWN)?;
            }
        }
        let open_errors = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Corruption && !f.repaired)
            .count();
        match self.exit_code() {
            0 => writeln!(out, "No errors were found on the image."),
            2 => writeln!(
                out,
                "{open_errors} errors were found on the image; data may be corrupted."
            ),
            3 if self.repair => writeln!(
                out,
                "{} bytes of leaked space remain: what repair kept is named above; it is harmless.",
                self.leaked_bytes
            ),
            3 => writeln!(
                out,
                "{} bytes of leaked space were found; this is harmless (a repair reclaims it).",
                self.leaked_bytes
            ),
            _ => Ok(()),
        }
    }

    /// Exit code as `qemu-img check`.
    pub fn exit_code(&self) -> u8 {
        let open = |s: Severity| self.findings.iter().any(|f| f.severity == s && !f.repaired);
        if self.incomplete.is_some() {
            1
        } else if open(Severity::Corruption) {
            2
        } else if open(Severity::Leak) {
            3
        } else {
            0
        }
    }

    fn add(
        &mut self,
        file: &Path,
        offset: u64,
        severity: Severity,
        what: impl Into<String>,
    ) -> usize {
        self.findings.push(Finding {
            file: file.to_path_buf(),
            offset,
            severity,
            what: what.into(),
            repaired: false,
        });
        self.findings.len() - 1
    }
}

pub(super) fn rd32(f: &File, path: &Path, sector: u64, n: u64) -> Result<Vec<u32>> {
    crate::format::tables::read_u32s(f, path, sector, n as usize)
}

pub(super) fn wr32(f: &File, path: &Path, at: u64, v: &[u32]) -> Result<()> {
    let mut b = vec![0u8; v.len() * 4];
    LE::write_u32_into(v, &mut b);
    f.write_all_at(&b, at)
        .map_err(|e| crate::io::write_error(path, at, e))
}
