//! S3 and S3-compatible object stores (AWS, MinIO, Ceph RGW, moto, ...).
//!
//! Source URL, as stored in the store's `config.json` (never with credentials):
//!
//! ```text
//! s3://BUCKET[/PREFIX][?endpoint=URL][&region=NAME][&fetch_deadline=SECS][&virtual_hosted=true]
//! ```
//!
//! - `endpoint`: the server (`http://127.0.0.1:9000` for a local MinIO); default AWS. `populate`
//!   records the endpoint and region it used (from `--endpoint`/`--region`, `AWS_ENDPOINT_URL`,
//!   `AWS_REGION`), so that `serve` talks to the same server whatever its environment.
//! - `fetch_deadline` (`populate --fetch-deadline`; old name `deadline`, still read): total
//!   seconds one read may take, retries included, before the reader gets EIO (default 20;
//!   `serve --fetch-deadline`, 30 s by default, answers EAGAIN after that).
//! - Credentials: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` in the
//!   environment, else the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default
//!   `~/.aws/credentials`, profile `AWS_PROFILE` or `default`), else web identity or container
//!   credentials when their variables are set, else `AWS_SKIP_SIGNATURE=true` for a public bucket.
//!   The EC2 instance metadata service is asked only when `HSM_S3_INSTANCE_CREDENTIALS=1`.
//!
//! Listing is done here (ListObjectsV2, signed with `object_store`'s SigV4 signer, its XML read
//! with `quick-xml`) rather than by `object_store`, whose listing (0.14) fails a whole page on a
//! key `Path::parse` refuses (`a//b`, `../x`): populate must report and skip such keys, not give
//! up. It is the [`Lister`] of `s3://` sources, as `object_store`'s listing is for GCS and Azure. Reads go through `object_store`: ranged
//! GETs with `If-Match` on the ETag recorded at populate, see [`super::object`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use object_store::aws::{
    AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredential,
};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tracing::warn;

use super::object::{self, Remote};
use super::{Backend, FetchError, Listed, Lister};
use crate::record::SourceRecord;

/// RFC 3986 unreserved characters stay; everything else is percent-encoded (as SigV4 wants).
const STRICT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
const STRICT_PATH: &AsciiSet = &STRICT.remove(b'/');

/// The parts of an `s3://` source URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the whole bucket.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub deadline: Option<Duration>,
    pub virtual_hosted: Option<bool>,
}

impl S3Url {
    pub fn parse(url: &str) -> anyhow::Result<S3Url> {
        let rest = url
            .strip_prefix("s3://")
            .or_else(|| url.strip_prefix("S3://"))
            .ok_or_else(|| anyhow!("not an s3:// URL: {url:?}"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty()
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            bail!("{bucket:?} is not a valid S3 bucket name (lower-case letters, digits, '-', '.', '_')");
        }
        let prefix = percent_decode_str(prefix)
            .decode_utf8()
            .context("the S3 prefix is not valid UTF-8 once percent-decoded")?;
        let mut out = S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..Default::default()
        };
        if out.prefix.split('/').any(|c| c == "." || c == "..") || out.prefix.contains("//") {
            bail!(
                "the S3 prefix {:?} has empty, '.' or '..' components",
                out.prefix
            );
        }
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "endpoint" => out.endpoint = Some(v.trim_end_matches('/').to_string()),
                "region" => out.region = Some(v.into_owned()),
                object::DEADLINE_OPTION | object::OLD_DEADLINE_OPTION => {
                    out.deadline = Some(object::parse_deadline(&v)?)
                }
                "virtual_hosted" => {
                    out.virtual_hosted = Some(v.parse().context("virtual_hosted=true|false")?)
                }
                other => bail!(
                    "unknown option {other:?} in the S3 URL (known: endpoint, region, fetch_deadline, \
                     virtual_hosted; credentials never go in the URL)"
                ),
            }
        }
        if let Some(e) = &out.endpoint {
            // Never echo an endpoint that does not parse: it may hold credentials.
            let u = url::Url::parse(e).context("the S3 endpoint URL does not parse")?;
            if u.query().is_some() || u.fragment().is_some() {
                bail!("the S3 endpoint URL must not have a query or a fragment");
            }
            if !u.username().is_empty() || u.password().is_some() {
                bail!("the endpoint URL must not carry credentials; use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
            }
            if u.scheme() != "http" && u.scheme() != "https" {
                bail!("the S3 endpoint must be an http:// or https:// URL");
            }
        }
        Ok(out)
    }

    /// The canonical URL: what the store records and `serve` opens.
    pub fn to_url(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&utf8_percent_encode(&self.prefix, STRICT_PATH).to_string());
        }
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(e) = &self.endpoint {
            q.append_pair("endpoint", e);
        }
        if let Some(r) = &self.region {
            q.append_pair("region", r);
        }
        if let Some(d) = self.deadline {
            q.append_pair(object::DEADLINE_OPTION, &format!("{}", d.as_secs_f64()));
        }
        if let Some(v) = self.virtual_hosted {
            q.append_pair("virtual_hosted", &v.to_string());
        }
        let q = q.finish();
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
        s
    }

    /// Key prefix including the trailing `/`, or empty.
    pub fn key_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

