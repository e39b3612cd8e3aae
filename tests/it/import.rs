//! Import/restore, create, extend, geometry, RDMs, listing.

use super::util::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn source(d: &Path) {
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=buslogic",
            "src.vmdk",
            "48M",
        ],
    );
    qemu_io(
        d,
        "src.vmdk",
        &[
            "write -P 0x61 0 3M",
            "write -P 0x62 20M 100k",
            "write -P 0x0 30M 2M",
            "write -P 0x63 47M 1M",
        ],
    );
}

/// `vmdkit export SRC - ARGS | vmdkit import - DST ARGS`.
fn pipe(d: &Path, export: &[&str], import: &[&str]) -> std::process::ExitStatus {
    let mut e = Command::new(bin())
        .args(export)
        .current_dir(d)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let st = Command::new(bin())
        .args(import)
        .current_dir(d)
        .stdin(e.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(e.wait().unwrap().success());
    st
}

#[test]
fn export_piped_into_import_gives_the_same_content_for_every_stream_kind() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    source(d);
    for (fmt, ty) in [
        ("stream", "thin"),
        ("sparse", "monolithicSparse"),
        ("split", "twoGbMaxExtentSparse"),
        ("flat", "zeroedthick"),
        ("twoGbMaxExtentFlat", "eagerzeroedthick"),
        ("vmfs", "thin"),
        ("stream", "raw"),
    ] {
        let dst = format!("r-{fmt}-{ty}.vmdk");
        let st = pipe(
            d,
            &["export", "src.vmdk", "-", "--format", fmt, "-q"],
            &["import", "-", &dst, "--type", ty, "-q"],
        );
        assert!(st.success(), "{fmt} -> {ty}");
        let cmp = if ty == "raw" {
            qemu_img(d, &["compare", "-f", "raw", "-F", "vmdk", &dst, "src.vmdk"])
        } else {
            qemu_img(d, &["check", &dst]);
            qemu_img(d, &["compare", &dst, "src.vmdk"])
        };
        assert!(cmp.contains("identical"), "{fmt} -> {ty}: {cmp}");
        if ty != "raw" {
            let v: serde_json::Value =
                serde_json::from_slice(&vmdkit_ok(d, &["info", "--json", &dst]).stdout).unwrap();
            assert_eq!(
                v["adapter_type"], "buslogic",
                "{fmt} -> {ty}: keeps the adapter"
            );
        }
    }
    // qemu's own stream layout through a pipe.
    qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.vmdk",
            "q.vmdk",
        ],
    );
    let f = std::fs::File::open(d.join("q.vmdk")).unwrap();
    let st = Command::new(bin())
        .args(["import", "-", "fromq.vmdk", "-q"])
        .current_dir(d)
        .stdin(f)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(qemu_img(d, &["compare", "fromq.vmdk", "src.vmdk"]).contains("identical"));
    // A qemu sparse file whose grains are not in LBA order is refused with advice.
    qemu_img(d, &["create", "-q", "-f", "vmdk", "scr.vmdk", "8M"]);
    qemu_io(d, "scr.vmdk", &["write -P 1 4M 64k", "write -P 2 0 64k"]);
    let f = std::fs::File::open(d.join("scr.vmdk")).unwrap();
    let out = Command::new(bin())
        .args(["import", "-", "x.vmdk", "-q"])
        .current_dir(d)
        .stdin(f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass the file instead"));
    assert!(
        !d.join("x.vmdk").exists() && !d.join("x-flat.vmdk").exists(),
        "nothing left behind"
    );
}

#[test]
fn the_real_esxi_stream_imports_through_stdin() {
    let Some(c) = corpus() else { return };
    let t = tmp();
    let d = t.path();
    for (entry, digest) in [
        (
            "qemu-iotests/iotest-version3.vmdk.bz2",
            "0859bb3397bc1d30fa979c80a289ce98bfd6c1141a64594d6f3cc8cd68218faf",
        ),
        (
            "freebsd-mkimg/img-1x1-4096-gpt.vmdks.vmdk",
            "0e0fca87da8acec3a7d53dd4f7cfb2a89ffe4164605d120b38f4abfe2626351e",
        ),
        (
            "cot/ubuntu.2.0-disk1.vmdk",
            "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25",
        ),
    ] {
        let p = super::corpus::stage(&c, entry, d);
        let out = d.join("restored.vmdk");
        let f = std::fs::File::open(&p).unwrap();
        let st = Command::new(bin())
            .args([
                "import",
                "-",
                out.to_str().unwrap(),
                "--type",
                "monolithicSparse",
                "-q",
                "--force",
            ])
            .current_dir(d)
            .stdin(f)
            .status()
            .unwrap();
        assert!(st.success(), "{entry}");
        assert_eq!(super::corpus::digest_of(&out), digest, "{entry}");
    }
}

