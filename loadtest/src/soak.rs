//! The soak's time series and verdict. While a long run goes on, [`Sampler`] reads the
//! server's RSS (`/proc/PID/status`), open fds (`/proc/PID/fd`) and CPU (`/proc/PID/stat`)
//! every few seconds, next to the client's own counts (connections, churn, gaps), prints
//! each sample to stderr and appends it to a CSV file as it goes, so a cut-short run keeps
//! what it measured. At the end [`verdict`] turns the samples and the run's totals into
//! pass/fail answers: RSS flat after the warm-up, no fd leak, no gap, no duplicate, no
//! server error, the target rates reached. Data flows one way: `run` feeds samples in,
//! `main` hands the totals over and prints the [`SoakVerdict`].

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::{fmt_bytes, fmt_count};
use crate::stats::{self, CONNS};
use crate::sysinfo;

/// How to sample and judge, from the command line.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Time between samples.
    pub every: Duration,
    /// Where to append the samples as CSV, if anywhere.
    pub csv: Option<PathBuf>,
    /// Samples before this (from the window start) are not judged for RSS flatness: the
    /// server's caches and rings fill up first.
    pub warmup: Duration,
    /// Largest allowed deviation of an RSS sample from the post-warm-up mean, in %.
    pub rss_tolerance_pct: f64,
    /// Largest allowed change of (server fds - open connections) between the start and
    /// the end of the window.
    pub fd_tolerance: i64,
}

/// One reading, `t_secs` from the start of the window.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    pub t_secs: f64,
    /// `run`, `drain` or `end`.
    pub phase: &'static str,
    pub rss_bytes: u64,
    pub fds: u64,
    /// Server CPU since the previous sample, in % of one core.
    pub cpu_pct: f64,
    /// One-minute load average of the machine.
    pub load1: f64,
    /// This client's open connections.
    pub open: i64,
    /// Live deliveries per second since the previous sample.
    pub deliveries_per_sec: f64,
    pub gaps: u64,
    pub duplicates: u64,
    pub churned: u64,
    pub resumed: u64,
}

const CSV_HEADER: &str =
    "t_secs,phase,rss_bytes,fds,cpu_pct,load1,open,deliveries_per_sec,gaps,duplicates,churned,resumed";

impl SoakSample {
    fn csv_line(&self) -> String {
        format!(
            "{:.1},{},{},{},{:.1},{:.2},{},{:.0},{},{},{},{}",
            self.t_secs,
            self.phase,
            self.rss_bytes,
            self.fds,
            self.cpu_pct,
            self.load1,
            self.open,
            self.deliveries_per_sec,
            self.gaps,
            self.duplicates,
            self.churned,
            self.resumed
        )
    }

    fn live_line(&self) -> String {
        format!(
            "[{:6.1}s sample] server RSS {} fds {} cpu {:.0}% | load {:.2} | open {} churned {} resumed {} | {}/s deliv | gaps {} dup {}",
            self.t_secs,
            fmt_bytes(self.rss_bytes as f64),
            fmt_count(self.fds),
            self.cpu_pct,
            self.load1,
            fmt_count(self.open.max(0) as u64),
            fmt_count(self.churned),
            fmt_count(self.resumed),
            fmt_count(self.deliveries_per_sec as u64),
            fmt_count(self.gaps),
            fmt_count(self.duplicates)
        )
    }
}

/// Takes the samples of one run.
pub struct Sampler {
    pid: u32,
    every: Duration,
    start: Instant,
    next: Instant,
    last: Option<(Instant, u64, u64)>,
    csv: Option<BufWriter<File>>,
    pub samples: Vec<SoakSample>,
}

impl Sampler {
    /// Starts the clock (the window start) and creates the CSV file with its header.
    ///
    /// # Errors
    /// Fails when the CSV file cannot be created.
    pub fn new(pid: u32, cfg: &SoakConfig) -> io::Result<Self> {
        let csv = match &cfg.csv {
            Some(path) => {
                let mut w = BufWriter::new(File::create(path)?);
                writeln!(w, "{CSV_HEADER}")?;
                w.flush()?;
                Some(w)
            }
            None => None,
        };
        let now = Instant::now();
        Ok(Self {
            pid,
            every: cfg.every.max(Duration::from_millis(100)),
            start: now,
            next: now,
            last: None,
            csv,
            samples: Vec::new(),
        })
    }

