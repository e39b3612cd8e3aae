//! List a disk's chain, top first: each layer's type, content IDs, size and files, and
//! how much of the disk each layer decides (from metadata alone, no data read).
//!
//! ```text
//! cargo run --example list_chain -- fixtures/demo-000001.vmdk
//! ```

use vmdkit::{Chain, OpenOptions, VirtualDisk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(disk) = std::env::args().nth(1) else {
        return Err("usage: list_chain DISK.vmdk".into());
    };
    let chain = Chain::open(disk.as_ref(), &OpenOptions::default())?;
    // Bytes each layer stores (or zeroes) of the merged view.
    let mut decided = vec![0u64; chain.layers().len()];
    for run in chain.map(0..chain.capacity())? {
        if run.alloc.is_present() {
            decided[run.depth as usize] += run.len;
        }
    }
    for (depth, layer) in chain.layers().iter().enumerate() {
        let cid = layer.cid().map_or("-".to_string(), |c| format!("{c:08x}"));
        println!(
            "{depth}: {} ({}, {} bytes, CID {cid}, parent {})",
            layer.path().display(),
            layer.disk_type(),
            layer.capacity(),
            layer.parent_hint().unwrap_or("none"),
        );
        println!("   decides {} bytes of the disk", decided[depth]);
        for file in layer.files() {
            println!("   file {}", file.display());
        }
    }
    Ok(())
}
