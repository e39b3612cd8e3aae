//! Read a disk that is not a local file: any `ReadAt` (here a stand-in for an object
//! store or an HTTP server answering range requests) opens as a layer, and layers opened
//! so join into a chain (their content IDs checked). The example reads a stream backup,
//! or a delta and its parent, through it and prints the content's CRC-32 and how many
//! ranges it asked for.
//!
//! ```text
//! cargo run --example custom_source -- backup.vmdk
//! cargo run --example custom_source -- disk-000001.vmdk disk.vmdk
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmdkit::{Chain, Layer, OpenOptions, ReadAt, VirtualDisk};

/// An object fetched by ranges. A real one would send `Range: bytes=A-B` requests; this
/// one answers from a buffer and counts the requests.
struct RangeObject {
    bytes: Vec<u8>,
    requests: AtomicU64,
}

impl ReadAt for RangeObject {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let from = (offset as usize).min(self.bytes.len());
        let n = buf.len().min(self.bytes.len() - from);
        buf[..n].copy_from_slice(&self.bytes[from..from + n]);
        Ok(n)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        return Err(
            "usage: custom_source TOP.vmdk [PARENT.vmdk ...] (hosted sparse or stream files)"
                .into(),
        );
    }
    let opts = OpenOptions::default();
    let mut objects = Vec::new();
    let mut layers = Vec::new();
    for file in &files {
        let object = Arc::new(RangeObject {
            bytes: std::fs::read(file)?,
            requests: AtomicU64::new(0),
        });
        layers.push(Layer::from_source(
            &format!("s3://bucket/{file}"),
            object.clone(),
            &opts,
        )?);
        objects.push(object);
    }
    let disk = if layers.len() == 1 {
        Chain::from_layer(layers.remove(0))
    } else {
        Chain::from_layers(layers, &opts)?
    };
    for w in disk.warnings() {
        eprintln!("warning: {w}");
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < disk.capacity() {
        let n = (disk.capacity() - pos).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], pos)?;
        crc.update(&buf[..n]);
        pos += n as u64;
    }
    println!("{:08x} {}", crc.finalize(), disk.capacity());
    let requests: u64 = objects
        .iter()
        .map(|o| o.requests.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "{requests} range requests for {} bytes of disk",
        disk.capacity()
    );
    Ok(())
}
