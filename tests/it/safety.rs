//! Issue 9: nothing lost, nothing reached that was not asked for, no debris. Each test
//! reproduces one way the tool used to lose data or touch what it should not.

use super::util::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// A 64 MiB qemu sparse parent `p.vmdk` with data, and a child `c.vmdk` with changes.
fn parent_and_child(d: &Path) {
    qemu_img(d, &["create", "-q", "-f", "vmdk", "p.vmdk", "64M"]);
    qemu_io(
        d,
        "p.vmdk",
        &["write -P 0x31 0 2M", "write -P 0x32 33M 64k"],
    );
    child(d, "c.vmdk", 0x41);
}

fn child(d: &Path, name: &str, pattern: u8) {
    qemu_child(d, "p.vmdk", name, false);
    qemu_io(
        d,
        name,
        &[
            &format!("write -P {pattern} 1M 128k"),
            "write -P 0x42 40M 64k",
        ],
    );
}

/// Item 1: a state file left in phase `remove` after the delta was removed must never
/// act on a new delta that took the same name.
#[test]
fn stale_commit_state_never_acts_on_a_new_delta() {
    need_qemu!();
    let t = tmp();
    let orig = t.path().join("orig");
    std::fs::create_dir(&orig).unwrap();
    parent_and_child(&orig);
    // Find an abort point that leaves the state file with the delta already removed.
    let mut found = None;
    for n in 0..80 {
        let d = t.path().join(format!("run{n}"));
        std::fs::create_dir(&d).unwrap();
        for f in ["p.vmdk", "c.vmdk"] {
            std::fs::copy(orig.join(f), d.join(f)).unwrap();
        }
        let out = Command::new(bin())
            .args(["commit", "c.vmdk", "-q"])
            .current_dir(&d)
            .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        if !out.status.success()
            && !d.join("c.vmdk").exists()
            && d.join("c.vmdk.vmdkit-commit").exists()
        {
            found = Some(d);
            break;
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
    let d = found.expect("an abort point between the removals");
    let merged = qemu_raw(&d, "p.vmdk");
    // A new delta takes the old name (qemu-img sets its parentCID to p's new CID).
    child(&d, "c.vmdk", 0x51);
    let before = sha256_file(&d.join("c.vmdk"));
    let err = vmdkit_err(&d, &["commit", "c.vmdk", "-q"]);
    // Refused: the state's records are not this file, and the parent does not hold
    // this delta's content either (the proof a resumed removal needs).
    assert!(
        err.contains("different file") || err.contains("does not hold the delta's content"),
        "{err}"
    );
    assert!(d.join("c.vmdk").exists(), "the new delta must survive");
    assert_eq!(sha256_file(&d.join("c.vmdk")), before);
    assert_same(&qemu_raw(&d, "p.vmdk"), &merged, "parent untouched");
}

/// Item 5: an output that is the source, one of its extents, or any file of its chain
/// (through links too) is refused, even with --force.
#[test]
fn outputs_never_overwrite_their_own_source() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    parent_and_child(d);
    qemu_create(d, "monolithicFlat", "f.vmdk", "8M");
    qemu_io(d, "f.vmdk", &["write -P 0x77 0 1M"]);
    std::os::unix::fs::symlink("p.vmdk", d.join("link-to-parent.vmdk")).unwrap();
    std::fs::hard_link(d.join("p.vmdk"), d.join("hard-parent.vmdk")).unwrap();
    let sums: Vec<String> = ["p.vmdk", "c.vmdk", "f.vmdk", "f-flat.vmdk"]
        .iter()
        .map(|f| sha256_file(&d.join(f)))
        .collect();
    let cases: &[&[&str]] = &[
        &["import", "c.vmdk", "c.vmdk", "--type", "raw", "--force"],
        &["import", "c.vmdk", "p.vmdk", "--type", "raw", "--force"],
        &[
            "import",
            "c.vmdk",
            "link-to-parent.vmdk",
            "--type",
            "raw",
            "--force",
        ],
        &[
            "import",
            "c.vmdk",
            "hard-parent.vmdk",
            "--type",
            "monolithicSparse",
            "--force",
        ],
        &[
            "import",
            "f.vmdk",
            "f-flat.vmdk",
            "--type",
            "raw",
            "--force",
        ],
        &[
            "export", "c.vmdk", "c.vmdk", "--format", "sparse", "--force",
        ],
        &[
            "export", "c.vmdk", "p.vmdk", "--format", "stream", "--force",
        ],
        &["export", "f.vmdk", "f.vmdk", "--format", "flat", "--force"],
        &[
            "export",
            "c.vmdk",
            "x.vmdk",
            "--manifest",
            "p.vmdk",
            "--force",
        ],
        &["cat", "c.vmdk", "-o", "p.vmdk", "--force"],
    ];
    for args in cases {
        let err = vmdkit_err(d, args);
        assert!(
            err.contains("refusing to write over its own input"),
            "{args:?}: {err}"
        );
    }
    let after: Vec<String> = ["p.vmdk", "c.vmdk", "f.vmdk", "f-flat.vmdk"]
        .iter()
        .map(|f| sha256_file(&d.join(f)))
        .collect();
    assert_eq!(sums, after, "no source file changed");
}

/// Item 6: a command that changes a disk locks it; a second writer is told at once.
#[test]
fn a_second_writer_is_refused_while_a_commit_runs() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    parent_and_child(d);
    let model = {
        let e = tmp();
        for f in ["p.vmdk", "c.vmdk"] {
            std::fs::copy(d.join(f), e.path().join(f)).unwrap();
        }
        qemu_img(e.path(), &["commit", "-q", "c.vmdk"]);
        qemu_raw(e.path(), "p.vmdk")
    };
    // The commit holds its locks for 3 s (test hook) before it writes anything.
    let mut slow = Command::new(bin())
        .args(["commit", "c.vmdk", "-q"])
        .current_dir(d)
        .env("VMDKIT_TEST_HOLD_LOCK_MS", "3000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let tries: &[&[&str]] = &[
        &["commit", "c.vmdk", "-q"],
        &["write", "c.vmdk", "--offset", "0", "--zero", "65536"],
        &[
            "write", "p.vmdk", "--offset", "0", "--zero", "65536", "--force",
        ],
        &["check", "--repair", "p.vmdk"],
        &["extend", "p.vmdk", "--size", "128m", "--force"],
        &["redo", "add", "p.vmdk"],
        &["export", "c.vmdk", "out.vmdk"],
    ];
    for args in tries {
        let start = std::time::Instant::now();
        let err = vmdkit_err(d, args);
        assert!(err.contains("in use by another process"), "{args:?}: {err}");
        assert!(
            start.elapsed().as_secs() < 2,
            "{args:?} waited for the lock"
        );
    }
    assert!(slow.wait().unwrap().success());
    assert!(!d.join("out.vmdk").exists());
    assert_same(&qemu_raw(d, "p.vmdk"), &model, "commit result");
}

