//! Results: latency histograms, the result record, tables and JSON.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::{Duration, Instant};

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One measured configuration. Serialized as one JSON object per result (`--json`), with
/// the run's metadata next to it (`report::Line`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchResult {
    /// "cluster" or "raw".
    pub kind: &'static str,
    pub fabric: String,
    /// "threads", "processes", "external" (`--endpoints`), or "two-host" (raw client).
    pub topology: &'static str,
    pub replicas: usize,
    pub payload: usize,
    pub clients: usize,
    pub outstanding: usize,
    pub pipeline: u64,
    pub batch_bytes: usize,
    /// `None`: closed loop.
    pub open_loop_rate: Option<f64>,
    /// "volatile", "durable", or "unknown" (an external cluster, `--durability` not given).
    pub durability: &'static str,
    pub duration_s: f64,
    pub commits: u64,
    pub errors: u64,
    pub throughput_ops_s: f64,
    /// Payload bytes per second (commands x `payload`), in MB/s (10^6).
    pub mb_s: f64,
    pub min_us: f64,
    pub mean_us: f64,
    pub stdev_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
    pub raw_p50_us: Option<f64>,
    pub ratio_p50: Option<f64>,
    /// Commands per entry, averaged over the run (leader's log growth), where known.
    pub commands_per_entry: Option<f64>,
    /// Idle client connections held open on the leader during this run
    /// (`--idle-connections`; 0: none).
    #[serde(skip_serializing_if = "is_zero")]
    pub idle_connections: usize,
    /// Cut short by Ctrl-C: the window is shorter than asked.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// The latency distribution for plots: (nines, us) with nines = -log10(1 - quantile),
    /// from 0 (quantile 0) to the resolution of the sample count. Not in JSON.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl BenchResult {
    /// Latency figures from `h` (ns), and MB/s from the throughput.
    pub fn fill_latency(&mut self, h: &Histogram<u64>) {
        self.mb_s = self.throughput_ops_s * self.payload as f64 / 1e6;
        self.p50_us = us(h, 0.5);
        self.p90_us = us(h, 0.9);
        self.p99_us = us(h, 0.99);
        self.p999_us = us(h, 0.999);
        self.p9999_us = us(h, 0.9999);
        let (min, max, mean, stdev) = if h.is_empty() {
            (0, 0, 0.0, 0.0)
        } else {
            (h.min(), h.max(), h.mean(), h.stdev())
        };
        self.min_us = min as f64 / 1000.0;
        self.max_us = max as f64 / 1000.0;
        self.mean_us = mean / 1000.0;
        self.stdev_us = stdev / 1000.0;
        self.curve.clear();
        if !h.is_empty() {
            // Up to 1 - 1/count (beyond that the curve is one sample), at most 5 nines.
            let top = (h.len() as f64).log10().min(5.0);
            let mut x = 0.0f64;
            while x <= top + 1e-9 {
                let q = 1.0 - 10f64.powf(-x);
                self.curve.push((x, us(h, q)));
                x += 0.05;
            }
        }
    }
}

fn opt_cell(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// A human table of results (one row each).
pub fn table(results: &[BenchResult]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<7} {:<6} {:<9} {:<8} {:>3} {:>7} {:>7} {:>6} {:>6} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} {:>5}\n",
        "kind", "fabric", "topo", "dur", "n", "payload", "clients", "batch", "secs", "ops/s", "MB/s",
        "min us", "mean us", "stdev", "p50 us", "p99 us", "p99.9", "p99.99", "max us", "raw p50",
        "p50/raw", "cmd/e", ""
    ));
    for r in results {
        let clients = match r.open_loop_rate {
            Some(rate) => format!("@{}", si(rate)),
            None if r.kind == "raw" => "-".into(),
            None => format!("{}x{}", r.clients, r.outstanding),
        };
        let clients = match r.idle_connections {
            0 => clients,
            n => format!("{clients} +{n} idle"),
        };
        s.push_str(&format!(
            "{:<7} {:<6} {:<9} {:<8} {:>3} {:>7} {:>7} {:>6} {:>6.1} {:>11.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9} {:>8} {:>7} {:>5}\n",
            r.kind,
            r.fabric,
            if r.kind == "raw" && r.topology == "threads" { "-" } else { r.topology },
            if r.kind == "raw" { "-" } else { r.durability },
            r.replicas,
            r.payload,
            clients,
            if r.kind == "raw" { "-".into() } else { r.batch_bytes.to_string() },
            r.duration_s,
            r.throughput_ops_s,
            r.mb_s,
            r.min_us,
            r.mean_us,
            r.stdev_us,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.p9999_us,
            r.max_us,
            opt_cell(r.raw_p50_us, 1),
            opt_cell(r.ratio_p50, 2),
            opt_cell(r.commands_per_entry, 1),
            if r.partial { "part" } else { "" },
        ));
    }
    s
}

