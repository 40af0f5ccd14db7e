//! The supervisor's events: every event it has read and passed on, owned by one value until the
//! worker says it answered it, and answered by that value if the worker cannot.
//!
//! Why a separate owner: the supervisor holds each event's fd until the worker's reply, so that
//! the event's fd number cannot be given to a newer event while an answer under it may still come
//! (the kernel matches an answer by fd number alone). Every way out of the supervisor's loop (a
//! stop, an error, a panic) must answer what is held, or its readers wait forever: `Drop` denies
//! every event still held. The queue of events not yet sent is here too: the supervisor never
//! blocks on the worker's socket (a blocking send against a worker blocked on sending its replies
//! would wedge both), it sends what the socket takes and keeps the rest for the next turn.
//!
//! Kernel-independent: answers go through [`Respond`], so the rules are unit-tested below.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::event::{EventId, Respond};
use crate::protocol::EventMsg;
use crate::sys::fanotify::{DenyErrno, Verdict};

/// Events read from the kernel and not let go of yet, at most. At the limit the supervisor stops
/// reading the group: the kernel keeps further events queued (the group's queue is unlimited, and
/// a permission event is never dropped from it), and their readers wait a little longer.
pub const MAX_IN_FLIGHT: usize = 8192;

struct Held {
    fd: OwnedFd,
    msg: EventMsg,
    since: Instant,
    /// Given to the current worker, which may still answer it.
    sent: bool,
}

pub struct Owed<'r> {
    respond: &'r dyn Respond,
    limit: usize,
    held: HashMap<u64, Held>,
    /// Ids in the order they are to be sent (ids no longer held are skipped).
    unsent: VecDeque<u64>,
    /// Denied at the deadline but the worker's still: kept open until it lets go of them too (or
    /// dies), so that its late answer cannot reach a newer event with the same fd number.
    denied_late: HashMap<u64, OwnedFd>,
}

impl<'r> Owed<'r> {
    /// At most `limit` events held (see [`MAX_IN_FLIGHT`]).
    pub fn new(respond: &'r dyn Respond, limit: usize) -> Owed<'r> {
        Owed {
            respond,
            limit,
            held: HashMap::new(),
            unsent: VecDeque::new(),
            denied_late: HashMap::new(),
        }
    }

    /// Events held, sent or not.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether the group may be read: fewer events held than the limit, those denied at the
    /// deadline but still the worker's included (each holds an fd in both processes).
    pub fn has_room(&self) -> bool {
        self.held.len() + self.denied_late.len() < self.limit
    }

    /// Whether events wait to be sent.
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Own `fd`'s event from here on, to be sent to the worker.
    pub fn hold(&mut self, fd: OwnedFd, msg: EventMsg, now: Instant) {
        self.unsent.push_back(msg.id);
        self.held.insert(
            msg.id,
            Held {
                fd,
                msg,
                since: now,
                sent: false,
            },
        );
    }

    /// The worker answered event `id`: close our copy of its fd.
    pub fn release(&mut self, id: u64) {
        self.held.remove(&id);
        self.denied_late.remove(&id);
    }

    /// Send what waits, in order, until `send` says the socket is full (`WouldBlock`: the rest
    /// waits for the next turn) or fails (the worker is dying: its EOF is handled by the caller,
    /// and [`Owed::start_over`] queues everything again).
    pub fn send_unsent(
        &mut self,
        mut send: impl FnMut(&EventMsg, BorrowedFd<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        while let Some(&id) = self.unsent.front() {
            let Some(h) = self.held.get_mut(&id) else {
                self.unsent.pop_front();
                continue;
            };
            match send(&h.msg, h.fd.as_fd()) {
                Ok(()) => {
                    h.sent = true;
                    self.unsent.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A worker died, or a new one is ready: nothing the last one held can be answered by it any
    /// more, and every event goes to the new one, oldest first.
    pub fn start_over(&mut self) {
        self.denied_late.clear();
        let mut ids: Vec<u64> = self.held.keys().copied().collect();
        ids.sort_unstable();
        for h in self.held.values_mut() {
            h.sent = false;
        }
        self.unsent = ids.into();
    }

    /// Deny with EAGAIN every event held for longer than `deadline`: the safety net under the
    /// worker's own fetch timeout. Returns how many.
    pub fn deny_overdue(&mut self, deadline: Duration, now: Instant) -> usize {
        let overdue: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) > deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in &overdue {
            if let Some(h) = self.held.remove(id) {
                tracing::warn!(parent: &crate::event_span(*id), "no answer from the worker in {deadline:?}; denied with EAGAIN");
                answer(self.respond, &h, Verdict::Deny(DenyErrno::Again));
                if h.sent {
                    self.denied_late.insert(*id, h.fd);
                }
            }
        }
        overdue.len()
    }

    /// Deny every event held with `errno`.
    pub fn deny_all(&mut self, errno: DenyErrno) {
        for (_, h) in self.held.drain() {
            answer(self.respond, &h, Verdict::Deny(errno));
        }
        self.unsent.clear();
    }
}

fn answer(respond: &dyn Respond, h: &Held, verdict: Verdict) {
    let id = EventId {
        id: h.msg.id,
        fd_num: h.msg.fd_num,
    };
    respond.respond(id, h.fd.as_fd(), verdict, false);
}

impl Drop for Owed<'_> {
    fn drop(&mut self) {
        self.deny_all(DenyErrno::Io);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Verdict)>>);

    impl Respond for Recorder {
        fn respond(&self, ev: EventId, _file: BorrowedFd<'_>, verdict: Verdict, _ignore: bool) {
            self.0.lock().unwrap().push((ev.id, verdict));
        }
    }

    impl Recorder {
        fn answers(&self) -> Vec<(u64, Verdict)> {
            let mut v = self.0.lock().unwrap().clone();
            v.sort_by_key(|a| a.0);
            v
        }
    }

    fn event(id: u64) -> (OwnedFd, EventMsg) {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let msg = EventMsg {
            id,
            fd_num: 100 + id as i32,
            pid: 1,
            mask: 0,
            range: None,
        };
        (fd, msg)
    }

    const EIO: Verdict = Verdict::Deny(DenyErrno::Io);
    const EAGAIN: Verdict = Verdict::Deny(DenyErrno::Again);

    #[test]
    fn every_event_still_held_is_denied_once_when_the_owner_goes() {
        let rec = Recorder::default();
        {
            let mut owed = Owed::new(&rec, 16);
            let t = Instant::now();
            for id in 1..=3 {
                let (fd, msg) = event(id);
                owed.hold(fd, msg, t);
            }
            owed.release(2);
        }
        assert_eq!(rec.answers(), vec![(1, EIO), (3, EIO)]);
    }

    #[test]
    fn a_panic_in_the_loop_still_denies_what_is_held() {
        let rec = Recorder::default();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut owed = Owed::new(&rec, 16);
            let (fd, msg) = event(7);
            owed.hold(fd, msg, Instant::now());
            panic!("a bug in the loop");
        }));
        assert!(result.is_err());
        assert_eq!(rec.answers(), vec![(7, EIO)]);
    }

