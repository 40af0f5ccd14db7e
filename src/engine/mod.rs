//! The fetch engine: make a byte range of a stub present, exactly once, and remember it.
//!
//! The engine knows nothing of fanotify. It is handed an open fd on a stub (the event's fd, opened
//! by the kernel without notification, so writing through it raises no event) and what is needed:
//! a range or the whole file. It loads the file's records from its xattrs, fetches the missing
//! chunks from the backend, writes them through the fd and marks them present in memory. A flusher
//! persists the records later, after a `syncfs`, so that a record never claims bytes that are not
//! on disk (a crash costs a refetch, never zeros taken for content). When the file cache is full,
//! an event rings the flusher, which records idle files and drops them; the event waits only
//! when the cache is far over its limit: never a filesystem-wide `syncfs` on the event path.
//!
//! Concurrency: per file, chunks being fetched are claimed under the file's lock; a second request
//! for a claimed chunk waits for the first instead of fetching it again. Different files and
//! different chunks of one file are fetched in parallel by the caller's threads.
//!
//! The parts, each in a module of its own so that it can be read (and tested) apart:
//! - `cache`: the per-file `Entry` cache, loaded from a stub's records, and its
//!   eviction.
//! - `plan`: what range an access needs fetched, and whether it is a sequential reader's.
//! - `fill`: fetching from the backend, checking digests, writing through the writer fd and
//!   publishing what is present.
//! - `buffers`: the memory fetched bytes wait in, huge pages for big pieces.
//! - `readahead`: fetching ahead of sequential readers on background threads.
//! - `persist`: writing the state records once the bytes they claim are on disk.

mod buffers;
mod cache;
mod fill;
mod persist;
mod plan;
mod readahead;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::metrics::Metrics;
use crate::published::PublishedRanges;
use crate::sys::fs as sysfs;
use crate::sys::shm::Shared;

use buffers::Buffers;
use cache::{cache_limit, Entry, FileKey};
use fill::{FetchJob, FetchReply, FETCH_THREADS, LOW_FETCH_THREADS};
use plan::{plan, Shape};
use readahead::Readahead;

/// Backend reads the engine may have in flight at once, readers' and access lists' together.
pub const FETCHES_IN_FLIGHT: usize = FETCH_THREADS + LOW_FETCH_THREADS;

/// What an access needs present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `count` bytes at `offset`, as the kernel reported them. A count of 0 means the whole file
    /// (a reflink clone of the stub, or an event that carries no range).
    Range { offset: u64, count: u64 },
    /// The whole file (a plain open of a stub that must not be seen with holes).
    Whole,
    /// An open: fetch the whole file if its stub kind asks for that, otherwise nothing.
    Open,
}

/// What [`Engine::prefetch_open`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetched {
    /// This call fetched something.
    pub fetched: bool,
    /// The file is complete (or not a stub): its events can be silenced.
    pub complete: bool,
}

/// The result of a served access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// What was needed is present; the file is not complete yet.
    Present,
    /// The file is complete, or not a stub at all: its events can be silenced.
    Complete,
}

/// The engine's way into the store: its digests, and its tree.
pub struct StoreAccess {
    pub digest_dir: PathBuf,
    /// The store's tree, on the daemon's ignore-marked view, to reopen stubs for writing.
    pub tree: Option<OwnedFd>,
    /// The store is on xfs: reopen for invisible I/O.
    pub xfs: bool,
}

impl StoreAccess {
    /// `store`'s, with `tree` opened by the caller (through its own view of the store).
    pub fn of(store: &crate::store::Store, tree: Option<OwnedFd>) -> StoreAccess {
        StoreAccess {
            digest_dir: store.digest_dir(),
            tree,
            xfs: store.config.fs == sysfs::FsKind::Xfs,
        }
    }
}

