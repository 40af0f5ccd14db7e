//! The defaults of `hsm serve`, in one place: the command line (`default_value_t`) and
//! [`crate::supervisor::ServeOptions::default`] both take them from here.

use std::time::Duration;

/// `--threads`: threads serving events in the worker.
pub const THREADS: usize = 16;
/// `--readahead`: bytes fetched ahead of a sequential reader.
pub const READAHEAD: u64 = 8 << 20;
/// `--dir-prefetch`: files per window of a directory prefetch (see `prefetch`).
pub const DIR_PREFETCH: usize = 256;
/// `--fetch-deadline`: seconds a backend read may take before the access fails with EAGAIN.
pub const FETCH_DEADLINE_SECS: f64 = 30.0;
/// `--drain`: seconds already-open files are still served after a stop is asked for.
pub const DRAIN_SECS: f64 = 2.0;
/// `--fetch-user`: the user remote backends run as.
pub const FETCH_USER: &str = "nobody";
/// The supervisor denies an event its worker has not answered this long after the fetch
/// deadline (a read on a local disk's source is not bounded by the fetch deadline).
pub const EVENT_DEADLINE_MARGIN: Duration = Duration::from_secs(15);

/// Seconds as given on the command line, clamped to 0..=1 day (NaN: 0).
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() {
        s.clamp(0.0, 86_400.0)
    } else {
        0.0
    })
}
