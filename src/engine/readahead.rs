//! Readahead: fetching ahead of a sequential reader on background threads, so that its next
//! requests find their chunks present. Apart from the fill path because it is the one part of
//! the engine that works for no request in hand (a full queue drops the work).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::cache::Entry;
use super::plan::Plan;
use super::{lock, Engine};

/// What to fetch ahead of the reader that `plan` serves: the range after the plan's, when the
/// reader is sequential, cut at the end of what the source backs; `base` bytes, or up to `far`
/// (see [`scaled`]) once the reader's sequential run is that long: a random reader that lands
/// next to its last read once must not pull a far source's whole window (200 random reads over
/// S3, 20 ms away: 1.13x of curl's time with 32-40 MiB pulled at each, 1.03x with 8 MiB).
/// `None`: nothing (a random reader, readahead off, or nothing left to fetch ahead).
pub(super) fn window(plan: &Plan, base: u64, far: u64) -> Option<(u64, u64)> {
    let ahead = base.max(far.min(plan.run));
    let start = plan.end;
    let end = start.saturating_add(ahead).min(plan.backed);
    (plan.sequential && end > start).then_some((start, end))
}

/// A source whose round trip is this long or longer gets its readahead multiplied: once per this
/// much of it...
const RTT_STEP: Duration = Duration::from_millis(5);
/// ...up to this many times.
const MAX_SCALE: u64 = 8;

/// How far ahead to fetch for a source whose round trip (see [`crate::round_trip`]) is `rtt`:
/// `base`, once more per [`RTT_STEP`] of it. A far source's chunks arrive a round trip after
/// they are asked for, so the reader must be that much further behind the readahead: over
/// 20 ms, 256 MiB from S3 took 1.07-1.11x of one `curl` with 8 MiB ahead (1.03x with 32 MiB),
/// while a local disk (well under a millisecond) keeps `base`.
pub(super) fn scaled(base: u64, rtt: Option<Duration>) -> u64 {
    let times = rtt.map_or(1, |r| {
        (r.as_nanos() / RTT_STEP.as_nanos()).min(MAX_SCALE as u128) as u64
    });
    base.saturating_mul(times.max(1))
}

pub(super) struct Readahead {
    entry: Arc<Entry>,
    start: u64,
    end: u64,
}

impl Engine {
    /// Start `threads` background threads that fetch ahead of sequential readers.
    pub fn start_readahead(self: &Arc<Self>, threads: usize) {
        let (tx, rx) = crossbeam_channel::bounded::<Readahead>(64);
        *lock(&self.readahead_tx) = Some(tx);
        for _ in 0..threads {
            let rx = rx.clone();
            let engine = Arc::downgrade(self);
            std::thread::spawn(move || {
                while let Ok(job) = rx.recv() {
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    let file = job.entry.file.as_fd();
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.fill(&job.entry, file, job.start, job.end, true)
                    }));
                    if let Ok(Err(e)) = res {
                        debug!("readahead failed: {e}");
                    }
                }
            });
        }
    }

    /// How far ahead of a long sequential run to fetch now (see [`scaled`] and [`window`]).
    pub(super) fn far_readahead(&self) -> u64 {
        scaled(self.readahead, lock(&self.round_trip).get())
    }

    /// Stop readahead threads (they exit when the queue is empty).
    pub fn stop_readahead(&self) {
        lock(&self.readahead_tx).take();
    }

    pub(super) fn schedule_readahead(&self, entry: &Arc<Entry>, start: u64, end: u64) {
        let tx = lock(&self.readahead_tx).clone();
        if let Some(tx) = tx {
            // Full queue: skip, the reader will fetch on demand.
            let _ = tx.try_send(Readahead {
                entry: entry.clone(),
                start,
                end,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sequential(start: u64, end: u64, backed: u64) -> Plan {
        Plan {
            start,
            end,
            sequential: true,
            complete: false,
            backed,
            run: end,
        }
    }

    #[test]
    fn a_sequential_reader_gets_the_window_after_its_range() {
        let p = sequential(MIB, 2 * MIB, 100 * MIB);
        assert_eq!(window(&p, 8 * MIB, 8 * MIB), Some((2 * MIB, 10 * MIB)));
    }

    #[test]
    fn a_random_reader_or_readahead_off_gets_none() {
        let mut p = sequential(MIB, 2 * MIB, 100 * MIB);
        assert_eq!(window(&p, 0, 0), None);
        p.sequential = false;
        assert_eq!(window(&p, 8 * MIB, 8 * MIB), None);
    }

    #[test]
    fn the_far_window_opens_as_the_sequential_run_grows() {
        let mut p = sequential(MIB, 2 * MIB, 1 << 40);
        // A run of 2 MiB so far: the base only.
        p.run = 2 * MIB;
        assert_eq!(window(&p, 8 * MIB, 32 * MIB), Some((2 * MIB, 10 * MIB)));
        // 20 MiB read in one run: that much ahead; 100 MiB: the far window, no more.
        p.run = 20 * MIB;
        assert_eq!(window(&p, 8 * MIB, 32 * MIB), Some((2 * MIB, 22 * MIB)));
        p.run = 100 * MIB;
        assert_eq!(window(&p, 8 * MIB, 32 * MIB), Some((2 * MIB, 34 * MIB)));
    }

    #[test]
    fn a_far_source_gets_more_readahead_within_bounds() {
        let ms = Duration::from_millis;
        let base = 8 * MIB;
        // Nothing measured yet, a local disk, a nearby server: the base.
        assert_eq!(scaled(base, None), base);
        assert_eq!(scaled(base, Some(Duration::from_micros(400))), base);
        assert_eq!(scaled(base, Some(ms(9))), base);
        // 20 ms away: four times; far away: eight at most; readahead off stays off.
        assert_eq!(scaled(base, Some(ms(20))), 4 * base);
        assert_eq!(scaled(base, Some(ms(28))), 5 * base);
        assert_eq!(scaled(base, Some(Duration::from_secs(3))), 8 * base);
        assert_eq!(scaled(0, Some(ms(20))), 0);
        assert_eq!(scaled(u64::MAX, Some(ms(20))), u64::MAX);
    }

    #[test]
    fn the_window_stops_at_the_end_of_the_file() {
        // Less than a window left: what is left.
        let p = sequential(MIB, 2 * MIB, 5 * MIB + 123);
        assert_eq!(window(&p, 8 * MIB, 8 * MIB), Some((2 * MIB, 5 * MIB + 123)));
        // The reader reached the end: nothing ahead.
        let p = sequential(4 * MIB, 5 * MIB, 5 * MIB);
        assert_eq!(window(&p, 8 * MIB, 8 * MIB), None);
        // A window that would overflow.
        let p = sequential(MIB, 2 * MIB, u64::MAX);
        assert_eq!(window(&p, u64::MAX, u64::MAX), Some((2 * MIB, u64::MAX)));
    }
}
