//! NTFS: free clusters from `$Bitmap`, read with the `ntfs` crate.
//!
//! Trusted: the boot sector and `$Bitmap` (bit k set = cluster k in use). Declined
//! (copied whole): a volume whose dirty flag is set, whose `$LogFile` holds
//! transactions not yet applied (a crash-consistent snapshot of a mounted volume: its
//! `$Bitmap` may lag the log), or that is hibernated (`hiberfil.sys` holding an image,
//! Windows' fast start-up included); a `$Bitmap` too short for the volume's clusters.
//! The backup boot sector past the last cluster is never left out.

use std::io::{Read, Seek, SeekFrom};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::NtfsVolumeFlags;
use ntfs::{KnownNtfsFileRecordNumber, Ntfs, NtfsFile};

use super::{le16, le64, whole, Decline, Found, FreeRuns, Parsed, Volume};
use crate::error::Error;

/// `Read + Seek` over a volume for the crate; a disk error is kept to be reported as
/// one (not as a file system the crate could not read).
struct Reader<'v, 'd> {
    vol: &'v Volume<'d>,
    pos: u64,
    failed: Option<Error>,
}

impl Read for Reader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.vol.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        match self.vol.read_into(self.pos, &mut buf[..n]) {
            Ok(()) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(Decline::Io(e)) => {
                let msg = e.to_string();
                self.failed = Some(e);
                Err(std::io::Error::other(msg))
            }
            Err(Decline::Whole(why)) => Err(std::io::Error::other(why)),
        }
    }
}

impl Seek for Reader<'_, '_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.vol.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// `Ok(None)` when `vol` does not start with an NTFS boot sector.
pub(super) fn probe(vol: &Volume, head: &[u8]) -> Parsed<Option<Found>> {
    if &head[3..11] != b"NTFS    " {
        return Ok(None);
    }
    let mut r = Reader {
        vol,
        pos: 0,
        failed: None,
    };
    let result = bitmap(&mut r);
    match (result, r.failed.take()) {
        (_, Some(e)) => Err(Decline::Io(e)),
        (Ok(found), None) => Ok(Some(found)),
        (Err(Decline::Whole(why)), None) => whole(format!("NTFS: {why}")),
        (Err(e), None) => Err(e),
    }
}

/// The crate's errors decline the partition, naming what was being read.
fn ctx<T>(what: &str, r: ntfs::Result<T>) -> Parsed<T> {
    r.map_err(|e| Decline::Whole(format!("{what}: {e}")))
}

fn bitmap(r: &mut Reader) -> Parsed<Found> {
    let mut fs = ctx("boot sector", Ntfs::new(r))?;
    if fs.size() > r.vol.len {
        return whole("the volume is larger than the partition");
    }
    let info = ctx("$Volume", fs.volume_info(r))?;
    if info.flags().contains(NtfsVolumeFlags::IS_DIRTY) {
        return whole("the volume is dirty (chkdsk pending)");
    }
    logfile_clean(&fs, r)?;
    ctx("$UpCase", fs.read_upcase_table(r))?;
    not_hibernated(&fs, r)?;
    let cluster = fs.cluster_size() as u64;
    let clusters = fs.size() / cluster;
    let file = ctx(
        "$Bitmap",
        fs.file(r, KnownNtfsFileRecordNumber::Bitmap as u64),
    )?;
    let mut runs = FreeRuns::new(r.vol.start);
    let read = with_data(&file, r, "$Bitmap", |len, value| {
        if len < clusters.div_ceil(8) {
            return whole(format!("$Bitmap holds {len} bytes for {clusters} clusters"));
        }
        let mut buf = vec![0u8; 1 << 16];
        let mut k = 0u64; // first cluster of `buf`
        while k < clusters {
            let want = ((clusters - k).div_ceil(8) as usize).min(buf.len());
            read_exact("$Bitmap", value, &mut buf[..want])?;
            free_bits(&buf[..want], k, clusters, cluster, &mut runs);
            k += want as u64 * 8;
        }
        Ok(())
    })?;
    if read.is_none() {
        return whole("$Bitmap has no data");
    }
    Ok(Found {
        fs: format!("NTFS ({cluster}-byte clusters)"),
        free: runs.finish(),
    })
}

