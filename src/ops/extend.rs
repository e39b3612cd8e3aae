//! `extend` (vmkfstools -X): grow a base disk. Flat files grow (allocated for thick
//! disks); sparse extents get new grain tables, and a directory that must grow is
//! relocated to the end of the file. Every new structure is written and synced before
//! the one sector that makes it live (the header; the descriptor last), so an
//! interrupted extend leaves the disk at its old size, readable.

use std::os::unix::fs::FileExt;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::format::descriptor::{Access, CreateType, ExtentLine, ExtentType};
use crate::format::sparse::SPLIT_SECTORS;
use crate::format::sparse::{SparseHeader, SparseLayout, SECTOR};
use crate::format::Extent;
use crate::io::SourceMode;
use crate::layer::Layer;
use crate::layer::OpenOptions;
use crate::output::AtomicFile;
use crate::write::write_descriptor;

fn io_err<'a>(op: &'static str, p: &'a Path, off: u64) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, p, off, e)
}

/// Grow the sparse extent file at `path` to `new_cap` sectors.
fn grow_sparse(path: &Path, h: &SparseHeader, new_cap: u64) -> Result<()> {
    if h.compressed() {
        return Err(Error::unsupported(path, "extending a streamOptimized disk"));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open for writing", path, 0))?;
    let per = u64::from(h.num_gtes_per_gt);
    let old_gts = h.num_gts();
    let mut nh = *h;
    nh.capacity_sectors = new_cap;
    let new_gts = nh.num_gts();
    let grain = h.grain_size * SECTOR;
    let read_dir = |at: u64, n: u64| crate::format::tables::read_u32s(&f, path, at, n as usize);
    let has_rgd = h.flags & crate::format::sparse::FLAG_REDUNDANT_GD != 0 && h.rgd_offset != 0;
    let mut gd = read_dir(h.gd_offset, old_gts)?;
    let mut rgd = if has_rgd {
        Some(read_dir(h.rgd_offset, old_gts)?)
    } else {
        None
    };
    // Zero the tail of a partial last grain so the newly exposed bytes read as zeros.
    if h.capacity_sectors % h.grain_size != 0 {
        let g = h.capacity_sectors / h.grain_size;
        let gdi = (g / per) as usize;
        if gd[gdi] != 0 {
            let t = read_dir(u64::from(gd[gdi]), per)?;
            let gte = t[(g % per) as usize];
            if gte >= 2 {
                let valid = (h.capacity_sectors % h.grain_size) * SECTOR;
                let z = vec![0u8; (grain - valid) as usize];
                f.write_all_at(&z, u64::from(gte) * SECTOR + valid)
                    .map_err(io_err("write", path, 0))?;
            }
        }
    }
    let flen = f.metadata().map_err(io_err("stat", path, 0))?.len();
    // New structures go right after what the old header references (its directories,
    // tables and grains), not after the file's end: a tail an interrupted extend left
    // (tables written, the header not) is reused, and cut off below.
    let used = crate::format::tables::GrainTables::load(
        &f,
        path,
        h.gd_offset,
        has_rgd.then_some(h.rgd_offset),
        old_gts as usize,
        per as usize,
    )?
    .referenced_end(&f, h.grain_size)?;
    let dir_sectors = (old_gts * 4).div_ceil(SECTOR);
    let used = used
        .max(h.over_head)
        .max(h.gd_offset + dir_sectors)
        .max(if has_rgd {
            h.rgd_offset + dir_sectors
        } else {
            0
        });
    let mut cursor = (used * SECTOR).div_ceil(grain) * grain / SECTOR;
    let gt_sectors = (per * 4).div_ceil(SECTOR);
    let mut alloc = |sectors: u64| -> Result<u32> {
        let at = cursor;
        cursor += sectors;
        u32::try_from(at).map_err(|_| Error::unsupported(path, "file would grow past 2 TiB"))
    };
    let zero_gt = vec![0u8; (gt_sectors * SECTOR) as usize];
    for _ in old_gts..new_gts {
        let s = alloc(gt_sectors)?;
        f.write_all_at(&zero_gt, u64::from(s) * SECTOR)
            .map_err(io_err("write", path, 0))?;
        gd.push(s);
        if let Some(r) = rgd.as_mut() {
            let s = alloc(gt_sectors)?;
            f.write_all_at(&zero_gt, u64::from(s) * SECTOR)
                .map_err(io_err("write", path, 0))?;
            r.push(s);
        }
    }
    let old_slots = (old_gts * 4).div_ceil(SECTOR) * SECTOR / 4;
    let dir_bytes = |v: &[u32]| {
        let mut b = vec![0u8; (v.len() * 4).div_ceil(512) * 512];
        LE::write_u32_into(v, &mut b[..v.len() * 4]);
        b
    };
    if new_gts > old_slots {
        // The directories must grow: write them afresh at the end.
        let sectors = (new_gts * 4).div_ceil(SECTOR);
        nh.gd_offset = u64::from(alloc(sectors)?);
        f.write_all_at(&dir_bytes(&gd), nh.gd_offset * SECTOR)
            .map_err(io_err("write", path, 0))?;
        if let Some(r) = &rgd {
            nh.rgd_offset = u64::from(alloc(sectors)?);
            f.write_all_at(&dir_bytes(r), nh.rgd_offset * SECTOR)
                .map_err(io_err("write", path, 0))?;
        }
    } else {
        f.write_all_at(&dir_bytes(&gd), h.gd_offset * SECTOR)
            .map_err(io_err("write", path, 0))?;
        if let Some(r) = &rgd {
            f.write_all_at(&dir_bytes(r), h.rgd_offset * SECTOR)
                .map_err(io_err("write", path, 0))?;
        }
    }
    let end = (cursor * SECTOR).div_ceil(grain) * grain;
    if end != flen {
        f.set_len(end).map_err(io_err("extend", path, end))?;
    }
    f.sync_all().map_err(io_err("flush", path, 0))?;
    // The commit point: one sector.
    f.write_all_at(&nh.to_bytes(), 0)
        .map_err(io_err("write", path, 0))?;
    f.sync_all().map_err(io_err("flush", path, 0))
}

fn new_sparse_extent(path: &Path, sectors: u64) -> Result<()> {
    let layout = SparseLayout::new(sectors, 0);
    let f = AtomicFile::create(path, false)?;
    let none = crate::format::sparse::GrainEntries::new(layout.gtes);
    layout.for_each_metadata_write(&none, None, |at, bytes| {
        f.file()
            .write_all_at(bytes, at)
            .map_err(io_err("write", f.tmp_path(), at))
    })?;
    let end = layout.over_head * SECTOR;
    f.file()
        .set_len(end)
        .map_err(io_err("set the length of", f.tmp_path(), end))?;
    f.commit(false)
}

/// The size `extend` grows a disk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// This many bytes.
    To(u64),
    /// The current capacity plus this many bytes (read under the lock).
    By(u64),
}

