//! The daemon's counters. Cheap relaxed atomics on the event path; written as JSON to the store
//! while the daemon runs and when it stops, for `hsm status`, tests and dashboards. They live in
//! memory shared by the supervisor and its workers (`sys::shm`), so both count, and a restarted
//! worker continues the same counters.
//!
//! Rendered for people by [`render_stats`] and for Prometheus by [`prometheus_text`] (served by
//! `hsm serve --metrics`, see `crate::exporter`): both take a [`Snapshot`], so that any
//! interface that can reach the shared counters (the control socket) can serve them too.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::{Backend, FetchError};
use crate::record::SourceRecord;
use crate::sys::fanotify::{DenyErrno, Verdict, FAN_PRE_ACCESS};

/// Upper bounds (seconds) of the fetch duration histogram's buckets; one more bucket, +Inf.
pub const FETCH_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const NB: usize = FETCH_BUCKETS.len() + 1;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Shared between processes (`sys::shm`, whose `Shareable` impl relies on this):
        /// `#[repr(C)]`, atomics only, all-zero the default.
        #[derive(Debug)]
        #[repr(C)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// Backend reads by duration: one count per bucket of [`FETCH_BUCKETS`] (not
            /// cumulative), the last one for longer reads.
            pub fetch_buckets: [AtomicU64; NB],
            /// Sum of the backend reads' durations, in microseconds.
            pub fetch_micros: AtomicU64,
            /// Backend reads by duration, finer than `fetch_buckets`, for the percentiles of
            /// `hsm stats` (see [`fine_bucket`]); not in the snapshot written to metrics.json.
            pub fetch_fine: [AtomicU64; FINE],
        }

        #[derive(Default, Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct Snapshot {
            $(#[doc = $doc] #[serde(default)] pub $name: u64,)*
            /// See [`Metrics::fetch_buckets`].
            #[serde(default)]
            pub fetch_buckets: Vec<u64>,
            #[serde(default)]
            pub fetch_micros: u64,
        }

        impl Default for Metrics {
            fn default() -> Metrics {
                let zero = |_| AtomicU64::new(0);
                Metrics {
                    $($name: AtomicU64::new(0),)*
                    fetch_buckets: std::array::from_fn(zero),
                    fetch_micros: AtomicU64::new(0),
                    fetch_fine: std::array::from_fn(zero),
                }
            }
        }

        impl Metrics {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot {
                    $($name: self.$name.load(Relaxed),)*
                    fetch_buckets: self.fetch_buckets.iter().map(|b| b.load(Relaxed)).collect(),
                    fetch_micros: self.fetch_micros.load(Relaxed),
                }
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
    read_ahead_files: "Complete files read into the page cache ahead of a walk through their directory (a hydrated tree whose pages are gone: a reboot, drop_caches).",
    answered_published: "Of the pre-content events, those the supervisor answered from a range the worker had published.",
    access_allowed: "Pre-content events allowed.",
    access_denied: "Pre-content events denied (a failed fetch, a deadline).",
    access_policy_denied: "Pre-content events denied by the fetch policy.",
    open_allowed: "Open events allowed.",
    open_denied: "Open events denied (a failed fetch, a deadline).",
    open_policy_denied: "Open events denied by the fetch policy.",
    denied_eperm: "Events denied with EPERM.",
    denied_eio: "Events denied with EIO.",
    denied_eagain: "Events denied with EAGAIN.",
    denied_ebusy: "Events denied with EBUSY.",
    denied_etxtbsy: "Events denied with ETXTBSY.",
    denied_enospc: "Events denied with ENOSPC.",
    denied_edquot: "Events denied with EDQUOT.",
    policy_denied_listed: "Accesses denied because the process is a listed scanner (comm, exe or uid).",
    policy_denied_rate: "Accesses denied because the process's uid was over its fetch rate.",
    pending_events: "Gauge: events the supervisor holds, not yet answered.",
    present_bytes: "Gauge: bytes of the store's files present (sampled, see hsm_present_bytes).",
    evicted_bytes: "Bytes released from stubs by eviction.",
    evicted_files: "Files released by eviction (the cache limit).",
    released_bytes: "Bytes released by hsm release.",
    fetch_max_micros: "Gauge: the longest backend read, in microseconds.",
    credential_reloads: "Times the source's credentials were re-read (SIGHUP) and handed to the fetcher.",
    credential_reload_failures: "Re-reads of the credentials that failed (the old ones stay in use).",
    fuse_passthrough_opens: "FUSE front end: opens in passthrough mode (complete files: the kernel reads and writes the store's file).",
    list_prefetched_bytes: "Bytes fetched ahead from access lists (hsm serve --prefetch-list, hsm hydrate --list).",
    list_hit_bytes: "Of those, bytes a reader then opened or read: how well the list still fits.",
    list_missing_files: "Access list entries skipped: no such regular file in the tree.",
    list_changed_files: "Access list entries whose file changed size since the list was recorded.",
    access_records_dropped: "Accesses not recorded (hsm serve --record-access) because the recorder lagged.",
}

