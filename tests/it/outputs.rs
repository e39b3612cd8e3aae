//! Issue 17, items 11-16: pipelines and outputs, hostile inputs. README's cron example run
//! as a script; outputs into missing folders; output errors that used to panic; claims
//! of impossible capacities; corrupt inputs the readers refuse and check used to pass;
//! read-only files and device-backed disks.

use super::util::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn bash(dir: &Path, script: &str) -> std::process::Output {
    Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .env("V", bin())
        .output()
        .unwrap()
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir(d);
    v.sort();
    v
}

fn walkdir(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.to_string_lossy().into_owned());
        if p.is_dir() {
            out.extend(walkdir(&p));
        }
    }
    out
}

/// Item 11: README's nightly script, as printed there (paths, mbuffer and the tape
/// replaced by stand-ins): a night whose tape writer fails fails the script and leaves
/// the counter; a good night moves it and leaves a manifest.
#[test]
fn the_readme_cron_script_fails_a_night_whose_tape_write_failed() {
    need_qemu!();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("```sh\n#!/bin/bash\n# cron, nightly.")
        .expect("the cron example");
    let body = &readme[start + 6..];
    let body = &body[..body.find("\n\n# Restore").expect("its end")];
    let t = tmp();
    let vm = t.path().join("vm");
    let backup = t.path().join("backup");
    let bin_dir = t.path().join("bin");
    for d in [&vm, &backup, &bin_dir] {
        std::fs::create_dir(d).unwrap();
    }
    qemu_create(&vm, "monolithicSparse", "vm.vmdk", "16M");
    qemu_io(&vm, "vm.vmdk", &["write -P 0x11 0 4M"]);
    std::os::unix::fs::symlink(bin(), bin_dir.join("vmdkit")).unwrap();
    let tape = t.path().join("tape");
    let script = body
        .replace("/vmfs/volumes/ds1/vm", vm.to_str().unwrap())
        .replace("/backup", backup.to_str().unwrap())
        .replace("/dev/nst0", tape.to_str().unwrap());
    std::fs::write(t.path().join("night.sh"), &script).unwrap();
    let mbuffer = |body: &str| {
        let p = bin_dir.join("mbuffer");
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let night = || {
        Command::new("bash")
            .arg(t.path().join("night.sh"))
            .env(
                "PATH",
                format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap()
    };
    // The tape writer dies after a few KiB (out of space).
    mbuffer("head -c 4096 > \"${@: -1}\"; exit 1");
    let out = night();
    assert!(
        !out.status.success(),
        "a failed night exits 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !backup.join("vm.day").exists(),
        "the counter moved after a failed night"
    );
    // The same happens when vmdkit's reader goes away while mbuffer itself says 0.
    mbuffer("head -c 4096 > \"${@: -1}\"; exit 0");
    let out = night();
    assert!(!out.status.success(), "a short tape exits 0");
    assert!(!backup.join("vm.day").exists());
    // A good night.
    mbuffer("cat > \"${@: -1}\"");
    let out = night();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(backup.join("vm.day"))
            .unwrap()
            .trim(),
        "1"
    );
    assert!(std::fs::metadata(backup.join("vm.0.crc")).unwrap().len() > 0);
    vmdkit_ok(
        &vm,
        &[
            "verify",
            tape.to_str().unwrap(),
            "--manifest",
            backup.join("vm.0.crc").to_str().unwrap(),
        ],
    );
}

/// Item 12: a destination ending in `/` is a folder: made when missing (its parent must
/// exist), the output inside it; nothing lands beside it under the folder's name, and a
/// refused export leaves nothing anywhere.
#[test]
fn exports_into_a_missing_folder_make_it_or_leave_nothing() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "s.vmdk", "8M");
    qemu_io(d, "s.vmdk", &["write -P 0x22 0 1M"]);
    let want = qemu_raw(d, "s.vmdk");
    for kind in ["split", "flat", "thin", "stream", "sparse", "raw"] {
        let dst = format!("out-{kind}/");
        vmdkit_ok(d, &["export", "s.vmdk", &dst, "-d", kind, "-q"]);
        let inside = d.join(format!("out-{kind}")).join("s.vmdk");
        assert!(inside.exists(), "{kind}: no output inside the folder");
        if kind != "raw" {
            assert_same(&qemu_raw(d, inside.to_str().unwrap()), &want, kind);
        } else {
            assert_same(&std::fs::read(&inside).unwrap(), &want, kind);
        }
    }
    let before = listing(d);
    for kind in ["split", "flat", "thin", "stream", "sparse", "raw"] {
        let err = vmdkit_err(d, &["export", "s.vmdk", "no/such/", "-d", kind, "-q"]);
        assert!(err.contains("does not exist"), "{kind}: {err}");
        // A manifest that cannot be written refuses the export before any work.
        let err = vmdkit_err(
            d,
            &[
                "export",
                "s.vmdk",
                &format!("m-{kind}.vmdk"),
                "-d",
                kind,
                "--manifest",
                "no/such/m.crc",
                "-q",
            ],
        );
        assert!(!err.is_empty(), "{kind}");
    }
    assert_eq!(listing(d), before, "refused exports left files behind");
}

