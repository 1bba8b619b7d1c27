//! [`FileCheckpoints`]: the [`Checkpoints`] store of durable (and volatile) nodes, over a
//! [`SnapshotStore`] directory (usually `<data dir>/checkpoints`).
//!
//! - `save` writes the [`CheckpointSource`] through a [`SnapshotWriter`](super::SnapshotWriter)
//!   on a background thread (one save at a time; a second `save` while one runs is an
//!   error). The file appears under its final name only once complete and `fsync`ed
//!   (write to `.ckpt.tmp`, `fsync`, rename, directory `fsync`). `poll_saved` reports the
//!   result without blocking.
//! - The list of complete checkpoints is cached: `latest` (called on the replication thread)
//!   never scans the directory.
//! - The **image** of a checkpoint is its snapshot file verbatim (header, checksummed chunks,
//!   trailer). `read_image` `pread`s it at an offset, keeping the file open between calls.
//! - `receive` stages an incoming image in `snap-<index>.ckpt.part`: offset 0 starts over,
//!   any other offset must equal the staged length. `receive_finish` `fsync`s the part file,
//!   verifies all of it (header, every chunk checksum, trailer, the index) and only then
//!   renames it to its snapshot name and `fsync`s the directory. A failed verification
//!   deletes the part file and returns an error naming the reason. Part files left by a
//!   crash are removed at `open`.

use super::snapshot::{snap_name, DEFAULT_CHUNK};
use super::{sync_dir, Result, SnapshotStore, StorageError};
use crate::checkpoint::{CheckpointInfo, CheckpointSource, Checkpoints};
use crate::types::{Ballot, Index};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Suffix of a staged (incoming) image.
const PART: &str = ".part";
/// Suffix given to a checkpoint set aside by [`FileCheckpoints::set_aside`].
const CORRUPT: &str = ".corrupt";

/// A background save in progress.
struct Saving {
    index: Index,
    done: Receiver<io::Result<CheckpointInfo>>,
    thread: Option<JoinHandle<()>>,
}

/// An incoming image being staged.
struct Staging {
    index: Index,
    path: PathBuf,
    file: File,
    len: u64,
}

/// Checkpoints as snapshot files in one directory. See the module documentation.
pub struct FileCheckpoints {
    store: Arc<SnapshotStore>,
    /// Complete checkpoints: index -> image bytes (the file's size).
    known: BTreeMap<Index, u64>,
    saving: Option<Saving>,
    /// The image last read by `read_image`, kept open.
    image: Option<(Index, File)>,
    staging: Option<Staging>,
    chunk_size: u32,
}

impl std::fmt::Debug for FileCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCheckpoints")
            .field("dir", &self.store.dir())
            .field("known", &self.known)
            .field("saving", &self.saving.as_ref().map(|s| s.index))
            .field("staging", &self.staging.as_ref().map(|s| (s.index, s.len)))
            .finish()
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn not_found(index: Index) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no checkpoint at index {index}"),
    )
}

impl FileCheckpoints {
    /// Opens (creating if needed) the directory, removes leftovers of unfinished saves and
    /// transfers, and lists the complete checkpoints (header and trailer verified).
    pub fn open(dir: impl AsRef<Path>) -> Result<FileCheckpoints> {
        let store = SnapshotStore::open(dir)?;
        let dir = store.dir().to_path_buf();
        super::remove_unfinished(&dir, PART, "unfinished checkpoint transfer")?;
        let mut c = FileCheckpoints {
            store: Arc::new(store),
            known: BTreeMap::new(),
            saving: None,
            image: None,
            staging: None,
            chunk_size: DEFAULT_CHUNK,
        };
        c.refresh()?;
        Ok(c)
    }

    /// Data bytes per snapshot chunk of checkpoints saved from now on (1 ..= 64 MiB).
    pub fn with_chunk_size(mut self, bytes: u32) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// The file of the checkpoint at `index` (whether or not it exists).
    pub fn path_of(&self, index: Index) -> PathBuf {
        self.store.path_of(index)
    }

