//! `ballot-node` configuration: a TOML file and/or flags (flags win), validated into a
//! [`NodeConfig`]. Every mistake is a clear error, never a panic.

use crate::error::NodeError;
use crate::frontend::ClientLimits;
use ballot::checkpoint::CheckpointPolicy;
use ballot::node::InitialClusterState;
use clap::Parser;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable that may hold the cluster key (instead of `--key-file`).
pub const KEY_ENV: &str = "BALLOT_CLUSTER_KEY";

#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "ballot-node",
    version = ballot::version::VERSION,
    about = "One replica of a Ballot replicated key-value cluster"
)]
pub struct Flags {
    /// TOML configuration file (flags override its values).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// This replica's id (0..15).
    #[arg(long)]
    pub node: Option<u8>,
    /// Cluster id (shared by all replicas; decimal or 0x-hex).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Fabric address of every replica, this one included: `id=host:port`, comma-separated
    /// or repeated.
    #[arg(long = "peers", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Where this replica serves clients (`host:port`).
    #[arg(long)]
    pub client_addr: Option<String>,
    /// Client addresses of the replicas, `id=host:port` (for redirecting clients to the leader).
    #[arg(long = "client-peers", value_delimiter = ',')]
    pub client_peers: Vec<String>,
    /// `tcp` (default) or `rdma` (libibverbs; `--peers` are then the RDMA bootstrap
    /// addresses, authenticated with the cluster key).
    #[arg(long)]
    pub fabric: Option<String>,
    /// RDMA device name (default: the first one), with `--fabric rdma`.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RDMA GID index (default: the port's first IPv4-mapped GID), with `--fabric rdma`.
    #[arg(long)]
    pub rdma_gid_index: Option<u32>,
    /// Data directory (holds the boot marker that tells a restart from a first boot).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// `volatile` (default: log in memory, a majority must stay up) or `durable` (log and
    /// promises on disk in the data directory, fsynced before acknowledging).
    #[arg(long)]
    pub durability: Option<String>,
    /// File holding the cluster key (or set BALLOT_CLUSTER_KEY).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Pin the replication thread to this core and busy-poll.
    #[arg(long)]
    pub core: Option<usize>,
    /// Milliseconds without leader heartbeat before a follower suspects the leader.
    #[arg(long)]
    pub heartbeat_timeout_ms: Option<u32>,
    /// Milliseconds a candidate waits for promises.
    #[arg(long)]
    pub election_timeout_ms: Option<u32>,
    /// Take a checkpoint after this many bytes of applied commands (bytes, or with a K, M
    /// or G suffix, powers of 1024; default 64M; 0: only on request). The log is compacted
    /// behind the oldest checkpoint kept.
    #[arg(long, value_name = "BYTES")]
    pub checkpoint_every: Option<String>,
    /// Checkpoints kept (default 2, at least 1).
    #[arg(long, value_name = "N")]
    pub checkpoints_keep: Option<u64>,
    /// Bandwidth this node spends serving checkpoints to replicas catching up, in bytes per
    /// second (K, M, G suffixes allowed; default 64M).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub catchup_rate: Option<String>,
    /// Durable mode: size of a log segment file (default 64M, at least 4K). The log is
    /// truncated behind checkpoints by whole segments.
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<String>,
    /// What this start is when the data dir holds no state of this replica (missing, empty
    /// or wiped): `new` (the cluster's first start: a fresh voter) or `existing` (a member
    /// whose data was lost: it rebuilds from a majority before it votes or acknowledges).
    /// Without it such a start is refused. Ignored when the data dir holds this replica's
    /// state. Flag only. See docs/operations.md.
    #[arg(long, value_name = "new|existing")]
    pub initial_cluster_state: Option<String>,
    /// Same as `--initial-cluster-state existing` (kept for compatibility).
    #[arg(long)]
    pub rejoin: bool,
    /// Serve Prometheus metrics (`/metrics`) and health (`/health`) over HTTP on this
    /// `host:port` (default: not served).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Log level or filter (`error`, `warn`, `info`, `debug`, `trace`, or a filter such as
    /// `info,ballot_tcp=debug`). Default: RUST_LOG if set, else `info`.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// `text` (default; colour only when stderr is a terminal) or `json` (one JSON object
    /// per line).
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
    /// Client connections served at once (default 10000); one more is answered "too many
    /// connections" and closed.
    #[arg(long, value_name = "N")]
    pub client_max_connections: Option<usize>,
    /// Requests in flight per client connection (default 256): at the limit the node
    /// reads no more from it until some are answered.
    #[arg(long, value_name = "N")]
    pub client_max_in_flight: Option<usize>,
    /// Largest client request frame (default 4M; K, M suffixes); a larger one closes the
    /// connection with an error. Commands larger than it cannot be sent.
    #[arg(long, value_name = "BYTES")]
    pub client_max_frame: Option<String>,
    /// Close a client connection idle this long: nothing in flight and nothing received,
    /// or none of its answers taken (default 300000; 0: never).
    #[arg(long, value_name = "MS")]
    pub client_idle_timeout_ms: Option<u64>,
    /// Bytes of answers kept for a client that does not read them (default 16M, at least
    /// 2M); past it the connection is cut.
    #[arg(long, value_name = "BYTES")]
    pub client_max_output: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node: Option<u8>,
    pub cluster: Option<toml::Value>,
    pub peers: Option<Vec<String>>,
    pub client_addr: Option<String>,
    pub client_peers: Option<Vec<String>>,
    pub fabric: Option<String>,
    pub rdma_device: Option<String>,
    pub rdma_gid_index: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub durability: Option<String>,
    pub key_file: Option<PathBuf>,
    pub core: Option<usize>,
    pub heartbeat_timeout_ms: Option<u32>,
    pub election_timeout_ms: Option<u32>,
    pub checkpoint_every: Option<toml::Value>,
    pub checkpoints_keep: Option<toml::Value>,
    pub catchup_rate: Option<toml::Value>,
    pub segment_bytes: Option<toml::Value>,
    pub metrics_addr: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub client_max_connections: Option<usize>,
    pub client_max_in_flight: Option<usize>,
    pub client_max_frame: Option<toml::Value>,
    pub client_idle_timeout_ms: Option<u64>,
    pub client_max_output: Option<toml::Value>,
}

