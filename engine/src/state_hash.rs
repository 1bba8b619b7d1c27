//! Portable 64-bit hashes for a replicated state's digest: an order-independent sum of one
//! hash per item, kept up to date as the state changes, so replicas (and their checkpoints)
//! can be compared in O(1). Specified (XXH3 and splitmix64's finalizer), so equal states
//! give equal digests on every platform and build.

/// splitmix64's finalizer: a bijective 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of one item of a state (a key and its value, a session's stored result): XXH3 of
/// `head` seeded by the tag, then of `body` seeded by that and `head`'s length (so that no
/// other split of the same bytes collides). Was CRC-32C, four calls per item: its fixed
/// cost per call made the digest's upkeep the largest cost of a replica's thread under a
/// put load (profiled with `perf` on `ballot-bench --topology processes`).
pub fn item_hash(tag: u8, head: &[u8], body: &[u8]) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let h = xxh3_64_with_seed(head, u64::from(tag));
    xxh3_64_with_seed(body, h ^ (head.len() as u64).rotate_left(32))
}

/// Hash of an item made of words only (a session's header): no byte hashing.
pub fn words_hash(tag: u8, words: &[u64]) -> u64 {
    words.iter().fold(mix(u64::from(tag)), |h, &w| mix(h ^ w))
}
