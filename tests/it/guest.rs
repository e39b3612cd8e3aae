//! Guest-aware shrink (`--guest-aware`), checked against the guest tools themselves.
//!
//! Guest disks are built at test time without mounting anything: a disk of random
//! bytes (free space then holds old data, as on a reused disk), a table by `sfdisk`,
//! file systems by `mkfs.ext4 -d`, `mkfs.vfat` + `mcopy`, `mkntfs` + `ntfscp`, files
//! deleted by `debugfs` and `mdel`. Restores are made by qemu-img. The oracles:
//! `e2fsck -fn`, `fsck.vfat -n`, `ntfsfix -n` find nothing; every file reads back
//! identical (`debugfs dump`, `mcopy`, `ntfscat`); every byte outside the recognised
//! file systems is identical; inside an ext file system, a byte differs only in a block
//! `dumpe2fs` lists as free, and what differs reads as zeros.

use std::path::Path;
use std::process::Command;

use super::util::*;

const TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.ext4",
    "debugfs",
    "e2fsck",
    "dumpe2fs",
    "mkfs.vfat",
    "mcopy",
    "mdel",
    "fsck.vfat",
    "mkntfs",
    "ntfscp",
    "ntfscat",
    "ntfsfix",
];

/// Whether the guest tools are installed (CI installs them: fdisk, e2fsprogs,
/// dosfstools, mtools, ntfs-3g); under `CI=true` their absence fails.
fn have_tools() -> bool {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args([
                    "-c",
                    &format!("command -v {t} || test -x /usr/sbin/{t} || test -x /sbin/{t}"),
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        assert!(!in_ci(), "CI=true but guest tools are missing: {missing:?}");
        eprintln!("skipping: guest tools missing: {missing:?}");
        return false;
    }
    have_qemu()
}

macro_rules! need_tools {
    () => {
        if !have_tools() {
            return;
        }
    };
}

/// Run a guest tool (also found in /usr/sbin when PATH lacks it).
fn tool(d: &Path, prog: &str, args: &[&str]) -> std::process::Output {
    let path = ["/usr/sbin", "/sbin"]
        .iter()
        .map(|p| Path::new(p).join(prog))
        .find(|p| p.exists())
        .map_or(prog.into(), |p| p.into_os_string());
    run(d, path, args)
}

/// Deterministic noise.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fs {
    /// An ext file system made by this mkfs command line.
    Ext(&'static str),
    /// FAT of this many bits.
    Fat(u8),
    Ntfs,
    /// Left as noise, of a type vmdkit does not open.
    Other,
}

#[derive(Debug)]
struct Part {
    fs: Fs,
    start: u64,
    len: u64,
}

const MIB: u64 = 1 << 20;

/// The files put into every file system: kept ones, and `big`, deleted after.
fn make_files(d: &Path) {
    let f = d.join("files");
    std::fs::create_dir_all(f.join("sub")).unwrap();
    std::fs::write(f.join("a"), noise(11, 100 << 10)).unwrap();
    std::fs::write(f.join("b"), noise(12, 1536 << 10)).unwrap();
    std::fs::write(f.join("big"), noise(13, 6 << 20)).unwrap();
    std::fs::write(f.join("sub/c"), b"seven.\n").unwrap();
}

/// Build `g.raw`: noise, a table (`label` gpt or dos), and the file systems of
/// `layout` (sizes in MiB). For dos, the first partition starts at sector 63 and those
/// after the second are logical; for gpt, 1 MiB of noise is left between the first two.
fn build(d: &Path, label: &str, layout: &[(Fs, u64)], seed: u64) -> Vec<Part> {
    make_files(d);
    let total: u64 = layout.iter().map(|(_, s)| s).sum::<u64>() + 8;
    std::fs::write(d.join("g.raw"), noise(seed, (total * MIB) as usize)).unwrap();
    let mut script = format!("label: {label}\n");
    for (i, (fs, size)) in layout.iter().enumerate() {
        let ty = match (label, fs) {
            ("gpt", Fs::Ext(_)) => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            ("gpt", Fs::Fat(_) | Fs::Ntfs) => "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            ("gpt", Fs::Other) => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
            (_, Fs::Ext(_)) => "83",
            (_, Fs::Fat(_)) => "c",
            (_, Fs::Ntfs) => "7",
            (_, Fs::Other) => "8e",
        };
        if label == "dos" && i == 2 {
            script.push_str("type=5\n");
        }
        let start = if label == "gpt" && i == 1 {
            // A gap of noise after the first partition (boot loaders live in gaps).
            let first_end = 2048 + layout[0].1 * 2048;
            format!("start={}, ", first_end + 2048)
        } else if label == "dos" && i == 0 {
            // The old DOS alignment: blocks never line up with grains.
            "start=63, ".to_string()
        } else {
            String::new()
        };
        script.push_str(&format!("{start}size={}MiB, type={ty}\n", size));
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "g.raw"])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .or_else(|_| {
            Command::new("/usr/sbin/sfdisk")
                .args(["-q", "--no-reread", "--no-tell-kernel", "g.raw"])
                .current_dir(d)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .expect("sfdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "sfdisk failed on:\n{script}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&tool(d, "sfdisk", &["-J", "g.raw"]).stdout).unwrap();
    let found: Vec<(u64, u64, String)> = json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .filter(|(_, _, t)| t != "5")
        .collect();
    assert_eq!(found.len(), layout.len(), "{json}");
    let mut parts = Vec::new();
    for ((fs, _), (start, len, _)) in layout.iter().zip(found) {
        let p = Part {
            fs: *fs,
            start,
            len,
        };
        make_fs(d, &p);
        parts.push(p);
    }
    parts
}

fn region(d: &Path, file: &str, p: &Part) -> Vec<u8> {
    let all = std::fs::read(d.join(file)).unwrap();
    all[p.start as usize..(p.start + p.len) as usize].to_vec()
}

fn put_region(d: &Path, file: &str, p: &Part, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(file))
        .unwrap();
    f.write_all_at(bytes, p.start).unwrap();
}

/// Make `p`'s file system in place (on the noise already there), fill it, delete `big`.
fn make_fs(d: &Path, p: &Part) {
    std::fs::write(d.join("p.img"), region(d, "g.raw", p)).unwrap();
    match p.fs {
        Fs::Ext(mkfs) => {
            let mut args: Vec<&str> = mkfs.split(' ').collect();
            args.extend(["-q", "-F", "-E", "nodiscard", "-d", "files", "p.img"]);
            tool(d, args[0], &args[1..]);
            tool(d, "debugfs", &["-w", "-R", "rm /big", "p.img"]);
        }
        Fs::Fat(bits) => {
            let bits = bits.to_string();
            let mut args = vec!["-F", &bits, "-S", "512"];
            if bits == "32" {
                args.extend(["-s", "1"]);
            }
            args.push("p.img");
            tool(d, "mkfs.vfat", &args);
            tool(
                d,
                "mcopy",
                &["-i", "p.img", "files/a", "files/b", "files/big", "::/"],
            );
            tool(d, "mdel", &["-i", "p.img", "::/big"]);
        }
        Fs::Ntfs => {
            tool(d, "mkntfs", &["-Q", "-F", "-q", "p.img"]);
            for f in ["a", "b"] {
                tool(d, "ntfscp", &["-q", "p.img", &format!("files/{f}"), f]);
            }
        }
        Fs::Other => return,
    }
    put_region(d, "g.raw", p, &std::fs::read(d.join("p.img")).unwrap());
}

/// `dumpe2fs`'s free blocks of an ext image, as byte ranges.
fn ext_free(d: &Path, img: &str) -> Vec<std::ops::Range<u64>> {
    let text = String::from_utf8(tool(d, "dumpe2fs", &[img]).stdout).unwrap();
    let bs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut out = Vec::new();
    for l in text.lines() {
        // Per group (indented); the summary line above the groups is a count.
        let Some(list) = l.strip_prefix("  Free blocks: ") else {
            continue;
        };
        for item in list.split(", ").filter(|s| !s.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                None => (item.parse().unwrap(), item.parse().unwrap()),
            };
            out.push(a * bs..(b + 1) * bs);
        }
    }
    out
}

