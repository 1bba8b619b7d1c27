//! What a running replica measures about itself, for an exporter to read.
//!
//! Everything here is a relaxed atomic written by the thread that does the work (the replica
//! thread, the persister thread) and read at any time by another (a metrics endpoint): no
//! lock and no allocation on the hot path. The engine does not format anything; the
//! `ballot-node` binary turns a [`Metrics`] into Prometheus text.

use crate::types::{NodeId, MAX_NODES};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Buckets of a [`Histogram`]: upper bounds of 1 µs · 2^k for k in `0..BUCKETS - 1` (1 µs
/// to about 4.2 s), and a last one that catches everything above.
pub const BUCKETS: usize = 24;

/// A latency histogram with power-of-two buckets in microseconds. `observe` is three
/// relaxed `fetch_add`s.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations in this bucket, not cumulative); the last
    /// bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of every observation, in seconds.
    pub sum_seconds: f64,
    /// How many observations were made.
    pub count: u64,
}

impl Histogram {
    /// Index of the bucket `d` falls in: the smallest k with d <= 2^k µs.
    fn bucket(d: Duration) -> usize {
        // Rounded up: 1.5 µs is above the 1 µs bound.
        let us = d.as_nanos().div_ceil(1000).min(u128::from(u64::MAX)) as u64;
        if us <= 1 {
            return 0;
        }
        let k = 64 - (us - 1).leading_zeros() as usize;
        k.min(BUCKETS - 1)
    }

    /// Records one observation (three relaxed adds).
    pub fn observe(&self, d: Duration) {
        self.buckets[Self::bucket(d)].fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_nanos.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound of bucket `k`, in seconds (the last one is infinite).
    pub fn bound(k: usize) -> f64 {
        if k + 1 >= BUCKETS {
            f64::INFINITY
        } else {
            (1u64 << k) as f64 / 1e6
        }
    }

    /// A copy of the buckets, sum and count (each read on its own: not one instant).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = (0..BUCKETS)
            .map(|k| (Self::bound(k), self.buckets[k].load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A counter or gauge read by another thread.
#[derive(Debug, Default)]
pub struct Cell(AtomicU64);

impl Cell {
    /// Adds `n` (a counter).
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the value (a gauge, or a counter kept elsewhere).
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One replica's measurements, shared (`Arc`) between the threads that write them and the
/// exporter that reads them. See [`crate::runtime::Handle::metrics`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// From a proposal reaching the replica thread to its outcome (committed by a majority
    /// and applied here); successful proposals made on this replica only.
    pub commit_latency: Histogram,
    /// Time the state machine takes to apply one log entry (a batch of commands).
    pub apply_latency: Histogram,
    /// Durable mode: one `fdatasync` of the log by the persister (a group of entries).
    pub fsync_latency: Histogram,
    /// Proposals made here that committed and applied.
    pub commits: Cell,
    /// Times this replica saw a different leader (or became one) than the last one seen.
    pub leader_changes: Cell,
    /// Checkpoints this replica wrote and kept.
    pub checkpoints_taken: Cell,
    /// Checkpoints that failed to be written (the log is not compacted past them).
    pub checkpoint_failures: Cell,
    /// Checkpoint bytes sent to replicas catching up.
    pub checkpoint_bytes_served: Cell,
    /// Storage failures (the replica stops acknowledging after the first).
    pub storage_errors: Cell,
    /// Control messages dropped because they did not decode.
    pub bad_messages: Cell,
    /// 1 while the replica has stopped acknowledging after a storage failure.
    pub storage_failed: Cell,
    /// A checkpoint being pulled from another replica (catch-up): its index (0: none yet
    /// named, or no pull) and the bytes received so far.
    pub pull_index: Cell,
    /// Bytes of that checkpoint received so far.
    pub pull_bytes: Cell,
    /// 1 while a checkpoint pull is in progress.
    pub pulling: Cell,
    /// Leader: times replication to a follower stalled for lack of ring credit (an entry
    /// was ready and the follower's ring had no room for it until it consumed more),
    /// indexed by the follower's id. Counted by the driver, once per stall
    /// (`crate::credit`, private: its docs say how).
    pub ring_credit_stalls: [Cell; MAX_NODES],
    /// The fabric's own per-peer counters, when it keeps them in [`FabricCounters`] form
    /// ([`crate::fabric::Fabric::counters`]); set when the replica is built.
    pub fabric: OnceLock<Arc<dyn FabricCounters>>,
}

/// One peer's counters of a fabric, in the terms every fabric that keeps them shares (the
/// exporter names them like the TCP fabric's: `ballot_fabric_*{peer}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FabricPeerCounters {
    /// Whether the connection to the peer is up now.
    pub connected: bool,
    /// Bytes posted to the peer: one-sided writes and reads, control messages.
    pub sent_bytes: u64,
    /// Bytes of control messages received from the peer (one-sided writes into this
    /// replica's region are not seen by its CPU, so not counted).
    pub received_bytes: u64,
    /// Times the connection to the peer broke.
    pub disconnects: u64,
    /// Operations to the peer that completed with an error (refused, broken connection).
    pub failed_operations: u64,
    /// Times the connection to the peer was re-established (reconnected, or the peer
    /// restarted and bootstrapped again).
    pub reconnects: u64,
    /// Posts refused because the queue or the staging buffer to the peer was full (the
    /// caller retries: back-pressure, not an error).
    pub busy: u64,
}

/// A fabric's counters, read by an exporter on any thread while the fabric runs in the
/// replica.
pub trait FabricCounters: Send + Sync + std::fmt::Debug {
    /// The fabric's name (`rdma`, ...).
    fn name(&self) -> &'static str;
    /// The counters of the connection with `peer` (zero for an unknown peer).
    fn peer(&self, peer: NodeId) -> FabricPeerCounters;
    /// Connection set-ups refused (wrong key, cluster or node id), either side.
    fn refused_handshakes(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_microseconds() {
        let b = |us: u64| Histogram::bucket(Duration::from_micros(us));
        assert_eq!((b(0), b(1), b(2), b(3), b(4), b(5)), (0, 0, 1, 2, 2, 3));
        assert_eq!(b(1 << 20), 20);
        assert_eq!(b((1 << 20) + 1), 21);
        assert_eq!(b(u64::MAX), BUCKETS - 1);
        assert_eq!(Histogram::bucket(Duration::from_secs(1 << 40)), BUCKETS - 1);
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_millis(2));
        let s = h.snapshot();
        assert_eq!(s.count, 2);
        assert_eq!(s.buckets.len(), BUCKETS);
        assert_eq!(s.buckets[2], (4e-6, 1));
        assert_eq!(s.buckets[11], (2048e-6, 1));
        assert!(s.buckets.last().unwrap().0.is_infinite());
        assert!((s.sum_seconds - 0.002003).abs() < 1e-9);
        assert_eq!(Histogram::bucket(Duration::from_nanos(1500)), 1);
        assert_eq!(Histogram::bucket(Duration::from_nanos(1000)), 0);
    }
}
