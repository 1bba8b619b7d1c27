//! Client sessions: a replicated state machine's deduplication table, with bounded memory
//! (`ballot-node`'s key-value store keeps one; so does the simulator's store, which drives
//! registration, expiry and retries under faults).
//!
//! A session is created by a `REGISTER` command going through the log (its id is a counter
//! kept in the replicated state), and it expires through the log too: every decision below
//! is a function of the commands applied and their log indexes, never of a replica's clock,
//! so every replica holds the same sessions after the same command (the Raft thesis, §6.3).
//!
//! - A session keeps the results of its last [`SessionLimits::window`] *writes* (reads are
//!   never recorded: retrying a read is harmless). A write whose sequence number is in the
//!   window gets the stored result without a second application; one at or below the
//!   window's floor is refused as stale; any other is applied and recorded. So a client may
//!   have up to `window` writes in flight per session, arriving in any order.
//! - A session not used by a write for [`SessionLimits::idle_entries`] log indexes expires.
//! - The table holds at most [`SessionLimits::max_sessions`] sessions and
//!   [`SessionLimits::max_bytes`] bytes of results; past either, the session idle longest
//!   (ties: the lowest id) expires.
//! - A write from an unknown or expired session is answered "session expired" and not
//!   applied: its dedup state is gone, so applying it could apply a retry twice.

use crate::types::Index;
use std::collections::{BTreeMap, BTreeSet};

/// The table's bounds. Part of the replicated state machine's definition: every replica of
/// a cluster must use the same values (`ballot-node` uses [`SessionLimits::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions kept at most.
    pub max_sessions: usize,
    /// Write results kept per session (writes in flight per session, at most).
    pub window: usize,
    /// A session unused by writes for more log indexes than this expires.
    pub idle_entries: u64,
    /// Bytes of stored results (plus [`SESSION_OVERHEAD`] per session) kept at most.
    pub max_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_sessions: 65_536,
            window: 128,
            idle_entries: 1 << 24,
            max_bytes: 64 << 20,
        }
    }
}

/// Bytes a session is charged for besides its results (its header in a checkpoint).
pub const SESSION_OVERHEAD: usize = 32;

/// What [`Sessions::check`] says about a write.
#[derive(Debug, PartialEq, Eq)]
pub enum Check<'a> {
    /// Not applied yet: apply it, then [`Sessions::record`] the result.
    New,
    /// Applied already: here is its result.
    Duplicate(&'a [u8]),
    /// At or below the session's floor: its result is gone.
    Stale,
    /// No such session (never registered, or expired).
    Expired,
}

/// One session: its activity, its floor and the results of its writes in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Log index of the registration or of the last write.
    pub last_active: Index,
    /// Every sequence number at or below this one is stale.
    pub floor: u64,
    /// seq -> encoded result, for the writes above the floor.
    pub results: BTreeMap<u64, Vec<u8>>,
}

impl Session {
    fn bytes(&self) -> usize {
        SESSION_OVERHEAD + self.results.values().map(Vec::len).sum::<usize>()
    }
}

/// The table. Keeps an order-independent hash of its contents up to date (`hash`), for the
/// machine's state digest.
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    limits: SessionLimits,
    map: BTreeMap<u64, Session>,
    /// (last_active, id), oldest first: the expiry order.
    idle: BTreeSet<(Index, u64)>,
    /// Id given to the next registration (skipping ids in use).
    next_id: u64,
    bytes: usize,
    hash: u64,
}

impl Sessions {
    /// An empty table under `limits`.
    ///
    /// # Panics
    /// If `limits` allow no session or an empty window.
    pub fn new(limits: SessionLimits) -> Sessions {
        assert!(
            limits.max_sessions > 0 && limits.window > 0,
            "empty session limits"
        );
        Sessions {
            limits,
            next_id: 1,
            ..Sessions::default()
        }
    }

