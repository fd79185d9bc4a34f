//! `subscribe` and `unsubscribe` for one client: validate the symbols, enforce
//! `max_symbols`, update the routing index, answer with the ack on the client's own queue (so
//! it is ordered with its ticks), then start the snapshots the request asked for. A
//! connection whose token permits only some symbols gets `forbidden` for the others, its `*`
//! and its snapshots cover only its own, and a refreshed token ([`Dispatcher::reauthorize`])
//! ends the subscriptions the new one no longer permits.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::outbound::Frame;
use super::registry::ClientKey;
use super::{Dispatcher, TickSink};
use crate::auth::SymbolPatterns;
use crate::protocol::{self, ErrorCode, Settings};
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
                if !SymbolPatterns::permits(client.permitted.as_deref(), sym.as_str()) {
                    rejected.push(json!({"symbol": name, "code": ErrorCode::Forbidden.as_str()}));
                    continue;
                }
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
            self.push_control(key, Frame::from(msg));
            return;
        }
        self.apply_settings(key, settings);
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if wildcard && !client.wildcard {
            // While `*` is on, named subscriptions are parked outside the index (see registry).
            client.wildcard = true;
            self.registry.add_wildcard(key, client.permitted.as_ref());
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
            // Every known symbol comes through `*`: resume points and history apply to them too
            // (those the token permits: a replay must not leak the others).
            let permitted = self.clients.get(key).and_then(|c| c.permitted.clone());
            for sym in self.symbols.keys() {
                if accepted.contains(sym)
                    || !SymbolPatterns::permits(permitted.as_deref(), sym.as_str())
                {
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

    /// Applies a refreshed token's permissions to `key`: named subscriptions outside them
    /// end (with their held ticks and replays), a `*` narrows or widens to them, and the
    /// client is told which symbols it lost (`unsubscribed`, code `forbidden`) before the
    /// `auth` ack.
    pub(super) fn reauthorize(
        &mut self,
        key: ClientKey,
        id: Option<Value>,
        permitted: Option<Arc<SymbolPatterns>>,
    ) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let allowed = |s: &Symbol| SymbolPatterns::permits(permitted.as_deref(), s.as_str());
        let lost: Vec<Symbol> = client
            .symbols
            .iter()
            .filter(|s| !allowed(s))
            .cloned()
            .collect();
        for sym in &lost {
            client.symbols.remove(sym);
            if !client.wildcard {
                self.registry.remove(sym, key);
            }
        }
        if client.wildcard {
            self.registry.remove_wildcard(key);
            self.registry.add_wildcard(key, permitted.as_ref());
        }
        client.delivery.retain(|s| allowed(s));
        client.permitted = permitted.clone();
        if self.replays.contains_key(&key) {
            self.cancel_replays(key, |s| {
                !SymbolPatterns::permits(permitted.as_deref(), s.as_str())
            });
        }
        if !lost.is_empty() {
            let names: Vec<&str> = lost.iter().map(Symbol::as_str).collect();
            self.reply(
                key,
                &json!({
                    "type": "unsubscribed", "code": ErrorCode::Forbidden.as_str(),
                    "symbols": names,
                    "message": "the refreshed token does not permit these symbols",
                }),
            );
        }
        self.reply(key, &json!({"type":"ack","id":id,"op":"auth"}));
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
