//! Outstanding proposal tickets, and what each one is waiting for.
//!
//! A replica issues the tickets of successful proposals in order, one apart
//! ([`crate::driver::Replica::propose`]), and completes them in any order; so the open ones
//! fit in a window from the oldest, without hashing. The driver keeps its own outstanding
//! set in one ([`TicketMap<()>`]); a caller that hands results back (the runtime's reply
//! channels, a benchmark's request tags) keeps its per-ticket value in another.

use std::collections::VecDeque;

/// Open client tickets, keyed by their consecutive numbers: a deque indexed by offset from
/// the oldest open ticket, so insert and remove take amortized O(1) time and, once the deque
/// has grown to the number in flight, allocate nothing.
#[derive(Debug)]
pub struct TicketMap<V> {
    /// The ticket of `open[0]`.
    base: u64,
    /// `None`: completed (kept only while an older ticket is still open).
    open: VecDeque<Option<V>>,
}

impl<V> Default for TicketMap<V> {
    fn default() -> Self {
        Self {
            base: 0,
            open: VecDeque::new(),
        }
    }
}

impl<V> TicketMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records ticket `t`, which must be one more than the last one inserted (or anything
    /// when none is open).
    pub fn insert(&mut self, t: u64, v: V) {
        if self.open.is_empty() {
            self.base = t;
        }
        debug_assert_eq!(
            t,
            self.base + self.open.len() as u64,
            "tickets are issued in order"
        );
        self.open.push_back(Some(v));
    }

    /// Takes ticket `t`'s value if it is open.
    pub fn remove(&mut self, t: u64) -> Option<V> {
        let k = t.checked_sub(self.base)?;
        let was = self.open.get_mut(usize::try_from(k).ok()?)?.take();
        while matches!(self.open.front(), Some(None)) {
            self.open.pop_front();
            self.base += 1;
        }
        was
    }

    /// Takes every open ticket, oldest first.
    pub fn drain(&mut self) -> Vec<(u64, V)> {
        let base = self.base;
        let out = self
            .open
            .drain(..)
            .enumerate()
            .filter_map(|(k, v)| v.map(|v| (base + k as u64, v)))
            .collect();
        out
    }

    /// Open tickets.
    pub fn len(&self) -> usize {
        self.open.iter().filter(|v| v.is_some()).count()
    }

    /// No ticket is open.
    pub fn is_empty(&self) -> bool {
        self.open.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_in_any_order_and_forgets_what_is_done() {
        let mut m = TicketMap::new();
        for t in 10..15 {
            m.insert(t, t * 2);
        }
        assert_eq!(m.remove(12), Some(24));
        assert_eq!(m.remove(12), None, "taken once");
        assert_eq!(m.remove(9), None, "older than any open ticket");
        assert_eq!(m.remove(99), None, "never issued");
        assert_eq!(m.remove(10), Some(20));
        assert_eq!(m.len(), 3);
        assert_eq!(m.remove(11), Some(22));
        // 10..=12 are gone from the window: only 13 and 14 are kept.
        assert_eq!(m.open.len(), 2);
        m.insert(15, 30);
        assert_eq!(m.drain(), vec![(13, 26), (14, 28), (15, 30)]);
        assert!(m.is_empty());
        // Empty again: the next ticket may be anywhere (a new incarnation's).
        m.insert(1000, 1);
        assert_eq!(m.remove(1000), Some(1));
        assert!(m.is_empty());
    }
}
