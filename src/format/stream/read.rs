//! The stream-specific parts of reading streamOptimized files by random access: grain
//! records inflate to grains, and the footer of a GD_AT_END file (formats.md §3.3).

use std::io::Read;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::sparse::{SparseHeader, GD_AT_END, MARKER_FOOTER};
use crate::io::Source;

/// Inflate one compressed grain into `out` (`grain` bytes long), which must come out at
/// least `want` bytes: the grain's bytes inside the disk (the last grain may be partial).
/// Returns how many bytes it inflated to; `out` past them is left as it was.
pub fn inflate_grain_into(
    cmp: &[u8],
    want: usize,
    out: &mut [u8],
) -> std::result::Result<usize, String> {
    thread_local! {
        static INFLATER: std::cell::RefCell<libdeflater::Decompressor> =
            std::cell::RefCell::new(libdeflater::Decompressor::new());
    }
    let grain = out.len();
    let short = |n: usize| {
        format!("compressed grain inflates to {n} bytes, short of the {want} bytes it holds (qemu refuses such grains)")
    };
    let fast = INFLATER.with(|d| d.borrow_mut().zlib_decompress(cmp, out));
    if let Ok(n) = fast {
        if n < want {
            return Err(short(n));
        }
        return Ok(n);
    }
    let mut slow = Vec::with_capacity(want);
    let mut d = flate2::read::ZlibDecoder::new(cmp);
    let n = (&mut d)
        .take(grain as u64 + 1)
        .read_to_end(&mut slow)
        .map_err(|e| format!("compressed grain does not inflate: {e}"))?;
    if n > grain {
        return Err(format!(
            "compressed grain inflates past the {grain}-byte grain size"
        ));
    }
    if n < want {
        return Err(short(n));
    }
    out[..n].copy_from_slice(&slow);
    Ok(n)
}

/// Inflate one compressed grain (see [`inflate_grain_into`]): its first `want` bytes.
pub fn inflate_grain(
    cmp: &[u8],
    want: usize,
    grain: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut out = vec![0u8; grain.max(want)];
    inflate_grain_into(cmp, want, &mut out[..grain])?;
    out.truncate(want);
    Ok(out)
}

/// Read the footer of a GD_AT_END stream (formats.md §3.3).
pub(crate) fn read_footer(src: &Source, header: &SparseHeader) -> Result<SparseHeader> {
    // Uncompressed files may put the directory at the end too (qemu reads them): the
    // footer is found the same way, by the file's last three sectors.
    let path = src.path();
    let len = src.len();
    if len < 3 * 512 + 512 {
        return Err(Error::corrupt(path, 0, "stream too short to hold a footer"));
    }
    let at = (len & !511) - 1536;
    let mut b = [0u8; 1536];
    src.read_exact_at(&mut b, at)?;
    let marker_ok = LE::read_u32(&b[8..12]) == 0 && LE::read_u32(&b[12..16]) == MARKER_FOOTER;
    let eos_ok = b[1024..1040].iter().all(|&x| x == 0);
    let footer = SparseHeader::parse(b[512..1024].try_into().expect("512 bytes"));
    match footer {
        Some(f) if marker_ok && eos_ok => {
            f.validate(src)?;
            if f.gd_offset == GD_AT_END {
                return Err(Error::corrupt(
                    path,
                    at + 512 + 56,
                    "footer also says the grain directory is at the end",
                ));
            }
            if f.capacity_sectors != header.capacity_sectors || f.grain_size != header.grain_size {
                return Err(Error::corrupt(
                    path,
                    at + 512,
                    "footer disagrees with the header on capacity or grain size",
                ));
            }
            Ok(f)
        }
        _ => Err(Error::corrupt(
            path,
            at,
            "invalid footer: the header puts the grain directory at the end, but the file does not end with footer marker, footer and end-of-stream marker (truncated or unfinished stream?)",
        )),
    }
}
