//! Persisting the engine's state records: a record is written only once the bytes it claims are
//! on disk, and only once its file has gone quiet. Apart from the cache because durability and
//! its cost (what is synced, from which thread) are a concern of their own.

use std::os::fd::AsFd;
use std::sync::Arc;
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
    /// An event's thread, the cache over its limit (see `Engine::entry`): the files eviction can
    /// then drop. Its `syncfs` makes this reader wait for the filesystem's writeback, and holds
    /// the event thread as back-pressure: one `fdatasync` per file was too slow to keep up (a
    /// tar over 3,000 files with 4,096 fds allowed ran the worker out of fds, in CI). Moving
    /// this flush to the flusher thread, with events waiting for room, would take it off the
    /// event path.
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
