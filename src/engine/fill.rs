//! The fill path: fetch missing pieces of a stub from the backend (on fetch threads, with a
//! deadline), check them against the recorded digests, write them through the writer fd and
//! publish the ranges now present. Each chunk is fetched once: concurrent requests for it wait
//! for the one that claimed it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::buffers::{Buffer, Buffers};
use super::cache::Entry;
use super::plan::{chunk_pieces, read_span, Shape};
use super::{fd_path, lock, Engine};
use crate::backend::{Backend, FetchError};
use crate::metrics::Metrics;
use crate::sys::fs as sysfs;

pub(super) struct FetchJob {
    entry: Arc<Entry>,
    offset: u64,
    len: usize,
}

pub(super) type FetchReply = crossbeam_channel::Sender<Result<Buffer, FetchError>>;

/// A backend read that [`Engine::submit`] started.
enum Started {
    /// Read on the calling thread (the backend's reads cannot stall).
    Done(Result<Buffer, FetchError>),
    /// On a fetch thread: the answer comes here, or the caller gives up at its deadline.
    Queued(crossbeam_channel::Receiver<Result<Buffer, FetchError>>),
}

impl Started {
    fn wait(
        self,
        timeout: Duration,
    ) -> Result<Result<Buffer, FetchError>, crossbeam_channel::RecvTimeoutError> {
        match self {
            Started::Done(res) => Ok(res),
            Started::Queued(rx) => rx.recv_timeout(timeout),
        }
    }
}

impl FetchJob {
    /// Read the job's bytes from `backend` into a buffer from `buffers`, a panic in the
    /// backend turned into this read's error.
    pub(super) fn read(
        &self,
        backend: &dyn Backend,
        buffers: &Arc<Buffers>,
    ) -> Result<Buffer, FetchError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut buf = buffers.take(self.len);
            backend.read_range(&self.entry.source, self.offset, &mut buf)?;
            Ok(buf)
        }))
        .unwrap_or_else(|_| Err(FetchError::Io(io::Error::other("backend read panicked"))))
    }
}

/// Backend reads in flight at once for one request (each up to a chunk in memory).
const FETCH_WINDOW: usize = 8;
pub(super) const FETCH_THREADS: usize = 32;
/// Threads of the low-priority pool: a recorded access list's prefetch (see
/// `crate::access_list`) and a directory prefetch (`crate::prefetch`) read the backend on these
/// only, so that a reader's miss never queues behind them.
pub(super) const LOW_FETCH_THREADS: usize = 64;

/// Releases chunk claims when dropped, even if the fetch panicked.
struct Claims<'a> {
    entry: &'a Entry,
    chunks: Vec<u64>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.entry.state);
        for c in &self.chunks {
            st.in_flight.remove(c);
        }
        let waiters = st.waiters;
        drop(st);
        if waiters > 0 {
            self.entry.changed.notify_all();
        }
    }
}

impl Engine {
    /// Make `[start, end)` present, fetching each missing chunk once. Returns whether this call
    /// fetched anything itself. `readahead`: leave pieces that others are fetching to them.
    pub(super) fn fill(
        &self,
        entry: &Arc<Entry>,
        fd: BorrowedFd<'_>,
        start: u64,
        end: u64,
        readahead: bool,
    ) -> io::Result<bool> {
        self.fill_at(entry, fd, start, end, readahead, false)
    }

