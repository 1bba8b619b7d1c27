//! Runs a [`Replica`] on its own thread.
//!
//! Proposals reach the replica thread through a bounded `crossbeam` channel; each carries a
//! one-shot reply channel that the thread completes once the command is applied here (or
//! refused). A [`Handle`] (cheap to clone, usable from any thread) proposes, either
//! blocking with a timeout ([`Handle::propose`]) or returning a waitable [`Ticket`]
//! ([`Handle::submit`]) for callers with many commands outstanding, or handing a batch of
//! tagged commands ([`Proposals`], one message for the whole batch) whose outcomes arrive on
//! a shared [`CompletionSink`] ([`Handle::submit_batch`]), one [`Completions`] per step,
//! for event loops that must never block. Batches keep their commands and outputs back to
//! back in one buffer each: nothing is allocated per command on the way in or out.
//!
//! The thread's clock is an [`Instant`]: 1 tick = 1 ms, the unit of [`Config::new`]'s
//! timeouts.
//!
//! # Idle strategy
//!
//! [`IdleStrategy`] ([`RuntimeConfig::idle`]), the one idle policy of every replica loop:
//!
//! - [`IdleStrategy::Pinned`], a dedicated core: pinned with `core_affinity`, and
//!   busy-polls (lowest latency; the core is burnt), offering the core to another thread
//!   pinned there now and then.
//! - [`IdleStrategy::Shared`] (the default): after `spin` consecutive idle steps it yields
//!   the CPU, and after `spin + yields` it parks for `park` (waking early when a proposal
//!   arrives). Any useful step resets the count. This keeps three replicas on a 2-core
//!   machine live.
//!
//! [`Config::new`]: crate::protocol::Config::new

use crate::driver::{Outcome, Replica, StateMachine};
use crate::fabric::Fabric;
use crate::handoff::{Completions, Proposals};
use crate::metrics::Metrics;
use crate::protocol::ProposeError;
use crate::tickets::TicketMap;
use crate::types::{Index, NodeId};
use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A seed for [`crate::protocol::Config::new`] that differs on every start of replica
/// `id` (from the wall clock).
pub fn clock_seed(id: NodeId) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(id) << 56
}

/// How the replica thread runs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How the thread waits when a step found nothing to do (and whether it is pinned).
    pub idle: IdleStrategy,
    /// Capacity of the proposal channel; a full channel makes proposals fail with `Busy`.
    pub queue: usize,
    /// Thread name.
    pub name: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            idle: IdleStrategy::default(),
            queue: 4096,
            name: "ballot-replica".into(),
        }
    }
}

/// How a replica thread waits when a turn found nothing to do: the one idle policy of every
/// replica loop (`ballot-node`'s, an embedder's, `ballot-bench`'s threads topology).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleStrategy {
    /// A dedicated core: pin the thread to `core` and busy-poll (lowest latency; the core
    /// is burnt). Every [`IdleStrategy::PINNED_YIELD_EVERY`] idle turns it offers the core
    /// with `sched_yield`, which returns at once when nothing else wants it, so that two
    /// threads pinned to one core (more replicas than cores) take turns instead of each
    /// burning a whole time slice.
    Pinned {
        /// The core (`core_affinity` numbering).
        core: usize,
    },
    /// Shared cores: after `spin` consecutive idle turns yield the CPU, and after `spin +
    /// yields` park for `park` (waking early when there is work, for example a proposal).
    /// Any useful turn starts the count again. This keeps three replicas (and their
    /// fabrics' threads) live on two cores.
    Shared {
        /// Idle turns spent spinning before yielding.
        spin: u32,
        /// Idle turns spent yielding before parking.
        yields: u32,
        /// How long one park lasts.
        park: Duration,
    },
}

impl Default for IdleStrategy {
    /// Shared cores, with [`IdleStrategy::shared`]'s counts.
    fn default() -> Self {
        IdleStrategy::shared()
    }
}

impl IdleStrategy {
    /// Pinned threads yield once per this many idle turns.
    pub const PINNED_YIELD_EVERY: u32 = 64;

    /// Shared cores: spin 200 turns, yield 50, then park 100 us.
    pub const fn shared() -> Self {
        IdleStrategy::Shared {
            spin: 200,
            yields: 50,
            park: Duration::from_micros(100),
        }
    }

    /// `Pinned` on `core` if given, else [`IdleStrategy::shared`] (a `--core` option).
    pub fn for_core(core: Option<usize>) -> Self {
        match core {
            Some(core) => IdleStrategy::Pinned { core },
            None => IdleStrategy::shared(),
        }
    }