/// How to extend.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ExtendOptions {
    /// Extend although deltas sit on the disk (they keep their old size), and write into
    /// host files marked read-only.
    pub force: bool,
    /// Permit a new capacity over 62 TiB.
    pub large: bool,
    /// Follow extent names that lead out of the disk's folder
    /// ([`OpenOptions::allow_outside_paths`]).
    pub allow_outside_paths: bool,
}

/// Grow `disk` to `size`; returns the capacity before and after.
pub fn extend(disk: &Path, size: NewSize, opts: &ExtendOptions) -> Result<(u64, u64)> {
    let mut locks = crate::guard::LockSet::new();
    locks.lock(disk, crate::guard::LockKind::Exclusive)?;
    let mut chain = Chain::open(
        disk,
        &OpenOptions {
            ignore_cid: true,
            mode: SourceMode::Pread,
            allow_outside_paths: opts.allow_outside_paths,
            ..Default::default()
        },
    )?;
    if chain.layers.len() > 1 {
        return Err(Error::not_applicable(
            disk,
            "is a delta; extend its base disk (after committing)",
        ));
    }
    locks.exclusive_all(&chain.layers[0].files())?;
    let layer = &mut chain.layers[0];
    let old = layer.capacity;
    let new_size = validate(layer, disk, size, opts)?;
    let new_sectors = new_size / SECTOR;
    let mut lines: Vec<ExtentLine> = layer
        .extents
        .iter()
        .map(|e| {
            let mut l = e.line.clone();
            l.sectors = e.extent.len() / SECTOR;
            l
        })
        .collect();
    let mut remaining = new_sectors - old / SECTOR;
    remaining -= grow_last_extent(layer, disk, remaining, &mut lines)?;
    add_split_extents(layer, disk, remaining, &mut lines)?;
    // Descriptor last: extent sizes and geometry for the adapter.
    if layer.embedded {
        // The embedded line names the file itself; only its size changes.
        let mut l = lines[0].clone();
        l.sectors = new_sectors;
        layer.descriptor.set_extents(vec![l]);
    } else {
        layer.descriptor.set_extents(lines);
    }
    let adapter = layer
        .descriptor
        .ddb("adapterType")
        .unwrap_or("lsilogic")
        .to_string();
    let g = crate::format::geometry::compute(new_sectors, &adapter);
    let d = &mut layer.descriptor;
    d.set_ddb("geometry.cylinders", &g.cylinders.to_string());
    d.set_ddb("geometry.heads", &g.heads.to_string());
    d.set_ddb("geometry.sectors", &g.sectors.to_string());
    write_descriptor(layer)?;
    Ok((old, new_size))
}

