//! A replica node: the start-up logic every embedder needs, around any [`StateMachine`].
//!
//! [`NodeBuilder`] owns what makes a start safe: the data dir's checks (another replica's
//! dir, durable state given to a volatile start, a boot marker without durable state), the
//! boot marker and amnesia recovery, the durable open (promise, log, newest checkpoint that
//! verifies), the checkpoint store, the rejoin of a replica whose data was lost, and the
//! runtime thread. It hands back a [`Node`], whose [`Handle`] proposes and observes.
//!
//! The fabric is built by the caller (the engine does not depend on `ballot-tcp` or
//! `ballot-verbs`), from a closure that receives the region and whether this start
//! recovers ([`FabricSetup`]).
//!
//! # Order of a start
//!
//! 1. The data dir is *inspected*, read-only ([`NodeBuilder::plan`]): a start that is
//!    refused writes nothing.
//! 2. The fabric is built (bound, connected). Bind the caller's own listeners (a client
//!    port) **before** [`NodeBuilder::start`]: a start that fails on a busy port must leave
//!    nothing behind that changes the next start.
//! 3. Only then is anything written: the data dir, the rejoin marker (durable rejoin), the
//!    durable state, the boot marker (last, once the storage is open).
//! 4. The replica thread starts, and a watcher logs at WARN, every few seconds, while the
//!    replica cannot make progress (recovering with no majority to recover from, or no
//!    leader), naming what is missing and what to do.
//!
//! # First start, restart, lost data
//!
//! A replica cannot tell a first start from a lost data dir (both are an empty directory),
//! so a start whose data dir holds no state of this replica needs an explicit
//! [`InitialClusterState`]: `New` (the cluster's first start: a fresh voter) or `Existing`
//! (a member whose data was lost: it rebuilds from a majority before it takes part).
//! Without one the start is refused. A restart (the boot marker is there) needs neither.

use crate::checkpoint::{CheckpointPolicy, Checkpoints};
use crate::driver::{Replica, StateMachine, Storage};
use crate::fabric::{Fabric, FabricError};
use crate::layout::{RegionInfo, RingGeometry};
use crate::metrics::Metrics;
use crate::protocol::{Config, ConfigError, Core, Durability};
use crate::region::Region;
use crate::runtime::{Handle, Role, Runtime, RuntimeConfig};
use crate::storage::persister::{REWRITE_LOG, REWRITE_TMP};
use crate::storage::{FileCheckpoints, Persister, PersisterOptions, StorageError};
use crate::types::{Index, NodeId, PromiseRecord};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the boot marker in the data directory (the name predates this module: data dirs
/// written by earlier `ballot-node` versions keep working).
pub const BOOT_MARKER: &str = "ballot-node.boot";
/// Subdirectory of the data dir holding the checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// Marker of a durable rejoin that has not finished: while it exists, every start discards
/// the durable state and rebuilds from a majority again.
pub use crate::storage::persister::REJOIN_MARKER;
/// The promise file of durable mode.
const PROMISE: &str = "promise";

/// What a start whose data dir holds no state of this replica is (etcd's
/// `--initial-cluster-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InitialClusterState {
    /// The cluster's first start: this replica starts as a fresh voter with an empty log.
    New,
    /// This replica is an existing member whose data was lost: it rebuilds its state from a
    /// majority of the others before it votes or acknowledges.
    Existing,
}

/// How this start relates to what the data dir holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Boot {
    /// First start of this replica.
    Fresh,
    /// A restart: the data dir holds this replica's state (durable), or its boot marker
    /// (volatile: it recovers from a majority).
    Restart,
    /// An existing member whose state was lost (`Existing`, or an unfinished rejoin): it
    /// rebuilds from a majority before taking part.
    Rejoin,
}

impl Boot {
    /// Whether the replica starts with no memory and rebuilds from a majority (a volatile
    /// restart or a rejoin).
    pub fn recovering(self, durable: bool) -> bool {
        match self {
            Boot::Fresh => false,
            Boot::Restart => !durable,
            Boot::Rejoin => true,
        }
    }
}

