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
mod vmkfstools;

use args::*;

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

/// Standard input as a reader another thread may own (the pipe is read on a thread of
/// its own while this one writes), buffered in 1 MiB reads.
fn stdin_reader() -> Result<std::io::BufReader<std::fs::File>> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("reading standard input")?;
    Ok(std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::from(fd),
    ))
}

fn run_info(args: InfoArgs, ui: Ui) -> Result<ExitCode> {
    let InfoArgs { disk, read } = args;
    // A broken chain (a missing parent, say) still shows the layer named, with the
    // reason as a warning, and exits 1, as qemu-img info shows what it can.
    // An increment is described on its own: it needs no parent to say what it is.
    let increment = vmdkit::Layer::open(&disk, &{
        let mut o = vmdkit::OpenOptions::default();
        o.ignore_cid = true;
        o
    })
    .ok()
    .filter(|l| l.is_increment());
    let (chain, code) = match increment {
        Some(l) => (vmdkit::Chain::from_layer(l), ExitCode::SUCCESS),
        None => match read.open(&disk) {
            Ok(c) => (c, ExitCode::SUCCESS),
            Err(e) => match e.downcast_ref::<vmdkit::Error>() {
                Some(err) if err.kind() == vmdkit::ErrorKind::Chain => {
                    let why = format!("{err}");
                    let opts = {
                        let mut o = vmdkit::OpenOptions::default();
                        o.ignore_cid = true;
                        o
                    };
                    match vmdkit::Chain::top_only(&disk, &opts, why.clone()) {
                        Ok(c) => {
                            note!("vmdkit: error: {why} (showing this layer alone)");
                            (c, ExitCode::FAILURE)
                        }
                        Err(_) => return Err(e),
                    }
                }
                _ => return Err(e),
            },
        },
    };
    let info = ops::info::info(&chain);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if ui.json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
    } else {
        ops::info::write_info_text(&mut out, &info)?;
    }
    out.flush()?;
    Ok(code)
}

