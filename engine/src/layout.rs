//! The memory plane's byte layout, defined once for every fabric.
//!
//! A replica's **region** is a 4 KiB header followed by the **ring**. Peers write into it
//! (one-sided on RDMA, as frames on TCP, as memcpy in `MemFabric`), so everything here is a
//! plain little-endian byte layout, and every decoder is total: any byte string yields a
//! value or a typed error, never a panic.
//!
//! ```text
//! header  0    magic u64 | version u32 | node u32 | cluster u64 | slots u32 | slot_size u32
//!         64   commit cell   {commit u64, ballot u64, check u64}          (leader writes)
//!         128  heartbeat u64                                                (owner writes)
//!         192  progress cell per node id, 64 B each                         (peer p writes cell p)
//! ring    4096 slots * slot_size
//! entry   header(40) | payload(len) | pad to 8 | seal u64 (= index)
//! ```

use crate::types::{Ballot, Index, NodeId, MAX_NODES};

/// First word of every region header ("BALLOT01"): a region that does not start with it is
/// not one.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BALLOT01");
/// Version of this byte layout, checked on decode; bump it with any change to the bytes.
pub const LAYOUT_VERSION: u32 = 1;

/// Size of the region header (one page): the ring starts after it.
pub const HEADER_SIZE: usize = 4096;
/// Offset of the [`CommitCell`] in the header.
pub const COMMIT_CELL_OFFSET: usize = 64;
/// Encoded size of the [`CommitCell`] (two words and a check word).
pub const COMMIT_CELL_SIZE: usize = 24;
/// Offset of the owner's heartbeat word: a counter a leader advances and its followers read
/// (one-sided) to tell that it is alive.
pub const HEARTBEAT_OFFSET: usize = 128;
/// Offset of the first [`ProgressCell`]; node `p`'s cell is at [`progress_offset`]`(p)`.
pub const PROGRESS_OFFSET: usize = 192;
/// Room per progress cell (a cache line).
pub const PROGRESS_CELL_SIZE: usize = 64;
/// Encoded size of a [`ProgressCell`] (six words and a check word).
pub const PROGRESS_ENCODED: usize = 56;
/// Offset of slot 0 of the ring.
pub const RING_OFFSET: usize = HEADER_SIZE;

/// Encoded size of an [`EntryHeader`] (checksum included).
pub const ENTRY_HEADER_SIZE: usize = 40;
/// Size of the seal word that ends every entry (it repeats the index).
pub const SEAL_SIZE: usize = 8;
/// Largest payload one entry may carry. Entries up to this size span several slots.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Smallest slot: a wrap marker (header + seal) must fit in one.
pub const MIN_SLOT_SIZE: usize = 64;

const CHECK_KEY: u64 = 0x9E37_79B9_7F4A_7C15;

const _: () = assert!(PROGRESS_OFFSET + MAX_NODES * PROGRESS_CELL_SIZE <= HEADER_SIZE);
const _: () = assert!(ENTRY_HEADER_SIZE + SEAL_SIZE <= MIN_SLOT_SIZE);

/// Entry flags.
pub mod flags {
    /// Not a log entry: the reader moves to slot 0 and reads the same index there.
    pub const WRAP: u32 = 1;
    /// A no-op filler proposed by a new leader for an index nobody accepted a value for.
    pub const NOOP: u32 = 2;
    /// Every flag this version understands; any other bit makes an entry invalid.
    pub const KNOWN: u32 = WRAP | NOOP;
}

