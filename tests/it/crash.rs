//! Issue 18: a power-loss checker in the style of ALICE and CrashMonkey. A command runs
//! under a test-only LD_PRELOAD shim (`tests/crash/shim.c`) that records every
//! file-system call it makes in the disk's folder (creates, writes with their bytes,
//! truncations, punched holes, fsyncs, renames, unlinks). A model replays the log and lays
//! out the states a POSIX file system may be left in by a power cut after any call:
//!
//! - everything issued so far reached the disk (what kill -9 leaves);
//! - only what was made durable did: file data as of each file's last fsync, names as of
//!   each folder's last fsync;
//! - in between: each prefix of the folder operations not yet durable (they are
//!   journaled in order), and seeded random subsets of the unsynced writes, torn at
//!   512-byte sectors.
//!
//! Each distinct state is laid out in the folder again (files that existed before keep
//! their inode, through hard links kept aside, since recovery state binds to inodes) and
//! checked: a rerun of the same command finishes the job with the right content (read by
//! vmdkit's own reader and by qemu-img), `check` is clean, and the folder holds exactly
//! the files an uninterrupted run leaves (nothing leaked, nothing lost). The recorder is
//! validated first: replaying every call reproduces the real result byte for byte.

use super::util::*;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The recorder, compiled once per test run with the system C compiler.
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash/shim.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmdkit-crash-shim.so");
        let tmp = out.with_extension(format!("{}.so", std::process::id()));
        let st = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&tmp)
            .arg(&src)
            .args(["-ldl", "-lpthread"])
            .status()
            .expect("a C compiler (cc) for the crash recorder");
        assert!(st.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Write(String, u64, Vec<u8>),
    Trunc(String, u64),
    Zero(String, u64, u64),
    Fsync(String),
    Rename(String, String),
    Unlink(String),
    Mkdir(String),
}

fn parse_log(b: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut i = 0;
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    while i < b.len() {
        let n = u32_at(b, i);
        let r = &b[i + 4..i + 4 + n];
        i += 4 + n;
        let l = u32_at(r, 1);
        let p = String::from_utf8(r[5..5 + l].to_vec()).unwrap();
        let rest = &r[5 + l..];
        ops.push(match r[0] {
            1 => Op::Create(p),
            2 => {
                let dl = u32_at(rest, 8);
                Op::Write(p, u64_at(rest, 0), rest[12..12 + dl].to_vec())
            }
            3 => Op::Trunc(p, u64_at(rest, 0)),
            4 => Op::Zero(p, u64_at(rest, 0), u64_at(rest, 8)),
            5 => Op::Fsync(p),
            6 => {
                let l2 = u32_at(rest, 0);
                Op::Rename(p, String::from_utf8(rest[4..4 + l2].to_vec()).unwrap())
            }
            7 => Op::Unlink(p),
            8 => Op::Mkdir(p),
            k => panic!("unknown record {k}"),
        });
    }
    ops
}

/// A data change of one inode.
#[derive(Debug, Clone)]
enum DataOp {
    Write(u64, Vec<u8>),
    Trunc(u64),
    Zero(u64, u64),
}

