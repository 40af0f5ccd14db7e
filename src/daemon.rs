//! `hsm serve`: expose a store's tree at a mount point and answer its pre-content events.
//!
//! Threads: one reads events in batches and hands each, owned, to a pool of workers; workers run
//! the fetch engine and answer; a flusher persists records and metrics; readahead threads fetch
//! ahead of sequential readers. One slow fetch holds one worker, never the reader.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{error, info, warn};

use crate::engine::{Engine, Need, Served};
use crate::event::PendingEvent;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::sys::fanotify::{
    DenyErrno, Group, Verdict, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FAN_PRE_ACCESS,
};
use crate::sys::{fs as sysfs, mount};

/// Events the mount mark asks for, and that an ignore mark silences on a complete file.
const MASK: u64 = FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub workers: usize,
    pub readahead: u64,
    pub flush_interval: Duration,
    /// After a stop is asked for, keep serving files that are still open for this long.
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            workers: 16,
            readahead: 8 << 20,
            flush_interval: Duration::from_millis(500),
            drain: Duration::from_secs(2),
        }
    }
}

/// Opens for exec seen, by (pid, dev, ino): the open event that follows one is not a plain open.
type ExecOpens = Mutex<HashMap<(i32, u64, u64), Instant>>;

struct Ctx {
    engine: Arc<Engine>,
    group: Arc<Group>,
    exec_opens: ExecOpens,
}

/// Explain a failed fanotify setup in terms of what the user can do.
fn explain_fanotify(e: std::io::Error, what: &str, path: &Path) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) => anyhow::anyhow!(
            "{what}: permission denied; hsm serve needs CAP_SYS_ADMIN (run it as root)"
        ),
        Some(libc::EINVAL) => anyhow::anyhow!(
            "{what}: this kernel has no fanotify pre-content events (FAN_PRE_ACCESS); \
             hsm needs Linux 6.14 or later built with CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => anyhow::anyhow!(
            "{what}: the filesystem of {} does not support pre-content events; use ext4, xfs or btrfs",
            path.display()
        ),
        _ => anyhow::anyhow!("{what}: {e}"),
    }
}

pub fn serve(store_root: &Path, mountpoint: &Path, opts: ServeOptions) -> anyhow::Result<()> {
    if !sysfs::has_cap_sys_admin() {
        bail!("hsm serve needs CAP_SYS_ADMIN to watch pre-content events: run it as root");
    }
    let store = Store::open(store_root)?;
    store.check_private()?;
    let tree = store.tree();
    let group = Group::new().map_err(|e| explain_fanotify(e, "fanotify_init", &tree))?;
    group
        .probe_pre_content(&tree)
        .map_err(|e| explain_fanotify(e, "pre-content mark", &tree))?;
    let group = Arc::new(group);
    let backend = crate::backend::open(&store.config.source)?;
    raise_fd_limit();

    let mountpoint = prepare_mountpoint(mountpoint, &tree)?;
    let exposure = Exposure::attach(&group, &tree, &mountpoint)?;

    let engine = Arc::new(Engine::new(backend.clone(), opts.readahead));
    engine.start_readahead(2);
    let ctx = Arc::new(Ctx {
        engine: engine.clone(),
        group: group.clone(),
        exec_opens: Mutex::new(HashMap::new()),
    });

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }

    let (tx, rx) = crossbeam_channel::unbounded::<PendingEvent>();
    let workers: Vec<_> = (0..opts.workers.max(1))
        .map(|_| {
            let rx = rx.clone();
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                for ev in rx {
                    handle(&ctx, ev);
                }
            })
        })
        .collect();
    let flusher_stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let engine = engine.clone();
        let metrics_path = store.metrics_path();
        let done = flusher_stop.clone();
        let interval = opts.flush_interval;
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                engine.flush();
                write_metrics(&engine.metrics, &metrics_path);
            }
        })
    };

    info!(
        store = %store.root.display(),
        mountpoint = %mountpoint.display(),
        source = %backend.describe(),
        "serving"
    );
    println!("ready");
    let _ = std::io::stdout().flush();

    let mut buf = vec![0u8; 64 * 1024];
    let mut raw = Vec::with_capacity(256);
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            // No new path leads to the stubs from here on; files still open keep being served
            // for the drain period.
            exposure.detach();
            drain_until = Some(Instant::now() + opts.drain);
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if !wait_readable(group.as_fd().as_raw_fd(), 200) {
            continue;
        }
        raw.clear();
        if let Err(e) = group.read_events(&mut buf, &mut raw) {
            error!("reading fanotify events failed: {e}");
            continue;
        }
        for r in raw.drain(..) {
            let Some(ev) = PendingEvent::new(group.clone(), r) else {
                continue;
            };
            if ev.mask & FAN_OPEN_EXEC_PERM != 0 {
                // Answered inline: the plain open event of this exec comes only after this answer.
                note_exec_open(&ctx, ev);
            } else if tx.send(ev).is_err() {
                break;
            }
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    engine.stop_readahead();
    flusher_stop.store(true, Ordering::Relaxed);
    let _ = flusher.join();
    engine.flush();
    write_metrics(&engine.metrics, &store.metrics_path());
    let m = engine.metrics.snapshot();
    info!(
        events = m.events_pre_access + m.events_open,
        fetched_bytes = m.fetched_bytes,
        backend_reads = m.backend_reads,
        files_completed = m.files_completed,
        denied = m.denied,
        "stopped"
    );
    Ok(())
}