fn run_map(args: MapArgs, ui: Ui) -> Result<ExitCode> {
    let MapArgs { disk, read } = args;
    let chain = read.open(&disk)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if ui.json {
        ops::info::write_map_json(&mut out, &chain)?;
    } else {
        ops::info::write_map_text(&mut out, &chain)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn run_cat(args: CatArgs, ui: Ui) -> Result<ExitCode> {
    let CatArgs {
        disk,
        output,
        force,
        threads,
        read,
    } = args;
    let chain = read.open(&disk)?;
    let popts = {
        let mut o = PipelineOptions::default();
        o.threads = threads;
        o
    };
    let bar = Bar::for_disk("cat", &chain, ui);
    let to_stdout = match output {
        Some(p) if p.as_os_str() != "-" => {
            ops::cat::cat_to_file(&chain, &p, force, popts, &bar)
                .with_context(|| format!("writing `{}`", p.display()))?;
            bar.finish();
            ui.result(
                &serde_json::json!({"file": p, "files": [&p], "bytes": chain.capacity()}),
                false,
            )?;
            false
        }
        _ => {
            if std::io::stdout().is_terminal() && !force {
                anyhow::bail!("refusing to write binary data to a terminal (redirect stdout, use -o FILE, or --force)");
            }
            ops::cat::cat_to_writer(&chain, Box::new(raw_stdout()?), popts, &bar)?;
            bar.finish();
            true
        }
    };
    if to_stdout {
        ui.result(&serde_json::json!({"bytes": chain.capacity()}), true)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `dst` as written: an existing folder means "inside it, under `name`".
fn into_folder(dst: &Path, name: Option<&std::ffi::OsStr>) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // A trailing `/` names a folder: made here (one level; its parent must exist), so an
    // output never lands beside it under the folder's name.
    if dst.as_os_str().as_bytes().ends_with(b"/") && !dst.is_dir() {
        let parent = dst.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            anyhow::bail!(
                "`{}` names a folder whose parent `{}` does not exist; nothing was written",
                dst.display(),
                parent.unwrap_or(Path::new(".")).display()
            );
        }
        std::fs::create_dir(dst)
            .with_context(|| format!("creating the folder `{}`", dst.display()))?;
        let parent = dst.components().collect::<PathBuf>();
        if let Some(p) = parent.parent() {
            let _ = sync_folder(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            });
        }
    }
    if dst.as_os_str() != "-" && dst.is_dir() {
        let name = name.ok_or_else(|| {
            anyhow::anyhow!(
                "`{}` is a folder: give the output's file name in it",
                dst.display()
            )
        })?;
        return Ok(dst.join(name));
    }
    Ok(dst.to_path_buf())
}

/// The name recorded inside an output sent to stdout (descriptor extent lines, tar
/// member names).
fn stdout_name(src: &Path) -> String {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk.vmdk".into());
    if name.ends_with(".vmdk") {
        name
    } else {
        format!("{name}.vmdk")
    }
}

fn level_of(level: Option<u32>, stream: bool) -> Result<u32> {
    let l = level.unwrap_or(6);
    if l > 9 {
        anyhow::bail!("--level {l}: the compression level must be 0 to 9");
    }
    if level.is_some() && !stream {
        note!("vmdkit: warning: --level applies to streamOptimized output only; ignored");
    }
    Ok(l)
}

/// Export `chain` (named `src`) to `dst` or stdout: the work of `export`, and of `import`
/// onto `-`.
#[allow(clippy::too_many_arguments)]
fn export_to(
    chain: &vmdkit::Chain,
    src: &Path,
    dst: &Path,
    kind: vmdkit::DiskType,
    opts: vmdkit::ops::export::ExportOptions,
    force: bool,
    ui: Ui,
    label: &str,
) -> Result<vmdkit::ops::export::ExportReport> {
    use vmdkit::ops::export::{export, Dest};
    let to_stdout = dst.as_os_str() == "-";
    let (format, prealloc) = kind.format();
    let opts = {
        let mut o = opts;
        o.format = format;
        o.prealloc = prealloc;
        o.checksum = ui.json;
        o
    };
    let bar = if opts.delta {
        Bar::open_ended(label, ui)
    } else {
        Bar::for_disk(label, chain, ui)
    };
    let dest = if to_stdout {
        if std::io::stdout().is_terminal() && !force {
            anyhow::bail!(
                "refusing to write binary data to a terminal (redirect stdout or use --force)"
            );
        }
        Dest::Writer {
            w: Box::new(raw_stdout()?),
            name: stdout_name(src),
        }
    } else {
        Dest::Path(into_folder(dst, src.file_name())?)
    };
    let report = export(chain, dest, &opts, &bar)
        .with_context(|| format!("exporting `{}`", src.display()))?;
    bar.finish();
    Ok(report)
}

fn report_json(r: &vmdkit::ops::export::ExportReport, file: &Path) -> serde_json::Value {
    serde_json::json!({
        "file": file,
        "files": r.files,
        "bytes": r.bytes_out,
        "grains": r.grains,
        "zeroed_grains": r.zeroed_grains,
        "crc32": r.crc32.map(|c| format!("{c:08x}")),
    })
}

fn run_export(args: ExportArgs, ui: Ui) -> Result<ExitCode> {
    let ExportArgs {
        src,
        dst,
        kind,
        threads,
        level,
        manifest,
        delta,
        parent_hint,
        force,
        read,
    } = args;
    use vmdkit::ops::export::ExportOptions;
    use vmdkit::DiskType;
    let to_stdout = dst.as_os_str() == "-";
    let kind = match kind {
        Some(k) => DiskType::parse_or_explain(&k)?,
        None if to_stdout || delta => DiskType::StreamOptimized,
        None => DiskType::TwoGbMaxExtentSparse,
    };
    let level = level_of(level, kind == DiskType::StreamOptimized)?;
    let chain = read.open(&src)?;
    let opts = {
        let mut o = ExportOptions::default();
        o.threads = threads;
        o.level = level;
        o.manifest = manifest;
        o.force = force;
        o.delta = delta;
        o.parent_hint = parent_hint;
        o
    };
    let label = if delta { "increment" } else { "export" };
    let report = match export_to(&chain, &src, &dst, kind, opts, force, ui, label) {
        Ok(r) => r,
        // A backup into a pipe whose reader went away (mbuffer out of space, a tape
        // error, a dropped ssh) is a failed backup, not a quiet `cat | head`.
        Err(e) if to_stdout && is_broken_pipe(&e) => {
            anyhow::bail!(
                "the reader of standard output closed the pipe{}: the {} of `{}` is INCOMPLETE and unusable; \
                 nothing after that point was written",
                bytes_through(&e)
                    .map(|n| format!(" after {n} bytes ({}) had been written into it", ops::human(n)))
                    .unwrap_or_default(),
                if delta { "increment" } else { "backup stream" },
                src.display()
            )
        }
        Err(e) => return Err(e),
    };
    ui.say(format_args!(
        "exported {}`{}` ({} disk): {} grains of data{}, {} written",
        if delta { "the increment of " } else { "" },
        src.display(),
        ops::human(chain.capacity()),
        report.grains,
        if delta {
            format!(", {} zeroed", report.zeroed_grains)
        } else {
            String::new()
        },
        ops::human(report.bytes_out)
    ));
    ui.result(&report_json(&report, &dst), to_stdout)?;
    Ok(ExitCode::SUCCESS)
}

fn run_write(args: WriteArgs, ui: Ui) -> Result<ExitCode> {
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
    use vmdkit::parse_size;
    let offset = parse_size(&offset)?;
    let wopts = {
        let mut o = WriteOptions::default();
        o.allow_outside_paths = args::outside_paths();
        o.ignore_cid = read.ignore_cid;
        o.allow_device_write = allow_device_write;
        o.force = force;
        o
    };
    let n = match (zero, input) {
        (Some(len), None) => {
            write_opts(&disk, offset, WriteData::Zeros(parse_size(&len)?), &wopts)?
        }
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
    ui.say(format_args!(
        "wrote {n} bytes at offset {offset} into `{}`",
        disk.display()
    ));
    ui.result(
        &serde_json::json!({"file": disk, "start": offset, "length": n}),
        false,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn run_commit(args: CommitArgs, ui: Ui) -> Result<ExitCode> {
    let CommitArgs {
        disk,
        all,
        dry_run,
        force,
        threads,
        allow_device_write,
    } = args;
    use vmdkit::ops::commit::{commit, CommitOptions};
    let bar = Bar::new(
        "commit",
        0,
        Ui {
            quiet: ui.quiet || dry_run,
            ..ui
        },
    );
    let r = commit(
        &disk,
        &{
            let mut o = CommitOptions::default();
            o.allow_outside_paths = args::outside_paths();
            o.all = all;
            o.dry_run = dry_run;
            o.force = force;
            o.threads = threads;
            o.allow_device_write = allow_device_write;
            o
        },
        &bar,
    )?;
    bar.finish();
    if ui.json {
        print_json(&r)?;
    } else if dry_run {
        r.write_plan(&mut std::io::stdout().lock())?;
    } else {
        ui.say(r.summary());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_apply(args: ApplyArgs, ui: Ui) -> Result<ExitCode> {
    let ApplyArgs {
        target,
        src,
        raw,
        force,
        allow_device_write,
    } = args;
    use vmdkit::ops::apply::{apply, ApplyOptions};
    let opts = {
        let mut o = ApplyOptions::default();
        o.allow_outside_paths = args::outside_paths();
        o.force = force;
        o.raw = raw;
        o.allow_device_write = allow_device_write;
        o
    };
    let bar = Bar::open_ended("apply", ui);
    let r = if src.as_os_str() == "-" {
        apply(
            &target,
            &mut std::io::stdin().lock(),
            Path::new("<stdin>"),
            &opts,
            &bar,
        )
    } else {
        vmdkit::ops::apply::apply_file(&target, &src, &opts, &bar)
    }
    .with_context(|| format!("applying to `{}`", target.display()))?;
    bar.finish();
    ui.say(r.summary());
    ui.result(&r, false)?;
    Ok(ExitCode::SUCCESS)
}

fn run_measure(args: MeasureArgs, ui: Ui) -> Result<ExitCode> {
    let MeasureArgs {
        disk,
        kind,
        delta,
        level,
        exact,
        name,
        threads,
        read,
    } = args;
    use vmdkit::ops::export::ExportFormat;
    use vmdkit::ops::measure::{measure, MeasureOptions};
    use vmdkit::DiskType;
    let kind = match kind {
        Some(k) => DiskType::parse_or_explain(&k)?,
        None => DiskType::StreamOptimized,
    };
    let (format, prealloc) = kind.format();
    let level = level_of(level, format == ExportFormat::StreamOptimized)?;
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
    let bar = Bar::for_disk("measure", &chain, ui);
    let m = measure(
        &chain,
        &{
            let mut o = MeasureOptions::default();
            o.format = format;
            o.delta = delta;
            o.level = level;
            o.exact = exact;
            o.name = name;
            o.threads = threads;
            o.thick = prealloc != vmdkit::ops::export::Prealloc::Thin;
            o
        },
        &bar,
    )
    .with_context(|| format!("measuring `{}`", disk.display()))?;
    bar.finish();
    if ui.json {
        print_json(&m)?;
    } else {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        m.write_text(&mut out)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_import(args: ImportArgs, ui: Ui) -> Result<ExitCode> {
    let ImportArgs {
        src,
        dst,
        kind,
        size,
        adapter,
        force,
        threads,
        large,
        read,
    } = args;
    use vmdkit::ops::import::{import_disk, import_stream, ImportOptions};
    use vmdkit::DiskType;
    let to_stdout = dst.as_os_str() == "-";
    let kind = match kind {
        Some(k) => DiskType::parse_or_explain(&k)?,
        None if to_stdout => DiskType::StreamOptimized,
        None => DiskType::Thin,
    };
    let from_stdin = src.as_os_str() == "-";
    let raw = read.raw()?;
    let raw_size = match (&size, raw, from_stdin) {
        (Some(s), true, true) => Some(vmdkit::parse_size(s)?),
        (None, true, true) => anyhow::bail!(
            "raw input on stdin needs --size (a pipe cannot tell how large the disk is)"
        ),
        (Some(_), _, _) => anyhow::bail!("--size is for raw input on stdin (--from raw -)"),
        _ => None,
    };
    let r = if to_stdout {
        // Import onto stdout: the same as exporting the source as a stream (or tar).
        if from_stdin {
            anyhow::bail!("import from stdin to stdout: nothing to convert; use `cat`");
        }
        if adapter.is_some() {
            anyhow::bail!("--adapter with `-` as the destination: export to a file instead");
        }
        let chain = read.open(&src)?;
        let opts = {
            let mut o = vmdkit::ops::export::ExportOptions::default();
            o.threads = threads;
            o.force = force;
            o
        };
        export_to(&chain, &src, &dst, kind, opts, force, ui, "import")?
    } else {
        let opts = {
            let mut o = ImportOptions::default();
            o.kind = kind;
            o.adapter = adapter;
            o.force = force;
            o.threads = threads;
            o.large = large;
            o
        };
        if from_stdin {
            let dst = into_folder(&dst, None)?;
            let bar = Bar::open_ended("import", ui);
            let mut input = stdin_reader()?;
            let r = import_stream(&mut input, raw_size, &dst, &opts, &bar)?;
            bar.finish();
            r
        } else {
            let chain = read.open(&src)?;
            let dst = into_folder(&dst, src.file_name())?;
            let bar = Bar::for_disk("import", &chain, ui);
            let r = import_disk(&chain, &dst, &opts, &bar)?;
            bar.finish();
            r
        }
    };
    ui.say(format_args!(
        "imported into {}",
        if r.files.is_empty() {
            "stdout".to_string()
        } else {
            r.files
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    ui.result(&report_json(&r, &dst), to_stdout)?;
    Ok(ExitCode::SUCCESS)
}

fn run_create(args: CreateArgs, ui: Ui) -> Result<ExitCode> {
    let CreateArgs {
        disk,
        size,
        kind,
        adapter,
        force,
        large,
    } = args;
    use vmdkit::ops::import::{create, ImportOptions};
    use vmdkit::DiskType;
    let kind_name = kind.clone();
    let kind = DiskType::parse_or_explain(&kind)?;
    let size = vmdkit::parse_size(&size)?;
    let adapter_given = adapter.is_some();
    let r = create(
        &disk,
        size,
        &{
            let mut o = ImportOptions::default();
            o.kind = kind;
            o.adapter = adapter;
            o.force = force;
            o.threads = 0;
            o.large = large;
            o
        },
        &vmdkit::NoProgress,
    )?;
    ui.say(format_args!(
        "created `{}`: {} {} disk ({}){}",
        disk.display(),
        ops::human(size),
        kind_name,
        r.files
            .iter()
            .map(|f| format!("`{}`", f.display()))
            .collect::<Vec<_>>()
            .join(", "),
        if adapter_given {
            ""
        } else {
            ", adapter lsilogic"
        }
    ));
    ui.result(
        &serde_json::json!({"file": disk, "files": r.files, "capacity": size}),
        false,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn run_extend(args: ExtendArgs, ui: Ui) -> Result<ExitCode> {
    let ExtendArgs {
        disk,
        size,
        force,
        large,
    } = args;
    use vmdkit::ops::extend::{extend, ExtendOptions, NewSize};
    let size = match vmdkit::parse_new_size(&size)? {
        (n, true) => NewSize::By(n),
        (n, false) => NewSize::To(n),
    };
    let mut opts = ExtendOptions::default();
    opts.force = force;
    opts.large = large;
    opts.allow_outside_paths = args::outside_paths();
    let (old, new) = extend(&disk, size, &opts)?;
    ui.say(format_args!(
        "extended `{}` from {} to {}",
        disk.display(),
        ops::human(old),
        ops::human(new)
    ));
    ui.result(
        &serde_json::json!({"file": disk, "old_capacity": old, "capacity": new}),
        false,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn run_geometry(args: GeometryArgs, ui: Ui) -> Result<ExitCode> {
    let GeometryArgs { disk, read } = args;
    let chain = read.open(&disk)?;
    let (g, stored) = vmdkit::ops::geometry::of_layer(chain.top());
    if ui.json {
        print_json(&serde_json::json!({
            "file": disk,
            "cylinders": g.cylinders,
            "heads": g.heads,
            "sectors": g.sectors,
            "stored": stored,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        std::io::stdout().lock(),
        "Geometry information C/H/S is {}/{}/{}",
        g.cylinders,
        g.heads,
        g.sectors
    )?;
    if !stored {
        ui.say("(not in the descriptor: computed for its adapter and capacity)");
    }
    Ok(ExitCode::SUCCESS)
}

fn run_serve(args: ServeArgs, ui: Ui) -> Result<ExitCode> {
    let ServeArgs {
        disk,
        socket,
        port,
        bind,
        name,
        max_connections,
        client_timeout,
        overlay,
        read,
    } = args;
    let export = match &overlay {
        None => vmdkit::serve::Export::read_only(read.open(&disk)?)?,
        Some(new) => vmdkit::serve::Export::with_overlay(&disk, new, &read.options())?,
    };
    let listener = match (socket, port) {
        (Some(p), _) => vmdkit::serve::Listener::unix(&p)?,
        (None, Some(n)) => vmdkit::serve::Listener::tcp(&format!("{bind}:{n}"))?,
        (None, None) => anyhow::bail!("give --socket PATH or --port N"),
    };
    let uri = listener.uri(&name);
    let cap = export.capacity();
    if overlay.is_none() {
        vmdkit::cleanup::set_interrupt_note(format!(
            "stopped serving `{}`; nothing was written",
            disk.display()
        ));
    }
    ui.say(format_args!(
        "serving `{}` ({cap} bytes, {}) at {uri}",
        disk.display(),
        match &overlay {
            None => "read-only".to_string(),
            Some(o) => format!("writes into `{}`", o.display()),
        }
    ));
    if ui.json {
        // One line, once it listens: scripts wait for it.
        let line = serde_json::json!({"file": disk, "uri": uri, "capacity": cap});
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    let mut opts = vmdkit::serve::ServeOptions::default();
    opts.name = name;
    opts.max_connections = max_connections;
    opts.client_timeout = std::time::Duration::from_secs(client_timeout);
    vmdkit::serve::serve(export, &listener, &opts, &|e| {
        note!("vmdkit: serve: a connection ended: {e}")
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run_ls(args: LsArgs, ui: Ui) -> Result<ExitCode> {
    let LsArgs {
        dir,
        human_readable,
        mappings,
    } = args;
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    let entries = vmdkit::ops::ls::list(&dir)?;
    if ui.json {
        print_json(&entries)?;
    } else {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        vmdkit::ops::ls::write_text(&mut out, &entries, human_readable, mappings)?;
    }
    for (t, alive) in vmdkit::cleanup::temporaries(&dir) {
        note!(
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

fn run_check(args: CheckArgs, ui: Ui) -> Result<ExitCode> {
    let CheckArgs {
        disk,
        repair,
        discard_unreferenced,
        force,
    } = args;
    let copts = {
        let mut o = vmdkit::ops::check::CheckOptions::default();
        o.allow_outside_paths = args::outside_paths();
        o.repair = repair;
        o.discard_unreferenced = discard_unreferenced;
        o.force = force;
        o
    };
    let r = match vmdkit::ops::check::check_with(&disk, &copts) {
        Ok(r) => r,
        Err(e) => {
            note!("vmdkit: error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if ui.json {
        r.write_json(&disk, &mut out)?;
    } else {
        r.write_text(&mut out)?;
    }
    Ok(ExitCode::from(r.exit_code()))
}

/// `verify`'s exit code when the content differs from the manifest.
const EX_DIFFERS: u8 = 4;

fn run_verify(args: VerifyArgs, ui: Ui) -> Result<ExitCode> {
    let VerifyArgs {
        disk,
        manifest,
        threads,
        read,
    } = args;
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading `{}`", manifest.display()))?;
    let m = vmdkit::ops::manifest::Manifest::parse(&text, &manifest)?;
    let v = if disk.as_os_str() == "-" {
        let raw_size = read.raw()?.then_some(m.capacity);
        let mut input = stdin_reader()?;
        let bar = Bar::open_ended("verify", ui);
        let v = vmdkit::ops::manifest::verify_reader(&mut input, raw_size, &m, threads, &bar)?;
        bar.finish();
        v
    } else {
        let chain = read.open(&disk)?;
        let bar = Bar::for_disk("verify", &chain, ui);
        let popts = {
            let mut o = PipelineOptions::default();
            o.threads = threads;
            o
        };
        let v = vmdkit::ops::manifest::verify(&chain, &m, popts, &bar)?;
        bar.finish();
        v
    };
    if ui.json {
        print_json(&serde_json::json!({
            "file": disk,
            "manifest": manifest,
            "matches": v.ok(),
            "differing": v
                .differing
                .iter()
                .map(|r| vmdkit::ByteRange::from_ends(r.start, r.end))
                .collect::<Vec<_>>(),
            "capacity_mismatch": v.capacity_mismatch,
        }))?;
    } else {
        v.write_text(&mut std::io::stdout().lock())?;
    }
    if v.ok() {
        ui.say(format_args!(
            "{} matches the manifest ({} blocks, total CRC-32 {:08x})",
            disk.display(),
            m.blocks.len(),
            m.total
        ));
        return Ok(ExitCode::SUCCESS);
    }
    if !ui.json {
        note!("vmdkit: {} does NOT match the manifest", disk.display());
    }
    Ok(ExitCode::from(EX_DIFFERS))
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

/// How far a write into a pipe got before it broke (the offset of the failed write).
fn bytes_through(e: &anyhow::Error) -> Option<u64> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<vmdkit::Error>() {
            Some(vmdkit::Error::Io { offset, .. }) => Some(*offset),
            _ => None,
        })
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
    vmdkit::ops::geometry::parse_adapter(s)
        .map(str::to_string)
        .map_err(|e| e.to_string())
}

/// Write `bytes` to `target` through a temporary name in its folder, synced, renamed into
/// place, the folder synced.
fn write_file_durably(target: &Path, bytes: &[u8]) -> Result<()> {
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
fn sync_folder(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing the folder `{}`", dir.display()))
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

/// A completion script without the flags hidden from `--help` (clap_complete offers
/// them): bash word lists, zsh specs and fish lines that name them.
fn without_hidden_flags(script: &str, cmd: &clap::Command) -> String {
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
fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
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
const MAN_TAIL: &str = r#".SH "EXIT STATUS"
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

/// qemu-img's flags, typed from habit: what vmdkit calls them (instead of clap's advice
/// to pass them after `--`).
fn qemu_habit(argv: &[std::ffi::OsString]) -> Option<String> {
    let args: Vec<&str> = argv.iter().skip(1).filter_map(|a| a.to_str()).collect();
    args.iter().enumerate().find_map(|(i, &a)| {
        // `cat --output FILE` is vmdkit's own; `--output json|human` is qemu-img's.
        let qemu_output = a == "--output=json"
            || a == "--output=human"
            || (a == "--output" && matches!(args.get(i + 1), Some(&"json") | Some(&"human")));
        Some(match a {
            "-p" => "-p is qemu-img's progress flag: vmdkit shows a progress bar on its own when stderr is a terminal (-q hides it)".to_string(),
            "-O" => "-O FMT is qemu-img's output format: vmdkit's is -d TYPE (`vmdkit export SRC DST -d stream`; `vmdkit export --help` lists the types)".to_string(),
            _ if qemu_output => {
                "--output=json is qemu-img's: vmdkit's is --json (before or after the command)".to_string()
            }
            _ => return None,
        })
    })
}

/// Exit code of a usage error (sysexits' EX_USAGE): not check's "corruption" (2).
const EX_USAGE: u8 = 64;

/// Print clap's help, version or usage error and give its exit code: 0 for help and
/// version (also into a closed pipe, as `| head` is), 1 when they could not be written
/// (a full disk), 64 for a usage error.
fn clap_exit(e: &clap::Error) -> ExitCode {
    let shown = e.print();
    let help = matches!(
        e.kind(),
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
    );
    match shown {
        Err(io) if help && io.kind() != std::io::ErrorKind::BrokenPipe => {
            note!("vmdkit: error: writing the help: {io}");
            ExitCode::FAILURE
        }
        _ if help => ExitCode::SUCCESS,
        _ => ExitCode::from(EX_USAGE),
    }
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

/// A compressed input's hint names `vmdkit import - out.vmdk`; say the command that
/// was run instead, with `-` in place of the file it named.
fn with_stdin_hint(msg: &str) -> String {
    const GENERIC: &str = "vmdkit import - out.vmdk";
    if !msg.contains(GENERIC) {
        return msg.to_string();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The argument that is a compressed file (gzip, xz, zstd, bzip2 magic).
    let compressed = |a: &str| {
        let mut m = [0u8; 4];
        std::fs::File::open(a)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut m))
            .is_ok()
            && (m[..2] == [0x1f, 0x8b]
                || m == [0xfd, b'7', b'z', b'X']
                || m == [0x28, 0xb5, 0x2f, 0xfd]
                || m[..3] == *b"BZh")
    };
    match args
        .iter()
        .position(|a| msg.contains(&format!("`{a}`")) && compressed(a))
    {
        Some(i) => {
            let mut cmd = args.clone();
            cmd[i] = "-".into();
            msg.replace(GENERIC, &format!("vmdkit {}", cmd.join(" ")))
        }
        None => msg.to_string(),
    }
}

/// An error under `--json`: one object on stderr, `{"error": {"kind", "message",
/// "file", "offset"}}` (kind: io, corrupt, descriptor, chain, unsupported, invalid_input,
/// already_exists, busy, refused, or usage for what the command line itself refuses).
fn error_json(e: &anyhow::Error) -> String {
    let lib = e.chain().find_map(|c| c.downcast_ref::<vmdkit::Error>());
    let kind = lib.map_or("usage".to_string(), |l| {
        let k = format!("{:?}", l.kind());
        let mut out = String::new();
        for (i, ch) in k.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        }
        out
    });
    let v = serde_json::json!({"error": {
        "kind": kind,
        "message": describe(e),
        "file": lib.and_then(|l| l.file()).map(|p| p.display().to_string()),
        "offset": lib.and_then(|l| l.offset()),
    }});
    v.to_string()
}

/// An error as the command line says it: the library's message as a person reads it
/// ([`for_people`]), and the flag that would let the command go ahead, when one would.
fn describe(e: &anyhow::Error) -> String {
    let msg = for_people(&format!("{e:#}"));
    let hint = e
        .chain()
        .find_map(|c| c.downcast_ref::<vmdkit::Error>())
        .and_then(|l| Some((l, l.overridable_by()?)))
        .map(|(l, o)| match o {
            vmdkit::Override::Force if l.kind() == vmdkit::ErrorKind::AlreadyExists => {
                "use --force to overwrite"
            }
            vmdkit::Override::Force => "pass --force to go ahead anyway",
            vmdkit::Override::AllowDeviceWrite => "pass --allow-device-write to write into devices",
            vmdkit::Override::IgnoreCid => "use --ignore-cid to read anyway",
            vmdkit::Override::Branch => "pass --branch to branch on purpose",
            vmdkit::Override::Large => "pass --large if the disk really is that large",
            _ => "",
        });
    match hint {
        Some(h) if !h.is_empty() => format!("{msg} ({h})"),
        _ => msg,
    }
}

/// An error message as a person reads it: no `at offset 0x0` where no offset matters, no
/// `(os error N)` tails, and a temporary's name (`.NAME.vmdkit-tmp.PID.N`) replaced by the
/// output it was to become.
fn for_people(msg: &str) -> String {
    let mut out = msg.replace(" at offset 0x0", "");
    // `(os error 2)` and the like.
    while let Some(i) = out.find(" (os error ") {
        match out[i..].find(')') {
            Some(j) => out.replace_range(i..i + j + 1, ""),
            None => break,
        }
    }
    // Temporaries: `DIR/.NAME.vmdkit-tmp.PID.N` -> `DIR/NAME (being written)`.
    let mut rest = out.as_str();
    let mut done = String::new();
    while let Some(i) = rest.find(".vmdkit-tmp.") {
        let head = &rest[..i];
        let start = head.rfind(['/', '`', ' ']).map_or(0, |k| k + 1);
        let tail = &rest[i + ".vmdkit-tmp.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tail.len());
        // The number part may end in a sentence's full stop.
        let end = if tail[..end].ends_with('.') {
            end - 1
        } else {
            end
        };
        let name = head[start..].strip_prefix('.').unwrap_or(&head[start..]);
        done.push_str(&head[..start]);
        done.push_str(name);
        done.push_str(" (being written)");
        rest = &tail[end..];
    }
    done.push_str(rest);
    done
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

#[cfg(test)]
mod tests {
    use super::for_people;

    /// Issue 22 item 6: messages as people read them.
    #[test]
    fn messages_lose_zero_offsets_os_error_tails_and_temporary_names() {
        assert_eq!(
            for_people(
                "failed to stat `x.vmdk` at offset 0x0: No such file or directory (os error 2)"
            ),
            "failed to stat `x.vmdk`: No such file or directory"
        );
        assert_eq!(
            for_people("failed to write (the disk is full) `/b/.vm-s001.vmdk.vmdkit-tmp.4711.0` at offset 0x10000: No space left on device (os error 28)"),
            "failed to write (the disk is full) `/b/vm-s001.vmdk (being written)` at offset 0x10000: No space left on device"
        );
        assert_eq!(
            for_people("renaming .a.vmdk.vmdkit-tmp.12.3. Then"),
            "renaming a.vmdk (being written). Then"
        );
    }
}
