//! `ballot-bench --topology processes` end to end: it runs real `ballot-node` processes,
//! reports, and leaves none behind, also when interrupted. Skipped (with a note) when the
//! `ballot-node` binary is not built next to `ballot-bench` (`cargo test --workspace`
//! builds it).

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
    assert!(!std::env::temp_dir()
        .join(format!("ballot-bench-{pid}"))
        .exists());
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