fn apply_data(buf: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write(off, d) => {
            let end = *off as usize + d.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(d);
        }
        DataOp::Trunc(len) => buf.resize(*len as usize, 0),
        DataOp::Zero(off, len) => {
            let end = ((*off + *len) as usize).min(buf.len());
            if (*off as usize) < end {
                buf[*off as usize..end].fill(0);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(String, usize),
    Unlink(String),
    /// Atomic: the new name or the old, never neither or both.
    Rename(String, String, usize),
}

fn folder(p: &str) -> &str {
    &p[..p.rfind('/').unwrap_or(0)]
}

/// The file system as the command left it, and what of it is durable.
#[derive(Clone)]
struct Model {
    names: BTreeMap<String, usize>,
    data: Vec<Vec<u8>>,
    durable_data: Vec<Vec<u8>>,
    pending_data: Vec<Vec<DataOp>>,
    durable_names: BTreeMap<String, usize>,
    pending_dir: Vec<DirOp>,
}

/// A state: each name's inode and bytes.
type State = BTreeMap<String, (usize, Vec<u8>)>;

impl Model {
    fn new(initial: &BTreeMap<String, Vec<u8>>) -> Model {
        let names: BTreeMap<String, usize> = initial
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let data: Vec<Vec<u8>> = initial.values().cloned().collect();
        Model {
            durable_names: names.clone(),
            names,
            durable_data: data.clone(),
            pending_data: vec![Vec::new(); data.len()],
            data,
            pending_dir: Vec::new(),
        }
    }

    fn data_op(&mut self, p: &str, op: DataOp) {
        let Some(&i) = self.names.get(p) else {
            return; // a file outside the model (an unnamed temporary)
        };
        apply_data(&mut self.data[i], &op);
        self.pending_data[i].push(op);
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Create(p) => {
                let i = self.data.len();
                self.data.push(Vec::new());
                self.durable_data.push(Vec::new());
                self.pending_data.push(Vec::new());
                self.names.insert(p.clone(), i);
                self.pending_dir.push(DirOp::Link(p.clone(), i));
            }
            Op::Write(p, off, d) => self.data_op(p, DataOp::Write(*off, d.clone())),
            Op::Trunc(p, len) => self.data_op(p, DataOp::Trunc(*len)),
            Op::Zero(p, off, len) => self.data_op(p, DataOp::Zero(*off, *len)),
            Op::Fsync(p) => {
                if let Some(&i) = self.names.get(p) {
                    self.durable_data[i] = self.data[i].clone();
                    self.pending_data[i].clear();
                } else {
                    // A folder: its pending name changes become durable, in order.
                    let (now, later): (Vec<DirOp>, Vec<DirOp>) =
                        self.pending_dir.drain(..).partition(|d| match d {
                            DirOp::Link(n, _) | DirOp::Unlink(n) | DirOp::Rename(_, n, _) => {
                                folder(n) == p
                            }
                        });
                    for d in now {
                        apply_dir(&mut self.durable_names, &d);
                    }
                    self.pending_dir = later;
                }
            }
            Op::Rename(a, b) => {
                if let Some(i) = self.names.remove(a) {
                    self.names.insert(b.clone(), i);
                    self.pending_dir
                        .push(DirOp::Rename(a.clone(), b.clone(), i));
                }
            }
            Op::Unlink(p) => {
                self.names.remove(p);
                self.pending_dir.push(DirOp::Unlink(p.clone()));
            }
            Op::Mkdir(_) => {}
        }
    }

    /// Everything issued reached the disk.
    fn volatile(&self) -> State {
        self.names
            .iter()
            .map(|(n, &i)| (n.clone(), (i, self.data[i].clone())))
            .collect()
    }

    /// The states a power cut may leave now (seeded, bounded).
    fn crash_states(&self, rng: &mut u64) -> Vec<State> {
        let mut out = vec![self.volatile()];
        let durable_data = |i: usize| self.durable_data[i].clone();
        // Names: the durable ones with any subset of the pending name changes applied
        // in their order (a file system may persist them out of order): every subset
        // when there are at most 6, else every prefix and 32 seeded subsets.
        let m = self.pending_dir.len();
        let subsets: Vec<u64> = if m <= 6 {
            (0..1u64 << m).collect()
        } else {
            let mut v: Vec<u64> = (0..=m).map(|k| (1u64 << k) - 1).collect();
            v.extend((0..32).map(|_| next(rng) & ((1u64 << m.min(63)) - 1)));
            v
        };
        let name_states: Vec<BTreeMap<String, usize>> = subsets
            .iter()
            .map(|mask| {
                let mut names = self.durable_names.clone();
                for (j, d) in self.pending_dir.iter().enumerate() {
                    if j < 64 && mask & (1 << j) != 0 {
                        apply_dir(&mut names, d);
                    }
                }
                names
            })
            .collect();
        for ns in &name_states {
            out.push(
                ns.iter()
                    .map(|(n, &i)| (n.clone(), (i, durable_data(i))))
                    .collect(),
            );
            out.push(
                ns.iter()
                    .map(|(n, &i)| (n.clone(), (i, self.data[i].clone())))
                    .collect(),
            );
        }
        // Torn: the final names, the unsynced writes of each file partly there, at
        // 512-byte sectors.
        for _ in 0..2 {
            let s: State = self
                .names
                .iter()
                .map(|(n, &i)| {
                    let mut b = self.durable_data[i].clone();
                    for op in &self.pending_data[i] {
                        match op {
                            DataOp::Write(off, d) => {
                                for (k, chunk) in d.chunks(512).enumerate() {
                                    if next(rng) % 2 == 0 {
                                        apply_data(
                                            &mut b,
                                            &DataOp::Write(off + (k * 512) as u64, chunk.to_vec()),
                                        );
                                    }
                                }
                            }
                            other => {
                                if next(rng) % 2 == 0 {
                                    apply_data(&mut b, other);
                                }
                            }
                        }
                    }
                    (n.clone(), (i, b))
                })
                .collect();
            out.push(s);
        }
        out
    }
}

fn apply_dir(names: &mut BTreeMap<String, usize>, d: &DirOp) {
    match d {
        DirOp::Link(n, i) => {
            names.insert(n.clone(), *i);
        }
        DirOp::Unlink(n) => {
            names.remove(n);
        }
        DirOp::Rename(a, b, i) => {
            if names.get(a) == Some(i) {
                names.remove(a);
            }
            names.insert(b.clone(), *i);
        }
    }
}

fn next(s: &mut u64) -> u64 {
    // xorshift64*: deterministic, seeded.
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn read_folder(d: &Path) -> BTreeMap<String, Vec<u8>> {
    let root = std::fs::canonicalize(d).unwrap();
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.path().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

/// One command under the recorder, and its crash states checked.
struct Scenario<'a> {
    /// The folder holding the disk (what the command is run in).
    dir: PathBuf,
    /// Where the inodes of the files that existed before are kept (hard links).
    pool: PathBuf,
    initial: BTreeMap<String, Vec<u8>>,
    args: &'a [&'a str],
}

impl<'a> Scenario<'a> {
    /// Prepare: `setup` makes the folder's files; their inodes are kept aside.
    fn new(root: &Path, args: &'a [&'a str], setup: impl FnOnce(&Path)) -> Scenario<'a> {
        let dir = root.join("disk");
        let pool = root.join("pool");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&pool).unwrap();
        setup(&dir);
        let initial = read_folder(&dir);
        for (k, (name, _)) in initial.iter().enumerate() {
            std::fs::hard_link(name, pool.join(k.to_string())).unwrap();
        }
        Scenario {
            dir,
            pool,
            initial,
            args,
        }
    }

    /// Run the command under the recorder; returns the log and the real result.
    fn record(&self) -> (Vec<Op>, BTreeMap<String, Vec<u8>>) {
        let log = self.pool.join("../log.bin");
        let _ = std::fs::remove_file(&log);
        let out = Command::new(bin())
            .args(self.args)
            .current_dir(&self.dir)
            .env("LD_PRELOAD", shim())
            .env("VMDKIT_CRASH_LOG", &log)
            .env("VMDKIT_CRASH_ROOT", &self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?} under the recorder: {}",
            self.args,
            String::from_utf8_lossy(&out.stderr)
        );
        let ops = parse_log(&std::fs::read(&log).unwrap_or_default());
        (ops, read_folder(&self.dir))
    }

    /// Lay `state` out in the folder: files that existed before keep their inode.
    fn materialize(&self, state: &State) {
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        for (name, (inode, bytes)) in state {
            if *inode < self.initial.len() {
                let kept = self.pool.join(inode.to_string());
                // Rewrite only what differs: an untouched file keeps its mtime, as a
                // power cut leaves it.
                if std::fs::read(&kept).unwrap() != *bytes {
                    std::fs::write(&kept, bytes).unwrap();
                }
                std::fs::hard_link(&kept, name).unwrap();
            } else {
                std::fs::write(name, bytes).unwrap();
            }
        }
    }

    /// Validate the recorder, then check every distinct crash state with `check` (given
    /// the folder, after the state is laid out). Returns the number of states checked.
    fn run(&self, seed: u64, check: &dyn Fn(&Path, usize) -> Result<(), String>) -> usize {
        let (ops, real) = self.record();
        assert!(!ops.is_empty(), "{:?}: nothing recorded", self.args);
        let mut m = Model::new(&self.initial);
        for op in &ops {
            m.step(op);
        }
        let replayed: BTreeMap<String, Vec<u8>> =
            m.volatile().into_iter().map(|(n, (_, b))| (n, b)).collect();
        assert_eq!(
            replayed.keys().collect::<Vec<_>>(),
            real.keys().collect::<Vec<_>>(),
            "{:?}: the replayed log names other files than the real run left",
            self.args
        );
        for (n, b) in &real {
            assert!(
                replayed[n] == *b,
                "{:?}: replaying the log does not give `{n}` byte for byte",
                self.args
            );
        }
        let mut seen = HashSet::new();
        let mut rng = seed | 1;
        let mut m = Model::new(&self.initial);
        let mut checked = 0;
        for k in 0..=ops.len() {
            if k > 0 {
                m.step(&ops[k - 1]);
            }
            for s in m.crash_states(&mut rng) {
                let key = sha256(
                    &serde_json::to_vec(
                        &s.iter()
                            .map(|(n, (i, b))| (n, i, sha256(b)))
                            .collect::<Vec<_>>(),
                    )
                    .unwrap(),
                );
                if !seen.insert(key) {
                    continue;
                }
                self.materialize(&s);
                if let Err(e) = check(&self.dir, k) {
                    let names: Vec<&String> = s.keys().collect();
                    panic!(
                        "{:?}: power cut after call {k} of {} ({:?}), files {names:?}: {e}",
                        self.args,
                        ops.len(),
                        ops.get(k.wrapping_sub(1)).map(short)
                    );
                }
                checked += 1;
            }
        }
        checked
    }
}

