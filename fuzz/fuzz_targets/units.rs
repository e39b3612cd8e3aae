#![no_main]
//! Fuzz target: `vmdkit::fuzzing::units`, sizes and offsets as typed on a command line.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::units(data);
});
