//! Export: every format round-trips through qemu-img; stdout equals file bytes; tar
//! streams extract to working disks; sources stay unchanged; zeros take no space.

use super::util::*;
use std::path::Path;
use std::process::{Command, Stdio};

const FORMATS: &[&str] = &[
    "stream",
    "sparse",
    "split",
    "flat",
    "twoGbMaxExtentFlat",
    "vmfs",
    "raw",
];

/// A depth-3 qemu chain with data, zeroed grains, written zeros and partial grains.
fn chain(d: &Path, size: &str) {
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=lsilogic",
            "base.vmdk",
            size,
        ],
    );
    qemu_io(
        d,
        "base.vmdk",
        &[
            "write -P 0x01 0 3M",
            "write -P 0x02 40M 1M",
            "write -P 0x0 50M 2M",
        ],
    );
    qemu_child(d, "base.vmdk", "mid.vmdk", true);
    qemu_io(
        d,
        "mid.vmdk",
        &[
            "write -P 0x03 1M 100k",
            "write -z 2M 128k",
            "write -P 0x04 63M 700k",
        ],
    );
    qemu_child(d, "mid.vmdk", "top.vmdk", false);
    qemu_io(
        d,
        "top.vmdk",
        &["write -P 0x05 33M 4k", "write -P 0x06 8M 64k"],
    );
}

fn digests(d: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_file(&p),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_format_round_trips_through_qemu_and_sources_stay_unchanged() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "100M");
    let before = digests(d);
    std::fs::create_dir(d.join("out")).unwrap();
    for f in FORMATS {
        let dst = format!("out/{f}.vmdk");
        vmdkit_ok(d, &["export", "top.vmdk", &dst, "--format", f, "-q"]);
        let cmp = if *f == "raw" {
            qemu_img(d, &["compare", "-f", "raw", "-F", "vmdk", &dst, "top.vmdk"])
        } else {
            let info = qemu_img(d, &["info", &dst]);
            assert!(
                !info.contains("backing file"),
                "{f}: no parent link: {info}"
            );
            qemu_img(d, &["check", &dst]);
            qemu_img(d, &["compare", &dst, "top.vmdk"])
        };
        assert!(cmp.contains("identical"), "{f}: {cmp}");
    }
    // The sources are untouched.
    assert_eq!(
        digests(d)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("out"))
            .collect::<Vec<_>>(),
        before
    );
    // Descriptor keeps the adapter type and has a fresh CID, no parent.
    let text = std::fs::read_to_string(d.join("out/split.vmdk")).unwrap();
    assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
    assert!(text.contains("parentCID=ffffffff"), "{text}");
    assert!(!text.contains("parentFileNameHint"), "{text}");
}

#[test]
fn stdout_bytes_equal_file_bytes() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "64M");
    std::fs::create_dir(d.join("o")).unwrap();
    for f in ["stream", "sparse", "raw"] {
        // Same embedded name on both paths: the file is named like the source.
        vmdkit_ok(
            d,
            &[
                "export",
                "top.vmdk",
                "o/top.vmdk",
                "--format",
                f,
                "-q",
                "--force",
            ],
        );
        let piped = vmdkit_ok(d, &["export", "top.vmdk", "-", "--format", f, "-q"]).stdout;
        let file = std::fs::read(d.join("o/top.vmdk")).unwrap();
        assert_same(&piped, &file, f);
    }
}

#[test]
fn tar_streams_extract_to_working_disks() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "100M");
    for f in ["split", "flat", "twoGbMaxExtentFlat", "vmfs"] {
        let x = d.join(format!("x-{f}"));
        std::fs::create_dir(&x).unwrap();
        let mut exp = Command::new(bin())
            .args(["export", "top.vmdk", "-", "--format", f, "-q"])
            .current_dir(d)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let tar = Command::new("tar")
            .arg("-x")
            .current_dir(&x)
            .stdin(exp.stdout.take().unwrap())
            .status()
            .unwrap();
        assert!(tar.success(), "{f}: tar -x");
        assert!(exp.wait().unwrap().success(), "{f}: export");
        let cmp = qemu_img(
            &x,
            &["compare", "top.vmdk", d.join("top.vmdk").to_str().unwrap()],
        );
        assert!(cmp.contains("identical"), "{f}: {cmp}");
        // The extracted set is what the same export writes to files.
        let y = d.join(format!("y-{f}"));
        std::fs::create_dir(&y).unwrap();
        vmdkit_ok(
            d,
            &[
                "export",
                "top.vmdk",
                y.join("top.vmdk").to_str().unwrap(),
                "--format",
                f,
                "-q",
            ],
        );
        for e in std::fs::read_dir(&y).unwrap() {
            let e = e.unwrap();
            let a = std::fs::read(e.path()).unwrap();
            let b = std::fs::read(x.join(e.file_name())).unwrap();
            assert_same(&a, &b, &format!("{f}: {:?}", e.file_name()));
        }
    }
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} export top.vmdk - --format split -q | tar -t",
            bin().display()
        ))
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "top.vmdk\ntop-s001.vmdk\n"
    );
}

