//! The `Fabric` trait: what the replica driver needs from a network.
//!
//! One-sided WRITE/READ into a peer's region with completions, small control messages, and
//! write permission on the local region. `MemFabric` (in process, fault injection),
//! `ballot_tcp::TcpFabric` and `ballot_verbs::RdmaFabric` implement it; the driver cannot
//! tell them apart, because all of them land the same bytes at the same offsets.

use crate::metrics::FabricCounters;
use crate::region::Region;
use crate::types::NodeId;
use std::sync::Arc;

/// Largest control message. Fabrics fragment internally where their transport needs it.
pub const MAX_CONTROL: usize = crate::layout::MAX_PAYLOAD + (64 << 10);

/// Why a fabric operation failed, either when it was posted or in its [`Completion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricError {
    /// No RDMA device (or no RDMA support at all in this kernel).
    NoDevice(String),
    /// The peer is not in this fabric's cluster.
    UnknownPeer(NodeId),
    /// The connection to the peer is down; outstanding operations fail with this.
    Disconnected(NodeId),
    /// The peer refused the write: we do not hold its write permission (we were fenced).
    PermissionDenied(NodeId),
    /// The peer refused an access outside its region.
    OutOfBounds(NodeId),
    /// A control message longer than the fabric carries ([`MAX_CONTROL`]).
    TooLarge {
        /// The message's length.
        len: usize,
        /// The largest this fabric accepts.
        max: usize,
    },
    /// Too many operations outstanding; poll completions and retry.
    Busy,
    /// Any other failure of the transport, with its cause.
    Io(IoError),
}

impl FabricError {
    /// An [`FabricError::Io`] caused by `e`.
    pub fn io(e: std::io::Error) -> Self {
        Self::Io(IoError(Arc::new(e)))
    }
}

impl From<std::io::Error> for FabricError {
    fn from(e: std::io::Error) -> Self {
        Self::io(e)
    }
}

/// The cause of a [`FabricError::Io`]: an `io::Error` (which may wrap the fabric's own
/// error, see [`std::io::Error::get_ref`]), shared because completions are cloned, and
/// compared by kind and message.
#[derive(Debug, Clone)]
pub struct IoError(Arc<std::io::Error>);

impl IoError {
    /// The underlying error.
    pub fn get(&self) -> &std::io::Error {
        &self.0
    }
    /// Its kind, for matching without the message.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.0.kind()
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string())
    }
}
impl Eq for IoError {}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for FabricError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDevice(s) => write!(f, "no RDMA device: {s}"),
            Self::UnknownPeer(p) => write!(f, "unknown peer {p}"),
            Self::Disconnected(p) => write!(f, "peer {p} disconnected"),
            Self::PermissionDenied(p) => write!(f, "peer {p} denied remote write permission"),
            Self::OutOfBounds(p) => write!(f, "peer {p} refused an out-of-bounds access"),
            Self::TooLarge { len, max } => write!(f, "message of {len} bytes exceeds {max}"),
            Self::Busy => write!(f, "too many operations outstanding"),
            Self::Io(s) => write!(f, "I/O error: {s}"),
        }
    }
}
impl std::error::Error for FabricError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e.get()),
            _ => None,
        }
    }
}

/// A finished one-sided operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// A [`Fabric::write`] finished: the bytes are in the peer's memory, or they never will be.
    Write {
        /// The peer whose region was written.
        peer: NodeId,
        /// The caller's token given to [`Fabric::write`].
        token: u64,
        /// `Err` if the write did not land (`PermissionDenied`: the peer fenced us).
        result: Result<(), FabricError>,
    },
    /// A [`Fabric::read`] finished, with the bytes read.
    Read {
        /// The peer whose region was read.
        peer: NodeId,
        /// The caller's token given to [`Fabric::read`].
        token: u64,
        /// The bytes read, or why not.
        result: Result<Vec<u8>, FabricError>,
    },
}

/// Something that happened on the fabric since the last poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricEvent {
    /// A one-sided operation posted earlier finished.
    Completion(Completion),
    /// A control message from an authenticated peer.
    Message {
        /// The sender.
        from: NodeId,
        /// The message, as sent (at most [`MAX_CONTROL`] bytes).
        bytes: Vec<u8>,
    },
}

/// The network as the replica driver sees it: one-sided writes and reads into peers'
/// regions, control messages, and write permission on the local ring (fencing).
///
/// An implementation is driven from one thread and never blocks: operations are posted and
/// their outcome arrives later through [`Fabric::poll`]. Every fabric must land the same
/// bytes at the same offsets ([`crate::layout`]), so the protocol cannot tell fabrics apart.
pub trait Fabric: Send {
    /// This replica's id.
    fn node(&self) -> NodeId;

    /// The local region that peers write into.
    fn region(&self) -> &Arc<Region>;

    /// Posts a one-sided write of `data` at `offset` in `peer`'s region. Completes (through
    /// [`Fabric::poll`]) once the bytes are in the peer's memory, or with an error: a
    /// `PermissionDenied` completion means the peer fenced us. Writes to one peer complete
    /// in the order they were posted. The fabric may defer the doorbell until `flush`.
    fn write(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError>;

    /// Posts a one-sided read of `len` bytes at `offset` in `peer`'s region.
    fn read(
        &mut self,
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), FabricError>;

    /// Sends a control message (at most [`MAX_CONTROL`] bytes). Delivery is best effort:
    /// the protocol retries what matters.
    fn send(&mut self, peer: NodeId, msg: &[u8]) -> Result<(), FabricError>;

    /// Makes everything posted so far go out (one doorbell / one system call per peer).
    /// Never blocks, whatever a peer does: a peer that stops taking bytes (a stopped
    /// process) must not stall the caller, whose heartbeat and answers would stop too.
    fn flush(&mut self) -> Result<(), FabricError>;

    /// Appends what happened since the last call to `out`, without blocking. Returns the
    /// number of events appended.
    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize;

    /// Grants write permission on the local ring to `writer` alone and revokes it from every
    /// other peer. When this returns, no write from a revoked peer can land any more.
    fn set_writer(&mut self, writer: Option<NodeId>) -> Result<(), FabricError>;

    /// The fabric's per-peer counters, readable from other threads, if it keeps them in
    /// this form (the RDMA fabric does; the TCP fabric exports richer ones of its own).
    /// The replica publishes them in its [`crate::metrics::Metrics`].
    fn counters(&self) -> Option<Arc<dyn FabricCounters>> {
        None
    }
}