/// Why bytes do not decode as a layout structure. Every decoder returns one of these rather
/// than panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutError {
    /// Fewer bytes than the structure needs.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The length field exceeds [`MAX_PAYLOAD`] or the ring.
    BadLength(u64),
    /// The seal does not repeat the index: the entry is not (yet) completely written.
    BadSeal {
        /// The index the entry header carries.
        index: Index,
        /// The seal word found.
        seal: u64,
    },
    /// Bytes changed after the writer computed the checksum.
    BadChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The entry carries flags outside [`flags::KNOWN`].
    UnknownFlags(u32),
    /// The region header does not start with [`MAGIC`].
    BadMagic(u64),
    /// The region header has another [`LAYOUT_VERSION`].
    BadVersion(u32),
    /// The ring geometry is not one [`RingGeometry::new`] accepts.
    BadGeometry {
        /// Slots asked for.
        slots: u32,
        /// Slot size asked for.
        slot_size: u32,
    },
    /// A cell's check word does not match: torn or never written.
    TornCell,
    /// An access outside the region.
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Its length.
        len: usize,
        /// The region's size.
        size: usize,
    },
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { need, have } => {
                write!(f, "truncated: need {need} bytes, have {have}")
            }
            Self::BadLength(l) => write!(f, "entry length {l} exceeds the limit"),
            Self::BadSeal { index, seal } => write!(f, "seal {seal} does not match index {index}"),
            Self::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            Self::UnknownFlags(x) => write!(f, "unknown entry flags {x:#x}"),
            Self::BadMagic(m) => write!(f, "bad region magic {m:#018x}"),
            Self::BadVersion(v) => write!(f, "unsupported layout version {v}"),
            Self::BadGeometry { slots, slot_size } => {
                write!(f, "bad ring geometry: {slots} slots of {slot_size} bytes")
            }
            Self::TornCell => write!(f, "cell check word mismatch"),
            Self::OutOfBounds { offset, len, size } => {
                write!(f, "range {offset}+{len} outside region of {size} bytes")
            }
        }
    }
}
impl std::error::Error for LayoutError {}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The ring's shape: `slots` slots of `slot_size` bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingGeometry {
    /// Number of slots (at least 4).
    pub slots: u32,
    /// Bytes per slot (a power of two, at least [`MIN_SLOT_SIZE`]).
    pub slot_size: u32,
}

impl RingGeometry {
    /// Checks the shape: `slot_size` a power of two of at least [`MIN_SLOT_SIZE`], at least
    /// 4 slots, and a ring of at most 1 TiB.
    pub fn new(slots: u32, slot_size: u32) -> Result<Self, LayoutError> {
        let g = Self { slots, slot_size };
        let ok = slot_size as usize >= MIN_SLOT_SIZE
            && slot_size.is_power_of_two()
            && slots >= 4
            && g.ring_bytes() <= 1 << 40;
        if ok {
            Ok(g)
        } else {
            Err(LayoutError::BadGeometry { slots, slot_size })
        }
    }
    /// Bytes of the ring alone.
    pub fn ring_bytes(&self) -> usize {
        self.slots as usize * self.slot_size as usize
    }
    /// Bytes of the whole region: header and ring.
    pub fn region_bytes(&self) -> usize {
        RING_OFFSET + self.ring_bytes()
    }
    /// Slots an entry of `payload` bytes occupies.
    pub fn span(&self, payload: usize) -> u32 {
        entry_size(payload).div_ceil(self.slot_size as usize) as u32
    }
    /// Offset of `slot` in the region (`slot < slots`).
    pub fn slot_offset(&self, slot: u32) -> usize {
        debug_assert!(slot < self.slots);
        RING_OFFSET + slot as usize * self.slot_size as usize
    }
    /// Largest payload an entry can carry in this ring (it must leave room for a wrap marker
    /// and never need more than half the ring, so that flow control always makes progress).
    pub fn max_payload(&self) -> usize {
        let half = (self.slots / 2) as usize * self.slot_size as usize;
        (half - ENTRY_HEADER_SIZE - SEAL_SIZE).min(MAX_PAYLOAD) / 8 * 8
    }
}

/// Bytes an entry with `payload` bytes occupies: header, payload padded to 8, seal.
pub fn entry_size(payload: usize) -> usize {
    ENTRY_HEADER_SIZE + payload.div_ceil(8) * 8 + SEAL_SIZE
}

/// The decoded fixed part of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryHeader {
    /// The log index; also repeated in the seal.
    pub index: Index,
    /// The ballot this entry was accepted in (the leader's).
    pub ballot: Ballot,
    /// The leader's commit index when it wrote this entry (piggybacked).
    pub commit: Index,
    /// Payload bytes (at most [`MAX_PAYLOAD`]).
    pub len: u32,
    /// [`flags`] bits.
    pub flags: u32,
}

/// Completes an entry whose payload was written in place: `buf` holds
/// `ENTRY_HEADER_SIZE` bytes of room followed by exactly `h.len` payload bytes. Fills the
/// header, pads, appends the seal and the checksum.
pub fn seal_entry(buf: &mut Vec<u8>, h: &EntryHeader) {
    let len = h.len as usize;
    assert_eq!(buf.len(), ENTRY_HEADER_SIZE + len, "header room + payload");
    assert!(len <= MAX_PAYLOAD, "payload over MAX_PAYLOAD");
    buf.resize(entry_size(len), 0);
    seal_entry_in_place(buf, h);
}

