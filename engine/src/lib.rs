//! Ballot: a multi-Paxos replicated log and state-machine engine whose memory plane is
//! shaped for one-sided RDMA.
//!
//! - [`layout`]: region and log-entry byte layout, shared by every fabric.
//! - [`region`]: the memory peers write into.
//! - [`fabric`]: the `Fabric` trait; [`mem_fabric`] is the in-process implementation.
//! - [`metrics`]: what a running replica measures (atomics an exporter reads).
//! - [`node`]: a replica node around any state machine: data dir checks, boot marker,
//!   durable open, checkpoints, rejoin and the runtime ([`node::NodeBuilder`]).

#![warn(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod driver;
pub mod fabric;
pub mod layout;
pub mod mem_fabric;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod region;
pub mod ring;
pub mod runtime;
pub mod storage;
pub mod tickets;
pub mod types;
pub mod version;

pub use types::{Ballot, Index, NodeId, MAX_NODES};
#[cfg(feature = "sim")]
pub mod sim;
