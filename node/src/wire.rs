//! The client protocol's frames (see `docs/client-protocol.md`).
//!
//! Version 2 (pipelined): the client opens with a [`ClientHello`] (magic `BALP`, the
//! version it speaks), the node answers a [`ServerHello`] (the version it will speak and
//! its limits); then every frame is `len u32 LE | id u64 LE | body`, `len` counting the id
//! and the body, with a request id chosen by the client in each request and echoed in its
//! response. Responses come as requests complete, in any order. A response with id 0 and
//! status [`status::GOAWAY`] is about the connection: the node closes it after.
//!
//! Version 1 (one request at a time, `len u32 LE | body`, no hello) is refused: a node
//! answers the first frame of such a client with a version 1 `ERROR` frame saying so.

use ballot::runtime::Role;
use std::io::{self, Read, Write};

/// The default limit of a frame's `len` (the node's `--client-max-frame`).
pub const MAX_FRAME: usize = 4 << 20;
/// The frame limit of protocol version 1 (a v1 client's first frame is at most this long).
pub const V1_MAX_FRAME: usize = 4 << 20;
/// The hellos' magic: `BALP` (as a v1 frame length it would exceed [`V1_MAX_FRAME`]).
pub const MAGIC: [u8; 4] = *b"BALP";
/// The protocol version this code speaks.
pub const VERSION: u16 = 2;
/// Bytes of a frame's `id u64 | kind-or-status u8` header (after `len`).
pub const HEADER: usize = 9;
/// The request id reserved for connection-level answers ([`status::GOAWAY`]).
pub const CONNECTION_ID: u64 = 0;

/// The client's first 8 bytes: `"BALP" | version u16 LE | reserved u16 (0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The highest version the client speaks.
    pub version: u16,
}

impl ClientHello {
    pub const LEN: usize = 8;
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b
    }
    /// `None`: not a hello (no magic).
    pub fn decode(b: &[u8; 8]) -> Option<ClientHello> {
        (b[..4] == MAGIC).then(|| ClientHello {
            version: u16::from_le_bytes([b[4], b[5]]),
        })
    }
}

/// The node's answer to a [`ClientHello`], 24 bytes: `"BALP" | version u16 | reserved u16 |
/// max_frame u32 | max_in_flight u32 | idle_timeout_ms u32 | max_output u32` (LE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// The version the node will speak on this connection (0: none in common; a `GOAWAY`
    /// follows and the node closes).
    pub version: u16,
    /// Largest `len` of a request frame.
    pub max_frame: u32,
    /// Requests in flight per connection, at most (the node reads no more until some
    /// are answered).
    pub max_in_flight: u32,
    /// A connection idle this long is closed (0: never).
    pub idle_timeout_ms: u32,
    /// Bytes of answers the node keeps for a client that does not read them; past this
    /// the connection is cut.
    pub max_output: u32,
}