/// [`seal_entry`] of an entry already at its full size: `buf` is [`entry_size`]`(h.len)`
/// bytes, the payload written behind the header's room and the padding after it zero
/// (an entry built in its exact-size, shareable buffer).
pub fn seal_entry_in_place(buf: &mut [u8], h: &EntryHeader) {
    let len = h.len as usize;
    assert!(len <= MAX_PAYLOAD, "payload over MAX_PAYLOAD");
    assert_eq!(buf.len(), entry_size(len), "a whole entry");
    buf[0..8].copy_from_slice(&h.index.to_le_bytes());
    buf[8..16].copy_from_slice(&h.ballot.0.to_le_bytes());
    buf[16..24].copy_from_slice(&h.commit.to_le_bytes());
    buf[24..28].copy_from_slice(&h.len.to_le_bytes());
    buf[28..32].copy_from_slice(&h.flags.to_le_bytes());
    buf[32..40].fill(0);
    let sum = entry_checksum(
        &buf[..ENTRY_HEADER_SIZE],
        &buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + len],
    );
    buf[32..36].copy_from_slice(&sum.to_le_bytes());
    let seal = buf.len() - SEAL_SIZE;
    buf[seal..].copy_from_slice(&h.index.to_le_bytes());
}

/// Writes a complete entry into `out` (cleared first). `out.len()` becomes [`entry_size`].
pub fn encode_entry(out: &mut Vec<u8>, h: &EntryHeader, payload: &[u8]) {
    assert_eq!(
        h.len as usize,
        payload.len(),
        "header length must match the payload"
    );
    assert!(payload.len() <= MAX_PAYLOAD, "payload over MAX_PAYLOAD");
    out.clear();
    out.reserve(entry_size(payload.len()));
    out.extend_from_slice(&h.index.to_le_bytes());
    out.extend_from_slice(&h.ballot.0.to_le_bytes());
    out.extend_from_slice(&h.commit.to_le_bytes());
    out.extend_from_slice(&h.len.to_le_bytes());
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // checksum + reserved, filled below
    out.extend_from_slice(payload);
    out.resize(ENTRY_HEADER_SIZE + payload.len().div_ceil(8) * 8, 0);
    out.extend_from_slice(&h.index.to_le_bytes());
    let sum = entry_checksum(&out[..ENTRY_HEADER_SIZE], payload);
    out[32..36].copy_from_slice(&sum.to_le_bytes());
    debug_assert_eq!(out.len(), entry_size(payload.len()));
}

fn entry_checksum(header: &[u8], payload: &[u8]) -> u32 {
    // Everything but the checksum field itself.
    let c = crc32c::crc32c(&header[..32]);
    let c = crc32c::crc32c_append(c, &header[36..40]);
    crc32c::crc32c_append(c, payload)
}

/// Decodes the entry at the start of `bytes` (which may be longer), checking seal and checksum.
/// Returns the header and the payload slice.
pub fn decode_entry(bytes: &[u8]) -> Result<(EntryHeader, &[u8]), LayoutError> {
    let have = bytes.len();
    if have < ENTRY_HEADER_SIZE + SEAL_SIZE {
        return Err(LayoutError::Truncated {
            need: ENTRY_HEADER_SIZE + SEAL_SIZE,
            have,
        });
    }
    let len = rd_u32(bytes, 24) as usize;
    if len > MAX_PAYLOAD {
        return Err(LayoutError::BadLength(len as u64));
    }
    let total = entry_size(len);
    if have < total {
        return Err(LayoutError::Truncated { need: total, have });
    }
    let index = rd_u64(bytes, 0);
    let seal = rd_u64(bytes, total - SEAL_SIZE);
    if seal != index {
        return Err(LayoutError::BadSeal { index, seal });
    }
    let payload = &bytes[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + len];
    let stored = rd_u32(bytes, 32);
    let computed = entry_checksum(&bytes[..ENTRY_HEADER_SIZE], payload);
    if stored != computed {
        return Err(LayoutError::BadChecksum { stored, computed });
    }
    let flags = rd_u32(bytes, 28);
    if flags & !flags::KNOWN != 0 {
        return Err(LayoutError::UnknownFlags(flags));
    }
    let h = EntryHeader {
        index,
        ballot: Ballot(rd_u64(bytes, 8)),
        commit: rd_u64(bytes, 16),
        len: len as u32,
        flags,
    };
    Ok((h, payload))
}

