//! Recovery from amnesia: rebuilding promise, log and commit from a majority of the others.

use super::action::Action;
use super::config::Durability;
use super::core::{Core, Role};
use super::election::adopt;
use super::log::{Log, Slot};
use super::msg::{Msg, RecoverResp};
use crate::layout;
use crate::types::{Ballot, Index, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Recovery {
    pub(super) nonce: u64,
    pub(super) asked_at: u64,
    /// Per responder, its answer so far.
    pub(super) answers: BTreeMap<NodeId, Answer>,
    /// A majority answered but compacted: the outcome waits for a checkpoint.
    pub(super) pending: Option<Recovered>,
    /// A majority answered, but not the leader they name: since when we wait for it.
    pub(super) waiting_since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Recovered {
    pub(super) promised: Ballot,
    pub(super) commit: Index,
    /// The most compacted answer's base: entries up to it were chosen, but the answers hold
    /// them only in checkpoints. The rebuild must stand on a checkpoint at or past it.
    pub(super) base: Index,
    /// Per index, the value accepted with the highest ballot among the answers.
    pub(super) best: BTreeMap<Index, Slot>,
}

/// One responder's answer to a recovery, pulled chunk by chunk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(super) struct Answer {
    pub(super) promised: Ballot,
    pub(super) commit: Index,
    pub(super) base: Index,
    /// The next index to ask for.
    pub(super) next: Index,
    /// The responder's last index at its first answer: complete once `next` passes it.
    pub(super) target: Index,
    pub(super) done: bool,
    pub(super) entries: Vec<Arc<[u8]>>,
}

impl Recovery {
    /// Drops every answer: the next tick asks everyone again, from the start.
    pub(super) fn ask_again(&mut self) {
        self.answers.clear();
        self.waiting_since = None;
        self.asked_at = 0;
    }
}

impl Answer {
    /// Takes in the next chunk `r` of this responder's answer.
    fn take(&mut self, r: RecoverResp) {
        self.promised = self.promised.max(r.promised);
        // Its commit vouches for the entries it sends, which stop at its log's end when it
        // first answered: a commit learned later may cover values we never get from it
        // (found by the simulator: a rebuild applied another answer's unchosen value).
        self.commit = self.commit.max(r.commit.min(self.target));
        self.base = self.base.max(r.base);
        let last = r
            .entries
            .last()
            .and_then(|e| layout::decode_entry(e).ok())
            .map(|(h, _)| h.index);
        match last {
            Some(last) => self.next = last + 1,
            None => self.done = true, // nothing from `from` on
        }
        self.entries.extend(r.entries);
        self.done |= self.next > self.target;
    }
}

impl Recovered {
    /// What the complete answers of a majority of the others say: the highest promise,
    /// the highest commit, the most compacted base (with its responder, `from` if none),
    /// and per index the highest-ballot value. `None` while the leader the highest
    /// promise names (not `me`) has not answered, if we `wait_for_leader`: it stopped
    /// counting our earlier acknowledgements when it did, and its answer holds whatever
    /// it chose with them (with 5 or more replicas, the others may have answered before
    /// it reached them).
    fn from_answers(
        complete: &[(&NodeId, &Answer)],
        me: NodeId,
        wait_for_leader: bool,
        from: NodeId,
    ) -> Option<(Recovered, NodeId)> {
        let promised = complete
            .iter()
            .map(|a| a.1.promised)
            .max()
            .unwrap_or(Ballot::ZERO);
        let leader = promised.node();
        if promised != Ballot::ZERO
            && leader != me
            && !complete.iter().any(|(&n, _)| n == leader)
            && wait_for_leader
        {
            return None;
        }
        let commit = complete.iter().map(|a| a.1.commit).max().unwrap_or(0);
        let (base, source) = complete
            .iter()
            .map(|(&n, a)| (a.base, n))
            .max()
            .unwrap_or((0, from));
        let best = adopt(
            complete.iter().flat_map(|(_, a)| a.entries.iter()),
            0,
            false,
        );
        let out = Recovered {
            promised,
            commit,
            base,
            best,
        };
        Some((out, source))
    }

    /// Whether the rebuild can stand on a checkpoint at `base` (what is applied): at or
    /// past the most compacted answer (unless `ignore_base`, a planted bug), and the
    /// adopted entries continue it without a gap. Standing on an older checkpoint would
    /// take, for the indexes in between, values of answers that other answers hold only in
    /// their checkpoints: the highest ballot among what is left is not the chosen value
    /// (the rule of phase 1, where a candidate behind an acceptor's base pulls first).
    fn continues(&self, base: Index, ignore_base: bool) -> bool {
        let max = self.best.keys().next_back().copied().unwrap_or(0);
        let above = self.best.range(base + 1..).count() as Index;
        let covered = base >= self.base || ignore_base;
        covered && (max <= base || above == max - base)
    }
}

impl Core {
    /// Amnesia: answer no Prepare and grant no write permission until a majority of the
    /// others has told us their state (`on_recover_resp`).
    pub(super) fn start_recovery(&mut self) {
        let nonce = self.random();
        self.role = Role::Recovering(Recovery {
            nonce,
            asked_at: 0,
            answers: BTreeMap::new(),
            pending: None,
            waiting_since: None,
        });
        self.push(Action::SetWriter(None));
        self.broadcast(Msg::RecoverReq { nonce, from: 1 });
    }

    /// A blank replica was refused by a peer that knew it with a memory: it lost it (a wiped
    /// data dir started without `--rejoin`), so it rebuilds like a rejoining replica.
    /// Asks again, afresh, when the leader the answers named stays silent; otherwise
    /// repeats the request to every replica whose answer is not complete, from where it
    /// is (unless the rebuild waits for a checkpoint).
    pub(super) fn recovery_tick(&mut self) {
        let Role::Recovering(r) = &mut self.role else {
            return;
        };
        let patience = 2 * u64::from(self.cfg.election_timeout);
        if r.waiting_since.is_some_and(|t| self.tick - t > patience) {
            // The leader the answers named is gone: ask everyone again, afresh.
            r.ask_again();
            return;
        }
        if r.pending.is_some()
            || self.tick - r.asked_at < u64::from(self.cfg.heartbeat_timeout / 2).max(1)
        {
            return;
        }
        r.asked_at = self.tick;
        let nonce = r.nonce;
        let others = self.cfg.members.iter().filter(|&&n| n != self.cfg.id);
        let asks: Vec<_> = others
            .map(|&n| (n, r.answers.get(&n)))
            .filter(|(_, a)| a.is_none_or(|a| !a.done))
            .map(|(n, a)| (n, a.map_or(1, |a| a.next)))
            .collect();
        for (to, from) in asks {
            self.push(Action::Send {
                to,
                msg: Msg::RecoverReq { nonce, from },
            });
        }
    }

    pub(super) fn recover_from_blank(&mut self) {
        contract!(
            self.blank != 0,
            "contract: only a blank replica turns to recovery"
        );
        tracing::warn!(
            node = self.cfg.id,
            "this replica has no memory but its peers knew it with one: rebuilding from the others"
        );
        self.role = Role::Follower;
        self.pull = None;
        self.fenced.clear();
        // Whatever it accepted since it booted is dropped: the rebuild takes the others'.
        self.log.truncate_from(self.applied + 1);
        self.commit = self.applied;
        self.received = self.applied;
        if self.cfg.durability == Durability::Durable {
            self.push(Action::BeginRejoin);
        }
        self.start_recovery();
    }

    pub(super) fn on_recover_req(&mut self, to: NodeId, nonce: u64, from: Index) {
        self.assert_from_peer(to);
        if self.is_recovering() {
            return;
        }
        let tick = self.tick;
        match &mut self.role {
            Role::Leader(l) => {
                if let Some(p) = l.peers.get_mut(&to) {
                    if p.recovery_nonce != nonce {
                        // It forgot what it acknowledged: count nothing of its earlier
                        // incarnation from now on (completions in flight are of an old
                        // generation). Our answer, sent after this, holds every entry
                        // that was chosen with its help.
                        // Only an answer to a Prepare sent from now on is taken up. (Two
                        // generations: one ends the old incarnation's, one is asked.)
                        self.write_gen += 2;
                        p.forget(nonce, self.write_gen, tick);
                    }
                }
            }
            // It forgot its promise to us: its vote must not count (it may vote otherwise
            // once rebuilt).
            Role::Candidate(c) => {
                c.promises.remove(&to);
            }
            _ => {}
        }
        // Only a replica in normal status answers (Viewstamped Replication's rule): a
        // leader, or a follower its promised leader has written to. The rebuild waits for
        // the leader of the highest ballot among the answers; an unestablished promise (a
        // candidate that may never win) must not hide the leader that still counts the
        // forgotten incarnation's acknowledgements.
        let normal = match self.role {
            _ if self.cfg.bugs.recovery_answers_unestablished => true,
            Role::Leader(_) => true,
            Role::Follower => self.promised != Ballot::ZERO && self.established == self.promised,
            _ => false,
        };
        if !normal {
            return;
        }
        // One chunk per request: a large log is pulled at the requester's pace and never
        // floods the fabric.
        let mut entries = Vec::new();
        let mut size = 0;
        for (_, s) in self.log.range(from.max(self.log.base() + 1)) {
            if size + s.bytes.len() > self.cfg.message_bytes && !entries.is_empty() {
                break;
            }
            size += s.bytes.len();
            entries.push(s.bytes.clone());
        }
        let r = RecoverResp {
            nonce,
            promised: self.promised,
            commit: self.commit,
            base: self.log.base(),
            from,
            last: self.log.last(),
            entries,
        };
        self.push(Action::Send {
            to,
            msg: Msg::RecoverResp(r),
        });
    }

    pub(super) fn on_recover_resp(&mut self, from: NodeId, r: RecoverResp) {
        self.assert_from_peer(from);
        let Role::Recovering(rec) = &mut self.role else {
            return;
        };
        if r.nonce != rec.nonce || rec.pending.is_some() {
            return;
        }
        let nonce = rec.nonce;
        let a = rec.answers.entry(from).or_insert_with(|| Answer {
            next: 1,
            target: r.last,
            ..Answer::default()
        });
        if a.done || r.from != a.next {
            return; // a duplicate, or an answer to an earlier request
        }
        a.take(r);
        if !a.done {
            let next = a.next;
            self.push(Action::Send {
                to: from,
                msg: Msg::RecoverReq { nonce, from: next },
            });
            return;
        }
        self.try_rebuild(from);
    }

    /// Once a majority of the others answered completely, the leader they name among them:
    /// rebuilds from their answers, after pulling a checkpoint if any answer is compacted
    /// beyond what we hold. `from` answered last.
    fn try_rebuild(&mut self, from: NodeId) {
        // A majority of the *other* replicas: their promises cover any promise we made
        // before we forgot it, and their logs (or checkpoints) cover anything chosen with
        // our help.
        let others = self.cfg.members.len() - 1;
        let need = (others / 2 + 1).min(others) - usize::from(self.cfg.bugs.recovery_short_quorum);
        let (me, tick, applied) = (self.cfg.id, self.tick, self.applied);
        let wait_for_leader = !self.cfg.bugs.recovery_no_leader_wait;
        let Role::Recovering(rec) = &mut self.role else {
            return;
        };
        let complete: Vec<_> = rec.answers.iter().filter(|(_, a)| a.done).collect();
        if complete.len() < need {
            return;
        }
        let Some((out, source)) = Recovered::from_answers(&complete, me, wait_for_leader, from)
        else {
            rec.waiting_since.get_or_insert(tick);
            return;
        };
        if out.base <= applied {
            // No answer is compacted beyond what we hold (nothing, or a checkpoint this
            // rebuild installed already).
            self.try_finish_recovery(out);
        } else {
            // Entries up to `base` exist only in checkpoints: fetch one first.
            rec.pending = Some(out);
            self.start_pull(source);
        }
    }

    /// Finishes the rebuild on top of what is applied (0, or an installed checkpoint) if
    /// the answers' entries continue it without a gap; otherwise asks everyone again. (A
    /// checkpoint pulled from another source than the most compacted answer may be older
    /// than that answer's base.)
    pub(super) fn try_finish_recovery(&mut self, out: Recovered) {
        let base = self.applied;
        if out.continues(base, self.cfg.bugs.recovery_ignores_base) {
            self.finish_recovery(out, base);
        } else if let Role::Recovering(r) = &mut self.role {
            r.ask_again();
        }
    }

    /// Takes the recovered state as this replica's own, on top of checkpoint `base`.
    pub(super) fn finish_recovery(&mut self, r: Recovered, base: Index) {
        self.role = Role::Follower;
        let mut log = Log::with_base(base);
        for (i, slot) in r.best.into_iter().filter(|(i, _)| *i > base) {
            if i != log.last() + 1 {
                break; // logs are contiguous after their base; a gap would mean a bad answer
            }
            log.put(i, slot);
        }
        self.log = log;
        // A replica that turned to recovery from blank keeps what it promised meanwhile.
        self.promised = r.promised.max(self.promised);
        self.max_seen = self.max_seen.max(self.promised);
        self.commit = r.commit.min(self.log.last()).max(base);
        self.applied = self.applied.max(base);
        self.received = self.commit;
        self.quiet = 0;
        self.answered = 0;
        self.blank = 0; // rebuilt: it remembers again
        self.known_incomplete = true;
        if self.cfg.durability == Durability::Durable {
            // A replica that lost its disk: the rebuilt promise and log become durable
            // before it acknowledges anything (persisted starts at the checkpoint).
            self.push(Action::PersistPromise(self.promise_record()));
            self.persisted = base;
            if self.log.last() > base {
                self.persist_from = Some(base + 1);
            }
            self.rejoin_target = Some(self.log.last());
            self.check_rejoined();
        } else {
            self.persisted = self.received;
        }
        self.apply_committed();
        self.rejoin_leader();
    }

    pub(super) fn check_rejoined(&mut self) {
        if self.rejoin_target.is_some_and(|t| self.persisted >= t) {
            self.rejoin_target = None;
            self.push(Action::Rejoined);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::EntryHeader;

    fn recovered(base: Index, indexes: &[Index]) -> Recovered {
        let best = indexes
            .iter()
            .map(|&i| {
                let h = EntryHeader {
                    index: i,
                    ballot: Ballot::new(1, 0),
                    commit: 0,
                    len: 0,
                    flags: 0,
                };
                (i, Slot::encode(&h, &[]))
            })
            .collect();
        Recovered {
            promised: Ballot::new(1, 0),
            commit: 0,
            base,
            best,
        }
    }

    #[test]
    fn a_rebuild_stands_on_a_checkpoint_at_or_past_the_most_compacted_answer() {
        #[rustfmt::skip]
        let table: &[(Index, &[Index], Index, bool, bool)] = &[
            // (answers' base, adopted indexes, our checkpoint, ignore base (bug), stands)
            (0, &[], 0, false, true),
            (0, &[1, 2, 3], 0, false, true),
            (0, &[1, 3], 0, false, false), // a gap
            (5, &[6, 7], 5, false, true),
            (5, &[6, 7], 7, false, true), // a newer checkpoint covers them
            (5, &[6, 7], 9, false, true),
            (5, &[3, 4, 5, 6, 7], 2, false, false), // older than the most compacted answer
            (5, &[3, 4, 5, 6, 7], 2, true, true),   // the planted bug takes them
            (5, &[6, 8], 5, false, false),       // a gap after the checkpoint
            (5, &[7, 8], 5, false, false),       // a gap right after it
            (5, &[2, 3, 6, 7], 5, false, true),  // entries below it do not matter
        ];
        for &(base, indexes, at, ignore, want) in table {
            let r = recovered(base, indexes);
            assert_eq!(
                r.continues(at, ignore),
                want,
                "base {base} {indexes:?} at {at}"
            );
        }
    }

    fn answer(promised: Ballot, commit: Index, base: Index) -> Answer {
        Answer {
            promised,
            commit,
            base,
            done: true,
            ..Answer::default()
        }
    }

    #[test]
    fn a_rebuild_waits_for_the_leader_the_answers_name() {
        let (b1, b2) = (Ballot::new(1, 1), Ballot::new(2, 2));
        let a1 = answer(b1, 3, 0);
        let a2 = answer(b2, 5, 4);
        // Node 2 leads (highest promise) and answered: rebuild.
        let (r, source) = Recovered::from_answers(&[(&1, &a1), (&2, &a2)], 0, true, 1).unwrap();
        assert_eq!((r.promised, r.commit, r.base, source), (b2, 5, 4, 2));
        // Node 2 did not answer: wait, unless the planted bug says not to.
        let a3 = answer(b2, 5, 0);
        assert!(Recovered::from_answers(&[(&1, &a1), (&3, &a3)], 0, true, 1).is_none());
        assert!(Recovered::from_answers(&[(&1, &a1), (&3, &a3)], 0, false, 1).is_some());
        // Our own ballot names no one to wait for.
        let a4 = answer(Ballot::new(3, 0), 0, 0);
        assert!(Recovered::from_answers(&[(&4, &a4)], 0, true, 4).is_some());
        // No promise anywhere: nothing to wait for; the source defaults to `from`.
        let z = answer(Ballot::ZERO, 0, 0);
        let (_, source) = Recovered::from_answers(&[], 0, true, 3).unwrap();
        assert_eq!(source, 3);
        assert!(Recovered::from_answers(&[(&1, &z)], 0, true, 1).is_some());
    }
}
