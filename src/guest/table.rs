//! Partition tables: GPT (primary and backup checked against each other) and MBR with
//! extended/logical partitions.
//!
//! Read by hand rather than with the `gpt` and `mbrman` crates: `gpt` 4.1 asserts on an
//! entry size other than 128 and allocates `entries × size` bytes as the header says,
//! and `mbrman` 0.6 adds untrusted 32-bit LBAs unchecked; here every field is bounded
//! before it sizes anything, and a table this code does not fully trust makes the whole
//! disk copied, never a guess. What a table yields is only where to look for file
//! systems; the sectors of the tables themselves, and every byte outside the
//! partitions, are never left out.

use crate::disk::VirtualDisk;
use crate::error::Result;

use super::{le16, le32, le64};

const SECTOR: u64 = 512;
/// At most this many GPT entries (sgdisk makes 128) and logical partitions.
const MAX_ENTRIES: u64 = 1024;
const MAX_LOGICAL: usize = 256;

/// One partition found.
pub(crate) struct Part {
    pub(crate) number: Option<u32>,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) type_name: String,
    /// Whether its type may hold a file system the parsers read.
    pub(crate) probe: bool,
}

pub(crate) struct Table {
    pub(crate) kind: &'static str,
    pub(crate) note: Option<String>,
    pub(crate) parts: Vec<Part>,
}

impl Table {
    fn untrusted(kind: &'static str, why: String) -> Table {
        Table {
            kind,
            note: Some(format!("{why}: the whole disk is copied")),
            parts: Vec::new(),
        }
    }
}

fn sector(disk: &dyn VirtualDisk, lba: u64) -> Result<Option<Vec<u8>>> {
    bytes(disk, lba.saturating_mul(SECTOR), SECTOR as usize)
}

fn bytes(disk: &dyn VirtualDisk, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= disk.capacity() => {
            let mut b = vec![0u8; len];
            disk.read_at(&mut b, offset)?;
            Ok(Some(b))
        }
        _ => Ok(None),
    }
}

/// The partition table of `disk`, or the whole disk as one volume when sector 0 is a
/// file system's boot sector, or nothing to look into.
pub(crate) fn read(disk: &dyn VirtualDisk) -> Result<Table> {
    let Some(s0) = sector(disk, 0)? else {
        return Ok(Table::untrusted(
            "none",
            "the disk is smaller than a sector".into(),
        ));
    };
    let signed = s0[510] == 0x55 && s0[511] == 0xAA;
    let entries: Vec<[u8; 16]> = (0..4)
        .map(|i| s0[446 + 16 * i..462 + 16 * i].try_into().expect("16 bytes"))
        .collect();
    if signed && entries.iter().any(|e| e[4] == 0xEE) {
        return gpt(disk);
    }
    let whole_disk = Part {
        number: None,
        start: 0,
        len: disk.capacity(),
        type_name: "whole disk".into(),
        probe: true,
    };
    let mbr_like = signed
        && entries.iter().all(|e| e[0] == 0 || e[0] == 0x80)
        && entries.iter().any(|e| e[4] != 0);
    // A file system's boot sector also ends in 55 AA: a FAT or NTFS volume on the whole
    // disk (a "superfloppy") is one volume, not a table. A sector that reads as both (a
    // boot loader that kept an old BPB) is trusted as neither.
    if boot_sector_of_a_volume(&s0) {
        if mbr_like {
            return Ok(Table::untrusted(
                "none",
                "sector 0 reads both as an MBR and as a file system's boot sector".into(),
            ));
        }
        return Ok(Table {
            kind: "none",
            note: None,
            parts: vec![whole_disk],
        });
    }
    if mbr_like {
        return mbr(disk, &entries);
    }
    // No table: an ext file system may start at byte 0 (its superblock is at 1024).
    Ok(Table {
        kind: "none",
        note: None,
        parts: vec![whole_disk],
    })
}

