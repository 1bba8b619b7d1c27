//! The leader's phase 2: batching, streaming entries to followers, completions and the
//! commit index.

use super::action::{Action, Data, Token, TokenKind};
use super::batch;
use super::config::Durability;
use super::core::{Core, Role};
use super::log::{Log, Slot};
use super::msg::{self, Msg, Promise};
use super::tracker::{Peer, PeerState, StreamAt};
use crate::fabric::FabricError;
use crate::layout::{self, flags, CommitCell, EntryHeader, RingGeometry};
use crate::types::{Ballot, Index, NodeId};
use std::collections::VecDeque;
use std::sync::Arc;

impl Core {
    pub(super) fn leader_tick(&mut self) {
        self.heartbeat += 1;
        self.push(Action::Heartbeat(self.heartbeat));
        let Role::Leader(l) = &self.role else { return };
        if !l.quorum_contact(self.tick, self.cfg.heartbeat_timeout, self.cfg.majority()) {
            self.step_down();
            return;
        }
        let (ballot, from) = (l.ballot, self.commit + 1);
        let tick = self.tick;
        let every = u64::from(self.cfg.heartbeat_timeout / 4).max(1);
        let mut sends = Vec::new();
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        for (&n, p) in l.peers.iter_mut() {
            match p.state {
                PeerState::Unpromised if tick - p.prepare_sent_at >= every => {
                    p.prepare_sent_at = tick;
                    let gen = p.ask(&mut self.write_gen);
                    sends.push((
                        n,
                        Msg::Prepare {
                            ballot,
                            from,
                            blank: 0,
                            gen,
                        },
                    ));
                }
                PeerState::Resyncing { asked_at }
                    if p.outstanding == 0 && asked_at.is_none_or(|t| tick - t >= every) =>
                {
                    p.asked_at(tick);
                    let gen = p.ask(&mut self.write_gen);
                    sends.push((n, Msg::Resync { ballot, gen }));
                }
                PeerState::NeedsCheckpoint { asked_at }
                    if asked_at.is_none_or(|t| tick - t >= every) =>
                {
                    p.asked_at(tick);
                    let gen = p.ask(&mut self.write_gen);
                    sends.push((n, Msg::NeedCheckpoint { ballot, gen }));
                }
                _ => {}
            }
        }
        for (to, msg) in sends {
            self.push(Action::Send { to, msg });
        }
    }

    /// A follower promised our ballot (a phase-1 answer, or a stream-only promise): take
    /// up its stream if this is the answer we wait for. Anything else is a duplicate or
    /// stale, or (a follower that restarted on its own) is asked again.
    pub(super) fn take_up_stream(&mut self, from: NodeId, p: &Promise) {
        let durable = self.cfg.durability == Durability::Durable;
        let tick = self.tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let peer = l.peers.get_mut(&from).expect("members have peer state");
        if !peer.expects(p.from == msg::STREAM_ONLY, p.gen) {
            if peer.stream != p.stream {
                peer.stream_lost();
            }
            return;
        }
        if peer.outstanding > 0 {
            // Writes of the old stream are in flight; they must finish first.
            peer.resync();
            return;
        }
        self.write_gen += 1;
        peer.restart(
            StreamAt::of(p),
            durable,
            tick,
            self.cfg.ring,
            self.write_gen,
        );
    }

    /// Forms entries from queued commands and streams the log to every follower.
    pub(super) fn replicate(&mut self) {
        let Role::Leader(l) = &self.role else { return };
        let ballot = l.ballot;
        self.form_entries(ballot);
        let step = Step {
            ballot,
            last: self.log.last(),
            commit: self.commit,
            tick: self.tick,
            every: u64::from(self.cfg.heartbeat_timeout / 4).max(1),
            geo: self.cfg.ring,
            max_out: self.cfg.max_outstanding,
        };
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        for (&n, p) in l.peers.iter_mut() {
            if p.next <= self.log.base() {
                // What it needs next is only in our checkpoint.
                p.compacted_past();
            }
            let catching_up = matches!(p.state, PeerState::NeedsCheckpoint { .. });
            if !p.is_streaming() && !catching_up {
                continue;
            }
            if !catching_up {
                step.write_entries(n, p, &mut self.log, &mut self.actions);
            }
            step.write_commit_cell(n, p, catching_up, &mut self.actions);
        }
        self.advance_commit();
    }

    /// Adaptive batching: packs whatever is queued into entries of `ballot`, while the
    /// window has room.
    fn form_entries(&mut self, ballot: Ballot) {
        while !self.queue.is_empty() && self.log.last() - self.commit < self.cfg.window {
            // The commands that fit (at least one), and their payload bytes.
            let (mut n, mut len) = (0, 0);
            for (_, cmd) in self.queue.iter() {
                let add = batch::COMMAND_OVERHEAD + cmd.len();
                if n > 0 && len + add > self.cfg.batch_bytes {
                    break;
                }
                (n, len) = (n + 1, len + add);
            }
            // The entry is built once, in place, in its exact-size shared buffer (one
            // allocation, zeroed: the padding must be), and kept and sent without a copy.
            let mut bytes: Arc<[u8]> = std::iter::repeat_n(0u8, layout::entry_size(len)).collect();
            let buf = Arc::get_mut(&mut bytes).expect("not shared yet");
            let mut at = layout::ENTRY_HEADER_SIZE;
            let id = self.cfg.id;
            self.queue.pop_each(n, |ticket, cmd| {
                at += batch::write(&mut buf[at..], batch::origin(id, ticket), cmd);
            });
            let i = self.log.last() + 1;
            let h = EntryHeader {
                index: i,
                ballot,
                commit: self.commit,
                len: len as u32,
                flags: 0,
            };
            layout::seal_entry_in_place(buf, &h);
            self.accept(
                i,
                Slot {
                    ballot,
                    flags: 0,
                    bytes,
                },
            );
            self.received = i;
        }
    }

