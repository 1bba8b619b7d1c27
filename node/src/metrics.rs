//! The replica's metrics and health endpoint (`--metrics-addr`): `GET /metrics` in the
//! Prometheus (OpenMetrics) text format and `GET /health`, 200 only with a known leader
//! and nothing stuck. The metrics are read at scrape time from what the replica already
//! publishes (its [`Handle`]'s status and [`ballot::metrics::Metrics`] atomics, the TCP
//! fabric's counters, the RDMA fabric's through [`ballot::metrics::FabricCounters`]): the
//! replica thread pays nothing for a scrape. The list, with each
//! metric's meaning, is in docs/operations.md.

use crate::error::NodeError;
use ballot::metrics::{FabricCounters, FabricPeerCounters, Histogram, HistogramSnapshot, Metrics};
use ballot::runtime::{Handle, Role, Status};
use ballot_tcp::{PeerStats, Stats as TcpStats, StatsReader};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Every role a replica can be in, for the `ballot_role` gauge.
const ROLES: [Role; 5] = [
    Role::Leader,
    Role::Follower,
    Role::Candidate,
    Role::Recovering,
    Role::Stopped,
];

/// What the exporter reads.
#[derive(Clone)]
pub struct Sources {
    pub handle: Handle,
    /// The TCP fabric's counters (`None` with the RDMA fabric, whose counters the replica
    /// publishes in its `Metrics::fabric`).
    pub fabric: Option<StatsReader>,
    /// The other replicas' ids.
    pub peers: Vec<u8>,
    pub durable: bool,
    /// Client connections open now.
    pub clients: Arc<AtomicU64>,
    /// What the state machine last published (its session count).
    pub state: Arc<crate::kv::DigestCell>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("node", &self.handle.status().node)
            .finish_non_exhaustive()
    }
}

/// Whether the replica is fit to serve: `Ok` with a one-line summary, or `Err` with the
/// reason it is not (no known leader, recovering, storage failed, stopped).
pub fn health(st: &Status, storage_failed: bool) -> Result<String, String> {
    if storage_failed {
        return Err("storage failed: this replica no longer acknowledges".into());
    }
    match st.role {
        Role::Recovering => return Err("recovering: rebuilding its state from a majority".into()),
        Role::Stopped => return Err("stopped".into()),
        _ => {}
    }
    match st.leader_hint {
        Some(l) => Ok(format!(
            "ok: {}, leader {l}, commit {} applied {}",
            st.role.name(),
            st.commit,
            st.applied
        )),
        None => Err(format!(
            "no known leader (this replica is {})",
            st.role.name()
        )),
    }
}

/// Counter or gauge.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// What a scalar metric reads: the replica's status, its measurements, the node's own
/// counters.
struct View<'a> {
    st: &'a Status,
    m: &'a Metrics,
    healthy: bool,
    clients: u64,
    sessions: u64,
}

/// A metric of a table: name (counters get `_total` from the encoder), help, kind, and how
/// to read it from a `T`.
type Row<T, V> = (&'static str, &'static str, Kind, fn(&T) -> V);

