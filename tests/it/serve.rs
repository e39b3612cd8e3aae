//! Issue 20: `vmdkit serve`, checked with libnbd's clients and qemu (independent NBD
//! implementations): `nbdinfo` (size, flags, `--map` against qemu-nbd's map of the same
//! file), `nbdcopy` (content against `qemu-img convert`), `qemu-img compare` over NBD; and
//! hostile clients speaking raw bytes on the socket.

use super::util::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Whether libnbd's clients are installed (CI installs them; a missing oracle fails
/// there).
fn have_nbd_tools() -> bool {
    let ok = Command::new("nbdcopy").arg("--version").output().is_ok()
        && Command::new("nbdinfo").arg("--version").output().is_ok();
    if !ok {
        assert!(
            !in_ci(),
            "CI=true but nbdinfo/nbdcopy (libnbd-bin) are missing"
        );
        eprintln!("skipping: nbdinfo/nbdcopy not installed");
    }
    ok
}

/// A running `vmdkit serve`, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    uri: String,
    socket: PathBuf,
}

impl Server {
    fn start(dir: &Path, disk: &str, extra: &[&str]) -> Server {
        let socket = dir.join(format!("{disk}.sock"));
        let mut child = Command::new(bin())
            .args(["serve", disk, "--socket"])
            .arg(&socket)
            .args(extra)
            .arg("--json")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{disk}.serve.err"))).unwrap())
            .spawn()
            .unwrap();
        // The one JSON line comes once it listens.
        let mut line = Vec::new();
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 {
            line.push(b[0]);
            if line.ends_with(b"\n") {
                break;
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "serve's ready line: {e}: {}",
                String::from_utf8_lossy(&line)
            )
        });
        Server {
            child,
            uri: v["uri"].as_str().unwrap().to_string(),
            socket,
        }
    }

    /// Stop it as Ctrl-C would (SIGTERM); its exit code.
    fn stop(&mut self) -> Option<i32> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn run_ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run(dir, prog, args).stdout).into_owned()
}

/// A 64 MiB chain (a qemu base, a child with data over a hole and zeros over data) and a
/// streamOptimized backup of it.
fn chain(d: &Path) {
    qemu_create(d, "monolithicSparse", "p.vmdk", "64M");
    qemu_io(
        d,
        "p.vmdk",
        &["write -P 0x31 1M 128k", "write -P 0x32 40M 64k"],
    );
    qemu_child(d, "p.vmdk", "c.vmdk", true);
    qemu_io(d, "c.vmdk", &["write -P 0x41 2M 64k", "write -z 40M 64k"]);
    vmdkit_ok(d, &["export", "c.vmdk", "b.vmdk", "-d", "stream", "-q"]);
}

/// A folder holding [`chain`], when qemu and the NBD tools are here (else the test
/// skips; under `CI=true` a missing qemu fails).
fn served_chain() -> Option<tempfile::TempDir> {
    if !have_qemu() || !have_nbd_tools() {
        return None;
    }
    let t = tmp();
    chain(t.path());
    Some(t)
}

