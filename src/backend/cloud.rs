//! Google Cloud Storage and Azure Blob Storage, through `object_store`'s own clients: their
//! credentials, request signing, listing and retries are the crate's; the reads are the shared
//! ranged, conditional, deadline-bounded reads of [`super::object`].
//!
//! Source URLs, as stored in the store's `config.json` (never with credentials):
//!
//! ```text
//! gs://BUCKET[/PREFIX][?endpoint=URL][&fetch_deadline=SECS]
//! az://CONTAINER[/PREFIX][?account=NAME][&endpoint=URL][&fetch_deadline=SECS]
//! ```
//!
//! - `az://CONTAINER@ACCOUNT.blob.core.windows.net/PREFIX` (the form of Hadoop's and
//!   `object_store`'s Azure URLs) is read too, and recorded in the first form. The account comes
//!   from the URL, else `AZURE_STORAGE_ACCOUNT_NAME`; populate records it, so that `serve` opens
//!   the same account whatever its environment.
//! - `endpoint`: another server than the cloud's (`populate --endpoint`): an emulator, a private
//!   endpoint. For Azure it is the account's URL (`http://127.0.0.1:10000/devstoreaccount1` for
//!   Azurite); for GCS the base URL before the bucket.
//! - `fetch_deadline`: as for S3 (see [`super::s3`]).
//! - GCS credentials, as `object_store` reads them: a service account key file
//!   (`GOOGLE_SERVICE_ACCOUNT`, or its JSON in `GOOGLE_SERVICE_ACCOUNT_KEY`), application default
//!   credentials (`GOOGLE_APPLICATION_CREDENTIALS`, else `~/.config/gcloud/
//!   application_default_credentials.json`), else the metadata server of a GCE instance;
//!   `GOOGLE_SKIP_SIGNATURE=true` for a public bucket. A key file's `gcs_base_url` and
//!   `disable_oauth` (emulators) are honoured.
//! - Azure credentials, as `object_store` reads them: `AZURE_STORAGE_ACCOUNT_KEY`,
//!   `AZURE_STORAGE_SAS_KEY`, `AZURE_STORAGE_TOKEN` (a bearer token), a service principal
//!   (`AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`, `AZURE_TENANT_ID`), workload identity
//!   (`AZURE_FEDERATED_TOKEN_FILE` with the client and tenant ids), else the managed identity of
//!   an Azure VM; `AZURE_SKIP_SIGNATURE=true` for a public container.
//! - A VM's own identity (GCE metadata server, Azure managed identity) is asked only when
//!   `HSM_INSTANCE_CREDENTIALS=1`: with no credentials configured, populate and serve say so
//!   instead of waiting on an address that answers only inside the cloud.
//!
//! The store is built by [`Prepared::new`], which reads every credentials file (a key file
//! may be readable by root only) and starts no thread, so that the fetcher can build it as root
//! and drop root before anything runs (see `backend::isolated`). A workload identity token file
//! is read later, as the fetch user, when a token is needed. The Azure CLI credential
//! (`AZURE_USE_AZURE_CLI`) runs a program, which the fetcher's seccomp filter refuses.
//!
//! Listing is `object_store`'s, which fails as a whole on a key it cannot represent (`a//b`,
//! `../x`): populate then says which key and stops, where for S3 it reports and skips the key
//! (see [`super::s3`]). A "folder" marker object (`dir/`) lists as a zero-byte `dir`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::TryStreamExt;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tracing::warn;

use super::object::{self, Remote};
use super::{Backend, FetchError, Listed, Lister};
use crate::record::SourceRecord;

/// What stays unencoded in a recorded prefix.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Gcs,
    Azure,
}

impl Cloud {
    fn scheme(self) -> &'static str {
        match self {
            Cloud::Gcs => "gs",
            Cloud::Azure => "az",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Cloud::Gcs => "GCS",
            Cloud::Azure => "Azure",
        }
    }
}

