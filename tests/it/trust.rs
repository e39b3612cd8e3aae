//! Issue 17, items 1-4: recovery state (commit's and apply's state files and journals) is
//! untrusted input. A planted or stale state never reaches a file the command did not
//! resolve itself, never replays onto a disk restored from a copy, is found from any
//! working folder; temporaries of live writers elsewhere are never swept. Oracles: the
//! bytes of bystander files (sha256), qemu-img's reading of each disk.

use super::util::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 64 MiB qemu sparse parent `p.vmdk` with data, and a child `c.vmdk` with changes.
fn parent_and_child(d: &Path) {
    qemu_img(d, &["create", "-q", "-f", "vmdk", "p.vmdk", "64M"]);
    qemu_io(
        d,
        "p.vmdk",
        &["write -P 0x31 0 2M", "write -P 0x32 33M 64k"],
    );
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(
        d,
        "c.vmdk",
        &["write -P 0x41 1M 128k", "write -P 0x42 40M 64k"],
    );
}

/// A state file as a hostile author (or a stale copy) would write it: well-formed, with
/// a valid checksum, so only what it names can give it away.
fn state_bytes(body: &serde_json::Value) -> Vec<u8> {
    let json = serde_json::to_vec_pretty(body).unwrap();
    let mut out = b"vmdkit-state 1\n".to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(format!("\ncrc32 {:08x}\n", crc32fast::hash(&json)).as_bytes());
    out
}

/// The body of a state file written by vmdkit.
fn state_body(p: &Path) -> serde_json::Value {
    let b = std::fs::read(p).unwrap();
    let text = String::from_utf8(b).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.remove(0), "vmdkit-state 1");
    assert!(lines.pop().unwrap().starts_with("crc32 "));
    serde_json::from_str(&lines.join("\n")).unwrap()
}

