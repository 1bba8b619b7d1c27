//! Clients that record a history of reads, writes and compare-and-swaps on a few keys while
//! the tests inject faults, and the check that the history is linearizable (the
//! simulator's checker, `ballot::sim::linearizability`, one key at a time).
//!
//! Each operation is recorded with its invocation (when it was handed to the client
//! library) and its response (when the library returned it), so the recorded interval
//! contains the real one. An operation whose outcome is unknown (the library gave up on it:
//! connection lost, no answer in time) is recorded as never returning: it may or may not
//! have taken effect, at any time after its invocation.
//!
//! The checker wants at most one call in flight per "thread". A one-at-a-time client is
//! one thread; a pipelining client, with many calls in flight, takes a thread per call
//! from a pool of its own, per key (a thread is reused once its call returned; a call that
//! never returns keeps its thread for good).

use super::Cluster;
use ballot::sim::kv::{Op as SOp, Ret, Spec};
use ballot::sim::linearizability::{self, Call, Violation};
use ballot_node::client::{Client, ClientConfig, ClientError};
use ballot_node::kv::{KvResult, Op};
use ballot_node::pipeline::Pipeline;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One operation of the history.
#[derive(Debug, Clone)]
pub struct Rec {
    pub thread: u64,
    pub key: u8,
    pub op: SOp,
    pub invoked: Instant,
    pub returned: Option<(Instant, Ret)>,
    /// A compare-and-swap that failed: the value it found (0: absent).
    pub saw: Option<u64>,
}

/// Keys of the one-at-a-time workloads.
pub const KEYS: u8 = 4;

pub fn key_name(k: u8) -> Vec<u8> {
    format!("k{k}").into_bytes()
}
pub fn val(v: u64) -> Vec<u8> {
    v.to_string().into_bytes()
}
pub fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// How a worker's client runs its operations.
#[derive(Debug, Clone, Copy)]
pub enum Clients {
    /// [`Client`]: one operation at a time (what `ballot-cli` does), 4 ms apart.
    OneAtATime,
    /// [`Pipeline`]: many in flight on one connection; every `every` the worker tops its
    /// operations in flight up to `depth` at once (so they overlap).
    Pipelined { depth: usize, every: Duration },
}

/// A worker's load: its client and the keys `0..keys` it picks from at random.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: Clients,
    pub keys: u8,
}

impl Load {
    /// The one-at-a-time load on [`KEYS`] keys.
    pub const ONE_AT_A_TIME: Load = Load {
        clients: Clients::OneAtATime,
        keys: KEYS,
    };
}

/// A client configuration that rides out a leader change or a restart.
pub fn patient(addrs: Vec<String>) -> ClientConfig {
    let mut cfg = ClientConfig::new(addrs);
    cfg.deadline = Duration::from_secs(12);
    cfg.attempt_timeout = Duration::from_millis(800);
    cfg
}

/// An operation handed to the client, not returned yet.
struct Started {
    thread: u64,
    key: u8,
    sop: SOp,
    op: Op,
    invoked: Instant,
}

/// A worker's operations and its record of them.
struct Recorder {
    id: u64,
    keys: u8,
    rng: u64,
    counter: u64,
    /// The last value this worker saw per key (what its CAS expects).
    last_seen: Vec<u64>,
    /// Per key: this worker's threads with no call in flight.
    idle: Vec<Vec<u64>>,
    next_thread: Arc<AtomicU64>,
    out: Vec<Rec>,
}

impl Recorder {
    fn new(id: u64, keys: u8, next_thread: Arc<AtomicU64>) -> Recorder {
        Recorder {
            id,
            keys,
            rng: id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            counter: 0,
            last_seen: vec![0; keys as usize],
            idle: vec![Vec::new(); keys as usize],
            next_thread,
            out: Vec::new(),
        }
    }

