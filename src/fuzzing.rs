//! Bodies of the fuzz targets in `fuzz/`, also run by `cargo test` over the corpus and
//! seeded mutations. Each takes arbitrary bytes and must return (never panic, never
//! hang) with work bounded by the caps below.

use crate::disk::Alloc;
use crate::format::descriptor::Descriptor;
use crate::format::sparse::{
    SparseExtent, SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE, GD_AT_END,
};
use crate::format::Extent;
use crate::io::Source;

/// Address space one fuzz run maps at most.
pub const FUZZ_MAP_BYTES: u64 = 256 << 20;
/// Runs one fuzz run reads at most.
pub const FUZZ_READ_RUNS: usize = 64;

/// Descriptor parser: parse; when it parses, serializing and parsing again gives the
/// same descriptor.
pub fn descriptor(data: &[u8]) {
    let path = std::path::Path::new("fuzz.vmdk");
    if let Ok(d) = Descriptor::parse(data, path) {
        let text = d.to_text();
        let again = Descriptor::parse(text.as_bytes(), path)
            .unwrap_or_else(|e| panic!("re-parse of our own output failed: {e}\n{text}"));
        assert_eq!(again, d, "descriptor round trip");
        let _ = d.create_type();
        let _ = d.cid();
    }
}

/// Sparse header + grain directory + tables + grains, from a whole file image.
pub fn sparse(data: &[u8]) {
    let src = Source::from_bytes(data.to_vec(), "fuzz.vmdk");
    let Ok(ext) = SparseExtent::open(src) else {
        return;
    };
    exercise(Extent::Sparse(Box::new(ext)));
}

/// A streamOptimized body behind a fixed, valid GD_AT_END stream header: exercises the
/// footer, the directory and tables it points to, and grain records.
pub fn stream(data: &[u8]) {
    let mut h = SparseHeader::new(2048, 128);
    h.version = 3;
    h.flags = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;
    h.compress_algorithm = 1;
    h.gd_offset = GD_AT_END;
    h.over_head = 1;
    let mut file = h.to_bytes().to_vec();
    file.extend_from_slice(data);
    sparse(&file);
}

/// COWD header + directory + tables + grains, from a whole file image.
pub fn cowd(data: &[u8]) {
    let src = Source::from_bytes(data.to_vec(), "fuzz-delta.vmdk");
    let Ok(ext) = crate::format::cowd::CowdExtent::open(src) else {
        return;
    };
    exercise(Extent::Cowd(Box::new(ext)));
}

/// SESparse headers + directory + tables + grains, from a whole file image.
pub fn sesparse(data: &[u8]) {
    let src = Source::from_bytes(data.to_vec(), "fuzz-sesparse.vmdk");
    let Ok(ext) = crate::format::sesparse::SeSparseExtent::open(src) else {
        return;
    };
    exercise(Extent::SeSparse(Box::new(ext)));
}

/// The sequential (pipe) reader that `import -` and `apply` use: a stream (with its
/// zeroed grains, as apply reads an increment), a tables-first sparse
/// file or export's tar, read from a byte slice, with the content discarded after
/// [`FUZZ_MAP_BYTES`].
pub fn pipe(data: &[u8]) {
    use crate::format::stream::pipe::{
        parse_first, read_sparse, read_stream_zeroed, read_tar, Counted,
    };
    let name = std::path::Path::new("<stdin>");
    let mut emitted = 0u64;
    let mut emit = |_: u64, b: &[u8]| -> crate::Result<()> {
        emitted += b.len() as u64;
        if emitted > FUZZ_MAP_BYTES {
            return Err(crate::Error::InvalidInput("fuzz cap".into()));
        }
        Ok(())
    };
    let mut input: &[u8] = data;
    if data.get(257..262) == Some(b"ustar") {
        let _ = read_tar(&mut input, name, &mut emit);
        return;
    }
    let mut c = Counted::new(&mut input, name);
    let mut first = [0u8; 512];
    if !matches!(c.fill(&mut first), Ok(true)) {
        return;
    }
    let Ok(h) = parse_first(&first, name) else {
        return;
    };
    // Zeroed ranges (what `apply` reads from an increment) count like content.
    let mut zeroed_bytes = 0u64;
    let mut zeroed = |_: u64, len: u64| -> crate::Result<()> {
        zeroed_bytes = zeroed_bytes.saturating_add(len);
        if zeroed_bytes > 1 << 50 {
            return Err(crate::Error::InvalidInput("fuzz cap".into()));
        }
        Ok(())
    };
    let _ = if h.compressed() {
        read_stream_zeroed(&mut c, &h, 0, &mut emit, Some(&mut zeroed))
    } else {
        read_sparse(&mut c, &h, 0, &mut emit)
    };
    if h.compressed() {
        stream_units_match_pieces(data, &h);
    }
}

