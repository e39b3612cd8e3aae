//! The vmkfstools front end: `vmdkit vmkfstools ARGS…`, or the binary invoked as
//! `vmkfstools` through a link. The classic flags are mapped onto vmdkit's commands, so a
//! backup script written for vmkfstools runs unchanged off-host:
//!
//! | vmkfstools | vmdkit |
//! |---|---|
//! | `-c SIZE [-d TYPE] [-a ADAPTER] DISK` | `create DISK --size SIZE -d TYPE -a ADAPTER` |
//! | `-i SRC [-d TYPE] [-a ADAPTER] DST` | `import SRC DST -d TYPE -a ADAPTER` |
//!
//! (TYPE defaults to zeroedthick, as in vmkfstools, for both.)
//! | `-X SIZE DISK` | `extend DISK --size SIZE` |
//! | `-e DST SRC` | `export SRC DST -d split` (ESX 2.5 export: 2 GB pieces) |
//! | `-e DISK` | `check DISK` (ESXi: check the disk's chain for consistency) |
//! | `-m DISK` | `commit DISK.REDO` (or DISK itself when it is the REDO log) |
//! | `-r DEVICE DISK` / `-z DEVICE DISK` | `rdm create DISK --device DEVICE [--physical]` |
//! | `-q DISK` | `rdm query DISK` |
//! | `-g DISK` | `geometry DISK` |
//! | `-l [DIR] [-h] [-M]` | `ls [DIR] [-H] [-M]` |
//! | `-x check DISK` / `-x repair DISK` | `check DISK` / `check --repair DISK` |

use std::process::ExitCode;

use anyhow::{bail, Result};

use super::Ui;

const TABLE: &str = "\
vmkfstools front end: the classic flags, run by vmdkit's commands.
  -c SIZE [-d TYPE] [-a ADAPTER] DISK    create DISK --size SIZE -d TYPE -a ADAPTER
  -i SRC [-d TYPE] [-a ADAPTER] DST      import SRC DST -d TYPE -a ADAPTER (clone)
  -X SIZE [-d zeroedthick|eagerzeroedthick] DISK
                                         extend DISK --size SIZE (new space of a thick
                                         disk is allocated, and reads as zeros)
  -e DST SRC                             export SRC DST -d split (ESX 2.5 export)
  -e DISK                                check DISK (ESXi: chain consistency)
  -m DISK                                commit DISK.REDO (or DISK, a REDO log)
  -r DEVICE DISK | -z DEVICE DISK        rdm create DISK --device DEVICE [--physical]
  -q DISK                                rdm query DISK
  -g DISK                                geometry DISK
  -l [DIR] [-h] [-M]                     ls [DIR] [-H] [-M]
  -x check|repair DISK                   check [--repair] DISK
TYPE: zeroedthick (the default, as in vmkfstools), thin, eagerzeroedthick, 2gbsparse
(and vmdkit's names).
SIZE: 40G, 512m, 1.5t, 2048k, 83886080s, or bytes.";

/// Flags that exist in vmkfstools but not here, with what to use instead.
fn unsupported(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "-U" | "--deletevirtualdisk" => "delete the descriptor and its extents with rm (vmdkit ls shows them)",
        "-E" | "--renamevirtualdisk" => "rename with `vmdkit import SRC DST` (a copy) and rm the old files; a rename in place would leave the descriptor's extent names wrong",
        "-C" | "--createfs" | "-S" | "--setfsname" | "-G" | "--growfs" | "-Z" | "--spanfs" => {
            "VMFS file systems are not vmdkit's business: use ESXi's vmkfstools"
        }
        "-P" | "--queryfs" => "file system queries: use df on the host; `vmdkit info DISK` describes a disk",
        "-w" | "--writezeros" => "`vmdkit write DISK --offset 0 --zero SIZE` writes zeros (zeroed grains where the format has them)",
        "-j" | "--inflatedisk" => "`vmdkit import DISK NEW -d eagerzeroedthick` inflates a thin disk into a new one",
        "-K" | "--punchzero" => "`vmdkit import DISK NEW -d thin` copies it leaving every zero grain out",
        "-k" | "--eagerzero" => "`vmdkit import DISK NEW -d eagerzeroedthick`",
        "-D" | "--dumpfile" | "-t" => "`vmdkit map DISK` (allocation) and `vmdkit info DISK`",
        "-L" | "--lock" | "-B" | "--breaklock" => "SCSI reservations are ESXi's; vmdkit locks files with flock while it writes",
        "-y" | "--reclaimBlocks" => "space reclamation happens in the VMFS driver",
        "-s" | "--rescanvmfs" => "rescans are ESXi's",
        "-M" | "--migratevirtualdisk" => "-M lists mappings with -l here; to migrate a disk, `vmdkit import`",
        _ => return None,
    })
}

