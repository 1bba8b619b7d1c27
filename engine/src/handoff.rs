//! What moves between a replica and its callers in batches: commands to propose
//! ([`Proposals`]) and their outcomes ([`Completions`]). Each keeps its commands or outputs
//! back to back in one buffer, so handing over N commands or N outputs costs a couple of
//! allocations per batch (none once the buffers are reused), not one or more per command.

use crate::driver::Outcome;
use crate::protocol::ProposeError;

/// Commands to propose, each under the caller's tag (for [`Handle::submit_batch`]).
///
/// [`Handle::submit_batch`]: crate::runtime::Handle::submit_batch
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Proposals {
    /// (tag, length) of each command, in order.
    items: Vec<(u64, u32)>,
    bytes: Vec<u8>,
}

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
        let len = u32::try_from(cmd.len()).expect("a command shorter than 4 GiB");
        self.items.push((tag, len));
        self.bytes.extend_from_slice(cmd);
    }

    /// Commands in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No commands.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes.clear();
    }

    /// `(tag, command)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut at = 0;
        self.items.iter().map(move |&(tag, len)| {
            let cmd = &self.bytes[at..at + len as usize];
            at += len as usize;
            (tag, cmd)
        })
    }

    /// The tags, in order.
    pub fn tags(&self) -> impl Iterator<Item = u64> + '_ {
        self.items.iter().map(|&(tag, _)| tag)
    }
}

/// Outcomes of proposals, each under its tag (a ticket, or the caller's tag), the outputs
/// back to back in one buffer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Completions {
    /// (tag, the output's length or the error), in order of completion.
    items: Vec<(u64, Result<u32, ProposeError>)>,
    bytes: Vec<u8>,
}

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
        let len = u32::try_from(out.len()).expect("an output shorter than 4 GiB");
        self.items.push((tag, Ok(len)));
        self.bytes.extend_from_slice(out);
    }

    /// Appends a failure.
    pub fn push_err(&mut self, tag: u64, e: ProposeError) {
        self.items.push((tag, Err(e)));
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
        self.items.len()
    }

    /// No outcomes.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes.clear();
    }

    /// `(tag, outcome)` in order of completion; outputs borrowed.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Result<&[u8], &ProposeError>)> + '_ {
        let mut at = 0;
        self.items.iter().map(move |(tag, r)| {
            let out = match r {
                Ok(len) => {
                    let o = &self.bytes[at..at + *len as usize];
                    at += *len as usize;
                    Ok(o)
                }
                Err(e) => Err(e),
            };
            (*tag, out)
        })
    }

    /// The outcomes as owned values (one allocation per output: for tests and tools, not
    /// for hot paths).
    pub fn to_outcomes(&self) -> Vec<(u64, Outcome)> {
        self.iter()
            .map(|(t, r)| (t, r.map(<[u8]>::to_vec).map_err(Clone::clone)))
            .collect()
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
        assert_eq!(
            c.to_outcomes(),
            vec![
                (1, Ok(b"x".to_vec())),
                (2, Err(ProposeError::Busy)),
                (3, Ok(b"yz".to_vec()))
            ]
        );
        c.clear();
        assert!(c.is_empty() && c.iter().next().is_none());
    }
}
