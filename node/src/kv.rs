//! The replicated key-value state machine: commands, results, and the machine itself.
//!
//! A command is `client_id u64 | seq u64 | op u8 | body` (little-endian; see
//! `docs/client-protocol.md`). A client first registers a session (a `REGISTER` command,
//! answered with the session id); its writes carry that id as `client_id` and number
//! themselves 1, 2, ...: a write whose `(session, seq)` was applied already returns the
//! stored result without applying again, so a client may retry a write (same session, same
//! seq) after a time-out or a lost connection and it takes effect once. Sessions live in a
//! bounded table ([`crate::session`]) and expire through the log; a write from an expired
//! session is answered [`KvResult::SessionExpired`], never applied. Reads need no session
//! and leave no dedup state. Client id 0 opts out of deduplication.
//!
//! Decoding is total: a malformed command is applied as a no-op that returns an `Error`
//! result, never a panic.

use crate::session::{Check, Session, SessionLimits, Sessions};
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
    /// Open a session: `client_id` and `seq` 0, no key, nothing after the op.
    pub const REGISTER: u8 = 5;
}

pub mod res {
    pub const OK: u8 = 0;
    pub const VALUE: u8 = 1;
    pub const NOT_FOUND: u8 = 2;
    pub const CAS_FAILED: u8 = 3;
    pub const ERROR: u8 = 4;
    /// REGISTER's answer: the session id (u64 LE).
    pub const SESSION: u8 = 5;
    /// A write from a session that is unknown or expired: not applied.
    pub const SESSION_EXPIRED: u8 = 6;
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
    /// Opens a session (answered [`KvResult::Session`]).
    Register,
}

impl Op {
    /// The key (empty for [`Op::Register`]).
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } | Op::Cas { key, .. } => key,
            Op::Register => &[],
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

/// An operation borrowed from a command's bytes: what `apply` and the node's check of
/// incoming commands read, without copying a key or value out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpRef<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
    },
    Get {
        key: &'a [u8],
    },
    Delete {
        key: &'a [u8],
    },
    Cas {
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        new: &'a [u8],
    },
    Register,
}

/// A command borrowed from its bytes ([`CommandRef::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandRef<'a> {
    pub client: u64,
    pub seq: u64,
    pub op: OpRef<'a>,
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
    /// Register's answer: the new session's id.
    Session(u64),
    /// A write from an unknown or expired session: not applied.
    SessionExpired,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends the command `(client, seq, op)` to `b`, as [`Command::encode`] encodes it
/// (without building a `Command`: the client library frames its requests in place).
pub fn encode_command(b: &mut Vec<u8>, client: u64, seq: u64, op: &Op) {
    b.extend_from_slice(&client.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    match op {
        Op::Put { key, value } => {
            b.push(op::PUT);
            put_bytes(b, key);
            put_bytes(b, value);
        }
        Op::Get { key } => {
            b.push(op::GET);
            put_bytes(b, key);
        }
        Op::Delete { key } => {
            b.push(op::DELETE);
            put_bytes(b, key);
        }
        Op::Cas { key, expected, new } => {
            b.push(op::CAS);
            put_bytes(b, key);
            match expected {
                Some(e) => {
                    b.push(1);
                    put_bytes(b, e);
                }
                None => b.push(0),
            }
            put_bytes(b, new);
        }
        Op::Register => b.push(op::REGISTER),
    }
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.op.key().len());
        encode_command(&mut b, self.client, self.seq, &self.op);
        b
    }

    /// Reads the `(client, seq)` header only.
    pub fn peek_ids(b: &[u8]) -> Option<(u64, u64)> {
        let mut r = Reader(b);
        Some((r.u64()?, r.u64()?))
    }

    /// Checks that `b` is a well-formed command, as [`Command::decode`] would, without
    /// decoding it into owned values (the node checks every command so on its way in).
    pub fn validate(b: &[u8]) -> Result<(), String> {
        CommandRef::parse(b).map(|_| ())
    }

    /// Total decoder: `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Command, String> {
        CommandRef::parse(b).map(|c| c.to_owned())
    }
}

