//! What the driver publishes in `Metrics` besides the core's measurements:
//!
//! - ring credit stalls (`Metrics::ring_credit_stalls`): a follower that stops consuming
//!   its ring (its replica stopped, its memory still reachable, as a hung process behind a
//!   live NIC) makes the leader run out of room in it while the other follower keeps the
//!   cluster committing;
//! - a fabric's own counters (`Fabric::counters`, as the RDMA fabric keeps them), in
//!   `Metrics::fabric` of a node started with `NodeBuilder`.

use ballot::driver::StateMachine;
use ballot::fabric::{Fabric, FabricError, FabricEvent};
use ballot::layout::RingGeometry;
use ballot::mem_fabric::{MemFabric, MemNet};
use ballot::metrics::{FabricCounters, FabricPeerCounters};
use ballot::node::{InitialClusterState, Node, NodeBuilder};
use ballot::protocol::ProposeError;
use ballot::region::Region;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Count(u64);
impl StateMachine for Count {
    fn apply(&mut self, _index: u64, _cmd: &[u8], _out: &mut Vec<u8>) {
        self.0 += 1;
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

/// The in-process fabric, with counters of its own.
struct Counted(MemFabric, Arc<Fixed>);

#[derive(Debug)]
struct Fixed;
impl FabricCounters for Fixed {
    fn name(&self) -> &'static str {
        "fixed"
    }
    fn peer(&self, peer: u8) -> FabricPeerCounters {
        FabricPeerCounters {
            sent_bytes: u64::from(peer) + 1,
            ..FabricPeerCounters::default()
        }
    }
    fn refused_handshakes(&self) -> u64 {
        0
    }
}

impl Fabric for Counted {
    fn node(&self) -> u8 {
        self.0.node()
    }
    fn region(&self) -> &Arc<Region> {
        self.0.region()
    }
    fn write(&mut self, p: u8, off: usize, data: &[u8], t: u64) -> Result<(), FabricError> {
        self.0.write(p, off, data, t)
    }
    fn read(&mut self, p: u8, off: usize, len: usize, t: u64) -> Result<(), FabricError> {
        self.0.read(p, off, len, t)
    }
    fn send(&mut self, p: u8, msg: &[u8]) -> Result<(), FabricError> {
        self.0.send(p, msg)
    }
    fn flush(&mut self) -> Result<(), FabricError> {
        self.0.flush()
    }
    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        self.0.poll(out)
    }
    fn set_writer(&mut self, w: Option<u8>) -> Result<(), FabricError> {
        self.0.set_writer(w)
    }
    fn counters(&self) -> Option<Arc<dyn FabricCounters>> {
        Some(self.1.clone())
    }
}

#[test]
fn a_fabrics_counters_are_published_in_the_metrics() {
    let dir = std::env::temp_dir().join(format!("ballot-fabric-counters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let net = MemNet::instant();
    let node = NodeBuilder::new(0, 7, vec![0], &dir, Count::default)
        .initial_cluster_state(Some(InitialClusterState::New))
        .stall_warning(None)
        .start(|s| Ok(Counted(net.attach(s.node, s.region), Arc::new(Fixed))))
        .unwrap();
    let f = node
        .handle()
        .metrics()
        .fabric
        .get()
        .expect("published")
        .clone();
    assert_eq!(f.name(), "fixed");
    assert_eq!(f.peer(2).sent_bytes, 3);
    node.shutdown();
    // A fabric that keeps none publishes none.
    let node = NodeBuilder::new(0, 7, vec![0], &dir, Count::default)
        .stall_warning(None)
        .start(|s| Ok(net.attach(s.node, s.region)))
        .unwrap();
    assert!(node.handle().metrics().fabric.get().is_none());
    node.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
