//! Client commands packed into one entry's payload (adaptive batching).
//!
//! ```text
//! payload = { origin u64 | len u32 | bytes[len] }*
//! ```
//! `origin` names the proposing replica and its ticket so that replica can complete the
//! client's ticket when the entry is applied.

/// Bytes a command adds to a payload besides its own bytes.
pub const COMMAND_OVERHEAD: usize = 12;

/// `origin` = proposing node in the top byte, its ticket number below.
pub fn origin(node: crate::NodeId, ticket: u64) -> u64 {
    debug_assert!(ticket < 1 << 56);
    u64::from(node) << 56 | (ticket & ((1 << 56) - 1))
}
/// The proposing replica of an `origin`.
pub fn origin_node(origin: u64) -> crate::NodeId {
    (origin >> 56) as crate::NodeId
}
/// The proposer's ticket of an `origin`.
pub fn origin_ticket(origin: u64) -> u64 {
    origin & ((1 << 56) - 1)
}

/// Appends one command to a payload (the caller keeps the payload within the batch limit).
pub fn push(payload: &mut Vec<u8>, origin: u64, cmd: &[u8]) {
    payload.extend_from_slice(&origin.to_le_bytes());
    payload.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    payload.extend_from_slice(cmd);
}

/// Writes one command at the start of `out` (at least `COMMAND_OVERHEAD + cmd.len()`
/// bytes) as [`push`] appends it; returns the bytes written.
pub fn write(out: &mut [u8], origin: u64, cmd: &[u8]) -> usize {
    let n = COMMAND_OVERHEAD + cmd.len();
    out[..8].copy_from_slice(&origin.to_le_bytes());
    out[8..12].copy_from_slice(&(cmd.len() as u32).to_le_bytes());
    out[12..n].copy_from_slice(cmd);
    n
}

/// A payload that does not parse as a batch: only a corrupt entry, since chosen entries are
/// checksummed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchError {
    /// Where in the payload the bad command starts.
    pub offset: usize,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed command batch at byte {}", self.offset)
    }
}
impl std::error::Error for BatchError {}

/// Iterates `(origin, command)` pairs; yields one `Err` and stops on malformed bytes.
pub fn iter(payload: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8]), BatchError>> {
    let mut at = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at == payload.len() {
            return None;
        }
        let rest = &payload[at..];
        if rest.len() < COMMAND_OVERHEAD {
            failed = true;
            return Some(Err(BatchError { offset: at }));
        }
        let origin = u64::from_le_bytes(rest[..8].try_into().unwrap());
        let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
        if rest.len() - COMMAND_OVERHEAD < len {
            failed = true;
            return Some(Err(BatchError { offset: at }));
        }
        at += COMMAND_OVERHEAD + len;
        Some(Ok((
            origin,
            &rest[COMMAND_OVERHEAD..COMMAND_OVERHEAD + len],
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(cmds in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..50)), 0..20)) {
            let mut p = Vec::new();
            for (o, c) in &cmds { push(&mut p, *o, c); }
            let got: Vec<_> = iter(&p).map(|r| r.unwrap()).map(|(o, c)| (o, c.to_vec())).collect();
            prop_assert_eq!(got, cmds);
        }
        #[test]
        fn write_in_place_is_push(cmds in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..50)), 0..20)) {
            let mut p = Vec::new();
            for (o, c) in &cmds { push(&mut p, *o, c); }
            let mut q = vec![0u8; p.len()];
            let mut at = 0;
            for (o, c) in &cmds { at += write(&mut q[at..], *o, c); }
            prop_assert_eq!(at, p.len());
            prop_assert_eq!(q, p);
        }
        #[test]
        fn total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let n = iter(&bytes).count();
            prop_assert!(n <= bytes.len() / COMMAND_OVERHEAD + 1);
        }
    }
}
