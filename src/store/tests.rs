//! Store tests on real redb files in temporary folders: what goes in through the public API
//! comes back out through it, across reopen, clean and unclean stops, and retention.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::tick::{Priority, TradeId};

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_owned(),
        group_commit_ms: 0,
        // Retention only when a test asks for it, so results are deterministic.
        retention_interval_ms: 0,
        ..StoreConfig::default()
    }
}

pub(super) fn tick(symbol: &str, seq: u64, ts: i64, price: f64, volume: f64) -> Tick {
    Tick {
        symbol: Symbol::parse(symbol).unwrap(),
        ts,
        price,
        volume,
        bid: Some(price - 0.01),
        ask: None,
        open: None,
        high: None,
        low: None,
        close: None,
        id: Some(TradeId::Int(i64::try_from(seq).unwrap())),
        priority: if seq.is_multiple_of(7) {
            Priority::Critical
        } else {
            Priority::Normal
        },
        quality: 95,
        t_in: ts * 1000 + 17,
        seq,
    }
}

fn batch(symbol: &str, seqs: std::ops::RangeInclusive<u64>, ts: i64) -> Vec<StoredTick> {
    seqs.map(|s| {
        #[allow(clippy::cast_precision_loss)]
        let price = 100.0 + s as f64;
        StoredTick::new(tick(symbol, s, ts, price, 1.0), None)
    })
    .collect()
}

fn seqs(h: &History) -> Vec<u64> {
    h.ticks
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["seq"].as_u64().unwrap()
        })
        .collect()
}

fn dead_letter(i: usize) -> DeadLetter {
    DeadLetter {
        code: format!("code{i}"),
        message: format!("message {i}"),
        raw: format!("{{\"bad\":{i}"),
        received_at: 1_700_000_000_000 + i64::try_from(i).unwrap(),
    }
}

#[tokio::test]
async fn append_and_history_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = Store::open(&config(dir.path())).unwrap();
    assert!(rec.created && !rec.clean && rec.symbols.is_empty());
    let ts = 1_700_000_000_000;
    store.append(batch("AAPL", 1..=6, ts)).await.unwrap();
    store.append(batch("AAPL", 7..=10, ts)).await.unwrap();
    store.append(batch("MSFT", 1..=3, ts)).await.unwrap();
    store.flush().await.unwrap();

    // Without since_seq: the most recent N, oldest first.
    let h = store.history("AAPL", 3, None).unwrap();
    assert_eq!(seqs(&h), [8, 9, 10]);
    assert_eq!((h.first_seq, h.last_seq), (Some(1), 10));
    // With since_seq: the first N after it.
    assert_eq!(
        seqs(&store.history("AAPL", 4, Some(5)).unwrap()),
        [6, 7, 8, 9]
    );
    assert_eq!(seqs(&store.history("AAPL", 100, Some(8)).unwrap()), [9, 10]);
    assert!(store
        .history("AAPL", 100, Some(10))
        .unwrap()
        .ticks
        .is_empty());
    assert!(store
        .history("AAPL", 100, Some(u64::MAX))
        .unwrap()
        .ticks
        .is_empty());
    assert!(store.history("AAPL", 0, None).unwrap().ticks.is_empty());
    // Symbols don't bleed into each other (MSFT sorts after AAPL, "AAPL2" would too).
    assert_eq!(seqs(&store.history("MSFT", 100, None).unwrap()), [1, 2, 3]);
    // The stored bytes are exactly the wire serialization.
    let all = store.history("AAPL", 100, None).unwrap();
    assert_eq!(all.ticks.len(), 10);
    assert_eq!(
        all.ticks[6],
        Bytes::from(tick("AAPL", 7, ts, 107.0, 1.0).to_json())
    );
    let none = store.history("NOPE", 10, None).unwrap();
    assert_eq!(none, History::default());
    assert_eq!(store.stats().ticks_committed, 13);
    store.close().unwrap();
}