    #[test]
    fn sending_stops_at_a_full_socket_and_resumes_in_order() {
        let rec = Recorder::default();
        let mut owed = Owed::new(&rec, 16);
        let t = Instant::now();
        for id in 1..=5 {
            let (fd, msg) = event(id);
            owed.hold(fd, msg, t);
        }
        owed.release(2);
        let mut sent = Vec::new();
        let mut room = 2;
        owed.send_unsent(|m, _| {
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            room -= 1;
            sent.push(m.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(sent, vec![1, 3]);
        assert!(owed.has_unsent());
        owed.send_unsent(|m, _| {
            sent.push(m.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(sent, vec![1, 3, 4, 5]);
        assert!(!owed.has_unsent());
        // A broken socket is reported, and what was not sent stays queued.
        let (fd, msg) = event(6);
        owed.hold(fd, msg, t);
        let err = owed.send_unsent(|_, _| Err(io::ErrorKind::BrokenPipe.into()));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert!(owed.has_unsent());
    }

    #[test]
    fn a_dead_worker_s_events_all_go_to_the_next_oldest_first() {
        let rec = Recorder::default();
        let mut owed = Owed::new(&rec, 16);
        let t = Instant::now();
        for id in [3, 1, 2] {
            let (fd, msg) = event(id);
            owed.hold(fd, msg, t);
        }
        owed.send_unsent(|_, _| Ok(())).unwrap();
        owed.start_over();
        let mut sent = Vec::new();
        owed.send_unsent(|m, _| {
            sent.push(m.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(sent, vec![1, 2, 3]);
        owed.release(1);
        owed.release(2);
        owed.release(3);
        drop(owed);
        assert!(rec.answers().is_empty(), "all were released");
    }

    #[test]
    fn the_deadline_denies_with_eagain_and_keeps_the_fd_of_what_the_worker_has() {
        let rec = Recorder::default();
        let mut owed = Owed::new(&rec, 16);
        let t0 = Instant::now();
        let (fd, msg) = event(1);
        owed.hold(fd, msg, t0);
        owed.send_unsent(|_, _| Ok(())).unwrap();
        let (fd, msg) = event(2);
        owed.hold(fd, msg, t0);
        let (fd, msg) = event(3);
        owed.hold(fd, msg, t0 + Duration::from_secs(10));
        let deadline = Duration::from_secs(5);
        assert_eq!(owed.deny_overdue(deadline, t0 + Duration::from_secs(6)), 2);
        assert_eq!(rec.answers(), vec![(1, EAGAIN), (2, EAGAIN)]);
        // 1 was the worker's: its number stays taken (it counts against the limit) until the
        // worker lets go of it. 2 was never sent: nobody else can answer it, so it is closed.
        assert_eq!(owed.len(), 1);
        assert_eq!(owed.denied_late.len(), 1);
        assert!(owed.denied_late.contains_key(&1));
        owed.release(1);
        assert!(owed.denied_late.is_empty());
        // 2 is not sent later, and nothing is answered twice.
        let mut sent = Vec::new();
        owed.send_unsent(|m, _| {
            sent.push(m.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(sent, vec![3]);
        drop(owed);
        assert_eq!(rec.answers(), vec![(1, EAGAIN), (2, EAGAIN), (3, EIO)]);
    }

    #[test]
    fn the_group_is_not_read_past_the_limit() {
        let rec = Recorder::default();
        let mut owed = Owed::new(&rec, 4);
        let t = Instant::now();
        for id in 0..4 {
            let (fd, msg) = event(id);
            owed.hold(fd, msg, t);
            assert_eq!(owed.has_room(), id + 1 < 4);
        }
        owed.send_unsent(|_, _| Ok(())).unwrap();
        owed.release(0);
        assert!(owed.has_room());
        let (fd, msg) = event(4);
        owed.hold(fd, msg, t);
        owed.send_unsent(|_, _| Ok(())).unwrap();
        assert!(!owed.has_room());
        // Denied at the deadline but still the worker's: still counted.
        assert_eq!(
            owed.deny_overdue(Duration::ZERO, t + Duration::from_secs(1)),
            4
        );
        assert_eq!(owed.len(), 0);
        assert!(!owed.has_room());
        owed.release(1);
        assert!(owed.has_room());
    }
}
