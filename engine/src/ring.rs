//! Placing entries in a follower's ring (leader side) and reading them back (owner side).
//!
//! Both sides count slots in a *stream*: a follower restarts reading at slot 0 whenever it
//! begins a new stream (new promise, restart, resync), and the leader restarts writing at
//! slot 0 for it. An entry never straddles the ring's end: when it does not fit, the leader
//! writes a WRAP marker in the remaining space and the entry at slot 0.
//!
//! Flow control: the leader may use slot `s` of the stream only when
//! `s < consumed + slots`, where `consumed` is what the follower reported in its progress
//! cell; so a write never lands on an entry the owner has not consumed.

use crate::layout::{self, flags, EntryHeader, RingGeometry, ENTRY_HEADER_SIZE};
use crate::region::Region;
use crate::types::{Ballot, Index};
use std::sync::Arc;

/// Where the leader writes one entry, possibly after a wrap marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Slot of a wrap marker to write first, if the entry wraps.
    pub wrap_at: Option<u32>,
    /// Slot of the entry itself (0 after a wrap).
    pub slot: u32,
}

/// The leader's write position in one follower's ring.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RingCursor {
    geo: RingGeometry,
    slot: u32,
    /// Slots used in this stream, wrap skips included.
    written: u64,
}

impl RingCursor {
    /// A cursor at the start of a new stream (nothing written, nothing consumed).
    pub fn new(geo: RingGeometry) -> Self {
        Self {
            geo,
            slot: 0,
            written: 0,
        }
    }
    /// A cursor for a stream whose reader has consumed `consumed` slots already (a
    /// follower that read entries before its promise of the stream reached us).
    pub fn resume(geo: RingGeometry, consumed: u64) -> Self {
        Self {
            geo,
            slot: (consumed % u64::from(geo.slots)) as u32,
            written: consumed,
        }
    }
    /// Slots used in this stream so far, wrap skips included: the bound a follower's
    /// reported `consumed` can never exceed.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Reserves room for an entry of `payload` bytes, or `None` when the follower has not
    /// consumed enough (`consumed` = its reported consumed slots in this stream).
    pub fn place(&mut self, payload: usize, consumed: u64) -> Option<Placement> {
        assert!(
            consumed <= self.written,
            "follower consumed more than was written"
        );
        let span = self.geo.span(payload);
        assert!(
            span <= self.geo.slots / 2,
            "entry larger than half the ring"
        );
        let slots = self.geo.slots;
        let slot = if self.slot == slots { 0 } else { self.slot };
        let (wrap_at, skip, at) = if span > slots - slot {
            (Some(slot), slots - slot, 0)
        } else {
            (None, 0, slot)
        };
        let need = self.written + u64::from(skip) + u64::from(span);
        if need > consumed + u64::from(slots) {
            return None;
        }
        self.written = need;
        self.slot = at + span;
        Some(Placement { wrap_at, slot: at })
    }
}

/// The owner's read position in its own ring.
#[derive(Debug, Clone)]
pub struct RingReader {
    geo: RingGeometry,
    slot: u32,
    consumed: u64,
    ballot: Ballot,
    expect: Index,
}

impl RingReader {
    /// A reader before its first stream (ballot zero, expecting index 1).
    pub fn new(geo: RingGeometry) -> Self {
        Self {
            geo,
            slot: 0,
            consumed: 0,
            ballot: Ballot::ZERO,
            expect: 1,
        }
    }

    /// Starts a new stream: entries of `ballot` from index `expect`, from slot 0.
    pub fn reset(&mut self, ballot: Ballot, expect: Index) {
        self.slot = 0;
        self.consumed = 0;
        self.ballot = ballot;
        self.expect = expect;
    }

    /// Slots consumed in this stream: what the owner reports in its progress cell, so that the
    /// leader may reuse them.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
    /// The ballot of the current stream: entries of any other ballot are ignored.
    pub fn ballot(&self) -> Ballot {
        self.ballot
    }
    /// The index the next entry of this stream must carry.
    pub fn expect(&self) -> Index {
        self.expect
    }