/// A scalar of the replica (a `Row` over any `View`).
type ScalarRow = (&'static str, &'static str, Kind, fn(&View<'_>) -> i64);

/// A latency histogram: name, help, which one, whether it exists in durable mode only.
type HistogramRow = (&'static str, &'static str, fn(&Metrics) -> &Histogram, bool);

/// Every scalar metric of the replica. docs/operations.md lists them with their meaning.
#[rustfmt::skip]
const SCALARS: &[ScalarRow] = &[
    ("ballot_health", "1 when /health answers 200", Kind::Gauge, |v| i64::from(v.healthy)),
    ("ballot_node", "This replica's id", Kind::Gauge, |v| i64::from(v.st.node)),
    ("ballot_leader", "The replica this one believes leads (-1: none known)", Kind::Gauge,
        |v| v.st.leader_hint.map_or(-1, i64::from)),
    ("ballot_ballot", "Highest ballot promised (round << 8 | node)", Kind::Gauge,
        |v| v.st.ballot as i64),
    ("ballot_ballot_round", "Round of the highest ballot promised", Kind::Gauge,
        |v| (v.st.ballot >> 8) as i64),
    ("ballot_leader_changes", "Times a different leader was seen (or this replica became one)",
        Kind::Counter, |v| v.m.leader_changes.get() as i64),
    ("ballot_commit_index", "Highest log index known committed", Kind::Gauge,
        |v| v.st.commit as i64),
    ("ballot_applied_index", "Highest log index applied to the state machine", Kind::Gauge,
        |v| v.st.applied as i64),
    ("ballot_commits", "Proposals made on this replica that committed and applied",
        Kind::Counter, |v| v.m.commits.get() as i64),
    ("ballot_applied_commands", "Commands applied by the state machine since start",
        Kind::Counter, |v| v.st.applied_commands as i64),
    ("ballot_storage_errors", "Storage failures", Kind::Counter,
        |v| v.m.storage_errors.get() as i64),
    ("ballot_storage_failed", "1 once the replica stopped acknowledging after a storage failure",
        Kind::Gauge, |v| v.m.storage_failed.get() as i64),
    ("ballot_log_base_index", "Entries up to here are compacted into a checkpoint", Kind::Gauge,
        |v| v.st.log_base as i64),
    ("ballot_checkpoint_index", "Index of the newest checkpoint kept (0: none)", Kind::Gauge,
        |v| v.st.checkpoint as i64),
    ("ballot_checkpoints_taken", "Checkpoints taken here", Kind::Counter,
        |v| v.m.checkpoints_taken.get() as i64),
    ("ballot_checkpoint_failures", "Checkpoints that failed to be taken or installed",
        Kind::Counter, |v| v.m.checkpoint_failures.get() as i64),
    ("ballot_checkpoints_installed", "Checkpoints installed from another replica (catch-up)",
        Kind::Counter, |v| v.st.checkpoints_installed as i64),
    ("ballot_checkpoint_served_bytes", "Checkpoint bytes sent to replicas catching up",
        Kind::Counter, |v| v.m.checkpoint_bytes_served.get() as i64),
    ("ballot_catchup_pulling", "1 while a checkpoint is being pulled from another replica",
        Kind::Gauge, |v| v.m.pulling.get() as i64),
    ("ballot_catchup_pull_index", "Index of the checkpoint being pulled (0: none, or not yet named)",
        Kind::Gauge, |v| v.m.pull_index.get() as i64),
    ("ballot_catchup_pull_bytes", "Bytes of the checkpoint being pulled received so far",
        Kind::Gauge, |v| v.m.pull_bytes.get() as i64),
    ("ballot_bad_messages", "Control messages dropped because they did not decode",
        Kind::Counter, |v| v.m.bad_messages.get() as i64),
    ("ballot_client_connections", "Client connections open", Kind::Gauge,
        |v| v.clients as i64),
    ("ballot_client_sessions", "Client sessions in the replicated table (registered through the log, expired by log index)",
        Kind::Gauge, |v| v.sessions as i64),
];

/// The latency histograms.
#[rustfmt::skip]
const HISTOGRAMS: &[HistogramRow] = &[
    ("ballot_commit_latency_seconds",
        "Proposal accepted by the replica thread to committed and applied here (this replica's proposals)",
        |m| &m.commit_latency, false),
    ("ballot_apply_latency_seconds",
        "State machine time to apply one log entry (a batch of commands)",
        |m| &m.apply_latency, false),
    ("ballot_fsync_latency_seconds",
        "One fdatasync of the log by the persister (a group of entries)",
        |m| &m.fsync_latency, true),
];

/// The TCP fabric's metrics per peer (label `peer`).
#[rustfmt::skip]
const PER_PEER: &[Row<PeerStats, u64>] = &[
    ("ballot_fabric_peer_connected", "1 while the outbound connection to the peer is up",
        Kind::Gauge, |p| u64::from(p.connected)),
    ("ballot_fabric_sent_bytes", "Bytes written to the peer's connections", Kind::Counter,
        |p| p.bytes_sent),
    ("ballot_fabric_received_bytes", "Bytes read from the peer's connections", Kind::Counter,
        |p| p.bytes_received),
    ("ballot_fabric_disconnects", "Outbound connections to the peer lost", Kind::Counter,
        |p| p.disconnects),
    ("ballot_fabric_dial_failures", "Dials to the peer that failed (unreachable or refused)",
        Kind::Counter, |p| p.dial_failures),
];

/// The TCP fabric's counters over all peers.
#[rustfmt::skip]
const FABRIC: &[Row<TcpStats, u64>] = &[
    ("ballot_fabric_refused_handshakes",
        "Handshakes refused, either side (wrong key, cluster or id; too many connections)",
        Kind::Counter, |t| t.refused_handshakes),
    ("ballot_fabric_refused_frames",
        "Malformed, unexpected or out-of-bounds frames (connection closed)",
        Kind::Counter, |t| t.refused_frames),
    ("ballot_fabric_denied_writes", "Ring writes refused for lack of write permission",
        Kind::Counter, |t| t.denied_writes),
];

/// The per-peer counters of a fabric that publishes them through the engine
/// ([`FabricCounters`]: the RDMA fabric), named like the TCP fabric's where they mean the
/// same (label `peer`).
#[rustfmt::skip]
const ENGINE_PER_PEER: &[Row<FabricPeerCounters, u64>] = &[
    ("ballot_fabric_peer_connected", "1 while the connection (RDMA: data and control QPs) to the peer is up",
        Kind::Gauge, |p| u64::from(p.connected)),
    ("ballot_fabric_sent_bytes", "Bytes posted to the peer (RDMA: one-sided WRITEs and control messages)",
        Kind::Counter, |p| p.sent_bytes),
    ("ballot_fabric_received_bytes",
        "Bytes received from the peer (RDMA: control messages and READ responses; its one-sided writes are not seen)",
        Kind::Counter, |p| p.received_bytes),
    ("ballot_fabric_disconnects", "Times the connection (RDMA: the data QP) to the peer broke",
        Kind::Counter, |p| p.disconnects),
    ("ballot_fabric_failed_operations", "Operations to the peer completed with an error",
        Kind::Counter, |p| p.failed_operations),
    ("ballot_fabric_reconnects",
        "Times the connection to the peer was re-established (RDMA: data QP reconnect, or the peer re-bootstrapped)",
        Kind::Counter, |p| p.reconnects),
    ("ballot_fabric_busy_posts", "Posts to the peer refused because its queue or staging buffer was full",
        Kind::Counter, |p| p.busy),
];

/// Writes one sample of a counter or gauge (after its descriptor, or a label set).
fn sample(m: &mut MetricEncoder, kind: Kind, v: i64) -> std::fmt::Result {
    match kind {
        Kind::Counter => m.encode_counter::<NoLabelSet, _, u64>(&v.max(0).unsigned_abs(), None),
        Kind::Gauge => m.encode_gauge(&v),
    }
}

fn descriptor<'a>(
    e: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: Kind,
) -> Result<MetricEncoder<'a>, std::fmt::Error> {
    let t = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
    };
    e.encode_descriptor(name, help, None, t)
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    // The encoder writes `le="+Inf"` for `f64::MAX`.
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|&(b, n)| (if b.is_finite() { b } else { f64::MAX }, n))
        .collect();
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)
}

