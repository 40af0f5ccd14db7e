//! Readahead: fetching ahead of a sequential reader on background threads, so that its next
//! requests find their chunks present. Apart from the fill path because it is the one part of
//! the engine that works for no request in hand (a full queue drops the work).

use std::os::fd::AsFd;
use std::sync::Arc;

use tracing::debug;

use super::cache::Entry;
use super::{lock, Engine};

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
