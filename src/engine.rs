//! The fetch engine: make a byte range of a stub present, exactly once, and remember it.
//!
//! The engine knows nothing of fanotify. It is handed an open fd on a stub (the event's fd, opened
//! by the kernel without notification, so writing through it raises no event) and what is needed:
//! a range or the whole file. It loads the file's records from its xattrs, fetches the missing
//! chunks from the backend, writes them through the fd and marks them present in memory. A flusher
//! persists the records later, after a `syncfs`, so that a record never claims bytes that are not
//! on disk (a crash costs a refetch, never zeros taken for content).
//!
//! Concurrency: per file, chunks being fetched are claimed under the file's lock; a second request
//! for a claimed chunk waits for the first instead of fetching it again. Different files and
//! different chunks of one file are fetched in parallel by the caller's threads.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::backend::{Backend, FetchError};
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::published::{FileId, PublishedRanges};
use crate::record::{SourceRecord, StateRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;
use crate::sys::shm::Shared;

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

type FileKey = (u64, u64);

struct Entry {
    source: SourceRecord,
    /// One digest per chunk, when populate recorded them.
    digests: Option<Vec<Digest>>,
    /// A duplicate of the first event's fd: lets the flusher and readahead reach the file.
    file: OwnedFd,
    /// The fd fills are written through: event fds are read-only (see `sys::fanotify::Group`),
    /// so the same inode reopened read-write through the daemon's view of the store. On xfs an
    /// "invisible I/O" fd, whose writes leave mtime and ctime alone (`keeps_times`).
    writer: Option<OwnedFd>,
    keeps_times: bool,
    state: Mutex<EntryState>,
    changed: Condvar,
    /// For [`PublishedRanges`]; `None`: nothing is published for this file.
    id: Option<FileId>,
}

struct EntryState {
    record: StateRecord,
    /// Chunk indices being fetched right now.
    in_flight: HashSet<u64>,
    /// The record changed since it was last persisted.
    dirty: bool,
    /// End of the chunks the requests so far reached: a request starting here is sequential.
    last_end: u64,
    /// End of the last range requested, as the kernel gave it.
    last_request_end: u64,
    /// Last access served or piece written: records are written when a file has gone quiet
    /// (see `flush`).
    last_access: Instant,
    dirty_since: Option<Instant>,
    /// Changed locally (mtime no longer the source's) while not complete: bytes on disk in an
    /// unrecorded range may be the user's, written after a fill whose record a crash lost. Such
    /// ranges are compared before anything is written over them.
    suspect: bool,
}

pub struct Engine {
    backend: Arc<dyn Backend>,
    /// Backend reads run on these threads, so a hung read costs a thread, never a reader's
    /// deadline: the reader gets EAGAIN after `fetch_timeout`.
    fetch_tx: crossbeam_channel::Sender<(FetchJob, FetchReply)>,
    fetch_timeout: Duration,
    digest_dir: PathBuf,
    /// The store's tree, on the daemon's ignore-marked view, to reopen stubs for writing.
    store_tree: Option<OwnedFd>,
    /// The store is on xfs: reopen for invisible I/O.
    xfs: bool,
    files: Mutex<HashMap<FileKey, Arc<Entry>>>,
    /// How many entries `files` may hold before complete ones are recorded and dropped early.
    max_cached: usize,
    /// One pressure flush at a time (see `entry`).
    pressure_flush: std::sync::atomic::AtomicBool,
    pub metrics: Shared<Metrics>,
    /// Where present ranges are published for the supervisor (see [`crate::published`]).
    published: Option<Shared<PublishedRanges>>,
    /// How far ahead of a sequential reader to fetch.
    readahead: u64,
    readahead_tx: Mutex<Option<crossbeam_channel::Sender<Readahead>>>,
}

struct FetchJob {
    entry: Arc<Entry>,
    offset: u64,
    len: usize,
    /// Move the bytes through a pipe if the backend can (see [`Fetched::Piped`]).
    splice: bool,
}

type FetchReply = crossbeam_channel::Sender<Result<Fetched, FetchError>>;

/// A backend read that [`Engine::submit`] started.
enum Started {
    /// Read on the calling thread (the backend's reads cannot stall).
    Done(Result<Fetched, FetchError>),
    /// On a fetch thread: the answer comes here, or the caller gives up at its deadline.
    Queued(crossbeam_channel::Receiver<Result<Fetched, FetchError>>),
}

impl Started {
    fn wait(
        self,
        timeout: Duration,
    ) -> Result<Result<Fetched, FetchError>, crossbeam_channel::RecvTimeoutError> {
        match self {
            Started::Done(res) => Ok(res),
            Started::Queued(rx) => rx.recv_timeout(timeout),
        }
    }
}

/// The bytes of one backend read.
enum Fetched {
    Bytes(Vec<u8>),
    /// Still in a pipe, as references to the source's pages (a local source): written into
    /// the stub with one copy, where `pread` + `pwrite` make two and need a buffer.
    Piped(OwnedFd),
}

/// Pieces at least this long go through a pipe when the backend can splice.
const SPLICE_MIN: usize = 64 << 10;

impl Fetched {
    fn read(backend: &dyn Backend, job: &FetchJob) -> Result<Fetched, FetchError> {
        if job.splice {
            if let Ok(pipe) = sysfs::pipe_with_capacity(job.len) {
                let moved = backend.splice_range(
                    &job.entry.source,
                    job.offset,
                    job.len,
                    pipe.write.as_fd(),
                );
                if let Some(res) = moved {
                    return res.map(|()| Fetched::Piped(pipe.read));
                }
            }
        }
        let mut buf = vec![0u8; job.len];
        backend.read_range(&job.entry.source, job.offset, &mut buf)?;
        Ok(Fetched::Bytes(buf))
    }

    /// [`Fetched::read`], with a panic in the backend turned into this read's error.
    fn read_guarded(backend: &dyn Backend, job: &FetchJob) -> Result<Fetched, FetchError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Fetched::read(backend, job)))
            .unwrap_or_else(|_| Err(FetchError::Io(io::Error::other("backend read panicked"))))
    }
}

