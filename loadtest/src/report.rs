//! Turning the numbers into answers: percentile lines (the percentiles themselves are
//! `stats::Latency`, which the producer's report uses too), the one-line live
//! report (stderr, once a second), and the final [`Summary`], printed as text (stdout) and
//! written as JSON for scripts. Nothing here touches the network or `/proc`; it only
//! formats what the run collected, so it can be tested on made-up numbers.

use std::fmt::Write as _;

use serde::Serialize;

use crate::producer::ProducerReport;
use crate::stats::{Counters, Tallies};

pub use crate::stats::Latency;

impl Latency {
    /// `p50 120µs p90 250µs p99 1.20ms p99.9 3.40ms max 12.0ms (n=12,345)`.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".to_string();
        }
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            fmt_us(self.p50),
            fmt_us(self.p90),
            fmt_us(self.p99),
            fmt_us(self.p999),
            fmt_us(self.max),
            fmt_count(self.count)
        )
    }
}

/// A duration in µs with a unit that keeps 3 significant digits.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// An integer with thousands separators: `1,234,567`.
pub fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary units: `512 B`, `4.0 KiB`, `12.3 MiB`.
pub fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn fmt_tally(map: &std::collections::BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_string();
    }
    map.iter()
        .map(|(k, v)| format!("{k}: {}", fmt_count(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything the live line shows for one interval.
#[derive(Debug, Clone, Default)]
pub struct LiveSnapshot {
    /// `ramp`, `run`, `drain`, `idle`.
    pub phase: &'static str,
    pub elapsed_secs: f64,
    /// Length of this interval.
    pub dt_secs: f64,
    pub open: i64,
    pub subscribed: u64,
    pub failed: u64,
    pub lost: u64,
    /// Counter increase over this interval.
    pub delta: Counters,
    /// Totals so far.
    pub total: Counters,
    pub latency: Latency,
    /// Producer ticks sent / accepted / refused over this interval, when it runs.
    pub producer: Option<(u64, u64, u64)>,
    /// Server CPU use over this interval, in % of one core, and its RSS.
    pub server_cpu_pct: Option<f64>,
    pub server_rss: Option<u64>,
}

/// The once-a-second stderr line.
pub fn live_line(s: &LiveSnapshot) -> String {
    let per_sec = |n: u64| n as f64 / s.dt_secs.max(1e-9);
    let mut line = format!(
        "[{:6.1}s {:5}] up {} sub {} failed {} lost {} | {}/s deliv {}/s",
        s.elapsed_secs,
        s.phase,
        fmt_count(s.open.max(0) as u64),
        fmt_count(s.subscribed),
        fmt_count(s.failed),
        fmt_count(s.lost),
        fmt_count(per_sec(s.delta.deliveries) as u64),
        fmt_bytes(per_sec(s.delta.bytes)),
    );
    let _ = write!(
        line,
        " | gaps {} dup {}",
        fmt_count(s.total.gaps),
        fmt_count(s.total.duplicates)
    );
    if s.total.conflated > 0 {
        let _ = write!(line, " confl {}", fmt_count(s.total.conflated));
    }
    if s.latency.count > 0 {
        let _ = write!(
            line,
            " | p50 {} p99 {} max {}",
            fmt_us(s.latency.p50),
            fmt_us(s.latency.p99),
            fmt_us(s.latency.max)
        );
    }
    if let Some((sent, accepted, refused)) = s.producer {
        let _ = write!(
            line,
            " | prod {}/s acc {}/s",
            fmt_count(per_sec(sent) as u64),
            fmt_count(per_sec(accepted) as u64)
        );
        if refused > 0 {
            let _ = write!(line, " refused {}", fmt_count(refused));
        }
    }
    if let Some(pct) = s.server_cpu_pct {
        let _ = write!(line, " | srv {pct:.0}% cpu");
    }
    if let Some(rss) = s.server_rss {
        let _ = write!(line, " {}", fmt_bytes(rss as f64));
    }
    line
}

/// The test as configured, echoed into the summary so a JSON file stands on its own.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigEcho {
    pub url: String,
    pub connections: usize,
    pub symbols: usize,
    pub symbols_per_client: usize,
    pub mode: String,
    pub interval_ms: u64,
    pub min_quality: u32,
    pub min_volume: f64,
    pub rate: f64,
    pub duration_secs: f64,
    pub drain_ms: u64,
    pub idle: bool,
    pub threads: usize,
    pub conns_per_ip: usize,
}

/// Connection outcomes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnSummary {
    pub attempted: u64,
    pub connected: u64,
    pub subscribed: u64,
    pub failed: u64,
    /// Ended by the server (or the network) before the test ended.
    pub lost: u64,
    /// Still open when the test ended.
    pub open_at_end: i64,
    /// Seconds from the first connect to every connection settled.
    pub ramp_secs: f64,
    /// Connection attempts the kernel dropped on a full accept queue during the ramp.
    pub listen_overflows: u64,
}

/// CPU and memory of one process over the measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcSummary {
    pub pid: Option<u32>,
    pub cpu_secs: f64,
    /// CPU use over the measurement, in % of one core.
    pub cpu_percent: f64,
    /// CPU nanoseconds per delivered tick (None without deliveries).
    pub cpu_ns_per_delivery: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// RSS divided by open connections (server only).
    pub rss_per_connection: Option<f64>,
}