#[test]
fn seq_and_last_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    {
        let (store, _) = Store::open(&cfg).unwrap();
        store.append_blocking(batch("AAPL", 1..=5, 1_000)).unwrap();
        store
            .append_blocking(vec![StoredTick::new(
                tick("BTC-USD", 42, 2_000, 65_000.5, 0.1),
                None,
            )])
            .unwrap();
        store.close().unwrap();
    }
    let (store, rec) = Store::open(&cfg).unwrap();
    assert!(rec.clean && !rec.created);
    let mut symbols = rec.symbols.clone();
    symbols.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    assert_eq!(
        symbols,
        [
            SymbolLast {
                symbol: Symbol::parse("AAPL").unwrap(),
                seq: 5,
                price: 105.0,
                ts: 1_000
            },
            SymbolLast {
                symbol: Symbol::parse("BTC-USD").unwrap(),
                seq: 42,
                price: 65_000.5,
                ts: 2_000
            },
        ]
    );
    assert_eq!(store.symbols().unwrap().len(), 2);
    // A late lower seq does not move last state back.
    store
        .append_blocking(batch("BTC-USD", 7..=7, 3_000))
        .unwrap();
    store.flush_blocking().unwrap();
    let btc = store.history("BTC-USD", 10, None).unwrap();
    assert_eq!((seqs(&btc), btc.last_seq), (vec![7, 42], 42));
    store.close().unwrap();
}

#[test]
fn epoch_kept_after_clean_close_and_replaced_after_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, rec) = Store::open(&cfg).unwrap();
    let first = store.epoch();
    assert_eq!(rec.epoch, first);
    assert_ne!(first, 0);
    store.close().unwrap();
    drop(store);

    let (store, rec) = Store::open(&cfg).unwrap();
    assert!(rec.clean);
    assert_eq!(store.epoch(), first, "clean restart keeps the epoch");
    // Unclean stop: data handed over, no close().
    store.append_blocking(batch("AAPL", 1..=3, 1_000)).unwrap();
    drop(store);

    let (store, rec) = Store::open(&cfg).unwrap();
    assert!(!rec.clean);
    assert_ne!(store.epoch(), first, "unclean stop gets a new epoch");
    assert_ne!(store.epoch(), 0);
    // What was handed over before the drop is still there.
    assert_eq!(rec.symbols.len(), 1);
    assert_eq!(rec.symbols[0].seq, 3);
    let second = store.epoch();
    store.close().unwrap();
    drop(store);
    let (store, _) = Store::open(&cfg).unwrap();
    assert_eq!(store.epoch(), second);
    store.close().unwrap();
}

#[tokio::test]
async fn acks_settle_only_after_durable_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&config(dir.path())).unwrap();
    let release = store.hold_writer();
    let ack = Arc::new(AckGroup::new(3));
    let ticks = (1..=3)
        .map(|s| StoredTick::new(tick("AAPL", s, 1_000, 1.0, 1.0), Some(ack.clone())))
        .collect();
    store.append(ticks).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!ack.is_settled(), "settled before the writer ran");
    assert!(store.history("AAPL", 10, None).unwrap().ticks.is_empty());

    // The moment the group settles, the ticks must be readable: commit came first.
    let waiter = {
        let (ack, store) = (ack.clone(), store.clone());
        tokio::spawn(async move {
            ack.settled().await;
            store.history("AAPL", 10, None).unwrap().ticks.len()
        })
    };
    drop(release);
    store.flush().await.unwrap();
    assert!(ack.is_settled());
    assert_eq!(waiter.await.unwrap(), 3);
    store.close().unwrap();
}

