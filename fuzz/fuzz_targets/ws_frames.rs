//! Frame decoding and message reassembly: arbitrary bytes, cut into reads in arbitrary
//! places, through `tickfan::transport::ws::Decoder` (see `tickfan::transport::ws::fuzzing::frames`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tickfan::transport::ws::fuzzing::frames(data));