    /// Whether the next periodic sample is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Takes a sample now (whether due or not), prints it, and appends it to the CSV.
    /// Returns `None` when the server's `/proc` entry cannot be read (it exited).
    pub fn sample(&mut self, phase: &'static str, print: bool) -> Option<&SoakSample> {
        let now = Instant::now();
        self.next = now + self.every;
        let proc = sysinfo::sample(Some(self.pid)).ok()?;
        let fds = sysinfo::fd_count(self.pid).ok()?;
        let counters = stats::counters_now();
        let (cpu_pct, deliveries_per_sec) = match self.last {
            Some((at, cpu, deliv)) => {
                let dt = now.duration_since(at).as_secs_f64().max(1e-9);
                (
                    100.0 * proc.cpu_ns.saturating_sub(cpu) as f64 / (dt * 1e9),
                    counters.deliveries.saturating_sub(deliv) as f64 / dt,
                )
            }
            None => (0.0, 0.0),
        };
        self.last = Some((now, proc.cpu_ns, counters.deliveries));
        let s = SoakSample {
            t_secs: now.duration_since(self.start).as_secs_f64(),
            phase,
            rss_bytes: proc.rss_bytes.unwrap_or(0),
            fds,
            cpu_pct,
            load1: sysinfo::load_average().unwrap_or(f64::NAN),
            open: CONNS.open.load(Relaxed),
            deliveries_per_sec,
            gaps: counters.gaps,
            duplicates: counters.duplicates,
            churned: CONNS.churned.load(Relaxed),
            resumed: CONNS.resumed.load(Relaxed),
        };
        if print {
            eprintln!("{}", s.live_line());
        }
        if let Some(w) = &mut self.csv {
            // Flushed each time: a run that is killed keeps its series.
            if writeln!(w, "{}", s.csv_line())
                .and_then(|()| w.flush())
                .is_err()
            {
                eprintln!("soak: writing the CSV failed; sampling goes on without it");
                self.csv = None;
            }
        }
        self.samples.push(s);
        self.samples.last()
    }
}

/// What the verdict needs besides the samples: the run's totals.
#[derive(Debug, Clone, Default)]
pub struct VerdictInputs {
    pub window_secs: f64,
    /// Server fds before the ramp (no client connected).
    pub fds_before_connect: Option<u64>,
    /// (fds, open connections) at the window start and at the end, churn over.
    pub fd_start: Option<(u64, i64)>,
    pub fd_end: Option<(u64, i64)>,
    pub lossless: bool,
    pub churn_per_sec: f64,
    pub target_rate: f64,
    /// Ticks the producer got accepted per second of its window.
    pub producer_rate: Option<f64>,
    pub producer_refused: u64,
    pub producer_failure: Option<String>,
    pub gaps: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gap_snapshots: u64,
    pub unexpected_symbol: u64,
    /// Closes by the server (or the network) before the end, and `error` messages.
    pub lost: u64,
    pub closes: String,
    pub errors: String,
    pub connect_failures: u64,
    pub reconnect_failures: u64,
    /// Ticks seen (live + replayed) and the exact expectation, when it is exact.
    pub seen: u64,
    pub expected: Option<u64>,
    /// Symbols where some lossless client ended on a lower seq than another.
    pub symbols_behind: u64,
    /// Symbols whose highest final seq is below the producer's accepted count (when the
    /// producer's account is exact).
    pub symbols_short: Option<u64>,
}

