//! What the real-process tests of `ballot-node` share (`mod common;` in each test file): a
//! port picker and a cluster of `ballot-node` processes on 127.0.0.1 that the tests start,
//! kill (-9), stop (SIGSTOP) and restart; `history`: clients that record a history of
//! operations under faults and the check that it is linearizable.
#![allow(dead_code)] // each test file uses a part

pub mod history;

use ballot_node::client::{self, Client, ClientConfig};
use ballot_node::config::loopback_peers;
use ballot_node::kv::{KvResult, Op};
use ballot_node::pipeline::Pipeline;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ballot-node");
/// The cluster must serve again within this bound after each fault.
pub const SERVE_BOUND: Duration = Duration::from_secs(10);

/// The pause between the steps of a fault, for the load to run on.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// A port nothing listens on, below the kernel's ephemeral range (32768 and up on Linux):
/// a port taken from that range can be reused as the local port of some outgoing
/// connection while a killed node is down, and the node then cannot listen again on
/// restart. Each test process walks its own stretch of 10000..32000.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = u64::from(std::process::id()) * 7919;
    for _ in 0..22_000 {
        let p = 10_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 22_000;
        if TcpListener::bind(("127.0.0.1", p as u16)).is_ok() {
            return p as u16;
        }
    }
    panic!("no free port below 32000");
}

pub struct Cluster {
    pub n: usize,
    pub dir: PathBuf,
    pub fabric: Vec<u16>,
    pub client: Vec<u16>,
    pub children: Vec<Option<Child>>,
    pub durable: bool,
    /// Extra flags given to every node.
    pub extra: Vec<String>,
}

impl Cluster {
    pub fn new(n: usize, name: &str) -> Cluster {
        Cluster::with_mode(n, name, false)
    }

    pub fn with_mode(n: usize, name: &str, durable: bool) -> Cluster {
        let mut c = Cluster::unstarted(n, name, durable);
        for i in 0..n {
            c.start(i);
        }
        c
    }

    /// `n` nodes started with `extra` flags besides the cluster's.
    pub fn with_args(n: usize, name: &str, durable: bool, extra: Vec<String>) -> Cluster {
        let mut c = Cluster::unstarted(n, name, durable);
        c.extra = extra;
        for i in 0..n {
            c.start(i);
        }
        c
    }

    /// `n` volatile nodes with `extra` flags, serving (a put through a pipelining client
    /// succeeded).
    pub fn serving(n: usize, name: &str, extra: &[&str]) -> Cluster {
        let c = Cluster::with_args(
            n,
            name,
            false,
            extra.iter().map(|s| s.to_string()).collect(),
        );
        let mut p = Pipeline::new(c.cfg(), 1);
        let r = p.execute_all(vec![Op::Put {
            key: b"probe".to_vec(),
            value: b"1".to_vec(),
        }]);
        assert_eq!(r[0], Ok(KvResult::Ok), "cluster not serving");
        c
    }