#[derive(Debug)]
struct Exporter(Sources);

impl Collector for Exporter {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let st = s.handle.status();
        let m = s.handle.metrics();
        let mut roles = e.encode_descriptor(
            "ballot_role",
            "1 for the role this replica is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for role in ROLES {
            let labels = [("role", role.name())];
            roles
                .encode_family(&labels)?
                .encode_gauge(&u64::from(st.role == role))?;
        }
        let view = View {
            st: &st,
            m,
            healthy: health(&st, s.handle.storage_failed()).is_ok(),
            clients: s.clients.load(Ordering::Relaxed),
            sessions: s.state.get().sessions,
        };
        for (name, help, kind, read) in SCALARS {
            sample(
                &mut descriptor(&mut e, name, help, *kind)?,
                *kind,
                read(&view),
            )?;
        }
        for (name, help, which, durable_only) in HISTOGRAMS {
            if s.durable || !durable_only {
                histogram(&mut e, name, help, &which(m).snapshot())?;
            }
        }
        encode_credit_stalls(&mut e, m, &s.peers)?;
        if let Some(f) = &s.fabric {
            encode_fabric(&mut e, f, &s.peers)?;
        } else if let Some(f) = m.fabric.get() {
            encode_fabric_counters(&mut e, f.as_ref(), &s.peers)?;
        }
        Ok(())
    }
}