pub(super) fn boot_sector_of_a_volume(s0: &[u8]) -> bool {
    if &s0[3..11] == b"NTFS    " {
        return true;
    }
    // A FAT BPB: a jump, a power-of-two sector size and cluster size, reserved
    // sectors, one or two FATs, a media byte.
    let bps = le16(s0, 11);
    let spc = s0[13] as u64;
    (s0[0] == 0xEB || s0[0] == 0xE9)
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && le16(s0, 14) >= 1
        && matches!(s0[16], 1 | 2)
        && (s0[21] == 0xF0 || s0[21] >= 0xF8)
}

/// MBR partition types that may hold ext, FAT or NTFS file systems (hidden variants
/// included); anything else is copied whole unopened.
fn mbr_probe(ty: u8) -> bool {
    matches!(
        ty,
        0x01 | 0x04
            | 0x06
            | 0x07
            | 0x0B
            | 0x0C
            | 0x0E
            | 0x11
            | 0x14
            | 0x16
            | 0x17
            | 0x1B
            | 0x1C
            | 0x1E
            | 0x27
            | 0x83
            | 0xEF
    )
}

fn is_extended(ty: u8) -> bool {
    matches!(ty, 0x05 | 0x0F | 0x85)
}

fn mbr(disk: &dyn VirtualDisk, entries: &[[u8; 16]]) -> Result<Table> {
    let cap_sectors = disk.capacity() / SECTOR;
    let mut parts = Vec::new();
    // Sectors holding tables (the MBR and every EBR): no volume may cover one.
    let mut table_sectors = vec![0u64];
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let (ty, start, len) = (e[4], le32(e, 8), le32(e, 12));
        if ty == 0 {
            continue;
        }
        if len == 0 || start == 0 || start + len > cap_sectors {
            return Ok(Table::untrusted(
                "mbr",
                format!(
                    "MBR partition {} (sectors {start}+{len}) lies outside the disk",
                    i + 1
                ),
            ));
        }
        if is_extended(ty) {
            if extended.is_some() {
                return Ok(Table::untrusted(
                    "mbr",
                    "the MBR has two extended partitions".into(),
                ));
            }
            extended = Some((start, len));
            continue;
        }
        parts.push(Part {
            number: Some(i as u32 + 1),
            start: start * SECTOR,
            len: len * SECTOR,
            type_name: format!("{ty:#04x}"),
            probe: mbr_probe(ty),
        });
    }
    if let Some((ext_start, ext_len)) = extended {
        // The EBR chain: each EBR describes one logical partition (relative to itself)
        // and links the next EBR (relative to the extended partition), always forward.
        let mut ebr = ext_start;
        for n in 0.. {
            if n == MAX_LOGICAL {
                return Ok(Table::untrusted(
                    "mbr",
                    format!("more than {MAX_LOGICAL} logical partitions"),
                ));
            }
            let Some(s) = sector(disk, ebr)? else {
                return Ok(Table::untrusted(
                    "mbr",
                    format!("EBR at sector {ebr} lies outside the disk"),
                ));
            };
            if s[510] != 0x55 || s[511] != 0xAA {
                if n == 0 {
                    break; // an empty extended partition
                }
                return Ok(Table::untrusted(
                    "mbr",
                    format!("EBR at sector {ebr} has no signature"),
                ));
            }
            table_sectors.push(ebr);
            let (l, next) = (&s[446..462], &s[462..478]);
            if l[4] != 0 {
                let (start, len) = (ebr + le32(l, 8), le32(l, 12));
                if le32(l, 8) == 0 || len == 0 || start + len > ext_start + ext_len {
                    return Ok(Table::untrusted(
                        "mbr",
                        format!("logical partition in EBR at sector {ebr} lies outside the extended partition"),
                    ));
                }
                parts.push(Part {
                    number: Some(5 + n as u32),
                    start: start * SECTOR,
                    len: len * SECTOR,
                    type_name: format!("{:#04x}", l[4]),
                    probe: mbr_probe(l[4]),
                });
            }
            if next[4] == 0 || le32(next, 8) == 0 {
                break;
            }
            let to = ext_start + le32(next, 8);
            if to <= ebr || to >= ext_start + ext_len {
                return Ok(Table::untrusted(
                    "mbr",
                    format!("EBR at sector {ebr} links backwards or out"),
                ));
            }
            ebr = to;
        }
    }
    Ok(checked("mbr", parts, &table_sectors))
}

