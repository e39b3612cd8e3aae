//! FAT12/16/32: free clusters from the FATs.
//!
//! Trusted: the boot sector's BPB and the FATs. A cluster is free only when its entry is
//! 0 in every copy of the FAT (copies that disagree cost space, never data). The
//! reserved area, every FAT, the FAT12/16 root directory and the sectors past the last
//! whole cluster are never left out. Declined (copied whole): a FAT16/32 volume whose
//! clean-shutdown bit is off or whose hard-error bit is set, a BPB out of range, FATs
//! too short for the clusters they map.

use super::{le16, le32, whole, Found, FreeRuns, Parsed, Volume};

/// Entries read at once, per FAT copy.
const CHUNK: u64 = 1 << 18;

/// `Ok(None)` when `vol` does not start with a FAT boot sector.
pub(super) fn probe(vol: &Volume, head: &[u8]) -> Parsed<Option<Found>> {
    let b = &head[..512];
    let bps = le16(b, 11);
    let spc = b[13] as u64;
    let reserved = le16(b, 14);
    let fats = b[16] as u64;
    let root_entries = le16(b, 17);
    let total = if le16(b, 19) != 0 {
        le16(b, 19)
    } else {
        le32(b, 32)
    };
    let fat_sectors = if le16(b, 22) != 0 {
        le16(b, 22)
    } else {
        le32(b, 36)
    };
    let looks_fat = (b[0] == 0xEB || b[0] == 0xE9)
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && spc <= 128
        && reserved >= 1
        && (1..=2).contains(&fats)
        && (b[21] == 0xF0 || b[21] >= 0xF8)
        && b[510] == 0x55
        && b[511] == 0xAA;
    if !looks_fat {
        return Ok(None);
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + fats * fat_sectors + root_sectors;
    if fat_sectors == 0 || total <= data_start || total * bps > vol.len {
        return whole("FAT: the boot sector's geometry is larger than the partition");
    }
    let clusters = (total - data_start) / spc;
    let (name, bits) = if clusters < 4085 {
        ("FAT12", 12)
    } else if clusters < 65525 {
        ("FAT16", 16)
    } else {
        ("FAT32", 32)
    };
    if (bits == 32) != (le16(b, 22) == 0) || (bits == 32 && root_entries != 0) {
        return whole(format!(
            "{name}: the boot sector mixes FAT12/16 and FAT32 fields"
        ));
    }
    let entries = clusters + 2;
    if entries * bits > fat_sectors * bps * 8 {
        return whole(format!(
            "{name}: the FAT is too short for {clusters} clusters"
        ));
    }
    let fat = |copy: u64| (reserved + copy * fat_sectors) * bps;
    let cluster_bytes = spc * bps;
    let mut runs = FreeRuns::new(vol.start);
    let mut first = 0;
    while first < entries {
        let n = CHUNK.min(entries - first);
        // Entries [first, first + n) of every copy; FAT12 packs two in three bytes.
        let (from, to) = ((first * bits) / 8, ((first + n) * bits).div_ceil(8));
        let copies = (0..fats)
            .map(|c| vol.read(fat(c) + from, (to - from) as usize))
            .collect::<Parsed<Vec<_>>>()?;
        for i in first..first + n {
            let value = |t: &[u8]| -> u64 {
                let at = ((i * bits) / 8 - from) as usize;
                match bits {
                    12 => {
                        let v = le16(t, at);
                        if i % 2 == 0 {
                            v & 0xFFF
                        } else {
                            v >> 4
                        }
                    }
                    16 => le16(t, at),
                    _ => le32(t, at) & 0x0FFF_FFFF,
                }
            };
            if i == 1 && bits != 12 {
                // Entry 1's top bits: clean shutdown, no hard error (both set when clean).
                let (clean, ok) = if bits == 16 {
                    (0x8000, 0x4000)
                } else {
                    (0x0800_0000, 0x0400_0000)
                };
                let raw = if bits == 16 {
                    le16(&copies[0], 2 - from as usize)
                } else {
                    le32(&copies[0], 4 - from as usize)
                };
                if raw & clean == 0 || raw & ok == 0 {
                    return whole(format!("{name}: the volume is dirty (not cleanly unmounted, or marked with errors)"));
                }
            }
            if i < 2 {
                continue;
            }
            if copies.iter().all(|t| value(t) == 0) {
                let at = data_start * bps + (i - 2) * cluster_bytes;
                runs.push(at, at + cluster_bytes);
            }
        }
        first += n;
    }
    Ok(Some(Found {
        fs: name.to_string(),
        free: runs.finish(),
    }))
}
