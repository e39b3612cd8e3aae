//! The commands that move a disk's content: cat, export, import, create, apply,
//! measure, verify.

use super::*;

/// Standard input as a reader another thread may own (the pipe is read on a thread of
/// its own while this one writes), buffered in 1 MiB reads.
pub(super) fn stdin_reader() -> Result<std::io::BufReader<std::fs::File>> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("reading standard input")?;
    grow_pipe(&fd);
    Ok(std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::from(fd),
    ))
}

pub(super) fn run_cat(args: CatArgs, ui: Ui) -> Result<ExitCode> {
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
pub(super) fn into_folder(dst: &Path, name: Option<&std::ffi::OsStr>) -> Result<PathBuf> {
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
pub(super) fn stdout_name(src: &Path) -> String {
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

pub(super) fn level_of(level: Option<u32>, stream: bool) -> Result<u32> {
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
pub(super) fn export_to(
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

pub(super) fn report_json(r: &vmdkit::ops::export::ExportReport, file: &Path) -> serde_json::Value {
    serde_json::json!({
        "file": file,
        "files": r.files,
        "bytes": r.bytes_out,
        "grains": r.grains,
        "zeroed_grains": r.zeroed_grains,
        "crc32": r.crc32.map(|c| format!("{c:08x}")),
        "guest": r.guest,
    })
}

/// What a guest-aware copy found, one line per partition, on stderr.
pub(super) fn say_guest(ui: Ui, g: Option<&vmdkit::ops::export::GuestReport>) {
    let Some(g) = g else { return };
    if let Some(n) = &g.note {
        ui.say(format_args!("guest-aware: {} table: {n}", g.table));
    }
    for p in &g.partitions {
        let what = match (&p.file_system, &p.copied_whole) {
            (Some(fs), None) => format!("{fs}, {} left out", ops::human(p.left_out)),
            (fs, Some(why)) => format!(
                "{}copied whole: {why}",
                fs.as_ref().map(|f| format!("{f}, ")).unwrap_or_default()
            ),
            (None, None) => "copied whole".into(),
        };
        ui.say(format_args!(
            "guest-aware: {} ({}, {} at {}): {what}",
            p.number
                .map_or("whole disk".into(), |n| format!("partition {n}")),
            p.partition_type,
            ops::human(p.length),
            ops::human(p.start),
        ));
    }
    ui.say(format_args!(
        "guest-aware: {} left out in all",
        ops::human(g.left_out)
    ));
}

pub(super) fn run_export(args: ExportArgs, ui: Ui) -> Result<ExitCode> {
    let ExportArgs {
        src,
        dst,
        kind,
        threads,
        level,
        manifest,
        delta,
        parent_hint,
        guest_aware,
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
        o.guest_aware = guest_aware;
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
    say_guest(ui, report.guest.as_ref());
    ui.result(&report_json(&report, &dst), to_stdout)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn run_apply(args: ApplyArgs, ui: Ui) -> Result<ExitCode> {
    let ApplyArgs {
        target,
        src,
        raw,
        force,
        allow_device_write,
        threads,
    } = args;
    use vmdkit::ops::apply::{apply, ApplyOptions};
    let opts = {
        let mut o = ApplyOptions::default();
        o.threads = threads;
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

pub(super) fn run_measure(args: MeasureArgs, ui: Ui) -> Result<ExitCode> {
    let MeasureArgs {
        disk,
        kind,
        delta,
        level,
        exact,
        guest_aware,
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
            o.guest_aware = guest_aware;
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

pub(super) fn run_import(args: ImportArgs, ui: Ui) -> Result<ExitCode> {
    let ImportArgs {
        src,
        dst,
        kind,
        size,
        adapter,
        force,
        threads,
        large,
        guest_aware,
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
            o.guest_aware = guest_aware;
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
            o.guest_aware = guest_aware;
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
    say_guest(ui, r.guest.as_ref());
    ui.result(&report_json(&r, &dst), to_stdout)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn run_create(args: CreateArgs, ui: Ui) -> Result<ExitCode> {
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

/// `verify`'s exit code when the content differs from the manifest.
pub(super) const EX_DIFFERS: u8 = 4;

pub(super) fn run_verify(args: VerifyArgs, ui: Ui) -> Result<ExitCode> {
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
pub(super) fn raw_stdout() -> Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    Ok(std::fs::File::from(fd))
}

/// If `fd` is a pipe, ask for a 1 MiB pipe buffer (Linux's default unprivileged limit,
/// `/proc/sys/fs/pipe-max-size`). A 64 KiB pipe wakes reader and writer for every 64 KiB.
fn grow_pipe(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    #[cfg(target_os = "linux")]
    // SAFETY: fstat and fcntl on a descriptor we own; failure is harmless (the pipe keeps
    // its size).
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
}
