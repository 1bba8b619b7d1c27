//! Client sessions: the key-value store's deduplication table, with bounded memory. It lives
//! in the engine ([`ballot::sessions`]), where the simulator drives it too.

pub use ballot::sessions::*;
