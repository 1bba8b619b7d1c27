//! `ballot-verbs`: a safe layer over libibverbs (through `rdma-sys`) and the RDMA fabric.
//!
//! - [`verbs`]: devices, protection domains, memory registrations, completion queues and
//!   RC queue pairs, with ownership that makes use-after-free impossible from safe code.
//! - [`wr`]: work-request lists, posted with one doorbell.
//! - [`fabric`]: [`RdmaFabric`], the `ballot::fabric::Fabric` over RC queue pairs.
//! - [`bootstrap`]: the TCP exchange of queue-pair numbers, GIDs, addresses and rkeys.
//!
//! See `docs/rdma.md`.

pub mod bootstrap;
pub mod error;
pub mod fabric;
pub mod verbs;
pub mod wr;

pub use error::VerbsError;
pub use fabric::{RdmaConfig, RdmaFabric};
