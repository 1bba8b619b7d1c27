//! Control messages of the protocol (phase 1, resync, recovery) and their codec.
//!
//! Entries inside messages travel in the layout's entry encoding, so they carry their own
//! checksum and seal. Decoding is total: any bytes give a message or a typed error.

use crate::layout::{self, LayoutError};
use crate::types::{Ballot, Index};
use std::sync::Arc;

/// Target size of one message's entry list; a promise or recovery answer larger than this
/// is sent in several chunks (one entry always fits: `MAX_CONTROL` > the largest entry).
pub const CHUNK_BYTES: usize = 1 << 20;

/// A control message between replicas. Everything bulky (entries) travels through one-sided
/// writes into rings; these carry phase 1, stream restarts, recovery and checkpoint pulls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Msg {
    /// Phase 1a: promise `ballot` and report what you accepted from `from` on. `blank`: the
    /// candidate booted with no memory and has not recovered (see [`Promise::blank`]).
    /// `gen`: 0 from a candidate; from a leader asking again a peer it lost track of, a
    /// generation ordered as in `Resync` (the answer starts a new stream and echoes it).
    Prepare {
        /// The candidate's ballot.
        ballot: Ballot,
        /// The first index whose accepted entries the answer must report.
        from: Index,
        /// The candidate's blank incarnation, 0 when it has a memory.
        blank: u64,
        /// 0, or the leader's new write generation for this peer.
        gen: u64,
    },
    /// Phase 1b, also sent to start a new stream under an already promised ballot.
    Promise(Promise),
    /// Refusal: the sender promised `promised`; `leader_alive` when it sees a live leader;
    /// `recover` when the receiver's vote was refused because it has no memory (`blank`)
    /// while the cluster has a history: it must rebuild its state before it votes.
    Nack {
        /// The ballot the sender has promised.
        promised: Ballot,
        /// The sender sees a live leader.
        leader_alive: bool,
        /// The receiver must rebuild its state before it votes.
        recover: bool,
    },
    /// Leader to follower: restart your ring stream (after failed writes), answering with a
    /// stream-only promise that echoes `gen`. The leader sends it only once none of its
    /// writes to you is in flight, with a `gen` above any it asked before: a follower
    /// restarts only for a `gen` above the last it answered, so a late duplicate never
    /// restarts a stream the leader is writing.
    Resync {
        /// The leader's ballot.
        ballot: Ballot,
        /// The new write generation.
        gen: u64,
    },
    /// A replica rebuilding after amnesia asks for the responder's state and its log
    /// from index `from` on (one chunk per request: the requester paces the transfer).
    RecoverReq {
        /// Matches answers to this request.
        nonce: u64,
        /// First index asked for.
        from: Index,
    },
    /// The answer to a [`Msg::RecoverReq`].
    RecoverResp(RecoverResp),
    /// Leader to follower: the entries you need next are compacted into a checkpoint; pull
    /// one from me, then promise a new stream echoing `gen` (ordered as in `Resync`).
    NeedCheckpoint {
        /// The leader's ballot.
        ballot: Ballot,
        /// The write generation the follower's next promise must echo.
        gen: u64,
    },
    /// Pull a chunk of the image of checkpoint `index` (0: your newest) from `offset`.
    CkptReq {
        /// The checkpoint (0: the newest kept).
        index: Index,
        /// Where in the image to start.
        offset: u64,
    },
    /// A chunk of checkpoint `index`'s image of `total` bytes (`total` 0: none to give).
    CkptChunk {
        /// The checkpoint.
        index: Index,
        /// Where in the image this chunk starts.
        offset: u64,
        /// The image's length (0: none to give).
        total: u64,
        /// The chunk.
        data: Vec<u8>,
    },
}

/// `Promise::from` of a promise that only (re)starts a ring stream and reports no entries.
pub const STREAM_ONLY: Index = Index::MAX;

