//! The guard: the process that keeps a store's fanotify group alive while no daemon serves it,
//! so that stubs fail closed through every mount of the store's filesystem.
//!
//! Why it exists: the kernel allows every pending and future pre-content event once no process
//! holds the group, and a bind mount, a container's volume or a copied mount namespace made while
//! `hsm serve` ran outlives it. So the group carries a *filesystem* mark (every mount of the
//! superblock raises events, see `supervisor`) and is held by this small, single-threaded process
//! that does no I/O of its own: it outlives every `hsm serve` of the store (stopped, killed,
//! crashed, both processes at once), and exits when the store's filesystem is unmounted.
//!
//! While a daemon is attached (its connection open, held by the supervisor and the worker) the
//! guard reads nothing: the daemon reads and answers every event. When that connection closes,
//! the daemon is gone: the guard first answers (EIO) every event the dead processes had read and
//! not answered, by writing a response for every fd number they could have used (responses are
//! matched by number alone, see [`Group::answer_leftovers`]), then reads and answers events from
//! the files' records until a daemon attaches again: files that are complete or not stubs at all
//! are allowed (and ignore-marked, so they cost nothing more); an access to a range that is not
//! present, and the open of a stub that is fetched whole on open, are denied with EIO. Never
//! stub bytes as content, and no wait that outlives a reader's patience.
//!
//! The socket is abstract (no file on the store's filesystem, which it would keep busy), named
//! after the store's device and inode, and answers root only.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{error, info, warn};