/// The answers of a soak run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakVerdict {
    pub pass: bool,
    pub failures: Vec<String>,
    pub samples: usize,
    pub warmup_secs: f64,
    /// RSS over the samples of the window taken after the warm-up.
    pub rss_judged_samples: usize,
    pub rss_mean: f64,
    pub rss_min: u64,
    pub rss_max: u64,
    pub rss_first: u64,
    pub rss_last: u64,
    /// Largest |sample - mean| / mean, in %.
    pub rss_max_deviation_pct: f64,
    pub rss_tolerance_pct: f64,
    /// Least-squares slope of RSS over time after the warm-up, in bytes per minute.
    pub rss_slope_per_min: f64,
    /// RSS of the whole window (warm-up included).
    pub rss_window_min: u64,
    pub rss_window_max: u64,
    pub fds_before_connect: Option<u64>,
    pub fds_start: Option<u64>,
    pub open_start: Option<i64>,
    pub fds_end: Option<u64>,
    pub open_end: Option<i64>,
    /// (fds_end - open_end) - (fds_start - open_start).
    pub fd_drift: Option<i64>,
    pub fd_tolerance: i64,
    pub cpu_mean_pct: f64,
    pub cpu_max_pct: f64,
    pub load1_min: f64,
    pub load1_max: f64,
    pub churn_requested: u64,
    pub churned: u64,
    pub churn_per_sec: f64,
    pub resumed: u64,
    pub reconnect_failures: u64,
    pub gaps: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gap_snapshots: u64,
    pub lost: u64,
    pub seen: u64,
    pub expected: Option<u64>,
    pub symbols_behind: u64,
    pub symbols_short: Option<u64>,
    pub producer_rate: Option<f64>,
}

/// Judges a run. Share of the target rates that must be reached (producer, churn).
const RATE_FLOOR: f64 = 0.95;

