//! Disk geometry (formats.md §9): what VMware writes for each adapter type.

/// Cylinders/heads/sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u64,
    /// Heads.
    pub heads: u64,
    /// Sectors per track.
    pub sectors: u64,
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
