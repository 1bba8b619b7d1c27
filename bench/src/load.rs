//! The load every mode drives: replicas in threads (`cluster`), `ballot-node` processes
//! (`procs`) and the catch-up run (`catchup`). Parsed straight from the command line
//! (flattened into the global options).
//!
//! `display_order` keeps `--help` listing the options where they have always been, among
//! the other global options (see `Opts` in `main.rs`, which numbers the rest).

use clap::{Args, ValueEnum};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    Volatile,
    Durable,
}

#[derive(Args, Debug, Clone)]
pub struct LoadOpts {
    #[arg(long, default_value_t = 3, global = true, display_order = 5)]
    pub replicas: usize,
    /// Command size in bytes.
    #[arg(long, default_value_t = 64, global = true, display_order = 6)]
    pub payload: usize,
    /// Closed-loop clients (processes: client threads, one command outstanding each).
    #[arg(long, default_value_t = 32, global = true, display_order = 7)]
    pub clients: usize,
    /// Commands each closed-loop client keeps outstanding.
    #[arg(long, default_value_t = 4, global = true, display_order = 10)]
    pub outstanding: usize,
    /// Core window: entries in flight beyond the commit index (default: the core's, 256).
    #[arg(long, global = true, display_order = 11)]
    pub pipeline: Option<u64>,
    /// Payload bytes packed into one entry (default 64 KiB); 0 = one command per entry.
    #[arg(long, global = true, display_order = 12)]
    pub batch_bytes: Option<usize>,
    /// Measured time, e.g. 10, 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration, global = true, display_order = 13)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration, global = true, display_order = 14)]
    pub warmup: Duration,
    /// Open loop: commands per second at fixed intervals; latency from the intended send time.
    #[arg(long, value_name = "RATE", global = true, display_order = 17)]
    pub open_loop: Option<f64>,
    #[arg(
        long,
        value_enum,
        default_value = "volatile",
        global = true,
        display_order = 19
    )]
    pub durability: DurabilityArg,
    /// No per-second progress lines.
    #[arg(long, global = true, display_order = 20)]
    pub quiet: bool,
    /// Replica (threads) or node (processes) `i` runs on `cores[i % len]`; empty: not
    /// pinned. Parsed from `--cores` by `main`.
    #[arg(skip)]
    pub cores: Vec<core_affinity::CoreId>,
}

impl LoadOpts {
    /// Durable mode: every replica persists (group commit + fdatasync) before an entry
    /// counts; threads: under the system temp dir, processes: in each node's data dir.
    pub fn durable(&self) -> bool {
        self.durability == DurabilityArg::Durable
    }
    /// Per-second progress lines on stderr.
    pub fn progress(&self) -> bool {
        !self.quiet
    }
    /// The same load with `clients` closed-loop clients (one point of a sweep).
    pub fn with_clients(&self, clients: usize) -> LoadOpts {
        LoadOpts {
            clients,
            ..self.clone()
        }
    }
}