#[test]
fn bars_match_hand_computation_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // Aligned to 5 minutes, so both 1m buckets fall in one 5m bucket.
    let t0 = 1_700_000_100_000;
    assert_eq!(t0 % Timeframe::M5.millis(), 0);
    let mk =
        |seq, dt, price, volume| StoredTick::new(tick("ETH", seq, t0 + dt, price, volume), None);
    let (store, _) = Store::open(&cfg).unwrap();
    // Seq 1 (the open of the first minute) is committed after seqs 2 and 3, in a later
    // transaction: open/close follow seq order, not commit order.
    store
        .append_blocking(vec![mk(2, 20_000, 12.0, 2.0), mk(3, 59_999, 9.0, 3.0)])
        .unwrap();
    store.flush_blocking().unwrap();
    store
        .append_blocking(vec![
            mk(1, 1_000, 10.0, 1.0),
            mk(4, 60_000, 11.0, 1.0),
            mk(5, 61_000, 13.0, 5.0),
        ])
        .unwrap();
    store.close().unwrap();
    drop(store);

    let (store, _) = Store::open(&cfg).unwrap();
    let m1 = store.bars("ETH", Timeframe::M1, 10).unwrap();
    let bar = |t, open, high, low, close, volume, count| Bar {
        t,
        open,
        high,
        low,
        close,
        volume,
        count,
    };
    assert_eq!(
        m1,
        [
            bar(t0, 10.0, 12.0, 9.0, 9.0, 6.0, 3),
            bar(t0 + 60_000, 11.0, 13.0, 11.0, 13.0, 6.0, 2),
        ]
    );
    assert_eq!(store.bars("ETH", Timeframe::M1, 1).unwrap(), m1[1..]);
    for tf in [Timeframe::M5, Timeframe::M15, Timeframe::H1] {
        let b = store.bars("ETH", tf, 10).unwrap();
        assert_eq!(b.len(), 1, "{tf:?}");
        assert_eq!(
            (
                b[0].open,
                b[0].high,
                b[0].low,
                b[0].close,
                b[0].volume,
                b[0].count
            ),
            (10.0, 13.0, 9.0, 13.0, 12.0, 5)
        );
        assert_eq!(b[0].t, tf.bucket_start(t0));
    }
    assert!(store.bars("OTHER", Timeframe::M1, 10).unwrap().is_empty());

    // A re-sent tick is stored once and not counted twice.
    store
        .append_blocking(vec![mk(5, 61_000, 13.0, 5.0)])
        .unwrap();
    store.flush_blocking().unwrap();
    assert_eq!(store.bars("ETH", Timeframe::M1, 10).unwrap(), m1);
    assert_eq!(store.stats().duplicate_ticks, 1);
    store.close().unwrap();
}

#[test]
fn timeframes() {
    for (s, ms) in [
        ("1m", 60_000),
        ("5m", 300_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("4h", 14_400_000),
        ("1d", 86_400_000),
    ] {
        let tf = Timeframe::parse(s).unwrap();
        assert_eq!((tf.as_str(), tf.millis()), (s, ms));
    }
    assert_eq!(Timeframe::parse("2m"), None);
    assert_eq!(Timeframe::M1.bucket_start(119_999), 60_000);
    assert_eq!(Timeframe::M1.bucket_start(-1), -60_000);
}

#[test]
fn dead_letters_survive_reopen_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dlq_capacity: 5,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    store.push_dead_letters((0..3).map(dead_letter).collect());
    store.flush_blocking().unwrap();
    store.push_dead_letters((3..8).map(dead_letter).collect());
    store.flush_blocking().unwrap();
    let codes = |v: Vec<DeadLetter>| v.into_iter().map(|d| d.code).collect::<Vec<_>>();
    assert_eq!(
        codes(store.dead_letters(100).unwrap()),
        ["code7", "code6", "code5", "code4", "code3"]
    );
    store.close().unwrap();
    drop(store);

    let (store, _) = Store::open(&cfg).unwrap();
    let dl = store.dead_letters(2).unwrap();
    assert_eq!(dl, [dead_letter(7), dead_letter(6)]);
    // One push larger than the capacity keeps its newest entries.
    store.push_dead_letters((10..20).map(dead_letter).collect());
    store.flush_blocking().unwrap();
    assert_eq!(
        codes(store.dead_letters(100).unwrap()),
        ["code19", "code18", "code17", "code16", "code15"]
    );
    assert_eq!(store.stats().dead_letters_dropped, 0);
    store.close().unwrap();
}

