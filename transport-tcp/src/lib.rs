//! `ballot-tcp`: the TCP fabric.
//!
//! [`TcpFabric`] implements [`ballot::fabric::Fabric`] over plain `std::net` TCP with the
//! semantics of an RDMA NIC: a WRITE frame carries `{offset, len}` and exactly the bytes
//! that an RDMA WRITE would place, and the receiving side (a thread playing the NIC) lands
//! them at that offset in the local [`Region`], subject to the same permission rule as every
//! other fabric ([`ballot::layout::classify_remote_write`]). The follower cannot tell which
//! fabric wrote its ring.
//!
//! - [`codec`]: frames (total decoder).
//! - [`handshake`]: mutual HMAC-SHA256 challenge-response on every connection.
//! - [`nic`]: the receiver logic (apply a frame to a region under a [`nic::WritePermission`]).
//!
//! See `docs/tcp-fabric.md` for the wire format, the handshake and the refusals.
//!
//! # Starting a 3-node fabric
//!
//! Each node gets the same cluster id, key and address map; here all three run in one
//! process on ephemeral loopback ports (bind the listeners first, then share the map).
//!
//! ```
//! use ballot::fabric::{Completion, Fabric, FabricEvent};
//! use ballot::layout::{RegionInfo, RingGeometry, RING_OFFSET};
//! use ballot::region::Region;
//! use ballot_tcp::{TcpConfig, TcpFabric};
//! use std::collections::BTreeMap;
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let cluster = 0xC0FFEE;
//! let key = b"shared cluster secret".to_vec();
//! let listeners: Vec<TcpListener> =
//!     (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
//! let peers: BTreeMap<u8, _> = listeners.iter().enumerate()
//!     .map(|(i, l)| (i as u8, l.local_addr().unwrap())).collect();
//! let mut nodes: Vec<TcpFabric> = listeners.into_iter().enumerate().map(|(i, l)| {
//!     let node = i as u8;
//!     let ring = RingGeometry::new(1 << 16, 64).unwrap();
//!     let region = Arc::new(Region::anonymous(RegionInfo { cluster, node, ring }).unwrap());
//!     let cfg = TcpConfig::new(node, cluster, key.clone(), peers[&node], peers.clone(), region);
//!     TcpFabric::start_with_listener(cfg, l).unwrap()   // or TcpFabric::start(cfg)
//! }).collect();
//! assert!(nodes.iter().all(|n| n.wait_connected(Duration::from_secs(10))));
//!
//! // Node 1 grants node 0 its ring; node 0 writes an entry's bytes into it.
//! nodes[1].set_writer(Some(0)).unwrap();
//! nodes[0].write(1, RING_OFFSET, b"entry bytes", 7).unwrap();
//! nodes[0].flush().unwrap();
//! let mut events = Vec::new();
//! while events.is_empty() {
//!     nodes[0].wait_for_events(Duration::from_millis(10));
//!     nodes[0].poll(&mut events);
//! }
//! assert!(matches!(events[0],
//!     FabricEvent::Completion(Completion::Write { peer: 1, token: 7, result: Ok(()) })));
//! let mut landed = [0u8; 11];
//! nodes[1].region().read(RING_OFFSET, &mut landed).unwrap();
//! assert_eq!(&landed, b"entry bytes");
//! ```

pub mod codec;
pub mod handshake;
pub mod nic;
mod throttle;

use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent, MAX_CONTROL};
use ballot::region::Region;
use ballot::{NodeId, MAX_NODES};
use codec::{CodecError, Frame, Limits, Status, HEADER_LEN};
use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use nic::{Outcome, WritePermission};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use throttle::{Throttle, Throttles};
use tracing::{debug, info, warn};

/// Bounds and timings. The defaults suit a LAN or loopback.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// WRITE + READ operations per peer posted and not yet completed; beyond it, posting
    /// returns [`FabricError::Busy`].
    pub max_outstanding: usize,
    /// Bytes per peer posted and not yet sent (unflushed, or flushed and waiting for the
    /// peer to take them); beyond it, posting returns `Busy` (a single frame larger than
    /// this is accepted when nothing waits).
    pub max_unflushed: usize,
    /// Largest READ one may post (also bounds the READ_RESP frames this side accepts).
    pub max_read: usize,
    /// Concurrent inbound connections (authenticated or handshaking); more are refused.
    pub max_inbound: usize,
    /// Reconnect back-off: starts at `backoff_min`, doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Time a peer has to complete the handshake.
    pub handshake_timeout: Duration,
    /// A peer that takes no bytes of ours for this long (a flush's backlog stuck, or a
    /// receiver's response blocked) is treated as dead: the connection is dropped.
    pub write_timeout: Duration,
    /// Warnings that repeat while a fault lasts (a peer unreachable, a handshake refused)
    /// are logged at most once per this period per peer (or remote address), with the
    /// count of those held back.
    pub warn_every: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_outstanding: 16 * 1024,
            max_unflushed: 64 << 20,
            max_read: 64 << 20,
            max_inbound: 64,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(5),
            warn_every: Duration::from_secs(10),
        }
    }
}

/// Everything a node needs to join the TCP fabric.
#[derive(Clone)]
pub struct TcpConfig {
    pub node: NodeId,
    pub cluster: u64,
    /// The shared cluster key (never sent; proven by HMAC-SHA256).
    pub key: Vec<u8>,
    /// Every node's listen address; this node's own entry, if present, is ignored.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Where to listen (ignored by [`TcpFabric::start_with_listener`]).
    pub listen: SocketAddr,
    /// The local region that peers write into.
    pub region: Arc<Region>,
    pub tuning: Tuning,
}

