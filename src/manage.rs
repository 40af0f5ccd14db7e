//! `hsm hydrate`, `release`, `pin` and `unpin`: the operations ([`Operations`], the same code
//! in the daemon and in this process) and the command that runs them over files and directories.
//!
//! Through the daemon when it serves the store (its control socket, see `control`): it owns the
//! engine's cache, the ignore marks and the published ranges a release must withdraw. Without a
//! daemon, in this process, holding the store's lock, and through the guard's private view of
//! the store when a guard runs (so that nothing done here raises an event).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};

use crate::control::{Client, Done, Op, Reply, Service};
use crate::engine::{Engine, Need};
use crate::lifecycle::{self, Outcome, Releaser};
use crate::record::XATTR_SOURCE;
use crate::sys::fanotify::Group;
use crate::sys::fs as sysfs;

/// What carries out the operations on one store.
pub struct Operations {
    /// For hydrate and pin; release and unpin need none.
    pub engine: Option<Arc<Engine>>,
    /// The store's tree, through the daemon's (or the guard's) private view.
    pub tree: OwnedFd,
    /// The group whose ignore marks a release takes off.
    pub group: Option<Arc<Group>>,
    pub zero_pool: Option<File>,
    /// The cache limit's tally, told of releases.
    pub usage: Option<Arc<crate::evict::Usage>>,
}

impl Operations {
    /// Make the file complete; the bytes fetched for it.
    fn hydrate(&self, rel: &[u8]) -> anyhow::Result<u64> {
        let engine = self
            .engine
            .as_ref()
            .context("no fetch engine for this operation")?;
        let file = sysfs::open_beneath(self.tree.as_fd(), rel, libc::O_RDONLY)
            .context("cannot open it in the store")?;
        let st = sysfs::fstat(file.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || sysfs::fgetxattr(file.as_fd(), XATTR_SOURCE)?.is_none()
        {
            // Not a stub: its bytes are all here.
            return Ok(0);
        }
        let before = crate::record::present_on_disk(file.as_fd()).unwrap_or(0);
        engine.serve(file.as_fd(), Need::Whole)?;
        // Recorded by the engine's flush, with others (one `syncfs` for many files): a crash
        // before it costs a refetch, never a wrong byte.
        Ok(st.st_size as u64 - before.min(st.st_size as u64))
    }

    fn release(&self, rel: &[u8]) -> anyhow::Result<Outcome> {
        let forget =
            |fd: std::os::fd::BorrowedFd<'_>| self.engine.as_ref().is_none_or(|e| e.forget(fd));
        let outcome = Releaser {
            group: self.group.as_deref(),
            published: self.engine.as_ref().and_then(|e| e.published()),
            zero_pool: self.zero_pool.as_ref(),
            forget: &forget,
        }
        .release(self.tree.as_fd(), rel)?;
        if let (Outcome::Released { .. }, Some(usage)) = (&outcome, &self.usage) {
            if let Ok(f) =
                sysfs::open_beneath(self.tree.as_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK)
            {
                usage.filled(f.as_fd(), 0);
            }
        }
        Ok(outcome)
    }

    fn set_pinned(&self, rel: &[u8], pinned: bool) -> anyhow::Result<()> {
        let file = sysfs::open_beneath(self.tree.as_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK)
            .context("cannot open it in the store")?;
        lifecycle::set_pinned(file.as_fd(), pinned)
    }
}

impl Service for Operations {
    fn run(&self, op: Op, rel: &[u8]) -> Reply {
        let done = match op {
            Op::Hydrate => self.hydrate(rel).map(|fetched| Done::Hydrated { fetched }),
            Op::Release => self.release(rel).map(|outcome| match outcome {
                Outcome::Released { bytes } => Done::Released { bytes },
                Outcome::AlreadyStub => Done::AlreadyStub,
                Outcome::Refused(why) => Done::Refused {
                    reason: why.to_string(),
                },
            }),
            // Pinned first: a release racing the hydrate is refused from then on.
            Op::Pin => self
                .set_pinned(rel, true)
                .and_then(|()| self.hydrate(rel))
                .map(|fetched| Done::Pinned { fetched }),
            Op::Unpin => self.set_pinned(rel, false).map(|()| Done::Unpinned),
            Op::Flush => {
                if let Some(engine) = &self.engine {
                    engine.flush(true);
                }
                Ok(Done::Flushed)
            }
            Op::Stats => self
                .engine
                .as_ref()
                .context("no fetch engine here: stats come from a running daemon")
                .map(|engine| {
                    Done::Stats(Box::new(crate::stats::gather(engine, self.tree.as_fd())))
                }),
            Op::Sync => {
                // An inode sync replaces or removes: the engine lets go of it, and the cache
                // limit no longer counts it.
                let forget = |fd: std::os::fd::BorrowedFd<'_>| {
                    if let Some(engine) = &self.engine {
                        engine.forget(fd);
                    }
                    if let Some(usage) = &self.usage {
                        usage.filled(fd, 0);
                    }
                };
                crate::sync::serve_request(self.tree.as_fd(), &forget, rel)
                    .map(|report| Done::Synced { report })
            }
            Op::WriteAccessList | Op::PrefetchList => {
                Err(anyhow::anyhow!("not served here (see access_list)"))
            }
        };
        done.map_err(|e| format!("{e:#}"))
    }
}