pub struct S3Backend {
    remote: Remote,
    s3: Arc<AmazonS3>,
    client: HttpClient,
    /// `https://s3.REGION.amazonaws.com/BUCKET` or `ENDPOINT/BUCKET` (or the endpoint itself for
    /// virtual-hosted requests).
    bucket_url: String,
    region: String,
    sign: bool,
    /// The URL as resolved: endpoint and region filled in from the environment.
    pub url: S3Url,
}

/// Open an `s3://` source. Nothing is sent yet: call [`Backend::check`] to test credentials.
pub fn open(url: &str) -> anyhow::Result<S3Backend> {
    S3Backend::open(S3Url::parse(url)?)
}

/// An `s3://` source with its configuration gathered (environment, shared credentials file) and
/// no client built yet: made without threads, so the fetcher can make it as root, drop root,
/// then [`Prepared::open`] it (see `backend::isolated`).
pub struct Prepared {
    url: S3Url,
    builder: AmazonS3Builder,
    endpoint: Option<String>,
    region: String,
    virtual_hosted: bool,
    skip_signature: bool,
    http_allowed: bool,
    /// Static keys requests are signed with, if any (see [`RotatingKeys`]).
    keys: Option<Arc<RotatingKeys>>,
}

fn env_set(k: &str) -> bool {
    std::env::var_os(k).is_some_and(|v| !v.is_empty())
}

/// Static S3 keys: from the environment or the shared credentials file.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaticKeys {
    pub id: String,
    pub secret: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret or the token: this may be logged.
        write!(f, "StaticKeys({})", self.id)
    }
}

impl StaticKeys {
    fn credential(&self) -> Arc<AwsCredential> {
        Arc::new(AwsCredential {
            key_id: self.id.clone(),
            secret_key: self.secret.clone(),
            token: self.token.clone(),
        })
    }
}

/// The static keys requests are signed with, swapped in place when they are re-read (SIGHUP,
/// see `backend::isolated`): every request signed after the swap, retries of reads already
/// under way included, uses the new ones; nothing is rebuilt, no read is dropped. Keys that
/// expire on their own (web identity / STS, container and instance credentials) are not
/// static: `object_store`'s own providers fetch them and refresh them five minutes before
/// they expire.
#[derive(Debug)]
pub struct RotatingKeys {
    current: std::sync::RwLock<Arc<AwsCredential>>,
}

impl RotatingKeys {
    fn new(keys: &StaticKeys) -> RotatingKeys {
        RotatingKeys {
            current: std::sync::RwLock::new(keys.credential()),
        }
    }

    /// Sign with `keys` from now on.
    pub fn set(&self, keys: &StaticKeys) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = keys.credential();
    }
}

