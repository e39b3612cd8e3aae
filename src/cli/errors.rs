//! How errors are said: messages as people read them, the flag that lets a refused
//! command go ahead, JSON error objects, exit codes of usage errors.

use super::*;

/// How far a write into a pipe got before it broke (the offset of the failed write).
pub(super) fn bytes_through(e: &anyhow::Error) -> Option<u64> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<vmdkit::Error>() {
            Some(vmdkit::Error::Io { offset, .. }) => Some(*offset),
            _ => None,
        })
}

pub(super) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<vmdkit::Error>()
                .is_some_and(|v| v.is_broken_pipe())
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// qemu-img's flags, typed from habit: what vmdkit calls them (instead of clap's advice
/// to pass them after `--`).
pub(super) fn qemu_habit(argv: &[std::ffi::OsString]) -> Option<String> {
    let args: Vec<&str> = argv.iter().skip(1).filter_map(|a| a.to_str()).collect();
    args.iter().enumerate().find_map(|(i, &a)| {
        // `cat --output FILE` is vmdkit's own; `--output json|human` is qemu-img's.
        let qemu_output = a == "--output=json"
            || a == "--output=human"
            || (a == "--output" && matches!(args.get(i + 1), Some(&"json") | Some(&"human")));
        Some(match a {
            "-p" => "-p is qemu-img's progress flag: vmdkit shows a progress bar on its own when stderr is a terminal (-q hides it)".to_string(),
            "-O" => "-O FMT is qemu-img's output format: vmdkit's is -d TYPE (`vmdkit export SRC DST -d stream`; `vmdkit export --help` lists the types)".to_string(),
            _ if qemu_output => {
                "--output=json is qemu-img's: vmdkit's is --json (before or after the command)".to_string()
            }
            _ => return None,
        })
    })
}

/// Exit code of a usage error (sysexits' EX_USAGE): not check's "corruption" (2).
pub(super) const EX_USAGE: u8 = 64;

/// Print clap's help, version or usage error and give its exit code: 0 for help and
/// version (also into a closed pipe, as `| head` is), 1 when they could not be written
/// (a full disk), 64 for a usage error.
pub(super) fn clap_exit(e: &clap::Error) -> ExitCode {
    let shown = e.print();
    let help = matches!(
        e.kind(),
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
    );
    match shown {
        Err(io) if help && io.kind() != std::io::ErrorKind::BrokenPipe => {
            note!("vmdkit: error: writing the help: {io}");
            ExitCode::FAILURE
        }
        _ if help => ExitCode::SUCCESS,
        _ => ExitCode::from(EX_USAGE),
    }
}

/// A compressed input's hint names `vmdkit import - out.vmdk`; say the command that
/// was run instead, with `-` in place of the file it named.
pub(super) fn with_stdin_hint(msg: &str) -> String {
    const GENERIC: &str = "vmdkit import - out.vmdk";
    if !msg.contains(GENERIC) {
        return msg.to_string();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The argument that is a compressed file (gzip, xz, zstd, bzip2 magic).
    let compressed = |a: &str| {
        let mut m = [0u8; 4];
        std::fs::File::open(a)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut m))
            .is_ok()
            && (m[..2] == [0x1f, 0x8b]
                || m == [0xfd, b'7', b'z', b'X']
                || m == [0x28, 0xb5, 0x2f, 0xfd]
                || m[..3] == *b"BZh")
    };
    match args
        .iter()
        .position(|a| msg.contains(&format!("`{a}`")) && compressed(a))
    {
        Some(i) => {
            let mut cmd = args.clone();
            cmd[i] = "-".into();
            msg.replace(GENERIC, &format!("vmdkit {}", cmd.join(" ")))
        }
        None => msg.to_string(),
    }
}

/// An error under `--json`: one object on stderr, `{"error": {"kind", "message",
/// "file", "offset"}}` (kind: io, corrupt, descriptor, chain, unsupported, invalid_input,
/// already_exists, busy, refused, not_applicable, or usage for what the command line itself
/// refuses).
pub(super) fn error_json(e: &anyhow::Error) -> String {
    let lib = e.chain().find_map(|c| c.downcast_ref::<vmdkit::Error>());
    let kind = lib.map_or("usage".to_string(), |l| {
        let k = format!("{:?}", l.kind());
        let mut out = String::new();
        for (i, ch) in k.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        }
        out
    });
    let v = serde_json::json!({"error": {
        "kind": kind,
        "message": describe(e),
        "file": lib.and_then(|l| l.file()).map(|p| p.display().to_string()),
        "offset": lib.and_then(|l| l.offset()),
    }});
    v.to_string()
}