/// Flags and payload of an entry that was already verified by [`decode_entry`] (e.g. one
/// held in the accepted log), without checking it again.
pub fn trusted_parts(bytes: &[u8]) -> (u32, &[u8]) {
    let len = rd_u32(bytes, 24) as usize;
    (
        rd_u32(bytes, 28),
        &bytes[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + len],
    )
}

/// Reads only the length field of an entry that may still be arriving, to know how many
/// bytes to look at. `None` when fewer than a header's bytes are given.
pub fn peek_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= ENTRY_HEADER_SIZE).then(|| rd_u32(bytes, 24) as usize)
}

/// Index and ballot of an entry that may still be arriving (unchecked: validate with
/// [`decode_entry`]), to tell whether it belongs to the stream being read. `None` when
/// fewer than a header's bytes are given.
pub fn peek_stream(bytes: &[u8]) -> Option<(Index, Ballot)> {
    (bytes.len() >= ENTRY_HEADER_SIZE).then(|| (rd_u64(bytes, 0), Ballot(rd_u64(bytes, 8))))
}

/// Offset of the seal word from the start of an entry with `payload` bytes.
pub fn seal_offset(payload: usize) -> usize {
    entry_size(payload) - SEAL_SIZE
}

/// Static description of a region, stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The cluster id: fabrics refuse peers of another cluster.
    pub cluster: u64,
    /// The replica owning this region.
    pub node: NodeId,
    /// The ring's shape, equal on every replica of a cluster.
    pub ring: RingGeometry,
}

/// The first 32 bytes of a region header.
pub fn encode_region_info(info: &RegionInfo) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&u32::from(info.node).to_le_bytes());
    b[16..24].copy_from_slice(&info.cluster.to_le_bytes());
    b[24..28].copy_from_slice(&info.ring.slots.to_le_bytes());
    b[28..32].copy_from_slice(&info.ring.slot_size.to_le_bytes());
    b
}

/// Decodes and validates a region header (magic, version, node id, geometry).
pub fn decode_region_info(b: &[u8]) -> Result<RegionInfo, LayoutError> {
    if b.len() < 32 {
        return Err(LayoutError::Truncated {
            need: 32,
            have: b.len(),
        });
    }
    let magic = rd_u64(b, 0);
    if magic != MAGIC {
        return Err(LayoutError::BadMagic(magic));
    }
    let version = rd_u32(b, 8);
    if version != LAYOUT_VERSION {
        return Err(LayoutError::BadVersion(version));
    }
    let node = rd_u32(b, 12);
    if node as usize >= MAX_NODES {
        return Err(LayoutError::BadLength(node as u64));
    }
    Ok(RegionInfo {
        node: node as NodeId,
        cluster: rd_u64(b, 16),
        ring: RingGeometry::new(rd_u32(b, 24), rd_u32(b, 28))?,
    })
}

/// The leader's commit index, written into followers' headers when no entry carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitCell {
    /// Highest committed index the leader knows.
    pub commit: Index,
    /// The leader's ballot: a follower ignores a cell of a ballot other than its promise.
    pub ballot: Ballot,
}

impl CommitCell {
    /// The bytes written into a follower's header, check word included.
    pub fn encode(&self) -> [u8; COMMIT_CELL_SIZE] {
        let mut b = [0u8; COMMIT_CELL_SIZE];
        b[0..8].copy_from_slice(&self.commit.to_le_bytes());
        b[8..16].copy_from_slice(&self.ballot.0.to_le_bytes());
        let check = self.commit ^ self.ballot.0.rotate_left(17) ^ CHECK_KEY;
        b[16..24].copy_from_slice(&check.to_le_bytes());
        b
    }
    /// `Ok(None)` for a never-written (all zero) cell.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, LayoutError> {
        if b.len() < COMMIT_CELL_SIZE {
            return Err(LayoutError::Truncated {
                need: COMMIT_CELL_SIZE,
                have: b.len(),
            });
        }
        if b[..COMMIT_CELL_SIZE].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let c = Self {
            commit: rd_u64(b, 0),
            ballot: Ballot(rd_u64(b, 8)),
        };
        if rd_u64(b, 16) != c.commit ^ c.ballot.0.rotate_left(17) ^ CHECK_KEY {
            return Err(LayoutError::TornCell);
        }
        Ok(Some(c))
    }
}

