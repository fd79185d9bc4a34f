//! A disk that fills up under the store. The store folder is a small tmpfs mounted by the test
//! (this needs root, which CI has): a filler file takes the rest of its space, so redb's next
//! commit fails with ENOSPC, as on a real full disk. The server must say so on `/health` (503),
//! refuse new ticks with `backpressure` (HTTP 503 + Retry-After, the backpressure error on
//! `/ingest`), send no ack for ticks it has not stored, keep running, and once the filler is
//! deleted store the ticks it had accepted and recover on its own. Real server, real sockets,
//! real redb file.
//!
//! Without root (or without tmpfs) the test fails with a message saying so: a disk-full test
//! that silently passes would prove nothing.

mod common;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Size of the store's filesystem: room for the redb file and a few commits.
const FS_BYTES: usize = 32 * 1024 * 1024;

/// A tmpfs mounted on a folder; unmounted (lazily, in case the file is still open) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, bytes: usize) -> Self {
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={bytes},mode=0700")).unwrap();
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "this test mounts a small tmpfs to fill the store's disk and needs root (or \
             CAP_SYS_ADMIN): mount tmpfs on {} failed: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path; MNT_DETACH lets it go even if the server still holds the file.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Writes a file until the filesystem is full (ENOSPC); returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let mut chunk = vec![0xA5u8; 1 << 20];
    let mut written = 0;
    loop {
        // Never more than the tmpfs holds: if the mount were somehow not there, this must
        // not fill the real disk.
        assert!(
            written <= FS_BYTES,
            "wrote {written} bytes: {} is not the small tmpfs",
            dir.display()
        );
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                // The last partial megabyte: halve until even a byte does not fit.
                if chunk.len() == 1 {
                    break;
                }
                chunk.truncate(chunk.len() / 2);
            }
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    path
}

/// `n` ticks of `symbol`, each with an `id` (`tag`-i) so every one is distinct.
fn ticks(symbol: &str, tag: &str, n: usize) -> String {
    let list: Vec<Value> = (0..n)
        .map(|i| {
            let mut t = tick(symbol, 100.0 + (i % 100) as f64 * 0.01, 1.0);
            t["id"] = format!("{tag}-{i}").into();
            t
        })
        .collect();
    Value::from(list).to_string()
}

async fn health(server: &TestServer) -> (u16, Value) {
    tokio::time::timeout(DEADLINE, server.get_json("/health"))
        .await
        .expect("no answer from /health within the deadline")
}

