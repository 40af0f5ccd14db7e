//! Ranges the worker has written into stubs, published for the supervisor.
//!
//! A sequential reader raises one pre-content event per `read` (8,192 for 1 GiB in 128 KiB reads),
//! and readahead keeps ahead of it, so nearly all of them find their range present. Each one used
//! to cost the reader a round trip supervisor -> worker -> kernel. With this table the supervisor
//! answers them itself: the worker publishes, per file, the present range it last wrote into, and
//! the supervisor allows an access that lies inside it. The worker still hears of the access (a
//! note, after the answer) to keep its readahead going.
//!
//! Why an answer from here can never let a reader see stub bytes:
//! - A range is published only after its bytes were written into the file, so they are in the
//!   page cache or on disk for every reader from then on.
//! - Present ranges only grow, except by a release (`lifecycle`), which withdraws the file's
//!   range here before it frees a block, under a write lease: no reader has the file open then,
//!   so no access event of it is in flight. A local truncate makes what lies beyond it the user's
//!   bytes, never the source's.
//! - A slot names one incarnation of one inode: device, inode number and birth time, so an inode
//!   number reused by a new stub does not match.
//! - A worker that dies leaves what it published true (the bytes stay in the file); the table
//!   lives as long as the supervisor that created it.
//!
//! The table is a fixed array of slots indexed by a hash of the inode: a cache, where a file
//! that collides with another just loses its slot and goes to the worker. Each slot is a seqlock;
//! a writer that finds the slot being written skips publishing.

use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Slots in the table: files being read at once that are served from here.
pub const SLOTS: usize = 1024;

/// One incarnation of one inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    /// Birth time in nanoseconds: tells a reused inode number from the file it was before.
    pub btime_ns: u64,
}

impl FileId {
    /// The file behind `fd`; `None` where its filesystem keeps no birth time (nothing is
    /// published for it then).
    pub fn of(fd: std::os::fd::BorrowedFd<'_>) -> Option<FileId> {
        let (dev, ino, btime_ns) = crate::sys::fs::inode_incarnation(fd).ok()??;
        Some(FileId { dev, ino, btime_ns })
    }
}

#[derive(Default)]
#[repr(C)]
struct Slot {
    /// Odd while a writer is changing the slot.
    seq: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
    btime_ns: AtomicU64,
    start: AtomicU64,
    end: AtomicU64,
}

/// Shared between processes (`sys::shm`, whose `Shareable` impl relies on this): `#[repr(C)]`,
/// atomics only, and all-zero is an empty table (end 0 covers nothing).
#[repr(C)]
pub struct PublishedRanges {
    slots: [Slot; SLOTS],
}

impl PublishedRanges {
    fn slot(&self, id: &FileId) -> &Slot {
        let h = (id.ino ^ id.dev.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.slots[(h >> 32) as usize % SLOTS]
    }

    /// Bytes `[start, end)` of `id` are in the file.
    pub fn publish(&self, id: &FileId, start: u64, end: u64) {
        let slot = self.slot(id);
        let seq = slot.seq.load(Ordering::Relaxed);
        if seq & 1 == 1
            || slot
                .seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return; // another thread is writing this slot: this range is just not published
        }
        fence(Ordering::Release);
        slot.dev.store(id.dev, Ordering::Relaxed);
        slot.ino.store(id.ino, Ordering::Relaxed);
        slot.btime_ns.store(id.btime_ns, Ordering::Relaxed);
        slot.start.store(start, Ordering::Relaxed);
        slot.end.store(end, Ordering::Relaxed);
        slot.seq.store(seq + 2, Ordering::Release);
    }

