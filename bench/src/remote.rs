//! `raw` across two hosts, as perftest's `ib_write_lat` runs: `raw --server` on the target
//! host serves one run of `raw --connect HOST:PORT` on the writer's host, then exits.
//!
//! A control connection (TCP, `--listen`, default port 18515) carries the set-up, one text
//! line each way:
//!
//! 1. client: `ballot-bench-raw 1 fabric=<tcp|rdma> entry=<largest entry bytes> addr=<its fabric address>`
//! 2. server: `addr <its fabric address>` (or `error <why>`)
//! 3. both start the fabric (node 0 = client, node 1 = server; each side's fabric address:
//!    the TCP fabric's listener, or the RDMA bootstrap listener, on the IP of the control
//!    connection, an ephemeral port); the server accepts node 0's writes, then: `ready`
//! 4. the client measures every size and sends `done`; the server exits on it (or on EOF).
//!
//! The two sides must share the cluster key (`BALLOT_CLUSTER_KEY`, or both unset).

use crate::fabrics::{self, FabricKind};
use crate::raw::{self, RawArgs};
use crate::stats::BenchResult;
use ballot::fabric::Fabric;
use ballot::NodeId;
use ballot_tcp::{TcpConfig, TcpFabric};
use ballot_verbs::RdmaFabric;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const HELLO: &str = "ballot-bench-raw 1";
const CLIENT: NodeId = 0;
const SERVER: NodeId = 1;

/// The control connection: one line at a time each way.
struct Control {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Control {
    fn new(s: TcpStream) -> Result<Control, String> {
        let w = s
            .try_clone()
            .map_err(|e| format!("control connection: {e}"))?;
        Ok(Control {
            r: BufReader::new(s),
            w,
        })
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.w, "{line}").map_err(|e| format!("control connection: {e}"))
    }

    /// The next line; `None` at EOF.
    fn recv(&mut self) -> Result<Option<String>, String> {
        let mut s = String::new();
        match self.r.read_line(&mut s) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(s.trim_end().to_string())),
            Err(e) => Err(format!("control connection: {e}")),
        }
    }

    fn expect(&mut self, what: &str) -> Result<String, String> {
        match self.recv()? {
            Some(l) if l.starts_with("error ") => Err(format!("the server: {}", &l[6..])),
            Some(l) => Ok(l),
            None => Err(format!("the control connection closed before {what}")),
        }
    }

    fn local_ip(&self) -> Result<IpAddr, String> {
        self.w
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| format!("control connection: {e}"))
    }
}

/// A fabric endpoint's listener (tcp) or reserved bootstrap address (rdma) on `ip`.
enum Listen {
    Tcp(TcpListener),
    Rdma(SocketAddr),
}

impl Listen {
    fn bind(kind: FabricKind, ip: IpAddr) -> Result<Listen, String> {
        let l = TcpListener::bind((ip, 0)).map_err(|e| format!("binding {ip}: {e}"))?;
        Ok(match kind {
            FabricKind::Tcp => Listen::Tcp(l),
            // The bootstrap binds it again itself.
            _ => Listen::Rdma(l.local_addr().map_err(|e| e.to_string())?),
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Listen::Tcp(l) => l.local_addr().expect("bound"),
            Listen::Rdma(a) => *a,
        }
    }
}

/// One endpoint of the two-host pair (one per process: the size difference is no matter).
#[allow(clippy::large_enum_variant)]
enum Endpoint {
    Tcp(TcpFabric),
    Rdma(RdmaFabric),
}

impl Endpoint {
    /// Starts node `me` with `peer` at `peer_addr`; returns once connected to it.
    fn start(
        me: NodeId,
        listen: Listen,
        peer_addr: SocketAddr,
        entry: usize,
        a: &RawArgs,
    ) -> Result<Endpoint, String> {
        let region = fabrics::region(me, fabrics::geometry(entry));
        let peer = if me == CLIENT { SERVER } else { CLIENT };
        match listen {
            Listen::Tcp(l) => {
                let addr = l.local_addr().map_err(|e| e.to_string())?;
                let peers = BTreeMap::from([(me, addr), (peer, peer_addr)]);
                let cfg = TcpConfig::new(me, fabrics::CLUSTER, fabrics::key(), addr, peers, region);
                let f = TcpFabric::start_with_listener(cfg, l)
                    .map_err(|e| format!("tcp fabric: {e}"))?;
                if !f.wait_connected(Duration::from_secs(20)) {
                    return Err(format!(
                        "tcp fabric: {peer_addr} did not connect within 20 s"
                    ));
                }
                Ok(Endpoint::Tcp(f))
            }
            Listen::Rdma(addr) => {
                let cfg = fabrics::rdma_config(me, addr, vec![(peer, peer_addr)], &a.rdma);
                RdmaFabric::connect(&cfg, region)
                    .map(Endpoint::Rdma)
                    .map_err(|e| format!("rdma: {e}"))
            }
        }
    }