#[async_trait::async_trait]
impl object_store::CredentialProvider for RotatingKeys {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        Ok(self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

/// The static keys, as they are now: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
/// `AWS_SESSION_TOKEN` from the environment, else the shared credentials file's profile.
/// `None`: no static keys (then web identity, container or instance credentials, or none).
/// Reads a file only root may read: call it as root (the fetcher before it drops privileges,
/// the worker on SIGHUP).
pub fn static_keys() -> anyhow::Result<Option<StaticKeys>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok(Some(StaticKeys {
            id,
            secret,
            token: var("AWS_SESSION_TOKEN"),
        })),
        (Some(_), None) => bail!("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        (None, Some(_)) => bail!("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"),
        (None, None) => {
            Ok(shared_credentials()?.map(|(id, secret, token)| StaticKeys { id, secret, token }))
        }
    }
}

/// `[profile]` of an AWS shared credentials file: (key id, secret, session token).
/// A file that others can read is refused: its secrets would be everyone's.
fn shared_credentials() -> anyhow::Result<Option<(String, String, Option<String>)>> {
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(home) => std::path::PathBuf::from(home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let Ok(md) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    use std::os::unix::fs::PermissionsExt;
    if md.permissions().mode() & 0o077 != 0 {
        bail!(
            "the credentials file {} can be read by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            md.permissions().mode() & 0o777,
            path.display()
        );
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut section = String::new();
    let mut kv = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section == profile {
            if let Some((k, v)) = line.split_once('=') {
                kv.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    let (Some(id), Some(secret)) = (
        kv.remove("aws_access_key_id"),
        kv.remove("aws_secret_access_key"),
    ) else {
        return Ok(None);
    };
    Ok(Some((id, secret, kv.remove("aws_session_token"))))
}

impl Prepared {
    /// Read the configuration: the environment and, when used, the shared credentials file.
    /// Reads files, starts no thread, sends nothing.
    pub fn new(url: S3Url) -> anyhow::Result<Prepared> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if let Some(e) = &url.endpoint {
            b = b
                .with_endpoint(e)
                .with_config(AmazonS3ConfigKey::S3Endpoint, e.as_str());
        }
        if let Some(r) = &url.region {
            b = b.with_region(r);
        }
        if let Some(v) = url.virtual_hosted {
            b = b.with_virtual_hosted_style_request(v);
        }
        let cfg = |k: AmazonS3ConfigKey| b.get_config_value(&k).filter(|v| !v.is_empty());
        let endpoint = cfg(AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| cfg(AmazonS3ConfigKey::Endpoint))
            .map(|e| e.trim_end_matches('/').to_string());
        let region = cfg(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = cfg(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let skip_signature =
            cfg(AmazonS3ConfigKey::SkipSignature).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let http_allowed = cfg(AmazonS3ConfigKey::Client(
            object_store::ClientConfigKey::AllowHttp,
        ))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut keys = None;
        if !skip_signature {
            if let Some(k) = static_keys()? {
                let rotating = Arc::new(RotatingKeys::new(&k));
                b = b.with_credentials(rotating.clone());
                keys = Some(rotating);
            } else if !(env_set("AWS_WEB_IDENTITY_TOKEN_FILE")
                || env_set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                || env_set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
                || std::env::var("HSM_S3_INSTANCE_CREDENTIALS").as_deref() == Ok("1"))
            {
                bail!(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a \
                     profile in ~/.aws/credentials), or AWS_SKIP_SIGNATURE=true for a public \
                     bucket (HSM_S3_INSTANCE_CREDENTIALS=1 to use the EC2 instance role)"
                );
            }
        }
        Ok(Prepared {
            url,
            builder: b,
            endpoint,
            region,
            virtual_hosted,
            skip_signature,
            http_allowed,
            keys,
        })
    }

    /// The static keys the client will sign with, to swap later (see [`RotatingKeys`]).
    pub fn keys(&self) -> Option<Arc<RotatingKeys>> {
        self.keys.clone()
    }

    /// Build the clients and the runtime (whose threads start here). Nothing is sent yet.
    pub fn open(self) -> anyhow::Result<S3Backend> {
        let Prepared {
            mut url,
            builder: b,
            endpoint,
            region,
            virtual_hosted,
            skip_signature,
            http_allowed,
            keys: _,
        } = self;
        let deadline = url.deadline.unwrap_or(object::DEFAULT_DEADLINE);
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            || http_allowed;
        let options = object::client_options(deadline, allow_http)?;
        let s3 = Arc::new(
            b.with_client_options(options.clone())
                .with_http_connector(object::Connector)
                .with_retry(object::retry_config(deadline))
                .build()
                .map_err(|e| anyhow!("cannot configure the S3 client: {}", object::flatten(&e)))?,
        );
        let client = object::Connector
            .connect(&options)
            .map_err(|e| anyhow!("cannot make an HTTP client: {}", object::flatten(&e)))?;
        let bucket_url = match (&endpoint, virtual_hosted) {
            (Some(e), true) => e.clone(),
            (None, true) => format!("https://{}.s3.{region}.amazonaws.com", url.bucket),
            (Some(e), false) => format!("{e}/{}", url.bucket),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{}", url.bucket),
        };
        url.endpoint = endpoint;
        url.region = Some(region.clone());
        url.deadline = Some(deadline);
        let describe = format!(
            "s3://{}/{} at {}",
            url.bucket,
            url.prefix,
            object::redact_url(&bucket_url)
        );
        let remote = Remote::new(
            object::runtime()?,
            s3.clone(),
            url.key_prefix(),
            deadline,
            describe,
        );
        Ok(S3Backend {
            remote,
            s3,
            client,
            bucket_url,
            region,
            sign: !skip_signature,
            url,
        })
    }
}

impl S3Backend {
    pub fn open(url: S3Url) -> anyhow::Result<S3Backend> {
        Prepared::new(url)?.open()
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<&str>,
        max_keys: u32,
    ) -> Result<Page, ListError> {
        let mut query = format!(
            "list-type=2&encoding-type=url&max-keys={max_keys}&prefix={}",
            utf8_percent_encode(prefix, STRICT)
        );
        if let Some(t) = token {
            query.push_str("&continuation-token=");
            query.push_str(&utf8_percent_encode(t, STRICT).to_string());
        }
        let url = format!("{}?{query}", self.bucket_url);
        let transient = |e: &ListError| matches!(e, ListError::Transient(_));
        let body = object::retrying(self.remote.deadline, transient, async || {
            self.list_once(&url).await
        })
        .await?;
        parse_list(&body)
    }

    async fn list_once(&self, url: &str) -> Result<String, ListError> {
        let mut req = http::Request::builder()
            .method("GET")
            .uri(url)
            .body(HttpRequestBody::empty())
            .map_err(|e| ListError::Fatal(format!("bad listing URL: {e}")))?;
        if self.sign {
            let cred = self.s3.credentials().get_credential().await.map_err(|e| {
                ListError::Fatal(format!(
                    "cannot get S3 credentials: {}",
                    object::flatten(&e)
                ))
            })?;
            AwsAuthorizer::new(&cred, "s3", &self.region)
                .try_authorize(&mut req, None)
                .map_err(|e| ListError::Fatal(format!("cannot sign: {}", object::flatten(&e))))?;
        }
        let endpoint = object::redact_url(&self.bucket_url);
        let resp = tokio::time::timeout(self.remote.deadline, self.client.execute(req))
            .await
            .map_err(|_| ListError::Transient(format!("{endpoint}: no answer in time")))?
            .map_err(|e| {
                let why = format!("cannot reach {endpoint}: {}", object::flatten(&e));
                if object::untrusted_certificate(&e) {
                    ListError::Fatal(why)
                } else {
                    ListError::Transient(why)
                }
            })?;
        let status = resp.status();
        let body = resp.into_body().bytes().await.map_err(|e| {
            ListError::Transient(format!(
                "{endpoint}: listing cut short: {}",
                object::flatten(&e)
            ))
        })?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            return Ok(body);
        }
        let ErrorBody { code, message } = quick_xml::de::from_str(&body).unwrap_or_default();
        let what = format!("{} {code} {message}", status.as_u16());
        let what = what.trim();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(ListError::Transient(format!("{endpoint} answered {what}")));
        }
        Err(ListError::Fatal(match (status.as_u16(), code.as_str()) {
            (
                403,
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken",
            )
            | (401, _) => format!(
                "S3 at {endpoint} refused our credentials ({what}); check AWS_ACCESS_KEY_ID, \
                 AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
            ),
            (403, _) => format!(
                "S3 at {endpoint} denied listing bucket {} ({what}): the credentials are valid \
                 but lack s3:ListBucket on it",
                self.url.bucket
            ),
            (404, "NoSuchBucket") | (404, "") => {
                format!(
                    "bucket {} does not exist at {endpoint} ({what})",
                    self.url.bucket
                )
            }
            (301, _) | (307, _) | (400, "AuthorizationHeaderMalformed") => format!(
                "S3 at {endpoint} says the bucket is in another region ({what}); pass --region"
            ),
            _ => format!("S3 at {endpoint} refused the listing: {what}"),
        }))
    }
}

enum ListError {
    /// Worth retrying: connection failures, timeouts, 5xx, 429.
    Transient(String),
    /// Not: refused credentials, missing bucket, malformed answer.
    Fatal(String),
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::Transient(m) | ListError::Fatal(m) => f.write_str(m),
        }
    }
}

struct Page {
    objects: Vec<Listed>,
    truncated: bool,
    next: Option<String>,
}

/// An S3 error answer's `<Error>`, as far as it says.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ErrorBody {
    code: String,
    message: String,
}

