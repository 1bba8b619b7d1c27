//! Ring credit stalls, as the replica driver sees them (for [`crate::metrics::Metrics`]).
//!
//! A leader may write a follower's ring only where the follower has consumed
//! ([`crate::ring`], "Flow control"). When the leader holds an entry for a follower and the
//! follower's ring has no room for it, replication to that follower stalls until its
//! progress cell reports more consumed slots. The protocol core decides this and keeps no
//! count (it is model-checked and kept small); this watch re-derives the same condition
//! outside it, from what the driver executes and reads:
//!
//! - the ring writes the core asks for (entry and wrap tokens: the stream's write
//!   generation, the entry's index; the offset gives the slot, the bytes the span);
//! - the follower's progress cell (its stream and consumed slots), which the driver reads
//!   for the core anyway;
//! - the leader's log (the next entry's size).
//!
//! At the end of each step of a leader, a follower is *stalled* when an entry after the
//! last one written to it is in the log and the room left in its ring (ring size minus the
//! slots written and not consumed, less the slots a wrap would skip) is smaller than that
//! entry's span: exactly the test of [`crate::ring::RingCursor::place`]. A stall is counted
//! once, when it begins.
//!
//! A stream starts where the follower's reader was when it promised; when the last progress
//! cell read at that moment is not of that stream, the start is known only modulo the ring
//! size, and nothing is counted until the stream's first cell is seen. (If the follower's
//! ring is exactly full then, the start is taken a ring too low and stalls are missed until
//! its next cell; the estimate is never above the truth, so no stall is counted where there
//! is none.)

use crate::layout::{self, ProgressCell, RingGeometry};
use crate::protocol::{Token, TokenKind};
use crate::types::{Index, NodeId, MAX_NODES};

/// What the watch knows of one follower's stream.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// The write generation of the stream being written (`None`: none seen).
    gen: Option<u64>,
    /// The next slot the leader writes at (`slots` stands for 0, as in `RingCursor`).
    pos: u32,
    /// The last entry written in this stream.
    sent: Index,
    /// Slots used in the stream, wrap skips included (`RingCursor::written`): exact from a
    /// start whose progress cell was seen; otherwise congruent to it modulo the ring size
    /// until the stream's first cell lifts it into the one range a follower's consumed
    /// count allows.
    written: u64,
    /// The follower's stream id in its last progress cell when this stream began.
    stream_at_start: Option<u64>,
    /// The follower's stream id whose progress cells describe this stream.
    anchor: Option<u64>,
    /// Stalled at the last check.
    stalled: bool,
}

/// Re-derives the leader's ring credit stalls from the driver's view (module docs).
#[derive(Debug)]
pub(crate) struct CreditWatch {
    geo: RingGeometry,
    peers: [Stream; MAX_NODES],
    any: bool,
}

impl CreditWatch {
    pub(crate) fn new(geo: RingGeometry) -> Self {
        CreditWatch {
            geo,
            peers: [Stream::default(); MAX_NODES],
            any: false,
        }
    }

    /// Forgets every stream (this replica stopped leading).
    pub(crate) fn clear(&mut self) {
        if self.any {
            self.peers = [Stream::default(); MAX_NODES];
            self.any = false;
        }
    }

    /// The leader writes `data` at `offset` in `peer`'s region with `token`; `cell` is the
    /// peer's last progress cell.
    pub(crate) fn on_write(
        &mut self,
        peer: NodeId,
        token: Token,
        offset: usize,
        data: &[u8],
        cell: Option<ProgressCell>,
    ) {
        let kind = token.kind();
        if !matches!(kind, Some(TokenKind::Entry | TokenKind::Wrap)) || offset < layout::RING_OFFSET
        {
            return;
        }
        let Some(s) = self.peers.get_mut(peer as usize) else {
            return;
        };
        let slots = self.geo.slots;
        let slot = ((offset - layout::RING_OFFSET) / self.geo.slot_size as usize) as u32;
        if s.gen != Some(token.gen()) {
            // A new stream: it starts where the follower's reader was when it promised, so
            // a progress cell of that stream, if it is the last one read, says as much.
            let at_start = cell.filter(|c| c.consumed_slots % u64::from(slots) == u64::from(slot));
            *s = Stream {
                gen: Some(token.gen()),
                pos: slot,
                sent: token.index().saturating_sub(1),
                written: at_start.map_or(u64::from(slot), |c| c.consumed_slots),
                anchor: at_start.map(|c| c.stream),
                stream_at_start: cell.map(|c| c.stream),
                stalled: false,
            };
            self.any = true;
        }
        match kind {
            Some(TokenKind::Wrap) => {
                s.written += u64::from(slots - slot);
                s.pos = 0;
            }
            _ => {
                let span = layout::peek_len(data).map_or(0, |len| self.geo.span(len));
                s.written += u64::from(span);
                s.pos = slot + span;
                s.sent = token.index();
            }
        }
    }

    /// The entry the leader would write to `peer` next, if a stream to it is known.
    pub(crate) fn next_index(&self, peer: NodeId) -> Option<Index> {
        let s = self.peers.get(peer as usize)?;
        s.gen.map(|_| s.sent + 1)
    }

