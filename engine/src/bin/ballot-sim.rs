//! `ballot-sim`: runs the deterministic simulator over many seeds.
//!
//! ```text
//! ballot-sim [--seeds N] [--first-seed S] [--seed S] [--replicas R] [--ticks T]
//!            [--durability volatile|durable] [--no-faults] [--plant-bug ignore-promise|short-quorum|checkpoint-off-by-one]
//! ```
//! Prints one line per failing seed with the command that replays it, then
//! `seeds=<n> violations=<v> commits=<c>`; exits 1 when any violation was found.

use ballot::protocol::Durability;
use ballot::sim::{self, Options};
use std::process::ExitCode;

fn usage(msg: &str) -> ExitCode {
    eprintln!("ballot-sim: {msg}");
    eprintln!("usage: ballot-sim [--seeds N] [--first-seed S] [--seed S] [--replicas R] [--ticks T] [--durability volatile|durable] [--no-faults] [--plant-bug ignore-promise|short-quorum|checkpoint-off-by-one] [--verbose]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut seeds = 100u64;
    let mut first = 1u64;
    let mut o = Options::new(1, 3);
    let mut verbose = false;
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> Result<u64, ExitCode> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| usage(&format!("{name} needs a number")))
        };
        match a.as_str() {
            "--seeds" => match val("--seeds") {
                Ok(v) => seeds = v,
                Err(e) => return e,
            },
            "--first-seed" => match val("--first-seed") {
                Ok(v) => first = v,
                Err(e) => return e,
            },
            "--seed" => match val("--seed") {
                Ok(v) => {
                    first = v;
                    seeds = 1
                }
                Err(e) => return e,
            },
            "--replicas" => match val("--replicas") {
                Ok(v) if (1..=16).contains(&v) => o.replicas = v as usize,
                Ok(_) => return usage("--replicas must be 1..=16"),
                Err(e) => return e,
            },
            "--ticks" => match val("--ticks") {
                Ok(v) => o.ticks = v,
                Err(e) => return e,
            },
            "--durability" => match args.next().as_deref() {
                Some("volatile") => o.durability = Durability::Volatile,
                Some("durable") => o.durability = Durability::Durable,
                _ => return usage("--durability is volatile or durable"),
            },
            "--no-faults" => o.faults = false,
            "--plant-bug" => match args.next().as_deref() {
                Some("ignore-promise") => o.bugs.ignore_promise = true,
                Some("short-quorum") => o.bugs.short_quorum = true,
                Some("checkpoint-off-by-one") => o.bugs.checkpoint_off_by_one = true,
                _ => return usage("--plant-bug is ignore-promise or short-quorum"),
            },
            "--verbose" => verbose = true,
            "-h" | "--help" => {
                usage("help");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    // Contract failures are reported per seed; keep the default panic output out of the way.
    std::panic::set_hook(Box::new(|_| {}));
    let (mut violations, mut commits, mut ckpts, mut installs, mut losses) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in first..first + seeds {
        let opts = Options { seed, ..o };
        let r = sim::run(opts);
        commits += r.commits;
        ckpts += r.checkpoints;
        installs += r.installs;
        losses += r.disk_losses;
        if verbose {
            println!(
                "seed={seed} commits={} acked={} crashes={} elections={} checkpoints={} installs={} violations={}",
                r.commits,
                r.acked,
                r.crashes,
                r.elections,
                r.checkpoints,
                r.installs,
                r.violations.len()
            );
        }
        if !r.violations.is_empty() {
            violations += r.violations.len() as u64;
            println!(
                "FAIL seed={seed}: {} | replay: {}",
                r.violations[0],
                opts.replay_command()
            );
            for v in &r.violations[1..] {
                println!("    {v}");
            }
        }
    }
    println!(
        "seeds={seeds} violations={violations} commits={commits} checkpoints={ckpts} installs={installs} disk_losses={losses}"
    );
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
