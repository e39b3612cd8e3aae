//! Property tests: export bytes do not depend on the thread count or pipeline unit, and
//! what we write reads back as the content (a plain buffer is the model).

use proptest::prelude::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};
use vmdkit::VirtualDisk;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Content made of runs: zeros, a repeated byte, or pseudo-random bytes.
fn content() -> impl Strategy<Value = Vec<u8>> {
    let run = (0u8..3, 1usize..200_000, any::<u8>());
    (prop::collection::vec(run, 1..12), 1u64..40).prop_map(|(runs, extra_sectors)| {
        let mut v = Vec::new();
        let mut x = 0x1234_5678u32;
        for (kind, len, b) in runs {
            for _ in 0..len {
                v.push(match kind {
                    0 => 0,
                    1 => b,
                    _ => {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    }
                });
            }
        }
        let len = (v.len() as u64).div_ceil(512) * 512 + extra_sectors * 512;
        v.resize(len as usize, 0);
        v
    })
}

fn flat_disk(dir: &std::path::Path, data: &[u8]) -> vmdkit::Chain {
    std::fs::write(dir.join("d-flat.vmdk"), data).unwrap();
    std::fs::write(
        dir.join("d.vmdk"),
        format!("version=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW {} VMFS \"d-flat.vmdk\"\n", data.len() / 512),
    )
    .unwrap();
    vmdkit::Chain::open(&dir.join("d.vmdk"), &Default::default()).unwrap()
}

fn run(chain: &vmdkit::Chain, format: ExportFormat, threads: usize, unit: u64) -> Vec<u8> {
    let w = Shared::default();
    let opts = {
        let mut o = ExportOptions::default();
        o.format = format;
        o.threads = threads;
        o.unit = unit;
        o
    };
    export(
        chain,
        Dest::Writer {
            w: Box::new(w.clone()),
            name: "d.vmdk".into(),
        },
        &opts,
        &vmdkit::NoProgress,
    )
    .unwrap();
    let v = w.0.lock().unwrap().clone();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn export_bytes_are_independent_of_threads_and_unit(data in content()) {
        let t = super::util::tmp();
        let chain = flat_disk(t.path(), &data);
        for format in [ExportFormat::StreamOptimized, ExportFormat::MonolithicSparse, ExportFormat::Raw] {
            let reference = run(&chain, format, 1, 1 << 20);
            for (threads, unit) in [(2, 1 << 20), (3, 65536), (4, 131072), (2, 512 << 10)] {
                let other = run(&chain, format, threads, unit);
                prop_assert!(other == reference, "{:?} differs with {} threads, unit {}", format, threads, unit);
            }
            // And it reads back as the content.
            let out = t.path().join("out.vmdk");
            std::fs::write(&out, &reference).unwrap();
            if format == ExportFormat::Raw {
                prop_assert!(reference == data);
            } else {
                let back = vmdkit::Chain::open(&out, &Default::default()).unwrap();
                prop_assert_eq!(back.capacity(), data.len() as u64);
                let mut buf = vec![0u8; data.len()];
                back.read_at(&mut buf, 0).unwrap();
                prop_assert!(buf == data, "{:?} does not read back", format);
            }
        }
    }
}
