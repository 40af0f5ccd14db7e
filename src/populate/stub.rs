//! Making one stub: whole (size as sparse or cloned zero blocks, source record, owner, mode,
//! times) before it has a name, then linked at its name, so that no path ever reaches a stub
//! without its record; and deciding what to do with an entry already at that name. Shared by the
//! local walk and remote sources, and apart from both because it is where populate's safety
//! (never overwrite what it did not make, never leave half a stub) lives.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::{bail, Context};

use super::{join, Walk};
use crate::record::{SourceRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::store::clone_zeros;
use crate::sys::fs as sysfs;

/// The prefix of the names stubs are made under where `O_TMPFILE` is not supported.
pub const STAGING_PREFIX: &str = ".hsm-staging.";

/// `.hsm-staging.<pid, hex>.<sequence number, hex>`.
pub(crate) fn is_staging_name(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(STAGING_PREFIX.as_bytes()) else {
        return false;
    };
    let hex = |p: &[u8]| !p.is_empty() && p.len() <= 16 && p.iter().all(u8::is_ascii_hexdigit);
    let mut parts = rest.split(|&b| b == b'.');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if hex(a) && hex(b))
}

/// A fresh staging name: `.hsm-staging.<pid, hex>.<sequence number, hex>`.
fn staging_name() -> anyhow::Result<CString> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    Ok(CString::new(format!(
        "{STAGING_PREFIX}{:x}.{:x}",
        std::process::id(),
        SEQ.fetch_add(1, Relaxed)
    ))?)
}

/// Testing: make stubs under staging names even where `O_TMPFILE` works.
pub(super) const STAGING_ENV: &str = "HSM_POPULATE_STAGING";

/// A stub made, not yet at its name.
struct Made {
    file: File,
    /// Its staging name in its directory; `None`: unnamed (`O_TMPFILE`).
    staged: Option<CString>,
}

impl Made {
    /// Give it `name` in `dir`, unless something is there (`EEXIST`).
    fn publish(&self, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<()> {
        match &self.staged {
            None => sysfs::link_fd(self.file.as_fd(), dir, name),
            Some(staged) => sysfs::rename_noreplace(dir, staged, dir, name),
        }
    }

    /// Drop it (an unnamed file is gone when closed; a staged one is unlinked).
    fn discard(self, dir: BorrowedFd<'_>) {
        if let Some(staged) = &self.staged {
            let _ = sysfs::unlinkat(dir, staged);
        }
    }
}

/// What a stub, directory or symlink looks like, whichever kind of source it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: sysfs::Timespec,
    pub mtime: sysfs::Timespec,
    /// The source's identity for the object (ETag), recorded in its SourceRecord.
    pub version: Option<String>,
}

impl Meta {
    pub(crate) fn of(st: &sysfs::Stat) -> Meta {
        Meta {
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: sysfs::atime_of(st),
            mtime: sysfs::mtime_of(st),
            version: None,
        }
    }
}