/// `--idle`: server memory before and after the connections came up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleMemory {
    pub rss_before: u64,
    /// RSS just after every connection subscribed (before a server could park them).
    pub rss_connected: u64,
    /// RSS at the end of the idle window: what holding idle connections costs.
    pub rss_after: u64,
    pub connections: u64,
    /// Per connection, at the end of the idle window.
    pub delta_per_connection: f64,
    /// Per connection, just after connecting.
    pub connected_delta_per_connection: f64,
}

/// The final, machine-readable result (`--json`), also printed as text.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: ConfigEcho,
    pub connections: ConnSummary,
    /// The producer window (the denominator of every rate below).
    pub window_secs: f64,
    /// Extra time clients kept counting after the producer stopped.
    pub drain_secs: f64,
    pub counters: Counters,
    pub deliveries_per_sec: f64,
    pub messages_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Ticks the clients should have got (realtime/batch with no filters, producer on):
    /// ticks sent per symbol times that symbol's subscribers still connected at the end.
    pub expected_deliveries: Option<u64>,
    /// Whether every tick sent was accepted and no connection was lost, so
    /// `expected_deliveries` is exact.
    pub expected_exact: bool,
    pub latency_us: Latency,
    pub tallies: Tallies,
    pub producer: Option<ProducerReport>,
    pub server: Option<ProcSummary>,
    pub client: ProcSummary,
    pub idle_memory: Option<IdleMemory>,
}

/// Σ over symbols of ticks sent × subscribers.
pub fn expected_deliveries(sent_per_symbol: &[u64], subscribers: &[i64]) -> u64 {
    sent_per_symbol
        .iter()
        .zip(subscribers)
        .map(|(&sent, &subs)| sent * subs.max(0) as u64)
        .sum()
}

