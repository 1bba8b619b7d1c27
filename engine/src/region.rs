//! A replica's region: memory that peers write into while the owner reads it.
//!
//! Remote writers (an RDMA NIC, the TCP fabric's receiver thread, the simulator) change these
//! bytes concurrently with the owner's reads, exactly as a NIC would. So the region is never
//! handed out as `&[u8]`: bytes are copied in and out through raw pointers, word cells are
//! accessed atomically, and readers validate what they copied (seal + checksum, cell check
//! words) instead of trusting the order in which bytes landed.

use crate::layout::{self, LayoutError, RegionInfo};
use memmap2::{MmapOptions, MmapRaw};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

/// A replica's registered memory: a header ([`RegionInfo`]), the commit and progress
/// cells, and the ring peers write entries into. Shared (`Arc<Region>`) between the owner
/// and the fabric that lands remote writes in it.
pub struct Region {
    map: MmapRaw,
    info: RegionInfo,
}

// SAFETY: the mapping is owned by the Region and unmapped only when it drops, whichever
// thread that is on; nothing in it is tied to the creating thread.
unsafe impl Send for Region {}
// SAFETY: shared access never forms a `&[u8]` or `&mut [u8]` over the mapping: bytes go in
// and out through bounds-checked raw-pointer copies and header words through atomics (see
// the module docs). Copies may overlap a concurrent writer's, exactly as with a NIC writing
// the memory; a torn copy is possible and every reader validates what it copied (seal +
// checksum, cell check words) before using it.
unsafe impl Sync for Region {}

impl Region {
    /// An anonymous, zeroed region for `info`, with its header written.
    pub fn anonymous(info: RegionInfo) -> std::io::Result<Region> {
        let map = MmapOptions::new()
            .len(info.ring.region_bytes())
            .map_anon()?;
        Ok(Self::init(MmapRaw::from(map), info))
    }

    /// A region over a caller-provided mapping (a file on DAX/persistent memory, huge pages).
    /// The mapping must be at least `info.ring.region_bytes()` long.
    pub fn from_mapping(map: MmapRaw, info: RegionInfo) -> Result<Region, LayoutError> {
        let need = info.ring.region_bytes();
        if map.len() < need {
            return Err(LayoutError::Truncated {
                need,
                have: map.len(),
            });
        }
        Ok(Self::init(map, info))
    }

    fn init(map: MmapRaw, info: RegionInfo) -> Region {
        let r = Region { map, info };
        r.write(0, &layout::encode_region_info(&info))
            .expect("header fits");
        r
    }

    /// The geometry this region was created with.
    pub fn info(&self) -> &RegionInfo {
        &self.info
    }
    /// Length in bytes (`info().ring.region_bytes()`).
    pub fn len(&self) -> usize {
        self.info.ring.region_bytes()
    }
    /// Never true for a region built by this module (the header alone is not empty).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Base address, for registering the memory with a NIC.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), LayoutError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(LayoutError::OutOfBounds {
                offset,
                len,
                size: self.len(),
            }),
        }
    }

    /// Copies `out.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), LayoutError> {
        self.check(offset, out.len())?;
        fence(Ordering::Acquire);
        // SAFETY: bounds checked; the source may change concurrently (NIC semantics) and
        // callers validate the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `len` bytes at `offset` into a new exact-size shared buffer (one allocation,
    /// one copy, no zeroing first): a follower keeps an entry read from its ring this way.
    pub fn read_shared(&self, offset: usize, len: usize) -> Result<Arc<[u8]>, LayoutError> {
        self.check(offset, len)?;
        fence(Ordering::Acquire);
        let mut buf = Arc::<[u8]>::new_uninit_slice(len);
        let dst = Arc::get_mut(&mut buf).expect("not shared yet");
        // SAFETY: bounds checked; `dst` is `len` bytes that nothing else references, and
        // the copy initializes every one of them before `assume_init`. The source may
        // change concurrently (NIC semantics): callers validate the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.as_ptr().add(offset),
                dst.as_mut_ptr().cast::<u8>(),
                len,
            );
            Ok(buf.assume_init())
        }
    }

    /// Lands `data` at `offset` (what a NIC does for a remote write), then publishes it.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), LayoutError> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked; see module docs on concurrent access.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        fence(Ordering::Release);
        Ok(())
    }

    fn cell(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= layout::HEADER_SIZE,
            "header word {offset}"
        );
        // SAFETY: aligned (page-aligned mapping + multiple of 8), in bounds, lives with self.
        unsafe { AtomicU64::from_ptr(self.as_ptr().add(offset) as *mut u64) }
    }

    /// Loads a header word (acquire). Panics if `offset` is not an aligned header word.
    pub fn load_word(&self, offset: usize) -> u64 {
        self.cell(offset).load(Ordering::Acquire)
    }
    /// Stores a header word (release). Panics if `offset` is not an aligned header word.
    pub fn store_word(&self, offset: usize, v: u64) {
        self.cell(offset).store(v, Ordering::Release)
    }

    /// Reads an aligned word anywhere in the region (a seal), `None` out of bounds.
    pub fn load_word_at(&self, offset: usize) -> Option<u64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len() {
            return None;
        }
        // SAFETY: aligned and in bounds.
        let a = unsafe { AtomicU64::from_ptr(self.as_ptr().add(offset) as *mut u64) };
        Some(a.load(Ordering::Acquire))
    }

    /// Zeroes the ring and the cells (a restart in volatile mode forgets everything).
    pub fn clear(&self) {
        let zeros = vec![0u8; self.len() - layout::COMMIT_CELL_OFFSET];
        self.write(layout::COMMIT_CELL_OFFSET, &zeros)
            .expect("in bounds");
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("info", &self.info).finish()
    }
}
