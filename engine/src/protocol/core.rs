//! The protocol core: multi-Paxos over a one-sided memory plane, with no I/O and no clock.
//!
//! The driver feeds it events (`propose`, `tick`, `handle_*`) and executes the [`Action`]s
//! it queues, **in order** (a `PersistPromise` completes before the `Send` after it). See
//! `docs/protocol.md` for the protocol and its invariants; the invariants are asserted
//! here as contracts.

use super::batch;
use super::log::{Log, Slot};
use super::msg::{self, Msg, Promise, RecoverResp};
use crate::fabric::{Completion, FabricError};
use crate::layout::{self, flags, CommitCell, EntryHeader, ProgressCell, RingGeometry};
use crate::ring::RingCursor;
use crate::types::{Ballot, Index, NodeId};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

thread_local! {
    static CONTRACTS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the core's contract assertions on or off for this thread (on by default). The
/// planted-bug runs turn them off, so that what catches a bug is the simulator's own
/// end-to-end checks.
pub fn set_contracts(on: bool) {
    CONTRACTS.with(|c| c.set(on));
}

/// Whether the core's contract assertions are on in this thread.
pub fn contracts() -> bool {
    CONTRACTS.with(|c| c.get())
}

/// A precondition, postcondition or invariant of the protocol: checked unless the thread
/// turned contracts off (`set_contracts`).
macro_rules! contract {
    ($cond:expr, $($msg:tt)+) => {
        if contracts() {
            assert!($cond, $($msg)+);
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Chosen once a majority (leader counted) holds the entry in memory, as in Mu.
    Volatile,
    /// Chosen once a majority (leader counted after its own sync) has persisted it.
    Durable,
}

/// Deliberate protocol bugs, one per rule the protocol rests on, to measure the
/// simulator: each must be caught by its end-to-end checks (`ballot-sim --plant-bug NAME`,
/// `engine/tests/planted.rs`). Off in every real configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PlantedBugs {
    /// The acceptor promises any ballot, even one below its promise.
    pub ignore_promise: bool,
    /// The leader counts a quorum one short of a majority.
    pub short_quorum: bool,
    /// A replica that installs a checkpoint believes it covers one entry more than it does.
    pub checkpoint_off_by_one: bool,
    /// The leader counts its own acknowledgement twice.
    pub self_counted_twice: bool,
    /// The leader commits one entry beyond what a majority acknowledged.
    pub commit_off_by_one: bool,
    /// Phase 1 adopts, per index, the value of the lowest ballot instead of the highest.
    pub adopt_lowest_ballot: bool,
    /// The fence does not revoke remote write permission.
    pub fence_no_revoke: bool,
    /// The fence does not drain the ring before the promise.
    pub fence_no_drain: bool,
    /// What a fence decides runs after actions queued before it.
    pub fence_decisions_late: bool,
    /// Recovery finishes on answers from one replica fewer than a majority of the others.
    pub recovery_short_quorum: bool,
    /// Recovery does not wait for the answer of the leader the answers name.
    pub recovery_no_leader_wait: bool,
    /// A replica that lost its memory votes at once instead of rebuilding first.
    pub amnesia_votes: bool,
    /// A candidate adopts from an acceptor that compacted past its `from`.
    pub phase1_ignores_base: bool,
    /// Recovery finishes on a checkpoint older than the most compacted answer.
    pub recovery_ignores_base: bool,
    /// A follower learns a commit index beyond what it received in the current stream.
    pub follower_commit_uncapped: bool,
    /// A follower restarts its stream on a late Resync or NeedCheckpoint of another stream.
    pub restart_stale_stream: bool,
    /// Replicas in no normal status (candidates, unestablished promises) answer recoveries.
    pub recovery_answers_unestablished: bool,
    /// Blank votes (no memory) count even from a replica known to have had a memory.
    pub accept_blank_votes: bool,
}

impl PlantedBugs {
    /// Every planted bug by name, with the switch that turns it on.
    pub const ALL: &'static [(&'static str, fn(&mut PlantedBugs))] = &[
        ("ignore-promise", |b| b.ignore_promise = true),
        ("short-quorum", |b| b.short_quorum = true),
        ("checkpoint-off-by-one", |b| b.checkpoint_off_by_one = true),
        ("self-counted-twice", |b| b.self_counted_twice = true),
        ("commit-off-by-one", |b| b.commit_off_by_one = true),
        ("adopt-lowest-ballot", |b| b.adopt_lowest_ballot = true),
        ("fence-no-revoke", |b| b.fence_no_revoke = true),
        ("fence-no-drain", |b| b.fence_no_drain = true),
        ("fence-decisions-late", |b| b.fence_decisions_late = true),
        ("recovery-short-quorum", |b| b.recovery_short_quorum = true),
        ("recovery-no-leader-wait", |b| {
            b.recovery_no_leader_wait = true
        }),
        ("amnesia-votes", |b| b.amnesia_votes = true),
        ("phase1-ignores-base", |b| b.phase1_ignores_base = true),
        ("recovery-ignores-base", |b| b.recovery_ignores_base = true),
        ("follower-commit-uncapped", |b| {
            b.follower_commit_uncapped = true
        }),
        ("restart-stale-stream", |b| b.restart_stale_stream = true),
        ("recovery-answers-unestablished", |b| {
            b.recovery_answers_unestablished = true
        }),
        ("accept-blank-votes", |b| b.accept_blank_votes = true),
    ];

    /// The bug named `name` (as in [`PlantedBugs::ALL`]).
    pub fn named(name: &str) -> Option<PlantedBugs> {
        let (_, set) = Self::ALL.iter().find(|(n, _)| *n == name)?;
        let mut b = PlantedBugs::default();
        set(&mut b);
        Some(b)
    }

    /// The names of the bugs that are on (a bug is on when switching it on changes nothing).
    pub fn names(&self) -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|(_, set)| {
                let mut b = *self;
                set(&mut b);
                b == *self
            })
            .map(|(n, _)| *n)
            .collect()
    }

    /// Whether any bug is on.
    pub fn any(&self) -> bool {
        *self != PlantedBugs::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    pub id: NodeId,
    /// All replicas, sorted, `id` included.
    pub members: Vec<NodeId>,
    pub ring: RingGeometry,
    pub durability: Durability,
    /// Entries in flight beyond the commit index.
    pub window: u64,
    /// Payload bytes the leader packs into one entry.
    pub batch_bytes: usize,
    /// Client commands queued at the leader before `propose` says `Busy`.
    pub max_queue: usize,
    /// Ticks without a heartbeat change before a follower suspects its leader.
    pub heartbeat_timeout: u32,
    /// Ticks a candidate waits for promises.
    pub election_timeout: u32,
    /// Writes outstanding per follower.
    pub max_outstanding: u32,
    /// Entry bytes per promise or recovery message (larger answers are chunked).
    pub message_bytes: usize,
    pub seed: u64,
    pub bugs: PlantedBugs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    NotAMember(NodeId),
    BadMembers(String),
    BatchTooLarge { batch: usize, max: usize },
    Zero(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAMember(n) => write!(f, "node {n} is not in the member list"),
            Self::BadMembers(s) => write!(f, "bad member list: {s}"),
            Self::BatchTooLarge { batch, max } => {
                write!(
                    f,
                    "batch of {batch} bytes exceeds the ring's entry limit {max}"
                )
            }
            Self::Zero(what) => write!(f, "{what} must be positive"),
        }
    }
}
impl std::error::Error for ConfigError {}