/// How an event was answered, for [`Metrics::answered`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied(DenyErrno),
    /// Denied by the fetch policy (see `policy`), with this errno.
    PolicyDenied(DenyErrno),
}

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Outcome {
        match v {
            Verdict::Allow => Outcome::Allowed,
            Verdict::Deny(e) => Outcome::Denied(e),
        }
    }
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

    /// Count an answer to an event of `mask`: `allowed`/`denied`, the kind-and-outcome counters
    /// and, for a denial, its errno.
    pub fn answered(&self, mask: u64, outcome: Outcome) {
        let access = mask & FAN_PRE_ACCESS != 0;
        let (kind, errno) = match (outcome, access) {
            (Outcome::Allowed, true) => (&self.access_allowed, None),
            (Outcome::Allowed, false) => (&self.open_allowed, None),
            (Outcome::Denied(e), true) => (&self.access_denied, Some(e)),
            (Outcome::Denied(e), false) => (&self.open_denied, Some(e)),
            (Outcome::PolicyDenied(e), true) => (&self.access_policy_denied, Some(e)),
            (Outcome::PolicyDenied(e), false) => (&self.open_policy_denied, Some(e)),
        };
        Metrics::add(kind, 1);
        match errno {
            None => Metrics::add(&self.allowed, 1),
            Some(e) => {
                Metrics::add(&self.denied, 1);
                self.denied_with(e, 1);
            }
        }
    }

    /// Count `n` denials with `errno` (by errno only: the supervisor's deadline, whose events'
    /// kinds it does not keep).
    pub fn denied_with(&self, errno: DenyErrno, n: u64) {
        let c = match errno {
            DenyErrno::Perm => &self.denied_eperm,
            DenyErrno::Io => &self.denied_eio,
            DenyErrno::Again => &self.denied_eagain,
            DenyErrno::Busy => &self.denied_ebusy,
            DenyErrno::TxtBsy => &self.denied_etxtbsy,
            DenyErrno::NoSpc => &self.denied_enospc,
            DenyErrno::DQuot => &self.denied_edquot,
        };
        Metrics::add(c, n);
    }

    /// Count one backend read that took `d`.
    pub fn observe_fetch(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = FETCH_BUCKETS
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(NB - 1);
        Metrics::add(&self.fetch_buckets[i], 1);
        let micros = d.as_micros().min(u64::MAX as u128) as u64;
        Metrics::add(&self.fetch_micros, micros);
        Metrics::add(&self.fetch_fine[fine_bucket(micros)], 1);
        self.fetch_max_micros.fetch_max(micros, Relaxed);
    }

    /// The backend reads' latency so far, from the fine histogram.
    pub fn latency(&self) -> Latency {
        let counts: Vec<u64> = self.fetch_fine.iter().map(|b| b.load(Relaxed)).collect();
        Latency::of(
            &counts,
            self.fetch_micros.load(Relaxed),
            self.fetch_max_micros.load(Relaxed),
        )
    }
}

