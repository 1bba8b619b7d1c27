//! The replica process: boot marker, fabric (TCP or RDMA), replica runtime, and the client
//! listener.

use crate::config::{FabricChoice, NodeConfig};
use crate::kv::{Command, KvMachine};
use crate::wire::{self, NodeStatus, Request, Response};
use ballot::driver::{Replica, Storage};
use ballot::layout::{RegionInfo, RingGeometry};
use ballot::protocol::{Config, Core, Durability, ProposeError};
use ballot::region::Region;
use ballot::runtime::{Handle, Runtime, RuntimeConfig};
use ballot::storage::{Persister, PersisterOptions};
use ballot_tcp::{TcpConfig, TcpFabric};
use ballot_verbs::{RdmaConfig, RdmaFabric};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the boot marker in the data directory.
pub const MARKER: &str = "ballot-node.boot";
/// How long the node waits for a command to apply before answering `Unavailable`.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The ring: 8 MiB, so that an entry can carry a 1 MiB value (and a CAS's two).
pub fn ring() -> RingGeometry {
    RingGeometry::new(1 << 16, 128).expect("valid geometry")
}

/// Reads or creates the boot marker; `Ok(true)` when this is a restart.
pub fn boot_marker(dir: &Path, cluster: u64, node: u8) -> Result<bool, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    let path = dir.join(MARKER);
    let want = format!("cluster={cluster:#x} node={node}\n");
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(true),
        Ok(have) => Err(format!(
            "data dir {} belongs to another replica ({}), not cluster={cluster:#x} node={node}",
            dir.display(),
            have.trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = dir.join(format!("{MARKER}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(want.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write().map_err(|e| format!("cannot write boot marker {}: {e}", path.display()))?;
            Ok(false)
        }
        Err(e) => Err(format!("cannot read boot marker {}: {e}", path.display())),
    }
}

/// Durable mode: recovers the promise and the log from the data dir (torn tail cut and
/// reported; corruption refused, naming file and offset) and rebuilds the core from them.
fn open_durable(cfg: &NodeConfig, pc: Config, restart: bool) -> Result<(Core, Persister), String> {
    let dir = &cfg.data_dir;
    if restart && !dir.join("promise").exists() {
        return Err(format!(
            "data dir {} has a boot marker but no durable state (was it run in volatile \
             mode?): refusing to start a durable replica that may have forgotten promises",
            dir.display()
        ));
    }
    let (p, rec) = Persister::open(dir, PersisterOptions::default()).map_err(|e| {
        format!(
            "cannot recover the durable state in {}: {e}; refusing to start",
            dir.display()
        )
    })?;
    if let Some(t) = &rec.log.torn_tail {
        tracing::warn!(
            file = %t.file.display(),
            offset = t.offset,
            discarded_bytes = t.discarded_bytes,
            reason = %t.reason,
            "recovery: torn tail truncated (an append interrupted by a crash)"
        );
        eprintln!(
            "ballot-node: recovery: torn tail truncated in {} at offset {} ({} bytes discarded: {})",
            t.file.display(),
            t.offset,
            t.discarded_bytes,
            t.reason
        );
    }
    tracing::info!(
        promised = %rec.promised,
        entries = rec.entries.len(),
        rewrite_replayed = ?rec.rewrite_replayed,
        rewrite_discarded = rec.rewrite_discarded,
        "recovered durable state"
    );
    if let Some(first) = rec.first_index.filter(|&f| f != 1) {
        return Err(format!(
            "the durable log in {} starts at index {first} and no checkpoint covers the \
             entries before it; refusing to start",
            dir.display()
        ));
    }
    let core = Core::restore(pc, rec.promised, 0, rec.entries)
        .map_err(|e| format!("bad configuration: {e}"))?;
    Ok((core, p))
}

fn bind_retry(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("cannot listen for {what} on {addr}: {e}")),
        }
    }
}

