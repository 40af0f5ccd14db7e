//! The engine's per-file cache: an [`Entry`] per stub being served, loaded from its records
//! (source, state, digest list) on first access, holding the fds fills are written through, and
//! dropped once idle. Apart from the fill path because what an entry holds and when it may go
//! (open-files pressure) is a question of its own.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::plan::Cursor;
use super::{fd_path, lock, Engine};
use crate::digest::Digest;
use crate::published::FileId;
use crate::record::{SourceRecord, StateRecord, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;

pub(super) type FileKey = (u64, u64);

pub(super) struct Entry {
    pub(super) source: SourceRecord,
    /// One digest per chunk, when populate recorded them.
    pub(super) digests: Option<Vec<Digest>>,
    /// A duplicate of the first event's fd: lets the flusher and readahead reach the file.
    pub(super) file: OwnedFd,
    /// The fd fills are written through: event fds are read-only (see `sys::fanotify::Group`),
    /// so the same inode reopened read-write through the daemon's view of the store. On xfs an
    /// "invisible I/O" fd, whose writes leave mtime and ctime alone (`keeps_times`).
    pub(super) writer: Option<OwnedFd>,
    pub(super) keeps_times: bool,
    /// Held while a piece is written: one writer at a time (see `Engine::write_piece`).
    pub(super) writing: Mutex<()>,
    pub(super) state: Mutex<EntryState>,
    pub(super) changed: Condvar,
    /// For [`PublishedRanges`]; `None`: nothing is published for this file.
    pub(super) id: Option<FileId>,
}

pub(super) struct EntryState {
    pub(super) record: StateRecord,
    /// Chunk indices being fetched right now.
    pub(super) in_flight: HashSet<u64>,
    /// The record changed since it was last persisted.
    pub(super) dirty: bool,
    /// Where the file's reader was (see [`Cursor`]).
    pub(super) cursor: Cursor,
    /// Last access served or piece written: records are written when a file has gone quiet
    /// (see `flush`).
    pub(super) last_access: Instant,
    pub(super) dirty_since: Option<Instant>,
    /// Changed locally (mtime no longer the source's) while not complete: bytes on disk in an
    /// unrecorded range may be the user's, written after a fill whose record a crash lost. Such
    /// ranges are compared before anything is written over them.
    pub(super) suspect: bool,
    /// Threads waiting on the entry's `changed` for another's fetch: only they need waking (a
    /// wake-up is a system call: one per piece written, and one per fill, otherwise).
    pub(super) waiters: usize,
}

impl EntryState {
    /// The state of a file just loaded with `record`, accessed at `now`.
    pub(super) fn new(record: StateRecord, suspect: bool, now: Instant) -> EntryState {
        EntryState {
            record,
            in_flight: HashSet::new(),
            dirty: false,
            cursor: Cursor::default(),
            last_access: now,
            dirty_since: None,
            suspect,
            waiters: 0,
        }
    }
}

/// Keep at most this many idle entries cached; complete clean ones go first. Each holds one or
/// two fds, so fewer when the process may open fewer files (see `cache_limit`).
const MAX_CACHED: usize = 4096;

/// Entries to cache with the open-files limit this process has: a quarter of it (each entry
/// holds up to two fds; events in hand and backend reads need the rest).
pub(super) fn cache_limit() -> usize {
    let files = sysfs::open_files_limit().unwrap_or(1024);
    ((files / 4) as usize).clamp(16, MAX_CACHED)
}

impl Engine {
    /// The fd to write `fd`'s fills through, and whether its writes leave the times alone. On
    /// xfs an invisible-I/O fd; else (or if that fails) the inode reopened read-write by handle
    /// through the daemon's view; else none (then the event fd, which fails if read-only).
    fn writer_for(&self, fd: BorrowedFd<'_>) -> (Option<OwnedFd>, bool) {
        let Some(tree) = self.store_tree.as_ref() else {
            return (None, false);
        };
        if self.xfs {
            match sysfs::xfs_reopen_invisible(tree.as_fd(), fd) {
                Ok(w) => return (Some(w), true),
                Err(e) => debug!(file = %fd_path(fd), "no invisible I/O fd: {e}"),
            }
        }
        let flags = libc::O_RDWR | libc::O_LARGEFILE;
        match sysfs::reopen_by_handle(tree.as_fd(), fd, flags) {
            Ok(w) => (Some(w), false),
            Err(e) => {
                debug!(file = %fd_path(fd), "cannot reopen for writing: {e}");
                (None, false)
            }
        }
    }

    /// Look up or load the entry for a file. `None`: not a stub (no source record).
    pub(super) fn entry(
        &self,
        st: &sysfs::Stat,
        fd: BorrowedFd<'_>,
    ) -> io::Result<Option<Arc<Entry>>> {
        let key: FileKey = (st.st_dev, st.st_ino);
        if let Some(e) = lock(&self.files).get(&key) {
            return Ok(Some(e.clone()));
        }
        let Some(raw) = sysfs::fgetxattr(fd, XATTR_SOURCE)? else {
            return Ok(None);
        };
        let source = SourceRecord::decode(&raw).map_err(|e| {
            warn!(file = %fd_path(fd), "corrupt source record, refusing access: {e}");
            io::Error::from_raw_os_error(libc::EIO)
        })?;
        let record = match sysfs::fgetxattr(fd, XATTR_STATE)? {
            None => source.fresh_state(),
            Some(raw) => StateRecord::decode(&raw, &source).map_err(|e| {
                warn!(file = %fd_path(fd), "corrupt state record, refusing access: {e}");
                io::Error::from_raw_os_error(libc::EIO)
            })?,
        };
        let digests = crate::digest::load_list(&self.digest_dir, &source).map_err(|e| {
            warn!(file = %fd_path(fd), "digest list unusable, refusing access: {e}");
            io::Error::from_raw_os_error(libc::EIO)
        })?;
        let suspect =
            (st.st_mtime, st.st_mtime_nsec as u32) != source.mtime && !record.is_complete();
        let (writer, keeps_times) = self.writer_for(fd);
        let entry = Arc::new(Entry {
            digests,
            source,
            writer,
            keeps_times,
            writing: Mutex::new(()),
            file: fd.try_clone_to_owned()?,
            state: Mutex::new(EntryState::new(record, suspect, Instant::now())),
            changed: Condvar::new(),
            id: FileId::of(fd),
        });
        let mut files = lock(&self.files);
        let entry = files.entry(key).or_insert(entry).clone();
        let cached = files.len();
        drop(files);
        // A burst of new files (tar, grep over a tree) outruns the periodic flush: complete
        // entries are recorded and dropped early, before their fds exhaust the process's limit.
        if cached > self.max_cached {
            self.relieve_pressure(cached);
        }
        Ok(Some(entry))
    }

    /// Drop cached entries nobody uses: complete ones always, others beyond the cache limit.
    pub(super) fn evict(&self) {
        let mut files = lock(&self.files);
        let over = files.len().saturating_sub(self.max_cached);
        let mut dropped = 0;
        files.retain(|_, e| {
            if Arc::strong_count(e) > 1 {
                return true;
            }
            let s = lock(&e.state);
            let idle = !s.dirty && s.in_flight.is_empty();
            let drop_it = idle && (s.record.is_complete() || dropped < over);
            if drop_it {
                dropped += 1;
            }
            !drop_it
        });
    }

    /// Wait (up to `timeout`) until the file cache has room for one more entry. Work that can
    /// wait (a directory prefetch) asks first: its entries come faster than a pressure flush
    /// evicts them, and their fds would then be missing for events.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if lock(&self.files).len() < self.max_cached {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            // The flusher makes the room (events ring it); a flush from here too would hold
            // every entry while it runs, so that the flusher's could evict none.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn cached_files(&self) -> usize {
        lock(&self.files).len()
    }
}

