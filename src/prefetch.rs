//! Directory prefetch: fetch the small files of a directory that a tree walk is reading through.
//!
//! A walk (`tar`, `grep -r`, a build reading its sources) opens the files of a directory one after
//! another, and each open of a stub waits for its own fetch: on a cold tree the walk goes at one
//! source round trip per file, with the source idle while the reader works. Once a directory has
//! had cold opens of [`TRIGGER_OPENS`] different files within [`TRIGGER_WINDOW`], the other stubs
//! of it that an open would fetch whole are fetched in the background, several at a time, up to a
//! budget of files and [`BUDGET_BYTES`]; the walk then finds them present. Opens of complete files
//! whose ignore mark is gone (a hydrated tree after a restart or cache eviction) count too: their
//! directory's complete files then get their marks ahead of the walk, and their bytes are read
//! into the page cache ahead of it, as a fetch puts a stub's there. A program that opens
//! one or two files of a directory (a binary starting up, say) fetches nothing more than it reads.
//! A walk goes on into other directories: once a directory is a walk, the first cold open of a
//! file in a directory beside it or below it (one the walk has not been through yet) starts
//! that directory's first window at once, not after three round trips to the source. Once the
//! walk has gone from one directory into a sibling, whenever a walked directory's files are
//! all handed out the first window of the directory after it in its parent's listing (the one
//! `tar`, `grep -r` or `find` enter next, in that order) starts too, and so on up to
//! [`LOOKAHEAD_DIRS`] directories ahead of the last cold open the walk made: the walk then
//! finds them present, where it would wait a round trip at each.
//! If the walk goes on past the budget, its next cold opens start the next window. Once every
//! window of a directory is handed out, its opens start nothing for [`EXHAUSTED_PAUSE`], except
//! the events of complete files after the walk: their marks went with their inodes (memory
//! pressure, `drop_caches`), and the next walk would otherwise raise an event at every open.
//!
//! How many files are fetched at once adapts to the source ([`InFlight`]): a remote source a
//! round trip of 20 ms away needs tens of requests in flight to keep a walk fed (one file every
//! [`FETCH_SPACING`]), a local disk a few; the number follows the shortest fetch time seen lately
//! (queueing makes fetches longer, never shorter), within [`MIN_IN_FLIGHT`]..[`MAX_IN_FLIGHT`]
//! and [`BYTES_IN_FLIGHT`] of memory. The requests share the backend's one client (and its
//! pool of kept-alive connections) and go through the engine's low-priority fetch pool.
//!
//! Stubs are reached through the store's own tree, which carries no mark (opening them raises no
//! event), with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and first as `O_PATH`: only a
//! regular file is then reopened for writing, so a FIFO or device node put in the tree is never
//! opened. The fill itself is the engine's, with every check an event's fill has. A file that is
//! complete afterwards gets its ignore mark at once, as an event's answer would give it: the
//! walk's open of it then raises no event at all.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::engine::Engine;
use crate::round_trip::RoundTrip;
use crate::sys::fanotify::Group;
use crate::sys::fs as sysfs;

/// Opens of different files of one directory that raised an event (stubs, or complete files
/// whose ignore mark is gone) and that make it a walk.
pub const TRIGGER_OPENS: usize = 3;
/// ...within this long of the first of them.
pub const TRIGGER_WINDOW: Duration = Duration::from_secs(2);
/// Bytes fetched ahead per window, at most (files too big for what is left are skipped).
pub const BUDGET_BYTES: u64 = 64 << 20;
/// Files fetched at once, at least (see [`InFlight`]).
pub const MIN_IN_FLIGHT: usize = 8;
/// ...and at most: also one per [`FDS_PER_FETCH`] files the process may open (each fetch holds
/// a few fds, and events must never run short of them).
pub const MAX_IN_FLIGHT: usize = 64;
/// See [`MAX_IN_FLIGHT`].
const FDS_PER_FETCH: u64 = 64;
/// A thread above the limit looks again this often (it is also rung when the limit grows), and
/// ends once the prefetcher is gone.
const SLOT_LOOK_EVERY: Duration = Duration::from_millis(500);
/// One file fetched ahead per this much of the source's round trip: a walk through files
/// already present takes about this long per small file, so a walk is kept fed when a file
/// arrives this often.
pub const FETCH_SPACING: Duration = Duration::from_micros(250);
/// Bytes of the files being fetched ahead at once, at most (a file larger than this still goes,
/// alone).
pub const BYTES_IN_FLIGHT: u64 = 64 << 20;
/// A walk detected in a directory makes the first cold open in its subdirectories and in its
/// siblings start their windows at once, for this long after it.
const WALK_MEMORY: Duration = Duration::from_secs(30);
/// Directories fetched ahead of a walk, after the one it made its last cold open in (each at
/// most one window: [`BUDGET_BYTES`]).
pub const LOOKAHEAD_DIRS: u8 = 2;
/// A parent's entries read, at most, to find the directory after a walked one.
const LOOKAHEAD_SCAN: usize = 4096;
/// How long a fetch waits for room in the engine's file cache before it is dropped.
const ROOM_WAIT: Duration = Duration::from_secs(1);
/// After running out of fds, prefetch nothing for this long (the events need them).
const STARVED_PAUSE: Duration = Duration::from_secs(1);
/// Below this many open files allowed, no prefetch: under 256 fds it still took the fds that
/// events needed (EMFILE, then EIO, in the fd-limit tar test under load).
pub const MIN_OPEN_FILES: u64 = 4096;

