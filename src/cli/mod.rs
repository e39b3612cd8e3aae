//! Argument parsing, progress bars and error reporting for the `vmdkit` binary.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use vmdkit::copy::PipelineOptions;
use vmdkit::ops::{self, Progress};
use vmdkit::VirtualDisk;

mod args;

use args::*;

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
    fn set_total(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(n);
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    vmdkit::guard::allow_outside_paths(cli.allow_outside_paths);
    match cli.cmd {
        Cmd::Info(a) => return run_info(a),
        Cmd::Map(a) => return run_map(a),
        Cmd::Cat(a) => return run_cat(a),
        Cmd::Export(a) => return run_export(a),
        Cmd::Redo {
            cmd: RedoCmd::Add { disk, style },
        } => {
            use vmdkit::ops::redo::{add, RedoStyle};
            let style = RedoStyle::parse(&style).ok_or_else(|| {
                anyhow::anyhow!("unknown style `{style}` (redo, vmfsSparse, hosted)")
            })?;
            let new = add(&disk, style)?;
            writeln!(stdout.lock(), "{}", new.display())?;
        }
        Cmd::Write(a) => return run_write(a),
        Cmd::Commit(a) => return run_commit(a),
        Cmd::Import(a) => return run_import(a),
        Cmd::Apply(a) => return run_apply(a),
        Cmd::Measure(a) => return run_measure(a),
        Cmd::Create(a) => return run_create(a),
        Cmd::Extend(a) => return run_extend(a),
        Cmd::Geometry(a) => return run_geometry(a),
        Cmd::Rdm {
            cmd:
                RdmCmd::Create {
                    disk,
                    device,
                    physical,
                    adapter,
                    quiet,
                },
        } => {
            let map = vmdkit::ops::rdm::create(&disk, &device, physical, &adapter)?;
            if !quiet {
                writeln!(stdout.lock(), "{}", map.display())?;
            }
        }
        Cmd::Rdm {
            cmd: RdmCmd::Query { disk, json },
        } => {
            let q = vmdkit::ops::rdm::query(&disk)?;
            let mut out = stdout.lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &q)?;
                writeln!(out)?;
            } else {
                q.write_text(&mut out)?;
            }
            if !q.present {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Ls(a) => return run_ls(a),
        Cmd::Check(a) => return run_check(a),
        Cmd::Verify(a) => return run_verify(a),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_info(args: InfoArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let InfoArgs { disk, json, read } = args;
    // A broken chain (a missing parent, say) still shows the layer named, with the
    // reason as a warning, and exits 1, as qemu-img info shows what it can.
    let (chain, code) = match read.open(&disk) {
        Ok(c) => (c, ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<vmdkit::Error>() {
            Some(err) if err.kind() == vmdkit::ErrorKind::Chain => {
                let why = format!("{err}");
                let opts = vmdkit::OpenOptions {
                    ignore_cid: true,
                    ..Default::default()
                };
                match vmdkit::Chain::top_only(&disk, &opts, why.clone()) {
                    Ok(c) => {
                        eprintln!("vmdkit: error: {why} (showing this layer alone)");
                        (c, ExitCode::FAILURE)
                    }
                    Err(_) => return Err(e),
                }
            }
            _ => return Err(e),
        },
    };
    let info = ops::info::info(&chain);
    let mut out = stdout.lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
    } else {
        ops::info::write_info_text(&mut out, &info)?;
    }
    out.flush()?;
    Ok(code)
}

fn run_map(args: MapArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let MapArgs { disk, json, read } = args;
    let chain = read.open(&disk)?;
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        ops::info::write_map_json(&mut out, &chain)?;
    } else {
        ops::info::write_map_text(&mut out, &chain)?;
    }
    out.flush()?;

    Ok(ExitCode::SUCCESS)
}

fn run_cat(args: CatArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let CatArgs {
        disk,
        output,
        force,
        threads,
        quiet,
        read,
    } = args;
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
            ops::cat::cat_to_writer(&chain, Box::new(raw_stdout()?), popts, &bar)?;
        }
    }
    bar.finish();

    Ok(ExitCode::SUCCESS)
}

