//! Thin, safe wrappers over the Linux syscalls `hsm` needs that `libc` exposes only raw (or not at
//! all): fanotify pre-content events, the new mount API, reflink clones, `openat2`, extended
//! attributes. Every `unsafe` block of the project lives under this module; callers see `OwnedFd`,
//! `&CStr`, slices and `io::Result`.

pub mod fanotify;
pub mod fs;
pub mod ipc;
pub mod loopdev;
pub mod mem;
pub mod mount;
pub mod privilege;
pub mod process;
pub mod seccomp;
pub mod shm;
pub mod users;

use std::io;

/// Turn a `-1`-on-error libc return value into an `io::Result`.
pub(crate) fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`], retrying while the call was interrupted by a signal.
pub(crate) fn cvt_retry<T: PartialEq + From<i8>>(mut f: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
