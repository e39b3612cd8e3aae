//! `check`: each finding produced by patching one field of a valid image, with the exact
//! finding and exit code; `--repair` gives the original content back (qemu compares).

use super::util::*;
use std::path::Path;

/// qemu layout for 100M (formats.md §2.6): RGD at 21, RGTs 22/26/30/34, GD at 38, GTs
/// 39/43/47/51, grains from 128. Data in grains 0 (sector 128) and 800 (sector 256).
fn good(d: &Path) -> Vec<u8> {
    qemu_img(d, &["create", "-q", "-f", "vmdk", "good.vmdk", "100M"]);
    qemu_io(
        d,
        "good.vmdk",
        &["write -P 0x61 0 64k", "write -P 0x62 50M 64k"],
    );
    std::fs::read(d.join("good.vmdk")).unwrap()
}

fn patch(d: &Path, img: &[u8], edits: &[(usize, &[u8])]) {
    let mut b = img.to_vec();
    for (at, bytes) in edits {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    std::fs::write(d.join("bad.vmdk"), b).unwrap();
}

fn check(d: &Path, args: &[&str]) -> (i32, String) {
    let out = vmdkit(d, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    (out.status.code().unwrap(), text)
}

const S: usize = 512;

/// Byte patches (offset, bytes), the exit code and a piece of the finding.
type Case = (Vec<(usize, Vec<u8>)>, i32, &'static str);

#[test]
fn each_sparse_finding_and_its_exit_code() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let img = good(d);
    assert_eq!(check(d, &["check", "good.vmdk"]).0, 0);
    let le = |v: u32| v.to_le_bytes();
    let cases: Vec<Case> = vec![
        (
            vec![(38 * S, vec![0; 16])],
            2,
            "grain directory entry 0 is 0, the redundant copy says 22",
        ),
        (
            vec![(21 * S, vec![0; 16])],
            2,
            "grain directory entry 0 is 39, the redundant copy says 0",
        ),
        (
            vec![(38 * S, le(99999).to_vec())],
            2,
            "grain directory entry 0 points at sector 99999, outside the file",
        ),
        // GT0[0] (grain 0) beyond the end, in both copies.
        (
            vec![
                (39 * S, le(999_999).to_vec()),
                (22 * S, le(999_999).to_vec()),
            ],
            2,
            "grain 0 at sector 999999 lies past the end of the file",
        ),
        // Grain 1 claims grain 0's sector, in both copies.
        (
            vec![
                (39 * S + 4, le(128).to_vec()),
                (22 * S + 4, le(128).to_vec()),
            ],
            2,
            "grain 1 at sector 128 is also grain 0",
        ),
        // Grain 1 on top of the grain directory.
        (
            vec![(39 * S + 4, le(38).to_vec()), (22 * S + 4, le(38).to_vec())],
            2,
            "overlaps metadata",
        ),
        // Primary and redundant tables disagree on grain 2.
        (
            vec![(39 * S + 8, le(256).to_vec())],
            2,
            "grain 2: table says sector 256, the redundant table says 0",
        ),
        // The unclean-shutdown flag alone is a warning.
        (vec![(72, vec![1])], 0, "unclean-shutdown flag set"),
    ];
    for (edits, code, want) in cases {
        let e: Vec<(usize, &[u8])> = edits.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        patch(d, &img, &e);
        let (c, text) = check(d, &["check", "bad.vmdk"]);
        assert_eq!(c, code, "{want}: {text}");
        assert!(text.contains(want), "want `{want}` in:\n{text}");
        assert!(
            text.contains("`bad.vmdk` at 0x"),
            "names file and offset: {text}"
        );
    }
}

#[test]
fn repair_of_a_wiped_directory_gives_back_the_content() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let img = good(d);
    for at in [38 * S, 21 * S] {
        patch(d, &img, &[(at, &[0u8; 16])]);
        let (c, text) = check(d, &["check", "--repair", "bad.vmdk"]);
        assert_eq!(c, 0, "{text}");
        assert!(text.contains("(repaired)"), "{text}");
        assert_eq!(check(d, &["check", "bad.vmdk"]).0, 0);
        qemu_img(d, &["check", "bad.vmdk"]);
        assert!(qemu_img(d, &["compare", "bad.vmdk", "good.vmdk"]).contains("identical"));
    }
    // A table entry one copy lost: the allocated copy wins.
    patch(d, &img, &[(22 * S, &[0u8; 4])]);
    assert_eq!(check(d, &["check", "--repair", "bad.vmdk"]).0, 0);
    assert!(qemu_img(d, &["compare", "bad.vmdk", "good.vmdk"]).contains("identical"));
    // Both copies pointing at different grains has no single right answer: left alone.
    patch(d, &img, &[(39 * S, &256u32.to_le_bytes())]);
    let (c, text) = check(d, &["check", "--repair", "bad.vmdk"]);
    assert_eq!(c, 2, "{text}");
    assert!(
        !text.contains("(repaired)") || text.contains("ERROR"),
        "{text}"
    );
}

#[test]
fn leaks_exit_3_and_repair_reclaims_them() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let mut img = good(d);
    let len = img.len();
    img.extend_from_slice(&[0x77u8; 131072]);
    std::fs::write(d.join("bad.vmdk"), &img).unwrap();
    let (c, text) = check(d, &["check", "bad.vmdk"]);
    assert_eq!(c, 3, "{text}");
    assert!(
        text.contains("2 grains (131072 bytes) allocated but referenced by nothing"),
        "{text}"
    );
    // Leaked grains that hold data may be guest data whose entry was lost: plain
    // --repair keeps them and says so (issue 9, item 4); the named flag frees them.
    let (c, text) = check(d, &["check", "--repair", "bad.vmdk"]);
    assert_eq!(c, 3, "{text}");
    assert!(text.contains("hold data and were kept"), "{text}");
    assert_eq!(
        std::fs::metadata(d.join("bad.vmdk")).unwrap().len(),
        img.len() as u64
    );
    let (c, _) = check(
        d,
        &["check", "--repair", "--discard-unreferenced", "bad.vmdk"],
    );
    assert_eq!(c, 0);
    assert_eq!(
        std::fs::metadata(d.join("bad.vmdk")).unwrap().len(),
        len as u64
    );
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit(d, &["check", "--json", "good.vmdk"]).stdout).unwrap();
    assert_eq!(v["exit_code"], 0);
    // A leak inside the file is zeroed, not cut.
    let mut img = std::fs::read(d.join("good.vmdk")).unwrap();
    img.extend_from_slice(&[0x77u8; 65536]);
    let n = img.len();
    img[n - 65536..].fill(0x77);
    // Move grain 800 (sector 256) to the end, leaving its old place leaked.
    let g800 = img[256 * S..256 * S + 65536].to_vec();
    img[n - 65536..].copy_from_slice(&g800);
    let new = ((n - 65536) / S) as u32;
    let gt = 43 * S + 4 * (800 - 512);
    let rgt = 26 * S + 4 * (800 - 512);
    img[gt..gt + 4].copy_from_slice(&new.to_le_bytes());
    img[rgt..rgt + 4].copy_from_slice(&new.to_le_bytes());
    std::fs::write(d.join("bad.vmdk"), &img).unwrap();
    assert_eq!(check(d, &["check", "bad.vmdk"]).0, 3);
    let blocks_before = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d.join("bad.vmdk")).unwrap().blocks()
    };
    assert_eq!(
        check(
            d,
            &["check", "--repair", "--discard-unreferenced", "bad.vmdk"]
        )
        .0,
        0
    );
    assert!(qemu_img(d, &["compare", "bad.vmdk", "good.vmdk"]).contains("identical"));
    // The space is given back (a hole), not just overwritten with zeros.
    let blocks_after = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d.join("bad.vmdk")).unwrap().blocks()
    };
    assert!(
        blocks_after + 128 <= blocks_before,
        "{blocks_before} -> {blocks_after}"
    );
    // A leaked grain of zeros is freed by plain --repair.
    let mut img = std::fs::read(d.join("good.vmdk")).unwrap();
    let len = img.len();
    img.extend_from_slice(&[0u8; 65536]);
    std::fs::write(d.join("bad.vmdk"), &img).unwrap();
    assert_eq!(check(d, &["check", "bad.vmdk"]).0, 3);
    assert_eq!(check(d, &["check", "--repair", "bad.vmdk"]).0, 0);
    assert_eq!(
        std::fs::metadata(d.join("bad.vmdk")).unwrap().len(),
        len as u64
    );
}