/// Defaults of the checkpoint settings.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 64 << 20;
pub const DEFAULT_CHECKPOINTS_KEEP: usize = 2;
pub const DEFAULT_CATCHUP_RATE: u64 = 64 << 20;
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// The replication fabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricChoice {
    Tcp,
    /// RDMA over libibverbs: device (default: the first) and GID index (default: the first
    /// IPv4-mapped GID).
    Rdma {
        device: Option<String>,
        gid_index: Option<u32>,
    },
}

/// How the replica logs (to stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level or `tracing` filter; `None`: RUST_LOG if set, else `info`.
    pub level: Option<String>,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogConfig {
    /// Installs the global subscriber: stderr, no ANSI colour unless stderr is a terminal.
    pub fn init(&self) {
        use std::io::IsTerminal;
        use tracing_subscriber::EnvFilter;
        let filter = match &self.level {
            Some(l) => EnvFilter::new(l),
            None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        };
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        match self.format {
            LogFormat::Text => b.init(),
            LogFormat::Json => b.json().init(),
        }
    }
}

/// Validates the logging and metrics settings (flags win over the file).
fn observability(
    flags: &Flags,
    file: &FileConfig,
) -> Result<(LogConfig, Option<SocketAddr>), String> {
    let level = flags.log_level.clone().or_else(|| file.log_level.clone());
    if let Some(l) = &level {
        tracing_subscriber::EnvFilter::try_new(l)
            .map_err(|e| format!("log level {l:?} is not a level or filter: {e}"))?;
    }
    let format = match flags.log_format.as_deref().or(file.log_format.as_deref()) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(f) => {
            return Err(format!(
                "unknown log format {f:?} (expected `text` or `json`)"
            ))
        }
    };
    let metrics_addr = match flags
        .metrics_addr
        .as_deref()
        .or(file.metrics_addr.as_deref())
    {
        Some(a) => Some(resolve("metrics address", a)?),
        None => None,
    };
    Ok((LogConfig { level, format }, metrics_addr))
}

