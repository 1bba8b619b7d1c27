//! Micro-benchmarks of the hot paths: entry encode/decode + checksum, ring placement,
//! command batching, the replica core committing through `MemFabric`, the TCP frame codec,
//! and `ballot-node`'s store applying a put (what every replica does per command).
//!
//! `cargo bench -p ballot-bench` (or `-- <filter>`). Numbers go to `docs/benchmarks.md`;
//! nothing here asserts performance.

use ballot::driver::{Replica, StateMachine};
use ballot::handoff::Completions;
use ballot::layout::{self, EntryHeader, RegionInfo, RingGeometry};
use ballot::mem_fabric::{MemFabric, MemNet};
use ballot::protocol::{batch, Config, Core};
use ballot::region::Region;
use ballot::ring::RingCursor;
use ballot::{Ballot, Index};
use ballot_tcp::codec::{self, Frame, Limits};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

fn entry(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry");
    for &payload in &[64usize, 4096, 65536] {
        let data = vec![0x5Au8; payload];
        let h = EntryHeader {
            index: 42,
            ballot: Ballot::new(3, 1),
            commit: 41,
            len: payload as u32,
            flags: 0,
        };
        let mut out = Vec::with_capacity(layout::entry_size(payload));
        g.throughput(Throughput::Bytes(payload as u64));
        g.bench_function(format!("encode/{payload}"), |b| {
            b.iter(|| {
                layout::encode_entry(&mut out, black_box(&h), black_box(&data));
                out.len()
            })
        });
        layout::encode_entry(&mut out, &h, &data);
        let encoded = out.clone();
        g.bench_function(format!("decode/{payload}"), |b| {
            b.iter(|| layout::decode_entry(black_box(&encoded)).unwrap().1.len())
        });
        g.bench_function(format!("crc32c/{payload}"), |b| {
            b.iter(|| crc32c::crc32c(black_box(&data)))
        });
    }
    g.finish();
}

fn ring(c: &mut Criterion) {
    let geo = RingGeometry::new(1 << 16, 128).unwrap();
    let mut g = c.benchmark_group("ring");
    g.bench_function("place/76B", |b| {
        let mut cur = RingCursor::new(geo);
        b.iter(|| match cur.place(black_box(76), cur.written()) {
            Some(p) => p.slot,
            None => unreachable!("consumed keeps up"),
        })
    });
    g.bench_function("place/8KiB", |b| {
        let mut cur = RingCursor::new(geo);
        b.iter(|| cur.place(black_box(8192), cur.written()).unwrap().slot)
    });
    g.finish();
}

