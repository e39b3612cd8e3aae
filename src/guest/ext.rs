//! ext2/ext3/ext4: free blocks from the block bitmaps.
//!
//! Trusted: the superblock (magic, geometry, features), the group descriptors (32- and
//! 64-bit, flex_bg and meta_bg placement) and the block bitmaps. A group marked
//! BLOCK_UNINIT (honoured only with group-descriptor checksums, as the kernel does) has
//! no bitmap on disk; its free blocks are the group's blocks minus its superblock and
//! descriptor backups and minus every group's bitmaps and inode table found in it.
//! Declined (the partition is copied whole): a journal that needs recovery, an
//! unclean or erroneous state, any feature not in the lists below, bigalloc, a field
//! out of range, a bitmap claiming more free blocks than its descriptor counts.

use std::ops::Range;

use super::{le16, le32, whole, Found, FreeRuns, Parsed, Volume};

const MAGIC: u64 = 0xEF53;
const MAX_GROUPS: u64 = 1 << 20;

// Features this reader understands (the rest decline).
const COMPAT_OK: u64 = 0x0001 // dir_prealloc
    | 0x0002 // imagic_inodes
    | 0x0004 // has_journal
    | 0x0008 // ext_attr
    | 0x0010 // resize_inode
    | 0x0020 // dir_index
    | 0x0200 // sparse_super2
    | 0x0400 // fast_commit
    | 0x0800 // stable_inodes
    | 0x1000; // orphan_file
const RO_COMPAT_OK: u64 = 0x0001 // sparse_super
    | 0x0002 // large_file
    | 0x0008 // huge_file
    | 0x0010 // gdt_csum
    | 0x0020 // dir_nlink
    | 0x0040 // extra_isize
    | 0x0100 // quota
    | 0x0400 // metadata_csum
    | 0x1000 // readonly
    | 0x2000 // project
    | 0x8000 // verity
    | 0x10000; // orphan_present
const INCOMPAT_OK: u64 = 0x0002 // filetype
    | 0x0010 // meta_bg
    | 0x0040 // extents
    | 0x0080 // 64bit
    | 0x0100 // mmp
    | 0x0200 // flex_bg
    | 0x0400 // ea_inode
    | 0x1000 // dirdata
    | 0x2000 // csum_seed
    | 0x4000 // largedir
    | 0x8000 // inline_data
    | 0x10000 // encrypt
    | 0x20000; // casefold
const INCOMPAT_RECOVER: u64 = 0x0004;
const INCOMPAT_META_BG: u64 = 0x0010;
const INCOMPAT_64BIT: u64 = 0x0080;
const COMPAT_SPARSE_SUPER2: u64 = 0x0200;
const RO_SPARSE_SUPER: u64 = 0x0001;
const RO_GDT_CSUM: u64 = 0x0010;
const RO_METADATA_CSUM: u64 = 0x0400;
const BG_BLOCK_UNINIT: u64 = 0x0002;

struct Super {
    name: &'static str,
    bs: u64,
    blocks: u64,
    first_data: u64,
    per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    incompat: u64,
    ro_compat: u64,
    compat: u64,
    backup_bgs: [u64; 2],
}

/// `Ok(None)` when `vol` (whose first 2 KiB, or all if shorter, are `head`) holds no
/// ext file system.
pub(super) fn probe(vol: &Volume, head: &[u8]) -> Parsed<Option<Found>> {
    if head.len() < 2048 {
        return Ok(None);
    }
    let sb = &head[1024..2048];
    if le16(sb, 56) != MAGIC {
        return Ok(None);
    }
    let s = superblock(sb, vol.len)?;
    Ok(Some(free_blocks(vol, &s)?))
}