/// What `import -` reads a stream into (grains inflated straight into 1 MiB units) must
/// be what the grain-by-grain reader gives: the same non-zero units, or both refuse.
fn stream_units_match_pieces(data: &[u8], h: &crate::format::sparse::SparseHeader) {
    use crate::format::stream::pipe::{read_stream_on, read_stream_units, units_fit, Counted};
    use std::collections::BTreeMap;
    const UNIT: u64 = 1 << 20;
    if !units_fit(h, UNIT) {
        return;
    }
    let name = std::path::Path::new("<stdin>");
    let cap = h.capacity_sectors.saturating_mul(512);
    let over = || crate::Error::InvalidInput("fuzz cap".into());
    // Pieces, laid into units (all-zero units dropped, as the units reader does).
    let mut pieces: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut input: &[u8] = &data[512..];
    let mut c = Counted::new(&mut input, name);
    c.pos = 512;
    let by_pieces = read_stream_on(
        None,
        &mut c,
        h,
        0,
        &mut |off, b| {
            let u = off / UNIT * UNIT;
            if !pieces.contains_key(&u) && pieces.len() as u64 * UNIT >= FUZZ_MAP_BYTES {
                return Err(over());
            }
            let buf = pieces
                .entry(u)
                .or_insert_with(|| vec![0u8; (cap - u).min(UNIT) as usize]);
            let o = (off - u) as usize;
            buf[o..o + b.len()].copy_from_slice(b);
            Ok(())
        },
        None,
    );
    pieces.retain(|_, b| !crate::mem::is_zero(b));
    let mut units: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut input: &[u8] = &data[512..];
    let mut c = Counted::new(&mut input, name);
    c.pos = 512;
    let by_units = read_stream_units(None, &mut c, h, UNIT as usize, &mut |start, buf| {
        if units.len() as u64 * UNIT >= FUZZ_MAP_BYTES {
            return Err(over());
        }
        assert!(units.insert(start, buf).is_none(), "unit {start} twice");
        Ok(())
    });
    let capped =
        |r: &crate::Result<_>| matches!(r, Err(crate::Error::InvalidInput(m)) if m == "fuzz cap");
    if capped(&by_pieces) || capped(&by_units) {
        return;
    }
    assert_eq!(
        by_pieces.is_ok(),
        by_units.is_ok(),
        "one reader refused, the other not"
    );
    if by_units.is_ok() {
        assert!(pieces == units, "units differ from pieces");
    }
}

/// Recovery state: the bytes as a commit state file, an apply state file and a journal
/// (each checksummed and, when it parses, bounded by its bytes). None may panic; what
/// they name is admitted by the commands, not here ([`crate::recovery`]).
pub fn recovery(data: &[u8]) {
    let path = std::path::Path::new("fuzz.vmdk.vmdkit-commit");
    let _ = crate::ops::commit::parse_state(path, data);
    let _ = crate::ops::apply::parse_state(path, data);
    let _ = crate::recovery::decode::<serde_json::Value>(path, data);
    if let Ok((_, records)) = crate::write::parse_journal(path, data) {
        let total: usize = records.iter().map(|r| r.bytes.len()).sum();
        assert!(
            total <= data.len(),
            "journal records larger than the journal"
        );
    }
}

