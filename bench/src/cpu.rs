//! CPU time of this process's threads, by role, from `/proc/self/task/*/schedstat` (time
//! on a CPU, in ns). Linux only; elsewhere the samples are empty.

use std::collections::{BTreeMap, HashMap};

/// Per thread id: (group, ns on a CPU so far).
#[derive(Debug, Clone, Default)]
pub struct Sample(HashMap<u32, (String, u64)>);

/// The role of a thread, from its name: `replica-N` and the TCP fabric's threads of node N
/// (`tcp-link-N-P`, `tcp-listen-N`, `tcp-nic-N`) count for node N; checkpoint saves; the rest
/// (the load generator, the bench's main thread) is `bench`.
fn group(name: &str) -> String {
    if let Some(n) = name.strip_prefix("replica-") {
        return format!("r{n}");
    }
    for p in ["tcp-link-", "tcp-listen-", "tcp-nic-"] {
        if let Some(rest) = name.strip_prefix(p) {
            let node = rest.split('-').next().unwrap_or("?");
            return format!("tcp{node}");
        }
    }
    if name.starts_with("checkpoint-sav") {
        return "ckpt".into();
    }
    "bench".into()
}

pub fn sample() -> Sample {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return Sample(out);
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let (Ok(name), Ok(st)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = st
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
        else {
            continue;
        };
        out.insert(tid, (group(name.trim()), ns));
    }
    Sample(out)
}

/// CPU seconds per group between two samples (threads that ended in between are missing
/// their last part; threads that started count from zero).
pub fn delta(from: &Sample, to: &Sample) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (tid, (g, ns)) in &to.0 {
        let before = from.0.get(tid).map_or(0, |(_, n)| *n);
        *out.entry(g.clone()).or_insert(0.0) += ns.saturating_sub(before) as f64 / 1e9;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_deltas() {
        assert_eq!(group("replica-2"), "r2");
        assert_eq!(group("tcp-link-1-0"), "tcp1");
        assert_eq!(group("tcp-nic-0"), "tcp0");
        assert_eq!(group("checkpoint-sav"), "ckpt");
        assert_eq!(group("ballot-bench"), "bench");
        let a = sample();
        // Busy for 100 ms (the kernel accounts run time at ticks and switches), then a
        // switch.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        let d = delta(&a, &sample());
        if cfg!(target_os = "linux") {
            assert!(d.values().sum::<f64>() > 0.0, "{d:?}");
        }
    }
}
