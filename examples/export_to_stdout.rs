//! Export a disk and its whole chain, flattened, as one streamOptimized VMDK on standard
//! output: a backup to pipe into `tar`, `mbuffer` or a tape drive.
//!
//! ```text
//! cargo run --release --example export_to_stdout -- fixtures/demo-000001.vmdk > backup.vmdk
//! ```

use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};
use vmdkit::{Chain, NoProgress, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(disk) = std::env::args().nth(1) else {
        return Err("usage: export_to_stdout DISK.vmdk > OUT.vmdk".into());
    };
    let chain = Chain::open(disk.as_ref(), &OpenOptions::default())?;
    let mut opts = ExportOptions::default();
    opts.format = ExportFormat::StreamOptimized;
    opts.level = 6;
    let dest = Dest::Writer {
        w: Box::new(std::io::stdout()),
        // The name the stream's descriptor records.
        name: "backup.vmdk".into(),
    };
    let report = export(&chain, dest, &opts, &NoProgress)?;
    eprintln!(
        "wrote {} bytes: {} grains of data; unallocated and zero grains left out",
        report.bytes_out, report.grains
    );
    Ok(())
}
