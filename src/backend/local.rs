//! A local directory as the source. Every object is opened beneath the source root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither a `..` in a key nor a symlink placed
//! in the source (even swapped in while we run) can make the daemon read outside it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{bail, Context};

use super::{Backend, FetchError};
use crate::record::SourceRecord;
use crate::sys::fs as sysfs;

pub struct LocalBackend {
    root: PathBuf,
    /// Owner of the root when the daemon started: a replacement root must have the same.
    root_uid: u32,
    /// The root directory, held open: renaming it or a component above it changes nothing;
    /// reopened by name only when it was removed.
    root_fd: RwLock<OwnedFd>,
}

/// Accept `/abs/path` or `file:///abs/path`.
pub fn path_from_url(url: &str) -> anyhow::Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(rest) if rest.starts_with('/') => Ok(PathBuf::from(rest)),
        Some(_) => bail!("a file:// URL needs an absolute path: file:///path/to/dir"),
        None if url.contains("://") => {
            bail!("unsupported source URL scheme in {url:?}: this build knows file:// and local paths")
        }
        None => Ok(std::path::absolute(url)?),
    }
}

fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(root)?.into())
}

impl LocalBackend {
    pub fn open(root: &Path) -> anyhow::Result<LocalBackend> {
        let fd = open_root(root)
            .with_context(|| format!("cannot open source directory {}", root.display()))?;
        if !std::fs::metadata(root)?.is_dir() {
            bail!("source {} is not a directory", root.display());
        }
        let root_uid = sysfs::fstat(fd.as_fd())?.st_uid;
        Ok(LocalBackend {
            root_uid,
            root: root.to_path_buf(),
            root_fd: RwLock::new(fd),
        })
    }

    fn open_object(&self, key: &[u8]) -> Result<OwnedFd, FetchError> {
        let attempt = |root: &OwnedFd| {
            sysfs::open_beneath(root.as_fd(), key, libc::O_RDONLY | libc::O_NONBLOCK)
        };
        let first = {
            let root = self.root_fd.read().unwrap_or_else(|p| p.into_inner());
            match attempt(&root) {
                Ok(fd) => return Ok(fd),
                Err(e) => (e, root_deleted(&root)),
            }
        };
        match first {
            // The source root was removed (and maybe put back): reopen it, but only as a real
            // directory owned by the same user as the one populate saw. A root swapped for a
            // symlink (to /etc, say) is refused, never followed.
            (_, true) => {
                let fresh = self.reopen_root().map_err(|_| FetchError::NotFound)?;
                let got = attempt(&fresh);
                *self.root_fd.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                got.map_err(classify)
            }
            (err, false) => Err(classify(err)),
        }
    }

    fn reopen_root(&self) -> std::io::Result<OwnedFd> {
        let dir = self.root.parent().unwrap_or(Path::new("/"));
        let name = self.root.file_name().unwrap_or_default();
        let parent: OwnedFd = std::fs::File::open(dir)?.into();
        let fd = sysfs::openat(
            parent.as_fd(),
            &sysfs::cstring(std::os::unix::ffi::OsStrExt::as_bytes(name))?,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        if sysfs::fstat(fd.as_fd())?.st_uid != self.root_uid {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(fd)
    }
}

/// Has the directory behind `root` been removed?
fn root_deleted(root: &OwnedFd) -> bool {
    sysfs::fstat(root.as_fd()).map_or(true, |st| st.st_nlink == 0)
}

fn classify(e: std::io::Error) -> FetchError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => FetchError::NotFound,
        Some(libc::ELOOP) | Some(libc::EXDEV) => FetchError::Escape,
        _ => FetchError::Io(e),
    }
}

impl LocalBackend {
    /// Open the object, proving it is still the file populate recorded.
    fn open_unchanged(&self, obj: &SourceRecord) -> Result<OwnedFd, FetchError> {
        let fd = self.open_object(&obj.key)?;
        let st = sysfs::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FetchError::Changed("no longer a regular file".into()));
        }
        let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
        if st.st_size as u64 != obj.size || mtime != obj.mtime {
            return Err(FetchError::Changed(format!(
                "size {} mtime {}.{:09}, recorded size {} mtime {}.{:09}",
                st.st_size, mtime.0, mtime.1, obj.size, obj.mtime.0, obj.mtime.1
            )));
        }
        Ok(fd)
    }
}

fn short_unless_all(offset: u64, want: usize, got: usize) -> Result<(), FetchError> {
    if got != want {
        return Err(FetchError::Short { offset, want, got });
    }
    Ok(())
}

impl Backend for LocalBackend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        let fd = self.open_unchanged(obj)?;
        let got = sysfs::pread_full(fd.as_fd(), buf, offset)?;
        short_unless_all(offset, buf.len(), got)
    }

    fn splice_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        len: usize,
        pipe: std::os::fd::BorrowedFd<'_>,
    ) -> Option<Result<(), FetchError>> {
        Some((|| {
            let fd = self.open_unchanged(obj)?;
            let got = sysfs::splice_into_pipe(fd.as_fd(), offset, pipe, len)?;
            short_unless_all(offset, len, got)
        })())
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