/// Buckets of the fine histogram: exact below 8 µs, then 8 per doubling (each at most 1/8 of
/// its lower bound wide: a percentile is known within about 6%), up to 2^40 µs (12 days).
const FINE: usize = 8 + 37 * 8;

/// The fine bucket of a read of `micros`.
pub fn fine_bucket(micros: u64) -> usize {
    if micros < 8 {
        return micros as usize;
    }
    let e = 63 - micros.leading_zeros() as usize; // 2^e <= micros, e >= 3
    let sub = ((micros >> (e - 3)) & 7) as usize;
    (8 + (e - 3) * 8 + sub).min(FINE - 1)
}

/// The durations fine bucket `i` holds: [low, low + width).
fn fine_bounds(i: usize) -> (u64, u64) {
    if i < 8 {
        return (i as u64, 1);
    }
    let (e, sub) = (3 + (i - 8) / 8, ((i - 8) % 8) as u64);
    ((8 + sub) << (e - 3), 1 << (e - 3))
}

/// Backend read latency for a person: microseconds, percentiles within about 6% (the middle of
/// their bucket of the fine histogram, never above the maximum).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: Option<u64>,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
}

impl Latency {
    fn of(counts: &[u64], sum_micros: u64, max_micros: u64) -> Latency {
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return Latency::default();
        }
        let quantile = |q: f64| {
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (i, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let (low, width) = fine_bounds(i);
                    return Some((low + width / 2).min(max_micros));
                }
            }
            Some(max_micros)
        };
        Latency {
            count,
            mean_us: Some(sum_micros / count),
            p50_us: quantile(0.5),
            p90_us: quantile(0.9),
            p99_us: quantile(0.99),
            max_us: Some(max_micros),
        }
    }
}

/// A backend whose reads are timed into [`Metrics::observe_fetch`].
pub struct Timed {
    pub inner: std::sync::Arc<dyn Backend>,
    pub metrics: crate::sys::shm::Shared<Metrics>,
}

impl Backend for Timed {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        let t = Instant::now();
        let r = self.inner.read_range(obj, offset, buf);
        self.metrics.observe_fetch(t.elapsed());
        r
    }

    fn reads_may_stall(&self) -> bool {
        self.inner.reads_may_stall()
    }

    fn random_piece(&self) -> u64 {
        self.inner.random_piece()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn check(&self) -> anyhow::Result<()> {
        self.inner.check()
    }
}

impl Snapshot {
    /// The fetch durations' buckets as (upper bound, cumulative count), +Inf last, and the count.
    pub fn fetch_histogram(&self) -> (Vec<(f64, u64)>, u64) {
        let mut cum = 0;
        let mut out = Vec::with_capacity(NB);
        for i in 0..NB {
            cum += self.fetch_buckets.get(i).copied().unwrap_or(0);
            out.push((FETCH_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), cum));
        }
        (out, cum)
    }
}

/// How many files [`TopFiles`] keeps counts for: more than are shown, so that the ones shown
/// are exact unless many more files were fetched.
const TOP_TRACKED: usize = 64;

/// The files fetched most, in bounded memory: the space-saving algorithm (Metwally et al.,
/// 2005) over [`TOP_TRACKED`] counters. A file not counted yet takes the place of the least
/// fetched one and inherits its count as `overcount`: a count is never too low, and any file
/// fetched more than 1/64 of all bytes is sure to be kept. Per worker (a restart starts over),
/// by the file's path in the tree as populate recorded it (the source key: no lookup on the
/// fetch path, and the same name whatever path the reader took).
#[derive(Default)]
pub struct TopFiles {
    counts: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (u64, u64)>>,
}

impl TopFiles {
    /// `bytes` more were fetched for the file whose source key is `key`.
    pub fn add(&self, key: &[u8], bytes: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = counts.get_mut(key) {
            c.0 += bytes;
            return;
        }
        let mut overcount = 0;
        if counts.len() >= TOP_TRACKED {
            let least = counts
                .iter()
                .min_by_key(|(_, c)| c.0)
                .map(|(k, c)| (k.clone(), c.0));
            if let Some((k, n)) = least {
                counts.remove(&k);
                overcount = n;
            }
        }
        counts.insert(key.to_vec(), (overcount + bytes, overcount));
    }

