//! The fabric's own round trip with no protocol: one-sided WRITE of one entry's bytes (an
//! entry carrying one command of `payload` bytes) plus its completion, between two endpoints
//! of the fabric in this process.

use crate::fabrics::{self, FabricKind};
use crate::stats::{self, BenchResult};
use ballot::fabric::{Completion, Fabric, FabricEvent};
use ballot::layout::{self, RING_OFFSET};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

pub fn run(
    kind: FabricKind,
    payload: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<BenchResult, String> {
    fabrics::tighten_timer_slack();
    let size = layout::entry_size(payload + ballot::protocol::batch::COMMAND_OVERHEAD);
    let ring = fabrics::geometry(size);
    let regions = fabrics::regions(2, ring);
    let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let (h, n, secs) = match kind {
        FabricKind::Mem => {
            let mut f = fabrics::mem(regions);
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            let (a, _b) = f.split_at_mut(1);
            measure(warmup, duration, |tok| round_trip(&mut a[0], &data, tok))?
        }
        FabricKind::Tcp => {
            let mut f = fabrics::tcp(regions)?;
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            let (a, _b) = f.split_at_mut(1);
            measure(warmup, duration, |_| {
                a[0].time_write(1, RING_OFFSET, &data, Duration::from_secs(5))
                    .map_err(|e| e.to_string())
            })?
        }
        FabricKind::Rdma => {
            let mut f = fabrics::rdma(regions)?;
            f[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
            let (a, _b) = f.split_at_mut(1);
            measure(warmup, duration, |tok| round_trip(&mut a[0], &data, tok))?
        }
    };
    let mut r = BenchResult {
        kind: "raw",
        fabric: kind.name().into(),
        topology: "threads",
        replicas: 2,
        payload,
        clients: 1,
        outstanding: 1,
        durability: "volatile",
        duration_s: secs,
        commits: n,
        throughput_ops_s: n as f64 / secs,
        ..Default::default()
    };
    r.fill_latency(&h);
    Ok(r)
}

/// Posts one WRITE to node 1 and busy-polls for its completion.
fn round_trip<F: Fabric>(f: &mut F, data: &[u8], token: u64) -> Result<Duration, String> {
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

fn measure(
    warmup: Duration,
    duration: Duration,
    mut once: impl FnMut(u64) -> Result<Duration, String>,
) -> Result<(Histogram<u64>, u64, f64), String> {
    let mut h = stats::histogram();
    let mut tok = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < warmup {
        tok += 1;
        once(tok)?;
    }
    let (t1, mut n) = (Instant::now(), 0u64);
    while t1.elapsed() < duration {
        tok += 1;
        let d = once(tok)?;
        let _ = h.record((d.as_nanos() as u64).max(1));
        n += 1;
    }
    Ok((h, n, t1.elapsed().as_secs_f64()))
}
