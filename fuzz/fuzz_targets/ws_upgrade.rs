//! The HTTP upgrade head: arbitrary bytes parsed as a request head and checked as a WebSocket
//! upgrade (see `tickfan::transport::ws::fuzzing::upgrade`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tickfan::transport::ws::fuzzing::upgrade(data));
