//! The deterministic simulator: replicas on a simulated [`MemNet`], a key-value workload,
//! injected faults, and checks after every run.
//!
//! Everything derives from one seed (network latencies and faults, node clocks, client
//! choices, core randomness), and everything runs on one thread in a fixed order, so a
//! failing seed replays exactly.
//!
//! Checks: agreement (one command list per index across every replica and incarnation),
//! applied logs are prefixes of one another, no command applied twice, every acknowledged
//! command applied and present on every live replica at the end, per-key linearizability
//! of the client history ([`linearizability`], a memoized Wing-Gong search; linearizability
//! is compositional), liveness after the faults heal, and every contract asserted in the
//! core (a panic is a violation).

pub mod digest;
pub mod kv;
pub mod linearizability;
mod nemesis;
pub mod planted;

use crate::checkpoint::{CheckpointInfo, CheckpointPolicy, Checkpoints, MemCheckpoints};
use crate::driver::{Replica, StateMachine, Storage};
use crate::layout::{RegionInfo, RingGeometry};
use crate::mem_fabric::{Faults, MemFabric, MemNet};
use crate::protocol::{Config, Core, Durability, PlantedBugs, ProposeError};
use crate::region::Region;
use crate::sessions::SessionLimits;
use crate::storage::StorageError;
use crate::types::{Ballot, Index, NodeId, PromiseRecord};
use kv::{Answer, Machine, Op, Ret, Spec};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

/// Simulated time units per tick, and per replica step.
const UNITS_PER_TICK: u64 = 100;
const STEP_UNITS: u64 = 10;
/// Keys that the first `Options::clients` clients share.
const SHARED_KEYS: u64 = 3;

/// One simulated run: everything that decides it (`ballot-sim` flags map one to one, see
/// [`Options::replay_command`]).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Replicas in the cluster (1 to [`crate::MAX_NODES`]).
    pub replicas: usize,
    /// Volatile or durable mode (durable: simulated disks that crash and tear).
    pub durability: Durability,
    /// Ticks of the faulty phase; then faults heal and liveness and convergence are checked.
    pub ticks: u64,
    /// Inject faults (crashes, partitions, message and write faults, lost disks).
    pub faults: bool,
    /// Concurrent clients of the workload.
    pub clients: usize,
    /// Bugs planted in the core (to measure the checks).
    pub bugs: PlantedBugs,
    /// The core's contract assertions (off in planted-bug runs, so that the simulator's
    /// own checks are what is measured).
    pub contracts: bool,
    /// Clients work in sessions ([`SIM_SESSION_LIMITS`]): each registers one through the
    /// log, sends every operation with its session and sequence number, and resends it
    /// unchanged after an unknown outcome (a crash, a time-out, a lost leadership), to any
    /// replica; the store deduplicates. A retry after the session expired is answered
    /// "expired" and not applied.
    pub sessions: bool,
    /// Planted bug of the sessions mode: the store applies a retry whose result it holds.
    pub session_bug: bool,
}

/// The session table's bounds in the sessions mode: small, so that sessions expire (idle
/// for 24 log indexes, or pushed out by registrations past the cap) during a run.
pub const SIM_SESSION_LIMITS: SessionLimits = SessionLimits {
    max_sessions: 8,
    window: 4,
    idle_entries: 24,
    max_bytes: 1024,
};

impl Options {
    /// The defaults `ballot-sim` runs: volatile, 1500 faulty ticks, faults on, 3 clients,
    /// contracts on, no planted bug.
    pub fn new(seed: u64, replicas: usize) -> Options {
        Options {
            seed,
            replicas,
            durability: Durability::Volatile,
            ticks: 1500,
            faults: true,
            clients: 3,
            bugs: PlantedBugs::default(),
            contracts: true,
            sessions: false,
            session_bug: false,
        }
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut s = format!(
            "ballot-sim --seed {} --replicas {} --ticks {}",
            self.seed, self.replicas, self.ticks
        );
        if self.durability == Durability::Durable {
            s += " --durability durable";
        }
        if !self.faults {
            s += " --no-faults";
        }
        for name in self.bugs.names() {
            s += " --plant-bug ";
            s += name;
        }
        if !self.contracts {
            s += " --no-contracts";
        }
        if self.sessions {
            s += " --sessions";
        }
        if self.session_bug {
            s += " --plant-session-bug";
        }

        s
    }
}

/// What a run did and what its checks found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The highest commit index any replica reached.
    pub commits: Index,
    /// Checkpoints taken, and installed from another replica (catch-up), over all
    /// incarnations.
    pub checkpoints: u64,
    /// Checkpoints installed from another replica.
    pub installs: u64,
    /// Durable mode: crashes that also lost the replica's data dir.
    pub disk_losses: u64,
    /// Of those, restarts without `--rejoin` (the replica boots blank).
    pub blank_boots: u64,
    /// Client operations acknowledged.
    pub acked: usize,
    /// Replica crashes injected.
    pub crashes: usize,
    /// Leaderships won.
    pub elections: usize,
    /// Sessions mode: registrations that completed, operations resent after an unknown
    /// outcome, answers "session expired" or "stale", and retries the store answered from
    /// its table (the most any replica answered) instead of applying them again.
    pub registrations: u64,
    /// (See `registrations`.)
    pub retries: u64,
    /// (See `registrations`.)
    pub expired: u64,
    /// (See `registrations`.)
    pub dedups: u64,
    /// Every check that failed, in words; empty when the run is correct.
    pub violations: Vec<String>,
    /// Digest of the run's histories (`digest::history`).
    pub history: u32,
}

/// The simulated disk of one replica. Submissions become durable after a seeded delay, in
/// order; a crash loses what is still pending, except that the oldest pending submission may
/// tear: an append survives as a random prefix, a rewrite whole or not at all (the
/// `Storage` contract).
/// A request in flight: (seq, due time, what).
type PendingWrite = (u64, u64, DiskOp);

#[derive(Debug)]
enum DiskOp {
    Write(Vec<Arc<[u8]>>),
    /// `Storage::compact`: no completion is reported (seq unused).
    Compact(Index),
}

#[derive(Debug, Default)]
struct Disk {
    promise: PromiseRecord,
    /// Entries `base + 1 ..`.
    base: Index,
    entries: Vec<Arc<[u8]>>,
    pending: std::collections::VecDeque<PendingWrite>,
    rng: u64,
    /// The replica lost this disk and is rebuilding it from the others: until that is
    /// durable, a restart must rebuild again rather than trust what is here.
    rejoining: bool,
    /// Wiped, and not rebuilt since (whether or not the replica knows: `--rejoin` forgotten).
    lost: bool,
}

impl Disk {
    fn random(&mut self) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.rng >> 33
    }

    fn last(&self) -> Index {
        self.base + self.entries.len() as Index
    }

    /// Nothing on it (a wiped data dir that nothing was written to since).
    fn is_empty(&self) -> bool {
        self.promise.ballot == Ballot::ZERO && self.base == 0 && self.entries.is_empty()
    }

    fn write(&mut self, entries: &[Arc<[u8]>]) {
        let Some(first) = entries.first() else { return };
        let (h, _) = crate::layout::decode_entry(first).expect("valid entry");
        if self.entries.is_empty() {
            // An empty log starts wherever the first submission does (as the persister).
            self.base = h.index - 1;
        }
        assert!(
            h.index > self.base && h.index <= self.last() + 1,
            "persist at {} leaves a gap after {}..={}",
            h.index,
            self.base + 1,
            self.last()
        );
        self.entries.truncate((h.index - self.base - 1) as usize);
        self.entries.extend(entries.iter().cloned());
    }

    fn compact(&mut self, upto: Index) {
        if self.last() <= upto {
            self.entries.clear();
            self.base = upto;
        } else if upto > self.base {
            self.entries.drain(..(upto - self.base) as usize);
            self.base = upto;
        }
    }

    fn run(&mut self, op: DiskOp) {
        match op {
            DiskOp::Write(e) => self.write(&e),
            DiskOp::Compact(upto) => self.compact(upto),
        }
    }

    /// Power loss: pending submissions vanish, the oldest may tear.
    fn crash(&mut self) {
        if let Some((_, _, DiskOp::Write(entries))) = self.pending.pop_front() {
            let first = entries
                .first()
                .map(|e| crate::layout::decode_entry(e).expect("valid").0.index);
            let append = first.is_some_and(|i| i == self.last() + 1 || self.entries.is_empty());
            let keep = if append {
                (self.random() % (entries.len() as u64 + 1)) as usize
            } else if self.random().is_multiple_of(2) {
                entries.len()
            } else {
                0
            };
            self.write(&entries[..keep]);
        }
        self.pending.clear();
    }
}

