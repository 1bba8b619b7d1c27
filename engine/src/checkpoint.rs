//! Checkpoints: what the driver needs to snapshot the state machine, keep checkpoints,
//! truncate the log behind them, and ship them to a replica that is too far behind.
//!
//! - A [`StateMachine`](crate::driver::StateMachine) that supports checkpoints returns a
//!   frozen [`CheckpointSource`] of its state (cheap: a copy or a persistent structure),
//!   which a [`Checkpoints`] store serializes **in the background** while applying goes on.
//! - A checkpoint travels between replicas as its *image*: the bytes the store keeps (for
//!   files, the snapshot file verbatim, with its chunk checksums and trailer), pulled in
//!   chunks by offset, so a transfer resumes where it stopped and the receiver holds at most
//!   one chunk in memory.
//! - [`MemCheckpoints`] keeps images in memory (the simulator, volatile tests); the node
//!   uses the file store of [`crate::storage`].

use crate::types::{Ballot, Index};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// A frozen copy of a state machine's state, written out on another thread.
pub trait CheckpointSource: Send {
    /// Writes the state; what [`StateMachine::restore`](crate::driver::StateMachine::restore)
    /// reads back. Called once, on the store's thread.
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()>;
}

/// A complete checkpoint in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointInfo {
    /// The last log index the checkpoint includes.
    pub index: Index,
    /// Bytes of its image.
    pub len: u64,
}

/// Where a replica keeps its checkpoints.
///
/// Contract:
/// - `save` starts writing one checkpoint (at most one at a time); `poll_saved` reports it
///   once it is complete (durable, for a durable store) and listed by `latest`.
/// - `read_image(index, offset, buf)` reads the image of a listed checkpoint; 0 at its end.
/// - `receive(index, offset, data)` stages an incoming image: offset 0 starts over, other
///   offsets must continue the staged bytes exactly. `receive_finish` verifies the staged
///   image end to end and makes it a listed checkpoint (durably, for a durable store), or
///   fails and discards it.
/// - `retain(keep)` deletes all but the newest `keep` and returns the oldest kept index:
///   the log may be truncated up to it.
/// - `open(index)` streams a listed checkpoint's state back, verified, for
///   [`StateMachine::restore`](crate::driver::StateMachine::restore).
pub trait Checkpoints: Send {
    /// Starts writing the checkpoint of the state after `index` (applied in `ballot`).
    fn save(
        &mut self,
        index: Index,
        ballot: Ballot,
        src: Box<dyn CheckpointSource>,
    ) -> io::Result<()>;
    /// The outcome of the save in progress, once it has finished.
    fn poll_saved(&mut self) -> Option<io::Result<CheckpointInfo>>;
    /// The newest listed checkpoint.
    fn latest(&self) -> Option<CheckpointInfo>;
    /// The listed checkpoint at `index`, if kept.
    fn get(&self, index: Index) -> Option<CheckpointInfo>;
    /// Reads image bytes of a listed checkpoint at `offset`; returns 0 at its end.
    fn read_image(&mut self, index: Index, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Stages image bytes received from a peer (offset 0 starts over).
    fn receive(&mut self, index: Index, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Verifies a staged image of `len` bytes and lists it, or discards it.
    fn receive_finish(&mut self, index: Index, len: u64) -> io::Result<CheckpointInfo>;
    /// Keeps the newest `keep` checkpoints; returns the oldest kept index.
    fn retain(&mut self, keep: usize) -> io::Result<Option<Index>>;
    /// Streams a listed checkpoint's state back, verified.
    fn open(&mut self, index: Index) -> io::Result<Box<dyn Read + '_>>;
}

/// When the driver takes checkpoints, and how it serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointPolicy {
    /// Take a checkpoint after this many bytes of applied log (0: only on request).
    pub every_bytes: u64,
    /// Checkpoints kept; the log is truncated behind the oldest.
    pub keep: usize,
    /// Image bytes per chunk sent to a catching-up replica.
    pub chunk_bytes: usize,
    /// Catch-up bandwidth cap: image bytes served per tick, across all pullers.
    pub serve_bytes_per_tick: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_bytes: 64 << 20,
            keep: 2,
            chunk_bytes: 64 << 10,
            serve_bytes_per_tick: 64 << 10,
        }
    }
}

/// Image framing of [`MemCheckpoints`]: `len u64 | crc32c u32 | data`.
const MEM_HEADER: usize = 12;

fn mem_image(data: &[u8]) -> Vec<u8> {
    let mut img = Vec::with_capacity(MEM_HEADER + data.len());
    img.extend_from_slice(&(data.len() as u64).to_le_bytes());
    img.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    img.extend_from_slice(data);
    img
}

