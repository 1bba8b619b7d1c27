//! `ballot-bench catchup` end to end with a tiny state: it completes, the restarted replica
//! installs a checkpoint, and the report holds sane numbers. No performance is asserted.

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_ballot-bench");

/// The number after `"key":` (first occurrence at or after `from`).
fn num(json: &str, key: &str, from: usize) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json[from..]
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + from
        + pat.len();
    let end = json[at..].find([',', '}']).map_or(json.len(), |e| at + e);
    json[at..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

fn phase(json: &str, name: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"phase\":\"{name}\""))
        .unwrap_or_else(|| panic!("no phase {name} in {json}"));
    num(json, key, at)
}

fn run(extra: &[&str]) -> Vec<String> {
    let out = Command::new(BENCH)
        .args(["catchup", "--state-mib", "4", "--payload", "40"])
        .args(["--clients", "2", "--outstanding", "2"])
        .args([
            "--duration",
            "400ms",
            "--warmup",
            "200ms",
            "--phase-timeout",
            "60s",
        ])
        .args(["--json", "--quiet"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout.lines().map(str::to_string).collect()
}

fn check(j: &str) {
    assert!(j.starts_with("{\"kind\":\"catchup\""), "{j}");
    assert!(num(j, "installs", 0) >= 1.0, "{j}");
    assert_eq!(num(j, "checkpoint_failures", 0), 0.0, "{j}");
    // 4 MiB of 32-byte values plus the snapshot framing.
    let image = num(j, "image_bytes", 0);
    assert!(image > 4_000_000.0 && image < 4_400_000.0, "{j}");
    assert!(num(j, "bytes_served", 0) >= image, "{j}");
    assert!(
        num(j, "installed_index", 0) > num(j, "stop_applied", 0),
        "{j}"
    );
    assert!(
        num(j, "leader_base_at_restart", 0) > num(j, "stop_applied", 0),
        "{j}"
    );
    assert!(num(j, "transfer_mib_s", 0) > 0.0, "{j}");
    for p in ["A", "down", "rejoin", "B", "tail", "C"] {
        let secs = phase(j, p, "duration_s");
        assert!((0.0..60.0).contains(&secs), "{p}: {j}");
    }
    for p in ["A", "C"] {
        assert!(phase(j, p, "commits") > 0.0, "{p}: {j}");
        let (p50, p99) = (phase(j, p, "p50_us"), phase(j, p, "p99_us"));
        assert!(p50 > 0.0 && p50 <= p99, "{p}: {j}");
    }
    assert!(phase(j, "B", "bytes_served") > 0.0, "{j}");
}

#[test]
fn catchup_on_request_with_a_cap_completes_and_reports() {
    let lines = run(&[
        "--catchup-rate",
        "64",
        "--ckpt-every-mib",
        "0",
        "--serve-from",
        "leader",
    ]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let j = &lines[0];
    check(j);
    assert_eq!(num(j, "rate_mib_s", 0), 64.0);
    assert_eq!(num(j, "serve_bytes_per_tick", 0), 67108.0);
}

#[test]
fn catchup_with_periodic_checkpoints_completes_and_reports() {
    let lines = run(&["--catchup-rate", "unlimited", "--ckpt-every-mib", "1"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    check(&lines[0]);
    assert!(lines[0].contains("\"rate_mib_s\":null"));
}

#[test]
fn bad_arguments_are_clear_errors() {
    for (args, want) in [
        (&["--catchup-rate", "fast"][..], "bad --catchup-rate"),
        (
            &["--serve-from", "leader", "--ckpt-every-mib", "4"][..],
            "--ckpt-every-mib 0",
        ),
        (&["--payload", "8"][..], "at least 9"),
    ] {
        let out = Command::new(BENCH)
            .arg("catchup")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