/// What the fabric closure of [`NodeBuilder::start`] gets.
#[derive(Debug, Clone)]
pub struct FabricSetup {
    /// This replica.
    pub node: NodeId,
    /// The cluster id (fabrics refuse peers of another cluster).
    pub cluster: u64,
    /// The region the fabric exposes (peers write into it).
    pub region: Arc<Region>,
    /// How this start relates to the data dir.
    pub boot: Boot,
    /// The replica had a life before this start (not `Fresh`): a fabric whose peers keep
    /// per-connection state (RDMA queue pairs) should re-bootstrap with them.
    pub restarted: bool,
}

/// The words the operator-facing messages use for the settings they ask for; `ballot-node`
/// names its flags, an embedder its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wording {
    /// How an operator asks for [`InitialClusterState::New`].
    pub new: String,
    /// How an operator asks for [`InitialClusterState::Existing`].
    pub existing: String,
    /// How an operator asks for durable mode.
    pub durable: String,
    /// How an operator asks for volatile mode.
    pub volatile: String,
}

impl Default for Wording {
    fn default() -> Self {
        Wording {
            new: "initial cluster state `new`".into(),
            existing: "initial cluster state `existing`".into(),
            durable: "durable mode".into(),
            volatile: "volatile mode".into(),
        }
    }
}

