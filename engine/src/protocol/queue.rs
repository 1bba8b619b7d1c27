//! The leader's queue of proposed commands that are not in an entry yet: their bytes back
//! to back in one buffer, so a proposal is copied once here (from the caller's borrowed
//! bytes) and once into its entry, and the queue allocates nothing per command once its
//! buffer has grown to the load.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

/// Commands in proposal order, each with its ticket. Equality and hashing see the queued
/// commands only (not where they sit in the buffer): the model checker compares cores.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandQueue {
    /// (ticket, length) of each queued command, oldest first.
    items: VecDeque<(u64, u32)>,
    /// The commands' bytes, the oldest starting at `head`.
    bytes: Vec<u8>,
    head: usize,
}

/// Consumed bytes kept at the buffer's front before they are moved out (a queue that never
/// empties under load would otherwise grow without bound).
const COMPACT_AT: usize = 1 << 20;

impl CommandQueue {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queues `cmd` (at most `u32::MAX` bytes: the core refuses larger ones first).
    pub(crate) fn push(&mut self, ticket: u64, cmd: &[u8]) {
        let len = u32::try_from(cmd.len()).expect("a command fits in u32 (checked by propose)");
        self.items.push_back((ticket, len));
        self.bytes.extend_from_slice(cmd);
    }

    /// The queued commands, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut at = self.head;
        self.items.iter().map(move |&(ticket, len)| {
            let cmd = &self.bytes[at..at + len as usize];
            at += len as usize;
            (ticket, cmd)
        })
    }

    /// Removes the `n` oldest commands, handing each to `f`.
    pub(crate) fn pop_each(&mut self, n: usize, mut f: impl FnMut(u64, &[u8])) {
        assert!(n <= self.items.len(), "popping {n} of {}", self.items.len());
        for (ticket, len) in self.items.drain(..n) {
            let end = self.head + len as usize;
            f(ticket, &self.bytes[self.head..end]);
            self.head = end;
        }
        if self.items.is_empty() {
            self.bytes.clear();
            self.head = 0;
        } else if self.head >= COMPACT_AT && 2 * self.head >= self.bytes.len() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
        debug_assert_eq!(
            self.bytes.len() - self.head,
            self.items.iter().map(|&(_, l)| l as usize).sum::<usize>()
        );
    }

    /// Empties the queue; the tickets that were in it, oldest first.
    pub(crate) fn take_tickets(&mut self) -> Vec<u64> {
        let tickets = self.items.iter().map(|&(t, _)| t).collect();
        *self = CommandQueue::default();
        tickets
    }
}

impl PartialEq for CommandQueue {
    fn eq(&self, other: &Self) -> bool {
        self.items == other.items && self.bytes[self.head..] == other.bytes[other.head..]
    }
}

impl Eq for CommandQueue {}

impl Hash for CommandQueue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.items.hash(state);
        self.bytes[self.head..].hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a queue of owned commands: the same commands come out in the same order,
        /// and two queues holding the same commands are equal wherever their bytes sit.
        #[test]
        fn behaves_as_a_queue_of_owned_commands(
            ops in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..40), 1usize..4), 1..200)
        ) {
            let mut q = CommandQueue::default();
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut ticket = 0;
            for (push, cmd, n) in ops {
                if push || model.is_empty() {
                    ticket += 1;
                    q.push(ticket, &cmd);
                    model.push_back((ticket, cmd));
                } else {
                    let n = n.min(model.len());
                    let mut got = Vec::new();
                    q.pop_each(n, |t, c| got.push((t, c.to_vec())));
                    let want: Vec<_> = model.drain(..n).collect();
                    prop_assert_eq!(got, want);
                }
                prop_assert_eq!(q.len(), model.len());
                let listed: Vec<_> = q.iter().map(|(t, c)| (t, c.to_vec())).collect();
                prop_assert_eq!(&listed, &model.iter().cloned().collect::<Vec<_>>());
                let mut fresh = CommandQueue::default();
                for (t, c) in &model {
                    fresh.push(*t, c);
                }
                prop_assert_eq!(&fresh, &q);
            }
            let left: Vec<u64> = model.iter().map(|(t, _)| *t).collect();
            prop_assert_eq!(q.take_tickets(), left);
            prop_assert!(q.is_empty());
        }
    }
}
