//! Bad input: a valid image with one field patched, or a hostile descriptor; each gets a
//! one-line error naming the file and what is wrong, a non-zero exit, no panic.

use super::util::*;
use std::path::Path;

/// A qemu monolithicSparse 100M image with data in grain 0 (qemu layout: rgd 21,
/// gd 38, GT0 at sector 39, grain 0 at sector 128; formats.md §2.6).
fn sparse(dir: &Path) -> Vec<u8> {
    qemu_img(dir, &["create", "-q", "-f", "vmdk", "good.vmdk", "100M"]);
    qemu_io(dir, "good.vmdk", &["write -P 0x61 0 64k"]);
    std::fs::read(dir.join("good.vmdk")).unwrap()
}

fn patched(dir: &Path, img: &[u8], at: usize, bytes: &[u8]) -> String {
    let mut b = img.to_vec();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dir.join("bad.vmdk"), b).unwrap();
    vmdkit_err(dir, &["cat", "bad.vmdk"])
}

#[test]
fn patched_sparse_headers_give_exact_errors() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let img = sparse(d);
    let cases: &[(usize, &[u8], &str)] = &[
        (
            20,
            &0u64.to_le_bytes(),
            "grain size 0 sectors is outside 1..=2097152 (at byte offset 0x14)",
        ),
        (
            20,
            &u64::MAX.to_le_bytes(),
            "grain size 18446744073709551615 sectors is outside",
        ),
        (
            44,
            &1024u32.to_le_bytes(),
            "1024 entries per grain table is outside 1..=512 (at byte offset 0x2c)",
        ),
        (44, &0u32.to_le_bytes(), "0 entries per grain table"),
        (
            4,
            &4u32.to_le_bytes(),
            "unsupported: sparse header version 4",
        ),
        (
            8,
            &0x0004_0003u32.to_le_bytes(),
            "unsupported: incompatible header flags 0x40000",
        ),
        (
            0,
            b"vmdk",
            "magic is `vmdk` (lowercase): the writer never finished this file",
        ),
        (12, &0u64.to_le_bytes(), "capacity is 0 sectors"),
        (12, &(1u64 << 60).to_le_bytes(), "overflows a byte count"),
        // 2^40 sectors need 2^40/65536*4 = 64 MiB of directory: more than the file has.
        (
            12,
            &(1u64 << 40).to_le_bytes(),
            "grain directory (16777216 entries at sector 38) does not fit in the",
        ),
        (56, &100000u64.to_le_bytes(), "does not fit in the"),
        // GD entry 0 -> far past the end.
        (
            38 * 512,
            &0x0fff_ffffu32.to_le_bytes(),
            "grain table 0 at sector 268435455 lies past the end of the",
        ),
        // GT0 entry 0 -> past the end.
        (
            39 * 512,
            &0x00ff_ffffu32.to_le_bytes(),
            "grain 0 at sector 16777215 lies past the end of the",
        ),
        (
            64,
            &100000u64.to_le_bytes(),
            "shorter than its 100000 sectors of metadata (overHead): truncated",
        ),
    ];
    for (at, bytes, want) in cases {
        let err = patched(d, &img, *at, bytes);
        assert!(err.contains("`bad.vmdk`"), "names the file: {err}");
        assert!(
            err.contains(want),
            "patch at {at}: want `{want}`, got: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn truncated_sparse_file_is_an_error() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let img = sparse(d);
    for cut in [100usize, 512, 20 * 1024, 40 * 512 + 7, 128 * 512 + 1000] {
        std::fs::write(d.join("bad.vmdk"), &img[..cut]).unwrap();
        let err = vmdkit_err(d, &["cat", "bad.vmdk"]);
        assert!(err.contains("bad.vmdk"), "cut {cut}: {err}");
    }
}

#[test]
fn corrupt_compressed_grain_is_an_error() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    sparse(d);
    qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "good.vmdk",
            "so.vmdk",
        ],
    );
    let mut b = std::fs::read(d.join("so.vmdk")).unwrap();
    // qemu's stream: first grain record at sector 128: lba(8) size(4) zlib...
    b[128 * 512 + 20..128 * 512 + 40].fill(0xff);
    std::fs::write(d.join("bad.vmdk"), &b).unwrap();
    let err = vmdkit_err(d, &["cat", "bad.vmdk"]);
    assert!(err.contains("compressed grain does not inflate"), "{err}");
    // Wrong LBA in the record.
    let mut b = std::fs::read(d.join("so.vmdk")).unwrap();
    b[128 * 512] = 5;
    std::fs::write(d.join("bad.vmdk"), &b).unwrap();
    let err = vmdkit_err(d, &["cat", "bad.vmdk"]);
    assert!(
        err.contains("grain record says LBA 5 but the grain table puts it at sector 0"),
        "{err}"
    );
}

