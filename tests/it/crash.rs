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
    Mkdir,
    /// A symbolic link made at the first path, pointing at the second.
    Symlink(String, String),
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
            8 => Op::Mkdir,
            9 => {
                let l2 = u32_at(rest, 0);
                Op::Symlink(p, String::from_utf8(rest[4..4 + l2].to_vec()).unwrap())
            }
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
    /// Inodes that are symbolic links (their bytes: the target).
    symlinks: HashSet<usize>,
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
            symlinks: HashSet::new(),
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
            Op::Mkdir => {}
            Op::Symlink(p, target) => {
                let i = self.data.len();
                self.data.push(target.as_bytes().to_vec());
                self.durable_data.push(target.as_bytes().to_vec());
                self.pending_data.push(Vec::new());
                self.symlinks.insert(i);
                self.names.insert(p.clone(), i);
                self.pending_dir.push(DirOp::Link(p.clone(), i));
            }
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
        let t = e.file_type().unwrap();
        if t.is_file() {
            m.insert(
                e.path().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        } else if t.is_symlink() {
            // A link's bytes: where it points.
            let to = std::fs::read_link(e.path()).unwrap();
            m.insert(
                e.path().to_string_lossy().into_owned(),
                to.to_string_lossy().as_bytes().to_vec(),
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

    /// The folder as it is now (a power-cut state of another run) as the starting
    /// point; its files' inodes are kept in `pool` (a new folder).
    fn from_folder(dir: &Path, pool: &Path, args: &'a [&'a str]) -> Scenario<'a> {
        std::fs::create_dir_all(pool).unwrap();
        let initial = read_folder(dir);
        for (k, (name, _)) in initial.iter().enumerate() {
            std::fs::hard_link(name, pool.join(k.to_string())).unwrap();
        }
        Scenario {
            dir: dir.to_path_buf(),
            pool: pool.to_path_buf(),
            initial,
            args,
        }
    }

    /// Run the command under the recorder; returns the log and the real result.
    fn record(&self) -> (Vec<Op>, BTreeMap<String, Vec<u8>>) {
        let log = self.pool.with_extension("log");
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

    /// Lay `state` out in the folder: files that existed before keep their inode;
    /// inodes in `symlinks` are symbolic links to their bytes.
    fn materialize(&self, state: &State, symlinks: &HashSet<usize>) {
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        for (name, (inode, bytes)) in state {
            if symlinks.contains(inode) {
                std::os::unix::fs::symlink(String::from_utf8_lossy(bytes).as_ref(), name).unwrap();
            } else if *inode < self.initial.len() {
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
                self.materialize(&s, &m.symlinks);
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

/// The files of a folder and their sizes (of extents: a text descriptor's length varies
/// with the CID qemu wrote, which it does not zero-pad, so files below 64 KiB count as 0).
fn files_and_sizes(d: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let len = if e.file_type().unwrap().is_symlink() {
                0
            } else {
                e.metadata().unwrap().len()
            };
            let len = if len < 65536 { 0 } else { len };
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    v.sort();
    v
}

/// The content of `disk` as `vmdkit cat` reads it; a `.raw`
/// file is its bytes.
fn vmdkit_read(disk: &Path) -> Result<Vec<u8>, String> {
    use vmdkit::VirtualDisk;
    if disk.extension().is_some_and(|e| e == "raw") {
        // Through vmdkit's raw reader, which refuses a raw file under an interrupted apply.
        let c = vmdkit::Chain::open_raw(disk, &vmdkit::OpenOptions::default())
            .map_err(|e| e.to_string())?;
        let mut b = vec![0u8; c.capacity() as usize];
        c.read_at(&mut b, 0).map_err(|e| e.to_string())?;
        return Ok(b);
    }
    // As `vmdkit cat` reads it: a disk an interrupted apply left reads as one point when
    // it can (said in a warning), else it is refused as pending.
    let c = vmdkit::Chain::open(disk, &{
        let mut o = vmdkit::OpenOptions::default();
        o.read_pending = true;
        o
    })
    .map_err(|e| e.to_string())?;
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
    // qemu-img reads every kind here but RDM descriptors (their content, the device's
    // bytes, is what the clean run's reading gave).
    let rdm = std::fs::read(dir.join(disk))
        .is_ok_and(|b| b.len() < 65536 && String::from_utf8_lossy(&b).contains("RawDeviceMap"));
    let q = if rdm {
        return finish_checks(dir, disk, files);
    } else {
        Command::new("qemu-img")
            .args(["compare", "-q", disk])
            .arg(dir.join("../want.raw"))
            .current_dir(dir)
            .status()
            .unwrap()
    };
    if !q.success() {
        return Err("qemu-img reads other content".into());
    }
    finish_checks(dir, disk, files)
}

/// `check` clean, stale temporaries swept, exactly the files of an uninterrupted run.
fn finish_checks(dir: &Path, disk: &str, files: &[(String, u64)]) -> Result<(), String> {
    if !disk.ends_with(".raw") {
        let r = vmdkit::ops::check::check(&dir.join(disk), false).map_err(|e| e.to_string())?;
        if r.exit_code() != 0 {
            let mut t = Vec::new();
            r.write_text(&mut t).unwrap();
            return Err(format!(
                "check is not clean: {}",
                String::from_utf8_lossy(&t)
            ));
        }
    }
    // A temporary a power cut left is removed by the next vmdkit that writes into the
    // folder (the rerun, unless it had nothing left to write).
    vmdkit::cleanup::sweep(dir);
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
/// An uninterrupted run: the disk's content before (if it existed) and after, and the
/// files it leaves (names and sizes).
type Clean = (Option<Vec<u8>>, Vec<u8>, Vec<(String, u64)>);

fn clean_run(root: &Path, args: &[&str], disk: &str, setup: &dyn Fn(&Path)) -> Clean {
    let d = root.join("clean");
    std::fs::create_dir_all(&d).unwrap();
    setup(&d);
    let before = vmdkit_read(&d.join(disk)).ok();
    vmdkit_ok(&d, args);
    let want = vmdkit_read(&d.join(disk)).unwrap();
    std::fs::write(root.join("want.raw"), &want).unwrap();
    (before, want, files_and_sizes(&d))
}

/// What a power-cut state shows a user before anything is rerun (rules a and d).
#[derive(Debug, Default)]
struct Seen {
    before: usize,
    after: usize,
    /// Refused, naming the interrupted operation and what finishes it.
    pending: usize,
    /// Anything else: the first few, described.
    wrong: Vec<String>,
}

/// Classify what `top` (the top of the chain as the user reads it: `delta` while it
/// exists, else `disk`) shows in this state.
fn seen_in(
    dir: &Path,
    disk: &str,
    delta: Option<&str>,
    before: Option<&[u8]>,
    want: &[u8],
    k: usize,
    seen: &std::cell::RefCell<Seen>,
) {
    let top = delta.filter(|d| dir.join(d).exists()).unwrap_or(disk);
    let mut s = seen.borrow_mut();
    match vmdkit_read(&dir.join(top)) {
        Ok(b) if b == want => s.after += 1,
        Ok(b) if Some(&b[..]) == before => s.before += 1,
        Err(_) if before.is_none() && !dir.join(top).exists() => s.before += 1,
        Err(e) if e.contains("interrupted") => {
            if std::env::var("VMDKIT_CRASH_DEBUG").is_ok() {
                let names: Vec<String> = std::fs::read_dir(dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                eprintln!("pending after call {k}: `{top}` among {names:?}: {e}");
            }
            s.pending += 1
        }
        other => {
            if s.wrong.len() < 3 {
                let what = match other {
                    Ok(_) => "reads neither the old nor the new content".to_string(),
                    Err(e) => e,
                };
                s.wrong.push(format!("after call {k}: `{top}` {what}"));
            } else {
                s.wrong.push(String::new());
            }
        }
    }
}

/// How a scenario's folder is made.
type Setup<'a> = &'a dyn Fn(&Path);

/// Record `args` run on what `setup` makes, then check every power-cut state: a rerun
/// finishes the job, `disk` reads what an uninterrupted run gives. Returns the number of
/// states checked.
fn power_cut(name: &str, setup: Setup<'_>, args: &[&str], disk: &str, seed: u64) -> usize {
    power_cut_top(name, setup, args, disk, None, seed)
}

/// [`power_cut`] where the user reads `delta` (the top) while it exists.
fn power_cut_top(
    name: &str,
    setup: Setup<'_>,
    args: &[&str],
    disk: &str,
    delta: Option<&str>,
    seed: u64,
) -> usize {
    let t = tmp();
    let (before, want, files) = clean_run(t.path(), args, disk, setup);
    let s = Scenario::new(t.path(), args, setup);
    let seen = std::cell::RefCell::new(Seen::default());
    let second = std::cell::Cell::new((0usize, 0usize));
    let n = s.run(seed, &|d, k| {
        seen_in(d, disk, delta, before.as_deref(), &want, k, &seen);
        // A second power cut during the recovery: for one in four of the states whose
        // rerun has work to do (a state file beside the disk), record that rerun and
        // check each state a power cut during it may leave, the same way.
        let (picked, states) = second.get();
        let pending = std::fs::read_dir(d).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.ends_with(".vmdkit-commit") || n.ends_with(".vmdkit-apply")
        });
        if pending && picked % 4 == 0 {
            let pool = t.path().join(format!("pool-second-{picked}"));
            let again = Scenario::from_folder(d, &pool, args);
            let m = again.run(seed ^ picked as u64, &|d2, _| {
                rerun_finishes(d2, args, disk, &want, &files)
            });
            second.set((picked + 1, states + m));
            std::fs::remove_dir_all(&pool).unwrap();
            return Ok(());
        }
        if pending {
            second.set((picked + 1, states));
        }
        rerun_finishes(d, args, disk, &want, &files)
    });
    let seen = seen.into_inner();
    let (_, second) = second.get();
    eprintln!(
        "{name}: {n} power-cut states checked, and {second} states of a second power cut during a rerun; before a rerun the disk reads the old content in {}, the new in {}, is refused as pending in {}, other in {} {:?}",
        seen.before, seen.after, seen.pending, seen.wrong.len(), seen.wrong.iter().filter(|w| !w.is_empty()).collect::<Vec<_>>()
    );
    assert!(n >= 2, "{name}: only {n} states");
    let n = n + second;
    // Rules (a) and (d): before any rerun, the disk the user reads holds the old or the
    // new content, or is refused with a message naming the interrupted operation and
    // the command that finishes it; never other content, never a misleading error.
    assert!(
        seen.wrong.is_empty(),
        "{name}: {} states show the user something else: {:?}",
        seen.wrong.len(),
        seen.wrong
            .iter()
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
    );
    // Rule (a) in full: every command leaves the disk readable as old or new in every
    // state, without a rerun; but apply into a raw file, whose in-place writes cannot be
    // made atomic (it marks the file pending between its first and last write; README
    // says so).
    if !name.starts_with("apply (raw") {
        assert_eq!(
            seen.pending, 0,
            "{name}: states where the disk is refused as pending"
        );
    }
    n
}

fn hosted_pair(d: &Path) {
    qemu_create(d, "monolithicSparse", "p.vmdk", "8M");
    qemu_io(d, "p.vmdk", &["write -P 0x31 0 1M", "write -P 0x32 3M 64k"]);
    qemu_child(d, "p.vmdk", "c.vmdk", false);
    qemu_io(
        d,
        "c.vmdk",
        &["write -P 0x41 512k 128k", "write -P 0x42 5M 64k"],
    );
}

/// A thin vmfs disk `p.vmdk` with 1 MiB of data.
fn vmfs_base(d: &Path) {
    vmdkit_ok(
        d,
        &["create", "p.vmdk", "--size", "4m", "--type", "thin", "-q"],
    );
    std::fs::write(d.join("a.bin"), vec![0x5au8; 1 << 20]).unwrap();
    vmdkit_ok(d, &["write", "p.vmdk", "--offset", "0", "a.bin"]);
    std::fs::remove_file(d.join("a.bin")).unwrap();
}

fn write_into(d: &Path, disk: &str, off: &str, byte: u8, len: usize) {
    std::fs::write(d.join("x.bin"), vec![byte; len]).unwrap();
    vmdkit_ok(d, &["write", disk, "--offset", off, "x.bin", "--force"]);
    std::fs::remove_file(d.join("x.bin")).unwrap();
}

/// commit of every delta type (hosted sparse, vmfsSparse, ESX 2 REDO, SESparse), with
/// `--all`, and of a middle delta whose child is re-pointed: every power-cut state is
/// finished by a rerun.
#[test]
fn commit_survives_every_power_cut_state() {
    need_qemu!();
    let mut total = 0;
    total += power_cut_top(
        "commit (hosted into monolithicSparse)",
        &hosted_pair,
        &["commit", "c.vmdk", "-q"],
        "p.vmdk",
        Some("c.vmdk"),
        0x18,
    );
    total += power_cut_top(
        "commit (hosted into monolithicSparse, a 1000-byte descriptor)",
        &|d: &Path| {
            hosted_pair(d);
            lengthen_descriptor(&d.join("p.vmdk"), 1000);
        },
        &["commit", "c.vmdk", "-q"],
        "p.vmdk",
        Some("c.vmdk"),
        0x1e,
    );
    let vmfs_sparse = |d: &Path| {
        vmfs_base(d);
        vmdkit_ok(d, &["redo", "add", "p.vmdk", "--style", "vmfsSparse"]);
        write_into(d, "p-000001.vmdk", "102400", 0x6b, 70_000);
    };
    total += power_cut_top(
        "commit (vmfsSparse into vmfs)",
        &vmfs_sparse,
        &["commit", "p-000001.vmdk", "-q"],
        "p.vmdk",
        Some("p-000001.vmdk"),
        0x19,
    );
    let redo = |d: &Path| {
        vmfs_base(d);
        vmdkit_ok(d, &["redo", "add", "p.vmdk", "--style", "redo"]);
        write_into(d, "p.vmdk.REDO", "2048", 0x7c, 9000);
    };
    total += power_cut_top(
        "commit (ESX 2 REDO into vmfs)",
        &redo,
        &["commit", "p.vmdk.REDO", "-q"],
        "p.vmdk",
        Some("p.vmdk.REDO"),
        0x1a,
    );
    let sesparse = |d: &Path| {
        super::deltas_handmade::sesparse_chain(d);
    };
    total += power_cut_top(
        "commit (SESparse into vmfs)",
        &sesparse,
        &["commit", "s.vmdk", "-q"],
        "base.vmdk",
        Some("s.vmdk"),
        0x1b,
    );
    let three = |d: &Path| {
        hosted_pair(d);
        qemu_child(d, "c.vmdk", "c2.vmdk", false);
        qemu_io(d, "c2.vmdk", &["write -P 0x51 6M 64k"]);
    };
    total += power_cut_top(
        "commit --all (two hosted deltas)",
        &three,
        &["commit", "--all", "c2.vmdk", "-q"],
        "p.vmdk",
        Some("c2.vmdk"),
        0x1c,
    );
    total += power_cut(
        "commit of a middle delta (child re-pointed)",
        &three,
        &["commit", "c.vmdk", "-q"],
        "c2.vmdk",
        0x1d,
    );
    eprintln!("commit: {total} power-cut states checked in all");
}

/// Give the embedded descriptor of the monolithicSparse `disk` a `ddb.comment` line so
/// that its text is `len` bytes long (VMware's own descriptors, with UUIDs and tools
/// keys, run past one sector; a pending mark appended to this one would straddle the
/// sector boundary at 1024).
fn lengthen_descriptor(disk: &Path, len: usize) {
    let mut b = std::fs::read(disk).unwrap();
    let off = u64::from_le_bytes(b[28..36].try_into().unwrap()) as usize * 512;
    let size = u64::from_le_bytes(b[36..44].try_into().unwrap()) as usize * 512;
    let area = &b[off..off + size];
    let text =
        String::from_utf8(area[..area.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap();
    let line = "ddb.comment = \"\"\n";
    let at = text.find("ddb.").unwrap();
    let pad = len - text.len() - line.len();
    let new = format!(
        "{}ddb.comment = \"{}\"\n{}",
        &text[..at],
        "x".repeat(pad),
        &text[at..]
    );
    assert_eq!(new.len(), len);
    b[off..off + size].fill(0);
    b[off..off + len].copy_from_slice(new.as_bytes());
    std::fs::write(disk, b).unwrap();
}

/// apply of an increment into a restored monolithicSparse (with a short and a long
/// descriptor), twoGbMaxExtentSparse and raw disk: every power-cut state is finished by
/// a rerun.
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
    let mut total = 0;
    for kind in ["sparse", "sparse, a 1000-byte descriptor", "split", "raw"] {
        let (disk, extra): (&str, &[&str]) = if kind == "raw" {
            ("vm.raw", &["--raw", "--force"])
        } else {
            ("vm.vmdk", &[])
        };
        let setup = |d: &Path| {
            if kind == "raw" {
                vmdkit_ok(d, &["cat", full.to_str().unwrap(), "-o", "vm.raw"]);
            } else {
                let long = kind.starts_with("sparse,");
                vmdkit_ok(
                    d,
                    &[
                        "import",
                        full.to_str().unwrap(),
                        "vm.vmdk",
                        "-d",
                        if long { "sparse" } else { kind },
                        "-q",
                    ],
                );
                if long {
                    lengthen_descriptor(&d.join("vm.vmdk"), 1000);
                }
            }
        };
        let mut args = vec!["apply", disk, inc.as_str(), "-q"];
        args.extend_from_slice(extra);
        total += power_cut(&format!("apply ({kind})"), &setup, &args, disk, 0x17);
    }
    eprintln!("apply: {total} power-cut states checked in all");
}

/// write, extend, redo add, check --repair, import and export over an existing target
/// with --force, rdm create: every power-cut state is finished by a rerun (or is already
/// the finished state).
#[test]
fn other_writers_survive_every_power_cut_state() {
    need_qemu!();
    let mut total = 0;
    let sparse = |d: &Path| {
        qemu_create(d, "monolithicSparse", "vm.vmdk", "8M");
        qemu_io(d, "vm.vmdk", &["write -P 0x31 0 1M"]);
        std::fs::write(d.join("in.bin"), vec![0x77u8; 200_000]).unwrap();
    };
    total += power_cut(
        "write (monolithicSparse)",
        &sparse,
        &["write", "vm.vmdk", "--offset", "3M", "in.bin"],
        "vm.vmdk",
        0x21,
    );
    let split = |d: &Path| {
        qemu_create(d, "twoGbMaxExtentSparse", "vm.vmdk", "8M");
        qemu_io(d, "vm.vmdk", &["write -P 0x31 0 1M"]);
    };
    total += power_cut(
        "extend (monolithicSparse)",
        &sparse,
        &["extend", "vm.vmdk", "--size", "16M", "-q"],
        "vm.vmdk",
        0x22,
    );
    total += power_cut(
        "extend (monolithicSparse, a 1000-byte descriptor, the extent line grows)",
        &|d: &Path| {
            sparse(d);
            lengthen_descriptor(&d.join("vm.vmdk"), 1000);
        },
        &["extend", "vm.vmdk", "--size", "64M", "-q"],
        "vm.vmdk",
        0x2b,
    );
    total += power_cut(
        "extend (twoGbMaxExtentSparse)",
        &split,
        &["extend", "vm.vmdk", "--size", "12M", "-q"],
        "vm.vmdk",
        0x23,
    );
    total += power_cut(
        "extend (vmfs thin)",
        &vmfs_base,
        &["extend", "p.vmdk", "--size", "6M", "-q"],
        "p.vmdk",
        0x24,
    );
    total += power_cut(
        "redo add (hosted)",
        &sparse,
        &["redo", "add", "vm.vmdk"],
        "vm-000001.vmdk",
        0x25,
    );
    total += power_cut(
        "redo add (vmfsSparse)",
        &vmfs_base,
        &["redo", "add", "p.vmdk", "--style", "vmfsSparse"],
        "p-000001.vmdk",
        0x26,
    );
    let leaky = |d: &Path| {
        sparse(d);
        // A leaked grain of zeros at the end and the unclean-shutdown flag set.
        let mut b = std::fs::read(d.join("vm.vmdk")).unwrap();
        b.extend(vec![0u8; 65536]);
        b[72] = 1;
        std::fs::write(d.join("vm.vmdk"), &b).unwrap();
    };
    total += power_cut(
        "check --repair (leak, unclean flag)",
        &leaky,
        &["check", "--repair", "vm.vmdk"],
        "vm.vmdk",
        0x27,
    );
    let two = |d: &Path| {
        sparse(d);
        qemu_create(d, "monolithicSparse", "src.vmdk", "8M");
        qemu_io(d, "src.vmdk", &["write -P 0x66 2M 300k"]);
    };
    total += power_cut(
        "import --force over a disk",
        &two,
        &[
            "import", "src.vmdk", "vm.vmdk", "-d", "sparse", "--force", "-q",
        ],
        "vm.vmdk",
        0x28,
    );
    total += power_cut(
        "export --force over a disk (split)",
        &two,
        &[
            "export", "src.vmdk", "vm.vmdk", "-d", "split", "--force", "-q",
        ],
        "vm.vmdk",
        0x29,
    );
    let lun = |d: &Path| {
        std::fs::write(
            d.join("lun.raw"),
            (0..1u32 << 20)
                .map(|i| (i / 512) as u8 | 1)
                .collect::<Vec<u8>>(),
        )
        .unwrap();
    };
    total += power_cut(
        "rdm create",
        &lun,
        &["rdm", "create", "vm.vmdk", "--device", "lun.raw"],
        "vm.vmdk",
        0x2a,
    );
    eprintln!("other writers: {total} power-cut states checked in all");
}