/// Backend reads in flight at once for one request (each up to a chunk in memory).
const FETCH_WINDOW: usize = 8;
const FETCH_THREADS: usize = 32;

struct Readahead {
    entry: Arc<Entry>,
    start: u64,
    end: u64,
}

/// A file's record is written once no access has come for this long...
const QUIET_BEFORE_RECORD: Duration = Duration::from_secs(1);
/// ...or once it has waited this long.
const MAX_RECORD_LAG: Duration = Duration::from_secs(30);

/// Keep at most this many idle entries cached; complete clean ones go first. Each holds one or
/// two fds, so fewer when the process may open fewer files (see `cache_limit`).
const MAX_CACHED: usize = 4096;

/// Entries to cache with the open-files limit this process has: a quarter of it (each entry
/// holds up to two fds; events in hand and backend reads need the rest).
fn cache_limit() -> usize {
    let files = sysfs::open_files_limit().unwrap_or(1024);
    ((files / 4) as usize).clamp(16, MAX_CACHED)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent state here (claims are released by guards),
    // so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where an fd points, for log lines.
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "<unknown>".into())
}

/// The largest state record written, within what every filesystem here takes as one xattr value
/// (ext4: a block, less its headers). A file read at random in many places has more present
/// ranges than that holds: its record then keeps the longest ranges and forgets the others,
/// which are fetched again after a restart (claiming less is safe; claiming more never is).
const MAX_RECORD_BYTES: usize = 3072;

fn bounded_encoding(record: &StateRecord) -> Vec<u8> {
    let mut bytes = record.encode();
    let mut keep = record.present.pairs().len();
    while bytes.len() > MAX_RECORD_BYTES && keep > 0 {
        keep = keep * 3 / 4;
        let shorter = StateRecord {
            present: record.present.longest(keep),
            ..record.clone()
        };
        bytes = shorter.encode();
    }
    bytes
}

/// What serving one access takes.
struct Plan {
    /// The range to make present (empty: nothing).
    start: u64,
    end: u64,
    /// The reader goes on where it was: fetch ahead of it.
    sequential: bool,
    complete: bool,
}

