//! Building in-process endpoints of each fabric.

use ballot::layout::{RegionInfo, RingGeometry};
use ballot::mem_fabric::{MemFabric, MemNet};
use ballot::region::Region;
use ballot::NodeId;
use ballot_tcp::{TcpConfig, TcpFabric};
use ballot_verbs::{RdmaConfig, RdmaFabric};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

pub const CLUSTER: u64 = 0xBA11_07BE_4C40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FabricKind {
    Mem,
    Tcp,
    Rdma,
}

impl FabricKind {
    pub fn name(self) -> &'static str {
        match self {
            FabricKind::Mem => "mem",
            FabricKind::Tcp => "tcp",
            FabricKind::Rdma => "rdma",
        }
    }
}

/// Which RDMA device, port and GID the rdma fabric uses (perftest's `-d`, `-i`, `-x`).
#[derive(clap::Args, Debug, Clone, Default, serde::Serialize)]
pub struct RdmaOpts {
    /// RDMA device name (`ibv_devices`); default: the first device. Naming one selects the
    /// rdma fabric when `--fabric` is not given; a missing device is an error.
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,
    /// GID index (`show_gids`); default: the first IPv4-mapped (RoCE v2) GID of the port.
    #[arg(long, value_name = "N")]
    pub gid_index: Option<u32>,
    /// Port of the device.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ib_port: u8,
}

impl RdmaOpts {
    /// Sets the device, GID index and port of `cfg`.
    pub fn apply(&self, cfg: &mut RdmaConfig) {
        cfg.device = self.rdma_device.clone();
        cfg.gid_index = self.gid_index;
        cfg.path.port = self.ib_port;
    }

    /// The fabric to use when `--fabric` is not given: rdma if a device was named (and it
    /// must then exist), else the best available.
    pub fn pick(&self, f: Option<FabricKind>) -> FabricKind {
        if let Some(k) = f {
            return k;
        }
        if self.rdma_device.is_some() {
            return FabricKind::Rdma;
        }
        let (k, why) = best();
        if let Some(why) = why {
            eprintln!("rdma unavailable ({why}); using {}", k.name());
        }
        k
    }
}