impl Summary {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let c = &self.config;
        let k = &self.counters;
        let mut o = String::new();
        let what = if c.idle {
            "idle (no producer)".to_string()
        } else if c.rate > 0.0 {
            format!("{} ticks/s", fmt_count(c.rate as u64))
        } else {
            "no producer".to_string()
        };
        let _ = writeln!(
            o,
            "tickfan-loadtest {}: {} connections x {} of {} symbols, mode {} (interval {} ms), {} for {:.1} s + {:.1} s drain",
            c.url,
            fmt_count(c.connections as u64),
            c.symbols_per_client.min(c.symbols),
            c.symbols,
            c.mode,
            c.interval_ms,
            what,
            self.window_secs,
            self.drain_secs
        );
        let n = &self.connections;
        let _ = writeln!(
            o,
            "connections  {} up, {} subscribed, {} failed, {} lost, {} open at end (ramp {:.2} s)",
            fmt_count(n.connected),
            fmt_count(n.subscribed),
            fmt_count(n.failed),
            fmt_count(n.lost),
            fmt_count(n.open_at_end.max(0) as u64),
            n.ramp_secs
        );
        if n.listen_overflows > 0 {
            let _ = writeln!(
                o,
                "  backlog    {} SYNs dropped on the server's full accept queue (1 s retransmit each)",
                fmt_count(n.listen_overflows)
            );
        }
        if !self.tallies.connect_failures.is_empty() {
            let _ = writeln!(
                o,
                "  failures   {}",
                fmt_tally(&self.tallies.connect_failures)
            );
        }
        let _ = writeln!(
            o,
            "deliveries   {} ({}/s), {} messages ({}/s), {}/s",
            fmt_count(k.deliveries),
            fmt_count(self.deliveries_per_sec as u64),
            fmt_count(k.messages),
            fmt_count(self.messages_per_sec as u64),
            fmt_bytes(self.bytes_per_sec)
        );
        let _ = writeln!(
            o,
            "  by type    {} tick, {} batch, {} snapshot ({} ticks), {} heartbeat, {} other, {} binary, {} unparsable",
            fmt_count(k.tick_msgs),
            fmt_count(k.batch_msgs),
            fmt_count(k.snapshot_msgs),
            fmt_count(k.snapshot_ticks),
            fmt_count(k.heartbeats),
            fmt_count(k.other_msgs),
            fmt_count(k.binary_msgs),
            fmt_count(k.parse_errors)
        );
        if let Some(exp) = self.expected_deliveries {
            let pct = if exp > 0 {
                100.0 * k.deliveries as f64 / exp as f64
            } else {
                100.0
            };
            let _ = writeln!(
                o,
                "expected     {} ({pct:.2}% delivered{})",
                fmt_count(exp),
                if self.expected_exact {
                    ""
                } else {
                    ", approximate: not every tick was accepted, or connections were lost"
                }
            );
        }
        let _ = writeln!(
            o,
            "seq          {} gaps ({} ticks missing), {} duplicates/out-of-order, {} conflated, {} unexpected symbol, {} malformed",
            fmt_count(k.gaps),
            fmt_count(k.missing),
            fmt_count(k.duplicates),
            fmt_count(k.conflated),
            fmt_count(k.unexpected_symbol),
            fmt_count(k.malformed_ticks)
        );
        if c.min_quality > 0 || c.min_volume > 0.0 {
            let _ = writeln!(
                o,
                "  note       filters are on: ticks they hold back show up as gaps"
            );
        }
        let _ = writeln!(o, "latency      {}", self.latency_us.line());
        let _ = writeln!(o, "closes       {}", fmt_tally(&self.tallies.closes));
        let _ = writeln!(o, "errors       {}", fmt_tally(&self.tallies.errors));
        if !self.tallies.rejected_symbols.is_empty() {
            let _ = writeln!(
                o,
                "rejected sub {}",
                fmt_tally(&self.tallies.rejected_symbols)
            );
        }
        if !self.tallies.mode_switches.is_empty() {
            let _ = writeln!(o, "mode msgs    {}", fmt_tally(&self.tallies.mode_switches));
        }
        let _ = writeln!(o, "final close  {}", fmt_tally(&self.tallies.final_close));
        if let Some(p) = &self.producer {
            let rate = p.ticks_sent as f64 / p.elapsed_secs.max(1e-9);
            let _ = writeln!(
                o,
                "producer     {} sent ({}/s in {} frames), {} accepted, {} duplicates, {} rejected, {} backpressure errors ({} refused), {} acks, {} unanswered, {} skipped behind",
                fmt_count(p.ticks_sent),
                fmt_count(rate as u64),
                fmt_count(p.frames_sent),
                fmt_count(p.accepted),
                fmt_count(p.duplicates),
                fmt_count(p.rejected),
                fmt_count(p.backpressure_errors),
                fmt_count(p.refused),
                fmt_count(p.acks),
                fmt_count(p.unanswered_frames),
                fmt_count(p.ticks_skipped_behind)
            );
            if p.ack_latency.count > 0 {
                let _ = writeln!(o, "producer ack {}", p.ack_latency.line());
            }
            if !p.rejected_by_code.is_empty() || !p.errors_by_code.is_empty() {
                let _ = writeln!(
                    o,
                    "  codes      rejected {}; errors {}",
                    fmt_tally(&p.rejected_by_code),
                    fmt_tally(&p.errors_by_code)
                );
            }
            if let Some(f) = &p.failure {
                let _ = writeln!(o, "  FAILURE    {f}");
            }
        }
        if let Some(s) = &self.server {
            let _ = writeln!(o, "server       {}", proc_line(s, true));
        }
        let _ = writeln!(o, "client       {}", proc_line(&self.client, false));
        if let Some(m) = &self.idle_memory {
            let _ = writeln!(
                o,
                "idle memory  server RSS {} before, {} after {} connections idle for the window: \
                 {} per connection (just after connecting: {}, {} per connection)",
                fmt_bytes(m.rss_before as f64),
                fmt_bytes(m.rss_after as f64),
                fmt_count(m.connections),
                fmt_bytes(m.delta_per_connection),
                fmt_bytes(m.rss_connected as f64),
                fmt_bytes(m.connected_delta_per_connection)
            );
        }
        o
    }
}

