//! What moves between a replica and its callers in batches: commands to propose
//! ([`Proposals`]) and their outcomes ([`Completions`]). Each keeps its commands or outputs
//! back to back in one buffer, so handing over N commands or N outputs costs a couple of
//! allocations per batch (none once the buffers are reused), not one or more per command.

use crate::protocol::ProposeError;

/// Byte strings back to back in one buffer, each with a tag and a note of type `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packed<T> {
    /// (tag, length, note) of each, in order.
    items: Vec<(u64, u32, T)>,
    bytes: Vec<u8>,
}

impl<T> Default for Packed<T> {
    fn default() -> Self {
        Packed {
            items: Vec::new(),
            bytes: Vec::new(),
        }
    }
}

impl<T> Packed<T> {
    /// # Panics
    /// If `b` is 4 GiB or longer (no replica takes a command or gives an output that large).
    fn push(&mut self, tag: u64, b: &[u8], note: T) {
        let len = u32::try_from(b.len()).expect("shorter than 4 GiB");
        self.items.push((tag, len, note));
        self.bytes.extend_from_slice(b);
    }

    fn clear(&mut self) {
        self.items.clear();
        self.bytes.clear();
    }

    /// Takes the contents, leaving an empty one with room for as many (a loop that hands
    /// one over per turn does not regrow its buffers from nothing each time).
    fn take(&mut self) -> Self {
        let room = Packed {
            items: Vec::with_capacity(self.items.len()),
            bytes: Vec::with_capacity(self.bytes.len()),
        };
        std::mem::replace(self, room)
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8], &T)> + '_ {
        let mut at = 0;
        self.items.iter().map(move |(tag, len, note)| {
            let b = &self.bytes[at..at + *len as usize];
            at += *len as usize;
            (*tag, b, note)
        })
    }
}

/// Commands to propose, each under the caller's tag (for [`Handle::submit_batch`]).
///
/// [`Handle::submit_batch`]: crate::runtime::Handle::submit_batch
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Proposals(Packed<()>);

impl Proposals {
    /// An empty batch.
    pub fn new() -> Proposals {
        Proposals::default()
    }

    /// Appends `cmd` under `tag`.
    ///
    /// # Panics
    /// If `cmd` is 4 GiB or longer (no replica accepts a command that large).
    pub fn push(&mut self, tag: u64, cmd: &[u8]) {
        self.0.push(tag, cmd, ());
    }

    /// Commands in the batch.
    pub fn len(&self) -> usize {
        self.0.items.len()
    }

    /// No commands.
    pub fn is_empty(&self) -> bool {
        self.0.items.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Takes the batch out (to hand it over), leaving an empty one with room for as many
    /// commands and bytes: two allocations per batch, instead of regrowing from nothing.
    pub fn take(&mut self) -> Proposals {
        Proposals(self.0.take())
    }

    /// `(tag, command)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.0.iter().map(|(tag, cmd, ())| (tag, cmd))
    }

    /// The tags, in order.
    pub fn tags(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.items.iter().map(|&(tag, _, ())| tag)
    }
}

/// Outcomes of proposals, each under its tag (a ticket, or the caller's tag), the outputs
/// back to back in one buffer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Completions(Packed<Option<ProposeError>>);

impl Completions {
    /// None yet.
    pub fn new() -> Completions {
        Completions::default()
    }

    /// Appends a success with its output.
    ///
    /// # Panics
    /// If `out` is 4 GiB or longer.
    pub fn push_ok(&mut self, tag: u64, out: &[u8]) {
        self.0.push(tag, out, None);
    }

    /// Appends a failure.
    pub fn push_err(&mut self, tag: u64, e: ProposeError) {
        self.0.push(tag, &[], Some(e));
    }

    /// Appends an outcome.
    pub fn push(&mut self, tag: u64, out: Result<&[u8], ProposeError>) {
        match out {
            Ok(o) => self.push_ok(tag, o),
            Err(e) => self.push_err(tag, e),
        }
    }

    /// Outcomes held.
    pub fn len(&self) -> usize {
        self.0.items.len()
    }

    /// No outcomes.
    pub fn is_empty(&self) -> bool {
        self.0.items.is_empty()
    }

    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Takes the outcomes out, leaving an empty one with room for as many.
    pub fn take(&mut self) -> Completions {
        Completions(self.0.take())
    }

    /// `(tag, outcome)` in order of completion; outputs borrowed.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Result<&[u8], &ProposeError>)> + '_ {
        self.0.iter().map(|(tag, out, err)| match err {
            None => (tag, Ok(out)),
            Some(e) => (tag, Err(e)),
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_order() {
        let mut p = Proposals::new();
        p.push(7, b"abc");
        p.push(9, b"");
        p.push(3, b"de");
        let got: Vec<(u64, &[u8])> = p.iter().collect();
        assert_eq!(got, vec![(7, &b"abc"[..]), (9, &b""[..]), (3, &b"de"[..])]);
        assert_eq!(p.tags().collect::<Vec<_>>(), vec![7, 9, 3]);

        let mut c = Completions::new();
        c.push_ok(1, b"x");
        c.push_err(2, ProposeError::Busy);
        c.push(3, Ok(b"yz"));
        let got: Vec<_> = c.iter().collect();
        assert_eq!(
            got,
            vec![
                (1, Ok(&b"x"[..])),
                (2, Err(&ProposeError::Busy)),
                (3, Ok(&b"yz"[..]))
            ]
        );
        c.clear();
        assert!(c.is_empty() && c.iter().next().is_none());
    }
}