    /// A client configuration for the cluster, with a generous deadline.
    pub fn cfg(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.addrs());
        cfg.deadline = Duration::from_secs(20);
        cfg
    }

    /// Process id of node `i` (running).
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().expect("running").id()
    }

    /// The client address of the node that leads (see [`Cluster::leader`]).
    pub fn leader_addr(&self) -> String {
        self.addrs().swap_remove(self.leader())
    }

    pub fn unstarted(n: usize, name: &str, durable: bool) -> Cluster {
        let dir =
            std::env::temp_dir().join(format!("ballot-node-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key"), "test cluster key\n").unwrap();
        Cluster {
            n,
            dir,
            fabric: (0..n).map(|_| free_port()).collect(),
            client: (0..n).map(|_| free_port()).collect(),
            children: (0..n).map(|_| None).collect(),
            durable,
            extra: Vec::new(),
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.client
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// Starts node `i` with `more` flags (besides the cluster's), as an operator does: with
    /// `--initial-cluster-state new` when its data dir holds no state yet (the cluster's
    /// first start), unless `more` says otherwise.
    pub fn start_with(&mut self, i: usize, more: &[&str]) {
        let first = !self
            .dir
            .join(format!("data{i}"))
            .join(ballot_node::server::MARKER)
            .exists();
        let explicit = more
            .iter()
            .any(|a| *a == "--rejoin" || *a == "--initial-cluster-state");
        let mut args: Vec<&str> = more.to_vec();
        if first && !explicit {
            args.extend(["--initial-cluster-state", "new"]);
        }
        self.start_raw(i, &args);
    }

    /// Starts node `i` with exactly the cluster's flags and `more`.
    pub fn start_raw(&mut self, i: usize, more: &[&str]) {
        assert!(self.children[i].is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{i}.log")))
            .unwrap();
        let child = Command::new(BIN)
            .args(["--node", &i.to_string(), "--cluster", "0xBA11"])
            .args([
                "--peers",
                &loopback_peers(&self.fabric),
                "--client-peers",
                &loopback_peers(&self.client),
            ])
            .args(["--client-addr", &format!("127.0.0.1:{}", self.client[i])])
            .arg("--data-dir")
            .arg(self.dir.join(format!("data{i}")))
            .arg("--key-file")
            .arg(self.dir.join("key"))
            .args([
                "--durability",
                if self.durable { "durable" } else { "volatile" },
            ])
            .args(&self.extra)
            .args(more)
            .env(
                "RUST_LOG",
                std::env::var("NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ballot-node");
        self.children[i] = Some(child);
    }

    pub fn signal(&self, i: usize, sig: libc::c_int) {
        let pid = self.children[i].as_ref().expect("running").id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    pub fn kill9(&mut self, i: usize) {
        self.signal(i, libc::SIGKILL);
        let mut c = self.children[i].take().unwrap();
        c.wait().unwrap();
    }

    pub fn status(&self, i: usize) -> Option<ballot_node::wire::NodeStatus> {
        self.children[i].as_ref()?;
        client::status(
            &format!("127.0.0.1:{}", self.client[i]),
            Duration::from_millis(300),
        )
        .ok()
    }

    /// The node that says it leads (highest ballot), waiting up to `SERVE_BOUND`.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + SERVE_BOUND;
        loop {
            let best = (0..self.n)
                .filter_map(|i| self.status(i).map(|s| (i, s)))
                .filter(|(_, s)| s.role == "leader")
                .max_by_key(|(_, s)| s.ballot);
            if let Some((i, _)) = best {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no leader within {SERVE_BOUND:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a fresh client's put succeeds; returns how long it took.
    pub fn wait_serving(&self, what: &str) -> Duration {
        let t = Instant::now();
        let mut cfg = ClientConfig::new(self.addrs());
        cfg.deadline = SERVE_BOUND;
        cfg.attempt_timeout = Duration::from_millis(500);
        let mut c = Client::with_config(cfg);
        c.put(b"probe", b"1")
            .unwrap_or_else(|e| panic!("cluster not serving within {SERVE_BOUND:?} {what}: {e}"));
        let d = t.elapsed();
        eprintln!("serving again {d:?} {what}");
        d
    }

    /// A fault and its repair, under load: kill -9 node `i` (`who` names it), wait until the
    /// others serve, restart it, wait until it recovered and the cluster serves; a pause to
    /// let the load run after each step.
    pub fn kill9_and_restart(&mut self, i: usize, who: &str) {
        eprintln!("kill -9 {who} {i}");
        self.kill9(i);
        self.wait_serving(&format!("after kill -9 of the {who}"));
        settle();
        self.start(i);
        self.wait_recovered(i);
        self.wait_serving(&format!("after restarting the {who}"));
        settle();
    }

    /// SIGSTOP node `i` (`who` names it), wait until the cluster serves, SIGCONT, wait
    /// until it serves; a pause to let the load run after each step.
    pub fn stop_and_continue(&self, i: usize, who: &str) {
        eprintln!("SIGSTOP {who} {i}");
        self.signal(i, libc::SIGSTOP);
        self.wait_serving(&format!("with the {who} stopped"));
        settle();
        self.signal(i, libc::SIGCONT);
        self.wait_serving(&format!("after SIGCONT of the {who}"));
        settle();
    }

    /// Waits until node `i` has recovered (answers, not recovering, has applied something).
    pub fn wait_recovered(&self, i: usize) {
        let deadline = Instant::now() + SERVE_BOUND;
        loop {
            if let Some(s) = self.status(i) {
                if s.role != "recovering" && s.applied > 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not recover within {SERVE_BOUND:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}