/// One file to work on: as the user named it, its path in the tree, its size.
struct Item {
    shown: PathBuf,
    rel: Vec<u8>,
    size: u64,
}

/// The regular files at `path` (itself, or below it), `rel` being its place in the tree.
fn expand(path: &Path, rel: &Path, out: &mut Vec<Item>) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let md = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if md.is_file() {
        out.push(Item {
            shown: path.to_path_buf(),
            rel: rel.as_os_str().as_bytes().to_vec(),
            size: md.len(),
        });
    } else if md.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            expand(&e.path(), &rel.join(e.file_name()), out)?;
        }
    }
    // Symlinks and special files have no content to move.
    Ok(())
}

/// Run `op` over `paths`; `Ok(false)` when some file was refused or failed (each is named on
/// stderr, with why).
pub fn run(op: Op, paths: &[PathBuf], threads: usize) -> anyhow::Result<bool> {
    // By daemon (its socket name) or, with none serving, by store.
    let mut served: BTreeMap<String, (Client, Vec<Item>)> = BTreeMap::new();
    let mut stores: BTreeMap<PathBuf, Vec<Item>> = BTreeMap::new();
    for p in paths {
        if let Some((client, rel)) = Client::find(p)? {
            let name = client.name();
            let items = &mut served.entry(name).or_insert_with(|| (client, Vec::new())).1;
            expand(p, &rel, items)?;
            continue;
        }
        let Some((store, rel)) = crate::verify::locate(p) else {
            bail!(
                "{} is neither under the mount point of a running `hsm serve` nor under a \
                 store's tree (STORE/tree){}",
                p.display(),
                if sysfs::has_cap_sys_admin() {
                    ""
                } else {
                    " that you may read: without a daemon, run this as root"
                }
            );
        };
        expand(p, &rel, stores.entry(store).or_default())?;
    }
    let mut all_ok = true;
    for (_, (client, items)) in served {
        all_ok &= run_items(op, &Reach::Daemon(client), &items, threads.max(1));
    }
    for (store, items) in stores {
        let reach = here(op, &store)?;
        all_ok &= run_items(op, &reach.0, &items, threads.max(1));
    }
    Ok(all_ok)
}

fn verb(op: Op) -> &'static str {
    match op {
        Op::Hydrate => "hydrate",
        Op::Release => "release",
        Op::Pin => "pin",
        Op::Unpin => "unpin",
        Op::Flush => "flush",
        Op::Stats => "stats",
        Op::Sync => "sync",
        Op::WriteAccessList => "record",
        Op::PrefetchList => "hydrate --list",
    }
}

/// The operations on `store` in this process (no daemon serves it), and what must be held
/// while they run (`hsm hydrate --list`, see `access_list`).
pub fn operations_here(op: Op, store: &Path) -> anyhow::Result<(Arc<Operations>, impl Sized)> {
    match here(op, store)? {
        (Reach::Here(ops), held) => Ok((ops, held)),
        (Reach::Daemon(_), _) => bail!(
            "a daemon has just started serving {}: run the command again",
            store.display()
        ),
    }
}

/// A way to reach the store: one connection per thread to the daemon, or this process.
enum Reach {
    Daemon(Client),
    Here(Arc<Operations>),
}

/// The store worked on in this process: what must be held while it is.
struct Here {
    _lock: crate::store::StoreLock,
    _view: Option<crate::guard::PrivateView>,
}

