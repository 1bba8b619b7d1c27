//! Every refusal: the offender is refused, counted and disconnected, and the fabric keeps
//! serving a good peer afterwards.

mod common;

use ballot::fabric::{Fabric, FabricError};
use ballot::layout::RING_OFFSET;
use ballot::NodeId;
use ballot_tcp::codec::{self, Frame, Limits, Status};
use ballot_tcp::handshake::{self, Credentials, HandshakeError};
use ballot_tcp::{Stats, TcpFabric};
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

/// Nodes 0 and 1 (good, node 1 writes node 0) and a configured-but-absent node 2 whose
/// slot the raw sockets use.
fn setup() -> Vec<TcpFabric> {
    let l0 = listener();
    let l1 = listener();
    let spare = listener();
    let peers: BTreeMap<NodeId, _> = [
        (0, l0.local_addr().unwrap()),
        (1, l1.local_addr().unwrap()),
        (2, spare.local_addr().unwrap()),
    ]
    .into();
    drop(spare); // nobody listens for node 2: its links just keep redialling
    let mut f = vec![
        TcpFabric::start_with_listener(config(0, CLUSTER, KEY, &peers), l0).unwrap(),
        TcpFabric::start_with_listener(config(1, CLUSTER, KEY, &peers), l1).unwrap(),
    ];
    wait_until("0 and 1 connect", || {
        f[0].is_connected(1) && f[1].is_connected(0)
    });
    f[0].set_writer(Some(1)).unwrap();
    f[1].set_writer(Some(0)).unwrap();
    f
}

