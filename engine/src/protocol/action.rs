//! What the core asks of its driver: actions, the bytes and tokens of one-sided writes,
//! and why a proposal was refused.

use super::msg::Msg;
use crate::types::{Ballot, Index, NodeId, PromiseRecord};
use std::sync::Arc;

/// Why a proposal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProposeError {
    /// This replica does not lead; `leader` is the one it believes leads, if any.
    NotLeader {
        /// The leader this replica believes in, if any: retry there.
        leader: Option<NodeId>,
    },
    /// The command does not fit in one log entry.
    TooLarge {
        /// The command's length.
        len: usize,
        /// The largest command this cluster accepts.
        max: usize,
    },
    /// The queue is full; retry later.
    Busy,
    /// The replica is stopping (or stopped): the command was not proposed.
    ShuttingDown,
    /// Leadership was lost while the command was in the log: it may or may not be applied.
    Indeterminate,
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLeader { leader: Some(l) } => write!(f, "not the leader; try node {l}"),
            Self::NotLeader { leader: None } => write!(f, "not the leader; leader unknown"),
            Self::TooLarge { len, max } => write!(f, "command of {len} bytes exceeds {max}"),
            Self::Busy => write!(f, "proposal queue full"),
            Self::ShuttingDown => write!(f, "replica shutting down"),
            Self::Indeterminate => write!(f, "leadership lost; outcome unknown"),
        }
    }
}

impl std::error::Error for ProposeError {}

/// Bytes of a one-sided write: a shared entry or a small inline cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Data {
    /// An encoded log entry, shared with the log (no copy per follower).
    Shared(Arc<[u8]>),
    /// A small write (a cell), copied: no allocation per heartbeat or progress report.
    Inline {
        /// The bytes, `len` of them used.
        buf: [u8; 64],
        /// Bytes used.
        len: u8,
    },
}

impl Data {
    pub(super) fn inline(b: &[u8]) -> Data {
        let mut buf = [0u8; 64];
        buf[..b.len()].copy_from_slice(b);
        Data::Inline {
            buf,
            len: b.len() as u8,
        }
    }
    /// The bytes to write.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Data::Shared(a) => a,
            Data::Inline { buf, len } => &buf[..*len as usize],
        }
    }
}