    /// The `n` files fetched most, most first.
    pub fn top(&self, n: usize) -> Vec<TopFile> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<TopFile> = counts
            .iter()
            .map(|(k, &(bytes, overcount))| TopFile {
                path: String::from_utf8_lossy(k).into_owned(),
                bytes,
                overcount,
            })
            .collect();
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path)));
        all.truncate(n);
        all
    }
}

/// One of the files fetched most.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TopFile {
    /// Its path in the tree, as populated.
    pub path: String,
    /// Bytes fetched for it since the worker started.
    pub bytes: u64,
    /// Of `bytes`, at most this many may belong to other files (0: exact; see [`TopFiles`]).
    pub overcount: u64,
}

/// What `hsm stats` shows: the daemon's counters (those of `/metrics`), latency percentiles,
/// the store's present bytes and the files fetched most.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stats {
    /// The source, as it may be shown (never credentials).
    pub source: String,
    /// The label of `hsm_fetched_bytes`: local, s3, http.
    pub backend: String,
    pub counters: Snapshot,
    pub latency: Latency,
    /// Bytes of the store's files present, and their size (a walk of the store's records, at
    /// most a minute old).
    pub present_bytes: u64,
    pub total_bytes: u64,
    /// Most fetched first.
    pub top_files: Vec<TopFile>,
}

/// The backend label of a source as [`Backend::describe`] shows it: its URL scheme (`file`:
/// `local`).
pub fn backend_label(describe: &str) -> String {
    match describe.split_once("://") {
        Some(("file", _)) | None => "local".into(),
        Some((scheme, _)) => scheme.to_ascii_lowercase(),
    }
}

/// The figures for a person (what `hsm stats` prints).
pub fn render_stats(st: &Stats) -> String {
    use crate::status::human;
    use std::fmt::Write;
    let s = &st.counters;
    let ms = |us: Option<u64>| match us {
        None => "-".to_string(),
        Some(us) if us < 10_000 => format!("{:.2} ms", us as f64 / 1000.0),
        Some(us) => format!("{:.0} ms", us as f64 / 1000.0),
    };
    let errnos = [
        ("EPERM", s.denied_eperm),
        ("EIO", s.denied_eio),
        ("EAGAIN", s.denied_eagain),
        ("EBUSY", s.denied_ebusy),
        ("ETXTBSY", s.denied_etxtbsy),
        ("ENOSPC", s.denied_enospc),
        ("EDQUOT", s.denied_edquot),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(e, n)| format!("{e} {n}"))
    .collect::<Vec<_>>()
    .join(", ");
    let l = &st.latency;
    let mut out = String::new();
    let _ = write!(
        out,
        "source       {} ({})\n\
         opens        {} allowed, {} denied, {} denied by policy\n\
         accesses     {} allowed ({} answered from published ranges), {} denied, {} denied by \
         policy; {} pending now\n\
         denials      {}\n\
         policy       {} as scanners, {} over their uid's rate\n\
         fetched      {} ({}) in {} backend reads, {} files completed\n\
         latency      p50 {}, p90 {}, p99 {}, max {} (mean {}, {} reads)\n\
         prefetch     {} ahead of readers, {} files for directory walks ({} complete ones read in)\n\
         present      {} of {}\n\
         evicted      {} ({} files); released by hsm release {}\n\
         workers      {} restarts\n\
         credentials  {} reloads, {} failed\n",
        st.source,
        st.backend,
        s.open_allowed,
        s.open_denied,
        s.open_policy_denied,
        s.access_allowed,
        s.answered_published,
        s.access_denied,
        s.access_policy_denied,
        s.pending_events,
        if errnos.is_empty() { "none" } else { &errnos },
        s.policy_denied_listed,
        s.policy_denied_rate,
        human(s.fetched_bytes),
        st.backend,
        s.backend_reads,
        s.files_completed,
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.max_us),
        ms(l.mean_us),
        l.count,
        human(s.readahead_bytes),
        s.prefetched_files,
        s.read_ahead_files,
        human(st.present_bytes),
        human(st.total_bytes),
        human(s.evicted_bytes),
        s.evicted_files,
        human(s.released_bytes),
        s.worker_starts.saturating_sub(1),
        s.credential_reloads,
        s.credential_reload_failures,
    );
    if !st.top_files.is_empty() {
        out.push_str("fetched most (since the worker started):\n");
        for f in &st.top_files {
            let _ = write!(out, "  {:>10}  {}", human(f.bytes), f.path);
            if f.overcount > 0 {
                let _ = write!(
                    out,
                    " (at most {} of it for other files)",
                    human(f.overcount)
                );
            }
            out.push('\n');
        }
    }
    out
}