struct SimDisk {
    disk: Arc<Mutex<Disk>>,
    net: MemNet,
}

impl SimDisk {
    fn queue(&self, seq: u64, op: DiskOp) {
        let now = self.net.now();
        let mut d = self.disk.lock().unwrap();
        let last = d.pending.back().map_or(0, |p| p.1);
        let due = (now + 5 + d.random() % 150).max(last);
        d.pending.push_back((seq, due, op));
    }
}

/// A replica's checkpoints, outliving its incarnations (durable mode: they are on disk).
#[derive(Clone, Default)]
struct SharedCkpts(Arc<Mutex<MemCheckpoints>>);

impl Checkpoints for SharedCkpts {
    fn save(
        &mut self,
        index: Index,
        ballot: Ballot,
        src: Box<dyn crate::checkpoint::CheckpointSource>,
    ) -> std::io::Result<()> {
        self.0.lock().unwrap().save(index, ballot, src)
    }
    fn poll_saved(&mut self) -> Option<std::io::Result<CheckpointInfo>> {
        self.0.lock().unwrap().poll_saved()
    }
    fn latest(&self) -> Option<CheckpointInfo> {
        self.0.lock().unwrap().latest()
    }
    fn get(&self, index: Index) -> Option<CheckpointInfo> {
        self.0.lock().unwrap().get(index)
    }
    fn read_image(&mut self, index: Index, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().read_image(index, offset, buf)
    }
    fn receive(&mut self, index: Index, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().receive(index, offset, data)
    }
    fn receive_finish(&mut self, index: Index, len: u64) -> std::io::Result<CheckpointInfo> {
        self.0.lock().unwrap().receive_finish(index, len)
    }
    fn retain(&mut self, keep: usize) -> std::io::Result<Option<Index>> {
        self.0.lock().unwrap().retain(keep)
    }
    fn open(&mut self, index: Index) -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let mut data = Vec::new();
        self.0.lock().unwrap().open(index)?.read_to_end(&mut data)?;
        Ok(Box::new(std::io::Cursor::new(data)))
    }
}

impl Storage for SimDisk {
    fn save_promise(&mut self, record: PromiseRecord) -> Result<(), StorageError> {
        self.disk.lock().unwrap().promise = record;
        Ok(())
    }
    fn submit(&mut self, seq: u64, entries: Vec<Arc<[u8]>>) -> Result<(), StorageError> {
        self.queue(seq, DiskOp::Write(entries));
        Ok(())
    }
    fn compact(&mut self, upto: Index) -> Result<(), StorageError> {
        self.queue(0, DiskOp::Compact(upto));
        Ok(())
    }
    fn rejoined(&mut self) -> Result<(), StorageError> {
        let mut d = self.disk.lock().unwrap();
        d.rejoining = false;
        d.lost = false;
        Ok(())
    }
    fn begin_rejoin(&mut self) -> Result<(), StorageError> {
        self.disk.lock().unwrap().rejoining = true;
        Ok(())
    }
    fn poll_persisted(&mut self, done: &mut Vec<u64>) -> Result<(), StorageError> {
        let now = self.net.now();
        let mut d = self.disk.lock().unwrap();
        while d.pending.front().is_some_and(|p| p.1 <= now) {
            let (seq, _, op) = d.pending.pop_front().unwrap();
            if matches!(op, DiskOp::Write(_)) {
                done.push(seq);
            }
            d.run(op);
        }
        Ok(())
    }
}

struct Node {
    replica: Option<Replica<MemFabric, Machine>>,
    disk: Arc<Mutex<Disk>>,
    ckpts: SharedCkpts,
    /// Applied histories that checkpoint installs replaced, of finished incarnations.
    superseded: Vec<Vec<(Index, u64)>>,
    /// Applied (index, command id) of each finished incarnation.
    past: Vec<Vec<(Index, u64)>>,
    skew: u64,
    phase: u64,
    down_until: u64,
    slow_until: u64,
    /// Not stepped at all (a paused process) while set (`nemesis`).
    paused: bool,
    cut_until: u64,
    /// The commit index and promise seen after this incarnation's last step (the
    /// promise survives a durable restart; amnesia starts it over).
    seen_commit: Index,
    seen_promise: Ballot,
    /// When this node last booted without its memory (volatile restart, lost data dir).
    amnesia_at: u64,
    /// Volatile: its last boot was blank after a wipe (it had a memory before).
    wiped: bool,
    /// The ballot this node last led and the tick it first stepped as its leader.
    led: (Ballot, u64),
    /// This replica checkpoints every `ckpt_mul` times the run's interval.
    ckpt_mul: u64,
}

struct Client {
    thread: u64,
    target: NodeId,
    /// (node, ticket, op record index, started at tick)
    outstanding: Option<(NodeId, u64, usize, u64)>,
    /// Sessions mode: the client's session, and the last sequence number it used.
    session: Option<u64>,
    seq: u64,
    /// A registration in flight: (node, ticket, started at tick).
    registering: Option<(NodeId, u64, u64)>,
    /// The operation to resend (op record index), with `cur`, its session and sequence.
    retry: Option<usize>,
    cur: (u64, u64),
    /// An attempt of the current operation may have been applied.
    in_doubt: bool,
}

impl Client {
    fn new(thread: u64, target: NodeId) -> Client {
        Client {
            thread,
            target,
            outstanding: None,
            session: None,
            seq: 0,
            registering: None,
            retry: None,
            cur: (0, 0),
            in_doubt: false,
        }
    }
}

