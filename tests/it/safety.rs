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
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "vmdk", "-b", "p.vmdk", "-F", "vmdk", name,
        ],
    );
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
    assert!(err.contains("different file"), "{err}");
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
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "f.vmdk",
            "8M",
        ],
    );
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
        text.contains("guest bytes 0x2100000..0x2110000 are lost"),
        "{text}"
    );
    assert!(
        text.contains("Lost guest data: 65536 bytes in 1 ranges"),
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
