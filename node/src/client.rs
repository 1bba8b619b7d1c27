//! A client for the replicated key-value service.
//!
//! A [`Client`] registers a session with the cluster before its first write (one `REGISTER`
//! command through the log) and numbers its writes 1, 2, ... Reads need no session. It
//! sends each command to the node it believes leads, follows `NotLeader` redirects, and on
//! a time-out, a lost connection or an `Unavailable` answer sends the *same* command (same
//! session and sequence number) again, to the same or another node, until its deadline:
//! the state machine applies a write at most once, so retries are safe. If the session has
//! expired (the cluster answers "session expired"), the client registers a new one and
//! resends only when no earlier attempt of that write can have taken effect; otherwise it
//! returns [`ClientError::SessionExpired`]. One command is outstanding per client; use
//! several clients for concurrency. With
//! [`ClientConfig::fail_fast`] it stops early, with [`ClientError::Unreachable`], once every
//! address has refused the connection in a row.

use crate::error::NodeError;
use crate::kv::{Command, KvResult, Op};
use crate::wire::{self, ClientHello, NodeStatus, Request, Response, ServerHello};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client addresses of the nodes (`host:port`).
    pub addrs: Vec<String>,
    /// How long one attempt waits for an answer before retrying.
    pub attempt_timeout: Duration,
    /// How long one command may take in all before [`ClientError::Unavailable`].
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// A session registered earlier, to go on with: `(session id, last sequence number
    /// used in it)` (the next write uses the one after: starting over at 1 would be
    /// answered from the session's stored results). `None`: register one before the
    /// first write.
    pub session: Option<(u64, u64)>,
    /// Give up with [`ClientError::Unreachable`] as soon as every address in `addrs` failed
    /// to connect (refused, unresolvable, connect time-out) in a row, instead of retrying
    /// until the deadline. Off by default: a library user riding out a full-cluster
    /// restart wants the retries; the CLI turns it on.
    pub fail_fast: bool,
}

impl ClientConfig {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(15),
            connect_timeout: Duration::from_millis(500),
            session: None,
            fail_fast: false,
        }
    }
}

/// Parses one endpoint: `host:port`, or `id=host:port` as in `--client-peers` (the `id=`
/// part is dropped). Checks the form only; the name is resolved when connecting.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let t = s.trim();
    let addr = match t.split_once('=') {
        Some((id, rest)) if !id.is_empty() && !id.contains(':') => rest,
        _ => t,
    };
    let bad = |why: &str| {
        Err(format!(
            "bad endpoint `{s}`: {why} (want host:port or id=host:port)"
        ))
    };
    if addr.is_empty() {
        return bad("empty");
    }
    if addr.contains(|c: char| c.is_whitespace() || c == '=' || c == '/') {
        return bad("unexpected character");
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    if host.is_empty() {
        return bad("no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("an IPv6 address must be in brackets, [::1]:port");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(addr.to_string()),
        _ => bad("port is not a number in 1..=65535"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No node answered the command before the deadline. The command may or may not have
    /// taken effect.
    Unavailable(String),
    /// The cluster refused the command (malformed, too large): it did not take effect.
    Rejected(String),
    /// Every address failed to connect, each with its error (in the order of
    /// [`ClientConfig::addrs`]); only with [`ClientConfig::fail_fast`]. The command did not
    /// reach any node, so it did not take effect.
    Unreachable(Vec<(String, String)>),
    /// The client's session expired while a write was in doubt (an earlier attempt may
    /// have taken effect): the write may or may not have been applied. The next write
    /// registers a new session.
    SessionExpired(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unavailable(s) => write!(f, "cluster unavailable: {s}"),
            ClientError::Rejected(s) => write!(f, "rejected: {s}"),
            ClientError::SessionExpired(s) => write!(f, "session expired: {s}"),
            ClientError::Unreachable(all) => {
                write!(f, "no endpoint reachable")?;
                for (a, e) in all {
                    write!(f, "; {a}: {e}")?;
                }
                Ok(())
            }
        }
    }
}
impl std::error::Error for ClientError {}

/// A random non-zero id.
pub fn random_id() -> u64 {
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        h.write_u32(std::process::id());
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

pub struct Client {
    cfg: ClientConfig,
    /// The session (`None`: none registered yet, or the last one expired).
    session: Option<u64>,
    /// The sequence number of the last write sent in `session`.
    seq: u64,
    /// Index in `cfg.addrs` tried next when there is no redirect.
    next: usize,
    target: Option<String>,
    conn: Option<Conn>,
    /// Attempts made by the last command (1 = no retry).
    pub last_attempts: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session)
            .field("seq", &self.seq)
            .field("target", &self.target)
            .finish()
    }
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address")))
}

fn invalid(e: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.into())
}

