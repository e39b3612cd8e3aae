//! `info`: what a disk is, layer by layer; and `map`: allocation runs.

use std::io::Write;

use serde::Serialize;

use crate::chain::Chain;
use crate::disk::{Alloc, Run, VirtualDisk};
use crate::error::Result;
use crate::format::Extent;
use crate::layer::Layer;

use crate::format::geometry::Chs;

/// One extent, as `info` reports it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ExtentInfo {
    /// File (None for ZERO extents).
    pub file: Option<String>,
    /// Extent type as written in the descriptor (`SPARSE`, `FLAT`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Access mode.
    pub access: String,
    /// Sectors covered.
    pub sectors: u64,
    /// Sector offset in the file (FLAT).
    pub offset: Option<u64>,
    /// First virtual byte.
    pub start: u64,
    /// For sparse extents: header version.
    pub sparse_version: Option<u32>,
    /// For sparse extents: whether grains are compressed.
    pub compressed: Option<bool>,
    /// For sparse extents: the unclean-shutdown flag.
    pub unclean_shutdown: Option<bool>,
}

/// One layer of the chain.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LayerInfo {
    /// File named (descriptor or sparse file).
    pub file: String,
    /// createType.
    pub create_type: String,
    /// CID in hex.
    pub cid: Option<String>,
    /// parentCID in hex (None for a base).
    pub parent_cid: Option<String>,
    /// parentFileNameHint.
    pub parent_hint: Option<String>,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes the layer's files occupy on disk.
    pub disk_size: u64,
}

/// Everything `info` prints. Keys are stable (see README "info --json").
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct DiskInfo {
    /// The file named.
    pub file: String,
    /// createType of the top layer.
    pub create_type: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes used on disk by the top layer's files.
    pub disk_size: u64,
    /// Bytes used on disk by every file of the chain.
    pub chain_disk_size: u64,
    /// Grain size in bytes (512 for flat disks).
    pub grain_size: u64,
    /// `ddb.adapterType`.
    pub adapter_type: Option<String>,
    /// `ddb.geometry.*`.
    pub geometry: Option<Chs>,
    /// CID in hex.
    pub cid: Option<String>,
    /// parentCID in hex (None for a base).
    pub parent_cid: Option<String>,
    /// Extents of the top layer.
    pub extents: Vec<ExtentInfo>,
    /// The chain from the top (this file) down to the base.
    pub chain: Vec<LayerInfo>,
    /// Facts worth knowing (path fallbacks, size disagreements).
    pub notes: Vec<String>,
    /// Problems accepted while opening (CID mismatch with --ignore-cid).
    pub warnings: Vec<String>,
    /// For an increment (`export --delta`): what it applies to.
    pub increment: Option<IncrementInfo>,
}

/// What an increment applies to (see [`crate::Layer::is_increment`]).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct IncrementInfo {
    /// The content ID a disk must have for `apply` to take it (its parentCID).
    pub applies_to_cid: String,
    /// The file the source delta's parent was (parentFileNameHint).
    pub parent_hint: Option<String>,
    /// The content ID the disk has after the apply (its CID).
    pub gives_cid: Option<String>,
}

fn layer_info(l: &Layer) -> LayerInfo {
    // Bare COWD REDO logs have no CIDs (they are linked by name).
    let cids = !l.bare_cowd;
    LayerInfo {
        file: l.path.display().to_string(),
        create_type: l.create_type.as_str().to_string(),
        cid: l.cid().filter(|_| cids).map(|c| format!("{c:08x}")),
        parent_cid: l.parent_cid().filter(|_| cids).map(|c| format!("{c:08x}")),
        parent_hint: l.parent_hint().map(str::to_string),
        capacity: l.capacity,
        disk_size: l.bytes_on_disk(),
    }
}

/// Geometry from a layer's DDB, if complete.
pub(crate) fn geometry_of(l: &Layer) -> Option<Chs> {
    crate::format::geometry::from_descriptor(&l.descriptor)
}

