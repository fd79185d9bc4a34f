//! The per-connection tick filter: quality and volume floors. Pure, so it is tested as a table.
//! Symbol matching is the registry's job; this decides among ticks of subscribed symbols.

use crate::tick::{Priority, Tick};

/// Connection-wide floors.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Filter {
    /// Ticks with lower quality are not delivered.
    pub min_quality: u8,
    /// Ticks with lower volume are not delivered, except critical ones.
    pub min_volume: f64,
}

impl Filter {
    /// Whether `tick` passes.
    #[must_use]
    pub fn matches(&self, tick: &Tick) -> bool {
        tick.quality >= self.min_quality
            && (tick.priority == Priority::Critical || tick.volume >= self.min_volume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tick::Symbol;

    #[test]
    fn table() {
        let base = Tick {
            quality: 80,
            seq: 1,
            ..Tick::new(Symbol::parse("A").unwrap(), 0, 1.0, 5.0)
        };
        let f = |q, v| Filter {
            min_quality: q,
            min_volume: v,
        };
        let critical = Tick {
            priority: Priority::Critical,
            ..base.clone()
        };
        for (filter, tick, expect) in [
            (f(0, 0.0), &base, true),
            (f(80, 5.0), &base, true),
            (f(81, 0.0), &base, false),
            (f(0, 5.1), &base, false),
            (f(0, 100.0), &critical, true),
            (f(90, 0.0), &critical, false),
        ] {
            assert_eq!(
                filter.matches(tick),
                expect,
                "{filter:?} {:?}",
                tick.priority
            );
        }
    }
}
