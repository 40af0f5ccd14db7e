//! Recorded access lists: what a program read, in the order it first read it, and fetching that
//! ahead the next time it starts.
//!
//! A program that starts the same way every time (an interpreter importing its packages, a
//! toolchain, a container's entry point) opens its files one after another, in many directories:
//! over a link with a round trip of tens of milliseconds, each cold open waits for one, and
//! neither readahead nor the directory prefetch can hide them. Recorded once
//! (`hsm serve --record-access FILE`), the list lets the next start fetch all of it ahead, many
//! requests in flight (`hsm serve --prefetch-list FILE`, `hsm hydrate --list FILE`).
//!
//! The format (version 1), line-oriented so that lists can be diffed and edited:
//!
//! ```text
//! hsm-access-list 1
//! # comments and blank lines are ignored
//! PATH<TAB>SIZE<TAB>WHAT<TAB>CGROUP[<TAB>SEEN/STARTS]
//! ```
//!
//! one line per file, in the order of its first access. PATH is relative to the tree,
//! percent-encoded (bytes outside printable ASCII, `%`, space and `#`); SIZE the file's size when
//! recorded; WHAT a comma-separated list of `open` (the file was opened: replayed as what an open
//! fetches, the whole file for a file fetched whole at open) and `START-END` byte ranges read
//! (end exclusive, merged); CGROUP the cgroup (v2 path, percent-encoded) of the first process
//! that opened or read it, or `-` when it was gone before it could be read; and, in a list
//! merged over several starts (see [`merge`]), SEEN/STARTS: of the starts remembered, how many
//! read the file.
//!
//! Recording stays off the event path's critical section: an event costs a `dup` of its fd and a
//! non-blocking send into a bounded channel; a thread resolves paths and cgroups (each pid's
//! once) and merges the ranges. When the channel is full, accesses are dropped and counted
//! (`access_records_dropped`), never waited for.
//!
//! A list's prefetch reads the backend on the engine's low-priority pool only
//! ([`Engine::prefetch_ranges`]): a reader's miss never queues behind it. Entries are checked
//! against the tree as it is now: a path that is gone (or not a regular file) is skipped and
//! counted, a file whose size changed is counted and its ranges clipped to what it holds now.
//! Prefetched bytes and hits (prefetched bytes a reader then opened or read) are counted.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use percent_encoding::{percent_decode, percent_encode, AsciiSet, CONTROLS};
use tracing::{debug, info, warn};

use crate::control::{Done, Op, Reply, Service};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::ranges::RangeSet;
use crate::sys::fs as sysfs;
use crate::sys::shm::Shared;

/// The first line of a list, version 1.
pub const HEADER: &str = "hsm-access-list 1";

/// Bytes escaped in paths and cgroups besides controls and non-ASCII.
const ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'#');

/// Requests a list's prefetch keeps in flight.
pub const IN_FLIGHT: usize = 64;

/// Accesses waiting for the recorder, at most; more are dropped and counted.
const QUEUE: usize = 16384;
/// Files one recording holds, at most (a few hundred bytes each).
const MAX_FILES: usize = 1 << 20;
/// Ranges kept per file; beyond, a file's ranges are merged into one span.
const MAX_RANGES: usize = 4096;
/// A recording is also written this often while it changes (a worker killed mid-run loses
/// no more than this).
const WRITE_EVERY: Duration = Duration::from_secs(5);

/// One file of a list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the tree.
    pub path: Vec<u8>,
    pub size: u64,
    /// Opened (replayed as what an open fetches).
    pub open: bool,
    /// Byte ranges read, sorted and merged.
    pub ranges: Vec<(u64, u64)>,
    pub cgroup: Option<String>,
    /// Of the last `.1` starts recorded into this list, how many read this file (see
    /// [`merge`]); `None`: one start, which did.
    pub history: Option<(u32, u32)>,
}

/// Starts a merged list remembers: beyond, the counts are halved.
const HISTORY: u32 = 8;

