//! `hsm serve`: the supervisor process.
//!
//! It owns what must not die with a fetch: the fanotify group, the mount that exposes the tree,
//! and every event not yet answered. It fetches nothing: it reads events, answers those on
//! complete files itself (their state record, one xattr, says so: no round trip to the worker for
//! a hydrated tree), and passes every other one (with its fd) to the worker process. The worker
//! answers the kernel itself, so that a reader never waits for the supervisor to wake, and then
//! replies; the supervisor holds the event (and its fd number) until that reply. It polls briefly
//! before sleeping (see `ipc::SPIN`). When the worker dies (a crash, `kill -9`, an OOM kill), the
//! supervisor starts another and sends it every event it still holds: readers wait a little
//! longer and then get the right bytes (an event answered just before the crash is answered
//! twice, and the kernel ignores the second answer: its fd number was still held).
//!
//! The group comes from the store's guard (see `guard`), which holds it whenever no daemon
//! does; it marks the store's whole filesystem, and this process and the worker reach the store
//! only through their private, ignore-marked view of it. If the supervisor dies, the worker
//! answers what it holds and exits, and the guard takes over.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{debug, error, info, warn};

use crate::defaults;
use crate::event::{respond_to_group, GroupResponder, MASK};
use crate::guard::{self, PrivateView, EVENT_FD_LIMIT};
use crate::metrics::{Metrics, Outcome};
use crate::owed::{Owed, MAX_IN_FLIGHT};
use crate::protocol::{EventMsg, ReplyMsg, CONTROL_ID, NOTE_ID, REPLY_LEN};
use crate::published::{FileId, PublishedRanges};
use crate::record::complete_on_disk;
use crate::store::Store;
use crate::sys::fanotify::{DenyErrno, Group, Verdict, FAN_PRE_ACCESS};
use crate::sys::shm::Shared;
use crate::sys::{fs as sysfs, ipc, mount};
use crate::worker::WorkerOptions;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub worker: WorkerOptions,
    /// How long already-open files are still served after a stop is asked for.
    pub drain: Duration,
    /// Mount over a mount point that is not empty.
    pub nonempty: bool,
    /// Serve Prometheus metrics here (see `exporter`; checked to be loopback by the caller).
    pub metrics: Option<std::net::SocketAddr>,
    /// Run `hsm sync` of the store this often (see `sync::start_periodic`).
    pub sync_every: Option<Duration>,
}

impl ServeOptions {
    /// An event the worker has not answered in this long is denied with EAGAIN by the
    /// supervisor: the fetch deadline plus [`defaults::EVENT_DEADLINE_MARGIN`].
    pub fn event_deadline(&self) -> Duration {
        self.worker.fetch_deadline + defaults::EVENT_DEADLINE_MARGIN
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            worker: WorkerOptions {
                threads: defaults::THREADS,
                readahead: defaults::READAHEAD,
                dir_prefetch: defaults::DIR_PREFETCH,
                fetch_deadline: defaults::secs(defaults::FETCH_DEADLINE_SECS),
                fetch_user: defaults::FETCH_USER.into(),
                control_group: None,
                cache_limit: None,
                policy: Default::default(),
                record_access: None,
                prefetch_lists: Vec::new(),
                prefetch_on_first_open: false,
            },
            drain: defaults::secs(defaults::DRAIN_SECS),
            nonempty: false,
            metrics: None,
            sync_every: None,
        }
    }
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

struct WorkerProc {
    child: Child,
    sock: OwnedFd,
    ready: bool,
}

