//! The commands that inspect or change a disk in place: info, map, write, commit,
//! extend, geometry, serve, ls, check.

use super::*;

pub(super) fn run_info(args: InfoArgs, ui: Ui) -> Result<ExitCode> {
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
                    let why = describe(&e);
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

pub(super) fn run_map(args: MapArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_write(args: WriteArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_commit(args: CommitArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_extend(args: ExtendArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_geometry(args: GeometryArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_serve(args: ServeArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_ls(args: LsArgs, ui: Ui) -> Result<ExitCode> {
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

pub(super) fn run_check(args: CheckArgs, ui: Ui) -> Result<ExitCode> {
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
        // The report says what a repair could do in words; name the flag that does it.
        let mut text = Vec::new();
        r.write_text(&mut text)?;
        let text = String::from_utf8_lossy(&text).replace(
            "a repair that discards unreferenced grains frees them",
            "a repair with --discard-unreferenced frees them",
        );
        out.write_all(text.as_bytes())?;
    }
    Ok(ExitCode::from(r.exit_code()))
}
