//! The acceptor's promise record ([`PromiseRecord`]: the promised ballot and, while it is
//! blank, its blank incarnation), stored durably.
//!
//! File `promise` holds two slots, at offsets 0 and 512 (separate sectors, so a torn write
//! can damage only the slot being written). A slot is
//! `magic u64 "BALPROM2" | seq u64 | ballot u64 | blank u64 | flags u32 (bit 0: a value
//! was seen chosen) | crc32c u32 (of the 36 bytes before)`. Slots of version 1 (`"BALPROM1"
//! | seq | ballot | crc32c of 24 bytes | 0 u32`, written before the blank id was kept) still
//! load, as records with no blank id that saw a value chosen if they promised anything
//! (the rule before version 2).
//! `store` writes the slot the current one is not in, with `seq + 1`, and `fdatasync`s: the
//! file never changes size after creation, so that flush is data only (one device write on
//! the `Prepare` path, no rename, no directory sync). `load` takes the valid slot with the
//! highest `seq`. A torn slot is the interrupted `store` (which never returned, so no
//! promise was made on it): the other slot still holds the previous promise.

use super::{ensure_dir, sync_dir, DirLock, Result, StorageError};
use crate::types::{Ballot, PromiseRecord};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "promise";
const SLOT_MAGIC_V1: u64 = u64::from_le_bytes(*b"BALPROM1");
const SLOT_MAGIC: u64 = u64::from_le_bytes(*b"BALPROM2");
const SLOT_SIZE: usize = 40;
const SLOT_STRIDE: u64 = 512;
const FILE_LEN: u64 = 2 * SLOT_STRIDE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Empty,
    Valid { seq: u64, record: PromiseRecord },
    Torn,
}

const FLAG_SAW_CHOSEN: u32 = 1;

fn encode_slot(seq: u64, record: PromiseRecord) -> [u8; SLOT_SIZE] {
    let mut b = [0u8; SLOT_SIZE];
    b[0..8].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&record.ballot.0.to_le_bytes());
    b[24..32].copy_from_slice(&record.blank.to_le_bytes());
    let flags = if record.saw_chosen {
        FLAG_SAW_CHOSEN
    } else {
        0
    };
    b[32..36].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_slot(b: &[u8; SLOT_SIZE]) -> Slot {
    if b.iter().all(|&x| x == 0) {
        return Slot::Empty;
    }
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let half = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let ballot = Ballot(word(16));
    let record = match word(0) {
        SLOT_MAGIC if half(36) == crc32c::crc32c(&b[..36]) && half(32) & !FLAG_SAW_CHOSEN == 0 => {
            Some(PromiseRecord {
                ballot,
                blank: word(24),
                saw_chosen: half(32) & FLAG_SAW_CHOSEN != 0,
            })
        }
        // Version 1 ended at byte 32; the zeros after it were never written.
        SLOT_MAGIC_V1 if half(24) == crc32c::crc32c(&b[..24]) && b[28..40] == [0; 12] => {
            Some(PromiseRecord {
                ballot,
                blank: 0,
                saw_chosen: ballot != Ballot::ZERO,
            })
        }
        _ => None,
    };
    match record {
        Some(record) => Slot::Valid {
            seq: word(8),
            record,
        },
        None => Slot::Torn,
    }
}

/// Durable storage of the promise record. See the module documentation.
#[derive(Debug)]
pub struct PromiseStore {
    path: PathBuf,
    file: File,
    _lock: DirLock,
    /// The durable promise record and its slot sequence number (0: nothing stored yet).
    record: PromiseRecord,
    seq: u64,
    poisoned: Option<String>,
    #[cfg(test)]
    fail_next_sync: Option<i32>,
}

