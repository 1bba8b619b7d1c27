//! The fabric's own round trip with no protocol: one-sided WRITE of one entry's bytes (an
//! entry carrying one command of `payload` bytes) plus its completion, from node 0 to node
//! 1: two endpoints in this process, or (`--server`/`--connect`, see `remote`) on two
//! hosts, as perftest's `ib_write_lat` runs.

use crate::fabrics::{self, FabricKind, RdmaOpts};
use crate::load::{Measure, OutputOpts};
use crate::stats::{self, BenchResult};
use ballot::fabric::{Completion, Fabric, FabricEvent};
use ballot::layout::{self, RING_OFFSET};
use ballot::mem_fabric::MemFabric;
use ballot_tcp::TcpFabric;
use ballot_verbs::RdmaFabric;
use clap::Args;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone, Serialize)]
pub struct RawArgs {
    /// Fabric; default: rdma if a device is present (or `--rdma-device` is given), else
    /// tcp. Two hosts: tcp or rdma.
    #[arg(long, value_enum)]
    pub fabric: Option<FabricKind>,
    #[command(flatten)]
    pub measure: Measure,
    /// Round trips measured per size (perftest's `-n`), instead of `--duration`.
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Two hosts, this one the target: serve one `--connect` client's run, then exit.
    #[arg(long, conflicts_with = "connect")]
    pub server: bool,
    /// With `--server`: the control address to listen on.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:18515",
        requires = "server"
    )]
    pub listen: String,
    /// Two hosts, this one the writer: the `--server`'s control address. The results are
    /// printed here.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    #[command(flatten)]
    pub rdma: RdmaOpts,
    #[command(flatten)]
    pub out: OutputOpts,
}

/// When a size's measurement ends.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Time(Duration),
    Iterations(u64),
}

impl RawArgs {
    pub fn limit(&self) -> Limit {
        match self.iterations {
            Some(n) => Limit::Iterations(n),
            None => Limit::Time(self.measure.duration),
        }
    }
}

/// The bytes written for a `payload`-byte command: one entry carrying it.
pub fn entry_bytes(payload: usize) -> usize {
    layout::entry_size(payload + ballot::protocol::batch::COMMAND_OVERHEAD)
}

/// One WRITE of `data` to node 1 and its completion.
pub trait RoundTrip {
    fn round_trip(&mut self, data: &[u8], token: u64) -> Result<Duration, String>;
}

impl RoundTrip for TcpFabric {
    fn round_trip(&mut self, data: &[u8], _token: u64) -> Result<Duration, String> {
        self.time_write(1, RING_OFFSET, data, Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }
}

impl RoundTrip for MemFabric {
    fn round_trip(&mut self, data: &[u8], token: u64) -> Result<Duration, String> {
        poll_round_trip(self, data, token)
    }
}

impl RoundTrip for RdmaFabric {
    fn round_trip(&mut self, data: &[u8], token: u64) -> Result<Duration, String> {
        poll_round_trip(self, data, token)
    }
}

/// Both endpoints in this process: each size of `payloads` in turn.
pub fn run(
    kind: FabricKind,
    payloads: &[usize],
    warmup: Duration,
    limit: Limit,
    rdma: &RdmaOpts,
) -> Result<Vec<BenchResult>, String> {
    fabrics::tighten_timer_slack();
    let largest = payloads.iter().map(|&p| entry_bytes(p)).max().unwrap_or(0);
    let regions = fabrics::regions(2, fabrics::geometry(largest));
    match kind {
        FabricKind::Mem => {
            let mut f = fabrics::mem(regions);
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            measure_sizes(&mut f[0], kind, "threads", payloads, warmup, limit)
        }
        FabricKind::Tcp => {
            let mut f = fabrics::tcp(regions)?;
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            measure_sizes(&mut f[0], kind, "threads", payloads, warmup, limit)
        }
        FabricKind::Rdma => {
            let mut f = fabrics::rdma(regions, rdma)?;
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            measure_sizes(&mut f[0], kind, "threads", payloads, warmup, limit)
        }
    }
}

/// Measures each size of `payloads` on `w` (node 0 writing to node 1); stops after the
/// size being measured on Ctrl-C.
pub fn measure_sizes<W: RoundTrip>(
    w: &mut W,
    kind: FabricKind,
    topology: &'static str,
    payloads: &[usize],
    warmup: Duration,
    limit: Limit,
) -> Result<Vec<BenchResult>, String> {
    let mut out = Vec::new();
    for &payload in payloads {
        if crate::interrupt::requested() {
            break;
        }
        let size = entry_bytes(payload);
        let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let (h, n, secs, partial) = measure(warmup, limit, |tok| w.round_trip(&data, tok))?;
        if n == 0 {
            break;
        }
        let mut r = BenchResult {
            kind: "raw",
            fabric: kind.name().into(),
            topology,
            replicas: 2,
            payload,
            clients: 1,
            outstanding: 1,
            durability: "volatile",
            duration_s: secs,
            commits: n,
            throughput_ops_s: n as f64 / secs,
            partial,
            ..Default::default()
        };
        r.fill_latency(&h);
        out.push(r);
    }
    Ok(out)
}

/// Posts one WRITE to node 1 and busy-polls for its completion.
fn poll_round_trip<F: Fabric>(f: &mut F, data: &[u8], token: u64) -> Result<Duration, String> {
    let mut events = Vec::with_capacity(8);
    let t0 = Instant::now();
    f.write(1, RING_OFFSET, data, token)
        .map_err(|e| e.to_string())?;
    f.flush().map_err(|e| e.to_string())?;
    loop {
        f.poll(&mut events);
        for ev in events.drain(..) {
            if let FabricEvent::Completion(Completion::Write {
                token: t, result, ..
            }) = ev
            {
                if t == token {
                    return result.map(|()| t0.elapsed()).map_err(|e| e.to_string());
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(5) {
            return Err("write completion timed out".into());
        }
        std::hint::spin_loop();
    }
}

/// Warm-up, then round trips until `limit` (or Ctrl-C): (latencies, count, seconds,
/// interrupted).
fn measure(
    warmup: Duration,
    limit: Limit,
    mut once: impl FnMut(u64) -> Result<Duration, String>,
) -> Result<(hdrhistogram::Histogram<u64>, u64, f64, bool), String> {
    let mut h = stats::histogram();
    let mut tok = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < warmup && !crate::interrupt::requested() {
        tok += 1;
        once(tok)?;
    }
    let (t1, mut n) = (Instant::now(), 0u64);
    let more = |n: u64| match limit {
        Limit::Time(d) => t1.elapsed() < d,
        Limit::Iterations(k) => n < k,
    };
    while more(n) {
        if crate::interrupt::requested() {
            return Ok((h, n, t1.elapsed().as_secs_f64(), true));
        }
        tok += 1;
        let d = once(tok)?;
        let _ = h.record((d.as_nanos() as u64).max(1));
        n += 1;
    }
    Ok((h, n, t1.elapsed().as_secs_f64(), false))
}
