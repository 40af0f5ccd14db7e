//! `hsm populate SOURCE STORE`: build the stub tree.
//!
//! Every file is created relative to an open directory fd with `O_NOFOLLOW`/`O_EXCL`, so a path
//! component swapped for a symlink mid-way makes that entry fail rather than write elsewhere, and
//! the source is read the same way. Directories are walked in parallel (rayon); memory holds one
//! directory's subdirectory names per level being walked, not the tree.
//!
//! Every stub appears in the tree whole, with its record, owner, mode and times: it is made
//! unnamed (`O_TMPFILE` in its directory) and only then linked at its name (`linkat`), so a
//! populate killed at any moment leaves whole stubs or nothing, and running it again completes the
//! tree. Where `O_TMPFILE` is refused, a stub is made under a staging name (`.hsm-staging.*`) and
//! renamed into place; staging names an interrupted run left are removed by the next run.
//!
//! How a stub is made (see the README, "Stubs and copy tools"):
//! - xfs, btrfs, files of `whole_below` bytes or more: reflinked zero blocks from the store's pool.
//!   They read as data to `SEEK_DATA`/`FIEMAP`, so copy tools read them and each range is fetched.
//! - every other file: sparse, and fetched whole when it is opened (other than for exec), so no
//!   tool can see its holes. On ext4 `--lazy-sparse` trades that guarantee for range fetching.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::backend::local::path_from_url;
use crate::backend::{scheme_of, Scheme};
use crate::record::{SourceRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::store::{clone_zeros, Store, StoreConfig};
use crate::sys::fs::{self as sysfs, FsKind};

#[derive(Clone, Debug, Default)]
pub struct PopulateOptions {
    pub chunk_size: u32,
    pub whole_below: u64,
    pub lazy_sparse: bool,
    pub jobs: usize,
    /// Record a BLAKE3 digest per chunk (reads every source file once).
    pub digests: bool,
    /// Remote sources: a manifest (local path or http(s) URL); see [`crate::manifest`].
    pub manifest: Option<String>,
    /// S3: the endpoint URL and region (recorded in the store's source URL).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Remote sources: seconds one read may take, retries included (recorded in the source URL).
    pub deadline: Option<f64>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PopulateReport {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
    pub cloned_stubs: u64,
    pub sparse_stubs: u64,
    pub empty_files: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub kept_existing: u64,
    /// Unfinished stubs under staging names, left by an interrupted populate, removed.
    pub staging_removed: u64,
    /// Sockets, FIFOs and device nodes: not reproduced (a device node in a tree exposed to users
    /// would be a way around their permissions), listed here.
    pub skipped_special: Vec<String>,
    /// Remote sources: keys or manifest paths that cannot be made into paths under the store
    /// (`..`, `.`, empty components, NUL, names over 255 bytes), with the reason; not stubbed.
    pub skipped_keys: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Counters {
    dirs: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
    cloned: AtomicU64,
    sparse: AtomicU64,
    empty: AtomicU64,
    symlinks: AtomicU64,
    hard_links: AtomicU64,
    kept: AtomicU64,
    staging_removed: AtomicU64,
}

/// The prefix of the names stubs are made under where `O_TMPFILE` is not supported.
pub const STAGING_PREFIX: &str = ".hsm-staging.";

/// `.hsm-staging.<pid, hex>.<sequence number, hex>`.
fn is_staging_name(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(STAGING_PREFIX.as_bytes()) else {
        return false;
    };
    let hex = |p: &[u8]| !p.is_empty() && p.len() <= 16 && p.iter().all(u8::is_ascii_hexdigit);
    let mut parts = rest.split(|&b| b == b'.');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if hex(a) && hex(b))
}

/// Testing: make stubs under staging names even where `O_TMPFILE` works.
const STAGING_ENV: &str = "HSM_POPULATE_STAGING";

/// A stub made, not yet at its name.
struct Made {
    file: File,
    /// Its staging name in its directory; `None`: unnamed (`O_TMPFILE`).
    staged: Option<CString>,
}

impl Made {
    /// Give it `name` in `dir`, unless something is there (`EEXIST`).
    fn publish(&self, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<()> {
        match &self.staged {
            None => sysfs::link_fd(self.file.as_fd(), dir, name),
            Some(staged) => sysfs::rename_noreplace(dir, staged, dir, name),
        }
    }

    /// Drop it (an unnamed file is gone when closed; a staged one is unlinked).
    fn discard(self, dir: BorrowedFd<'_>) {
        if let Some(staged) = &self.staged {
            let _ = sysfs::unlinkat(dir, staged);
        }
    }
}

/// Capabilities populate uses, and what for.
const NEEDED_CAPS: [(u32, &str, &str); 5] = [
    (
        sysfs::CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "write the trusted.hsm.* records",
    ),
    (sysfs::CAP_CHOWN, "CAP_CHOWN", "give stubs their owners"),
    (sysfs::CAP_FOWNER, "CAP_FOWNER", "set their modes and times"),
    (sysfs::CAP_FSETID, "CAP_FSETID", "keep set-group-ID bits"),
    (
        sysfs::CAP_DAC_OVERRIDE,
        "CAP_DAC_OVERRIDE",
        "write into the root-only store and read every source file",
    ),
];

/// Refuse, before anything is created, to run without the privileges every stub needs: without
/// them each stub would fail (or worse, be made without its record).
pub fn check_privileges() -> anyhow::Result<()> {
    let caps = sysfs::effective_caps().unwrap_or(0);
    let missing: Vec<_> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| caps & (1u64 << bit) == 0)
        .collect();
    if missing.len() == NEEDED_CAPS.len() {
        bail!(
            "run as root: hsm populate writes each stub's trusted.hsm.* record (CAP_SYS_ADMIN) and \
             gives it its owner, mode and times (CAP_CHOWN, CAP_FOWNER); nothing was created. \
             Run it as root, e.g. `sudo hsm populate SOURCE STORE`"
        );
    }
    if !missing.is_empty() {
        let what: Vec<String> = missing
            .iter()
            .map(|(_, name, why)| format!("{name} (to {why})"))
            .collect();
        bail!(
            "run as root: hsm populate lacks {}; nothing was created",
            what.join(", ")
        );
    }
    Ok(())
}

/// For `hsm populate`: the privileges checked first (before the store is looked at, or anything
/// opened or created), then the store's private view when a guard holds its group (see
/// [`crate::guard::view_for_tools`]).
pub fn store_view(store_root: &Path) -> anyhow::Result<Option<crate::guard::PrivateView>> {
    check_privileges()?;
    crate::guard::view_for_tools(store_root)
}

/// The first path at which a hard-linked source inode was stubbed; later names link to it.
type LinkCell = Arc<OnceLock<Option<Vec<u8>>>>;

struct Walk<'a> {
    opts: &'a PopulateOptions,
    /// Where digest lists go, when `--digests` asked for them.
    digest_dir: Option<std::path::PathBuf>,
    fs: FsKind,
    tree: OwnedFd,
    pool: Option<File>,
    counters: Counters,
    links: Mutex<HashMap<(u64, u64), LinkCell>>,
    skipped: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
    progress: ProgressBar,
    /// `O_TMPFILE` works here (cleared at its first refusal: staging names from then on).
    tmpfile: AtomicBool,
    /// Set when the walk is over, for the thread counting the source's entries.
    done: Arc<AtomicBool>,
}

/// BLAKE3 of each `chunk`-sized piece of the file's first `size` bytes.
fn chunk_digests(fd: BorrowedFd<'_>, size: u64, chunk: u32) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut buf = vec![0u8; chunk as usize];
    let mut out = Vec::with_capacity(size.div_ceil(chunk as u64) as usize);
    let mut off = 0;
    while off < size {
        let len = (size - off).min(chunk as u64) as usize;
        let n = sysfs::pread_full(fd, &mut buf[..len], off)?;
        if n != len {
            bail!("the source file shrank while it was read");
        }
        out.push(crate::digest::chunk_digest(&buf[..len]));
        off += len as u64;
    }
    Ok(out)
}

fn display(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(rel.len() + 1 + name.len());
        v.extend_from_slice(rel);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// What a stub, directory or symlink looks like, whichever kind of source it came from.
#[derive(Clone, Debug, Default)]
pub(crate) struct Meta {
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: sysfs::Timespec,
    pub mtime: sysfs::Timespec,
    /// The source's identity for the object (ETag), recorded in its SourceRecord.
    pub version: Option<String>,
}

impl Meta {
    fn of(st: &libc::stat) -> Meta {
        Meta {
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            version: None,
        }
    }
}

fn open_dir(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    sysfs::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub fn populate(
    source: &str,
    store_root: &Path,
    opts: &PopulateOptions,
) -> anyhow::Result<PopulateReport> {
    check_privileges()?;
    if opts.chunk_size == 0 || !opts.chunk_size.is_multiple_of(4096) {
        bail!("--chunk-size must be a positive multiple of 4096");
    }
    if scheme_of(source) != Scheme::Local {
        return remote::populate(source, store_root, opts);
    }
    if opts.manifest.is_some()
        || opts.endpoint.is_some()
        || opts.region.is_some()
        || opts.deadline.is_some()
    {
        bail!("--manifest, --endpoint, --region and --fetch-deadline are for remote sources");
    }
    let src_path = path_from_url(source)?;
    let src_path = src_path.canonicalize().with_context(|| {
        format!(
            "source {} does not exist or cannot be reached",
            src_path.display()
        )
    })?;
    let src_md = std::fs::metadata(&src_path)?;
    if !src_md.is_dir() {
        bail!("source {} is not a directory", src_path.display());
    }
    if let Some(parent) = store_root.parent().filter(|p| !p.as_os_str().is_empty()) {
        let parent = parent.canonicalize().with_context(|| {
            format!(
                "the parent of STORE {} does not exist",
                store_root.display()
            )
        })?;
        if parent.starts_with(&src_path) {
            bail!(
                "STORE {} lies inside SOURCE {}; choose a store outside it",
                store_root.display(),
                src_path.display()
            );
        }
        if src_path.starts_with(parent.join(store_root.file_name().unwrap_or(OsStr::new("")))) {
            bail!("SOURCE lies inside STORE; choose a store outside it");
        }
    }
    let store = Store::create(
        store_root,
        StoreConfig {
            version: 1,
            source: format!("file://{}", src_path.display()),
            fs: FsKind::Other(0),
            chunk_size: opts.chunk_size,
            whole_below: opts.whole_below,
            lazy_sparse: opts.lazy_sparse,
        },
    )?;
    let src_root: OwnedFd = File::open(&src_path)?.into();
    let (walk, tree) = Walk::new(opts, &store, opts.digests)?;
    walk.count_in_background(&src_path);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .stack_size(16 << 20)
        .build()?;
    pool.install(|| walk.dir(src_root.as_fd(), tree.as_fd(), b""));
    let root_st = sysfs::fstat(src_root.as_fd())?;
    walk.set_meta(tree.as_fd(), None, &Meta::of(&root_st), b".");
    walk.finish(Vec::new())
}

fn method_line(c: &StoreConfig) -> String {
    match c.fs {
        FsKind::Xfs | FsKind::Btrfs => format!(
            "store on {}: files of {} bytes or more become reflinked zero-block stubs, fetched range by \
             range; smaller files are sparse stubs fetched whole when opened",
            c.fs.name(),
            c.whole_below
        ),
        _ if c.lazy_sparse => format!(
            "store on {}: sparse stubs fetched range by range (--lazy-sparse): copy tools that trust \
             SEEK_DATA will copy unfetched ranges as zeros",
            c.fs.name()
        ),
        _ => format!(
            "store on {} (no reflink): sparse stubs, each fetched whole when opened (exec fetches range by range)",
            c.fs.name()
        ),
    }
}

fn print_report(r: &PopulateReport) {
    eprintln!(
        "populated {} files ({} bytes: {} cloned stubs, {} sparse stubs, {} empty), {} directories, \
         {} symlinks, {} hard links{}",
        r.files,
        r.bytes,
        r.cloned_stubs,
        r.sparse_stubs,
        r.empty_files,
        r.dirs,
        r.symlinks,
        r.hard_links,
        if r.kept_existing > 0 { format!(", {} existing stubs kept", r.kept_existing) } else { String::new() }
    );
    if r.staging_removed > 0 {
        eprintln!(
            "removed {} unfinished stubs left under staging names by an interrupted populate",
            r.staging_removed
        );
    }
    if !r.skipped_special.is_empty() {
        eprintln!(
            "skipped {} special files (sockets, FIFOs, devices):",
            r.skipped_special.len()
        );
        for p in r.skipped_special.iter().take(20) {
            eprintln!("  {p}");
        }
    }
    if !r.skipped_keys.is_empty() {
        eprintln!(
            "skipped {} source keys that cannot be paths under the store:",
            r.skipped_keys.len()
        );
        for p in r.skipped_keys.iter().take(50) {
            eprintln!("  {p}");
        }
    }
    for e in r.errors.iter().take(50) {
        eprintln!("error: {e}");
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The progress line: entries done and their rate (`49,968 entries/s`); with the total known,
/// a bar, the total and an ETA.
fn progress_style(with_total: bool) -> ProgressStyle {
    // The bar takes what the line leaves, so that the line never wraps.
    let template = if with_total {
        "{spinner} {human_pos}/{human_len} entries, {rate}, ETA {eta} [{wide_bar}]"
    } else {
        "{spinner} {human_pos} entries, {rate}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
        .with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{} entries/s", thousands(s.per_sec().round() as u64));
            },
        )
}

impl<'a> Walk<'a> {
    /// Count what was done, print it, and fail if any entry could not be stubbed.
    fn finish(self, skipped_keys: Vec<String>) -> anyhow::Result<PopulateReport> {
        self.done.store(true, Relaxed);
        self.progress.finish_and_clear();
        let c = &self.counters;
        let take = |m: &Mutex<Vec<String>>| {
            std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
        };
        let report = PopulateReport {
            dirs: c.dirs.load(Relaxed),
            files: c.files.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            cloned_stubs: c.cloned.load(Relaxed),
            sparse_stubs: c.sparse.load(Relaxed),
            empty_files: c.empty.load(Relaxed),
            symlinks: c.symlinks.load(Relaxed),
            hard_links: c.hard_links.load(Relaxed),
            kept_existing: c.kept.load(Relaxed),
            staging_removed: c.staging_removed.load(Relaxed),
            skipped_special: take(&self.skipped),
            skipped_keys,
            errors: take(&self.errors),
        };
        print_report(&report);
        if !report.errors.is_empty() {
            bail!(
                "{} entries could not be stubbed (listed above)",
                report.errors.len()
            );
        }
        Ok(report)
    }

    /// Say which stub method the store's filesystem gets, and set up the walk of its tree.
    /// Returns the walk and the tree's directory fd.
    fn new(
        opts: &'a PopulateOptions,
        store: &Store,
        digests: bool,
    ) -> anyhow::Result<(Walk<'a>, OwnedFd)> {
        let fs = store.config.fs;
        eprintln!("{}", method_line(&store.config));
        let tree: OwnedFd = File::open(store.tree())
            .with_context(|| format!("cannot open {}", store.tree().display()))?
            .into();
        let progress = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        progress.set_style(progress_style(false));
        let walk = Walk {
            opts,
            digest_dir: digests.then(|| store.digest_dir()),
            fs,
            tree: tree.try_clone()?,
            pool: if fs.reflinks() {
                Some(store.zero_pool()?)
            } else {
                None
            },
            counters: Counters::default(),
            links: Mutex::new(HashMap::new()),
            skipped: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            progress,
            tmpfile: AtomicBool::new(std::env::var_os(STAGING_ENV).is_none_or(|v| v != "1")),
            done: Arc::new(AtomicBool::new(false)),
        };
        Ok((walk, tree))
    }

    /// The progress bar's total, once known: `n` entries.
    fn set_total(&self, n: u64) {
        self.progress.set_length(n);
        self.progress.set_style(progress_style(true));
    }

    /// Count the source's entries in a thread of its own (names only, no `stat`), and give the
    /// progress bar its total and an ETA once counted. Only when the bar is shown (stderr is a
    /// terminal): otherwise the count would cost and show nothing.
    fn count_in_background(&self, root: &Path) {
        if self.progress.is_hidden() {
            return;
        }
        let (progress, done, root) = (self.progress.clone(), self.done.clone(), root.to_path_buf());
        let _ = std::thread::Builder::new()
            .name("populate-count".into())
            .spawn(move || {
                let mut n = 0u64;
                let mut dirs = vec![root];
                while let Some(dir) = dirs.pop() {
                    if done.load(Relaxed) {
                        return;
                    }
                    let Ok(rd) = std::fs::read_dir(&dir) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        n += 1;
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            dirs.push(e.path());
                        }
                    }
                }
                if !done.load(Relaxed) {
                    progress.set_length(n);
                    progress.set_style(progress_style(true));
                }
            });
    }

    /// Remove the unfinished stubs an interrupted populate left under staging names in `dst`:
    /// regular files named as [`create_unnamed`](Self::create_unnamed) names them, whose names the
    /// source does not have (`in_source` says which names it has), with no state record, and
    /// either a source record or, killed before it was written, still root's, mode 0600, with
    /// one link.
    fn sweep_staging(&self, dst: BorrowedFd<'_>, rel: &[u8], in_source: impl Fn(&[u8]) -> bool) {
        let Ok(rd) = std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dst)
        )) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.as_bytes();
            if !is_staging_name(name) || in_source(name) {
                continue;
            }
            let Ok(cname) = CString::new(name) else {
                continue;
            };
            let Ok(fd) = sysfs::openat(dst, &cname, libc::O_RDONLY | libc::O_NONBLOCK, 0) else {
                continue;
            };
            let Ok(st) = sysfs::fstat(fd.as_fd()) else {
                continue;
            };
            let ours = st.st_mode & libc::S_IFMT == libc::S_IFREG
                && matches!(sysfs::fgetxattr(fd.as_fd(), XATTR_STATE), Ok(None))
                && match sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE) {
                    Ok(Some(raw)) => SourceRecord::decode(&raw).is_ok(),
                    Ok(None) => st.st_uid == 0 && st.st_mode & 0o7777 == 0o600 && st.st_nlink == 1,
                    Err(_) => false,
                };
            drop(fd);
            if ours {
                match sysfs::unlinkat(dst, &cname) {
                    Ok(()) => {
                        self.counters.staging_removed.fetch_add(1, Relaxed);
                    }
                    Err(e) => self.error(
                        &join(rel, name),
                        format!("cannot remove an unfinished stub: {e}"),
                    ),
                }
            }
        }
    }

    fn error(&self, rel: &[u8], what: impl std::fmt::Display) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {what}", display(rel)));
    }

    /// Reproduce one directory entry; returns the subdirectories to walk next.
    fn entry(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        rel: &[u8],
        name_bytes: &[u8],
    ) -> Option<(CString, libc::stat)> {
        let path = join(rel, name_bytes);
        let Ok(name) = CString::new(name_bytes) else {
            self.error(&path, "name contains NUL");
            return None;
        };
        let st = match sysfs::lstatat(src, &name) {
            Ok(st) => st,
            Err(e) => {
                self.error(&path, e);
                return None;
            }
        };
        self.progress.inc(1);
        let res = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                match sysfs::mkdirat(dst, &name, 0o700) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        match sysfs::lstatat(dst, &name) {
                            Ok(d) if d.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                            _ => {
                                self.error(
                                    &path,
                                    "refusing to replace an existing non-directory in STORE",
                                );
                                return None;
                            }
                        }
                    }
                    Err(e) => {
                        self.error(&path, e);
                        return None;
                    }
                }
                return Some((name, st));
            }
            libc::S_IFREG => self.file(src, dst, &name, &path, &st),
            libc::S_IFLNK => self.symlink(src, dst, &name, &path, &st),
            _ => {
                self.skipped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(display(&path));
                Ok(())
            }
        };
        if let Err(e) = res {
            self.error(&path, format!("{e:#}"));
        }
        None
    }

    fn dir(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &[u8]) {
        let entries = match std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&src)
        )) {
            Ok(e) => e,
            Err(e) => return self.error(rel, format!("cannot list directory: {e}")),
        };
        // Names first (one directory's worth of memory), then the entries in parallel: a
        // directory of many files is as parallel as a tree of many directories.
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) => {
                    self.error(rel, format!("cannot list directory: {e}"));
                    break;
                }
            }
        }
        self.sweep_staging(dst, rel, |n| names.iter().any(|s| s.as_bytes() == n));
        let subdirs: Vec<(CString, libc::stat)> = names
            .par_iter()
            .with_min_len(64)
            .filter_map(|name_os| self.entry(src, dst, rel, name_os.as_bytes()))
            .collect();
        subdirs.into_par_iter().for_each(|(name, st)| {
            let path = join(rel, name.as_bytes());
            let (s, d) = match (open_dir(src, &name), open_dir(dst, &name)) {
                (Ok(s), Ok(d)) => (s, d),
                (Err(e), _) | (_, Err(e)) => {
                    return self.error(&path, format!("cannot open directory: {e}"))
                }
            };
            self.counters.dirs.fetch_add(1, Relaxed);
            self.dir(s.as_fd(), d.as_fd(), &path);
            // After the children: creating them moved the directory's mtime.
            self.set_meta(d.as_fd(), None, &Meta::of(&st), &path);
        });
    }

    /// Owner, mode, times. Owner first: chown clears set-id bits.
    fn set_meta(&self, dir: BorrowedFd<'_>, name: Option<&std::ffi::CStr>, m: &Meta, rel: &[u8]) {
        let res = (|| -> std::io::Result<()> {
            sysfs::chown(dir, name, m.uid, m.gid)?;
            if name.is_none() {
                sysfs::fchmod(dir, m.mode & 0o7777)?;
            }
            sysfs::set_times(dir, name, m.atime, m.mtime)
        })();
        if let Err(e) = res {
            self.error(rel, format!("cannot set owner, mode or times: {e}"));
        }
    }

    fn symlink(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
    ) -> anyhow::Result<()> {
        let target = sysfs::readlinkat(src, name)?;
        match sysfs::symlinkat(&target, dst, name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if sysfs::readlinkat(dst, name).ok().as_deref() == Some(&target[..]) {
                    self.keep_symlink(dst, name, &Meta::of(st), rel);
                    return Ok(());
                }
                bail!(
                    "refusing to replace an existing entry in STORE that is not the same symlink"
                );
            }
            Err(e) => return Err(e.into()),
        }
        self.set_meta(dst, Some(name), &Meta::of(st), rel);
        self.counters.symlinks.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The same symlink is already there: keep it, and give it the owner and times a run
    /// interrupted between making it and setting them did not.
    fn keep_symlink(&self, dst: BorrowedFd<'_>, name: &std::ffi::CStr, m: &Meta, rel: &[u8]) {
        self.counters.kept.fetch_add(1, Relaxed);
        if let Ok(have) = sysfs::lstatat(dst, name) {
            if (
                have.st_uid,
                have.st_gid,
                (have.st_mtime, have.st_mtime_nsec),
            ) != (m.uid, m.gid, m.mtime)
            {
                self.set_meta(dst, Some(name), m, rel);
            }
        }
    }

    fn file(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
    ) -> anyhow::Result<()> {
        if st.st_nlink > 1 {
            let cell = self
                .links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((st.st_dev, st.st_ino))
                .or_default()
                .clone();
            let mut made_here = false;
            let first = cell.get_or_init(|| {
                made_here = true;
                match self.stub_local(src, dst, name, rel, st) {
                    Ok(()) => Some(rel.to_vec()),
                    Err(e) => {
                        self.error(rel, format!("{e:#}"));
                        None
                    }
                }
            });
            if made_here {
                return Ok(());
            }
            let Some(first) = first else {
                bail!("not linked: the first name of this hard-linked file failed");
            };
            let first = CString::new(first.clone())?;
            match sysfs::linkat(self.tree.as_fd(), &first, dst, name) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    if !self.relink(dst, name, &first)? {
                        self.counters.kept.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
            self.counters.hard_links.fetch_add(1, Relaxed);
            return Ok(());
        }
        self.stub_local(src, dst, name, rel, st)
    }

    /// A later name of a hard-linked source file is taken. The same inode as the first name:
    /// keep it (`false`). A stub of its own that was never filled (made by an earlier, interrupted
    /// run that stubbed this name first): replace it with a link to the first name (`true`).
    /// A stub holding fetched or local content is kept; anything else is refused.
    fn relink(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        first: &std::ffi::CStr,
    ) -> anyhow::Result<bool> {
        let want = sysfs::lstatat(self.tree.as_fd(), first)?;
        let have = sysfs::lstatat(dst, name)?;
        if (have.st_dev, have.st_ino) == (want.st_dev, want.st_ino) {
            return Ok(false);
        }
        let fd = sysfs::openat(dst, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .context("refusing to replace an existing entry in STORE that is not a regular file")?;
        if sysfs::fstat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("refusing to replace an existing entry in STORE that is not a regular file");
        }
        let Some(raw) = sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE)? else {
            bail!("refusing to overwrite a file in STORE that is not an hsm stub");
        };
        SourceRecord::decode(&raw).context("existing stub has a corrupt record")?;
        if sysfs::fgetxattr(fd.as_fd(), XATTR_STATE)?.is_some() {
            return Ok(false);
        }
        drop(fd);
        sysfs::unlinkat(dst, name)?;
        sysfs::linkat(self.tree.as_fd(), first, dst, name)?;
        Ok(true)
    }

    /// Make the stub `name` in `dst` for the source object `rel`, or keep the one already there.
    fn stub(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        m: &Meta,
    ) -> anyhow::Result<()> {
        self.stub_with(dst, name, rel, m, None)
    }

    /// A local source file: with `--digests`, read it once to record a digest per chunk.
    fn stub_local(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
    ) -> anyhow::Result<()> {
        let digests = match &self.digest_dir {
            Some(dir) if st.st_size > 0 => {
                let f = sysfs::openat(src, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                let list = chunk_digests(f.as_fd(), st.st_size as u64, self.opts.chunk_size)
                    .context("cannot read the source file to digest it")?;
                Some(crate::digest::write_list(dir, &list)?)
            }
            _ => None,
        };
        self.stub_with(dst, name, rel, &Meta::of(st), digests)
    }

    fn stub_with(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        m: &Meta,
        digests: Option<[u8; 32]>,
    ) -> anyhow::Result<()> {
        let size = m.size;
        let kind = if self.fs.reflinks() && size >= self.opts.whole_below {
            StubKind::Cloned
        } else if self.opts.lazy_sparse && !self.fs.reflinks() {
            StubKind::SparseLazy
        } else {
            StubKind::Sparse
        };
        let record = SourceRecord {
            key: rel.to_vec(),
            size,
            mtime: (m.mtime.0, m.mtime.1 as u32),
            version: m.version.clone(),
            chunk_size: self.opts.chunk_size,
            kind,
            digests,
        };
        // Made whole before it has a name (see the module's documentation): no path, and so no
        // user or daemon, ever reaches a stub without its record, owner, mode and times.
        let made = self.make(dst, &record, m)?;
        let published = match made.publish(dst, name) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self
                .replace_existing(dst, name, &record)
                .and_then(|replace| {
                    if replace {
                        made.publish(dst, name)?;
                    }
                    Ok(replace)
                }),
            Err(e) => Err(e.into()),
        };
        match published {
            Ok(true) => {}
            Ok(false) => {
                made.discard(dst);
                self.counters.kept.fetch_add(1, Relaxed);
                return Ok(());
            }
            Err(e) => {
                made.discard(dst);
                return Err(e);
            }
        }
        match kind {
            _ if size == 0 => &self.counters.empty,
            StubKind::Cloned => &self.counters.cloned,
            StubKind::Sparse | StubKind::SparseLazy => &self.counters.sparse,
        }
        .fetch_add(1, Relaxed);
        self.counters.files.fetch_add(1, Relaxed);
        self.counters.bytes.fetch_add(size, Relaxed);
        Ok(())
    }

    /// A new file in `dir` with no name (`O_TMPFILE`), with the permission bits `mode` (less
    /// the umask): no path reaches it before it is whole, and a mode right from the start saves
    /// most stubs a `fchmod` (a transaction of its own). Where `O_TMPFILE` is refused, under a
    /// fresh staging name instead, mode 0600 and root's until its owner and mode are set: a
    /// daemon serving the tree already shows that name.
    fn create_unnamed(&self, dir: BorrowedFd<'_>, mode: u32) -> anyhow::Result<Made> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if self.tmpfile.load(Relaxed) {
            match sysfs::open_tmpfile(dir, mode & 0o777) {
                Ok(fd) => {
                    return Ok(Made {
                        file: fd.into(),
                        staged: None,
                    })
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                    ) =>
                {
                    self.tmpfile.store(false, Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            let staged = CString::new(format!(
                "{STAGING_PREFIX}{:x}.{:x}",
                std::process::id(),
                SEQ.fetch_add(1, Relaxed)
            ))?;
            match sysfs::openat(
                dir,
                &staged,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            ) {
                Ok(fd) => {
                    return Ok(Made {
                        file: fd.into(),
                        staged: Some(staged),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A whole stub, not yet at its name: size (sparse or cloned zero blocks), record, owner,
    /// mode, times.
    fn make(&self, dir: BorrowedFd<'_>, record: &SourceRecord, m: &Meta) -> anyhow::Result<Made> {
        let made = self.create_unnamed(dir, m.mode)?;
        let file = &made.file;
        let size = record.size;
        let res = (|| -> anyhow::Result<()> {
            match record.kind {
                _ if size == 0 => {}
                StubKind::Cloned => {
                    let pool = self.pool.as_ref().context("zero pool missing")?;
                    clone_zeros(pool, file, size)
                        .context("cannot clone zero blocks into the stub")?;
                }
                StubKind::Sparse | StubKind::SparseLazy => {
                    sysfs::ftruncate(file.as_fd(), size)?;
                }
            }
            sysfs::fsetxattr(file.as_fd(), XATTR_SOURCE, &record.encode())
                .context("cannot write the stub's record (trusted.* xattrs need root)")?;
            // A chown is a journal transaction even when nothing changes; a new file often has
            // its owner already (root's trees populated by root), and an fstat costs next to
            // nothing.
            let made = sysfs::fstat(file.as_fd())?;
            let chown = (made.st_uid, made.st_gid) != (m.uid, m.gid);
            if chown {
                sysfs::chown(file.as_fd(), None, m.uid, m.gid)?;
            }
            // After the chown, which clears set-id bits.
            if chown || made.st_mode & 0o7777 != m.mode & 0o7777 {
                sysfs::fchmod(file.as_fd(), m.mode & 0o7777)?;
            }
            sysfs::set_times(file.as_fd(), None, m.atime, m.mtime)?;
            Ok(())
        })();
        match res {
            Ok(()) => Ok(made),
            Err(e) => {
                made.discard(dir);
                Err(e)
            }
        }
    }

    /// An entry already at this name. Our stub of the same source file: keep it (`false`). Our
    /// stub of a file that changed at the source and was never filled: remove it so it is made
    /// again (`true`). Anything else is refused: populate never overwrites what it did not make.
    fn replace_existing(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        want: &SourceRecord,
    ) -> anyhow::Result<bool> {
        // O_NONBLOCK: a FIFO planted at the name must not hang the walk.
        let fd = sysfs::openat(dst, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .context("refusing to replace an existing entry in STORE that is not a regular file")?;
        if sysfs::fstat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("refusing to replace an existing entry in STORE that is not a regular file");
        }
        let Some(raw) = sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE)? else {
            bail!("refusing to overwrite a file in STORE that is not an hsm stub");
        };
        let have = SourceRecord::decode(&raw).context("existing stub has a corrupt record")?;
        if have.key == want.key
            && have.size == want.size
            && have.mtime == want.mtime
            && have.version == want.version
        {
            return Ok(false);
        }
        if sysfs::fgetxattr(fd.as_fd(), XATTR_STATE)?.is_some() {
            bail!("changed at the source since it was stubbed, but the stub holds fetched or local content; kept as it is");
        }
        drop(fd);
        sysfs::unlinkat(dst, name)?;
        Ok(true)
    }
}

/// Populate from a remote source: an S3 prefix (listed) or an HTTP(S) base (a manifest). The
/// whole plan is made and checked first (credentials, listing, HEADs), then the store is created
/// and the tree built under it; every name is created relative to a directory opened beneath the
/// tree with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no key can write outside it.
mod remote {
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::fd::{AsFd, OwnedFd};
    use std::path::Path;
    use std::sync::atomic::Ordering::Relaxed;

    use anyhow::{bail, Context};
    use rayon::prelude::*;

    use super::{Meta, PopulateOptions, PopulateReport, Walk};
    use crate::backend::http::{HttpBackend, HttpUrl};
    use crate::backend::object::{self, LAST_MODIFIED_PREFIX};
    use crate::backend::s3::{S3Backend, S3Url};
    use crate::backend::{scheme_of, FetchError, Scheme};
    use crate::manifest::{self, EntryType};
    use crate::store::{Store, StoreConfig};
    use crate::sys::fs::{self as sysfs, FsKind};

    const FILE_MODE: u32 = 0o644;
    const DIR_MODE: u32 = 0o755;
    const MANIFEST_LIMIT: u64 = 1 << 30;

    enum Node {
        Dir(Meta),
        File(Meta),
        Symlink(String, Meta),
    }

    /// What will be made, by relative path, plus what was refused and why.
    #[derive(Default)]
    struct Plan {
        nodes: BTreeMap<String, Node>,
        skipped: Vec<String>,
        errors: Vec<String>,
    }

    fn default_meta(mode: u32) -> Meta {
        Meta {
            mode,
            ..Meta::default()
        }
    }

    fn load_manifest(
        spec: &str,
        http: Option<&HttpBackend>,
        jobs_deadline: Option<f64>,
    ) -> anyhow::Result<Vec<manifest::Entry>> {
        let bytes = if scheme_of(spec) == Scheme::Http {
            let deadline = jobs_deadline
                .map(std::time::Duration::from_secs_f64)
                .unwrap_or(object::DEFAULT_DEADLINE);
            crate::backend::http::fetch_url(spec, deadline, MANIFEST_LIMIT)?
        } else if let (Some(h), "") = (http, spec) {
            h.get_small(manifest::DEFAULT_NAME, MANIFEST_LIMIT)?
        } else {
            std::fs::read(spec).with_context(|| format!("cannot read the manifest {spec}"))?
        };
        let text = String::from_utf8(bytes).context("the manifest is not UTF-8")?;
        manifest::parse(&text)
    }

    fn entry_meta(e: &manifest::Entry, default_mode: u32) -> Meta {
        Meta {
            size: e.size.unwrap_or(0),
            mode: e.mode.unwrap_or(default_mode) & 0o7777,
            uid: e.uid.unwrap_or(0),
            gid: e.gid.unwrap_or(0),
            atime: (e.mtime, e.mtime_nsec as i64),
            mtime: (e.mtime, e.mtime_nsec as i64),
            version: None,
        }
    }

    fn plan_s3(source: &str, opts: &PopulateOptions) -> anyhow::Result<(String, Plan)> {
        let mut url = S3Url::parse(source)?;
        if let Some(e) = &opts.endpoint {
            url.endpoint = Some(e.trim_end_matches('/').to_string());
        }
        if let Some(r) = &opts.region {
            url.region = Some(r.clone());
        }
        if let Some(d) = opts.deadline {
            url.deadline = Some(object::parse_deadline(&d.to_string())?);
        }
        // Re-parse the canonical form so that flags get the URL's own validation.
        let url = S3Url::parse(&url.to_url())?;
        let backend = S3Backend::open(url)?;
        eprintln!("listing {}", crate::backend::Backend::describe(&backend));
        let listed = backend.list()?;
        let mut plan = Plan::default();
        for o in listed {
            if let Some(dir) = o.key.strip_suffix('/') {
                // A directory marker (what consoles make for "folders").
                if o.size != 0 {
                    plan.skipped.push(format!(
                        "{:?}: a key ending in '/' with content ({} bytes)",
                        o.key, o.size
                    ));
                } else if dir.is_empty() {
                } else if let Some(why) = manifest::path_problem(dir) {
                    plan.skipped.push(format!("{:?}: {why}", o.key));
                } else {
                    let mut m = default_meta(DIR_MODE);
                    m.mtime = (o.mtime.0, o.mtime.1 as i64);
                    m.atime = m.mtime;
                    plan.nodes.insert(dir.to_string(), Node::Dir(m));
                }
                continue;
            }
            if let Some(why) = manifest::path_problem(&o.key) {
                plan.skipped.push(format!("{:?}: {why}", o.key));
                continue;
            }
            let mtime = (o.mtime.0, o.mtime.1 as i64);
            plan.nodes.insert(
                o.key.clone(),
                Node::File(Meta {
                    size: o.size,
                    mode: FILE_MODE,
                    uid: 0,
                    gid: 0,
                    atime: mtime,
                    mtime,
                    version: o.etag.clone(),
                }),
            );
        }
        if let Some(spec) = &opts.manifest {
            for e in load_manifest(spec, None, opts.deadline)? {
                if let Some(why) = manifest::path_problem(&e.path) {
                    plan.skipped.push(format!("manifest {:?}: {why}", e.path));
                    continue;
                }
                match (e.kind, plan.nodes.get_mut(&e.path)) {
                    (EntryType::File, Some(Node::File(m))) => {
                        if e.size != Some(m.size) {
                            plan.errors.push(format!(
                                "{}: the manifest says {} bytes, the bucket has {}; not stubbed",
                                e.path,
                                e.size.unwrap_or(0),
                                m.size
                            ));
                            plan.nodes.remove(&e.path);
                            continue;
                        }
                        let n = entry_meta(&e, FILE_MODE);
                        m.mode = n.mode;
                        m.uid = n.uid;
                        m.gid = n.gid;
                        m.mtime = n.mtime;
                        m.atime = n.atime;
                    }
                    (EntryType::File, _) => plan.errors.push(format!(
                        "{}: in the manifest but not a file in the bucket; not stubbed",
                        e.path
                    )),
                    (EntryType::Dir, _) => {
                        plan.nodes
                            .insert(e.path.clone(), Node::Dir(entry_meta(&e, DIR_MODE)));
                    }
                    (EntryType::Symlink, _) => {
                        let target = e.target.clone().unwrap_or_default();
                        plan.nodes
                            .insert(e.path.clone(), Node::Symlink(target, entry_meta(&e, 0o777)));
                    }
                }
            }
        }
        Ok((backend.url.to_url(), plan))
    }

    fn plan_http(source: &str, opts: &PopulateOptions) -> anyhow::Result<(String, Plan)> {
        if opts.endpoint.is_some() || opts.region.is_some() {
            bail!("--endpoint and --region are for s3:// sources");
        }
        let mut url = HttpUrl::parse(source)?;
        if let Some(d) = opts.deadline {
            url.deadline = Some(object::parse_deadline(&d.to_string())?);
        }
        let backend = HttpBackend::open(url)?;
        backend.check_strict()?;
        let spec = opts.manifest.clone().unwrap_or_default();
        eprintln!(
            "reading the manifest {}",
            if spec.is_empty() {
                object::redact_url(&backend.url.join(manifest::DEFAULT_NAME))
            } else if scheme_of(&spec) == Scheme::Http {
                object::redact_url(&spec)
            } else {
                spec.clone()
            }
        );
        let entries = load_manifest(&spec, Some(&backend), opts.deadline)?;
        let mut plan = Plan::default();
        let mut files = Vec::new();
        for e in entries {
            if let Some(why) = manifest::path_problem(&e.path) {
                plan.skipped.push(format!("manifest {:?}: {why}", e.path));
                continue;
            }
            match e.kind {
                EntryType::Dir => {
                    plan.nodes
                        .insert(e.path.clone(), Node::Dir(entry_meta(&e, DIR_MODE)));
                }
                EntryType::Symlink => {
                    let target = e.target.clone().unwrap_or_default();
                    plan.nodes
                        .insert(e.path.clone(), Node::Symlink(target, entry_meta(&e, 0o777)));
                }
                EntryType::File => files.push(e),
            }
        }
        eprintln!("checking {} files on the server (HEAD)", files.len());
        let paths: Vec<String> = files.iter().map(|e| e.path.clone()).collect();
        let heads = backend.head_all(&paths, opts.jobs.max(1) * 8);
        let mut unversioned = 0u64;
        for (e, head) in files.into_iter().zip(heads) {
            let mut m = entry_meta(&e, FILE_MODE);
            match head {
                Ok(h) if h.size != m.size => plan.errors.push(format!(
                    "{}: the manifest says {} bytes, the server has {}; not stubbed",
                    e.path, m.size, h.size
                )),
                Ok(h) => {
                    m.version = match (h.e_tag, h.last_modified.timestamp()) {
                        (Some(tag), _) => Some(tag),
                        (None, secs) if secs > 0 => Some(format!("{LAST_MODIFIED_PREFIX}{secs}")),
                        _ => {
                            unversioned += 1;
                            None
                        }
                    };
                    plan.nodes.insert(e.path.clone(), Node::File(m));
                }
                Err(FetchError::NotFound) => plan.errors.push(format!(
                    "{}: in the manifest but not on the server (404); not stubbed",
                    e.path
                )),
                Err(err) => plan.errors.push(format!("{}: HEAD failed: {err}", e.path)),
            }
        }
        if unversioned > 0 {
            eprintln!(
                "warning: the server sent neither ETag nor Last-Modified for {unversioned} files: \
                 if one is replaced by another of the same size, reads cannot tell"
            );
        }
        Ok((backend.url.to_url(), plan))
    }

    /// Every ancestor directory exists in the plan; a file or symlink where a directory is
    /// needed is refused.
    /// Directories the source does not describe get mode 0755, root, and the newest mtime
    /// found beneath them.
    fn complete(plan: &mut Plan) {
        let mut needed: BTreeMap<String, sysfs::Timespec> = BTreeMap::new();
        for (path, node) in &plan.nodes {
            let (Node::Dir(m) | Node::File(m) | Node::Symlink(_, m)) = node;
            let mut p = path.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                let t = needed.entry(parent.to_string()).or_insert((0, 0));
                *t = (*t).max(m.mtime);
                p = parent;
            }
        }
        for (d, newest) in needed {
            let implicit = Meta {
                atime: newest,
                mtime: newest,
                ..default_meta(DIR_MODE)
            };
            match plan.nodes.get(&d) {
                Some(Node::Dir(_)) => {}
                Some(_) => {
                    plan.skipped.push(format!(
                        "{d:?}: is both an object and a directory of other objects; the directory wins"
                    ));
                    plan.nodes.insert(d, Node::Dir(implicit));
                }
                None => {
                    plan.nodes.insert(d, Node::Dir(implicit));
                }
            }
        }
    }

    fn split(rel: &str) -> (&str, &str) {
        rel.rsplit_once('/').unwrap_or(("", rel))
    }

    fn open_parent(tree: &OwnedFd, parent: &str) -> std::io::Result<OwnedFd> {
        sysfs::open_beneath(
            tree.as_fd(),
            parent.as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
    }

    pub(super) fn populate(
        source: &str,
        store_root: &Path,
        opts: &PopulateOptions,
    ) -> anyhow::Result<PopulateReport> {
        let (url, mut plan) = match scheme_of(source) {
            Scheme::S3 => plan_s3(source, opts)?,
            Scheme::Http => plan_http(source, opts)?,
            Scheme::Local => unreachable!("local sources are populated by the walk"),
        };
        complete(&mut plan);
        let store = Store::create(
            store_root,
            StoreConfig {
                version: 1,
                source: url,
                fs: FsKind::Other(0),
                chunk_size: opts.chunk_size,
                whole_below: opts.whole_below,
                lazy_sparse: opts.lazy_sparse,
            },
        )?;
        let (walk, tree) = Walk::new(opts, &store, false)?;
        walk.set_total(plan.nodes.len() as u64);
        walk.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&mut plan.errors);
        // Directories, parents first (a parent's path sorts before its children's).
        let mut failed_dirs: Vec<String> = Vec::new();
        for (rel, node) in &plan.nodes {
            let Node::Dir(_) = node else { continue };
            if failed_dirs
                .iter()
                .any(|f| rel.starts_with(&format!("{f}/")))
            {
                continue;
            }
            let (parent, name) = split(rel);
            let res = (|| -> anyhow::Result<()> {
                let pfd = open_parent(&tree, parent)?;
                let cname = CString::new(name)?;
                match sysfs::mkdirat(pfd.as_fd(), &cname, 0o700) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let st = sysfs::lstatat(pfd.as_fd(), &cname)?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                            bail!("refusing to replace an existing non-directory in STORE");
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(())
            })();
            walk.progress.inc(1);
            match res {
                Ok(()) => {
                    walk.counters.dirs.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    walk.error(rel.as_bytes(), format!("{e:#}"));
                    failed_dirs.push(rel.clone());
                }
            }
        }
        // Files and symlinks, one directory at a time, directories in parallel.
        let mut by_dir: BTreeMap<&str, Vec<(&str, &Node)>> = BTreeMap::new();
        for (rel, node) in &plan.nodes {
            if matches!(node, Node::Dir(_))
                || failed_dirs
                    .iter()
                    .any(|f| rel.starts_with(&format!("{f}/")))
            {
                continue;
            }
            by_dir
                .entry(split(rel).0)
                .or_default()
                .push((rel.as_str(), node));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.jobs.max(1))
            .build()?;
        pool.install(|| {
            by_dir.into_par_iter().for_each(|(parent, entries)| {
                let pfd = match open_parent(&tree, parent) {
                    Ok(fd) => fd,
                    Err(e) => {
                        return walk.error(parent.as_bytes(), format!("cannot open directory: {e}"))
                    }
                };
                walk.sweep_staging(pfd.as_fd(), parent.as_bytes(), |n| {
                    entries.iter().any(|(rel, _)| split(rel).1.as_bytes() == n)
                });
                for (rel, node) in entries {
                    walk.progress.inc(1);
                    let res = (|| -> anyhow::Result<()> {
                        let cname = CString::new(split(rel).1)?;
                        match node {
                            Node::File(m) => walk.stub(pfd.as_fd(), &cname, rel.as_bytes(), m),
                            Node::Symlink(target, m) => {
                                match sysfs::symlinkat(target.as_bytes(), pfd.as_fd(), &cname) {
                                    Ok(()) => {}
                                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                                        if sysfs::readlinkat(pfd.as_fd(), &cname).ok().as_deref()
                                            == Some(target.as_bytes())
                                        {
                                            walk.keep_symlink(pfd.as_fd(), &cname, m, rel.as_bytes());
                                            return Ok(());
                                        }
                                        bail!("refusing to replace an existing entry in STORE that is not the same symlink");
                                    }
                                    Err(e) => return Err(e.into()),
                                }
                                walk.set_meta(pfd.as_fd(), Some(&cname), m, rel.as_bytes());
                                walk.counters.symlinks.fetch_add(1, Relaxed);
                                Ok(())
                            }
                            Node::Dir(_) => Ok(()),
                        }
                    })();
                    if let Err(e) = res {
                        walk.error(rel.as_bytes(), format!("{e:#}"));
                    }
                }
            });
        });
        // Directory owners, modes and times last, children first: making entries moves mtimes.
        for (rel, node) in plan.nodes.iter().rev() {
            let Node::Dir(m) = node else { continue };
            if failed_dirs
                .iter()
                .any(|f| rel == f || rel.starts_with(&format!("{f}/")))
            {
                continue;
            }
            match open_parent(&tree, rel) {
                Ok(fd) => walk.set_meta(fd.as_fd(), None, m, rel.as_bytes()),
                Err(e) => walk.error(rel.as_bytes(), format!("cannot open directory: {e}")),
            }
        }
        let _ = sysfs::fchmod(tree.as_fd(), DIR_MODE);
        walk.finish(std::mem::take(&mut plan.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_told_from_source_names() {
        assert!(is_staging_name(b".hsm-staging.1f2e.0"));
        assert!(is_staging_name(b".hsm-staging.ffffffff.123abc"));
        for name in [
            &b".hsm-staging."[..],
            b".hsm-staging.12",
            b".hsm-staging.12.",
            b".hsm-staging.12.3.4",
            b".hsm-staging.xyz.1",
            b".hsm-staging.notes.txt",
            b"hsm-staging.1.2",
            b"file.txt",
        ] {
            assert!(
                !is_staging_name(name),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn rates_have_thousands_separators_and_no_decimals() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(49_968), "49,968");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
