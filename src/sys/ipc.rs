//! The supervisor–worker channel: a `SOCK_SEQPACKET` socket pair (message boundaries kept, both
//! ends see EOF when the other process dies), with fds passed by `SCM_RIGHTS`, and spawning a
//! child with chosen fds at fixed numbers.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use rustix::event::{PollFd, PollFlags};
use rustix::io::{retry_on_intr, Errno};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use super::cvt;

pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pair(SocketType::SEQPACKET)
}

/// A connected `SOCK_STREAM` pair, for messages larger than a socket buffer.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pair(SocketType::STREAM)
}

fn pair(kind: SocketType) -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        kind,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Send one message, with `fd` attached when given.
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_flags(sock, msg, fd, SendFlags::empty())
}

/// [`send`], but fail with `WouldBlock` rather than wait for room in the socket.
pub fn try_send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_flags(sock, msg, fd, SendFlags::DONTWAIT)
}

fn send_flags(
    sock: BorrowedFd<'_>,
    msg: &[u8],
    fd: Option<BorrowedFd<'_>>,
    flags: SendFlags,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for an fd in the control buffer"));
        }
    }
    let n = retry_on_intr(|| {
        rustix::net::sendmsg(
            sock,
            &[IoSlice::new(msg)],
            &mut control,
            SendFlags::NOSIGNAL | flags,
        )
    })?;
    if n != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short seqpacket send",
        ));
    }
    Ok(())
}

/// Receive one message into `buf`. Returns its length (0 = the peer closed) and the fd attached,
/// if any. Any fd received is owned by the caller even when the message is then rejected.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    recv_flags(sock, buf, RecvFlags::empty())
}

/// [`recv`], but `Ok(None)` rather than wait when no message is queued.
pub fn try_recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    match recv_flags(sock, buf, RecvFlags::DONTWAIT) {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn recv_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
) -> io::Result<(usize, Option<OwnedFd>)> {
    // Room for a few fds: a peer that sends more than one has them closed, not leaked.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = retry_on_intr(|| {
        rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | flags,
        )
    })?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            // Keep the first; extra fds are closed by dropping them.
            for owned in received {
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized message",
        ));
    }
    Ok((got.bytes, fd))
}