/// A qemu-made 64 MiB sparse disk with data at 0 and at 33 MiB (two grain tables),
/// and its header's directory offsets (sectors).
fn two_table_disk(d: &Path) -> (Vec<u8>, usize, usize) {
    qemu_img(d, &["create", "-q", "-f", "vmdk", "good.vmdk", "64M"]);
    qemu_io(
        d,
        "good.vmdk",
        &["write -P 0x61 0 64k", "write -P 0x62 33M 64k"],
    );
    let img = std::fs::read(d.join("good.vmdk")).unwrap();
    let u64_at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap()) as usize;
    let (rgd, gd) = (u64_at(48), u64_at(56));
    (img, gd, rgd)
}

fn check_code(d: &Path, args: &[&str]) -> (i32, String) {
    let out = vmdkit(d, args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code().unwrap(), text)
}

/// Item 2: directory entry 0 made equal to entry 1 (both point at valid tables):
/// nothing proves which copy is right, so repair declines and the content that reads
/// right (32-64 MiB) stays right.
#[test]
fn repair_declines_when_nothing_proves_which_copy_is_right() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let (mut img, gd, _) = two_table_disk(d);
    let e1: [u8; 4] = img[gd * 512 + 4..gd * 512 + 8].try_into().unwrap();
    img[gd * 512..gd * 512 + 4].copy_from_slice(&e1);
    std::fs::write(d.join("bad.vmdk"), &img).unwrap();
    let good_raw = qemu_raw(d, "good.vmdk");
    let before_raw = vmdkit_raw(d, "bad.vmdk");
    // The upper half reads right before the repair...
    assert_same(
        &before_raw[32 << 20..],
        &good_raw[32 << 20..],
        "upper half before",
    );
    let before = sha256_file(&d.join("bad.vmdk"));
    let (code, text) = check_code(d, &["check", "--repair", "bad.vmdk"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("both point at the table"), "{text}");
    assert!(text.contains("not repaired"), "{text}");
    // ...and after it: nothing was made worse (here: nothing was changed).
    assert_eq!(sha256_file(&d.join("bad.vmdk")), before);
    let after_raw = vmdkit_raw(d, "bad.vmdk");
    assert_same(
        &after_raw[32 << 20..],
        &good_raw[32 << 20..],
        "upper half after",
    );
}