fn superblock(sb: &[u8], vol_len: u64) -> Parsed<Super> {
    let (compat, incompat, ro_compat) = (le32(sb, 92), le32(sb, 96), le32(sb, 100));
    let name = if incompat & !(0x0002 | INCOMPAT_RECOVER) != 0 || ro_compat & !0x7 != 0 {
        "ext4"
    } else if compat & 0x0004 != 0 {
        "ext3"
    } else {
        "ext2"
    };
    let decline = |why: String| whole(format!("{name}: {why}"));
    if incompat & INCOMPAT_RECOVER != 0 {
        return decline("the journal needs recovery (needs_recovery is set)".into());
    }
    let state = le16(sb, 58);
    if state & 1 == 0 || state & 2 != 0 {
        return decline(format!(
            "the file system was not cleanly unmounted or has errors (state {state:#x})"
        ));
    }
    if incompat & !INCOMPAT_OK != 0 || ro_compat & !RO_COMPAT_OK != 0 || compat & !COMPAT_OK != 0 {
        return decline(format!(
            "features not understood (compat {:#x}, incompat {:#x}, ro_compat {:#x})",
            compat & !COMPAT_OK,
            incompat & !INCOMPAT_OK,
            ro_compat & !RO_COMPAT_OK
        ));
    }
    let log = le32(sb, 24);
    if log > 6 {
        return decline(format!("block size 1024 << {log}"));
    }
    let bs = 1024u64 << log;
    let wide = incompat & INCOMPAT_64BIT != 0;
    let blocks = le32(sb, 4) | if wide { le32(sb, 0x150) << 32 } else { 0 };
    let first_data = le32(sb, 20);
    let per_group = le32(sb, 32);
    let inodes_per_group = le32(sb, 40);
    let inode_size = if le32(sb, 76) == 0 { 128 } else { le16(sb, 88) };
    let desc_size = if wide { le16(sb, 0xFE) } else { 32 };
    let ok = blocks > first_data
        && blocks.checked_mul(bs).is_some_and(|b| b <= vol_len)
        && first_data == u64::from(bs == 1024)
        && (256..=8 * bs).contains(&per_group)
        && per_group % 8 == 0
        && inode_size.is_power_of_two()
        && (128..=bs).contains(&inode_size)
        && inodes_per_group <= 8 * bs
        && desc_size.is_power_of_two()
        && (32..=bs).contains(&desc_size);
    if !ok {
        return decline("superblock geometry out of range or larger than the partition".into());
    }
    // Descriptors are kept in memory (a few dozen bytes each): more groups than any
    // real file system has (1 Mi groups: 128 TiB of 4 KiB blocks) is not trusted.
    if (blocks - first_data).div_ceil(per_group) > MAX_GROUPS {
        return decline(format!("more than {MAX_GROUPS} block groups"));
    }
    Ok(Super {
        name,
        bs,
        blocks,
        first_data,
        per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        groups: (blocks - first_data).div_ceil(per_group),
        reserved_gdt: le16(sb, 0xCE),
        first_meta_bg: le32(sb, 0x104),
        incompat,
        ro_compat,
        compat,
        backup_bgs: [le32(sb, 0x24C), le32(sb, 0x250)],
    })
}

impl Super {
    fn group_start(&self, g: u64) -> u64 {
        self.first_data + g * self.per_group
    }

    fn group_len(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(self.per_group)
    }

    fn per_desc_block(&self) -> u64 {
        self.bs / self.desc_size
    }

    fn gdt_blocks(&self) -> u64 {
        self.groups.div_ceil(self.per_desc_block())
    }

    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    /// Whether group `g` holds a superblock backup.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.contains(&g);
        }
        if self.ro_compat & RO_SPARSE_SUPER == 0 || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }

    /// The block holding descriptor block `i`.
    fn desc_block(&self, i: u64) -> u64 {
        if !self.meta_bg() || i < self.first_meta_bg {
            return self.first_data + 1 + i;
        }
        let g = i * self.per_desc_block();
        self.group_start(g) + u64::from(self.has_super(g))
    }

    /// Blocks at the start of group `g` its superblock and descriptor copies may use
    /// (generous: a prefix that contains them all).
    fn base_meta(&self, g: u64) -> u64 {
        let mut n = 0;
        if self.has_super(g) {
            n += 1 + self.reserved_gdt;
            n += if self.meta_bg() {
                self.first_meta_bg.min(self.gdt_blocks())
            } else {
                self.gdt_blocks()
            };
        }
        if self.meta_bg() {
            let pos = g % self.per_desc_block();
            if g / self.per_desc_block() >= self.first_meta_bg
                && (pos == 0 || pos == 1 || pos == self.per_desc_block() - 1)
            {
                n += 1;
            }
        }
        n
    }

    fn csums(&self) -> bool {
        self.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM) != 0
    }
}

struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free: u64,
    flags: u64,
}

fn descriptors(vol: &Volume, s: &Super) -> Parsed<Vec<Desc>> {
    let wide = s.desc_size >= 64;
    let mut out = Vec::with_capacity(s.groups as usize);
    for i in 0..s.gdt_blocks() {
        let b = s.desc_block(i);
        if b >= s.blocks {
            return whole(format!(
                "{}: descriptor block {b} lies past the file system's end",
                s.name
            ));
        }
        let block = vol.read(b * s.bs, s.bs as usize)?;
        for d in block.chunks(s.desc_size as usize) {
            if out.len() as u64 == s.groups {
                break;
            }
            let hi = |at: usize| if wide { le32(d, at) << 32 } else { 0 };
            out.push(Desc {
                block_bitmap: le32(d, 0) | hi(0x20),
                inode_bitmap: le32(d, 4) | hi(0x24),
                inode_table: le32(d, 8) | hi(0x28),
                free: le16(d, 0x0C) | if wide { le16(d, 0x2C) << 16 } else { 0 },
                flags: le16(d, 0x12),
            });
        }
    }
    Ok(out)
}

fn free_blocks(vol: &Volume, s: &Super) -> Parsed<Found> {
    let descs = descriptors(vol, s)?;
    let itable = (s.inodes_per_group * s.inode_size).div_ceil(s.bs);
    // Every group's bitmaps and inode table: used, wherever they lie.
    let mut meta: Vec<Range<u64>> = Vec::with_capacity(descs.len() * 3);
    for (g, d) in descs.iter().enumerate() {
        for r in [
            d.block_bitmap..d.block_bitmap + 1,
            d.inode_bitmap..d.inode_bitmap + 1,
            d.inode_table..d.inode_table.saturating_add(itable),
        ] {
            if r.start < s.first_data || r.end > s.blocks {
                return whole(format!(
                    "{}: group {g}'s metadata lies outside the file system",
                    s.name
                ));
            }
            meta.push(r);
        }
    }
    meta.sort_by_key(|r| r.start);
    let mut runs = FreeRuns::new(vol.start);
    let mut bitmap = vec![0u8; s.bs as usize];
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        let (start, len) = (s.group_start(g), s.group_len(g));
        let mut free_here = Vec::new();
        if s.csums() && d.flags & BG_BLOCK_UNINIT != 0 {
            // No bitmap on disk: all free but the group's base metadata and any
            // group's bitmaps and inode tables inside it.
            let mut pos = start + s.base_meta(g).min(len);
            let first = meta.partition_point(|r| r.end <= pos);
            for r in &meta[first..] {
                if r.start >= start + len {
                    break;
                }
                if r.start > pos {
                    free_here.push(pos..r.start);
                }
                pos = pos.max(r.end);
            }
            if pos < start + len {
                free_here.push(pos..start + len);
            }
        } else {
            vol.read_into(d.block_bitmap * s.bs, &mut bitmap)?;
            let mut run: Option<u64> = None;
            let mut i = 0;
            while i < len {
                // Whole bytes of used blocks outside a free run: skip them.
                if run.is_none() && i % 8 == 0 && i + 8 <= len && bitmap[(i / 8) as usize] == 0xFF {
                    i += 8;
                    continue;
                }
                let used = bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
                match (used, run) {
                    (false, None) => run = Some(i),
                    (true, Some(a)) => {
                        free_here.push(start + a..start + i);
                        run = None;
                    }
                    _ => {}
                }
                i += 1;
            }
            if let Some(a) = run {
                free_here.push(start + a..start + len);
            }
        }
        let counted: u64 = free_here.iter().map(|r| r.end - r.start).sum();
        if counted > d.free {
            return whole(format!(
                "{}: group {g}'s bitmap shows {counted} free blocks, its descriptor {}",
                s.name, d.free
            ));
        }
        for r in free_here {
            runs.push(r.start * s.bs, r.end * s.bs);
        }
    }
    Ok(Found {
        fs: format!("{} ({}-byte blocks)", s.name, s.bs),
        free: runs.finish(),
    })
}
