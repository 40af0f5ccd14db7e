//! The FUSE front end: the store's tree served through a FUSE mount, for kernels (and
//! filesystems) without pre-content events.
//!
//! Same store, records, backends and engine as the fanotify front end, so a file fetched under one
//! is complete under the other. Where the fanotify front end answers the kernel's pre-content
//! events, this one is asked for every operation and does it on the store's file itself:
//!
//! - A read of a stub has the engine make its range present first, then reads the store's file.
//! - A complete file (or one that is not a stub) is opened in passthrough mode (`FOPEN_PASSTHROUGH`,
//!   Linux 6.9+) where the kernel offers it: its reads, writes and mmaps go straight to the
//!   store's file, at native speed. A stub being filled switches on its next open.
//! - A write or `fallocate` first has the engine fill the range it lands on, a truncation the
//!   page it cuts, and note any local shrink, exactly as the kernel's pre-content event for them
//!   does (see the design notes): what a user wrote, punched or cut is never fetched over.
//!
//! Inodes are named by an `O_PATH` fd (as libfuse's passthrough_hp does) and a file handle: a
//! rename or unlink by another path cannot make one name another file. The kernel keeps an inode
//! for as long as its dentry is cached, which on a big tree and a big machine is millions, so
//! past a budget (a quarter of the open-files limit) the fds used least recently are closed, to be
//! opened again by handle when the kernel next asks about their inodes: a walk of any size never
//! runs the daemon out of fds. (Asking the kernel to forget entries instead,
//! `FUSE_NOTIFY_INVAL_ENTRY`, was tried: it waits uninterruptibly on the directory's lock, which a
//! request being answered may hold, and a daemon killed then could not exit, leaving the mount
//! hung rather than failing closed.) The kernel checks owners and modes (`default_permissions`);
//! the daemon runs as root and acts on the store's files for it.
//!
//! When the daemon dies the kernel fails every access with ENOTCONN: the mount fails closed, never
//! with zeros. `serve` clears such a dead mount left on the mount point before mounting.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info, warn};

use crate::engine::{Engine, Need, Served};
use crate::metrics::{Metrics, Outcome};
use crate::sys::fanotify::{DenyErrno, FAN_PRE_ACCESS};
use crate::sys::fs as sysfs;

/// How long the kernel may cache attributes and entries. The daemon is the only writer of the
/// tree while it is mounted, so a walk of a hydrated tree need not ask again each time.
const TTL: Duration = Duration::from_secs(1);

/// The flags an inode's open may not pass on to the store's file.
/// The kernel has resolved the path (`O_NOFOLLOW` would refuse the `/proc/self/fd` link), done
/// any truncation (a `setattr` first), and gives each write its offset (`O_APPEND` would move
/// it) and buffers that `O_DIRECT` would refuse.
const OPEN_FLAGS_DROPPED: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_NOFOLLOW
    | libc::O_APPEND
    | libc::O_DIRECT;

/// `__FMODE_EXEC`: the kernel's mark on the open flags of an open for `execve`.
const FMODE_EXEC: i32 = 0x20;

/// The page a truncation or write that keeps part of it must find filled first.
const PAGE: u64 = 4096;

struct Node {
    /// Its inode number in the table.
    ino: u64,
    /// Names the inode whatever its names become, and never another (`name_to_handle_at`): its
    /// fd is opened again by it after being closed. `None`: the filesystem gives no handles,
    /// and the fd is kept.
    handle: Option<sysfs::FileHandle>,
    key: (u64, u64),
    /// Lookups the kernel counts; changed under the table's lock.
    lookups: AtomicU64,
    /// Its `O_PATH` fd (no follow) while open: closed, the least recently used first, past
    /// the table's budget.
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// [`InodeTable::clock`] at its last use.
    used: AtomicU64,
}

impl Node {
    fn new(ino: u64, fd: OwnedFd, key: (u64, u64), used: u64) -> Node {
        Node {
            ino,
            handle: sysfs::file_handle(fd.as_fd()).ok(),
            key,
            lookups: AtomicU64::new(1),
            fd: Mutex::new(Some(Arc::new(fd))),
            used: AtomicU64::new(used),
        }
    }
}

/// A node's `O_PATH` fd, open for the request that holds it.
struct NodeFd {
    fd: Arc<OwnedFd>,
}

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Arc<Node>>,
    by_key: HashMap<(u64, u64), u64>,
    /// The nodes that may have an fd open (a superset: an entry whose fd was closed meanwhile
    /// is dropped at the next scan). What eviction scans: about the budget, where the table
    /// may hold millions of nodes.
    with_fd: std::collections::HashSet<u64>,
    next: u64,
}

impl Inodes {
    /// Of the nodes with an fd open and a handle to open it again by (never the root), the
    /// `n` used least recently, taken out of [`Inodes::with_fd`]: their fds are to be closed.
    fn least_recent(&mut self, n: usize) -> Vec<Arc<Node>> {
        let by_ino = &self.by_ino;
        self.with_fd
            .retain(|ino| by_ino.get(ino).is_some_and(|node| lock(&node.fd).is_some()));
        let mut ages: Vec<(u64, u64)> = self
            .with_fd
            .iter()
            .filter_map(|ino| by_ino.get(ino))
            .filter(|node| node.ino != INodeNo::ROOT.0 && node.handle.is_some())
            .map(|node| (node.used.load(Ordering::Relaxed), node.ino))
            .collect();
        let n = n.min(ages.len());
        if n == 0 {
            return Vec::new();
        }
        if n < ages.len() {
            ages.select_nth_unstable(n - 1);
            ages.truncate(n);
        }
        ages.iter()
            .filter_map(|(_, ino)| {
                self.with_fd.remove(ino);
                self.by_ino.get(ino).cloned()
            })
            .collect()
    }
}

/// The inodes the kernel holds. It forgets none while it has memory, so a walk of a big tree on
/// a big machine leaves millions: one fd each would run the daemon out of fds. So a node keeps
/// a file handle, and only the nodes used most recently keep an fd open, up to a budget.
struct InodeTable {
    inodes: Mutex<Inodes>,
    /// The store's tree: what handles are opened through.
    root: Arc<OwnedFd>,
    /// Counts uses: the age of a node.
    clock: AtomicU64,
    /// Node fds open.
    open: AtomicUsize,
    /// Node fds kept open: a quarter of the open-files limit (the engine's fd cache, open
    /// files and the backends have the rest).
    budget: usize,
}

