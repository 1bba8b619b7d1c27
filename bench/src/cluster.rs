//! A replicated cluster in this process (topology `threads`): one thread per replica runs
//! `Replica::step` in a loop; one load-generator thread plays the clients and hands their
//! commands to the leader's thread through crossbeam channels (a `Replica` is not `Sync`,
//! so proposals are made on its own thread).

use crate::fabrics::{self, FabricKind, Idle};
use crate::stats::{self, BenchResult};
use ballot::driver::{Replica, StateMachine};
use ballot::fabric::Fabric;
use ballot::protocol::{Config, Core};
use ballot::Index;
use crossbeam::channel::{self, Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub replicas: usize,
    pub payload: usize,
    pub clients: usize,
    /// Commands each closed-loop client keeps outstanding.
    pub outstanding: usize,
    /// Core window (entries in flight); `None`: the core's default.
    pub pipeline: Option<u64>,
    /// Payload bytes per entry; `None`: the core's default.
    pub batch_bytes: Option<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Replica `i` is pinned to `cores[i % len]`; empty: unpinned.
    pub cores: Vec<core_affinity::CoreId>,
    /// Open loop at this many commands per second; `None`: closed loop.
    pub open_loop: Option<f64>,
    pub progress: bool,
    /// Durable mode: each replica persists to its own directory under the system temp dir
    /// (group commit + fdatasync by the persister thread) before an entry counts.
    pub durable: bool,
}

/// The replicated application: does nothing, answers nothing.
struct Null;
impl StateMachine for Null {
    fn apply(&mut self, _: Index, _: &[u8]) -> Vec<u8> {
        Vec::new()
    }
}

struct Req {
    tag: u64,
    cmd: Vec<u8>,
}
struct Resp {
    tag: u64,
    ok: bool,
}

const NO_LEADER: usize = usize::MAX;

struct Shared {
    stop: AtomicBool,
    leader: AtomicUsize,
    /// The leader's commit index (for commands per entry).
    commit: AtomicU64,
    /// Failed commands by cause: not leader, busy, indeterminate, other.
    failures: [AtomicU64; 4],
    /// Times a replica became leader (the first election included).
    elections: AtomicU64,
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

pub fn run(kind: FabricKind, o: &ClusterOpts) -> Result<BenchResult, String> {
    if o.replicas == 0 || o.replicas > ballot::MAX_NODES {
        return Err(format!("--replicas must be 1..={}", ballot::MAX_NODES));
    }
    if o.clients == 0 || o.outstanding == 0 {
        return Err("--clients and --outstanding must be positive".into());
    }
    let per_cmd = o.payload + ballot::protocol::batch::COMMAND_OVERHEAD;
    // 0 means one command per entry (no batching).
    let batch = match o.batch_bytes {
        Some(0) => per_cmd,
        Some(b) => b.max(per_cmd),
        None => (64usize << 10).max(per_cmd),
    };
    let ring = fabrics::geometry(batch);
    let regions = fabrics::regions(o.replicas, ring);
    let mut cfgs = Vec::new();
    for i in 0..o.replicas {
        let mut c = Config::new(i as u8, (0..o.replicas as u8).collect(), ring);
        c.batch_bytes = batch;
        if o.durable {
            c.durability = ballot::protocol::Durability::Durable;
        }
        if let Some(w) = o.pipeline {
            c.window = w;
        }
        c.max_queue = c.max_queue.max(o.clients * o.outstanding * 2);
        cfgs.push(c);
    }
    let window = cfgs[0].window;
    let mut r = match kind {
        FabricKind::Mem => run_with(fabrics::mem(regions), cfgs, o)?,
        FabricKind::Tcp => run_with(fabrics::tcp(regions)?, cfgs, o)?,
        FabricKind::Rdma => run_with(fabrics::rdma(regions)?, cfgs, o)?,
    };
    r.fabric = kind.name().into();
    r.batch_bytes = batch;
    r.pipeline = window;
    Ok(r)
}

fn run_with<F: Fabric + 'static>(
    fabrics: Vec<F>,
    cfgs: Vec<Config>,
    o: &ClusterOpts,
) -> Result<BenchResult, String> {
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        leader: AtomicUsize::new(NO_LEADER),
        commit: AtomicU64::new(0),
        failures: Default::default(),
        elections: AtomicU64::new(0),
    });
    let start = Instant::now();
    let (resp_tx, resp_rx) = channel::unbounded::<Vec<Resp>>();
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for (i, (fabric, cfg)) in fabrics.into_iter().zip(cfgs).enumerate() {
        let core = Core::new(cfg, false).map_err(|e| format!("config: {e}"))?;
        let storage = if o.durable {
            Some(durable_storage(i)?)
        } else {
            None
        };
        let rep = Replica::new(core, fabric, Null, storage);
        let (tx, rx) = channel::unbounded::<Vec<Req>>();
        senders.push(tx);
        let (sh, rtx) = (shared.clone(), resp_tx.clone());
        let pin = (!o.cores.is_empty()).then(|| o.cores[i % o.cores.len()]);
        threads.push(
            std::thread::Builder::new()
                .name(format!("replica-{i}"))
                .spawn(move || replica_loop(rep, rx, rtx, sh, start, pin))
                .map_err(|e| e.to_string())?,
        );
    }
    drop(resp_tx);
    let result = load(o, &shared, &senders, &resp_rx);
    shared.stop.store(true, Ordering::SeqCst);
    let f: Vec<u64> = shared
        .failures
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let elections = shared.elections.load(Ordering::Relaxed);
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
    for t in threads {
        let _ = t.join();
    }
    result
}

