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

/// The events an ignore mark on a complete file silences: all of [`MASK`], or only accesses
/// while a cache limit needs to see every open (see `evict`). Set once at start.
static IGNORE_MASK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(MASK);

/// The events an ignore mark on a complete file silences (see [`ignore_only_accesses`]).
pub fn ignore_mask() -> u64 {
    IGNORE_MASK.load(std::sync::atomic::Ordering::Relaxed)
}

/// Ignore marks silence accesses only from now on: opens are still reported.
pub fn ignore_only_accesses() {
    IGNORE_MASK.store(FAN_PRE_ACCESS, std::sync::atomic::Ordering::Relaxed);
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
        let mask = IGNORE_MASK.load(std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = group.ignore_inode(file, mask) {
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

/// Answers straight to the group, as the supervisor does for the events it holds.
pub struct GroupResponder<'g>(pub &'g Group);

impl Respond for GroupResponder<'_> {
    fn respond(&self, ev: EventId, file: BorrowedFd<'_>, verdict: Verdict, ignore: bool) {
        respond_to_group(self.0, ev.fd_num, file, verdict, ignore);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Verdict, bool)>>);

    impl Respond for Recorder {
        fn respond(&self, ev: EventId, _file: BorrowedFd<'_>, verdict: Verdict, ignore: bool) {
            self.0.lock().unwrap().push((ev.id, verdict, ignore));
        }
    }

    fn pending(id: u64, rec: &Arc<Recorder>) -> PendingEvent {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let id = EventId { id, fd_num: 3 };
        PendingEvent::new(fd, id, FAN_PRE_ACCESS, 1, Some((0, 4096)), rec.clone())
    }

    #[test]
    fn an_answered_event_is_answered_once() {
        let rec = Arc::new(Recorder::default());
        pending(1, &rec).answer(Verdict::Allow, true);
        assert_eq!(*rec.0.lock().unwrap(), vec![(1, Verdict::Allow, true)]);
    }

    #[test]
    fn an_event_dropped_unanswered_is_denied_with_eio() {
        let rec = Arc::new(Recorder::default());
        drop(pending(2, &rec));
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(2, Verdict::Deny(DenyErrno::Io), false)]
        );
    }

    #[test]
    fn a_panic_while_serving_denies_the_event() {
        let rec = Arc::new(Recorder::default());
        let ev = pending(3, &rec);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _owned = ev;
            panic!("a bug in a fetch");
        }));
        assert!(r.is_err());
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(3, Verdict::Deny(DenyErrno::Io), false)]
        );
    }

    #[test]
    fn an_early_return_denies_the_event() {
        fn serve(ev: PendingEvent, fail: bool) -> std::io::Result<()> {
            if fail {
                return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            ev.answer(Verdict::Allow, false);
            Ok(())
        }
        let rec = Arc::new(Recorder::default());
        assert!(serve(pending(4, &rec), true).is_err());
        serve(pending(5, &rec), false).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![
                (4, Verdict::Deny(DenyErrno::Io), false),
                (5, Verdict::Allow, false)
            ]
        );
    }
}
