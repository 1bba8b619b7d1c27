//! The replica process: the client listener and the fabric (TCP or RDMA) around
//! [`ballot::node::NodeBuilder`], which owns the start-up logic (data dir checks, boot
//! marker, durable open, checkpoints, rejoin, runtime).

use crate::config::{FabricChoice, LogFormat, NodeConfig};
use crate::error::NodeError;
use crate::frontend::{self, Serving};
use crate::kv::{DigestCell, KvMachine};
use crate::metrics::{Endpoint, Sources};
use ballot::layout::RingGeometry;
use ballot::node::{Boot, FabricSetup, NodeBuilder, StartError, Wording};
use ballot::region::Region;
use ballot::runtime::{Handle, IdleStrategy, RuntimeConfig};
use ballot_tcp::{TcpConfig, TcpFabric};
use ballot_verbs::{RdmaConfig, RdmaFabric};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the boot marker in the data directory.
pub const MARKER: &str = ballot::node::BOOT_MARKER;
/// Marker of a rejoin that has not finished (durable mode, kept by the persister): while it
/// exists, every start discards the durable state and recovers from a majority again. The
/// replica removes it once the rebuilt promise and log are durable.
pub use ballot::node::REJOIN_MARKER;
/// Subdirectory of the data dir holding the checkpoints.
pub const CHECKPOINT_DIR: &str = ballot::node::CHECKPOINT_DIR;
/// How long the node waits for a command to apply before answering `Unavailable`.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The ring: 8 MiB, so that an entry can carry a 1 MiB value (and a CAS's two).
pub fn ring() -> RingGeometry {
    RingGeometry::new(1 << 16, 128).expect("valid geometry")
}

/// How `ballot-node`'s messages name the settings they ask for: its flags.
pub fn wording() -> Wording {
    Wording {
        new: "--initial-cluster-state new".into(),
        existing: "--initial-cluster-state existing".into(),
        durable: "--durability durable".into(),
        volatile: "--durability volatile".into(),
    }
}

fn bind_retry(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                return Err(StartError::io(
                    format!("cannot listen for {what} on {addr}"),
                    e,
                ))
            }
        }
    }
}

/// A running node.
pub struct Node {
    pub node: ballot::node::Node,
    pub recovering: bool,
    stop: Arc<AtomicBool>,
}

/// Connects the RDMA fabric: `--peers` are the bootstrap addresses (authenticated with the
/// cluster key); a restarted node (`restarted`) dials every peer so they replace its QPs.
fn rdma_fabric(
    cfg: &NodeConfig,
    device: &Option<String>,
    gid_index: Option<u32>,
    restarted: bool,
    region: Arc<Region>,
) -> Result<RdmaFabric, StartError> {
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
    rc.rejoin = restarted;
    rc.auto_reconnect = true;
    // The default staging (8 MiB per peer) holds the largest write: one entry, at most
    // half the 8 MiB ring.
    let f = RdmaFabric::connect(&rc, region).map_err(|source| StartError::Fabric {
        what: "rdma fabric",
        source,
    })?;
    tracing::info!(
        device = f.device(),
        gid_index = f.gid_index(),
        mtu = f.mtu_bytes(),
        "rdma fabric connected"
    );
    Ok(f)
}

/// How the replica reports notices (a flag ignored, a torn tail cut, a rejoin): on
/// stderr as `ballot-node: …` lines, or as log events when the logs are JSON lines (so
/// that every line of stderr is JSON).
fn notice(format: LogFormat, m: &str) {
    match format {
        LogFormat::Text => eprintln!("ballot-node: {m}"),
        LogFormat::Json => tracing::warn!(notice = true, "{m}"),
    }
}

