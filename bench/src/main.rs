//! `ballot-bench`: cluster throughput and latency, raw fabric baselines (in one process or
//! across two hosts), and a side-by-side comparison of the fabrics. See
//! `docs/benchmarks.md`.

mod catchup;
mod cluster;
mod cpu;
mod fabrics;
mod interrupt;
mod load;
mod plot;
mod procs;
mod raw;
mod remote;
mod report;
mod stats;
mod table;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fabrics::{FabricKind, RdmaOpts};
use load::{LoadOpts, OutputOpts};
use raw::RawArgs;
use report::RunMeta;
use serde::Serialize;
use stats::BenchResult;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser, Debug)]
#[command(
    name = "ballot-bench",
    version = ballot::version::VERSION,
    about = "Ballot benchmarks: replicated-log throughput/latency, raw fabric round trips, fabric comparison",
    long_about = "With no subcommand: `cluster`, i.e. a cluster of replicas in this process on the best \
                  fabric available (RDMA if a device is found, else TCP on 127.0.0.1), reporting \
                  commits/s and commit latency. Each subcommand takes only its own options \
                  (`ballot-bench SUBCOMMAND --help`).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand, Debug, Serialize)]
#[serde(tag = "subcommand", rename_all = "lowercase")]
enum Cmd {
    /// The replicated cluster (the default): replicas in threads, ballot-node processes, or
    /// an existing cluster (`--endpoints`).
    Cluster(ClusterArgs),
    /// The fabric's own round trip: one-sided WRITE of one entry + completion, no protocol;
    /// in this process, or across two hosts (`--server` / `--connect`).
    Raw(RawArgs),
    /// Raw round trip and cluster on every available fabric (or `--fabric`), side by side.
    Compare(CompareArgs),
    /// A follower stopped, restarted empty and caught up through a checkpoint under load:
    /// the leader's commit latency before (A), during the transfer (B) and after (C), for
    /// each catch-up bandwidth cap (3 replicas, threads, tcp).
    Catchup(CatchupArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Topology {
    Threads,
    Processes,
}

/// What `cluster` and `compare` run: where, on what, how many points, and the plot.
#[derive(Args, Debug, Serialize)]
struct RunArgs {
    /// Fabric; default: rdma if a device is present (or `--rdma-device` is given), else tcp
    /// (compare: every available one).
    #[arg(long, value_enum)]
    fabric: Option<FabricKind>,
    /// Where the replicas run: `threads` (one process) or `processes` (ballot-node processes
    /// on 127.0.0.1, driven through the client library). Default: threads; `compare` runs
    /// both (processes on tcp, when ballot-node is built).
    #[arg(long, value_enum)]
    topology: Option<Topology>,
    #[command(flatten)]
    load: LoadOpts,
    /// Run once per client count, e.g. `--sweep 1,4,16,64` (default list:
    /// 1,2,4,8,16,32,64); `--outstanding` stays fixed. With a `--payload` list: every
    /// count for every size.
    #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "1,2,4,8,16,32,64")]
    sweep: Option<String>,
    /// Write throughput-vs-latency and latency-distribution plots to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[command(flatten)]
    rdma: RdmaOpts,
}

#[derive(Args, Debug, Serialize)]
struct ClusterArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Drive an existing cluster instead of starting one: the nodes' client addresses
    /// (`ballot-node --client-addr`), e.g. `--endpoints 10.0.0.1:7001,10.0.0.2:7001`
    /// (`id=host:port` accepted). `--clients` threads issue puts through the pipelining
    /// client library, `--outstanding` in flight each. The cluster is left running.
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        value_parser = ballot_node::client::parse_endpoint,
        conflicts_with_all = ["fabric", "topology", "replicas", "pipeline", "batch_bytes", "cores_arg", "data_dir", "rdma_device", "gid_index", "ib_port"]
    )]
    endpoints: Vec<String>,
}

#[derive(Args, Debug, Serialize)]
struct CompareArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Measured time of each raw baseline.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    #[serde(serialize_with = "report::secs")]
    raw_duration: Duration,
}

