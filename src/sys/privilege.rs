//! Dropping root for good: supplementary groups, gid, uid, and no way back (`PR_SET_NO_NEW_PRIVS`).
//! After `setuid` from root to another uid the kernel clears every capability set.

use std::ffi::CString;
use std::io;

use super::cvt;

/// Look up `user` (a name or a numeric uid) and switch this process to it for good.
pub fn drop_to_user(user: &str) -> io::Result<()> {
    let (uid, gid) = lookup(user)?;
    // SAFETY: plain syscalls with integer arguments; setgroups with a zero-length list.
    unsafe {
        cvt(libc::setgroups(0, std::ptr::null()))?;
        cvt(libc::setresgid(gid, gid, gid))?;
        cvt(libc::setresuid(uid, uid, uid))?;
        cvt(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    // SAFETY: trivial getters.
    if unsafe { libc::geteuid() } != uid || unsafe { libc::getegid() } != gid {
        return Err(io::Error::other("privileges were not dropped"));
    }
    Ok(())
}

fn lookup(user: &str) -> io::Result<(u32, u32)> {
    if let Ok(uid) = user.parse::<u32>() {
        if uid == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the fetch user must not be root",
            ));
        }
        return Ok((uid, uid));
    }
    let name = CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: getpwnam returns NULL or a pointer to a static struct we read at once (the fetcher
    // is single-threaded when it calls this).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user named {user}"),
        ));
    }
    // SAFETY: non-NULL pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    if uid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the fetch user must not be root",
        ));
    }
    Ok((uid, gid))
}
