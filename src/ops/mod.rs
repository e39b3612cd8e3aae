//! The commands: info/map, cat, export (and increments), apply, measure, import, create, extend, geometry, redo add and
//! write, commit, check, verify (manifests), rdm, ls. Each depends on the copy engine
//! (`crate::copy`) and the formats, never on another command except through the small
//! shared modules (`crate::output`, `crate::resolve`, `crate::guard`).

pub mod apply;
pub mod cat;
pub mod check;
pub mod commit;
pub mod export;
pub mod extend;
pub mod geometry;
pub mod import;
pub mod info;
pub mod ls;
pub mod manifest;
pub mod measure;
pub mod rdm;
pub mod redo;

pub(crate) use crate::copy::Progress;

pub use crate::units::human;