/// Item 3: a file cut in the middle of a grain: `check` never writes; `--repair` does
/// not zero-extend it into "No errors"; the lost guest bytes are named and exit is 2.
#[test]
fn a_truncated_file_is_never_written_by_check_nor_called_clean() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let (img, _, _) = two_table_disk(d);
    // The last grain (33 MiB) is the file's tail: cut it in half.
    let cut = img.len() - 32768;
    std::fs::write(d.join("bad.vmdk"), &img[..cut]).unwrap();
    let before = sha256_file(&d.join("bad.vmdk"));
    let (code, text) = check_code(d, &["check", "bad.vmdk"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("guest bytes 0x2100000-0x210ffff are lost"),
        "{text}"
    );
    assert!(
        text.contains("Lost guest data: 65536 bytes (64.0 KiB) in 1 range;")
            && text.contains("(bytes 0x2100000-0x210ffff, 64.0 KiB)"),
        "{text}"
    );
    assert_eq!(sha256_file(&d.join("bad.vmdk")), before, "check wrote");
    let (code, text) = check_code(d, &["check", "--repair", "bad.vmdk"]);
    assert_eq!(code, 2, "{text}");
    assert!(!text.contains("No errors"), "{text}");
    assert!(text.contains("Lost guest data"), "{text}");
    assert_eq!(
        std::fs::metadata(d.join("bad.vmdk")).unwrap().len(),
        cut as u64
    );
}

/// Item 4: both directories wiped: the tables and grains are orphaned guest data
/// (exit 2), not leaks, and repair discards nothing.
#[test]
fn wiped_directories_are_corruption_and_repair_discards_nothing() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let (mut img, gd, rgd) = two_table_disk(d);
    img[gd * 512..gd * 512 + 512].fill(0);
    img[rgd * 512..rgd * 512 + 512].fill(0);
    std::fs::write(d.join("bad.vmdk"), &img).unwrap();
    let before = sha256_file(&d.join("bad.vmdk"));
    let (code, text) = check_code(d, &["check", "bad.vmdk"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("orphaned grain table"), "{text}");
    let (code, text) = check_code(d, &["check", "--repair", "bad.vmdk"]);
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        sha256_file(&d.join("bad.vmdk")),
        before,
        "repair changed the file"
    );
    assert_eq!(
        std::fs::metadata(d.join("bad.vmdk")).unwrap().len(),
        img.len() as u64
    );
}