/// Whether an RDMA device is present; `Err` says why not.
pub fn rdma_available() -> Result<String, String> {
    match ballot_verbs::verbs::device_names() {
        Ok(names) if !names.is_empty() => Ok(names.join(",")),
        Ok(_) => Err("no RDMA device".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The fastest fabric available here: RDMA if a device is found, else TCP.
pub fn best() -> (FabricKind, Option<String>) {
    match rdma_available() {
        Ok(_) => (FabricKind::Rdma, None),
        Err(why) => (FabricKind::Tcp, Some(why)),
    }
}

/// A ring large enough for entries carrying `batch_bytes` of commands.
pub fn geometry(batch_bytes: usize) -> RingGeometry {
    const SLOT: u32 = 128;
    let entry = ballot::layout::entry_size(batch_bytes);
    // max_payload() is half the ring; leave room for the whole window of small entries too.
    let need = (entry * 4).div_ceil(SLOT as usize).next_power_of_two();
    let slots = need.max(1 << 16) as u32;
    RingGeometry::new(slots, SLOT).expect("valid geometry")
}

pub fn regions(n: usize, ring: RingGeometry) -> Vec<Arc<Region>> {
    (0..n).map(|i| region(i as NodeId, ring)).collect()
}

/// Node `node`'s region of a bench cluster.
pub fn region(node: NodeId, ring: RingGeometry) -> Arc<Region> {
    let info = RegionInfo {
        cluster: CLUSTER,
        node,
        ring,
    };
    Arc::new(Region::anonymous(info).expect("anonymous mapping"))
}

pub fn mem(regions: Vec<Arc<Region>>) -> Vec<MemFabric> {
    let net = MemNet::instant();
    regions
        .into_iter()
        .enumerate()
        .map(|(i, r)| net.attach(i as NodeId, r))
        .collect()
}

/// The cluster key of the bench's fabrics: `BALLOT_CLUSTER_KEY` if set (the two hosts of
/// `raw --server`/`--connect` must agree), else a fixed one.
pub fn key() -> Vec<u8> {
    match std::env::var(ballot_node::config::KEY_ENV) {
        Ok(k) if !k.is_empty() => k.into_bytes(),
        _ => b"ballot-bench in-process cluster".to_vec(),
    }
}

pub fn tcp(regions: Vec<Arc<Region>>) -> Result<Vec<TcpFabric>, String> {
    let key = key();
    let listeners: Vec<TcpListener> = (0..regions.len())
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("binding 127.0.0.1: {e}"))?;
    let peers: BTreeMap<NodeId, SocketAddr> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as NodeId, l.local_addr().expect("bound")))
        .collect();
    let nodes: Vec<TcpFabric> = listeners
        .into_iter()
        .zip(regions)
        .enumerate()
        .map(|(i, (l, region))| {
            let node = i as NodeId;
            let cfg = TcpConfig::new(
                node,
                CLUSTER,
                key.clone(),
                peers[&node],
                peers.clone(),
                region,
            );
            TcpFabric::start_with_listener(cfg, l).map_err(|e| format!("tcp node {node}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for n in &nodes {
        if !n.wait_connected(Duration::from_secs(10)) {
            return Err("tcp fabric: peers did not connect within 10 s".into());
        }
    }
    Ok(nodes)
}

/// Starts node `node` of a cluster built by [`tcp`] again (after its fabric was dropped), on
/// its old address; retries the bind for a while (the old listener may still be closing).
pub fn tcp_restart(
    node: NodeId,
    peers: BTreeMap<NodeId, SocketAddr>,
    region: Arc<Region>,
) -> Result<TcpFabric, String> {
    let addr = *peers
        .get(&node)
        .ok_or_else(|| format!("node {node} is not in the address map"))?;
    let cfg = TcpConfig::new(node, CLUSTER, key(), addr, peers, region);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpFabric::start(cfg.clone()) {
            Ok(f) => return Ok(f),
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("  tcp node {node}: restart on {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("tcp node {node}: restart on {addr}: {e}")),
        }
    }
}

/// Connects `regions.len()` RDMA endpoints in this process (one bootstrap thread each,
/// since `connect` blocks until every peer is connected).
pub fn rdma(regions: Vec<Arc<Region>>, opts: &RdmaOpts) -> Result<Vec<RdmaFabric>, String> {
    let n = regions.len();
    let ports: Vec<SocketAddr> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("reserving a bootstrap port: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let handles: Vec<_> = regions
        .into_iter()
        .enumerate()
        .map(|(i, region)| {
            let peers = (0..n)
                .filter(|&j| j != i)
                .map(|j| (j as NodeId, ports[j]))
                .collect();
            let cfg = rdma_config(i as NodeId, ports[i], peers, opts);
            std::thread::spawn(move || RdmaFabric::connect(&cfg, region))
        })
        .collect();
    let mut out = Vec::new();
    let mut err = None;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().expect("rdma connect thread") {
            Ok(f) => out.push(f),
            Err(e) => {
                err.get_or_insert(format!("rdma node {i}: {e}"));
            }
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The configuration of RDMA endpoint `node` of a bench cluster.
pub fn rdma_config(
    node: NodeId,
    listen: SocketAddr,
    peers: Vec<(NodeId, SocketAddr)>,
    opts: &RdmaOpts,
) -> RdmaConfig {
    let mut cfg = RdmaConfig::new(node, listen, peers);
    cfg.cluster = CLUSTER;
    cfg.key = key();
    cfg.connect_timeout = Duration::from_secs(20);
    opts.apply(&mut cfg);
    cfg
}

/// Sleeps of tens of microseconds are only that short with a small timer slack (the
/// runtime's [`IdleStrategy::Shared`](ballot::runtime::IdleStrategy) does this for its
/// threads).
pub use ballot::runtime::tighten_timer_slack;