fn replica_loop<F: Fabric>(
    mut rep: Replica<F, Null>,
    rx: Receiver<Vec<Req>>,
    resp: Sender<Vec<Resp>>,
    shared: Arc<Shared>,
    start: Instant,
    pin: Option<core_affinity::CoreId>,
) {
    if let Some(c) = pin {
        core_affinity::set_for_current(c);
    }
    fabrics::tighten_timer_slack();
    let id = rep.core().id() as usize;
    let mut tickets: HashMap<u64, u64> = HashMap::with_capacity(1 << 16);
    let mut out: Vec<Resp> = Vec::new();
    let mut idle = Idle::new();
    while !shared.stop.load(Ordering::Relaxed) {
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
            if let Some(tag) = tickets.remove(&t) {
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
        idle.tick(busy);
    }
    rep.shutdown();
}

/// The load generator: closed-loop clients (each keeps `outstanding` commands in flight) or
/// an open-loop arrival process. Latency is measured from the send time, or, in open loop,
/// from the *intended* send time, so that a stalled system cannot hide its tail
/// (coordinated omission).
fn load(
    o: &ClusterOpts,
    shared: &Shared,
    senders: &[Sender<Vec<Req>>],
    resp_rx: &Receiver<Vec<Resp>>,
) -> Result<BenchResult, String> {
    fabrics::tighten_timer_slack();
    let elect_deadline = Instant::now() + Duration::from_secs(15);
    while shared.leader.load(Ordering::Relaxed) == NO_LEADER {
        if Instant::now() > elect_deadline {
            return Err("no leader elected within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cmd = vec![0xA5u8; o.payload];
    let t0 = Instant::now();
    let warm_end = t0 + o.warmup;
    let end = warm_end + o.duration;
    let mut total = stats::histogram();
    let mut interval = stats::histogram();
    let (mut commits, mut errors, mut interval_commits) = (0u64, 0u64, 0u64);
    let mut measuring = o.warmup.is_zero();
    let mut commit_at_start = shared.commit.load(Ordering::Relaxed);
    let mut next_report = t0 + Duration::from_secs(1);
    let mut last_report = t0;
    let mut out: Vec<Req> = Vec::new();
    // Per tag: when the command was (meant to be) sent.
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut free: Vec<u64> = Vec::new();
    let closed = o.open_loop.is_none();
    if closed {
        let n = o.clients * o.outstanding;
        sent_at = vec![t0; n];
        out.extend((0..n as u64).map(|tag| Req {
            tag,
            cmd: cmd.clone(),
        }));
    }
    let gap = o
        .open_loop
        .map(|r| Duration::from_secs_f64(1.0 / r.max(1e-3)));
    let mut next_arrival = t0;
    let mut measured_from = t0;
    // Closed loop: a refused command (e.g. `NotLeader` while leadership moves) is sent
    // again after RETRY_AFTER, not at once, so that a leader change does not turn into a
    // flood of refusals.
    const RETRY_AFTER: Duration = Duration::from_millis(1);
    let mut retry: Vec<(Instant, u64)> = Vec::new();
    let mut idle = Idle::new();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if !measuring && now >= warm_end {
            measuring = true;
            measured_from = now;
            total.reset();
            commits = 0;
            errors = 0;
            commit_at_start = shared.commit.load(Ordering::Relaxed);
        }
        if o.progress && now >= next_report {
            let secs = now.duration_since(last_report).as_secs_f64();
            eprintln!(
                "  {:>5.1}s {:<8} {:>10.0} commits/s   p50 {:>8.1} us   p99 {:>8.1} us",
                now.duration_since(t0).as_secs_f64(),
                if measuring { "measure" } else { "warm-up" },
                interval_commits as f64 / secs,
                stats::us(&interval, 0.5),
                stats::us(&interval, 0.99),
            );
            interval.reset();
            interval_commits = 0;
            last_report = now;
            next_report += Duration::from_secs(1);
        }
        if let Some(gap) = gap {
            while next_arrival <= now {
                let tag = match free.pop() {
                    Some(t) => t,
                    None => {
                        sent_at.push(next_arrival);
                        (sent_at.len() - 1) as u64
                    }
                };
                sent_at[tag as usize] = next_arrival;
                out.push(Req {
                    tag,
                    cmd: cmd.clone(),
                });
                next_arrival += gap;
            }
        }
        let mut busy = false;
        while let Ok(batch) = resp_rx.try_recv() {
            busy = true;
            let t = Instant::now();
            for r in batch {
                let slot = &mut sent_at[r.tag as usize];
                if r.ok {
                    let ns = t.duration_since(*slot).as_nanos() as u64;
                    let _ = interval.record(ns.max(1));
                    interval_commits += 1;
                    if measuring {
                        let _ = total.record(ns.max(1));
                        commits += 1;
                    }
                } else if measuring {
                    errors += 1;
                }
                if closed && !r.ok {
                    *slot = t + RETRY_AFTER;
                    retry.push((t + RETRY_AFTER, r.tag));
                } else if closed {
                    *slot = t;
                    out.push(Req {
                        tag: r.tag,
                        cmd: cmd.clone(),
                    });
                } else {
                    free.push(r.tag);
                }
            }
        }
        if !retry.is_empty() {
            let now = Instant::now();
            retry.retain(|&(at, tag)| {
                if at <= now {
                    out.push(Req {
                        tag,
                        cmd: cmd.clone(),
                    });
                    false
                } else {
                    true
                }
            });
        }
        if !out.is_empty() {
            let l = shared.leader.load(Ordering::Relaxed);
            let l = if l == NO_LEADER { 0 } else { l };
            let _ = senders[l].send(std::mem::take(&mut out));
            busy = true;
        }
        idle.tick(busy);
    }
    let secs = Instant::now().duration_since(measured_from).as_secs_f64();
    let entries = shared
        .commit
        .load(Ordering::Relaxed)
        .saturating_sub(commit_at_start);
    let mut r = BenchResult {
        kind: "cluster",
        topology: "threads",
        replicas: senders.len(),
        payload: o.payload,
        clients: if closed { o.clients } else { 0 },
        outstanding: if closed { o.outstanding } else { 0 },
        open_loop_rate: o.open_loop,
        durability: if o.durable { "durable" } else { "volatile" },
        duration_s: secs,
        commits,
        errors,
        throughput_ops_s: commits as f64 / secs,
        commands_per_entry: (entries > 0).then(|| commits as f64 / entries as f64),
        ..Default::default()
    };
    r.fill_latency(&total);
    Ok(r)
}

/// A fresh data directory and persister for replica `i` of this run.
fn durable_storage(i: usize) -> Result<Box<dyn ballot::driver::Storage>, String> {
    use ballot::storage::persister::{Persister, PersisterOptions};
    let dir = std::env::temp_dir().join(format!("ballot-bench-{}-{i}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (p, _) = Persister::open(&dir, PersisterOptions::default())
        .map_err(|e| format!("durable storage in {}: {e}", dir.display()))?;
    Ok(Box::new(p))
}
