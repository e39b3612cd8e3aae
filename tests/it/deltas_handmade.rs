//! Hand-built COWD and SESparse deltas (formats.md §6.4 and §7), byte by byte, read by
//! vmdkit and by qemu-img, against the model the bytes describe.

use super::util::*;
use std::path::Path;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn vmfs_base(d: &Path, sectors: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    std::fs::write(d.join("base-flat.vmdk"), &data).unwrap();
    std::fs::write(
        d.join("base.vmdk"),
        format!("# Disk DescriptorFile\nversion=1\nCID=aabbccdd\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW {sectors} VMFS \"base-flat.vmdk\"\n"),
    )
    .unwrap();
    data
}

/// formats.md §6.4: an 8 MiB vmfs base and a vmfsSparse COWD child with grain 1.
#[test]
fn cowd_recipe_reads_like_qemu_and_the_model() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let mut model = vmfs_base(d, 16384);
    let mut b = vec![0u8; 137 * 512];
    b[0..4].copy_from_slice(b"COWD");
    put32(&mut b, 4, 1);
    put32(&mut b, 8, 3);
    put32(&mut b, 12, 16384);
    put32(&mut b, 16, 1);
    put32(&mut b, 20, 4);
    put32(&mut b, 24, 4);
    put32(&mut b, 28, 137);
    for (i, gt) in [5u32, 37, 69, 101].iter().enumerate() {
        put32(&mut b, 0x800 + 4 * i, *gt);
    }
    put32(&mut b, 0xA00, 133);
    put32(&mut b, 0xA04, 134);
    put32(&mut b, 0x4A00, 135);
    put32(&mut b, 0x109FC, 136);
    for (k, (sector, fill)) in [(0usize, 0xA0u8), (1, 0xA1), (4096, 0xA2), (16383, 0xA3)]
        .iter()
        .enumerate()
    {
        b[0x10A00 + k * 512..0x10A00 + (k + 1) * 512].fill(*fill);
        model[sector * 512..(sector + 1) * 512].fill(*fill);
    }
    std::fs::write(d.join("r-delta.vmdk"), &b).unwrap();
    std::fs::write(
        d.join("r.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=aabbccdd\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW 16384 VMFSSPARSE \"r-delta.vmdk\"\n",
    )
    .unwrap();
    assert_same(&vmdkit_raw(d, "r.vmdk"), &model, "vmdkit");
    assert_same(&qemu_raw(d, "r.vmdk"), &model, "qemu");
    let ours = String::from_utf8(vmdkit_ok(d, &["map", "--json", "r.vmdk"]).stdout).unwrap();
    assert!(ours.contains("\"depth\": 0"), "{ours}");
    // The same COWD file as an ESX 2 REDO log: no descriptor, parent by name.
    std::fs::write(d.join("base.vmdk.REDO"), &b).unwrap();
    assert_same(&vmdkit_raw(d, "base.vmdk.REDO"), &model, "bare REDO");
    let info = String::from_utf8(vmdkit_ok(d, &["info", "base.vmdk.REDO"]).stdout).unwrap();
    assert!(info.contains("ESX 2 REDO log"), "{info}");
}

/// formats.md §7: const header at 0, volatile at 1, GD at 8, one GT at 16, grains at 128.
/// A 16 MiB vmfs base (`base.vmdk`) and a hand-made SESparse delta `s.vmdk` over it
/// (4 KiB grains: data, zero and unmapped entries); returns the SESparse file's bytes and
/// the model of the chain's content.
pub(super) fn sesparse_chain(d: &Path) -> (Vec<u8>, Vec<u8>) {
    let sectors = 32768usize; // 16 MiB: one grain table
    let mut model = vmfs_base(d, sectors);
    let mut b = vec![0u8; (128 + 16) * 512];
    put64(&mut b, 0, 0xCAFE_BABE);
    put64(&mut b, 8, 0x0000_0002_0000_0001);
    put64(&mut b, 16, sectors as u64);
    put64(&mut b, 24, 8);
    put64(&mut b, 32, 64);
    for (off, val) in [
        (80, 1u64),
        (88, 1),
        (96, 2),
        (104, 2),
        (112, 4),
        (120, 4),
        (128, 8),
        (136, 8),
        (144, 16),
        (152, 64),
        (160, 80),
        (168, 8),
        (176, 88),
        (184, 8),
        (192, 128),
        (200, 16),
    ] {
        put64(&mut b, off, val);
    }
    put64(&mut b, 512, 0xCAFE_CAFE);
    put64(&mut b, 512 + 8, 1);
    put64(&mut b, 8 * 512, 0x1000_0000_0000_0000); // GD[0] -> GT index 0
    let gt = 16 * 512;
    put64(&mut b, gt, 0x3000_0000_0000_0000); // grain 0 -> data index 0
    put64(&mut b, gt + 8 * 3, 0x3001_0000_0000_0000); // grain 3 -> data index 1
    put64(&mut b, gt + 8 * 5, 0x2000_0000_0000_0000); // grain 5: zero
    put64(&mut b, gt + 8 * 6, 0x1000_0000_0000_0000); // grain 6: unmapped (zeros)
    b[128 * 512..136 * 512].fill(0xC0);
    b[136 * 512..144 * 512].fill(0xC3);
    model[0..4096].fill(0xC0);
    model[3 * 4096..4 * 4096].fill(0xC3);
    model[5 * 4096..7 * 4096].fill(0);
    std::fs::write(d.join("s-sesparse.vmdk"), &b).unwrap();
    std::fs::write(
        d.join("s.vmdk"),
        format!("# Disk DescriptorFile\nversion=1\nCID=00000002\nparentCID=aabbccdd\ncreateType=\"seSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW {sectors} SESPARSE \"s-sesparse.vmdk\"\n"),
    )
    .unwrap();
    (b, model)
}

#[test]
fn sesparse_handmade_reads_like_qemu_and_the_model() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let sectors = 32768usize;
    let (mut b, model) = sesparse_chain(d);
    assert_same(&vmdkit_raw(d, "s.vmdk"), &model, "vmdkit");
    assert_same(&qemu_raw(d, "s.vmdk"), &model, "qemu");
    // Commit out of an SESparse delta into the flat base works (read-only is the delta).
    vmdkit_ok(d, &["commit", "s.vmdk", "-q"]);
    assert_same(
        &std::fs::read(d.join("base-flat.vmdk")).unwrap(),
        &model,
        "after commit",
    );
    // A dirty journal is refused with the reason.
    put64(&mut b, 512 + 24, 1);
    std::fs::write(d.join("s-sesparse.vmdk"), &b).unwrap();
    std::fs::write(
        d.join("s.vmdk"),
        format!("version=1\nCID=00000002\nparentCID=ffffffff\ncreateType=\"seSparse\"\nRW {sectors} SESPARSE \"s-sesparse.vmdk\"\n"),
    )
    .unwrap();
    let err = vmdkit_err(d, &["info", "s.vmdk"]);
    assert!(err.contains("journal must be replayed"), "{err}");
}
