//! Incremental backups (issue 13): a full export and increments (`export --delta`)
//! through pipes, restored by `import` and `apply` in order. Oracles: qemu-img's reading
//! of the source chain at each point in time (and a model buffer for vmdkit-written
//! deltas, which qemu also reads), qemu-img reading an increment as an overlay of the
//! restored base, `qemu-img check`, and the sizes of what export really writes for
//! `measure`.

use super::util::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const MIB: usize = 1 << 20;

/// Run a bash pipeline in `dir` with `$V` = the vmdkit binary (pipefail on).
fn bash(dir: &Path, script: &str) -> Output {
    Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .current_dir(dir)
        .env("V", bin())
        .stdin(Stdio::null())
        .output()
        .expect("bash")
}

/// A pipeline that must succeed.
fn sh(dir: &Path, script: &str) -> Output {
    let out = bash(dir, script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pipeline that must fail; returns its stderr.
fn sh_err(dir: &Path, script: &str) -> String {
    let out = bash(dir, script);
    assert!(!out.status.success(), "{script} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// The source side of a cycle: a qemu-made monolithicSparse base with a qemu child
/// (zeroed grains on: `write -z` over the parent's data makes zeroed grain entries), and
/// a hosted child over that made by `vmdkit redo add` and written by `vmdkit write`.
/// Returns the three tops' names and the content at each point.
struct Source {
    tops: [String; 3],
    points: [Vec<u8>; 3],
}

fn source(d: &Path) -> Source {
    qemu_create(d, "monolithicSparse", "vm.vmdk", "64M");
    qemu_io(
        d,
        "vm.vmdk",
        &[
            "write -P 0x11 0 8M",
            "write -P 0x22 20M 3M",
            "write -P 0x33 40M 100k",
        ],
    );
    let p0 = qemu_raw(d, "vm.vmdk");
    qemu_child(d, "vm.vmdk", "vm-000001.vmdk", true);
    qemu_io(
        d,
        "vm-000001.vmdk",
        &[
            "write -P 0x44 1M 100k",
            "write -z 21M 1M",
            "write -P 0x55 50M 64k",
            "write -z 40M 32k",
        ],
    );
    let p1 = qemu_raw(d, "vm-000001.vmdk");
    assert!(p1[21 * MIB..22 * MIB].iter().all(|&b| b == 0));
    let top = String::from_utf8(
        vmdkit_ok(d, &["redo", "add", "vm-000001.vmdk", "--style", "hosted"]).stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let top = Path::new(&top)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut p2 = p1.clone();
    model_write(d, &top, &mut p2, 3 * MIB + 4096, &pattern(7, 200_000));
    model_zero(d, &top, &mut p2, 0, 2 * MIB);
    model_write(d, &top, &mut p2, 63 * MIB, &pattern(9, MIB));
    model_zero(d, &top, &mut p2, 22 * MIB + 512, 4096);
    // qemu reads the vmdkit-made child too: the model is checked, not assumed.
    assert_same(&qemu_raw(d, &top), &p2, "qemu reading the third point");
    Source {
        tops: ["vm.vmdk".into(), "vm-000001.vmdk".into(), top],
        points: [p0, p1, p2],
    }
}

/// The source of [`source`] in `dir/src`, with its full backup `full.vmdk` and the
/// first increment `inc1.vmdk` beside it.
fn backed_up(dir: &Path) -> (std::path::PathBuf, Source) {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let s = source(&src);
    let [base, d1, _] = &s.tops;
    vmdkit_ok(&src, &["export", base, "full.vmdk", "-d", "stream", "-q"]);
    vmdkit_ok(&src, &["export", d1, "inc1.vmdk", "--delta", "-q"]);
    (src, s)
}

#[test]
fn a_backup_cycle_through_pipes_restores_every_point_in_time() {
    need_qemu!();
    let t = tmp();
    let src = t.path().join("src");
    let tape = t.path().join("tape");
    let r = t.path().join("restore");
    for p in [&src, &tape, &r] {
        std::fs::create_dir(p).unwrap();
    }
    let s = source(&src);
    let [base, d1, d2] = &s.tops;
    // Nightly backups, each through a pipe onto "tape".
    sh(
        &src,
        &format!(
            "$V export {base} - -q | cat > ../tape/full.vmdk\n\
             $V export {d1} - --delta -q --manifest ../tape/inc1.manifest | cat > ../tape/inc1.vmdk\n\
             $V export {d2} - --delta -q --manifest ../tape/inc2.manifest | cat > ../tape/inc2.vmdk"
        ),
    );
    // Restore the full backup from a pipe; it keeps the content ID increments chain to.
    sh(
        &r,
        "cat ../tape/full.vmdk | $V import - vm.vmdk -d sparse -q",
    );
    assert_same(&qemu_raw(&r, "vm.vmdk"), &s.points[0], "restored full");
    // Out of order: refused, nothing changed.
    let before = sha256_file(&r.join("vm.vmdk"));
    let err = sh_err(&r, "cat ../tape/inc2.vmdk | $V apply vm.vmdk -");
    assert!(err.contains("in order"), "{err}");
    assert_eq!(
        sha256_file(&r.join("vm.vmdk")),
        before,
        "refused apply wrote"
    );
    // In order: each point in time, checked by qemu and by the increment's manifest.
    for (i, inc) in ["inc1", "inc2"].iter().enumerate() {
        sh(
            &r,
            &format!("cat ../tape/{inc}.vmdk | $V apply vm.vmdk - -q"),
        );
        assert_same(
            &qemu_raw(&r, "vm.vmdk"),
            &s.points[i + 1],
            &format!("after {inc}"),
        );
        let m = format!("../tape/{inc}.manifest");
        vmdkit_ok(&r, &["verify", "vm.vmdk", "--manifest", &m]);
        qemu_img(&r, &["check", "vm.vmdk"]);
        vmdkit_ok(&r, &["check", "vm.vmdk"]);
        // Twice: refused, nothing changed.
        let before = sha256_file(&r.join("vm.vmdk"));
        let err = sh_err(&r, &format!("$V apply vm.vmdk ../tape/{inc}.vmdk"));
        assert!(err.contains("applied already"), "{err}");
        assert_eq!(sha256_file(&r.join("vm.vmdk")), before);
    }
    let leftovers: Vec<_> = std::fs::read_dir(&r)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["vm.vmdk".to_string()]);

    // qemu reads an increment as an overlay of the restored base it names (the zeroed
    // grains are zeroed grain entries of a stream with flag bit 2, which qemu honours).
    let q = t.path().join("overlay");
    std::fs::create_dir(&q).unwrap();
    sh(
        &q,
        "$V import ../tape/full.vmdk vm.vmdk -d sparse -q && cp ../tape/inc1.vmdk .",
    );
    assert_same(&qemu_raw(&q, "inc1.vmdk"), &s.points[1], "qemu: overlay");
    assert_same(
        &vmdkit_raw(&q, "inc1.vmdk"),
        &s.points[1],
        "vmdkit: overlay",
    );
    // import refuses an increment on its own.
    let err = sh_err(&q, "$V import - alone.vmdk < ../tape/inc1.vmdk");
    assert!(err.contains("is an increment"), "{err}");
    assert!(!q.join("alone.vmdk").exists());

    // Other targets: a thin vmfs disk and a raw image (no CID: --force).
    let o = t.path().join("others");
    std::fs::create_dir(&o).unwrap();
    sh(
        &o,
        "$V import - thin.vmdk -d thin -q < ../tape/full.vmdk\n\
         $V import - disk.img -d raw -q < ../tape/full.vmdk\n\
         for i in inc1 inc2; do $V apply thin.vmdk - -q < ../tape/$i.vmdk; done",
    );
    let err = sh_err(&o, "$V apply --raw disk.img ../tape/inc1.vmdk");
    assert!(err.contains("--force"), "{err}");
    sh(
        &o,
        "for i in inc1 inc2; do $V apply --raw --force disk.img - -q < ../tape/$i.vmdk; done",
    );
    assert_same(&qemu_raw(&o, "thin.vmdk"), &s.points[2], "thin target");
    assert_same(
        &std::fs::read(o.join("disk.img")).unwrap(),
        &s.points[2],
        "raw target",
    );
}

#[test]
fn increments_of_cowd_redo_and_sesparse_deltas_apply_on_their_restored_base() {
    need_qemu!();
    let t = tmp();
    // vmfsSparse (COWD `-delta`) and, above it, an ESX 2 style REDO log: two increments.
    let d = t.path().join("cowd");
    std::fs::create_dir(&d).unwrap();
    qemu_create(&d, "monolithicFlat", "base.vmdk", "16M");
    qemu_io(
        &d,
        "base.vmdk",
        &["write -P 0x61 0 5M", "write -P 0x62 9M 2M"],
    );
    let mut model = qemu_raw(&d, "base.vmdk");
    vmdkit_ok(
        &d,
        &["export", "base.vmdk", "full.vmdk", "-f", "stream", "-q"],
    );
    let top1 = String::from_utf8(
        vmdkit_ok(&d, &["redo", "add", "base.vmdk", "--style", "vmfsSparse"]).stdout,
    )
    .unwrap();
    let top1 = Path::new(top1.trim())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    model_write(&d, &top1, &mut model, 4 * MIB + 512, &pattern(3, 70_000));
    model_zero(&d, &top1, &mut model, 9 * MIB, 4096);
    let p1 = model.clone();
    assert_same(&qemu_raw(&d, &top1), &p1, "qemu reading the COWD delta");
    vmdkit_ok(&d, &["export", &top1, "inc1.vmdk", "--delta", "-q"]);
    let top2 = String::from_utf8(vmdkit_ok(&d, &["redo", "add", &top1, "--style", "redo"]).stdout)
        .unwrap();
    let top2 = Path::new(top2.trim())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    model_write(&d, &top2, &mut model, 12 * MIB, &pattern(5, 3 * 4096));
    model_zero(&d, &top2, &mut model, 0, 512);
    vmdkit_ok(&d, &["export", &top2, "inc2.vmdk", "--delta", "-q"]);
    assert_same(
        &vmdkit_raw(&d, &top2),
        &model,
        "vmdkit reading the REDO chain",
    );
    let r = d.join("r");
    std::fs::create_dir(&r).unwrap();
    sh(
        &r,
        "$V import ../full.vmdk base.vmdk -d sparse -q && $V apply base.vmdk ../inc1.vmdk -q",
    );
    assert_same(&qemu_raw(&r, "base.vmdk"), &p1, "after the COWD increment");
    sh(&r, "$V apply base.vmdk - -q < ../inc2.vmdk");
    assert_same(
        &qemu_raw(&r, "base.vmdk"),
        &model,
        "after the REDO increment",
    );

    // SESparse (read-only here, 4 KiB grains): its increment widens to 64 KiB grains
    // carrying the parent's bytes around the delta's own.
    let s = t.path().join("sesparse");
    std::fs::create_dir(&s).unwrap();
    let (_, model) = super::deltas_handmade::sesparse_chain(&s);
    assert_same(
        &qemu_raw(&s, "s.vmdk"),
        &model,
        "qemu reading the SESparse chain",
    );
    sh(
        &s,
        "$V export base.vmdk full.vmdk -f stream -q\n\
         $V export s.vmdk inc.vmdk --delta -q\n\
         mkdir r && cd r && $V import ../full.vmdk base.vmdk -d thin -q && $V apply base.vmdk ../inc.vmdk -q",
    );
    assert_same(
        &qemu_raw(&s.join("r"), "base.vmdk"),
        &model,
        "after the SESparse increment",
    );
    // A base disk has no increment.
    let err = vmdkit_err(&s, &["export", "base.vmdk", "x.vmdk", "--delta"]);
    assert!(err.contains("no parent"), "{err}");
}

#[test]
fn apply_killed_at_every_write_is_finished_by_a_rerun() {
    need_qemu!();
    let t = tmp();
    let (src, s) = backed_up(t.path());
    let inc = src.join("inc1.vmdk");
    // Restored disks: monolithicSparse (embedded descriptor) and split (descriptor file
    // replaced by rename at the end).
    for kind in ["sparse", "split"] {
        let r0 = t.path().join(format!("r0-{kind}"));
        std::fs::create_dir(&r0).unwrap();
        vmdkit_ok(
            &r0,
            &[
                "import",
                src.join("full.vmdk").to_str().unwrap(),
                "vm.vmdk",
                "-d",
                kind,
                "-q",
            ],
        );
        let copy = |to: &Path| {
            std::fs::create_dir(to).unwrap();
            for e in std::fs::read_dir(&r0).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        };
        let clean = t.path().join(format!("clean-{kind}"));
        copy(&clean);
        vmdkit_ok(&clean, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
        let sizes = |d: &Path| -> Vec<(String, u64)> {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().unwrap().len(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let clean_sizes = sizes(&clean);
        let mut aborted = 0;
        for n in 0..200 {
            let d = t.path().join(format!("run-{kind}-{n}"));
            copy(&d);
            let out = Command::new(bin())
                .args(["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"])
                .current_dir(&d)
                .env("VMDKIT_TEST_ABORT_AFTER_WRITES", n.to_string())
                .output()
                .unwrap();
            let finished = out.status.success();
            if !finished {
                aborted += 1;
                vmdkit_ok(&d, &["apply", "vm.vmdk", inc.to_str().unwrap(), "-q"]);
            }
            assert_eq!(
                sizes(&d),
                clean_sizes,
                "{kind} run {n}: files and sizes (leaks?)"
            );
            qemu_img(&d, &["check", "vm.vmdk"]);
            vmdkit_ok(&d, &["check", "vm.vmdk"]);
            assert_same(
                &qemu_raw(&d, "vm.vmdk"),
                &s.points[1],
                &format!("{kind} run {n}"),
            );
            std::fs::remove_dir_all(&d).unwrap();
            if finished {
                break;
            }
        }
        assert!(aborted > 5, "{kind}: the fault hook hit {aborted} points");
    }
}

#[test]
fn measure_is_exact_for_files_and_a_true_bound_for_streams() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    let s = source(d);
    let [_, d1, d2] = &s.tops;
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_slice(&vmdkit_ok(d, args).stdout).expect("json")
    };
    let dir_bytes = |p: &Path| -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    for top in [d1.as_str(), d2.as_str()] {
        for f in [
            "sparse",
            "split",
            "flat",
            "vmfs",
            "twoGbMaxExtentFlat",
            "raw",
            "stream",
        ] {
            let m = json(&[
                "measure", top, "-d", f, "--name", "out.vmdk", "--json", "-q",
            ]);
            let out = d.join(format!("out-{f}"));
            std::fs::create_dir(&out).unwrap();
            let dst = out.join("out.vmdk");
            vmdkit_ok(d, &["export", top, dst.to_str().unwrap(), "-f", f, "-q"]);
            let real = dir_bytes(&out);
            let req = m["required"].as_u64().unwrap();
            if f == "stream" {
                assert!(req >= real, "{top} {f}: bound {req} < real {real}");
                assert_eq!(m["exact"], false);
                let e = m["estimate"].as_u64().unwrap();
                assert!(e <= req, "{top}: estimate above the bound");
                let x = json(&[
                    "measure", top, "--exact", "--json", "-q", "--name", "out.vmdk",
                ]);
                assert_eq!(x["required"].as_u64().unwrap(), real, "{top}: exact stream");
            } else {
                assert_eq!(
                    m["file_size"].as_u64().unwrap(),
                    real,
                    "{top} {f}: measured vs written (ls -l)"
                );
                assert_eq!(m["exact"], true);
                // On a file system: the blocks the files hold (holes in thin flat and raw
                // files do not count; a descriptor counts its bytes).
                let used: u64 = std::fs::read_dir(&out)
                    .unwrap()
                    .map(|e| {
                        use std::os::unix::fs::MetadataExt;
                        let m = e.unwrap().metadata().unwrap();
                        if m.len() < 65536 {
                            m.len()
                        } else {
                            m.blocks() * 512
                        }
                    })
                    .sum();
                if matches!(f, "flat" | "vmfs" | "twoGbMaxExtentFlat" | "raw") {
                    // (The file system may hold a few blocks of its own for a
                    // fragmented file's extent tree: allowed, up to 64 KiB.)
                    assert!(
                        req <= used && used - req <= 65536,
                        "{top} {f}: required {req} vs the blocks written {used}"
                    );
                    assert!(
                        req < real,
                        "{top} {f}: a thin file needs less than its size"
                    );
                } else {
                    assert_eq!(req, real, "{top} {f}: measured vs written");
                }
            }
            assert!(m["fully_allocated"].as_u64().unwrap() >= req);
            std::fs::remove_dir_all(&out).unwrap();
        }
        // The increment: bound, estimate and --exact against what export writes.
        let inc = d.join("inc.vmdk");
        vmdkit_ok(d, &["export", top, inc.to_str().unwrap(), "--delta", "-q"]);
        let real = std::fs::metadata(&inc).unwrap().len();
        let m = json(&[
            "measure", top, "--delta", "--json", "-q", "--name", "inc.vmdk",
        ]);
        assert!(m["required"].as_u64().unwrap() >= real);
        assert!(
            m["zeroed_grains"].as_u64().unwrap() > 0,
            "{top}: zeroed grains counted"
        );
        // An increment has no "fully allocated" size (issue 22 item 3).
        assert!(m.get("fully_allocated").is_none(), "{m}");
        let text = String::from_utf8(
            vmdkit_ok(d, &["measure", top, "--delta", "-q", "--name", "inc.vmdk"]).stdout,
        )
        .unwrap();
        assert!(!text.contains("fully allocated"), "{text}");
        let x = json(&[
            "measure", top, "--delta", "--exact", "--json", "-q", "--name", "inc.vmdk",
        ]);
        assert_eq!(
            x["required"].as_u64().unwrap(),
            real,
            "{top}: exact increment"
        );
        std::fs::remove_file(&inc).unwrap();
    }
}

/// Issue 22 item 3: on mixed data (random, text, written zeros and holes, the boot area
/// the least compressible part), the stream estimate is within 5% of what export writes.
#[test]
fn the_stream_estimate_is_within_five_percent_on_mixed_data() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "m.vmdk", "96M");
    // 96 MiB: the first 8 MiB random (a boot area of binaries), then 1 MiB blocks
    // cycling through random, text and written zeros, a quarter left as holes.
    let mut seed = 0x1234_5678_u64;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let text: Vec<u8> = "the quick brown fox jumps over the lazy dog; vmdkit measures streams\n"
        .bytes()
        .cycle()
        .take(1 << 20)
        .collect();
    let mut img = vec![0u8; 96 << 20];
    img[..8 << 20].copy_from_slice(&rnd(8 << 20));
    for (k, chunk) in img[8 << 20..].chunks_mut(1 << 20).enumerate() {
        match k % 8 {
            0..=2 => chunk.copy_from_slice(&rnd(1 << 20)),
            3 | 4 => chunk.copy_from_slice(&text),
            _ => {}
        }
    }
    std::fs::write(d.join("m.raw"), &img).unwrap();
    vmdkit_ok(
        d,
        &[
            "import",
            "--from",
            "raw",
            "m.raw",
            "mixed.vmdk",
            "-d",
            "sparse",
            "-q",
        ],
    );
    // Written zeros in part of the holes (they read as zeros either way).
    qemu_io(d, "mixed.vmdk", &["write -z 15M 1M"]);
    let m: serde_json::Value = serde_json::from_slice(
        &vmdkit_ok(
            d,
            &[
                "measure",
                "mixed.vmdk",
                "--json",
                "-q",
                "--name",
                "out.vmdk",
            ],
        )
        .stdout,
    )
    .unwrap();
    vmdkit_ok(
        d,
        &["export", "mixed.vmdk", "out.vmdk", "-d", "stream", "-q"],
    );
    let real = std::fs::metadata(d.join("out.vmdk")).unwrap().len() as f64;
    let est = m["estimate"].as_u64().unwrap() as f64;
    assert!(
        (est - real).abs() / real <= 0.05,
        "estimate {est} vs {real} written: {:.1}%",
        100.0 * (est - real) / real
    );
    assert!(
        m["required"].as_u64().unwrap() as f64 >= real,
        "the bound holds"
    );
}

/// An apply killed in its copy phase, then a write into the target: the rerun refuses
/// rather than cut the target back over the new data.
#[test]
fn an_interrupted_apply_is_not_resumed_over_a_disk_written_since() {
    need_qemu!();
    let t = tmp();
    backed_up(t.path());
    let r = t.path().join("r");
    std::fs::create_dir(&r).unwrap();
    vmdkit_ok(
        &r,
        &[
            "import",
            "../src/full.vmdk",
            "vm.vmdk",
            "-d",
            "sparse",
            "-q",
        ],
    );
    let out = Command::new(bin())
        .args(["apply", "vm.vmdk", "../src/inc1.vmdk", "-q"])
        .current_dir(&r)
        .env("VMDKIT_TEST_ABORT_AFTER_WRITES", "3")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the hook aborts it");
    assert!(r.join("vm.vmdk.vmdkit-apply").exists());
    // Issue 17 item 6: the half-applied disk is refused by every command that would
    // write it, naming the apply to rerun; info and check say so.
    std::fs::write(r.join("p.bin"), vec![0x99u8; 65536]).unwrap();
    let before = sha256_file(&r.join("vm.vmdk"));
    // Issue 18 (a), (d): commands that only read it read it as one point (here the
    // restore before the apply, per qemu-img reading the full backup), and say that an
    // apply is pending and what finishes it.
    for args in [
        &["export", "vm.vmdk", "out.vmdk", "-q"][..],
        &["cat", "vm.vmdk", "-o", "out.raw"],
    ] {
        let out = vmdkit(&r, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("interrupted `vmdkit apply`")
                && err.contains("reads as it is before")
                && err.contains("vmdkit apply vm.vmdk"),
            "{args:?}: {err}"
        );
    }
    for out in ["out.vmdk", "out.raw"] {
        assert_same(
            &qemu_raw(&r, out),
            &qemu_raw(&r, "../src/full.vmdk"),
            &format!("{out}: the half-applied disk read as before the apply"),
        );
        std::fs::remove_file(r.join(out)).unwrap();
    }
    for args in [
        &["write", "vm.vmdk", "--offset", "60M", "p.bin"][..],
        &["redo", "add", "vm.vmdk"],
        &["extend", "vm.vmdk", "--size", "+1M"],
        &["check", "--repair", "vm.vmdk"],
    ] {
        let err = vmdkit_err(&r, args);
        assert!(
            err.contains("interrupted `vmdkit apply`") && err.contains("vmdkit apply vm.vmdk"),
            "{args:?}: {err}"
        );
    }
    let out = vmdkit(&r, &["check", "vm.vmdk"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check of a half-applied disk: {text}"
    );
    assert!(
        text.contains("interrupted `vmdkit apply`") && !text.contains("harmless"),
        "{text}"
    );
    let info = vmdkit(&r, &["info", "vm.vmdk"]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("interrupted `vmdkit apply`")
            || String::from_utf8_lossy(&info.stderr).contains("interrupted `vmdkit apply`")
    );
    assert_eq!(
        sha256_file(&r.join("vm.vmdk")),
        before,
        "refused commands change nothing"
    );
    assert!(!r.join("out.vmdk").exists() && !r.join("vm-000001.vmdk").exists());
    // Another tool writes into it meanwhile (qemu ignores the mark).
    qemu_io(&r, "vm.vmdk", &["write -P 0x99 60M 64k"]);
    let before = sha256_file(&r.join("vm.vmdk"));
    let err = vmdkit_err(&r, &["apply", "vm.vmdk", "../src/inc1.vmdk"]);
    assert!(err.contains("changed after an apply"), "{err}");
    assert_eq!(sha256_file(&r.join("vm.vmdk")), before);
    qemu_io(&r, "vm.vmdk", &["read -P 0x99 60M 64k"]);
}

/// A base VMware never wrote keeps CID `fffffffe`; its snapshot's increment still
/// applies to the restore of its full backup (the restore keeps that CID too).
#[test]
fn an_increment_over_a_never_written_base_applies() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicFlat", "b.vmdk", "8M");
    let desc = std::fs::read_to_string(d.join("b.vmdk")).unwrap();
    let cid_line = desc.lines().find(|l| l.starts_with("CID=")).unwrap();
    std::fs::write(d.join("b.vmdk"), desc.replace(cid_line, "CID=fffffffe")).unwrap();
    qemu_child(d, "b.vmdk", "c.vmdk", false);
    qemu_io(d, "c.vmdk", &["write -P 0x7e 1M 64k"]);
    let want = qemu_raw(d, "c.vmdk");
    sh(
        d,
        "$V export b.vmdk full.vmdk -d stream -q && $V export c.vmdk inc.vmdk --delta -q\n\
         mkdir r && cd r && $V import ../full.vmdk b.vmdk -d sparse -q && $V apply b.vmdk ../inc.vmdk -q",
    );
    assert_same(
        &qemu_raw(&d.join("r"), "b.vmdk"),
        &want,
        "after the increment",
    );
}

/// A signal while apply holds its locks: it exits 128+N, the target and the folder are
/// as they were (no state, no temporaries), a second writer meanwhile is refused, and the
/// apply then runs clean.
#[test]
fn a_signalled_apply_changes_nothing_and_leaves_nothing() {
    need_qemu!();
    let t = tmp();
    let (src, s) = backed_up(t.path());
    let r = t.path().join("r");
    std::fs::create_dir(&r).unwrap();
    vmdkit_ok(
        &r,
        &["import", "../src/full.vmdk", "vm.vmdk", "-d", "split", "-q"],
    );
    let listing = |d: &Path| -> Vec<(String, String)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    sha256_file(&e.path()),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&r);
    let child = Command::new(bin())
        .args([
            "apply",
            "vm.vmdk",
            src.join("inc1.vmdk").to_str().unwrap(),
            "-q",
        ])
        .current_dir(&r)
        .env("VMDKIT_TEST_HOLD_LOCK_MS", "3000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let err = vmdkit_err(&r, &["write", "vm.vmdk", "--offset", "0", "--zero", "4k"]);
    assert!(err.contains("in use"), "{err}");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(
        listing(&r),
        before,
        "the signalled apply changed the folder"
    );
    vmdkit_ok(&r, &["apply", "vm.vmdk", "../src/inc1.vmdk", "-q"]);
    assert_same(&qemu_raw(&r, "vm.vmdk"), &s.points[1], "after the apply");
}
