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

/// The geometry of a layer: from its descriptor, else computed for its adapter (or
/// lsilogic) and capacity.
pub fn of_layer(l: &crate::layer::Layer) -> (Chs, bool) {
    if let Some(g) = crate::ops::info::geometry_of(l) {
        return (
            Chs {
                cylinders: g.cylinders,
                heads: g.heads,
                sectors: g.sectors,
            },
            true,
        );
    }
    let adapter = l.descriptor.ddb("adapterType").unwrap_or("lsilogic");
    (compute(l.capacity / 512, adapter), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from formats.md §9 (VMware's descriptors and technote examples).
    #[test]
    fn matches_vmware_examples() {
        assert_eq!(
            compute(1048576000, "lsilogic"),
            Chs {
                cylinders: 65270,
                heads: 255,
                sectors: 63
            }
        );
        assert_eq!(
            compute(1048576, "lsilogic"),
            Chs {
                cylinders: 512,
                heads: 64,
                sectors: 32
            }
        );
        assert_eq!(
            compute(209714, "buslogic"),
            Chs {
                cylinders: 102,
                heads: 64,
                sectors: 32
            }
        );
        assert_eq!(
            compute(10485760, "ide"),
            Chs {
                cylinders: 10402,
                heads: 16,
                sectors: 63
            }
        );
        // 8.8 GB IDE disk: cylinders clamp at 16383.
        assert_eq!(compute(17_179_869, "ide").cylinders, 16383);
    }
}
