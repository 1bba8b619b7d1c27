//! Embedding Ballot across processes: one replica of a replicated ledger (a state machine of
//! its own, not the key-value store) per process, over the TCP fabric (`ballot-tcp`),
//! durable, started with [`ballot::node::NodeBuilder`]. Three of these make a cluster;
//! `engine/tests/ledger_cluster.rs` runs three, kills the leader with SIGKILL, restarts it
//! and compares the replicas' states.
//!
//! ```text
//! cargo build --release -p ballot --example ledger_cluster
//! target/release/examples/ledger_cluster --id 0 --dir /tmp/ledger0 --new   # one per terminal,
//! target/release/examples/ledger_cluster --id 1 --dir /tmp/ledger1 --new   # ids 0, 1 and 2
//! target/release/examples/ledger_cluster --id 2 --dir /tmp/ledger2 --new
//! ```
//!
//! Arguments: `--id N` (0..=2), `--dir DIR` (the data dir), `--listen HOST:PORT` (the fabric
//! address; default `127.0.0.1:0`, an ephemeral port), `--new` on the cluster's first
//! start only (a restart reads its data dir and needs nothing).
//!
//! The replica is driven by lines on its standard input, and answers one line each on its
//! standard output (logs go to standard error):
//!
//! - first it prints `listening ADDR` (its fabric listener is bound) and waits for
//!   `peers 0=ADDR,1=ADDR,2=ADDR`, every replica's fabric address; then it starts and
//!   prints `started BOOT` (`Fresh` or `Restart`);
//! - `propose COMMAND` proposes a ledger command (`open NAME AMOUNT`, `move FROM TO
//!   AMOUNT`, `read NAME`) and prints `ok OUTPUT`, `not-leader HINT` (a node id or `-`),
//!   `indeterminate` (leadership lost meanwhile: it may or may not apply) or `error WHY`;
//! - `state` prints `state ROLE LEADER COMMIT INDEX DIGEST TOTAL`: the role, the leader it
//!   believes in (or `-`), the commit index, the log index the ledger's state reflects, the
//!   state's digest (hex) and the sum of all balances;
//! - `quit`, or the end of its input, stops the replica.

use ballot::checkpoint::CheckpointPolicy;
use ballot::node::{InitialClusterState, NodeBuilder, StartError};
use ballot::protocol::ProposeError;
use ballot_tcp::{TcpConfig, TcpFabric};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "common/ledger.rs"]
mod ledger;
use ledger::{Ledger, Published};

const CLUSTER: u64 = 0x1ED6;
const MEMBERS: [u8; 3] = [0, 1, 2];
/// The cluster key authenticating fabric peers. A real deployment reads a secret.
const KEY: &[u8] = b"ledger example cluster key";

struct Args {
    id: u8,
    dir: PathBuf,
    listen: SocketAddr,
    new: bool,
}

fn args() -> Result<Args, String> {
    let mut id = None;
    let mut dir = None;
    let mut listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut new = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--id" => id = Some(value()?.parse::<u8>().map_err(|e| format!("--id: {e}"))?),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--new" => new = true,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let id = id.ok_or("--id is required")?;
    if !MEMBERS.contains(&id) {
        return Err(format!("--id {id}: the cluster is nodes {MEMBERS:?}"));
    }
    Ok(Args {
        id,
        dir: dir.ok_or("--dir is required")?,
        listen,
        new,
    })
}

/// Parses `peers 0=ADDR,1=ADDR,2=ADDR`.
fn peers(line: &str) -> Result<BTreeMap<u8, SocketAddr>, String> {
    let list = line
        .strip_prefix("peers ")
        .ok_or(format!("expected `peers ...`, got {line:?}"))?;
    let mut out = BTreeMap::new();
    for p in list.trim().split(',') {
        let (id, addr) = p.split_once('=').ok_or(format!("bad peer {p:?}"))?;
        let id: u8 = id.parse().map_err(|e| format!("peer id {id:?}: {e}"))?;
        out.insert(id, addr.parse().map_err(|e| format!("{addr:?}: {e}"))?);
    }
    if out.keys().copied().ne(MEMBERS) {
        return Err(format!("expected peers {MEMBERS:?}, got {:?}", out.keys()));
    }
    Ok(out)
}

fn main() {
    tracing_init();
    if let Err(e) = run() {
        eprintln!("ledger_cluster: {e}");
        std::process::exit(1);
    }
}

/// Logs at WARN and above to standard error (standard output carries the answers).
fn tracing_init() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .init();
}

fn run() -> Result<(), String> {
    let args = args()?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))
    };

    // The fabric's listener first, so that the address can be shared before the start.
    let listener = TcpListener::bind(args.listen).map_err(|e| format!("{}: {e}", args.listen))?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    say(format!("listening {listen}"))?;
    let line = match input.next() {
        Some(l) => l.map_err(|e| format!("stdin: {e}"))?,
        None => return Ok(()),
    };
    let peers = peers(&line)?;

    let published = Arc::new(Mutex::new(Published::default()));
    let cell = published.clone();
    let id = args.id;
    let node = NodeBuilder::new(id, CLUSTER, MEMBERS.to_vec(), &args.dir, move || {
        Ledger::publishing(cell.clone())
    })
    .durable(true)
    .initial_cluster_state(args.new.then_some(InitialClusterState::New))
    // Checkpoints every 4 KiB of log: a replica that was down catches up through one.
    .checkpoints(CheckpointPolicy {
        every_bytes: 4096,
        ..CheckpointPolicy::default()
    })
    .notices(move |m| eprintln!("replica {id}: {m}"))
    .start(|setup| {
        let tcp = TcpConfig::new(id, CLUSTER, KEY, listen, peers.clone(), setup.region);
        TcpFabric::start_with_listener(tcp, listener).map_err(|e| StartError::io("fabric", e))
    })
    .map_err(|e| e.to_string())?;
    say(format!("started {:?}", node.boot()))?;
    let handle = node.handle();

    for line in input {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let line = line.trim();
        let answer = if let Some(cmd) = line.strip_prefix("propose ") {
            match handle.propose(cmd.as_bytes().to_vec(), Duration::from_secs(2)) {
                Ok(o) => format!("ok {}", String::from_utf8_lossy(&o)),
                Err(ProposeError::NotLeader { leader }) => {
                    format!(
                        "not-leader {}",
                        leader.map_or("-".into(), |l| l.to_string())
                    )
                }
                Err(ProposeError::Indeterminate) => "indeterminate".into(),
                Err(e) => format!("error {e}"),
            }
        } else if line == "state" {
            let st = handle.status();
            let p = *published.lock().unwrap();
            format!(
                "state {} {} {} {} {:016x} {}",
                st.role.name(),
                st.leader_hint.map_or("-".into(), |l| l.to_string()),
                st.commit,
                p.index,
                p.digest,
                p.total
            )
        } else if line == "quit" {
            break;
        } else {
            format!("error unknown request {line:?}")
        };
        say(answer)?;
    }
    node.shutdown();
    Ok(())
}