/// What the core asks of its driver, polled with `Core::poll_action`.
///
/// **The driver executes actions in the order they are queued**, one completing before the
/// next begins (a `PersistPromise` is durable before the `Send` after it; `BeginRejoin` is
/// durable before anything after it). The core queues at the back, with two exceptions,
/// both at the front:
/// - `Core::handle_fenced` splices what the fence decided (the promise, its new stream and
///   writer, or a candidacy's Prepares) *ahead* of every action queued while the fence was
///   being put up: otherwise an earlier `FenceAndDrain` (a later candidacy's revocation)
///   could run before this promise's `SetWriter` and be undone by it. The spliced actions
///   keep their own order.
/// - `CompactLog` after a compaction or a checkpoint install goes to the very front: the
///   storage drops the covered entries before any persist still queued (which now starts
///   after the checkpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Post a one-sided write of `data` at `offset` in `peer`'s region; its completion comes
    /// back to `Core::handle_completion` with `token`.
    Write {
        /// The peer whose region is written.
        peer: NodeId,
        /// Offset in that region.
        offset: usize,
        /// The bytes.
        data: Data,
        /// Returned with the completion.
        token: Token,
    },
    /// Post a one-sided read of `len` bytes at `offset` in `peer`'s region.
    Read {
        /// The peer whose region is read.
        peer: NodeId,
        /// Offset in that region.
        offset: usize,
        /// Bytes to read.
        len: usize,
        /// Returned with the completion.
        token: Token,
    },
    /// Send a control message.
    Send {
        /// The addressee.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// Grant ring write permission to this node alone.
    SetWriter(Option<NodeId>),
    /// Revoke every peer's write permission, feed every complete entry still in the ring to
    /// `handle_landed`, then call `handle_fenced`.
    FenceAndDrain,
    /// Restart reading the local ring at slot 0: entries of `ballot` from index `expect`.
    ResetRing {
        /// The stream's ballot.
        ballot: Ballot,
        /// The first index the stream carries.
        expect: Index,
    },
    /// Make the promise (and whether this incarnation is still blank) durable before
    /// executing the next action.
    PersistPromise(PromiseRecord),
    /// Durably write entries `from..=to` (replacing anything at or after `from`), then call
    /// `handle_persisted(seq)`.
    Persist {
        /// First index to persist.
        from: Index,
        /// Last index to persist.
        to: Index,
        /// Reported back to `Core::handle_persisted`.
        seq: u64,
    },
    /// Apply the committed entry at `index` (in order, exactly once per incarnation).
    Apply {
        /// The entry's index.
        index: Index,
        /// The encoded entry (a batch of commands, or a no-op).
        entry: Arc<[u8]>,
    },
    /// Publish the heartbeat counter in the local header.
    Heartbeat(u64),
    /// Complete the local proposal `ticket` with `error`.
    Reject {
        /// The ticket `Core::propose` returned.
        ticket: u64,
        /// Why it failed.
        error: ProposeError,
    },
    /// Outstanding proposals of this replica may or may not be applied.
    LeadershipLost,
    /// This replica now leads in this ballot (the driver logs it).
    BecameLeader(Ballot),
    /// Send `to` a chunk of the image of checkpoint `index` (0: the newest) from `offset`,
    /// as [`Msg::CkptChunk`] (the driver holds the checkpoints and paces this).
    ServeCheckpoint {
        /// The replica pulling the checkpoint.
        to: NodeId,
        /// The checkpoint (0: the newest kept).
        index: Index,
        /// Where in the image the chunk starts.
        offset: u64,
    },
    /// Stage a chunk of an incoming checkpoint image (offset 0 starts over).
    StageCheckpoint {
        /// The checkpoint being received.
        index: Index,
        /// Where in the image the chunk goes.
        offset: u64,
        /// The chunk.
        data: Vec<u8>,
    },
    /// The staged image of checkpoint `index` is complete: verify it, keep it, restore the
    /// state machine from it, then call `handle_checkpoint_installed`.
    InstallCheckpoint {
        /// The checkpoint.
        index: Index,
        /// Its image's length.
        len: u64,
    },
    /// Persisted entries up to `upto` are covered by a checkpoint (`Storage::compact`).
    CompactLog {
        /// Last index the checkpoint covers.
        upto: Index,
    },
    /// A durable replica that rebuilt its state from the others (its data dir was lost)
    /// now holds that state durably: from here on a restart may trust its disk.
    Rejoined,
    /// A replica that booted with no memory was told by a peer that the cluster has a
    /// history: it rebuilds from the others. Durably mark the data dir as rejoining before
    /// the next action, so that a crash mid-rebuild rebuilds again (`Storage::begin_rejoin`).
    BeginRejoin,
}

/// The token of a one-sided write or read, returned with its completion: its kind in the
/// top byte, the write generation of the peer's stream (low 16 bits) and the index
/// (40 bits). The generation keeps completions of an earlier stream or leadership from
/// being counted in a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(u64);

/// What a [`Token`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An entry written into a follower's ring.
    Entry,
    /// The wrap marker before an entry placed at the ring's slot 0.
    Wrap,
    /// A follower's commit cell (also the leader's periodic probe).
    Commit,
    /// Our progress cell at the leader.
    Progress,
    /// A read of the leader's heartbeat counter.
    Heartbeat,
}

impl Token {
    /// Progress-cell writes (no generation, no index).
    pub const PROGRESS: Token = Token(4 << 56);
    /// Heartbeat reads.
    pub const HEARTBEAT: Token = Token(5 << 56);

    /// The token of a write of `kind` to a peer's stream of write generation `gen`.
    pub fn write(kind: TokenKind, gen: u64, index: Index) -> Token {
        let k: u64 = match kind {
            TokenKind::Entry => 1,
            TokenKind::Wrap => 2,
            TokenKind::Commit => 3,
            TokenKind::Progress => 4,
            TokenKind::Heartbeat => 5,
        };
        Token(k << 56 | (gen & 0xffff) << 40 | (index & ((1 << 40) - 1)))
    }
    /// The token as the fabric carries it.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// A token back from the fabric.
    pub const fn from_raw(t: u64) -> Token {
        Token(t)
    }
    /// Its kind (`None`: not a token of the core).
    pub fn kind(self) -> Option<TokenKind> {
        Some(match self.0 >> 56 {
            1 => TokenKind::Entry,
            2 => TokenKind::Wrap,
            3 => TokenKind::Commit,
            4 => TokenKind::Progress,
            5 => TokenKind::Heartbeat,
            _ => return None,
        })
    }
    /// The write generation, low 16 bits.
    pub fn gen(self) -> u64 {
        (self.0 >> 40) & 0xffff
    }
    /// The index of a write (an entry's, or the commit a commit cell carries).
    pub fn index(self) -> Index {
        self.0 & ((1 << 40) - 1)
    }
}

impl std::fmt::LowerHex for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}