mod exposition {
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
    use prometheus_client::metrics::MetricType;

    use super::Snapshot;

    /// The snapshot, encoded on each scrape.
    #[derive(Debug)]
    pub struct Collector {
        pub snap: Snapshot,
        pub backend: &'static str,
    }

    fn counter(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: u64,
    ) -> Result<(), std::fmt::Error> {
        enc.encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)
    }

    fn gauge(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: i64,
    ) -> Result<(), std::fmt::Error> {
        enc.encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&v)
    }

    fn labelled(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        rows: &[(&[(&str, &str)], u64)],
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            let labels: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
        Ok(())
    }

    /// The histogram: encoded as a metric of its own so that the crate writes its buckets.
    struct Histogram<'a>(&'a Snapshot);

    impl std::fmt::Debug for Histogram<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Histogram")
        }
    }

    impl EncodeMetric for Histogram<'_> {
        fn encode(
            &self,
            mut encoder: prometheus_client::encoding::MetricEncoder,
        ) -> Result<(), std::fmt::Error> {
            // The crate adds the buckets up itself: it takes counts per bucket.
            let (cumulative, count) = self.0.fetch_histogram();
            let mut below = 0;
            let buckets: Vec<(f64, u64)> = cumulative
                .iter()
                .map(|&(le, c)| {
                    let n = c - below;
                    below = c;
                    (le, n)
                })
                .collect();
            encoder.encode_histogram::<NoLabelSet>(
                self.0.fetch_micros as f64 / 1e6,
                count,
                &buckets,
                None,
            )
        }

        fn metric_type(&self) -> MetricType {
            MetricType::Histogram
        }
    }

    impl prometheus_client::collector::Collector for Collector {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let s = &self.snap;
            labelled(
                &mut enc,
                "hsm_events",
                "Permission events answered, by kind (open, access) and outcome.",
                &[
                    (
                        &[("kind", "access"), ("outcome", "allowed")],
                        s.access_allowed,
                    ),
                    (
                        &[("kind", "access"), ("outcome", "denied")],
                        s.access_denied,
                    ),
                    (
                        &[("kind", "access"), ("outcome", "policy_denied")],
                        s.access_policy_denied,
                    ),
                    (&[("kind", "open"), ("outcome", "allowed")], s.open_allowed),
                    (&[("kind", "open"), ("outcome", "denied")], s.open_denied),
                    (
                        &[("kind", "open"), ("outcome", "policy_denied")],
                        s.open_policy_denied,
                    ),
                ],
            )?;
            labelled(
                &mut enc,
                "hsm_fetched_bytes",
                "Bytes fetched from the source and written into stubs, by backend.",
                &[(&[("backend", self.backend)], s.fetched_bytes)],
            )?;
            let h = Histogram(s);
            h.encode(enc.encode_descriptor(
                "hsm_fetch_duration_seconds",
                "Duration of backend reads.",
                None,
                MetricType::Histogram,
            )?)?;
            gauge(
                &mut enc,
                "hsm_pending_events",
                "Events the supervisor holds, not yet answered.",
                s.pending_events.min(i64::MAX as u64) as i64,
            )?;
            counter(
                &mut enc,
                "hsm_list_prefetched_bytes",
                "Bytes fetched ahead from access lists.",
                s.list_prefetched_bytes,
            )?;
            counter(
                &mut enc,
                "hsm_list_hit_bytes",
                "Bytes fetched ahead from access lists that a reader then used.",
                s.list_hit_bytes,
            )?;
            counter(
                &mut enc,
                "hsm_evicted_bytes",
                "Bytes released from stubs by eviction.",
                s.evicted_bytes,
            )?;
            gauge(
                &mut enc,
                "hsm_present_bytes",
                "Bytes of the store's files present (sampled every minute).",
                s.present_bytes.min(i64::MAX as u64) as i64,
            )?;
            counter(
                &mut enc,
                "hsm_worker_restarts",
                "Workers started again after one died.",
                s.worker_starts.saturating_sub(1),
            )?;
            labelled(
                &mut enc,
                "hsm_denials",
                "Events denied, by errno.",
                &[
                    (&[("errno", "EPERM")], s.denied_eperm),
                    (&[("errno", "EIO")], s.denied_eio),
                    (&[("errno", "EAGAIN")], s.denied_eagain),
                    (&[("errno", "EBUSY")], s.denied_ebusy),
                    (&[("errno", "ETXTBSY")], s.denied_etxtbsy),
                    (&[("errno", "ENOSPC")], s.denied_enospc),
                    (&[("errno", "EDQUOT")], s.denied_edquot),
                ],
            )?;
            labelled(
                &mut enc,
                "hsm_policy_denials",
                "Accesses denied by the fetch policy, by rule (scanner, rate).",
                &[
                    (&[("rule", "scanner")], s.policy_denied_listed),
                    (&[("rule", "rate")], s.policy_denied_rate),
                ],
            )?;
            counter(
                &mut enc,
                "hsm_readahead_bytes",
                "Bytes fetched ahead of sequential readers.",
                s.readahead_bytes,
            )?;
            counter(
                &mut enc,
                "hsm_prefetched_files",
                "Files fetched in the background for directory walks.",
                s.prefetched_files,
            )?;
            counter(
                &mut enc,
                "hsm_read_ahead_files",
                "Complete files read into the page cache ahead of directory walks.",
                s.read_ahead_files,
            )?;
            counter(
                &mut enc,
                "hsm_backend_reads",
                "Range reads issued to the backend.",
                s.backend_reads,
            )?;
            labelled(
                &mut enc,
                "hsm_credential_reloads",
                "Re-reads of the source's credentials on SIGHUP, by outcome (failed: the old ones stay).",
                &[
                    (&[("outcome", "ok")], s.credential_reloads),
                    (&[("outcome", "failed")], s.credential_reload_failures),
                ],
            )?;
            counter(
                &mut enc,
                "hsm_files_completed",
                "Files that became complete.",
                s.files_completed,
            )?;
            counter(
                &mut enc,
                "hsm_answered_published",
                "Accesses the supervisor answered from ranges the worker had published.",
                s.answered_published,
            )?;
            Ok(())
        }
    }
}