/// Phase 1b: an acceptor's promise of a ballot, its state, and its accepted entries from
/// `from` on, possibly in several chunks; also (stream-only) the start of a new ring stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Promise {
    /// The ballot promised.
    pub ballot: Ballot,
    /// The `from` of the Prepare this answers (entries from there on are included), or
    /// [`STREAM_ONLY`].
    pub from: Index,
    /// The follower's new ring stream: the leader writes it from slot 0.
    pub stream: u64,
    /// Write the stream from `received + 1`...
    pub received: Index,
    /// ...at the slot after the `consumed` slots its reader has consumed (0 for a fresh
    /// stream; more when the reader read before this promise, e.g. a repeated answer).
    pub consumed: u64,
    /// The acceptor's durable end (durable mode).
    pub persisted: Index,
    /// The acceptor's commit index.
    pub commit: Index,
    /// The acceptor's compacted prefix: entries up to here are in its checkpoint only.
    pub base: Index,
    /// This chunk's number, from 0.
    pub chunk: u32,
    /// Chunks in the whole answer.
    pub chunks: u32,
    /// Not 0: the acceptor booted with no memory (a first start, or a lost data dir
    /// started without `--rejoin`) and no leader has established it yet; the value names
    /// this blank incarnation. A peer that knew the acceptor otherwise (with a memory, or
    /// as another blank incarnation) refuses the vote: the acceptor forgot its promises.
    pub blank: u64,
    /// The `gen` of the `Prepare`, `Resync` or `NeedCheckpoint` this answers; 0 when the
    /// follower restarted on its own (a new incarnation) or answers a candidate.
    pub gen: u64,
    /// Accepted entries (encoded), ascending by index.
    pub entries: Vec<Arc<[u8]>>,
}

/// A peer's answer to a recovering replica: its promise, commit and a chunk of its log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecoverResp {
    /// The request's nonce.
    pub nonce: u64,
    /// The responder's promise.
    pub promised: Ballot,
    /// The responder's commit index.
    pub commit: Index,
    /// The responder's compacted prefix (its entries start after it).
    pub base: Index,
    /// The `from` of the request answered; entries start at `max(from, base + 1)`.
    pub from: Index,
    /// The responder's last index when it answered.
    pub last: Index,
    /// At most about [`CHUNK_BYTES`] of entries (at least one when any is there).
    pub entries: Vec<Arc<[u8]>>,
}

/// Why bytes are not a control message: the message is dropped (and counted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MsgError {
    /// Fewer bytes than the message needs.
    Truncated,
    /// No message has this tag.
    UnknownTag(u8),
    /// A chunk number at or past the chunk count (or no chunks).
    BadChunk {
        /// The chunk number.
        chunk: u32,
        /// The chunk count.
        chunks: u32,
    },
    /// An entry in the message does not decode.
    BadEntry(LayoutError),
    /// Bytes left after a complete message.
    TrailingBytes(usize),
    /// A checkpoint chunk over [`MAX_CKPT_CHUNK`].
    ChunkTooLarge(u64),
    /// A flags byte with bits this version does not know.
    BadFlag(u8),
}

impl std::fmt::Display for MsgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => write!(f, "truncated control message"),
            Self::UnknownTag(t) => write!(f, "unknown control message tag {t}"),
            Self::BadChunk { chunk, chunks } => write!(f, "bad chunk {chunk} of {chunks}"),
            Self::BadEntry(e) => write!(f, "bad entry in control message: {e}"),
            Self::TrailingBytes(n) => write!(f, "{n} trailing bytes after control message"),
            Self::ChunkTooLarge(n) => write!(f, "checkpoint chunk of {n} bytes over the limit"),
            Self::BadFlag(b) => write!(f, "bad flag byte {b:#x} in control message"),
        }
    }
}
impl std::error::Error for MsgError {}

const PREPARE: u8 = 1;
const PROMISE: u8 = 2;
const NACK: u8 = 3;
const RESYNC: u8 = 4;
const RECOVER_REQ: u8 = 5;
const RECOVER_RESP: u8 = 6;
const NEED_CHECKPOINT: u8 = 7;
const CKPT_REQ: u8 = 8;
const CKPT_CHUNK: u8 = 9;

/// Largest checkpoint chunk a message carries (well inside `fabric::MAX_CONTROL`).
pub const MAX_CKPT_CHUNK: usize = 1 << 20;

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn entries(&mut self, es: &[Arc<[u8]>]) {
        self.u32(es.len() as u32);
        for e in es {
            self.u32(e.len() as u32);
            self.0.extend_from_slice(e);
        }
    }
}