impl ServerHello {
    pub const LEN: usize = 24;
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        for (i, v) in [
            self.max_frame,
            self.max_in_flight,
            self.idle_timeout_ms,
            self.max_output,
        ]
        .into_iter()
        .enumerate()
        {
            b[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
    pub fn decode(b: &[u8; 24]) -> Option<ServerHello> {
        if b[..4] != MAGIC {
            return None;
        }
        let w = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(ServerHello {
            version: u16::from_le_bytes([b[4], b[5]]),
            max_frame: w(8),
            max_in_flight: w(12),
            idle_timeout_ms: w(16),
            max_output: w(20),
        })
    }
}

pub mod kind {
    pub const COMMAND: u8 = 1;
    pub const STATUS: u8 = 2;
    pub const CHECKPOINT: u8 = 3;
}

pub mod status {
    pub const OK: u8 = 0;
    pub const NOT_LEADER: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const UNAVAILABLE: u8 = 3;
    /// About the connection, not a request (id 0): the node closes it after this.
    pub const GOAWAY: u8 = 4;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// An encoded [`crate::kv::Command`].
    Command(Vec<u8>),
    Status,
    /// Take a checkpoint now (on the node asked; answered once requested, not done).
    Checkpoint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A command's encoded [`crate::kv::KvResult`], or an encoded [`NodeStatus`].
    Ok(Vec<u8>),
    NotLeader {
        leader: Option<u8>,
        addr: Option<String>,
    },
    /// Permanent: retrying will not help.
    Error(String),
    /// Transient: retry (with the same client id and sequence number).
    Unavailable(String),
    /// The node closes the connection (id 0): why. Requests without an answer yet have
    /// an unknown outcome.
    GoAway(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub node: u8,
    pub role: String,
    pub ballot: u64,
    pub ballot_round: u64,
    pub commit: u64,
    pub applied: u64,
    pub leader: Option<u8>,
    /// Compacted log prefix: entries up to here exist only in checkpoints.
    pub log_base: u64,
    /// Newest checkpoint kept (0: none).
    pub checkpoint: u64,
    /// Digest of the key-value state (`KvMachine::digest`) ...
    pub digest: u64,
    /// ... after the command at this log index (equal on replicas with equal states).
    pub digest_index: u64,
}

/// Encoded size of a [`NodeStatus`] (27 before the checkpoint fields).
const STATUS_LEN: usize = 59;
const STATUS_LEN_V1: usize = 27;

fn role_code(name: &str) -> u8 {
    match name {
        "follower" => 0,
        "candidate" => 1,
        "leader" => 2,
        "recovering" => 3,
        _ => 4,
    }
}
fn role_name(code: u8) -> &'static str {
    match code {
        0 => Role::Follower.name(),
        1 => Role::Candidate.name(),
        2 => Role::Leader.name(),
        3 => Role::Recovering.name(),
        _ => Role::Stopped.name(),
    }
}

impl NodeStatus {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.node, role_code(&self.role)];
        for v in [self.ballot, self.commit, self.applied] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.leader.unwrap_or(0xFF));
        for v in [
            self.log_base,
            self.checkpoint,
            self.digest,
            self.digest_index,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }
    /// Also reads the shorter record of nodes without checkpoints (those fields 0).
    pub fn decode(b: &[u8]) -> Result<NodeStatus, String> {
        if b.len() != STATUS_LEN && b.len() != STATUS_LEN_V1 {
            return Err(format!(
                "status record of {} bytes, want {STATUS_LEN}",
                b.len()
            ));
        }
        let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let ballot = w(2);
        Ok(NodeStatus {
            node: b[0],
            role: role_name(b[1]).to_string(),
            ballot,
            ballot_round: ballot >> 8,
            commit: w(10),
            applied: w(18),
            leader: (b[26] != 0xFF).then_some(b[26]),
            log_base: if b.len() == STATUS_LEN { w(27) } else { 0 },
            checkpoint: if b.len() == STATUS_LEN { w(35) } else { 0 },
            digest: if b.len() == STATUS_LEN { w(43) } else { 0 },
            digest_index: if b.len() == STATUS_LEN { w(51) } else { 0 },
        })
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Command(c) => {
                let mut b = Vec::with_capacity(1 + c.len());
                b.push(kind::COMMAND);
                b.extend_from_slice(c);
                b
            }
            Request::Status => vec![kind::STATUS],
            Request::Checkpoint => vec![kind::CHECKPOINT],
        }
    }
    pub fn decode(mut b: Vec<u8>) -> Result<Request, String> {
        match b.first() {
            Some(&kind::COMMAND) => {
                b.remove(0);
                Ok(Request::Command(b))
            }
            Some(&kind::STATUS) if b.len() == 1 => Ok(Request::Status),
            Some(&kind::CHECKPOINT) if b.len() == 1 => Ok(Request::Checkpoint),
            Some(k) => Err(format!("unknown request kind {k}")),
            None => Err("empty request".into()),
        }
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let text = |tag: u8, s: &str| {
            let mut b = vec![tag];
            b.extend_from_slice(s.as_bytes());
            b
        };
        match self {
            Response::Ok(p) => {
                let mut b = Vec::with_capacity(1 + p.len());
                b.push(status::OK);
                b.extend_from_slice(p);
                b
            }
            Response::NotLeader { leader, addr } => {
                let a = addr.as_deref().unwrap_or("").as_bytes();
                let a = &a[..a.len().min(u16::MAX as usize)];
                let mut b = vec![status::NOT_LEADER, leader.unwrap_or(0xFF)];
                b.extend_from_slice(&(a.len() as u16).to_le_bytes());
                b.extend_from_slice(a);
                b
            }
            Response::Error(e) => text(status::ERROR, e),
            Response::Unavailable(e) => text(status::UNAVAILABLE, e),
            Response::GoAway(e) => text(status::GOAWAY, e),
        }
    }
    pub fn decode(b: &[u8]) -> Result<Response, String> {
        let (&tag, rest) = b.split_first().ok_or("empty response")?;
        let text = || String::from_utf8_lossy(rest).into_owned();
        Ok(match tag {
            status::OK => Response::Ok(rest.to_vec()),
            status::NOT_LEADER => {
                if rest.len() < 3 {
                    return Err("truncated not-leader response".into());
                }
                let n = u16::from_le_bytes([rest[1], rest[2]]) as usize;
                let a = rest.get(3..3 + n).ok_or("truncated leader address")?;
                if rest.len() != 3 + n {
                    return Err("trailing bytes in not-leader response".into());
                }
                let addr =
                    String::from_utf8(a.to_vec()).map_err(|_| "leader address is not UTF-8")?;
                Response::NotLeader {
                    leader: (rest[0] != 0xFF).then_some(rest[0]),
                    addr: (!addr.is_empty()).then_some(addr),
                }
            }
            status::ERROR => Response::Error(text()),
            status::UNAVAILABLE => Response::Unavailable(text()),
            status::GOAWAY => Response::GoAway(text()),
            t => return Err(format!("unknown response status {t}")),
        })
    }
}

pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    w.write_all(&b)?;
    w.flush()
}

/// Appends a version 2 frame, `len | id | body`, to `out`.
pub fn put_frame(out: &mut Vec<u8>, id: u64, body: &[u8]) {
    out.extend_from_slice(&((8 + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
}

/// Splits a version 2 frame's contents (after `len`) into its id and body.
pub fn split_id(frame: &[u8]) -> io::Result<(u64, &[u8])> {
    if frame.len() < HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {} bytes is shorter than its header", frame.len()),
        ));
    }
    let (id, body) = frame.split_at(8);
    Ok((u64::from_le_bytes(id.try_into().expect("8 bytes")), body))
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips() {
        for r in [
            Response::Ok(vec![1, 2]),
            Response::NotLeader {
                leader: Some(2),
                addr: Some("127.0.0.1:9".into()),
            },
            Response::NotLeader {
                leader: None,
                addr: None,
            },
            Response::Error("nope".into()),
            Response::Unavailable("later".into()),
            Response::GoAway("bye".into()),
        ] {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
        let s = NodeStatus {
            node: 1,
            role: "leader".into(),
            ballot: 0x305,
            ballot_round: 3,
            commit: 9,
            applied: 8,
            leader: Some(1),
            log_base: 4,
            checkpoint: 6,
            digest: 0xdead_beef_0123_4567,
            digest_index: 7,
        };
        assert_eq!(NodeStatus::decode(&s.encode()).unwrap(), s);
        // The record of a node without checkpoints.
        let old = NodeStatus::decode(&s.encode()[..27]).unwrap();
        assert_eq!((old.commit, old.log_base, old.digest), (9, 0, 0));
        assert!(NodeStatus::decode(&s.encode()[..30]).is_err());
        for r in [Request::Status, Request::Checkpoint] {
            assert_eq!(Request::decode(r.encode()).unwrap(), r);
        }
        assert!(Request::decode(vec![kind::CHECKPOINT, 0]).is_err());
        assert!(Request::decode(vec![]).is_err());
        assert!(Response::decode(&[1, 0]).is_err());
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        let mut c = std::io::Cursor::new(buf);
        assert_eq!(read_frame(&mut c).unwrap().unwrap(), b"hello");
        assert!(read_frame(&mut c).unwrap().is_none());
        let h = ServerHello {
            version: 2,
            max_frame: 1,
            max_in_flight: 2,
            idle_timeout_ms: 3,
            max_output: 4,
        };
        assert_eq!(ServerHello::decode(&h.encode()), Some(h));
        let c = ClientHello { version: 7 };
        assert_eq!(ClientHello::decode(&c.encode()), Some(c));
        // As a v1 frame length, the magic is over the v1 limit: never a v1 frame.
        assert!(u32::from_le_bytes(MAGIC) as usize > V1_MAX_FRAME);
        let mut f = Vec::new();
        put_frame(&mut f, 9, &[kind::STATUS]);
        assert_eq!(split_id(&f[4..]).unwrap(), (9, &[kind::STATUS][..]));
    }
}