/// The volumes must not overlap each other or cover a table sector.
fn checked(kind: &'static str, mut parts: Vec<Part>, table_sectors: &[u64]) -> Table {
    parts.sort_by_key(|p| p.start);
    for w in parts.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            return Table::untrusted(
                kind,
                format!("partitions {} and {} overlap", num(&w[0]), num(&w[1])),
            );
        }
    }
    for p in &parts {
        if let Some(s) = table_sectors
            .iter()
            .find(|&&s| s * SECTOR >= p.start && s * SECTOR < p.start + p.len)
        {
            return Table::untrusted(
                kind,
                format!("partition {} covers the table at sector {s}", num(p)),
            );
        }
    }
    Table {
        kind,
        note: None,
        parts,
    }
}

fn num(p: &Part) -> String {
    p.number.map_or("-".into(), |n| n.to_string())
}

/// A GPT header, checked on its own.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    this: u64,
    other: u64,
    first_usable: u64,
    last_usable: u64,
    guid: [u8; 16],
    entries_lba: u64,
    count: u64,
    size: u64,
    entries_crc: u32,
}

fn header(disk: &dyn VirtualDisk, lba: u64) -> Result<std::result::Result<Header, String>> {
    let Some(s) = sector(disk, lba)? else {
        return Ok(Err(format!(
            "GPT header at sector {lba} lies outside the disk"
        )));
    };
    if &s[..8] != b"EFI PART" {
        return Ok(Err(format!("no GPT header at sector {lba}")));
    }
    let hsize = le32(&s, 12);
    if !(92..=SECTOR).contains(&hsize) {
        return Ok(Err(format!(
            "GPT header at sector {lba}: header size {hsize}"
        )));
    }
    let mut h = s[..hsize as usize].to_vec();
    h[16..20].fill(0);
    if crc32fast::hash(&h) as u64 != le32(&s, 16) {
        return Ok(Err(format!("GPT header at sector {lba}: CRC mismatch")));
    }
    let hd = Header {
        this: le64(&s, 24),
        other: le64(&s, 32),
        first_usable: le64(&s, 40),
        last_usable: le64(&s, 48),
        guid: s[56..72].try_into().expect("16 bytes"),
        entries_lba: le64(&s, 72),
        count: le32(&s, 80),
        size: le32(&s, 84),
        entries_crc: le32(&s, 88) as u32,
    };
    if hd.this != lba {
        return Ok(Err(format!(
            "GPT header at sector {lba} says it is at sector {}",
            hd.this
        )));
    }
    if hd.count > MAX_ENTRIES || hd.size < 128 || hd.size > 1024 || hd.size % 8 != 0 {
        return Ok(Err(format!(
            "GPT header at sector {lba}: {} entries of {} bytes",
            hd.count, hd.size
        )));
    }
    let Some(array) = bytes(
        disk,
        hd.entries_lba.saturating_mul(SECTOR),
        (hd.count * hd.size) as usize,
    )?
    else {
        return Ok(Err(format!(
            "GPT entries of the header at sector {lba} lie outside the disk"
        )));
    };
    if crc32fast::hash(&array) != hd.entries_crc {
        return Ok(Err(format!(
            "GPT entries of the header at sector {lba}: CRC mismatch"
        )));
    }
    Ok(Ok(hd))
}