/// What a follower reports to its leader, written into the leader's header at the
/// follower's cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgressCell {
    /// The ballot this follower has promised; the leader ignores cells of other ballots.
    pub ballot: Ballot,
    /// Highest index received contiguously in this ballot.
    pub received: Index,
    /// Highest index durable (durable mode; equals `received` in volatile mode).
    pub persisted: Index,
    /// Highest index applied to the follower's state machine.
    pub applied: Index,
    /// Ring slots consumed in this stream: the flow-control credit.
    pub consumed_slots: u64,
    /// The follower's stream id: it changes whenever the follower restarts reading its ring
    /// at slot 0 (a promise, a restart, a resync), and cells of old streams are ignored.
    pub stream: u64,
}

impl ProgressCell {
    /// The bytes written into the leader's header, check word included.
    pub fn encode(&self) -> [u8; PROGRESS_ENCODED] {
        let mut b = [0u8; PROGRESS_ENCODED];
        let words = [
            self.ballot.0,
            self.received,
            self.persisted,
            self.applied,
            self.consumed_slots,
            self.stream,
        ];
        let mut check = CHECK_KEY;
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            check ^= w.rotate_left(7 * i as u32 + 1);
        }
        b[48..56].copy_from_slice(&check.to_le_bytes());
        b
    }
    /// `Ok(None)` for a never-written (all zero) cell; [`LayoutError::TornCell`] when the
    /// check word does not match (a write still landing).
    pub fn decode(b: &[u8]) -> Result<Option<Self>, LayoutError> {
        if b.len() < PROGRESS_ENCODED {
            return Err(LayoutError::Truncated {
                need: PROGRESS_ENCODED,
                have: b.len(),
            });
        }
        if b[..PROGRESS_ENCODED].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let w: [u64; 6] = std::array::from_fn(|i| rd_u64(b, i * 8));
        let mut check = CHECK_KEY;
        for (i, x) in w.iter().enumerate() {
            check ^= x.rotate_left(7 * i as u32 + 1);
        }
        if rd_u64(b, 48) != check {
            return Err(LayoutError::TornCell);
        }
        Ok(Some(Self {
            ballot: Ballot(w[0]),
            received: w[1],
            persisted: w[2],
            applied: w[3],
            consumed_slots: w[4],
            stream: w[5],
        }))
    }
}

/// Offset of `node`'s progress cell in a header. Panics if `node >= MAX_NODES`.
pub fn progress_offset(node: NodeId) -> usize {
    assert!((node as usize) < MAX_NODES);
    PROGRESS_OFFSET + node as usize * PROGRESS_CELL_SIZE
}

/// Where a remote write may land, and who may make it. Every fabric's receiving side asks
/// this before touching the region, so all fabrics enforce the same rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// The ring and commit cell: only the peer holding write permission.
    Ring,
    /// The writer's own progress cell: always allowed to that peer.
    OwnProgress,
}

