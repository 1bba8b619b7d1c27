//! The persister: [`crate::driver::Storage`] served by a background thread that owns a
//! [`SegmentLog`] and a [`PromiseStore`].
//!
//! - `submit` sends the entries over a channel; the thread takes **everything pending**
//!   (the first request blocks, the rest are drained without waiting), writes it, calls
//!   `sync` once for the whole group (group commit, no timer), then reports the seqs in
//!   order. `poll_persisted` only drains the completion channel.
//! - `save_promise` goes over the same channel and waits for the thread's answer, which
//!   comes after `fdatasync` of the promise file.
//! - An **append** (first index = last index + 1) is written in place: after a crash any
//!   prefix may survive, which the contract allows.
//! - A **rewrite** (first index at or below the last index) must survive whole or not at
//!   all. The thread first syncs what is pending (so the rewrite is against durable
//!   state), then writes the replacement to `rewrite.tmp`, `fdatasync`s it, renames it to
//!   `rewrite.log` and `fsync`s the directory: from that instant the rewrite is *decided*.
//!   Only then does it truncate the segment log, append the replacement, sync, and remove
//!   `rewrite.log` (directory synced). [`Persister::open`] deletes a `rewrite.tmp` (an
//!   undecided rewrite: the old entries are intact) and replays a `rewrite.log` (truncate +
//!   append + sync, idempotent), so a kill at any instruction leaves either the old log or
//!   the whole replacement.
//! - A failed write or sync (ENOSPC, EIO, ...) is reported once through `poll_persisted`
//!   (or `save_promise`) and the thread stops: nothing after it is acknowledged.

use super::segment::decode_record;
use super::{ensure_dir, sync_dir, LogOptions, PromiseStore, Recovery, Result, SegmentLog};
use super::{LogEntry, StorageError};
use crate::driver::Storage;
use crate::layout::{decode_entry, encode_entry, entry_size};
use crate::metrics::Metrics;
use crate::types::{Index, PromiseRecord};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The replacement of a rewrite in progress, before it is decided.
pub const REWRITE_TMP: &str = "rewrite.tmp";
/// A decided rewrite, replayed by [`Persister::open`] if found.
pub const REWRITE_LOG: &str = "rewrite.log";
/// Present while a replica that lost its data dir rebuilds it from the others: a restart
/// then rebuilds again instead of trusting a partial state.
pub const REJOIN_MARKER: &str = "rejoining";

/// Test hook: where the thread stops as if the process had been killed.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub(crate) enum CrashPoint {
    /// `rewrite.tmp` written (not synced or renamed).
    RewriteTmpWritten,
    /// `rewrite.log` renamed and the directory synced.
    RewriteDecided,
    /// The segment log truncated before the rewrite's first index.
    RewriteTruncated,
    /// This many replacement entries appended (and handed to the kernel on drop).
    RewriteAppended(usize),
    /// Replacement synced, `rewrite.log` not yet removed.
    RewriteSynced,
}

/// Tuning of a [`Persister`].
#[derive(Debug, Clone, Default)]
pub struct PersisterOptions {
    /// Tuning of the segment log.
    pub log: LogOptions,
    /// Where the thread records its log `fdatasync` latency (`fsync_latency`).
    pub metrics: Option<Arc<Metrics>>,
    #[cfg(test)]
    pub(crate) crash_at: Option<CrashPoint>,
    /// Test hook: the thread's first log `fdatasync` fails with this errno.
    #[cfg(test)]
    pub(crate) fail_sync: Option<i32>,
}

