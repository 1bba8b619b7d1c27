#![allow(dead_code)]

use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent};
use ballot::layout::{RegionInfo, RingGeometry, RING_OFFSET};
use ballot::region::Region;
use ballot::NodeId;
use ballot_tcp::{TcpConfig, TcpFabric, Tuning};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CLUSTER: u64 = 0x00BA_1107;
pub const KEY: &[u8] = b"correct horse battery staple";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn region(cluster: u64, node: NodeId) -> Arc<Region> {
    let info = RegionInfo {
        cluster,
        node,
        ring: RingGeometry::new(1 << 16, 64).unwrap(),
    };
    Arc::new(Region::anonymous(info).unwrap())
}

pub fn tuning() -> Tuning {
    Tuning {
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        handshake_timeout: Duration::from_secs(2),
        ..Tuning::default()
    }
}

pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

pub fn config(
    node: NodeId,
    cluster: u64,
    key: &[u8],
    peers: &BTreeMap<NodeId, SocketAddr>,
) -> TcpConfig {
    let mut c = TcpConfig::new(
        node,
        cluster,
        key,
        peers[&node],
        peers.clone(),
        region(cluster, node),
    );
    c.tuning = tuning();
    c
}

/// Starts nodes `0..n` of one cluster on loopback and waits until all are connected.
pub fn cluster(n: u8) -> Vec<TcpFabric> {
    let ls: Vec<TcpListener> = (0..n).map(|_| listener()).collect();
    let peers: BTreeMap<NodeId, SocketAddr> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as NodeId, l.local_addr().unwrap()))
        .collect();
    let fabs: Vec<TcpFabric> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            TcpFabric::start_with_listener(config(i as NodeId, CLUSTER, KEY, &peers), l).unwrap()
        })
        .collect();
    for f in &fabs {
        assert!(f.wait_connected(WAIT), "node {} did not connect", f.node());
    }
    fabs
}

/// Polls until `pick` has returned `Some` for `n` events, in order; other events are
/// dropped. Panics after [`WAIT`].
pub fn wait_many<T>(
    f: &mut TcpFabric,
    n: usize,
    mut pick: impl FnMut(&FabricEvent) -> Option<T>,
) -> Vec<T> {
    let deadline = Instant::now() + WAIT;
    let mut evs = Vec::new();
    let mut got = Vec::new();
    while got.len() < n {
        evs.clear();
        f.poll(&mut evs);
        got.extend(evs.iter().filter_map(&mut pick));
        assert!(Instant::now() < deadline, "timed out waiting for events");
        if got.len() < n {
            f.wait_for_events(Duration::from_millis(20));
        }
    }
    assert_eq!(got.len(), n, "more events matched than expected");
    got
}

/// Polls until `pick` returns `Some` once; other events are dropped.
pub fn wait_for<T>(f: &mut TcpFabric, pick: impl FnMut(&FabricEvent) -> Option<T>) -> T {
    wait_many(f, 1, pick).pop().unwrap()
}

/// The results of the write completions from `peer` for `tokens`, in token order.
pub fn wait_writes(
    f: &mut TcpFabric,
    peer: NodeId,
    tokens: &[u64],
) -> Vec<Result<(), FabricError>> {
    let mut got = wait_many(f, tokens.len(), |e| match e {
        FabricEvent::Completion(Completion::Write {
            peer: p,
            token,
            result,
        }) if *p == peer && tokens.contains(token) => Some((*token, result.clone())),
        _ => None,
    });
    got.sort_by_key(|x| x.0);
    got.into_iter().map(|x| x.1).collect()
}

pub fn wait_write(f: &mut TcpFabric, peer: NodeId, token: u64) -> Result<(), FabricError> {
    wait_for(f, |e| match e {
        FabricEvent::Completion(Completion::Write {
            peer: p,
            token: t,
            result,
        }) if *p == peer && *t == token => Some(result.clone()),
        _ => None,
    })
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn read_region(r: &Region, offset: usize, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    r.read(offset, &mut b).unwrap();
    b
}

/// `from` (which must hold `to`'s write permission) writes into `to`'s ring and the bytes
/// land: the proof that `to` still serves a good peer.
pub fn assert_serves(fabs: &mut [TcpFabric], from: usize, to: usize, token: u64) {
    let to_id = to as NodeId;
    let data: Vec<u8> = (0..200u32).map(|i| (i as u64 * 31 + token) as u8).collect();
    let at = RING_OFFSET + 4096 + (token as usize % 64) * 256;
    fabs[from].write(to_id, at, &data, token).unwrap();
    fabs[from].flush().unwrap();
    assert_eq!(wait_write(&mut fabs[from], to_id, token), Ok(()));
    assert_eq!(read_region(fabs[to].region(), at, data.len()), data);
}
