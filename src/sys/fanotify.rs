//! fanotify with pre-content events (Linux 6.14+).
//!
//! The pre-content constants are not in `libc` yet, so they are defined here, checked against the
//! kernel's uapi header values. Event parsing is a pure function over a byte buffer so that it can
//! be unit-tested and fuzzed without a kernel; ownership of each event's fd is taken immediately
//! after parsing, so no fd can leak, whatever happens to the event afterwards.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::{cvt, cvt_retry};

// Event bits (include/uapi/linux/fanotify.h).
pub const FAN_MODIFY: u64 = 0x0000_0002;
pub const FAN_OPEN_PERM: u64 = 0x0001_0000;
pub const FAN_ACCESS_PERM: u64 = 0x0002_0000;
pub const FAN_OPEN_EXEC_PERM: u64 = 0x0004_0000;
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
/// Pre-content access: raised before a read, write, truncate, mmap or clone touches a file range.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;

// fanotify_init flags.
pub const FAN_CLOEXEC: u32 = 0x01;
pub const FAN_NONBLOCK: u32 = 0x02;
pub const FAN_CLASS_PRE_CONTENT: u32 = 0x08;
pub const FAN_UNLIMITED_QUEUE: u32 = 0x10;

// fanotify_mark flags.
pub const FAN_MARK_ADD: u32 = 0x01;
pub const FAN_MARK_REMOVE: u32 = 0x02;
pub const FAN_MARK_MOUNT: u32 = 0x10;
pub const FAN_MARK_FILESYSTEM: u32 = 0x100;
pub const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x40;
pub const FAN_MARK_EVICTABLE: u32 = 0x200;
pub const FAN_MARK_IGNORE: u32 = 0x400;

// Responses.
pub const FAN_ALLOW: u32 = 0x01;
pub const FAN_DENY: u32 = 0x02;

pub const FANOTIFY_METADATA_VERSION: u8 = 3;
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
const METADATA_LEN: usize = 24;
const RANGE_INFO_LEN: usize = 24;

/// The errnos the kernel accepts in a `FAN_DENY` response (fs/notify/fanotify/fanotify_user.c,
/// `process_access_response`). Anything else is refused with EINVAL, so the type only admits these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyErrno {
    Io,
    Perm,
    Busy,
    TxtBsy,
    Again,
    NoSpc,
    DQuot,
}

impl DenyErrno {
    pub fn raw(self) -> i32 {
        match self {
            DenyErrno::Io => libc::EIO,
            DenyErrno::Perm => libc::EPERM,
            DenyErrno::Busy => libc::EBUSY,
            DenyErrno::TxtBsy => libc::ETXTBSY,
            DenyErrno::Again => libc::EAGAIN,
            DenyErrno::NoSpc => libc::ENOSPC,
            DenyErrno::DQuot => libc::EDQUOT,
        }
    }

    /// The truthful errno for a failed fill: disk-space errors keep their meaning, a timeout asks
    /// the reader to retry, anything else is an I/O error.
    pub fn for_error(err: &io::Error) -> DenyErrno {
        match err.raw_os_error() {
            Some(libc::ENOSPC) => DenyErrno::NoSpc,
            Some(libc::EDQUOT) => DenyErrno::DQuot,
            Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => DenyErrno::Again,
            _ => DenyErrno::Io,
        }
    }
}

/// The answer to a permission event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(DenyErrno),
}

impl DenyErrno {
    fn from_raw(errno: i32) -> Option<DenyErrno> {
        [
            DenyErrno::Io,
            DenyErrno::Perm,
            DenyErrno::Busy,
            DenyErrno::TxtBsy,
            DenyErrno::Again,
            DenyErrno::NoSpc,
            DenyErrno::DQuot,
        ]
        .into_iter()
        .find(|e| e.raw() == errno)
    }
}

impl Verdict {
    /// Inverse of `encode`, for verdicts received from another process: only responses the
    /// kernel would accept decode.
    pub fn decode(raw: u32) -> Option<Verdict> {
        match (raw & 0xff_ffff, raw >> 24) {
            (FAN_ALLOW, 0) => Some(Verdict::Allow),
            (FAN_DENY, errno) => DenyErrno::from_raw(errno as i32).map(Verdict::Deny),
            _ => None,
        }
    }

