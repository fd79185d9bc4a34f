//! The built-in market simulator: ~20 stock, crypto and FX symbols moving on a geometric random
//! walk, with a bid/ask around the price and occasional critical ticks. It writes JSON frames
//! and feeds them through the same ingest path as any producer, so what users see from the
//! simulator is exactly what their own feeds will get.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::FeedConfig;
use crate::ingest::Ingestor;
use crate::tick::now_ms;

/// (symbol, start price, yearly volatility, price decimals, spread in basis points)
const INSTRUMENTS: [(&str, f64, f64, i32, f64); 20] = [
    ("AAPL", 190.0, 0.25, 2, 1.0),
    ("MSFT", 410.0, 0.25, 2, 1.0),
    ("GOOG", 170.0, 0.3, 2, 1.0),
    ("AMZN", 180.0, 0.3, 2, 1.0),
    ("NVDA", 120.0, 0.5, 2, 1.5),
    ("TSLA", 240.0, 0.6, 2, 2.0),
    ("META", 500.0, 0.35, 2, 1.0),
    ("JPM", 200.0, 0.2, 2, 1.0),
    ("XOM", 115.0, 0.25, 2, 1.0),
    ("SPY", 550.0, 0.15, 2, 0.5),
    ("QQQ", 470.0, 0.2, 2, 0.5),
    ("BTC-USD", 65_000.0, 0.6, 2, 2.0),
    ("ETH-USD", 3_400.0, 0.7, 2, 3.0),
    ("SOL-USD", 150.0, 0.9, 3, 5.0),
    ("XRP-USD", 0.6, 0.8, 5, 5.0),
    ("DOGE-USD", 0.12, 1.0, 5, 8.0),
    ("EUR/USD", 1.08, 0.08, 5, 0.5),
    ("GBP/USD", 1.27, 0.08, 5, 0.7),
    ("USD/JPY", 150.0, 0.1, 3, 0.7),
    ("XAU/USD", 2_300.0, 0.15, 2, 2.0),
];

/// Frames per second the simulator sends; each carries rate/FRAMES_PER_SEC ticks.
const FRAMES_PER_SEC: u32 = 100;

/// Runs the simulator until `shutdown`.
pub async fn run(config: FeedConfig, ingestor: Arc<Ingestor>, shutdown: CancellationToken) {
    let mut rng = SmallRng::from_entropy();
    let mut prices: Vec<f64> = INSTRUMENTS.iter().map(|i| i.1).collect();
    let period = Duration::from_secs(1) / FRAMES_PER_SEC;
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let per_frame = f64::from(config.simulator_rate) / f64::from(FRAMES_PER_SEC);
    let mut owed = 0.0;
    // Each tick advances its symbol by one second of a trading year: an accelerated market,
    // so the dashboard moves visibly at the default rate.
    let dt: f64 = 1.0 / (252.0 * 6.5 * 3600.0);
    let mut frame = String::with_capacity(256 * 64);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = timer.tick() => {}
        }
        owed += per_frame;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let count = owed as usize;
        if count == 0 {
            continue;
        }
        owed -= count as f64;
        frame.clear();
        frame.push('[');
        let ts = now_ms();
        for n in 0..count {
            let i = rng.gen_range(0..INSTRUMENTS.len());
            let (symbol, _, vol, decimals, spread_bp) = INSTRUMENTS[i];
            prices[i] *= (vol * dt.sqrt() * standard_normal(&mut rng) - 0.5 * vol * vol * dt).exp();
            let scale = 10f64.powi(decimals);
            let round = |v: f64| (v * scale).round() / scale;
            let price = round(prices[i]).max(1.0 / scale);
            let half_spread = (price * spread_bp / 20_000.0).max(1.0 / scale);
            let bid = round(price - half_spread).max(1.0 / scale);
            let ask = round(price + half_spread).max(bid);
            let volume = if symbol.contains('-') {
                (rng.gen_range(0.001..5.0f64) * 1000.0).round() / 1000.0
            } else {
                f64::from(rng.gen_range(1..500u32))
            };
            let critical = rng.gen_range(0..1000) < config.simulator_critical_permille;
            if n > 0 {
                frame.push(',');
            }
            let _ = write!(
                frame,
                r#"{{"symbol":"{symbol}","ts":{ts},"price":{price},"volume":{volume},"bid":{bid},"ask":{ask}{}}}"#,
                if critical {
                    r#","priority":"critical""#
                } else {
                    ""
                }
            );
        }
        frame.push(']');
        // The simulator does not wait for acks; refusals are counted by ingest like any other.
        drop(ingestor.ingest_frame(frame.as_bytes()));
    }
}

/// Box-Muller: one standard normal sample (no extra crate for one distribution).
fn standard_normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
