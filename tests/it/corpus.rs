//! Every corpus file with a digest in SOURCES.md reads to that digest (computed there with
//! qemu-img and libvmdk, not by us); the rest fail with clear errors.

use super::util::*;
use std::path::{Path, PathBuf};

/// (entry, sha256 of the raw content) from ../shared/corpus/SOURCES.md.
const GOOD: &[(&str, &str)] = &[
    (
        "qemu-iotests/iotest-version3.vmdk.bz2",
        "0859bb3397bc1d30fa979c80a289ce98bfd6c1141a64594d6f3cc8cd68218faf",
    ),
    (
        "qemu-iotests/iotest-version3.2013.vmdk.bz2",
        "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14",
    ),
    (
        "cot/blank.vmdk",
        "9acca8e8c22201155389f65abbf6bc9723edc7384ead80503839f49dcc56d767",
    ),
    (
        "cot/input.vmdk",
        "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14",
    ),
    (
        "cot/ubuntu.2.0-disk1.vmdk",
        "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25",
    ),
    (
        "vmdk-rs/monolithicSparse.vmdk",
        "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727",
    ),
    (
        "vmdk-rs/streamOptimized.vmdk",
        "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727",
    ),
    (
        "vmdk-rs/twoGbMaxExtentSparse.vmdk",
        "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727",
    ),
    (
        "vmdk-rs/monolithicFlat.vmdk",
        "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727",
    ),
    (
        "vmdk-rs/twoGbMaxExtentFlat.vmdk",
        "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727",
    ),
    (
        "vmdk-rs/streamOptimizedWithMarkers.vmdk",
        "92c0f8b4280377437056f57c51ef51a5f8aeb1462ac630ef0633febcbfc3db4e",
    ),
    (
        "vmdk-rs/vmfs_thick.vmdk",
        "8d43c795d24bce01b49f92744f934c1072210dcac170bb1c83a5aa56df46ab7d",
    ),
    (
        "freebsd-mkimg/img-63x255-512-mbr.vmdk.bz2",
        "3d7b31024bc5338105767a94b7c813f116497c9fc2dcb9e5b274f33034a1d848",
    ),
    (
        "freebsd-mkimg/img-1x1-4096-gpt.vmdks.vmdk",
        "0e0fca87da8acec3a7d53dd4f7cfb2a89ffe4164605d120b38f4abfe2626351e",
    ),
    (
        "mdx1-open-vmdk/64KiB.vmdk",
        "de2f256064a0af797747c2b97505dc0b9f3df0de4f489eac731c23ae9ca9cc31",
    ),
    (
        "dfvfs/ext2.vmdk",
        "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80",
    ),
    (
        "plaso/image.vmdk",
        "854c3db1c4a07a241e2ed9fbd8892adf2adc662c7862a75deed26f3483f414c9",
    ),
];

/// (entry, a piece of the expected error).
const BAD: &[(&str, &str)] = &[
    ("qemu-iotests/afl9.vmdk.bz2", "afl9.vmdk"),
    ("govmomi/ttylinux-pc_i486-16.1-disk1.vmdk", "invalid footer"),
    ("libvmdk/descriptor_file.1", "test1.vmdk"),
    (
        "virt-manager/test-vmdk-desc.vmdk",
        "ESX4.0-rhel4u8-32b-flat.vmdk",
    ),
    ("securityronin-vmdk/ms3-win.vmdk", "disk-s001.vmdk"),
    ("go-vmdk-parser/vmdk-invalid.img", "vmdk-invalid.img"),
    (
        "vmdk-rs/vmfs_thick-000001.vmdk",
        "vmfs_thick-000001-delta.vmdk",
    ),
    (
        "govmomi/ttylinux-pc_i486-16.1.ova",
        "ttylinux-pc_i486-16.1.ova",
    ),
];