    /// Prepares the calling thread (pins it, or makes its parks short: a 1 us timer slack
    /// instead of Linux's default 50 us) and returns its idle counter.
    pub fn start(self) -> Idler {
        match self {
            IdleStrategy::Pinned { core } => {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    tracing::warn!(core, "could not pin the thread; busy-polling anyway");
                }
            }
            IdleStrategy::Shared { .. } => tighten_timer_slack(),
        }
        Idler {
            strategy: self,
            idle: 0,
        }
    }
}

/// Sets the calling thread's timer slack to 1 us, so that parks of tens of microseconds
/// last about that long (Linux; elsewhere nothing).
pub fn tighten_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

/// What an idle turn should do next, from [`Idler::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// The turn did work: go on at once.
    Continue,
    /// `std::hint::spin_loop`.
    Spin,
    /// `std::thread::yield_now`.
    Yield,
    /// Block for at most this long, waking early when work arrives.
    Park(Duration),
}

/// A thread's consecutive idle turns under its [`IdleStrategy`].
#[derive(Debug, Clone)]
pub struct Idler {
    strategy: IdleStrategy,
    idle: u32,
}

impl Idler {
    /// The strategy.
    pub fn strategy(&self) -> IdleStrategy {
        self.strategy
    }

    /// Counts a turn (`busy`: it did work) and says what to do before the next one.
    pub fn turn(&mut self, busy: bool) -> IdleAction {
        if busy {
            self.idle = 0;
            return IdleAction::Continue;
        }
        self.idle = self.idle.saturating_add(1);
        match self.strategy {
            IdleStrategy::Pinned { .. } => {
                if self.idle.is_multiple_of(IdleStrategy::PINNED_YIELD_EVERY) {
                    IdleAction::Yield
                } else {
                    IdleAction::Spin
                }
            }
            IdleStrategy::Shared { spin, yields, park } => {
                if self.idle <= spin {
                    IdleAction::Spin
                } else if self.idle <= spin.saturating_add(yields) {
                    IdleAction::Yield
                } else {
                    IdleAction::Park(park)
                }
            }
        }
    }

    /// [`Idler::turn`], then does it: spins, yields, or calls `park` with how long to
    /// block (the caller blocks on whatever brings it work, for at most that long).
    pub fn idle(&mut self, busy: bool, park: impl FnOnce(Duration)) {
        match self.turn(busy) {
            IdleAction::Continue => {}
            IdleAction::Spin => std::hint::spin_loop(),
            IdleAction::Yield => std::thread::yield_now(),
            IdleAction::Park(d) => park(d),
        }
    }
}

/// The replica's role, as published to other threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Accepts the leader's entries (or waits for one).
    Follower,
    /// Asking for promises to become leader.
    Candidate,
    /// Proposes and replicates.
    Leader,
    /// Lost its memory (volatile restart, wiped data dir) and rebuilding from a majority:
    /// takes no part in votes until it has.
    Recovering,
    /// The replica thread has stopped.
    Stopped,
}

impl Role {
    /// The lower-case name used in logs and status output.
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Recovering => "recovering",
            Role::Stopped => "stopped",
        }
    }
    fn from_name(s: &str) -> Role {
        match s {
            "leader" => Role::Leader,
            "candidate" => Role::Candidate,
            "recovering" => Role::Recovering,
            _ => Role::Follower,
        }
    }
    fn to_u8(self) -> u8 {
        self as u8
    }
    fn from_u8(v: u8) -> Role {
        match v {
            0 => Role::Follower,
            1 => Role::Candidate,
            2 => Role::Leader,
            3 => Role::Recovering,
            _ => Role::Stopped,
        }
    }
}

/// A point-in-time view of the replica, readable from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// This replica.
    pub node: NodeId,
    /// Its role.
    pub role: Role,
    /// The highest ballot promised (raw `Ballot` word: round << 8 | node).
    pub ballot: u64,
    /// Highest index known committed.
    pub commit: Index,
    /// Highest index applied to the state machine.
    pub applied: Index,
    /// The replica this one believes leads (itself when leader), if any.
    pub leader_hint: Option<NodeId>,
    /// Commands applied by the state machine since start.
    pub applied_commands: u64,
    /// Entries up to here are compacted into a checkpoint.
    pub log_base: Index,
    /// The newest checkpoint kept (0: none).
    pub checkpoint: Index,
    /// Checkpoints installed from another replica since start (catch-up).
    pub checkpoints_installed: u64,
}

