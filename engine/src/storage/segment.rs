//! The durable log: append-only segment files of encoded entries.
//!
//! A segment file `seg-<first index, 20 digits>.log` is a plain concatenation of records, and
//! a record is exactly one entry in the [`crate::layout`] format (`encode_entry`): header
//! `{index, ballot, commit, len, flags, crc32c}`, payload padded to 8 bytes with zeros, seal.
//! There is no file header: the name gives the first index and each record repeats its own.
//!
//! Rules the code keeps (and recovery relies on):
//! - records in a segment hold consecutive indexes starting at the name's index, and each
//!   segment starts right after the previous one ends;
//! - a segment is `fdatasync`ed before the next one is created, and the directory is
//!   `fsync`ed after a segment is created or removed, so only the **last** segment can have
//!   a torn tail after a crash: anything wrong in an earlier segment is corruption;
//! - `sync` reports an index as durable only after `fdatasync` of the bytes returned; after
//!   any failed write or sync the handle is poisoned and never reports success again.

use super::{ensure_dir, layout_reason, sync_dir, DirLock, Result, StorageError};
use crate::layout::{
    decode_entry, encode_entry, entry_size, flags, EntryHeader, ENTRY_HEADER_SIZE, MAX_PAYLOAD,
    SEAL_SIZE,
};
use crate::types::{Ballot, Index};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Tuning of a [`SegmentLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A new segment is started when a record would take the current one past this size
    /// (a segment always takes at least one record, however large).
    pub segment_bytes: u64,
    /// Appended records are gathered in memory and handed to the kernel with one `pwrite`
    /// once this many bytes are pending (and always at `sync`).
    pub write_buffer: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            write_buffer: 256 << 10,
        }
    }
}

/// An owned log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Index, ballot, piggybacked commit, length and flags.
    pub header: EntryHeader,
    /// The entry's payload (a batch of commands, or empty for a no-op).
    pub payload: Vec<u8>,
}

impl LogEntry {
    /// An entry whose header's `len` is the payload's length.
    pub fn new(index: Index, ballot: Ballot, commit: Index, flags: u32, payload: Vec<u8>) -> Self {
        LogEntry {
            header: EntryHeader {
                index,
                ballot,
                commit,
                len: payload.len() as u32,
                flags,
            },
            payload,
        }
    }
    /// The entry's log index.
    pub fn index(&self) -> Index {
        self.header.index
    }
}

/// A torn or corrupt tail that recovery cut off the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file that was cut.
    pub file: PathBuf,
    /// Where the first bad record started; the file now ends here.
    pub offset: u64,
    /// Bytes cut off the end of the file.
    pub discarded_bytes: u64,
    /// Why the first cut record was rejected (torn, checksum, ...).
    pub reason: String,
}

/// What [`SegmentLog::open`] found. The entries themselves are read back with
/// [`SegmentLog::entries`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// The first index in the log; `None` when it is empty.
    pub first_index: Option<Index>,
    /// 0 when the log is empty.
    pub last_index: Index,
    /// Entries recovered.
    pub entries: u64,
    /// Segment files kept.
    pub segments: usize,
    /// The tail cut off the last segment, if any (a crash mid-append; logged by the caller).
    pub torn_tail: Option<TornTail>,
    /// A last segment left without any complete record (crash right after it was created,
    /// or everything in it was torn), removed.
    pub removed_empty_segment: Option<PathBuf>,
}

#[derive(Debug)]
struct Segment {
    first: Index,
    path: PathBuf,
    /// Byte offset of each record; record `k` holds index `first + k`.
    offsets: Vec<u64>,
    /// Bytes in the segment, counting records still pending in memory.
    len: u64,
}

impl Segment {
    fn last(&self) -> Index {
        self.first + self.offsets.len() as u64 - 1
    }
    fn record_range(&self, index: Index) -> (u64, u64) {
        let k = (index - self.first) as usize;
        let start = self.offsets[k];
        let end = self.offsets.get(k + 1).copied().unwrap_or(self.len);
        (start, end)
    }
}

fn segment_name(first: Index) -> String {
    format!("seg-{first:020}.log")
}

fn parse_segment_name(name: &str) -> Option<Index> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Decodes and checks one record at the start of `b`: the layout's seal and checksum, plus
/// what the layout cannot check (zero padding, no ring-only flags, index not 0).
/// Returns the header, the payload and the record's size.
pub(crate) fn decode_record(b: &[u8]) -> std::result::Result<(EntryHeader, &[u8], usize), String> {
    let (h, payload) = decode_entry(b).map_err(layout_reason)?;
    let size = entry_size(h.len as usize);
    if b[ENTRY_HEADER_SIZE + payload.len()..size - SEAL_SIZE]
        .iter()
        .any(|&x| x != 0)
    {
        return Err("non-zero padding after the payload".into());
    }
    if h.flags & flags::WRAP != 0 {
        return Err("a ring wrap marker is not a log entry".into());
    }
    if h.index == 0 {
        return Err("record for index 0".into());
    }
    Ok((h, payload, size))
}

/// The first complete, valid record at an 8-aligned offset after `from`, if any.
fn find_valid_after(bytes: &[u8], from: usize) -> Option<(u64, Index)> {
    let mut off = from + 8;
    while off + ENTRY_HEADER_SIZE + SEAL_SIZE <= bytes.len() {
        let index = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        if index != 0 {
            if let Ok((h, _, _)) = decode_record(&bytes[off..]) {
                return Some((off as u64, h.index));
            }
        }
        off += 8;
    }
    None
}

fn list_segments(dir: &Path) -> Result<Vec<(Index, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| StorageError::io("read dir", dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| StorageError::io("read dir", dir, e))?;
        if let Some(first) = ent.file_name().to_str().and_then(parse_segment_name) {
            out.push((first, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The durable log. See the module documentation.
///
/// `append*` requires each index to be the last index + 1 (any index ≥ 1 when the log is
/// empty). To replace entries (a higher ballot overwriting an index), call
/// [`truncate_after`](Self::truncate_after) first, then append from the cut.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    opts: LogOptions,
    _lock: DirLock,
    segments: Vec<Segment>,
    /// Write handle of the last segment.
    active: Option<File>,
    /// Bytes of the last segment already handed to the kernel.
    written: u64,
    /// Encoded records of the last segment not yet written.
    pending: Vec<u8>,
    /// Written to the last segment since its last `fdatasync`.
    dirty: bool,
    durable: Index,
    poisoned: Option<String>,
    scratch: Vec<u8>,
    #[cfg(test)]
    fail_next_sync: Option<i32>,
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`, running recovery: every record of every
    /// segment is read and verified. A bad record at the tail of the last segment with no
    /// valid record after it is a torn write: it is cut off (durably) and reported. Any
    /// other bad record, a record with the wrong index, or a gap between segments refuses
    /// to open with [`StorageError::Corrupt`] naming the file and offset.
    ///
    /// Everything recovered is `fdatasync`ed before returning, so `durable_index()` starts
    /// at the last index.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<(SegmentLog, Recovery)> {
        let dir = dir.as_ref().to_path_buf();
        let opts = LogOptions {
            segment_bytes: opts.segment_bytes.max(1),
            write_buffer: opts.write_buffer,
        };
        ensure_dir(&dir)?;
        let lock = DirLock::acquire(&dir, "LOCK")?;
        let names = list_segments(&dir)?;
        let n = names.len();
        let mut segments: Vec<Segment> = Vec::with_capacity(n);
        let mut rec = Recovery::default();

        for (k, (first, path)) in names.into_iter().enumerate() {
            let is_last = k + 1 == n;
            if first == 0 {
                return Err(StorageError::corrupt(&path, 0, "segment named for index 0"));
            }
            if let Some(prev) = segments.last() {
                if first != prev.last() + 1 {
                    return Err(StorageError::corrupt(
                        &path,
                        0,
                        format!(
                            "segment starts at index {first} but the previous segment ends at \
                             index {}",
                            prev.last()
                        ),
                    ));
                }
            }
            let bytes = std::fs::read(&path).map_err(|e| StorageError::io("read", &path, e))?;
            let mut offsets = Vec::new();
            let mut off = 0usize;
            let mut expect = first;
            let mut bad = None;
            while off < bytes.len() {
                match decode_record(&bytes[off..]) {
                    Ok((h, _, size)) => {
                        if h.index != expect {
                            return Err(StorageError::corrupt(
                                &path,
                                off as u64,
                                format!(
                                    "valid record holds index {} where index {expect} belongs",
                                    h.index
                                ),
                            ));
                        }
                        offsets.push(off as u64);
                        off += size;
                        expect += 1;
                    }
                    Err(reason) => {
                        bad = Some(reason);
                        break;
                    }
                }
            }
            if let Some(reason) = bad {
                if !is_last {
                    return Err(StorageError::corrupt(
                        &path,
                        off as u64,
                        format!(
                            "{reason} (in a sealed segment: later segments exist, and a segment \
                             is synced before the next one is created)"
                        ),
                    ));
                }
                if let Some((voff, vidx)) = find_valid_after(&bytes, off) {
                    return Err(StorageError::corrupt(
                        &path,
                        off as u64,
                        format!(
                            "{reason}; a valid record (index {vidx}) follows at offset {voff}, \
                             so this is not a torn tail"
                        ),
                    ));
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| StorageError::io("open", &path, e))?;
                f.set_len(off as u64)
                    .map_err(|e| StorageError::io("truncate torn tail", &path, e))?;
                f.sync_data()
                    .map_err(|e| StorageError::io("fdatasync", &path, e))?;
                let discarded = (bytes.len() - off) as u64;
                tracing::warn!(
                    file = %path.display(),
                    offset = off,
                    discarded,
                    %reason,
                    "durable log: torn tail truncated"
                );
                rec.torn_tail = Some(TornTail {
                    file: path.clone(),
                    offset: off as u64,
                    discarded_bytes: discarded,
                    reason,
                });
            }
            if offsets.is_empty() {
                if !is_last {
                    return Err(StorageError::corrupt(
                        &path,
                        0,
                        "empty segment followed by later segments",
                    ));
                }
                std::fs::remove_file(&path)
                    .map_err(|e| StorageError::io("remove empty segment", &path, e))?;
                sync_dir(&dir)?;
                tracing::warn!(file = %path.display(), "durable log: empty last segment removed");
                rec.removed_empty_segment = Some(path);
                continue;
            }
            segments.push(Segment {
                first,
                path,
                offsets,
                len: off as u64,
            });
        }

        let (active, written) = match segments.last() {
            Some(s) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&s.path)
                    .map_err(|e| StorageError::io("open", &s.path, e))?;
                // What we read may have been only in the page cache (a process crash, not a
                // machine crash): make it durable before calling it durable.
                f.sync_data()
                    .map_err(|e| StorageError::io("fdatasync", &s.path, e))?;
                (Some(f), s.len)
            }
            None => (None, 0),
        };
        rec.first_index = segments.first().map(|s| s.first);
        rec.last_index = segments.last().map_or(0, |s| s.last());
        rec.entries = segments.iter().map(|s| s.offsets.len() as u64).sum();
        rec.segments = segments.len();
        let log = SegmentLog {
            dir,
            opts,
            _lock: lock,
            segments,
            active,
            written,
            pending: Vec::new(),
            dirty: false,
            durable: rec.last_index,
            poisoned: None,
            scratch: Vec::new(),
            #[cfg(test)]
            fail_next_sync: None,
        };
        Ok((log, rec))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The first index held, `None` when the log is empty.
    pub fn first_index(&self) -> Option<Index> {
        self.segments.first().map(|s| s.first)
    }
    /// The last index held (appended, maybe not yet durable); 0 when empty.
    pub fn last_index(&self) -> Index {
        self.segments.last().map_or(0, |s| s.last())
    }
    /// Every entry up to this index is on disk (`fdatasync` returned success).
    pub fn durable_index(&self) -> Index {
        self.durable
    }
    /// Segment files in use.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// A write or sync failed: nothing more is reported durable until the log is reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(StorageError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: StorageError) -> StorageError {
        tracing::error!(error = %e, "durable log poisoned");
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    fn check_next(&self, index: Index) -> Result<()> {
        match self.segments.last() {
            None if index >= 1 => Ok(()),
            None => Err(StorageError::InvalidEntry(
                "index 0 is not a log index".into(),
            )),
            Some(s) if index == s.last() + 1 => Ok(()),
            Some(s) => Err(StorageError::NotContiguous {
                expected: s.last() + 1,
                got: index,
            }),
        }
    }

    /// Appends one entry. It is durable after the next successful [`sync`](Self::sync).
    pub fn append_entry(&mut self, header: &EntryHeader, payload: &[u8]) -> Result<()> {
        self.usable()?;
        if header.len as usize != payload.len() {
            return Err(StorageError::InvalidEntry(format!(
                "header length {} but payload of {} bytes",
                header.len,
                payload.len()
            )));
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(StorageError::InvalidEntry(format!(
                "payload of {} bytes over the {MAX_PAYLOAD} limit",
                payload.len()
            )));
        }
        if header.flags & !flags::KNOWN != 0 || header.flags & flags::WRAP != 0 {
            return Err(StorageError::InvalidEntry(format!(
                "flags {:#x} not allowed in the log",
                header.flags
            )));
        }
        self.check_next(header.index)?;
        let mut rec = std::mem::take(&mut self.scratch);
        encode_entry(&mut rec, header, payload);
        let r = self.push_record(header.index, &rec);
        self.scratch = rec;
        r
    }

    /// Appends entries in order; returns the last index appended.
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<Index> {
        for e in entries {
            self.append_entry(&e.header, &e.payload)?;
        }
        Ok(self.last_index())
    }

    /// Appends an entry already encoded in the layout format (as copied out of the ring),
    /// after verifying it. `bytes` may be longer than the entry; only the entry is written.
    pub fn append_encoded(&mut self, bytes: &[u8]) -> Result<Index> {
        self.usable()?;
        let (h, _, size) = decode_record(bytes).map_err(StorageError::InvalidEntry)?;
        self.check_next(h.index)?;
        self.push_record(h.index, &bytes[..size])?;
        Ok(h.index)
    }

    fn push_record(&mut self, index: Index, rec: &[u8]) -> Result<()> {
        let roll = match self.segments.last() {
            None => true,
            Some(s) => s.len > 0 && s.len + rec.len() as u64 > self.opts.segment_bytes,
        };
        if roll {
            self.roll(index)?;
        }
        let seg = self.segments.last_mut().expect("a segment after roll");
        seg.offsets.push(seg.len);
        seg.len += rec.len() as u64;
        self.pending.extend_from_slice(rec);
        if self.pending.len() >= self.opts.write_buffer {
            self.flush()?;
        }
        Ok(())
    }

    /// Seals the current segment (write + `fdatasync`) and starts one at `first`.
    fn roll(&mut self, first: Index) -> Result<()> {
        if self.active.is_some() {
            self.flush()?;
            self.sync_active()?;
            self.durable = self.last_index();
        }
        let path = self.dir.join(segment_name(first));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StorageError::io("create segment", &path, e));
        let f = match f {
            Ok(f) => f,
            Err(e) => return Err(self.poison(e)),
        };
        if let Err(e) = sync_dir(&self.dir) {
            return Err(self.poison(e));
        }
        self.segments.push(Segment {
            first,
            path,
            offsets: Vec::new(),
            len: 0,
        });
        self.active = Some(f);
        self.written = 0;
        self.dirty = false;
        Ok(())
    }

    /// Hands pending records to the kernel (one `pwrite`).
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (Some(f), Some(seg)) = (&self.active, self.segments.last()) else {
            unreachable!("pending bytes without an active segment");
        };
        let r = f
            .write_all_at(&self.pending, self.written)
            .map_err(|e| StorageError::io("write", &seg.path, e));
        // Even a failed write may have changed the file: from here on it is dirty.
        self.dirty = true;
        if let Err(e) = r {
            return Err(self.poison(e));
        }
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn sync_active(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let (Some(f), Some(seg)) = (&self.active, self.segments.last()) else {
            return Ok(());
        };
        #[cfg(test)]
        let injected = self.fail_next_sync.take();
        #[cfg(not(test))]
        let injected: Option<i32> = None;
        let r = match injected {
            Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
            None => f.sync_data(),
        };
        if let Err(e) = r {
            let e = StorageError::io("fdatasync", &seg.path, e);
            return Err(self.poison(e));
        }
        self.dirty = false;
        Ok(())
    }

    /// Group commit: writes everything appended so far and `fdatasync`s it. Returns the
    /// highest index now durable. After a failure the log is poisoned: this and every later
    /// call fail, because after a failed `fdatasync` the kernel may have dropped the dirty
    /// pages, and success would report as persisted what may not be.
    pub fn sync(&mut self) -> Result<Index> {
        self.usable()?;
        self.flush()?;
        self.sync_active()?;
        self.durable = self.last_index();
        Ok(self.durable)
    }

    /// Removes every entry above `index`, durably, before returning: later segments are
    /// deleted (newest first, the directory synced after each), the segment holding `index`
    /// is truncated and synced. The next append must be `index + 1`. `index` below the
    /// first index empties the log. Everything that remains is durable afterwards.
    pub fn truncate_after(&mut self, index: Index) -> Result<()> {
        self.usable()?;
        if index >= self.last_index() {
            return Ok(());
        }
        self.flush()?;
        while self.segments.last().is_some_and(|s| s.first > index) {
            self.active = None;
            let path = self.segments.last().unwrap().path.clone();
            if let Err(e) = std::fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove segment", &path, e))
                .and_then(|_| sync_dir(&self.dir))
            {
                return Err(self.poison(e));
            }
            self.segments.pop();
        }
        self.pending.clear();
        self.dirty = false;
        let Some(seg) = self.segments.last_mut() else {
            self.written = 0;
            self.durable = 0;
            return Ok(());
        };
        let keep = (index - seg.first + 1) as usize;
        if keep < seg.offsets.len() {
            seg.len = seg.offsets[keep];
            seg.offsets.truncate(keep);
        }
        let path = seg.path.clone();
        let len = seg.len;
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("open", &path, e))
            .and_then(|f| {
                f.set_len(len)
                    .map_err(|e| StorageError::io("truncate", &path, e))?;
                f.sync_data()
                    .map_err(|e| StorageError::io("fdatasync", &path, e))?;
                Ok(f)
            });
        match r {
            Ok(f) => {
                self.active = Some(f);
                self.written = len;
                self.durable = self.last_index();
                Ok(())
            }
            Err(e) => Err(self.poison(e)),
        }
    }

    /// Deletes every segment whose entries are all `<= index` (covered by a checkpoint),
    /// oldest first, syncing the directory after each. The last segment is always kept,
    /// so the log remembers where it ends. Returns how many segments were removed.
    pub fn truncate_before(&mut self, index: Index) -> Result<usize> {
        self.usable()?;
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[0].last() <= index {
            let path = self.segments[0].path.clone();
            if let Err(e) = std::fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove segment", &path, e))
                .and_then(|_| sync_dir(&self.dir))
            {
                return Err(self.poison(e));
            }
            self.segments.remove(0);
            removed += 1;
        }
        Ok(removed)
    }

    /// Reads one entry (including ones appended but not yet synced), verifying it again.
    pub fn read(&self, index: Index) -> Result<LogEntry> {
        let mut r = self.entries(index)?;
        r.next().unwrap_or_else(|| {
            Err(StorageError::NoSuchIndex {
                index,
                first: self.first_index().unwrap_or(0),
                last: self.last_index(),
            })
        })
    }

    /// Reads entries from `from` to the last index, in order, verifying each. Used to
    /// restore the in-memory log after [`open`](Self::open), and to serve catch-up.
    pub fn entries(&self, from: Index) -> Result<LogReader<'_>> {
        let first = self.first_index().unwrap_or(self.last_index() + 1);
        if from < first || from > self.last_index() + 1 {
            return Err(StorageError::NoSuchIndex {
                index: from,
                first,
                last: self.last_index(),
            });
        }
        Ok(LogReader {
            log: self,
            next: from,
            file: None,
            buf: Vec::new(),
        })
    }

    fn read_at(&self, seg_no: usize, index: Index, reader: &mut LogReader<'_>) -> Result<LogEntry> {
        let seg = &self.segments[seg_no];
        let (start, end) = seg.record_range(index);
        let is_last = seg_no + 1 == self.segments.len();
        let bytes: &[u8] = if is_last && start >= self.written {
            &self.pending[(start - self.written) as usize..(end - self.written) as usize]
        } else {
            if !matches!(reader.file, Some((n, _)) if n == seg_no) {
                let f =
                    File::open(&seg.path).map_err(|e| StorageError::io("open", &seg.path, e))?;
                reader.file = Some((seg_no, f));
            }
            let f = &reader.file.as_ref().unwrap().1;
            reader.buf.resize((end - start) as usize, 0);
            f.read_exact_at(&mut reader.buf, start)
                .map_err(|e| StorageError::io("read", &seg.path, e))?;
            &reader.buf
        };
        let (h, payload, _) =
            decode_record(bytes).map_err(|why| StorageError::corrupt(&seg.path, start, why))?;
        if h.index != index {
            return Err(StorageError::corrupt(
                &seg.path,
                start,
                format!("record holds index {} where index {index} belongs", h.index),
            ));
        }
        Ok(LogEntry {
            header: h,
            payload: payload.to_vec(),
        })
    }

    /// Test hook: the next `fdatasync` fails with `errno` (EIO cannot be provoked from a
    /// test without a faulty device).
    #[cfg(test)]
    pub(crate) fn inject_sync_failure(&mut self, errno: i32) {
        self.fail_next_sync = Some(errno);
    }
}

impl Drop for SegmentLog {
    /// Hands pending records to the kernel (best effort, like `BufWriter`); does not sync.
    fn drop(&mut self) {
        if self.poisoned.is_none() {
            let _ = self.flush();
        }
    }
}

/// Iterator over entries of a [`SegmentLog`], from [`SegmentLog::entries`].
#[derive(Debug)]
pub struct LogReader<'a> {
    log: &'a SegmentLog,
    next: Index,
    file: Option<(usize, File)>,
    buf: Vec<u8>,
}

impl Iterator for LogReader<'_> {
    type Item = Result<LogEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        let log = self.log;
        if self.next == 0 || self.next > log.last_index() {
            return None;
        }
        let index = self.next;
        let seg_no = log.segments.partition_point(|s| s.first <= index) - 1;
        let r = log.read_at(seg_no, index, self);
        self.next = if r.is_ok() { index + 1 } else { 0 };
        Some(r)
    }
}