/// The replica thread, on whichever fabric.
pub enum NodeRuntime {
    Tcp(Runtime<TcpFabric, KvMachine>),
    Rdma(Runtime<RdmaFabric, KvMachine>),
}

impl NodeRuntime {
    pub fn handle(&self) -> Handle {
        match self {
            NodeRuntime::Tcp(r) => r.handle(),
            NodeRuntime::Rdma(r) => r.handle(),
        }
    }
    pub fn shutdown(self) {
        match self {
            NodeRuntime::Tcp(r) => {
                r.shutdown();
            }
            NodeRuntime::Rdma(r) => {
                r.shutdown();
            }
        }
    }
}

/// A running node.
pub struct Node {
    pub runtime: NodeRuntime,
    pub recovering: bool,
    stop: Arc<AtomicBool>,
}

/// Connects the RDMA fabric: `--peers` are the bootstrap addresses (authenticated with the
/// cluster key); a restarted node (`recovering`) dials every peer so they replace its QPs.
fn rdma_fabric(
    cfg: &NodeConfig,
    device: &Option<String>,
    gid_index: Option<u32>,
    recovering: bool,
    region: Arc<Region>,
) -> Result<RdmaFabric, String> {
    let listen = cfg.peers[&cfg.node];
    let others = cfg
        .peers
        .iter()
        .filter(|(id, _)| **id != cfg.node)
        .map(|(id, a)| (*id, *a))
        .collect();
    let mut rc = RdmaConfig::new(cfg.node, listen, others);
    rc.cluster = cfg.cluster;
    rc.key = cfg.key.clone();
    rc.device = device.clone();
    rc.gid_index = gid_index;
    rc.rejoin = recovering;
    rc.auto_reconnect = true;
    // The default staging (8 MiB per peer) holds the largest write: one entry, at most
    // half the 8 MiB ring.
    let f = RdmaFabric::connect(&rc, region).map_err(|e| format!("rdma fabric: {e}"))?;
    tracing::info!(
        device = f.device(),
        gid_index = f.gid_index(),
        mtu = f.mtu_bytes(),
        "rdma fabric connected"
    );
    Ok(f)
}

impl Node {
    pub fn start(cfg: NodeConfig) -> Result<Node, String> {
        let recovering = boot_marker(&cfg.data_dir, cfg.cluster, cfg.node)?;
        let ring = ring();
        let region = Region::anonymous(RegionInfo {
            cluster: cfg.cluster,
            node: cfg.node,
            ring,
        })
        .map_err(|e| format!("cannot allocate the region: {e}"))?;
        let listen = cfg.peers[&cfg.node];
        let region = Arc::new(region);
        let members: Vec<u8> = cfg.peers.keys().copied().collect();
        let mut pc = Config::new(cfg.node, members, ring);
        pc.batch_bytes = crate::kv::MAX_COMMAND + 64;
        pc.heartbeat_timeout = cfg.heartbeat_timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        pc.election_timeout = cfg.election_timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        let (core, storage) = if cfg.durable {
            pc.durability = Durability::Durable;
            let (core, p) = open_durable(&cfg, pc, recovering)?;
            (core, Some(Box::new(p) as Box<dyn Storage>))
        } else {
            let core = Core::new(pc, recovering).map_err(|e| format!("bad configuration: {e}"))?;
            (core, None)
        };
        let rc = RuntimeConfig {
            core: cfg.core,
            name: format!("replica-{}", cfg.node),
            ..RuntimeConfig::default()
        };
        let start = |e: std::io::Error| format!("cannot start the replica thread: {e}");
        let runtime = match &cfg.fabric {
            FabricChoice::Tcp => {
                let fabric_listener = bind_retry(listen, "the fabric")?;
                let tcp = TcpConfig::new(
                    cfg.node,
                    cfg.cluster,
                    cfg.key.clone(),
                    listen,
                    cfg.peers.clone(),
                    region,
                );
                let fabric = TcpFabric::start_with_listener(tcp, fabric_listener)
                    .map_err(|e| format!("fabric: {e}"))?;
                let replica = Replica::new(core, fabric, KvMachine::default(), storage);
                NodeRuntime::Tcp(Runtime::start(replica, rc).map_err(start)?)
            }
            FabricChoice::Rdma { device, gid_index } => {
                let fabric = rdma_fabric(&cfg, device, *gid_index, recovering, region)?;
                let replica = Replica::new(core, fabric, KvMachine::default(), storage);
                NodeRuntime::Rdma(Runtime::start(replica, rc).map_err(start)?)
            }
        };
        let client_listener = bind_retry(cfg.client_addr, "clients")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st, peers) = (
            runtime.handle(),
            stop.clone(),
            Arc::new(cfg.client_peers.clone()),
        );
        std::thread::Builder::new()
            .name("client-accept".into())
            .spawn(move || accept_loop(client_listener, h, peers, st))
            .map_err(|e| format!("cannot start the client listener: {e}"))?;
        tracing::info!(
            node = cfg.node,
            recovering,
            durable = cfg.durable,
            fabric = %listen,
            kind = if matches!(cfg.fabric, FabricChoice::Tcp) { "tcp" } else { "rdma" },
            clients = %cfg.client_addr,
            "ballot-node started"
        );
        Ok(Node {
            runtime,
            recovering,
            stop,
        })
    }

    pub fn handle(&self) -> Handle {
        self.runtime.handle()
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        self.runtime.shutdown();
    }
}

