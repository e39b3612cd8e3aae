//! The command line's vocabulary: every subcommand's arguments (clap derive). `mod.rs`
//! runs them. One vocabulary throughout: `-d/--type` takes the same disk-type names
//! everywhere a disk is written, sizes and offsets take units (`1.5G`, `512MiB`, `8s`),
//! `-` means stdin or stdout, and `--json` / `-q` work on every command.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use vmdkit::SourceMode;
use vmdkit::{Chain, OpenOptions};

use super::adapter_arg;

#[derive(Parser)]
#[command(
    name = "vmdkit",
    version,
    about = "VMware virtual disk (VMDK) toolkit: inspect, export, import, commit",
    after_help = "Exit codes: 0 success; 1 error; check: 2 corruption, 3 leaks only; verify: 4 content differs; 64 usage error; 128+N killed by signal N.\nAs `vmdkit vmkfstools ARGS` (or through a link named vmkfstools) it takes vmkfstools' flags."
)]
pub(super) struct Cli {
    /// Follow extent and parent names that lead out of the descriptor's folder (through
    /// symbolic links or absolute paths). Without it, only block devices named by device
    /// and RDM descriptors may lie outside.
    #[arg(long, global = true)]
    pub(super) allow_outside_paths: bool,
    /// Print the command's result as one JSON object on stdout (on stderr when stdout
    /// carries data).
    #[arg(long, global = true)]
    pub(super) json: bool,
    /// No progress bar and no summary on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    pub(super) quiet: bool,
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

/// `--allow-outside-paths`, given once for the whole command line (the vmkfstools front
/// end passes it on to the commands it runs).
static OUTSIDE_PATHS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(super) fn set_outside_paths(allow: bool) {
    OUTSIDE_PATHS.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `--allow-outside-paths` was given.
pub(super) fn outside_paths() -> bool {
    OUTSIDE_PATHS.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(clap::Args, Clone)]
pub(super) struct ReadArgs {
    /// Read through a parent whose CID does not match the child's parentCID (warns).
    #[arg(long)]
    pub(super) ignore_cid: bool,
    /// The source's format: `vmdk` (default: any VMDK and its chain) or `raw` (a raw
    /// disk image file or block device).
    #[arg(long, value_name = "FORMAT", default_value = "vmdk", value_parser = Offer(|| vec!["vmdk", "raw"]))]
    pub(super) from: String,
    /// Memory-map source files instead of positional reads (resident memory then grows
    /// with what is read).
    #[arg(long, hide = true)]
    pub(super) mmap: bool,
}

impl ReadArgs {
    pub(super) fn raw(&self) -> Result<bool> {
        match self.from.to_ascii_lowercase().as_str() {
            "vmdk" => Ok(false),
            "raw" | "img" => Ok(true),
            other => anyhow::bail!(
                "--from {other}: vmdkit reads `vmdk` and `raw`; convert other formats to raw first (qemu-img convert -O raw)"
            ),
        }
    }

    /// How the command opens its disk.
    pub(super) fn options(&self) -> OpenOptions {
        let mut o = OpenOptions::default();
        o.ignore_cid = self.ignore_cid;
        o.mode = if self.mmap {
            SourceMode::Mmap
        } else {
            SourceMode::Pread
        };
        o.allow_outside_paths = outside_paths();
        o.index_progress = Some(super::index_progress);
        o
    }

    pub(super) fn open(&self, path: &Path) -> Result<Chain> {
        let mut opts = self.options();
        // Commands that only read take a half-applied disk as the point it reads as
        // (and say so); every command that writes refuses it.
        opts.read_pending = true;
        if self.raw()? {
            return Ok(Chain::open_raw(path, &opts)?);
        }
        // Library errors name the file (and offset) already.
        let chain = Chain::open(path, &opts)?;
        for w in chain.warnings() {
            note!("vmdkit: warning: {w}");
        }
        Ok(chain)
    }
}

#[derive(Subcommand)]
pub(super) enum Cmd {
    /// Describe a disk and its chain: type, capacity, extents, CIDs, layers.
    Info(InfoArgs),
    /// Allocation runs of the disk through its chain (metadata only).
    Map(MapArgs),
    /// The disk's logical content as raw bytes (chain flattened).
    Cat(CatArgs),
    /// Copy a disk or a whole chain (flattened) to compact files or stdout; or, with
    /// --delta, only what the top delta adds (an increment).
    Export(ExportArgs),
    /// REDO logs and snapshot deltas.
    Redo {
        #[command(subcommand)]
        cmd: RedoCmd,
    },
    /// Write bytes (from FILE or stdin) or zeros into the top layer of a chain.
    Write(WriteArgs),
    /// Merge the top delta (COWD, SESparse or hosted sparse) into its parent, offline.
    Commit(CommitArgs),
    /// Restore: a disk or chain (flattened), a raw image, or a stream on stdin (`-`), into
    /// a new disk (or `-`: a stream on stdout).
    Import(ImportArgs),
    /// Write an increment (`export --delta`) into a restored disk, after checking that
    /// the disk holds the increment's parent (its CID = the increment's parentCID).
    /// Crash-safe: a killed apply is finished by running it again.
    Apply(ApplyArgs),
    /// What an export would write, without writing it: exact sizes for sparse, split,
    /// flat and raw outputs; a bound and an estimate for streams.
    Measure(MeasureArgs),
    /// Create an empty disk (vmkfstools -c).
    Create(CreateArgs),
    /// Grow a disk (vmkfstools -X).
    Extend(ExtendArgs),
    /// Print the disk's geometry (vmkfstools -g).
    Geometry(GeometryArgs),
    /// Raw device mappings.
    Rdm {
        #[command(subcommand)]
        cmd: RdmCmd,
    },
    /// List the disks in a folder with their extents and deltas (vmkfstools -l).
    Ls(LsArgs),
    /// Check every layer of a chain; --repair mends what has one right answer.
    Check(CheckArgs),
    /// Check a disk's content (or a stream on stdin) against a manifest written by
    /// `export --manifest`.
    Verify(VerifyArgs),
    /// Serve a disk, chain or backup read-only over NBD (a Unix socket or TCP) until
    /// stopped with Ctrl-C: for file-level restore without a restore.
    Serve(ServeArgs),
    /// Shell completions for bash, zsh or fish, on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The manual pages (roff): vmdkit(1) on stdout, or with --dir every page
    /// (vmdkit.1 and one per command, vmdkit-export.1 ...) written into DIR.
    #[command(
        after_help = "Examples:\n  vmdkit man > vmdkit.1\n  mkdir -p ~/.local/share/man/man1 && vmdkit man --dir ~/.local/share/man/man1\n\nExit: 0 written, 1 error, 64 usage error."
    )]
    Man {
        /// Write every page into this folder (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// vmkfstools' flags, mapped onto these commands (see `vmdkit vmkfstools -h`).
    #[command(disable_help_flag = true)]
    Vmkfstools {
        /// The vmkfstools arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Arguments of `info`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit info vm-000002.vmdk\n  vmdkit info --json vm.vmdk | jq .capacity\n\n",
    "Exit: 0 success; 1 error (a broken chain still shows the layer named, with the reason)."
))]
pub(super) struct InfoArgs {
    /// The disk (descriptor or sparse file); the top of a chain.
    pub(super) disk: PathBuf,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `map`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit map vm.vmdk\n  vmdkit map --json vm.vmdk   # the records of qemu-img map --output=json\n\n",
    "Exit: 0 success, 1 error, 64 usage error."
))]
pub(super) struct MapArgs {
    /// The disk.
    pub(super) disk: PathBuf,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `cat`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit cat vm-000001.vmdk | dd of=/dev/sdb bs=1M\n  vmdkit cat vm.vmdk -o vm.img   # zero ranges become holes\n\n",
    "Exit: 0 success (also when the reader closes the pipe), 1 error, 64 usage error."
))]
pub(super) struct CatArgs {
    /// The disk.
    pub(super) disk: PathBuf,
    /// Write to FILE (zero ranges become holes) instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub(super) output: Option<PathBuf>,
    /// Overwrite FILE if it exists; write binary data to a terminal.
    #[arg(long)]
    pub(super) force: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `export`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit export vm-000002.vmdk /backup/          # split sparse, vm-000002.vmdk inside /backup\n",
    "  vmdkit export vm.vmdk - | mbuffer -o /dev/nst0  # streamOptimized on stdout\n",
    "  vmdkit export vm-000003.vmdk - --delta > inc3.vmdk\n\n",
    "Exit: 0 success, 1 error (outputs are removed), 64 usage error."
))]
pub(super) struct ExportArgs {
    /// Source disk (the top of a chain: the output looks as if it were committed).
    pub(super) src: PathBuf,
    /// Destination path, an existing folder (the source's name inside it), or `-` for
    /// stdout.
    pub(super) dst: PathBuf,
    /// Disk type: streamOptimized (stream), monolithicSparse (sparse),
    /// twoGbMaxExtentSparse (split, 2gbsparse), monolithicFlat (flat),
    /// twoGbMaxExtentFlat (2gbflat), thin (vmfs), zeroedthick, eagerzeroedthick, raw.
    /// Default: split for a path, stream for stdout.
    #[arg(
        long = "type",
        short = 'd',
        visible_alias = "format",
        visible_short_alias = 'f',
        value_parser = Offer(disk_types),
        hide_possible_values = true
    )]
    pub(super) kind: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
    /// zlib level for streamOptimized, 0 to 9 (default 6).
    #[arg(long)]
    pub(super) level: Option<u32>,
    /// Also write a CRC-32 manifest of the content (per MiB and whole). With --delta it
    /// covers the whole chain: `verify` checks a restore after `apply`.
    #[arg(long)]
    pub(super) manifest: Option<PathBuf>,
    /// Write an increment: only the grains the top layer (a delta or REDO log) holds,
    /// zeroed ones included, as a stream whose parentCID is the content ID of the disk
    /// below (what restoring its backup leaves). Restore with `import`, then `apply`.
    #[arg(long)]
    pub(super) delta: bool,
    /// With --delta: the parentFileNameHint recorded (default: the parent's file name).
    #[arg(long, value_name = "NAME", requires = "delta")]
    pub(super) parent_hint: Option<String>,
    /// Leave out what the guest's file systems call free (ext2/3/4, FAT, NTFS in MBR or
    /// GPT partitions, read through the chain): deleted files' old bytes are not copied.
    /// The output is then file-identical to the source, not byte-identical.
    #[arg(long)]
    pub(super) guest_aware: bool,
    /// Overwrite existing outputs; allow binary output to a terminal.
    #[arg(long)]
    pub(super) force: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `write`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit write vm.vmdk.REDO --offset 1M patch.bin\n  vmdkit write vm-000001.vmdk --offset 2G --zero 64k\n\n",
    "Exit: 0 success, 1 error (nothing written when refused), 64 usage error."
))]
pub(super) struct WriteArgs {
    /// The disk (top of the chain).
    pub(super) disk: PathBuf,
    /// Offset: bytes or a size with a unit (512s, 1M, 1.5G); a multiple of 512.
    #[arg(long)]
    pub(super) offset: String,
    /// Write LEN zero bytes instead of data (zeroed grains where the format has them).
    #[arg(long, value_name = "LEN")]
    pub(super) zero: Option<String>,
    /// Input file, or `-` for stdin (the default).
    pub(super) input: Option<PathBuf>,
    /// Allow writing into block devices and fullDevice / partitionedDevice / vmfsRaw disks.
    #[arg(long)]
    pub(super) allow_device_write: bool,
    /// Write although other deltas name this disk as their parent (breaks them).
    #[arg(long)]
    pub(super) force: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `commit`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit commit vm.vmdk.REDO            # vmkfstools -m\n  vmdkit commit vm-000003.vmdk --all --dry-run\n\n",
    "Exit: 0 committed, 1 error or refused (nothing changed). A killed commit is finished by running it again."
))]
pub(super) struct CommitArgs {
    /// The top delta.
    pub(super) disk: PathBuf,
    /// Merge every delta into the base.
    #[arg(long)]
    pub(super) all: bool,
    /// Print what would be written and removed; change nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Commit although another delta in the folder names the same parent.
    #[arg(long)]
    pub(super) force: bool,
    /// Allow committing into a fullDevice / partitionedDevice / vmfsRaw parent.
    #[arg(long)]
    pub(super) allow_device_write: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
}

