//! Ring credit stalls are counted (`Metrics::ring_credit_stalls`): a follower that stops
//! consuming its ring (its replica stopped, its memory still reachable, as a hung process
//! behind a live NIC) makes the leader run out of room in it while the other follower keeps
//! the cluster committing.

use ballot::driver::StateMachine;
use ballot::layout::RingGeometry;
use ballot::mem_fabric::MemNet;
use ballot::node::{InitialClusterState, Node, NodeBuilder};
use ballot::protocol::ProposeError;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Count(u64);
impl StateMachine for Count {
    fn apply(&mut self, _index: u64, _cmd: &[u8]) -> Vec<u8> {
        self.0 += 1;
        Vec::new()
    }
}

fn propose(nodes: &[Option<Node>], cmd: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in nodes.iter().flatten() {
            match n.handle().propose(cmd.to_vec(), Duration::from_secs(1)) {
                Ok(_) => return,
                Err(ProposeError::NotLeader { .. } | ProposeError::Indeterminate) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_follower_that_stops_consuming_stalls_the_leader_on_credit() {
    let dir = std::env::temp_dir().join(format!("ballot-credit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let net = MemNet::instant();
    // 64 slots of 64 bytes: a 4 KiB ring.
    let ring = RingGeometry::new(64, 64).unwrap();
    let mut nodes: Vec<Option<Node>> = (0..3u8)
        .map(|id| {
            NodeBuilder::new(
                id,
                7,
                vec![0, 1, 2],
                dir.join(id.to_string()),
                Count::default,
            )
            .ring(ring)
            .batch_bytes(1024)
            .initial_cluster_state(Some(InitialClusterState::New))
            .stall_warning(None)
            .start(|s| Ok(net.attach(s.node, s.region)))
            .map(Some)
            .unwrap()
        })
        .collect();
    propose(&nodes, b"first");
    let leader = nodes
        .iter()
        .flatten()
        .position(|n| n.handle().status().role == ballot::runtime::Role::Leader)
        .expect("a leader");
    let stopped = (leader + 1) % 3;
    let stalls = |n: &Node| n.handle().metrics().ring_credit_stalls[stopped].get();
    assert_eq!(stalls(nodes[leader].as_ref().unwrap()), 0);
    // It follows the leader's stream (it applied the first command) before it stops.
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes[stopped].as_ref().unwrap().handle().status().applied < 1 {
        assert!(Instant::now() < deadline, "replica {stopped} never applied");
        std::thread::sleep(Duration::from_millis(5));
    }
    nodes[stopped].take().unwrap().shutdown();
    // 40 commands of 200 bytes: twice the ring.
    for _ in 0..40 {
        propose(&nodes, &[b'x'; 200]);
    }
    let l = nodes[leader].as_ref().unwrap();
    assert_eq!(l.handle().status().role, ballot::runtime::Role::Leader);
    let n = stalls(l);
    eprintln!("credit stalls towards replica {stopped}: {n}");
    assert!(n >= 1, "no credit stall counted for replica {stopped}");
    // Once per stall: the ring stays full, so one stall lasts to the end.
    assert_eq!(n, 1);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
