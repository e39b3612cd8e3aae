//! Argument parsing, progress bars and error reporting for the `vmdkit` binary.
//!
//! Every command takes the global `--json` (its result as one JSON object on stdout, on
//! stderr when stdout carries data) and `-q` (no progress bar, no summary).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};

use vmdkit::ops;
use vmdkit::PipelineOptions;
use vmdkit::Progress;
use vmdkit::VirtualDisk;

/// A line on stderr that never panics: with stderr on a full disk or a closed pipe the
/// message is lost, and the exit code still says what happened.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod args;
mod copying;
mod disks;
mod errors;
mod manual;
mod vmkfstools;

use args::*;
use copying::*;
use disks::*;
use errors::*;
use manual::*;

/// Output settings every command shares.
#[derive(Clone, Copy)]
struct Ui {
    json: bool,
    quiet: bool,
}

impl Ui {
    /// A one-line summary on stderr unless quiet or printing JSON.
    fn say(&self, msg: impl std::fmt::Display) {
        if !self.quiet && !self.json {
            note!("vmdkit: {msg}");
        }
    }

    /// The command's result as JSON: on stdout, or on stderr when stdout carries data.
    fn result<T: serde::Serialize>(&self, v: &T, stdout_busy: bool) -> Result<()> {
        if !self.json {
            return Ok(());
        }
        if stdout_busy {
            let mut e = std::io::stderr().lock();
            serde_json::to_writer_pretty(&mut e, v)?;
            writeln!(e)?;
            return Ok(());
        }
        print_json(v)
    }
}

/// Progress bar on stderr, only when stderr is a terminal and not quiet. It counts the
/// bytes that hold data (holes pass without moving it), so the ETA is the reading's.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    /// A bar labelled `label` for `total` bytes of data.
    fn new(label: &str, total: u64, ui: Ui) -> Bar {
        if ui.quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>9} {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        pb.set_prefix(label.to_string());
        Bar(Some(pb))
    }

    /// A bar for reading `disk`: its total is the data the map names (metadata only).
    fn for_disk(label: &str, disk: &dyn VirtualDisk, ui: Ui) -> Bar {
        if ui.quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        Bar::new(label, data_bytes(disk), ui)
    }

    /// A bar without a total (a pipe): bytes and rate.
    fn open_ended(label: &str, ui: Ui) -> Bar {
        if ui.quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>9} {spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .expect("valid template"),
        );
        pb.set_prefix(label.to_string());
        Bar(Some(pb))
    }

    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// Bytes of `disk` that hold (or may hold) data, from its map.
fn data_bytes(disk: &dyn VirtualDisk) -> u64 {
    let cap = disk.capacity();
    let mut total = 0;
    let mut pos = 0;
    while pos < cap {
        let end = (pos + (1 << 40)).min(cap);
        match disk.map(pos..end) {
            Ok(runs) => {
                total += runs
                    .iter()
                    .filter(|r| !r.alloc.reads_as_zero())
                    .map(|r| r.len)
                    .sum::<u64>()
            }
            Err(_) => return cap,
        }
        pos = end;
    }
    total
}

