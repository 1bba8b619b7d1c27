//! End-to-end tests of the TCP fabric on loopback.

mod common;

use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent, MAX_CONTROL};
use ballot::layout::{
    progress_offset, ProgressCell, COMMIT_CELL_OFFSET, HEARTBEAT_OFFSET, RING_OFFSET,
};
use ballot::NodeId;
use ballot_tcp::TcpFabric;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn write_lands_bytes_at_the_offset() {
    let mut f = cluster(2);
    f[1].set_writer(Some(0)).unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    let at = RING_OFFSET + 12_345;
    let before = read_region(f[1].region(), at - 8, 8);
    f[0].write(1, at, &data, 42).unwrap();
    f[0].flush().unwrap();
    assert_eq!(wait_write(&mut f[0], 1, 42), Ok(()));
    assert_eq!(read_region(f[1].region(), at, data.len()), data);
    // Nothing around it moved.
    assert_eq!(read_region(f[1].region(), at - 8, 8), before);
    assert_eq!(read_region(f[1].region(), at + data.len(), 8), vec![0; 8]);
    assert_eq!(f[1].stats().writes_landed, 1);
    assert_eq!(f[1].stats().bytes_landed, 1000);
    // Per-peer counters, readable after the fabric moved elsewhere.
    let (r0, r1) = (f[0].stats_reader(), f[1].stats_reader());
    let (p01, p10) = (r0.peer(1), r1.peer(0));
    assert!(p01.connected && p01.bytes_sent > 1000, "{p01:?}");
    assert!(p10.bytes_received >= p01.bytes_sent - 64, "{p10:?} {p01:?}");
    assert_eq!(r0.peer(0), Default::default());
    assert_eq!(r0.peer(200), Default::default());
    // A large write (a 1 MiB entry) too.
    let big: Vec<u8> = (0..(1 << 20) + 40).map(|i| (i % 251) as u8).collect();
    f[0].write(1, RING_OFFSET, &big, 43).unwrap();
    f[0].flush().unwrap();
    assert_eq!(wait_write(&mut f[0], 1, 43), Ok(()));
    assert_eq!(read_region(f[1].region(), RING_OFFSET, big.len()), big);
    // The commit cell is a ring-class target as well.
    f[0].write(1, COMMIT_CELL_OFFSET, &[9; 24], 44).unwrap();
    f[0].flush().unwrap();
    assert_eq!(wait_write(&mut f[0], 1, 44), Ok(()));
    assert_eq!(
        read_region(f[1].region(), COMMIT_CELL_OFFSET, 24),
        vec![9; 24]
    );
}

#[test]
fn read_returns_bytes() {
    let mut f = cluster(2);
    f[1].region().store_word(HEARTBEAT_OFFSET, 0xDEAD_BEEF_0102);
    let ring: Vec<u8> = (0..300u32).map(|i| (i ^ 0x5a) as u8).collect();
    f[1].region().write(RING_OFFSET + 64, &ring).unwrap();
    f[0].read(1, HEARTBEAT_OFFSET, 8, 1).unwrap();
    f[0].read(1, RING_OFFSET + 64, ring.len(), 2).unwrap();
    f[0].flush().unwrap();
    let got: BTreeMap<u64, Vec<u8>> = wait_many(&mut f[0], 2, |e| match e {
        FabricEvent::Completion(Completion::Read {
            peer: 1,
            token,
            result,
        }) => Some((*token, result.clone().unwrap())),
        _ => None,
    })
    .into_iter()
    .collect();
    assert_eq!(got[&1], 0xDEAD_BEEF_0102u64.to_le_bytes());
    assert_eq!(got[&2], ring);
    // Out of bounds: refused with OutOfBounds.
    let len = f[1].region().len();
    f[0].read(1, len - 4, 8, 3).unwrap();
    f[0].flush().unwrap();
    let r = wait_for(&mut f[0], |e| match e {
        FabricEvent::Completion(Completion::Read {
            token: 3, result, ..
        }) => Some(result.clone()),
        _ => None,
    });
    assert_eq!(r, Err(FabricError::OutOfBounds(1)));
}

#[test]
fn control_messages_are_delivered() {
    let mut f = cluster(3);
    f[0].send(1, b"prepare 7").unwrap();
    f[2].send(1, b"promise").unwrap();
    let big = vec![0xAB; 1 << 20];
    f[0].send(1, &big).unwrap();
    f[0].flush().unwrap();
    f[2].flush().unwrap();
    let mut got = wait_many(&mut f[1], 3, |e| match e {
        FabricEvent::Message { from, bytes } => Some((*from, bytes.clone())),
        _ => None,
    });
    got.sort();
    assert_eq!(
        got,
        vec![
            (0, b"prepare 7".to_vec()),
            (0, big.clone()),
            (2, b"promise".to_vec())
        ]
    );
    assert!(matches!(
        f[0].send(1, &vec![0; MAX_CONTROL + 1]),
        Err(FabricError::TooLarge { .. })
    ));
    assert_eq!(f[0].send(9, b"x"), Err(FabricError::UnknownPeer(9)));
}