/// An error as the command line says it: the library's message as a person reads it
/// ([`for_people`]), and the flag that would let the command go ahead, when one would.
pub(super) fn describe(e: &anyhow::Error) -> String {
    let msg = for_people(&format!("{e:#}"));
    let hint = e
        .chain()
        .find_map(|c| c.downcast_ref::<vmdkit::Error>())
        .and_then(|l| Some((l, l.overridable_by()?)))
        .map(|(l, o)| match o {
            vmdkit::Override::Force if l.kind() == vmdkit::ErrorKind::AlreadyExists => {
                "use --force to overwrite"
            }
            vmdkit::Override::Force => "pass --force to go ahead anyway",
            vmdkit::Override::AllowDeviceWrite => "pass --allow-device-write to write into devices",
            vmdkit::Override::IgnoreCid => "use --ignore-cid to read anyway",
            vmdkit::Override::Branch => "pass --branch to branch on purpose",
            vmdkit::Override::Large => "pass --large if the disk really is that large",
            vmdkit::Override::AllowOutsidePaths => {
                "pass --allow-outside-paths if the disk's files are kept elsewhere"
            }
            _ => "",
        });
    // The library says what to do in words; the command line names its own flags.
    let msg = msg
        .replace(
            "import that as a raw disk image",
            "import that as a raw disk image (`vmdkit import --from raw disk.img out.vmdk`)",
        )
        .replace(
            "import those as a raw disk image of that size from standard input (`head -c SIZE FILE`)",
            "import those as a raw disk image of that size from standard input (`head -c SIZE FILE | vmdkit import --from raw --size SIZE - out.vmdk`)",
        )
        .replace(
            "import it as a raw disk image",
            "import it as a raw disk image (`vmdkit import --from raw FILE out.vmdk`)",
        )
        .replace(
            "import it as one",
            "import it as one (`vmdkit import --from raw FILE out.vmdk`)",
        );
    match hint {
        Some(h) if !h.is_empty() => format!("{msg} ({h})"),
        _ => msg,
    }
}

/// An error message as a person reads it: no `at offset 0x0` where no offset matters, no
/// `(os error N)` tails, and a temporary's name (`.NAME.vmdkit-tmp.PID.N`) replaced by the
/// output it was to become.
pub(super) fn for_people(msg: &str) -> String {
    let mut out = msg.replace(" at offset 0x0", "");
    // `(os error 2)` and the like.
    while let Some(i) = out.find(" (os error ") {
        match out[i..].find(')') {
            Some(j) => out.replace_range(i..i + j + 1, ""),
            None => break,
        }
    }
    // Temporaries: `DIR/.NAME.vmdkit-tmp.PID.N` -> `DIR/NAME (being written)`.
    let mut rest = out.as_str();
    let mut done = String::new();
    while let Some(i) = rest.find(".vmdkit-tmp.") {
        let head = &rest[..i];
        let start = head.rfind(['/', '`', ' ']).map_or(0, |k| k + 1);
        let tail = &rest[i + ".vmdkit-tmp.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tail.len());
        // The number part may end in a sentence's full stop.
        let end = if tail[..end].ends_with('.') {
            end - 1
        } else {
            end
        };
        let name = head[start..].strip_prefix('.').unwrap_or(&head[start..]);
        done.push_str(&head[..start]);
        done.push_str(name);
        done.push_str(" (being written)");
        rest = &tail[end..];
    }
    done.push_str(rest);
    done
}

#[cfg(test)]
mod tests {
    use super::for_people;

    /// Issue 22 item 6: messages as people read them.
    #[test]
    fn messages_lose_zero_offsets_os_error_tails_and_temporary_names() {
        assert_eq!(
            for_people(
                "failed to stat `x.vmdk` at offset 0x0: No such file or directory (os error 2)"
            ),
            "failed to stat `x.vmdk`: No such file or directory"
        );
        assert_eq!(
            for_people("failed to write (the disk is full) `/b/.vm-s001.vmdk.vmdkit-tmp.4711.0` at offset 0x10000: No space left on device (os error 28)"),
            "failed to write (the disk is full) `/b/vm-s001.vmdk (being written)` at offset 0x10000: No space left on device"
        );
        assert_eq!(
            for_people("renaming .a.vmdk.vmdkit-tmp.12.3. Then"),
            "renaming a.vmdk (being written). Then"
        );
    }
}
