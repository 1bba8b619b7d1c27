//! `ballot-bench catchup`: what a replica catching up through a checkpoint costs the
//! leader's commit latency, and what the catch-up bandwidth cap
//! (`CheckpointPolicy::serve_bytes_per_tick`) buys. See `docs/benchmarks.md`.
//!
//! For each cap, a fresh 3-replica cluster (topology `threads`, TCP on loopback) whose state
//! machine is a [`Table`] of `--state-mib` MiB, checkpoints in a [`FileCheckpoints`]
//! directory per replica (volatile durability). The load generator of the `cluster` mode
//! keeps a fixed number of commands in flight at the leader; its commit latency is measured
//! per phase:
//!
//! - **A**: all three up, `--duration`.
//! - **down**: one follower stopped, at least `--duration`, and until the leader's log base
//!   has passed the stopped follower's applied index and the other live replica has a
//!   checkpoint. With checkpoints on request (`--ckpt-every-mib 0`, the default) the live
//!   replicas take theirs only now, the one chosen by `--serve-from` last (recovery pulls
//!   from the highest base); with periodic checkpoints every replica takes them all along.
//! - **rejoin**: the follower restarted as a fresh recovering replica (empty table, empty
//!   checkpoint directory, new region, same address) until it starts pulling a checkpoint.
//! - **B**: the transfer: from the first pull until the checkpoint is installed.
//! - **tail**: from the install until it has applied everything the leader had committed at
//!   the install and is within one window of the leader's commit.
//! - **C**: caught up, `--duration`.

use crate::cluster::{self, Commands, LoadGen, Shared, Window};
use crate::cpu;
use crate::fabrics;
use crate::load::LoadOpts;
use crate::stats;
use crate::table::Table;
use ballot::checkpoint::CheckpointPolicy;
use ballot::driver::Replica;
use ballot::layout::RegionInfo;
use ballot::protocol::{Config, Core};
use ballot::region::Region;
use ballot::runtime::{Handle, IdleStrategy, Role, Runtime};
use ballot::storage::FileCheckpoints;
use ballot::{Index, NodeId};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `serve_bytes_per_tick` standing for "no cap" (1 TiB per 1 ms tick).
pub const UNLIMITED_PER_TICK: u64 = 1 << 40;

#[derive(Debug, Clone)]
pub struct CatchupOpts {
    /// Replicas (3), payload, clients, outstanding, pipeline, batch, warm-up, `duration` (of
    /// phases A and C), cores, progress.
    pub load: LoadOpts,
    pub state_mib: u64,
    /// Catch-up caps in MiB/s; `None`: unlimited.
    pub rates: Vec<Option<u64>>,
    /// `CheckpointPolicy::every_bytes` in MiB; 0: only on request, in the down phase.
    pub every_mib: u64,
    pub chunk_kib: usize,
    pub keep: usize,
    /// Longest wait for each of down, rejoin, B and tail.
    pub timeout: Duration,
    /// With checkpoints on request: which live replica takes the newest (and so serves).
    pub serve_from: ServeFrom,
}

/// Which replica the restarted one should pull from (with checkpoints on request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeFrom {
    /// Whichever recovery picks (both take a checkpoint at once).
    Any,
    Leader,
    /// The other follower (the leader's only acknowledger while the third is down).
    Follower,
}

/// One phase's commit latency at the leader.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    #[serde(rename = "phase")]
    pub name: &'static str,
    #[serde(rename = "duration_s")]
    pub secs: f64,
    pub commits: u64,
    pub errors: u64,
    pub throughput_ops_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub commands_per_entry: Option<f64>,
    /// Leader changes seen during the phase, and the leader at its end.
    pub leader_changes: u64,
    pub leader: Option<usize>,
    /// Checkpoints saved by any replica during the phase.
    pub checkpoints_taken: u64,
    /// Checkpoint image bytes served by any replica during the phase.
    pub bytes_served: u64,
    /// CPU seconds used in the phase, by thread group (`r0`..`r2`: replica threads,
    /// `tcp0`..`tcp2`: each node's TCP fabric threads, `ckpt`: checkpoint saves, `bench`:
    /// the load generator and the rest).
    pub cpu_s: BTreeMap<String, f64>,
}