/// A validated configuration.
#[derive(Clone)]
pub struct NodeConfig {
    pub fabric: FabricChoice,
    pub node: u8,
    pub cluster: u64,
    pub peers: BTreeMap<u8, SocketAddr>,
    pub client_addr: SocketAddr,
    pub client_peers: BTreeMap<u8, String>,
    pub data_dir: PathBuf,
    /// `--durability durable`.
    pub durable: bool,
    pub key: Vec<u8>,
    pub core: Option<usize>,
    pub heartbeat_timeout: Duration,
    pub election_timeout: Duration,
    /// When checkpoints are taken, how many are kept, how fast they are served.
    pub checkpoint: CheckpointPolicy,
    /// `--rejoin`: a lost data dir restarts recovering instead of fresh (implies
    /// `initial_cluster_state` `Existing`).
    pub rejoin: bool,
    /// `--initial-cluster-state`: what a start with no state of this replica is.
    pub initial_cluster_state: Option<InitialClusterState>,
    /// Durable mode: segment file size.
    pub segment_bytes: u64,
    /// Where `/metrics` and `/health` are served (`None`: not served).
    pub metrics_addr: Option<SocketAddr>,
    pub log: LogConfig,
    /// The client port's limits (`--client-*`).
    pub client_limits: ClientLimits,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("node", &self.node)
            .field("fabric", &self.fabric)
            .field("cluster", &self.cluster)
            .field("peers", &self.peers)
            .field("client_addr", &self.client_addr)
            .field("data_dir", &self.data_dir)
            .field("durable", &self.durable)
            .field("checkpoint", &self.checkpoint)
            .field("rejoin", &self.rejoin)
            .field("initial_cluster_state", &self.initial_cluster_state)
            .field("metrics_addr", &self.metrics_addr)
            .field("log", &self.log)
            .field("client_limits", &self.client_limits)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The `--peers` (or `--client-peers`) value for nodes on 127.0.0.1: node `i` at
/// `ports[i]`.
pub fn loopback_peers(ports: &[u16]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{i}=127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a byte count: digits, optionally followed by `K`, `M` or `G` (powers of 1024;
/// `KiB`, `KB`, `k` and a trailing `B` are accepted too).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// A size from a flag (wins) or a TOML value (integer or string).
fn size_setting(
    what: &str,
    flag: Option<String>,
    file: Option<toml::Value>,
    default: u64,
) -> Result<u64, String> {
    let bad = |v: &dyn std::fmt::Display| {
        format!("{what}: {v} is not a byte count (a number, optionally with K, M or G: 256K, 64M)")
    };
    match (flag, file) {
        (Some(s), _) => parse_size(&s).ok_or_else(|| bad(&format!("{s:?}"))),
        (None, Some(toml::Value::Integer(i))) => u64::try_from(i).map_err(|_| bad(&i)),
        (None, Some(toml::Value::String(s))) => {
            parse_size(&s).ok_or_else(|| bad(&format!("{s:?}")))
        }
        (None, Some(v)) => Err(bad(&v)),
        (None, None) => Ok(default),
    }
}

fn resolve(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{what} {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {s:?}: resolves to no address"))
}

/// Parses `id=host:port` entries; ids unique and below `MAX_NODES`.
pub(crate) fn parse_id_list(what: &str, items: &[String]) -> Result<BTreeMap<u8, String>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("{what}: {item:?} is not of the form id=host:port"))?;
        let id: u8 = id.trim().parse().map_err(|_| {
            format!(
                "{what}: {item:?}: id {id:?} is not a number in 0..{}",
                ballot::MAX_NODES
            )
        })?;
        if id as usize >= ballot::MAX_NODES {
            return Err(format!(
                "{what}: {item:?}: id {id} must be below {}",
                ballot::MAX_NODES
            ));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("{what}: {item:?}: {addr:?} is not host:port"));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("{what}: duplicate id {id}"));
        }
    }
    Ok(out)
}