struct R<'a>(&'a [u8]);
impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgError> {
        if self.0.len() < n {
            return Err(MsgError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MsgError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MsgError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, MsgError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn chunk(&mut self) -> Result<(u32, u32), MsgError> {
        let (chunk, chunks) = (self.u32()?, self.u32()?);
        if chunk >= chunks {
            return Err(MsgError::BadChunk { chunk, chunks });
        }
        Ok((chunk, chunks))
    }
    fn entries(&mut self) -> Result<Vec<Arc<[u8]>>, MsgError> {
        let n = self.u32()? as usize;
        // Each entry needs at least 4 + 48 bytes: bound the allocation by what is there.
        if n > self.0.len() / 52 {
            return Err(MsgError::Truncated);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32()? as usize;
            let bytes = self.take(len)?;
            let (h, _) = layout::decode_entry(bytes).map_err(MsgError::BadEntry)?;
            if layout::entry_size(h.len as usize) != len {
                return Err(MsgError::BadEntry(LayoutError::BadLength(len as u64)));
            }
            out.push(Arc::from(bytes));
        }
        Ok(out)
    }
}

impl Msg {
    /// The message's bytes, as [`Msg::decode`] reads them.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64));
        match self {
            Msg::Prepare {
                ballot,
                from,
                blank,
                gen,
            } => {
                w.u8(PREPARE);
                w.u64(ballot.0);
                w.u64(*from);
                w.u64(*blank);
                w.u64(*gen);
            }
            Msg::Promise(p) => {
                w.u8(PROMISE);
                p.write(&mut w);
            }
            Msg::Nack {
                promised,
                leader_alive,
                recover,
            } => {
                w.u8(NACK);
                w.u64(promised.0);
                w.u8(u8::from(*leader_alive) | u8::from(*recover) << 1);
            }
            Msg::Resync { ballot, gen } => {
                w.u8(RESYNC);
                w.u64(ballot.0);
                w.u64(*gen);
            }
            Msg::RecoverReq { nonce, from } => {
                w.u8(RECOVER_REQ);
                w.u64(*nonce);
                w.u64(*from);
            }
            Msg::RecoverResp(r) => {
                w.u8(RECOVER_RESP);
                r.write(&mut w);
            }
            Msg::NeedCheckpoint { ballot, gen } => {
                w.u8(NEED_CHECKPOINT);
                w.u64(ballot.0);
                w.u64(*gen);
            }
            Msg::CkptReq { index, offset } => {
                w.u8(CKPT_REQ);
                w.u64(*index);
                w.u64(*offset);
            }
            Msg::CkptChunk {
                index,
                offset,
                total,
                data,
            } => {
                w.u8(CKPT_CHUNK);
                w.u64(*index);
                w.u64(*offset);
                w.u64(*total);
                w.u32(data.len() as u32);
                w.0.extend_from_slice(data);
            }
        }
        w.0
    }

    /// Decodes one whole message; total: never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Msg, MsgError> {
        let mut r = R(bytes);
        let msg = match r.u8()? {
            PREPARE => Msg::Prepare {
                ballot: Ballot(r.u64()?),
                from: r.u64()?,
                blank: r.u64()?,
                gen: r.u64()?,
            },
            PROMISE => Msg::Promise(Promise::read(&mut r)?),
            NACK => {
                let promised = Ballot(r.u64()?);
                let bits = r.u8()?;
                if bits > 3 {
                    return Err(MsgError::BadFlag(bits));
                }
                Msg::Nack {
                    promised,
                    leader_alive: bits & 1 != 0,
                    recover: bits & 2 != 0,
                }
            }
            RESYNC => Msg::Resync {
                ballot: Ballot(r.u64()?),
                gen: r.u64()?,
            },
            RECOVER_REQ => Msg::RecoverReq {
                nonce: r.u64()?,
                from: r.u64()?,
            },
            RECOVER_RESP => Msg::RecoverResp(RecoverResp::read(&mut r)?),
            NEED_CHECKPOINT => Msg::NeedCheckpoint {
                ballot: Ballot(r.u64()?),
                gen: r.u64()?,
            },
            CKPT_REQ => Msg::CkptReq {
                index: r.u64()?,
                offset: r.u64()?,
            },
            CKPT_CHUNK => {
                let (index, offset, total) = (r.u64()?, r.u64()?, r.u64()?);
                let len = r.u32()? as usize;
                if len > MAX_CKPT_CHUNK {
                    return Err(MsgError::ChunkTooLarge(len as u64));
                }
                Msg::CkptChunk {
                    index,
                    offset,
                    total,
                    data: r.take(len)?.to_vec(),
                }
            }
            t => return Err(MsgError::UnknownTag(t)),
        };
        if !r.0.is_empty() {
            return Err(MsgError::TrailingBytes(r.0.len()));
        }
        Ok(msg)
    }
}

impl Promise {
    fn write(&self, w: &mut W) {
        for v in [
            self.ballot.0,
            self.from,
            self.stream,
            self.received,
            self.consumed,
            self.persisted,
            self.commit,
            self.base,
        ] {
            w.u64(v);
        }
        w.u32(self.chunk);
        w.u32(self.chunks);
        w.u64(self.blank);
        w.u64(self.gen);
        w.entries(&self.entries);
    }

