//! Persisting the engine's state records: a record is written only once the bytes it claims are
//! on disk, and only once its file has gone quiet. Apart from the cache because durability and
//! its cost (what is synced, from which thread) are a concern of their own.

use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::cache::{Entry, EntryState};
use super::{fd_path, lock, Engine};
use crate::metrics::Metrics;
use crate::record::{StateRecord, XATTR_STATE};
use crate::sys::fs as sysfs;

/// A file's record is written once no access has come for this long...
pub(super) const QUIET_BEFORE_RECORD: Duration = Duration::from_secs(1);
/// ...or once it has waited this long.
const MAX_RECORD_LAG: Duration = Duration::from_secs(30);

/// The largest state record written, within what every filesystem here takes as one xattr value
/// (ext4: a block, less its headers). A file read at random in many places has more present
/// ranges than that holds: its record then keeps the longest ranges and forgets the others,
/// which are fetched again after a restart (claiming less is safe; claiming more never is).
const MAX_RECORD_BYTES: usize = 3072;

fn bounded_encoding(record: &StateRecord) -> Vec<u8> {
    let mut bytes = record.encode();
    let mut keep = record.present.pairs().len();
    while bytes.len() > MAX_RECORD_BYTES && keep > 0 {
        keep = keep * 3 / 4;
        let shorter = StateRecord {
            present: record.present.longest(keep),
            ..record.clone()
        };
        bytes = shorter.encode();
    }
    bytes
}

/// Why a flush runs: what it records, and how it makes their data durable first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flush {
    /// The flusher thread, every flush interval.
    Periodic,
    /// Shutdown: every changed file.
    All,
    /// The cache over its limit (see `Engine::entry`): the files eviction can then drop. Run by
    /// the flusher thread as soon as an event asks (see [`Flusher`]); by the event's own thread
    /// only where no flusher runs (an in-process hydrate).
    Pressure,
}

/// Is the record of a changed file in state `s` due to be written at `now`, in a flush run for
/// `why`? Once the file has gone quiet; once it has waited `MAX_RECORD_LAG`, whatever happens;
/// always when the cache holds more files than it should (`crowded`: records are written without
/// waiting for their files to go quiet, so that idle entries can be evicted), though on an
/// event's thread only for files no fill is writing; always at shutdown.
pub(super) fn record_due(why: Flush, s: &EntryState, now: Instant, crowded: bool) -> bool {
    let idle = s.in_flight.is_empty();
    // A file being filled is not quiet, however long ago its access came: a `syncfs` in the
    // middle of a big fill writes back what it has just written and stalls it (one 256 MiB read
    // of a cold file: a 2.8 s `syncfs` half way through its fill).
    let quiet = idle && now.saturating_duration_since(s.last_access) >= QUIET_BEFORE_RECORD;
    let overdue = s
        .dirty_since
        .is_some_and(|t| now.saturating_duration_since(t) >= MAX_RECORD_LAG);
    match why {
        Flush::All => true,
        Flush::Periodic => crowded || quiet || overdue,
        // A file being filled cannot be evicted whatever its record says, and an `fdatasync` of
        // it would stall its fill as a `syncfs` would: its record is the flusher's to write.
        Flush::Pressure => (crowded && idle) || quiet,
    }
}

/// A record that was not written: the file is changed still, and is tried again later.
fn still_dirty(e: &Entry) {
    let mut s = lock(&e.state);
    s.dirty = true;
    s.dirty_since.get_or_insert_with(Instant::now);
}

/// A crowded cache holds this many entries beyond its limit before an event waits for the
/// flusher to make room: a quarter more (each entry holds up to two fds, and the limit is a
/// quarter of the open-files limit, so the fds stay bounded at about 60% of it).
pub(super) fn hard_cache_limit(max_cached: usize) -> usize {
    max_cached + max_cached / 4
}

/// The longest an event waits for the flusher to make room in a crowded cache; after that it is
/// served anyway (the flush may be stuck behind a slow disk: the fds are then spent, not lost).
const ROOM_WAIT: Duration = Duration::from_secs(5);

/// The flusher thread's doorbell. A crowded cache needs a flush (one `syncfs`, which waits for
/// the filesystem's writeback: seconds on a busy disk) before idle entries can be dropped: it
/// runs on the flusher thread, never on a thread serving an event. Events only ring, and wait
/// for a round only when the cache is past [`hard_cache_limit`] (back-pressure, so that a burst
/// of new files cannot run the worker out of fds: one `fdatasync` per file on the event path
/// was too slow to keep up with tar over 3,000 files, and a `syncfs` there stalled readers).
#[derive(Default)]
pub(super) struct Flusher {
    state: Mutex<FlusherState>,
    /// Rung for the flusher: a pressure round is wanted, or it is to stop.
    wake: Condvar,
    /// Rung by the flusher after each round.
    round_done: Condvar,
}

