#![no_main]
//! Fuzz target: `vmdkit::fuzzing::nbd`, the parsers of what an NBD client sends `serve`
//! (requests, option headers, INFO/GO and meta context data; the body runs in `cargo
//! test` too).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::nbd(data);
});
