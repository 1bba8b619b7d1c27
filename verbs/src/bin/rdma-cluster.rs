//! One Ballot replica as a process, replicating over `RdmaFabric` (Soft-RoCE or real RDMA).
//!
//! usage: rdma-cluster --id N --peers 0=IP:PORT,1=IP:PORT,2=IP:PORT [--dev NAME]
//!                     [--gid-index N] [--commands N] [--depth N] [--state-dir DIR]
//!                     [--heartbeat-ms N] [--election-ms N] [--recovering]
//!
//! Runs the replica on `ballot::runtime::Runtime` (1 tick = 1 ms), the loop `ballot-node`
//! runs. The first time this replica leads, the main thread proposes `--commands` KV puts
//! with unique ids (`id << 32 | seq`) through the runtime's handle, `--depth` in flight,
//! and records each command's commit latency (submission -> outcome) in an HDR histogram;
//! then prints `WORKLOAD node=.. commits=.. failed=.. p50_us=.. p99_us=..`.
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
//! does not know about reconnects. Both run on the replica thread between steps, in the
//! runtime's hook (`Runtime::start_with_hook`).

use ballot::driver::Replica;
use ballot::handoff::Proposals;
use ballot::layout::{RegionInfo, RingGeometry};
use ballot::protocol::{Config, Core, ProposeError};
use ballot::region::Region;
use ballot::runtime::{CompletionSink, Handle, IdleStrategy, Role, Runtime, RuntimeConfig};
use ballot::sim::kv::{self, Machine, Op};
use ballot::NodeId;
use ballot_verbs::{RdmaConfig, RdmaFabric};
use clap::Parser;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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

/// The leader's closed-loop workload: its figures, shared by the thread that runs it and
/// the replica thread's hook, which writes them to the status file.
struct Workload {
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
    let rep = Replica::new(core, fabric, Machine::default(), None);
    let wl = Arc::new(Mutex::new(Workload {
        commits: 0,
        failed: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        started: None,
        done: false,
    }));
    let hook = between_steps(me, others, args.state_dir.clone(), wl.clone());
    let cfg = RuntimeConfig {
        // The one idle policy of every replica loop, with this binary's counts (2 vCPUs in
        // the guest, 3 processes): spin 63 idle turns, yield 64, then sleep 50 us.
        idle: IdleStrategy::Shared {
            spin: 63,
            yields: 64,
            park: Duration::from_micros(50),
        },
        name: format!("replica-{me}"),
        ..RuntimeConfig::default()
    };
    let runtime = match Runtime::start_with_hook(rep, cfg, hook) {
        Ok(r) => r,
        Err(e) => {
            println!("rdma-cluster[{me}]: cannot start the replica thread: {e}");
            std::process::exit(1)
        }
    };
    workload(&runtime.handle(), &wl, me, args.commands, args.depth);
    // The replica thread goes on; the test script stops the process.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Waits until this replica leads, then keeps `depth` of `total` puts in flight through
/// `h`, recording each one's latency, and prints the summary line.
fn workload(h: &Handle, wl: &Mutex<Workload>, me: NodeId, total: u64, depth: usize) {
    while h.status().role != Role::Leader {
        std::thread::sleep(Duration::from_millis(1));
    }
    wl.lock().expect("workload").started = Some(Instant::now());
    println!("rdma-cluster[{me}]: leading, proposing {total} commands, depth {depth}");
    let (sink, done) = CompletionSink::new(|| {});
    let mut sent_at: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut batch = Proposals::new();
    let (mut next, mut in_flight) = (0u64, 0usize);
    loop {
        while next < total && in_flight + batch.len() < depth {
            let id = u64::from(me) << 32 | next;
            batch.push(next, &kv::encode(id, Op::Put((next % 251) as u8, id)));
            sent_at.push(Instant::now());
            next += 1;
        }
        if !batch.is_empty() {
            // A refused batch comes back whole: `Busy` (the runtime's queue is full) keeps
            // it for the next turn, anything else fails it.
            let n = batch.len();
            match h.submit_batch(batch.take(), &sink) {
                Ok(()) => in_flight += n,
                Err(r) if r.error == ProposeError::Busy => batch = r.batch,
                Err(r) => {
                    println!("rdma-cluster[{me}]: propose failed: {}", r.error);
                    wl.lock().expect("workload").failed += n as u64;
                }
            }
        }
        if let Ok(got) = done.recv_timeout(Duration::from_millis(10)) {
            let mut w = wl.lock().expect("workload");
            for (tag, out) in got.iter() {
                in_flight -= 1;
                match out {
                    Ok(_) => {
                        w.commits += 1;
                        let us = sent_at[tag as usize].elapsed().as_micros().max(1) as u64;
                        let _ = w.hist.record(us);
                    }
                    Err(e) => {
                        w.failed += 1;
                        println!("rdma-cluster[{me}]: command {tag} failed: {e}");
                    }
                }
            }
        }
        let mut w = wl.lock().expect("workload");
        if in_flight == 0 && batch.is_empty() && next >= total {
            w.done = true;
            println!("{}", w.summary(me));
            return;
        }
        if in_flight == 0 && h.status().role != Role::Leader {
            // Lost leadership mid-workload: report what we have.
            w.done = true;
            println!("{} (leadership lost)", w.summary(me));
            return;
        }
    }
}

/// What the replica thread does between steps: reports leadership changes, reconnects
/// broken data QPs with back-off, and writes the state files every ~200 ms.
fn between_steps(
    me: NodeId,
    others: Vec<(NodeId, SocketAddr)>,
    state_dir: PathBuf,
    wl: Arc<Mutex<Workload>>,
) -> impl FnMut(&mut Replica<RdmaFabric, Machine>) -> bool + Send + 'static {
    let start = Instant::now();
    let mut last_role = (String::new(), String::new());
    let mut last_dump = Instant::now() - Duration::from_secs(1);
    let mut dumped_applied = usize::MAX;
    let mut dumped_status = String::new();
    // peer -> (next attempt, back-off)
    let mut reconnect: HashMap<NodeId, (Instant, Duration)> = HashMap::new();
    move |rep| {
        let now_ticks = start.elapsed().as_millis() as u64;
        let mut busy = false;

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

        // Reconnect broken data QPs, with back-off.
        for &(p, _) in &others {
            if rep.fabric().data_error(p).is_some() {
                let now = Instant::now();
                let e = reconnect
                    .entry(p)
                    .or_insert((now, Duration::from_millis(20)));
                if now >= e.0 {
                    busy = true;
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
            let w = wl.lock().expect("workload");
            let status = format!(
                "node={me} role={} ballot={} commit={} applied={} leader={} workload={} commits={} failed={} p50_us={} p99_us={}\n",
                c.role_name(),
                c.promised(),
                c.commit(),
                c.applied(),
                c.leader_hint().map(|l| l.to_string()).unwrap_or("-".into()),
                if w.done { "done" } else if w.started.is_some() { "running" } else { "idle" },
                w.commits,
                w.failed,
                w.hist.value_at_quantile(0.5),
                w.hist.value_at_quantile(0.99),
            );
            drop(w);
            if status != dumped_status {
                write_atomic(&state_dir, &format!("status.{me}"), &status);
                dumped_status = status;
            }
            let m = rep.state_machine();
            if m.applied.len() != dumped_applied {
                dumped_applied = m.applied.len();
                let (d, list) = digest(m);
                write_atomic(&state_dir, &format!("applied.{me}"), &list);
                write_atomic(&state_dir, &format!("digest.{me}"), &d);
            }
        }
        busy
    }
}
