//! Real `ballot-node` processes on 127.0.0.1 under real faults (kill -9, restart, SIGSTOP /
//! SIGCONT), with concurrent clients whose history is checked for linearizability.

mod common;

use ballot::sim::kv::{Op as SOp, Ret};
use ballot_node::client::{self, Client, ClientConfig};
use ballot_node::kv::{KvResult, Op};
use common::history::{
    acked_writer, check_all_keys, check_linearizable, join_and_check, spawn_workers, val, Load,
    Rec, KEYS,
};
use common::{free_port, settle, Cluster, SERVE_BOUND};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn three_nodes_survive_kill_restart_and_stop() {
    let started = Instant::now();
    let mut cl = Cluster::new(3, "three");
    cl.wait_serving("after boot");
    let stop = Arc::new(AtomicBool::new(false));
    let next_thread = Arc::new(AtomicU64::new(1000));
    const WORKERS: u64 = 4;
    let workers = spawn_workers(&cl, WORKERS, Load::ONE_AT_A_TIME, &stop, &next_thread);
    // A writer of unique keys: every acknowledged one must be there at the end.
    let acked = acked_writer(cl.addrs(), stop.clone(), false, Duration::from_millis(5), 1);
    settle();
    // 1. kill -9 the leader, then restart it.
    let l = cl.leader();
    cl.kill9_and_restart(l, "leader");
    // 2. kill -9 a follower, then restart it.
    let f = (cl.leader() + 1) % 3;
    cl.kill9_and_restart(f, "follower");
    // 3. SIGSTOP the leader, then SIGCONT.
    let l = cl.leader();
    cl.stop_and_continue(l, "leader");

    stop.store(true, Ordering::Relaxed);
    let (history, acked) = join_and_check(&cl, workers, acked, KEYS, "after the faults");
    let completed = history.iter().filter(|r| r.returned.is_some()).count();
    eprintln!(
        "{} ops ({completed} completed), {} acknowledged unique writes, {:?} so far",
        history.len(),
        acked.len(),
        started.elapsed()
    );
    assert!(completed > 200, "too few operations completed: {completed}");
    check_all_keys(history);
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn five_nodes_smoke() {
    let mut cl = Cluster::new(5, "five");
    cl.wait_serving("after boot");
    let mut c = Client::new(cl.addrs());
    c.put(b"x", b"1").unwrap();
    assert_eq!(c.get(b"x").unwrap(), Some(b"1".to_vec()));
    let l = cl.leader();
    cl.kill9(l);
    let f = (l + 1) % 5;
    cl.kill9(f);
    cl.wait_serving("after killing two of five");
    assert_eq!(c.cas(b"x", Some(b"1"), b"2").unwrap(), Ok(()));
    assert_eq!(c.get(b"x").unwrap(), Some(b"2".to_vec()));
    assert!(c.delete(b"x").unwrap());
    assert_eq!(c.get(b"x").unwrap(), None);
}

#[test]
fn checker_rejects_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let rec = |thread, op, i, r, ret| Rec {
        thread,
        key: 0,
        op,
        invoked: at(i),
        returned: Some((at(r), ret)),
        saw: None,
    };
    let pending = |thread, op, i| Rec {
        thread,
        key: 0,
        op,
        invoked: at(i),
        returned: None,
        saw: None,
    };
    // put 5 completes, then a later get returns the old value 0: not linearizable.
    let bad = vec![
        rec(1, SOp::Put(0, 5), 0, 1, Ret::Ok),
        rec(2, SOp::Get(0), 2, 3, Ret::Value(0)),
    ];
    assert!(check_linearizable(&bad, 0).is_err());
    // Overlapping: either order is fine.
    let ok = vec![
        rec(1, SOp::Put(0, 5), 0, 3, Ret::Ok),
        rec(2, SOp::Get(0), 1, 2, Ret::Value(0)),
    ];
    assert!(check_linearizable(&ok, 0).is_ok());
    // A write that never returned may have taken effect: a read of its value is fine...
    let mut h = vec![
        rec(1, SOp::Put(0, 5), 0, 1, Ret::Ok),
        pending(2, SOp::Put(0, 7), 2),
        rec(3, SOp::Get(0), 4, 5, Ret::Value(7)),
    ];
    assert_eq!(check_linearizable(&h, 0), Ok((3, 0)));
    // ... and so is one where it did not; unobserved pending calls are left out.
    h.push(pending(4, SOp::Put(0, 8), 6));
    h.push(pending(5, SOp::Get(0), 6));
    h.push(pending(6, SOp::Cas(0, 7, 9), 6));
    h.push(rec(7, SOp::Get(0), 7, 8, Ret::Value(7)));
    assert_eq!(check_linearizable(&h, 0), Ok((4, 3)));
    // A failed CAS that found 8 observed it: the pending put of 8 is kept and explains it.
    h.push(Rec {
        saw: Some(8),
        ..rec(8, SOp::Cas(0, 7, 10), 9, 10, Ret::Cas(false))
    });
    assert_eq!(check_linearizable(&h, 0), Ok((6, 2)));
    // A value no write wrote (or written by a call invoked after the read returned): no
    // linearization, pending calls or not.
    h.push(rec(9, SOp::Get(0), 11, 12, Ret::Value(11)));
    h.push(pending(10, SOp::Put(0, 11), 13));
    assert!(check_linearizable(&h, 0).is_err());
}