/// Whether a daemon with `files` per window runs a directory prefetch here.
pub fn enabled(files: usize) -> bool {
    files > 0 && sysfs::open_files_limit().is_ok_and(|n| n >= MIN_OPEN_FILES)
}

/// Directories remembered; older ones are forgotten beyond this.
const MAX_DIRS: usize = 4096;

/// What the walk detector knows of one directory.
#[derive(Default)]
struct DirSeen {
    /// Names (hashed) of the files whose opens raised an event since `since`.
    opened: Vec<u64>,
    since: Option<Instant>,
    /// Candidates given to windows so far, in listing order: the next window starts after them.
    /// Counted when a window starts, so that opens arriving while it is listed (a reader that
    /// outruns it) start the next window, never the same one again.
    reserved: usize,
    /// When every candidate had been handed out: opens here start nothing for
    /// [`EXHAUSTED_PAUSE`] after it, unless the marks were lost since (see `opened`).
    exhausted_at: Option<Instant>,
}

/// After a directory's last window, its opens start nothing for this long (a long walk does not
/// list the directory again and again).
const EXHAUSTED_PAUSE: Duration = Duration::from_secs(30);

/// The kernel-independent half: decides when a directory is being walked. Tested alone.
pub struct WalkDetector {
    /// Candidates per window.
    window: usize,
    dirs: HashMap<Vec<u8>, DirSeen>,
    /// Directories in which, or in a child of which, a walk was detected: their children's
    /// first cold open starts a window (see the module doc).
    walked: HashMap<Vec<u8>, Walked>,
}

/// A directory a walk went through (or through a child of).
#[derive(Clone, Copy)]
struct Walked {
    /// When a walk was last detected in it or in a child.
    at: Instant,
    /// Its children in which a walk was detected one after another (the same one again counts
    /// once): from two on, the walk goes from one to the next, and the next ones are fetched
    /// ahead of it.
    children: u32,
    /// The last of them (its name hashed).
    last_child: u64,
}

impl WalkDetector {
    pub fn new(window: usize) -> WalkDetector {
        WalkDetector {
            window,
            dirs: HashMap::new(),
            walked: HashMap::new(),
        }
    }

    /// What is known of a walk through `dir`'s parent (so through `dir`'s siblings) lately.
    fn parent_walked(&self, dir: &[u8], now: Instant) -> Option<Walked> {
        if dir.is_empty() {
            return None;
        }
        let (parent, _) = split(dir);
        self.walked
            .get(parent)
            .filter(|w| now.duration_since(w.at) < WALK_MEMORY)
            .copied()
    }

    /// A walk was detected in `dir` (`first`: its first window): its subdirectories and
    /// siblings are next.
    fn note_walk(&mut self, dir: &[u8], first: bool, now: Instant) {
        if self.walked.len() >= MAX_DIRS {
            self.walked
                .retain(|_, w| now.duration_since(w.at) < WALK_MEMORY);
            if self.walked.len() >= MAX_DIRS {
                self.walked.clear();
            }
        }
        let mut touch = |d: &[u8], child: Option<&[u8]>| {
            let w = self.walked.entry(d.to_vec()).or_insert(Walked {
                at: now,
                children: 0,
                last_child: 0,
            });
            if now.duration_since(w.at) >= WALK_MEMORY {
                w.children = 0;
            }
            w.at = now;
            if let Some(h) = child.map(name_hash) {
                if w.children == 0 || h != w.last_child {
                    w.children += 1;
                    w.last_child = h;
                }
            }
        };
        touch(dir, None);
        if !dir.is_empty() {
            let (parent, name) = split(dir);
            touch(parent, first.then_some(name));
        }
    }

