//! One Ballot replica as a process, replicating over `RdmaFabric` (Soft-RoCE or real RDMA).
//!
//! usage: rdma-cluster --id N --peers 0=IP:PORT,1=IP:PORT,2=IP:PORT [--dev NAME]
//!                     [--gid-index N] [--commands N] [--depth N] [--state-dir DIR]
//!                     [--heartbeat-ms N] [--election-ms N] [--recovering]
//!
//! Runs `Replica::step` in a loop (1 tick = 1 ms). The first time this replica leads, it
//! proposes `--commands` KV puts with unique ids (`id << 32 | seq`), `--depth` in flight, and
//! records each command's commit latency (propose -> completion at the leader) in an HDR
//! histogram; then prints `WORKLOAD node=.. commits=.. failed=.. p50_us=.. p99_us=..`.
//!
//! Every ~200 ms (and on change) it writes, atomically, into `--state-dir` (default
//! /tmp/cluster):
//! - `status.N`: `node role ballot commit applied leader workload commits failed p50 p99`
//! - `digest.N`: `applied=<commands> last=<index> hash=<fnv64 of (index, id) pairs>`
//! - `applied.N`: the applied log, one `index id` line per command
//!
//! The bootstrap is authenticated with `BALLOT_CLUSTER_KEY` (default: a fixed test key).
//! `--recovering` also makes the process dial every peer (re-bootstrap after a restart).
//!
//! so a test script can compare replicas without talking to them. A data QP that breaks
//! (`data_error(peer)`, e.g. after a fence) is reconnected with back-off; the driver itself
//! does not know about reconnects.

use ballot::driver::Replica;
use ballot::handoff::Completions;
use ballot::layout::{RegionInfo, RingGeometry};
use ballot::protocol::{Config, Core, ProposeError};
use ballot::region::Region;
use ballot::runtime::IdleStrategy;
use ballot::sim::kv::{self, Machine, Op};
use ballot::tickets::TicketMap;
use ballot::NodeId;
use ballot_verbs::{RdmaConfig, RdmaFabric};
use clap::Parser;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTER: u64 = 0x00ba_1107;

/// One Ballot replica as a process over `RdmaFabric`; the leader runs a closed-loop
/// workload (see the module docs for the files written to `--state-dir`).
#[derive(Parser, Debug)]
#[command(name = "rdma-cluster", version = ballot::version::VERSION)]
struct Args {
    /// This replica's id (one of `--peers`).
    #[arg(long)]
    id: NodeId,
    /// Every replica and its bootstrap address, e.g. 0=IP:PORT,1=IP:PORT,2=IP:PORT.
    #[arg(long, required = true, value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<(NodeId, SocketAddr)>,
    /// RDMA device name (default: the first device).
    #[arg(long)]
    dev: Option<String>,
    /// GID index (default: the first IPv4-mapped GID of the port).
    #[arg(long)]
    gid_index: Option<u32>,
    /// Commands the leader proposes.
    #[arg(long, default_value_t = 500)]
    commands: u64,
    /// Commands the leader keeps in flight (at least 1).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    #[arg(long, default_value = "/tmp/cluster")]
    state_dir: PathBuf,
    #[arg(long, default_value_t = 300)]
    heartbeat_ms: u32,
    #[arg(long, default_value_t = 300)]
    election_ms: u32,
    /// A restarted replica: recover, and dial every peer (re-bootstrap).
    #[arg(long)]
    recovering: bool,
}

fn parse_peer(p: &str) -> Result<(NodeId, SocketAddr), String> {
    let (n, addr) = p
        .split_once('=')
        .ok_or(format!("bad entry {p} (ID=IP:PORT)"))?;
    let n: NodeId = n.parse().map_err(|e| format!("{p}: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{p}: {e}"))?;
    Ok((n, addr))
}

fn parse() -> Result<Args, String> {
    let mut a = Args::parse();
    a.depth = a.depth.max(1);
    if !a.peers.iter().any(|(n, _)| *n == a.id) {
        return Err(format!("--id {} must be one of --peers", a.id));
    }
    Ok(a)
}

/// The leader's closed-loop workload.
struct Workload {
    total: u64,
    depth: usize,
    next: u64,
    in_flight: TicketMap<Instant>,
    commits: u64,
    failed: u64,
    hist: Histogram<u64>,
    started: Option<Instant>,
    done: bool,
}