/// Why a node did not start. The messages are the ones operators see.
#[derive(Debug)]
pub enum StartError {
    /// The data dir does not allow this start (another replica's, state missing or of the
    /// other mode, no initial cluster state given); the message says why and what to do.
    Refused(String),
    /// A file, socket or thread operation failed: what was being done, and why.
    Io {
        /// What was being done (a path, an address).
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Durable state could not be used: what was being done, and why.
    Storage {
        /// What was being done (which file, which step of the recovery).
        what: String,
        /// The storage error.
        source: StorageError,
    },
    /// Durable state could not be recovered, so the replica does not start.
    Unrecoverable {
        /// What was being done (which file, which step of the recovery).
        what: String,
        /// The storage error.
        source: StorageError,
    },
    /// The protocol core refused the configuration.
    Protocol(ConfigError),
    /// The fabric could not be started.
    Fabric {
        /// Which step of the fabric's start failed.
        what: &'static str,
        /// The fabric's error.
        source: FabricError,
    },
}

impl StartError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StartError::Io {
            what: what.into(),
            source,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(s) => f.write_str(s),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::Storage { what, source } => write!(f, "{what}: {source}"),
            Self::Unrecoverable { what, source } => {
                write!(f, "{what}: {source}; refusing to start")
            }
            Self::Protocol(e) => write!(f, "bad configuration: {e}"),
            Self::Fabric { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Refused(_) => None,
            Self::Io { source, .. } => Some(source),
            Self::Storage { source, .. } | Self::Unrecoverable { source, .. } => Some(source),
            Self::Protocol(e) => Some(e),
            Self::Fabric { source, .. } => Some(source),
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        Self::Protocol(e)
    }
}

type Notice = Box<dyn Fn(&str) + Send + Sync>;
type Tune = Box<dyn FnOnce(&mut Config) + Send>;

/// Builds and starts a [`Node`]: a replica of `S` with its data dir, storage, checkpoints
/// and runtime. See the [module docs](self) for the order of a start.
///
/// A one-replica cluster over the in-process fabric, started, restarted from its data dir,
/// and refused once its data is gone (a wiped replica never comes back as a fresh voter):
///
/// ```
/// use ballot::driver::StateMachine;
/// use ballot::mem_fabric::MemNet;
/// use ballot::node::{Boot, InitialClusterState, NodeBuilder, StartError};
/// use ballot::protocol::ProposeError;
/// use std::time::{Duration, Instant};
///
/// #[derive(Default)]
/// struct Counter(u64);
/// impl StateMachine for Counter {
///     fn apply(&mut self, _index: u64, cmd: &[u8], out: &mut Vec<u8>) {
///         self.0 += cmd.len() as u64;
///         out.extend_from_slice(&self.0.to_le_bytes());
///     }
/// }
///
/// let dir = std::env::temp_dir().join(format!("ballot-doc-node-{}", std::process::id()));
/// let net = MemNet::instant();
/// let builder = || {
///     NodeBuilder::new(0, 0xBA11, vec![0], &dir, Counter::default)
///         .durable(true)
///         .ring(ballot::layout::RingGeometry::new(1 << 10, 64).unwrap())
///         .batch_bytes(4096)
/// };
/// // The cluster's first start must say so.
/// let node = builder()
///     .initial_cluster_state(Some(InitialClusterState::New))
///     .start(|setup| Ok(net.attach(setup.node, setup.region)))?;
/// assert_eq!(node.boot(), Boot::Fresh);
/// // Until the replica has elected itself, proposals fail with `NotLeader`.
/// let deadline = Instant::now() + Duration::from_secs(20);
/// let out = loop {
///     match node.handle().propose(b"hello".to_vec(), Duration::from_secs(1)) {
///         Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {
///             std::thread::sleep(Duration::from_millis(10))
///         }
///         out => break out,
///     }
/// };
/// assert_eq!(out.unwrap(), 5u64.to_le_bytes());
/// node.shutdown();
///
/// // A restart needs no initial cluster state: the data dir says what it is.
/// let node = builder().start(|setup| Ok(net.attach(setup.node, setup.region)))?;
/// assert_eq!(node.boot(), Boot::Restart);
/// node.shutdown();
///
/// // The data dir lost: refused, naming the setting to use, before anything is written.
/// std::fs::remove_dir_all(&dir).unwrap();
/// let refused = builder().start(|setup| Ok(net.attach(setup.node, setup.region)));
/// assert!(matches!(refused, Err(StartError::Refused(_))));
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok::<(), StartError>(())
/// ```
pub struct NodeBuilder<S: StateMachine> {
    node: NodeId,
    cluster: u64,
    members: Vec<NodeId>,
    data_dir: PathBuf,
    make: Box<dyn FnMut() -> S + Send>,
    durable: bool,
    segment_bytes: u64,
    initial: Option<InitialClusterState>,
    ring: RingGeometry,
    heartbeat_timeout: Duration,
    election_timeout: Duration,
    batch_bytes: Option<usize>,
    tune: Option<Tune>,
    checkpoint: CheckpointPolicy,
    runtime: RuntimeConfig,
    stall_warning: Option<Duration>,
    wording: Wording,
    notice: Notice,
    /// Shared by the replica, the persister and the runtime's handle.
    metrics: Arc<Metrics>,
}

impl<S: StateMachine + 'static> NodeBuilder<S> {
    /// Replica `node` of cluster `cluster` (members: every replica's id, this one included),
    /// keeping its state in `data_dir`. `make` builds an empty state machine (a start that
    /// restores a checkpoint builds one per checkpoint it tries).
    pub fn new(
        node: NodeId,
        cluster: u64,
        members: Vec<NodeId>,
        data_dir: impl Into<PathBuf>,
        make: impl FnMut() -> S + Send + 'static,
    ) -> Self {
        NodeBuilder {
            node,
            cluster,
            members,
            data_dir: data_dir.into(),
            make: Box::new(make),
            durable: false,
            segment_bytes: 64 << 20,
            initial: None,
            ring: RingGeometry::new(1 << 16, 128).expect("valid geometry"),
            heartbeat_timeout: Duration::from_millis(100),
            election_timeout: Duration::from_millis(100),
            batch_bytes: None,
            tune: None,
            checkpoint: CheckpointPolicy::default(),
            runtime: RuntimeConfig {
                name: format!("replica-{node}"),
                ..RuntimeConfig::default()
            },
            stall_warning: Some(Duration::from_secs(5)),
            wording: Wording::default(),
            notice: Box::new(|_| {}),
            metrics: Arc::default(),
        }
    }

