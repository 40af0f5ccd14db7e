//! The worker process of `hsm serve`: it runs the fetch engine.
//!
//! It receives events (and their fds) from the supervisor, serves them on a pool of threads,
//! answers each to the kernel and then tells the supervisor. It can be killed at any moment: the
//! supervisor still holds every event it has not heard back about, and resends them to the next
//! worker. Nothing it wrote is trusted after a restart unless its record says so, and records are
//! written only after the data is synced.
//!
//! It holds a duplicate of the fanotify group fd (it answers the kernel itself) and of the
//! supervisor's connection to the store's guard: if the *supervisor* dies, the worker answers
//! what it holds and exits, and the guard, which sees the connection close only then, takes
//! over the group (see `guard`). All its reads and writes of the store go through the daemon's
//! private view, which raises no event.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{debug, error, info, warn};

use crate::engine::{Engine, Need, Served, StoreAccess};
use crate::event::{EventId, PendingEvent, Respond, SupervisorResponder};
use crate::guard::PrivateView;
use crate::metrics::{Metrics, Outcome};
use crate::policy::{Denial, PolicyConfig};
use crate::protocol::{EventMsg, ReplyMsg, CONTROL_ID, EVENT_LEN, NOTE_ID};
use crate::published::PublishedRanges;
use crate::record::StubKind;
use crate::store::Store;
use crate::sys::fanotify::{DenyErrno, Group, Verdict, FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS};
use crate::sys::shm::Shared;
use crate::sys::{fs as sysfs, ipc};

/// The fd numbers the supervisor installs in the worker.
pub const SOCKET_FD: i32 = 3;
pub const GROUP_FD: i32 = 4;
/// The daemon's counters, shared with the supervisor (`sys::shm`).
pub const METRICS_FD: i32 = 5;
/// The table where present ranges are published for the supervisor (`crate::published`).
pub const PUBLISHED_FD: i32 = 6;
/// The daemon's private view of the store (`guard::PrivateView`): all the worker's store I/O.
pub const VIEW_FD: i32 = 7;
/// The daemon's connection to the store's guard: held open here too, so that the guard takes
/// over only once both processes are gone.
pub const GUARD_FD: i32 = 8;

/// How often the engine persists its records (after a `syncfs`) and the counters are written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub threads: usize,
    pub readahead: u64,
    /// Files per window of a directory prefetch (0: off; see `prefetch`).
    pub dir_prefetch: usize,
    /// A backend read that takes longer fails the access with EAGAIN.
    pub fetch_deadline: Duration,
    /// The unprivileged user remote backends run as (in their own process).
    pub fetch_user: String,
    /// A group allowed on the control socket besides root.
    pub control_group: Option<u32>,
    /// Present bytes the store may hold; beyond, the least recently used files are released.
    pub cache_limit: Option<u64>,
    /// Which processes may cause fetches (see `policy`).
    pub policy: PolicyConfig,
    /// Record what is opened and read into this file (see `access_list`).
    pub record_access: Option<std::path::PathBuf>,
    /// Access lists fetched ahead at start, in this order.
    pub prefetch_lists: Vec<std::path::PathBuf>,
    /// Each list waits for an open or read of its first file before it is fetched.
    pub prefetch_on_first_open: bool,
}

/// A local source is read here. A remote one is read by `hsm serve-fetcher`, a child process
/// that drops to `fetch_user` before it touches the network (see `backend::isolated`). Either
/// way, wrong credentials or an unreachable source fail the start, not the first read.
pub fn open_backend(
    store: &Store,
    fetch_user: &str,
) -> anyhow::Result<Arc<dyn crate::backend::Backend>> {
    Ok(open_backend_reloadable(store, fetch_user)?.0)
}