/// A ListObjectsV2 answer's `<ListBucketResult>`, the parts used. Keys stay strings, so that a
/// key no path can name is reported by populate rather than failing the page.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListBucketResult {
    #[serde(default)]
    encoding_type: Option<String>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_continuation_token: Option<String>,
    #[serde(default)]
    contents: Vec<ListedXml>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedXml {
    key: String,
    size: u64,
    #[serde(default)]
    last_modified: Option<String>,
    #[serde(default, rename = "ETag")]
    etag: Option<String>,
}

fn parse_list(body: &str) -> Result<Page, ListError> {
    if !body.contains("<ListBucketResult") {
        return Err(ListError::Fatal(
            "the server's answer to a listing is not a ListBucketResult".into(),
        ));
    }
    let result: ListBucketResult = quick_xml::de::from_str(body)
        .map_err(|e| ListError::Fatal(format!("the server's listing does not parse: {e}")))?;
    let url_encoded = result.encoding_type.as_deref().map(str::trim) == Some("url");
    let mut objects = Vec::with_capacity(result.contents.len());
    for o in result.contents {
        let key = if url_encoded {
            percent_decode_str(&o.key.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ListError::Fatal(format!("listed key {:?} is not UTF-8", o.key)))?
        } else {
            o.key
        };
        let mtime = o
            .last_modified
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok())
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos()))
            .unwrap_or((0, 0));
        objects.push(Listed {
            key,
            size: o.size,
            mtime,
            etag: o.etag.filter(|e| !e.is_empty()),
        });
    }
    Ok(Page {
        objects,
        truncated: result.is_truncated,
        next: result.next_continuation_token,
    })
}

