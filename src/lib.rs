//! vmdkit: read, export, import and commit VMware virtual disks (VMDK).
//!
//! Open a disk (any VMDK vmdkit reads, with its parents) as a [`Chain`] and read it as
//! one [`VirtualDisk`]: a capacity, positional reads that many threads may issue at once,
//! and [`VirtualDisk::map`], which answers from metadata alone which ranges are
//! unallocated, zeroed, stored or compressed, and in which layer.
//!
//! ```
//! use vmdkit::{Chain, OpenOptions, VirtualDisk};
//!
//! # fn main() -> vmdkit::Result<()> {
//! # let top = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo-000001.vmdk");
//! // A snapshot delta and the base below it, read as one disk.
//! let disk = Chain::open(top.as_ref(), &OpenOptions::default())?;
//! let mut sector = [0u8; 512];
//! disk.read_at(&mut sector, 64 << 10)?;
//! assert_eq!(sector, [0x42; 512]); // written into the delta
//! for run in disk.map(0..disk.capacity())? {
//!     // Which layer holds each range, and how (stored, zeroed, unallocated...).
//!     println!("{:>10} {:>10} layer {} {:?}", run.start, run.len, run.depth, run.alloc);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The commands live in [`ops`], one module each, every one a function over an options
//! struct that returns a report ([`ops::export::export`], [`ops::import::import_disk`],
//! [`ops::commit::commit`], [`ops::apply::apply`], [`ops::check::check`],
//! [`ops::measure::measure`], ...); [`serve`] serves a disk over NBD. A disk need not
//! be a local file: [`Layer::from_source`] opens one from anything that implements
//! [`ReadAt`].
//!
//! The library never prints and never exits; the `vmdkit` binary is a thin layer over it.
//! Its errors ([`Error`]) name the file, the offset and what is wrong, and carry a
//! [`ErrorKind`] to act on; where an option would let the command go ahead, the error
//! says which ([`Error::overridable_by`]).
//!
//! Inside, layers point down only: file-system infrastructure (sources, locks,
//! temporaries), the formats (reader and writer side by side, every output format one
//! file), opening disks and chains, the copy engine (plan, parallel produce, ordered
//! sink), the commands.

#![deny(missing_docs)]

mod chain;
pub mod cleanup;
mod copy;
mod dependents;
mod disk;
mod error;
mod format;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod guest;
mod hooks;
mod io;
mod layer;
mod mem;
pub mod ops;
mod output;
mod recovery;
mod resolve;
mod rw;
pub mod serve;
mod units;
mod write;

pub use chain::Chain;
pub use copy::target::DiskType;
pub use copy::{NoProgress, PipelineOptions, Progress};
pub use disk::{Alloc, Run, VirtualDisk};
pub use error::{Error, ErrorKind, Override, Result};
pub use io::{ReadAt, SourceMode};
pub use layer::{Layer, OpenOptions};
pub use units::{parse_new_size, parse_size, ByteRange};
