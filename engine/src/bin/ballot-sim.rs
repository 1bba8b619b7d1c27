//! `ballot-sim`: runs the deterministic simulator over many seeds, or measures it with
//! planted bugs (`--planted-report`).
//!
//! Prints one line per failing seed with the command that replays it, then
//! `seeds=<n> violations=<v> commits=<c> ...`; exits 1 when any violation was found (in a
//! report: when a planted bug was not caught), 2 on bad arguments. A run of many seeds
//! shows its progress on stderr (in place on a terminal, every 30 s otherwise).

use ballot::protocol::{Durability, PlantedBugs};
use ballot::sim::{self, digest::Digest, planted, Options};
use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
Examples:
  ballot-sim --seeds 1000 --replicas 5                  sweep seeds 1..=1000
  ballot-sim --seeds 200 --durability durable           durable mode (simulated disks)
  ballot-sim --seed 258 --replicas 3 --ticks 1500       replay one seed (as a FAIL line prints it)
  ballot-sim --plant-bug list                           the bugs that can be planted
  ballot-sim --plant-bug short-quorum --no-contracts    does the simulator catch this bug?
  ballot-sim --planted-report --first-only --seeds 50   every planted bug, every configuration
  ballot-sim --digest --seeds 10                        digests that a pure refactoring keeps

Exit status: 0 no violation (every planted bug caught), 1 violations (a bug missed),
2 bad arguments.";

#[derive(Parser, Debug)]
#[command(
    name = "ballot-sim",
    version,
    about = "The deterministic simulator of Ballot: replicas, faults and checks, replayable by seed",
    after_help = EXAMPLES
)]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run this one seed (replay).
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// Replicas in the cluster (1 to 16).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    replicas: u64,
    /// Ticks of the faulty phase.
    #[arg(long, default_value_t = 1500)]
    ticks: u64,
    /// `volatile` (acknowledged in memory) or `durable` (on simulated disks that crash,
    /// tear and get lost).
    #[arg(long, default_value = "volatile", value_parser = parse_durability)]
    durability: Durability,
    /// No faults at all.
    #[arg(long)]
    no_faults: bool,
    /// Plant a bug (repeatable); `--plant-bug list` lists them.
    #[arg(long = "plant-bug", value_name = "BUG", value_parser = parse_bug_or_list)]
    plant_bug: Vec<String>,
    /// Switch off the core's contract assertions (only the simulator's checks remain).
    #[arg(long)]
    no_contracts: bool,
    /// Clients work in sessions: register one through the log, resend an operation of
    /// unknown outcome in it (the store deduplicates), get "expired" after the session's
    /// expiry (small limits: `ballot::sim::SIM_SESSION_LIMITS`).
    #[arg(long)]
    sessions: bool,
    /// With --sessions: plant a bug in the store, which then applies a retry whose result
    /// it holds (the checks must find a command applied twice).
    #[arg(long, requires = "sessions")]
    plant_session_bug: bool,

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
    #[arg(long, value_name = "BUGS", requires = "planted_report", value_delimiter = ',', value_parser = parse_bug_name)]
    must_catch: Vec<String>,
    /// With --planted-report: measure only these bugs (comma-separated; default all).
    #[arg(long, value_name = "BUGS", requires = "planted_report", value_delimiter = ',', value_parser = parse_bug_name)]
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
    match PlantedBugs::named(s) {
        Some(_) => Ok(s.to_string()),
        None => Err(format!("planted bugs: {}", bug_names().join(", "))),
    }
}

/// A bug name, or `list`.
fn parse_bug_or_list(s: &str) -> Result<String, String> {
    if s == "list" {
        return Ok(s.to_string());
    }
    parse_bug_name(s)
}

fn bug_names() -> Vec<&'static str> {
    PlantedBugs::ALL.iter().map(|(n, _)| *n).collect()
}

/// The progress of a run of many seeds, on stderr: rewritten in place on a terminal (at
/// most five times a second), one line every 30 s otherwise, so that CI logs stay short.
/// Nothing for a single seed.
struct Progress {
    total: u64,
    started: Instant,
    last: Instant,
    tty: bool,
    /// A line is on the terminal, to be cleared before anything else is printed.
    shown: bool,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            total: if quiet { 0 } else { total },
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn update(&mut self, done: u64, violations: u64) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(30)
        };
        if self.total < 2 || done >= self.total || self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / done.max(1) as f64 * (self.total - done) as f64;
        let line = format!(
            "{done}/{} seeds, {violations} violations, {elapsed:.0} s, ETA {eta:.0} s",
            self.total
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
            self.shown = true;
        } else {
            eprintln!("  {line}");
        }
    }

    /// Clears the line on a terminal, before stdout prints.
    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
            self.shown = false;
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.plant_bug.iter().any(|b| b == "list") {
        for name in bug_names() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
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
    for name in &a.plant_bug {
        (PlantedBugs::ALL
            .iter()
            .find(|(n, _)| *n == name.as_str())
            .unwrap()
            .1)(&mut bugs);
    }
    let o = Options {
        replicas: a.replicas as usize,
        ticks: a.ticks,
        durability: a.durability,
        faults: !a.no_faults,
        bugs,
        contracts: !a.no_contracts,
        sessions: a.sessions,
        session_bug: a.plant_session_bug,
        ..Options::new(first, 3)
    };
    if a.digest {
        digest(o, first, seeds);
        return ExitCode::SUCCESS;
    }
    let (mut violations, mut commits, mut ckpts, mut installs, mut losses, mut blank) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut registrations, mut retries, mut expired, mut dedups) = (0u64, 0u64, 0u64, 0u64);
    let mut progress = Progress::new(seeds, a.verbose);
    for seed in first..first + seeds {
        let opts = Options { seed, ..o };
        let r = sim::run(opts);
        commits += r.commits;
        ckpts += r.checkpoints;
        installs += r.installs;
        losses += r.disk_losses;
        blank += r.blank_boots;
        registrations += r.registrations;
        retries += r.retries;
        expired += r.expired;
        dedups += r.dedups;
        if a.verbose {
            println!(
                "seed={seed} commits={} acked={} crashes={} elections={} checkpoints={} installs={} violations={}",
                r.commits, r.acked, r.crashes, r.elections, r.checkpoints, r.installs,
                r.violations.len()
            );
        }
        if !r.violations.is_empty() {
            violations += r.violations.len() as u64;
            progress.clear();
            println!(
                "FAIL seed={seed}: {} | replay: {}",
                r.violations[0],
                opts.replay_command()
            );
            for v in &r.violations[1..] {
                println!("    {v}");
            }
        }
        progress.update(seed - first + 1, violations);
    }
    progress.clear();
    println!(
        "seeds={seeds} violations={violations} commits={commits} checkpoints={ckpts} installs={installs} disk_losses={losses} blank_boots={blank}"
    );
    if a.sessions {
        println!(
            "sessions: registrations={registrations} retries={retries} expired={expired} dedups={dedups}"
        );
    }
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--digest`: one line per configuration, then the combined digest.
fn digest(o: Options, first: u64, seeds: u64) {
    let mut all = Digest::default();
    let mut progress = Progress::new(4 * seeds, false);
    let (mut done, mut total_violations) = (0, 0);
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
            done += 1;
            total_violations += r.violations.len() as u64;
            progress.update(done, total_violations);
        }
        all.word(u64::from(d.value()));
        progress.clear();
        println!(
            "digest replicas={replicas} durability={durability:?} seeds={first}..={} violations={violations}: {:08x}",
            first + seeds - 1,
            d.value()
        );
    }
    println!("digest combined: {:08x}", all.value());
}
