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

use ballot::checkpoint::CheckpointSource;
use ballot::driver::StateMachine;
use ballot::Index;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

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

/// Largest result kept in the dedup table (a value plus its result header).
const MAX_RESULT: usize = MAX_VALUE + 64;
/// Checkpoint framing (see [`KvMachine`]'s `checkpoint`).
const CKPT_MAGIC: &[u8; 8] = b"BALKVCK1";
const CKPT_END: &[u8; 8] = b"BALKVEND";

/// What a node's status shows of its state, published after every command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateDigest {
    /// Log index of the last command applied (kept in checkpoints with the state, so a
    /// replica restored from one reports what the others report).
    pub index: Index,
    /// [`KvMachine::digest`] after it.
    pub digest: u64,
}

/// Where the replica thread publishes its [`StateDigest`] for the client threads.
#[derive(Debug, Default)]
pub struct DigestCell(Mutex<StateDigest>);

impl DigestCell {
    pub fn get(&self) -> StateDigest {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, d: StateDigest) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of one item of the state (a key and its value, or a dedup session).
fn item_hash(tag: u8, head: &[u8], body: &[u8]) -> u64 {
    let mut c = crc32c::crc32c(&[tag]);
    c = crc32c::crc32c_append(c, &(head.len() as u32).to_le_bytes());
    c = crc32c::crc32c_append(c, head);
    c = crc32c::crc32c_append(c, body);
    mix((u64::from(c) << 32) ^ (head.len() + body.len()) as u64 ^ (u64::from(tag) << 24))
}

fn key_hash(key: &[u8], value: &[u8]) -> u64 {
    item_hash(b'K', key, value)
}

fn session_hash(client: u64, seq: u64, out: &[u8]) -> u64 {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&client.to_le_bytes());
    head[8..].copy_from_slice(&seq.to_le_bytes());
    item_hash(b'S', &head, out)
}

/// The replicated store with per-client deduplication.
///
/// Checkpoints (`StateMachine::checkpoint`, a frozen copy serialized on another thread) are
/// deterministic: the same state gives the same bytes on every replica, little-endian:
///
/// ```text
/// "BALKVCK1" | applied u64 | last index u64
/// keys u64     then per key, ascending:    key len u32 | key | value len u32 | value
/// sessions u64 then per client, ascending: client u64 | seq u64 | result len u32 | result
/// "BALKVEND"
/// ```
///
/// `restore` decodes totally (bad bytes: `InvalidData`, never a panic) into a new state and
/// only then replaces the current one.
#[derive(Debug, Default)]
pub struct KvMachine {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// client id -> (last seq applied, its encoded result).
    sessions: BTreeMap<u64, (u64, Vec<u8>)>,
    applied: u64,
    /// Index of the last command applied.
    last_index: Index,
    /// Wrapping sum of the item hashes (order-independent, kept up to date by `apply`).
    sum: u64,
    cell: Arc<DigestCell>,
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
    /// Index of the last command applied.
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// A 64-bit digest of the whole state (keys and values, the dedup table, the applied
    /// count): equal states give equal digests whatever the history; different states
    /// differ except with negligible probability (it is a checksum, not a cryptographic
    /// hash). O(1): maintained incrementally by `apply`.
    pub fn digest(&self) -> u64 {
        mix(self
            .sum
            .wrapping_add(mix(self.applied ^ 0xD1B5_4A32_D192_ED03)))
    }

    /// An empty store publishing its [`StateDigest`] in `cell` (shared by every machine a
    /// start builds, so the client threads see the one that runs).
    pub fn with_digest_cell(cell: Arc<DigestCell>) -> KvMachine {
        KvMachine {
            cell,
            ..KvMachine::default()
        }
    }

    /// The cell where [`StateDigest`] is published after every command.
    pub fn digest_cell(&self) -> Arc<DigestCell> {
        self.cell.clone()
    }

    fn publish(&self) {
        self.cell.set(StateDigest {
            index: self.last_index,
            digest: self.digest(),
        });
    }

