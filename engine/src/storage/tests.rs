//! Tests of the storage layer: `cargo test -p ballot storage`.

use super::testutil::{TempDir, TinyFs};
use super::*;
use crate::layout::{encode_entry, entry_size, flags, EntryHeader};
use crate::types::{Ballot, PromiseRecord};
use proptest::prelude::*;
use std::io::{Read, Write};
use std::path::Path;

fn entry(index: Index, round: u64, len: usize) -> LogEntry {
    let payload = (0..len)
        .map(|i| (i as u64 ^ index.wrapping_mul(31) ^ round) as u8)
        .collect();
    LogEntry::new(index, Ballot::new(round, 1), index - 1, 0, payload)
}

fn small_opts() -> LogOptions {
    LogOptions {
        segment_bytes: 4096,
        write_buffer: 1000,
    }
}

fn read_all(log: &SegmentLog) -> Vec<LogEntry> {
    match log.first_index() {
        None => Vec::new(),
        Some(f) => log.entries(f).unwrap().map(|e| e.unwrap()).collect(),
    }
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

#[test]
fn storage_append_sync_reopen_across_segments() {
    let tmp = TempDir::new("basic");
    let want: Vec<LogEntry> = (1..=200)
        .map(|i| entry(i, 1, (i as usize * 37) % 700))
        .collect();
    {
        let (mut log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
        assert_eq!(rec, Recovery::default());
        assert_eq!(log.append(&want[..120]).unwrap(), 120);
        // Sealing a segment syncs it, so some prefix is durable already, not the tail.
        assert!(log.durable_index() > 0 && log.durable_index() < 120);
        assert_eq!(log.sync().unwrap(), 120);
        log.append(&want[120..]).unwrap();
        // Unsynced entries can be read back (from the pending buffer or the page cache).
        assert_eq!(log.read(200).unwrap(), want[199]);
        assert_eq!(log.sync().unwrap(), 200);
        assert!(log.segment_count() > 5);
    }
    let (log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    assert_eq!(rec.first_index, Some(1));
    assert_eq!(rec.last_index, 200);
    assert_eq!(rec.entries, 200);
    assert!(rec.torn_tail.is_none());
    assert_eq!(log.durable_index(), 200);
    assert_eq!(read_all(&log), want);
    assert_eq!(log.read(77).unwrap(), want[76]);
    assert!(matches!(
        log.read(201),
        Err(StorageError::NoSuchIndex { .. })
    ));
}

#[test]
fn storage_append_rules() {
    let tmp = TempDir::new("rules");
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    // An empty log starts anywhere (after a checkpoint), then indexes are contiguous.
    log.append(&[entry(10, 1, 5)]).unwrap();
    assert!(matches!(
        log.append(&[entry(12, 1, 5)]),
        Err(StorageError::NotContiguous {
            expected: 11,
            got: 12
        })
    ));
    assert!(matches!(
        log.append(&[entry(10, 2, 5)]),
        Err(StorageError::NotContiguous { .. })
    ));
    let mut bad = entry(11, 1, 5);
    bad.header.len = 4;
    assert!(matches!(
        log.append(&[bad]),
        Err(StorageError::InvalidEntry(_))
    ));
    let mut wrap = entry(11, 1, 5);
    wrap.header.flags = flags::WRAP;
    assert!(matches!(
        log.append(&[wrap]),
        Err(StorageError::InvalidEntry(_))
    ));
    // Encoded bytes straight from the ring layout.
    let e = entry(11, 1, 13);
    let mut buf = Vec::new();
    encode_entry(&mut buf, &e.header, &e.payload);
    buf.extend_from_slice(&[0xAA; 16]); // trailing bytes of the ring are ignored
    assert_eq!(log.append_encoded(&buf).unwrap(), 11);
    buf[45] ^= 1;
    assert!(matches!(
        log.append_encoded(&buf),
        Err(StorageError::InvalidEntry(_))
    ));
    assert_eq!(log.sync().unwrap(), 11);
    assert_eq!(log.read(11).unwrap(), e);
    // A second handle on the same directory is refused.
    assert!(matches!(
        SegmentLog::open(tmp.path(), small_opts()),
        Err(StorageError::Locked { .. })
    ));
}

#[test]
fn storage_truncate_after_then_overwrite() {
    let tmp = TempDir::new("trunc");
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    let old: Vec<_> = (1..=60).map(|i| entry(i, 1, 300)).collect();
    log.append(&old).unwrap();
    log.sync().unwrap();
    let segs_before = log.segment_count();
    log.truncate_after(20).unwrap();
    assert_eq!(log.last_index(), 20);
    assert_eq!(log.durable_index(), 20);
    assert!(log.segment_count() < segs_before);
    assert!(matches!(
        log.append(&[entry(22, 2, 1)]),
        Err(StorageError::NotContiguous { expected: 21, .. })
    ));
    let new: Vec<_> = (21..=30).map(|i| entry(i, 2, 100)).collect();
    log.append(&new).unwrap();
    log.sync().unwrap();
    drop(log);
    let (log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    assert!(rec.torn_tail.is_none());
    let got = read_all(&log);
    assert_eq!(got.len(), 30);
    assert_eq!(&got[..20], &old[..20]);
    assert_eq!(&got[20..], &new[..]);
    drop(log);
    // Truncating below the first index empties the log.
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    log.truncate_after(0).unwrap();
    assert_eq!(log.first_index(), None);
    assert_eq!(log.last_index(), 0);
    assert!(segment_files(tmp.path()).is_empty());
}

#[test]
fn storage_truncate_before_deletes_covered_segments() {
    let tmp = TempDir::new("before");
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    log.append(&(1..=100).map(|i| entry(i, 1, 200)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    let n = log.segment_count();
    let removed = log.truncate_before(50).unwrap();
    assert!(removed > 0 && removed < n);
    let first = log.first_index().unwrap();
    assert!(first <= 51, "entries after the checkpoint are kept");
    assert_eq!(segment_files(tmp.path()).len(), n - removed);
    // Everything covered: all but the last segment go.
    log.truncate_before(100).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.last_index(), 100);
    drop(log);
    let (log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    assert_eq!(rec.last_index, 100);
    assert_eq!(read_all(&log).last().unwrap(), &entry(100, 1, 200));
}

/// Truncates the last record of the last segment at `cut` bytes into it.
fn tear_last_record(dir: &Path, cut_frac: f64) -> (std::path::PathBuf, u64) {
    let last = segment_files(dir).pop().unwrap();
    let bytes = std::fs::read(&last).unwrap();
    // Find the start of the last record by walking the records.
    let mut off = 0;
    let mut starts = vec![];
    while off < bytes.len() {
        starts.push(off);
        let (h, _) = crate::layout::decode_entry(&bytes[off..]).unwrap();
        off += entry_size(h.len as usize);
    }
    let start = *starts.last().unwrap();
    let rec_len = bytes.len() - start;
    let cut = start + 1 + ((rec_len - 2) as f64 * cut_frac) as usize;
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(cut as u64).unwrap();
    (last, start as u64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random batches, syncs, truncate_after (Paxos overwrites) and reopens: the log read
    /// back always equals the model.
    #[test]
    fn storage_prop_round_trip(
        ops in proptest::collection::vec((0u8..10, 1usize..6, 0usize..900, 0u64..40), 1..30),
        seg in 600u64..5000,
        wbuf in 0usize..3000,
    ) {
        let tmp = TempDir::new("prop");
        let opts = LogOptions { segment_bytes: seg, write_buffer: wbuf };
        let (mut log, _) = SegmentLog::open(tmp.path(), opts).unwrap();
        let mut model: Vec<LogEntry> = Vec::new();
        let mut round = 1;
        for (op, count, len, back) in ops {
            match op {
                0..=5 => {
                    let batch: Vec<_> = (0..count)
                        .map(|k| entry(model.len() as u64 + 1 + k as u64, round, (len * (k + 1)) % 1500))
                        .collect();
                    log.append(&batch).unwrap();
                    model.extend(batch);
                }
                6 => {
                    let d = log.sync().unwrap();
                    prop_assert_eq!(d, model.len() as u64);
                }
                7 | 8 => {
                    let to = (model.len() as u64).saturating_sub(back);
                    round += 1;
                    log.truncate_after(to).unwrap();
                    model.truncate(to as usize);
                    prop_assert_eq!(log.last_index(), to);
                    prop_assert!(log.durable_index() <= to);
                }
                _ => {
                    drop(log);
                    let (l, rec) = SegmentLog::open(tmp.path(), opts).unwrap();
                    prop_assert!(rec.torn_tail.is_none());
                    prop_assert_eq!(rec.last_index, model.len() as u64);
                    log = l;
                }
            }
            prop_assert_eq!(log.last_index(), model.len() as u64);
        }
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), opts).unwrap();
        prop_assert!(rec.torn_tail.is_none());
        prop_assert_eq!(read_all(&log), model);
    }

    /// A record cut anywhere inside (a torn last write) is dropped; the rest recovers.
    #[test]
    fn storage_prop_torn_tail(frac in 0.0f64..1.0, n in 2u64..40, len in 0usize..2000) {
        let tmp = TempDir::new("torn");
        let want: Vec<_> = (1..=n).map(|i| entry(i, 1, (len + i as usize * 13) % 2000)).collect();
        {
            let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
            log.append(&want).unwrap();
            log.sync().unwrap();
        }
        let (file, start) = tear_last_record(tmp.path(), frac);
        let (mut log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
        let torn = rec.torn_tail.clone();
        if start == 0 {
            // The torn record was alone in its segment: the segment is removed.
            prop_assert_eq!(rec.removed_empty_segment.as_ref(), Some(&file));
        }
        let torn = torn.expect("torn tail reported");
        prop_assert_eq!(&torn.file, &file);
        prop_assert_eq!(torn.offset, start);
        prop_assert_eq!(rec.last_index, n - 1);
        prop_assert_eq!(read_all(&log), want[..n as usize - 1].to_vec());
        // The log goes on from the cut, and the next open is clean.
        log.append(&[entry(n, 2, 10)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
        prop_assert!(rec.torn_tail.is_none());
        prop_assert_eq!(log.read(n).unwrap(), entry(n, 2, 10));
    }
}

#[test]
fn storage_garbage_after_last_record_is_a_torn_tail() {
    let tmp = TempDir::new("garbage");
    let want: Vec<_> = (1..=10).map(|i| entry(i, 1, 100)).collect();
    {
        let (mut log, _) = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap();
        log.append(&want).unwrap();
        log.sync().unwrap();
    }
    let file = segment_files(tmp.path()).pop().unwrap();
    let good_len = std::fs::metadata(&file).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    let garbage: Vec<u8> = (0..777u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all(&garbage).unwrap();
    // And zeros, as a crash with preallocated or unwritten blocks leaves.
    f.write_all(&[0u8; 4096]).unwrap();
    drop(f);
    let (log, rec) = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap();
    let torn = rec.torn_tail.unwrap();
    assert_eq!(torn.file, file);
    assert_eq!(torn.offset, good_len);
    assert_eq!(torn.discarded_bytes, 777 + 4096);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), good_len);
    assert_eq!(read_all(&log), want);
}

#[test]
fn storage_flipped_byte_in_the_middle_refuses_to_open() {
    let tmp = TempDir::new("flip");
    let want: Vec<_> = (1..=10).map(|i| entry(i, 1, 100)).collect();
    {
        let (mut log, _) = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap();
        log.append(&want).unwrap();
        log.sync().unwrap();
    }
    let file = segment_files(tmp.path()).pop().unwrap();
    let rec_size = entry_size(100) as u64;
    let bad_off = 3 * rec_size; // record of index 4
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[(bad_off + 60) as usize] ^= 0x10; // a payload byte
    std::fs::write(&file, &bytes).unwrap();
    let err = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap_err();
    match &err {
        StorageError::Corrupt {
            file: f,
            offset,
            reason,
        } => {
            assert_eq!(f, &file);
            assert_eq!(*offset, bad_off);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(file.to_str().unwrap()), "{msg}");
    assert!(msg.contains(&format!("offset {bad_off}")), "{msg}");
    // The file was not touched by the refused open.
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // A flipped padding byte (not covered by the layout checksum) is caught too.
    let tmp = TempDir::new("flip-pad");
    {
        let (mut log, _) = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap();
        log.append(&(1..=5).map(|i| entry(i, 1, 3)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
    }
    let file = segment_files(tmp.path()).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[40 + 4] = 0xff; // padding of record 1
    std::fs::write(&file, &bytes).unwrap();
    let err = SegmentLog::open(tmp.path(), LogOptions::default()).unwrap_err();
    assert!(
        matches!(err, StorageError::Corrupt { offset: 0, .. }),
        "{err}"
    );
}

#[test]
fn storage_corruption_in_a_sealed_segment_refuses_to_open() {
    let tmp = TempDir::new("sealed");
    {
        let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
        log.append(&(1..=50).map(|i| entry(i, 1, 300)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
    }
    let files = segment_files(tmp.path());
    assert!(files.len() >= 3);
    // Tear the tail of a non-last segment: not a torn tail, since a later segment exists.
    let victim = &files[1];
    let len = std::fs::metadata(victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let err = SegmentLog::open(tmp.path(), small_opts()).unwrap_err();
    match &err {
        StorageError::Corrupt { file, reason, .. } => {
            assert_eq!(file, victim);
            assert!(reason.contains("sealed segment"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A missing segment in the middle is a gap.
    std::fs::remove_file(victim).unwrap();
    let err = SegmentLog::open(tmp.path(), small_opts()).unwrap_err();
    assert!(
        matches!(&err, StorageError::Corrupt { file, offset: 0, .. } if file == &files[2]),
        "{err}"
    );
}

#[test]
fn storage_failed_sync_poisons_the_log() {
    let tmp = TempDir::new("poison");
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    log.append(&[entry(1, 1, 10)]).unwrap();
    assert_eq!(log.sync().unwrap(), 1);
    log.append(&[entry(2, 1, 10)]).unwrap();
    log.inject_sync_failure(libc::EIO);
    let err = log.sync().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(err.to_string().starts_with("fdatasync "), "{err}");
    assert!(
        err.to_string().contains("seg-00000000000000000001.log"),
        "{err}"
    );
    assert!(log.is_poisoned());
    // Never again reports success, even though a retried fdatasync would "succeed".
    assert!(matches!(log.sync(), Err(StorageError::Poisoned { .. })));
    assert!(matches!(
        log.append(&[entry(3, 1, 10)]),
        Err(StorageError::Poisoned { .. })
    ));
    assert!(matches!(
        log.truncate_after(1),
        Err(StorageError::Poisoned { .. })
    ));
    assert_eq!(log.durable_index(), 1);
    drop(log);
    // Reopening runs recovery and starts clean.
    let (log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    assert!(!log.is_poisoned());
    assert!(log.last_index() >= 1);
}

#[test]
fn storage_unwritable_directory_is_a_clear_error() {
    // Root ignores permission bits, so use a path that cannot exist: below a regular file.
    let tmp = TempDir::new("unwritable");
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let dir = file.join("log");
    let err = SegmentLog::open(&dir, LogOptions::default()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR), "{err}");
    assert!(err.to_string().contains("create dir"), "{err}");
    assert!(err.to_string().contains(dir.to_str().unwrap()), "{err}");
    assert!(PromiseStore::open(&dir).is_err());
    assert!(SnapshotStore::open(&dir).is_err());

    // A read-only file system refuses root too (when this process may mount one).
    if let Some(ro) = TinyFs::mount("ro", 64, true) {
        let err = SegmentLog::open(ro.path(), LogOptions::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        assert!(
            err.to_string().contains(ro.path().to_str().unwrap()),
            "{err}"
        );
    }
}

#[test]
fn storage_full_disk_is_a_typed_error_and_recovers() {
    let Some(fs) = TinyFs::mount("full", 256, false) else {
        return; // documented in docs/durability.md: needs CAP_SYS_ADMIN to mount a tmpfs
    };
    let (mut log, _) = SegmentLog::open(fs.path(), small_opts()).unwrap();
    // Opened before the disk fills: its file is allocated up front.
    let mut promise = PromiseStore::open(fs.path()).unwrap();
    let mut i = 1;
    let mut synced = 0;
    let err = loop {
        if let Err(e) = log.append(&[entry(i, 1, 1000)]) {
            break e;
        }
        i += 1;
        if i % 7 == 0 {
            match log.sync() {
                Ok(d) => synced = d,
                Err(e) => break e,
            }
        }
        assert!(i < 10_000, "tmpfs never filled");
    };
    assert!(err.is_no_space(), "{err}");
    assert!(
        err.to_string().contains(fs.path().to_str().unwrap()),
        "{err}"
    );
    assert!(matches!(log.sync(), Err(StorageError::Poisoned { .. })));
    drop(log);
    // After the failure, reopen: everything synced is there; a partial write is a torn tail.
    let (log, rec) = SegmentLog::open(fs.path(), small_opts()).unwrap();
    assert!(rec.last_index >= synced, "{rec:?} synced {synced}");
    let all = read_all(&log);
    assert_eq!(all.len() as u64, rec.last_index);
    for (k, e) in all.iter().enumerate() {
        assert_eq!(e, &entry(k as u64 + 1, 1, 1000));
    }

    // The promise store on the full disk: its file is allocated, so stores still work.
    promise.store(Ballot::new(5, 1)).unwrap();
    promise.store(Ballot::new(6, 1)).unwrap();
    drop(promise);
    assert_eq!(
        PromiseStore::open(fs.path()).unwrap().promised(),
        Ballot::new(6, 1)
    );
}

#[test]
fn storage_promise_store_survives_reopen() {
    let tmp = TempDir::new("promise");
    {
        let mut p = PromiseStore::open(tmp.path()).unwrap();
        assert_eq!(p.promised(), Ballot::ZERO);
        assert_eq!(p.load().unwrap(), Ballot::ZERO.into());
        p.store(Ballot::new(1, 2)).unwrap();
        p.store(Ballot::new(3, 0)).unwrap();
        p.store(Ballot::new(3, 0)).unwrap(); // same again: no-op
        assert!(matches!(
            p.store(Ballot::new(2, 9)),
            Err(StorageError::BallotRegression { .. })
        ));
        p.store(Ballot::new(7, 1)).unwrap();
        assert_eq!(p.load().unwrap(), Ballot::new(7, 1).into());
        assert!(matches!(
            PromiseStore::open(tmp.path()),
            Err(StorageError::Locked { .. })
        ));
    }
    let p = PromiseStore::open(tmp.path()).unwrap();
    assert_eq!(p.promised(), Ballot::new(7, 1));
    drop(p);

    // A torn store (the newest slot damaged) falls back to the previous promise.
    let path = tmp.path().join("promise");
    let mut bytes = std::fs::read(&path).unwrap();
    let newest = if bytes[8] > bytes[512 + 8] { 0 } else { 512 };
    bytes[newest + 17] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let mut p = PromiseStore::open(tmp.path()).unwrap();
    assert_eq!(p.promised(), Ballot::new(3, 0));
    p.store(Ballot::new(9, 9)).unwrap();
    drop(p);
    assert_eq!(
        PromiseStore::open(tmp.path()).unwrap().promised(),
        Ballot::new(9, 9)
    );

    // Both slots damaged is corruption, named with the file.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    bytes[512 + 3] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = PromiseStore::open(tmp.path()).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()));
}

#[test]
fn storage_promise_store_keeps_the_blank_incarnation() {
    let tmp = TempDir::new("promise-blank");
    let blank = PromiseRecord {
        ballot: Ballot::new(2, 1),
        blank: 0xabcd_0001,
        saw_chosen: false,
    };
    {
        let mut p = PromiseStore::open(tmp.path()).unwrap();
        p.store(blank).unwrap();
    }
    let mut p = PromiseStore::open(tmp.path()).unwrap();
    assert_eq!(p.record(), blank);
    assert_eq!(p.load().unwrap(), blank);
    // Established: the same ballot, no longer blank, is a new record; so is learning that
    // a value was chosen.
    p.store(Ballot::new(2, 1)).unwrap();
    let chosen = PromiseRecord {
        saw_chosen: true,
        ..Ballot::new(2, 1).into()
    };
    p.store(chosen).unwrap();
    drop(p);
    let p = PromiseStore::open(tmp.path()).unwrap();
    assert_eq!(p.record(), chosen);
}

#[test]
fn storage_promise_store_loads_version_1_slots() {
    let tmp = TempDir::new("promise-v1");
    drop(PromiseStore::open(tmp.path()).unwrap());
    // A slot as version 1 wrote it: magic | seq | ballot | crc32c of the 24 bytes | 0.
    let mut slot = [0u8; 32];
    slot[0..8].copy_from_slice(b"BALPROM1");
    slot[8..16].copy_from_slice(&1u64.to_le_bytes());
    slot[16..24].copy_from_slice(&Ballot::new(4, 2).0.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..24]);
    slot[24..28].copy_from_slice(&crc.to_le_bytes());
    let path = tmp.path().join("promise");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[512..544].copy_from_slice(&slot);
    std::fs::write(&path, &bytes).unwrap();
    let mut p = PromiseStore::open(tmp.path()).unwrap();
    // Version 1 restored every replica that had promised as one that knew of a choice.
    let v1 = PromiseRecord {
        saw_chosen: true,
        ..Ballot::new(4, 2).into()
    };
    assert_eq!(p.record(), v1);
    p.store(Ballot::new(5, 2)).unwrap();
    drop(p);
    assert_eq!(
        PromiseStore::open(tmp.path()).unwrap().promised(),
        Ballot::new(5, 2)
    );
}

#[test]
fn storage_promise_failed_sync_poisons() {
    let tmp = TempDir::new("promise-poison");
    let mut p = PromiseStore::open(tmp.path()).unwrap();
    p.store(Ballot::new(1, 1)).unwrap();
    p.inject_sync_failure(libc::EIO);
    assert_eq!(
        p.store(Ballot::new(2, 1)).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(p.promised(), Ballot::new(1, 1));
    assert!(matches!(
        p.store(Ballot::new(3, 1)),
        Err(StorageError::Poisoned { .. })
    ));
}

pub(super) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn storage_snapshot_round_trip_and_flipped_byte() {
    let tmp = TempDir::new("snap");
    let store = SnapshotStore::open(tmp.path()).unwrap();
    let data = pseudo_random((5 << 20) + 12345, 42);
    let mut w = store.begin(1000, Ballot::new(4, 2)).unwrap();
    // Odd-sized writes crossing chunk boundaries.
    for piece in data.chunks(77_777) {
        w.write_all(piece).unwrap();
    }
    let meta = w.finish().unwrap();
    assert_eq!(meta.index, 1000);
    assert_eq!(meta.ballot, Ballot::new(4, 2));
    assert_eq!(meta.len, data.len() as u64);
    assert_eq!(store.latest().unwrap(), Some(meta.clone()));
    assert_eq!(store.verify(1000).unwrap(), meta);
    let mut back = Vec::new();
    store
        .open_snapshot(1000)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "snapshot data differs");

    // Flip one byte in the middle of the data.
    let mut bytes = std::fs::read(&meta.path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&meta.path, &bytes).unwrap();
    let err = store.verify(1000).unwrap_err();
    match &err {
        StorageError::Corrupt {
            file,
            offset,
            reason,
        } => {
            assert_eq!(file, &meta.path);
            assert!(*offset <= at as u64 && at as u64 - *offset <= (1 << 20) + 8);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let mut sink = Vec::new();
    let io_err = store
        .open_snapshot(1000)
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err();
    assert_eq!(io_err.kind(), std::io::ErrorKind::InvalidData);
    // Only verified chunks were handed out before the error.
    assert_eq!(sink.len() % (1 << 20), 0);
    assert_eq!(&sink[..], &data[..sink.len()]);

    // A damaged trailer: the snapshot is not listed as complete.
    bytes[at] ^= 0x01;
    let n = bytes.len();
    bytes[n - 20] ^= 0x01;
    std::fs::write(&meta.path, &bytes).unwrap();
    assert_eq!(store.latest().unwrap(), None);
    assert!(matches!(
        store.open_snapshot(1000),
        Err(StorageError::Corrupt { .. })
    ));
}

#[test]
fn storage_snapshot_retain_and_unfinished() {
    let tmp = TempDir::new("snap-retain");
    let store = SnapshotStore::open(tmp.path()).unwrap();
    for i in 1..=5u64 {
        let mut w = store
            .begin_with_chunk(i * 10, Ballot::new(i, 0), 1000)
            .unwrap();
        w.write_all(&pseudo_random(i as usize * 999, i)).unwrap();
        w.finish().unwrap();
    }
    // An empty snapshot is fine too.
    store
        .begin(60, Ballot::new(6, 0))
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(store.verify(60).unwrap().len, 0);
    // An abandoned writer leaves nothing.
    let mut w = store.begin(70, Ballot::new(7, 0)).unwrap();
    w.write_all(b"partial").unwrap();
    drop(w);
    let idx: Vec<_> = store.list().unwrap().iter().map(|m| m.index).collect();
    assert_eq!(idx, vec![10, 20, 30, 40, 50, 60]);
    assert_eq!(store.retain(2).unwrap(), 4);
    let idx: Vec<_> = store.list().unwrap().iter().map(|m| m.index).collect();
    assert_eq!(idx, vec![50, 60]);
    assert_eq!(store.verify(50).unwrap().len, 5 * 999);
    assert!(matches!(
        store.open_snapshot(10),
        Err(StorageError::NoSuchSnapshot { index: 10 })
    ));
    // A crash mid-write leaves a .tmp file, removed on open.
    drop(store);
    std::fs::write(
        tmp.path().join("snap-00000000000000000080.ckpt.tmp"),
        b"half",
    )
    .unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    assert!(!tmp
        .path()
        .join("snap-00000000000000000080.ckpt.tmp")
        .exists());
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn storage_checkpoint_then_truncate_log() {
    // The intended use together: snapshot at i, then drop covered segments.
    let tmp = TempDir::new("ckpt-log");
    let (mut log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    let snaps = SnapshotStore::open(tmp.path()).unwrap();
    let promise = PromiseStore::open(tmp.path()).unwrap();
    log.append(&(1..=80).map(|i| entry(i, 2, 250)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    let e60 = log.read(60).unwrap();
    let mut w = snaps.begin(60, e60.header.ballot).unwrap();
    w.write_all(b"state machine at 60").unwrap();
    w.finish().unwrap();
    assert!(log.truncate_before(60).unwrap() > 0);
    drop((log, snaps, promise));
    let (log, _) = SegmentLog::open(tmp.path(), small_opts()).unwrap();
    assert!(log.first_index().unwrap() <= 61);
    assert_eq!(log.last_index(), 80);
    let snaps = SnapshotStore::open(tmp.path()).unwrap();
    assert_eq!(snaps.latest().unwrap().unwrap().index, 60);
    let _ = EntryHeader {
        index: 1,
        ballot: Ballot::ZERO,
        commit: 0,
        len: 0,
        flags: 0,
    };
}

#[test]
fn storage_snapshot_on_a_full_disk_leaves_nothing() {
    let Some(fs) = TinyFs::mount("snapfull", 128, false) else {
        return;
    };
    let store = SnapshotStore::open(fs.path()).unwrap();
    let data = pseudo_random(1 << 20, 7);
    let mut w = store.begin(5, Ballot::new(1, 1)).unwrap();
    match w.write_all(&data) {
        Err(e) => {
            // Through io::Write: the kind is kept, the message names the file.
            let inner = e.get_ref().and_then(|i| i.downcast_ref::<StorageError>());
            assert!(inner.is_some_and(StorageError::is_no_space), "{e}");
            assert!(
                e.to_string().contains("snap-00000000000000000005.ckpt.tmp"),
                "{e}"
            );
            drop(w);
        }
        Ok(()) => {
            let err = w.finish().unwrap_err();
            assert!(err.is_no_space(), "{err}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(fs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snap-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(store.latest().unwrap(), None);
}
