#![no_main]
//! Fuzz target: `vmdkit::fuzzing::recovery`, commit's and apply's state files and
//! journals (the same body runs in `cargo test`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::recovery(data);
});