    /// The checkpoint bytes of the current state.
    pub fn checkpoint_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_state(
            &mut out,
            self.applied,
            self.last_index,
            &self.data,
            &self.sessions,
        )
        .expect("writing to a Vec");
        out
    }

    fn set_key(&mut self, key: Vec<u8>, value: Vec<u8>) {
        if let Some(old) = self.data.get(&key) {
            self.sum = self.sum.wrapping_sub(key_hash(&key, old));
        }
        self.sum = self.sum.wrapping_add(key_hash(&key, &value));
        self.data.insert(key, value);
    }

    fn execute(&mut self, op: Op) -> KvResult {
        self.applied += 1;
        match op {
            Op::Put { key, value } => {
                self.set_key(key, value);
                KvResult::Ok
            }
            Op::Get { key } => match self.data.get(&key) {
                Some(v) => KvResult::Value(v.clone()),
                None => KvResult::NotFound,
            },
            Op::Delete { key } => match self.data.remove(&key) {
                Some(old) => {
                    self.sum = self.sum.wrapping_sub(key_hash(&key, &old));
                    KvResult::Ok
                }
                None => KvResult::NotFound,
            },
            Op::Cas { key, expected, new } => {
                let cur = self.data.get(&key);
                if cur.map(Vec::as_slice) == expected.as_deref() {
                    self.set_key(key, new);
                    KvResult::Ok
                } else {
                    KvResult::CasFailed(cur.cloned())
                }
            }
        }
    }

    fn apply_command(&mut self, command: &[u8]) -> Vec<u8> {
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
        let new = session_hash(cmd.client, cmd.seq, &out);
        if let Some((seq, old)) = self.sessions.insert(cmd.client, (cmd.seq, out.clone())) {
            self.sum = self.sum.wrapping_sub(session_hash(cmd.client, seq, &old));
        }
        self.sum = self.sum.wrapping_add(new);
        out
    }
}

/// Serializes a state in the checkpoint format (see [`KvMachine`]).
fn write_state(
    w: &mut dyn Write,
    applied: u64,
    last_index: Index,
    data: &BTreeMap<Vec<u8>, Vec<u8>>,
    sessions: &BTreeMap<u64, (u64, Vec<u8>)>,
) -> io::Result<()> {
    const FLUSH: usize = 64 << 10;
    let mut buf = Vec::with_capacity(FLUSH * 2);
    let mut flush = |buf: &mut Vec<u8>, force: bool| -> io::Result<()> {
        if force || buf.len() >= FLUSH {
            w.write_all(buf)?;
            buf.clear();
        }
        Ok(())
    };
    buf.extend_from_slice(CKPT_MAGIC);
    buf.extend_from_slice(&applied.to_le_bytes());
    buf.extend_from_slice(&last_index.to_le_bytes());
    buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for (k, v) in data {
        put_bytes(&mut buf, k);
        put_bytes(&mut buf, v);
        flush(&mut buf, false)?;
    }
    buf.extend_from_slice(&(sessions.len() as u64).to_le_bytes());
    for (client, (seq, out)) in sessions {
        buf.extend_from_slice(&client.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        put_bytes(&mut buf, out);
        flush(&mut buf, false)?;
    }
    buf.extend_from_slice(CKPT_END);
    flush(&mut buf, true)
}

/// A frozen copy of the state, serialized on the checkpoint thread.
struct KvImage {
    applied: u64,
    last_index: Index,
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    sessions: BTreeMap<u64, (u64, Vec<u8>)>,
}

impl CheckpointSource for KvImage {
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        write_state(w, self.applied, self.last_index, &self.data, &self.sessions)
    }
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad key-value checkpoint: {}", why.into()),
    )
}

/// Reads the checkpoint format from a stream; every error is `InvalidData` (or the
/// stream's own error).
struct StateReader<'a>(&'a mut dyn Read);