#[test]
fn batching_many_writes_one_flush() {
    const N: u64 = 2000;
    let mut f = cluster(2);
    f[1].set_writer(Some(0)).unwrap();
    let s0 = f[0].stats();
    let s1 = f[1].stats();
    for i in 0..N {
        let entry = [(i % 251) as u8; 64];
        f[0].write(1, RING_OFFSET + i as usize * 64, &entry, i)
            .unwrap();
    }
    f[0].flush().unwrap();
    let sent = f[0].stats().send_syscalls - s0.send_syscalls;
    assert!(
        sent <= 2,
        "{N} writes took {sent} write(2) calls in one flush"
    );
    let mut tokens = Vec::new();
    let mut batches = 0;
    let mut evs = Vec::new();
    while (tokens.len() as u64) < N {
        evs.clear();
        if f[0].poll(&mut evs) == 0 {
            assert!(f[0].wait_for_events(WAIT), "completions stalled");
            continue;
        }
        batches += 1;
        for e in &evs {
            match e {
                FabricEvent::Completion(Completion::Write {
                    peer: 1,
                    token,
                    result: Ok(()),
                }) => tokens.push(*token),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // In posting order, every one.
    assert_eq!(tokens, (0..N).collect::<Vec<_>>());
    for i in [0, N / 2, N - 1] {
        let at = RING_OFFSET + i as usize * 64;
        assert_eq!(
            read_region(f[1].region(), at, 64),
            vec![(i % 251) as u8; 64]
        );
    }
    // The receiver answered in batches, too.
    let acks = f[1].stats().send_syscalls - s1.send_syscalls;
    assert!(
        acks < N / 10,
        "{N} writes were acknowledged with {acks} write(2) calls"
    );
    assert!(batches < N / 10, "{N} completions came in {batches} polls");
}

#[test]
fn outstanding_bound_is_explicit() {
    let mut f = cluster(2);
    // Not flushed: they stay outstanding, and the bound refuses the next one.
    let max = ballot_tcp::Tuning::default().max_outstanding as u64;
    f[1].set_writer(Some(0)).unwrap();
    for i in 0..max {
        f[0].write(1, RING_OFFSET, &[1; 8], i).unwrap();
    }
    assert_eq!(
        f[0].write(1, RING_OFFSET, &[1; 8], max),
        Err(FabricError::Busy)
    );
    f[0].flush().unwrap();
    assert_eq!(wait_write(&mut f[0], 1, max - 1), Ok(()));
    f[0].write(1, RING_OFFSET, &[1; 8], max).unwrap();
}

#[test]
fn permission_fence() {
    let mut f = cluster(3);
    let at = RING_OFFSET + 640;
    // No writer yet: nobody may write the ring.
    f[0].write(2, at, &[1; 32], 1).unwrap();
    f[0].flush().unwrap();
    assert_eq!(
        wait_write(&mut f[0], 2, 1),
        Err(FabricError::PermissionDenied(2))
    );
    f[2].set_writer(Some(0)).unwrap();
    assert_serves(&mut f, 0, 2, 2);
    // b is fenced: PermissionDenied, and nothing lands.
    f[1].write(2, at, &[0xEE; 32], 3).unwrap();
    f[1].write(2, COMMIT_CELL_OFFSET, &[0xEE; 24], 4).unwrap();
    f[1].flush().unwrap();
    assert_eq!(
        wait_writes(&mut f[1], 2, &[3, 4]),
        vec![Err(FabricError::PermissionDenied(2)); 2]
    );
    assert_ne!(read_region(f[2].region(), at, 32), vec![0xEE; 32]);
    assert_eq!(
        read_region(f[2].region(), COMMIT_CELL_OFFSET, 24),
        vec![0; 24]
    );
    // A fenced peer still writes its own progress cell, and only its own.
    let cell = ProgressCell {
        received: 5,
        ..Default::default()
    }
    .encode();
    f[1].write(2, progress_offset(1), &cell, 5).unwrap();
    f[1].write(2, progress_offset(0), &cell, 6).unwrap();
    f[1].flush().unwrap();
    assert_eq!(
        wait_writes(&mut f[1], 2, &[5, 6]),
        vec![Ok(()), Err(FabricError::OutOfBounds(2))]
    );
    assert_eq!(
        read_region(f[2].region(), progress_offset(1), cell.len()),
        cell
    );
    assert_eq!(
        read_region(f[2].region(), progress_offset(0), cell.len()),
        vec![0; cell.len()]
    );
    // Permission moves: now a is fenced and b writes.
    wait_until("b reconnects", || f[1].is_connected(2));
    f[2].set_writer(Some(1)).unwrap();
    f[0].write(2, at, &[0xAA; 32], 7).unwrap();
    f[0].flush().unwrap();
    assert_eq!(
        wait_write(&mut f[0], 2, 7),
        Err(FabricError::PermissionDenied(2))
    );
    assert_serves(&mut f, 1, 2, 8);
    let s = f[2].stats();
    assert_eq!(s.denied_writes, 4, "{s:?}");
    assert_eq!(f[2].set_writer(Some(9)), Err(FabricError::UnknownPeer(9)));
}

/// While a writes as fast as it can, the owner moves permission to b: once `set_writer`
/// returns, not one more byte of a's lands.
fn word(f: &TcpFabric, at: usize) -> u64 {
    u64::from_le_bytes(read_region(f.region(), at, 8).try_into().unwrap())
}

#[test]
fn fence_is_in_force_when_set_writer_returns() {
    let mut f = cluster(2);
    let mut owner = f.pop().unwrap();
    let mut a = f.pop().unwrap();
    owner.set_writer(Some(0)).unwrap();
    let at = RING_OFFSET;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut denied = 0u64;
        let mut evs = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..16 {
                n += 1;
                let _ = a.write(1, at, &n.to_le_bytes(), n);
            }
            a.flush().unwrap();
            evs.clear();
            a.poll(&mut evs);
            denied += evs
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        FabricEvent::Completion(Completion::Write {
                            result: Err(FabricError::PermissionDenied(_)),
                            ..
                        })
                    )
                })
                .count() as u64;
            std::thread::sleep(Duration::from_micros(50));
        }
        (a, denied)
    });
    wait_until("a's writes land", || word(&owner, at) > 100);
    owner.set_writer(None).unwrap();
    let frozen = word(&owner, at);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(word(&owner, at), frozen, "a write landed after the fence");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (_a, denied) = writer.join().unwrap();
    assert!(denied > 0, "a never learned it was fenced");
    assert!(owner.stats().denied_writes > 0);
}

