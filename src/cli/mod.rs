//! Argument parsing, progress bars and error reporting for the `vmdkit` binary.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use vmdkit::io::SourceMode;
use vmdkit::ops::{self, Progress};
use vmdkit::pipeline::PipelineOptions;
use vmdkit::{Chain, OpenOptions, VirtualDisk};

#[derive(Parser)]
#[command(
    name = "vmdkit",
    version,
    about = "VMware virtual disk (VMDK) toolkit: inspect, export, import, commit"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Copy)]
struct ReadArgs {
    /// Read through a parent whose CID does not match the child's parentCID (warns).
    #[arg(long)]
    ignore_cid: bool,
    /// Use positional reads instead of memory maps.
    #[arg(long, hide = true)]
    no_mmap: bool,
}

impl ReadArgs {
    fn open(&self, path: &Path) -> Result<Chain> {
        let opts = OpenOptions {
            ignore_cid: self.ignore_cid,
            mode: if self.no_mmap {
                SourceMode::Pread
            } else {
                SourceMode::Mmap
            },
        };
        // Library errors name the file (and offset) already.
        let chain = Chain::open(path, &opts)?;
        for w in &chain.warnings {
            eprintln!("vmdkit: warning: {w}");
        }
        Ok(chain)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a disk and its chain: type, capacity, extents, CIDs, layers.
    Info {
        /// The disk (descriptor or sparse file); the top of a chain.
        disk: PathBuf,
        /// One JSON object with stable keys.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Allocation runs of the disk through its chain (metadata only).
    Map {
        /// The disk.
        disk: PathBuf,
        /// The same records as `qemu-img map --output=json`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// The disk's logical content as raw bytes (chain flattened).
    Cat {
        /// The disk.
        disk: PathBuf,
        /// Write to FILE (zero ranges become holes) instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Overwrite FILE if it exists; write binary data to a terminal.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Progress bar on stderr, only when stderr is a terminal and not quiet.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(total: u64, quiet: bool) -> Bar {
        if quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        Bar(Some(pb))
    }
    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    match cli.cmd {
        Cmd::Info { disk, json, read } => {
            let chain = read.open(&disk)?;
            let info = ops::info::info(&chain);
            let mut out = stdout.lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &info)?;
                writeln!(out)?;
            } else {
                ops::info::write_info_text(&mut out, &info)?;
            }
            out.flush()?;
        }
        Cmd::Map { disk, json, read } => {
            let chain = read.open(&disk)?;
            let mut out = std::io::BufWriter::new(stdout.lock());
            if json {
                ops::info::write_map_json(&mut out, &chain)?;
            } else {
                ops::info::write_map_text(&mut out, &chain)?;
            }
            out.flush()?;
        }
        Cmd::Cat {
            disk,
            output,
            force,
            threads,
            quiet,
            read,
        } => {
            let chain = read.open(&disk)?;
            let popts = PipelineOptions {
                threads,
                ..Default::default()
            };
            let bar = Bar::new(chain.capacity(), quiet);
            match output {
                Some(p) if p.as_os_str() != "-" => {
                    ops::cat::cat_to_file(&chain, &p, force, popts, &bar)
                        .with_context(|| format!("writing `{}`", p.display()))?;
                }
                _ => {
                    if stdout.is_terminal() && !force {
                        anyhow::bail!("refusing to write binary data to a terminal (redirect stdout, use -o FILE, or --force)");
                    }
                    let mut out = raw_stdout()?;
                    ops::cat::cat_to_writer(&chain, &mut out, popts, &bar)?;
                }
            }
            bar.finish();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Standard output as an unbuffered file (big sequential writes, no line buffering).
fn raw_stdout() -> Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    Ok(std::fs::File::from(fd))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<vmdkit::Error>()
                .is_some_and(|v| v.is_broken_pipe())
    })
}

/// Entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmdkit: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
