//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) of every target on a stable
//! toolchain, without libFuzzer: every input goes through the same entry functions the fuzz
//! binaries call (`fuzz/entry/parsing.rs` for the parsers, `tickfan::transport::ws::fuzzing` for the
//! WebSocket framing and upgrade). Inputs the fuzzer found interesting stay
//! regression tests for every `cargo test`.

#[path = "../fuzz/entry/parsing.rs"]
mod parsing;

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} fails the check", path.display());
            n += 1;
        }
    }
    // An empty or missing corpus would make this test pass while checking nothing.
    assert!(n >= 10, "only {n} corpus files in {}", dir.display());
}

#[test]
fn tick_parse_corpus() {
    replay("tick_parse", parsing::tick_parse);
}

#[test]
fn client_request_corpus() {
    replay("client_request", parsing::client_request);
}

#[test]
fn import_lines_corpus() {
    replay("import_lines", parsing::import_lines);
}

/// The inputs behind issue 12's crashes, generated here because they are too big for a
/// corpus file: each must be refused, not overflow the stack.
#[test]
fn deep_nesting_from_the_issue_is_survived() {
    let deep = "[".repeat(20_000) + &"]".repeat(20_000);
    parsing::tick_parse(deep.as_bytes());
    parsing::client_request(deep.as_bytes());
    let mut line = vec![0u8];
    line.extend("[".repeat(500_000).bytes());
    line.extend("]".repeat(500_000).bytes());
    parsing::import_lines(&line);
}

#[test]
fn ws_frames_corpus() {
    replay("ws_frames", tickfan::transport::ws::fuzzing::frames);
}

#[test]
fn ws_upgrade_corpus() {
    replay("ws_upgrade", tickfan::transport::ws::fuzzing::upgrade);
}