#[test]
fn out_of_bounds_write_is_refused_and_others_are_served() {
    let mut f = cluster(3);
    f[1].set_writer(Some(0)).unwrap();
    let len = f[1].region().len();
    let s = f[1].stats();
    f[0].write(1, len - 8, &[7; 16], 1).unwrap();
    f[0].flush().unwrap();
    assert_eq!(
        wait_write(&mut f[0], 1, 1),
        Err(FabricError::OutOfBounds(1))
    );
    // The region header (magic, geometry) is never remotely writable.
    wait_until("reconnect", || f[0].is_connected(1));
    f[0].write(1, 0, &[0; 8], 2).unwrap();
    f[0].flush().unwrap();
    assert_eq!(
        wait_write(&mut f[0], 1, 2),
        Err(FabricError::OutOfBounds(1))
    );
    wait_until("the refusals are counted", || {
        let n = f[1].stats();
        n.out_of_bounds == s.out_of_bounds + 2 && n.refused_frames == s.refused_frames + 2
    });
    assert_eq!(
        read_region(f[1].region(), 0, 8),
        ballot::layout::MAGIC.to_le_bytes()
    );
    // Node 1 still serves node 2 and, after it redials, node 0.
    f[1].set_writer(Some(2)).unwrap();
    assert_serves(&mut f, 2, 1, 3);
    f[1].set_writer(Some(0)).unwrap();
    wait_until("reconnect", || f[0].is_connected(1));
    assert_serves(&mut f, 0, 1, 4);
}