fn batching(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    let cmd = vec![7u8; 64];
    for &n in &[1usize, 64, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        let mut payload = Vec::with_capacity(n * (64 + batch::COMMAND_OVERHEAD));
        g.bench_function(format!("push/{n}x64B"), |b| {
            b.iter(|| {
                payload.clear();
                for t in 0..n as u64 {
                    batch::push(&mut payload, batch::origin(1, t), black_box(&cmd));
                }
                payload.len()
            })
        });
        g.bench_function(format!("iter/{n}x64B"), |b| {
            b.iter(|| {
                batch::iter(black_box(&payload))
                    .map(|r| r.unwrap().1.len())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

struct Null;
impl StateMachine for Null {
    fn apply(&mut self, _: Index, _: &[u8], _: &mut Vec<u8>) {}
}

/// Three replicas on an instant `MemFabric`, stepped in this thread until one leads.
fn cluster(batch_bytes: usize) -> (Vec<Replica<MemFabric, Null>>, usize, u64) {
    let ring = RingGeometry::new(1 << 16, 128).unwrap();
    let net = MemNet::instant();
    let mut reps: Vec<_> = (0..3u8)
        .map(|i| {
            let region = Arc::new(
                Region::anonymous(RegionInfo {
                    cluster: 1,
                    node: i,
                    ring,
                })
                .unwrap(),
            );
            let mut cfg = Config::new(i, vec![0, 1, 2], ring, ballot::runtime::clock_seed(i));
            cfg.batch_bytes = batch_bytes;
            Replica::new(
                Core::new(cfg, false).unwrap(),
                net.attach(i, region),
                Null,
                None,
            )
        })
        .collect();
    for tick in 0..100_000u64 {
        for r in reps.iter_mut() {
            r.step(tick);
        }
        if let Some(l) = reps.iter().position(|r| r.core().is_leader()) {
            // Let the new leader finish its start-up (no-op entries) before measuring.
            for _ in 0..100 {
                for r in reps.iter_mut() {
                    r.step(tick);
                }
            }
            return (reps, l, tick);
        }
    }
    panic!("no leader elected");
}

/// Proposes `n` commands at the leader and steps everyone until all are applied there.
fn commit(reps: &mut [Replica<MemFabric, Null>], leader: usize, cmd: &[u8], n: usize, tick: u64) {
    for _ in 0..n {
        reps[leader].propose(cmd).expect("leader accepts");
    }
    let mut done = 0;
    let mut got = Completions::new();
    while done < n {
        for r in reps.iter_mut() {
            r.step(tick);
        }
        reps[leader].take_completed(&mut got);
        done += got.len();
    }
}

fn replica(c: &mut Criterion) {
    let mut g = c.benchmark_group("replica_mem");
    let cmd = vec![1u8; 64];
    // The clock stands still during the measurement: no ticks, no elections.
    let (mut reps, l, tick) = cluster(64 << 10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("commit_1x64B", |b| {
        b.iter(|| commit(&mut reps, l, &cmd, 1, tick))
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("commit_64x64B_batched", |b| {
        b.iter(|| commit(&mut reps, l, &cmd, 64, tick))
    });
    // The proposal path alone: queueing into the core (then drained outside the timing).
    g.throughput(Throughput::Elements(64));
    g.bench_function("propose_64x64B", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iters {
                let t0 = std::time::Instant::now();
                for _ in 0..64 {
                    reps[l].propose(&cmd).unwrap();
                }
                spent += t0.elapsed();
                commit(&mut reps, l, &cmd, 0, tick);
                let mut done = 0;
                let mut got = Completions::new();
                while done < 64 {
                    for r in reps.iter_mut() {
                        r.step(tick);
                    }
                    reps[l].take_completed(&mut got);
                    done += got.len();
                }
            }
            spent
        })
    });
    g.finish();
    // Idle step of a leader and a follower: the cost of one turn of the loop with nothing to do.
    let mut g = c.benchmark_group("step_idle");
    let f = (l + 1) % 3;
    g.bench_function("leader", |b| b.iter(|| reps[l].step(tick)));
    g.bench_function("follower", |b| b.iter(|| reps[f].step(tick)));
    g.finish();
}

fn tcp_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("tcp_codec");
    let limits = Limits::for_region(64 << 20);
    for &n in &[128usize, 65536] {
        let data = vec![3u8; n];
        let frame = Frame::Write {
            token: 9,
            offset: 4096,
            data: &data,
        };
        let mut out = Vec::with_capacity(n + codec::HEADER_LEN);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(format!("encode_write/{n}"), |b| {
            b.iter(|| {
                out.clear();
                codec::encode(black_box(&frame), &mut out).unwrap();
                out.len()
            })
        });
        out.clear();
        codec::encode(&frame, &mut out).unwrap();
        let bytes = out.clone();
        g.bench_function(format!("decode_write/{n}"), |b| {
            b.iter(|| codec::decode(black_box(&bytes), &limits).unwrap().1)
        });
    }
    g.finish();
}

/// `ballot-node`'s store applying puts from sessions (dedup results recorded, the state
/// digest kept), as each replica does per command, over 10,000 keys the store holds after
/// the first pass.
fn kv_apply(c: &mut Criterion) {
    use ballot_node::kv::{Command, KvMachine, Op};
    const SESSIONS: u64 = 32;
    const KEYS: u64 = 10_000;
    let put = |client: u64, seq: u64, key: u64| {
        Command {
            client,
            seq,
            op: Op::Put {
                key: format!("key-{key:08}").into_bytes(),
                value: vec![0x5A; 64],
            },
        }
        .encode()
    };
    let mut m = KvMachine::default();
    let mut out = Vec::new();
    let register = Command {
        client: 0,
        seq: 0,
        op: Op::Register,
    }
    .encode();
    for i in 0..SESSIONS {
        m.apply(i + 1, &register, &mut out);
        out.clear();
    }
    // Commands encoded up front (the benchmark times the apply only); each pass rewrites
    // their sequence numbers in place (bytes 8..16), so every put is new to its session.
    let mut cmds: Vec<Vec<u8>> = (0..KEYS)
        .map(|k| put(1 + k % SESSIONS, 1 + k / SESSIONS, k))
        .collect();
    let mut index = SESSIONS;
    let mut pass = 0u64;
    let mut g = c.benchmark_group("kv_apply");
    g.throughput(Throughput::Elements(KEYS));
    g.bench_function("put_64B_session/10k_keys", |b| {
        b.iter(|| {
            pass += 1;
            for (k, cmd) in cmds.iter_mut().enumerate() {
                let seq = pass * KEYS + k as u64 / SESSIONS + 1;
                cmd[8..16].copy_from_slice(&seq.to_le_bytes());
                index += 1;
                out.clear();
                m.apply(index, black_box(cmd), &mut out);
                // One command per entry: the per-entry work counts per put.
                m.applied_entry(index);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, entry, ring, batching, replica, tcp_codec, kv_apply);
criterion_main!(benches);