/// Arguments of `apply`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit import - vm.vmdk < full.vmdk && vmdkit apply vm.vmdk - < inc1.vmdk\n",
    "  vmdkit apply --raw --force /srv/vm.img inc2.vmdk\n\n",
    "Exit: 0 applied, 1 refused or failed (nothing written when refused), 64 usage error."
))]
pub(super) struct ApplyArgs {
    /// The restored disk to bring forward (a VMDK; with --raw a raw file or device).
    pub(super) target: PathBuf,
    /// The increment, or `-` for stdin (read strictly sequentially).
    pub(super) src: PathBuf,
    /// The target is a raw image file or block device (no CID: needs --force).
    #[arg(long)]
    pub(super) raw: bool,
    /// Skip the content-ID check (and apply although other deltas name the target).
    #[arg(long)]
    pub(super) force: bool,
    /// Allow writing into block devices and device-backed disks.
    #[arg(long)]
    pub(super) allow_device_write: bool,
    /// Worker threads inflating the increment (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
}

/// Arguments of `measure`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit measure vm.vmdk                      # a stream backup: bound and estimate\n",
    "  vmdkit measure vm-000002.vmdk --delta --json\n  vmdkit measure vm.vmdk -d split --name copy.vmdk\n\n",
    "Exit: 0 measured, 1 error, 64 usage error."
))]
pub(super) struct MeasureArgs {
    /// The disk (the top of a chain).
    pub(super) disk: PathBuf,
    /// Disk type, as export takes it (default: stream).
    #[arg(long = "type", short = 'd', visible_alias = "format", value_parser = Offer(disk_types), hide_possible_values = true)]
    pub(super) kind: Option<String>,
    /// Measure the increment of the top layer (`export --delta`).
    #[arg(long)]
    pub(super) delta: bool,
    /// zlib level for streamOptimized, 0 to 9 (default 6).
    #[arg(long)]
    pub(super) level: Option<u32>,
    /// Compress every grain for an exact stream size (as long as the export's CPU time).
    #[arg(long)]
    pub(super) exact: bool,
    /// Leave out what the guest's file systems call free (ext2/3/4, FAT, NTFS in MBR or
    /// GPT partitions, read through the chain): deleted files' old bytes are not copied.
    /// The output is then file-identical to the source, not byte-identical.
    #[arg(long)]
    pub(super) guest_aware: bool,
    /// The output's file name (names are recorded in descriptors); default: the disk's.
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `import`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit import - vm.vmdk < /dev/nst0           # restore a stream (thin vmfs)\n",
    "  vmdkit import vm-000002.vmdk clone.vmdk -d zeroedthick -a lsilogic\n",
    "  vmdkit import --from raw disk.img vm.vmdk -d sparse\n",
    "  gunzip -c disk.img.gz | vmdkit import --from raw --size 20G - vm.vmdk\n\n",
    "Exit: 0 success, 1 error (outputs are removed), 64 usage error."
))]
pub(super) struct ImportArgs {
    /// Source: a disk, a raw image (--from raw), or `-` for stdin (streamOptimized, a
    /// sparse file with its tables first, the tar stream export writes, or raw bytes
    /// with --from raw --size).
    pub(super) src: PathBuf,
    /// Destination (a raw target may be an existing device or stand-in file), an
    /// existing folder (the source's name inside it), or `-`: stdout (default type:
    /// stream).
    pub(super) dst: PathBuf,
    /// Disk type: thin (default), zeroedthick, eagerzeroedthick, monolithicSparse (sparse),
    /// twoGbMaxExtentSparse (split, 2gbsparse), monolithicFlat (flat), twoGbMaxExtentFlat
    /// (2gbflat), streamOptimized (stream), raw. (No `-f`: in qemu-img that names the
    /// input's format, which is `--from` here.)
    #[arg(long = "type", short = 'd', visible_alias = "format", value_parser = Offer(disk_types), hide_possible_values = true)]
    pub(super) kind: Option<String>,
    /// With --from raw and a pipe: the disk's size (a pipe cannot tell it).
    #[arg(long, short = 's', value_parser = size_arg)]
    pub(super) size: Option<String>,
    /// Adapter type (ide, buslogic, lsilogic, legacyESX, pvscsi); geometry recomputed.
    #[arg(long, short = 'a', value_parser = adapter_arg)]
    pub(super) adapter: Option<String>,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub(super) force: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
    /// Permit a capacity over 62 TiB (more than any VMware product makes).
    #[arg(long)]
    pub(super) large: bool,
    /// Leave out what the guest's file systems call free (ext2/3/4, FAT, NTFS in MBR or
    /// GPT partitions, read through the chain): deleted files' old bytes are not copied.
    /// The output is then file-identical to the source, not byte-identical.
    #[arg(long)]
    pub(super) guest_aware: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `create`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit create vm.vmdk --size 40G                # zeroedthick, as vmkfstools -c\n",
    "  vmdkit create small.vmdk -s 1.5G -d sparse -a pvscsi\n\n",
    "Exit: 0 created, 1 error (nothing left behind), 64 usage error."
))]
pub(super) struct CreateArgs {
    /// The new disk.
    pub(super) disk: PathBuf,
    /// Size: bytes or a number with a unit (s = sectors; k, m, g, t binary, optionally
    /// with B or iB; decimals allowed: 1.5G).
    #[arg(long, short = 's', value_parser = size_arg)]
    pub(super) size: String,
    /// Disk type, as import takes it (default zeroedthick, as vmkfstools).
    #[arg(long = "type", short = 'd', default_value = "zeroedthick", value_parser = Offer(disk_types), hide_possible_values = true)]
    pub(super) kind: String,
    /// Adapter type: ide, buslogic, lsilogic (default), legacyESX, pvscsi.
    #[arg(long, short = 'a', value_parser = adapter_arg)]
    pub(super) adapter: Option<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub(super) force: bool,
    /// Permit a capacity over 62 TiB (more than any VMware product makes).
    #[arg(long)]
    pub(super) large: bool,
}

