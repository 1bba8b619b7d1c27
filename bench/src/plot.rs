//! `--plot FILE.svg`: a hand-written SVG with two panels (no plotting dependency).
//!
//! - Left: throughput against latency (both log scales), one line per fabric/topology through the runs of a
//!   sweep (`--sweep`), p50 solid with filled dots and p99 dashed with open dots, each dot
//!   labelled with its load (clients x outstanding, or the open-loop rate).
//! - Right: the latency distribution (percentile curve from the HDR histogram) of each
//!   fabric/topology at the load that gave it the highest throughput, with the raw fabric
//!   round trip dashed when it was measured.

use crate::stats::{si, BenchResult};
use std::fmt::Write;

const W: f64 = 1170.0;
const H: f64 = 600.0;
const PW: f64 = 440.0; // panel plot-area width
const PH: f64 = 330.0; // panel plot-area height
const TOP: f64 = 110.0;

fn color(fabric: &str, topology: &str) -> &'static str {
    match (fabric, topology) {
        ("rdma", _) => "#d62728",
        ("tcp", "processes") => "#ff7f0e",
        ("tcp", _) => "#1f77b4",
        ("mem", _) => "#2ca02c",
        _ => "#7f7f7f",
    }
}

/// What one line of the plot is a series of.
#[derive(Clone, PartialEq)]
struct Key {
    fabric: String,
    topology: &'static str,
    durability: &'static str,
    payload: usize,
}

impl Key {
    fn of(r: &BenchResult) -> Key {
        Key {
            fabric: r.fabric.clone(),
            topology: r.topology,
            durability: r.durability,
            payload: r.payload,
        }
    }

    /// `tcp threads durable` (and `, 256 B` when the plot has several sizes).
    fn name(&self, sizes: bool) -> String {
        let mut s = format!("{} {} {}", self.fabric, self.topology, self.durability);
        if sizes {
            s.push_str(&format!(", {} B", self.payload));
        }
        s
    }

    fn color(&self) -> &'static str {
        color(&self.fabric, self.topology)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{} ms", v / 1e3)
    } else {
        format!("{v} us")
    }
}

fn load_label(r: &BenchResult) -> String {
    match r.open_loop_rate {
        Some(rate) => format!("@{}", si(rate)),
        None if r.outstanding > 1 => format!("{}x{}", r.clients, r.outstanding),
        None => r.clients.to_string(),
    }
}

fn load_of(r: &BenchResult) -> f64 {
    r.open_loop_rate
        .unwrap_or((r.clients * r.outstanding.max(1)) as f64)
}

/// A log-scaled latency axis over whole decades covering [lo, hi] (microseconds).
struct LogAxis {
    lo: f64,
    hi: f64,
}
impl LogAxis {
    fn new(vals: impl Iterator<Item = f64>) -> LogAxis {
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for v in vals.filter(|v| *v > 0.0 && v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            (lo, hi) = (1.0, 1000.0);
        }
        let lo = 10f64.powf(lo.log10().floor()).max(0.01);
        let mut hi = 10f64.powf(hi.log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
        LogAxis { lo, hi }
    }
    /// 0 at the bottom, 1 at the top.
    fn frac(&self, v: f64) -> f64 {
        let v = v.max(self.lo);
        (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
    }
    fn decades(&self) -> Vec<f64> {
        let mut v = Vec::new();
        let mut d = self.lo;
        while d <= self.hi * 1.0001 {
            v.push(d);
            d *= 10.0;
        }
        v
    }
}

struct Panel {
    x0: f64,
}
impl Panel {
    fn px(&self, fx: f64) -> f64 {
        self.x0 + fx * PW
    }
    fn py(&self, fy: f64) -> f64 {
        TOP + PH - fy * PH
    }
}

fn y_axis(s: &mut String, p: &Panel, ax: &LogAxis) {
    for d in ax.decades() {
        let y = p.py(ax.frac(d));
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="12">{}</text>"##,
            p.px(0.0),
            p.px(1.0),
            p.px(0.0) - 6.0,
            y + 4.0,
            fmt_us(d)
        );
        for m in [2.0, 5.0] {
            let v = d * m;
            if v < ax.hi {
                let y = p.py(ax.frac(v));
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#f0f0f0"/>"##,
                    p.px(0.0),
                    p.px(1.0)
                );
            }
        }
    }
}

