pub mod util;

mod cli;
mod corpus;
mod corrupt;
mod mutate;
mod read_qemu;