#[derive(Default)]
struct StatusCell {
    node: AtomicU8,
    role: AtomicU8,
    ballot: AtomicU64,
    commit: AtomicU64,
    applied: AtomicU64,
    /// `0xFF`: none.
    leader: AtomicU8,
    applied_commands: AtomicU64,
    log_base: AtomicU64,
    checkpoint: AtomicU64,
    installed: AtomicU64,
    /// Set by `Handle::checkpoint`, taken by the replica thread.
    checkpoint_requested: AtomicBool,
    /// The last leader seen (`0xFF`: none yet), for counting leader changes.
    last_leader: AtomicU8,
}

impl StatusCell {
    /// Called by the replica thread after each step: plain stores, no allocation.
    fn publish<F: Fabric, S: StateMachine>(&self, r: &Replica<F, S>) {
        let c = r.core();
        let m = r.metrics();
        if let Some(l) = c.leader_hint() {
            if self.last_leader.swap(l, Ordering::Relaxed) != l {
                m.leader_changes.add(1);
            }
        }
        let st = r.stats();
        m.checkpoints_taken.set(st.checkpoints_taken);
        m.checkpoint_failures.set(st.checkpoint_failures);
        m.checkpoint_bytes_served.set(st.checkpoint_bytes_served);
        m.storage_errors.set(st.storage_errors);
        m.bad_messages.set(st.bad_messages);
        m.storage_failed.set(u64::from(r.failure().is_some()));
        let (pulling, (index, bytes)) = match c.pull_progress() {
            Some(p) => (1, p),
            None => (0, (0, 0)),
        };
        m.pulling.set(pulling);
        m.pull_index.set(index);
        m.pull_bytes.set(bytes);
        self.role
            .store(Role::from_name(c.role_name()).to_u8(), Ordering::Relaxed);
        self.ballot.store(c.promised().0, Ordering::Relaxed);
        self.commit.store(c.commit(), Ordering::Relaxed);
        self.applied.store(c.applied(), Ordering::Relaxed);
        self.leader
            .store(c.leader_hint().unwrap_or(0xFF), Ordering::Relaxed);
        self.applied_commands
            .store(r.stats().applied_commands, Ordering::Relaxed);
        self.log_base.store(c.log().base(), Ordering::Relaxed);
        self.checkpoint
            .store(r.latest_checkpoint(), Ordering::Relaxed);
        self.installed
            .store(r.stats().checkpoints_installed, Ordering::Relaxed);
    }
    fn snapshot(&self) -> Status {
        let leader = self.leader.load(Ordering::Relaxed);
        Status {
            node: self.node.load(Ordering::Relaxed),
            role: Role::from_u8(self.role.load(Ordering::Relaxed)),
            ballot: self.ballot.load(Ordering::Relaxed),
            commit: self.commit.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Relaxed),
            leader_hint: (leader != 0xFF).then_some(leader),
            applied_commands: self.applied_commands.load(Ordering::Relaxed),
            log_base: self.log_base.load(Ordering::Relaxed),
            checkpoint: self.checkpoint.load(Ordering::Relaxed),
            checkpoints_installed: self.installed.load(Ordering::Relaxed),
        }
    }
}

/// Where a proposal's outcome goes.
enum Reply {
    /// Its own [`Ticket`].
    Ticket(Sender<Outcome>),
    /// Slot `.1` of the loop's [`Sinks`], under the caller's tag `.0`.
    Tagged(u64, u32),
}

/// A [`CompletionSink`] with proposals in flight, and the outcomes gathered for it in the
/// current step (sent as one message at the step's end).
struct SinkSlot {
    sink: CompletionSink,
    /// Its proposals not completed yet.
    waiting: usize,
    out: Completions,
}

/// The sinks of the proposals in flight, in slots that a [`Reply::Tagged`] names (so a
/// tagged proposal holds no clone of its sink). A slot is freed once its sink has nothing
/// in flight.
#[derive(Default)]
struct Sinks {
    slots: Vec<Option<SinkSlot>>,
    free: Vec<u32>,
    /// Outcome buffers of freed slots, for the next slots (a caller whose batches complete
    /// one at a time frees and takes a slot per batch: without these, its buffers would
    /// regrow from nothing each time).
    spare: Vec<Completions>,
}

/// Outcome buffers [`Sinks`] keeps for reuse, at most.
const SPARE_BUFFERS: usize = 8;

