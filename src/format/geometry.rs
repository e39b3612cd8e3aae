//! Disk geometry (formats.md §9): what VMware writes for each adapter type, and what a
//! descriptor's disk database says.

/// Cylinders/heads/sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u64,
    /// Heads.
    pub heads: u64,
    /// Sectors per track.
    pub sectors: u64,
}

/// The adapter types a descriptor's `ddb.adapterType` may name, canonical spelling.
pub const ADAPTERS: [&str; 5] = ["ide", "buslogic", "lsilogic", "legacyESX", "pvscsi"];

/// An adapter name, any case in, canonical out; anything else is refused.
pub fn parse_adapter(s: &str) -> crate::Result<&'static str> {
    ADAPTERS
        .iter()
        .find(|a| a.eq_ignore_ascii_case(s.trim()))
        .copied()
        .ok_or_else(|| {
            crate::Error::InvalidInput(format!(
                "unknown adapter type `{s}` (one of {})",
                ADAPTERS.join(", ")
            ))
        })
}

/// VMware's geometry for a disk of `sectors` on `adapter`: IDE 16/63 with cylinders
/// clamped to 16383; SCSI 64/32 below 1 GiB, else 255/63.
pub fn compute(sectors: u64, adapter: &str) -> Chs {
    if adapter.eq_ignore_ascii_case("ide") {
        return Chs {
            cylinders: (sectors / (16 * 63)).min(16383),
            heads: 16,
            sectors: 63,
        };
    }
    if sectors < 2 * 1024 * 1024 {
        Chs {
            cylinders: sectors / (64 * 32),
            heads: 64,
            sectors: 32,
        }
    } else {
        Chs {
            cylinders: sectors / (255 * 63),
            heads: 255,
            sectors: 63,
        }
    }
}

/// The geometry a descriptor's disk database gives, if all three keys are there.
pub fn from_descriptor(d: &crate::format::descriptor::Descriptor) -> Option<Chs> {
    let g = |k: &str| d.ddb(k).and_then(|v| v.trim().parse::<u64>().ok());
    Some(Chs {
        cylinders: g("geometry.cylinders")?,
        heads: g("geometry.heads")?,
        sectors: g("geometry.sectors")?,
    })
}
