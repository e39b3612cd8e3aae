//! Unit tests of the parent module.

use super::*;
use crate::format::stream::StreamWriter;

/// A reader that hands out at most a few bytes per call (as pipes do).
struct Trickle<'a>(&'a [u8], usize);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.1 = self.1 % 7 + 1;
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A stream written by StreamWriter, read back through short reads, gives every
/// grain at its offset.
#[test]
fn a_stream_reads_back_through_short_reads() {
    let name = Path::new("<test>");
    let mut w = StreamWriter::new(Vec::new(), 4 << 20, b"# Disk DescriptorFile\n", name).unwrap();
    let text: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    w.write_grain(2, &text, 6).unwrap();
    w.write_grain(63, &vec![9u8; 65536], 1).unwrap();
    let (bytes, _, _) = w.finish().unwrap();
    let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut emit = |at: u64, b: &[u8]| -> Result<()> {
        got.push((at, b.to_vec()));
        Ok(())
    };
    let mut t = Trickle(&bytes, 0);
    let mut c = Counted::new(&mut t, name);
    let mut first = [0u8; 512];
    assert!(c.fill(&mut first).unwrap());
    let h = parse_first(&first, name).unwrap();
    read_stream(&mut c, &h, 0, &mut emit).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], (2 * 65536, text));
    assert_eq!(got[1], (63 * 65536, vec![9u8; 65536]));
    // Cut short, the same input is an error naming where it ended, not a panic.
    let mut t = Trickle(&bytes[..bytes.len() / 2], 0);
    let mut c = Counted::new(&mut t, name);
    c.fill(&mut first).unwrap();
    let mut sink = |_: u64, _: &[u8]| -> Result<()> { Ok(()) };
    assert!(read_stream(&mut c, &h, 0, &mut sink).is_err());
}

/// Zeroed grains (flag bit 2, GT entry 1) come back as ranges once the directory
/// names their tables, including a table that holds only zeroed entries and a run
/// across a table boundary; data grains are emitted as usual.
#[test]
fn zeroed_grains_are_reported_when_the_directory_names_their_tables() {
    let name = Path::new("<test>");
    let g = 65536u64;
    let mut w =
        StreamWriter::with_zeroed(Vec::new(), 2048 * g, b"# Disk DescriptorFile\n", name, true)
            .unwrap();
    w.write_grain(1, &vec![7u8; 65536], 6).unwrap();
    for z in [2u64, 3, 511, 512, 900] {
        w.write_zeroed(z).unwrap();
    }
    w.write_grain(1500, &vec![8u8; 65536], 6).unwrap();
    let (bytes, _, _) = w.finish().unwrap();
    let mut data = Vec::new();
    let mut zeros = Vec::new();
    let mut t = Trickle(&bytes, 0);
    let mut c = Counted::new(&mut t, name);
    let mut first = [0u8; 512];
    c.exact(&mut first).unwrap();
    let h = parse_first(&first, name).unwrap();
    read_stream_zeroed(
        &mut c,
        &h,
        0,
        &mut |at, b| {
            data.push((at / g, b.len()));
            Ok(())
        },
        Some(&mut |at, len| {
            zeros.push((at / g, len / g));
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(data, vec![(1, 65536), (1500, 65536)]);
    assert_eq!(zeros, vec![(2, 2), (511, 2), (900, 1)]);
}

/// A VMware-layout stream cut at any sector boundary before its footer is an error,
/// never a shorter disk read as complete (a truncated tape must not restore silently).
/// Only the final end-of-stream sector may be missing: everything is in by then.
#[test]
fn a_stream_cut_at_a_record_boundary_is_refused() {
    let name = Path::new("<test>");
    let mut w = StreamWriter::new(Vec::new(), 64 << 20, b"# Disk DescriptorFile\n", name).unwrap();
    for i in [0u64, 5, 600] {
        w.write_grain(i, &vec![i as u8 + 1; 65536], 6).unwrap();
    }
    let (bytes, _, _) = w.finish().unwrap();
    for cut in (512..bytes.len() - 512).step_by(512) {
        let mut input = &bytes[..cut];
        let mut c = Counted::new(&mut input, name);
        let mut first = [0u8; 512];
        c.exact(&mut first).unwrap();
        let h = parse_first(&first, name).unwrap();
        let mut sink = |_: u64, _: &[u8]| -> Result<()> { Ok(()) };
        assert!(
            read_stream(&mut c, &h, 0, &mut sink).is_err(),
            "cut at {cut}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Grains inflated straight into units give the disk the writer was given (the last
    /// grain cut by the capacity, whether it was stored cut or whole), the same as the
    /// grain-by-grain pieces do: units aligned, in order, none all zeros, the last one
    /// ending at the capacity.
    #[test]
    fn units_and_pieces_read_the_same_disk(
        sectors in 1u64..=(5 << 11),
        kinds in proptest::collection::vec(0u8..4, 80),
        whole_last in proptest::prelude::any::<bool>(),
        threads in 0usize..3,
    ) {
        let name = Path::new("<test>");
        let (g, unit) = (65536u64, 1u64 << 20);
        let cap = sectors * SECTOR;
        let mut model = vec![0u8; cap as usize];
        let mut w = StreamWriter::new(Vec::new(), cap, b"# Disk DescriptorFile\n", name).unwrap();
        for (i, &k) in kinds.iter().enumerate().take(cap.div_ceil(g) as usize) {
            let start = i as u64 * g;
            let want = (cap - start).min(g) as usize;
            let data: Vec<u8> = match k {
                0 => continue,
                1 => vec![0u8; g as usize],
                2 => (0..g).map(|j| (j % 253) as u8 ^ i as u8).collect(),
                _ => (0..g).map(|j| (j.wrapping_mul(2654435761) >> 11) as u8).collect(),
            };
            let stored = if whole_last { &data[..] } else { &data[..want] };
            model[start as usize..start as usize + want].copy_from_slice(&data[..want]);
            w.write_grain(i as u64, stored, 1).unwrap();
        }
        let (bytes, _, _) = w.finish().unwrap();
        let pool = (threads > 0)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
        let read = |out: Out<'_>| {
            let mut input = &bytes[..];
            let mut c = Counted::new(&mut input, name);
            let mut first = [0u8; 512];
            c.exact(&mut first).unwrap();
            let h = parse_first(&first, name).unwrap();
            read_stream_to(pool.as_ref(), &mut c, &h, 0, out, None).map(|_| ())
        };
        let mut by_units = vec![0u8; cap as usize];
        let mut last_end = 0;
        read(Out::Units(unit as usize, &mut |start, buf| {
            assert_eq!(start % unit, 0);
            assert!(start >= last_end, "units out of order");
            assert_eq!(buf.len() as u64, (cap - start).min(unit));
            assert!(!crate::mem::is_zero(&buf), "a unit of zeros was handed out");
            by_units[start as usize..start as usize + buf.len()].copy_from_slice(&buf);
            last_end = start + buf.len() as u64;
            Ok(())
        }))
        .unwrap();
        let mut by_pieces = vec![0u8; cap as usize];
        read(Out::Pieces(&mut |at, b| {
            by_pieces[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok(())
        }))
        .unwrap();
        proptest::prop_assert!(by_units == model, "units differ from the model");
        proptest::prop_assert!(by_pieces == model, "pieces differ from the model");
    }
}
