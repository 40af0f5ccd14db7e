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
//!
//! The parts:
//! - `walk`: a local source directory, walked in parallel and reproduced entry by entry (hard
//!   links, symlinks, digests of local files).
//! - `stub`: making one stub whole before it has a name (sparse or cloned zero blocks, its
//!   record, owner, mode and times), publishing it atomically, and what to do with an entry
//!   already at its name (including the staging names an interrupted run left).
//! - `remote`: an S3 listing or an HTTP(S) manifest made into a plan, then built.
//! - `report`: the progress line and the summary printed at the end.

mod remote;
mod report;
mod stub;
mod walk;

pub(crate) use remote::{http_versions, plan_for_sync, Node as PlanNode};
pub(crate) use stub::is_staging_name;
pub use stub::Meta;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget};

use crate::backend::local::path_from_url;
use crate::backend::{scheme_of, Scheme};
use crate::store::{Store, StoreConfig};
use crate::sys::fs::{self as sysfs, FsKind};

use report::{method_line, print_report, progress_style};
use stub::STAGING_ENV;
pub use stub::STAGING_PREFIX;

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
        eprintln!("{}", method_line(&store.config));
        Walk::build(opts, store, digests)
    }

    /// As [`Walk::new`], saying nothing.
    fn build(
        opts: &'a PopulateOptions,
        store: &Store,
        digests: bool,
    ) -> anyhow::Result<(Walk<'a>, OwnedFd)> {
        let fs = store.config.fs;
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

    fn error(&self, rel: &[u8], what: impl std::fmt::Display) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {what}", display(rel)));
    }
}

/// Stub making for `hsm sync`: the very stubs, records, owners, modes and times populate makes,
/// so that a synced tree is one populate could have built.
pub(crate) struct Stubber<'a>(Walk<'a>);

impl<'a> Stubber<'a> {
    /// For `store`, with its chunk size and stub kinds (`opts`); returns the tree's fd too.
    pub(crate) fn new(
        opts: &'a PopulateOptions,
        store: &Store,
    ) -> anyhow::Result<(Stubber<'a>, OwnedFd)> {
        let (walk, tree) = Walk::build(opts, store, false)?;
        walk.progress.set_draw_target(ProgressDrawTarget::hidden());
        Ok((Stubber(walk), tree))
    }

    /// A new stub `name` in `dir` for the source object `rel` (see [`Walk::stub_with`]).
    pub(crate) fn stub(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        m: &Meta,
        digests: Option<[u8; 32]>,
    ) -> anyhow::Result<()> {
        self.0.stub_with(dir, name, rel, m, digests)
    }

    /// A new stub under a fresh staging name in `dir`, synced when `durable` (else the caller
    /// syncs it before it is given a name that matters): that name and the stub.
    pub(crate) fn stub_staged(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        rel: &[u8],
        m: &Meta,
        digests: Option<[u8; 32]>,
        durable: bool,
    ) -> anyhow::Result<(std::ffi::CString, File)> {
        self.0.stub_staged(dir, rel, m, digests, durable)
    }

    /// Owner, mode (of a directory: `name` None) and times; failures are kept for
    /// [`Stubber::take_errors`].
    pub(crate) fn set_meta(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: Option<&std::ffi::CStr>,
        m: &Meta,
        rel: &[u8],
    ) {
        self.0.set_meta(dir, name, m, rel)
    }

    pub(crate) fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.errors.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// BLAKE3 of each `chunk`-sized piece of the file's first `size` bytes (for `hsm sync`).
pub(crate) fn chunk_digests(
    fd: std::os::fd::BorrowedFd<'_>,
    size: u64,
    chunk: u32,
) -> anyhow::Result<Vec<[u8; 32]>> {
    walk::chunk_digests(fd, size, chunk)
}