    /// A random put (of a value unique to this call), get or CAS on a random key.
    fn start(&mut self) -> Started {
        let rng = &mut self.rng;
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let k = (*rng % u64::from(self.keys)) as u8;
        self.counter += 1;
        let fresh = (self.id + 1) * 1_000_000 + self.counter;
        let (sop, op) = match (*rng >> 8) % 3 {
            0 => (
                SOp::Put(k, fresh),
                Op::Put {
                    key: key_name(k),
                    value: val(fresh),
                },
            ),
            1 => (SOp::Get(k), Op::Get { key: key_name(k) }),
            _ => {
                let old = self.last_seen[k as usize];
                (
                    SOp::Cas(k, old, fresh),
                    Op::Cas {
                        key: key_name(k),
                        expected: (old != 0).then(|| val(old)),
                        new: val(fresh),
                    },
                )
            }
        };
        let thread = self.idle[k as usize]
            .pop()
            .unwrap_or_else(|| self.next_thread.fetch_add(1, Ordering::Relaxed));
        Started {
            thread,
            key: k,
            sop,
            op,
            invoked: Instant::now(),
        }
    }

    /// Records `s`'s result; `true` if its outcome is unknown.
    fn done(&mut self, s: Started, res: Result<KvResult, ClientError>) -> bool {
        let now = Instant::now();
        let k = s.key as usize;
        let mut saw = None;
        let ret = match res {
            Ok(KvResult::Ok) => match s.sop {
                SOp::Cas(..) => Ret::Cas(true),
                _ => Ret::Ok,
            },
            Ok(KvResult::Value(v)) => Ret::Value(parse(&v)),
            Ok(KvResult::NotFound) => Ret::Value(0),
            Ok(KvResult::CasFailed(cur)) => {
                let cur = cur.as_deref().map_or(0, parse);
                self.last_seen[k] = cur;
                saw = Some(cur);
                Ret::Cas(false)
            }
            Ok(KvResult::Error(e)) | Err(ClientError::Rejected(e)) => {
                panic!("command rejected: {e}")
            }
            Ok(other @ (KvResult::Session(_) | KvResult::SessionExpired)) => {
                panic!("unexpected result {other:?}")
            }
            Err(e @ ClientError::Unreachable(_)) => panic!("fail_fast is off: {e}"),
            Err(ClientError::Unavailable(e) | ClientError::SessionExpired(e)) => {
                // Outcome unknown: pending forever (its thread is not reused).
                eprintln!("worker {}: op indeterminate ({e})", self.id);
                self.out.push(Rec {
                    thread: s.thread,
                    key: s.key,
                    op: s.sop,
                    invoked: s.invoked,
                    returned: None,
                    saw: None,
                });
                return true;
            }
        };
        if let Ret::Value(v) = ret {
            self.last_seen[k] = v;
        }
        if let (SOp::Put(_, v) | SOp::Cas(_, _, v), Ret::Ok | Ret::Cas(true)) = (s.sop, ret) {
            self.last_seen[k] = v;
        }
        self.out.push(Rec {
            thread: s.thread,
            key: s.key,
            op: s.sop,
            invoked: s.invoked,
            returned: Some((now, ret)),
            saw,
        });
        self.idle[k].push(s.thread);
        false
    }
}

/// A history-recording worker: random operations on the keys of `load`, through its kind
/// of client, until `stop` (then it waits for what it has in flight).
pub fn worker(
    addrs: Vec<String>,
    id: u64,
    load: Load,
    stop: Arc<AtomicBool>,
    next_thread: Arc<AtomicU64>,
) -> Vec<Rec> {
    let mut rec = Recorder::new(id, load.keys, next_thread);
    match load.clients {
        Clients::OneAtATime => {
            let mut c = Client::with_config(patient(addrs.clone()));
            while !stop.load(Ordering::Relaxed) {
                let s = rec.start();
                let res = c.execute(s.op.clone());
                if rec.done(s, res) {
                    // Go on in a new session.
                    c = Client::with_config(patient(addrs.clone()));
                }
                std::thread::sleep(Duration::from_millis(4));
            }
        }
        Clients::Pipelined { depth, every } => {
            let mut p = Pipeline::new(patient(addrs), depth);
            let mut started: HashMap<u64, Started> = HashMap::new();
            let mut burst = Instant::now();
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                if stopping && started.is_empty() {
                    break;
                }
                let now = Instant::now();
                if !stopping && now >= burst {
                    while p.outstanding() < depth {
                        let s = rec.start();
                        started.insert(p.submit(s.op.clone()), s);
                    }
                    burst = now + every;
                }
                let mut wait = if stopping {
                    Duration::from_millis(100)
                } else {
                    burst.saturating_duration_since(now)
                };
                if started.is_empty() {
                    std::thread::sleep(wait);
                    continue;
                }
                while let Some((tag, r)) = p.poll(wait) {
                    let s = started.remove(&tag).expect("a tag this worker submitted");
                    rec.done(s, r);
                    wait = Duration::ZERO;
                }
            }
        }
    }
    rec.out
}