#[derive(Debug, Clone)]
struct OpRec {
    thread: u64,
    op: Op,
    id: u64,
    invoked: u64,
    returned: Option<(u64, Ret)>,
    failed: bool,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        crate::types::xorshift(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

struct Sim {
    o: Options,
    rng: Rng,
    net: MemNet,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    ops: Vec<OpRec>,
    seq: u64,
    next_thread: u64,
    report: Report,
    geo: RingGeometry,
    /// Checkpoint policy of this run (from the seed): every so many applied bytes, keeping
    /// so many.
    ckpt_every: u64,
    ckpt_keep: usize,
    /// Every index some leader committed, with its value: each must stay held by a
    /// majority of current incarnations (counting those that rebuild), for good.
    chosen: BTreeMap<Index, Vec<u8>>,
    /// This seed's fault profile (swarm testing: each seed weights the faults differently,
    /// so that rare combinations open their windows in some seeds).
    swarm: Swarm,
    /// The random stream of the faults added after the first swarm (see `pick_more`).
    more: Rng,
    /// The random stream of the blank-crash fault (`Swarm::blank_crash`), apart so that
    /// seeds with it off replay as before it existed.
    blank_rng: Rng,
    /// Composed faults (`nemesis`), on their own random stream.
    nemesis: nemesis::Nemesis,
}

/// Per-seed weights of the fault families (0: off; 1: the base rate; more: that many times
/// the base rate).
#[derive(Debug, Clone, Copy)]
struct Swarm {
    crash: u64,
    /// Share (per million) of crashes whose replica restarts within a few ticks, before the
    /// others elect anew (so that a rebuild meets the stream it left).
    quick_restart: u64,
    isolate: u64,
    cut: u64,
    /// Share (per million) of cut links that are one-way, and that are held long (stuck
    /// candidates behind a link to the leader).
    one_way: u64,
    long_cut: u64,
    slow: u64,
    /// A follower's link to the leader cut one way: its reads of the leader's heartbeat
    /// fail, so it deems the leader dead and fences it, while the leader's writes still
    /// land in its ring (the window that the fence's revoke and drain close).
    blind: u64,
    /// Clients beyond `Options::clients`: more writes in flight when a fence falls.
    extra_clients: usize,
    /// The leader's data path to one follower stalls for long (past a whole rebuild): that
    /// follower lags behind what the leader counts from the others.
    stall: u64,
    /// Share (per million) of restarts whose replica is cut from the leader while it
    /// rebuilds (its rebuild then stands on the other answers, or waits).
    rebuild_cut: u64,
    /// A majorities ring (5 replicas or more): each replica reaches a majority, no two the
    /// same one, held long: a deposed leader keeps followers that deem it alive while a
    /// newer leader leads others, and a rebuild hears from some of each view.
    ring: u64,
    /// Share (per million) of checkpoint pulls whose source is cut off just after the pull
    /// starts (the pull falls back to another source, perhaps with an older checkpoint).
    pull_cut: u64,
    /// Replicas checkpoint at different paces (some four times as rarely), so that the
    /// answers a rebuild gets are compacted to different points.
    ckpt_skew: bool,
    /// Durable mode: per tick, the chance (per million) that a replica still blank (booted
    /// with no memory, not yet established by a leader) that has promised something
    /// crashes, and restarts from its disk: the window in which blankness must be durable.
    blank_crash: u64,
}

impl Swarm {
    fn pick(rng: &mut Rng) -> Swarm {
        let mut w = || [0, 1, 1, 2, 4][rng.below(5) as usize];
        let (crash, isolate, cut, slow) = (w(), w(), w(), w());
        Swarm {
            crash,
            quick_restart: [0, 200_000, 600_000][rng.below(3) as usize],
            isolate,
            cut,
            one_way: [0, 300_000, 700_000][rng.below(3) as usize],
            long_cut: [0, 100_000, 300_000][rng.below(3) as usize],
            slow,
            blind: [0, 1, 1, 2, 4][rng.below(5) as usize],
            extra_clients: [0, 2, 5][rng.below(3) as usize],
            stall: [0, 1, 1, 2, 4][rng.below(5) as usize],
            rebuild_cut: [0, 300_000, 700_000][rng.below(3) as usize],
            ring: 0,
            pull_cut: 0,
            ckpt_skew: false,
            blank_crash: 0,
        }
    }

    /// The knobs added after the others, drawn from a stream of their own so that a seed
    /// whose new knobs are all off replays as it did before they existed.
    fn pick_more(&mut self, rng: &mut Rng) {
        self.ring = [0, 0, 1, 2][rng.below(4) as usize];
        self.pull_cut = [0, 300_000, 700_000][rng.below(3) as usize];
        self.ckpt_skew = rng.chance(500_000);
    }
}

/// The network's faults for one seed: the base rates, each family weighted by the seed.
fn swarm_network(rng: &mut Rng) -> Faults {
    let base = faulty_network();
    let mut w = || [0, 1, 1, 3, 10][rng.below(5) as usize];
    Faults {
        msg_loss: base.msg_loss * w(),
        msg_dup: base.msg_dup * w(),
        msg_reorder: base.msg_reorder * w(),
        write_fail: base.write_fail * w(),
        write_slow: base.write_slow * w(),
        msg_late: base.msg_late * w(),
        completion_lost: base.completion_lost * w(),
        midstep: (base.midstep * w()).min(1000),
        ..base
    }
}

fn faulty_network() -> Faults {
    Faults {
        latency_min: 2,
        latency_max: 30,
        msg_loss: 20,
        msg_dup: 10,
        msg_reorder: 20,
        write_fail: 2,
        write_slow: 20,
        slow_extra: 300,
        // Late replays of control messages, up to 300 ticks (past a rebuild).
        msg_late: 8,
        late_extra: 300 * UNITS_PER_TICK,
        completion_lost: 2,
        midstep: 150,
    }
}

impl Sim {
    fn config(&self, id: NodeId) -> Config {
        let members = (0..self.o.replicas as NodeId).collect();
        let mut c = Config::new(id, members, self.geo, 0);
        c.durability = self.o.durability;
        c.window = 8;
        c.batch_bytes = 512;
        c.max_queue = 64;
        c.heartbeat_timeout = 10;
        c.election_timeout = 12;
        c.max_outstanding = 16;
        // Small messages, so that promises and recovery answers span several chunks.
        c.message_bytes = 1024;
        c.seed = self.o.seed.wrapping_mul(31).wrapping_add(
            u64::from(id) * 7919
                + self
                    .nodes
                    .get(id as usize)
                    .map_or(0, |n| n.past.len() as u64),
        );
        c.bugs = self.o.bugs;
        c
    }

    fn boot(&mut self, id: NodeId, restart: bool) {
        let info = RegionInfo {
            cluster: 7,
            node: id,
            ring: self.geo,
        };
        let region = Arc::new(Region::anonymous(info).expect("anonymous memory"));
        let fabric = self.net.attach(id, region);
        let cfg = self.config(id);
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "boot {id} restart={restart} at {}",
                self.net.now() / UNITS_PER_TICK
            );
        }
        let disk = self.nodes[id as usize].disk.clone();
        let mut ckpts = self.nodes[id as usize].ckpts.clone();
        let mut machine = if self.o.sessions {
            Machine::with_sessions(SIM_SESSION_LIMITS)
        } else {
            Machine::default()
        };
        machine.planted_no_dedup = self.o.session_bug;
        let core = match (restart, self.o.durability) {
            (false, _) => Core::new(cfg, false),
            (true, Durability::Volatile) if self.o.faults && self.rng.chance(100_000) => {
                // The operator wiped the data dir (boot marker and checkpoints) and started
                // the replica as if the cluster were new: it boots blank, and its peers,
                // which knew it with a memory, must make it rebuild before its votes count.
                *ckpts.0.lock().unwrap() = MemCheckpoints::default();
                self.report.blank_boots += 1;
                self.nodes[id as usize].wiped = true;
                Core::new(cfg, false)
            }
            (true, Durability::Volatile) => {
                self.nodes[id as usize].wiped = false;
                // Amnesia: the promise and log are gone. The checkpoint store is kept (as on
                // the durable rejoin path): it holds only applied, hence chosen, state, and
                // the rebuild decides from the others' answers what to stand on.
                Core::new(cfg, true)
            }
            (true, Durability::Durable) if disk.lock().unwrap().rejoining => {
                // Lost, or lost and not yet rebuilt: rebuild from the others (as
                // `ballot-node --rejoin`), from nothing: it removes the log and promise a
                // partial rebuild left, as `ballot-node` does (checkpoints stay).
                let mut d = disk.lock().unwrap();
                let (rng, lost) = (d.rng, d.lost);
                *d = Disk {
                    rng,
                    rejoining: true,
                    lost,
                    ..Disk::default()
                };
                Core::new(cfg, true)
            }
            (true, Durability::Durable) if disk.lock().map(|d| d.lost && d.is_empty()).unwrap() => {
                // Lost, and `--rejoin` forgotten: it boots as new (blank), as a node does
                // on an empty data dir.
                Core::new(cfg, false)
            }
            (true, Durability::Durable) => {
                // As the node does: the newest checkpoint, then the log after it.
                let base = ckpts.latest().map_or(0, |c| c.index);
                if base > 0 {
                    let mut r = ckpts.open(base).expect("kept checkpoint opens");
                    machine.restore(&mut r).expect("kept checkpoint restores");
                }
                let d = disk.lock().unwrap();
                let entries: Vec<_> = d
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| d.base + *k as Index + 1 > base)
                    .map(|(_, e)| e.clone())
                    .collect();
                assert!(
                    entries.is_empty() || d.base <= base,
                    "durable log starts at {} after checkpoint {base}: a gap",
                    d.base + 1
                );
                Core::restore(cfg, d.promise, base, entries)
            }
        }
        .expect("valid config");
        // A blank incarnation restored from its disk is the same incarnation: its
        // promises since its blank boot are checked on.
        let restored_blank = restart
            && self.o.durability == Durability::Durable
            && core.is_blank()
            && disk.lock().unwrap().promise.blank != 0;
        if core.is_recovering() || (core.is_blank() && !restored_blank) {
            // Amnesia (volatile, or a lost data dir): the promise check starts over; the
            // rebuild must adopt a promise that covers the lost ones.
            self.nodes[id as usize].seen_promise = Ballot::ZERO;
            self.nodes[id as usize].amnesia_at = self.net.now() / UNITS_PER_TICK;
        }
        let storage: Option<Box<dyn Storage>> = match self.o.durability {
            Durability::Durable => Some(Box::new(SimDisk {
                disk,
                net: self.net.clone(),
            })),
            Durability::Volatile => None,
        };
        let policy = CheckpointPolicy {
            every_bytes: self.ckpt_every * self.nodes[id as usize].ckpt_mul,
            keep: self.ckpt_keep,
            chunk_bytes: 512,
            serve_bytes_per_tick: 2048,
        };
        self.nodes[id as usize].replica = Some(
            Replica::new(core, fabric, machine, storage).with_checkpoints(Box::new(ckpts), policy),
        );
    }

    fn crash(&mut self, id: NodeId, until: u64) {
        let n = &mut self.nodes[id as usize];
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "crash {id} until {until}: {:?}",
                n.replica
                    .as_ref()
                    .map(|r| crate::driver::describe(r.core()))
            );
        }
        if let Some(r) = n.replica.take() {
            // (Superseded histories are kept apart: `past.len()` seeds the next incarnation.)
            n.superseded
                .extend(r.state_machine().superseded.iter().cloned());
            n.past.push(r.state_machine().applied.clone());
            let st = r.stats();
            self.report.checkpoints += st.checkpoints_taken;
            self.report.installs += st.checkpoints_installed;
        }
        n.disk.lock().unwrap().crash();
        n.down_until = until;
        n.seen_commit = 0;
        self.net.crash(id);
        self.report.crashes += 1;
        for c in &mut self.clients {
            if c.registering.is_some_and(|r| r.0 == id) {
                c.registering = None;
            }
            if let Some((_, _, rec, _)) = c.outstanding.filter(|o| o.0 == id) {
                c.outstanding = None; // indeterminate
                if self.o.sessions {
                    // Resent in the same session, so it applies at most once.
                    c.retry = Some(rec);
                    c.in_doubt = true;
                } else {
                    c.thread = self.next_thread; // never returns
                    self.next_thread += 1;
                }
            }
        }
    }

    /// Replicas down, blank (booted without their memory) or still rebuilding it.
    fn down(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| {
                n.replica
                    .as_ref()
                    .is_none_or(|r| r.core().is_recovering() || r.core().is_blank())
            })
            .count()
    }

    /// When a replica crashed at `tick` restarts: usually after the others noticed, in some
    /// seeds often within a few ticks (before they elect anew).
    fn restart_at(&mut self, tick: u64) -> u64 {
        if self.rng.chance(self.swarm.quick_restart) {
            tick + 1 + self.rng.below(8)
        } else {
            tick + 20 + self.rng.below(80)
        }
    }

    fn inject_faults(&mut self, tick: u64) {
        let n = self.o.replicas as u64;
        let f = (n - 1) / 2;
        // Crash: in volatile mode at most f replicas may be down (amnesia beyond that loses
        // data by definition); in durable mode any number, sometimes all at once.
        if self.rng.chance(4_000 * self.swarm.crash) {
            let id = self.rng.below(n) as NodeId;
            let allowed = self.o.durability == Durability::Durable || (self.down() as u64) < f;
            if allowed && self.nodes[id as usize].replica.is_some() {
                let until = self.restart_at(tick);
                self.crash(id, until);
            }
        }
        // Durable mode: a replica loses its data dir with the crash, when no other replica
        // is down or rebuilding (recovery needs a majority of the others).
        if self.o.durability == Durability::Durable && self.rng.chance(800) && self.down() == 0 {
            let id = self.rng.below(n) as NodeId;
            let until = tick + 20 + self.rng.below(80);
            self.crash(id, until);
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!("disk of {id} lost at {tick}");
            }
            // Half the time the operator forgets `--rejoin`: the replica boots blank, and
            // its peers must make it rebuild before its votes count.
            let forgot = self.rng.chance(500_000);
            self.lose_disk(id, forgot);
        }
        if self.o.durability == Durability::Durable && self.swarm.blank_crash > 0 {
            for id in 0..n as NodeId {
                let blank_promised = self.nodes[id as usize]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.core().is_blank() && r.core().promised() != Ballot::ZERO);
                if blank_promised && self.blank_rng.chance(self.swarm.blank_crash) {
                    let until = tick + 1 + self.blank_rng.below(30);
                    self.crash(id, until);
                }
            }
        }
        if self.o.durability == Durability::Durable && self.rng.chance(600) {
            let until = tick + 10 + self.rng.below(40);
            for id in 0..n as NodeId {
                if self.nodes[id as usize].replica.is_some() {
                    self.crash(id, until);
                }
            }
        }
        // Isolate one replica (often the leader) from everyone.
        if self.rng.chance(4_000 * self.swarm.isolate) {
            let leader = self.leader();
            let id = match leader {
                Some(l) if self.rng.chance(600_000) => l,
                _ => self.rng.below(n) as NodeId,
            };
            for other in 0..n as NodeId {
                if other != id {
                    self.net.set_link(id, other, false);
                }
            }
            self.nodes[id as usize].cut_until = tick + 20 + self.rng.below(60);
        }
        // Cut one link (sometimes one way only: `a` no longer reaches `b`), often one to
        // the leader; sometimes held long (a candidate stuck behind it keeps trying).
        if self.rng.chance(3_000 * self.swarm.cut) {
            let leader = self.leader();
            let a = self.rng.below(n) as NodeId;
            let b = match leader {
                Some(l) if self.rng.chance(500_000) => l,
                _ => self.rng.below(n) as NodeId,
            };
            if a != b {
                if self.rng.chance(self.swarm.one_way) {
                    self.net.set_link_one_way(a, b, false);
                } else {
                    self.net.set_link(a, b, false);
                }
                let until = if self.rng.chance(self.swarm.long_cut) {
                    tick + 100 + self.rng.below(300)
                } else {
                    tick + 10 + self.rng.below(50)
                };
                self.nodes[a as usize].cut_until = self.nodes[a as usize].cut_until.max(until);
            }
        }
        // A follower blind to the leader: it stops reading the leader's heartbeat (and
        // soon fences it) while the leader's writes keep landing in its ring.
        if self.rng.chance(3_000 * self.swarm.blind) {
            let leader = self.leader();
            let f = self.rng.below(n) as NodeId;
            if let Some(l) = leader.filter(|&l| l != f) {
                self.net.set_link_one_way(f, l, false);
                let until = tick + 20 + self.rng.below(60);
                self.nodes[f as usize].cut_until = self.nodes[f as usize].cut_until.max(until);
            }
        }
        // A stalled data path from the leader to one follower.
        if self.rng.chance(3_000 * self.swarm.stall) {
            if let Some(l) = self.leader() {
                let f = self.rng.below(n) as NodeId;
                if f != l {
                    let units = (20 + self.rng.below(100)) * UNITS_PER_TICK;
                    self.net.stall(l, f, units);
                }
            }
        }
        // A majorities ring, held long: on a random ring, each replica reaches those within
        // (f + 1) / 2 places of it, a majority, and no two replicas the same majority.
        if n >= 5 && self.swarm.ring > 0 && self.more.chance(1_000 * self.swarm.ring) {
            let mut order: Vec<NodeId> = (0..n as NodeId).collect();
            for k in (1..order.len()).rev() {
                order.swap(k, self.more.below(k as u64 + 1) as usize);
            }
            let reach = f.div_ceil(2);
            let until = tick + 60 + self.more.below(240);
            for a in 0..n {
                for b in a + 1..n {
                    let d = b - a;
                    if d.min(n - d) > reach {
                        self.net
                            .set_link(order[a as usize], order[b as usize], false);
                    }
                }
                let c = &mut self.nodes[order[a as usize] as usize].cut_until;
                *c = (*c).max(until);
            }
        }
        // A slow replica.
        if self.rng.chance(3_000 * self.swarm.slow) {
            let id = self.rng.below(n) as usize;
            self.nodes[id].slow_until = tick + 20 + self.rng.below(100);
        }
    }

    /// The replica that currently leads, if one does.
    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|x| x.replica.as_ref().is_some_and(|r| r.core().is_leader()))
            .map(|l| l as NodeId)
    }

    fn heal_due(&mut self, tick: u64, all: bool) {
        for id in 0..self.o.replicas {
            let n = &self.nodes[id];
            if n.replica.is_none() && (all || tick >= n.down_until) {
                self.boot(id as NodeId, true);
                // Sometimes the replica rebuilds cut off from the leader (one way or both).
                if !all && self.rng.chance(self.swarm.rebuild_cut) {
                    if let Some(l) = self.leader().filter(|&l| l as usize != id) {
                        if self.rng.chance(500_000) {
                            self.net.set_link_one_way(l, id as NodeId, false);
                        } else {
                            self.net.set_link(l, id as NodeId, false);
                        }
                        let until = tick + 20 + self.rng.below(130);
                        self.nodes[l as usize].cut_until =
                            self.nodes[l as usize].cut_until.max(until);
                    }
                }
            }
            let n = &mut self.nodes[id];
            if n.cut_until != 0 && (all || tick >= n.cut_until) {
                n.cut_until = 0;
                for other in 0..self.o.replicas as NodeId {
                    if other as usize != id && self.nodes[other as usize].cut_until == 0 {
                        self.net.set_link(id as NodeId, other, true);
                    }
                }
            }
            if all {
                self.nodes[id].slow_until = 0;
                self.nodes[id].paused = false;
            }
        }
        if all {
            self.net.heal_all();
        }
    }

    fn client_turn(&mut self, tick: u64, issue: bool) {
        for ci in 0..self.clients.len() {
            if let Some((_, _, started)) = self.clients[ci].registering {
                if tick - started > 60 {
                    // Given up: a session it may have registered expires unused.
                    self.clients[ci].registering = None;
                }
                continue;
            }
            if let Some((node, _, rec, started)) = self.clients[ci].outstanding {
                if tick - started > 60 {
                    self.clients[ci].outstanding = None;
                    if self.o.sessions {
                        // Resend it in its session later (the same sequence number).
                        self.clients[ci].retry = Some(rec);
                        self.clients[ci].in_doubt = true;
                    } else {
                        // Give up: the operation stays pending forever in the history.
                        self.clients[ci].thread = self.next_thread;
                        self.next_thread += 1;
                    }
                    if self.nodes[node as usize].paused {
                        // A stopped server: the client tries another (on the nemesis'
                        // random stream, so that runs without episodes replay as before).
                        let n = self.o.replicas as u64;
                        self.clients[ci].target = self.nemesis.rng.below(n) as NodeId;
                    }
                }
                continue;
            }
            if !issue || !self.rng.chance(300_000) {
                continue;
            }
            let target = self.clients[ci].target;
            if self.nodes[target as usize].replica.is_none() {
                self.clients[ci].target = self.rng.below(self.o.replicas as u64) as NodeId;
                continue;
            }
            if self.o.sessions && self.session_turn(ci, tick) {
                continue;
            }
            let Some(r) = self.nodes[target as usize].replica.as_mut() else {
                continue;
            };
            let id = self.ops.len() as u64 + 1;
            // The first clients share keys 0..3; each extra client writes a key of its own
            // (load for the fence's windows without a history whose linearization search
            // grows exponentially).
            let key = match ci.checked_sub(self.o.clients) {
                None => self.rng.below(SHARED_KEYS) as u8,
                Some(extra) => (SHARED_KEYS as usize + extra) as u8,
            };
            let op = match self.rng.below(3) {
                0 => Op::Put(key, id),
                1 => Op::Get(key),
                _ => {
                    // Compare against a value that was written, or the initial 0.
                    let puts: Vec<u64> = self
                        .ops
                        .iter()
                        .rev()
                        .take(8)
                        .filter(|o| o.op.key() == key)
                        .map(|o| o.id)
                        .collect();
                    let old = if puts.is_empty() {
                        0
                    } else {
                        puts[self.rng.below(puts.len() as u64) as usize]
                    };
                    Op::Cas(key, old, id)
                }
            };
            let cmd = match self.clients[ci].session {
                Some(session) if self.o.sessions => {
                    let seq = self.clients[ci].seq + 1;
                    self.clients[ci].cur = (session, seq);
                    kv::encode_in_session(id, session, seq, op)
                }
                _ => kv::encode(id, op),
            };
            match r.propose(&cmd) {
                Ok(ticket) => {
                    if self.o.sessions {
                        self.clients[ci].seq += 1;
                        self.clients[ci].in_doubt = false;
                    }
                    self.seq += 1;
                    self.ops.push(OpRec {
                        thread: self.clients[ci].thread,
                        op,
                        id,
                        invoked: self.seq,
                        returned: None,
                        failed: false,
                    });
                    self.clients[ci].outstanding = Some((target, ticket, self.ops.len() - 1, tick));
                }
                Err(ProposeError::NotLeader { leader }) => {
                    self.clients[ci].target =
                        leader.unwrap_or_else(|| self.rng.below(self.o.replicas as u64) as NodeId);
                }
                Err(_) => {}
            }
        }
    }

    /// Sessions mode, client `ci`'s turn before a new operation: registers a session if it
    /// has none, or resends the operation whose outcome it does not know. `true`: it used
    /// the turn.
    fn session_turn(&mut self, ci: usize, tick: u64) -> bool {
        let target = self.clients[ci].target;
        let Some(r) = self.nodes[target as usize].replica.as_mut() else {
            return true;
        };
        let c = &mut self.clients[ci];
        let (cmd, rec) = if let Some(rec) = c.retry {
            let o = &self.ops[rec];
            (
                kv::encode_in_session(o.id, c.cur.0, c.cur.1, o.op),
                Some(rec),
            )
        } else if c.session.is_none() {
            // Ids of registrations: apart from the operations' (which count from 1).
            (kv::encode_register((1 << 48) | (self.seq + 1)), None)
        } else {
            return false;
        };
        match r.propose(&cmd) {
            Ok(ticket) => match rec {
                Some(rec) => {
                    c.retry = None;
                    c.outstanding = Some((target, ticket, rec, tick));
                    self.report.retries += 1;
                }
                None => {
                    self.seq += 1;
                    c.registering = Some((target, ticket, tick));
                }
            },
            Err(ProposeError::NotLeader { leader }) => {
                c.target =
                    leader.unwrap_or_else(|| self.rng.below(self.o.replicas as u64) as NodeId);
            }
            Err(_) => {}
        }
        true
    }

    /// Sessions mode: the outcome of client `ci`'s operation `rec`.
    fn session_outcome(&mut self, ci: usize, rec: usize, outcome: Result<&[u8], &ProposeError>) {
        let c = &mut self.clients[ci];
        match outcome.map(kv::decode_answer) {
            Ok(Some(Answer::Ret(ret))) => {
                self.seq += 1;
                self.ops[rec].returned = Some((self.seq, ret));
                self.report.acked += 1;
            }
            Ok(Some(Answer::Expired | Answer::Stale)) => {
                // Not applied now; an earlier attempt may have been: unknown, unless there
                // was none. Either way the client starts a new session.
                self.report.expired += 1;
                c.session = None;
                if c.in_doubt {
                    c.thread = self.next_thread;
                    self.next_thread += 1;
                } else {
                    self.ops[rec].failed = true;
                }
            }
            Ok(_) => self.violation(format!(
                "sessions: operation {} got an answer the store never gives",
                self.ops[rec].id
            )),
            Err(ProposeError::NotLeader { leader }) if !c.in_doubt => {
                // Refused before entering the log, and no earlier attempt: it never happened.
                self.ops[rec].failed = true;
                if let Some(l) = leader {
                    c.target = *l;
                }
            }
            Err(e) => {
                if let ProposeError::NotLeader { leader: Some(l) } = e {
                    c.target = *l;
                }
                c.retry = Some(rec);
                c.in_doubt = true;
            }
        }
    }

    fn collect(&mut self) {
        for id in 0..self.o.replicas {
            let Some(r) = self.nodes[id].replica.as_mut() else {
                continue;
            };
            let mut done = crate::handoff::Completions::new();
            r.take_completed(&mut done);
            for (ticket, outcome) in done.iter() {
                if let Some(ci) = self.clients.iter().position(|c| {
                    c.registering
                        .is_some_and(|r| r.0 as usize == id && r.1 == ticket)
                }) {
                    let c = &mut self.clients[ci];
                    c.registering = None;
                    match outcome {
                        Ok(b) => {
                            if let Some(Answer::Session(s)) = kv::decode_answer(b) {
                                (c.session, c.seq) = (Some(s), 0);
                                self.report.registrations += 1;
                            }
                        }
                        Err(ProposeError::NotLeader { leader: Some(l) }) => c.target = *l,
                        Err(_) => {}
                    }
                    continue;
                }
                let Some(ci) = self.clients.iter().position(|c| {
                    c.outstanding
                        .is_some_and(|o| o.0 as usize == id && o.1 == ticket)
                }) else {
                    continue;
                };
                let rec = self.clients[ci].outstanding.take().unwrap().2;
                if self.o.sessions {
                    self.session_outcome(ci, rec, outcome);
                    continue;
                }
                match outcome {
                    Ok(bytes) => {
                        self.seq += 1;
                        let ret = kv::decode_ret(bytes).expect("state machine returns");
                        self.ops[rec].returned = Some((self.seq, ret));
                        self.report.acked += 1;
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        // Rejected before entering the log: it never happened.
                        self.ops[rec].failed = true;
                        if let Some(l) = *leader {
                            self.clients[ci].target = l;
                        }
                    }
                    Err(_) => {
                        self.clients[ci].thread = self.next_thread;
                        self.next_thread += 1;
                    }
                }
            }
        }
    }

    fn step_all(&mut self, t: u64, tick: u64) {
        self.net.deliver_until(t);
        self.absorb_landed(t / UNITS_PER_TICK);
        for id in 0..self.o.replicas {
            let n = &mut self.nodes[id];
            if t % STEP_UNITS != n.phase % STEP_UNITS {
                continue;
            }
            if n.paused || n.slow_until > tick && !(t / STEP_UNITS).is_multiple_of(5) {
                continue;
            }
            let now_ticks = t * (1000 + n.skew) / 1000 / UNITS_PER_TICK;
            if let Some(r) = n.replica.as_mut() {
                let was = r.core().is_leader();
                let was_rec = r.core().is_recovering();
                let was_blank = r.core().is_blank();
                let was_pulling = r.core().is_pulling();
                r.step(now_ticks);
                self.absorb_landed(tick);
                self.check_step(id, tick);
                let Some(r) = self.nodes[id].replica.as_mut() else {
                    continue;
                };
                if let Some(src) = r.core().pull_source().filter(|_| !was_pulling) {
                    if self.o.faults && tick < self.o.ticks && self.more.chance(self.swarm.pull_cut)
                    {
                        self.net.set_link(id as NodeId, src, false);
                        let until = tick + 10 + self.more.below(60);
                        let c = &mut self.nodes[id].cut_until;
                        *c = (*c).max(until);
                    }
                }
                let Some(r) = self.nodes[id].replica.as_mut() else {
                    continue;
                };
                let rebuilt = was_rec && !r.core().is_recovering();
                if rebuilt || was_blank && !r.core().is_blank() {
                    self.check_chosen(tick);
                }
                let Some(r) = self.nodes[id].replica.as_mut() else {
                    continue;
                };
                if rebuilt && std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!(
                        "t={tick} recovered {} log {}..={}",
                        crate::driver::describe(r.core()),
                        r.core().log().base() + 1,
                        r.core().log().last()
                    );
                }
                if rebuilt && std::env::var_os("SIM_TRACE").is_some() {
                    // Where everyone stands when a rebuild finishes.
                    for r in self.nodes.iter().filter_map(|n| n.replica.as_ref()) {
                        let c = r.core();
                        eprintln!("   {} {}", crate::driver::describe(c), c.peer_summary());
                    }
                }
                let Some(r) = self.nodes[id].replica.as_mut() else {
                    continue;
                };
                if !was && r.core().is_leader() {
                    if std::env::var_os("SIM_TRACE").is_some() {
                        eprintln!("t={tick} elected {}", crate::driver::describe(r.core()));
                    }
                    self.report.elections += 1;
                }
            }
        }
    }

    /// End-to-end checks after a replica's step, independent of the core's assertions:
    /// its promise never goes down (within an incarnation, and across durable restarts),
    /// and when a leader's commit moves, every newly committed index is held by a majority
    /// of current incarnations. Sometimes the leader crashes right after its commit moved.
    fn check_step(&mut self, id: usize, tick: u64) {
        let core = self.nodes[id].replica.as_ref().expect("stepped").core();
        let (promised, commit, leader) = (core.promised(), core.commit(), core.is_leader());
        let (recovering, base) = (core.is_recovering(), core.log().base());
        let seen = self.nodes[id].seen_promise;
        if promised < seen {
            self.violation(format!(
                "promise: node {id} went from {seen} down to {promised} at tick {tick}"
            ));
        }
        self.nodes[id].seen_promise = promised;
        if leader && self.nodes[id].led.0 != promised {
            self.nodes[id].led = (promised, tick);
        }
        if promised > seen && seen != Ballot::ZERO {
            self.check_promise_covers_acks(id, seen, tick);
        }
        self.check_acks(tick);
        let before = std::mem::replace(&mut self.nodes[id].seen_commit, commit);
        if !leader || commit <= before || recovering {
            return;
        }
        let from = (before + 1).max(base + 1).max(commit.saturating_sub(64));
        let mut last_holders = Vec::new();
        for i in from..=commit {
            let Some(slot) = self.nodes[id].replica.as_ref().unwrap().core().log().get(i) else {
                continue;
            };
            let value = slot.payload().to_vec();
            last_holders = (0..self.o.replicas)
                .filter(|&j| j != id && self.holds(j, i, &value))
                .collect();
            self.chosen.entry(i).or_insert_with(|| value.clone());
            if !self.held_by_majority(i, &value) {
                self.violation(format!(
                    "commit: leader {id} committed index {i} at tick {tick}, not held by a majority of current incarnations"
                ));
                return;
            }
        }
        // Sometimes the leader, or a follower that holds the newest committed entry (the
        // acknowledgement that completed the majority), crashes right after the commit moved.
        if self.o.faults && tick < self.o.ticks && self.rng.chance(3_000 * self.swarm.crash) {
            let victim = match last_holders.len() {
                0 => id,
                k if self.rng.chance(500_000) => last_holders[self.rng.below(k as u64) as usize],
                _ => id,
            };
            let until = self.restart_at(tick);
            let allowed = self.o.durability == Durability::Durable
                || (self.down() as u64) < (self.o.replicas as u64 - 1) / 2;
            if allowed && self.nodes[victim].replica.is_some() {
                self.crash(victim as NodeId, until);
            }
        }
    }

    /// Whether `value` at index `i` is held by a majority of current incarnations, counting
    /// replicas that lost their memory and are rebuilding it (a leader may still count an
    /// acknowledgement of their last incarnation; their rebuild must then get the entry).
    fn held_by_majority(&self, i: Index, value: &[u8]) -> bool {
        let holders = (0..self.o.replicas)
            .filter(|&j| self.holds(j, i, value))
            .count();
        let rebuilding = (0..self.o.replicas).filter(|&j| self.rebuilding(j)).count();
        holders + rebuilding > self.o.replicas / 2
    }

    /// Every chosen value stays held by a majority of current incarnations (a rebuild that
    /// finished without it, or a stream that lost it, fails here at once, whether or not a
    /// later leader happens to overwrite it). Checked after rebuilds and every few ticks.
    fn check_chosen(&mut self, tick: u64) {
        let bad = self
            .chosen
            .iter()
            .find(|(i, v)| !self.held_by_majority(**i, v))
            .map(|(i, _)| *i);
        if let Some(i) = bad {
            let holders: Vec<usize> = (0..self.o.replicas)
                .filter(|&j| self.holds(j, i, &self.chosen[&i]))
                .collect();
            self.violation(format!(
                "chosen: index {i} (committed) is held only by {holders:?} of {} current incarnations at tick {tick}",
                self.o.replicas
            ));
            // Report a lost index once.
            self.chosen.remove(&i);
        }
    }

    /// What a leader counts as accepted (volatile) or persisted (durable) by a peer on its
    /// current stream is what that peer's current incarnation holds: in its log, under its
    /// checkpoint, or landed where its reader reads next (durable: on its disk).
    fn check_acks(&mut self, tick: u64) {
        for l in 0..self.o.replicas {
            let Some(r) = self.nodes[l].replica.as_ref() else {
                continue;
            };
            let core = r.core();
            if !core.is_leader() {
                continue;
            }
            let ballot = core.promised();
            for (p, a) in core.peer_acks() {
                let p = p as usize;
                let Some(slot) = core.log().get(a) else {
                    continue; // nothing counted, or compacted here
                };
                let promised = self.promise_of(p);
                // An incarnation that lost its memory after this leader took office may
                // be the one it counted: what it lost, its rebuild and the leader's own
                // commit checks answer for (its ack is of a memory that is gone).
                let lost_since = self.nodes[p].amnesia_at >= self.nodes[l].led.1;
                if self.rebuilding(p) || promised < ballot || lost_since {
                    continue;
                }
                // A peer that promised a higher ballot since keeps what it accepted until a
                // later leader's entry replaces it (the fence drained its ring first).
                let replaced = promised > ballot
                    && self.nodes[p]
                        .replica
                        .as_ref()
                        .is_none_or(|r| r.core().log().get(a).is_some_and(|s| s.ballot > ballot));
                if !replaced && !self.holds(p, a, slot.payload()) {
                    self.violation(format!(
                        "ack: leader {l} (ballot {ballot}) counts index {a} as accepted by {p}, which does not hold it, at tick {tick}"
                    ));
                    return;
                }
            }
        }
    }

    /// When `p`'s promise rises above `old`, it has taken in everything the leader of
    /// `old` counted from it: an acceptor reports what it accepted in its promise (the
    /// fence drains its ring first).
    fn check_promise_covers_acks(&mut self, p: usize, old: Ballot, tick: u64) {
        for l in 0..self.o.replicas {
            let Some(core) = self.nodes[l].replica.as_ref().map(|r| r.core()) else {
                continue;
            };
            if !core.is_leader() || core.promised() != old {
                continue;
            }
            let Some((_, a)) = core.peer_acks().into_iter().find(|x| x.0 as usize == p) else {
                continue;
            };
            let Some(slot) = core.log().get(a) else {
                continue;
            };
            if !self.holds_live(p, a, slot.payload()) {
                self.violation(format!(
                    "fence: node {p} promised above {old} at tick {tick} without index {a}, which leader {l} counts as accepted by it"
                ));
                return;
            }
        }
    }

    /// Takes in the entries that landed in rings: an acceptor accepts nothing below its
    /// promise (the fence revokes the old leader's write permission before it promises).
    fn absorb_landed(&mut self, tick: u64) {
        for l in self.net.take_landed() {
            let p = l.to as usize;
            let promised = self.nodes[p].seen_promise;
            // A write of a lower ballot by the very node promised to now is a late write of
            // its own earlier stream (a stalled data path, then a regrant to the same node):
            // it lands before that node's new writes (the data path is FIFO per link) and
            // the reader, which takes only entries of its stream's ballot, never reads it.
            // Any other node's lower ballot landing means the fence let it through.
            if l.ballot < promised && l.from != promised.node() {
                self.violation(format!(
                    "accept: entry {} of ballot {} from {} landed in the ring of {p}, which promised {promised}, at tick {tick}",
                    l.index, l.ballot, l.from
                ));
                continue;
            }
        }
    }

    /// The promise of `p`'s current incarnation (durable and down: the one on its disk).
    fn promise_of(&self, p: usize) -> Ballot {
        match (&self.nodes[p].replica, self.o.durability) {
            (Some(r), _) => r.core().promised(),
            (None, Durability::Durable) => self.nodes[p].disk.lock().unwrap().promise.ballot,
            (None, Durability::Volatile) => Ballot::ZERO,
        }
    }

    /// Whether `j` lost its memory (volatile: down or recovering; durable: its data dir)
    /// and has not rebuilt it yet.
    fn rebuilding(&self, j: usize) -> bool {
        match self.o.durability {
            Durability::Durable => {
                let d = self.nodes[j].disk.lock().unwrap();
                // Wiped and not rebuilt: rejoining, or down or blank since the wipe.
                d.rejoining
                    || d.lost
                        && self.nodes[j]
                            .replica
                            .as_ref()
                            .is_none_or(|r| r.core().is_blank())
            }
            // Down, rebuilding, or blank since a wipe.
            Durability::Volatile => self.nodes[j].replica.as_ref().is_none_or(|r| {
                r.core().is_recovering() || self.nodes[j].wiped && r.core().is_blank()
            }),
        }
    }

    /// Whether the current incarnation of `j` holds `value` at index `i`: durably on its
    /// disk (durable mode), or in its log, under its checkpoint, or landed in its ring
    /// where its reader will read next (volatile mode).
    fn holds(&self, j: usize, i: Index, value: &[u8]) -> bool {
        let payload = |e: &[u8]| crate::layout::decode_entry(e).map(|(_, p)| p.to_vec()).ok();
        if self.o.durability == Durability::Durable {
            // The disk outlives the replica's crashes; its log does not while it is being
            // rebuilt (a crash then starts the rebuild over), its checkpoints do.
            let d = self.nodes[j].disk.lock().unwrap();
            let ckpt = self.nodes[j]
                .ckpts
                .0
                .lock()
                .unwrap()
                .latest()
                .map_or(0, |c| c.index);
            if i <= ckpt {
                return true;
            }
            if d.rejoining {
                return false;
            }
            if i <= d.base {
                return true;
            }
            return d
                .entries
                .get((i - d.base - 1) as usize)
                .is_some_and(|e| payload(e).as_deref() == Some(value));
        }
        self.holds_live(j, i, value)
    }

    /// Whether `j`'s running replica holds `value` at `i` in memory: under its log's base,
    /// in its log, or where its reader will read next. (A promise answers from memory: what
    /// a durable replica that is still rebuilding its disk holds counts here.)
    fn holds_live(&self, j: usize, i: Index, value: &[u8]) -> bool {
        let Some(r) = self.nodes[j].replica.as_ref() else {
            return false;
        };
        if r.core().is_recovering() {
            return false;
        }
        let log = r.core().log();
        if i <= log.base() || log.get(i).is_some_and(|s| s.payload() == value) {
            return true;
        }
        r.ring_pending().iter().any(|(k, p)| *k == i && p == value)
    }

    fn run(&mut self) {
        for id in 0..self.o.replicas as NodeId {
            self.boot(id, false);
        }
        let fault_end = self.o.ticks;
        let live_end = fault_end + 300;
        let end = live_end + 400;
        let mut acked_at_heal = None;
        let mut live_ok = false;
        let mut t = 0;
        while t < end * UNITS_PER_TICK {
            let tick = t / UNITS_PER_TICK;
            if t % UNITS_PER_TICK == 0 {
                if self.o.faults && tick < fault_end {
                    self.inject_faults(tick);
                    self.nemesis_tick(tick);
                }
                if tick == fault_end {
                    self.net.set_faults(Faults::none());
                    self.heal_due(tick, true);
                    acked_at_heal = Some(self.report.acked);
                } else {
                    self.heal_due(tick, false);
                }
                self.client_turn(tick, tick < live_end);
            }
            self.step_all(t, tick);
            self.collect();
            if t % (25 * UNITS_PER_TICK) == 0 {
                self.check_chosen(tick);
            }
            if let Some(a) = acked_at_heal {
                if !live_ok && self.report.acked > a {
                    live_ok = true;
                    if tick > fault_end + 250 {
                        self.violation(format!(
                            "liveness: first commit after healing took {} ticks",
                            tick - fault_end
                        ));
                    }
                }
            }
            t += 1;
        }
        if !live_ok {
            if std::env::var_os("SIM_TRACE").is_some() {
                for n in &self.nodes {
                    if let Some(r) = n.replica.as_ref() {
                        let c = r.core();
                        eprintln!(
                            "stuck: {} blank={} {}",
                            crate::driver::describe(c),
                            c.is_blank(),
                            c.peer_summary()
                        );
                    }
                }
            }
            self.violation(
                "liveness: no command committed in 300 ticks after faults healed".into(),
            );
        }
    }

    fn violation(&mut self, v: String) {
        if self.report.violations.len() < 20 {
            self.report.violations.push(v);
        }
    }

    fn check(&mut self) {
        // Every incarnation's applied sequence, current ones included.
        let mut seqs: Vec<(NodeId, Vec<(Index, u64)>)> = Vec::new();
        for (id, n) in self.nodes.iter().enumerate() {
            for p in n.past.iter().chain(&n.superseded) {
                seqs.push((id as NodeId, p.clone()));
            }
            if let Some(r) = &n.replica {
                for s in &r.state_machine().superseded {
                    seqs.push((id as NodeId, s.clone()));
                }
                seqs.push((id as NodeId, r.state_machine().applied.clone()));
                self.report.commits = self.report.commits.max(r.core().commit());
                self.report.dedups = self.report.dedups.max(r.state_machine().dedups);
                self.report.checkpoints += r.stats().checkpoints_taken;
                self.report.installs += r.stats().checkpoints_installed;
            }
        }
        // Agreement: one command list per index.
        let mut reference: BTreeMap<Index, Vec<u64>> = BTreeMap::new();
        let mut where_: BTreeMap<u64, Index> = BTreeMap::new();
        let mut violations = Vec::new();
        for (inc, (node, s)) in seqs.iter().enumerate() {
            let mut by_index: BTreeMap<Index, Vec<u64>> = BTreeMap::new();
            let mut seen = HashSet::new();
            let mut last = 0;
            for &(i, id) in s {
                if i < last {
                    violations.push(format!("order: node {node} applied index {i} after {last}"));
                }
                last = i;
                if !seen.insert(id) {
                    violations.push(format!(
                        "exactly-once: node {node} applied command {id} twice"
                    ));
                }
                by_index.entry(i).or_default().push(id);
            }
            for (i, ids) in by_index {
                match reference.get(&i) {
                    Some(r) if *r != ids => violations.push(format!("agreement: index {i}: node {node} (incarnation {inc}) applied {ids:?}, another applied {r:?}")),
                    Some(_) => {}
                    None => {
                        for &id in &ids {
                            if let Some(j) = where_.insert(id, i) {
                                if j != i {
                                    violations.push(format!("exactly-once: command {id} chosen at {j} and {i}"));
                                }
                            }
                        }
                        reference.insert(i, ids);
                    }
                }
            }
        }
        // Prefixes: a replica that applied up to m applied every non-empty index below m.
        for (node, s) in &seqs {
            let m = s.last().map_or(0, |x| x.0);
            let have: BTreeSet<Index> = s.iter().map(|x| x.0).collect();
            if let Some((&i, _)) = reference.range(..=m).find(|(i, _)| !have.contains(i)) {
                violations.push(format!(
                    "prefix: node {node} applied up to {m} but skipped index {i}"
                ));
            }
        }
        // Acknowledged commands are chosen, and every live replica applied them by the end.
        let acked: Vec<&OpRec> = self.ops.iter().filter(|o| o.returned.is_some()).collect();
        for o in &acked {
            if !where_.contains_key(&o.id) {
                violations.push(format!(
                    "durability: acknowledged command {} was never chosen",
                    o.id
                ));
            }
        }
        for (id, n) in self.nodes.iter().enumerate() {
            let Some(r) = &n.replica else { continue };
            let have: HashSet<u64> = r.state_machine().applied.iter().map(|x| x.1).collect();
            if let Some(o) = acked.iter().find(|o| !have.contains(&o.id)) {
                if std::env::var_os("SIM_TRACE").is_some() {
                    for m in self.nodes.iter().filter_map(|n| n.replica.as_ref()) {
                        eprintln!(
                            "end: {} {}",
                            crate::driver::describe(m.core()),
                            m.core().peer_summary()
                        );
                    }
                }
                violations.push(format!(
                    "convergence: node {id} ({}) lacks acknowledged command {} at the end",
                    crate::driver::describe(r.core()),
                    o.id
                ));
            }
        }
        // The log is the linearization: replaying it must give every acknowledged result,
        // and an operation that returned before another was invoked must come first in it.
        // (Cheaper and more precise than the search below; both must hold.)
        let mut order: Vec<u64> = Vec::new();
        for ids in reference.values() {
            order.extend(ids);
        }
        let pos: BTreeMap<u64, usize> = order.iter().enumerate().map(|(k, &id)| (id, k)).collect();
        let by_id: BTreeMap<u64, &OpRec> = self.ops.iter().map(|o| (o.id, o)).collect();
        let mut spec = Spec::default();
        for id in &order {
            let Some(o) = by_id.get(id) else { continue };
            let ret = spec.apply(&o.op);
            if let Some((_, got)) = o.returned {
                if got != ret {
                    violations.push(format!("linearizability: command {id} ({:?}) returned {got:?}, the log gives {ret:?}", o.op));
                }
            }
        }
        // (Acknowledged commands missing from the log are reported above.)
        let mut done: Vec<&OpRec> = acked
            .iter()
            .copied()
            .filter(|o| pos.contains_key(&o.id))
            .collect();
        done.sort_by_key(|o| o.returned.unwrap().0);
        let mut latest: Option<&OpRec> = None; // acked op with the highest log position returned so far
        let mut k = 0;
        let mut invoked: Vec<&OpRec> = self
            .ops
            .iter()
            .filter(|o| !o.failed && pos.contains_key(&o.id))
            .collect();
        invoked.sort_by_key(|o| o.invoked);
        for b in invoked {
            while k < done.len() && done[k].returned.unwrap().0 < b.invoked {
                if latest.is_none_or(|l| pos[&l.id] < pos[&done[k].id]) {
                    latest = Some(done[k]);
                }
                k += 1;
            }
            if let Some(a) = latest {
                if pos[&a.id] > pos[&b.id] {
                    violations.push(format!("real-time order: command {} returned before {} was invoked, but follows it in the log", a.id, b.id));
                    break;
                }
            }
        }
        // Linearizability, key by key (skipped when the log itself is already wrong: the
        // search for a linearization of a broken history can take exponential time).
        let clean = violations.is_empty();
        let keys = SHARED_KEYS as usize + self.swarm.extra_clients;
        for key in (0..keys as u8).filter(|_| clean) {
            if let Err(v) = self.check_linearizable(key, &pos) {
                violations.push(v);
            }
        }
        for v in violations {
            self.violation(v);
        }
    }

    /// `logged`: the commands in the chosen log. A call that never returned may or may not
    /// have taken effect; one that is not in the chosen log at the end did not (nothing
    /// observed it), and a read has no effect: both are completed by removal, as the
    /// definition allows. The ones left are what the search has to place; without this,
    /// a few dozen of them made the search run for many minutes (seed 731, 5 durable).
    fn check_linearizable(&self, key: u8, logged: &BTreeMap<u64, usize>) -> Result<(), String> {
        let history = self
            .ops
            .iter()
            .filter(|o| !o.failed && o.op.key() == key)
            .filter(|o| {
                o.returned.is_some() || (logged.contains_key(&o.id) && !matches!(o.op, Op::Get(_)))
            })
            .map(|o| linearizability::Call {
                thread: o.thread,
                op: o.op,
                invoked: o.invoked,
                returned: o.returned,
            });
        match linearizability::check(history, Spec::default()) {
            Ok(_) => Ok(()),
            Err(linearizability::Violation::Malformed(e)) => {
                Err(format!("history malformed for key {key}: {e}"))
            }
            Err(linearizability::Violation::NotLinearizable { ops }) => Err(format!(
                "linearizability: history of key {key} ({ops} ops) has no linearization"
            )),
        }
    }
}