    pub fn encode(self) -> u32 {
        match self {
            Verdict::Allow => FAN_ALLOW,
            Verdict::Deny(errno) => FAN_DENY | ((errno.raw() as u32) << 24),
        }
    }
}

/// One event as the kernel wrote it, before its fd is owned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    pub fd: RawFd,
    pub pid: i32,
    /// `(offset, count)` of a pre-content event. `count == 0` means "the whole file" (a clone).
    pub range: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("fanotify metadata version {0}, expected {FANOTIFY_METADATA_VERSION}")]
    Version(u8),
    #[error("malformed fanotify event record at byte {0}")]
    Malformed(usize),
}

/// Parse a buffer filled by `read()` on a fanotify fd. Truncated or inconsistent records end the
/// parse with an error; events before them are returned in `out`. Never panics on any input.
pub fn parse_events(buf: &[u8], out: &mut Vec<RawEvent>) -> Result<(), ParseError> {
    let mut pos = 0usize;
    while buf.len() - pos >= METADATA_LEN {
        let rec = &buf[pos..];
        let event_len = u32::from_ne_bytes(rec[0..4].try_into().unwrap()) as usize;
        let vers = rec[4];
        let metadata_len = u16::from_ne_bytes(rec[6..8].try_into().unwrap()) as usize;
        if vers != FANOTIFY_METADATA_VERSION {
            return Err(ParseError::Version(vers));
        }
        if event_len < METADATA_LEN
            || metadata_len < METADATA_LEN
            || metadata_len > event_len
            || event_len > rec.len()
        {
            return Err(ParseError::Malformed(pos));
        }
        let mask = u64::from_ne_bytes(rec[8..16].try_into().unwrap());
        let fd = i32::from_ne_bytes(rec[16..20].try_into().unwrap());
        let pid = i32::from_ne_bytes(rec[20..24].try_into().unwrap());
        let mut range = None;
        let mut info = metadata_len;
        while event_len - info >= 4 {
            let info_type = rec[info];
            let info_len = u16::from_ne_bytes(rec[info + 2..info + 4].try_into().unwrap()) as usize;
            if info_len < 4 || info_len > event_len - info {
                return Err(ParseError::Malformed(pos + info));
            }
            if info_type == FAN_EVENT_INFO_TYPE_RANGE {
                if info_len < RANGE_INFO_LEN {
                    return Err(ParseError::Malformed(pos + info));
                }
                let offset = u64::from_ne_bytes(rec[info + 8..info + 16].try_into().unwrap());
                let count = u64::from_ne_bytes(rec[info + 16..info + 24].try_into().unwrap());
                range = Some((offset, count));
            }
            info += info_len;
        }
        out.push(RawEvent {
            mask,
            fd,
            pid,
            range,
        });
        pos += event_len;
    }
    Ok(())
}

/// One event read from a group, its fd owned: dropping it closes the fd, so answer first
/// (see [`Group::respond`]: the kernel matches answers by fd number).
#[derive(Debug)]
pub struct Event {
    pub raw: RawEvent,
    pub fd: OwnedFd,
}