pub fn serve(store_root: &Path, mountpoint: &Path, opts: ServeOptions) -> anyhow::Result<()> {
    if !sysfs::has_cap_sys_admin() {
        bail!("hsm serve needs CAP_SYS_ADMIN to watch pre-content events: run it as root");
    }
    let store_root = store_root
        .canonicalize()
        .with_context(|| format!("cannot find the store {}", store_root.display()))?;
    // Nothing of the store is opened by its plain path: a group kept by systemd's fd store,
    // with its marks and no reader yet, would hold such an open until this very process reads
    // it. Stats raise no event.
    Store::check_exists(&store_root)?;
    Store::check_private_at(&store_root)?;
    let tree = store_root.join("tree");
    // A throw-away group, so that a kernel or filesystem without pre-content events fails here,
    // before a guard is started.
    Group::new()
        .map_err(|e| explain_fanotify(e, "fanotify_init", &tree))?
        .probe_pre_content(&tree)
        .map_err(|e| explain_fanotify(e, "pre-content mark", &tree))?;
    let attachment = guard::attach_daemon(&store_root)?;
    let group = attachment.group;
    // From here on, the daemon reads and writes the store only through its private view, which
    // the group ignores: with the filesystem marked, any other path would wait on this process.
    // Under systemd, the group is kept in its fd store too: if the guard is ever killed (a
    // `systemctl kill`, an OOM kill), the marks stay and accesses wait for the next start.
    if let Err(e) = ipc::sd_notify(
        &format!("FDSTORE=1\nFDNAME={}", guard::FDSTORE_NAME),
        Some(group.as_fd()),
    ) {
        warn!("cannot keep the group in the service manager's fd store: {e}");
    }
    let view = PrivateView::new(&group, &store_root)?;
    let store = Store::open(view.root())
        .with_context(|| format!("cannot open the store {}", store_root.display()))?;
    // Held while this runs: `hsm hydrate` and the like, run without a daemon, take it too.
    let _lock = match store.try_lock("hsm serve")? {
        Ok(lock) => lock,
        Err(holder) => bail!(
            "the store {} is in use by {holder}; start hsm serve when it is done",
            store_root.display()
        ),
    };
    group
        .mark_filesystem(view.as_fd(), MASK)
        .map_err(|e| explain_fanotify(e, "fanotify filesystem mark", &tree))?;
    let _ = std::fs::write(
        view.root().join(".hsm/guard.pid"),
        attachment.guard_pid.to_string(),
    );
    raise_fd_limit();

    let (mountpoint, created_mountpoint) = prepare_mountpoint(mountpoint, &tree, opts.nonempty)?;
    let metrics =
        Shared::<Metrics>::create(c"hsm-metrics").context("cannot create the counters")?;
    let published = Shared::<PublishedRanges>::create(c"hsm-published")
        .context("cannot create the published ranges")?;
    if let Some(addr) = opts.metrics {
        let backend = match crate::backend::scheme_of(&store.config.source) {
            crate::backend::Scheme::Local => "local",
            crate::backend::Scheme::S3 => "s3",
            crate::backend::Scheme::Gcs => "gcs",
            crate::backend::Scheme::Azure => "azure",
            crate::backend::Scheme::Http => "http",
        };
        crate::exporter::start(addr, &metrics, backend, view.root().join("tree"))?;
    }
    let spawn = || {
        let inherited = [
            metrics.fd(),
            published.fd(),
            view.as_fd(),
            attachment.conn.as_fd(),
        ];
        spawn_worker(&store_root, &mountpoint, &group, inherited, &opts.worker)
    };
    // The first worker must come up before anything is exposed: a broken backend or store is an
    // error at start, not at the first read.
    let mut worker = spawn()?;
    wait_ready(&mut worker)?;
    let exposure = Exposure::attach(&tree, &mountpoint)?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    // SIGHUP: re-read the credentials (the worker does, see `worker::reload_credentials`).
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    info!(store = %store_root.display(), mountpoint = %mountpoint.display(), source = %store.config.source, "serving");
    println!("ready");
    if let Some(every) = opts.sync_every {
        crate::sync::start_periodic(store_root.to_path_buf(), every);
    }
    let _ = ipc::sd_notify("READY=1", None);
    let watchdog = watchdog_interval();
    let mut watchdog_at = Instant::now();
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let responder = GroupResponder(&group);
    // Every event passed on is owned here until the worker lets go of it; whatever way this
    // function is left, what is still held is denied (see `owed`).
    let mut owed = Owed::new(&responder, MAX_IN_FLIGHT);
    let mut next_id: u64 = 1;
    let mut buf = vec![0u8; 64 * 1024];
    let mut raw = Vec::with_capacity(256);
    let mut drain_until: Option<Instant> = None;
    let mut restarts: Vec<Instant> = Vec::new();
    let mut busy_at = Instant::now();
    // The worker's directory prefetch wants to hear of opens answered here.
    // So does the cache limit, which counts every open as a use (see `evict`).
    let notes = crate::prefetch::enabled(opts.worker.dir_prefetch)
            || opts.worker.cache_limit.is_some()
            // The access recorder sees opens of complete files, the lists' hits count them.
            || opts.worker.record_access.is_some()
            || !opts.worker.prefetch_lists.is_empty();
    if opts.worker.cache_limit.is_some() {
        crate::event::ignore_only_accesses();
    }
    let mut at_limit_since: Option<Instant> = None;
    loop {
        if watchdog.is_some_and(|every| watchdog_at.elapsed() >= every) {
            // The loop turns at least every 200 ms while it is healthy.
            let _ = ipc::sd_notify("WATCHDOG=1", None);
            watchdog_at = Instant::now();
        }
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            let _ = ipc::sd_notify("STOPPING=1", None);
            // No new path leads to the stubs from here on; files still open are served for the
            // drain period.
            exposure.detach();
            drain_until = Some(Instant::now() + opts.drain);
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        // A worker still starting reads the credentials anew anyway: kept for when it is up.
        if worker.ready && reload.swap(false, Ordering::Relaxed) {
            info!("SIGHUP: the worker re-reads the source's credentials");
            if let Err(e) = crate::sys::process::kill(worker.child.id() as i32, libc::SIGHUP) {
                warn!("cannot pass SIGHUP on to the worker: {e}");
            }
        }
        // Nothing here blocks: the group is read only while fewer than MAX_IN_FLIGHT events are
        // held (the kernel queues the rest), events go to the worker as its socket takes them,
        // and its replies are read every turn, so the deadline below always runs.
        let read_group = owed.has_room();
        match (read_group, at_limit_since) {
            (false, None) => {
                warn!(
                    held = owed.len(),
                    "{MAX_IN_FLIGHT} accesses in flight: new events wait in the kernel"
                );
                at_limit_since = Some(Instant::now());
            }
            (true, Some(since)) => {
                info!(waited = ?since.elapsed(), "below the in-flight limit again");
                at_limit_since = None;
            }
            _ => {}
        }
        let interests = [
            ipc::Interest {
                fd: group.as_fd(),
                read: read_group,
                write: false,
            },
            ipc::Interest {
                fd: worker.sock.as_fd(),
                read: true,
                write: worker.ready && owed.has_unsent(),
            },
        ];
        // Awake briefly after an event or an answer (see `ipc::SPIN`).
        let ready = match ipc::poll_spinning(&interests, busy_at, 200) {
            Ok(r) => r,
            Err(e) => {
                // Not expected (EINVAL, ENOMEM): stop serving; what is held is denied below.
                error!("polling the group and the worker failed: {e}; stopping");
                break;
            }
        };
        if ready.iter().any(|r| r.readable || r.writable) {
            busy_at = Instant::now();
        }
        if ready[0].readable {
            raw.clear();
            match group.read_events(&mut buf, &mut raw) {
                Ok(_) => {}
                Err(e) => error!("reading fanotify events failed: {e}"),
            }
            for crate::sys::fanotify::Event { raw: r, fd } in raw.drain(..) {
                let msg = EventMsg {
                    id: next_id,
                    fd_num: r.fd,
                    pid: r.pid,
                    mask: r.mask,
                    range: r.range,
                };
                next_id += 1;
                // Opens of complete files (the whole tree, once hydrated) are answered here,
                // without a round trip through the worker: this is what every file costs after a
                // restart or once the kernel has evicted its ignore mark. Accesses are not
                // checked: a complete file's ignore mark silences them, so nearly all come from
                // files being filled, and the xattr read would be wasted on each.
                if r.mask & FAN_PRE_ACCESS == 0 && complete_on_disk(fd.as_fd()) {
                    Metrics::add(&metrics.events_open, 1);
                    metrics.answered(r.mask, Outcome::Allowed);
                    Metrics::add(&metrics.ignore_marks, 1);
                    respond_to_group(&group, r.fd, fd.as_fd(), Verdict::Allow, true);
                    if notes && worker.ready {
                        // After the answer; dropped rather than waited for if the worker lags.
                        let note = EventMsg { id: NOTE_ID, ..msg };
                        let _ =
                            ipc::try_send(worker.sock.as_fd(), &note.encode(), Some(fd.as_fd()));
                    }
                    continue;
                }
                // Accesses inside a range the worker has written and published: answered here,
                // the worker told after the answer (it keeps the readahead going). This is most
                // of a sequential reader's events.
                if let (true, Some((offset, count))) = (r.mask & FAN_PRE_ACCESS != 0, r.range) {
                    let inside = FileId::of(fd.as_fd())
                        .is_some_and(|id| published.covers(&id, offset, count));
                    if inside {
                        Metrics::add(&metrics.events_pre_access, 1);
                        metrics.answered(r.mask, Outcome::Allowed);
                        Metrics::add(&metrics.answered_published, 1);
                        respond_to_group(&group, r.fd, fd.as_fd(), Verdict::Allow, false);
                        if worker.ready {
                            let note = EventMsg { id: NOTE_ID, ..msg };
                            let _ = ipc::try_send(
                                worker.sock.as_fd(),
                                &note.encode(),
                                Some(fd.as_fd()),
                            );
                        }
                        continue;
                    }
                }
                // Files that are not stubs (the filesystem mark covers every file of it): allowed
                // and silenced at their first event. Asked after the published
                // check, so that a sequential reader's accesses pay no extra xattr read.
                if !crate::record::is_stub(fd.as_fd()) {
                    metrics.answered(r.mask, Outcome::Allowed);
                    Metrics::add(&metrics.ignore_marks, 1);
                    respond_to_group(&group, r.fd, fd.as_fd(), Verdict::Allow, true);
                    continue;
                }
                // The worker's lines for this event carry the same span (see `worker::dispatch`);
                // made only when it is logged, off the path of every event.
                if tracing::enabled!(tracing::Level::DEBUG) {
                    debug!(parent: &crate::event_span(msg.id), pid = msg.pid, mask = msg.mask,
                        range = ?msg.range, "held; passed to the worker");
                }
                owed.hold(fd, msg, Instant::now());
            }
        }
        if ready[1].readable {
            // Every reply waiting, so that a worker sending replies never waits on this loop for
            // long (a bound per turn keeps the group and the deadline going under a flood).
            let mut worker_gone = false;
            for _ in 0..4096 {
                let mut rbuf = [0u8; 32];
                match ipc::try_recv(worker.sock.as_fd(), &mut rbuf) {
                    Ok(None) => break,
                    Ok(Some((n, _))) if n > 0 => match ReplyMsg::decode(&rbuf[..n]) {
                        Some(reply) if reply.id == CONTROL_ID => {
                            worker.ready = true;
                            owed.start_over();
                        }
                        // Answered by the worker already: close our copy.
                        Some(reply) => owed.release(reply.id),
                        None => {
                            error!(
                                "malformed reply from the worker ({n} bytes, expected {REPLY_LEN})"
                            )
                        }
                    },
                    _ => {
                        worker_gone = true;
                        break;
                    }
                }
            }
            if worker_gone {
                // The worker is gone: reap it, start another, resend what it held.
                let status = reap(&mut worker.child);
                warn!(status = %status, held = owed.len(), "worker died; starting another");
                owed.start_over();
                restarts.retain(|t| t.elapsed() < Duration::from_secs(10));
                restarts.push(Instant::now());
                if restarts.len() > 5 {
                    // Crashing in a loop (an event that kills every worker, say): fail what
                    // is waiting rather than hang it.
                    error!(
                        denied = owed.len(),
                        "the worker keeps dying: denying the waiting accesses with EIO"
                    );
                    owed.deny_all(DenyErrno::Io);
                    std::thread::sleep(Duration::from_millis(200));
                }
                worker = loop {
                    match spawn() {
                        Ok(w) => break w,
                        Err(e) => {
                            error!("cannot start a worker: {e:#}");
                            owed.deny_all(DenyErrno::Io);
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                };
            }
        }
        if worker.ready {
            // A failed send means the worker is dying: its EOF is handled above, next turn,
            // and everything it held is sent to the next one.
            let sock = worker.sock.as_fd();
            let _ = owed.send_unsent(|msg, fd| ipc::try_send(sock, &msg.encode(), Some(fd)));
        }
        // The safety net under the worker's own fetch deadline.
        let denied = owed.deny_overdue(opts.event_deadline(), Instant::now());
        metrics
            .pending_events
            .store(owed.len() as u64, Ordering::Relaxed);
        if denied > 0 {
            metrics.denied_with(DenyErrno::Again, denied as u64);
            warn!(
                denied,
                "no answer from the worker in time; denied with EAGAIN"
            );
        }
    }
    shutdown_worker(&mut worker, &mut owed);
    owed.deny_all(DenyErrno::Io);
    // With what this process counted after the worker's last write.
    metrics.write(&store.metrics_path());
    if created_mountpoint {
        // Made by this serve: nothing of it is left behind.
        let _ = std::fs::remove_dir(&mountpoint);
    }
    info!("stopped");
    Ok(())
}

/// Half the service manager's watchdog period (`WATCHDOG_USEC`, for this process), if set.
fn watchdog_interval() -> Option<Duration> {
    let pid_ok = std::env::var("WATCHDOG_PID")
        .map_or(true, |p| p.parse::<u32>().ok() == Some(std::process::id()));
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (pid_ok && usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Ask the worker to finish what it holds and exit; let go of what it answers meanwhile.
fn shutdown_worker(worker: &mut WorkerProc, owed: &mut Owed<'_>) {
    let bye = EventMsg {
        id: CONTROL_ID,
        fd_num: -1,
        pid: 0,
        mask: 0,
        range: None,
    };
    let end = Instant::now() + Duration::from_secs(30);
    // Its socket may be full: the replies that make room are read meanwhile.
    let mut bye_sent = false;
    while Instant::now() < end {
        if !bye_sent {
            match ipc::try_send(worker.sock.as_fd(), &bye.encode(), None) {
                Ok(()) => bye_sent = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        match ipc::poll_readable(&[worker.sock.as_fd()], 200) {
            Ok(r) if r[0] => {}
            _ => continue,
        }
        let mut rbuf = [0u8; 32];
        match ipc::recv(worker.sock.as_fd(), &mut rbuf) {
            Ok((n, _)) if n > 0 => {
                if let Some(reply) = ReplyMsg::decode(&rbuf[..n]) {
                    owed.release(reply.id);
                }
            }
            _ => break,
        }
    }
    let status = reap(&mut worker.child);
    info!(status = %status, "worker stopped");
}

fn reap(child: &mut Child) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                return match st.signal() {
                    Some(sig) => format!("killed by signal {sig}"),
                    None => format!("exit code {}", st.code().unwrap_or(-1)),
                }
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return "killed after not exiting".into();
            }
        }
    }
}

fn spawn_worker(
    store_root: &Path,
    mountpoint: &Path,
    group: &Group,
    inherited: [BorrowedFd<'_>; 4],
    opts: &WorkerOptions,
) -> anyhow::Result<WorkerProc> {
    let (mine, theirs) = ipc::seqpacket_pair()?;
    let exe = std::env::current_exe().context("cannot find the hsm executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve-worker")
        .arg(store_root)
        .arg(mountpoint)
        .arg("--threads")
        .arg(opts.threads.to_string())
        .arg("--readahead")
        .arg(opts.readahead.to_string())
        .arg("--dir-prefetch")
        .arg(opts.dir_prefetch.to_string())
        .arg("--fetch-deadline")
        .arg(opts.fetch_deadline.as_secs_f64().to_string())
        .arg("--fetch-user")
        .arg(&opts.fetch_user)
        .arg("--policy")
        .arg(serde_json::to_string(&opts.policy)?);
    if let Some(gid) = opts.control_group {
        cmd.arg("--control-group").arg(gid.to_string());
    }
    if let Some(limit) = opts.cache_limit {
        cmd.arg("--cache-limit").arg(limit.to_string());
    }
    if let Some(path) = &opts.record_access {
        cmd.arg("--record-access").arg(path);
    }
    for path in &opts.prefetch_lists {
        cmd.arg("--prefetch-list").arg(path);
    }
    if opts.prefetch_on_first_open {
        cmd.arg("--prefetch-on-first-open");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    // In the order of worker::SOCKET_FD, GROUP_FD, METRICS_FD, PUBLISHED_FD, VIEW_FD, GUARD_FD.
    let [metrics, published, view, guard_conn] = inherited;
    let fds = [
        theirs.as_fd(),
        group.as_fd(),
        metrics,
        published,
        view,
        guard_conn,
    ];
    let child = ipc::spawn_with_fds(cmd, &fds).context("cannot start the worker process")?;
    drop(theirs);
    let _ = std::fs::write(
        format!("/proc/self/fd/{}/.hsm/worker.pid", view.as_raw_fd()),
        child.id().to_string(),
    );
    Ok(WorkerProc {
        child,
        sock: mine,
        ready: false,
    })
}

fn wait_ready(worker: &mut WorkerProc) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if ipc::poll_readable(&[worker.sock.as_fd()], 200)?[0] {
            let mut rbuf = [0u8; 32];
            let (n, _) = ipc::recv(worker.sock.as_fd(), &mut rbuf)?;
            if n > 0 && ReplyMsg::decode(&rbuf[..n]).is_some_and(|r| r.id == CONTROL_ID) {
                worker.ready = true;
                return Ok(());
            }
            let status = reap(&mut worker.child);
            bail!("the worker failed to start ({status}); its error is printed above");
        }
    }
    let _ = worker.child.kill();
    bail!("the worker did not start within 60 s")
}

pub(crate) fn raise_fd_limit() {
    // Every held event and every cached file holds an fd (two on xfs), and under FUSE every
    // inode the kernel holds: allow as many as the kernel does (fs.nr_open), not the login
    // default. The worker inherits the limit.
    // Capped at EVENT_FD_LIMIT: every event fd number stays below it, so that the guard can
    // clear what a dead daemon left unanswered (see `guard`).
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0)
        .min(EVENT_FD_LIMIT as libc::rlim_t);
    let cap = EVENT_FD_LIMIT as u64;
    let Ok((_, hard)) = crate::sys::process::nofile_limit() else {
        return;
    };
    let raised = hard.max(nr_open as u64).min(cap);
    if crate::sys::process::set_nofile_limit(raised, raised).is_err() {
        let kept = hard.min(cap);
        let _ = crate::sys::process::set_nofile_limit(kept, kept);
    }
}

/// Make MOUNTPOINT ready: an empty directory with nothing mounted on it, or a stale exposure
/// of this very store's tree (left by a daemon that was killed) with the private self-bind under
/// it, which is removed: this process holds the store (see `guard::attach_daemon`), so the
/// daemon that made it is dead. Anything else there is refused, never unmounted: a user's
/// mount, or a directory with files that the tree would hide. Returns the canonical path and
/// whether the directory was made here (it is then removed at the stop).
fn prepare_mountpoint(
    mountpoint: &Path,
    tree: &Path,
    nonempty: bool,
) -> anyhow::Result<(PathBuf, bool)> {
    let created = !mountpoint.exists();
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create mount point {}", mountpoint.display()))?;
    let mp = mountpoint.canonicalize()?;
    let tree_md = std::fs::metadata(tree)?;
    let mut removed_exposure = false;
    for _ in 0..8 {
        let mounts = mount::mounts()?;
        let Some(top) = mount::top_mount_at(&mounts, &mp) else {
            break;
        };
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&mp)?;
        let exposure = md.dev() == tree_md.dev() && md.ino() == tree_md.ino();
        let our_self_bind = removed_exposure && mount::is_self_bind(&mounts, &top);
        if !exposure && !our_self_bind {
            bail!(
                "{} is a mount point of something else ({} {} on {}); hsm unmounts only its \
                 own mounts: unmount it or choose another mount point",
                mp.display(),
                top.fstype,
                top.source,
                mp.display()
            );
        }
        warn!(mountpoint = %mp.display(), "removing the stale mount left by an hsm serve that died");
        mount::detach(&mp)?;
        removed_exposure |= exposure;
    }
    if mount::top_mount_at(&mount::mounts()?, &mp).is_some() {
        bail!("could not clear the mounts stacked at {}", mp.display());
    }
    let entries = std::fs::read_dir(&mp)?.count();
    if entries > 0 && !nonempty {
        bail!(
            "{} is not empty ({entries} entries): the tree mounted there would hide them; \
             choose an empty directory, or pass --nonempty to mount over them",
            mp.display()
        );
    }
    Ok((mp, created))
}

/// The tree mounted at MOUNTPOINT (the filesystem was marked before it became reachable).
struct Exposure {
    mountpoint: PathBuf,
    attached: AtomicBool,
}

impl Exposure {
    fn attach(tree: &Path, mountpoint: &Path) -> anyhow::Result<Exposure> {
        // No mark of its own: the filesystem mark covers it, as every other mount.
        let clone =
            mount::clone_tree(tree).context("cannot clone the store's tree for mounting")?;
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
