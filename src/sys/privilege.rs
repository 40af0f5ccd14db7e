//! Dropping root for good: supplementary groups, gid, uid, every capability set (bounding and
//! ambient included), and no way back (`PR_SET_NO_NEW_PRIVS`, not dumpable).
//!
//! Credentials, capability sets and `no_new_privs` belong to each thread, not to the process:
//! `prctl` and `capset` change only the calling thread, and a thread created earlier keeps what
//! it had. So [`drop_to`] refuses to run unless the process has exactly one thread; every thread
//! created afterwards starts from the dropped state. Whatever needs root (resolving the user
//! name, reading a credentials file only root may read) must happen before, without threads.

use std::ffi::CString;
use std::io;

use super::cvt;

/// The ids a process drops to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// Look up `user` (a name, or a numeric uid whose gid is taken to be the same number). Root is
/// refused. May read `/etc/passwd` or ask NSS: call it before dropping privileges.
pub fn lookup(user: &str) -> io::Result<Ids> {
    let root = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the fetch user must not be root",
        )
    };
    if let Ok(uid) = user.parse::<u32>() {
        if uid == 0 {
            return Err(root());
        }
        return Ok(Ids { uid, gid: uid });
    }
    let name = CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: passwd is plain data (integers and pointers); all-zero is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pw` and `buf` (of the length passed) only, and sets
    // `found` to NULL or to `&pw`; nothing is shared with other threads.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user named {user}"),
        ));
    }
    if pw.pw_uid == 0 {
        return Err(root());
    }
    Ok(Ids {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// How many threads this process has (`Threads:` of `/proc/self/status`).
pub fn thread_count() -> io::Result<usize> {
    std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}

/// Switch this process to `ids` for good: no supplementary groups, real, effective, saved and
/// filesystem ids all `ids`, every capability set empty (bounding and ambient too), no new
/// privileges through exec, not dumpable (a process of the same uid cannot read its memory or
/// environment). Refuses when the process has more than one thread (see the module doc), and
/// checks the result.
pub fn drop_to(ids: Ids) -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot drop privileges with {threads} threads running: the others would keep theirs"
        )));
    }
    // The bounding set needs CAP_SETPCAP to shrink: before setuid. EINVAL past the last
    // capability this kernel knows.
    for cap in 0..64 {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: plain syscalls with integer arguments; setgroups with a zero-length list.
    unsafe {
        // EINVAL: a kernel without ambient capabilities (before 4.3), which then has none.
        let r = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        cvt(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0))?;
        cvt(libc::setgroups(0, std::ptr::null()))?;
        cvt(libc::setresgid(ids.gid, ids.gid, ids.gid))?;
        // From root to a non-zero uid everywhere: the kernel clears the permitted, effective
        // and ambient sets. The inheritable set is left: cleared below.
        cvt(libc::setresuid(ids.uid, ids.uid, ids.uid))?;
    }
    set_capabilities(0)?;
    // SAFETY: plain prctl calls with integer arguments.
    unsafe {
        cvt(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        cvt(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0))?;
    }
    check_dropped(ids)
}

/// Header and data of `capget`/`capset`, version 3 (two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
const CAP_SYS_ADMIN: libc::c_ulong = 21;

/// Set this thread's effective, permitted and inheritable sets to `all` (0 or !0 per word).
fn set_capabilities(all: u32) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: all,
        permitted: all,
        inheritable: all,
    }; 2];
    // SAFETY: a valid header and the two data words version 3 expects.
    cvt(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })?;
    Ok(())
}

/// This thread's capability sets: (effective, permitted, inheritable), 64 bits each.
fn capabilities() -> io::Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a valid header and room for the two data words version 3 writes.
    cvt(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

/// Check that the calling thread holds nothing more than `ids`.
fn check_dropped(ids: Ids) -> io::Result<()> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids each into the variables passed; getgroups
    // with size 0 only counts; the prctl calls only read.
    let (groups, nnp, ambient, bounding_cap0) = unsafe {
        cvt(libc::getresuid(&mut r, &mut e, &mut s))?;
        cvt(libc::getresgid(&mut rg, &mut eg, &mut sg))?;
        (
            cvt(libc::getgroups(0, std::ptr::null_mut()))?,
            cvt(libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))?,
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_IS_SET,
                CAP_SYS_ADMIN,
                0,
                0,
            ),
            libc::prctl(libc::PR_CAPBSET_READ, CAP_SYS_ADMIN, 0, 0, 0),
        )
    };
    let caps = capabilities()?;
    let ok = [r, e, s] == [ids.uid; 3]
        && [rg, eg, sg] == [ids.gid; 3]
        && groups == 0
        && nnp == 1
        && ambient <= 0
        && bounding_cap0 <= 0
        && caps == (0, 0, 0);
    if !ok {
        return Err(io::Error::other(format!(
            "privileges were not dropped: uids {r}/{e}/{s}, gids {rg}/{eg}/{sg}, {groups} \
             groups, no_new_privs {nnp}, capabilities {caps:x?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_as_the_fetch_user() {
        assert!(lookup("0").is_err());
        assert!(lookup("root").is_err());
        assert_eq!(
            lookup("4242").unwrap(),
            Ids {
                uid: 4242,
                gid: 4242
            }
        );
        assert_eq!(
            lookup("no-such-user-hsm").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// With a second thread running, nothing is changed: that thread would keep root.
    #[test]
    fn no_drop_while_other_threads_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let err = drop_to(Ids {
            uid: 65534,
            gid: 65534,
        })
        .unwrap_err();
        assert!(err.to_string().contains("threads"), "{err}");
        drop(tx);
        let _ = other.join();
    }
}
