//! Failure detection, candidacy, phase 1 and adoption.

use super::action::{Action, ProposeError, Token};
use super::config::Durability;
use super::core::{Core, Fenced, Role};
use super::log::Slot;
use super::msg::{Msg, Promise};
use super::tracker::{Leadership, Peer, StreamAt};
use crate::layout::{self, flags, EntryHeader};
use crate::types::{Ballot, Index, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(super) struct Chunks {
    pub(super) chunks: u32,
    pub(super) got: BTreeMap<u32, Vec<Arc<[u8]>>>,
    pub(super) header: Option<StreamAt>,
}

impl Chunks {
    fn add(&mut self, chunk: u32, chunks: u32, entries: Vec<Arc<[u8]>>) {
        if self.chunks != chunks {
            *self = Chunks {
                chunks,
                ..Default::default()
            };
        }
        self.got.insert(chunk, entries);
    }
    fn complete(&self) -> bool {
        self.chunks > 0 && self.got.len() == self.chunks as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Candidacy {
    pub(super) ballot: Ballot,
    pub(super) from: Index,
    pub(super) started: u64,
    pub(super) last_prepare: u64,
    /// Per acceptor: stream/received/persisted (in `header`) and entries, possibly chunked.
    pub(super) promises: BTreeMap<NodeId, Chunks>,
}

impl Core {
    pub(super) fn follower_tick(&mut self) {
        self.quiet = self.quiet.saturating_add(1);
        // Refresh the progress cell now and then, so a leader that missed a report (or
        // restarted its view of us) regains flow-control credit.
        if self
            .tick
            .is_multiple_of(u64::from(self.cfg.heartbeat_timeout / 4).max(1))
        {
            self.progress_dirty = true;
        }
        if let Some(l) = self.leader_hint() {
            self.push(Action::Read {
                peer: l,
                offset: layout::HEARTBEAT_OFFSET,
                len: 8,
                token: Token::HEARTBEAT,
            });
        }
        // A replica pulling a checkpoint is behind: it does not stand until it has it.
        if self.quiet >= self.candidacy_delay() && self.pull.is_none() {
            self.quiet = 0;
            self.backoff = 0;
            self.fenced.push_back(Fenced::Candidacy);
            self.push(Action::FenceAndDrain);
        }
    }

    /// Ticks of silence before this replica stands: the timeout, then its turn in a fixed
    /// order starting after the suspected leader, plus a random back-off after failures.
    /// A candidate gives up when its election times out, and asks those that have not
    /// promised again every quarter of it.
    pub(super) fn candidate_tick(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        let (started, last) = (c.started, c.last_prepare);
        if self.tick - started > u64::from(self.cfg.election_timeout) {
            self.give_up_candidacy();
        } else if self.tick - last >= u64::from(self.cfg.election_timeout / 4).max(1) {
            self.resend_prepares();
        }
    }

    pub(super) fn candidacy_delay(&self) -> u32 {
        let n = self.cfg.members.len();
        let pos = |x: NodeId| self.cfg.members.iter().position(|&m| m == x).unwrap_or(0);
        let me = pos(self.cfg.id);
        let rank = if self.promised == Ballot::ZERO {
            me
        } else {
            (me + n - pos(self.promised.node()) - 1) % n
        };
        self.cfg.heartbeat_timeout
            + rank as u32 * (self.cfg.heartbeat_timeout / 2).max(1)
            + self.backoff
    }

    pub(super) fn leader_alive(&self) -> bool {
        match &self.role {
            Role::Leader(l) => {
                l.quorum_contact(self.tick, self.cfg.heartbeat_timeout, self.cfg.majority())
            }
            Role::Follower => {
                self.leader_hint().is_some() && self.quiet < self.cfg.heartbeat_timeout
            }
            _ => false,
        }
    }

    pub(super) fn start_candidacy(&mut self) {
        if self.is_leader() || self.is_recovering() || self.pull.is_some() {
            return;
        }
        let blank = self.blank;
        let ballot = self.promised.max(self.max_seen).next_for(self.cfg.id);
        self.promised = ballot;
        self.max_seen = ballot;
        if self.cfg.durability == Durability::Durable {
            self.push(Action::PersistPromise(self.promise_record()));
        }
        self.received = self.commit;
        self.stream = self.stream.wrapping_add(1);
        let from = self.commit + 1;
        let mut promises = BTreeMap::new();
        let own: Vec<_> = self.log.range(from).map(|(_, s)| s.bytes.clone()).collect();
        promises.insert(
            self.cfg.id,
            Chunks {
                chunks: 1,
                got: BTreeMap::from([(0, own)]),
                header: Some(StreamAt {
                    stream: self.stream,
                    received: self.commit,
                    persisted: self.reported_persisted(),
                    consumed: 0,
                }),
            },
        );
        self.role = Role::Candidate(Candidacy {
            ballot,
            from,
            started: self.tick,
            last_prepare: self.tick,
            promises,
        });
        self.broadcast(Msg::Prepare {
            ballot,
            from,
            blank,
            gen: 0,
        });
        self.try_win();
    }

    pub(super) fn resend_prepares(&mut self) {
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        c.last_prepare = self.tick;
        let (ballot, from, blank) = (c.ballot, c.from, self.blank);
        let missing: Vec<_> = self
            .cfg
            .members
            .iter()
            .copied()
            .filter(|n| c.promises.get(n).is_none_or(|p| !p.complete()))
            .collect();
        for to in missing {
            self.push(Action::Send {
                to,
                msg: Msg::Prepare {
                    ballot,
                    from,
                    blank,
                    gen: 0,
                },
            });
        }
    }

    pub(super) fn give_up_candidacy(&mut self) {
        self.role = Role::Follower;
        self.quiet = 0;
        self.backoff = (self.random() % u64::from(self.cfg.heartbeat_timeout).max(1)) as u32;
    }

    pub(super) fn step_down(&mut self) {
        if let Role::Leader(_) = self.role {
            // Queued commands never entered the log: they definitely failed.
            for ticket in self.queue.take_tickets() {
                let error = ProposeError::NotLeader { leader: None };
                self.push(Action::Reject { ticket, error });
            }
            self.push(Action::LeadershipLost);
        }
        self.role = Role::Follower;
        self.quiet = 0;
        self.backoff = (self.random() % u64::from(self.cfg.heartbeat_timeout).max(1)) as u32;
    }

    pub(super) fn on_nack(&mut self, promised: Ballot, leader_alive: bool, recover: bool) {
        contract!(
            !(leader_alive && recover),
            "contract: a refusal says 'leader alive' or 'rebuild', not both"
        );
        if recover && self.blank != 0 && matches!(self.role, Role::Follower | Role::Candidate(_)) {
            self.recover_from_blank();
            return;
        }
        self.max_seen = self.max_seen.max(promised);
        let mine = match &self.role {
            Role::Candidate(c) => c.ballot,
            Role::Leader(l) => l.ballot,
            _ => return,
        };
        // A "leader alive" refusal is not a verdict: the candidate keeps asking until its
        // election times out, by when the refusers may have noticed the silence too.
        let _ = leader_alive;
        if promised > mine {
            self.step_down();
        }
    }

    pub(super) fn on_promise(&mut self, from: NodeId, p: Promise) {
        self.assert_from_peer(from);
        contract!(
            p.chunk < p.chunks,
            "contract: a promise's chunk is one of its chunks (the decoder checks)"
        );
        if matches!(self.role, Role::Candidate(_) | Role::Leader(_))
            && !self.admit_vote(from, p.blank)
        {
            // A voter that forgot its promises: it must rebuild first.
            self.send_nack(from, false, true);
            return;
        }
        match &mut self.role {
            // Only an answer to our Prepare reports what the acceptor accepted; a stream-only
            // promise (a restarted replica rejoining) does not count towards phase 1.
            Role::Candidate(c) if p.ballot == c.ballot && p.from == c.from => {
                if compacted_past(p.base, c.from) && !self.cfg.bugs.phase1_ignores_base {
                    // The acceptor compacted entries we would have to adopt: they are chosen,
                    // but only its checkpoint holds them. Catch up first, stand later.
                    self.give_up_candidacy();
                    self.start_pull(from);
                    return;
                }
                let e = c.promises.entry(from).or_default();
                let at = StreamAt::of(&p);
                e.add(p.chunk, p.chunks, p.entries);
                e.header = Some(at);
                self.try_win();
            }
            Role::Leader(l) if p.ballot == l.ballot => self.take_up_stream(from, &p),
            _ => {}
        }
    }

    /// Whether complete promises from a majority (ourselves included) are in.
    fn phase1_quorum(&self, c: &Candidacy) -> bool {
        let done = c.promises.values().filter(|p| p.complete()).count();
        let need = if self.cfg.bugs.short_quorum {
            self.cfg.majority() - 1
        } else {
            self.cfg.majority()
        };
        done >= need
    }

    /// Leads once a majority has promised: adopts their values, then streams to everyone.
    pub(super) fn try_win(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        if !self.phase1_quorum(c) {
            return;
        }
        let Role::Candidate(c) = std::mem::replace(&mut self.role, Role::Follower) else {
            unreachable!()
        };
        let entries = c
            .promises
            .values()
            .filter(|p| p.complete())
            .flat_map(|p| p.got.values().flatten());
        let best = adopt(entries, c.from, self.cfg.bugs.adopt_lowest_ballot);
        self.take_adopted(c.ballot, c.from, &best);
        self.lead(c);
    }

    /// Makes the adopted values ours: re-stamped with our `ballot` at every index from
    /// `from` to the highest adopted one, no-ops in the gaps; nothing after.
    fn take_adopted(&mut self, ballot: Ballot, from: Index, best: &BTreeMap<Index, Slot>) {
        let end = best
            .keys()
            .next_back()
            .copied()
            .unwrap_or(from - 1)
            .max(from - 1);
        for i in from..=end {
            let slot = match best.get(&i) {
                Some(s) => s.restamp(i, ballot, self.commit),
                None => {
                    let h = EntryHeader {
                        index: i,
                        ballot,
                        commit: self.commit,
                        len: 0,
                        flags: flags::NOOP,
                    };
                    Slot::encode(&h, &[])
                }
            };
            self.accept(i, slot);
        }
        self.log.truncate_from(end + 1);
        self.received = end;
    }

    /// Becomes the leader of candidacy `c`: every peer that promised streams from what
    /// it reported; the others are asked again.
    fn lead(&mut self, c: Candidacy) {
        let ballot = c.ballot;
        let durable = self.cfg.durability == Durability::Durable;
        let mut peers = BTreeMap::new();
        for n in self.others().collect::<Vec<_>>() {
            let mut peer = Peer::unpromised(self.cfg.ring, self.tick);
            if let Some(p) = c.promises.get(&n).filter(|p| p.complete()) {
                let at = p.header.expect("complete promise has a header");
                self.write_gen += 1;
                peer.restart(at, durable, self.tick, self.cfg.ring, self.write_gen);
            }
            peers.insert(n, peer);
        }
        self.establish();
        self.role = Role::Leader(Leadership {
            ballot,
            peers,
            since: self.tick,
        });
        self.push(Action::BecameLeader(ballot));
        self.heartbeat += 1;
        self.push(Action::Heartbeat(self.heartbeat));
        self.advance_commit();
    }
}

/// Adoption: per index from `from` on, the value accepted with the highest ballot among
/// `entries` (encoded slots of several acceptors; on a tie the first one seen). With
/// `lowest` (a planted bug) the lowest ballot wins instead. Undecodable entries are
/// skipped. Phase 1 adopts from the entries of a majority of complete promises; recovery
/// (`from` 0) from the answers of a majority of the others.
pub(super) fn adopt<'a>(
    entries: impl Iterator<Item = &'a Arc<[u8]>>,
    from: Index,
    lowest: bool,
) -> BTreeMap<Index, Slot> {
    let mut best: BTreeMap<Index, Slot> = BTreeMap::new();
    for bytes in entries {
        let Ok((i, slot)) = Slot::from_encoded(bytes.clone()) else {
            continue;
        };
        if i < from {
            continue;
        }
        let higher = |b: &Slot| match lowest {
            false => slot.ballot > b.ballot,
            true => slot.ballot < b.ballot,
        };
        if best.get(&i).is_none_or(higher) {
            best.insert(i, slot);
        }
    }
    best
}

/// A candidate must not adopt from an acceptor whose log is compacted at or past the
/// Prepare's `from`: the entries it would have to report are chosen, but only its
/// checkpoint holds them. The candidate pulls that checkpoint first.
pub(super) fn compacted_past(acceptor_base: Index, from: Index) -> bool {
    acceptor_base >= from
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoded entry at `index`, accepted with ballot `(round, 0)`, carrying `value`.
    fn entry(index: Index, round: u64, value: &str) -> Arc<[u8]> {
        let h = EntryHeader {
            index,
            ballot: Ballot::new(round, 0),
            commit: 0,
            len: value.len() as u32,
            flags: 0,
        };
        Slot::encode(&h, value.as_bytes()).bytes
    }

    /// `(index, value)` per adopted index.
    fn adopted(
        acceptors: &[&[(Index, u64, &str)]],
        from: Index,
        lowest: bool,
    ) -> Vec<(Index, String)> {
        let logs: Vec<Vec<Arc<[u8]>>> = acceptors
            .iter()
            .map(|a| a.iter().map(|&(i, r, v)| entry(i, r, v)).collect())
            .collect();
        adopt(logs.iter().flatten(), from, lowest)
            .into_iter()
            .map(|(i, s)| (i, String::from_utf8(s.payload().to_vec()).unwrap()))
            .collect()
    }

    type Case<'a> = (
        &'a str,
        &'a [&'a [(Index, u64, &'a str)]],
        Index,
        &'a [(Index, &'a str)],
    );

    #[test]
    fn adoption_takes_the_highest_ballot_per_index() {
        #[rustfmt::skip]
        let table: &[Case] = &[
            ("nothing accepted", &[&[], &[]], 1, &[]),
            ("one acceptor", &[&[(1, 1, "a"), (2, 1, "b")], &[]], 1, &[(1, "a"), (2, "b")]),
            ("higher ballot wins", &[&[(1, 1, "a")], &[(1, 2, "b")]], 1, &[(1, "b")]),
            ("in any order", &[&[(1, 2, "b")], &[(1, 1, "a")]], 1, &[(1, "b")]),
            ("per index", &[&[(1, 3, "a"), (2, 1, "x")], &[(1, 2, "b"), (2, 2, "y")]], 1,
                &[(1, "a"), (2, "y")]),
            ("a tie keeps the first seen", &[&[(1, 2, "a")], &[(1, 2, "b")]], 1, &[(1, "a")]),
            ("gaps stay gaps", &[&[(1, 1, "a"), (3, 1, "c")], &[(5, 1, "e")]], 1,
                &[(1, "a"), (3, "c"), (5, "e")]),
            ("below `from` is ignored", &[&[(1, 9, "old"), (2, 1, "b")], &[(2, 2, "c")]], 2,
                &[(2, "c")]),
            ("a longer log extends", &[&[(4, 1, "d")], &[(4, 2, "D"), (5, 1, "e")]], 4,
                &[(4, "D"), (5, "e")]),
            // An acceptor that compacted up to 5 answers from 6 on: what it compacted is not
            // in its answer, so a lower ballot from another acceptor stands at 4 and 5 (which
            // is why a candidate whose `from` such an acceptor compacted pulls first).
            ("a compacted acceptor holds nothing below its base",
                &[&[(6, 3, "f")], &[(4, 1, "d"), (5, 1, "e"), (6, 1, "x")]], 4,
                &[(4, "d"), (5, "e"), (6, "f")]),
            // Recovery adopts from index 0 on: everything the answers hold.
            ("recovery takes every index", &[&[(1, 1, "a")], &[(2, 1, "b")]], 0,
                &[(1, "a"), (2, "b")]),
        ];
        for (name, acceptors, from, want) in table {
            let want: Vec<_> = want.iter().map(|&(i, v)| (i, v.to_string())).collect();
            assert_eq!(adopted(acceptors, *from, false), want, "{name}");
        }
    }

    #[test]
    fn planted_lowest_ballot_adopts_the_lowest() {
        let logs: &[&[(Index, u64, &str)]] =
            &[&[(1, 1, "a"), (2, 3, "x")], &[(1, 2, "b"), (2, 2, "y")]];
        let want = vec![(1, "a".to_string()), (2, "y".to_string())];
        assert_eq!(adopted(logs, 1, true), want);
    }

    #[test]
    fn undecodable_entries_are_skipped() {
        let bad: Arc<[u8]> = Arc::from(&b"not an entry"[..]);
        let good = entry(1, 1, "a");
        let best = adopt([bad, good].iter(), 1, false);
        assert_eq!(best.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_candidate_pulls_first_from_an_acceptor_compacted_past_from() {
        #[rustfmt::skip]
        let table: &[(Index, Index, bool)] = &[
            // (acceptor's base, Prepare's from, pull first)
            (0, 1, false),
            (4, 6, false),
            (5, 6, false),
            (6, 6, true), // it compacted `from` itself
            (9, 6, true),
        ];
        for &(base, from, want) in table {
            assert_eq!(compacted_past(base, from), want, "base {base} from {from}");
        }
    }
}