#[test]
fn descriptor_chain_stream_and_cowd_findings() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    // Split disk whose descriptor disagrees with the extent header: repair fixes the line.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "ts.vmdk",
            "100M",
        ],
    );
    let text = std::fs::read_to_string(d.join("ts.vmdk")).unwrap();
    std::fs::write(
        d.join("ts.vmdk"),
        text.replace("RW 204800 SPARSE", "RW 204000 SPARSE"),
    )
    .unwrap();
    let (c, out) = check(d, &["check", "ts.vmdk"]);
    assert_eq!(c, 2);
    assert!(
        out.contains("extent 1: descriptor says 204000 sectors, `ts-s001.vmdk` holds 204800"),
        "{out}"
    );
    assert_eq!(check(d, &["check", "--repair", "ts.vmdk"]).0, 0);
    assert!(std::fs::read_to_string(d.join("ts.vmdk"))
        .unwrap()
        .contains("RW 204800 SPARSE"));
    // Missing extent and a broken CID link.
    std::fs::write(
        d.join("m.vmdk"),
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 8 VMFS \"gone-flat.vmdk\"\n",
    )
    .unwrap();
    let (c, out) = check(d, &["check", "m.vmdk"]);
    assert_eq!(c, 2);
    assert!(
        out.contains("extent 1: `gone-flat.vmdk` is missing"),
        "{out}"
    );
    qemu_img(d, &["create", "-q", "-f", "vmdk", "p.vmdk", "10M"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(d, "p.vmdk", &["write 0 512"]);
    let (c, out) = check(d, &["check", "c.vmdk"]);
    assert_eq!(c, 2);
    assert!(out.contains("does not match the CID"), "{out}");
    // A stream grain that does not inflate.
    qemu_img(d, &["create", "-q", "-f", "vmdk", "s.vmdk", "10M"]);
    qemu_io(d, "s.vmdk", &["write -P 0x33 0 64k"]);
    vmdkit_ok(
        d,
        &["export", "s.vmdk", "so.vmdk", "--format", "stream", "-q"],
    );
    assert_eq!(check(d, &["check", "so.vmdk"]).0, 0);
    let mut b = std::fs::read(d.join("so.vmdk")).unwrap();
    b[128 * S + 30..128 * S + 60].fill(0xff);
    std::fs::write(d.join("so.vmdk"), &b).unwrap();
    let (c, out) = check(d, &["check", "so.vmdk"]);
    assert_eq!(c, 2);
    assert!(out.contains("does not inflate"), "{out}");
    // COWD: a grain past the end of the file.
    vmdkit_ok(d, &["create", "f.vmdk", "--size", "4m", "--type", "thin"]);
    vmdkit_ok(d, &["redo", "add", "f.vmdk"]);
    std::fs::write(d.join("x.bin"), vec![1u8; 512]).unwrap();
    vmdkit_ok(d, &["write", "f.vmdk.REDO", "--offset", "0", "x.bin"]);
    assert_eq!(check(d, &["check", "f.vmdk.REDO"]).0, 0);
    let mut b = std::fs::read(d.join("f.vmdk.REDO")).unwrap();
    let gt = u32::from_le_bytes(b[4 * S..4 * S + 4].try_into().unwrap()) as usize;
    b[gt * S..gt * S + 4].copy_from_slice(&9_999_999u32.to_le_bytes());
    std::fs::write(d.join("f.vmdk.REDO"), &b).unwrap();
    let (c, out) = check(d, &["check", "f.vmdk.REDO"]);
    assert_eq!(c, 2);
    assert!(
        out.contains("grain 0 at sector 9999999 lies past the end of the file"),
        "{out}"
    );
    // A file that cannot be read at all: the check could not finish.
    assert_eq!(check(d, &["check", "nothere.vmdk"]).0, 1);
}

#[test]
fn stream_marker_sequence_findings() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "s.vmdk", "100M"]);
    qemu_io(
        d,
        "s.vmdk",
        &["write -P 0x33 0 64k", "write -P 0x34 40M 64k"],
    );
    vmdkit_ok(
        d,
        &["export", "s.vmdk", "so.vmdk", "--format", "stream", "-q"],
    );
    let img = std::fs::read(d.join("so.vmdk")).unwrap();
    assert_eq!(check(d, &["check", "so.vmdk"]).0, 0);
    // Find the first GT marker (type 1) after the grains.
    let gt_marker = (128..img.len() / S)
        .find(|&s| img[s * S + 8..s * S + 16] == [0, 0, 0, 0, 1, 0, 0, 0] && img[s * S] == 4)
        .expect("a GT marker");
    let mut b = img.clone();
    b[gt_marker * S] = 5; // numSectors 5
    std::fs::write(d.join("bad.vmdk"), &b).unwrap();
    let (c, out) = check(d, &["check", "bad.vmdk"]);
    assert_eq!(c, 2, "{out}");
    assert!(
        out.contains("grain-table marker says 5 sectors, a table has 4"),
        "{out}"
    );
    let mut b = img.clone();
    b[gt_marker * S + 12] = 9; // unknown marker type
    std::fs::write(d.join("bad.vmdk"), &b).unwrap();
    let (c, out) = check(d, &["check", "bad.vmdk"]);
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("unknown marker type 9"), "{out}");
    // qemu's empty stream ends at overHead without an end-of-stream marker: a warning,
    // because ESXi refuses it (qemu issue #1357).
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "e.vmdk",
            "10M",
        ],
    );
    let (c, out) = check(d, &["check", "e.vmdk"]);
    assert_eq!(c, 0, "{out}");
    assert!(
        out.contains("ends without an end-of-stream marker"),
        "{out}"
    );
}