    /// Returns the next complete entry of this stream, if it has landed: its header and its
    /// whole encoded bytes, read from the ring straight into the exact-size shared buffer
    /// that the log keeps (one copy, one allocation per entry). Never trusts byte order: the
    /// seal must repeat the index and the checksum must match (checked on the copy, which
    /// the leader can no longer change), else the entry is still arriving and `None` is
    /// returned. The third element is the consumed-slot count after this entry.
    pub fn poll(&mut self, region: &Region) -> Option<(EntryHeader, Arc<[u8]>, u64)> {
        loop {
            if self.slot == self.geo.slots {
                self.slot = 0;
            }
            let at = self.geo.slot_offset(self.slot);
            let mut head = [0u8; ENTRY_HEADER_SIZE];
            region.read(at, &mut head).ok()?;
            let (index, ballot) = layout::peek_stream(&head)?;
            if index != self.expect || ballot != self.ballot {
                return None;
            }
            let len = layout::peek_len(&head)?;
            if len > self.geo.max_payload() {
                return None;
            }
            let total = layout::entry_size(len);
            if at + total > region.len() {
                return None;
            }
            let seal = region.load_word_at(at + layout::seal_offset(len))?;
            if seal != index {
                return None;
            }
            let bytes = region.read_shared(at, total).ok()?;
            let (h, _) = layout::decode_entry(&bytes).ok()?;
            if h.index != self.expect || h.ballot != self.ballot {
                return None;
            }
            if h.flags & flags::WRAP != 0 {
                self.consumed += u64::from(self.geo.slots - self.slot);
                self.slot = 0;
                continue;
            }
            let span = self.geo.span(len);
            self.slot += span;
            self.consumed += u64::from(span);
            self.expect += 1;
            return Some((h, bytes, self.consumed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{encode_entry, RegionInfo};
    use proptest::prelude::*;

    fn write(region: &Region, geo: RingGeometry, p: Placement, h: EntryHeader, payload: &[u8]) {
        let mut buf = Vec::new();
        if let Some(w) = p.wrap_at {
            let wh = EntryHeader {
                len: 0,
                flags: flags::WRAP,
                ..h
            };
            encode_entry(&mut buf, &wh, &[]);
            region.write(geo.slot_offset(w), &buf).unwrap();
        }
        encode_entry(&mut buf, &h, payload);
        region.write(geo.slot_offset(p.slot), &buf).unwrap();
    }

    proptest! {
        /// Whatever the entry sizes and however late the reader is, the reader sees every
        /// entry once, in order, intact, and the writer never overruns unconsumed slots.
        #[test]
        fn writer_and_reader_agree(sizes in proptest::collection::vec(0usize..5000, 1..200),
                                   lag in 0usize..8) {
            let geo = RingGeometry::new(256, 64).unwrap();
            let info = RegionInfo { cluster: 1, node: 0, ring: geo };
            let region = Region::anonymous(info).unwrap();
            let b = Ballot::new(1, 0);
            let mut cur = RingCursor::new(geo);
            let mut rd = RingReader::new(geo);
            rd.reset(b, 1);
            let mut next_write = 0usize;
            let mut next_read = 0usize;
            let mut steps = 0;
            while next_read < sizes.len() {
                steps += 1;
                prop_assert!(steps < 100_000);
                // Write as much as credit allows.
                while next_write < sizes.len() {
                    let len = sizes[next_write];
                    let Some(p) = cur.place(len, rd.consumed()) else { break };
                    let payload = vec![next_write as u8; len];
                    let h = EntryHeader { index: next_write as u64 + 1, ballot: b, commit: 0,
                                          len: len as u32, flags: 0 };
                    write(&region, geo, p, h, &payload);
                    next_write += 1;
                }
                // Read, sometimes lagging behind.
                for _ in 0..=(steps % (lag + 1)) {
                    if let Some((h, bytes, _)) = rd.poll(&region) {
                        prop_assert_eq!(h.index as usize, next_read + 1);
                        prop_assert_eq!(h.len as usize, sizes[next_read]);
                        let (_, p) = layout::decode_entry(&bytes).unwrap();
                        prop_assert!(p.iter().all(|&x| x == next_read as u8));
                        next_read += 1;
                    }
                }
            }
        }
    }
}