/// The clear bits of `bits` (cluster `first` onwards, below `clusters`) as free runs.
fn free_bits(bits: &[u8], first: u64, clusters: u64, cluster: u64, runs: &mut FreeRuns) {
    for (i, &byte) in bits.iter().enumerate() {
        if byte == 0xFF {
            continue;
        }
        for bit in 0..8 {
            let c = first + i as u64 * 8 + bit;
            if c < clusters && byte & (1 << bit) == 0 {
                runs.push(c * cluster, (c + 1) * cluster);
            }
        }
    }
}

/// Run `f` over the unnamed `$DATA` of `file` (its length and a reader over it); None
/// when the file has none.
fn with_data<T>(
    file: &NtfsFile,
    r: &mut Reader,
    what: &str,
    f: impl FnOnce(u64, &mut dyn Read) -> Parsed<T>,
) -> Parsed<Option<T>> {
    let Some(item) = file.data(r, "") else {
        return Ok(None);
    };
    let item = ctx(what, item)?;
    let attr = ctx(what, item.to_attribute())?;
    let value = ctx(what, attr.value(r))?;
    let len = value.len();
    f(len, &mut value.attach(r)).map(Some)
}

fn read_exact(what: &str, from: &mut dyn Read, buf: &mut [u8]) -> Parsed<()> {
    from.read_exact(buf)
        .map_err(|e| Decline::Whole(format!("{what}: {e}")))
}

/// `$LogFile` must be empty (all 0xFF, as mkntfs and ntfs-3g leave it) or its newest
/// restart area must say the volume is clean or has no client in use.
fn logfile_clean(fs: &Ntfs, r: &mut Reader) -> Parsed<()> {
    let file = ctx(
        "$LogFile",
        fs.file(r, KnownNtfsFileRecordNumber::LogFile as u64),
    )?;
    let mut head = vec![0u8; 8192];
    let read = with_data(&file, r, "$LogFile", |len, value| {
        if len < 8192 {
            return whole("$LogFile is shorter than its two restart pages");
        }
        read_exact("$LogFile", value, &mut head)
    })?;
    if read.is_none() {
        return whole("$LogFile has no data");
    }
    if head.iter().all(|&b| b == 0xFF) {
        return Ok(());
    }
    // Each restart page: "RSTR", restart area offset at 0x18; in the area, the current
    // LSN at 0, the in-use client list at 0x0C, flags at 0x0E (0x2 = clean).
    let page = |p: &[u8]| -> Option<(u64, bool)> {
        if &p[..4] != b"RSTR" {
            return None;
        }
        let ra = le16(p, 0x18) as usize;
        if ra + 0x10 > 510 {
            return None;
        }
        let clean = le16(p, ra + 0x0C) == 0xFFFF || le16(p, ra + 0x0E) & 0x2 != 0;
        Some((le64(p, ra), clean))
    };
    // The two copies sit one 4 KiB system page apart (the page size Windows uses).
    let newest = match (page(&head[..4096]), page(&head[4096..])) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    };
    match newest {
        Some((_, true)) => Ok(()),
        Some((_, false)) => {
            whole("$LogFile holds transactions not yet applied (not cleanly unmounted)")
        }
        None => whole("$LogFile's restart area could not be read"),
    }
}

/// A `hiberfil.sys` in the root whose first bytes are not zeros or `wake` holds a
/// hibernated system: its `$Bitmap` is what it was at hibernation, not what it will be.
fn not_hibernated(fs: &Ntfs, r: &mut Reader) -> Parsed<()> {
    let root = ctx("root directory", fs.root_directory(r))?;
    let index = ctx("root directory", root.directory_index(r))?;
    let mut finder = index.finder();
    let Some(entry) = NtfsFileNameIndex::find(&mut finder, fs, r, "hiberfil.sys") else {
        return Ok(());
    };
    let entry = ctx("hiberfil.sys", entry)?;
    let file = ctx("hiberfil.sys", entry.to_file(fs, r))?;
    let mut magic = [0u8; 4];
    let read = with_data(&file, r, "hiberfil.sys", |len, value| match len >= 4 {
        true => read_exact("hiberfil.sys", value, &mut magic),
        false => Ok(()),
    })?;
    if read.is_none() || magic == [0; 4] || magic.eq_ignore_ascii_case(b"wake") {
        return Ok(());
    }
    whole("the volume is hibernated (hiberfil.sys holds an image)")
}
