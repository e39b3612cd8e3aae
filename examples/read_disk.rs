//! Open a disk with its parents and copy bytes of its content to standard output.
//!
//! ```text
//! cargo run --example read_disk -- fixtures/demo-000001.vmdk 65536 512 | xxd | head
//! ```

use std::io::Write;

use vmdkit::{Chain, OpenOptions, VirtualDisk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [disk, rest @ ..] = args.as_slice() else {
        return Err("usage: read_disk DISK.vmdk [OFFSET [LENGTH]]".into());
    };
    let chain = Chain::open(disk.as_ref(), &OpenOptions::default())?;
    for warning in chain.warnings() {
        eprintln!("warning: {warning}");
    }
    let offset: u64 = rest.first().map_or(Ok(0), |s| s.parse())?;
    let length: u64 = rest.get(1).map_or(Ok(512), |s| s.parse())?;
    let end = offset.saturating_add(length).min(chain.capacity());
    eprintln!(
        "{disk}: {} bytes in {} layer(s)",
        chain.capacity(),
        chain.layers().len()
    );
    // Positional reads: any thread may read any range; here, 1 MiB at a time.
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        chain.read_at(&mut buf[..n], pos)?;
        out.write_all(&buf[..n])?;
        pos += n as u64;
    }
    out.flush()?;
    Ok(())
}