    pub(super) fn on_write_done(
        &mut self,
        peer: NodeId,
        token: Token,
        result: Result<(), FabricError>,
    ) {
        let volatile = self.cfg.durability == Durability::Volatile;
        let tick = self.tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(p) = l.peers.get_mut(&peer) else {
            return;
        };
        if token.gen() != p.gen & 0xffff {
            // A completion from an earlier stream: nothing to count.
            if result == Err(FabricError::PermissionDenied(peer)) {
                self.step_down();
            }
            return;
        }
        p.outstanding = p.outstanding.saturating_sub(1);
        match result {
            Ok(()) => {
                p.last_contact = tick;
                let idx = token.index();
                if volatile && token.kind() == Some(TokenKind::Entry) && p.is_streaming() {
                    p.acked = p.acked.max(idx);
                    self.advance_commit();
                }
            }
            Err(FabricError::PermissionDenied(_)) => self.step_down(),
            Err(_) => p.stream_lost(),
        }
    }

    pub(super) fn advance_commit(&mut self) {
        let Role::Leader(l) = &self.role else { return };
        let own = match self.cfg.durability {
            Durability::Volatile => self.log.last(),
            Durability::Durable => self.persisted.min(self.log.last()),
        };
        let q = if self.cfg.bugs.short_quorum {
            self.cfg.majority() - 1
        } else {
            self.cfg.majority()
        };
        let mut chosen = l.quorum_index(own, self.cfg.bugs.self_counted_twice, q);
        if self.cfg.bugs.commit_off_by_one {
            chosen = (chosen + 1).min(self.log.last());
        }
        if chosen > self.commit {
            self.learn_commit(chosen);
        }
    }
}

/// What the leader streams with in one `replicate` step.
struct Step {
    ballot: Ballot,
    last: Index,
    commit: Index,
    tick: u64,
    /// Ticks between commit-cell probes.
    every: u64,
    geo: RingGeometry,
    max_out: u32,
}

impl Step {
    /// Writes follower `n`'s stream on from `p.next`, while the ring has room for it (its
    /// credit) and few enough writes are outstanding.
    fn write_entries(&self, n: NodeId, p: &mut Peer, log: &mut Log, writes: &mut VecDeque<Action>) {
        let (ballot, commit) = (self.ballot, self.commit);
        while p.next <= self.last && p.outstanding < self.max_out {
            let slot = log.get(p.next).expect("index within log");
            if slot.ballot != ballot {
                // Catch-up below our adopted range: the chosen value, under our ballot.
                let s = slot.restamp(p.next, ballot, commit);
                log.put(p.next, s);
            }
            let slot = log.get(p.next).unwrap();
            let len = layout::peek_len(&slot.bytes).expect("encoded entry");
            let Some(at) = p.cursor.place(len, p.consumed) else {
                break;
            };
            if let Some(w) = at.wrap_at {
                let wh = EntryHeader {
                    index: p.next,
                    ballot,
                    commit,
                    len: 0,
                    flags: flags::WRAP,
                };
                let mut buf = Vec::new();
                layout::encode_entry(&mut buf, &wh, &[]);
                let data = Data::inline(&buf);
                writes.push_back(Action::Write {
                    peer: n,
                    offset: self.geo.slot_offset(w),
                    data,
                    token: Token::write(TokenKind::Wrap, p.gen, p.next),
                });
                p.outstanding += 1;
            }
            let data = Data::Shared(slot.bytes.clone());
            let t = Token::write(TokenKind::Entry, p.gen, p.next);
            writes.push_back(Action::Write {
                peer: n,
                offset: self.geo.slot_offset(at.slot),
                data,
                token: t,
            });
            p.outstanding += 1;
            p.next += 1;
        }
    }

    /// The commit cell carries the commit when no entry does, and doubles as a periodic
    /// probe: a follower that stopped consuming (it may have fenced us) is still written
    /// to, so a refusal reaches us. (Also to a replica pulling a checkpoint: if it fenced
    /// us to stand, the refusal makes us step down and the election that follows lets it
    /// rejoin.)
    fn write_commit_cell(
        &self,
        n: NodeId,
        p: &mut Peer,
        catching_up: bool,
        writes: &mut VecDeque<Action>,
    ) {
        let (ballot, commit) = (self.ballot, self.commit);
        let idle = p.next > self.last || catching_up;
        let due = self.tick - p.commit_sent_at >= self.every;
        if p.outstanding < self.max_out && ((idle && p.commit_sent < commit) || due) {
            p.commit_sent = commit;
            p.commit_sent_at = self.tick;
            let cell = CommitCell { commit, ballot }.encode();
            let t = Token::write(TokenKind::Commit, p.gen, commit);
            writes.push_back(Action::Write {
                peer: n,
                offset: layout::COMMIT_CELL_OFFSET,
                data: Data::inline(&cell),
                token: t,
            });
            p.outstanding += 1;
        }
    }
}
