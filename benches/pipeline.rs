//! Criterion benches for the pieces of export: zero detection, grain compression, and the
//! whole pipeline per thread count (stream and sparse output to a sink), on a mostly
//! sparse disk and a fully allocated one.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::io::Write;
use vmdkit::ops::export::{export, Dest, ExportFormat, ExportOptions};

fn zero_detect(c: &mut Criterion) {
    let buf = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("zero_detect");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("1MiB_zeros", |b| {
        b.iter(|| vmdkit::fuzzing::bench::is_zero(std::hint::black_box(&buf)))
    });
    g.finish();
}

fn text_grain() -> Vec<u8> {
    let mut v = Vec::new();
    let mut i = 0u32;
    while v.len() < 65536 {
        v.extend_from_slice(
            format!("line {i} storage backup grain table {}\n", i * 7919 % 1000).as_bytes(),
        );
        i += 1;
    }
    v.truncate(65536);
    v
}

fn compress(c: &mut Criterion) {
    let grain = text_grain();
    let mut g = c.benchmark_group("compress_grain");
    g.throughput(Throughput::Bytes(65536));
    for level in [1u32, 6, 9] {
        // zlib (zlib-rs through flate2) against the record vmdkit writes (libdeflate),
        // at the same level; the sizes are printed once for the size comparison.
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(&grain).unwrap();
        let zlib_len = e.finish().unwrap().len();
        let rec_len = vmdkit::fuzzing::bench::grain_record(0, &grain, level)
            .unwrap()
            .len();
        eprintln!(
            "level {level}: zlib {zlib_len} bytes, vmdkit record {rec_len} bytes (padded to 512)"
        );
        g.bench_with_input(BenchmarkId::new("zlib", level), &level, |b, &level| {
            b.iter(|| {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
                e.write_all(&grain).unwrap();
                e.finish().unwrap()
            })
        });
        g.bench_with_input(
            BenchmarkId::new("libdeflate_record", level),
            &level,
            |b, &level| b.iter(|| vmdkit::fuzzing::bench::grain_record(0, &grain, level).unwrap()),
        );
    }
    g.finish();
}

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn make_disk(dir: &std::path::Path, name: &str, fill: f64) -> vmdkit::Chain {
    let size = 64usize << 20;
    let mut data = vec![0u8; size];
    let text = text_grain();
    let mut x = 1u32;
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if (i as f64 * 0.618).fract() < fill {
            if i % 2 == 0 {
                chunk.copy_from_slice(&text);
            } else {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *b = x as u8;
                }
            }
        }
    }
    std::fs::write(dir.join(format!("{name}-flat.vmdk")), &data).unwrap();
    std::fs::write(
        dir.join(format!("{name}.vmdk")),
        format!("version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW {} VMFS \"{name}-flat.vmdk\"\n", size / 512),
    )
    .unwrap();
    vmdkit::Chain::open(&dir.join(format!("{name}.vmdk")), &Default::default()).unwrap()
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for (name, fill) in [("sparse10", 0.1), ("full", 1.0)] {
        let chain = make_disk(dir.path(), name, fill);
        let mut g = c.benchmark_group(format!("export_{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(64 << 20));
        for format in [
            ExportFormat::StreamOptimized,
            ExportFormat::MonolithicSparse,
        ] {
            for threads in [1usize, 2] {
                let id = BenchmarkId::new(format!("{format:?}"), threads);
                g.bench_with_input(id, &threads, |b, &threads| {
                    b.iter(|| {
                        let opts = {
                            let mut o = ExportOptions::default();
                            o.format = format;
                            o.threads = threads;
                            o
                        };
                        export(
                            &chain,
                            Dest::Writer {
                                w: Box::new(Sink),
                                name: "x.vmdk".into(),
                            },
                            &opts,
                            &vmdkit::NoProgress,
                        )
                        .unwrap()
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, zero_detect, compress, pipeline);
criterion_main!(benches);