/// The OpenMetrics text exposition of a snapshot (what `/metrics` serves); `backend` labels
/// `hsm_fetched_bytes` (`local`, `s3`, `http`).
pub fn prometheus_text(snap: &Snapshot, backend: &'static str) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(exposition::Collector {
        snap: snap.clone(),
        backend,
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let m = Metrics::default();
        for ms in [0.2, 0.7, 3.0, 3.0, 40.0, 40_000.0] {
            m.observe_fetch(Duration::from_secs_f64(ms / 1000.0));
        }
        let s = m.snapshot();
        let (b, n) = s.fetch_histogram();
        assert_eq!(n, 6);
        assert_eq!(b[0], (0.0005, 1));
        assert_eq!(b[1], (0.001, 2));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 6)));
        // The percentiles, from the fine histogram: within 1/16 of the true value.
        let l = m.latency();
        assert_eq!(l.count, 6);
        let near = |got: Option<u64>, want: u64| {
            let got = got.unwrap() as f64;
            assert!(
                (got - want as f64).abs() <= want as f64 / 16.0,
                "{got} vs {want}"
            );
        };
        near(l.p50_us, 3000);
        near(l.p90_us, 40_000_000);
        assert_eq!(l.max_us, Some(40_000_000));
        assert!(l.p99_us <= l.max_us);
        assert_eq!(Metrics::default().latency(), Latency::default());
    }

    #[test]
    fn every_duration_falls_in_a_fine_bucket_that_holds_it() {
        let mut last = 0;
        for us in (0..100_000).chain([1 << 30, u64::MAX / 2]) {
            let i = fine_bucket(us);
            assert!(i >= last, "buckets go up with durations");
            last = i;
            let (low, width) = fine_bounds(i);
            if i < FINE - 1 {
                assert!(low <= us && us < low + width, "{us} not in bucket {i}");
                assert!(width * 8 <= low.max(8), "bucket {i} too wide");
            }
        }
    }

    #[test]
    fn the_files_fetched_most_are_kept_and_never_undercounted() {
        let top = TopFiles::default();
        // Two big files among many small ones, more than are tracked.
        for i in 0..1000u64 {
            top.add(format!("small/{i}").as_bytes(), 10);
            if i % 10 == 0 {
                top.add(b"big/a", 1000);
                top.add(b"big/b", 500);
            }
        }
        let t = top.top(3);
        assert_eq!(t[0].path, "big/a");
        assert_eq!(t[1].path, "big/b");
        assert!(t[0].bytes >= 100_000 && t[0].bytes - t[0].overcount <= 100_000);
        assert!(t[1].bytes >= 50_000 && t[1].bytes - t[1].overcount <= 50_000);
        assert_eq!(top.top(1000).len(), TOP_TRACKED);
    }

    #[test]
    fn answers_count_by_kind_outcome_and_errno() {
        let m = Metrics::default();
        m.answered(FAN_PRE_ACCESS, Outcome::Allowed);
        m.answered(0, Outcome::Denied(DenyErrno::Io));
        m.answered(FAN_PRE_ACCESS, Outcome::PolicyDenied(DenyErrno::Perm));
        let s = m.snapshot();
        assert_eq!((s.allowed, s.denied), (1, 2));
        assert_eq!(
            (s.access_allowed, s.open_denied, s.access_policy_denied),
            (1, 1, 1)
        );
        assert_eq!((s.denied_eio, s.denied_eperm), (1, 1));
    }

    /// The exposition parses (with a Prometheus parser) and holds the families.
    #[test]
    fn exposition_parses_with_the_required_families() {
        let m = Metrics::default();
        Metrics::add(&m.fetched_bytes, 12345);
        m.answered(FAN_PRE_ACCESS, Outcome::Allowed);
        m.observe_fetch(Duration::from_millis(3));
        let text = prometheus_text(&m.snapshot(), "local");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
        let value = |name: &str, label: Option<(&str, &str)>| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| s.value.clone())
        };
        use prometheus_parse::Value;
        // A 0.0.4 parser: the OpenMetrics `_total` samples come out untyped.
        assert!(matches!(
            value("hsm_fetched_bytes_total", Some(("backend", "local"))),
            Some(Value::Counter(v) | Value::Untyped(v)) if v == 12345.0
        ));
        for family in [
            "hsm_events",
            "hsm_fetched_bytes",
            "hsm_fetch_duration_seconds",
            "hsm_pending_events",
            "hsm_evicted_bytes",
            "hsm_present_bytes",
            "hsm_worker_restarts",
            "hsm_denials",
            "hsm_policy_denials",
            "hsm_readahead_bytes",
            "hsm_prefetched_files",
            "hsm_read_ahead_files",
            "hsm_credential_reloads",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing:\n{text}"
            );
        }
        match value("hsm_fetch_duration_seconds", None) {
            Some(Value::Histogram(h)) => assert_eq!(h.last().map(|b| b.count), Some(1.0)),
            other => panic!("histogram: {other:?}\n{text}"),
        }
        let stats = render_stats(&Stats {
            counters: m.snapshot(),
            latency: m.latency(),
            ..Default::default()
        });
        assert!(
            stats.contains("max 3.00 ms (mean 3.00 ms, 1 reads)"),
            "{stats}"
        );
    }
}
