//! File-level syscalls: `openat2` confined beneath a root, extended attributes, reflink clones,
//! filesystem identification, times.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    Advice, AtFlags, FallocateFlags, Gid, Mode, OFlags, RenameFlags, ResolveFlags, StatxFlags,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::{retry_on_intr, Errno};

use super::{cvt, cvt_retry};

/// What [`fstat`] and [`lstatat`] return.
pub use rustix::fs::Stat;

pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

pub fn path_cstring(path: &Path) -> io::Result<CString> {
    cstring(path.as_os_str().as_bytes())
}

/// The `O_*` flags callers pass (libc's numbers), as rustix takes them.
fn oflags(flags: i32) -> OFlags {
    OFlags::from_bits_retain(flags as u32)
}

/// Open `rel` beneath `root` without following any symlink and without `..` escaping it: a
/// component swapped for a symlink, or a path that climbs out, fails with ELOOP or EXDEV.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &[u8], flags: i32) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    Ok(retry_on_intr(|| {
        rustix::fs::openat2(
            root,
            rel,
            oflags(flags) | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    })?)
}

/// Open the file an `O_PATH` fd names, anew with `flags` (through `/proc/self/fd`): the same
/// inode, whatever its name points at now.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(retry_on_intr(|| {
        rustix::fs::open(
            path.as_str(),
            oflags(flags) | OFlags::CLOEXEC,
            Mode::empty(),
        )
    })?)
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)` for a single path component.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    Ok(retry_on_intr(|| {
        rustix::fs::openat(
            dir,
            name,
            oflags(flags) | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode),
        )
    })?)
}

pub fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    read_xattr(|buf| rustix::fs::fgetxattr(fd, name, buf))
}

pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty())?)
}

pub fn fremovexattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match rustix::fs::fremovexattr(fd, name) {
        Ok(()) | Err(Errno::NODATA) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Read an xattr of a path without following a final symlink and without opening the file (so no
/// fanotify event is raised, even on a watched mount).
pub fn lgetxattr(path: &Path, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    read_xattr(|buf| rustix::fs::lgetxattr(path, name, buf))
}

/// Read an xattr value with `get`, growing the buffer while the value is larger (up to 1 MiB);
/// `None` when the file has no such attribute.
fn read_xattr(
    mut get: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::NODATA) => return Ok(None),
            Err(Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e.into()),
        }
    }
}

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// Share `len` bytes of `src` at `src_off` into `dst` at `dst_off` (reflink). Offsets and length
/// must be block-aligned, except a length that reaches the end of `src`.
pub fn clone_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: src.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE takes a pointer to a valid file_clone_range.
    cvt_retry(|| unsafe {
        libc::ioctl(dst.as_raw_fd(), FICLONERANGE, &arg as *const FileCloneRange)
    })?;
    Ok(())
}

/// The filesystems `hsm` knows, identified by `statfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
    Tmpfs,
    Other(i64),
}

impl FsKind {
    /// Reads served by a local device or memory, never by a server that may stop answering.
    pub fn is_local_disk(self) -> bool {
        match self {
            FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs | FsKind::Tmpfs => true,
            // f2fs, bcachefs, zfs, squashfs, erofs, ramfs.
            FsKind::Other(m) => [
                0xF2F5_2010,
                0xCA45_1A4E,
                0x2FC1_2FC1,
                0x7371_7368,
                0xE0F5_E1E2,
                0x8584_58F6,
            ]
            .contains(&m),
        }
    }

    pub fn name(self) -> String {
        match self {
            FsKind::Ext4 => "ext4".into(),
            FsKind::Xfs => "xfs".into(),
            FsKind::Btrfs => "btrfs".into(),
            FsKind::Tmpfs => "tmpfs".into(),
            FsKind::Other(m) => format!("unknown filesystem (magic {m:#x})"),
        }
    }
}

pub fn fs_kind(fd: BorrowedFd<'_>) -> io::Result<FsKind> {
    let st = rustix::fs::fstatfs(fd)?;
    #[allow(clippy::unnecessary_cast)]
    Ok(match st.f_type as i64 {
        0xEF53 => FsKind::Ext4,
        0x5846_5342 => FsKind::Xfs,
        0x9123_683E => FsKind::Btrfs,
        0x0102_1994 => FsKind::Tmpfs,
        other => FsKind::Other(other),
    })
}

