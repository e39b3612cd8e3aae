//! The fuzz target bodies over the corpus, qemu-made images and seeded mutations of
//! them: an error or a read, never a panic or a hang.

use super::util::*;
use vmdkit::fuzzing::{self, Mutator};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if let Some(c) = corpus() {
        for entry in [
            "vmdk-rs/monolithicSparse.vmdk",
            "vmdk-rs/streamOptimized.vmdk",
            "vmdk-rs/streamOptimizedWithMarkers.vmdk",
            "vmdk-rs/twoGbMaxExtentSparse-s001.vmdk",
            "freebsd-mkimg/img-1x1-4096-gpt.vmdks.vmdk",
            "mdx1-open-vmdk/64KiB.vmdk",
            "cot/ubuntu.2.0-disk1.vmdk",
            "plaso/image.vmdk",
            "dfvfs/ext2.vmdk",
            "go-vmdk-parser/vmdk-invalid.img",
            "govmomi/ttylinux-pc_i486-16.1-disk1.vmdk",
        ] {
            v.push((entry.to_string(), std::fs::read(c.join(entry)).unwrap()));
        }
        for entry in [
            "libvmdk/descriptor_file.1",
            "virt-manager/test-vmdk-desc.vmdk",
            "securityronin-vmdk/ms3-win.vmdk",
            "vmdk-rs/vmfs_thick-000001.vmdk",
            "vmdk-rs/monolithicFlat.vmdk",
        ] {
            v.push((entry.to_string(), std::fs::read(c.join(entry)).unwrap()));
        }
    }
    v
}

#[test]
fn fuzz_bodies_survive_seeded_mutations() {
    let seeds = seeds();
    if seeds.is_empty() {
        return;
    }
    let mut m = Mutator::new(0x5eed_0001);
    let start = std::time::Instant::now();
    let mut n = 0;
    for (name, data) in &seeds {
        fuzzing::descriptor(data);
        fuzzing::sparse(data);
        // Small inputs get more mutations; each mutation stacks 1-4 edits.
        let rounds = if data.len() > 2 << 20 { 40 } else { 300 };
        for _ in 0..rounds {
            let mut d = data.clone();
            for _ in 0..1 + m.next_u64() % 4 {
                m.mutate(&mut d);
            }
            let r = std::panic::catch_unwind(|| {
                fuzzing::descriptor(&d);
                fuzzing::sparse(&d);
                fuzzing::stream(&d[d.len().min(512)..]);
                fuzzing::cowd(&d);
                fuzzing::sesparse(&d);
            });
            assert!(r.is_ok(), "{name}: a mutation panicked");
            n += 1;
        }
    }
    eprintln!("{n} mutations in {:?}", start.elapsed());
}

#[test]
fn hostile_descriptor_values_round_trip_or_fail() {
    let mut m = Mutator::new(7);
    let base = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"../x.vmdk\"\nRW 4192256 SPARSE \"a-s001.vmdk\"\nRW 8 FLAT \"/etc/passwd\" 0\nRW 18446744073709551615 ZERO\nrdonly 5 vmfs \"a b\" 0 x y\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"-1\"\n";
    fuzzing::descriptor(base.as_bytes());
    for _ in 0..3000 {
        let mut d = base.as_bytes().to_vec();
        for _ in 0..1 + m.next_u64() % 3 {
            m.mutate(&mut d);
        }
        fuzzing::descriptor(&d);
    }
}

