//! The version string every binary prints for `--version`: the crate version and the git
//! commit it was built from (embedded by `build.rs`; "unknown" outside a git checkout).
//!
//! With clap: `#[command(version = ballot::version::VERSION)]`.

/// The git commit (`git rev-parse --short HEAD` at build time), or "unknown".
pub const COMMIT: &str = env!("BALLOT_GIT_COMMIT");

/// `<version> (commit <hash>)`, e.g. `0.1.0 (commit 1b4fa8c)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BALLOT_GIT_COMMIT"),
    ")"
);

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_the_commit() {
        assert!(super::VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(super::VERSION.contains(super::COMMIT));
        assert!(!super::COMMIT.is_empty());
    }
}