/// What [`Persister::open`] found on disk.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The durable promise record (ballot zero: never promised).
    pub promise: PromiseRecord,
    /// Every entry of the log, encoded, contiguous from `first_index`. The log may start
    /// after index 1 (segments covered by a checkpoint were dropped) and may hold entries a
    /// checkpoint covers (compaction keeps partly covered segments and need not be
    /// durable): the caller keeps those above its checkpoint for `Core::restore`, and
    /// refuses a gap between the checkpoint and `first_index`.
    pub entries: Vec<Arc<[u8]>>,
    /// Index of `entries[0]`; `None` when the log is empty.
    pub first_index: Option<Index>,
    /// The segment log's own recovery (torn tail, removed empty segment).
    pub log: Recovery,
    /// A decided rewrite that was replayed: (first index, entries).
    pub rewrite_replayed: Option<(Index, usize)>,
    /// An undecided rewrite (`rewrite.tmp`) was discarded.
    pub rewrite_discarded: bool,
    /// The [`REJOIN_MARKER`] is there: this replica lost its data dir and had not finished
    /// rebuilding it from the others. What is on disk must not be trusted: rebuild again.
    pub rejoining: bool,
}

enum Req {
    Promise(PromiseRecord, SyncSender<Result<()>>),
    Entries(u64, Vec<Arc<[u8]>>),
    Compact(Index),
}

/// The durable store of one replica. See the module documentation.
pub struct Persister {
    dir: PathBuf,
    tx: Option<Sender<Req>>,
    done: Receiver<Result<u64>>,
    failed: Option<String>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister")
            .field("failed", &self.failed)
            .finish()
    }
}

fn index_of(bytes: &[u8]) -> Result<Index> {
    decode_entry(bytes)
        .map(|(h, _)| h.index)
        .map_err(|e| StorageError::InvalidEntry(e.to_string()))
}

/// Parses a decided rewrite file: complete, contiguous records.
fn read_rewrite(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| StorageError::io("read", path, e))?;
    let mut out = Vec::new();
    let mut off = 0usize;
    let mut expect = None;
    while off < bytes.len() {
        let (h, _, size) = decode_record(&bytes[off..])
            .map_err(|why| StorageError::corrupt(path, off as u64, why))?;
        if expect.is_some_and(|e| e != h.index) {
            return Err(StorageError::corrupt(
                path,
                off as u64,
                format!("record holds index {} where {:?} belongs", h.index, expect),
            ));
        }
        expect = Some(h.index + 1);
        out.push(bytes[off..off + size].to_vec());
        off += size;
    }
    if out.is_empty() {
        return Err(StorageError::corrupt(path, 0, "empty rewrite file"));
    }
    Ok(out)
}

/// Replaces everything from the first entry's index with `entries` and syncs.
fn apply_rewrite<E: AsRef<[u8]>>(
    log: &mut SegmentLog,
    path: &Path,
    entries: &[E],
    #[cfg(test)] crash: Option<CrashPoint>,
) -> Result<()> {
    let first = index_of(entries[0].as_ref())?;
    if log.last_index() + 1 < first {
        return Err(StorageError::corrupt(
            path,
            0,
            format!(
                "rewrite from index {first} but the log ends at index {}",
                log.last_index()
            ),
        ));
    }
    log.truncate_after(first - 1)?;
    #[cfg(test)]
    if crash == Some(CrashPoint::RewriteTruncated) {
        return Err(crashed());
    }
    #[cfg(test)]
    let mut appended = 0;
    for e in entries {
        log.append_encoded(e.as_ref())?;
        #[cfg(test)]
        {
            appended += 1;
            if crash == Some(CrashPoint::RewriteAppended(appended)) {
                return Err(crashed());
            }
        }
    }
    log.sync()?;
    Ok(())
}

#[cfg(test)]
fn crashed() -> StorageError {
    StorageError::Poisoned {
        cause: "test crash point".into(),
    }
}