/// `n` history-recording workers (see [`worker`]) against the cluster until `stop`.
pub fn spawn_workers(
    cl: &Cluster,
    n: u64,
    load: Load,
    stop: &Arc<AtomicBool>,
    next_thread: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Vec<Rec>>> {
    (0..n)
        .map(|id| {
            let (a, s, t) = (cl.addrs(), stop.clone(), next_thread.clone());
            std::thread::spawn(move || worker(a, id, load, s, t))
        })
        .collect()
}

/// A writer of unique keys `w1, w2, ...` until `stop`: returns the acknowledged ones (each
/// must be readable at the end). `patient`: a client that rides out whole-cluster restarts.
/// `depth` 1: one put at a time, `pause` apart; more: a pipeline, topped up to `depth` puts
/// in flight every `pause`.
pub fn acked_writer(
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
    patient_client: bool,
    pause: Duration,
    depth: usize,
) -> std::thread::JoinHandle<Vec<u64>> {
    let cfg = if patient_client {
        patient(addrs)
    } else {
        ClientConfig::new(addrs)
    };
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0u64;
        if depth <= 1 {
            let mut c = Client::with_config(cfg);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if c.put(format!("w{n}").as_bytes(), &val(n)).is_ok() {
                    acked.push(n);
                }
                std::thread::sleep(pause);
            }
            return acked;
        }
        let mut p = Pipeline::new(cfg, depth);
        let mut keys = HashMap::new();
        while !stop.load(Ordering::Relaxed) || p.outstanding() > 0 {
            if !stop.load(Ordering::Relaxed) {
                while p.outstanding() < depth {
                    n += 1;
                    let put = Op::Put {
                        key: format!("w{n}").into_bytes(),
                        value: val(n),
                    };
                    keys.insert(p.submit(put), n);
                }
            }
            let until = Instant::now() + pause;
            while let Some((tag, r)) = p.poll(until.saturating_duration_since(Instant::now())) {
                let n = keys.remove(&tag).expect("a tag this writer submitted");
                if r == Ok(KvResult::Ok) {
                    acked.push(n);
                }
            }
            // All answered early: the next burst waits for its time.
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        acked
    })
}

/// Joins the workers and the acknowledged writer (which the caller stopped), then runs
/// [`final_reads_and_acked_check`]: the whole history and the acknowledged writes.
pub fn join_and_check(
    cl: &Cluster,
    workers: Vec<std::thread::JoinHandle<Vec<Rec>>>,
    acked: std::thread::JoinHandle<Vec<u64>>,
    keys: u8,
    when: &str,
) -> (Vec<Rec>, Vec<u64>) {
    let mut history: Vec<Rec> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let acked = acked.join().unwrap();
    final_reads_and_acked_check(cl, &mut history, keys, &acked, when);
    (history, acked)
}

