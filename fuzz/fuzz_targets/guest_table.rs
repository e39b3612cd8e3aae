#![no_main]
//! Fuzz target: `vmdkit::fuzzing::guest`, the guest-aware scan's partition-table
//! readers (MBR with its EBR chain, GPT primary and backup) and what they lead to.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::guest(data);
});
