//! The replica process: boot marker, fabric (TCP or RDMA), replica runtime, and the client
//! listener.

use crate::config::{FabricChoice, NodeConfig};
use crate::error::NodeError;
use crate::kv::{Command, DigestCell, KvMachine};
use crate::wire::{self, NodeStatus, Request, Response};
use ballot::checkpoint::Checkpoints;
use ballot::driver::{Replica, StateMachine, Storage};
use ballot::layout::{RegionInfo, RingGeometry};
use ballot::protocol::{Config, Core, Durability, ProposeError};
use ballot::region::Region;
use ballot::runtime::{Handle, Runtime, RuntimeConfig};
use ballot::storage::{FileCheckpoints, Persister, PersisterOptions};
use ballot::Index;
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
pub fn boot_marker(dir: &Path, cluster: u64, node: u8) -> Result<bool, NodeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::io(format!("cannot create data dir {}", dir.display()), e))?;
    let path = dir.join(MARKER);
    let want = format!("cluster={cluster:#x} node={node}\n");
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(true),
        Ok(have) => Err(NodeError::Refused(format!(
            "data dir {} belongs to another replica ({}), not cluster={cluster:#x} node={node}",
            dir.display(),
            have.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = dir.join(format!("{MARKER}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(want.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write().map_err(|e| {
                NodeError::io(format!("cannot write boot marker {}", path.display()), e)
            })?;
            Ok(false)
        }
        Err(e) => Err(NodeError::io(
            format!("cannot read boot marker {}", path.display()),
            e,
        )),
    }
}

/// Marker of a rejoin that has not finished (durable mode, kept by the persister): while it
/// exists, every start discards the durable state and recovers from a majority again. The
/// replica removes it once the rebuilt promise and log are durable.
pub use ballot::storage::persister::REJOIN_MARKER;
/// Subdirectory of the data dir holding the checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// How this start relates to what the data dir holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// First start of this replica.
    Fresh,
    /// A restart: the data dir holds this replica's state (durable), or its boot marker
    /// (volatile: it recovers).
    Restart,
    /// An existing member whose state was lost (`--rejoin`, or an unfinished rejoin): it
    /// recovers from a majority before taking part.
    Rejoin,
}

/// Reads the data dir's markers and decides how this replica starts (writing the boot
/// marker, and the rejoin marker for a durable rejoin).
pub fn decide_boot(cfg: &NodeConfig) -> Result<Boot, NodeError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::io(format!("cannot create data dir {}", dir.display()), e))?;
    let had_marker = dir.join(MARKER).exists();
    let pending = dir.join(REJOIN_MARKER).exists();
    // Durable state gone although the marker is there: `--rejoin` may rebuild it.
    let lost = had_marker && cfg.durable && !dir.join("promise").exists();
    let rejoin = pending || (cfg.rejoin && (!had_marker || lost));
    if rejoin && cfg.durable && !pending {
        // Durable before anything else: a crash from here on rejoins again.
        Persister::mark_rejoining(dir).map_err(|source| NodeError::Storage {
            what: format!("cannot write the rejoin marker in {}", dir.display()),
            source,
        })?;
    }
    let restart = boot_marker(dir, cfg.cluster, cfg.node)?;
    if cfg.rejoin && !rejoin {
        tracing::warn!("--rejoin ignored: the data dir holds this replica's state");
        eprintln!(
            "ballot-node: --rejoin ignored: {} holds this replica's state",
            dir.display()
        );
    }
    Ok(if rejoin {
        Boot::Rejoin
    } else if restart {
        Boot::Restart
    } else {
        Boot::Fresh
    })
}

