//! The client port: one event-loop thread (`mio`, edge-triggered epoll) serves every
//! client connection; there is no thread per connection. See `docs/client-protocol.md`
//! for the protocol and its limits.
//!
//! - The loop reads requests from every readable connection and hands the commands read in
//!   one turn to the replica as one batch ([`Handle::submit_batch`]: the commands copied
//!   back to back into one [`Proposals`] buffer, none allocated on its own); STATUS and
//!   CHECKPOINT are answered on the spot.
//! - Outcomes come back on a [`CompletionSink`]: the replica thread sends one
//!   [`Completions`] per step and wakes the loop through a `mio::Waker` (only when the loop
//!   sleeps). Each answer is framed in place on its connection as it comes, in any order,
//!   and written when the socket takes it.
//! - Limits ([`ClientLimits`]): connections (one past the limit is answered a clear error
//!   after its hello, then closed), requests in flight per connection (at the limit the
//!   loop stops reading that socket: back pressure, no queue), frame size, idle time,
//!   and bytes of answers a client leaves unread (past it the connection is cut, without
//!   holding up anyone else: nothing here ever blocks on a socket).
//! - A request without an outcome after [`PROPOSE_TIMEOUT`] is answered `UNAVAILABLE`
//!   (outcome unknown); its late outcome is dropped.

