//! A replicated cluster in this process (topology `threads`): each replica runs on
//! [`ballot::runtime::Runtime`], the replica loop `ballot-node` runs too, with the same
//! [`IdleStrategy`]; one load-generator thread plays the clients and hands their commands
//! to the leader's runtime in batches ([`Handle::submit_batch`]), and gets the outcomes
//! back on one [`CompletionSink`].

use crate::fabrics::{self, FabricKind, RdmaOpts};
use crate::load::LoadOpts;
use crate::stats::{self, BenchResult};
use ballot::driver::{Replica, StateMachine};
use ballot::fabric::Fabric;
use ballot::handoff::{Completions, Proposals};
use ballot::protocol::{Config, Core, ProposeError};
use ballot::runtime::{
    CompletionSink, Handle, IdleAction, IdleStrategy, Idler, Role, Runtime, RuntimeConfig,
};
use ballot::Index;
use crossbeam::channel::Receiver;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The replicated application: does nothing, answers nothing.
struct Null;
impl StateMachine for Null {
    fn apply(&mut self, _: Index, _: &[u8], _: &mut Vec<u8>) {}
}

pub(crate) const NO_LEADER: usize = usize::MAX;

#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    pub(crate) leader: AtomicUsize,
    /// The leader's commit index (for commands per entry).
    pub(crate) commit: AtomicU64,
    /// Failed commands by cause: not leader, busy, indeterminate, other.
    pub(crate) failures: [AtomicU64; 4],
    /// Times a replica became leader (the first election included).
    pub(crate) elections: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            leader: AtomicUsize::new(NO_LEADER),
            ..Default::default()
        }
    }

    /// Reads who leads from the replicas' published status (the highest ballot among those
    /// that say they lead), and that leader's commit index; counts a change of leader as an
    /// election.
    pub(crate) fn observe(&self, handles: &[Handle]) {
        let mut best: Option<(u64, usize, Index)> = None;
        for (i, h) in handles.iter().enumerate() {
            let s = h.status();
            if s.role == Role::Leader && best.is_none_or(|(b, _, _)| s.ballot > b) {
                best = Some((s.ballot, i, s.commit));
            }
        }
        match best {
            Some((_, i, commit)) => {
                if self.leader.swap(i, Ordering::Relaxed) != i {
                    self.elections.fetch_add(1, Ordering::Relaxed);
                }
                self.commit.store(commit, Ordering::Relaxed);
            }
            None => self.leader.store(NO_LEADER, Ordering::Relaxed),
        }
    }

    /// Prints leader changes and failed commands, if there were any.
    pub(crate) fn report_failures(&self) {
        let f: Vec<u64> = self
            .failures
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let elections = self.elections.load(Ordering::Relaxed);
        if f.iter().any(|x| *x > 0) || elections > 1 {
            eprintln!(
                "  leader changes: {} (after the first election); failed commands (whole run): \
                 not leader {}, busy {}, indeterminate {}, other {}",
                elections.saturating_sub(1),
                f[0],
                f[1],
                f[2],
                f[3]
            );
        }
    }
}

fn failure_slot(e: &ProposeError) -> usize {
    use ProposeError as E;
    match e {
        E::NotLeader { .. } => 0,
        E::Busy => 1,
        E::Indeterminate => 2,
        _ => 3,
    }
}

pub fn run(kind: FabricKind, o: &LoadOpts, rdma: &RdmaOpts) -> Result<BenchResult, String> {
    if o.replicas == 0 || o.replicas > ballot::MAX_NODES {
        return Err(format!("--replicas must be 1..={}", ballot::MAX_NODES));
    }
    if o.clients == 0 || o.outstanding == 0 {
        return Err("--clients and --outstanding must be positive".into());
    }
    let (batch, cfgs) = configs(o);
    let regions = fabrics::regions(o.replicas, cfgs[0].ring);
    let window = cfgs[0].window;
    let mut r = match kind {
        FabricKind::Mem => run_with(fabrics::mem(regions), cfgs, o)?,
        FabricKind::Tcp => run_with(fabrics::tcp(regions)?, cfgs, o)?,
        FabricKind::Rdma => run_with(fabrics::rdma(regions, rdma)?, cfgs, o)?,
    };
    r.fabric = kind.name().into();
    r.batch_bytes = batch;
    r.pipeline = window;
    Ok(r)
}