impl Node {
    /// Starts the replica: binds the client port, then hands over to the engine's
    /// [`NodeBuilder`] (which binds the fabric before it writes anything to the data dir),
    /// then serves clients.
    pub fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let listen = cfg.peers[&cfg.node];
        // Listeners first: a start that fails on a busy port leaves the data dir untouched.
        let client_listener = bind_retry(cfg.client_addr, "clients")?;
        let endpoint = match cfg.metrics_addr {
            Some(a) => Some(Endpoint::new(bind_retry(a, "metrics")?)?),
            None => None,
        };
        let log_format = cfg.log.format;
        let digest = Arc::new(DigestCell::default());
        let cell = digest.clone();
        let state = digest.clone();
        let members: Vec<u8> = cfg.peers.keys().copied().collect();
        let builder = NodeBuilder::new(cfg.node, cfg.cluster, members, &cfg.data_dir, move || {
            KvMachine::with_digest_cell(cell.clone())
        })
        .durable(cfg.durable)
        .segment_bytes(cfg.segment_bytes)
        .initial_cluster_state(cfg.initial_cluster_state)
        .ring(ring())
        .batch_bytes(crate::kv::MAX_COMMAND + 64)
        .heartbeat_timeout(cfg.heartbeat_timeout)
        .election_timeout(cfg.election_timeout)
        .checkpoints(cfg.checkpoint)
        .runtime(RuntimeConfig {
            idle: IdleStrategy::for_core(cfg.core),
            name: format!("replica-{}", cfg.node),
            ..RuntimeConfig::default()
        })
        .wording(wording())
        .notices(move |m| notice(log_format, m));
        let mut fabric_stats = None;
        let node = match &cfg.fabric {
            FabricChoice::Tcp => builder.start(|s: FabricSetup| {
                let fabric_listener = bind_retry(listen, "the fabric")?;
                let tcp = TcpConfig::new(
                    cfg.node,
                    cfg.cluster,
                    cfg.key.clone(),
                    listen,
                    cfg.peers.clone(),
                    s.region,
                );
                let f = TcpFabric::start_with_listener(tcp, fabric_listener)
                    .map_err(|e| StartError::io("fabric", e))?;
                fabric_stats = Some(f.stats_reader());
                Ok(f)
            })?,
            FabricChoice::Rdma { device, gid_index } => builder.start(|s: FabricSetup| {
                rdma_fabric(&cfg, device, *gid_index, s.restarted, s.region)
            })?,
        };
        let boot = node.boot();
        if cfg.rejoin && boot != Boot::Rejoin {
            tracing::warn!("--rejoin ignored: the data dir holds this replica's state");
            if log_format == LogFormat::Text {
                notice(
                    log_format,
                    &format!(
                        "--rejoin ignored: {} holds this replica's state",
                        cfg.data_dir.display()
                    ),
                );
            }
        }
        let recovering = boot != Boot::Fresh;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(AtomicU64::new(0));
        let serving = Serving {
            handle: node.handle(),
            peers: Arc::new(cfg.client_peers.clone()),
            digest,
            clients: clients.clone(),
            limits: cfg.client_limits,
        };
        raise_fd_limit(cfg.client_limits.max_connections);
        frontend::start(client_listener, serving, stop.clone())
            .map_err(|e| NodeError::io("cannot start the client port", e))?;
        let metrics_addr = endpoint.as_ref().map(Endpoint::addr);
        if let Some(ep) = endpoint {
            let sources = Sources {
                handle: node.handle(),
                fabric: fabric_stats,
                peers: cfg
                    .peers
                    .keys()
                    .copied()
                    .filter(|&p| p != cfg.node)
                    .collect(),
                durable: cfg.durable,
                clients,
                state,
            };
            ep.serve(sources, stop.clone())?;
        }
        tracing::info!(
            node = cfg.node,
            boot = ?boot,
            durable = cfg.durable,
            fabric = %listen,
            kind = if matches!(cfg.fabric, FabricChoice::Tcp) { "tcp" } else { "rdma" },
            clients = %cfg.client_addr,
            metrics = %metrics_addr.map_or("off".to_string(), |a| a.to_string()),
            "ballot-node started"
        );
        Ok(Node {
            node,
            recovering,
            stop,
        })
    }

    pub fn handle(&self) -> Handle {
        self.node.handle()
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        self.node.shutdown();
    }
}

/// Raises the soft limit of open files to the hard one if the connection limit needs more
/// than it allows (with room for the data dir, the fabric and the metrics); warns if even
/// the hard limit is too low.
fn raise_fd_limit(max_connections: usize) {
    let want = (max_connections + 256) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want {
            return;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = want.min(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            lim.rlim_cur = old;
        }
    }
    if lim.rlim_cur < want {
        tracing::warn!(
            open_files = lim.rlim_cur,
            max_connections,
            "the open-file limit is below --client-max-connections (+256): connections past \
             it are refused by the kernel, not answered; raise `ulimit -n`"
        );
    }
}