fn mem_verify(img: &[u8]) -> io::Result<&[u8]> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if img.len() < MEM_HEADER {
        return Err(bad("checkpoint image shorter than its header"));
    }
    let len = u64::from_le_bytes(img[0..8].try_into().unwrap());
    let crc = u32::from_le_bytes(img[8..12].try_into().unwrap());
    let data = &img[MEM_HEADER..];
    if len != data.len() as u64 {
        return Err(bad("checkpoint image length mismatch"));
    }
    if crc32c::crc32c(data) != crc {
        return Err(bad("checkpoint image checksum mismatch"));
    }
    Ok(data)
}

/// Checkpoints in memory, saved synchronously (deterministic: the simulator's store).
#[derive(Debug, Default, Clone)]
pub struct MemCheckpoints {
    images: BTreeMap<Index, Vec<u8>>,
    saved: Option<io::ErrorKind>,
    saved_info: Option<CheckpointInfo>,
    staging: Option<(Index, Vec<u8>)>,
}

impl MemCheckpoints {
    fn info(&self, index: Index) -> Option<CheckpointInfo> {
        self.images.get(&index).map(|i| CheckpointInfo {
            index,
            len: i.len() as u64,
        })
    }
    fn missing(index: Index) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no checkpoint at index {index}"),
        )
    }
}

impl Checkpoints for MemCheckpoints {
    fn save(
        &mut self,
        index: Index,
        _ballot: Ballot,
        mut src: Box<dyn CheckpointSource>,
    ) -> io::Result<()> {
        let mut data = Vec::new();
        match src.write_to(&mut data) {
            Ok(()) => {
                self.images.insert(index, mem_image(&data));
                self.saved_info = self.info(index);
            }
            Err(e) => self.saved = Some(e.kind()),
        }
        Ok(())
    }
    fn poll_saved(&mut self) -> Option<io::Result<CheckpointInfo>> {
        if let Some(k) = self.saved.take() {
            return Some(Err(io::Error::new(k, "checkpoint save failed")));
        }
        self.saved_info.take().map(Ok)
    }
    fn latest(&self) -> Option<CheckpointInfo> {
        self.images.keys().next_back().and_then(|&i| self.info(i))
    }
    fn get(&self, index: Index) -> Option<CheckpointInfo> {
        self.info(index)
    }
    fn read_image(&mut self, index: Index, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let img = self
            .images
            .get(&index)
            .ok_or_else(|| Self::missing(index))?;
        let at = (offset as usize).min(img.len());
        let n = buf.len().min(img.len() - at);
        buf[..n].copy_from_slice(&img[at..at + n]);
        Ok(n)
    }
    fn receive(&mut self, index: Index, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset == 0 {
            self.staging = Some((index, Vec::new()));
        }
        match &mut self.staging {
            Some((i, buf)) if *i == index && buf.len() as u64 == offset => {
                buf.extend_from_slice(data);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("checkpoint chunk at {index}/{offset} does not continue the staged image"),
            )),
        }
    }
    fn receive_finish(&mut self, index: Index, len: u64) -> io::Result<CheckpointInfo> {
        let Some((i, img)) = self.staging.take() else {
            return Err(Self::missing(index));
        };
        if i != index || img.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "staged checkpoint incomplete",
            ));
        }
        mem_verify(&img)?;
        self.images.insert(index, img);
        Ok(self.info(index).expect("just inserted"))
    }
    fn retain(&mut self, keep: usize) -> io::Result<Option<Index>> {
        while self.images.len() > keep.max(1) {
            let first = *self.images.keys().next().unwrap();
            self.images.remove(&first);
        }
        Ok(self.images.keys().next().copied())
    }
    fn open(&mut self, index: Index) -> io::Result<Box<dyn Read + '_>> {
        let img = self
            .images
            .get(&index)
            .ok_or_else(|| Self::missing(index))?;
        Ok(Box::new(mem_verify(img)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(Vec<u8>);
    impl CheckpointSource for Bytes {
        fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
            w.write_all(&self.0)
        }
    }

    #[test]
    fn mem_store_round_trip_transfer_and_retain() {
        let mut a = MemCheckpoints::default();
        a.save(5, Ballot(1), Box::new(Bytes(b"hello".to_vec())))
            .unwrap();
        assert_eq!(a.poll_saved().unwrap().unwrap().index, 5);
        let info = a.latest().unwrap();
        let mut b = MemCheckpoints::default();
        let mut off = 0;
        let mut buf = [0u8; 4];
        loop {
            let n = a.read_image(5, off, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.receive(5, off, &buf[..n]).unwrap();
            off += n as u64;
        }
        assert!(b.receive(5, off + 1, b"x").is_err(), "gap refused");
        b.receive_finish(5, info.len).unwrap();
        let mut s = String::new();
        b.open(5).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        // A flipped byte fails verification.
        b.receive(6, 0, &{
            let mut img = mem_image(b"world");
            img[13] ^= 1;
            img
        })
        .unwrap();
        assert!(b.receive_finish(6, 17).is_err());
        b.save(9, Ballot(1), Box::new(Bytes(vec![1]))).unwrap();
        assert_eq!(b.retain(1).unwrap(), Some(9));
        assert!(b.open(5).is_err());
    }
}
