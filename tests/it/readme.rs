//! Issue 22: README's fenced examples run. Every shell line of README that names concrete
//! files (not a synopsis with `DISK`, `[--opt]` or `SRC|-` in it) runs, in README's
//! order, in a folder holding a generated VM (a base and two snapshot deltas, a full
//! backup and an increment of it, a raw image), with the machine's paths (`/backup`,
//! `/restore`, `/vmfs/volumes/...`) moved into that folder and the tape (`/dev/nst0`,
//! `mbuffer`, `mt`) and the remote host (`ssh`) played by shell functions. The nightly
//! backup script runs for three nights, then its restore part, which ends in `verify`
//! against the last night's manifest; the quick start's export is compared with
//! qemu-img's reading of the bundled example.

use super::util::*;
use std::path::Path;
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// README's fenced blocks of commands (their bodies), in order: blocks fenced as `text`
/// (the code map) or `rust` (the library) are not commands.
fn blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut skip = false;
    for line in text.lines() {
        if let Some(info) = line.strip_prefix("```") {
            match cur.take() {
                Some(b) if !skip => out.push(b),
                Some(_) => {}
                None => {
                    skip = matches!(info.trim(), "text" | "rust");
                    cur = Some(String::new());
                }
            }
        } else if let Some(b) = cur.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    out
}

/// A line that shows the form of a command rather than a command: it holds a
/// placeholder (`DISK`, `SRC|-`, `[--opt]`, `...`).
fn synopsis(cmd: &str) -> bool {
    cmd.contains('[')
        || cmd.contains("...")
        || cmd.contains('…')
        || cmd.split_whitespace().any(|w| {
            let w = w.trim_matches(|c: char| c == '"' || c == '\'' || c == ';');
            let bare = w.split('|').next().unwrap_or("");
            (w.contains('|') && w.len() > 1 && !w.starts_with('|'))
                || (bare.len() >= 2
                    && bare.starts_with(|c: char| c.is_ascii_uppercase())
                    && bare
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        })
}

/// The shell functions and variables every example runs with: `$D` is the sandbox;
/// the tape is numbered files in `$D/tape` (writes append a file, reads take the next).
const PRELUDE: &str = r#"
set -o pipefail
tape_write() { n=$(ls "$D/tape" | grep -c '^f' || true); echo "$D/tape/f$n"; }
tape_read() { p=$(cat "$D/tape/pos" 2>/dev/null || echo 0); echo $((p + 1)) > "$D/tape/pos"; echo "$D/tape/f$p"; }
mbuffer() {
  local out="" in=""
  while [ $# -gt 0 ]; do
    case "$1" in -o) out="$2"; shift ;; -i) in="$2"; shift ;; -m) shift ;; esac; shift
  done
  if [ -n "$out" ]; then cat > "$(tape_write)"; else cat "$(tape_read)"; fi
}
mt() { echo 0 > "$D/tape/pos"; }
ssh() { shift; (cd "$D/remote" && bash -c "$*"); }
"#;

/// `line` with the machine's paths moved into the sandbox.
fn localize(line: &str) -> String {
    line.replace("/vmfs/volumes/ds1/vm", "$D/vm")
        .replace("/backup/", "$D/backup/")
        .replace("/restore", "$D/restore")
        .replace("< /dev/nst0", "< \"$(tape_read)\"")
}

fn run_sh(d: &Path, cwd: &Path, script: &str) -> std::process::Output {
    let bin_dir = bin().parent().unwrap().to_path_buf();
    Command::new("bash")
        .arg("-c")
        .arg(format!("{PRELUDE}\n{script}"))
        .current_dir(cwd)
        .env("D", d)
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap()
}

/// The sandbox: `vm/` holds the VM (base `vm.vmdk`, deltas `vm-000001.vmdk` and
/// `vm-000002.vmdk`), `full.vmdk` and `inc1.vmdk` (a full backup and the first
/// delta's increment), `disk.img`; `backup/`, `restore/`, `remote/`, `tape/` are empty.
fn sandbox(d: &Path) {
    for f in ["vm", "backup", "restore", "remote", "tape"] {
        std::fs::create_dir_all(d.join(f)).unwrap();
    }
    let vm = d.join("vm");
    qemu_create(&vm, "monolithicSparse", "vm.vmdk", "64M");
    qemu_io(
        &vm,
        "vm.vmdk",
        &["write -P 0x31 0 4M", "write -P 0x32 40M 1M"],
    );
    qemu_child(&vm, "vm.vmdk", "vm-000001.vmdk", false);
    qemu_io(&vm, "vm-000001.vmdk", &["write -P 0x41 1M 2M"]);
    qemu_child(&vm, "vm-000001.vmdk", "vm-000002.vmdk", false);
    qemu_io(&vm, "vm-000002.vmdk", &["write -P 0x51 50M 512k"]);
    vmdkit_ok(
        &vm,
        &["export", "vm.vmdk", "full.vmdk", "-d", "stream", "-q"],
    );
    vmdkit_ok(
        &vm,
        &["export", "vm-000001.vmdk", "inc1.vmdk", "--delta", "-q"],
    );
    std::fs::write(vm.join("disk.img"), pattern(7, 3 << 20)).unwrap();
}