/// The batch size and each replica's configuration for `o`.
pub(crate) fn configs(o: &LoadOpts) -> (usize, Vec<Config>) {
    let per_cmd = o.payload + ballot::protocol::batch::COMMAND_OVERHEAD;
    // 0 means one command per entry (no batching).
    let batch = match o.batch_bytes {
        Some(0) => per_cmd,
        Some(b) => b.max(per_cmd),
        None => (64usize << 10).max(per_cmd),
    };
    let ring = fabrics::geometry(batch);
    let mut cfgs = Vec::new();
    for i in 0..o.replicas {
        let mut c = Config::new(
            i as u8,
            (0..o.replicas as u8).collect(),
            ring,
            ballot::runtime::clock_seed(i as u8),
        );
        c.batch_bytes = batch;
        if o.durable() {
            c.durability = ballot::protocol::Durability::Durable;
        }
        if let Some(w) = o.pipeline {
            c.window = w;
        }
        c.max_queue = c.max_queue.max(o.clients * o.outstanding * 2);
        cfgs.push(c);
    }
    (batch, cfgs)
}

/// The threads topology's shared-cores counts: spin 50 turns, yield 50, park 20 us (the
/// bench's own loop had these before it ran on the runtime). With `ballot-node`'s
/// (`IdleStrategy::shared()`: 200, 50, 100 us) the 32 x 4 TCP run committed about half as
/// much at twice the p50 on the 2-vCPU machine (docs/benchmarks.md): idle followers park
/// for 100 us and the leader's next entry waits for them. `ballot-node` keeps the longer
/// park, which costs an idle node less CPU.
pub(crate) const SHARED: IdleStrategy = IdleStrategy::Shared {
    spin: 50,
    yields: 50,
    park: Duration::from_micros(20),
};

/// Replica `i`'s idle strategy: pinned to `--cores`' core for it (busy-polling, as
/// `ballot-node --core`), else [`SHARED`].
pub(crate) fn idle_strategy(o: &LoadOpts, i: usize) -> IdleStrategy {
    match (!o.cores.is_empty()).then(|| o.cores[i % o.cores.len()].id) {
        Some(core) => IdleStrategy::Pinned { core },
        None => SHARED,
    }
}

/// Starts replica `i`'s runtime.
pub(crate) fn start_runtime<F: Fabric + 'static, S: StateMachine + 'static>(
    rep: Replica<F, S>,
    i: usize,
    idle: IdleStrategy,
) -> Result<Runtime<F, S>, String> {
    Runtime::start(
        rep,
        RuntimeConfig {
            idle,
            name: format!("replica-{i}"),
            ..RuntimeConfig::default()
        },
    )
    .map_err(|e| format!("starting replica {i}: {e}"))
}

fn run_with<F: Fabric + 'static>(
    fabrics: Vec<F>,
    cfgs: Vec<Config>,
    o: &LoadOpts,
) -> Result<BenchResult, String> {
    let shared = Shared::new();
    let mut runtimes = Vec::new();
    // Durable: the replicas' files, removed when the run ends (after the runtimes: `dir` is
    // dropped at the end of this function, once they are stopped).
    let dir = o.durable().then(|| o.scratch_dir("durable")).transpose()?;
    for (i, (fabric, cfg)) in fabrics.into_iter().zip(cfgs).enumerate() {
        let core = Core::new(cfg, false).map_err(|e| format!("config: {e}"))?;
        let storage = match &dir {
            Some(d) => Some(durable_storage(&d.path().join(i.to_string()))?),
            None => None,
        };
        let rep = Replica::new(core, fabric, Null, storage);
        runtimes.push(start_runtime(rep, i, idle_strategy(o, i))?);
    }
    let handles: Vec<Handle> = runtimes.iter().map(Runtime::handle).collect();
    let result = load(o, &shared, &handles);
    shared.stop.store(true, Ordering::SeqCst);
    shared.report_failures();
    for r in runtimes {
        r.shutdown();
    }
    drop(dir);
    result
}