pub struct Engine {
    backend: Arc<dyn Backend>,
    /// Where fetched bytes wait to be written (see `buffers`).
    buffers: Arc<Buffers>,
    /// Backend reads run on these threads, so a hung read costs a thread, never a reader's
    /// deadline: the reader gets EAGAIN after `fetch_timeout`.
    fetch_tx: crossbeam_channel::Sender<(FetchJob, FetchReply)>,
    /// The same for fetches nobody waits on yet (an access list's prefetch): threads of their
    /// own, so that they never hold up a reader's.
    low_fetch_tx: crossbeam_channel::Sender<(FetchJob, FetchReply)>,
    fetch_timeout: Duration,
    digest_dir: PathBuf,
    /// The store's tree, on the daemon's ignore-marked view, to reopen stubs for writing.
    store_tree: Option<OwnedFd>,
    /// The store is on xfs: reopen for invisible I/O.
    xfs: bool,
    files: Mutex<HashMap<FileKey, Arc<Entry>>>,
    /// How many entries `files` may hold before complete ones are recorded and dropped early.
    max_cached: usize,
    /// Runs the flushes a crowded cache needs, off the events' threads (see `persist`).
    flusher: persist::Flusher,
    /// One pressure flush at a time where no flusher thread runs.
    inline_flush: std::sync::atomic::AtomicBool,
    pub metrics: Shared<Metrics>,
    /// The files fetched most, for `hsm stats` (per process: not in the shared counters).
    pub top_files: crate::metrics::TopFiles,
    /// Where present ranges are published for the supervisor (see [`crate::published`]).
    published: Option<Shared<PublishedRanges>>,
    /// How far ahead of a sequential reader to fetch (more for a far source: see
    /// [`Engine::far_readahead`]).
    readahead: u64,
    /// The source's round trip, from the fetches' times.
    round_trip: Mutex<crate::round_trip::RoundTrip>,
    readahead_tx: Mutex<Option<crossbeam_channel::Sender<Readahead>>>,
    /// The cache limit's accounting, when one is set (see `evict`).
    space: std::sync::OnceLock<Arc<dyn Space>>,
}

/// What the engine tells the cache limit, and asks of it (see `evict`).
pub trait Space: Send + Sync {
    /// The file behind `fd` now has `present` bytes present.
    fn filled(&self, fd: BorrowedFd<'_>, present: u64);
    /// The store is full: free at least `bytes`; whether anything was freed.
    fn make_room(&self, bytes: u64) -> bool;
    /// Hold room for `bytes` fetched ahead of any reader (a directory prefetch, an access
    /// list), if they fit below the limit's low watermark with the room held already: such a
    /// fetch must never evict what was read. Several run at once, so a check of the total
    /// alone would let each of them pass it. `bytes` 0: whether any room is left.
    fn hold_ahead(&self, bytes: u64) -> bool;
    /// Give back what [`Space::hold_ahead`] held (the fill has counted its bytes by now).
    fn give_back_ahead(&self, bytes: u64);
}

/// Room held under the cache limit for one fetch ahead, given back when dropped.
struct RoomAhead<'a> {
    space: Option<&'a dyn Space>,
    bytes: u64,
}

impl Drop for RoomAhead<'_> {
    fn drop(&mut self) {
        if let Some(space) = self.space {
            space.give_back_ahead(self.bytes);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent state here (claims are released by guards),
    // so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of `ranges` not present in `entry` (ranges that overlap count twice: an upper bound).
fn missing_bytes(entry: &Entry, ranges: &[(u64, u64)]) -> u64 {
    let s = lock(&entry.state);
    ranges
        .iter()
        .flat_map(|&(start, end)| s.record.present.gaps(start, end))
        .map(|(a, b)| b - a)
        .sum()
}

/// Where an fd points, for log lines.
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "<unknown>".into())
}

