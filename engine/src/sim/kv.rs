//! The simulator's workload: a tiny key-value register store, its command codec, its
//! state machine, and its sequential specification for the linearizability checker.
//!
//! With client sessions ([`Machine::with_sessions`], `ballot-sim --sessions`) the store
//! deduplicates retries through [`crate::sessions::Sessions`], the table `ballot-node`'s
//! store keeps: a client registers a session through the log, sends each write with its
//! session and sequence number, and resends it unchanged after an unknown outcome; the
//! store applies it at most once.

use crate::driver::StateMachine;
use crate::sessions::{Check, Session, SessionLimits, Sessions};
use crate::types::Index;
use std::collections::BTreeMap;

/// A client operation on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Writes a value.
    Put(u8, u64),
    /// Reads the value.
    Get(u8),
    /// Compare and swap: sets the new value (third) if the value is the expected one (second).
    Cas(u8, u64, u64),
}

/// An operation's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A `Put` was applied.
    Ok,
    /// The value a `Get` read.
    Value(u64),
    /// Whether a `Cas` swapped.
    Cas(bool),
}

impl Op {
    /// The key the operation touches.
    pub fn key(&self) -> u8 {
        match *self {
            Op::Put(k, _) | Op::Get(k) | Op::Cas(k, _, _) => k,
        }
    }
}

/// A command: a unique id (so the checks can find it) and the operation.
pub fn encode(id: u64, op: Op) -> Vec<u8> {
    let mut b = Vec::with_capacity(26);
    b.extend_from_slice(&id.to_le_bytes());
    let (tag, k, x, y) = match op {
        Op::Put(k, v) => (1u8, k, v, 0),
        Op::Get(k) => (2, k, 0, 0),
        Op::Cas(k, o, n) => (3, k, o, n),
    };
    b.push(tag);
    b.push(k);
    b.extend_from_slice(&x.to_le_bytes());
    b.extend_from_slice(&y.to_le_bytes());
    b
}

/// A write (or read) of session `session`, its `seq`-th: [`encode`]'s bytes, then
/// `session u64 | seq u64`.
pub fn encode_in_session(id: u64, session: u64, seq: u64, op: Op) -> Vec<u8> {
    let mut b = encode(id, op);
    b.extend_from_slice(&session.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b
}

/// A session registration, under the unique `id`.
pub fn encode_register(id: u64) -> Vec<u8> {
    let mut b = encode(id, Op::Get(0));
    b[8] = REGISTER;
    b
}

const REGISTER: u8 = 4;

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    /// The unique id.
    pub id: u64,
    /// The operation; `None`: a session registration.
    pub op: Option<Op>,
    /// `(session, seq)` of a command sent in a session.
    pub session: Option<(u64, u64)>,
}

/// Any command the codecs above make; `None` for other bytes.
pub fn decode_cmd(b: &[u8]) -> Option<Cmd> {
    let (head, session) = match b.len() {
        26 => (b, None),
        42 => {
            let s = u64::from_le_bytes(b[26..34].try_into().ok()?);
            let q = u64::from_le_bytes(b[34..42].try_into().ok()?);
            (&b[..26], Some((s, q)))
        }
        _ => return None,
    };
    if head[8] == REGISTER {
        let id = u64::from_le_bytes(head[0..8].try_into().ok()?);
        return (session.is_none()).then_some(Cmd {
            id,
            op: None,
            session,
        });
    }
    let (id, op) = decode(head)?;
    Some(Cmd {
        id,
        op: Some(op),
        session,
    })
}

/// The id and operation of an encoded command; `None` for bytes [`encode`] never makes.
pub fn decode(b: &[u8]) -> Option<(u64, Op)> {
    if b.len() != 26 {
        return None;
    }
    let id = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let k = b[9];
    let x = u64::from_le_bytes(b[10..18].try_into().ok()?);
    let y = u64::from_le_bytes(b[18..26].try_into().ok()?);
    let op = match b[8] {
        1 => Op::Put(k, x),
        2 => Op::Get(k),
        3 => Op::Cas(k, x, y),
        _ => return None,
    };
    Some((id, op))
}

/// The bytes of a result, as the state machine outputs it.
pub fn encode_ret(r: Ret) -> Vec<u8> {
    match r {
        Ret::Ok => vec![0],
        Ret::Value(v) => {
            let mut b = vec![1];
            b.extend_from_slice(&v.to_le_bytes());
            b
        }
        Ret::Cas(ok) => vec![2, u8::from(ok)],
    }
}

/// What the store answers a command in a session (or a registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The operation's result (applied now, or stored when it was applied).
    Ret(Ret),
    /// A registration: the new session's id.
    Session(u64),
    /// The session is unknown or expired: not applied.
    Expired,
    /// The sequence number fell below the session's window: its result is gone.
    Stale,
}