impl Sinks {
    /// The slot of `sink` (the same sink: the same wake-up function), made if needed.
    fn slot_of(&mut self, sink: &CompletionSink) -> u32 {
        let found = self.slots.iter().position(|s| {
            s.as_ref()
                .is_some_and(|s| Arc::ptr_eq(&s.sink.wake, &sink.wake))
        });
        if let Some(i) = found {
            return i as u32;
        }
        let slot = Some(SinkSlot {
            sink: sink.clone(),
            waiting: 0,
            out: self.spare.pop().unwrap_or_default(),
        });
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// A reply for a proposal of `tag` into `slot`.
    fn tagged(&mut self, tag: u64, slot: u32) -> Reply {
        self.live(slot).waiting += 1;
        Reply::Tagged(tag, slot)
    }

    fn live(&mut self, slot: u32) -> &mut SinkSlot {
        self.slots[slot as usize]
            .as_mut()
            .expect("a reply names a live sink slot")
    }

    /// Delivers an outcome: a ticket's at once, a tagged one at the end of the step.
    fn deliver(&mut self, reply: Reply, out: Result<&[u8], ProposeError>) {
        match reply {
            Reply::Ticket(tx) => {
                let _ = tx.send(out.map(<[u8]>::to_vec));
            }
            Reply::Tagged(tag, slot) => {
                let s = self.live(slot);
                s.waiting -= 1;
                s.out.push(tag, out);
            }
        }
    }

    /// Sends each sink what it got in this step, as one message, and wakes it once; frees
    /// the slots of sinks with nothing left in flight.
    fn flush(&mut self) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            if !s.out.is_empty() {
                let _ = s.sink.tx.send(s.out.take());
                (s.sink.wake)();
            }
            if s.waiting == 0 {
                if self.spare.len() < SPARE_BUFFERS {
                    self.spare.push(std::mem::take(&mut s.out));
                }
                *slot = None;
                self.free.push(i as u32);
            }
        }
    }
}

struct Request {
    cmd: Vec<u8>,
    reply: Sender<Outcome>,
}

/// What travels on the proposal channel: one proposal, or a batch of tagged ones.
enum Msg {
    One(Request),
    Batch(Proposals, CompletionSink),
}

/// Where the outcomes of tagged proposals ([`Handle::submit_batch`]) go, for callers with
/// many proposals in flight that cannot block on a [`Ticket`] each (an event loop): one
/// channel shared by all of them, carrying one [`Completions`] of `(tag, outcome)` per
/// step, and a wake-up function that the
/// replica thread calls once per step in which it delivered any outcome to this sink (not
/// once per outcome), for example to wake a `mio::Waker`. The wake-up runs on the replica
/// thread: it must be quick and must not block.
#[derive(Clone)]
pub struct CompletionSink {
    tx: Sender<Completions>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl CompletionSink {
    /// A sink and the receiver of its outcomes: one [`Completions`] per replica step that
    /// completed any of the caller's proposals. The channel is unbounded: its length is
    /// bounded by the proposals the caller has in flight.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> (CompletionSink, Receiver<Completions>) {
        let (tx, rx) = channel::unbounded();
        (
            CompletionSink {
                tx,
                wake: Arc::new(wake),
            },
            rx,
        )
    }
}

impl std::fmt::Debug for CompletionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionSink").finish_non_exhaustive()
    }
}

/// A proposal in flight: wait for its outcome.
#[derive(Debug)]
pub struct Ticket {
    rx: Receiver<Outcome>,
}

impl Ticket {
    /// Waits up to `timeout`. On time-out the outcome is unknown: `Indeterminate`.
    pub fn wait(&self, timeout: Duration) -> Outcome {
        match self.rx.recv_timeout(timeout) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => Err(ProposeError::Indeterminate),
            Err(RecvTimeoutError::Disconnected) => Err(ProposeError::ShuttingDown),
        }
    }
    /// The outcome if it is there already.
    pub fn try_take(&self) -> Option<Outcome> {
        match self.rx.try_recv() {
            Ok(o) => Some(o),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(ProposeError::ShuttingDown)),
        }
    }
    /// The channel the outcome arrives on (for `crossbeam::select!` over many tickets).
    pub fn receiver(&self) -> &Receiver<Outcome> {
        &self.rx
    }
}

/// A batch [`Handle::submit_batch`] refused whole, given back with the reason.
#[derive(Debug)]
pub struct Refused {
    /// `Busy` (the proposal channel is full) or `ShuttingDown`.
    pub error: ProposeError,
    /// The batch, untouched.
    pub batch: Proposals,
}