/// Parse vmkfstools arguments and run the matching vmdkit command. `--help` prints the
/// table (exit 0); no arguments, or arguments that are not a vmkfstools command line,
/// are a usage error (exit 64, as every other usage error), the table on stderr.
pub(super) fn run(args: &[String], ui: Ui) -> Result<ExitCode> {
    use std::io::Write as _;
    let help = args.iter().any(|a| a == "--help" || a == "-H");
    let argv = match translate(args) {
        Ok(v) => v,
        Err(e) => {
            note!("{e:#}");
            return Ok(ExitCode::from(super::EX_USAGE));
        }
    };
    if argv.is_empty() {
        if help {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{TABLE}")?;
            out.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        note!("vmkfstools: no operation given\n\n{TABLE}");
        return Ok(ExitCode::from(super::EX_USAGE));
    }
    super::run_args(&argv, ui)
}

/// The vmdkit command line for vmkfstools `args` (empty: print the table).
pub(super) fn translate(args: &[String]) -> Result<Vec<String>> {
    match parse(args)? {
        Some(p) => to_vmdkit(p),
        None => Ok(Vec::new()),
    }
}

/// A vmkfstools command line, read.
struct Parsed {
    /// The operation (its flag) and its value.
    op: Option<(&'static str, String)>,
    /// `-d`.
    kind: Option<String>,
    /// `-a`.
    adapter: Option<String>,
    /// `-h`.
    human: bool,
    /// `-M`.
    mappings: bool,
    /// The other arguments (disks, folders).
    rest: Vec<String>,
}

/// Read vmkfstools' flags; None for `--help`.
fn parse(args: &[String]) -> Result<Option<Parsed>> {
    let mut op: Option<(&'static str, String)> = None;
    let mut kind: Option<String> = None;
    let mut adapter: Option<String> = None;
    let mut human = false;
    let mut mappings = false;
    let mut rest: Vec<String> = Vec::new();
    let mut i = 0;
    let set = |op: &mut Option<(&'static str, String)>, o: &'static str, v: String| -> Result<()> {
        if let Some((prev, _)) = op {
            bail!("vmkfstools {prev} and {o} given together: one operation at a time");
        }
        *op = Some((o, v));
        Ok(())
    };
    let value = |i: &mut usize, flag: &str| -> Result<String> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("vmkfstools {flag} needs a value\n\n{TABLE}"))
    };
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "--help" | "-H" => return Ok(None),
            "-c" | "--createvirtualdisk" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-c", v)?;
            }
            "-i" | "--clonevirtualdisk" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-i", v)?;
            }
            "-X" | "--extendvirtualdisk" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-X", v)?;
            }
            "-e" | "--exportvirtualdisk" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-e", v)?;
            }
            "-m" | "--commit" => set(&mut op, "-m", String::new())?,
            "-r" | "--createrdm" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-r", v)?;
            }
            // After -X, `-z` is vmkfstools' "eager-zero the new space"; otherwise it is
            // the pass-through RDM.
            "-z" if op.as_ref().is_some_and(|(o, _)| *o == "-X") => {}
            "-z" | "--createrdmpassthru" => {
                let v = value(&mut i, a)?;
                set(&mut op, "-z", v)?;
            }
            "-q" | "--queryrdm" => set(&mut op, "-q", String::new())?,
            "-g" | "--geometry" => set(&mut op, "-g", String::new())?,
            "-l" | "--list" => set(&mut op, "-l", String::new())?,
            "-x" | "--fix" => {
                let v = value(&mut i, a)?;
                if v != "check" && v != "repair" {
                    bail!("vmkfstools -x takes check or repair, not `{v}`");
                }
                set(&mut op, "-x", v)?;
            }
            "-d" | "--diskformat" => {
                let v = value(&mut i, a)?;
                if let Some(prev) = kind.replace(v.clone()) {
                    bail!(
                        "vmkfstools -d given twice (`{prev}`, then `{v}`): say the disk type once"
                    );
                }
            }
            "-a" | "--adaptertype" => adapter = Some(value(&mut i, a)?),
            "-h" | "--humanreadable" => human = true,
            "-M" => mappings = true,
            "-v" | "--verbose" => {
                let _ = value(&mut i, a)?;
            }
            _ if a.starts_with('-') && a.len() > 1 => {
                return Err(match unsupported(a) {
                    Some(instead) => {
                        anyhow::anyhow!("vmkfstools {a} is not supported here: {instead}")
                    }
                    None => anyhow::anyhow!("unknown vmkfstools option `{a}`\n\n{TABLE}"),
                });
            }
            _ => rest.push(a.to_string()),
        }
        i += 1;
    }
    Ok(Some(Parsed {
        op,
        kind,
        adapter,
        human,
        mappings,
        rest,
    }))
}

