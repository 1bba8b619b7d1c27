//! The replicated key-value state machine: commands, results, and the machine itself.
//!
//! A command is `client_id u64 | seq u64 | op u8 | body` (little-endian; see
//! `docs/client-protocol.md`). The machine keeps, per client id, the last sequence number
//! applied and its result: a command whose `(client, seq)` was applied already returns the
//! stored result without applying again, so a client may retry a command (same client id,
//! same seq) after a time-out or a lost connection and it takes effect once. Client id 0
//! opts out of deduplication.
//!
//! Decoding is total: a malformed command is applied as a no-op that returns an `Error`
//! result, never a panic.

use ballot::driver::StateMachine;
use ballot::Index;
use std::collections::{BTreeMap, HashMap};

/// Largest key, in bytes.
pub const MAX_KEY: usize = 4096;
/// Largest value, in bytes (1 MiB).
pub const MAX_VALUE: usize = 1 << 20;
/// Largest encoded command: header + key + two values (CAS) + length fields.
pub const MAX_COMMAND: usize = 17 + 4 + MAX_KEY + 1 + 4 + MAX_VALUE + 4 + MAX_VALUE;

pub mod op {
    pub const PUT: u8 = 1;
    pub const GET: u8 = 2;
    pub const DELETE: u8 = 3;
    pub const CAS: u8 = 4;
}

pub mod res {
    pub const OK: u8 = 0;
    pub const VALUE: u8 = 1;
    pub const NOT_FOUND: u8 = 2;
    pub const CAS_FAILED: u8 = 3;
    pub const ERROR: u8 = 4;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Sets `key` to `new` if its current value is `expected` (`None`: the key is absent).
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } | Op::Cas { key, .. } => key,
        }
    }
    pub fn is_read_only(&self) -> bool {
        matches!(self, Op::Get { .. })
    }
}

/// A command as it travels in the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Command {
    pub client: u64,
    pub seq: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvResult {
    /// Put, delete or cas took effect.
    Ok,
    /// Get found this value.
    Value(Vec<u8>),
    /// Get or delete found no key.
    NotFound,
    /// Cas did not match; the current value (`None`: absent).
    CasFailed(Option<Vec<u8>>),
    /// The command was refused (malformed, stale sequence number).
    Error(String),
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.op.key().len());
        b.extend_from_slice(&self.client.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        match &self.op {
            Op::Put { key, value } => {
                b.push(op::PUT);
                put_bytes(&mut b, key);
                put_bytes(&mut b, value);
            }
            Op::Get { key } => {
                b.push(op::GET);
                put_bytes(&mut b, key);
            }
            Op::Delete { key } => {
                b.push(op::DELETE);
                put_bytes(&mut b, key);
            }
            Op::Cas { key, expected, new } => {
                b.push(op::CAS);
                put_bytes(&mut b, key);
                match expected {
                    Some(e) => {
                        b.push(1);
                        put_bytes(&mut b, e);
                    }
                    None => b.push(0),
                }
                put_bytes(&mut b, new);
            }
        }
        b
    }

    /// Reads the `(client, seq)` header only.
    pub fn peek_ids(b: &[u8]) -> Option<(u64, u64)> {
        let mut r = Reader(b);
        Some((r.u64()?, r.u64()?))
    }

    /// Total decoder: `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Command, String> {
        let mut r = Reader(b);
        let client = r.u64().ok_or("truncated header")?;
        let seq = r.u64().ok_or("truncated header")?;
        let tag = r.u8().ok_or("missing op")?;
        let key = r.bytes(MAX_KEY).map_err(|e| format!("key: {e}"))?;
        if key.is_empty() {
            return Err("empty key".into());
        }
        let op = match tag {
            op::PUT => Op::Put {
                key,
                value: r.bytes(MAX_VALUE).map_err(|e| format!("value: {e}"))?,
            },
            op::GET => Op::Get { key },
            op::DELETE => Op::Delete { key },
            op::CAS => {
                let expected = match r.u8().ok_or("cas: missing expected flag")? {
                    0 => None,
                    1 => Some(
                        r.bytes(MAX_VALUE)
                            .map_err(|e| format!("cas expected: {e}"))?,
                    ),
                    f => return Err(format!("cas: bad expected flag {f}")),
                };
                Op::Cas {
                    key,
                    expected,
                    new: r.bytes(MAX_VALUE).map_err(|e| format!("cas new: {e}"))?,
                }
            }
            t => return Err(format!("unknown op {t}")),
        };
        if !r.0.is_empty() {
            return Err(format!("{} trailing bytes", r.0.len()));
        }
        Ok(Command { client, seq, op })
    }
}

