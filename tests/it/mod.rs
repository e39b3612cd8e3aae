pub mod util;

mod cli;
mod corpus;
mod corrupt;
mod deltas_handmade;
mod export;
mod model;
mod mutate;
mod props;
mod read_qemu;
mod redo;
