//! vmdkit: read, export, import and commit VMware virtual disks (VMDK).
//!
//! The read model is [`VirtualDisk`]: a capacity, positional reads that many threads may
//! issue at once, and [`VirtualDisk::map`], which answers from metadata alone which
//! ranges are unallocated, zeroed, stored or compressed, and in which layer. [`Chain`]
//! opens any disk vmdkit reads together with its parents.
//!
//! Layers, from the bottom: [`mod@format`] (on-disk formats, reader and writer side by side),
//! [`layer`] / [`chain`] (opening disks), [`copy`] (the one copy engine: plan, parallel
//! produce, ordered sink), [`ops`] (the commands). Dependencies point down only.
//!
//! The library never prints and never exits; the `vmdkit` binary is a thin layer over it.

#![warn(missing_docs)]

pub mod chain;
pub mod copy;
pub mod disk;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod guard;
pub mod io;
pub mod layer;
pub mod ops;
pub mod output;
pub mod recovery;
pub mod resolve;
pub mod rw;
pub mod serve;
pub mod units;
pub mod write;

pub use chain::Chain;
pub use disk::{Alloc, Run, VirtualDisk};
pub use error::{Error, ErrorKind, Result};
pub use layer::{Layer, OpenOptions};
