//! What the remote backends share: an `object_store` store driven from the engine's plain threads
//! through a runtime of our own, ranged GETs that are conditional on the identity recorded at
//! populate, retries with backoff for transient failures, and one total deadline per read.
//!
//! A read never returns bytes of an object other than the one recorded: the request carries
//! `If-Match` with the recorded ETag when there is one (the server answers 412 if the object was
//! replaced), and the response's size, ETag or Last-Modified are compared with the record as well,
//! for servers that ignore conditional headers.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore,
    ObjectStoreExt, RetryConfig,
};

use super::FetchError;
use crate::record::SourceRecord;

/// Default total time one read may take, retries included, before the reader gets EIO.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);

/// The source URL option that records `populate --fetch-deadline`: in an `s3://` URL's query,
/// after an `http(s)://` URL's `#`.
pub const DEADLINE_OPTION: &str = "fetch_deadline";
/// Its old name, still read: stores populated before the rename record it, and a SOURCE typed
/// with it is accepted with a warning (see [`super::old_url_options`]).
pub const OLD_DEADLINE_OPTION: &str = "deadline";

/// Reads larger than this are split into parts of this size, fetched concurrently.
pub const PART: usize = 1 << 20;
/// How many parts of one read are in flight at once.
pub const PARTS_IN_FLIGHT: usize = 8;

/// Prefix of a [`SourceRecord::version`] that holds a Last-Modified time (seconds since the
/// epoch) rather than an ETag, for HTTP servers that send no ETag.
pub const LAST_MODIFIED_PREFIX: &str = "last-modified:";

/// Client options shared by every remote store: bounded connects and requests, reused pooled
/// connections (reqwest's pool), HTTP allowed only when the URL asks for it, and HTTP/2 where a
/// TLS server offers it (ALPN): GCS, MinIO and most non-AWS S3 stores do, AWS S3 and plain
/// `http://` stay on HTTP/1.1. Over HTTP/2 every request to a host shares one connection, so a
/// cold walk of small files pays no handshake per connection and is not capped by a pool size;
/// `bench/wan.py`'s https rows measure it against HTTP/1.1 on the same link.
///
/// A CA file `SSL_CERT_FILE` or `SSL_CERT_DIR` names that cannot be read fails a client that may
/// speak TLS; one for plain `http://` (`allow_http`) goes without it.
pub fn client_options(deadline: Duration, allow_http: bool) -> anyhow::Result<ClientOptions> {
    let roots = match read_trusted_roots() {
        Ok(roots) => roots,
        Err(e) if allow_http => {
            tracing::debug!("{e}: not needed for http://");
            &[]
        }
        Err(e) => return Err(e),
    };
    let options = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_allow_http2()
        .with_connect_timeout(deadline.min(Duration::from_secs(5)))
        .with_timeout(deadline)
        .with_pool_idle_timeout(Duration::from_secs(60));
    Ok(roots
        .iter()
        .fold(options, |o, c| o.with_root_certificate(c.clone())))
}

/// The HTTP client of every remote source: `object_store`'s own (reqwest), except that a TLS
/// certificate the client does not trust is final at once. `object_store` counts it a connect
/// error and retries it until the deadline, so a server whose certificate changed to one signed
/// by an unknown CA cost every access the whole deadline (20 s) before its EIO.
#[derive(Debug)]
pub struct Connector;

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(UntrustedIsFinal(client)))
    }
}

#[derive(Debug)]
struct UntrustedIsFinal(HttpClient);

#[async_trait::async_trait]
impl HttpService for UntrustedIsFinal {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.0.execute(req).await.map_err(|e| {
            if untrusted_certificate(&e) {
                // `Unknown` is the kind `object_store` does not retry.
                HttpError::new(HttpErrorKind::Unknown, e)
            } else {
                e
            }
        })
    }
}

/// Whether `e`, or an error it was caused by, is a TLS certificate the client does not trust
/// (unknown issuer, expired, another name).
pub fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        // An `io::Error`'s `source()` skips the error it wraps: look at that one too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if untrusted_certificate(inner) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The CA certificates `SSL_CERT_FILE` and `SSL_CERT_DIR` name, as [`read_trusted_roots`] read
/// them; every client made afterwards trusts them besides the system's.
static TRUSTED_ROOTS: OnceLock<Result<Vec<Certificate>, String>> = OnceLock::new();

