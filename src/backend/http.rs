//! HTTP(S) servers that answer range requests (nginx, Apache, a CDN, ...).
//!
//! Source URL, as stored in the store's `config.json`:
//!
//! ```text
//! http[s]://HOST[:PORT]/BASE/[#fetch_deadline=SECS]
//! ```
//!
//! `fetch_deadline` (old name `deadline`, still read): see the same option of [`super::s3`].
//!
//! A file's URL is BASE joined with its manifest path, each component percent-encoded. Options
//! ride in the fragment, which is never sent to the server. A web server has no listing: what
//! exists is told by a manifest (see [`crate::manifest`]). At populate every file is asked for
//! with HEAD: its size must be the manifest's, and its ETag (or, without one, its Last-Modified
//! time) is recorded; reads are ranged GETs with `If-Match` on that ETag, and the answer's size
//! and ETag or Last-Modified are checked against the record, so a file replaced on the server
//! after populate is an I/O error, never a mix of old and new bytes.
//!
//! No credentials are supported in the URL: it is stored in plain text.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use object_store::client::HttpConnector;
use object_store::http::HttpBuilder;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::object::{self, Remote};
use super::{Backend, FetchError};
use crate::record::SourceRecord;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Without a trailing `/` (except for the bare origin, which has none either).
    pub base: url::Url,
    pub deadline: Option<Duration>,
}

impl HttpUrl {
    pub fn parse(s: &str) -> anyhow::Result<HttpUrl> {
        // Never echo a URL that does not parse: it may hold credentials.
        let mut u = url::Url::parse(s).context("the HTTP source URL does not parse")?;
        if u.scheme() != "http" && u.scheme() != "https" {
            bail!("{s:?} is not an http:// or https:// URL");
        }
        if !u.username().is_empty() || u.password().is_some() {
            bail!("credentials in an HTTP source URL are not supported (the URL is stored in the store's configuration)");
        }
        if u.query().is_some() {
            bail!(
                "an HTTP source URL cannot have a query; options go after '#', e.g. #fetch_deadline=10"
            );
        }
        let mut deadline = None;
        if let Some(frag) = u.fragment() {
            for (k, v) in url::form_urlencoded::parse(frag.as_bytes()) {
                match &*k {
                    object::DEADLINE_OPTION | object::OLD_DEADLINE_OPTION => {
                        deadline = Some(object::parse_deadline(&v)?)
                    }
                    other => bail!(
                        "unknown option {other:?} after '#' in the HTTP URL (known: {})",
                        object::DEADLINE_OPTION
                    ),
                }
            }
        }
        u.set_fragment(None);
        let path = u.path().trim_end_matches('/').to_string();
        u.set_path(&path);
        Ok(HttpUrl { base: u, deadline })
    }

    /// The canonical URL, with a trailing `/` on the base.
    pub fn to_url(&self) -> String {
        let mut s = self.base.to_string();
        if !s.ends_with('/') {
            s.push('/');
        }
        if let Some(d) = self.deadline {
            s.push_str(&format!("#{}={}", object::DEADLINE_OPTION, d.as_secs_f64()));
        }
        s
    }

    /// The URL of a file under the base.
    pub fn join(&self, rel: &str) -> String {
        let mut u = self.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.pop_if_empty();
            segs.extend(rel.split('/'));
        }
        u.to_string()
    }
}