fn encode_credit_stalls(e: &mut DescriptorEncoder, m: &Metrics, peers: &[u8]) -> std::fmt::Result {
    let mut d = descriptor(
        e,
        "ballot_ring_credit_stalls",
        "Leader: times replication to the peer stalled because its ring had no room for the next entry (flow-control credit), counted once per stall",
        Kind::Counter,
    )?;
    for &p in peers {
        let v = m.ring_credit_stalls.get(p as usize).map_or(0, |c| c.get());
        let labels = [("peer", p.to_string())];
        sample(&mut d.encode_family(&labels)?, Kind::Counter, v as i64)?;
    }
    Ok(())
}

/// The counters of a fabric that publishes them through the engine (the RDMA fabric).
fn encode_fabric_counters(
    e: &mut DescriptorEncoder,
    f: &dyn FabricCounters,
    peers: &[u8],
) -> std::fmt::Result {
    let stats: Vec<(u8, FabricPeerCounters)> = peers.iter().map(|&p| (p, f.peer(p))).collect();
    for (name, help, kind, read) in ENGINE_PER_PEER {
        let mut d = descriptor(e, name, help, *kind)?;
        for (p, ps) in &stats {
            let labels = [("peer", p.to_string())];
            sample(&mut d.encode_family(&labels)?, *kind, read(ps) as i64)?;
        }
    }
    sample(
        &mut descriptor(
            e,
            "ballot_fabric_refused_handshakes",
            "Handshakes refused, either side (wrong key, cluster or id; too many connections)",
            Kind::Counter,
        )?,
        Kind::Counter,
        f.refused_handshakes() as i64,
    )
}

fn encode_fabric(e: &mut DescriptorEncoder, f: &StatsReader, peers: &[u8]) -> std::fmt::Result {
    let stats: Vec<(u8, PeerStats)> = peers.iter().map(|&p| (p, f.peer(p))).collect();
    for (name, help, kind, read) in PER_PEER {
        let mut d = descriptor(e, name, help, *kind)?;
        for (p, ps) in &stats {
            let labels = [("peer", p.to_string())];
            sample(&mut d.encode_family(&labels)?, *kind, read(ps) as i64)?;
        }
    }
    let t = f.snapshot();
    for (name, help, kind, read) in FABRIC {
        sample(
            &mut descriptor(e, name, help, *kind)?,
            *kind,
            read(&t) as i64,
        )?;
    }
    Ok(())
}

