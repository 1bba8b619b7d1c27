//! A pipelining client: many commands in flight on one connection, completions as they
//! come (in any order).
//!
//! [`Pipeline::submit`] queues a command and returns its tag; [`Pipeline::poll`] sends
//! what is queued (up to the depth asked for, the node's limit of requests in flight, and,
//! for writes, the session's window of [`WRITE_WINDOW`]) and returns the next completion,
//! `(tag, result)`. The retry rules are the [`crate::client::Client`]'s, per command: a
//! write gets its session and sequence number once and keeps them through every resend
//! (after `NOT_LEADER`, `UNAVAILABLE`, a lost connection or a time-out), so it takes effect
//! at most once; `NOT_LEADER` moves the whole connection to the leader it names; each
//! command has its own deadline ([`ClientConfig::deadline`] from its submission). A
//! session is registered before the first write (through the same connection), and again
//! when it expired, under the same rule as the `Client`: a write is resent in a new session
//! only if no earlier attempt of it can have taken effect.

use crate::client::{ClientConfig, ClientError, Conn};
use crate::kv::{KvResult, Op};
use crate::wire::Response;
use rustc_hash::FxHashMap as HashMap;
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Writes of one session in flight at most: the node's session window (128 results kept
/// per session); a write further ahead could push a retried one out of it.
pub const WRITE_WINDOW: u64 = 128;

struct Pending {
    op: Op,
    /// Writes: the session and sequence number (0 until given).
    session: u64,
    seq: u64,
    /// The session registration this client makes for itself.
    internal: bool,
    /// An earlier attempt may have taken effect.
    in_doubt: bool,
    /// Resent in a new session once already.
    renewed: bool,
    not_before: Instant,
    backoff: Duration,
}

/// Many commands in flight on one connection to the cluster (see the module docs).
pub struct Pipeline {
    cfg: ClientConfig,
    depth: usize,
    session: Option<u64>,
    /// Last sequence number given in `session`.
    seq: u64,
    target: Option<String>,
    next: usize,
    conn: Option<Conn>,
    ops: HashMap<u64, Pending>,
    /// Of `ops`, the session registrations this client makes for itself.
    internal: usize,
    next_tag: u64,
    /// Tags to send, in order.
    ready: VecDeque<u64>,
    /// Writes waiting for a session (and for room in its window).
    no_session: VecDeque<u64>,
    /// Request id on the connection -> tag.
    sent: HashMap<u64, u64>,
    /// Sequence numbers of the session's writes not answered yet.
    unanswered: BTreeSet<u64>,
    /// The registration in progress, if any.
    registering: Option<u64>,
    /// (deadline, tag), in submission order.
    deadlines: VecDeque<(Instant, u64)>,
    done: VecDeque<(u64, Result<KvResult, ClientError>)>,
    last_err: String,
    /// Connect failures in a row: (address, error).
    refused: Vec<(String, String)>,
    connect_after: Instant,
    connect_backoff: Duration,
    /// Last time the connection answered anything (or the first request went out).
    heard: Instant,
    /// Frames to send, reused between sends.
    wbuf: Vec<u8>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("session", &self.session)
            .field("seq", &self.seq)
            .field("target", &self.target)
            .field("pending", &self.ops.len())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline keeping up to `depth` requests in flight on its connection.
    pub fn new(cfg: ClientConfig, depth: usize) -> Pipeline {
        let now = Instant::now();
        Pipeline {
            session: cfg.session.map(|(id, _)| id),
            seq: cfg.session.map_or(0, |(_, seq)| seq),
            cfg,
            depth: depth.max(1),
            target: None,
            next: 0,
            conn: None,
            ops: HashMap::default(),
            internal: 0,
            next_tag: 1,
            ready: VecDeque::new(),
            no_session: VecDeque::new(),
            sent: HashMap::default(),
            unanswered: BTreeSet::new(),
            registering: None,
            deadlines: VecDeque::new(),
            done: VecDeque::new(),
            last_err: "no attempt".into(),
            refused: Vec::new(),
            connect_after: now,
            connect_backoff: Duration::from_millis(5),
            heard: now,
            wbuf: Vec::new(),
        }
    }

    /// The session id (0: none yet).
    pub fn session(&self) -> u64 {
        self.session.unwrap_or(0)
    }

    /// Commands submitted and not yet returned by [`Pipeline::poll`].
    pub fn outstanding(&self) -> usize {
        self.ops.len() - self.internal + self.done.len()
    }