/// Work out what `need` takes for a file of `size` bytes now, and note the access in `s`.
/// `random_piece`: what an access away from where the file was last read fetches (aligned),
/// instead of whole chunks: random readers of big files should not pay for a chunk per page.
fn plan(entry: &Entry, s: &mut EntryState, size: u64, need: Need, random_piece: u64) -> Plan {
    let chunk = entry.source.chunk_size as u64;
    s.last_access = Instant::now();
    // A file shorter than the part we know is backed was truncated locally: what lies beyond is
    // the user's, never the source's again.
    if size < s.record.backed_len {
        s.record.backed_len = size;
        s.record.present.truncate(size);
        s.record.modified = true;
        s.dirty = true;
    }
    let backed = s.record.backed_len;
    let mut follows = true;
    let (start, end) = match need {
        Need::Whole | Need::Range { count: 0, .. } => (0, backed),
        Need::Open if entry.source.kind == StubKind::Sparse => (0, backed),
        Need::Open => (0, 0),
        Need::Range { offset, count } => {
            let request_end = offset.saturating_add(count).min(backed);
            // Within one request (or piece) of where the last one ended: readers with a few
            // requests in flight arrive a little out of order. A chunk's distance was too wide: a
            // random reader of a 1 GiB file landed that close once in 500 reads and paid a whole
            // chunk for a page (2,000 cold 4 KiB reads: 12.3 MB read for 8.2 MB asked).
            follows = offset == 0 || offset.abs_diff(s.last_request_end) <= count.max(random_piece);
            s.last_request_end = request_end;
            // A reader that goes on from where it was gets whole chunks (and readahead); an
            // access elsewhere, only the pieces around it, unless chunks must be checked whole
            // against their digests.
            let piece = if follows || entry.digests.is_some() {
                chunk
            } else {
                random_piece.min(chunk)
            };
            (offset / piece * piece, request_end.div_ceil(piece) * piece)
        }
    };
    let end = end.min(backed);
    let start = start.min(end);
    let sequential = follows && start > 0 && start <= s.last_end && s.last_end < end;
    if end > start {
        s.last_end = s.last_end.max(end).min(backed);
    }
    Plan {
        start,
        end,
        sequential,
        complete: s.record.is_complete(),
    }
}

