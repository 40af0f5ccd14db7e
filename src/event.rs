//! A permission event owned by a value that answers it exactly once.
//!
//! The kernel keeps an unanswered permission event pending forever, and allows it (stub zeros!)
//! when the group dies. So every event is wrapped at once in a `PendingEvent`: `answer` consumes
//! it, and if it is dropped unanswered (an early return, an error, a panic in a fetch) `Drop`
//! denies it with EIO. The answer always goes straight to the fanotify group; the `Respond`
//! implementation says who else must hear of it (the supervisor, which holds the event).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use tracing::warn;

use crate::protocol::ReplyMsg;
use crate::sys::fanotify::{
    DenyErrno, Group, Verdict, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FAN_PRE_ACCESS,
};
use crate::sys::ipc;

/// Events the mount mark asks for, and that an ignore mark silences on a complete file.
pub const MASK: u64 = FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;

/// Which event an answer is for.
#[derive(Clone, Copy, Debug)]
pub struct EventId {
    /// Supervisor-assigned id (0 for events read from the group directly).
    pub id: u64,
    /// The event's fd number in the process that read it from the group.
    pub fd_num: RawFd,
}

pub trait Respond: Send + Sync {
    fn respond(&self, ev: EventId, file: BorrowedFd<'_>, verdict: Verdict, ignore: bool);
}

/// Place the ignore mark (before the answer, so the reader's next access is already silent),
/// then answer.
pub fn respond_to_group(
    group: &Group,
    fd_num: RawFd,
    file: BorrowedFd<'_>,
    verdict: Verdict,
    ignore: bool,
) {
    if ignore {
        if let Err(e) = group.ignore_inode(file, MASK) {
            warn!("ignore mark failed: {e}");
        }
    }
    answer_group(group, fd_num, verdict);
}

/// Answer the event with fd number `fd_num` in the supervisor.
pub fn answer_group(group: &Group, fd_num: RawFd, verdict: Verdict) {
    if let Err(e) = group.respond(fd_num, verdict) {
        // ENOENT: the kernel no longer waits for it (the reader was killed, or it was answered
        // already: see `SupervisorResponder`). Nothing to do.
        if e.raw_os_error() != Some(libc::ENOENT) {
            warn!("fanotify response failed: {e}");
        }
    }
}

/// Answer the group directly, by the supervisor's fd number (the kernel matches responses by that
/// number, whichever process writes them), then tell the supervisor, which holds the event, that
/// it may let go of it. The reader goes on without waiting for the supervisor to wake, and the
/// supervisor keeps the event's fd open until it hears of the answer: the number cannot be
/// reused by a newer event before that, so this answer can never reach another event.
pub struct SupervisorResponder {
    pub sock: OwnedFd,
    pub group: Arc<Group>,
}

impl Respond for SupervisorResponder {
    fn respond(&self, ev: EventId, file: BorrowedFd<'_>, verdict: Verdict, ignore: bool) {
        respond_to_group(&self.group, ev.fd_num, file, verdict, ignore);
        let msg = ReplyMsg {
            id: ev.id,
            verdict,
            ignore,
        };
        // If the supervisor is gone, the worker finds out from its socket.
        let _ = ipc::send(self.sock.as_fd(), &msg.encode(), None);
    }
}

pub struct PendingEvent {
    fd: OwnedFd,
    pub id: EventId,
    pub mask: u64,
    pub pid: i32,
    pub range: Option<(u64, u64)>,
    responder: Arc<dyn Respond>,
    answered: bool,
}

impl PendingEvent {
    pub fn new(
        fd: OwnedFd,
        id: EventId,
        mask: u64,
        pid: i32,
        range: Option<(u64, u64)>,
        responder: Arc<dyn Respond>,
    ) -> PendingEvent {
        PendingEvent {
            fd,
            id,
            mask,
            pid,
            range,
            responder,
            answered: false,
        }
    }

    pub fn answer(mut self, verdict: Verdict, ignore: bool) {
        self.answered = true;
        self.responder
            .respond(self.id, self.fd.as_fd(), verdict, ignore);
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
            self.answered = true;
            self.responder.respond(
                self.id,
                self.fd.as_fd(),
                Verdict::Deny(DenyErrno::Io),
                false,
            );
        }
    }
}