impl TcpConfig {
    pub fn new(
        node: NodeId,
        cluster: u64,
        key: impl Into<Vec<u8>>,
        listen: SocketAddr,
        peers: BTreeMap<NodeId, SocketAddr>,
        region: Arc<Region>,
    ) -> Self {
        Self {
            node,
            cluster,
            key: key.into(),
            peers,
            listen,
            region,
            tuning: Tuning::default(),
        }
    }
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("node", &self.node)
            .field("cluster", &self.cluster)
            .field("peers", &self.peers)
            .field("listen", &self.listen)
            .field("tuning", &self.tuning)
            .finish_non_exhaustive()
    }
}

/// Counters, as returned by [`TcpFabric::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Inbound connections that passed the handshake.
    pub accepted: u64,
    /// Outbound connections that passed the handshake.
    pub connected: u64,
    /// Handshakes refused, either side (wrong key, cluster or node id, garbage, time-out),
    /// and inbound connections over `max_inbound`.
    pub refused_handshakes: u64,
    /// Malformed, unexpected or out-of-bounds frames (the connection is closed), on either
    /// side.
    pub refused_frames: u64,
    /// Ring writes refused because the writer lacked permission (NACKed, nothing written).
    pub denied_writes: u64,
    /// WRITE/READ requests outside the region or into a part no peer may write.
    pub out_of_bounds: u64,
    pub writes_landed: u64,
    pub bytes_landed: u64,
    pub reads_served: u64,
    pub messages_received: u64,
    /// `write(2)` calls made to push frames (flushes and receivers' responses).
    pub send_syscalls: u64,
    /// Completions delivered (including failed ones).
    pub completions: u64,
    /// Outbound connections lost.
    pub disconnects: u64,
}

/// Per-peer counters, as returned by [`StatsReader::peer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Whether the outbound connection to the peer is up (authenticated).
    pub connected: bool,
    /// Bytes written to the peer's connections (our frames and our answers to its frames).
    pub bytes_sent: u64,
    /// Bytes read from the peer's connections.
    pub bytes_received: u64,
    /// Outbound connections to the peer lost.
    pub disconnects: u64,
    /// Dials to the peer that failed (unreachable, or its handshake refused).
    pub dial_failures: u64,
}

#[derive(Default)]
struct PeerCells {
    connected: AtomicBool,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    disconnects: AtomicU64,
    dial_failures: AtomicU64,
}

#[derive(Default)]
struct StatCells {
    peer: [PeerCells; MAX_NODES],
    accepted: AtomicU64,
    connected: AtomicU64,
    refused_handshakes: AtomicU64,
    refused_frames: AtomicU64,
    denied_writes: AtomicU64,
    out_of_bounds: AtomicU64,
    writes_landed: AtomicU64,
    bytes_landed: AtomicU64,
    reads_served: AtomicU64,
    messages_received: AtomicU64,
    send_syscalls: AtomicU64,
    completions: AtomicU64,
    disconnects: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads a fabric's counters from any thread, after the fabric has moved into the replica
/// (for a metrics endpoint). See [`TcpFabric::stats_reader`].
#[derive(Clone)]
pub struct StatsReader(Arc<StatCells>);

impl StatsReader {
    pub fn snapshot(&self) -> Stats {
        self.0.snapshot()
    }
    /// Counters of the connections with `peer` (all zero for an unknown id).
    pub fn peer(&self, peer: NodeId) -> PeerStats {
        let Some(c) = self.0.peer.get(peer as usize) else {
            return PeerStats::default();
        };
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PeerStats {
            connected: c.connected.load(Ordering::Relaxed),
            bytes_sent: g(&c.bytes_sent),
            bytes_received: g(&c.bytes_received),
            disconnects: g(&c.disconnects),
            dial_failures: g(&c.dial_failures),
        }
    }
}

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StatsReader")
            .field(&self.snapshot())
            .finish()
    }
}