/// COWD and SESparse seeds built by vmdkit itself (a REDO with data) and by hand (an
/// SESparse delta), mutated; and the whole-image target over small images.
#[test]
fn delta_and_image_bodies_survive_seeded_mutations() {
    let t = super::util::tmp();
    let d = t.path();
    std::fs::write(d.join("b-flat.vmdk"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        d.join("b.vmdk"),
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 2048 VMFS \"b-flat.vmdk\"\n",
    )
    .unwrap();
    let redo =
        vmdkit::ops::redo::add(&d.join("b.vmdk"), vmdkit::ops::redo::RedoStyle::Redo).unwrap();
    let data = vec![0x5au8; 70_000];
    vmdkit::ops::redo::write(
        &redo,
        4096,
        vmdkit::ops::redo::WriteData::Reader(&mut &data[..]),
        false,
    )
    .unwrap();
    let cowd = std::fs::read(&redo).unwrap();
    let mut se = vec![0u8; 144 * 512];
    for (off, val) in [
        (0usize, 0xCAFE_BABEu64),
        (8, 0x2_0000_0001),
        (16, 2048),
        (24, 8),
        (32, 64),
        (80, 1),
        (88, 1),
        (128, 8),
        (136, 8),
        (144, 16),
        (152, 64),
        (192, 128),
        (200, 16),
    ] {
        se[off..off + 8].copy_from_slice(&val.to_le_bytes());
    }
    se[512..520].copy_from_slice(&0xCAFE_CAFEu64.to_le_bytes());
    se[8 * 512..8 * 512 + 8].copy_from_slice(&0x1000_0000_0000_0000u64.to_le_bytes());
    se[16 * 512..16 * 512 + 8].copy_from_slice(&0x3000_0000_0000_0000u64.to_le_bytes());
    let desc = b"# Disk DescriptorFile\nversion=1\nCID=2\nparentCID=ffffffff\ncreateType=\"vmfsRawDeviceMap\"\nRW 64 VMFSRDM \"fuzz-extent.vmdk\"\nddb.adapterType = \"lsilogic\"\n".to_vec();
    let mut m = Mutator::new(0xc0d5);
    for (name, seed) in [("cowd", cowd), ("sesparse", se), ("rdm", desc)] {
        fuzzing::cowd(&seed);
        fuzzing::sesparse(&seed);
        fuzzing::image(&seed);
        for i in 0..400 {
            let mut x = seed.clone();
            for _ in 0..1 + m.next_u64() % 4 {
                m.mutate(&mut x);
            }
            let r = std::panic::catch_unwind(|| {
                fuzzing::cowd(&x);
                fuzzing::sesparse(&x);
                fuzzing::descriptor(&x);
                if i % 8 == 0 {
                    fuzzing::image(&x);
                }
            });
            assert!(r.is_ok(), "{name}: mutation {i} panicked");
        }
    }
}

/// Issue 9's hostile inputs and mutations of them, through every body (the pipe reader
/// of `import -` and whole images included): an error or a read, never a panic, a hang
/// or an allocation sized by a header field.
#[test]
fn hostile_seeds_and_their_mutations_end_cleanly() {
    let mut m = Mutator::new(0x9_0009);
    for (name, seed) in fuzzing::hostile_seeds() {
        let all = |d: &[u8]| {
            fuzzing::descriptor(d);
            fuzzing::sparse(d);
            fuzzing::pipe(d);
            fuzzing::image(d);
            fuzzing::units(&d[..d.len().min(40)]);
        };
        all(&seed);
        for i in 0..150 {
            let mut x = seed.clone();
            for _ in 0..1 + m.next_u64() % 4 {
                m.mutate(&mut x);
            }
            let r = std::panic::catch_unwind(|| all(&x));
            assert!(r.is_ok(), "{name}: mutation {i} panicked");
        }
    }
    // The pipe reader over the corpus seeds too.
    for (name, data) in seeds() {
        let r = std::panic::catch_unwind(|| fuzzing::pipe(&data));
        assert!(r.is_ok(), "{name}: pipe reader panicked");
    }
}

/// Recovery state and increments (issue 17): a real commit state file and journal (left
/// by a commit killed in phase `tables`), an apply state file and an increment, mutated;
/// the parsers the commands use on them return an error or a value, never panic.
#[test]
fn recovery_state_and_increment_bodies_survive_seeded_mutations() {
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("x.bin"), vec![0x5au8; 300_000]).unwrap();
    vmdkit_ok(
        d,
        &["create", "b.vmdk", "--size", "4M", "-d", "sparse", "-q"],
    );
    vmdkit_ok(d, &["write", "b.vmdk", "--offset", "0", "x.bin"]);
    vmdkit_ok(d, &["export", "b.vmdk", "full.vmdk", "-q"]);
    vmdkit_ok(d, &["redo", "add", "b.vmdk"]);
    vmdkit_ok(d, &["write", "b-000001.vmdk", "--offset", "1M", "x.bin"]);
    vmdkit_ok(d, &["export", "b-000001.vmdk", "inc.vmdk", "--delta", "-q"]);
    let mut seeds: Vec<(String, Vec<u8>)> = vec![(
        "increment".into(),
        std::fs::read(d.join("inc.vmdk")).unwrap(),
    )];
    for n in 0..200 {
        let r = d.join(format!("run{n}"));
        std::fs::create_dir(&r).unwrap();
        for f in ["b.vmdk", "b-000001.vmdk"] {
            std::fs::copy(d.join(f), r.join(f)).unwrap();
        }
        let out = std::process::Command::new(bin())
            .args(["commit", "b-000001.vmdk", "-q"])
            .current_dir(&r)
            .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        assert!(!out.status.success(), "no abort point left a journal");
        let j = r.join("b-000001.vmdk.vmdkit-commit.journal");
        if j.exists() {
            seeds.push(("journal".into(), std::fs::read(&j).unwrap()));
            seeds.push((
                "commit state".into(),
                std::fs::read(r.join("b-000001.vmdk.vmdkit-commit")).unwrap(),
            ));
            break;
        }
    }
    assert_eq!(seeds.len(), 3, "a journal and a state were found");
    vmdkit_ok(d, &["import", "full.vmdk", "r.vmdk", "-d", "sparse", "-q"]);
    let out = std::process::Command::new(bin())
        .args(["apply", "r.vmdk", "inc.vmdk", "-q"])
        .current_dir(d)
        .env("VMDKIT_TEST_ABORT_AFTER_WRITES", "3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    seeds.push((
        "apply state".into(),
        std::fs::read(d.join("r.vmdk.vmdkit-apply")).unwrap(),
    ));
    let mut m = Mutator::new(0x5eed_0017);
    for (name, data) in &seeds {
        fuzzing::recovery(data);
        fuzzing::increment(data);
        fuzzing::nbd(data);
        for _ in 0..400 {
            let mut x = data.clone();
            for _ in 0..1 + m.next_u64() % 4 {
                m.mutate(&mut x);
            }
            let r = std::panic::catch_unwind(|| {
                fuzzing::recovery(&x);
                fuzzing::increment(&x);
                fuzzing::nbd(&x);
            });
            assert!(r.is_ok(), "{name}: a mutation panicked");
        }
    }
}
