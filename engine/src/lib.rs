//! Ballot: a multi-Paxos replicated log and state-machine engine whose memory plane is
//! shaped for one-sided RDMA.
//!
//! A leader replicates by writing log entries straight into its followers' memory (their
//! *rings*) with one-sided writes; followers validate what landed (seal and checksum) and
//! report progress by writing a cell in the leader's memory. Control messages carry only
//! what cannot be a one-sided write: phase 1 of Paxos, stream restarts, recovery and
//! checkpoint pulls. A replica that loses its memory (a volatile restart, a wiped data dir)
//! rebuilds from a majority before it votes again.
//!
//! # Architecture
//!
//! ```text
//! your service ──► node::NodeBuilder ──► runtime (one replica thread) ──► Handle
//!                                            │
//!                  driver::Replica ── StateMachine (yours), Storage (storage::Persister)
//!                        │ events in, actions out
//!                  protocol::Core: sans-IO multi-Paxos, no clock, no I/O
//!                        │ Fabric trait
//!                  mem_fabric::MemFabric | ballot_tcp::TcpFabric | ballot_verbs::RdmaFabric
//! ```
//!
//! Every fabric lands the same bytes at the same offsets ([`layout`]), so the core and the
//! driver cannot tell fabrics apart; the same core and driver run in the deterministic
//! simulator (`sim`, behind the feature of that name), which replays a failing seed
//! exactly.
//!
//! To embed the engine, implement [`driver::StateMachine`] for your application, build the
//! fabric of your choice and start a replica with [`node::NodeBuilder`]; propose through the
//! [`runtime::Handle`] it hands back. `engine/examples/ledger.rs` is a whole example; the
//! design and the protocol are in `docs/design.md` and `docs/protocol.md`.
//!
//! # Modules
//!
//! - [`node`]: a replica node around any state machine: data dir checks, boot marker,
//!   durable open, checkpoints, rejoin and the runtime ([`node::NodeBuilder`]).
//! - [`runtime`]: runs a replica on its own thread; [`runtime::Handle`] proposes and
//!   observes from any thread.
//! - [`driver`]: the replica driver: the core over a fabric, applying to a
//!   [`driver::StateMachine`], persisting through a [`driver::Storage`].
//! - [`protocol`]: the sans-IO protocol core ([`protocol::Core`]), its messages,
//!   configuration and actions.
//! - [`storage`]: durable storage: segment log, promise store, persister thread, snapshot
//!   files.
//! - [`checkpoint`]: checkpoint traits and policy ([`checkpoint::Checkpoints`]), and an
//!   in-memory store.
//! - [`fabric`]: the [`fabric::Fabric`] trait, what the driver needs from a network.
//! - [`mem_fabric`]: the in-process fabric: instant (threads, tests) or simulated with
//!   faults.
//! - [`layout`]: region and log-entry byte layout, shared by every fabric.
//! - [`region`]: the memory peers write into.
//! - [`metrics`]: what a running replica measures (atomics an exporter reads).
//! - [`ring`]: placing entries in a follower's ring and reading them back.
//! - [`tickets`]: the table of outstanding proposal tickets.
//! - [`types`]: node ids, log indexes and ballots.
//! - [`version`]: the version string (with the git commit) every binary prints.
//! - `sim` (feature `sim`): the deterministic simulator and its checks, run by the
//!   `ballot-sim` binary.
//!
//! # Features
//!
//! - `sim` (off by default): the simulator module and the `ballot-sim` binary; it adds
//!   `stateright` (the linearizability checker) and `clap`. An embedder's default build
//!   pulls neither.

#![warn(
    missing_docs,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn
)]

pub mod checkpoint;
mod credit;
pub mod driver;
pub mod fabric;
pub mod handoff;
pub mod layout;
pub mod mem_fabric;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod region;
pub mod ring;
pub mod runtime;
pub mod sessions;
pub mod state_hash;
pub mod storage;
pub mod tickets;
pub mod types;
pub mod version;

pub use types::{Ballot, Index, NodeId, PromiseRecord, MAX_NODES};
#[cfg(feature = "sim")]
pub mod sim;
