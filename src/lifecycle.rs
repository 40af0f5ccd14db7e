//! Giving space back: release (a file becomes a stub again) and pins (a file that is kept).
//!
//! A release must never let a reader see stub bytes as content, whatever races it. The order:
//! 1. The daemon forgets the file (its cached fds closed, its pending state written).
//! 2. A write lease on the file (`F_SETLEASE`): refused while any other open file description of
//!    the inode exists (an open fd, a mapping, a running exec, an access event in flight, which
//!    holds an fd), and while held, every new open waits. So from here to the end no reader has
//!    the file, and none can get it.
//! 3. The daemon forgets the file again (an open between 1 and 2 may have had it taken up), and
//!    the records are read again under the lease (a local write, a pin, may have come first).
//! 4. The ignore mark comes off and the published range is withdrawn: the next open or access
//!    is reported again, and goes to the engine.
//! 5. The state record says "nothing present" and is made durable (`fsync`) before any block is
//!    freed: after a crash at any point the record claims less than is on disk, never more.
//! 6. The blocks are given back the way the stub was made: a hole punched in a sparse stub,
//!    zero blocks cloned over a cloned one (which stays non-sparse, so copy tools still read it).
//! 7. The times are put back, the lease let go: the opens that waited go on, and fetch again.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::event::MASK;
use crate::published::{FileId, PublishedRanges};
use crate::record::{SourceRecord, StateRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fanotify::Group;
use crate::sys::fs as sysfs;

/// Set on a pinned file: it is kept complete, never released or evicted.
pub const XATTR_PIN: &CStr = c"trusted.hsm.pin";

/// Why a file was not released. The file is untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it has local changes (its only copy is here)")]
    Modified,
    #[error("it is pinned (hsm unpin it first)")]
    Pinned,
    #[error("it is open or mapped by a process")]
    InUse,
    #[error("it is not a stub of this store (no source record)")]
    NotAStub,
    #[error("its records are unreadable: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Present bytes given back.
    Released {
        bytes: u64,
    },
    /// Nothing was present.
    AlreadyStub,
    Refused(Refusal),
}

/// What a release needs besides the file.
pub struct Releaser<'a> {
    /// The group whose ignore marks silence complete files (the daemon's, or the guard's).
    pub group: Option<&'a Group>,
    /// The daemon's published ranges, when it runs.
    pub published: Option<&'a PublishedRanges>,
    /// The store's zero pool, for cloned stubs.
    pub zero_pool: Option<&'a File>,
    /// Forget the file in the fetch engine (close its cached fds, write its pending state);
    /// `false` when the engine is using it.
    pub forget: &'a (dyn Fn(BorrowedFd<'_>) -> bool + Sync),
}

/// The file's records, or why it cannot be released.
fn records(fd: BorrowedFd<'_>) -> Result<(SourceRecord, StateRecord), Refusal> {
    let corrupt = |e: String| Refusal::Corrupt(e);
    let raw = sysfs::fgetxattr(fd, XATTR_SOURCE)
        .map_err(|e| corrupt(e.to_string()))?
        .ok_or(Refusal::NotAStub)?;
    let source = SourceRecord::decode(&raw).map_err(|e| corrupt(e.to_string()))?;
    let state = match sysfs::fgetxattr(fd, XATTR_STATE).map_err(|e| corrupt(e.to_string()))? {
        Some(raw) => StateRecord::decode(&raw, &source).map_err(|e| corrupt(e.to_string()))?,
        None => source.fresh_state(),
    };
    Ok((source, state))
}

/// Whether the file may be released, from its records and its size now.
fn check(fd: BorrowedFd<'_>, source: &SourceRecord, state: &StateRecord) -> Result<(), Refusal> {
    let st = sysfs::fstat(fd).map_err(|e| Refusal::Corrupt(e.to_string()))?;
    let size = st.st_size as u64;
    // A write in place moves only the mtime: the record cannot know of it.
    let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
    if state.changed_locally(source, size, mtime) {
        return Err(Refusal::Modified);
    }
    if is_pinned(fd) {
        return Err(Refusal::Pinned);
    }
    Ok(())
}

pub fn is_pinned(fd: BorrowedFd<'_>) -> bool {
    matches!(sysfs::fgetxattr(fd, XATTR_PIN), Ok(Some(_)))
}

/// Pin (`true`) or unpin the file. Only stubs are pinned.
pub fn set_pinned(fd: BorrowedFd<'_>, pinned: bool) -> anyhow::Result<()> {
    if sysfs::fgetxattr(fd, XATTR_SOURCE)?.is_none() {
        anyhow::bail!("{}", Refusal::NotAStub);
    }
    if pinned {
        sysfs::fsetxattr(fd, XATTR_PIN, b"1")?;
    } else {
        match sysfs::fremovexattr(fd, XATTR_PIN) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            r => r?,
        }
    }
    Ok(())
}