/// Item 13: no output error panics; documented exit codes only.
#[test]
fn output_errors_never_panic() {
    let t = tmp();
    let d = t.path();
    for (script, want) in [
        (
            "$V completions bash | head -c1 >/dev/null; echo ${PIPESTATUS[0]}",
            "0",
        ),
        ("$V completions bash >/dev/full; echo $?", "1"),
        ("$V man >/dev/full; echo $?", "1"),
        ("$V vmkfstools --help >/dev/full; echo $?", "1"),
        ("$V --help >/dev/full; echo $?", "1"),
        (
            "$V --help | head -c1 >/dev/null; echo ${PIPESTATUS[0]}",
            "0",
        ),
        ("$V info missing.vmdk 2>/dev/full; echo $?", "1"),
        (
            "$V create x.vmdk --size 1M -q && $V ls . >/dev/full; echo $?",
            "1",
        ),
    ] {
        let out = bash(d, script);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "{script}: {err}"
        );
        assert!(!err.contains("panicked"), "{script}: {err}");
    }
}

/// Item 14 and item 16's `create`: a capacity no VMware product makes (over 62 TiB) is
/// refused at once unless asked for, from a 64 KiB stream on stdin as from the command
/// line; nothing is written.
#[test]
fn impossible_capacities_are_refused_at_once() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "s.vmdk", "1M");
    vmdkit_ok(d, &["export", "s.vmdk", "small.vmdk", "-d", "stream", "-q"]);
    let mut b = std::fs::read(d.join("small.vmdk")).unwrap();
    b[12..20].copy_from_slice(&(1u64 << 50).to_le_bytes());
    b.resize(64 << 10, 0);
    let before = listing(d);
    let r = vmdkit_limited(d, &["import", "-", "huge.vmdk", "-q"], Some(&b), 20);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("62 TiB"), "{}", r.stderr);
    let r = vmdkit_limited(d, &["create", "c.vmdk", "--size", "4194304t"], None, 20);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("62 TiB"), "{}", r.stderr);
    assert_eq!(listing(d), before, "nothing written");
    vmdkit_ok(
        d,
        &[
            "create", "c.vmdk", "--size", "63t", "-d", "sparse", "--large", "-q",
        ],
    );
    let err = vmdkit_err(d, &["extend", "s.vmdk", "--size", "100t"]);
    assert!(err.contains("62 TiB"), "{err}");
}

