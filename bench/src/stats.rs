//! Results: latency histograms, the result record, tables and JSON.

use hdrhistogram::Histogram;

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

/// One measured configuration.
#[derive(Debug, Clone, Default)]
pub struct BenchResult {
    /// "cluster" or "raw".
    pub kind: &'static str,
    pub fabric: String,
    pub topology: &'static str,
    pub replicas: usize,
    pub payload: usize,
    pub clients: usize,
    pub outstanding: usize,
    pub pipeline: u64,
    pub batch_bytes: usize,
    /// `None`: closed loop.
    pub open_loop_rate: Option<f64>,
    pub durability: &'static str,
    pub duration_s: f64,
    pub commits: u64,
    pub errors: u64,
    pub throughput_ops_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub raw_p50_us: Option<f64>,
    pub ratio_p50: Option<f64>,
    /// Commands per entry, averaged over the run (leader's log growth), where known.
    pub commands_per_entry: Option<f64>,
    /// The latency distribution for plots: (nines, us) with nines = -log10(1 - quantile),
    /// from 0 (quantile 0) to the resolution of the sample count. Not in JSON.
    pub curve: Vec<(f64, f64)>,
}

impl BenchResult {
    pub fn fill_latency(&mut self, h: &Histogram<u64>) {
        self.p50_us = us(h, 0.5);
        self.p90_us = us(h, 0.9);
        self.p99_us = us(h, 0.99);
        self.p999_us = us(h, 0.999);
        self.max_us = if h.is_empty() {
            0.0
        } else {
            h.max() as f64 / 1000.0
        };
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

    pub fn to_json(&self) -> String {
        fn opt(v: Option<f64>) -> String {
            v.map_or("null".into(), |x| format!("{x:.3}"))
        }
        format!(
            concat!(
                "{{\"kind\":\"{}\",\"fabric\":\"{}\",\"topology\":\"{}\",\"replicas\":{},",
                "\"payload\":{},\"clients\":{},\"outstanding\":{},\"pipeline\":{},",
                "\"batch_bytes\":{},\"open_loop_rate\":{},\"durability\":\"{}\",",
                "\"duration_s\":{:.3},\"commits\":{},\"errors\":{},\"throughput_ops_s\":{:.1},",
                "\"p50_us\":{:.3},\"p90_us\":{:.3},\"p99_us\":{:.3},\"p999_us\":{:.3},",
                "\"max_us\":{:.3},\"raw_p50_us\":{},\"ratio_p50\":{},\"commands_per_entry\":{}}}"
            ),
            self.kind,
            self.fabric,
            self.topology,
            self.replicas,
            self.payload,
            self.clients,
            self.outstanding,
            self.pipeline,
            self.batch_bytes,
            opt(self.open_loop_rate),
            self.durability,
            self.duration_s,
            self.commits,
            self.errors,
            self.throughput_ops_s,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            opt(self.raw_p50_us),
            opt(self.ratio_p50),
            opt(self.commands_per_entry),
        )
    }
}

fn opt_cell(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// A human table of results (one row each).
pub fn table(results: &[BenchResult]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<7} {:<5} {:<9} {:>3} {:>7} {:>7} {:>6} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} {:>6}\n",
        "kind", "fabric", "topo", "n", "payload", "clients", "batch", "secs", "ops/s", "p50 us", "p90 us",
        "p99 us", "p99.9 us", "max us", "raw p50", "p50/raw", "cmd/e"
    ));
    for r in results {
        let clients = match r.open_loop_rate {
            Some(rate) => format!("@{}", si(rate)),
            None if r.kind == "raw" => "-".into(),
            None => format!("{}x{}", r.clients, r.outstanding),
        };
        s.push_str(&format!(
            "{:<7} {:<5} {:<9} {:>3} {:>7} {:>7} {:>6} {:>7.1} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>8} {:>8} {:>6}\n",
            r.kind,
            r.fabric,
            if r.kind == "raw" { "-" } else { r.topology },
            r.replicas,
            r.payload,
            clients,
            if r.kind == "raw" { "-".into() } else { r.batch_bytes.to_string() },
            r.duration_s,
            r.throughput_ops_s,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            opt_cell(r.raw_p50_us, 1),
            opt_cell(r.ratio_p50, 2),
            opt_cell(r.commands_per_entry, 1),
        ));
    }
    s
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
