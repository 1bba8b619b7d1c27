//! The `ballot-sim` command line: the options scripts and docs use, its usage text, and
//! exit status 2 with a clear message on bad arguments.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ballot-sim"))
        .args(args)
        .output()
        .expect("run ballot-sim")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_usage() {
    let out = sim(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("ballot-sim {}", env!("CARGO_PKG_VERSION"))
    );
    let out = sim(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    // Every option that scripts/, docs/ and replay lines use.
    for opt in [
        "--seeds",
        "--first-seed",
        "--seed ",
        "--replicas",
        "--ticks",
        "--durability",
        "--no-faults",
        "--plant-bug",
        "--no-contracts",
        "--planted-report",
        "--first-only",
        "--must-catch",
        "--only",
        "--digest",
        "--verbose",
        "Examples:",
        "Exit status",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    for (args, says) in [
        (&["--replicas", "0"][..], "--replicas"),
        (&["--replicas", "17"], "--replicas"),
        (&["--seeds", "0"], "--seeds"),
        (&["--bogus"], "--bogus"),
        (&["--durability", "sometimes"], "volatile or durable"),
        (&["--plant-bug", "no-such-bug"], "short-quorum"),
        (&["--first-only"], "--planted-report"),
        (&["--seed", "3", "--seeds", "5"], "--seeds"),
    ] {
        let out = sim(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn plant_bug_list_lists_the_bugs() {
    let out = sim(&["--plant-bug", "list"]);
    assert!(out.status.success());
    let names: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(names.len(), ballot::protocol::PlantedBugs::ALL.len());
    assert!(names.iter().any(|n| n == "short-quorum"));
}

#[test]
fn one_seed_prints_its_summary() {
    let out = sim(&["--seed", "3", "--ticks", "300", "--no-faults"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("seeds=1 violations=0 commits="),
        "{stdout}"
    );
    // A single seed shows no progress.
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}