/// Read the CA certificates that `SSL_CERT_FILE` (a PEM bundle) and `SSL_CERT_DIR` (directories,
/// `:`-separated, of PEM files) name, once per process. TLS verification would otherwise read
/// them at the first connection, and the fetcher makes its first connection after dropping to
/// its own user, who may not be allowed to read a CA file kept for root: every fetch then failed
/// with "UnknownIssuer" although `populate`, run as root, had trusted the server. So `prepare`
/// calls this while the process may still read them (and [`client_options`] for every other
/// process). A CA file that cannot be read or holds no certificate, or a directory that cannot
/// be listed, is an error, said at start rather than as EIO at the first read.
pub fn read_trusted_roots() -> anyhow::Result<&'static [Certificate]> {
    TRUSTED_ROOTS
        .get_or_init(|| read_roots().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn read_roots() -> anyhow::Result<Vec<Certificate>> {
    let mut roots = Vec::new();
    if let Some(file) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        roots.extend(read_pem_bundle(Path::new(&file), "SSL_CERT_FILE")?);
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                // A search path: a directory it names that is not there holds nothing (as
                // OpenSSL and rustls read it).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => anyhow::bail!("SSL_CERT_DIR: cannot list {}: {e}", dir.display()),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                // A CA directory also holds CRLs and other files: take what parses as certificates.
                if path.is_file() {
                    roots.extend(read_pem_bundle(&path, "SSL_CERT_DIR").unwrap_or_default());
                }
            }
        }
    }
    Ok(roots)
}

fn read_pem_bundle(path: &Path, var: &str) -> anyhow::Result<Vec<Certificate>> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("{var}: cannot read {}: {e}", path.display()))?;
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("{var}: {}: {}", path.display(), flatten(&e)))?;
    if certs.is_empty() {
        anyhow::bail!("{var}: {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The one retry policy of remote sources, for reads, listings and manifests alike: the first
/// retry after 100 ms, the wait doubling up to 2 s (so a server that comes back is found
/// quickly), for as long as the deadline allows. `object_store` applies it to each request
/// ([`retry_config`]: 5xx, 429, connection resets, timeouts); [`retrying`] applies it again to
/// what the client's retries cannot see (a body cut short, a listing failing mid-way).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// See [`FIRST_BACKOFF`].
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// [`FIRST_BACKOFF`]'s policy for `object_store`'s requests, within `deadline`.
pub fn retry_config(deadline: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: FIRST_BACKOFF,
            max_backoff: MAX_BACKOFF,
            base: 2.0,
        },
        max_retries: 1000,
        retry_timeout: deadline,
    }
}

/// Run `op` until it succeeds, fails for good (`transient` says no), or the next try would
/// start past `deadline`, waiting as [`FIRST_BACKOFF`] says between tries.
pub async fn retrying<T, E>(
    deadline: Duration,
    transient: impl Fn(&E) -> bool,
    mut op: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let start = tokio::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        match op().await {
            Err(e) if transient(&e) && start.elapsed() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            done => return done,
        }
    }
}

/// A tokio runtime for a backend. Two workers drive the I/O; the callers block in `block_on`.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hsm-remote")
        .enable_all()
        .build()?)
}

/// Parse `fetch_deadline=SECS` style values.
pub fn parse_deadline(v: &str) -> anyhow::Result<Duration> {
    let secs: f64 = v
        .parse()
        .map_err(|_| anyhow::anyhow!("deadline {v:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 3600.0) {
        anyhow::bail!("deadline must be between 0 and 3600 seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A URL as it may be shown: without `user:password@`, and with its query and fragment (which
/// may hold a token or a signature, as presigned URLs do) replaced by `?…`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let hidden = u.query().is_some() || u.fragment().is_some();
            u.set_query(None);
            u.set_fragment(None);
            let mut s = u.to_string();
            if hidden {
                s.push_str("?…");
            }
            s
        }
        Err(_) => "<unparseable URL>".to_string(),
    }
}

/// An `object_store` store plus what reading from it needs.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    pub store: Arc<dyn ObjectStore>,
    /// Prepended to every record key ("prefix/" for S3; empty when the store's URL has the base).
    pub prefix: String,
    pub deadline: Duration,
    /// Safe to log: no credentials.
    pub describe: String,
}

