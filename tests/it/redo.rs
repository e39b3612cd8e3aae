//! REDO logs and deltas: read through any chain equals a model (a plain buffer with the
//! same writes applied); commits leave the parent equal to the model and qemu agrees.

use super::util::*;
use std::path::Path;

const MIB: usize = 1 << 20;

fn flat_base(d: &Path, mib: usize) -> Vec<u8> {
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "base.vmdk",
            &format!("{mib}M"),
        ],
    );
    qemu_io(
        d,
        "base.vmdk",
        &["write -P 0x11 0 3M", "write -P 0x22 5M 1M"],
    );
    let mut m = vec![0u8; mib * MIB];
    m[..3 * MIB].fill(0x11);
    m[5 * MIB..6 * MIB].fill(0x22);
    m
}

#[test]
fn vmfs_sparse_and_hosted_deltas_read_like_the_model_and_like_qemu() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let mut model = flat_base(d, 16);
    let top = String::from_utf8(
        vmdkit_ok(d, &["redo", "add", "base.vmdk", "--style", "vmfsSparse"]).stdout,
    )
    .unwrap();
    assert_eq!(top.trim(), "base-000001.vmdk");
    model_write(
        d,
        "base-000001.vmdk",
        &mut model,
        4096,
        &pattern(1, 100_000),
    );
    model_write(
        d,
        "base-000001.vmdk",
        &mut model,
        7 * MIB + 1536,
        &pattern(2, 3000),
    );
    model_zero(d, "base-000001.vmdk", &mut model, 5 * MIB + 512, 4096);
    let top2 = String::from_utf8(
        vmdkit_ok(d, &["redo", "add", "base-000001.vmdk", "--style", "hosted"]).stdout,
    )
    .unwrap();
    assert_eq!(top2.trim(), "base-000002.vmdk");
    model_write(
        d,
        "base-000002.vmdk",
        &mut model,
        2 * MIB + 100 * 512,
        &pattern(3, 200_000),
    );
    model_zero(d, "base-000002.vmdk", &mut model, 0, 65536);
    assert_same(
        &vmdkit_raw(d, "base-000002.vmdk"),
        &model,
        "vmdkit reads the chain",
    );
    // qemu opens what we wrote, both styles, and reads the same.
    assert_same(
        &qemu_raw(d, "base-000002.vmdk"),
        &model,
        "qemu reads the chain",
    );
    qemu_img(d, &["check", "base-000002.vmdk"]);
    let info = qemu_img(d, &["info", "base-000001.vmdk"]);
    assert!(
        info.contains("vmfsSparse") && info.contains("backing file: base.vmdk"),
        "{info}"
    );
    // Commit level by level: hosted into COWD, then COWD into flat.
    vmdkit_ok(d, &["commit", "base-000002.vmdk", "-q"]);
    assert!(!d.join("base-000002.vmdk").exists());
    assert_same(
        &qemu_raw(d, "base-000001.vmdk"),
        &model,
        "after first commit",
    );
    vmdkit_ok(d, &["commit", "base-000001.vmdk", "-q"]);
    assert!(!d.join("base-000001.vmdk").exists() && !d.join("base-000001-delta.vmdk").exists());
    assert_same(&qemu_raw(d, "base.vmdk"), &model, "after second commit");
}