#[test]
fn retention_by_count_moves_first_seq() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_ticks_per_symbol: 10,
        // Smaller than the work, so the pass takes several transactions.
        retention_batch: 4,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    store.append_blocking(batch("AAPL", 1..=25, 1_000)).unwrap();
    store.append_blocking(batch("MSFT", 1..=4, 1_000)).unwrap();
    let report = store.run_retention().unwrap();
    assert_eq!(report.ticks, 15);
    let h = store.history("AAPL", 100, None).unwrap();
    assert_eq!(seqs(&h), (16..=25).collect::<Vec<_>>());
    assert_eq!((h.first_seq, h.last_seq), (Some(16), 25));
    // A resume from before first_seq can see the gap and gets what is left.
    let resume = store.history("AAPL", 100, Some(5)).unwrap();
    assert!(5 + 1 < resume.first_seq.unwrap());
    assert_eq!(seqs(&resume).first(), Some(&16));
    assert_eq!(store.history("MSFT", 100, None).unwrap().ticks.len(), 4);
    // Bars keep the long view after raw ticks are gone.
    assert_eq!(store.bars("AAPL", Timeframe::M1, 10).unwrap()[0].count, 25);
    // Nothing more to do.
    assert_eq!(store.run_retention().unwrap(), RetentionReport::default());
    store.close().unwrap();
}

#[test]
fn retention_by_age_for_ticks_and_bars() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_ticks_per_symbol: 0,
        max_age_ms: 3_600_000,
        bars_max_per_symbol: 1,
        ..config(dir.path())
    };
    let now = crate::tick::now_ms();
    let (store, _) = Store::open(&cfg).unwrap();
    store
        .append_blocking(batch("AAPL", 1..=5, now - 7_200_000))
        .unwrap();
    store.append_blocking(batch("AAPL", 6..=8, now)).unwrap();
    let report = store.run_retention().unwrap();
    assert_eq!(report.ticks, 5);
    assert!(report.bars >= 3, "old 1m/5m/15m bars go: {report:?}");
    let h = store.history("AAPL", 100, None).unwrap();
    assert_eq!((seqs(&h), h.first_seq), (vec![6, 7, 8], Some(6)));
    for tf in Timeframe::ALL {
        let bars = store.bars("AAPL", tf, 100).unwrap();
        assert_eq!(bars.len(), 1, "{tf:?}");
        assert_eq!(bars[0].t, tf.bucket_start(now));
    }
    store.close().unwrap();
    drop(store);

    // Bars by their own (longer) age.
    let cfg = StoreConfig {
        max_age_ms: 0,
        bars_max_per_symbol: 0,
        bars_max_age_ms: 60_000,
        ..cfg
    };
    let (store, _) = Store::open(&cfg).unwrap();
    store
        .append_blocking(batch("OLD", 1..=2, now - 10 * 86_400_000))
        .unwrap();
    store.run_retention().unwrap();
    assert!(store.bars("OLD", Timeframe::D1, 10).unwrap().is_empty());
    assert_eq!(store.history("OLD", 10, None).unwrap().ticks.len(), 2);
    store.close().unwrap();
}

#[test]
fn retention_runs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_ticks_per_symbol: 5,
        retention_interval_ms: 20,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    store.append_blocking(batch("AAPL", 1..=12, 1_000)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if store.history("AAPL", 100, None).unwrap().first_seq == Some(8) {
            break;
        }
        assert!(Instant::now() < deadline, "retention did not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(store.stats().ticks_retained_away >= 7);
    store.close().unwrap();
}

#[test]
fn garbage_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let garbage: Vec<u8> = (0..65_536u32)
        .map(|i| u8::try_from(i.wrapping_mul(2_654_435_761) >> 24).unwrap())
        .collect();
    std::fs::write(&path, garbage).unwrap();
    let err = Store::open(&config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tickfan.redb"), "{msg}");

    std::fs::write(&path, "this is not a database\n").unwrap();
    let msg = Store::open(&config(dir.path())).unwrap_err().to_string();
    assert!(msg.contains("tickfan.redb"), "{msg}");
}

#[test]
fn damaged_store_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, _) = Store::open(&cfg).unwrap();
    store
        .append_blocking(batch("AAPL", 1..=60_000, 1_000))
        .unwrap();
    store.close().unwrap();
    drop(store);
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    // Scribble over the data pages but keep the header intact, so only the page checksums
    // can tell.
    for (i, b) in bytes
        .iter_mut()
        .enumerate()
        .take(len - len / 4)
        .skip(len / 4)
    {
        *b ^= u8::try_from(i % 251).unwrap() | 1;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(&cfg).unwrap_err();
    assert!(err.to_string().contains("tickfan.redb"), "{err}");
    // Without the full check redb may panic on the damage; that too must come back as an
    // error naming the file (redb's panic message still goes to stderr).
    let fast = StoreConfig {
        verify_on_open: false,
        ..cfg.clone()
    };
    if let Err(err) = Store::open(&fast) {
        assert!(err.to_string().contains("tickfan.redb"), "{err}");
    }
}