impl Remote {
    pub fn new(
        rt: tokio::runtime::Runtime,
        store: Arc<dyn ObjectStore>,
        prefix: String,
        deadline: Duration,
        describe: String,
    ) -> Remote {
        Remote {
            rt,
            store,
            prefix,
            deadline,
            describe,
        }
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Bounded by the deadline, whatever the retries inside do.
    pub fn block_on_deadline<T, F: Future<Output = Result<T, FetchError>>>(
        &self,
        what: &str,
        f: F,
    ) -> Result<T, FetchError> {
        let deadline = self.deadline;
        self.rt.block_on(async move {
            match tokio::time::timeout(deadline, f).await {
                Ok(r) => r,
                Err(_) => Err(FetchError::Remote(format!(
                    "{what}: no answer within the {:.1} s deadline",
                    deadline.as_secs_f64()
                ))),
            }
        })
    }

    /// The object path of a record key. Keys were validated at populate; one that no longer
    /// parses (a hand-edited record) is refused rather than sent.
    pub fn location(&self, key: &[u8]) -> Result<ObjectPath, FetchError> {
        let key = std::str::from_utf8(key).map_err(|_| FetchError::Escape)?;
        ObjectPath::parse(format!("{}{}", self.prefix, key)).map_err(|_| FetchError::Escape)
    }

    /// HEAD one object (within the deadline).
    pub async fn head(&self, key: &str) -> Result<ObjectMeta, FetchError> {
        let loc = self.location(key.as_bytes())?;
        self.store.head(&loc).await.map_err(map_error)
    }

    /// Fill `buf` from `offset`: a read larger than [`PART`] is split into parts fetched
    /// concurrently ([`PARTS_IN_FLIGHT`] at a time, on pooled connections), so one large read
    /// over a long round trip is not one request's latency per part. Memory stays the caller's
    /// buffer.
    pub async fn read(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        if buf.len() <= PART {
            return self.get_range_retrying(obj, offset, buf).await;
        }
        let parts = buf
            .chunks_mut(PART)
            .enumerate()
            .map(|(i, part)| self.get_range_retrying(obj, offset + (i * PART) as u64, part));
        let mut results = futures::stream::iter(parts).buffer_unordered(PARTS_IN_FLIGHT);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    /// [`Remote::get_range`], tried again (see [`retrying`]) after failures that may pass
    /// (connection reset or refused mid-body, a short body, errors the client's own retries gave
    /// up on). A replaced or missing object is final at once.
    pub async fn get_range_retrying(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        let transient = |e: &FetchError| {
            let again = matches!(e, FetchError::Remote(_) | FetchError::Short { .. });
            if again {
                tracing::debug!("retrying a read of {}: {e}", self.describe);
            }
            again
        };
        retrying(self.deadline, transient, async || {
            self.get_range(obj, offset, buf).await
        })
        .await
    }

    /// Fill `buf` from `offset` of the object `obj` names, proving it is the recorded object.
    pub async fn get_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        if end > obj.size {
            return Err(FetchError::Short {
                offset,
                want: buf.len(),
                got: obj.size.saturating_sub(offset) as usize,
            });
        }
        let loc = self.location(&obj.key)?;
        let mut opts = GetOptions {
            range: Some(GetRange::Bounded(offset..end)),
            ..Default::default()
        };
        let want = Identity::of(obj);
        if let Identity::ETag(tag) = &want {
            if !tag.starts_with("W/") {
                opts.if_match = Some(tag.clone());
            }
        }
        let res = self.store.get_opts(&loc, opts).await.map_err(map_error)?;
        if res.meta.size != obj.size {
            return Err(FetchError::Changed(format!(
                "object is now {} bytes, recorded {}",
                res.meta.size, obj.size
            )));
        }
        want.check(&res.meta)?;
        if res.range != (offset..end) {
            return Err(FetchError::Short {
                offset,
                want: buf.len(),
                got: (res.range.end - res.range.start) as usize,
            });
        }
        let mut stream = res.into_stream();
        let mut got = 0usize;
        while let Some(part) = stream.next().await {
            let part = part.map_err(map_error)?;
            let n = part.len().min(buf.len() - got);
            buf[got..got + n].copy_from_slice(&part[..n]);
            got += n;
            if n < part.len() {
                return Err(FetchError::Remote(format!(
                    "server sent more than the {} bytes asked for",
                    buf.len()
                )));
            }
        }
        if got != buf.len() {
            return Err(FetchError::Short {
                offset,
                want: buf.len(),
                got,
            });
        }
        Ok(())
    }
}

/// How a record names the exact object it was made from.
enum Identity {
    ETag(String),
    LastModified(i64),
    None,
}

impl Identity {
    fn of(obj: &SourceRecord) -> Identity {
        match &obj.version {
            Some(v) => match v.strip_prefix(LAST_MODIFIED_PREFIX) {
                Some(secs) => secs
                    .parse()
                    .map(Identity::LastModified)
                    .unwrap_or(Identity::None),
                None => Identity::ETag(v.clone()),
            },
            None => Identity::None,
        }
    }

