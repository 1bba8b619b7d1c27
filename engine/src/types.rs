//! Identifiers shared by every layer.

/// A replica's id: its position in the cluster configuration.
pub type NodeId = u8;
/// A log index. Index 0 is "nothing": the first entry is 1.
pub type Index = u64;

/// Upper bound on the number of replicas (the region header has a progress cell for each).
pub const MAX_NODES: usize = 16;

/// A Paxos ballot `(round, node)`, totally ordered by round then node, packed into a u64 so
/// that it is one word in memory cells. `Ballot::ZERO` is below every real ballot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ballot(pub u64);

impl Ballot {
    pub const ZERO: Ballot = Ballot(0);

    pub fn new(round: u64, node: NodeId) -> Self {
        assert!(round < 1 << 56, "ballot round overflow");
        Ballot(round << 8 | u64::from(node))
    }
    pub fn round(self) -> u64 {
        self.0 >> 8
    }
    pub fn node(self) -> NodeId {
        (self.0 & 0xff) as NodeId
    }
    /// The smallest ballot of `node` above `self`.
    pub fn next_for(self, node: NodeId) -> Self {
        Ballot::new(self.round() + 1, node)
    }
}

impl std::fmt::Display for Ballot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.round(), self.node())
    }
}

/// xorshift64*, the one deterministic generator of the core, `MemFabric` and the simulator:
/// everything random derives from a seed so that runs replay exactly.
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