const ANS_SESSION: u8 = 3;
const ANS_EXPIRED: u8 = 4;
const ANS_STALE: u8 = 5;

/// Any output of the store; `None` for other bytes.
pub fn decode_answer(b: &[u8]) -> Option<Answer> {
    match *b.first()? {
        ANS_SESSION => Some(Answer::Session(u64::from_le_bytes(
            b.get(1..9)?.try_into().ok()?,
        ))),
        ANS_EXPIRED if b.len() == 1 => Some(Answer::Expired),
        ANS_STALE if b.len() == 1 => Some(Answer::Stale),
        _ => decode_ret(b).map(Answer::Ret),
    }
}

/// A result from a state machine output; `None` for bytes [`encode_ret`] never makes.
pub fn decode_ret(b: &[u8]) -> Option<Ret> {
    match b.first()? {
        0 => Some(Ret::Ok),
        1 => Some(Ret::Value(u64::from_le_bytes(
            b.get(1..9)?.try_into().ok()?,
        ))),
        2 => Some(Ret::Cas(*b.get(1)? != 0)),
        _ => None,
    }
}

/// Sequential specification of the store (absent keys read as 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Spec(pub BTreeMap<u8, u64>);

impl Spec {
    /// Applies `op` and returns its result.
    pub fn apply(&mut self, op: &Op) -> Ret {
        match *op {
            Op::Put(k, v) => {
                self.0.insert(k, v);
                Ret::Ok
            }
            Op::Get(k) => Ret::Value(self.0.get(&k).copied().unwrap_or(0)),
            Op::Cas(k, o, n) => {
                let cur = self.0.get(&k).copied().unwrap_or(0);
                if cur == o {
                    self.0.insert(k, n);
                }
                Ret::Cas(cur == o)
            }
        }
    }
}

impl super::linearizability::SequentialSpec for Spec {
    type Op = Op;
    type Ret = Ret;
    fn invoke(&mut self, op: &Op) -> Ret {
        self.apply(op)
    }
}

/// The replicated state machine: the store, plus a record of what it applied, in order.
#[derive(Debug, Default)]
pub struct Machine {
    /// The store.
    pub store: Spec,
    /// Every applied command: its index and id, in order.
    pub applied: Vec<(Index, u64)>,
    /// What was applied before each checkpoint install replaced the state: the checks
    /// see it as an incarnation of its own (an install must agree with it).
    pub superseded: Vec<Vec<(Index, u64)>>,
    /// Client sessions (`None`: commands in a session are refused as malformed).
    pub sessions: Option<Sessions>,
    /// Retries answered from the session table instead of applied again (this incarnation).
    pub dedups: u64,
    /// Planted bug: a retry whose result is stored is applied again (the checks must see
    /// the command applied twice).
    pub planted_no_dedup: bool,
}

/// A frozen copy of a [`Machine`]: `keys u32 | (key u8, value u64)* | applied u32 |
/// (index u64, id u64)*`, then with sessions `next id u64 | sessions u32 | (id u64 | last
/// active u64 | floor u64 | results u32 | (seq u64 | len u32 | result)*)*`. The record of
/// applied commands travels with the state, so the simulator's checks see a replica that
/// installed a checkpoint as having applied them.
struct Frozen(Vec<u8>);

impl crate::checkpoint::CheckpointSource for Frozen {
    fn write_to(&mut self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        w.write_all(&self.0)
    }
}