/// Gather [`DiskInfo`] for an opened chain.
pub fn info(chain: &Chain) -> DiskInfo {
    let top = chain.top();
    let extents = top
        .extents
        .iter()
        .map(|s| {
            let (v, c, u) = match &s.extent {
                Extent::Sparse(sp) => (
                    Some(sp.header().version),
                    Some(sp.header().compressed()),
                    Some(sp.raw_header().unclean_shutdown),
                ),
                _ => (None, None, None),
            };
            ExtentInfo {
                file: s.path.as_ref().map(|p| p.display().to_string()),
                kind: s.line.kind.as_str().to_string(),
                access: s.line.access.as_str().to_string(),
                sectors: s.extent.len() / 512,
                offset: s.line.offset,
                start: s.start,
                sparse_version: v,
                compressed: c,
                unclean_shutdown: u,
            }
        })
        .collect();
    let chain_info: Vec<LayerInfo> = chain.layers.iter().map(layer_info).collect();
    let mut notes = Vec::new();
    for l in &chain.layers {
        for n in &l.notes {
            notes.push(format!("`{}`: {n}", l.path.display()));
        }
    }
    if let Some(l) = chain
        .layers
        .iter()
        .find(|l| l.descriptor.ddb(crate::guest::DDB_KEY).is_some())
    {
        notes.push(format!(
            "`{}` was written guest-aware: space free in the guest's file systems was left \
             out (it reads as zeros), so its content is file-identical to its source, not \
             byte-identical",
            l.path.display()
        ));
    }
    // A snapshot's descriptor may carry its own adapter and geometry (qemu writes them
    // into children); VMware keeps the disk's settings in the base, and an export takes
    // the base's. Say so when they differ.
    let base = chain.base();
    if chain.layers.len() > 1 {
        let show = |l: &Layer| {
            format!(
                "adapter {}, geometry {}",
                l.descriptor.ddb("adapterType").unwrap_or("(not set)"),
                geometry_of(l).map_or("(not set)".to_string(), |g| format!(
                    "{}/{}/{}",
                    g.cylinders, g.heads, g.sectors
                ))
            )
        };
        let (t, b) = (show(top), show(base));
        if t != b && base.descriptor.ddb("adapterType").is_some() {
            notes.push(format!(
                "the top layer says {t}, the base `{}` says {b}: export and import keep the base's (where VMware keeps the disk's settings)",
                base.path.display()
            ));
        }
    }
    DiskInfo {
        file: top.path.display().to_string(),
        create_type: top.create_type.as_str().to_string(),
        capacity: chain.capacity(),
        disk_size: chain_info[0].disk_size,
        chain_disk_size: chain_info.iter().map(|l| l.disk_size).sum(),
        grain_size: top.grain_bytes(),
        adapter_type: top.descriptor.ddb("adapterType").map(str::to_string),
        geometry: geometry_of(top),
        cid: chain_info[0].cid.clone(),
        parent_cid: chain_info[0].parent_cid.clone(),
        extents,
        chain: chain_info,
        notes,
        warnings: chain.warnings.clone(),
        increment: top.is_increment().then(|| IncrementInfo {
            applies_to_cid: top
                .descriptor
                .parent_cid()
                .map(|c| format!("{c:08x}"))
                .unwrap_or_default(),
            parent_hint: top.parent_hint().map(str::to_string),
            gives_cid: top.cid().map(|c| format!("{c:08x}")),
        }),
    }
}

/// Render [`DiskInfo`] as text.
pub fn write_info_text(out: &mut dyn Write, i: &DiskInfo) -> std::io::Result<()> {
    writeln!(out, "file:          {}", i.file)?;
    writeln!(out, "create type:   {}", i.create_type)?;
    if let Some(inc) = &i.increment {
        writeln!(
            out,
            "increment:     applies to a disk with content ID {} (the restore of `{}`), gives it content ID {}: `vmdkit apply DISK {}`",
            inc.applies_to_cid,
            inc.parent_hint.as_deref().unwrap_or("?"),
            inc.gives_cid.as_deref().unwrap_or("?"),
            i.file
        )?;
    }
    writeln!(
        out,
        "capacity:      {} bytes ({})",
        i.capacity,
        human(i.capacity)
    )?;
    writeln!(
        out,
        "disk size:     {} bytes ({})",
        i.disk_size,
        human(i.disk_size)
    )?;
    if i.chain.len() > 1 {
        writeln!(
            out,
            "chain size:    {} bytes ({})",
            i.chain_disk_size,
            human(i.chain_disk_size)
        )?;
    }
    writeln!(out, "grain size:    {} bytes", i.grain_size)?;
    writeln!(
        out,
        "adapter type:  {}",
        i.adapter_type.as_deref().unwrap_or("(not set)")
    )?;
    match &i.geometry {
        Some(g) => writeln!(
            out,
            "geometry:      {}/{}/{} (C/H/S)",
            g.cylinders, g.heads, g.sectors
        )?,
        None => writeln!(out, "geometry:      (not set)")?,
    }
    writeln!(
        out,
        "CID:           {}",
        i.cid.as_deref().unwrap_or("(none)")
    )?;
    writeln!(
        out,
        "parentCID:     {}",
        i.parent_cid.as_deref().unwrap_or("ffffffff (no parent)")
    )?;
    writeln!(out, "extents:")?;
    for e in &i.extents {
        write!(out, "  {} {} {}", e.access, e.sectors, e.kind)?;
        if let Some(f) = &e.file {
            write!(out, " {f}")?;
        }
        if let Some(o) = e.offset {
            write!(out, " offset {o}")?;
        }
        if let Some(v) = e.sparse_version {
            write!(
                out,
                " (sparse v{v}{})",
                if e.compressed == Some(true) {
                    ", compressed"
                } else {
                    ""
                }
            )?;
        }
        if e.unclean_shutdown == Some(true) {
            write!(out, " [unclean shutdown flag set]")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "chain (top to base):")?;
    for (d, l) in i.chain.iter().enumerate() {
        writeln!(
            out,
            "  {d}: {} [{}] CID {} parentCID {} ({} on disk)",
            l.file,
            l.create_type,
            l.cid.as_deref().unwrap_or("-"),
            l.parent_cid.as_deref().unwrap_or("-"),
            human(l.disk_size)
        )?;
    }
    for n in &i.notes {
        writeln!(out, "note: {n}")?;
    }
    for w in &i.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

use crate::units::human;

/// One record as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapRecord {
    /// First byte.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Layer depth.
    pub depth: u32,
    /// Whether some layer decides the range.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored in (or allocated by) its layer.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Offset in the layer's extent file, where it means something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Turn runs into qemu-style records, merged as qemu merges them.
pub(crate) fn map_records(runs: &[Run]) -> Vec<MapRecord> {
    let mut out: Vec<MapRecord> = Vec::new();
    for r in runs {
        let (present, zero, data, compressed, offset) = match r.alloc {
            Alloc::Unallocated => (false, true, false, false, None),
            Alloc::Zero => (true, true, false, false, None),
            Alloc::Hole { offset, .. } => (true, true, true, false, Some(offset)),
            Alloc::Data { offset, .. } => (true, false, true, false, Some(offset)),
            Alloc::Compressed { .. } => (true, false, true, true, None),
        };
        let rec = MapRecord {
            start: r.start,
            length: r.len,
            depth: r.depth,
            present,
            zero,
            data,
            compressed,
            offset,
        };
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, rec.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + last.length == b,
                _ => false,
            };
            if last.start + last.length == rec.start
                && last.depth == rec.depth
                && last.present == rec.present
                && last.zero == rec.zero
                && last.data == rec.data
                && last.compressed == rec.compressed
                && contiguous
            {
                last.length += rec.length;
                continue;
            }
        }
        out.push(rec);
    }
    out
}

