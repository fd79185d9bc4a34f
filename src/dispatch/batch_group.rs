//! Shared batches. Batch-mode clients with the same symbols, filter and interval would each
//! hold the same ticks and build the same frame; instead they form a group that holds each
//! tick once and builds one frame per flush, which every member's queue gets a reference to
//! (serialize once, share the bytes). A dashboard fleet watching the same board costs one
//! batch, not one per browser.
//!
//! Joining and leaving keep every member's stream exact, with no gap or duplicate:
//! - A client joins at the group's next flush. Until then it batches privately; at the flush
//!   its private batch goes out and from then on it is a member. A group that holds nothing
//!   takes a client at once (its private batch goes out first).
//! - A member that leaves (new subscription, filter or interval, mode change, a snapshot read
//!   from the store, disconnect) takes a copy of what the group holds into its private batch.
//!
//! The dispatcher owns the groups like the rest of its routing state; `fan_out` offers a tick
//! to a member's group instead of the member, and the group takes each tick once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use std::sync::Arc;

use slab::Slab;

use super::delivery::{Outcome, Tally};
use super::filter::Filter;
use super::outbound::{Frame, PushError};
use super::registry::ClientKey;
use super::{Dispatcher, TickSink};
use crate::auth::SymbolPatterns;
use crate::protocol::{close, Mode};
use crate::tick::Symbol;

/// What a group's members have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    interval: Duration,
    min_quality: u8,
    min_volume_bits: u64,
    wildcard: bool,
    symbols: Vec<Symbol>,
    /// A wildcard limited by its token: only clients with the same limits share a batch.
    permitted: Option<Arc<SymbolPatterns>>,
}

impl GroupKey {
    /// The key of a batch client with these settings.
    #[must_use]
    pub fn new(interval: Duration, filter: Filter, wildcard: bool, symbols: Vec<Symbol>) -> Self {
        Self {
            interval,
            min_quality: filter.min_quality,
            min_volume_bits: filter.min_volume.to_bits(),
            wildcard,
            symbols,
            permitted: None,
        }
    }

    /// The same key, for a wildcard client whose token permits only `permitted`.
    #[must_use]
    pub fn limited_to(mut self, permitted: Option<&Arc<SymbolPatterns>>) -> Self {
        if self.wildcard {
            self.permitted = permitted.cloned();
        }
        self
    }
}

/// A client's relation to the groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Membership {
    /// Served by its own delivery state.
    #[default]
    Private,
    /// Batching privately until the group's next flush.
    Joining(usize),
    /// Served by the group.
    Member(usize),
}

/// One shared batch.
#[derive(Debug)]
pub struct BatchGroup {
    key: GroupKey,
    serial: u64,
    /// Clients served by the group.
    pub members: Vec<ClientKey>,
    /// Clients that become members at the next flush.
    pub joining: Vec<ClientKey>,
    held: Vec<(Symbol, Frame)>,
    held_bytes: usize,
    last_tick: u64,
    next_flush: Option<Instant>,
    last_flush: Option<Instant>,
}

impl BatchGroup {
    /// Holds the tick numbered `tick` (the dispatcher's running count) unless another member
    /// already offered it. Returns the flush deadline to schedule, if a new one is needed.
    pub fn offer(
        &mut self,
        tick: u64,
        symbol: &Symbol,
        frame: &Frame,
        now: Instant,
    ) -> Option<Instant> {
        if self.last_tick == tick {
            return None;
        }
        self.last_tick = tick;
        self.held_bytes += frame.len();
        self.held.push((symbol.clone(), frame.clone()));
        if self.next_flush.is_some() {
            return None;
        }
        let interval = self.key.interval;
        let base = self.last_flush.unwrap_or(now).max(now - interval);
        let at = (base + interval).max(now);
        self.next_flush = Some(at);
        Some(at)
    }

    /// Bytes held.
    #[must_use]
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// What the group holds, for a member that leaves.
    #[must_use]
    pub fn held(&self) -> &[(Symbol, Frame)] {
        &self.held
    }

    /// Takes the held ticks as one `batch` frame (none if nothing is held) and marks the
    /// flush done.
    pub fn take_batch(&mut self, now: Instant) -> Option<Frame> {
        self.next_flush = None;
        self.last_flush = Some(now);
        if self.held.is_empty() {
            return None;
        }
        // Every member gets this one frame: shared, compressed at most once.
        let frame = Frame::shared(
            super::delivery::batch_frame(&self.held, self.held_bytes),
            true,
        );
        self.held.clear();
        self.held_bytes = 0;
        Some(frame)
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.joining.is_empty()
    }
}

/// All groups, with their flush timers.
#[derive(Debug, Default)]
pub struct Groups {
    by_key: HashMap<GroupKey, usize>,
    groups: Slab<BatchGroup>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_serial: u64,
    /// Members over all groups, kept as they change (stats without a scan).
    members: usize,
}