fn accept_loop(
    l: TcpListener,
    h: Handle,
    peers: Arc<std::collections::BTreeMap<u8, String>>,
    stop: Arc<AtomicBool>,
) {
    l.set_nonblocking(true).ok();
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let (h, p) = (h.clone(), peers.clone());
                let _ = std::thread::Builder::new()
                    .name("client-conn".into())
                    .spawn(move || serve(s, h, p));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(mut s: TcpStream, h: Handle, peers: Arc<std::collections::BTreeMap<u8, String>>) {
    s.set_nonblocking(false).ok();
    s.set_nodelay(true).ok();
    loop {
        let body = match wire::read_frame(&mut s) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("client connection: {e}");
                return;
            }
        };
        let resp = match Request::decode(body) {
            Err(e) => Response::Error(format!("bad request: {e}")),
            Ok(Request::Status) => {
                let st = h.status();
                Response::Ok(
                    NodeStatus {
                        node: st.node,
                        role: st.role.name().to_string(),
                        ballot: st.ballot,
                        ballot_round: st.ballot >> 8,
                        commit: st.commit,
                        applied: st.applied,
                        leader: st.leader_hint,
                    }
                    .encode(),
                )
            }
            Ok(Request::Command(cmd)) => match Command::decode(&cmd) {
                Err(e) => Response::Error(format!("bad command: {e}")),
                Ok(_) => match h.propose(cmd, PROPOSE_TIMEOUT) {
                    Ok(out) => Response::Ok(out),
                    Err(ProposeError::NotLeader { leader }) => Response::NotLeader {
                        leader,
                        addr: leader.and_then(|l| peers.get(&l).cloned()),
                    },
                    Err(e @ ProposeError::TooLarge { .. }) => Response::Error(e.to_string()),
                    // Stopping, or its disk failed: send the client elsewhere (it retries
                    // with the same sequence number, so this is safe even if the command
                    // was proposed here).
                    Err(ProposeError::ShuttingDown) => Response::NotLeader {
                        leader: None,
                        addr: None,
                    },
                    Err(ProposeError::Indeterminate) => Response::Unavailable(
                        "outcome unknown; retry with the same sequence number".into(),
                    ),
                    Err(e) => Response::Unavailable(e.to_string()),
                },
            },
        };
        if let Err(e) = wire::write_frame(&mut s, &resp.encode()) {
            tracing::debug!("client connection: {e}");
            return;
        }
    }
}
