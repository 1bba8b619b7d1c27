//! What the allocation tests share: a counting global allocator (per thread and for the
//! whole process), a state machine that answers every command with 8 bytes, and three
//! replicas on an instant `MemFabric`.

use ballot::driver::{Replica, StateMachine, Storage};
use ballot::layout::{RegionInfo, RingGeometry};
use ballot::mem_fabric::{MemFabric, MemNet};
use ballot::protocol::{Config, Core};
use ballot::region::Region;
use ballot::Index;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts every allocation (and reallocation); a test binary installs it with
/// `#[global_allocator]`.
pub struct Counting;

static TOTAL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MINE: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    TOTAL.fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

/// Allocations made by this thread so far.
#[allow(dead_code)] // each test binary uses one of the two counts
pub fn thread_allocs() -> u64 {
    MINE.with(Cell::get)
}

/// Allocations made by every thread so far.
#[allow(dead_code)]
pub fn total_allocs() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Counts the commands; answers each with the count (8 bytes).
pub struct Tally(pub u64);
impl StateMachine for Tally {
    fn apply(&mut self, _: Index, _: &[u8], out: &mut Vec<u8>) {
        self.0 += 1;
        out.extend_from_slice(&self.0.to_le_bytes());
    }
}

/// Three replicas (ids 0, 1, 2) on one instant `MemFabric`, each configured by `setup`,
/// which may also give it storage (durable mode).
pub fn replicas(
    mut setup: impl FnMut(u8, &mut Config) -> Option<Box<dyn Storage>>,
) -> Vec<Replica<MemFabric, Tally>> {
    let ring = RingGeometry::new(1 << 14, 128).unwrap();
    let net = MemNet::instant();
    (0..3u8)
        .map(|i| {
            let region = Arc::new(
                Region::anonymous(RegionInfo {
                    cluster: 1,
                    node: i,
                    ring,
                })
                .unwrap(),
            );
            let mut cfg = Config::new(i, vec![0, 1, 2], ring, u64::from(i) + 1);
            let storage = setup(i, &mut cfg);
            Replica::new(
                Core::new(cfg, false).unwrap(),
                net.attach(i, region),
                Tally(0),
                storage,
            )
        })
        .collect()
}