/// Item 15: what the readers refuse, check never calls clean: an SESparse delta whose
/// grains lie past the end of its file; a stream whose grain-directory marker claims 2^60
/// sectors. A grain that inflates short, and a grain both zeroed and stored, are corrupt
/// input that import and apply refuse.
#[test]
fn check_and_the_readers_agree_on_corrupt_inputs() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let (b, _) = super::deltas_handmade::sesparse_chain(d);
    std::fs::write(d.join("s-sesparse.vmdk"), &b[..136 * 512]).unwrap();
    assert!(
        vmdkit(d, &["cat", "s.vmdk"]).status.code() != Some(0),
        "the reader refuses it"
    );
    let out = vmdkit(d, &["check", "s.vmdk"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("past the end"), "{text}");

    // A stream whose GD marker claims 2^60 sectors.
    qemu_create(d, "monolithicSparse", "p.vmdk", "4M");
    qemu_io(d, "p.vmdk", &["write -P 0x33 0 256k"]);
    vmdkit_ok(d, &["export", "p.vmdk", "st.vmdk", "-d", "stream", "-q"]);
    let mut st = std::fs::read(d.join("st.vmdk")).unwrap();
    let gd_at = u64::from_le_bytes(st[56..64].try_into().unwrap()); // footer-less header: gd
    let footer = st.len() - 1024;
    let gd = if gd_at == u64::MAX {
        u64::from_le_bytes(st[footer + 56..footer + 64].try_into().unwrap())
    } else {
        gd_at
    } as usize;
    let marker = (gd - 1) * 512;
    assert_eq!(
        u32::from_le_bytes(st[marker + 12..marker + 16].try_into().unwrap()),
        2,
        "GD marker"
    );
    st[marker..marker + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(d.join("bad-gd.vmdk"), &st).unwrap();
    let out = vmdkit(d, &["check", "bad-gd.vmdk"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A grain that inflates short: recompress grain 0's data to half its length.
    let good = std::fs::read(d.join("st.vmdk")).unwrap();
    let over = u64::from_le_bytes(good[64..72].try_into().unwrap()) as usize * 512;
    let size = u32::from_le_bytes(good[over + 8..over + 12].try_into().unwrap()) as usize;
    let short = {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&[0x33u8; 32768]).unwrap();
        z.finish().unwrap()
    };
    assert!(short.len() <= size + 12, "fits the old record");
    let mut sh = good.clone();
    sh[over + 8..over + 12].copy_from_slice(&(short.len() as u32).to_le_bytes());
    sh[over + 12..over + 12 + short.len()].copy_from_slice(&short);
    std::fs::write(d.join("short.vmdk"), &sh).unwrap();
    let err = vmdkit_err(d, &["import", "short.vmdk", "x.vmdk", "-q"]);
    assert!(err.contains("short"), "{err}");
    let out = Command::new(bin())
        .args(["import", "-", "y.vmdk", "-q"])
        .current_dir(d)
        .stdin(std::fs::File::open(d.join("short.vmdk")).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("short"));
    assert!(!d.join("x.vmdk").exists() && !d.join("y.vmdk").exists());

    // An increment whose grain table zeroes a grain it also stores.
    qemu_child(d, "p.vmdk", "c.vmdk", true);
    qemu_io(d, "c.vmdk", &["write -P 0x44 0 64k", "write -z 128k 64k"]);
    vmdkit_ok(d, &["export", "p.vmdk", "full.vmdk", "-q"]);
    vmdkit_ok(d, &["export", "c.vmdk", "inc.vmdk", "--delta", "-q"]);
    let mut inc = std::fs::read(d.join("inc.vmdk")).unwrap();
    // Find the GT marker and set the stored grain 0's entry to 1 (zeroed).
    let mut pos = u64::from_le_bytes(inc[64..72].try_into().unwrap()) as usize * 512;
    let mut done = false;
    while pos + 512 <= inc.len() {
        let val = u64::from_le_bytes(inc[pos..pos + 8].try_into().unwrap());
        let size = u32::from_le_bytes(inc[pos + 8..pos + 12].try_into().unwrap()) as usize;
        if size > 0 {
            pos += (12 + size).div_ceil(512) * 512;
            continue;
        }
        let kind = u32::from_le_bytes(inc[pos + 12..pos + 16].try_into().unwrap());
        if kind == 1 {
            assert_eq!(
                u32::from_le_bytes(inc[pos + 512 + 8..pos + 512 + 12].try_into().unwrap()),
                1,
                "grain 2 zeroed"
            );
            inc[pos + 512..pos + 516].copy_from_slice(&1u32.to_le_bytes());
            done = true;
            break;
        }
        if kind == 0 {
            break;
        }
        pos += 512 + val as usize * 512;
    }
    assert!(done, "a grain table in the increment");
    std::fs::write(d.join("both.vmdk"), &inc).unwrap();
    let r = d.join("r");
    std::fs::create_dir(&r).unwrap();
    vmdkit_ok(
        &r,
        &["import", "../full.vmdk", "vm.vmdk", "-d", "sparse", "-q"],
    );
    let before = sha256_file(&r.join("vm.vmdk"));
    let err = vmdkit_err(&r, &["apply", "vm.vmdk", "../both.vmdk"]);
    assert!(
        err.contains("both zeroed") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(sha256_file(&r.join("vm.vmdk")), before);
}

/// Item 16: files the host marks read-only (0444) are refused by apply, write, extend and
/// check --repair as commit refuses them, root or not, unless --force; extending a
/// fullDevice disk never opens its device for writing.
#[test]
fn read_only_files_and_devices_are_refused_unless_asked() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "p.vmdk", "4M");
    qemu_io(d, "p.vmdk", &["write -P 0x31 0 256k"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(d, "c.vmdk", &["write -P 0x41 0 64k"]);
    vmdkit_ok(d, &["export", "p.vmdk", "full.vmdk", "-q"]);
    vmdkit_ok(d, &["export", "c.vmdk", "inc.vmdk", "--delta", "-q"]);
    vmdkit_ok(d, &["import", "full.vmdk", "r.vmdk", "-d", "sparse", "-q"]);
    qemu_create(d, "monolithicSparse", "solo.vmdk", "4M");
    std::fs::write(d.join("w.bin"), vec![7u8; 4096]).unwrap();
    for f in ["r.vmdk", "c.vmdk", "solo.vmdk"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let sums =
        |fs: &[&str]| -> Vec<String> { fs.iter().map(|f| sha256_file(&d.join(f))).collect() };
    let before = sums(&["r.vmdk", "c.vmdk", "solo.vmdk"]);
    for args in [
        &["apply", "r.vmdk", "inc.vmdk"][..],
        &["write", "c.vmdk", "--offset", "0", "w.bin"],
        &["extend", "solo.vmdk", "--size", "8M"],
        &["check", "--repair", "solo.vmdk"],
    ] {
        let err = vmdkit_err(d, args);
        assert!(err.contains("read-only"), "{args:?}: {err}");
    }
    assert_eq!(
        sums(&["r.vmdk", "c.vmdk", "solo.vmdk"]),
        before,
        "refused commands change nothing"
    );
    vmdkit_ok(d, &["apply", "r.vmdk", "inc.vmdk", "--force", "-q"]);
    assert_same(
        &qemu_raw(d, "r.vmdk"),
        &qemu_raw(d, "c.vmdk"),
        "forced apply",
    );
    vmdkit_ok(d, &["extend", "solo.vmdk", "--size", "8M", "--force"]);

    // A fullDevice disk (a file stands in for the device).
    let dev = d.join("disk.img");
    std::fs::write(&dev, vec![0x31u8; 1 << 20]).unwrap();
    std::fs::write(
        d.join("dev.vmdk"),
        format!("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"fullDevice\"\n\n# Extent description\nRW 2048 FLAT \"{}\" 0\n", dev.display()),
    )
    .unwrap();
    let before = (sha256_file(&dev), std::fs::metadata(&dev).unwrap().len());
    let err = vmdkit_err(d, &["extend", "dev.vmdk", "--size", "2M"]);
    assert!(err.contains("device"), "{err}");
    assert_eq!(
        (sha256_file(&dev), std::fs::metadata(&dev).unwrap().len()),
        before
    );
}