/// A journal (format VMDKJRN2) with one record writing `bytes` at `offset` of `file`.
fn journal_bytes(token: &str, file: &Path, offset: u64, bytes: &[u8]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut b = b"VMDKJRN2".to_vec();
    b.extend_from_slice(&(token.len() as u32).to_le_bytes());
    b.extend_from_slice(token.as_bytes());
    let p = file.as_os_str().as_bytes();
    b.extend_from_slice(&(p.len() as u32).to_le_bytes());
    b.extend_from_slice(p);
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    b.extend_from_slice(bytes);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A file record (canonical path, identity, length, mtime) of `p` as it is now.
fn record(p: &Path) -> serde_json::Value {
    let m = std::fs::metadata(p).unwrap();
    serde_json::json!({
        "path": std::fs::canonicalize(p).unwrap(),
        "dev": m.dev(), "ino": m.ino(), "len": m.len(),
        "mtime_ns": i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

fn cid_of(d: &Path, disk: &str) -> u32 {
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit_ok(d, &["info", disk, "--json"]).stdout).unwrap();
    let c = v["layers"][0]["cid"]
        .as_str()
        .or(v["cid"].as_str())
        .unwrap_or_else(|| panic!("{v}"));
    u32::from_str_radix(c, 16).unwrap()
}

/// Everything a planted state could reach: files in the folder and outside it.
struct Bystanders {
    files: Vec<(PathBuf, String)>,
}

impl Bystanders {
    fn new(dirs: &[&Path]) -> Bystanders {
        let mut files = Vec::new();
        for d in dirs {
            let mut v: Vec<PathBuf> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            for p in v.into_iter().filter(|p| p.is_file()) {
                let h = sha256_file(&p);
                files.push((p, h));
            }
        }
        Bystanders { files }
    }

    fn assert_untouched(&self, what: &str) {
        for (p, h) in &self.files {
            assert!(p.exists(), "{what}: `{}` was removed", p.display());
            assert_eq!(&sha256_file(p), h, "{what}: `{}` was changed", p.display());
        }
    }
}

/// Item 1 (commit): a planted `<delta>.vmdkit-commit` naming files outside the chain, in
/// every phase (copy: cut back; tables: journal writes; remove: deletions), or in an
/// older vmdkit's format, is refused before anything is written.
#[test]
fn planted_commit_state_never_reaches_another_file() {
    need_qemu!();
    let t = tmp();
    let d = t.path().join("vm");
    let outside = t.path().join("etc");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    parent_and_child(&d);
    std::fs::write(outside.join("passwd"), b"root:x:0:0\n".repeat(100)).unwrap();
    // A bystander disk in the same folder, and a file beside the disk.
    qemu_img(&d, &["create", "-q", "-f", "vmdk", "other.vmdk", "1M"]);
    std::fs::write(d.join("notes.txt"), b"keep me").unwrap();
    let victims = [
        outside.join("passwd"),
        d.join("other.vmdk"),
        d.join("notes.txt"),
    ];
    let p_cid = cid_of(&d, "p.vmdk");
    let sp = d.join("c.vmdk.vmdkit-commit");
    for victim in &victims {
        for phase in ["copy", "tables", "remove"] {
            let token = "0123456789abcdef0123456789abcdef";
            let mut body = serde_json::json!({
                "phase": phase, "token": token,
                "top": std::fs::canonicalize(d.join("c.vmdk")).unwrap(),
                "target": std::fs::canonicalize(d.join("p.vmdk")).unwrap(),
                "target_old_cid": p_cid, "target_new_cid": 0x1234_5678u32,
                "delta": [record(&d.join("c.vmdk"))],
                "extents": [record(&d.join("p.vmdk"))],
                "children": [],
            });
            match phase {
                // Cut back to length 0.
                "copy" => {
                    let mut r = record(victim);
                    r["len"] = 0.into();
                    body["extents"] = serde_json::json!([r]);
                }
                "tables" => {
                    std::fs::write(
                        d.join("c.vmdk.vmdkit-commit.journal"),
                        journal_bytes(token, victim, 0, b"PWNED"),
                    )
                    .unwrap();
                }
                _ => body["delta"] = serde_json::json!([record(victim)]),
            }
            std::fs::write(&sp, state_bytes(&body)).unwrap();
            let guard = Bystanders::new(&[&d, &outside]);
            let out = vmdkit(&d, &["commit", "c.vmdk", "-q"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{phase} naming {}: exit 0",
                victim.display()
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                err.contains("not a file of the disk")
                    || err.contains("not acted on")
                    || err.contains("not the disk this interrupted commit")
                    || err.contains("nothing was removed"),
                "{phase}: {err}"
            );
            guard.assert_untouched(&format!(
                "planted state in phase {phase} naming {}",
                victim.display()
            ));
            let _ = std::fs::remove_file(d.join("c.vmdk.vmdkit-commit.journal"));
        }
    }
    // A state in an older vmdkit's format (plain JSON, no checksum; what the issue
    // reproduced: that vmdkit removed every file it named in phase `remove`) is not
    // acted on.
    let mut old_member = record(&outside.join("passwd"));
    old_member["size"] = old_member["len"].clone();
    let old = serde_json::json!({
        "version": 2, "phase": "remove", "target": d.join("p.vmdk"),
        "target_old_cid": p_cid, "target_new_cid": 1,
        "remove": [old_member], "target_lengths": [],
    });
    std::fs::write(&sp, serde_json::to_vec(&old).unwrap()).unwrap();
    let guard = Bystanders::new(&[&d, &outside]);
    let err = vmdkit_err(&d, &["commit", "c.vmdk", "-q"]);
    assert!(err.contains("not acted on"), "{err}");
    guard.assert_untouched("an older vmdkit's state");
    // Torn (cut short, so no checksum line): refused as well.
    let torn = state_bytes(
        &serde_json::json!({"phase": "remove", "delta": [record(&outside.join("passwd"))]}),
    );
    std::fs::write(&sp, &torn[..torn.len() - 12]).unwrap();
    let guard = Bystanders::new(&[&d, &outside]);
    let err = vmdkit_err(&d, &["commit", "c.vmdk", "-q"]);
    assert!(err.contains("state file"), "{err}");
    guard.assert_untouched("a torn state");
    // A genuine interrupted commit (its mark and token in the parent) whose journal was
    // replaced by one naming another file: the journal is not acted on.
    std::fs::remove_file(&sp).unwrap();
    let orig = t.path().join("orig");
    std::fs::create_dir_all(&orig).unwrap();
    for f in ["p.vmdk", "c.vmdk"] {
        std::fs::copy(d.join(f), orig.join(f)).unwrap();
    }
    let g = abort_until(
        t.path(),
        &orig,
        &["commit", "c.vmdk", "-q"],
        &phase_is("c.vmdk.vmdkit-commit".into(), "tables"),
    );
    let token = state_body(&g.join("c.vmdk.vmdkit-commit"))["token"]
        .as_str()
        .unwrap()
        .to_string();
    for victim in &victims {
        std::fs::write(
            g.join("c.vmdk.vmdkit-commit.journal"),
            journal_bytes(&token, victim, 0, b"PWNED"),
        )
        .unwrap();
        let guard = Bystanders::new(&[&g, &outside, &d]);
        let err = vmdkit_err(&g, &["commit", "c.vmdk", "-q"]);
        assert!(err.contains("not a file of the disk"), "{err}");
        guard.assert_untouched(&format!("a journal naming {}", victim.display()));
    }
    // Moved away, the commit runs and matches qemu's reading of the chain.
    let want = qemu_raw(&d, "c.vmdk");
    vmdkit_ok(&d, &["commit", "c.vmdk", "-q"]);
    assert_same(&qemu_raw(&d, "p.vmdk"), &want, "the real commit");
}

/// The restore side of a backup: `r/vm.vmdk` restored from a full backup of `p.vmdk`, and
/// the increment `inc.vmdk` of `c.vmdk`. Returns the content after the increment.
fn restore_and_increment(t: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let src = t.join("src");
    let r = t.join("r");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&r).unwrap();
    parent_and_child(&src);
    vmdkit_ok(
        &src,
        &["export", "p.vmdk", "full.vmdk", "-d", "stream", "-q"],
    );
    vmdkit_ok(&src, &["export", "c.vmdk", "inc.vmdk", "--delta", "-q"]);
    vmdkit_ok(
        &r,
        &[
            "import",
            src.join("full.vmdk").to_str().unwrap(),
            "vm.vmdk",
            "-d",
            "sparse",
            "-q",
        ],
    );
    let want = qemu_raw(&src, "c.vmdk");
    (r, src.join("inc.vmdk"), want)
}

/// Item 1 (apply): a planted `<target>.vmdkit-apply` (and journal) naming another file is
/// refused; one with an empty file list does not stamp the increment's content ID on a
/// disk that holds none of its data.
#[test]
fn planted_apply_state_never_reaches_another_file_nor_stamps_the_cid() {
    need_qemu!();
    let t = tmp();
    let (r, inc, want) = restore_and_increment(t.path());
    let outside = t.path().join("etc");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), b"secret\n".repeat(50)).unwrap();
    let vm = std::fs::canonicalize(r.join("vm.vmdk")).unwrap();
    let parent_cid = cid_of(&r, "vm.vmdk");
    // The increment's own content ID, as its descriptor says.
    let inc_text = String::from_utf8_lossy(&std::fs::read(&inc).unwrap()[512..4096]).to_string();
    let inc_cid = inc_text
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .map(|c| u32::from_str_radix(c.trim(), 16).unwrap())
        .unwrap();
    let sp = r.join("vm.vmdk.vmdkit-apply");
    let token = "feedfacefeedfacefeedfacefeedface";
    let cases = [
        (
            "copy",
            serde_json::json!([{"path": outside.join("shadow"), "dev": 0, "ino": 0, "len": 0, "mtime_ns": 0}]),
        ),
        ("copy", serde_json::json!([record(&outside.join("shadow"))])),
        ("tables", serde_json::json!([])),
        ("tables", serde_json::json!([record(&vm)])),
    ];
    for (i, (phase, files)) in cases.iter().enumerate() {
        let body = serde_json::json!({
            "phase": phase, "token": token, "target": vm,
            "parent_cid": parent_cid, "cid": inc_cid, "files": files,
        });
        std::fs::write(&sp, state_bytes(&body)).unwrap();
        if *phase == "tables" {
            std::fs::write(
                r.join("vm.vmdk.vmdkit-apply.journal"),
                journal_bytes(token, &outside.join("shadow"), 0, b"PWNED"),
            )
            .unwrap();
        }
        let guard = Bystanders::new(&[&r, &outside]);
        let err = vmdkit_err(&r, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
        assert!(
            err.contains("not acted on") || err.contains("not the disk"),
            "case {i}: {err}"
        );
        guard.assert_untouched(&format!("planted apply state, case {i}"));
        assert_eq!(
            cid_of(&r, "vm.vmdk"),
            parent_cid,
            "case {i}: the CID was stamped"
        );
        let _ = std::fs::remove_file(r.join("vm.vmdk.vmdkit-apply.journal"));
    }
    std::fs::remove_file(&sp).unwrap();
    vmdkit_ok(&r, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
    assert_same(&qemu_raw(&r, "vm.vmdk"), &want, "the real apply");
}

/// Run `args` in copies of `orig` with the fault hook at 0, 1, 2, ... until `stop` says
/// the aborted run left the state wanted; returns that folder.
fn abort_until(t: &Path, orig: &Path, args: &[&str], stop: &dyn Fn(&Path) -> bool) -> PathBuf {
    for n in 0..400 {
        let d = t.join(format!(
            "{}-{n}",
            orig.file_name().unwrap().to_string_lossy()
        ));
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(orig).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let out = Command::new(bin())
            .args(args)
            .current_dir(&d)
            .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        if out.status.success() {
            panic!("{args:?}: no abort point left the wanted state");
        }
        if stop(&d) {
            return d;
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
    panic!("{args:?}: no abort point in 400");
}

fn phase_is(sp: PathBuf, phase: &'static str) -> impl Fn(&Path) -> bool {
    move |d: &Path| {
        let p = d.join(&sp);
        p.exists() && state_body(&p)["phase"] == phase
    }
}

/// Item 2: kill an apply or a commit, put the target back from a copy with `cp` (same
/// inode), run the command again: past the copy phase it is refused and changes nothing;
/// in the copy phase the disk is taken as a fresh start, with the checks of a first run.
#[test]
fn a_rerun_never_replays_state_onto_a_disk_restored_from_a_copy() {
    need_qemu!();
    let t = tmp();
    let (r, inc, want) = restore_and_increment(t.path());
    let inc = inc.to_str().unwrap().to_string();
    let pristine = std::fs::read(r.join("vm.vmdk")).unwrap();
    let apply = ["apply", "vm.vmdk", inc.as_str(), "-q"];
    // Phase `tables`: refused, the restored copy untouched.
    let d = abort_until(
        t.path(),
        &r,
        &apply,
        &phase_is("vm.vmdk.vmdkit-apply".into(), "tables"),
    );
    let ino = std::fs::metadata(d.join("vm.vmdk")).unwrap().ino();
    std::fs::write(d.join("vm.vmdk"), &pristine).unwrap();
    assert_eq!(
        std::fs::metadata(d.join("vm.vmdk")).unwrap().ino(),
        ino,
        "cp keeps the inode"
    );
    let err = vmdkit_err(&d, &apply);
    assert!(err.contains("not the disk this interrupted apply"), "{err}");
    assert_eq!(
        std::fs::read(d.join("vm.vmdk")).unwrap(),
        pristine,
        "refused rerun changed the disk"
    );
    // Phase `copy`: the copy is the increment's parent, so the rerun is a first run.
    let d = abort_until(
        t.path(),
        &r,
        &apply,
        &phase_is("vm.vmdk.vmdkit-apply".into(), "copy"),
    );
    std::fs::write(d.join("vm.vmdk"), &pristine).unwrap();
    vmdkit_ok(&d, &apply);
    assert_same(
        &qemu_raw(&d, "vm.vmdk"),
        &want,
        "fresh apply over the restored copy",
    );
    assert!(!d.join("vm.vmdk.vmdkit-apply").exists());

    // Commit: the parent put back from a copy in phase `tables` is refused, the delta kept.
    let src = t.path().join("src");
    let c = t.path().join("commit");
    std::fs::create_dir_all(&c).unwrap();
    for f in ["p.vmdk", "c.vmdk"] {
        std::fs::copy(src.join(f), c.join(f)).unwrap();
    }
    let parent = std::fs::read(c.join("p.vmdk")).unwrap();
    let d = abort_until(
        t.path(),
        &c,
        &["commit", "c.vmdk", "-q"],
        &phase_is("c.vmdk.vmdkit-commit".into(), "tables"),
    );
    std::fs::write(d.join("p.vmdk"), &parent).unwrap();
    let delta = sha256_file(&d.join("c.vmdk"));
    let err = vmdkit_err(&d, &["commit", "c.vmdk", "-q"]);
    assert!(
        err.contains("not the disk this interrupted commit"),
        "{err}"
    );
    assert_eq!(std::fs::read(d.join("p.vmdk")).unwrap(), parent);
    assert_eq!(sha256_file(&d.join("c.vmdk")), delta, "the delta is kept");
}

/// Item 3: a rerun from another working folder (cron) finds and finishes the same state.
#[test]
fn a_rerun_from_another_folder_finishes_the_job() {
    need_qemu!();
    let t = tmp();
    let (r, inc, want) = restore_and_increment(t.path());
    let inc = inc.to_str().unwrap().to_string();
    let d = abort_until(
        t.path(),
        &r,
        &["apply", "vm.vmdk", inc.as_str(), "-q"],
        &phase_is("vm.vmdk.vmdkit-apply".into(), "copy"),
    );
    let abs = d.join("vm.vmdk");
    vmdkit_ok(
        Path::new("/"),
        &["apply", abs.to_str().unwrap(), inc.as_str(), "-q"],
    );
    assert_same(&qemu_raw(&d, "vm.vmdk"), &want, "apply finished from /");
    assert!(!d.join("vm.vmdk.vmdkit-apply").exists());

    let src = t.path().join("src");
    let c = t.path().join("commit3");
    std::fs::create_dir_all(&c).unwrap();
    for f in ["p.vmdk", "c.vmdk"] {
        std::fs::copy(src.join(f), c.join(f)).unwrap();
    }
    let merged = qemu_raw(&c, "c.vmdk");
    let d = abort_until(
        t.path(),
        &c,
        &["commit", "c.vmdk", "-q"],
        &phase_is("c.vmdk.vmdkit-commit".into(), "tables"),
    );
    let sub = d.join("elsewhere");
    std::fs::create_dir(&sub).unwrap();
    vmdkit_ok(&sub, &["commit", "../c.vmdk", "-q"]);
    assert_same(
        &qemu_raw(&d, "p.vmdk"),
        &merged,
        "commit finished from a subfolder",
    );
    assert!(!d.join("c.vmdk").exists() && !d.join("c.vmdk.vmdkit-commit").exists());
}

/// Item 4: a temporary whose writer is alive elsewhere (another PID namespace or host:
/// its PID means nothing here) is kept; one nobody holds is swept.
#[test]
fn temporaries_of_live_writers_elsewhere_are_never_swept() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "a.vmdk", "1M"]);
    // A PID that does not exist here (the kernel's maximum is below 2^22).
    let live = d.join(".b.vmdk.vmdkit-tmp.4194399.0");
    let dead = d.join(".c.vmdk.vmdkit-tmp.4194398.0");
    std::fs::write(&live, b"being written in a container").unwrap();
    std::fs::write(&dead, b"left by a crash").unwrap();
    // The other writer holds its lock for the temporary's life.
    let held = Command::new("flock")
        .args(["-x", "-o", live.to_str().unwrap(), "sleep", "30"])
        .spawn()
        .expect("flock(1)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ls = vmdkit_ok(d, &["ls"]);
    let text = String::from_utf8_lossy(&ls.stderr);
    assert!(
        text.contains(".b.vmdk.vmdkit-tmp.4194399.0`: an output being written"),
        "{text}"
    );
    vmdkit_ok(d, &["export", "a.vmdk", "out.vmdk", "-d", "stream", "-q"]);
    assert!(live.exists(), "a live writer's temporary was swept");
    assert!(!dead.exists(), "a stale temporary was kept");
    let mut held = held;
    held.kill().unwrap();
    held.wait().unwrap();
    vmdkit_ok(d, &["export", "a.vmdk", "out2.vmdk", "-d", "stream", "-q"]);
    assert!(!live.exists(), "once its writer is gone it is swept");
}

/// Items 5 and 6: a damaged increment (tail lost on tape, a bad deflate stream), from a
/// file or a pipe, into a VMDK or a raw target, is found before the first write: the
/// target stays byte for byte at its previous point and nothing is left beside it. A
/// full disk or a signal during the writes leaves the disk marked, says the apply is
/// incomplete and how to finish it; other commands refuse the disk until the rerun,
/// which gives qemu's content.
#[test]
fn a_damaged_increment_changes_nothing_and_an_interrupted_one_says_so() {
    need_qemu!();
    let t = tmp();
    let (r, inc, want) = restore_and_increment(t.path());
    let good = std::fs::read(&inc).unwrap();
    let mut tail_lost = good.clone();
    tail_lost.truncate(good.len() - 100);
    let mut bad_deflate = good.clone();
    // Into the first grain's compressed bytes: its marker (LBA, size) sits at overHead.
    let over = u64::from_le_bytes(good[64..72].try_into().unwrap()) as usize * 512;
    let size = u32::from_le_bytes(good[over + 8..over + 12].try_into().unwrap()) as usize;
    assert!(size > 40, "a compressed grain at {over}");
    for b in &mut bad_deflate[over + 12 + size / 2..over + 12 + size / 2 + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(t.path().join("tail.vmdk"), &tail_lost).unwrap();
    std::fs::write(t.path().join("deflate.vmdk"), &bad_deflate).unwrap();
    let raw = r.join("vm.raw");
    vmdkit_ok(&r, &["cat", "vm.vmdk", "-o", "vm.raw"]);
    let files_before: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = sha256_file(&r.join("vm.vmdk"));
    let raw_before = sha256_file(&raw);
    for bad in ["tail.vmdk", "deflate.vmdk"] {
        let path = t.path().join(bad);
        let p = path.to_str().unwrap();
        for (target, extra) in [("vm.vmdk", &[][..]), ("vm.raw", &["--raw", "--force"][..])] {
            let mut args = vec!["apply", target, p];
            args.extend_from_slice(extra);
            let err = vmdkit_err(&r, &args);
            assert!(
                err.contains("nothing was written"),
                "{bad} into {target}: {err}"
            );
            // Through a pipe, as from tape.
            let script = format!(
                "cat {p} | {} apply {target} - {}",
                bin().display(),
                extra.join(" ")
            );
            let out = Command::new("bash")
                .args(["-c", &script])
                .current_dir(&r)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{script}");
            assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"));
        }
        assert_eq!(
            sha256_file(&r.join("vm.vmdk")),
            before,
            "{bad}: the restore changed"
        );
        assert_eq!(
            sha256_file(&raw),
            raw_before,
            "{bad}: the raw restore changed"
        );
        let mut now: Vec<String> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        now.sort();
        assert_eq!(now, files_before, "{bad}: files left beside the disk");
    }
    // A full disk while the grains are written (a file-size limit stands in for it:
    // the appended grains cannot be written).
    let limit_kib = std::fs::metadata(r.join("vm.vmdk")).unwrap().len() / 1024 + 8;
    let script = format!(
        "trap '' XFSZ; ulimit -f {limit_kib}; exec {} apply vm.vmdk {}",
        bin().display(),
        inc.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(&r)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "apply past the limit: {err}");
    assert!(
        err.contains("incomplete") && err.contains("vmdkit apply vm.vmdk"),
        "{err}"
    );
    // Writers refuse it; readers read it as one point and say so (issue 18 (a), (d)).
    let refused = vmdkit_err(&r, &["redo", "add", "vm.vmdk"]);
    assert!(refused.contains("interrupted `vmdkit apply`"), "{refused}");
    let read = vmdkit(&r, &["export", "vm.vmdk", "x.vmdk", "-q"]);
    let said = String::from_utf8_lossy(&read.stderr);
    assert!(
        read.status.success() && said.contains("interrupted `vmdkit apply`"),
        "{said}"
    );
    std::fs::remove_file(r.join("x.vmdk")).unwrap();
    vmdkit_ok(&r, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
    assert_same(&qemu_raw(&r, "vm.vmdk"), &want, "after the rerun");
    qemu_img(&r, &["check", "vm.vmdk"]);
    vmdkit_ok(&r, &["check", "vm.vmdk"]);

    // Ctrl-C in the middle of the writes: the message on the way out says what to do.
    let (r2, inc, want) = {
        let t2 = t.path().join("again");
        std::fs::create_dir_all(&t2).unwrap();
        restore_and_increment(&t2)
    };
    let child = Command::new(bin())
        .args(["apply", "vm.vmdk", inc.to_str().unwrap()])
        .current_dir(&r2)
        .env("VMDKIT_TEST_WRITE_DELAY_MS", "50")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sp = r2.join("vm.vmdk.vmdkit-apply");
    let start = std::time::Instant::now();
    while !sp.exists() && start.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("incomplete") && err.contains("vmdkit apply vm.vmdk"),
        "{err}"
    );
    vmdkit_ok(&r2, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
    assert_same(
        &qemu_raw(&r2, "vm.vmdk"),
        &want,
        "after Ctrl-C and the rerun",
    );
}

/// Issue 18: the moves an interrupted apply records (grains it wrote to scratch space,
/// copied back to their places in phase `compact`) are input too. In a genuine
/// interrupted apply (its mark and token in the target), moves edited to copy over a
/// grain another entry uses, to land past the end, or to name a grain twice are refused
/// before anything is written; the genuine state then finishes the apply.
#[test]
fn edited_moves_of_an_interrupted_apply_are_refused() {
    need_qemu!();
    let t = tmp();
    let (r, inc, want) = restore_and_increment(t.path());
    let args = ["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"];
    let g = abort_until(
        t.path(),
        &r,
        &args,
        &phase_is("vm.vmdk.vmdkit-apply".into(), "compact"),
    );
    let sp = g.join("vm.vmdk.vmdkit-apply");
    let genuine = std::fs::read(&sp).unwrap();
    let body = state_body(&sp);
    let moves = body["moves"].as_array().unwrap().clone();
    assert!(
        !moves.is_empty(),
        "the increment overwrites grains the restore has"
    );
    // The disk reads as after the apply meanwhile (phase `compact`), and says so.
    let out = vmdkit(&g, &["cat", "vm.vmdk"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reads as it is after"));
    assert_same(&out.stdout, &want, "a disk in phase compact, read");
    // A grain the restore holds and the increment leaves alone: the full backup's data
    // at 33M (grain 528 of 64 KiB).
    let m = vmdkit_ok(&g, &["map", "vm.vmdk", "--json"]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&m.stdout).unwrap();
    let other = map
        .iter()
        .find(|e| e["start"].as_u64() == Some(33 << 20) && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("the grain at 33M is stored");
    let edit = |f: &dyn Fn(&mut Vec<serde_json::Value>)| {
        let mut b = body.clone();
        let mut v = moves.clone();
        f(&mut v);
        b["moves"] = serde_json::Value::Array(v);
        state_bytes(&b)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "copy over another grain",
            edit(&|v| v[0]["old"] = serde_json::json!(other / 512)),
        ),
        (
            "a place past the end",
            edit(&|v| v[0]["old"] = serde_json::json!(body["ends"][0].as_u64().unwrap() + 128)),
        ),
        (
            "a grain twice",
            edit(&|v| {
                let first = v[0].clone();
                v.push(first)
            }),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&sp, &bytes).unwrap();
        let guard = Bystanders::new(&[&g]);
        let err = vmdkit_err(&g, &args);
        assert!(err.contains("does not fit this disk"), "{what}: {err}");
        guard.assert_untouched(what);
    }
    std::fs::write(&sp, &genuine).unwrap();
    vmdkit_ok(&g, &args);
    assert_same(
        &qemu_raw(&g, "vm.vmdk"),
        &want,
        "the genuine state finished",
    );
    vmdkit_ok(&g, &["check", "vm.vmdk"]);
    qemu_img(&g, &["check", "vm.vmdk"]);
}