    fn read(r: &mut R) -> Result<Promise, MsgError> {
        let (ballot, from) = (Ballot(r.u64()?), r.u64()?);
        let (stream, received, consumed, persisted, commit, base) =
            (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let (chunk, chunks) = r.chunk()?;
        let (blank, gen) = (r.u64()?, r.u64()?);
        let entries = r.entries()?;
        Ok(Promise {
            ballot,
            from,
            stream,
            received,
            consumed,
            persisted,
            commit,
            base,
            chunk,
            chunks,
            blank,
            gen,
            entries,
        })
    }
}

impl RecoverResp {
    fn write(&self, w: &mut W) {
        w.u64(self.nonce);
        w.u64(self.promised.0);
        w.u64(self.commit);
        w.u64(self.base);
        w.u64(self.from);
        w.u64(self.last);
        w.entries(&self.entries);
    }

    fn read(r: &mut R) -> Result<RecoverResp, MsgError> {
        let (nonce, promised, commit, base) = (r.u64()?, Ballot(r.u64()?), r.u64()?, r.u64()?);
        let (from, last) = (r.u64()?, r.u64()?);
        let entries = r.entries()?;
        Ok(RecoverResp {
            nonce,
            promised,
            commit,
            base,
            from,
            last,
            entries,
        })
    }
}

/// Splits `entries` into chunks of about `budget` bytes (at least one entry each, and at
/// least one chunk even when empty).
pub fn chunk_entries(entries: Vec<Arc<[u8]>>, budget: usize) -> Vec<Vec<Arc<[u8]>>> {
    let mut out = vec![Vec::new()];
    let mut size = 0;
    for e in entries {
        if size + e.len() > budget && !out.last().unwrap().is_empty() {
            out.push(Vec::new());
            size = 0;
        }
        size += e.len();
        out.last_mut().unwrap().push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{encode_entry, EntryHeader};
    use proptest::prelude::*;

    fn entry(i: u64, len: usize) -> Arc<[u8]> {
        let mut b = Vec::new();
        let h = EntryHeader {
            index: i,
            ballot: Ballot::new(2, 1),
            commit: 0,
            len: len as u32,
            flags: 0,
        };
        encode_entry(&mut b, &h, &vec![7; len]);
        Arc::from(b)
    }

    proptest! {
        #[test]
        fn round_trip(b in any::<u64>(), x in any::<u64>(), n in 0usize..5, len in 0usize..100) {
            let es: Vec<_> = (1..=n as u64).map(|i| entry(i, len)).collect();
            let msgs = [
                Msg::Prepare { ballot: Ballot(b), from: x, blank: b / 3, gen: x / 5 },
                Msg::Promise(Promise { ballot: Ballot(b), from: 4, stream: x, received: 3, consumed: x / 13, persisted: 2,
                    commit: 1, base: x / 3, chunk: 0, chunks: 1, blank: x / 7, gen: x / 11, entries: es.clone() }),
                Msg::Nack { promised: Ballot(b), leader_alive: x % 2 == 0, recover: x % 5 == 0 },
                Msg::Resync { ballot: Ballot(b), gen: x },
                Msg::RecoverReq { nonce: x, from: b },
                Msg::RecoverResp(RecoverResp { nonce: x, promised: Ballot(b), commit: 4, base: 2,
                    from: 3, last: x, entries: es }),
                Msg::NeedCheckpoint { ballot: Ballot(b), gen: x },
                Msg::CkptReq { index: x, offset: b },
                Msg::CkptChunk { index: x, offset: b, total: x ^ b, data: vec![9; len] },
            ];
            for m in msgs {
                prop_assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
            }
        }

        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Msg::decode(&bytes);
        }

        #[test]
        fn mutations_never_panic(at in any::<prop::sample::Index>(), v in any::<u8>()) {
            let m = Msg::Promise(Promise { ballot: Ballot(9), from: 1, stream: 1, received: 3, consumed: 0, persisted: 2,
                commit: 1, base: 0, chunk: 0, chunks: 1, blank: 0, gen: 3, entries: vec![entry(1, 10), entry(2, 20)] });
            let mut b = m.encode();
            let i = at.index(b.len());
            b[i] = v;
            let _ = Msg::decode(&b);
            b.truncate(i);
            prop_assert!(Msg::decode(&b).is_err());
        }
    }

    #[test]
    fn chunks_respect_budget() {
        let es: Vec<_> = (1..=40).map(|i| entry(i, 100_000)).collect();
        let cs = chunk_entries(es, CHUNK_BYTES);
        assert!(cs.len() > 1);
        assert_eq!(cs.iter().map(Vec::len).sum::<usize>(), 40);
        assert_eq!(chunk_entries(vec![], CHUNK_BYTES).len(), 1);
    }
}