#[test]
fn import_progress_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, _) = Store::open(&cfg).unwrap();
    let key = "/data/ticks.csv:1234:1700000000";
    assert_eq!(store.import_progress(key).unwrap(), 0);
    store
        .append_blocking(batch("AAPL", 1..=500, 1_000))
        .unwrap();
    store.set_import_progress(key, 500).unwrap();
    store.flush_blocking().unwrap();
    assert_eq!(store.import_progress(key).unwrap(), 500);
    store.set_import_progress(key, 1_000).unwrap();
    store.close().unwrap();
    drop(store);
    let (store, _) = Store::open(&cfg).unwrap();
    assert_eq!(store.import_progress(key).unwrap(), 1_000);
    assert_eq!(store.import_progress("other").unwrap(), 0);
    store.close().unwrap();
}

#[tokio::test]
async fn full_writer_queue_is_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        writer_queue: 1,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    let release = store.hold_writer();
    // The writer may not have taken the hold yet; wait until the queue is empty.
    while !store.inner.tx.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    store.append(batch("AAPL", 1..=1, 1_000)).await.unwrap();
    let blocked = tokio::time::timeout(
        Duration::from_millis(50),
        store.append(batch("AAPL", 2..=2, 1_000)),
    )
    .await;
    assert!(blocked.is_err(), "append must wait while the queue is full");
    // Dead letters never wait: they are dropped and counted.
    store.push_dead_letters(vec![dead_letter(1), dead_letter(2)]);
    assert_eq!(store.stats().dead_letters_dropped, 2);
    drop(release);
    store.append(batch("AAPL", 2..=2, 1_000)).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.history("AAPL", 10, None).unwrap().last_seq, 2);
    store.close().unwrap();
}

#[tokio::test]
async fn close_is_idempotent_and_stops_writes_not_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&config(dir.path())).unwrap();
    store.append(batch("AAPL", 1..=2, 1_000)).await.unwrap();
    store.close().unwrap();
    store.close().unwrap();
    assert!(matches!(
        store.append(batch("AAPL", 3..=3, 1_000)).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.flush().await, Err(StoreError::Closed)));
    assert_eq!(store.history("AAPL", 10, None).unwrap().ticks.len(), 2);
    // A second open while this handle lives is refused with a clear message.
    let err = Store::open(&config(dir.path())).unwrap_err().to_string();
    assert!(err.contains("tickfan.redb"), "{err}");
}

#[test]
fn store_handle_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Store>();
}

#[test]
fn late_and_resent_ticks_merge_into_their_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&config(dir.path())).unwrap();
    let mut first = batch("AAPL", 1..=10, 1_000);
    first.remove(4); // seq 5 comes late
    store.append_blocking(first).unwrap();
    store.flush_blocking().unwrap();
    store.append_blocking(batch("AAPL", 5..=5, 1_000)).unwrap();
    // Re-sent: one below the last seq, one equal to it, and one twice in one batch.
    store.append_blocking(batch("AAPL", 3..=3, 1_000)).unwrap();
    store
        .append_blocking(batch("AAPL", 10..=10, 1_000))
        .unwrap();
    store
        .append_blocking(batch("AAPL", 11..=11, 1_000))
        .unwrap();
    store
        .append_blocking(batch("AAPL", 11..=11, 1_000))
        .unwrap();
    store.flush_blocking().unwrap();
    let h = store.history("AAPL", 100, None).unwrap();
    assert_eq!(seqs(&h), (1..=11).collect::<Vec<_>>());
    assert_eq!(h.last_seq, 11);
    assert_eq!(
        h.ticks[4],
        Bytes::from(tick("AAPL", 5, 1_000, 105.0, 1.0).to_json())
    );
    let stats = store.stats();
    assert_eq!((stats.ticks_committed, stats.duplicate_ticks), (11, 3));
    let bars = store.bars("AAPL", Timeframe::M1, 10).unwrap();
    assert_eq!(
        (bars[0].count, bars[0].open, bars[0].close),
        (11, 101.0, 111.0)
    );
    store.close().unwrap();
}