    /// [`Engine::fill`]; `low`: the backend reads go to the low-priority pool.
    pub(super) fn fill_at(
        &self,
        entry: &Arc<Entry>,
        fd: BorrowedFd<'_>,
        start: u64,
        end: u64,
        readahead: bool,
        low: bool,
    ) -> io::Result<bool> {
        let chunk = entry.source.chunk_size as u64;
        let mut wrote = false;
        loop {
            let mut s = lock(&entry.state);
            let end = end.min(s.record.backed_len);
            let gaps = s.record.present.gaps(start, end);
            if gaps.is_empty() {
                return Ok(wrote);
            }
            // Claim every missing piece not already being fetched; wait for the others.
            let mut mine: Vec<(u64, u64, u64)> = Vec::new();
            for (gs, ge) in gaps {
                for (c, ps, pe) in chunk_pieces(gs, ge, chunk) {
                    if !s.in_flight.contains(&c) {
                        s.in_flight.insert(c);
                        mine.push((c, ps, pe));
                    }
                }
            }
            if mine.is_empty() {
                if readahead {
                    return Ok(wrote); // someone else is on it
                }
                s.waiters += 1;
                let (mut s, _) = entry
                    .changed
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner());
                s.waiters -= 1;
                continue;
            }
            drop(s);
            let _claims = Claims {
                entry,
                chunks: mine.iter().map(|m| m.0).collect(),
            };
            // One piece (a random access, a reader's first chunk) from a source that cannot
            // stall: read it here rather than wake a fetch thread and wait for it. More: keep
            // FETCH_WINDOW reads in flight, the next one started as each is written, so the
            // source is read while this thread copies into the stub.
            let here = mine.len() == 1 && !self.backend.reads_may_stall();
            let mut todo = mine.iter();
            let mut in_flight = std::collections::VecDeque::with_capacity(FETCH_WINDOW);
            loop {
                while in_flight.len() < FETCH_WINDOW {
                    let Some(&(c, ps, pe)) = todo.next() else {
                        break;
                    };
                    let asked = Instant::now();
                    let (started, from) = self.submit(entry, c, ps, pe, here, low);
                    in_flight.push_back((c, ps, pe, started, from, asked));
                }
                let Some((c, ps, pe, started, fetched_from, asked)) = in_flight.pop_front() else {
                    break;
                };
                let wait = (asked + self.fetch_timeout).saturating_duration_since(Instant::now());
                let fetched = match started.wait(wait) {
                    Ok(Ok(fetched)) => {
                        // Queued behind others it only looks longer: the shortest counts.
                        let now = Instant::now();
                        lock(&self.round_trip).observe(now.saturating_duration_since(asked), now);
                        fetched
                    }
                    Ok(Err(e)) => {
                        warn!(
                            file = %fd_path(fd),
                            range = %format!("{ps}..{pe}"),
                            source = %self.backend.describe(),
                            "fetch failed: {e}"
                        );
                        return Err(e.as_io());
                    }
                    Err(_) => {
                        warn!(
                            file = %fd_path(fd),
                            range = %format!("{ps}..{pe}"),
                            source = %self.backend.describe(),
                            "fetch timed out after {:?}", self.fetch_timeout
                        );
                        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                    }
                };
                if let Some(digests) = &entry.digests {
                    let ok = digests
                        .get(c as usize)
                        .is_some_and(|d| *d == crate::digest::chunk_digest(&fetched));
                    if !ok {
                        warn!(
                            file = %fd_path(fd),
                            range = %format!("{}..{}", fetched_from, fetched_from + fetched.len() as u64),
                            source = %self.backend.describe(),
                            "fetched bytes do not match the recorded digest; nothing written"
                        );
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                }
                let lo = (ps - fetched_from) as usize;
                let hi = (pe - fetched_from) as usize;
                self.write_piece(entry, fd, ps, pe, &fetched[lo..hi])?;
                wrote = true;
                if readahead {
                    Metrics::add(&self.metrics.readahead_bytes, pe - ps);
                }
            }
        }
    }

