//! The TCP fabric keeps the fence under load (issue 10, item 5): a deposed leader keeps
//! streaming ring writes while the follower revokes its permission. Once `set_writer`
//! has returned, no byte of the stream lands any more, and no write that did not land
//! completes Ok.

mod common;

use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent};
use ballot::layout::RING_OFFSET;
use ballot::NodeId;
use ballot_tcp::TcpFabric;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Each write fills its own 64-byte cell of the ring (`common::region` has 65536 slots of
/// 64 B); the stream uses the first `CELLS` cells, the new writer the ones after.
const CELL: usize = 64;
const CELLS: u64 = 1 << 15;
/// Writes that must have landed before the fence, and posted after it.
const BEFORE: u64 = 500;
const AFTER: u64 = 2000;
/// The stream also runs at least this long after the fence.
const AFTER_TIME: Duration = Duration::from_millis(100);
/// Posted and not completed, at most (keeps writes in flight at the fence, bounded).
const WINDOW: u64 = 256;

fn cell_at(k: u64) -> usize {
    RING_OFFSET + k as usize * CELL
}

/// Write `k`'s bytes: eight copies of a word carrying `k` (never zero).
fn pattern(k: u64) -> [u8; CELL] {
    let w = ((0x00BA_1107u64 << 40) | k).to_le_bytes();
    let mut b = [0; CELL];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&w);
    }
    b
}

/// The leader's side: streams writes `0..CELLS` to `to` until `stop`, flushing every few
/// posts and keeping at most `WINDOW` outstanding; then waits for every completion.
/// Publishes in `posted` how many writes were posted, before flushing them.
/// Returns the result of each write, by token.
fn stream(
    f: &mut TcpFabric,
    to: NodeId,
    posted: &AtomicU64,
    stop: &AtomicBool,
) -> Vec<Option<Result<(), FabricError>>> {
    let mut results = vec![None; CELLS as usize];
    let (mut next, mut done) = (0u64, 0u64);
    let mut evs = Vec::new();
    let deadline = Instant::now() + WAIT * 3;
    while done < next || (next < CELLS && !stop.load(Ordering::Acquire)) {
        assert!(Instant::now() < deadline, "stream stalled at {done}/{next}");
        if !stop.load(Ordering::Acquire) {
            for _ in 0..8 {
                if next == CELLS || next - done >= WINDOW {
                    break;
                }
                f.write(to, cell_at(next), &pattern(next), next).unwrap();
                next += 1;
            }
            posted.store(next, Ordering::Release);
            f.flush().unwrap();
        }
        evs.clear();
        if f.poll(&mut evs) == 0 {
            f.wait_for_events(Duration::from_millis(1));
        }
        for e in &evs {
            if let FabricEvent::Completion(Completion::Write {
                peer,
                token,
                result,
            }) = e
            {
                assert_eq!(*peer, to);
                assert!(results[*token as usize].replace(result.clone()).is_none());
                done += 1;
            }
        }
    }
    results
}

/// Node 0 (deposed leader) streams into node 1; node 1 fences it with `set_writer(grant)`.
fn fence_under_stream(grant: Option<NodeId>) {
    let mut f = cluster(3);
    f[1].set_writer(Some(0)).unwrap();
    let mut leader = f.remove(0);
    let (posted, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let ring = |f: &TcpFabric| read_region(f.region(), cell_at(0), CELLS as usize * CELL);
    let (results, snapshot, fence_at) = std::thread::scope(|s| {
        let leader = s.spawn(|| stream(&mut leader, 1, &posted, &stop));
        let follower = &mut f[0];
        // Fence in the middle of the stream, with writes landing.
        wait_until("the first writes to land", || {
            read_region(follower.region(), cell_at(BEFORE), CELL) != [0; CELL]
        });
        follower.set_writer(grant).unwrap();
        // The leader publishes `posted` before flushing: every write from index
        // `fence_at` on was flushed after set_writer returned.
        let fence_at = posted.load(Ordering::Acquire);
        let snapshot = ring(follower);
        let t = Instant::now();
        wait_until("the stream to go on after the fence", || {
            let p = posted.load(Ordering::Acquire);
            p == CELLS || (p >= fence_at + AFTER && t.elapsed() >= AFTER_TIME)
        });
        stop.store(true, Ordering::Release);
        (leader.join().unwrap(), snapshot, fence_at)
    });
    let follower = &f[0];
    let posted = posted.into_inner();

    // (a) Nothing landed after the fence returned.
    let after = ring(follower);
    if let Some(k) =
        (0..CELLS as usize).find(|&k| after[k * CELL..][..CELL] != snapshot[k * CELL..][..CELL])
    {
        panic!("cell {k} changed after the fence returned");
    }

    // Every cell of the snapshot is empty or holds exactly its own write's bytes.
    let landed: Vec<bool> = snapshot
        .chunks(CELL)
        .enumerate()
        .map(|(k, c)| {
            let k = k as u64;
            assert!(
                c == [0; CELL] || c == pattern(k),
                "cell {k} holds bytes of no single write"
            );
            assert!(
                c == [0; CELL] || k < posted,
                "cell {k} written but never posted"
            );
            c != [0; CELL]
        })
        .collect();
    let n_landed = landed.iter().filter(|&&l| l).count() as u64;
    // One connection, applied in order: the landed writes are a prefix of the stream.
    assert!(
        landed[..n_landed as usize].iter().all(|&l| l),
        "landed writes are not a prefix"
    );
    assert!(
        n_landed > BEFORE,
        "the fence came before {BEFORE} writes landed"
    );
    assert!(
        n_landed <= fence_at,
        "{n_landed} writes landed, but only {fence_at} had been posted when the fence returned"
    );

    // (b) Ok exactly for the writes whose bytes are in the snapshot; every other write
    // failed with PermissionDenied (or Disconnected, had the connection dropped).
    for k in 0..posted {
        let r = results[k as usize]
            .clone()
            .expect("every posted write completes");
        if landed[k as usize] {
            assert_eq!(r, Ok(()), "write {k} landed");
        } else {
            assert!(
                matches!(
                    r,
                    Err(FabricError::PermissionDenied(1) | FabricError::Disconnected(1))
                ),
                "write {k} did not land but completed with {r:?}"
            );
        }
    }
    assert!(
        posted - fence_at >= AFTER.min(CELLS - fence_at),
        "only {} writes were posted after the fence",
        posted - fence_at
    );
    eprintln!(
        "fence {grant:?}: {posted} writes, {n_landed} landed before the fence, {} posted before \
         it and refused, {} posted after it (all refused)",
        fence_at - n_landed,
        posted - fence_at
    );

    // The node granted (if any) writes, and its bytes land.
    if let Some(w) = grant {
        let mut f = f;
        let w = w as usize - 1; // index in `f` after node 0 was removed
        let at = cell_at(CELLS);
        f[w].write(1, at, &pattern(CELLS), 7).unwrap();
        f[w].flush().unwrap();
        assert_eq!(wait_write(&mut f[w], 1, 7), Ok(()));
        assert_eq!(read_region(f[0].region(), at, CELL), pattern(CELLS));
    }
}

#[test]
fn revoking_stops_a_stream_of_writes() {
    fence_under_stream(None);
}

#[test]
fn granting_another_node_stops_a_stream_of_writes() {
    fence_under_stream(Some(2));
}