/// The parts of a `gs://` or `az://` source URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudUrl {
    pub cloud: Cloud,
    /// The GCS bucket or the Azure container.
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the whole bucket.
    pub prefix: String,
    /// Azure only: the storage account.
    pub account: Option<String>,
    pub endpoint: Option<String>,
    pub deadline: Option<Duration>,
}

impl CloudUrl {
    pub fn parse(url: &str) -> anyhow::Result<CloudUrl> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow!("not a gs:// or az:// URL"))?;
        let cloud = match scheme.to_ascii_lowercase().as_str() {
            "gs" => Cloud::Gcs,
            "az" => Cloud::Azure,
            _ => bail!("not a gs:// or az:// URL"),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let mut account = None;
        let bucket = match (cloud, bucket.split_once('@')) {
            (Cloud::Azure, Some((container, host))) => {
                let name = host
                    .strip_suffix(".blob.core.windows.net")
                    .or_else(|| host.strip_suffix(".dfs.core.windows.net"))
                    .ok_or_else(|| {
                        anyhow!(
                            "{host:?} is not an Azure storage host \
                             (ACCOUNT.blob.core.windows.net); for another server use ?endpoint="
                        )
                    })?;
                account = Some(name.to_string());
                container
            }
            _ => bucket,
        };
        let valid = match cloud {
            // GCS bucket names: lower-case letters, digits, '-', '_', '.', 3 to 222 characters.
            Cloud::Gcs => {
                (3..=222).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)
                    })
            }
            // Azure container names: lower-case letters, digits and '-', 3 to 63 characters.
            Cloud::Azure => {
                (3..=63).contains(&bucket.len())
                    && bucket
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            }
        };
        if !valid {
            bail!(
                "{bucket:?} is not a valid {} name",
                match cloud {
                    Cloud::Gcs => "GCS bucket (3-222 lower-case letters, digits, '-', '_', '.')",
                    Cloud::Azure => "Azure container (3-63 lower-case letters, digits, '-')",
                }
            );
        }
        let prefix = percent_decode_str(prefix)
            .decode_utf8()
            .with_context(|| format!("the {} prefix is not UTF-8", cloud.name()))?
            .trim_matches('/')
            .to_string();
        if !prefix.is_empty() && ObjectPath::parse(&prefix).is_err() {
            bail!("the prefix {prefix:?} has empty, '.' or '..' components");
        }
        let mut out = CloudUrl {
            cloud,
            bucket: bucket.to_string(),
            prefix,
            account,
            endpoint: None,
            deadline: None,
        };
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match (&*k, cloud) {
                ("endpoint", _) => out.endpoint = Some(check_endpoint(&v)?),
                ("account", Cloud::Azure) => out.account = Some(v.into_owned()),
                (object::DEADLINE_OPTION | object::OLD_DEADLINE_OPTION, _) => {
                    out.deadline = Some(object::parse_deadline(&v)?)
                }
                (other, _) => bail!(
                    "unknown option {other:?} in the {} URL (known: {}fetch_deadline; \
                     credentials never go in the URL)",
                    cloud.name(),
                    match cloud {
                        Cloud::Gcs => "endpoint, ",
                        Cloud::Azure => "account, endpoint, ",
                    }
                ),
            }
        }
        if let Some(a) = &out.account {
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric()) {
                bail!("{a:?} is not an Azure storage account name (letters and digits)");
            }
        }
        Ok(out)
    }

    /// The canonical URL: what the store records and `serve` opens.
    pub fn to_url(&self) -> String {
        let mut s = format!("{}://{}", self.cloud.scheme(), self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&utf8_percent_encode(&self.prefix, PATH).to_string());
        }
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(a) = &self.account {
            q.append_pair("account", a);
        }
        if let Some(e) = &self.endpoint {
            q.append_pair("endpoint", e);
        }
        if let Some(d) = self.deadline {
            q.append_pair(object::DEADLINE_OPTION, &format!("{}", d.as_secs_f64()));
        }
        let q = q.finish();
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
        s
    }

    /// Key prefix including the trailing `/`, or empty.
    fn key_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

