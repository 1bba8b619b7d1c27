//! `RdmaFabric`: the `Fabric` over RC queue pairs.
//!
//! Per peer pair, two RC QPs (see docs/rdma.md, "Permission fence"):
//! - the **data QP** (main protection domain) carries one-sided WRITEs into the peer's ring
//!   and commit cell and READs of its whole region. Its `qp_access_flags` are the fence:
//!   remote write is granted on the data QP of the current writer only.
//! - the **control QP** (one protection domain per peer) carries control messages
//!   (SEND/RECV, fragmented) and the peer's writes into *its own* progress cell, the only
//!   memory registered in that PD with remote access. It is never revoked, and the NIC
//!   itself stops a peer from reaching anything else through it.
//!
//! Hot path: `write` copies into a registered per-peer staging ring and appends a work
//! request to a preallocated list; `flush` rings one doorbell per peer (the last request of
//! a batch, and every `signal_every`-th, is signaled; RC completes in order, so one
//! completion stands for all earlier requests). `poll` drains one CQ into preallocated
//! queues. Neither allocates, except the `Vec` a READ completion or a message must carry.

use crate::bootstrap::{self, Hello};
use crate::error::{wc_to_fabric, VerbsError};
use crate::verbs::*;
use crate::wr::{RecvList, Remote, SendList};
use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent, MAX_CONTROL};
use ballot::layout::{self, WriteTarget};
use ballot::metrics::{FabricCounters, FabricPeerCounters};
use ballot::region::Region;
use ballot::NodeId;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of one control fragment (receive buffer), header included.
pub const FRAG: usize = 64 << 10;
const FRAG_HDR: usize = 8;
const FRAG_PAYLOAD: usize = FRAG - FRAG_HDR;
const RECV_SLOTS: usize = 16;
/// Enough send slots for one message of MAX_CONTROL bytes plus progress-cell writes.
const CTRL_SLOTS: usize = MAX_CONTROL.div_ceil(FRAG_PAYLOAD) + 8;

/// How long a data-QP reconnect request waits for the peer's ack before it is asked again.
const RECONNECT_RETRY: Duration = Duration::from_secs(2);

const KIND_DATA: u64 = 0;
const KIND_CTRL_SEND: u64 = 1;
const KIND_CTRL_RECV: u64 = 2;

const MSG_USER: u8 = 0;
const MSG_RECONNECT: u8 = 1;
const MSG_RECONNECT_ACK: u8 = 2;
const FLAG_FIRST: u8 = 1;

/// kind (2 bits) | peer generation (4 bits) | peer (4 bits) | sequence (54 bits). The
/// generation tells completions of a replaced peer's old QPs from those of its new ones.
fn wr_id(kind: u64, peer: NodeId, gen: u8, seq: u64) -> u64 {
    kind << 62 | u64::from(gen & 0xf) << 58 | u64::from(peer & 0xf) << 54 | (seq & ((1 << 54) - 1))
}
fn split_wr_id(id: u64) -> (u64, NodeId, u8, u64) {
    (
        id >> 62,
        (id >> 54) as u8 & 0xf,
        (id >> 58) as u8 & 0xf,
        id & ((1 << 54) - 1),
    )
}
fn same_seq(full: u64, low: u64) -> bool {
    full & ((1 << 54) - 1) == low
}

