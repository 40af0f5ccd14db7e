//! The daemon's counters. Cheap relaxed atomics on the event path; written as JSON to the store
//! while the daemon runs and when it stops, for `hsm status`, tests and dashboards. They live in
//! memory shared by the supervisor and its workers (`sys::shm`), so both count, and a restarted
//! worker continues the same counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Shared between processes (`sys::shm`, whose `Shareable` impl relies on this):
        /// `#[repr(C)]`, atomics only, all-zero the default.
        #[derive(Default, Debug)]
        #[repr(C)]
        pub struct Metrics { $(#[doc = $doc] pub $name: AtomicU64,)* }

        #[derive(Default, Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct Snapshot { $(#[doc = $doc] pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    events_pre_access: "Pre-content events received.",
    events_open: "Open permission events received (plain and exec).",
    allowed: "Events allowed.",
    denied: "Events denied with an errno.",
    backend_reads: "Range reads issued to the backend.",
    fetched_bytes: "Bytes fetched from the backend and written into stubs.",
    readahead_bytes: "Of those, bytes fetched ahead of the reader (sequential readahead, directory prefetch).",
    files_completed: "Files that became complete while the daemon ran.",
    ignore_marks: "Ignore marks placed on complete or unmanaged files.",
    records_written: "State records persisted.",
    worker_starts: "Worker processes started (more than one: a worker died and was replaced).",
    prefetched_files: "Files fetched in the background because their directory was being walked.",
    answered_published: "Of the pre-content events, those the supervisor answered from a range the worker had published.",
}

impl Metrics {
    /// Write the counters as JSON, atomically (write then rename).
    pub fn write(&self, path: &std::path::Path) {
        let tmp = path.with_extension("json.tmp");
        if let Ok(body) = serde_json::to_vec_pretty(&self.snapshot()) {
            if std::fs::write(&tmp, body).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