/// Waits until some replica leads.
pub(crate) fn wait_for_leader(
    shared: &Shared,
    handles: &[Handle],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        shared.observe(handles);
        if shared.leader.load(Ordering::Relaxed) != NO_LEADER {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no leader elected within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The load generator thread: closed-loop clients for `warmup + duration`.
fn load(o: &LoadOpts, shared: &Shared, handles: &[Handle]) -> Result<BenchResult, String> {
    wait_for_leader(shared, handles, Duration::from_secs(15))?;
    let mut g = LoadGen::new(o, Commands::Fixed(vec![0xA5u8; o.payload]), shared);
    let warm_end = g.started() + o.measure.warmup;
    let end = warm_end + o.measure.duration;
    let mut measuring = o.measure.warmup.is_zero();
    let mut partial = false;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if crate::interrupt::requested() {
            partial = true;
            break;
        }
        if !measuring && now >= warm_end {
            measuring = true;
            g.begin(shared);
        }
        g.progress(now, if measuring { "measure" } else { "warm-up" });
        let busy = g.turn(shared, handles);
        g.idle(busy);
    }
    g.finish(Instant::now());
    let mut w = g.window(shared);
    if !measuring {
        // Interrupted in the warm-up: nothing was measured.
        w.secs = 0.0;
    }
    let closed = o.open_loop.is_none();
    let mut r = BenchResult {
        kind: "cluster",
        topology: "threads",
        replicas: handles.len(),
        payload: o.payload,
        clients: if closed { o.clients } else { 0 },
        outstanding: if closed { o.outstanding } else { 0 },
        open_loop_rate: o.open_loop,
        durability: o.durability_name(),
        duration_s: w.secs,
        commits: w.commits,
        errors: w.errors,
        throughput_ops_s: if w.secs > 0.0 {
            w.commits as f64 / w.secs
        } else {
            0.0
        },
        partial,
        commands_per_entry: w.commands_per_entry(),
        ..Default::default()
    };
    r.fill_latency(&w.hist);
    Ok(r)
}

/// The commands the clients send.
pub(crate) enum Commands {
    /// The same bytes every time.
    Fixed(Vec<u8>),
    /// `payload` bytes: a key (u64 LE) counting up modulo `keys`, then filler.
    Keyed {
        payload: usize,
        keys: u64,
        next: u64,
    },
}

impl Commands {
    /// Appends the next command to `to`, under `tag`.
    pub(crate) fn push_next(&mut self, tag: u64, to: &mut Proposals) {
        match self {
            Commands::Fixed(c) => to.push(tag, c),
            Commands::Keyed {
                payload,
                keys,
                next,
            } => {
                let mut c = [0xA5u8; 64];
                let key = (*next % (*keys).max(1)).to_le_bytes();
                *next += 1;
                if *payload <= c.len() {
                    c[..8].copy_from_slice(&key);
                    to.push(tag, &c[..(*payload).max(8)]);
                } else {
                    let mut c = vec![0xA5u8; *payload];
                    c[..8].copy_from_slice(&key);
                    to.push(tag, &c);
                }
            }
        }
    }
}

/// What one measured window saw.
pub(crate) struct Window {
    /// Commit latency of the commands that completed in the window (ns).
    pub(crate) hist: hdrhistogram::Histogram<u64>,
    pub(crate) commits: u64,
    pub(crate) errors: u64,
    pub(crate) secs: f64,
    /// Entries the leader committed in the window.
    pub(crate) entries: u64,
}

impl Window {
    pub(crate) fn commands_per_entry(&self) -> Option<f64> {
        (self.entries > 0).then(|| self.commits as f64 / self.entries as f64)
    }
}

/// The load generator: closed-loop clients (each keeps `outstanding` commands in flight) or
/// an open-loop arrival process, driven one `turn` at a time by its thread. Latency is
/// measured from the send time, or, in open loop, from the *intended* send time, so that a
/// stalled system cannot hide its tail (coordinated omission). `begin` starts a measured
/// window, `window` reads it.
pub(crate) struct LoadGen {
    cmds: Commands,
    closed: bool,
    gap: Option<Duration>,
    next_arrival: Instant,
    /// Per tag: when the command was (meant to be) sent.
    sent_at: Vec<Instant>,
    free: Vec<u64>,
    /// Closed loop: refused commands waiting to be sent again.
    retry: Vec<(Instant, u64)>,
    /// Commands ready to send, `(tag, command)`: the next batch.
    out: Proposals,
    /// Where the runtimes deliver the outcomes, and the receiving end.
    sink: CompletionSink,
    done: Receiver<Completions>,
    /// Outcomes received while parked, handled on the next turn.
    parked: Option<Completions>,
    idler: Idler,
    total: hdrhistogram::Histogram<u64>,
    interval: hdrhistogram::Histogram<u64>,
    commits: u64,
    errors: u64,
    interval_commits: u64,
    from: Instant,
    commit_at_start: u64,
    t0: Instant,
    ticker: stats::Ticker,
}

/// Closed loop: a refused command (e.g. `NotLeader` while leadership moves) is sent again
/// after this, not at once, so that a leader change does not turn into a flood of refusals.
const RETRY_AFTER: Duration = Duration::from_millis(1);

impl LoadGen {
    pub(crate) fn new(o: &LoadOpts, mut cmds: Commands, shared: &Shared) -> LoadGen {
        // The channel wakes a parked generator: nothing more to do on the replica thread.
        let (sink, done) = CompletionSink::new(|| {});
        let t0 = Instant::now();
        let closed = o.open_loop.is_none();
        let mut sent_at = Vec::new();
        let mut out = Proposals::new();
        if closed {
            let n = o.clients * o.outstanding;
            sent_at = vec![t0; n];
            for tag in 0..n as u64 {
                cmds.push_next(tag, &mut out);
            }
        }
        LoadGen {
            cmds,
            closed,
            gap: o
                .open_loop
                .map(|r| Duration::from_secs_f64(1.0 / r.max(1e-3))),
            next_arrival: t0,
            sent_at,
            free: Vec::new(),
            retry: Vec::new(),
            out,
            sink,
            done,
            parked: None,
            // The generator shares the cores with the replicas: never busy-polls.
            idler: IdleStrategy::default().start(),
            total: stats::histogram(),
            interval: stats::histogram(),
            commits: 0,
            errors: 0,
            interval_commits: 0,
            from: t0,
            commit_at_start: shared.commit.load(Ordering::Relaxed),
            t0,
            ticker: stats::Ticker::new(o.progress(), t0, "warm-up"),
        }
    }

    /// When the generator started.
    pub(crate) fn started(&self) -> Instant {
        self.t0
    }

    /// Starts a new measured window (the previous one's figures are dropped).
    pub(crate) fn begin(&mut self, shared: &Shared) {
        self.from = Instant::now();
        self.total.reset();
        self.commits = 0;
        self.errors = 0;
        self.commit_at_start = shared.commit.load(Ordering::Relaxed);
    }

    /// The current window so far.
    pub(crate) fn window(&self, shared: &Shared) -> Window {
        Window {
            hist: self.total.clone(),
            commits: self.commits,
            errors: self.errors,
            secs: Instant::now().duration_since(self.from).as_secs_f64(),
            entries: shared
                .commit
                .load(Ordering::Relaxed)
                .saturating_sub(self.commit_at_start),
        }
    }

    /// A progress line on stderr once a second and when the phase becomes `label` (unless
    /// quiet); each line is labelled with the phase its interval was spent in.
    pub(crate) fn progress(&mut self, now: Instant, label: &'static str) {
        let t = self.ticker.due(now, label);
        self.print(t);
    }

    /// The last progress line: the interval from the previous one to `now`.
    pub(crate) fn finish(&mut self, now: Instant) {
        let t = self.ticker.finish(now);
        self.print(t);
    }

    fn print(&mut self, t: Option<stats::Tick>) {
        let Some(t) = t else { return };
        eprintln!(
            "{} {:>10.0} commits/s   p50 {:>8.1} us   p99 {:>8.1} us",
            t.head(),
            self.interval_commits as f64 / t.secs,
            stats::us(&self.interval, 0.5),
            stats::us(&self.interval, 0.99),
        );
        self.interval.reset();
        self.interval_commits = 0;
    }

    /// One turn: arrivals (open loop), completions, retries, and sending what is ready to
    /// the leader as one batch. Returns whether anything happened (for the idle strategy).
    pub(crate) fn turn(&mut self, shared: &Shared, handles: &[Handle]) -> bool {
        shared.observe(handles);
        let now = Instant::now();
        if let Some(gap) = self.gap {
            while self.next_arrival <= now {
                let tag = match self.free.pop() {
                    Some(t) => t,
                    None => {
                        self.sent_at.push(self.next_arrival);
                        (self.sent_at.len() - 1) as u64
                    }
                };
                self.sent_at[tag as usize] = self.next_arrival;
                self.cmds.push_next(tag, &mut self.out);
                self.next_arrival += gap;
            }
        }
        let mut busy = false;
        let mut t = None;
        while let Some(done) = self.parked.take().or_else(|| self.done.try_recv().ok()) {
            busy = true;
            let t = *t.get_or_insert_with(Instant::now);
            for (tag, outcome) in done.iter() {
                let ok = match outcome {
                    Ok(_) => true,
                    Err(e) => {
                        shared.failures[failure_slot(e)].fetch_add(1, Ordering::Relaxed);
                        false
                    }
                };
                self.complete(tag, ok, t);
            }
        }
        if !self.retry.is_empty() {
            let now = Instant::now();
            let (out, cmds) = (&mut self.out, &mut self.cmds);
            self.retry.retain(|&(at, tag)| {
                if at <= now {
                    cmds.push_next(tag, out);
                    false
                } else {
                    true
                }
            });
        }
        if !self.out.is_empty() {
            let l = shared.leader.load(Ordering::Relaxed);
            let l = if l == NO_LEADER { 0 } else { l };
            if let Err(r) = handles[l].submit_batch(self.out.take(), &self.sink) {
                // Refused whole (`Busy`: the runtime's queue is full; `ShuttingDown`): no
                // outcome comes for any of them.
                let t = Instant::now();
                let n = r.batch.len() as u64;
                shared.failures[failure_slot(&r.error)].fetch_add(n, Ordering::Relaxed);
                for tag in r.batch.tags() {
                    self.complete(tag, false, t);
                }
            }
            busy = true;
        }
        busy
    }

    /// Command `tag` completed at `t` (`ok`: committed): measured, then sent again (closed
    /// loop; after a pause if it failed) or its tag freed (open loop).
    fn complete(&mut self, tag: u64, ok: bool, t: Instant) {
        let slot = &mut self.sent_at[tag as usize];
        if ok {
            let ns = t.duration_since(*slot).as_nanos() as u64;
            let _ = self.interval.record(ns.max(1));
            let _ = self.total.record(ns.max(1));
            self.interval_commits += 1;
            self.commits += 1;
        } else {
            self.errors += 1;
        }
        if self.closed && !ok {
            *slot = t + RETRY_AFTER;
            self.retry.push((t + RETRY_AFTER, tag));
        } else if self.closed {
            *slot = t;
            self.cmds.push_next(tag, &mut self.out);
        } else {
            self.free.push(tag);
        }
    }

    /// Waits after a turn (`busy`: it did something) as the idle strategy says: a park ends
    /// early when an outcome arrives, and, in open loop, at the next arrival.
    pub(crate) fn idle(&mut self, busy: bool) {
        match self.idler.turn(busy) {
            IdleAction::Continue => {}
            IdleAction::Spin => std::hint::spin_loop(),
            IdleAction::Yield => std::thread::yield_now(),
            IdleAction::Park(d) => {
                let d = match self.gap {
                    Some(_) => d.min(self.next_arrival.saturating_duration_since(Instant::now())),
                    None => d,
                };
                if let Ok(x) = self.done.recv_timeout(d) {
                    self.parked = Some(x);
                }
            }
        }
    }
}

/// A persister in the fresh directory `dir` (made here).
fn durable_storage(dir: &std::path::Path) -> Result<Box<dyn ballot::driver::Storage>, String> {
    use ballot::storage::persister::{Persister, PersisterOptions};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (p, _) = Persister::open(dir, PersisterOptions::default())
        .map_err(|e| format!("durable storage in {}: {e}", dir.display()))?;
    Ok(Box::new(p))
}