/// The list after one more start: `now` (this start's, in its order) followed by the files of
/// `before` this start did not read that most of the remembered starts did (read in more than
/// half of them). So a file read in most starts stays, and one read once ages out at the next
/// start that does not read it. Counts are kept over the last [`HISTORY`] starts at most
/// (halved beyond).
pub fn merge(before: &[Entry], now: Vec<Entry>) -> Vec<Entry> {
    let old: HashMap<&[u8], &Entry> = before.iter().map(|e| (&e.path[..], e)).collect();
    let starts_before = before
        .iter()
        .map(|e| e.history.map_or(1, |h| h.1))
        .max()
        .unwrap_or(0);
    let age = |seen: u32, starts: u32| {
        if starts > HISTORY {
            (seen.div_ceil(2), starts.div_ceil(2))
        } else {
            (seen, starts)
        }
    };
    let mut out = Vec::with_capacity(now.len());
    let mut in_now = std::collections::HashSet::new();
    for mut e in now {
        let seen = old
            .get(&e.path[..])
            .map_or(0, |o| o.history.map_or(1, |h| h.0));
        let (seen, starts) = age(seen + 1, starts_before + 1);
        e.history = (starts > 1).then_some((seen, starts));
        in_now.insert(e.path.clone());
        out.push(e);
    }
    for e in before {
        if in_now.contains(&e.path) {
            continue;
        }
        let seen = e.history.map_or(1, |h| h.0);
        let (seen, starts) = age(seen, starts_before + 1);
        if seen * 2 > starts {
            let mut e = e.clone();
            e.history = Some((seen, starts));
            out.push(e);
        }
    }
    out
}

/// Parse a list; errors name the line and what is wrong with it.
pub fn parse(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end() == HEADER => {}
        Some((_, h)) if h.starts_with("hsm-access-list ") => bail!(
            "line 1: {h:?}: a version this hsm does not read (it reads {HEADER:?}); record the \
             list again with this hsm"
        ),
        _ => bail!("line 1: not an access list (the first line must be {HEADER:?})"),
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 3 {
            bail!(
                "line {n}: expected PATH<TAB>SIZE<TAB>WHAT[<TAB>CGROUP[<TAB>SEEN/STARTS]], got \
                 {line:?}"
            );
        }
        let path: Vec<u8> = percent_decode(fields[0].as_bytes()).collect();
        if path.is_empty() || path.starts_with(b"/") {
            bail!(
                "line {n}: the path must be relative to the tree, got {:?}",
                fields[0]
            );
        }
        let size = fields[1]
            .parse::<u64>()
            .with_context(|| format!("line {n}: size {:?} is not a number", fields[1]))?;
        let mut entry = Entry {
            path,
            size,
            ..Default::default()
        };
        let mut set = RangeSet::new();
        for what in fields[2].split(',').filter(|w| !w.is_empty()) {
            if what == "open" {
                entry.open = true;
                continue;
            }
            let range = what.split_once('-').and_then(|(a, b)| {
                let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
                (a < b).then_some((a, b))
            });
            let Some((a, b)) = range else {
                bail!("line {n}: {what:?} is neither `open` nor a range START-END (START < END)");
            };
            set.insert(a, b);
        }
        entry.ranges = set.pairs().to_vec();
        entry.cgroup = fields
            .get(3)
            .filter(|c| **c != "-" && !c.is_empty())
            .map(|c| {
                String::from_utf8_lossy(&percent_decode(c.as_bytes()).collect::<Vec<u8>>())
                    .into_owned()
            });
        if let Some(h) = fields.get(4) {
            let history = h.split_once('/').and_then(|(a, b)| {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                (a <= b && b > 0).then_some((a, b))
            });
            let Some(history) = history else {
                bail!("line {n}: {h:?} is not SEEN/STARTS (SEEN <= STARTS)");
            };
            entry.history = Some(history);
        }
        out.push(entry);
    }
    Ok(out)
}

/// The text of a list.
pub fn render(entries: &[Entry]) -> String {
    let mut out = String::with_capacity(64 * entries.len() + 32);
    out.push_str(HEADER);
    out.push('\n');
    for e in entries {
        let mut what: Vec<String> = Vec::new();
        if e.open {
            what.push("open".into());
        }
        what.extend(e.ranges.iter().map(|(a, b)| format!("{a}-{b}")));
        let cgroup = e.cgroup.as_ref().map_or("-".to_string(), |c| {
            percent_encode(c.as_bytes(), ESCAPED).to_string()
        });
        out.push_str(&format!(
            "{}\t{}\t{}\t{}",
            percent_encode(&e.path, ESCAPED),
            e.size,
            what.join(","),
            cgroup
        ));
        if let Some((seen, starts)) = e.history {
            out.push_str(&format!("\t{seen}/{starts}"));
        }
        out.push('\n');
    }
    out
}