impl Machine {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.store.0.len() * 9 + self.applied.len() * 16);
        b.extend_from_slice(&(self.store.0.len() as u32).to_le_bytes());
        for (k, v) in &self.store.0 {
            b.push(*k);
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.applied.len() as u32).to_le_bytes());
        for (i, id) in &self.applied {
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        if let Some(t) = &self.sessions {
            b.extend_from_slice(&t.next_id().to_le_bytes());
            b.extend_from_slice(&(t.len() as u32).to_le_bytes());
            for (id, s) in t.iter() {
                for w in [*id, s.last_active, s.floor] {
                    b.extend_from_slice(&w.to_le_bytes());
                }
                b.extend_from_slice(&(s.results.len() as u32).to_le_bytes());
                for (seq, r) in &s.results {
                    b.extend_from_slice(&seq.to_le_bytes());
                    b.extend_from_slice(&(r.len() as u32).to_le_bytes());
                    b.extend_from_slice(r);
                }
            }
        }
        b
    }

    /// A store with client sessions under `limits`.
    pub fn with_sessions(limits: SessionLimits) -> Machine {
        Machine {
            sessions: Some(Sessions::new(limits)),
            ..Machine::default()
        }
    }

    /// Decodes a frozen copy; `limits`: the sessions' (the copy has them iff it has).
    fn decode(b: &[u8], limits: Option<SessionLimits>) -> Option<Machine> {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = b.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let mut m = Machine {
            sessions: limits.map(Sessions::new),
            ..Machine::default()
        };
        let keys = u32::from_le_bytes(take(4)?.try_into().ok()?);
        for _ in 0..keys {
            let k = take(1)?[0];
            let v = u64::from_le_bytes(take(8)?.try_into().ok()?);
            m.store.0.insert(k, v);
        }
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
        for _ in 0..n {
            let i = u64::from_le_bytes(take(8)?.try_into().ok()?);
            let id = u64::from_le_bytes(take(8)?.try_into().ok()?);
            m.applied.push((i, id));
        }
        if let Some(t) = m.sessions.as_mut() {
            let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
            t.set_next_id(u64_at(take(8)?));
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
            for _ in 0..n {
                let id = u64_at(take(8)?);
                let mut s = Session {
                    last_active: u64_at(take(8)?),
                    floor: u64_at(take(8)?),
                    ..Session::default()
                };
                let results = u32::from_le_bytes(take(4)?.try_into().ok()?);
                for _ in 0..results {
                    let seq = u64_at(take(8)?);
                    let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                    s.results.insert(seq, take(len)?.to_vec());
                }
                t.restore(id, s);
            }
            t.enforce_limits();
        }
        (at == b.len()).then_some(m)
    }

    /// Applies a command in a session (or a registration); its answer into `out`.
    fn apply_in_session(&mut self, index: Index, c: Cmd, out: &mut Vec<u8>) {
        let Some(t) = self.sessions.as_mut() else {
            return out.push(0xff);
        };
        // Expiry first, at every index: a function of the log alone.
        t.expire_idle(index);
        match (c.op, c.session) {
            (None, _) => {
                self.applied.push((index, c.id));
                out.push(ANS_SESSION);
                out.extend_from_slice(&t.register(index).to_le_bytes());
            }
            (Some(op), Some((session, seq))) => match t.check(session, seq) {
                Check::Duplicate(r) if !self.planted_no_dedup => {
                    self.dedups += 1;
                    out.extend_from_slice(r);
                }
                Check::Expired => out.push(ANS_EXPIRED),
                Check::Stale => out.push(ANS_STALE),
                Check::New | Check::Duplicate(_) => {
                    self.applied.push((index, c.id));
                    let r = encode_ret(self.store.apply(&op));
                    out.extend_from_slice(&r);
                    if matches!(t.check(session, seq), Check::New) {
                        t.record(session, seq, &r, index);
                    }
                }
            },
            (Some(_), None) => unreachable!("commands outside sessions are applied by `apply`"),
        }
        let l = t.limits();
        assert!(
            t.len() <= l.max_sessions && t.bytes() <= l.max_bytes,
            "session table over its cap: {} sessions, {} bytes",
            t.len(),
            t.bytes()
        );
    }
}

impl StateMachine for Machine {
    fn apply(&mut self, index: Index, command: &[u8], out: &mut Vec<u8>) {
        match decode_cmd(command) {
            Some(Cmd {
                id,
                op: Some(op),
                session: None,
            }) => {
                self.applied.push((index, id));
                out.extend_from_slice(&encode_ret(self.store.apply(&op)));
            }
            Some(c) => self.apply_in_session(index, c, out),
            None => out.push(0xff),
        }
    }

    fn checkpoint(&self) -> Option<Box<dyn crate::checkpoint::CheckpointSource>> {
        Some(Box::new(Frozen(self.encode())))
    }

    fn restore(&mut self, r: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        let limits = self.sessions.as_ref().map(Sessions::limits);
        let mut m = Machine::decode(&b, limits).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "malformed machine checkpoint",
            )
        })?;
        m.superseded = std::mem::take(&mut self.superseded);
        m.superseded.push(std::mem::take(&mut self.applied));
        m.dedups = self.dedups;
        m.planted_no_dedup = self.planted_no_dedup;
        *self = m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_refusal() {
        let mut m = Machine::default();
        m.apply(1, &encode(7, Op::Put(1, 9)), &mut Vec::new());
        m.apply(2, &encode(8, Op::Cas(1, 9, 10)), &mut Vec::new());
        let mut img = Vec::new();
        m.checkpoint().unwrap().write_to(&mut img).unwrap();
        let mut n = Machine::default();
        n.restore(&mut &img[..]).unwrap();
        assert_eq!(
            (n.store.clone(), n.applied.clone()),
            (m.store.clone(), m.applied.clone())
        );
        for cut in 0..img.len() {
            let mut x = Machine::default();
            assert!(x.restore(&mut &img[..cut]).is_err());
            assert!(x.applied.is_empty(), "state unchanged on error");
        }
    }
}