/// Arguments of `extend`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit extend vm.vmdk --size 60G\n  vmdkit extend vm.vmdk --size +512MiB\n\n",
    "Exit: 0 extended, 1 error or refused (nothing changed), 64 usage error."
))]
pub(super) struct ExtendArgs {
    /// The disk (a base, not a delta).
    pub(super) disk: PathBuf,
    /// New size with a unit (60G), or `+N` to grow by N.
    #[arg(long, short = 's', allow_hyphen_values = true, value_parser = new_size_arg)]
    pub(super) size: String,
    /// Extend although deltas sit on the disk, or its files are marked read-only.
    #[arg(long)]
    pub(super) force: bool,
    /// Permit a capacity over 62 TiB (more than any VMware product makes).
    #[arg(long)]
    pub(super) large: bool,
}

/// Arguments of `geometry`.
#[derive(clap::Args)]
#[command(after_help = concat!("Example:\n  vmdkit geometry vm.vmdk\n\n", "Exit: 0 success, 1 error, 64 usage error."))]
pub(super) struct GeometryArgs {
    /// The disk.
    pub(super) disk: PathBuf,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `serve`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n",
    "  vmdkit serve /backup/vm.vmdk --socket /tmp/vm.sock &\n",
    "  nbdfuse /mnt/vm 'nbd+unix:///?socket=/tmp/vm.sock' &     # the disk as a file\n",
    "  mount -o ro,loop,offset=$((2048*512)) /mnt/vm/nbd /mnt/p1  # a partition, read-only\n",
    "  vmdkit serve vm-000002.vmdk --port 10809                  # nbd://127.0.0.1:10809\n",
    "  vmdkit serve vm.vmdk --socket /tmp/vm.sock --overlay vm-test.vmdk  # writable\n\n",
    "Read-only without --overlay: writes get EPERM; the served files are locked while it runs.\n",
    "Exit: 128+N when stopped by signal N (the socket is removed), 1 error, 64 usage error."
))]
pub(super) struct ServeArgs {
    /// The disk (top of the chain), a backup (streamOptimized), any VMDK vmdkit reads.
    pub(super) disk: PathBuf,
    /// Listen on a new Unix socket at PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "port")]
    pub(super) socket: Option<PathBuf>,
    /// Listen on TCP port N (on --bind's address).
    #[arg(long, value_name = "N")]
    pub(super) port: Option<u16>,
    /// The address for --port (default 127.0.0.1: this host only).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1",
        requires = "port"
    )]
    pub(super) bind: String,
    /// The export's name (clients may also ask for the empty name).
    #[arg(long, default_value = "")]
    pub(super) name: String,
    /// Most clients served at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub(super) max_connections: usize,
    /// Drop a client that has not finished its handshake, or not taken a reply, in
    /// this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) client_timeout: u64,
    /// Make the export writable: writes go into NEW.vmdk, a hosted sparse child of DISK
    /// made at start (in DISK's folder) and left as a valid delta (commit it or remove
    /// it); the files below are never written.
    #[arg(long, value_name = "NEW.vmdk")]
    pub(super) overlay: Option<PathBuf>,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `ls`.