/// Check a restore (`restored`, a raw file in `d`) of a guest-aware copy of `orig`.
fn check_restore(d: &Path, orig: &str, restored: &str, parts: &[Part]) {
    let (a, b) = (
        std::fs::read(d.join(orig)).unwrap(),
        std::fs::read(d.join(restored)).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{restored}: size");
    for p in parts {
        let mut differing = 0u64;
        std::fs::write(
            d.join("o.img"),
            &a[p.start as usize..(p.start + p.len) as usize],
        )
        .unwrap();
        let mut free = match p.fs {
            Fs::Ext(_) => ext_free(d, "o.img"),
            _ => std::iter::once(0..p.len).collect(),
        };
        // dumpe2fs lists free blocks per group: join runs that continue each other.
        free.sort_by_key(|r| r.start);
        let mut joined: Vec<std::ops::Range<u64>> = Vec::new();
        for r in free {
            match joined.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => joined.push(r),
            }
        }
        for (i, (x, y)) in a[p.start as usize..(p.start + p.len) as usize]
            .chunks(512)
            .zip(b[p.start as usize..(p.start + p.len) as usize].chunks(512))
            .enumerate()
        {
            if x != y {
                let off = i as u64 * 512;
                assert!(
                    p.fs != Fs::Other,
                    "{restored}: a partition vmdkit does not read differs at {off:#x}"
                );
                // The whole 64 KiB grain of the disk around it (within the partition)
                // is free and reads as zeros: nothing inside a grain the guest uses
                // partly was left out.
                let g = (p.start + off) / 65536 * 65536;
                let grain = g.max(p.start) - p.start..(g + 65536).min(p.start + p.len) - p.start;
                assert!(
                    joined.iter().any(|r| r.start <= grain.start && grain.end <= r.end),
                    "{restored}: {:?} differs at byte {off:#x} of the partition, in a grain dumpe2fs does not call wholly free",
                    p.fs
                );
                let restored_grain =
                    &b[(p.start + grain.start) as usize..(p.start + grain.end) as usize];
                assert!(
                    restored_grain.iter().all(|&v| v == 0),
                    "{restored}: a left-out grain is not zeros"
                );
                differing += 512;
            }
        }
        // Each file system vmdkit reads had free space of old bytes to leave out.
        assert_eq!(
            differing > 0,
            p.fs != Fs::Other,
            "{restored}: {:?} at {:#x}: {differing} bytes left out",
            p.fs,
            p.start
        );
    }
    // Outside the partitions (tables, gaps, the backup GPT): identical.
    let mut pos = 0;
    let mut sorted: Vec<&Part> = parts.iter().collect();
    sorted.sort_by_key(|p| p.start);
    for p in sorted.iter().chain(std::iter::once(&&Part {
        fs: Fs::Other,
        start: a.len() as u64,
        len: 0,
    })) {
        assert_same(
            &a[pos..p.start as usize],
            &b[pos..p.start as usize],
            &format!("{restored}: outside the partitions"),
        );
        pos = (p.start + p.len) as usize;
    }
    // Every file system checks clean and every file reads back.
    for p in parts {
        std::fs::write(
            d.join("r.img"),
            &b[p.start as usize..(p.start + p.len) as usize],
        )
        .unwrap();
        let files = d.join("files");
        match p.fs {
            Fs::Ext(_) => {
                tool(d, "e2fsck", &["-fn", "r.img"]);
                for f in ["a", "b", "sub/c"] {
                    let out = d.join("x");
                    let _ = std::fs::remove_file(&out);
                    tool(
                        d,
                        "debugfs",
                        &["-R", &format!("dump /{f} {}", out.display()), "r.img"],
                    );
                    assert_same(
                        &std::fs::read(&out).unwrap(),
                        &std::fs::read(files.join(f)).unwrap(),
                        f,
                    );
                }
            }
            Fs::Fat(_) => {
                tool(d, "fsck.vfat", &["-n", "r.img"]);
                for f in ["a", "b"] {
                    tool(
                        d,
                        "mcopy",
                        &["-n", "-o", "-i", "r.img", &format!("::/{f}"), "x"],
                    );
                    assert_same(
                        &std::fs::read(d.join("x")).unwrap(),
                        &std::fs::read(files.join(f)).unwrap(),
                        f,
                    );
                }
            }
            Fs::Ntfs => {
                tool(d, "ntfsfix", &["-n", "r.img"]);
                for f in ["a", "b"] {
                    let out = tool(d, "ntfscat", &["r.img", f]).stdout;
                    assert_same(&out, &std::fs::read(files.join(f)).unwrap(), f);
                }
            }
            Fs::Other => {}
        }
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `g.raw` as `g.vmdk` (by qemu-img), exported `--guest-aware` as `out` of type `ty`:
/// the JSON report.
fn guest_export(d: &Path, out: &str, ty: &str) -> serde_json::Value {
    qemu_img(d, &["convert", "-O", "vmdk", "g.raw", "g.vmdk"]);
    let args = ["--json", "export", "g.vmdk", out, "-d", ty, "--guest-aware"];
    json(&vmdkit_ok(d, &args))
}

/// `measure --guest-aware` of `g.vmdk` as type `ty` named `name`: the JSON report.
fn guest_measure(d: &Path, ty: &str, name: &str) -> serde_json::Value {
    let args = [
        "--json",
        "measure",
        "g.vmdk",
        "-d",
        ty,
        "--guest-aware",
        "--name",
        name,
    ];
    json(&vmdkit_ok(d, &args))
}

fn file_len(d: &Path, f: &str) -> u64 {
    std::fs::metadata(d.join(f)).unwrap().len()
}

/// GPT: ext4 (4 KiB blocks), a gap, FAT32, NTFS, a swap partition of noise, ext4
/// (1 KiB blocks). Sparse file, stream through a pipe, raw and flat outputs: all restore
/// (by qemu-img) to what the guest tools accept, with every file; much smaller than a
/// plain export; the manifest checks the source and the restores; `check` and
/// `qemu-img check` accept the output, which says it is guest-aware.
#[test]
fn gpt_disk_keeps_every_file_and_leaves_out_the_free_space() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "gpt",
        &[
            (Fs::Ext("mkfs.ext4 -b 4096"), 40),
            (Fs::Fat(32), 40),
            (Fs::Ntfs, 24),
            (Fs::Other, 4),
            (Fs::Ext("mkfs.ext4 -b 1024"), 24),
        ],
        1,
    );
    qemu_img(d, &["convert", "-O", "vmdk", "g.raw", "g.vmdk"]);
    vmdkit_ok(d, &["export", "g.vmdk", "plain.vmdk", "-d", "sparse"]);
    let out = vmdkit_ok(
        d,
        &[
            "--json",
            "export",
            "g.vmdk",
            "ga.vmdk",
            "-d",
            "sparse",
            "--guest-aware",
            "--manifest",
            "ga.man",
        ],
    );
    let report = json(&out);
    let g = &report["guest"];
    assert_eq!(g["table"], "gpt", "{report}");
    let fs: Vec<String> = g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file_system"].as_str().unwrap_or("-").to_string())
        .collect();
    assert_eq!(
        fs,
        [
            "ext4 (4096-byte blocks)",
            "FAT32",
            "NTFS (4096-byte clusters)",
            "-",
            "ext4 (1024-byte blocks)"
        ]
    );
    assert!(g["partitions"][3]["copied_whole"].is_string());
    let (plain, ga) = (file_len(d, "plain.vmdk"), file_len(d, "ga.vmdk"));
    assert!(ga * 3 < plain, "guest-aware {ga} bytes vs plain {plain}");

    // Sparse, restored by qemu-img.
    qemu_img(d, &["convert", "-O", "raw", "ga.vmdk", "ga.raw"]);
    check_restore(d, "g.raw", "ga.raw", &parts);
    assert!(qemu_img(d, &["check", "ga.vmdk"]).contains("No errors"));
    vmdkit_ok(d, &["check", "ga.vmdk"]);
    let info = String::from_utf8(vmdkit_ok(d, &["info", "ga.vmdk"]).stdout).unwrap();
    assert!(info.contains("written guest-aware"), "{info}");
    let text = std::fs::read(d.join("ga.vmdk")).unwrap();
    assert!(text
        .windows(27)
        .any(|w| w == b"ddb.vmdkit.guestAware = \"1\""));

    // The manifest compares what was kept: the source (whose free space holds old
    // bytes), the output and a raw restore all match it; a changed kept byte does not.
    vmdkit_ok(d, &["verify", "--manifest", "ga.man", "g.vmdk"]);
    vmdkit_ok(d, &["verify", "--manifest", "ga.man", "ga.vmdk"]);
    vmdkit_ok(
        d,
        &["verify", "--manifest", "ga.man", "--from", "raw", "ga.raw"],
    );
    let mut bad = std::fs::read(d.join("ga.raw")).unwrap();
    bad[100] ^= 1; // the protective MBR's boot code: kept
    std::fs::write(d.join("bad.raw"), bad).unwrap();
    assert!(!vmdkit(
        d,
        &["verify", "--manifest", "ga.man", "--from", "raw", "bad.raw"]
    )
    .status
    .success());

    // measure --guest-aware is exact for sparse outputs.
    let m = guest_measure(d, "sparse", "ga.vmdk");
    assert_eq!(m["required"].as_u64().unwrap(), ga, "{m}");
    assert_eq!(m["exact"], true);
    assert_eq!(m["guest"]["left_out"], g["left_out"], "{m}");

    // A stream through a pipe, checked on the way by verify, restored by qemu-img.
    let sh = format!(
        "{b} export g.vmdk - --guest-aware | tee s.vmdk | {b} verify --manifest ga.man -",
        b = bin().display()
    );
    run(d, "sh", &["-c", &sh]);
    qemu_img(d, &["convert", "-O", "raw", "s.vmdk", "s.raw"]);
    assert_same(
        &std::fs::read(d.join("s.raw")).unwrap(),
        &std::fs::read(d.join("ga.raw")).unwrap(),
        "stream",
    );
    assert!(file_len(d, "s.vmdk") * 3 < plain);

    // Raw (holes where the guest is free) and monolithicFlat.
    vmdkit_ok(
        d,
        &["export", "g.vmdk", "out.raw", "-d", "raw", "--guest-aware"],
    );
    assert_same(
        &std::fs::read(d.join("out.raw")).unwrap(),
        &std::fs::read(d.join("ga.raw")).unwrap(),
        "raw",
    );
    let used = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d.join("out.raw")).unwrap().blocks() * 512
    };
    assert!(
        used * 3 < file_len(d, "g.raw"),
        "raw output allocates {used} bytes"
    );
    vmdkit_ok(
        d,
        &[
            "export",
            "g.vmdk",
            "flat.vmdk",
            "-d",
            "flat",
            "--guest-aware",
        ],
    );
    qemu_img(d, &["convert", "-O", "raw", "flat.vmdk", "flat.raw"]);
    check_restore(d, "g.raw", "flat.raw", &parts);
}