#[test]
fn readmes_examples_run() {
    need_qemu!();
    let text = readme();
    let blocks = blocks(&text);
    let t = tmp();
    let d = t.path();
    sandbox(d);
    let vm = d.join("vm");

    // The quick start's export of the bundled example.
    let quick = blocks[0].lines().next().unwrap();
    let args: Vec<String> = quick
        .split_once(" -- ")
        .expect("cargo run -- ARGS")
        .1
        .split_whitespace()
        .map(|a| a.replace("/tmp/", &format!("{}/", d.display())))
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(bin())
        .args(&args)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{quick}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made = args
        .iter()
        .find(|a| a.starts_with(&*d.to_string_lossy()))
        .unwrap();
    assert!(qemu_img(root, &["compare", "fixtures/demo-000001.vmdk", made]).contains("identical"));

    // Every concrete line of the command summaries, in order, in one sandbox.
    let script_block = blocks
        .iter()
        .position(|b| b.starts_with("#!/bin/bash"))
        .expect("the nightly script");
    let mut ran = 0;
    for (i, b) in blocks.iter().enumerate() {
        if i == 0 || i == script_block {
            continue;
        }
        for line in b.lines() {
            let cmd = line.split(" # ").next().unwrap().trim();
            if cmd.starts_with('#') || !cmd.contains("vmdkit ") || cmd.contains("cargo ") {
                continue;
            }
            // Installation lines write into the account; commandline.rs runs them on a
            // fresh HOME.
            if cmd.contains("~/") || cmd.contains("command -v") || synopsis(cmd) {
                continue;
            }
            // A server started in the background (`serve ... &`) runs until stopped:
            // serve.rs starts one and drives it with nbdinfo, nbdcopy and qemu-img.
            if cmd.ends_with('&') {
                continue;
            }
            eprintln!("README example: {cmd}");
            let out = run_sh(d, &vm, &localize(cmd));
            assert!(
                out.status.success(),
                "README example `{cmd}`: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} README examples ran");
    // What they made is what they say: the restore from the tar reads as the disk, the
    // increment applied onto the full backup reads as the first delta.
    assert_same(
        &qemu_raw(&d.join("restore"), "vm.vmdk"),
        &qemu_raw(&vm, "vm.vmdk"),
        "the tar restore",
    );
    assert_same(
        &qemu_raw(&d.join("restore"), "vm1.vmdk"),
        &qemu_raw(&vm, "vm-000001.vmdk"),
        "full backup + increment",
    );

    // The nightly script: three nights (base, then each delta frozen in turn), then
    // its restore part, which verifies against night 2's manifest.
    let t2 = tmp();
    let d2 = t2.path();
    sandbox(d2);
    let script = localize(&blocks[script_block]);
    let (nightly, restore) = script
        .split_once("# Restore")
        .expect("the script's restore part");
    for night in 0..3 {
        let out = run_sh(d2, d2, nightly);
        assert!(
            out.status.success(),
            "night {night}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(d2.join("backup/vm.day"))
            .unwrap()
            .trim(),
        "3"
    );
    std::fs::remove_dir_all(d2.join("restore")).unwrap();
    std::fs::create_dir(d2.join("restore")).unwrap();
    let out = run_sh(d2, d2, &format!("set -euo pipefail\n# Restore{restore}"));
    assert!(
        out.status.success(),
        "the restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        &qemu_raw(&d2.join("restore"), "vm.vmdk"),
        &qemu_raw(&d2.join("vm"), "vm-000002.vmdk"),
        "the restore of night 2",
    );
}

#[test]
fn synopsis_lines_are_told_from_examples() {
    assert!(synopsis("vmdkit cat DISK > disk.raw"));
    assert!(synopsis("vmdkit export SRC DST|DIR|- [-d TYPE]"));
    assert!(synopsis(
        "vmdkit rdm create vm.vmdk --device /dev/sdb [--physical]"
    ));
    assert!(!synopsis("vmdkit export vm-000002.vmdk /backup/"));
    assert!(!synopsis(
        "vmdkit export vm.vmdk - | mbuffer -m 1G -o /dev/nst0"
    ));
    assert!(!synopsis(
        "vmdkit export vm.vmdk - --manifest vm.crc | ssh host 'cat > vm.vmdk'"
    ));
}