impl Persister {
    /// Opens the promise store and the segment log in `dir` (created if needed), finishes
    /// or discards an interrupted rewrite, reads every entry back, and starts the thread.
    pub fn open(dir: impl AsRef<Path>, opts: PersisterOptions) -> Result<(Persister, Recovered)> {
        let dir = dir.as_ref().to_path_buf();
        ensure_dir(&dir)?;
        let promise = PromiseStore::open(&dir)?;
        let (mut log, log_rec) = SegmentLog::open(&dir, opts.log)?;
        let mut rec = Recovered {
            rejoining: dir.join(REJOIN_MARKER).exists(),
            promise: promise.record(),
            log: log_rec,
            ..Recovered::default()
        };
        let tmp = dir.join(REWRITE_TMP);
        if tmp.exists() {
            std::fs::remove_file(&tmp).map_err(|e| StorageError::io("remove", &tmp, e))?;
            sync_dir(&dir)?;
            tracing::warn!(file = %tmp.display(), "durable log: undecided rewrite discarded");
            rec.rewrite_discarded = true;
        }
        let fin = dir.join(REWRITE_LOG);
        if fin.exists() {
            let entries = read_rewrite(&fin)?;
            let first = index_of(&entries[0])?;
            apply_rewrite(
                &mut log,
                &fin,
                &entries,
                #[cfg(test)]
                None,
            )?;
            std::fs::remove_file(&fin).map_err(|e| StorageError::io("remove", &fin, e))?;
            sync_dir(&dir)?;
            tracing::warn!(
                file = %fin.display(),
                first,
                entries = entries.len(),
                "durable log: decided rewrite replayed"
            );
            rec.rewrite_replayed = Some((first, entries.len()));
        }
        if let Some(first) = log.first_index() {
            rec.first_index = Some(first);
            let mut buf = Vec::new();
            for e in log.entries(first)? {
                let LogEntry { header, payload } = e?;
                buf.clear();
                encode_entry(&mut buf, &header, &payload);
                rec.entries.push(Arc::from(&buf[..]));
            }
        }
        #[cfg(test)]
        if let Some(errno) = opts.fail_sync {
            log.inject_sync_failure(errno);
        }
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let mut w = Writer {
            dir: dir.clone(),
            log,
            promise,
            metrics: opts.metrics,
            #[cfg(test)]
            crash_at: opts.crash_at,
        };
        let thread = std::thread::Builder::new()
            .name("persister".into())
            .spawn(move || w.run(rx, done_tx))
            .map_err(|e| StorageError::io("spawn persister thread", PathBuf::new(), e))?;
        Ok((
            Persister {
                dir,
                tx: Some(tx),
                done,
                failed: None,
                thread: Some(thread),
            },
            rec,
        ))
    }

    /// Marks `dir` as being rebuilt from the other replicas (its data was lost), durably,
    /// before the replica asks them for anything. Removed by `Storage::rejoined`.
    pub fn mark_rejoining(dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        ensure_dir(dir)?;
        let path = dir.join(REJOIN_MARKER);
        let f = std::fs::File::create(&path).map_err(|e| StorageError::io("create", &path, e))?;
        f.sync_all()
            .map_err(|e| StorageError::io("fsync", &path, e))?;
        sync_dir(dir)
    }

    fn gone(&self) -> StorageError {
        StorageError::Stopped {
            cause: self
                .failed
                .clone()
                .unwrap_or_else(|| "persister thread stopped".into()),
        }
    }
}

impl Storage for Persister {
    fn save_promise(&mut self, record: PromiseRecord) -> Result<()> {
        let (reply, wait) = mpsc::sync_channel(1);
        let tx = self.tx.as_ref().expect("open");
        if tx.send(Req::Promise(record, reply)).is_err() {
            return Err(self.gone());
        }
        match wait.recv() {
            Ok(r) => r,
            Err(_) => Err(self.gone()),
        }
    }

    fn submit(&mut self, seq: u64, entries: Vec<Arc<[u8]>>) -> Result<()> {
        if self.failed.is_some() {
            return Err(self.gone());
        }
        let tx = self.tx.as_ref().expect("open");
        tx.send(Req::Entries(seq, entries)).map_err(|_| self.gone())
    }

    fn begin_rejoin(&mut self) -> Result<()> {
        Self::mark_rejoining(&self.dir)
    }