    /// Note an open of `name` in `dir` at `now` that raised an event; `complete`: of a complete
    /// file (its ignore mark was lost). `Some(skip)`: start a window of this directory, after its
    /// first `skip` candidates.
    pub fn opened(
        &mut self,
        dir: &[u8],
        name: &[u8],
        complete: bool,
        now: Instant,
    ) -> Option<usize> {
        if self.dirs.len() >= MAX_DIRS && !self.dirs.contains_key(dir) {
            self.dirs.retain(|_, d| {
                d.since
                    .is_some_and(|t| now.duration_since(t) < TRIGGER_WINDOW)
                    || d.exhausted_at.is_some_and(|t| now < t + EXHAUSTED_PAUSE)
            });
            if self.dirs.len() >= MAX_DIRS {
                self.dirs.clear();
            }
        }
        let beside_a_walk = self.parent_walked(dir, now).is_some();
        let d = self.dirs.entry(dir.to_vec()).or_default();
        // A directory the walk has not been through yet: its first cold open is enough. One
        // walked before (marks lost, a later walk) needs the usual evidence.
        let first_open =
            beside_a_walk && d.reserved == 0 && d.exhausted_at.is_none() && d.opened.is_empty();
        match d.exhausted_at {
            // The windows gave every complete file its mark, so a complete file's event after
            // the walk is over means the marks went (evicted with their inodes): a new walk,
            // which gets its marks placed again like the first.
            Some(t) if complete && now >= t + TRIGGER_WINDOW => *d = DirSeen::default(),
            Some(t) if now < t + EXHAUSTED_PAUSE => return None,
            // A while later: a new walk starts from the top.
            Some(_) => *d = DirSeen::default(),
            None => {}
        }
        if d.since
            .is_none_or(|t| now.duration_since(t) >= TRIGGER_WINDOW)
        {
            d.opened.clear();
            d.since = Some(now);
        }
        let h = name_hash(name);
        if !d.opened.contains(&h) {
            d.opened.push(h);
        }
        if d.opened.len() < TRIGGER_OPENS && !first_open {
            return None;
        }
        d.opened.clear();
        d.since = None;
        let skip = d.reserved;
        d.reserved += self.window;
        self.note_walk(dir, skip == 0, now);
        Some(skip)
    }

    /// Whether `dir`, next after a walked directory, may get its first window ahead of the
    /// walk: yes (and it is reserved) if the walk went from one of its siblings into another
    /// already, and it had no window yet.
    pub fn ahead(&mut self, dir: &[u8], now: Instant) -> bool {
        if self.parent_walked(dir, now).is_none_or(|w| w.children < 2)
            || (self.dirs.len() >= MAX_DIRS && !self.dirs.contains_key(dir))
        {
            return false;
        }
        let d = self.dirs.entry(dir.to_vec()).or_default();
        if d.reserved > 0 || d.exhausted_at.is_some() {
            return false;
        }
        d.reserved = self.window;
        true
    }

    /// The window of `dir` that started after `skip` candidates found the end of the directory.
    pub fn exhausted(&mut self, dir: &[u8], now: Instant) {
        if let Some(d) = self.dirs.get_mut(dir) {
            d.exhausted_at = Some(now);
        }
    }
}

/// How many files a directory prefetch fetches at once: the kernel-independent half, tested
/// alone. Enough to cover the source's round trip at one file per [`FETCH_SPACING`] (Little's
/// law), taking the shortest fetch seen lately as the round trip (see [`RoundTrip`]); within
/// [`MIN_IN_FLIGHT`]..`max` files and [`BYTES_IN_FLIGHT`] bytes.
pub struct InFlight {
    max: usize,
    running: usize,
    bytes: u64,
    round_trip: RoundTrip,
}

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight {
            max: max.max(MIN_IN_FLIGHT),
            running: 0,
            bytes: 0,
            round_trip: RoundTrip::default(),
        }
    }

    /// The round trip the limit is made for: the shortest fetch seen lately.
    pub fn round_trip(&self) -> Option<Duration> {
        self.round_trip.get()
    }

    /// Files that may be in flight at once now.
    pub fn limit(&self) -> usize {
        let Some(rtt) = self.round_trip() else {
            return MIN_IN_FLIGHT;
        };
        let want = rtt.as_nanos().div_ceil(FETCH_SPACING.as_nanos());
        (want.min(self.max as u128) as usize).max(MIN_IN_FLIGHT)
    }

    /// Start a fetch of `bytes` if the limits allow it (one alone always may).
    pub fn try_start(&mut self, bytes: u64) -> bool {
        let fits = self.running == 0
            || (self.running < self.limit() && self.bytes + bytes <= BYTES_IN_FLIGHT);
        if fits {
            self.running += 1;
            self.bytes += bytes;
        }
        fits
    }

    /// A fetch of `bytes` started by [`InFlight::try_start`] ended; `took`: how long the source
    /// took to answer it, if it was fetched (a file found present says nothing of the source).
    pub fn done(&mut self, bytes: u64, took: Option<Duration>, now: Instant) {
        self.running = self.running.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        if let Some(took) = took {
            self.round_trip.observe(took, now);
        }
    }
}