#[test]
fn esx2_redo_logs_commit_level_by_level() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let mut model = flat_base(d, 8);
    assert_eq!(
        String::from_utf8(vmdkit_ok(d, &["redo", "add", "base.vmdk", "--style", "redo"]).stdout)
            .unwrap()
            .trim(),
        "base.vmdk.REDO"
    );
    model_write(
        d,
        "base.vmdk.REDO",
        &mut model,
        1000 * 512,
        &pattern(4, 70_000),
    );
    // A second REDO log of the base cannot exist (the name is the link): the next one
    // goes on the top.
    let err = vmdkit_err(d, &["redo", "add", "base.vmdk"]);
    assert!(
        err.contains("already has the delta `base.vmdk.REDO`"),
        "{err}"
    );
    assert_eq!(
        String::from_utf8(vmdkit_ok(d, &["redo", "add", "base.vmdk.REDO"]).stdout)
            .unwrap()
            .trim(),
        "base.vmdk.REDO.REDO"
    );
    model_write(
        d,
        "base.vmdk.REDO.REDO",
        &mut model,
        1020 * 512,
        &pattern(5, 1024),
    );
    assert_same(
        &vmdkit_raw(d, "base.vmdk.REDO.REDO"),
        &model,
        "three levels",
    );
    // A REDO is a bare COWD: the parent name is in its header.
    let b = std::fs::read(d.join("base.vmdk.REDO.REDO")).unwrap();
    assert_eq!(&b[0..4], b"COWD");
    assert_eq!(&b[0x20..0x20 + 14], b"base.vmdk.REDO");
    vmdkit_ok(d, &["commit", "base.vmdk.REDO.REDO", "-q"]);
    assert_same(
        &vmdkit_raw(d, "base.vmdk.REDO"),
        &model,
        "REDO.REDO into REDO",
    );
    vmdkit_ok(d, &["commit", "base.vmdk.REDO", "-q"]);
    assert_same(
        &qemu_raw(d, "base.vmdk"),
        &model,
        "REDO into base (qemu reads it)",
    );
    assert!(!d.join("base.vmdk.REDO").exists());
}

/// qemu-made hosted chain: commit into a sparse parent; qemu-img check of the parent.
fn sparse_chain(d: &Path) -> Vec<u8> {
    qemu_img(d, &["create", "-q", "-f", "vmdk", "p.vmdk", "64M"]);
    qemu_io(
        d,
        "p.vmdk",
        &["write -P 0x31 0 2M", "write -P 0x32 10M 64k"],
    );
    qemu_child(d, "p.vmdk", "c.vmdk", true);
    qemu_io(
        d,
        "c.vmdk",
        &[
            "write -P 0x33 1M 100k",
            "write -z 0 64k",
            "write -P 0x34 40M 4k",
            "write -P 0x35 63M 1M",
        ],
    );
    qemu_raw(d, "c.vmdk")
}

#[test]
fn commit_into_a_sparse_parent_matches_qemu() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let model = sparse_chain(d);
    let dry = String::from_utf8(vmdkit_ok(d, &["commit", "c.vmdk", "--dry-run"]).stdout).unwrap();
    assert!(dry.contains("would remove: c.vmdk"), "{dry}");
    assert!(d.join("c.vmdk").exists(), "dry run changes nothing");
    let cid_before = qemu_img(d, &["info", "--output=json", "p.vmdk"]);
    vmdkit_ok(d, &["commit", "c.vmdk", "-q"]);
    assert!(!d.join("c.vmdk").exists());
    qemu_img(d, &["check", "p.vmdk"]);
    assert_same(&qemu_raw(d, "p.vmdk"), &model, "parent after commit");
    let cid_after = qemu_img(d, &["info", "--output=json", "p.vmdk"]);
    let cid = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["format-specific"]["data"]["cid"]
            .clone()
    };
    assert_ne!(
        cid(&cid_before),
        cid(&cid_after),
        "the parent's CID changes"
    );
}

#[test]
fn commit_refuses_cid_mismatch_siblings_streams_and_read_only_parents() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    sparse_chain(d);
    // Sibling: another child of p.vmdk.
    qemu_child(d, "p.vmdk", "sib.vmdk", false);
    let err = vmdkit_err(d, &["commit", "c.vmdk"]);
    assert!(
        err.contains("sib.vmdk") && err.contains("also has") && err.contains("--force"),
        "{err}"
    );
    std::fs::remove_file(d.join("sib.vmdk")).unwrap();
    // Read-only parent.
    let mut perm = std::fs::metadata(d.join("p.vmdk")).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(d.join("p.vmdk"), perm.clone()).unwrap();
    let err = vmdkit_err(d, &["commit", "c.vmdk"]);
    assert!(err.contains("read-only"), "{err}");
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(d.join("p.vmdk"), perm).unwrap();
    // CID mismatch: the parent changed after the child was made.
    qemu_io(d, "p.vmdk", &["write -P 0x77 30M 4k"]);
    let err = vmdkit_err(d, &["commit", "c.vmdk"]);
    assert!(
        err.contains("does not match the CID") && err.contains("refusing to commit"),
        "{err}"
    );
    // Stream parent.
    qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "p.vmdk",
            "s.vmdk",
        ],
    );
    qemu_child(d, "s.vmdk", "sc.vmdk", false);
    let err = vmdkit_err(d, &["commit", "sc.vmdk"]);
    assert!(err.contains("streamOptimized"), "{err}");
}