/// An endpoint URL as given, refused if it could carry credentials (never echoed then).
fn check_endpoint(e: &str) -> anyhow::Result<String> {
    let u = url::Url::parse(e).context("the endpoint URL does not parse")?;
    if u.query().is_some() || u.fragment().is_some() {
        bail!("the endpoint URL must not have a query or a fragment (a SAS token goes in AZURE_STORAGE_SAS_KEY)");
    }
    if !u.username().is_empty() || u.password().is_some() {
        bail!("the endpoint URL must not carry credentials");
    }
    if u.scheme() != "http" && u.scheme() != "https" {
        bail!("the endpoint must be an http:// or https:// URL");
    }
    Ok(e.trim_end_matches('/').to_string())
}

/// A `gs://` or `az://` source with its store built (credentials files read) and no thread
/// started yet: see the module doc.
pub struct Prepared {
    url: CloudUrl,
    store: Arc<dyn ObjectStore>,
    deadline: Duration,
    /// Where requests go, for messages.
    at: String,
}

/// The variable that allows asking the VM's metadata service for credentials (a GCE service
/// account, an Azure managed identity) when none are configured: without it, a machine outside
/// the cloud would wait on an address that never answers, and a typo in a variable's name would
/// look like a network failure.
pub const INSTANCE_CREDENTIALS: &str = "HSM_INSTANCE_CREDENTIALS";

fn instance_credentials() -> bool {
    std::env::var(INSTANCE_CREDENTIALS).as_deref() == Ok("1")
}