pub fn verdict(samples: &[SoakSample], cfg: &SoakConfig, i: &VerdictInputs) -> SoakVerdict {
    let warmup = cfg.warmup.as_secs_f64();
    let window: Vec<&SoakSample> = samples.iter().filter(|s| s.phase == "run").collect();
    let judged: Vec<&SoakSample> = window
        .iter()
        .copied()
        .filter(|s| s.t_secs >= warmup)
        .collect();
    let mut v = SoakVerdict {
        samples: samples.len(),
        warmup_secs: warmup,
        rss_judged_samples: judged.len(),
        rss_tolerance_pct: cfg.rss_tolerance_pct,
        fd_tolerance: cfg.fd_tolerance,
        fds_before_connect: i.fds_before_connect,
        fds_start: i.fd_start.map(|f| f.0),
        open_start: i.fd_start.map(|f| f.1),
        fds_end: i.fd_end.map(|f| f.0),
        open_end: i.fd_end.map(|f| f.1),
        churn_requested: CONNS.churn_requested.load(Relaxed),
        churned: CONNS.churned.load(Relaxed),
        resumed: CONNS.resumed.load(Relaxed),
        reconnect_failures: i.reconnect_failures,
        gaps: i.gaps,
        missing: i.missing,
        duplicates: i.duplicates,
        gap_snapshots: i.gap_snapshots,
        lost: i.lost,
        seen: i.seen,
        expected: i.expected,
        symbols_behind: i.symbols_behind,
        symbols_short: i.symbols_short,
        producer_rate: i.producer_rate,
        ..SoakVerdict::default()
    };
    let mut fail = Vec::new();
    if let Some(s) = rss_stats(&judged) {
        v.rss_mean = s.mean;
        v.rss_min = s.min;
        v.rss_max = s.max;
        v.rss_first = s.first;
        v.rss_last = s.last;
        v.rss_max_deviation_pct = s.max_dev_pct;
        v.rss_slope_per_min = s.slope_per_sec * 60.0;
        if s.max_dev_pct > cfg.rss_tolerance_pct {
            fail.push(format!(
                "RSS not flat: {:.1}% from the post-warm-up mean (tolerance {:.1}%)",
                s.max_dev_pct, cfg.rss_tolerance_pct
            ));
        }
    }
    if judged.len() < 3 {
        fail.push(format!(
            "only {} samples after the {warmup:.0} s warm-up: run longer or sample more often",
            judged.len()
        ));
    }
    v.rss_window_min = window.iter().map(|s| s.rss_bytes).min().unwrap_or(0);
    v.rss_window_max = window.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
    let cpus: Vec<f64> = window.iter().skip(1).map(|s| s.cpu_pct).collect();
    if !cpus.is_empty() {
        v.cpu_mean_pct = cpus.iter().sum::<f64>() / cpus.len() as f64;
        v.cpu_max_pct = cpus.iter().copied().fold(0.0, f64::max);
    }
    let loads: Vec<f64> = samples
        .iter()
        .map(|s| s.load1)
        .filter(|l| l.is_finite())
        .collect();
    v.load1_min = loads.iter().copied().fold(f64::INFINITY, f64::min);
    v.load1_max = loads.iter().copied().fold(0.0, f64::max);
    if !v.load1_min.is_finite() {
        v.load1_min = 0.0;
    }
    match (i.fd_start, i.fd_end) {
        (Some((f0, o0)), Some((f1, o1))) => {
            let drift = (f1 as i64 - o1) - (f0 as i64 - o0);
            v.fd_drift = Some(drift);
            if drift.abs() > cfg.fd_tolerance {
                fail.push(format!(
                    "fd leak: server fds less open connections went from {} to {} (tolerance {})",
                    f0 as i64 - o0,
                    f1 as i64 - o1,
                    cfg.fd_tolerance
                ));
            }
        }
        _ => fail.push("server fds could not be read at the start and the end".to_string()),
    }
    v.churn_per_sec = v.churned as f64 / i.window_secs.max(1e-9);
    if i.churn_per_sec > 0.0 && v.churn_per_sec < RATE_FLOOR * i.churn_per_sec {
        fail.push(format!(
            "churn {:.0}/s, below {:.0}% of the {:.0}/s asked for",
            v.churn_per_sec,
            RATE_FLOOR * 100.0,
            i.churn_per_sec
        ));
    }
    match (i.producer_rate, &i.producer_failure) {
        (_, Some(f)) => fail.push(format!("producer failed: {f}")),
        (Some(r), None) if r < RATE_FLOOR * i.target_rate => fail.push(format!(
            "producer {r:.0} ticks/s accepted, below {:.0}% of the {:.0}/s target",
            RATE_FLOOR * 100.0,
            i.target_rate
        )),
        _ => {}
    }
    if i.producer_refused > 0 {
        fail.push(format!(
            "{} ticks refused for backpressure",
            i.producer_refused
        ));
    }
    if i.gaps > 0 {
        fail.push(format!("{} gaps ({} ticks missing)", i.gaps, i.missing));
    }
    if i.duplicates > 0 {
        fail.push(format!("{} duplicates", i.duplicates));
    }
    if i.gap_snapshots > 0 {
        fail.push(format!("{} snapshots with gap:true", i.gap_snapshots));
    }
    if i.unexpected_symbol > 0 {
        fail.push(format!(
            "{} ticks of unsubscribed symbols",
            i.unexpected_symbol
        ));
    }
    if i.lost > 0 || !i.closes.is_empty() {
        fail.push(format!(
            "closes before the end: {} ({} connections lost)",
            i.closes, i.lost
        ));
    }
    if !i.errors.is_empty() {
        fail.push(format!("error messages: {}", i.errors));
    }
    if i.connect_failures > 0 || i.reconnect_failures > 0 {
        fail.push(format!(
            "{} failed connects, {} failed reconnects",
            i.connect_failures, i.reconnect_failures
        ));
    }
    if i.lossless {
        if i.symbols_behind > 0 {
            fail.push(format!(
                "{} symbols where a client ended behind another",
                i.symbols_behind
            ));
        }
        if let Some(n) = i.symbols_short.filter(|&n| n > 0) {
            fail.push(format!(
                "{n} symbols where no client reached the producer's last tick"
            ));
        }
        if let Some(exp) = i.expected.filter(|&e| e != i.seen) {
            fail.push(format!(
                "{} ticks seen (live + replayed), {exp} expected",
                i.seen
            ));
        }
    }
    v.pass = fail.is_empty();
    v.failures = fail;
    v
}

struct RssStats {
    mean: f64,
    min: u64,
    max: u64,
    first: u64,
    last: u64,
    max_dev_pct: f64,
    slope_per_sec: f64,
}

