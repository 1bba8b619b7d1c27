//! The client protocol's frames (see `docs/client-protocol.md`).
//!
//! Every frame is `len u32 LE | body` with `len = body.len() <= MAX_FRAME`.

use ballot::runtime::Role;
use std::io::{self, Read, Write};

pub const MAX_FRAME: usize = 4 << 20;

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
    }
}