/// The RDMA fabric's counters, per peer, readable from any thread while the fabric runs in
/// the replica ([`RdmaFabric::counters`]; the replica publishes them through
/// [`Fabric::counters`] as [`FabricCounters`], which `ballot-node` exports). Every update is
/// a relaxed atomic add on a path that already does more (a post, a completion, a
/// reconnect); `connected` is refreshed once per `poll`.
#[derive(Debug, Default)]
pub struct RdmaCounters {
    peer: [RdmaPeerCells; ballot::MAX_NODES],
    /// Bootstrap connections refused (bad key, cluster or node id), shared with the
    /// bootstrap listener thread.
    refused: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct RdmaPeerCells {
    connected: AtomicBool,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    disconnects: AtomicU64,
    failed_operations: AtomicU64,
    reconnects: AtomicU64,
    busy: AtomicU64,
}

impl RdmaCounters {
    fn new(refused: Arc<AtomicU64>) -> Self {
        RdmaCounters {
            refused,
            ..RdmaCounters::default()
        }
    }
    fn add(&self, peer: NodeId, which: fn(&RdmaPeerCells) -> &AtomicU64, n: u64) {
        if let Some(c) = self.peer.get(peer as usize) {
            which(c).fetch_add(n, Ordering::Relaxed);
        }
    }
    fn set_connected(&self, peer: NodeId, up: bool) {
        if let Some(c) = self.peer.get(peer as usize) {
            c.connected.store(up, Ordering::Relaxed);
        }
    }
    /// Counts a post refused for lack of room (`Busy`).
    fn note(&self, peer: NodeId, r: &Result<(), FabricError>) {
        if matches!(r, Err(FabricError::Busy)) {
            self.add(peer, |c| &c.busy, 1);
        }
    }
}

impl FabricCounters for RdmaCounters {
    fn name(&self) -> &'static str {
        "rdma"
    }
    /// `sent_bytes`: bytes of one-sided WRITEs and control messages posted to the peer
    /// (data and control QPs); `received_bytes`: bytes of control messages received from
    /// it and of READ responses (its one-sided writes into this region are invisible to
    /// this CPU); `disconnects`: times the data QP to it broke (an error completion, a
    /// failed post, a reset by a fence, a reconnect or its restart); `failed_operations`:
    /// WRITEs, READs and progress-cell writes completed with an error; `reconnects`: data
    /// QP reconnects and re-bootstraps of a restarted peer; `busy`: posts refused because
    /// its send queue or staging ring was full.
    fn peer(&self, peer: NodeId) -> FabricPeerCounters {
        let Some(c) = self.peer.get(peer as usize) else {
            return FabricPeerCounters::default();
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FabricPeerCounters {
            connected: c.connected.load(Ordering::Relaxed),
            sent_bytes: g(&c.sent_bytes),
            received_bytes: g(&c.received_bytes),
            disconnects: g(&c.disconnects),
            failed_operations: g(&c.failed_operations),
            reconnects: g(&c.reconnects),
            busy: g(&c.busy),
        }
    }
    fn refused_handshakes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct RdmaConfig {
    pub node: NodeId,
    pub cluster: u64,
    /// The cluster key: every bootstrap connection is authenticated with it
    /// (`ballot_tcp::handshake`). Must not be empty.
    pub key: Vec<u8>,
    /// This process restarted (its peers still hold QPs to its previous incarnation): dial
    /// every peer instead of waiting for the higher ids, so they replace our QPs.
    pub rejoin: bool,
    /// Reconnect broken data QPs from `poll` (one request per break, asked again after 2 s
    /// without the peer's ack), as `rdma-cluster` does by hand with [`RdmaFabric::reconnect`].
    pub auto_reconnect: bool,
    /// Device name; `None`: the first device.
    pub device: Option<String>,
    /// GID index (RoCE v2 IPv4-mapped); `None`: the first IPv4-mapped GID of the port.
    pub gid_index: Option<u32>,
    pub path: PathConfig,
    /// Bootstrap listener of this node.
    pub listen: SocketAddr,
    /// Every other replica and its bootstrap address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub connect_timeout: Duration,
    /// Send-queue depth of each data QP: writes + reads outstanding per peer.
    pub max_outstanding: usize,
    /// Signal at least every this many data requests.
    pub signal_every: usize,
    /// Registered staging bytes per peer (must hold the largest write; default 8 MiB).
    pub staging_bytes: usize,
}

impl RdmaConfig {
    pub fn new(node: NodeId, listen: SocketAddr, peers: Vec<(NodeId, SocketAddr)>) -> Self {
        Self {
            node,
            cluster: 0,
            key: Vec::new(),
            rejoin: false,
            auto_reconnect: false,
            device: None,
            gid_index: None,
            path: PathConfig::default(),
            listen,
            peers,
            connect_timeout: Duration::from_secs(60),
            max_outstanding: 256,
            signal_every: 32,
            staging_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write,
    Read,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    token: u64,
    op: Op,
    stage_off: usize,
    len: usize,
    /// Virtual end of this request's staging bytes (frees the ring up to here).
    stage_end: u64,
}

struct Peer {
    id: NodeId,
    /// Incremented each time the peer re-bootstraps (mod 16).
    gen: u8,
    remote: Hello,
    mine: Hello,
    data: Qp,
    ctrl: Qp,
    // data path
    stage: Arc<Mr>,
    stage_head: u64,
    stage_tail: u64,
    pending: VecDeque<Pending>,
    seq: u64,
    unsignaled: usize,
    list: SendList,
    broken: Option<FabricError>,
    reconnect_epoch: u32,
    reconnecting: bool,
    // control path
    ctrl_stage: Arc<Mr>,
    ctrl_seq: u64,
    ctrl_done: u64,
    /// When a control send last completed (or the peer connected).
    ctrl_last_done: Instant,
    /// Progress-cell writes awaiting completion: (ctrl seq, token).
    ctrl_writes: VecDeque<(u64, u64)>,
    ctrl_list: SendList,
    recv_buf: Arc<Mr>,
    recv_list: RecvList,
    reasm: Vec<u8>,
    reasm_kind: u8,
    reasm_total: usize,
    ctrl_broken: Option<FabricError>,
    counters: Arc<RdmaCounters>,
}

/// What building a peer's QPs and MRs needs.
struct Shared {
    ctx: Arc<Context>,
    pd: Arc<Pd>,
    cq: Arc<Cq>,
    region: Arc<Region>,
    read_mr: Arc<Mr>,
    ring_mr: Arc<Mr>,
    commit_mr: Arc<Mr>,
    gid: [u8; 16],
    mtu: u32,
    cluster: u64,
    max_outstanding: usize,
    staging_bytes: usize,
    counters: Arc<RdmaCounters>,
}

pub struct RdmaFabric {
    node: NodeId,
    shared: Shared,
    /// Authenticated bootstrap streams of restarted peers, from the listener thread.
    rebootstrap: Receiver<(NodeId, TcpStream)>,
    stop_listener: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    rebootstraps: u64,
    auto_reconnect: bool,
    /// Per peer slot: when to try reconnecting its data QP next, and the back-off.
    retry: Vec<Option<(Instant, Duration)>>,
    timeout: Duration,
    region: Arc<Region>,
    ctx: Arc<Context>,
    cq: Arc<Cq>,
    path: PathConfig,
    mtu: u32,
    peers: Vec<Peer>,
    /// Index into `peers` by node id.
    slot: [Option<usize>; ballot::MAX_NODES],
    writer: Option<NodeId>,
    events: VecDeque<FabricEvent>,
    wcs: Vec<WorkCompletion>,
    signal_every: usize,
    /// Kept alive for the peers' QPs (they also hold them).
    _mrs: Vec<Arc<Mr>>,
}

fn fe(e: VerbsError) -> FabricError {
    e.into()
}

fn psn(node: NodeId, peer: NodeId, epoch: u32, ctrl: bool) -> u32 {
    (u32::from(node) << 16
        ^ u32::from(peer) << 8
        ^ epoch.wrapping_mul(0x9e37)
        ^ u32::from(ctrl) << 20)
        & 0xff_ffff
}

/// A failure described by text only (bootstrap, configuration), as a fabric error.
fn other(why: String) -> FabricError {
    FabricError::io(std::io::Error::other(why))
}

impl RdmaFabric {
    /// Opens the device, registers `region`, creates the QPs and connects to every peer
    /// through the authenticated TCP bootstrap. Blocks until all peers are connected or the
    /// timeout. The bootstrap listener then keeps running (until drop) so that a restarted
    /// peer can re-bootstrap: `poll` replaces its QPs.
    pub fn connect(cfg: &RdmaConfig, region: Arc<Region>) -> Result<RdmaFabric, FabricError> {
        let bad = other;
        if cfg
            .peers
            .iter()
            .any(|(p, _)| *p == cfg.node || *p as usize >= ballot::MAX_NODES)
        {
            return Err(bad(format!(
                "peer list {:?} names this node or an id >= {}",
                cfg.peers,
                ballot::MAX_NODES
            )));
        }
        if cfg.max_outstanding < 2
            || cfg.signal_every == 0
            || cfg.signal_every > cfg.max_outstanding / 2
        {
            return Err(bad(
                "max_outstanding >= 2 and 1 <= signal_every <= max_outstanding/2 required".into(),
            ));
        }
        if cfg.key.is_empty() {
            return Err(bad(
                "bootstrap: no cluster key (RdmaConfig::key is empty)".into()
            ));
        }
        let ctx = Context::open(cfg.device.as_deref()).map_err(fe)?;
        let port = ctx.query_port(cfg.path.port).map_err(fe)?;
        if !port.active {
            return Err(bad(format!(
                "{} port {} is not active",
                ctx.name(),
                cfg.path.port
            )));
        }
        let gid_index = match cfg.gid_index {
            Some(g) => g,
            None => ctx.find_ipv4_gid(cfg.path.port).map_err(fe)?,
        };
        let gid = ctx.query_gid(cfg.path.port, gid_index).map_err(fe)?;
        let path = PathConfig {
            gid_index,
            ..cfg.path
        };
        let mtu = cfg.path.mtu.unwrap_or(port.active_mtu);
        let n = cfg.peers.len();
        let cq = Cq::new(
            &ctx,
            n * (cfg.max_outstanding + CTRL_SLOTS + RECV_SLOTS) + 16,
        )
        .map_err(fe)?;
        let pd = Pd::new(&ctx).map_err(fe)?;
        let len = region.len();
        let read_mr = Mr::register_region(&pd, &region, 0, len, Access::REMOTE_READ).map_err(fe)?;
        let ring_mr = Mr::register_region(
            &pd,
            &region,
            layout::RING_OFFSET,
            len - layout::RING_OFFSET,
            Access::REMOTE_RW,
        )
        .map_err(fe)?;
        let commit_mr = Mr::register_region(
            &pd,
            &region,
            layout::COMMIT_CELL_OFFSET,
            layout::COMMIT_CELL_SIZE,
            Access::REMOTE_RW,
        )
        .map_err(fe)?;
        // Shared by every peer; the bootstrap listener counts its refusals into `refused`.
        let refused = Arc::new(AtomicU64::new(0));
        let shared = Shared {
            counters: Arc::new(RdmaCounters::new(refused.clone())),
            ctx,
            pd,
            cq,
            region,
            read_mr,
            ring_mr,
            commit_mr,
            gid,
            mtu,
            cluster: cfg.cluster,
            max_outstanding: cfg.max_outstanding,
            staging_bytes: cfg.staging_bytes,
        };
        let auth = bootstrap::Auth {
            cluster: cfg.cluster,
            key: cfg.key.clone(),
            node: cfg.node,
        };
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| bad(format!("bootstrap: bind {}: {e}", cfg.listen)))?;
        let streams = bootstrap::open_streams(
            &auth,
            &listener,
            &cfg.peers,
            cfg.rejoin,
            cfg.connect_timeout,
        )
        .map_err(bad)?;

        let mut peers = Vec::new();
        let mut conns = Vec::new();
        for (p, stream) in streams {
            peers.push(Self::make_peer(&shared, cfg.node, p, 0).map_err(fe)?);
            conns.push(stream);
        }
        // Exchange, connect (no peer may write until set_writer grants it), post receives,
        // then a barrier so nobody sends before the other side can receive.
        for (peer, s) in peers.iter_mut().zip(conns.iter_mut()) {
            Self::connect_peer(peer, s, &path, mtu, false)?;
        }
        for s in conns.iter_mut() {
            bootstrap::barrier(s).map_err(bad)?;
        }
        let mut slot = [None; ballot::MAX_NODES];
        for (i, p) in peers.iter().enumerate() {
            slot[p.id as usize] = Some(i);
        }
        let (tx, rx) = mpsc::channel();
        let stop_listener = Arc::new(AtomicBool::new(false));
        bootstrap::spawn_listener(
            listener,
            auth,
            cfg.peers.iter().map(|p| p.0).collect(),
            tx,
            stop_listener.clone(),
            refused.clone(),
        )
        .map_err(|e| bad(format!("bootstrap: cannot start the listener thread: {e}")))?;
        let mrs = vec![
            shared.read_mr.clone(),
            shared.ring_mr.clone(),
            shared.commit_mr.clone(),
        ];
        Ok(RdmaFabric {
            node: cfg.node,
            region: shared.region.clone(),
            ctx: shared.ctx.clone(),
            cq: shared.cq.clone(),
            shared,
            rebootstrap: rx,
            stop_listener,
            refused,
            rebootstraps: 0,
            auto_reconnect: cfg.auto_reconnect,
            retry: vec![None; ballot::MAX_NODES],
            timeout: cfg.connect_timeout.min(Duration::from_secs(5)),
            path,
            mtu,
            peers,
            slot,
            writer: None,
            events: VecDeque::with_capacity(4 * cfg.max_outstanding),
            wcs: vec![WorkCompletion::default(); 32],
            signal_every: cfg.signal_every,
            _mrs: mrs,
        })
    }

    /// Creates the QPs, protection domain and MRs of one peer (not yet connected).
    fn make_peer(sh: &Shared, node: NodeId, p: NodeId, gen: u8) -> Result<Peer, VerbsError> {
        let ppd = Pd::new(&sh.ctx)?;
        let progress_mr = Mr::register_region(
            &ppd,
            &sh.region,
            layout::progress_offset(p),
            layout::PROGRESS_CELL_SIZE,
            Access {
                local_write: true,
                remote_write: true,
                remote_read: false,
            },
        )?;
        let stage = Mr::alloc(&sh.pd, sh.staging_bytes, Access::LOCAL)?;
        let ctrl_stage = Mr::alloc(&ppd, CTRL_SLOTS * FRAG, Access::LOCAL)?;
        let recv_buf = Mr::alloc(&ppd, RECV_SLOTS * FRAG, Access::LOCAL)?;
        let mut data = Qp::create_rc(
            &sh.pd,
            &sh.cq,
            &sh.cq,
            QpCaps {
                max_send_wr: sh.max_outstanding as u32,
                max_recv_wr: 1,
                max_sge: 1,
            },
        )?;
        let mut ctrl = Qp::create_rc(
            &ppd,
            &sh.cq,
            &sh.cq,
            QpCaps {
                max_send_wr: CTRL_SLOTS as u32,
                max_recv_wr: RECV_SLOTS as u32,
                max_sge: 1,
            },
        )?;
        for m in [&sh.read_mr, &sh.ring_mr, &sh.commit_mr, &stage] {
            data.hold(m)?;
        }
        for m in [&progress_mr, &ctrl_stage, &recv_buf] {
            ctrl.hold(m)?;
        }
        let mine = Hello {
            cluster: sh.cluster,
            from: node,
            to: p,
            gid: sh.gid,
            data_qpn: data.num(),
            data_psn: psn(node, p, 0, false),
            ctrl_qpn: ctrl.num(),
            ctrl_psn: psn(node, p, 0, true),
            mtu: sh.mtu,
            region_len: sh.region.len() as u64,
            read_addr: sh.read_mr.addr(),
            read_rkey: sh.read_mr.rkey(),
            ring_addr: sh.ring_mr.addr(),
            ring_rkey: sh.ring_mr.rkey(),
            commit_addr: sh.commit_mr.addr(),
            commit_rkey: sh.commit_mr.rkey(),
            progress_addr: progress_mr.addr(),
            progress_rkey: progress_mr.rkey(),
        };
        Ok(Peer {
            id: p,
            gen,
            remote: Hello::default(),
            mine,
            data,
            ctrl,
            stage,
            stage_head: 0,
            stage_tail: 0,
            pending: VecDeque::with_capacity(sh.max_outstanding),
            seq: 0,
            unsignaled: 0,
            list: SendList::with_capacity(sh.max_outstanding),
            broken: None,
            reconnect_epoch: 0,
            reconnecting: false,
            ctrl_stage,
            ctrl_seq: 0,
            ctrl_done: 0,
            ctrl_last_done: Instant::now(),
            ctrl_writes: VecDeque::with_capacity(CTRL_SLOTS),
            ctrl_list: SendList::with_capacity(CTRL_SLOTS),
            recv_buf,
            recv_list: RecvList::with_capacity(RECV_SLOTS),
            reasm: Vec::with_capacity(MAX_CONTROL),
            reasm_kind: 0,
            reasm_total: 0,
            ctrl_broken: None,
            counters: sh.counters.clone(),
        })
    }

    /// Exchanges hellos on `s`, connects both QPs and posts the receives.
    fn connect_peer(
        peer: &mut Peer,
        s: &mut TcpStream,
        path: &PathConfig,
        mtu: u32,
        may_write: bool,
    ) -> Result<(), FabricError> {
        peer.remote = bootstrap::exchange(s, &peer.mine).map_err(other)?;
        let mtu = mtu.min(peer.remote.mtu);
        let r = &peer.remote;
        peer.data
            .connect(
                peer.mine.data_psn,
                &Endpoint {
                    qpn: r.data_qpn,
                    psn: r.data_psn,
                    gid: r.gid,
                },
                Access {
                    local_write: false,
                    remote_write: may_write,
                    remote_read: true,
                },
                path,
                mtu,
            )
            .map_err(fe)?;
        peer.ctrl
            .connect(
                peer.mine.ctrl_psn,
                &Endpoint {
                    qpn: r.ctrl_qpn,
                    psn: r.ctrl_psn,
                    gid: r.gid,
                },
                Access {
                    local_write: false,
                    remote_write: true,
                    remote_read: false,
                },
                path,
                mtu,
            )
            .map_err(fe)?;
        for i in 0..RECV_SLOTS {
            peer.recv_list
                .recv(
                    wr_id(KIND_CTRL_RECV, peer.id, peer.gen, i as u64),
                    &peer.recv_buf,
                    i * FRAG,
                    FRAG,
                )
                .map_err(fe)?;
        }
        peer.ctrl.post_recv(&mut peer.recv_list).map_err(fe)
    }

    /// A restarted peer dialled us: build new QPs for it, connect them, and replace the old
    /// ones (whose outstanding requests fail with `Disconnected`).
    fn rebootstrap_peer(&mut self, p: NodeId, mut s: TcpStream) -> Result<(), FabricError> {
        let i = self.peer_index(p)?;
        s.set_read_timeout(Some(self.timeout)).ok();
        let gen = self.peers[i].gen.wrapping_add(1) & 0xf;
        let mut fresh = Self::make_peer(&self.shared, self.node, p, gen).map_err(fe)?;
        let path = self.path;
        Self::connect_peer(&mut fresh, &mut s, &path, self.mtu, self.writer == Some(p))?;
        bootstrap::barrier(&mut s).map_err(other)?;
        let old = std::mem::replace(&mut self.peers[i], fresh);
        let mut old = old;
        Self::fail_data(&mut old, &mut self.events, FabricError::Disconnected(p));
        while let Some((_, token)) = old.ctrl_writes.pop_front() {
            old.counters.add(p, |c| &c.failed_operations, 1);
            self.events
                .push_back(FabricEvent::Completion(Completion::Write {
                    peer: p,
                    token,
                    result: Err(FabricError::Disconnected(p)),
                }));
        }
        self.retry[p as usize] = None;
        self.rebootstraps += 1;
        self.shared.counters.add(p, |c| &c.reconnects, 1);
        Ok(())
    }

    /// Peers replaced after re-bootstrapping, and bootstrap connections refused (bad key,
    /// unknown node) since start.
    pub fn bootstrap_counters(&self) -> (u64, u64) {
        (self.rebootstraps, self.refused.load(Ordering::Relaxed))
    }

    /// Takes re-bootstrap streams from the listener, and (with `auto_reconnect`) retries
    /// broken data QPs.
    fn maintain(&mut self) {
        while let Ok((p, s)) = self.rebootstrap.try_recv() {
            match self.rebootstrap_peer(p, s) {
                Ok(()) => tracing::info!(
                    "node {}: peer {p} re-bootstrapped (new QPs, rkeys and region)",
                    self.node
                ),
                Err(e) => {
                    tracing::warn!("node {}: re-bootstrap of peer {p} failed: {e}", self.node)
                }
            }
        }
        if !self.auto_reconnect {
            return;
        }
        // One request per break, answered by the peer's ack; asked again only if no ack came
        // within RECONNECT_RETRY (peer gone, message lost). Asking sooner would make the
        // peer reset its end again before our end follows (a reset storm under load).
        let now = Instant::now();
        for i in 0..self.peers.len() {
            let p = self.peers[i].id;
            if self.peers[i].broken.is_none() {
                self.retry[p as usize] = None;
                continue;
            }
            match self.retry[p as usize] {
                Some((at, _)) if now < at => continue,
                Some(_) => self.peers[i].reconnecting = false,
                None => {}
            }
            let why = self.peers[i].broken.clone().map(|e| e.to_string());
            let r = self.reconnect(p);
            tracing::warn!(
                "node {}: data QP to {p} broken ({}): reconnect {}",
                self.node,
                why.unwrap_or_default(),
                match r {
                    Ok(()) => "requested".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            );
            self.retry[p as usize] = Some((now + RECONNECT_RETRY, RECONNECT_RETRY));
        }
    }

    pub fn device(&self) -> &str {
        self.ctx.name()
    }
    pub fn gid_index(&self) -> u32 {
        self.path.gid_index
    }
    pub fn mtu_bytes(&self) -> usize {
        mtu_bytes(self.mtu)
    }

    fn peer_index(&self, p: NodeId) -> Result<usize, FabricError> {
        self.slot
            .get(p as usize)
            .copied()
            .flatten()
            .ok_or(FabricError::UnknownPeer(p))
    }

    /// Reserves `len` contiguous staging bytes; returns (offset, virtual end).
    fn stage_alloc(peer: &mut Peer, len: usize) -> Result<(usize, u64), FabricError> {
        let size = peer.stage.len() as u64;
        if len as u64 > size {
            return Err(FabricError::TooLarge {
                len,
                max: size as usize,
            });
        }
        let mut pos = peer.stage_head;
        if pos % size + len as u64 > size {
            pos += size - pos % size; // skip the tail end of the ring
        }
        if pos + len as u64 - peer.stage_tail > size {
            return Err(FabricError::Busy);
        }
        peer.stage_head = pos + len as u64;
        Ok(((pos % size) as usize, pos + len as u64))
    }

    fn push_data(
        &mut self,
        i: usize,
        op: Op,
        token: u64,
        remote: Remote,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(), FabricError> {
        let every = self.signal_every;
        let peer = &mut self.peers[i];
        if let Some(e) = &peer.broken {
            return Err(e.clone());
        }
        if peer.pending.len() >= peer.pending.capacity().max(2) - 1 || peer.list.is_full() {
            return Err(FabricError::Busy);
        }
        let (off, end) = Self::stage_alloc(peer, len)?;
        if let Some(d) = data {
            peer.stage.copy_in(off, d).map_err(fe)?;
        }
        peer.seq += 1;
        let seq = peer.seq;
        peer.unsignaled += 1;
        let signaled = peer.unsignaled >= every;
        if signaled {
            peer.unsignaled = 0;
        }
        let id = wr_id(KIND_DATA, peer.id, peer.gen, seq);
        let r = match op {
            Op::Write => peer.list.write(id, &peer.stage, off, len, remote, signaled),
            Op::Read => peer.list.read(id, &peer.stage, off, len, remote, signaled),
        };
        r.map_err(fe)?;
        peer.pending.push_back(Pending {
            seq,
            token,
            op,
            stage_off: off,
            len,
            stage_end: end,
        });
        if matches!(op, Op::Write) {
            peer.counters.add(peer.id, |c| &c.sent_bytes, len as u64);
        }
        Ok(())
    }

    fn flush_peer(&mut self, i: usize) {
        let peer = &mut self.peers[i];
        if !peer.list.is_empty() {
            peer.list.signal_last();
            peer.unsignaled = 0;
            if let Err(e) = peer.data.post_send(&mut peer.list) {
                let err = FabricError::from(e);
                Self::fail_data(peer, &mut self.events, err);
            }
        }
        if !peer.ctrl_list.is_empty() {
            if let Err(e) = peer.ctrl.post_send(&mut peer.ctrl_list) {
                peer.ctrl_broken = Some(FabricError::from(e));
            }
        }
    }

    /// Marks the data QP broken and fails everything outstanding on it.
    fn fail_data(peer: &mut Peer, events: &mut VecDeque<FabricEvent>, err: FabricError) {
        peer.list.clear();
        while let Some(p) = peer.pending.pop_front() {
            events.push_back(Self::completion(peer, p, Err(err.clone())));
        }
        peer.stage_tail = peer.stage_head;
        if peer.broken.is_none() {
            peer.counters.add(peer.id, |c| &c.disconnects, 1);
            peer.broken = Some(err);
        }
    }

    fn completion(peer: &Peer, p: Pending, result: Result<(), FabricError>) -> FabricEvent {
        match (&result, p.op) {
            (Err(_), _) => peer.counters.add(peer.id, |c| &c.failed_operations, 1),
            (Ok(()), Op::Read) => peer
                .counters
                .add(peer.id, |c| &c.received_bytes, p.len as u64),
            (Ok(()), Op::Write) => {}
        }
        FabricEvent::Completion(match p.op {
            Op::Write => Completion::Write {
                peer: peer.id,
                token: p.token,
                result,
            },
            Op::Read => Completion::Read {
                peer: peer.id,
                token: p.token,
                result: result.map(|()| {
                    let mut v = vec![0u8; p.len];
                    peer.stage
                        .copy_out(p.stage_off, &mut v)
                        .expect("staged read in bounds");
                    v
                }),
            },
        })
    }

    /// Queues a control message (kind + bytes) as fragments on the control QP.
    fn send_ctrl(&mut self, i: usize, kind: u8, msg: &[u8]) -> Result<(), FabricError> {
        let nfrags = msg.len().div_ceil(FRAG_PAYLOAD).max(1);
        let start = Instant::now();
        loop {
            let peer = &self.peers[i];
            if let Some(e) = &peer.ctrl_broken {
                return Err(e.clone());
            }
            let in_flight = (peer.ctrl_seq - peer.ctrl_done) as usize;
            if in_flight + nfrags <= CTRL_SLOTS {
                break;
            }
            self.flush_peer(i);
            self.progress();
            // Bounded: wait (up to 1 s) while the peer completes our sends, but give up at
            // once (5 ms) on a peer with no completion for 100 ms: one that stopped answering
            // must not stall the replica thread (the protocol resends on its timers).
            let waited = start.elapsed();
            let silent = self.peers[i].ctrl_last_done.elapsed() > Duration::from_millis(100);
            if waited > Duration::from_secs(1) || (silent && waited > Duration::from_millis(5)) {
                return Err(FabricError::Busy);
            }
        }
        let peer = &mut self.peers[i];
        for f in 0..nfrags {
            let chunk =
                &msg[(f * FRAG_PAYLOAD).min(msg.len())..((f + 1) * FRAG_PAYLOAD).min(msg.len())];
            let slot = peer.ctrl_seq as usize % CTRL_SLOTS;
            let off = slot * FRAG;
            let mut hdr = [0u8; FRAG_HDR];
            hdr[0] = kind;
            hdr[1] = if f == 0 { FLAG_FIRST } else { 0 };
            hdr[4..8].copy_from_slice(&(msg.len() as u32).to_le_bytes());
            peer.ctrl_stage.copy_in(off, &hdr).map_err(fe)?;
            peer.ctrl_stage.copy_in(off + FRAG_HDR, chunk).map_err(fe)?;
            peer.ctrl_seq += 1;
            let seq = peer.ctrl_seq;
            peer.ctrl_list
                .send(
                    wr_id(KIND_CTRL_SEND, peer.id, peer.gen, seq),
                    &peer.ctrl_stage,
                    off,
                    FRAG_HDR + chunk.len(),
                    true,
                )
                .map_err(fe)?;
        }
        // Control messages go out at once: they are rare and latency matters more.
        let r = peer.ctrl.post_send(&mut peer.ctrl_list);
        if r.is_ok() {
            peer.counters
                .add(peer.id, |c| &c.sent_bytes, msg.len() as u64);
        }
        r.map_err(|e| {
            let err = FabricError::from(e);
            peer.ctrl_broken = Some(err.clone());
            err
        })
    }

    /// Writes into our own progress cell at `peer` through the control QP.
    fn write_progress(
        &mut self,
        i: usize,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError> {
        let peer = &mut self.peers[i];
        if let Some(e) = &peer.ctrl_broken {
            return Err(e.clone());
        }
        let in_flight = (peer.ctrl_seq - peer.ctrl_done) as usize;
        if in_flight + 1 > CTRL_SLOTS {
            return Err(FabricError::Busy);
        }
        let slot = peer.ctrl_seq as usize % CTRL_SLOTS;
        peer.ctrl_stage.copy_in(slot * FRAG, data).map_err(fe)?;
        peer.ctrl_seq += 1;
        let cell = layout::progress_offset(self.node);
        let remote = Remote {
            addr: peer.remote.progress_addr + (offset - cell) as u64,
            rkey: peer.remote.progress_rkey,
        };
        peer.ctrl_list
            .write(
                wr_id(KIND_CTRL_SEND, peer.id, peer.gen, peer.ctrl_seq),
                &peer.ctrl_stage,
                slot * FRAG,
                data.len(),
                remote,
                true,
            )
            .map_err(fe)?;
        peer.ctrl_writes.push_back((peer.ctrl_seq, token));
        peer.counters
            .add(peer.id, |c| &c.sent_bytes, data.len() as u64);
        Ok(())
    }

    /// Drains the completion queue into `self.events`.
    fn progress(&mut self) {
        loop {
            let n = self.cq.poll(&mut self.wcs).unwrap_or_default();
            for k in 0..n {
                let wc = self.wcs[k];
                let (kind, p, gen, seq) = split_wr_id(wc.wr_id);
                let Some(i) = self.slot.get(p as usize).copied().flatten() else {
                    continue;
                };
                if self.peers[i].gen != gen {
                    continue; // a replaced peer's old QPs
                }
                match kind {
                    KIND_DATA => self.on_data(i, seq, &wc),
                    KIND_CTRL_SEND => self.on_ctrl_send(i, seq, &wc),
                    KIND_CTRL_RECV => self.on_recv(i, seq as usize, &wc),
                    _ => {}
                }
            }
            if n < self.wcs.len() {
                break;
            }
        }
    }

    fn on_data(&mut self, i: usize, seq: u64, wc: &WorkCompletion) {
        let peer = &mut self.peers[i];
        while let Some(&p) = peer.pending.front() {
            if p.seq > seq && !same_seq(p.seq, seq) {
                break;
            }
            peer.pending.pop_front();
            peer.stage_tail = p.stage_end;
            if same_seq(p.seq, seq) && !wc.ok() {
                let err = wc_to_fabric(wc.status, matches!(p.op, Op::Write), peer.id);
                self.events
                    .push_back(Self::completion(peer, p, Err(err.clone())));
                // The QP is in the error state: everything behind fails too.
                Self::fail_data(peer, &mut self.events, err);
                return;
            }
            self.events.push_back(Self::completion(peer, p, Ok(())));
            if same_seq(p.seq, seq) {
                break;
            }
        }
        if peer.pending.is_empty() {
            peer.stage_tail = peer.stage_head;
        }
    }

    fn on_ctrl_send(&mut self, i: usize, seq: u64, wc: &WorkCompletion) {
        let peer = &mut self.peers[i];
        peer.ctrl_done = peer.ctrl_done.max(seq);
        if wc.ok() {
            peer.ctrl_last_done = Instant::now();
        }
        while let Some(&(s, token)) = peer.ctrl_writes.front() {
            if s > seq {
                break;
            }
            peer.ctrl_writes.pop_front();
            let result = if s == seq && !wc.ok() {
                peer.counters.add(peer.id, |c| &c.failed_operations, 1);
                Err(wc_to_fabric(wc.status, true, peer.id))
            } else {
                Ok(())
            };
            self.events
                .push_back(FabricEvent::Completion(Completion::Write {
                    peer: peer.id,
                    token,
                    result,
                }));
        }
        if !wc.ok() && peer.ctrl_broken.is_none() {
            peer.ctrl_broken = Some(wc_to_fabric(wc.status, false, peer.id));
        }
    }

    fn on_recv(&mut self, i: usize, slot: usize, wc: &WorkCompletion) {
        if !wc.ok() {
            let peer = &mut self.peers[i];
            if peer.ctrl_broken.is_none() {
                peer.ctrl_broken = Some(FabricError::Disconnected(peer.id));
            }
            return;
        }
        let mut complete = None;
        {
            let peer = &mut self.peers[i];
            let len = (wc.byte_len as usize).min(FRAG);
            peer.counters
                .add(peer.id, |c| &c.received_bytes, len as u64);
            let mut hdr = [0u8; FRAG_HDR];
            if len >= FRAG_HDR && peer.recv_buf.copy_out(slot * FRAG, &mut hdr).is_ok() {
                let total = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
                if hdr[1] & FLAG_FIRST != 0 {
                    peer.reasm.clear();
                    peer.reasm_kind = hdr[0];
                    peer.reasm_total = total.min(MAX_CONTROL);
                }
                let at = peer.reasm.len();
                let chunk = len - FRAG_HDR;
                if at + chunk <= peer.reasm_total {
                    peer.reasm.resize(at + chunk, 0);
                    let _ = peer
                        .recv_buf
                        .copy_out(slot * FRAG + FRAG_HDR, &mut peer.reasm[at..]);
                }
                if peer.reasm.len() == peer.reasm_total {
                    complete = Some((peer.reasm_kind, std::mem::take(&mut peer.reasm)));
                    peer.reasm = Vec::new();
                    peer.reasm_total = usize::MAX;
                }
            }
            // Repost the buffer.
            let id = wr_id(KIND_CTRL_RECV, peer.id, peer.gen, slot as u64);
            if peer
                .recv_list
                .recv(id, &peer.recv_buf, slot * FRAG, FRAG)
                .is_err()
                || peer.ctrl.post_recv(&mut peer.recv_list).is_err()
            {
                peer.ctrl_broken = Some(FabricError::Disconnected(peer.id));
            }
        }
        if let Some((kind, bytes)) = complete {
            match kind {
                MSG_USER => self.events.push_back(FabricEvent::Message {
                    from: self.peers[i].id,
                    bytes,
                }),
                MSG_RECONNECT if bytes.len() == 4 => {
                    let epoch = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                    if self.reconnect_data(i, epoch).is_ok() {
                        let _ = self.send_ctrl(i, MSG_RECONNECT_ACK, &epoch.to_le_bytes());
                    }
                }
                MSG_RECONNECT_ACK if bytes.len() == 4 => {
                    let epoch = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                    let peer = &self.peers[i];
                    if peer.reconnecting
                        && epoch == peer.reconnect_epoch
                        && self.reconnect_data(i, epoch).is_ok()
                    {
                        let peer = &mut self.peers[i];
                        peer.reconnecting = false;
                        peer.broken = None;
                    }
                }
                _ => {}
            }
        }
    }

    /// Resets our data QP to peer `i` and reconnects it with the PSNs of `epoch`, keeping
    /// the peer's current write permission. Outstanding requests on it fail.
    fn reconnect_data(&mut self, i: usize, epoch: u32) -> Result<(), FabricError> {
        let writer = self.writer;
        let (node, path, mtu) = (self.node, self.path, self.mtu);
        let peer = &mut self.peers[i];
        Self::fail_data(peer, &mut self.events, FabricError::Disconnected(peer.id));
        peer.data.reset().map_err(fe)?;
        let access = Access {
            local_write: false,
            remote_write: writer == Some(peer.id),
            remote_read: true,
        };
        let r = peer.remote;
        let remote = Endpoint {
            qpn: r.data_qpn,
            psn: psn(peer.id, node, epoch, false),
            gid: r.gid,
        };
        peer.data
            .connect(
                psn(node, peer.id, epoch, false),
                &remote,
                access,
                &path,
                mtu.min(r.mtu),
            )
            .map_err(fe)?;
        peer.reconnect_epoch = epoch;
        peer.broken = None;
        peer.counters.add(peer.id, |c| &c.reconnects, 1);
        Ok(())
    }

    /// Brings a data QP that failed (for instance after this node was fenced) back:
    /// asks the peer to reset its end, then resets ours. Completes asynchronously; `write`
    /// keeps returning the old error until then.
    pub fn reconnect(&mut self, peer: NodeId) -> Result<(), FabricError> {
        let i = self.peer_index(peer)?;
        if self.peers[i].broken.is_none() || self.peers[i].reconnecting {
            return Ok(());
        }
        let epoch = self.peers[i].reconnect_epoch.wrapping_add(1);
        self.peers[i].reconnect_epoch = epoch;
        self.peers[i].reconnecting = true;
        self.send_ctrl(i, MSG_RECONNECT, &epoch.to_le_bytes())
    }

    /// The error that broke the data QP to `peer`, if any.
    pub fn data_error(&self, peer: NodeId) -> Option<FabricError> {
        self.peer_index(peer)
            .ok()
            .and_then(|i| self.peers[i].broken.clone())
    }
}

impl Drop for RdmaFabric {
    fn drop(&mut self) {
        self.stop_listener.store(true, Ordering::Release);
    }
}

impl RdmaFabric {
    /// The fabric's per-peer counters (also published through [`Fabric::counters`]).
    pub fn rdma_counters(&self) -> Arc<RdmaCounters> {
        self.shared.counters.clone()
    }

    /// `Fabric::write` before its counting.
    fn write_to(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError> {
        let i = self.peer_index(peer)?;
        let rlen = self.peers[i].remote.region_len as usize;
        match layout::classify_remote_write(self.node, offset, data.len(), rlen) {
            Ok(WriteTarget::OwnProgress) => self.write_progress(i, offset, data, token),
            Ok(WriteTarget::Ring) => {
                let r = &self.peers[i].remote;
                let remote = if offset >= layout::RING_OFFSET {
                    Remote {
                        addr: r.ring_addr + (offset - layout::RING_OFFSET) as u64,
                        rkey: r.ring_rkey,
                    }
                } else {
                    Remote {
                        addr: r.commit_addr + (offset - layout::COMMIT_CELL_OFFSET) as u64,
                        rkey: r.commit_rkey,
                    }
                };
                self.push_data(i, Op::Write, token, remote, Some(data), data.len())
            }
            Err(_) => Err(FabricError::OutOfBounds(peer)),
        }
    }

    /// `Fabric::read` before its counting.
    fn read_from(
        &mut self,
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), FabricError> {
        let i = self.peer_index(peer)?;
        let r = self.peers[i].remote;
        match offset.checked_add(len) {
            Some(end) if end <= r.region_len as usize && len > 0 => {}
            _ => return Err(FabricError::OutOfBounds(peer)),
        }
        let remote = Remote {
            addr: r.read_addr + offset as u64,
            rkey: r.read_rkey,
        };
        self.push_data(i, Op::Read, token, remote, None, len)
    }
}

impl Fabric for RdmaFabric {
    fn node(&self) -> NodeId {
        self.node
    }
    fn region(&self) -> &Arc<Region> {
        &self.region
    }

    fn write(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError> {
        let r = self.write_to(peer, offset, data, token);
        self.shared.counters.note(peer, &r);
        r
    }

    fn read(
        &mut self,
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), FabricError> {
        let r = self.read_from(peer, offset, len, token);
        self.shared.counters.note(peer, &r);
        r
    }

    fn send(&mut self, peer: NodeId, msg: &[u8]) -> Result<(), FabricError> {
        if msg.len() > MAX_CONTROL {
            return Err(FabricError::TooLarge {
                len: msg.len(),
                max: MAX_CONTROL,
            });
        }
        let i = self.peer_index(peer)?;
        let r = self.send_ctrl(i, MSG_USER, msg);
        self.shared.counters.note(peer, &r);
        r
    }

    fn counters(&self) -> Option<Arc<dyn FabricCounters>> {
        Some(self.shared.counters.clone())
    }

    fn flush(&mut self) -> Result<(), FabricError> {
        for i in 0..self.peers.len() {
            self.flush_peer(i);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        self.maintain();
        self.progress();
        for p in &self.peers {
            let up = p.broken.is_none() && p.ctrl_broken.is_none();
            p.counters.set_connected(p.id, up);
        }
        let n = self.events.len();
        out.extend(self.events.drain(..));
        n
    }
    fn set_writer(&mut self, writer: Option<NodeId>) -> Result<(), FabricError> {
        // `Some(self)`: this node leads, so no peer may write its ring.
        match writer {
            Some(w) if w != self.node => {
                self.peer_index(w)?;
            }
            _ => {}
        }
        self.writer = writer;
        let mut first_err = None;
        for i in 0..self.peers.len() {
            let peer = &mut self.peers[i];
            let access = Access {
                local_write: false,
                remote_write: writer == Some(peer.id),
                remote_read: true,
            };
            if peer.data.access() == access {
                continue;
            }
            if peer.data.set_access(access).is_err() {
                // Fallback: a QP that cannot change its flags (or is not in RTS) is reset;
                // the peer's writes then fail until it reconnects (which applies `access`).
                if let Err(e) = peer.data.reset() {
                    first_err.get_or_insert(fe(e));
                }
                Self::fail_data(peer, &mut self.events, FabricError::Disconnected(peer.id));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters as an exporter reads them (no device needed: the fabric's paths that
    /// update them run only on RDMA, in the Soft-RoCE guest).
    #[test]
    fn counters_read_back_per_peer_through_fabric_counters() {
        let refused = Arc::new(AtomicU64::new(0));
        let c = RdmaCounters::new(refused.clone());
        c.add(1, |c| &c.sent_bytes, 100);
        c.add(1, |c| &c.sent_bytes, 28);
        c.add(1, |c| &c.received_bytes, 64);
        c.add(2, |c| &c.disconnects, 1);
        c.add(2, |c| &c.failed_operations, 3);
        c.add(2, |c| &c.reconnects, 1);
        c.set_connected(1, true);
        c.note(2, &Err(FabricError::Busy));
        c.note(2, &Err(FabricError::Disconnected(2)));
        c.note(2, &Ok(()));
        // An id past the table is ignored, and reads as zero.
        c.add(200, |c| &c.sent_bytes, 1);
        refused.fetch_add(2, Ordering::Relaxed);

        let f: Arc<dyn FabricCounters> = Arc::new(c);
        assert_eq!(f.name(), "rdma");
        assert_eq!(
            f.peer(1),
            FabricPeerCounters {
                connected: true,
                sent_bytes: 128,
                received_bytes: 64,
                ..FabricPeerCounters::default()
            }
        );
        assert_eq!(
            f.peer(2),
            FabricPeerCounters {
                connected: false,
                disconnects: 1,
                failed_operations: 3,
                reconnects: 1,
                busy: 1,
                ..FabricPeerCounters::default()
            }
        );
        assert_eq!(f.peer(200), FabricPeerCounters::default());
        assert_eq!(f.refused_handshakes(), 2);
    }
}
