//! Checkpoints: compaction and catch-up by pulling a checkpoint from another replica.

use super::action::Action;
use super::config::Durability;
use super::core::{Core, Role};
use super::msg::Msg;
use crate::types::{Index, NodeId};

/// A checkpoint being pulled from `from`; `index` 0 until the first chunk names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Pull {
    pub(super) from: NodeId,
    pub(super) index: Index,
    pub(super) offset: u64,
    pub(super) asked_at: u64,
    pub(super) tries: u32,
    /// Sources tried so far (the pull is abandoned after every member).
    pub(super) sources: u32,
}

/// Unanswered requests to one source before the pull moves to another.
pub(super) const PULL_TRIES: u32 = 4;

impl Core {
    /// Whether this replica is pulling a checkpoint.
    pub fn is_pulling(&self) -> bool {
        self.pull.is_some()
    }

    /// The replica a checkpoint is being pulled from, if one is.
    pub fn pull_source(&self) -> Option<NodeId> {
        self.pull.as_ref().map(|p| p.from)
    }

    /// The checkpoint being pulled (0 until its first chunk names it) and the bytes
    /// received so far; `None` when not pulling.
    pub fn pull_progress(&self) -> Option<(Index, u64)> {
        self.pull.as_ref().map(|p| (p.index, p.offset))
    }

    /// A checkpoint covering `upto` is kept (durably, in durable mode): drop the log up to
    /// it. Precondition: `upto <= applied` (a checkpoint holds applied state only).
    pub fn compact(&mut self, upto: Index) {
        self.assert_invariants();
        contract!(
            upto <= self.applied,
            "contract: compaction at {upto} beyond applied {}",
            self.applied
        );
        if upto <= self.log.base() {
            return;
        }
        self.log.compact(upto);
        self.after_compaction(upto);
    }

    pub(super) fn after_compaction(&mut self, upto: Index) {
        if self.persist_from.is_some_and(|f| f <= upto) {
            self.persist_from = (self.log.last() > upto).then_some(upto + 1);
        }
        if self.cfg.durability == Durability::Durable {
            // The checkpoint is durable: it stands for the entries it covers. The storage
            // drops them before any persist still queued (which now starts after `upto`).
            self.persisted = self.persisted.max(upto);
            self.actions.push_front(Action::CompactLog { upto });
        }
    }

    pub(super) fn start_pull(&mut self, from: NodeId) {
        if self.pull.is_some() || from == self.cfg.id {
            return;
        }
        self.pull = Some(Pull {
            from,
            index: 0,
            offset: 0,
            asked_at: self.tick,
            tries: 0,
            sources: 1,
        });
        self.push(Action::Send {
            to: from,
            msg: Msg::CkptReq {
                index: 0,
                offset: 0,
            },
        });
    }

    /// Repeats an unanswered request (the transfer resumes at its offset); after
    /// `PULL_TRIES` silences moves to another replica, and gives up after all of them.
    pub(super) fn pull_tick(&mut self) {
        let every = u64::from(self.cfg.heartbeat_timeout / 2).max(1);
        let tick = self.tick;
        let n = self.cfg.members.len() as u32;
        let members = self.cfg.members.clone();
        let me = self.cfg.id;
        let Some(p) = &mut self.pull else { return };
        if tick - p.asked_at < every {
            return;
        }
        p.asked_at = tick;
        p.tries += 1;
        if p.tries >= PULL_TRIES {
            if p.sources >= n {
                self.abandon_pull();
                return;
            }
            let pos = members.iter().position(|&m| m == p.from).unwrap_or(0);
            let mut next = members[(pos + 1) % members.len()];
            if next == me {
                next = members[(pos + 2) % members.len()];
            }
            *p = Pull {
                from: next,
                index: 0,
                offset: 0,
                asked_at: tick,
                tries: 0,
                sources: p.sources + 1,
            };
        }
        let (to, index, offset) = (p.from, p.index, p.offset);
        self.push(Action::Send {
            to,
            msg: Msg::CkptReq { index, offset },
        });
    }

    pub(super) fn abandon_pull(&mut self) {
        self.pull = None;
        if let Role::Recovering(r) = &mut self.role {
            // Start recovery over: the answers may have moved on by now.
            r.pending = None;
            r.ask_again();
        }
    }

    pub(super) fn on_ckpt_chunk(
        &mut self,
        from: NodeId,
        index: Index,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    ) {
        self.assert_from_peer(from);
        contract!(
            data.len() <= super::msg::MAX_CKPT_CHUNK,
            "contract: a checkpoint chunk within the limit (the decoder checks)"
        );
        contract!(
            self.pull.as_ref().is_none_or(|p| p.from != self.cfg.id),
            "contract: a pull is from another replica"
        );
        let tick = self.tick;
        let applied = self.applied;
        let Some(p) = &mut self.pull else { return };
        if from != p.from {
            return;
        }
        if total == 0 || index == 0 {
            // The source has no checkpoint: try another at the next retry.
            p.tries = PULL_TRIES - 1;
            return;
        }
        if index <= applied {
            // We hold it already: nothing to gain (a rebuild waiting for it starts over).
            self.abandon_pull();
            return;
        }
        if index != p.index {
            if offset != 0 {
                return;
            }
            // A new image (first chunk, or the source took a newer checkpoint): start over.
            p.index = index;
            p.offset = 0;
        }
        let end = offset + data.len() as u64;
        if offset != p.offset || end > total || (data.is_empty() && end < total) {
            return; // a duplicate, a reordered or a malformed chunk
        }
        p.offset = end;
        p.asked_at = tick;
        p.tries = 0;
        self.push(Action::StageCheckpoint {
            index,
            offset,
            data,
        });
        if end == total {
            self.push(Action::InstallCheckpoint { index, len: total });
        } else {
            self.push(Action::Send {
                to: from,
                msg: Msg::CkptReq { index, offset: end },
            });
        }
    }

    /// The driver executed `InstallCheckpoint`: the state machine now holds the state up to
    /// `index` (`ok`), or the image failed verification (the pull starts over).
    pub fn handle_checkpoint_installed(&mut self, index: Index, ok: bool) {
        self.assert_invariants();
        if !ok {
            if let Some(p) = &mut self.pull {
                p.index = 0;
                p.offset = 0;
                p.tries = PULL_TRIES - 1;
            }
            return;
        }
        self.pull = None;
        contract!(
            index > self.applied,
            "contract: a checkpoint is installed only ahead of what is applied"
        );
        contract!(
            matches!(self.role, Role::Follower | Role::Recovering(_)),
            "contract: only a follower or a recovering replica pulls checkpoints"
        );
        let index = index + u64::from(self.cfg.bugs.checkpoint_off_by_one);
        self.log.compact(index);
        self.applied = index;
        self.commit = self.commit.max(index);
        self.saw_chosen();
        self.received = self.received.max(index);
        self.after_compaction(index);
        self.progress_dirty = true;
        if let Role::Recovering(r) = &mut self.role {
            if let Some(out) = r.pending.take() {
                self.try_finish_recovery(out);
            }
            return;
        }
        self.apply_committed();
        if !self.is_leader() {
            self.rejoin_leader();
        }
    }
}