impl<'a> CommandRef<'a> {
    /// Total parser, borrowing keys and values from `b`: `Err` says what is wrong.
    pub fn parse(b: &'a [u8]) -> Result<CommandRef<'a>, String> {
        let mut r = Reader(b);
        let client = r.u64().ok_or("truncated header")?;
        let seq = r.u64().ok_or("truncated header")?;
        let tag = r.u8().ok_or("missing op")?;
        if tag == op::REGISTER {
            if !r.0.is_empty() {
                return Err(format!("register: {} trailing bytes", r.0.len()));
            }
            return Ok(CommandRef {
                client,
                seq,
                op: OpRef::Register,
            });
        }
        let key = r.bytes(MAX_KEY).map_err(|e| format!("key: {e}"))?;
        if key.is_empty() {
            return Err("empty key".into());
        }
        let op = match tag {
            op::PUT => OpRef::Put {
                key,
                value: r.bytes(MAX_VALUE).map_err(|e| format!("value: {e}"))?,
            },
            op::GET => OpRef::Get { key },
            op::DELETE => OpRef::Delete { key },
            op::CAS => {
                let expected = match r.u8().ok_or("cas: missing expected flag")? {
                    0 => None,
                    1 => Some(
                        r.bytes(MAX_VALUE)
                            .map_err(|e| format!("cas expected: {e}"))?,
                    ),
                    f => return Err(format!("cas: bad expected flag {f}")),
                };
                OpRef::Cas {
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
        Ok(CommandRef { client, seq, op })
    }

    pub fn to_owned(&self) -> Command {
        let op = match self.op {
            OpRef::Put { key, value } => Op::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            },
            OpRef::Get { key } => Op::Get { key: key.to_vec() },
            OpRef::Delete { key } => Op::Delete { key: key.to_vec() },
            OpRef::Cas { key, expected, new } => Op::Cas {
                key: key.to_vec(),
                expected: expected.map(<[u8]>::to_vec),
                new: new.to_vec(),
            },
            OpRef::Register => Op::Register,
        };
        Command {
            client: self.client,
            seq: self.seq,
            op,
        }
    }
}

impl KvResult {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.encode_into(&mut b);
        b
    }

    /// Appends the encoding to `b`.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        match self {
            KvResult::Ok => b.push(res::OK),
            KvResult::Value(v) => value_result(b, v),
            KvResult::NotFound => b.push(res::NOT_FOUND),
            KvResult::CasFailed(cur) => cas_failed_result(b, cur.as_deref()),
            KvResult::Error(e) => {
                b.push(res::ERROR);
                b.extend_from_slice(e.as_bytes());
            }
            KvResult::Session(id) => {
                b.push(res::SESSION);
                b.extend_from_slice(&id.to_le_bytes());
            }
            KvResult::SessionExpired => b.push(res::SESSION_EXPIRED),
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
            res::SESSION => KvResult::Session(u64::from_le_bytes(
                rest.try_into().map_err(|_| "bad session result")?,
            )),
            res::SESSION_EXPIRED if rest.is_empty() => KvResult::SessionExpired,
            t => return Err(format!("bad result tag {t}")),
        })
    }
}

/// [`KvResult::Value`]'s encoding, from a borrowed value.
fn value_result(b: &mut Vec<u8>, v: &[u8]) {
    b.push(res::VALUE);
    b.extend_from_slice(v);
}

/// [`KvResult::CasFailed`]'s encoding, from a borrowed current value.
fn cas_failed_result(b: &mut Vec<u8>, cur: Option<&[u8]>) {
    b.extend_from_slice(&[res::CAS_FAILED, u8::from(cur.is_some())]);
    b.extend_from_slice(cur.unwrap_or_default());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
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
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], String> {
        let n = self.u32().ok_or("truncated length")? as usize;
        if n > max {
            return Err(format!("{n} bytes exceeds the limit {max}"));
        }
        self.take(n)
            .ok_or_else(|| format!("truncated: {n} bytes announced"))
    }
}

/// Largest result kept in the dedup table (a value plus its result header).
const MAX_RESULT: usize = MAX_VALUE + 64;
/// Checkpoint framing (see [`KvMachine`]'s `checkpoint`): the current format, and the one
/// before sessions (still read).
const CKPT_MAGIC: &[u8; 8] = b"BALKVCK2";
const CKPT_MAGIC_V1: &[u8; 8] = b"BALKVCK1";
const CKPT_END: &[u8; 8] = b"BALKVEND";

