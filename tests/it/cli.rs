//! CLI behaviour: outputs, pipes, refusals.

use super::util::*;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

#[test]
fn cat_to_file_makes_holes_and_refuses_to_overwrite() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "s.vmdk", "256M"]);
    qemu_io(d, "s.vmdk", &["write -P 0x61 100M 1M"]);
    vmdkit_ok(d, &["cat", "s.vmdk", "-o", "out.raw"]);
    let m = std::fs::metadata(d.join("out.raw")).unwrap();
    assert_eq!(m.len(), 256 << 20, "sized exactly");
    assert!(
        m.blocks() * 512 <= 2 << 20,
        "holes: {} bytes allocated",
        m.blocks() * 512
    );
    let err = vmdkit_err(d, &["cat", "s.vmdk", "-o", "out.raw"]);
    assert!(
        err.contains("already exists (use --force to overwrite)"),
        "{err}"
    );
    vmdkit_ok(d, &["cat", "s.vmdk", "-o", "out.raw", "--force"]);
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("vmdkit-tmp")),
        "{names:?}"
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "s.vmdk", "512M"]);
    qemu_io(d, "s.vmdk", &["write -P 0x61 0 1M"]);
    let mut child = Command::new(bin())
        .args(["cat", "s.vmdk"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut head = [0u8; 4096];
    std::io::Read::read_exact(&mut out, &mut head).unwrap();
    drop(out);
    let res = child.wait_with_output().unwrap();
    assert!(res.status.success(), "exit {:?}", res.status);
    assert!(
        res.stderr.is_empty(),
        "quiet: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(head.iter().all(|&b| b == 0x61));
}

#[test]
fn info_json_has_the_documented_keys() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=lsilogic",
            "s.vmdk",
            "100M",
        ],
    );
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit_ok(d, &["info", "--json", "s.vmdk"]).stdout).unwrap();
    let q: serde_json::Value =
        serde_json::from_str(&qemu_img(d, &["info", "--output=json", "s.vmdk"])).unwrap();
    for k in [
        "file",
        "create_type",
        "capacity",
        "disk_size",
        "chain_disk_size",
        "grain_size",
        "adapter_type",
        "geometry",
        "cid",
        "parent_cid",
        "extents",
        "chain",
        "notes",
        "warnings",
    ] {
        assert!(v.get(k).is_some(), "missing key {k}");
    }
    assert_eq!(v["capacity"], q["virtual-size"]);
    assert_eq!(v["grain_size"], q["cluster-size"]);
    assert_eq!(
        v["create_type"],
        q["format-specific"]["data"]["create-type"]
    );
    let cid = u32::from_str_radix(v["cid"].as_str().unwrap(), 16).unwrap();
    assert_eq!(
        u64::from(cid),
        q["format-specific"]["data"]["cid"].as_u64().unwrap()
    );
    assert_eq!(v["adapter_type"], "lsilogic");
    assert_eq!(v["geometry"]["heads"], 255);
}

#[test]
fn directories_empty_files_and_pipes_are_refused_without_hanging() {
    let t = tmp();
    let d = t.path();
    std::fs::create_dir(d.join("dir.vmdk")).unwrap();
    std::fs::write(d.join("empty.vmdk"), b"").unwrap();
    assert!(Command::new("mkfifo")
        .arg(d.join("fifo.vmdk"))
        .status()
        .unwrap()
        .success());
    for (f, want) in [
        ("dir.vmdk", "is a directory"),
        ("empty.vmdk", "empty file: not a VMDK"),
        ("fifo.vmdk", "is a pipe or socket"),
    ] {
        let err = vmdkit_err(d, &["info", f]);
        assert!(err.contains(want), "{f}: {err}");
    }
}

/// README starts with the two newcomer commands, and `.ci/run` runs exactly the second.
#[test]
fn readme_and_ci_agree_on_the_test_command() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .expect("a first shell block")
        .split("```")
        .next()
        .unwrap();
    let cmds: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(cmds.len(), 2, "{block}");
    assert!(
        cmds[0].contains("fixtures/"),
        "first command runs on a bundled example: {}",
        cmds[0]
    );
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .unwrap();
    assert_eq!(
        last.trim(),
        cmds[1].trim(),
        ".ci/run runs the README's test command"
    );
    for section in [
        "## Performance",
        "### export",
        "### check",
        "### REDO logs, deltas and commit",
        "## Resource bounds",
    ] {
        assert!(readme.contains(section), "README lost `{section}`");
    }
}

/// Exit codes scripts can rely on (issue 12): usage errors are 64 (EX_USAGE), not check's
/// "corruption" 2; help is 0; `check` of something that is not a VMDK could not run (1);
/// JSON into a closed pipe ends quietly with 0.
#[test]
fn usage_errors_not_a_vmdk_and_closed_pipes_have_their_own_exit_codes() {
    let t = tmp();
    let d = t.path();
    let out = vmdkit(d, &["info", "--no-such-flag", "x.vmdk"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(vmdkit(d, &["--help"]).status.code(), Some(0));
    std::fs::write(d.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let out = vmdkit(d, &["check", "passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is not a VMDK"));
    // A damaged descriptor is still corruption.
    std::fs::write(
        d.join("bad.vmdk"),
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT\nthis is not a line\n",
    )
    .unwrap();
    assert_eq!(vmdkit(d, &["check", "bad.vmdk"]).status.code(), Some(2));
    // `info --json | head -c 1`: the reader goes away; vmdkit ends quietly.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo-000001.vmdk");
    let mut child = std::process::Command::new(bin())
        .args(["info", "--json"])
        .arg(&fixture)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `info` on a delta whose parent is missing shows the layer and the reason, exit 1;
/// `-q` is accepted by create, extend and rdm create (issue 12).
#[test]
fn info_shows_a_broken_chain_and_q_is_accepted_everywhere() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "p.vmdk", "8M"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    std::fs::remove_file(d.join("p.vmdk")).unwrap();
    let out = vmdkit(d, &["info", "c.vmdk"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("c.vmdk") && text.contains("8388608 bytes"),
        "{text}"
    );
    assert!(text.contains("parent `p.vmdk` not found"), "{text}");
    let out = vmdkit(d, &["info", "--json", "c.vmdk"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["capacity"], 8388608);
    vmdkit_ok(d, &["create", "n.vmdk", "--size", "1m", "-q"]);
    vmdkit_ok(d, &["extend", "n.vmdk", "--size", "2m", "-q"]);
    std::fs::write(d.join("dev"), vec![0u8; 1 << 20]).unwrap();
    let out = vmdkit_ok(d, &["rdm", "create", "r.vmdk", "--device", "dev", "-q"]);
    assert!(out.stdout.is_empty());
}