    /// The complete checkpoints, oldest first (from the cache).
    pub fn list(&self) -> Vec<CheckpointInfo> {
        self.known
            .iter()
            .map(|(&index, &len)| CheckpointInfo { index, len })
            .collect()
    }

    /// Re-reads the directory into the cache (leaving out a save still in flight).
    fn refresh(&mut self) -> Result<()> {
        let in_flight = self.saving.as_ref().map(|s| s.index);
        let mut known = BTreeMap::new();
        for m in self.store.list()? {
            if Some(m.index) == in_flight {
                continue;
            }
            let len = std::fs::metadata(&m.path)
                .map_err(|e| StorageError::io("stat", &m.path, e))?
                .len();
            known.insert(m.index, len);
        }
        self.known = known;
        if self
            .image
            .as_ref()
            .is_some_and(|(i, _)| !self.known.contains_key(i))
        {
            self.image = None;
        }
        Ok(())
    }

    /// Moves the checkpoint at `index` out of the way (renamed to `….ckpt.corrupt`, directory
    /// `fsync`ed), e.g. after it failed verification at startup. Returns the new path.
    pub fn set_aside(&mut self, index: Index) -> io::Result<PathBuf> {
        let from = self.path_of(index);
        let mut to = from.clone().into_os_string();
        to.push(CORRUPT);
        let to = PathBuf::from(to);
        std::fs::rename(&from, &to).map_err(|e| StorageError::io("rename", &from, e))?;
        sync_dir(self.dir())?;
        self.known.remove(&index);
        if self.image.as_ref().is_some_and(|(i, _)| *i == index) {
            self.image = None;
        }
        Ok(to)
    }

    /// Deletes every checkpoint and any staged transfer (a volatile replica's restart is
    /// amnesiac: it must not start from old state).
    pub fn clear(&mut self) -> io::Result<()> {
        self.wait_save();
        self.discard_staging();
        self.image = None;
        self.store.retain(0)?;
        self.refresh()?;
        Ok(())
    }

    /// Waits for a save in flight to end (its result is dropped).
    fn wait_save(&mut self) {
        if let Some(mut s) = self.saving.take() {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn discard_staging(&mut self) {
        if let Some(s) = self.staging.take() {
            drop(s.file);
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(file = %s.path.display(), "cannot remove a staged checkpoint: {e}");
            }
        }
    }

    fn part_path(&self, index: Index) -> PathBuf {
        self.dir().join(format!("{}{PART}", snap_name(index)))
    }

    fn finish_staged(&mut self, s: &Staging, index: Index, len: u64) -> io::Result<()> {
        if s.index != index {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the staged checkpoint is at index {}, not {index}", s.index),
            ));
        }
        if s.len != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("staged {} bytes of an image of {len} bytes", s.len),
            ));
        }
        s.file
            .sync_all()
            .map_err(|e| StorageError::io("fsync", &s.path, e))?;
        let meta = SnapshotStore::verify_file(&s.path)?;
        if meta.index != index {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the image holds a checkpoint at index {}", meta.index),
            ));
        }
        let fin = self.path_of(index);
        std::fs::rename(&s.path, &fin).map_err(|e| StorageError::io("rename", &s.path, e))?;
        sync_dir(self.dir())?;
        Ok(())
    }
}