/// GET a whole small file by URL (query included: a presigned URL works), at most `limit` bytes,
/// retrying transient failures (connection errors, 5xx, 429) with backoff within `deadline`.
/// Errors name the URL without its query or credentials.
pub fn fetch_url(url: &str, deadline: Duration, limit: u64) -> anyhow::Result<Vec<u8>> {
    let u = url::Url::parse(url).context("the URL does not parse")?;
    let shown = object::redact_url(url);
    let client = object::Connector
        .connect(&object::client_options(deadline, u.scheme() == "http")?)
        .map_err(|e| anyhow!("cannot make an HTTP client: {}", object::flatten(&e)))?;
    let rt = object::runtime()?;
    /// A failure that may pass (no answer, a connection error, 5xx, 429), or not.
    enum Failed {
        Again(String),
        Final(anyhow::Error),
    }
    let fetch_once = async || -> Result<Vec<u8>, Failed> {
        let req = http::Request::builder()
            .method("GET")
            .uri(u.as_str())
            .body(object_store::client::HttpRequestBody::empty())
            .map_err(|_| Failed::Final(anyhow!("cannot make a request for {shown}")))?;
        let resp = match tokio::time::timeout(deadline, client.execute(req)).await {
            Err(_) => {
                let secs = deadline.as_secs_f64();
                return Err(Failed::Again(format!("no answer within {secs:.1} s")));
            }
            Ok(Err(e)) if object::untrusted_certificate(&e) => {
                let untrusted = super::FetchError::Untrusted(object::flatten(&e));
                return Err(Failed::Final(anyhow!("cannot fetch {shown}: {untrusted}")));
            }
            Ok(Err(e)) => return Err(Failed::Again(object::flatten(&e))),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Failed::Again(format!("HTTP {}", status.as_u16())));
        }
        if !status.is_success() {
            let e = anyhow!("{shown} answered HTTP {}", status.as_u16());
            return Err(Failed::Final(e));
        }
        let mut body = resp.into_body().bytes_stream();
        let mut out = Vec::new();
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| {
                Failed::Final(anyhow!("{shown}: transfer failed: {}", object::flatten(&e)))
            })?;
            out.extend_from_slice(&part);
            if out.len() as u64 > limit {
                return Err(Failed::Final(anyhow!(
                    "{shown} is larger than {limit} bytes"
                )));
            }
        }
        Ok(out)
    };
    let transient = |e: &Failed| matches!(e, Failed::Again(_));
    match rt.block_on(object::retrying(deadline, transient, fetch_once)) {
        Ok(body) => Ok(body),
        Err(Failed::Again(why)) => bail!("cannot fetch {shown}: {why}"),
        Err(Failed::Final(e)) => Err(e),
    }
}

pub struct HttpBackend {
    remote: Remote,
    /// For requests outside the store's model (the reachability check).
    client: object_store::client::HttpClient,
    pub url: HttpUrl,
}

/// Open an `http(s)://` source. Nothing is sent yet.
pub fn open(url: &str) -> anyhow::Result<HttpBackend> {
    HttpBackend::open(HttpUrl::parse(url)?)
}