#[derive(Args, Debug, Serialize)]
struct CatchupArgs {
    #[command(flatten)]
    load: LoadOpts,
    /// Size of the replicated state (a table of fixed-size values, `--payload` - 8 bytes
    /// each, written by the load); a checkpoint is this big.
    #[arg(long, default_value_t = 64)]
    state_mib: u64,
    /// Catch-up bandwidth caps to compare, MiB/s (`unlimited`: no cap); one fresh cluster
    /// each. Tick = 1 ms: the cap is `serve_bytes_per_tick` = MiB/s x 2^20 / 1000.
    #[arg(long, default_value = "32,128,unlimited")]
    catchup_rate: String,
    /// Take a checkpoint every this many MiB of applied commands on every replica (periodic,
    /// in all phases). Default 0: only on request, while the follower is down (phases A, B
    /// and C then take none).
    #[arg(long, default_value_t = 0)]
    ckpt_every_mib: u64,
    /// Checkpoints kept per replica (the log is compacted behind the oldest).
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Image bytes per chunk sent to the catching-up replica.
    #[arg(long, default_value_t = 64)]
    chunk_kib: usize,
    /// Longest wait for the leader's log base to pass the stopped follower, for the pull to
    /// start, for the install, and for the catch-up after it.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    #[serde(serialize_with = "report::secs")]
    phase_timeout: Duration,
    /// With `--ckpt-every-mib 0`: which live replica takes the newer checkpoint, and so
    /// serves the restarted one (recovery pulls from the highest log base). Default: leader
    /// (periodic checkpoints: any).
    #[arg(long, value_enum)]
    #[serde(skip)]
    serve_from: Option<catchup::ServeFrom>,
}