#[test]
fn commit_all_merges_the_whole_chain_into_the_base() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let mut model = flat_base(d, 8);
    vmdkit_ok(d, &["redo", "add", "base.vmdk", "--style", "vmfsSparse"]);
    model_write(d, "base-000001.vmdk", &mut model, 512, &pattern(6, 5000));
    vmdkit_ok(
        d,
        &["redo", "add", "base-000001.vmdk", "--style", "vmfsSparse"],
    );
    model_write(d, "base-000002.vmdk", &mut model, 4096, &pattern(7, 5000));
    vmdkit_ok(d, &["redo", "add", "base-000002.vmdk", "--style", "hosted"]);
    model_zero(d, "base-000003.vmdk", &mut model, 0, 65536);
    vmdkit_ok(d, &["commit", "--all", "base-000003.vmdk", "-q"]);
    for f in [
        "base-000001.vmdk",
        "base-000001-delta.vmdk",
        "base-000002.vmdk",
        "base-000003.vmdk",
    ] {
        assert!(!d.join(f).exists(), "{f} removed");
    }
    assert_same(&qemu_raw(d, "base.vmdk"), &model, "base after --all");
}

/// Kill the commit at every write (and at random moments with SIGKILL); a second run
/// must finish it with the right content, and qemu-img check must pass.
#[test]
fn commit_killed_at_any_point_is_finished_by_a_rerun() {
    need_qemu!();
    let t = tmp();
    let d0 = t.path().join("orig");
    std::fs::create_dir(&d0).unwrap();
    let model = sparse_chain(&d0);
    // The size of an uninterrupted commit: a resumed one must be no larger (issue 9,
    // item 10: the first attempt's grains used to leak).
    let clean = t.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    for f in ["p.vmdk", "c.vmdk"] {
        std::fs::copy(d0.join(f), clean.join(f)).unwrap();
    }
    vmdkit_ok(&clean, &["commit", "c.vmdk", "-q"]);
    let clean_len = std::fs::metadata(clean.join("p.vmdk")).unwrap().len();
    let mut aborted = 0;
    for n in 0..50 {
        let d = t.path().join(format!("run{n}"));
        std::fs::create_dir(&d).unwrap();
        for f in ["p.vmdk", "c.vmdk"] {
            std::fs::copy(d0.join(f), d.join(f)).unwrap();
        }
        let out = std::process::Command::new(bin())
            .args(["commit", "c.vmdk", "-q", "--threads", "2"])
            .current_dir(&d)
            .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        if !out.status.success() {
            aborted += 1;
            // Rerun without the fault.
            vmdkit_ok(&d, &["commit", "c.vmdk", "-q"]);
        }
        assert!(!d.join("c.vmdk").exists(), "run {n}: child removed");
        assert!(
            !d.join("c.vmdk.vmdkit-commit").exists(),
            "run {n}: state removed"
        );
        qemu_img(&d, &["check", "p.vmdk"]);
        // Our own check also compares primary and redundant tables and finds leaks.
        let chk = vmdkit(&d, &["check", "p.vmdk"]);
        assert!(
            chk.status.success(),
            "run {n}: check after the resumed commit: {}{}",
            String::from_utf8_lossy(&chk.stdout),
            String::from_utf8_lossy(&chk.stderr)
        );
        let len = std::fs::metadata(d.join("p.vmdk")).unwrap().len();
        assert_eq!(len, clean_len, "run {n}: resumed parent's size");
        assert!(
            !d.join("c.vmdk.vmdkit-commit.journal").exists(),
            "run {n}: journal removed"
        );
        assert_same(&vmdkit_raw(&d, "p.vmdk"), &model, &format!("run {n}"));
        std::fs::remove_dir_all(&d).unwrap();
    }
    assert!(aborted > 10, "the fault hook hit {aborted} points");
}
