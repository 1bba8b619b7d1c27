//! The protocol core: multi-Paxos over a one-sided memory plane, with no I/O and no clock.
//!
//! The driver feeds it events (`propose`, `tick`, `handle_*`) and executes the [`Action`]s
//! it queues, **in order** (a `PersistPromise` completes before the `Send` after it). See
//! `docs/protocol.md` for the protocol and its invariants; the invariants are asserted
//! here as contracts.
//!
//! This file holds the state of a replica and the dispatch of events; the concerns live
//! beside it: `acceptor`, `election`, `replication` (with the peer `tracker`), `recovery`,
//! `pull` (checkpoints).

use super::action::{Action, Data, ProposeError, Token, TokenKind};
use super::batch;
use super::config::{Config, ConfigError, Durability};
use super::election::Candidacy;
use super::log::{Log, Slot};
use super::msg::Msg;
use super::pull::Pull;
use super::recovery::Recovery;
use super::tracker::Leadership;
use crate::fabric::Completion;
use crate::layout::{self, CommitCell, EntryHeader, ProgressCell};
use crate::types::{Ballot, Index, NodeId, PromiseRecord};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Role {
    Follower,
    Candidate(Candidacy),
    Leader(Leadership),
    Recovering(Recovery),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Fenced {
    Promise {
        to: NodeId,
        ballot: Ballot,
        from: Index,
        gen: u64,
    },
    Candidacy,
}

/// The protocol state of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Core {
    pub(super) cfg: Config,
    pub(super) promised: Ballot,
    pub(super) max_seen: Ballot,
    pub(super) log: Log,
    /// Entries `1..=received` match the current leader's log (the current stream's prefix).
    pub(super) received: Index,
    pub(super) commit: Index,
    pub(super) applied: Index,
    pub(super) persisted: Index,
    pub(super) persist_seq: u64,
    /// A persist completion below `persist_barrier` may not raise `persisted` past the cap:
    /// entries at or above `persist_cap + 1` were overwritten after it was requested.
    pub(super) persist_barrier: u64,
    pub(super) persist_cap: Index,
    pub(super) persist_from: Option<Index>,
    /// The highest index of any persist request made (completed or not).
    pub(super) persist_submitted: Index,
    pub(super) stream: u64,
    /// Random per start (from the seed): keeps ticket numbers of incarnations apart.
    pub(super) incarnation: u64,
    pub(super) consumed: u64,
    pub(super) role: Role,
    pub(super) tick: u64,
    pub(super) rng: u64,
    pub(super) queue: super::queue::CommandQueue,
    pub(super) actions: VecDeque<Action>,
    pub(super) heartbeat: u64,
    pub(super) hb_seen: u64,
    pub(super) quiet: u32,
    pub(super) backoff: u32,
    pub(super) fenced: VecDeque<Fenced>,
    pub(super) progress_dirty: bool,
    pub(super) pull: Option<Pull>,
    /// Durable recovery: the rebuilt log is durable once `persisted` reaches this.
    pub(super) rejoin_target: Option<Index>,
    /// The promised ballot once its leader has written to us (an entry or the commit cell):
    /// `established == promised` is the "normal" status in which we answer recoveries.
    pub(super) established: Ballot,
    /// Booted with no memory (not restored, not rebuilt) and not yet established by a
    /// leader: our votes carry this id (random, not 0), so that a peer that knew us
    /// otherwise refuses them. 0 once established, restored or rebuilt.
    pub(super) blank: u64,
    /// What we know of each peer's memory: 0 seen with one, or the id of the blank
    /// incarnation seen. A blank vote that contradicts it is refused (`Nack::recover`).
    pub(super) known: BTreeMap<NodeId, u64>,
    /// This replica has a history (restored from disk, rebuilt, or it learned that a value
    /// was chosen), so `known` may miss peers that had a memory: a blank vote of a peer it has no record
    /// of may come from a lost memory, so it is refused too (the peer rebuilds). Only a
    /// first start before any leader has no such replica.
    pub(super) known_incomplete: bool,
    /// Write generations handed out to peer streams, unique within this incarnation, so that
    /// no completion of an earlier stream or leadership is counted in a later one.
    pub(super) write_gen: u64,
    /// Follower: the last `Resync` / `NeedCheckpoint` generation of our leader we acted on.
    pub(super) answered: u64,
}