/// The vmdkit command line that does what a vmkfstools one asks.
fn to_vmdkit(p: Parsed) -> Result<Vec<String>> {
    let Parsed {
        op,
        kind,
        adapter,
        human,
        mappings,
        rest,
    } = p;
    let Some((o, v)) = op else {
        if mappings {
            bail!(
                "vmkfstools -M: {}",
                unsupported("-M").unwrap_or("migration is ESXi's")
            );
        }
        if rest.is_empty() {
            return Ok(Vec::new());
        }
        bail!("no vmkfstools operation given\n\n{TABLE}");
    };
    let one = |what: &str| -> Result<String> {
        match rest.as_slice() {
            [d] => Ok(d.clone()),
            _ => bail!(
                "vmkfstools {o} takes one {what} ({} given)\n\n{TABLE}",
                rest.len()
            ),
        }
    };
    let mut out: Vec<String> = Vec::new();
    let s = |x: &str| x.to_string();
    let disk_type = |k: Option<String>| -> Option<String> {
        k.map(|k| match k.as_str() {
            // vmkfstools' RDM forms name a device: not a disk type vmdkit writes here.
            k if k.starts_with("rdm:") || k.starts_with("rdmp:") => k.to_string(),
            _ => k,
        })
    };
    match o {
        "-c" => {
            out.extend([s("create"), one("disk")?, s("--size"), v]);
            out.extend([s("-d"), disk_type(kind).unwrap_or_else(|| s("zeroedthick"))]);
            if let Some(a) = adapter {
                out.extend([s("-a"), a]);
            }
        }
        "-i" => {
            let dst = one("destination")?;
            if let Some(k) = kind.as_deref().filter(|k| k.starts_with("rdm")) {
                bail!("vmkfstools -i -d {k}: cloning onto a device: `vmdkit import SRC DEVICE -d raw --allow-device-write`, then `vmdkit rdm create`");
            }
            out.extend([s("import"), v, dst]);
            // vmkfstools clones to zeroedthick unless told otherwise (vmdkit's import
            // defaults to thin).
            out.extend([s("-d"), disk_type(kind).unwrap_or_else(|| s("zeroedthick"))]);
            if let Some(a) = adapter {
                out.extend([s("-a"), a]);
            }
        }
        "-X" => {
            // vmkfstools -X -d eagerzeroedthick zeroes the new space of a thick disk:
            // extend allocates a thick disk's new space, which reads as zeros.
            match kind.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("zeroedthick") | Some("eagerzeroedthick") => {}
                Some(k) => bail!(
                    "vmkfstools -X -d {k}: extend keeps the disk's own type (thick disks get their new space allocated); \
                     to change the type, `vmdkit import DISK NEW -d {k}`"
                ),
            }
            out.extend([s("extend"), one("disk")?, s("--size"), v])
        }
        // ESXi's -e DISK checks a disk's chain; ESX 2.5's -e DST SRC exports.
        "-e" if rest.is_empty() => out.extend([s("check"), v]),
        "-e" => out.extend([s("export"), one("source disk")?, v, s("-d"), s("split")]),
        "-m" => {
            let d = one("disk")?;
            let redo = if d.ends_with(".REDO") {
                d
            } else {
                format!("{d}.REDO")
            };
            out.extend([s("commit"), redo]);
        }
        "-r" | "-z" => {
            out.extend([s("rdm"), s("create"), one("disk")?, s("--device"), v]);
            if o == "-z" {
                out.push(s("--physical"));
            }
        }
        "-q" => out.extend([s("rdm"), s("query"), one("disk")?]),
        "-g" => out.extend([s("geometry"), one("disk")?]),
        "-l" => {
            out.push(s("ls"));
            match rest.as_slice() {
                [] => {}
                [d] => out.push(d.clone()),
                _ => bail!("vmkfstools -l takes at most one folder"),
            }
            if human {
                out.push(s("-H"));
            }
            if mappings {
                out.push(s("-M"));
            }
        }
        "-x" => {
            out.extend([s("check"), one("disk")?]);
            if v == "repair" {
                out.push(s("--repair"));
            }
        }
        _ => unreachable!("every operation is matched"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &str) -> Vec<String> {
        let a: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        translate(&a).unwrap()
    }

    #[test]
    fn vmkfstools_flags_map_onto_commands() {
        assert_eq!(
            t("-c 10G -d thin -a lsilogic vm.vmdk"),
            ["create", "vm.vmdk", "--size", "10G", "-d", "thin", "-a", "lsilogic"]
        );
        assert_eq!(
            t("-i src.vmdk -d zeroedthick dst.vmdk"),
            ["import", "src.vmdk", "dst.vmdk", "-d", "zeroedthick"]
        );
        assert_eq!(
            t("-i src.vmdk dst.vmdk"),
            ["import", "src.vmdk", "dst.vmdk", "-d", "zeroedthick"]
        );
        assert_eq!(
            t("-c 1G vm.vmdk"),
            ["create", "vm.vmdk", "--size", "1G", "-d", "zeroedthick"]
        );
        assert_eq!(t("-X 20G vm.vmdk"), ["extend", "vm.vmdk", "--size", "20G"]);
        assert_eq!(
            t("-X 20G -z vm.vmdk"),
            ["extend", "vm.vmdk", "--size", "20G"]
        );
        assert_eq!(
            t("-e out.vmdk vm.vmdk"),
            ["export", "vm.vmdk", "out.vmdk", "-d", "split"]
        );
        assert_eq!(t("-m vm.vmdk"), ["commit", "vm.vmdk.REDO"]);
        assert_eq!(t("-m vm.vmdk.REDO.REDO"), ["commit", "vm.vmdk.REDO.REDO"]);
        assert_eq!(
            t("-z /dev/sdb rdm.vmdk"),
            [
                "rdm",
                "create",
                "rdm.vmdk",
                "--device",
                "/dev/sdb",
                "--physical"
            ]
        );
        assert_eq!(
            t("-r /dev/sdb rdm.vmdk"),
            ["rdm", "create", "rdm.vmdk", "--device", "/dev/sdb"]
        );
        assert_eq!(t("-q rdm.vmdk"), ["rdm", "query", "rdm.vmdk"]);
        assert_eq!(t("-g vm.vmdk"), ["geometry", "vm.vmdk"]);
        assert_eq!(t("-l -h -M /vol"), ["ls", "/vol", "-H", "-M"]);
        assert_eq!(t("-x repair vm.vmdk"), ["check", "vm.vmdk", "--repair"]);
        assert!(t("").is_empty());
        for bad in [
            "-U vm.vmdk",
            "-c 1G a b",
            "-c",
            "-x fix vm.vmdk",
            "-Q vm.vmdk",
            "-c 1G -X 2G vm.vmdk",
        ] {
            let a: Vec<String> = bad.split_whitespace().map(str::to_string).collect();
            assert!(translate(&a).is_err(), "{bad}");
        }
        let err = translate(&["-U".into(), "vm.vmdk".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rm"), "{err}");
    }
}
