//! Test helpers: temp dirs, qemu-img/qemu-io, the vmdkit binary, digests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

/// Whether qemu-img and qemu-io are installed. Tests that need them skip (with a
/// message) when they are missing; CI installs them.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    if !ok {
        assert!(
            !in_ci(),
            "CI=true but qemu-img/qemu-io (the oracle) are missing"
        );
        eprintln!("skipping: qemu-img/qemu-io not installed");
    }
    ok
}

macro_rules! need_qemu {
    () => {
        if !$crate::it::util::have_qemu() {
            return;
        }
    };
}
pub(crate) use need_qemu;

/// Under `CI=true` a missing oracle is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmdkit-test")
        .tempdir()
        .expect("tempdir")
}

/// Run a command in `dir`, panic with its stderr on failure.
pub fn run(dir: &Path, prog: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let prog = prog.as_ref();
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.to_string_lossy()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        prog.to_string_lossy(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(run(dir, "qemu-img", args).stdout).expect("utf8")
}

/// Run qemu-io commands against `file` (format vmdk).
/// Returns qemu-io's output (a failed pattern check or an error fails the test).
pub fn qemu_io(dir: &Path, file: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "vmdk"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let out = run(dir, "qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("error") && !text.contains("failed"),
        "qemu-io: {text}"
    );
    text.into_owned()
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmdkit"))
}

/// Run vmdkit in `dir`; returns the output whatever the status.
pub fn vmdkit(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run vmdkit")
}

/// Run vmdkit and require success.
pub fn vmdkit_ok(dir: &Path, args: &[&str]) -> Output {
    let out = vmdkit(dir, args);
    assert!(
        out.status.success(),
        "vmdkit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run vmdkit and require failure; returns stderr.
pub fn vmdkit_err(dir: &Path, args: &[&str]) -> String {
    let out = vmdkit(dir, args);
    assert!(!out.status.success(), "vmdkit {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash");
    hex(&h.finalize())
}

pub fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// qemu's flattened raw image of `file`, as bytes.
pub fn qemu_raw(dir: &Path, file: &str) -> Vec<u8> {
    let out = dir.join(format!("{file}.qemu.raw"));
    qemu_img(dir, &["convert", "-O", "raw", file, out.to_str().unwrap()]);
    let b = std::fs::read(&out).expect("read raw");
    std::fs::remove_file(&out).ok();
    b
}

/// vmdkit's flattened raw image of `file` via `cat` to stdout.
pub fn vmdkit_raw(dir: &Path, file: &str) -> Vec<u8> {
    vmdkit_ok(dir, &["cat", file]).stdout
}

/// Assert two byte strings are equal, reporting the first difference.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

/// The shared corpus folder, if present: `$VMDKIT_CORPUS` when set (a checkout
/// anywhere), else `../shared/corpus` beside the checkout.
pub fn corpus() -> Option<PathBuf> {
    let p = match std::env::var_os("VMDKIT_CORPUS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"),
    };
    if p.is_dir() {
        Some(p)
    } else {
        assert!(
            !in_ci(),
            "CI=true but the corpus (the oracle) is missing at {} (set VMDKIT_CORPUS)",
            p.display()
        );
        eprintln!("skipping: no corpus at {} (set VMDKIT_CORPUS)", p.display());
        None
    }
}

/// What [`vmdkit_limited`] saw: exit code, outputs, peak resident memory.
pub struct Limited {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub max_rss_kib: u64,
}

/// Run vmdkit in `dir` with `stdin` bytes (or none), and fail the test if it has not
/// ended within `secs` (a hang, not a speed check: the limit is many times the normal
/// time). Returns the peak RSS the kernel counted for the process (VmHWM, sampled
/// every 5 ms while it runs).
// The child is reaped by waitpid, which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn vmdkit_limited(dir: &Path, args: &[&str], stdin: Option<&[u8]>, secs: u64) -> Limited {
    use std::io::{Read, Write};
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmdkit");
    let feeder = stdin.map(|b| {
        let mut i = child.stdin.take().unwrap();
        let b = b.to_vec();
        std::thread::spawn(move || {
            let _ = i.write_all(&b);
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let pid = child.id() as libc::pid_t;
    let start = std::time::Instant::now();
    // Peak RSS: the kernel's high-water mark of the process's own memory (VmHWM), read
    // while it runs. (getrusage's ru_maxrss of a child is useless here: a child spawned
    // with vfork starts from the parent's high-water mark, and the test process is big.)
    let mut hwm = 0u64;
    let status = loop {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = st
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                hwm = hwm.max(kib);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child, non-blocking; writes only our local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break status;
        }
        if start.elapsed().as_secs() > secs {
            let _ = child.kill();
            panic!("vmdkit {args:?} did not end within {secs} s (a hang)");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let rss = hwm;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stderr = String::from_utf8_lossy(&e.join().unwrap()).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "vmdkit {args:?} panicked: {stderr}"
    );
    Limited {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: o.join().unwrap(),
        stderr,
        max_rss_kib: rss,
    }
}

/// `qemu-img create -f vmdk -o subformat=SUB NAME SIZE` in `dir`.
pub fn qemu_create(dir: &Path, subformat: &str, name: &str, size: &str) {
    let sub = format!("subformat={subformat}");
    qemu_img(dir, &["create", "-q", "-f", "vmdk", "-o", &sub, name, size]);
}

/// Bytes that vary with position and seed (no two 64 KiB grains alike).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// `vmdkit write` into `disk` at `off`, and the same bytes into `model`.
pub fn model_write(d: &Path, disk: &str, model: &mut [u8], off: usize, data: &[u8]) {
    std::fs::write(d.join("in.bin"), data).unwrap();
    vmdkit_ok(d, &["write", disk, "--offset", &off.to_string(), "in.bin"]);
    model[off..off + data.len()].copy_from_slice(data);
}

/// `vmdkit write --zero` into `disk`, and zeros into `model`.
pub fn model_zero(d: &Path, disk: &str, model: &mut [u8], off: usize, len: usize) {
    let (o, l) = (off.to_string(), len.to_string());
    vmdkit_ok(d, &["write", disk, "--offset", &o, "--zero", &l]);
    model[off..off + len].fill(0);
}

/// `qemu-img create -f vmdk -b PARENT -F vmdk CHILD`, with zeroed-grain entries when
/// `zeroed_grain` (qemu then writes `write -z` over the parent's data as zeroed grains).
pub fn qemu_child(dir: &Path, parent: &str, child: &str, zeroed_grain: bool) {
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    if zeroed_grain {
        args.extend(["-o", "zeroed_grain=on"]);
    }
    args.extend(["-b", parent, "-F", "vmdk", child]);
    qemu_img(dir, &args);
}

/// `top.vmdk` over `base.vmdk` with a parentCID that does not match the base's CID
/// (flat files: a flat "child" is not something VMware makes, but it exercises the link
/// check without an oracle).
pub fn cid_mismatched_pair(d: &Path) {
    std::fs::write(d.join("f.raw"), vec![7u8; 4096]).unwrap();
    std::fs::write(d.join("g.raw"), vec![9u8; 4096]).unwrap();
    std::fs::write(
        d.join("base.vmdk"),
        "version=1\nCID=aaaaaaaa\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 8 VMFS \"f.raw\"\n",
    )
    .unwrap();
    std::fs::write(d.join("top.vmdk"), "version=1\nCID=bbbbbbbb\nparentCID=cccccccc\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"base.vmdk\"\nRW 8 FLAT \"g.raw\" 0\n").unwrap();
}