fn short(op: &Op) -> String {
    match op {
        Op::Write(p, off, d) => format!("write {} bytes at {off} of {p}", d.len()),
        other => format!("{other:?}"),
    }
}

/// The files of a folder and their sizes.
fn files_and_sizes(d: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(d)
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
}

/// The content of `disk` as vmdkit's reader gives it (pending marks refused).
fn vmdkit_read(disk: &Path) -> Result<Vec<u8>, String> {
    use vmdkit::VirtualDisk;
    let c =
        vmdkit::Chain::open(disk, &vmdkit::OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut b = vec![0u8; c.capacity() as usize];
    c.read_at(&mut b, 0).map_err(|e| e.to_string())?;
    Ok(b)
}

/// Rule (b) for a command on `dir`: a rerun finishes the job (or the job was finished),
/// `disk` then reads `want` for vmdkit and qemu-img, `check` is clean, and the folder
/// holds exactly `files` (names and sizes of an uninterrupted run).
fn rerun_finishes(
    dir: &Path,
    args: &[&str],
    disk: &str,
    want: &[u8],
    files: &[(String, u64)],
) -> Result<(), String> {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if err.contains("panicked") {
        return Err(format!("the rerun panicked: {err}"));
    }
    let got = vmdkit_read(&dir.join(disk)).map_err(|e| format!("after the rerun ({err}): {e}"))?;
    if got != want {
        return Err(format!(
            "after the rerun ({}) `{disk}` does not read the finished content",
            if out.status.success() {
                "exit 0"
            } else {
                err.trim()
            }
        ));
    }
    let q = Command::new("qemu-img")
        .args(["compare", "-q", disk])
        .arg(dir.join("../want.raw"))
        .current_dir(dir)
        .status()
        .unwrap();
    if !q.success() {
        return Err("qemu-img reads other content".into());
    }
    let r = vmdkit::ops::check::check(&dir.join(disk), false).map_err(|e| e.to_string())?;
    if r.exit_code() != 0 {
        let mut t = Vec::new();
        r.write_text(&mut t).unwrap();
        return Err(format!(
            "check is not clean: {}",
            String::from_utf8_lossy(&t)
        ));
    }
    let now = files_and_sizes(dir);
    if now != files {
        return Err(format!(
            "files {now:?}, an uninterrupted run leaves {files:?}"
        ));
    }
    Ok(())
}

/// A clean run of `args` on a copy of what `setup` makes: the content of `disk` and the
/// files left.
fn clean_run(
    root: &Path,
    args: &[&str],
    disk: &str,
    setup: &dyn Fn(&Path),
) -> (Vec<u8>, Vec<(String, u64)>) {
    let d = root.join("clean");
    std::fs::create_dir_all(&d).unwrap();
    setup(&d);
    vmdkit_ok(&d, args);
    let want = vmdkit_read(&d.join(disk)).unwrap();
    std::fs::write(root.join("want.raw"), &want).unwrap();
    (want, files_and_sizes(&d))
}

/// commit of a hosted child into a monolithicSparse parent, and of a vmfsSparse delta
/// into a flat (vmfs) parent: every power-cut state is finished by a rerun.
#[test]
fn commit_survives_every_power_cut_state() {
    need_qemu!();
    let hosted = |d: &Path| {
        qemu_create(d, "monolithicSparse", "p.vmdk", "8M");
        qemu_io(d, "p.vmdk", &["write -P 0x31 0 1M", "write -P 0x32 3M 64k"]);
        qemu_child(d, "p.vmdk", "c.vmdk", false);
        qemu_io(
            d,
            "c.vmdk",
            &["write -P 0x41 512k 128k", "write -P 0x42 5M 64k"],
        );
    };
    let vmfs = |d: &Path| {
        vmdkit_ok(
            d,
            &["create", "p.vmdk", "--size", "4m", "--type", "thin", "-q"],
        );
        std::fs::write(d.join("a.bin"), vec![0x5au8; 1 << 20]).unwrap();
        vmdkit_ok(d, &["write", "p.vmdk", "--offset", "0", "a.bin"]);
        vmdkit_ok(d, &["redo", "add", "p.vmdk", "--style", "vmfsSparse"]);
        std::fs::write(d.join("b.bin"), vec![0x6bu8; 70_000]).unwrap();
        vmdkit_ok(
            d,
            &["write", "p-000001.vmdk", "--offset", "102400", "b.bin"],
        );
        std::fs::remove_file(d.join("a.bin")).unwrap();
        std::fs::remove_file(d.join("b.bin")).unwrap();
    };
    let cases: [(&str, &dyn Fn(&Path), &[&str]); 2] = [
        ("hosted", &hosted, &["commit", "c.vmdk", "-q"]),
        ("vmfsSparse", &vmfs, &["commit", "p-000001.vmdk", "-q"]),
    ];
    for (name, setup, args) in cases {
        let t = tmp();
        let (want, files) = clean_run(t.path(), args, "p.vmdk", setup);
        let s = Scenario::new(t.path(), args, setup);
        let n = s.run(0x18, &|d, _| {
            rerun_finishes(d, args, "p.vmdk", &want, &files)
        });
        eprintln!("commit ({name}): {n} power-cut states checked");
        assert!(n > 20, "{name}: only {n} states");
    }
}

/// apply of an increment into a restored monolithicSparse and a twoGbMaxExtentSparse
/// disk: every power-cut state is finished by a rerun.
#[test]
fn apply_survives_every_power_cut_state() {
    need_qemu!();
    let t = tmp();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    qemu_create(&src, "monolithicSparse", "p.vmdk", "8M");
    qemu_io(&src, "p.vmdk", &["write -P 0x31 0 1M"]);
    qemu_child(&src, "p.vmdk", "c.vmdk", true);
    qemu_io(
        &src,
        "c.vmdk",
        &[
            "write -P 0x41 512k 128k",
            "write -z 0 64k",
            "write -P 0x42 5M 64k",
        ],
    );
    vmdkit_ok(&src, &["export", "p.vmdk", "full.vmdk", "-q"]);
    vmdkit_ok(&src, &["export", "c.vmdk", "inc.vmdk", "--delta", "-q"]);
    let full = src.join("full.vmdk");
    let inc = src.join("inc.vmdk").to_string_lossy().into_owned();
    for kind in ["sparse", "split"] {
        let root = t.path().join(kind);
        std::fs::create_dir(&root).unwrap();
        let setup = |d: &Path| {
            vmdkit_ok(
                d,
                &[
                    "import",
                    full.to_str().unwrap(),
                    "vm.vmdk",
                    "-d",
                    kind,
                    "-q",
                ],
            );
        };
        let args = ["apply", "vm.vmdk", inc.as_str(), "-q"];
        let (want, files) = clean_run(&root, &args, "vm.vmdk", &setup);
        let s = Scenario::new(&root, &args, setup);
        let n = s.run(0x17, &|d, _| {
            rerun_finishes(d, &args, "vm.vmdk", &want, &files)
        });
        eprintln!("apply ({kind}): {n} power-cut states checked");
        assert!(n > 20, "{kind}: only {n} states");
    }
}

#[allow(dead_code)]
fn inode_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}
