//! Checkpoints: state-machine snapshots written as a stream of any size.
//!
//! File `snap-<index, 20 digits>.ckpt` (written as `.ckpt.tmp`, `fsync`ed, renamed, and the
//! directory `fsync`ed, so a snapshot under its final name is always complete):
//!
//! ```text
//! header   magic u64 "BALSNAP1" | version u32 | chunk_size u32 | index u64 | ballot u64
//!          | crc32c u32 (of the 32 bytes before) | 0 u32                         (40 bytes)
//! chunk*   len u32 (1..=chunk_size) | crc32c u32 (of chunk number u64 LE ++ data) | data
//! trailer  magic u64 "BALSNEND" | index u64 | ballot u64 | total_len u64 | chunks u64
//!          | stream crc32c u32 (of all data) | crc32c u32 (of the 44 bytes before) (48 bytes)
//! ```
//!
//! `index`/`ballot` are those of the last log entry the snapshot includes. The reader hands
//! out a chunk's data only after its checksum verified, and reports end of stream only after
//! the totals and the stream checksum match the trailer.

use super::{ensure_dir, sync_dir, DirLock, Result, StorageError};
use crate::types::{Ballot, Index};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const HEAD_MAGIC: u64 = u64::from_le_bytes(*b"BALSNAP1");
const TAIL_MAGIC: u64 = u64::from_le_bytes(*b"BALSNEND");
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 40;
const CHUNK_HEADER_SIZE: u64 = 8;
const TRAILER_SIZE: u64 = 48;
/// Default data bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 1 << 20;
const MAX_CHUNK: u32 = 64 << 20;

pub(super) fn snap_name(index: Index) -> String {
    format!("snap-{index:020}.ckpt")
}

fn parse_snap_name(name: &str) -> Option<Index> {
    let d = name.strip_prefix("snap-")?.strip_suffix(".ckpt")?;
    (d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
        .then(|| d.parse().ok())
        .flatten()
}

fn chunk_crc(chunk_no: u64, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&chunk_no.to_le_bytes()), data)
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A complete snapshot on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Index of the last log entry the snapshot includes.
    pub index: Index,
    /// Ballot of that entry.
    pub ballot: Ballot,
    /// Bytes of state-machine data.
    pub len: u64,
    /// The snapshot file.
    pub path: PathBuf,
}

/// The snapshots of one directory.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    _lock: DirLock,
}

impl SnapshotStore {
    /// Opens (creating if needed) the snapshot directory; removes `.ckpt.tmp` files left by
    /// writes that never finished.
    pub fn open(dir: impl AsRef<Path>) -> Result<SnapshotStore> {
        let dir = dir.as_ref().to_path_buf();
        ensure_dir(&dir)?;
        let lock = DirLock::acquire(&dir, "snap.lock")?;
        super::remove_unfinished(&dir, ".ckpt.tmp", "unfinished snapshot")?;
        Ok(SnapshotStore { dir, _lock: lock })
    }

    /// The directory this store owns (locked while the store lives).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the snapshot at `index` lives (whether or not it exists).
    pub fn path_of(&self, index: Index) -> PathBuf {
        self.dir.join(snap_name(index))
    }

    /// Starts a snapshot that includes the log up to `index` (whose entry has `ballot`).
    pub fn begin(&self, index: Index, ballot: Ballot) -> Result<SnapshotWriter> {
        self.begin_with_chunk(index, ballot, DEFAULT_CHUNK)
    }