/// Write the map of `disk` in qemu's JSON form, one record per line, walking the disk
/// in slices so memory stays bounded.
pub fn write_map_json(out: &mut dyn Write, disk: &dyn VirtualDisk) -> Result<()> {
    let recs = collect_records(disk)?;
    let io = |e| crate::error::Error::io("write", std::path::Path::new("<stdout>"), 0, e);
    write!(out, "[").map_err(io)?;
    for (i, r) in recs.iter().enumerate() {
        if i > 0 {
            writeln!(out, ",").map_err(io)?;
        }
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            r.start, r.length, r.depth, r.present, r.zero, r.data, r.compressed
        )
        .map_err(io)?;
        if let Some(o) = r.offset {
            write!(out, ", \"offset\": {o}").map_err(io)?;
        }
        write!(out, "}}").map_err(io)?;
    }
    writeln!(out, "]").map_err(io)?;
    Ok(())
}

/// All records of a disk (merged).
pub(crate) fn collect_records(disk: &dyn VirtualDisk) -> Result<Vec<MapRecord>> {
    const SLICE: u64 = 1 << 36; // 64 GiB of address space per map() call
    let mut runs = Vec::new();
    let cap = disk.capacity();
    let mut pos = 0;
    while pos < cap {
        let end = (pos + SLICE).min(cap);
        runs.extend(disk.map(pos..end)?);
        pos = end;
    }
    Ok(map_records(&runs))
}

/// Write the map as text: one line per run.
pub fn write_map_text(out: &mut dyn Write, chain: &Chain) -> Result<()> {
    let recs = collect_records(chain)?;
    let io = |e| crate::error::Error::io("write", std::path::Path::new("<stdout>"), 0, e);
    writeln!(
        out,
        "{:<18} {:<18} {:>5}  {:<12} file offset",
        "start", "length", "depth", "state"
    )
    .map_err(io)?;
    for r in recs {
        let state = match (r.present, r.zero, r.data, r.compressed) {
            (false, _, _, _) => "unallocated",
            (true, true, false, _) => "zero",
            (true, true, true, _) => "hole",
            (true, false, true, true) => "compressed",
            _ => "data",
        };
        let file = chain
            .layers
            .get(r.depth as usize)
            .map(|l| l.path.display().to_string())
            .unwrap_or_default();
        match r.offset {
            Some(o) if r.present => writeln!(
                out,
                "{:<#18x} {:<#18x} {:>5}  {:<12} {:#x} {}",
                r.start, r.length, r.depth, state, o, file
            ),
            _ if r.present => writeln!(
                out,
                "{:<#18x} {:<#18x} {:>5}  {:<12} {}",
                r.start, r.length, r.depth, state, file
            ),
            _ => writeln!(
                out,
                "{:<#18x} {:<#18x} {:>5}  {:<12}",
                r.start, r.length, r.depth, state
            ),
        }
        .map_err(io)?;
    }
    Ok(())
}