impl Engine {
    pub fn new(
        backend: Arc<dyn Backend>,
        metrics: Shared<Metrics>,
        published: Option<Shared<PublishedRanges>>,
        readahead: u64,
        fetch_timeout: Duration,
        store: StoreAccess,
    ) -> Engine {
        let buffers = Arc::new(Buffers::default());
        let pool = |threads: usize| {
            let (tx, rx) = crossbeam_channel::unbounded::<(FetchJob, FetchReply)>();
            for _ in 0..threads {
                let rx = rx.clone();
                let backend = backend.clone();
                let buffers = buffers.clone();
                std::thread::spawn(move || {
                    for (job, reply) in rx {
                        // The requester may have given up (timeout): then the bytes are dropped.
                        let _ = reply.send(job.read(&*backend, &buffers));
                    }
                });
            }
            tx
        };
        let fetch_tx = pool(FETCH_THREADS);
        let low_fetch_tx = pool(LOW_FETCH_THREADS);
        Engine {
            backend,
            buffers,
            fetch_tx,
            low_fetch_tx,
            fetch_timeout,
            digest_dir: store.digest_dir,
            store_tree: store.tree,
            xfs: store.xfs,
            files: Mutex::new(HashMap::new()),
            max_cached: cache_limit(),
            flusher: persist::Flusher::default(),
            inline_flush: std::sync::atomic::AtomicBool::new(false),
            metrics,
            top_files: Default::default(),
            published,
            readahead,
            round_trip: Mutex::default(),
            readahead_tx: Mutex::new(None),
            space: std::sync::OnceLock::new(),
        }
    }

    /// The source, as it may be shown (never credentials).
    pub fn source(&self) -> String {
        self.backend.describe()
    }

    /// Whether a fetch nobody asked for yet is welcome (see [`Space::hold_ahead`]).
    pub fn room_to_fetch_ahead(&self) -> bool {
        self.space.get().is_none_or(|s| s.hold_ahead(0))
    }