use crate::kv::{Command, DigestCell};
use crate::server::PROPOSE_TIMEOUT;
use crate::wire::{self, kind, ClientHello, NodeStatus, Response, ServerHello};
use ballot::handoff::{Completions, Proposals};
use ballot::protocol::ProposeError;
use ballot::runtime::{CompletionSink, Handle};
use crossbeam::channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustc_hash::FxHashSet as HashSet;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limits of the client port (`ballot-node --client-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Connections served at once; one more gets a clear error after its hello.
    pub max_connections: usize,
    /// Requests in flight per connection: at the limit the node reads no more from it
    /// until some are answered.
    pub max_in_flight: usize,
    /// Largest request frame (`len`); a larger one closes the connection with an error.
    pub max_frame: usize,
    /// A connection with nothing in flight that sends nothing for this long is closed
    /// (with a `GOAWAY`); so is one that takes none of its answers for this long. `None`:
    /// never.
    pub idle_timeout: Option<Duration>,
    /// Bytes of answers kept for a client that does not read them; past this its
    /// connection is cut.
    pub max_output: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_connections: 10_000,
            max_in_flight: 256,
            max_frame: wire::MAX_FRAME,
            idle_timeout: Some(Duration::from_secs(300)),
            max_output: 16 << 20,
        }
    }
}

/// Connections past [`ClientLimits::max_connections`] kept at once just to tell them they
/// are refused (each for at most [`REFUSE_FOR`]); past these, new ones are closed at once.
const REFUSING: usize = 256;
/// How long a refused connection is kept to read its hello and answer it.
const REFUSE_FOR: Duration = Duration::from_secs(1);
/// After an error answer (`GOAWAY`), how long the node reads and drops what the client
/// still sends, so that closing does not reset the connection before it got the answer.
const LINGER: Duration = Duration::from_secs(1);
/// A connection must send its hello within this (or the idle time-out, if shorter).
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// How often the loop looks at time-outs.
const TICK: Duration = Duration::from_millis(50);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST: usize = 2;

/// What the loop needs of the node.
pub(crate) struct Serving {
    pub handle: Handle,
    pub peers: Arc<BTreeMap<u8, String>>,
    pub digest: Arc<DigestCell>,
    /// Client connections open (for the metrics).
    pub clients: Arc<AtomicU64>,
    pub limits: ClientLimits,
}

/// Starts the loop's thread on `listener`; it ends once `stop` is set.
pub(crate) fn start(
    listener: std::net::TcpListener,
    serving: Serving,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let sleeping = Arc::new(AtomicBool::new(false));
    let s = sleeping.clone();
    let (sink, done) = CompletionSink::new(move || {
        // Only a sleeping loop needs the wake-up (a syscall); it checks the channel before
        // it sleeps (see `Loop::run`).
        if s.swap(false, Ordering::SeqCst) {
            let _ = waker.wake();
        }
    });
    let mut l = Loop {
        poll,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        gens: Vec::new(),
        open: 0,
        total: 0,
        slots: Vec::new(),
        free_slots: Vec::new(),
        expiry: VecDeque::new(),
        batch: Proposals::new(),
        sink,
        done,
        sleeping,
        dirty: Vec::new(),
        now: Instant::now(),
        scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        accept_pending: false,
        accept_retry: false,
        serving,
        refused_warned: None,
    };
    std::thread::Builder::new()
        .name("client-io".into())
        .spawn(move || l.run(&stop))?;
    Ok(())
}

enum Phase {
    /// Waiting for the client's hello (or a v1 client's first frame).
    Hello,
    /// A v1 client: dropping the rest of its first frame (`skip` bytes) before answering.
    Legacy { skip: usize },
    /// Serving requests.
    Open,
    /// An error was answered: sending what is queued, then reading and dropping input
    /// until the client closes or `until`.
    Draining { until: Instant, shut: bool },
}

struct Conn {
    sock: TcpStream,
    gen: u32,
    phase: Phase,
    /// Over the connection limit: answered this after its hello, then closed.
    refuse: Option<String>,
    /// Counts against the connection limit (and the metric).
    counted: bool,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Ids of the requests in flight (client-chosen; at most `max_in_flight` of them, which
    /// bounds what colliding ids could cost).
    ids: HashSet<u64>,
    /// On the `dirty` list already (a connection is serviced once per turn, however many
    /// of its answers came in).
    queued: bool,
    /// The socket was read until it had nothing more (reading waits for its next event).
    drained: bool,
    /// The client closed its side.
    eof: bool,
    since: Instant,
    last_read: Instant,
    /// Last time the socket took bytes of answers (or the answers queue became non-empty).
    last_write: Instant,
}

impl Conn {
    fn pending_output(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
    fn respond(&mut self, id: u64, r: &Response) {
        match r {
            Response::Ok(p) => self.respond_ok(id, p),
            other => self.respond_with(id, |b| b.extend_from_slice(&other.encode())),
        }
    }
    /// Answers OK with `payload`, encoded in place (no allocation once `wbuf` has grown).
    fn respond_ok(&mut self, id: u64, payload: &[u8]) {
        self.respond_with(id, |b| {
            b.push(wire::status::OK);
            b.extend_from_slice(payload);
        })
    }
    /// Frames an answer in place: `len | id | status | rest`, `body` writing the last two.
    fn respond_with(&mut self, id: u64, body: impl FnOnce(&mut Vec<u8>)) {
        if self.pending_output() == 0 {
            self.last_write = Instant::now();
        }
        let at = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; 4]);
        self.wbuf.extend_from_slice(&id.to_le_bytes());
        body(&mut self.wbuf);
        let len = (self.wbuf.len() - at - 4) as u32;
        self.wbuf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    /// Answers `why` on the connection (id 0) and closes it once that is sent.
    fn go_away(&mut self, why: String) {
        tracing::debug!("client connection closed: {why}");
        self.respond(wire::CONNECTION_ID, &Response::GoAway(why));
        self.drain_after();
    }
    fn drain_after(&mut self) {
        self.rbuf.clear();
        self.rpos = 0;
        self.phase = Phase::Draining {
            until: Instant::now() + LINGER,
            shut: false,
        };
    }
}

/// A request handed to the replica: where its answer goes.
struct Slot {
    gen: u32,
    /// (connection index, its generation, request id); `None`: free.
    live: Option<(usize, u32, u64)>,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Generation of each connection index (bumped when a connection closes).
    gens: Vec<u32>,
    /// Connections counted against the limit.
    open: usize,
    /// All connections, refused ones included.
    total: usize,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// (deadline, tag) of requests handed to the replica, oldest first.
    expiry: VecDeque<(Instant, u64)>,
    /// Commands read this turn, for one `submit_batch`.
    batch: Proposals,
    sink: CompletionSink,
    done: Receiver<Completions>,
    sleeping: Arc<AtomicBool>,
    /// Connections whose state changed this turn (answers queued, room in flight), each
    /// once (see [`Loop::mark`]).
    dirty: Vec<usize>,
    /// The time at the start of this loop turn: timestamps and deadlines use it (one clock
    /// read per turn, not one per request).
    now: Instant,
    /// Every read lands here first; a connection's buffer keeps only what it has not
    /// parsed yet (growing each connection's buffer by `READ_CHUNK` zeroed bytes per read,
    /// and freeing it once parsed, was a tenth of the event loop's time).
    scratch: Box<[u8]>,
    accept_pending: bool,
    /// Accepting failed (out of file descriptors?): try again at the next tick.
    accept_retry: bool,
    serving: Serving,
    /// When a refusal for want of file descriptors was last logged.
    refused_warned: Option<Instant>,
}

impl Loop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        while !stop.load(Ordering::Acquire) {
            // Tell the replica thread to wake us, then look once more before sleeping.
            self.sleeping.store(true, Ordering::SeqCst);
            let now = Instant::now();
            let timeout = if !self.done.is_empty() || self.accept_pending {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(now)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("client port: poll: {e}");
                    std::thread::sleep(TICK);
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
            self.now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => {}
                    Token(t) => {
                        let i = t - FIRST;
                        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.drained = false;
                            }
                            self.mark(i);
                        }
                    }
                }
            }
            if self.accept_pending {
                self.accept();
            }
            while let Ok(done) = self.done.try_recv() {
                self.complete(&done);
            }
            self.service_dirty();
            self.submit();
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                if std::mem::take(&mut self.accept_retry) {
                    self.accept();
                }
                self.expire(now);
                self.sweep(now);
                self.service_dirty();
            }
        }
    }

    fn accept(&mut self) {
        let limits = self.serving.limits;
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    if self.total >= limits.max_connections + REFUSING {
                        continue; // dropped: closed at once
                    }
                    let refuse = (self.open >= limits.max_connections).then(|| {
                        format!(
                            "too many connections: this node serves at most {} \
                             (--client-max-connections); try again later or another node",
                            limits.max_connections
                        )
                    });
                    let _ = sock.set_nodelay(true);
                    let i = match self.free.pop() {
                        Some(i) => i,
                        None => {
                            self.conns.push(None);
                            self.gens.push(0);
                            self.conns.len() - 1
                        }
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(i + FIRST),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!("client port: cannot register a connection: {e}");
                        self.free.push(i);
                        continue;
                    }
                    let counted = refuse.is_none();
                    if counted {
                        self.open += 1;
                        self.serving.clients.fetch_add(1, Ordering::Relaxed);
                    }
                    self.total += 1;
                    let now = Instant::now();
                    self.conns[i] = Some(Conn {
                        sock,
                        gen: self.gens[i],
                        phase: Phase::Hello,
                        refuse,
                        counted,
                        rbuf: Vec::new(),
                        rpos: 0,
                        wbuf: Vec::new(),
                        wpos: 0,
                        ids: HashSet::default(),
                        queued: false,
                        drained: false,
                        eof: false,
                        since: now,
                        last_read: now,
                        last_write: now,
                    });
                    self.mark(i);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, most likely: try again at the next tick.
                    let now = Instant::now();
                    if self
                        .refused_warned
                        .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
                    {
                        tracing::warn!("client port: accept: {e}");
                        self.refused_warned = Some(now);
                    }
                    self.accept_pending = false;
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    /// Reads, parses, writes and closes what this turn's events and answers call for.
    fn service_dirty(&mut self) {
        while let Some(i) = self.dirty.pop() {
            self.service(i);
        }
    }

    /// Puts connection `i` on the `dirty` list, unless it is on it already.
    fn mark(&mut self, i: usize) {
        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
            if !std::mem::replace(&mut c.queued, true) {
                self.dirty.push(i);
            }
        }
    }

    fn service(&mut self, i: usize) {
        let limits = self.serving.limits;
        let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        c.queued = false;
        let mut close = false;
        // Read and parse while there is room in flight.
        loop {
            self.parse(i, &mut c);
            let room = !matches!(c.phase, Phase::Open) || c.ids.len() < limits.max_in_flight;
            if c.drained || c.eof || !room {
                break;
            }
            match c.sock.read(&mut self.scratch) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    c.rbuf.extend_from_slice(&self.scratch[..n]);
                    c.last_read = self.now;
                    if matches!(c.phase, Phase::Draining { .. }) {
                        c.rbuf.clear();
                        c.rpos = 0;
                    }
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => c.drained = true,
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        close = true;
                        break;
                    }
                },
            }
        }
        // Nothing left to parse: give the read buffer back, so that an idle connection
        // holds none (10,000 idle connections once held 64 KiB each, 625 MiB in all).
        if c.rbuf.is_empty() && c.rbuf.capacity() > 0 {
            c.rbuf = Vec::new();
        }
        // Write what is queued.
        while !close && c.pending_output() > 0 {
            match c.sock.write(&c.wbuf[c.wpos..]) {
                Ok(0) => close = true,
                Ok(n) => {
                    c.wpos += n;
                    c.last_write = self.now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => close = true,
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        } else if c.wpos > (1 << 20) && c.wpos * 2 > c.wbuf.len() {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        if c.pending_output() > limits.max_output {
            tracing::info!(
                bytes = c.pending_output(),
                limit = limits.max_output,
                "client connection cut off: it does not read its answers (--client-max-output)"
            );
            close = true;
        }
        let flushed = c.pending_output() == 0;
        match &mut c.phase {
            Phase::Draining { shut, .. } if flushed => {
                if !*shut {
                    let _ = c.sock.shutdown(std::net::Shutdown::Write);
                    *shut = true;
                }
                close |= c.eof;
            }
            Phase::Open if c.eof => close |= c.ids.is_empty() && flushed,
            Phase::Hello | Phase::Legacy { .. } if c.eof => close = true,
            _ => {}
        }
        if close {
            self.close(i, c);
        } else {
            self.conns[i] = Some(c);
        }
    }

    /// Consumes what `c` has read: the hello, then requests while there is room in flight.
    fn parse(&mut self, i: usize, c: &mut Conn) {
        let limits = self.serving.limits;
        loop {
            let avail = &c.rbuf[c.rpos..];
            match c.phase {
                Phase::Draining { .. } => {
                    c.rbuf.clear();
                    c.rpos = 0;
                    return;
                }
                Phase::Hello => {
                    if avail.len() < 4 {
                        return;
                    }
                    if avail[..4] != wire::MAGIC {
                        // A version 1 client: its first frame's length.
                        let n = u32::from_le_bytes(avail[..4].try_into().expect("4")) as usize;
                        c.rpos += 4;
                        c.phase = Phase::Legacy {
                            skip: if n <= wire::V1_MAX_FRAME { n } else { 0 },
                        };
                        continue;
                    }
                    if avail.len() < ClientHello::LEN {
                        return;
                    }
                    let hello =
                        ClientHello::decode(avail[..8].try_into().expect("8")).expect("magic");
                    c.rpos += ClientHello::LEN;
                    let version = if hello.version >= wire::VERSION {
                        wire::VERSION
                    } else {
                        0
                    };
                    let sh = ServerHello {
                        version,
                        max_frame: limits.max_frame as u32,
                        max_in_flight: limits.max_in_flight as u32,
                        idle_timeout_ms: limits
                            .idle_timeout
                            .map_or(0, |d| d.as_millis().min(u32::MAX as u128) as u32),
                        max_output: limits.max_output.min(u32::MAX as usize) as u32,
                    };
                    if c.pending_output() == 0 {
                        c.last_write = Instant::now();
                    }
                    c.wbuf.extend_from_slice(&sh.encode());
                    if version == 0 {
                        c.go_away(format!(
                            "this node speaks client protocol version {}, the client at most {}",
                            wire::VERSION,
                            hello.version
                        ));
                        return;
                    }
                    if let Some(why) = c.refuse.take() {
                        c.go_away(why);
                        return;
                    }
                    c.phase = Phase::Open;
                }
                Phase::Legacy { skip } => {
                    let n = skip.min(avail.len());
                    c.rpos += n;
                    if n < skip {
                        c.phase = Phase::Legacy { skip: skip - n };
                        c.rbuf.clear();
                        c.rpos = 0;
                        return;
                    }
                    let why = c.refuse.take().unwrap_or_else(|| {
                        "this node speaks client protocol version 2 (pipelined, with a hello; \
                         docs/client-protocol.md): this client speaks version 1. Upgrade the \
                         client (ballot-cli, the client library) to the node's version"
                            .to_string()
                    });
                    // A version 1 ERROR frame: `len | status | text`.
                    let body = Response::Error(why).encode();
                    c.wbuf.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    c.wbuf.extend_from_slice(&body);
                    c.last_write = Instant::now();
                    c.drain_after();
                    return;
                }
                Phase::Open => {
                    if c.ids.len() >= limits.max_in_flight || avail.len() < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes(avail[..4].try_into().expect("4")) as usize;
                    if len > limits.max_frame {
                        c.go_away(format!(
                            "frame of {len} bytes exceeds this node's limit of {} bytes \
                             (--client-max-frame)",
                            limits.max_frame
                        ));
                        return;
                    }
                    if len < wire::HEADER {
                        c.go_away(format!(
                            "frame of {len} bytes is shorter than its {}-byte header",
                            wire::HEADER
                        ));
                        return;
                    }
                    if avail.len() < 4 + len {
                        break;
                    }
                    let frame = &avail[4..4 + len];
                    let id = u64::from_le_bytes(frame[..8].try_into().expect("8"));
                    let k = frame[8];
                    let body = &frame[9..];
                    if id == wire::CONNECTION_ID {
                        c.go_away("request id 0 is reserved".into());
                        return;
                    }
                    if c.ids.contains(&id) {
                        c.go_away(format!("duplicate request id {id}: already in flight"));
                        return;
                    }
                    match k {
                        kind::COMMAND => match Command::validate(body) {
                            Err(e) => c.respond(id, &Response::Error(format!("bad command: {e}"))),
                            Ok(()) => {
                                c.ids.insert(id);
                                let tag = self.slot(i, c.gen, id);
                                self.batch.push(tag, body);
                            }
                        },
                        kind::STATUS if body.is_empty() => {
                            let r = status(&self.serving);
                            c.respond(id, &r)
                        }
                        kind::CHECKPOINT if body.is_empty() => {
                            self.serving.handle.checkpoint();
                            c.respond(id, &Response::Ok(Vec::new()))
                        }
                        kind::STATUS | kind::CHECKPOINT => c.respond(
                            id,
                            &Response::Error(format!("bad request: kind {k} takes no body")),
                        ),
                        k => c.respond(
                            id,
                            &Response::Error(format!("bad request: unknown request kind {k}")),
                        ),
                    }
                    c.rpos += 4 + len;
                }
            }
        }
        if c.rpos == c.rbuf.len() {
            c.rbuf.clear();
            c.rpos = 0;
        } else if c.rpos >= READ_CHUNK {
            c.rbuf.drain(..c.rpos);
            c.rpos = 0;
        }
    }

    fn slot(&mut self, conn: usize, gen: u32, id: u64) -> u64 {
        let k = match self.free_slots.pop() {
            Some(k) => k as usize,
            None => {
                self.slots.push(Slot { gen: 0, live: None });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[k];
        s.live = Some((conn, gen, id));
        let tag = (u64::from(s.gen) << 32) | k as u64;
        self.expiry.push_back((self.now + PROPOSE_TIMEOUT, tag));
        tag
    }

    /// Takes the request under `tag`, if it is still waiting.
    fn take_slot(&mut self, tag: u64) -> Option<(usize, u32, u64)> {
        let k = (tag & 0xFFFF_FFFF) as usize;
        let s = self.slots.get_mut(k)?;
        if u64::from(s.gen) != tag >> 32 {
            return None;
        }
        let live = s.live.take()?;
        s.gen = s.gen.wrapping_add(1);
        self.free_slots.push(k as u32);
        Some(live)
    }

    fn answer(&mut self, tag: u64, r: Response) {
        self.answer_with(tag, |c, id| c.respond(id, &r));
    }

    /// Answers the request under `tag`, if its connection still waits for it.
    fn answer_with(&mut self, tag: u64, respond: impl FnOnce(&mut Conn, u64)) {
        let Some((i, gen, id)) = self.take_slot(tag) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
            if c.gen == gen && c.ids.remove(&id) {
                respond(c, id);
                self.mark(i);
            }
        }
    }

    /// Answers a step's outcomes; the outputs go from the batch to the connections' answer
    /// buffers with no copy in between.
    fn complete(&mut self, done: &Completions) {
        for (tag, out) in done.iter() {
            match out {
                Ok(o) => self.answer_with(tag, |c, id| c.respond_ok(id, o)),
                Err(e) => self.answer(tag, error_response(e, &self.serving.peers)),
            }
        }
    }

    /// Hands this turn's commands to the replica.
    fn submit(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let cmds = self.batch.take();
        if let Err(r) = self.serving.handle.submit_batch(cmds, &self.sink) {
            for tag in r.batch.tags() {
                self.answer(tag, error_response(&r.error, &self.serving.peers));
            }
            self.service_dirty();
        }
    }

    /// Answers `UNAVAILABLE` for the requests that had no outcome in time.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, tag)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            self.answer(
                tag,
                Response::Unavailable(
                    "no outcome in time; outcome unknown: retry with the same session and \
                     sequence number"
                        .into(),
                ),
            );
        }
    }

    /// Time-outs of connections: idle, not reading, refused, lingering.
    fn sweep(&mut self, now: Instant) {
        let idle = self.serving.limits.idle_timeout;
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_mut() else {
                continue;
            };
            let mut close = false;
            match c.phase {
                Phase::Draining { until, .. } => close = now >= until,
                Phase::Hello | Phase::Legacy { .. } => {
                    let within = if c.refuse.is_some() {
                        REFUSE_FOR
                    } else {
                        idle.map_or(HELLO_WITHIN, |d| d.min(HELLO_WITHIN))
                    };
                    close = now.duration_since(c.since) >= within;
                }
                Phase::Open => {
                    if let Some(idle) = idle {
                        if c.pending_output() > 0 && now.duration_since(c.last_write) >= idle {
                            tracing::info!(
                                "client connection cut off: it took none of its answers for {idle:?}"
                            );
                            close = true;
                        } else if c.ids.is_empty()
                            && c.pending_output() == 0
                            && now.duration_since(c.last_read) >= idle
                        {
                            c.go_away(format!(
                                "idle for {} ms (--client-idle-timeout-ms): connect again to go on",
                                idle.as_millis()
                            ));
                            self.mark(i);
                        }
                    }
                }
            }
            if close {
                let c = self.conns[i].take().expect("present");
                self.close(i, c);
            }
        }
    }

    fn close(&mut self, i: usize, mut c: Conn) {
        let _ = self.poll.registry().deregister(&mut c.sock);
        if c.counted {
            self.open -= 1;
            self.serving.clients.fetch_sub(1, Ordering::Relaxed);
        }
        self.total -= 1;
        self.gens[i] = self.gens[i].wrapping_add(1);
        self.conns[i] = None;
        self.free.push(i);
        // Its requests in flight are answered to no one (their slots match no connection).
    }
}

fn status(s: &Serving) -> Response {
    let st = s.handle.status();
    let d = s.digest.get();
    Response::Ok(
        NodeStatus {
            node: st.node,
            role: st.role.name().to_string(),
            ballot: st.ballot,
            ballot_round: st.ballot >> 8,
            commit: st.commit,
            applied: st.applied,
            leader: st.leader_hint,
            log_base: st.log_base,
            checkpoint: st.checkpoint,
            digest: d.digest,
            digest_index: d.index,
        }
        .encode(),
    )
}

/// The answer to a command that failed.
pub(crate) fn error_response(e: &ProposeError, peers: &BTreeMap<u8, String>) -> Response {
    match e {
        ProposeError::NotLeader { leader } => Response::NotLeader {
            leader: *leader,
            addr: leader.and_then(|l| peers.get(&l).cloned()),
        },
        ProposeError::TooLarge { .. } => Response::Error(e.to_string()),
        // Stopping, or its disk failed: send the client elsewhere (it retries with the same
        // sequence number, so this is safe even if the command was proposed here).
        ProposeError::ShuttingDown => Response::NotLeader {
            leader: None,
            addr: None,
        },
        ProposeError::Indeterminate => {
            Response::Unavailable("outcome unknown; retry with the same sequence number".into())
        }
        e => Response::Unavailable(e.to_string()),
    }
}
