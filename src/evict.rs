//! The cache limit (`hsm serve --cache-limit SIZE`): when the present bytes of the store pass
//! the limit, files are released least recently used first, down to a low watermark below it.
//!
//! What "used" means: the last open or access of the file, not its fetch. Accesses to files
//! being filled reach the worker as events; opens of complete files are answered by the
//! supervisor, which tells the worker (a note). With a cache limit, a complete file's ignore
//! mark silences its accesses only, not its opens, so that every open is seen (see
//! `event::ignore_only_accesses`). After a restart, the last use of a file not seen yet is its
//! access time on disk.
//!
//! Eviction is a release (see `lifecycle`): it skips modified, pinned and in-use files, and it
//! never lets a reader see stub bytes. If nothing can be evicted, reads still work and the
//! overrun is logged. A fill that meets ENOSPC asks for room here and is tried again once.
//!
//! The tally: a walk of the tree's records at start (in the background), then every fill's new
//! total for its file. Files are named by their kernel handle, so a rename does not lose them.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::engine::Engine;
use crate::lifecycle::{Outcome, Refusal, Releaser};
use crate::metrics::Metrics;
use crate::sys::fanotify::Group;
use crate::sys::fs::{self as sysfs, FileHandle};

/// Evict down to this share of the limit, so that eviction runs in batches.
const LOW_WATERMARK_PERCENT: u64 = 90;

type FileKey = (u64, u64);

struct Tracked {
    handle: FileHandle,
    present: u64,
    last_use: SystemTime,
    /// Refused for a reason that lasts (modified, pinned, not a stub): not tried again until it
    /// is used again.
    skip: bool,
}

#[derive(Default)]
struct Tally {
    files: HashMap<FileKey, Tracked>,
    total: u64,
    /// The walk at start is done: before, the total is too low to act on.
    walked: bool,
    /// Room held for fetches ahead still running (see `Space::hold_ahead`).
    held_ahead: u64,
    overrun_logged: bool,
}

pub struct Usage {
    limit: u64,
    tally: Mutex<Tally>,
    wake: Condvar,
}

