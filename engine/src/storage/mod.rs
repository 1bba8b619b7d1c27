//! Durable storage: the segment log, the promise store and checkpoints.
//!
//! Everything here is a plain library API: no threads are started, every call does its I/O
//! on the caller's thread (the replica's persister thread in durable mode). Every I/O
//! failure is returned as a typed [`StorageError`] naming the operation and the path; no
//! call panics on bad bytes or a failing disk.
//!
//! - [`segment`]: [`SegmentLog`], append-only segment files of encoded entries
//!   (the [`crate::layout`] entry format, byte for byte), group commit with `fdatasync`,
//!   crash recovery (torn tail truncated, middle corruption refused).
//! - [`promise`]: [`PromiseStore`], the acceptor's promised ballot, durable before
//!   `store` returns.
//! - [`persister`]: [`Persister`], the `driver::Storage` of durable mode: a thread owning
//!   the segment log and the promise store (group commit, crash-atomic rewrites).
//! - [`snapshot`]: [`SnapshotStore`], streamed state-machine checkpoints with chunk
//!   checksums and a trailer, written atomically.
//! - [`checkpoints`]: [`FileCheckpoints`], the driver's [`crate::checkpoint::Checkpoints`]
//!   over a snapshot directory (background saves, images shipped verbatim, verified
//!   before they are installed).
//!
//! See `docs/durability.md` for the file formats and the recovery rules.

pub mod checkpoints;
pub mod persister;
pub mod promise;
pub mod segment;
pub mod snapshot;

pub use checkpoints::FileCheckpoints;
pub use persister::{Persister, PersisterOptions, Recovered};
pub use promise::PromiseStore;
pub use segment::{LogEntry, LogOptions, LogReader, Recovery, SegmentLog, TornTail};
pub use snapshot::{SnapshotMeta, SnapshotReader, SnapshotStore, SnapshotWriter};

use crate::layout::LayoutError;
use crate::types::{Ballot, Index};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Every error the storage layer returns.
#[derive(Debug)]
pub enum StorageError {
    /// A system call failed. `op` names what was being done ("fdatasync", "write", ...).
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory it was done on.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// Bytes on disk are not what was written, somewhere other than a torn tail.
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Where in it the bad bytes start.
        offset: u64,
        /// What is wrong with them.
        reason: String,
    },
    /// An earlier write or sync failed: the on-disk state is unknown, so this handle refuses
    /// to report anything more as persisted. Reopen (which runs recovery) to go on.
    Poisoned {
        /// The first failure.
        cause: String,
    },
    /// Another handle (this process or another) holds the directory's lock.
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// `append` of an index that does not follow the last one.
    NotContiguous {
        /// The index that would follow.
        expected: Index,
        /// The index given.
        got: Index,
    },
    /// An entry that may not go into the log (bad length, ring-only flags, ...).
    InvalidEntry(String),
    /// `PromiseStore::store` of a ballot below the one already promised.
    BallotRegression {
        /// The durable promise.
        promised: Ballot,
        /// The lower ballot asked for.
        requested: Ballot,
    },
    /// A read asked for an index the log does not hold.
    NoSuchIndex {
        /// The index asked for.
        index: Index,
        /// The first index held.
        first: Index,
        /// The last index held.
        last: Index,
    },
    /// A snapshot that does not exist or is not complete.
    NoSuchSnapshot {
        /// The snapshot's index.
        index: Index,
    },
    /// The persister could not make a promise durable; its thread stopped.
    PromiseFailed {
        /// The promise that is not durable.
        ballot: Ballot,
    },
    /// The persister's thread stopped, after the failure `cause` (or on its own), so
    /// nothing more is made durable. Reopen (which runs recovery) to go on.
    Stopped {
        /// The failure that stopped it.
        cause: String,
    },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        StorageError::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// The OS error number of an I/O failure, if this is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True for "no space left on device" (ENOSPC) and "quota exceeded" (EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            Self::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "corrupt storage file {} at offset {offset}: {reason}",
                file.display()
            ),
            Self::Poisoned { cause } => write!(
                f,
                "storage poisoned by an earlier failure ({cause}); reopen to recover"
            ),
            Self::Locked { path } => write!(
                f,
                "storage directory is in use by another handle (lock {} held)",
                path.display()
            ),
            Self::NotContiguous { expected, got } => {
                write!(f, "append of index {got}, expected {expected}")
            }
            Self::InvalidEntry(why) => write!(f, "invalid entry: {why}"),
            Self::BallotRegression {
                promised,
                requested,
            } => write!(
                f,
                "promise of ballot {requested} below the ballot {promised} already promised"
            ),
            Self::NoSuchIndex { index, first, last } => {
                write!(f, "index {index} not in the log (holds {first}..={last})")
            }
            Self::NoSuchSnapshot { index } => write!(f, "no complete snapshot at index {index}"),
            Self::PromiseFailed { ballot } => write!(f, "promise store failed (ballot {ballot})"),
            Self::Stopped { cause } => write!(f, "{cause}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> io::Error {
        let kind = match &e {
            StorageError::Io { source, .. } => source.kind(),
            StorageError::Corrupt { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// The result of every storage call.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

pub(crate) fn layout_reason(e: LayoutError) -> String {
    e.to_string()
}

/// Removes the files of `dir` named `snap-*<suffix>` (left by writes that never finished),
/// syncing the directory if any went.
pub(crate) fn remove_unfinished(dir: &Path, suffix: &str, what: &str) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| StorageError::io("read dir", dir, e))?;
    let mut removed = false;
    for ent in rd {
        let ent = ent.map_err(|e| StorageError::io("read dir", dir, e))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap-") && name.ends_with(suffix) {
            let p = ent.path();
            std::fs::remove_file(&p).map_err(|e| StorageError::io("remove", &p, e))?;
            tracing::info!(file = %p.display(), "{what} removed");
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// `fsync` a directory, so that a created, renamed or removed name in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| StorageError::io("open dir", dir, e))?;
    d.sync_all()
        .map_err(|e| StorageError::io("fsync dir", dir, e))
}

/// Creates `dir` (and parents) if needed, making a new directory's name durable.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create dir", dir, e))?;
    sync_dir(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// An exclusive `flock` on `<dir>/<name>`, held while the value lives.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path, name: &str) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("create lock file", &path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StorageError::Locked { path });
            }
            return Err(StorageError::io("flock", &path, err));
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "ballot-storage-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A small tmpfs mounted at a fresh directory, unmounted on drop. `None` when this
    /// process may not mount (not root, no CAP_SYS_ADMIN, inside a restricted sandbox).
    pub struct TinyFs {
        dir: TempDir,
    }

    impl TinyFs {
        pub fn mount(tag: &str, size_kib: u64, read_only: bool) -> Option<Self> {
            use std::ffi::CString;
            use std::os::unix::ffi::OsStrExt;
            let dir = TempDir::new(tag);
            let target = CString::new(dir.path().as_os_str().as_bytes()).ok()?;
            let src = CString::new("tmpfs").ok()?;
            let opts = CString::new(format!("size={size_kib}k")).ok()?;
            let flags = if read_only { libc::MS_RDONLY } else { 0 };
            // SAFETY: valid NUL-terminated strings that outlive the call.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    flags,
                    opts.as_ptr().cast(),
                )
            };
            if rc != 0 {
                eprintln!(
                    "cannot mount a tmpfs ({}); skipping",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            Some(TinyFs { dir })
        }
        pub fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            use std::ffi::CString;
            use std::os::unix::ffi::OsStrExt;
            if let Ok(t) = CString::new(self.dir.path().as_os_str().as_bytes()) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