impl Prepared {
    /// Read the environment and the credentials files, and build the client. Sends nothing.
    pub fn new(mut url: CloudUrl) -> anyhow::Result<Prepared> {
        let deadline = url.deadline.unwrap_or(object::DEFAULT_DEADLINE);
        url.deadline = Some(deadline);
        let plain_http = url
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let (store, at): (Arc<dyn ObjectStore>, String) = match url.cloud {
            Cloud::Gcs => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&url.bucket);
                if let Some(e) = &url.endpoint {
                    b = b.with_base_url(e);
                }
                let set =
                    |k: GoogleConfigKey| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
                let configured = set(GoogleConfigKey::ServiceAccount)
                    || set(GoogleConfigKey::ServiceAccountKey)
                    || set(GoogleConfigKey::ApplicationCredentials)
                    || set(GoogleConfigKey::BearerToken)
                    || b.get_config_value(&GoogleConfigKey::SkipSignature)
                        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                    || std::env::var_os("HOME").is_some_and(|h| {
                        std::path::Path::new(&h)
                            .join(".config/gcloud/application_default_credentials.json")
                            .exists()
                    });
                if !configured && !instance_credentials() {
                    bail!(
                        "no GCS credentials: set GOOGLE_APPLICATION_CREDENTIALS or \
                         GOOGLE_SERVICE_ACCOUNT to a service account key file, or \
                         GOOGLE_SKIP_SIGNATURE=true for a public bucket \
                         ({INSTANCE_CREDENTIALS}=1 to use the VM's service account)"
                    );
                }
                // A key file may name an emulator's http:// base URL; without an endpoint the
                // default is https anyway.
                let allow_http = plain_http || url.endpoint.is_none();
                let store = b
                    .with_client_options(object::client_options(deadline, allow_http)?)
                    .with_http_connector(object::Connector)
                    .with_retry(object::retry_config(deadline))
                    .build()
                    .map_err(|e| {
                        anyhow!("cannot configure the GCS client: {}", object::flatten(&e))
                    })?;
                let at = url
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| "storage.googleapis.com".into());
                (Arc::new(store), at)
            }
            Cloud::Azure => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(&url.bucket);
                if let Some(a) = &url.account {
                    b = b.with_account(a);
                }
                if let Some(e) = &url.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                let account = b
                    .get_config_value(&AzureConfigKey::AccountName)
                    .filter(|a| !a.is_empty());
                let emulator = b
                    .get_config_value(&AzureConfigKey::UseEmulator)
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                let Some(account) = account.or(emulator.then(|| "devstoreaccount1".into())) else {
                    bail!(
                        "no Azure storage account: name it in the URL (az://CONTAINER/PREFIX?account=NAME \
                         or az://CONTAINER@NAME.blob.core.windows.net/PREFIX) or in \
                         AZURE_STORAGE_ACCOUNT_NAME"
                    );
                };
                url.account = Some(account.clone());
                let set = |k: AzureConfigKey| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
                // A key, a SAS, a bearer token, a service principal's secret or a workload
                // identity's token file; or the emulator's well-known key.
                let configured = set(AzureConfigKey::AccessKey)
                    || set(AzureConfigKey::SasKey)
                    || set(AzureConfigKey::Token)
                    || set(AzureConfigKey::ClientSecret)
                    || set(AzureConfigKey::FederatedTokenFile)
                    || emulator
                    || b.get_config_value(&AzureConfigKey::SkipSignature)
                        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                if !configured && !instance_credentials() {
                    bail!(
                        "no Azure credentials: set AZURE_STORAGE_ACCOUNT_KEY, \
                         AZURE_STORAGE_SAS_KEY or a service principal (AZURE_CLIENT_ID, \
                         AZURE_CLIENT_SECRET, AZURE_TENANT_ID), or AZURE_SKIP_SIGNATURE=true for \
                         a public container ({INSTANCE_CREDENTIALS}=1 to use the VM's managed \
                         identity)"
                    );
                }
                let store = b
                    .with_client_options(object::client_options(deadline, plain_http)?)
                    .with_http_connector(object::Connector)
                    .with_retry(object::retry_config(deadline))
                    .build()
                    .map_err(|e| {
                        anyhow!("cannot configure the Azure client: {}", object::flatten(&e))
                    })?;
                let at = url
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
                (Arc::new(store), at)
            }
        };
        Ok(Prepared {
            url,
            store,
            deadline,
            at,
        })
    }

    /// Start the runtime (its threads start here). Nothing is sent yet.
    pub fn open(self) -> anyhow::Result<CloudBackend> {
        let describe = format!(
            "{}://{}/{} at {}",
            self.url.cloud.scheme(),
            self.url.bucket,
            self.url.prefix,
            object::redact_url(&self.at)
        );
        let remote = Remote::new(
            object::runtime()?,
            self.store,
            self.url.key_prefix(),
            self.deadline,
            describe,
        );
        Ok(CloudBackend {
            remote,
            url: self.url,
        })
    }
}

pub struct CloudBackend {
    remote: Remote,
    /// The URL as resolved: the account filled in from the environment.
    pub url: CloudUrl,
}

impl CloudBackend {
    pub fn open(url: CloudUrl) -> anyhow::Result<CloudBackend> {
        Prepared::new(url)?.open()
    }

    fn prefix_path(&self) -> Option<ObjectPath> {
        (!self.url.prefix.is_empty()).then(|| ObjectPath::from_iter(self.url.prefix.split('/')))
    }

    /// The first page of the listing, at most: proves the bucket exists and the credentials
    /// are accepted.
    fn probe(&self) -> Result<(), object_store::Error> {
        let prefix = self.prefix_path();
        self.remote.block_on(async {
            let mut objects = self.remote.store.list(prefix.as_ref());
            objects.try_next().await.map(|_| ())
        })
    }