impl Phase {
    /// CPU use per group in cores (CPU seconds per second), e.g. `r0 0.62 r1 0.40 ...`.
    pub fn cpu_line(&self) -> String {
        self.cpu_s
            .iter()
            .map(|(g, s)| format!("{g} {:.2}", s / self.secs.max(1e-9)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CatchupResult {
    pub payload: usize,
    pub clients: usize,
    pub outstanding: usize,
    pub state_mib: u64,
    pub every_bytes: u64,
    pub keep: usize,
    pub chunk_bytes: usize,
    /// The cap (MiB/s); `None`: unlimited.
    pub rate_mib_s: Option<u64>,
    pub serve_bytes_per_tick: u64,
    pub leader: usize,
    pub stopped: usize,
    /// The stopped follower's applied index when it stopped.
    pub stop_applied: Index,
    /// The leader's log base when the follower restarted, and its committed entries after
    /// it (what a recovery answer carries).
    pub leader_base_at_restart: Index,
    pub leader_log_at_restart: u64,
    /// Leader changes after the first election (whole run).
    pub leader_changes: u64,
    /// The checkpoint the restarted replica installed (its newest), and its image size.
    pub installed_index: Index,
    pub image_bytes: u64,
    pub installs: u64,
    pub checkpoint_failures: u64,
    /// Image bytes served during rejoin + B + tail, and by whom (node, bytes).
    pub bytes_served: u64,
    #[serde(serialize_with = "served_by_json")]
    pub served_by: Vec<(usize, u64)>,
    /// Restart to first pull; first pull to last byte served; last byte served to installed;
    /// installed to caught up.
    pub rejoin_s: f64,
    pub transfer_s: f64,
    pub install_s: f64,
    pub tail_s: f64,
    /// Served bytes over `transfer_s`.
    pub transfer_mib_s: f64,
    pub phases: Vec<Phase>,
}

impl CatchupResult {
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Phase B over phase A: (p50 ratio, p99 ratio).
    pub fn ratios(&self) -> (Option<f64>, Option<f64>) {
        self.ratios_to("A")
    }

    /// Phase B over another phase: (p50 ratio, p99 ratio).
    pub fn ratios_to(&self, base: &str) -> (Option<f64>, Option<f64>) {
        match (self.phase(base), self.phase("B")) {
            (Some(a), Some(b)) if a.p50_us > 0.0 && a.p99_us > 0.0 && b.commits > 0 => {
                (Some(b.p50_us / a.p50_us), Some(b.p99_us / a.p99_us))
            }
            _ => (None, None),
        }
    }

    /// The JSON form (`--json`): the result's fields, the B/A and B/down ratios, and the
    /// labels every bench result has.
    pub fn json(&self) -> CatchupJson<'_> {
        let (r50, r99) = self.ratios();
        let (d50, d99) = self.ratios_to("down");
        CatchupJson {
            kind: "catchup",
            fabric: "tcp",
            topology: "threads",
            replicas: 3,
            durability: "volatile",
            result: self,
            p50_ratio_b_a: r50,
            p99_ratio_b_a: r99,
            p50_ratio_b_down: d50,
            p99_ratio_b_down: d99,
        }
    }
}

/// [`CatchupResult::json`].
#[derive(Serialize)]
pub struct CatchupJson<'a> {
    kind: &'static str,
    fabric: &'static str,
    topology: &'static str,
    replicas: usize,
    durability: &'static str,
    #[serde(flatten)]
    result: &'a CatchupResult,
    p50_ratio_b_a: Option<f64>,
    p99_ratio_b_a: Option<f64>,
    p50_ratio_b_down: Option<f64>,
    p99_ratio_b_down: Option<f64>,
}

fn served_by_json<S: serde::Serializer>(v: &[(usize, u64)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Served {
        node: usize,
        bytes: u64,
    }
    s.collect_seq(v.iter().map(|&(node, bytes)| Served { node, bytes }))
}

fn rate_name(r: Option<u64>) -> String {
    r.map_or("unlimited".into(), |r| format!("{r} MiB/s"))
}

/// Parses `32,128,unlimited` (MiB/s).
pub fn parse_rates(s: &str) -> Result<Vec<Option<u64>>, String> {
    let v: Vec<Option<u64>> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| match x {
            "unlimited" | "none" | "inf" => Ok(None),
            _ => x
                .parse::<u64>()
                .ok()
                .filter(|r| *r > 0)
                .map(Some)
                .ok_or_else(|| {
                    format!("bad --catchup-rate list {s:?} (MiB/s, e.g. 32,128,unlimited)")
                }),
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("empty --catchup-rate list".into());
    }
    Ok(v)
}

/// Human-readable report: per cap, the phases and the transfer; then one summary row each.
pub fn table(results: &[CatchupResult]) -> String {
    let mut s = String::new();
    for r in results {
        s.push_str(&format!(
            "catch-up cap {} ({} B/tick), state {} MiB, checkpoint every {}, keep {}, chunk {} KiB; \
             leader {}, stopped {}; at the restart the leader's log held {} entries after its base {}; \
             leader changes {}\n",
            rate_name(r.rate_mib_s),
            r.serve_bytes_per_tick,
            r.state_mib,
            if r.every_bytes == 0 {
                "on request (down phase)".to_string()
            } else {
                format!("{} MiB applied", r.every_bytes >> 20)
            },
            r.keep,
            r.chunk_bytes >> 10,
            r.leader,
            r.stopped,
            r.leader_log_at_restart,
            r.leader_base_at_restart,
            r.leader_changes
        ));
        s.push_str(&format!(
            "  {:<7} {:>7} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>7} {:>6} {:>10}\n",
            "phase",
            "secs",
            "commits/s",
            "p50 us",
            "p90 us",
            "p99 us",
            "p99.9 us",
            "max us",
            "errors",
            "leader",
            "ckpts",
            "served MiB"
        ));
        for p in &r.phases {
            s.push_str(&format!(
                "  {:<7} {:>7.2} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>7} {:>7} {:>6} {:>10.1}\n",
                p.name,
                p.secs,
                p.throughput_ops_s,
                p.p50_us,
                p.p90_us,
                p.p99_us,
                p.p999_us,
                p.max_us,
                p.errors,
                format!(
                    "{}{}",
                    p.leader.map_or("-".into(), |l| l.to_string()),
                    if p.leader_changes > 0 {
                        format!(" ({}x)", p.leader_changes)
                    } else {
                        String::new()
                    }
                ),
                p.checkpoints_taken,
                p.bytes_served as f64 / (1 << 20) as f64
            ));
        }
        s.push_str("  CPU (cores) per phase:\n");
        for p in &r.phases {
            s.push_str(&format!("  {:<7} {}\n", p.name, p.cpu_line()));
        }
        let (r50, r99) = r.ratios();
        let who: Vec<String> = r
            .served_by
            .iter()
            .map(|(n, b)| {
                format!(
                    "node {n}{} {:.1} MiB",
                    if *n == r.leader { " (leader)" } else { "" },
                    *b as f64 / (1 << 20) as f64
                )
            })
            .collect();
        s.push_str(&format!(
            "  transfer: image {:.1} MiB (index {}), served {:.1} MiB by {} in {:.2} s = {:.1} MiB/s; \
             install {:.2} s; rejoin {:.2} s, tail {:.2} s; installs {}, failures {}; \
             B/A p50 x{}, p99 x{}\n\n",
            r.image_bytes as f64 / (1 << 20) as f64,
            r.installed_index,
            r.bytes_served as f64 / (1 << 20) as f64,
            if who.is_empty() { "nobody".into() } else { who.join(", ") },
            r.transfer_s,
            r.transfer_mib_s,
            r.install_s,
            r.rejoin_s,
            r.tail_s,
            r.installs,
            r.checkpoint_failures,
            r50.map_or("-".into(), |x| format!("{x:.2}")),
            r99.map_or("-".into(), |x| format!("{x:.2}")),
        ));
    }
    s.push_str(&format!(
        "{:<10} {:>13} {:>13} {:>13} {:>13} {:>11} {:>11} {:>9} {:>9} {:>8} {:>8} {:>8}\n",
        "cap",
        "A p50/p99",
        "down p50/p99",
        "B p50/p99",
        "C p50/p99",
        "B/A p50,99",
        "B/dn p50,99",
        "transfer",
        "MiB/s",
        "served",
        "installs",
        "leaders"
    ));
    for r in results {
        let pp = |n: &str| {
            r.phase(n)
                .map_or("-".into(), |p| format!("{:.0}/{:.0}", p.p50_us, p.p99_us))
        };
        let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        let (r50, r99) = r.ratios();
        let (d50, d99) = r.ratios_to("down");
        let by: Vec<String> = r
            .served_by
            .iter()
            .map(|(n, _)| {
                if *n == r.leader {
                    "L".into()
                } else {
                    format!("F{n}")
                }
            })
            .collect();
        s.push_str(&format!(
            "{:<10} {:>13} {:>13} {:>13} {:>13} {:>11} {:>11} {:>8.2}s {:>9.1} {:>8} {:>8} {:>8}\n",
            rate_name(r.rate_mib_s),
            pp("A"),
            pp("down"),
            pp("B"),
            pp("C"),
            format!("{},{}", f(r50), f(r99)),
            format!("{},{}", f(d50), f(d99)),
            r.transfer_s,
            r.transfer_mib_s,
            by.join("+"),
            r.installs,
            r.leader_changes
        ));
    }
    s.push_str(
        "(us; served: L = the leader, Fn = follower n; leaders = leader changes in the run)\n",
    );
    s
}

/// Runs every cap in turn, each on a fresh cluster.
pub fn run(o: &CatchupOpts) -> Result<Vec<CatchupResult>, String> {
    if o.load.replicas != 3 {
        return Err("catchup runs 3 replicas (--replicas 3)".into());
    }
    if o.load.payload < 9 {
        return Err("catchup needs --payload of at least 9 bytes (an 8-byte key + value)".into());
    }
    if o.load.payload - 8 > crate::table::PAGE {
        return Err(format!(
            "catchup values are at most {} bytes (--payload {} at most)",
            crate::table::PAGE,
            crate::table::PAGE + 8
        ));
    }
    if o.state_mib == 0 || o.keep == 0 || o.chunk_kib == 0 {
        return Err("--state-mib, --keep and --chunk-kib must be positive".into());
    }
    if o.chunk_kib << 10 > ballot::protocol::MAX_CKPT_CHUNK {
        return Err(format!(
            "--chunk-kib at most {}",
            ballot::protocol::MAX_CKPT_CHUNK >> 10
        ));
    }
    let mut out = Vec::new();
    for &rate in &o.rates {
        eprintln!(
            "== catchup, cap {}: 3 replicas (threads) on tcp, {} MiB table, {}-byte commands, \
             {} clients x {} outstanding, {:?} warm-up, A and C {:?} each",
            rate_name(rate),
            o.state_mib,
            o.load.payload,
            o.load.clients,
            o.load.outstanding,
            o.load.measure.warmup,
            o.load.measure.duration
        );
        match run_one(o, rate) {
            Ok(r) => out.push(r),
            // Ctrl-C: the caps measured so far are printed.
            Err(e) if crate::interrupt::requested() => {
                eprintln!("{e}");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Temporary checkpoint directories (one per replica inside), removed at the end (also on
/// error).
struct Dirs(tempfile::TempDir);

/// One replica as the catch-up phases see it: its runtime's published status and metrics
/// (zeros while it is being built).
#[derive(Debug, Default, Clone, Copy)]
struct View {
    /// The runtime is up (it may have stopped since).
    running: bool,
    role: Option<Role>,
    commit: Index,
    applied: Index,
    base: Index,
    latest_checkpoint: Index,
    checkpoints_taken: u64,
    checkpoints_installed: u64,
    checkpoint_failures: u64,
    bytes_served: u64,
    pulling: bool,
    recovering: bool,
}

impl View {
    fn of(h: Option<&Handle>) -> View {
        let Some(h) = h else { return View::default() };
        let (s, m) = (h.status(), h.metrics());
        View {
            running: true,
            role: Some(s.role),
            commit: s.commit,
            applied: s.applied,
            base: s.log_base,
            latest_checkpoint: s.checkpoint,
            checkpoints_taken: m.checkpoints_taken.get(),
            checkpoints_installed: s.checkpoints_installed,
            checkpoint_failures: m.checkpoint_failures.get(),
            bytes_served: m.checkpoint_bytes_served.get(),
            pulling: m.pulling.get() != 0,
            recovering: s.role == Role::Recovering,
        }
    }

    /// One line for diagnostics.
    fn describe(&self) -> String {
        format!(
            "running={} role={} recovering={} pulling={} commit={} applied={} log base={} \
             newest checkpoint={} taken={} installed={} failures={} bytes served={}",
            self.running,
            self.role.map_or("-", Role::name),
            self.recovering,
            self.pulling,
            self.commit,
            self.applied,
            self.base,
            self.latest_checkpoint,
            self.checkpoints_taken,
            self.checkpoints_installed,
            self.checkpoint_failures,
            self.bytes_served,
        )
    }
}

type TableReplica = Replica<ballot_tcp::TcpFabric, Table>;

/// A running cluster and its load.
struct Run {
    shared: Shared,
    /// Per replica: its runtime's handle (kept after it stops; `None` while a restarted
    /// replica is being built).
    handles: Vec<Option<Handle>>,
    /// Per replica: its runtime (`None` once stopped, or while being built).
    runtimes: Vec<Option<Runtime<ballot_tcp::TcpFabric, Table>>>,
    /// A replica being built on its own thread (the load goes on meanwhile): started on
    /// its runtime by the first turn that finds the build done.
    building: Option<(usize, JoinHandle<Result<TableReplica, String>>)>,
    /// The handles of the runtimes that are up, for the load generator.
    live: Vec<Handle>,
    gen: LoadGen,
    start: Instant,
    /// At the start of the current phase: (checkpoints taken, bytes served) per replica,
    /// and the threads' CPU times.
    marks: Vec<(u64, u64)>,
    cpu_mark: cpu::Sample,
    elections_mark: u64,
    phases: Vec<Phase>,
    idle: Vec<IdleStrategy>,
    /// Why a replica could not be built or started.
    failed: Option<String>,
    /// `BALLOT_BENCH_DEBUG` set: every replica's status 5 times a second.
    debug: bool,
    next_debug: Instant,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for r in self.runtimes.iter_mut().filter_map(Option::take) {
            r.shutdown();
        }
        if let Some((_, t)) = self.building.take() {
            let _ = t.join();
        }
    }
}

impl Run {
    /// Replica `i`'s status now.
    fn view(&self, i: usize) -> View {
        View::of(self.handles[i].as_ref())
    }

    fn sums(&self) -> Vec<(u64, u64)> {
        (0..self.handles.len())
            .map(|i| {
                let v = self.view(i);
                (v.checkpoints_taken, v.bytes_served)
            })
            .collect()
    }

    fn begin(&mut self) {
        self.gen.begin(&self.shared);
        self.marks = self.sums();
        self.cpu_mark = cpu::sample();
        self.elections_mark = self.shared.elections.load(Ordering::Relaxed);
    }

    fn end(&mut self, name: &'static str) -> &Phase {
        let w: Window = self.gen.window(&self.shared);
        let cpu_s = cpu::delta(&self.cpu_mark, &cpu::sample());
        let now = self.sums();
        let (taken, served) = now.iter().zip(&self.marks).fold((0, 0), |(t, s), (n, m)| {
            (t + n.0.saturating_sub(m.0), s + n.1.saturating_sub(m.1))
        });
        let h = &w.hist;
        self.phases.push(Phase {
            name,
            secs: w.secs,
            commits: w.commits,
            errors: w.errors,
            throughput_ops_s: if w.secs > 0.0 {
                w.commits as f64 / w.secs
            } else {
                0.0
            },
            p50_us: stats::us(h, 0.5),
            p90_us: stats::us(h, 0.9),
            p99_us: stats::us(h, 0.99),
            p999_us: stats::us(h, 0.999),
            max_us: if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / 1000.0
            },
            commands_per_entry: w.commands_per_entry(),
            leader_changes: self
                .shared
                .elections
                .load(Ordering::Relaxed)
                .saturating_sub(self.elections_mark),
            leader: self.leader(),
            checkpoints_taken: taken,
            bytes_served: served,
            cpu_s,
        });
        self.phases.last().expect("just pushed")
    }

    fn leader(&self) -> Option<usize> {
        let l = self.shared.leader.load(Ordering::Relaxed);
        (l != cluster::NO_LEADER).then_some(l)
    }

    /// Drives the load until `done` says so, or `limit` passes (Ok), or `timeout` passes
    /// (Err, with every replica's status).
    fn until(
        &mut self,
        label: &'static str,
        timeout: Option<Duration>,
        limit: Option<Instant>,
        mut done: impl FnMut(&Run) -> bool,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let now = Instant::now();
            if limit.is_some_and(|l| now >= l) || done(self) {
                return Ok(());
            }
            if crate::interrupt::requested() {
                return Err(format!("{label}: interrupted"));
            }
            if let Some(t) = timeout.filter(|t| now.duration_since(t0) > *t) {
                return Err(format!(
                    "{label}: not done after {t:?}; leader {:?}; {}",
                    self.leader(),
                    self.status()
                ));
            }
            if self.debug && now >= self.next_debug {
                self.next_debug = now + Duration::from_millis(200);
                eprintln!(
                    "    [{:.1}s {label}] {}",
                    now.duration_since(self.start).as_secs_f64(),
                    self.status()
                );
            }
            self.gen.progress(now, label);
            self.start_built()?;
            let busy = self.gen.turn(&self.shared, &self.live);
            self.gen.idle(busy);
        }
    }

    fn status(&self) -> String {
        (0..self.handles.len())
            .map(|i| format!("replica {i}: {}", self.view(i).describe()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Builds replica `i` on its own thread with `build`, and starts it on its runtime once
    /// built (in [`Run::until`]'s turns; a failed build is left in `self.failed`).
    fn spawn(
        &mut self,
        i: usize,
        build: impl FnOnce() -> Result<TableReplica, String> + Send + 'static,
    ) -> Result<(), String> {
        let t = std::thread::Builder::new()
            .name(format!("build-{i}"))
            .spawn(build)
            .map_err(|e| e.to_string())?;
        if i >= self.handles.len() {
            self.handles.resize(i + 1, None);
            self.runtimes.resize_with(i + 1, || None);
        }
        self.handles[i] = None;
        self.building = Some((i, t));
        self.start_built()
    }

    /// Starts the replica being built if its build is done.
    fn start_built(&mut self) -> Result<(), String> {
        if !self.building.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            return Ok(());
        }
        let (i, t) = self.building.take().expect("checked");
        let built = t
            .join()
            .unwrap_or_else(|_| Err(format!("building replica {i} panicked")));
        self.install(i, built);
        Ok(())
    }

    /// Starts replica `i`, once `built`, on its runtime (a failed build is left in
    /// `self.failed`).
    fn install(&mut self, i: usize, built: Result<TableReplica, String>) {
        if i >= self.handles.len() {
            self.handles.resize(i + 1, None);
            self.runtimes.resize_with(i + 1, || None);
        }
        match built.and_then(|rep| cluster::start_runtime(rep, i, self.idle[i])) {
            Ok(rt) => {
                self.handles[i] = Some(rt.handle());
                self.runtimes[i] = Some(rt);
            }
            Err(e) => self.failed = Some(e),
        }
        self.live = self.handles.iter().flatten().cloned().collect();
    }

    /// Stops replica `i` (its runtime; its handle still shows its last status).
    fn stop(&mut self, i: usize) {
        if let Some(r) = self.runtimes[i].take() {
            r.shutdown();
        }
    }

    /// Checkpoint bytes served so far by every replica but `f`.
    fn served_by_others(&self, f: usize) -> u64 {
        (0..self.handles.len())
            .filter(|i| *i != f)
            .map(|i| self.view(i).bytes_served)
            .sum()
    }

    fn failure(&self) -> Option<String> {
        self.failed.clone()
    }
}

fn replica(
    cfg: Config,
    recovering: bool,
    fabric: ballot_tcp::TcpFabric,
    state_bytes: u64,
    value: usize,
    dir: &std::path::Path,
    policy: CheckpointPolicy,
) -> Result<TableReplica, String> {
    let core = Core::new(cfg, recovering).map_err(|e| format!("config: {e}"))?;
    let store = FileCheckpoints::open(dir)
        .map_err(|e| format!("checkpoint directory {}: {e}", dir.display()))?;
    Ok(
        Replica::new(core, fabric, Table::new(state_bytes, value), None)
            .with_checkpoints(Box::new(store), policy),
    )
}

/// What one run (one cap) is set up with.
struct Plan {
    state_bytes: u64,
    /// Value bytes of each command (the payload less its 8-byte key).
    value: usize,
    /// Keys of the table (the load writes them in turn).
    keys: u64,
    /// `serve_bytes_per_tick` of this run's cap.
    per_tick: u64,
    policy: CheckpointPolicy,
    cfgs: Vec<Config>,
}

impl Plan {
    fn new(o: &CatchupOpts, rate: Option<u64>) -> Plan {
        let state_bytes = o.state_mib << 20;
        let value = o.load.payload - 8;
        let per_tick = rate.map_or(UNLIMITED_PER_TICK, |r| (r << 20) / 1000);
        Plan {
            state_bytes,
            value,
            keys: Table::new(state_bytes, value).slots(),
            per_tick,
            policy: CheckpointPolicy {
                every_bytes: o.every_mib << 20,
                keep: o.keep,
                chunk_bytes: o.chunk_kib << 10,
                serve_bytes_per_tick: per_tick,
            },
            cfgs: cluster::configs(&o.load).1,
        }
    }

    fn load(&self, o: &CatchupOpts, shared: &Shared) -> LoadGen {
        LoadGen::new(
            &o.load,
            Commands::Keyed {
                payload: o.load.payload,
                keys: self.keys,
                next: 0,
            },
            shared,
        )
    }
}

/// Phase "down" stopped replica `f`, a follower of `leader`.
struct Stopped {
    leader: usize,
    f: usize,
    /// What `f` had applied when it stopped.
    stop_applied: Index,
    leader_base_at_restart: Index,
    leader_log_at_restart: u64,
}

/// Phase "rejoin" restarted the follower, which then started pulling a checkpoint.
struct Rejoined {
    /// Bytes each replica had served before the restart.
    served_before: Vec<u64>,
    /// Their sum over the live replicas.
    served0: u64,
    restarted: Instant,
    pull_at: Instant,
}

/// Phase B installed a checkpoint on the follower.
struct Transferred {
    /// Bytes served by the live replicas, and when that last changed.
    last_served: (u64, Instant),
    installed_at: Instant,
    installed_index: Index,
    image_bytes: u64,
}

/// One cap: a fresh cluster through warm-up, A, down, rejoin, B, tail and C.
fn run_one(o: &CatchupOpts, rate: Option<u64>) -> Result<CatchupResult, String> {
    let plan = Plan::new(o, rate);
    let dirs = Dirs(o.load.scratch_dir(&format!(
        "catchup-{}",
        rate.map_or("unlimited".to_string(), |r| r.to_string())
    ))?);
    // Declared after `dirs`: on an early return the cluster stops before its directories go.
    let (mut run, peers) = start(o, &plan, &dirs)?;

    // A: all three up.
    run.begin();
    run.until(
        "A",
        None,
        Some(Instant::now() + o.load.measure.duration),
        |_| false,
    )?;
    run.end("A");

    let stopped = stop_follower(&mut run, o)?;
    let rejoined = restart_follower(&mut run, o, &plan, &dirs, peers, stopped.f)?;
    let transferred = transfer(&mut run, o, &dirs, stopped.f, &rejoined)?;
    let caught_up = tail(&mut run, o, plan.cfgs[stopped.f].window, stopped.f)?;

    // C: caught up.
    run.begin();
    run.until(
        "C",
        None,
        Some(Instant::now() + o.load.measure.duration),
        |_| false,
    )?;
    run.end("C");

    let r = result(
        &mut run,
        o,
        rate,
        &plan,
        &stopped,
        &rejoined,
        &transferred,
        caught_up,
    );
    run.shared.stop.store(true, Ordering::SeqCst);
    run.shared.report_failures();
    drop(run);
    drop(dirs);
    Ok(r)
}

/// Starts the three replicas on tcp, waits for a leader and warms up. Returns the running
/// cluster and the replicas' fabric addresses (for the restart).
fn start(
    o: &CatchupOpts,
    plan: &Plan,
    dirs: &Dirs,
) -> Result<(Run, BTreeMap<NodeId, SocketAddr>), String> {
    let regions = fabrics::regions(3, plan.cfgs[0].ring);
    let fabs = fabrics::tcp(regions)?;
    let peers: BTreeMap<NodeId, SocketAddr> = fabs
        .iter()
        .enumerate()
        .map(|(i, f)| (i as NodeId, f.local_addr()))
        .collect();
    let shared = Shared::new();
    let mut run = Run {
        gen: plan.load(o, &shared),
        shared,
        handles: Vec::new(),
        runtimes: Vec::new(),
        building: None,
        live: Vec::new(),
        start: Instant::now(),
        marks: Vec::new(),
        cpu_mark: cpu::Sample::default(),
        elections_mark: 0,
        phases: Vec::new(),
        idle: (0..3).map(|i| cluster::idle_strategy(&o.load, i)).collect(),
        failed: None,
        debug: std::env::var_os("BALLOT_BENCH_DEBUG").is_some(),
        next_debug: Instant::now(),
    };
    for (i, (fabric, cfg)) in fabs.into_iter().zip(plan.cfgs.iter().cloned()).enumerate() {
        let dir = dirs.0.path().join(i.to_string());
        let (state_bytes, value, policy) = (plan.state_bytes, plan.value, plan.policy);
        let rep = replica(cfg, false, fabric, state_bytes, value, &dir, policy)?;
        run.install(i, Ok(rep));
    }
    if let Some(e) = run.failure() {
        return Err(e);
    }
    fabrics::tighten_timer_slack();
    cluster::wait_for_leader(&run.shared, &run.live, Duration::from_secs(15))?;
    // The load generator's clock starts now (commands queued before a leader would fail).
    run.gen = plan.load(o, &run.shared);
    let warm_end = run.gen.started() + o.load.measure.warmup;
    run.until("warm-up", None, Some(warm_end), |_| false)?;
    Ok((run, peers))
}

/// down: stops a follower; loads until the leader's log base has passed it (and the other
/// live replica has a checkpoint too: a recovery answer from a replica without one would
/// carry its whole log).
fn stop_follower(run: &mut Run, o: &CatchupOpts) -> Result<Stopped, String> {
    let leader = run.leader().ok_or("no leader at the end of phase A")?;
    let f = (leader + 1) % 3;
    let other = 3 - leader - f;
    run.begin();
    run.stop(f);
    // On request: the replica meant to serve takes its checkpoint last, so that its log base
    // is the highest (the recovering replica pulls from the answer with the highest base).
    let order: Vec<usize> = match (o.every_mib, o.serve_from) {
        (0, ServeFrom::Leader) => vec![other, leader],
        (0, ServeFrom::Follower) => vec![leader, other],
        _ => Vec::new(),
    };
    let down_until = Instant::now() + o.load.measure.duration;
    let mut stop_applied: Option<Index> = None;
    // Per replica: its checkpoints taken when it was last asked for one.
    let mut asked: [Option<u64>; 3] = [None; 3];
    run.until("down", Some(o.timeout), None, |r| {
        // At least as long as A (a baseline with two replicas up); checkpoints on request
        // are asked for only then, to keep the log after them short.
        if Instant::now() < down_until {
            return false;
        }
        let stopped = *stop_applied.get_or_insert_with(|| r.view(f).applied);
        let base = |i: usize| r.view(i).base;
        if o.every_mib > 0 {
            return base(leader) > stopped && base(other) > 0;
        }
        // Asks replica i for a checkpoint, unless it was asked and has not taken one since.
        let mut ask = |i: usize| {
            let taken = r.view(i).checkpoints_taken;
            if asked[i].is_none_or(|t| taken > t) {
                asked[i] = Some(taken);
                if let Some(h) = &r.handles[i] {
                    h.checkpoint();
                }
            }
        };
        match order[..] {
            [first, second] => {
                if base(first) <= stopped {
                    ask(first);
                    false
                } else if base(second) <= base(first) {
                    ask(second);
                    false
                } else {
                    true
                }
            }
            _ => {
                let mut done = true;
                for i in [leader, other] {
                    if base(i) <= stopped {
                        ask(i);
                        done = false;
                    }
                }
                done
            }
        }
    })?;
    run.end("down");
    let leader_base_at_restart = run.view(leader).base;
    Ok(Stopped {
        leader,
        f,
        stop_applied: stop_applied.unwrap_or(0),
        leader_base_at_restart,
        leader_log_at_restart: run
            .view(leader)
            .commit
            .saturating_sub(leader_base_at_restart),
    })
}

/// rejoin: the follower comes back empty, as a recovering replica (built on its own thread:
/// the load goes on meanwhile), until it starts pulling a checkpoint.
fn restart_follower(
    run: &mut Run,
    o: &CatchupOpts,
    plan: &Plan,
    dirs: &Dirs,
    peers: BTreeMap<NodeId, SocketAddr>,
    f: usize,
) -> Result<Rejoined, String> {
    run.begin();
    let served_before: Vec<u64> = (0..run.handles.len())
        .map(|i| run.view(i).bytes_served)
        .collect();
    let (cfg, ring, dir) = (
        plan.cfgs[f].clone(),
        plan.cfgs[f].ring,
        dirs.0.path().join(format!("{f}-restarted")),
    );
    let (state_bytes, value, policy) = (plan.state_bytes, plan.value, plan.policy);
    run.spawn(f, move || {
        let info = RegionInfo {
            cluster: fabrics::CLUSTER,
            node: f as NodeId,
            ring,
        };
        let region =
            Arc::new(Region::anonymous(info).map_err(|e| format!("region of node {f}: {e}"))?);
        let fabric = fabrics::tcp_restart(f as NodeId, peers, region)?;
        replica(cfg, true, fabric, state_bytes, value, &dir, policy)
    })?;
    let restarted = Instant::now();
    let served0: u64 = served_before
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != f)
        .map(|(_, b)| b)
        .sum();
    run.until("rejoin", Some(o.timeout), None, |r| {
        let c = r.view(f);
        r.failure().is_some()
            || c.pulling
            || c.checkpoints_installed > 0
            || r.served_by_others(f) > served0
    })?;
    if let Some(e) = run.failure() {
        return Err(format!("restarting replica {f}: {e}"));
    }
    run.end("rejoin");
    Ok(Rejoined {
        served_before,
        served0,
        restarted,
        pull_at: Instant::now(),
    })
}

/// B: the transfer, until the checkpoint is installed on `f`.
fn transfer(
    run: &mut Run,
    o: &CatchupOpts,
    dirs: &Dirs,
    f: usize,
    rejoined: &Rejoined,
) -> Result<Transferred, String> {
    run.begin();
    let mut last_served = (run.served_by_others(f), rejoined.pull_at);
    run.until("B", Some(o.timeout), None, |r| {
        let s = r.served_by_others(f);
        if s != last_served.0 {
            last_served = (s, Instant::now());
        }
        r.view(f).checkpoints_installed > 0
    })?;
    let installed_at = Instant::now();
    run.end("B");
    let installed_index = run.view(f).latest_checkpoint;
    // The image as the store keeps it (`FileCheckpoints` names files `snap-<index:020>.ckpt`).
    let image_bytes = std::fs::metadata(
        dirs.0
            .path()
            .join(format!("{f}-restarted"))
            .join(format!("snap-{installed_index:020}.ckpt")),
    )
    .map_or(0, |m| m.len());
    Ok(Transferred {
        last_served,
        installed_at,
        installed_index,
        image_bytes,
    })
}

/// tail: until `f` has applied what the leader had committed at the install, and is within
/// one window of the leader's commit. Returns when it was.
fn tail(run: &mut Run, o: &CatchupOpts, window: u64, f: usize) -> Result<Instant, String> {
    run.begin();
    let target = run.shared.commit.load(Ordering::Relaxed);
    run.until("tail", Some(o.timeout), None, |r| {
        let c = r.view(f);
        let applied = c.applied;
        c.running
            && !c.recovering
            && !c.pulling
            && applied >= target
            && applied + window >= r.shared.commit.load(Ordering::Relaxed)
    })?;
    let caught_up = Instant::now();
    run.end("tail");
    Ok(caught_up)
}

/// The run's figures, once every phase is done (takes the phases out of `run`).
#[allow(clippy::too_many_arguments)]
fn result(
    run: &mut Run,
    o: &CatchupOpts,
    rate: Option<u64>,
    plan: &Plan,
    stopped: &Stopped,
    rejoined: &Rejoined,
    transferred: &Transferred,
    caught_up: Instant,
) -> CatchupResult {
    let f = stopped.f;
    let served_by: Vec<(usize, u64)> = (0..run.handles.len())
        .filter(|i| *i != f)
        .map(|i| {
            (
                i,
                run.view(i)
                    .bytes_served
                    .saturating_sub(rejoined.served_before[i]),
            )
        })
        .filter(|(_, b)| *b > 0)
        .collect();
    let bytes_served: u64 = served_by.iter().map(|(_, b)| b).sum();
    let c = run.view(f);
    let (last_served, installed_at) = (transferred.last_served, transferred.installed_at);
    let transfer_s = last_served
        .1
        .saturating_duration_since(rejoined.pull_at)
        .as_secs_f64();
    let transfer_bytes = last_served.0.saturating_sub(rejoined.served0);
    CatchupResult {
        payload: o.load.payload,
        clients: o.load.clients,
        outstanding: o.load.outstanding,
        state_mib: o.state_mib,
        every_bytes: plan.policy.every_bytes,
        keep: o.keep,
        chunk_bytes: plan.policy.chunk_bytes,
        rate_mib_s: rate,
        serve_bytes_per_tick: plan.per_tick,
        leader: stopped.leader,
        stopped: f,
        stop_applied: stopped.stop_applied,
        leader_base_at_restart: stopped.leader_base_at_restart,
        leader_log_at_restart: stopped.leader_log_at_restart,
        leader_changes: run
            .shared
            .elections
            .load(Ordering::Relaxed)
            .saturating_sub(1),
        installed_index: transferred.installed_index,
        image_bytes: transferred.image_bytes,
        installs: c.checkpoints_installed,
        checkpoint_failures: c.checkpoint_failures,
        bytes_served,
        served_by,
        rejoin_s: rejoined
            .pull_at
            .duration_since(rejoined.restarted)
            .as_secs_f64(),
        transfer_s,
        install_s: installed_at
            .saturating_duration_since(last_served.1)
            .as_secs_f64(),
        tail_s: caught_up.duration_since(installed_at).as_secs_f64(),
        transfer_mib_s: if transfer_s > 0.0 {
            transfer_bytes as f64 / (1 << 20) as f64 / transfer_s
        } else {
            0.0
        },
        phases: std::mem::take(&mut run.phases),
    }
}