fn rss_stats(samples: &[&SoakSample]) -> Option<RssStats> {
    let n = samples.len();
    if n == 0 {
        return None;
    }
    let mean = samples.iter().map(|s| s.rss_bytes as f64).sum::<f64>() / n as f64;
    let max_dev = samples
        .iter()
        .map(|s| (s.rss_bytes as f64 - mean).abs())
        .fold(0.0, f64::max);
    let t_mean = samples.iter().map(|s| s.t_secs).sum::<f64>() / n as f64;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.t_secs - t_mean) * (s.rss_bytes as f64 - mean);
        den += (s.t_secs - t_mean).powi(2);
    }
    Some(RssStats {
        mean,
        min: samples.iter().map(|s| s.rss_bytes).min().unwrap_or(0),
        max: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        first: samples[0].rss_bytes,
        last: samples[n - 1].rss_bytes,
        max_dev_pct: if mean > 0.0 {
            100.0 * max_dev / mean
        } else {
            0.0
        },
        slope_per_sec: if den > 0.0 { num / den } else { 0.0 },
    })
}

impl SoakVerdict {
    /// The verdict as text, after the summary.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let opt = |v: Option<u64>| v.map_or("?".to_string(), fmt_count);
        let _ = writeln!(
            o,
            "soak rss     after the {:.0} s warm-up ({} samples): mean {}, min {}, max {}, first {}, last {}; max deviation {:.2}% (tolerance {:.1}%), slope {}/min; whole window {} - {}",
            self.warmup_secs,
            self.rss_judged_samples,
            fmt_bytes(self.rss_mean),
            fmt_bytes(self.rss_min as f64),
            fmt_bytes(self.rss_max as f64),
            fmt_bytes(self.rss_first as f64),
            fmt_bytes(self.rss_last as f64),
            self.rss_max_deviation_pct,
            self.rss_tolerance_pct,
            fmt_bytes(self.rss_slope_per_min),
            fmt_bytes(self.rss_window_min as f64),
            fmt_bytes(self.rss_window_max as f64),
        );
        let _ = writeln!(
            o,
            "soak fds     {} before connecting; {} with {} open at the start, {} with {} open at the end: drift {} (tolerance {})",
            opt(self.fds_before_connect),
            opt(self.fds_start),
            self.open_start.map_or("?".into(), |n| fmt_count(n.max(0) as u64)),
            opt(self.fds_end),
            self.open_end.map_or("?".into(), |n| fmt_count(n.max(0) as u64)),
            self.fd_drift.map_or("?".into(), |d| d.to_string()),
            self.fd_tolerance
        );
        let _ = writeln!(
            o,
            "soak churn   {} asked, {} disconnects ({:.1}/s), {} resumes acknowledged, {} failed reconnects",
            fmt_count(self.churn_requested),
            fmt_count(self.churned),
            self.churn_per_sec,
            fmt_count(self.resumed),
            fmt_count(self.reconnect_failures)
        );
        let _ = writeln!(
            o,
            "soak ticks   {} gaps ({} missing), {} duplicates, {} gap:true snapshots, {} lost connections; {} seen (live + replayed) of {} expected; {} symbols with a client behind, {} short of the producer",
            fmt_count(self.gaps),
            fmt_count(self.missing),
            fmt_count(self.duplicates),
            fmt_count(self.gap_snapshots),
            fmt_count(self.lost),
            fmt_count(self.seen),
            opt(self.expected),
            fmt_count(self.symbols_behind),
            opt(self.symbols_short)
        );
        let _ = writeln!(
            o,
            "soak machine server CPU mean {:.0}% max {:.0}% of a core; load average {:.2} - {:.2}",
            self.cpu_mean_pct, self.cpu_max_pct, self.load1_min, self.load1_max
        );
        if self.pass {
            let _ = writeln!(o, "soak verdict PASS");
        } else {
            let _ = writeln!(o, "soak verdict FAIL: {}", self.failures.join("; "));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, rss: u64, fds: u64) -> SoakSample {
        SoakSample {
            t_secs: t,
            phase: "run",
            rss_bytes: rss,
            fds,
            cpu_pct: 50.0,
            load1: 1.0,
            open: 100,
            deliveries_per_sec: 0.0,
            gaps: 0,
            duplicates: 0,
            churned: 0,
            resumed: 0,
        }
    }

    fn cfg() -> SoakConfig {
        SoakConfig {
            every: Duration::from_secs(5),
            csv: None,
            warmup: Duration::from_secs(10),
            rss_tolerance_pct: 5.0,
            fd_tolerance: 4,
        }
    }