#[test]
fn serve_reads_as_qemu_and_libnbd_read_the_disk() {
    let Some(t) = served_chain() else {
        return;
    };
    let d = t.path();
    let want = qemu_raw(d, "c.vmdk");
    for disk in ["c.vmdk", "b.vmdk"] {
        let mut s = Server::start(d, disk, &[]);
        let info = run_ok(d, "nbdinfo", &["--json", &s.uri]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 64 << 20, "{disk}: {info}");
        assert_eq!(e["is_read_only"], true);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(v["protocol"], "newstyle-fixed", "{info}");
        // Content: nbdcopy (4 connections at once) and qemu-img over NBD.
        let out = d.join(format!("{disk}.raw"));
        run_ok(d, "nbdcopy", &[&s.uri, out.to_str().unwrap()]);
        assert_same(&std::fs::read(&out).unwrap(), &want, disk);
        let cmp = run_ok(d, "qemu-img", &["compare", &s.uri, "c.vmdk"]);
        assert!(cmp.contains("identical"), "{disk}: {cmp}");
        // The allocation map, as qemu-nbd serves the same file.
        let ours = run_ok(d, "nbdinfo", &["--map", &s.uri]);
        let qsock = d.join(format!("{disk}.q.sock"));
        let mut q = Command::new("qemu-nbd")
            .args(["-t", "-r", "-f", "vmdk", "-k"])
            .arg(&qsock)
            .arg(disk)
            .current_dir(d)
            .spawn()
            .unwrap();
        let quri = format!("nbd+unix:///?socket={}", qsock.display());
        let mut theirs = String::new();
        for _ in 0..100 {
            let o = Command::new("nbdinfo")
                .args(["--map", &quri])
                .output()
                .unwrap();
            if o.status.success() {
                theirs = String::from_utf8_lossy(&o.stdout).into_owned();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        q.kill().unwrap();
        q.wait().unwrap();
        if disk == "c.vmdk" {
            assert_eq!(ours, theirs, "the allocation map of {disk}");
        } else {
            // A stream stores the zeroed 64 KiB as nothing at all: qemu and vmdkit both
            // call it a hole; they agree on where the data is.
            let data = |m: &str| -> Vec<String> {
                m.lines()
                    .filter(|l| l.ends_with("data"))
                    .map(str::to_string)
                    .collect()
            };
            assert_eq!(data(&ours), data(&theirs), "the data ranges of {disk}");
        }
        // While it serves, the files are share-locked: a write is refused.
        std::fs::write(d.join("x.bin"), [0x77u8; 512]).unwrap();
        let err = vmdkit_err(d, &["write", disk, "--offset", "0", "x.bin"]);
        assert!(
            err.contains("in use") || err.contains("locked") || err.contains("busy"),
            "{err}"
        );
        // Stopped by a signal: 128+15, the socket gone, the files as they were.
        let before = sha256_file(&d.join(disk));
        assert_eq!(s.stop(), Some(143));
        assert!(!s.socket.exists(), "the socket is removed");
        assert_eq!(sha256_file(&d.join(disk)), before);
    }
}

/// The server's side of the handshake, read off a raw connection; then the client's
/// flags (fixed newstyle, no zeroes).
fn hello(c: &mut UnixStream) {
    let mut h = [0u8; 18];
    c.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], b"NBDMAGIC");
    assert_eq!(&h[8..16], b"IHAVEOPT");
    c.write_all(&3u32.to_be_bytes()).unwrap();
}

fn option(c: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).unwrap();
}

