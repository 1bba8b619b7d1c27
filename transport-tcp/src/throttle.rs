//! Rate limits for warnings that repeat as long as a fault lasts (a peer that is down, a
//! peer with the wrong key): the first one is logged at once, then at most one per period,
//! each saying how many were held back since the last.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// One repeated warning's state.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(period: Duration) -> Self {
        Throttle {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now; `n` repeats were suppressed since the last one logged. `None`:
    /// hold this one back (it is counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The fault is over: the next occurrence is logged at once. Returns the repeats held
    /// back since the last one logged (to report them with the recovery).
    pub(crate) fn reset(&mut self) -> u64 {
        self.last = None;
        std::mem::take(&mut self.suppressed)
    }
}

/// A [`Throttle`] per key (a remote address that is refused), bounded in size: past
/// `max_keys` the table starts over, so a scan from many addresses cannot grow it forever.
#[derive(Debug)]
pub(crate) struct Throttles<K> {
    period: Duration,
    max_keys: usize,
    map: HashMap<K, Throttle>,
}

impl<K: Eq + Hash> Throttles<K> {
    pub(crate) fn new(period: Duration, max_keys: usize) -> Self {
        Throttles {
            period,
            max_keys,
            map: HashMap::new(),
        }
    }

    pub(crate) fn allow(&mut self, key: K, now: Instant) -> Option<u64> {
        if self.map.len() >= self.max_keys && !self.map.contains_key(&key) {
            self.map.clear();
        }
        let period = self.period;
        self.map
            .entry(key)
            .or_insert_with(|| Throttle::new(period))
            .allow(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_at_once_then_one_per_period_with_the_count() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Throttle::new(ms(1000));
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=4 {
            assert_eq!(t.allow(t0 + ms(250 * i - 1)), None);
        }
        assert_eq!(t.allow(t0 + ms(1000)), Some(4));
        assert_eq!(t.allow(t0 + ms(1001)), None);
        assert_eq!(t.reset(), 1);
        assert_eq!(t.allow(t0 + ms(1002)), Some(0));
        let mut m = Throttles::new(ms(1000), 2);
        assert_eq!(m.allow(1, t0), Some(0));
        assert_eq!(m.allow(1, t0), None);
        assert_eq!(m.allow(2, t0), Some(0));
        // A third key starts the table over.
        assert_eq!(m.allow(3, t0), Some(0));
        assert_eq!(m.allow(1, t0), Some(0));
    }
}