    /// An `object_store` error of a listing or probe, said for a person.
    fn explain(&self, e: &object_store::Error) -> String {
        let what = short(&object::flatten(e));
        let cloud = self.url.cloud.name();
        let hint = match self.url.cloud {
            Cloud::Gcs => {
                "check GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT (a key file), or \
                 set GOOGLE_SKIP_SIGNATURE=true for a public bucket"
            }
            Cloud::Azure => {
                "check AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY or the service principal \
                 (AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID)"
            }
        };
        // Azure's client says a refusal only in its message.
        let status = http_status(&what);
        match e {
            object_store::Error::InvalidPath { .. } => format!(
                "{cloud} lists a key no path can name ({what}); such keys (empty, '.' or '..' \
                 components) cannot be populated from {cloud}: rename the object, or populate a \
                 prefix that does not hold it"
            ),
            _ if status == Some(404) || matches!(e, object_store::Error::NotFound { .. }) => {
                format!(
                    "{}: the {} {:?} does not exist ({what})",
                    self.remote.describe,
                    match self.url.cloud {
                        Cloud::Gcs => "bucket",
                        Cloud::Azure => "container",
                    },
                    self.url.bucket,
                )
            }
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => format!(
                "{cloud} refused our credentials for {} ({what}); {hint}",
                self.remote.describe
            ),
            _ if matches!(status, Some(401 | 403)) => format!(
                "{cloud} refused our credentials for {} ({what}); {hint}",
                self.remote.describe
            ),
            _ => format!("{cloud} request failed: {what}"),
        }
    }
}