    fn check(&self, meta: &ObjectMeta) -> Result<(), FetchError> {
        match self {
            Identity::ETag(tag) => match &meta.e_tag {
                Some(got) if etag_eq(got, tag) => Ok(()),
                got => Err(FetchError::Changed(format!(
                    "ETag is now {}, recorded {tag}",
                    got.as_deref().unwrap_or("(none)")
                ))),
            },
            Identity::LastModified(secs) => {
                let got = meta.last_modified.timestamp();
                if got == *secs {
                    Ok(())
                } else {
                    Err(FetchError::Changed(format!(
                        "Last-Modified is now {got}, recorded {secs} (seconds since the epoch)"
                    )))
                }
            }
            Identity::None => Ok(()),
        }
    }
}

/// Weak comparison (RFC 9110 8.8.3.2): equal opaque tags, ignoring `W/`.
pub fn etag_eq(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_string()
    };
    strip(a) == strip(b)
}

/// `object_store`'s error, in the backend's terms. Its messages name URLs, never credentials.
pub fn map_error(e: object_store::Error) -> FetchError {
    match e {
        object_store::Error::NotFound { .. } => FetchError::NotFound,
        object_store::Error::Precondition { .. } => FetchError::Changed(
            "the server refused the recorded ETag (If-Match failed): the object was replaced \
             after populate"
                .into(),
        ),
        other if untrusted_certificate(&other) => FetchError::Untrusted(flatten(&other)),
        other => FetchError::Remote(flatten(&other)),
    }
}

/// An error and its causes on one line.
pub fn flatten(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_certificate_is_found_wherever_it_sits_in_the_chain() {
        let untrusted =
            || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper's connector hands it over: wrapped in an `io::Error`, whose `source()`
        // skips it.
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, untrusted());
        assert!(untrusted_certificate(&wrapped));
        let outer = HttpError::new(HttpErrorKind::Connect, wrapped);
        assert!(untrusted_certificate(&outer));
        assert!(untrusted_certificate(&untrusted()));
        // Other connect failures may pass: retried as before.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!untrusted_certificate(&HttpError::new(
            HttpErrorKind::Connect,
            refused
        )));
        let handshake = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::HandshakeNotComplete,
        );
        assert!(!untrusted_certificate(&handshake));
    }

    /// The one policy: a failure that may pass is tried again, 100, 200, 400 ms later, while
    /// the next try starts within the deadline; a final failure or a success ends it at once.
    #[test]
    fn retries_follow_one_policy_within_the_deadline() {
        let rt = runtime().unwrap();
        let tries = |deadline_ms: u64, fail: &'static [Result<(), bool>]| {
            let mut n = 0usize;
            let start = std::time::Instant::now();
            let r = rt.block_on(retrying(
                Duration::from_millis(deadline_ms),
                |again: &bool| *again,
                async || {
                    n += 1;
                    fail.get(n - 1).copied().unwrap_or(Err(true))
                },
            ));
            (r, n, start.elapsed())
        };
        // Always transient: tries at 0, 100, 300 and 700 ms; the next (1500 ms) would start past
        // the 1 s deadline. (Each wait has 300 ms of slack for a loaded machine.)
        let (r, n, took) = tries(1000, &[]);
        assert_eq!((r, n), (Err(true), 4));
        assert!(took >= Duration::from_millis(700), "{took:?}");
        // A final failure is not tried again; a success after a transient one is kept.
        assert_eq!(tries(5000, &[Err(false)]).0, Err(false));
        assert_eq!(tries(5000, &[Err(false)]).1, 1);
        let (r, n, _) = tries(5000, &[Err(true), Ok(())]);
        assert_eq!((r, n), (Ok(()), 2));
    }
}