/// Classifies a remote write from `from` of `len` bytes at `offset` into a region of
/// `region_len` bytes; `Err` when it is out of bounds or touches a part no peer may write.
pub fn classify_remote_write(
    from: NodeId,
    offset: usize,
    len: usize,
    region_len: usize,
) -> Result<WriteTarget, LayoutError> {
    let end = offset.checked_add(len);
    let oob = LayoutError::OutOfBounds {
        offset,
        len,
        size: region_len,
    };
    let end = match end {
        Some(e) if e <= region_len && len > 0 => e,
        _ => return Err(oob),
    };
    if (from as usize) < MAX_NODES {
        let cell = progress_offset(from);
        if offset >= cell && end <= cell + PROGRESS_CELL_SIZE {
            return Ok(WriteTarget::OwnProgress);
        }
    }
    if offset >= RING_OFFSET
        || (offset >= COMMIT_CELL_OFFSET && end <= COMMIT_CELL_OFFSET + COMMIT_CELL_SIZE)
    {
        return Ok(WriteTarget::Ring);
    }
    Err(oob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(index: Index, len: usize) -> EntryHeader {
        EntryHeader {
            index,
            ballot: Ballot::new(3, 1),
            commit: index - 1,
            len: len as u32,
            flags: 0,
        }
    }

    #[test]
    fn one_mib_entry_round_trips() {
        let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7) as u8).collect();
        let mut buf = Vec::new();
        encode_entry(&mut buf, &hdr(9, payload.len()), &payload);
        let (h, p) = decode_entry(&buf).unwrap();
        assert_eq!(h, hdr(9, payload.len()));
        assert_eq!(p, &payload[..]);
        let g = RingGeometry::new(1 << 16, 64).unwrap();
        assert!(g.max_payload() >= 1 << 20);
        assert_eq!(
            g.span(payload.len()) as usize,
            entry_size(payload.len()).div_ceil(64)
        );
    }

    #[test]
    fn remote_write_classes() {
        let size = RingGeometry::new(1 << 16, 64).unwrap().region_bytes();
        assert_eq!(
            classify_remote_write(2, progress_offset(2), PROGRESS_ENCODED, size),
            Ok(WriteTarget::OwnProgress)
        );
        assert!(classify_remote_write(2, progress_offset(3), PROGRESS_ENCODED, size).is_err());
        assert!(
            classify_remote_write(2, 0, 8, size).is_err(),
            "magic is never writable"
        );
        assert_eq!(
            classify_remote_write(2, RING_OFFSET, 64, size),
            Ok(WriteTarget::Ring)
        );
        assert!(classify_remote_write(2, size - 8, 16, size).is_err());
        assert!(classify_remote_write(2, usize::MAX, 16, size).is_err());
    }

    proptest! {
        #[test]
        fn entry_round_trip(index in 1u64.., round in 0u64..1<<40, node in 0u8..16,
                            commit in 0u64.., payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let h = EntryHeader { index, ballot: Ballot::new(round, node), commit,
                                  len: payload.len() as u32, flags: flags::NOOP };
            let mut buf = Vec::new();
            encode_entry(&mut buf, &h, &payload);
            let (d, p) = decode_entry(&buf).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn sealing_in_place_matches_encoding(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = hdr(7, payload.len());
            let mut a = Vec::new();
            encode_entry(&mut a, &h, &payload);
            let mut b = vec![0u8; ENTRY_HEADER_SIZE];
            b.extend_from_slice(&payload);
            seal_entry(&mut b, &h);
            prop_assert_eq!(&a, &b);
            // Built at its full size (zeroed) with the payload behind the header's room.
            let mut c = vec![0u8; entry_size(payload.len())];
            c[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + payload.len()].copy_from_slice(&payload);
            seal_entry_in_place(&mut c, &h);
            prop_assert_eq!(a, c);
        }

        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_entry(&bytes);
            let _ = decode_region_info(&bytes);
            let _ = CommitCell::decode(&bytes);
            let _ = ProgressCell::decode(&bytes);
            let _ = peek_len(&bytes);
        }

        #[test]
        fn corruption_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..300),
                                  at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            encode_entry(&mut buf, &hdr(5, payload.len()), &payload);
            let i = at.index(buf.len());
            buf[i] ^= 1 << bit;
            // A single flipped bit anywhere is an error, never a different valid entry
            // (flips in padding bytes are the one exception: they carry nothing).
            let pad = ENTRY_HEADER_SIZE + payload.len()..buf.len() - SEAL_SIZE;
            if !pad.contains(&i) {
                prop_assert!(decode_entry(&buf).is_err());
            }
        }

        #[test]
        fn cells_round_trip(b in any::<u64>(), r in any::<u64>(), p in any::<u64>(), a in any::<u64>(), c in any::<u64>(), s in any::<u64>()) {
            let cell = ProgressCell { ballot: Ballot(b), received: r, persisted: p, applied: a, consumed_slots: c, stream: s };
            if cell != ProgressCell::default() {
                prop_assert_eq!(ProgressCell::decode(&cell.encode()).unwrap(), Some(cell));
            }
            let cc = CommitCell { commit: r, ballot: Ballot(b) };
            if cc != CommitCell::default() {
                prop_assert_eq!(CommitCell::decode(&cc.encode()).unwrap(), Some(cc));
            }
        }
    }
}
