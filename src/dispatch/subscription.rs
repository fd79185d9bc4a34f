//! `subscribe` and `unsubscribe` for one client: validate the symbols, enforce
//! `max_symbols`, update the routing index, answer with the ack on the client's own queue (so
//! it is ordered with its ticks), then start the snapshots the request asked for.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::outbound::Frame;
use super::registry::ClientKey;
use super::{Dispatcher, TickSink};
use crate::protocol::{self, close, ErrorCode, Settings};
use crate::tick::Symbol;

impl<S: TickSink> Dispatcher<S> {
    pub(super) fn subscribe(
        &mut self,
        key: ClientKey,
        id: Option<Value>,
        requested: &[String],
        settings: &Settings,
        history: usize,
        since_seq: &HashMap<String, u64>,
    ) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        let mut accepted: Vec<Symbol> = Vec::new();
        let mut wildcard = false;
        let mut rejected = Vec::new();
        for name in requested {
            if name == "*" {
                wildcard = true;
            } else if let Some(sym) = Symbol::parse(name) {
                let sym = self.shared_symbol(sym);
                if !accepted.contains(&sym) {
                    accepted.push(sym);
                }
            } else {
                rejected.push(json!({"symbol": name, "code": ErrorCode::InvalidSymbol.as_str()}));
            }
        }
        let new_count = accepted
            .iter()
            .filter(|s| !client.symbols.contains(s))
            .count()
            + usize::from(wildcard && !client.wildcard);
        let total = client.symbols.len() + usize::from(client.wildcard) + new_count;
        if total > self.max_symbols {
            self.stats.too_many_symbols.fetch_add(1, Ordering::Relaxed);
            let msg = protocol::error_message(
                id.as_ref(),
                ErrorCode::TooManySymbols,
                &format!(
                    "subscription would hold {total} symbols; the limit is {} per connection",
                    self.max_symbols
                ),
                None,
            );
            if client.out.push_control(Frame::from(msg)).is_err() {
                self.drop_client(key, close::SLOW_CONSUMER);
            }
            return;
        }
        self.apply_settings(key, settings);
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if wildcard && !client.wildcard {
            // While `*` is on, named subscriptions are parked outside the index (see registry).
            client.wildcard = true;
            self.registry.add_wildcard(key);
            for sym in &client.symbols {
                self.registry.remove(sym, key);
            }
        }
        for sym in &accepted {
            if client.symbols.insert(sym.clone()) && !client.wildcard {
                self.registry.add(sym, key);
            }
        }
        client.symbols.shrink();
        let mut last_seq = serde_json::Map::new();
        for sym in &accepted {
            let seq = self.symbols.get(sym).map_or(0, |s| s.seq);
            last_seq.insert(sym.to_string(), seq.into());
        }
        let mut names: Vec<Value> = accepted.iter().map(|s| s.as_str().into()).collect();
        if wildcard {
            names.push("*".into());
        }
        let mode = client.delivery.mode();
        let ack = json!({
            "type": "ack", "id": id, "op": "subscribe", "symbols": names,
            "rejected": rejected, "last_seq": last_seq, "mode": mode,
        });
        self.reply(key, &ack);
        // Snapshots: from the dispatcher's ring, so they join live delivery with no gap.
        let mut wanted: Vec<(Symbol, Option<u64>)> = Vec::new();
        for sym in &accepted {
            match since_seq.get(sym.as_str()) {
                Some(s) => wanted.push((sym.clone(), Some(*s))),
                None if history > 0 => wanted.push((sym.clone(), None)),
                None => {}
            }
        }
        if wildcard {
            // Every known symbol comes through `*`: resume points and history apply to them too.
            for sym in self.symbols.keys() {
                if accepted.contains(sym) {
                    continue;
                }
                match since_seq.get(sym.as_str()) {
                    Some(s) => wanted.push((sym.clone(), Some(*s))),
                    None if history > 0 => wanted.push((sym.clone(), None)),
                    None => {}
                }
            }
        }
        for (sym, since) in wanted {
            self.send_snapshot(key, &sym, history, since);
        }
    }

    /// `sym` as the allocation the dispatcher already holds for that name, if any.
    fn shared_symbol(&self, sym: Symbol) -> Symbol {
        self.symbols
            .get_key_value(&sym)
            .map(|(name, _)| name)
            .or_else(|| self.registry.shared_name(&sym))
            .cloned()
            .unwrap_or(sym)
    }

    pub(super) fn unsubscribe(&mut self, key: ClientKey, id: Option<Value>, requested: &[String]) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let mut removed = Vec::new();
        let mut unparked = false;
        for name in requested {
            if name == "*" {
                if client.wildcard {
                    client.wildcard = false;
                    self.registry.remove_wildcard(key);
                    unparked = true;
                }
                removed.push(Value::from("*"));
            } else if let Some(sym) = Symbol::parse(name) {
                if client.symbols.remove(&sym) {
                    self.registry.remove(&sym, key);
                }
                removed.push(Value::from(sym.as_str()));
            }
        }
        if unparked {
            // The named subscriptions parked while `*` was on come back into the index.
            for sym in &client.symbols {
                self.registry.add(sym, key);
            }
        }
        let wildcard = client.wildcard;
        if !wildcard {
            let still = &client.symbols;
            client.delivery.retain(|s| still.contains(s));
            // Nothing for a dropped symbol after the ack: its replay stops too.
            if self.replays.contains_key(&key) {
                let still: Vec<Symbol> = client.symbols.iter().cloned().collect();
                self.cancel_replays(key, |s| !still.contains(s));
            }
        }
        self.reply(
            key,
            &json!({"type":"ack","id":id,"op":"unsubscribe","symbols":removed}),
        );
    }
}
