//! The embedding example as three processes (issue 13): three `ledger_cluster` replicas over
//! the TCP fabric, a few hundred commands, the leader killed with SIGKILL, the majority
//! going on, the killed replica restarted from its data dir and caught up, and every
//! replica ending with the same state (digest) and the money conserved.
//!
//! The example's binary is built by `cargo test` (which builds every example); a run of
//! this test alone must build it first:
//! `cargo build -p ballot --example ledger_cluster && cargo test -p ballot --test ledger_cluster`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const ACCOUNTS: u64 = 5;
const OPENING: u64 = 1000;

/// `target/<profile>/examples/ledger_cluster`, next to this test's `deps` directory.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("examples").join("ledger_cluster");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it; to run this test alone, first run \
         `cargo build -p ballot --example ledger_cluster` (with the same profile)",
        bin.display()
    );
    bin
}

/// One replica process, driven through its standard input and output.
struct Replica {
    id: u8,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    addr: String,
}

impl Replica {
    fn spawn(id: u8, dir: &Path, listen: Option<&str>, new: bool) -> Replica {
        let mut cmd = Command::new(example_binary());
        cmd.args(["--id", &id.to_string(), "--dir"])
            .arg(dir.join(format!("replica{id}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(a) = listen {
            cmd.args(["--listen", a]);
        }
        if new {
            cmd.arg("--new");
        }
        let mut child = cmd.spawn().expect("spawn ledger_cluster");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut r = Replica {
            id,
            child,
            stdin,
            lines,
            addr: String::new(),
        };
        let first = r.line(Duration::from_secs(20));
        r.addr = first
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("replica {id}: expected `listening`, got {first:?}"))
            .to_string();
        r
    }

    fn line(&mut self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("replica {}: no answer ({e})", self.id))
    }

    fn ask(&mut self, request: &str) -> String {
        writeln!(self.stdin, "{request}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("replica {}: {request}: {e}", self.id));
        self.line(Duration::from_secs(20))
    }

    /// Sends the address map and waits for the start.
    fn start(&mut self, peers: &str) -> String {
        let started = self.ask(peers);
        assert!(
            started.starts_with("started "),
            "replica {}: {started}",
            self.id
        );
        started
    }

    fn state(&mut self) -> State {
        let s = self.ask("state");
        let w: Vec<&str> = s.split_whitespace().collect();
        assert!(w.len() == 7 && w[0] == "state", "replica {}: {s}", self.id);
        State {
            role: w[1].to_string(),
            leader: w[2].parse().ok(),
            commit: w[3].parse().unwrap(),
            index: w[4].parse().unwrap(),
            digest: w[5].to_string(),
            total: w[6].parse().unwrap(),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, PartialEq)]
struct State {
    role: String,
    leader: Option<u8>,
    commit: u64,
    index: u64,
    digest: String,
    total: u64,
}

struct Cluster {
    dir: PathBuf,
    replicas: Vec<Option<Replica>>,
    peers: String,
    /// Where the last proposal succeeded.
    leader: usize,
}

impl Cluster {
    /// Proposes `cmd` to whichever live replica leads, following hints and retrying
    /// through an election. Returns the output (an `indeterminate` answer is retried: a
    /// move applied twice still conserves the money).
    fn propose(&mut self, cmd: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut at = self.leader;
        loop {
            assert!(Instant::now() < deadline, "no leader served {cmd:?}");
            let Some(r) = self.replicas[at].as_mut() else {
                at = (at + 1) % self.replicas.len();
                continue;
            };
            let a = r.ask(&format!("propose {cmd}"));
            if let Some(out) = a.strip_prefix("ok ") {
                self.leader = at;
                return out.to_string();
            }
            match a
                .strip_prefix("not-leader ")
                .and_then(|h| h.parse::<usize>().ok())
            {
                Some(h) if h != at && self.replicas[h].is_some() => at = h,
                _ => {
                    at = (at + 1) % self.replicas.len();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn current_leader(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, r) in self.replicas.iter_mut().enumerate() {
                if let Some(r) = r {
                    if r.state().role == "leader" {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn moves(&mut self, n: u64, seed: &mut u64) {
        for _ in 0..n {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let from = (*seed >> 33) % ACCOUNTS;
            let to = (from + 1 + (*seed >> 40) % (ACCOUNTS - 1)) % ACCOUNTS;
            let amount = (*seed >> 50) % 50;
            self.propose(&format!("move a{from} a{to} {amount}"));
        }
    }
}

#[test]
fn three_processes_survive_a_leader_kill_and_end_equal() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("ballot-ledger-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut replicas: Vec<Replica> = (0..3u8)
        .map(|id| Replica::spawn(id, &dir, None, true))
        .collect();
    let peers = format!(
        "peers {}",
        replicas
            .iter()
            .map(|r| format!("{}={}", r.id, r.addr))
            .collect::<Vec<_>>()
            .join(",")
    );
    for r in &mut replicas {
        assert_eq!(r.start(&peers), "started Fresh");
    }
    let mut cl = Cluster {
        dir: dir.clone(),
        replicas: replicas.into_iter().map(Some).collect(),
        peers,
        leader: 0,
    };
    for a in 0..ACCOUNTS {
        assert_eq!(
            cl.propose(&format!("open a{a} {OPENING}")),
            OPENING.to_string()
        );
    }
    let mut seed = 7;
    cl.moves(150, &mut seed);

    // SIGKILL the leader; the other two go on.
    let killed = cl.current_leader();
    let mut gone = cl.replicas[killed].take().unwrap();
    let addr = gone.addr.clone();
    gone.child.kill().expect("SIGKILL");
    gone.child.wait().unwrap();
    drop(gone);
    cl.leader = (killed + 1) % 3;
    cl.moves(100, &mut seed);
    assert_ne!(cl.current_leader(), killed);

    // Restart it from its data dir, on its address; it catches up.
    let mut back = Replica::spawn(killed as u8, &cl.dir, Some(&addr), false);
    assert_eq!(back.start(&cl.peers), "started Restart");
    cl.replicas[killed] = Some(back);
    cl.moves(50, &mut seed);

    // Every replica reaches the same state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let states = loop {
        let states: Vec<State> = cl
            .replicas
            .iter_mut()
            .map(|r| r.as_mut().unwrap().state())
            .collect();
        // Equal commit, the state of the same index (the last entry with commands at or
        // below it) and the same digest everywhere.
        let same = states.iter().all(|s| {
            s.commit == states[0].commit
                && s.index == states[0].index
                && s.digest == states[0].digest
        });
        if same && states[0].index > 0 {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for s in &states {
        assert_eq!(s.total, ACCOUNTS * OPENING, "money conserved: {states:?}");
    }
    assert_eq!(states.iter().filter(|s| s.role == "leader").count(), 1);
    eprintln!(
        "three replicas equal at index {} (digest {}), replica {killed} killed and caught \
         up, in {:?}",
        states[0].index,
        states[0].digest,
        started.elapsed()
    );
    for r in cl.replicas.iter_mut().flatten() {
        let _ = writeln!(r.stdin, "quit");
    }
    drop(cl);
    let _ = std::fs::remove_dir_all(&dir);
}