fn run_export(args: ExportArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let ExportArgs {
        src,
        dst,
        format,
        threads,
        level,
        manifest,
        delta,
        parent_hint,
        force,
        quiet,
        read,
    } = args;
    use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};
    let to_stdout = dst.as_os_str() == "-";
    let format = match format {
            Some(f) => ExportFormat::parse(&f).ok_or_else(|| {
                anyhow::anyhow!("unknown format `{f}` (stream, sparse, split, flat, twoGbMaxExtentFlat, vmfs, raw, or a createType name)")
            })?,
            None if to_stdout || delta => ExportFormat::StreamOptimized,
            None => ExportFormat::TwoGbMaxExtentSparse,
        };
    let chain = read.open(&src)?;
    let opts = ExportOptions {
        format,
        threads,
        level,
        manifest,
        force,
        delta,
        parent_hint,
        ..Default::default()
    };
    let bar = Bar::new(chain.capacity(), quiet);
    let dest = if to_stdout {
        if stdout.is_terminal() && !force {
            anyhow::bail!(
                "refusing to write binary data to a terminal (redirect stdout or use --force)"
            );
        }
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk.vmdk".into());
        let name = if name.ends_with(".vmdk") {
            name
        } else {
            format!("{name}.vmdk")
        };
        Dest::Writer {
            w: Box::new(raw_stdout()?),
            name,
        }
    } else {
        Dest::Path(dst.clone())
    };
    let report = export(&chain, dest, &opts, &bar)
        .with_context(|| format!("exporting `{}`", src.display()))?;
    bar.finish();
    if !quiet {
        let zeroed = if delta {
            format!(", {} zeroed", report.zeroed_grains)
        } else {
            String::new()
        };
        eprintln!(
            "vmdkit: exported {}`{}` ({} disk): {} grains of data{zeroed}, {} written",
            if delta { "the increment of " } else { "" },
            src.display(),
            ops::info::human(chain.capacity()),
            report.grains,
            ops::info::human(report.bytes_out)
        );
    }

    Ok(ExitCode::SUCCESS)
}

fn run_write(args: WriteArgs) -> Result<ExitCode> {
    let WriteArgs {
        disk,
        offset,
        zero,
        input,
        allow_device_write,
        force,
        read,
    } = args;
    use vmdkit::ops::redo::{write_opts, WriteData, WriteOptions};
    let wopts = WriteOptions {
        ignore_cid: read.ignore_cid,
        allow_device_write,
        force,
    };
    let n = match (zero, input) {
        (Some(len), None) => write_opts(&disk, offset, WriteData::Zeros(len), &wopts)?,
        (Some(_), Some(_)) => anyhow::bail!("give either --zero LEN or an input, not both"),
        (None, Some(p)) if p.as_os_str() != "-" => {
            let mut f =
                std::fs::File::open(&p).with_context(|| format!("opening `{}`", p.display()))?;
            write_opts(&disk, offset, WriteData::Reader(&mut f), &wopts)?
        }
        (None, _) => {
            let mut i = std::io::stdin().lock();
            write_opts(&disk, offset, WriteData::Reader(&mut i), &wopts)?
        }
    };
    eprintln!(
        "vmdkit: wrote {n} bytes at offset {offset} into `{}`",
        disk.display()
    );

    Ok(ExitCode::SUCCESS)
}

fn run_commit(args: CommitArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let CommitArgs {
        disk,
        all,
        dry_run,
        force,
        threads,
        quiet,
        allow_device_write,
    } = args;
    use vmdkit::ops::commit::{commit, CommitOptions};
    let bar = Bar::new(0, quiet || dry_run);
    let r = commit(
        &disk,
        &CommitOptions {
            all,
            dry_run,
            force,
            threads,
            allow_device_write,
        },
        &bar,
    )?;
    bar.finish();
    if dry_run {
        r.write_plan(&mut stdout.lock())?;
    } else if !quiet {
        eprintln!("vmdkit: {}", r.summary());
    }

    Ok(ExitCode::SUCCESS)
}

