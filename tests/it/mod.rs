pub mod util;

mod backup;
mod check;
mod cli;
mod commandline;
mod corpus;
mod corrupt;
mod deltas_handmade;
mod export;
mod hostile;
mod import;
mod model;
mod mutate;
mod props;
mod read_qemu;
mod redo;
mod safety;
mod trust;