    /// End of a leader's step: `last` is its last log index, `next_len` the payload length
    /// of the entry after the last one written to `peer` (`None`: not in the log), `cell`
    /// the peer's last progress cell. Returns whether a stall begins.
    pub(crate) fn check(
        &mut self,
        peer: NodeId,
        last: Index,
        next_len: Option<usize>,
        cell: Option<ProgressCell>,
    ) -> bool {
        let geo = self.geo;
        let Some(s) = self.peers.get_mut(peer as usize) else {
            return false;
        };
        if s.gen.is_none() {
            return false;
        }
        let Some(cell) = cell else {
            return false;
        };
        if s.anchor.is_none() && s.stream_at_start != Some(cell.stream) {
            // The follower's first cell of its new stream.
            s.anchor = Some(cell.stream);
        }
        let stalled = match next_len {
            Some(len) if s.sent < last && s.anchor == Some(cell.stream) => {
                let slots = u64::from(geo.slots);
                let c = cell.consumed_slots;
                // A follower never consumes past what was written, nor lags by more than
                // the ring: bring an estimated start into that range.
                if s.written < c {
                    s.written += (c - s.written).div_ceil(slots) * slots;
                } else if s.written > c + slots {
                    s.written -= (s.written - c - slots).div_ceil(slots) * slots;
                }
                let span = u64::from(geo.span(len));
                let pos = u64::from(s.pos) % slots;
                let skip = if span > slots - pos { slots - pos } else { 0 };
                s.written - c + skip + span > slots
            }
            _ => false,
        };
        let begins = stalled && !s.stalled;
        s.stalled = stalled;
        begins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{encode_entry, EntryHeader};
    use crate::ring::RingCursor;
    use crate::types::Ballot;

    fn cell(stream: u64, consumed: u64) -> Option<ProgressCell> {
        Some(ProgressCell {
            ballot: Ballot::new(1, 0),
            received: 0,
            persisted: 0,
            applied: 0,
            consumed_slots: consumed,
            stream,
        })
    }

    fn entry(index: Index, payload: usize) -> Vec<u8> {
        let h = EntryHeader {
            index,
            ballot: Ballot::new(1, 0),
            commit: 0,
            len: payload as u32,
            flags: 0,
        };
        let mut buf = Vec::new();
        encode_entry(&mut buf, &h, &vec![7u8; payload]);
        buf
    }

    /// Writes entries as the core does (a `RingCursor`), stalls where it stalls, and checks
    /// the watch agrees at every step, through wraps and consumption.
    #[test]
    fn agrees_with_the_cursor() {
        let geo = RingGeometry::new(64, 64).unwrap();
        let mut w = CreditWatch::new(geo);
        let mut cur = RingCursor::resume(geo, 5);
        let mut consumed = 5u64;
        let mut x = 11u64;
        let sizes: Vec<usize> = (0..300)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 1900) as usize
            })
            .collect();
        let mut next = 1usize;
        let mut stalls = 0;
        let mut rounds = 0;
        // The follower's cell of its stream 9, read before the first write.
        let mut c = cell(9, consumed);
        while next <= sizes.len() {
            rounds += 1;
            assert!(rounds < 10_000);
            // Write as far as credit allows.
            while next <= sizes.len() {
                let bytes = entry(next as Index, sizes[next - 1]);
                let Some(at) = cur.place(sizes[next - 1], consumed) else {
                    break;
                };
                if let Some(wr) = at.wrap_at {
                    let t = Token::write(TokenKind::Wrap, 3, next as Index);
                    w.on_write(1, t, geo.slot_offset(wr), &entry(next as Index, 0), c);
                }
                let t = Token::write(TokenKind::Entry, 3, next as Index);
                w.on_write(1, t, geo.slot_offset(at.slot), &bytes, c);
                next += 1;
            }
            let want = next <= sizes.len();
            let len = sizes.get(next - 1).copied();
            let began = w.check(1, sizes.len() as Index, len, c);
            assert_eq!(
                w.peers[1].stalled,
                want,
                "entry {next}: {:?} consumed {consumed} written {} span {}",
                w.peers[1],
                cur.written(),
                len.map(|l| geo.span(l)).unwrap_or(0)
            );
            if began {
                stalls += 1;
            }
            // The follower consumes half of what it has not consumed yet.
            consumed += (cur.written() - consumed).div_ceil(2);
            c = cell(9, consumed);
            w.check(1, sizes.len() as Index, len, c);
        }
        assert!(stalls >= 10, "the sizes make the leader stall: {stalls}");
        assert_eq!(w.next_index(1), Some(sizes.len() as Index + 1));
        assert!(!w.check(1, sizes.len() as Index, None, c));
    }

    #[test]
    fn counts_nothing_until_the_new_streams_cell_is_seen() {
        let geo = RingGeometry::new(64, 64).unwrap();
        let mut w = CreditWatch::new(geo);
        // The last cell read is of the old stream 4 (consumed 17, not the new start).
        let old = cell(4, 17);
        let t = Token::write(TokenKind::Entry, 2, 1);
        w.on_write(2, t, geo.slot_offset(0), &entry(1, 60 * 64), old);
        assert!(!w.check(2, 2, Some(60 * 64), old));
        // The new stream's first cell: nothing consumed, the ring nearly full.
        assert!(w.check(2, 2, Some(60 * 64), cell(5, 0)));
        // Counted once while it lasts; a clear forgets the stream.
        assert!(!w.check(2, 2, Some(60 * 64), cell(5, 0)));
        w.clear();
        assert_eq!(w.next_index(2), None);
    }
}