/// An increment as `apply` validates it before writing: header, descriptor, parentCID,
/// then every grain and zeroed range, the content discarded after [`FUZZ_MAP_BYTES`].
pub fn increment(data: &[u8]) {
    let _ = crate::ops::apply::validate_bytes(data, FUZZ_MAP_BYTES);
}

/// What an NBD client sends `serve`: a request header, an option header, `INFO`/`GO`
/// and meta context option data.
pub fn nbd(data: &[u8]) {
    crate::serve::parse_any(data);
}

/// Hand-made hostile inputs (issue 9): each once crashed, hung or ran away with memory.
/// The mutation suite starts from them too.
pub fn hostile_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::format::sparse::SparseLayout;
    let mut v = Vec::new();
    // A sparse file whose header claims a descriptor of 2^45 sectors.
    let layout = SparseLayout::new(2048, 0);
    let mut meta = layout.metadata(&crate::format::sparse::GrainEntries::new(layout.gtes), None);
    meta[28..36].copy_from_slice(&1u64.to_le_bytes());
    meta[36..44].copy_from_slice(&(1u64 << 45).to_le_bytes());
    v.push(("descriptor-size-2^45", meta.clone()));
    // The same, capacity 2^50 bytes (a stream header on a pipe once allocated 32 TiB).
    let mut huge = meta;
    huge[28..44].fill(0);
    huge[12..20].copy_from_slice(&((1u64 << 50) / 512).to_le_bytes());
    v.push(("capacity-2^50", huge.clone()));
    let mut stream = huge;
    stream[8..12]
        .copy_from_slice(&(FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS).to_le_bytes());
    stream[77..79].copy_from_slice(&1u16.to_le_bytes());
    v.push(("stream-capacity-2^50", stream));
    // Descriptors: a BOM, a flat extent whose offset + size overflows, a parentCID
    // without a parent name, an absolute device path.
    v.push((
        "bom",
        b"\xef\xbb\xbf# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"fuzz-extent.vmdk\" 0\n".to_vec(),
    ));
    v.push((
        "flat-overflow",
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 18014398509481983 FLAT \"fuzz-extent.vmdk\" 18014398509481983\n".to_vec(),
    ));
    v.push((
        "unnamed-parent",
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"fuzz-extent.vmdk\" 0\n".to_vec(),
    ));
    v.push((
        "device-outside",
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"fullDevice\"\nRW 8 FLAT \"/etc/hostname\" 0\n".to_vec(),
    ));
    // An increment: zeroed grain entries in tables the GD names at the end (what
    // `apply` reads), one table holding only zeroed entries.
    {
        let desc = b"# Disk DescriptorFile\nversion=1\nCID=00000002\nparentCID=00000001\ncreateType=\"streamOptimized\"\nparentFileNameHint=\"p.vmdk\"\nRW 131072 SPARSE \"i.vmdk\"\n";
        let mut w = crate::format::stream::StreamWriter::with_zeroed(
            Vec::new(),
            64 << 20,
            desc,
            std::path::Path::new("i.vmdk"),
            true,
        )
        .expect("in memory");
        w.write_grain(3, &[0x5a; 65536], 1).expect("in memory");
        for g in [4u64, 5, 600, 1023] {
            w.write_zeroed(g).expect("in memory");
        }
        v.push((
            "increment-with-zeroed-grains",
            w.finish().expect("in memory").0,
        ));
    }
    // export's tar stream of a thin disk: a GNU sparse (PAX 1.0) member.
    v.push(("tar-with-a-sparse-member", sparse_tar_seed()));
    v
}