impl Backend for S3Backend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        self.remote
            .block_on_deadline("S3 read", self.remote.read(obj, offset, buf))
    }

    fn describe(&self) -> String {
        self.remote.describe.clone()
    }

    /// One listing request of at most one key: wrong credentials, a missing bucket or a denied
    /// listing are errors; an unreachable server is only a warning (already fetched content can
    /// still be served, and reads retry).
    fn check(&self) -> anyhow::Result<()> {
        let prefix = self.url.key_prefix();
        match self.remote.block_on(self.list_page(&prefix, None, 1)) {
            Ok(_) => Ok(()),
            Err(ListError::Fatal(m)) => Err(anyhow!(m)),
            Err(ListError::Transient(m)) => {
                warn!("S3 source not reachable now ({m}); reads will retry");
                Ok(())
            }
        }
    }
}

/// Listing is done here (ListObjectsV2) rather than by `object_store`: see the module doc.
impl Lister for S3Backend {
    fn describe(&self) -> String {
        self.remote.describe.clone()
    }

    fn source_url(&self) -> String {
        self.url.to_url()
    }

    /// Directory markers (keys ending in `/`) are returned too; the caller decides.
    fn list(&self) -> anyhow::Result<Vec<Listed>> {
        let prefix = self.url.key_prefix();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .remote
                .block_on(self.list_page(&prefix, token.as_deref(), 1000))
                .map_err(|e| anyhow!("{e}"))?;
            for o in page.objects {
                match o.key.strip_prefix(&prefix) {
                    Some(rel) => out.push(Listed {
                        key: rel.to_string(),
                        ..o
                    }),
                    None => {
                        warn!(key = %o.key, "listing returned a key outside the prefix; ignored")
                    }
                }
            }
            match page.next {
                Some(t) if page.truncated => token = Some(t),
                _ if page.truncated => {
                    bail!("the S3 listing is truncated but gives no continuation token")
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_round_trip() {
        let u = S3Url::parse(
            "s3://bkt/some/pre%20fix/?endpoint=http://127.0.0.1:9000/&region=eu-west-1&fetch_deadline=5",
        )
        .unwrap();
        // The old name of the deadline option reads the same, and is written under the new one.
        let old = S3Url::parse(
            "s3://bkt/some/pre%20fix/?endpoint=http://127.0.0.1:9000/&region=eu-west-1&deadline=5",
        )
        .unwrap();
        assert_eq!(old, u);
        assert!(u.to_url().contains("&fetch_deadline=5"), "{}", u.to_url());
        assert_eq!(
            crate::backend::old_url_options("s3://bkt/p?region=x&deadline=5"),
            [("deadline", "fetch_deadline")]
        );
        assert!(crate::backend::old_url_options(&u.to_url()).is_empty());
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix, "some/pre fix");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.deadline, Some(Duration::from_secs(5)));
        assert_eq!(S3Url::parse(&u.to_url()).unwrap(), u);
        assert!(S3Url::parse("s3://bkt/a/../b").is_err());
        assert!(S3Url::parse("s3://bkt?secret=x").is_err());
        assert!(S3Url::parse("s3://bkt?endpoint=http://u:p@h/").is_err());
        assert!(S3Url::parse("s3://Bad_Bucket!").is_err());
    }

    #[test]
    fn parses_a_listing() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult><Name>b</Name><Prefix>p%2F</Prefix><EncodingType>url</EncodingType>
<IsTruncated>true</IsTruncated><NextContinuationToken>tok&amp;1</NextContinuationToken>
<Contents><Key>p/a+b%2Bc</Key><LastModified>2024-01-02T03:04:05.500Z</LastModified>
<ETag>&quot;abc&quot;</ETag><Size>12</Size></Contents>
<Contents><Key>p/..%2Fx</Key><LastModified>2024-01-02T03:04:05Z</LastModified><ETag>"d-2"</ETag><Size>0</Size></Contents>
</ListBucketResult>"#;
        let Ok(page) = parse_list(body) else { panic!() };
        assert!(page.truncated);
        assert_eq!(page.next.as_deref(), Some("tok&1"));
        assert_eq!(page.objects[0].key, "p/a b+c");
        assert_eq!(page.objects[0].size, 12);
        assert_eq!(page.objects[0].mtime, (1704164645, 500_000_000));
        assert_eq!(page.objects[0].etag.as_deref(), Some("\"abc\""));
        assert_eq!(page.objects[1].key, "p/../x");
        // An empty bucket, and an answer that is not a listing.
        let Ok(empty) = parse_list(
            "<ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated></ListBucketResult>",
        ) else {
            panic!()
        };
        assert!(empty.objects.is_empty() && !empty.truncated);
        assert!(parse_list("<Error><Code>AccessDenied</Code></Error>").is_err());
        let e: ErrorBody = quick_xml::de::from_str(
            "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The bucket &amp; all</Message><BucketName>b</BucketName></Error>",
        )
        .unwrap();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("NoSuchBucket", "The bucket & all")
        );
    }
}