    /// Queues `op`; its tag (returned with its result by [`Pipeline::poll`]).
    pub fn submit(&mut self, op: Op) -> u64 {
        let tag = self.add(op, false);
        let p = &self.ops[&tag];
        if matches!(p.op, Op::Get { .. } | Op::Register) {
            self.ready.push_back(tag);
        } else {
            self.no_session.push_back(tag);
        }
        tag
    }

    fn add(&mut self, op: Op, internal: bool) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let now = Instant::now();
        let deadline = now + self.cfg.deadline;
        self.internal += usize::from(internal);
        self.ops.insert(
            tag,
            Pending {
                op,
                session: 0,
                seq: 0,
                internal,
                in_doubt: false,
                renewed: false,
                not_before: now,
                backoff: Duration::from_millis(5),
            },
        );
        self.deadlines.push_back((deadline, tag));
        tag
    }

    /// The next completion, waiting up to `wait` for one (and sending what is queued
    /// meanwhile); `None` if none came in time.
    pub fn poll(&mut self, wait: Duration) -> Option<(u64, Result<KvResult, ClientError>)> {
        if let Some(d) = self.done.pop_front() {
            return Some(d);
        }
        let until = Instant::now() + wait;
        loop {
            if let Some(d) = self.done.pop_front() {
                return Some(d);
            }
            if self.ops.is_empty() {
                return None;
            }
            let now = Instant::now();
            self.expire(now);
            if !self.done.is_empty() {
                continue;
            }
            self.assign();
            self.send(now);
            if !self.done.is_empty() {
                continue;
            }
            if now >= until {
                return None;
            }
            self.receive(until);
        }
    }

    /// Runs `ops` to completion; their results in order. Completions of commands
    /// submitted before stay for [`Pipeline::poll`].
    pub fn execute_all(&mut self, ops: Vec<Op>) -> Vec<Result<KvResult, ClientError>> {
        let tags: Vec<u64> = ops.into_iter().map(|op| self.submit(op)).collect();
        let first = tags.first().copied().unwrap_or(0);
        let mut got: HashMap<u64, Result<KvResult, ClientError>> = HashMap::default();
        let mut others = Vec::new();
        while got.len() < tags.len() {
            match self.poll(Duration::from_secs(1)) {
                Some((t, r)) if t >= first => {
                    got.insert(t, r);
                }
                Some(other) => others.push(other),
                None => {}
            }
        }
        for o in others.into_iter().rev() {
            self.done.push_front(o);
        }
        tags.iter()
            .map(|t| got.remove(t).expect("every tag completes"))
            .collect()
    }

    fn finish(&mut self, tag: u64, r: Result<KvResult, ClientError>) {
        let Some(p) = self.ops.remove(&tag) else {
            return;
        };
        self.internal -= usize::from(p.internal);
        if p.seq != 0 && p.session == self.session() {
            self.unanswered.remove(&p.seq);
        }
        if p.internal {
            self.registering = None;
            match r {
                Ok(KvResult::Session(id)) => {
                    self.session = Some(id);
                    self.seq = 0;
                    self.unanswered.clear();
                }
                Ok(other) => self.fail_waiting(unexpected(other)),
                Err(e) => self.fail_waiting(e),
            }
        } else {
            self.done.push_back((tag, r));
        }
    }

    /// The registration failed: so do the writes waiting for it.
    fn fail_waiting(&mut self, e: ClientError) {
        for tag in std::mem::take(&mut self.no_session) {
            if self.ops.remove(&tag).is_some() {
                self.done.push_back((tag, Err(e.clone())));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, tag)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if self.ops.contains_key(&tag) {
                let e = ClientError::Unavailable(self.last_err.clone());
                self.sent.retain(|_, t| *t != tag);
                self.finish(tag, Err(e));
            }
        }
    }

    /// Gives waiting writes their session and sequence numbers (registering a session
    /// first if there is none).
    fn assign(&mut self) {
        if self.no_session.is_empty() {
            return;
        }
        let Some(session) = self.session else {
            if self.registering.is_none() {
                let tag = self.add(Op::Register, true);
                self.registering = Some(tag);
                self.ready.push_front(tag);
            }
            return;
        };
        while let Some(&tag) = self.no_session.front() {
            let next = self.seq + 1;
            if self
                .unanswered
                .first()
                .is_some_and(|&low| next - low >= WRITE_WINDOW)
            {
                return;
            }
            self.no_session.pop_front();
            let Some(p) = self.ops.get_mut(&tag) else {
                continue;
            };
            self.seq = next;
            p.session = session;
            p.seq = next;
            self.unanswered.insert(next);
            self.ready.push_back(tag);
        }
    }

    /// Connects if needed and sends what is ready, up to the depth.
    fn send(&mut self, now: Instant) {
        if self.ready.is_empty() {
            return;
        }
        if self.conn.is_none() && !self.connect(now) {
            return;
        }
        let conn = self.conn.as_mut().expect("connected");
        let depth = self.depth.min(conn.hello.max_in_flight.max(1) as usize);
        let mut frames = std::mem::take(&mut self.wbuf);
        frames.clear();
        let mut later = Vec::new();
        if self.sent.is_empty() {
            self.heard = now;
        }
        while self.sent.len() < depth {
            let Some(tag) = self.ready.pop_front() else {
                break;
            };
            let Some(p) = self.ops.get(&tag) else {
                continue;
            };
            if p.not_before > now {
                later.push(tag);
                continue;
            }
            let id = conn.frame_command(&mut frames, p.session, p.seq, &p.op);
            self.sent.insert(id, tag);
        }
        for t in later.into_iter().rev() {
            self.ready.push_front(t);
        }
        if !frames.is_empty() {
            if let Err(e) = conn.write(&frames) {
                self.conn_failed(format!("{}: {e}", self.target_name()));
            }
        }
        self.wbuf = frames;
    }

    fn target_name(&self) -> String {
        self.target.clone().unwrap_or_else(|| "?".into())
    }

    /// Connects to the target (or the next address); `false` if it failed (then the
    /// commands wait for the back-off, or fail with `Unreachable` under `fail_fast`).
    fn connect(&mut self, now: Instant) -> bool {
        if now < self.connect_after {
            return false;
        }
        if self.cfg.addrs.is_empty() {
            self.last_err = "no addresses".into();
            return false;
        }
        let target = self
            .target
            .get_or_insert_with(|| self.cfg.addrs[self.next % self.cfg.addrs.len()].clone())
            .clone();
        match Conn::open(&target, self.cfg.connect_timeout, self.cfg.attempt_timeout) {
            Ok(c) => {
                self.conn = Some(c);
                self.refused.clear();
                self.connect_backoff = Duration::from_millis(5);
                true
            }
            Err(e) => {
                self.last_err = format!("{target}: {e}");
                self.refused.retain(|(a, _)| *a != target);
                self.refused.push((target, e.to_string()));
                self.rotate();
                self.pause();
                if self.cfg.fail_fast {
                    let all: Option<Vec<(String, String)>> = self
                        .cfg
                        .addrs
                        .iter()
                        .map(|a| {
                            let (_, e) = self.refused.iter().find(|(r, _)| r == a)?;
                            Some((a.clone(), e.clone()))
                        })
                        .collect();
                    if let Some(all) = all {
                        let tags: Vec<u64> = self.ops.keys().copied().collect();
                        for t in tags {
                            self.finish(t, Err(ClientError::Unreachable(all.clone())));
                        }
                        self.ready.clear();
                        self.no_session.clear();
                    }
                }
                false
            }
        }
    }

    /// Waits for the next connect by the back-off, and doubles it (up to 200 ms).
    fn pause(&mut self) {
        self.connect_after = Instant::now() + self.connect_backoff;
        self.connect_backoff = (self.connect_backoff * 2).min(Duration::from_millis(200));
    }

    fn rotate(&mut self) {
        self.conn = None;
        self.target = None;
        self.next = self.next.wrapping_add(1);
    }

    /// The connection is gone: every request on it is resent (it may have taken effect).
    fn conn_failed(&mut self, why: String) {
        self.last_err = why;
        self.requeue_sent(true);
        self.rotate();
        self.pause();
    }

    fn requeue_sent(&mut self, in_doubt: bool) {
        let mut tags: Vec<u64> = self.sent.drain().map(|(_, t)| t).collect();
        tags.sort_unstable();
        for t in tags.into_iter().rev() {
            if let Some(p) = self.ops.get_mut(&t) {
                p.in_doubt |= in_doubt;
                self.ready.push_front(t);
            }
        }
    }

    /// Reads answers until one completes a command or `until`.
    fn receive(&mut self, until: Instant) {
        let now = Instant::now();
        // Nothing to read (no connection, or nothing sent): sleep until the next back-off
        // ends (and, without a connection, until a reconnect is allowed).
        let idle = match &self.conn {
            None => Some(self.connect_after),
            Some(_) if self.sent.is_empty() => Some(now),
            Some(_) => None,
        };
        if let Some(not_before) = idle {
            let next = self
                .ready
                .iter()
                .filter_map(|t| self.ops.get(t).map(|p| p.not_before))
                .min()
                .unwrap_or(until)
                .max(not_before)
                .min(until);
            std::thread::sleep(
                next.saturating_duration_since(now)
                    .min(Duration::from_millis(50)),
            );
            return;
        }
        let conn = self.conn.as_mut().expect("connected: checked above");
        // Wake for resends waiting on a back-off too.
        let mut wait = until.saturating_duration_since(now);
        if !self.ready.is_empty() {
            wait = wait.min(Duration::from_millis(5));
        }
        let attempt = self.cfg.attempt_timeout;
        match conn.recv_within(wait) {
            Ok(Some((id, r))) => {
                self.heard = Instant::now();
                self.answer(id, r);
                // Take whatever else was read with it.
                while let Some(conn) = self.conn.as_mut() {
                    match conn.buffered() {
                        Ok(Some((id, r))) => self.answer(id, r),
                        Ok(None) => break,
                        Err(e) => {
                            let why = format!("{}: {e}", self.target_name());
                            self.conn_failed(why);
                            break;
                        }
                    }
                }
            }
            Ok(None) => {
                if Instant::now().duration_since(self.heard) >= attempt {
                    let why = format!("{}: no answer within {attempt:?}", self.target_name());
                    self.conn_failed(why);
                }
            }
            Err(e) => {
                let why = format!("{}: {e}", self.target_name());
                self.conn_failed(why);
            }
        }
    }

    fn answer(&mut self, id: u64, r: Response) {
        if let Response::GoAway(why) = r {
            let why = format!(
                "{}: the node closed the connection: {why}",
                self.target_name()
            );
            self.conn_failed(why);
            return;
        }
        let Some(tag) = self.sent.remove(&id) else {
            return;
        };
        let Some(p) = self.ops.get_mut(&tag) else {
            return;
        };
        match r {
            Response::Ok(payload) => match KvResult::decode(&payload) {
                Ok(KvResult::SessionExpired) if p.seq != 0 && !p.internal => {
                    let (session, seq) = (p.session, p.seq);
                    if p.in_doubt || p.renewed {
                        self.finish(
                            tag,
                            Err(ClientError::SessionExpired(format!(
                                "session {session} expired while write {seq} was in doubt"
                            ))),
                        );
                        return;
                    }
                    // No attempt of it can have been applied: resend in a new session.
                    p.renewed = true;
                    p.seq = 0;
                    p.session = 0;
                    if self.session == Some(session) {
                        self.session = None;
                    }
                    self.unanswered.remove(&seq);
                    self.no_session.push_front(tag);
                }
                Ok(res) => self.finish(tag, Ok(res)),
                Err(e) => self.finish(tag, Err(ClientError::Rejected(format!("bad result: {e}")))),
            },
            Response::Error(e) => self.finish(tag, Err(ClientError::Rejected(e))),
            Response::Unavailable(e) => {
                p.in_doubt = true;
                p.not_before = Instant::now() + p.backoff;
                p.backoff = (p.backoff * 2).min(Duration::from_millis(200));
                self.last_err = e;
                self.ready.push_back(tag);
            }
            Response::NotLeader { leader, addr } => {
                let at = self.target.as_deref().unwrap_or("?");
                self.last_err = match leader {
                    Some(l) => format!("{at} is not the leader (node {l} is)"),
                    None => format!("{at} is not the leader and knows none"),
                };
                // A node stopping answers so even for a command it had proposed.
                p.in_doubt |= leader.is_none();
                self.ready.push_front(tag);
                // Everything else on this connection goes to the leader too; answers
                // still on their way are lost, so those commands are in doubt.
                self.requeue_sent(true);
                self.conn = None;
                match addr {
                    Some(a) if Some(&a) != self.target.as_ref() => self.target = Some(a),
                    _ => {
                        self.rotate();
                        self.pause();
                    }
                }
            }
            Response::GoAway(_) => unreachable!("handled above"),
        }
    }
}

fn unexpected(r: KvResult) -> ClientError {
    match r {
        KvResult::Error(e) => ClientError::Rejected(e),
        other => ClientError::Rejected(format!("unexpected result {other:?}")),
    }
}