    /// Durable mode (promises and log on disk, fsynced before acknowledging) or volatile
    /// (default: in memory, a majority must stay up).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
    /// Durable mode: size of a log segment file.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }
    /// What a start with no state of this replica in its data dir is; `None` (default)
    /// refuses such a start.
    pub fn initial_cluster_state(mut self, s: Option<InitialClusterState>) -> Self {
        self.initial = s;
        self
    }
    /// The ring geometry (the same on every replica; default 8 MiB of 128-byte slots).
    pub fn ring(mut self, ring: RingGeometry) -> Self {
        self.ring = ring;
        self
    }
    /// Failure detection: silence of the leader before a follower suspects it.
    pub fn heartbeat_timeout(mut self, t: Duration) -> Self {
        self.heartbeat_timeout = t;
        self
    }
    /// How long a candidate waits for promises.
    pub fn election_timeout(mut self, t: Duration) -> Self {
        self.election_timeout = t;
        self
    }
    /// Largest batch of commands in one log entry (at least the largest command).
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = Some(bytes);
        self
    }
    /// Adjusts the protocol configuration after the builder's settings are applied.
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tune = Some(Box::new(f));
        self
    }
    /// When checkpoints are taken, how many are kept, how fast they are served.
    pub fn checkpoints(mut self, policy: CheckpointPolicy) -> Self {
        self.checkpoint = policy;
        self
    }
    /// How the replica thread runs (core pinning, queue, name).
    pub fn runtime(mut self, rc: RuntimeConfig) -> Self {
        self.runtime = rc;
        self
    }
    /// How long the replica may stay recovering or leaderless before a WARN says what is
    /// missing (repeated at this interval); `None`: never.
    pub fn stall_warning(mut self, every: Option<Duration>) -> Self {
        self.stall_warning = every;
        self
    }
    /// The words operator-facing messages use for the settings they ask for.
    pub fn wording(mut self, w: Wording) -> Self {
        self.wording = w;
        self
    }
    /// Called with each operator-facing line of a start (torn tail truncated, checkpoint
    /// set aside, rejoining, ...), besides the `tracing` event; `ballot-node` prints them.
    pub fn notices(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.notice = Box::new(f);
        self
    }

    fn marker_text(&self) -> String {
        format!("cluster={:#x} node={}\n", self.cluster, self.node)
    }

    /// Reads the data dir, writing nothing, and decides how this replica would start, or
    /// refuses with a message saying why and what to do.
    pub fn plan(&self) -> Result<Boot, StartError> {
        let dir = &self.data_dir;
        let marker = dir.join(BOOT_MARKER);
        let had_marker = match std::fs::read_to_string(&marker) {
            Ok(have) if have == self.marker_text() => true,
            Ok(have) => {
                return Err(StartError::Refused(format!(
                    "data dir {} belongs to another replica ({}), not cluster={:#x} node={}",
                    dir.display(),
                    have.trim(),
                    self.cluster,
                    self.node
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(StartError::io(
                    format!("cannot read boot marker {}", marker.display()),
                    e,
                ))
            }
        };
        let pending = dir.join(REJOIN_MARKER).exists();
        let promise = dir.join(PROMISE).exists();
        let w = &self.wording;
        if !self.durable {
            let durable_files = durable_files(dir);
            if pending || !durable_files.is_empty() {
                let mut names: Vec<String> = durable_files;
                if pending {
                    names.push(REJOIN_MARKER.into());
                }
                names.truncate(3);
                return Err(StartError::Refused(format!(
                    "data dir {} holds durable state ({}, ...): it was run in {}; refusing to \
                     start it in {}, which would forget what it promised and accepted there. \
                     Start it with {} (every replica of a cluster runs in the same mode; to \
                     give up its durable state, remove the data dir and start it with {})",
                    dir.display(),
                    names.join(", "),
                    w.durable,
                    w.volatile,
                    w.durable,
                    w.existing,
                )));
            }
        }
        if pending {
            return Ok(Boot::Rejoin);
        }
        let existing = self.initial == Some(InitialClusterState::Existing);
        if !had_marker {
            return match self.initial {
                Some(InitialClusterState::New) => Ok(Boot::Fresh),
                Some(InitialClusterState::Existing) => Ok(Boot::Rejoin),
                None => Err(StartError::Refused(format!(
                    "data dir {} holds no state of replica {} of cluster {:#x} (it is missing, \
                     empty or was wiped): refusing to guess whether this is a first start. If \
                     this is the first start of a new cluster, start it with {}; if this \
                     replica is an existing member whose data was lost, start it with {} (it \
                     rebuilds its state from a majority of the others before it takes part)",
                    dir.display(),
                    self.node,
                    self.cluster,
                    w.new,
                    w.existing
                ))),
            };
        }
        if self.durable && !promise {
            // Durable state gone although the marker is there.
            return if existing {
                Ok(Boot::Rejoin)
            } else {
                Err(StartError::Refused(format!(
                    "data dir {} has a boot marker but no durable state (was it run in \
                     volatile mode, or was its state deleted?): refusing to start a durable \
                     replica that may have forgotten promises (if this replica's data was \
                     lost, start it with {})",
                    dir.display(),
                    w.existing
                )))
            };
        }
        Ok(Boot::Restart)
    }

    /// Starts the node: inspects the data dir ([`plan`](Self::plan)), builds the fabric
    /// with `fabric`, then (only then) writes to the data dir, opens or rebuilds the
    /// storage and starts the replica thread.
    pub fn start<F: Fabric + 'static>(
        mut self,
        fabric: impl FnOnce(FabricSetup) -> Result<F, StartError>,
    ) -> Result<Node, StartError> {
        let boot = self.plan()?;
        let dir = self.data_dir.clone();
        let had_marker = dir.join(BOOT_MARKER).exists();
        let recovering = boot.recovering(self.durable);
        let mut pc = Config::new(
            self.node,
            self.members.clone(),
            self.ring,
            crate::runtime::clock_seed(self.node),
        );
        if let Some(b) = self.batch_bytes {
            pc.batch_bytes = b;
        }
        pc.heartbeat_timeout = self
            .heartbeat_timeout
            .as_millis()
            .clamp(1, u32::MAX as u128) as u32;
        pc.election_timeout = self.election_timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
        if self.durable {
            pc.durability = Durability::Durable;
        }
        if let Some(t) = self.tune.take() {
            t(&mut pc);
        }
        pc.validate()?;
        let region = Region::anonymous(RegionInfo {
            cluster: self.cluster,
            node: self.node,
            ring: self.ring,
        })
        .map_err(|e| StartError::io("cannot allocate the region", e))?;
        // The fabric binds before anything is written.
        let fabric = fabric(FabricSetup {
            node: self.node,
            cluster: self.cluster,
            region: Arc::new(region),
            boot,
            restarted: boot != Boot::Fresh,
        })?;
        // From here on the data dir is written.
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError::io(format!("cannot create data dir {}", dir.display()), e))?;
        if self.initial == Some(InitialClusterState::New) && boot != Boot::Fresh {
            tracing::warn!(
                "{} ignored: the data dir holds this replica's state (give it only on the \
                 cluster's first start)",
                self.wording.new
            );
            (self.notice)(&format!(
                "{} ignored: {} holds this replica's state (give it only on the cluster's \
                 first start)",
                self.wording.new,
                dir.display()
            ));
        }
        let (core, storage, checkpoints, sm) = if self.durable {
            if boot == Boot::Rejoin && !dir.join(REJOIN_MARKER).exists() {
                // Durable before anything else: a crash from here on rejoins again.
                Persister::mark_rejoining(&dir).map_err(|source| StartError::Storage {
                    what: format!("cannot write the rejoin marker in {}", dir.display()),
                    source,
                })?;
            }
            let d = self.open_durable(pc, boot)?;
            let storage = Some(Box::new(d.persister) as Box<dyn Storage>);
            (d.core, storage, d.checkpoints, d.sm)
        } else {
            // A volatile restart is amnesiac: checkpoints of an earlier run are not used.
            let mut ck = open_checkpoints(&dir)?;
            ck.clear()
                .map_err(|e| StartError::io(format!("cannot clear {}", ck.dir().display()), e))?;
            if boot == Boot::Rejoin {
                self.rejoin_notice();
            }
            let core = Core::new(pc, recovering)?;
            (core, None, ck, (self.make)())
        };
        if !had_marker {
            write_marker(&dir, &self.marker_text())?;
        }
        let checkpoints: Box<dyn Checkpoints> = Box::new(checkpoints);
        let replica = Replica::new(core, fabric, sm, storage)
            .with_checkpoints(checkpoints, self.checkpoint)
            .with_metrics(self.metrics.clone());
        let runtime = Runtime::start(replica, self.runtime.clone())
            .map_err(|e| StartError::io("cannot start the replica thread", e))?;
        let handle = runtime.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let watch = match self.stall_warning {
            Some(every) => {
                let w = Watch {
                    handle: handle.clone(),
                    stop: stop.clone(),
                    every,
                    boot,
                    durable: self.durable,
                    members: self.members.clone(),
                    wording: self.wording.clone(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("ballot-watch".into())
                        .spawn(move || w.run())
                        .map_err(|e| StartError::io("cannot start the watcher thread", e))?,
                )
            }
            None => None,
        };
        Ok(Node {
            runtime: Some(Box::new(runtime)),
            handle,
            boot,
            recovering,
            stop,
            watch,
        })
    }

    fn rejoin_notice(&self) {
        tracing::warn!("rejoining: recovering the state from a majority");
        (self.notice)(
            "rejoining with an empty data dir: recovering from a majority before taking part",
        );
    }

    /// Durable mode: recovers the promise, the newest checkpoint that verifies and the log
    /// after it from the data dir (torn tail cut and reported; corruption refused, naming
    /// file and offset) and rebuilds the core from them. A rejoin starts from nothing,
    /// recovering.
    fn open_durable(&mut self, pc: Config, boot: Boot) -> Result<Durable<S>, StartError> {
        let dir = self.data_dir.clone();
        if boot == Boot::Rejoin {
            wipe_durable(&dir)?;
        }
        let mut checkpoints = open_checkpoints(&dir)?;
        if boot == Boot::Rejoin {
            checkpoints.clear().map_err(|e| {
                StartError::io(format!("cannot clear {}", checkpoints.dir().display()), e)
            })?;
        }
        let mut opts = PersisterOptions::default();
        opts.log.segment_bytes = self.segment_bytes;
        opts.metrics = Some(self.metrics.clone());
        let (mut persister, rec) =
            Persister::open(&dir, opts).map_err(|source| StartError::Unrecoverable {
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
            (self.notice)(&format!(
                "recovery: torn tail truncated in {} at offset {} ({} bytes discarded: {})",
                t.file.display(),
                t.offset,
                t.discarded_bytes,
                t.reason
            ));
        }
        if boot == Boot::Rejoin {
            debug_assert!(rec.rejoining);
            self.rejoin_notice();
            let core = Core::new(pc, true)?;
            return Ok(Durable {
                core,
                persister,
                checkpoints,
                sm: (self.make)(),
            });
        }
        let first = rec.first_index;
        let (base, sm) = self.restore_checkpoint(&mut checkpoints, first)?;
        let mut entries = rec.entries;
        if let Some(f) = first {
            let covered = (base + 1).saturating_sub(f) as usize;
            entries.drain(..covered.min(entries.len()));
        }
        if base > 0 {
            // Entries the checkpoint covers go (a log that ends below it is emptied, so that
            // the next append, at base + 1, is accepted).
            persister
                .compact(base)
                .map_err(|source| StartError::Storage {
                    what: format!("cannot compact the log in {}", dir.display()),
                    source,
                })?;
        }
        tracing::info!(
            promised = %rec.promise.ballot,
            blank = rec.promise.blank != 0,
            checkpoint = base,
            entries = entries.len(),
            rewrite_replayed = ?rec.rewrite_replayed,
            rewrite_discarded = rec.rewrite_discarded,
            "recovered durable state"
        );
        let nothing = rec.promise == PromiseRecord::default() && base == 0 && entries.is_empty();
        let core = if boot == Boot::Fresh && nothing {
            // A first start boots blank (as the simulator's replicas do): its votes carry a
            // blank id, which it keeps durably until a leader establishes it, so that a
            // data dir wiped and started as new can never pass for one that remembers.
            Core::new(pc, false)?
        } else {
            Core::restore(pc, rec.promise, base, entries)?
        };
        Ok(Durable {
            core,
            persister,
            checkpoints,
            sm,
        })
    }

    /// Restores the state machine from the newest checkpoint that verifies and that the log
    /// continues (it starts at or before the checkpoint's index + 1). Corrupt newer ones are
    /// set aside (renamed `….corrupt`) and reported. Returns the checkpoint index (0: none).
    fn restore_checkpoint(
        &mut self,
        ck: &mut FileCheckpoints,
        first: Option<Index>,
    ) -> Result<(Index, S), StartError> {
        let dir = self.data_dir.clone();
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
            let mut sm = (self.make)();
            match ck.open(info.index).and_then(|mut r| sm.restore(&mut r)) {
                Ok(()) => {
                    chosen = Some((info.index, sm));
                    break;
                }
                Err(e) => {
                    let path = ck.path_of(info.index);
                    tracing::error!(file = %path.display(), "checkpoint does not verify: {e}");
                    (self.notice)(&format!(
                        "recovery: checkpoint {} does not verify: {e}",
                        path.display()
                    ));
                    corrupt.push((info.index, e.to_string()));
                }
            }
        }
        let chosen = match chosen {
            Some(c) => c,
            // No usable checkpoint: the log must hold everything from index 1.
            None if covers(0) => (0, (self.make)()),
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
                return Err(StartError::Refused(format!(
                    "cannot recover the durable state in {}: {why}the log starts at index {f} \
                     ({}) and {older}: entries before {f} are missing; refusing to start",
                    dir.display(),
                    seg(f).display()
                )));
            }
        };
        for (i, e) in corrupt {
            let to = ck.set_aside(i).map_err(|err| {
                StartError::io(
                    format!("cannot set aside the corrupt checkpoint at {i}"),
                    err,
                )
            })?;
            let from = if chosen.0 == 0 {
                "the log alone".to_string()
            } else {
                ck.path_of(chosen.0).display().to_string()
            };
            tracing::warn!(
                file = %to.display(),
                "recovery: corrupt checkpoint set aside ({e}); restored from {from}"
            );
            (self.notice)(&format!(
                "recovery: corrupt checkpoint set aside as {} ({e}); restored from {from}",
                to.display(),
            ));
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
}

/// What a durable replica starts from.
struct Durable<S> {
    core: Core,
    persister: Persister,
    checkpoints: FileCheckpoints,
    sm: S,
}

/// The files of durable mode in `dir` (the promise, log segments, rewrite files).
fn durable_files(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_durable_file(n))
        .collect();
    out.sort();
    out
}

fn is_durable_file(name: &str) -> bool {
    (name.starts_with("seg-") && name.ends_with(".log"))
        || name == PROMISE
        || name == REWRITE_TMP
        || name == REWRITE_LOG
}

/// Writes the boot marker durably (temporary file, fsync, rename, directory fsync).
fn write_marker(dir: &Path, text: &str) -> Result<(), StartError> {
    let path = dir.join(BOOT_MARKER);
    let tmp = dir.join(format!("{BOOT_MARKER}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| StartError::io(format!("cannot write boot marker {}", path.display()), e))
}

/// Removes the durable log, promise and rewrite files (a rejoin starts from nothing; the
/// rejoin marker stays).
fn wipe_durable(dir: &Path) -> Result<(), StartError> {
    let list = |e| StartError::io(format!("cannot list {}", dir.display()), e);
    let rd = std::fs::read_dir(dir).map_err(list)?;
    for ent in rd {
        let ent = ent.map_err(list)?;
        if is_durable_file(&ent.file_name().to_string_lossy()) {
            let p = ent.path();
            std::fs::remove_file(&p)
                .map_err(|e| StartError::io(format!("cannot remove {}", p.display()), e))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StartError::io(format!("cannot sync {}", dir.display()), e))
}

fn open_checkpoints(dir: &Path) -> Result<FileCheckpoints, StartError> {
    let ck_dir = dir.join(CHECKPOINT_DIR);
    FileCheckpoints::open(&ck_dir).map_err(|source| StartError::Unrecoverable {
        what: format!("cannot open the checkpoints in {}", ck_dir.display()),
        source,
    })
}

/// The running replica thread, whatever its fabric.
trait Running: Send {
    fn stop(self: Box<Self>);
}

impl<F: Fabric + 'static, S: StateMachine + 'static> Running for Runtime<F, S> {
    fn stop(self: Box<Self>) {
        (*self).shutdown();
    }
}

/// A running replica: its [`Handle`], how it started, and a watcher that warns while it
/// cannot make progress. Dropping it stops it.
pub struct Node {
    runtime: Option<Box<dyn Running>>,
    handle: Handle,
    boot: Boot,
    recovering: bool,
    stop: Arc<AtomicBool>,
    watch: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("boot", &self.boot)
            .field("recovering", &self.recovering)
            .field("handle", &self.handle)
            .finish()
    }
}

impl Node {
    /// Proposes to, and observes, the replica.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
    /// How this start related to the data dir.
    pub fn boot(&self) -> Boot {
        self.boot
    }
    /// Whether the replica started with no memory, rebuilding from a majority.
    pub fn recovering(&self) -> bool {
        self.recovering
    }
    /// Stops the replica thread (queued proposals fail with `ShuttingDown`) and the
    /// watcher.
    pub fn shutdown(mut self) {
        self.stop_all();
    }
    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(r) = self.runtime.take() {
            r.stop();
        }
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Warns, every `every`, while the replica stays recovering or without a leader.
struct Watch {
    handle: Handle,
    stop: Arc<AtomicBool>,
    every: Duration,
    boot: Boot,
    durable: bool,
    members: Vec<NodeId>,
    wording: Wording,
}

/// Why a replica cannot make progress, as the watcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    Recovering,
    Leaderless,
}

impl Watch {
    fn run(self) {
        let mut since: Option<(Stall, Instant)> = None;
        let mut warned = None::<Instant>;
        let tick = Duration::from_millis(100).min(self.every);
        while !self.stop.load(Ordering::Acquire) && !self.handle.is_stopped() {
            std::thread::sleep(tick);
            let st = self.handle.status();
            let now = Instant::now();
            let stall = match st.role {
                Role::Recovering => Some(Stall::Recovering),
                Role::Leader | Role::Stopped => None,
                _ if st.leader_hint.is_none() => Some(Stall::Leaderless),
                _ => None,
            };
            since = match (stall, since) {
                (None, _) => None,
                (Some(s), Some((was, t))) if s == was => Some((was, t)),
                (Some(s), _) => Some((s, now)),
            };
            let Some((s, t)) = since else {
                warned = None;
                continue;
            };
            let due = match warned {
                None => now - t >= self.every,
                Some(w) => now - w >= self.every,
            };
            if due {
                warned = Some(now);
                self.warn(s, (now - t).as_secs());
            }
        }
    }

    fn warn(&self, s: Stall, secs: u64) {
        let id = self.handle.status().node;
        let n = self.members.len();
        let others: Vec<NodeId> = self.members.iter().copied().filter(|&m| m != id).collect();
        let quorum = n / 2 + 1;
        let w = &self.wording;
        match s {
            Stall::Recovering => {
                let why = match self.boot {
                    Boot::Restart if !self.durable => {
                        "restarted in volatile mode, it forgot its promises and log"
                    }
                    Boot::Rejoin => "its data was lost (rejoin)",
                    _ => "its peers knew it with a memory it no longer has",
                };
                tracing::warn!(
                    node = id,
                    "still recovering after {secs}s: {why}, so it neither votes nor \
                     acknowledges until a majority of the replicas ({quorum} of {n}: this one \
                     and at least {} of nodes {others:?}) answered with their state; only a \
                     replica that follows an established leader answers. Missing: those \
                     answers. To do: start the other replicas with their data and check that \
                     the fabric reaches them. If a majority of the replicas lost their state at \
                     once (a volatile majority restarted, or their data dirs were lost), no \
                     replica can rebuild it and this wait never ends: stop every replica, \
                     remove every data dir and start a new cluster with {} (acknowledged \
                     writes are lost)",
                    quorum - 1,
                    w.new
                );
            }
            Stall::Leaderless => {
                tracing::warn!(
                    node = id,
                    "no leader for {secs}s: an election needs a majority of the replicas \
                     ({quorum} of {n}) up, reachable on the fabric and not recovering. Missing: \
                     a reachable majority among nodes {others:?} and this one. To do: start \
                     the replicas that are down, and check the fabric addresses, the cluster \
                     id and the cluster key"
                );
            }
        }
    }
}
