//! `hsm sync STORE`: bring the stub tree up to date with its source, which changed since
//! populate (or the last sync), without losing local work or stopping readers.
//!
//! The source's listing (`listing`: a walk of a local directory, an S3 listing, an HTTP
//! manifest) is compared with the records of the tree (`apply`), entry by entry:
//! - new directories, files and symlinks appear, made as populate makes them;
//! - a file whose source changed (size, mtime, or version: ETag) and that has no local change
//!   becomes a new stub, a new inode swapped into place: a reader of the old version keeps it;
//!   the old present bytes go back to the filesystem once it is closed;
//! - a file removed at the source goes, unless it has local changes;
//! - an unchanged file is not touched: a complete file stays complete, nothing is fetched
//!   (its owner and mode follow the source's);
//! - a file changed both at the source and here is a **conflict**: the local bytes stay, the
//!   conflict is reported and marked on the file (`trusted.hsm.conflict`, which `hsm status`
//!   shows) until the user moves the file away (the next sync brings the source's version) or
//!   the two agree again. Files that are not stubs (made in the tree by users) are never
//!   removed; the source adding a file at such a path is a conflict too.
//!
//! Served or not: without a daemon, in this process, under the store's lock (and through the
//! guard's private view when a guard runs), as `hsm hydrate` does. While `hsm serve` runs, the
//! listing is made here and handed to the daemon (a file in `STORE/.hsm`, named in an `Op::Sync`
//! request on its control socket), which applies it with its own view of the store and has its
//! fetch engine forget each inode it replaces or removes, so that their bytes go back.
//!
//! Exit status: 0, 1 when there were conflicts, 2 on errors.

mod apply;
mod listing;

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::backend::local::path_from_url;
use crate::backend::{scheme_of, Scheme};
use crate::control::{Client, Done, Op};
use crate::populate::{PopulateOptions, Stubber};
use crate::store::{Store, Worker};
use crate::sys::fs as sysfs;

pub use listing::{list_source, Listing, Node};

/// Set on a file in conflict: what the source has (JSON), while the local version is kept.
pub const XATTR_CONFLICT: &CStr = c"trusted.hsm.conflict";

/// Listings handed to the daemon are files in `STORE/.hsm` named so.
const LISTING_PREFIX: &str = "sync-listing.";

#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Say what would change; change nothing.
    pub dry_run: bool,
    /// Remote sources: the manifest populate was given (`--manifest`), if any.
    pub manifest: Option<String>,
    pub threads: usize,
    /// Print the counts, conflicts and errors only, not a line per change.
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Updated,
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub path: Vec<u8>,
}

/// What a sync did (or, dry, would do).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// Staging names an interrupted sync or populate left, removed.
    pub leftovers_removed: u64,
    /// `PATH: why`, the local version kept.
    pub conflicts: Vec<String>,
    pub errors: Vec<String>,
    /// Source entries not reproduced (special files, keys that cannot be paths).
    pub skipped: Vec<String>,
    pub changes: Vec<Change>,
}