#[test]
fn disconnect_fails_outstanding_and_reconnect_works() {
    let mut f = cluster(2);
    let addr1 = f[1].local_addr();
    let peers: BTreeMap<NodeId, _> = [(0, f[0].local_addr()), (1, addr1)].into();
    // Posted (and, for half of them, flushed) but not completed when node 1 goes away.
    for t in 0..10 {
        f[0].write(1, RING_OFFSET, &[1; 64], t).unwrap();
    }
    f[0].read(1, RING_OFFSET, 64, 10).unwrap();
    drop(f.pop()); // node 1 stops: its listener and connections close
    f[0].flush().unwrap();
    let results = wait_many(&mut f[0], 11, |e| match e {
        FabricEvent::Completion(Completion::Write { result, .. }) => Some(result.clone()),
        FabricEvent::Completion(Completion::Read { result, .. }) => {
            Some(result.clone().map(|_| ()))
        }
        _ => None,
    });
    for r in results {
        // Unpermitted writes may have been refused before the close; none may succeed.
        assert!(
            matches!(
                r,
                Err(FabricError::Disconnected(1) | FabricError::PermissionDenied(1))
            ),
            "{r:?}"
        );
    }
    wait_until("disconnect seen", || !f[0].is_connected(1));
    // Posting while down completes at once with Disconnected.
    f[0].write(1, RING_OFFSET, &[1; 8], 99).unwrap();
    assert_eq!(
        wait_write(&mut f[0], 1, 99),
        Err(FabricError::Disconnected(1))
    );
    assert_eq!(f[0].send(1, b"x"), Err(FabricError::Disconnected(1)));
    // Node 1 restarts on the same address; node 0 redials with back-off.
    let mut n1 = TcpFabric::start(config(1, CLUSTER, KEY, &peers)).unwrap();
    assert!(f[0].wait_connected(WAIT));
    assert!(n1.wait_connected(WAIT));
    n1.set_writer(Some(0)).unwrap();
    f.push(n1);
    assert_serves(&mut f, 0, 1, 100);
    assert!(f[0].stats().disconnects >= 1);
    let p = f[0].stats_reader().peer(1);
    assert!(p.disconnects >= 1 && p.connected, "{p:?}");
}

#[test]
fn time_write_measures_a_round_trip() {
    let mut f = cluster(2);
    f[1].set_writer(Some(0)).unwrap();
    f[0].send(1, b"keep me").unwrap();
    f[1].send(0, b"for later").unwrap();
    f[1].flush().unwrap();
    let mut samples = Vec::new();
    for _ in 0..50 {
        let d = f[0]
            .time_write(1, RING_OFFSET, &[3; 64], Duration::from_secs(5))
            .unwrap();
        samples.push(d);
    }
    samples.sort();
    eprintln!(
        "64-byte WRITE round trip: min {:?} p50 {:?} max {:?}",
        samples[0], samples[25], samples[49]
    );
    assert!(samples[25] < Duration::from_millis(50), "{:?}", samples[25]);
    // Events that arrived meanwhile were kept.
    let m = wait_for(&mut f[0], |e| match e {
        FabricEvent::Message { from: 1, bytes } => Some(bytes.clone()),
        _ => None,
    });
    assert_eq!(m, b"for later");
}

/// Operations already flushed to a peer that never answers fail with `Disconnected` when
/// that peer's connection dies, in posting order, and none is reported twice.
#[test]
fn in_flight_operations_fail_when_the_peer_dies() {
    use ballot_tcp::handshake::{self, Credentials};
    use std::io::Read;
    let l0 = listener();
    let fake = listener();
    let peers: BTreeMap<NodeId, _> = [
        (0, l0.local_addr().unwrap()),
        (1, fake.local_addr().unwrap()),
    ]
    .into();
    let mut n0 = TcpFabric::start_with_listener(config(0, CLUSTER, KEY, &peers), l0).unwrap();
    // A fake node 1: authenticates, swallows frames, never answers, then dies.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let fake_thread = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let me = Credentials {
            cluster: CLUSTER,
            key: KEY,
            node: 1,
        };
        handshake::server(&mut s, me, |n| n == 0).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut got = 0usize;
        let mut b = [0u8; 4096];
        while go_rx.try_recv().is_err() {
            if let Ok(n) = s.read(&mut b) {
                got += n;
            }
        }
        got
    });
    wait_until("node 0 reaches the fake", || n0.is_connected(1));
    for t in 0..20 {
        n0.write(1, RING_OFFSET, &[1; 32], t).unwrap();
    }
    n0.read(1, RING_OFFSET, 8, 20).unwrap();
    n0.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut evs = Vec::new();
    assert_eq!(
        n0.poll(&mut evs),
        0,
        "nothing completes while the peer is silent"
    );
    go_tx.send(()).unwrap();
    let got = fake_thread.join().unwrap(); // the fake's socket closes here
    assert_eq!(got, 20 * (24 + 32) + 24, "the fake received every frame");
    let tokens = wait_many(&mut n0, 21, |e| match e {
        FabricEvent::Completion(Completion::Write {
            peer: 1,
            token,
            result: Err(FabricError::Disconnected(1)),
        })
        | FabricEvent::Completion(Completion::Read {
            peer: 1,
            token,
            result: Err(FabricError::Disconnected(1)),
        }) => Some(*token),
        _ => None,
    });
    assert_eq!(tokens, (0..21).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(50));
    evs.clear();
    n0.poll(&mut evs);
    assert!(
        !evs.iter().any(|e| matches!(e, FabricEvent::Completion(_))),
        "an operation completed twice: {evs:?}"
    );
}
