//! `ballot-bench --topology processes` end to end: it runs real `ballot-node` processes,
//! reports, and leaves none behind, also when interrupted. Skipped (with a note) when the
//! `ballot-node` binary is not built next to `ballot-bench` (`cargo test --workspace`
//! builds it).

use ballot_node::config::loopback_peers;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_ballot-bench");

fn node_binary() -> Option<PathBuf> {
    let p = PathBuf::from(BENCH).with_file_name("ballot-node");
    p.is_file().then_some(p)
}

/// Pids of processes whose command line mentions the bench's temp dir.
fn nodes_of(bench_pid: u32) -> Vec<u32> {
    let tag = format!("ballot-bench-{bench_pid}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty command line.
        if String::from_utf8_lossy(&cmd).contains(&tag) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn processes_topology_reports_and_cleans_up() {
    if node_binary().is_none() {
        eprintln!("skipped: ballot-node is not built next to {BENCH}");
        return;
    }
    let child = Command::new(BENCH)
        .args([
            "--topology",
            "processes",
            "--clients",
            "2",
            "--duration",
            "1",
        ])
        .args(["--warmup", "300ms", "--json", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""topology":"processes""#), "{stdout}");
    assert!(!stdout.contains(r#""commits":0,"#), "no commits: {stdout}");
    assert!(
        nodes_of(pid).is_empty(),
        "ballot-node processes left behind"
    );
    let prefix = format!("ballot-bench-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "directories left behind: {left:?}");
}

/// `--idle-connections`: three results (without, with, without again), the middle one
/// labelled with the count, the leader's threads reported; and a clear error when the
/// open-file limit cannot fit them.
#[test]
fn idle_connections_are_measured_or_refused_clearly() {
    if node_binary().is_none() {
        eprintln!("skipped: ballot-node is not built next to {BENCH}");
        return;
    }
    let run = |idle: &str, hard_limit: Option<u64>| {
        let mut cmd = Command::new(BENCH);
        cmd.args(["cluster", "--topology", "processes", "--clients", "2"])
            .args([
                "--duration",
                "500ms",
                "--warmup",
                "200ms",
                "--json",
                "--quiet",
            ])
            .args(["--idle-connections", idle]);
        if let Some(n) = hard_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.output().unwrap()
    };
    let out = run("200", None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    // The result's own field (the run's options name the flag in every line).
    let labelled = r#""idle_connections":200,"run":"#;
    assert!(!lines[0].contains(labelled), "{stdout}");
    assert!(lines[1].contains(labelled), "{stdout}");
    assert!(!lines[2].contains(labelled), "{stdout}");
    assert!(
        stderr.contains("200 idle connections open on the leader"),
        "{stderr}"
    );
    assert!(stderr.contains("leader threads"), "{stderr}");
    let out = run("5000", Some(1024));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("open-file limit is 1024"), "{stderr}");
}

#[test]
fn interrupted_run_kills_its_nodes() {
    if node_binary().is_none() {
        eprintln!("skipped: ballot-node is not built next to {BENCH}");
        return;
    }
    let mut child = Command::new(BENCH)
        .args([
            "--topology",
            "processes",
            "--clients",
            "1",
            "--duration",
            "60",
        ])
        .args(["--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes_of(pid).len() < 3 {
        assert!(Instant::now() < deadline, "nodes did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: SIGINT to our own child, as Ctrl-C would.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0);
    let st = child.wait().unwrap();
    assert!(!st.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nodes_of(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "ballot-node processes survived the interrupted bench"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the nodes started by a test, however it ends.
struct Nodes(Vec<std::process::Child>);
impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn endpoints_drive_an_existing_cluster_and_leave_it_running() {
    let Some(node) = node_binary() else {
        eprintln!("skipped: ballot-node is not built next to {BENCH}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (fabric, client): (Vec<u16>, Vec<u16>) = (0..3).map(|_| (port(), port())).unzip();
    let mut nodes = Nodes(Vec::new());
    for i in 0..3 {
        let child = Command::new(&node)
            .args(["--node", &i.to_string(), "--cluster", "0xBE4D"])
            .args([
                "--peers",
                &loopback_peers(&fabric),
                "--client-peers",
                &loopback_peers(&client),
            ])
            .args(["--client-addr", &format!("127.0.0.1:{}", client[i])])
            .arg("--data-dir")
            .arg(dir.path().join(i.to_string()))
            .args(["--initial-cluster-state", "new"])
            .env("BALLOT_CLUSTER_KEY", "endpoints-test-key")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        nodes.0.push(child);
    }
    let endpoints = loopback_peers(&client);
    // Until every node serves its client port (the bench refuses a cluster that does not
    // answer at all).
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in &client {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            assert!(
                Instant::now() < deadline,
                "ballot-node did not listen on {p}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = Command::new(BENCH)
        .args([
            "--endpoints",
            &endpoints,
            "--clients",
            "2",
            "--duration",
            "1",
        ])
        .args(["--warmup", "300ms", "--json", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["topology"], "external", "{stdout}");
    assert_eq!(r["durability"], "unknown", "{stdout}");
    assert_eq!(r["replicas"], 3, "{stdout}");
    assert!(r["commits"].as_u64().unwrap() > 0, "{stdout}");
    for (i, c) in nodes.0.iter_mut().enumerate() {
        assert!(c.try_wait().unwrap().is_none(), "node {i} stopped");
    }
}
