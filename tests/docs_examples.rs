//! The producer examples in README.md and docs/protocol.md, run as written against a real
//! server (the address swapped for this server's), and checked against the answer the docs
//! print next to them: an example that hard-codes a `ts` goes stale and answers
//! `stale_timestamp` instead of the documented `accepted`, and this test then fails.
//!
//! An example is a ```sh block that sends ticks to `127.0.0.1:8080` (`curl ... /api/ticks`,
//! or `... | websocat -n1 ws://.../ingest`, whose frame this test sends itself since websocat
//! is not installed everywhere). Its expected answer is a `# {...}` line in the block or the
//! ```json block right after it; `accepted`, `duplicates` and the rejection indices and codes
//! must match. Blocks with placeholder tokens or files are skipped.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

struct Example {
    file: &'static str,
    script: String,
    expected: Value,
}

/// The examples of one markdown file.
fn examples(file: &'static str) -> Vec<Example> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```sh" {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while lines[end].trim() != "```" {
            end += 1;
        }
        let block = &lines[start..end];
        i = end + 1;
        let script = block.join("\n");
        let sends = (script.contains("curl") && script.contains("127.0.0.1:8080/api/ticks"))
            || (script.contains("websocat") && script.contains("127.0.0.1:8080/ingest"));
        if !sends || script.contains("TOKEN") || script.contains("@ticks") {
            continue;
        }
        if script.starts_with("$ ") {
            panic!("{file}: an interactive producer example cannot be checked:\n{script}");
        }
        let expected = if let Some(l) = block.iter().find(|l| l.starts_with("# {")) {
            l.trim_start_matches("# ").to_owned()
        } else if lines.get(i).map(|l| l.trim()) == Some("```json") {
            let mut j = i + 1;
            let mut json = String::new();
            while lines[j].trim() != "```" {
                json.push_str(lines[j]);
                j += 1;
            }
            json
        } else {
            panic!("{file}: producer example without a documented answer:\n{script}");
        };
        // The docs elide long messages with "...": only codes and counts are compared.
        let expected = serde_json::from_str(&expected)
            .unwrap_or_else(|e| panic!("{file}: documented answer is not JSON ({e}): {expected}"));
        out.push(Example {
            file,
            script,
            expected,
        });
    }
    out
}

/// What the docs promise, without the free-text messages.
fn shape(ack: &Value) -> Value {
    let rejected: Vec<Value> = ack["rejected"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| serde_json::json!([r["index"], r["code"]]))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "type": ack["type"],
        "accepted": ack["accepted"],
        "duplicates": ack["duplicates"],
        "rejected": rejected,
    })
}

/// Runs a script off the runtime (the server under test runs on it and must answer curl).
async fn bash(script: &str) -> String {
    let owned = script.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &owned])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "example failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn documented_producer_examples_answer_as_documented() {
    let all: Vec<Example> = ["README.md", "docs/protocol.md"]
        .into_iter()
        .flat_map(examples)
        .collect();
    assert!(
        all.len() >= 4,
        "expected the README's and protocol.md's producer examples, found {}",
        all.len()
    );
    for ex in all {
        // A fresh server per example: examples reuse symbols and ids.
        let server = TestServer::start().await;
        let script = ex
            .script
            .replace("127.0.0.1:8080", &server.addr.to_string());
        let answer: Value = if let Some((frame_cmd, _)) = script.split_once("|\n  websocat") {
            // Run the shell part that builds the frame; send it as websocat would.
            let frame = bash(frame_cmd).await;
            let mut producer = server.producer().await;
            producer.send_text(frame.trim_end()).await;
            producer.recv().await
        } else {
            let out = bash(&script).await;
            serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("{}: answer is not JSON ({e}): {out}", ex.file))
        };
        assert_eq!(
            shape(&answer),
            shape(&ex.expected),
            "{}: the example answered {answer}\n{}",
            ex.file,
            ex.script
        );
        drop(server);
    }
}
