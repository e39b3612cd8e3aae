//! One command line (issue 12): `--json` and `-q` on every command, one disk-type
//! vocabulary, sizes with units, raw images in, `-` and folders as destinations, `verify -`,
//! completions and a man page, and the vmkfstools front end. Content is checked with
//! qemu-img (compare, info, qemu-io patterns), never with vmdkit's own reading alone.

use super::util::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Run vmdkit with `stdin` bytes; returns the output whatever the status.
fn vmdkit_in(dir: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let w = std::thread::spawn(move || {
        let _ = i.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    out
}

fn json(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn virtual_size(d: &Path, f: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(d, &["info", "--output=json", f])).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Every command takes `--json` (a result object on stdout, nothing else there) and
/// `-q` (nothing on stderr on success).
#[test]
fn every_command_takes_json_and_quiet() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "a.vmdk", "8M");
    qemu_io(d, "a.vmdk", &["write -P 0x5a 1M 1M"]);
    std::fs::write(d.join("dev"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("patch.bin"), vec![7u8; 4096]).unwrap();
    let steps: Vec<Vec<&str>> = vec![
        vec!["info", "a.vmdk"],
        vec!["map", "a.vmdk"],
        vec!["geometry", "a.vmdk"],
        vec![
            "export",
            "a.vmdk",
            "e.vmdk",
            "-d",
            "stream",
            "--manifest",
            "a.crc",
        ],
        vec!["verify", "e.vmdk", "--manifest", "a.crc"],
        vec!["import", "e.vmdk", "i.vmdk", "-d", "sparse"],
        vec!["measure", "a.vmdk"],
        vec!["create", "c.vmdk", "--size", "4M", "-d", "thin"],
        vec!["extend", "c.vmdk", "--size", "+4M"],
        vec!["redo", "add", "i.vmdk", "--style", "hosted"],
        vec!["write", "i-000001.vmdk", "--offset", "8k", "patch.bin"],
        vec!["commit", "i-000001.vmdk"],
        vec!["cat", "a.vmdk", "-o", "a.raw"],
        vec!["rdm", "create", "r.vmdk", "--device", "dev"],
        vec!["rdm", "query", "r.vmdk"],
        vec!["ls", "."],
        vec!["check", "a.vmdk"],
    ];
    for s in &steps {
        let mut args = vec!["--json", "-q"];
        args.extend(s);
        let out = vmdkit(d, &args);
        let v = json(&out, &s.join(" "));
        assert!(v.is_object() || v.is_array(), "{s:?}: {v}");
        assert!(
            out.stderr.is_empty(),
            "{s:?} -q printed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Export's result names its files, bytes, grains and the content's CRC-32 (the
    // manifest's total, computed independently by verify above).
    let out = vmdkit(
        d,
        &["export", "a.vmdk", "e2.vmdk", "-d", "sparse", "--json"],
    );
    let v = json(&out, "export --json");
    let crc = v["crc32"].as_str().unwrap().to_string();
    let manifest = std::fs::read_to_string(d.join("a.crc")).unwrap();
    assert!(
        manifest.contains(&format!("total {crc}")),
        "{crc} vs {manifest}"
    );
    assert_eq!(
        v["bytes"].as_u64().unwrap(),
        std::fs::metadata(d.join("e2.vmdk")).unwrap().len()
    );
    // The same keys name the same things: `file` for the disk, `disk_size` for space.
    let ls = json(&vmdkit(d, &["ls", "--json"]), "ls");
    let a = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["file"] == "a.vmdk")
        .unwrap();
    let info = json(&vmdkit(d, &["info", "--json", "a.vmdk"]), "info");
    assert_eq!(a["disk_size"], info["disk_size"]);
    let q = json(
        &vmdkit(d, &["rdm", "query", "--json", "r.vmdk"]),
        "rdm query",
    );
    assert!(q["file"].as_str().unwrap().ends_with("r.vmdk"), "{q}");
    // Data on stdout: the result goes to stderr.
    let out = vmdkit(d, &["export", "a.vmdk", "-", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["bytes"].as_u64().unwrap(), out.stdout.len() as u64);
}

/// 0 ok, 1 error, check 2/3, verify 4 on a mismatch, 64 usage.
#[test]
fn the_exit_code_table_holds() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "a.vmdk", "4M");
    qemu_io(d, "a.vmdk", &["write -P 0x11 0 1M"]);
    vmdkit_ok(
        d,
        &[
            "export",
            "a.vmdk",
            "a.s.vmdk",
            "-d",
            "stream",
            "--manifest",
            "a.crc",
        ],
    );
    qemu_io(d, "a.vmdk", &["write -P 0x12 2M 4k"]);
    let out = vmdkit(d, &["verify", "a.vmdk", "--manifest", "a.crc"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("differs: 2.0 MiB - 3.0 MiB (bytes 0x200000-0x2fffff"));
    assert_eq!(
        vmdkit(d, &["verify", "a.s.vmdk", "--manifest", "a.crc"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        vmdkit(d, &["verify", "nope.vmdk", "--manifest", "a.crc"])
            .status
            .code(),
        Some(1)
    );
    // A bad size is a usage error (issue 22 item 7).
    assert_eq!(
        vmdkit(d, &["create", "x.vmdk", "--size", "1q"])
            .status
            .code(),
        Some(64)
    );
    assert_eq!(vmdkit(d, &["create", "x.vmdk"]).status.code(), Some(64));
    assert_eq!(vmdkit(d, &["frobnicate"]).status.code(), Some(64));
    // Messages say what the rule is, in words.
    let err = vmdkit_err(d, &["export", "a.vmdk", "z.vmdk", "--level", "12"]);
    assert!(err.contains("must be 0 to 9"), "{err}");
    let out = vmdkit(
        d,
        &["export", "a.vmdk", "z.vmdk", "-d", "sparse", "--level", "3"],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--level applies to streamOptimized"));
    // Help: examples and exit codes, no doubled defaults.
    let help = String::from_utf8(vmdkit_ok(d, &["export", "--help"]).stdout).unwrap();
    assert!(
        help.contains("Examples:") && help.contains("Exit:"),
        "{help}"
    );
    assert!(!help.contains("[default: 0]"), "{help}");
}

/// Sizes and offsets with units; `+N` grows; one type vocabulary with aliases.
#[test]
fn sizes_with_units_and_one_type_vocabulary() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    vmdkit_ok(d, &["create", "a.vmdk", "--size", "1.5M", "-d", "sparse"]);
    assert_eq!(virtual_size(d, "a.vmdk"), 3 << 19);
    vmdkit_ok(d, &["extend", "a.vmdk", "--size", "+512KiB"]);
    assert_eq!(virtual_size(d, "a.vmdk"), 2 << 20);
    vmdkit_ok(d, &["extend", "a.vmdk", "--size", "4MB"]);
    assert_eq!(virtual_size(d, "a.vmdk"), 4 << 20);
    std::fs::write(d.join("p.bin"), vec![0x3cu8; 8192]).unwrap();
    vmdkit_ok(d, &["write", "a.vmdk", "--offset", "1.5M", "p.bin"]);
    vmdkit_ok(d, &["write", "a.vmdk", "--offset", "3072s", "--zero", "4k"]);
    qemu_io(
        d,
        "a.vmdk",
        &[
            "read -P 0 1536k 4k",
            "read -P 0x3c 1540k 4k",
            "read -P 0 0 1536k",
        ],
    );
    // Every type name and alias writes the same disk as its createType name.
    qemu_io(d, "a.vmdk", &["write -P 0x77 0 64k"]);
    for (alias, canon) in [
        ("2gbsparse", "twoGbMaxExtentSparse"),
        ("sparse", "monolithicSparse"),
        ("thin", "vmfs"),
        ("flat", "monolithicFlat"),
        ("2gbflat", "twoGbMaxExtentFlat"),
        ("stream", "streamOptimized"),
    ] {
        for (name, dir) in [(alias, "x"), (canon, "y")] {
            let p = d.join(format!("{dir}-{alias}"));
            std::fs::create_dir(&p).unwrap();
            vmdkit_ok(&p, &["export", "../a.vmdk", "o.vmdk", "-d", name]);
        }
        let x = d.join(format!("x-{alias}"));
        let y = d.join(format!("y-{alias}"));
        for e in std::fs::read_dir(&x).unwrap() {
            let e = e.unwrap();
            assert_eq!(
                sha256_file(&e.path()),
                sha256_file(&y.join(e.file_name())),
                "{alias} vs {canon}: {:?}",
                e.file_name()
            );
        }
        qemu_img(&x, &["compare", "o.vmdk", "../a.vmdk"]);
    }
    // zeroedthick export: a vmfs disk whose flat file is allocated in full.
    vmdkit_ok(d, &["export", "a.vmdk", "thick.vmdk", "-d", "zeroedthick"]);
    qemu_img(d, &["compare", "thick.vmdk", "a.vmdk"]);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(d.join("thick-flat.vmdk")).unwrap();
    assert!(m.blocks() * 512 >= 4 << 20, "zeroedthick is allocated");
    let desc = std::fs::read_to_string(d.join("thick.vmdk")).unwrap();
    assert!(!desc.contains("thinProvisioned"), "{desc}");
    let err = vmdkit_err(d, &["export", "a.vmdk", "q.vmdk", "-d", "qcow2"]);
    assert!(
        err.contains("unknown disk type") && err.contains("eagerzeroedthick"),
        "{err}"
    );
}

/// Raw images are a source (files, devices, stdin with --size); other formats are named.
#[test]
fn raw_images_in_and_foreign_formats_named() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "a.vmdk", "6M");
    qemu_io(d, "a.vmdk", &["write -P 0x21 0 1M", "write -P 0x22 5M 64k"]);
    qemu_img(d, &["convert", "-O", "raw", "a.vmdk", "a.img"]);
    let err = vmdkit_err(d, &["import", "a.img", "x.vmdk"]);
    assert!(err.contains("--from raw"), "{err}");
    vmdkit_ok(
        d,
        &["import", "--from", "raw", "a.img", "b.vmdk", "-d", "sparse"],
    );
    qemu_img(d, &["compare", "b.vmdk", "a.vmdk"]);
    let raw = std::fs::read(d.join("a.img")).unwrap();
    let out = vmdkit_in(
        d,
        &["import", "--from", "raw", "--size", "6M", "-", "c.vmdk"],
        &raw,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_img(d, &["compare", "c.vmdk", "a.vmdk"]);
    // A cut pipe or a wrong size is refused, nothing left behind.
    for (size, input) in [("6M", &raw[..raw.len() - 512]), ("5M", &raw[..])] {
        let out = vmdkit_in(
            d,
            &["import", "--from", "raw", "--size", size, "-", "z.vmdk"],
            input,
        );
        assert_eq!(out.status.code(), Some(1), "{size}");
        assert!(!d.join("z.vmdk").exists());
    }
    let out = vmdkit_in(d, &["import", "--from", "raw", "-", "z.vmdk"], &raw);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
    // Named formats with what to do.
    qemu_img(d, &["convert", "-O", "qcow2", "a.vmdk", "a.qcow2"]);
    let err = vmdkit_err(d, &["import", "a.qcow2", "x.vmdk"]);
    assert!(
        err.contains("qcow2") && err.contains("qemu-img convert"),
        "{err}"
    );
    qemu_img(d, &["convert", "-O", "vpc", "a.vmdk", "a.vhd"]);
    let err = vmdkit_err(d, &["info", "a.vhd"]);
    assert!(err.contains("VHD"), "{err}");
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&std::fs::read(d.join("a.vmdk")).unwrap())
            .unwrap();
        e.finish().unwrap()
    };
    let out = vmdkit_in(d, &["import", "-", "x.vmdk"], &gz);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gunzip"));
}

/// `-` as a destination is stdout; an existing folder means "inside it, same name";
/// `verify -` checks a stream on stdin without restoring it.
#[test]
fn dash_and_folders_as_destinations_and_verify_from_stdin() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "a.vmdk", "6M");
    qemu_io(d, "a.vmdk", &["write -P 0x31 1M 2M"]);
    let out = vmdkit(d, &["import", "a.vmdk", "-"]);
    assert!(out.status.success());
    std::fs::write(d.join("s.vmdk"), &out.stdout).unwrap();
    qemu_img(d, &["compare", "s.vmdk", "a.vmdk"]);
    assert!(!d.join("-").exists());
    std::fs::create_dir(d.join("dir")).unwrap();
    vmdkit_ok(d, &["export", "a.vmdk", "dir", "-d", "split"]);
    qemu_img(d, &["compare", "dir/a.vmdk", "a.vmdk"]);
    assert!(d.join("dir/a-s001.vmdk").exists());
    std::fs::create_dir(d.join("dir2")).unwrap();
    vmdkit_ok(d, &["import", "s.vmdk", "dir2/", "-d", "sparse"]);
    qemu_img(d, &["compare", "dir2/s.vmdk", "a.vmdk"]);
    // verify - : the stream on stdin, against the manifest.
    vmdkit_ok(
        d,
        &[
            "export",
            "a.vmdk",
            "t.vmdk",
            "-d",
            "stream",
            "--manifest",
            "a.crc",
        ],
    );
    let stream = std::fs::read(d.join("t.vmdk")).unwrap();
    let out = vmdkit_in(d, &["verify", "-", "--manifest", "a.crc"], &stream);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io(d, "a.vmdk", &["write -P 0x32 5M 4k"]);
    vmdkit_ok(d, &["export", "a.vmdk", "u.vmdk", "-d", "stream"]);
    let changed = std::fs::read(d.join("u.vmdk")).unwrap();
    let out = vmdkit_in(d, &["verify", "-", "--manifest", "a.crc"], &changed);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(bytes 0x500000-0x5fffff, 1 MiB block 5)")
    );
}

