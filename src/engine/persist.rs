//! Persisting the engine's state records: a record is written only once the bytes it claims are
//! on disk, and only once its file has gone quiet. Apart from the cache because durability and
//! its cost (what is synced, from which thread) are a concern of their own.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::cache::Entry;
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
        let mut dirty = Vec::new();
        for e in &entries {
            let mut s = lock(&e.state);
            // A file being filled is not quiet, however long ago its access came: a `syncfs`
            // in the middle of a big fill writes back what it has just written and stalls it
            // (one 256 MiB read of a cold file: a 2.8 s `syncfs` half way through its fill).
            let quiet = s.in_flight.is_empty() && s.last_access.elapsed() >= QUIET_BEFORE_RECORD;
            let due = force
                || pressure
                || quiet
                || s.dirty_since.is_some_and(|t| t.elapsed() >= MAX_RECORD_LAG);
            if s.dirty && due {
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
