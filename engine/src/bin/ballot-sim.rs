//! `ballot-sim`: runs the deterministic simulator over many seeds, or measures it with
//! planted bugs (`--planted-report`).
//!
//! Prints one line per failing seed with the command that replays it, then
//! `seeds=<n> violations=<v> commits=<c> ...`; exits 1 when any violation was found (in a
//! report: when a planted bug was not caught).

use ballot::protocol::{Durability, PlantedBugs};
use ballot::sim::{self, digest::Digest, planted, Options};
use clap::Parser;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ballot-sim",
    version,
    about = "The deterministic simulator of Ballot"
)]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run this one seed (replay).
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// Replicas in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    replicas: u64,
    /// Ticks of the faulty phase.
    #[arg(long, default_value_t = 1500)]
    ticks: u64,
    /// volatile or durable.
    #[arg(long, default_value = "volatile", value_parser = parse_durability)]
    durability: Durability,
    /// No faults at all.
    #[arg(long)]
    no_faults: bool,
    /// Plant a bug (repeatable); `--plant-bug list` lists them.
    #[arg(long = "plant-bug", value_parser = parse_bug)]
    plant_bug: Vec<PlantedBugs>,
    /// Switch off the core's contract assertions (only the simulator's checks remain).
    #[arg(long)]
    no_contracts: bool,

    /// For every planted bug and configuration (3 and 5 replicas, volatile and durable),
    /// run the first `--seeds` seeds with contracts off and report the first failing
    /// seed and the share of failing seeds.
    #[arg(long)]
    planted_report: bool,
    /// With --planted-report: stop each row at its first failing seed (no share).
    #[arg(long, requires = "planted_report")]
    first_only: bool,
    /// With --planted-report: fail only if one of these bugs (comma-separated) is missed
    /// in some configuration; without it, any miss fails.
    #[arg(long, requires = "planted_report", value_delimiter = ',', value_parser = parse_bug_name)]
    must_catch: Vec<String>,
    /// With --planted-report: measure only these bugs (comma-separated; default all).
    #[arg(long, requires = "planted_report", value_delimiter = ',', value_parser = parse_bug_name)]
    only: Vec<String>,
    /// Print a stable digest of the runs (report totals and histories) of the seeds, for
    /// 3 and 5 replicas, volatile and durable, and a combined one: a refactoring that
    /// changes no behaviour leaves them unchanged. Honours --plant-bug and --no-contracts.
    #[arg(long, conflicts_with = "planted_report")]
    digest: bool,
    /// One line per seed.
    #[arg(long)]
    verbose: bool,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "volatile" => Ok(Durability::Volatile),
        "durable" => Ok(Durability::Durable),
        _ => Err("volatile or durable".into()),
    }
}

fn parse_bug_name(s: &str) -> Result<String, String> {
    parse_bug(s).map(|_| s.to_string())
}

fn parse_bug(s: &str) -> Result<PlantedBugs, String> {
    PlantedBugs::named(s).ok_or_else(|| {
        let names: Vec<_> = PlantedBugs::ALL.iter().map(|(n, _)| *n).collect();
        format!("planted bugs: {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    // Contract failures are reported per seed; keep the default panic output out of the way.
    std::panic::set_hook(Box::new(|_| {}));
    if a.planted_report {
        let rows = planted::report(a.seeds, a.ticks, a.first_only, &a.only, |line| {
            println!("{line}")
        });
        let missed = rows.iter().filter(|r| r.missed()).count();
        let na = rows.iter().filter(|r| r.not_applicable).count();
        println!(
            "planted bugs: {} rows, {} caught, {missed} missed, {na} not applicable",
            rows.len(),
            rows.len() - missed - na
        );
        let gate: Vec<_> = rows
            .iter()
            .filter(|r| r.missed())
            .filter(|r| a.must_catch.is_empty() || a.must_catch.iter().any(|b| b == r.bug))
            .collect();
        for r in &gate {
            println!(
                "MISSED {} with {} replicas, {:?}",
                r.bug, r.replicas, r.durability
            );
        }
        return if !gate.is_empty() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let (first, seeds) = a.seed.map_or((a.first_seed, a.seeds), |s| (s, 1));
    let mut bugs = PlantedBugs::default();
    for b in &a.plant_bug {
        for name in b.names() {
            (PlantedBugs::ALL.iter().find(|(n, _)| *n == name).unwrap().1)(&mut bugs);
        }
    }
    let o = Options {
        replicas: a.replicas as usize,
        ticks: a.ticks,
        durability: a.durability,
        faults: !a.no_faults,
        bugs,
        contracts: !a.no_contracts,
        ..Options::new(first, 3)
    };
    if a.digest {
        digest(o, first, seeds);
        return ExitCode::SUCCESS;
    }
    let (mut violations, mut commits, mut ckpts, mut installs, mut losses, mut blank) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    for seed in first..first + seeds {
        let opts = Options { seed, ..o };
        let r = sim::run(opts);
        commits += r.commits;
        ckpts += r.checkpoints;
        installs += r.installs;
        losses += r.disk_losses;
        blank += r.blank_boots;
        if a.verbose {
            println!(
                "seed={seed} commits={} acked={} crashes={} elections={} checkpoints={} installs={} violations={}",
                r.commits, r.acked, r.crashes, r.elections, r.checkpoints, r.installs,
                r.violations.len()
            );
        } else if (seed - first + 1) % 100 == 0 && seeds > 100 {
            eprintln!(
                "  {}/{seeds} seeds, {violations} violations, {:.0} s",
                seed - first + 1,
                started.elapsed().as_secs_f64()
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
        "seeds={seeds} violations={violations} commits={commits} checkpoints={ckpts} installs={installs} disk_losses={losses} blank_boots={blank}"
    );
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--digest`: one line per configuration, then the combined digest.
fn digest(o: Options, first: u64, seeds: u64) {
    let mut all = Digest::default();
    for (replicas, durability) in [
        (3, Durability::Volatile),
        (5, Durability::Volatile),
        (3, Durability::Durable),
        (5, Durability::Durable),
    ] {
        let mut d = Digest::default();
        let mut violations = 0;
        for seed in first..first + seeds {
            let r = sim::run(Options {
                seed,
                replicas,
                durability,
                ..o
            });
            violations += r.violations.len();
            d.report(&r);
        }
        all.word(u64::from(d.value()));
        println!(
            "digest replicas={replicas} durability={durability:?} seeds={first}..={} violations={violations}: {:08x}",
            first + seeds - 1,
            d.value()
        );
    }
    println!("digest combined: {:08x}", all.value());
}