impl Progress for Bar {
    fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }
    fn set_total(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(n);
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    args::set_outside_paths(cli.allow_outside_paths);
    let ui = Ui {
        json: cli.json,
        quiet: cli.quiet,
    };
    match cli.cmd {
        Cmd::Info(a) => run_info(a, ui),
        Cmd::Map(a) => run_map(a, ui),
        Cmd::Cat(a) => run_cat(a, ui),
        Cmd::Export(a) => run_export(a, ui),
        Cmd::Redo {
            cmd:
                RedoCmd::Add {
                    disk,
                    style,
                    branch,
                },
        } => {
            use vmdkit::ops::redo::{add_opts, AddOptions, RedoStyle};
            let style = style
                .map(|s| {
                    RedoStyle::parse(&s).ok_or_else(|| {
                        anyhow::anyhow!("unknown style `{s}` (redo, vmfsSparse, hosted)")
                    })
                })
                .transpose()?;
            let mut opts = AddOptions::default();
            opts.style = style;
            opts.branch = branch;
            opts.allow_outside_paths = args::outside_paths();
            let new = add_opts(&disk, &opts)?;
            if ui.json {
                ui.result(&serde_json::json!({"file": new, "parent": disk}), false)?;
            } else {
                writeln!(std::io::stdout().lock(), "{}", new.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Write(a) => run_write(a, ui),
        Cmd::Commit(a) => run_commit(a, ui),
        Cmd::Import(a) => run_import(a, ui),
        Cmd::Apply(a) => run_apply(a, ui),
        Cmd::Measure(a) => run_measure(a, ui),
        Cmd::Create(a) => run_create(a, ui),
        Cmd::Extend(a) => run_extend(a, ui),
        Cmd::Geometry(a) => run_geometry(a, ui),
        Cmd::Serve(a) => run_serve(a, ui),
        Cmd::Rdm {
            cmd:
                RdmCmd::Create {
                    disk,
                    device,
                    physical,
                    adapter,
                },
        } => {
            let map = vmdkit::ops::rdm::create(&disk, &device, physical, &adapter)?;
            if ui.json {
                ui.result(
                    &serde_json::json!({"file": disk, "mapping": map, "device": device, "physical": physical}),
                    false,
                )?;
            } else if !ui.quiet {
                writeln!(std::io::stdout().lock(), "{}", map.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rdm {
            cmd: RdmCmd::Query { disk },
        } => {
            let q = vmdkit::ops::rdm::query(&disk)?;
            if ui.json {
                print_json(&q)?;
            } else {
                q.write_text(&mut std::io::stdout().lock())?;
            }
            Ok(if q.present {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Ls(a) => run_ls(a, ui),
        Cmd::Check(a) => run_check(a, ui),
        Cmd::Verify(a) => run_verify(a, ui),
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            // Into memory first: clap_complete panics on a failed write.
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vmdkit", &mut text);
            let text = without_hidden_flags(&String::from_utf8_lossy(&text), &cmd);
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            let pages = man_pages()?;
            match dir {
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&pages[0].1)?;
                    out.flush()?;
                }
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating `{}`", dir.display()))?;
                    for (name, text) in &pages {
                        write_file_durably(&dir.join(name), text)?;
                    }
                    ui.say(format_args!(
                        "wrote {} manual pages into `{}` ({})",
                        pages.len(),
                        dir.display(),
                        pages
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vmkfstools { args } => vmkfstools::run(&args, ui),
    }
}

/// Progress of indexing a stream written without a grain directory (its records are
/// read once when it is opened): a bar on a terminal, nothing otherwise.
fn index_progress(done: u64, total: u64) {
    use std::io::IsTerminal;
    static BAR: std::sync::OnceLock<Option<indicatif::ProgressBar>> = std::sync::OnceLock::new();
    let bar = BAR.get_or_init(|| {
        std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_message("indexing the stream (it has no grain directory)");
            b
        })
    });
    if let Some(b) = bar {
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
        }
    }
}

pub(super) fn adapter_arg(s: &str) -> std::result::Result<String, String> {
    vmdkit::ops::geometry::parse_adapter(s)
        .map(str::to_string)
        .map_err(|e| e.to_string())
}

/// On SIGINT, SIGTERM or SIGHUP: remove the temporaries of unfinished outputs, then exit
/// with 128 + the signal's number, as a shell reports a death by signal. (A commit killed
/// this way is finished by running it again; see `ops::commit`.)
fn remove_temporaries_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let done = vmdkit::cleanup::interrupted();
            // One line saying what was left as it was.
            match done.note {
                Some(note) => note!("vmdkit: interrupted: {note}"),
                None if done.removed > 0 => note!(
                    "vmdkit: interrupted: the unfinished output was removed ({} temporary file{}); the inputs are as they were",
                    done.removed,
                    if done.removed == 1 { "" } else { "s" }
                ),
                None => note!("vmdkit: interrupted"),
            }
            std::process::exit(128 + sig);
        }
    });
}

/// Run a parsed command line to its exit code (errors printed; a closed pipe is quiet).
fn finish(cli: Cli) -> ExitCode {
    remove_temporaries_on_signals();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if json => {
            note!("{}", error_json(&e));
            ExitCode::FAILURE
        }
        Err(e) => {
            note!("vmdkit: error: {}", with_stdin_hint(&describe(&e)));
            ExitCode::FAILURE
        }
    }
}

/// Entry point. Invoked as `vmkfstools` (through a link), it is the vmkfstools front end.
pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `vmdkit [GLOBAL FLAGS] vmkfstools ARGS`: vmkfstools' own flags (its -q is "query
    // RDM", its -h "human readable") go to the front end untouched, not through clap.
    let mut ui = Ui {
        json: false,
        quiet: false,
    };
    let mut front = None;
    if invoked_as == "vmkfstools" {
        front = Some(1);
    } else {
        for (i, a) in argv.iter().enumerate().skip(1) {
            match a.to_str() {
                Some("vmkfstools") => {
                    front = Some(i + 1);
                    break;
                }
                Some("--json") => ui.json = true,
                Some("-q" | "--quiet") => ui.quiet = true,
                Some("--allow-outside-paths") => args::set_outside_paths(true),
                _ => break,
            }
        }
    }
    if let Some(first) = front {
        let args: Vec<String> = argv[first..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        remove_temporaries_on_signals();
        return match vmkfstools::run(&args, ui) {
            Ok(code) => code,
            Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
            Err(e) => {
                note!("vmkfstools: error: {}", describe(&e));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(hint) = qemu_habit(&argv) {
        note!("vmdkit: error: {hint}");
        return ExitCode::from(EX_USAGE);
    }
    let json = argv.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e)
            if json
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) =>
        {
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            note!(
                "{}",
                serde_json::json!({"error": {"kind": "usage", "message": first, "file": null, "offset": null}})
            );
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => return clap_exit(&e),
    };
    finish(cli)
}

/// One JSON object on stdout (a command's result), then a newline.
fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Parse `args` as a vmdkit command line (the vmkfstools front end builds them) and run
/// it; usage errors exit 64.
fn run_args(args: &[String], ui: Ui) -> Result<ExitCode> {
    let mut argv = vec!["vmdkit".to_string()];
    if ui.quiet {
        argv.push("-q".into());
    }
    if ui.json {
        argv.push("--json".into());
    }
    if args::outside_paths() {
        argv.push("--allow-outside-paths".into());
    }
    argv.extend(args.iter().cloned());
    match Cli::try_parse_from(&argv) {
        Ok(cli) => run(cli),
        Err(e) => Ok(clap_exit(&e)),
    }
}
