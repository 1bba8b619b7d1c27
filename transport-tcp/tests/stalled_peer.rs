//! A peer that stops reading (a SIGSTOPped process: its kernel still accepts the
//! connection, nothing reads it) must not block the caller of `flush`: a replica whose
//! flush blocked for `write_timeout` on a stopped follower stopped its heartbeat and all
//! its answers, and the other follower stood for election in vain (docs/status.md).

mod common;

use ballot::fabric::{Fabric, FabricError};
use ballot::layout::RING_OFFSET;
use ballot::NodeId;
use ballot_tcp::handshake::{self, Credentials};
use ballot_tcp::TcpFabric;
use common::*;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Node 1 as a stopped process: it completes the handshake of every peer's dial (node 2
/// may dial it before node 0 does), then never reads again (the streams are held until
/// `release` is dropped).
fn stopped_peer(l: std::net::TcpListener) -> mpsc::Sender<()> {
    let (release, held) = mpsc::channel::<()>();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let me = Credentials {
            cluster: CLUSTER,
            key: KEY,
            node: 1,
        };
        let mut streams = Vec::new();
        while let Err(mpsc::TryRecvError::Empty) = held.try_recv() {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    handshake::server(&mut s, me, |n| n == 0 || n == 2).unwrap();
                    streams.push(s); // read nothing
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        drop::<Vec<TcpStream>>(streams);
    });
    release
}

#[test]
fn flush_never_blocks_on_a_peer_that_stopped_reading() {
    let (l0, l1, l2) = (listener(), listener(), listener());
    let peers: BTreeMap<NodeId, SocketAddr> = [(0, &l0), (1, &l1), (2, &l2)]
        .into_iter()
        .map(|(i, l)| (i, l.local_addr().unwrap()))
        .collect();
    let _release = stopped_peer(l1);
    let mut c0 = config(0, CLUSTER, KEY, &peers);
    c0.tuning.write_timeout = Duration::from_secs(2);
    let mut f0 = TcpFabric::start_with_listener(c0, l0).unwrap();
    let mut f2 = TcpFabric::start_with_listener(config(2, CLUSTER, KEY, &peers), l2).unwrap();
    wait_until("node 0 connected to both", || {
        f0.is_connected(1) && f0.is_connected(2)
    });
    f2.set_writer(Some(0)).unwrap();
    // 24 MiB towards the stopped peer: far more than the sockets hold. Every flush returns
    // at once, and the live peer's writes complete meanwhile.
    let big = vec![7u8; 1 << 20];
    let mut slowest = Duration::ZERO;
    for k in 0..24u64 {
        f0.write(1, RING_OFFSET, &big, 100 + k).unwrap();
        f0.write(2, RING_OFFSET, &k.to_le_bytes(), 1000 + k)
            .unwrap();
        let t = Instant::now();
        f0.flush().unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(wait_write(&mut f0, 2, 1000 + k), Ok(()));
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a flush blocked for {slowest:?} on a peer that stopped reading"
    );
    // Past `write_timeout` the stuck peer is dropped: its writes fail, none is lost.
    let tokens: Vec<u64> = (100..124).collect();
    let results = wait_writes(&mut f0, 1, &tokens);
    assert!(
        results
            .iter()
            .all(|r| *r == Err(FabricError::Disconnected(1))),
        "{results:?}"
    );
    // The live peer is unaffected.
    f0.write(2, RING_OFFSET, b"still", 5000).unwrap();
    f0.flush().unwrap();
    assert_eq!(wait_write(&mut f0, 2, 5000), Ok(()));
}