/// [`open_backend`], and for an S3 source what re-reads its credentials for the fetcher.
fn open_backend_reloadable(
    store: &Store,
    fetch_user: &str,
) -> anyhow::Result<(
    Arc<dyn crate::backend::Backend>,
    Option<crate::backend::isolated::CredentialReload>,
)> {
    use crate::backend::{isolated::IsolatedBackend, scheme_of, Scheme};
    if scheme_of(&store.config.source) == Scheme::Local {
        let backend = crate::backend::open(&store.config.source)?;
        backend
            .check()
            .with_context(|| format!("the source {} cannot be used", backend.describe()))?;
        return Ok((backend, None));
    }
    let (mine, theirs) = ipc::stream_pair()?;
    let exe = std::env::current_exe().context("cannot find the hsm executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve-fetcher")
        .arg(&store.config.source)
        .arg("--fetch-user")
        .arg(fetch_user)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child =
        ipc::spawn_with_fds(cmd, &[theirs.as_fd()]).context("cannot start the fetcher process")?;
    drop(theirs);
    let _ = std::fs::write(store.meta().join("fetcher.pid"), child.id().to_string());
    // Reap it when it exits (with this worker, or on its own: then the worker exits too).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let fetcher = Arc::new(IsolatedBackend::new(mine)?);
    let reload = (scheme_of(&store.config.source) == Scheme::S3)
        .then(|| crate::backend::isolated::CredentialReload::new(fetcher.clone()));
    Ok((fetcher, reload))
}

/// The backend a daemon serves from: every read timed into the fetch duration histogram, and
/// the credentials re-read on `sighup` (see [`reload_credentials`]).
pub(crate) fn serving_backend(
    store: &Store,
    fetch_user: &str,
    sighup: signal_hook::iterator::Signals,
    metrics: &Shared<Metrics>,
) -> anyhow::Result<Arc<dyn crate::backend::Backend>> {
    let (inner, reload) = open_backend_reloadable(store, fetch_user)?;
    reload_credentials(
        sighup,
        reload,
        Shared::<Metrics>::from_fd(metrics.fd().try_clone_to_owned()?)?,
    )?;
    Ok(Arc::new(crate::metrics::Timed {
        inner,
        metrics: Shared::<Metrics>::from_fd(metrics.fd().try_clone_to_owned()?)?,
    }))
}

/// How often the static keys are read again to see whether they changed (see
/// `CredentialReload::reload_if_changed`).
const CREDENTIALS_LOOK_EVERY: Duration = Duration::from_secs(10);

