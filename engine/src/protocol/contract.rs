//! Contracts: preconditions, postconditions and invariants of the protocol, asserted
//! unless a thread turned them off (planted-bug runs).

thread_local! {
    static CONTRACTS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the core's contract assertions on or off for this thread (on by default). The
/// planted-bug runs turn them off, so that what catches a bug is the simulator's own
/// end-to-end checks.
pub fn set_contracts(on: bool) {
    CONTRACTS.with(|c| c.set(on));
}

/// Whether the core's contract assertions are on in this thread.
pub fn contracts() -> bool {
    CONTRACTS.with(|c| c.get())
}
