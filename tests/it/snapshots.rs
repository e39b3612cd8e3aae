//! Issue 17, items 7-9: snapshot deletes keep the chain. Committing a middle snapshot
//! merges it into its parent and re-points its child (as VMware's snapshot delete does),
//! crash-safely; what depends on a changed disk is never guessed at; `redo add` never
//! branches or reuses a name unasked and follows the chain's own style. Oracle: qemu-img's
//! reading of the running disk before and after, `qemu-img check`.

use super::util::*;
use std::path::Path;
use std::process::Command;

const MIB: usize = 1 << 20;

/// base.vmdk <- vm-000001 <- vm-000002 <- vm-000003 (the running disk), each with data.
fn hosted_chain(d: &Path) {
    qemu_create(d, "monolithicSparse", "base.vmdk", "32M");
    qemu_io(d, "base.vmdk", &["write -P 0x10 0 4M"]);
    let mut parent = "base.vmdk".to_string();
    for (i, pat) in [(1, 0x21), (2, 0x32), (3, 0x43)] {
        let name = format!("vm-{i:06}.vmdk");
        qemu_child(d, &parent, &name, false);
        qemu_io(
            d,
            &name,
            &[
                &format!("write -P {pat} {}M 1M", i * 2),
                &format!("write -P {} {}k 96k", pat + 1, 100 * i),
            ],
        );
        parent = name;
    }
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Item 7: `commit vm-000002.vmdk` under the running vm-000003 merges it into vm-000001 and
/// re-points vm-000003 (parentFileNameHint and parentCID): vm-000003 reads exactly as
/// before, for qemu and for vmdkit's strict CID check. Killed at every write point, a
/// rerun finishes it the same way and no file of the chain is lost on the way.
#[test]
fn committing_a_middle_snapshot_repoints_the_running_disk() {
    need_qemu!();
    let t = tmp();
    let orig = t.path().join("orig");
    std::fs::create_dir(&orig).unwrap();
    hosted_chain(&orig);
    let running = qemu_raw(&orig, "vm-000003.vmdk");
    let mut aborted = 0;
    for n in 0..300 {
        let d = t.path().join(format!("run{n}"));
        std::fs::create_dir(&d).unwrap();
        for f in names(&orig) {
            std::fs::copy(orig.join(&f), d.join(&f)).unwrap();
        }
        let out = Command::new(bin())
            .args(["commit", "vm-000002.vmdk", "-q"])
            .current_dir(&d)
            .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let finished = out.status.success();
        if !finished {
            aborted += 1;
            // Whatever the crash point, the running disk's chain is whole for vmdkit
            // (pending operations are named, never silently wrong) once rerun.
            vmdkit_ok(&d, &["commit", "vm-000002.vmdk", "-q"]);
        }
        assert_eq!(
            names(&d),
            ["base.vmdk", "vm-000001.vmdk", "vm-000003.vmdk"],
            "run {n}: the files left"
        );
        assert_same(
            &qemu_raw(&d, "vm-000003.vmdk"),
            &running,
            &format!("run {n}: the running disk"),
        );
        vmdkit_ok(&d, &["info", "vm-000003.vmdk"]);
        qemu_img(&d, &["check", "vm-000001.vmdk"]);
        let text = std::fs::read(d.join("vm-000003.vmdk")).unwrap();
        let text = String::from_utf8_lossy(&text[..text.len().min(64 << 10)]).into_owned();
        assert!(
            text.contains("parentFileNameHint=\"vm-000001.vmdk\""),
            "run {n}"
        );
        std::fs::remove_dir_all(&d).unwrap();
        if finished {
            break;
        }
    }
    assert!(aborted > 5, "the fault hook hit {aborted} points");
}

/// Item 7 for vmfsSparse deltas (the child's descriptor is a file of its own) and for
/// ESX 2 REDO logs (named after their parent: refused with the command that works,
/// nothing changed), and the vmkfstools front end's `-m`.
#[test]
fn middle_vmfs_sparse_deltas_are_repointed_and_middle_redo_logs_refused() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    vmdkit_ok(
        d,
        &[
            "create",
            "base.vmdk",
            "--size",
            "16m",
            "--type",
            "thin",
            "-q",
        ],
    );
    std::fs::write(d.join("a.bin"), vec![0x5au8; MIB]).unwrap();
    vmdkit_ok(d, &["write", "base.vmdk", "--offset", "0", "a.bin"]);
    let d1 = vmdkit_ok(d, &["redo", "add", "base.vmdk", "--style", "vmfsSparse"]);
    let d1 = String::from_utf8(d1.stdout).unwrap().trim().to_string();
    std::fs::write(d.join("b.bin"), vec![0x6bu8; 3 * 65536]).unwrap();
    vmdkit_ok(d, &["write", &d1, "--offset", "1M", "b.bin"]);
    let d2 = String::from_utf8(vmdkit_ok(d, &["redo", "add", &d1]).stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        d2.ends_with("base-000002.vmdk"),
        "the chain's own style: {d2}"
    );
    assert!(d.join("base-000002-delta.vmdk").exists());
    std::fs::write(d.join("c.bin"), vec![0x7cu8; 4096]).unwrap();
    vmdkit_ok(d, &["write", &d2, "--offset", "1100k", "c.bin"]);
    let before = qemu_raw(d, &d2);
    assert_eq!(vmdkit_raw(d, &d2), before);
    vmdkit_ok(d, &["commit", &d1, "-q"]);
    assert!(!d.join("base-000001.vmdk").exists() && !d.join("base-000001-delta.vmdk").exists());
    assert_same(&qemu_raw(d, &d2), &before, "the running vmfsSparse delta");
    vmdkit_ok(d, &["info", &d2]);

    // ESX 2 REDO logs: base.vmdk.REDO under base.vmdk.REDO.REDO.
    let e = d.join("esx2");
    std::fs::create_dir(&e).unwrap();
    vmdkit_ok(
        &e,
        &["create", "b.vmdk", "--size", "4m", "--type", "thin", "-q"],
    );
    vmdkit_ok(&e, &["redo", "add", "b.vmdk"]);
    vmdkit_ok(&e, &["redo", "add", "b.vmdk.REDO"]);
    std::fs::write(e.join("x.bin"), vec![0x11u8; 8192]).unwrap();
    vmdkit_ok(
        &e,
        &["write", "b.vmdk.REDO", "--offset", "0", "x.bin", "--force"],
    );
    let sums: Vec<String> = names(&e).iter().map(|f| sha256_file(&e.join(f))).collect();
    let err = vmdkit_err(&e, &["commit", "b.vmdk.REDO"]);
    assert!(
        err.contains("vmdkit commit ") && err.contains("b.vmdk.REDO.REDO`)"),
        "{err}"
    );
    let err = vmdkit_err(&e, &["vmkfstools", "-m", "b.vmdk.REDO"]);
    assert!(err.contains("commit it first"), "{err}");
    let now: Vec<String> = names(&e).iter().map(|f| sha256_file(&e.join(f))).collect();
    assert_eq!(now, sums, "a refused commit changes nothing");
}

