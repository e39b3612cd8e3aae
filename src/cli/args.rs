//! The command line's vocabulary: every subcommand's arguments (clap derive). `mod.rs`
//! runs them.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use vmdkit::io::SourceMode;
use vmdkit::{Chain, OpenOptions};

use super::adapter_arg;

#[derive(Parser)]
#[command(
    name = "vmdkit",
    version,
    about = "VMware virtual disk (VMDK) toolkit: inspect, export, import, commit"
)]
pub(super) struct Cli {
    /// Follow extent and parent names that lead out of the descriptor's folder (through
    /// symbolic links or absolute paths). Without it, only block devices named by device
    /// and RDM descriptors may lie outside.
    #[arg(long, global = true)]
    pub(super) allow_outside_paths: bool,
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

#[derive(clap::Args, Clone, Copy)]
pub(super) struct ReadArgs {
    /// Read through a parent whose CID does not match the child's parentCID (warns).
    #[arg(long)]
    pub(super) ignore_cid: bool,
    /// Memory-map source files instead of positional reads (resident memory then grows
    /// with what is read).
    #[arg(long, hide = true)]
    pub(super) mmap: bool,
}

impl ReadArgs {
    pub(super) fn open(&self, path: &Path) -> Result<Chain> {
        let opts = OpenOptions {
            ignore_cid: self.ignore_cid,
            mode: if self.mmap {
                SourceMode::Mmap
            } else {
                SourceMode::Pread
            },
            ..Default::default()
        };
        // Library errors name the file (and offset) already.
        let chain = Chain::open(path, &opts)?;
        for w in &chain.warnings {
            eprintln!("vmdkit: warning: {w}");
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
    /// Copy a disk or a whole chain (flattened) to compact files or stdout.
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
    /// Restore: a disk or chain (flattened), or a stream on stdin (`-`), into a new disk.
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
    /// Exit: 0 clean, 1 check could not finish, 2 corruption, 3 only leaks.
    Check(CheckArgs),
    /// Check a disk's content against a manifest written by `export --manifest`.
    Verify(VerifyArgs),
}

/// Arguments of `info`.
#[derive(clap::Args)]
pub(super) struct InfoArgs {
    /// The disk (descriptor or sparse file); the top of a chain.
    pub(super) disk: PathBuf,
    /// One JSON object with stable keys.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `map`.
#[derive(clap::Args)]
pub(super) struct MapArgs {
    /// The disk.
    pub(super) disk: PathBuf,
    /// The same records as `qemu-img map --output=json`.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `cat`.
#[derive(clap::Args)]
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
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `export`.
#[derive(clap::Args)]
pub(super) struct ExportArgs {
    /// Source disk (the top of a chain: the output looks as if it were committed).
    pub(super) src: PathBuf,
    /// Destination path, or `-` for stdout.
    pub(super) dst: PathBuf,
    /// Output format: streamOptimized (stream), monolithicSparse (sparse),
    /// twoGbMaxExtentSparse (split), monolithicFlat (flat), twoGbMaxExtentFlat, vmfs, raw.
    /// Default: split for a path, stream for stdout.
    #[arg(long, short = 'f')]
    pub(super) format: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// zlib level for streamOptimized (0-9).
    #[arg(long, default_value_t = 6)]
    pub(super) level: u32,
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
    /// Overwrite existing outputs; allow binary output to a terminal.
    #[arg(long)]
    pub(super) force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `write`.
#[derive(clap::Args)]
pub(super) struct WriteArgs {
    /// The disk (top of the chain).
    pub(super) disk: PathBuf,
    /// Byte offset (a multiple of 512).
    #[arg(long)]
    pub(super) offset: u64,
    /// Write LEN zero bytes instead of data (zeroed grains where the format has them).
    #[arg(long, value_name = "LEN")]
    pub(super) zero: Option<u64>,
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
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
}

/// Arguments of `apply`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  vmdkit import - vm.vmdk < full.vmdk && vmdkit apply vm.vmdk - < inc1.vmdk\n  vmdkit apply --raw --force /srv/vm.img inc2.vmdk\n\nExit: 0 applied, 1 refused or failed (nothing written when refused), 64 usage."
)]
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
    /// One JSON object with what was done on stdout.
    #[arg(long)]
    pub(super) json: bool,
    /// No progress bar, no summary.
    #[arg(short, long)]
    pub(super) quiet: bool,
}

/// Arguments of `measure`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  vmdkit measure vm.vmdk                      # a stream backup: bound and estimate\n  vmdkit measure vm-000002.vmdk --delta --json\n  vmdkit measure vm.vmdk -f split --name copy.vmdk\n\nExit: 0 measured, 1 error, 64 usage."
)]
pub(super) struct MeasureArgs {
    /// The disk (the top of a chain).
    pub(super) disk: PathBuf,
    /// Output format, as export takes it (default: stream).
    #[arg(long, short = 'f')]
    pub(super) format: Option<String>,
    /// Measure the increment of the top layer (`export --delta`).
    #[arg(long)]
    pub(super) delta: bool,
    /// zlib level for streamOptimized (0-9).
    #[arg(long, default_value_t = 6)]
    pub(super) level: u32,
    /// Compress every grain for an exact stream size (as long as the export's CPU time).
    #[arg(long)]
    pub(super) exact: bool,
    /// The output's file name (names are recorded in descriptors); default: the disk's.
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// One JSON object: required, exact, allocated, fully_allocated, estimate, ...
    #[arg(long)]
    pub(super) json: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `import`.
#[derive(clap::Args)]
pub(super) struct ImportArgs {
    /// Source disk, or `-` for stdin (streamOptimized, a sparse file with its tables
    /// first, or the tar stream export writes).
    pub(super) src: PathBuf,
    /// Destination (a raw target may be an existing device or stand-in file).
    pub(super) dst: PathBuf,
    /// thin (default), zeroedthick, eagerzeroedthick, monolithicSparse,
    /// twoGbMaxExtentSparse, raw, streamOptimized.
    #[arg(long = "type", short = 'd', default_value = "thin")]
    pub(super) kind: String,
    /// Adapter type (ide, buslogic, lsilogic, legacyESX, pvscsi); geometry recomputed.
    #[arg(long, short = 'a', value_parser = adapter_arg)]
    pub(super) adapter: Option<String>,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub(super) force: bool,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `create`.
#[derive(clap::Args)]
pub(super) struct CreateArgs {
    /// The new disk.
    pub(super) disk: PathBuf,
    /// Size: a number with k, m, g, t (binary) or s (sectors).
    #[arg(long, short = 's')]
    pub(super) size: String,
    /// zeroedthick (default, as vmkfstools), thin, eagerzeroedthick, monolithicSparse,
    /// twoGbMaxExtentSparse, streamOptimized.
    #[arg(long = "type", short = 'd', default_value = "zeroedthick")]
    pub(super) kind: String,
    /// Adapter type: ide, buslogic, lsilogic (default), legacyESX, pvscsi.
    #[arg(long, short = 'a', value_parser = adapter_arg)]
    pub(super) adapter: Option<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub(super) force: bool,
    /// Quiet (accepted everywhere; create prints nothing on success).
    #[arg(long, short = 'q')]
    pub(super) quiet: bool,
}

/// Arguments of `extend`.
#[derive(clap::Args)]
pub(super) struct ExtendArgs {
    /// The disk (a base, not a delta).
    pub(super) disk: PathBuf,
    /// New size: a number with k, m, g, t or s.
    #[arg(long, short = 's')]
    pub(super) size: String,
    /// Extend although deltas sit on the disk.
    #[arg(long)]
    pub(super) force: bool,
    /// Quiet (accepted everywhere; extend prints nothing on success).
    #[arg(long, short = 'q')]
    pub(super) quiet: bool,
}

/// Arguments of `geometry`.
#[derive(clap::Args)]
pub(super) struct GeometryArgs {
    /// The disk.
    pub(super) disk: PathBuf,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

/// Arguments of `ls`.
#[derive(clap::Args)]
pub(super) struct LsArgs {
    /// The folder (default: the current one).
    pub(super) dir: Option<PathBuf>,
    /// Sizes in KiB/MiB/GiB.
    #[arg(long, short = 'H')]
    pub(super) human_readable: bool,
    /// Show each RDM's device.
    #[arg(long, short = 'M')]
    pub(super) mappings: bool,
    /// JSON output.
    #[arg(long)]
    pub(super) json: bool,
}

/// Arguments of `check`.
#[derive(clap::Args)]
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
    /// JSON output.
    #[arg(long)]
    pub(super) json: bool,
}

/// Arguments of `verify`.
#[derive(clap::Args)]
pub(super) struct VerifyArgs {
    /// The disk (any copy, e.g. restored from tape).
    pub(super) disk: PathBuf,
    /// The manifest.
    #[arg(long)]
    pub(super) manifest: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub(super) threads: usize,
    /// No progress bar.
    #[arg(short, long)]
    pub(super) quiet: bool,
    #[command(flatten)]
    pub(super) read: ReadArgs,
}

#[derive(Subcommand)]
pub(super) enum RdmCmd {
    /// Map a device (vmkfstools -r; -z with --physical).
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
        /// Do not print the mapping file's path.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Describe a mapping (vmkfstools -q / -P).
    Query {
        /// The descriptor.
        disk: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(super) enum RedoCmd {
    /// Put an empty delta on top of DISK's chain; prints the new top's path.
    Add {
        /// The disk (the current top).
        disk: PathBuf,
        /// redo (ESX 2 `DISK.REDO`), vmfsSparse (`name-000001.vmdk` + `-delta`), hosted.
        #[arg(long, default_value = "redo")]
        style: String,
    },
}