/// Removes the durable log, promise and rewrite files (a rejoin starts from nothing; the
/// rejoin marker stays).
fn wipe_durable(dir: &Path) -> Result<(), NodeError> {
    let list = |e| NodeError::io(format!("cannot list {}", dir.display()), e);
    let rd = std::fs::read_dir(dir).map_err(list)?;
    for ent in rd {
        let ent = ent.map_err(list)?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        let durable = (name.starts_with("seg-") && name.ends_with(".log"))
            || name == "promise"
            || name == ballot::storage::persister::REWRITE_TMP
            || name == ballot::storage::persister::REWRITE_LOG;
        if durable {
            let p = ent.path();
            std::fs::remove_file(&p)
                .map_err(|e| NodeError::io(format!("cannot remove {}", p.display()), e))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeError::io(format!("cannot sync {}", dir.display()), e))
}

fn open_checkpoints(dir: &Path) -> Result<FileCheckpoints, NodeError> {
    let ck_dir = dir.join(CHECKPOINT_DIR);
    FileCheckpoints::open(&ck_dir).map_err(|source| NodeError::Unrecoverable {
        what: format!("cannot open the checkpoints in {}", ck_dir.display()),
        source,
    })
}

/// What a durable replica starts from.
struct Durable {
    core: Core,
    persister: Persister,
    checkpoints: FileCheckpoints,
    kv: KvMachine,
}

/// Durable mode: recovers the promise, the newest checkpoint that verifies and the log
/// after it from the data dir (torn tail cut and reported; corruption refused, naming file
/// and offset) and rebuilds the core from them. A rejoin starts from nothing, recovering.
fn open_durable(cfg: &NodeConfig, pc: Config, boot: Boot) -> Result<Durable, NodeError> {
    let dir = &cfg.data_dir;
    if boot == Boot::Restart && !dir.join("promise").exists() {
        return Err(NodeError::Refused(format!(
            "data dir {} has a boot marker but no durable state (was it run in volatile \
             mode, or was its state deleted?): refusing to start a durable replica that may \
             have forgotten promises (if this replica's data was lost, start it with \
             --rejoin)",
            dir.display()
        )));
    }
    if boot == Boot::Rejoin {
        wipe_durable(dir)?;
    }
    let mut checkpoints = open_checkpoints(dir)?;
    if boot == Boot::Rejoin {
        checkpoints.clear().map_err(|e| {
            NodeError::io(format!("cannot clear {}", checkpoints.dir().display()), e)
        })?;
    }
    let mut opts = PersisterOptions::default();
    opts.log.segment_bytes = cfg.segment_bytes;
    let (mut persister, rec) =
        Persister::open(dir, opts).map_err(|source| NodeError::Unrecoverable {
            what: format!("cannot recover the durable state in {}", dir.display()),
            source,
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
    if boot == Boot::Rejoin {
        debug_assert!(rec.rejoining);
        tracing::warn!("rejoining: recovering the state from a majority");
        eprintln!(
            "ballot-node: rejoining with an empty data dir: recovering from a majority \
             before taking part"
        );
        let core = Core::new(pc, true)?;
        return Ok(Durable {
            core,
            persister,
            checkpoints,
            kv: KvMachine::default(),
        });
    }
    let first = rec.first_index;
    let (base, kv) = restore_checkpoint(dir, &mut checkpoints, first)?;
    let mut entries = rec.entries;
    if let Some(f) = first {
        let covered = (base + 1).saturating_sub(f) as usize;
        entries.drain(..covered.min(entries.len()));
    }
    if base > 0 {
        // Entries the checkpoint covers go (a log that ends below it is emptied, so that
        // the next append, at base + 1, is accepted).
        persister.compact(base).map_err(|e| {
            NodeError::io(format!("cannot compact the log in {}", dir.display()), e)
        })?;
    }
    tracing::info!(
        promised = %rec.promised,
        checkpoint = base,
        entries = entries.len(),
        rewrite_replayed = ?rec.rewrite_replayed,
        rewrite_discarded = rec.rewrite_discarded,
        "recovered durable state"
    );
    let core = Core::restore(pc, rec.promised, base, entries)?;
    Ok(Durable {
        core,
        persister,
        checkpoints,
        kv,
    })
}

/// Restores the key-value state from the newest checkpoint that verifies and that the log
/// continues (it starts at or before the checkpoint's index + 1). Corrupt newer ones are set
/// aside (renamed `….corrupt`) and reported. Returns the checkpoint index (0: none).
fn restore_checkpoint(
    dir: &Path,
    ck: &mut FileCheckpoints,
    first: Option<Index>,
) -> Result<(Index, KvMachine), NodeError> {
    let covers = |c: Index| first.is_none_or(|f| f <= c + 1);
    let seg = |f: Index| dir.join(format!("seg-{f:020}.log"));
    let mut corrupt: Vec<(Index, String)> = Vec::new();
    let mut chosen = None;
    let mut newest_uncovered = None;
    for info in ck.list().into_iter().rev() {
        if !covers(info.index) {
            newest_uncovered.get_or_insert(info.index);
            break;
        }
        let mut kv = KvMachine::default();
        match ck.open(info.index).and_then(|mut r| kv.restore(&mut r)) {
            Ok(()) => {
                chosen = Some((info.index, kv));
                break;
            }
            Err(e) => {
                let path = ck.path_of(info.index);
                tracing::error!(file = %path.display(), "checkpoint does not verify: {e}");
                eprintln!(
                    "ballot-node: recovery: checkpoint {} does not verify: {e}",
                    path.display()
                );
                corrupt.push((info.index, e.to_string()));
            }
        }
    }
    let chosen = match chosen {
        Some(c) => c,
        // No usable checkpoint: the log must hold everything from index 1.
        None if covers(0) => (0, KvMachine::default()),
        None => {
            let f = first.expect("an uncovered log is not empty");
            let mut why = String::new();
            for (i, e) in &corrupt {
                why.push_str(&format!(
                    "checkpoint {} is corrupt ({e}); ",
                    ck.path_of(*i).display()
                ));
            }
            let older = match newest_uncovered {
                Some(c) => format!(
                    "the newest usable checkpoint, {}, is at index {c}",
                    ck.path_of(c).display()
                ),
                None if corrupt.is_empty() => {
                    format!("there is no checkpoint in {}", ck.dir().display())
                }
                None => "there is no older checkpoint".to_string(),
            };
            return Err(NodeError::Refused(format!(
                "cannot recover the durable state in {}: {why}the log starts at index {f} \
                 ({}) and {older}: entries before {f} are missing; refusing to start",
                dir.display(),
                seg(f).display()
            )));
        }
    };
    for (i, e) in corrupt {
        let to = ck.set_aside(i).map_err(|err| {
            NodeError::io(
                format!("cannot set aside the corrupt checkpoint at {i}"),
                err,
            )
        })?;
        eprintln!(
            "ballot-node: recovery: corrupt checkpoint set aside as {} ({e}); restored from {}",
            to.display(),
            if chosen.0 == 0 {
                "the log alone".to_string()
            } else {
                ck.path_of(chosen.0).display().to_string()
            }
        );
    }
    if chosen.0 > 0 {
        tracing::info!(
            index = chosen.0,
            file = %ck.path_of(chosen.0).display(),
            "state restored from a checkpoint"
        );
    }
    Ok(chosen)
}

fn bind_retry(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, NodeError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                return Err(NodeError::io(
                    format!("cannot listen for {what} on {addr}"),
                    e,
                ))
            }
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
) -> Result<RdmaFabric, NodeError> {
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
    let f = RdmaFabric::connect(&rc, region).map_err(|source| NodeError::Fabric {
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

impl Node {
    pub fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let boot = decide_boot(&cfg)?;
        let recovering = boot != Boot::Fresh;
        let ring = ring();
        let region = Region::anonymous(RegionInfo {
            cluster: cfg.cluster,
            node: cfg.node,
            ring,
        })
        .map_err(|e| NodeError::io("cannot allocate the region", e))?;
        let listen = cfg.peers[&cfg.node];
        let region = Arc::new(region);
        let members: Vec<u8> = cfg.peers.keys().copied().collect();
        let mut pc = Config::new(
            cfg.node,
            members,
            ring,
            ballot::runtime::clock_seed(cfg.node),
        );
        pc.batch_bytes = crate::kv::MAX_COMMAND + 64;
        pc.heartbeat_timeout = cfg.heartbeat_timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        pc.election_timeout = cfg.election_timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        let (core, storage, checkpoints, kv) = if cfg.durable {
            pc.durability = Durability::Durable;
            let d = open_durable(&cfg, pc, boot)?;
            let storage = Some(Box::new(d.persister) as Box<dyn Storage>);
            (d.core, storage, d.checkpoints, d.kv)
        } else {
            // A volatile restart is amnesiac: checkpoints of an earlier run are not used.
            let mut ck = open_checkpoints(&cfg.data_dir)?;
            ck.clear()
                .map_err(|e| NodeError::io(format!("cannot clear {}", ck.dir().display()), e))?;
            if boot == Boot::Rejoin {
                eprintln!(
                    "ballot-node: rejoining with an empty data dir: recovering from a \
                     majority before taking part"
                );
            }
            let core = Core::new(pc, recovering)?;
            (core, None, ck, KvMachine::default())
        };
        let digest = kv.digest_cell();
        let checkpoints: Box<dyn Checkpoints> = Box::new(checkpoints);
        let rc = RuntimeConfig {
            core: cfg.core,
            name: format!("replica-{}", cfg.node),
            ..RuntimeConfig::default()
        };
        let start = |e| NodeError::io("cannot start the replica thread", e);
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
                    .map_err(|e| NodeError::io("fabric", e))?;
                let replica = Replica::new(core, fabric, kv, storage)
                    .with_checkpoints(checkpoints, cfg.checkpoint);
                NodeRuntime::Tcp(Runtime::start(replica, rc).map_err(start)?)
            }
            FabricChoice::Rdma { device, gid_index } => {
                let fabric = rdma_fabric(&cfg, device, *gid_index, recovering, region)?;
                let replica = Replica::new(core, fabric, kv, storage)
                    .with_checkpoints(checkpoints, cfg.checkpoint);
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
            .spawn(move || accept_loop(client_listener, h, peers, digest, st))
            .map_err(|e| NodeError::io("cannot start the client listener", e))?;
        tracing::info!(
            node = cfg.node,
            boot = ?boot,
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
    digest: Arc<DigestCell>,
    stop: Arc<AtomicBool>,
) {
    l.set_nonblocking(true).ok();
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let (h, p, d) = (h.clone(), peers.clone(), digest.clone());
                let _ = std::thread::Builder::new()
                    .name("client-conn".into())
                    .spawn(move || serve(s, h, p, d));
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

fn serve(
    mut s: TcpStream,
    h: Handle,
    peers: Arc<std::collections::BTreeMap<u8, String>>,
    digest: Arc<DigestCell>,
) {
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
            Ok(Request::Checkpoint) => {
                h.checkpoint();
                Response::Ok(Vec::new())
            }
            Ok(Request::Status) => {
                let st = h.status();
                let d = digest.get();
                Response::Ok(
                    NodeStatus {
                        node: st.node,
                        role: st.role.name().to_string(),
                        ballot: st.ballot,
                        ballot_round: st.ballot >> 8,
                        commit: st.commit,
                        applied: st.applied,
                        leader: st.leader_hint,
                        log_base: st.log_base,
                        checkpoint: st.checkpoint,
                        digest: d.digest,
                        digest_index: d.index,
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
