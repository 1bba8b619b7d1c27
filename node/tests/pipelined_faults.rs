//! Linearizability with pipelining clients under real faults: three `ballot-node`
//! processes on 127.0.0.1, clients of the pipelining library (`ballot_node::pipeline`,
//! up to 16 operations in flight on each connection), kill -9 of the leader and its
//! restart, SIGSTOP / SIGCONT of the leader and of a follower; in durable mode also a
//! kill -9 of all three and their restart. Every operation's invocation, response and
//! result are recorded and the history is checked for linearizability (operations whose
//! outcome the client never learnt count as possibly applied); every acknowledged write
//! of a pipelined writer of unique keys must be readable at the end.

mod common;

use common::history::{
    acked_writer, check_all_keys, join_and_check, max_concurrency, spawn_workers, Clients, Load,
};
use common::{settle, Cluster};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Three pipelining workers, each topping up to 16 operations in flight every 100 ms, on
/// 8 keys (about 2 in flight per key and worker; the checker's search grows steeply with
/// the calls in flight at once on one key: with 4 keys it took up to 20 s a key).
const LOAD: Load = Load {
    clients: Clients::Pipelined {
        depth: 16,
        every: Duration::from_millis(100),
    },
    keys: 8,
};
const WORKERS: u64 = 3;

fn pipelined_clients_under_faults(name: &str, durable: bool) {
    let started = Instant::now();
    let mut cl = Cluster::with_mode(3, name, durable);
    cl.wait_serving("after boot");
    let stop = Arc::new(AtomicBool::new(false));
    let next_thread = Arc::new(AtomicU64::new(1000));
    let workers = spawn_workers(&cl, WORKERS, LOAD, &stop, &next_thread);
    let acked = acked_writer(
        cl.addrs(),
        stop.clone(),
        true,
        Duration::from_millis(50),
        16,
    );
    settle();
    // 1. kill -9 the leader (with up to 64 operations in flight on it), then restart it.
    let l = cl.leader();
    cl.kill9_and_restart(l, "leader");
    // 2. SIGSTOP the leader, then SIGCONT (it wakes up with its old ballot and the
    // requests it had read).
    let l = cl.leader();
    cl.stop_and_continue(l, "leader");
    // 3. SIGSTOP a follower, then SIGCONT.
    let f = (cl.leader() + 1) % 3;
    cl.stop_and_continue(f, "follower");

    // 4. Durable: kill -9 of all three, then restart them (volatile state would be gone).
    if durable {
        eprintln!("kill -9 all");
        for i in 0..3 {
            cl.kill9(i);
        }
        for i in 0..3 {
            cl.start(i);
        }
        cl.wait_serving("after kill -9 of all");
        settle();
    }

    stop.store(true, Ordering::Relaxed);
    let (history, acked) = join_and_check(&cl, workers, acked, LOAD.keys, "after the faults");
    let completed = history.iter().filter(|r| r.returned.is_some()).count();
    let overlap = max_concurrency(&history);
    eprintln!(
        "{} ops ({completed} completed, at most {overlap} in flight at once), {} acknowledged \
         unique writes, {:?} so far",
        history.len(),
        acked.len(),
        started.elapsed()
    );
    assert!(
        completed > 1000,
        "too few operations completed: {completed}"
    );
    assert!(
        acked.len() > 1000,
        "too few acknowledged writes: {}",
        acked.len()
    );
    // Pipelined for real: more in flight at once than there are connections.
    assert!(
        overlap > 2 * WORKERS as usize,
        "at most {overlap} operations in flight at once"
    );
    check_all_keys(history);
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn volatile_pipelined_clients_stay_linearizable_under_kill_and_stop() {
    pipelined_clients_under_faults("pipelined-volatile", false);
}

#[test]
fn durable_pipelined_clients_stay_linearizable_under_kill_and_stop() {
    pipelined_clients_under_faults("pipelined-durable", true);
}