impl Checkpoints for FileCheckpoints {
    fn save(
        &mut self,
        index: Index,
        ballot: Ballot,
        mut src: Box<dyn CheckpointSource>,
    ) -> io::Result<()> {
        if let Some(s) = &self.saving {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "checkpoint at index {} is still being saved; not starting {index}",
                    s.index
                ),
            ));
        }
        let (tx, done) = mpsc::channel();
        let store = self.store.clone();
        let chunk = self.chunk_size;
        let thread = std::thread::Builder::new()
            .name("checkpoint-save".into())
            .spawn(move || {
                let r = (|| -> io::Result<CheckpointInfo> {
                    let mut w = store.begin_with_chunk(index, ballot, chunk)?;
                    src.write_to(&mut w)?;
                    let meta = w.finish()?;
                    let len = std::fs::metadata(&meta.path)
                        .map_err(|e| StorageError::io("stat", &meta.path, e))?
                        .len();
                    Ok(CheckpointInfo { index, len })
                })();
                if let Err(e) = &r {
                    tracing::error!(index, "checkpoint save failed: {e}");
                }
                let _ = tx.send(r);
            })?;
        self.saving = Some(Saving {
            index,
            done,
            thread: Some(thread),
        });
        Ok(())
    }

    fn poll_saved(&mut self) -> Option<io::Result<CheckpointInfo>> {
        let s = self.saving.as_mut()?;
        let r = match s.done.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Err(other(format!(
                "the thread saving checkpoint {} ended without a result",
                s.index
            ))),
        };
        self.wait_save();
        if let Ok(info) = &r {
            self.known.insert(info.index, info.len);
            if self.image.as_ref().is_some_and(|(i, _)| *i == info.index) {
                self.image = None;
            }
        }
        Some(r)
    }

    fn latest(&self) -> Option<CheckpointInfo> {
        self.known
            .last_key_value()
            .map(|(&index, &len)| CheckpointInfo { index, len })
    }

    fn get(&self, index: Index) -> Option<CheckpointInfo> {
        self.known
            .get(&index)
            .map(|&len| CheckpointInfo { index, len })
    }

    fn read_image(&mut self, index: Index, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let len = *self.known.get(&index).ok_or_else(|| not_found(index))?;
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        if self.image.as_ref().is_none_or(|(i, _)| *i != index) {
            let p = self.path_of(index);
            let f = File::open(&p).map_err(|e| StorageError::io("open", &p, e))?;
            self.image = Some((index, f));
        }
        let f = &self.image.as_ref().expect("just opened").1;
        let want = buf.len().min((len - offset) as usize);
        let mut got = 0;
        while got < want {
            match f.read_at(&mut buf[got..want], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StorageError::io("read", self.path_of(index), e).into()),
            }
        }
        Ok(got)
    }

    fn receive(&mut self, index: Index, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset == 0 {
            self.discard_staging();
            let path = self.part_path(index);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| StorageError::io("create", &path, e))?;
            self.staging = Some(Staging {
                index,
                path,
                file,
                len: 0,
            });
        }
        let Some(s) = self.staging.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "checkpoint chunk {index}@{offset}: no transfer staged (start at offset 0)"
                ),
            ));
        };
        if s.index != index || s.len != offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "checkpoint chunk {index}@{offset} does not continue the staged image \
                     ({}@{})",
                    s.index, s.len
                ),
            ));
        }
        if let Err(e) = s.file.write_all_at(data, offset) {
            let e = StorageError::io("write", &s.path, e);
            self.discard_staging();
            return Err(e.into());
        }
        s.len += data.len() as u64;
        Ok(())
    }

    fn receive_finish(&mut self, index: Index, len: u64) -> io::Result<CheckpointInfo> {
        let Some(s) = self.staging.take() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("received checkpoint {index}: nothing staged"),
            ));
        };
        match self.finish_staged(&s, index, len) {
            Ok(()) => {
                self.known.insert(index, len);
                if self.image.as_ref().is_some_and(|(i, _)| *i == index) {
                    self.image = None;
                }
                Ok(CheckpointInfo { index, len })
            }
            Err(e) => {
                let path = s.path.clone();
                self.staging = Some(s);
                self.discard_staging();
                tracing::warn!(index, file = %path.display(), "received checkpoint refused: {e}");
                Err(io::Error::new(
                    e.kind(),
                    format!("received checkpoint at index {index} refused: {e}"),
                ))
            }
        }
    }

    fn retain(&mut self, keep: usize) -> io::Result<Option<Index>> {
        self.store.retain(keep.max(1))?;
        self.refresh()?;
        Ok(self.known.keys().next().copied())
    }

    fn open(&mut self, index: Index) -> io::Result<Box<dyn Read + '_>> {
        if !self.known.contains_key(&index) {
            return Err(not_found(index));
        }
        Ok(Box::new(self.store.open_snapshot(index)?))
    }
}