#[test]
fn big_disks_split_at_vmware_extent_size() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "big.vmdk", "5G"]);
    qemu_io(
        d,
        "big.vmdk",
        &["write -P 0x07 2047M 2M", "write -P 0x08 5119M 1M"],
    );
    vmdkit_ok(d, &["export", "big.vmdk", "out.vmdk", "-q"]);
    let text = std::fs::read_to_string(d.join("out.vmdk")).unwrap();
    // VMDK 1.1 technote example: 5 GiB -> 4192256 + 4192256 + 2101248.
    assert!(text.contains("RW 4192256 SPARSE \"out-s001.vmdk\"\nRW 4192256 SPARSE \"out-s002.vmdk\"\nRW 2101248 SPARSE \"out-s003.vmdk\""), "{text}");
    qemu_img(d, &["check", "out.vmdk"]);
    let cmp = qemu_img(d, &["compare", "out.vmdk", "big.vmdk"]);
    assert!(cmp.contains("identical"), "{cmp}");
    // Written data only: three grains' worth per MiB written, tables aside.
    let used: u64 = ["out-s001.vmdk", "out-s002.vmdk", "out-s003.vmdk"]
        .iter()
        .map(|f| std::fs::metadata(d.join(f)).unwrap().len())
        .sum();
    assert!(used < 6 << 20, "{used}");
}

#[test]
fn written_zeros_take_no_space() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "z.vmdk", "64M"]);
    // 8 MiB allocated but all zero (what a guest's zero-free tool leaves), 1 MiB of data.
    qemu_io(d, "z.vmdk", &["write -P 0 0 8M", "write -P 0x09 16M 1M"]);
    assert!(std::fs::metadata(d.join("z.vmdk")).unwrap().len() > 8 << 20);
    vmdkit_ok(
        d,
        &["export", "z.vmdk", "s.vmdk", "--format", "sparse", "-q"],
    );
    vmdkit_ok(
        d,
        &["export", "z.vmdk", "so.vmdk", "--format", "stream", "-q"],
    );
    vmdkit_ok(d, &["export", "z.vmdk", "r.raw", "--format", "raw", "-q"]);
    // 16 grains of data after a 64 KiB metadata area.
    assert_eq!(
        std::fs::metadata(d.join("s.vmdk")).unwrap().len(),
        (1 << 20) + 65536
    );
    assert!(std::fs::metadata(d.join("so.vmdk")).unwrap().len() < 200 << 10);
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(d.join("r.raw")).unwrap().blocks() * 512 <= 2 << 20);
    for f in ["s.vmdk", "so.vmdk"] {
        assert!(qemu_img(d, &["compare", f, "z.vmdk"]).contains("identical"));
    }
}

#[test]
fn stream_follows_the_esxi_checklist() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "100M");
    vmdkit_ok(
        d,
        &["export", "top.vmdk", "s.vmdk", "--format", "stream", "-q"],
    );
    let b = std::fs::read(d.join("s.vmdk")).unwrap();
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&b[0..4], b"KDMV");
    assert_eq!(u32at(4), 3, "version 3");
    assert_eq!(u32at(8), 0x30001, "flags");
    assert_eq!(u64at(20), 128, "grain");
    assert_eq!(u32at(44), 512, "GTEs per GT");
    assert_eq!(u64at(48), 0, "no redundant GD");
    assert_eq!(u64at(56), u64::MAX, "GD at end");
    assert_eq!(u16::from_le_bytes([b[77], b[78]]), 1, "deflate");
    let n = b.len();
    assert_eq!(n % 512, 0);
    assert!(b[n - 512..].iter().all(|&x| x == 0), "EOS marker last");
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV", "footer");
    assert_eq!(
        u32::from_le_bytes(b[n - 1536 + 12..n - 1536 + 16].try_into().unwrap()),
        3,
        "footer marker"
    );
    let desc = String::from_utf8_lossy(&b[512..512 * 3]);
    assert!(desc.contains("createType=\"streamOptimized\""), "{desc}");
    assert!(desc.contains("parentCID=ffffffff"));
    assert!(desc.contains("ddb.longContentID"));
    assert!(!desc.contains("\nCID=ffffffff\n") && !desc.contains("\nCID=fffffffe\n"));
    // The first grain record's zlib header.
    assert_eq!(&b[128 * 512 + 12..128 * 512 + 13], &[0x78]);
    qemu_img(d, &["check", "s.vmdk"]);
    assert!(qemu_img(d, &["compare", "s.vmdk", "top.vmdk"]).contains("identical"));
}

