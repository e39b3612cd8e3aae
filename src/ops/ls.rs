//! `ls`: every disk in a folder with its extents and its deltas / REDO logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::descriptor::CreateType;
use crate::io::SourceMode;
use crate::layer::{Layer, OpenOptions};

/// An extent file of a listed disk.
#[derive(Debug, Clone, Serialize)]
pub struct ExtentFile {
    /// File name.
    pub file: String,
    /// Bytes it occupies (allocated blocks).
    pub disk_size: u64,
}

/// One disk or delta in a listing.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Entry {
    /// The file named (descriptor or sparse/COWD file).
    pub file: String,
    /// createType.
    pub create_type: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes the files occupy (allocated blocks), as `info` calls it.
    pub disk_size: u64,
    /// Extent files.
    pub extents: Vec<ExtentFile>,
    /// For RDMs: the device.
    pub device: Option<String>,
    /// Deltas on top of this one (children), each with its own children.
    pub deltas: Vec<Entry>,
    /// Why it could not be opened, if it could not.
    pub error: Option<String>,
    /// For an increment (`export --delta`): the file its source delta's parent was. An
    /// increment is listed on its own, never as a delta of that disk.
    pub increment_of: Option<String>,
}

fn candidate(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    !n.starts_with('.') && (n.ends_with(".vmdk") || n.ends_with(".REDO") || n.ends_with(".dsk"))
}

/// List the disks in `dir`.
pub fn list(dir: &Path) -> Result<Vec<Entry>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("list", dir, 0, e))?
        .flatten()
        .map(|e| crate::io::join_in(dir, e.file_name()))
        .filter(|p| candidate(p))
        .collect();
    files.sort();
    let opts = OpenOptions {
        ignore_cid: true,
        mode: SourceMode::Pread,
        ..Default::default()
    };
    let mut layers: BTreeMap<PathBuf, (Entry, Option<PathBuf>)> = BTreeMap::new();
    let mut owned: Vec<PathBuf> = Vec::new();
    let mut failed = Vec::new();
    for f in &files {
        match Layer::open(f, &opts) {
            Ok(l) => {
                let extents: Vec<PathBuf> = l.files().into_iter().filter(|x| x != f).collect();
                owned.extend(extents.iter().cloned());
                let increment_of = l
                    .is_increment()
                    .then(|| l.parent_hint().unwrap_or("").to_string());
                let parent = l.parent_hint().filter(|_| !l.is_increment()).map(|h| {
                    crate::resolve::resolve_name(dir, h, false, "parent", f, &mut Vec::new())
                        .unwrap_or_else(|_| crate::io::join_in(dir, h))
                });
                let device = matches!(
                    l.create_type,
                    CreateType::VmfsRawDeviceMap | CreateType::VmfsPassthroughRawDeviceMap
                )
                .then(|| rdm_device(&l));
                let e = Entry {
                    file: f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    create_type: l.create_type.as_str().into(),
                    capacity: l.capacity,
                    disk_size: l.bytes_on_disk(),
                    extents: extents
                        .iter()
                        .map(|x| ExtentFile {
                            file: x
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            disk_size: std::fs::metadata(x)
                                .map(|m| {
                                    use std::os::unix::fs::MetadataExt;
                                    m.blocks() * 512
                                })
                                .unwrap_or(0),
                        })
                        .collect(),
                    device,
                    deltas: vec![],
                    error: None,
                    increment_of,
                };
                layers.insert(f.clone(), (e, parent));
            }
            Err(e) => failed.push((f.clone(), e.to_string())),
        }
    }
    // Files that are some disk's extents are not disks of their own.
    layers.retain(|p, _| !owned.contains(p));
    failed.retain(|(p, _)| !owned.contains(p));
    // Attach children to parents, deepest first.
    let keys: Vec<PathBuf> = layers.keys().cloned().collect();
    let same = |a: &Path, b: &Path| a.file_name() == b.file_name();
    let mut children: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut roots = Vec::new();
    for k in &keys {
        match &layers[k].1 {
            Some(p) if keys.iter().any(|x| same(x, p)) => {
                let pk = keys.iter().find(|x| same(x, p)).expect("found").clone();
                children.entry(pk).or_default().push(k.clone());
            }
            _ => roots.push(k.clone()),
        }
    }
    fn build(
        k: &PathBuf,
        layers: &BTreeMap<PathBuf, (Entry, Option<PathBuf>)>,
        children: &BTreeMap<PathBuf, Vec<PathBuf>>,
        depth: usize,
    ) -> Entry {
        let mut e = layers[k].0.clone();
        if depth < 64 {
            for c in children.get(k).into_iter().flatten() {
                e.deltas.push(build(c, layers, children, depth + 1));
            }
        }
        e
    }
    let mut out: Vec<Entry> = roots
        .iter()
        .map(|r| build(r, &layers, &children, 0))
        .collect();
    for (p, err) in failed {
        out.push(Entry {
            file: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            create_type: "?".into(),
            capacity: 0,
            disk_size: 0,
            extents: vec![],
            device: None,
            deltas: vec![],
            error: Some(err),
            increment_of: None,
        });
    }
    Ok(out)
}

/// The listing as a tree: each disk with its type, capacity and disk size (`human`:
/// KiB/MiB/GiB), its extents, its RDM device (`mappings`), then its deltas indented.
pub fn write_text(
    out: &mut dyn std::io::Write,
    entries: &[Entry],
    human: bool,
    mappings: bool,
) -> std::io::Result<()> {
    fn show(
        out: &mut dyn std::io::Write,
        e: &Entry,
        indent: usize,
        h: bool,
        m: bool,
    ) -> std::io::Result<()> {
        let size = |n: u64| {
            if h {
                crate::units::human(n)
            } else {
                n.to_string()
            }
        };
        let pad = "  ".repeat(indent);
        if let Some(err) = &e.error {
            return writeln!(out, "{pad}{} ?  ({err})", e.file);
        }
        write!(
            out,
            "{pad}{}  {}  capacity {}  disk size {}",
            e.file,
            e.create_type,
            size(e.capacity),
            size(e.disk_size)
        )?;
        if m {
            if let Some(d) = &e.device {
                write!(out, "  -> {d}")?;
            }
        }
        if let Some(of) = &e.increment_of {
            write!(out, "  increment of {of}")?;
        }
        writeln!(out)?;
        for x in &e.extents {
            writeln!(out, "{pad}  extent {}", x.file)?;
        }
        for d in &e.deltas {
            show(out, d, indent + 1, h, m)?;
        }
        Ok(())
    }
    for e in entries {
        show(out, e, 0, human, mappings)?;
    }
    Ok(())
}

/// The device an RDM layer's mapping file links to (or the mapping file itself).
fn rdm_device(l: &Layer) -> String {
    l.extents
        .iter()
        .find_map(|e| e.path.as_ref())
        .map(|m| std::fs::read_link(m).unwrap_or_else(|_| m.clone()))
        .map(|d| d.display().to_string())
        .unwrap_or_default()
}
