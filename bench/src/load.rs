//! The load every cluster mode drives: replicas in threads (`cluster`), `ballot-node`
//! processes (`procs`), an existing cluster (`--endpoints`) and the catch-up run
//! (`catchup`); and the output options every subcommand has. Parsed from the command line
//! of the subcommands that take them (flattened), never of `raw`.

use clap::{Args, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityArg {
    Volatile,
    Durable,
}

/// What is printed, and how (every subcommand).
#[derive(Args, Debug, Clone, Serialize)]
pub struct OutputOpts {
    /// One JSON object per result on stdout, with the run's metadata (progress stays on
    /// stderr).
    #[arg(long)]
    pub json: bool,
    /// No per-second progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// The sizes measured and for how long (every subcommand).
#[derive(Args, Debug, Clone, Serialize)]
pub struct Measure {
    /// Command size in bytes; a list (e.g. 64,256,1024,4096) measures each size in turn.
    #[arg(
        long = "payload",
        value_name = "BYTES[,BYTES...]",
        value_delimiter = ',',
        default_value = "64"
    )]
    pub payloads: Vec<usize>,
    /// Measured time (per size and point), e.g. 10, 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    #[serde(serialize_with = "crate::report::secs")]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    #[serde(serialize_with = "crate::report::secs")]
    pub warmup: Duration,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct LoadOpts {
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    #[command(flatten)]
    pub measure: Measure,
    /// This run's command size (one of `--payload`).
    #[arg(skip)]
    pub payload: usize,
    /// Closed-loop clients (processes, endpoints: client threads, one connection each).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Commands each closed-loop client keeps outstanding (processes, endpoints: in flight
    /// on its connection, pipelined).
    #[arg(long, default_value_t = 4)]
    pub outstanding: usize,
    /// Core window: entries in flight beyond the commit index (default: the core's, 256).
    #[arg(long)]
    pub pipeline: Option<u64>,
    /// Payload bytes packed into one entry (default 64 KiB); 0 = one command per entry.
    #[arg(long)]
    pub batch_bytes: Option<usize>,
    /// Topology processes: also measure with this many idle client connections open on the
    /// leader (hello done, nothing sent): each point runs without them, with them, and
    /// without them again on the same cluster, and reports the leader's threads and memory
    /// before and after opening them. Raises this process's open-file limit to its hard
    /// limit, and the nodes' `--client-max-connections` to fit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub idle_connections: usize,
    /// Open loop: commands per second at fixed intervals; latency from the intended send time.
    #[arg(long, value_name = "RATE")]
    pub open_loop: Option<f64>,
    /// Default volatile. With `--endpoints` it only labels the results (the nodes' own
    /// setting decides; "unknown" when not given).
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityArg>,
    /// Pin replica threads: replica i runs on core LIST[i % len], e.g. 0,1 or 0-1
    /// (processes: `--core` per node, busy-polling).
    #[arg(long = "cores", value_name = "LIST")]
    pub cores_arg: Option<String>,
    /// Replica (threads) or node (processes) `i` runs on `cores[i % len]`; empty: not
    /// pinned. Parsed from `--cores` by `main`.
    #[arg(skip)]
    #[serde(skip)]
    pub cores: Vec<core_affinity::CoreId>,
    /// Where durable replicas, `ballot-node` processes and catch-up checkpoints keep their
    /// files: a fresh directory inside this one per run, removed at its end (default: the
    /// system temp dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutputOpts,
}

impl LoadOpts {
    /// Durable mode: every replica persists (group commit + fdatasync) before an entry
    /// counts; in a fresh directory under `--data-dir`.
    pub fn durable(&self) -> bool {
        self.durability == Some(DurabilityArg::Durable)
    }
    /// The label of the results.
    pub fn durability_name(&self) -> &'static str {
        if self.durable() {
            "durable"
        } else {
            "volatile"
        }
    }
    /// Per-second progress lines on stderr.
    pub fn progress(&self) -> bool {
        !self.out.quiet
    }
    /// The same load with `payload`-byte commands and `clients` closed-loop clients (one
    /// point of a sweep).
    pub fn point(&self, payload: usize, clients: usize) -> LoadOpts {
        LoadOpts {
            payload,
            clients,
            ..self.clone()
        }
    }
    /// Parses `--cores` into `cores`.
    pub fn resolve_cores(&mut self) -> Result<(), String> {
        self.cores = match self.cores_arg.as_deref() {
            Some(list) => crate::parse_cores(list)?,
            None => Vec::new(),
        };
        Ok(())
    }
    /// A fresh directory for this run's files (`what` names it), under `--data-dir` or the
    /// system temp dir; removed when the guard is dropped.
    pub fn scratch_dir(&self, what: &str) -> Result<tempfile::TempDir, String> {
        scratch_dir(self.data_dir.as_deref(), what)
    }
}

/// `ballot-bench-<pid>-<what>-XXXXXX` under `parent` (default: the system temp dir). Also
/// removes those of runs that are gone: a run killed by SIGTERM or a second Ctrl-C exits
/// from its signal handler, where removing a directory tree is not safe.
pub fn scratch_dir(
    parent: Option<&std::path::Path>,
    what: &str,
) -> Result<tempfile::TempDir, String> {
    let parent = parent.map_or_else(std::env::temp_dir, PathBuf::from);
    remove_stale_dirs(&parent);
    tempfile::Builder::new()
        .prefix(&format!("ballot-bench-{}-{what}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))
}

/// Removes `ballot-bench-<pid>-<what>-XXXXXX` directories in `parent` whose process is gone.
fn remove_stale_dirs(parent: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ballot-bench-"))
            .and_then(|p| p.split_once('-'))
            .and_then(|(p, _)| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scratch_dirs_are_fresh_and_stale_ones_of_dead_runs_go() {
        let parent = tempfile::tempdir().unwrap();
        let dead = parent
            .path()
            .join(format!("ballot-bench-{}-durable-x", i32::MAX - 1));
        let alive = parent
            .path()
            .join(format!("ballot-bench-{}-nodes-y", std::process::id()));
        let other = parent.path().join("ballot-bench-results");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir_all(d.join("0")).unwrap();
        }
        let a = super::scratch_dir(Some(parent.path()), "durable").unwrap();
        let b = super::scratch_dir(Some(parent.path()), "durable").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(parent.path()));
        assert!(!dead.exists(), "a dead run's directory is removed");
        assert!(alive.exists() && other.exists(), "others are left alone");
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