#[derive(clap::Args)]
#[command(after_help = concat!("Examples:\n  vmdkit ls -H /vmfs/volumes/ds1/vm\n  vmdkit ls --json | jq '.[].file'\n\n", "Exit: 0 success, 1 error, 64 usage error."))]
pub(super) struct LsArgs {
    /// The folder (default: the current one).
    pub(super) dir: Option<PathBuf>,
    /// Sizes in KiB/MiB/GiB.
    #[arg(long, short = 'H')]
    pub(super) human_readable: bool,
    /// Show each RDM's device.
    #[arg(long, short = 'M')]
    pub(super) mappings: bool,
}

/// Arguments of `check`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit check vm-000001.vmdk\n  vmdkit check --repair vm.vmdk\n\n",
    "Exit: 0 clean, 1 the check could not run (not a VMDK, unreadable), 2 corruption, 3 only leaks (as qemu-img check)."
))]
pub(super) struct CheckArgs {
    /// The disk (top of the chain).
    pub(super) disk: PathBuf,
    /// Mend what has one right answer (each fix reported).
    #[arg(long)]
    pub(super) repair: bool,
    /// With --repair: also free leaked grains that hold data. That data is lost:
    /// it may be guest data whose table entry was lost.
    #[arg(long, requires = "repair")]
    pub(super) discard_unreferenced: bool,
    /// With --repair: write into files marked read-only.
    #[arg(long, requires = "repair")]
    pub(super) force: bool,
}