/// Reads the key from `key_file`, else from `BALLOT_CLUSTER_KEY`.
fn load_key(key_file: Option<&PathBuf>) -> Result<Vec<u8>, String> {
    let key = match key_file {
        Some(p) => {
            let mut k = std::fs::read(p)
                .map_err(|e| format!("cannot read key file {}: {e}", p.display()))?;
            while k.last().is_some_and(|b| b.is_ascii_whitespace()) {
                k.pop();
            }
            k
        }
        None => match std::env::var_os(KEY_ENV) {
            Some(v) => v.into_encoded_bytes(),
            None => {
                return Err(format!(
                    "no cluster key: give --key-file FILE or set {KEY_ENV}"
                ))
            }
        },
    };
    if key.is_empty() {
        return Err("the cluster key is empty".into());
    }
    Ok(key)
}

/// Validates the client port's limits (flags win over the file).
fn client_limits(flags: &Flags, file: &FileConfig) -> Result<ClientLimits, String> {
    let d = ClientLimits::default();
    let max_connections = flags
        .client_max_connections
        .or(file.client_max_connections)
        .unwrap_or(d.max_connections);
    if max_connections == 0 {
        return Err("client-max-connections must be at least 1".into());
    }
    let max_in_flight = flags
        .client_max_in_flight
        .or(file.client_max_in_flight)
        .unwrap_or(d.max_in_flight);
    if !(1..=65_536).contains(&max_in_flight) {
        return Err(format!(
            "client-max-in-flight of {max_in_flight} is out of range: 1 to 65536"
        ));
    }
    let max_frame = size_setting(
        "client-max-frame",
        flags.client_max_frame.clone(),
        file.client_max_frame.clone(),
        d.max_frame as u64,
    )?;
    if !(64..=(64 << 20)).contains(&max_frame) {
        return Err(format!(
            "client-max-frame of {max_frame} bytes is out of range: 64 to 64M"
        ));
    }
    let max_output = size_setting(
        "client-max-output",
        flags.client_max_output.clone(),
        file.client_max_output.clone(),
        d.max_output as u64,
    )?;
    if !((2 << 20)..=(1 << 31)).contains(&max_output) {
        return Err(format!(
            "client-max-output of {max_output} bytes is out of range: 2M (an answer holds up \
             to a 1 MiB value) to 2G"
        ));
    }
    let idle = flags
        .client_idle_timeout_ms
        .or(file.client_idle_timeout_ms)
        .unwrap_or(d.idle_timeout.map_or(0, |t| t.as_millis() as u64));
    if idle > u64::from(u32::MAX) {
        return Err(format!(
            "client-idle-timeout-ms of {idle} is too large (at most {})",
            u32::MAX
        ));
    }
    Ok(ClientLimits {
        max_connections,
        max_in_flight,
        max_frame: max_frame as usize,
        idle_timeout: (idle > 0).then(|| Duration::from_millis(idle)),
        max_output: max_output as usize,
    })
}

impl NodeConfig {
    /// Merges the file named by `--config` (if any) with the flags and validates.
    pub fn load(flags: Flags) -> Result<NodeConfig, NodeError> {
        Self::merge(flags).map_err(NodeError::Config)
    }

