//! The sans-IO protocol: messages, command batches, the accepted log and the core.

pub mod batch;
pub mod core;
pub mod log;
pub mod msg;

pub use self::core::{
    contracts, set_contracts, Action, Config, ConfigError, Core, Data, Durability, PlantedBugs,
    ProposeError,
};
pub use msg::{Msg, MAX_CKPT_CHUNK};
