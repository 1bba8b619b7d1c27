//! The acceptor: promises, streams and blank votes.

use super::action::Action;
use super::config::Durability;
use super::core::{Core, Fenced, Role};
use super::msg::{self, Msg, Promise};
use crate::types::{Ballot, Index, NodeId};
use std::sync::Arc;

impl Core {
    /// Records what a message of `from` says of its memory; false if it is a blank vote
    /// of a replica we knew otherwise (it lost its memory: its vote must not count).
    pub(super) fn admit_vote(&mut self, from: NodeId, blank: u64) -> bool {
        let refuse = match self.known.get(&from) {
            Some(&k) => blank != 0 && k != blank,
            None => blank != 0 && self.known_incomplete,
        };
        if refuse && !self.cfg.bugs.accept_blank_votes {
            return false;
        }
        self.known.insert(from, blank);
        true
    }

    pub(super) fn on_prepare(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        idx: Index,
        blank: u64,
        gen: u64,
    ) {
        self.assert_from_peer(from);
        if self.is_recovering() {
            return; // amnesia: no answer until recovered
        }
        if !self.admit_vote(from, blank) {
            // The candidate has no memory of its own votes: it must rebuild first.
            self.send_nack(from, false, true);
            return;
        }
        self.max_seen = self.max_seen.max(ballot);
        let below = ballot < self.promised && !self.cfg.bugs.ignore_promise;
        if below || ballot.node() != from {
            self.send_nack(from, false, false);
            return;
        }
        if ballot == self.promised {
            // A repeated Prepare. From our leader asking anew (it lost track of us and has
            // nothing in flight it counts): a new stream. Otherwise (a late duplicate, or a
            // candidate repeating itself): the same answer on the same stream, or none.
            if gen > self.answered || self.cfg.bugs.restart_stale_stream {
                self.answered = gen;
                self.start_stream(from);
            } else if gen < self.answered {
                return;
            }
            self.send_promise(from, ballot, idx);
            return;
        }
        if self.leader_alive() && self.leader_hint() != Some(from) {
            self.send_nack(from, true, false);
            return;
        }
        self.fenced.push_back(Fenced::Promise {
            to: from,
            ballot,
            from: idx,
            gen,
        });
        self.push(Action::FenceAndDrain);
    }

    pub(super) fn promise(&mut self, to: NodeId, ballot: Ballot, from: Index, gen: u64) {
        // Re-check: the drain or other events may have changed things since the request.
        if ballot <= self.promised && !self.cfg.bugs.ignore_promise {
            return;
        }
        if matches!(self.role, Role::Leader(_) | Role::Candidate(_)) {
            self.step_down();
        }
        if !self.cfg.bugs.ignore_promise {
            contract!(
                ballot > self.promised,
                "contract: a promise is never broken"
            );
        }
        self.promised = ballot;
        self.max_seen = self.max_seen.max(ballot);
        if self.cfg.durability == Durability::Durable {
            self.push(Action::PersistPromise(self.promise_record()));
        }
        self.quiet = 0;
        self.hb_seen = 0;
        // A pull begun before (as a candidate) would install and restart the stream we
        // start now behind the new leader's back: that leader tells us if we need one.
        self.pull = None;
        self.answered = gen; // a new leader's generations
        self.start_stream(to);
        self.send_promise(to, ballot, from);
    }

    /// Starts a new ring stream for leader `to`: from slot 0, from `received + 1`.
    pub(super) fn start_stream(&mut self, to: NodeId) {
        self.received = self.commit;
        self.stream = self.stream.wrapping_add(1);
        self.consumed = 0;
        self.push(Action::ResetRing {
            ballot: self.promised,
            expect: self.received + 1,
        });
        self.push(Action::SetWriter(Some(to)));
    }

    pub(super) fn send_nack(&mut self, to: NodeId, leader_alive: bool, recover: bool) {
        let msg = Msg::Nack {
            promised: self.promised,
            leader_alive,
            recover,
        };
        self.push(Action::Send { to, msg });
    }

    pub(super) fn send_promise(&mut self, to: NodeId, ballot: Ballot, from: Index) {
        let entries: Vec<_> = self.log.range(from).map(|(_, s)| s.bytes.clone()).collect();
        let chunks = msg::chunk_entries(entries, self.cfg.message_bytes);
        let n = chunks.len() as u32;
        for (k, entries) in chunks.into_iter().enumerate() {
            let p = self.promise_now(ballot, from, k as u32, n, entries);
            self.push(Action::Send {
                to,
                msg: Msg::Promise(p),
            });
        }
    }

    /// This acceptor's promise as it stands now, carrying one chunk of its log.
    fn promise_now(
        &self,
        ballot: Ballot,
        from: Index,
        chunk: u32,
        chunks: u32,
        entries: Vec<Arc<[u8]>>,
    ) -> Promise {
        Promise {
            ballot,
            from,
            stream: self.stream,
            received: self.received,
            consumed: self.consumed,
            persisted: self.reported_persisted(),
            commit: self.commit,
            base: self.log.base(),
            chunk,
            chunks,
            blank: self.blank,
            gen: self.answered,
            entries,
        }
    }

    pub(super) fn on_resync(&mut self, from: NodeId, ballot: Ballot, gen: u64) {
        self.assert_from_peer(from);
        if ballot < self.promised {
            self.send_nack(from, false, false);
            return;
        }
        if ballot != self.promised || ballot.node() != from || self.is_leader() {
            return;
        }
        if gen > self.answered || self.cfg.bugs.restart_stale_stream {
            // The leader asks only once none of its writes to us is in flight, and the
            // driver drained the ring before handing us this message: nothing the leader
            // counted is lost by restarting. A Resync of a generation we answered already
            // is a late duplicate: restarting on it would abandon a stream the leader may
            // be writing now.
            self.answered = gen;
            self.start_stream(from);
            self.send_promise_header(from);
        } else if gen == self.answered {
            // Our answer was lost; the leader has written nothing since it asked.
            self.send_promise_header(from);
        }
    }

    /// A promise without entries: "stream to me from `received + 1`".
    pub(super) fn send_promise_header(&mut self, to: NodeId) {
        let p = self.promise_now(self.promised, msg::STREAM_ONLY, 0, 1, vec![]);
        self.push(Action::Send {
            to,
            msg: Msg::Promise(p),
        });
    }

    pub(super) fn rejoin_leader(&mut self) {
        if self.promised != Ballot::ZERO && self.promised.node() != self.cfg.id {
            let l = self.promised.node();
            self.start_stream(l);
            self.send_promise_header(l);
        }
    }
}
