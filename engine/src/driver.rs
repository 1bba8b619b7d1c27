//! The replica driver: runs the core over any [`Fabric`], applies committed commands to a
//! [`StateMachine`], and completes client tickets.
//!
//! `Replica::step` is one non-blocking turn of the replication loop; the simulator calls it
//! directly, and [`crate::runtime`] calls it from a pinned thread.

use crate::checkpoint::{CheckpointPolicy, CheckpointSource, Checkpoints};
use crate::credit::CreditWatch;
use crate::fabric::{Completion, Fabric, FabricEvent};
use crate::handoff::Completions;
use crate::layout::{self, CommitCell, ProgressCell};
use crate::metrics::Metrics;
use crate::protocol::{batch, Action, Config, ConfigError, Core, Msg, ProposeError, Token};
use crate::ring::RingReader;
use crate::storage::StorageError;
use crate::tickets::TicketMap;
use crate::types::{Index, PromiseRecord};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// The replicated application: every replica applies the same commands in the same order.
///
/// `apply` must be deterministic (same state and command, same new state and output on every
/// replica: no clocks, randomness or local files), and it must not fail: a command the
/// application rejects is applied as a no-op whose output says so. Checkpoints are optional;
/// without them the log is never truncated and a replica too far behind cannot catch up.
///
/// ```
/// use ballot::checkpoint::{CheckpointSource, MemCheckpoints, Checkpoints};
/// use ballot::driver::StateMachine;
/// use ballot::{Ballot, Index};
/// use std::io::{self, Read, Write};
///
/// /// A counter: each command adds its length; the output is the new total.
/// #[derive(Default)]
/// struct Counter(u64);
///
/// struct Frozen(u64);
/// impl CheckpointSource for Frozen {
///     fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
///         w.write_all(&self.0.to_le_bytes())
///     }
/// }
///
/// impl StateMachine for Counter {
///     fn apply(&mut self, _index: Index, command: &[u8], out: &mut Vec<u8>) {
///         self.0 += command.len() as u64;
///         out.extend_from_slice(&self.0.to_le_bytes());
///     }
///     fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
///         Some(Box::new(Frozen(self.0)))
///     }
///     fn restore(&mut self, checkpoint: &mut dyn Read) -> io::Result<()> {
///         let mut b = [0u8; 8];
///         checkpoint.read_exact(&mut b)?; // on error, `self` is untouched
///         self.0 = u64::from_le_bytes(b);
///         Ok(())
///     }
/// }
///
/// // A checkpoint round trip through a store, as a catching-up replica would do it.
/// let mut a = Counter::default();
/// a.apply(1, b"abc", &mut Vec::new());
/// let mut store = MemCheckpoints::default();
/// store.save(1, Ballot::new(1, 0), a.checkpoint().unwrap())?;
/// store.poll_saved().unwrap()?;
/// let mut b = Counter::default();
/// b.restore(&mut *store.open(1)?)?;
/// assert_eq!(b.0, 3);
/// # Ok::<(), io::Error>(())
/// ```
pub trait StateMachine: Send {
    /// Applies a command of the entry committed at `index` and appends its output to `out`
    /// (empty on entry), which is handed to the proposer's ticket on the replica that
    /// proposed it. Entries are applied in index order; an entry carries a batch, so several
    /// commands may share an `index`. The command and the output buffer are borrowed: the
    /// driver reuses one buffer, so a replica that did not propose the command (every
    /// follower) allocates nothing for it here.
    fn apply(&mut self, index: Index, command: &[u8], out: &mut Vec<u8>);
    /// Every command of the entry at `index` has been applied: the place for work due once
    /// per entry rather than once per command (publishing a digest of the state, say).
    fn applied_entry(&mut self, _index: Index) {}
    /// A frozen copy of the state after the last applied command, written out in the
    /// background as a checkpoint. `None`: no checkpoints (the log is never truncated).
    fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
        None
    }
    /// Replaces the whole state with a checkpoint's (as written by `checkpoint`). On error
    /// the state must be unchanged (decode into a new value, then swap).
    fn restore(&mut self, _checkpoint: &mut dyn std::io::Read) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this state machine does not support checkpoints",
        ))
    }
}