impl Groups {
    /// The group for `key`, created if needed.
    pub fn find_or_create(&mut self, key: GroupKey) -> usize {
        if let Some(&g) = self.by_key.get(&key) {
            return g;
        }
        self.next_serial += 1;
        let g = self.groups.insert(BatchGroup {
            key: key.clone(),
            serial: self.next_serial,
            members: Vec::new(),
            joining: Vec::new(),
            held: Vec::new(),
            held_bytes: 0,
            last_tick: 0,
            next_flush: None,
            last_flush: None,
        });
        self.by_key.insert(key, g);
        g
    }

    /// The key a group was made for.
    #[must_use]
    pub fn key_of(&self, g: usize) -> Option<&GroupKey> {
        self.groups.get(g).map(|group| &group.key)
    }

    /// A group.
    pub fn get_mut(&mut self, g: usize) -> Option<&mut BatchGroup> {
        self.groups.get_mut(g)
    }

    /// Schedules group `g`'s flush at `at`.
    pub fn schedule(&mut self, g: usize, at: Instant) {
        if let Some(group) = self.groups.get(g) {
            self.timers.push(Reverse((at, g, group.serial)));
        }
    }

    /// The earliest pending group flush.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Pops the next group whose flush is due by `now` (stale timers are skipped).
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        while let Some(&Reverse((at, g, serial))) = self.timers.peek() {
            if at > now {
                return None;
            }
            self.timers.pop();
            if self
                .groups
                .get(g)
                .is_some_and(|group| group.serial == serial && group.next_flush == Some(at))
            {
                return Some(g);
            }
        }
        None
    }

    /// Makes `client` a member of group `g`.
    pub fn add_member(&mut self, g: usize, client: ClientKey) -> bool {
        let Some(group) = self.groups.get_mut(g) else {
            return false;
        };
        group.members.push(client);
        self.members += 1;
        true
    }

    /// Removes `client` from group `g` (as member or joiner); drops the group once nobody is
    /// left. Returns whether it was a member.
    pub fn remove_client(&mut self, g: usize, client: ClientKey) -> bool {
        let Some(group) = self.groups.get_mut(g) else {
            return false;
        };
        let was_member = if let Some(i) = group.members.iter().position(|&m| m == client) {
            group.members.swap_remove(i);
            self.members -= 1;
            true
        } else {
            group.joining.retain(|&j| j != client);
            false
        };
        self.remove_if_empty(g);
        was_member
    }

    /// Drops group `g` if it serves nobody (a join that failed can leave one behind).
    pub fn remove_if_empty(&mut self, g: usize) {
        if self.groups.get(g).is_some_and(BatchGroup::is_empty) {
            let group = self.groups.remove(g);
            self.by_key.remove(&group.key);
        }
    }

    /// Groups and the clients they serve (members), for stats.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.groups.len(), self.members)
    }
}

