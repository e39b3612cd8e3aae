//! Manual pages and shell completions.

use super::*;

/// Write `bytes` to `target` through a temporary name in its folder, synced, renamed into
/// place, the folder synced.
pub(super) fn write_file_durably(target: &Path, bytes: &[u8]) -> Result<()> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing into `{}`", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(target)
        .with_context(|| format!("writing `{}`", target.display()))?;
    sync_folder(dir)
}

/// Make a folder's entries durable (after a rename or a new entry).
pub(super) fn sync_folder(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing the folder `{}`", dir.display()))
}

/// A completion script without the flags hidden from `--help` (clap_complete offers
/// them): bash word lists, zsh specs and fish lines that name them.
pub(super) fn without_hidden_flags(script: &str, cmd: &clap::Command) -> String {
    fn hidden(cmd: &clap::Command, out: &mut Vec<String>) {
        for a in cmd.get_arguments().filter(|a| a.is_hide_set()) {
            if let Some(l) = a.get_long() {
                if !out.iter().any(|x| x == l) {
                    out.push(l.to_string());
                }
            }
        }
        for sub in cmd.get_subcommands() {
            hidden(sub, out);
        }
    }
    let mut longs = Vec::new();
    hidden(cmd, &mut longs);
    script
        .lines()
        .filter(|line| {
            !longs.iter().any(|l| {
                line.trim_start().starts_with(&format!("'--{l}["))
                    || line.contains(&format!(" -l {l} "))
                    || line.ends_with(&format!(" -l {l}"))
            })
        })
        .map(|line| {
            let mut line = line.to_string();
            for l in &longs {
                line = line.replace(&format!(" --{l} "), " ");
                line = line.replace(&format!(" --{l}\""), "\"");
            }
            line + "\n"
        })
        .collect()
}

/// Every manual page, vmdkit.1 first, then one per command and subcommand
/// (vmdkit-export.1, vmdkit-redo-add.1 ...): options and examples from the command
/// definitions, then the exit codes and the safety rules every page shares.
pub(super) fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        let mut text = Vec::new();
        man.render(&mut text)?;
        text.extend_from_slice(MAN_TAIL.as_bytes());
        out.push((man.get_filename(), text));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out)?;
        }
        Ok(())
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    walk(&cmd, &mut pages)?;
    Ok(pages)
}

/// The sections every manual page ends with (roff).
pub(super) const MAN_TAIL: &str = r#".SH "EXIT STATUS"
.TP
0
success (also when the reader of stdout goes away from cat, map, info and the like)
.TP
1
error: the message names the file, the offset or line, and what is wrong; a refused command changed nothing; an export into a pipe whose reader went away (that backup is incomplete)
.TP
2
check: corruption found
.TP
3
check: only leaked space found
.TP
4
verify: the content differs from the manifest
.TP
64
usage error
.TP
128+N
killed by signal N, after removing its temporaries
.SH SAFETY
Inputs are never modified, except the one disk a command exists to change (commit's parent, apply's, write's and extend's disk). A refused command changes nothing. Outputs are written under a temporary name, synced, and renamed into place; existing files are replaced only with \-\-force, never when they are the source or part of its chain. Commands that change a disk lock its files (flock). Extents, parents and state files never reach outside the descriptor's folder unless \-\-allow\-outside\-paths is given.
.PP
commit and apply are crash\-safe: killed or cut by a power loss at any point, running the same command again finishes the job. Their state files (*.vmdkit\-commit, *.vmdkit\-apply) and journals are trusted only to finish the operation they were written for, on the disk they were written for; a disk in the middle of one is marked, and other commands refuse it, naming the command that finishes it.
.SH "SEE ALSO"
vmdkit(1), qemu\-img(1), vmkfstools(1); README.md in the source for the formats and the benchmarks.
"#;
