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
    /// Below every ballot a replica can hold: "never promised, never accepted".
    pub const ZERO: Ballot = Ballot(0);

    /// The ballot of `node` in `round`.
    ///
    /// # Panics
    /// If `round` does not fit in 56 bits (the low byte holds the node).
    ///
    /// ```
    /// use ballot::Ballot;
    /// let b = Ballot::new(7, 2);
    /// assert_eq!((b.round(), b.node()), (7, 2));
    /// assert!(Ballot::new(7, 3) > b && Ballot::new(8, 0) > Ballot::new(7, 3));
    /// assert_eq!(b.next_for(1), Ballot::new(8, 1));
    /// ```
    pub fn new(round: u64, node: NodeId) -> Self {
        assert!(round < 1 << 56, "ballot round overflow");
        Ballot(round << 8 | u64::from(node))
    }
    /// The round: compared first.
    pub fn round(self) -> u64 {
        self.0 >> 8
    }
    /// The replica that owns this ballot (breaks ties between equal rounds).
    pub fn node(self) -> NodeId {
        (self.0 & 0xff) as NodeId
    }
    /// The smallest ballot of `node` above `self`.
    pub fn next_for(self, node: NodeId) -> Self {
        Ballot::new(self.round() + 1, node)
    }
}

/// What an acceptor keeps durably before it answers (durable mode): its promise, whether it
/// is still the blank incarnation that booted with no memory (and which), and whether it
/// has learned that a value was chosen. A restart restores the same incarnation: blank
/// stays blank (a crash does not turn "remembers nothing of before" into "remembers"), and
/// a replica that knew a value was chosen keeps refusing the blank votes of peers it has no
/// record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PromiseRecord {
    /// The promised ballot (`Ballot::ZERO`: never promised).
    pub ballot: Ballot,
    /// The blank incarnation's id, 0 once the acceptor remembers (see `Promise::blank`).
    pub blank: u64,
    /// The acceptor learned that a value was chosen (a majority accepted it).
    pub saw_chosen: bool,
}

impl From<Ballot> for PromiseRecord {
    /// The record of an acceptor that remembers, promised `ballot` and knows of no value
    /// chosen.
    fn from(ballot: Ballot) -> Self {
        PromiseRecord {
            ballot,
            blank: 0,
            saw_chosen: false,
        }
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
