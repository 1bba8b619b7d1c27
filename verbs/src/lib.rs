//! `ballot-verbs`: a safe layer over libibverbs (through `rdma-sys`) and the RDMA fabric.
//!
//! - [`verbs`]: devices, protection domains, memory registrations, completion queues and
//!   RC queue pairs, with ownership that makes use-after-free impossible from safe code.
//! - [`wr`]: work-request lists, posted with one doorbell.
//! - [`fabric`]: [`RdmaFabric`], the `ballot::fabric::Fabric` over RC queue pairs.
//! - [`bootstrap`]: the TCP exchange of queue-pair numbers, GIDs, addresses and rkeys.
//!
//! See `docs/rdma.md`.

#![warn(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod bootstrap;
pub mod error;
pub mod fabric;
pub mod verbs;
pub mod wr;

pub use error::VerbsError;
pub use fabric::{RdmaConfig, RdmaCounters, RdmaFabric};

/// For binaries that have no `tracing` subscriber of their own: prints this crate's
/// diagnostics (refused bootstrap connections, re-bootstraps, data-QP reconnects) on
/// stderr; `RUST_LOG` overrides the default filter (`ballot_verbs=info`). Does nothing if a
/// subscriber is already installed.
pub fn init_diagnostics() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ballot_verbs=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