impl<S: TickSink> Dispatcher<S> {
    /// Puts `key` in the group its settings call for, or takes it out of any group when it no
    /// longer qualifies (not in batch mode, a snapshot read pending, detached).
    pub(super) fn regroup(&mut self, key: ClientKey) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        let eligible =
            client.delivery.mode() == Mode::Batch && client.awaiting.is_empty() && !client.detached;
        let want = eligible.then(|| {
            GroupKey::new(
                client.delivery.interval(),
                client.filter,
                client.wildcard,
                client.symbols.iter().cloned().collect(),
            )
            .limited_to(client.permitted.as_ref())
        });
        if let (Membership::Member(g) | Membership::Joining(g), Some(k)) = (client.group, &want) {
            if self.groups.key_of(g) == Some(k) {
                return;
            }
        }
        self.leave_group(key);
        let Some(want) = want else {
            self.update_group_stats();
            return;
        };
        let g = self.groups.find_or_create(want);
        // A group that holds nothing has no batch the newcomer could miss or get twice: it
        // sends its own held ticks now and is a member from here on.
        let idle = self
            .groups
            .get_mut(g)
            .is_some_and(|group| group.held().is_empty());
        if idle {
            let (mut tally, mut gone) = (Tally::default(), Vec::new());
            self.promote(g, key, Instant::now(), &mut tally, &mut gone);
            self.groups.remove_if_empty(g);
            self.settle(tally, gone);
        } else if let Some(group) = self.groups.get_mut(g) {
            group.joining.push(key);
            self.clients[key].group = Membership::Joining(g);
        }
        self.update_group_stats();
    }

    /// Takes `key` out of its group. A member takes a copy of what the group holds, so its
    /// private batch continues exactly where the group's left off.
    pub(super) fn leave_group(&mut self, key: ClientKey) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let g = match std::mem::take(&mut client.group) {
            Membership::Private => return,
            Membership::Joining(g) | Membership::Member(g) => g,
        };
        let now = Instant::now();
        if !client.detached {
            if let Some(group) = self.groups.get_mut(g) {
                if group.members.contains(&key) {
                    match client.delivery.hold_all(group.held(), now) {
                        Outcome::Scheduled(at) => self.timers.push(Reverse((at, key))),
                        // Holding never pushes; nothing else can come back.
                        Outcome::Done | Outcome::SlowConsumer | Outcome::Gone => {}
                    }
                }
            }
        }
        self.groups.remove_client(g, key);
        // Joiners of a group whose last member left would wait for a flush that never comes:
        // they join now (what the group held went with the members that left).
        let orphans = match self.groups.get_mut(g) {
            Some(group) if group.members.is_empty() && !group.joining.is_empty() => {
                let _ = group.take_batch(now);
                std::mem::take(&mut group.joining)
            }
            _ => Vec::new(),
        };
        let (mut tally, mut gone) = (Tally::default(), Vec::new());
        for j in orphans {
            self.promote(g, j, now, &mut tally, &mut gone);
        }
        self.groups.remove_if_empty(g);
        self.update_group_stats();
        self.settle(tally, gone);
    }

    /// Sends `key`'s private batch now and makes it a member of `g`.
    fn promote(
        &mut self,
        g: usize,
        key: ClientKey,
        now: Instant,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        match client.delivery.flush(&client.out, now, self.smart, tally) {
            Outcome::Done | Outcome::Scheduled(_) => {}
            Outcome::SlowConsumer => return gone.push((key, close::SLOW_CONSUMER)),
            Outcome::Gone => return gone.push((key, 0)),
        }
        if self.groups.add_member(g, key) {
            client.group = Membership::Member(g);
        }
    }

    /// Flushes group `g`: one frame for all members, then the joiners become members.
    pub(super) fn flush_group(
        &mut self,
        g: usize,
        now: Instant,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) {
        let Some(group) = self.groups.get_mut(g) else {
            return;
        };
        let frame = group.take_batch(now);
        let joining = std::mem::take(&mut group.joining);
        if let Some(frame) = frame {
            for &m in &group.members {
                let Some(client) = self.clients.get(m) else {
                    continue;
                };
                match client.out.push(frame.clone()) {
                    Ok(()) => tally.messages += 1,
                    Err(PushError::Full) => gone.push((m, close::SLOW_CONSUMER)),
                    Err(PushError::Closed) => gone.push((m, 0)),
                }
            }
        }
        for j in joining {
            self.promote(g, j, now, tally, gone);
        }
        self.groups.remove_if_empty(g);
        self.update_group_stats();
    }

    fn settle(&mut self, tally: Tally, gone: Vec<(ClientKey, u16)>) {
        self.record(tally);
        for (key, code) in gone {
            self.drop_client(key, code);
        }
    }

    fn update_group_stats(&self) {
        let (groups, members) = self.groups.counts();
        self.stats
            .batch_groups
            .store(groups as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .batch_group_members
            .store(members as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(symbols: &[&str]) -> GroupKey {
        GroupKey::new(
            Duration::from_millis(50),
            Filter::default(),
            false,
            symbols.iter().map(|s| Symbol::parse(s).unwrap()).collect(),
        )
    }

    #[test]
    fn one_group_per_key_and_each_tick_held_once() {
        let mut groups = Groups::default();
        let a = groups.find_or_create(key(&["A", "B"]));
        assert_eq!(groups.find_or_create(key(&["A", "B"])), a);
        let b = groups.find_or_create(key(&["A"]));
        assert_ne!(a, b);
        let now = Instant::now();
        let sym = Symbol::parse("A").unwrap();
        let group = groups.get_mut(a).unwrap();
        let at = group.offer(1, &sym, &Frame::from("{\"x\":1}"), now);
        assert_eq!(at, Some(now + Duration::from_millis(50)));
        // The same tick offered by a second member is not held twice.
        assert_eq!(group.offer(1, &sym, &Frame::from("{\"x\":1}"), now), None);
        assert_eq!(group.offer(2, &sym, &Frame::from("{\"x\":2}"), now), None);
        assert_eq!(group.held().len(), 2);
        let frame = group.take_batch(now).unwrap();
        assert_eq!(
            frame.as_str(),
            r#"{"type":"batch","ticks":[{"x":1},{"x":2}]}"#
        );
        assert!(group.take_batch(now).is_none());
    }

    #[test]
    fn timers_skip_stale_and_groups_go_when_empty() {
        let mut groups = Groups::default();
        let g = groups.find_or_create(key(&["A"]));
        assert!(groups.add_member(g, 7));
        assert_eq!(groups.counts(), (1, 1));
        let t0 = Instant::now();
        let sym = Symbol::parse("A").unwrap();
        let at = groups
            .get_mut(g)
            .unwrap()
            .offer(1, &sym, &Frame::from("{}"), t0)
            .unwrap();
        groups.schedule(g, at);
        assert_eq!(groups.next_deadline(), Some(at));
        assert_eq!(groups.pop_due(t0), None);
        assert_eq!(groups.pop_due(at), Some(g));
        assert!(groups.remove_client(g, 7));
        assert_eq!(groups.counts(), (0, 0));
        assert!(groups.key_of(g).is_none());
    }
}