/// A 4 MiB disk with data in two places, exported as a thin `vmfs` tar stream.
fn sparse_tar_seed() -> Vec<u8> {
    use crate::copy::target::{export_fed, Dest, ExportFormat, ExportOptions, OutputMeta};
    struct Two;
    impl crate::disk::VirtualDisk for Two {
        fn capacity(&self) -> u64 {
            4 << 20
        }
        fn granularity(&self) -> u64 {
            65536
        }
        fn map(&self, r: std::ops::Range<u64>) -> crate::Result<Vec<crate::disk::Run>> {
            Ok(vec![crate::disk::Run {
                start: r.start,
                len: r.end.min(4 << 20) - r.start,
                alloc: crate::disk::Alloc::Data {
                    extent: 0,
                    offset: r.start,
                },
                depth: 0,
            }])
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> crate::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = off + i as u64;
                *b = if (65536..131072).contains(&at) || at >= 3 << 20 {
                    (at % 251) as u8
                } else {
                    0
                };
            }
            Ok(())
        }
    }
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let meta = OutputMeta {
        ddb: vec![],
        cid: 7,
        provisioning: Default::default(),
        parent: None,
        omitted: None,
    };
    let opts = ExportOptions {
        format: ExportFormat::Vmfs,
        threads: 1,
        ..Default::default()
    };
    let dest = Dest::Writer {
        w: Box::new(Shared(out.clone())),
        name: "t.vmdk".into(),
    };
    export_fed(&Two, None, &meta, 0, dest, &opts, &crate::copy::NoProgress).expect("in memory");
    let v = out.lock().expect("not poisoned").clone();
    v
}

/// Sizes and offsets as typed on a command line ([`crate::units`]): a number or an
/// error, never a panic or an overflow.
pub fn units(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = crate::units::parse_size(&s);
    let _ = crate::units::parse_new_size(&s);
}

