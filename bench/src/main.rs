//! `ballot-bench`: cluster throughput and latency, raw fabric baselines, and a side-by-side
//! comparison of the fabrics. See `docs/benchmarks.md`.

mod catchup;
mod cluster;
mod cpu;
mod fabrics;
mod load;
mod plot;
mod procs;
mod raw;
mod stats;
mod table;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fabrics::FabricKind;
use load::LoadOpts;
use stats::BenchResult;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ballot-bench",
    about = "Ballot benchmarks: replicated-log throughput/latency, raw fabric round trips, fabric comparison",
    long_about = "With no subcommand: runs a cluster of replicas in this process on the best fabric \
                  available (RDMA if a device is found, else TCP on 127.0.0.1) and reports commits/s \
                  and commit latency."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The fabric's own round trip: one-sided WRITE of one entry + completion, no protocol.
    Raw,
    /// Raw round trip and cluster on every available fabric (or `--fabric`), side by side.
    Compare,
    /// A follower stopped, restarted empty and caught up through a checkpoint under load:
    /// the leader's commit latency before (A), during the transfer (B) and after (C), for
    /// each catch-up bandwidth cap (3 replicas, threads, tcp).
    Catchup(CatchupArgs),
}

#[derive(Args, Debug)]
struct CatchupArgs {
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
    phase_timeout: Duration,
    /// With `--ckpt-every-mib 0`: which live replica takes the newer checkpoint, and so
    /// serves the restarted one (recovery pulls from the highest log base). Default: leader
    /// (periodic checkpoints: any).
    #[arg(long, value_enum)]
    serve_from: Option<catchup::ServeFrom>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Topology {
    Threads,
    Processes,
}

/// The global options: the load every mode drives, and what is done with it. Numbered for
/// `--help` together with [`LoadOpts`] (which takes 5-7, 10-14, 17, 19, 20; 0-2 are the
/// subcommands).
#[derive(Args, Debug)]
struct Opts {
    /// Fabric; default: rdma if a device is present, else tcp (compare: every available one).
    #[arg(long, value_enum, global = true, display_order = 3)]
    fabric: Option<FabricKind>,
    /// Where the replicas run: `threads` (one process) or `processes` (ballot-node processes
    /// on 127.0.0.1, driven through the client library). Default: threads; `compare` runs
    /// both (processes on tcp, when ballot-node is built).
    #[arg(long, value_enum, global = true, display_order = 4)]
    topology: Option<Topology>,
    #[command(flatten)]
    load: LoadOpts,
    /// Run the cluster once per client count, e.g. `--sweep 1,4,16,64`
    /// (default list: 1,2,4,8,16,32,64); `--outstanding` stays fixed.
    #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "1,2,4,8,16,32,64", global = true, display_order = 8)]
    sweep: Option<String>,
    /// Write throughput-vs-latency and latency-distribution plots to this SVG file.
    #[arg(long, value_name = "FILE.svg", global = true, display_order = 9)]
    plot: Option<std::path::PathBuf>,
    /// Measured time of each raw baseline in `compare`.
    #[arg(long, default_value = "3s", value_parser = parse_duration, global = true, display_order = 15)]
    raw_duration: Duration,
    /// Pin replica threads: replica i runs on core LIST[i % len], e.g. 0,1 or 0-1.
    #[arg(long, global = true, display_order = 16)]
    cores: Option<String>,
    /// One JSON object per result on stdout (progress stays on stderr).
    #[arg(long, global = true, display_order = 18)]
    json: bool,
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

fn main() -> ExitCode {
    ballot_verbs::init_diagnostics();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballot-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut cli: Cli) -> Result<(), String> {
    cli.opts.load.cores = cli
        .opts
        .cores
        .as_deref()
        .map(parse_cores)
        .transpose()?
        .unwrap_or_default();
    let o = &cli.opts;
    let sweep: Vec<usize> = match &o.sweep {
        None => vec![o.load.clients],
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
    if sweep.is_empty() {
        return Err("empty --sweep list".into());
    }
    if o.sweep.is_some() && o.load.open_loop.is_some() {
        return Err(
            "--sweep varies closed-loop clients; it cannot be combined with --open-loop".into(),
        );
    }
    let results = match cli.cmd {
        None if o.topology == Some(Topology::Processes) => {
            check_processes_fabric(o.fabric)?;
            let mut out = Vec::new();
            for &n in &sweep {
                let p = o.load.with_clients(n);
                eprintln!("{}", describe_processes(&p));
                out.push(procs::run(&p)?);
            }
            out
        }
        None => {
            let kind = pick(o.fabric);
            let mut out = Vec::new();
            for &n in &sweep {
                let c = o.load.with_clients(n);
                eprintln!("{}", describe_cluster(kind, &c));
                out.push(cluster::run(kind, &c)?);
            }
            out
        }
        Some(Cmd::Raw) => {
            let kind = pick(o.fabric);
            eprintln!(
                "raw {}: one-sided WRITE of a {}-byte entry + completion, {:?} warm-up, {:?} measured",
                kind.name(),
                ballot::layout::entry_size(
                    o.load.payload + ballot::protocol::batch::COMMAND_OVERHEAD
                ),
                o.load.warmup,
                o.load.duration
            );
            vec![raw::run(
                kind,
                o.load.payload,
                o.load.warmup,
                o.load.duration,
            )?]
        }
        Some(Cmd::Compare) => compare(o, &sweep)?,
        Some(Cmd::Catchup(a)) => return run_catchup(o, &a),
    };
    for r in results.iter().filter(|r| r.errors > 0) {
        eprintln!(
            "warning: {} {} {}: {} commands failed in the measured window (not counted in ops/s or latency)",
            r.kind, r.fabric, r.topology, r.errors
        );
    }
    if let Some(path) = &o.plot {
        let sub = format!(
            "ballot-bench on {} ({} CPUs): {} replicas, {}-byte commands, {:?} per point, volatile",
            machine(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            o.load.replicas,
            o.load.payload,
            o.load.duration
        );
        std::fs::write(path, plot::svg(&results, &sub))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    if o.json {
        for r in &results {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", stats::table(&results));
        if matches!(cli.cmd, Some(Cmd::Compare)) {
            print!("{}", cross_ratios(&results));
        }
    }
    Ok(())
}

fn run_catchup(o: &Opts, a: &CatchupArgs) -> Result<(), String> {
    if matches!(o.fabric, Some(k) if k != FabricKind::Tcp) {
        return Err("catchup runs on tcp only (a replica is stopped and restarted)".into());
    }
    if o.topology == Some(Topology::Processes) {
        return Err("catchup runs the threads topology only".into());
    }
    if o.load.durable() {
        return Err("catchup runs volatile only".into());
    }
    if o.sweep.is_some() || o.plot.is_some() {
        return Err("catchup takes neither --sweep nor --plot".into());
    }
    let c = catchup::CatchupOpts {
        load: o.load.clone(),
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
    if o.json {
        for r in &results {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", catchup::table(&results));
    }
    Ok(())
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
        None => format!("{} closed-loop client threads x 1 outstanding", p.clients),
    };
    format!(
        "cluster: {} ballot-node processes on tcp 127.0.0.1, puts of {}-byte values, {}, {:?} warm-up, {:?} measured, {}",
        p.replicas,
        p.payload,
        load,
        p.warmup,
        p.duration,
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

/// The requested fabric, or the best available.
fn pick(f: Option<FabricKind>) -> FabricKind {
    f.unwrap_or_else(|| {
        let (k, why) = fabrics::best();
        if let Some(why) = why {
            eprintln!("rdma unavailable ({why}); using {}", k.name());
        }
        k
    })
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
        o.warmup,
        o.duration,
        if o.cores.is_empty() {
            "unpinned".to_string()
        } else {
            format!("pinned to {:?}", o.cores.iter().map(|c| c.id).collect::<Vec<_>>())
        }
    )
}

fn compare(o: &Opts, sweep: &[usize]) -> Result<Vec<BenchResult>, String> {
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
    let mut out = Vec::new();
    for k in kinds {
        eprintln!("== {}: raw round trip ({:?})", k.name(), o.raw_duration);
        let raw = raw::run(
            k,
            o.load.payload,
            Duration::from_millis(500),
            o.raw_duration,
        )?;
        eprintln!("   raw p50 {:.1} us, p99 {:.1} us", raw.p50_us, raw.p99_us);
        let mut runs = Vec::new();
        if threads {
            for &n in sweep {
                let c = o.load.with_clients(n);
                eprintln!("== {}", describe_cluster(k, &c));
                runs.push(cluster::run(k, &c)?);
            }
        }
        if processes && k == FabricKind::Tcp {
            for &n in sweep {
                let p = o.load.with_clients(n);
                eprintln!("== {}", describe_processes(&p));
                runs.push(procs::run(&p)?);
            }
        }
        out.push(raw.clone());
        for mut c in runs {
            c.raw_p50_us = Some(raw.p50_us);
            c.ratio_p50 = (raw.p50_us > 0.0).then(|| c.p50_us / raw.p50_us);
            out.push(c);
        }
    }
    Ok(out)
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
