//! Read a disk that is not a local file: any `ReadAt` (here a stand-in for an object
//! store or an HTTP server answering range requests) opens as a disk. The example reads a
//! stream backup's content through it and prints its CRC-32 and how many ranges it asked
//! for.
//!
//! ```text
//! cargo run --example custom_source -- backup.vmdk
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
    let Some(file) = std::env::args().nth(1) else {
        return Err(
            "usage: custom_source BACKUP.vmdk (monolithicSparse or streamOptimized)".into(),
        );
    };
    let object = Arc::new(RangeObject {
        bytes: std::fs::read(&file)?,
        requests: AtomicU64::new(0),
    });
    let layer = Layer::from_source(
        "s3://bucket/backup.vmdk",
        object.clone(),
        &OpenOptions::default(),
    )?;
    let disk = Chain::from_layer(layer);
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
    eprintln!(
        "{} range requests for {} bytes of disk",
        object.requests.load(Ordering::Relaxed),
        disk.capacity()
    );
    Ok(())
}
