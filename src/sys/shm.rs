//! A value shared between the serve processes through a memfd mapping.
//!
//! The daemon's counters live here: the supervisor creates the mapping and every worker it starts
//! maps the same pages, so both processes add to one set of counters and a restarted worker
//! carries on from where its predecessor stopped, with nothing to save or restore.

use std::ffi::CStr;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};

/// Types that may live in shared memory: `#[repr(C)]`, made of atomics only (so any process may
/// change them at any time), and valid when every byte is zero (a fresh memfd).
///
/// # Safety
/// Implement only for types that meet all three conditions.
pub unsafe trait Shareable: Sync {}

// SAFETY: both are `#[repr(C)]` structs of `AtomicU64`s only (`Metrics`: one per counter, as its
// `counters!` macro makes it; `PublishedRanges`: an array of `#[repr(C)]` slots of six), for
// which all-zero is the default; their definitions say so and name this impl.
unsafe impl Shareable for crate::metrics::Metrics {}
unsafe impl Shareable for crate::published::PublishedRanges {}

pub struct Shared<T: Shareable> {
    ptr: NonNull<T>,
    fd: OwnedFd,
}

// SAFETY: `T` is `Sync` and made of atomics; the mapping lives as long as the value.
unsafe impl<T: Shareable> Send for Shared<T> {}
unsafe impl<T: Shareable> Sync for Shared<T> {}

impl<T: Shareable> Shared<T> {
    /// A new zeroed value, in a memfd named `name` (shown in `/proc/PID/maps`).
    pub fn create(name: &CStr) -> io::Result<Shared<T>> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, std::mem::size_of::<T>() as u64)?;
        Self::map(fd)
    }

    /// Map the value another process created (see [`Shared::create`]).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Shared<T>> {
        let st = super::fs::fstat(fd.as_fd())?;
        if (st.st_size as usize) < std::mem::size_of::<T>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared memory smaller than expected (a different hsm version?)",
            ));
        }
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> io::Result<Shared<T>> {
        // SAFETY: a new mapping at an address the kernel picks (no existing memory is replaced),
        // of a file at least size_of::<T>() long (checked by both callers), so every byte of
        // `T` is backed; it is unmapped only in Drop.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<T>(),
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let ptr = NonNull::new(p.cast::<T>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Shared { ptr, fd })
    }

    /// The memfd, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl<T: Shareable> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: mapped, aligned (page-aligned), valid for any bytes (`Shareable`), and only
        // shared references are ever made.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: Shareable> Drop for Shared<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length, with no references outliving
        // `self` (`deref` borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), std::mem::size_of::<T>()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[repr(C)]
    struct Two {
        a: AtomicU64,
        b: AtomicU64,
    }
    // SAFETY: repr(C), atomics only, zero is valid.
    unsafe impl Shareable for Two {}

    #[test]
    fn two_mappings_see_one_value() {
        let first = Shared::<Two>::create(c"hsm-test").unwrap();
        assert_eq!(first.a.load(Ordering::Relaxed), 0, "a fresh value is zero");
        let dup = first.fd().try_clone_to_owned().unwrap();
        let second = Shared::<Two>::from_fd(dup).unwrap();
        first.a.fetch_add(3, Ordering::Relaxed);
        second.b.fetch_add(5, Ordering::Relaxed);
        assert_eq!(second.a.load(Ordering::Relaxed), 3);
        assert_eq!(first.b.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_too_small_file_is_refused() {
        let small = Shared::<AtomicPair>::create(c"hsm-test").unwrap();
        let dup = small.fd().try_clone_to_owned().unwrap();
        assert!(Shared::<Big>::from_fd(dup).is_err());
    }

    #[repr(C)]
    struct AtomicPair(AtomicU64);
    // SAFETY: as for `Two`.
    unsafe impl Shareable for AtomicPair {}
    #[repr(C)]
    struct Big([AtomicU64; 1024]);
    // SAFETY: as for `Two`.
    unsafe impl Shareable for Big {}
}