/// Proposes to, and observes, a running replica. Clone freely.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Msg>,
    status: Arc<StatusCell>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("status", &self.status())
            .finish()
    }
}

impl Handle {
    /// Hands `cmd` to the replica thread without waiting for the outcome. Fails at once
    /// with `Busy` when the channel is full and `ShuttingDown` once stopped.
    pub fn submit(&self, cmd: Vec<u8>) -> Result<Ticket, ProposeError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(ProposeError::ShuttingDown);
        }
        let (reply, rx) = channel::bounded(1);
        let req = Request { cmd, reply };
        match self.tx.try_send(Msg::One(req)) {
            Ok(()) => Ok(Ticket { rx }),
            Err(TrySendError::Full(_)) => Err(ProposeError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::ShuttingDown),
        }
    }

    /// Hands a batch of commands to the replica thread as one message, without waiting:
    /// each `(tag, command)`'s outcome arrives on `sink` as `(tag, outcome)`, in any order
    /// (an immediate refusal, `NotLeader` say, included). The whole batch is refused at
    /// once with `Busy` when the channel is full and `ShuttingDown` once stopped; then no
    /// outcome is delivered for it, and the batch comes back in the [`Refused`] (to retry
    /// it, or to answer its tags). A batch takes one slot of [`RuntimeConfig::queue`],
    /// whatever its length.
    pub fn submit_batch(&self, cmds: Proposals, sink: &CompletionSink) -> Result<(), Refused> {
        let refused = |error, batch| Err(Refused { error, batch });
        if self.stop.load(Ordering::Acquire) {
            return refused(ProposeError::ShuttingDown, cmds);
        }
        match self.tx.try_send(Msg::Batch(cmds, sink.clone())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Batch(b, _))) => refused(ProposeError::Busy, b),
            Err(TrySendError::Disconnected(Msg::Batch(b, _))) => {
                refused(ProposeError::ShuttingDown, b)
            }
            Err(_) => unreachable!("a batch was sent"),
        }
    }

    /// Proposes `cmd` and waits up to `timeout` for it to be applied here; returns the state
    /// machine's output. A time-out gives `Indeterminate` (the command may still apply).
    pub fn propose(&self, cmd: Vec<u8>, timeout: Duration) -> Outcome {
        self.submit(cmd)?.wait(timeout)
    }

    /// The latest published status (updated by the replica thread as it runs).
    pub fn status(&self) -> Status {
        self.status.snapshot()
    }

    /// The replica's measurements (latency histograms, counters), updated as it runs.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the replica stopped acknowledging after a storage failure.
    pub fn storage_failed(&self) -> bool {
        self.metrics.storage_failed.get() != 0
    }

    /// Asks the replica thread to take a checkpoint now (it is written in the background;
    /// `status().checkpoint` shows it once kept).
    pub fn checkpoint(&self) {
        self.status
            .checkpoint_requested
            .store(true, Ordering::Release);
    }

    /// The replica thread was asked to stop (proposals fail with `ShuttingDown`).
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// A replica running on its own thread. Dropping it stops the thread.
///
/// The low-level way to run replicas: [`crate::node::NodeBuilder`] adds the data dir,
/// durable storage and safe restarts around it. Three volatile replicas in one process:
///
/// ```
/// use ballot::driver::{Replica, StateMachine};
/// use ballot::layout::{RegionInfo, RingGeometry};
/// use ballot::mem_fabric::MemNet;
/// use ballot::protocol::{Config, Core};
/// use ballot::region::Region;
/// use ballot::runtime::{clock_seed, Role, Runtime, RuntimeConfig};
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
///
/// struct Counter(u64);
/// impl StateMachine for Counter {
///     fn apply(&mut self, _index: u64, command: &[u8], out: &mut Vec<u8>) {
///         self.0 += command.len() as u64;
///         out.extend_from_slice(&self.0.to_le_bytes());
///     }
/// }
///
/// let net = MemNet::instant();
/// let ring = RingGeometry::new(1 << 10, 64).unwrap();
/// let members = vec![0, 1, 2];
/// let replicas: Vec<_> = members
///     .iter()
///     .map(|&id| {
///         let info = RegionInfo { cluster: 7, node: id, ring };
///         let fabric = net.attach(id, Arc::new(Region::anonymous(info).unwrap()));
///         let mut cfg = Config::new(id, members.clone(), ring, clock_seed(id));
///         cfg.batch_bytes = 4096; // must fit the small ring
///         let core = Core::new(cfg, false).unwrap(); // false: a first start, not recovering
///         let replica = Replica::new(core, fabric, Counter(0), None); // None: volatile
///         Runtime::start(replica, RuntimeConfig::default()).unwrap()
///     })
///     .collect();
///
/// // Propose at the leader once one is elected (elsewhere: `NotLeader` with a hint).
/// let deadline = Instant::now() + Duration::from_secs(20);
/// let leader = loop {
///     if let Some(r) = replicas.iter().find(|r| r.handle().status().role == Role::Leader) {
///         break r.handle();
///     }
///     assert!(Instant::now() < deadline, "no leader");
///     std::thread::sleep(Duration::from_millis(10));
/// };
/// let out = leader.propose(b"abc".to_vec(), Duration::from_secs(5)).unwrap();
/// assert_eq!(out, 3u64.to_le_bytes());
/// ```
pub struct Runtime<F: Fabric + 'static, S: StateMachine + 'static> {
    handle: Handle,
    thread: Option<JoinHandle<Replica<F, S>>>,
}

