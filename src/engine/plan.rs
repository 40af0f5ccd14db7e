//! Planning one access: what range of a stub to make present for what the kernel asked, and
//! whether the reader goes on from where it was (a sequential reader, fetched whole chunks and
//! readahead) or reads at random (fetched small pieces). Apart from the fill path because it
//! decides without doing any I/O.

use std::time::Instant;

use super::cache::{Entry, EntryState};
use super::Need;
use crate::record::StubKind;

/// What serving one access takes.
pub(super) struct Plan {
    /// The range to make present (empty: nothing).
    pub(super) start: u64,
    pub(super) end: u64,
    /// The reader goes on where it was: fetch ahead of it.
    pub(super) sequential: bool,
    pub(super) complete: bool,
}

/// Work out what `need` takes for a file of `size` bytes now, and note the access in `s`.
/// `random_piece`: what an access away from where the file was last read fetches (aligned),
/// instead of whole chunks: random readers of big files should not pay for a chunk per page.
pub(super) fn plan(
    entry: &Entry,
    s: &mut EntryState,
    size: u64,
    need: Need,
    random_piece: u64,
) -> Plan {
    let chunk = entry.source.chunk_size as u64;
    s.last_access = Instant::now();
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
        Need::Open if entry.source.kind == StubKind::Sparse => (0, backed),
        Need::Open => (0, 0),
        Need::Range { offset, count } => {
            let request_end = offset.saturating_add(count).min(backed);
            // Within one request (or piece) of where the last one ended: readers with a few
            // requests in flight arrive a little out of order. A chunk's distance was too wide: a
            // random reader of a 1 GiB file landed that close once in 500 reads and paid a whole
            // chunk for a page (2,000 cold 4 KiB reads: 12.3 MB read for 8.2 MB asked).
            follows = offset == 0 || offset.abs_diff(s.last_request_end) <= count.max(random_piece);
            s.last_request_end = request_end;
            // A reader that goes on from where it was gets whole chunks (and readahead); an
            // access elsewhere, only the pieces around it, unless chunks must be checked whole
            // against their digests.
            let piece = if follows || entry.digests.is_some() {
                chunk
            } else {
                random_piece.min(chunk)
            };
            (offset / piece * piece, request_end.div_ceil(piece) * piece)
        }
    };
    let end = end.min(backed);
    let start = start.min(end);
    let sequential = follows && start > 0 && start <= s.last_end && s.last_end < end;
    if end > start {
        s.last_end = s.last_end.max(end).min(backed);
    }
    Plan {
        start,
        end,
        sequential,
        complete: s.record.is_complete(),
    }
}