fn raw(f: &TcpFabric) -> TcpStream {
    let s = TcpStream::connect(f.local_addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn creds(cluster: u64, key: &'static [u8], node: NodeId) -> Credentials<'static> {
    Credentials { cluster, key, node }
}

/// The server closed the connection (EOF or reset), within [`WAIT`].
fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue, // a NACK may precede the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

fn refused_handshake(
    f: &mut [TcpFabric],
    c: Credentials<'static>,
    want: fn(&HandshakeError) -> bool,
) {
    let before: Stats = f[0].stats();
    let mut s = raw(&f[0]);
    let r = handshake::client(&mut s, c, 0);
    drop(s); // a client that rejects the server hangs up
    assert!(r.as_ref().is_err_and(want), "{r:?}");
    wait_until("the refusal is counted", || {
        f[0].stats().refused_handshakes > before.refused_handshakes
    });
    assert_eq!(f[0].stats().accepted, before.accepted);
    assert_serves(f, 1, 0, 1);
    assert_serves(f, 0, 1, 2);
}

#[test]
fn wrong_key_is_refused() {
    let mut f = setup();
    refused_handshake(&mut f, creds(CLUSTER, b"wrong key", 2), |e| {
        matches!(e, HandshakeError::BadMac)
    });
}

#[test]
fn unknown_node_id_is_refused() {
    let mut f = setup();
    refused_handshake(&mut f, creds(CLUSTER, KEY, 7), |e| {
        matches!(e, HandshakeError::Refused)
    });
    // Claiming to be the server itself is refused as well.
    refused_handshake(&mut f, creds(CLUSTER, KEY, 0), |e| {
        matches!(e, HandshakeError::Refused)
    });
}

#[test]
fn wrong_cluster_is_refused() {
    let mut f = setup();
    refused_handshake(&mut f, creds(CLUSTER + 1, KEY, 2), |e| {
        matches!(e, HandshakeError::Refused)
    });
}

#[test]
fn garbage_instead_of_a_handshake_is_refused() {
    let mut f = setup();
    let before = f[0].stats();
    let mut s = raw(&f[0]);
    s.write_all(&[0x42; 200]).unwrap();
    assert_closed(&mut s);
    wait_until("the refusal is counted", || {
        f[0].stats().refused_handshakes > before.refused_handshakes
    });
    assert_serves(&mut f, 1, 0, 1);
}

/// A whole fabric configured with the wrong key never gets in, and is refused on every
/// redial, while the good nodes carry on.
#[test]
fn node_with_wrong_key_never_connects() {
    let mut f = setup();
    let peers: BTreeMap<NodeId, _> = [
        (0, f[0].local_addr()),
        (2, listener().local_addr().unwrap()),
    ]
    .into();
    let bad = TcpFabric::start(config(2, CLUSTER, b"not the key", &peers));
    let bad = bad.unwrap();
    wait_until("two refusals", || f[0].stats().refused_handshakes >= 2);
    assert!(!bad.is_connected(0));
    assert!(
        bad.stats().refused_handshakes >= 1,
        "the client side refuses too"
    );
    assert_serves(&mut f, 1, 0, 1);
}

/// An authenticated raw connection as node 2.
fn authed(f: &TcpFabric) -> TcpStream {
    let mut s = raw(f);
    handshake::client(&mut s, creds(CLUSTER, KEY, 2), 0).unwrap();
    s
}

fn refused_frame(f: &mut [TcpFabric], bytes: &[u8]) {
    let before = f[0].stats();
    let mut s = authed(&f[0]);
    s.write_all(bytes).unwrap();
    assert_closed(&mut s);
    wait_until("the refused frame is counted", || {
        f[0].stats().refused_frames > before.refused_frames
    });
    assert_eq!(
        f[0].stats().writes_landed,
        before.writes_landed,
        "nothing landed"
    );
    assert_serves(f, 1, 0, 3);
}

#[test]
fn truncated_frame_is_refused() {
    let mut f = setup();
    let mut frame = Vec::new();
    codec::encode(
        &Frame::Write {
            token: 1,
            offset: RING_OFFSET as u64,
            data: &[5; 100],
        },
        &mut frame,
    )
    .unwrap();
    for cut in [10, 30, 123] {
        let before = f[0].stats();
        let mut s = authed(&f[0]);
        s.write_all(&frame[..cut]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_closed(&mut s);
        wait_until("counted", || {
            f[0].stats().refused_frames > before.refused_frames
        });
    }
    assert_eq!(read_region(f[0].region(), RING_OFFSET, 100), vec![0; 100]);
    assert_serves(&mut f, 1, 0, 4);
}

#[test]
fn malformed_frames_are_refused() {
    let mut f = setup();
    // Unknown op.
    refused_frame(&mut f, &[0xFF; 24]);
    // Non-zero reserved bytes.
    let mut b = Vec::new();
    codec::encode(&Frame::Control { bytes: b"hi" }, &mut b).unwrap();
    b[2] = 1;
    refused_frame(&mut f, &b);
    // A CONTROL frame longer than MAX_CONTROL: refused on its header.
    let mut h = vec![3u8, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(&[0; 16]);
    refused_frame(&mut f, &h);
    // A response frame sent to the NIC.
    let mut b = Vec::new();
    codec::encode(
        &Frame::WriteAck {
            token: 1,
            status: Status::Ok,
        },
        &mut b,
    )
    .unwrap();
    refused_frame(&mut f, &b);
}

#[test]
fn random_frames_are_refused() {
    let mut f = setup();
    let limits = Limits::for_region(f[0].region().len());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut sent = 0;
    while sent < 8 {
        let bytes: Vec<u8> = (0..96)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Only bytes that the decoder rejects outright (not "incomplete", not valid).
        match codec::decode(&bytes, &limits) {
            Err(codec::CodecError::Incomplete { .. }) | Ok(_) => continue,
            Err(_) => {}
        }
        refused_frame(&mut f, &bytes);
        sent += 1;
    }
}

#[test]
fn write_without_permission_is_denied_not_landed() {
    let mut f = setup();
    let before = f[0].stats();
    // A raw peer (node 2) without permission: a NACK with PermissionDenied, nothing lands.
    let mut s = authed(&f[0]);
    let mut b = Vec::new();
    codec::encode(
        &Frame::Write {
            token: 77,
            offset: RING_OFFSET as u64 + 8,
            data: &[0xEE; 40],
        },
        &mut b,
    )
    .unwrap();
    s.write_all(&b).unwrap();
    let mut resp = [0u8; codec::HEADER_LEN];
    s.read_exact(&mut resp).unwrap();
    let (frame, _) = codec::decode(&resp, &Limits::for_region(0)).unwrap();
    assert_eq!(
        frame,
        Frame::WriteAck {
            token: 77,
            status: Status::PermissionDenied
        }
    );
    assert_eq!(read_region(f[0].region(), RING_OFFSET + 8, 40), vec![0; 40]);
    assert_eq!(f[0].stats().denied_writes, before.denied_writes + 1);
    // The same through a fabric: node 0 holds no permission on node 1 after a switch.
    f[1].set_writer(None).unwrap();
    f[0].write(1, RING_OFFSET, &[1; 8], 5).unwrap();
    f[0].flush().unwrap();
    assert_eq!(
        wait_write(&mut f[0], 1, 5),
        Err(FabricError::PermissionDenied(1))
    );
    assert_serves(&mut f, 1, 0, 6);
    drop(s);
}
