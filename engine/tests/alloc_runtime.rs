//! Heap allocations per committed command through the runtime's hand-over (issue 12 items
//! 1 and 5): three replicas on `ballot::runtime::Runtime` threads over an instant
//! `MemFabric`, commands handed in `Proposals` batches of 64 and their outcomes taken from
//! a `CompletionSink`. Every allocation of the process counts (a global counter: the
//! replica threads, the caller and the channels between them), so this is the whole path
//! a service runs, on every replica, not the replica alone
//! (`alloc_per_command.rs` counts that, per side, exactly).
//!
//! What a batch costs today: the caller's `Proposals` (two buffers, `Proposals::take`),
//! one `Completions` message per replica step that completed any of it (two buffers), the
//! channels' blocks, and one entry buffer per replica. A step's timing varies, so the bound
//! is loose: it catches anything that allocates once per command, not a per-batch change.

use ballot::handoff::Proposals;
use ballot::runtime::{CompletionSink, Role, Runtime, RuntimeConfig};
use common::{total_allocs, Counting};
use std::time::{Duration, Instant};

mod common;

#[global_allocator]
static GLOBAL: Counting = Counting;

const BATCH: u64 = 64;

/// Allocations per committed command, all threads counted. Measured 0.12 (7.4-7.8 per batch
/// of 64: three entry buffers, two for the `Proposals`, two for the one `Completions`, and
/// the channels' blocks); before `Proposals::take` and the runtime's spare outcome buffers,
/// 0.43 (27.7 per batch: both regrew from nothing every batch). Twice today's, for steps
/// that split a batch's outcomes.
const BOUND: f64 = 0.25;

#[test]
fn the_runtime_hand_over_allocates_per_batch_not_per_command() {
    let runtimes: Vec<_> = common::replicas(|_, _| None)
        .into_iter()
        .enumerate()
        .map(|(i, rep)| {
            let rc = RuntimeConfig {
                name: format!("replica-{i}"),
                ..RuntimeConfig::default()
            };
            Runtime::start(rep, rc).unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(l) = runtimes
            .iter()
            .position(|r| r.handle().status().role == Role::Leader)
        {
            break runtimes[l].handle();
        }
        assert!(Instant::now() < deadline, "no leader elected");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (sink, done) = CompletionSink::new(|| {});
    let cmd = [0xA5u8; 64];
    let mut batch = Proposals::new();
    let mut round = |tag0: u64| {
        for t in tag0..tag0 + BATCH {
            batch.push(t, &cmd);
        }
        leader
            .submit_batch(batch.take(), &sink)
            .expect("the runtime takes the batch");
        let mut got = 0;
        while got < BATCH {
            let c = done
                .recv_timeout(Duration::from_secs(10))
                .expect("outcomes within 10 s");
            for (_, out) in c.iter() {
                out.expect("committed");
                got += 1;
            }
        }
    };
    // Warm-up: logs, queues and channels grow to their steady size.
    for r in 0..200 {
        round(r * BATCH);
    }
    let (rounds, a) = (500, total_allocs());
    for r in 200..200 + rounds {
        round(r * BATCH);
    }
    let n = total_allocs() - a;
    let per_command = n as f64 / (rounds * BATCH) as f64;
    eprintln!(
        "{n} allocations for {} commands in batches of {BATCH}, three replicas and the caller: \
         {per_command:.3} per command, {:.1} per batch",
        rounds * BATCH,
        n as f64 / rounds as f64
    );
    assert!(
        per_command < BOUND,
        "{per_command:.3} allocations per command through the runtime (bound {BOUND})"
    );
    drop(runtimes);
}