impl Config {
    /// A configuration with defaults suited to a real cluster (1 tick = 1 ms).
    pub fn new(id: NodeId, members: Vec<NodeId>, ring: RingGeometry) -> Config {
        Config {
            id,
            members,
            ring,
            durability: Durability::Volatile,
            window: 256,
            batch_bytes: 64 << 10,
            max_queue: 1 << 16,
            heartbeat_timeout: 100,
            election_timeout: 100,
            max_outstanding: 256,
            message_bytes: msg::CHUNK_BYTES,
            // Different on every start: seeds ticket numbers and stream ids. Set a fixed seed
            // for reproducible runs (the simulator does).
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                ^ u64::from(id) << 56,
            bugs: PlantedBugs::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.members;
        if m.is_empty() || m.len() > crate::MAX_NODES {
            return Err(ConfigError::BadMembers(format!("{} members", m.len())));
        }
        if m.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ConfigError::BadMembers("not sorted and unique".into()));
        }
        if m.iter().any(|&n| n as usize >= crate::MAX_NODES) {
            return Err(ConfigError::BadMembers(format!(
                "ids must be below {}",
                crate::MAX_NODES
            )));
        }
        if !m.contains(&self.id) {
            return Err(ConfigError::NotAMember(self.id));
        }
        let max = self.ring.max_payload();
        if self.batch_bytes > max {
            return Err(ConfigError::BatchTooLarge {
                batch: self.batch_bytes,
                max,
            });
        }
        for (v, what) in [
            (self.window, "window"),
            (self.batch_bytes as u64, "batch_bytes"),
            (self.max_queue as u64, "max_queue"),
            (u64::from(self.heartbeat_timeout), "heartbeat_timeout"),
            (u64::from(self.election_timeout), "election_timeout"),
            (u64::from(self.max_outstanding), "max_outstanding"),
            (self.message_bytes as u64, "message_bytes"),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(what));
            }
        }
        Ok(())
    }

    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }
}

/// Why a proposal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProposeError {
    /// This replica does not lead; `leader` is the one it believes leads, if any.
    NotLeader {
        leader: Option<NodeId>,
    },
    TooLarge {
        len: usize,
        max: usize,
    },
    /// The queue is full; retry later.
    Busy,
    ShuttingDown,
    /// Leadership was lost while the command was in the log: it may or may not be applied.
    Indeterminate,
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLeader { leader: Some(l) } => write!(f, "not the leader; try node {l}"),
            Self::NotLeader { leader: None } => write!(f, "not the leader; leader unknown"),
            Self::TooLarge { len, max } => write!(f, "command of {len} bytes exceeds {max}"),
            Self::Busy => write!(f, "proposal queue full"),
            Self::ShuttingDown => write!(f, "replica shutting down"),
            Self::Indeterminate => write!(f, "leadership lost; outcome unknown"),
        }
    }
}
impl std::error::Error for ProposeError {}

/// Bytes of a one-sided write: a shared entry or a small inline cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Data {
    Shared(Arc<[u8]>),
    Inline { buf: [u8; 64], len: u8 },
}