impl StatCells {
    /// The cells of `peer` (ids are checked against `MAX_NODES` at start).
    fn of(&self, peer: NodeId) -> &PeerCells {
        &self.peer[peer as usize]
    }
    fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            accepted: g(&self.accepted),
            connected: g(&self.connected),
            refused_handshakes: g(&self.refused_handshakes),
            refused_frames: g(&self.refused_frames),
            denied_writes: g(&self.denied_writes),
            out_of_bounds: g(&self.out_of_bounds),
            writes_landed: g(&self.writes_landed),
            bytes_landed: g(&self.bytes_landed),
            reads_served: g(&self.reads_served),
            messages_received: g(&self.messages_received),
            send_syscalls: g(&self.send_syscalls),
            completions: g(&self.completions),
            disconnects: g(&self.disconnects),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the fabric handle and its threads.
struct Shared {
    node: NodeId,
    cluster: u64,
    key: Vec<u8>,
    peers: BTreeMap<NodeId, SocketAddr>,
    region: Arc<Region>,
    perm: WritePermission,
    tuning: Tuning,
    stats: Arc<StatCells>,
    /// Refused inbound handshakes, per remote address (the peer is not known yet).
    refused_log: Mutex<Throttles<IpAddr>>,
    events: Sender<Vec<FabricEvent>>,
    stop: AtomicBool,
    /// Live inbound connections: id -> (authenticated peer, stream).
    inbound: Mutex<HashMap<u64, (Option<NodeId>, TcpStream)>>,
    inbound_live: AtomicUsize,
    next_conn: AtomicU64,
}

impl Shared {
    fn creds(&self) -> handshake::Credentials<'_> {
        handshake::Credentials {
            cluster: self.cluster,
            key: &self.key,
            node: self.node,
        }
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    Write { token: u64 },
    Read { token: u64, len: usize },
}

impl Pending {
    fn fail(self, peer: NodeId, e: FabricError) -> FabricEvent {
        FabricEvent::Completion(match self {
            Pending::Write { token } => Completion::Write {
                peer,
                token,
                result: Err(e),
            },
            Pending::Read { token, .. } => Completion::Read {
                peer,
                token,
                result: Err(e),
            },
        })
    }
}

#[derive(Default)]
struct LinkState {
    conn: Option<Arc<TcpStream>>,
    /// Operations posted on the current connection and not yet completed, in order.
    pending: VecDeque<Pending>,
    /// Frames posted and not yet flushed.
    buf: Vec<u8>,
    /// Frames flushed that the socket did not take at once (the peer reads slowly, or not
    /// at all: stopped), in order; the link's sender thread pushes them. While it is not
    /// empty, or the sender is pushing, flushes append here rather than write, to keep
    /// the order. They belong to the current connection (cleared with it).
    backlog: Vec<u8>,
    /// Bytes the sender thread took from `backlog` and is pushing now.
    sending: usize,
}

impl LinkState {
    /// Bytes posted and not yet handed to the kernel.
    fn unsent(&self) -> usize {
        self.buf.len() + self.backlog.len() + self.sending
    }
}

/// The outbound side towards one peer: our WRITE/READ/CONTROL frames go out on this
/// connection, completions come back on it.
struct Link {
    peer: NodeId,
    addr: SocketAddr,
    state: Mutex<LinkState>,
    /// Wakes the sender thread: a backlog to push, or the fabric stopping.
    wake: Condvar,
}

fn status_result(peer: NodeId, s: Status) -> Result<(), FabricError> {
    match s {
        Status::Ok => Ok(()),
        Status::PermissionDenied => Err(FabricError::PermissionDenied(peer)),
        Status::OutOfBounds => Err(FabricError::OutOfBounds(peer)),
    }
}

/// Pushes `buf` with as few `write(2)` calls as the kernel allows (one, normally).
fn push_all(s: &TcpStream, buf: &[u8], stats: &StatCells, peer: NodeId) -> io::Result<()> {
    let mut w = s;
    let mut at = 0;
    while at < buf.len() {
        match w.write(&buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bump(&stats.send_syscalls, 1);
                bump(&stats.of(peer).bytes_sent, n as u64);
                at += n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pushes as much of `buf` as the socket takes now, without blocking: the number of bytes
/// written (all of them, normally; fewer when the peer's side is full).
fn push_some(s: &TcpStream, buf: &[u8], stats: &StatCells, peer: NodeId) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    #[cfg(target_os = "linux")]
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::MSG_DONTWAIT;
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        // SAFETY: send(2) on a socket we own, reading `rest.len()` bytes of a live slice.
        let n = unsafe { libc::send(s.as_raw_fd(), rest.as_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bump(&stats.send_syscalls, 1);
        bump(&stats.of(peer).bytes_sent, n as u64);
        at += n as usize;
    }
    Ok(at)
}

/// The link's sender: pushes the backlog that flushes left (the socket was full), blocking
/// up to `write_timeout` per push, so that the caller of [`Fabric::flush`] never blocks on a
/// peer that stopped reading. A push that fails or times out drops the connection (the
/// link thread then fails what is outstanding and redials).
fn sender_thread(sh: Arc<Shared>, link: Arc<Link>) {
    loop {
        let (conn, chunk) = {
            let mut st = lock(&link.state);
            loop {
                if sh.stopped() {
                    return;
                }
                if !st.backlog.is_empty() && st.conn.is_some() {
                    break;
                }
                st = link
                    .wake
                    .wait_timeout(st, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let chunk = std::mem::take(&mut st.backlog);
            st.sending = chunk.len();
            (st.conn.clone().expect("checked above"), chunk)
        };
        let r = push_all(&conn, &chunk, &sh.stats, link.peer);
        let mut st = lock(&link.state);
        st.sending = 0;
        if st.backlog.is_empty() && st.backlog.capacity() < chunk.capacity() {
            st.backlog = chunk; // keep the allocation
            st.backlog.clear();
        }
        drop(st);
        if let Err(e) = r {
            if !sh.stopped() {
                warn!(node = sh.node, peer = link.peer, addr = %link.addr, error = %e,
                      "peer takes nothing (send timed out or failed); dropping connection");
            }
            // The link thread sees the shutdown and fails what is outstanding.
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// An input buffer: bytes `[start, end)` are received and not yet decoded.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

const READ_CHUNK: usize = 256 << 10;

impl InBuf {
    fn new() -> Self {
        Self {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    /// One `read(2)`, making room for a frame of `need` bytes first. `Ok(0)` is EOF.
    fn fill(&mut self, s: &mut impl Read, need: usize) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 4 * READ_CHUNK && need <= READ_CHUNK {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
        let room = need.max(READ_CHUNK);
        if self.buf.len() - self.start < room || self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < room {
                self.buf.resize(room, 0);
            }
        }
        loop {
            match s.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A TCP fabric node.
///
/// # Threads and idle strategy
///
/// Starting a fabric spawns, per node: one listener thread (blocks in `accept`), one
/// thread per inbound connection (the "NIC": blocks in `read` on its socket, applies each
/// batch of frames to the region, answers the whole batch with one `write`), and one
/// thread per peer for the outbound connection (dials with back-off, authenticates, then
/// blocks in `read` for completions), and one sender thread per peer (pushes what a flush
/// could not: see below). All of them sleep in the kernel when idle; none
/// spins. The handle itself is driven by the caller's thread: [`Fabric::write`],
/// [`Fabric::read`] and [`Fabric::send`] only encode frames into a per-peer buffer,
/// [`Fabric::flush`] pushes each peer's buffer with one non-blocking system call (what
/// the socket does not take, a peer that reads slowly or is stopped, is left to that
/// peer's sender thread, and later flushes to it queue behind), and [`Fabric::poll`]
/// never blocks (it drains a channel that the reader threads feed in batches). So no
/// peer can block the caller: a replica whose flush blocked on a stopped follower stopped
/// its heartbeat and its answers too. A caller
/// that wants to sleep rather than spin when nothing happens uses
/// [`TcpFabric::wait_for_events`] (spin-then-park). A completion arrives ~one loopback
/// round trip after the flush; when the receiving thread sleeps that round trip includes
/// waking it (about 100 us across vCPUs on the development machines).
///
/// # Semantics
///
/// Operations towards one peer complete in the order posted. A broken connection fails
/// every operation outstanding on it with `Disconnected(peer)`, and an operation posted
/// while the peer is not connected completes at once with `Disconnected(peer)`; the link
/// redials with back-off. Control messages are best effort (lost with the connection).
/// Dropping the fabric closes every connection and stops its threads.
pub struct TcpFabric {
    shared: Arc<Shared>,
    links: BTreeMap<NodeId, Arc<Link>>,
    events: Receiver<Vec<FabricEvent>>,
    /// Events produced synchronously, or set aside by [`TcpFabric::time_write`].
    local: VecDeque<FabricEvent>,
    local_addr: SocketAddr,
    /// Dropped with the fabric: wakes link threads sleeping in back-off.
    _stop_tx: Sender<()>,
    listener_thread: Option<JoinHandle<()>>,
    probe_token: u64,
}

impl std::fmt::Debug for TcpFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFabric")
            .field("node", &self.shared.node)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl TcpFabric {
    /// Binds `config.listen` and starts the fabric.
    pub fn start(config: TcpConfig) -> io::Result<TcpFabric> {
        let listener = TcpListener::bind(config.listen)?;
        Self::start_with_listener(config, listener)
    }

    /// Starts the fabric on an already bound listener (handy with ephemeral ports: bind
    /// every node's listener first, then build the peer map from their addresses).
    pub fn start_with_listener(config: TcpConfig, listener: TcpListener) -> io::Result<TcpFabric> {
        if config.node as usize >= MAX_NODES {
            return Err(invalid(format!("node id {} >= {MAX_NODES}", config.node)));
        }
        if let Some(p) = config.peers.keys().find(|&&p| p as usize >= MAX_NODES) {
            return Err(invalid(format!("peer id {p} >= {MAX_NODES}")));
        }
        if config.key.is_empty() {
            return Err(invalid("empty cluster key".into()));
        }
        let info = config.region.info();
        if info.cluster != config.cluster || info.node != config.node {
            return Err(invalid(format!(
                "region belongs to cluster {:#x} node {}, not cluster {:#x} node {}",
                info.cluster, info.node, config.cluster, config.node
            )));
        }
        let local_addr = listener.local_addr()?;
        let (ev_tx, ev_rx) = channel::unbounded();
        let (stop_tx, stop_rx) = channel::bounded::<()>(0);
        let mut peers = config.peers;
        peers.remove(&config.node);
        let shared = Arc::new(Shared {
            node: config.node,
            cluster: config.cluster,
            key: config.key,
            peers,
            region: config.region,
            perm: WritePermission::new(None),
            refused_log: Mutex::new(Throttles::new(config.tuning.warn_every, 1024)),
            tuning: config.tuning,
            stats: Arc::default(),
            events: ev_tx,
            stop: AtomicBool::new(false),
            inbound: Mutex::new(HashMap::new()),
            inbound_live: AtomicUsize::new(0),
            next_conn: AtomicU64::new(0),
        });
        let mut links = BTreeMap::new();
        for (&peer, &addr) in &shared.peers {
            let link = Arc::new(Link {
                peer,
                addr,
                state: Mutex::new(LinkState::default()),
                wake: Condvar::new(),
            });
            links.insert(peer, link.clone());
            let (sh, l) = (shared.clone(), link.clone());
            std::thread::Builder::new()
                .name(format!("tcp-send-{}-{}", shared.node, peer))
                .spawn(move || sender_thread(sh, l))?;
            let (sh, stop) = (shared.clone(), stop_rx.clone());
            std::thread::Builder::new()
                .name(format!("tcp-link-{}-{}", shared.node, peer))
                .spawn(move || link_thread(sh, link, stop))?;
        }
        let sh = shared.clone();
        let listener_thread = std::thread::Builder::new()
            .name(format!("tcp-listen-{}", shared.node))
            .spawn(move || listen_thread(sh, listener))?;
        info!(node = shared.node, addr = %local_addr, "tcp fabric listening");
        Ok(TcpFabric {
            shared,
            links,
            events: ev_rx,
            local: VecDeque::new(),
            local_addr,
            _stop_tx: stop_tx,
            listener_thread: Some(listener_thread),
            probe_token: 0,
        })
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// A reader of this fabric's counters (whole and per peer) for another thread.
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.shared.stats.clone())
    }

    /// Who holds write permission on the local ring.
    pub fn writer(&self) -> Option<NodeId> {
        self.shared.perm.get()
    }

    /// Whether the outbound connection to `peer` is up (authenticated).
    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.links
            .get(&peer)
            .is_some_and(|l| lock(&l.state).conn.is_some())
    }

    /// Waits until the outbound connections to every peer are up; `false` on time-out.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.links.keys().all(|&p| self.is_connected(p)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Blocks until an event is available or `timeout` passes (the "park" half of
    /// spin-then-park). Returns whether an event is available for [`Fabric::poll`].
    pub fn wait_for_events(&mut self, timeout: Duration) -> bool {
        if !self.local.is_empty() {
            return true;
        }
        match self.events.recv_timeout(timeout) {
            Ok(batch) => {
                self.local.extend(batch);
                true
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Raw round trip for benchmarks: posts a WRITE of `data` at `offset` into `peer`'s
    /// region, flushes, and busy-polls until its completion; returns the elapsed time.
    /// Other events that arrive meanwhile are kept for the next [`Fabric::poll`]. Fails
    /// with the completion's error, or `Io("timed out")` after `timeout`.
    pub fn time_write(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Duration, FabricError> {
        self.probe_token = self.probe_token.wrapping_add(1);
        let token = (1 << 63) | self.probe_token;
        let mut stash = Vec::new();
        let t0 = Instant::now();
        self.write(peer, offset, data, token)?;
        self.flush()?;
        let mut spins = 0u32;
        let result = loop {
            let found = {
                let mut got = None;
                while let Some(ev) = self.local.pop_front() {
                    match ev {
                        FabricEvent::Completion(Completion::Write {
                            peer: p,
                            token: t,
                            result,
                        }) if p == peer && t == token => {
                            got = Some(result);
                            break;
                        }
                        other => stash.push(other),
                    }
                }
                got
            };
            if let Some(r) = found {
                break r.map(|()| t0.elapsed());
            }
            match self.events.try_recv() {
                Ok(batch) => self.local.extend(batch),
                Err(TryRecvError::Empty) => {
                    spins += 1;
                    if spins & 1023 == 0 {
                        if t0.elapsed() > timeout {
                            break Err(FabricError::io(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "timed out",
                            )));
                        }
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    break Err(FabricError::io(io::Error::other("fabric stopped")))
                }
            }
        };
        // Put the set-aside events back in front, in their order.
        for ev in stash.into_iter().rev() {
            self.local.push_front(ev);
        }
        result
    }

    fn link(&self, peer: NodeId) -> Result<&Arc<Link>, FabricError> {
        self.links.get(&peer).ok_or(FabricError::UnknownPeer(peer))
    }

    /// Common path for WRITE and READ: admission, then encode into the peer's buffer.
    fn post(&mut self, peer: NodeId, frame: Frame<'_>, op: Pending) -> Result<(), FabricError> {
        let link = self.link(peer)?.clone();
        let mut st = lock(&link.state);
        if st.conn.is_none() {
            self.local
                .push_back(op.fail(peer, FabricError::Disconnected(peer)));
            return Ok(());
        }
        let t = &self.shared.tuning;
        let size = HEADER_LEN
            + match frame {
                Frame::Write { data, .. } => data.len(),
                _ => 0,
            };
        if st.pending.len() >= t.max_outstanding
            || (st.unsent() > 0 && st.unsent() + size > t.max_unflushed)
        {
            return Err(FabricError::Busy);
        }
        codec::encode(&frame, &mut st.buf).map_err(|_| FabricError::TooLarge {
            len: size,
            max: u32::MAX as usize,
        })?;
        st.pending.push_back(op);
        Ok(())
    }
}

impl Fabric for TcpFabric {
    fn node(&self) -> NodeId {
        self.shared.node
    }

    fn region(&self) -> &Arc<Region> {
        &self.shared.region
    }

    fn write(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError> {
        if data.len() > u32::MAX as usize {
            return Err(FabricError::TooLarge {
                len: data.len(),
                max: u32::MAX as usize,
            });
        }
        let frame = Frame::Write {
            token,
            offset: offset as u64,
            data,
        };
        self.post(peer, frame, Pending::Write { token })
    }

    fn read(
        &mut self,
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), FabricError> {
        let max = self.shared.tuning.max_read;
        if len > max {
            return Err(FabricError::TooLarge { len, max });
        }
        let frame = Frame::Read {
            token,
            offset: offset as u64,
            len: len as u32,
        };
        self.post(peer, frame, Pending::Read { token, len })
    }

    fn send(&mut self, peer: NodeId, msg: &[u8]) -> Result<(), FabricError> {
        if msg.len() > MAX_CONTROL {
            return Err(FabricError::TooLarge {
                len: msg.len(),
                max: MAX_CONTROL,
            });
        }
        let link = self.link(peer)?.clone();
        let mut st = lock(&link.state);
        if st.conn.is_none() {
            return Err(FabricError::Disconnected(peer));
        }
        if st.unsent() > 0
            && st.unsent() + HEADER_LEN + msg.len() > self.shared.tuning.max_unflushed
        {
            return Err(FabricError::Busy);
        }
        codec::encode(&Frame::Control { bytes: msg }, &mut st.buf).expect("bounded by MAX_CONTROL");
        Ok(())
    }

    /// Never blocks: what the socket does not take at once (a peer that reads slowly, or
    /// is stopped) goes to the link's sender thread, and later flushes to that peer queue
    /// behind it. A caller blocked here for a stopped peer stopped its whole replica: a
    /// leader's heartbeat stood still, the other follower stood for election, and the
    /// leader answered nothing for `write_timeout` (docs/status.md).
    fn flush(&mut self) -> Result<(), FabricError> {
        for link in self.links.values() {
            let (conn, mut buf) = {
                let mut st = lock(&link.state);
                let conn = match (&st.conn, st.buf.is_empty()) {
                    (Some(c), false) => c.clone(),
                    _ => continue,
                };
                if st.sending > 0 || !st.backlog.is_empty() {
                    // Behind what the sender still has to push.
                    let buf = std::mem::take(&mut st.buf);
                    st.backlog.extend_from_slice(&buf);
                    link.wake.notify_one();
                    continue;
                }
                (conn, std::mem::take(&mut st.buf))
            };
            match push_some(&conn, &buf, &self.shared.stats, link.peer) {
                Ok(n) if n == buf.len() => {}
                Ok(n) => {
                    let mut st = lock(&link.state);
                    // Only for the connection it was written on (a new one starts clean).
                    if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                        let rest = &buf[n..];
                        // Only this thread appends, and only while the backlog is empty.
                        debug_assert!(st.backlog.is_empty() && st.sending == 0);
                        st.backlog.extend_from_slice(rest);
                        link.wake.notify_one();
                    }
                }
                Err(e) => {
                    // The link thread sees the shutdown and fails what is outstanding.
                    warn!(node = self.shared.node, peer = link.peer, addr = %link.addr,
                          error = %e, "flush failed; dropping connection");
                    let _ = conn.shutdown(Shutdown::Both);
                }
            }
            buf.clear();
            let mut st = lock(&link.state);
            if st.buf.is_empty() && st.buf.capacity() < buf.capacity() {
                st.buf = buf; // keep the allocation
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        let before = out.len();
        out.extend(self.local.drain(..));
        while let Ok(batch) = self.events.try_recv() {
            out.extend(batch);
        }
        out.len() - before
    }

    fn set_writer(&mut self, writer: Option<NodeId>) -> Result<(), FabricError> {
        if let Some(w) = writer {
            // Granting it to ourselves is allowed: it shuts every remote peer out.
            if w != self.shared.node && !self.shared.peers.contains_key(&w) {
                return Err(FabricError::UnknownPeer(w));
            }
        }
        self.shared.perm.set(writer);
        debug!(node = self.shared.node, ?writer, "write permission set");
        Ok(())
    }
}

impl Drop for TcpFabric {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for link in self.links.values() {
            if let Some(c) = lock(&link.state).conn.take() {
                let _ = c.shutdown(Shutdown::Both);
            }
            link.wake.notify_all();
        }
        for (_, (_, s)) in lock(&self.shared.inbound).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the listener out of accept(); it sees `stop` and exits, closing the socket.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.listener_thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outbound: one thread per peer dials, authenticates, then reads completions.

/// Why a dial failed.
enum DialError {
    /// The peer could not be reached (refused, timed out, reset).
    Unreachable(io::Error),
    /// The peer answered but the handshake was refused (wrong key, cluster or node id).
    Refused(handshake::HandshakeError),
    /// The fabric is stopping.
    Stopped,
}

fn link_thread(sh: Arc<Shared>, link: Arc<Link>, stop: Receiver<()>) {
    let t = sh.tuning.clone();
    let mut backoff = t.backoff_min;
    // One rate limit for both dial failures: a peer that stays down (or keeps refusing us)
    // is reported at once, then once per `warn_every`, instead of at every back-off.
    let mut failing = Throttle::new(t.warn_every);
    while !sh.stopped() {
        match dial(&sh, &link) {
            Ok(stream) => {
                backoff = t.backoff_min;
                let held = failing.reset();
                if held > 0 {
                    info!(node = sh.node, peer = link.peer, addr = %link.addr,
                          failed_dials = held, "peer reachable again");
                }
                read_completions(&sh, &link, stream);
            }
            Err(DialError::Stopped) => {}
            Err(e) => {
                bump(&sh.stats.of(link.peer).dial_failures, 1);
                let (peer, addr) = (link.peer, link.addr);
                match (failing.allow(Instant::now()), e) {
                    (Some(suppressed), DialError::Unreachable(e)) => {
                        warn!(node = sh.node, peer, %addr, error = %e, suppressed,
                              "peer unreachable; retrying")
                    }
                    (Some(suppressed), DialError::Refused(e)) => {
                        warn!(node = sh.node, peer, %addr, error = %e, suppressed,
                              "handshake refused by peer; retrying")
                    }
                    (None, e) => debug!(node = sh.node, peer, %addr, error = %e.describe(),
                                        "dial failed"),
                    (Some(_), DialError::Stopped) => {}
                }
            }
        }
        if sh.stopped() {
            break;
        }
        match stop.recv_timeout(backoff) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => break,
        }
        backoff = (backoff * 2).min(t.backoff_max);
    }
}

impl DialError {
    fn describe(&self) -> String {
        match self {
            DialError::Unreachable(e) => e.to_string(),
            DialError::Refused(e) => format!("handshake refused: {e}"),
            DialError::Stopped => "stopped".into(),
        }
    }
}

impl From<io::Error> for DialError {
    fn from(e: io::Error) -> Self {
        DialError::Unreachable(e)
    }
}

/// Connects, authenticates and installs the connection; returns the reading half.
fn dial(sh: &Shared, link: &Link) -> Result<TcpStream, DialError> {
    let t = &sh.tuning;
    let mut s = TcpStream::connect_timeout(&link.addr, t.connect_timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(t.handshake_timeout))?;
    s.set_write_timeout(Some(t.handshake_timeout))?;
    match handshake::client(&mut s, sh.creds(), link.peer) {
        Ok(()) => {}
        Err(handshake::HandshakeError::Io(e)) => return Err(DialError::Unreachable(e)),
        Err(e) => {
            bump(&sh.stats.refused_handshakes, 1);
            return Err(DialError::Refused(e));
        }
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(Some(t.write_timeout))?;
    let reader = s.try_clone()?;
    let mut st = lock(&link.state);
    if sh.stopped() {
        let _ = s.shutdown(Shutdown::Both);
        return Err(DialError::Stopped);
    }
    debug_assert!(st.pending.is_empty() && st.buf.is_empty() && st.backlog.is_empty());
    st.conn = Some(Arc::new(s));
    sh.stats
        .of(link.peer)
        .connected
        .store(true, Ordering::Relaxed);
    bump(&sh.stats.connected, 1);
    info!(node = sh.node, peer = link.peer, addr = %link.addr, "connected");
    Ok(reader)
}

/// Takes the connection down: fails everything outstanding on it with `Disconnected`,
/// exactly once (the caller holds the link lock; a second call finds nothing).
fn fail_link(st: &mut LinkState, peer: NodeId) -> Vec<FabricEvent> {
    if let Some(c) = st.conn.take() {
        let _ = c.shutdown(Shutdown::Both);
    }
    st.buf.clear();
    st.backlog.clear();
    st.pending
        .drain(..)
        .map(|p| p.fail(peer, FabricError::Disconnected(peer)))
        .collect()
}

fn read_completions(sh: &Shared, link: &Link, mut s: TcpStream) {
    let limits = Limits {
        max_data: sh.tuning.max_read,
        max_control: 0,
    };
    let peer = link.peer;
    let mut inb = InBuf::new();
    let mut need = HEADER_LEN;
    let reason: String = 'conn: loop {
        match inb.fill(&mut s, need) {
            Ok(0) => break 'conn "closed by peer".into(),
            Ok(n) => bump(&sh.stats.of(peer).bytes_received, n as u64),
            Err(e) => break 'conn e.to_string(),
        }
        let mut batch = Vec::new();
        let mut st = lock(&link.state);
        // `Some((why, malformed))` ends the connection after this batch.
        let end: Option<(String, bool)> = loop {
            let (frame, used) = match codec::decode(inb.data(), &limits) {
                Ok(x) => x,
                Err(CodecError::Incomplete { need: n }) => {
                    need = n;
                    break None;
                }
                Err(e) => break Some((e.to_string(), true)),
            };
            let (done, status) = match (frame, st.pending.front().copied()) {
                (Frame::WriteAck { token, status }, Some(Pending::Write { token: t }))
                    if t == token =>
                {
                    let c = Completion::Write {
                        peer,
                        token,
                        result: status_result(peer, status),
                    };
                    (c, status)
                }
                (
                    Frame::ReadResp {
                        token,
                        status,
                        data,
                    },
                    Some(Pending::Read { token: t, len }),
                ) if t == token && (status != Status::Ok || data.len() == len) => {
                    let c = Completion::Read {
                        peer,
                        token,
                        result: status_result(peer, status).map(|()| data.to_vec()),
                    };
                    (c, status)
                }
                (f, p) => {
                    let why = format!("unexpected response {} (expected {p:?})", f.describe());
                    break Some((why, true));
                }
            };
            st.pending.pop_front();
            inb.start += used;
            batch.push(FabricEvent::Completion(done));
            if status == Status::OutOfBounds {
                // The peer closes after refusing an out-of-bounds access; take the link
                // down now, so that nothing more is posted on the doomed connection.
                break Some(("peer refused an out-of-bounds access".into(), false));
            }
        };
        if end.is_some() {
            batch.extend(fail_link(&mut st, peer));
        }
        drop(st);
        if !batch.is_empty() {
            bump(&sh.stats.completions, batch.len() as u64);
            let _ = sh.events.send(batch);
        }
        if let Some((why, malformed)) = end {
            if malformed {
                bump(&sh.stats.refused_frames, 1);
                warn!(node = sh.node, peer, addr = %link.addr, error = %why,
                      "malformed response; closing");
            }
            break 'conn why;
        }
    };
    let failed = fail_link(&mut lock(&link.state), peer);
    let _ = s.shutdown(Shutdown::Both);
    bump(&sh.stats.disconnects, 1);
    let cells = sh.stats.of(peer);
    cells.connected.store(false, Ordering::Relaxed);
    bump(&cells.disconnects, 1);
    if !sh.stopped() {
        warn!(node = sh.node, peer, addr = %link.addr, reason = %reason,
              failed = failed.len(), "disconnected");
    }
    if !failed.is_empty() {
        bump(&sh.stats.completions, failed.len() as u64);
        let _ = sh.events.send(failed);
    }
}

// ---------------------------------------------------------------------------------------
// Inbound: the listener, and one "NIC" thread per connection.

fn listen_thread(sh: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if sh.stopped() {
            break;
        }
        let (s, addr) = match conn.and_then(|s| s.peer_addr().map(|a| (s, a))) {
            Ok(x) => x,
            Err(e) => {
                warn!(node = sh.node, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if sh.inbound_live.load(Ordering::Acquire) >= sh.tuning.max_inbound {
            bump(&sh.stats.refused_handshakes, 1);
            if let Some(suppressed) = lock(&sh.refused_log).allow(addr.ip(), Instant::now()) {
                warn!(node = sh.node, %addr, suppressed, "too many inbound connections; refused");
            }
            continue;
        }
        sh.inbound_live.fetch_add(1, Ordering::AcqRel);
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tcp-nic-{}", sh.node))
            .spawn(move || {
                serve_inbound(&sh2, s, addr);
                sh2.inbound_live.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            sh.inbound_live.fetch_sub(1, Ordering::AcqRel);
            warn!(node = sh.node, %addr, error = %e, "cannot spawn receiver");
        }
    }
}

fn serve_inbound(sh: &Shared, mut s: TcpStream, addr: SocketAddr) {
    let t = &sh.tuning;
    let setup = s
        .set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(t.handshake_timeout)))
        .and_then(|()| s.set_write_timeout(Some(t.handshake_timeout)));
    if setup.is_err() {
        return;
    }
    let peer = match handshake::server(&mut s, sh.creds(), |n| sh.peers.contains_key(&n)) {
        Ok(p) => p,
        Err(e) => {
            bump(&sh.stats.refused_handshakes, 1);
            // A peer with the wrong key redials for ever: say so once per period.
            match lock(&sh.refused_log).allow(addr.ip(), Instant::now()) {
                Some(suppressed) => {
                    warn!(node = sh.node, %addr, error = %e, suppressed, "refused handshake")
                }
                None => debug!(node = sh.node, %addr, error = %e, "refused handshake"),
            }
            return;
        }
    };
    if s.set_read_timeout(None).is_err() || s.set_write_timeout(Some(t.write_timeout)).is_err() {
        return;
    }
    // Register; a newer connection from the same peer replaces an older one (the peer
    // restarted or redialled), so half-open leftovers do not linger.
    let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    {
        let Ok(clone) = s.try_clone() else { return };
        let mut inb = lock(&sh.inbound);
        if sh.stopped() {
            return;
        }
        inb.retain(|_, (p, old)| {
            if *p == Some(peer) {
                let _ = old.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
        inb.insert(id, (Some(peer), clone));
    }
    bump(&sh.stats.accepted, 1);
    info!(node = sh.node, peer, %addr, "accepted peer");
    let graceful = nic_loop(sh, &mut s, peer, addr);
    if graceful {
        // A refused frame: its NACK is out; let it reach the peer before the close.
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match s.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    lock(&sh.inbound).remove(&id);
}

/// Serves frames until the connection ends. Returns `true` when it ends because of a
/// refused frame whose NACK should reach the peer before the socket closes.
fn nic_loop(sh: &Shared, s: &mut TcpStream, peer: NodeId, addr: SocketAddr) -> bool {
    let limits = Limits::for_region(sh.region.len());
    let mut inb = InBuf::new();
    let mut out = Vec::with_capacity(64 << 10);
    let mut need = HEADER_LEN;
    let mut denied_logged = false;
    loop {
        match inb.fill(s, need) {
            Ok(0) => {
                if inb.start != inb.end {
                    bump(&sh.stats.refused_frames, 1);
                    warn!(node = sh.node, peer, %addr, have = inb.end - inb.start, need,
                          "connection closed inside a frame (truncated frame)");
                }
                return false;
            }
            Ok(n) => bump(&sh.stats.of(peer).bytes_received, n as u64),
            Err(e) => {
                debug!(node = sh.node, peer, %addr, error = %e, "inbound connection ended");
                return false;
            }
        }
        let mut messages = Vec::new();
        let mut refused: Option<(String, bool)> = None;
        loop {
            let (frame, used) = match codec::decode(inb.data(), &limits) {
                Ok(x) => x,
                Err(CodecError::Incomplete { need: n }) => {
                    need = n;
                    break;
                }
                Err(e) => {
                    refused = Some((e.to_string(), false));
                    break;
                }
            };
            match nic::apply(&frame, peer, &sh.region, &sh.perm, &mut out) {
                Outcome::Landed => {
                    if let Frame::Write { data, .. } = frame {
                        bump(&sh.stats.writes_landed, 1);
                        bump(&sh.stats.bytes_landed, data.len() as u64);
                    }
                }
                Outcome::Served => bump(&sh.stats.reads_served, 1),
                Outcome::Message(bytes) => {
                    bump(&sh.stats.messages_received, 1);
                    messages.push(FabricEvent::Message {
                        from: peer,
                        bytes: bytes.to_vec(),
                    });
                }
                Outcome::Denied => {
                    bump(&sh.stats.denied_writes, 1);
                    if !denied_logged {
                        denied_logged = true;
                        warn!(node = sh.node, peer, %addr, writer = ?sh.perm.get(),
                              "write without permission denied");
                    }
                }
                Outcome::OutOfBounds => {
                    bump(&sh.stats.out_of_bounds, 1);
                    refused = Some((format!("out-of-bounds access {}", frame.describe()), true));
                }
                Outcome::Unexpected => {
                    refused = Some((format!("unexpected frame {}", frame.describe()), false));
                }
            }
            inb.start += used;
            if refused.is_some() {
                break;
            }
        }
        if !messages.is_empty() {
            let _ = sh.events.send(messages);
        }
        if !out.is_empty() {
            if let Err(e) = push_all(s, &out, &sh.stats, peer) {
                debug!(node = sh.node, peer, %addr, error = %e, "cannot answer; closing");
                return false;
            }
            out.clear();
        }
        if let Some((why, graceful)) = refused {
            bump(&sh.stats.refused_frames, 1);
            warn!(node = sh.node, peer, %addr, error = %why, "refused frame; closing");
            return graceful;
        }
    }
}
