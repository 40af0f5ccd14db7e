//! Planning one access: what range of a stub to make present for what the kernel asked, and
//! whether the reader goes on from where it was (a sequential reader, fetched whole chunks and
//! readahead) or reads at random (fetched small pieces). Apart from the fill path because it
//! decides without doing any I/O.
//!
//! Everything here is a pure function of its arguments, the time included (`now`), so that it is
//! tested without a kernel, a filesystem or a clock.

use std::time::Instant;

use super::cache::{Entry, EntryState};
use super::Need;
use crate::record::StubKind;

/// What planning needs of a file's source record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    /// The source's chunk size (nonzero: populate refuses 0).
    pub(super) chunk: u64,
    pub(super) kind: StubKind,
    /// Chunks are checked against recorded digests, so they are fetched whole.
    pub(super) checked: bool,
}

impl Shape {
    pub(super) fn of(entry: &Entry) -> Shape {
        Shape {
            chunk: entry.source.chunk_size as u64,
            kind: entry.source.kind,
            checked: entry.digests.is_some(),
        }
    }
}

/// Where a file's reader was, for telling a sequential reader from a random one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    /// End of the chunks the requests so far reached: a request starting here is sequential.
    pub(super) last_end: u64,
    /// End of the last range requested, as the kernel gave it.
    pub(super) last_request_end: u64,
    /// Where the current sequential run began: the last access that did not follow on.
    pub(super) run_start: u64,
}

impl Cursor {
    /// Does a request of `count` bytes at `offset` go on from where the last one ended? Within
    /// one request (or one `random_piece`) of it counts: readers with a few requests in flight
    /// arrive a little out of order. A read from the start of the file always does.
    ///
    /// A chunk's distance was too wide: a random reader of a 1 GiB file landed that close once in
    /// 500 reads and paid a whole chunk for a page (2,000 cold 4 KiB reads: 12.3 MB read for
    /// 8.2 MB asked).
    pub(super) fn follows(&self, offset: u64, count: u64, random_piece: u64) -> bool {
        offset == 0 || offset.abs_diff(self.last_request_end) <= count.max(random_piece)
    }

    /// Is fetching `[start, end)` the next step of a sequential read: it starts within what the
    /// reads so far reached (not at the file's start) and goes beyond it?
    pub(super) fn extended_by(&self, start: u64, end: u64) -> bool {
        start > 0 && start <= self.last_end && self.last_end < end
    }
}

/// What serving one access takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// The range to make present (empty: nothing).
    pub(super) start: u64,
    pub(super) end: u64,
    /// The reader goes on where it was: fetch ahead of it.
    pub(super) sequential: bool,
    pub(super) complete: bool,
    /// Where the source's bytes end in the file (see `StateRecord::backed_len`).
    pub(super) backed: u64,
    /// Bytes of the reader's current sequential run, to this plan's end.
    pub(super) run: u64,
}

/// Work out what `need` takes for a file of `size` bytes at `now`, and note the access in `s`.
/// `random_piece`: what an access away from where the file was last read fetches (aligned),
/// instead of whole chunks: random readers of big files should not pay for a chunk per page.
pub(super) fn plan(
    shape: Shape,
    s: &mut EntryState,
    size: u64,
    need: Need,
    random_piece: u64,
    now: Instant,
) -> Plan {
    let chunk = shape.chunk;
    s.last_access = now;
    // A file shorter than the part we know is backed was truncated locally: what lies beyond is
    // the user's, never the source's again.
    if size < s.record.backed_len {
        s.record.backed_len = size;
        s.record.present.truncate(size);
        s.record.modified = true;
        s.dirty = true;
    }
    let backed = s.record.backed_len;
    let mut follows = true;
    let (start, end) = match need {
        Need::Whole | Need::Range { count: 0, .. } => (0, backed),
        Need::Open if shape.kind == StubKind::Sparse => (0, backed),
        Need::Open => (0, 0),
        Need::Range { offset, count } => {
            let request_end = offset.saturating_add(count).min(backed);
            follows = s.cursor.follows(offset, count, random_piece);
            s.cursor.last_request_end = request_end;
            // A reader that goes on from where it was gets whole chunks (and readahead); an
            // access elsewhere, only the pieces around it, unless chunks must be checked whole
            // against their digests.
            let piece = if follows || shape.checked {
                chunk
            } else {
                random_piece.min(chunk)
            };
            let start = offset / piece * piece;
            if !follows {
                s.cursor.run_start = start;
            }
            (start, request_end.div_ceil(piece) * piece)
        }
    };
    let end = end.min(backed);
    let start = start.min(end);
    let sequential = follows && s.cursor.extended_by(start, end);
    if end > start {
        s.cursor.last_end = s.cursor.last_end.max(end).min(backed);
    }
    Plan {
        start,
        end,
        sequential,
        complete: s.record.is_complete(),
        backed,
        run: end.saturating_sub(s.cursor.run_start),
    }
}