/// Durable state of an acceptor (durable mode), usually served by a persister thread.
///
/// Contract, which the simulator's disk model enforces and recovery relies on:
/// - `save_promise` returns only once the promise is durable.
/// - `submit(seq, entries)` starts making `entries` (encoded, contiguous) durable, replacing
///   every entry at or after the first one's index. Submissions complete in order and are
///   reported by `poll_persisted`.
/// - After a crash, an *append* (first index = durable end + 1) may survive as any prefix,
///   but a *rewrite* (first index at or below the durable end) survives whole or not at all:
///   entries persisted before must never be lost to a torn replacement.
///
/// [`crate::storage::Persister`] is the file implementation; the simulator has an in-memory
/// one with a seeded disk model. A failure returned by any method stops the replica from
/// acknowledging anything more ([`Replica::failure`]): it never guesses what is durable.
pub trait Storage: Send {
    /// Makes `record` the durable promise record; returns only once it is durable.
    fn save_promise(&mut self, record: PromiseRecord) -> Result<(), StorageError>;
    /// Starts making `entries` durable (see the contract above); completion is reported
    /// by [`Storage::poll_persisted`] with `seq`.
    fn submit(&mut self, seq: u64, entries: Vec<Arc<[u8]>>) -> Result<(), StorageError>;
    /// Appends the sequence numbers of submissions that are now durable, in order.
    fn poll_persisted(&mut self, done: &mut Vec<u64>) -> Result<(), StorageError>;
    /// Entries up to `upto` are covered by a durable checkpoint and may be dropped (in order
    /// with submissions; it need not be durable: recovery skips entries a checkpoint covers).
    /// If the log ends below `upto`, it is emptied and the next submission starts at
    /// `upto + 1`.
    fn compact(&mut self, upto: Index) -> Result<(), StorageError>;
    /// A replica that rebuilt its state from the others after losing its data dir now has
    /// it durably: a restart may trust the disk again (drop the "rejoining" mark).
    fn rejoined(&mut self) -> Result<(), StorageError>;
    /// The replica found it has no memory while the cluster has a history, and rebuilds
    /// from the others: durably mark the data dir as rejoining (as `--rejoin` does) before
    /// returning, so that a crash mid-rebuild rebuilds again.
    fn begin_rejoin(&mut self) -> Result<(), StorageError>;
}

/// Why a replica stopped acknowledging: what it was doing when its [`Storage`] failed.
#[derive(Debug)]
pub struct StorageFailure {
    /// What the replica was making durable ("persisting entries 5..=9", ...).
    pub during: String,
    /// The storage error itself.
    pub source: StorageError,
}

impl std::fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.during, self.source)
    }
}

impl std::error::Error for StorageFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The outcome of one proposal.
pub type Outcome = Result<Vec<u8>, ProposeError>;

/// Counters of a replica's driver since it started, for status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Calls of [`Replica::step`].
    pub steps: u64,
    /// Commands applied to the state machine (no-ops excluded).
    pub applied_commands: u64,
    /// Control messages that did not decode (dropped).
    pub bad_messages: u64,
    /// Storage failures (the first one stops acknowledgements, so at most 1).
    pub storage_errors: u64,
    /// Checkpoints saved from the local state machine.
    pub checkpoints_taken: u64,
    /// Checkpoints pulled from a peer and restored.
    pub checkpoints_installed: u64,
    /// Checkpoint saves, transfers or restores that failed (retried later).
    pub checkpoint_failures: u64,
    /// Image bytes served to catching-up peers.
    pub checkpoint_bytes_served: u64,
}

/// The driver's checkpoint state: the store, the policy, and the catch-up server.
struct Ckpt {
    store: Box<dyn Checkpoints>,
    policy: CheckpointPolicy,
    /// Index of the checkpoint being saved.
    saving: Option<Index>,
    requested: bool,
    /// Payload bytes applied since the last checkpoint was started.
    since: u64,
    /// Pull requests waiting for bandwidth: (to, index, offset), at most one per peer.
    queue: VecDeque<(crate::NodeId, Index, u64)>,
    /// Bytes that may be served now: refilled every tick, capped; a chunk that overdraws
    /// it leaves a debt, so the long-run rate is the cap.
    budget: i64,
    buf: Vec<u8>,
    unsupported: bool,
    /// A new checkpoint was saved: older ones go once no transfer is in progress.
    retain_due: bool,
    /// Tick of the last chunk served.
    last_served: u64,
}