/// Runs `ballot-cli` with `args` (and `stdin` as its input, `env` set); returns the exit
/// code, stdout, stderr and how long it took. `BALLOT_ENDPOINTS` is unset unless given.
fn run_cli(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String, Duration) {
    use std::io::Write;
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ballot-cli"))
        .args(args)
        .env_remove("BALLOT_ENDPOINTS")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ballot-cli");
    // A child that exits before reading all of stdin makes this write fail: that is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn cli_dead_cluster_fails_fast_naming_each_endpoint() {
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let list = format!("0={a},1={b}");
    for cmd in [
        vec!["get", "k"],
        vec!["put", "k", "v"],
        vec!["cas", "--absent", "k", "v"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--endpoints", &list, "--timeout", "20"]);
        let (code, out, err, took) = run_cli(&args, &[], b"");
        assert_eq!(code, 3, "{cmd:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(took < Duration::from_secs(3), "{cmd:?} took {took:?}");
        assert!(
            err.contains("no endpoint accepts connections"),
            "{cmd:?}: {err}"
        );
        for addr in [&a, &b] {
            assert!(
                err.lines()
                    .any(|l| l.contains(addr.as_str()) && l.contains("refused")),
                "{cmd:?}: {addr} not named: {err}"
            );
        }
    }
    // The same from BALLOT_ENDPOINTS; status and health too.
    for cmd in ["status", "health", "checkpoint"] {
        let (code, _, err, took) = run_cli(&[cmd], &[("BALLOT_ENDPOINTS", &list)], b"");
        assert_eq!(code, 3, "{cmd}: {err}");
        assert!(took < Duration::from_secs(3), "{cmd} took {took:?}");
    }
}

#[test]
fn cli_usage_errors_exit_2() {
    let ep = format!("127.0.0.1:{}", free_port());
    let big = vec![b'x'; 2_000_000];
    let cases: Vec<(Vec<&str>, &[u8], &str)> = vec![
        (
            vec!["--endpoints", "nohost", "get", "k"],
            b"",
            "bad endpoint",
        ),
        (
            vec!["--endpoints", "h:notaport", "get", "k"],
            b"",
            "bad endpoint",
        ),
        (
            vec!["--endpoints", "0=h:0", "get", "k"],
            b"",
            "bad endpoint",
        ),
        (vec!["get", "k"], b"", "no endpoints"),
        (vec!["--endpoints", &ep, "frobnicate"], b"", "unrecognized"),
        (vec!["--endpoints", &ep, "put", "k"], b"", "required"),
        (vec!["--endpoints", &ep, "cas", "k", "v"], b"", "cas needs"),
        (
            vec!["--endpoints", &ep, "cas", "--absent", "k"],
            b"",
            "--absent",
        ),
        (
            vec!["--endpoints", &ep, "--timeout", "0", "get", "k"],
            b"",
            "timeout",
        ),
        (vec!["--endpoints", &ep, "put", "k", "-"], &big, "limit"),
        (
            vec![
                "--endpoints",
                &ep,
                "put",
                "k",
                "--value-file",
                "/nonexistent/v",
            ],
            b"",
            "cannot read value file",
        ),
    ];
    for (args, stdin, want) in cases {
        let (code, _, err, _) = run_cli(&args, &[], stdin);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    let long_key = "k".repeat(5000);
    let (code, _, err, _) = run_cli(&["--endpoints", &ep, "get", &long_key], &[], b"");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a key is 1 to 4096 bytes"), "{err}");
}

#[test]
fn cli_exit_codes() {
    let mut cl = Cluster::new(3, "cli");
    cl.wait_serving("after boot");
    // `id=host:port` entries, as in --client-peers.
    let all = cl
        .addrs()
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let cli = |args: &[&str]| {
        let (code, out, _, _) = run_cli(args, &[("BALLOT_ENDPOINTS", &all)], b"");
        (code, out)
    };
    assert_eq!(cli(&["put", "a", "1"]).0, 0);
    assert_eq!(cli(&["get", "a"]), (0, "1\n".to_string()));
    assert_eq!(cli(&["get", "nope"]).0, 1);
    assert_eq!(cli(&["cas", "a", "2", "3"]).0, 1);
    assert_eq!(cli(&["cas", "a", "1", "3"]).0, 0);
    assert_eq!(cli(&["delete", "a"]).0, 0);
    assert_eq!(cli(&["delete", "a"]).0, 1);
    // --endpoints anywhere, and the old --cluster spelling.
    let (code, out, err, _) = run_cli(&["get", "nope", "--endpoints", &all], &[], b"");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    let (code, _, err, _) = run_cli(&["--cluster", &all, "put", "old", "x"], &[], b"");
    assert_eq!(code, 0, "{err}");

    // put / get / cas --absent with --json.
    let j = |args: &[&str]| {
        let (code, out) = cli(args);
        let v = json_lines(&out);
        assert_eq!(v.len(), 1, "{args:?}: {out}");
        (code, v.into_iter().next().unwrap())
    };
    let (code, v) = j(&["--json", "put", "j", "héllo"]);
    assert_eq!((code, &v["ok"]), (0, &serde_json::json!(true)));
    let (code, v) = j(&["get", "j", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["value"], "héllo");
    assert_eq!(v["value_encoding"], "utf8");
    let (code, v) = j(&["cas", "--absent", "j", "other", "--json"]);
    assert_eq!(code, 1);
    assert_eq!(
        (&v["swapped"], &v["current"]),
        (&false.into(), &"héllo".into())
    );
    let (code, v) = j(&["cas", "--absent", "fresh", "new", "--json"]);
    assert_eq!((code, &v["swapped"]), (0, &true.into()));
    let (code, v) = j(&["get", "fresh", "--json"]);
    assert_eq!((code, &v["value"]), (0, &"new".into()));
    let (code, v) = j(&["get", "gone", "--json"]);
    assert_eq!((code, &v["found"]), (1, &false.into()));

    // A value from stdin: 1 MiB of non-UTF-8 bytes, above the 128 KiB argument limit.
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 0x80).collect();
    let (code, _, err, _) = run_cli(&["put", "big", "-", "--endpoints", &all], &[], &big);
    assert_eq!(code, 0, "{err}");
    let (code, v) = j(&["get", "big", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["value_encoding"], "base64");
    assert_eq!(
        v["value"].as_str().unwrap().len(),
        big.len().div_ceil(3) * 4
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ballot-cli"))
        .args(["get", "big", "--endpoints", &all])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, [&big[..], b"\n"].concat());
    let (code, _, err, _) = run_cli(
        &["cas", "fresh", "new", "-", "--endpoints", &all],
        &[],
        b"from stdin",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(cli(&["get", "fresh"]), (0, "from stdin\n".to_string()));

    // status: one object per node per line, digests as hex strings; health.
    let (code, out) = cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let nodes = json_lines(&out);
    assert_eq!(nodes.len(), 3, "{out}");
    assert_eq!(nodes.iter().filter(|n| n["role"] == "leader").count(), 1);
    for n in &nodes {
        let d = n["digest"].as_str().expect("digest is a string");
        assert!(d.len() == 16 && u64::from_str_radix(d, 16).is_ok(), "{d}");
    }
    let (code, v) = j(&["health", "--json"]);
    assert_eq!((code, &v["healthy"]), (0, &true.into()), "{v}");

    // Two of three down: no leader, after a bounded wait; health names the nodes.
    let leader = cl.leader();
    let other = (leader + 1) % 3;
    cl.kill9(leader);
    cl.kill9(other);
    let (code, _, err, took) = run_cli(
        &["get", "j", "--timeout", "2"],
        &[("BALLOT_ENDPOINTS", &all)],
        b"",
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no leader: 1 of 3 replicas reachable"),
        "{err}"
    );
    assert!(!err.contains("hint"), "{err}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let (code, _, err, _) = run_cli(&["health"], &[("BALLOT_ENDPOINTS", &all)], b"");
    assert_eq!(code, 3, "{err}");
    for i in [leader, other] {
        assert!(
            err.contains(&format!("{}: unreachable", cl.addrs()[i])),
            "node {i} not named: {err}"
        );
    }
}

impl Cluster {
    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("data{i}"))
    }

    fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node{i}.log"))).unwrap_or_default()
    }

    /// The segment files of node `i`, oldest first.
    fn segments(&self, i: usize) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.data_dir(i))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_str().unwrap();
                n.starts_with("seg-") && n.ends_with(".log")
            })
            .collect();
        v.sort();
        v
    }

    /// Waits for node `i` to exit on its own; its exit code.
    fn wait_exit(&mut self, i: usize, bound: Duration) -> Option<i32> {
        let deadline = Instant::now() + bound;
        loop {
            let c = self.children[i].as_mut().expect("started");
            if let Some(st) = c.try_wait().unwrap() {
                self.children[i] = None;
                return st.code();
            }
            assert!(Instant::now() < deadline, "node {i} still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Durable mode: kill -9 all three replicas at random moments under a concurrent write
/// load, restart them, 20 times. Every acknowledged write must survive and the history
/// must be linearizable (in volatile mode a whole-cluster crash loses everything).
#[test]
fn durable_three_nodes_survive_repeated_kill9_of_all() {
    let started = Instant::now();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut cl = Cluster::with_mode(3, "durable-kill", true);
    cl.wait_serving("after boot");
    let stop = Arc::new(AtomicBool::new(false));
    let next_thread = Arc::new(AtomicU64::new(1000));
    let workers = spawn_workers(&cl, 3, Load::ONE_AT_A_TIME, &stop, &next_thread);
    let acked = acked_writer(cl.addrs(), stop.clone(), true, Duration::from_millis(2), 1);
    const CYCLES: usize = 20;
    for cycle in 0..CYCLES {
        std::thread::sleep(Duration::from_millis(150 + rand(500)));
        // All three, in a random order, a few milliseconds apart.
        let first = rand(3) as usize;
        for k in 0..3 {
            cl.kill9((first + k) % 3);
            std::thread::sleep(Duration::from_millis(rand(20)));
        }
        std::thread::sleep(Duration::from_millis(rand(100)));
        for i in 0..3 {
            cl.start(i);
        }
        cl.wait_serving(&format!("after cycle {cycle}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (history, acked) = join_and_check(&cl, workers, acked, KEYS, "after kill -9 of all");
    let completed = history.iter().filter(|r| r.returned.is_some()).count();
    eprintln!(
        "{CYCLES} kill-all cycles: {} ops ({completed} completed), {} acknowledged unique \
         writes, {:?}",
        history.len(),
        acked.len(),
        started.elapsed()
    );
    assert!(acked.len() > 100, "too few acknowledged writes");
    assert!(completed > 100, "too few operations completed: {completed}");
    check_all_keys(history);
    eprintln!("total {:?}", started.elapsed());
}

/// Writes `n` unique keys through a fresh client.
fn load(cl: &Cluster, tag: &str, n: usize) {
    let mut c = Client::new(cl.addrs());
    for k in 0..n {
        c.put(format!("{tag}{k}").as_bytes(), &val(k as u64))
            .expect("put");
    }
}

/// A byte flipped in the middle of a segment: the node refuses to start, naming the file
/// and the offset, and exits non-zero.
#[test]
fn durable_mid_log_corruption_refuses_to_start() {
    let mut cl = Cluster::with_mode(3, "durable-corrupt", true);
    cl.wait_serving("after boot");
    load(&cl, "c", 300);
    let l = cl.leader();
    let victim = (l + 1) % 3;
    cl.kill9(victim);
    let seg = cl.segments(victim).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();
    cl.start(victim);
    let code = cl.wait_exit(victim, Duration::from_secs(10));
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    let log = cl.node_log(victim);
    let name = seg.file_name().unwrap().to_str().unwrap();
    assert!(
        log.contains(name) && log.contains("at offset") && log.contains("refusing to start"),
        "node log does not name the file and offset:\n{log}"
    );
    eprintln!("{}", log.lines().last().unwrap_or(""));
    // The other two still serve.
    cl.wait_serving("with the corrupt node down");
}

/// The tail cut in the middle of a record (a torn append): the node starts, says so, and
/// rejoins (catches up with what the others chose since).
#[test]
fn durable_torn_tail_is_truncated_and_the_node_rejoins() {
    let mut cl = Cluster::with_mode(3, "durable-torn", true);
    cl.wait_serving("after boot");
    load(&cl, "t", 200);
    let l = cl.leader();
    let victim = (l + 1) % 3;
    cl.kill9(victim);
    let seg = cl.segments(victim).pop().expect("a segment");
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 13)
        .unwrap();
    load(&cl, "u", 100);
    cl.start(victim);
    cl.wait_recovered(victim);
    let log = cl.node_log(victim);
    assert!(
        log.contains("torn tail truncated"),
        "node does not report the torn tail:\n{log}"
    );
    // It catches up with the leader.
    let deadline = Instant::now() + SERVE_BOUND;
    loop {
        let lead = cl.status(cl.leader()).expect("leader status");
        let me = cl.status(victim).expect("victim status");
        if me.applied >= lead.commit && lead.commit > 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} did not catch up: applied {} vs commit {}",
            me.applied,
            lead.commit
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And it serves in a quorum: kill the other follower.
    let l = cl.leader();
    let other = (0..3).find(|&i| i != l && i != victim).unwrap();
    cl.kill9(other);
    load(&cl, "v", 20);
}

/// A tmpfs of `kib` KiB mounted at `dir` (unmounted on drop); `None` when this process may
/// not mount (not root / no CAP_SYS_ADMIN).
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(dir: &std::path::Path, kib: u64) -> Option<TinyFs> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(dir).unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let src = CString::new("tmpfs").unwrap();
        let opts = CString::new(format!("size={kib}k")).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!(
                "cannot mount a tmpfs ({}); skipping",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(TinyFs(dir.to_path_buf()))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let t = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A replica whose disk fills up stops acknowledging (it says why); the other two go on.
#[test]
fn durable_full_disk_stops_the_replica_not_the_cluster() {
    // Node 0 usually leads first: both a follower's and (likely) the leader's disk filling.
    full_disk(2, "durable-full-f");
    full_disk(0, "durable-full-l");
}

fn full_disk(victim: usize, name: &str) {
    let mut cl = Cluster::unstarted(3, name, true);
    let Some(_fs) = TinyFs::mount(&cl.data_dir(victim), 256) else {
        return;
    };
    for i in 0..3 {
        cl.start(i);
    }
    cl.wait_serving("after boot");
    eprintln!("leader {} fills node {victim}'s disk", cl.leader());
    let mut c = Client::new(cl.addrs());
    let big = vec![b'x'; 8 << 10];
    for k in 0..80 {
        c.put(format!("big{k}").as_bytes(), &big).expect("put");
    }
    let deadline = Instant::now() + SERVE_BOUND;
    while !cl.node_log(victim).contains("no longer acknowledging") {
        assert!(
            Instant::now() < deadline,
            "no storage failure reported:\n{}",
            cl.node_log(victim)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = cl.node_log(victim);
    assert!(log.contains("No space left on device"), "{log}");
    cl.wait_serving("with the full replica");
    cl.kill9(victim);
}

// ----- checkpoints, log compaction and catch-up -----

/// Small checkpoints and segments, so that a few MiB of writes truncate the logs on disk.
fn ckpt_args(keep: usize) -> Vec<String> {
    [
        "--checkpoint-every",
        "256K",
        "--checkpoints-keep",
        &keep.to_string(),
        "--segment-bytes",
        "256K",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Cluster {
    /// Status of node `i`, waiting up to `SERVE_BOUND` for an answer.
    fn status_wait(&self, i: usize) -> ballot_node::wire::NodeStatus {
        let deadline = Instant::now() + SERVE_BOUND;
        loop {
            if let Some(s) = self.status(i) {
                return s;
            }
            assert!(Instant::now() < deadline, "node {i} does not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checkpoint files of node `i`, oldest first.
    fn checkpoint_files(&self, i: usize) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.data_dir(i).join("checkpoints")) else {
            return Vec::new();
        };
        let mut v: Vec<_> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_str().unwrap();
                n.starts_with("snap-") && n.ends_with(".ckpt")
            })
            .collect();
        v.sort();
        v
    }

    /// First index of node `i`'s log on disk (from the first segment's name).
    fn first_on_disk(&self, i: usize) -> Option<u64> {
        let seg = self.segments(i).into_iter().next()?;
        let name = seg.file_name()?.to_str()?;
        name.strip_prefix("seg-")?
            .strip_suffix(".log")?
            .parse()
            .ok()
    }

    /// Waits until `nodes` agree on applied index and state digest (and have applied
    /// something); returns the common status.
    fn converged(&self, nodes: &[usize], bound: Duration) -> ballot_node::wire::NodeStatus {
        let deadline = Instant::now() + bound;
        loop {
            let st: Vec<_> = nodes.iter().map(|&i| self.status(i)).collect();
            if st.iter().all(Option::is_some) {
                let st: Vec<_> = st.into_iter().flatten().collect();
                let same = st.windows(2).all(|w| {
                    (w[0].applied, w[0].digest_index, w[0].digest)
                        == (w[1].applied, w[1].digest_index, w[1].digest)
                });
                if same && st[0].digest_index > 0 {
                    return st[0].clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "nodes {nodes:?} did not converge within {bound:?}: {:?}",
                    st.iter()
                        .map(|s| (s.node, s.role.clone(), s.applied, s.digest_index, s.digest))
                        .collect::<Vec<_>>()
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "nodes {nodes:?} do not all answer"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value `fill` writes under `key`, `size` bytes.
fn fill_value(key: &str, size: usize) -> Vec<u8> {
    key.bytes().cycle().take(size).collect()
}

/// Writes `n` keys `<tag><k>` of `size` bytes from 4 client threads.
fn fill(cl: &Cluster, tag: &str, n: usize, size: usize) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (addrs, tag) = (cl.addrs(), tag.to_string());
            std::thread::spawn(move || {
                let mut c = Client::new(addrs);
                for k in (t..n).step_by(4) {
                    let key = format!("{tag}{k}");
                    c.put(key.as_bytes(), &fill_value(&key, size))
                        .unwrap_or_else(|e| panic!("put {key}: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Reads back every `step`-th key `fill(tag, n, size)` wrote.
fn check_filled(cl: &Cluster, tag: &str, n: usize, size: usize, step: usize) {
    let mut c = Client::new(cl.addrs());
    for k in (0..n).step_by(step) {
        let key = format!("{tag}{k}");
        let v = c.get(key.as_bytes()).expect("get");
        assert!(
            v.as_deref() == Some(&fill_value(&key, size)[..]),
            "key {key}: wrong value ({} bytes)",
            v.map_or(0, |v| v.len())
        );
    }
}

/// Writes until nodes `others` have compacted their logs (in memory and, durable, on disk)
/// past `index`. Returns the number of fill rounds.
fn write_until_compacted(cl: &Cluster, others: &[usize], index: u64, tag: &str) -> usize {
    let mut round = 0;
    // Checkpoints are written in the background: fast clients (pipelined server) can run
    // 60 rounds before one is kept, so the bound is in time as well as in rounds.
    let started = Instant::now();
    loop {
        let done = others.iter().all(|&i| {
            let s = cl.status_wait(i);
            s.log_base > index && (!cl.durable || cl.first_on_disk(i).is_some_and(|f| f > index))
        });
        if done {
            return round;
        }
        round += 1;
        assert!(
            round <= 60 || started.elapsed() < Duration::from_secs(30),
            "logs not compacted past {index}: {:?}",
            others
                .iter()
                .map(|&i| (i, cl.status(i).map(|s| s.log_base), cl.first_on_disk(i)))
                .collect::<Vec<_>>()
        );
        fill(cl, &format!("{tag}{round}-"), 64, 4096);
    }
}

/// A follower is down while the others write enough to compact their logs past everything
/// it holds; restarted (with its data, or with an empty data dir and `--rejoin`), it must
/// catch up through a checkpoint and end with the others' state.
fn catch_up_through_a_checkpoint(name: &str, durable: bool, lose_data: bool) {
    let mut cl = Cluster::with_args(3, name, durable, ckpt_args(1));
    cl.wait_serving("after boot");
    fill(&cl, "a", 200, 1024);
    let l = cl.leader();
    let victim = (l + 1) % 3;
    let others = [l, (l + 2) % 3];
    // Everything the victim may hold is below this (its log cannot run ahead of the
    // leader's by more than the pipeline window).
    let bound = cl.status_wait(l).commit + 300;
    cl.kill9(victim);
    let rounds = write_until_compacted(&cl, &others, bound, "b");
    let base = others
        .iter()
        .map(|&i| cl.status_wait(i).log_base)
        .min()
        .unwrap();
    eprintln!("logs compacted to {base} (victim's log ends below {bound}) after {rounds} rounds");
    if lose_data {
        std::fs::remove_dir_all(cl.data_dir(victim)).unwrap();
        cl.start_with(victim, &["--rejoin"]);
    } else {
        cl.start(victim);
    }
    cl.wait_recovered(victim);
    fill(&cl, "c", 40, 1024);
    let st = cl.converged(&[0, 1, 2], Duration::from_secs(30));
    let v = cl.status_wait(victim);
    eprintln!(
        "converged at applied {} digest {:016x}; victim log_base {} checkpoint {}",
        st.applied, st.digest, v.log_base, v.checkpoint
    );
    assert!(
        v.log_base >= base && v.checkpoint >= base,
        "the victim did not install a checkpoint: log_base {} checkpoint {} (others at {base})",
        v.log_base,
        v.checkpoint
    );
    if lose_data {
        // The rejoin marker goes once the rebuilt state is durable.
        let marker = cl.data_dir(victim).join(ballot_node::server::REJOIN_MARKER);
        let deadline = Instant::now() + SERVE_BOUND;
        while marker.exists() {
            assert!(
                Instant::now() < deadline,
                "{} still there",
                marker.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // From now on it is an ordinary durable replica: a kill -9 and restart keeps its
        // state (no --rejoin).
        cl.kill9(victim);
        cl.start(victim);
        cl.wait_recovered(victim);
        cl.converged(&[0, 1, 2], Duration::from_secs(30));
    }
    // The caught-up node counts in a quorum: stop the other follower and go on.
    let l = cl.leader();
    let other = (0..3).find(|&i| i != l && i != victim).unwrap();
    cl.kill9(other);
    fill(&cl, "d", 20, 512);
    check_filled(&cl, "a", 200, 1024, 7);
    check_filled(&cl, "c", 40, 1024, 1);
    check_filled(&cl, "d", 20, 512, 1);
    cl.converged(&[l, victim], Duration::from_secs(30));
}

#[test]
fn durable_lagging_node_catches_up_through_a_checkpoint() {
    catch_up_through_a_checkpoint("ckpt-catchup", true, false);
}

#[test]
fn durable_node_with_a_lost_data_dir_rejoins() {
    catch_up_through_a_checkpoint("ckpt-rejoin", true, true);
}

/// Volatile mode: a restarted replica recovers from the others, pulling a checkpoint when
/// they compacted past what it could get from their logs.
#[test]
fn volatile_restarted_node_catches_up_through_a_checkpoint() {
    catch_up_through_a_checkpoint("ckpt-volatile", false, false);
}

/// kill -9 of all three, several times, after checkpoints were taken and the logs were
/// truncated behind them: every acknowledged write is there after the restart, and the
/// history is linearizable.
#[test]
fn durable_kill9_of_all_after_checkpoints_keeps_acknowledged_writes() {
    let started = Instant::now();
    let mut cl = Cluster::with_args(3, "ckpt-killall", true, ckpt_args(1));
    cl.wait_serving("after boot");
    let stop = Arc::new(AtomicBool::new(false));
    let next_thread = Arc::new(AtomicU64::new(1000));
    let workers = spawn_workers(&cl, 2, Load::ONE_AT_A_TIME, &stop, &next_thread);
    let client = |addrs: Vec<String>| {
        let mut cfg = ClientConfig::new(addrs);
        cfg.deadline = Duration::from_secs(12);
        cfg.attempt_timeout = Duration::from_millis(800);
        Client::with_config(cfg)
    };
    let acked = acked_writer(cl.addrs(), stop.clone(), true, Duration::from_millis(2), 1);
    // Bulk writes so that checkpoints come often (their outcome does not matter).
    let filler = {
        let (addrs, stop) = (cl.addrs(), stop.clone());
        std::thread::spawn(move || {
            let mut c = client(addrs);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let _ = c.put(format!("f{}", n % 500).as_bytes(), &vec![b'f'; 4096]);
            }
        })
    };
    const CYCLES: usize = 5;
    let mut last_base = 0;
    for cycle in 0..CYCLES {
        // Until the logs were compacted further (on disk too) since the last cycle.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st: Vec<_> = (0..3).filter_map(|i| cl.status(i)).collect();
            let base = st.iter().map(|s| s.log_base).min().unwrap_or(0);
            let on_disk = (0..3).all(|i| cl.first_on_disk(i).is_some_and(|f| f > 1));
            if st.len() == 3 && base > last_base && on_disk {
                last_base = base;
                break;
            }
            assert!(Instant::now() < deadline, "no compaction in cycle {cycle}");
            std::thread::sleep(Duration::from_millis(50));
        }
        for k in 0..3 {
            cl.kill9((cycle + k) % 3);
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..3 {
            cl.start(i);
        }
        cl.wait_serving(&format!(
            "after cycle {cycle} (logs compacted to {last_base})"
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    filler.join().unwrap();
    let (history, acked) = join_and_check(&cl, workers, acked, KEYS, "after kill -9 of all");
    let st = cl.converged(&[0, 1, 2], Duration::from_secs(30));
    eprintln!(
        "{CYCLES} kill-all cycles with compacted logs: {} acknowledged unique writes, \
         converged at {} (log base {}), {:?}",
        acked.len(),
        st.applied,
        last_base,
        started.elapsed()
    );
    assert!(acked.len() > 50, "too few acknowledged writes");
    check_all_keys(history);
}

/// Flips a byte in the middle of a checkpoint file's data.
fn corrupt(path: &std::path::Path) {
    let mut b = std::fs::read(path).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x5a;
    std::fs::write(path, &b).unwrap();
}

/// The newest checkpoint of a stopped node is corrupt. With two kept, the node falls back to
/// the older one (the log covers from it), sets the bad one aside, and catches up. With one
/// kept and the log truncated behind it, the node refuses to start, naming the file; wiping
/// the data dir and restarting with `--rejoin` repairs it.
#[test]
fn durable_corrupt_checkpoint_falls_back_or_refuses() {
    // Two kept: fallback.
    {
        let mut cl = Cluster::with_args(3, "ckpt-corrupt2", true, ckpt_args(2));
        cl.wait_serving("after boot");
        let l = cl.leader();
        let victim = (l + 1) % 3;
        let mut round = 0;
        while cl.checkpoint_files(victim).len() < 2 || cl.first_on_disk(victim) <= Some(1) {
            round += 1;
            assert!(
                round <= 60,
                "node {victim}: no two checkpoints and a truncated log"
            );
            fill(&cl, &format!("x{round}-"), 64, 4096);
        }
        cl.kill9(victim);
        let files = cl.checkpoint_files(victim);
        let newest = files.last().unwrap().clone();
        eprintln!(
            "checkpoints {:?}, log from {:?}; corrupting {}",
            files,
            cl.first_on_disk(victim),
            newest.display()
        );
        corrupt(&newest);
        fill(&cl, "y", 40, 1024);
        cl.start(victim);
        cl.wait_recovered(victim);
        let log = cl.node_log(victim);
        let name = newest.file_name().unwrap().to_str().unwrap();
        assert!(
            log.contains(name) && log.contains("does not verify") && log.contains("set aside"),
            "the node does not report the corrupt checkpoint:\n{log}"
        );
        let aside = format!("{}.corrupt", newest.display());
        assert!(std::path::Path::new(&aside).exists(), "{aside} missing");
        cl.converged(&[0, 1, 2], Duration::from_secs(30));
        check_filled(&cl, "y", 40, 1024, 1);
    }
    // One kept, the log truncated behind it: refusal naming the file, then --rejoin.
    let mut cl = Cluster::with_args(3, "ckpt-corrupt1", true, ckpt_args(1));
    cl.wait_serving("after boot");
    let l = cl.leader();
    let victim = (l + 1) % 3;
    let mut round = 0;
    while cl.checkpoint_files(victim).is_empty() || cl.first_on_disk(victim) <= Some(1) {
        round += 1;
        assert!(
            round <= 60,
            "node {victim}: no checkpoint and a truncated log"
        );
        fill(&cl, &format!("x{round}-"), 64, 4096);
    }
    cl.kill9(victim);
    let only = cl.checkpoint_files(victim).pop().unwrap();
    corrupt(&only);
    cl.start(victim);
    let code = cl.wait_exit(victim, Duration::from_secs(10));
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    let log = cl.node_log(victim);
    let name = only.file_name().unwrap().to_str().unwrap();
    assert!(
        log.contains(name) && log.contains("refusing to start"),
        "the refusal does not name the checkpoint:\n{log}"
    );
    eprintln!("{}", log.lines().last().unwrap_or(""));
    assert!(only.exists(), "a refused start changes nothing on disk");
    cl.wait_serving("with the node refused");
    // The documented repair: wipe its data dir, restart it with --rejoin.
    std::fs::remove_dir_all(cl.data_dir(victim)).unwrap();
    cl.start_with(victim, &["--rejoin"]);
    cl.wait_recovered(victim);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
}

// ---- Safe starts (docs/operations.md, "Life cycle") ----

impl Cluster {
    fn has_marker(&self, i: usize) -> bool {
        self.data_dir(i).join(ballot_node::server::MARKER).exists()
    }

    /// Waits until `what` appears `times` times in node `i`'s log.
    fn wait_log(&self, i: usize, what: &str, times: usize, bound: Duration) -> String {
        let deadline = Instant::now() + bound;
        loop {
            let log = self.node_log(i);
            if log.matches(what).count() >= times {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}: {what:?} not logged {times} times within {bound:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A first start that fails on a busy port (the client port, the fabric port) writes
/// nothing: the next, correct start is a first start again, not a restart that waits
/// forever to recover from replicas that never had a state.
#[test]
fn failed_first_start_leaves_nothing_behind() {
    let mut cl = Cluster::unstarted(3, "busy-port", false);
    let _c0 = TcpListener::bind(("127.0.0.1", cl.client[0])).unwrap();
    let _f1 = TcpListener::bind(("127.0.0.1", cl.fabric[1])).unwrap();
    let _c2 = TcpListener::bind(("127.0.0.1", cl.client[2])).unwrap();
    for i in 0..3 {
        cl.start(i);
    }
    for i in 0..3 {
        assert_eq!(cl.wait_exit(i, Duration::from_secs(20)), Some(1));
        assert!(
            cl.node_log(i).contains("cannot listen for"),
            "{}",
            cl.node_log(i)
        );
        assert!(
            !cl.data_dir(i).exists(),
            "node {i}'s failed start wrote {}",
            cl.data_dir(i).display()
        );
    }
    drop((_c0, _f1, _c2));
    for i in 0..3 {
        cl.start(i);
    }
    cl.wait_serving("after the failed first starts");
    for i in 0..3 {
        cl.wait_recovered(i);
        assert!(cl.has_marker(i));
    }
}

/// A durable replica whose data dir was wiped is refused without an initial cluster state
/// (the message names both flags), writing nothing; with `existing` it rebuilds from the
/// others and ends with their state; `new` on a restart is ignored with a warning.
#[test]
fn wiped_data_dir_needs_an_explicit_initial_state() {
    let mut cl = Cluster::with_mode(3, "wiped", true);
    cl.wait_serving("after boot");
    load(&cl, "a", 50);
    let l = cl.leader();
    let victim = (l + 1) % 3;
    cl.kill9(victim);
    std::fs::remove_dir_all(cl.data_dir(victim)).unwrap();
    cl.start_raw(victim, &[]);
    assert_eq!(cl.wait_exit(victim, SERVE_BOUND), Some(1));
    let log = cl.node_log(victim);
    assert!(
        log.contains("holds no state of replica")
            && log.contains("--initial-cluster-state new")
            && log.contains("--initial-cluster-state existing"),
        "{log}"
    );
    assert!(!cl.data_dir(victim).exists(), "the refused start wrote");
    cl.start_raw(victim, &["--initial-cluster-state", "existing"]);
    cl.wait_recovered(victim);
    load(&cl, "b", 20);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
    // A restart with `new` left on the command line: ignored, with a warning.
    cl.kill9(victim);
    cl.start_raw(victim, &["--initial-cluster-state", "new"]);
    cl.wait_log(
        victim,
        "--initial-cluster-state new ignored",
        1,
        SERVE_BOUND,
    );
    cl.wait_recovered(victim);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
}

/// The promise record in node `i`'s data dir (the node must be stopped: it holds the lock).
fn promise_record(cl: &Cluster, i: usize) -> ballot::PromiseRecord {
    ballot::storage::PromiseStore::open(cl.data_dir(i))
        .expect("promise store opens")
        .record()
}

/// Waits until node `i` reports a promise above `above`.
fn wait_promise_above(cl: &Cluster, i: usize, above: u64) -> u64 {
    let deadline = Instant::now() + SERVE_BOUND;
    loop {
        if let Some(s) = cl.status(i).filter(|s| s.ballot > above) {
            return s.ballot;
        }
        assert!(Instant::now() < deadline, "node {i} promised nothing new");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A first start boots blank, and its blankness is durable until a leader establishes it:
/// a replica that crashes before that comes back as the same blank incarnation, never as
/// one that remembers (the simulator's seeds 527, 577 and 5009 lost chosen values that way).
#[test]
fn a_blank_first_start_stays_blank_across_a_crash_until_established() {
    let mut cl = Cluster::unstarted(3, "blank", true);
    // Alone, node 0 can only stand for election: it promises its own ballots, durably.
    cl.start(0);
    let b1 = wait_promise_above(&cl, 0, 0);
    cl.kill9(0);
    let r1 = promise_record(&cl, 0);
    assert!(r1.blank != 0, "first start not blank: {r1:?}");
    assert!(r1.ballot.0 >= b1, "{r1:?} below the reported {b1}");
    // Restarted from its data dir: the same blank incarnation, promising on.
    cl.start(0);
    wait_promise_above(&cl, 0, r1.ballot.0);
    cl.kill9(0);
    let r2 = promise_record(&cl, 0);
    assert_eq!(r2.blank, r1.blank, "{r1:?} then {r2:?}");
    assert!(r2.ballot > r1.ballot);
    // With the others, a leader establishes everyone: no replica stays blank.
    for i in 0..3 {
        cl.start(i);
    }
    cl.wait_serving("after the first start");
    load(&cl, "a", 20);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
    for i in 0..3 {
        cl.kill9(i);
        let r = promise_record(&cl, i);
        assert!(r.blank == 0 && r.ballot.0 > 0, "node {i}: {r:?}");
    }
    for i in 0..3 {
        cl.start(i);
    }
    cl.wait_serving("after a restart of all three");
    load(&cl, "b", 20);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
}

/// A data dir written in durable mode is refused by a volatile start (which would forget
/// what it promised and accepted), as a durable start refuses a volatile one.
#[test]
fn volatile_start_refuses_a_durable_data_dir() {
    let mut cl = Cluster::with_mode(3, "mode-switch", true);
    cl.wait_serving("after boot");
    load(&cl, "a", 20);
    let victim = (cl.leader() + 1) % 3;
    cl.kill9(victim);
    cl.durable = false;
    cl.start(victim);
    assert_eq!(cl.wait_exit(victim, SERVE_BOUND), Some(1));
    let log = cl.node_log(victim);
    assert!(
        log.contains("holds durable state") && log.contains("--durability durable"),
        "{log}"
    );
    cl.durable = true;
    cl.start(victim);
    cl.wait_recovered(victim);
    cl.converged(&[0, 1, 2], Duration::from_secs(30));
}

/// A cluster that cannot recover says so, at WARN, every few seconds, on every replica
/// that waits: a volatile majority restarted at once, and a rejoin with no one to rejoin
/// from. They report `recovering` meanwhile.
#[test]
fn unrecoverable_cluster_warns_what_is_missing() {
    let mut all = Cluster::new(3, "volatile-majority");
    all.wait_serving("after boot");
    for i in 0..3 {
        all.kill9(i);
    }
    for i in 0..3 {
        all.start(i);
    }
    let mut alone = Cluster::unstarted(3, "rejoin-alone", false);
    alone.start_with(0, &["--initial-cluster-state", "existing"]);
    let bound = Duration::from_secs(20);
    for (cl, nodes) in [(&all, vec![0, 1, 2]), (&alone, vec![0])] {
        for i in nodes {
            let log = cl.wait_log(i, "still recovering after", 2, bound);
            assert!(
                log.contains("WARN") && log.contains("--initial-cluster-state new"),
                "{log}"
            );
            assert_eq!(cl.status(i).expect("answers status").role, "recovering");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Observability: `--metrics-addr` (/metrics, /health) and `--log-format json`.

/// A plain HTTP/1.0 GET (no chunked answer): status code and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The value of `series` (a name, with its labels if it has some) in a scrape.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn scrape(port: u16) -> String {
    let (code, body) = http_get(port, "/metrics").expect("metrics endpoint answers");
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits up to `SERVE_BOUND` until `ok` holds.
fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + SERVE_BOUND;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {SERVE_BOUND:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_move_with_the_workload_and_health_follows_the_leader() {
    let mut cl = Cluster::unstarted(3, "metrics", false);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (i, p) in ports.iter().enumerate() {
        cl.start_with(i, &["--metrics-addr", &format!("127.0.0.1:{p}")]);
    }
    cl.wait_serving("after boot");
    let health = |i: usize| http_get(ports[i], "/health").map(|(c, _)| c);
    wait_until("every node healthy", || {
        (0..3).all(|i| health(i) == Some(200))
    });
    let applied = |i: usize| sample(&scrape(ports[i]), "ballot_applied_commands_total");
    let before: Vec<f64> = (0..3).map(applied).collect();
    let mut c = Client::new(cl.addrs());
    for k in 0..20u32 {
        c.put(format!("m{k}").as_bytes(), b"v").unwrap();
    }
    wait_until("every node applied the 20 puts", || {
        (0..3).all(|i| applied(i) >= before[i] + 20.0)
    });
    let l = cl.leader();
    let m = scrape(ports[l]);
    assert_eq!(sample(&m, "ballot_role{role=\"leader\"}"), 1.0);
    assert_eq!(sample(&m, "ballot_leader"), l as f64);
    assert!(sample(&m, "ballot_commits_total") >= 20.0, "{m}");
    assert!(sample(&m, "ballot_commit_latency_seconds_count") >= 20.0);
    assert!(sample(&m, "ballot_commit_index") >= sample(&m, "ballot_applied_index"));
    assert!(sample(&m, "ballot_leader_changes_total") >= 1.0);
    // The client registered a session through the log: every replica's table holds it.
    for &p in &ports {
        assert!(sample(&scrape(p), "ballot_client_sessions") >= 1.0);
    }
    let f = (l + 1) % 3;
    let peer = format!("ballot_fabric_sent_bytes_total{{peer=\"{f}\"}}");
    assert!(sample(&m, &peer) > 0.0, "{m}");
    // Ring credit stalls are exported per follower. (The in-process test in
    // engine/tests/metrics.rs makes one happen. Provoking one here, by SIGSTOPping a
    // follower under ten concurrent 1 MiB puts, counted a stall within 10 s in 2 runs of
    // 5, but wedged the cluster then: the TCP fabric's flush blocked the leader on the
    // stopped follower, fixed since; see docs/status.md and
    // a_follower_keeps_following_while_the_other_is_stopped_under_large_writes.)
    for to in [f, (l + 2) % 3] {
        let series = format!("ballot_ring_credit_stalls_total{{peer=\"{to}\"}}");
        assert!(sample(&m, &series) >= 0.0, "{m}");
    }
    assert_eq!(http_get(ports[l], "/nothing").map(|(c, _)| c), Some(404));
    // The leader and one more die: the survivor knows no leader and says so.
    cl.kill9(l);
    cl.kill9((l + 2) % 3);
    wait_until("the survivor unhealthy", || health(f) == Some(503));
    let (_, why) = http_get(ports[f], "/health").unwrap();
    assert!(why.contains("no known leader"), "{why}");
    assert_eq!(sample(&scrape(ports[f]), "ballot_health"), 0.0);
}

#[test]
fn json_logs_and_unreachable_or_refused_peers_warned_once_per_period() {
    // Node 0 logs JSON; node 1 has the wrong key (it redials node 0 about ten times in
    // 2.5 s and each handshake is refused); node 2 is never started. Without rate limits
    // node 0 would warn at every one of those dials; with them, once per peer (10 s).
    let mut cl = Cluster::unstarted(3, "jsonlog", false);
    cl.start_with(0, &["--log-format", "json"]);
    // Node 0 has read its key once it answers.
    wait_until("node 0 up", || cl.status(0).is_some());
    std::fs::write(cl.dir.join("key"), "another key\n").unwrap();
    cl.start_with(1, &[]);
    std::thread::sleep(Duration::from_millis(2500));
    cl.kill9(0);
    cl.kill9(1);
    let log = std::fs::read_to_string(cl.dir.join("node0.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let warned = |what: &[&str], peer: Option<u8>| {
        lines
            .iter()
            .filter(|v| {
                v["level"] == "WARN"
                    && what.iter().any(|w| v["fields"]["message"] == *w)
                    && peer.is_none_or(|p| v["fields"]["peer"] == p)
            })
            .count()
    };
    let dial = [
        "peer unreachable; retrying",
        "handshake refused by peer; retrying",
    ];
    assert_eq!(warned(&dial, Some(2)), 1, "{log}");
    assert_eq!(warned(&dial, Some(1)), 1, "{log}");
    assert_eq!(warned(&["refused handshake"], None), 1, "{log}");
}

/// docs/operations.md, "Backup and restore": `ballot-cli checkpoint`, copy the newest
/// `snap-*.ckpt`, seed every replica of a new durable cluster with it.
#[test]
fn a_checkpoint_backup_restores_a_new_durable_cluster() {
    let cl = Cluster::with_mode(3, "backup", true);
    cl.wait_serving("after boot");
    let mut c = Client::new(cl.addrs());
    for k in 0..5 {
        c.put(format!("b{k}").as_bytes(), format!("v{k}").as_bytes())
            .unwrap();
    }
    let applied = cl.converged(&[0, 1, 2], SERVE_BOUND).applied;
    let eps = cl.addrs().join(",");
    let (code, out, err, _) = run_cli(&["checkpoint"], &[("BALLOT_ENDPOINTS", &eps)], b"");
    assert_eq!(code, 0, "{out}{err}");
    wait_until("node 0 keeps the checkpoint", || {
        cl.status(0).is_some_and(|s| s.checkpoint >= applied)
    });
    let backup = cl.checkpoint_files(0).pop().unwrap();
    c.put(b"after", b"not in the backup").unwrap();
    let mut restored = Cluster::unstarted(3, "restored", true);
    for i in 0..3 {
        let dir = restored.dir.join(format!("data{i}")).join("checkpoints");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&backup, dir.join(backup.file_name().unwrap())).unwrap();
        restored.start(i); // --initial-cluster-state new: an empty data dir but for it
    }
    restored.wait_serving("restored from the backup");
    let mut c = Client::new(restored.addrs());
    for k in 0..5 {
        let want = format!("v{k}").into_bytes();
        assert_eq!(c.get(format!("b{k}").as_bytes()).unwrap(), Some(want));
    }
    assert_eq!(c.get(b"after").unwrap(), None);
    assert!(restored.status_wait(0).log_base >= applied);
}

/// Sessions keep the dedup state bounded: twenty CLI reads of a 100 KB value leave the
/// checkpoint at about one value (before sessions each read kept its result: 2.1 MB); a
/// write resent with the same session and sequence number applies once; a write from a
/// session never registered is answered "session expired" and not applied.
#[test]
fn sessions_keep_the_checkpoint_small_and_retries_apply_once() {
    use ballot_node::wire::{Request, Response};
    let cl = Cluster::with_mode(3, "sessions", true);
    cl.wait_serving("after boot");
    let eps = cl.addrs().join(",");
    let env = [("BALLOT_ENDPOINTS", eps.as_str())];
    let value = vec![b'v'; 100_000];
    let (code, _, err, _) = run_cli(&["put", "big", "-"], &env, &value);
    assert_eq!(code, 0, "{err}");
    for _ in 0..20 {
        let (code, out, err, _) = run_cli(&["get", "big"], &env, b"");
        assert_eq!((code, out.len()), (0, value.len() + 1), "{err}");
    }

    let mut c = Client::new(cl.addrs());
    c.put(b"n", b"0").unwrap();
    let (session, seq) = (c.id(), c.seq());
    assert_ne!(session, 0);
    let send = |client: u64, seq: u64, op: Op| -> KvResult {
        let cmd = ballot_node::kv::Command { client, seq, op }.encode();
        let mut s = client::Conn::open(
            &cl.addrs()[cl.leader()],
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        match s.call(&Request::Command(cmd).encode()).unwrap() {
            Response::Ok(r) => KvResult::decode(&r).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let cas = || Op::Cas {
        key: b"n".to_vec(),
        expected: Some(b"0".to_vec()),
        new: b"1".to_vec(),
    };
    // The same CAS three times: applied once (a second application would fail to match).
    for _ in 0..3 {
        assert_eq!(send(session, seq + 1, cas()), KvResult::Ok);
    }
    assert_eq!(send(0xdead_beef, 1, cas()), KvResult::SessionExpired);
    assert_eq!(c.get(b"n").unwrap(), Some(b"1".to_vec()));
    // Another client going on with the session from the next sequence number.
    let mut cfg = ClientConfig::new(cl.addrs());
    cfg.session = Some((session, seq + 1));
    let mut again = Client::with_config(cfg);
    again.put(b"n", b"2").unwrap();
    assert_eq!((again.id(), again.seq()), (session, seq + 2));
    assert_eq!(c.get(b"n").unwrap(), Some(b"2".to_vec()));

    let applied = cl.converged(&[0, 1, 2], SERVE_BOUND).applied;
    let (code, out, err, _) = run_cli(&["checkpoint"], &env, b"");
    assert_eq!(code, 0, "{out}{err}");
    wait_until("node 0 keeps the checkpoint", || {
        cl.status(0).is_some_and(|s| s.checkpoint >= applied)
    });
    let ckpt = cl.checkpoint_files(0).pop().unwrap();
    let size = std::fs::metadata(&ckpt).unwrap().len();
    assert!(
        size < value.len() as u64 + 10_000,
        "checkpoint of {size} bytes for one 100 KB value"
    );
}

/// Three volatile replicas; one follower SIGSTOPped while 1 MiB puts go to the leader. The
/// leader and the other follower are a live majority: puts must keep committing, and the
/// leader keep leading. (Before the fix the leader's replication thread blocked in the TCP
/// fabric's flush towards the stopped follower for the 5 s write timeout: its heartbeat
/// stood still, the other follower stood for election again and again in vain, and
/// nothing committed; see docs/status.md.)
#[test]
fn a_follower_keeps_following_while_the_other_is_stopped_under_large_writes() {
    let cl = Cluster::new(3, "stopped-follower-large");
    cl.wait_serving("after boot");
    let mut c = Client::new(cl.addrs());
    for k in 0..20u32 {
        c.put(format!("s{k}").as_bytes(), b"v").unwrap();
    }
    let l = cl.leader();
    let stopped = (l + 1) % 3;
    let other = (l + 2) % 3;
    eprintln!(
        "leader {l} (pid {}), SIGSTOP follower {stopped}, other follower {other}",
        cl.children[l].as_ref().unwrap().id()
    );
    cl.signal(stopped, libc::SIGSTOP);
    // Per put; STOP_BOUND_SECS raises it to watch a stall play out (with NODE_LOG=debug).
    let bound =
        Duration::from_secs(std::env::var("STOP_BOUND_SECS").map_or(4, |s| s.parse().unwrap()));
    let mut cfg = ClientConfig::new(cl.addrs());
    cfg.deadline = bound;
    cfg.attempt_timeout = Duration::from_secs(2);
    let mut big = Client::with_config(cfg);
    let value = vec![b'x'; 1 << 20];
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    // Past the fabric's write timeout (5 s), when the leader drops its connection to the
    // stopped peer and keeps redialling it.
    let mut k = 0u32;
    while k < 30 || started.elapsed() < Duration::from_secs(7) {
        let t = Instant::now();
        if let Err(e) = big.put(format!("big{}", k % 4).as_bytes(), &value) {
            let s = cl.status(other);
            panic!(
                "1 MiB put {k} not committed within {bound:?} with follower {stopped} stopped \
                 ({:?} into the burst): {e}; other follower: {:?}",
                started.elapsed(),
                s.map(|s| (s.role, s.ballot, s.leader))
            );
        }
        slowest = slowest.max(t.elapsed());
        k += 1;
        if k >= 30 {
            std::thread::sleep(Duration::from_millis(50)); // the rest at a gentler pace
        }
    }
    eprintln!(
        "{k} puts of 1 MiB in {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    // Nothing deposed the leader: the other follower still follows it.
    let s = cl.status(other).expect("the other follower answers");
    assert_eq!(
        (s.role.as_str(), s.leader),
        ("follower", Some(l as u8)),
        "{s:?}"
    );
    assert_eq!(cl.leader(), l);
    cl.signal(stopped, libc::SIGCONT);
    cl.wait_serving("after SIGCONT");
}
