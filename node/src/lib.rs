//! `ballot-node`: a replicated key-value service on Ballot.
//!
//! - [`kv`]: the state machine (put, get, delete, compare-and-set).
//! - [`session`]: its client sessions (dedup of retried writes, bounded, expired through
//!   the log).
//! - [`wire`]: the client protocol's frames (`docs/client-protocol.md`).
//! - [`client`]: the client library (redirects, retries with the same sequence number).
//! - [`pipeline`]: its pipelining client (many commands in flight on one connection).
//! - [`config`]: the replica's configuration (TOML and flags).
//! - [`server`]: the replica process.
//! - [`frontend`]: its client port (one event-loop thread, limits).
//! - [`metrics`]: its metrics and health endpoint (`--metrics-addr`).
//! - [`error`]: [`NodeError`], what the fallible entry points return.

pub mod client;
pub mod config;
pub mod error;
pub mod frontend;
pub mod kv;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod session;
pub mod wire;

pub use error::NodeError;