    fn merge(flags: Flags) -> Result<NodeConfig, String> {
        let file = match &flags.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read config file {}: {e}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("config file {}: {e}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let (log, metrics_addr) = observability(&flags, &file)?;
        let client_limits = client_limits(&flags, &file)?;
        let node = flags
            .node
            .or(file.node)
            .ok_or("missing node id (--node or `node =`)")?;
        let cluster = match (flags.cluster, file.cluster) {
            (Some(s), _) => {
                parse_u64(&s).ok_or_else(|| format!("cluster id {s:?} is not a number"))?
            }
            (None, Some(toml::Value::Integer(i))) if i >= 0 => i as u64,
            (None, Some(toml::Value::String(s))) => {
                parse_u64(&s).ok_or_else(|| format!("cluster id {s:?} is not a number"))?
            }
            (None, Some(v)) => return Err(format!("cluster id {v} is not a non-negative number")),
            (None, None) => return Err("missing cluster id (--cluster or `cluster =`)".into()),
        };
        let peers_raw = if flags.peers.is_empty() {
            file.peers.unwrap_or_default()
        } else {
            flags.peers
        };
        if peers_raw.is_empty() {
            return Err("missing peers (--peers id=host:port,... or `peers = [...]`)".into());
        }
        let peers = parse_id_list("peers", &peers_raw)?;
        if !peers.contains_key(&node) {
            return Err(format!(
                "own id {node} is not in the peer list {:?}",
                peers.keys().collect::<Vec<_>>()
            ));
        }
        let peers = peers
            .into_iter()
            .map(|(id, a)| Ok((id, resolve(&format!("peer {id}"), &a)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        let client_addr = flags
            .client_addr
            .or(file.client_addr)
            .ok_or("missing client address (--client-addr)")?;
        let client_addr = resolve("client address", &client_addr)?;
        let cp_raw = if flags.client_peers.is_empty() {
            file.client_peers.unwrap_or_default()
        } else {
            flags.client_peers
        };
        let mut client_peers = parse_id_list("client-peers", &cp_raw)?;
        if let Some(id) = client_peers.keys().find(|id| !peers.contains_key(id)) {
            return Err(format!("client-peers: id {id} is not in the peer list"));
        }
        client_peers
            .entry(node)
            .or_insert_with(|| client_addr.to_string());
        let rdma_device = flags.rdma_device.or(file.rdma_device);
        let rdma_gid_index = flags.rdma_gid_index.or(file.rdma_gid_index);
        let fabric = match flags.fabric.or(file.fabric).as_deref().unwrap_or("tcp") {
            "tcp" => {
                if rdma_device.is_some() || rdma_gid_index.is_some() {
                    return Err("--rdma-device / --rdma-gid-index need --fabric rdma".into());
                }
                FabricChoice::Tcp
            }
            "rdma" => FabricChoice::Rdma {
                device: rdma_device,
                gid_index: rdma_gid_index,
            },
            f => return Err(format!("unknown fabric {f:?} (expected `tcp` or `rdma`)")),
        };
        let durable = match flags
            .durability
            .or(file.durability)
            .as_deref()
            .unwrap_or("volatile")
        {
            "volatile" => false,
            "durable" => true,
            d => {
                return Err(format!(
                    "unknown durability {d:?} (expected `volatile` or `durable`)"
                ))
            }
        };
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .ok_or("missing data directory (--data-dir)")?;
        let key = load_key(flags.key_file.or(file.key_file).as_ref())?;
        let ms = |v: Option<u32>, what: &str, default: u32| -> Result<Duration, String> {
            match v.unwrap_or(default) {
                0 => Err(format!("{what} must be positive")),
                v => Ok(Duration::from_millis(u64::from(v))),
            }
        };
        let every = size_setting(
            "checkpoint-every",
            flags.checkpoint_every,
            file.checkpoint_every,
            DEFAULT_CHECKPOINT_EVERY,
        )?;
        let keep = match (flags.checkpoints_keep, file.checkpoints_keep) {
            (Some(n), _) => n,
            (None, Some(toml::Value::Integer(i))) if i >= 0 => i as u64,
            (None, Some(v)) => {
                return Err(format!(
                    "checkpoints-keep: {v} is not a non-negative number"
                ))
            }
            (None, None) => DEFAULT_CHECKPOINTS_KEEP as u64,
        };
        if keep == 0 {
            return Err(
                "checkpoints-keep must be at least 1 (the log is truncated behind the oldest \
                 checkpoint kept)"
                    .into(),
            );
        }
        let rate = size_setting(
            "catchup-rate",
            flags.catchup_rate,
            file.catchup_rate,
            DEFAULT_CATCHUP_RATE,
        )?;
        if rate < 1000 {
            return Err(format!(
                "catchup-rate of {rate} bytes/s is too low: at least 1000 (1 byte per 1 ms tick)"
            ));
        }
        let segment_bytes = size_setting(
            "segment-bytes",
            flags.segment_bytes,
            file.segment_bytes,
            DEFAULT_SEGMENT_BYTES,
        )?;
        if segment_bytes < 4096 {
            return Err(format!(
                "segment-bytes of {segment_bytes} is too small: at least 4096 (4K)"
            ));
        }
        let checkpoint = CheckpointPolicy {
            every_bytes: every,
            keep: usize::try_from(keep).unwrap_or(usize::MAX),
            serve_bytes_per_tick: rate / 1000,
            ..CheckpointPolicy::default()
        };
        let initial_cluster_state =
            match flags.initial_cluster_state.as_deref() {
                None if flags.rejoin => Some(InitialClusterState::Existing),
                None => None,
                Some("existing") => Some(InitialClusterState::Existing),
                Some("new") if flags.rejoin => return Err(
                    "--rejoin contradicts --initial-cluster-state new (--rejoin means existing)"
                        .into(),
                ),
                Some("new") => Some(InitialClusterState::New),
                Some(v) => {
                    return Err(format!(
                        "unknown initial cluster state {v:?} (expected `new` or `existing`)"
                    ))
                }
            };
        Ok(NodeConfig {
            client_limits,
            metrics_addr,
            log,
            initial_cluster_state,
            checkpoint,
            rejoin: flags.rejoin,
            segment_bytes,
            fabric,
            node,
            cluster,
            peers,
            client_addr,
            client_peers,
            data_dir,
            durable,
            key,
            core: flags.core.or(file.core),
            heartbeat_timeout: ms(
                flags.heartbeat_timeout_ms.or(file.heartbeat_timeout_ms),
                "heartbeat timeout",
                100,
            )?,
            election_timeout: ms(
                flags.election_timeout_ms.or(file.election_timeout_ms),
                "election timeout",
                100,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Flags {
        let mut args = vec!["ballot-node"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args).unwrap()
    }

    #[test]
    fn errors_are_clear() {
        std::env::remove_var(KEY_ENV);
        let dir = std::env::temp_dir().join(format!("ballot-node-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "secret\n").unwrap();
        let kf = key.to_str().unwrap();
        let base = [
            "--node",
            "1",
            "--cluster",
            "0x10",
            "--peers",
            "0=127.0.0.1:1,1=127.0.0.1:2",
            "--client-addr",
            "127.0.0.1:3",
            "--data-dir",
            "/tmp/x",
            "--key-file",
            kf,
        ];
        let ok = NodeConfig::load(flags(&base)).unwrap();
        assert_eq!(
            (ok.node, ok.cluster, ok.key.as_slice()),
            (1, 16, &b"secret"[..])
        );
        assert_eq!(ok.client_peers[&1], "127.0.0.1:3");
        let err = |args: &[&str]| NodeConfig::load(flags(args)).unwrap_err().to_string();
        let with = |k: &str, v: &str| {
            let mut a: Vec<&str> = base.to_vec();
            let i = a.iter().position(|x| *x == k).unwrap();
            a[i + 1] = Box::leak(v.to_string().into_boxed_str());
            err(&a)
        };
        assert!(with("--peers", "0=127.0.0.1:1,0=127.0.0.1:2").contains("duplicate id 0"));
        assert!(with("--peers", "0=127.0.0.1:1").contains("own id 1"));
        assert!(with("--peers", "0127.0.0.1:1").contains("id=host:port"));
        assert!(with("--peers", "0=localhost").contains("host:port"));
        assert!(with("--peers", "99=127.0.0.1:1").contains("below"));
        assert!(with("--key-file", "/nonexistent/key").contains("cannot read key file"));
        assert!(with("--cluster", "abc").contains("not a number"));
        let mut no_key: Vec<&str> = base.to_vec();
        no_key.truncate(no_key.len() - 2);
        assert!(err(&no_key).contains(KEY_ENV));
        let mut a = base.to_vec();
        a.extend(["--durability", "durable"]);
        assert!(NodeConfig::load(flags(&a)).unwrap().durable);
        let mut a = base.to_vec();
        a.extend(["--durability", "sometimes"]);
        assert!(err(&a).contains("unknown durability"));
        // The client port's limits: defaults, flags, and out-of-range values refused.
        assert_eq!(ok.client_limits, ClientLimits::default());
        let mut a = base.to_vec();
        a.extend([
            "--client-max-connections",
            "7",
            "--client-max-in-flight",
            "9",
            "--client-max-frame",
            "64K",
            "--client-idle-timeout-ms",
            "0",
            "--client-max-output",
            "4M",
        ]);
        let l = NodeConfig::load(flags(&a)).unwrap().client_limits;
        assert_eq!(
            l,
            ClientLimits {
                max_connections: 7,
                max_in_flight: 9,
                max_frame: 64 << 10,
                idle_timeout: None,
                max_output: 4 << 20,
            }
        );
        for (flag, v, want) in [
            ("--client-max-connections", "0", "at least 1"),
            ("--client-max-in-flight", "0", "out of range"),
            ("--client-max-frame", "10", "out of range"),
            ("--client-max-frame", "lots", "not a byte count"),
            ("--client-max-output", "1M", "out of range"),
        ] {
            let mut a = base.to_vec();
            a.extend([flag, v]);
            assert!(err(&a).contains(want), "{flag} {v}: {}", err(&a));
        }
        let mut a = base.to_vec();
        a.extend(["--fabric", "rdma", "--rdma-gid-index", "1"]);
        assert_eq!(
            NodeConfig::load(flags(&a)).unwrap().fabric,
            FabricChoice::Rdma {
                device: None,
                gid_index: Some(1)
            }
        );
        let mut a = base.to_vec();
        a.extend(["--fabric", "ib"]);
        assert!(err(&a).contains("unknown fabric"));
        let mut a = base.to_vec();
        a.extend(["--rdma-device", "rxe0"]);
        assert!(err(&a).contains("need --fabric rdma"));
        assert!(Flags::try_parse_from(["ballot-node", "--bogus"]).is_err());
        // Checkpoint settings: defaults, sizes with suffixes, clear errors.
        assert_eq!(
            ok.checkpoint,
            CheckpointPolicy {
                every_bytes: 64 << 20,
                keep: 2,
                serve_bytes_per_tick: (64 << 20) / 1000,
                ..CheckpointPolicy::default()
            }
        );
        assert!(!ok.rejoin);
        let mut a = base.to_vec();
        a.extend([
            "--checkpoint-every",
            "256K",
            "--checkpoints-keep",
            "1",
            "--catchup-rate",
            "8MiB",
            "--rejoin",
        ]);
        let c = NodeConfig::load(flags(&a)).unwrap();
        assert_eq!(c.checkpoint.every_bytes, 256 << 10);
        assert_eq!(c.checkpoint.keep, 1);
        assert_eq!(c.checkpoint.serve_bytes_per_tick, (8 << 20) / 1000);
        assert!(c.rejoin);
        assert_eq!(c.initial_cluster_state, Some(InitialClusterState::Existing));
        assert_eq!(ok.initial_cluster_state, None);
        for (v, want) in [
            ("new", Some(InitialClusterState::New)),
            ("existing", Some(InitialClusterState::Existing)),
        ] {
            let mut a = base.to_vec();
            a.extend(["--initial-cluster-state", v]);
            assert_eq!(
                NodeConfig::load(flags(&a)).unwrap().initial_cluster_state,
                want
            );
        }
        let mut a = base.to_vec();
        a.extend(["--initial-cluster-state", "fresh"]);
        assert!(err(&a).contains("unknown initial cluster state"));
        a.truncate(a.len() - 1);
        a.extend(["new", "--rejoin"]);
        assert!(err(&a).contains("contradicts"));
        assert_eq!(c.segment_bytes, 64 << 20);
        let mut a = base.to_vec();
        a.extend(["--checkpoint-every", "0"]);
        assert_eq!(
            NodeConfig::load(flags(&a)).unwrap().checkpoint.every_bytes,
            0
        );
        for (flag, v, want) in [
            ("--checkpoint-every", "lots", "not a byte count"),
            ("--checkpoint-every", "12T", "not a byte count"),
            ("--checkpoint-every", "1.5M", "not a byte count"),
            ("--checkpoint-every", "99999999999G", "not a byte count"),
            ("--checkpoints-keep", "0", "at least 1"),
            ("--catchup-rate", "0", "too low"),
            ("--catchup-rate", "999", "too low"),
            ("--catchup-rate", "fast", "not a byte count"),
            ("--segment-bytes", "1K", "too small"),
        ] {
            let mut a = base.to_vec();
            a.extend([flag, v]);
            let e = err(&a);
            assert!(e.contains(want), "{flag} {v}: {e}");
        }
        assert!(Flags::try_parse_from(["ballot-node", "--checkpoints-keep", "-1"]).is_err());
        // Logging and metrics.
        assert_eq!(ok.metrics_addr, None);
        assert_eq!(
            ok.log,
            LogConfig {
                level: None,
                format: LogFormat::Text
            }
        );
        let mut a = base.to_vec();
        a.extend([
            "--metrics-addr",
            "127.0.0.1:9100",
            "--log-level",
            "info,ballot_tcp=debug",
            "--log-format",
            "json",
        ]);
        let c = NodeConfig::load(flags(&a)).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level.as_deref(), Some("info,ballot_tcp=debug"));
        for (flag, v, want) in [
            ("--metrics-addr", "nowhere", "metrics address"),
            ("--log-format", "xml", "unknown log format"),
            ("--log-level", "info,ballot=loud", "not a level or filter"),
        ] {
            let mut a = base.to_vec();
            a.extend([flag, v]);
            let e = err(&a);
            assert!(e.contains(want), "{flag} {v}: {e}");
        }
        assert_eq!(parse_size(" 4k "), Some(4096));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("7"), Some(7));
        assert_eq!(parse_size("K"), None);
        // TOML, with flags overriding.
        let file = dir.join("node.toml");
        std::fs::write(
            &file,
            format!(
                "node = 0\ncluster = 7\npeers = [\"0=127.0.0.1:1\", \"1=127.0.0.1:2\"]\n\
                 client_addr = \"127.0.0.1:5\"\ndata_dir = \"/tmp/d\"\nkey_file = \"{kf}\"\n"
            ),
        )
        .unwrap();
        let c = NodeConfig::load(flags(&["-c", file.to_str().unwrap(), "--node", "1"])).unwrap();
        assert_eq!((c.node, c.cluster), (1, 7));
        let toml_base = format!(
            "node = 0\ncluster = 7\npeers = [\"0=127.0.0.1:1\", \"1=127.0.0.1:2\"]\n\
             client_addr = \"127.0.0.1:5\"\ndata_dir = \"/tmp/d\"\nkey_file = \"{kf}\"\n"
        );
        std::fs::write(
            &file,
            format!("{toml_base}metrics_addr = \"127.0.0.1:9101\"\nlog_format = \"json\"\n"),
        )
        .unwrap();
        let c = NodeConfig::load(flags(&["-c", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
        std::fs::write(
            &file,
            format!(
                "{toml_base}checkpoint_every = \"1M\"\ncheckpoints_keep = 3\n\
                 catchup_rate = 2000000\n"
            ),
        )
        .unwrap();
        let c = NodeConfig::load(flags(&["-c", file.to_str().unwrap()])).unwrap();
        assert_eq!(
            (
                c.checkpoint.every_bytes,
                c.checkpoint.keep,
                c.checkpoint.serve_bytes_per_tick
            ),
            (1 << 20, 3, 2000)
        );
        // Flags win over the file.
        let c = NodeConfig::load(flags(&[
            "-c",
            file.to_str().unwrap(),
            "--checkpoint-every",
            "2K",
        ]))
        .unwrap();
        assert_eq!(c.checkpoint.every_bytes, 2048);
        for (line, want) in [
            ("checkpoints_keep = 0\n", "at least 1"),
            ("checkpoints_keep = -2\n", "checkpoints-keep"),
            ("checkpoint_every = -1\n", "not a byte count"),
            ("checkpoint_every = true\n", "not a byte count"),
            ("catchup_rate = \"slow\"\n", "not a byte count"),
            ("rejoin = true\n", "rejoin"),
            ("initial_cluster_state = \"new\"\n", "initial_cluster_state"),
        ] {
            std::fs::write(&file, format!("{toml_base}{line}")).unwrap();
            let e = NodeConfig::load(flags(&["-c", file.to_str().unwrap()]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
        std::fs::write(&file, "node = 0\nbogus = 1\n").unwrap();
        assert!(NodeConfig::load(flags(&["-c", file.to_str().unwrap()]))
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        assert!(NodeConfig::load(flags(&["-c", "/nonexistent.toml"]))
            .unwrap_err()
            .to_string()
            .contains("cannot read config"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
