//! Process-wide settings and signals: the open-file limit, `kill` by pid.

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