    fn rejoined(&mut self) -> Result<()> {
        let path = self.dir.join(REJOIN_MARKER);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", &path, e)),
        }
    }

    fn compact(&mut self, upto: Index) -> Result<()> {
        if self.failed.is_some() {
            return Err(self.gone());
        }
        let tx = self.tx.as_ref().expect("open");
        tx.send(Req::Compact(upto)).map_err(|_| self.gone())
    }

    fn poll_persisted(&mut self, done: &mut Vec<u64>) -> Result<()> {
        if self.failed.is_some() {
            return Err(self.gone());
        }
        loop {
            match self.done.try_recv() {
                Ok(Ok(seq)) => done.push(seq),
                Ok(Err(e)) => {
                    self.failed = Some(e.to_string());
                    return Err(e);
                }
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.failed
                        .get_or_insert_with(|| "persister thread stopped".into());
                    return Err(self.gone());
                }
            }
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's state.
struct Writer {
    dir: PathBuf,
    log: SegmentLog,
    promise: PromiseStore,
    metrics: Option<Arc<Metrics>>,
    #[cfg(test)]
    crash_at: Option<CrashPoint>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Req>, done: Sender<Result<u64>>) {
        let mut group = Vec::new();
        let mut seqs = Vec::new();
        while let Ok(first) = rx.recv() {
            group.push(first);
            while let Ok(r) = rx.try_recv() {
                group.push(r);
            }
            let mut failure = None;
            for r in group.drain(..) {
                if failure.is_some() {
                    // Dropping a promise request's reply sender fails `save_promise`.
                    continue;
                }
                match r {
                    Req::Promise(b, reply) => {
                        let r = self.promise.store(b);
                        let failed = r.is_err();
                        let _ = reply.send(r);
                        if failed {
                            failure = Some(StorageError::PromiseFailed { ballot: b.ballot });
                        }
                    }
                    Req::Entries(seq, entries) => match self.write(&entries) {
                        Ok(()) => seqs.push(seq),
                        Err(e) => failure = Some(e),
                    },
                    Req::Compact(upto) => {
                        if let Err(e) = self.compact(upto) {
                            failure = Some(e);
                        }
                    }
                }
            }
            if failure.is_none() && !seqs.is_empty() {
                let started = std::time::Instant::now();
                if let Err(e) = self.log.sync() {
                    failure = Some(e);
                } else if let Some(m) = &self.metrics {
                    m.fsync_latency.observe(started.elapsed());
                }
            }
            if let Some(e) = failure {
                tracing::error!(error = %e, "persister: storage failure, stopping");
                let _ = done.send(Err(e));
                return;
            }
            for s in seqs.drain(..) {
                let _ = done.send(Ok(s));
            }
        }
    }

    fn write(&mut self, entries: &[Arc<[u8]>]) -> Result<()> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        let first = index_of(head)?;
        let last = self.log.last_index();
        // An empty log (new, or emptied by `compact` after a checkpoint was installed)
        // starts wherever the first submission does.
        if first == last + 1 || self.log.first_index().is_none() {
            for e in entries {
                self.log.append_encoded(e)?;
            }
            return Ok(());
        }
        if first > last + 1 {
            return Err(StorageError::NotContiguous {
                expected: last + 1,
                got: first,
            });
        }
        self.rewrite(entries)
    }

    /// Drops segments a checkpoint covers; empties the log when it ends below `upto` (a
    /// checkpoint installed from another replica), so the next append starts after it.
    fn compact(&mut self, upto: Index) -> Result<()> {
        if self.log.first_index().is_some() && self.log.last_index() <= upto {
            // Synced first: entries above the cut that were pending must not be half-dropped.
            self.log.sync()?;
            self.log.truncate_after(0)?;
        } else {
            self.log.truncate_before(upto)?;
        }
        Ok(())
    }

    fn rewrite(&mut self, entries: &[Arc<[u8]>]) -> Result<()> {
        // Against durable state only: what was appended before is synced first.
        self.log.sync()?;
        let tmp = self.dir.join(REWRITE_TMP);
        let fin = self.dir.join(REWRITE_LOG);
        let mut buf = Vec::new();
        for e in entries {
            let (h, _) = decode_entry(e).map_err(|e| StorageError::InvalidEntry(e.to_string()))?;
            buf.extend_from_slice(&e[..entry_size(h.len as usize)]);
        }
        let mut f = std::fs::File::create(&tmp).map_err(|e| StorageError::io("create", &tmp, e))?;
        f.write_all(&buf)
            .map_err(|e| StorageError::io("write", &tmp, e))?;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::RewriteTmpWritten) {
            return Err(crashed());
        }
        f.sync_data()
            .map_err(|e| StorageError::io("fdatasync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &fin).map_err(|e| StorageError::io("rename", &tmp, e))?;
        sync_dir(&self.dir)?;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::RewriteDecided) {
            return Err(crashed());
        }
        apply_rewrite(
            &mut self.log,
            &fin,
            entries,
            #[cfg(test)]
            self.crash_at,
        )?;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::RewriteSynced) {
            return Err(crashed());
        }
        std::fs::remove_file(&fin).map_err(|e| StorageError::io("remove", &fin, e))?;
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::EntryHeader;
    use crate::storage::testutil::{TempDir, TinyFs};
    use crate::types::Ballot;
    use std::time::{Duration, Instant};

    fn enc(index: Index, round: u64, len: usize) -> Arc<[u8]> {
        let payload: Vec<u8> = (0..len)
            .map(|i| (i as u64 ^ index.wrapping_mul(31) ^ round) as u8)
            .collect();
        let h = EntryHeader {
            index,
            ballot: Ballot::new(round, 1),
            commit: index - 1,
            len: len as u32,
            flags: 0,
        };
        let mut v = Vec::new();
        encode_entry(&mut v, &h, &payload);
        Arc::from(v)
    }

    fn range(from: Index, to: Index, round: u64) -> Vec<Arc<[u8]>> {
        (from..=to)
            .map(|i| enc(i, round, 100 + i as usize * 13 % 300))
            .collect()
    }

    fn opts() -> PersisterOptions {
        PersisterOptions {
            log: LogOptions {
                segment_bytes: 2048,
                write_buffer: 512,
            },
            ..PersisterOptions::default()
        }
    }

    /// Waits until `seqs` are all reported (in order), or an error.
    fn wait(p: &mut Persister, seqs: &[u64]) -> Result<()> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < seqs.len() {
            p.poll_persisted(&mut got)?;
            assert!(Instant::now() < deadline, "persister stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, seqs);
        Ok(())
    }

    fn wait_err(p: &mut Persister) -> StorageError {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            if let Err(e) = p.poll_persisted(&mut got) {
                return e;
            }
            assert!(Instant::now() < deadline, "no failure reported");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn same(a: &[Arc<[u8]>], b: &[Arc<[u8]>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x[..] == y[..])
    }

    #[test]
    fn persister_group_commit_promise_and_reopen() {
        let tmp = TempDir::new("pers-basic");
        let all = range(1, 60, 1);
        {
            let (mut p, rec) = Persister::open(tmp.path(), opts()).unwrap();
            assert!(rec.entries.is_empty() && rec.promise.ballot == Ballot::ZERO);
            p.save_promise(Ballot::new(3, 1).into()).unwrap();
            for (k, chunk) in all.chunks(7).enumerate() {
                p.submit(k as u64 + 1, chunk.to_vec()).unwrap();
            }
            p.submit(100, Vec::new()).unwrap();
            let mut seqs: Vec<u64> = (1..=9).collect();
            seqs.push(100);
            wait(&mut p, &seqs).unwrap();
            // A regression is refused, and the persister stops acknowledging.
            assert!(p.save_promise(Ballot::new(2, 1).into()).is_err());
            assert!(p.submit(101, range(61, 61, 1)).is_err() || wait(&mut p, &[101]).is_err());
        }
        let (_p, rec) = Persister::open(tmp.path(), opts()).unwrap();
        assert_eq!(rec.promise, Ballot::new(3, 1).into());
        assert!(same(&rec.entries, &all));
    }

    #[test]
    fn persister_rewrite_replaces_the_suffix() {
        let tmp = TempDir::new("pers-rewrite");
        let old = range(1, 40, 1);
        let new = range(15, 22, 2);
        {
            let (mut p, _) = Persister::open(tmp.path(), opts()).unwrap();
            p.submit(1, old.clone()).unwrap();
            // Rewrite queued behind the append it overwrites (one group).
            p.submit(2, new.clone()).unwrap();
            p.submit(3, range(23, 25, 2)).unwrap();
            wait(&mut p, &[1, 2, 3]).unwrap();
            // A rewrite from index 1.
            p.submit(4, range(1, 3, 3)).unwrap();
            wait(&mut p, &[4]).unwrap();
        }
        let (_p, rec) = Persister::open(tmp.path(), opts()).unwrap();
        assert!(same(&rec.entries, &range(1, 3, 3)));
        assert!(!tmp.path().join(REWRITE_LOG).exists());
        let tmp = TempDir::new("pers-rewrite2");
        {
            let (mut p, _) = Persister::open(tmp.path(), opts()).unwrap();
            p.submit(1, old.clone()).unwrap();
            p.submit(2, new.clone()).unwrap();
            p.submit(3, range(23, 25, 2)).unwrap();
            wait(&mut p, &[1, 2, 3]).unwrap();
            // A gap is refused.
            p.submit(4, range(30, 31, 2)).unwrap();
            assert!(wait_err(&mut p).to_string().contains("expected 26"));
        }
        let (_p, rec) = Persister::open(tmp.path(), opts()).unwrap();
        let mut want = old[..14].to_vec();
        want.extend(new.iter().cloned());
        want.extend(range(23, 25, 2));
        assert!(same(&rec.entries, &want));
    }

    #[test]
    fn persister_compact_then_reopen_starts_after_the_cut() {
        let tmp = TempDir::new("pers-compact");
        let all = range(1, 60, 1);
        {
            let (mut p, _) = Persister::open(tmp.path(), opts()).unwrap();
            p.submit(1, all.clone()).unwrap();
            p.compact(30).unwrap();
            // Compaction has no completion of its own: an empty submission behind it does.
            p.submit(2, Vec::new()).unwrap();
            wait(&mut p, &[1, 2]).unwrap();
        }
        let first = {
            let (mut p, rec) = Persister::open(tmp.path(), opts()).unwrap();
            let first = rec.first_index.expect("not empty");
            // Whole segments at or below the cut are gone; a partly covered one stays.
            assert!(first > 1 && first <= 31, "first index {first}");
            assert!(same(&rec.entries, &all[first as usize - 1..]));
            // Appends go on after the old end.
            p.submit(1, range(61, 70, 1)).unwrap();
            wait(&mut p, &[1]).unwrap();
            // A cut past the end (a checkpoint installed from another replica) empties
            // the log; the next submission starts right after it.
            p.compact(100).unwrap();
            p.submit(2, range(101, 110, 4)).unwrap();
            wait(&mut p, &[2]).unwrap();
            first
        };
        assert!(first > 1);
        let (mut p, rec) = Persister::open(tmp.path(), opts()).unwrap();
        assert_eq!(rec.first_index, Some(101));
        assert!(same(&rec.entries, &range(101, 110, 4)));
        // A rewrite and appends continue from there as usual.
        p.submit(1, range(108, 112, 5)).unwrap();
        wait(&mut p, &[1]).unwrap();
        drop(p);
        let (p, rec) = Persister::open(tmp.path(), opts()).unwrap();
        let mut want = range(101, 107, 4);
        want.extend(range(108, 112, 5));
        assert!(same(&rec.entries, &want));
        // Compacting an empty log (fresh replica) is harmless.
        drop(p);
        let tmp2 = TempDir::new("pers-compact-empty");
        let (mut p2, rec2) = Persister::open(tmp2.path(), opts()).unwrap();
        assert_eq!(rec2.first_index, None);
        p2.compact(50).unwrap();
        p2.submit(1, range(51, 52, 1)).unwrap();
        wait(&mut p2, &[1]).unwrap();
        drop(p2);
        let (_p, rec2) = Persister::open(tmp2.path(), opts()).unwrap();
        assert_eq!(rec2.first_index, Some(51));
        assert!(same(&rec2.entries, &range(51, 52, 1)));
    }

    /// A rewrite interrupted at every step recovers to the old log or the whole
    /// replacement, never a mix that lost persisted entries.
    #[test]
    fn persister_rewrite_is_atomic_across_a_crash_at_any_step() {
        let old = range(1, 30, 1);
        let new = range(12, 20, 2);
        let mut want_new = old[..11].to_vec();
        want_new.extend(new.iter().cloned());
        let mut points = vec![
            (CrashPoint::RewriteTmpWritten, false),
            (CrashPoint::RewriteDecided, true),
            (CrashPoint::RewriteTruncated, true),
            (CrashPoint::RewriteSynced, true),
        ];
        for k in 1..=new.len() {
            points.push((CrashPoint::RewriteAppended(k), true));
        }
        for (point, decided) in points {
            // Each also with the last segment cut mid-record after the crash (power loss of
            // unsynced appends), where that is a legal crash outcome.
            for cut in [false, true] {
                let tmp = TempDir::new("pers-crash");
                {
                    let (mut p, _) = Persister::open(tmp.path(), opts()).unwrap();
                    p.submit(1, old.clone()).unwrap();
                    wait(&mut p, &[1]).unwrap();
                }
                let mut o = opts();
                o.crash_at = Some(point);
                {
                    let (mut p, rec) = Persister::open(tmp.path(), o).unwrap();
                    assert!(same(&rec.entries, &old));
                    p.submit(2, new.clone()).unwrap();
                    wait_err(&mut p);
                }
                let appended = matches!(point, CrashPoint::RewriteAppended(_));
                if cut && appended {
                    let mut segs: Vec<_> = std::fs::read_dir(tmp.path())
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .filter(|p| p.to_str().unwrap().contains("seg-"))
                        .collect();
                    segs.sort();
                    let last = segs.last().unwrap();
                    let len = std::fs::metadata(last).unwrap().len();
                    // Cut inside the last record only if it belongs to the replacement.
                    let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
                    f.set_len(len.saturating_sub(5)).unwrap();
                }
                let (_p, rec) = Persister::open(tmp.path(), opts())
                    .unwrap_or_else(|e| panic!("{point:?} cut={cut}: {e}"));
                let want = if decided { &want_new } else { &old };
                assert!(
                    same(&rec.entries, want),
                    "{point:?} cut={cut}: recovered {} entries",
                    rec.entries.len()
                );
                assert_eq!(rec.rewrite_discarded, !decided, "{point:?}");
                assert_eq!(rec.rewrite_replayed.is_some(), decided, "{point:?}");
                assert!(!tmp.path().join(REWRITE_LOG).exists());
                assert!(!tmp.path().join(REWRITE_TMP).exists());
            }
        }
    }

    #[test]
    fn persister_sync_failure_stops_acknowledging() {
        let tmp = TempDir::new("pers-eio");
        let mut o = opts();
        o.fail_sync = Some(libc::EIO);
        let (mut p, _) = Persister::open(tmp.path(), o).unwrap();
        p.submit(1, range(1, 5, 1)).unwrap();
        let e = wait_err(&mut p);
        assert!(e.to_string().contains("fdatasync"), "{e}");
        // Sticky: every later call fails.
        assert!(p.submit(2, range(6, 6, 1)).is_err());
        assert!(p.poll_persisted(&mut Vec::new()).is_err());
        assert!(p.save_promise(Ballot::new(1, 1).into()).is_err());
    }

    #[test]
    fn persister_full_disk_is_reported() {
        let Some(fs) = TinyFs::mount("pers-full", 256, false) else {
            return;
        };
        let (mut p, _) = Persister::open(fs.path(), opts()).unwrap();
        let mut seq = 0;
        let err = loop {
            seq += 1;
            let from = (seq - 1) * 10 + 1;
            if let Err(e) = p.submit(seq, range(from, from + 9, 1)) {
                break e;
            }
            if let Err(e) = wait(&mut p, &[seq]) {
                break e;
            }
            assert!(seq < 10_000, "tmpfs never filled");
        };
        assert!(err.is_no_space(), "{err}");
        assert!(
            err.to_string().contains(fs.path().to_str().unwrap()),
            "{err}"
        );
    }
}
