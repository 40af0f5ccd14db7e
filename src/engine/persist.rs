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

/// Is the record of a changed file in state `s` due to be written at `now`? When `force`d; when
/// the cache holds more files than it should (`crowded`: records are written without waiting
/// for their files to go quiet, so that idle entries can be evicted); once the file has gone
/// quiet; or once it has waited `MAX_RECORD_LAG`, whatever happens.
pub(super) fn record_due(s: &EntryState, now: Instant, force: bool, crowded: bool) -> bool {
    // A file being filled is not quiet, however long ago its access came: a `syncfs` in the
    // middle of a big fill writes back what it has just written and stalls it (one 256 MiB read
    // of a cold file: a 2.8 s `syncfs` half way through its fill).
    let quiet = s.in_flight.is_empty()
        && now.saturating_duration_since(s.last_access) >= QUIET_BEFORE_RECORD;
    let overdue = s
        .dirty_since
        .is_some_and(|t| now.saturating_duration_since(t) >= MAX_RECORD_LAG);
    force || crowded || quiet || overdue
}

impl Engine {
    /// Persist the state of changed files: first `syncfs` so the data is on disk, then the records
    /// that describe it. A record is written once its file has gone quiet (a record write moves
    /// the file's ctime, which `tar` reports as "file changed as we read it"), after
    /// `MAX_RECORD_LAG` whatever happens, or at once when more files are cached than the open-files
    /// limit allows; `force` writes them all. Returns the records written.
    pub fn flush(&self, force: bool) -> usize {
        let entries: Vec<Arc<Entry>> = lock(&self.files).values().cloned().collect();
        // Every cached file holds fds: with too many, records are written without waiting for
        // their files to go quiet, so that idle entries can be evicted (a record write moves the
        // ctime: under pressure, bounded fds come first).
        let pressure = entries.len() > self.max_cached;
        let now = Instant::now();
        let mut dirty = Vec::new();
        for e in &entries {
            let mut s = lock(&e.state);
            if s.dirty && record_due(&s, now, force, pressure) {
                s.dirty = false;
                s.dirty_since = None;
                dirty.push((e.clone(), s.record.clone()));
            }
        }
        if let Some((first, _)) = dirty.first() {
            if let Err(err) = sysfs::syncfs(first.file.as_fd()) {
                warn!("syncfs failed, state records not updated: {err}");
                for (e, _) in &dirty {
                    let mut s = lock(&e.state);
                    s.dirty = true;
                    s.dirty_since.get_or_insert_with(Instant::now);
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
                    let mut s = lock(&e.state);
                    s.dirty = true;
                    s.dirty_since.get_or_insert_with(Instant::now);
                }
            }
        }
        Metrics::add(&self.metrics.records_written, written as u64);
        // Our own clones would make every entry look in use.
        drop(dirty);
        drop(entries);
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
        assert!(!record_due(&s, t0, false, false));
        assert!(!record_due(&s, t0 + QUIET_BEFORE_RECORD / 2, false, false));
        assert!(record_due(&s, t0 + QUIET_BEFORE_RECORD, false, false));
        // An access moves the quiet period on.
        let mut s = s;
        s.last_access = t0 + QUIET_BEFORE_RECORD / 2;
        assert!(!record_due(&s, t0 + QUIET_BEFORE_RECORD, false, false));
        // A clock that seems to go back (an access noted after `now` was taken) is not quiet.
        assert!(!record_due(&s, t0, false, false));
    }

    #[test]
    fn a_file_being_filled_is_never_quiet_but_is_recorded_after_the_lag() {
        let t0 = Instant::now();
        let mut s = changed_at(t0);
        s.in_flight.insert(3);
        assert!(!record_due(&s, t0 + 10 * QUIET_BEFORE_RECORD, false, false));
        assert!(!record_due(
            &s,
            t0 + MAX_RECORD_LAG - Duration::from_millis(1),
            false,
            false
        ));
        assert!(record_due(&s, t0 + MAX_RECORD_LAG, false, false));
        // Still being accessed all along: the lag is counted from the first change, not the
        // last access.
        s.last_access = t0 + MAX_RECORD_LAG;
        assert!(record_due(&s, t0 + MAX_RECORD_LAG, false, false));
    }

    #[test]
    fn force_and_a_crowded_cache_record_at_once() {
        let t0 = Instant::now();
        let mut s = changed_at(t0);
        s.in_flight.insert(0);
        assert!(record_due(&s, t0, true, false));
        assert!(record_due(&s, t0, false, true));
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