/// Free and total bytes of the filesystem holding `fd`, as `df` reports them.
pub fn fs_space(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstatvfs(fd)?;
    Ok((st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
}

/// `df`'s figures for the filesystem holding `path` (`statvfs`, which opens nothing): used,
/// total and available-to-users bytes. Used is total less free blocks, as `df` counts it.
pub fn disk_use(path: &Path) -> io::Result<(u64, u64, u64)> {
    let st = rustix::fs::statvfs(path)?;
    let frsize = st.f_frsize;
    Ok((
        st.f_blocks.saturating_sub(st.f_bfree) * frsize,
        st.f_blocks * frsize,
        st.f_bavail * frsize,
    ))
}

/// The soft limit on open files (RLIMIT_NOFILE) of this process.
pub fn open_files_limit() -> io::Result<u64> {
    super::process::nofile_limit().map(|(soft, _)| soft)
}

/// Device, inode number and birth time (ns) of the file behind `fd`; `None` where the
/// filesystem keeps no birth time.
pub fn inode_incarnation(fd: BorrowedFd<'_>) -> io::Result<Option<(u64, u64, u64)>> {
    let stx = rustix::fs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::INO | StatxFlags::BTIME,
    )?;
    if !StatxFlags::from_bits_retain(stx.stx_mask).contains(StatxFlags::BTIME) {
        return Ok(None);
    }
    let dev = rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    // An identity, not a time: wrapping is harmless.
    let btime = (stx.stx_btime.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(u64::from(stx.stx_btime.tv_nsec));
    Ok(Some((dev, stx.stx_ino, btime)))
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

pub type Timespec = (i64, i64);

/// The modification time of `st`, as [`set_times`] takes it.
pub fn mtime_of(st: &Stat) -> Timespec {
    (st.st_mtime, st.st_mtime_nsec as i64)
}

/// The access time of `st`, as [`set_times`] takes it.
pub fn atime_of(st: &Stat) -> Timespec {
    (st.st_atime, st.st_atime_nsec as i64)
}

/// Set atime and mtime of `name` in `dir` (not following symlinks), or of `dir` itself when
/// `name` is None.
pub fn set_times(
    dir: BorrowedFd<'_>,
    name: Option<&CStr>,
    atime: Timespec,
    mtime: Timespec,
) -> io::Result<()> {
    let times = Timestamps {
        last_access: timestamp(atime),
        last_modification: timestamp(mtime),
    };
    match name {
        Some(name) => rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?,
        None => rustix::fs::futimens(dir, &times)?,
    };
    Ok(())
}

fn timestamp((tv_sec, tv_nsec): Timespec) -> rustix::fs::Timespec {
    rustix::fs::Timespec { tv_sec, tv_nsec }
}

/// Give back the blocks of `[offset, offset + len)`, keeping the size (`FALLOC_FL_PUNCH_HOLE`):
/// the range then reads as zeros, and its cached pages are dropped.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    Ok(retry_on_intr(|| {
        rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    })?)
}

/// A write lease on an open file (`F_SETLEASE`, `F_WRLCK`): granted only while no other open
/// file description of the inode exists (an open fd, a mapping, an exec), and while held, any
/// new open of the inode waits until it is let go (up to `/proc/sys/fs/lease-break-time`).
/// Released when dropped. `WouldBlock` (EAGAIN) when the file is in use.
pub struct WriteLease<'a>(BorrowedFd<'a>);