/// Spawn `cmd` with `fds[i]` installed as fd `3 + i` in the child (inheritable there, and only
/// there: the parent's copies stay close-on-exec).
pub fn spawn_with_fds(mut cmd: Command, fds: &[BorrowedFd<'_>]) -> io::Result<Child> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // Room for the moved copies, made here: the hook must not allocate (below).
    let mut moved: Vec<RawFd> = Vec::with_capacity(raw.len());
    let first_free = 3 + raw.len() as i32;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed (another thread of the parent may have held the allocator's lock at the
    // fork). It calls fcntl and dup2 only, on fds open in the parent, and does not allocate:
    // `moved` has its capacity already, so `push` never grows it (the hook runs once per
    // child), and the errors it returns are errno values (`io::Error::last_os_error` does not
    // allocate).
    unsafe {
        cmd.pre_exec(move || {
            // First move every source above the target range, so that installing fd 3 cannot
            // clobber a source that happens to be fd 4.
            moved.clear();
            for &fd in &raw {
                debug_assert!(moved.len() < moved.capacity());
                moved.push(cvt(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free))?);
            }
            for (i, &fd) in moved.iter().enumerate() {
                cvt(libc::dup2(fd, 3 + i as i32))?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Close every fd numbered `first` or above that this process inherited and has not claimed
/// (see [`claim_inherited`]): for a long-lived child that must not keep its parent's inherited
/// pipes (a test harness's or a build tool's) open, or a process that must hold nothing it was
/// not given. Fds this process opened itself (close-on-exec, all of them) are left alone.
pub fn close_inherited_from(first: RawFd) -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&n| n >= first)
        .collect();
    for n in fds {
        // Taken through `claim_inherited`, so that what it checks holds here too; EBADF for
        // the directory's own fd, closed since.
        if let Ok(fd) = claim_inherited(n) {
            drop(fd);
        }
    }
    Ok(())
}

/// Whether `fd` is a pipe or FIFO (whose reader waits for EOF from every holder).
pub fn is_pipe(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo
    })
}

/// Take ownership of fd `n` inherited from the parent (see [`spawn_with_fds`]), checking that it
/// is open, and make it close-on-exec again.
///
/// # Safety
/// Nothing else in this process may own fd `n`, now or later (no `OwnedFd`, `File` or other
/// value that closes it): the fd is closed when the returned value is dropped.
pub unsafe fn take_inherited(n: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD/F_SETFD on an integer fd have no memory effects.
    let flags = cvt(unsafe { libc::fcntl(n, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(n, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    // SAFETY: the fd is open (F_GETFD succeeded); the caller vouches that nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// [`take_inherited`] for fds a process was started with: fd `n` must be open and not
/// close-on-exec, and is made close-on-exec as it is taken, so each is taken once. Errors:
/// `EBADF` for an fd not open, `InvalidInput` for one that was not inherited or already taken.
///
/// This is what makes it safe: every fd this process opens itself is close-on-exec (the
/// standard library, tokio and mio open every fd so, and so does every call in `sys`: `O_CLOEXEC`,
/// `SOCK_CLOEXEC`, `MFD_CLOEXEC`, `FAN_CLOEXEC` and event fds opened `O_CLOEXEC`,
/// `MSG_CMSG_CLOEXEC`, `F_DUPFD_CLOEXEC`; keep it so), so an fd without the flag was inherited
/// across exec and is owned by no value here until taken. A lock makes check and take one step.
pub fn claim_inherited(n: RawFd) -> io::Result<OwnedFd> {
    static CLAIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CLAIMING.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: F_GETFD on an integer fd has no memory effects.
    let flags = cvt(unsafe { libc::fcntl(n, libc::F_GETFD) })?;
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {n} was not inherited, or was already taken"),
        ));
    }
    // SAFETY: see above: an open fd without FD_CLOEXEC is an inherited one nothing owns yet;
    // take_inherited sets FD_CLOEXEC, so no later claim takes it again.
    unsafe { take_inherited(n) }
}

/// How long a serving loop polls without sleeping after its last message: the next event of a
/// program walking a tree or reading a file, or the other process's answer, comes within
/// microseconds, and waking a sleeping thread for it costs more than the event itself (cold tar
/// of 12,000 files 3.0 s -> 2.0-2.4 s with the supervisor spinning; the worker's receiver
/// spins too, which pays with its small fills: see `worker::dispatch`). It yields between
/// polls, so runnable threads go first; idle, it sleeps.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// [`poll_readable`] that yields instead of sleeping while `busy_at` (the last message) is less
/// than [`SPIN`] ago, then sleeps up to `timeout_ms`.
pub fn poll_readable_spinning(
    fds: &[BorrowedFd<'_>],
    busy_at: std::time::Instant,
    timeout_ms: i32,
) -> io::Result<Vec<bool>> {
    let wanted: Vec<Interest<'_>> = fds.iter().map(|&fd| Interest::read(fd)).collect();
    Ok(poll_spinning(&wanted, busy_at, timeout_ms)?
        .into_iter()
        .map(|r| r.readable)
        .collect())
}

/// [`poll`] that yields instead of sleeping while `busy_at` is less than [`SPIN`] ago.
pub fn poll_spinning(
    fds: &[Interest<'_>],
    busy_at: std::time::Instant,
    timeout_ms: i32,
) -> io::Result<Vec<Readiness>> {
    let any = |r: &[Readiness]| r.iter().any(|x| x.readable || x.writable);
    let mut ready = poll(fds, 0)?;
    while !any(&ready) && busy_at.elapsed() < SPIN {
        std::thread::yield_now();
        ready = poll(fds, 0)?;
    }
    if any(&ready) {
        return Ok(ready);
    }
    poll(fds, timeout_ms)
}

/// Wait until one of `fds` is readable (or hung up), for at most `timeout_ms`. Returns, per fd,
/// whether it is ready.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let wanted: Vec<Interest<'_>> = fds.iter().map(|&fd| Interest::read(fd)).collect();
    Ok(poll(&wanted, timeout_ms)?
        .into_iter()
        .map(|r| r.readable)
        .collect())
}

/// What [`poll`] waits for on one fd.
#[derive(Clone, Copy)]
pub struct Interest<'a> {
    pub fd: BorrowedFd<'a>,
    pub read: bool,
    pub write: bool,
}

impl<'a> Interest<'a> {
    pub fn read(fd: BorrowedFd<'a>) -> Interest<'a> {
        Interest {
            fd,
            read: true,
            write: false,
        }
    }
}

/// What [`poll`] found on one fd. A hang-up or an error counts as readable (the next read says
/// which).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
}

/// Wait until one of `fds` is ready as asked, for at most `timeout_ms` (an interrupted wait
/// returns nothing ready).
pub fn poll(fds: &[Interest<'_>], timeout_ms: i32) -> io::Result<Vec<Readiness>> {
    let mut p: Vec<PollFd<'_>> = fds
        .iter()
        .map(|i| {
            let mut events = PollFlags::empty();
            events.set(PollFlags::IN, i.read);
            events.set(PollFlags::OUT, i.write);
            PollFd::from_borrowed_fd(i.fd, events)
        })
        .collect();
    let timeout = (timeout_ms >= 0).then(|| rustix::event::Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    });
    match rustix::event::poll(&mut p, timeout.as_ref()) {
        Ok(_) => {}
        Err(Errno::INTR) => return Ok(vec![Readiness::default(); fds.len()]),
        Err(e) => return Err(e.into()),
    }
    Ok(p.iter()
        .zip(fds)
        .map(|(x, i)| Readiness {
            readable: i.read
                && x.revents()
                    .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
            writable: x.revents().contains(PollFlags::OUT),
        })
        .collect())
}

/// The address of an abstract socket (no file in any filesystem: it pins no mount, so the
/// filesystem it names can still be unmounted).
fn abstract_addr(name: &str) -> io::Result<SocketAddrUnix> {
    SocketAddrUnix::new_abstract_name(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket name too long"))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Listen on the abstract `SOCK_SEQPACKET` socket `name`. `AddrInUse` when another process does.
pub fn listen_abstract(name: &str) -> io::Result<OwnedFd> {
    let addr = abstract_addr(name)?;
    let sock = seqpacket_socket()?;
    rustix::net::bind(&sock, &addr)?;
    rustix::net::listen(&sock, 64)?;
    Ok(sock)
}

/// Connect to the abstract `SOCK_SEQPACKET` socket `name`.
pub fn connect_abstract(name: &str) -> io::Result<OwnedFd> {
    let addr = abstract_addr(name)?;
    let sock = seqpacket_socket()?;
    retry_on_intr(|| rustix::net::connect(&sock, &addr))?;
    Ok(sock)
}

/// Accept one connection on a listening socket.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(retry_on_intr(|| {
        rustix::net::accept_with(listener, SocketFlags::CLOEXEC)
    })?)
}

/// The (pid, uid) of the process at the other end of a connected unix socket, as of connect.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    let cred = rustix::net::sockopt::socket_peercred(sock)?;
    Ok((cred.pid.as_raw_nonzero().get(), cred.uid.as_raw()))
}

/// Move `fd` to a number of at least `min` (close-on-exec), closing the original: for fds that
/// must stay clear of the low numbers an event's fd could take.
pub fn move_above(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, min)?)
}