/// Item 7: writing into a disk other deltas name as parent breaks them: refused
/// without --force, naming the children; exporting over a base of the chain always is.
#[test]
fn writes_into_a_parent_are_refused_naming_its_children() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    parent_and_child(d);
    let before = sha256_file(&d.join("p.vmdk"));
    let err = vmdkit_err(d, &["write", "p.vmdk", "--offset", "0", "--zero", "65536"]);
    assert!(err.contains("c.vmdk") && err.contains("--force"), "{err}");
    assert_eq!(sha256_file(&d.join("p.vmdk")), before);
    let err = vmdkit_err(
        d,
        &[
            "export", "c.vmdk", "p.vmdk", "--format", "sparse", "--force",
        ],
    );
    assert!(err.contains("its own input"), "{err}");
    assert_eq!(sha256_file(&d.join("p.vmdk")), before);
    // The child still reads through its parent.
    qemu_img(d, &["check", "c.vmdk"]);
    vmdkit_ok(
        d,
        &[
            "write", "p.vmdk", "--offset", "0", "--zero", "65536", "--force",
        ],
    );
}

/// Item 8: a refused write changes nothing, not even the descriptor's CID or spacing.
#[test]
fn a_refused_write_changes_nothing() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicFlat", "f.vmdk", "8M");
    // Trailing spaces that a rewrite would strip.
    let text = std::fs::read_to_string(d.join("f.vmdk")).unwrap() + "  \n";
    std::fs::write(d.join("f.vmdk"), &text).unwrap();
    let sums = || {
        (
            sha256_file(&d.join("f.vmdk")),
            sha256_file(&d.join("f-flat.vmdk")),
        )
    };
    let before = sums();
    std::fs::write(d.join("in.bin"), vec![7u8; 4096]).unwrap();
    for args in [
        &["write", "f.vmdk", "--offset", "8388608", "in.bin"][..],
        &["write", "f.vmdk", "--offset", "8384512", "--zero", "8192"],
        &["write", "f.vmdk", "--offset", "16777216", "--zero", "512"],
    ] {
        let err = vmdkit_err(d, args);
        assert!(
            err.contains("past the end") || err.contains("past the capacity"),
            "{err}"
        );
        assert_eq!(sums(), before, "{args:?}");
    }
    // A read-only extent.
    let ro = text.replace("RW ", "RDONLY ");
    std::fs::write(d.join("f.vmdk"), &ro).unwrap();
    let ro_sum = sha256_file(&d.join("f.vmdk"));
    let err = vmdkit_err(d, &["write", "f.vmdk", "--offset", "0", "in.bin"]);
    assert!(
        err.contains("RDONLY") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(sha256_file(&d.join("f.vmdk")), ro_sum);
    // From stdin, an input longer than the disk is refused before anything changes.
    std::fs::write(d.join("f.vmdk"), &text).unwrap();
    let mut child = Command::new(bin())
        .args(["write", "f.vmdk", "--offset", "4194304", "-"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        let _ = i.write_all(&vec![9u8; 5 << 20]);
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert_eq!(sums(), before);
}

/// Item 9: SIGINT, SIGTERM and SIGHUP remove the temporaries of unfinished outputs
/// (exit 128 + signal); a dead process's temporaries are removed by the next run
/// writing into the folder, and `ls` shows them.
#[test]
fn signals_and_later_runs_leave_no_temporaries() {
    let t = tmp();
    let d = t.path();
    for (sig, name) in [
        (libc::SIGINT, "int"),
        (libc::SIGTERM, "term"),
        (libc::SIGHUP, "hup"),
    ] {
        let out = format!("{name}.vmdk");
        let mut child = Command::new(bin())
            .args(["import", "-", &out, "-q", "--type", "monolithicSparse"])
            .current_dir(d)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Feed the start of a stream and keep the pipe open: the import waits for more.
        let mut stdin = child.stdin.take().unwrap();
        let src = tmp();
        vmdkit_ok(
            src.path(),
            &[
                "create",
                "s.vmdk",
                "--size",
                "64m",
                "--type",
                "monolithicSparse",
            ],
        );
        let noise: Vec<u8> = (0..40u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.path().join("n.bin"), noise).unwrap();
        vmdkit_ok(src.path(), &["write", "s.vmdk", "--offset", "0", "n.bin"]);
        let stream = vmdkit_ok(src.path(), &["export", "s.vmdk", "-", "-q", "--level", "1"]).stdout;
        {
            use std::io::Write;
            stdin.write_all(&stream[..stream.len() * 3 / 4]).unwrap();
            stdin.flush().unwrap();
        }
        let mut tries = 0;
        while !std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("vmdkit-tmp"))
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            tries += 1;
            assert!(tries < 200, "no temporary appeared");
        }
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().unwrap();
        drop(stdin);
        assert_eq!(status.code(), Some(128 + sig), "{name}");
        let left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
    }
    // A temporary of a process that is gone (PIDs never reach 2^22 + 1 on Linux).
    std::fs::write(d.join(".old.vmdk.vmdkit-tmp.4194305.0"), b"debris").unwrap();
    let ls = vmdkit_ok(d, &["ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stderr).contains(".old.vmdk.vmdkit-tmp.4194305.0"),
        "ls shows it"
    );
    vmdkit_ok(
        d,
        &[
            "create",
            "new.vmdk",
            "--size",
            "1m",
            "--type",
            "monolithicSparse",
        ],
    );
    assert!(!d.join(".old.vmdk.vmdkit-tmp.4194305.0").exists());
}

/// Item 11: after following links, an extent outside the descriptor's folder is
/// refused (read or written) unless --allow-outside-paths; so is a fullDevice
/// descriptor naming a regular file elsewhere. Absolute parent hints open with the flag.
#[test]
fn links_and_absolute_names_never_leave_the_folder_unasked() {
    need_qemu!();
    let t = tmp();
    let outside = t.path().join("outside");
    let d = t.path().join("vm");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(outside.join("secret"), vec![0x5au8; 1 << 20]).unwrap();
    let secret_sum = sha256_file(&outside.join("secret"));
    // A flat descriptor whose extent is a link out of the folder.
    qemu_create(&d, "monolithicFlat", "f.vmdk", "1M");
    std::fs::remove_file(d.join("f-flat.vmdk")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), d.join("f-flat.vmdk")).unwrap();
    for args in [
        &["cat", "f.vmdk"][..],
        &["export", "f.vmdk", "x.vmdk"],
        &["info", "f.vmdk"],
        &["write", "f.vmdk", "--offset", "0", "--zero", "512"],
        &["extend", "f.vmdk", "--size", "2m"],
    ] {
        let err = vmdkit_err(&d, args);
        assert!(
            err.contains("outside the descriptor's folder"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(sha256_file(&outside.join("secret")), secret_sum);
    let raw = vmdkit_ok(&d, &["cat", "f.vmdk", "--allow-outside-paths"]).stdout;
    assert_eq!(raw, vec![0x5au8; 1 << 20]);
    // A fullDevice descriptor naming a regular file outside the folder.
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"fullDevice\"\n\nRW 2048 FLAT \"{}\" 0\n",
        outside.join("secret").display()
    );
    std::fs::write(d.join("dev.vmdk"), desc).unwrap();
    for args in [
        &["cat", "dev.vmdk"][..],
        &["extend", "dev.vmdk", "--size", "4m"],
    ] {
        let err = vmdkit_err(&d, args);
        assert!(err.contains("only block devices"), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::metadata(outside.join("secret")).unwrap().len(),
        1 << 20
    );
    // A hosted linked clone whose parent hint is an absolute path elsewhere.
    qemu_img(&outside, &["create", "-q", "-f", "vmdk", "base.vmdk", "4M"]);
    qemu_io(&outside, "base.vmdk", &["write -P 0x66 0 64k"]);
    let base = outside.join("base.vmdk");
    qemu_img(
        &d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "vmdk",
            "clone.vmdk",
        ],
    );
    let err = vmdkit_err(&d, &["cat", "clone.vmdk"]);
    assert!(err.contains("not found"), "{err}");
    let raw = vmdkit_ok(&d, &["cat", "clone.vmdk", "--allow-outside-paths"]).stdout;
    assert_same(&raw, &qemu_raw(&d, "clone.vmdk"), "linked clone");
}