    /// Nothing of `id` is published any more: for a file about to be released (its bytes given
    /// back). Waits out a concurrent writer of the slot rather than skip, unlike `publish`.
    pub fn withdraw(&self, id: &FileId) {
        let slot = self.slot(id);
        loop {
            let seq = slot.seq.load(Ordering::Relaxed);
            if seq & 1 == 0
                && slot
                    .seq
                    .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                fence(Ordering::Release);
                let ours = slot.dev.load(Ordering::Relaxed) == id.dev
                    && slot.ino.load(Ordering::Relaxed) == id.ino
                    && slot.btime_ns.load(Ordering::Relaxed) == id.btime_ns;
                if ours {
                    slot.start.store(0, Ordering::Relaxed);
                    slot.end.store(0, Ordering::Relaxed);
                }
                slot.seq.store(seq + 2, Ordering::Release);
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Is `[offset, offset + count)` of `id` inside a published range? `count` 0 ("the whole
    /// file") never is.
    pub fn covers(&self, id: &FileId, offset: u64, count: u64) -> bool {
        self.range(id).is_some_and(|(start, end)| {
            count > 0 && start <= offset && offset.checked_add(count).is_some_and(|e| e <= end)
        })
    }

    /// The range published for `id`, read whole (never half of two writes).
    fn range(&self, id: &FileId) -> Option<(u64, u64)> {
        let slot = self.slot(id);
        let before = slot.seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            return None;
        }
        let found = FileId {
            dev: slot.dev.load(Ordering::Relaxed),
            ino: slot.ino.load(Ordering::Relaxed),
            btime_ns: slot.btime_ns.load(Ordering::Relaxed),
        };
        let range = (
            slot.start.load(Ordering::Relaxed),
            slot.end.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (slot.seq.load(Ordering::Relaxed) == before && found == *id).then_some(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shm::Shared;

    fn id(ino: u64, btime_ns: u64) -> FileId {
        FileId {
            dev: 7,
            ino,
            btime_ns,
        }
    }

    #[test]
    fn a_withdrawn_file_is_covered_no_more_and_others_keep_theirs() {
        let t = Shared::<PublishedRanges>::create(c"test-withdrawn").unwrap();
        let a = id(40, 1);
        t.publish(&a, 0, 1 << 20);
        assert!(t.covers(&a, 0, 4096));
        // Another incarnation of the inode does not take a's range away.
        t.withdraw(&id(40, 2));
        assert!(t.covers(&a, 0, 4096));
        t.withdraw(&a);
        assert!(!t.covers(&a, 0, 4096));
        // Withdrawing what is not there is harmless; publishing again works.
        t.withdraw(&a);
        t.publish(&a, 0, 8192);
        assert!(t.covers(&a, 4096, 4096));
    }

    #[test]
    fn only_a_published_range_of_the_same_inode_incarnation_is_covered() {
        let t = Shared::<PublishedRanges>::create(c"test-published").unwrap();
        let a = id(12, 1_000);
        assert!(!t.covers(&a, 0, 4096), "an empty table covers nothing");
        t.publish(&a, 1 << 20, 9 << 20);
        assert!(t.covers(&a, 1 << 20, 128 << 10));
        assert!(t.covers(&a, (9 << 20) - 4096, 4096));
        assert!(!t.covers(&a, (9 << 20) - 4096, 8192), "runs past the end");
        assert!(!t.covers(&a, (1 << 20) - 4096, 8192), "starts before");
        assert!(!t.covers(&a, 1 << 20, 0), "count 0 is the whole file");
        assert!(!t.covers(&a, u64::MAX - 10, 4096), "no overflow");
        // The same inode number, born again: another file.
        assert!(!t.covers(&id(12, 2_000), 1 << 20, 4096));
        assert!(!t.covers(&FileId { dev: 8, ..a }, 1 << 20, 4096));
        // A later publish of the file replaces its range.
        t.publish(&a, 0, 4096);
        assert!(t.covers(&a, 0, 4096));
        assert!(!t.covers(&a, 1 << 20, 4096));
    }

    #[test]
    fn a_file_that_takes_another_files_slot_leaves_nothing_of_it_covered() {
        let t = Shared::<PublishedRanges>::create(c"test-published").unwrap();
        let a = id(1, 5);
        t.publish(&a, 0, 1 << 30);
        let b = (2..)
            .map(|ino| id(ino, 5))
            .find(|b| std::ptr::eq(t.slot(b), t.slot(&a)))
            .unwrap();
        t.publish(&b, 0, 4096);
        assert!(!t.covers(&a, 0, 4096));
        assert!(t.covers(&b, 0, 4096));
    }

    #[test]
    fn a_reader_never_sees_half_of_one_write_and_half_of_another() {
        // Writer k publishes (s, s + 4096 k) with s a multiple of 1 MiB: a torn read would
        // show another length, or a start off the MiB.
        let t = std::sync::Arc::new(Shared::<PublishedRanges>::create(c"test-published").unwrap());
        let a = id(3, 9);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (1..=2u64)
            .map(|k| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let start = (i * 7 + k) % 1000 * (1 << 20);
                        t.publish(&a, start, start + 4096 * k);
                        i += 1;
                        (0..64).for_each(|_| std::hint::spin_loop()); // the worker writes between
                    }
                })
            })
            .collect();
        // Read until many whole writes were seen (on 2 busy cores the slot can be mid-write for
        // a whole time slice), bounded in time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (mut reads, mut seen) = (0u64, 0u64);
        while (reads < 500_000 || seen < 10_000) && std::time::Instant::now() < deadline {
            reads += 1;
            if let Some((start, end)) = t.range(&a) {
                seen += 1;
                assert_eq!(start % (1 << 20), 0, "torn: ({start}, {end})");
                assert!(
                    end - start == 4096 || end - start == 8192,
                    "torn: ({start}, {end})"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(
            seen >= 10_000,
            "the reader saw only {seen} whole writes in {reads} reads"
        );
    }
}
