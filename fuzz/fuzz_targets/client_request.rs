//! Fuzz target `client_request`: see `fuzz/entry/parsing.rs` and docs/fuzzing.md.
#![no_main]

#[path = "../entry/parsing.rs"]
mod parsing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| parsing::client_request(data));