/// Ticks one step may replay after a stall.
const MAX_TICK_BURST: u64 = 4;

/// Ticks after the last chunk served during which no checkpoint is deleted.
const SERVE_PIN_TICKS: u64 = 200;

/// One replica: the protocol [`Core`] driven over a [`Fabric`], applying committed commands
/// to `S` and persisting through an optional [`Storage`] (`None`: volatile mode).
///
/// Single-threaded and non-blocking: the owner calls [`Replica::step`] in a loop (the
/// [`crate::runtime`] thread, or the simulator), proposes with [`Replica::propose`] and
/// collects outcomes with [`Replica::take_completed`].
pub struct Replica<F: Fabric, S: StateMachine> {
    core: Core,
    fabric: F,
    sm: S,
    storage: Option<Box<dyn Storage>>,
    reader: RingReader,
    events: Vec<FabricEvent>,
    /// Tickets proposed here and not yet completed.
    pending: TicketMap<()>,
    /// Persist submissions in flight: (seq, last index).
    persisting: VecDeque<(u64, Index)>,
    persisted_buf: Vec<u64>,
    /// Outcomes since the last [`Replica::take_completed`], outputs in one buffer.
    completed: Completions,
    /// The state machine's output buffer, reused for every command.
    apply_out: Vec<u8>,
    next_ticket: u64,
    /// The clock at the last step; `None` before the first (a replica started late does not
    /// replay the ticks it never lived through).
    ticks: Option<u64>,
    commit_cell: Option<CommitCell>,
    progress: Vec<Option<ProgressCell>>,
    /// Set after a storage failure: this replica stops acknowledging anything.
    failed: Option<StorageFailure>,
    ckpt: Option<Ckpt>,
    stats: Stats,
    /// Shared with the runtime and an exporter: apply latency measured here.
    metrics: Arc<Metrics>,
    /// Ring credit stalls, re-derived from the leader's writes and progress cells.
    credit: CreditWatch,
}

impl<F: Fabric, S: StateMachine> Replica<F, S> {
    /// A replica of `core` over `fabric`.
    ///
    /// # Panics
    /// If the fabric's node id or ring geometry differ from the core's configuration.
    pub fn new(core: Core, fabric: F, sm: S, storage: Option<Box<dyn Storage>>) -> Self {
        assert_eq!(
            core.id(),
            fabric.node(),
            "fabric and core disagree on the node id"
        );
        let ring = fabric.region().info().ring;
        assert_eq!(
            ring,
            core.config().ring,
            "fabric region and config disagree on the ring"
        );
        let next_ticket = core.first_ticket();
        Replica {
            reader: RingReader::new(ring),
            core,
            fabric,
            sm,
            storage,
            events: Vec::with_capacity(256),
            pending: TicketMap::new(),
            persisting: VecDeque::new(),
            persisted_buf: Vec::new(),
            completed: Completions::new(),
            apply_out: Vec::new(),
            next_ticket,
            ticks: None,
            commit_cell: None,
            progress: vec![None; crate::MAX_NODES],
            failed: None,
            ckpt: None,
            stats: Stats::default(),
            metrics: Arc::default(),
            credit: CreditWatch::new(ring),
        }
        .with_metrics(Arc::default())
    }