/// On SIGHUP (forwarded by the supervisor), and when the static keys changed, re-read the
/// source's credentials and hand them to the fetcher, counted in `credential_reloads` or
/// `credential_reload_failures`. Events are served meanwhile; a failure leaves the keys in use
/// as they were.
fn reload_credentials(
    mut signals: signal_hook::iterator::Signals,
    reload: Option<crate::backend::isolated::CredentialReload>,
    metrics: Shared<Metrics>,
) -> anyhow::Result<()> {
    let counted = move |r: anyhow::Result<Option<&str>>, why: &str| match r {
        Ok(None) => {}
        Ok(Some(what)) => {
            Metrics::add(&metrics.credential_reloads, 1);
            info!("{why}: {what}");
        }
        Err(e) => {
            Metrics::add(&metrics.credential_reload_failures, 1);
            error!("{why}: the credentials were not reloaded, the old ones stay in use: {e:#}");
        }
    };
    std::thread::Builder::new()
        .name("hsm-credentials".into())
        .spawn(move || {
            let Some(r) = reload else {
                for _ in signals.forever() {
                    info!("SIGHUP: this source has no credentials to re-read");
                }
                return;
            };
            let mut looked = Instant::now();
            loop {
                for _ in signals.pending() {
                    counted(r.reload().map(Some), "SIGHUP");
                }
                if looked.elapsed() >= CREDENTIALS_LOOK_EVERY {
                    looked = Instant::now();
                    let what = r.reload_if_changed().map(|changed| {
                        changed.then_some("new keys in the credentials file, used from now on")
                    });
                    counted(what, "credentials");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })?;
    Ok(())
}

/// Opens for exec seen, by (pid, dev, ino): the plain open event that follows is not a plain open.
type ExecOpens = Mutex<HashMap<(i32, u64, u64), Instant>>;

struct Ctx {
    engine: Arc<Engine>,
    exec_opens: ExecOpens,
    /// Events handed to the handler threads and not yet answered.
    handed_off: AtomicUsize,
    services: crate::frontend::Services,
}

/// Fd numbers the worker's table holds from the start: its cached files (two fds each on xfs),
/// held events and fetches ahead, with room to spare.
pub(crate) const FD_TABLE_SLOTS: u64 = 1 << 15;

pub fn run(store_root: &Path, mountpoint: &Path, opts: WorkerOptions) -> anyhow::Result<()> {
    // Before any thread starts (see `reserve_fd_table`): a cold walk of 12,000 small files
    // took 0.71-0.87 s with it, 0.85-0.97 s without (native 0.69-0.79 s).
    let _ = crate::sys::process::reserve_fd_table(FD_TABLE_SLOTS);
    let sock = ipc::claim_inherited(SOCKET_FD).context("worker started without its socket")?;
    let group = Arc::new(Group::from_fd(
        ipc::claim_inherited(GROUP_FD).context("worker started without the fanotify group")?,
    ));
    // Stopping is the supervisor's call: a Ctrl-C or a service manager's SIGTERM reaches the
    // whole process group, and a worker that died of it would be restarted mid-shutdown.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::new(AtomicBool::new(false)))?;
    }
    // A SIGHUP (from the supervisor) re-reads the credentials: caught from here on.
    let sighup = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    let metrics = Shared::<Metrics>::from_fd(
        ipc::claim_inherited(METRICS_FD).context("worker started without the shared counters")?,
    )
    .context("cannot map the shared counters")?;
    let published = Shared::<PublishedRanges>::from_fd(
        ipc::claim_inherited(PUBLISHED_FD)
            .context("worker started without the published ranges")?,
    )
    .context("cannot map the published ranges")?;
    let view = PrivateView::from_fd(
        ipc::claim_inherited(VIEW_FD).context("worker started without the store's view")?,
    );
    let _guard_conn =
        ipc::claim_inherited(GUARD_FD).context("worker started without the guard connection")?;
    crate::fault::init();
    let store = Store::open(view.root())
        .with_context(|| format!("cannot open the store {}", store_root.display()))?;
    let backend = serving_backend(&store, &opts.fetch_user, sighup, &metrics)?;
    if !backend.reads_may_stall() {
        info!(
            "the source is on local disks: a missing piece is read by the thread serving its event"
        );
    }
    let engine = Arc::new(Engine::new(
        backend,
        metrics,
        Some(published),
        opts.readahead,
        opts.fetch_deadline,
        StoreAccess::of(&store, store.open_tree().ok()),
    ));
    Metrics::add(&engine.metrics.worker_starts, 1);
    // One thread per chunk a sequential reader may have in flight ahead of it: a job holds its
    // thread until its chunks are written, so fewer threads would cap the chunks in flight.
    engine.start_readahead(8);
    let services =
        crate::frontend::Services::start(&engine, &store, &opts, Some(group.clone()), mountpoint)?;
    let ctx = Arc::new(Ctx {
        engine: engine.clone(),
        exec_opens: Mutex::new(HashMap::new()),
        handed_off: AtomicUsize::new(0),
        services,
    });
    let responder = Arc::new(SupervisorResponder {
        sock: sock.try_clone()?,
        group: group.clone(),
    });

    let (tx, rx) = crossbeam_channel::unbounded::<PendingEvent>();
    let threads: Vec<_> = (0..opts.threads.max(1))
        .map(|_| {
            let rx = rx.clone();
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                for ev in rx {
                    handle(&ctx, ev);
                    ctx.handed_off.fetch_sub(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let flusher = {
        let engine = engine.clone();
        let metrics_path = store.metrics_path();
        std::thread::spawn(move || {
            engine.run_flusher(FLUSH_INTERVAL, || engine.metrics.write(&metrics_path));
        })
    };

    // Tell the supervisor we are ready for events.
    let ready = ReplyMsg {
        id: CONTROL_ID,
        verdict: Verdict::Allow,
        ignore: false,
    };
    ipc::send(sock.as_fd(), &ready.encode(), None).context("supervisor gone at start")?;

    if receive_from_supervisor(&ctx, &sock, &responder, &tx) {
        // Not read from the group here: events the supervisor read and did not pass on are
        // still owed under its fd numbers, and a new event given one of them would take its
        // answer. What was passed on is answered below; then, with both processes gone, the
        // guard clears the rest and answers events until a daemon attaches again.
        warn!("the supervisor is gone: answering the events held here, then exiting");
    }
    drop(tx);
    for t in threads {
        let _ = t.join();
    }
    engine.stop_readahead();
    engine.stop_flusher();
    let _ = flusher.join();
    engine.flush(true);
    engine.metrics.write(&store.metrics_path());
    ctx.services.finish();
    drop(ctx);
    Ok(())
}

/// Receive events until the supervisor says stop (returns false) or disappears (returns true).
fn receive_from_supervisor(
    ctx: &Arc<Ctx>,
    sock: &OwnedFd,
    responder: &Arc<SupervisorResponder>,
    tx: &crossbeam_channel::Sender<PendingEvent>,
) -> bool {
    let mut buf = [0u8; 64];
    let mut busy_at = Instant::now();
    loop {
        // Awake briefly after a message (see `ipc::SPIN`): the next event comes soon.
        let received = ipc::poll_readable_spinning(&[sock.as_fd()], busy_at, -1)
            .and_then(|_| ipc::recv(sock.as_fd(), &mut buf));
        busy_at = Instant::now();
        let (n, fd) = match received {
            Ok(x) => x,
            Err(e) => {
                error!("receiving from the supervisor failed: {e}");
                return true;
            }
        };
        if n == 0 {
            return true;
        }
        let Some(msg) = (n == EVENT_LEN)
            .then(|| EventMsg::decode(&buf[..n]))
            .flatten()
        else {
            error!("malformed message from the supervisor ({n} bytes)");
            continue;
        };
        if msg.id == CONTROL_ID {
            return false;
        }
        if msg.id == NOTE_ID {
            // Never answered: the supervisor did (see `NOTE_ID`). A process the fetch policy
            // restricts sets off no readahead and no directory prefetch.
            if ctx.services.policy.as_ref().is_some_and(|p| {
                p.has_lists() && p.process(msg.pid).is_some_and(|pr| p.listed(&pr).is_some())
            }) {
                continue;
            }
            if let Some(fd) = &fd {
                let range = (msg.mask & FAN_PRE_ACCESS != 0).then(|| msg.range.unwrap_or((0, 0)));
                ctx.services.note_use(fd.as_fd(), msg.pid, range);
            }
            match fd {
                // An access inside a published range: the readahead goes on from it.
                Some(fd) if msg.mask & FAN_PRE_ACCESS != 0 => {
                    let (offset, count) = msg.range.unwrap_or((0, 0));
                    // As in `dispatch`: a panic here must not take the receiving thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        ctx.engine
                            .note_access(fd.as_fd(), Need::Range { offset, count })
                    }));
                }
                Some(fd) => {
                    if let Some(p) = &ctx.services.prefetch {
                        p.note_open(fd.as_fd(), true);
                    }
                }
                None => {}
            }
            continue;
        }
        let Some(fd) = fd else {
            // Out of fds (the kernel drops a passed fd it cannot install): let the supervisor,
            // which still holds the event, fail this access now rather than at its deadline.
            error!(
                "event {} arrived without its fd (out of open files?); denied with EAGAIN",
                msg.id
            );
            let verdict = Verdict::Deny(DenyErrno::Again);
            ctx.engine
                .metrics
                .answered(msg.mask, Outcome::from(verdict));
            crate::event::answer_group(&responder.group, msg.fd_num, verdict);
            let reply = ReplyMsg {
                id: msg.id,
                verdict,
                ignore: false,
            };
            let _ = ipc::send(sock.as_fd(), &reply.encode(), None);
            continue;
        };
        let ev = PendingEvent::new(
            fd,
            EventId {
                id: msg.id,
                fd_num: msg.fd_num,
            },
            msg.mask,
            msg.pid,
            msg.range,
            responder.clone() as Arc<dyn Respond>,
        );
        // The only event being served: a small fill is done here rather than handed to a
        // thread (with others in flight it would hold them up). Asked only for a fill.
        let alone = || {
            ctx.handed_off.load(Ordering::Relaxed) == 0
                && ipc::poll_readable(&[sock.as_fd()], 0).is_ok_and(|r| !r[0])
        };
        dispatch(ctx, ev, tx, &alone);
    }
}

/// `alone()`: no other event is waiting or being served, so this one may take a small fill from a
/// local disk here (see [`Engine::serve_if_present`]): one thread hand-off less on a lone random
/// reader's every access (2,000 cold random 4 KiB reads, 6 interleaved runs: 0.49 s -> 0.32 s,
/// native 0.33 s; four readers at once no slower), and nothing waits behind it. The price: a
/// local read that hangs holds up the events that come after it until the supervisor's
/// deadline, not only its own (see README, on the supervisor's deadline).
fn dispatch(
    ctx: &Arc<Ctx>,
    ev: PendingEvent,
    tx: &crossbeam_channel::Sender<PendingEvent>,
    alone: &dyn Fn() -> bool,
) {
    let _span = crate::event_span(ev.id.id).entered();
    debug!(pid = ev.pid, mask = ev.mask, range = ?ev.range, "received");
    let range = (ev.mask & FAN_PRE_ACCESS != 0).then(|| ev.range.unwrap_or((0, 0)));
    ctx.services.note_use(ev.as_fd(), ev.pid, range);
    // Answered inline: the plain open event of this exec comes only after this answer. Not an
    // exec through a stacking filesystem's hidden mount (overlayfs): it maps the real file with
    // no event, so that file is served as an open for a kernel reader (fetched whole).
    if ev.mask & FAN_OPEN_EXEC_PERM != 0
        && !crate::kernel_reader::opened_for_kernel_reader(ev.pid, ev.as_fd())
    {
        note_exec_open(ctx, ev);
        return;
    }
    // Present already (readahead or a directory prefetch got there first), or a small fill:
    // answered here, without a thread hand-off.
    let access = ev.mask & FAN_PRE_ACCESS != 0;
    let need = if access {
        range_need(&ev)
    } else {
        open_need(&ev)
    };
    // The fetch policy: a process is looked up for every event only when some are listed;
    // for a rate limit alone, only when its event would fetch (below).
    let process = ctx
        .services
        .policy
        .as_ref()
        .filter(|p| p.has_lists())
        .and_then(|p| p.process(ev.pid));
    let listed = match (&ctx.services.policy, &process) {
        (Some(p), Some(pr)) => p.listed(pr),
        _ => None,
    };
    if let Some(errno) = listed {
        return policy_answer(ctx, ev, need, Denial::Listed(errno));
    }
    let rate_limited = ctx
        .services
        .policy
        .as_ref()
        .is_some_and(|p| p.rate_limited());
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Opens go to a thread: after their fill they tell the directory prefetch. A
        // rate-limited uid's fills go through the policy first (below).
        let small_fill = || access && !rate_limited && alone();
        ctx.engine.serve_if_present(ev.as_fd(), need, &small_fill)
    }));
    let served = match served {
        Ok(None) => None,
        Ok(Some(result)) => Some(Ok(result)),
        Err(_) => Some(Err(())),
    };
    if let Some(result) = served {
        if access {
            Metrics::add(&ctx.engine.metrics.events_pre_access, 1);
        } else {
            Metrics::add(&ctx.engine.metrics.events_open, 1);
            // The plain open that follows an exec's: nothing left to tell apart.
            is_exec_open(ctx, &ev);
        }
        answer(ctx, ev, result);
        return;
    }
    if let Some(p) = ctx.services.policy.as_ref().filter(|p| p.rate_limited()) {
        let uid = match &process {
            Some(pr) => Some(pr.uid),
            None => p.process(ev.pid).map(|pr| pr.uid),
        };
        if uid.is_some_and(|uid| !p.take_fetch(uid, Instant::now())) {
            return policy_answer(ctx, ev, need, Denial::Rate);
        }
    }
    // A send fails only when the threads are gone; the event is then denied by its Drop.
    ctx.handed_off.fetch_add(1, Ordering::Relaxed);
    if tx.send(ev).is_err() {
        ctx.handed_off.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an open needs: a stub opened for a kernel reader that raises no pre-content event (see
/// `kernel_reader`) is fetched whole before the open returns; any other open fetches what its
/// stub kind asks for.
fn open_need(ev: &PendingEvent) -> Need {
    // A sparse stub is fetched whole at any open: the check (three /proc reads) is for stubs
    // filled range by range only, so that cold walks of small files do not pay for it.
    let ranged = crate::record::stub_kind(ev.as_fd()).is_some_and(|k| k != StubKind::Sparse);
    if ranged && crate::kernel_reader::opened_for_kernel_reader(ev.pid, ev.as_fd()) {
        Need::Whole
    } else {
        Need::Open
    }
}

fn range_need(ev: &PendingEvent) -> Need {
    let (offset, count) = ev.range.unwrap_or((0, 0));
    Need::Range { offset, count }
}

/// An access by a process the policy keeps from fetching: allowed if what it needs is present
/// (content that is present is never affected), else denied as `denial` says.
fn policy_answer(ctx: &Ctx, ev: PendingEvent, need: Need, denial: Denial) {
    let metrics = &ctx.engine.metrics;
    if ev.mask & FAN_PRE_ACCESS != 0 {
        Metrics::add(&metrics.events_pre_access, 1);
    } else {
        Metrics::add(&metrics.events_open, 1);
    }
    let present = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.engine.is_present(ev.as_fd(), need)
    }));
    match present {
        Ok(Ok(true)) => {
            metrics.answered(ev.mask, Outcome::Allowed);
            ev.answer(Verdict::Allow, false);
        }
        Ok(Ok(false)) => {
            let errno = crate::frontend::count_denial(&ctx.engine, ev.pid, ev.as_fd(), denial);
            metrics.answered(ev.mask, Outcome::PolicyDenied(errno));
            ev.answer(Verdict::Deny(errno), false);
        }
        Ok(Err(e)) => answer(ctx, ev, Ok(Err(e))),
        Err(_) => answer(ctx, ev, Err(())),
    }
}