    /// Its bounds.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }
    /// Sessions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Bytes charged against [`SessionLimits::max_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The id the next registration gets (unless in use).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }
    /// Session `id`, if held.
    pub fn get(&self, id: u64) -> Option<&Session> {
        self.map.get(&id)
    }
    /// Sessions in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Session)> {
        self.map.iter()
    }
    /// Order-independent hash of the table (ids, activity, floors, results, next id).
    pub fn hash(&self) -> u64 {
        self.hash ^ crate::state_hash::mix(self.next_id ^ 0x5E55_1045)
    }

    /// Expires the sessions idle for more than the limit at `index`. Call before applying
    /// the command at `index`.
    pub fn expire_idle(&mut self, index: Index) {
        while let Some(&(last, id)) = self.idle.first() {
            if last.saturating_add(self.limits.idle_entries) >= index {
                break;
            }
            self.remove(id);
        }
    }

    /// Registers a new session at `index` and returns its id; expires the oldest-idle
    /// session first if the table is full.
    pub fn register(&mut self, index: Index) -> u64 {
        while self.map.len() >= self.limits.max_sessions {
            self.expire_oldest();
        }
        while self.next_id == 0 || self.map.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.insert(
            id,
            Session {
                last_active: index,
                ..Session::default()
            },
        );
        self.shed_bytes(id);
        id
    }

    /// What to do with write `seq` of session `id`.
    pub fn check(&self, id: u64, seq: u64) -> Check<'_> {
        let Some(s) = self.map.get(&id) else {
            return Check::Expired;
        };
        if let Some(out) = s.results.get(&seq) {
            return Check::Duplicate(out);
        }
        if seq <= s.floor {
            return Check::Stale;
        }
        Check::New
    }

    /// Records the result of write `seq` of session `id` (which [`Sessions::check`] called
    /// new), applied at `index`: the oldest result leaves the window if it is full (its
    /// buffer then takes the new result: no allocation in steady state), and other sessions
    /// expire if the table is over its byte budget.
    pub fn record(&mut self, id: u64, seq: u64, out: &[u8], index: Index) {
        let Some(s) = self.map.get_mut(&id) else {
            return;
        };
        debug_assert!(seq > s.floor && !s.results.contains_key(&seq), "not new");
        // O(1) in the window: the header and the results that enter or leave the window
        // enter the hash, not the rest. One session lookup; the expiry order is touched only
        // when the index moves (the commands of one entry share it).
        let mut hash = self.hash.wrapping_sub(head_hash(id, s));
        if s.last_active != index {
            self.idle.remove(&(s.last_active, id));
            s.last_active = index;
            self.idle.insert((index, id));
        }
        let mut buf = Vec::new();
        if s.results.len() >= self.limits.window {
            if s.results
                .first_key_value()
                .is_some_and(|(&low, _)| low < seq)
            {
                let (low, old) = s.results.pop_first().expect("a full window");
                s.floor = s.floor.max(low);
                self.bytes -= old.len();
                hash = hash.wrapping_sub(result_hash(id, low, &old));
                buf = old;
                buf.clear();
            } else {
                // Below every result kept: it enters and leaves the window at once.
                s.floor = s.floor.max(seq);
                self.hash = hash.wrapping_add(head_hash(id, s));
                return self.shed_bytes(id);
            }
        }
        buf.extend_from_slice(out);
        hash = hash.wrapping_add(result_hash(id, seq, &buf));
        self.bytes += buf.len();
        s.results.insert(seq, buf);
        while s.results.len() > self.limits.window {
            hash = hash.wrapping_sub(pop_oldest(id, s, &mut self.bytes));
        }
        self.hash = hash.wrapping_add(head_hash(id, s));
        self.shed_bytes(id);
    }

    /// Moves session `id`'s oldest result out of its window (raising its floor). `false`:
    /// it had none.
    fn drop_oldest_result(&mut self, id: u64) -> bool {
        let Some(s) = self.map.get_mut(&id).filter(|s| !s.results.is_empty()) else {
            return false;
        };
        let before = head_hash(id, s);
        let gone = pop_oldest(id, s, &mut self.bytes);
        self.hash = self
            .hash
            .wrapping_sub(before)
            .wrapping_add(head_hash(id, s))
            .wrapping_sub(gone);
        true
    }

    /// Puts a session read from a checkpoint back (ids in any order; limits enforced once
    /// all are in, by [`Sessions::enforce_limits`]).
    pub fn restore(&mut self, id: u64, s: Session) {
        self.take(id);
        self.insert(id, s);
    }

    /// Sets the next registration's id (a checkpoint's; at least 1).
    pub fn set_next_id(&mut self, next: u64) {
        self.next_id = next.max(1);
    }

    /// Expires oldest-idle sessions until the count and the bytes are within the limits.
    pub fn enforce_limits(&mut self) {
        while self.map.len() > self.limits.max_sessions
            || (self.bytes > self.limits.max_bytes && !self.map.is_empty())
        {
            self.expire_oldest();
        }
    }

    /// Over the byte budget: expire the oldest-idle sessions other than `keep` (the one
    /// just used), then, if it alone is over, its oldest results.
    fn shed_bytes(&mut self, keep: u64) {
        while self.bytes > self.limits.max_bytes {
            let victim = self.idle.iter().map(|&(_, id)| id).find(|&id| id != keep);
            match victim {
                Some(id) => self.remove(id),
                None if self.drop_oldest_result(keep) => {}
                None => return,
            }
        }
    }

    fn expire_oldest(&mut self) {
        if let Some(&(_, id)) = self.idle.first() {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        self.take(id);
    }

    /// Removes a session, undoing its accounting.
    fn take(&mut self, id: u64) -> Option<Session> {
        let s = self.map.remove(&id)?;
        self.idle.remove(&(s.last_active, id));
        self.bytes -= s.bytes();
        self.hash = self.hash.wrapping_sub(session_hash(id, &s));
        Some(s)
    }

    fn insert(&mut self, id: u64, s: Session) {
        self.idle.insert((s.last_active, id));
        self.bytes += s.bytes();
        self.hash = self.hash.wrapping_add(session_hash(id, &s));
        self.map.insert(id, s);
    }
}

