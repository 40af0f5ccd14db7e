//! Process-wide settings and signals: the open-file limit, `kill` by pid, the fd table's size.

use std::io;

use super::cvt;

/// The `RLIMIT_NOFILE` limits: (soft, hard).
#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some targets
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Set the `RLIMIT_NOFILE` limits (raising the hard one needs `CAP_SYS_RESOURCE`).
pub fn set_nofile_limit(soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads one valid rlimit.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    Ok(())
}

/// Send `sig` to the process `pid`. Callers pass the pid of a child they have not reaped, so
/// that the number cannot name another process.
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a plain syscall with integer arguments.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// Grow the process's fd table to hold fd numbers below `slots` (at most the open-files
/// limit), now. The kernel grows it by doubling as fds are opened, and in a process with
/// threads each growth waits for an RCU grace period while every other thread's open waits
/// for it: milliseconds each, several times in a daemon's first walk of a tree. Grown before
/// any thread starts, it never waits. Tables never shrink, so this lasts.
pub fn reserve_fd_table(slots: u64) -> io::Result<()> {
    let (soft, _) = nofile_limit()?;
    let top = slots.min(soft).saturating_sub(1);
    if top == 0 {
        return Ok(());
    }
    // SAFETY: plain fcntl and close on fd 0's duplicate, which this function alone owns.
    let fd = cvt(unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, top as libc::c_int) }).or_else(
        |_| {
            // No fd 0 (a daemon started with it closed): any open fd serves.
            let any = std::fs::File::open("/")?;
            // SAFETY: as above, on `any`, which outlives the call.
            cvt(unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&any),
                    libc::F_DUPFD_CLOEXEC,
                    top as libc::c_int,
                )
            })
        },
    )?;
    // SAFETY: `fd` was just made here and is closed once.
    unsafe { libc::close(fd) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's size as the kernel reports it (`FDSize` in /proc/self/status).
    fn fd_table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn the_fd_table_holds_the_reserved_slots_and_no_fd_stays_open() {
        let (soft, _) = nofile_limit().unwrap();
        let want = soft.min(8192);
        let open_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        reserve_fd_table(want).unwrap();
        assert!(
            fd_table_size() >= want,
            "FDSize {} < {want}",
            fd_table_size()
        );
        let open_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert_eq!(open_after, open_before);
        // More than the limit allows is cut to the limit, not an error.
        if soft <= 1 << 16 {
            reserve_fd_table(soft + 1).unwrap();
        }
    }
}
