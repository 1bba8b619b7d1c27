//! Mutual authentication at the start of every connection.
//!
//! Challenge-response with HMAC-SHA256 over a shared cluster key; the key never crosses the
//! wire and both sides prove that they hold it, each over a fresh nonce of the other side
//! (so no transcript can be replayed) and under a different label (so one side's proof can
//! not be reflected back as the other's).
//!
//! ```text
//! client -> server  HELLO     "BALLOTHS" | version u32 | cluster u64 | client id u8 | 0 0 0 | nonce_c [32]
//! server -> client  CHALLENGE "BALLOTHS" | version u32 | cluster u64 | server id u8 | 0 0 0 | nonce_s [32]
//!                             | mac_s [32] = HMAC(key, "ballot-tcp/v1 server" | T)
//! client -> server  PROOF     mac_c [32] = HMAC(key, "ballot-tcp/v1 client" | T)
//! server -> client  WELCOME   "BALLOTOK"
//!   where T = cluster u64 | client id | server id | nonce_c | nonce_s
//! ```
//!
//! The server refuses (closes without answering) a HELLO with the wrong magic, version or
//! cluster id, or from a node id that is not in its peer set; the client refuses a
//! CHALLENGE from another cluster, from a node other than the one it dialled, or with a bad
//! MAC; the server refuses a bad PROOF. Nonces come from the OS (`getrandom`).

use ballot::NodeId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::{self, Read, Write};

type HmacSha256 = Hmac<Sha256>;

pub const MAGIC: [u8; 8] = *b"BALLOTHS";
pub const WELCOME: [u8; 8] = *b"BALLOTOK";
pub const VERSION: u32 = 1;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Bytes in a HELLO.
pub const HELLO_LEN: usize = 24 + NONCE_LEN;
/// Bytes in a CHALLENGE.
pub const CHALLENGE_LEN: usize = HELLO_LEN + MAC_LEN;

const SERVER_LABEL: &[u8] = b"ballot-tcp/v1 server";
const CLIENT_LABEL: &[u8] = b"ballot-tcp/v1 client";

#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    BadMagic,
    BadVersion(u32),
    WrongCluster {
        expected: u64,
        got: u64,
    },
    /// The connecting node id is not a configured peer (or is our own id).
    UnknownNode(u8),
    /// The server is not the node we dialled.
    UnexpectedNode {
        expected: NodeId,
        got: u8,
    },
    BadPadding,
    /// The other side does not hold the cluster key.
    BadMac,
    /// The server closed the connection instead of welcoming us.
    Refused,
    /// Could not get a nonce from the OS.
    Entropy(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "handshake I/O: {e}"),
            Self::BadMagic => write!(f, "not a ballot-tcp handshake"),
            Self::BadVersion(v) => write!(f, "unsupported handshake version {v}"),
            Self::WrongCluster { expected, got } => {
                write!(f, "wrong cluster {got:#x} (expected {expected:#x})")
            }
            Self::UnknownNode(n) => write!(f, "unknown node id {n}"),
            Self::UnexpectedNode { expected, got } => {
                write!(f, "dialled node {expected} but node {got} answered")
            }
            Self::BadPadding => write!(f, "non-zero padding in handshake"),
            Self::BadMac => write!(f, "bad key proof (wrong cluster key)"),
            Self::Refused => write!(f, "refused by the server"),
            Self::Entropy(e) => write!(f, "no randomness: {e}"),
        }
    }
}
impl std::error::Error for HandshakeError {}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Refused
        } else {
            HandshakeError::Io(e)
        }
    }
}

/// What both sides must share.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub cluster: u64,
    pub key: &'a [u8],
    /// This side's node id.
    pub node: NodeId,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| HandshakeError::Entropy(e.to_string()))?;
    Ok(n)
}

fn mac(
    key: &[u8],
    label: &[u8],
    cluster: u64,
    client: u8,
    server: u8,
    nonce_c: &[u8],
    nonce_s: &[u8],
) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(&cluster.to_le_bytes());
    m.update(&[client, server]);
    m.update(nonce_c);
    m.update(nonce_s);
    m
}

fn hello(cluster: u64, node: NodeId, nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&cluster.to_le_bytes());
    b[20] = node;
    b[24..].copy_from_slice(nonce);
    b
}

/// Parses a HELLO-shaped prefix: (cluster, node id, nonce).
fn parse_hello(b: &[u8]) -> Result<(u64, u8, [u8; NONCE_LEN]), HandshakeError> {
    if b[0..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(HandshakeError::BadVersion(version));
    }
    if b[21..24] != [0, 0, 0] {
        return Err(HandshakeError::BadPadding);
    }
    let cluster = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    let nonce = b[24..24 + NONCE_LEN].try_into().expect("32 bytes");
    Ok((cluster, b[20], nonce))
}