/// What a node's status shows of its state, published after every command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateDigest {
    /// Log index of the last command applied (kept in checkpoints with the state, so a
    /// replica restored from one reports what the others report).
    pub index: Index,
    /// [`KvMachine::digest`] after it.
    pub digest: u64,
    /// Client sessions in the table after it.
    pub sessions: u64,
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

pub(crate) use ballot::state_hash::{item_hash, mix};

fn key_hash(key: &[u8], value: &[u8]) -> u64 {
    item_hash(b'K', key, value)
}

/// The replicated store with per-client sessions ([`crate::session`]).
///
/// Checkpoints (`StateMachine::checkpoint`, a frozen copy serialized on another thread) are
/// deterministic: the same state gives the same bytes on every replica, little-endian:
///
/// ```text
/// "BALKVCK2" | applied u64 | last index u64 | next session id u64
/// keys u64     then per key, ascending:     key len u32 | key | value len u32 | value
/// sessions u64 then per session, ascending: id u64 | last active u64 | floor u64 |
///              results u32, then per result, ascending: seq u64 | len u32 | result
/// "BALKVEND"
/// ```
///
/// The format before sessions (`"BALKVCK1"`: per client `client u64 | seq u64 | result`,
/// no next id) still loads: each client becomes a session active at the checkpoint's index
/// with its one result (a read's stored value is dropped: reads are no longer recorded).
/// Any other magic is refused with `InvalidData`.
///
/// `restore` decodes totally (bad bytes: `InvalidData`, never a panic) into a new state and
/// only then replaces the current one.
#[derive(Debug, Default)]
pub struct KvMachine {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    sessions: Sessions,
    applied: u64,
    /// Index of the last command applied.
    last_index: Index,
    /// Wrapping sum of the key hashes (order-independent, kept up to date by `apply`).
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
    /// Commands that took effect (duplicates, refused and malformed commands excluded).
    pub fn applied(&self) -> u64 {
        self.applied
    }
    /// Index of the last command applied.
    pub fn last_index(&self) -> Index {
        self.last_index
    }
    /// The session table.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// A 64-bit digest of the whole state (keys and values, the session table, the applied
    /// count): equal states give equal digests whatever the history; different states
    /// differ except with negligible probability (it is a checksum, not a cryptographic
    /// hash). O(1): maintained incrementally by `apply`.
    pub fn digest(&self) -> u64 {
        mix(self
            .sum
            .wrapping_add(self.sessions.hash())
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

    /// An empty store with other session limits (every replica must use the same).
    pub fn with_limits(limits: SessionLimits) -> KvMachine {
        KvMachine {
            sessions: Sessions::new(limits),
            ..KvMachine::default()
        }
    }

    /// The cell where [`StateDigest`] is published after every entry applied.
    pub fn digest_cell(&self) -> Arc<DigestCell> {
        self.cell.clone()
    }

    fn publish(&self) {
        self.cell.set(StateDigest {
            index: self.last_index,
            digest: self.digest(),
            sessions: self.sessions.len() as u64,
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

    /// Sets `key` to `value`, reusing the old value's buffer when it fits (no allocation
    /// for an update of a key the store holds).
    fn set_key(&mut self, key: &[u8], value: &[u8]) {
        self.sum = self.sum.wrapping_add(key_hash(key, value));
        match self.data.get_mut(key) {
            Some(old) => {
                self.sum = self.sum.wrapping_sub(key_hash(key, old));
                if old.capacity() >= value.len() && old.capacity() <= 2 * value.len() + 64 {
                    old.clear();
                    old.extend_from_slice(value);
                } else {
                    *old = value.to_vec();
                }
            }
            None => {
                self.data.insert(key.to_vec(), value.to_vec());
            }
        }
    }

    /// Executes `op` and appends its encoded [`KvResult`] to `out`.
    fn execute(&mut self, op: OpRef<'_>, index: Index, out: &mut Vec<u8>) {
        self.applied += 1;
        match op {
            OpRef::Put { key, value } => {
                self.set_key(key, value);
                out.push(res::OK);
            }
            OpRef::Get { key } => match self.data.get(key) {
                Some(v) => value_result(out, v),
                None => out.push(res::NOT_FOUND),
            },
            OpRef::Delete { key } => match self.data.remove(key) {
                Some(old) => {
                    self.sum = self.sum.wrapping_sub(key_hash(key, &old));
                    out.push(res::OK);
                }
                None => out.push(res::NOT_FOUND),
            },
            OpRef::Cas { key, expected, new } => {
                let cur = self.data.get(key);
                if cur.map(Vec::as_slice) == expected {
                    self.set_key(key, new);
                    out.push(res::OK);
                } else {
                    cas_failed_result(out, cur.map(Vec::as_slice));
                }
            }
            OpRef::Register => KvResult::Session(self.sessions.register(index)).encode_into(out),
        }
    }

    fn apply_command(&mut self, index: Index, command: &[u8], out: &mut Vec<u8>) {
        // Expiry first, at every index: a function of the log alone.
        self.sessions.expire_idle(index);
        let cmd = match CommandRef::parse(command) {
            Ok(c) => c,
            Err(e) => return KvResult::Error(format!("bad command: {e}")).encode_into(out),
        };
        // Reads and registrations need no dedup: a retried read reads again, a retried
        // registration leaves an unused session that expires.
        if cmd.client == 0 || matches!(cmd.op, OpRef::Get { .. } | OpRef::Register) {
            return self.execute(cmd.op, index, out);
        }
        match self.sessions.check(cmd.client, cmd.seq) {
            Check::Duplicate(r) => return out.extend_from_slice(r),
            Check::Expired => return KvResult::SessionExpired.encode_into(out),
            Check::Stale => {
                return KvResult::Error(format!(
                    "stale sequence number {} (session {})",
                    cmd.seq, cmd.client
                ))
                .encode_into(out)
            }
            Check::New => {}
        }
        let start = out.len();
        self.execute(cmd.op, index, out);
        self.sessions
            .record(cmd.client, cmd.seq, &out[start..], index);
    }
}

/// The store's contents: key -> value.
type Keys = BTreeMap<Vec<u8>, Vec<u8>>;

/// Serializes a state in the checkpoint format (see [`KvMachine`]).
fn write_state(
    w: &mut dyn Write,
    applied: u64,
    last_index: Index,
    data: &BTreeMap<Vec<u8>, Vec<u8>>,
    sessions: &Sessions,
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
    for v in [applied, last_index, sessions.next_id(), data.len() as u64] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    for (k, v) in data {
        put_bytes(&mut buf, k);
        put_bytes(&mut buf, v);
        flush(&mut buf, false)?;
    }
    buf.extend_from_slice(&(sessions.len() as u64).to_le_bytes());
    for (id, s) in sessions.iter() {
        for v in [*id, s.last_active, s.floor] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&(s.results.len() as u32).to_le_bytes());
        for (seq, out) in &s.results {
            buf.extend_from_slice(&seq.to_le_bytes());
            put_bytes(&mut buf, out);
            flush(&mut buf, false)?;
        }
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
    sessions: Sessions,
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

    /// The keys and values, and the sum of their hashes.
    fn keys(&mut self) -> io::Result<(Keys, u64)> {
        let mut sum = 0u64;
        let mut data = BTreeMap::new();
        let keys = self.u64("key count")?;
        let mut prev: Option<Vec<u8>> = None;
        for k in 0..keys {
            let key = self.bytes(MAX_KEY, "key")?;
            let value = self.bytes(MAX_VALUE, "value")?;
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
        Ok((data, sum))
    }

    /// The session table of a current checkpoint.
    fn sessions(&mut self, into: &mut Sessions) -> io::Result<()> {
        let count = self.u64("session count")?;
        let mut prev = 0u64;
        for k in 0..count {
            let id = self.u64("session")?;
            if id <= prev {
                return Err(bad(format!("session {k}: id {id} out of order")));
            }
            prev = id;
            let mut s = Session {
                last_active: self.u64("session")?,
                floor: self.u64("session")?,
                ..Session::default()
            };
            let n = self.u32("session results")?;
            let mut last = s.floor;
            for _ in 0..n {
                let seq = self.u64("session result")?;
                if seq <= last {
                    return Err(bad(format!("session {id}: result {seq} out of order")));
                }
                last = seq;
                s.results
                    .insert(seq, self.bytes(MAX_RESULT, "session result")?);
            }
            // A narrower window than the writer's: keep the newest results.
            while s.results.len() > into.limits().window {
                let (old, _) = s.results.pop_first().expect("non-empty");
                s.floor = old;
            }
            into.restore(id, s);
        }
        Ok(())
    }

    /// The dedup table of a checkpoint from before sessions: `client | seq | result`.
    fn sessions_v1(&mut self, into: &mut Sessions, at: Index) -> io::Result<()> {
        let count = self.u64("session count")?;
        let mut prev = 0u64;
        for k in 0..count {
            let client = self.u64("session")?;
            let seq = self.u64("session")?;
            let out = self.bytes(MAX_RESULT, "session result")?;
            if client <= prev {
                return Err(bad(format!("session {k}: client {client} out of order")));
            }
            prev = client;
            let mut s = Session {
                last_active: at,
                floor: seq.saturating_sub(1),
                ..Session::default()
            };
            if out.first() == Some(&res::VALUE) {
                s.floor = seq;
            } else {
                s.results.insert(seq, out);
            }
            into.restore(client, s);
        }
        Ok(())
    }

    /// Checks the end marker and that the stream ends there (reading to its end also makes
    /// a snapshot reader check its trailer).
    fn end(&mut self) -> io::Result<()> {
        let mut magic = [0u8; 8];
        self.exact(&mut magic, "end marker")?;
        if &magic != CKPT_END {
            return Err(bad("bad end marker"));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.0.read(&mut extra) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(bad("trailing bytes")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, index: Index, command: &[u8], out: &mut Vec<u8>) {
        self.apply_command(index, command, out);
        self.last_index = index;
    }

    /// Publishes the digest once per entry (a lock and the digest's mixing per command were
    /// 2 % of the processes benchmark).
    fn applied_entry(&mut self, _index: Index) {
        self.publish();
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
        let v1 = match &magic {
            m if m == CKPT_MAGIC => false,
            m if m == CKPT_MAGIC_V1 => true,
            m if m.starts_with(b"BALKVCK") => {
                return Err(bad(format!(
                    "format {:?} is newer than this ballot-node reads ({:?})",
                    String::from_utf8_lossy(m),
                    String::from_utf8_lossy(CKPT_MAGIC)
                )))
            }
            _ => return Err(bad("bad magic")),
        };
        let applied = r.u64("header")?;
        let last_index = r.u64("header")?;
        let mut sessions = Sessions::new(self.sessions.limits());
        if !v1 {
            sessions.set_next_id(r.u64("header")?);
        }
        let (data, sum) = r.keys()?;
        if v1 {
            r.sessions_v1(&mut sessions, last_index)?;
        } else {
            r.sessions(&mut sessions)?;
        }
        r.end()?;
        sessions.enforce_limits();
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
    impl KvMachine {
        /// `StateMachine::apply` into a fresh buffer.
        fn apply_owned(&mut self, index: Index, command: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            StateMachine::apply(self, index, command, &mut out);
            self.applied_entry(index);
            out
        }
    }

    use super::*;

    fn cmd(client: u64, seq: u64, op: Op) -> Vec<u8> {
        Command { client, seq, op }.encode()
    }
    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    /// Registers sessions 1..=n.
    fn registered(n: u64) -> KvMachine {
        let mut m = KvMachine::default();
        for i in 1..=n {
            let out = KvResult::decode(&m.apply_owned(i, &cmd(0, 0, Op::Register))).unwrap();
            assert_eq!(out, KvResult::Session(i));
        }
        m
    }

    #[test]
    fn ops_and_dedup() {
        let mut m = registered(3);
        let r = |m: &mut KvMachine, c: Vec<u8>| KvResult::decode(&m.apply_owned(10, &c)).unwrap();
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
        // A write from a session never registered: refused, not applied.
        let before = m.digest();
        assert_eq!(
            r(
                &mut m,
                cmd(
                    77,
                    1,
                    Op::Put {
                        key: k("a"),
                        value: k("w")
                    }
                )
            ),
            KvResult::SessionExpired
        );
        assert_eq!(m.digest(), before);
        assert_eq!(m.get(b"a"), Some(&b"y"[..]));
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
            let out = KvResult::decode(&m.apply_owned(1, &good[..n])).unwrap();
            assert!(matches!(out, KvResult::Error(_)), "prefix {n}: {out:?}");
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = m.apply_owned(1, &b);
            }
        }
        let mut junk = good.clone();
        junk.push(0);
        assert!(matches!(
            KvResult::decode(&m.apply_owned(1, &junk)).unwrap(),
            KvResult::Error(_)
        ));
        assert!(KvResult::decode(&[]).is_err());
        assert!(KvResult::decode(&[9]).is_err());
    }

    /// `validate` accepts exactly what `decode` accepts, with the same message.
    #[test]
    fn validate_agrees_with_decode() {
        let mut cases = vec![
            cmd(0, 0, Op::Register),
            cmd(1, 2, Op::Get { key: k("g") }),
            cmd(1, 2, Op::Delete { key: k("d") }),
            put(1, 2, "p", b"v"),
            cmd(
                1,
                2,
                Op::Cas {
                    key: k("c"),
                    expected: None,
                    new: k("n"),
                },
            ),
        ];
        let good = cmd(
            5,
            1,
            Op::Cas {
                key: k("key"),
                expected: Some(k("old")),
                new: k("new"),
            },
        );
        for n in 0..=good.len() {
            cases.push(good[..n].to_vec());
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 5, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                cases.push(b);
            }
        }
        let mut junk = good.clone();
        junk.push(0);
        cases.push(junk);
        for c in cases {
            assert_eq!(
                Command::validate(&c),
                Command::decode(&c).map(|_| ()),
                "{c:?}"
            );
        }
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
        let mut m = registered(9);
        let mut i = 9;
        let mut go = |m: &mut KvMachine, c: Vec<u8>| {
            i += 1;
            m.apply_owned(i, &c);
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
        assert_eq!(r.apply_owned(99, &retry), m.apply_owned(99, &retry));
        assert_eq!(r.digest(), m.digest());
        // Both go on identically.
        let next = put(3, 101, "key9", b"back");
        r.apply_owned(100, &next);
        assert_ne!(r.digest(), m.digest());
        m.apply_owned(100, &next);
        assert_eq!(r.digest(), m.digest());
        assert_eq!(r.checkpoint_bytes(), m.checkpoint_bytes());
        assert_eq!(
            m.digest_cell().get(),
            StateDigest {
                index: 100,
                digest: m.digest(),
                sessions: m.sessions.len() as u64,
            }
        );
    }

    #[test]
    fn checkpoint_bytes_and_digest_depend_on_the_state_only() {
        let (mut a, mut b) = (KvMachine::default(), KvMachine::default());
        for (i, key) in ["x", "y", "z"].iter().enumerate() {
            a.apply_owned(i as u64 + 1, &put(0, 0, key, key.as_bytes()));
        }
        for (i, key) in ["z", "x", "q", "y"].iter().enumerate() {
            b.apply_owned(i as u64 + 1, &put(0, 0, key, b"tmp"));
        }
        // Same keys and values, reached differently; same applied count and last index.
        b.apply_owned(5, &cmd(0, 0, Op::Delete { key: k("q") }));
        for key in ["x", "y", "z"] {
            b.apply_owned(5, &put(0, 0, key, key.as_bytes()));
        }
        a.apply_owned(4, &put(0, 0, "x", b"x"));
        a.apply_owned(5, &put(0, 0, "y", b"y"));
        for _ in 0..3 {
            a.apply_owned(5, &put(0, 0, "z", b"z"));
        }
        assert_eq!(a.applied(), b.applied());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.checkpoint_bytes(), b.checkpoint_bytes());
        a.apply_owned(6, &put(0, 0, "x", b"X"));
        assert_ne!(a.digest(), b.digest());
        a.apply_owned(7, &put(0, 0, "x", b"x"));
        assert_ne!(a.digest(), b.digest(), "the applied count is state too");
    }

    #[test]
    fn restore_is_total_and_leaves_the_state_alone_on_error() {
        let m = busy_machine();
        let img = m.checkpoint_bytes();
        let mut target = KvMachine::default();
        target.apply_owned(1, &put(1, 1, "mine", b"1"));
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
                    target.apply_owned(1, &put(1, 1, "mine", b"1"));
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
        huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&mut target, &huge, true);
        check(&mut target, b"", true);
        check(&mut target, b"BALKVCK2", true);
        check(&mut target, b"BALKVCK1", true);
        let e = restored(b"BALKVCK3").unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
        // Out of order keys.
        let mut a = KvMachine::default();
        a.apply_owned(1, &put(0, 0, "a", b"1"));
        a.apply_owned(2, &put(0, 0, "b", b"2"));
        let mut swapped = a.checkpoint_bytes();
        let at = swapped
            .windows(5)
            .position(|w| w == [1, 0, 0, 0, b'a'])
            .unwrap();
        swapped[at + 4] = b'c';
        let e = restored(&swapped).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
    }
    #[test]
    fn reads_leave_no_dedup_state() {
        let mut m = registered(1);
        m.apply_owned(2, &put(1, 1, "big", &vec![5; 100_000]));
        let one = m.checkpoint_bytes().len();
        for i in 0..20u64 {
            // From the session, from no session and from unknown ones: all answered.
            let out = m.apply_owned(3 + i, &cmd(i % 3 * 50, i + 2, Op::Get { key: k("big") }));
            assert_eq!(out.len(), 100_001);
        }
        assert_eq!(m.checkpoint_bytes().len(), one);
        assert_eq!(m.sessions().len(), 1);
    }

    #[test]
    fn old_checkpoints_load_and_keep_their_write_results() {
        // "BALKVCK1": applied, last index, one key, two clients (a put's result and a
        // get's value).
        let mut v1 = b"BALKVCK1".to_vec();
        for v in [2u64, 7, 1] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        put_bytes(&mut v1, b"a");
        put_bytes(&mut v1, b"1");
        v1.extend_from_slice(&2u64.to_le_bytes());
        for (client, seq, out) in [
            (0x1234u64, 4u64, vec![res::OK]),
            (0x9999, 2, vec![res::VALUE, 1]),
        ] {
            v1.extend_from_slice(&client.to_le_bytes());
            v1.extend_from_slice(&seq.to_le_bytes());
            put_bytes(&mut v1, &out);
        }
        v1.extend_from_slice(CKPT_END);
        let mut m = restored(&v1).unwrap();
        assert_eq!(
            (m.applied(), m.last_index(), m.get(b"a")),
            (2, 7, Some(&b"1"[..]))
        );
        // The retried write gets its stored result; the next one applies.
        let again = put(0x1234, 4, "a", b"2");
        assert_eq!(
            KvResult::decode(&m.apply_owned(8, &again)).unwrap(),
            KvResult::Ok
        );
        assert_eq!(m.get(b"a"), Some(&b"1"[..]));
        m.apply_owned(9, &put(0x1234, 5, "a", b"3"));
        assert_eq!(m.get(b"a"), Some(&b"3"[..]));
        // The read's value was not kept.
        assert!(m.sessions().get(0x9999).unwrap().results.is_empty());
        // Written back in the current format, and that loads to the same state.
        let v2 = m.checkpoint_bytes();
        assert_eq!(&v2[..8], CKPT_MAGIC);
        assert_eq!(restored(&v2).unwrap().digest(), m.digest());
    }

    #[test]
    fn expiry_goes_by_log_index_and_answers_session_expired() {
        let limits = SessionLimits {
            max_sessions: 2,
            window: 4,
            idle_entries: 10,
            max_bytes: 1 << 20,
        };
        let mut m = KvMachine::with_limits(limits);
        let reg = |m: &mut KvMachine, at| match KvResult::decode(
            &m.apply_owned(at, &cmd(0, 0, Op::Register)),
        ) {
            Ok(KvResult::Session(id)) => id,
            other => panic!("{other:?}"),
        };
        let a = reg(&mut m, 1);
        m.apply_owned(2, &put(a, 1, "k", b"1"));
        // Idle for 10 indexes: still there; 11: gone.
        m.apply_owned(12, &cmd(0, 0, Op::Get { key: k("k") }));
        assert!(m.sessions().get(a).is_some());
        m.apply_owned(13, &cmd(0, 0, Op::Get { key: k("k") }));
        assert!(m.sessions().get(a).is_none());
        let retry = put(a, 1, "k", b"1");
        assert_eq!(
            KvResult::decode(&m.apply_owned(14, &retry)).unwrap(),
            KvResult::SessionExpired
        );
        // The cap: a third registration expires the oldest-idle.
        let (b, c) = (reg(&mut m, 15), reg(&mut m, 16));
        m.apply_owned(17, &put(b, 1, "k", b"2"));
        let d = reg(&mut m, 18);
        assert!(m.sessions().get(c).is_none());
        assert!(m.sessions().get(b).is_some() && m.sessions().get(d).is_some());
        assert_eq!(m.sessions().len(), 2);
    }
}