fn name_hash(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// Split a path relative to the tree into its directory and name (`b""` for the tree's root).
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Window {
    dir: Vec<u8>,
    skip: usize,
    /// Directories between this one and the last one the walk made a cold open in.
    ahead: u8,
}

/// Threads waiting on `room` (counted under the same lock): a fetch's end wakes them only if
/// there are some, since a wake-up is a system call.
type RoomWaiters = usize;

pub struct DirPrefetch {
    engine: Arc<Engine>,
    /// For the ignore marks of the files made complete (None under FUSE, which has no marks).
    group: Option<Arc<Group>>,
    tree: OwnedFd,
    /// The exposed tree as event fds' paths show it, with a trailing `/`.
    mountpoint: Vec<u8>,
    /// Files per window.
    files: usize,
    detector: Mutex<WalkDetector>,
    /// Out of fds: jobs are dropped until then.
    starved_until: Mutex<Option<Instant>>,
    windows: crossbeam_channel::Sender<Window>,
    /// Files to fetch, and their sizes.
    jobs: crossbeam_channel::Sender<(Vec<u8>, u64)>,
    /// How many fetches may run now; the fetching threads wait on `room` for their turn.
    in_flight: Mutex<(InFlight, RoomWaiters)>,
    room: std::sync::Condvar,
    /// Rung when the limit grows: threads above it may take jobs (see `start`).
    grown: std::sync::Condvar,
    /// Files made complete get their ignore mark (no event at their next open). Off while
    /// accesses are recorded (`access_list`): the opens that follow must still be seen.
    marks: std::sync::atomic::AtomicBool,
}

impl DirPrefetch {
    /// Start prefetching into the stubs of `tree` (the store's tree, unmarked), exposed at
    /// `mountpoint`, `files` files per window. `None` when it is off (see [`enabled`]).
    pub fn start(
        engine: Arc<Engine>,
        group: Option<Arc<Group>>,
        tree: OwnedFd,
        mountpoint: &Path,
        files: usize,
    ) -> Option<Arc<DirPrefetch>> {
        if !enabled(files) {
            return None;
        }
        let mut mp = mountpoint.as_os_str().as_bytes().to_vec();
        if !mp.ends_with(b"/") {
            mp.push(b'/');
        }
        let (windows, windows_rx) = crossbeam_channel::unbounded::<Window>();
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<(Vec<u8>, u64)>();
        let files_limit = sysfs::open_files_limit().unwrap_or(1024);
        let threads = ((files_limit / FDS_PER_FETCH) as usize).clamp(1, MAX_IN_FLIGHT);
        let me = Arc::new(DirPrefetch {
            engine,
            group,
            tree,
            mountpoint: mp,
            files,
            detector: Mutex::new(WalkDetector::new(files)),
            starved_until: Mutex::new(None),
            windows,
            jobs,
            in_flight: Mutex::new((InFlight::new(threads), 0)),
            room: std::sync::Condvar::new(),
            grown: std::sync::Condvar::new(),
            marks: std::sync::atomic::AtomicBool::new(true),
        });
        // Threads hold weak references: they end when the prefetcher is dropped.
        let weak = Arc::downgrade(&me);
        std::thread::spawn(move || {
            for w in windows_rx {
                let Some(me) = weak.upgrade() else { return };
                me.list(&w);
            }
        });
        // One thread per file in flight at most; `in_flight` says how many of them fetch now.
        // Thread `i` takes jobs only while the limit is above `i`: the others would take jobs
        // out of the walk's order and wake at every fetch's end for nothing (64 threads where 4
        // fetch made a cold local tar 1.6x native against 1.04x).
        for i in 0..threads {
            let weak = Arc::downgrade(&me);
            let rx = jobs_rx.clone();
            std::thread::spawn(move || loop {
                loop {
                    let Some(me) = weak.upgrade() else { return };
                    if me.wait_for_slot(i, SLOT_LOOK_EVERY) {
                        break;
                    }
                }
                let Ok((rel, size)) = rx.recv() else { return };
                let Some(me) = weak.upgrade() else { return };
                me.fetch_in_turn(&rel, size);
            });
        }
        Some(me)
    }

    /// Place no ignore marks on the files fetched ahead (see `marks`).
    pub fn without_marks(&self) {
        self.marks
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// An open of the file behind `fd` (an event's fd) raised an event: a stub's, served by the
    /// worker, or (`complete`) a complete file's, answered by the supervisor (which passes it on
    /// as a note).
    pub fn note_open(&self, fd: BorrowedFd<'_>, complete: bool) {
        let Ok(path) = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        )) else {
            return;
        };
        let Some(rel) = path
            .as_os_str()
            .as_bytes()
            .strip_prefix(&self.mountpoint[..])
        else {
            return;
        };
        if rel.ends_with(b" (deleted)") {
            return;
        }
        let (dir, name) = split(rel);
        let window = lock(&self.detector).opened(dir, name, complete, Instant::now());
        if let Some(skip) = window {
            let _ = self.windows.send(Window {
                dir: dir.to_vec(),
                skip,
                ahead: 0,
            });
        }
    }

    /// List a directory and hand out its next window of candidates: regular files, not empty,
    /// within the byte budget.
    fn list(&self, w: &Window) {
        let dir = match sysfs::open_beneath(
            self.tree.as_fd(),
            &w.dir,
            libc::O_RDONLY | libc::O_DIRECTORY,
        ) {
            Ok(d) => d,
            Err(e) => {
                debug!(dir = %String::from_utf8_lossy(&w.dir), "prefetch: cannot open directory: {e}");
                return;
            }
        };
        let Ok(entries) = std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        )) else {
            return;
        };
        // Candidates are counted by the listing's file type alone (no stat), so that every
        // window of a directory counts them alike.
        let (mut seen, mut handed, mut bytes) = (0usize, 0usize, 0u64);
        let mut at_end = true;
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            seen += 1;
            if seen <= w.skip {
                continue;
            }
            if handed >= self.files {
                at_end = false;
                break;
            }
            handed += 1;
            let size = entry.metadata().map_or(0, |m| m.len());
            if size == 0 || bytes + size > BUDGET_BYTES {
                continue;
            }
            bytes += size;
            let mut rel = w.dir.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(entry.file_name().as_bytes());
            let _ = self.jobs.send((rel, size));
        }
        if at_end {
            lock(&self.detector).exhausted(&w.dir, Instant::now());
            if w.ahead < LOOKAHEAD_DIRS {
                self.look_ahead(w);
            }
        }
    }

    /// Start the first window of the directory after `w`'s in its parent's listing, if the walk
    /// goes there next (see the module doc).
    fn look_ahead(&self, w: &Window) {
        if w.dir.is_empty() {
            return;
        }
        let (parent, name) = split(&w.dir);
        let Ok(pdir) = sysfs::open_beneath(
            self.tree.as_fd(),
            parent,
            libc::O_RDONLY | libc::O_DIRECTORY,
        ) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&pdir)
        )) else {
            return;
        };
        let mut passed = false;
        for entry in entries.flatten().take(LOOKAHEAD_SCAN) {
            let this = entry.file_name();
            if !passed {
                passed = this.as_bytes() == name;
                continue;
            }
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let mut next = parent.to_vec();
            if !next.is_empty() {
                next.push(b'/');
            }
            next.extend_from_slice(this.as_bytes());
            if lock(&self.detector).ahead(&next, Instant::now()) {
                let _ = self.windows.send(Window {
                    dir: next,
                    skip: 0,
                    ahead: w.ahead + 1,
                });
            }
            return;
        }
    }

    /// Wait (up to `wait`) until thread `i` may take a job: the limit is above `i`.
    fn wait_for_slot(&self, i: usize, wait: Duration) -> bool {
        let gate = lock(&self.in_flight);
        if gate.0.limit() > i {
            return true;
        }
        let (gate, _) = self
            .grown
            .wait_timeout(gate, wait)
            .unwrap_or_else(|p| p.into_inner());
        gate.0.limit() > i
    }

    /// [`DirPrefetch::fetch`], once [`InFlight`] has room for it; the time it took the source
    /// is noted for the next ones.
    fn fetch_in_turn(&self, rel: &[u8], size: u64) {
        let mut gate = lock(&self.in_flight);
        while !gate.0.try_start(size) {
            gate.1 += 1;
            gate = self.room.wait(gate).unwrap_or_else(|p| p.into_inner());
            gate.1 -= 1;
        }
        drop(gate);
        let start = Instant::now();
        // A panic in one fill costs that file's prefetch, never the thread.
        let fetched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fetch(rel)))
            .unwrap_or(false);
        let now = Instant::now();
        let (grew, waiting) = {
            let mut gate = lock(&self.in_flight);
            let before = gate.0.limit();
            gate.0.done(size, fetched.then(|| now - start), now);
            (gate.0.limit() > before, gate.1 > 0)
        };
        if waiting {
            self.room.notify_all();
        }
        if grew {
            self.grown.notify_all();
        }
    }

    /// Fetch what an open of `rel` would, if it is a stub not yet present; whether it fetched.
    fn fetch(&self, rel: &[u8]) -> bool {
        use crate::metrics::Metrics;
        // Under a cache limit, fetching ahead must not evict what was read: only below it.
        if lock(&self.starved_until).is_some_and(|t| Instant::now() < t)
            || !self.engine.room_to_fetch_ahead()
            || !self.engine.wait_for_room(ROOM_WAIT)
        {
            return false;
        }
        let mut fetched = false;
        let res = (|| -> std::io::Result<()> {
            let path = sysfs::open_beneath(self.tree.as_fd(), rel, libc::O_PATH)?;
            let st = sysfs::fstat(path.as_fd())?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Ok(());
            }
            let fd = sysfs::reopen(path.as_fd(), libc::O_RDWR | libc::O_NONBLOCK)?;
            // Complete on disk (a hydrated tree after a restart): only the mark is missing.
            let on_disk = crate::record::complete_on_disk(fd.as_fd());
            let complete = on_disk || {
                let done = self.engine.prefetch_open(fd.as_fd())?;
                if done.fetched {
                    Metrics::add(&self.engine.metrics.prefetched_files, 1);
                    fetched = true;
                }
                done.complete
            };
            if let Some(group) = self
                .group
                .as_ref()
                .filter(|_| complete && self.marks.load(std::sync::atomic::Ordering::Relaxed))
            {
                group.ignore_inode(fd.as_fd(), crate::event::ignore_mask())?;
                Metrics::add(&self.engine.metrics.ignore_marks, 1);
            }
            if on_disk {
                // The walk reads it next: its bytes are read in ahead, as a fetch puts a stub's
                // there, while the walk is busy with the files before it.
                if sysfs::will_need(fd.as_fd(), 0, st.st_size as u64).is_ok() {
                    Metrics::add(&self.engine.metrics.read_ahead_files, 1);
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            debug!(file = %String::from_utf8_lossy(rel), "prefetch failed: {e}");
            if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                *lock(&self.starved_until) = Some(Instant::now() + STARVED_PAUSE);
            }
        }
        fetched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_a_walk_after_three_different_files_in_the_window() {
        let mut d = WalkDetector::new(256);
        let t = Instant::now();
        assert_eq!(d.opened(b"a", b"1", false, t), None);
        // The same file again is not a walk.
        assert_eq!(d.opened(b"a", b"1", false, t), None);
        // Another directory counts apart.
        assert_eq!(d.opened(b"b", b"1", false, t), None);
        assert_eq!(d.opened(b"a", b"2", false, t), None);
        assert_eq!(d.opened(b"a", b"3", false, t), Some(0));
        // Three more opens (the walk outran the window, or it is still being listed): the next
        // window, never the same one again.
        assert_eq!(d.opened(b"a", b"4", false, t), None);
        assert_eq!(d.opened(b"a", b"5", false, t), None);
        assert_eq!(d.opened(b"a", b"6", false, t), Some(256));
        assert_eq!(d.opened(b"a", b"7", false, t), None);
        assert_eq!(d.opened(b"a", b"8", false, t), None);
        assert_eq!(d.opened(b"a", b"9", false, t), Some(512));
    }

    #[test]
    fn a_directory_listed_to_its_end_starts_nothing_for_a_while_then_again_from_the_top() {
        let mut d = WalkDetector::new(10);
        let t = Instant::now();
        for n in [b"1", b"2"] {
            assert_eq!(d.opened(b"a", n, false, t), None);
        }
        assert_eq!(d.opened(b"a", b"3", false, t), Some(0));
        d.exhausted(b"a", t);
        for n in [b"4", b"5", b"6", b"7"] {
            assert_eq!(d.opened(b"a", n, false, t + Duration::from_secs(1)), None);
        }
        let later = t + EXHAUSTED_PAUSE + Duration::from_secs(1);
        assert_eq!(d.opened(b"a", b"1", false, later), None);
        assert_eq!(d.opened(b"a", b"2", false, later), None);
        assert_eq!(d.opened(b"a", b"3", false, later), Some(0));
    }

    #[test]
    fn complete_files_that_lost_their_marks_after_a_walk_start_a_new_one() {
        let mut d = WalkDetector::new(10);
        let t = Instant::now();
        for n in [b"1", b"2"] {
            assert_eq!(d.opened(b"a", n, false, t), None);
        }
        assert_eq!(d.opened(b"a", b"3", false, t), Some(0));
        d.exhausted(b"a", t);
        // While that walk may still be going on, complete files count no more than stubs.
        let during = t + TRIGGER_WINDOW / 2;
        for n in [b"4", b"5", b"6"] {
            assert_eq!(d.opened(b"a", n, true, during), None);
        }
        // After it, within the pause: stubs still start nothing...
        let after = t + TRIGGER_WINDOW * 3;
        for n in [b"7", b"8", b"9"] {
            assert_eq!(d.opened(b"a", n, false, after), None);
        }
        // ...but complete files whose events came back (marks evicted) are a new walk, from the
        // top, and once it is listed to its end the pause holds it again.
        assert_eq!(d.opened(b"a", b"1", true, after), None);
        assert_eq!(d.opened(b"a", b"2", true, after), None);
        assert_eq!(d.opened(b"a", b"3", true, after), Some(0));
        d.exhausted(b"a", after);
        for n in [b"4", b"5", b"6"] {
            assert_eq!(d.opened(b"a", n, true, after), None);
        }
    }

    #[test]
    fn opens_spread_wider_than_the_window_are_not_a_walk() {
        let mut d = WalkDetector::new(256);
        let t = Instant::now();
        assert_eq!(d.opened(b"", b"x", false, t), None);
        assert_eq!(d.opened(b"", b"y", false, t + TRIGGER_WINDOW / 2), None);
        assert_eq!(d.opened(b"", b"z", false, t + TRIGGER_WINDOW * 2), None);
        assert_eq!(d.opened(b"", b"w", false, t + TRIGGER_WINDOW * 2), None);
        assert_eq!(d.opened(b"", b"v", false, t + TRIGGER_WINDOW * 2), Some(0));
    }

    #[test]
    fn the_detector_stays_bounded() {
        let mut d = WalkDetector::new(256);
        let t = Instant::now();
        for i in 0..(MAX_DIRS * 3) {
            d.opened(
                format!("d{i}").as_bytes(),
                b"f",
                false,
                t + TRIGGER_WINDOW * 2 * i as u32,
            );
        }
        assert!(d.dirs.len() <= MAX_DIRS);
    }

    #[test]
    fn after_a_walk_the_first_open_beside_or_below_it_starts_a_window() {
        let mut d = WalkDetector::new(100);
        let t = Instant::now();
        // Before any walk, one open of a directory is not one.
        assert_eq!(d.opened(b"t/a", b"1", false, t), None);
        assert_eq!(d.opened(b"t/a", b"2", false, t), None);
        assert_eq!(d.opened(b"t/a", b"3", false, t), Some(0));
        // The walk goes on into a sibling and into a subdirectory: their first open will do.
        assert_eq!(d.opened(b"t/b", b"1", false, t), Some(0));
        assert_eq!(d.opened(b"t/a/sub", b"1", false, t), Some(0));
        // ...and further down, as the walk spreads.
        assert_eq!(d.opened(b"t/a/sub/deeper", b"1", false, t), Some(0));
        // A directory elsewhere still needs three.
        assert_eq!(d.opened(b"u/x", b"1", false, t), None);
        assert_eq!(d.opened(b"u/x", b"2", false, t), None);
        // Long after the walk, a sibling's first open is not one any more.
        let later = t + WALK_MEMORY + Duration::from_secs(1);
        assert_eq!(d.opened(b"t/c", b"1", false, later), None);
        // A directory already walked (its marks lost since) needs the usual three opens.
        let mut d = WalkDetector::new(100);
        for n in [b"1", b"2", b"3"] {
            d.opened(b"t/a", n, false, t);
        }
        d.exhausted(b"t/a", t);
        assert_eq!(d.opened(b"t/b", b"1", false, t), Some(0));
        let after = t + TRIGGER_WINDOW * 3;
        assert_eq!(d.opened(b"t/a", b"1", true, after), None);
        assert_eq!(d.opened(b"t/a", b"2", true, after), None);
        assert_eq!(d.opened(b"t/a", b"3", true, after), Some(0));
    }

    #[test]
    fn a_directory_after_a_walked_one_is_fetched_ahead_once() {
        let mut d = WalkDetector::new(100);
        let t = Instant::now();
        // Nothing walked: nothing ahead.
        assert!(!d.ahead(b"t/b", t));
        for n in [b"1", b"2", b"3"] {
            d.opened(b"t/a", n, false, t);
        }
        // One directory walked through is not yet a walk from one to the next, even twice.
        assert!(!d.ahead(b"t/b", t));
        d.exhausted(b"t/a", t);
        // (a second walk: its marks were lost)
        let again = t + TRIGGER_WINDOW * 3;
        assert_eq!(d.opened(b"t/a", b"1", true, again), None);
        assert_eq!(d.opened(b"t/a", b"2", true, again), None);
        assert_eq!(d.opened(b"t/a", b"3", true, again), Some(0));
        assert!(!d.ahead(b"t/b", again));
        assert_eq!(d.opened(b"t/a0", b"1", false, t), Some(0));
        assert!(d.ahead(b"t/b", t));
        // Once: neither again, nor as a window at the walk's first open there.
        assert!(!d.ahead(b"t/b", t));
        assert_eq!(d.opened(b"t/b", b"1", false, t), None);
        // The walk's next cold opens there (past what was fetched ahead) go on from it.
        assert_eq!(d.opened(b"t/b", b"2", false, t), None);
        assert_eq!(d.opened(b"t/b", b"3", false, t), Some(100));
        // A directory the walk already went through is not fetched again.
        assert!(!d.ahead(b"t/a", t));
        // Long after the walk: nothing ahead.
        assert!(!d.ahead(b"t/c", t + WALK_MEMORY + Duration::from_secs(1)));
    }

    #[test]
    fn files_in_flight_cover_the_round_trip_within_bounds() {
        let ms = Duration::from_millis;
        let t = Instant::now();
        let mut f = InFlight::new(64);
        // Nothing measured yet: the floor.
        assert_eq!(f.limit(), MIN_IN_FLIGHT);
        // A local source (0.1 ms a file): the floor still.
        assert!(f.try_start(4096));
        f.done(4096, Some(Duration::from_micros(100)), t);
        assert_eq!(f.limit(), MIN_IN_FLIGHT);
        // A source 5 ms away: one file per 250 us of it.
        let mut f = InFlight::new(64);
        assert!(f.try_start(1));
        f.done(1, Some(ms(5)), t);
        assert_eq!(f.limit(), 20);
        // Fetches that queued behind others (longer) leave it: the shortest counts.
        for _ in 0..10 {
            assert!(f.try_start(1));
            f.done(1, Some(ms(40)), t + ms(1));
        }
        assert_eq!(f.limit(), 20);
        // A file found present says nothing of the source.
        assert!(f.try_start(1));
        f.done(1, None, t + ms(2));
        assert_eq!(f.limit(), 20);
        // 20 ms away: more than the threads there are, so all of them (and never more).
        let mut f = InFlight::new(48);
        assert!(f.try_start(1));
        f.done(1, Some(ms(20)), t);
        assert_eq!(f.limit(), 48);
        for i in 0..48 {
            assert!(f.try_start(1), "{i}");
        }
        assert!(!f.try_start(1));
        f.done(1, Some(ms(20)), t + ms(20));
        assert!(f.try_start(1));
        // The source came closer: fewer at once. It went far again: more, once the memory of
        // the near one is gone (within crate::round_trip::MEMORY).
        let later = t + ms(30);
        f.done(1, Some(ms(2)), later);
        assert_eq!(f.limit(), 8);
        f.done(1, Some(ms(20)), later + crate::round_trip::MEMORY / 2);
        assert_eq!(
            f.limit(),
            8,
            "the near fetches of the last half still count"
        );
        f.done(1, Some(ms(20)), later + crate::round_trip::MEMORY);
        assert_eq!(f.limit(), 48);
        // Fewer threads than the floor: the floor still.
        assert_eq!(InFlight::new(1).limit(), MIN_IN_FLIGHT);
    }

    #[test]
    fn bytes_in_flight_stay_bounded_but_a_large_file_still_goes_alone() {
        let t = Instant::now();
        let mut f = InFlight::new(64);
        f.try_start(1);
        f.done(1, Some(Duration::from_millis(20)), t);
        assert!(f.try_start(BYTES_IN_FLIGHT / 2));
        assert!(f.try_start(BYTES_IN_FLIGHT / 2));
        assert!(!f.try_start(1), "over the byte budget");
        f.done(BYTES_IN_FLIGHT / 2, None, t);
        f.done(BYTES_IN_FLIGHT / 2, None, t);
        assert!(f.try_start(BYTES_IN_FLIGHT * 2), "alone, any size");
        assert!(!f.try_start(1));
        f.done(BYTES_IN_FLIGHT * 2, None, t);
        assert!(f.try_start(1));
    }

    #[test]
    fn paths_split_into_directory_and_name() {
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
    }
}