/// Set up to work on `store` in this process (no daemon serves it); or through the daemon that
/// was starting (see `Store::lock_unless_served`), with nothing held.
fn here(op: Op, store: &Path) -> anyhow::Result<(Reach, Option<Here>)> {
    if !sysfs::has_cap_sys_admin() {
        bail!("hsm {} changes the store: run it as root", verb(op));
    }
    let group = crate::guard::group_for_tools(store)?;
    let view = match &group {
        Some(g) => Some(crate::guard::PrivateView::new(g, store)?),
        None => None,
    };
    let root = view
        .as_ref()
        .map_or(store.to_path_buf(), |v| v.root().to_path_buf());
    let st = crate::store::Store::open(&root)
        .with_context(|| format!("cannot open the store {}", store.display()))?;
    let lock = match st.lock_unless_served(&format!("hsm {}", verb(op)), &store.join("tree"))? {
        crate::store::Worker::Here(lock) => lock,
        // A daemon that was starting serves the store now.
        crate::store::Worker::Daemon(client) => return Ok((Reach::Daemon(client), None)),
    };
    let tree = || -> anyhow::Result<OwnedFd> {
        Ok(OwnedFd::from(File::open(st.tree()).with_context(|| {
            format!("cannot open {}", st.tree().display())
        })?))
    };
    let engine = if matches!(op, Op::Hydrate | Op::Pin) {
        let backend = crate::worker::open_backend(&st, crate::defaults::FETCH_USER)?;
        let metrics =
            crate::sys::shm::Shared::<crate::metrics::Metrics>::create(c"hsm-manage-metrics")?;
        Some(Arc::new(Engine::new(
            backend,
            metrics,
            None,
            crate::defaults::READAHEAD,
            crate::defaults::secs(crate::defaults::FETCH_DEADLINE_SECS),
            crate::engine::StoreAccess::of(&st, Some(tree()?)),
        )))
    } else {
        None
    };
    let ops = Operations {
        engine,
        tree: tree()?,
        group: group.map(Arc::new),
        zero_pool: st.zero_pool().ok(),
        usage: None,
    };
    Ok((
        Reach::Here(Arc::new(ops)),
        Some(Here {
            _lock: lock,
            _view: view,
        }),
    ))
}

/// Work through `items` on `threads` threads; whether all went well.
fn run_items(op: Op, reach: &Reach, items: &[Item], threads: usize) -> bool {
    let bytes_op = matches!(op, Op::Hydrate | Op::Pin);
    let total: u64 = if bytes_op {
        items.iter().map(|i| i.size).sum()
    } else {
        items.len() as u64
    };
    let bar = progress_bar(total, bytes_op);
    let next = AtomicUsize::new(0);
    let done_files = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<Done, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()).max(1) {
            s.spawn(|| {
                let mut client = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let reply: Reply = match reach {
                        Reach::Daemon(first) => {
                            if client.is_none() {
                                client = first.again().ok();
                            }
                            match client.as_mut() {
                                Some(c) => c.call(op, &item.rel).unwrap_or_else(|e| {
                                    client = None;
                                    Err(format!("{e:#}"))
                                }),
                                None => Err("the daemon's control socket stopped answering".into()),
                            }
                        }
                        Reach::Here(ops) => ops.run(op, &item.rel),
                    };
                    bar.inc(if bytes_op { item.size } else { 1 });
                    if bytes_op {
                        let n = done_files.fetch_add(1, Ordering::Relaxed) + 1;
                        bar.set_message(format!("{n}/{} files", items.len()));
                    }
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, reply));
                }
            });
        }
    });
    bar.finish_and_clear();
    // What was filled is recorded before this returns: `hsm status` says complete.
    match reach {
        Reach::Here(ops) => {
            if let Some(engine) = &ops.engine {
                engine.flush(true);
            }
        }
        Reach::Daemon(first) if bytes_op => {
            let flushed = first.again().and_then(|mut c| c.call(Op::Flush, b""));
            if !matches!(flushed, Ok(Ok(Done::Flushed))) {
                eprintln!(
                    "hsm {}: the daemon did not write its records: {flushed:?}",
                    verb(op)
                );
            }
        }
        Reach::Daemon(_) => {}
    }
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);
    report(op, items, &results)
}

fn progress_bar(total: u64, bytes: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let template = if bytes {
        "{bar:30} {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}"
    } else {
        "{bar:30} {pos}/{len} files {per_sec} ETA {eta}"
    };
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

fn report(op: Op, items: &[Item], results: &[(usize, Result<Done, String>)]) -> bool {
    let (mut done, mut refused, mut failed, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    for (i, r) in results {
        let shown = items[*i].shown.display();
        match r {
            Ok(Done::Refused { reason }) => {
                refused += 1;
                eprintln!("hsm {}: {shown}: refused: {reason}", verb(op));
            }
            Ok(d) => {
                done += 1;
                bytes += match d {
                    Done::Hydrated { fetched } | Done::Pinned { fetched } => *fetched,
                    Done::Released { bytes } => *bytes,
                    _ => 0,
                };
            }
            Err(e) => {
                failed += 1;
                eprintln!("hsm {}: {shown}: {e}", verb(op));
            }
        }
    }
    let what = match op {
        Op::Hydrate => format!("{done} files complete, {} fetched", mib(bytes)),
        Op::Release => format!("{done} files released, {} given back", mib(bytes)),
        Op::Pin => format!("{done} files pinned, {} fetched", mib(bytes)),
        Op::Unpin => format!("{done} files unpinned"),
        Op::Stats => format!("{done} answered"),
        Op::Sync => format!("{done} synced"),
        Op::Flush | Op::WriteAccessList | Op::PrefetchList => format!("{done} done"),
    };
    let mut line = what;
    if refused > 0 {
        line += &format!(", {refused} refused");
    }
    if failed > 0 {
        line += &format!(", {failed} failed");
    }
    println!("{line}");
    refused == 0 && failed == 0
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