/// MBR with an extended partition: ext4 and FAT32 primary; NTFS, ext4 (1 KiB blocks)
/// and an LVM partition of noise logical. Split sparse export and a guest-aware import
/// (thin vmfs), each restored by qemu-img; measure is exact for the split output.
#[test]
fn mbr_disk_with_logical_partitions_keeps_every_file() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "dos",
        &[
            (Fs::Ext("mkfs.ext4 -b 4096"), 40),
            (Fs::Fat(32), 40),
            (Fs::Ntfs, 24),
            (Fs::Ext("mkfs.ext4 -b 1024"), 24),
            (Fs::Other, 4),
        ],
        2,
    );
    assert_eq!(
        parts[0].start,
        63 * 512,
        "the first partition is not at sector 63"
    );
    let report = guest_export(d, "split.vmdk", "split");
    let g = &report["guest"];
    assert_eq!(g["table"], "mbr", "{report}");
    let numbers: Vec<u64> = g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 5, 6, 7], "{report}");
    qemu_img(d, &["convert", "-O", "raw", "split.vmdk", "split.raw"]);
    check_restore(d, "g.raw", "split.raw", &parts);
    let files: Vec<String> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let written: u64 = files
        .iter()
        .filter(|f| f.ends_with("-s001.vmdk"))
        .map(|f| std::fs::metadata(d.join(f)).unwrap().len())
        .sum();
    let m = guest_measure(d, "split", "split.vmdk");
    let all: u64 = files
        .iter()
        .map(|f| std::fs::metadata(d.join(f)).unwrap().len())
        .sum();
    assert_eq!(m["required"].as_u64().unwrap(), all, "{m}");
    assert!(written > 0);

    vmdkit_ok(d, &["import", "g.vmdk", "thin.vmdk", "--guest-aware"]);
    qemu_img(d, &["convert", "-O", "raw", "thin.vmdk", "thin.raw"]);
    check_restore(d, "g.raw", "thin.raw", &parts);
}