#[test]
fn many_chunks_history_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_ticks_per_symbol: 600,
        retention_batch: 100,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    // One batch, so one transaction writes several chunks for the symbol.
    store
        .append_blocking(batch("AAPL", 1..=1_000, 1_000))
        .unwrap();
    store
        .append_blocking(batch("AAPL", 1_001..=1_003, 1_000))
        .unwrap();
    store.flush_blocking().unwrap();
    let h = store.history("AAPL", 300, None).unwrap();
    assert_eq!(seqs(&h), (704..=1_003).collect::<Vec<_>>());
    // Across a chunk boundary (chunks hold 256 ticks).
    let h = store.history("AAPL", 10, Some(250)).unwrap();
    assert_eq!(seqs(&h), (251..=260).collect::<Vec<_>>());
    let h = store.history("AAPL", 5_000, Some(0)).unwrap();
    assert_eq!(seqs(&h), (1..=1_003).collect::<Vec<_>>());
    assert_eq!(store.run_retention().unwrap().ticks, 403);
    let h = store.history("AAPL", 5_000, None).unwrap();
    assert_eq!(h.first_seq, Some(404));
    assert_eq!(seqs(&h), (404..=1_003).collect::<Vec<_>>());
    store.close().unwrap();
}

fn acked_batch(
    symbol: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> (Vec<StoredTick>, Arc<AckGroup>) {
    let ack = Arc::new(AckGroup::new(seqs.clone().count()));
    let ticks = batch(symbol, seqs, 1_000)
        .into_iter()
        .map(|st| StoredTick::new(st.tick, Some(ack.clone())))
        .collect();
    (ticks, ack)
}

/// Appends `symbol` ticks `seqs` with an ack and waits until it settles.
async fn append_acked(store: &Store, symbol: &str, seqs: std::ops::RangeInclusive<u64>) {
    let (ticks, ack) = acked_batch(symbol, seqs);
    store.append(ticks).await.unwrap();
    ack.settled().await;
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(log::FILE_NAME)).unwrap().len()
}

/// The store's files as a kill would leave them now (the writer idle between groups: redb
/// holds its last durable commit, the log what was appended since), in a new folder.
fn crash_copy(dir: &Path) -> tempfile::TempDir {
    let crashed = tempfile::tempdir().unwrap();
    for name in [FILE_NAME, log::FILE_NAME] {
        std::fs::copy(dir.join(name), crashed.path().join(name)).unwrap();
    }
    crashed
}

/// Polls (10 s deadline) until `n` ticks are committed to redb.
async fn wait_committed(store: &Store, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().ticks_committed < n {
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A store with `checkpoint_ms`, after AAPL ticks `seqs` were appended and acked; the
/// stats are from before the append.
async fn store_after_acked(
    checkpoint_ms: u64,
    seqs: std::ops::RangeInclusive<u64>,
) -> (tempfile::TempDir, Store, StoreStats) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        checkpoint_ms,
        ..config(dir.path())
    };
    let (store, _) = Store::open(&cfg).unwrap();
    let before = store.stats();
    append_acked(&store, "AAPL", seqs).await;
    (dir, store, before)
}

/// A small group is acked once the log holds it, and waits there, not in redb, until a read
/// asks for a checkpoint: the read then sees every acked tick and the log is emptied.
#[tokio::test]
async fn logged_ticks_are_acked_before_redb_and_a_read_checkpoints_them() {
    let (dir, store, before) = store_after_acked(600_000, 1..=3).await;
    let st = store.stats();
    assert_eq!(st.log_appends, before.log_appends + 1);
    assert_eq!(st.log_pending_ticks, 3);
    assert_eq!(st.commits, before.commits, "acked without a redb commit");
    assert!(log_len(dir.path()) > 0);

    // Another symbol's reads (ingest's first look at a new symbol is one) do not wait.
    assert!(store.history("MSFT", 10, None).unwrap().ticks.is_empty());
    assert!(store.bars("MSFT", Timeframe::M1, 10).unwrap().is_empty());
    assert_eq!(store.stats().log_pending_ticks, 3);
    assert_eq!(seqs(&store.history("AAPL", 10, None).unwrap()), [1, 2, 3]);
    let st = store.stats();
    assert_eq!((st.log_pending_ticks, st.commits), (0, before.commits + 1));
    assert_eq!(st.ticks_committed, 3);
    assert_eq!(log_len(dir.path()), 0, "a checkpoint empties the log");
    assert_eq!(store.bars("AAPL", Timeframe::M1, 10).unwrap()[0].count, 3);

    // The symbol list is about every symbol: it waits for any logged tick.
    append_acked(&store, "MSFT", 1..=2).await;
    assert_eq!(store.stats().log_pending_ticks, 2);
    assert_eq!(store.symbols().unwrap().len(), 2);
    assert_eq!(store.stats().log_pending_ticks, 0);
    store.close().unwrap();
}