    fn accept_writes_from_client(&mut self) -> Result<(), String> {
        match self {
            Endpoint::Tcp(f) => f.set_writer(Some(CLIENT)),
            Endpoint::Rdma(f) => f.set_writer(Some(CLIENT)),
        }
        .map_err(|e| e.to_string())
    }
}

fn two_host_kind(a: &RawArgs) -> Result<FabricKind, String> {
    match a.rdma.pick(a.fabric) {
        FabricKind::Mem => Err("two hosts need --fabric tcp or rdma (mem is in-process)".into()),
        k => Ok(k),
    }
}

/// `raw --server`: serves one client's run on `--listen`, then returns.
pub fn serve(a: &RawArgs) -> Result<(), String> {
    let kind = two_host_kind(a)?;
    let l = TcpListener::bind(&a.listen).map_err(|e| format!("--listen {}: {e}", a.listen))?;
    eprintln!(
        "raw server ({}): waiting for `ballot-bench raw --connect` on {}",
        kind.name(),
        l.local_addr().map_err(|e| e.to_string())?
    );
    let (s, from) = accept(&l)?;
    let mut c = Control::new(s)?;
    let hello = c.expect("the client's hello")?;
    let (entry, client_addr) = match parse_hello(&hello, kind) {
        Ok(v) => v,
        Err(e) => {
            let _ = c.send(&format!("error {e}"));
            return Err(format!("client {from}: {e}"));
        }
    };
    let listen = Listen::bind(kind, c.local_ip()?)?;
    c.send(&format!("addr {}", listen.addr()))?;
    let mut ep = Endpoint::start(SERVER, listen, client_addr, entry, a)?;
    ep.accept_writes_from_client()?;
    c.send("ready")?;
    eprintln!(
        "raw server: client {from} connected over {}; measuring",
        kind.name()
    );
    // Keep the fabric up until the client is done.
    while let Some(l) = c.recv()? {
        if l == "done" {
            break;
        }
    }
    eprintln!("raw server: client {from} done");
    Ok(())
}

/// The first client, or an error on Ctrl-C (a blocking accept would not see it).
fn accept(l: &TcpListener) -> Result<(TcpStream, SocketAddr), String> {
    l.set_nonblocking(true)
        .map_err(|e| format!("accept: {e}"))?;
    loop {
        match l.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false)
                    .map_err(|e| format!("accept: {e}"))?;
                return Ok((s, from));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if crate::interrupt::requested() {
                    return Err("interrupted before a client connected".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// The server's check of the client's hello: (largest entry, client's fabric address).
fn parse_hello(line: &str, kind: FabricKind) -> Result<(usize, SocketAddr), String> {
    let rest = line
        .strip_prefix(HELLO)
        .ok_or_else(|| format!("not a ballot-bench raw client of this version: {line:?}"))?;
    let (mut fabric, mut entry, mut addr) = (None, None, None);
    for kv in rest.split_whitespace() {
        match kv.split_once('=') {
            Some(("fabric", v)) => fabric = Some(v),
            Some(("entry", v)) => entry = v.parse::<usize>().ok(),
            Some(("addr", v)) => addr = v.parse::<SocketAddr>().ok(),
            _ => {}
        }
    }
    if fabric != Some(kind.name()) {
        return Err(format!(
            "the client asks for fabric {}, this server runs {}",
            fabric.unwrap_or("?"),
            kind.name()
        ));
    }
    match (entry, addr) {
        (Some(e), Some(a)) if e > 0 && e <= 64 << 20 => Ok((e, a)),
        _ => Err(format!("bad hello {line:?}")),
    }
}

/// `raw --connect HOST:PORT`: measures every size against the server's host.
pub fn connect(a: &RawArgs, server: &str) -> Result<Vec<BenchResult>, String> {
    let kind = two_host_kind(a)?;
    fabrics::tighten_timer_slack();
    let s = TcpStream::connect(server).map_err(|e| format!("--connect {server}: {e}"))?;
    let _ = s.set_nodelay(true);
    let mut c = Control::new(s)?;
    let entry = a
        .measure
        .payloads
        .iter()
        .map(|&p| raw::entry_bytes(p))
        .max()
        .unwrap_or(0);
    let listen = Listen::bind(kind, c.local_ip()?)?;
    c.send(&format!(
        "{HELLO} fabric={} entry={entry} addr={}",
        kind.name(),
        listen.addr()
    ))?;
    let reply = c.expect("the server's address")?;
    let server_addr: SocketAddr = reply
        .strip_prefix("addr ")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("unexpected answer from the server: {reply:?}"))?;
    let ep = Endpoint::start(CLIENT, listen, server_addr, entry, a)?;
    let ready = c.expect("ready")?;
    if ready != "ready" {
        return Err(format!("unexpected answer from the server: {ready:?}"));
    }
    let (warm, limit) = (a.measure.warmup, a.limit());
    let results = match ep {
        Endpoint::Tcp(mut f) => {
            raw::measure_sizes(&mut f, kind, "two-host", &a.measure.payloads, warm, limit)
        }
        Endpoint::Rdma(mut f) => {
            raw::measure_sizes(&mut f, kind, "two-host", &a.measure.payloads, warm, limit)
        }
    };
    let _ = c.send("done");
    results
}