/// The dialling side. Returns once the server has welcomed us.
pub fn client<S: Read + Write>(
    s: &mut S,
    me: Credentials<'_>,
    expect_server: NodeId,
) -> Result<(), HandshakeError> {
    let nonce_c = nonce()?;
    s.write_all(&hello(me.cluster, me.node, &nonce_c))?;
    let mut ch = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut ch)?;
    let (cluster, server, nonce_s) = parse_hello(&ch)?;
    if cluster != me.cluster {
        return Err(HandshakeError::WrongCluster {
            expected: me.cluster,
            got: cluster,
        });
    }
    if server != expect_server {
        return Err(HandshakeError::UnexpectedNode {
            expected: expect_server,
            got: server,
        });
    }
    mac(
        me.key,
        SERVER_LABEL,
        me.cluster,
        me.node,
        server,
        &nonce_c,
        &nonce_s,
    )
    .verify_slice(&ch[HELLO_LEN..])
    .map_err(|_| HandshakeError::BadMac)?;
    let proof = mac(
        me.key,
        CLIENT_LABEL,
        me.cluster,
        me.node,
        server,
        &nonce_c,
        &nonce_s,
    )
    .finalize()
    .into_bytes();
    s.write_all(&proof)?;
    let mut ok = [0u8; 8];
    s.read_exact(&mut ok)?;
    if ok != WELCOME {
        return Err(HandshakeError::Refused);
    }
    Ok(())
}

/// The accepting side. `known(id)` says whether `id` is a configured peer. Returns the
/// authenticated peer's node id.
pub fn server<S: Read + Write>(
    s: &mut S,
    me: Credentials<'_>,
    known: impl Fn(NodeId) -> bool,
) -> Result<NodeId, HandshakeError> {
    let mut h = [0u8; HELLO_LEN];
    s.read_exact(&mut h)?;
    let (cluster, client, nonce_c) = parse_hello(&h)?;
    if cluster != me.cluster {
        return Err(HandshakeError::WrongCluster {
            expected: me.cluster,
            got: cluster,
        });
    }
    if client == me.node || !known(client) {
        return Err(HandshakeError::UnknownNode(client));
    }
    let nonce_s = nonce()?;
    let mut ch = [0u8; CHALLENGE_LEN];
    ch[..HELLO_LEN].copy_from_slice(&hello(me.cluster, me.node, &nonce_s));
    let m = mac(
        me.key,
        SERVER_LABEL,
        me.cluster,
        client,
        me.node,
        &nonce_c,
        &nonce_s,
    );
    ch[HELLO_LEN..].copy_from_slice(&m.finalize().into_bytes());
    s.write_all(&ch)?;
    let mut proof = [0u8; MAC_LEN];
    s.read_exact(&mut proof)?;
    mac(
        me.key,
        CLIENT_LABEL,
        me.cluster,
        client,
        me.node,
        &nonce_c,
        &nonce_s,
    )
    .verify_slice(&proof)
    .map_err(|_| HandshakeError::BadMac)?;
    s.write_all(&WELCOME)?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn run(
        client_creds: (u64, &'static [u8], NodeId),
        expect: NodeId,
        server_creds: (u64, &'static [u8], NodeId),
    ) -> (Result<(), HandshakeError>, Result<NodeId, HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let me = Credentials {
                cluster: server_creds.0,
                key: server_creds.1,
                node: server_creds.2,
            };
            server(&mut s, me, |n| n < 4)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let me = Credentials {
            cluster: client_creds.0,
            key: client_creds.1,
            node: client_creds.2,
        };
        let r = client(&mut c, me, expect);
        drop(c);
        (r, t.join().unwrap())
    }

    #[test]
    fn good_handshake() {
        let (c, s) = run((7, b"k", 1), 0, (7, b"k", 0));
        c.unwrap();
        assert_eq!(s.unwrap(), 1);
    }

    #[test]
    fn wrong_key_refused_by_both() {
        let (c, s) = run((7, b"bad", 1), 0, (7, b"k", 0));
        assert!(matches!(c, Err(HandshakeError::BadMac)), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn wrong_cluster_and_unknown_node() {
        let (c, s) = run((8, b"k", 1), 0, (7, b"k", 0));
        assert!(c.is_err());
        assert!(matches!(s, Err(HandshakeError::WrongCluster { .. })));
        let (c, s) = run((7, b"k", 9), 0, (7, b"k", 0));
        assert!(c.is_err());
        assert!(matches!(s, Err(HandshakeError::UnknownNode(9))));
        let (c, s) = run((7, b"k", 1), 2, (7, b"k", 0));
        assert!(matches!(c, Err(HandshakeError::UnexpectedNode { .. })));
        assert!(s.is_err());
    }

    #[test]
    fn server_checks_the_proof() {
        // A client that skips verification and sends a forged proof.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let me = Credentials {
                cluster: 7,
                key: b"k",
                node: 0,
            };
            server(&mut s, me, |n| n < 4)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&hello(7, 1, &[3; NONCE_LEN])).unwrap();
        let mut ch = [0u8; CHALLENGE_LEN];
        c.read_exact(&mut ch).unwrap();
        c.write_all(&[0xAA; MAC_LEN]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::BadMac)));
    }
}
