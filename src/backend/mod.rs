//! Where stub content lives. A backend reads a byte range of one object and proves it is the object
//! that `populate` recorded: same size, same mtime or version. It never decides what to do about a
//! failure; it says precisely what went wrong and the fetch engine picks the errno.

pub mod local;

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
}

impl FetchError {
    /// The errno the reader gets. ENOSPC/EDQUOT and timeouts keep their meaning; everything else
    /// is an I/O error: the bytes could not be had.
    pub fn as_io(&self) -> io::Error {
        match self {
            FetchError::Io(e) => io::Error::new(e.kind(), e.to_string()),
            _ => io::Error::from_raw_os_error(libc::EIO),
        }
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

    /// A description safe to log: never credentials.
    fn describe(&self) -> String;
}

/// Open the backend a store's source URL names.
pub fn open(url: &str) -> anyhow::Result<Arc<dyn Backend>> {
    let path = local::path_from_url(url)?;
    Ok(Arc::new(local::LocalBackend::open(&path)?))
}
