//! `geometry`: a disk's cylinders/heads/sectors (vmkfstools -g), from its descriptor or
//! computed as VMware would (formats.md §9, `crate::format::geometry`).

pub use crate::format::geometry::{compute, parse_adapter, Chs, ADAPTERS};

/// The geometry of a layer: from its descriptor, else computed for its adapter (or
/// lsilogic) and capacity.
pub fn of_layer(l: &crate::layer::Layer) -> (Chs, bool) {
    if let Some(g) = crate::format::geometry::from_descriptor(&l.descriptor) {
        return (g, true);
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