#[derive(Default)]
struct FlusherState {
    running: bool,
    stop: bool,
    pressure: bool,
    in_round: bool,
    rounds: u64,
}

impl Engine {
    /// Run the flusher on this thread until [`Engine::stop_flusher`]: a round every `interval`,
    /// and at once when an event finds the cache crowded. `after_each` runs after every round.
    pub fn run_flusher(&self, interval: Duration, mut after_each: impl FnMut()) {
        lock(&self.flusher.state).running = true;
        loop {
            let pressure = {
                let mut st = lock(&self.flusher.state);
                if !st.stop && !st.pressure {
                    st = match self.flusher.wake.wait_timeout(st, interval) {
                        Ok((st, _)) => st,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                if st.stop {
                    st.running = false;
                    drop(st);
                    self.flusher.round_done.notify_all();
                    return;
                }
                st.in_round = true;
                std::mem::take(&mut st.pressure)
            };
            if pressure {
                self.flush_for(Flush::Pressure);
            } else {
                self.flush_for(Flush::Periodic);
                self.buffers.trim();
            }
            {
                let mut st = lock(&self.flusher.state);
                st.rounds += 1;
                st.in_round = false;
            }
            self.flusher.round_done.notify_all();
            after_each();
        }
    }

    #[cfg(test)]
    pub(super) fn flusher_running(&self) -> bool {
        lock(&self.flusher.state).running
    }

    /// Stop [`Engine::run_flusher`] after its current round.
    pub fn stop_flusher(&self) {
        lock(&self.flusher.state).stop = true;
        self.flusher.wake.notify_all();
    }

    /// The cache holds `cached` entries, more than its limit: ask the flusher for a pressure
    /// round, and past the hard limit wait for it (up to [`ROOM_WAIT`]). Without a flusher
    /// thread, flush here.
    pub(super) fn relieve_pressure(&self, cached: usize) {
        let mut st = lock(&self.flusher.state);
        if !st.running || st.stop {
            drop(st);
            // One at a time: a second would hold every entry while the first tries to evict.
            if !self
                .inline_flush
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                self.flush_for(Flush::Pressure);
                self.inline_flush
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            return;
        }
        st.pressure = true;
        self.flusher.wake.notify_one();
        if cached <= hard_cache_limit(self.max_cached) {
            return;
        }
        // Wait for one round that starts after this ring (a round under way may have looked at
        // the entries before): then go on, whatever it freed, as entries being filled free none.
        let target = st.rounds + if st.in_round { 2 } else { 1 };
        let end = Instant::now() + ROOM_WAIT;
        while st.rounds < target && st.running {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = match self.flusher.round_done.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Engine {
    /// Persist the state of changed files: first put their data on disk, then write the records
    /// that describe it. A record is written once its file has gone quiet (a record write moves
    /// the file's ctime, which `tar` reports as "file changed as we read it"), after
    /// `MAX_RECORD_LAG` whatever happens, or at once when more files are cached than the open-files
    /// limit allows; `force` writes them all. Returns the records written. For the flusher thread
    /// and shutdown: the data goes to disk with one `syncfs`.
    pub fn flush(&self, force: bool) -> usize {
        self.flush_for(if force { Flush::All } else { Flush::Periodic })
    }

    /// [`Engine::flush`], for `why`: see [`record_due`] and [`Flush::durability`].
    pub(super) fn flush_for(&self, why: Flush) -> usize {
        let entries: Vec<Arc<Entry>> = lock(&self.files).values().cloned().collect();
        // Every cached file holds fds: with too many, records are written without waiting for
        // their files to go quiet, so that idle entries can be evicted (a record write moves the
        // ctime: under pressure, bounded fds come first).
        let pressure = entries.len() > self.max_cached;
        let now = Instant::now();
        let mut dirty = Vec::new();
        for e in &entries {
            let mut s = lock(&e.state);
            if s.dirty && record_due(why, &s, now, pressure) {
                s.dirty = false;
                s.dirty_since = None;
                dirty.push((e.clone(), s.record.clone()));
            }
        }
        // Only the files being recorded are held from here on: a release (see `forget`) waits
        // for those, not for every cached file, while the data is synced.
        drop(entries);
        // One `syncfs` for the batch, whoever runs it (see `Flush::Pressure`).
        if let Some((first, _)) = dirty.first() {
            if let Err(err) = sysfs::syncfs(first.file.as_fd()) {
                warn!("syncfs failed, state records not updated: {err}");
                for (e, _) in &dirty {
                    still_dirty(e);
                }
                return 0;
            }
        }
        let mut written = 0;
        for (e, snapshot) in &dirty {
            match sysfs::fsetxattr(e.file.as_fd(), XATTR_STATE, &bounded_encoding(snapshot)) {
                Ok(()) => written += 1,
                Err(err) => {
                    // The record lags the data: a restart refetches, nothing is lost.
                    debug!(file = %fd_path(e.file.as_fd()), "state record not written: {err}");
                    still_dirty(e);
                }
            }
        }
        Metrics::add(&self.metrics.records_written, written as u64);
        // Our own clones would make every entry look in use.
        drop(dirty);
        self.evict();
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ranges::RangeSet;

    fn changed_at(t: Instant) -> EntryState {
        let mut s = EntryState::new(
            StateRecord {
                backed_len: 1 << 20,
                present: RangeSet::from_pairs(&[(0, 4096)]).unwrap(),
                modified: false,
            },
            false,
            t,
        );
        s.dirty = true;
        s.dirty_since = Some(t);
        s
    }

    #[test]
    fn a_record_waits_until_its_file_has_been_quiet() {
        let t0 = Instant::now();
        let s = changed_at(t0);
        assert!(!record_due(Flush::Periodic, &s, t0, false));
        assert!(!record_due(
            Flush::Periodic,
            &s,
            t0 + QUIET_BEFORE_RECORD / 2,
            false
        ));
        assert!(record_due(
            Flush::Periodic,
            &s,
            t0 + QUIET_BEFORE_RECORD,
            false
        ));
        // An access moves the quiet period on.
        let mut s = s;
        s.last_access = t0 + QUIET_BEFORE_RECORD / 2;
        assert!(!record_due(
            Flush::Periodic,
            &s,
            t0 + QUIET_BEFORE_RECORD,
            false
        ));
        // A clock that seems to go back (an access noted after `now` was taken) is not quiet.
        assert!(!record_due(Flush::Periodic, &s, t0, false));
    }

    #[test]
    fn a_file_being_filled_is_never_quiet_but_is_recorded_after_the_lag() {
        let t0 = Instant::now();
        let mut s = changed_at(t0);
        s.in_flight.insert(3);
        assert!(!record_due(
            Flush::Periodic,
            &s,
            t0 + 10 * QUIET_BEFORE_RECORD,
            false
        ));
        let just_before = t0 + MAX_RECORD_LAG - Duration::from_millis(1);
        assert!(!record_due(Flush::Periodic, &s, just_before, false));
        assert!(record_due(Flush::Periodic, &s, t0 + MAX_RECORD_LAG, false));
        // Still being accessed all along: the lag is counted from the first change, not the
        // last access.
        s.last_access = t0 + MAX_RECORD_LAG;
        assert!(record_due(Flush::Periodic, &s, t0 + MAX_RECORD_LAG, false));
    }

    #[test]
    fn shutdown_and_a_crowded_cache_record_at_once() {
        let t0 = Instant::now();
        let mut s = changed_at(t0);
        s.in_flight.insert(0);
        assert!(record_due(Flush::All, &s, t0, false));
        assert!(record_due(Flush::Periodic, &s, t0, true));
    }

    #[test]
    fn a_pressure_flush_records_only_idle_files() {
        let t0 = Instant::now();
        let mut s = changed_at(t0);
        // Crowded: an idle file is recorded at once, so that it can be evicted...
        assert!(record_due(Flush::Pressure, &s, t0, true));
        // ...but not when the cache has room again and the file is not quiet yet.
        assert!(!record_due(Flush::Pressure, &s, t0, false));
        assert!(record_due(
            Flush::Pressure,
            &s,
            t0 + QUIET_BEFORE_RECORD,
            false
        ));
        // A file being filled: not even crowded, not even overdue (the flusher's to record).
        s.in_flight.insert(7);
        assert!(!record_due(Flush::Pressure, &s, t0, true));
        assert!(!record_due(Flush::Pressure, &s, t0 + MAX_RECORD_LAG, true));
        assert!(record_due(Flush::Periodic, &s, t0 + MAX_RECORD_LAG, false));
    }

    #[test]
    fn a_record_of_many_ranges_is_cut_to_its_longest_ranges() {
        let mut present = RangeSet::new();
        for i in 0..20_000u64 {
            // Every other 16 KiB piece, a few of them longer.
            present.insert(i * 32768, i * 32768 + 16384 + (i % 97 == 0) as u64 * 8192);
        }
        let record = StateRecord {
            backed_len: 20_000 * 32768,
            present: present.clone(),
            modified: false,
        };
        let bytes = bounded_encoding(&record);
        assert!(bytes.len() <= MAX_RECORD_BYTES, "{} bytes", bytes.len());
        let kept = StateRecord::decode_alone(&bytes).unwrap();
        assert!(!kept.present.is_empty());
        for &(s, e) in kept.present.pairs() {
            assert!(present.contains(s, e), "claims {s}..{e}, never present");
        }
        // The longest ranges (24 KiB) are among those kept.
        assert!(kept.present.contains(0, 24576));

        let few = StateRecord {
            backed_len: 100,
            present: RangeSet::from_pairs(&[(0, 10), (20, 30)]).unwrap(),
            modified: true,
        };
        assert_eq!(bounded_encoding(&few), few.encode());
    }
}
