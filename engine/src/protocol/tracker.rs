//! The leader's peer tracker: each follower's stream, credit and acknowledgements.

use super::msg::Promise;
use crate::layout::RingGeometry;
use crate::ring::RingCursor;
use crate::types::{Ballot, Index, NodeId};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum PeerState {
    /// Has not promised our ballot yet: Prepare is repeated.
    Unpromised,
    Streaming,
    /// Writes failed: wait for outstanding completions, then ask for a new stream.
    Resyncing {
        asked_at: Option<u64>,
    },
    /// Its next entry is compacted away: it pulls a checkpoint, then promises a new stream.
    NeedsCheckpoint {
        asked_at: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Peer {
    pub(super) state: PeerState,
    pub(super) stream: u64,
    pub(super) gen: u64,
    pub(super) next: Index,
    pub(super) cursor: RingCursor,
    pub(super) consumed: u64,
    /// Highest index known accepted (volatile) or persisted (durable) by this peer.
    pub(super) acked: Index,
    pub(super) outstanding: u32,
    pub(super) last_contact: u64,
    pub(super) commit_sent: Index,
    pub(super) commit_sent_at: u64,
    pub(super) prepare_sent_at: u64,
    /// The last recovery of this peer we answered (its acknowledgements were reset then).
    pub(super) recovery_nonce: u64,
    /// The generation our `Resync` / `NeedCheckpoint` names (0: not asked yet): only a
    /// stream-only promise echoing it restarts the peer, so a stale one never does.
    pub(super) ask: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Leadership {
    pub(super) ballot: Ballot,
    pub(super) peers: BTreeMap<NodeId, Peer>,
    pub(super) since: u64,
}

/// Where a follower's promised stream starts, as its promise reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct StreamAt {
    pub(super) stream: u64,
    pub(super) received: Index,
    pub(super) persisted: Index,
    /// Where its ring reader is (slots consumed).
    pub(super) consumed: u64,
}

impl StreamAt {
    pub(super) fn of(p: &Promise) -> StreamAt {
        StreamAt {
            stream: p.stream,
            received: p.received,
            persisted: p.persisted,
            consumed: p.consumed,
        }
    }
}

impl Peer {
    /// A follower of a new leadership: it has not promised our ballot yet (it is asked
    /// again from `tick` on).
    pub(super) fn unpromised(ring: RingGeometry, tick: u64) -> Peer {
        Peer {
            state: PeerState::Unpromised,
            stream: 0,
            gen: 0,
            next: 1,
            cursor: RingCursor::new(ring),
            consumed: 0,
            acked: 0,
            outstanding: 0,
            last_contact: tick,
            commit_sent: 0,
            commit_sent_at: 0,
            prepare_sent_at: tick,
            recovery_nonce: 0,
            ask: 0,
        }
    }

    pub(super) fn is_streaming(&self) -> bool {
        self.state == PeerState::Streaming
    }

    /// The peer promised a stream `at`: write it from `received + 1`, at the slot its
    /// reader reached, under a new write generation `gen`. Any state becomes `Streaming`.
    pub(super) fn restart(
        &mut self,
        at: StreamAt,
        durable: bool,
        tick: u64,
        ring: RingGeometry,
        gen: u64,
    ) {
        debug_assert!(gen > self.gen, "contract: write generations only grow");
        self.state = PeerState::Streaming;
        self.stream = at.stream;
        self.gen = gen;
        self.next = at.received + 1;
        self.cursor = RingCursor::resume(ring, at.consumed);
        self.consumed = at.consumed;
        self.acked = if durable {
            at.persisted.min(at.received)
        } else {
            at.received
        };
        self.last_contact = tick;
        self.commit_sent = 0;
        self.ask = 0;
    }

    /// Its stream cannot go on (writes of an old stream in flight): any state becomes
    /// `Resyncing`, not asked yet.
    pub(super) fn resync(&mut self) {
        self.state = PeerState::Resyncing { asked_at: None };
    }

    /// A failed write, or the follower reads another stream: `Streaming` becomes
    /// `Resyncing`; any other state is kept (it is being asked already, or not promised).
    pub(super) fn stream_lost(&mut self) {
        if self.is_streaming() {
            self.resync();
        }
    }

    /// Its next entry is compacted away: `Streaming` becomes `NeedsCheckpoint`.
    pub(super) fn compacted_past(&mut self) {
        if self.is_streaming() {
            self.state = PeerState::NeedsCheckpoint { asked_at: None };
        }
    }

    /// A `Resync` or `NeedCheckpoint` was sent at `tick`: the state records when.
    pub(super) fn asked_at(&mut self, tick: u64) {
        match &mut self.state {
            PeerState::Resyncing { asked_at } | PeerState::NeedsCheckpoint { asked_at } => {
                *asked_at = Some(tick)
            }
            PeerState::Unpromised | PeerState::Streaming => {}
        }
    }

    /// The generation a request for a new stream names: the one asked already, or a new
    /// one from `write_gen`.
    pub(super) fn ask(&mut self, write_gen: &mut u64) -> u64 {
        if self.ask == 0 {
            *write_gen += 1;
            self.ask = *write_gen;
        }
        self.ask
    }

    /// Whether a promise (a stream-only one, or a phase-1 answer) echoing generation `gen`
    /// is the answer we wait for: a phase-1 answer while the peer has not promised, or a
    /// stream-only promise echoing our request. Anything else is a duplicate or stale.
    pub(super) fn expects(&self, stream_only: bool, gen: u64) -> bool {
        match (&self.state, stream_only) {
            // `ask` 0: a late answer to the candidacy's own Prepare.
            (PeerState::Unpromised, false) => gen == self.ask,
            (PeerState::Resyncing { .. } | PeerState::NeedsCheckpoint { .. }, true) => {
                self.ask != 0 && gen == self.ask
            }
            _ => false,
        }
    }

    /// The peer lost its memory and asks to rebuild (recovery `nonce`): count nothing of
    /// its earlier incarnation (completions in flight are of an older generation than
    /// `gen`), and take up only an answer to a Prepare of generation `gen`, asked from
    /// `tick` on. Any state becomes `Unpromised`.
    pub(super) fn forget(&mut self, nonce: u64, gen: u64, tick: u64) {
        self.recovery_nonce = nonce;
        self.state = PeerState::Unpromised;
        self.ask = gen;
        self.acked = 0;
        self.gen = gen;
        self.outstanding = 0;
        self.prepare_sent_at = tick;
    }
}

impl Leadership {
    /// Whether the leader still hears from a majority (itself counted), or leads since
    /// less than `timeout` ticks.
    pub(super) fn quorum_contact(&self, tick: u64, timeout: u32, majority: usize) -> bool {
        let recent = |p: &Peer| tick.saturating_sub(p.last_contact) <= u64::from(timeout);
        let alive = 1 + self.peers.values().filter(|p| recent(p)).count();
        alive >= majority || tick - self.since <= u64::from(timeout)
    }

    /// The highest index that `q` of the acknowledgements hold: the leader's own (`own`,
    /// counted twice when `twice`, a planted bug) and every peer's.
    pub(super) fn quorum_index(&self, own: Index, twice: bool, q: usize) -> Index {
        let mut acks = [0 as Index; crate::MAX_NODES + 1];
        let mut n = 0;
        let twice = twice.then_some(own);
        for a in std::iter::once(own)
            .chain(twice)
            .chain(self.peers.values().map(|p| p.acked))
        {
            acks[n] = a;
            n += 1;
        }
        kth_highest(&mut acks[..n], q.max(1))
    }
}

/// The `k`-th highest of `v` (1-based; no allocation).
pub(super) fn kth_highest(v: &mut [Index], k: usize) -> Index {
    *v.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> RingGeometry {
        RingGeometry::new(64, 64).unwrap()
    }

    fn peer(state: PeerState) -> Peer {
        let mut p = Peer::unpromised(ring(), 0);
        p.state = state;
        p.ask = 7;
        p.gen = 3;
        p
    }

    const AT: StreamAt = StreamAt {
        stream: 9,
        received: 20,
        persisted: 15,
        consumed: 4,
    };

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Restart,
        Resync,
        StreamLost,
        CompactedPast,
        AskedAt(u64),
        Forget,
    }

    fn apply(p: &mut Peer, e: Event) {
        match e {
            Event::Restart => p.restart(AT, true, 5, ring(), 4),
            Event::Resync => p.resync(),
            Event::StreamLost => p.stream_lost(),
            Event::CompactedPast => p.compacted_past(),
            Event::AskedAt(t) => p.asked_at(t),
            Event::Forget => p.forget(11, 12, 6),
        }
    }

    #[test]
    fn peer_state_transitions() {
        use PeerState::*;
        let resync = |asked_at| Resyncing { asked_at };
        let ckpt = |asked_at| NeedsCheckpoint { asked_at };
        #[rustfmt::skip]
        let table: &[(PeerState, Event, PeerState)] = &[
            // Restart: any state streams.
            (Unpromised, Event::Restart, Streaming),
            (Streaming, Event::Restart, Streaming),
            (resync(Some(1)), Event::Restart, Streaming),
            (ckpt(None), Event::Restart, Streaming),
            // Resync: any state resyncs, not asked yet.
            (Unpromised, Event::Resync, resync(None)),
            (Streaming, Event::Resync, resync(None)),
            (resync(Some(1)), Event::Resync, resync(None)),
            (ckpt(Some(1)), Event::Resync, resync(None)),
            // A lost stream: only a streaming peer resyncs.
            (Unpromised, Event::StreamLost, Unpromised),
            (Streaming, Event::StreamLost, resync(None)),
            (resync(Some(1)), Event::StreamLost, resync(Some(1))),
            (ckpt(Some(1)), Event::StreamLost, ckpt(Some(1))),
            // Compacted past its next entry: only a streaming peer needs a checkpoint.
            (Unpromised, Event::CompactedPast, Unpromised),
            (Streaming, Event::CompactedPast, ckpt(None)),
            (resync(None), Event::CompactedPast, resync(None)),
            (ckpt(Some(1)), Event::CompactedPast, ckpt(Some(1))),
            // Asked: the time is recorded where there is a request.
            (Unpromised, Event::AskedAt(8), Unpromised),
            (Streaming, Event::AskedAt(8), Streaming),
            (resync(None), Event::AskedAt(8), resync(Some(8))),
            (resync(Some(1)), Event::AskedAt(8), resync(Some(8))),
            (ckpt(None), Event::AskedAt(8), ckpt(Some(8))),
            // Forget (the peer rebuilds): any state is unpromised.
            (Streaming, Event::Forget, Unpromised),
            (resync(Some(1)), Event::Forget, Unpromised),
            (ckpt(None), Event::Forget, Unpromised),
            (Unpromised, Event::Forget, Unpromised),
        ];
        for (from, e, to) in table {
            let mut p = peer(from.clone());
            apply(&mut p, *e);
            assert_eq!(&p.state, to, "{from:?} --{e:?}-->");
        }
    }

    #[test]
    fn restart_and_forget_set_the_stream() {
        for (durable, acked) in [(true, 15), (false, 20)] {
            let mut p = peer(PeerState::Unpromised);
            p.commit_sent = 3;
            p.restart(AT, durable, 5, ring(), 4);
            assert_eq!(
                (p.stream, p.gen, p.next, p.consumed, p.acked, p.ask),
                (9, 4, 21, 4, acked, 0)
            );
            assert_eq!((p.last_contact, p.commit_sent), (5, 0));
            p.outstanding = 2;
            p.forget(11, 12, 6);
            assert_eq!(
                (p.recovery_nonce, p.ask, p.gen, p.acked, p.outstanding),
                (11, 12, 12, 0, 0)
            );
            assert_eq!(p.prepare_sent_at, 6);
        }
    }

    #[test]
    fn expected_answers() {
        use PeerState::*;
        let resync = Resyncing { asked_at: None };
        let ckpt = NeedsCheckpoint { asked_at: None };
        #[rustfmt::skip]
        let table: &[(PeerState, u64, bool, u64, bool)] = &[
            // (state, ask, stream-only, echoed gen, taken up)
            (Unpromised, 0, false, 0, true), // a late answer to the candidacy's Prepare
            (Unpromised, 5, false, 5, true),
            (Unpromised, 5, false, 4, false),
            (Unpromised, 5, true, 5, false),
            (resync.clone(), 5, true, 5, true),
            (resync.clone(), 5, true, 4, false),
            (resync.clone(), 0, true, 0, false), // not asked yet
            (resync.clone(), 5, false, 5, false),
            (ckpt.clone(), 5, true, 5, true),
            (ckpt.clone(), 5, false, 5, false),
            (Streaming, 0, true, 0, false),
            (Streaming, 0, false, 0, false),
        ];
        for (state, ask, stream_only, gen, want) in table {
            let mut p = peer(state.clone());
            p.ask = *ask;
            assert_eq!(
                p.expects(*stream_only, *gen),
                *want,
                "{state:?} ask={ask} stream_only={stream_only} gen={gen}"
            );
        }
    }

    #[test]
    fn ask_generation_is_assigned_once() {
        let mut p = peer(PeerState::Unpromised);
        p.ask = 0;
        let mut gen = 10;
        assert_eq!(p.ask(&mut gen), 11);
        assert_eq!(p.ask(&mut gen), 11);
        assert_eq!(gen, 11);
    }

    fn leadership(acks: &[Index]) -> Leadership {
        let peers = acks
            .iter()
            .enumerate()
            .map(|(n, &a)| {
                let mut p = Peer::unpromised(ring(), 0);
                p.acked = a;
                (n as NodeId + 1, p)
            })
            .collect();
        Leadership {
            ballot: Ballot::ZERO,
            peers,
            since: 0,
        }
    }

    /// The former computation: sort all acknowledgements, highest first, take the q-th.
    fn reference(own: Index, twice: bool, acks: &[Index], q: usize) -> Index {
        let mut v: Vec<Index> = std::iter::once(own)
            .chain(twice.then_some(own))
            .chain(acks.iter().copied())
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v[q.max(1) - 1]
    }

    #[test]
    fn quorum_index_table() {
        #[rustfmt::skip]
        let table: &[(Index, bool, &[Index], usize, Index)] = &[
            // (own, counted twice, peers' acks, quorum, index)
            (10, false, &[], 1, 10),
            (10, false, &[4, 7], 2, 7),
            (10, false, &[4, 12], 2, 10),
            (3, false, &[4, 12], 2, 4),
            (10, false, &[0, 0], 2, 0),
            (10, true, &[0, 0], 2, 10), // the planted bug counts the leader twice
            (10, false, &[9, 9, 1, 2], 3, 9),
            (10, false, &[9, 8, 1, 2], 3, 8),
            (5, false, &[9, 8, 7, 6], 3, 7),
            (5, false, &[9, 8, 7, 6], 0, 9), // a short quorum of a single replica
        ];
        for &(own, twice, acks, q, want) in table {
            let l = leadership(acks);
            assert_eq!(
                l.quorum_index(own, twice, q),
                want,
                "{own} {twice} {acks:?} {q}"
            );
            assert_eq!(reference(own, twice, acks, q), want);
        }
    }

    #[test]
    fn quorum_index_matches_a_sort() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        for _ in 0..5000 {
            let n = 1 + (crate::types::xorshift(&mut rng) % crate::MAX_NODES as u64) as usize;
            let acks: Vec<Index> = (1..n)
                .map(|_| crate::types::xorshift(&mut rng) % 8)
                .collect();
            let own = crate::types::xorshift(&mut rng) % 8;
            let twice = crate::types::xorshift(&mut rng).is_multiple_of(4);
            let q = (crate::types::xorshift(&mut rng) % (n as u64 + 1)) as usize;
            let l = leadership(&acks);
            assert_eq!(
                l.quorum_index(own, twice, q),
                reference(own, twice, &acks, q)
            );
        }
    }
}
