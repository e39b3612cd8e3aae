#![no_main]
//! Fuzz target: `vmdkit::fuzzing::pipe`, the sequential reader of `import -` (the same
//! body runs in `cargo test`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::pipe(data);
});