/// A connection to a node, past the hello (client protocol version 2).
pub struct Conn {
    stream: TcpStream,
    /// The node's hello: its limits.
    pub hello: ServerHello,
    next_id: u64,
    /// Bytes read land in `rbuf[rend..]`; `rbuf[rpos..rend]` is not parsed yet. The buffer
    /// is zeroed once and reused: growing it by a zeroed chunk on every read (and freeing
    /// it once parsed) cost a 64 KiB `memset` per read.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    /// The socket's read time-out as last set (whole milliseconds), to skip a
    /// `setsockopt` per read when it has not changed.
    read_timeout: Duration,
}

/// Bytes asked of the socket per read at least.
const READ_CHUNK: usize = 64 << 10;

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("hello", &self.hello).finish()
    }
}

impl Conn {
    /// Connects to `addr` and exchanges the hellos; `io_timeout` bounds each read and write.
    /// A node that refuses the connection (too many connections, no version in common)
    /// gives an error with its reason.
    pub fn open(addr: &str, connect_timeout: Duration, io_timeout: Duration) -> io::Result<Conn> {
        let mut s = TcpStream::connect_timeout(&resolve(addr)?, connect_timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(io_timeout))?;
        s.set_write_timeout(Some(io_timeout))?;
        s.write_all(
            &ClientHello {
                version: wire::VERSION,
            }
            .encode(),
        )?;
        let mut h = [0u8; ServerHello::LEN];
        if let Err(e) = s.read_exact(&mut h) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    e.kind(),
                    "the node closed the connection during the hello: not a ballot-node \
                     speaking client protocol version 2 (an older node?)",
                )
            } else {
                e
            });
        }
        let hello = ServerHello::decode(&h).ok_or_else(|| {
            invalid("the node answered the hello with garbage: not a ballot-node of client protocol version 2")
        })?;
        let mut c = Conn {
            stream: s,
            hello,
            next_id: 1,
            rbuf: Vec::new(),
            rpos: 0,
            rend: 0,
            read_timeout: io_timeout,
        };
        if hello.version != wire::VERSION {
            return Err(match c.recv() {
                Ok((_, Response::GoAway(why))) => io::Error::new(io::ErrorKind::Unsupported, why),
                _ => io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the node speaks client protocol version {}", hello.version),
                ),
            });
        }
        // A node over its connection limit accepts, answers the hello, then says why it
        // closes: catch that here, as a failure to connect.
        if let Some(r) = c.try_recv_now()? {
            return Err(match r {
                (_, Response::GoAway(why)) => io::Error::new(io::ErrorKind::ConnectionRefused, why),
                _ => invalid("an answer before any request"),
            });
        }
        Ok(c)
    }

    /// A fresh request id on this connection.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Appends the frame of request `body` (an encoded [`Request`]) under a fresh id to
    /// `out`; the id.
    pub fn frame(&mut self, out: &mut Vec<u8>, body: &[u8]) -> u64 {
        let id = self.next_id();
        wire::put_frame(out, id, body);
        id
    }

    /// Appends the frame of the command `(session, seq, op)` under a fresh id to `out`,
    /// encoded in place; the id.
    pub fn frame_command(&mut self, out: &mut Vec<u8>, session: u64, seq: u64, op: &Op) -> u64 {
        let id = self.next_id();
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&id.to_le_bytes());
        out.push(wire::kind::COMMAND);
        crate::kv::encode_command(out, session, seq, op);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        id
    }

    /// Writes already framed requests.
    pub fn write(&mut self, frames: &[u8]) -> io::Result<()> {
        self.stream.write_all(frames)
    }

    /// Sends one request; its id.
    pub fn send(&mut self, body: &[u8]) -> io::Result<u64> {
        let mut f = Vec::with_capacity(12 + body.len());
        let id = self.frame(&mut f, body);
        self.write(&f)?;
        Ok(id)
    }

    /// An answer already read from the socket, if any (never waits).
    pub fn buffered(&mut self) -> io::Result<Option<(u64, Response)>> {
        self.parse()
    }

    /// A complete frame already read, if any.
    fn parse(&mut self) -> io::Result<Option<(u64, Response)>> {
        let avail = &self.rbuf[self.rpos..self.rend];
        if avail.len() < 4 {
            return Ok(None);
        }
        let n = u32::from_le_bytes(avail[..4].try_into().expect("4")) as usize;
        if n > wire::MAX_FRAME.max(crate::kv::MAX_VALUE + 64) {
            return Err(invalid(format!("answer frame of {n} bytes is too large")));
        }
        if avail.len() < 4 + n {
            return Ok(None);
        }
        let (id, body) = wire::split_id(&avail[4..4 + n])?;
        let r = Response::decode(body).map_err(invalid)?;
        self.rpos += 4 + n;
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
            if self.rbuf.len() > 4 * READ_CHUNK {
                // A large answer passed: do not hold its buffer.
                self.rbuf = Vec::new();
            }
        }
        Ok(Some((id, r)))
    }

    /// Reads once more from the socket (blocking up to the read time-out); `false` on a
    /// time-out.
    fn fill(&mut self) -> io::Result<bool> {
        if self.rpos > 0 {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        if self.rbuf.len() - self.rend < READ_CHUNK / 4 {
            let grown = (self.rbuf.len() * 2).max(READ_CHUNK);
            self.rbuf.resize(grown, 0);
        }
        match self.stream.read(&mut self.rbuf[self.rend..]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            )),
            Ok(n) => {
                self.rend += n;
                Ok(true)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(false),
                io::ErrorKind::Interrupted => Ok(true),
                _ => Err(e),
            },
        }
    }

    /// The next answer, waiting up to the read time-out (an error on time-out).
    pub fn recv(&mut self) -> io::Result<(u64, Response)> {
        loop {
            if let Some(r) = self.parse()? {
                return Ok(r);
            }
            if !self.fill()? {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
        }
    }

    /// The next answer if one comes within `wait` (at least 1 ms).
    pub fn recv_within(&mut self, wait: Duration) -> io::Result<Option<(u64, Response)>> {
        if let Some(r) = self.parse()? {
            return Ok(Some(r));
        }
        self.set_read_timeout(wait)?;
        let deadline = Instant::now() + wait;
        loop {
            if !self.fill()? {
                return Ok(None);
            }
            if let Some(r) = self.parse()? {
                return Ok(Some(r));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.set_read_timeout(left)?;
        }
    }

    /// An answer already buffered, or readable without waiting.
    fn try_recv_now(&mut self) -> io::Result<Option<(u64, Response)>> {
        if let Some(r) = self.parse()? {
            return Ok(Some(r));
        }
        self.stream.set_nonblocking(true)?;
        let r = self.fill();
        self.stream.set_nonblocking(false)?;
        r?;
        self.parse()
    }

    /// Sends `body` and waits (up to the read time-out) for its answer, skipping answers
    /// to other (earlier, abandoned) requests. A `GOAWAY` is an error with its reason.
    pub fn call(&mut self, body: &[u8]) -> io::Result<Response> {
        let id = self.send(body)?;
        loop {
            match self.recv()? {
                (_, Response::GoAway(why)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the node closed the connection: {why}"),
                    ))
                }
                (got, r) if got == id => return Ok(r),
                _ => {}
            }
        }
    }

    /// Sets the time-out of each read, rounded up to whole milliseconds (at least 1 ms);
    /// no system call when it is unchanged.
    pub fn set_read_timeout(&mut self, t: Duration) -> io::Result<()> {
        let ms = t.as_nanos().div_ceil(1_000_000).clamp(1, u64::MAX as u128) as u64;
        let t = Duration::from_millis(ms);
        if t != self.read_timeout {
            self.stream.set_read_timeout(Some(t))?;
            self.read_timeout = t;
        }
        Ok(())
    }
}