fn gpt(disk: &dyn VirtualDisk) -> Result<Table> {
    let last = disk.capacity() / SECTOR - 1;
    let p = match header(disk, 1)? {
        Ok(h) => h,
        Err(why) => return Ok(Table::untrusted("gpt", why)),
    };
    if p.other != last {
        return Ok(Table::untrusted(
            "gpt",
            format!(
                "the backup GPT header is at sector {}, not the disk's last ({last})",
                p.other
            ),
        ));
    }
    let b = match header(disk, p.other)? {
        Ok(h) => h,
        Err(why) => return Ok(Table::untrusted("gpt", why)),
    };
    let agree = b.other == 1
        && b.guid == p.guid
        && b.first_usable == p.first_usable
        && b.last_usable == p.last_usable
        && b.count == p.count
        && b.size == p.size
        && b.entries_crc == p.entries_crc;
    if !agree {
        return Ok(Table::untrusted(
            "gpt",
            "the primary and backup GPT headers disagree".into(),
        ));
    }
    if p.first_usable > p.last_usable || p.last_usable >= last {
        return Ok(Table::untrusted(
            "gpt",
            "the GPT's usable range lies outside the disk".into(),
        ));
    }
    let array = bytes(disk, p.entries_lba * SECTOR, (p.count * p.size) as usize)?.expect("checked");
    let mut parts = Vec::new();
    for (i, e) in array.chunks(p.size as usize).enumerate() {
        let ty: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if ty == [0; 16] {
            continue;
        }
        let (first, last_lba) = (le64(e, 32), le64(e, 40));
        if first < p.first_usable || last_lba < first || last_lba > p.last_usable {
            return Ok(Table::untrusted(
                "gpt",
                format!(
                    "GPT entry {} (sectors {first}-{last_lba}) lies outside the usable range",
                    i + 1
                ),
            ));
        }
        let guid = guid_text(&ty);
        parts.push(Part {
            number: Some(i as u32 + 1),
            start: first * SECTOR,
            len: (last_lba - first + 1) * SECTOR,
            probe: GPT_PROBE.contains(&guid.as_str()),
            type_name: guid,
        });
    }
    // Table sectors: both headers and both entry arrays.
    let array_sectors = (p.count * p.size).div_ceil(SECTOR);
    let mut tables: Vec<u64> = vec![0, 1, p.other];
    tables.extend(p.entries_lba..p.entries_lba + array_sectors);
    tables.extend(b.entries_lba..b.entries_lba + array_sectors);
    Ok(checked("gpt", parts, &tables))
}

/// GPT partition types that may hold ext, FAT or NTFS file systems.
const GPT_PROBE: &[&str] = &[
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4", // Linux filesystem data
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", // Microsoft basic data
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", // EFI system partition
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC", // Windows recovery
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", // Linux root (x86-64)
    "44479540-F297-41B2-9AF7-D131D5F0458A", // Linux root (x86)
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE", // Linux root (arm64)
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915", // Linux /home
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8", // Linux /srv
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D", // Linux /var
    "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1", // Linux /var/tmp
    "BC13C2FF-59E6-4262-A352-B275FD6F7172", // Linux extended boot
];