/// Copy an entry's folder into a temp dir, decompressing `.bz2` files, and return the
/// path of the entry there.
pub fn stage(corpus: &Path, entry: &str, dir: &Path) -> PathBuf {
    let src_dir = corpus.join(Path::new(entry).parent().unwrap());
    for f in std::fs::read_dir(&src_dir).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(stem) = name.strip_suffix(".bz2") {
            let out = std::process::Command::new("bzip2")
                .arg("-dc")
                .arg(&f)
                .output()
                .expect("bzip2");
            assert!(out.status.success());
            std::fs::write(dir.join(stem), out.stdout).unwrap();
        } else {
            std::fs::copy(&f, dir.join(&name)).unwrap();
        }
    }
    dir.join(
        Path::new(entry)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".bz2"),
    )
}

/// sha256 of the whole logical content of `p`.
pub fn digest_of(p: &Path) -> String {
    content_digest(p, vmdkit::SourceMode::Mmap)
}

/// sha256 of the whole logical content, read through the library in 4 MiB pieces.
fn content_digest(p: &Path, mode: vmdkit::SourceMode) -> String {
    use sha2::{Digest, Sha256};
    use vmdkit::VirtualDisk;
    let opts = {
        let mut o = vmdkit::OpenOptions::default();
        o.mode = mode;
        o
    };
    let chain = vmdkit::Chain::open(p, &opts).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let cap = chain.capacity();
    let mut pos = 0;
    while pos < cap {
        let n = (cap - pos).min(buf.len() as u64) as usize;
        chain.read_at(&mut buf[..n], pos).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn corpus_files_read_to_their_published_digests() {
    let Some(c) = corpus() else { return };
    // Two threads: the big all-zero disks cost one sha256 pass each.
    std::thread::scope(|s| {
        for half in [0, 1] {
            let c = &c;
            s.spawn(move || {
                for (i, (entry, digest)) in GOOD.iter().enumerate() {
                    if i % 2 != half {
                        continue;
                    }
                    let t = tmp();
                    let p = stage(c, entry, t.path());
                    let mode = if i % 4 < 2 {
                        vmdkit::SourceMode::Mmap
                    } else {
                        vmdkit::SourceMode::Pread
                    };
                    assert_eq!(&content_digest(&p, mode), digest, "{entry}");
                    // Small ones also through the CLI, to stdout and to a file.
                    if std::fs::metadata(&p).unwrap().len() < (4 << 20) {
                        let info: serde_json::Value = serde_json::from_slice(
                            &vmdkit_ok(t.path(), &["info", "--json", p.to_str().unwrap()]).stdout,
                        )
                        .unwrap();
                        if info["capacity"].as_u64().unwrap() <= 64 << 20 {
                            let raw = vmdkit_ok(t.path(), &["cat", p.to_str().unwrap()]).stdout;
                            assert_eq!(&sha256(&raw), digest, "{entry} via stdout");
                            let out = t.path().join("out.raw");
                            vmdkit_ok(
                                t.path(),
                                &["cat", p.to_str().unwrap(), "-o", out.to_str().unwrap()],
                            );
                            assert_eq!(&sha256_file(&out), digest, "{entry} via -o");
                        }
                    }
                }
            });
        }
    });
}

#[test]
fn corpus_iotest_pattern_is_where_qemu_iotest_059_expects_it() {
    let Some(c) = corpus() else { return };
    let t = tmp();
    let p = stage(&c, "qemu-iotests/iotest-version3.vmdk.bz2", t.path());
    use vmdkit::VirtualDisk;
    let chain = vmdkit::Chain::open(&p, &Default::default()).unwrap();
    let mut b = [0u8; 512];
    for i in 0..100u64 {
        chain.read_at(&mut b, i * 655360 + i * 512).unwrap();
        assert!(b.iter().all(|&x| x == b'0' + (i % 10) as u8), "block {i}");
    }
}

#[test]
fn bad_corpus_files_fail_with_clear_errors() {
    let Some(c) = corpus() else { return };
    for (entry, needle) in BAD {
        let t = tmp();
        let p = stage(&c, entry, t.path());
        let err = vmdkit_err(t.path(), &["info", p.to_str().unwrap()]);
        assert!(err.contains(needle), "{entry}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{entry}: one line: {err}");
    }
}