/// The new capacity, once everything that refuses the extend has been checked (nothing
/// is written before).
fn validate(layer: &Layer, disk: &Path, size: NewSize, opts: &ExtendOptions) -> Result<u64> {
    let old = layer.capacity;
    let new_size = match size {
        NewSize::To(n) => n,
        NewSize::By(n) => old
            .checked_add(n)
            .ok_or_else(|| Error::InvalidInput(format!("{old} + {n} bytes overflows")))?,
    };
    if new_size % SECTOR != 0 {
        return Err(Error::InvalidInput(format!(
            "size {new_size} is not a multiple of 512"
        )));
    }
    // An extend interrupted after its extents grew and before the descriptor was
    // rewritten (descriptor last): the extents already hold the new size, and the
    // same command finishes it by writing the descriptor.
    let stale = layer
        .extents
        .iter()
        .any(|e| e.line.sectors * SECTOR != e.extent.len());
    if new_size < old || (new_size == old && !stale) {
        return Err(Error::InvalidInput(format!(
            "`{}` is {old} bytes: refusing to shrink or keep it at {new_size}",
            disk.display()
        )));
    }
    crate::format::check_capacity(new_size, opts.large, disk)?;
    crate::dependents::refuse_dependents(disk, opts.force, "extending it")?;
    if layer.create_type.is_device()
        || layer.extents.iter().any(|e| {
            use std::os::unix::fs::FileTypeExt;
            e.path
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .is_some_and(|m| m.file_type().is_block_device())
        })
    {
        return Err(Error::unsupported(
            disk,
            "extending a disk whose extents are host devices (its size is the device's); nothing was changed",
        ));
    }
    crate::recovery::refuse_read_only_files(layer, opts.force)?;
    Ok(new_size)
}

fn is_split(ct: CreateType) -> bool {
    matches!(
        ct,
        CreateType::TwoGbMaxExtentSparse | CreateType::TwoGbMaxExtentFlat
    )
}

/// Grow the last extent by up to `remaining` sectors (up to the split size for split
/// disks); returns the sectors it grew by.
fn grow_last_extent(
    layer: &Layer,
    disk: &Path,
    remaining: u64,
    lines: &mut [ExtentLine],
) -> Result<u64> {
    let ct = layer.create_type;
    let thick = ct == CreateType::Vmfs && layer.descriptor.ddb("thinProvisioned") != Some("1");
    let last = layer.extents.last().expect("a layer has extents");
    let last_sectors = last.extent.len() / SECTOR;
    let room = if is_split(ct) {
        SPLIT_SECTORS.saturating_sub(last_sectors)
    } else {
        remaining
    };
    let grow = room.min(remaining);
    if grow == 0 {
        return Ok(0);
    }
    let target = last_sectors + grow;
    match (&last.extent, &last.path) {
        (Extent::Sparse(s), Some(p)) => grow_sparse(p, s.raw_header(), target)?,
        (Extent::Flat(fl), Some(p)) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(io_err("open for writing", p, 0))?;
            let end = fl.offset + target * SECTOR;
            if thick {
                crate::format::output::allocate(&f, p, end)?;
            }
            if f.metadata().map_err(io_err("stat", p, 0))?.len() < end {
                f.set_len(end).map_err(io_err("extend", p, end))?;
            }
            f.sync_all().map_err(io_err("flush", p, 0))?;
        }
        _ => {
            return Err(Error::unsupported(
                disk,
                format!("extending a {} disk", ct.as_str()),
            ))
        }
    }
    lines.last_mut().expect("one").sectors = target;
    Ok(grow)
}

/// Add the extents of a split disk that hold the `remaining` sectors (their lines pushed
/// onto `lines`); any other disk type with sectors left is refused.
fn add_split_extents(
    layer: &Layer,
    disk: &Path,
    mut remaining: u64,
    lines: &mut Vec<ExtentLine>,
) -> Result<()> {
    let ct = layer.create_type;
    let dir = crate::io::folder_of(disk);
    let stem = crate::io::file_name_of(disk);
    let stem = stem.strip_suffix(".vmdk").unwrap_or(&stem).to_string();
    let mut n = lines.len() + 1;
    while remaining > 0 {
        if !is_split(ct) {
            return Err(Error::unsupported(
                disk,
                "cannot add extents to this disk type",
            ));
        }
        let sectors = remaining.min(SPLIT_SECTORS);
        let (name, kind, offset) = if ct == CreateType::TwoGbMaxExtentSparse {
            (format!("{stem}-s{n:03}.vmdk"), ExtentType::Sparse, None)
        } else {
            (format!("{stem}-f{n:03}.vmdk"), ExtentType::Flat, Some(0))
        };
        let p = crate::io::join_in(&dir, &name);
        if kind == ExtentType::Sparse {
            new_sparse_extent(&p, sectors)?;
        } else {
            let f = AtomicFile::create(&p, false)?;
            f.file()
                .set_len(sectors * SECTOR)
                .map_err(io_err("extend", &p, 0))?;
            f.commit(false)?;
        }
        lines.push(ExtentLine {
            access: Access::Rw,
            sectors,
            kind,
            file: Some(name),
            offset,
            extra: vec![],
        });
        remaining -= sectors;
        n += 1;
    }
    Ok(())
}
