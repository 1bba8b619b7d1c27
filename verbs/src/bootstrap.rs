//! TCP bootstrap: each pair of replicas exchanges one [`Hello`] (queue-pair numbers, PSNs,
//! GID, region addresses and rkeys), then a one-byte "ready" once both QPs are connected.
//!
//! Every bootstrap connection first passes `ballot_tcp::handshake` (mutual HMAC-SHA256
//! challenge-response over the cluster key, docs/tcp-fabric.md): a process without the key
//! learns no QP number, address or rkey, and can hand us none.
//!
//! At first start the lower node id listens, the higher connects. A process that restarted
//! (`dial_all`) connects to every peer; the survivors' [`spawn_listener`] thread keeps
//! accepting after the initial bootstrap and hands each authenticated stream to the fabric,
//! which replaces that peer's QPs (docs/rdma.md, "Re-bootstrap").

use ballot::NodeId;
use ballot_tcp::handshake::{self, Credentials};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster's identity on the bootstrap connections.
#[derive(Clone)]
pub struct Auth {
    pub cluster: u64,
    pub key: Vec<u8>,
    pub node: NodeId,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Auth {
    fn creds(&self) -> Credentials<'_> {
        Credentials {
            cluster: self.cluster,
            key: &self.key,
            node: self.node,
        }
    }
}