impl Core {
    /// A replica with empty state: a fresh cluster, or a restart in volatile mode when
    /// `recovering` (it then rebuilds its state from a majority before it takes part).
    pub fn new(cfg: Config, recovering: bool) -> Result<Core, ConfigError> {
        cfg.validate()?;
        let mut c = Core {
            // splitmix64 of the seed: nearby seeds (`| 1` would merge 2k and 2k+1) must give
            // unrelated streams, since incarnation numbers come from here.
            rng: {
                let mut z = cfg.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) | 1
            },
            cfg,
            promised: Ballot::ZERO,
            max_seen: Ballot::ZERO,
            log: Log::default(),
            received: 0,
            commit: 0,
            applied: 0,
            persisted: 0,
            persist_seq: 0,
            persist_barrier: 0,
            persist_cap: Index::MAX,
            persist_from: None,
            persist_submitted: 0,
            stream: 0,
            incarnation: 0,
            consumed: 0,
            role: Role::Follower,
            tick: 0,
            queue: Default::default(),
            actions: VecDeque::new(),
            heartbeat: 0,
            hb_seen: 0,
            quiet: 0,
            backoff: 0,
            fenced: VecDeque::new(),
            progress_dirty: false,
            pull: None,
            rejoin_target: None,
            established: Ballot::ZERO,
            blank: 0,
            known: BTreeMap::new(),
            known_incomplete: false,
            write_gen: 0,
            answered: 0,
        };
        if !recovering {
            c.blank = c.random() | 1;
        }
        c.stream = c.random() >> 16;
        c.incarnation = c.random() >> 40;
        if recovering && c.cfg.bugs.amnesia_votes {
            c.blank = 0; // forgets, and votes as if it remembered
        } else if recovering {
            c.start_recovery();
        }
        Ok(c)
    }

    /// A replica restarted in durable mode from its disk: the promise record, the index of
    /// the checkpoint its state machine was restored from (0: none) and the persisted
    /// entries after it (encoded, contiguous from `base + 1`).
    ///
    /// A record with a blank id restores that blank incarnation: the replica booted with
    /// no memory and crashed before a leader established it, so it still remembers nothing
    /// of before its boot, and its votes stay blank (refused by peers that knew it with a
    /// memory). Restoring it as one that remembers lost chosen values (simulator seeds
    /// 527 and 577 with 3 durable replicas, 5009 with 5).
    pub fn restore(
        cfg: Config,
        promise: PromiseRecord,
        base: Index,
        entries: Vec<Arc<[u8]>>,
    ) -> Result<Core, ConfigError> {
        let mut c = Core::new(cfg, false)?;
        let promised = promise.ballot;
        // It remembers, even if that is nothing, unless the record says it is blank (a data
        // dir that lost its contents is not restored: the node starts it blank with
        // `Core::new`, or rebuilding with --rejoin).
        c.blank = match c.cfg.bugs.restore_forgets_blank {
            false => promise.blank,
            true => 0,
        };
        // Whether it knew that a value was chosen is in the record (and a checkpoint or a
        // commit in its log says so too). Until it knew, it refused no blank vote of a peer
        // it had no record of, and must not after a restart either: refusing would wedge a
        // first start that saw crashes (found by the simulator with blank replicas that
        // crash and restart: `--seed 88 --durability durable`).
        c.known_incomplete = promise.saw_chosen || base > 0;
        c.promised = promised;
        c.max_seen = promised;
        c.log = Log::with_base(base);
        c.commit = base;
        c.applied = base;
        for bytes in entries {
            let (h, _) = layout::decode_entry(&bytes).expect("restored entries are verified");
            let (i, slot) = Slot::from_encoded(bytes.clone()).expect("verified");
            assert_eq!(
                i,
                c.log.last() + 1,
                "restored log must be contiguous after its base"
            );
            c.log.put(i, slot);
            // An entry's piggybacked commit vouches for the prefix it was written after.
            c.commit = c.commit.max(h.commit.min(i));
        }
        c.known_incomplete |= c.commit > 0;
        c.received = c.commit;
        c.persisted = c.log.last();
        if base > 0 {
            // The compaction that followed the checkpoint may have been lost in the crash:
            // entries at or below it must not stand between the checkpoint and new appends.
            c.push(Action::CompactLog { upto: base });
        }
        c.apply_committed();
        c.rejoin_leader();
        Ok(c)
    }

    /// This replica.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The first ticket number this incarnation should use: entries proposed by an earlier
    /// incarnation of this replica (same node id) must not complete this one's tickets.
    pub fn first_ticket(&self) -> u64 {
        (self.incarnation & 0xff_ffff) << 32 | 1
    }

    /// The highest ballot promised (its own while it leads).
    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// Highest index known chosen.
    pub fn commit(&self) -> Index {
        self.commit
    }

    /// Highest index handed to the driver to apply (`Action::Apply`).
    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Entries `1..=received` match the current leader's log (what a follower reports).
    pub fn received(&self) -> Index {
        self.received
    }

    /// Highest index durable (durable mode; follows `received` in volatile mode).
    pub fn persisted(&self) -> Index {
        self.persisted
    }

    /// The accepted log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// Booted with no memory and not yet established, restored or rebuilt: its votes carry
    /// a blank id (`Promise::blank`).
    pub fn is_blank(&self) -> bool {
        self.blank != 0
    }

    /// Rebuilding its state from a majority after losing its memory: it does not vote.
    pub fn is_recovering(&self) -> bool {
        matches!(self.role, Role::Recovering(_))
    }

    /// "follower", "candidate", "leader" or "recovering", for logs and status.
    pub fn role_name(&self) -> &'static str {
        match self.role {
            Role::Follower => "follower",
            Role::Candidate(_) => "candidate",
            Role::Leader(_) => "leader",
            Role::Recovering(_) => "recovering",
        }
    }

    /// The replica this one believes leads.
    pub fn leader_hint(&self) -> Option<NodeId> {
        match &self.role {
            Role::Leader(_) => Some(self.cfg.id),
            Role::Follower
                if self.promised != Ballot::ZERO && self.promised.node() != self.cfg.id =>
            {
                Some(self.promised.node())
            }
            _ => None,
        }
    }

    /// The leader's view of its followers, for diagnostics.
    pub fn peer_summary(&self) -> String {
        match &self.role {
            Role::Leader(l) => l
                .peers
                .iter()
                .map(|(n, p)| {
                    format!(
                        "{n}:{:?} next={} acked={} out={} consumed={}/{}",
                        p.state,
                        p.next,
                        p.acked,
                        p.outstanding,
                        p.consumed,
                        p.cursor.written()
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        }
    }

    /// A leader's count of what each peer accepted (volatile) or persisted (durable), for
    /// the simulator's check that every count is backed by what the peer holds.
    pub fn peer_acks(&self) -> Vec<(NodeId, Index)> {
        match &self.role {
            Role::Leader(l) => l.peers.iter().map(|(&n, p)| (n, p.acked)).collect(),
            _ => Vec::new(),
        }
    }

    /// Client commands queued at the leader, not yet in an entry.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Largest command `propose` accepts.
    pub fn max_command(&self) -> usize {
        self.cfg.batch_bytes - batch::COMMAND_OVERHEAD
    }

    /// The next action to execute; the driver drains this after every event, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Queues a client command; it is batched into an entry at the next `flush`.
    pub fn propose(&mut self, ticket: u64, cmd: &[u8]) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader_hint(),
            });
        }
        if cmd.len() > self.max_command() {
            return Err(ProposeError::TooLarge {
                len: cmd.len(),
                max: self.max_command(),
            });
        }
        if self.queue.len() >= self.cfg.max_queue {
            return Err(ProposeError::Busy);
        }
        self.queue.push(ticket, cmd);
        Ok(())
    }

    /// Time passes by one tick.
    pub fn tick(&mut self) {
        self.assert_invariants();
        self.tick += 1;
        self.pull_tick();
        match &self.role {
            Role::Leader(_) => self.leader_tick(),
            Role::Candidate(_) => self.candidate_tick(),
            Role::Recovering(_) => self.recovery_tick(),
            Role::Follower => self.follower_tick(),
        }
    }

    /// A control message from `from` (messages from itself or a non-member are ignored).
    pub fn handle_message(&mut self, from: NodeId, msg: Msg) {
        if from == self.cfg.id || !self.cfg.members.contains(&from) {
            return;
        }
        self.assert_invariants();
        match msg {
            Msg::Prepare {
                ballot,
                from: idx,
                blank,
                gen,
            } => self.on_prepare(from, ballot, idx, blank, gen),
            Msg::Promise(p) => self.on_promise(from, p),
            Msg::Nack {
                promised,
                leader_alive,
                recover,
            } => self.on_nack(promised, leader_alive, recover),
            Msg::Resync { ballot, gen } => self.on_resync(from, ballot, gen),
            Msg::RecoverReq { nonce, from: at } => self.on_recover_req(from, nonce, at),
            Msg::RecoverResp(r) => self.on_recover_resp(from, r),
            Msg::NeedCheckpoint { ballot, gen } => {
                // Only from our leader, and ordered like `Resync`: the install restarts our
                // stream, and a late duplicate must not restart one the leader is writing
                // (it would count writes that land on the abandoned stream).
                if ballot == self.promised
                    && ballot.node() == from
                    && matches!(self.role, Role::Follower)
                {
                    self.establish(); // only a leader that won sends it
                    if gen > self.answered || self.cfg.bugs.restart_stale_stream {
                        self.answered = gen;
                        self.start_pull(from);
                    } else if gen == self.answered && self.pull.is_none() {
                        self.send_promise_header(from); // our answer was lost
                    }
                }
            }
            Msg::CkptReq { index, offset } => {
                if let Role::Leader(l) = &mut self.role {
                    if let Some(p) = l.peers.get_mut(&from) {
                        p.last_contact = self.tick;
                    }
                }
                self.push(Action::ServeCheckpoint {
                    to: from,
                    index,
                    offset,
                });
            }
            Msg::CkptChunk {
                index,
                offset,
                total,
                data,
            } => self.on_ckpt_chunk(from, index, offset, total, data),
        }
    }

    /// A complete entry of the current stream was read from the local ring.
    /// `consumed` is the reader's consumed-slot count after it.
    pub fn handle_landed(&mut self, h: &EntryHeader, bytes: Arc<[u8]>, consumed: u64) {
        self.assert_invariants();
        self.consumed = consumed;
        self.progress_dirty = true;
        // The reader only returns entries of the promised ballot at `received + 1`.
        if h.ballot != self.promised || h.index != self.received + 1 || self.is_leader() {
            return;
        }
        // The reader verified seal and checksum: keep its buffer (no copy) without decoding
        // the bytes again.
        let (i, slot) = (
            h.index,
            Slot {
                ballot: h.ballot,
                flags: h.flags,
                bytes,
            },
        );
        self.establish();
        self.accept(i, slot);
        self.received = i;
        self.learn_commit(h.commit.min(i));
    }

    /// Our promised leader wrote to us: it won its phase 1, and we are in its stream.
    pub(super) fn establish(&mut self) {
        self.established = self.promised;
        if self.blank != 0 {
            self.blank = 0;
            if self.cfg.durability == Durability::Durable {
                // Ahead of anything accepted in this stream (persists run in order): a
                // crash before this is durable restarts blank, which only costs a rebuild.
                self.push(Action::PersistPromise(self.promise_record()));
            }
        }
    }

    /// What `PersistPromise` stores: the promise and the blank incarnation, if any.
    pub(super) fn promise_record(&self) -> PromiseRecord {
        PromiseRecord {
            ballot: self.promised,
            blank: self.blank,
            saw_chosen: self.known_incomplete,
        }
    }

    /// We learned that a value was chosen: a majority accepted it, and a peer we have no
    /// record of may be one of them that lost its disk since. From now on its blank vote
    /// is refused (it rebuilds, from the majority that holds the value, so this never
    /// wedges: at most the others are blank). Before anything is chosen, blank votes keep
    /// a first start live.
    pub(super) fn saw_chosen(&mut self) {
        if !self.known_incomplete {
            self.known_incomplete = true;
            if self.cfg.durability == Durability::Durable {
                // Kept across a crash: a restart must go on refusing (losing it in a crash
                // before this is durable is as if it had not been learned).
                self.push(Action::PersistPromise(self.promise_record()));
            }
        }
    }

    /// The fence requested by `FenceAndDrain` is in force and the ring is drained.
    pub fn handle_fenced(&mut self) {
        self.assert_invariants();
        let queued = self.actions.len();
        match self.fenced.pop_front() {
            Some(Fenced::Promise {
                to,
                ballot,
                from,
                gen,
            }) => self.promise(to, ballot, from, gen),
            Some(Fenced::Candidacy) => self.start_candidacy(),
            None => {}
        }
        // What the fence decided (a new writer, a new stream, the promise) must take effect
        // before anything queued earlier, in particular before another fence: otherwise a
        // later candidacy's revocation could be undone by this promise's grant.
        if self.cfg.bugs.fence_decisions_late {
            return;
        }
        let decided: Vec<_> = self.actions.drain(queued..).collect();
        // A stream reset or writer grant queued earlier (while the fence was pending, say
        // for a Resync of the old ballot) is superseded by the one decided now: run after
        // it, it would leave the reader on the old stream while the new leader's writes
        // complete, counted and never read (`ballot-sim --seed 917 --replicas 5`).
        let resets = decided
            .iter()
            .any(|a| matches!(a, Action::ResetRing { .. }));
        let grants = decided.iter().any(|a| matches!(a, Action::SetWriter(_)));
        self.actions.retain(|a| match a {
            Action::ResetRing { .. } => !resets,
            Action::SetWriter(_) => !grants,
            _ => true,
        });
        for a in decided.into_iter().rev() {
            self.actions.push_front(a);
        }
    }

    /// A one-sided write or read the driver posted for an [`Action::Write`] or
    /// [`Action::Read`] finished.
    pub fn handle_completion(&mut self, c: Completion) {
        self.assert_invariants();
        let (peer, token, result) = match c {
            Completion::Write {
                peer,
                token,
                result,
            } => (peer, token, result.map(|_| None)),
            Completion::Read {
                peer,
                token,
                result,
            } => (peer, token, result.map(Some)),
        };
        let token = Token::from_raw(token);
        match token.kind() {
            Some(TokenKind::Heartbeat) => {
                if let Ok(Some(bytes)) = result {
                    if Some(peer) == self.leader_hint() && bytes.len() == 8 {
                        let hb = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                        if hb != self.hb_seen {
                            self.hb_seen = hb;
                            self.quiet = 0;
                        }
                    }
                }
            }
            // A lost progress report would leave the leader without credit: send it again.
            Some(TokenKind::Progress) => self.progress_dirty |= result.is_err(),
            Some(TokenKind::Entry | TokenKind::Wrap | TokenKind::Commit) => {
                self.on_write_done(peer, token, result.map(|_| ()))
            }
            _ => {}
        }
    }

    /// A peer's progress cell in the local header changed.
    pub fn handle_progress(&mut self, peer: NodeId, cell: ProgressCell) {
        self.assert_invariants();
        let durable = self.cfg.durability == Durability::Durable;
        let tick = self.tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if cell.ballot != l.ballot {
            return;
        }
        let Some(p) = l.peers.get_mut(&peer) else {
            return;
        };
        if cell.stream != p.stream {
            // The follower reads a stream we are not writing (it restarted, and the promise
            // saying so was lost): start over, through a Resync it will answer.
            p.stream_lost();
            return;
        }
        if !p.is_streaming() {
            return;
        }
        p.consumed = p.consumed.max(cell.consumed_slots.min(p.cursor.written()));
        p.last_contact = tick;
        if durable {
            // Only what was written in this stream can be vouched for.
            p.acked = p.acked.max(cell.persisted.min(p.next - 1));
            self.advance_commit();
        }
    }

    /// The commit cell in the local header changed.
    pub fn handle_commit_cell(&mut self, cell: CommitCell) {
        self.assert_invariants();
        if cell.ballot == self.promised && !self.is_leader() {
            self.establish();
            if cell.commit > 0 {
                self.saw_chosen(); // even if we hold none of it yet
            }
            let cap = match self.cfg.bugs.follower_commit_uncapped {
                false => self.received,
                true => self.log.last(),
            };
            self.learn_commit(cell.commit.min(cap));
        }
    }

    /// The persist request `seq` completed.
    pub fn handle_persisted(&mut self, seq: u64, to: Index) {
        self.assert_invariants();
        if seq >= self.persist_barrier {
            self.persist_cap = Index::MAX;
        }
        let upto = to.min(self.persist_cap).min(self.received);
        if upto > self.persisted {
            self.persisted = upto;
            self.progress_dirty = true;
            if self.is_leader() {
                self.advance_commit();
            }
            self.check_rejoined();
        }
    }

    /// End of a driver step: form and send entries (leader), report progress (follower).
    pub fn flush(&mut self) {
        self.assert_invariants();
        if self.is_leader() {
            self.replicate();
        }
        self.flush_persist();
        if self.progress_dirty && !self.is_leader() {
            self.progress_dirty = false;
            if let Some(l) = self.leader_hint() {
                let cell = ProgressCell {
                    ballot: self.promised,
                    received: self.received,
                    persisted: self.reported_persisted(),
                    applied: self.applied,
                    consumed_slots: self.consumed,
                    stream: self.stream,
                };
                let data = Data::inline(&cell.encode());
                let offset = layout::progress_offset(self.cfg.id);
                self.push(Action::Write {
                    peer: l,
                    offset,
                    data,
                    token: Token::PROGRESS,
                });
            }
        }
    }

    /// Gives up leadership and refuses further proposals (shutdown).
    pub fn shutdown(&mut self) {
        for ticket in self.queue.take_tickets() {
            self.push(Action::Reject {
                ticket,
                error: ProposeError::ShuttingDown,
            });
        }
    }

    /// What holds between any two events, asserted at the entry of each (contracts on):
    /// applied within commit within the log, compaction only of applied entries, the
    /// promise among the ballots seen, and a leader or candidate on its own promise.
    pub(super) fn assert_invariants(&self) {
        contract!(
            self.log.base() <= self.applied && self.applied <= self.commit,
            "contract: base {} <= applied {} <= commit {}",
            self.log.base(),
            self.applied,
            self.commit
        );
        contract!(
            self.commit <= self.log.last(),
            "contract: commit {} within the log (last {})",
            self.commit,
            self.log.last()
        );
        contract!(
            self.promised <= self.max_seen,
            "contract: the promise is among the ballots seen"
        );
        match &self.role {
            Role::Leader(l) => contract!(
                l.ballot == self.promised
                    && self.established == self.promised
                    && self.blank == 0
                    && l.ballot.node() == self.cfg.id,
                "contract: a leader leads with its own, established promise"
            ),
            Role::Candidate(c) => contract!(
                c.ballot == self.promised && c.ballot.node() == self.cfg.id,
                "contract: a candidate stands with its own promise"
            ),
            Role::Follower | Role::Recovering(_) => {}
        }
    }

    /// Precondition of every message handler: `handle_message` passes on only messages
    /// of other members.
    pub(super) fn assert_from_peer(&self, from: NodeId) {
        contract!(
            from != self.cfg.id && self.cfg.members.contains(&from),
            "contract: a message from another member"
        );
    }

    pub(super) fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    pub(super) fn random(&mut self) -> u64 {
        crate::types::xorshift(&mut self.rng)
    }

    pub(super) fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.cfg
            .members
            .iter()
            .copied()
            .filter(move |&n| n != self.cfg.id)
    }

    pub(super) fn broadcast(&mut self, msg: Msg) {
        let others: Vec<_> = self.others().collect();
        for to in others {
            self.push(Action::Send {
                to,
                msg: msg.clone(),
            });
        }
    }

    pub(super) fn reported_persisted(&self) -> Index {
        match self.cfg.durability {
            Durability::Volatile => self.received,
            Durability::Durable => self.persisted.min(self.received),
        }
    }

    /// Accepts `slot` at `i` into the log (and, durably, schedules it for disk).
    pub(super) fn accept(&mut self, i: Index, slot: Slot) {
        if let Some(old) = self.log.get(i) {
            contract!(
                slot.ballot >= old.ballot,
                "contract: accepted ballot at {i} never goes down"
            );
            if i <= self.commit {
                contract!(
                    old.payload() == slot.payload(),
                    "contract: a chosen value never changes"
                );
            }
        }
        self.log.put(i, slot);
        if self.cfg.durability == Durability::Durable {
            let requested = self.persisted.max(self.persist_submitted);
            if i <= requested || self.persist_from.is_some_and(|f| f > i) {
                // Overwriting data persisted or on its way to disk: completions of older
                // requests stop at i - 1 (found by the simulator's commit check: a request
                // in flight with the old value at i completed after the overwrite and raised
                // `persisted` past i).
                self.persisted = self.persisted.min(i - 1);
                self.persist_cap = self.persist_cap.min(i - 1);
                self.persist_barrier = self.persist_seq + 1;
            }
            self.persist_from = Some(self.persist_from.map_or(i, |f| f.min(i)));
        }
    }

    pub(super) fn flush_persist(&mut self) {
        if let Some(from) = self.persist_from.take() {
            self.persist_seq += 1;
            let to = self.log.last();
            self.persist_submitted = self.persist_submitted.max(to);
            self.push(Action::Persist {
                from,
                to,
                seq: self.persist_seq,
            });
        }
    }

    pub(super) fn learn_commit(&mut self, c: Index) {
        if c > self.commit {
            contract!(c <= self.log.last(), "contract: commit within the log");
            self.commit = c;
            self.saw_chosen();
            self.progress_dirty = true;
            self.apply_committed();
        }
    }

    pub(super) fn apply_committed(&mut self) {
        while self.applied < self.commit {
            self.applied += 1;
            let entry = self
                .log
                .get(self.applied)
                .expect("committed entry present")
                .bytes
                .clone();
            self.push(Action::Apply {
                index: self.applied,
                entry,
            });
        }
    }
}