/// Item 8: a file that may be a delta of the disk but cannot be read (a half-copied
/// snapshot) makes write, commit and apply refuse, naming it; `--force` goes ahead.
#[test]
fn an_unreadable_candidate_child_is_unknown_not_absent() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "p.vmdk", "16M");
    qemu_io(d, "p.vmdk", &["write -P 0x31 0 1M"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(d, "c.vmdk", &["write -P 0x41 1M 64k"]);
    vmdkit_ok(d, &["export", "p.vmdk", "full.vmdk", "-q"]);
    vmdkit_ok(d, &["export", "c.vmdk", "inc.vmdk", "--delta", "-q"]);
    // Another child of p.vmdk, copied in half: its header cannot be read.
    qemu_child(d, "p.vmdk", "half.vmdk", false);
    let b = std::fs::read(d.join("half.vmdk")).unwrap();
    std::fs::write(d.join("half.vmdk"), &b[..300]).unwrap();
    std::fs::write(d.join("w.bin"), vec![9u8; 4096]).unwrap();
    let before: Vec<String> = ["p.vmdk", "c.vmdk"]
        .iter()
        .map(|f| sha256_file(&d.join(f)))
        .collect();
    let err = vmdkit_err(d, &["write", "c.vmdk", "--offset", "0", "w.bin"]);
    assert!(
        err.contains("half.vmdk") && err.contains("unknown"),
        "{err}"
    );
    let err = vmdkit_err(d, &["commit", "c.vmdk"]);
    assert!(
        err.contains("half.vmdk") && err.contains("unknown"),
        "{err}"
    );
    let now: Vec<String> = ["p.vmdk", "c.vmdk"]
        .iter()
        .map(|f| sha256_file(&d.join(f)))
        .collect();
    assert_eq!(now, before, "refused commands change nothing");
    // A restore with a half-copied snapshot beside it.
    let r = d.join("r");
    std::fs::create_dir(&r).unwrap();
    vmdkit_ok(
        &r,
        &["import", "../full.vmdk", "vm.vmdk", "-d", "sparse", "-q"],
    );
    std::fs::write(r.join("vm-000001.vmdk"), &b[..300]).unwrap();
    let err = vmdkit_err(&r, &["apply", "vm.vmdk", "../inc.vmdk"]);
    assert!(
        err.contains("vm-000001.vmdk") && err.contains("unknown"),
        "{err}"
    );
    vmdkit_ok(&r, &["apply", "vm.vmdk", "../inc.vmdk", "--force", "-q"]);
    assert_same(
        &qemu_raw(&r, "vm.vmdk"),
        &qemu_raw(d, "c.vmdk"),
        "forced apply",
    );
    vmdkit_ok(d, &["commit", "c.vmdk", "--force", "-q"]);
}

/// Item 9: `redo add` on a disk with a delta refuses (a branch only with --branch), never
/// hands out a number that a file of the folder still carries, and follows the chain's
/// own style (hosted on hosted disks).
#[test]
fn redo_add_never_branches_nor_reuses_a_name_unasked() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "vm.vmdk", "8M");
    let add = |disk: &str, extra: &[&str]| -> String {
        let mut args = vec!["redo", "add", disk];
        args.extend_from_slice(extra);
        String::from_utf8(vmdkit_ok(d, &args).stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        add("vm.vmdk", &[]),
        "vm-000001.vmdk",
        "hosted on a hosted disk"
    );
    let ct = String::from_utf8(vmdkit_ok(d, &["info", "vm-000001.vmdk"]).stdout).unwrap();
    assert!(ct.contains("monolithicSparse"), "{ct}");
    let before = names(d);
    let err = vmdkit_err(d, &["redo", "add", "vm.vmdk"]);
    assert!(
        err.contains("already has the delta") && err.contains("--branch"),
        "{err}"
    );
    assert_eq!(names(d), before, "a refused add creates nothing");
    assert_eq!(add("vm.vmdk", &["--branch"]), "vm-000002.vmdk");
    assert_eq!(add("vm-000001.vmdk", &[]), "vm-000003.vmdk");
    // vm-000002's branch is discarded; vm-000003's number is not reused
    // for the next delta, nor vm-000002's while vm-000003 carries a later one.
    std::fs::remove_file(d.join("vm-000002.vmdk")).unwrap();
    assert_eq!(add("vm-000003.vmdk", &[]), "vm-000004.vmdk");
    // qemu reads the whole chain the adds made.
    qemu_img(d, &["check", "vm-000004.vmdk"]);
}