impl StateReader<'_> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> io::Result<()> {
        self.0.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => bad(format!("truncated in {what}")),
            _ => e,
        })
    }
    fn u32(&mut self, what: &str) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self, what: &str) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
    fn bytes(&mut self, max: usize, what: &str) -> io::Result<Vec<u8>> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(bad(format!("{what} of {n} bytes exceeds {max}")));
        }
        let mut v = vec![0u8; n];
        self.exact(&mut v, what)?;
        Ok(v)
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, index: Index, command: &[u8]) -> Vec<u8> {
        let out = self.apply_command(command);
        self.last_index = index;
        self.publish();
        out
    }

    fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
        Some(Box::new(KvImage {
            applied: self.applied,
            last_index: self.last_index,
            data: self.data.clone(),
            sessions: self.sessions.clone(),
        }))
    }

    fn restore(&mut self, checkpoint: &mut dyn Read) -> io::Result<()> {
        let mut r = StateReader(checkpoint);
        let mut magic = [0u8; 8];
        r.exact(&mut magic, "header")?;
        if &magic != CKPT_MAGIC {
            return Err(bad("bad magic"));
        }
        let applied = r.u64("header")?;
        let last_index = r.u64("header")?;
        let mut sum = 0u64;
        let mut data = BTreeMap::new();
        let keys = r.u64("key count")?;
        let mut prev: Option<Vec<u8>> = None;
        for k in 0..keys {
            let key = r.bytes(MAX_KEY, "key")?;
            let value = r.bytes(MAX_VALUE, "value")?;
            if key.is_empty() {
                return Err(bad(format!("key {k} is empty")));
            }
            if prev.as_ref().is_some_and(|p| *p >= key) {
                return Err(bad(format!("key {k} out of order")));
            }
            sum = sum.wrapping_add(key_hash(&key, &value));
            prev = Some(key.clone());
            data.insert(key, value);
        }
        let mut sessions = BTreeMap::new();
        let count = r.u64("session count")?;
        let mut prev = 0u64;
        for k in 0..count {
            let client = r.u64("session")?;
            let seq = r.u64("session")?;
            let out = r.bytes(MAX_RESULT, "session result")?;
            if client <= prev {
                return Err(bad(format!("session {k}: client {client} out of order")));
            }
            prev = client;
            sum = sum.wrapping_add(session_hash(client, seq, &out));
            sessions.insert(client, (seq, out));
        }
        r.exact(&mut magic, "end marker")?;
        if &magic != CKPT_END {
            return Err(bad("bad end marker"));
        }
        // The stream must end here (reading to its end also makes a snapshot reader check
        // its trailer).
        let mut extra = [0u8; 1];
        loop {
            match r.0.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(bad("trailing bytes")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.data = data;
        self.sessions = sessions;
        self.applied = applied;
        self.last_index = last_index;
        self.sum = sum;
        self.publish();
        Ok(())
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

    fn put(client: u64, seq: u64, key: &str, value: &[u8]) -> Vec<u8> {
        cmd(
            client,
            seq,
            Op::Put {
                key: k(key),
                value: value.to_vec(),
            },
        )
    }

    /// A state with keys, deletes, a cas, dedup sessions (one holding a Get's value) and a
    /// malformed command.
    fn busy_machine() -> KvMachine {
        let mut m = KvMachine::default();
        let mut i = 0;
        let mut go = |m: &mut KvMachine, c: Vec<u8>| {
            i += 1;
            m.apply(i, &c);
        };
        for n in 0..50u64 {
            go(
                &mut m,
                put(n % 7 + 1, n + 1, &format!("key{n}"), &n.to_le_bytes()),
            );
        }
        go(&mut m, cmd(3, 100, Op::Delete { key: k("key9") }));
        go(&mut m, cmd(4, 100, Op::Get { key: k("key10") }));
        go(
            &mut m,
            cmd(
                5,
                100,
                Op::Cas {
                    key: k("key11"),
                    expected: Some(11u64.to_le_bytes().to_vec()),
                    new: k("eleven"),
                },
            ),
        );
        go(&mut m, put(0, 0, "anon", b"x"));
        go(&mut m, vec![1, 2, 3]);
        go(&mut m, put(9, 1, "big", &vec![0xab; 100_000]));
        m
    }

    fn restored(bytes: &[u8]) -> io::Result<KvMachine> {
        let mut m = KvMachine::default();
        m.restore(&mut &bytes[..])?;
        Ok(m)
    }

    #[test]
    fn checkpoint_round_trip_keeps_state_dedup_and_digest() {
        let mut m = busy_machine();
        let mut img = Vec::new();
        m.checkpoint().unwrap().write_to(&mut img).unwrap();
        assert_eq!(img, m.checkpoint_bytes());
        let mut r = restored(&img).unwrap();
        assert_eq!(r.digest(), m.digest());
        assert_eq!(r.applied(), m.applied());
        assert_eq!(r.last_index(), m.last_index());
        assert_eq!(r.len(), m.len());
        assert_eq!(r.get(b"key11"), Some(&b"eleven"[..]));
        assert_eq!(r.get(b"key9"), None);
        assert_eq!(r.checkpoint_bytes(), img);
        assert_eq!(r.digest_cell().get(), m.digest_cell().get());
        // The dedup table came along: a retried command is not applied again.
        let retry = cmd(3, 100, Op::Delete { key: k("key9") });
        assert_eq!(r.apply(99, &retry), m.apply(99, &retry));
        assert_eq!(r.digest(), m.digest());
        // Both go on identically.
        let next = put(3, 101, "key9", b"back");
        r.apply(100, &next);
        assert_ne!(r.digest(), m.digest());
        m.apply(100, &next);
        assert_eq!(r.digest(), m.digest());
        assert_eq!(r.checkpoint_bytes(), m.checkpoint_bytes());
        assert_eq!(
            m.digest_cell().get(),
            StateDigest {
                index: 100,
                digest: m.digest()
            }
        );
    }

    #[test]
    fn checkpoint_bytes_and_digest_depend_on_the_state_only() {
        let (mut a, mut b) = (KvMachine::default(), KvMachine::default());
        for (i, key) in ["x", "y", "z"].iter().enumerate() {
            a.apply(i as u64 + 1, &put(0, 0, key, key.as_bytes()));
        }
        for (i, key) in ["z", "x", "q", "y"].iter().enumerate() {
            b.apply(i as u64 + 1, &put(0, 0, key, b"tmp"));
        }
        // Same keys and values, reached differently; same applied count and last index.
        b.apply(5, &cmd(0, 0, Op::Delete { key: k("q") }));
        for key in ["x", "y", "z"] {
            b.apply(5, &put(0, 0, key, key.as_bytes()));
        }
        a.apply(4, &put(0, 0, "x", b"x"));
        a.apply(5, &put(0, 0, "y", b"y"));
        for _ in 0..3 {
            a.apply(5, &put(0, 0, "z", b"z"));
        }
        assert_eq!(a.applied(), b.applied());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.checkpoint_bytes(), b.checkpoint_bytes());
        a.apply(6, &put(0, 0, "x", b"X"));
        assert_ne!(a.digest(), b.digest());
        a.apply(7, &put(0, 0, "x", b"x"));
        assert_ne!(a.digest(), b.digest(), "the applied count is state too");
    }

    #[test]
    fn restore_is_total_and_leaves_the_state_alone_on_error() {
        let m = busy_machine();
        let img = m.checkpoint_bytes();
        let mut target = KvMachine::default();
        target.apply(1, &put(1, 1, "mine", b"1"));
        let before = (target.digest(), target.checkpoint_bytes());
        let check = |target: &mut KvMachine, bytes: &[u8], must_fail: bool| {
            match target.restore(&mut &bytes[..]) {
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                    assert_eq!((target.digest(), target.checkpoint_bytes()), before);
                }
                Ok(()) => {
                    assert!(!must_fail, "accepted a bad checkpoint");
                    // Accepted (a changed value, say): consistent with what it decoded.
                    let again = restored(&target.checkpoint_bytes()).unwrap();
                    assert_eq!(again.digest(), target.digest());
                    *target = KvMachine::default();
                    target.apply(1, &put(1, 1, "mine", b"1"));
                }
            }
        };
        // Every prefix (the big value in steps), a trailing byte.
        let mut cut = 0;
        while cut < img.len() {
            check(&mut target, &img[..cut], true);
            cut += if cut < 2000 || cut > img.len() - 2000 {
                1
            } else {
                997
            };
        }
        let mut long = img.clone();
        long.push(0);
        check(&mut target, &long, true);
        // Every byte of the small part flipped in a few ways, and the length fields set
        // huge: never a panic, never a partial state.
        for at in (0..img.len()).filter(|&i| i < 1500 || i > img.len() - 300) {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = img.clone();
                b[at] ^= x;
                check(&mut target, &b, at < 8 || at >= img.len() - 8);
            }
        }
        let mut huge = img.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&mut target, &huge, true);
        check(&mut target, b"", true);
        check(&mut target, b"BALKVCK1", true);
        // Out of order keys.
        let mut a = KvMachine::default();
        a.apply(1, &put(0, 0, "a", b"1"));
        a.apply(2, &put(0, 0, "b", b"2"));
        let mut swapped = a.checkpoint_bytes();
        let at = swapped
            .windows(5)
            .position(|w| w == [1, 0, 0, 0, b'a'])
            .unwrap();
        swapped[at + 4] = b'c';
        let e = restored(&swapped).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
    }
}