impl HttpBackend {
    pub fn open(mut url: HttpUrl) -> anyhow::Result<HttpBackend> {
        let deadline = url.deadline.unwrap_or(object::DEFAULT_DEADLINE);
        url.deadline = Some(deadline);
        // object_store appends path parts to the URL's segments: give it the origin, keep the
        // base path as the key prefix, so that no `//` appears whatever the base.
        let mut origin = url.base.clone();
        origin.set_path("");
        let prefix = url
            .base
            .path_segments()
            .map(|s| {
                s.filter(|c| !c.is_empty())
                    .map(|c| {
                        percent_encoding::percent_decode_str(c)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.join("/"))
        };
        let options = object::client_options(deadline, url.base.scheme() == "http")?;
        let client = object::Connector
            .connect(&options)
            .map_err(|e| anyhow!("cannot make an HTTP client: {}", object::flatten(&e)))?;
        let store = HttpBuilder::new()
            .with_url(origin.to_string())
            .with_client_options(options)
            .with_http_connector(object::Connector)
            .with_retry(object::retry_config(deadline))
            .build()
            .map_err(|e| anyhow!("cannot configure the HTTP client: {}", object::flatten(&e)))?;
        let describe = object::redact_url(&url.to_url());
        let remote = Remote::new(
            object::runtime()?,
            std::sync::Arc::new(store),
            prefix,
            deadline,
            describe,
        );
        Ok(HttpBackend {
            remote,
            client,
            url,
        })
    }

    /// One HEAD of the base, no retries: for populate, which needs the server now. A server
    /// that cannot be reached or whose certificate is not trusted is an error at once.
    pub fn check_strict(&self) -> anyhow::Result<()> {
        self.head_base()
            .map_err(|m| anyhow!("cannot reach {}: {m}", self.describe()))
    }

    fn head_base(&self) -> Result<(), String> {
        let remote = &self.remote;
        let url = self.url.to_url();
        let url = url.split('#').next().unwrap_or(&url).to_string();
        remote.block_on(async {
            let req = http::Request::builder()
                .method("HEAD")
                .uri(&url)
                .body(object_store::client::HttpRequestBody::empty())
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(remote.deadline, self.client.execute(req)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(object::flatten(&e)),
                Err(_) => Err("no answer in time".to_string()),
            }
        })
    }

    /// HEAD every path, `jobs` at a time: its meta, or why not.
    pub fn head_all(&self, paths: &[String], jobs: usize) -> Vec<Result<ObjectMeta, FetchError>> {
        let remote = &self.remote;
        remote.block_on(async {
            futures::stream::iter(paths.iter())
                .map(|p| async move {
                    match tokio::time::timeout(remote.deadline, remote.head(p)).await {
                        Ok(r) => r,
                        Err(_) => Err(FetchError::Remote("HEAD: no answer in time".into())),
                    }
                })
                .buffered(jobs.clamp(1, 64))
                .collect::<Vec<_>>()
                .await
        })
    }

    /// GET a whole small file under the base (the manifest), bounded to `limit` bytes.
    pub fn get_small(&self, rel: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
        let loc = self
            .remote
            .location(rel.as_bytes())
            .map_err(|_| anyhow!("bad path {rel:?}"))?;
        let remote = &self.remote;
        let r = remote.block_on_deadline("GET", async {
            let res = remote.store.get(&loc).await.map_err(object::map_error)?;
            if res.meta.size > limit {
                return Err(FetchError::Remote(format!(
                    "{} bytes, more than the {limit} allowed",
                    res.meta.size
                )));
            }
            Ok(res.bytes().await.map_err(object::map_error)?.to_vec())
        });
        r.map_err(|e| anyhow!("cannot fetch {}: {e}", self.url.join(rel)))
    }
}

impl Backend for HttpBackend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        self.remote
            .block_on_deadline("HTTP read", self.remote.read(obj, offset, buf))
    }

    fn describe(&self) -> String {
        self.remote.describe.clone()
    }

    /// There are no credentials to check: any HTTP answer to a HEAD of the base will do. An
    /// unreachable server is only a warning (already fetched content can still be served, and
    /// reads retry).
    fn check(&self) -> anyhow::Result<()> {
        let r = self.head_base();
        if let Err(m) = r {
            tracing::warn!(
                "HTTP source {} not reachable now ({m}); reads will retry",
                self.describe()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/a/b/#fetch_deadline=5").unwrap();
        assert_eq!(u.to_url(), "http://127.0.0.1:8080/a/b/#fetch_deadline=5");
        // The old name of the option reads the same, and is written under the new one.
        let old = HttpUrl::parse("http://127.0.0.1:8080/a/b/#deadline=5").unwrap();
        assert_eq!(old, u);
        assert_eq!(
            crate::backend::old_url_options("http://h/a/#deadline=5"),
            [("deadline", "fetch_deadline")]
        );
        assert!(crate::backend::old_url_options(&u.to_url()).is_empty());
        assert_eq!(u.join("x y/z"), "http://127.0.0.1:8080/a/b/x%20y/z");
        let r = HttpUrl::parse("http://h").unwrap();
        assert_eq!(r.join("f"), "http://h/f");
        assert_eq!(HttpUrl::parse(&u.to_url()).unwrap(), u);
        assert!(HttpUrl::parse("http://u:p@h/").is_err());
        assert!(HttpUrl::parse("http://h/?a=b").is_err());
    }
}