fn run_apply(args: ApplyArgs) -> Result<ExitCode> {
    let ApplyArgs {
        target,
        src,
        raw,
        force,
        allow_device_write,
        json,
        quiet,
    } = args;
    use vmdkit::ops::apply::{apply, ApplyOptions};
    let opts = ApplyOptions {
        force,
        raw,
        allow_device_write,
    };
    let bar = Bar::new(0, quiet);
    let r = if src.as_os_str() == "-" {
        apply(
            &target,
            &mut std::io::stdin().lock(),
            std::path::Path::new("<stdin>"),
            &opts,
            &bar,
        )
    } else {
        vmdkit::io::refuse_special(&src)?;
        let mut f =
            std::fs::File::open(&src).with_context(|| format!("opening `{}`", src.display()))?;
        apply(&target, &mut f, &src, &opts, &bar)
    }
    .with_context(|| format!("applying to `{}`", target.display()))?;
    bar.finish();
    if json {
        print_json(&r)?;
    } else if !quiet {
        eprintln!("vmdkit: {}", r.summary());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_measure(args: MeasureArgs) -> Result<ExitCode> {
    let MeasureArgs {
        disk,
        format,
        delta,
        level,
        exact,
        name,
        threads,
        json,
        quiet,
        read,
    } = args;
    use vmdkit::ops::export::ExportFormat;
    use vmdkit::ops::measure::{measure, MeasureOptions};
    let format = match format {
        Some(f) => ExportFormat::parse(&f).ok_or_else(|| {
            anyhow::anyhow!("unknown format `{f}` (stream, sparse, split, flat, twoGbMaxExtentFlat, vmfs, raw, or a createType name)")
        })?,
        None => ExportFormat::StreamOptimized,
    };
    let chain = read.open(&disk)?;
    let name = name.unwrap_or_else(|| {
        let n = disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk.vmdk".into());
        if n.ends_with(".vmdk") || format == ExportFormat::Raw {
            n
        } else {
            format!("{n}.vmdk")
        }
    });
    let bar = Bar::new(chain.capacity(), quiet);
    let m = measure(
        &chain,
        &MeasureOptions {
            format,
            delta,
            level,
            exact,
            name,
            threads,
        },
        &bar,
    )
    .with_context(|| format!("measuring `{}`", disk.display()))?;
    bar.finish();
    if json {
        print_json(&m)?;
    } else {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        m.write_text(&mut out)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_import(args: ImportArgs) -> Result<ExitCode> {
    let ImportArgs {
        src,
        dst,
        kind,
        adapter,
        force,
        threads,
        quiet,
        read,
    } = args;
    use vmdkit::ops::import::{import_disk, import_stream, DiskType, ImportOptions};
    let kind = DiskType::parse(&kind).ok_or_else(|| anyhow::anyhow!("unknown type `{kind}`"))?;
    let opts = ImportOptions {
        kind,
        adapter,
        force,
        threads,
    };
    let r = if src.as_os_str() == "-" {
        let bar = Bar::new(0, quiet);
        let mut input = std::io::stdin().lock();
        let r = import_stream(&mut input, &dst, &opts, &bar)?;
        bar.finish();
        r
    } else {
        let chain = read.open(&src)?;
        let bar = Bar::new(chain.capacity(), quiet);
        let r = import_disk(&chain, &dst, &opts, &bar)?;
        bar.finish();
        r
    };
    if !quiet {
        eprintln!(
            "vmdkit: imported into {}",
            r.files
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    Ok(ExitCode::SUCCESS)
}

fn run_create(args: CreateArgs) -> Result<ExitCode> {
    let CreateArgs {
        disk,
        size,
        kind,
        adapter,
        force,
        quiet: _,
    } = args;
    use vmdkit::ops::import::{create, parse_size, DiskType, ImportOptions};
    let kind = DiskType::parse(&kind).ok_or_else(|| anyhow::anyhow!("unknown type `{kind}`"))?;
    let size = parse_size(&size)?;
    create(
        &disk,
        size,
        &ImportOptions {
            kind,
            adapter,
            force,
            threads: 0,
        },
        &vmdkit::ops::NoProgress,
    )?;

    Ok(ExitCode::SUCCESS)
}

fn run_extend(args: ExtendArgs) -> Result<ExitCode> {
    let ExtendArgs {
        disk,
        size,
        force,
        quiet: _,
    } = args;
    let size = vmdkit::ops::import::parse_size(&size)?;
    vmdkit::ops::extend::extend(&disk, size, force)?;

    Ok(ExitCode::SUCCESS)
}

fn run_geometry(args: GeometryArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let GeometryArgs { disk, read } = args;
    let chain = read.open(&disk)?;
    let (g, stored) = vmdkit::ops::geometry::of_layer(chain.top());
    writeln!(
        stdout.lock(),
        "Geometry information C/H/S is {}/{}/{}",
        g.cylinders,
        g.heads,
        g.sectors
    )?;
    if !stored {
        eprintln!("vmdkit: (not in the descriptor: computed for its adapter and capacity)");
    }

    Ok(ExitCode::SUCCESS)
}

fn run_ls(args: LsArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let LsArgs {
        dir,
        human_readable,
        mappings,
        json,
    } = args;
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    let entries = vmdkit::ops::ls::list(&dir)?;
    let mut out = stdout.lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
    } else {
        vmdkit::ops::ls::write_text(&mut out, &entries, human_readable, mappings)?;
    }
    for (t, alive) in vmdkit::guard::temporaries(&dir) {
        eprintln!(
            "vmdkit: temporary `{}`: {}",
            t.display(),
            if alive {
                "an output being written by a running vmdkit"
            } else {
                "left by a vmdkit that no longer runs; the next vmdkit writing into this folder removes it"
            }
        );
    }

    Ok(ExitCode::SUCCESS)
}

fn run_check(args: CheckArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let CheckArgs {
        disk,
        repair,
        discard_unreferenced,
        json,
    } = args;
    let copts = vmdkit::ops::check::CheckOptions {
        repair,
        discard_unreferenced,
    };
    let r = match vmdkit::ops::check::check_with(&disk, &copts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmdkit: error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut out = stdout.lock();
    if json {
        r.write_json(&mut out)?;
    } else {
        r.write_text(&mut out)?;
    }
    Ok(ExitCode::from(r.exit_code()))
}

fn run_verify(args: VerifyArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let VerifyArgs {
        disk,
        manifest,
        threads,
        quiet,
        read,
    } = args;
    let chain = read.open(&disk)?;
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading `{}`", manifest.display()))?;
    let m = vmdkit::ops::manifest::Manifest::parse(&text, &manifest)?;
    let bar = Bar::new(chain.capacity(), quiet);
    let popts = PipelineOptions {
        threads,
        ..Default::default()
    };
    let v = vmdkit::ops::manifest::verify(&chain, &m, popts, &bar)?;
    bar.finish();
    v.write_text(&mut stdout.lock())?;
    if v.ok() {
        if !quiet {
            eprintln!(
                "vmdkit: {} matches the manifest ({} blocks, total CRC-32 {:08x})",
                disk.display(),
                m.blocks.len(),
                m.total
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("vmdkit: {} does NOT match the manifest", disk.display());
    Ok(ExitCode::FAILURE)
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
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

pub(super) fn adapter_arg(s: &str) -> std::result::Result<String, String> {
    vmdkit::format::geometry::parse_adapter(s)
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
            vmdkit::guard::remove_registered_temporaries();
            std::process::exit(128 + sig);
        }
    });
}

/// Exit code of a usage error (sysexits' EX_USAGE): not check's "corruption" (2).
const EX_USAGE: u8 = 64;

/// Entry point.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    remove_temporaries_on_signals();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmdkit: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