    /// As [`begin`](Self::begin) with a chosen chunk size (1 ..= 64 MiB).
    pub fn begin_with_chunk(
        &self,
        index: Index,
        ballot: Ballot,
        chunk_size: u32,
    ) -> Result<SnapshotWriter> {
        let chunk_size = chunk_size.clamp(1, MAX_CHUNK);
        let final_path = self.dir.join(snap_name(index));
        let tmp_path = self.dir.join(format!("{}.tmp", snap_name(index)));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|e| StorageError::io("create snapshot", &tmp_path, e))?;
        let mut h = [0u8; HEADER_SIZE as usize];
        h[0..8].copy_from_slice(&HEAD_MAGIC.to_le_bytes());
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&chunk_size.to_le_bytes());
        h[16..24].copy_from_slice(&index.to_le_bytes());
        h[24..32].copy_from_slice(&ballot.0.to_le_bytes());
        let crc = crc32c::crc32c(&h[..32]);
        h[32..36].copy_from_slice(&crc.to_le_bytes());
        if let Err(e) = file.write_all(&h) {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(StorageError::io("write", &tmp_path, e));
        }
        Ok(SnapshotWriter {
            dir: self.dir.clone(),
            tmp_path,
            final_path,
            file: Some(file),
            chunk_size: chunk_size as usize,
            buf: Vec::with_capacity(chunk_size as usize),
            chunks: 0,
            total: 0,
            crc: 0,
            index,
            ballot,
            failed: false,
        })
    }

    /// Complete snapshots (header and trailer verify), oldest first. Files under a snapshot
    /// name whose header or trailer does not verify are skipped with a warning.
    pub fn list(&self) -> Result<Vec<SnapshotMeta>> {
        let rd =
            std::fs::read_dir(&self.dir).map_err(|e| StorageError::io("read dir", &self.dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| StorageError::io("read dir", &self.dir, e))?;
            let Some(index) = ent.file_name().to_str().and_then(parse_snap_name) else {
                continue;
            };
            match SnapshotReader::open_path(&ent.path()) {
                Ok(r) if r.meta.index == index => out.push(r.meta),
                Ok(_) => {
                    tracing::warn!(file = %ent.path().display(), "snapshot index does not match its name")
                }
                Err(StorageError::Io { .. }) | Err(StorageError::Corrupt { .. }) => {
                    tracing::warn!(file = %ent.path().display(), "unreadable snapshot skipped")
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|m| m.index);
        Ok(out)
    }

    /// The newest complete snapshot.
    pub fn latest(&self) -> Result<Option<SnapshotMeta>> {
        Ok(self.list()?.pop())
    }

    /// Opens the snapshot at `index` for reading (header and trailer verified now, data as
    /// it is read).
    pub fn open_snapshot(&self, index: Index) -> Result<SnapshotReader> {
        let path = self.dir.join(snap_name(index));
        if !path.exists() {
            return Err(StorageError::NoSuchSnapshot { index });
        }
        SnapshotReader::open_path(&path)
    }

    /// Reads the whole snapshot at `index` without keeping the data, verifying everything.
    pub fn verify(&self, index: Index) -> Result<SnapshotMeta> {
        let mut r = self.open_snapshot(index)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read_verified(&mut buf)? {
                0 => return Ok(r.meta.clone()),
                _ => continue,
            }
        }
    }

    /// Reads the snapshot file at `path` (under any name) to the end, verifying header,
    /// every chunk, totals and trailer.
    pub fn verify_file(path: &Path) -> Result<SnapshotMeta> {
        let mut r = SnapshotReader::open_path(path)?;
        let mut buf = vec![0u8; 1 << 16];
        while r.read_verified(&mut buf)? != 0 {}
        Ok(r.meta)
    }

    /// Deletes all but the newest `keep` snapshots (and any unreadable snapshot file older
    /// than the oldest kept one). Returns how many files were removed.
    pub fn retain(&self, keep: usize) -> Result<usize> {
        let good = self.list()?;
        let oldest_kept = good
            .len()
            .checked_sub(keep)
            .and_then(|skip| good.get(skip))
            .map(|m| m.index);
        let rd =
            std::fs::read_dir(&self.dir).map_err(|e| StorageError::io("read dir", &self.dir, e))?;
        let mut removed = 0;
        for ent in rd {
            let ent = ent.map_err(|e| StorageError::io("read dir", &self.dir, e))?;
            let Some(index) = ent.file_name().to_str().and_then(parse_snap_name) else {
                continue;
            };
            let drop = match oldest_kept {
                Some(k) => index < k,
                None => keep == 0,
            };
            if drop {
                let p = ent.path();
                std::fs::remove_file(&p).map_err(|e| StorageError::io("remove", &p, e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Writes one snapshot; `io::Write` for the data, then [`finish`](Self::finish). Dropped
/// without `finish`, the temporary file is removed and no snapshot appears.
#[derive(Debug)]
pub struct SnapshotWriter {
    dir: PathBuf,
    tmp_path: PathBuf,
    final_path: PathBuf,
    file: Option<File>,
    chunk_size: usize,
    buf: Vec<u8>,
    chunks: u64,
    total: u64,
    crc: u32,
    index: Index,
    ballot: Ballot,
    failed: bool,
}

impl SnapshotWriter {
    fn emit_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.failed {
            return Err(StorageError::Poisoned {
                cause: "an earlier write to this snapshot failed".into(),
            });
        }
        let mut h = [0u8; CHUNK_HEADER_SIZE as usize];
        h[0..4].copy_from_slice(&(self.buf.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&chunk_crc(self.chunks, &self.buf).to_le_bytes());
        let f = self.file.as_mut().expect("file until finish");
        let r = f.write_all(&h).and_then(|_| f.write_all(&self.buf));
        if let Err(e) = r {
            self.failed = true;
            return Err(StorageError::io("write", &self.tmp_path, e));
        }
        self.crc = crc32c::crc32c_append(self.crc, &self.buf);
        self.total += self.buf.len() as u64;
        self.chunks += 1;
        self.buf.clear();
        Ok(())
    }

    /// Writes the trailer, `fsync`s, renames into place and `fsync`s the directory.
    pub fn finish(mut self) -> Result<SnapshotMeta> {
        self.emit_chunk()?;
        let mut t = [0u8; TRAILER_SIZE as usize];
        t[0..8].copy_from_slice(&TAIL_MAGIC.to_le_bytes());
        t[8..16].copy_from_slice(&self.index.to_le_bytes());
        t[16..24].copy_from_slice(&self.ballot.0.to_le_bytes());
        t[24..32].copy_from_slice(&self.total.to_le_bytes());
        t[32..40].copy_from_slice(&self.chunks.to_le_bytes());
        t[40..44].copy_from_slice(&self.crc.to_le_bytes());
        let crc = crc32c::crc32c(&t[..44]);
        t[44..48].copy_from_slice(&crc.to_le_bytes());
        // On any error below, `Drop` (file still held) removes the temporary file.
        let f = self.file.as_mut().expect("file until finish");
        f.write_all(&t)
            .map_err(|e| StorageError::io("write", &self.tmp_path, e))?;
        f.sync_all()
            .map_err(|e| StorageError::io("fsync", &self.tmp_path, e))?;
        self.file = None;
        if let Err(e) = std::fs::rename(&self.tmp_path, &self.final_path) {
            let _ = std::fs::remove_file(&self.tmp_path);
            return Err(StorageError::io("rename", &self.final_path, e));
        }
        sync_dir(&self.dir)?;
        Ok(SnapshotMeta {
            index: self.index,
            ballot: self.ballot,
            len: self.total,
            path: self.final_path.clone(),
        })
    }
}

impl Write for SnapshotWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(StorageError::Poisoned {
                cause: "an earlier write to this snapshot failed".into(),
            }
            .into());
        }
        let room = self.chunk_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.emit_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Reads a snapshot's data back, verifying each chunk before handing it out and the totals
/// before reporting the end. `io::Read` turns a mismatch into `ErrorKind::InvalidData`
/// carrying the [`StorageError::Corrupt`].
#[derive(Debug)]
pub struct SnapshotReader {
    /// What is being read.
    pub meta: SnapshotMeta,
    path: PathBuf,
    file: BufReader<File>,
    chunk_size: u32,
    /// File offset of the next chunk header; the trailer starts at `data_end`.
    offset: u64,
    data_end: u64,
    trailer_chunks: u64,
    trailer_crc: u32,
    cur: Vec<u8>,
    pos: usize,
    chunks: u64,
    total: u64,
    crc: u32,
    done: bool,
}

impl SnapshotReader {
    fn open_path(path: &Path) -> Result<SnapshotReader> {
        let corrupt = |off: u64, why: &str| StorageError::corrupt(path, off, why);
        let file = File::open(path).map_err(|e| StorageError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| StorageError::io("stat", path, e))?
            .len();
        if len < HEADER_SIZE + TRAILER_SIZE {
            return Err(corrupt(0, "shorter than header and trailer"));
        }
        let mut h = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| StorageError::io("read", path, e))?;
        if rd_u64(&h, 0) != HEAD_MAGIC {
            return Err(corrupt(0, "bad snapshot magic"));
        }
        if rd_u32(&h, 32) != crc32c::crc32c(&h[..32]) {
            return Err(corrupt(0, "header checksum mismatch"));
        }
        if rd_u32(&h, 8) != VERSION {
            return Err(corrupt(8, "unsupported snapshot version"));
        }
        let chunk_size = rd_u32(&h, 12);
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(corrupt(12, "bad chunk size"));
        }
        let data_end = len - TRAILER_SIZE;
        let mut t = [0u8; TRAILER_SIZE as usize];
        file.read_exact_at(&mut t, data_end)
            .map_err(|e| StorageError::io("read", path, e))?;
        if rd_u64(&t, 0) != TAIL_MAGIC || rd_u32(&t, 44) != crc32c::crc32c(&t[..44]) {
            return Err(corrupt(data_end, "trailer missing or checksum mismatch"));
        }
        let (index, ballot) = (rd_u64(&t, 8), Ballot(rd_u64(&t, 16)));
        if index != rd_u64(&h, 16) || ballot.0 != rd_u64(&h, 24) {
            return Err(corrupt(
                data_end,
                "trailer index/ballot differ from the header",
            ));
        }
        let mut file = BufReader::with_capacity(1 << 16, file);
        file.seek(SeekFrom::Start(HEADER_SIZE))
            .map_err(|e| StorageError::io("seek", path, e))?;
        Ok(SnapshotReader {
            meta: SnapshotMeta {
                index,
                ballot,
                len: rd_u64(&t, 24),
                path: path.to_path_buf(),
            },
            path: path.to_path_buf(),
            file,
            chunk_size,
            offset: HEADER_SIZE,
            data_end,
            trailer_chunks: rd_u64(&t, 32),
            trailer_crc: rd_u32(&t, 40),
            cur: Vec::new(),
            pos: 0,
            chunks: 0,
            total: 0,
            crc: 0,
            done: false,
        })
    }

    fn next_chunk(&mut self) -> Result<bool> {
        let at = self.offset;
        if at == self.data_end {
            if self.total != self.meta.len
                || self.chunks != self.trailer_chunks
                || self.crc != self.trailer_crc
            {
                return Err(StorageError::corrupt(
                    &self.path,
                    at,
                    "stream length, chunk count or checksum differs from the trailer",
                ));
            }
            self.done = true;
            return Ok(false);
        }
        if at + CHUNK_HEADER_SIZE > self.data_end {
            return Err(StorageError::corrupt(
                &self.path,
                at,
                "chunk header overlaps the trailer",
            ));
        }
        let mut h = [0u8; CHUNK_HEADER_SIZE as usize];
        self.file
            .read_exact(&mut h)
            .map_err(|e| StorageError::io("read", &self.path, e))?;
        let len = rd_u32(&h, 0);
        if len == 0 || len > self.chunk_size || at + CHUNK_HEADER_SIZE + len as u64 > self.data_end
        {
            return Err(StorageError::corrupt(
                &self.path,
                at,
                format!("bad chunk length {len}"),
            ));
        }
        self.cur.resize(len as usize, 0);
        self.file
            .read_exact(&mut self.cur)
            .map_err(|e| StorageError::io("read", &self.path, e))?;
        if rd_u32(&h, 4) != chunk_crc(self.chunks, &self.cur) {
            return Err(StorageError::corrupt(
                &self.path,
                at,
                format!("chunk {} checksum mismatch", self.chunks),
            ));
        }
        self.crc = crc32c::crc32c_append(self.crc, &self.cur);
        self.total += len as u64;
        self.chunks += 1;
        self.offset = at + CHUNK_HEADER_SIZE + len as u64;
        self.pos = 0;
        Ok(true)
    }

    /// `Read` with the typed error.
    pub fn read_verified(&mut self, out: &mut [u8]) -> Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.cur.len() {
            if self.done || !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Read for SnapshotReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        Ok(self.read_verified(out)?)
    }
}
