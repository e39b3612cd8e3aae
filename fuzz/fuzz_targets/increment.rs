#![no_main]
//! Fuzz target: `vmdkit::fuzzing::increment`, an increment as `apply` validates it
//! before the first write (the same body runs in `cargo test`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::increment(data);
});