/// The pieces of the gap `[gs, ge)` one per chunk, as `(chunk index, start, end)`: each within
/// its chunk (so that a chunk is claimed and fetched by one request) and within the gap.
pub(super) fn chunk_pieces(gs: u64, ge: u64, chunk: u64) -> Vec<(u64, u64, u64)> {
    let mut pieces = Vec::new();
    let mut c = gs / chunk;
    while c * chunk < ge {
        pieces.push((c, (c * chunk).max(gs), ((c + 1) * chunk).min(ge)));
        c += 1;
    }
    pieces
}

/// What to read from the source for piece `[ps, pe)` of chunk `c`, in a source of `size` bytes:
/// the piece, or when chunks are `checked` against digests its whole chunk (the last one ends
/// with the source).
pub(super) fn read_span(shape: Shape, size: u64, c: u64, ps: u64, pe: u64) -> (u64, u64) {
    if shape.checked {
        (c * shape.chunk, ((c + 1) * shape.chunk).min(size))
    } else {
        (ps, pe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ranges::RangeSet;
    use crate::record::StateRecord;
    use std::time::Duration;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    /// A local disk's random piece (see `Backend::random_piece`).
    const PIECE: u64 = 4 * KIB;

    fn shape(kind: StubKind, checked: bool) -> Shape {
        Shape {
            chunk: MIB,
            kind,
            checked,
        }
    }

    const CLONED: Shape = Shape {
        chunk: MIB,
        kind: StubKind::Cloned,
        checked: false,
    };

    fn state(size: u64, now: Instant) -> EntryState {
        let record = StateRecord {
            backed_len: size,
            present: RangeSet::new(),
            modified: false,
        };
        EntryState::new(record, false, now)
    }

    fn range(offset: u64, count: u64) -> Need {
        Need::Range { offset, count }
    }

    /// The plan, without the access time.
    fn span(p: Plan) -> (u64, u64, bool) {
        (p.start, p.end, p.sequential)
    }

    #[test]
    fn a_first_read_at_the_start_gets_its_whole_chunk_but_no_readahead() {
        let now = Instant::now();
        let mut s = state(10 * MIB, now);
        let p = plan(CLONED, &mut s, 10 * MIB, range(0, 4 * KIB), PIECE, now);
        assert_eq!(span(p), (0, MIB, false));
        assert!(!p.complete);
        assert_eq!(s.cursor.last_end, MIB);
        assert_eq!(s.cursor.last_request_end, 4 * KIB);
    }

    #[test]
    fn a_reader_that_goes_on_into_the_next_chunk_is_sequential() {
        let now = Instant::now();
        let mut s = state(10 * MIB, now);
        // 128 KiB reads through the first chunk: its chunk, never a step beyond what was reached.
        for i in 0..8 {
            let p = plan(
                CLONED,
                &mut s,
                10 * MIB,
                range(i * 128 * KIB, 128 * KIB),
                PIECE,
                now,
            );
            assert_eq!(span(p), (0, MIB, false), "read {i}");
        }
        // The read that goes on into the second chunk: sequential, the second chunk whole.
        let p = plan(CLONED, &mut s, 10 * MIB, range(MIB, 128 * KIB), PIECE, now);
        assert_eq!(span(p), (MIB, 2 * MIB, true));
        assert_eq!(s.cursor.last_end, 2 * MIB);
        // A run from the start: 2 MiB long so far.
        assert_eq!(p.run, 2 * MIB);
        // A jump far ahead: random, only its piece, and the cursor keeps its furthest end.
        let p = plan(
            CLONED,
            &mut s,
            10 * MIB,
            range(6 * MIB, 4 * KIB),
            PIECE,
            now,
        );
        assert_eq!(span(p), (6 * MIB, 6 * MIB + 4 * KIB, false));
        assert_eq!(s.cursor.last_end, 6 * MIB + 4 * KIB);
        // It starts a new run: reading on from it, the run is counted from the jump.
        assert_eq!(p.run, 4 * KIB);
        let p = plan(
            CLONED,
            &mut s,
            10 * MIB,
            range(6 * MIB + 4 * KIB, 128 * KIB),
            PIECE,
            now,
        );
        assert_eq!(p.run, p.end - 6 * MIB);
    }

    #[test]
    fn requests_a_little_out_of_order_still_follow() {
        let c = Cursor {
            last_end: 2 * MIB,
            last_request_end: MIB,
            ..Cursor::default()
        };
        // Within one request of the last end, either side.
        assert!(c.follows(MIB + 128 * KIB, 128 * KIB, PIECE));
        assert!(c.follows(MIB - 128 * KIB, 128 * KIB, PIECE));
        // Small requests: within one random piece.
        assert!(c.follows(MIB + 4 * KIB, 512, PIECE));
        assert!(!c.follows(MIB + 4 * KIB + 1, 512, PIECE));
        // The start of the file always follows.
        assert!(c.follows(0, 4 * KIB, PIECE));
    }

    #[test]
    fn a_read_near_the_last_one_is_random_and_fetches_only_its_pieces() {
        let now = Instant::now();
        let mut s = state(64 * MIB, now);
        let p = plan(
            CLONED,
            &mut s,
            64 * MIB,
            range(8 * MIB, 4 * KIB),
            PIECE,
            now,
        );
        assert_eq!(span(p), (8 * MIB, 8 * MIB + 4 * KIB, false));
        // 256 KiB on: farther than one request or piece, so still random.
        let at = 8 * MIB + 256 * KIB;
        let p = plan(CLONED, &mut s, 64 * MIB, range(at, 4 * KIB), PIECE, now);
        assert_eq!(span(p), (at, at + 4 * KIB, false));
        // Unaligned: the pieces around it, aligned to the random piece.
        let p = plan(
            CLONED,
            &mut s,
            64 * MIB,
            range(20 * MIB + 100, 5000),
            PIECE,
            now,
        );
        assert_eq!(span(p), (20 * MIB, 20 * MIB + 8 * KIB, false));
        // Going on from there: its whole chunk, and a step beyond the pieces reached.
        let next = 20 * MIB + 100 + 5000;
        let p = plan(CLONED, &mut s, 64 * MIB, range(next, 4 * KIB), PIECE, now);
        assert_eq!(span(p), (20 * MIB, 21 * MIB, true));
    }

    #[test]
    fn checked_chunks_are_fetched_whole_even_for_a_random_read() {
        let now = Instant::now();
        let mut s = state(64 * MIB, now);
        let checked = shape(StubKind::Cloned, true);
        let p = plan(
            checked,
            &mut s,
            64 * MIB,
            range(8 * MIB + 12345, 100),
            PIECE,
            now,
        );
        assert_eq!(span(p), (8 * MIB, 9 * MIB, false));
    }

    #[test]
    fn a_random_piece_larger_than_a_chunk_is_cut_to_the_chunk() {
        let now = Instant::now();
        let mut s = state(64 * MIB, now);
        let p = plan(
            CLONED,
            &mut s,
            64 * MIB,
            range(8 * MIB, 4 * KIB),
            4 * MIB,
            now,
        );
        assert_eq!(span(p), (8 * MIB, 9 * MIB, false));
    }

    #[test]
    fn ranges_stop_at_the_end_of_the_file() {
        let now = Instant::now();
        let size = 3 * MIB + 1000;
        let mut s = state(size, now);
        // The last, short chunk.
        let p = plan(CLONED, &mut s, size, range(3 * MIB, 4 * KIB), PIECE, now);
        assert_eq!(span(p), (3 * MIB, size, false));
        // A request past the end: nothing to fetch.
        let p = plan(CLONED, &mut s, size, range(5 * MIB, 4 * KIB), PIECE, now);
        assert_eq!((p.start, p.end), (size, size));
        // A count that would overflow.
        let p = plan(CLONED, &mut s, size, range(u64::MAX - 10, 100), PIECE, now);
        assert_eq!(p.start, p.end);
        // The cursor never goes past the end.
        assert!(s.cursor.last_end <= size);
    }

    #[test]
    fn a_sequential_reader_at_the_end_is_not_sequential_past_it() {
        let now = Instant::now();
        let size = 2 * MIB;
        let mut s = state(size, now);
        plan(CLONED, &mut s, size, range(0, MIB), PIECE, now);
        let p = plan(CLONED, &mut s, size, range(MIB, MIB), PIECE, now);
        assert_eq!(span(p), (MIB, 2 * MIB, true));
        // Reading on at the end: nothing left, so nothing sequential to fetch ahead of.
        let p = plan(CLONED, &mut s, size, range(2 * MIB, MIB), PIECE, now);
        assert_eq!(span(p), (2 * MIB, 2 * MIB, false));
    }

    #[test]
    fn whole_file_needs_and_opens() {
        let now = Instant::now();
        let size = 5 * MIB;
        let mut s = state(size, now);
        assert_eq!(
            span(plan(CLONED, &mut s, size, Need::Whole, PIECE, now)),
            (0, size, false)
        );
        assert_eq!(
            span(plan(CLONED, &mut s, size, range(MIB, 0), PIECE, now)),
            (0, size, false)
        );
        // An open fetches the whole of a sparse stub, nothing of others.
        for (kind, want) in [
            (StubKind::Sparse, size),
            (StubKind::SparseLazy, 0),
            (StubKind::Cloned, 0),
        ] {
            let p = plan(shape(kind, false), &mut s, size, Need::Open, PIECE, now);
            assert_eq!((p.start, p.end), (0, want), "{kind:?}");
        }
    }

    #[test]
    fn a_file_truncated_locally_is_backed_no_further() {
        let now = Instant::now();
        let mut s = state(10 * MIB, now);
        s.record.present.insert(0, 4 * MIB);
        let p = plan(CLONED, &mut s, 3 * MIB, Need::Whole, PIECE, now);
        assert_eq!((p.start, p.end), (0, 3 * MIB));
        assert!(p.complete, "the 3 MiB left were present");
        assert_eq!(s.record.backed_len, 3 * MIB);
        assert!(s.record.present.contains(0, 3 * MIB));
        assert!(!s.record.present.contains(3 * MIB, 3 * MIB + 1));
        assert!(s.record.modified && s.dirty);
    }

    #[test]
    fn the_access_time_is_the_one_given() {
        let then = Instant::now();
        let later = then + Duration::from_secs(5);
        let mut s = state(MIB, then);
        plan(CLONED, &mut s, MIB, range(0, 1), PIECE, later);
        assert_eq!(s.last_access, later);
    }

    #[test]
    fn gaps_are_cut_at_chunk_boundaries() {
        assert_eq!(chunk_pieces(0, 0, MIB), vec![]);
        assert_eq!(chunk_pieces(0, MIB, MIB), vec![(0, 0, MIB)]);
        assert_eq!(chunk_pieces(100, 200, MIB), vec![(0, 100, 200)]);
        assert_eq!(
            chunk_pieces(MIB - 10, 2 * MIB + 10, MIB),
            vec![
                (0, MIB - 10, MIB),
                (1, MIB, 2 * MIB),
                (2, 2 * MIB, 2 * MIB + 10)
            ]
        );
        // A gap starting on a boundary begins with that chunk, not the one before.
        assert_eq!(
            chunk_pieces(3 * MIB, 3 * MIB + 1, MIB),
            vec![(3, 3 * MIB, 3 * MIB + 1)]
        );
    }

    #[test]
    fn checked_pieces_read_their_whole_chunk_and_the_last_ends_with_the_source() {
        let size = 2 * MIB + 500;
        let checked = shape(StubKind::Cloned, true);
        assert_eq!(
            read_span(checked, size, 1, MIB + 10, MIB + 20),
            (MIB, 2 * MIB)
        );
        assert_eq!(
            read_span(checked, size, 2, 2 * MIB, 2 * MIB + 100),
            (2 * MIB, size)
        );
        assert_eq!(
            read_span(CLONED, size, 1, MIB + 10, MIB + 20),
            (MIB + 10, MIB + 20)
        );
    }
}