/// One option reply: its type and data.
fn option_reply(c: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        0x3e889045565a9
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    c.read_exact(&mut d).unwrap();
    (u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
}

fn request(c: &mut UnixStream, cmd: u16, cookie: u64, offset: u64, len: u32) {
    let mut b = 0x25609513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    c.write_all(&b).unwrap();
}

/// A simple reply's error and cookie.
fn simple_reply(c: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x67446698);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// Whether the server closed `c` (a read gets end-of-file or a reset).
fn closed(c: &mut UnixStream) -> bool {
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a last reply
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Hostile clients are answered with NBD errors or closed, and never stop the server
/// serving the others: garbage instead of the handshake, an option announcing 2 GiB of
/// data, an unknown option, reads past the end and of 2 GiB, writes and trims into the
/// read-only export, an unknown command, a request with a bad magic, and more
/// connections than allowed.
#[test]
fn hostile_clients_get_errors_and_the_server_keeps_serving() {
    let Some(t) = served_chain() else {
        return;
    };
    let d = t.path();
    let s = Server::start(d, "c.vmdk", &["--max-connections", "4", "--name", "vm"]);
    let connect = || UnixStream::connect(&s.socket).unwrap();

    // Garbage client flags.
    let mut c = connect();
    let mut h = [0u8; 18];
    c.read_exact(&mut h).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut c), "garbage flags close the connection");

    // An option announcing 2 GiB of data: refused as too big, then closed.
    let mut c = connect();
    hello(&mut c);
    option(&mut c, 7, &[]);
    let (kind, _) = option_reply(&mut c);
    assert_eq!(
        kind,
        (1 << 31) + 3,
        "GO with no data is invalid, the session goes on"
    );
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 31).to_be_bytes());
    c.write_all(&b).unwrap();
    let (kind, _) = option_reply(&mut c);
    assert_eq!(kind, (1 << 31) + 9, "ERR_TOO_BIG");
    assert!(closed(&mut c));

    // Unknown option, unknown export, then EXPORT_NAME and requests.
    let mut c = connect();
    hello(&mut c);
    option(&mut c, 1234, b"xyz");
    assert_eq!(option_reply(&mut c).0, (1 << 31) + 1, "ERR_UNSUP");
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"other");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut c, 6, &go);
    assert_eq!(option_reply(&mut c).0, (1 << 31) + 6, "ERR_UNKNOWN");
    option(&mut c, 3, &[]);
    let (kind, data) = option_reply(&mut c);
    assert_eq!((kind, &data[4..]), (2, &b"vm"[..]), "LIST names the export");
    assert_eq!(option_reply(&mut c).0, 1);
    option(&mut c, 1, b"vm");
    let mut e = [0u8; 10];
    c.read_exact(&mut e).unwrap();
    assert_eq!(u64::from_be_bytes(e[0..8].try_into().unwrap()), 64 << 20);
    let cap = 64u64 << 20;
    for (cmd, off, len, want) in [
        (0u16, cap - 512, 1024u32, 22u32), // read past the end
        (0, 0, 1 << 31, 22),               // 2 GiB past the end of a 64 MiB disk
        (0, 0, 0, 22),                     // empty
        (4, 0, 4096, 1),                   // trim: read-only
        (6, 0, 4096, 1),                   // write zeroes: read-only
        (7, 0, 4096, 22),                  // block status without a context
        (99, 0, 0, 22),                    // unknown command
    ] {
        request(&mut c, cmd, 7, off, len);
        assert_eq!(
            simple_reply(&mut c),
            (want, 7),
            "command {cmd} at {off} for {len}"
        );
    }
    // A write: its payload is read and dropped, EPERM.
    request(&mut c, 1, 8, 0, 4096);
    c.write_all(&[0x55; 4096]).unwrap();
    assert_eq!(simple_reply(&mut c), (1, 8));
    // A good read still works on the same connection.
    request(&mut c, 0, 9, 2 << 20, 65536);
    assert_eq!(simple_reply(&mut c), (0, 9));
    let mut data = vec![0u8; 65536];
    c.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x41));
    // A request with a bad magic closes the connection.
    c.write_all(&[0u8; 28]).unwrap();
    assert!(closed(&mut c));

    // Past the connection limit: the fifth is closed on arrival, the four still work.
    // (The connections above may still be winding down on the server: retry until it
    // has let them go.)
    let held = (0..50)
        .find_map(|_| {
            let mut held: Vec<UnixStream> = (0..4).map(|_| connect()).collect();
            let ok = held.iter_mut().all(|h| {
                let mut b = [0u8; 18];
                h.read_exact(&mut b).is_ok() && h.write_all(&3u32.to_be_bytes()).is_ok()
            });
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            ok.then_some(held)
        })
        .expect("four connections are served");
    let mut fifth = connect();
    assert!(closed(&mut fifth), "a fifth connection is refused");
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // And the server serves a well-behaved client after all of that.
    let out = d.join("after.raw");
    run_ok(d, "nbdcopy", &[&s.uri, out.to_str().unwrap()]);
    assert_same(
        &std::fs::read(&out).unwrap(),
        &qemu_raw(d, "c.vmdk"),
        "after the hostile clients",
    );
}