/// Arguments of `verify`.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  vmdkit verify /restore/vm.vmdk --manifest vm.crc\n",
    "  mbuffer -i /dev/nst0 | vmdkit verify - --manifest vm.crc   # check a tape without restoring\n\n",
    "Exit: 0 the content matches, 4 it differs (the ranges are printed), 1 error, 64 usage error."
))]
pub(super) struct VerifyArgs {
    /// The disk (any copy, e.g. restored from tape), or `-`: a stream on stdin.
    pub(super) disk: PathBuf,
    /// The manifest.
    #[arg(long)]
    pub(super) manifest: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub(super) threads: usize,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

#[derive(Subcommand)]
pub(super) enum RdmCmd {
    /// Map a device (vmkfstools -r; -z with --physical).
    #[command(after_help = concat!("Example:\n  vmdkit rdm create vm-rdm.vmdk --device /dev/sdc --physical\n\n", "Exit: 0 created, 1 error, 64 usage error."))]
    Create {
        /// The descriptor to write.
        disk: PathBuf,
        /// The device (a block device, or a file standing in for one).
        #[arg(long)]
        device: PathBuf,
        /// Physical (pass-through) compatibility mode.
        #[arg(long)]
        physical: bool,
        /// Adapter type for the geometry (ide, buslogic, lsilogic, legacyESX, pvscsi).
        #[arg(long, default_value = "lsilogic", value_parser = adapter_arg)]
        adapter: String,
    },
    /// Describe a mapping (vmkfstools -q / -P).
    #[command(after_help = concat!("Example:\n  vmdkit rdm query vm-rdm.vmdk\n\n", "Exit: 0 the device is there, 1 it is missing or an error, 64 usage error."))]
    Query {
        /// The descriptor.
        disk: PathBuf,
    },
}

#[derive(Subcommand)]
pub(super) enum RedoCmd {
    /// Put an empty delta on top of DISK's chain; prints the new top's path.
    #[command(after_help = concat!("Examples:\n  vmdkit redo add vm.vmdk                 # the chain's own style: vm-000001.vmdk on a hosted disk, vm.vmdk.REDO on an ESX base\n  vmdkit redo add vm.vmdk --style vmfsSparse\n\n", "Exit: 0 created, 1 error, 64 usage error."))]
    Add {
        /// The disk (the current top).
        disk: PathBuf,
        /// redo (ESX 2 `DISK.REDO`), vmfsSparse (`name-000001.vmdk` + `-delta`), hosted.
        /// Default: the chain's own style (REDO on REDO, vmfsSparse on vmfsSparse, hosted
        /// on hosted disks, an ESX 2 REDO log on an ESX base).
        #[arg(long, value_parser = Offer(|| vec!["redo", "vmfsSparse", "hosted"]))]
        style: Option<String>,
        /// Add a delta although DISK already has one (start a second branch).
        #[arg(long)]
        branch: bool,
    },
}

/// A value parser that takes any text (the command explains what it does not know, with
/// the list) and offers `names` to shell completion and `--help`.
#[derive(Clone)]
pub(super) struct Offer(pub(super) fn() -> Vec<&'static str>);

impl clap::builder::TypedValueParser for Offer {
    type Value = String;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<String, clap::Error> {
        Ok(value.to_string_lossy().into_owned())
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            (self.0)()
                .into_iter()
                .map(clap::builder::PossibleValue::new),
        ))
    }
}

/// Disk types offered to completion: every name the library takes.
pub(super) fn disk_types() -> Vec<&'static str> {
    vmdkit::DiskType::names().collect()
}

/// A size as `--size` takes it: checked here, so a bad one is a usage error (64).
pub(super) fn size_arg(s: &str) -> std::result::Result<String, String> {
    vmdkit::parse_size(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// A new size as `extend --size` takes it (`60G` or `+10G`).
pub(super) fn new_size_arg(s: &str) -> std::result::Result<String, String> {
    vmdkit::parse_new_size(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}