/// Write every 64 KiB chunk where `new` differs from `old` into `child` (a qemu child
/// of a copy of `old`), with qemu-io.
fn write_changes(d: &Path, old: &[u8], new: &[u8], child: &str) -> usize {
    let mut cmds = Vec::new();
    for (i, (a, b)) in old.chunks(65536).zip(new.chunks(65536)).enumerate() {
        if a != b {
            let f = format!("chunk{i}");
            std::fs::write(d.join(&f), b).unwrap();
            cmds.push(format!("write -s {f} {} {}", i * 65536, b.len()));
        }
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    for c in refs.chunks(200) {
        qemu_io(d, child, c);
    }
    cmds.len()
}

/// A chain: the child deletes `b` and writes `new` into space the base's bitmap calls
/// free. The free map must come from the chain's newest state: `new` survives a
/// guest-aware export of the child (it would not if the base's bitmaps were read), and
/// an increment exported guest-aware applies onto a guest-aware restore of the base.
/// Through pipes too; a guest-aware import from a pipe is refused before reading.
#[test]
fn chains_are_read_at_their_newest_state_and_increments_apply() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "gpt",
        &[(Fs::Ext("mkfs.ext4 -b 4096"), 48), (Fs::Fat(32), 40)],
        3,
    );
    let p = &parts[0];
    // The guest's next state: in the ext4 partition, `b` deleted, `new` written.
    std::fs::write(d.join("files/new"), noise(21, 5 << 20)).unwrap();
    std::fs::write(d.join("p.img"), region(d, "g.raw", p)).unwrap();
    tool(d, "debugfs", &["-w", "-R", "rm /b", "p.img"]);
    tool(d, "debugfs", &["-w", "-R", "write files/new new", "p.img"]);
    std::fs::copy(d.join("g.raw"), d.join("g2.raw")).unwrap();
    put_region(d, "g2.raw", p, &std::fs::read(d.join("p.img")).unwrap());
    // `new` lies (at least partly) where the base's bitmap said free: reading the base's
    // bitmaps would leave it out, so this test can fail.
    std::fs::write(d.join("base.img"), region(d, "g.raw", p)).unwrap();
    let free0 = ext_free(d, "base.img");
    let blocks =
        String::from_utf8(tool(d, "debugfs", &["-R", "blocks /new", "p.img"]).stdout).unwrap();
    let in_free = blocks
        .split_whitespace()
        .filter_map(|b| b.parse::<u64>().ok())
        .filter(|b| free0.iter().any(|r| r.contains(&(b * 4096))))
        .count();
    assert!(
        in_free > 256,
        "`new` does not land in space the base called free"
    );

    qemu_img(d, &["convert", "-O", "vmdk", "g.raw", "base.vmdk"]);
    qemu_child(d, "base.vmdk", "child.vmdk", false);
    let (old, new) = (
        std::fs::read(d.join("g.raw")).unwrap(),
        std::fs::read(d.join("g2.raw")).unwrap(),
    );
    assert!(write_changes(d, &old, &new, "child.vmdk") > 0);
    assert_same(
        &qemu_raw(d, "child.vmdk"),
        &new,
        "the child chain reads as the new state",
    );

    // The whole chain, guest-aware, restored by qemu-img.
    let files_b = std::fs::read(d.join("files/b")).unwrap();
    vmdkit_ok(
        d,
        &[
            "export",
            "child.vmdk",
            "ga.vmdk",
            "-d",
            "sparse",
            "--guest-aware",
        ],
    );
    qemu_img(d, &["convert", "-O", "raw", "ga.vmdk", "ga.raw"]);
    // `b` is gone in the new state; the check reads `a`, `sub/c`, and `new` below.
    std::fs::write(d.join("files/b"), b"").unwrap();
    let r = region(d, "ga.raw", p);
    std::fs::write(d.join("r.img"), &r).unwrap();
    tool(d, "e2fsck", &["-fn", "r.img"]);
    tool(
        d,
        "debugfs",
        &[
            "-R",
            &format!("dump /new {}", d.join("x").display()),
            "r.img",
        ],
    );
    assert_same(
        &std::fs::read(d.join("x")).unwrap(),
        &std::fs::read(d.join("files/new")).unwrap(),
        "new",
    );
    std::fs::write(d.join("files/b"), &files_b).unwrap();

    // An increment, guest-aware, applied onto a guest-aware restore of the base.
    vmdkit_ok(
        d,
        &[
            "export",
            "child.vmdk",
            "inc.vmdk",
            "--delta",
            "--guest-aware",
            "--manifest",
            "inc.man",
        ],
    );
    vmdkit_ok(
        d,
        &[
            "import",
            "base.vmdk",
            "rest.vmdk",
            "-d",
            "sparse",
            "--guest-aware",
        ],
    );
    vmdkit_ok(d, &["apply", "rest.vmdk", "inc.vmdk"]);
    vmdkit_ok(d, &["verify", "--manifest", "inc.man", "rest.vmdk"]);
    qemu_img(d, &["convert", "-O", "raw", "rest.vmdk", "rest.raw"]);
    std::fs::write(d.join("r.img"), region(d, "rest.raw", p)).unwrap();
    tool(d, "e2fsck", &["-fn", "r.img"]);
    for f in ["new", "a", "sub/c"] {
        let _ = std::fs::remove_file(d.join("x"));
        tool(
            d,
            "debugfs",
            &[
                "-R",
                &format!("dump /{f} {}", d.join("x").display()),
                "r.img",
            ],
        );
        assert_same(
            &std::fs::read(d.join("x")).unwrap(),
            &std::fs::read(d.join("files").join(f)).unwrap(),
            f,
        );
    }
    // Smaller than a plain increment: `b`'s old blocks are not in it, nor is the old
    // noise the child's grains carried beside `new`.
    vmdkit_ok(d, &["export", "child.vmdk", "inc-plain.vmdk", "--delta"]);
    assert!(file_len(d, "inc.vmdk") <= file_len(d, "inc-plain.vmdk"));

    // Through a pipe: export - | import -, the same content as the file output.
    let sh = format!(
        "{b} export child.vmdk - --guest-aware | {b} import - piped.vmdk -d sparse",
        b = bin().display()
    );
    run(d, "sh", &["-c", &sh]);
    assert!(qemu_img(d, &["compare", "piped.vmdk", "ga.vmdk"]).contains("identical"));
    // A guest-aware import from a pipe is refused, and nothing is written.
    let sh = format!("{} import - x.vmdk --guest-aware < s.none", bin().display());
    std::fs::write(d.join("s.none"), b"").unwrap();
    let out = Command::new("sh")
        .args(["-c", &sh])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pipe"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.join("x.vmdk").exists());
}