/// `--overlay`: the export is writable; writes (whole grains, partial ones over the
/// parent's data, zeros) go into a new hosted child, reads on the same and on new
/// connections see them at once, the map shows them; stopped by a signal, the overlay is
/// a valid delta holding exactly those writes (qemu-img compare against the same writes
/// made by qemu-io into a raw copy), `check` clean, the chain below unchanged byte for
/// byte. An overlay that exists, or outside the disk's folder, is refused.
#[test]
fn serve_overlay_takes_writes_into_a_new_delta() {
    let Some(t) = served_chain() else {
        return;
    };
    let d = t.path();
    let below: Vec<(String, String)> = ["p.vmdk", "c.vmdk"]
        .iter()
        .map(|f| (f.to_string(), sha256_file(&d.join(f))))
        .collect();
    let writes = [
        "write -P 0x77 3M 64k",
        "write -P 0x78 1000k 100k", // partial grains over the parent's data at 1M
        "write -z 40M 32k",
        "write -z 1M 128k", // whole grains, one this session already wrote: no leak
        "write -z 48M 128k", // whole grains nothing stores: zeroed-grain entries
        "write -P 0x79 63M 1M",
    ];
    let mut s = Server::start(d, "c.vmdk", &["--overlay", "ov.vmdk"]);
    let info = run_ok(d, "nbdinfo", &["--json", &s.uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], false, "{info}");
    assert_eq!(v["exports"][0]["can_flush"], true, "{info}");
    let mut cmds: Vec<&str> = writes.to_vec();
    cmds.extend(["read -P 0x77 3M 64k", "read -P 0x79 63M 1M"]);
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&s.uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    // The same writes into a raw copy of the chain: what the overlay must read as.
    std::fs::write(d.join("want.raw"), qemu_raw(d, "c.vmdk")).unwrap();
    let mut args = vec!["-f", "raw"];
    for c in &writes {
        args.extend(["-c", c]);
    }
    args.push("want.raw");
    run_ok(d, "qemu-io", &args);
    // A new connection reads them (nbdcopy), and the map shows the new data.
    let got = d.join("got.raw");
    run_ok(d, "nbdcopy", &[&s.uri, got.to_str().unwrap()]);
    assert_same(
        &std::fs::read(&got).unwrap(),
        &std::fs::read(d.join("want.raw")).unwrap(),
        "read back over NBD",
    );
    let map = run_ok(d, "nbdinfo", &["--map", &s.uri]);
    assert!(
        map.lines()
            .any(|l| l.trim_start().starts_with("3145728") && l.ends_with("data")),
        "{map}"
    );
    assert_eq!(s.stop(), Some(143));
    assert!(qemu_img(d, &["compare", "ov.vmdk", "want.raw"]).contains("identical"));
    // The zeros over whole grains are zeroed-grain entries, not stored grains.
    let m = vmdkit_ok(d, &["map", "ov.vmdk", "--json"]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&m.stdout).unwrap();
    let at_48m = map
        .iter()
        .find(|e| e["start"].as_u64() == Some(48 << 20))
        .expect("a run at 48 MiB");
    assert_eq!(
        (
            at_48m["zero"].clone(),
            at_48m["data"].clone(),
            at_48m["depth"].clone()
        ),
        (true.into(), false.into(), 0.into()),
        "{at_48m}"
    );
    qemu_img(d, &["check", "ov.vmdk"]);
    vmdkit_ok(d, &["check", "ov.vmdk"]);
    for (f, h) in &below {
        assert_eq!(&sha256_file(&d.join(f)), h, "{f} was written");
    }
    // The overlay exists now: a second server refuses to make it again.
    let err = vmdkit_err(
        d,
        &[
            "serve",
            "c.vmdk",
            "--socket",
            "x.sock",
            "--overlay",
            "ov.vmdk",
        ],
    );
    assert!(err.contains("exists"), "{err}");
    std::fs::create_dir(d.join("sub")).unwrap();
    let err = vmdkit_err(
        d,
        &[
            "serve",
            "c.vmdk",
            "--socket",
            "x.sock",
            "--overlay",
            "sub/ov.vmdk",
        ],
    );
    assert!(err.contains("folder"), "{err}");
    assert!(!d.join("x.sock").exists());
}