/// Send `state` to the service manager (`sd_notify`), with `fd` attached when given (for
/// `FDSTORE=1`). `Ok(false)` when not run by one (no `NOTIFY_SOCKET`).
pub fn sd_notify(state: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => SocketAddrUnix::new_abstract_name(name),
        Some(_) => SocketAddrUnix::new(bytes),
        None => Err(Errno::INVAL),
    }
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad NOTIFY_SOCKET"))?;
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&sock, &addr)?;
    send_flags(sock.as_fd(), state.as_bytes(), fd, SendFlags::empty())?;
    Ok(true)
}

/// The fd the service manager passed under `name` (`LISTEN_FDS`, `LISTEN_FDNAMES`: its fd
/// store, given back at a restart), owned from here on. Only for this process (`LISTEN_PID`).
pub fn take_listen_fd(name: &str) -> Option<OwnedFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names.split(':').position(|n| n == name)? as i32;
    if index >= count {
        return None;
    }
    match claim_inherited(3 + index) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(
                "LISTEN_FDS names {name} as fd {}, which is not open ({e}): it was not handed \
                 on, and a new one is made",
                3 + index
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn abstract_socket_passes_an_fd_and_names_its_peer() {
        let name = format!("hsm-test-{}-{}", std::process::id(), line!());
        let listener = listen_abstract(&name).unwrap();
        assert_eq!(
            listen_abstract(&name).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        let client = connect_abstract(&name).unwrap();
        let server = accept(listener.as_fd()).unwrap();
        let (pid, uid) = peer_credentials(server.as_fd()).unwrap();
        assert_eq!(pid, std::process::id() as i32);
        assert_eq!(uid, rustix::process::geteuid().as_raw());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        send(server.as_fd(), b"G", Some(file.as_fd())).unwrap();
        let mut buf = [0u8; 4];
        let (n, fd) = recv(client.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"G");
        assert!(fd.is_some());
        drop(server);
        assert_eq!(recv(client.as_fd(), &mut buf).unwrap().0, 0);
        assert!(connect_abstract(&format!("{name}-absent")).is_err());
    }
}