#[test]
fn refuses_to_overwrite_and_leaves_nothing_behind() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "64M");
    std::fs::write(d.join("out-s001.vmdk"), b"precious").unwrap();
    let err = vmdkit_err(d, &["export", "top.vmdk", "out.vmdk"]);
    assert!(
        err.contains("out-s001.vmdk") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(std::fs::read(d.join("out-s001.vmdk")).unwrap(), b"precious");
    assert!(!d.join("out.vmdk").exists());
    // A failing export (disk full on /dev/full) leaves no temporaries.
    let out = Command::new(bin())
        .args(["export", "top.vmdk", "-", "-q"])
        .current_dir(d)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk is full"), "{err}");
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("vmdkit-tmp")), "{names:?}");
}

/// Issue 17 item 10: a backup into a pipe whose reader dies (mbuffer out of space, a tape
/// error, a dropped ssh) fails, saying how many bytes got through; `cat | head` stays
/// quiet.
#[test]
fn export_to_a_closed_pipe_fails_and_says_so() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "s.vmdk", "1G"]);
    qemu_io(d, "s.vmdk", &["write -P 0x61 0 64M"]);
    for f in ["stream", "raw", "split"] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{} export s.vmdk - --format {f} -q | head -c 1000 >/dev/null; echo ${{PIPESTATUS[0]}}", bin().display()))
            .current_dir(d)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1",
            "{f}: exit status of vmdkit: {err}"
        );
        assert!(
            err.contains("INCOMPLETE") && err.contains("bytes"),
            "{f}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} cat s.vmdk | head -c 1000 >/dev/null; echo ${{PIPESTATUS[0]}}",
            bin().display()
        ))
        .current_dir(d)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "cat | head"
    );
}

#[test]
fn manifest_verifies_a_copy_and_names_damaged_ranges() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d, "64M");
    vmdkit_ok(d, &["export", "top.vmdk", "-", "-q", "--manifest", "m.txt"]);
    vmdkit_ok(
        d,
        &["export", "top.vmdk", "copy.raw", "--format", "raw", "-q"],
    );
    // The manifest's whole-content CRC equals an independent CRC of qemu's raw image.
    let raw = qemu_raw(d, "top.vmdk");
    let text = std::fs::read_to_string(d.join("m.txt")).unwrap();
    assert!(
        text.contains(&format!("total {:08x}", crc32fast::hash(&raw))),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.split_whitespace().count() == 2 && l.as_bytes()[0].is_ascii_digit())
            .count(),
        64
    );
    // A restored copy with the descriptor around a raw flat file verifies.
    std::fs::write(d.join("copy.vmdk"), "version=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 131072 FLAT \"copy.raw\" 0\n").unwrap();
    vmdkit_ok(d, &["verify", "copy.vmdk", "--manifest", "m.txt"]);
    // Damage two bytes in blocks 5 and 6 and one in block 40.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("copy.raw"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xee], 6 * (1 << 20) - 1).unwrap();
    f.write_all_at(&[0xee], 6 * (1 << 20)).unwrap();
    f.write_all_at(&[0xee], 40 * (1 << 20) + 7).unwrap();
    let out = vmdkit(d, &["verify", "copy.vmdk", "--manifest", "m.txt"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Ranges as people write them (issue 22 item 6).
    assert_eq!(text, "differs: 5.0 MiB - 7.0 MiB (bytes 0x500000-0x6fffff, 1 MiB blocks 5-6)\ndiffers: 40.0 MiB - 41.0 MiB (bytes 0x2800000-0x28fffff, 1 MiB block 40)\n");
}
