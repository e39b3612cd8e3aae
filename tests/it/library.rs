//! The library as other programs use it (issue 21): errors carry what lets a refused
//! command go ahead instead of naming the command line's flags; the binary names them.

use std::path::Path;

use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};
use vmdkit::{Chain, ErrorKind, NoProgress, OpenOptions, Override};

use super::util::*;

#[test]
fn refusals_say_which_option_overrides_them_and_name_no_flag() {
    let t = tmp();
    let d = t.path();
    cid_mismatched_pair(d);
    // A content ID mismatch: a chain error the `ignore_cid` option reads through.
    let e = Chain::open(&d.join("top.vmdk"), &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Chain);
    assert_eq!(e.overridable_by(), Some(Override::IgnoreCid));
    assert!(!e.to_string().contains("--"), "{e}");
    let mut o = OpenOptions::default();
    o.ignore_cid = true;
    let chain = Chain::open(&d.join("top.vmdk"), &o).unwrap();
    assert_eq!(chain.warnings().len(), 1, "{:?}", chain.warnings());

    // An output that exists: `force` overwrites it.
    std::fs::write(d.join("out.vmdk"), b"keep").unwrap();
    let mut opts = ExportOptions::default();
    opts.format = ExportFormat::StreamOptimized;
    let e = export(&chain, Dest::Path(d.join("out.vmdk")), &opts, &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(e.overridable_by(), Some(Override::Force));
    assert_eq!(e.file(), Some(d.join("out.vmdk").as_path()));
    assert!(!e.to_string().contains("--"), "{e}");
    assert_eq!(std::fs::read(d.join("out.vmdk")).unwrap(), b"keep");

    // The binary says the same with its own flags.
    let err = vmdkit_err(d, &["info", "top.vmdk"]);
    assert!(err.contains("use --ignore-cid to read anyway"), "{err}");
    let err = vmdkit_err(d, &["export", "top.vmdk", "out.vmdk", "--ignore-cid"]);
    assert!(err.contains("use --force to overwrite"), "{err}");
}

/// The string literals of Rust source (outside comments), each with the line it starts
/// on: a small lexer (escapes, raw strings, char literals, `//` comments).
fn string_literals(code: &str) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\'' => {
                // A char literal ('"', '\\'), or a lifetime: skip what a char literal holds.
                if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                    continue;
                }
                if b.get(i + 1) == Some(&b'\\') {
                    if let Some(k) = b[i + 2..].iter().position(|&c| c == b'\'') {
                        i += k + 3;
                        continue;
                    }
                }
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) == Some(&b'"') {
                    let start = i + 2 + hashes;
                    let close = format!("\"{}", "#".repeat(hashes));
                    let end = code[start..].find(&close).map_or(b.len(), |k| start + k);
                    out.push((line, code[start..end].to_string()));
                    line += code[start..end].matches('\n').count();
                    i = end + close.len();
                    continue;
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let end = j.min(b.len());
                out.push((line, code[start..end].to_string()));
                line += code[start..end].matches('\n').count();
                i = end + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// No message of the library names a command-line flag: string literals outside
/// `src/cli` (and outside tests and comments) hold no `--flag`.
#[test]
fn library_messages_name_no_command_line_flag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "cli") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs")
                || p.ends_with("main.rs")
                || p.ends_with("tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // Unit tests sit at the end of a file.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            for (line, lit) in string_literals(code) {
                for (i, _) in lit.match_indices("--") {
                    if lit[i + 2..].starts_with(|c: char| c.is_ascii_lowercase()) {
                        found.push(format!("{}:{line}: {lit}", p.display()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "flags in library messages:\n{}",
        found.join("\n")
    );
}

/// Every `.rs` file under `src/`, with its text.
fn sources() -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p, text));
            }
        }
    }
    out
}

/// The tree keeps the shape issue 21 gave it: dependencies point down (the formats and
/// the file-system infrastructure use nothing that opens disks, copies or runs commands),
/// no file over ~900 lines, no function over ~150 lines of code.
#[test]
fn the_tree_keeps_its_shape() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    const ABOVE: [&str; 11] = [
        "crate::layer",
        "crate::chain",
        "crate::resolve",
        "crate::dependents",
        "crate::copy",
        "crate::ops",
        "crate::rw",
        "crate::write",
        "crate::serve",
        "crate::recovery",
        "crate::cleanup",
    ];
    let mut wrong = Vec::new();
    for (p, text) in sources() {
        let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let bottom = rel.starts_with("format/")
            || rel.starts_with("guest/")
            || [
                "io.rs",
                "guard.rs",
                "output.rs",
                "hooks.rs",
                "units.rs",
                "error.rs",
                "disk.rs",
                "mem.rs",
            ]
            .contains(&rel.as_str());
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        if bottom && !rel.ends_with("tests.rs") {
            for (n, line) in code.lines().enumerate() {
                let l = line.trim_start();
                if !l.starts_with("//") && ABOVE.iter().any(|m| l.contains(m)) {
                    wrong.push(format!("{rel}:{}: reaches up: {l}", n + 1));
                }
            }
        }
        let lines = text.lines().count();
        if lines > 950 {
            wrong.push(format!("{rel}: {lines} lines"));
        }
        // Functions: from `fn` to the closing brace at the same indent, code lines only.
        let all: Vec<&str> = text.lines().collect();
        for (i, line) in all.iter().enumerate() {
            let t = line.trim_start();
            let indent = line.len() - t.len();
            let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
                .iter()
                .any(|k| t.starts_with(k));
            if !is_fn || t.ends_with(';') {
                continue;
            }
            let close = " ".repeat(indent) + "}";
            let Some(end) = all[i + 1..]
                .iter()
                .position(|l| l.starts_with(&close) && l.trim() == "}")
            else {
                continue;
            };
            let code_lines = all[i..=i + 1 + end]
                .iter()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("//"))
                .count();
            if code_lines > 160 {
                wrong.push(format!(
                    "{rel}:{}: a function of {code_lines} lines: {t}",
                    i + 1
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
