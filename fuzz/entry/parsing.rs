//! Entry points of the parsing fuzz targets (`tick_parse`, `client_request`, `import_lines`),
//! shared by the libFuzzer binaries in `fuzz/fuzz_targets/` and by the stable corpus replay in
//! `tests/fuzz_corpus.rs`, so both run exactly the same code on the same bytes. Each calls the
//! function production uses on untrusted bytes and checks the bounds promised on the wire; a
//! panic, abort or broken bound is a finding.

// Each fuzz binary uses one of the entry points.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tickfan::config::{LimitsConfig, QueueConfig, ValidationConfig};
use tickfan::dlq::DeadLetters;
use tickfan::import::{csv_row, ndjson_line};
use tickfan::ingest::parse::CsvColumns;
use tickfan::ingest::{IngestLimits, IngestReport, Ingestor, TimeRules};
use tickfan::protocol::{parse_request, Request, MAX_HISTORY};
use tickfan::queue::PriorityQueue;

/// One ingest stage for the whole run, drained after every input so the queue never fills
/// and every input reaches admission (dedup, quality, the queue push).
struct Stage {
    ingestor: Ingestor,
    queue: Arc<PriorityQueue>,
    limits: IngestLimits,
}

fn stage() -> &'static Stage {
    static STAGE: OnceLock<Stage> = OnceLock::new();
    STAGE.get_or_init(|| {
        let queue = Arc::new(PriorityQueue::new(&QueueConfig::default()));
        let validation = ValidationConfig {
            // Bounds the per-symbol memory the run accumulates.
            max_total_symbols: 1_000,
            ..ValidationConfig::default()
        };
        let limits = IngestLimits::from(&LimitsConfig::default());
        let ingestor = Ingestor::new(validation, queue.clone(), Arc::new(DeadLetters::new(64)))
            .with_limits(limits);
        Stage {
            ingestor,
            queue,
            limits,
        }
    })
}

fn check_report(report: &IngestReport, limits: IngestLimits) {
    assert!(report.rejected.len() <= limits.max_listed_rejections);
    assert!(report.rejected.len() <= report.rejected_total);
    assert!(report.rejected.windows(2).all(|w| w[0].index <= w[1].index));
}

/// `tick_parse`: the bytes as a `POST /api/ticks` body (object, array or NDJSON) and as an
/// `/ingest` frame, through parsing, validation and admission.
pub fn tick_parse(data: &[u8]) {
    let s = stage();
    let body = s.ingestor.ingest_body(data);
    check_report(&body, s.limits);
    let frame = s.ingestor.ingest_frame(data);
    check_report(&frame, s.limits);
    drop(s.queue.drain_round(Instant::now()));
}

/// `client_request`: the bytes as a `/ws` text frame.
pub fn client_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(text) {
        Ok((_, Request::Subscribe { history, .. })) => assert!(history <= MAX_HISTORY),
        Ok(_) => {}
        Err(bad) => assert!(!bad.message.is_empty()),
    }
}

/// `import_lines`: the first byte picks the format (even: NDJSON lines, odd: a CSV file with
/// its header row), the rest is the file.
pub fn import_lines(data: &[u8]) {
    let Some((&kind, file)) = data.split_first() else {
        return;
    };
    let rules = TimeRules {
        now_ms: 1_764_000_000_000,
        max_future_ms: 5_000,
        max_age_ms: None,
    };
    if kind % 2 == 0 {
        let depth = LimitsConfig::default().max_json_depth;
        for line in file.split(|b| *b == b'\n') {
            ndjson_line(line, rules, depth, |row| {
                if let Err(bad) = row {
                    assert!(!bad.message.is_empty());
                }
            });
        }
    } else {
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let Ok(headers) = reader.headers().cloned() else {
            return;
        };
        let columns = CsvColumns::new(&headers);
        let mut record = csv::StringRecord::new();
        while let Ok(true) = reader.read_record(&mut record) {
            let _ = csv_row(&columns, &record, rules);
        }
    }
}
