//! The configuration of a replica.

use super::msg::{self};
use super::planted::PlantedBugs;
use crate::layout::RingGeometry;
use crate::types::NodeId;

/// When an entry counts as chosen: the cluster-wide failure model, the same on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Chosen once a majority (leader counted) holds the entry in memory, as in Mu.
    Volatile,
    /// Chosen once a majority (leader counted after its own sync) has persisted it.
    Durable,
}

/// A replica's protocol configuration: [`Config::new`] gives defaults for 1 tick = 1 ms;
/// [`Config::validate`] (called by `Core::new`) checks it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// This replica.
    pub id: NodeId,
    /// All replicas, sorted, `id` included.
    pub members: Vec<NodeId>,
    /// The ring geometry, the same on every replica.
    pub ring: RingGeometry,
    /// When entries count as chosen.
    pub durability: Durability,
    /// Entries in flight beyond the commit index.
    pub window: u64,
    /// Payload bytes the leader packs into one entry.
    pub batch_bytes: usize,
    /// Client commands queued at the leader before `propose` says `Busy`.
    pub max_queue: usize,
    /// Ticks without a heartbeat change before a follower suspects its leader.
    pub heartbeat_timeout: u32,
    /// Ticks a candidate waits for promises.
    pub election_timeout: u32,
    /// Writes outstanding per follower.
    pub max_outstanding: u32,
    /// Entry bytes per promise or recovery message (larger answers are chunked).
    pub message_bytes: usize,
    /// Seeds ticket numbers, stream ids and incarnation numbers (see [`Config::new`]).
    pub seed: u64,
    /// Bugs planted on purpose, to measure the simulator's checks (none by default).
    pub bugs: PlantedBugs,
}

/// Why [`Config::validate`] refused a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `id` is not in `members`.
    NotAMember(NodeId),
    /// The member list is empty, too long, unsorted, repeats an id or uses an id of
    /// [`crate::MAX_NODES`] or more.
    BadMembers(String),
    /// `batch_bytes` exceeds what one entry of the ring can carry.
    BatchTooLarge {
        /// The configured batch size.
        batch: usize,
        /// The ring's largest payload ([`RingGeometry::max_payload`]).
        max: usize,
    },
    /// A setting that must be positive is 0.
    Zero(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAMember(n) => write!(f, "node {n} is not in the member list"),
            Self::BadMembers(s) => write!(f, "bad member list: {s}"),
            Self::BatchTooLarge { batch, max } => {
                write!(
                    f,
                    "batch of {batch} bytes exceeds the ring's entry limit {max}"
                )
            }
            Self::Zero(what) => write!(f, "{what} must be positive"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// A configuration with defaults suited to a real cluster (1 tick = 1 ms).
    ///
    /// `seed` seeds ticket numbers, stream ids and incarnation numbers: a real replica
    /// needs a different one on every start ([`crate::runtime::clock_seed`]); a fixed one
    /// makes a run reproducible (the simulator's, the tests').
    pub fn new(id: NodeId, members: Vec<NodeId>, ring: RingGeometry, seed: u64) -> Config {
        Config {
            id,
            members,
            ring,
            durability: Durability::Volatile,
            window: 256,
            batch_bytes: 64 << 10,
            max_queue: 1 << 16,
            heartbeat_timeout: 100,
            election_timeout: 100,
            max_outstanding: 256,
            message_bytes: msg::CHUNK_BYTES,
            seed,
            bugs: PlantedBugs::default(),
        }
    }

    /// Checks the configuration; a core is only built from one that passes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.members;
        if m.is_empty() || m.len() > crate::MAX_NODES {
            return Err(ConfigError::BadMembers(format!("{} members", m.len())));
        }
        if m.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ConfigError::BadMembers("not sorted and unique".into()));
        }
        if m.iter().any(|&n| n as usize >= crate::MAX_NODES) {
            return Err(ConfigError::BadMembers(format!(
                "ids must be below {}",
                crate::MAX_NODES
            )));
        }
        if !m.contains(&self.id) {
            return Err(ConfigError::NotAMember(self.id));
        }
        let max = self.ring.max_payload();
        if self.batch_bytes > max {
            return Err(ConfigError::BatchTooLarge {
                batch: self.batch_bytes,
                max,
            });
        }
        for (v, what) in [
            (self.window, "window"),
            (self.batch_bytes as u64, "batch_bytes"),
            (self.max_queue as u64, "max_queue"),
            (u64::from(self.heartbeat_timeout), "heartbeat_timeout"),
            (u64::from(self.election_timeout), "election_timeout"),
            (u64::from(self.max_outstanding), "max_outstanding"),
            (self.message_bytes as u64, "message_bytes"),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(what));
            }
        }
        Ok(())
    }

    /// Replicas in a majority (a quorum for both phases).
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }
}