impl KvResult {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            KvResult::Ok => vec![res::OK],
            KvResult::Value(v) => {
                let mut b = Vec::with_capacity(1 + v.len());
                b.push(res::VALUE);
                b.extend_from_slice(v);
                b
            }
            KvResult::NotFound => vec![res::NOT_FOUND],
            KvResult::CasFailed(cur) => {
                let mut b = vec![res::CAS_FAILED, u8::from(cur.is_some())];
                if let Some(c) = cur {
                    b.extend_from_slice(c);
                }
                b
            }
            KvResult::Error(e) => {
                let mut b = vec![res::ERROR];
                b.extend_from_slice(e.as_bytes());
                b
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<KvResult, String> {
        let (&tag, rest) = b.split_first().ok_or("empty result")?;
        Ok(match tag {
            res::OK if rest.is_empty() => KvResult::Ok,
            res::VALUE => KvResult::Value(rest.to_vec()),
            res::NOT_FOUND if rest.is_empty() => KvResult::NotFound,
            res::CAS_FAILED => match rest.split_first() {
                Some((0, [])) => KvResult::CasFailed(None),
                Some((1, v)) => KvResult::CasFailed(Some(v.to_vec())),
                _ => return Err("bad cas-failed result".into()),
            },
            res::ERROR => KvResult::Error(String::from_utf8_lossy(rest).into_owned()),
            t => return Err(format!("bad result tag {t}")),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, String> {
        let n = self.u32().ok_or("truncated length")? as usize;
        if n > max {
            return Err(format!("{n} bytes exceeds the limit {max}"));
        }
        self.take(n)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("truncated: {n} bytes announced"))
    }
}

/// The replicated store with per-client deduplication.
#[derive(Debug, Default)]
pub struct KvMachine {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// client id -> (last seq applied, its encoded result).
    sessions: HashMap<u64, (u64, Vec<u8>)>,
    applied: u64,
}

impl KvMachine {
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Commands that took effect (duplicates and malformed commands excluded).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    fn execute(&mut self, op: Op) -> KvResult {
        self.applied += 1;
        match op {
            Op::Put { key, value } => {
                self.data.insert(key, value);
                KvResult::Ok
            }
            Op::Get { key } => match self.data.get(&key) {
                Some(v) => KvResult::Value(v.clone()),
                None => KvResult::NotFound,
            },
            Op::Delete { key } => match self.data.remove(&key) {
                Some(_) => KvResult::Ok,
                None => KvResult::NotFound,
            },
            Op::Cas { key, expected, new } => {
                let cur = self.data.get(&key);
                if cur.map(Vec::as_slice) == expected.as_deref() {
                    self.data.insert(key, new);
                    KvResult::Ok
                } else {
                    KvResult::CasFailed(cur.cloned())
                }
            }
        }
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, _index: Index, command: &[u8]) -> Vec<u8> {
        let cmd = match Command::decode(command) {
            Ok(c) => c,
            Err(e) => return KvResult::Error(format!("bad command: {e}")).encode(),
        };
        if cmd.client == 0 {
            return self.execute(cmd.op).encode();
        }
        if let Some((last, out)) = self.sessions.get(&cmd.client) {
            if cmd.seq == *last {
                return out.clone();
            }
            if cmd.seq < *last {
                return KvResult::Error(format!(
                    "stale sequence number {} (last applied {last})",
                    cmd.seq
                ))
                .encode();
            }
        }
        let out = self.execute(cmd.op).encode();
        self.sessions.insert(cmd.client, (cmd.seq, out.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(client: u64, seq: u64, op: Op) -> Vec<u8> {
        Command { client, seq, op }.encode()
    }
    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn ops_and_dedup() {
        let mut m = KvMachine::default();
        let r = |m: &mut KvMachine, c: Vec<u8>| KvResult::decode(&m.apply(1, &c)).unwrap();
        assert_eq!(
            r(&mut m, cmd(1, 1, Op::Get { key: k("a") })),
            KvResult::NotFound
        );
        assert_eq!(
            r(
                &mut m,
                cmd(
                    1,
                    2,
                    Op::Put {
                        key: k("a"),
                        value: k("x")
                    }
                )
            ),
            KvResult::Ok
        );
        assert_eq!(
            r(
                &mut m,
                cmd(
                    2,
                    1,
                    Op::Put {
                        key: k("a"),
                        value: k("y")
                    }
                )
            ),
            KvResult::Ok
        );
        // Retried put of client 1 seq 2: not applied again.
        assert_eq!(
            r(
                &mut m,
                cmd(
                    1,
                    2,
                    Op::Put {
                        key: k("a"),
                        value: k("x")
                    }
                )
            ),
            KvResult::Ok
        );
        assert_eq!(
            r(&mut m, cmd(1, 3, Op::Get { key: k("a") })),
            KvResult::Value(k("y"))
        );
        assert!(matches!(
            r(&mut m, cmd(1, 1, Op::Get { key: k("a") })),
            KvResult::Error(_)
        ));
        let cas = |e: Option<&str>, n: &str| Op::Cas {
            key: k("a"),
            expected: e.map(k),
            new: k(n),
        };
        assert_eq!(
            r(&mut m, cmd(3, 1, cas(Some("x"), "z"))),
            KvResult::CasFailed(Some(k("y")))
        );
        assert_eq!(r(&mut m, cmd(3, 2, cas(Some("y"), "z"))), KvResult::Ok);
        assert_eq!(
            r(&mut m, cmd(3, 3, Op::Delete { key: k("a") })),
            KvResult::Ok
        );
        assert_eq!(
            r(&mut m, cmd(3, 4, Op::Delete { key: k("a") })),
            KvResult::NotFound
        );
        assert_eq!(r(&mut m, cmd(3, 5, cas(None, "n"))), KvResult::Ok);
        assert_eq!(m.get(b"a"), Some(&b"n"[..]));
        // Client 0: no dedup.
        assert_eq!(
            r(&mut m, cmd(0, 0, Op::Delete { key: k("a") })),
            KvResult::Ok
        );
        assert_eq!(
            r(&mut m, cmd(0, 0, Op::Delete { key: k("a") })),
            KvResult::NotFound
        );
    }

    #[test]
    fn big_values_roundtrip() {
        let c = Command {
            client: 9,
            seq: 1,
            op: Op::Put {
                key: k("big"),
                value: vec![7; MAX_VALUE],
            },
        };
        assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        let too_big = Command {
            client: 9,
            seq: 2,
            op: Op::Put {
                key: k("big"),
                value: vec![7; MAX_VALUE + 1],
            },
        };
        assert!(Command::decode(&too_big.encode()).is_err());
    }

    #[test]
    fn decoding_is_total() {
        let mut m = KvMachine::default();
        let good = cmd(
            5,
            1,
            Op::Cas {
                key: k("key"),
                expected: Some(k("old")),
                new: k("new"),
            },
        );
        // Every prefix, every single-byte corruption, and some junk: never a panic.
        for n in 0..good.len() {
            let out = KvResult::decode(&m.apply(1, &good[..n])).unwrap();
            assert!(matches!(out, KvResult::Error(_)), "prefix {n}: {out:?}");
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = m.apply(1, &b);
            }
        }
        let mut junk = good.clone();
        junk.push(0);
        assert!(matches!(
            KvResult::decode(&m.apply(1, &junk)).unwrap(),
            KvResult::Error(_)
        ));
        assert!(KvResult::decode(&[]).is_err());
        assert!(KvResult::decode(&[9]).is_err());
    }
}