fn key_of(fd: BorrowedFd<'_>) -> Option<FileKey> {
    sysfs::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

fn lock(m: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Usage {
    pub fn new(limit: u64) -> Usage {
        Usage {
            limit,
            tally: Mutex::new(Tally::default()),
            wake: Condvar::new(),
        }
    }

    /// The file behind `fd` now has `present` bytes present. A fill is not a use: a file
    /// first seen here (fetched ahead, by a directory prefetch) counts as never used, and goes
    /// first.
    pub fn filled(&self, fd: BorrowedFd<'_>, present: u64) {
        self.set(fd, present, None);
    }

    fn set(&self, fd: BorrowedFd<'_>, present: u64, used: Option<SystemTime>) {
        let Some(key) = key_of(fd) else { return };
        let mut guard = lock(&self.tally);
        let t = &mut *guard;
        let old = match t.files.get_mut(&key) {
            Some(f) => {
                if let Some(at) = used {
                    f.last_use = at;
                }
                std::mem::replace(&mut f.present, present)
            }
            None => {
                let Ok(handle) = sysfs::file_handle(fd) else {
                    return;
                };
                t.files.insert(
                    key,
                    Tracked {
                        handle,
                        present,
                        last_use: used.unwrap_or(SystemTime::UNIX_EPOCH),
                        skip: false,
                    },
                );
                0
            }
        };
        t.total = t.total - old.min(t.total) + present;
        if t.total > self.limit {
            self.wake.notify_one();
        }
    }

    /// The file behind `fd` was opened or read.
    pub fn used(&self, fd: BorrowedFd<'_>) {
        let Some(key) = key_of(fd) else { return };
        let mut t = lock(&self.tally);
        if let Some(f) = t.files.get_mut(&key) {
            f.last_use = SystemTime::now();
            f.skip = false;
            return;
        }
        drop(t);
        // Not seen yet (the walk has not reached it): counted from its records.
        if let Some(present) = crate::record::present_on_disk(fd) {
            self.set(fd, present, Some(SystemTime::now()));
        }
    }

    /// See `engine::Space::hold_ahead`: only below the low watermark, so that fetching ahead
    /// never starts an eviction.
    fn hold_ahead(&self, bytes: u64) -> bool {
        let mut t = lock(&self.tally);
        let fits = t.walked
            && t.total + t.held_ahead + bytes.max(1) <= self.limit * LOW_WATERMARK_PERCENT / 100;
        if fits {
            t.held_ahead += bytes;
        }
        fits
    }

    fn give_back_ahead(&self, bytes: u64) {
        let mut t = lock(&self.tally);
        t.held_ahead = t.held_ahead.saturating_sub(bytes);
    }

    /// Bytes present in the store, as tallied.
    pub fn total(&self) -> u64 {
        lock(&self.tally).total
    }

    /// Walk the tree (through the daemon's view) and tally what its records say is present.
    fn walk(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                self.walk(&path);
            } else if ft.is_file() {
                let Ok(f) = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                    .open(&path)
                else {
                    continue;
                };
                let (Some(present), Some(key), Ok(handle), Ok(st)) = (
                    crate::record::present_on_disk(f.as_fd()),
                    key_of(f.as_fd()),
                    sysfs::file_handle(f.as_fd()),
                    sysfs::fstat(f.as_fd()),
                ) else {
                    continue;
                };
                let atime = SystemTime::UNIX_EPOCH
                    + Duration::new(st.st_atime.max(0) as u64, st.st_atime_nsec as u32);
                let mut t = lock(&self.tally);
                if t.files.contains_key(&key) {
                    continue; // a fill or a use got there first, with the newer figure
                }
                t.total += present;
                t.files.insert(
                    key,
                    Tracked {
                        handle,
                        present,
                        last_use: atime,
                        skip: false,
                    },
                );
            }
        }
    }

    /// Start the walk and the evicting thread. `tree`: the store's tree through the daemon's
    /// view; `releaser_parts`: what a release needs.
    pub fn start(
        self: &Arc<Self>,
        tree: &Path,
        tree_fd: OwnedFd,
        engine: Arc<Engine>,
        group: Option<Arc<Group>>,
        zero_pool: Option<std::fs::File>,
    ) {
        let usage = self.clone();
        let tree = tree.to_path_buf();
        std::thread::spawn(move || {
            usage.walk(&tree);
            let total = {
                let mut t = lock(&usage.tally);
                t.walked = true;
                t.total
            };
            info!(
                present = total,
                limit = usage.limit,
                "cache limit: the store's present bytes are counted"
            );
            let forget = |fd: BorrowedFd<'_>| engine.forget(fd);
            let releaser = Releaser {
                group: group.as_deref(),
                published: engine.published(),
                zero_pool: zero_pool.as_ref(),
                forget: &forget,
            };
            loop {
                {
                    let t = lock(&usage.tally);
                    let _ = usage
                        .wake
                        .wait_timeout(t, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                }
                usage.evict(&releaser, tree_fd.as_fd(), &engine.metrics);
            }
        });
    }

    /// Bytes to free to get from `total` down to the low watermark, when over the limit.
    fn excess(&self, total: u64) -> u64 {
        if total <= self.limit {
            return 0;
        }
        total - self.limit * LOW_WATERMARK_PERCENT / 100
    }

    /// Free the space of the oldest unused files as the limit asks. Returns the bytes freed.
    fn evict(&self, releaser: &Releaser<'_>, tree: BorrowedFd<'_>, metrics: &Metrics) -> u64 {
        self.evict_at_least(0, releaser, tree, metrics)
    }

    /// [`Usage::evict`], freeing at least `wanted` bytes even below the limit (a fill met a
    /// full disk).
    fn evict_at_least(
        &self,
        wanted: u64,
        releaser: &Releaser<'_>,
        tree: BorrowedFd<'_>,
        metrics: &Metrics,
    ) -> u64 {
        let (mut need, mut candidates) = {
            let t = lock(&self.tally);
            if !t.walked {
                warn!("no room made: the store's files are still being counted");
                return 0;
            }
            let need = self.excess(t.total).max(wanted);
            if need == 0 {
                return 0;
            }
            tracing::debug!(total = t.total, limit = self.limit, need, "evicting");
            let mut c: Vec<(SystemTime, FileKey, FileHandle)> = t
                .files
                .iter()
                .filter(|(_, f)| f.present > 0 && !f.skip)
                .map(|(k, f)| (f.last_use, *k, f.handle.clone()))
                .collect();
            c.sort_by_key(|x| x.0);
            (need, c)
        };
        let mut freed = 0;
        for (_, key, handle) in candidates.drain(..) {
            if need == 0 {
                break;
            }
            let open = |flags| sysfs::open_by_handle(tree, &handle, flags | libc::O_NONBLOCK);
            let outcome = match open(libc::O_RDONLY) {
                Ok(probe) => releaser
                    .release_opened(probe, &|| open(libc::O_RDWR))
                    .unwrap_or_else(|e| {
                        warn!("eviction failed: {e:#}");
                        Outcome::Refused(Refusal::InUse)
                    }),
                // Deleted meanwhile: its space is gone with it.
                Err(e) => {
                    tracing::debug!("eviction candidate not opened: {e}");
                    Outcome::AlreadyStub
                }
            };
            tracing::debug!(?outcome, "eviction candidate");
            let mut t = lock(&self.tally);
            match outcome {
                Outcome::Released { bytes } => {
                    Metrics::add(&metrics.evicted_bytes, bytes);
                    Metrics::add(&metrics.evicted_files, 1);
                    freed += bytes;
                    need = need.saturating_sub(bytes);
                    let was = t
                        .files
                        .get_mut(&key)
                        .map_or(0, |f| std::mem::take(&mut f.present));
                    t.total -= was.min(t.total);
                }
                Outcome::AlreadyStub => {
                    if let Some(f) = t.files.remove(&key) {
                        t.total -= f.present.min(t.total);
                    }
                }
                Outcome::Refused(Refusal::InUse) => {}
                Outcome::Refused(_) => {
                    if let Some(f) = t.files.get_mut(&key) {
                        f.skip = true;
                    }
                }
            }
        }
        if wanted > 0 {
            info!(
                wanted,
                freed, "the store's filesystem is full: least recently used files released"
            );
        }
        let mut t = lock(&self.tally);
        if t.total > self.limit && need > 0 {
            if !t.overrun_logged {
                warn!(
                    present = t.total,
                    limit = self.limit,
                    "over the cache limit and nothing more can be evicted now (files in use, \
                     pinned or with local changes); reads go on"
                );
                t.overrun_logged = true;
            }
        } else {
            t.overrun_logged = false;
        }
        freed
    }
}

/// The engine's view of the cache limit: fills report their totals, and a full disk asks for
/// room.
pub struct Space {
    pub usage: Arc<Usage>,
    pub engine: std::sync::Weak<Engine>,
    pub tree: OwnedFd,
    /// None under FUSE, which has no ignore marks to take off.
    pub group: Option<Arc<Group>>,
    pub zero_pool: Option<std::fs::File>,
}

impl crate::engine::Space for Space {
    fn filled(&self, fd: BorrowedFd<'_>, present: u64) {
        self.usage.filled(fd, present);
    }

    fn hold_ahead(&self, bytes: u64) -> bool {
        self.usage.hold_ahead(bytes)
    }

    fn give_back_ahead(&self, bytes: u64) {
        self.usage.give_back_ahead(bytes)
    }

    fn make_room(&self, bytes: u64) -> bool {
        let Some(engine) = self.engine.upgrade() else {
            return false;
        };
        let forget = |fd: BorrowedFd<'_>| engine.forget(fd);
        let releaser = Releaser {
            group: self.group.as_deref(),
            published: engine.published(),
            zero_pool: self.zero_pool.as_ref(),
            forget: &forget,
        };
        self.usage
            .evict_at_least(bytes.max(1), &releaser, self.tree.as_fd(), &engine.metrics)
            > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_watermark_is_below_the_limit() {
        let u = Usage::new(1000);
        assert_eq!(u.excess(900), 0);
        assert_eq!(u.excess(1000), 0);
        assert_eq!(u.excess(1001), 101);
        assert_eq!(u.excess(5000), 4100);
    }

    #[test]
    fn fetches_ahead_together_stay_below_the_low_watermark() {
        let u = Usage::new(1000);
        assert!(
            !u.hold_ahead(100),
            "nothing held before the store is counted"
        );
        {
            let mut t = lock(&u.tally);
            t.walked = true;
            t.total = 500;
        }
        // Each of these would fit alone (500 + 300 <= 900): together they would not.
        assert!(u.hold_ahead(300));
        assert!(!u.hold_ahead(300), "the room held by the first counts");
        assert!(u.hold_ahead(100), "what is left is still given");
        assert!(!u.hold_ahead(0), "no room left at all: 900 of 900");
        u.give_back_ahead(300);
        assert!(u.hold_ahead(0));
        assert!(u.hold_ahead(300));
        assert!(!u.hold_ahead(1));
    }
}