    /// Start the backend read for piece `[ps, pe)` of chunk `c`: the whole chunk when it must be
    /// checked against its digest; on this thread if `here`, else on a fetch thread. Returns
    /// where the read starts.
    fn submit(
        &self,
        entry: &Arc<Entry>,
        c: u64,
        ps: u64,
        pe: u64,
        here: bool,
        low: bool,
    ) -> (Started, u64) {
        let (from, to) = read_span(Shape::of(entry), entry.source.size, c, ps, pe);
        Metrics::add(&self.metrics.backend_reads, 1);
        let job = FetchJob {
            entry: entry.clone(),
            offset: from,
            len: (to - from) as usize,
        };
        if here {
            return (Started::Done(job.read(&*self.backend, &self.buffers)), from);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let queue = if low {
            &self.low_fetch_tx
        } else {
            &self.fetch_tx
        };
        let _ = queue.send((job, tx));
        (Started::Queued(rx), from)
    }

    /// Write fetched bytes `[ps, pe)` through `fd` and mark them present.
    fn write_piece(
        &self,
        entry: &Entry,
        fd: BorrowedFd<'_>,
        ps: u64,
        pe: u64,
        piece: &[u8],
    ) -> io::Result<()> {
        // The file may have been truncated while we fetched: never write past its end.
        let st = sysfs::fstat(fd)?;
        let size = st.st_size as u64;
        let pe_now = pe.min(size);
        let suspect = lock(&entry.state).suspect;
        if pe_now > ps {
            let n = (pe_now - ps) as usize;
            let dst = entry.writer.as_ref().map_or(fd, |w| w.as_fd());
            let written = if suspect && self.keep_local_bytes(fd, ps, &piece[..n])? {
                Ok(false)
            } else {
                let _one_writer = lock(&entry.writing);
                sysfs::pwrite_all(dst, &piece[..n], ps).map(|()| true)
            };
            if !matches!(written, Ok(false)) && !entry.keeps_times {
                // Writing through the fd moved the mtime, even a write that failed part way (a
                // full disk): the file still is the source's, not a local change.
                let _ = sysfs::set_mtime(fd, sysfs::mtime_of(&st));
            }
            written?;
        }
        Metrics::add(&self.metrics.fetched_bytes, pe_now.saturating_sub(ps));
        self.top_files
            .add(&entry.source.key, pe_now.saturating_sub(ps));
        let mut s = lock(&entry.state);
        if size < s.record.backed_len {
            s.record.backed_len = size;
            s.record.present.truncate(size);
            s.record.modified = true;
        }
        let backed = s.record.backed_len;
        s.record.present.insert(ps, pe_now.min(backed));
        // Written: the supervisor may answer accesses inside this range from now on.
        if let (Some(table), Some(id), Some((start, end))) =
            (&self.published, &entry.id, s.record.present.range_at(ps))
        {
            table.publish(id, start, end);
        }
        s.last_access = Instant::now();
        s.dirty = true;
        s.dirty_since.get_or_insert_with(Instant::now);
        if s.record.is_complete() {
            Metrics::add(&self.metrics.files_completed, 1);
        }
        let present = s.record.present_bytes();
        let waiters = s.waiters;
        drop(s);
        if let Some(space) = self.space.get() {
            space.filled(fd, present);
        }
        // A reader waiting on this piece (claimed by another request, readahead say) goes on
        // now, not when that request's last piece is written.
        if waiters > 0 {
            entry.changed.notify_all();
        }
        Ok(())
    }

    /// In a file of unknown history (see `EntryState::suspect`), is `[ps, ps + len)` already
    /// the user's? Unfetched bytes are zeros (holes or zero clones); a fill cut short by a crash
    /// is a prefix of the source's bytes followed by zeros. Anything else was written locally and
    /// is kept (the range is then recorded present without writing).
    fn keep_local_bytes(&self, fd: BorrowedFd<'_>, ps: u64, source: &[u8]) -> io::Result<bool> {
        let mut cur = vec![0u8; source.len()];
        let n = sysfs::pread_full(fd, &mut cur, ps)?;
        cur.truncate(n);
        let common = cur.iter().zip(source).take_while(|(a, b)| a == b).count();
        let is_our_prefix = cur[common..].iter().all(|&b| b == 0);
        if !is_our_prefix {
            warn!(file = %fd_path(fd), offset = ps, "kept bytes written locally in a range not recorded present");
        }
        Ok(!is_our_prefix)
    }
}