#[test]
fn thin_has_holes_and_thick_types_are_allocated() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    source(d);
    for (ty, min, max) in [
        ("thin", 0u64, 6u64 << 20),
        ("zeroedthick", 47 << 20, 49 << 20),
        ("eagerzeroedthick", 47 << 20, 49 << 20),
    ] {
        let dst = format!("{ty}.vmdk");
        vmdkit_ok(d, &["import", "src.vmdk", &dst, "--type", ty, "-q"]);
        let used = std::fs::metadata(d.join(format!("{ty}-flat.vmdk")))
            .unwrap()
            .blocks()
            * 512;
        assert!((min..=max).contains(&used), "{ty}: {used} bytes allocated");
        let text = std::fs::read_to_string(d.join(&dst)).unwrap();
        assert_eq!(
            text.contains("ddb.thinProvisioned = \"1\""),
            ty == "thin",
            "{ty}: {text}"
        );
        assert!(qemu_img(d, &["compare", &dst, "src.vmdk"]).contains("identical"));
    }
    let err = vmdkit_err(d, &["import", "src.vmdk", "thin.vmdk"]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn import_onto_a_stand_in_device_zeroes_what_the_source_has_as_zeros() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    source(d);
    // A "device" full of old data, larger than the disk.
    std::fs::write(d.join("dev.img"), vec![0xeeu8; 64 << 20]).unwrap();
    vmdkit_ok(
        d,
        &[
            "import", "src.vmdk", "dev.img", "--type", "raw", "--force", "-q",
        ],
    );
    let dev = std::fs::read(d.join("dev.img")).unwrap();
    let model = qemu_raw(d, "src.vmdk");
    assert_same(&dev[..model.len()], &model, "device content");
    assert!(
        dev[model.len()..].iter().all(|&b| b == 0xee),
        "bytes past the disk untouched"
    );
    // Too small a device is refused before anything is written.
    std::fs::write(d.join("small.img"), vec![0xeeu8; 1 << 20]).unwrap();
    let err = vmdkit_err(
        d,
        &[
            "import",
            "src.vmdk",
            "small.img",
            "--type",
            "raw",
            "--force",
        ],
    );
    assert!(err.contains("less than the disk's"), "{err}");
    assert!(std::fs::read(d.join("small.img"))
        .unwrap()
        .iter()
        .all(|&b| b == 0xee));
    let err = vmdkit_err(
        d,
        &[
            "import",
            "src.vmdk",
            "/dev/vmdkit-no-such-device",
            "--type",
            "raw",
        ],
    );
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn create_and_extend_are_accepted_by_qemu() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    for (ty, name) in [
        ("monolithicSparse", "ms.vmdk"),
        ("twoGbMaxExtentSparse", "ts.vmdk"),
        ("thin", "th.vmdk"),
        ("zeroedthick", "zt.vmdk"),
    ] {
        vmdkit_ok(d, &["create", name, "--size", "100M", "--type", ty]);
        qemu_img(d, &["check", name]);
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img(d, &["info", "--output=json", name])).unwrap();
        assert_eq!(v["virtual-size"], 100 << 20, "{ty}");
        qemu_io(d, name, &["write -P 0x5c 99M 1M", "write -P 0x5d 0 64k"]);
        // Grow past the split size and past what the sparse directory can hold.
        vmdkit_ok(d, &["extend", name, "--size", "5G"]);
        if ty != "thin" && ty != "zeroedthick" {
            qemu_img(d, &["check", name]);
        }
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img(d, &["info", "--output=json", name])).unwrap();
        assert_eq!(v["virtual-size"], 5u64 << 30, "{ty}");
        // Old content unchanged, zeros after, and the new space is writable.
        let text = qemu_io(
            d,
            name,
            &[
                "read -P 0x5c 99M 1M",
                "read -P 0x5d 0 64k",
                "read -P 0 100M 100M",
                "read -P 0 5119M 1M",
                "write -P 0x5e 4G 64k",
                "read -P 0x5e 4G 64k",
            ],
        );
        assert!(
            !text.contains("fail") && !text.contains("error"),
            "{ty}: {text}"
        );
        assert_eq!(text.matches("read ").count(), 5, "{ty}: {text}");
        let err = vmdkit_err(d, &["extend", name, "--size", "1G"]);
        assert!(err.contains("refusing to shrink"), "{err}");
    }
    let text = std::fs::read_to_string(d.join("ts.vmdk")).unwrap();
    assert!(text.contains("RW 4192256 SPARSE \"ts-s001.vmdk\"\nRW 4192256 SPARSE \"ts-s002.vmdk\"\nRW 2101248 SPARSE \"ts-s003.vmdk\""), "{text}");
    // A disk with a delta on top is refused unless --force.
    vmdkit_ok(d, &["redo", "add", "th.vmdk", "--style", "vmfsSparse"]);
    let err = vmdkit_err(d, &["extend", "th.vmdk", "--size", "6G"]);
    assert!(
        err.contains("th-000001.vmdk") && err.contains("--force"),
        "{err}"
    );
}