/// When in doubt, copy: a journal to replay, a dirty FAT, a hibernated NTFS, an ext
/// feature vmdkit does not know, an ext file system under another's boot sector: each
/// partition copied whole, said in the report, and
/// the output reads byte-identical to the source. A backup GPT header that disagrees,
/// and MBR partitions that overlap, make the whole disk copied.
#[test]
fn doubtful_partitions_and_tables_are_copied_whole() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "gpt",
        &[
            (Fs::Ext("mkfs.ext4 -b 4096"), 16),
            (Fs::Fat(32), 36),
            (Fs::Ntfs, 16),
            (Fs::Ext("mkfs.ext4 -b 1024"), 16),
            (Fs::Ext("mkfs.ext4 -b 4096"), 16),
        ],
        4,
    );
    // ext4: a journal that needs recovery.
    std::fs::write(d.join("p.img"), region(d, "g.raw", &parts[0])).unwrap();
    tool(
        d,
        "debugfs",
        &["-w", "-R", "feature needs_recovery", "p.img"],
    );
    put_region(
        d,
        "g.raw",
        &parts[0],
        &std::fs::read(d.join("p.img")).unwrap(),
    );
    // FAT32: the clean-shutdown bit of entry 1 cleared in both FATs.
    let mut fat = region(d, "g.raw", &parts[1]);
    let (reserved, size, n) = (
        u16::from_le_bytes([fat[14], fat[15]]) as usize * 512,
        u32::from_le_bytes(fat[36..40].try_into().unwrap()) as usize * 512,
        fat[16] as usize,
    );
    for c in 0..n {
        fat[reserved + c * size + 7] &= !0x08;
    }
    put_region(d, "g.raw", &parts[1], &fat);
    // NTFS: a hibernation file.
    std::fs::write(d.join("p.img"), region(d, "g.raw", &parts[2])).unwrap();
    let mut hib = b"hibr".to_vec();
    hib.extend(noise(5, 64 << 10));
    std::fs::write(d.join("hib"), hib).unwrap();
    tool(d, "ntfscp", &["-q", "p.img", "hib", "hiberfil.sys"]);
    put_region(
        d,
        "g.raw",
        &parts[2],
        &std::fs::read(d.join("p.img")).unwrap(),
    );
    // ext4: an incompatible feature bit nobody defines.
    let mut e = region(d, "g.raw", &parts[3]);
    e[1024 + 96 + 2] |= 0x40;
    put_region(d, "g.raw", &parts[3], &e);
    // ext4 under an NTFS boot sector left from another format: which is live is unknown.
    let mut e = region(d, "g.raw", &parts[4]);
    e[..512].copy_from_slice(&region(d, "g.raw", &parts[2])[..512]);
    put_region(d, "g.raw", &parts[4], &e);

    let report = guest_export(d, "ga.vmdk", "sparse");
    let ps = report["guest"]["partitions"].as_array().unwrap();
    let why: Vec<&str> = ps
        .iter()
        .map(|p| p["copied_whole"].as_str().unwrap_or(""))
        .collect();
    assert!(why[0].contains("recovery"), "{report}");
    assert!(why[1].contains("dirty"), "{report}");
    assert!(why[2].contains("hibernated"), "{report}");
    assert!(why[3].contains("features not understood"), "{report}");
    assert!(why[4].contains("both an ext superblock"), "{report}");
    assert_eq!(report["guest"]["left_out"], 0);
    assert!(qemu_img(d, &["compare", "g.vmdk", "ga.vmdk"]).contains("identical"));

    // A backup GPT header that does not match the primary: the whole disk.
    let mut raw = std::fs::read(d.join("g.raw")).unwrap();
    let n = raw.len();
    // The backup's disk GUID changed and its CRC made right: a valid header that says
    // another disk.
    let h = n - 512;
    raw[h + 60] ^= 0xFF;
    raw[h + 16..h + 20].fill(0);
    let crc = crc32fast::hash(&raw[h..h + 92]);
    raw[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(d.join("g.raw"), &raw).unwrap();
    std::fs::remove_file(d.join("g.vmdk")).unwrap();
    copies_the_whole_disk(d, "disagree");
}