/// README's file-level restore, end to end where the machine allows it (FUSE, libnbd's
/// nbdfuse, e2fsprogs): a guest file system with a file in it, backed up as a stream,
/// served, attached as a file with nbdfuse, and the file read out of it with debugfs
/// (no loop mount needed), byte for byte.
#[test]
fn one_file_out_of_a_served_backup() {
    need_qemu!();
    if !have_nbd_tools() {
        return;
    }
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !Path::new("/dev/fuse").exists()
        || !have("nbdfuse")
        || !have("mkfs.ext4")
        || !have("debugfs")
    {
        assert!(
            !in_ci() || !Path::new("/dev/fuse").exists(),
            "CI=true: nbdfuse or e2fsprogs missing"
        );
        eprintln!("skipping: no FUSE, nbdfuse or e2fsprogs here");
        return;
    }
    let t = tmp();
    let d = t.path();
    let content = d.join("content");
    std::fs::create_dir_all(content.join("home/alice")).unwrap();
    let report: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(content.join("home/alice/report.odt"), &report).unwrap();
    let img = d.join("guest.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run_ok(
        d,
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            content.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    vmdkit_ok(
        d,
        &[
            "import",
            "--from",
            "raw",
            "guest.img",
            "vm.vmdk",
            "-d",
            "sparse",
            "-q",
        ],
    );
    vmdkit_ok(
        d,
        &["export", "vm.vmdk", "backup.vmdk", "-d", "stream", "-q"],
    );
    let s = Server::start(d, "backup.vmdk", &[]);
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(&s.uri)
        .spawn()
        .unwrap();
    let disk = mnt.join("nbd");
    for _ in 0..100 {
        if disk.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = d.join("restored.odt");
    let got = Command::new("debugfs")
        .args([
            "-R",
            &format!("dump /home/alice/report.odt {}", out.display()),
        ])
        .arg(&disk)
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = fuse.wait();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_same(
        &std::fs::read(&out).unwrap(),
        &report,
        "the file out of the served backup",
    );
}

/// A stream written without a grain directory (gdOffset 0, records then the
/// end-of-stream marker) is indexed once by reading its records: read, exported and
/// served as qemu reads the stream it was cut from. The same records with a header that
/// promises a footer, and none, stay refused (a lost footer cannot be told from a cut).
#[test]
fn a_stream_without_a_grain_directory_is_indexed() {
    need_qemu!();
    let t = tmp();
    let d = t.path();
    chain(d);
    let b = std::fs::read(d.join("b.vmdk")).unwrap();
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    // Walk the records to the first table, directory or footer marker.
    let mut pos = (u64_at(64) as usize * 512).max(512);
    loop {
        let (val, size) = (u64_at(pos), u32_at(pos + 8));
        if size == 0 {
            match u32_at(pos + 12) {
                0..=3 => break, // end of stream, a table, the directory, the footer
                _ => pos += 512 + val as usize * 512,
            }
            continue;
        }
        pos += (12 + size as usize).div_ceil(512) * 512;
    }
    let mut nogd = b[..pos].to_vec();
    nogd.extend_from_slice(&[0u8; 512]);
    let lost_footer = nogd.clone();
    nogd[56..64].copy_from_slice(&0u64.to_le_bytes());
    std::fs::write(d.join("nogd.vmdk"), &nogd).unwrap();
    std::fs::write(d.join("lost.vmdk"), &lost_footer).unwrap();
    let want = qemu_raw(d, "b.vmdk");
    assert_same(&vmdkit_raw(d, "nogd.vmdk"), &want, "the indexed stream");
    let info = String::from_utf8(vmdkit_ok(d, &["info", "nogd.vmdk"]).stdout).unwrap();
    assert!(info.contains("without a grain directory"), "{info}");
    vmdkit_ok(d, &["export", "nogd.vmdk", "re.vmdk", "-d", "sparse", "-q"]);
    assert_same(&qemu_raw(d, "re.vmdk"), &want, "exported");
    // The index is built with progress: the last call reports the whole file.
    static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    fn seen(done: u64, total: u64) {
        assert!(done <= total);
        SEEN.store(done, std::sync::atomic::Ordering::SeqCst);
    }
    let c = vmdkit::Chain::open(&d.join("nogd.vmdk"), &{
        let mut o = vmdkit::OpenOptions::default();
        o.index_progress = Some(seen);
        o
    })
    .unwrap();
    drop(c);
    assert_eq!(
        SEEN.load(std::sync::atomic::Ordering::SeqCst),
        nogd.len() as u64
    );
    let err = vmdkit_err(d, &["cat", "lost.vmdk", "-o", "x.raw"]);
    assert!(err.contains("footer"), "{err}");
    if have_nbd_tools() {
        let s = Server::start(d, "nogd.vmdk", &[]);
        let out = d.join("nogd.raw");
        run_ok(d, "nbdcopy", &[&s.uri, out.to_str().unwrap()]);
        assert_same(&std::fs::read(&out).unwrap(), &want, "served");
    }
}

/// A client that asks for 32 MiB and never reads the reply (or stops in the middle of
/// its handshake) holds a connection only until the client timeout: with one connection
/// allowed, the next client is served once it has passed.
#[test]
fn a_client_that_stops_reading_is_dropped() {
    need_qemu!();
    if !have_nbd_tools() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_create(d, "monolithicSparse", "big.vmdk", "64M");
    qemu_io(d, "big.vmdk", &["write -P 0x61 0 40M"]);
    let s = Server::start(
        d,
        "big.vmdk",
        &["--max-connections", "1", "--client-timeout", "3"],
    );
    let mut c = UnixStream::connect(&s.socket).unwrap();
    hello(&mut c);
    option(&mut c, 1, b"");
    let mut e = [0u8; 10];
    c.read_exact(&mut e).unwrap();
    request(&mut c, 0, 1, 0, 32 << 20);
    // It never reads: the server's reply stalls on a full socket. Meanwhile it holds the
    // only connection (another client is turned away), until the timeout passes.
    let started = std::time::Instant::now();
    let out = d.join("after.raw");
    let turned_away = Command::new("nbdcopy")
        .args(["--connections=1", &s.uri, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !turned_away.status.success(),
        "the stalled client holds the slot"
    );
    loop {
        let o = Command::new("nbdcopy")
            .args(["--connections=1", &s.uri, out.to_str().unwrap()])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "the stalled client still holds the only connection: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_same(
        &std::fs::read(&out).unwrap(),
        &qemu_raw(d, "big.vmdk"),
        "served after the stall",
    );
    drop(c);
}
