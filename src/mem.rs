//! Memory the copy engine and the pipe readers share: recycled unit buffers and the zero
//! test. At the bottom of the tree, so a format reader can fill the engine's units itself.

/// The engine's unit: 1 MiB of the virtual disk.
pub(crate) const UNIT: u64 = 1 << 20;

/// Unit buffers recycled from the sink back to the readers: a fresh 1 MiB buffer per
/// unit cost page faults and page clearing (about 4% of a stream export's CPU). At most
/// two windows' worth are kept, so the memory bound is the pipeline's.
pub(crate) mod buffers {
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    const KEEP: usize = 64;

    /// A buffer of exactly `len` bytes (contents unspecified: the caller fills it all).
    pub(crate) fn take(len: usize) -> Vec<u8> {
        let reused = POOL.lock().ok().and_then(|mut p| p.pop());
        match reused {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Hand a buffer back for reuse.
    pub(crate) fn give(b: Vec<u8>) {
        if b.capacity() > super::UNIT as usize * 2 {
            return;
        }
        if let Ok(mut p) = POOL.lock() {
            if p.len() < KEEP {
                p.push(b);
            }
        }
    }
}

/// Whether a buffer is all zeros (64-byte blocks OR-ed as words; vectorizes well).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}