/// A guest-aware export of `g.raw` (as `g.vmdk`) copies the whole disk: the table's
/// note says `why`, and the output reads as the source.
fn copies_the_whole_disk(d: &Path, why: &str) {
    let report = guest_export(d, "whole.vmdk", "sparse");
    let note = report["guest"]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(why) && note.contains("whole disk"),
        "{report}"
    );
    assert_eq!(report["guest"]["left_out"], 0);
    assert!(qemu_img(d, &["compare", "g.vmdk", "whole.vmdk"]).contains("identical"));
}

/// MBR partitions that overlap (a FAT volume whose free clusters are another
/// partition's data) make the whole disk copied.
#[test]
fn overlapping_mbr_partitions_make_the_whole_disk_copied() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "dos",
        &[(Fs::Fat(32), 36), (Fs::Ext("mkfs.ext4 -b 4096"), 16)],
        6,
    );
    // Grow partition 1 over partition 2.
    let mut raw = std::fs::read(d.join("g.raw")).unwrap();
    let grown = ((parts[1].start + parts[1].len - parts[0].start) / 512) as u32;
    raw[446 + 12..446 + 16].copy_from_slice(&grown.to_le_bytes());
    std::fs::write(d.join("g.raw"), &raw).unwrap();
    copies_the_whole_disk(d, "overlap");
}