impl Data {
    fn inline(b: &[u8]) -> Data {
        let mut buf = [0u8; 64];
        buf[..b.len()].copy_from_slice(b);
        Data::Inline {
            buf,
            len: b.len() as u8,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Data::Shared(a) => a,
            Data::Inline { buf, len } => &buf[..*len as usize],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Write {
        peer: NodeId,
        offset: usize,
        data: Data,
        token: u64,
    },
    Read {
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    },
    Send {
        to: NodeId,
        msg: Msg,
    },
    /// Grant ring write permission to this node alone.
    SetWriter(Option<NodeId>),
    /// Revoke every peer's write permission, feed every complete entry still in the ring to
    /// `handle_landed`, then call `handle_fenced`.
    FenceAndDrain,
    /// Restart reading the local ring at slot 0: entries of `ballot` from index `expect`.
    ResetRing {
        ballot: Ballot,
        expect: Index,
    },
    /// Make the promise durable before executing the next action.
    PersistPromise(Ballot),
    /// Durably write entries `from..=to` (replacing anything at or after `from`), then call
    /// `handle_persisted(seq)`.
    Persist {
        from: Index,
        to: Index,
        seq: u64,
    },
    /// Apply the committed entry at `index` (in order, exactly once per incarnation).
    Apply {
        index: Index,
        entry: Arc<[u8]>,
    },
    /// Publish the heartbeat counter in the local header.
    Heartbeat(u64),
    Reject {
        ticket: u64,
        error: ProposeError,
    },
    /// Outstanding proposals of this replica may or may not be applied.
    LeadershipLost,
    BecameLeader(Ballot),
    /// Send `to` a chunk of the image of checkpoint `index` (0: the newest) from `offset`,
    /// as [`Msg::CkptChunk`] (the driver holds the checkpoints and paces this).
    ServeCheckpoint {
        to: NodeId,
        index: Index,
        offset: u64,
    },
    /// Stage a chunk of an incoming checkpoint image (offset 0 starts over).
    StageCheckpoint {
        index: Index,
        offset: u64,
        data: Vec<u8>,
    },
    /// The staged image of checkpoint `index` is complete: verify it, keep it, restore the
    /// state machine from it, then call `handle_checkpoint_installed`.
    InstallCheckpoint {
        index: Index,
        len: u64,
    },
    /// Persisted entries up to `upto` are covered by a checkpoint (`Storage::compact`).
    CompactLog {
        upto: Index,
    },
    /// A durable replica that rebuilt its state from the others (its data dir was lost)
    /// now holds that state durably: from here on a restart may trust its disk.
    Rejoined,
    /// A replica that booted with no memory was told by a peer that the cluster has a
    /// history: it rebuilds from the others. Durably mark the data dir as rejoining before
    /// the next action, so that a crash mid-rebuild rebuilds again (`Storage::begin_rejoin`).
    BeginRejoin,
}

/// Write tokens: kind in the top byte, the peer's stream generation, the index.
const TOK_ENTRY: u64 = 1 << 56;
const TOK_WRAP: u64 = 2 << 56;
const TOK_COMMIT: u64 = 3 << 56;
const TOK_PROGRESS: u64 = 4 << 56;
const TOK_HEARTBEAT: u64 = 5 << 56;

fn token(kind: u64, gen: u64, index: Index) -> u64 {
    kind | (gen & 0xffff) << 40 | (index & ((1 << 40) - 1))
}
fn token_kind(t: u64) -> u64 {
    t & (0xff << 56)
}
fn token_gen(t: u64) -> u64 {
    (t >> 40) & 0xffff
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerState {
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
struct Peer {
    state: PeerState,
    stream: u64,
    gen: u64,
    next: Index,
    cursor: RingCursor,
    consumed: u64,
    /// Highest index known accepted (volatile) or persisted (durable) by this peer.
    acked: Index,
    outstanding: u32,
    last_contact: u64,
    commit_sent: Index,
    commit_sent_at: u64,
    prepare_sent_at: u64,
    /// The last recovery of this peer we answered (its acknowledgements were reset then).
    recovery_nonce: u64,
    /// The generation our `Resync` / `NeedCheckpoint` names (0: not asked yet): only a
    /// stream-only promise echoing it restarts the peer, so a stale one never does.
    ask: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Leadership {
    ballot: Ballot,
    peers: BTreeMap<NodeId, Peer>,
    since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Chunks {
    chunks: u32,
    got: BTreeMap<u32, Vec<Arc<[u8]>>>,
    header: Option<(u64, Index, Index, u64)>,
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
struct Candidacy {
    ballot: Ballot,
    from: Index,
    started: u64,
    last_prepare: u64,
    /// Per acceptor: stream/received/persisted (in `header`) and entries, possibly chunked.
    promises: BTreeMap<NodeId, Chunks>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Recovery {
    nonce: u64,
    asked_at: u64,
    /// Per responder, its answer so far.
    answers: BTreeMap<NodeId, Answer>,
    /// A majority answered but compacted: the outcome waits for a checkpoint.
    pending: Option<Recovered>,
    /// A majority answered, but not the leader they name: since when we wait for it.
    waiting_since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Recovered {
    promised: Ballot,
    commit: Index,
    /// The most compacted answer's base: entries up to it were chosen, but the answers hold
    /// them only in checkpoints. The rebuild must stand on a checkpoint at or past it.
    base: Index,
    /// Per index, the value accepted with the highest ballot among the answers.
    best: BTreeMap<Index, Slot>,
}

/// One responder's answer to a recovery, pulled chunk by chunk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Answer {
    promised: Ballot,
    commit: Index,
    base: Index,
    /// The next index to ask for.
    next: Index,
    /// The responder's last index at its first answer: complete once `next` passes it.
    target: Index,
    done: bool,
    entries: Vec<Arc<[u8]>>,
}

/// A checkpoint being pulled from `from`; `index` 0 until the first chunk names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pull {
    from: NodeId,
    index: Index,
    offset: u64,
    asked_at: u64,
    tries: u32,
    /// Sources tried so far (the pull is abandoned after every member).
    sources: u32,
}

/// Unanswered requests to one source before the pull moves to another.
const PULL_TRIES: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Role {
    Follower,
    Candidate(Candidacy),
    Leader(Leadership),
    Recovering(Recovery),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Fenced {
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
    cfg: Config,
    promised: Ballot,
    max_seen: Ballot,
    log: Log,
    /// Entries `1..=received` match the current leader's log (the current stream's prefix).
    received: Index,
    commit: Index,
    applied: Index,
    persisted: Index,
    persist_seq: u64,
    /// A persist completion below `persist_barrier` may not raise `persisted` past the cap:
    /// entries at or above `persist_cap + 1` were overwritten after it was requested.
    persist_barrier: u64,
    persist_cap: Index,
    persist_from: Option<Index>,
    /// The highest index of any persist request made (completed or not).
    persist_submitted: Index,
    stream: u64,
    /// Random per start (from the seed): keeps ticket numbers of incarnations apart.
    incarnation: u64,
    consumed: u64,
    role: Role,
    tick: u64,
    rng: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    actions: VecDeque<Action>,
    heartbeat: u64,
    hb_seen: u64,
    quiet: u32,
    backoff: u32,
    fenced: VecDeque<Fenced>,
    progress_dirty: bool,
    pull: Option<Pull>,
    /// Durable recovery: the rebuilt log is durable once `persisted` reaches this.
    rejoin_target: Option<Index>,
    /// The promised ballot once its leader has written to us (an entry or the commit cell):
    /// `established == promised` is the "normal" status in which we answer recoveries.
    established: Ballot,
    /// Booted with no memory (not restored, not rebuilt) and not yet established by a
    /// leader: our votes carry this id (random, not 0), so that a peer that knew us
    /// otherwise refuses them. 0 once established, restored or rebuilt.
    blank: u64,
    /// What we know of each peer's memory: 0 seen with one, or the id of the blank
    /// incarnation seen. A blank vote that contradicts it is refused (`Nack::recover`).
    known: BTreeMap<NodeId, u64>,
    /// `known` started empty although this replica has a history (restored from disk, or
    /// rebuilt): a blank vote of a peer it has no record of may come from a lost memory, so
    /// it is refused too (the peer rebuilds; a first start has no such replica).
    known_incomplete: bool,
    /// Write generations handed out to peer streams, unique within this incarnation, so that
    /// no completion of an earlier stream or leadership is counted in a later one.
    write_gen: u64,
    /// Follower: the last `Resync` / `NeedCheckpoint` generation of our leader we acted on.
    answered: u64,
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
            queue: VecDeque::new(),
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

    /// Amnesia: answer no Prepare and grant no write permission until a majority of the
    /// others has told us their state (`on_recover_resp`).
    fn start_recovery(&mut self) {
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

    /// Records what a message of `from` says of its memory; false if it is a blank vote
    /// of a replica we knew otherwise (it lost its memory: its vote must not count).
    fn admit_vote(&mut self, from: NodeId, blank: u64) -> bool {
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

    /// A blank replica was refused by a peer that knew it with a memory: it lost it (a wiped
    /// data dir started without `--rejoin`), so it rebuilds like a rejoining replica.
    fn recover_from_blank(&mut self) {
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

    /// A replica restarted in durable mode from its disk: the promise, the index of the
    /// checkpoint its state machine was restored from (0: none) and the persisted entries
    /// after it (encoded, contiguous from `base + 1`).
    pub fn restore(
        cfg: Config,
        promised: Ballot,
        base: Index,
        entries: Vec<Arc<[u8]>>,
    ) -> Result<Core, ConfigError> {
        let mut c = Core::new(cfg, false)?;
        // It remembers, even if that is nothing (a data dir that lost its contents is not
        // restored: the node starts it blank with `Core::new`, or rebuilding with --rejoin).
        c.blank = 0;
        c.known_incomplete = true;
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

    // ----- accessors -----

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The first ticket number this incarnation should use: entries proposed by an earlier
    /// incarnation of this replica (same node id) must not complete this one's tickets.
    pub fn first_ticket(&self) -> u64 {
        (self.incarnation & 0xff_ffff) << 32 | 1
    }
    pub fn promised(&self) -> Ballot {
        self.promised
    }
    pub fn commit(&self) -> Index {
        self.commit
    }
    pub fn applied(&self) -> Index {
        self.applied
    }
    pub fn received(&self) -> Index {
        self.received
    }
    pub fn persisted(&self) -> Index {
        self.persisted
    }
    pub fn log(&self) -> &Log {
        &self.log
    }
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }
    /// Booted with no memory and not yet established, restored or rebuilt: its votes carry
    /// a blank id (`Promise::blank`).
    pub fn is_blank(&self) -> bool {
        self.blank != 0
    }
    pub fn is_recovering(&self) -> bool {
        matches!(self.role, Role::Recovering(_))
    }
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

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
    /// Largest command `propose` accepts.
    pub fn max_command(&self) -> usize {
        self.cfg.batch_bytes - batch::COMMAND_OVERHEAD
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ----- events -----

    /// Queues a client command; it is batched into an entry at the next `flush`.
    pub fn propose(&mut self, ticket: u64, cmd: Vec<u8>) -> Result<(), ProposeError> {
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
        self.queue.push_back((ticket, cmd));
        Ok(())
    }

    /// Time passes by one tick.
    pub fn tick(&mut self) {
        self.tick += 1;
        self.pull_tick();
        match &self.role {
            Role::Leader(_) => self.leader_tick(),
            Role::Candidate(c) => {
                let (started, last) = (c.started, c.last_prepare);
                if self.tick - started > u64::from(self.cfg.election_timeout) {
                    self.give_up_candidacy();
                } else if self.tick - last >= u64::from(self.cfg.election_timeout / 4).max(1) {
                    self.resend_prepares();
                }
            }
            Role::Recovering(r) => {
                let patience = 2 * u64::from(self.cfg.election_timeout);
                if r.waiting_since.is_some_and(|t| self.tick - t > patience) {
                    // The leader the answers named is gone: ask everyone again, afresh.
                    if let Role::Recovering(r) = &mut self.role {
                        r.answers.clear();
                        r.waiting_since = None;
                        r.asked_at = 0;
                    }
                    return;
                }
                if r.pending.is_none()
                    && self.tick - r.asked_at >= u64::from(self.cfg.heartbeat_timeout / 2).max(1)
                {
                    // Repeat to every replica whose answer is not complete, from where it is.
                    let nonce = r.nonce;
                    let asks: Vec<_> = self
                        .others()
                        .map(|n| (n, r.answers.get(&n)))
                        .filter(|(_, a)| a.is_none_or(|a| !a.done))
                        .map(|(n, a)| (n, a.map_or(1, |a| a.next)))
                        .collect();
                    if let Role::Recovering(r) = &mut self.role {
                        r.asked_at = self.tick;
                    }
                    for (to, from) in asks {
                        self.push(Action::Send {
                            to,
                            msg: Msg::RecoverReq { nonce, from },
                        });
                    }
                }
            }
            Role::Follower => self.follower_tick(),
        }
    }

    pub fn handle_message(&mut self, from: NodeId, msg: Msg) {
        if from == self.cfg.id || !self.cfg.members.contains(&from) {
            return;
        }
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
    pub fn handle_landed(&mut self, h: &EntryHeader, bytes: &[u8], consumed: u64) {
        self.consumed = consumed;
        self.progress_dirty = true;
        // The reader only returns entries of the promised ballot at `received + 1`.
        if h.ballot != self.promised || h.index != self.received + 1 || self.is_leader() {
            return;
        }
        // The reader verified seal and checksum: keep the bytes without decoding them again.
        let (i, slot) = (
            h.index,
            Slot {
                ballot: h.ballot,
                flags: h.flags,
                bytes: Arc::from(bytes),
            },
        );
        self.accept(i, slot);
        self.received = i;
        self.establish();
        self.learn_commit(h.commit.min(i));
    }

    /// Our promised leader wrote to us: it won its phase 1, and we are in its stream.
    fn establish(&mut self) {
        self.established = self.promised;
        self.blank = 0;
    }

    /// The fence requested by `FenceAndDrain` is in force and the ring is drained.
    pub fn handle_fenced(&mut self) {
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
        for a in decided.into_iter().rev() {
            self.actions.push_front(a);
        }
    }

    pub fn handle_completion(&mut self, c: Completion) {
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
        match token_kind(token) {
            TOK_HEARTBEAT => {
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
            TOK_PROGRESS => self.progress_dirty |= result.is_err(),
            TOK_ENTRY | TOK_WRAP | TOK_COMMIT => {
                self.on_write_done(peer, token, result.map(|_| ()))
            }
            _ => {}
        }
    }

    /// A peer's progress cell in the local header changed.
    pub fn handle_progress(&mut self, peer: NodeId, cell: ProgressCell) {
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
        if cell.stream != p.stream && p.state == PeerState::Streaming {
            // The follower reads a stream we are not writing (it restarted, and the promise
            // saying so was lost): start over, through a Resync it will answer.
            p.state = PeerState::Resyncing { asked_at: None };
            return;
        }
        if p.state != PeerState::Streaming || cell.stream != p.stream {
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
        if cell.ballot == self.promised && !self.is_leader() {
            self.establish();
            let cap = match self.cfg.bugs.follower_commit_uncapped {
                false => self.received,
                true => self.log.last(),
            };
            self.learn_commit(cell.commit.min(cap));
        }
    }

    /// The persist request `seq` completed.
    pub fn handle_persisted(&mut self, seq: u64, to: Index) {
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
                    token: TOK_PROGRESS,
                });
            }
        }
    }

    /// Gives up leadership and refuses further proposals (shutdown).
    pub fn shutdown(&mut self) {
        for (ticket, _) in std::mem::take(&mut self.queue) {
            self.push(Action::Reject {
                ticket,
                error: ProposeError::ShuttingDown,
            });
        }
    }

    // ----- internals -----

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn random(&mut self) -> u64 {
        crate::types::xorshift(&mut self.rng)
    }

    fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.cfg
            .members
            .iter()
            .copied()
            .filter(move |&n| n != self.cfg.id)
    }

    fn broadcast(&mut self, msg: Msg) {
        let others: Vec<_> = self.others().collect();
        for to in others {
            self.push(Action::Send {
                to,
                msg: msg.clone(),
            });
        }
    }

    fn reported_persisted(&self) -> Index {
        match self.cfg.durability {
            Durability::Volatile => self.received,
            Durability::Durable => self.persisted.min(self.received),
        }
    }

    /// Accepts `slot` at `i` into the log (and, durably, schedules it for disk).
    fn accept(&mut self, i: Index, slot: Slot) {
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

    fn flush_persist(&mut self) {
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

    fn learn_commit(&mut self, c: Index) {
        if c > self.commit {
            contract!(c <= self.log.last(), "contract: commit within the log");
            self.commit = c;
            self.progress_dirty = true;
            self.apply_committed();
        }
    }

    fn apply_committed(&mut self) {
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

    // --- failure detection and elections ---

    fn follower_tick(&mut self) {
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
                token: TOK_HEARTBEAT,
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
    fn candidacy_delay(&self) -> u32 {
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

    fn leader_alive(&self) -> bool {
        match &self.role {
            Role::Leader(l) => self.quorum_contact(l),
            Role::Follower => {
                self.leader_hint().is_some() && self.quiet < self.cfg.heartbeat_timeout
            }
            _ => false,
        }
    }

    fn quorum_contact(&self, l: &Leadership) -> bool {
        let recent = |p: &Peer| {
            self.tick.saturating_sub(p.last_contact) <= u64::from(self.cfg.heartbeat_timeout)
        };
        let alive = 1 + l.peers.values().filter(|p| recent(p)).count();
        alive >= self.cfg.majority() || self.tick - l.since <= u64::from(self.cfg.heartbeat_timeout)
    }

    fn start_candidacy(&mut self) {
        if self.is_leader() || self.is_recovering() || self.pull.is_some() {
            return;
        }
        let blank = self.blank;
        let ballot = self.promised.max(self.max_seen).next_for(self.cfg.id);
        self.promised = ballot;
        self.max_seen = ballot;
        if self.cfg.durability == Durability::Durable {
            self.push(Action::PersistPromise(ballot));
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
                header: Some((self.stream, self.commit, self.reported_persisted(), 0)),
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

    fn resend_prepares(&mut self) {
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

    fn give_up_candidacy(&mut self) {
        self.role = Role::Follower;
        self.quiet = 0;
        self.backoff = (self.random() % u64::from(self.cfg.heartbeat_timeout).max(1)) as u32;
    }

    fn step_down(&mut self) {
        if let Role::Leader(_) = self.role {
            // Queued commands never entered the log: they definitely failed.
            for (ticket, _) in std::mem::take(&mut self.queue) {
                let error = ProposeError::NotLeader { leader: None };
                self.push(Action::Reject { ticket, error });
            }
            self.push(Action::LeadershipLost);
        }
        self.role = Role::Follower;
        self.quiet = 0;
        self.backoff = (self.random() % u64::from(self.cfg.heartbeat_timeout).max(1)) as u32;
    }

    // --- acceptor ---

    fn on_prepare(&mut self, from: NodeId, ballot: Ballot, idx: Index, blank: u64, gen: u64) {
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

    fn promise(&mut self, to: NodeId, ballot: Ballot, from: Index, gen: u64) {
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
            self.push(Action::PersistPromise(ballot));
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
    fn start_stream(&mut self, to: NodeId) {
        self.received = self.commit;
        self.stream = self.stream.wrapping_add(1);
        self.consumed = 0;
        self.push(Action::ResetRing {
            ballot: self.promised,
            expect: self.received + 1,
        });
        self.push(Action::SetWriter(Some(to)));
    }

    fn send_nack(&mut self, to: NodeId, leader_alive: bool, recover: bool) {
        let msg = Msg::Nack {
            promised: self.promised,
            leader_alive,
            recover,
        };
        self.push(Action::Send { to, msg });
    }

    fn send_promise(&mut self, to: NodeId, ballot: Ballot, from: Index) {
        let entries: Vec<_> = self.log.range(from).map(|(_, s)| s.bytes.clone()).collect();
        let chunks = msg::chunk_entries(entries, self.cfg.message_bytes);
        let n = chunks.len() as u32;
        for (k, entries) in chunks.into_iter().enumerate() {
            let p = Promise {
                ballot,
                from,
                stream: self.stream,
                received: self.received,
                consumed: self.consumed,
                persisted: self.reported_persisted(),
                commit: self.commit,
                base: self.log.base(),
                chunk: k as u32,
                chunks: n,
                blank: self.blank,
                gen: self.answered,
                entries,
            };
            self.push(Action::Send {
                to,
                msg: Msg::Promise(p),
            });
        }
    }

    fn on_resync(&mut self, from: NodeId, ballot: Ballot, gen: u64) {
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
    fn send_promise_header(&mut self, to: NodeId) {
        let p = Promise {
            ballot: self.promised,
            from: msg::STREAM_ONLY,
            stream: self.stream,
            received: self.received,
            consumed: self.consumed,
            persisted: self.reported_persisted(),
            commit: self.commit,
            base: self.log.base(),
            chunk: 0,
            chunks: 1,
            blank: self.blank,
            gen: self.answered,
            entries: vec![],
        };
        self.push(Action::Send {
            to,
            msg: Msg::Promise(p),
        });
    }

    fn on_nack(&mut self, promised: Ballot, leader_alive: bool, recover: bool) {
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

    // --- candidate and leader ---

    fn on_promise(&mut self, from: NodeId, p: Promise) {
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
                if p.base >= c.from && !self.cfg.bugs.phase1_ignores_base {
                    // The acceptor compacted entries we would have to adopt: they are chosen,
                    // but only its checkpoint holds them. Catch up first, stand later.
                    self.give_up_candidacy();
                    self.start_pull(from);
                    return;
                }
                let e = c.promises.entry(from).or_default();
                e.add(p.chunk, p.chunks, p.entries);
                e.header = Some((p.stream, p.received, p.persisted, p.consumed));
                self.try_win();
            }
            Role::Leader(l) if p.ballot == l.ballot => {
                let durable = self.cfg.durability == Durability::Durable;
                let tick = self.tick;
                let peer = l.peers.get_mut(&from).expect("members have peer state");
                // A stream is taken up only from the answer we wait for: a phase-1 answer
                // while the peer has not promised, or a stream-only promise echoing our
                // request. Anything else is a duplicate or stale, or (a follower that
                // restarted on its own) is asked again.
                let expected = match (&peer.state, p.from == msg::STREAM_ONLY) {
                    // `ask` 0: a late answer to the candidacy's own Prepare.
                    (PeerState::Unpromised, false) => p.gen == peer.ask,
                    (PeerState::Resyncing { .. } | PeerState::NeedsCheckpoint { .. }, true) => {
                        peer.ask != 0 && p.gen == peer.ask
                    }
                    _ => false,
                };
                if !expected {
                    if peer.state == PeerState::Streaming && peer.stream != p.stream {
                        peer.state = PeerState::Resyncing { asked_at: None };
                    }
                    return;
                }
                if peer.outstanding > 0 {
                    // Writes of the old stream are in flight; they must finish first.
                    peer.state = PeerState::Resyncing { asked_at: None };
                    return;
                }
                self.write_gen += 1;
                let at = (p.stream, p.received, p.persisted, p.consumed);
                Self::restart_peer(peer, at, durable, tick, self.cfg.ring, self.write_gen);
            }
            _ => {}
        }
    }

    /// The peer promised a stream `(stream, received, persisted, consumed)`: write it from
    /// `received + 1`, at the slot its reader reached, under a new write generation `gen`.
    fn restart_peer(
        peer: &mut Peer,
        (stream, received, persisted, consumed): (u64, Index, Index, u64),
        durable: bool,
        tick: u64,
        ring: RingGeometry,
        gen: u64,
    ) {
        debug_assert!(gen > peer.gen, "contract: write generations only grow");
        peer.state = PeerState::Streaming;
        peer.stream = stream;
        peer.gen = gen;
        peer.next = received + 1;
        peer.cursor = RingCursor::resume(ring, consumed);
        peer.consumed = consumed;
        peer.acked = if durable {
            persisted.min(received)
        } else {
            received
        };
        peer.last_contact = tick;
        peer.commit_sent = 0;
        peer.ask = 0;
    }

    fn try_win(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        let done = c.promises.values().filter(|p| p.complete()).count();
        let need = if self.cfg.bugs.short_quorum {
            self.cfg.majority() - 1
        } else {
            self.cfg.majority()
        };
        if done < need {
            return;
        }
        let Role::Candidate(c) = std::mem::replace(&mut self.role, Role::Follower) else {
            unreachable!()
        };
        let (ballot, from) = (c.ballot, c.from);
        // Adopt, per index, the value accepted with the highest ballot.
        let mut best: BTreeMap<Index, Slot> = BTreeMap::new();
        for p in c.promises.values().filter(|p| p.complete()) {
            for bytes in p.got.values().flatten() {
                let Ok((i, slot)) = Slot::from_encoded(bytes.clone()) else {
                    continue;
                };
                if i < from {
                    continue;
                }
                let higher = |b: &Slot| match self.cfg.bugs.adopt_lowest_ballot {
                    false => slot.ballot > b.ballot,
                    true => slot.ballot < b.ballot,
                };
                if best.get(&i).is_none_or(higher) {
                    best.insert(i, slot);
                }
            }
        }
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
        let durable = self.cfg.durability == Durability::Durable;
        let mut peers = BTreeMap::new();
        for n in self.others().collect::<Vec<_>>() {
            let mut peer = Peer {
                state: PeerState::Unpromised,
                stream: 0,
                gen: 0,
                next: 1,
                cursor: RingCursor::new(self.cfg.ring),
                consumed: 0,
                acked: 0,
                outstanding: 0,
                last_contact: self.tick,
                commit_sent: 0,
                commit_sent_at: 0,
                prepare_sent_at: self.tick,
                recovery_nonce: 0,
                ask: 0,
            };
            if let Some(p) = c.promises.get(&n).filter(|p| p.complete()) {
                let at = p.header.expect("complete promise has a header");
                self.write_gen += 1;
                Self::restart_peer(
                    &mut peer,
                    at,
                    durable,
                    self.tick,
                    self.cfg.ring,
                    self.write_gen,
                );
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

    fn leader_tick(&mut self) {
        self.heartbeat += 1;
        self.push(Action::Heartbeat(self.heartbeat));
        let Role::Leader(l) = &self.role else { return };
        if !self.quorum_contact(l) {
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
                    if p.ask == 0 {
                        self.write_gen += 1;
                        p.ask = self.write_gen;
                    }
                    let gen = p.ask;
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
                    p.state = PeerState::Resyncing {
                        asked_at: Some(tick),
                    };
                    if p.ask == 0 {
                        self.write_gen += 1;
                        p.ask = self.write_gen;
                    }
                    sends.push((n, Msg::Resync { ballot, gen: p.ask }));
                }
                PeerState::NeedsCheckpoint { asked_at }
                    if asked_at.is_none_or(|t| tick - t >= every) =>
                {
                    p.state = PeerState::NeedsCheckpoint {
                        asked_at: Some(tick),
                    };
                    if p.ask == 0 {
                        self.write_gen += 1;
                        p.ask = self.write_gen;
                    }
                    sends.push((n, Msg::NeedCheckpoint { ballot, gen: p.ask }));
                }
                _ => {}
            }
        }
        for (to, msg) in sends {
            self.push(Action::Send { to, msg });
        }
    }

    /// Forms entries from queued commands and streams the log to every follower.
    fn replicate(&mut self) {
        let Role::Leader(l) = &self.role else { return };
        let ballot = l.ballot;
        // Adaptive batching: whatever is queued, while the window has room.
        while !self.queue.is_empty() && self.log.last() - self.commit < self.cfg.window {
            // The batch is built in place, behind room for the entry header: one buffer,
            // one checksum pass.
            let hdr = layout::ENTRY_HEADER_SIZE;
            let mut buf = Vec::with_capacity(hdr + self.cfg.batch_bytes.min(64 << 10) + 16);
            buf.resize(hdr, 0);
            while let Some((_, cmd)) = self.queue.front() {
                let add = batch::COMMAND_OVERHEAD + cmd.len();
                if buf.len() > hdr && buf.len() - hdr + add > self.cfg.batch_bytes {
                    break;
                }
                let (ticket, cmd) = self.queue.pop_front().unwrap();
                batch::push(&mut buf, batch::origin(self.cfg.id, ticket), &cmd);
            }
            let i = self.log.last() + 1;
            let len = (buf.len() - hdr) as u32;
            let h = EntryHeader {
                index: i,
                ballot,
                commit: self.commit,
                len,
                flags: 0,
            };
            layout::seal_entry(&mut buf, &h);
            self.accept(
                i,
                Slot {
                    ballot,
                    flags: 0,
                    bytes: Arc::from(buf),
                },
            );
            self.received = i;
        }
        let last = self.log.last();
        let (tick, commit) = (self.tick, self.commit);
        let every = u64::from(self.cfg.heartbeat_timeout / 4).max(1);
        let geo = self.cfg.ring;
        let max_out = self.cfg.max_outstanding;
        let writes = &mut self.actions;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        for (&n, p) in l.peers.iter_mut() {
            if p.state == PeerState::Streaming && p.next <= self.log.base() {
                // What it needs next is only in our checkpoint.
                p.state = PeerState::NeedsCheckpoint { asked_at: None };
            }
            let catching_up = matches!(p.state, PeerState::NeedsCheckpoint { .. });
            if p.state != PeerState::Streaming && !catching_up {
                continue;
            }
            while !catching_up && p.next <= last && p.outstanding < max_out {
                let slot = self.log.get(p.next).expect("index within log");
                if slot.ballot != ballot {
                    // Catch-up below our adopted range: the chosen value, under our ballot.
                    let s = slot.restamp(p.next, ballot, commit);
                    self.log.put(p.next, s);
                }
                let slot = self.log.get(p.next).unwrap();
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
                        offset: geo.slot_offset(w),
                        data,
                        token: token(TOK_WRAP, p.gen, p.next),
                    });
                    p.outstanding += 1;
                }
                let data = Data::Shared(slot.bytes.clone());
                let t = token(TOK_ENTRY, p.gen, p.next);
                writes.push_back(Action::Write {
                    peer: n,
                    offset: geo.slot_offset(at.slot),
                    data,
                    token: t,
                });
                p.outstanding += 1;
                p.next += 1;
            }
            // The commit cell carries the commit when no entry does, and doubles as a
            // periodic probe: a follower that stopped consuming (it may have fenced us) is
            // still written to, so a refusal reaches us.
            // (Also to a replica pulling a checkpoint: if it fenced us to stand, the refusal
            // makes us step down and the election that follows lets it rejoin.)
            let idle = p.next > last || catching_up;
            let due = tick - p.commit_sent_at >= every;
            if p.outstanding < max_out && ((idle && p.commit_sent < commit) || due) {
                p.commit_sent = commit;
                p.commit_sent_at = tick;
                let cell = CommitCell { commit, ballot }.encode();
                let t = token(TOK_COMMIT, p.gen, commit);
                writes.push_back(Action::Write {
                    peer: n,
                    offset: layout::COMMIT_CELL_OFFSET,
                    data: Data::inline(&cell),
                    token: t,
                });
                p.outstanding += 1;
            }
        }
        self.advance_commit();
    }

    fn on_write_done(&mut self, peer: NodeId, token: u64, result: Result<(), FabricError>) {
        let volatile = self.cfg.durability == Durability::Volatile;
        let tick = self.tick;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(p) = l.peers.get_mut(&peer) else {
            return;
        };
        if token_gen(token) != p.gen & 0xffff {
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
                let idx = token & ((1 << 40) - 1);
                if volatile && token_kind(token) == TOK_ENTRY && p.state == PeerState::Streaming {
                    p.acked = p.acked.max(idx);
                    self.advance_commit();
                }
            }
            Err(FabricError::PermissionDenied(_)) => self.step_down(),
            Err(_) => {
                if p.state == PeerState::Streaming {
                    p.state = PeerState::Resyncing { asked_at: None };
                }
            }
        }
    }

    fn advance_commit(&mut self) {
        let Role::Leader(l) = &self.role else { return };
        let own = match self.cfg.durability {
            Durability::Volatile => self.log.last(),
            Durability::Durable => self.persisted.min(self.log.last()),
        };
        let twice = self.cfg.bugs.self_counted_twice.then_some(own);
        let mut acks: Vec<Index> = std::iter::once(own)
            .chain(twice)
            .chain(l.peers.values().map(|p| p.acked))
            .collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let q = if self.cfg.bugs.short_quorum {
            self.cfg.majority() - 1
        } else {
            self.cfg.majority()
        };
        let mut chosen = acks[q.max(1) - 1];
        if self.cfg.bugs.commit_off_by_one {
            chosen = (chosen + 1).min(self.log.last());
        }
        if chosen > self.commit {
            self.learn_commit(chosen);
        }
    }

    fn rejoin_leader(&mut self) {
        if self.promised != Ballot::ZERO && self.promised.node() != self.cfg.id {
            let l = self.promised.node();
            self.start_stream(l);
            self.send_promise_header(l);
        }
    }

    // --- recovery (volatile mode amnesia) ---

    fn on_recover_req(&mut self, to: NodeId, nonce: u64, from: Index) {
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
                        self.write_gen += 1;
                        p.recovery_nonce = nonce;
                        p.state = PeerState::Unpromised;
                        // Only an answer to a Prepare sent from now on is taken up.
                        self.write_gen += 1;
                        p.ask = self.write_gen;
                        p.acked = 0;
                        p.gen = self.write_gen;
                        p.outstanding = 0;
                        p.prepare_sent_at = tick;
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

    fn on_recover_resp(&mut self, from: NodeId, r: RecoverResp) {
        let Role::Recovering(rec) = &mut self.role else {
            return;
        };
        if r.nonce != rec.nonce || rec.pending.is_some() {
            return;
        }
        let a = rec.answers.entry(from).or_insert_with(|| Answer {
            next: 1,
            target: r.last,
            ..Answer::default()
        });
        if a.done || r.from != a.next {
            return; // a duplicate, or an answer to an earlier request
        }
        a.promised = a.promised.max(r.promised);
        // Its commit vouches for the entries it sends, which stop at its log's end when it
        // first answered: a commit learned later may cover values we never get from it
        // (found by the simulator: a rebuild applied another answer's unchosen value).
        a.commit = a.commit.max(r.commit.min(a.target));
        a.base = a.base.max(r.base);
        let last = r
            .entries
            .last()
            .and_then(|e| layout::decode_entry(e).ok())
            .map(|(h, _)| h.index);
        match last {
            Some(last) => a.next = last + 1,
            None => a.done = true, // nothing from `from` on
        }
        a.entries.extend(r.entries);
        a.done |= a.next > a.target;
        if !a.done {
            let (nonce, next) = (rec.nonce, a.next);
            self.push(Action::Send {
                to: from,
                msg: Msg::RecoverReq { nonce, from: next },
            });
            return;
        }
        // A majority of the *other* replicas: their promises cover any promise we made
        // before we forgot it, and their logs (or checkpoints) cover anything chosen with
        // our help.
        let others = self.cfg.members.len() - 1;
        let need = (others / 2 + 1).min(others) - usize::from(self.cfg.bugs.recovery_short_quorum);
        let complete: Vec<_> = rec.answers.iter().filter(|(_, a)| a.done).collect();
        if complete.len() < need {
            return;
        }
        let promised = complete
            .iter()
            .map(|a| a.1.promised)
            .max()
            .unwrap_or(Ballot::ZERO);
        // The leader they name must have answered too: it stopped counting our earlier
        // acknowledgements when it did, and its answer holds whatever it chose with them
        // (with 5 or more replicas, the others may have answered before it reached them).
        let leader = promised.node();
        if promised != Ballot::ZERO
            && leader != self.cfg.id
            && !complete.iter().any(|(&n, _)| n == leader)
            && !self.cfg.bugs.recovery_no_leader_wait
        {
            rec.waiting_since.get_or_insert(self.tick);
            return;
        }
        let commit = complete.iter().map(|a| a.1.commit).max().unwrap_or(0);
        let (base, source) = complete
            .iter()
            .map(|(&n, a)| (a.base, n))
            .max()
            .unwrap_or((0, from));
        let mut best: BTreeMap<Index, Slot> = BTreeMap::new();
        for (_, a) in &complete {
            for bytes in &a.entries {
                let Ok((i, slot)) = Slot::from_encoded(bytes.clone()) else {
                    continue;
                };
                if best.get(&i).is_none_or(|b| slot.ballot > b.ballot) {
                    best.insert(i, slot);
                }
            }
        }
        let out = Recovered {
            promised,
            commit,
            base,
            best,
        };
        if base <= self.applied {
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
    fn try_finish_recovery(&mut self, out: Recovered) {
        let base = self.applied;
        let max = out.best.keys().next_back().copied().unwrap_or(0);
        let above = out.best.range(base + 1..).count() as Index;
        // Standing on a checkpoint older than the most compacted answer would take, for the
        // indexes in between, values of answers that other answers hold only in their
        // checkpoints: the highest ballot among what is left is not the chosen value (the
        // rule of phase 1, where a candidate behind an acceptor's base pulls first).
        let covered = base >= out.base || self.cfg.bugs.recovery_ignores_base;
        if covered && (max <= base || above == max - base) {
            self.finish_recovery(out, base);
        } else if let Role::Recovering(r) = &mut self.role {
            r.answers.clear();
            r.waiting_since = None;
            r.asked_at = 0;
        }
    }

    /// Takes the recovered state as this replica's own, on top of checkpoint `base`.
    fn finish_recovery(&mut self, r: Recovered, base: Index) {
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
            self.push(Action::PersistPromise(self.promised));
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

    fn check_rejoined(&mut self) {
        if self.rejoin_target.is_some_and(|t| self.persisted >= t) {
            self.rejoin_target = None;
            self.push(Action::Rejoined);
        }
    }

    // --- checkpoints: compaction and catch-up ---

    /// Whether this replica is pulling a checkpoint.
    pub fn is_pulling(&self) -> bool {
        self.pull.is_some()
    }

    /// A checkpoint covering `upto` is kept (durably, in durable mode): drop the log up to
    /// it. Precondition: `upto <= applied` (a checkpoint holds applied state only).
    pub fn compact(&mut self, upto: Index) {
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

    fn after_compaction(&mut self, upto: Index) {
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

    fn start_pull(&mut self, from: NodeId) {
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
    fn pull_tick(&mut self) {
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

    fn abandon_pull(&mut self) {
        self.pull = None;
        if let Role::Recovering(r) = &mut self.role {
            // Start recovery over: the answers may have moved on by now.
            r.pending = None;
            r.answers.clear();
            r.waiting_since = None;
            r.asked_at = 0;
        }
    }

    fn on_ckpt_chunk(
        &mut self,
        from: NodeId,
        index: Index,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    ) {
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
