//! The buffers fetched bytes wait in between the backend's read and the write into the stub.
//! Apart from the fill path because their memory is a concern of its own: big pieces go into
//! huge pages (a direct read into them is one device segment per 64 KiB, not per 4 KiB page:
//! see [`crate::sys::mem`]), which are kept for the next reads rather than mapped and faulted
//! in again each time, and given back once nothing has used them for a flush interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::sys::mem::HugeBuf;

/// Pieces longer than this are read into huge pages; shorter ones (a small file, a random
/// reader's page) into the heap, where a 2 MiB page apiece would be memory wasted, and a local
/// source reads them through its thread's aligned buffer (as long: `backend::local`).
const HEAP_MAX: usize = 64 << 10;

/// Idle huge buffers kept for the next reads: a sequential reader's readahead has about this
/// many pieces in flight (16 MiB with the default 1 MiB chunks).
const MAX_IDLE: usize = 8;

#[derive(Default)]
pub(super) struct Buffers {
    idle: Mutex<Vec<HugeBuf>>,
    /// A buffer was taken since the last [`Buffers::trim`].
    used: AtomicBool,
}

impl Buffers {
    /// A zeroed buffer of `len` bytes (zeroed when first mapped; a reused one holds a former
    /// read's bytes, which the next read overwrites: only what a read filled is ever used).
    pub(super) fn take(self: &Arc<Self>, len: usize) -> Buffer {
        if len > HEAP_MAX {
            self.used.store(true, Ordering::Relaxed);
            let reused = {
                let mut idle = lock(&self.idle);
                let fit = idle.iter().position(|b| b.len() >= len);
                fit.map(|i| idle.swap_remove(i))
            };
            // Out of memory for a mapping: the heap may still serve (or fail as it would have).
            if let Some(huge) = reused.or_else(|| HugeBuf::new(len).ok()) {
                return Buffer {
                    bytes: Bytes::Huge(Some(huge), self.clone()),
                    len,
                };
            }
        }
        Buffer {
            bytes: Bytes::Heap(vec![0u8; len]),
            len,
        }
    }

    fn give_back(&self, huge: HugeBuf) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(huge);
        }
    }

    /// Unmap the idle buffers if none was taken since the last call (the flusher calls this
    /// every round): a daemon between bursts holds no buffer memory.
    pub(super) fn trim(&self) {
        if !self.used.swap(false, Ordering::Relaxed) {
            lock(&self.idle).clear();
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// `len` bytes for one backend read, returned to the pool when dropped.
pub(super) struct Buffer {
    bytes: Bytes,
    len: usize,
}

enum Bytes {
    Heap(Vec<u8>),
    /// `Some` until dropped.
    Huge(Option<HugeBuf>, Arc<Buffers>),
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Heap(v) => &v[..self.len],
            Bytes::Huge(h, _) => h.as_deref().map_or(&[], |h| &h[..self.len]),
        }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.bytes {
            Bytes::Heap(v) => &mut v[..self.len],
            Bytes::Huge(h, _) => h.as_deref_mut().map_or(&mut [], |h| &mut h[..self.len]),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Bytes::Huge(h, pool) = &mut self.bytes {
            if let Some(h) = h.take() {
                pool.give_back(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_buffers_are_reused_small_ones_are_not_pooled() {
        let pool = Arc::new(Buffers::default());
        let mut a = pool.take(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        a[0] = 9;
        let at = a.as_ptr();
        drop(a);
        assert_eq!(pool.idle(), 1);
        // The same mapping again, holding what the last read left (a read overwrites it).
        let b = pool.take(1 << 20);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(pool.idle(), 0);
        drop(b);
        let small = pool.take(4096);
        assert_eq!(small.len(), 4096);
        drop(small);
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn a_buffer_too_small_is_not_handed_out_for_a_longer_read() {
        let pool = Arc::new(Buffers::default());
        drop(pool.take(HEAP_MAX + 1));
        let big = pool.take(3 << 20);
        assert_eq!(big.len(), 3 << 20);
        assert!(big.iter().all(|&x| x == 0));
        drop(big);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn at_most_max_idle_are_kept_and_unused_ones_are_trimmed() {
        let pool = Arc::new(Buffers::default());
        let held: Vec<Buffer> = (0..MAX_IDLE + 3).map(|_| pool.take(1 << 20)).collect();
        drop(held);
        assert_eq!(pool.idle(), MAX_IDLE);
        // Used since the last trim: kept.
        pool.trim();
        assert_eq!(pool.idle(), MAX_IDLE);
        // Not used since: given back to the system.
        pool.trim();
        assert_eq!(pool.idle(), 0);
    }
}