/// Fetched bytes on their way into a stub.
enum Piece<'a> {
    Bytes(&'a [u8]),
    /// Exactly the piece, in a pipe (never for a suspect file: its bytes must be compared).
    Pipe(BorrowedFd<'a>),
}

/// Releases chunk claims when dropped, even if the fetch panicked.
struct Claims<'a> {
    entry: &'a Entry,
    chunks: Vec<u64>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.entry.state);
        for c in &self.chunks {
            st.in_flight.remove(c);
        }
        drop(st);
        self.entry.changed.notify_all();
    }
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

    pub fn new(
        backend: Arc<dyn Backend>,
        metrics: Shared<Metrics>,
        published: Option<Shared<PublishedRanges>>,
        readahead: u64,
        fetch_timeout: Duration,
        digest_dir: PathBuf,
        store_tree: Option<OwnedFd>,
        xfs: bool,
    ) -> Engine {
        let (fetch_tx, fetch_rx) = crossbeam_channel::unbounded::<(FetchJob, FetchReply)>();
        for _ in 0..FETCH_THREADS {
            let rx = fetch_rx.clone();
            let backend = backend.clone();
            std::thread::spawn(move || {
                for (job, reply) in rx {
                    // The requester may have given up (timeout): then the bytes are dropped.
                    let _ = reply.send(Fetched::read_guarded(&*backend, &job));
                }
            });
        }
        Engine {
            backend,
            fetch_tx,
            fetch_timeout,
            digest_dir,
            store_tree,
            xfs,
            files: Mutex::new(HashMap::new()),
            max_cached: cache_limit(),
            pressure_flush: std::sync::atomic::AtomicBool::new(false),
            metrics,
            published,
            readahead,
            readahead_tx: Mutex::new(None),
        }
    }

    /// Start `threads` background threads that fetch ahead of sequential readers.
    pub fn start_readahead(self: &Arc<Self>, threads: usize) {
        let (tx, rx) = crossbeam_channel::bounded::<Readahead>(64);
        *lock(&self.readahead_tx) = Some(tx);
        for _ in 0..threads {
            let rx = rx.clone();
            let engine = Arc::downgrade(self);
            std::thread::spawn(move || {
                while let Ok(job) = rx.recv() {
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    let file = job.entry.file.as_fd();
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.fill(&job.entry, file, job.start, job.end, true)
                    }));
                    if let Ok(Err(e)) = res {
                        debug!("readahead failed: {e}");
                    }
                }
            });
        }
    }

    /// Stop readahead threads (they exit when the queue is empty).
    pub fn stop_readahead(&self) {
        lock(&self.readahead_tx).take();
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
            &entry,
            &mut lock(&entry.state),
            st.st_size as u64,
            need,
            self.backend.random_piece(),
        );
        if plan.complete {
            return Ok(Served::Complete);
        }
        if plan.start < plan.end {
            self.fill(&entry, fd, plan.start, plan.end, false)?;
            if plan.sequential && self.readahead > 0 {
                self.schedule_readahead(&entry, plan.end, plan.end.saturating_add(self.readahead));
            }
        }
        let s = lock(&entry.state);
        if s.record.is_complete() {
            Ok(Served::Complete)
        } else {
            Ok(Served::Present)
        }
    }

    /// Fetch what an open of the stub behind `fd` would, unless it is present already (a
    /// directory prefetch, see [`crate::prefetch`]).
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
            &entry,
            &mut lock(&entry.state),
            st.st_size as u64,
            Need::Open,
            self.backend.random_piece(),
        );
        let fetched = !plan.complete && self.fill(&entry, fd, plan.start, plan.end, true)?;
        let complete = lock(&entry.state).record.is_complete();
        Ok(Prefetched { fetched, complete })
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
        let cursor = (s.last_end, s.last_request_end);
        let plan = plan(
            &entry,
            &mut s,
            st.st_size as u64,
            need,
            self.backend.random_piece(),
        );
        let present = plan.complete || s.record.present.gaps(plan.start, plan.end).is_empty();
        if !present {
            let small = plan.end - plan.start <= self.backend.random_piece();
            if !(small && !self.backend.reads_may_stall() && small_fill()) {
                (s.last_end, s.last_request_end) = cursor;
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
        if plan.sequential && self.readahead > 0 && !complete {
            self.schedule_readahead(&entry, plan.end, plan.end.saturating_add(self.readahead));
        }
        Some(Ok(if complete {
            Served::Complete
        } else {
            Served::Present
        }))
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
        let cursor = (s.last_end, s.last_request_end);
        let p = plan(
            &entry,
            &mut s,
            st.st_size as u64,
            need,
            self.backend.random_piece(),
        );
        let present = p.complete || s.record.present.gaps(p.start, p.end).is_empty();
        (s.last_end, s.last_request_end) = cursor;
        Ok(present)
    }

    fn schedule_readahead(&self, entry: &Arc<Entry>, start: u64, end: u64) {
        let tx = lock(&self.readahead_tx).clone();
        if let Some(tx) = tx {
            // Full queue: skip, the reader will fetch on demand.
            let _ = tx.try_send(Readahead {
                entry: entry.clone(),
                start,
                end,
            });
        }
    }

    /// Look up or load the entry for a file. `None`: not a stub (no source record).
    fn entry(&self, st: &libc::stat, fd: BorrowedFd<'_>) -> io::Result<Option<Arc<Entry>>> {
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
            file: fd.try_clone_to_owned()?,
            state: Mutex::new(EntryState {
                record,
                in_flight: HashSet::new(),
                dirty: false,
                last_end: 0,
                last_request_end: 0,
                last_access: Instant::now(),
                dirty_since: None,
                suspect,
            }),
            changed: Condvar::new(),
            id: FileId::of(fd),
        });
        let mut files = lock(&self.files);
        let entry = files.entry(key).or_insert(entry).clone();
        let full = files.len() > self.max_cached;
        drop(files);
        // A burst of new files (tar, grep over a tree) outruns the periodic flush: record and
        // drop complete entries now, before their fds exhaust the process's limit.
        if full
            && !self
                .pressure_flush
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.flush(false);
            self.pressure_flush
                .store(false, std::sync::atomic::Ordering::Release);
        }
        Ok(Some(entry))
    }

    /// Make `[start, end)` present, fetching each missing chunk once. Returns whether this call
    /// fetched anything itself. `readahead`: leave pieces that others are fetching to them.
    fn fill(
        &self,
        entry: &Arc<Entry>,
        fd: BorrowedFd<'_>,
        start: u64,
        end: u64,
        readahead: bool,
    ) -> io::Result<bool> {
        let chunk = entry.source.chunk_size as u64;
        let mut wrote = false;
        loop {
            let mut s = lock(&entry.state);
            let end = end.min(s.record.backed_len);
            let gaps = s.record.present.gaps(start, end);
            if gaps.is_empty() {
                return Ok(wrote);
            }
            // Claim every missing piece not already being fetched; wait for the others.
            let mut mine: Vec<(u64, u64, u64)> = Vec::new();
            for (gs, ge) in gaps {
                let mut c = gs / chunk;
                while c * chunk < ge {
                    let (ps, pe) = ((c * chunk).max(gs), ((c + 1) * chunk).min(ge));
                    if !s.in_flight.contains(&c) {
                        s.in_flight.insert(c);
                        mine.push((c, ps, pe));
                    }
                    c += 1;
                }
            }
            if mine.is_empty() {
                if readahead {
                    return Ok(wrote); // someone else is on it
                }
                let _ = entry
                    .changed
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            drop(s);
            let _claims = Claims {
                entry,
                chunks: mine.iter().map(|m| m.0).collect(),
            };
            // One piece (a random access, a reader's first chunk) from a source that cannot
            // stall: read it here rather than wake a fetch thread and wait for it. More: keep
            // FETCH_WINDOW reads in flight, the next one started as each is written, so the
            // source is read while this thread copies into the stub.
            let here = mine.len() == 1 && !self.backend.reads_may_stall();
            let mut todo = mine.iter();
            let mut in_flight = std::collections::VecDeque::with_capacity(FETCH_WINDOW);
            loop {
                while in_flight.len() < FETCH_WINDOW {
                    let Some(&(c, ps, pe)) = todo.next() else {
                        break;
                    };
                    let (started, from) = self.submit(entry, c, ps, pe, here);
                    let deadline = std::time::Instant::now() + self.fetch_timeout;
                    in_flight.push_back((c, ps, pe, started, from, deadline));
                }
                let Some((c, ps, pe, started, fetched_from, deadline)) = in_flight.pop_front()
                else {
                    break;
                };
                let wait = deadline.saturating_duration_since(std::time::Instant::now());
                let fetched = match started.wait(wait) {
                    Ok(Ok(fetched)) => fetched,
                    Ok(Err(e)) => {
                        warn!(
                            file = %fd_path(fd),
                            range = %format!("{ps}..{pe}"),
                            source = %self.backend.describe(),
                            "fetch failed: {e}"
                        );
                        return Err(e.as_io());
                    }
                    Err(_) => {
                        warn!(
                            file = %fd_path(fd),
                            range = %format!("{ps}..{pe}"),
                            source = %self.backend.describe(),
                            "fetch timed out after {:?}", self.fetch_timeout
                        );
                        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                    }
                };
                let piece = match &fetched {
                    Fetched::Piped(pipe) => Piece::Pipe(pipe.as_fd()),
                    Fetched::Bytes(buf) => {
                        if let Some(digests) = &entry.digests {
                            let ok = digests
                                .get(c as usize)
                                .is_some_and(|d| *d == crate::digest::chunk_digest(buf));
                            if !ok {
                                warn!(
                                    file = %fd_path(fd),
                                    range = %format!("{}..{}", fetched_from, fetched_from + buf.len() as u64),
                                    source = %self.backend.describe(),
                                    "fetched bytes do not match the recorded digest; nothing written"
                                );
                                return Err(io::Error::from_raw_os_error(libc::EIO));
                            }
                        }
                        let lo = (ps - fetched_from) as usize;
                        let hi = (pe - fetched_from) as usize;
                        Piece::Bytes(&buf[lo..hi])
                    }
                };
                self.write_piece(entry, fd, ps, pe, piece)?;
                wrote = true;
                if readahead {
                    Metrics::add(&self.metrics.readahead_bytes, pe - ps);
                }
            }
        }
    }

    /// Start the backend read for piece `[ps, pe)` of chunk `c`: the whole chunk when it must be
    /// checked against its digest; on this thread if `here`, else on a fetch thread. Returns
    /// where the read starts.
    fn submit(&self, entry: &Arc<Entry>, c: u64, ps: u64, pe: u64, here: bool) -> (Started, u64) {
        let chunk = entry.source.chunk_size as u64;
        let (from, to) = if entry.digests.is_some() {
            (c * chunk, ((c + 1) * chunk).min(entry.source.size))
        } else {
            (ps, pe)
        };
        Metrics::add(&self.metrics.backend_reads, 1);
        let len = (to - from) as usize;
        // Bytes that must be looked at (digests, a file of unknown history) stay in memory.
        let splice = len >= SPLICE_MIN && entry.digests.is_none() && !lock(&entry.state).suspect;
        let job = FetchJob {
            entry: entry.clone(),
            offset: from,
            len,
            splice,
        };
        if here {
            return (
                Started::Done(Fetched::read_guarded(&*self.backend, &job)),
                from,
            );
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.fetch_tx.send((job, tx));
        (Started::Queued(rx), from)
    }

    /// Write fetched bytes `[ps, pe)` through `fd` and mark them present.
    fn write_piece(
        &self,
        entry: &Entry,
        fd: BorrowedFd<'_>,
        ps: u64,
        pe: u64,
        piece: Piece<'_>,
    ) -> io::Result<()> {
        // The file may have been truncated while we fetched: never write past its end.
        let st = sysfs::fstat(fd)?;
        let size = st.st_size as u64;
        let pe_now = pe.min(size);
        let suspect = lock(&entry.state).suspect;
        if pe_now > ps {
            let n = (pe_now - ps) as usize;
            let dst = entry.writer.as_ref().map_or(fd, |w| w.as_fd());
            let written = match piece {
                Piece::Bytes(buf) if suspect && self.keep_local_bytes(fd, ps, &buf[..n])? => false,
                Piece::Bytes(buf) => sysfs::pwrite_all(dst, &buf[..n], ps).map(|()| true)?,
                Piece::Pipe(pipe) => sysfs::splice_from_pipe(pipe, dst, ps, n).map(|()| true)?,
            };
            if written && !entry.keeps_times {
                // Writing through the fd moved the mtime; the file still is the source's.
                let _ = sysfs::set_mtime(fd, (st.st_mtime, st.st_mtime_nsec));
            }
        }
        Metrics::add(&self.metrics.fetched_bytes, pe_now.saturating_sub(ps));
        let mut s = lock(&entry.state);
        if size < s.record.backed_len {
            s.record.backed_len = size;
            s.record.present.truncate(size);
            s.record.modified = true;
        }
        let backed = s.record.backed_len;
        s.record.present.insert(ps, pe_now.min(backed));
        // Written: the supervisor may answer accesses inside this range from now on.
        if let (Some(table), Some(id), Some((start, end))) =
            (&self.published, &entry.id, s.record.present.range_at(ps))
        {
            table.publish(id, start, end);
        }
        s.last_access = Instant::now();
        s.dirty = true;
        s.dirty_since.get_or_insert_with(Instant::now);
        if s.record.is_complete() {
            Metrics::add(&self.metrics.files_completed, 1);
        }
        drop(s);
        // A reader waiting on this piece (claimed by another request, readahead say) goes on
        // now, not when that request's last piece is written.
        entry.changed.notify_all();
        Ok(())
    }

    /// In a file of unknown history (see `EntryState::suspect`), is `[ps, ps + len)` already
    /// the user's? Unfetched bytes are zeros (holes or zero clones); a fill cut short by a crash
    /// is a prefix of the source's bytes followed by zeros. Anything else was written locally and
    /// is kept (the range is then recorded present without writing).
    fn keep_local_bytes(&self, fd: BorrowedFd<'_>, ps: u64, source: &[u8]) -> io::Result<bool> {
        let mut cur = vec![0u8; source.len()];
        let n = sysfs::pread_full(fd, &mut cur, ps)?;
        cur.truncate(n);
        let common = cur.iter().zip(source).take_while(|(a, b)| a == b).count();
        let is_our_prefix = cur[common..].iter().all(|&b| b == 0);
        if !is_our_prefix {
            warn!(file = %fd_path(fd), offset = ps, "kept bytes written locally in a range not recorded present");
        }
        Ok(!is_our_prefix)
    }

    /// Persist the state of changed files: first `syncfs` so the data is on disk, then the records
    /// that describe it. A record is written once its file has gone quiet (a record write moves
    /// the file's ctime, which `tar` reports as "file changed as we read it"), after
    /// `MAX_RECORD_LAG` whatever happens, or at once when more files are cached than the open-files
    /// limit allows; `force` writes them all. Returns the records written.
    pub fn flush(&self, force: bool) -> usize {
        let entries: Vec<Arc<Entry>> = lock(&self.files).values().cloned().collect();
        // Every cached file holds fds: with too many, records are written without waiting for
        // their files to go quiet, so that idle entries can be evicted (a record write moves the
        // ctime: under pressure, bounded fds come first).
        let pressure = entries.len() > self.max_cached;
        let mut dirty = Vec::new();
        for e in &entries {
            let mut s = lock(&e.state);
            // A file being filled is not quiet, however long ago its access came: a `syncfs`
            // in the middle of a big fill writes back what it has just written and stalls it
            // (one 256 MiB read of a cold file: a 2.8 s `syncfs` half way through its fill).
            let quiet = s.in_flight.is_empty() && s.last_access.elapsed() >= QUIET_BEFORE_RECORD;
            let due = force
                || pressure
                || quiet
                || s.dirty_since.is_some_and(|t| t.elapsed() >= MAX_RECORD_LAG);
            if s.dirty && due {
                s.dirty = false;
                s.dirty_since = None;
                dirty.push((e.clone(), s.record.clone()));
            }
        }
        if let Some((first, _)) = dirty.first() {
            if let Err(err) = sysfs::syncfs(first.file.as_fd()) {
                warn!("syncfs failed, state records not updated: {err}");
                for (e, _) in &dirty {
                    let mut s = lock(&e.state);
                    s.dirty = true;
                    s.dirty_since.get_or_insert_with(Instant::now);
                }
                return 0;
            }
        }
        let mut written = 0;
        for (e, snapshot) in &dirty {
            match sysfs::fsetxattr(e.file.as_fd(), XATTR_STATE, &bounded_encoding(snapshot)) {
                Ok(()) => written += 1,
                Err(err) => {
                    // The record lags the data: a restart refetches, nothing is lost.
                    debug!(file = %fd_path(e.file.as_fd()), "state record not written: {err}");
                    let mut s = lock(&e.state);
                    s.dirty = true;
                    s.dirty_since.get_or_insert_with(Instant::now);
                }
            }
        }
        Metrics::add(&self.metrics.records_written, written as u64);
        // Our own clones would make every entry look in use.
        drop(dirty);
        drop(entries);
        self.evict();
        written
    }

    /// Drop cached entries nobody uses: complete ones always, others beyond the cache limit.
    fn evict(&self) {
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
            // The flusher and the events' pressure flushes make the room; a flush from here
            // too would hold every entry while it runs, so that theirs could evict none.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn cached_files(&self) -> usize {
        lock(&self.files).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ranges::RangeSet;
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

    #[test]
    fn a_file_is_not_recorded_while_a_fill_of_it_is_in_flight() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let file = stub_file(dir.path(), 2 << 20);
        let metrics = Shared::<Metrics>::create(c"hsm-test-metrics").unwrap();
        let engine = Arc::new(Engine::new(
            Arc::new(SlowSource {
                slow_from: 1 << 20,
                slow: Duration::from_millis(2500),
                ..Default::default()
            }),
            metrics,
            None,
            0,
            Duration::from_secs(20),
            dir.path().join("digests"),
            None,
            false,
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
        let mut back = vec![0u8; 2 << 20];
        assert_eq!(
            sysfs::pread_full(file.as_fd(), &mut back, 0).unwrap(),
            back.len()
        );
        assert!(back
            .iter()
            .enumerate()
            .all(|(i, &b)| b == source_byte(i as u64)));
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
        let engine = Engine::new(
            source.clone(),
            metrics,
            None,
            0,
            Duration::from_secs(20),
            dir.path().join("digests"),
            None,
            false,
        );
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

    #[test]
    fn a_record_of_many_ranges_is_cut_to_its_longest_ranges() {
        let mut present = RangeSet::new();
        for i in 0..20_000u64 {
            // Every other 16 KiB piece, a few of them longer.
            present.insert(i * 32768, i * 32768 + 16384 + (i % 97 == 0) as u64 * 8192);
        }
        let record = StateRecord {
            backed_len: 20_000 * 32768,
            present: present.clone(),
            modified: false,
        };
        let bytes = bounded_encoding(&record);
        assert!(bytes.len() <= MAX_RECORD_BYTES, "{} bytes", bytes.len());
        let kept = StateRecord::decode_alone(&bytes).unwrap();
        assert!(!kept.present.is_empty());
        for &(s, e) in kept.present.pairs() {
            assert!(present.contains(s, e), "claims {s}..{e}, never present");
        }
        // The longest ranges (24 KiB) are among those kept.
        assert!(kept.present.contains(0, 24576));

        let few = StateRecord {
            backed_len: 100,
            present: RangeSet::from_pairs(&[(0, 10), (20, 30)]).unwrap(),
            modified: true,
        };
        assert_eq!(bounded_encoding(&few), few.encode());
    }
}