/// The table and file-system readers over mutations of real images (what the fuzz
/// targets `guest_table` and `guest_fs` run): they end without a panic, and what they
/// call free lies inside the volume.
#[test]
fn guest_readers_survive_mutated_images() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    make_files(d);
    let mut seeds = Vec::new();
    // Small volumes (ext4 with 1 KiB blocks, FAT12, NTFS) with a file each.
    std::fs::write(d.join("small"), noise(9, 200 << 10)).unwrap();
    for mk in [
        &[
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard",
            "-b",
            "1024",
            "-d",
            "files/sub",
            "v.img",
        ][..],
        &["mkfs.vfat", "v.img"],
        &["mkntfs", "-Q", "-F", "-q", "v.img"],
    ] {
        std::fs::write(d.join("v.img"), noise(7, 2 << 20)).unwrap();
        tool(d, mk[0], &mk[1..]);
        match mk[0] {
            "mkfs.vfat" => drop(tool(d, "mcopy", &["-i", "v.img", "small", "::/"])),
            "mkntfs" => drop(tool(d, "ntfscp", &["-q", "v.img", "small", "small"])),
            _ => {}
        }
        seeds.push(std::fs::read(d.join("v.img")).unwrap());
    }
    build(
        d,
        "gpt",
        &[(Fs::Ext("mkfs.ext4 -b 1024"), 10), (Fs::Other, 1)],
        8,
    );
    seeds.push(std::fs::read(d.join("g.raw")).unwrap());
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for seed in &seeds {
        vmdkit::fuzzing::guest(seed);
        vmdkit::fuzzing::guest_fs(seed);
        for _ in 0..150 {
            let mut m = seed.clone();
            for _ in 0..1 + next() % 8 {
                // Mostly the first 64 KiB (superblocks, BPBs, tables), sometimes anywhere.
                let span = if next() % 4 == 0 {
                    m.len()
                } else {
                    m.len().min(65536)
                };
                let at = (next() as usize) % span;
                m[at] = next() as u8;
            }
            vmdkit::fuzzing::guest(&m);
            vmdkit::fuzzing::guest_fs(&m);
        }
    }
}