impl Drop for FileCheckpoints {
    fn drop(&mut self) {
        // A clean stop finishes the checkpoint being written (and releases the directory
        // lock only then, so that a reopen in this process does not race with it).
        self.wait_save();
        self.discard_staging();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testutil::TempDir;
    use std::io::Write;
    use std::sync::mpsc::Receiver as StdReceiver;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    struct Bytes(Vec<u8>);
    impl CheckpointSource for Bytes {
        fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
            // In uneven pieces.
            for piece in self.0.chunks(777) {
                w.write_all(piece)?;
            }
            Ok(())
        }
    }

    /// Writes nothing until released.
    struct Gated(Mutex<StdReceiver<()>>, Vec<u8>);
    impl CheckpointSource for Gated {
        fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
            let _ = self.0.lock().unwrap().recv();
            w.write_all(&self.1)
        }
    }

    use crate::storage::tests::pseudo_random as data;

    fn wait_saved(c: &mut FileCheckpoints) -> io::Result<CheckpointInfo> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = c.poll_saved() {
                return r;
            }
            assert!(Instant::now() < deadline, "save never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn save(c: &mut FileCheckpoints, index: Index, d: &[u8]) -> CheckpointInfo {
        c.save(index, Ballot::new(2, 1), Box::new(Bytes(d.to_vec())))
            .unwrap();
        wait_saved(c).unwrap()
    }

    fn read_back(c: &mut FileCheckpoints, index: Index) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        c.open(index)?.read_to_end(&mut v)?;
        Ok(v)
    }

    /// Copies `index` from `a` to `b` in chunks of `chunk` bytes, from `from` on.
    fn transfer(
        a: &mut FileCheckpoints,
        b: &mut FileCheckpoints,
        index: Index,
        from: u64,
        chunk: usize,
    ) {
        let mut buf = vec![0u8; chunk];
        let mut off = from;
        loop {
            let n = a.read_image(index, off, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.receive(index, off, &buf[..n]).unwrap();
            off += n as u64;
        }
    }

    #[test]
    fn checkpoints_save_latest_open_round_trip() {
        let tmp = TempDir::new("ckpt-rt");
        let d = data(300_000, 7);
        {
            let mut c = FileCheckpoints::open(tmp.path())
                .unwrap()
                .with_chunk_size(4096);
            assert!(c.latest().is_none() && c.poll_saved().is_none());
            // A second save while one runs is refused; the first completes.
            let (go, gate) = mpsc::channel();
            c.save(
                5,
                Ballot::new(1, 0),
                Box::new(Gated(Mutex::new(gate), d.clone())),
            )
            .unwrap();
            let e = c
                .save(6, Ballot::new(1, 0), Box::new(Bytes(vec![1])))
                .unwrap_err();
            assert!(e.to_string().contains("still being saved"), "{e}");
            assert!(c.poll_saved().is_none());
            assert!(c.latest().is_none(), "not listed before it is complete");
            go.send(()).unwrap();
            let info = wait_saved(&mut c).unwrap();
            assert_eq!(info.index, 5);
            assert_eq!(
                info.len,
                std::fs::metadata(c.path_of(5)).unwrap().len(),
                "the image is the file"
            );
            assert_eq!(c.latest(), Some(info));
            assert_eq!(read_back(&mut c, 5).unwrap(), d);
            let info9 = save(&mut c, 9, b"later");
            assert_eq!(c.latest(), Some(info9));
            assert_eq!(read_back(&mut c, 9).unwrap(), b"later");
            assert_eq!(
                read_back(&mut c, 7).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
        }
        // Reopened: the cache is rebuilt from the directory.
        let mut c = FileCheckpoints::open(tmp.path()).unwrap();
        assert_eq!(c.list().iter().map(|i| i.index).collect::<Vec<_>>(), [5, 9]);
        assert_eq!(read_back(&mut c, 5).unwrap(), d);
        // A flipped data byte on disk: the reader refuses with InvalidData.
        let p = c.path_of(5);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[100_000] ^= 0x10;
        std::fs::write(&p, &bytes).unwrap();
        let e = read_back(&mut c, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let aside = c.set_aside(5).unwrap();
        assert!(aside.exists() && !p.exists());
        assert_eq!(c.list().len(), 1);
        drop(c);
        assert_eq!(FileCheckpoints::open(tmp.path()).unwrap().list().len(), 1);
    }

    #[test]
    fn checkpoints_transfer_in_small_chunks() {
        let (ta, tb) = (TempDir::new("ckpt-a"), TempDir::new("ckpt-b"));
        let mut a = FileCheckpoints::open(ta.path())
            .unwrap()
            .with_chunk_size(1000);
        let mut b = FileCheckpoints::open(tb.path()).unwrap();
        let d = data(50_000, 3);
        let info = save(&mut a, 42, &d);
        transfer(&mut a, &mut b, 42, 0, 333);
        assert!(b.latest().is_none(), "not listed while staged");
        assert_eq!(b.receive_finish(42, info.len).unwrap(), info);
        assert_eq!(b.latest(), Some(info));
        assert_eq!(read_back(&mut b, 42).unwrap(), d);
        assert_eq!(
            std::fs::read(a.path_of(42)).unwrap(),
            std::fs::read(b.path_of(42)).unwrap()
        );
        assert!(!b.part_path(42).exists());
        // Reading past the end gives 0; an unknown index is NotFound.
        assert_eq!(a.read_image(42, info.len, &mut [0; 8]).unwrap(), 0);
        assert_eq!(
            a.read_image(41, 0, &mut [0; 8]).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn checkpoints_transfer_resumes_after_an_interruption() {
        let (ta, tb) = (TempDir::new("ckpt-ra"), TempDir::new("ckpt-rb"));
        let mut a = FileCheckpoints::open(ta.path())
            .unwrap()
            .with_chunk_size(512);
        let d = data(20_000, 11);
        let info = save(&mut a, 100, &d);
        let half = info.len / 2;
        {
            let mut b = FileCheckpoints::open(tb.path()).unwrap();
            let mut buf = vec![0u8; half as usize];
            assert_eq!(a.read_image(100, 0, &mut buf).unwrap(), half as usize);
            b.receive(100, 0, &buf).unwrap();
            // Out of order, another index, a gap: refused, and the staged bytes stay.
            assert!(b.receive(100, half + 1, b"x").is_err());
            assert!(b.receive(100, half - 1, b"x").is_err());
            assert!(b.receive(101, half, b"x").is_err());
            assert!(b.receive_finish(100, info.len).is_err(), "incomplete");
            // That failure discarded the staged image: continuing needs a restart at 0.
            assert!(b.receive(100, half, b"x").is_err());
            b.receive(100, 0, &buf).unwrap();
            // The transfer is interrupted here (the source goes away); it continues at
            // `half` from another copy of the same image.
            let (tc, mut c) = {
                let tc = TempDir::new("ckpt-rc");
                let c = FileCheckpoints::open(tc.path()).unwrap();
                (tc, c)
            };
            transfer(&mut a, &mut c, 100, 0, 4096);
            c.receive_finish(100, info.len).unwrap();
            transfer(&mut c, &mut b, 100, half, 700);
            b.receive_finish(100, info.len).unwrap();
            assert_eq!(read_back(&mut b, 100).unwrap(), d);
            drop(tc);
        }
        // A part file left by a crash is removed at open (the puller starts over).
        let leftover = tb.path().join(format!("{}{PART}", snap_name(200)));
        std::fs::write(&leftover, b"partial").unwrap();
        let b = FileCheckpoints::open(tb.path()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(b.latest().map(|i| i.index), Some(100));
    }

    #[test]
    fn checkpoints_flipped_byte_in_transfer_is_refused_at_finish() {
        let (ta, tb) = (TempDir::new("ckpt-fa"), TempDir::new("ckpt-fb"));
        let mut a = FileCheckpoints::open(ta.path())
            .unwrap()
            .with_chunk_size(256);
        let mut b = FileCheckpoints::open(tb.path()).unwrap();
        let d = data(10_000, 5);
        let info = save(&mut a, 8, &d);
        let mut img = std::fs::read(a.path_of(8)).unwrap();
        for (at, why) in [
            (5_000usize, "checksum"),
            (info.len as usize - 10, "trailer"),
        ] {
            img[at] ^= 0x01;
            for (k, piece) in img.chunks(300).enumerate() {
                b.receive(8, (k * 300) as u64, piece).unwrap();
            }
            let e = b.receive_finish(8, info.len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(why), "{why}: {e}");
            assert!(!b.part_path(8).exists(), "part file deleted");
            assert!(!b.path_of(8).exists());
            assert!(b.latest().is_none());
            img[at] ^= 0x01;
        }
        // A short image and the wrong length are refused too.
        b.receive(8, 0, &img[..1000]).unwrap();
        assert!(b.receive_finish(8, info.len).is_err());
        b.receive(8, 0, &img).unwrap();
        assert!(b.receive_finish(9, info.len).is_err(), "another index");
        // An image relabelled under another index (name says 9, content says 8).
        b.receive(9, 0, &img).unwrap();
        let e = b.receive_finish(9, info.len).unwrap_err();
        assert!(e.to_string().contains("index 8"), "{e}");
        // A clean transfer afterwards succeeds.
        b.receive(8, 0, &img).unwrap();
        b.receive_finish(8, info.len).unwrap();
        assert_eq!(read_back(&mut b, 8).unwrap(), d);
    }

    #[test]
    fn checkpoints_retain_and_clear() {
        let tmp = TempDir::new("ckpt-retain");
        let mut c = FileCheckpoints::open(tmp.path()).unwrap();
        for i in [10, 20, 30] {
            save(&mut c, i, &data(1000, i));
        }
        // Read an image so that the file is open when it is deleted.
        c.read_image(10, 0, &mut [0; 16]).unwrap();
        assert_eq!(c.retain(2).unwrap(), Some(20));
        assert!(!c.path_of(10).exists());
        assert_eq!(
            c.read_image(10, 0, &mut [0; 16]).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(c.retain(0).unwrap(), Some(30), "at least one is kept");
        assert_eq!(c.list().len(), 1);
        assert_eq!(read_back(&mut c, 30).unwrap(), data(1000, 30));
        c.receive(40, 0, b"staged").unwrap();
        c.clear().unwrap();
        assert!(c.latest().is_none());
        assert!(!c.path_of(30).exists() && !c.part_path(40).exists());
        drop(c);
        assert!(FileCheckpoints::open(tmp.path())
            .unwrap()
            .latest()
            .is_none());
    }

    #[test]
    fn checkpoints_failed_source_is_reported() {
        struct Failing;
        impl CheckpointSource for Failing {
            fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
                w.write_all(b"some")?;
                Err(io::Error::other("source broke"))
            }
        }
        let tmp = TempDir::new("ckpt-fail");
        let mut c = FileCheckpoints::open(tmp.path()).unwrap();
        c.save(3, Ballot::new(1, 1), Box::new(Failing)).unwrap();
        let e = wait_saved(&mut c).unwrap_err();
        assert!(e.to_string().contains("source broke"), "{e}");
        assert!(c.latest().is_none());
        assert!(!c.path_of(3).exists());
        // The next save may start.
        save(&mut c, 4, b"ok");
        assert_eq!(c.latest().unwrap().index, 4);
    }
}