fn frame(s: &mut String, p: &Panel, title: &str, xlabel: &str, ylabel: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{TOP}" width="{PW}" height="{PH}" fill="none" stroke="#444"/>"##,
        p.px(0.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"##,
        p.px(0.5),
        TOP - 40.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"##,
        p.px(0.5),
        TOP + PH + 38.0,
        esc(xlabel)
    );
    let (x, y) = (p.px(0.0) - 55.0, TOP + PH / 2.0);
    let _ = writeln!(
        s,
        r##"<text x="{x:.1}" y="{y:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 {x:.1} {y:.1})">{}</text>"##,
        esc(ylabel)
    );
}

fn legend(s: &mut String, p: &Panel, items: &[(String, &str, bool)]) {
    for (i, (label, col, dashed)) in items.iter().enumerate() {
        let y = TOP + PH + 58.0 + 16.0 * i as f64;
        let x = p.px(0.0);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{col}" stroke-width="2.5"{}/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"##,
            y - 4.0,
            x + 28.0,
            y - 4.0,
            if *dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            },
            x + 34.0,
            y,
            esc(label)
        );
    }
}

fn polyline(s: &mut String, pts: &[(f64, f64)], col: &str, dashed: bool) {
    if pts.is_empty() {
        return;
    }
    let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"{}/>"##,
        d.join(" "),
        if dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        }
    );
}