/// The metrics text of one scrape.
pub fn render(sources: &Sources) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Exporter(sources.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// The metrics endpoint, bound (so that a busy port fails the start before the data dir is
/// touched) but not serving yet.
pub struct Endpoint {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl Endpoint {
    /// Serves HTTP on `listener` (bound by the caller, so that a busy port fails the start
    /// early).
    pub fn new(listener: std::net::TcpListener) -> Result<Endpoint, NodeError> {
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::io("metrics listener", e))?;
        let server = tiny_http::Server::from_listener(listener, None).map_err(|e| {
            NodeError::io(
                format!("cannot serve metrics on {addr}"),
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Endpoint { server, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves on a thread of its own until `stop` is set.
    pub fn serve(
        self,
        sources: Sources,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, NodeError> {
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match self.server.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(req)) => answer(req, &sources),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics endpoint");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| NodeError::io("cannot start the metrics thread", e))
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn answer(req: tiny_http::Request, sources: &Sources) {
    let path = req.url().split('?').next().unwrap_or("");
    let get = *req.method() == tiny_http::Method::Get || *req.method() == tiny_http::Method::Head;
    let (code, body, ctype) = match path {
        _ if !get => (405, "only GET\n".to_string(), "text/plain; charset=utf-8"),
        "/metrics" => (
            200,
            render(sources),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/health" => match health(&sources.handle.status(), sources.handle.storage_failed()) {
            Ok(s) => (200, s + "\n", "text/plain; charset=utf-8"),
            Err(s) => (503, s + "\n", "text/plain; charset=utf-8"),
        },
        _ => (
            404,
            "not found: try /metrics or /health\n".to_string(),
            "text/plain; charset=utf-8",
        ),
    };
    let resp = tiny_http::Response::from_string(body)
        .with_status_code(code)
        .with_header(header("Content-Type", ctype));
    if let Err(e) = req.respond(resp) {
        tracing::debug!(error = %e, "metrics endpoint: cannot answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(role: Role, leader: Option<u8>) -> Status {
        Status {
            node: 1,
            role,
            ballot: 0x105,
            commit: 9,
            applied: 8,
            leader_hint: leader,
            applied_commands: 7,
            log_base: 0,
            checkpoint: 0,
            checkpoints_installed: 0,
        }
    }

    /// A fabric publishing its counters through the engine, as the RDMA fabric does.
    #[derive(Debug)]
    struct Fake;
    impl FabricCounters for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn peer(&self, peer: u8) -> FabricPeerCounters {
            FabricPeerCounters {
                connected: peer == 1,
                sent_bytes: 1000 + u64::from(peer),
                received_bytes: 7,
                disconnects: 2,
                failed_operations: 3,
                reconnects: 4,
                busy: 5,
            }
        }
        fn refused_handshakes(&self) -> u64 {
            9
        }
    }

    struct Collect(Box<dyn Fn(&mut DescriptorEncoder) -> std::fmt::Result + Send + Sync>);
    impl std::fmt::Debug for Collect {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Collect")
        }
    }
    impl Collector for Collect {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            (self.0)(&mut e)
        }
    }
    fn text(c: Collect) -> String {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn engine_fabric_counters_are_exported_per_peer() {
        let t = text(Collect(Box::new(|e| {
            encode_fabric_counters(e, &Fake, &[1, 2])
        })));
        for line in [
            r#"ballot_fabric_peer_connected{peer="1"} 1"#,
            r#"ballot_fabric_peer_connected{peer="2"} 0"#,
            r#"ballot_fabric_sent_bytes_total{peer="2"} 1002"#,
            r#"ballot_fabric_received_bytes_total{peer="1"} 7"#,
            r#"ballot_fabric_disconnects_total{peer="1"} 2"#,
            r#"ballot_fabric_failed_operations_total{peer="1"} 3"#,
            r#"ballot_fabric_reconnects_total{peer="2"} 4"#,
            r#"ballot_fabric_busy_posts_total{peer="2"} 5"#,
            "ballot_fabric_refused_handshakes_total 9",
        ] {
            assert!(t.contains(line), "{line} missing from:\n{t}");
        }
        // The RDMA fabric's own counters, as a fresh fabric has them.
        let rdma = ballot_verbs::RdmaCounters::default();
        let t = text(Collect(Box::new(move |e| {
            encode_fabric_counters(e, &rdma, &[0])
        })));
        assert!(
            t.contains(r#"ballot_fabric_sent_bytes_total{peer="0"} 0"#),
            "{t}"
        );
    }

    #[test]
    fn credit_stalls_are_exported_per_peer() {
        let m = Metrics::default();
        m.ring_credit_stalls[2].add(3);
        let m = Arc::new(m);
        let t = text(Collect(Box::new(move |e| {
            encode_credit_stalls(e, &m, &[0, 2])
        })));
        assert!(
            t.contains(r#"ballot_ring_credit_stalls_total{peer="0"} 0"#),
            "{t}"
        );
        assert!(
            t.contains(r#"ballot_ring_credit_stalls_total{peer="2"} 3"#),
            "{t}"
        );
    }

    #[test]
    fn health_needs_a_leader_and_nothing_stuck() {
        assert!(health(&st(Role::Follower, Some(0)), false).is_ok());
        assert!(health(&st(Role::Leader, Some(1)), false).is_ok());
        let no = |s: Status, failed: bool| health(&s, failed).unwrap_err();
        assert!(no(st(Role::Candidate, None), false).contains("no known leader"));
        assert!(no(st(Role::Recovering, None), false).contains("recovering"));
        assert!(no(st(Role::Follower, Some(0)), true).contains("storage failed"));
        assert!(no(st(Role::Stopped, Some(0)), false).contains("stopped"));
    }
}
