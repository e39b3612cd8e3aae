//! The programs in `examples/` (issue 21: the library as other programs use it), run
//! against qemu's reading of the same disks.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::util::*;

/// An example's binary (`cargo test` builds the examples beside the test binaries).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let p = profile.join("examples").join(name);
    assert!(p.exists(), "{} not built", p.display());
    // `cargo test --test all` alone does not rebuild the examples: refuse a stale one.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&p) >= modified(&src),
        "{} is older than its source: run `cargo test` (it builds the examples)",
        p.display()
    );
    p
}

fn run_example(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    run(dir, example(name), args).stdout
}

/// The bundled demo chain, copied into a fresh folder.
fn demo() -> tempfile::TempDir {
    let d = tmp();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for f in ["demo.vmdk", "demo-000001.vmdk"] {
        std::fs::copy(fx.join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn read_disk_reads_what_qemu_reads() {
    need_qemu!();
    let d = demo();
    let raw = qemu_raw(d.path(), "demo-000001.vmdk");
    // A range in the delta, one in the base, one across the end of the disk.
    for (off, len) in [
        (0u64, 256 << 10),
        (20 << 20, 1 << 20),
        ((63 << 20) + 4096, 4 << 20),
    ] {
        let got = run_example(
            d.path(),
            "read_disk",
            &["demo-000001.vmdk", &off.to_string(), &len.to_string()],
        );
        let end = (off + len).min(raw.len() as u64) as usize;
        assert_same(&got, &raw[off as usize..end], &format!("bytes {off}+{len}"));
    }
}

#[test]
fn list_chain_says_what_each_layer_decides_as_qemu_maps_it() {
    need_qemu!();
    let d = demo();
    let text =
        String::from_utf8(run_example(d.path(), "list_chain", &["demo-000001.vmdk"])).unwrap();
    let map: serde_json::Value = serde_json::from_str(&qemu_img(
        d.path(),
        &["map", "--output=json", "demo-000001.vmdk"],
    ))
    .unwrap();
    let mut decided = [0u64; 2];
    for e in map.as_array().unwrap() {
        if e["present"].as_bool().unwrap() {
            decided[e["depth"].as_u64().unwrap() as usize] += e["length"].as_u64().unwrap();
        }
    }
    assert!(decided[0] > 0 && decided[1] > 0, "{map}");
    let info: serde_json::Value = serde_json::from_str(&qemu_img(
        d.path(),
        &["info", "--output=json", "demo-000001.vmdk"],
    ))
    .unwrap();
    let cap = info["virtual-size"].as_u64().unwrap();
    for (depth, name) in [(0, "demo-000001.vmdk"), (1, "demo.vmdk")] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{depth}: ")))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains(name) && line.contains(&format!("{cap} bytes")),
            "{line}"
        );
        assert!(
            text.contains(&format!("decides {} bytes", decided[depth])),
            "layer {depth} decides {} bytes as qemu maps it:\n{text}",
            decided[depth]
        );
    }
    assert!(
        text.contains("parent demo.vmdk") && text.contains("parent none"),
        "{text}"
    );
}

#[test]
fn export_to_stdout_writes_a_stream_qemu_reads_as_the_chain() {
    need_qemu!();
    let d = demo();
    let stream = run_example(d.path(), "export_to_stdout", &["demo-000001.vmdk"]);
    std::fs::write(d.path().join("backup.vmdk"), &stream).unwrap();
    qemu_img(d.path(), &["check", "backup.vmdk"]);
    qemu_img(d.path(), &["compare", "demo-000001.vmdk", "backup.vmdk"]);
    let info = qemu_img(d.path(), &["info", "backup.vmdk"]);
    assert!(info.contains("streamOptimized"), "{info}");
}

#[test]
fn custom_source_reads_a_backup_through_a_reader() {
    need_qemu!();
    let d = demo();
    qemu_img(
        d.path(),
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "demo-000001.vmdk",
            "s.vmdk",
        ],
    );
    let raw = qemu_raw(d.path(), "s.vmdk");
    let out = String::from_utf8(run_example(d.path(), "custom_source", &["s.vmdk"])).unwrap();
    let want = format!("{:08x} {}", crc32fast::hash(&raw), raw.len());
    assert_eq!(out.trim(), want);
    // A delta and its parent, each read through a reader, joined by content ID.
    let chain_raw = qemu_raw(d.path(), "demo-000001.vmdk");
    let out = String::from_utf8(run_example(
        d.path(),
        "custom_source",
        &["demo-000001.vmdk", "demo.vmdk"],
    ))
    .unwrap();
    let want = format!("{:08x} {}", crc32fast::hash(&chain_raw), chain_raw.len());
    assert_eq!(out.trim(), want);
    // The delta over a disk that is not its parent: refused, naming the content IDs.
    let o = Command::new(example("custom_source"))
        .args(["demo-000001.vmdk", "s.vmdk"])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("parentCID"), "{err}");
    // The delta alone reads, and says what it leaves out.
    let o = Command::new(example("custom_source"))
        .arg("demo-000001.vmdk")
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("read alone"), "{err}");
}