fn proc_line(p: &ProcSummary, server: bool) -> String {
    let mut s = String::new();
    if let Some(pid) = p.pid {
        let _ = write!(s, "pid {pid}: ");
    }
    let _ = write!(
        s,
        "{:.2} s CPU ({:.0}% of a core)",
        p.cpu_secs, p.cpu_percent
    );
    if let Some(ns) = p.cpu_ns_per_delivery {
        let _ = write!(s, ", {ns:.0} ns CPU per delivery");
    }
    if let Some(rss) = p.rss_bytes {
        let _ = write!(s, "; RSS {}", fmt_bytes(rss as f64));
    }
    if server {
        if let Some(per) = p.rss_per_connection {
            let _ = write!(s, ", {} per connection", fmt_bytes(per));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;

    #[test]
    fn merge_and_percentiles() {
        let mut a = stats::new_histogram();
        let mut b = stats::new_histogram();
        for v in 1..=500u64 {
            a.record(v).unwrap();
        }
        for v in 501..=1000u64 {
            b.record(v).unwrap();
        }
        let m = stats::merged([&a, &b]);
        let l = Latency::of(&m);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50, 500);
        assert_eq!(l.p90, 900);
        assert_eq!(l.p99, 990);
        // 3 significant digits: 999 and 1000 are exact.
        assert_eq!(l.p999, 999);
        assert_eq!(l.max, 1000);
        assert_eq!(
            l.line(),
            "p50 500µs p90 900µs p99 990µs p99.9 999µs max 1.00ms (n=1,000)"
        );
    }

    #[test]
    fn empty_histogram_reports_no_samples() {
        let l = Latency::of(&stats::new_histogram());
        assert_eq!(l.count, 0);
        assert_eq!(l.line(), "no samples");
    }

    #[test]
    fn clamped_outlier_shows_as_max() {
        let mut h = stats::new_histogram();
        h.saturating_record(u64::MAX);
        let l = Latency::of(&h);
        assert!(l.max >= stats::HIST_MAX_US && l.max < stats::HIST_MAX_US + 100_000);
        assert_eq!(fmt_us(60_000_000), "60.00s");
    }

    #[test]
    fn unit_formatting() {
        assert_eq!(fmt_us(0), "0µs");
        assert_eq!(fmt_us(999), "999µs");
        assert_eq!(fmt_us(1_234), "1.23ms");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(1_500_000), "1.50s");
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1_000), "1,000");
        assert_eq!(fmt_count(19_000_001), "19,000,001");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(4096.0), "4.0 KiB");
        assert_eq!(fmt_bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
    }

    #[test]
    fn expected_deliveries_weights_by_subscribers() {
        assert_eq!(expected_deliveries(&[10, 20, 30], &[1, 0, 2]), 70);
        // A negative count (more losses than acks seen) never subtracts.
        assert_eq!(expected_deliveries(&[10], &[-1]), 0);
    }

    #[test]
    fn live_line_shows_rates() {
        let s = LiveSnapshot {
            phase: "run",
            elapsed_secs: 3.0,
            dt_secs: 0.5,
            open: 100,
            subscribed: 100,
            delta: Counters {
                deliveries: 1_000,
                bytes: 1024 * 100,
                ..Counters::default()
            },
            producer: Some((500, 500, 0)),
            server_cpu_pct: Some(42.0),
            ..LiveSnapshot::default()
        };
        let line = live_line(&s);
        assert!(line.contains("2,000/s deliv 200.0 KiB/s"), "{line}");
        assert!(line.contains("prod 1,000/s acc 1,000/s"), "{line}");
        assert!(line.contains("srv 42% cpu"), "{line}");
    }
}