impl Engine {
    /// Forget the file behind `fd`, for a release: its record written if it changed (its data
    /// synced first), its entry dropped and its fds closed. `false` when it is in use here (an
    /// event being served, a fill or a readahead job holding it): the release is then refused.
    pub fn forget(&self, fd: BorrowedFd<'_>) -> bool {
        let Ok(st) = sysfs::fstat(fd) else {
            return false;
        };
        let key: FileKey = (st.st_dev, st.st_ino);
        // The flusher holds every entry for the length of a flush: that is not a use, so it is
        // waited out (briefly); a fill or a reader's event is.
        let end = Instant::now() + Duration::from_secs(2);
        let mut files = loop {
            let files = lock(&self.files);
            let Some(e) = files.get(&key) else {
                return true;
            };
            if !lock(&e.state).in_flight.is_empty() {
                return false;
            }
            if Arc::strong_count(e) == 1 {
                break files;
            }
            if Instant::now() >= end {
                return false;
            }
            drop(files);
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(e) = files.remove(&key) else {
            return true;
        };
        drop(files);
        let s = lock(&e.state);
        if s.dirty {
            // A failure leaves the record claiming less than is on disk: a refetch, no loss.
            let synced = sysfs::fdatasync(e.file.as_fd());
            if synced.is_ok() {
                let _ = sysfs::fsetxattr(e.file.as_fd(), XATTR_STATE, &s.record.encode());
            }
        }
        true
    }

    /// Where present ranges are published for the supervisor, when it runs.
    pub fn published(&self) -> Option<&crate::published::PublishedRanges> {
        self.published.as_deref()
    }
}