impl<'a> WriteLease<'a> {
    /// The kernel tells a lease holder of an open waiting on it with SIGIO, whose default action
    /// kills the process: it is caught (and ignored: the lease is let go as soon as the work
    /// under it is done) from the first lease on.
    pub fn take(fd: BorrowedFd<'a>) -> io::Result<WriteLease<'a>> {
        static CATCH_SIGIO: std::sync::Once = std::sync::Once::new();
        let mut caught = Ok(());
        CATCH_SIGIO.call_once(|| {
            caught = signal_hook::flag::register(
                signal_hook::consts::SIGIO,
                std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
            .map(|_| ());
        });
        caught?;
        // SAFETY: plain fcntl on an open fd.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) })?;
        Ok(WriteLease(fd))
    }
}

impl Drop for WriteLease<'_> {
    fn drop(&mut self) {
        // SAFETY: plain fcntl on an open fd.
        unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}

/// `fsync`: data and metadata (the records, which are xattrs, included) durable.
pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(retry_on_intr(|| rustix::fs::fsync(fd))?)
}

/// Set only the mtime of an open file, leaving atime alone.
pub fn set_mtime(fd: BorrowedFd<'_>, mtime: Timespec) -> io::Result<()> {
    let times = Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: timestamp(mtime),
    };
    Ok(rustix::fs::futimens(fd, &times)?)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`, or of `dir` itself.
pub fn chown(dir: BorrowedFd<'_>, name: Option<&CStr>, uid: u32, gid: u32) -> io::Result<()> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    match name {
        Some(name) => {
            rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?
        }
        None => rustix::fs::fchown(dir, Some(uid), Some(gid))?,
    };
    Ok(())
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

pub fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

pub fn linkat(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
) -> io::Result<()> {
    Ok(rustix::fs::linkat(
        olddir,
        oldname,
        newdir,
        newname,
        AtFlags::empty(),
    )?)
}

/// An unnamed regular file in the directory `dir` (`O_TMPFILE`), open for writing, with
/// permission bits `mode`: no path reaches it until [`link_fd`] gives it a name, and it vanishes
/// if the process dies first. Filesystems without `O_TMPFILE` fail with `EOPNOTSUPP` (older
/// kernels: `EISDIR` or `EINVAL`).
pub fn open_tmpfile(dir: BorrowedFd<'_>, mode: u32) -> io::Result<OwnedFd> {
    Ok(retry_on_intr(|| {
        rustix::fs::openat(
            dir,
            c".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
    })?)
}

/// Give the file open at `fd` (e.g. an [`open_tmpfile`]) the name `newname` in `newdir`, failing
/// with `EEXIST` if the name is taken. `linkat(fd, "", AT_EMPTY_PATH)` needs CAP_DAC_READ_SEARCH;
/// without it (`ENOENT`/`EPERM`), the same link is made through `/proc/self/fd`.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &CStr) -> io::Result<()> {
    match rustix::fs::linkat(fd, c"", newdir, newname, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(Errno::NOENT | Errno::PERM) => {
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            Ok(rustix::fs::linkat(
                rustix::fs::CWD,
                path.as_str(),
                newdir,
                newname,
                AtFlags::SYMLINK_FOLLOW,
            )?)
        }
        Err(e) => Err(e.into()),
    }
}

/// `renameat2(olddir, oldname, newdir, newname, RENAME_NOREPLACE)`: fails with `EEXIST` rather
/// than replace what is at `newname`.
pub fn rename_noreplace(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        olddir,
        oldname,
        newdir,
        newname,
        RenameFlags::NOREPLACE,
    )?)
}

/// `renameat2(dir, a, dir, b, RENAME_EXCHANGE)`: the two names swap their inodes atomically
/// (both must exist). A file replaced this way stays reachable under the other name until it is
/// unlinked, so a replacement can still be undone.
pub fn rename_exchange(dir: BorrowedFd<'_>, a: &CStr, b: &CStr) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        dir,
        a,
        dir,
        b,
        RenameFlags::EXCHANGE,
    )?)
}

/// `renameat(dir, old, dir, new)`: `new` is replaced atomically if it exists.
pub fn rename_replace(dir: BorrowedFd<'_>, old: &CStr, new: &CStr) -> io::Result<()> {
    Ok(rustix::fs::renameat(dir, old, dir, new)?)
}

/// `unlinkat(dir, name, AT_REMOVEDIR)`: remove an empty directory.
pub fn rmdirat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    Ok(retry_on_intr(|| rustix::fs::ftruncate(fd, len))?)
}

/// Write all of `buf` at `offset`.
pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = retry_on_intr(|| rustix::io::pwrite(fd, buf, offset))?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Turn `O_DIRECT` on or off for reads and writes through `fd` (`EINVAL` where its filesystem
/// has no direct I/O).
pub fn set_direct(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let mut flags = rustix::fs::fcntl_getfl(fd)?;
    flags.set(OFlags::DIRECT, on);
    Ok(rustix::fs::fcntl_setfl(fd, flags)?)
}

/// Start reading `len` bytes of `fd` at `offset` into the page cache, without waiting for them
/// (`POSIX_FADV_WILLNEED`).
pub fn will_need(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (offset.min(i64::MAX as u64), len.min(i64::MAX as u64));
    // A zero length means "to the end of the file" to the kernel.
    let Some(len) = std::num::NonZeroU64::new(len) else {
        return Ok(());
    };
    Ok(rustix::fs::fadvise(
        fd,
        offset,
        Some(len),
        Advice::WillNeed,
    )?)
}

/// The id of the mount `fd` was opened through (`statx`, Linux 5.8+).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = rustix::fs::statx(
        fd,
        c"",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )?;
    if st.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() == 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    Ok(st.stx_mnt_id)
}

/// Whether the first page of `fd`'s file is in the page cache (`cachestat`, Linux 6.5+): a
/// query only, nothing is read. `None` where the kernel has no `cachestat`.
pub fn first_page_cached(fd: BorrowedFd<'_>) -> io::Result<Option<bool>> {
    // The kernel's `struct cachestat_range` and `struct cachestat`.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // 451 on every architecture (numbers from 403 on are shared); not in `libc` for all yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 1 };
    let mut stat = Stat::default();
    // SAFETY: both pointers name live values of the layouts the kernel reads and writes; flags
    // must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r == 0 {
        return Ok(Some(stat.nr_cache > 0));
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOSYS) => Ok(None),
        e => Err(e),
    }
}

/// Read `fd` without kernel readahead (`POSIX_FADV_RANDOM`): only the pages each read asks for.
pub fn no_readahead(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::fadvise(fd, 0, None, Advice::Random)?)
}

/// One `pread` (retried if interrupted): what it read, short at the end of the file or not.
pub fn pread_once(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    Ok(retry_on_intr(|| rustix::io::pread(fd, &mut *buf, offset))?)
}

/// Read up to `buf.len()` bytes at `offset`, stopping early only at end of file.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry_on_intr(|| rustix::io::pread(fd, &mut buf[done..], offset + done as u64))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(retry_on_intr(|| rustix::fs::fdatasync(fd))?)
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(retry_on_intr(|| rustix::fs::syncfs(fd))?)
}

/// Does this process have CAP_SYS_ADMIN in its effective set?
pub fn has_cap_sys_admin() -> bool {
    effective_caps().is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;
pub const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability set of this process (CapEff in /proc/self/status), as a bit mask
/// indexed by the `CAP_*` numbers; `None` if it cannot be read.
pub fn effective_caps() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
}

pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
}

/// `struct xfs_fsop_handlereq` (fs/xfs/libxfs/xfs_fs.h).
#[repr(C)]
struct XfsHandleReq {
    fd: u32,
    path: *mut libc::c_void,
    oflags: u32,
    ihandle: *mut libc::c_void,
    ihandlen: u32,
    ohandle: *mut libc::c_void,
    ohandlen: *mut u32,
}
// _IOWR('X', 106 / 107, struct xfs_fsop_handlereq), 56 bytes on 64-bit
const XFS_IOC_FD_TO_HANDLE: libc::c_ulong = 0xc038_586a;
const XFS_IOC_OPEN_BY_HANDLE: libc::c_ulong = 0xc038_586b;

/// xfs only: reopen `file` read-write through its handle, on the mount of `dir`. xfs gives such
/// an fd "invisible I/O" (FMODE_NOCMTIME): writes through it change neither mtime nor ctime, so
/// filling a stub is not seen as a change by readers that watch ctime (GNU tar). Needs
/// CAP_SYS_ADMIN.
pub fn xfs_reopen_invisible(dir: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut handle = [0u8; 64];
    let mut hlen: u32 = 0;
    let mut req = XfsHandleReq {
        fd: file.as_raw_fd() as u32,
        path: std::ptr::null_mut(),
        oflags: 0,
        ihandle: std::ptr::null_mut(),
        ihandlen: 0,
        ohandle: handle.as_mut_ptr().cast(),
        ohandlen: &mut hlen,
    };
    // SAFETY: `req` points at live buffers of the sizes xfs expects (a handle is at most 64 bytes).
    cvt(unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            XFS_IOC_FD_TO_HANDLE,
            &mut req as *mut XfsHandleReq,
        )
    })?;
    if hlen as usize > handle.len() {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    let mut open = XfsHandleReq {
        fd: 0,
        path: std::ptr::null_mut(),
        oflags: (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
        ihandle: handle.as_mut_ptr().cast(),
        ihandlen: hlen,
        ohandle: std::ptr::null_mut(),
        ohandlen: std::ptr::null_mut(),
    };
    // SAFETY: as above; the ioctl returns a new fd.
    let fd = cvt(unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            XFS_IOC_OPEN_BY_HANDLE,
            &mut open as *mut XfsHandleReq,
        )
    })?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An inotify fd watching the directory `dir` for the end of its filesystem: the kernel sends
/// `IN_UNMOUNT` (then `IN_IGNORED`) when the superblock is shut down, whatever mount the
/// directory was reached by, and `IN_DELETE_SELF` when it is removed. The watch holds no mount,
/// so it keeps nothing busy. The fd becomes readable at either.
pub fn watch_for_unmount(dir: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(
        &fd,
        dir,
        inotify::WatchFlags::DELETE_SELF | inotify::WatchFlags::ONLYDIR,
    )?;
    Ok(fd)
}

/// Reopen the inode behind `file` with `flags`, through the mount of `mount_dir`
/// (`name_to_handle_at` + `open_by_handle_at`): a writable fd on a file reached read-only (an
/// event fd opened on a read-only mount, as overlayfs's clones of its lower layers are), opened
/// through the daemon's own view so that its writes raise no event. Needs CAP_DAC_READ_SEARCH.
pub fn reopen_by_handle(
    mount_dir: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    flags: i32,
) -> io::Result<OwnedFd> {
    open_by_handle(mount_dir, &file_handle(file)?, flags)
}

const MAX_HANDLE_SZ: usize = 128;

/// The kernel's handle of the inode behind `file` (`name_to_handle_at`): names it for
/// [`open_by_handle`] whatever its path becomes, and never another inode.
pub fn file_handle(file: BorrowedFd<'_>) -> io::Result<FileHandle> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, 8-byte aligned.
    let mut buf = [0u64; (8 + MAX_HANDLE_SZ) / 8];
    let raw = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: the first 4 bytes are handle_bytes, inside `buf`.
    unsafe { std::ptr::write(raw.cast::<u32>(), MAX_HANDLE_SZ as u32) };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` holds a file_handle with room for MAX_HANDLE_SZ bytes; "" with
    // AT_EMPTY_PATH names `file` itself.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            file.as_raw_fd(),
            c"".as_ptr(),
            raw,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    })?;
    // SAFETY: the kernel wrote handle_bytes (at most MAX_HANDLE_SZ) after the 8-byte header.
    let len = (unsafe { std::ptr::read(raw.cast::<u32>()) } as usize).min(MAX_HANDLE_SZ);
    // Only the words the handle fills: a cache limit keeps one per file of the store.
    Ok(FileHandle(buf[..(8 + len).div_ceil(8)].into()))
}