    /// Records measurements into `metrics` (shared with whoever exports them) instead of a
    /// private set; the fabric's counters, if it keeps any, are published there.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        if let Some(c) = self.fabric.counters() {
            let _ = metrics.fabric.set(c);
        }
        self.metrics = metrics;
        self
    }

    /// Where this replica records its measurements.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Keeps checkpoints in `store` and takes them by `policy`; the log is compacted behind
    /// the oldest kept, and replicas too far behind pull the newest from here.
    pub fn with_checkpoints(
        mut self,
        store: Box<dyn Checkpoints>,
        policy: CheckpointPolicy,
    ) -> Self {
        let chunk = policy.chunk_bytes.clamp(1, crate::protocol::MAX_CKPT_CHUNK);
        self.ckpt = Some(Ckpt {
            store,
            policy: CheckpointPolicy {
                chunk_bytes: chunk,
                keep: policy.keep.max(1),
                ..policy
            },
            saving: None,
            requested: false,
            since: 0,
            queue: VecDeque::new(),
            budget: 0,
            buf: vec![0; chunk],
            unsupported: false,
            retain_due: false,
            last_served: 0,
        });
        self
    }

    /// Takes a checkpoint at the next step (if the state machine supports them).
    pub fn request_checkpoint(&mut self) {
        if let Some(c) = self.ckpt.as_mut() {
            c.requested = true;
        }
    }

    /// The newest checkpoint kept here (0: none).
    pub fn latest_checkpoint(&self) -> Index {
        self.ckpt
            .as_ref()
            .and_then(|c| c.store.latest())
            .map_or(0, |i| i.index)
    }

    /// Convenience: a fresh core from `cfg`.
    pub fn with_config(
        cfg: Config,
        recovering: bool,
        fabric: F,
        sm: S,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(Core::new(cfg, recovering)?, fabric, sm, None))
    }

    /// The protocol core (role, ballot, commit index).
    pub fn core(&self) -> &Core {
        &self.core
    }
    /// The fabric.
    pub fn fabric(&self) -> &F {
        &self.fabric
    }
    /// The fabric, mutably (tests and the simulator inject faults through it).
    pub fn fabric_mut(&mut self) -> &mut F {
        &mut self.fabric
    }
    /// Complete entries that landed in the ring and that the reader will read next, without
    /// reading them (for the simulator's checks): index and payload.
    pub fn ring_pending(&self) -> Vec<(Index, Vec<u8>)> {
        let mut r = self.reader.clone();
        let region = self.fabric.region().clone();
        let mut out = Vec::new();
        while let Some((h, bytes, _)) = r.poll(&region) {
            if let Ok((_, p)) = layout::decode_entry(&bytes) {
                out.push((h.index, p.to_vec()));
            }
        }
        out
    }

    /// The application state (as applied so far).
    pub fn state_machine(&self) -> &S {
        &self.sm
    }
    /// Counters since the start.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// The storage failure that stopped this replica from acknowledging, if any.
    pub fn failure(&self) -> Option<&StorageFailure> {
        self.failed.as_ref()
    }

    /// Proposes `cmd`; the returned ticket completes (see `take_completed`) once the
    /// command is applied here, or with an error.
    pub fn propose(&mut self, cmd: &[u8]) -> Result<u64, ProposeError> {
        if self.failed.is_some() {
            return Err(ProposeError::ShuttingDown);
        }
        let ticket = self.next_ticket;
        self.core.propose(ticket, cmd)?;
        self.next_ticket += 1;
        self.pending.insert(ticket, ());
        Ok(ticket)
    }

    /// Hands the outcomes completed since the last call over in `into` (emptied first):
    /// the two buffers are swapped, so a caller that passes the same `into` every time
    /// allocates nothing in steady state.
    pub fn take_completed(&mut self, into: &mut Completions) {
        into.clear();
        std::mem::swap(into, &mut self.completed);
    }

    /// One turn of the loop: `now_ticks` is the driver's clock in ticks. Returns whether
    /// anything happened (for the idle strategy).
    pub fn step(&mut self, now_ticks: u64) -> bool {
        self.stats.steps += 1;
        let mut busy = self.fabric.poll(&mut self.events) > 0;
        busy |= self.drain_ring();
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            match ev {
                FabricEvent::Completion(c) => self.core.handle_completion(c),
                FabricEvent::Message { from, bytes } => match Msg::decode(&bytes) {
                    Ok(m) => self.core.handle_message(from, m),
                    Err(e) => {
                        self.stats.bad_messages += 1;
                        tracing::warn!(
                            node = self.core.id(),
                            from,
                            "dropping control message: {e}"
                        );
                    }
                },
            }
        }
        self.events = events;
        busy |= self.poll_cells();
        busy |= self.poll_storage();
        let ticks = self.ticks.get_or_insert(now_ticks);
        // Time this replica spent stalled (a long install, a descheduled thread) is not
        // silence of its leader: age the core by a few ticks at most, not the whole gap,
        // or it would suspect a live leader and depose it.
        *ticks = (*ticks).max(now_ticks.saturating_sub(MAX_TICK_BURST));
        while *ticks < now_ticks {
            *ticks += 1;
            self.core.tick();
            if let Some(c) = self.ckpt.as_mut() {
                let per = c.policy.serve_bytes_per_tick;
                let cap = per
                    .max(c.policy.chunk_bytes as u64)
                    .min(i64::MAX as u64 / 4) as i64;
                c.budget = (c.budget + per.min(cap as u64) as i64).min(cap * 2);
            }
            busy = true;
        }
        self.core.flush();
        busy |= self.execute();
        busy |= self.checkpoint_turn();
        busy |= self.execute();
        self.watch_credit();
        if let Err(e) = self.fabric.flush() {
            tracing::warn!(node = self.core.id(), "fabric flush: {e}");
        }
        busy
    }

    /// Stops: queued proposals fail with `ShuttingDown`.
    pub fn shutdown(&mut self) {
        self.core.shutdown();
        self.execute();
        for (t, ()) in self.pending.drain() {
            self.completed.push_err(t, ProposeError::ShuttingDown);
        }
    }

    fn poll_storage(&mut self) -> bool {
        let Some(s) = self.storage.as_mut() else {
            return false;
        };
        if self.persisting.is_empty() || self.failed.is_some() {
            return false;
        }
        let mut done = std::mem::take(&mut self.persisted_buf);
        if let Err(e) = s.poll_persisted(&mut done) {
            self.fail("persisting".into(), e);
            return true;
        }
        let any = !done.is_empty();
        for seq in done.drain(..) {
            let (want, to) = self
                .persisting
                .pop_front()
                .expect("completion of a submission");
            assert_eq!(want, seq, "storage completes submissions in order");
            self.core.handle_persisted(seq, to);
        }
        self.persisted_buf = done;
        any
    }

    fn drain_ring(&mut self) -> bool {
        let region = self.fabric.region().clone();
        let mut any = false;
        while let Some((h, bytes, consumed)) = self.reader.poll(&region) {
            self.core.handle_landed(&h, bytes, consumed);
            any = true;
        }
        any
    }

    fn poll_cells(&mut self) -> bool {
        let region = self.fabric.region().clone();
        let mut any = false;
        let mut buf = [0u8; layout::PROGRESS_ENCODED];
        region
            .read(
                layout::COMMIT_CELL_OFFSET,
                &mut buf[..layout::COMMIT_CELL_SIZE],
            )
            .expect("in bounds");
        if let Ok(Some(c)) = CommitCell::decode(&buf) {
            if self.commit_cell != Some(c) {
                self.commit_cell = Some(c);
                self.core.handle_commit_cell(c);
                any = true;
            } else if self.core.commit() < c.commit && self.core.received() > self.core.commit() {
                // The cell was read before the entries it covers landed (a catch-up): learn
                // it again now that they may be here.
                self.core.handle_commit_cell(c);
            }
        }
        if self.core.is_leader() {
            // The peers, copied out of the configuration without a heap copy (this runs
            // every step).
            let me = self.core.id();
            let mut peers = [0 as crate::NodeId; crate::MAX_NODES];
            let mut k = 0;
            for &n in self.core.config().members.iter().filter(|&&n| n != me) {
                peers[k] = n;
                k += 1;
            }
            for &n in &peers[..k] {
                region
                    .read(layout::progress_offset(n), &mut buf)
                    .expect("in bounds");
                if let Ok(Some(cell)) = ProgressCell::decode(&buf) {
                    if self.progress[n as usize] != Some(cell) {
                        self.progress[n as usize] = Some(cell);
                        self.core.handle_progress(n, cell);
                        any = true;
                    }
                }
            }
        }
        any
    }

    /// Counts the ring credit stalls that begin in this step (`crate::credit`).
    fn watch_credit(&mut self) {
        if !self.core.is_leader() {
            self.credit.clear();
            return;
        }
        let me = self.core.id();
        let last = self.core.log().last();
        for &n in &self.core.config().members {
            let Some(next) = self.credit.next_index(n).filter(|_| n != me) else {
                continue;
            };
            let len = if next <= last {
                self.core
                    .log()
                    .get(next)
                    .and_then(|s| layout::peek_len(&s.bytes))
            } else {
                None
            };
            if self.credit.check(n, last, len, self.progress[n as usize]) {
                self.metrics.ring_credit_stalls[n as usize].add(1);
            }
        }
    }

    fn execute(&mut self) -> bool {
        let mut any = false;
        while let Some(a) = self.core.poll_action() {
            any = true;
            self.execute_one(a);
        }
        any
    }

    fn execute_one(&mut self, a: Action) {
        let me = self.core.id();
        // A replica whose disk failed acknowledges nothing any more, and stops its heartbeat
        // so that, if it leads, the others see it as dead and elect another leader.
        if self.failed.is_some()
            && matches!(
                a,
                Action::Send { .. } | Action::Write { .. } | Action::Heartbeat(_)
            )
        {
            return;
        }
        match a {
            Action::Write {
                peer,
                offset,
                data,
                token,
            } => {
                if self.core.is_leader() {
                    let cell = self.progress.get(peer as usize).copied().flatten();
                    self.credit
                        .on_write(peer, token, offset, data.as_slice(), cell);
                }
                let token: u64 = Token::get(token);
                if let Err(e) = self.fabric.write(peer, offset, data.as_slice(), token) {
                    self.core.handle_completion(Completion::Write {
                        peer,
                        token,
                        result: Err(e),
                    });
                }
            }
            Action::Read {
                peer,
                offset,
                len,
                token,
            } => {
                let token = token.get();
                if let Err(e) = self.fabric.read(peer, offset, len, token) {
                    self.core.handle_completion(Completion::Read {
                        peer,
                        token,
                        result: Err(e),
                    });
                }
            }
            Action::Send { to, msg } => {
                if let Err(e) = self.fabric.send(to, &msg.encode()) {
                    tracing::debug!(node = me, to, "send failed: {e}");
                }
            }
            Action::SetWriter(w) => {
                if let Err(e) = self.fabric.set_writer(w) {
                    tracing::error!(node = me, "set_writer({w:?}) failed: {e}");
                }
            }
            Action::FenceAndDrain => {
                let bugs = self.core.config().bugs;
                if !bugs.fence_no_revoke {
                    if let Err(e) = self.fabric.set_writer(None) {
                        tracing::error!(node = me, "fence failed: {e}");
                    }
                }
                if !bugs.fence_no_drain {
                    self.drain_ring();
                }
                self.core.handle_fenced();
            }
            Action::ResetRing { ballot, expect } => self.reader.reset(ballot, expect),
            Action::PersistPromise(r) => {
                if let Some(s) = self.storage.as_mut() {
                    if let Err(e) = s.save_promise(r) {
                        self.fail(format!("saving promise {}", r.ballot), e);
                    }
                }
            }
            Action::Persist { from, to, seq } => {
                // Queued before a checkpoint was installed: what it covers is gone.
                let from = from.max(self.core.log().base() + 1);
                if from > to {
                    return;
                }
                let entries: Vec<_> = (from..=to)
                    .filter_map(|i| self.core.log().get(i).map(|s| s.bytes.clone()))
                    .collect();
                match self.storage.as_mut() {
                    Some(s) => match s.submit(seq, entries) {
                        Ok(()) => self.persisting.push_back((seq, to)),
                        Err(e) => self.fail(format!("persisting entries {from}..={to}"), e),
                    },
                    None => self.core.handle_persisted(seq, to),
                }
            }
            Action::Apply { index, entry } => self.apply(index, &entry),
            Action::Heartbeat(v) => self.fabric.region().store_word(layout::HEARTBEAT_OFFSET, v),
            Action::Reject { ticket, error } => {
                if self.pending.remove(ticket).is_some() {
                    self.completed.push_err(ticket, error);
                }
            }
            Action::LeadershipLost => {
                tracing::info!(node = me, "lost leadership");
                for (t, ()) in self.pending.drain() {
                    self.completed.push_err(t, ProposeError::Indeterminate);
                }
            }
            Action::BecameLeader(b) => tracing::info!(node = me, ballot = %b, "leading"),
            Action::ServeCheckpoint { to, index, offset } => match self.ckpt.as_mut() {
                Some(c) => {
                    c.queue.retain(|q| q.0 != to);
                    c.queue.push_back((to, index, offset));
                }
                None => self.send_chunk(to, 0, 0, 0, Vec::new()),
            },
            Action::StageCheckpoint {
                index,
                offset,
                data,
            } => {
                let r = match self.ckpt.as_mut() {
                    Some(c) => c.store.receive(index, offset, &data),
                    None => Err(std::io::Error::other("no checkpoint store")),
                };
                if let Err(e) = r {
                    tracing::warn!(node = me, index, offset, "staging checkpoint: {e}");
                    self.stats.checkpoint_failures += 1;
                    self.core.handle_checkpoint_installed(index, false);
                }
            }
            Action::InstallCheckpoint { index, len } => {
                let ok = match self.install(index, len) {
                    Ok(()) => {
                        tracing::info!(node = me, index, len, "checkpoint installed");
                        self.stats.checkpoints_installed += 1;
                        true
                    }
                    Err(e) => {
                        tracing::warn!(node = me, index, "installing checkpoint: {e}");
                        self.stats.checkpoint_failures += 1;
                        false
                    }
                };
                self.core.handle_checkpoint_installed(index, ok);
            }
            Action::BeginRejoin => {
                if let Some(s) = self.storage.as_mut() {
                    if let Err(e) = s.begin_rejoin() {
                        self.fail("marking the data dir as rejoining".into(), e);
                    }
                }
            }
            Action::Rejoined => {
                tracing::info!(node = me, "rejoined: the rebuilt state is durable");
                if let Some(s) = self.storage.as_mut() {
                    if let Err(e) = s.rejoined() {
                        self.fail("recording the rejoin".into(), e);
                    }
                }
            }
            Action::CompactLog { upto } => {
                if let Some(s) = self.storage.as_mut() {
                    if let Err(e) = s.compact(upto) {
                        self.fail(format!("compacting the log up to {upto}"), e);
                    }
                }
            }
        }
    }

    fn send_chunk(
        &mut self,
        to: crate::NodeId,
        index: Index,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    ) {
        let me = self.core.id();
        send_chunk(&mut self.fabric, me, to, index, offset, total, data);
    }

    /// Verifies and keeps the staged image, then replaces the state machine's state.
    fn install(&mut self, index: Index, len: u64) -> std::io::Result<()> {
        let c = self
            .ckpt
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no checkpoint store"))?;
        c.store.receive_finish(index, len)?;
        let mut r = c.store.open(index)?;
        self.sm.restore(&mut r)?;
        drop(r);
        c.since = 0;
        // Commands proposed here that the checkpoint covers will not be applied one by one.
        for (t, ()) in self.pending.drain() {
            self.completed.push_err(t, ProposeError::Indeterminate);
        }
        Ok(())
    }

    /// Checkpoint housekeeping, once per step: finished saves (then retention and
    /// compaction), a new save when due, and paced serving of pull requests.
    fn checkpoint_turn(&mut self) -> bool {
        let Some(c) = self.ckpt.as_mut() else {
            return false;
        };
        let me = self.core.id();
        let mut busy = false;
        if c.saving.is_some() {
            match c.store.poll_saved() {
                Some(Ok(info)) => {
                    c.saving = None;
                    busy = true;
                    self.stats.checkpoints_taken += 1;
                    tracing::info!(
                        node = me,
                        index = info.index,
                        len = info.len,
                        "checkpoint saved"
                    );
                    c.retain_due = true;
                }
                Some(Err(e)) => {
                    c.saving = None;
                    self.stats.checkpoint_failures += 1;
                    tracing::warn!(node = me, "checkpoint failed: {e}");
                }
                None => {}
            }
        }
        // Old checkpoints go (and the log with them) only while none is being served: a
        // transfer in progress keeps its image.
        let now = self.ticks.unwrap_or(0);
        if c.retain_due && now.saturating_sub(c.last_served) >= SERVE_PIN_TICKS {
            c.retain_due = false;
            match c.store.retain(c.policy.keep) {
                Ok(Some(oldest)) if oldest <= self.core.applied() => self.core.compact(oldest),
                Ok(_) => {}
                Err(e) => tracing::warn!(node = me, "removing old checkpoints: {e}"),
            }
        }
        let applied = self.core.applied();
        let due = c.requested || (c.policy.every_bytes > 0 && c.since >= c.policy.every_bytes);
        let newer = c.store.latest().is_none_or(|l| l.index < applied);
        if due && c.saving.is_none() && newer && !c.unsupported && self.failed.is_none() {
            c.requested = false;
            match self.sm.checkpoint() {
                None => {
                    c.unsupported = true;
                    tracing::warn!(node = me, "state machine does not support checkpoints");
                }
                Some(src) => {
                    let ballot = self
                        .core
                        .log()
                        .get(applied)
                        .map_or(self.core.promised(), |s| s.ballot);
                    match c.store.save(applied, ballot, src) {
                        Ok(()) => {
                            c.saving = Some(applied);
                            c.since = 0;
                            busy = true;
                        }
                        Err(e) => tracing::warn!(node = me, "starting a checkpoint: {e}"),
                    }
                }
            }
        }
        while c.budget > 0 {
            let Some((to, index, offset)) = c.queue.pop_front() else {
                break;
            };
            busy = true;
            c.last_served = self.ticks.unwrap_or(0);
            // The image asked for (resumed), or the newest from its start.
            let (index, offset, total) = match (c.store.get(index), c.store.latest()) {
                (Some(i), _) if index != 0 => (index, offset.min(i.len), i.len),
                (_, Some(l)) => (l.index, 0, l.len),
                (_, None) => (0, 0, 0),
            };
            if total == 0 {
                self.send_chunk(to, 0, 0, 0, Vec::new());
                return busy;
            }
            let chunk = c.policy.chunk_bytes;
            let n = match c.store.read_image(index, offset, &mut c.buf[..chunk]) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(node = me, index, offset, "reading checkpoint image: {e}");
                    continue;
                }
            };
            c.budget -= n as i64;
            self.stats.checkpoint_bytes_served += n as u64;
            let data = c.buf[..n].to_vec();
            send_chunk(&mut self.fabric, me, to, index, offset, total, data);
        }
        busy
    }

    fn apply(&mut self, index: Index, entry: &[u8]) {
        // Verified when it was accepted: no second checksum on the apply path.
        let (flags, payload) = layout::trusted_parts(entry);
        if flags & layout::flags::NOOP != 0 {
            return;
        }
        // Per entry, not per command: two clock reads for a whole batch.
        let started = Instant::now();
        for item in batch::iter(payload) {
            let Ok((origin, cmd)) = item else {
                tracing::error!(
                    node = self.core.id(),
                    index,
                    "malformed batch in a chosen entry"
                );
                break;
            };
            self.apply_out.clear();
            self.sm.apply(index, cmd, &mut self.apply_out);
            if let Some(c) = self.ckpt.as_mut() {
                c.since += cmd.len() as u64;
            }
            self.stats.applied_commands += 1;
            if batch::origin_node(origin) == self.core.id() {
                let t = batch::origin_ticket(origin);
                if self.pending.remove(t).is_some() {
                    // Into the completions' one buffer: no allocation per command.
                    self.completed.push_ok(t, &self.apply_out);
                }
            }
        }
        self.sm.applied_entry(index);
        self.metrics.apply_latency.observe(started.elapsed());
    }

    fn fail(&mut self, during: String, source: StorageError) {
        let why = StorageFailure { during, source };
        tracing::error!(
            node = self.core.id(),
            "storage failure, no longer acknowledging: {why}"
        );
        self.stats.storage_errors += 1;
        self.failed = Some(why);
    }
}

/// Sends one chunk of a checkpoint image (`total` 0: "I have none").
fn send_chunk<F: Fabric>(
    fabric: &mut F,
    me: crate::NodeId,
    to: crate::NodeId,
    index: Index,
    offset: u64,
    total: u64,
    data: Vec<u8>,
) {
    let msg = Msg::CkptChunk {
        index,
        offset,
        total,
        data,
    };
    if let Err(e) = fabric.send(to, &msg.encode()) {
        tracing::debug!(node = me, to, "send failed: {e}");
    }
}

impl<F: Fabric, S: StateMachine> std::fmt::Debug for Replica<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("node", &self.core.id())
            .field("role", &self.core.role_name())
            .finish()
    }
}

/// Who this replica is, for status displays.
pub fn describe(core: &Core) -> String {
    format!(
        "node={} role={} ballot={} commit={} applied={} leader={:?}",
        core.id(),
        core.role_name(),
        core.promised(),
        core.commit(),
        core.applied(),
        core.leader_hint()
    )
}