fn handle(ctx: &Ctx, ev: PendingEvent) {
    let metrics = &ctx.engine.metrics;
    let need = if ev.mask & FAN_PRE_ACCESS != 0 {
        Metrics::add(&metrics.events_pre_access, 1);
        let (offset, count) = ev.range.unwrap_or((0, 0));
        Need::Range { offset, count }
    } else {
        Metrics::add(&metrics.events_open, 1);
        if is_exec_open(ctx, &ev) {
            // An exec maps what it needs, range by range: nothing to fetch at open.
            Metrics::add(&metrics.allowed, 1);
            ev.answer(Verdict::Allow);
            return;
        }
        Need::Open
    };
    // A panic in a fetch fails this access (the event's Drop denies it), never the daemon.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.engine.serve(ev.as_fd(), need)
    }));
    match result {
        Ok(Ok(served)) => {
            if served == Served::Complete {
                match ctx.group.ignore_inode(ev.as_fd(), MASK) {
                    Ok(()) => Metrics::add(&metrics.ignore_marks, 1),
                    Err(e) => warn!("ignore mark failed: {e}"),
                }
            }
            Metrics::add(&metrics.allowed, 1);
            ev.answer(Verdict::Allow);
        }
        Ok(Err(e)) => {
            Metrics::add(&metrics.denied, 1);
            ev.answer(Verdict::Deny(DenyErrno::for_error(&e)));
        }
        Err(_) => {
            Metrics::add(&metrics.denied, 1);
            error!("a fetch panicked; the access was denied with EIO");
        }
    }
}

fn file_key(ev: &PendingEvent) -> Option<(u64, u64)> {
    sysfs::fstat(ev.as_fd())
        .ok()
        .map(|st| (st.st_dev, st.st_ino))
}

fn note_exec_open(ctx: &Ctx, ev: PendingEvent) {
    Metrics::add(&ctx.engine.metrics.events_open, 1);
    if let Some((dev, ino)) = file_key(&ev) {
        let mut m = ctx.exec_opens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, t| now.duration_since(*t) < Duration::from_secs(30));
        m.insert((ev.pid, dev, ino), now);
    }
    Metrics::add(&ctx.engine.metrics.allowed, 1);
    ev.answer(Verdict::Allow);
}

fn is_exec_open(ctx: &Ctx, ev: &PendingEvent) -> bool {
    let Some((dev, ino)) = file_key(ev) else {
        return false;
    };
    let mut m = ctx.exec_opens.lock().unwrap_or_else(|p| p.into_inner());
    m.remove(&(ev.pid, dev, ino)).is_some()
}

fn wait_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

fn write_metrics(metrics: &Metrics, path: &Path) {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(&metrics.snapshot()).unwrap_or_default();
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn raise_fd_limit() {
    // Every event and every cached file holds an fd.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Make sure MOUNTPOINT exists and nothing but a stale exposure of this very tree is mounted
/// there (left by a daemon that was killed: it would serve zeros, so it is removed).
fn prepare_mountpoint(mountpoint: &Path, tree: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create mount point {}", mountpoint.display()))?;
    let mp = mountpoint.canonicalize()?;
    let tree_md = std::fs::metadata(tree)?;
    for _ in 0..8 {
        if !mount::is_mount_point(&mp)? {
            return Ok(mp);
        }
        let md = std::fs::metadata(&mp)?;
        use std::os::unix::fs::MetadataExt;
        let ours = md.dev() == tree_md.dev() && md.ino() == tree_md.ino();
        let empty_self_bind = std::fs::read_dir(&mp)?.next().is_none();
        if !ours && !empty_self_bind {
            bail!(
                "{} is already a mount point of something else; unmount it or choose another",
                mp.display()
            );
        }
        warn!(mountpoint = %mp.display(), "removing a stale mount left by an earlier hsm serve");
        mount::detach(&mp)?;
    }
    bail!("could not clear the mounts stacked at {}", mp.display())
}

/// The tree mounted at MOUNTPOINT, marked before it became reachable.
struct Exposure {
    mountpoint: PathBuf,
    attached: AtomicBool,
}

impl Exposure {
    fn attach(group: &Group, tree: &Path, mountpoint: &Path) -> anyhow::Result<Exposure> {
        let clone =
            mount::clone_tree(tree).context("cannot clone the store's tree for mounting")?;
        group
            .mark_mount(clone.as_fd(), MASK)
            .map_err(|e| explain_fanotify(e, "fanotify mount mark", tree))?;
        mount::bind_self_private(mountpoint)
            .with_context(|| format!("cannot prepare mount point {}", mountpoint.display()))?;
        let exposure = Exposure {
            mountpoint: mountpoint.to_path_buf(),
            attached: AtomicBool::new(true),
        };
        mount::attach(clone.as_fd(), mountpoint)
            .with_context(|| format!("cannot mount the tree at {}", mountpoint.display()))?;
        Ok(exposure)
    }

    fn detach(&self) {
        if self.attached.swap(false, Ordering::Relaxed) {
            // The tree, then the private self-bind under it.
            for _ in 0..2 {
                if let Err(e) = mount::detach(&self.mountpoint) {
                    warn!(mountpoint = %self.mountpoint.display(), "unmount failed: {e}");
                }
            }
        }
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        self.detach();
    }
}