/// When to print a progress line: once a second, at every change of phase (the interval
/// is labelled with the phase it was spent in, never the next one's), and at the end.
pub struct Ticker {
    report: bool,
    t0: Instant,
    from: Instant,
    next: Instant,
    label: &'static str,
}

/// One interval to report: its phase and its span (seconds since the start).
pub struct Tick {
    pub label: &'static str,
    pub from_s: f64,
    pub to_s: f64,
    pub secs: f64,
}

impl Tick {
    /// `  1.0-2.0s  measure` (the common start of every progress line).
    pub fn head(&self) -> String {
        let span = format!("{:.1}-{:.1}s", self.from_s, self.to_s);
        format!("  {span:>11} {:<8}", self.label)
    }
}

impl Ticker {
    /// `report`: false for `--quiet` (never due); `label`: the first phase.
    pub fn new(report: bool, t0: Instant, label: &'static str) -> Ticker {
        Ticker {
            report,
            t0,
            from: t0,
            next: t0 + Duration::from_secs(1),
            label,
        }
    }

    /// The interval that ends at `now`, if a line is due: a second has passed, or the phase
    /// is now `label` instead of the interval's. The next interval starts at `now`.
    pub fn due(&mut self, now: Instant, label: &'static str) -> Option<Tick> {
        if !self.report || (now < self.next && label == self.label) {
            return None;
        }
        let t = self.close(now);
        self.label = label;
        t
    }

    /// The last interval (from the last line to `now`), if it is not empty.
    pub fn finish(&mut self, now: Instant) -> Option<Tick> {
        if !self.report {
            return None;
        }
        self.close(now)
    }

    fn close(&mut self, now: Instant) -> Option<Tick> {
        let secs = now.saturating_duration_since(self.from).as_secs_f64();
        let t = (secs >= 0.001).then(|| Tick {
            label: self.label,
            from_s: self.from.duration_since(self.t0).as_secs_f64(),
            to_s: now.saturating_duration_since(self.t0).as_secs_f64(),
            secs,
        });
        self.from = now;
        self.next = now + Duration::from_secs(1);
        t
    }
}

pub fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}K", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticker_labels_each_interval_with_its_own_phase_and_reports_the_last() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Ticker::new(true, t0, "warm-up");
        assert!(t.due(at(500), "warm-up").is_none());
        let a = t.due(at(1000), "warm-up").unwrap();
        assert_eq!((a.label, a.from_s, a.to_s), ("warm-up", 0.0, 1.0));
        // The warm-up ends at 1.5 s: the interval 1.0-1.5 is warm-up, not measure.
        let b = t.due(at(1500), "measure").unwrap();
        assert_eq!((b.label, b.from_s, b.to_s), ("warm-up", 1.0, 1.5));
        assert!(t.due(at(2000), "measure").is_none());
        let c = t.due(at(2500), "measure").unwrap();
        assert_eq!((c.label, c.from_s), ("measure", 1.5));
        let d = t.finish(at(2900)).unwrap();
        assert_eq!((d.label, d.from_s, d.to_s), ("measure", 2.5, 2.9));
        assert!(Ticker::new(false, t0, "x").finish(at(5000)).is_none());
    }

    #[test]
    fn fill_latency_has_min_mean_stdev_and_mb_s() {
        let mut h = histogram();
        for v in [1000u64, 2000, 3000] {
            h.record(v).unwrap();
        }
        let mut r = BenchResult {
            payload: 100,
            throughput_ops_s: 10_000.0,
            ..Default::default()
        };
        r.fill_latency(&h);
        assert_eq!(r.min_us, 1.0);
        assert!((r.mean_us - 2.0).abs() < 0.01, "{}", r.mean_us);
        assert!(r.stdev_us > 0.8 && r.stdev_us < 0.83, "{}", r.stdev_us);
        assert_eq!(r.mb_s, 1.0);
        assert!(r.p9999_us >= r.p999_us && r.max_us >= r.p9999_us);
    }
}