impl Walk<'_> {
    /// Remove the unfinished stubs an interrupted populate left under staging names in `dst`:
    /// regular files named as [`create_unnamed`](Self::create_unnamed) names them, whose names the
    /// source does not have (`in_source` says which names it has), with no state record, and
    /// either a source record or, killed before it was written, still root's, mode 0600, with
    /// one link.
    pub(super) fn sweep_staging(
        &self,
        dst: BorrowedFd<'_>,
        rel: &[u8],
        in_source: impl Fn(&[u8]) -> bool,
    ) {
        let Ok(rd) = std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dst)
        )) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.as_bytes();
            if !is_staging_name(name) || in_source(name) {
                continue;
            }
            let Ok(cname) = CString::new(name) else {
                continue;
            };
            let Ok(fd) = sysfs::openat(dst, &cname, libc::O_RDONLY | libc::O_NONBLOCK, 0) else {
                continue;
            };
            let Ok(st) = sysfs::fstat(fd.as_fd()) else {
                continue;
            };
            let ours = st.st_mode & libc::S_IFMT == libc::S_IFREG
                && matches!(sysfs::fgetxattr(fd.as_fd(), XATTR_STATE), Ok(None))
                && match sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE) {
                    Ok(Some(raw)) => SourceRecord::decode(&raw).is_ok(),
                    Ok(None) => st.st_uid == 0 && st.st_mode & 0o7777 == 0o600 && st.st_nlink == 1,
                    Err(_) => false,
                };
            drop(fd);
            if ours {
                match sysfs::unlinkat(dst, &cname) {
                    Ok(()) => {
                        self.counters.staging_removed.fetch_add(1, Relaxed);
                    }
                    Err(e) => self.error(
                        &join(rel, name),
                        format!("cannot remove an unfinished stub: {e}"),
                    ),
                }
            }
        }
    }

    /// Owner, mode, times. Owner first: chown clears set-id bits.
    pub(super) fn set_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: Option<&std::ffi::CStr>,
        m: &Meta,
        rel: &[u8],
    ) {
        let res = (|| -> std::io::Result<()> {
            sysfs::chown(dir, name, m.uid, m.gid)?;
            if name.is_none() {
                sysfs::fchmod(dir, m.mode & 0o7777)?;
            }
            sysfs::set_times(dir, name, m.atime, m.mtime)
        })();
        if let Err(e) = res {
            self.error(rel, format!("cannot set owner, mode or times: {e}"));
        }
    }

    /// The same symlink is already there: keep it, and give it the owner and times a run
    /// interrupted between making it and setting them did not.
    pub(super) fn keep_symlink(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        m: &Meta,
        rel: &[u8],
    ) {
        self.counters.kept.fetch_add(1, Relaxed);
        if let Ok(have) = sysfs::lstatat(dst, name) {
            if (have.st_uid, have.st_gid, sysfs::mtime_of(&have)) != (m.uid, m.gid, m.mtime) {
                self.set_meta(dst, Some(name), m, rel);
            }
        }
    }

    /// Make the stub `name` in `dst` for the source object `rel`, or keep the one already there.
    pub(super) fn stub(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        m: &Meta,
    ) -> anyhow::Result<()> {
        self.stub_with(dst, name, rel, m, None)
    }

    /// The source record of a stub of `rel` as `m` describes it.
    fn record_for(&self, rel: &[u8], m: &Meta, digests: Option<[u8; 32]>) -> SourceRecord {
        let size = m.size;
        let kind = if self.fs.reflinks() && size >= self.opts.whole_below {
            StubKind::Cloned
        } else if self.opts.lazy_sparse && !self.fs.reflinks() {
            StubKind::SparseLazy
        } else {
            StubKind::Sparse
        };
        SourceRecord {
            key: rel.to_vec(),
            size,
            mtime: (m.mtime.0, m.mtime.1 as u32),
            version: m.version.clone(),
            chunk_size: self.opts.chunk_size,
            kind,
            digests,
        }
    }

    /// A whole stub of `rel` under a fresh staging name in `dir` (for `hsm sync`, which then
    /// swaps it with the old version at its name), synced when `durable`; returns that name and
    /// the stub.
    pub(super) fn stub_staged(
        &self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        m: &Meta,
        digests: Option<[u8; 32]>,
        durable: bool,
    ) -> anyhow::Result<(CString, File)> {
        let record = self.record_for(rel, m, digests);
        let made = self.make(dir, &record, m)?;
        let name = match &made.staged {
            Some(name) => name.clone(),
            None => loop {
                let name = staging_name()?;
                match sysfs::link_fd(made.file.as_fd(), dir, &name) {
                    Ok(()) => break name,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            },
        };
        if durable {
            if let Err(e) = sysfs::fsync(made.file.as_fd()) {
                let _ = sysfs::unlinkat(dir, &name);
                return Err(e).context("cannot sync the new stub");
            }
        }
        Ok((name, made.file))
    }

    pub(super) fn stub_with(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        m: &Meta,
        digests: Option<[u8; 32]>,
    ) -> anyhow::Result<()> {
        let record = self.record_for(rel, m, digests);
        let (size, kind) = (record.size, record.kind);
        // Made whole before it has a name (see the module's documentation): no path, and so no
        // user or daemon, ever reaches a stub without its record, owner, mode and times.
        let made = self.make(dst, &record, m)?;
        let published = match made.publish(dst, name) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self
                .replace_existing(dst, name, &record)
                .and_then(|replace| {
                    if replace {
                        made.publish(dst, name)?;
                    }
                    Ok(replace)
                }),
            Err(e) => Err(e.into()),
        };
        match published {
            Ok(true) => {}
            Ok(false) => {
                made.discard(dst);
                self.counters.kept.fetch_add(1, Relaxed);
                return Ok(());
            }
            Err(e) => {
                made.discard(dst);
                return Err(e);
            }
        }
        match kind {
            _ if size == 0 => &self.counters.empty,
            StubKind::Cloned => &self.counters.cloned,
            StubKind::Sparse | StubKind::SparseLazy => &self.counters.sparse,
        }
        .fetch_add(1, Relaxed);
        self.counters.files.fetch_add(1, Relaxed);
        self.counters.bytes.fetch_add(size, Relaxed);
        Ok(())
    }

    /// A new file in `dir` with no name (`O_TMPFILE`), with the permission bits `mode` (less
    /// the umask): no path reaches it before it is whole, and a mode right from the start saves
    /// most stubs a `fchmod` (a transaction of its own). Where `O_TMPFILE` is refused, under a
    /// fresh staging name instead, mode 0600 and root's until its owner and mode are set: a
    /// daemon serving the tree already shows that name.
    fn create_unnamed(&self, dir: BorrowedFd<'_>, mode: u32) -> anyhow::Result<Made> {
        if self.tmpfile.load(Relaxed) {
            match sysfs::open_tmpfile(dir, mode & 0o777) {
                Ok(fd) => {
                    return Ok(Made {
                        file: fd.into(),
                        staged: None,
                    })
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                    ) =>
                {
                    self.tmpfile.store(false, Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            let staged = staging_name()?;
            match sysfs::openat(
                dir,
                &staged,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            ) {
                Ok(fd) => {
                    return Ok(Made {
                        file: fd.into(),
                        staged: Some(staged),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A whole stub, not yet at its name: size (sparse or cloned zero blocks), record, owner,
    /// mode, times.
    fn make(&self, dir: BorrowedFd<'_>, record: &SourceRecord, m: &Meta) -> anyhow::Result<Made> {
        let made = self.create_unnamed(dir, m.mode)?;
        let file = &made.file;
        let size = record.size;
        let res = (|| -> anyhow::Result<()> {
            match record.kind {
                _ if size == 0 => {}
                StubKind::Cloned => {
                    let pool = self.pool.as_ref().context("zero pool missing")?;
                    clone_zeros(pool, file, size)
                        .context("cannot clone zero blocks into the stub")?;
                }
                StubKind::Sparse | StubKind::SparseLazy => {
                    sysfs::ftruncate(file.as_fd(), size)?;
                }
            }
            sysfs::fsetxattr(file.as_fd(), XATTR_SOURCE, &record.encode())
                .context("cannot write the stub's record (trusted.* xattrs need root)")?;
            // A chown is a journal transaction even when nothing changes; a new file often has
            // its owner already (root's trees populated by root), and an fstat costs next to
            // nothing.
            let made = sysfs::fstat(file.as_fd())?;
            let chown = (made.st_uid, made.st_gid) != (m.uid, m.gid);
            if chown {
                sysfs::chown(file.as_fd(), None, m.uid, m.gid)?;
            }
            // After the chown, which clears set-id bits.
            if chown || made.st_mode & 0o7777 != m.mode & 0o7777 {
                sysfs::fchmod(file.as_fd(), m.mode & 0o7777)?;
            }
            sysfs::set_times(file.as_fd(), None, m.atime, m.mtime)?;
            Ok(())
        })();
        match res {
            Ok(()) => Ok(made),
            Err(e) => {
                made.discard(dir);
                Err(e)
            }
        }
    }

    /// An entry already at this name. Our stub of the same source file: keep it (`false`). Our
    /// stub of a file that changed at the source and was never filled: remove it so it is made
    /// again (`true`). Anything else is refused: populate never overwrites what it did not make.
    fn replace_existing(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        want: &SourceRecord,
    ) -> anyhow::Result<bool> {
        // O_NONBLOCK: a FIFO planted at the name must not hang the walk.
        let fd = sysfs::openat(dst, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .context("refusing to replace an existing entry in STORE that is not a regular file")?;
        if sysfs::fstat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("refusing to replace an existing entry in STORE that is not a regular file");
        }
        let Some(raw) = sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE)? else {
            bail!("refusing to overwrite a file in STORE that is not an hsm stub");
        };
        let have = SourceRecord::decode(&raw).context("existing stub has a corrupt record")?;
        if have.key == want.key
            && have.size == want.size
            && have.mtime == want.mtime
            && have.version == want.version
        {
            return Ok(false);
        }
        if sysfs::fgetxattr(fd.as_fd(), XATTR_STATE)?.is_some() {
            bail!("changed at the source since it was stubbed, but the stub holds fetched or local content; kept as it is");
        }
        drop(fd);
        sysfs::unlinkat(dst, name)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_told_from_source_names() {
        assert!(is_staging_name(b".hsm-staging.1f2e.0"));
        assert!(is_staging_name(b".hsm-staging.ffffffff.123abc"));
        for name in [
            &b".hsm-staging."[..],
            b".hsm-staging.12",
            b".hsm-staging.12.",
            b".hsm-staging.12.3.4",
            b".hsm-staging.xyz.1",
            b".hsm-staging.notes.txt",
            b"hsm-staging.1.2",
            b"file.txt",
        ] {
            assert!(
                !is_staging_name(name),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }
}
