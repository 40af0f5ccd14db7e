//! Where stub content lives. A backend reads a byte range of one object and proves it is the object
//! that `populate` recorded: same size, same mtime or version. It never decides what to do about a
//! failure; it says precisely what went wrong and the fetch engine picks the errno. An object
//! store also lists what is under its prefix ([`Lister`]), for populate: the listing, like the
//! reads, is the backend's business, with the same client, credentials and retry policy.

pub mod cloud;
pub mod http;
pub mod isolated;
pub mod local;
pub mod object;
pub mod s3;

use std::io;
use std::sync::Arc;

use crate::record::SourceRecord;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("source object missing")]
    NotFound,
    #[error("source changed since populate: {0}")]
    Changed(String),
    #[error("source returned {got} bytes at offset {offset}, expected {want}")]
    Short {
        offset: u64,
        want: usize,
        got: usize,
    },
    #[error("source path escapes the source root or crosses a symlink")]
    Escape,
    #[error("source I/O error: {0}")]
    Io(#[from] io::Error),
    /// A remote source failed for good: retries exhausted, deadline passed, or refused.
    #[error("remote source: {0}")]
    Remote(String),
    /// The server's TLS certificate is not trusted: no retry can change that, so none is made.
    #[error(
        "remote source: certificate not trusted (set SSL_CERT_FILE to its CA's PEM file): {0}"
    )]
    Untrusted(String),
}

impl FetchError {
    /// The errno the reader gets. ENOSPC/EDQUOT and timeouts keep their meaning; everything else
    /// is an I/O error: the bytes could not be had.
    /// The error a failed fill reports, its errno kept: a reader is told EAGAIN for a source
    /// that timed out (retry), ENOSPC for a full disk, and EIO for the rest.
    pub fn as_io(&self) -> io::Error {
        match self {
            FetchError::Io(e) => match errno_of(e) {
                0 => io::Error::new(e.kind(), e.to_string()),
                n => io::Error::from_raw_os_error(n),
            },
            _ => io::Error::from_raw_os_error(libc::EIO),
        }
    }
}

/// The errno an I/O error stands for: its own, or one for the kinds that have one without it
/// (a timeout, a would-block), 0 for none.
pub fn errno_of(e: &io::Error) -> i32 {
    match (e.raw_os_error(), e.kind()) {
        (Some(n), _) => n,
        (None, io::ErrorKind::TimedOut) => libc::ETIMEDOUT,
        (None, io::ErrorKind::WouldBlock) => libc::EAGAIN,
        _ => 0,
    }
}

/// Facts about one object at the source, for populate.
#[derive(Clone, Debug)]
pub struct ObjectMeta {
    pub size: u64,
    pub mtime: (i64, u32),
    pub version: Option<String>,
}

pub trait Backend: Send + Sync {
    /// Fill `buf` with the object's bytes at `offset`; `buf` never reaches past the recorded size.
    fn read_range(&self, obj: &SourceRecord, offset: u64, buf: &mut [u8])
        -> Result<(), FetchError>;

    /// Whether one read may block far past `serve --fetch-deadline` where nothing can interrupt
    /// it: a remote server, a network or FUSE filesystem. The engine runs such reads on its fetch
    /// threads and stops waiting at the deadline, so that a hung source costs a thread, never a
    /// reader's deadline. A read that cannot stall so (a local disk) runs on the thread serving
    /// the event: one thread hand-off less on every miss.
    fn reads_may_stall(&self) -> bool {
        true
    }

    /// What a read away from where a file was last read fetches around the bytes asked for
    /// (aligned): a request to a remote source costs more than its bytes, a read from a local
    /// disk mostly its bytes.
    fn random_piece(&self) -> u64 {
        64 << 10
    }

    /// A description safe to log: never credentials.
    fn describe(&self) -> String;

    /// A cheap request that proves the source is reachable and accepts our credentials (one
    /// listing or HEAD request for remote sources). `serve` calls it before exposing the tree,
    /// so wrong credentials fail at start rather than at the first read.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// One object of a remote listing: its key relative to the source's prefix, not validated (the
/// caller reports and skips the keys no file can have), and what identifies this version of it.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub mtime: (i64, u32),
    pub etag: Option<String>,
}

/// A source whose objects can be listed: the object stores (S3, GCS, Azure). A local tree is
/// walked instead, and an HTTP server describes itself with a manifest.
pub trait Lister: Send + Sync {
    /// A description safe to log: never credentials.
    fn describe(&self) -> String;

    /// The source URL to record, resolved (endpoint, region, account filled in from the
    /// environment): what `serve` opens, whatever its own environment.
    fn source_url(&self) -> String;

    /// Every object under the prefix, in key order. Fails on refused credentials, a missing
    /// bucket, or a server that stays unreachable past the deadline (retried as reads are, see
    /// [`object::retrying`]).
    fn list(&self) -> anyhow::Result<Vec<Listed>>;
}

/// The lister of an object store's source URL (`s3://`, `gs://`, `az://`); see
/// [`with_overrides`] for flags that change the URL first.
pub fn lister(url: &str) -> anyhow::Result<Box<dyn Lister>> {
    Ok(match scheme_of(url) {
        Scheme::S3 => Box::new(s3::S3Backend::open(s3::S3Url::parse(url)?)?),
        Scheme::Gcs | Scheme::Azure => {
            Box::new(cloud::CloudBackend::open(cloud::CloudUrl::parse(url)?)?)
        }
        Scheme::Http | Scheme::Local => {
            anyhow::bail!("only object stores (s3://, gs://, az://) can be listed")
        }
    })
}

