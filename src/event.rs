//! A permission event owned by a value that answers it exactly once.
//!
//! The kernel keeps an unanswered permission event pending forever, and allows it (stub zeros!)
//! when the group dies. So every event read is wrapped at once in a `PendingEvent`: `answer`
//! consumes it, and if it is dropped unanswered, on an early return, an error or a panic in the
//! worker, `Drop` denies it with EIO. The response is written before the event's fd is closed, so
//! the fd number it names cannot have been reused.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use tracing::warn;

use crate::sys::fanotify::{DenyErrno, Group, RawEvent, Verdict};

pub struct PendingEvent {
    group: Arc<Group>,
    fd: OwnedFd,
    raw_fd: RawFd,
    pub mask: u64,
    pub pid: i32,
    pub range: Option<(u64, u64)>,
    answered: bool,
}

impl PendingEvent {
    /// Take ownership of a freshly read event. `raw.fd` must be a valid fd installed by the kernel
    /// for this process and owned by nobody else.
    pub fn new(group: Arc<Group>, raw: RawEvent) -> Option<PendingEvent> {
        if raw.fd < 0 {
            return None;
        }
        // SAFETY: the kernel installed this fd for us; the caller hands over its ownership.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw.fd) };
        Some(PendingEvent {
            group,
            fd,
            raw_fd: raw.fd,
            mask: raw.mask,
            pid: raw.pid,
            range: raw.range,
            answered: false,
        })
    }

    pub fn answer(mut self, verdict: Verdict) {
        self.respond(verdict);
    }

    fn respond(&mut self, verdict: Verdict) {
        self.answered = true;
        if let Err(e) = self.group.respond(self.raw_fd, verdict) {
            // ENOENT: the kernel no longer waits for it (the reader was killed). Nothing to do.
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("fanotify response failed: {e}");
            }
        }
    }
}

impl AsFd for PendingEvent {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PendingEvent {
    fn drop(&mut self) {
        if !self.answered {
            self.respond(Verdict::Deny(DenyErrno::Io));
        }
    }
}
