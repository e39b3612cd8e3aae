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
    v
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