/// Read and parse a list file.
pub fn load(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the access list {}", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// Write a list atomically (a reader never sees half of it).
pub fn store(path: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(render(entries).as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The path of an event's fd relative to `mountpoint` (with its trailing `/`). `view`: the id of
/// the mount there, once known. A stop detaches that mount before the last accesses reach the
/// recorder (they are resolved here, off the event path), and the path of an fd on a detached
/// mount is then shown from the mount's root (`/lib/x`): on the same mount, that is the path.
fn relative_path(fd: BorrowedFd<'_>, mountpoint: &[u8], view: Option<u64>) -> Option<Vec<u8>> {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let path = path.as_os_str().as_bytes();
    let rel = match path.strip_prefix(mountpoint) {
        Some(rel) => rel,
        None if view.is_some() && sysfs::mount_id(fd).ok() == view => path.strip_prefix(b"/")?,
        None => return None,
    };
    if rel.is_empty() || rel.ends_with(b" (deleted)") {
        return None;
    }
    Some(rel.to_vec())
}

/// The cgroup (v2) of `pid`, from `/proc/PID/cgroup`.
fn cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().next().and_then(|l| l.splitn(3, ':').nth(2)))
        .map(str::to_string)
}

enum Msg {
    Access {
        fd: OwnedFd,
        pid: i32,
        /// `None`: an open.
        range: Option<(u64, u64)>,
    },
    Write(crossbeam_channel::Sender<anyhow::Result<usize>>),
    /// Write a last time and end.
    Stop,
}

/// What a recording knows of one file.
struct Seen {
    size: u64,
    open: bool,
    ranges: RangeSet,
    cgroup: Option<String>,
}

/// The recording state, owned by the recorder's thread.
struct Recording {
    mountpoint: Vec<u8>,
    /// The id of the mount at `mountpoint`, from the first fd found under it.
    view: Option<u64>,
    order: Vec<Vec<u8>>,
    files: HashMap<Vec<u8>, Seen>,
    cgroups: HashMap<i32, Option<String>>,
    dirty: bool,
    /// The list this file held when the daemon started: merged with this start's.
    before: Vec<Entry>,
}

impl Recording {
    fn add(&mut self, fd: OwnedFd, pid: i32, range: Option<(u64, u64)>) {
        let Some(rel) = relative_path(fd.as_fd(), &self.mountpoint, self.view) else {
            return;
        };
        if self.view.is_none() {
            // An fd whose path is under the mount point is on its mount.
            self.view = sysfs::mount_id(fd.as_fd()).ok();
        }
        let size = sysfs::fstat(fd.as_fd()).map_or(0, |st| st.st_size as u64);
        if !self.files.contains_key(&rel) {
            if self.files.len() >= MAX_FILES {
                return;
            }
            if self.cgroups.len() >= 65536 {
                self.cgroups.clear();
            }
            let cgroup = self
                .cgroups
                .entry(pid)
                .or_insert_with(|| cgroup_of(pid))
                .clone();
            self.order.push(rel.clone());
            self.files.insert(
                rel.clone(),
                Seen {
                    size,
                    open: false,
                    ranges: RangeSet::new(),
                    cgroup,
                },
            );
        }
        let Some(seen) = self.files.get_mut(&rel) else {
            return;
        };
        seen.size = size;
        match range {
            None => seen.open = true,
            // A count of 0: the whole file.
            Some((offset, 0)) => seen.ranges.insert(offset.min(size), size),
            Some((offset, count)) => seen.ranges.insert(offset, offset.saturating_add(count)),
        }
        if seen.ranges.pairs().len() > MAX_RANGES {
            let pairs = seen.ranges.pairs();
            let span = (pairs[0].0, pairs[pairs.len() - 1].1);
            seen.ranges = RangeSet::new();
            seen.ranges.insert(span.0, span.1);
        }
        self.dirty = true;
    }

    fn entries(&self) -> Vec<Entry> {
        merge(&self.before, self.this_start())
    }

    fn this_start(&self) -> Vec<Entry> {
        self.order
            .iter()
            .filter_map(|p| {
                let s = self.files.get(p)?;
                Some(Entry {
                    path: p.clone(),
                    size: s.size,
                    open: s.open,
                    ranges: s.ranges.pairs().to_vec(),
                    cgroup: s.cgroup.clone(),
                    history: None,
                })
            })
            .collect()
    }

    fn load(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if self.files.contains_key(&e.path) {
                continue;
            }
            self.order.push(e.path.clone());
            self.files.insert(
                e.path,
                Seen {
                    size: e.size,
                    open: e.open,
                    ranges: RangeSet::from_pairs(&e.ranges).unwrap_or_default(),
                    cgroup: e.cgroup,
                },
            );
        }
    }
}