/// Moves session `id`'s (non-empty) oldest result out of its window: raises the floor,
/// takes its bytes off `bytes` and returns its hash (the caller updates the header's).
fn pop_oldest(id: u64, s: &mut Session, bytes: &mut usize) -> u64 {
    let (seq, out) = s.results.pop_first().expect("a result to drop");
    s.floor = s.floor.max(seq);
    *bytes -= out.len();
    result_hash(id, seq, &out)
}

/// Hash of one session: its header and each of its results, summed (so that a write
/// updates it in O(1): [`Sessions::record`]).
fn session_hash(id: u64, s: &Session) -> u64 {
    s.results.iter().fold(head_hash(id, s), |h, (seq, out)| {
        h.wrapping_add(result_hash(id, *seq, out))
    })
}

fn head_hash(id: u64, s: &Session) -> u64 {
    crate::state_hash::words_hash(b'S', &[id, s.last_active, s.floor])
}

fn result_hash(id: u64, seq: u64, out: &[u8]) -> u64 {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&id.to_le_bytes());
    head[8..].copy_from_slice(&seq.to_le_bytes());
    crate::state_hash::item_hash(b'R', &head, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SessionLimits {
        SessionLimits {
            max_sessions: 4,
            window: 3,
            idle_entries: 100,
            max_bytes: 1000,
        }
    }

    #[test]
    fn window_dedups_and_refuses_stale() {
        let mut t = Sessions::new(small());
        let id = t.register(1);
        assert_eq!(t.check(id, 1), Check::New);
        t.record(id, 1, &[0], 2);
        assert_eq!(t.check(id, 1), Check::Duplicate(&[0]));
        // Out of order inside the window: 3 before 2.
        t.record(id, 3, &[3], 3);
        assert_eq!(t.check(id, 2), Check::New);
        t.record(id, 2, &[2], 4);
        t.record(id, 4, &[4], 5);
        // Window of 3: seq 1 left it, and is stale now.
        assert_eq!(t.check(id, 1), Check::Stale);
        assert_eq!(t.check(id, 2), Check::Duplicate(&[2]));
        assert_eq!(t.check(99, 1), Check::Expired);
    }

    #[test]
    fn table_is_bounded_and_expires_oldest_idle_first() {
        let l = small();
        let mut t = Sessions::new(l);
        let ids: Vec<u64> = (0..10).map(|i| t.register(10 + i)).collect();
        assert_eq!(t.len(), l.max_sessions);
        // The four registered last are left.
        let kept: Vec<u64> = t.iter().map(|(id, _)| *id).collect();
        assert_eq!(kept, ids[6..]);
        // A write refreshes a session: it outlives the ones registered after it.
        t.record(ids[6], 1, &[1], 30);
        t.register(31);
        assert!(t.get(ids[6]).is_some());
        assert!(t.get(ids[7]).is_none());
        // Idle expiry by log index.
        t.expire_idle(30 + l.idle_entries);
        assert!(t.get(ids[6]).is_some());
        t.expire_idle(31 + l.idle_entries);
        assert!(t.get(ids[6]).is_none());
        assert_eq!(t.len(), 1);
        t.expire_idle(32 + l.idle_entries);
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
        // Bytes: big results push out other sessions, then the window's oldest.
        let a = t.register(1000);
        let b = t.register(1000);
        t.record(a, 1, &[0; 500], 1001);
        t.record(b, 1, &[0; 500], 1002);
        assert!(t.get(a).is_none(), "a was idle longest");
        assert!(t.bytes() <= l.max_bytes);
        t.record(b, 2, &[0; 500], 1003);
        assert_eq!(t.check(b, 1), Check::Stale);
        assert_eq!(t.check(b, 2), Check::Duplicate(&[0; 500]));
        assert!(t.bytes() <= l.max_bytes);
    }

    /// Two tables fed the same operations in the same order agree exactly (what every
    /// replica relies on), whatever the interleaving of registrations, writes and expiry.
    #[test]
    fn expiry_is_deterministic() {
        let run = || {
            let mut t = Sessions::new(small());
            let mut ids = Vec::new();
            let mut x = 12345u64;
            for index in 1..2000u64 {
                x = crate::state_hash::mix(x);
                t.expire_idle(index);
                match x % 4 {
                    0 => ids.push(t.register(index)),
                    _ if !ids.is_empty() => {
                        let id = ids[(x >> 8) as usize % ids.len()];
                        let seq = (x >> 20) % 8;
                        if t.check(id, seq) == Check::New {
                            t.record(id, seq, &vec![7; (x >> 40) as usize % 300], index);
                        }
                    }
                    _ => {}
                }
                assert!(t.len() <= 4 && t.bytes() <= 1000);
            }
            let all: Vec<(u64, Session)> = t.iter().map(|(i, s)| (*i, s.clone())).collect();
            // The incremental hash and byte count are those of the table built afresh.
            let mut fresh = Sessions::new(small());
            fresh.set_next_id(t.next_id());
            for (id, s) in &all {
                fresh.restore(*id, s.clone());
            }
            assert_eq!((fresh.hash(), fresh.bytes()), (t.hash(), t.bytes()));
            (all, t.hash(), t.next_id())
        };
        assert_eq!(run(), run());
    }
}
