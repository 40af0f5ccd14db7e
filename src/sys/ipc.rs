//! The supervisor–worker channel: a `SOCK_SEQPACKET` socket pair (message boundaries kept, both
//! ends see EOF when the other process dies), with fds passed by `SCM_RIGHTS`, and spawning a
//! child with chosen fds at fixed numbers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use super::{cvt, cvt_retry};

pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pair(libc::SOCK_SEQPACKET)
}

/// A connected `SOCK_STREAM` pair, for messages larger than a socket buffer.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pair(libc::SOCK_STREAM)
}

fn pair(kind: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair returned two new fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Send one message, with `fd` attached when given.
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_flags(sock, msg, fd, 0)
}

/// [`send`], but fail with `WouldBlock` rather than wait for room in the socket.
pub fn try_send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_flags(sock, msg, fd, libc::MSG_DONTWAIT)
}

fn send_flags(
    sock: BorrowedFd<'_>,
    msg: &[u8],
    fd: Option<BorrowedFd<'_>>,
    flags: i32,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // Room for one fd, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_FIRSTHDR/CMSG_DATA address inside `cbuf`, which is large enough
        // for one cmsghdr carrying one int.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            debug_assert!(space <= std::mem::size_of_val(&cbuf));
            hdr.msg_control = cbuf.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `hdr` is fully initialised above.
    let n =
        cvt_retry(|| unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL | flags) })?;
    if n as usize != msg.len() {
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
    recv_flags(sock, buf, 0)
}

/// [`recv`], but `Ok(None)` rather than wait when no message is queued.
pub fn try_recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    match recv_flags(sock, buf, libc::MSG_DONTWAIT) {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn recv_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in `send`.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cbuf.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: `hdr` points into live buffers.
    let n = cvt_retry(|| unsafe {
        libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC | flags)
    })? as usize;
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `cbuf`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count =
                    ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    // Keep the first; extra fds are closed by dropping them.
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if hdr.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized message",
        ));
    }
    Ok((n, fd))
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
    super::fs::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
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
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|i| libc::pollfd {
            fd: i.fd.as_raw_fd(),
            events: if i.read { libc::POLLIN } else { 0 } | if i.write { libc::POLLOUT } else { 0 },
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of pollfd of the length passed.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![Readiness::default(); fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter()
        .zip(fds)
        .map(|(x, i)| Readiness {
            readable: i.read && x.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
            writable: x.revents & libc::POLLOUT != 0,
        })
        .collect())
}

/// The `sockaddr_un` of an abstract socket (no file in any filesystem: it pins no mount, so the
/// filesystem it names can still be unmounted) and its length.
fn abstract_addr(name: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    if bytes.len() + 1 > addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket name too long",
        ));
    }
    // sun_path[0] stays NUL: the abstract namespace.
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + bytes.len();
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Listen on the abstract `SOCK_SEQPACKET` socket `name`. `AddrInUse` when another process does.
pub fn listen_abstract(name: &str) -> io::Result<OwnedFd> {
    let (addr, len) = abstract_addr(name)?;
    let sock = seqpacket_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 64) })?;
    Ok(sock)
}

/// Connect to the abstract `SOCK_SEQPACKET` socket `name`.
pub fn connect_abstract(name: &str) -> io::Result<OwnedFd> {
    let (addr, len) = abstract_addr(name)?;
    let sock = seqpacket_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt_retry(|| unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(sock)
}

/// Accept one connection on a listening socket.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: NULL address pointers are allowed.
    let fd = cvt_retry(|| unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The (pid, uid) of the process at the other end of a connected unix socket, as of connect.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid ucred of `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid))
}

/// Move `fd` to a number of at least `min` (close-on-exec), closing the original: for fds that
/// must stay clear of the low numbers an event's fd could take.
pub fn move_above(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that nothing else owns.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: as above: `new` was just made and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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
        // SAFETY: plain syscall.
        assert_eq!(uid, unsafe { libc::geteuid() });
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

/// Send `state` to the service manager (`sd_notify`), with `fd` attached when given (for
/// `FDSTORE=1`). `Ok(false)` when not run by one (no `NOTIFY_SOCKET`).
pub fn sd_notify(state: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad NOTIFY_SOCKET",
        ));
    }
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    if bytes[0] == b'@' {
        addr.sun_path[0] = 0;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    // SAFETY: plain syscall.
    let sock =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new fd.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })?;
    send_flags(std::os::fd::AsFd::as_fd(&sock), state.as_bytes(), fd, 0)?;
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
    claim_inherited(3 + index).ok()
}