/// `hsm serve --record-access FILE`: records the accesses the worker sees.
pub struct Recorder {
    tx: crossbeam_channel::Sender<Msg>,
    metrics: Shared<Metrics>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Recorder {
    /// Record into `path` the accesses to files under `mountpoint`; `resume`: a worker restarted,
    /// so the list it wrote is read back and goes on.
    pub fn start(
        path: PathBuf,
        mountpoint: &Path,
        metrics: Shared<Metrics>,
        resume: bool,
    ) -> Arc<Recorder> {
        let mut mp = mountpoint.as_os_str().as_bytes().to_vec();
        if !mp.ends_with(b"/") {
            mp.push(b'/');
        }
        let mut rec = Recording {
            mountpoint: mp,
            view: None,
            order: Vec::new(),
            files: HashMap::new(),
            cgroups: HashMap::new(),
            dirty: false,
            before: Vec::new(),
        };
        // A list from earlier starts is merged with this one's; a restarted worker goes on
        // with this start's (the older starts' counts then start again).
        if let Ok(entries) = load(&path) {
            if resume {
                rec.load(entries);
            } else {
                rec.before = entries;
            }
        }
        let (tx, rx) = crossbeam_channel::bounded::<Msg>(QUEUE);
        let thread = std::thread::spawn(move || {
            let mut last_write = std::time::Instant::now();
            let write = |rec: &mut Recording| -> anyhow::Result<usize> {
                let entries = rec.entries();
                store(&path, &entries)?;
                rec.dirty = false;
                Ok(entries.len())
            };
            loop {
                match rx.recv_timeout(WRITE_EVERY) {
                    Ok(Msg::Access { fd, pid, range }) => rec.add(fd, pid, range),
                    Ok(Msg::Write(reply)) => {
                        let _ = reply.send(write(&mut rec));
                        last_write = std::time::Instant::now();
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Ok(Msg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
                if rec.dirty && last_write.elapsed() >= WRITE_EVERY {
                    if let Err(e) = write(&mut rec) {
                        warn!("the access list: {e:#}");
                    }
                    last_write = std::time::Instant::now();
                }
            }
            match write(&mut rec) {
                Ok(n) => info!("access list of {n} files written to {}", path.display()),
                Err(e) => warn!("the access list: {e:#}"),
            }
        });
        Arc::new(Recorder {
            tx,
            metrics,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// An open (`range` None) or access of the file behind an event's fd, by `pid`. Never waits.
    pub fn note(&self, fd: BorrowedFd<'_>, pid: i32, range: Option<(u64, u64)>) {
        let Ok(fd) = fd.try_clone_to_owned() else {
            return;
        };
        if self.tx.try_send(Msg::Access { fd, pid, range }).is_err() {
            Metrics::add(&self.metrics.access_records_dropped, 1);
        }
    }

    /// Write the list now (what was noted before this call is in it); the files it holds.
    pub fn write(&self) -> anyhow::Result<usize> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Msg::Write(tx))
            .map_err(|_| anyhow::anyhow!("the recorder stopped"))?;
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("the recorder did not answer"))?
    }

    /// Write the list a last time and stop (the worker's end): what was noted before is in it.
    pub fn finish(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// What a list's prefetch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub files: u64,
    pub fetched: u64,
    pub missing: u64,
    pub changed: u64,
    pub failed: u64,
}

/// A file by (device, inode).
type FileKey = (u64, u64);

/// Fetches lists ahead and counts the hits.
pub struct Lists {
    engine: Arc<Engine>,
    /// The store's tree, through the daemon's view (no events).
    tree: OwnedFd,
    /// Per file (dev, ino): the prefetched ranges no reader has used yet.
    unused: Mutex<HashMap<FileKey, Vec<(u64, u64)>>>,
    tracking: AtomicBool,
    /// A list waiting for an open of its first file (`--prefetch-on-first-open`): that file,
    /// and who to tell.
    first: Mutex<Option<(FileKey, crossbeam_channel::Sender<()>)>>,
    waiting: AtomicBool,
}

impl Lists {
    pub fn new(engine: Arc<Engine>, tree: OwnedFd) -> Arc<Lists> {
        Arc::new(Lists {
            engine,
            tree,
            unused: Mutex::new(HashMap::new()),
            tracking: AtomicBool::new(false),
            first: Mutex::new(None),
            waiting: AtomicBool::new(false),
        })
    }

    /// Return once a reader opens or reads the first of `entries` that is in the tree (at once
    /// when none is).
    pub fn wait_for_first_open(&self, entries: &[Entry]) {
        let key = entries.iter().find_map(|e| {
            let fd = sysfs::open_beneath(self.tree.as_fd(), &e.path, libc::O_PATH).ok()?;
            let st = sysfs::fstat(fd.as_fd()).ok()?;
            (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some((st.st_dev, st.st_ino))
        });
        let Some(key) = key else { return };
        let (tx, rx) = crossbeam_channel::bounded(1);
        *lock(&self.first) = Some((key, tx));
        self.waiting.store(true, Ordering::Relaxed);
        let _ = rx.recv();
    }

    /// Fetch `entries` ahead, in their order, `in_flight` files at once.
    pub fn run(&self, entries: &[Entry], in_flight: usize) -> Summary {
        let next = AtomicUsize::new(0);
        let total = Mutex::new(Summary::default());
        std::thread::scope(|s| {
            for _ in 0..in_flight.clamp(1, entries.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(entry) = entries.get(i) else { break };
                    // Under a cache limit, fetching ahead must not evict what was read.
                    if !self.engine.room_to_fetch_ahead() {
                        break;
                    }
                    let done =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.one(entry)))
                            .unwrap_or(One::Failed);
                    let mut t = lock(&total);
                    t.files += 1;
                    match done {
                        One::Fetched { bytes, changed } => {
                            t.fetched += bytes;
                            t.changed += changed as u64;
                        }
                        One::Missing => t.missing += 1,
                        One::Failed => t.failed += 1,
                    }
                });
            }
        });
        total.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn one(&self, entry: &Entry) -> One {
        let metrics = &self.engine.metrics;
        let missing = || {
            Metrics::add(&metrics.list_missing_files, 1);
            One::Missing
        };
        let Ok(path) = sysfs::open_beneath(self.tree.as_fd(), &entry.path, libc::O_PATH) else {
            return missing();
        };
        let Ok(st) = sysfs::fstat(path.as_fd()) else {
            return missing();
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return missing();
        }
        let changed = st.st_size as u64 != entry.size;
        if changed {
            Metrics::add(&metrics.list_changed_files, 1);
        }
        let res = sysfs::reopen(path.as_fd(), libc::O_RDWR | libc::O_NONBLOCK).and_then(|fd| {
            self.engine
                .prefetch_ranges(fd.as_fd(), entry.open, &entry.ranges)
        });
        match res {
            Ok(made) => {
                let bytes: u64 = made.iter().map(|(a, b)| b - a).sum();
                Metrics::add(&metrics.list_prefetched_bytes, bytes);
                if !made.is_empty() {
                    self.tracking.store(true, Ordering::Relaxed);
                    let mut unused = lock(&self.unused);
                    let ranges = unused.entry((st.st_dev, st.st_ino)).or_default();
                    ranges.extend(made);
                }
                One::Fetched { bytes, changed }
            }
            Err(e) => {
                debug!(file = %String::from_utf8_lossy(&entry.path), "list prefetch failed: {e}");
                One::Failed
            }
        }
    }

    /// A reader opened (`range` None: every prefetched byte of it counts) or read the file
    /// behind `fd`: prefetched bytes it uses for the first time are hits.
    pub fn note_read(&self, fd: BorrowedFd<'_>, range: Option<(u64, u64)>) {
        let waiting = self.waiting.load(Ordering::Relaxed);
        if !waiting && !self.tracking.load(Ordering::Relaxed) {
            return;
        }
        let Ok(st) = sysfs::fstat(fd) else { return };
        if waiting {
            let mut first = lock(&self.first);
            if first
                .as_ref()
                .is_some_and(|f| f.0 == (st.st_dev, st.st_ino))
            {
                if let Some((_, tx)) = first.take() {
                    self.waiting.store(false, Ordering::Relaxed);
                    let _ = tx.try_send(());
                }
            }
        }
        let mut unused = lock(&self.unused);
        let key = (st.st_dev, st.st_ino);
        let Some(ranges) = unused.get_mut(&key) else {
            return;
        };
        let (lo, hi) = match range {
            None | Some((_, 0)) => (0, u64::MAX),
            Some((offset, count)) => (offset, offset.saturating_add(count)),
        };
        let mut hit = 0;
        let mut rest = Vec::with_capacity(ranges.len());
        for &(a, b) in ranges.iter() {
            let (s, e) = (a.max(lo), b.min(hi));
            if s < e {
                hit += e - s;
                if a < s {
                    rest.push((a, s));
                }
                if e < b {
                    rest.push((e, b));
                }
            } else {
                rest.push((a, b));
            }
        }
        if rest.is_empty() {
            unused.remove(&key);
        } else {
            *ranges = rest;
        }
        drop(unused);
        Metrics::add(&self.engine.metrics.list_hit_bytes, hit);
    }
}

enum One {
    Fetched { bytes: u64, changed: bool },
    Missing,
    Failed,
}

/// The daemon's control service with the access list operations added.
pub struct ListService {
    pub inner: Arc<dyn Service>,
    pub recorder: Option<Arc<Recorder>>,
    pub lists: Option<Arc<Lists>>,
}

impl Service for ListService {
    fn run(&self, op: Op, path: &[u8]) -> Reply {
        match op {
            Op::WriteAccessList => match &self.recorder {
                Some(r) => r
                    .write()
                    .map(|files| Done::AccessListWritten {
                        files: files as u64,
                    })
                    .map_err(|e| format!("{e:#}")),
                None => {
                    Err("this daemon records no accesses (hsm serve --record-access FILE)".into())
                }
            },
            // The request carries the list's text.
            Op::PrefetchList => {
                let Some(lists) = &self.lists else {
                    return Err("this daemon has no fetch engine".into());
                };
                let text = String::from_utf8_lossy(path);
                let entries = parse(&text).map_err(|e| format!("the access list: {e:#}"))?;
                let s = lists.run(&entries, IN_FLIGHT);
                lists.engine.flush(true);
                Ok(Done::ListPrefetched(s))
            }
            _ => self.inner.run(op, path),
        }
    }
}

/// `hsm record --flush PATH`: the daemon serving PATH writes its access list now.
pub fn flush_command(path: &Path) -> anyhow::Result<()> {
    let Some((mut client, _)) = crate::control::Client::find(path)? else {
        bail!("no hsm serve runs for {}", path.display());
    };
    match client.call(Op::WriteAccessList, b"")? {
        Ok(Done::AccessListWritten { files }) => {
            println!("access list written: {files} files");
            Ok(())
        }
        Ok(other) => bail!("unexpected reply: {other:?}"),
        Err(e) => bail!("{e}"),
    }
}

/// `hsm hydrate --list FILE PATH`: fetch the list's files and ranges (relative to PATH, the
/// mount point or STORE/tree, or a directory below either) through the daemon serving PATH, or in
/// this process when none does.
pub fn hydrate_command(list: &Path, root: &Path) -> anyhow::Result<bool> {
    let mut entries = load(list)?;
    let prefix = |entries: &mut Vec<Entry>, rel: &Path| {
        if rel.as_os_str().is_empty() {
            return;
        }
        for e in entries.iter_mut() {
            let mut p = rel.as_os_str().as_bytes().to_vec();
            p.push(b'/');
            p.extend_from_slice(&e.path);
            e.path = p;
        }
    };
    let summary = if let Some((mut client, rel)) = crate::control::Client::find(root)? {
        prefix(&mut entries, &rel);
        match client.call(Op::PrefetchList, render(&entries).as_bytes())? {
            Ok(Done::ListPrefetched(s)) => s,
            Ok(other) => bail!("unexpected reply: {other:?}"),
            Err(e) => bail!("{e}"),
        }
    } else {
        let Some((store, rel)) = crate::verify::locate(root) else {
            bail!(
                "{} is neither under the mount point of a running `hsm serve` nor under a \
                 store's tree (STORE/tree)",
                root.display()
            );
        };
        prefix(&mut entries, &rel);
        let (ops, _held) = crate::manage::operations_here(Op::Hydrate, &store)?;
        let engine = ops
            .engine
            .clone()
            .context("no fetch engine for this operation")?;
        let lists = Lists::new(engine.clone(), ops.tree.try_clone()?);
        let s = lists.run(&entries, IN_FLIGHT);
        engine.flush(true);
        s
    };
    println!(
        "{} files in the list, {:.1} MiB fetched, {} missing, {} changed since recorded, {} failed",
        summary.files,
        summary.fetched as f64 / (1 << 20) as f64,
        summary.missing,
        summary.changed,
        summary.failed
    );
    Ok(summary.failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_and_odd_names_are_escaped() {
        let entries = vec![
            Entry {
                path: b"lib/a b\t%#\xff.py".to_vec(),
                size: 10,
                open: true,
                ranges: vec![],
                cgroup: Some("/user.slice/x y".into()),
                history: None,
            },
            Entry {
                path: b"big".to_vec(),
                size: 1 << 30,
                open: true,
                ranges: vec![(0, 4096), (1 << 20, (1 << 20) + 8192)],
                cgroup: None,
                history: Some((3, 4)),
            },
        ];
        let text = render(&entries);
        assert!(text.starts_with("hsm-access-list 1\nlib/a%20b%09%25%23%FF.py\t10\topen\t"));
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(parse(&text).unwrap(), entries);
    }

    fn named(paths: &[&str]) -> Vec<Entry> {
        paths
            .iter()
            .map(|p| Entry {
                path: p.as_bytes().to_vec(),
                open: true,
                ..Default::default()
            })
            .collect()
    }

    fn paths(list: &[Entry]) -> Vec<String> {
        list.iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect()
    }

    #[test]
    fn merged_starts_keep_what_most_read_and_age_out_what_one_read() {
        // Start 1 reads a, b, once; start 2 reads a, c; start 3 reads a, c; start 4 reads a.
        let l1 = merge(&[], named(&["a", "once", "b"]));
        assert_eq!(paths(&l1), ["a", "once", "b"]);
        assert!(
            l1.iter().all(|e| e.history.is_none()),
            "one start: no counts"
        );
        let l2 = merge(&parse(&render(&l1)).unwrap(), named(&["a", "c"]));
        // "once" and "b" were read in 1 of 2 starts: not most, gone.
        assert_eq!(paths(&l2), ["a", "c"]);
        assert_eq!(l2[0].history, Some((2, 2)));
        assert_eq!(l2[1].history, Some((1, 2)));
        let l3 = merge(&parse(&render(&l2)).unwrap(), named(&["a", "c"]));
        assert_eq!(l3[1].history, Some((2, 3)));
        let l4 = merge(&parse(&render(&l3)).unwrap(), named(&["a"]));
        // c: read in 2 of 4 starts: not more than half, gone; a in all.
        assert_eq!(paths(&l4), ["a"]);
        assert_eq!(l4[0].history, Some((4, 4)));
        // Counts stay within the window.
        let mut l = l4;
        for _ in 0..20 {
            l = merge(&l, named(&["a"]));
        }
        assert!(
            l[0].history.is_some_and(|(s, n)| s == n && n <= HISTORY),
            "{l:?}"
        );
        // A file read in 3 of the last 4 starts stays while not read this time.
        let l = merge(&[], named(&["x", "y"]));
        let l = merge(&l, named(&["x", "y"]));
        let l = merge(&l, named(&["x", "y"]));
        let l = merge(&l, named(&["x"]));
        assert_eq!(paths(&l), ["x", "y"]);
        assert_eq!(l[1].history, Some((3, 4)));
    }

    #[test]
    fn bad_lists_are_refused_with_the_line() {
        let e = parse("hsm-access-list 2\n").unwrap_err().to_string();
        assert!(e.contains("version"), "{e}");
        let e = parse("a\tb\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = parse("hsm-access-list 1\nx\t1\t5-3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("5-3"), "{e}");
        let e = parse("hsm-access-list 1\n/abs\t1\topen\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative"), "{e}");
        let e = parse("hsm-access-list 1\nx\tten\topen\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("size"), "{e}");
        // Comments, blank lines, overlapping ranges merged, no cgroup column.
        let ok = parse("hsm-access-list 1\n# c\n\nx\t9\t0-10,5-20,open\n").unwrap();
        assert_eq!(ok[0].ranges, vec![(0, 20)]);
        assert!(ok[0].open && ok[0].cgroup.is_none());
    }
}
