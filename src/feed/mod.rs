//! Upstream feeds (`[[feed.upstream]]`, docs/feeds.md): tickfan pulls trades from exchange
//! WebSocket feeds (Binance, Coinbase, Kraken) or another tickfan's `/ws`, and sends them
//! into the same ingest path producers use. Data flows
//! `upstream socket -> connector (normalize, failover gate) -> Ingestor::ingest_frame -> queue`.
//!
//! [`FeedSet`] is the small handle the server holds: it starts one [`connector`] task per
//! upstream, stops them, and answers `/health` from each upstream's [`status`] (`/metrics`
//! reads the same statuses, through the metrics defined in `crate::metrics`). A backup (`backup_for = "PRIMARY"`) holds back its ticks for the primary's
//! symbols while the primary is live (connected and heard from within `stale_ms`), and lets
//! them through while it is not; dedup in ingest drops a trade that arrives from both.

pub mod breaker;
pub mod connector;
pub mod normalize;
pub mod status;

use std::collections::BTreeSet;

use ahash::AHashSet as HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::dlq::DeadLetters;
use crate::ingest::Ingestor;

use self::connector::Connector;
use self::status::Status;

/// The running upstream connectors of one server.
pub struct FeedSet {
    upstreams: Vec<Arc<Status>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl FeedSet {
    /// Starts a connector per configured upstream (none: an empty set that does nothing).
    /// They stop when `stop` is cancelled, or at [`FeedSet::stop`].
    #[must_use]
    pub fn start(
        config: &Config,
        ingestor: &Arc<Ingestor>,
        dead_letters: &Arc<DeadLetters>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let config = &config.feed;
        let stop = stop.child_token();
        let tasks = TaskTracker::new();
        let mappings: Vec<_> = config.upstream.iter().map(connector::mapping).collect();
        let upstreams: Vec<Arc<Status>> = config
            .upstream
            .iter()
            .zip(&mappings)
            .map(|(u, m)| {
                let mut symbols: Vec<String> = u
                    .symbols
                    .iter()
                    .filter_map(|s| m.get(s).map(|j| j[1..j.len() - 1].to_owned()))
                    .collect();
                symbols.sort_unstable();
                symbols.dedup();
                Arc::new(Status::new(u, symbols))
            })
            .collect();
        for (i, u) in config.upstream.iter().enumerate() {
            let primary = u.backup_for.as_ref().and_then(|p| {
                let status = upstreams.iter().find(|s| &s.name == p)?;
                let served: HashSet<String> = status.symbols.iter().cloned().collect();
                Some((status.clone(), served))
            });
            let has_backups = config
                .upstream
                .iter()
                .any(|b| b.backup_for.as_deref() == Some(u.name.as_str()));
            let connector = Connector::new(
                u.clone(),
                upstreams[i].clone(),
                primary,
                has_backups,
                ingestor.clone(),
                dead_letters.clone(),
                mappings[i].clone(),
                stop.clone(),
            );
            tasks.spawn(connector.run());
        }
        tasks.close();
        if !upstreams.is_empty() {
            tracing::info!(upstreams = upstreams.len(), "upstream feeds started");
        }
        Arc::new(Self {
            upstreams,
            tasks,
            stop,
        })
    }

    /// Stops every connector and waits for them, so nothing is ingested afterwards.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Each upstream's status.
    #[must_use]
    pub fn upstreams(&self) -> &[Arc<Status>] {
        &self.upstreams
    }

    /// Configured symbols (tickfan names) that no live upstream serves now, sorted.
    #[must_use]
    pub fn symbols_without_source(&self) -> Vec<String> {
        let all: BTreeSet<&String> = self.upstreams.iter().flat_map(|u| &u.symbols).collect();
        all.into_iter()
            .filter(|s| {
                !self
                    .upstreams
                    .iter()
                    .any(|u| u.live() && u.symbols.contains(s))
            })
            .cloned()
            .collect()
    }

    /// `/health`'s feed part: `{"upstreams":[...],"symbols_without_source":[...]}`.
    #[must_use]
    pub fn health_json(&self) -> Value {
        json!({
            "upstreams": self.upstreams.iter().map(|u| u.health()).collect::<Vec<_>>(),
            "symbols_without_source": self.symbols_without_source(),
        })
    }

    /// Why `/health` is degraded because of feeds: a configured symbol without a live source.
    #[must_use]
    pub fn health_reasons(&self) -> Vec<String> {
        let missing = self.symbols_without_source();
        if missing.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "upstream feeds: no live source for {}",
                missing.join(", ")
            )]
        }
    }

    /// Adds [`FeedSet::health_json`]'s keys to a `/health` body; without upstreams, nothing.
    pub fn extend_health(&self, body: &mut Value) {
        if self.upstreams.is_empty() {
            return;
        }
        if let (Value::Object(body), Value::Object(part)) = (body, self.health_json()) {
            body.extend(part);
        }
    }
}