#[test]
fn completions_and_man_page_come_from_the_definitions() {
    let t = tmp();
    let d = t.path();
    for sh in ["bash", "zsh", "fish"] {
        let out = String::from_utf8(vmdkit_ok(d, &["completions", sh]).stdout).unwrap();
        assert!(out.contains("vmdkit") && out.contains("measure"), "{sh}");
    }
    let man = String::from_utf8(vmdkit_ok(d, &["man"]).stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(man.contains("export"));
}

/// The vmkfstools front end, end to end: each flag gives what the vmdkit command gives
/// (and qemu-img agrees on the content), through `vmdkit vmkfstools` and through a link
/// named `vmkfstools`.
#[test]
fn vmkfstools_flags_work_end_to_end() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let link = d.join("vmkfstools");
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    let vmkfstools = |args: &[&str]| -> std::process::Output {
        let out = Command::new(&link)
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vmkfstools {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // -c: the same disk as `create` (descriptor aside from its CID and UUID-free keys).
    vmkfstools(&["-c", "20m", "-d", "thin", "-a", "pvscsi", "v.vmdk"]);
    vmdkit_ok(
        d,
        &[
            "create", "w.vmdk", "--size", "20m", "-d", "thin", "-a", "pvscsi",
        ],
    );
    assert_eq!(virtual_size(d, "v.vmdk"), 20 << 20);
    let strip = |p: &str| -> String {
        std::fs::read_to_string(d.join(p))
            .unwrap()
            .lines()
            .filter(|l| {
                !l.starts_with("CID") && !l.contains("longContentID") && !l.starts_with("RW")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip("v.vmdk"), strip("w.vmdk"));
    qemu_io(d, "v.vmdk", &["write -P 0x41 0 3M", "write -P 0x42 17M 1M"]);
    // -i clone, -e export (2 GB pieces), -X extend.
    vmdkit(
        d,
        &[
            "vmkfstools",
            "-i",
            "v.vmdk",
            "-d",
            "2gbsparse",
            "clone.vmdk",
        ],
    );
    qemu_img(d, &["compare", "clone.vmdk", "v.vmdk"]);
    // Without -d, vmkfstools clones to zeroedthick.
    vmkfstools(&["-i", "v.vmdk", "zt.vmdk"]);
    qemu_img(d, &["compare", "zt.vmdk", "v.vmdk"]);
    let zt = std::fs::read_to_string(d.join("zt.vmdk")).unwrap();
    assert!(
        zt.contains("createType=\"vmfs\"") && !zt.contains("thinProvisioned"),
        "{zt}"
    );
    vmkfstools(&["-e", "exp.vmdk", "v.vmdk"]);
    qemu_img(d, &["compare", "exp.vmdk", "v.vmdk"]);
    assert!(d.join("exp-s001.vmdk").exists());
    vmkfstools(&["-X", "32m", "clone.vmdk"]);
    assert_eq!(virtual_size(d, "clone.vmdk"), 32 << 20);
    // -g equals geometry; -l lists; -x check.
    let g1 = vmkfstools(&["-g", "v.vmdk"]).stdout;
    let g2 = vmdkit_ok(d, &["geometry", "v.vmdk"]).stdout;
    assert_eq!(g1, g2);
    let l = String::from_utf8(vmkfstools(&["-l", "-h"]).stdout).unwrap();
    assert!(l.contains("v.vmdk") && l.contains("MiB"), "{l}");
    vmkfstools(&["-x", "check", "clone.vmdk"]);
    // -m: commit the REDO log of a disk.
    vmdkit_ok(d, &["redo", "add", "v.vmdk"]);
    std::fs::write(d.join("p.bin"), vec![0x43u8; 65536]).unwrap();
    vmdkit_ok(d, &["write", "v.vmdk.REDO", "--offset", "1M", "p.bin"]);
    vmkfstools(&["-m", "v.vmdk"]);
    assert!(!d.join("v.vmdk.REDO").exists());
    qemu_io(
        d,
        "v.vmdk",
        &[
            "read -P 0x43 1M 64k",
            "read -P 0x41 0 1M",
            "read -P 0x42 17M 1M",
        ],
    );
    // -r / -z / -q: raw device mappings.
    std::fs::write(d.join("dev"), vec![0u8; 4 << 20]).unwrap();
    vmkfstools(&["-z", "dev", "rdmp.vmdk"]);
    vmkfstools(&["-r", "dev", "rdm.vmdk"]);
    let q = String::from_utf8(vmkfstools(&["-q", "rdmp.vmdk"]).stdout).unwrap();
    assert!(
        q.to_lowercase().contains("passthrough") || q.contains("physical"),
        "{q}"
    );
    // Through `vmdkit vmkfstools`, vmkfstools' -q is still "query", not vmdkit's quiet.
    let q2 = vmdkit_ok(d, &["vmkfstools", "-q", "rdmp.vmdk"]).stdout;
    assert_eq!(String::from_utf8(q2).unwrap(), q);
    // Unknown and unsupported flags name what to use.
    // (Issue 22 item 5: usage errors exit 64, as the exit-code table says.)
    let out = vmdkit(d, &["vmkfstools", "-U", "v.vmdk"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rm"));
    for (args, says) in [
        (&[][..], "no operation given"),
        (&["-M"][..], "to migrate a disk"),
        (
            &["-c", "1m", "-d", "thin", "-d", "zeroedthick", "x.vmdk"][..],
            "-d given twice",
        ),
        (
            &["-X", "64m", "-d", "thin", "v.vmdk"][..],
            "keeps the disk's own type",
        ),
    ] {
        let out = Command::new(&link)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!d.join("x.vmdk").exists());
    // ESXi's `-e DISK` (one argument) checks the disk's chain; ESX 2.5's `-e DST SRC`
    // exports. -X with -d eagerzeroedthick extends.
    let e = vmkfstools(&["-e", "v.vmdk"]);
    assert!(
        String::from_utf8_lossy(&e.stdout)
            .to_lowercase()
            .contains("no errors"),
        "{}",
        String::from_utf8_lossy(&e.stdout)
    );
    vmkfstools(&["-X", "80m", "-d", "eagerzeroedthick", "v.vmdk"]);
    let out = Command::new(&link)
        .arg("-H")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("-c SIZE"));
}

/// `check` of a truncated file: the first findings, a count of the rest, and the lost
/// guest ranges merged; the ranges are the ones qemu-img map places past the cut.
#[test]
fn check_of_a_truncated_file_sums_up_the_lost_ranges() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "a.vmdk", "64M");
    qemu_io(d, "a.vmdk", &["write -P 0x51 0 8M", "write -P 0x52 20M 3M"]);
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(d, &["map", "--output=json", "a.vmdk"])).unwrap();
    let cut = 4u64 << 20;
    let mut want: Vec<(u64, u64)> = Vec::new();
    for r in map.as_array().unwrap() {
        let (Some(off), true) = (r["offset"].as_u64(), r["data"].as_bool().unwrap()) else {
            continue;
        };
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        // Grains whose bytes lie at or past the cut are lost.
        let mut g = 0;
        while g < len {
            if off + g + 65536 > cut {
                match want.last_mut() {
                    Some(l) if l.1 == start + g => l.1 += 65536,
                    _ => want.push((start + g, start + g + 65536)),
                }
            }
            g += 65536;
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("a.vmdk"))
        .unwrap();
    f.set_len(cut).unwrap();
    let out = vmdkit(d, &["check", "a.vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() < 40, "{text}");
    assert!(text.contains("more error findings"), "{text}");
    for (a, b) in &want {
        assert!(
            text.contains(&format!("bytes {a:#x}-{:#x}", b - 1)),
            "{a:#x}-{b:#x}: {text}"
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit(d, &["check", "--json", "a.vmdk"]).stdout).unwrap();
    let got: Vec<(u64, u64)> = v["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let a = p["start"].as_u64().unwrap();
            (a, a + p["length"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, want);
}

/// A thin disk exported to a tar stream stays small: flat files become GNU sparse
/// members, which GNU tar restores with holes, and `import -` reads back.
#[test]
fn thin_disks_in_tar_streams_are_sparse_members() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    vmdkit_ok(d, &["create", "e.vmdk", "--size", "256M", "-d", "thin"]);
    qemu_io(
        d,
        "e.vmdk",
        &["write -P 0x61 1M 3M", "write -P 0x62 200M 65k"],
    );
    for kind in ["vmfs", "flat", "2gbflat"] {
        let out = vmdkit_ok(d, &["export", "e.vmdk", "-", "-d", kind]);
        assert!(
            out.stdout.len() < 4 << 20,
            "{kind}: {} bytes",
            out.stdout.len()
        );
        let x = d.join(format!("x-{kind}"));
        std::fs::create_dir(&x).unwrap();
        std::fs::write(d.join("t.tar"), &out.stdout).unwrap();
        run(&x, "tar", &["-xf", "../t.tar"]);
        qemu_img(&x, &["compare", "e.vmdk", "../e.vmdk"]);
        use std::os::unix::fs::MetadataExt;
        let flat: u64 = std::fs::read_dir(&x)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum();
        assert!(
            flat < 8 << 20,
            "{kind}: restored with holes ({flat} bytes allocated)"
        );
        let r = vmdkit_in(
            d,
            &["import", "-", &format!("r-{kind}.vmdk"), "-d", "sparse"],
            &out.stdout,
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        qemu_img(d, &["compare", &format!("r-{kind}.vmdk"), "e.vmdk"]);
    }
}

/// A snapshot whose descriptor carries another adapter than its base (qemu writes `ide`
/// into children): info says so, and the export keeps the base's, as it says.
#[test]
fn info_notes_when_a_snapshot_and_its_base_disagree_on_the_adapter() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    vmdkit_ok(
        d,
        &[
            "create", "b.vmdk", "-s", "64M", "-d", "sparse", "-a", "lsilogic",
        ],
    );
    qemu_child(d, "b.vmdk", "c.vmdk", false);
    let text = String::from_utf8(vmdkit_ok(d, &["info", "c.vmdk"]).stdout).unwrap();
    assert!(
        text.contains("the base `b.vmdk` says adapter lsilogic"),
        "{text}"
    );
    vmdkit_ok(d, &["export", "c.vmdk", "e.vmdk", "-d", "stream"]);
    let info = String::from_utf8(vmdkit_ok(d, &["info", "e.vmdk"]).stdout).unwrap();
    assert!(info.contains("adapter type:  lsilogic"), "{info}");
}

/// Issue 22 item 7: completion offers the disk types after -d, the styles after --style
/// and the formats after --from; qemu-img's habits (-p, -O, --output=json) get a hint
/// naming vmdkit's equivalent and exit 64; a bad size is a usage error (64).
#[test]
fn completion_offers_values_and_qemu_habits_get_a_hint() {
    let t = tmp();
    let d = t.path();
    let bash = String::from_utf8(vmdkit_ok(d, &["completions", "bash"]).stdout).unwrap();
    for word in [
        "eagerzeroedthick",
        "twoGbMaxExtentSparse",
        "vmfsSparse",
        "hosted",
    ] {
        assert!(bash.contains(word), "bash completion lacks `{word}`");
    }
    // Flags hidden from --help are not offered either; the script still parses.
    for shell in ["bash", "zsh", "fish"] {
        let text = String::from_utf8(vmdkit_ok(d, &["completions", shell]).stdout).unwrap();
        assert!(
            !text.contains("mmap"),
            "{shell} completion offers the hidden --mmap"
        );
        assert!(text.contains("allow-outside-paths"), "{shell}");
    }
    let syntax = Command::new("bash")
        .args(["-n", "-c", &bash])
        .status()
        .unwrap();
    assert!(syntax.success(), "bash completion does not parse");
    for (args, says) in [
        (&["export", "a.vmdk", "b.vmdk", "-p"][..], "progress"),
        (&["export", "a.vmdk", "-O", "vmdk", "b.vmdk"][..], "-d TYPE"),
        (&["info", "a.vmdk", "--output=json"][..], "--json"),
        (&["info", "--output", "json", "a.vmdk"][..], "--json"),
        (&["create", "c.vmdk", "--size", "12zb"][..], "size"),
        (&["extend", "c.vmdk", "--size", "+lots"][..], "size"),
    ] {
        let out = vmdkit(d, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("-- -p"),
            "{args:?}: clap's advice instead of a hint: {err}"
        );
    }
    assert!(!d.join("c.vmdk").exists());
}

/// Issue 22 item 6: a missing file is named without `at offset 0x0` or `(os error 2)`;
/// `create` says what it made; Ctrl-C prints one line saying what was left as it was.
#[test]
fn messages_say_what_happened_as_people_write_it() {
    let t = tmp();
    let d = t.path();
    let err = vmdkit_err(d, &["info", "missing.vmdk"]);
    assert!(
        err.contains("missing.vmdk") && !err.contains("0x0") && !err.contains("os error"),
        "{err}"
    );
    // A compressed input's hint names the command that was run, with `-` for the file.
    vmdkit_ok(
        d,
        &["create", "g.vmdk", "--size", "1m", "-d", "sparse", "-q"],
    );
    vmdkit_ok(
        d,
        &["export", "g.vmdk", "e.vmdk", "--manifest", "m.crc", "-q"],
    );
    let gz = Command::new("gzip")
        .args(["-k", "g.vmdk"])
        .current_dir(d)
        .status()
        .unwrap();
    assert!(gz.success());
    let err = vmdkit_err(d, &["verify", "g.vmdk.gz", "--manifest", "m.crc"]);
    assert!(
        err.contains("gunzip -c FILE | vmdkit verify - --manifest m.crc"),
        "{err}"
    );
    let out = vmdkit_ok(d, &["create", "n.vmdk", "--size", "1m", "-d", "sparse"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("created `n.vmdk`") && said.contains("1.0 MiB"),
        "{said}"
    );
    assert!(vmdkit_ok(d, &["create", "q.vmdk", "--size", "1m", "-q"])
        .stderr
        .is_empty());
    // An import from a pipe that stalls after the stream's first 64 KiB, interrupted.
    vmdkit_ok(
        d,
        &["create", "s.vmdk", "--size", "4m", "-d", "sparse", "-q"],
    );
    vmdkit_ok(d, &["export", "s.vmdk", "s.stream", "-d", "stream", "-q"]);
    let head = std::fs::read(d.join("s.stream")).unwrap();
    let mut child = Command::new(bin())
        .args(["import", "-", "out.vmdk", "-d", "sparse"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    use std::io::Write;
    stdin.write_all(&head[..head.len().min(1024)]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("interrupted")).count(),
        1,
        "{err}"
    );
    assert!(!d.join("out.vmdk").exists());
}

/// Issue 22 item 1: `man --dir` writes vmdkit(1) and a page for every command it names
/// (vmdkit-export(1) ...), each with its options, its examples, the exit codes and the
/// safety rules; README's install lines work on a fresh account (run here with HOME in
/// a new folder).
#[test]
fn the_manual_has_a_page_per_command_and_the_install_lines_work() {
    let t = tmp();
    let d = t.path();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("## Install\n\n```sh\n")
        .expect("install section")
        + "## Install\n\n```sh\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let home = d.join("home");
    std::fs::create_dir(&home).unwrap();
    let bindir = d.join("bin");
    std::fs::create_dir(&bindir).unwrap();
    std::os::unix::fs::symlink(bin(), bindir.join("vmdkit")).unwrap();
    // Every line but the cargo install (the binary is already built).
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("cargo install"))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("HOME", &home)
        .env(
            "PATH",
            format!("{}:{}", bindir.display(), std::env::var("PATH").unwrap()),
        )
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man1 = home.join(".local/share/man/man1");
    let main = std::fs::read_to_string(man1.join("vmdkit.1")).unwrap();
    for cmd in [
        "info",
        "export",
        "import",
        "commit",
        "apply",
        "check",
        "verify",
        "measure",
        "redo-add",
        "rdm-create",
        "vmkfstools",
    ] {
        let page = man1.join(format!("vmdkit-{cmd}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|_| panic!("no page {}", page.display()));
        let name = cmd.split('-').next().unwrap();
        assert!(
            main.contains(&format!("vmdkit\\-{name}(1)"))
                || main.contains(&format!("vmdkit-{name}(1)")),
            "vmdkit.1 does not name {cmd}"
        );
        for section in ["EXIT STATUS", "SAFETY"] {
            assert!(text.contains(section), "{cmd}: no {section}");
        }
    }
    let export = std::fs::read_to_string(man1.join("vmdkit-export.1")).unwrap();
    assert!(
        export.contains("manifest") && export.contains("Examples"),
        "export's page lacks its options or examples"
    );
    assert!(home
        .join(".local/share/bash-completion/completions/vmdkit")
        .exists());
    assert!(home.join(".local/bin/vmkfstools").exists());
}

/// Issue 22 item 2 (in part): under --json every command that names a disk says which in
/// `file`, and an error is one JSON object on stderr, `{"error": {"kind", "message",
/// "file", "offset"}}`, with the exit code it has without --json.
#[test]
fn json_results_name_their_file_and_errors_are_json_too() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "p.vmdk", "8M");
    qemu_io(d, "p.vmdk", &["write -P 0x31 0 1M"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(d, "c.vmdk", &["write -P 0x41 0 64k"]);
    std::fs::write(d.join("w.bin"), vec![5u8; 4096]).unwrap();
    let json = |args: &[&str], stdout: bool| -> serde_json::Value {
        let out = vmdkit_ok(d, args);
        let text = if stdout { out.stdout } else { out.stderr };
        serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&text)))
    };
    for (args, file, on_stdout) in [
        (&["--json", "info", "c.vmdk"][..], "c.vmdk", true),
        (
            &["--json", "export", "c.vmdk", "e.vmdk", "-d", "sparse"][..],
            "e.vmdk",
            true,
        ),
        (&["--json", "export", "c.vmdk", "-"][..], "-", false),
        (
            &["--json", "import", "e.vmdk", "i.vmdk"][..],
            "i.vmdk",
            true,
        ),
        (&["--json", "check", "c.vmdk"][..], "c.vmdk", true),
        (
            &["--json", "write", "c.vmdk", "--offset", "0", "w.bin"][..],
            "c.vmdk",
            true,
        ),
        (
            &["--json", "create", "n.vmdk", "--size", "1m"][..],
            "n.vmdk",
            true,
        ),
        (
            &["--json", "extend", "n.vmdk", "--size", "2m"][..],
            "n.vmdk",
            true,
        ),
        (&["--json", "commit", "c.vmdk"][..], "./p.vmdk", true),
    ] {
        let v = if on_stdout {
            json(args, true)
        } else {
            let out = Command::new(bin())
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(out.status.success());
            serde_json::from_slice(&out.stderr).unwrap()
        };
        let got = v["file"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: no file in {v}"));
        assert!(
            got == file || got.trim_start_matches("./") == file.trim_start_matches("./"),
            "{args:?}: file {got}, want {file}"
        );
    }
    // Errors: one object, the same exit codes.
    for (args, code, kind) in [
        (&["--json", "info", "missing.vmdk"][..], 1, "io"),
        (
            &["--json", "create", "x.vmdk", "--size", "1q"][..],
            64,
            "usage",
        ),
        (
            &["--json", "create", "n.vmdk", "--size", "1m"][..],
            1,
            "already_exists",
        ),
    ] {
        let out = vmdkit(d, args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["error"]["kind"], kind, "{args:?}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"].get("file").is_some() && v["error"].get("offset").is_some());
    }
}

/// The keys of README's JSON key table (first column, in backticks).
fn readme_json_keys() -> std::collections::BTreeSet<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("| key | meaning | where |")
        .expect("the key table");
    let table = &readme[start
        ..readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |e| start + e)];
    let mut keys = std::collections::BTreeSet::new();
    for row in table.lines().skip(2) {
        let first = row.split('|').nth(1).unwrap_or("");
        for (i, part) in first.split('`').enumerate() {
            if i % 2 == 1 {
                keys.insert(part.to_string());
            }
        }
    }
    keys
}

/// Issue 22 item 2: every command's `--json` output uses only keys README's table
/// explains (its top-level keys, and those of each entry of a list), names its disk in
/// `file`, and writes byte ranges in one shape (`start`, `length`); an error is one
/// object on stderr.
#[test]
fn every_commands_json_uses_readmes_keys() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "p.vmdk", "8M");
    qemu_io(d, "p.vmdk", &["write -P 0x31 0 1M"]);
    std::fs::write(d.join("in.bin"), vec![0x44u8; 70_000]).unwrap();
    std::fs::write(d.join("lun.raw"), vec![0u8; 1 << 20]).unwrap();
    let known = readme_json_keys();
    let runs: Vec<(Vec<&str>, bool)> = vec![
        (vec!["info", "p.vmdk"], true),
        (vec!["map", "p.vmdk"], false),
        (vec!["ls"], false),
        (vec!["check", "p.vmdk"], true),
        (vec!["measure", "p.vmdk"], false),
        (vec!["geometry", "p.vmdk"], true),
        (vec!["create", "n.vmdk", "--size", "4M"], true),
        (vec!["extend", "n.vmdk", "--size", "8M"], true),
        (vec!["write", "n.vmdk", "--offset", "0", "in.bin"], true),
        (
            vec!["export", "p.vmdk", "e.vmdk", "--manifest", "e.man"],
            true,
        ),
        (vec!["import", "e.vmdk", "i.vmdk", "-d", "sparse"], true),
        (vec!["cat", "p.vmdk", "-o", "c.raw"], true),
        (vec!["verify", "i.vmdk", "--manifest", "e.man"], true),
        (vec!["redo", "add", "i.vmdk"], true),
        (
            vec!["write", "i-000001.vmdk", "--offset", "1M", "in.bin"],
            true,
        ),
        (vec!["export", "i-000001.vmdk", "inc.vmdk", "--delta"], true),
        (vec!["commit", "i-000001.vmdk"], true),
        (vec!["import", "e.vmdk", "r.vmdk", "-d", "sparse"], true),
        (vec!["apply", "r.vmdk", "inc.vmdk"], true),
        (vec!["rdm", "create", "m.vmdk", "--device", "lun.raw"], true),
        (vec!["rdm", "query", "m.vmdk"], true),
    ];
    let mut ranges = 0;
    for (args, names_file) in &runs {
        let mut a = args.clone();
        a.push("--json");
        let out = vmdkit_ok(d, &a);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON value on stdout ({e})"));
        let objects: Vec<&serde_json::Map<String, serde_json::Value>> = match &v {
            serde_json::Value::Object(o) => vec![o],
            serde_json::Value::Array(a) => a.iter().filter_map(|e| e.as_object()).collect(),
            other => panic!("{args:?}: {other}"),
        };
        assert!(!objects.is_empty(), "{args:?}: {v}");
        for o in &objects {
            for k in o.keys() {
                assert!(
                    known.contains(k),
                    "{args:?}: key `{k}` is not in README's JSON key table"
                );
            }
            // Every byte range: `start` and `length`.
            for key in ["lost", "differing"] {
                for r in o.get(key).and_then(|r| r.as_array()).into_iter().flatten() {
                    let r = r.as_object().unwrap();
                    assert!(
                        r.contains_key("start") && r.contains_key("length") && r.len() == 2,
                        "{args:?}: a range {r:?}"
                    );
                    ranges += 1;
                }
            }
        }
        if *names_file {
            assert!(
                objects[0].get("file").and_then(|f| f.as_str()).is_some(),
                "{args:?}: no `file` in {v}"
            );
        }
        // Names as typed: no `./` added in front of a file of this folder.
        assert!(!v.to_string().contains("\"./"), "{args:?}: {v}");
    }
    assert_eq!(
        runs.iter().filter(|(a, _)| a[0] == "ls").count(),
        1,
        "the list covers ls"
    );
    // A changed copy of the export: verify names the range in the same shape.
    vmdkit_ok(d, &["import", "e.vmdk", "x.vmdk", "-d", "sparse", "-q"]);
    vmdkit_ok(d, &["write", "x.vmdk", "--offset", "3M", "in.bin"]);
    let out = vmdkit(d, &["verify", "x.vmdk", "--manifest", "e.man", "--json"]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["differing"],
        serde_json::json!([{"start": 3 << 20, "length": 1 << 20}]),
        "{v}"
    );
    // A truncated copy: check's lost range in the same shape.
    let b = std::fs::read(d.join("x.vmdk")).unwrap();
    std::fs::write(d.join("x.vmdk"), &b[..b.len() - 65536]).unwrap();
    let out = vmdkit(d, &["check", "x.vmdk", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lost = v["lost"].as_array().expect("lost");
    assert!(!lost.is_empty(), "{v}");
    for r in lost {
        assert_eq!(r.as_object().unwrap().len(), 2, "{r}");
        assert!(r["start"].is_u64() && r["length"].is_u64(), "{r}");
    }
    ranges += lost.len();
    assert!(ranges > 0);
    // An error: one object on stderr, with the same exit code.
    let out = vmdkit(d, &["info", "missing.vmdk", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    for k in e["error"].as_object().unwrap().keys() {
        assert!(known.contains(k), "error key `{k}`");
    }
    assert_eq!(e["error"]["file"], "missing.vmdk");
}