/// The ext layouts the reader must get right, each checked against `dumpe2fs`'s own
/// free lists, `e2fsck` and the files: BLOCK_UNINIT groups with superblock backups
/// (ext4, 8 MiB groups, flex_bg), meta_bg over three meta groups (1 KiB blocks),
/// 32-bit descriptors without flex_bg, ext2 (no journal, no checksums: BLOCK_UNINIT is
/// not honoured), ext3; and FAT16 and FAT12.
#[test]
fn ext_layouts_and_small_fats_keep_every_file() {
    need_tools!();
    let t = tmp();
    let d = t.path();
    let parts = build(
        d,
        "gpt",
        &[
            (Fs::Ext("mkfs.ext4 -b 4096 -g 2048"), 64),
            (
                Fs::Ext("mkfs.ext4 -b 1024 -g 1024 -O meta_bg,^resize_inode"),
                40,
            ),
            (
                Fs::Ext("mkfs.ext4 -b 4096 -g 2048 -O ^64bit,^flex_bg,^metadata_csum"),
                32,
            ),
            (Fs::Ext("mkfs.ext2 -b 4096 -g 2048"), 24),
            (Fs::Ext("mkfs.ext3 -b 1024"), 24),
            (Fs::Fat(16), 32),
            (Fs::Fat(12), 12),
        ],
        9,
    );
    // The layouts are what they claim: uninitialised groups, meta groups.
    std::fs::write(d.join("o.img"), region(d, "g.raw", &parts[0])).unwrap();
    let dump = String::from_utf8(tool(d, "dumpe2fs", &["o.img"]).stdout).unwrap();
    assert!(
        dump.contains("BLOCK_UNINIT"),
        "no uninitialised group to read"
    );
    std::fs::write(d.join("o.img"), region(d, "g.raw", &parts[1])).unwrap();
    let dump = String::from_utf8(tool(d, "dumpe2fs", &["o.img"]).stdout).unwrap();
    assert!(dump.contains("meta_bg") && dump.matches("\nGroup ").count() > 32);
    let report = guest_export(d, "ga.vmdk", "sparse");
    let fs: Vec<&str> = report["guest"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file_system"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        fs,
        [
            "ext4 (4096-byte blocks)",
            "ext4 (1024-byte blocks)",
            "ext4 (4096-byte blocks)",
            "ext2 (4096-byte blocks)",
            "ext3 (1024-byte blocks)",
            "FAT16",
            "FAT12"
        ],
        "{report}"
    );
    qemu_img(d, &["convert", "-O", "raw", "ga.vmdk", "ga.raw"]);
    check_restore(d, "g.raw", "ga.raw", &parts);
}
