//! Channels whose receivers sleep as soon as there is nothing to receive.
//!
//! The daemon hands work between threads on every cold access: event -> handler -> fetch thread
//! -> handler. crossbeam's channels spin and then `sched_yield` several times before a receiver
//! sleeps, and so do its idle receivers each time they are woken. With more threads than CPUs
//! (two here, ~60 threads), every yield is a context switch: `perf sched` counted 16.5 of them
//! per cold random 4 KiB read, most by idle fetch and handler threads, and on a VM each costs
//! tens of microseconds. A mutex and a condition variable switch only to hand over work.
//!
//! The interface is the part of crossbeam's that the daemon uses: `send`, `try_send`, `recv`,
//! `recv_timeout`, iteration until every sender is gone, and failure to send once every receiver
//! is gone (so that an event whose handlers exited is dropped, which denies it).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct State<T> {
    items: VecDeque<T>,
    cap: Option<usize>,
    senders: usize,
    receivers: usize,
}

struct Chan<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives or the last sender goes.
    filled: Condvar,
    /// Signalled when a bounded channel has room again or the last receiver goes.
    emptied: Condvar,
}

impl<T> Chan<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Sender<T>(Arc<Chan<T>>);
pub struct Receiver<T>(Arc<Chan<T>>);

/// Every receiver is gone: the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct SendError<T>(pub T);

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Disconnected(T),
}

/// Every sender is gone and nothing is left.
#[derive(Debug, PartialEq, Eq)]
pub struct RecvError;

#[derive(Debug, PartialEq, Eq)]
pub enum RecvTimeoutError {
    Timeout,
    Disconnected,
}

fn with_cap<T>(cap: Option<usize>) -> (Sender<T>, Receiver<T>) {
    let chan = Arc::new(Chan {
        state: Mutex::new(State {
            items: VecDeque::new(),
            cap,
            senders: 1,
            receivers: 1,
        }),
        filled: Condvar::new(),
        emptied: Condvar::new(),
    });
    (Sender(chan.clone()), Receiver(chan))
}

pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    with_cap(None)
}

/// A channel that holds at most `cap` items (at least one): `send` waits for room.
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    with_cap(Some(cap.max(1)))
}

impl<T> Sender<T> {
    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        let mut s = self.0.lock();
        loop {
            if s.receivers == 0 {
                return Err(SendError(item));
            }
            if s.cap.is_none_or(|cap| s.items.len() < cap) {
                break;
            }
            s = self.0.emptied.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.items.push_back(item);
        drop(s);
        self.0.filled.notify_one();
        Ok(())
    }

    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut s = self.0.lock();
        if s.receivers == 0 {
            return Err(TrySendError::Disconnected(item));
        }
        if s.cap.is_some_and(|cap| s.items.len() >= cap) {
            return Err(TrySendError::Full(item));
        }
        s.items.push_back(item);
        drop(s);
        self.0.filled.notify_one();
        Ok(())
    }
}

impl<T> Receiver<T> {
    /// The next item; waits for one while any sender is left.
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut s = self.0.lock();
        loop {
            if let Some(item) = self.take(&mut s) {
                return Ok(item);
            }
            if s.senders == 0 {
                return Err(RecvError);
            }
            s = self.0.filled.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.0.lock();
        loop {
            if let Some(item) = self.take(&mut s) {
                return Ok(item);
            }
            if s.senders == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if wait.is_zero() {
                return Err(RecvTimeoutError::Timeout);
            }
            s = self
                .0
                .filled
                .wait_timeout(s, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn take(&self, s: &mut State<T>) -> Option<T> {
        let item = s.items.pop_front()?;
        if s.cap.is_some() {
            self.0.emptied.notify_one();
        }
        Some(item)
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.0.lock().receivers += 1;
        Receiver(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        if s.senders == 0 {
            drop(s);
            self.0.filled.notify_all();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receivers -= 1;
        if s.receivers == 0 {
            // What is left would never be received: drop it now (an event's Drop answers it).
            let left = std::mem::take(&mut s.items);
            drop(s);
            self.0.emptied.notify_all();
            drop(left);
        }
    }
}

/// Receives until every sender is gone and the channel is empty.
pub struct IntoIter<T>(Receiver<T>);

impl<T> Iterator for IntoIter<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.0.recv().ok()
    }
}

impl<T> IntoIterator for Receiver<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;
    fn into_iter(self) -> IntoIter<T> {
        IntoIter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_and_iteration_ends_with_the_last_sender() {
        let (tx, rx) = unbounded();
        let tx2 = tx.clone();
        let t = std::thread::spawn(move || {
            for i in 0..1000 {
                tx2.send(i).unwrap();
            }
        });
        tx.send(-1).unwrap();
        t.join().unwrap();
        drop(tx);
        let got: Vec<i32> = rx.into_iter().collect();
        assert_eq!(got.len(), 1001);
        assert_eq!(got[0], -1);
        assert!(got[1..].windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_item_is_received_once_by_many_receivers() {
        let (tx, rx) = unbounded::<u32>();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || rx.into_iter().map(u64::from).sum::<u64>())
            })
            .collect();
        drop(rx);
        for i in 0..10_000 {
            tx.send(i).unwrap();
        }
        drop(tx);
        let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(total, (0..10_000u64).sum::<u64>());
    }

    #[test]
    fn a_bounded_channel_refuses_or_waits_when_full() {
        let (tx, rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        let waiting = std::thread::spawn(move || tx.send(3));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "send did not wait for room");
        assert_eq!(rx.recv(), Ok(1));
        assert_eq!(waiting.join().unwrap(), Ok(()));
        assert_eq!(rx.recv(), Ok(2));
        assert_eq!(rx.recv(), Ok(3));
        assert_eq!(rx.recv(), Err(RecvError));
    }

    #[test]
    fn recv_timeout_times_out_then_sees_a_late_item_and_the_end() {
        let (tx, rx) = bounded(1);
        let t0 = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(100)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(t0.elapsed() >= Duration::from_millis(100));
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(7).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
        late.join().unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn sending_fails_once_every_receiver_is_gone_and_what_was_left_is_dropped() {
        let (tx, rx) = unbounded();
        let held = Arc::new(());
        tx.send(held.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&held), 1, "an item left in the channel was kept");
        assert!(tx.send(held.clone()).is_err());
        assert!(matches!(
            tx.try_send(held.clone()),
            Err(TrySendError::Disconnected(_))
        ));
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn a_blocked_sender_is_released_when_the_receiver_goes() {
        let (tx, rx) = bounded(1);
        tx.send(1).unwrap();
        let blocked = std::thread::spawn(move || tx.send(2));
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        assert_eq!(blocked.join().unwrap(), Err(SendError(2)));
    }
}
