//! The in-memory accepted log: one slot per index, contiguous from index 1.

use crate::layout::{self, EntryHeader, ENTRY_HEADER_SIZE};
use crate::types::{Ballot, Index};
use std::collections::VecDeque;
use std::sync::Arc;

/// An accepted entry: its ballot and its encoded bytes (layout entry format).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    pub ballot: Ballot,
    pub flags: u32,
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

    pub fn encode(h: &EntryHeader, payload: &[u8]) -> Slot {
        let mut buf = Vec::new();
        layout::encode_entry(&mut buf, h, payload);
        Slot {
            ballot: h.ballot,
            flags: h.flags,
            bytes: Arc::from(buf),
        }
    }

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

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Log {
    slots: VecDeque<Slot>,
}

impl Log {
    pub fn last(&self) -> Index {
        self.slots.len() as Index
    }
    pub fn get(&self, i: Index) -> Option<&Slot> {
        if i == 0 {
            return None;
        }
        self.slots.get(i as usize - 1)
    }
    /// Accepts `slot` at index `i`: appends at `last + 1` or replaces an existing slot.
    /// Contract: a slot is only replaced by one of a ballot at least as high.
    pub fn put(&mut self, i: Index, slot: Slot) {
        assert!(
            i >= 1 && i <= self.last() + 1,
            "log put at {i} beyond {}",
            self.last() + 1
        );
        if i == self.last() + 1 {
            self.slots.push_back(slot);
        } else {
            let old = &mut self.slots[i as usize - 1];
            assert!(
                slot.ballot >= old.ballot,
                "accepted ballot at {i} went down"
            );
            *old = slot;
        }
    }
    /// Drops every slot from `i` on (a new leader replaces its tail with adopted values).
    pub fn truncate_from(&mut self, i: Index) {
        self.slots.truncate(i.saturating_sub(1) as usize);
    }
    pub fn range(&self, from: Index) -> impl Iterator<Item = (Index, &Slot)> {
        let skip = from.saturating_sub(1) as usize;
        self.slots
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(k, s)| (k as Index + 1, s))
    }
}