/// The counts and the first conflicts and errors: the daemon logs a request's reply, and a
/// sync of a big tree may list many thousands of changes.
impl std::fmt::Debug for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncReport")
            .field("added", &self.added)
            .field("updated", &self.updated)
            .field("removed", &self.removed)
            .field("unchanged", &self.unchanged)
            .field(
                "conflicts",
                &self.conflicts.iter().take(5).collect::<Vec<_>>(),
            )
            .field("errors", &self.errors.iter().take(5).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The daemon's side of a sync request: JSON, in the control request's path.
#[derive(Debug, Serialize, Deserialize)]
struct SyncRequest {
    /// A file name in `STORE/.hsm` holding the listing (postcard).
    listing: String,
    dry_run: bool,
}

/// Compare `listing` with the tree of `store` and apply it (dry: only say what would change).
/// `forget`: the fetch engine lets go of an inode replaced or removed.
pub fn apply(
    store: &Store,
    listing: &Listing,
    dry_run: bool,
    threads: usize,
    forget: &(dyn Fn(BorrowedFd<'_>) + Sync),
) -> anyhow::Result<SyncReport> {
    let popts = PopulateOptions {
        chunk_size: store.config.chunk_size,
        whole_below: store.config.whole_below,
        lazy_sparse: store.config.lazy_sparse,
        jobs: threads.max(1),
        ..PopulateOptions::default()
    };
    let (stubber, tree) = Stubber::new(&popts, store)?;
    let source_root = match scheme_of(&store.config.source) {
        Scheme::Local => Some(OwnedFd::from(
            std::fs::File::open(path_from_url(&store.config.source)?)
                .context("cannot open the source")?,
        )),
        _ => None,
    };
    let store_digests = std::fs::read_dir(store.digest_dir())
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    let syncer = apply::Syncer {
        stubber: &stubber,
        tree: std::os::fd::AsFd::as_fd(&tree),
        listing,
        dry_run,
        forget,
        source_root,
        chunk_size: store.config.chunk_size,
        digest_dir: store.digest_dir(),
        store_digests,
        report: Mutex::new(SyncReport::default()),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .stack_size(16 << 20)
        .build()?;
    pool.install(|| syncer.run());
    let mut report = syncer
        .report
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    report.errors.extend(stubber.take_errors());
    report.errors.extend(listing.errors.iter().cloned());
    report.skipped.extend(listing.skipped.iter().cloned());
    report.changes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}

/// One sync at a time in the daemon.
static DAEMON_SYNC: Mutex<()> = Mutex::new(());

/// In the daemon: a sync request (`payload`, see [`SyncRequest`]) on the store whose tree is
/// `tree` (the daemon's view).
pub fn serve_request(
    tree: BorrowedFd<'_>,
    forget: &(dyn Fn(BorrowedFd<'_>) + Sync),
    payload: &[u8],
) -> anyhow::Result<SyncReport> {
    let req: SyncRequest = serde_json::from_slice(payload).context("malformed sync request")?;
    if !req.listing.starts_with(LISTING_PREFIX) || req.listing.contains('/') {
        bail!("malformed sync request: {:?} is not a listing", req.listing);
    }
    let _one = DAEMON_SYNC.lock().unwrap_or_else(|p| p.into_inner());
    let root = sysfs::openat(tree, c"..", libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .context("cannot open the store")?;
    let store = Store::open(Path::new(&format!("/proc/self/fd/{}", root.as_raw_fd())))?;
    let bytes = std::fs::read(store.meta().join(&req.listing))
        .with_context(|| format!("cannot read the listing {}", req.listing))?;
    let listing: Listing = postcard::from_bytes(&bytes).context("malformed listing")?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    apply(&store, &listing, req.dry_run, threads, forget)
}

/// HTTP: ask the server for the version (ETag) of each file the sync adds or updates; a file
/// whose size differs from the manifest's is left as it is, and reported.
fn fill_versions(
    source: &str,
    listing: &mut Listing,
    changes: &[Change],
    threads: usize,
) -> anyhow::Result<()> {
    let paths: Vec<Vec<u8>> = changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Removed)
        .filter(|c| matches!(listing.nodes.get(&c.path), Some(Node::File(_))))
        .map(|c| c.path.clone())
        .collect();
    if paths.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = paths
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let heads = crate::populate::http_versions(source, &names, threads)?;
    for (path, head) in paths.into_iter().zip(heads) {
        let Some(Node::File(m)) = listing.nodes.get_mut(&path) else {
            continue;
        };
        let shown = String::from_utf8_lossy(&path).into_owned();
        match head {
            Ok((size, _)) if size != m.size => {
                listing.errors.push(format!(
                    "{shown}: the manifest says {} bytes, the server has {size}; left as it is",
                    m.size
                ));
                listing.unreadable.push(path);
            }
            Ok((_, version)) => m.version = version,
            Err(e) => {
                listing.errors.push(format!("{shown}: HEAD failed: {e}"));
                listing.unreadable.push(path);
            }
        }
    }
    listing.versions_pending = false;
    Ok(())
}

/// Removes the listing handed to the daemon when dropped.
struct ListingFile(PathBuf);

impl Drop for ListingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ListingFile {
    fn write(&self, listing: &Listing) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.0)
            .with_context(|| format!("cannot write {}", self.0.display()))?;
        f.write_all(&postcard::to_allocvec(listing)?)?;
        Ok(())
    }
}

/// Listings left by a `hsm sync` that was killed: those whose process is gone.
fn sweep_listings(meta: &Path) {
    let Ok(rd) = std::fs::read_dir(meta) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(LISTING_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn through_daemon(
    mut client: Client,
    store: &Path,
    source: &str,
    listing: &mut Listing,
    opts: &SyncOptions,
) -> anyhow::Result<SyncReport> {
    sweep_listings(&store.join(".hsm"));
    let name = format!("{LISTING_PREFIX}{}", std::process::id());
    let file = ListingFile(store.join(".hsm").join(&name));
    file.write(listing)?;
    let mut call = |dry_run: bool| -> anyhow::Result<SyncReport> {
        let req = serde_json::to_vec(&SyncRequest {
            listing: name.clone(),
            dry_run,
        })?;
        match client.call(Op::Sync, &req)? {
            Ok(Done::Synced { report }) => Ok(report),
            Ok(other) => bail!("the daemon answered {other:?} to a sync"),
            Err(e) => bail!("the daemon could not sync: {e}"),
        }
    };
    if listing.versions_pending && !opts.dry_run {
        let planned = call(true)?;
        fill_versions(source, listing, &planned.changes, opts.threads)?;
        file.write(listing)?;
    }
    call(opts.dry_run)
}

/// Sync in this process, holding the store's lock; `Err` with the daemon's connection when a
/// daemon that was starting serves the store now (go through it).
fn in_process(
    store_path: &Path,
    listing: &mut Listing,
    opts: &SyncOptions,
) -> anyhow::Result<Result<SyncReport, Client>> {
    let group = crate::guard::group_for_tools(store_path)?;
    let view = match &group {
        Some(g) => Some(crate::guard::PrivateView::new(g, store_path)?),
        None => None,
    };
    let root = view
        .as_ref()
        .map_or(store_path.to_path_buf(), |v| v.root().to_path_buf());
    let store = Store::open(&root)?;
    let _lock = match store.lock_unless_served("hsm sync", &store_path.join("tree"))? {
        Worker::Here(lock) => lock,
        Worker::Daemon(client) => return Ok(Err(client)),
    };
    let none = |_: BorrowedFd<'_>| {};
    if listing.versions_pending && !opts.dry_run {
        let planned = apply(&store, listing, true, opts.threads, &none)?;
        fill_versions(
            &store.config.source,
            listing,
            &planned.changes,
            opts.threads,
        )?;
    }
    apply(&store, listing, opts.dry_run, opts.threads, &none).map(Ok)
}

/// `hsm sync STORE`: the exit status (0, 1 on conflicts, 2 on errors).
pub fn run(store: &Path, opts: &SyncOptions) -> anyhow::Result<u8> {
    if !sysfs::has_cap_sys_admin() {
        bail!("hsm sync reads and writes the stubs' trusted.hsm.* records: run it as root");
    }
    Store::check_exists(store)?;
    let config = Store::open(store)?.config;
    eprintln!(
        "listing {}",
        crate::backend::object::redact_url(&config.source)
    );
    let mut listing = list_source(&config, opts)?;
    refuse_empty_source(store, &listing, &config.source)?;
    let served = match Client::find(&store.join("tree"))? {
        Some((client, _)) => Err(client),
        None => in_process(store, &mut listing, opts)?,
    };
    let report = match served {
        Ok(report) => report,
        Err(client) => through_daemon(client, store, &config.source, &mut listing, opts)?,
    };
    Ok(print(&report, opts))
}

/// A source that lists nothing while the tree holds entries is far more often a source not
/// there (a mount missing, a wrong prefix, a manifest emptied) than one emptied on purpose:
/// refused, rather than removing every stub.
fn refuse_empty_source(store: &Path, listing: &Listing, source: &str) -> anyhow::Result<()> {
    let listed = listing.nodes.keys().any(|k| !k.is_empty());
    // A directory listing raises no fanotify event, served or not.
    let tree_has_entries = std::fs::read_dir(store.join("tree"))
        .with_context(|| format!("cannot list {}", store.join("tree").display()))?
        .next()
        .is_some();
    if !listed && tree_has_entries && listing.errors.is_empty() {
        bail!(
            "the source {} lists nothing, and the tree has entries: refusing to remove them all              (is the source mounted, the prefix right?). Remove the files by hand if the source              was emptied on purpose",
            crate::backend::object::redact_url(source)
        );
    }
    Ok(())
}

fn print(r: &SyncReport, opts: &SyncOptions) -> u8 {
    if !opts.quiet || opts.dry_run {
        for c in &r.changes {
            let verb = match c.kind {
                ChangeKind::Added => "add",
                ChangeKind::Updated => "update",
                ChangeKind::Removed => "remove",
            };
            println!("{verb} {}", crate::status::escape_path(&c.path));
        }
    }
    for s in r.skipped.iter().take(50) {
        eprintln!("skipped: {s}");
    }
    for c in &r.conflicts {
        eprintln!("conflict: {c}");
    }
    for e in &r.errors {
        eprintln!("error: {e}");
    }
    println!(
        "{}{} added, {} updated, {} removed, {} unchanged, {} conflicts{}",
        if opts.dry_run { "would be: " } else { "" },
        r.added,
        r.updated,
        r.removed,
        r.unchanged,
        r.conflicts.len(),
        if r.errors.is_empty() {
            String::new()
        } else {
            format!(", {} errors", r.errors.len())
        }
    );
    if !r.errors.is_empty() {
        2
    } else if !r.conflicts.is_empty() {
        1
    } else {
        0
    }
}

/// `hsm serve --sync-every DURATION`: run `hsm sync STORE` every `every`, as a child process
/// that reaches this daemon through its control socket like any other (a sync that fails is
/// logged, and tried again at the next period).
pub fn start_periodic(store: PathBuf, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("sync-every".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Ok(exe) = std::env::current_exe() else {
                tracing::warn!("periodic sync: cannot find the hsm executable");
                continue;
            };
            let status = std::process::Command::new(exe)
                .arg("sync")
                .arg("--quiet")
                .arg(&store)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .status();
            match status {
                Ok(s) if s.success() => tracing::info!("periodic sync done"),
                Ok(s) => tracing::warn!("periodic sync ended with {s} (see its lines above)"),
                Err(e) => tracing::warn!("periodic sync could not start: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no periodic sync: {e}");
    }
}

/// [`parse_every`] in whole seconds (what the command line keeps: small).
pub fn parse_every_secs(s: &str) -> Result<u32, String> {
    let d = parse_every(s)?;
    u32::try_from(d.as_secs()).map_err(|_| format!("{s:?}: too long a sync period"))
}

/// A duration as `--sync-every` takes it: `90s`, `10m`, `1h 30m`, or plain seconds.
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration (like 90s, 10m, 1h): {e}"))?,
    };
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: a sync period must be at least a second"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_every("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_every("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_every("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_every("0").is_err());
        assert!(parse_every("soon").is_err());
    }
}