/// A fanotify group of class `FAN_CLASS_PRE_CONTENT`.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// Needs CAP_SYS_ADMIN. Event fds are read-only: the kernel opens each on the mount the
    /// access came through, and a read-write open fails on a read-only mount (overlayfs reaches
    /// its lower layers through read-only clones), which fails the whole `read` of events and
    /// denies the access. Fills are written through the inode reopened on the daemon's view.
    pub fn new() -> io::Result<Group> {
        let flags = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // SAFETY: plain syscall with integer arguments.
        let fd = cvt(unsafe { libc::fanotify_init(flags, event_flags) })?;
        // SAFETY: fanotify_init returned a new fd that nothing else owns.
        Ok(Group {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn from_fd(fd: OwnedFd) -> Group {
        Group { fd }
    }

    fn mark(&self, flags: u32, mask: u64, dirfd: BorrowedFd<'_>) -> io::Result<()> {
        self.mark_at(flags, mask, dirfd, None)
    }

    fn mark_at(
        &self,
        flags: u32,
        mask: u64,
        dirfd: BorrowedFd<'_>,
        path: Option<&std::ffi::CStr>,
    ) -> io::Result<()> {
        // SAFETY: a NULL pathname makes the kernel use `dirfd` itself; otherwise it is a valid,
        // NUL-terminated path resolved relative to `dirfd`.
        cvt(unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                dirfd.as_raw_fd(),
                path.map_or(std::ptr::null(), |p| p.as_ptr()),
            )
        })?;
        Ok(())
    }

    /// Watch every file reached through the mount that `mount_fd` refers to (an `open_tree` fd or
    /// any fd on that mount). The path "." lets the kernel accept an `O_PATH` fd, which is what
    /// `open_tree` returns.
    pub fn mark_mount(&self, mount_fd: BorrowedFd<'_>, mask: u64) -> io::Result<()> {
        self.mark_at(FAN_MARK_ADD | FAN_MARK_MOUNT, mask, mount_fd, Some(c"."))
    }

    /// Watch every file of the filesystem that `fd` is on, through every mount of it: bind mounts,
    /// copies in other mount namespaces, overlayfs's private clones of its layers, the store's own
    /// path. A mount mark alone covers one mount, and every other mount read stub zeros.
    pub fn mark_filesystem(&self, fd: BorrowedFd<'_>, mask: u64) -> io::Result<()> {
        self.mark_at(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, fd, Some(c"."))
    }

    /// Silence `mask` for every file reached through the mount `mount_fd` refers to (an
    /// `open_tree` clone only the daemon holds): the daemon's own reads and writes of the store
    /// then raise no event, so it never waits on itself.
    pub fn ignore_mount(&self, mount_fd: BorrowedFd<'_>, mask: u64) -> io::Result<()> {
        self.mark_at(
            FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY,
            mask,
            mount_fd,
            Some(c"."),
        )
    }

    /// Answer with `verdict` every event read but not answered by a process that is gone, by
    /// writing a response for each fd number below `limit`. The kernel matches a response by fd
    /// number alone, so such leftovers would otherwise take the answers meant for newer events
    /// that get the same numbers. Call it before reading anything from the group. Returns how
    /// many events it answered. About 0.3 s per million numbers.
    pub fn answer_leftovers(&self, limit: RawFd, verdict: Verdict) -> usize {
        (0..limit)
            .filter(|&fd| self.respond(fd, verdict).is_ok())
            .count()
    }

    /// Silence `mask` for the inode behind `file` through every mount. Evictable: the kernel may drop
    /// it with the inode, after which events come again. Survives modification, so a local write to
    /// a complete file does not bring the events back.
    pub fn ignore_inode(&self, file: BorrowedFd<'_>, mask: u64) -> io::Result<()> {
        self.mark(
            FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE,
            mask,
            file,
        )
    }

    /// Remove the ignore mark of the inode behind `file` (none there is not an error): its
    /// events are reported again.
    pub fn unignore_inode(&self, file: BorrowedFd<'_>, mask: u64) -> io::Result<()> {
        match self.mark(FAN_MARK_REMOVE | FAN_MARK_IGNORE, mask, file) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Read a batch of events into `buf` and parse them, each with its fd owned. Returns `Ok(0)`
    /// when non-blocking and nothing is queued. Events without an fd (the kernel could not open
    /// one) are left out.
    pub fn read_events(&self, buf: &mut [u8], out: &mut Vec<Event>) -> io::Result<usize> {
        let n = cvt_retry(|| {
            // SAFETY: the buffer is valid for writes of its length.
            unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
        });
        let n = match n {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut raw = Vec::new();
        let parsed = parse_events(&buf[..n], &mut raw);
        let before = out.len();
        for ev in raw {
            if ev.fd >= 0 {
                // SAFETY: the kernel installed this fd in this process for this event, by this
                // read; nothing else knows its number yet.
                let fd = unsafe { OwnedFd::from_raw_fd(ev.fd) };
                out.push(Event { raw: ev, fd });
            }
        }
        if let Err(e) = parsed {
            // The events we did parse are denied (EIO), then their fds closed: the caller never
            // sees them, and an event's fd is never closed unanswered (its number could then
            // be given to a newer event under a late answer). Unparsed ones cannot be named.
            for ev in out.drain(before..) {
                let _ = self.respond(ev.raw.fd, Verdict::Deny(DenyErrno::Io));
            }
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(out.len() - before)
    }

    /// Answer the permission event whose fd number (in the process that read it) is `fd`.
    pub fn respond(&self, fd: RawFd, verdict: Verdict) -> io::Result<()> {
        let resp = libc::fanotify_response {
            fd,
            response: verdict.encode(),
        };
        let len = std::mem::size_of_val(&resp);
        // SAFETY: writes `len` bytes from a valid, initialised struct.
        let n = cvt_retry(|| unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&resp as *const libc::fanotify_response).cast(),
                len,
            )
        })?;
        if n as usize != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short fanotify response",
            ));
        }
        Ok(())
    }

    /// Probe whether the running kernel and the filesystem at `path` support pre-content events.
    pub fn probe_pre_content(&self, dir: &Path) -> io::Result<()> {
        let f = std::fs::File::open(dir)?;
        // An inode mark on the directory itself is the least intrusive probe: no event can fire
        // for a directory, and it is removed straight away.
        self.mark(FAN_MARK_ADD, FAN_PRE_ACCESS, f.as_fd())?;
        let _ = self.mark(FAN_MARK_REMOVE, FAN_PRE_ACCESS, f.as_fd());
        Ok(())
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mask: u64, fd: i32, pid: i32, range: Option<(u64, u64)>) -> Vec<u8> {
        let len = if range.is_some() { 48u32 } else { 24 };
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.push(FANOTIFY_METADATA_VERSION);
        v.push(0);
        v.extend_from_slice(&24u16.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&fd.to_ne_bytes());
        v.extend_from_slice(&pid.to_ne_bytes());
        if let Some((off, count)) = range {
            v.push(FAN_EVENT_INFO_TYPE_RANGE);
            v.push(0);
            v.extend_from_slice(&24u16.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&off.to_ne_bytes());
            v.extend_from_slice(&count.to_ne_bytes());
        }
        v
    }

    #[test]
    fn parses_pre_access_with_range_and_open_perm() {
        let mut buf = record(FAN_PRE_ACCESS, 7, 100, Some((12288, 4096)));
        buf.extend(record(FAN_OPEN_PERM, 8, 101, None));
        let mut out = Vec::new();
        parse_events(&buf, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                RawEvent {
                    mask: FAN_PRE_ACCESS,
                    fd: 7,
                    pid: 100,
                    range: Some((12288, 4096))
                },
                RawEvent {
                    mask: FAN_OPEN_PERM,
                    fd: 8,
                    pid: 101,
                    range: None
                },
            ]
        );
    }

    #[test]
    fn rejects_bad_version_and_truncated_records() {
        let mut buf = record(FAN_PRE_ACCESS, 7, 1, Some((0, 0)));
        buf[4] = 2;
        assert_eq!(
            parse_events(&buf, &mut Vec::new()),
            Err(ParseError::Version(2))
        );
        let buf = record(FAN_PRE_ACCESS, 7, 1, Some((0, 0)));
        let mut out = Vec::new();
        assert!(parse_events(&buf[..40], &mut out).is_err());
        assert!(out.is_empty());
        // An info record claiming more bytes than the event holds.
        let mut buf = record(FAN_PRE_ACCESS, 7, 1, Some((0, 0)));
        buf[26] = 200;
        assert!(parse_events(&buf, &mut Vec::new()).is_err());
    }

    #[test]
    fn deny_encodes_errno_in_high_byte() {
        assert_eq!(Verdict::Deny(DenyErrno::Io).encode(), FAN_DENY | (5 << 24));
        assert_eq!(Verdict::Allow.encode(), FAN_ALLOW);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut out = Vec::new();
            let _ = parse_events(&buf, &mut out);
        }
    }
}