impl Workload {
    fn summary(&self, node: NodeId) -> String {
        let secs = self
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        format!(
            "WORKLOAD node={node} commits={} failed={} p50_us={} p99_us={} max_us={} secs={secs:.2}",
            self.commits,
            self.failed,
            self.hist.value_at_quantile(0.5),
            self.hist.value_at_quantile(0.99),
            self.hist.max()
        )
    }
}

fn write_atomic(dir: &std::path::Path, name: &str, body: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}

fn digest(m: &Machine) -> (String, String) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut list = String::with_capacity(m.applied.len() * 24);
    for &(i, id) in &m.applied {
        for b in i.to_le_bytes().iter().chain(id.to_le_bytes().iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        let _ = writeln!(list, "{i} {} {}", id >> 32, id & 0xffff_ffff);
    }
    let last = m.applied.last().map(|x| x.0).unwrap_or(0);
    (
        format!("applied={} last={last} hash={h:016x}\n", m.applied.len()),
        list,
    )
}

fn main() {
    ballot_verbs::init_diagnostics();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rdma-cluster: {e}");
            std::process::exit(2)
        }
    };
    let me = args.id;
    let _ = std::fs::create_dir_all(&args.state_dir);
    let ring = RingGeometry::new(1 << 12, 1024).expect("ring geometry");
    let region = Arc::new(
        Region::anonymous(RegionInfo {
            cluster: CLUSTER,
            node: me,
            ring,
        })
        .expect("anonymous region"),
    );
    let listen = args.peers.iter().find(|(n, _)| *n == me).unwrap().1;
    let others: Vec<_> = args
        .peers
        .iter()
        .copied()
        .filter(|(n, _)| *n != me)
        .collect();
    let mut rc = RdmaConfig::new(me, listen, others.clone());
    rc.cluster = CLUSTER;
    // The bootstrap is authenticated: BALLOT_CLUSTER_KEY, or a fixed test key.
    rc.key = std::env::var_os("BALLOT_CLUSTER_KEY")
        .map(|k| k.into_encoded_bytes())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| b"rdma-cluster test key".to_vec());
    rc.rejoin = args.recovering;
    rc.device = args.dev.clone();
    rc.gid_index = args.gid_index;
    let t0 = Instant::now();
    let fabric = match RdmaFabric::connect(&rc, region) {
        Ok(f) => f,
        Err(e) => {
            println!("rdma-cluster[{me}]: connect failed: {e}");
            std::process::exit(1)
        }
    };
    println!(
        "rdma-cluster[{me}]: connected to {:?} on {} gid {} mtu {} in {:.2}s",
        others.iter().map(|p| p.0).collect::<Vec<_>>(),
        fabric.device(),
        fabric.gid_index(),
        fabric.mtu_bytes(),
        t0.elapsed().as_secs_f64()
    );

    let mut members: Vec<NodeId> = args.peers.iter().map(|p| p.0).collect();
    members.sort_unstable();
    let mut cfg = Config::new(me, members, ring, ballot::runtime::clock_seed(me));
    cfg.heartbeat_timeout = args.heartbeat_ms;
    cfg.election_timeout = args.election_ms;
    cfg.batch_bytes = cfg.batch_bytes.min(ring.max_payload());
    let core = match Core::new(cfg, args.recovering) {
        Ok(c) => c,
        Err(e) => {
            println!("rdma-cluster[{me}]: bad config: {e}");
            std::process::exit(2)
        }
    };
    let mut rep = Replica::new(core, fabric, Machine::default(), None);

    let mut wl = Workload {
        total: args.commands,
        depth: args.depth,
        next: 0,
        in_flight: TicketMap::new(),
        commits: 0,
        failed: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        started: None,
        done: false,
    };
    let start = Instant::now();
    // The one idle policy of every replica loop, with this binary's counts (2 vCPUs in the
    // guest, 3 processes): spin 63 idle turns, yield 64, then sleep 50 us.
    let mut idler = IdleStrategy::Shared {
        spin: 63,
        yields: 64,
        park: Duration::from_micros(50),
    }
    .start();
    let mut last_role = (String::new(), String::new());
    let mut last_dump = Instant::now() - Duration::from_secs(1);
    let mut dumped_applied = usize::MAX;
    let mut dumped_status = String::new();
    // peer -> (next attempt, back-off)
    let mut reconnect: HashMap<NodeId, (Instant, Duration)> = HashMap::new();

    let mut done = Completions::new();
    loop {
        let now_ticks = start.elapsed().as_millis() as u64;
        let mut busy = rep.step(now_ticks);

        // Completions of our proposals.
        rep.take_completed(&mut done);
        for (ticket, out) in done.iter() {
            busy = true;
            if let Some(t) = wl.in_flight.remove(ticket) {
                match out {
                    Ok(_) => {
                        wl.commits += 1;
                        let _ = wl.hist.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(e) => {
                        wl.failed += 1;
                        println!("rdma-cluster[{me}]: ticket {ticket} failed: {e}");
                    }
                }
            }
        }

        // Leadership changes.
        let role = (
            rep.core().role_name().to_string(),
            rep.core().promised().to_string(),
        );
        if role != last_role {
            println!(
                "rdma-cluster[{me}]: t={}ms {} ballot={} commit={} applied={}",
                now_ticks,
                role.0,
                role.1,
                rep.core().commit(),
                rep.core().applied()
            );
            last_role = role;
        }

        // The workload, the first time we lead.
        if rep.core().is_leader() && !wl.done {
            if wl.started.is_none() {
                wl.started = Some(Instant::now());
                println!(
                    "rdma-cluster[{me}]: leading, proposing {} commands, depth {}",
                    wl.total, wl.depth
                );
            }
            while wl.next < wl.total && wl.in_flight.len() < wl.depth {
                let id = u64::from(me) << 32 | wl.next;
                let cmd = kv::encode(id, Op::Put((wl.next % 251) as u8, id));
                let t = Instant::now();
                match rep.propose(&cmd) {
                    Ok(ticket) => {
                        wl.in_flight.insert(ticket, t);
                        wl.next += 1;
                        busy = true;
                    }
                    Err(ProposeError::Busy) => break,
                    Err(e) => {
                        println!("rdma-cluster[{me}]: propose failed: {e}");
                        wl.failed += 1;
                        wl.next += 1;
                    }
                }
            }
        }
        if wl.started.is_some() && !wl.done && wl.next >= wl.total && wl.in_flight.is_empty() {
            wl.done = true;
            println!("{}", wl.summary(me));
        }
        if wl.started.is_some() && !wl.done && !rep.core().is_leader() && wl.in_flight.is_empty() {
            // Lost leadership mid-workload: report what we have.
            wl.done = true;
            println!("{} (leadership lost)", wl.summary(me));
        }

        // Reconnect broken data QPs, with back-off.
        for &(p, _) in &others {
            if rep.fabric().data_error(p).is_some() {
                let now = Instant::now();
                let e = reconnect
                    .entry(p)
                    .or_insert((now, Duration::from_millis(20)));
                if now >= e.0 {
                    let why = rep.fabric().data_error(p).map(|e| e.to_string());
                    match rep.fabric_mut().reconnect(p) {
                        Ok(()) => println!(
                            "rdma-cluster[{me}]: t={now_ticks}ms data QP to {p} broken ({}): reconnect requested",
                            why.unwrap_or_default()
                        ),
                        Err(err) => println!(
                            "rdma-cluster[{me}]: t={now_ticks}ms data QP to {p} broken ({}): reconnect failed: {err}",
                            why.unwrap_or_default()
                        ),
                    }
                    e.1 = (e.1 * 2).min(Duration::from_secs(2));
                    e.0 = now + e.1;
                }
            } else {
                reconnect.remove(&p);
            }
        }

        // State files for the test script.
        if last_dump.elapsed() >= Duration::from_millis(200) {
            last_dump = Instant::now();
            let c = rep.core();
            let status = format!(
                "node={me} role={} ballot={} commit={} applied={} leader={} workload={} commits={} failed={} p50_us={} p99_us={}\n",
                c.role_name(),
                c.promised(),
                c.commit(),
                c.applied(),
                c.leader_hint().map(|l| l.to_string()).unwrap_or("-".into()),
                if wl.done { "done" } else if wl.started.is_some() { "running" } else { "idle" },
                wl.commits,
                wl.failed,
                wl.hist.value_at_quantile(0.5),
                wl.hist.value_at_quantile(0.99),
            );
            if status != dumped_status {
                write_atomic(&args.state_dir, &format!("status.{me}"), &status);
                dumped_status = status;
            }
            let m = rep.state_machine();
            if m.applied.len() != dumped_applied {
                dumped_applied = m.applied.len();
                let (d, list) = digest(m);
                write_atomic(&args.state_dir, &format!("applied.{me}"), &list);
                write_atomic(&args.state_dir, &format!("digest.{me}"), &d);
            }
        }

        idler.idle(busy, std::thread::sleep);
    }
}