/// A whole image: the bytes as a file in a private temporary folder (a descriptor, a
/// sparse, stream or COWD file; an RDM descriptor), opened as a chain and read with a
/// cap on work. Descriptors may name `fuzz-extent.vmdk`, which holds the same bytes.
pub fn image(data: &[u8]) {
    use crate::disk::VirtualDisk;
    let dir = std::env::temp_dir().join(format!(
        "vmdkit-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let top = dir.join("fuzz.vmdk");
    let _ = std::fs::write(&top, data);
    let _ = std::fs::write(dir.join("fuzz-extent.vmdk"), data);
    let opts = crate::layer::OpenOptions {
        ignore_cid: true,
        mode: crate::io::SourceMode::Pread,
        ..Default::default()
    };
    if let Ok(chain) = crate::chain::Chain::open(&top, &opts) {
        let cap = chain.capacity().min(FUZZ_MAP_BYTES);
        if let Ok(runs) = chain.map(0..cap) {
            let mut buf = Vec::new();
            for r in runs.iter().take(FUZZ_READ_RUNS) {
                let n = r.len.min(1 << 20) as usize;
                buf.resize(n, 0);
                let _ = chain.read_at(&mut buf, r.start);
            }
        }
        let _ = crate::ops::info::info(&chain);
    }
    let _ = crate::ops::check::check(&top, false);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a commit plans with ([`crate::chain::Chain::map_above`]) must be the chain's
/// map with everything from `depth` down left `Unallocated`, at every depth of the chain
/// opened at `top` (each layer as a target), over its first `cap` bytes. Panics on a
/// difference.
pub fn map_above_agrees(top: &std::path::Path, cap: u64) {
    use crate::disk::{Alloc, VirtualDisk};
    let opts = crate::layer::OpenOptions {
        ignore_cid: true,
        ..Default::default()
    };
    let Ok(chain) = crate::chain::Chain::open(top, &opts) else {
        return;
    };
    let cap = cap.min(chain.capacity());
    let Ok(all) = chain.map(0..cap) else {
        return;
    };
    for depth in 0..chain.layers.len() {
        let mut want = Vec::new();
        for r in &all {
            let r = if (r.depth as usize) < depth {
                *r
            } else {
                crate::disk::Run {
                    alloc: Alloc::Unallocated,
                    depth: depth as u32,
                    ..*r
                }
            };
            crate::disk::push_run(&mut want, r);
        }
        let got = chain.map_above(depth, 0..cap).expect("the full map worked");
        assert_eq!(got, want, "map_above({depth})");
    }
}

fn exercise(ext: Extent) {
    let mut runs = Vec::new();
    let end = ext.len().min(FUZZ_MAP_BYTES);
    if ext.map(0, 0..end, 0, &mut runs).is_err() {
        return;
    }
    for w in runs.windows(2) {
        assert_eq!(w[0].end(), w[1].start, "runs are contiguous");
    }
    let mut buf = Vec::new();
    for r in runs.iter().take(FUZZ_READ_RUNS) {
        let n = r.len.min(1 << 20) as usize;
        buf.resize(n, 0);
        let _ = match r.alloc {
            Alloc::Data { offset, .. } => ext.read_data(&mut buf, offset),
            Alloc::Compressed { offset, .. } => ext.read_compressed(&mut buf, offset, r.start),
            _ => Ok(()),
        };
    }
}

/// A deterministic mutator for the in-tree mutation suite (xorshift64*).
#[derive(Debug, Clone)]
pub struct Mutator(u64);

impl Mutator {
    /// Seeded mutator.
    pub fn new(seed: u64) -> Mutator {
        Mutator(seed.max(1))
    }

    /// Next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Apply one random mutation: flip a byte, write an extreme integer at a (usually
    /// header) offset, truncate, or duplicate a slice.
    pub fn mutate(&mut self, data: &mut Vec<u8>) {
        if data.is_empty() {
            data.push(self.next_u64() as u8);
            return;
        }
        let len = data.len();
        let hot = (self.next_u64() % 3 == 0) as usize; // bias toward the first sectors
        let pos = if hot == 1 {
            (self.next_u64() as usize) % len.min(2048)
        } else {
            (self.next_u64() as usize) % len
        };
        match self.next_u64() % 6 {
            0 => data[pos] ^= 1 << (self.next_u64() % 8),
            1 => data[pos] = self.next_u64() as u8,
            2 => {
                const EXTREMES: [u64; 7] =
                    [0, 1, 0x7f, 0xffff_ffff, 0xffff_fffe, u64::MAX, 1 << 32];
                let v = EXTREMES[(self.next_u64() % 7) as usize].to_le_bytes();
                let w = if self.next_u64() % 2 == 0 { 4 } else { 8 };
                for i in 0..w {
                    if pos + i < len {
                        data[pos + i] = v[i];
                    }
                }
            }
            3 => data.truncate(pos),
            4 => {
                let end = (pos + 1 + (self.next_u64() as usize % 64)).min(len);
                let piece = data[pos..end].to_vec();
                let at = (self.next_u64() as usize) % len;
                data.splice(at..at, piece);
            }
            _ => {
                let v = (self.next_u64() as u32).to_le_bytes();
                for i in 0..4 {
                    if pos + i < len {
                        data[pos + i] = v[i];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The new seeds are valid inputs before they are mutated: the tar's sparse member
    /// reads back as the disk's content, the increment as its grains.
    #[test]
    fn seeds_read_back() {
        let tar = super::sparse_tar_seed();
        let mut input: &[u8] = &tar;
        let mut got = vec![0u8; 4 << 20];
        let mut emit = |off: u64, b: &[u8]| -> crate::Result<()> {
            got[off as usize..off as usize + b.len()].copy_from_slice(b);
            Ok(())
        };
        crate::format::stream::pipe::read_tar(&mut input, std::path::Path::new("t"), &mut emit)
            .unwrap();
        for (i, b) in got.iter().enumerate() {
            let want = if (65536..131072).contains(&i) || i >= 3 << 20 {
                (i % 251) as u8
            } else {
                0
            };
            assert_eq!(*b, want, "byte {i}");
        }
        assert!(tar.len() < 2 << 20, "sparse member: {} bytes", tar.len());
        let seeds = super::hostile_seeds();
        let inc = &seeds
            .iter()
            .find(|(n, _)| *n == "increment-with-zeroed-grains")
            .unwrap()
            .1;
        let mut input: &[u8] = inc;
        let name = std::path::Path::new("i");
        let mut c = crate::format::stream::pipe::Counted::new(&mut input, name);
        let mut first = [0u8; 512];
        c.exact(&mut first).unwrap();
        let h = crate::format::stream::pipe::parse_first(&first, name).unwrap();
        let mut zeroed = Vec::new();
        crate::format::stream::pipe::read_stream_zeroed(
            &mut c,
            &h,
            0,
            &mut |_, _| Ok(()),
            Some(&mut |o, l| {
                zeroed.push((o >> 16, l >> 16));
                Ok(())
            }),
        )
        .unwrap();
        assert_eq!(zeroed, vec![(4, 2), (600, 1), (1023, 1)]);
    }
}

/// Inner pieces the benchmarks (`benches/pipeline.rs`) time on their own.
pub mod bench {
    pub use crate::copy::is_zero;
    pub use crate::format::stream::grain_record;
}

/// A disk in memory, for the guest-aware scan's fuzz targets.
struct MemDisk(Vec<u8>);

impl crate::disk::VirtualDisk for MemDisk {
    fn capacity(&self) -> u64 {
        self.0.len() as u64 / 512 * 512
    }
    fn granularity(&self) -> u64 {
        512
    }
    fn map(&self, range: std::ops::Range<u64>) -> crate::error::Result<Vec<crate::disk::Run>> {
        let end = range.end.min(self.capacity());
        Ok((range.start < end)
            .then(|| crate::disk::Run {
                start: range.start,
                len: end - range.start,
                alloc: Alloc::Data {
                    extent: 0,
                    offset: range.start,
                },
                depth: 0,
            })
            .into_iter()
            .collect())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::error::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.capacity())
            .ok_or_else(|| crate::error::Error::InvalidInput("read past the end".into()))?;
        buf.copy_from_slice(&self.0[offset as usize..end as usize]);
        Ok(())
    }
}

/// The guest-aware scan over a disk whose bytes are `data` (partition tables, then
/// each partition's file system): it ends, and what it calls free lies inside the disk
/// and inside a partition it recognised.
pub fn guest(data: &[u8]) {
    let disk = MemDisk(data.to_vec());
    let cap = crate::disk::VirtualDisk::capacity(&disk);
    if let Ok((free, report)) = crate::guest::scan(&disk) {
        assert!(free.bytes() <= cap);
        let inside = free.within(0..u64::MAX).all(|r| {
            r.end <= cap
                && report.partitions.iter().any(|p| {
                    p.file_system.is_some()
                        && p.copied_whole.is_none()
                        && r.start >= p.start
                        && r.end <= p.start + p.length
                })
        });
        assert!(inside, "a free range outside a recognised partition");
    }
}

/// The file-system readers alone (ext2/3/4, FAT, NTFS), over `data` as one volume:
/// they end, and what they call free lies inside it.
pub fn guest_fs(data: &[u8]) {
    let disk = MemDisk(data.to_vec());
    let cap = crate::disk::VirtualDisk::capacity(&disk);
    let vol = crate::guest::Volume::new(&disk, 0, cap);
    if let Ok(found) = crate::guest::probe(&vol) {
        assert!(found.free.iter().all(|r| r.start < r.end && r.end <= cap));
    }
}