/// The SVG for `results` (cluster and raw runs); `subtitle` names the machine and options.
pub fn svg(results: &[BenchResult], subtitle: &str) -> String {
    // Cluster series by (fabric, topology, durability, payload), in the order first seen;
    // named by what tells them apart.
    let payloads = results
        .iter()
        .filter(|r| r.kind == "cluster")
        .map(|r| r.payload);
    let sizes = payloads.clone().min() != payloads.max();
    let mut keys: Vec<Key> = Vec::new();
    for r in results.iter().filter(|r| r.kind == "cluster") {
        let k = Key::of(r);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let series: Vec<(Key, Vec<&BenchResult>)> = keys
        .into_iter()
        .map(|k| {
            let mut v: Vec<&BenchResult> = results
                .iter()
                .filter(|r| r.kind == "cluster" && Key::of(r) == k)
                .collect();
            v.sort_by(|a, b| load_of(a).total_cmp(&load_of(b)));
            (k, v)
        })
        .collect();
    let raws: Vec<&BenchResult> = results.iter().filter(|r| r.kind == "raw").collect();

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="24" text-anchor="middle" font-size="13" fill="#333">{}</text>"##,
        W / 2.0,
        esc(subtitle)
    );

    // Left panel: throughput vs latency.
    let left = Panel { x0: 90.0 };
    let ax = LogAxis::new(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().flat_map(|r| [r.p50_us, r.p99_us])),
    );
    // Throughput spans decades (one client on TCP to many on mem): log scale too.
    let xax = LogAxis::new(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|r| r.throughput_ops_s)),
    );
    frame(
        &mut s,
        &left,
        "Throughput vs latency",
        "throughput (commands/s, log)",
        "commit latency (log)",
    );
    y_axis(&mut s, &left, &ax);
    for d in xax.decades() {
        let x = left.px(xax.frac(d));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"##,
            TOP + PH,
            TOP + PH + 18.0,
            si(d)
        );
        for m in [2.0, 5.0] {
            if d * m < xax.hi {
                let x = left.px(xax.frac(d * m));
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
                    TOP + PH
                );
            }
        }
    }
    let mut items = Vec::new();
    for (k, runs) in &series {
        let col = k.color();
        for (q, dashed) in [(0.5, false), (0.99, true)] {
            let pts: Vec<(f64, f64)> = runs
                .iter()
                .map(|r| {
                    let v = if q == 0.5 { r.p50_us } else { r.p99_us };
                    (left.px(xax.frac(r.throughput_ops_s)), left.py(ax.frac(v)))
                })
                .collect();
            polyline(&mut s, &pts, col, dashed);
            for (i, (x, y)) in pts.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{}" stroke="{col}" stroke-width="1.5"/>"##,
                    if dashed { "white" } else { col }
                );
                if !dashed {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="{col}">{}</text>"##,
                        x + 5.0,
                        y + 13.0,
                        esc(&load_label(runs[i]))
                    );
                }
            }
        }
        items.push((
            format!("{}: p50 (solid), p99 (dashed)", k.name(sizes)),
            col,
            false,
        ));
    }
    legend(&mut s, &left, &items);

    // Right panel: the latency distribution.
    let right = Panel {
        x0: 90.0 + PW + 140.0,
    };
    let reps: Vec<(&Key, &BenchResult)> = series
        .iter()
        .filter_map(|(k, v)| {
            v.iter()
                .max_by(|a, b| a.throughput_ops_s.total_cmp(&b.throughput_ops_s))
                .map(|r| (k, *r))
        })
        .collect();
    let ax = LogAxis::new(
        reps.iter()
            .flat_map(|(_, r)| r.curve.iter().map(|c| c.1))
            .chain(raws.iter().flat_map(|r| r.curve.iter().map(|c| c.1))),
    );
    let nines = reps
        .iter()
        .map(|(_, r)| r)
        .chain(raws.iter())
        .flat_map(|r| r.curve.last().map(|c| c.0))
        .fold(2.0f64, f64::max)
        .ceil();
    frame(
        &mut s,
        &right,
        "Latency distribution",
        "percentile",
        "latency (log)",
    );
    y_axis(&mut s, &right, &ax);
    for k in 0..=(nines as usize) {
        let x = right.px(k as f64 / nines);
        let label = match k {
            0 => "p0".to_string(),
            1 => "p90".to_string(),
            2 => "p99".to_string(),
            k => format!("p99.{}", "9".repeat(k - 2)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="12">{label}</text>"##,
            TOP + PH,
            TOP + PH + 18.0
        );
    }
    // The median, marked.
    let xm = right.px(std::f64::consts::LOG10_2 / nines);
    let _ = writeln!(
        s,
        r##"<line x1="{xm:.1}" y1="{TOP}" x2="{xm:.1}" y2="{:.1}" stroke="#bbb" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" font-size="11" fill="#888">p50</text>"##,
        TOP + PH,
        xm + 3.0,
        TOP + 14.0
    );
    let mut items = Vec::new();
    for (k, r) in &reps {
        let col = k.color();
        let pts: Vec<(f64, f64)> = r
            .curve
            .iter()
            .map(|(x, v)| (right.px(x / nines), right.py(ax.frac(*v))))
            .collect();
        polyline(&mut s, &pts, col, false);
        items.push((
            format!(
                "{} at {}: {} commits/s, p50 {:.0} us, p99 {:.0} us",
                k.name(sizes),
                load_label(r),
                si(r.throughput_ops_s),
                r.p50_us,
                r.p99_us
            ),
            col,
            false,
        ));
    }
    for r in &raws {
        let col = color(&r.fabric, "threads");
        let pts: Vec<(f64, f64)> = r
            .curve
            .iter()
            .map(|(x, v)| (right.px(x / nines), right.py(ax.frac(*v))))
            .collect();
        polyline(&mut s, &pts, col, true);
        items.push((
            format!(
                "{} raw fabric round trip: p50 {:.1} us, p99 {:.1} us",
                r.fabric, r.p50_us, r.p99_us
            ),
            col,
            true,
        ));
    }
    legend(&mut s, &right, &items);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{histogram, BenchResult};

    fn run(
        kind: &'static str,
        fabric: &str,
        topology: &'static str,
        clients: usize,
        base: u64,
    ) -> BenchResult {
        let mut h = histogram();
        for i in 0..10_000u64 {
            h.record(base + i * 7).unwrap();
        }
        let mut r = BenchResult {
            kind,
            fabric: fabric.into(),
            topology,
            clients,
            outstanding: 4,
            durability: "volatile",
            throughput_ops_s: 1000.0 * clients as f64,
            ..Default::default()
        };
        r.fill_latency(&h);
        r
    }

    #[test]
    fn svg_has_every_series_and_no_nan() {
        let rs = vec![
            run("raw", "tcp", "threads", 1, 10_000),
            run("cluster", "tcp", "threads", 1, 100_000),
            run("cluster", "tcp", "threads", 8, 150_000),
            run("cluster", "tcp", "processes", 4, 300_000),
        ];
        let s = svg(&rs, "test <machine>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        assert!(s.contains("tcp threads volatile: p50"));
        assert!(s.contains("tcp processes volatile: p50"));
        assert!(s.contains("tcp raw fabric round trip"));
        assert!(s.contains("test &lt;machine&gt;"));
        // A durable series is its own line, named so.
        let mut d = run("cluster", "tcp", "threads", 1, 400_000);
        d.durability = "durable";
        let s = svg(&[rs[1].clone(), d], "");
        assert!(s.contains("tcp threads durable: p50") && s.contains("tcp threads volatile: p50"));
        // Empty input still gives a valid document.
        let e = svg(&[], "");
        assert!(e.trim_end().ends_with("</svg>") && !e.contains("NaN"));
    }
}