#[test]
fn cowd_leaked_tail_exits_3_and_repair_cuts_it() {
    let t = tmp();
    let d = t.path();
    vmdkit_ok(d, &["create", "b.vmdk", "--size", "8m", "--type", "thin"]);
    vmdkit_ok(d, &["redo", "add", "b.vmdk"]);
    std::fs::write(d.join("x.bin"), vec![7u8; 300_000]).unwrap();
    vmdkit_ok(d, &["write", "b.vmdk.REDO", "--offset", "4096", "x.bin"]);
    assert_eq!(check(d, &["check", "b.vmdk.REDO"]).0, 0);
    let len = std::fs::metadata(d.join("b.vmdk.REDO")).unwrap().len();
    let mut b = std::fs::read(d.join("b.vmdk.REDO")).unwrap();
    b.extend_from_slice(&[0u8; 4096]);
    std::fs::write(d.join("b.vmdk.REDO"), &b).unwrap();
    let (c, out) = check(d, &["check", "b.vmdk.REDO"]);
    assert_eq!(c, 3, "{out}");
    assert!(
        out.contains("8 sectors (4096 bytes) allocated but referenced by nothing"),
        "{out}"
    );
    assert_eq!(check(d, &["check", "--repair", "b.vmdk.REDO"]).0, 0);
    assert_eq!(std::fs::metadata(d.join("b.vmdk.REDO")).unwrap().len(), len);
}