#[test]
fn geometry_follows_the_adapter() {
    let t = tmp();
    let d = t.path();
    for (adapter, size, want) in [
        ("ide", "5g", "10402/16/63"),
        ("buslogic", "100m", "100/64/32"),
        ("lsilogic", "500g", "65270/255/63"),
        ("ide", "100g", "16383/16/63"),
    ] {
        let name = format!("{adapter}-{size}.vmdk");
        vmdkit_ok(
            d,
            &[
                "create",
                &name,
                "--size",
                size,
                "--type",
                "thin",
                "--adapter",
                adapter,
            ],
        );
        let out = String::from_utf8(vmdkit_ok(d, &["geometry", &name]).stdout).unwrap();
        assert_eq!(
            out.trim(),
            format!("Geometry information C/H/S is {want}"),
            "{adapter} {size}"
        );
    }
    // 500 GiB = 1048576000 sectors: the real ESXi RDM descriptor of formats.md §8.1 says
    // 65270/255/63 for that size.
}

#[test]
fn rdm_create_query_read_redo_and_missing_device() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let lun: Vec<u8> = (0..(8 << 20)).map(|i: usize| (i / 4096) as u8).collect();
    std::fs::write(d.join("lun.img"), &lun).unwrap();
    let map = String::from_utf8(
        vmdkit_ok(d, &["rdm", "create", "vm.vmdk", "--device", "lun.img"]).stdout,
    )
    .unwrap();
    assert!(map.trim().ends_with("vm-rdm.vmdk"));
    let q: serde_json::Value =
        serde_json::from_slice(&vmdkit_ok(d, &["rdm", "query", "vm.vmdk", "--json"]).stdout)
            .unwrap();
    assert_eq!(q["mode"], "virtual");
    assert_eq!(q["capacity"], 8 << 20);
    assert_eq!(q["present"], true);
    assert!(q["device"].as_str().unwrap().ends_with("lun.img"));
    assert_same(&vmdkit_raw(d, "vm.vmdk"), &lun, "read through the mapping");
    // A REDO on a virtual-mode RDM: the device is not written until commit.
    vmdkit_ok(d, &["redo", "add", "vm.vmdk"]);
    std::fs::write(d.join("w.bin"), vec![0x99u8; 8192]).unwrap();
    vmdkit_ok(d, &["write", "vm.vmdk.REDO", "--offset", "4096", "w.bin"]);
    assert_same(
        &std::fs::read(d.join("lun.img")).unwrap(),
        &lun,
        "device untouched before commit",
    );
    vmdkit_ok(d, &["commit", "vm.vmdk.REDO", "-q"]);
    let mut model = lun.clone();
    model[4096..4096 + 8192].fill(0x99);
    assert_same(
        &std::fs::read(d.join("lun.img")).unwrap(),
        &model,
        "device after commit",
    );
    // Exported like any disk.
    vmdkit_ok(
        d,
        &["export", "vm.vmdk", "out.vmdk", "--format", "sparse", "-q"],
    );
    assert_same(&qemu_raw(d, "out.vmdk"), &model, "export reads the device");
    // Physical mode refuses a REDO log.
    vmdkit_ok(
        d,
        &[
            "rdm",
            "create",
            "pt.vmdk",
            "--device",
            "lun.img",
            "--physical",
        ],
    );
    let err = vmdkit_err(d, &["redo", "add", "pt.vmdk"]);
    assert!(
        err.contains("physical-mode") && err.contains("cannot have a REDO"),
        "{err}"
    );
    // A missing device is an error, never an empty disk.
    std::fs::remove_file(d.join("lun.img")).unwrap();
    let err = vmdkit_err(d, &["cat", "vm.vmdk"]);
    assert!(
        err.contains("maps device") && err.contains("missing"),
        "{err}"
    );
    let out = vmdkit(d, &["rdm", "query", "vm.vmdk"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISSING"));
}

#[test]
fn ls_groups_disks_with_extents_and_deltas() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    vmdkit_ok(d, &["create", "a.vmdk", "--size", "10m", "--type", "thin"]);
    vmdkit_ok(d, &["redo", "add", "a.vmdk", "--style", "vmfsSparse"]);
    vmdkit_ok(d, &["redo", "add", "a-000001.vmdk", "--style", "hosted"]);
    vmdkit_ok(
        d,
        &[
            "create",
            "b.vmdk",
            "--size",
            "3g",
            "--type",
            "twoGbMaxExtentSparse",
        ],
    );
    vmdkit_ok(d, &["redo", "add", "b.vmdk", "--style", "redo"]);
    let v: serde_json::Value =
        serde_json::from_slice(&vmdkit_ok(d, &["ls", ".", "--json"]).stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{v:#}");
    assert_eq!(arr[0]["file"], "a.vmdk");
    assert_eq!(arr[0]["extents"][0]["file"], "a-flat.vmdk");
    assert_eq!(arr[0]["deltas"][0]["file"], "a-000001.vmdk");
    assert_eq!(
        arr[0]["deltas"][0]["extents"][0]["file"],
        "a-000001-delta.vmdk"
    );
    assert_eq!(arr[0]["deltas"][0]["deltas"][0]["file"], "a-000002.vmdk");
    assert_eq!(arr[1]["file"], "b.vmdk");
    assert_eq!(arr[1]["extents"].as_array().unwrap().len(), 2);
    assert_eq!(arr[1]["deltas"][0]["file"], "b.vmdk.REDO");
    let text = String::from_utf8(vmdkit_ok(d, &["ls", "-H"]).stdout).unwrap();
    assert!(text.contains("capacity 3.0 GiB"), "{text}");
}

/// ESX 2 names a virtual RDM's REDO log after the mapping file (formats.md §5):
/// `vm-rdm.vmdk.REDO`, whose parent by name is a link to the device. The log must chain
/// onto the RDM descriptor and commit into the device.
#[test]
fn a_redo_named_after_the_mapping_file_chains_onto_the_rdm() {
    let t = tmp();
    let d = t.path();
    let lun: Vec<u8> = (0..(2 << 20)).map(|i: usize| (i / 512) as u8 | 1).collect();
    std::fs::write(d.join("lun.img"), &lun).unwrap();
    vmdkit_ok(d, &["rdm", "create", "vm.vmdk", "--device", "lun.img"]);
    vmdkit_ok(d, &["redo", "add", "vm.vmdk"]);
    std::fs::rename(d.join("vm.vmdk.REDO"), d.join("vm-rdm.vmdk.REDO")).unwrap();
    // As ESX 2 writes it: the COWD header names the mapping file as the parent.
    let mut b = std::fs::read(d.join("vm-rdm.vmdk.REDO")).unwrap();
    b[0x20..0x20 + 64].fill(0);
    b[0x20..0x20 + 11].copy_from_slice(b"vm-rdm.vmdk");
    std::fs::write(d.join("vm-rdm.vmdk.REDO"), b).unwrap();
    vmdkit_ok(
        d,
        &[
            "write",
            "vm-rdm.vmdk.REDO",
            "--offset",
            "1024",
            "--zero",
            "2048",
        ],
    );
    let info = String::from_utf8(vmdkit_ok(d, &["info", "vm-rdm.vmdk.REDO"]).stdout).unwrap();
    assert!(
        info.contains("its descriptor `vm.vmdk` is the parent"),
        "{info}"
    );
    let mut model = lun.clone();
    model[1024..3072].fill(0);
    assert_same(
        &vmdkit_raw(d, "vm-rdm.vmdk.REDO"),
        &model,
        "through the REDO",
    );
    vmdkit_ok(d, &["commit", "vm-rdm.vmdk.REDO", "-q"]);
    assert_same(
        &std::fs::read(d.join("lun.img")).unwrap(),
        &model,
        "device after commit",
    );
}

/// fullDevice descriptors read through their device paths; writing needs
/// --allow-device-write.
#[test]
fn device_descriptors_read_and_refuse_writes_unless_asked() {
    let t = tmp();
    let d = t.path();
    let dev = d.join("disk.img");
    std::fs::write(&dev, vec![0x31u8; 1 << 20]).unwrap();
    std::fs::write(
        d.join("raw.vmdk"),
        format!("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"fullDevice\"\n\n# Extent description\nRW 2048 FLAT \"{}\" 0\n", dev.display()),
    )
    .unwrap();
    assert_eq!(vmdkit_raw(d, "raw.vmdk"), vec![0x31u8; 1 << 20]);
    let err = vmdkit_err(d, &["write", "raw.vmdk", "--offset", "0", "--zero", "512"]);
    assert!(err.contains("--allow-device-write"), "{err}");
    assert_eq!(std::fs::read(&dev).unwrap()[0], 0x31, "device untouched");
    vmdkit_ok(
        d,
        &[
            "write",
            "raw.vmdk",
            "--offset",
            "0",
            "--zero",
            "512",
            "--allow-device-write",
        ],
    );
    let b = std::fs::read(&dev).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0) && b[512] == 0x31);
}