/// [`InodeTable::budget`] for the current open-files limit.
fn fd_budget() -> usize {
    let limit = crate::sys::process::nofile_limit().map_or(1024, |(soft, _)| soft);
    usize::try_from(limit / 4).unwrap_or(usize::MAX).max(64)
}

impl InodeTable {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `node`'s fd, opened again by its handle if it was closed.
    fn open(&self, node: &Node) -> io::Result<NodeFd> {
        node.used.store(self.tick(), Ordering::Relaxed);
        let mut slot = lock(&node.fd);
        if let Some(fd) = &*slot {
            return Ok(NodeFd { fd: fd.clone() });
        }
        let handle = node.handle.as_ref().ok_or(io::ErrorKind::NotFound)?;
        let fd = Arc::new(sysfs::open_by_handle(
            self.root.as_fd(),
            handle,
            libc::O_PATH | libc::O_NOFOLLOW,
        )?);
        *slot = Some(fd.clone());
        drop(slot);
        lock(&self.inodes).with_fd.insert(node.ino);
        self.opened();
        Ok(NodeFd { fd })
    }

    /// One more node fd open: past the budget, close the least recently used down to three
    /// quarters of it (a request using one keeps it open until it is done).
    fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open <= self.budget {
            return;
        }
        let closing = lock(&self.inodes).least_recent(open - self.budget * 3 / 4);
        let mut closed = 0;
        for node in closing {
            if lock(&node.fd).take().is_some() {
                closed += 1;
            }
        }
        self.open.fetch_sub(closed, Ordering::Relaxed);
    }

    /// A node goes: its fd with it.
    fn forgotten(&self, node: &Node) {
        if lock(&node.fd).take().is_some() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

struct Handle {
    file: OwnedFd,
    /// The inode, for [`IoModes`] (0: a directory's handle, not counted).
    ino: u64,
    /// A stub not yet complete at open: its reads and writes go through the engine.
    filled_here: bool,
    /// Held while the file is open in passthrough mode.
    backing: Option<Arc<BackingId>>,
}

/// Open files per inode, by how the kernel does their I/O. The kernel refuses (EIO) a
/// passthrough open of an inode that has opens using the page cache, and the other way round:
/// an inode's opens all take the mode of the first still open.
/// Each inode in passthrough has one backing file, shared by its opens: the kernel refuses
/// (EIO) a passthrough open that names another backing file than the inode's.
#[derive(Default)]
struct IoModes(
    HashMap<u64, (u32, u32)>,
    HashMap<u64, std::sync::Weak<BackingId>>,
);

impl IoModes {
    /// The backing file of `ino`'s passthrough opens, or one made by `make`.
    fn backing(
        &mut self,
        ino: u64,
        make: impl FnOnce() -> io::Result<BackingId>,
    ) -> io::Result<Arc<BackingId>> {
        if let Some(id) = self.1.get(&ino).and_then(|w| w.upgrade()) {
            return Ok(id);
        }
        let id = Arc::new(make()?);
        self.1.insert(ino, Arc::downgrade(&id));
        Ok(id)
    }

    /// May an open of `ino` be in passthrough mode now?
    fn passthrough_allowed(&self, ino: u64) -> bool {
        self.0.get(&ino).is_none_or(|&(cached, _)| cached == 0)
    }

    /// May an open of `ino` use the page cache now?
    fn cached_allowed(&self, ino: u64) -> bool {
        self.0
            .get(&ino)
            .is_none_or(|&(_, passthrough)| passthrough == 0)
    }

    fn opened(&mut self, ino: u64, passthrough: bool) {
        let counts = self.0.entry(ino).or_default();
        if passthrough {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
    }

    fn closed(&mut self, ino: u64, passthrough: bool) {
        if let Some(counts) = self.0.get_mut(&ino) {
            if passthrough {
                counts.1 = counts.1.saturating_sub(1);
            } else {
                counts.0 = counts.0.saturating_sub(1);
            }
            if counts.1 == 0 {
                self.1.remove(&ino);
            }
            if *counts == (0, 0) {
                self.0.remove(&ino);
            }
        }
    }
}

/// The FUSE filesystem over one store's tree.
pub struct HsmFs {
    io_modes: Mutex<IoModes>,
    engine: Arc<Engine>,
    /// Prefetch, cache limit, recording and fetch policy, as under the fanotify front end.
    services: Arc<crate::frontend::Services>,
    table: InodeTable,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    /// The kernel agreed to passthrough at init.
    passthrough: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn name_cstr(name: &OsStr) -> Result<CString, Errno> {
    if name.is_empty() || name.as_bytes().contains(&b'/') || name == ".." || name == "." {
        return Err(Errno::from_i32(libc::EINVAL));
    }
    CString::new(name.as_bytes()).map_err(|_| Errno::from_i32(libc::EINVAL))
}

fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // Digits only: no NUL can be in it.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn time_of(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// How long the kernel may keep `st`: not at all for a regular file with fewer blocks than bytes
/// (a sparse stub, likely): its blocks, times and ctime change as it is filled, and tools that
/// trust them (`tar --sparse` skips a file without blocks, and warns when a ctime moves) must see
/// the store's figures. Hydrated files keep [`TTL`], so a walk of them is not all lookups.
fn ttl_of(st: &sysfs::Stat) -> Duration {
    let sparse = (st.st_blocks as u64).saturating_mul(512) < st.st_size as u64;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && sparse {
        Duration::ZERO
    } else {
        TTL
    }
}

/// Is the regular file at `fd` (an `O_PATH` fd) with fewer blocks than bytes a stub? Asked of
/// such files only: a stub reports its full size in blocks, as if present (see `attr_of`).
fn sparse_stub(fd: BorrowedFd<'_>, st: &sysfs::Stat) -> bool {
    let sparse = (st.st_blocks as u64).saturating_mul(512) < st.st_size as u64;
    st.st_mode & libc::S_IFMT == libc::S_IFREG
        && sparse
        && rustix::fs::getxattr(
            proc_path(fd).as_c_str(),
            crate::record::XATTR_SOURCE,
            &mut [0u8; 0][..],
        )
        .is_ok()
}

/// The attributes of `st`, at `fd`. A stub counts its whole size in blocks, as a complete file
/// would: hole-aware tools (`tar --sparse`, `cp --sparse=always`) decide from the blocks, before
/// any open, that a file without them is all holes and copy zeros without reading it.
fn attr_at(ino: u64, fd: BorrowedFd<'_>, st: &sysfs::Stat) -> FileAttr {
    let mut attr = attr_of(ino, st);
    if sparse_stub(fd, st) {
        attr.blocks = (st.st_size as u64).div_ceil(512);
    }
    attr
}

/// The file type a directory listing gives for `entry`.
fn kind_of_entry(entry: &rustix::fs::DirEntry) -> FileType {
    match entry.file_type() {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Attributes of node 0 in a READDIRPLUS listing: the kernel lists the name and caches nothing.
fn unknown_attr(kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn attr_of(ino: u64, st: &sysfs::Stat) -> FileAttr {
    let (atime, mtime) = (sysfs::atime_of(st), sysfs::mtime_of(st));
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time_of(atime.0, atime.1),
        mtime: time_of(mtime.0, mtime.1),
        ctime: time_of(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

impl HsmFs {
    pub fn new(
        engine: Arc<Engine>,
        services: Arc<crate::frontend::Services>,
        tree: OwnedFd,
    ) -> io::Result<HsmFs> {
        let st = sysfs::fstat(tree.as_fd())?;
        let mut inodes = Inodes {
            next: 2,
            ..Inodes::default()
        };
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(tree);
        inodes.by_key.insert(key, INodeNo::ROOT.0);
        inodes.by_ino.insert(
            INodeNo::ROOT.0,
            Arc::new(Node {
                ino: INodeNo::ROOT.0,
                handle: None,
                key,
                lookups: AtomicU64::new(1),
                fd: Mutex::new(Some(root.clone())),
                used: AtomicU64::new(0),
            }),
        );
        Ok(HsmFs {
            engine,
            services,
            table: InodeTable {
                inodes: Mutex::new(inodes),
                root,
                clock: AtomicU64::new(0),
                open: AtomicUsize::new(0),
                budget: fd_budget(),
            },
            handles: Mutex::new(HashMap::new()),
            io_modes: Mutex::new(IoModes::default()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
        })
    }

    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        lock(&self.table.inodes)
    }

    /// Node `ino`, with its fd open.
    fn node(&self, ino: INodeNo) -> Result<NodeFd, Errno> {
        let node = self
            .inodes()
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::from_i32(libc::ESTALE))?;
        self.table.open(&node).map_err(|e| errno(&e))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles)
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::from_i32(libc::EBADF))
    }

    /// The inode number for the file at `fd` (an `O_PATH` fd), counting one more lookup.
    fn remember(&self, fd: OwnedFd) -> io::Result<(u64, sysfs::Stat)> {
        let st = sysfs::fstat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let now = self.table.tick();
        let mut inodes = self.inodes();
        if let Some(&ino) = inodes.by_key.get(&key) {
            if let Some(node) = inodes.by_ino.get(&ino) {
                node.lookups.fetch_add(1, Ordering::Relaxed);
                node.used.store(now, Ordering::Relaxed);
                // Its fd closed past the budget: this one saves opening it by handle.
                let kept = {
                    let mut slot = lock(&node.fd);
                    let closed = slot.is_none();
                    if closed {
                        *slot = Some(Arc::new(fd));
                    }
                    closed
                };
                if kept {
                    inodes.with_fd.insert(ino);
                }
                drop(inodes);
                if kept {
                    self.table.opened();
                }
                return Ok((ino, st));
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes.by_key.insert(key, ino);
        inodes
            .by_ino
            .insert(ino, Arc::new(Node::new(ino, fd, key, now)));
        inodes.with_fd.insert(ino);
        drop(inodes);
        self.table.opened();
        Ok((ino, st))
    }

    fn lookup_at(&self, parent: &NodeFd, name: &CStr) -> io::Result<(u64, sysfs::Stat)> {
        let fd = sysfs::openat(parent.fd.as_fd(), name, libc::O_PATH, 0)?;
        self.remember(fd)
    }

    fn entry(&self, parent: &NodeFd, name: &CStr, reply: ReplyEntry) {
        match self.lookup_at(parent, name) {
            Ok((ino, st)) => {
                let attr = match self.node(INodeNo(ino)) {
                    Ok(n) => attr_at(ino, n.fd.as_fd(), &st),
                    Err(_) => attr_of(ino, &st),
                };
                reply.entry_with_ttls(&ttl_of(&st), &TTL, &attr, Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Give what the caller made to the caller: files made by the daemon are root's otherwise.
    fn own(&self, dir: BorrowedFd<'_>, name: &CStr, req: &Request) -> io::Result<()> {
        sysfs::chown(dir, Some(name), req.uid(), req.gid())
    }

    /// Open the inode anew with `flags`, through its `O_PATH` fd.
    fn reopen(node: &NodeFd, flags: i32) -> io::Result<OwnedFd> {
        sysfs::reopen(node.fd.as_fd(), flags & !OPEN_FLAGS_DROPPED)
    }

    /// Have the engine make `need` of the file at `fd` present for process `pid`, counted as the
    /// fanotify front end counts the event it answers (`access`: a pre-content event, else an
    /// open), and failing as it would: the fetch policy's errno when it keeps `pid` from
    /// fetching, [`DenyErrno::for_error`]'s for a failed fill (EIO for a missing or changed
    /// source), never the backend's own.
    fn fill(&self, pid: u32, fd: BorrowedFd<'_>, need: Need, access: bool) -> io::Result<Served> {
        let mask = if access { FAN_PRE_ACCESS } else { 0 };
        if let Some(errno) = self
            .services
            .kept_from_fetching(&self.engine, pid as i32, fd, need)
        {
            self.engine
                .metrics
                .answered(mask, Outcome::PolicyDenied(errno));
            return Err(io::Error::from_raw_os_error(errno.raw()));
        }
        match self.engine.serve(fd, need) {
            Ok(served) => {
                self.engine.metrics.answered(mask, Outcome::Allowed);
                Ok(served)
            }
            Err(e) => {
                let denied = DenyErrno::for_error(&e);
                self.engine.metrics.answered(mask, Outcome::Denied(denied));
                warn!(file = %crate::engine::fd_path(fd), "access denied with {denied:?}: {e}");
                Err(io::Error::from_raw_os_error(denied.raw()))
            }
        }
    }

    /// What an access about to change the file at `fd` needs from the engine first: the page it
    /// lands on filled, and any local shrink noted (see the module doc).
    fn before_change(&self, pid: u32, fd: BorrowedFd<'_>, offset: u64) -> io::Result<()> {
        let page = offset & !(PAGE - 1);
        self.fill(
            pid,
            fd,
            Need::Range {
                offset: page,
                count: PAGE,
            },
            true,
        )
        .map(drop)
    }

    /// Before a write or an fallocate through `h`: the range it lands on filled first, as the
    /// fanotify front end's pre-content event for it asks, so that what the user writes,
    /// punches or zeroes is never fetched over. One access for the range (two, for its first
    /// and last pages, looked like a sequential reader and started the engine's readahead).
    fn before_writing(&self, pid: u32, h: &Handle, offset: u64, count: u64) -> io::Result<()> {
        if !h.filled_here {
            return Ok(());
        }
        let need = Need::Range {
            offset,
            count: count.max(1),
        };
        self.fill(pid, h.file.as_fd(), need, true).map(drop)
    }

    /// Make `name` in `parent` with `make`, give it to the caller, and answer with its entry.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<()>,
    ) {
        let (parent, name) = match (self.node(parent), name_cstr(name)) {
            (Ok(p), Ok(n)) => (p, n),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        match make(parent.fd.as_fd(), &name).and_then(|()| self.own(parent.fd.as_fd(), &name, req))
        {
            Ok(()) => self.entry(&parent, &name, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Remove `name` from `parent` with `remove` (unlink, rmdir).
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        remove: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<()>,
    ) {
        let done = self.node(parent).and_then(|p| {
            let name = name_cstr(name)?;
            remove(p.fd.as_fd(), &name).map_err(|e| errno(&e))
        });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// `complete`: whether the file is known complete (its record on disk, or the fill the open
    /// just made, says); `None`: the engine is asked.
    fn open_handle(&self, ino: u64, file: OwnedFd, complete: Option<bool>, reply: ReplyOpen) {
        // Complete as the engine knows it (its record may not be written yet): nothing left to
        // fill, so the kernel may go straight to the store's file.
        let present = match complete {
            Some(known) => Ok(known),
            None => self.engine.is_present(file.as_fd(), Need::Whole),
        };
        let mut filled_here = !matches!(present, Ok(true));
        if filled_here && !lock(&self.io_modes).cached_allowed(ino) {
            // Open in passthrough already: those opens read the store's file directly, so it
            // was complete when they opened, and a release waits for them. Made sure of (a
            // no-op then), and this open joins them rather than fail.
            debug!(
                ino,
                ?present,
                "an open of a file in passthrough found it incomplete"
            );
            match self.engine.serve(file.as_fd(), Need::Whole) {
                Ok(_) => filled_here = false,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut modes = lock(&self.io_modes);
        let mut backing = None;
        if !filled_here
            && self.passthrough.load(Ordering::Relaxed)
            && modes.passthrough_allowed(ino)
        {
            match modes.backing(ino, || reply.open_backing(file.as_fd())) {
                Ok(id) => backing = Some(id),
                Err(e) => debug!("no passthrough for this open: {e}"),
            }
        }
        if backing.is_none() && !modes.cached_allowed(ino) {
            // Open in passthrough elsewhere, and this open could not be: the kernel would refuse
            // a cached one, so it is refused here with the errno it would give.
            return reply.error(Errno::from_i32(libc::ETXTBSY));
        }
        modes.opened(ino, backing.is_some());
        drop(modes);
        // In the table before the kernel hears of it: its first read may come at once.
        let handle = Arc::new(Handle {
            file,
            ino,
            filled_here,
            backing,
        });
        lock(&self.handles).insert(fh, handle.clone());
        match &handle.backing {
            Some(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                Metrics::add(&self.engine.metrics.fuse_passthrough_opens, 1);
            }
            None => reply.opened(FileHandle(fh), FopenFlags::empty()),
        }
    }

    /// A complete file whose bytes are not in the page cache (a hydrated tree after a reboot or
    /// `drop_caches`) is an open the directory prefetch hears of, as the fanotify front end's
    /// event for such a file: a walk through the directory then finds the next files read in
    /// ahead, many at once, instead of waiting on the disk for each. Files in the page cache are
    /// not: a walk through a warm tree starts nothing.
    fn note_cold_complete_open(&self, file: BorrowedFd<'_>) {
        let Some(p) = &self.services.prefetch else {
            return;
        };
        let cold = matches!(sysfs::first_page_cached(file), Ok(Some(false)))
            && sysfs::fstat(file).is_ok_and(|st| st.st_size > 0);
        if cold {
            p.note_open(file, true);
        }
    }

    /// The kernel forgets `nlookup` lookups of `ino`: its node (and fd) goes with the last.
    fn forget_lookups(&self, ino: INodeNo, nlookup: u64) {
        if ino == INodeNo::ROOT {
            return;
        }
        let mut inodes = self.inodes();
        let Some(node) = inodes.by_ino.get(&ino.0) else {
            return;
        };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(nlookup);
        if left > 0 {
            node.lookups.store(left, Ordering::Relaxed);
            return;
        }
        if let Some(node) = inodes.by_ino.remove(&ino.0) {
            inodes.by_key.remove(&node.key);
            inodes.with_fd.remove(&ino.0);
            drop(inodes);
            self.table.forgotten(&node);
        }
    }

    fn close_handle(&self, fh: FileHandle) {
        if let Some(h) = lock(&self.handles).remove(&fh.0) {
            if h.ino != 0 {
                lock(&self.io_modes).closed(h.ino, h.backing.is_some());
            }
        }
    }
}

impl Filesystem for HsmFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // A walk lists a directory, then looks up each entry: with READDIRPLUS the listing
        // carries the entries and their attributes, and the lookups are not asked at all.
        if config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS)
            .is_err()
        {
            debug!("the kernel does not offer READDIRPLUS");
        }
        let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(offered, Ordering::Relaxed);
        info!(
            "FUSE passthrough for complete files: {}",
            if offered {
                "on"
            } else {
                "off (kernel older than 6.9)"
            }
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (parent, name) = match (self.node(parent), name_cstr(name)) {
            (Ok(p), Ok(n)) => (p, n),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        self.entry(&parent, &name, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_lookups(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match sysfs::fstat(node.fd.as_fd()) {
            Ok(st) => reply.attr(&ttl_of(&st), &attr_at(ino.0, node.fd.as_fd(), &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let done = (|| -> io::Result<sysfs::Stat> {
            let path = proc_path(node.fd.as_fd());
            if let Some(mode) = mode {
                rustix::fs::chmod(path.as_c_str(), rustix::fs::Mode::from_raw_mode(mode))?;
            }
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    node.fd.as_fd(),
                    c"",
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    rustix::fs::AtFlags::EMPTY_PATH,
                )?;
            }
            if let Some(size) = size {
                let own;
                let file = match fh.and_then(|fh| self.handle(fh).ok()) {
                    Some(h) => {
                        own = h;
                        own.file.as_fd()
                    }
                    None => {
                        let f = Self::reopen(&node, libc::O_WRONLY)?;
                        own = Arc::new(Handle {
                            file: f,
                            ino: 0,
                            filled_here: true,
                            backing: None,
                        });
                        own.file.as_fd()
                    }
                };
                let now = sysfs::fstat(file)?.st_size as u64;
                self.before_change(req.pid(), file, size.min(now))?;
                sysfs::ftruncate(file, size)?;
            }
            if atime.is_some() || mtime.is_some() {
                let spec = |t: Option<TimeOrNow>| match t {
                    None => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let (s, ns) = match t.duration_since(UNIX_EPOCH) {
                            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                            Err(e) => (-(e.duration().as_secs() as i64), 0),
                        };
                        rustix::fs::Timespec {
                            tv_sec: s,
                            tv_nsec: ns,
                        }
                    }
                };
                let times = rustix::fs::Timestamps {
                    last_access: spec(atime),
                    last_modification: spec(mtime),
                };
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    path.as_c_str(),
                    &times,
                    rustix::fs::AtFlags::empty(),
                )?;
            }
            sysfs::fstat(node.fd.as_fd())
        })();
        match done {
            Ok(st) => reply.attr(&ttl_of(&st), &attr_at(ino.0, node.fd.as_fd(), &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .node(ino)
            .and_then(|n| sysfs::readlinkat(n.fd.as_fd(), c"").map_err(|e| errno(&e)))
        {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |dir, name| {
            Ok(rustix::fs::mknodat(
                dir,
                name,
                rustix::fs::FileType::from_raw_mode(mode),
                rustix::fs::Mode::from_raw_mode(mode & !umask & 0o7777),
                rdev as u64,
            )?)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |dir, name| {
            sysfs::mkdirat(dir, name, mode & !umask & 0o7777)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, sysfs::unlinkat);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, sysfs::rmdirat);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, link_name, reply, |dir, name| {
            sysfs::symlinkat(target.as_os_str().as_bytes(), dir, name)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let done = (|| {
            let (from, to) = (self.node(parent)?, self.node(newparent)?);
            let (name, newname) = (name_cstr(name)?, name_cstr(newname)?);
            rustix::fs::renameat_with(
                from.fd.as_fd(),
                name.as_c_str(),
                to.fd.as_fd(),
                newname.as_c_str(),
                rustix::fs::RenameFlags::from_bits_retain(flags.bits()),
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))
        })();
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (node, parent, name) = match (self.node(ino), self.node(newparent), name_cstr(newname))
        {
            (Ok(n), Ok(p), Ok(name)) => (n, p, name),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return reply.error(e),
        };
        let made = rustix::fs::linkat(
            node.fd.as_fd(),
            c"",
            parent.fd.as_fd(),
            name.as_c_str(),
            rustix::fs::AtFlags::EMPTY_PATH,
        );
        match made {
            Ok(()) => self.entry(&parent, &name, reply),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Read and write, whatever the caller asked (the kernel checked its rights): the engine
        // reads back a stub's pieces to check them, and a write lands on filled pages.
        let rw = (flags.0 & !libc::O_ACCMODE) | libc::O_RDWR;
        let file = self.node(ino).and_then(|n| {
            Self::reopen(&n, rw)
                .or_else(|_| Self::reopen(&n, flags.0))
                .map_err(|e| errno(&e))
        });
        // What the fanotify front end does at an open: a sparse stub is fetched whole before
        // the open returns (hole-aware tools would copy its holes as zeros), except for exec,
        // served range by range. A file whose record says it is complete (a hydrated tree)
        // skips the engine, as the fanotify supervisor does: one xattr read, no cache entry
        // and its fds.
        let file = file.and_then(|f| {
            self.services.note_use(f.as_fd(), req.pid() as i32, None);
            if crate::record::complete_on_disk(f.as_fd()) {
                self.note_cold_complete_open(f.as_fd());
                return Ok((f, Some(true)));
            }
            if flags.0 & FMODE_EXEC != 0 {
                return Ok((f, None));
            }
            let stub = !self
                .engine
                .is_present(f.as_fd(), Need::Whole)
                .unwrap_or(false);
            let served = self
                .fill(req.pid(), f.as_fd(), Need::Open, false)
                .map_err(|e| errno(&e))?;
            if let (Some(p), true) = (&self.services.prefetch, stub) {
                // After the fill: a window never races this open for its own file.
                p.note_open(f.as_fd(), false);
            }
            Ok((f, Some(matches!(served, Served::Complete))))
        });
        match file {
            Ok((file, complete)) => self.open_handle(ino.0, file, complete, reply),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let read = (|| {
            if h.filled_here {
                let count = u64::from(size.max(1));
                self.services
                    .note_use(h.file.as_fd(), req.pid() as i32, Some((offset, count)));
                self.fill(
                    req.pid(),
                    h.file.as_fd(),
                    Need::Range { offset, count },
                    true,
                )?;
            }
            let mut buf = vec![0u8; size as usize];
            let n = sysfs::pread_full(h.file.as_fd(), &mut buf, offset)?;
            buf.truncate(n);
            Ok::<_, io::Error>(buf)
        })();
        match read {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let written = (|| {
            self.before_writing(req.pid(), &h, offset, data.len() as u64)?;
            // At the offset the kernel gives (`O_APPEND` is not passed on to the store's file).
            sysfs::pwrite_all(h.file.as_fd(), data, offset)
        })();
        match written {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let done = (|| {
            self.before_writing(req.pid(), &h, offset, length)?;
            rustix::fs::fallocate(
                h.file.as_fd(),
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                length,
            )
            .map_err(io::Error::from)
        })();
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered here: ENOSYS tells the kernel not to send a flush again, and
        // every close() then returns without a round trip to the daemon.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.close_handle(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let done = self.handle(fh).and_then(|h| {
            let r = if datasync {
                sysfs::fdatasync(h.file.as_fd())
            } else {
                sysfs::fsync(h.file.as_fd())
            };
            r.map_err(|e| errno(&e))
        });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let dir = self.node(ino).and_then(|n| {
            sysfs::openat(n.fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|e| errno(&e))
        });
        match dir {
            Ok(file) => {
                let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
                lock(&self.handles).insert(
                    fh,
                    Arc::new(Handle {
                        file,
                        ino: 0,
                        filled_here: false,
                        backing: None,
                    }),
                );
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let entries = match listing_after(&h, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for entry in entries {
            let (position, entry) = match entry {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            let kind = kind_of_entry(&entry);
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if reply.add(INodeNo(entry.ino()), position, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (h, parent) = match (self.handle(fh), self.node(ino)) {
            (Ok(h), Ok(p)) => (h, p),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let entries = match listing_after(&h, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        // As `readdir`; each entry is looked up as `lookup` does (one more lookup the kernel
        // counts), but "." and "..", which the kernel does not count.
        for entry in entries {
            let (position, entry) = match entry {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            let name = entry.file_name();
            let dots = matches!(name.to_bytes(), b"." | b"..");
            let looked_up = if dots {
                sysfs::lstatat(parent.fd.as_fd(), name).map(|st| (entry.ino(), st))
            } else {
                self.lookup_at(&parent, name)
            };
            let (node, ttl, attr) = match looked_up {
                Ok((node, st)) => {
                    let attr = match self.node(INodeNo(node)) {
                        Ok(n) if !dots => attr_at(node, n.fd.as_fd(), &st),
                        _ => attr_of(node, &st),
                    };
                    (node, ttl_of(&st), attr)
                }
                // Removed since it was listed.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                // Listed without attributes (node 0): its own lookup comes later, and fails or
                // not on its own.
                Err(e) => {
                    debug!("readdirplus: no attributes for an entry: {e}");
                    (0, Duration::ZERO, unknown_attr(kind_of_entry(&entry)))
                }
            };
            let name = OsStr::from_bytes(name.to_bytes());
            if reply.add(INodeNo(node), position, name, &ttl, &attr, Generation(0)) {
                // Full: the kernel never sees this entry, so its lookup is not counted.
                if !dots && node != 0 {
                    self.forget_lookups(INodeNo(node), 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.close_handle(fh);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let st = self.node(ino).and_then(|n| {
            rustix::fs::fstatvfs(n.fd.as_fd()).map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match st {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if is_ours(name) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let done = self.node(ino).and_then(|n| {
            rustix::fs::setxattr(
                proc_path(n.fd.as_fd()).as_c_str(),
                name.as_bytes(),
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as u32),
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Our records are read as through the fanotify front end's mount (`hsm status` and
        // `hsm verify` of MOUNTPOINT paths): the kernel lets only CAP_SYS_ADMIN ask for a
        // `trusted.*` name. Unlisted, so copies (`cp -a`, `tar --xattrs`) do not take them.
        let got = self.node(ino).and_then(|n| {
            let mut buf = vec![0u8; if size == 0 { 64 << 10 } else { size as usize }];
            rustix::fs::getxattr(
                proc_path(n.fd.as_fd()).as_c_str(),
                name.as_bytes(),
                &mut buf,
            )
            .map(|len| {
                buf.truncate(len);
                buf
            })
            .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match got {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let got = self.node(ino).and_then(|n| {
            let mut buf = vec![0u8; 64 << 10];
            rustix::fs::listxattr(proc_path(n.fd.as_fd()).as_c_str(), &mut buf)
                .map(|len| {
                    buf.truncate(len);
                    // Our records are the daemon's, not the user's.
                    buf.split(|&b| b == 0)
                        .filter(|n| !n.is_empty() && !is_ours(OsStr::from_bytes(n)))
                        .flat_map(|n| n.iter().copied().chain([0]))
                        .collect::<Vec<u8>>()
                })
                .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match got {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if is_ours(name) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let done = self.node(ino).and_then(|n| {
            rustix::fs::removexattr(proc_path(n.fd.as_fd()).as_c_str(), name.as_bytes())
                .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (parent, name) = match (self.node(parent), name_cstr(name)) {
            (Ok(p), Ok(n)) => (p, n),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let made = (|| {
            let file = sysfs::openat(
                parent.fd.as_fd(),
                &name,
                (flags | libc::O_CREAT) & !libc::O_NOCTTY,
                mode & !umask & 0o7777,
            )?;
            self.own(parent.fd.as_fd(), &name, req)?;
            let (ino, st) = self.lookup_at(&parent, &name)?;
            Ok::<_, io::Error>((file, ino, st))
        })();
        let (file, ino, st) = match made {
            Ok(x) => x,
            Err(e) => return reply.error(errno(&e)),
        };
        // A new file is never a stub: passthrough from the start where the kernel offers it.
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let attr = attr_of(ino, &st);
        let mut modes = lock(&self.io_modes);
        let backing = if self.passthrough.load(Ordering::Relaxed) {
            modes.backing(ino, || reply.open_backing(file.as_fd())).ok()
        } else {
            None
        };
        modes.opened(ino, backing.is_some());
        drop(modes);
        // In the table before the kernel hears of it: its first write may come at once.
        let handle = Arc::new(Handle {
            file,
            ino,
            filled_here: false,
            backing,
        });
        lock(&self.handles).insert(fh, handle.clone());
        match &handle.backing {
            Some(id) => {
                Metrics::add(&self.engine.metrics.fuse_passthrough_opens, 1);
                reply.created_passthrough(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                    id,
                )
            }
            None => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
        }
    }
}

/// The store's own extended attributes (`trusted.hsm.*`): hidden from the mount's users.
/// The entries of the directory open as `h` after the first `offset`, with their positions.
/// Offsets are positions in the listing: the directory is read from its start each time.
fn listing_after(
    h: &Handle,
    offset: u64,
) -> Result<impl Iterator<Item = Result<(u64, rustix::fs::DirEntry), Errno>>, Errno> {
    let dir = rustix::fs::Dir::read_from(h.file.as_fd())
        .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
    Ok((1u64..)
        .zip(dir)
        .skip(offset as usize)
        .map(|(position, entry)| {
            entry
                .map(|e| (position, e))
                .map_err(|e| Errno::from_i32(e.raw_os_error()))
        }))
}

fn is_ours(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b"trusted.hsm.")
}

/// Whether the kernel or the store's filesystem lacks pre-content events: only then does `auto`
/// choose FUSE. Any other failure (no CAP_SYS_ADMIN, no such store) is the fanotify front end's
/// to explain: a missing privilege must not quietly change how the tree is served.
pub fn pre_content_unsupported(tree: &Path) -> bool {
    let probed = crate::sys::fanotify::Group::new().and_then(|g| g.probe_pre_content(tree));
    matches!(
        probed.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS))
    )
}

/// Clear a dead FUSE mount of hsm's left on `mountpoint` by a daemon that died (its accesses
/// fail with ENOTCONN): detached, so that a new mount can take its place. Any other mount there
/// is left alone (and the mount that follows fails on it or stacks on it, as the user asked).
pub fn clear_dead_mount(mountpoint: &Path) -> anyhow::Result<()> {
    // statfs always asks the daemon (a stat may be answered from the kernel's attribute cache).
    let dead = matches!(
        rustix::fs::statfs(mountpoint),
        Err(rustix::io::Errno::NOTCONN)
    );
    if !dead {
        return Ok(());
    }
    let at = std::path::absolute(mountpoint)?;
    let ours = crate::sys::mount::mounts()?
        .iter()
        .any(|m| m.mount_point == at && m.fstype.starts_with("fuse") && m.source == "hsm");
    if !ours {
        bail!(
            "{} is a dead FUSE mount of another program: unmount it (umount -l) or choose \
             another mount point",
            mountpoint.display()
        );
    }
    warn!(
        "{}: a dead FUSE mount of hsm's (its daemon is gone): detaching it",
        mountpoint.display()
    );
    crate::sys::mount::detach(mountpoint)
        .with_context(|| format!("cannot detach the dead mount on {}", mountpoint.display()))
}

/// Options of the FUSE front end's session.
pub struct SessionOptions {
    /// Threads answering the kernel's requests (reads of stubs wait on fetches in them).
    pub threads: usize,
    /// `allow_other`: users other than root may use the mount (owners and modes still apply).
    pub allow_other: bool,
}

/// Mount `fs` on `mountpoint` and serve it until `stop` is set (or the mount is taken away).
pub fn run(
    fs: HsmFs,
    mountpoint: &Path,
    opts: &SessionOptions,
    stop: &AtomicBool,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    if !mountpoint.is_dir() {
        bail!(
            "the mount point {} is not a directory",
            mountpoint.display()
        );
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("hsm".into()),
        MountOption::Subtype("hsm".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::Exec,
    ];
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::RootAndOwner
    };
    config.n_threads = Some(opts.threads.max(2));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &config).with_context(|| {
        format!(
            "cannot mount FUSE on {} (is /dev/fuse there, and the fuse module loaded?)",
            mountpoint.display()
        )
    })?;
    let background = session.spawn().context("cannot start the FUSE session")?;
    on_ready();
    while !stop.load(Ordering::Relaxed) && !background.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    info!("unmounting {}", mountpoint.display());
    background
        .umount_and_join()
        .with_context(|| format!("cannot unmount {}", mountpoint.display()))
}

/// `hsm serve --frontend fuse`: serve the store at `store_root` on `mountpoint` through FUSE
/// until SIGINT or SIGTERM. One process: there is no event to hold across a crash (the kernel
/// fails the mount's accesses with ENOTCONN when it dies), so no supervisor is needed.
pub fn serve(
    store_root: &Path,
    mountpoint: &Path,
    opts: &crate::worker::WorkerOptions,
    nonempty: bool,
) -> anyhow::Result<()> {
    use crate::store::Store;
    use crate::sys::shm::Shared;
    // Root without CAP_SYS_ADMIN could not mount (and would be told only that the mount failed).
    if rustix::process::geteuid().as_raw() != 0 || !sysfs::has_cap_sys_admin() {
        bail!(
            "hsm serve --frontend fuse needs root with CAP_SYS_ADMIN: it mounts FUSE and writes \
             the store's records; run it as root"
        );
    }
    // One O_PATH fd per inode the kernel holds: a walk of more files than a login's 1,024
    // would fail with EMFILE.
    crate::supervisor::raise_fd_limit();
    // Before any thread starts (see `reserve_fd_table`).
    let _ = crate::sys::process::reserve_fd_table(crate::worker::FD_TABLE_SLOTS);
    let store_root = store_root
        .canonicalize()
        .with_context(|| format!("cannot find the store {}", store_root.display()))?;
    Store::check_exists(&store_root)?;
    Store::check_private_at(&store_root)?;
    crate::store::check_supported(
        crate::store::filesystem_of(&store_root.join("tree"))?,
        &store_root,
    )?;
    // A guard left by the fanotify front end holds the filesystem's mark: this process reads
    // the store's files directly, so the guard goes (the tree is then reached through FUSE).
    if crate::guard::stop(&store_root)? {
        info!("stopped the store's fanotify guard: the store is served by FUSE now");
    }
    let store = Store::open(&store_root)?;
    let _lock = match store.try_lock("hsm serve --frontend fuse")? {
        Ok(lock) => lock,
        Err(holder) => bail!(
            "the store {} is in use by {holder}; start hsm serve when it is done",
            store_root.display()
        ),
    };
    // A dead FUSE mount cannot even be resolved: cleared first.
    clear_dead_mount(mountpoint)?;
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create mount point {}", mountpoint.display()))?;
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("cannot find the mount point {}", mountpoint.display()))?;
    let entries = std::fs::read_dir(&mountpoint)?.count();
    if entries > 0 && !nonempty {
        bail!(
            "{} is not empty ({entries} entries): the tree mounted there would hide them; \
             choose an empty directory, or pass --nonempty",
            mountpoint.display()
        );
    }
    let metrics = Shared::<Metrics>::create(c"hsm-metrics").context("cannot map the metrics")?;
    // SIGHUP re-reads an S3 source's credentials, as under the fanotify front end.
    let sighup = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    let backend = crate::worker::serving_backend(&store, &opts.fetch_user, sighup, &metrics)?;
    let engine = Arc::new(Engine::new(
        backend,
        metrics,
        None,
        opts.readahead,
        opts.fetch_deadline,
        crate::engine::StoreAccess::of(&store, Some(store.open_tree()?)),
    ));
    Metrics::add(&engine.metrics.worker_starts, 1);
    engine.start_readahead(8);
    let services = Arc::new(crate::frontend::Services::start(
        &engine,
        &store,
        opts,
        None,
        &store.tree(),
    )?);
    let flusher = {
        let engine = engine.clone();
        let metrics_path = store.metrics_path();
        std::thread::spawn(move || {
            engine.run_flusher(Duration::from_millis(500), || {
                engine.metrics.write(&metrics_path)
            })
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let fs = HsmFs::new(engine.clone(), services.clone(), store.open_tree()?)?;
    let session = SessionOptions {
        threads: opts.threads,
        allow_other: true,
    };
    let served = run(fs, &mountpoint, &session, &stop, || {
        // Paths under the mount point name its root, not the store's tree.
        services.serve_control_at(&mountpoint);
        println!("ready");
        let _ = crate::sys::ipc::sd_notify("READY=1", None);
        info!(
            "serving {} on {} through FUSE",
            store_root.display(),
            mountpoint.display()
        );
    });
    let _ = crate::sys::ipc::sd_notify("STOPPING=1", None);
    engine.stop_readahead();
    engine.stop_flusher();
    let _ = flusher.join();
    engine.flush(true);
    engine.metrics.write(&store.metrics_path());
    services.finish();
    served
}

/// Which front end `hsm serve` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    Auto,
    Fanotify,
    Fuse,
}

/// The front end to run for the store at `store_root`: `auto` becomes fanotify where the
/// kernel and the store's filesystem give pre-content events, else FUSE. Printed and logged.
pub fn choose(asked: Frontend, store_root: &Path) -> Frontend {
    let chosen = match asked {
        // A store on a filesystem that stores are not made on is the fanotify front end's to
        // refuse, with its reason.
        Frontend::Auto
            if crate::store::filesystem_of(&store_root.join("tree"))
                .is_ok_and(|k| crate::store::check_supported(k, store_root).is_ok())
                && pre_content_unsupported(&store_root.join("tree")) =>
        {
            Frontend::Fuse
        }
        Frontend::Auto => Frontend::Fanotify,
        other => other,
    };
    let why = match (asked, chosen) {
        (Frontend::Auto, Frontend::Fanotify) => " (auto)",
        (Frontend::Auto, _) => " (auto: no pre-content events on this kernel or filesystem)",
        _ => "",
    };
    let name = if chosen == Frontend::Fuse {
        "fuse"
    } else {
        "fanotify"
    };
    eprintln!("hsm: front end: {name}{why}");
    info!("front end: {name}{why}");
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table whose node i+1 was last used at `ages[i]`, each with an fd and a handle (of `/`).
    fn table_of(ages: &[u64]) -> InodeTable {
        let root = || rustix::fs::open("/", rustix::fs::OFlags::PATH, rustix::fs::Mode::empty());
        let mut inodes = Inodes::default();
        for (i, &used) in ages.iter().enumerate() {
            let ino = i as u64 + 1;
            let node = Node::new(ino, root().unwrap(), (0, ino), used);
            assert!(node.handle.is_some(), "/ gives handles");
            inodes.by_ino.insert(ino, Arc::new(node));
            inodes.with_fd.insert(ino);
        }
        InodeTable {
            inodes: Mutex::new(inodes),
            root: Arc::new(
                rustix::fs::open(
                    "/",
                    rustix::fs::OFlags::DIRECTORY,
                    rustix::fs::Mode::empty(),
                )
                .unwrap(),
            ),
            clock: AtomicU64::new(ages.iter().copied().max().unwrap_or(0)),
            open: AtomicUsize::new(ages.len()),
            budget: 8,
        }
    }

    fn with_fd(t: &InodeTable) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&t.inodes)
            .by_ino
            .iter()
            .filter(|(_, n)| lock(&n.fd).is_some())
            .map(|(&i, _)| i)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn past_the_budget_the_fds_used_least_recently_are_closed_never_the_roots() {
        // Node 1 is the root, the oldest of all.
        let t = table_of(&[0, 50, 10, 40, 20, 30, 60, 70]);
        assert_eq!(with_fd(&t).len(), 8);
        // A ninth fd (opened elsewhere): down to 6 (three quarters of 8), the 3 used least
        // recently closed (used at 10, 20 and 30).
        t.opened();
        assert_eq!(with_fd(&t), [1, 2, 4, 7, 8]);
        assert_eq!(t.open.load(Ordering::Relaxed), 6);
        // A closed one is opened again by its handle when used, and counts as used now.
        let node = lock(&t.inodes).by_ino[&3].clone();
        let fd = t.open(&node).unwrap();
        assert_eq!(
            sysfs::fstat(fd.fd.as_fd()).unwrap().st_ino,
            sysfs::fstat(t.root.as_fd()).unwrap().st_ino
        );
        assert_eq!(with_fd(&t), [1, 2, 3, 4, 7, 8]);
        assert_eq!(t.open.load(Ordering::Relaxed), 7);
        assert!(Inodes::default().least_recent(3).is_empty());
        // Only the nodes with an fd are scanned, and the closed ones are not kept there.
        assert_eq!(
            lock(&t.inodes)
                .with_fd
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [1, 2, 3, 4, 7, 8].into()
        );
    }
}