    fn clean_inputs() -> VerdictInputs {
        VerdictInputs {
            window_secs: 60.0,
            fd_start: Some((110, 100)),
            fd_end: Some((112, 100)),
            target_rate: 1000.0,
            producer_rate: Some(1000.0),
            ..VerdictInputs::default()
        }
    }

    #[test]
    fn flat_rss_after_warmup_passes_and_growth_fails() {
        // Growth during the warm-up is not judged.
        let flat: Vec<SoakSample> = [
            (0.0, 50),
            (5.0, 80),
            (10.0, 100),
            (15.0, 102),
            (20.0, 98),
            (25.0, 100),
        ]
        .iter()
        .map(|&(t, mib)| sample(t, mib << 20, 110))
        .collect();
        let v = verdict(&flat, &cfg(), &clean_inputs());
        assert!(v.pass, "{:?}", v.failures);
        assert_eq!(v.rss_judged_samples, 4);
        assert!(
            (v.rss_max_deviation_pct - 2.0).abs() < 1e-9,
            "{}",
            v.rss_max_deviation_pct
        );

        let growing: Vec<SoakSample> = (0..10)
            .map(|i| sample(10.0 + i as f64 * 5.0, (100 + i * 3) << 20, 110))
            .collect();
        let v = verdict(&growing, &cfg(), &clean_inputs());
        assert!(!v.pass);
        assert!(
            v.failures[0].starts_with("RSS not flat"),
            "{:?}",
            v.failures
        );
        // 3 MiB per 5 s = 36 MiB per minute.
        assert!((v.rss_slope_per_min - 36.0 * 1048576.0).abs() < 1.0);
    }

    #[test]
    fn fd_drift_counts_fds_beyond_connections() {
        let s: Vec<SoakSample> = (0..5).map(|i| sample(10.0 + i as f64, 100, 110)).collect();
        // 10 more fds with 10 more connections: no drift.
        let mut i = clean_inputs();
        i.fd_end = Some((120, 110));
        let v = verdict(&s, &cfg(), &i);
        assert_eq!(v.fd_drift, Some(0));
        assert!(v.pass, "{:?}", v.failures);
        // 10 more fds with the same connections: a leak.
        i.fd_end = Some((120, 100));
        let v = verdict(&s, &cfg(), &i);
        assert_eq!(v.fd_drift, Some(10));
        assert!(
            v.failures.iter().any(|f| f.starts_with("fd leak")),
            "{:?}",
            v.failures
        );
    }

    #[test]
    fn lossless_failures_are_reported() {
        let s: Vec<SoakSample> = (0..5).map(|i| sample(10.0 + i as f64, 100, 110)).collect();
        let mut i = clean_inputs();
        i.lossless = true;
        i.gaps = 1;
        i.missing = 3;
        i.duplicates = 2;
        i.gap_snapshots = 1;
        i.lost = 1;
        i.closes = "4008: 1".into();
        i.errors = "slow_consumer: 1".into();
        i.seen = 10;
        i.expected = Some(13);
        let v = verdict(&s, &cfg(), &i);
        assert!(!v.pass);
        for want in [
            "1 gaps (3",
            "2 duplicates",
            "gap:true",
            "4008",
            "slow_consumer",
            "13 expected",
        ] {
            assert!(
                v.failures.iter().any(|f| f.contains(want)),
                "{want}: {:?}",
                v.failures
            );
        }
    }

    #[test]
    fn too_few_samples_and_slow_rates_fail() {
        let s = vec![sample(11.0, 100, 110)];
        let mut i = clean_inputs();
        i.churn_per_sec = 200.0;
        i.producer_rate = Some(500.0);
        let v = verdict(&s, &cfg(), &i);
        for want in ["only 1 samples", "churn 0/s", "producer 500 ticks/s"] {
            assert!(
                v.failures.iter().any(|f| f.contains(want)),
                "{want}: {:?}",
                v.failures
            );
        }
    }

    #[test]
    fn csv_line_matches_header() {
        let line = sample(1.0, 2, 3).csv_line();
        assert_eq!(line.split(',').count(), CSV_HEADER.split(',').count());
        assert!(line.starts_with("1.0,run,2,3,"), "{line}");
    }
}
