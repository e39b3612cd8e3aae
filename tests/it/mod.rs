pub mod util;

mod cli;
mod corpus;
mod corrupt;
mod export;
mod mutate;
mod props;
mod read_qemu;
mod redo;