impl PromiseStore {
    /// Opens (creating if needed) the promise file in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<PromiseStore> {
        let dir = dir.as_ref();
        ensure_dir(dir)?;
        let lock = DirLock::acquire(dir, "promise.lock")?;
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| StorageError::io("stat", &path, e))?
            .len();
        if len < FILE_LEN {
            // New, or its creation was interrupted (before any store could have returned).
            // Zeros written, not `set_len`: a sparse file would need block allocation at
            // the first store, which fails on a full disk.
            file.write_all_at(&[0u8; FILE_LEN as usize], 0)
                .map_err(|e| StorageError::io("write", &path, e))?;
            file.sync_all()
                .map_err(|e| StorageError::io("fsync", &path, e))?;
            sync_dir(dir)?;
        }
        let mut store = PromiseStore {
            path,
            file,
            _lock: lock,
            record: PromiseRecord::default(),
            seq: 0,
            poisoned: None,
            #[cfg(test)]
            fail_next_sync: None,
        };
        let (seq, record) = store.read_slots()?;
        store.seq = seq;
        store.record = record;
        Ok(store)
    }

    fn read_slots(&self) -> Result<(u64, PromiseRecord)> {
        let mut slots = [Slot::Empty; 2];
        for (k, slot) in slots.iter_mut().enumerate() {
            let mut b = [0u8; SLOT_SIZE];
            self.file
                .read_exact_at(&mut b, k as u64 * SLOT_STRIDE)
                .map_err(|e| StorageError::io("read", &self.path, e))?;
            *slot = decode_slot(&b);
        }
        let best = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Valid { seq, record } => Some((*seq, *record)),
                _ => None,
            })
            .max_by_key(|(seq, _)| *seq);
        match (best, slots) {
            (Some(b), _) => {
                if slots.contains(&Slot::Torn) {
                    tracing::warn!(file = %self.path.display(), "promise store: one torn slot ignored (interrupted store)");
                }
                Ok(b)
            }
            (None, [Slot::Torn, Slot::Torn]) => Err(StorageError::corrupt(
                &self.path,
                0,
                "both promise slots fail their checksum (a store only ever writes one)",
            )),
            (None, _) => Ok((0, PromiseRecord::default())),
        }
    }

    /// The durable promise (`Ballot::ZERO` if none), as cached since open.
    pub fn promised(&self) -> Ballot {
        self.record.ballot
    }

    /// The durable promise record, as cached since open.
    pub fn record(&self) -> PromiseRecord {
        self.record
    }

    /// Re-reads and verifies the promise record from disk.
    pub fn load(&self) -> Result<PromiseRecord> {
        Ok(self.read_slots()?.1)
    }

    /// Makes `record` the durable promise record; returns only once it is on disk. A ballot
    /// below the current promise is refused (a promise is never broken); the same record
    /// again is a no-op. After a failure the store is poisoned (reopen to go on).
    pub fn store(&mut self, record: impl Into<PromiseRecord>) -> Result<()> {
        let record = record.into();
        if let Some(cause) = &self.poisoned {
            return Err(StorageError::Poisoned {
                cause: cause.clone(),
            });
        }
        if record.ballot < self.record.ballot {
            return Err(StorageError::BallotRegression {
                promised: self.record.ballot,
                requested: record.ballot,
            });
        }
        if record == self.record && self.seq > 0 {
            return Ok(());
        }
        let seq = self.seq + 1;
        let slot = encode_slot(seq, record);
        let r = self
            .file
            .write_all_at(&slot, (seq % 2) * SLOT_STRIDE)
            .map_err(|e| StorageError::io("write", &self.path, e))
            .and_then(|_| {
                #[cfg(test)]
                if let Some(errno) = self.fail_next_sync.take() {
                    return Err(StorageError::io(
                        "fdatasync",
                        &self.path,
                        std::io::Error::from_raw_os_error(errno),
                    ));
                }
                self.file
                    .sync_data()
                    .map_err(|e| StorageError::io("fdatasync", &self.path, e))
            });
        if let Err(e) = r {
            tracing::error!(error = %e, "promise store poisoned");
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.seq = seq;
        self.record = record;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn inject_sync_failure(&mut self, errno: i32) {
        self.fail_next_sync = Some(errno);
    }
}
