//! The in-memory accepted log: one slot per index, contiguous from index 1.

use crate::layout::{self, EntryHeader, ENTRY_HEADER_SIZE};
use crate::types::{Ballot, Index};
use std::collections::VecDeque;
use std::sync::Arc;

/// An accepted entry: its ballot and its encoded bytes (layout entry format).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The ballot it was accepted in.
    pub ballot: Ballot,
    /// Its [`layout::flags`].
    pub flags: u32,
    /// The whole encoded entry, shared with writes and persistence.
    pub bytes: Arc<[u8]>,
}

impl Slot {
    /// Builds a slot from encoded entry bytes, which must decode.
    pub fn from_encoded(bytes: Arc<[u8]>) -> Result<(Index, Slot), layout::LayoutError> {
        let (h, _) = layout::decode_entry(&bytes)?;
        Ok((
            h.index,
            Slot {
                ballot: h.ballot,
                flags: h.flags,
                bytes,
            },
        ))
    }

    /// Encodes `payload` under `h` (whose `len` must be the payload's length).
    pub fn encode(h: &EntryHeader, payload: &[u8]) -> Slot {
        let mut buf = Vec::new();
        layout::encode_entry(&mut buf, h, payload);
        Slot {
            ballot: h.ballot,
            flags: h.flags,
            bytes: Arc::from(buf),
        }
    }

    /// The entry's payload.
    pub fn payload(&self) -> &[u8] {
        let len = u32::from_le_bytes(self.bytes[24..28].try_into().unwrap()) as usize;
        &self.bytes[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + len]
    }

    /// The same value re-encoded under another ballot and commit.
    pub fn restamp(&self, index: Index, ballot: Ballot, commit: Index) -> Slot {
        let payload = self.payload();
        let h = EntryHeader {
            index,
            ballot,
            commit,
            len: payload.len() as u32,
            flags: self.flags,
        };
        Slot::encode(&h, payload)
    }
}

/// Accepted slots `base + 1 ..= last`; everything up to `base` is chosen and covered by a
/// checkpoint (compacted away).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Log {
    base: Index,
    slots: VecDeque<Slot>,
}

impl Log {
    /// An empty log whose next index is `base + 1`.
    pub fn with_base(base: Index) -> Log {
        Log {
            base,
            slots: VecDeque::new(),
        }
    }
    /// Highest index compacted away (0: none).
    pub fn base(&self) -> Index {
        self.base
    }
    /// Highest index held (`base` when empty).
    pub fn last(&self) -> Index {
        self.base + self.slots.len() as Index
    }
    /// The slot at `i`, `None` at or below `base` and past `last`.
    pub fn get(&self, i: Index) -> Option<&Slot> {
        if i <= self.base {
            return None;
        }
        self.slots.get((i - self.base - 1) as usize)
    }
    /// Accepts `slot` at index `i`: appends at `last + 1` or replaces an existing slot.
    /// Contract: a slot is only replaced by one of a ballot at least as high.
    pub fn put(&mut self, i: Index, slot: Slot) {
        assert!(
            i > self.base && i <= self.last() + 1,
            "log put at {i} outside {}..={}",
            self.base + 1,
            self.last() + 1
        );
        if i == self.last() + 1 {
            self.slots.push_back(slot);
        } else {
            let old = &mut self.slots[(i - self.base - 1) as usize];
            assert!(
                slot.ballot >= old.ballot,
                "accepted ballot at {i} went down"
            );
            *old = slot;
        }
    }
    /// Drops every slot from `i` on (a new leader replaces its tail with adopted values).
    pub fn truncate_from(&mut self, i: Index) {
        assert!(i > self.base, "truncating into the compacted prefix");
        self.slots.truncate((i - self.base - 1) as usize);
    }
    /// Drops every slot up to `upto` (covered by a checkpoint); past the end, the log
    /// becomes empty with its next index `upto + 1`.
    pub fn compact(&mut self, upto: Index) {
        if upto <= self.base {
            return;
        }
        let drop = ((upto - self.base) as usize).min(self.slots.len());
        self.slots.drain(..drop);
        self.base = upto;
    }
    /// Slots from `from` (or the first held) to the end.
    pub fn range(&self, from: Index) -> impl Iterator<Item = (Index, &Slot)> {
        let skip = from.saturating_sub(self.base + 1) as usize;
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(k, s)| (base + k as Index + 1, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Ballot;
    use proptest::prelude::*;

    fn slot(i: Index, b: u64) -> Slot {
        let h = EntryHeader {
            index: i,
            ballot: Ballot(b),
            commit: 0,
            len: 1,
            flags: 0,
        };
        Slot::encode(&h, &[i as u8])
    }

    proptest! {
        /// Compaction keeps exactly the slots above the cut, at their indexes.
        #[test]
        fn compact_keeps_the_tail(n in 0u64..40, cut in 0u64..60, base in 0u64..5) {
            let mut log = Log::with_base(base);
            for i in base + 1..=base + n {
                log.put(i, slot(i, 1));
            }
            let last = log.last();
            log.compact(cut);
            prop_assert_eq!(log.base(), cut.max(base));
            prop_assert_eq!(log.last(), last.max(cut));
            for i in 0..=last + 1 {
                let want = i > cut.max(base) && i <= last;
                prop_assert_eq!(log.get(i).is_some(), want);
                if want {
                    prop_assert_eq!(log.get(i).unwrap(), &slot(i, 1));
                }
            }
            let idx: Vec<_> = log.range(0).map(|(i, _)| i).collect();
            let want: Vec<_> = (cut.max(base) + 1..=last).collect();
            prop_assert_eq!(idx, want);
        }
    }
}