fn desc(extents: &str, extra: &str) -> String {
    format!("# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n{extra}\n{extents}\n")
}

#[test]
fn hostile_descriptors_give_exact_errors() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("f.raw"), vec![7u8; 4096]).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (desc("", ""), "the descriptor lists no extents"),
        (desc("RW 0 FLAT \"f.raw\" 0", ""), "extent 1 has a size of 0 sectors"),
        (desc("RW 18446744073709551615 FLAT \"f.raw\" 0", ""), "size 18446744073709551615 sectors overflows"),
        (desc("RW 36028797018963967 FLAT \"f.raw\" 0\nRW 36028797018963967 FLAT \"f.raw\" 0", ""), "overflows"),
        (desc("RW 8 FLAT \"../f.raw\" 0", ""), "has a `..` component; refusing to leave the descriptor's folder"),
        (desc("RW 8 FLAT \"sub/../../etc/passwd\" 0", ""), "`..` component"),
        (desc("RW 8 FLAT \"nothere.raw\" 0", ""), "extent 1: file `nothere.raw` is missing (looked in `.`)"),
        (desc("RW 8 FLAT \"f.raw\" 18446744073709551615", ""), "offset overflows"),
        (desc("RW 8 FLAT \"f.raw\" 0", "parentFileNameHint=\"d.vmdk\""), "parent loop"),
        (desc("RW 8 FLAT \"f.raw\" 0", "parentFileNameHint=\"gone.vmdk\""), "parent `gone.vmdk` not found (looked for `gone.vmdk` in `.`)"),
        (desc("RW 8 FLAT \"f.raw\" 0", "parentFileNameHint=\"../up.vmdk\""), "parent `../up.vmdk` has a `..` component"),
        ("version=1\nCID=1\ncreateType=\"monolithicFlat\"\ncreateType=\"vmfs\"\nRW 8 FLAT \"f.raw\" 0\n".into(), "line 4: `createType` given twice"),
        ("version=1\ncreateType=\"weird\"\nRW 8 FLAT \"f.raw\" 0\n".into(), "unsupported: createType `weird`"),
        ("version=1\nRW 8 FLAT \"f.raw\" 0\n".into(), "no createType"),
        ("\u{0}\u{1}garbage\n".into(), "no createType"),
    ];
    for (text, want) in cases {
        std::fs::write(d.join("d.vmdk"), &text).unwrap();
        let err = vmdkit_err(d, &["info", "d.vmdk"]);
        assert!(err.contains(want), "{text:?}: want `{want}`, got: {err}");
        assert!(err.contains("d.vmdk"), "names the file: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn parent_loops_through_two_files_name_both() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("f.raw"), vec![7u8; 4096]).unwrap();
    std::fs::write(
        d.join("a.vmdk"),
        desc("RW 8 FLAT \"f.raw\" 0", "parentFileNameHint=\"b.vmdk\""),
    )
    .unwrap();
    std::fs::write(
        d.join("b.vmdk"),
        desc("RW 8 FLAT \"f.raw\" 0", "parentFileNameHint=\"a.vmdk\""),
    )
    .unwrap();
    let err = vmdkit_err(d, &["info", "a.vmdk"]);
    assert!(
        err.contains("parent loop") && err.contains("a.vmdk") && err.contains("b.vmdk"),
        "{err}"
    );
}

#[test]
fn cid_mismatch_is_refused_unless_ignored() {
    let t = tmp();
    let d = t.path();
    cid_mismatched_pair(d);
    let err = vmdkit_err(d, &["info", "top.vmdk"]);
    assert!(
        err.contains("parentCID cccccccc does not match the CID aaaaaaaa of parent"),
        "{err}"
    );
    let out = vmdkit_ok(d, &["info", "--ignore-cid", "top.vmdk"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning"),
        "warns"
    );
}

#[test]
fn absolute_esxi_paths_fall_back_to_the_local_folder() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("vm-flat.vmdk"), vec![0x42u8; 8192]).unwrap();
    std::fs::write(d.join("vm.vmdk"), "version=1\nCID=aaaaaaaa\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 16 VMFS \"/vmfs/volumes/datastore1/vm/vm-flat.vmdk\"\n").unwrap();
    let out = vmdkit_ok(d, &["info", "vm.vmdk"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("is an absolute path; using"), "{text}");
    assert_eq!(vmdkit_raw(d, "vm.vmdk"), vec![0x42u8; 8192]);
}
