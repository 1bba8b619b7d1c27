//! What can go wrong in the node crate's fallible entry points (configuration, start,
//! one-shot admin requests), with the cause kept as the error's source. The messages are
//! the ones users see (`ballot-node: …`, `ballot-cli status`).

use ballot::node::StartError;
use ballot::protocol::ConfigError;
use std::fmt;

#[derive(Debug)]
pub enum NodeError {
    /// The configuration (flags, config file, key file) is unusable.
    Config(String),
    /// The engine did not start the replica: the data dir refused this start, durable
    /// state unusable or unrecoverable, the protocol core or the fabric refused. Its
    /// message is the engine's.
    Start(StartError),
    /// A file, socket or thread operation of the node crate failed: what was being done,
    /// and why.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A node could not be reached for a one-shot request (status, checkpoint).
    Unreachable(std::io::Error),
    /// A node answered a one-shot request with an error, or with something unexpected.
    Answer(String),
}

impl NodeError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(s) | Self::Answer(s) => f.write_str(s),
            Self::Start(e) => e.fmt(f),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::Unreachable(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for NodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(_) | Self::Answer(_) => None,
            // The engine's error is transparent: its own cause is the source.
            Self::Start(e) => std::error::Error::source(e),
            Self::Io { source, .. } => Some(source),
            Self::Unreachable(e) => Some(e),
        }
    }
}

impl From<StartError> for NodeError {
    fn from(e: StartError) -> Self {
        Self::Start(e)
    }
}

impl From<ConfigError> for NodeError {
    fn from(e: ConfigError) -> Self {
        Self::Start(StartError::Protocol(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballot::storage::StorageError;
    use std::error::Error as _;

    #[test]
    fn messages_read_as_before_and_keep_their_cause() {
        let e = NodeError::io(
            "cannot create data dir /x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(
            e.to_string(),
            "cannot create data dir /x: permission denied"
        );
        let io = e
            .source()
            .unwrap()
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        let e = NodeError::from(StartError::Unrecoverable {
            what: "cannot recover the durable state in /x".into(),
            source: StorageError::NoSuchSnapshot { index: 7 },
        });
        let s = e.to_string();
        assert!(
            s.starts_with("cannot recover the durable state in /x: "),
            "{s}"
        );
        assert!(s.ends_with("; refusing to start"), "{s}");
        assert!(e.source().unwrap().is::<StorageError>());
        let e = NodeError::from(ConfigError::NotAMember(3));
        assert_eq!(
            e.to_string(),
            format!("bad configuration: {}", ConfigError::NotAMember(3))
        );
        assert_eq!(
            NodeError::Config("missing node id".into()).to_string(),
            "missing node id"
        );
    }
}
