//! `ballot-bench` as a user runs it: `--json` parsed with serde (results and run metadata),
//! options refused by the subcommands that do not take them, durable runs that leave no
//! directory behind, `raw --server`/`--connect` on 127.0.0.1, and `--version`.

use serde::Deserialize;
use std::process::{Command, Output, Stdio};

const BENCH: &str = env!("CARGO_BIN_EXE_ballot-bench");

#[derive(Debug, Deserialize)]
struct Result {
    kind: String,
    fabric: String,
    topology: String,
    durability: String,
    payload: usize,
    clients: usize,
    duration_s: f64,
    commits: u64,
    throughput_ops_s: f64,
    mb_s: f64,
    min_us: f64,
    mean_us: f64,
    stdev_us: f64,
    p50_us: f64,
    p99_us: f64,
    p9999_us: f64,
    max_us: f64,
    run: Run,
}

#[derive(Debug, Deserialize)]
struct Run {
    tool: String,
    version: String,
    commit: String,
    host: String,
    start_time: String,
    argv: Vec<String>,
    options: serde_json::Value,
}

/// A short cluster run on MemFabric, JSON on stdout.
const SHORT: &[&str] = &[
    "--fabric",
    "mem",
    "--clients",
    "2",
    "--duration",
    "300ms",
    "--warmup",
    "100ms",
    "--json",
    "--quiet",
];

/// A port nothing listens on (just now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bench(args: &[&str]) -> Output {
    Command::new(BENCH).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout
}

/// Runs the bench with `args`; it must exit with `code` and say `want` on stderr.
fn fails(args: &[&str], code: i32, want: &str) {
    let out = bench(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err}");
}

fn parse(stdout: &str) -> Vec<Result> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn sane(r: &Result) {
    assert!(
        r.commits > 0 && r.duration_s > 0.0 && r.throughput_ops_s > 0.0,
        "{r:?}"
    );
    assert!(r.min_us > 0.0 && r.min_us <= r.p50_us, "{r:?}");
    assert!(
        r.p50_us <= r.p99_us && r.p99_us <= r.p9999_us && r.p9999_us <= r.max_us,
        "{r:?}"
    );
    assert!(
        r.mean_us >= r.min_us && r.mean_us <= r.max_us && r.stdev_us >= 0.0,
        "{r:?}"
    );
    let mb = r.throughput_ops_s * r.payload as f64 / 1e6;
    assert!((r.mb_s - mb).abs() <= 1e-6 * mb.max(1.0), "{r:?}");
}

#[test]
fn json_is_serde_with_run_metadata() {
    let out = bench(&[SHORT, &["--payload", "64,256"]].concat());
    let rs = parse(&ok(&out));
    assert_eq!(rs.len(), 2);
    for (r, payload) in rs.iter().zip([64, 256]) {
        sane(r);
        assert_eq!((r.kind.as_str(), r.fabric.as_str()), ("cluster", "mem"));
        assert_eq!(
            (r.topology.as_str(), r.durability.as_str()),
            ("threads", "volatile")
        );
        assert_eq!((r.payload, r.clients), (payload, 2));
        let m = &r.run;
        assert_eq!(m.tool, "ballot-bench");
        assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
        assert!(!m.commit.is_empty() && !m.host.is_empty(), "{m:?}");
        assert!(
            m.start_time.ends_with('Z') && m.start_time.len() == 20,
            "{m:?}"
        );
        assert!(m.argv.iter().any(|a| a == "--json"), "{m:?}");
        assert_eq!(m.options["subcommand"], "cluster");
        assert_eq!(m.options["run"]["fabric"], "mem");
        assert_eq!(
            m.options["run"]["load"]["measure"]["payloads"],
            serde_json::json!([64, 256])
        );
        assert_eq!(m.options["run"]["load"]["measure"]["duration"], 0.3);
    }
}

#[test]
fn durable_threads_run_is_labelled_and_leaves_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let durable = ["--durability", "durable", "--data-dir", data_dir];
    let out = bench(&[SHORT, &durable].concat());
    let rs = parse(&ok(&out));
    assert_eq!(rs.len(), 1);
    sane(&rs[0]);
    assert_eq!(rs[0].durability, "durable");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind in --data-dir: {left:?}");
}

#[test]
fn subcommands_take_only_their_own_options() {
    for args in [
        &["raw", "--replicas", "3"][..],
        &["raw", "--clients", "3"][..],
        &["raw", "--durability", "durable"][..],
        &["catchup", "--fabric", "mem"][..],
        &["catchup", "--sweep", "1,2"][..],
        &["--replicas", "3", "raw"][..],
        &["--endpoints", "127.0.0.1:1", "--topology", "processes"][..],
        &["raw", "--listen", "127.0.0.1:0"][..],
    ] {
        fails(args, 2, "error:");
    }
}

#[test]
fn idle_connections_need_the_processes_topology() {
    for args in [
        &["--idle-connections", "5"][..],
        &[
            "cluster",
            "--topology",
            "threads",
            "--idle-connections",
            "5",
        ][..],
        &["compare", "--idle-connections", "5"][..],
    ] {
        fails(args, 1, "--idle-connections is measured with");
    }
}

#[test]
fn endpoints_that_do_not_answer_are_a_clear_error() {
    let at = format!("127.0.0.1:{}", free_port());
    fails(
        &["--endpoints", &at, "--duration", "1", "--quiet"],
        1,
        "no endpoint answered",
    );
}

#[test]
fn raw_server_and_client_on_loopback() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Command::new(BENCH)
        .args(["raw", "--server", "--listen", &addr, "--fabric", "tcp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client retries until the server listens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let out = loop {
        let out = bench(&[
            "raw",
            "--connect",
            &addr,
            "--fabric",
            "tcp",
            "--payload",
            "64,1024",
            "--iterations",
            "500",
            "--warmup",
            "50ms",
            "--json",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("refused") || std::time::Instant::now() > deadline
        {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let rs = parse(&ok(&out));
    assert_eq!(rs.len(), 2);
    for (r, payload) in rs.iter().zip([64, 1024]) {
        sane(r);
        assert_eq!((r.kind.as_str(), r.topology.as_str()), ("raw", "two-host"));
        assert_eq!((r.payload, r.commits), (payload, 500));
    }
    let s = server.wait_with_output().unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
}

#[test]
fn version_names_the_commit() {
    let out = ok(&bench(&["--version"]));
    assert!(
        out.starts_with(&format!(
            "ballot-bench {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
}