fn handle(ctx: &Ctx, ev: PendingEvent) {
    let _span = crate::event_span(ev.id.id).entered();
    let metrics = &ctx.engine.metrics;
    let need = if ev.mask & FAN_PRE_ACCESS != 0 {
        Metrics::add(&metrics.events_pre_access, 1);
        range_need(&ev)
    } else {
        Metrics::add(&metrics.events_open, 1);
        if is_exec_open(ctx, &ev) {
            // An exec maps what it needs, range by range: nothing to fetch at open.
            metrics.answered(ev.mask, Outcome::Allowed);
            ev.answer(Verdict::Allow, false);
            return;
        }
        open_need(&ev)
    };
    // A panic in a fetch fails this access (the event's Drop denies it), never the daemon.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::fault::at_fill(ev.as_fd());
        ctx.engine.serve(ev.as_fd(), need)
    }));
    if let (Some(p), Need::Open | Need::Whole, false, Ok(Ok(_))) = (
        &ctx.services.prefetch,
        need,
        ev.mask & FAN_PRE_ACCESS != 0,
        &result,
    ) {
        // After the fill: a window never races this open for its own file.
        p.note_open(ev.as_fd(), false);
    }
    answer(ctx, ev, result.map_err(|_| ()));
}

/// Answer an event with what serving it gave (`Err(())`: the fetch panicked).
fn answer(ctx: &Ctx, ev: PendingEvent, result: Result<std::io::Result<Served>, ()>) {
    let metrics = &ctx.engine.metrics;
    match result {
        Ok(Ok(served)) => {
            let ignore = served == Served::Complete;
            if ignore {
                Metrics::add(&metrics.ignore_marks, 1);
            }
            metrics.answered(ev.mask, Outcome::Allowed);
            debug!(?served, "answered: allowed");
            ev.answer(Verdict::Allow, ignore);
        }
        Ok(Err(e)) => {
            let errno = DenyErrno::for_error(&e);
            metrics.answered(ev.mask, Outcome::Denied(errno));
            // Never silent; a failed fetch also has its own line, with its range and source.
            warn!(file = %crate::engine::fd_path(ev.as_fd()), "access denied with {errno:?}: {e}");
            ev.answer(Verdict::Deny(errno), false);
        }
        Err(_) => {
            metrics.answered(ev.mask, Outcome::Denied(DenyErrno::Io));
            error!("a fetch panicked; the access was denied with EIO");
        }
    }
}

fn file_key(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    sysfs::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

fn note_exec_open(ctx: &Ctx, ev: PendingEvent) {
    Metrics::add(&ctx.engine.metrics.events_open, 1);
    if let Some((dev, ino)) = file_key(ev.as_fd()) {
        let mut m = ctx.exec_opens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, t| now.duration_since(*t) < Duration::from_secs(30));
        m.insert((ev.pid, dev, ino), now);
    }
    ctx.engine.metrics.answered(ev.mask, Outcome::Allowed);
    ev.answer(Verdict::Allow, false);
}

fn is_exec_open(ctx: &Ctx, ev: &PendingEvent) -> bool {
    let Some((dev, ino)) = file_key(ev.as_fd()) else {
        return false;
    };
    let mut m = ctx.exec_opens.lock().unwrap_or_else(|p| p.into_inner());
    m.remove(&(ev.pid, dev, ino)).is_some()
}
