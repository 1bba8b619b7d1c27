//! The sans-IO protocol: messages, command batches, the accepted log and the core.
//!
//! The core (`core.rs`: the state of a replica and the dispatch of events) is split by
//! concern: `acceptor` (promises and streams), `election` (candidacy, phase 1, adoption),
//! `replication` (the leader's phase 2) over the peer `tracker`, `recovery` (amnesia),
//! `pull` (checkpoints and catch-up); `action` is what the core asks of its driver,
//! `config` and `planted` configure it.

/// A precondition, postcondition or invariant of the protocol: checked unless the thread
/// turned contracts off (`set_contracts`).
macro_rules! contract {
    ($cond:expr, $($msg:tt)+) => {
        if $crate::protocol::contracts() {
            assert!($cond, $($msg)+);
        }
    };
}

mod acceptor;
mod action;
pub mod batch;
mod config;
mod contract;
pub mod core;
mod election;
pub mod log;
pub mod msg;
mod planted;
mod pull;
mod queue;
mod recovery;
mod replication;
mod tracker;

pub use self::core::Core;
pub use action::{Action, Data, ProposeError, Token, TokenKind};
pub use config::{Config, ConfigError, Durability};
pub use contract::{contracts, set_contracts};
pub use msg::{Msg, MAX_CKPT_CHUNK};
pub use planted::PlantedBugs;