/// A `struct file_handle` as the kernel gave it (header and handle bytes, 8-byte aligned).
#[derive(Clone)]
pub struct FileHandle(Box<[u64]>);

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileHandle({} bytes)", self.0.len() * 8 - 8)
    }
}

/// Open the inode `handle` names, through the mount of `mount_dir`. Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(
    mount_dir: BorrowedFd<'_>,
    handle: &FileHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    // SAFETY: `handle.0` is a file_handle filled by name_to_handle_at, with all of its
    // handle_bytes; open_by_handle_at only reads it, and returns a new fd.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_dir.as_raw_fd(),
            handle.0.as_ptr(),
            flags | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn the_first_page_is_cached_after_a_read_and_not_after_it_is_dropped() {
        // In the build's directory: a disk filesystem, whose pages DONTNEED drops (tmpfs's stay).
        let mut f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(f.as_fd(), 0, None, Advice::DontNeed).unwrap();
        assert_eq!(first_page_cached(f.as_fd()).unwrap(), Some(false));
        let mut byte = [0u8; 1];
        assert_eq!(pread_full(f.as_fd(), &mut byte, 0).unwrap(), 1);
        assert_eq!(first_page_cached(f.as_fd()).unwrap(), Some(true));
    }

    #[test]
    fn read_ahead_is_asked_of_files_and_its_errno_comes_back() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 64 << 10]).unwrap();
        will_need(f.as_fd(), 0, 64 << 10).unwrap();
        // posix_fadvise returns the errno itself: a pipe has no page cache to read into.
        let (read, _write) = rustix::pipe::pipe().unwrap();
        let err = will_need(read.as_fd(), 0, 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESPIPE));
    }
}