/// The HTTP status an `object_store` message reports ("... status code: 403 Forbidden ...").
fn http_status(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// A message on one line, a server's XML error reduced to its code and message.
fn short(message: &str) -> String {
    let tag = |name: &str| {
        let (_, rest) = message.split_once(&format!("<{name}>"))?;
        let (text, _) = rest.split_once(&format!("</{name}>"))?;
        Some(text.lines().next().unwrap_or("").trim().to_string())
    };
    let head = match message.find("<?xml") {
        Some(i) => &message[..i],
        None => message,
    };
    let mut s = head.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(code) = tag("Code") {
        s.push_str(&format!(" {code}: {}", tag("Message").unwrap_or_default()));
    }
    s.trim_end_matches(':').to_string()
}

/// Whether a listing failure may pass: the request did not get an answer (connection refused
/// or reset, a timeout), where the client's own retries (which cover 5xx and 429) end at the
/// first answer. A certificate not trusted, a refusal, a missing bucket or a key that cannot be
/// represented will not pass.
fn transient(e: &object_store::Error) -> bool {
    if object::untrusted_certificate(e) {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<object_store::client::HttpError>() {
            return true;
        }
        source = s.source();
    }
    false
}

impl Lister for CloudBackend {
    fn describe(&self) -> String {
        self.remote.describe.clone()
    }

    fn source_url(&self) -> String {
        self.url.to_url()
    }

    /// `object_store`'s listing (pages of up to 1000 keys, each request retried by the client),
    /// tried again from the start while a failure may pass and the deadline allows.
    fn list(&self) -> anyhow::Result<Vec<Listed>> {
        let prefix = self.prefix_path();
        let key_prefix = self.url.key_prefix();
        let listed = self.remote.block_on(object::retrying(
            self.remote.deadline,
            transient,
            async || {
                let metas: Vec<object_store::ObjectMeta> = self
                    .remote
                    .store
                    .list(prefix.as_ref())
                    .try_collect()
                    .await?;
                Ok(metas)
            },
        ));
        let metas = listed.map_err(|e| anyhow!(self.explain(&e)))?;
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            let key = m.location.as_ref();
            let Some(rel) = key.strip_prefix(&key_prefix) else {
                warn!(key, "listing returned a key outside the prefix; ignored");
                continue;
            };
            out.push(Listed {
                key: rel.to_string(),
                size: m.size,
                mtime: (
                    m.last_modified.timestamp(),
                    m.last_modified.timestamp_subsec_nanos(),
                ),
                etag: m.e_tag,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

impl Backend for CloudBackend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        self.remote.block_on_deadline(
            &format!("{} read", self.url.cloud.name()),
            self.remote.read(obj, offset, buf),
        )
    }

    fn describe(&self) -> String {
        self.remote.describe.clone()
    }

    /// One listing page: wrong credentials or a missing bucket are errors; an unreachable
    /// server is only a warning (already fetched content can still be served, reads retry).
    fn check(&self) -> anyhow::Result<()> {
        match self.probe() {
            Ok(()) => Ok(()),
            Err(e) if transient(&e) => {
                warn!(
                    "{} source not reachable now ({}); reads will retry",
                    self.url.cloud.name(),
                    self.explain(&e)
                );
                Ok(())
            }
            Err(e) => Err(anyhow!(self.explain(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_round_trip() {
        let g = CloudUrl::parse(
            "gs://my-bkt/some/pre%20fix/?endpoint=http://127.0.0.1:4443/&fetch_deadline=5",
        )
        .unwrap();
        assert_eq!(g.cloud, Cloud::Gcs);
        assert_eq!(g.bucket, "my-bkt");
        assert_eq!(g.prefix, "some/pre fix");
        assert_eq!(g.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(g.deadline, Some(Duration::from_secs(5)));
        assert_eq!(CloudUrl::parse(&g.to_url()).unwrap(), g);

        let a = CloudUrl::parse("az://data@acct1.blob.core.windows.net/x/y").unwrap();
        assert_eq!(a.cloud, Cloud::Azure);
        assert_eq!(
            (a.bucket.as_str(), a.prefix.as_str(), a.account.as_deref()),
            ("data", "x/y", Some("acct1"))
        );
        assert_eq!(a.to_url(), "az://data/x/y?account=acct1");
        assert_eq!(CloudUrl::parse(&a.to_url()).unwrap(), a);

        for bad in [
            "gs://b",
            "gs://Bad_Bucket",
            "gs://bkt/a/../b",
            "gs://bkt/a//b",
            "gs://bkt?secret=x",
            "gs://bkt?account=x",
            "az://data?endpoint=http://u:p@h/",
            "az://data?endpoint=http://h/?sig=x",
            "az://data@acct.example.com/x",
            "az://under_score",
            "az://data?account=a-b",
        ] {
            assert!(CloudUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    proptest::proptest! {
        /// Any text after the scheme is parsed or refused, never a panic; what parses is
        /// recorded in a form that parses back to the same source.
        #[test]
        fn any_url_parses_or_is_refused_and_round_trips(
            scheme in proptest::sample::select(vec!["gs://", "az://"]),
            rest in "[a-z0-9@./?&=%:_ -]{0,60}",
            likely in "[a-z0-9-]{3,8}(/([a-zA-Z0-9 ._+-]|%[0-9A-F]{2}){1,12}){0,3}(\\?(account=[a-z0-9]{1,5}|endpoint=http://h:1/x|fetch_deadline=[0-9]{1,2}))?",
        ) {
            for text in [rest, likely] {
                if let Ok(u) = CloudUrl::parse(&format!("{scheme}{text}")) {
                    proptest::prop_assert_eq!(CloudUrl::parse(&u.to_url()).ok(), Some(u));
                }
            }
        }
    }

    #[test]
    fn server_errors_are_told_in_one_line() {
        let azure =
            "Generic MicrosoftAzure error: Error performing GET http://h/c in 4ms - Server \
            returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error>\n  \
            <Code>AuthorizationFailure</Code>\n  <Message>Server failed to authenticate.\n\
            RequestId:1</Message>\n</Error>";
        assert_eq!(http_status(azure), Some(403));
        assert_eq!(
            short(azure),
            "Generic MicrosoftAzure error: Error performing GET http://h/c in 4ms - Server \
             returned non-2xx status code: 403 Forbidden: AuthorizationFailure: Server failed to \
             authenticate."
        );
        assert_eq!(http_status("connection refused"), None);
        assert_eq!(short("a\n  b"), "a b");
    }
}
