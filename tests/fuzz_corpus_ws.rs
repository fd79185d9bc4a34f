//! Replays the committed fuzz corpus of the WebSocket targets (`fuzz/corpus/ws_frames`,
//! `fuzz/corpus/ws_upgrade`) through the same checks the fuzz targets run
//! (`tickfan::ws::fuzzing`), so CI re-checks every input the fuzzer found interesting on a
//! stable toolchain, without libFuzzer.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            let run = std::panic::catch_unwind(|| check(&data));
            assert!(run.is_ok(), "{} fails the check", path.display());
            files += 1;
        }
    }
    // An empty or missing corpus would make this test pass while checking nothing.
    assert!(
        files >= 10,
        "only {files} corpus files in {}",
        dir.display()
    );
}

#[test]
fn ws_frames_corpus() {
    replay("ws_frames", tickfan::ws::fuzzing::frames);
}

#[test]
fn ws_upgrade_corpus() {
    replay("ws_upgrade", tickfan::ws::fuzzing::upgrade);
}