impl Client {
    pub fn new(addrs: Vec<String>) -> Self {
        Self::with_config(ClientConfig::new(addrs))
    }

    pub fn with_config(cfg: ClientConfig) -> Self {
        Client {
            session: cfg.session.map(|(id, _)| id),
            seq: cfg.session.map_or(0, |(_, seq)| seq),
            cfg,
            next: 0,
            target: None,
            conn: None,
            last_attempts: 0,
        }
    }

    /// The session id (0: none registered yet).
    pub fn id(&self) -> u64 {
        self.session.unwrap_or(0)
    }
    /// The sequence number of the last write sent.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn connect(&mut self) -> io::Result<&mut Conn> {
        if self.conn.is_none() {
            let target = match &self.target {
                Some(t) => t.clone(),
                None => {
                    if self.cfg.addrs.is_empty() {
                        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no addresses"));
                    }
                    let t = self.cfg.addrs[self.next % self.cfg.addrs.len()].clone();
                    self.target = Some(t.clone());
                    t
                }
            };
            let c = Conn::open(&target, self.cfg.connect_timeout, self.cfg.attempt_timeout)?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// Drops the connection and moves to the next address of the list.
    fn rotate(&mut self) {
        self.conn = None;
        self.target = None;
        self.next = self.next.wrapping_add(1);
    }

    /// Runs one command to completion (see the module docs for the retry rules).
    pub fn execute(&mut self, op: Op) -> Result<KvResult, ClientError> {
        if matches!(op, Op::Get { .. } | Op::Register) {
            return self.send(&command(0, 0, op)).map(|(r, _)| r);
        }
        let mut renewed = false;
        loop {
            let session = self.session()?;
            self.seq += 1;
            let (r, in_doubt) = self.send(&command(session, self.seq, op.clone()))?;
            if r != KvResult::SessionExpired {
                return Ok(r);
            }
            self.session = None;
            if in_doubt || renewed {
                return Err(ClientError::SessionExpired(format!(
                    "session {session} expired while write {} was in doubt",
                    self.seq
                )));
            }
            // No attempt of this write can have been applied: safe to resend it in a new
            // session.
            renewed = true;
        }
    }

    /// The session, registered first if there is none.
    fn session(&mut self) -> Result<u64, ClientError> {
        if let Some(s) = self.session {
            return Ok(s);
        }
        match self.send(&command(0, 0, Op::Register))?.0 {
            KvResult::Session(id) => {
                self.session = Some(id);
                self.seq = 0;
                Ok(id)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Sends one encoded request until it is answered or the deadline passes. Also says
    /// whether an attempt before the answering one may have taken effect (an answer lost,
    /// `Unavailable`, a node stopping).
    fn send(&mut self, req: &[u8]) -> Result<(KvResult, bool), ClientError> {
        let mut in_doubt = false;
        let deadline = Instant::now() + self.cfg.deadline;
        let mut backoff = Duration::from_millis(5);
        let mut last_err = String::from("no attempt");
        // Connect failures since the last successful connect: (address, error).
        let mut refused: Vec<(String, String)> = Vec::new();
        self.last_attempts = 0;
        loop {
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable(last_err));
            }
            self.last_attempts += 1;
            let resp = match self.connect() {
                Ok(c) => c.call(req),
                Err(e) => {
                    let t = self.target.clone().unwrap_or_default();
                    last_err = format!("{t}: {e}");
                    refused.retain(|(a, _)| *a != t);
                    refused.push((t, e.to_string()));
                    self.rotate();
                    if let Some(all) = self.all_refused(&refused) {
                        return Err(ClientError::Unreachable(all));
                    }
                    self.pause(&mut backoff, deadline);
                    continue;
                }
            };
            refused.clear();
            match resp {
                Ok(Response::Ok(payload)) => {
                    return KvResult::decode(&payload)
                        .map(|r| (r, in_doubt))
                        .map_err(|e| ClientError::Rejected(format!("bad result: {e}")))
                }
                Ok(Response::Error(e)) => return Err(ClientError::Rejected(e)),
                Ok(Response::NotLeader { leader, addr }) => {
                    let at = self.target.as_deref().unwrap_or("?");
                    last_err = match leader {
                        Some(l) => format!("{at} is not the leader (node {l} is)"),
                        None => format!("{at} is not the leader and knows none"),
                    };
                    // A node stopping answers so even for a command it had proposed.
                    in_doubt |= leader.is_none();
                    self.conn = None;
                    match addr {
                        Some(a) if Some(&a) != self.target.as_ref() => {
                            self.target = Some(a);
                            continue;
                        }
                        _ => self.rotate(),
                    }
                }
                Ok(Response::Unavailable(e)) => {
                    in_doubt = true;
                    last_err = e
                }
                // `Conn::call` makes a GOAWAY an error; here for completeness.
                Ok(Response::GoAway(e)) => {
                    in_doubt = true;
                    last_err = format!("{}: {e}", self.target.as_deref().unwrap_or("?"));
                    self.rotate();
                }
                Err(e) => {
                    in_doubt = true;
                    last_err = format!("{}: {e}", self.target.as_deref().unwrap_or("?"));
                    self.rotate();
                }
            }
            self.pause(&mut backoff, deadline);
        }
    }

    /// With `fail_fast`, when every configured address is among the `refused` ones: their
    /// errors in the order of the configuration.
    fn all_refused(&self, refused: &[(String, String)]) -> Option<Vec<(String, String)>> {
        if !self.cfg.fail_fast {
            return None;
        }
        self.cfg
            .addrs
            .iter()
            .map(|a| {
                let (_, e) = refused.iter().find(|(r, _)| r == a)?;
                Some((a.clone(), e.clone()))
            })
            .collect()
    }

    /// Sleeps the back-off (never past `deadline`) and doubles it, up to 200 ms.
    fn pause(&self, backoff: &mut Duration, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep((*backoff).min(left));
        *backoff = (*backoff * 2).min(Duration::from_millis(200));
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        match self.execute(Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        })? {
            KvResult::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self.execute(Op::Get { key: key.to_vec() })? {
            KvResult::Value(v) => Ok(Some(v)),
            KvResult::NotFound => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// `true` if the key existed.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool, ClientError> {
        match self.execute(Op::Delete { key: key.to_vec() })? {
            KvResult::Ok => Ok(true),
            KvResult::NotFound => Ok(false),
            other => Err(unexpected(other)),
        }
    }

    /// `Ok(Ok(()))` when swapped, `Ok(Err(current))` when the current value did not match.
    pub fn cas(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        let op = Op::Cas {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.to_vec(),
        };
        match self.execute(op)? {
            KvResult::Ok => Ok(Ok(())),
            KvResult::CasFailed(cur) => Ok(Err(cur)),
            other => Err(unexpected(other)),
        }
    }

    /// Asks every node for its status.
    pub fn cluster_status(&self) -> Vec<(String, Result<NodeStatus, NodeError>)> {
        self.cfg
            .addrs
            .iter()
            .map(|a| {
                (
                    a.clone(),
                    status(a, self.cfg.connect_timeout.max(Duration::from_secs(1))),
                )
            })
            .collect()
    }
}

impl Client {
    /// Asks every node to take a checkpoint now.
    pub fn cluster_checkpoint(&self) -> Vec<(String, Result<(), NodeError>)> {
        self.cfg
            .addrs
            .iter()
            .map(|a| {
                (
                    a.clone(),
                    checkpoint(a, self.cfg.connect_timeout.max(Duration::from_secs(1))),
                )
            })
            .collect()
    }
}

/// An encoded COMMAND request.
pub(crate) fn command(client: u64, seq: u64, op: Op) -> Vec<u8> {
    Request::Command(Command { client, seq, op }.encode()).encode()
}

fn unexpected(r: KvResult) -> ClientError {
    match r {
        KvResult::Error(e) => ClientError::Rejected(e),
        other => ClientError::Rejected(format!("unexpected result {other:?}")),
    }
}

fn one_shot(addr: &str, timeout: Duration, req: Request) -> Result<Response, NodeError> {
    let go = || -> io::Result<Response> { Conn::open(addr, timeout, timeout)?.call(&req.encode()) };
    go().map_err(NodeError::Unreachable)
}

/// One node's status.
pub fn status(addr: &str, timeout: Duration) -> Result<NodeStatus, NodeError> {
    match one_shot(addr, timeout, Request::Status)? {
        Response::Ok(b) => NodeStatus::decode(&b).map_err(NodeError::Answer),
        other => Err(NodeError::Answer(format!("unexpected answer {other:?}"))),
    }
}

/// Asks one node to take a checkpoint now (it is written in the background; its status
/// shows the newest checkpoint).
pub fn checkpoint(addr: &str, timeout: Duration) -> Result<(), NodeError> {
    match one_shot(addr, timeout, Request::Checkpoint)? {
        Response::Ok(b) if b.is_empty() => Ok(()),
        Response::Error(e) => Err(NodeError::Answer(e)),
        other => Err(NodeError::Answer(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_endpoint;

    #[test]
    fn endpoints() {
        for (s, want) in [
            ("127.0.0.1:7200", "127.0.0.1:7200"),
            ("2=127.0.0.1:7200", "127.0.0.1:7200"),
            (" node-a=db.example:1 ", "db.example:1"),
            ("[::1]:7200", "[::1]:7200"),
            ("0=[::1]:7200", "[::1]:7200"),
        ] {
            assert_eq!(parse_endpoint(s).as_deref(), Ok(want), "{s}");
        }
        for s in [
            "",
            "0=",
            "host",
            ":7200",
            "h:",
            "h:0",
            "h:70000",
            "h:x",
            "::1:7200",
            "a=b=c:1",
            "h :1",
            "http://h:1",
        ] {
            assert!(parse_endpoint(s).is_err(), "{s} accepted");
        }
    }
}