/// Dials `p` at `addr` and authenticates; the stream has `timeout` as read/write timeout.
pub fn dial(
    auth: &Auth,
    p: NodeId,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(io(&format!("connect to node {p} at {addr}"), e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    handshake::client(&mut s, auth.creds(), p)
        .map_err(|e| format!("bootstrap: authenticating to node {p} at {addr} refused: {e}"))?;
    Ok(s)
}

/// Authenticates an accepted stream; returns the peer's id.
fn admit(
    auth: &Auth,
    s: &mut TcpStream,
    known: impl Fn(NodeId) -> bool,
    timeout: Duration,
) -> Result<NodeId, String> {
    s.set_nonblocking(false).map_err(|e| io("accept", e))?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    handshake::server(s, auth.creds(), known).map_err(|e| match e {
        // Server side: the client hung up, typically after rejecting our key proof.
        handshake::HandshakeError::Refused => {
            "the peer closed the connection during the handshake (it rejected our key proof: \
             a different cluster key?)"
                .to_string()
        }
        e => e.to_string(),
    })
}

/// The re-bootstrap listener: accepts, authenticates (refusals are counted in `refused`
/// and logged to stderr), and sends `(peer, stream)` to the fabric, until `stop`.
pub fn spawn_listener(
    listen: TcpListener,
    auth: Auth,
    peers: Vec<NodeId>,
    tx: Sender<(NodeId, TcpStream)>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listen.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name(format!("rdma-bootstrap-{}", auth.node))
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match listen.accept() {
                    Ok((mut s, from)) => {
                        match admit(
                            &auth,
                            &mut s,
                            |id| peers.contains(&id),
                            Duration::from_secs(5),
                        ) {
                            Ok(p) => {
                                if tx.send((p, s)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    "node {}: bootstrap connection from {from} refused: {e}",
                                    auth.node
                                );
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
}

const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"BALRDMA1");
pub const HELLO_SIZE: usize = 128;

/// What one side tells the other about itself. Addresses are virtual addresses in the
/// sender; `progress_*` is the sender's registration of the *receiver's* progress cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hello {
    pub cluster: u64,
    pub from: NodeId,
    pub to: NodeId,
    pub gid: [u8; 16],
    pub data_qpn: u32,
    pub data_psn: u32,
    pub ctrl_qpn: u32,
    pub ctrl_psn: u32,
    pub mtu: u32,
    pub region_len: u64,
    pub read_addr: u64,
    pub read_rkey: u32,
    pub ring_addr: u64,
    pub ring_rkey: u32,
    pub commit_addr: u64,
    pub commit_rkey: u32,
    pub progress_addr: u64,
    pub progress_rkey: u32,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_SIZE] {
        let mut b = [0u8; HELLO_SIZE];
        let mut w = Vec::with_capacity(HELLO_SIZE);
        w.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        w.extend_from_slice(&self.cluster.to_le_bytes());
        w.push(self.from);
        w.push(self.to);
        w.extend_from_slice(&self.gid);
        for v in [
            self.data_qpn,
            self.data_psn,
            self.ctrl_qpn,
            self.ctrl_psn,
            self.mtu,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        for (a, k) in [
            (self.region_len, 0),
            (self.read_addr, self.read_rkey),
            (self.ring_addr, self.ring_rkey),
            (self.commit_addr, self.commit_rkey),
            (self.progress_addr, self.progress_rkey),
        ] {
            w.extend_from_slice(&a.to_le_bytes());
            w.extend_from_slice(&k.to_le_bytes());
        }
        b[..w.len()].copy_from_slice(&w);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Hello, String> {
        if b.len() < HELLO_SIZE {
            return Err(format!("hello of {} bytes, want {HELLO_SIZE}", b.len()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        if u64_at(0) != HELLO_MAGIC {
            return Err("not a ballot RDMA hello (bad magic)".into());
        }
        let mut h = Hello {
            cluster: u64_at(8),
            from: b[16],
            to: b[17],
            ..Hello::default()
        };
        h.gid.copy_from_slice(&b[18..34]);
        h.data_qpn = u32_at(34);
        h.data_psn = u32_at(38);
        h.ctrl_qpn = u32_at(42);
        h.ctrl_psn = u32_at(46);
        h.mtu = u32_at(50);
        let pair = |i: usize| (u64_at(i), u32_at(i + 8));
        h.region_len = pair(54).0;
        (h.read_addr, h.read_rkey) = pair(66);
        (h.ring_addr, h.ring_rkey) = pair(78);
        (h.commit_addr, h.commit_rkey) = pair(90);
        (h.progress_addr, h.progress_rkey) = pair(102);
        Ok(h)
    }
}

fn io(what: &str, e: std::io::Error) -> String {
    format!("bootstrap: {what}: {e}")
}

/// Opens the authenticated bootstrap streams: connects to every peer with a lower id (to
/// every peer if `dial_all`), retrying until `timeout`, and accepts one connection from every
/// other peer. Accepted connections that fail the handshake are refused and skipped.
/// Returned sorted by peer id (so that all nodes exchange hellos in one global order).
pub fn open_streams(
    auth: &Auth,
    listen: &TcpListener,
    peers: &[(NodeId, SocketAddr)],
    dial_all: bool,
    timeout: Duration,
) -> Result<Vec<(NodeId, TcpStream)>, String> {
    let me = auth.node;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    for &(p, addr) in peers.iter().filter(|(p, _)| dial_all || *p < me) {
        out.push((p, dial(auth, p, addr, timeout)?));
    }
    let want: Vec<NodeId> = peers
        .iter()
        .map(|p| p.0)
        .filter(|&p| !dial_all && p > me)
        .collect();
    listen
        .set_nonblocking(true)
        .map_err(|e| io("listener", e))?;
    let mut got = Vec::new();
    let mut refused = Vec::new();
    while got.len() < want.len() {
        match listen.accept() {
            Ok((mut s, from)) => {
                match admit(
                    auth,
                    &mut s,
                    |id| want.contains(&id) && !got.contains(&id),
                    timeout,
                ) {
                    Ok(id) => {
                        got.push(id);
                        out.push((id, s));
                    }
                    Err(e) => {
                        tracing::warn!("node {me}: bootstrap connection from {from} refused: {e}");
                        refused.push(format!("{from}: {e}"));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!(
                        "bootstrap: timed out waiting for nodes {:?} to connect{}",
                        want.iter().filter(|p| !got.contains(p)).collect::<Vec<_>>(),
                        if refused.is_empty() {
                            String::new()
                        } else {
                            format!(" (refused: {})", refused.join("; "))
                        }
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io("accept", e)),
        }
    }
    for (_, s) in &out {
        s.set_read_timeout(Some(timeout)).ok();
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// Sends our hello and reads the peer's.
pub fn exchange(s: &mut TcpStream, mine: &Hello) -> Result<Hello, String> {
    s.write_all(&mine.encode())
        .map_err(|e| io("send hello", e))?;
    let mut b = [0u8; HELLO_SIZE];
    s.read_exact(&mut b).map_err(|e| io("read hello", e))?;
    let h = Hello::decode(&b)?;
    if h.from != mine.to || h.to != mine.from || h.cluster != mine.cluster {
        return Err(format!(
            "bootstrap: hello from node {} to {} of cluster {:#x}, expected {} to {} of {:#x}",
            h.from, h.to, h.cluster, mine.to, mine.from, mine.cluster
        ));
    }
    Ok(h)
}

/// Both sides' QPs are connected: swap one byte.
pub fn barrier(s: &mut TcpStream) -> Result<(), String> {
    s.write_all(&[1]).map_err(|e| io("send ready", e))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| io("read ready", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            cluster: 9,
            from: 2,
            to: 0,
            gid: [7; 16],
            data_qpn: 17,
            data_psn: 0x123456,
            ctrl_qpn: 18,
            ctrl_psn: 0x654321,
            mtu: 3,
            region_len: 1 << 22,
            read_addr: 0x7f00_0000_1000,
            read_rkey: 11,
            ring_addr: 0x7f00_0000_2000,
            ring_rkey: 12,
            commit_addr: 0x7f00_0000_1040,
            commit_rkey: 13,
            progress_addr: 0x7f00_0000_10c0,
            progress_rkey: 14,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert!(Hello::decode(&[0u8; HELLO_SIZE]).is_err());
        assert!(Hello::decode(&h.encode()[..10]).is_err());
    }

    fn auth(node: NodeId, key: &[u8]) -> Auth {
        Auth {
            cluster: 1,
            key: key.to_vec(),
            node,
        }
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a0 = l0.local_addr().unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = std::thread::spawn(move || {
            open_streams(
                &auth(1, b"wrong"),
                &l1,
                &[(0, a0)],
                false,
                Duration::from_secs(2),
            )
        });
        let r0 = open_streams(
            &auth(0, b"right"),
            &l0,
            &[(1, l1_addr())],
            false,
            Duration::from_secs(2),
        );
        let e0 = r0.unwrap_err();
        assert!(e0.contains("timed out") && e0.contains("refused"), "{e0}");
        let e1 = t.join().unwrap().unwrap_err();
        assert!(e1.contains("refused"), "{e1}");
    }

    fn l1_addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn the_listener_hands_over_authenticated_streams_only() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let h = spawn_listener(
            l,
            auth(0, b"k"),
            vec![1, 2],
            tx,
            stop.clone(),
            refused.clone(),
        )
        .unwrap();
        assert!(dial(&auth(1, b"bad"), 0, a, Duration::from_secs(2)).is_err());
        assert!(dial(&auth(3, b"k"), 0, a, Duration::from_secs(2)).is_err());
        let _s = dial(&auth(2, b"k"), 0, a, Duration::from_secs(2)).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap().0, 2);
        assert_eq!(refused.load(Ordering::Relaxed), 2);
        stop.store(true, Ordering::Release);
        h.join().unwrap();
    }

    #[test]
    fn streams_pair_up_over_loopback() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a0 = l0.local_addr().unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a1 = l1.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            open_streams(
                &auth(1, b"k"),
                &l1,
                &[(0, a0)],
                false,
                Duration::from_secs(5),
            )
            .unwrap()
        });
        let mut s0 = open_streams(
            &auth(0, b"k"),
            &l0,
            &[(1, a1)],
            false,
            Duration::from_secs(5),
        )
        .unwrap();
        let mut s1 = t.join().unwrap();
        assert_eq!((s0[0].0, s1[0].0), (1, 0));
        let h0 = Hello {
            cluster: 1,
            from: 0,
            to: 1,
            ..Hello::default()
        };
        let h1 = Hello {
            cluster: 1,
            from: 1,
            to: 0,
            ..Hello::default()
        };
        let mut st1 = s1.pop().unwrap().1;
        let t = std::thread::spawn(move || exchange(&mut st1, &h1));
        assert_eq!(exchange(&mut s0[0].1, &h0).unwrap().from, 1);
        assert_eq!(t.join().unwrap().unwrap().from, 0);
    }
}