/// Issue 22 item 4: increments kept beside the VM are not snapshots. `ls` lists them on
/// their own ("increment of"), `commit`, `write` and `redo add` do not count them as
/// children, and `info` describes one without its parent.
#[test]
fn increments_beside_the_vm_are_not_taken_for_snapshots() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "vm.vmdk", "16M");
    qemu_io(d, "vm.vmdk", &["write -P 0x11 0 1M"]);
    qemu_child(d, "vm.vmdk", "vm-000001.vmdk", false);
    qemu_io(d, "vm-000001.vmdk", &["write -P 0x22 2M 64k"]);
    vmdkit_ok(
        d,
        &["export", "vm-000001.vmdk", "inc1.vmdk", "--delta", "-q"],
    );
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit_ok(d, &["ls", ".", "--json"]).stdout).unwrap();
    let arr = v.as_array().unwrap();
    let inc = arr
        .iter()
        .find(|e| e["file"] == "inc1.vmdk")
        .expect("listed on its own");
    assert_eq!(inc["increment_of"], "vm.vmdk");
    let vm = arr.iter().find(|e| e["file"] == "vm.vmdk").unwrap();
    let deltas: Vec<&str> = vm["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["file"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["vm-000001.vmdk"], "the increment is not a delta");
    // info without the parent: what it applies to, exit 0.
    std::fs::rename(d.join("vm.vmdk"), d.join("away.vmdk")).unwrap();
    let out = vmdkit_ok(d, &["info", "inc1.vmdk", "--json"]);
    let i: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(i["increment"]["parent_hint"], "vm.vmdk", "{i}");
    assert!(!i["increment"]["applies_to_cid"]
        .as_str()
        .unwrap()
        .is_empty());
    std::fs::rename(d.join("away.vmdk"), d.join("vm.vmdk")).unwrap();
    // The snapshot commits although the increment names its parent; the chain's content
    // is qemu's.
    let want = qemu_raw(d, "vm-000001.vmdk");
    vmdkit_ok(d, &["commit", "vm-000001.vmdk", "-q"]);
    assert_same(&qemu_raw(d, "vm.vmdk"), &want, "after the commit");
    std::fs::write(d.join("w.bin"), vec![3u8; 4096]).unwrap();
    vmdkit_ok(d, &["write", "vm.vmdk", "--offset", "0", "w.bin"]);
    vmdkit_ok(d, &["redo", "add", "vm.vmdk"]);
}

/// What commit plans with (the map of the layers above its target, never reading the
/// target it writes into meanwhile) is the chain's map with everything from the target
/// down left unallocated, at every depth of a four-layer qemu chain with overlapping
/// writes and a zeroed grain.
#[test]
fn the_map_above_a_layer_is_the_chains_map_cut_there() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    hosted_chain(d);
    qemu_child(d, "vm-000003.vmdk", "vm-000004.vmdk", true);
    qemu_io(
        d,
        "vm-000004.vmdk",
        &["write -z 2M 64k", "write -P 0x55 3M 200k"],
    );
    vmdkit::fuzzing::map_above_agrees(&d.join("vm-000004.vmdk"), u64::MAX);
}