/// Runs one seeded simulation and checks it.
pub fn run(o: Options) -> Report {
    assert!((1..=crate::MAX_NODES).contains(&o.replicas));
    let mut rng = Rng(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let nodes = (0..o.replicas)
        .map(|_| Node {
            replica: None,
            disk: Arc::new(Mutex::new(Disk {
                rng: rng.next(),
                ..Disk::default()
            })),
            ckpts: SharedCkpts::default(),
            superseded: Vec::new(),
            past: Vec::new(),
            skew: rng.below(100),
            phase: rng.below(STEP_UNITS),
            down_until: 0,
            slow_until: 0,
            paused: false,
            cut_until: 0,
            seen_commit: 0,
            seen_promise: Ballot::ZERO,
            amnesia_at: 0,
            wiped: false,
            led: (Ballot::ZERO, 0),
            ckpt_mul: 1,
        })
        .collect();
    let faults = if o.faults {
        swarm_network(&mut rng)
    } else {
        Faults {
            latency_max: 10,
            ..Faults::none()
        }
    };
    let net = MemNet::simulated(rng.next(), faults);
    let clients = (0..o.clients)
        .map(|i| Client::new(i as u64, (i % o.replicas) as NodeId))
        .collect();
    let mut sim = Sim {
        o,
        rng,
        net,
        nodes,
        clients,
        ops: Vec::new(),
        seq: 0,
        next_thread: o.clients as u64,
        report: Report::default(),
        geo: RingGeometry::new(64, 64).expect("valid geometry"),
        ckpt_every: 0,
        ckpt_keep: 1,
        chosen: BTreeMap::new(),
        swarm: Swarm {
            crash: 1,
            quick_restart: 0,
            isolate: 1,
            cut: 1,
            one_way: 0,
            long_cut: 0,
            slow: 1,
            blind: 0,
            extra_clients: 0,
            stall: 0,
            rebuild_cut: 0,
            ring: 0,
            pull_cut: 0,
            ckpt_skew: false,
            blank_crash: 0,
        },
        more: Rng(o.seed ^ 0x9e37_79b9_7f4a_7c15),
        blank_rng: Rng(o.seed ^ 0x5851_f42d_4c95_7f2d),
        nemesis: if o.faults {
            nemesis::Nemesis::new(o.seed)
        } else {
            nemesis::Nemesis::off(o.seed)
        },
    };
    if o.faults {
        sim.swarm = Swarm::pick(&mut sim.rng);
        sim.swarm.pick_more(&mut sim.more);
        sim.swarm.blank_crash = [0, 0, 100_000, 300_000][sim.blank_rng.below(4) as usize];
        if sim.swarm.ckpt_skew {
            for n in &mut sim.nodes {
                n.ckpt_mul = [1, 1, 4][sim.more.below(3) as usize];
            }
        }
        for i in 0..sim.swarm.extra_clients {
            sim.clients
                .push(Client::new(sim.next_thread, (i % o.replicas) as NodeId));
            sim.next_thread += 1;
        }
    }
    // Frequent checkpoints (every 10 to 40 commands), so that compaction, catch-up through
    // checkpoints and restarts from them happen in most runs.
    sim.ckpt_every = 26 * (10 + sim.rng.below(30));
    sim.ckpt_keep = 1 + sim.rng.below(3) as usize;
    let contracts = crate::protocol::contracts();
    crate::protocol::set_contracts(o.contracts);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sim.run();
        sim.check();
    }));
    crate::protocol::set_contracts(contracts);
    sim.report.history = digest::history(&sim);
    if let Err(p) = outcome {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        sim.violation(format!("contract: {msg}"));
    }
    sim.report
}
