//! The replica's metrics and health endpoint (`--metrics-addr`): `GET /metrics` in the
//! Prometheus (OpenMetrics) text format and `GET /health`, 200 only with a known leader
//! and nothing stuck. The metrics are read at scrape time from what the replica already
//! publishes (its [`Handle`]'s status and [`ballot::metrics::Metrics`] atomics, the TCP
//! fabric's counters): the replica thread pays nothing for a scrape. The list, with each
//! metric's meaning, is in docs/operations.md.

use crate::error::NodeError;
use ballot::metrics::HistogramSnapshot;
use ballot::runtime::{Handle, Role, Status};
use ballot_tcp::StatsReader;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
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
    /// The TCP fabric's counters (`None` with the RDMA fabric, which keeps none).
    pub fabric: Option<StatsReader>,
    /// The other replicas' ids.
    pub peers: Vec<u8>,
    pub durable: bool,
    /// Client connections open now.
    pub clients: Arc<AtomicU64>,
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

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
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

/// One metric per peer: `f` gives the value for a peer.
fn per_peer(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    peers: &[u8],
    f: impl Fn(u8) -> u64,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for &p in peers {
        let labels = [("peer", p.to_string())];
        let mut fam = m.encode_family(&labels)?;
        if matches!(kind, MetricType::Counter) {
            fam.encode_counter::<NoLabelSet, _, u64>(&f(p), None)?;
        } else {
            fam.encode_gauge(&f(p))?;
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Exporter(Sources);

impl Collector for Exporter {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let st = s.handle.status();
        let m = s.handle.metrics();
        let e = &mut e;
        {
            let mut r = e.encode_descriptor(
                "ballot_role",
                "1 for the role this replica is in, 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for role in ROLES {
                let labels = [("role", role.name())];
                r.encode_family(&labels)?
                    .encode_gauge(&u64::from(st.role == role))?;
            }
        }
        let ok = health(&st, s.handle.storage_failed()).is_ok();
        gauge(
            e,
            "ballot_health",
            "1 when /health answers 200",
            i64::from(ok),
        )?;
        gauge(e, "ballot_node", "This replica's id", i64::from(st.node))?;
        gauge(
            e,
            "ballot_leader",
            "The replica this one believes leads (-1: none known)",
            st.leader_hint.map_or(-1, i64::from),
        )?;
        gauge(
            e,
            "ballot_ballot",
            "Highest ballot promised (round << 8 | node)",
            st.ballot as i64,
        )?;
        gauge(
            e,
            "ballot_ballot_round",
            "Round of the highest ballot promised",
            (st.ballot >> 8) as i64,
        )?;
        counter(
            e,
            "ballot_leader_changes",
            "Times a different leader was seen (or this replica became one)",
            m.leader_changes.get(),
        )?;
        gauge(
            e,
            "ballot_commit_index",
            "Highest log index known committed",
            st.commit as i64,
        )?;
        gauge(
            e,
            "ballot_applied_index",
            "Highest log index applied to the state machine",
            st.applied as i64,
        )?;
        counter(
            e,
            "ballot_commits",
            "Proposals made on this replica that committed and applied",
            m.commits.get(),
        )?;
        counter(
            e,
            "ballot_applied_commands",
            "Commands applied by the state machine since start",
            st.applied_commands,
        )?;
        histogram(e, "ballot_commit_latency_seconds", "Proposal accepted by the replica thread to committed and applied here (this replica's proposals)", &m.commit_latency.snapshot())?;
        histogram(
            e,
            "ballot_apply_latency_seconds",
            "State machine time to apply one log entry (a batch of commands)",
            &m.apply_latency.snapshot(),
        )?;
        if s.durable {
            histogram(
                e,
                "ballot_fsync_latency_seconds",
                "One fdatasync of the log by the persister (a group of entries)",
                &m.fsync_latency.snapshot(),
            )?;
        }
        counter(
            e,
            "ballot_storage_errors",
            "Storage failures",
            m.storage_errors.get(),
        )?;
        gauge(
            e,
            "ballot_storage_failed",
            "1 once the replica stopped acknowledging after a storage failure",
            m.storage_failed.get() as i64,
        )?;
        gauge(
            e,
            "ballot_log_base_index",
            "Entries up to here are compacted into a checkpoint",
            st.log_base as i64,
        )?;
        gauge(
            e,
            "ballot_checkpoint_index",
            "Index of the newest checkpoint kept (0: none)",
            st.checkpoint as i64,
        )?;
        counter(
            e,
            "ballot_checkpoints_taken",
            "Checkpoints taken here",
            m.checkpoints_taken.get(),
        )?;
        counter(
            e,
            "ballot_checkpoint_failures",
            "Checkpoints that failed to be taken or installed",
            m.checkpoint_failures.get(),
        )?;
        counter(
            e,
            "ballot_checkpoints_installed",
            "Checkpoints installed from another replica (catch-up)",
            st.checkpoints_installed,
        )?;
        counter(
            e,
            "ballot_checkpoint_served_bytes",
            "Checkpoint bytes sent to replicas catching up",
            m.checkpoint_bytes_served.get(),
        )?;
        gauge(
            e,
            "ballot_catchup_pulling",
            "1 while a checkpoint is being pulled from another replica",
            m.pulling.get() as i64,
        )?;
        gauge(
            e,
            "ballot_catchup_pull_index",
            "Index of the checkpoint being pulled (0: none, or not yet named)",
            m.pull_index.get() as i64,
        )?;
        gauge(
            e,
            "ballot_catchup_pull_bytes",
            "Bytes of the checkpoint being pulled received so far",
            m.pull_bytes.get() as i64,
        )?;
        counter(
            e,
            "ballot_bad_messages",
            "Control messages dropped because they did not decode",
            m.bad_messages.get(),
        )?;
        gauge(
            e,
            "ballot_client_connections",
            "Client connections open",
            s.clients.load(Ordering::Relaxed) as i64,
        )?;
        if let Some(f) = &s.fabric {
            encode_fabric(e, f, &s.peers)?;
        }
        Ok(())
    }
}

fn encode_fabric(e: &mut DescriptorEncoder, f: &StatsReader, peers: &[u8]) -> std::fmt::Result {
    use MetricType::{Counter, Gauge};
    per_peer(
        e,
        "ballot_fabric_peer_connected",
        "1 while the outbound connection to the peer is up",
        Gauge,
        peers,
        |p| u64::from(f.peer(p).connected),
    )?;
    per_peer(
        e,
        "ballot_fabric_sent_bytes",
        "Bytes written to the peer's connections",
        Counter,
        peers,
        |p| f.peer(p).bytes_sent,
    )?;
    per_peer(
        e,
        "ballot_fabric_received_bytes",
        "Bytes read from the peer's connections",
        Counter,
        peers,
        |p| f.peer(p).bytes_received,
    )?;
    per_peer(
        e,
        "ballot_fabric_disconnects",
        "Outbound connections to the peer lost",
        Counter,
        peers,
        |p| f.peer(p).disconnects,
    )?;
    per_peer(
        e,
        "ballot_fabric_dial_failures",
        "Dials to the peer that failed (unreachable or refused)",
        Counter,
        peers,
        |p| f.peer(p).dial_failures,
    )?;
    let t = f.snapshot();
    counter(
        e,
        "ballot_fabric_refused_handshakes",
        "Handshakes refused, either side (wrong key, cluster or id; too many connections)",
        t.refused_handshakes,
    )?;
    counter(
        e,
        "ballot_fabric_refused_frames",
        "Malformed, unexpected or out-of-bounds frames (connection closed)",
        t.refused_frames,
    )?;
    counter(
        e,
        "ballot_fabric_denied_writes",
        "Ring writes refused for lack of write permission",
        t.denied_writes,
    )?;
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