impl Releaser<'_> {
    /// Release the file `rel` of the tree (opened beneath `tree`, never through a symlink or `..`).
    pub fn release(&self, tree: BorrowedFd<'_>, rel: &[u8]) -> anyhow::Result<Outcome> {
        use anyhow::Context;
        // Read-only first: the checks need no write access, and a file being executed cannot
        // be opened for writing (ETXTBSY), which is "in use" anyway.
        let probe = sysfs::open_beneath(tree, rel, libc::O_RDONLY | libc::O_NONBLOCK)
            .context("cannot open it in the store")?;
        self.release_opened(probe, &|| {
            sysfs::open_beneath(tree, rel, libc::O_RDWR | libc::O_NONBLOCK)
        })
    }

    /// Release the file `probe` (opened read-only, through a view that raises no event) is; it
    /// is opened again for writing by `open_rw`.
    pub fn release_opened(
        &self,
        probe: OwnedFd,
        open_rw: &dyn Fn() -> std::io::Result<OwnedFd>,
    ) -> anyhow::Result<Outcome> {
        use anyhow::Context;
        let st = sysfs::fstat(probe.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(Outcome::Refused(Refusal::NotAStub));
        }
        let (source, state) = match records(probe.as_fd()) {
            Ok(r) => r,
            Err(refusal) => return Ok(Outcome::Refused(refusal)),
        };
        if let Err(refusal) = check(probe.as_fd(), &source, &state) {
            return Ok(Outcome::Refused(refusal));
        }
        if !(self.forget)(probe.as_fd()) {
            tracing::debug!("release: the fetch engine is using the file");
            return Ok(Outcome::Refused(Refusal::InUse));
        }
        drop(probe);
        let file: OwnedFd = match open_rw() {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                return Ok(Outcome::Refused(Refusal::InUse))
            }
            Err(e) => return Err(e).context("cannot open it for writing in the store"),
        };
        let fd = file.as_fd();
        // The same inode as checked: a rename in between is checked again below anyway.
        let lease = match sysfs::WriteLease::take(fd) {
            Ok(l) => l,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                tracing::debug!("release: no write lease: {e}");
                return Ok(Outcome::Refused(Refusal::InUse));
            }
            Err(e) => return Err(e).context("cannot take a write lease on it"),
        };
        // Under the lease: nothing can change the file now but this process. The engine may
        // have taken the file up again between the forget above and the lease (an open that
        // came and went: under FUSE every open asks it), with the records as they were then:
        // forgotten again, or it would go on answering from a state the release ends.
        if !(self.forget)(fd) {
            return Ok(Outcome::Refused(Refusal::InUse));
        }
        let (source, state) = match records(fd) {
            Ok(r) => r,
            Err(refusal) => return Ok(Outcome::Refused(refusal)),
        };
        if let Err(refusal) = check(fd, &source, &state) {
            return Ok(Outcome::Refused(refusal));
        }
        let present = state.present_bytes();
        let st = sysfs::fstat(fd)?;
        if let Some(group) = self.group {
            group
                .unignore_inode(fd, MASK)
                .context("cannot remove the file's ignore mark")?;
        }
        if let (Some(table), Some(id)) = (self.published, FileId::of(fd)) {
            table.withdraw(&id);
        }
        // A sparse stub holding blocks that its record does not claim: bytes fetched whose record
        // could not be written (a full disk fails the xattr write too). Freeing them is safe
        // (the record claims nothing), and it is what a full disk needs.
        let allocated = st.st_blocks as u64 * 512;
        let unclaimed = source.kind != StubKind::Cloned && allocated > 8192;
        if state.present.is_empty() && !unclaimed {
            return Ok(Outcome::AlreadyStub);
        }
        let present = if present > 0 { present } else { allocated };
        // No state record is a fresh stub's state (nothing present; `check` made sure the rest
        // of it is too): removed rather than rewritten, which needs no space on a full disk.
        match sysfs::fremovexattr(fd, XATTR_STATE) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            r => r.context("cannot remove the state record")?,
        }
        // The record first, durably: a crash from here on leaves a record claiming nothing.
        sysfs::fsync(fd).context("cannot sync the state record")?;
        match source.kind {
            StubKind::Cloned => {
                let pool = self
                    .zero_pool
                    .context("the store's zero pool is needed to release a cloned stub")?;
                let dest = File::from(file.try_clone()?);
                crate::store::clone_zeros(pool, &dest, source.size)
                    .context("cannot clone zero blocks over it")?;
            }
            StubKind::Sparse | StubKind::SparseLazy => {
                sysfs::punch_hole(fd, 0, source.size.max(1)).context("cannot punch its blocks")?;
            }
        }
        // Freeing the blocks moved the times: put them back as the stub had them.
        sysfs::set_times(fd, None, sysfs::atime_of(&st), sysfs::mtime_of(&st))?;
        let _ = sysfs::fsync(fd);
        drop(lease);
        Ok(Outcome::Released { bytes: present })
    }
}