    /// Hold room for `bytes` fetched ahead; None when they do not fit under the cache limit.
    fn hold_room_ahead(&self, bytes: u64) -> Option<RoomAhead<'_>> {
        match self.space.get() {
            None => Some(RoomAhead { space: None, bytes }),
            Some(space) => space.hold_ahead(bytes).then(|| RoomAhead {
                space: Some(&**space),
                bytes,
            }),
        }
    }

    /// Report fills to the cache limit from now on.
    pub fn set_space(&self, space: Arc<dyn Space>) {
        let _ = self.space.set(space);
    }

    /// Serve one access on the stub behind `fd`.
    pub fn serve(&self, fd: BorrowedFd<'_>, need: Need) -> io::Result<Served> {
        let st = sysfs::fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(Served::Complete);
        }
        let Some(entry) = self.entry(&st, fd)? else {
            return Ok(Served::Complete);
        };
        let plan = plan(
            Shape::of(&entry),
            &mut lock(&entry.state),
            st.st_size as u64,
            need,
            self.backend.random_piece(),
            Instant::now(),
        );
        if plan.complete {
            return Ok(Served::Complete);
        }
        if plan.start < plan.end {
            match self.fill(&entry, fd, plan.start, plan.end, false) {
                // The store is full: the cache limit frees the oldest files, and the fill is
                // tried once more (what was written stays, it goes on from the gaps).
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    let room = self
                        .space
                        .get()
                        .is_some_and(|sp| sp.make_room(plan.end - plan.start));
                    if !room {
                        return Err(e);
                    }
                    self.fill(&entry, fd, plan.start, plan.end, false)?;
                }
                r => {
                    r?;
                }
            }
            if let Some((start, end)) =
                readahead::window(&plan, self.readahead, self.far_readahead())
            {
                self.schedule_readahead(&entry, start, end);
            }
        }
        let s = lock(&entry.state);
        if s.record.is_complete() {
            Ok(Served::Complete)
        } else {
            Ok(Served::Present)
        }
    }

    /// Is what `need` asks for present (the record is loaded if the file is not cached)? No
    /// fetch, no readahead: for accesses the fetch policy keeps from fetching. Not a stub: yes.
    pub fn is_present(&self, fd: BorrowedFd<'_>, need: Need) -> io::Result<bool> {
        let st = sysfs::fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(true);
        }
        let Some(entry) = self.entry(&st, fd)? else {
            return Ok(true);
        };
        let mut s = lock(&entry.state);
        if let Need::Range { offset, count } = need {
            // The bytes asked for, not the chunk a fetch would make of them.
            let end = offset
                .saturating_add(count)
                .min(s.record.backed_len)
                .min(st.st_size as u64);
            if count > 0 {
                return Ok(offset >= end || s.record.present.gaps(offset, end).is_empty());
            }
        }
        // Planned as a fetch would be, without moving the reader's cursor.
        let (cursor, last_access) = (s.cursor, s.last_access);
        let p = plan(
            Shape::of(&entry),
            &mut s,
            st.st_size as u64,
            need,
            self.backend.random_piece(),
            Instant::now(),
        );
        let present = p.complete || s.record.present.gaps(p.start, p.end).is_empty();
        (s.cursor, s.last_access) = (cursor, last_access);
        Ok(present)
    }

    /// Fetch what an open of the stub behind `fd` would, unless it is present already (a
    /// directory prefetch, see [`crate::prefetch`]). Its backend reads go to the low-priority
    /// pool, as an access list's do: nobody waits on them yet, and the many a walk keeps in
    /// flight over a long round trip must never queue a reader's miss behind them.
    pub fn prefetch_open(&self, fd: BorrowedFd<'_>) -> io::Result<Prefetched> {
        let st = sysfs::fstat(fd)?;
        let not_a_stub = Prefetched {
            fetched: false,
            complete: true,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(not_a_stub);
        }
        let Some(entry) = self.entry(&st, fd)? else {
            return Ok(not_a_stub);
        };
        let plan = plan(
            Shape::of(&entry),
            &mut lock(&entry.state),
            st.st_size as u64,
            Need::Open,
            self.backend.random_piece(),
            Instant::now(),
        );
        if plan.complete {
            return Ok(Prefetched {
                fetched: false,
                complete: lock(&entry.state).record.is_complete(),
            });
        }
        let missing = missing_bytes(&entry, &[(plan.start, plan.end)]);
        let Some(_room) = self.hold_room_ahead(missing) else {
            return Ok(Prefetched {
                fetched: false,
                complete: false,
            });
        };
        let fetched = self.fill_at(&entry, fd, plan.start, plan.end, true, true)?;
        let complete = lock(&entry.state).record.is_complete();
        Ok(Prefetched { fetched, complete })
    }

    /// Fetch, at low priority, what an open of the stub behind `fd` would (`open`) and the
    /// `ranges` (clipped to the file): an access list's prefetch (see `crate::access_list`).
    /// Returns the ranges this call found missing and made present (a reader may have fetched
    /// some of them meanwhile).
    pub fn prefetch_ranges(
        &self,
        fd: BorrowedFd<'_>,
        open: bool,
        ranges: &[(u64, u64)],
    ) -> io::Result<Vec<(u64, u64)>> {
        let st = sysfs::fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(Vec::new());
        }
        let Some(entry) = self.entry(&st, fd)? else {
            return Ok(Vec::new());
        };
        let size = st.st_size as u64;
        let mut wanted: Vec<(u64, u64)> = Vec::new();
        if open {
            let p = plan(
                Shape::of(&entry),
                &mut lock(&entry.state),
                size,
                Need::Open,
                self.backend.random_piece(),
                Instant::now(),
            );
            if !p.complete && p.start < p.end {
                wanted.push((p.start, p.end));
            }
        }
        for &(start, end) in ranges {
            // Whole pages, as the kernel asks for them.
            let start = start & !4095;
            let end = end.saturating_add(4095) & !4095;
            if start < size.min(end) {
                wanted.push((start, end.min(size)));
            }
        }
        let Some(_room) = self.hold_room_ahead(missing_bytes(&entry, &wanted)) else {
            return Ok(Vec::new());
        };
        let mut made = Vec::new();
        for (start, end) in wanted {
            let gaps = lock(&entry.state).record.present.gaps(start, end);
            if gaps.is_empty() {
                continue;
            }
            self.fill_at(&entry, fd, start, end, true, true)?;
            made.extend(gaps);
        }
        Ok(made)
    }

    /// An access the supervisor allowed from a published range: note it as a served one, so
    /// that a sequential reader's readahead goes on.
    pub fn note_access(&self, fd: BorrowedFd<'_>, need: Need) {
        let _ = self.serve_if_present(fd, need, &|| false);
    }

    /// Serve `need` at once if that takes no record load and no wait: the file is cached and
    /// what it needs is present, or missing but one random piece from a source that does not
    /// stall (a local disk: one short read) and `small_fill()`, asked only then, allows it.
    /// `None` (nothing changed): call
    /// [`Engine::serve`]. This is what lets a sequential reader that readahead keeps ahead of,
    /// and a random reader of a local source, be answered without a hand-off to another thread.
    pub fn serve_if_present(
        &self,
        fd: BorrowedFd<'_>,
        need: Need,
        small_fill: &dyn Fn() -> bool,
    ) -> Option<io::Result<Served>> {
        let st = match sysfs::fstat(fd) {
            Ok(st) => st,
            Err(e) => return Some(Err(e)),
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Some(Ok(Served::Complete));
        }
        let entry = lock(&self.files).get(&(st.st_dev, st.st_ino)).cloned()?;
        let mut s = lock(&entry.state);
        let cursor = s.cursor;
        let plan = plan(
            Shape::of(&entry),
            &mut s,
            st.st_size as u64,
            need,
            self.backend.random_piece(),
            Instant::now(),
        );
        let present = plan.complete || s.record.present.gaps(plan.start, plan.end).is_empty();
        if !present {
            let small = plan.end - plan.start <= self.backend.random_piece();
            if !(small && !self.backend.reads_may_stall() && small_fill()) {
                s.cursor = cursor;
                return None;
            }
            drop(s);
            if let Err(e) = self.fill(&entry, fd, plan.start, plan.end, false) {
                return Some(Err(e));
            }
            s = lock(&entry.state);
        }
        let complete = s.record.is_complete();
        drop(s);
        if let Some((start, end)) =
            readahead::window(&plan, self.readahead, self.far_readahead()).filter(|_| !complete)
        {
            self.schedule_readahead(&entry, start, end);
        }
        Some(Ok(if complete {
            Served::Complete
        } else {
            Served::Present
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::persist::QUIET_BEFORE_RECORD;
    use super::*;
    use crate::backend::FetchError;
    use crate::record::{SourceRecord, StateRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A source whose reads at `slow_from` and beyond take `slow` (the others no time), so that a
    /// fill can be caught with some pieces written and others in flight; it counts the bytes read
    /// from it, and fetches 4 KiB random pieces like a local disk.
    #[derive(Default)]
    struct SlowSource {
        slow_from: u64,
        slow: Duration,
        read: AtomicU64,
    }

    fn source_byte(offset: u64) -> u8 {
        (offset % 251) as u8
    }

    impl Backend for SlowSource {
        fn read_range(
            &self,
            _obj: &SourceRecord,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), FetchError> {
            if offset >= self.slow_from {
                std::thread::sleep(self.slow);
            }
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = source_byte(offset + i as u64);
            }
            Ok(())
        }

        fn random_piece(&self) -> u64 {
            4 << 10
        }

        fn describe(&self) -> String {
            "slow test source".into()
        }
    }

    /// A stub of `size` bytes with its source record, in a directory of the machine's disk
    /// (`trusted.*` xattrs: the tests run as root, as the daemon does).
    fn stub_file(dir: &std::path::Path, size: u64) -> std::fs::File {
        let path = dir.join("stub");
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let record = SourceRecord {
            key: b"stub".to_vec(),
            size,
            mtime: (1, 0),
            version: None,
            chunk_size: 1 << 20,
            kind: StubKind::Cloned,
            digests: None,
        };
        sysfs::fsetxattr(f.as_fd(), XATTR_SOURCE, &record.encode()).unwrap();
        f
    }

    /// The first `len` bytes of `file` are the test source's.
    fn assert_holds_the_source(file: &std::fs::File, len: usize) {
        let mut back = vec![0u8; len];
        assert_eq!(sysfs::pread_full(file.as_fd(), &mut back, 0).unwrap(), len);
        assert!(back
            .iter()
            .enumerate()
            .all(|(i, &b)| b == source_byte(i as u64)));
    }

    /// An engine over `source` for the unit tests: no published ranges, no readahead, no view.
    fn test_engine(
        source: Arc<dyn Backend>,
        metrics: Shared<Metrics>,
        dir: &std::path::Path,
    ) -> Engine {
        Engine::new(
            source,
            metrics,
            None,
            0,
            Duration::from_secs(20),
            StoreAccess {
                digest_dir: dir.join("digests"),
                tree: None,
                xfs: false,
            },
        )
    }

    #[test]
    fn a_file_is_not_recorded_while_a_fill_of_it_is_in_flight() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 2 << 20);
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics").unwrap();
        let engine = Arc::new(test_engine(
            Arc::new(SlowSource {
                slow_from: 1 << 20,
                slow: Duration::from_millis(2500),
                ..Default::default()
            }),
            metrics,
            dir.path(),
        ));
        let fd = file.try_clone().unwrap();
        let filler = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                engine.serve(
                    fd.as_fd(),
                    Need::Range {
                        offset: 0,
                        count: 2 << 20,
                    },
                )
            })
        };
        // The first chunk is written at once; the second is still being fetched 1.5 s later,
        // when the first has been quiet for longer than `QUIET_BEFORE_RECORD`.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(engine.flush(false), 0, "recorded in the middle of its fill");
        assert_eq!(sysfs::fgetxattr(file.as_fd(), XATTR_STATE).unwrap(), None);

        assert_eq!(filler.join().unwrap().unwrap(), Served::Complete);
        std::thread::sleep(QUIET_BEFORE_RECORD + Duration::from_millis(100));
        assert_eq!(engine.flush(false), 1, "not recorded once quiet");
        let raw = sysfs::fgetxattr(file.as_fd(), XATTR_STATE)
            .unwrap()
            .unwrap();
        assert!(StateRecord::decode_alone(&raw).unwrap().is_complete());
        assert_holds_the_source(&file, 2 << 20);
    }

    #[test]
    fn readers_of_a_chunk_being_fetched_wait_for_that_fetch() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 2 << 20);
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics-waiters").unwrap();
        let source = Arc::new(SlowSource {
            slow_from: 0,
            slow: Duration::from_millis(300),
            ..Default::default()
        });
        let engine = Arc::new(test_engine(source.clone(), metrics, dir.path()));
        let whole = Need::Range {
            offset: 0,
            count: 2 << 20,
        };
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (engine, fd) = (engine.clone(), file.try_clone().unwrap());
                std::thread::spawn(move || engine.serve(fd.as_fd(), whole))
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap().unwrap(), Served::Complete);
        }
        // Each byte was fetched once: the readers that found a chunk claimed waited for it.
        assert_eq!(source.read.load(Ordering::Relaxed), 2 << 20);
        assert_holds_the_source(&file, 2 << 20);
        let st = sysfs::fstat(file.as_fd()).unwrap();
        let entry = engine.entry(&st, file.as_fd()).unwrap().unwrap();
        assert_eq!(
            lock(&entry.state).waiters,
            0,
            "a waiter was not counted out"
        );
    }

    #[test]
    fn a_full_cache_records_idle_files_itself_and_evicts_them() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 2 << 20);
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics-pressure").unwrap();
        let mut engine = test_engine(
            Arc::new(SlowSource {
                slow_from: u64::MAX,
                ..Default::default()
            }),
            metrics,
            dir.path(),
        );
        assert_eq!(
            engine.serve(file.as_fd(), Need::Whole).unwrap(),
            Served::Complete
        );
        // Room in the cache, the file just read: nothing is due.
        assert_eq!(engine.flush_for(persist::Flush::Pressure), 0);
        assert_eq!(engine.cached_files(), 1);
        // A full cache: the idle file is recorded at once (after its `fdatasync`) and dropped.
        engine.max_cached = 0;
        assert_eq!(engine.flush_for(persist::Flush::Pressure), 1);
        let raw = sysfs::fgetxattr(file.as_fd(), XATTR_STATE)
            .unwrap()
            .unwrap();
        assert!(StateRecord::decode_alone(&raw).unwrap().is_complete());
        assert_eq!(engine.cached_files(), 0);
    }

    #[test]
    fn a_crowded_cache_is_relieved_by_the_flusher_thread() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 2 << 20);
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics-flusher").unwrap();
        let mut engine = test_engine(
            Arc::new(SlowSource {
                slow_from: u64::MAX,
                ..Default::default()
            }),
            metrics,
            dir.path(),
        );
        engine.max_cached = 0;
        let engine = Arc::new(engine);
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flusher = {
            let (engine, rounds) = (engine.clone(), rounds.clone());
            std::thread::spawn(move || {
                // An interval far beyond the test: only a pressure round can run in it.
                engine.run_flusher(Duration::from_secs(3600), || {
                    rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
        };
        while !engine.flusher_running() {
            std::thread::yield_now();
        }
        // The first file rings as it is loaded, but is being filled: nothing to drop yet.
        assert_eq!(
            engine.serve(file.as_fd(), Need::Whole).unwrap(),
            Served::Complete
        );
        // The next file rings, and waits for the round that records the first and drops it.
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let other = stub_file(&dir.path().join("other"), 1 << 20);
        assert_eq!(
            engine.serve(other.as_fd(), Need::Whole).unwrap(),
            Served::Complete
        );
        assert_eq!(engine.cached_files(), 1, "the first file is still cached");
        assert!(rounds.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        let raw = sysfs::fgetxattr(file.as_fd(), XATTR_STATE)
            .unwrap()
            .unwrap();
        assert!(StateRecord::decode_alone(&raw).unwrap().is_complete());
        engine.stop_flusher();
        flusher.join().unwrap();
    }

    #[test]
    fn a_read_near_the_last_one_is_random_and_only_one_that_goes_on_gets_a_chunk() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 64 << 20);
        let source = Arc::new(SlowSource {
            slow_from: u64::MAX,
            ..Default::default()
        });
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics-near").unwrap();
        let engine = test_engine(source.clone(), metrics, dir.path());
        let read_for = |offset: u64| {
            let before = source.read.load(Ordering::Relaxed);
            let need = Need::Range {
                offset,
                count: 4096,
            };
            assert_eq!(engine.serve(file.as_fd(), need).unwrap(), Served::Present);
            let mut page = vec![0u8; 4096];
            sysfs::pread_full(file.as_fd(), &mut page, offset).unwrap();
            assert!(page
                .iter()
                .enumerate()
                .all(|(i, &b)| b == source_byte(offset + i as u64)));
            source.read.load(Ordering::Relaxed) - before
        };
        let mib = 1u64 << 20;
        assert_eq!(read_for(8 * mib), 4096, "a random read fetches its page");
        // 256 KiB past the last read: still a random reader's page, not a chunk.
        assert_eq!(
            read_for(8 * mib + (256 << 10)),
            4096,
            "a near read fetched more"
        );
        // Going on from the last read: its whole chunk, but for the two pages present.
        let next = 8 * mib + (256 << 10) + 4096;
        assert_eq!(
            read_for(next),
            mib - 2 * 4096,
            "a read that goes on got no chunk"
        );
    }
}