fn main() -> ExitCode {
    ballot_verbs::init_diagnostics();
    let started = SystemTime::now();
    let cli = Cli::parse();
    interrupt::install();
    let cmd = cli.cmd.unwrap_or(Cmd::Cluster(cli.cluster));
    let meta = RunMeta::new(started, &cmd);
    let r = run(cmd, &meta);
    if interrupt::requested() {
        if let Err(e) = r {
            eprintln!("ballot-bench: {e}");
        }
        eprintln!("ballot-bench: interrupted");
        return ExitCode::from(130);
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballot-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, meta: &RunMeta) -> Result<(), String> {
    match cmd {
        Cmd::Cluster(mut a) => {
            if a.run.load.idle_connections > 0
                && (a.run.topology != Some(Topology::Processes) || !a.endpoints.is_empty())
            {
                return Err(IDLE_NEEDS_PROCESSES.into());
            }
            let points = points(&mut a.run.load, a.run.sweep.as_deref())?;
            let results = if !a.endpoints.is_empty() {
                run_endpoints(&a.run, &points, &a.endpoints)?
            } else {
                run_cluster(&a.run, &points)?
            };
            let plot = a.run.plot.as_deref().map(|p| (p, &a.run.load));
            report(&results, &a.run.load.out, meta, plot)
        }
        Cmd::Compare(mut a) => {
            if a.run.load.idle_connections > 0 {
                return Err(IDLE_NEEDS_PROCESSES.into());
            }
            let points = points(&mut a.run.load, a.run.sweep.as_deref())?;
            let results = compare(&a, &points)?;
            let plot = a.run.plot.as_deref().map(|p| (p, &a.run.load));
            report(&results, &a.run.load.out, meta, plot)?;
            if !a.run.load.out.json {
                print!("{}", cross_ratios(&results));
            }
            Ok(())
        }
        Cmd::Raw(a) => run_raw(&a, meta),
        Cmd::Catchup(a) if a.load.idle_connections > 0 => Err(IDLE_NEEDS_PROCESSES.into()),
        Cmd::Catchup(a) => run_catchup(a, meta),
    }
}

const IDLE_NEEDS_PROCESSES: &str =
    "--idle-connections is measured with `cluster --topology processes` only";

/// The points of a run: every `--payload` size with every `--sweep` client count (or
/// `--clients`). Parses `--cores` into the load on the way.
fn points(load: &mut LoadOpts, sweep: Option<&str>) -> Result<Vec<LoadOpts>, String> {
    load.resolve_cores()?;
    let counts: Vec<usize> = match sweep {
        None => vec![load.clients],
        Some(list) => list
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        format!("bad --sweep list {list:?} (client counts, e.g. 1,4,16)")
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    if counts.is_empty() {
        return Err("empty --sweep list".into());
    }
    if sweep.is_some() && load.open_loop.is_some() {
        return Err(
            "--sweep varies closed-loop clients; it cannot be combined with --open-loop".into(),
        );
    }
    if load.measure.payloads.is_empty() {
        return Err("empty --payload list".into());
    }
    Ok(load
        .measure
        .payloads
        .iter()
        .flat_map(|&p| counts.iter().map(move |&n| (p, n)))
        .map(|(p, n)| load.point(p, n))
        .collect())
}

/// Progress over the points of a sweep: `[i/n, ETA m:ss]` before each, from the time the
/// points so far took (before the first: warm-up + duration + 1 s of start-up each).
struct Sweep {
    i: usize,
    n: usize,
    t0: Instant,
    guess: Duration,
}

impl Sweep {
    fn new(n: usize, per_point: Duration) -> Sweep {
        Sweep {
            i: 0,
            n,
            t0: Instant::now(),
            guess: per_point,
        }
    }

    /// Announces the next point (`what`); `false` once Ctrl-C was pressed.
    fn next(&mut self, what: &str) -> bool {
        if interrupt::requested() {
            return false;
        }
        let left = (self.n - self.i.min(self.n)) as u32;
        let eta = match self.i {
            0 => self.guess * left,
            i => self.t0.elapsed() / i as u32 * left,
        };
        self.i += 1;
        if self.n > 1 {
            let s = eta.as_secs();
            eprintln!(
                "[{}/{}, ETA {}:{:02}] {what}",
                self.i,
                self.n,
                s / 60,
                s % 60
            );
        } else {
            eprintln!("{what}");
        }
        true
    }

    /// Keeps a point's result (or results); on Ctrl-C, an error ends the sweep with what
    /// was measured.
    fn keep<R: IntoIterator<Item = BenchResult>>(
        &self,
        out: &mut Vec<BenchResult>,
        r: Result<R, String>,
    ) -> Result<(), String> {
        match r {
            Ok(rs) => out.extend(rs.into_iter().filter(|r| r.duration_s > 0.0)),
            Err(e) if interrupt::requested() => eprintln!("{e}"),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

fn per_point(o: &LoadOpts) -> Duration {
    o.measure.warmup + o.measure.duration + Duration::from_secs(1)
}

fn run_cluster(a: &RunArgs, points: &[LoadOpts]) -> Result<Vec<BenchResult>, String> {
    let mut out = Vec::new();
    let mut sweep = Sweep::new(points.len(), per_point(&a.load));
    if a.topology == Some(Topology::Processes) {
        check_processes_fabric(a.fabric)?;
        for p in points {
            if !sweep.next(&describe_processes(p)) {
                break;
            }
            sweep.keep(&mut out, procs::run(p))?;
        }
    } else {
        let kind = a.rdma.pick(a.fabric);
        for p in points {
            if !sweep.next(&describe_cluster(kind, p)) {
                break;
            }
            sweep.keep(&mut out, cluster::run(kind, p, &a.rdma).map(Some))?;
        }
    }
    Ok(out)
}

fn run_endpoints(
    a: &RunArgs,
    points: &[LoadOpts],
    addrs: &[String],
) -> Result<Vec<BenchResult>, String> {
    let mut out = Vec::new();
    let mut sweep = Sweep::new(points.len(), per_point(&a.load));
    for p in points {
        let what = format!(
            "cluster at {}: puts of {}-byte values, {} client threads x {} outstanding, {:?} warm-up, {:?} measured",
            addrs.join(","),
            p.payload,
            p.clients,
            p.outstanding,
            p.measure.warmup,
            p.measure.duration
        );
        if !sweep.next(&what) {
            break;
        }
        sweep.keep(&mut out, procs::run_endpoints(p, addrs).map(Some))?;
    }
    Ok(out)
}

fn run_raw(a: &RawArgs, meta: &RunMeta) -> Result<(), String> {
    if a.measure.payloads.is_empty() {
        return Err("empty --payload list".into());
    }
    if a.server {
        return remote::serve(a);
    }
    let results = match &a.connect {
        Some(server) => {
            eprintln!(
                "raw to {server}: one-sided WRITE + completion for {:?}-byte commands",
                a.measure.payloads
            );
            remote::connect(a, server)?
        }
        None => {
            let kind = a.rdma.pick(a.fabric);
            eprintln!(
                "raw {}: one-sided WRITE of one entry + completion for {:?}-byte commands, {:?} warm-up, {} per size",
                kind.name(),
                a.measure.payloads,
                a.measure.warmup,
                match a.iterations {
                    Some(n) => format!("{n} round trips"),
                    None => format!("{:?}", a.measure.duration),
                }
            );
            raw::run(
                kind,
                &a.measure.payloads,
                a.measure.warmup,
                a.limit(),
                &a.rdma,
            )?
        }
    };
    report(&results, &a.out, meta, None)
}

/// Prints the results (JSON lines or the table) and writes the plot.
fn report(
    results: &[BenchResult],
    out: &OutputOpts,
    meta: &RunMeta,
    plot: Option<(&std::path::Path, &LoadOpts)>,
) -> Result<(), String> {
    for r in results.iter().filter(|r| r.errors > 0) {
        eprintln!(
            "warning: {} {} {}: {} commands failed in the measured window (not counted in ops/s or latency)",
            r.kind, r.fabric, r.topology, r.errors
        );
    }
    if interrupt::requested() {
        eprintln!(
            "interrupted: {} result(s) measured{}",
            results.len(),
            if results.iter().any(|r| r.partial) {
                " (the last one partial)"
            } else {
                ""
            }
        );
    }
    if let Some((path, load)) = plot {
        let sub = format!(
            "ballot-bench on {} ({} CPUs): {} replicas, {:?}-byte commands, {:?} per point",
            machine(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            load.replicas,
            load.measure.payloads,
            load.measure.duration
        );
        std::fs::write(path, plot::svg(results, &sub))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    if out.json {
        report::json_lines(results, meta)
    } else {
        print!("{}", stats::table(results));
        Ok(())
    }
}

fn run_catchup(a: CatchupArgs, meta: &RunMeta) -> Result<(), String> {
    if a.load.durable() {
        return Err("catchup runs volatile only".into());
    }
    let mut load = a.load.clone();
    load.resolve_cores()?;
    load.payload = match load.measure.payloads[..] {
        [p] => p,
        _ => return Err("catchup takes one --payload size".into()),
    };
    let c = catchup::CatchupOpts {
        load,
        state_mib: a.state_mib,
        rates: catchup::parse_rates(&a.catchup_rate)?,
        every_mib: a.ckpt_every_mib,
        chunk_kib: a.chunk_kib,
        keep: a.keep,
        timeout: a.phase_timeout,
        serve_from: a.serve_from.unwrap_or(if a.ckpt_every_mib == 0 {
            catchup::ServeFrom::Leader
        } else {
            catchup::ServeFrom::Any
        }),
    };
    if c.every_mib > 0 && c.serve_from != catchup::ServeFrom::Any {
        return Err("--serve-from needs --ckpt-every-mib 0 (checkpoints on request)".into());
    }
    let results = catchup::run(&c)?;
    if interrupt::requested() {
        eprintln!("interrupted: {} cap(s) measured", results.len());
    }
    if a.load.out.json {
        let json: Vec<_> = results.iter().map(|r| r.json()).collect();
        report::json_lines(&json, meta)
    } else {
        print!("{}", catchup::table(&results));
        Ok(())
    }
}

fn compare(a: &CompareArgs, points: &[LoadOpts]) -> Result<Vec<BenchResult>, String> {
    let o = &a.run;
    let threads = o.topology != Some(Topology::Processes);
    let processes = match o.topology {
        Some(Topology::Processes) => {
            check_processes_fabric(o.fabric)?;
            true
        }
        Some(Topology::Threads) => false,
        None => {
            let want = matches!(o.fabric, None | Some(FabricKind::Tcp));
            match (want, procs::find_node_binary()) {
                (true, Ok(_)) => true,
                (true, Err(e)) => {
                    eprintln!("processes: skipped ({e})");
                    false
                }
                (false, _) => false,
            }
        }
    };
    let kinds: Vec<FabricKind> = match o.fabric {
        Some(k) => vec![k],
        None if !threads => vec![FabricKind::Tcp],
        None if o.rdma.rdma_device.is_some() => vec![FabricKind::Rdma],
        None => {
            let mut v = Vec::new();
            match fabrics::rdma_available() {
                Ok(dev) => {
                    eprintln!("rdma: device(s) {dev}");
                    v.push(FabricKind::Rdma);
                }
                Err(why) => eprintln!("rdma: skipped ({why})"),
            }
            v.extend([FabricKind::Tcp, FabricKind::Mem]);
            v
        }
    };
    let n = kinds
        .iter()
        .map(|&k| {
            1 + points.len() * (threads as usize + (processes && k == FabricKind::Tcp) as usize)
        })
        .sum();
    let mut sweep = Sweep::new(n, per_point(&o.load));
    let mut out = Vec::new();
    for k in kinds {
        if !sweep.next(&format!(
            "{}: raw round trip ({:?} per size)",
            k.name(),
            a.raw_duration
        )) {
            break;
        }
        let raws = raw::run(
            k,
            &o.load.measure.payloads,
            Duration::from_millis(500),
            raw::Limit::Time(a.raw_duration),
            &o.rdma,
        )?;
        for r in &raws {
            eprintln!(
                "   raw {} B: p50 {:.1} us, p99 {:.1} us",
                r.payload, r.p50_us, r.p99_us
            );
        }
        let mut runs = Vec::new();
        for p in points.iter().filter(|_| threads) {
            if !sweep.next(&describe_cluster(k, p)) {
                break;
            }
            sweep.keep(&mut runs, cluster::run(k, p, &o.rdma).map(Some))?;
        }
        if processes && k == FabricKind::Tcp {
            for p in points {
                if !sweep.next(&describe_processes(p)) {
                    break;
                }
                sweep.keep(&mut runs, procs::run(p))?;
            }
        }
        for c in &mut runs {
            if let Some(raw) = raws.iter().find(|r| r.payload == c.payload) {
                c.raw_p50_us = Some(raw.p50_us);
                c.ratio_p50 = (raw.p50_us > 0.0).then(|| c.p50_us / raw.p50_us);
            }
        }
        out.extend(raws);
        out.extend(runs);
    }
    Ok(out)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn parse_cores(s: &str) -> Result<Vec<core_affinity::CoreId>, String> {
    let avail = core_affinity::get_core_ids().unwrap_or_default();
    let mut ids = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad core list {s:?}");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<usize>().map_err(|_| bad())?,
                b.parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let a = part.parse::<usize>().map_err(|_| bad())?;
                (a, a)
            }
        };
        for id in a..=b {
            if !avail.iter().any(|c| c.id == id) {
                return Err(format!("core {id} is not available (have {})", avail.len()));
            }
            ids.push(core_affinity::CoreId { id });
        }
    }
    if ids.is_empty() {
        return Err(format!("empty core list {s:?}"));
    }
    Ok(ids)
}

fn check_processes_fabric(f: Option<FabricKind>) -> Result<(), String> {
    match f {
        None | Some(FabricKind::Tcp) => Ok(()),
        Some(k) => Err(format!(
            "--topology processes runs ballot-node, which speaks tcp only (not {})",
            k.name()
        )),
    }
}

fn describe_processes(p: &LoadOpts) -> String {
    let load = match p.open_loop {
        Some(r) => format!(
            "open loop at {} cmd/s over {} client threads",
            stats::si(r),
            p.clients
        ),
        None => format!(
            "{} closed-loop client threads x {} outstanding (one connection each)",
            p.clients, p.outstanding
        ),
    };
    format!(
        "cluster: {} ballot-node processes on tcp 127.0.0.1, puts of {}-byte values, {}, {:?} warm-up, {:?} measured, {}",
        p.replicas,
        p.payload,
        load,
        p.measure.warmup,
        p.measure.duration,
        if p.cores.is_empty() {
            "shared cores".to_string()
        } else {
            format!("--core {:?} (busy-poll)", procs::core_ids(p))
        }
    )
}

/// The CPU model, for the plot's caption.
fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn describe_cluster(kind: FabricKind, o: &LoadOpts) -> String {
    let load = match o.open_loop {
        Some(r) => format!("open loop at {} cmd/s", stats::si(r)),
        None => format!(
            "{} closed-loop clients x {} outstanding",
            o.clients, o.outstanding
        ),
    };
    format!(
        "cluster: {} replicas (threads) on {}, {}-byte commands, {}, {:?} warm-up, {:?} measured, {}",
        o.replicas,
        kind.name(),
        o.payload,
        load,
        o.measure.warmup,
        o.measure.duration,
        if o.cores.is_empty() {
            "unpinned".to_string()
        } else {
            format!("pinned to {:?}", o.cores.iter().map(|c| c.id).collect::<Vec<_>>())
        }
    )
}

/// TCP against RDMA, when both ran.
fn cross_ratios(results: &[BenchResult]) -> String {
    let find = |kind: &str, fabric: &str| {
        results
            .iter()
            .find(|r| r.kind == kind && r.fabric == fabric)
    };
    let mut s = String::new();
    for (kind, what) in [("raw", "raw round trip"), ("cluster", "cluster")] {
        if let (Some(t), Some(r)) = (find(kind, "tcp"), find(kind, "rdma")) {
            // With a sweep, the first run of each (its smallest client count).
            s.push_str(&format!(
                "tcp/rdma {what}: p50 x{:.2}, p99 x{:.2}, throughput x{:.2}\n",
                t.p50_us / r.p50_us,
                t.p99_us / r.p99_us,
                t.throughput_ops_s / r.throughput_ops_s
            ));
        }
    }
    if s.is_empty() {
        s.push_str("tcp/rdma: not both available in this run\n");
    }
    s
}
