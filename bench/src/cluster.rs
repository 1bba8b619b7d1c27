//! A replicated cluster in this process (topology `threads`): one thread per replica runs
//! `Replica::step` in a loop; one load-generator thread plays the clients and hands their
//! commands to the leader's thread through crossbeam channels (a `Replica` is not `Sync`,
//! so proposals are made on its own thread).

use crate::fabrics::{self, FabricKind, Idle, RdmaOpts};
use crate::load::LoadOpts;
use crate::stats::{self, BenchResult};
use ballot::driver::{Replica, StateMachine};
use ballot::fabric::Fabric;
use ballot::protocol::{Config, Core};
use ballot::tickets::TicketMap;
use ballot::Index;
use crossbeam::channel::{self, Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The replicated application: does nothing, answers nothing.
struct Null;
impl StateMachine for Null {
    fn apply(&mut self, _: Index, _: &[u8]) -> Vec<u8> {
        Vec::new()
    }
}

pub(crate) struct Req {
    tag: u64,
    cmd: Vec<u8>,
}
pub(crate) struct Resp {
    tag: u64,
    ok: bool,
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

/// What one replica thread publishes about itself (catch-up mode), and how it is told to
/// stop on its own or to take a checkpoint.
#[derive(Default)]
pub(crate) struct NodeCtl {
    pub(crate) stop: AtomicBool,
    pub(crate) want_checkpoint: AtomicBool,
    pub(crate) applied: AtomicU64,
    pub(crate) commit: AtomicU64,
    pub(crate) steps: AtomicU64,
    pub(crate) leader: AtomicBool,
    pub(crate) base: AtomicU64,
    pub(crate) latest_checkpoint: AtomicU64,
    pub(crate) checkpoints_taken: AtomicU64,
    pub(crate) checkpoints_installed: AtomicU64,
    pub(crate) checkpoint_failures: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) pulling: AtomicBool,
    pub(crate) recovering: AtomicBool,
    /// The replica is built and stepping (a restarted one after its fabric is up).
    pub(crate) running: AtomicBool,
}

impl NodeCtl {
    fn publish<F: Fabric, S: StateMachine>(&self, rep: &mut Replica<F, S>) {
        if self.want_checkpoint.swap(false, Ordering::Relaxed) {
            rep.request_checkpoint();
        }
        let core = rep.core();
        let st = rep.stats();
        let r = Ordering::Relaxed;
        self.applied.store(core.applied(), r);
        self.commit.store(core.commit(), r);
        self.steps.store(st.steps, r);
        self.leader.store(core.is_leader(), r);
        self.base.store(core.log().base(), r);
        self.pulling.store(core.is_pulling(), r);
        self.recovering.store(core.is_recovering(), r);
        self.latest_checkpoint.store(rep.latest_checkpoint(), r);
        self.checkpoints_taken.store(st.checkpoints_taken, r);
        self.checkpoints_installed
            .store(st.checkpoints_installed, r);
        self.checkpoint_failures.store(st.checkpoint_failures, r);
        self.bytes_served.store(st.checkpoint_bytes_served, r);
        self.running.store(true, r);
    }

    /// One line for diagnostics.
    pub(crate) fn describe(&self) -> String {
        let r = Ordering::Relaxed;
        format!(
            "running={} leader={} recovering={} pulling={} steps={} commit={} applied={} \
             log base={} newest checkpoint={} taken={} installed={} failures={} bytes served={}",
            self.running.load(r),
            self.leader.load(r),
            self.recovering.load(r),
            self.pulling.load(r),
            self.steps.load(r),
            self.commit.load(r),
            self.applied.load(r),
            self.base.load(r),
            self.latest_checkpoint.load(r),
            self.checkpoints_taken.load(r),
            self.checkpoints_installed.load(r),
            self.checkpoint_failures.load(r),
            self.bytes_served.load(r),
        )
    }
}

fn failure_slot(e: &ballot::protocol::ProposeError) -> usize {
    use ballot::protocol::ProposeError as E;
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

fn run_with<F: Fabric + 'static>(
    fabrics: Vec<F>,
    cfgs: Vec<Config>,
    o: &LoadOpts,
) -> Result<BenchResult, String> {
    let shared = Arc::new(Shared::new());
    let start = Instant::now();
    let (resp_tx, resp_rx) = channel::unbounded::<Vec<Resp>>();
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    // Durable: the replicas' files, removed when the run ends (after the threads: `dir` is
    // dropped at the end of this function, once they are joined).
    let dir = o.durable().then(|| o.scratch_dir("durable")).transpose()?;
    for (i, (fabric, cfg)) in fabrics.into_iter().zip(cfgs).enumerate() {
        let core = Core::new(cfg, false).map_err(|e| format!("config: {e}"))?;
        let storage = match &dir {
            Some(d) => Some(durable_storage(&d.path().join(i.to_string()))?),
            None => None,
        };
        let rep = Replica::new(core, fabric, Null, storage);
        let (tx, rx) = channel::unbounded::<Vec<Req>>();
        senders.push(tx);
        let (sh, rtx) = (shared.clone(), resp_tx.clone());
        let pin = (!o.cores.is_empty()).then(|| o.cores[i % o.cores.len()]);
        threads.push(
            std::thread::Builder::new()
                .name(format!("replica-{i}"))
                .spawn(move || replica_loop(rep, rx, rtx, sh, start, pin, None))
                .map_err(|e| e.to_string())?,
        );
    }
    drop(resp_tx);
    let result = load(o, &shared, &senders, &resp_rx);
    shared.stop.store(true, Ordering::SeqCst);
    shared.report_failures();
    for t in threads {
        let _ = t.join();
    }
    drop(dir);
    result
}

/// One replica's thread: proposals from the channel, `step`, completions back. With
/// `ctl`, it also publishes its status there every turn and stops when told to.
pub(crate) fn replica_loop<F: Fabric, S: StateMachine>(
    mut rep: Replica<F, S>,
    rx: Receiver<Vec<Req>>,
    resp: Sender<Vec<Resp>>,
    shared: Arc<Shared>,
    start: Instant,
    pin: Option<core_affinity::CoreId>,
    ctl: Option<Arc<NodeCtl>>,
) {
    if let Some(c) = pin {
        core_affinity::set_for_current(c);
    }
    fabrics::tighten_timer_slack();
    let id = rep.core().id() as usize;
    let mut tickets: TicketMap<u64> = TicketMap::new();
    let mut out: Vec<Resp> = Vec::new();
    let mut idle = Idle::new();
    while !shared.stop.load(Ordering::Relaxed)
        && !ctl.as_ref().is_some_and(|c| c.stop.load(Ordering::Relaxed))
    {
        let mut busy = false;
        while let Ok(batch) = rx.try_recv() {
            busy = true;
            for r in batch {
                match rep.propose(r.cmd) {
                    Ok(t) => {
                        tickets.insert(t, r.tag);
                    }
                    Err(e) => out.push(Resp {
                        tag: r.tag,
                        ok: {
                            shared.failures[failure_slot(&e)].fetch_add(1, Ordering::Relaxed);
                            false
                        },
                    }),
                }
            }
        }
        busy |= rep.step(start.elapsed().as_millis() as u64);
        for (t, outcome) in rep.take_completed() {
            if let Some(tag) = tickets.remove(t) {
                if let Err(e) = &outcome {
                    shared.failures[failure_slot(e)].fetch_add(1, Ordering::Relaxed);
                }
                out.push(Resp {
                    tag,
                    ok: outcome.is_ok(),
                });
            }
        }
        if !out.is_empty() {
            busy = true;
            let _ = resp.send(std::mem::take(&mut out));
        }
        if rep.core().is_leader() {
            if shared.leader.swap(id, Ordering::Relaxed) != id {
                shared.elections.fetch_add(1, Ordering::Relaxed);
            }
            shared.commit.store(rep.core().commit(), Ordering::Relaxed);
        } else if shared.leader.load(Ordering::Relaxed) == id {
            let _ =
                shared
                    .leader
                    .compare_exchange(id, NO_LEADER, Ordering::Relaxed, Ordering::Relaxed);
        }
        if let Some(c) = &ctl {
            c.publish(&mut rep);
        }
        idle.tick(busy);
    }
    rep.shutdown();
}

/// Waits until some replica leads.
pub(crate) fn wait_for_leader(shared: &Shared, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while shared.leader.load(Ordering::Relaxed) == NO_LEADER {
        if Instant::now() > deadline {
            return Err(format!("no leader elected within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The load generator thread: closed-loop clients for `warmup + duration`.
fn load(
    o: &LoadOpts,
    shared: &Shared,
    senders: &[Sender<Vec<Req>>],
    resp_rx: &Receiver<Vec<Resp>>,
) -> Result<BenchResult, String> {
    fabrics::tighten_timer_slack();
    wait_for_leader(shared, Duration::from_secs(15))?;
    let mut g = LoadGen::new(o, Commands::Fixed(vec![0xA5u8; o.payload]), shared);
    let warm_end = g.started() + o.measure.warmup;
    let end = warm_end + o.measure.duration;
    let mut measuring = o.measure.warmup.is_zero();
    let mut idle = Idle::new();
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
        let busy = g.turn(shared, senders, resp_rx);
        idle.tick(busy);
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
        replicas: senders.len(),
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
    fn next(&mut self) -> Vec<u8> {
        match self {
            Commands::Fixed(c) => c.clone(),
            Commands::Keyed {
                payload,
                keys,
                next,
            } => {
                let mut c = vec![0xA5u8; (*payload).max(8)];
                c[..8].copy_from_slice(&(*next % (*keys).max(1)).to_le_bytes());
                *next += 1;
                c
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
    out: Vec<Req>,
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
        let t0 = Instant::now();
        let closed = o.open_loop.is_none();
        let mut sent_at = Vec::new();
        let mut out = Vec::new();
        if closed {
            let n = o.clients * o.outstanding;
            sent_at = vec![t0; n];
            out.extend((0..n as u64).map(|tag| Req {
                tag,
                cmd: cmds.next(),
            }));
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
    /// the leader. Returns whether anything happened (for the idle strategy).
    pub(crate) fn turn(
        &mut self,
        shared: &Shared,
        senders: &[Sender<Vec<Req>>],
        resp_rx: &Receiver<Vec<Resp>>,
    ) -> bool {
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
                self.out.push(Req {
                    tag,
                    cmd: self.cmds.next(),
                });
                self.next_arrival += gap;
            }
        }
        let mut busy = false;
        while let Ok(batch) = resp_rx.try_recv() {
            busy = true;
            let t = Instant::now();
            for r in batch {
                let slot = &mut self.sent_at[r.tag as usize];
                if r.ok {
                    let ns = t.duration_since(*slot).as_nanos() as u64;
                    let _ = self.interval.record(ns.max(1));
                    let _ = self.total.record(ns.max(1));
                    self.interval_commits += 1;
                    self.commits += 1;
                } else {
                    self.errors += 1;
                }
                if self.closed && !r.ok {
                    *slot = t + RETRY_AFTER;
                    self.retry.push((t + RETRY_AFTER, r.tag));
                } else if self.closed {
                    *slot = t;
                    self.out.push(Req {
                        tag: r.tag,
                        cmd: self.cmds.next(),
                    });
                } else {
                    self.free.push(r.tag);
                }
            }
        }
        if !self.retry.is_empty() {
            let now = Instant::now();
            let (out, cmds) = (&mut self.out, &mut self.cmds);
            self.retry.retain(|&(at, tag)| {
                if at <= now {
                    out.push(Req {
                        tag,
                        cmd: cmds.next(),
                    });
                    false
                } else {
                    true
                }
            });
        }
        if !self.out.is_empty() {
            let l = shared.leader.load(Ordering::Relaxed);
            let l = if l == NO_LEADER { 0 } else { l };
            let _ = senders[l].send(std::mem::take(&mut self.out));
            busy = true;
        }
        busy
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