/// Issue 22 item 6: what `check` says and what `check --repair` then does agree. A
/// finding check calls unrepairable is still there after the repair; a repair run never
/// advises running a repair; leaks a repair keeps say why. Cases: a wiped primary
/// directory (repairable from the redundant copy: check no longer calls its tables
/// orphaned), a leaked grain holding data (kept), a leak beside damage repair cannot fix
/// (not reclaimed: a damaged table makes live grains look leaked).
#[test]
fn check_and_repair_never_contradict_each_other() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let img = good(d);
    let mut leaky = img.clone();
    leaky.extend(vec![0x55u8; 65536]);
    let mut both = leaky.clone();
    // Grain 0's entry in both table copies points far past the end.
    for at in [39 * S, 22 * S] {
        both[at..at + 4].copy_from_slice(&0x7fff_ff00u32.to_le_bytes());
    }
    let cases: Vec<(&str, Vec<u8>, i32)> = vec![
        (
            "wiped primary directory",
            {
                let mut b = img.clone();
                b[38 * S..38 * S + 16].fill(0);
                b
            },
            0,
        ),
        ("a leaked grain of data", leaky, 3),
        ("a leak beside lost data", both, 2),
    ];
    for (what, bytes, after_repair) in cases {
        std::fs::write(d.join("bad.vmdk"), &bytes).unwrap();
        let (c0, before) = check(d, &["check", "bad.vmdk"]);
        assert_ne!(c0, 0, "{what}: {before}");
        let (c1, repaired) = check(d, &["check", "--repair", "bad.vmdk"]);
        assert_eq!(c1, after_repair, "{what}: {repaired}");
        assert!(
            !repaired.contains("--repair reclaims"),
            "{what}: a repair run advises a repair: {repaired}"
        );
        let (c2, again) = check(d, &["check", "bad.vmdk"]);
        assert_eq!(c2, c1, "{what}: {again}");
        for line in before.lines().filter(|l| l.contains("not repairable")) {
            let head = &line[..line.find(':').unwrap_or(line.len())];
            assert!(
                again.contains(head) && c2 == 2,
                "{what}: check called `{line}` unrepairable, the repair mended it: {again}"
            );
        }
        if after_repair != 0 {
            assert!(
                repaired.contains("were kept") || repaired.contains("not reclaimed"),
                "{what}: a kept leak says why: {repaired}"
            );
        }
        if what.starts_with("wiped") {
            assert!(!before.contains("orphaned"), "{what}: {before}");
            assert!(qemu_img(d, &["compare", "bad.vmdk", "good.vmdk"]).contains("identical"));
        }
    }
}
