//! Hosted sparse extents ("KDMV", formats.md §2): the header, reading, and the layout
//! vmdkit writes. Streams (compressed sparse files) live in [`crate::format::stream`].

mod header;
mod layout;
mod read;
mod write;

pub use header::*;
pub use layout::*;
pub use read::*;
pub use write::{embedded_sectors, SparseWriter};