/// Nobody reads: the checkpoint still comes within `checkpoint_ms`.
#[tokio::test]
async fn logged_ticks_are_checkpointed_on_their_own() {
    let (dir, store, _) = store_after_acked(20, 1..=4).await;
    assert_eq!(store.stats().log_appends, 1);
    wait_committed(&store, 4).await;
    assert_eq!(store.stats().log_pending_ticks, 0);
    assert_eq!(log_len(dir.path()), 0);
    store.close().unwrap();
}

/// A crash after the acks, before any checkpoint: the files as the kill leaves them (copied
/// while the server would still run) open with every acked tick, bars counted once.
#[tokio::test]
async fn a_crash_copy_replays_the_log_once() {
    let (dir, store, _) = store_after_acked(600_000, 1..=5).await;
    append_acked(&store, "MSFT", 1..=3).await;
    assert_eq!(store.stats().log_pending_ticks, 8);
    let crashed = crash_copy(dir.path());
    store.close().unwrap();

    let cfg = config(crashed.path());
    let (store, rec) = Store::open(&cfg).unwrap();
    assert!(!rec.clean);
    assert_eq!(rec.replayed_ticks, 8);
    let mut last: Vec<_> = rec
        .symbols
        .iter()
        .map(|s| (s.symbol.as_str().to_owned(), s.seq))
        .collect();
    last.sort();
    assert_eq!(last, [("AAPL".to_owned(), 5), ("MSFT".to_owned(), 3)]);
    assert_eq!(
        seqs(&store.history("AAPL", 10, None).unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(log_len(crashed.path()), 0);
    drop(store);
    // The replay was durable and emptied the log: the next open replays nothing again.
    let (store, rec) = Store::open(&cfg).unwrap();
    assert_eq!(rec.replayed_ticks, 0);
    assert_eq!(store.bars("AAPL", Timeframe::M1, 10).unwrap()[0].count, 5);
    assert_eq!(store.stats().ticks_committed, 0);
    store.close().unwrap();
}

/// `checkpoint_ms = 0`: no log file, every group is a redb commit.
#[tokio::test]
async fn the_log_can_be_turned_off() {
    let (dir, store, _) = store_after_acked(0, 1..=3).await;
    let st = store.stats();
    assert_eq!((st.log_appends, st.ticks_committed), (0, 3));
    assert!(!dir.path().join(log::FILE_NAME).exists());
    store.close().unwrap();
}

/// Symbols whose last chunk filled by bytes, followed in the same transaction by another
/// symbol: each keeps exactly its own ticks (an empty chunk writer that called itself full
/// once stored a stale chunk under the next symbol, which then read as corrupt).
#[test]
fn big_ticks_of_several_symbols_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&config(dir.path())).unwrap();
    let big = |symbol: &str, seqs: std::ops::RangeInclusive<u64>| -> Vec<StoredTick> {
        batch(symbol, seqs, 1_000)
            .into_iter()
            .map(|mut st| {
                st.tick.id = Some(TradeId::Str("x".repeat(1000).into()));
                st
            })
            .collect()
    };
    let mut all = big("A", 1..=16);
    all.extend(big("B", 100..=102));
    all.extend(big("C", 200..=215));
    store.append_blocking(all).unwrap();
    store.flush_blocking().unwrap();
    assert_eq!(
        seqs(&store.history("A", 100, None).unwrap()),
        (1..=16).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&store.history("B", 100, None).unwrap()),
        [100, 101, 102]
    );
    assert_eq!(
        seqs(&store.history("C", 100, None).unwrap()),
        (200..=215).collect::<Vec<_>>()
    );
    store.close().unwrap();
}