use crate::event::MASK;
use crate::record::{SourceRecord, StateRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fanotify::{DenyErrno, Event, Group, Verdict, FAN_PRE_ACCESS};
use crate::sys::{fs as sysfs, ipc, mount};

/// Every process that reads the group keeps its fds below this number (`hsm serve` caps its
/// RLIMIT_NOFILE here), so that answering every number below it clears whatever a dead reader
/// left unanswered.
pub const EVENT_FD_LIMIT: i32 = 1 << 20;

/// The fds `hsm guard` is started with.
const LISTENER_FD: i32 = 3;
const GROUP_FD: i32 = 4;

// Requests, one byte each.
/// "I read and answer the group's events until this connection closes" (`hsm serve`).
const REQ_SERVE: u8 = b'S';
/// "Give me the group, to ignore-mark my own view of the store" (tools that read stubs).
const REQ_GROUP: u8 = b'M';
/// "Exit" (refused while a daemon is attached).
const REQ_QUIT: u8 = b'Q';
// Replies: one byte, then the guard's or the attached daemon's pid (4 bytes, little-endian).
const REP_GROUP: u8 = b'G';
const REP_BUSY: u8 = b'B';
const REP_BYE: u8 = b'Q';

/// The guard's socket name for the store at `store_root`.
pub fn socket_name(store_root: &Path) -> io::Result<String> {
    let md = std::fs::metadata(store_root)?;
    Ok(format!("hsm-guard:{}:{}", md.dev(), md.ino()))
}

fn reply(kind: u8, pid: u32) -> [u8; 5] {
    let p = pid.to_le_bytes();
    [kind, p[0], p[1], p[2], p[3]]
}

/// Send `req` and wait (5 s at most) for the guard's reply: its kind, the pid it names, the fd.
fn request(conn: BorrowedFd<'_>, req: u8) -> anyhow::Result<(u8, u32, Option<OwnedFd>)> {
    ipc::send(conn, &[req], None)?;
    if !ipc::poll_readable(&[conn], 5_000)?[0] {
        bail!("the store's guard process did not answer within 5 s");
    }
    let mut buf = [0u8; 8];
    let (n, fd) = ipc::recv(conn, &mut buf)?;
    if n != 5 {
        bail!("the store's guard process closed the connection (it may be exiting; try again)");
    }
    let pid = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Ok((buf[0], pid, fd))
}

/// A daemon's hold on the store's group: the group, and the connection whose closing (by every
/// process holding it) tells the guard to take over.
pub struct Attachment {
    pub group: Group,
    pub conn: OwnedFd,
    pub guard_pid: u32,
}

/// For `hsm serve`: the store's group, with this process attached as the one that answers its
/// events; the guard is started first if none runs. Fails when another daemon is attached: one
/// daemon per store.
pub fn attach_daemon(store_root: &Path) -> anyhow::Result<Attachment> {
    let name = socket_name(store_root)
        .with_context(|| format!("cannot stat the store {}", store_root.display()))?;
    refuse_a_second_store_on_the_filesystem(store_root, &name)?;
    // Owned (and closed, when a guard still runs) whatever happens next.
    let mut stored = ipc::take_listen_fd(FDSTORE_NAME);
    let mut started = false;
    for _ in 0..50 {
        match ipc::connect_abstract(&name) {
            Ok(conn) => {
                // A guard whose filesystem was just unmounted (a remount) may close the
                // connection as it exits: then another is started at the next turn.
                let (kind, pid, fd) = match request(conn.as_fd(), REQ_SERVE) {
                    Ok(reply) => reply,
                    Err(e) => {
                        warn!("the store's guard did not answer ({e:#}); trying again");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match (kind, fd) {
                    (REP_GROUP, Some(fd)) => {
                        crate::kernel_reader::log_loop_attach_limit();
                        return Ok(Attachment {
                            group: Group::from_fd(fd),
                            conn,
                            guard_pid: pid,
                        });
                    }
                    (REP_BUSY, _) => bail!(
                        "the store {} is already served by another hsm serve (pid {pid}); one \
                         daemon per store: stop that one first",
                        store_root.display()
                    ),
                    _ => bail!("the store's guard process gave an unexpected answer"),
                }
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
                ) && !started =>
            {
                match start_guard(store_root, &name, stored.take()) {
                    // Connect at once: the new guard leaves queued events to us.
                    Ok(()) => {
                        started = true;
                        continue;
                    }
                    // Another `hsm serve` started one at the same moment: connect to it.
                    Err(e) if is_addr_in_use(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            Err(e) => return Err(e).context("cannot reach the store's guard process"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("cannot reach the store's guard process (hsm-guard) after starting it; see its log above")
}

/// One guarded store per filesystem: a guard answers the events of every stub of its
/// filesystem from the records (the mark is the filesystem's), so a second store's guard would
/// deny this store's accesses while its daemon served them. Guards are found by their socket
/// names (`/proc/net/unix`), which carry the store's device and inode.
fn refuse_a_second_store_on_the_filesystem(store_root: &Path, name: &str) -> anyhow::Result<()> {
    let Some((prefix, _)) = name.rsplit_once(':') else {
        return Ok(());
    };
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let other = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|path| path.strip_prefix('@'))
        .find(|n| n.starts_with(&format!("{prefix}:")) && *n != name);
    if let Some(other) = other {
        bail!(
            "another hsm store on the filesystem of {} is guarded ({other}); one guarded store \
             per filesystem: stop that store's serve and run `hsm guard --stop STORE` for it, or \
             put this store on a filesystem of its own",
            store_root.display()
        );
    }
    Ok(())
}

fn is_addr_in_use(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::AddrInUse)
}

/// The name of the group in systemd's file-descriptor store.
pub const FDSTORE_NAME: &str = "hsm-group";

/// Start `hsm guard STORE` with the listening socket already bound, so that a connection made
/// right after this returns is queued for it, and with the group systemd kept in its fd store
/// (`stored`), or else a new one. A stored group kept every mark while no process read it
/// (readers waited); what a dead daemon read and left unanswered is cleared first.
fn start_guard(store_root: &Path, name: &str, stored: Option<OwnedFd>) -> anyhow::Result<()> {
    let listener = ipc::listen_abstract(name)?;
    let group = match stored {
        Some(fd) => {
            let group = Group::from_fd(fd);
            let cleared = group.answer_leftovers(EVENT_FD_LIMIT, Verdict::Deny(DenyErrno::Io));
            info!(
                denied = cleared,
                "took the store's group back from the service manager's fd store"
            );
            group
        }
        None => Group::new()?,
    };
    let exe = std::env::current_exe().context("cannot find the hsm executable")?;
    let mut cmd = Command::new(exe);
    // Its log goes where `hsm serve`'s goes (a terminal, the journal), but never into a pipe:
    // whoever reads that pipe would wait for the guard's end too.
    let stderr = if ipc::is_pipe(io::stderr().as_fd()) {
        Stdio::null()
    } else {
        Stdio::inherit()
    };
    cmd.arg("guard")
        .arg(store_root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own process group: a Ctrl-C meant for `hsm serve` must not end the guard.
        .process_group(0);
    let child = ipc::spawn_with_fds(cmd, &[listener.as_fd(), group.as_fd()])
        .context("cannot start the guard process")?;
    info!(pid = child.id(), "started the store's guard process");
    // Not waited for: it outlives this process (init reaps it).
    std::mem::forget(child);
    Ok(())
}

/// For tools that read or write stubs (verify, hydrate, populate run again): the store's group,
/// when a guard holds one, to ignore-mark the tool's own [`PrivateView`]. `None` when no guard
/// runs (then no mark exists and the plain path raises no event).
pub fn group_for_tools(store_root: &Path) -> anyhow::Result<Option<Group>> {
    let name = socket_name(store_root)?;
    let conn = match ipc::connect_abstract(&name) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).context("cannot reach the store's guard process"),
    };
    match request(conn.as_fd(), REQ_GROUP)? {
        (REP_GROUP, _, Some(fd)) => Ok(Some(Group::from_fd(fd))),
        _ => bail!("the store's guard process refused to share the group (are you root?)"),
    }
}

/// For tools that change a store (`populate` run again): a [`PrivateView`] of the store when a
/// guard holds its group, so that the stubs they make never raise an event (an event on a file
/// not yet a stub would have it allowed and ignore-marked for good). `None` when no guard runs
/// or `store_root` is not a store yet.
pub fn view_for_tools(store_root: &Path) -> anyhow::Result<Option<PrivateView>> {
    if !store_root.join(".hsm/config.json").is_file() {
        return Ok(None);
    }
    match group_for_tools(store_root)? {
        Some(group) => Ok(Some(PrivateView::new(&group, store_root)?)),
        None => Ok(None),
    }
}

/// Ask the store's guard to exit: `Ok(false)` when none runs. Refused while a daemon serves the
/// store. After this, nothing guards stubs reached through leftover mounts.
pub fn stop(store_root: &Path) -> anyhow::Result<bool> {
    let name = socket_name(store_root)?;
    let conn = match ipc::connect_abstract(&name) {
        Ok(c) => c,
        Err(_) => return Ok(false),
    };
    match request(conn.as_fd(), REQ_QUIT)? {
        (REP_BYE, _, _) => {
            // Gone once its name is: a serve of another store on this filesystem started right
            // after this returns must not find it (see `refuse_a_second_store_on_the_filesystem`).
            drop(conn);
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end
                && std::fs::read_to_string("/proc/net/unix")
                    .is_ok_and(|t| t.contains(&format!("@{name}\n")))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(true)
        }
        (REP_BUSY, pid, _) => bail!("hsm serve (pid {pid}) is serving the store: stop it first"),
        _ => bail!("the store's guard process gave an unexpected answer"),
    }
}

/// The store seen through a private, detached clone of its mount that the group ignores: the
/// daemon's and tools' own reads and writes raise no event, so they never wait on themselves,
/// and no other process can reach it.
pub struct PrivateView {
    mount: OwnedFd,
    path: PathBuf,
}

impl PrivateView {
    pub fn new(group: &Group, store_root: &Path) -> anyhow::Result<PrivateView> {
        let mount = mount::clone_tree(store_root)
            .with_context(|| format!("cannot clone the mount of {}", store_root.display()))?;
        group
            .ignore_mount(mount.as_fd(), MASK)
            .context("cannot ignore-mark the daemon's private view of the store")?;
        Ok(PrivateView::from_fd(mount))
    }

    /// A view inherited from the process that made it.
    pub fn from_fd(mount: OwnedFd) -> PrivateView {
        let path = PathBuf::from(format!("/proc/self/fd/{}", mount.as_raw_fd()));
        PrivateView { mount, path }
    }

    /// The store's root, as a path that resolves through the view.
    pub fn root(&self) -> &Path {
        &self.path
    }
}

impl AsFd for PrivateView {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.mount.as_fd()
    }
}

/// The store that holds `path` (canonical), if any: the nearest ancestor with `.hsm/config.json`.
fn store_of(path: &Path) -> Option<PathBuf> {
    let abs = path.canonicalize().ok()?;
    abs.ancestors()
        .find(|dir| dir.join(".hsm/config.json").is_file())
        .map(Path::to_path_buf)
}

/// Open `path` for a tool that reads or writes stubs' raw bytes (`hsm verify`, tests): when it is
/// inside a store whose guard holds a group, through a private view that the group ignores, so
/// that the open raises no event (a stub's missing ranges are what such a tool wants to see, and
/// no daemon need run). Otherwise by its path. The view lives as long as the file: nothing is
/// kept that would hold the store's filesystem once the file is closed.
pub fn open_for_tool(path: &Path, options: &std::fs::OpenOptions) -> io::Result<std::fs::File> {
    let Some(store) = store_of(path) else {
        return options.open(path);
    };
    let rel = path
        .canonicalize()?
        .strip_prefix(&store)
        .map(Path::to_path_buf)
        .map_err(|_| io::Error::other("path outside its store"))?;
    let Some(group) = group_for_tools(&store).map_err(io::Error::other)? else {
        return options.open(path);
    };
    let view = PrivateView::new(&group, &store).map_err(io::Error::other)?;
    options.open(view.root().join(rel))
}

/// What the guard answers, from a file's records alone, while no daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unserved {
    /// Complete, or not a stub: allowed, and its events silenced.
    AllowAndIgnore,
    /// The bytes asked for are present (or the open cannot expose holes): allowed.
    Allow,
    /// Would show stub bytes, or the record is corrupt: denied with EIO.
    Deny,
}

/// Decide an event without a daemon. `source`/`state` are the raw xattrs, `size` the file's
/// current size.
pub fn decide_unserved(
    source: Option<&[u8]>,
    state: Option<&[u8]>,
    mask: u64,
    range: Option<(u64, u64)>,
    size: u64,
    for_kernel_reader: bool,
) -> Unserved {
    let Some(source) = source else {
        return Unserved::AllowAndIgnore;
    };
    let Ok(source) = SourceRecord::decode(source) else {
        return Unserved::Deny;
    };
    let state = match state {
        None => source.fresh_state(),
        Some(raw) => match StateRecord::decode(raw, &source) {
            Ok(s) => s,
            Err(_) => return Unserved::Deny,
        },
    };
    if state.is_complete() {
        return Unserved::AllowAndIgnore;
    }
    if mask & FAN_PRE_ACCESS != 0 {
        let (offset, count) = range.unwrap_or((0, 0));
        // Count 0 (a clone) means the whole file. Beyond the backed length, or beyond the size
        // the file has now, the bytes are the user's own.
        let end = if count == 0 {
            u64::MAX
        } else {
            offset.saturating_add(count)
        };
        let end = end.min(state.backed_len).min(size);
        if offset >= end || state.present.contains(offset, end) {
            return Unserved::Allow;
        }
        return Unserved::Deny;
    }
    // An open. A stub fetched whole on open is sparse: once open, copy tools that trust
    // SEEK_DATA would copy its holes as zeros without a read. Stubs filled range by range raise
    // an event for every range read, which is decided above, unless the opener hands the file
    // to a kernel reader that raises none (a loop device).
    match source.kind {
        _ if for_kernel_reader => Unserved::Deny,
        StubKind::Sparse => Unserved::Deny,
        StubKind::Cloned | StubKind::SparseLazy => Unserved::Allow,
    }
}

fn decide_event(fd: BorrowedFd<'_>, mask: u64, pid: i32, range: Option<(u64, u64)>) -> Unserved {
    let source = match sysfs::fgetxattr(fd, XATTR_SOURCE) {
        Ok(v) => v,
        Err(_) => return Unserved::Deny,
    };
    if source.is_none() {
        return Unserved::AllowAndIgnore;
    }
    let state = match sysfs::fgetxattr(fd, XATTR_STATE) {
        Ok(v) => v,
        Err(_) => return Unserved::Deny,
    };
    let size = match sysfs::fstat(fd) {
        Ok(st) => st.st_size as u64,
        Err(_) => return Unserved::Deny,
    };
    let for_kernel_reader =
        mask & FAN_PRE_ACCESS == 0 && crate::kernel_reader::opened_for_kernel_reader(pid, fd);
    decide_unserved(
        source.as_deref(),
        state.as_deref(),
        mask,
        range,
        size,
        for_kernel_reader,
    )
}

/// How long a new guard leaves the group unread for the `hsm serve` that started it to attach:
/// events already queued (kept by systemd's fd store while no process read them) are then
/// served by the daemon, with the right bytes, rather than denied.
const FIRST_ATTACH_WAIT: Duration = Duration::from_secs(10);

/// The daemon attached to the guard: its connection and the supervisor's pid.
struct Attached {
    conn: OwnedFd,
    pid: u32,
}

/// `hsm guard STORE`: started by `hsm serve` (fd 3: the listening socket, fd 4: the group).
pub fn run(store_root: &Path) -> anyhow::Result<()> {
    let listener = ipc::claim_inherited(LISTENER_FD)
        .context("hsm guard is started by hsm serve, not by hand")?;
    let group = Group::from_fd(ipc::claim_inherited(GROUP_FD).context("no fanotify group")?);
    // Nothing else of its parent's: it outlives it.
    if let Err(e) = ipc::close_inherited_from(GROUP_FD + 1) {
        warn!("cannot close the fds inherited from hsm serve: {e}");
    }
    // Its end: the store's filesystem shut down (or the store removed). A device number is no
    // proof: a loop device freed by an unmount is often reused at once.
    let mut ended = sysfs::watch_for_unmount(store_root)
        .context("cannot watch the store's filesystem for its unmount")?;
    // Hold nothing on the store's filesystem, so that it can be unmounted.
    std::env::set_current_dir("/")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        // Only SIGTERM, SIGKILL or `hsm guard --stop` end the guard.
        signal_hook::flag::register(sig, std::sync::Arc::new(Default::default()))?;
    }
    info!(store = %store_root.display(), pid = std::process::id(), "guarding the store");
    let mut daemon: Option<Attached> = None;
    let mut first_attach_until = Some(Instant::now() + FIRST_ATTACH_WAIT);
    let mut denied: u64 = 0;
    loop {
        if first_attach_until.is_some_and(|t| Instant::now() >= t) {
            first_attach_until = None;
        }
        // Reads the group only while no daemon is attached (and not during the first wait).
        let second = match (&daemon, first_attach_until) {
            (Some(d), _) => Some(d.conn.as_fd()),
            (None, None) => Some(group.as_fd()),
            (None, Some(_)) => None,
        };
        let fds: Vec<BorrowedFd<'_>> = [listener.as_fd(), ended.as_fd()]
            .into_iter()
            .chain(second)
            .collect();
        let polled = ipc::poll_readable(&fds, 500)?;
        if polled[1] {
            // A daemon attached meanwhile (to a filesystem mounted again at the same place)
            // has marked the new one with this group: keep guarding it, watching it instead.
            match (&daemon, sysfs::watch_for_unmount(store_root)) {
                (Some(_), Ok(again)) => {
                    info!("the store's filesystem was mounted again: guarding the new one");
                    ended = again;
                    continue;
                }
                _ => {
                    info!(
                        "the store's filesystem was unmounted (or the store removed): the guard \
                         exits"
                    );
                    return Ok(());
                }
            }
        }
        // The listener, then the group or the daemon's connection, as before.
        let ready: Vec<bool> = [polled[0]]
            .into_iter()
            .chain(polled.get(2).copied())
            .collect();
        // A daemon gone first (a new one may be knocking), then connections (a daemon that
        // attaches takes the queued events), then events.
        let polled_group = daemon.is_none() && first_attach_until.is_none();
        if daemon.is_some() && ready.get(1).copied().unwrap_or(false) {
            detach_if_gone(&group, &mut daemon);
        }
        if ready[0] {
            if let Some(d) = &daemon {
                // Its end may have come since the poll.
                if ipc::poll_readable(&[d.conn.as_fd()], 0).is_ok_and(|r| r[0]) {
                    detach_if_gone(&group, &mut daemon);
                }
            }
            match handle_request(&listener, &group, &mut daemon) {
                Ok(Flow::Quit) => return Ok(()),
                Ok(Flow::Attached) => first_attach_until = None,
                Ok(Flow::Continue) | Err(_) => {}
            }
            continue;
        }
        // The group was polled only when no daemon was attached (then `ready[1]` is its).
        if polled_group && ready.get(1).copied().unwrap_or(false) {
            answer_events(&group, &mut denied);
        }
    }
}

/// The attached daemon's connection is readable: if it was closed (both daemon processes are
/// gone, or stopped), deny what they left unanswered and let the guard answer from now on.
fn detach_if_gone(group: &Group, daemon: &mut Option<Attached>) {
    let Some(d) = daemon.as_ref() else {
        return;
    };
    let mut b = [0u8; 8];
    if matches!(ipc::recv(d.conn.as_fd(), &mut b), Ok((n, _)) if n > 0) {
        return;
    }
    let cleared = group.answer_leftovers(EVENT_FD_LIMIT, Verdict::Deny(DenyErrno::Io));
    if cleared > 0 {
        warn!(
            daemon = d.pid,
            denied = cleared,
            "hsm serve ended with accesses unanswered: denied them with EIO"
        );
    }
    info!(
        daemon = d.pid,
        "no daemon serves the store: the guard answers its events"
    );
    *daemon = None;
}

enum Flow {
    Continue,
    Attached,
    Quit,
}

fn handle_request(
    listener: &OwnedFd,
    group: &Group,
    daemon: &mut Option<Attached>,
) -> io::Result<Flow> {
    let me = std::process::id();
    let conn = ipc::accept(listener.as_fd())?;
    let (pid, uid) = ipc::peer_credentials(conn.as_fd())?;
    if uid != 0 {
        warn!(pid, uid, "refused a connection from a non-root process");
        return Ok(Flow::Continue);
    }
    if !ipc::poll_readable(&[conn.as_fd()], 1_000)?[0] {
        return Ok(Flow::Continue);
    }
    let mut b = [0u8; 8];
    let (n, _) = ipc::recv(conn.as_fd(), &mut b)?;
    if n != 1 {
        return Ok(Flow::Continue);
    }
    match (b[0], &*daemon) {
        (REQ_SERVE | REQ_QUIT, Some(d)) => {
            ipc::send(conn.as_fd(), &reply(REP_BUSY, d.pid), None)?;
        }
        (REQ_SERVE, None) => {
            ipc::send(conn.as_fd(), &reply(REP_GROUP, me), Some(group.as_fd()))?;
            info!(
                daemon = pid,
                "hsm serve attached: it answers the store's events"
            );
            *daemon = Some(Attached {
                conn,
                pid: pid as u32,
            });
            return Ok(Flow::Attached);
        }
        (REQ_GROUP, _) => {
            ipc::send(conn.as_fd(), &reply(REP_GROUP, me), Some(group.as_fd()))?;
        }
        (REQ_QUIT, None) => {
            ipc::send(conn.as_fd(), &reply(REP_BYE, me), None)?;
            info!("asked to exit: stubs reached through leftover mounts are no longer guarded");
            return Ok(Flow::Quit);
        }
        _ => {}
    }
    Ok(Flow::Continue)
}

/// Read a batch of events and answer each from the file's records (see [`decide_unserved`]).
fn answer_events(group: &Group, denied: &mut u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut raw = Vec::new();
    if let Err(e) = group.read_events(&mut buf, &mut raw) {
        error!("reading fanotify events failed: {e}");
    }
    for Event { raw: r, fd } in raw {
        let decision = decide_event(fd.as_fd(), r.mask, r.pid, r.range);
        let (verdict, ignore) = match decision {
            Unserved::AllowAndIgnore => (Verdict::Allow, true),
            Unserved::Allow => (Verdict::Allow, false),
            Unserved::Deny => (Verdict::Deny(DenyErrno::Io), false),
        };
        if decision == Unserved::Deny {
            *denied += 1;
            if *denied <= 10 || denied.is_power_of_two() {
                warn!(
                    pid = r.pid,
                    denied = *denied,
                    "no daemon serves the store: an access to bytes not present was denied \
                     with EIO (start hsm serve)"
                );
            }
        }
        if ignore {
            if let Err(e) = group.ignore_inode(fd.as_fd(), MASK) {
                warn!("ignore mark failed: {e}");
            }
        }
        // Closed before the answer: the reader may unmount the filesystem the moment its
        // access returns, and this fd would hold it busy. Its number cannot be reused under
        // the answer: this process is the group's only reader, and reads nothing meanwhile.
        drop(fd);
        crate::event::answer_group(group, r.fd, verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fanotify::FAN_OPEN_PERM;

    fn source(kind: StubKind, size: u64) -> SourceRecord {
        SourceRecord {
            key: b"f".to_vec(),
            size,
            mtime: (1, 0),
            version: None,
            chunk_size: 1 << 20,
            kind,
            digests: None,
        }
    }

    /// An event from an ordinary program (not one handing the file to a kernel reader).
    fn d(
        source: Option<&[u8]>,
        state: Option<&[u8]>,
        mask: u64,
        range: Option<(u64, u64)>,
        size: u64,
    ) -> Unserved {
        decide_unserved(source, state, mask, range, size, false)
    }

    #[test]
    fn files_that_are_not_stubs_are_allowed_and_silenced() {
        assert_eq!(
            d(None, None, FAN_OPEN_PERM, None, 10),
            Unserved::AllowAndIgnore
        );
    }

    #[test]
    fn corrupt_records_are_denied() {
        let src = source(StubKind::Cloned, 8192).encode();
        let mut bad = src.clone();
        bad[5] ^= 1;
        assert_eq!(
            d(Some(&bad), None, FAN_OPEN_PERM, None, 8192),
            Unserved::Deny
        );
        let junk = Some(&b"junk"[..]);
        assert_eq!(
            d(Some(&src), junk, FAN_PRE_ACCESS, Some((0, 4096)), 8192),
            Unserved::Deny
        );
    }

    #[test]
    fn only_present_ranges_are_read() {
        let rec = source(StubKind::Cloned, 3 << 20);
        let mut st = rec.fresh_state();
        st.present.insert(0, 1 << 20);
        let (src, st) = (rec.encode(), st.encode());
        let at = |off, count| {
            d(
                Some(&src),
                Some(&st),
                FAN_PRE_ACCESS,
                Some((off, count)),
                3 << 20,
            )
        };
        assert_eq!(at(0, 4096), Unserved::Allow);
        assert_eq!(at((1 << 20) - 4096, 4096), Unserved::Allow);
        assert_eq!(at((1 << 20) - 4096, 8192), Unserved::Deny);
        assert_eq!(at(2 << 20, 4096), Unserved::Deny);
        // A clone wants the whole file.
        assert_eq!(at(0, 0), Unserved::Deny);
        // A fresh stub has nothing present.
        assert_eq!(
            d(Some(&src), None, FAN_PRE_ACCESS, Some((0, 4096)), 3 << 20),
            Unserved::Deny
        );
        // Past the size the file has now (truncated locally): the user's own bytes.
        assert_eq!(
            d(
                Some(&src),
                Some(&st),
                FAN_PRE_ACCESS,
                Some((2 << 20, 4096)),
                1 << 20
            ),
            Unserved::Allow
        );
    }

    #[test]
    fn opens_are_refused_only_where_holes_would_show() {
        let open = |kind| {
            d(
                Some(&source(kind, 8192).encode()),
                None,
                FAN_OPEN_PERM,
                None,
                8192,
            )
        };
        assert_eq!(open(StubKind::Sparse), Unserved::Deny);
        assert_eq!(open(StubKind::Cloned), Unserved::Allow);
        assert_eq!(open(StubKind::SparseLazy), Unserved::Allow);
        // Handed to a loop device, which reads without events: refused whatever the kind.
        for kind in [StubKind::Cloned, StubKind::SparseLazy, StubKind::Sparse] {
            let src = source(kind, 8192).encode();
            assert_eq!(
                decide_unserved(Some(&src), None, FAN_OPEN_PERM, None, 8192, true),
                Unserved::Deny
            );
        }
        let rec = source(StubKind::Sparse, 8192);
        let mut st = rec.fresh_state();
        st.present.insert(0, 8192);
        let (src, st) = (rec.encode(), st.encode());
        assert_eq!(
            decide_unserved(Some(&src), Some(&st), FAN_OPEN_PERM, None, 8192, true),
            Unserved::AllowAndIgnore
        );
        // An empty file is complete.
        let empty = source(StubKind::Sparse, 0).encode();
        assert_eq!(
            d(Some(&empty), None, FAN_OPEN_PERM, None, 0),
            Unserved::AllowAndIgnore
        );
    }
}