/// A GUID as people write it: the first three groups little-endian.
fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(g[..4].try_into().expect("4")),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Alloc, Run};

    struct Mem(Vec<u8>);

    impl VirtualDisk for Mem {
        fn capacity(&self) -> u64 {
            self.0.len() as u64
        }
        fn granularity(&self) -> u64 {
            512
        }
        fn map(&self, r: std::ops::Range<u64>) -> Result<Vec<Run>> {
            Ok(vec![Run {
                start: r.start,
                len: r.end - r.start,
                alloc: Alloc::Zero,
                depth: 0,
            }])
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    fn entry(d: &mut [u8], at: usize, status: u8, ty: u8, start: u32, len: u32) {
        d[at] = status;
        d[at + 4] = ty;
        d[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        d[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    }

    fn sign(d: &mut [u8], sector: usize) {
        d[sector * 512 + 510] = 0x55;
        d[sector * 512 + 511] = 0xAA;
    }

    #[test]
    fn an_ebr_chain_that_links_backwards_is_not_trusted() {
        let mut d = vec![0u8; 8 << 20];
        entry(&mut d, 446, 0, 0x05, 2048, 8192);
        sign(&mut d, 0);
        // EBR at 2048: a logical partition, next EBR at +4096; that one links back to +0.
        entry(&mut d, 2048 * 512 + 446, 0, 0x83, 63, 1000);
        entry(&mut d, 2048 * 512 + 462, 0, 0x05, 4096, 2000);
        sign(&mut d, 2048);
        entry(&mut d, 6144 * 512 + 446, 0, 0x83, 63, 1000);
        entry(&mut d, 6144 * 512 + 462, 0, 0x05, 0, 2000);
        d[6144 * 512 + 462 + 8] = 1; // relative 1: behind this EBR
        sign(&mut d, 6144);
        let t = read(&Mem(d.clone())).unwrap();
        assert!(t.note.unwrap().contains("links backwards"));
        assert!(t.parts.is_empty());
        // Ended properly, the same chain gives two logical partitions, numbered 5 and 6.
        d[6144 * 512 + 462..6144 * 512 + 478].fill(0);
        let t = read(&Mem(d)).unwrap();
        assert!(t.note.is_none());
        let n: Vec<_> = t.parts.iter().map(|p| (p.number, p.start / 512)).collect();
        assert_eq!(n, [(Some(5), 2048 + 63), (Some(6), 6144 + 63)]);
    }

    #[test]
    fn a_sector_that_is_both_an_mbr_and_a_boot_sector_is_trusted_as_neither() {
        let mut d = vec![0u8; 4 << 20];
        // A FAT BPB (jump, 512-byte sectors, 1 sector per cluster, 1 reserved, 2 FATs).
        d[0] = 0xEB;
        d[11..13].copy_from_slice(&512u16.to_le_bytes());
        d[13] = 1;
        d[14] = 1;
        d[16] = 2;
        d[21] = 0xF8;
        sign(&mut d, 0);
        assert!(read(&Mem(d.clone())).unwrap().note.is_none());
        entry(&mut d, 446, 0x80, 0x83, 2048, 4096);
        let t = read(&Mem(d)).unwrap();
        assert!(t.note.unwrap().contains("both"));
        assert!(t.parts.is_empty());
    }

    /// A GPT with `count` entries of `size` bytes, one partition, both headers.
    fn gpt_disk(count: u32, size: u32, backup_guid_differs: bool) -> Vec<u8> {
        let sectors = 8192u64;
        let mut d = vec![0u8; (sectors * 512) as usize];
        entry(&mut d, 446, 0, 0xEE, 1, (sectors - 1) as u32);
        sign(&mut d, 0);
        let array_sectors = (count as u64 * size as u64).div_ceil(512);
        let mut array = vec![0u8; (count * size) as usize];
        array[..16].copy_from_slice(&[0xAF; 16]);
        array[32..40].copy_from_slice(&2048u64.to_le_bytes());
        array[40..48].copy_from_slice(&4095u64.to_le_bytes());
        let crc = crc32fast::hash(&array);
        let mut put_header = |lba: u64, other: u64, entries: u64, guid: u8| {
            let mut h = [0u8; 92];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&lba.to_le_bytes());
            h[32..40].copy_from_slice(&other.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + array_sectors).to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 2 - array_sectors).to_le_bytes());
            h[56..72].fill(guid);
            h[72..80].copy_from_slice(&entries.to_le_bytes());
            h[80..84].copy_from_slice(&count.to_le_bytes());
            h[84..88].copy_from_slice(&size.to_le_bytes());
            h[88..92].copy_from_slice(&crc.to_le_bytes());
            let c = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            let at = (lba * 512) as usize;
            d[at..at + 92].copy_from_slice(&h);
            let e = (entries * 512) as usize;
            d[e..e + array.len()].copy_from_slice(&array);
        };
        put_header(1, sectors - 1, 2, 7);
        let guid = if backup_guid_differs { 8 } else { 7 };
        put_header(sectors - 1, 1, sectors - 1 - array_sectors, guid);
        d
    }

    #[test]
    fn gpt_entries_of_any_size_and_headers_that_disagree() {
        for size in [128, 256] {
            let t = read(&Mem(gpt_disk(128, size, false))).unwrap();
            assert!(t.note.is_none(), "{:?}", t.note);
            assert_eq!(t.parts.len(), 1);
            assert_eq!((t.parts[0].start, t.parts[0].len), (2048 * 512, 2048 * 512));
        }
        let t = read(&Mem(gpt_disk(128, 128, true))).unwrap();
        assert!(t.note.unwrap().contains("disagree"));
        // More entries than any tool makes: refused before anything is sized by them.
        let t = read(&Mem(gpt_disk(4096, 128, false))).unwrap();
        assert!(t.note.unwrap().contains("4096 entries"));
    }
}