impl<F: Fabric + 'static, S: StateMachine + 'static> Runtime<F, S> {
    /// Starts the replica thread.
    pub fn start(replica: Replica<F, S>, cfg: RuntimeConfig) -> std::io::Result<Self> {
        Self::start_with_hook(replica, cfg, |_: &mut Replica<F, S>| false)
    }

    /// Starts the replica thread, which also runs `hook` once per turn, after the step and
    /// the delivery of its outcomes, with the replica in hand: for work that belongs on that
    /// thread and between steps (reconnecting a fabric's broken links, writing out the state
    /// machine for a test). It must be quick and must not block; it returns whether it did
    /// anything (a busy turn for the idle strategy).
    pub fn start_with_hook(
        replica: Replica<F, S>,
        cfg: RuntimeConfig,
        hook: impl FnMut(&mut Replica<F, S>) -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel::bounded(cfg.queue.max(1));
        let status = Arc::new(StatusCell::default());
        status.node.store(replica.core().id(), Ordering::Relaxed);
        status.last_leader.store(0xFF, Ordering::Relaxed);
        status.publish(&replica);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Handle {
            tx,
            status: status.clone(),
            metrics: replica.metrics().clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(cfg.name.clone())
            .spawn(move || run(replica, cfg, rx, status, stop, hook))?;
        Ok(Runtime {
            handle,
            thread: Some(thread),
        })
    }

    /// A handle to propose and observe.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops the thread (queued and in-flight proposals fail with `ShuttingDown`) and
    /// returns the replica, for inspection.
    pub fn shutdown(mut self) -> Option<Replica<F, S>> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<Replica<F, S>> {
        self.handle.stop.store(true, Ordering::Release);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<F: Fabric + 'static, S: StateMachine + 'static> Drop for Runtime<F, S> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run<F: Fabric, S: StateMachine>(
    mut replica: Replica<F, S>,
    cfg: RuntimeConfig,
    rx: Receiver<Msg>,
    status: Arc<StatusCell>,
    stop: Arc<AtomicBool>,
    mut hook: impl FnMut(&mut Replica<F, S>) -> bool,
) -> Replica<F, S> {
    let mut idler = cfg.idle.start();
    let start = Instant::now();
    // Each waiting proposal keeps the time of the step that accepted it (commit latency).
    let mut waiting: TicketMap<(Reply, Instant)> = TicketMap::new();
    let mut parked: Option<Msg> = None;
    let mut sinks = Sinks::default();
    // The replica's outcomes, swapped in each step (no allocation in steady state).
    let mut done = Completions::new();
    let accept = |replica: &mut Replica<F, S>,
                  waiting: &mut TicketMap<(Reply, Instant)>,
                  sinks: &mut Sinks,
                  cmd: &[u8],
                  reply: Reply,
                  at: Instant| match replica.propose(cmd) {
        Ok(t) => waiting.insert(t, (reply, at)),
        Err(e) => sinks.deliver(reply, Err(e)),
    };
    let accept_msg = |replica: &mut Replica<F, S>,
                      waiting: &mut TicketMap<(Reply, Instant)>,
                      sinks: &mut Sinks,
                      msg: Msg,
                      at: Instant| match msg {
        Msg::One(req) => {
            let reply = Reply::Ticket(req.reply);
            accept(replica, waiting, sinks, &req.cmd, reply, at)
        }
        Msg::Batch(cmds, sink) => {
            let slot = sinks.slot_of(&sink);
            for (tag, cmd) in cmds.iter() {
                let reply = sinks.tagged(tag, slot);
                accept(replica, waiting, sinks, cmd, reply, at);
            }
        }
    };
    let metrics = replica.metrics().clone();
    while !stop.load(Ordering::Acquire) {
        let mut busy = false;
        // One clock read per step serves every proposal accepted in it.
        let step_start = Instant::now();
        if let Some(msg) = parked.take() {
            accept_msg(&mut replica, &mut waiting, &mut sinks, msg, step_start);
            busy = true;
        }
        for _ in 0..cfg.queue.max(1) {
            match rx.try_recv() {
                Ok(msg) => {
                    accept_msg(&mut replica, &mut waiting, &mut sinks, msg, step_start);
                    busy = true;
                }
                Err(_) => break,
            }
        }
        if status.checkpoint_requested.swap(false, Ordering::AcqRel) {
            replica.request_checkpoint();
        }
        let now = step_start.duration_since(start).as_millis() as u64;
        busy |= replica.step(now);
        let mut done_at = None;
        replica.take_completed(&mut done);
        for (t, out) in done.iter() {
            if let Some((reply, at)) = waiting.remove(t) {
                if out.is_ok() {
                    let d = *done_at.get_or_insert_with(Instant::now);
                    metrics
                        .commit_latency
                        .observe(d.saturating_duration_since(at));
                    metrics.commits.add(1);
                }
                sinks.deliver(reply, out.map_err(Clone::clone));
            }
        }
        sinks.flush();
        busy |= hook(&mut replica);
        status.publish(&replica);
        idler.idle(busy, |d| {
            if let Ok(msg) = rx.recv_timeout(d) {
                parked = Some(msg);
            }
        });
    }
    replica.shutdown();
    replica.take_completed(&mut done);
    for (t, out) in done.iter() {
        if let Some((reply, _)) = waiting.remove(t) {
            sinks.deliver(reply, out.map_err(Clone::clone));
        }
    }
    for (_, (reply, _)) in waiting.drain() {
        sinks.deliver(reply, Err(ProposeError::ShuttingDown));
    }
    while let Ok(msg) = rx.try_recv() {
        match msg {
            Msg::One(req) => {
                let _ = req.reply.send(Err(ProposeError::ShuttingDown));
            }
            Msg::Batch(cmds, sink) => {
                let slot = sinks.slot_of(&sink);
                for tag in cmds.tags() {
                    let reply = sinks.tagged(tag, slot);
                    sinks.deliver(reply, Err(ProposeError::ShuttingDown));
                }
            }
        }
    }
    sinks.flush();
    status.publish(&replica);
    status.role.store(Role::Stopped.to_u8(), Ordering::Relaxed);
    replica
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionInfo, RingGeometry};
    use crate::mem_fabric::{MemFabric, MemNet};
    use crate::protocol::{Config, Core};
    use crate::region::Region;

    struct Counter(u64);
    impl StateMachine for Counter {
        fn apply(&mut self, _index: Index, command: &[u8], out: &mut Vec<u8>) {
            self.0 += command.len() as u64;
            out.extend_from_slice(&self.0.to_le_bytes());
        }
    }

    fn cluster(n: u8) -> Vec<Runtime<MemFabric, Counter>> {
        let net = MemNet::instant();
        let ring = RingGeometry::new(1 << 10, 64).unwrap();
        let members: Vec<NodeId> = (0..n).collect();
        members
            .iter()
            .map(|&id| {
                let region = Arc::new(
                    Region::anonymous(RegionInfo {
                        cluster: 1,
                        node: id,
                        ring,
                    })
                    .unwrap(),
                );
                let fabric = net.attach(id, region);
                let mut cfg = Config::new(id, members.clone(), ring, clock_seed(id));
                cfg.batch_bytes = 4096;
                cfg.heartbeat_timeout = 50;
                cfg.election_timeout = 50;
                let core = Core::new(cfg, false).unwrap();
                let r = Replica::new(core, fabric, Counter(0), None);
                Runtime::start(
                    r,
                    RuntimeConfig {
                        name: format!("replica-{id}"),
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .collect()
    }

    fn leader(rs: &[Runtime<MemFabric, Counter>], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = rs
                .iter()
                .position(|r| r.handle().status().role == Role::Leader)
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader elected");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn shared_cores_spin_then_yield_then_park_and_pinned_cores_offer_the_core() {
        let park = Duration::from_micros(30);
        let mut i = IdleStrategy::Shared {
            spin: 3,
            yields: 2,
            park,
        }
        .start();
        let seen: Vec<IdleAction> = (0..7).map(|_| i.turn(false)).collect();
        use IdleAction::*;
        assert_eq!(
            seen,
            [Spin, Spin, Spin, Yield, Yield, Park(park), Park(park)]
        );
        // Work starts the count again.
        assert_eq!(i.turn(true), Continue);
        assert_eq!(i.turn(false), Spin);
        // The default never busy-polls forever: three replicas on two cores must park.
        let mut d = IdleStrategy::default().start();
        assert!((0..10_000).any(|_| matches!(d.turn(false), Park(_))));
        assert_eq!(IdleStrategy::for_core(None), IdleStrategy::default());
        // Pinned: spins, and yields once per PINNED_YIELD_EVERY idle turns; never parks.
        let mut p = Idler {
            strategy: IdleStrategy::for_core(Some(0)),
            idle: 0,
        };
        let every = IdleStrategy::PINNED_YIELD_EVERY as usize;
        let seen: Vec<IdleAction> = (0..every * 3).map(|_| p.turn(false)).collect();
        assert_eq!(seen.iter().filter(|a| **a == Yield).count(), 3);
        assert!(seen.iter().all(|a| matches!(a, Spin | Yield)));
        assert_eq!(seen[every - 1], Yield);
    }

    #[test]
    fn three_replicas_commit_blocking_and_pipelined() {
        let rs = cluster(3);
        let l = leader(&rs, Duration::from_secs(10));
        let h = rs[l].handle();
        let out = h.propose(vec![1, 2, 3], Duration::from_secs(5)).unwrap();
        assert_eq!(out, 3u64.to_le_bytes());
        // Many outstanding.
        let tickets: Vec<Ticket> = (0..200).map(|_| h.submit(vec![0; 2]).unwrap()).collect();
        let mut last = 0;
        for t in &tickets {
            let v = u64::from_le_bytes(t.wait(Duration::from_secs(5)).unwrap().try_into().unwrap());
            assert!(v > last, "outputs follow the log order");
            last = v;
        }
        assert_eq!(last, 3 + 400);
        // A tagged batch: the outcomes arrive on a shared sink, which is woken.
        let woke = Arc::new(AtomicU64::new(0));
        let w = woke.clone();
        let (sink, done) = CompletionSink::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        let mut batch = Proposals::new();
        for i in 0..50 {
            batch.push(i, &[0]);
        }
        h.submit_batch(batch, &sink).unwrap();
        let mut tags: Vec<u64> = Vec::new();
        while tags.len() < 50 {
            let got = done.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(
                !got.is_empty(),
                "a step's message holds at least one outcome"
            );
            for (t, out) in got.iter() {
                out.unwrap();
                tags.push(t);
            }
        }
        tags.sort_unstable();
        assert_eq!(tags, (0..50).collect::<Vec<u64>>());
        assert!(woke.load(Ordering::Relaxed) >= 1);
        // A follower refuses with a hint.
        let f = (l + 1) % 3;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match rs[f].handle().propose(vec![9], Duration::from_secs(1)) {
                Err(ProposeError::NotLeader { leader: Some(x) }) => {
                    assert_eq!(x as usize, l);
                    break;
                }
                Err(ProposeError::NotLeader { leader: None }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => panic!("follower answered {other:?}"),
            }
        }
        // Every replica applies everything.
        let deadline = Instant::now() + Duration::from_secs(5);
        while rs
            .iter()
            .any(|r| r.handle().status().applied_commands < 251)
        {
            assert!(Instant::now() < deadline, "followers did not apply");
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = h.status();
        assert_eq!(st.role, Role::Leader);
        assert!(st.commit >= st.applied && st.applied > 0);
        // The leader measured what it committed; every replica saw a leader.
        let m = h.metrics();
        assert_eq!(m.commits.get(), 251);
        assert_eq!(m.commit_latency.snapshot().count, 251);
        assert!(m.apply_latency.snapshot().count > 0);
        assert!(rs
            .iter()
            .all(|r| r.handle().metrics().leader_changes.get() >= 1));
        // Clean shutdown returns the replicas; further proposals fail.
        let h2 = rs[l].handle();
        for r in rs {
            let replica = r.shutdown().expect("thread ended cleanly");
            assert_eq!(replica.state_machine().0, 453);
        }
        assert_eq!(
            h2.propose(vec![1], Duration::from_secs(1)),
            Err(ProposeError::ShuttingDown)
        );
        assert_eq!(h2.status().role, Role::Stopped);
    }
}