/// A source URL with the endpoint, region and fetch deadline given as flags put in, in its
/// canonical form (validated as a typed URL would be).
pub fn with_overrides(
    url: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    deadline: Option<f64>,
) -> anyhow::Result<String> {
    let deadline = deadline
        .map(|d| object::parse_deadline(&d.to_string()))
        .transpose()?;
    match scheme_of(url) {
        Scheme::S3 => {
            let mut u = s3::S3Url::parse(url)?;
            if let Some(e) = endpoint {
                u.endpoint = Some(e.trim_end_matches('/').to_string());
            }
            if let Some(r) = region {
                u.region = Some(r.to_string());
            }
            u.deadline = deadline.or(u.deadline);
            Ok(s3::S3Url::parse(&u.to_url())?.to_url())
        }
        Scheme::Gcs | Scheme::Azure => {
            if region.is_some() {
                anyhow::bail!("--region is for s3:// sources");
            }
            let mut u = cloud::CloudUrl::parse(url)?;
            if let Some(e) = endpoint {
                u.endpoint = Some(e.to_string());
            }
            u.deadline = deadline.or(u.deadline);
            Ok(cloud::CloudUrl::parse(&u.to_url())?.to_url())
        }
        Scheme::Http | Scheme::Local => Ok(url.to_string()),
    }
}

/// What kind of source a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Local,
    S3,
    /// `gs://`: Google Cloud Storage.
    Gcs,
    /// `az://`: Azure Blob Storage.
    Azure,
    Http,
}

pub fn scheme_of(url: &str) -> Scheme {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("s3://") {
        Scheme::S3
    } else if lower.starts_with("gs://") {
        Scheme::Gcs
    } else if lower.starts_with("az://") {
        Scheme::Azure
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        Scheme::Http
    } else {
        Scheme::Local
    }
}

/// The options of a source URL given by an old name, as (old, new) pairs: `deadline=` for
/// `fetch_deadline=`. Both are read; the old names go in a later release.
pub fn old_url_options(url: &str) -> Vec<(&'static str, &'static str)> {
    let options = match scheme_of(url) {
        Scheme::S3 | Scheme::Gcs | Scheme::Azure => url.split_once('?').map(|(_, q)| q),
        Scheme::Http => url.split_once('#').map(|(_, f)| f),
        Scheme::Local => None,
    };
    let pairs = url::form_urlencoded::parse(options.unwrap_or("").as_bytes());
    if pairs
        .into_iter()
        .any(|(k, _)| k == object::OLD_DEADLINE_OPTION)
    {
        vec![(object::OLD_DEADLINE_OPTION, object::DEADLINE_OPTION)]
    } else {
        Vec::new()
    }
}

/// Open the backend a store's source URL names: a local path or `file://` URL, `s3://BUCKET/PREFIX`
/// (options in the query, see [`s3`]), `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX` (see
/// [`cloud`]) or `http(s)://HOST/BASE/` (see [`http`]).
pub fn open(url: &str) -> anyhow::Result<Arc<dyn Backend>> {
    prepare(url)?.open()
}

/// A source whose configuration has been read (environment, files) but whose clients, and the
/// threads that come with them, are not made yet: see [`prepare`].
pub enum Prepared {
    S3(Box<s3::Prepared>),
    Cloud(Box<cloud::Prepared>),
    Http(String),
    Local(String),
}

/// The first half of [`open`]: parse the URL and read what the backend needs from the
/// environment and from files (the S3 shared credentials file, a GCS key file, the CA
/// certificates `SSL_CERT_FILE` names), starting no
/// thread and sending nothing. The fetcher does this as root, then drops root, then calls [`Prepared::open`].
pub fn prepare(url: &str) -> anyhow::Result<Prepared> {
    let scheme = scheme_of(url);
    if scheme != Scheme::Local {
        // Read now, as root (see `read_trusted_roots`); whether a failure matters is the
        // client's to say.
        let _ = object::read_trusted_roots();
    }
    Ok(match scheme {
        Scheme::S3 => Prepared::S3(Box::new(s3::Prepared::new(s3::S3Url::parse(url)?)?)),
        Scheme::Gcs | Scheme::Azure => Prepared::Cloud(Box::new(cloud::Prepared::new(
            cloud::CloudUrl::parse(url)?,
        )?)),
        Scheme::Http => Prepared::Http(url.to_string()),
        Scheme::Local => Prepared::Local(url.to_string()),
    })
}

impl Prepared {
    /// Build the backend: clients, and for remote sources an async runtime with its threads.
    pub fn open(self) -> anyhow::Result<Arc<dyn Backend>> {
        match self {
            Prepared::S3(p) => Ok(Arc::new(p.open()?)),
            Prepared::Cloud(p) => Ok(Arc::new(p.open()?)),
            Prepared::Http(url) => Ok(Arc::new(http::open(&url)?)),
            Prepared::Local(url) => {
                let path = local::path_from_url(&url)?;
                Ok(Arc::new(local::LocalBackend::open(&path)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_timeout_or_a_full_disk_keeps_its_errno() {
        use crate::sys::fanotify::DenyErrno;
        let deny = |e: std::io::Error| DenyErrno::for_error(&super::FetchError::Io(e).as_io());
        assert_eq!(
            deny(std::io::Error::from_raw_os_error(libc::EAGAIN)),
            DenyErrno::Again
        );
        assert_eq!(deny(std::io::ErrorKind::TimedOut.into()), DenyErrno::Again);
        assert_eq!(
            deny(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            DenyErrno::NoSpc
        );
        assert_eq!(deny(std::io::Error::other("reset")), DenyErrno::Io);
        assert_eq!(
            DenyErrno::for_error(&super::FetchError::NotFound.as_io()),
            DenyErrno::Io
        );
    }
}