/// Groups that keep arriving do not hold a checkpoint off: the first group after it came due
/// commits to redb, taking the logged ticks with it, instead of being logged too.
#[tokio::test]
async fn a_group_arriving_after_the_checkpoint_is_due_makes_it() {
    let (_dir, store, _) = store_after_acked(1_000, 1..=1).await;
    assert_eq!(store.stats().log_appends, 1);
    // The writer is held with B waiting for it until the checkpoint is due: what a busy
    // stream looks like to the writer, which finds a group waiting every time it looks.
    let release = store.hold_writer();
    let (b, ack_b) = acked_batch("AAPL", 2..=2);
    store.append(b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    drop(release);
    ack_b.settled().await;
    wait_committed(&store, 2).await;
    let st = store.stats();
    assert_eq!(
        (st.log_appends, st.log_pending_ticks),
        (1, 0),
        "B was logged: {st:?}"
    );
    store.close().unwrap();
}

/// A flush (or any group) with nothing to write commits nothing, so it must not move the
/// log to a new generation either: records logged after it would be ahead of redb's
/// generation, and a crash would lose them (found in review).
#[tokio::test]
async fn a_flush_with_nothing_to_write_keeps_the_log_in_step() {
    let (dir, store, _) = store_after_acked(600_000, 1..=1).await;
    store.flush().await.unwrap(); // the checkpoint
    store.flush().await.unwrap(); // nothing pending, nothing to write
    append_acked(&store, "AAPL", 2..=3).await;
    assert_eq!(store.stats().log_pending_ticks, 2);
    let crashed = crash_copy(dir.path());
    store.close().unwrap();
    let (store, rec) = Store::open(&config(crashed.path())).unwrap();
    assert_eq!(rec.replayed_ticks, 2);
    assert_eq!(seqs(&store.history("AAPL", 10, None).unwrap()), [1, 2, 3]);
    store.close().unwrap();
}

/// A record damaged in the middle of the log (not a torn tail): what precedes it is stored,
/// and the file is kept aside for a person instead of being emptied.
#[tokio::test]
async fn a_damaged_log_is_kept_aside() {
    let (dir, store, _) = store_after_acked(600_000, 1..=1).await;
    for seq in 2..=3 {
        append_acked(&store, "AAPL", seq..=seq).await;
    }
    assert_eq!(store.stats().log_appends, 3);
    let crashed = crash_copy(dir.path());
    store.close().unwrap();
    // Flip a payload byte of the second record.
    let path = crashed.path().join(log::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let first = 20 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    bytes[first + 23] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let (store, rec) = Store::open(&config(crashed.path())).unwrap();
    assert_eq!(rec.replayed_ticks, 1);
    assert_eq!(seqs(&store.history("AAPL", 10, None).unwrap()), [1]);
    let kept: Vec<_> = std::fs::read_dir(crashed.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("tickfan.log.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(crashed.path().join(&kept[0])).unwrap(),
        bytes,
        "kept as it was found"
    );
    store.close().unwrap();
}

/// A store of another format version is refused before its log is replayed into it: the
/// replay would write this build's layout into a file it does not understand.
#[tokio::test]
async fn a_store_of_another_format_is_refused_before_its_log_is_touched() {
    let (dir, store, _) = store_after_acked(600_000, 1..=2).await;
    let crashed = crash_copy(dir.path());
    store.close().unwrap();
    {
        let db = redb::Database::create(crashed.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(codec::META_FORMAT, codec::FORMAT_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let log_before = std::fs::read(crashed.path().join(log::FILE_NAME)).unwrap();
    let err = Store::open(&config(crashed.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown store format version"), "{err}");
    assert_eq!(
        std::fs::read(crashed.path().join(log::FILE_NAME)).unwrap(),
        log_before
    );
    let db = redb::Database::create(crashed.path().join(FILE_NAME)).unwrap();
    let rtx = db.begin_read().unwrap();
    assert!(rtx.open_table(LAST).unwrap().get("AAPL").unwrap().is_none());
}