/// After the workers stopped: reads keys `0..keys` once more into `history` (the last word
/// on each register) and checks that every acknowledged unique write is readable.
pub fn final_reads_and_acked_check(
    cl: &Cluster,
    history: &mut Vec<Rec>,
    keys: u8,
    acked: &[u64],
    when: &str,
) {
    let mut c = Client::new(cl.addrs());
    for k in 0..keys {
        let invoked = Instant::now();
        let v = c
            .get(&key_name(k))
            .expect("final read")
            .map_or(0, |v| parse(&v));
        history.push(Rec {
            thread: 1,
            key: k,
            op: SOp::Get(k),
            invoked,
            returned: Some((Instant::now(), Ret::Value(v))),
            saw: None,
        });
    }
    let mut p = Pipeline::new(ClientConfig::new(cl.addrs()), 64);
    let gets = acked
        .iter()
        .map(|n| Op::Get {
            key: format!("w{n}").into_bytes(),
        })
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .zip(p.execute_all(gets))
        .filter(|(&n, r)| *r != Ok(KvResult::Value(val(n))))
        .map(|(&n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing {when}: {missing:?}"
    );
}

/// Checks key `key`'s part of `history`; (calls checked, calls left out). Left out, before
/// the search: calls that never returned and cannot matter, i.e. reads, and writes whose
/// (unique) value no call ever observed (no read returned it, no CAS expected it and
/// succeeded, no failed CAS found it). Such a write, if it took effect, was overwritten by
/// blind puts before anyone looked, so leaving it out changes no result: the history is
/// linearizable with it iff it is without it. (Pending calls can be placed anywhere after
/// their invocation, which makes the search slow; most of them are of this kind.)
pub fn check_linearizable(history: &[Rec], key: u8) -> Result<(usize, usize), String> {
    let mine: Vec<&Rec> = history.iter().filter(|r| r.key == key).collect();
    let mut observed = HashSet::new();
    for r in &mine {
        match (r.op, r.returned) {
            (_, Some((_, Ret::Value(v)))) => {
                observed.insert(v);
            }
            (SOp::Cas(_, old, _), Some((_, Ret::Cas(true)))) => {
                observed.insert(old);
            }
            _ => {}
        }
        observed.extend(r.saw);
    }
    let matters = |r: &&&Rec| {
        r.returned.is_some()
            || match r.op {
                SOp::Get(_) => false,
                SOp::Put(_, v) | SOp::Cas(_, _, v) => observed.contains(&v),
            }
    };
    let kept: Vec<&Rec> = mine.iter().filter(matters).copied().collect();
    let dropped = mine.len() - kept.len();
    let calls = kept.into_iter().map(|r| Call {
        thread: r.thread,
        op: r.op,
        invoked: r.invoked,
        returned: r.returned,
    });
    linearizability::check(calls, Spec::default())
        .map(|n| (n, dropped))
        .map_err(|e| match e {
            Violation::Malformed(e) => format!("history malformed for key {key}: {e}"),
            Violation::NotLinearizable { ops } => {
                format!("key {key}: history of {ops} ops has no linearization")
            }
        })
}

/// Checks every key of `history` (each on a thread with a deep stack: the search
/// recurses once per call).
pub fn check_all_keys(history: Vec<Rec>) {
    let mut keys: Vec<u8> = history.iter().map(|r| r.key).collect();
    keys.sort_unstable();
    keys.dedup();
    let history = Arc::new(history);
    for k in keys {
        let h = history.clone();
        let t = Instant::now();
        let r = std::thread::Builder::new()
            .stack_size(1 << 30)
            .spawn(move || check_linearizable(&h, k))
            .unwrap()
            .join()
            .unwrap();
        let (n, dropped) = r.unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "key {k}: {n} ops linearizable, {dropped} pending unobserved left out (checked in {:?})",
            t.elapsed()
        );
    }
}

/// The most calls that returned in flight at once in `history`.
pub fn max_concurrency(history: &[Rec]) -> usize {
    let mut ev: Vec<(Instant, i32)> = Vec::with_capacity(history.len() * 2);
    for r in history {
        if let Some((t, _)) = r.returned {
            ev.push((r.invoked, 1));
            ev.push((t, -1));
        }
    }
    // Returns before invokes at equal instants.
    ev.sort_unstable();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, d) in ev {
        now += i64::from(d);
        most = most.max(now);
    }
    most as usize
}
