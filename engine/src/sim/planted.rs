//! Planted bugs as the measure of the simulator: every rule the protocol rests on has a
//! planted bug ([`PlantedBugs::ALL`]), and the simulator's own end-to-end checks (with the
//! core's contract assertions off) must catch each one within the first seeds of every
//! configuration where it applies.

use super::{run, Options};
use crate::protocol::{Durability, PlantedBugs};

/// One planted bug in one configuration.
#[derive(Debug, Clone)]
pub struct Row {
    /// The bug's name ([`PlantedBugs::ALL`]).
    pub bug: &'static str,
    /// Replicas in the cluster.
    pub replicas: usize,
    /// Volatile or durable.
    pub durability: Durability,
    /// Seeds run.
    pub seeds: u64,
    /// The first seed whose run the simulator's checks failed, if any.
    pub first: Option<u64>,
    /// Seeds whose run failed the simulator's checks.
    pub failed: u64,
    /// Seeds that only panicked (the code crashed; not counted as caught).
    pub panicked: u64,
    /// The first violation seen, or why the row does not apply.
    pub example: String,
    /// The bug cannot lose a value in this configuration ([`not_applicable`]).
    pub not_applicable: bool,
}

impl Row {
    /// Applies and was not caught.
    pub fn missed(&self) -> bool {
        self.first.is_none() && !self.not_applicable
    }
}

/// The configurations every bug is measured in.
pub const CONFIGS: [(usize, Durability); 4] = [
    (3, Durability::Volatile),
    (5, Durability::Volatile),
    (3, Durability::Durable),
    (5, Durability::Durable),
];

/// Why `bug` cannot lose a value in this configuration, if it cannot: such rows are
/// reported "n/a" and neither count as caught nor as missed.
pub fn not_applicable(bug: &str, replicas: usize, durability: Durability) -> Option<&'static str> {
    match (bug, durability) {
        // A durable leader counts a follower's persisted report, which the follower sends
        // only for entries its reader consumed: an entry left unread in the ring (by a
        // fence without its drain, or on an abandoned stream) is never counted.
        ("fence-no-drain" | "restart-stale-stream", Durability::Durable) => {
            Some("durable acknowledgements count only entries the reader consumed")
        }
        // With 3 replicas a rebuild needs the answers of both others: the leader's is
        // always among them.
        ("recovery-no-leader-wait" | "recovery-answers-unestablished", _) if replicas < 5 => {
            Some("with 3 replicas every rebuild waits for both others, the leader included")
        }
        ("restore-forgets-blank", Durability::Volatile) => {
            Some("only a durable replica is restored from its disk")
        }
        _ => None,
    }
}

/// Whether a violation comes from the simulator's checks (not from a panic of the code).
fn from_checks(v: &str) -> bool {
    !v.starts_with("contract:")
}

/// Runs seeds `1..=seeds` of `bug` in one configuration (`first_only`: stop at the first
/// seed that catches it).
pub fn measure(
    bug: &'static str,
    replicas: usize,
    durability: Durability,
    seeds: u64,
    ticks: u64,
    first_only: bool,
) -> Row {
    let bugs = PlantedBugs::named(bug).expect("a planted bug");
    let mut row = Row {
        bug,
        replicas,
        durability,
        seeds,
        first: None,
        failed: 0,
        panicked: 0,
        example: String::new(),
        not_applicable: false,
    };
    if let Some(why) = not_applicable(bug, replicas, durability) {
        row.not_applicable = true;
        row.seeds = 0;
        row.example = why.to_string();
        return row;
    }
    for seed in 1..=seeds {
        if first_only && row.first.is_some() {
            row.seeds = seed - 1;
            break;
        }
        let r = run(Options {
            durability,
            bugs,
            ticks,
            contracts: false,
            ..Options::new(seed, replicas)
        });
        match r.violations.iter().find(|v| from_checks(v)) {
            Some(v) => {
                row.failed += 1;
                if row.first.is_none() {
                    row.first = Some(seed);
                    row.example = v.clone();
                }
            }
            None if !r.violations.is_empty() => row.panicked += 1,
            None => {}
        }
    }
    row
}

/// Measures every planted bug in every configuration (two threads), printing a line per
/// row through `print` as rows complete, in order.
pub fn report(
    seeds: u64,
    ticks: u64,
    first_only: bool,
    only: &[String],
    mut print: impl FnMut(String) + Send,
) -> Vec<Row> {
    let jobs: Vec<(&'static str, usize, Durability)> = PlantedBugs::ALL
        .iter()
        .filter(|(bug, _)| only.is_empty() || only.iter().any(|b| b == bug))
        .flat_map(|(bug, _)| CONFIGS.iter().map(move |&(n, d)| (*bug, n, d)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let rows = std::sync::Mutex::new(vec![None; jobs.len()]);
    let printed = std::sync::Mutex::new(0usize);
    print(format!(
        "{:<32} {:>8} {:>10} {:>11} {:>8}  first violation",
        "planted bug", "config", "first seed", "failing", "panics"
    ));
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    let print = std::sync::Mutex::new(&mut print);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(bug, n, d)) = jobs.get(k) else {
                    return;
                };
                let row = measure(bug, n, d, seeds, ticks, first_only);
                let mut rows = rows.lock().unwrap();
                rows[k] = Some(row);
                // Print every finished row in order.
                let mut p = printed.lock().unwrap();
                while let Some(Some(r)) = rows.get(*p) {
                    (print.lock().unwrap())(line(r));
                    *p += 1;
                }
            });
        }
    });
    rows.into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

fn line(r: &Row) -> String {
    let config = format!(
        "{}{}",
        r.replicas,
        match r.durability {
            Durability::Volatile => "v",
            Durability::Durable => "d",
        }
    );
    let first = match r.first {
        Some(s) => s.to_string(),
        None if r.not_applicable => "n/a".to_string(),
        None => "MISSED".to_string(),
    };
    let mut ex = r.example.clone();
    ex.truncate(90);
    format!(
        "{:<32} {:>8} {:>10} {:>7}/{:<3} {:>8}  {ex}",
        r.bug, config, first, r.failed, r.seeds, r.panicked
    )
}
