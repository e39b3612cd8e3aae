//! Raw device mappings off VMFS (formats.md §8): a descriptor (`vmfsRawDeviceMap` or
//! `vmfsPassthroughRawDeviceMap`, extent type `VMFSRDM`) and a mapping file
//! `DISK-rdm.vmdk` / `DISK-rdmp.vmdk` that is a symbolic link to the device, so the
//! pair reads and writes through the device like any flat disk.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::descriptor::{random_cid, CreateType, Descriptor, ExtentLine, ExtentType};
use crate::format::sparse::SECTOR;
use crate::output::{check_target, AtomicFile};

/// What `rdm query` reports.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RdmInfo {
    /// The descriptor.
    #[serde(rename = "file")]
    pub disk: String,
    /// `virtual` or `physical`.
    pub mode: String,
    /// The mapping file.
    pub mapping: String,
    /// The device it points to.
    pub device: String,
    /// Capacity the descriptor declares (bytes).
    pub capacity: u64,
    /// Size of the device now (bytes), when it is there.
    pub device_size: Option<u64>,
    /// Whether the device is there.
    pub present: bool,
}

impl RdmInfo {
    /// As `vmkfstools -q` words it.
    pub fn write_text(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "Disk {} is a {} mode Raw Device Mapping",
            self.disk,
            if self.mode == "physical" {
                "Passthrough (physical)"
            } else {
                "Non-passthrough (virtual)"
            }
        )?;
        writeln!(out, "Maps to: {} (via {})", self.device, self.mapping)?;
        writeln!(out, "Capacity: {} bytes", self.capacity)?;
        match self.device_size {
            Some(s) => writeln!(out, "Device: present, {s} bytes"),
            None => writeln!(out, "Device: MISSING"),
        }
    }
}

fn device_size(p: &Path) -> Result<u64> {
    let f = std::fs::File::open(p).map_err(|e| Error::io("open", p, 0, e))?;
    crate::io::device_size(&f).map_err(|e| Error::io("get the size of", p, 0, e))
}

/// Create an RDM descriptor `disk` for `device` (physical = pass-through mode).
pub fn create(disk: &Path, device: &Path, physical: bool, adapter: &str) -> Result<PathBuf> {
    let device = std::fs::canonicalize(device).map_err(|e| Error::io("find", device, 0, e))?;
    let size = device_size(&device)?;
    let sectors = size / SECTOR;
    if sectors == 0 {
        return Err(Error::InvalidInput(format!(
            "device `{}` holds less than one sector",
            device.display()
        )));
    }
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".vmdk").unwrap_or(&name).to_string();
    let suffix = if physical { "rdmp" } else { "rdm" };
    let map_name = format!("{stem}-{suffix}.vmdk");
    let map_path = disk.with_file_name(&map_name);
    crate::format::descriptor::check_file_name(&map_name)?;
    check_target(disk, false)?;
    // A mapping link already pointing at this device, with no descriptor (`disk` is
    // free): an rdm create cut short after its link. It is reused, not refused.
    let leftover = std::fs::read_link(&map_path).is_ok_and(|to| {
        let to = if to.is_absolute() {
            to
        } else {
            crate::io::join_in(&crate::io::folder_of(&map_path), to)
        };
        std::fs::canonicalize(to).is_ok_and(|to| to == device)
    });
    if !leftover {
        check_target(&map_path, false)?;
    }
    let ct = if physical {
        CreateType::VmfsPassthroughRawDeviceMap
    } else {
        CreateType::VmfsRawDeviceMap
    };
    let g = crate::format::geometry::compute(sectors, adapter);
    let ddb = vec![
        ("ddb.virtualHWVersion".to_string(), "4".to_string()),
        ("ddb.adapterType".to_string(), adapter.to_string()),
        (
            "ddb.geometry.cylinders".to_string(),
            g.cylinders.to_string(),
        ),
        ("ddb.geometry.heads".to_string(), g.heads.to_string()),
        ("ddb.geometry.sectors".to_string(), g.sectors.to_string()),
    ];
    let line = ExtentLine::rw(ExtentType::VmfsRdm, sectors, map_name);
    let d = Descriptor::new(ct, random_cid(), None, vec![line], &ddb);
    if !leftover {
        std::os::unix::fs::symlink(&device, &map_path)
            .map_err(|e| Error::io("create the mapping link", &map_path, 0, e))?;
    }
    // The link is durable before the descriptor that names it can be.
    crate::io::sync_folder(&crate::io::folder_of(&map_path))?;
    let f = match AtomicFile::create(disk, false) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&map_path);
            return Err(e);
        }
    };
    use std::os::unix::fs::FileExt;
    let r = f
        .file()
        .write_all_at(d.to_text().as_bytes(), 0)
        .map_err(|e| Error::io("write", f.tmp_path(), 0, e))
        .and_then(|_| f.commit(false));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&map_path);
        return Err(e);
    }
    Ok(map_path)
}

/// Describe an RDM descriptor without opening the device (works when it is missing).
pub fn query(disk: &Path) -> Result<RdmInfo> {
    let text = std::fs::read(disk).map_err(|e| Error::io("read", disk, 0, e))?;
    let d = Descriptor::parse(&text, disk)?;
    let mode = match d.create_type() {
        Some(CreateType::VmfsRawDeviceMap) => "virtual",
        Some(CreateType::VmfsPassthroughRawDeviceMap) => "physical",
        _ => {
            return Err(Error::not_applicable(
                disk,
                format!(
                    "is not a raw device mapping (createType {})",
                    d.get("createType").unwrap_or("-")
                ),
            ))
        }
    };
    let e = d
        .extents()
        .first()
        .map(|e| (*e).clone())
        .ok_or_else(|| Error::Descriptor {
            path: disk.to_path_buf(),
            line: 0,
            what: "no extent".into(),
        })?;
    let name = e.file.clone().unwrap_or_default();
    let map = crate::resolve::resolve_name(
        &disk
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or(PathBuf::from("."), Path::to_path_buf),
        &name,
        false,
        "mapping file",
        disk,
        &mut Vec::new(),
    )?;
    let device = std::fs::read_link(&map).unwrap_or_else(|_| map.clone());
    let present = std::fs::metadata(&map).is_ok();
    Ok(RdmInfo {
        disk: disk.display().to_string(),
        mode: mode.into(),
        mapping: map.display().to_string(),
        device: device.display().to_string(),
        capacity: e.sectors * SECTOR,
        device_size: if present {
            device_size(&map).ok()
        } else {
            None
        },
        present,
    })
}