async fn post(server: &TestServer, body: String) -> (u16, Option<String>, Value) {
    let (status, headers, json) = tokio::time::timeout(DEADLINE, server.post_ticks(body))
        .await
        .expect("no answer to a POST within the deadline");
    let retry = headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pushes_back_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let _mounted = Tmpfs::mount(dir.path(), FS_BYTES);
    let mut config = test_config();
    // Retention would also write; keep the test about ingest.
    config.store.retention_interval_ms = 0;
    let mut server = TestServer::start_in(config, dir).await;
    let fs = server.dir.path().to_path_buf();

    // Healthy: a batch is stored and acked.
    let (status, _, ack) = post(&server, ticks("DISK", "a", 500)).await;
    assert_eq!((status, &ack["accepted"]), (200, &json!(500)), "{ack}");
    assert_eq!(health(&server).await.0, 200);

    // The disk fills up. This batch is accepted (nothing failed yet), but its commit fails:
    // its producer must not get an ack until it is stored.
    let filler = fill(&fs);
    let pending = {
        let body = ticks("DISK", "b", 5_000);
        let url = server.http("/api/ticks");
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        })
    };

    // /health says why, with 503.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reasons = loop {
        let (status, body) = health(&server).await;
        if status == 503 {
            break body["reasons"].to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/health never reported the full disk: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        reasons.contains("store") && reasons.contains("space"),
        "/health must name the failing store and why: {reasons}"
    );
    assert!(server.metric("tickfan_store_commit_errors_total").await >= 1.0);
    assert_eq!(server.metric("tickfan_store_failing").await, 1.0);

    // New ticks are refused with backpressure while the store fails: POST gets 503 with
    // Retry-After and every tick listed as refused; /ingest gets the backpressure error.
    let (status, retry, refused) = post(&server, ticks("DISK", "c", 100)).await;
    assert_eq!(status, 503, "{refused}");
    assert!(retry.is_some(), "503 without Retry-After");
    assert_eq!(refused["code"], "backpressure", "{refused}");
    assert_eq!(refused["refused"], 100, "{refused}");
    assert_eq!(refused["accepted"], 0, "{refused}");
    let mut producer = server.producer().await;
    producer.send_text(&ticks("DISK", "d", 10)).await;
    let ack = producer.recv().await;
    assert_eq!(
        (&ack["type"], &ack["accepted"]),
        (&json!("ingest_ack"), &json!(0)),
        "{ack}"
    );
    let bp = producer.recv().await;
    assert_eq!(
        (&bp["code"], &bp["refused"]),
        (&json!("backpressure"), &json!(10)),
        "{bp}"
    );

    // The accepted batch is still unacknowledged: it is not stored.
    assert!(
        !pending.is_finished(),
        "a batch was acked while the disk was full"
    );

    // Space comes back: the accepted batch is stored and acked, health recovers, new ticks
    // are taken again.
    std::fs::remove_file(&filler).unwrap();
    let (status, ack) = tokio::time::timeout(DEADLINE * 2, pending)
        .await
        .expect("the accepted batch was never acked after space returned")
        .unwrap();
    assert_eq!((status, &ack["accepted"]), (200, &json!(5_000)), "{ack}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while health(&server).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/health never recovered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.metric("tickfan_store_failing").await, 0.0);
    // redb refuses every write after a failed commit until the file is reopened.
    assert!(server.metric("tickfan_store_reopens_total").await >= 1.0);
    let (status, _, ack) = post(&server, ticks("DISK", "e", 100)).await;
    assert_eq!((status, &ack["accepted"]), (200, &json!(100)), "{ack}");

    // Every acked tick is in the store, each once: 500 + 5,000 + 100.
    let (_, history) = server.get_json("/api/history/DISK?limit=10000").await;
    let stored = history["ticks"].as_array().unwrap();
    let mut ids: Vec<&str> = stored.iter().map(|t| t["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((stored.len(), ids.len()), (5_600, 5_600));
    assert!(ids
        .iter()
        .all(|id| !id.starts_with('c') && !id.starts_with('d')));

    // Nothing crashed: the server shuts down cleanly.
    server.shutdown().await;
}

/// A store closed while its disk is still full stops its writer thread and answers (an
/// error: the last commit failed) instead of hanging. The writer takes the close during its
/// retries; it once went on waiting for commands, and `close()` (or the last handle's drop,
/// at process exit) waited for it forever.
#[test]
fn a_store_closed_while_the_disk_is_full_stops_its_writer() {
    use tickfan::config::StoreConfig;
    use tickfan::store::{Store, StoredTick};
    use tickfan::tick::{Symbol, Tick};

    let dir = tempfile::tempdir().unwrap();
    let _mounted = Tmpfs::mount(dir.path(), FS_BYTES);
    let cfg = StoreConfig {
        dir: dir.path().to_owned(),
        retention_interval_ms: 0,
        ..StoreConfig::default()
    };
    let (store, _) = Store::open(&cfg).unwrap();
    let _filler = fill(dir.path());
    let symbol = Symbol::parse("FULL").unwrap();
    // More than `log_max_group_ticks`: a redb commit, which cannot fit.
    let batch = (1..=3_000)
        .map(|seq| {
            let mut t = Tick::new(symbol.clone(), 1_700_000_000_000, 10.0, 1.0);
            t.seq = seq;
            StoredTick::new(t, None)
        })
        .collect();
    store.append_blocking(batch).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !store.is_failing() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store never failed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // On a thread of its own: a hung close must fail this test, not hang it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(store.close());
    });
    let closed = rx
        .recv_timeout(DEADLINE)
        .expect("close() did not return: the store's writer thread did not stop");
    assert!(closed.is_err(), "the last commit cannot have succeeded");
}
