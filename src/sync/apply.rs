//! The comparison of a [`Listing`] with the store's tree, and the changes that bring the tree up
//! to date. The rules (see the module above): new entries are made as populate makes them; a
//! file changed at the source with no local change becomes a new stub inode, swapped into place;
//! one removed at the source goes, unless changed here; unchanged ones are not touched (their
//! owner and mode follow the source); a file changed on both sides is a conflict, kept as it is
//! and marked (`trusted.hsm.conflict`).
//!
//! Why a swap and not a rewrite: a reader that has the old version open keeps that inode, with
//! its records, whole: it reads the old bytes, or fails (the source no longer has them) for
//! ranges never fetched, never a mix of versions. The new stub is made whole under a staging
//! name first, and synced (one `syncfs` for a directory's changed files, not an `fsync` each:
//! 1,000 changes took 8.1 s with one `fsync` per stub); `RENAME_EXCHANGE` then swaps the two names, so the old version is still
//! linked (under the staging name) while it is checked once more for a local write that came
//! after the first check: then the swap is undone and the file is a conflict. Only then is the
//! old version unlinked (its blocks go back when its last reader closes it). A removal renames
//! the file to a staging name the same way before it unlinks it. A sync killed at any point
//! leaves each name with the old or the new version, whole, and at worst a staging name, which
//! the next sync (or populate) removes when it holds nothing of the user's.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use rayon::prelude::*;

use super::listing::{join, Listing, Node};
use super::{Change, ChangeKind, SyncReport, XATTR_CONFLICT};
use crate::populate::{is_staging_name, Meta, Stubber};
use crate::record::{SourceRecord, StateRecord, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;

/// What the tree is compared and changed with.
pub struct Syncer<'a> {
    pub stubber: &'a Stubber<'a>,
    pub tree: BorrowedFd<'a>,
    pub listing: &'a Listing,
    pub dry_run: bool,
    /// Tell the fetch engine (when a daemon serves the store) to let go of an inode.
    pub forget: &'a (dyn Fn(BorrowedFd<'_>) + Sync),
    /// A local source's root, for digests of new versions.
    pub source_root: Option<OwnedFd>,
    pub chunk_size: u32,
    pub digest_dir: PathBuf,
    /// The store records digests (populate --digests): new files get them too.
    pub store_digests: bool,
    pub report: Mutex<SyncReport>,
}

/// A regular file's records and whether it has local changes; `None`: no source record (the
/// user's own file).
struct Records {
    source: SourceRecord,
    changed_locally: bool,
}

fn records(fd: BorrowedFd<'_>) -> anyhow::Result<Option<Records>> {
    let Some(raw) = sysfs::fgetxattr(fd, XATTR_SOURCE)? else {
        return Ok(None);
    };
    let source = SourceRecord::decode(&raw).context("its source record is corrupt")?;
    let state = match sysfs::fgetxattr(fd, XATTR_STATE)? {
        Some(raw) => StateRecord::decode(&raw, &source).context("its state record is corrupt")?,
        None => source.fresh_state(),
    };
    let st = sysfs::fstat(fd)?;
    let changed_locally = state.changed_locally(
        &source,
        st.st_size as u64,
        (st.st_mtime, st.st_mtime_nsec as u32),
    );
    Ok(Some(Records {
        source,
        changed_locally,
    }))
}

/// The record describes the object the source lists as `m` (a listing that carries no version,
/// an HTTP manifest before its HEADs, compares size and mtime).
fn same_object(r: &SourceRecord, m: &Meta) -> bool {
    r.size == m.size
        && r.mtime == (m.mtime.0, m.mtime.1 as u32)
        && (m.version.is_none() || r.version == m.version)
}

fn cname(name: &[u8]) -> anyhow::Result<CString> {
    CString::new(name).context("a name with a NUL byte")
}

fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (b"", rel),
    }
}

fn is_under(rel: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || rel == dir || (rel.starts_with(dir) && rel.get(dir.len()) == Some(&b'/'))
}

/// A new version made beside the old one, not yet swapped in (see [`Syncer::prepare`]).
struct Prepared {
    name: CString,
    rel: Vec<u8>,
    meta: Meta,
    old: OwnedFd,
    staged: CString,
}

/// What stands at a name in the tree.
enum Here {
    Nothing,
    Dir,
    Symlink,
    File(OwnedFd),
    Other,
}

fn here(dir: BorrowedFd<'_>, name: &CStr) -> anyhow::Result<Here> {
    let st = match sysfs::lstatat(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Here::Nothing),
        Err(e) => return Err(e.into()),
    };
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Here::Dir,
        libc::S_IFLNK => Here::Symlink,
        libc::S_IFREG => Here::File(sysfs::openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_NONBLOCK,
            0,
        )?),
        _ => Here::Other,
    })
}

/// A fresh name to stage a swap under (populate sweeps such names too).
fn staging_name() -> CString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    CString::new(format!(
        "{}{:x}.s{:x}",
        crate::populate::STAGING_PREFIX,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
    .unwrap_or_default()
}

impl Syncer<'_> {
    fn note(&self, kind: ChangeKind, rel: &[u8]) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            ChangeKind::Added => r.added += 1,
            ChangeKind::Updated => r.updated += 1,
            ChangeKind::Removed => r.removed += 1,
        }
        r.changes.push(Change {
            kind,
            path: rel.to_vec(),
        });
    }

    fn unchanged(&self) {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unchanged += 1;
    }

    fn error(&self, rel: &[u8], e: impl std::fmt::Display) {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .errors
            .push(format!("{}: {e}", String::from_utf8_lossy(rel)));
    }

    /// A conflict at `rel`: reported, and marked on the file (`fd`) with what the source has.
    fn conflict(&self, rel: &[u8], fd: Option<BorrowedFd<'_>>, why: &str, source: Option<&Meta>) {
        if let (Some(fd), false) = (fd, self.dry_run) {
            let mark = serde_json::json!({
                "why": why,
                "size": source.map(|m| m.size),
                "mtime": source.map(|m| m.mtime),
                "version": source.and_then(|m| m.version.clone()),
            });
            if let Err(e) = sysfs::fsetxattr(fd, XATTR_CONFLICT, mark.to_string().as_bytes()) {
                self.error(rel, format!("cannot mark the conflict: {e}"));
            }
        }
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conflicts
            .push(format!("{}: {why}", String::from_utf8_lossy(rel)));
    }

    /// A conflict resolved (the user's file is again in line with the source): unmark it.
    fn clear_conflict(&self, fd: BorrowedFd<'_>) {
        if !self.dry_run {
            let _ = sysfs::fremovexattr(fd, XATTR_CONFLICT);
        }
    }

    fn unreadable(&self, rel: &[u8]) -> bool {
        self.listing.unreadable.iter().any(|u| is_under(rel, u))
    }

    /// Digests for a new version of `rel`, when the store records them (a local source only,
    /// as populate).
    fn digests_for(
        &self,
        rel: &[u8],
        m: &Meta,
        old: Option<&SourceRecord>,
    ) -> anyhow::Result<Option<[u8; 32]>> {
        let want = self.store_digests || old.is_some_and(|r| r.digests.is_some());
        let Some(src) = self.source_root.as_ref().filter(|_| want && m.size > 0) else {
            return Ok(None);
        };
        let f = sysfs::open_beneath(src.as_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK)
            .context("cannot open the source file to digest it")?;
        let list = crate::populate::chunk_digests(f.as_fd(), m.size, self.chunk_size)
            .context("cannot read the source file to digest it")?;
        Ok(Some(crate::digest::write_list(&self.digest_dir, &list)?))
    }

    /// Bring the tree up to date with the listing.
    pub fn run(&self) {
        // Directories, parents first (a parent's path sorts before its children's).
        let mut blocked: Vec<Vec<u8>> = Vec::new();
        let mut created: HashSet<Vec<u8>> = HashSet::new();
        for (rel, node) in &self.listing.nodes {
            let Node::Dir(_) = node else { continue };
            if rel.is_empty() || blocked.iter().any(|b| is_under(rel, b)) {
                continue;
            }
            match self.ensure_dir(rel, &created) {
                Ok(true) => {
                    created.insert(rel.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    self.error(rel, format!("{e:#}"));
                    blocked.push(rel.clone());
                }
            }
        }
        // What each directory of the source holds, by name.
        let mut by_dir: BTreeMap<&[u8], Vec<(&[u8], &Node)>> = BTreeMap::new();
        by_dir.entry(b"").or_default();
        for (rel, node) in &self.listing.nodes {
            if rel.is_empty() {
                by_dir.entry(b"").or_default();
                continue;
            }
            if let Node::Dir(_) = node {
                by_dir.entry(rel.as_slice()).or_default();
            }
            let (parent, name) = split(rel);
            by_dir.entry(parent).or_default().push((name, node));
        }
        by_dir.par_iter().for_each(|(dir, entries)| {
            if blocked.iter().any(|b| is_under(dir, b)) || self.unreadable(dir) {
                return;
            }
            if self.dry_run && created.contains(*dir) {
                for (name, node) in entries {
                    if !matches!(node, Node::Dir(_)) {
                        self.note(ChangeKind::Added, &join(dir, name));
                    }
                }
                return;
            }
            if let Err(e) = self.dir(dir, entries) {
                self.error(dir, format!("{e:#}"));
            }
        });
        if self.dry_run {
            return;
        }
        // Owners, modes and times of directories last, children first: changes move mtimes.
        for (rel, node) in self.listing.nodes.iter().rev() {
            let Node::Dir(m) = node else { continue };
            if blocked.iter().any(|b| is_under(rel, b)) {
                continue;
            }
            let fd = if rel.is_empty() {
                sysfs::reopen(self.tree, libc::O_RDONLY | libc::O_DIRECTORY)
            } else {
                sysfs::open_beneath(self.tree, rel, libc::O_RDONLY | libc::O_DIRECTORY)
            };
            match fd.and_then(|fd| sysfs::fstat(fd.as_fd()).map(|st| (fd, st))) {
                Ok((fd, st)) => {
                    if (st.st_mode & 0o7777, st.st_uid, st.st_gid)
                        != (m.mode & 0o7777, m.uid, m.gid)
                        || sysfs::mtime_of(&st) != m.mtime
                    {
                        self.stubber.set_meta(fd.as_fd(), None, m, rel);
                    }
                }
                Err(e) => self.error(rel, format!("cannot open directory: {e}")),
            }
        }
    }

    /// Make the directory `rel` if it is missing (`Ok(true)`: it is new). A file or symlink in
    /// its place goes first, unless it holds local changes.
    fn ensure_dir(&self, rel: &[u8], created: &HashSet<Vec<u8>>) -> anyhow::Result<bool> {
        let (parent, name) = split(rel);
        if self.dry_run && created.contains(parent) {
            self.note(ChangeKind::Added, rel);
            return Ok(true);
        }
        let pfd = self.open_dir(parent)?;
        let cname = cname(name)?;
        let kind = match here(pfd.as_fd(), &cname)? {
            Here::Dir => return Ok(false),
            Here::Nothing => ChangeKind::Added,
            Here::Symlink => {
                if !self.dry_run {
                    sysfs::unlinkat(pfd.as_fd(), &cname)?;
                }
                ChangeKind::Updated
            }
            Here::File(fd) => {
                if !self.remove_file(pfd.as_fd(), &cname, rel, fd, None, false)? {
                    anyhow::bail!("a file with local changes stands where the source now has a directory; kept");
                }
                ChangeKind::Updated
            }
            Here::Other => anyhow::bail!("a special file stands where the source has a directory"),
        };
        if !self.dry_run {
            sysfs::mkdirat(pfd.as_fd(), &cname, 0o700)?;
        }
        self.note(kind, rel);
        Ok(true)
    }

    fn open_dir(&self, rel: &[u8]) -> std::io::Result<OwnedFd> {
        if rel.is_empty() {
            sysfs::reopen(self.tree, libc::O_RDONLY | libc::O_DIRECTORY)
        } else {
            sysfs::open_beneath(self.tree, rel, libc::O_RDONLY | libc::O_DIRECTORY)
        }
    }

    /// One directory: its source entries against what the tree holds.
    fn dir(&self, rel: &[u8], entries: &[(&[u8], &Node)]) -> anyhow::Result<()> {
        let dfd = self.open_dir(rel).context("cannot open directory")?;
        let in_source: HashSet<&[u8]> = entries.iter().map(|(n, _)| *n).collect();
        let mut prepared = Vec::new();
        for (name, node) in entries {
            let path = join(rel, name);
            if self.unreadable(&path) {
                continue;
            }
            let res = match node {
                Node::Dir(_) => Ok(()),
                Node::File(m) => self.file(dfd.as_fd(), name, &path, m, &mut prepared),
                Node::Symlink(target, m) => self.symlink(dfd.as_fd(), name, &path, target, m),
            };
            if let Err(e) = res {
                self.error(&path, format!("{e:#}"));
            }
        }
        // The new versions of this directory's changed files, made durable at once (one
        // `syncfs` rather than an `fsync` each), then swapped in.
        if !prepared.is_empty() {
            if let Err(e) = sysfs::syncfs(dfd.as_fd()) {
                for p in prepared {
                    let _ = sysfs::unlinkat(dfd.as_fd(), &p.staged);
                    self.error(&p.rel, format!("cannot sync the new version: {e}"));
                }
            } else {
                for p in prepared {
                    let rel = p.rel.clone();
                    match self.swap_in(dfd.as_fd(), p) {
                        Ok(true) => self.note(ChangeKind::Updated, &rel),
                        Ok(false) => {}
                        Err(e) => self.error(&rel, format!("{e:#}")),
                    }
                }
            }
        }
        // What the tree has and the source does not.
        let names: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", dfd.as_raw_fd()))
            .context("cannot list directory")?
            .filter_map(|e| e.ok().map(|e| e.file_name().as_bytes().to_vec()))
            .filter(|n| !in_source.contains(n.as_slice()))
            .collect();
        for name in names {
            let path = join(rel, &name);
            if self.unreadable(&path) {
                continue;
            }
            if let Err(e) = self.extra(dfd.as_fd(), &name, &path) {
                self.error(&path, format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// The source has the file `rel` as `m`.
    fn file(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        m: &Meta,
        prepared: &mut Vec<Prepared>,
    ) -> anyhow::Result<()> {
        let cname = cname(name)?;
        match here(dir, &cname)? {
            Here::Nothing => {
                if !self.dry_run {
                    let digests = self.digests_for(rel, m, None)?;
                    self.stubber.stub(dir, &cname, rel, m, digests)?;
                }
                self.note(ChangeKind::Added, rel);
            }
            Here::File(fd) => return self.regular(&cname, rel, m, fd, prepared),
            Here::Symlink => {
                self.replace_with_stub(dir, &cname, rel, m)?;
                self.note(ChangeKind::Updated, rel);
            }
            Here::Dir => {
                if !self.remove_tree(dir, &cname, rel)? {
                    self.conflict(rel, None, "the source has a file where the tree has a directory with local files; kept", Some(m));
                    return Ok(());
                }
                if !self.dry_run {
                    let digests = self.digests_for(rel, m, None)?;
                    self.stubber.stub(dir, &cname, rel, m, digests)?;
                }
                self.note(ChangeKind::Updated, rel);
            }
            Here::Other => {
                self.conflict(
                    rel,
                    None,
                    "a special file stands where the source has a file; kept",
                    Some(m),
                );
            }
        }
        Ok(())
    }

    /// A regular file of the tree where the source has the file `m`.
    fn regular(
        &self,
        name: &CStr,
        rel: &[u8],
        m: &Meta,
        fd: OwnedFd,
        prepared: &mut Vec<Prepared>,
    ) -> anyhow::Result<()> {
        let Some(r) = records(fd.as_fd())? else {
            self.conflict(
                rel,
                Some(fd.as_fd()),
                "the source added a file where a local file (not a stub) stands; kept",
                Some(m),
            );
            return Ok(());
        };
        // A hard link's later names record the first name's key.
        let same = same_object(&r.source, m)
            && (r.source.key == rel
                || matches!(self.listing.nodes.get(&r.source.key), Some(Node::File(k)) if same_object(&r.source, k)));
        match (same, r.changed_locally) {
            (true, false) => {
                self.unchanged();
                let st = sysfs::fstat(fd.as_fd())?;
                if !self.dry_run
                    && (st.st_mode & 0o7777, st.st_uid, st.st_gid)
                        != (m.mode & 0o7777, m.uid, m.gid)
                {
                    // The owner first: chown clears set-id bits.
                    sysfs::chown(fd.as_fd(), None, m.uid, m.gid)?;
                    sysfs::fchmod(fd.as_fd(), m.mode & 0o7777)?;
                }
            }
            (true, true) => {
                // Changed here only: the local version stands.
                self.unchanged();
                if sysfs::fgetxattr(fd.as_fd(), XATTR_CONFLICT)?.is_some() {
                    self.clear_conflict(fd.as_fd());
                }
            }
            (false, true) => self.conflict(
                rel,
                Some(fd.as_fd()),
                "changed at the source and here; the local version is kept",
                Some(m),
            ),
            (false, false) => {
                let dir = self.open_dir(split(rel).0)?;
                if let Some(p) = self.prepare(dir.as_fd(), name, rel, m, fd, &r.source)? {
                    prepared.push(p);
                } else if self.dry_run {
                    self.note(ChangeKind::Updated, rel);
                }
            }
        }
        Ok(())
    }

    /// Put a new stub of `m` at `name`, in place of a symlink (nothing of the user's to lose:
    /// a plain rename over it).
    fn replace_with_stub(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        m: &Meta,
    ) -> anyhow::Result<bool> {
        if self.dry_run {
            return Ok(true);
        }
        let digests = self.digests_for(rel, m, None)?;
        let (staged, _file) = self.stubber.stub_staged(dir, rel, m, digests, true)?;
        if let Err(e) = sysfs::rename_replace(dir, &staged, name) {
            let _ = sysfs::unlinkat(dir, &staged);
            return Err(e.into());
        }
        Ok(true)
    }

    /// A new version of `rel` (at `name`), made whole under a staging name beside the old one
    /// (`old`, with its record `old_rec`), not yet synced nor swapped in. `None`: dry, or the
    /// old version has local changes after all (a conflict).
    fn prepare(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        m: &Meta,
        old: OwnedFd,
        old_rec: &SourceRecord,
    ) -> anyhow::Result<Option<Prepared>> {
        if self.dry_run {
            return Ok(None);
        }
        // The engine writes what it holds for the file (a local write it knows of), and lets go.
        (self.forget)(old.as_fd());
        if records(old.as_fd())?.is_none_or(|r| r.changed_locally) {
            self.conflict(
                rel,
                Some(old.as_fd()),
                "changed at the source and here; the local version is kept",
                Some(m),
            );
            return Ok(None);
        }
        let digests = self.digests_for(rel, m, Some(old_rec))?;
        let (staged, _file) = self.stubber.stub_staged(dir, rel, m, digests, false)?;
        Ok(Some(Prepared {
            name: name.to_owned(),
            rel: rel.to_vec(),
            meta: m.clone(),
            old,
            staged,
        }))
    }

    /// Swap a prepared new version (durable by now) into place. `Ok(false)`: the old version
    /// was written to meanwhile, and stays (a conflict).
    fn swap_in(&self, dir: BorrowedFd<'_>, p: Prepared) -> anyhow::Result<bool> {
        let Prepared {
            name,
            rel,
            meta,
            old,
            staged,
        } = p;
        if let Err(e) = sysfs::rename_exchange(dir, &staged, &name) {
            let _ = sysfs::unlinkat(dir, &staged);
            return Err(e).context("cannot swap the new version into place");
        }
        // The old version is under the staging name now: a local write that came after the
        // check in `prepare` undoes the swap.
        (self.forget)(old.as_fd());
        if records(old.as_fd())?.is_none_or(|r| r.changed_locally) {
            sysfs::rename_exchange(dir, &staged, &name).with_context(|| {
                format!(
                    "written to while it was replaced, and the swap could not be undone: the \
                     local version is at {}",
                    String::from_utf8_lossy(staged.as_bytes())
                )
            })?;
            let _ = sysfs::unlinkat(dir, &staged);
            self.conflict(
                &rel,
                Some(old.as_fd()),
                "written to here while the source's new version came; the local version is kept",
                Some(&meta),
            );
            return Ok(false);
        }
        sysfs::unlinkat(dir, &staged).context("cannot remove the old version")?;
        Ok(true)
    }

    /// The source has the symlink `rel` to `target`.
    fn symlink(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        target: &[u8],
        m: &Meta,
    ) -> anyhow::Result<()> {
        let cname = cname(name)?;
        let kind = match here(dir, &cname)? {
            Here::Nothing => ChangeKind::Added,
            Here::Symlink => {
                if sysfs::readlinkat(dir, &cname)? == target {
                    self.unchanged();
                    let st = sysfs::lstatat(dir, &cname)?;
                    if !self.dry_run
                        && ((st.st_uid, st.st_gid) != (m.uid, m.gid)
                            || sysfs::mtime_of(&st) != m.mtime)
                    {
                        self.stubber.set_meta(dir, Some(&cname), m, rel);
                    }
                    return Ok(());
                }
                ChangeKind::Updated
            }
            Here::File(fd) => {
                if !self.remove_file(dir, &cname, rel, fd, Some(m), false)? {
                    return Ok(());
                }
                ChangeKind::Updated
            }
            Here::Dir => {
                if !self.remove_tree(dir, &cname, rel)? {
                    self.conflict(rel, None, "the source has a symlink where the tree has a directory with local files; kept", Some(m));
                    return Ok(());
                }
                ChangeKind::Updated
            }
            Here::Other => {
                self.conflict(
                    rel,
                    None,
                    "a special file stands where the source has a symlink; kept",
                    Some(m),
                );
                return Ok(());
            }
        };
        if !self.dry_run {
            // Made beside, then renamed over whatever symlink is there: no moment without one.
            let staged = staging_name();
            sysfs::symlinkat(target, dir, &staged)?;
            self.stubber.set_meta(dir, Some(&staged), m, rel);
            if let Err(e) = sysfs::rename_replace(dir, &staged, &cname) {
                let _ = sysfs::unlinkat(dir, &staged);
                return Err(e.into());
            }
        }
        self.note(kind, rel);
        Ok(())
    }

    /// `name` (at `rel`) is in the tree and not in the source. Whether it is gone now.
    fn extra(&self, dir: BorrowedFd<'_>, name: &[u8], rel: &[u8]) -> anyhow::Result<bool> {
        let cname = cname(name)?;
        match here(dir, &cname)? {
            Here::Nothing => Ok(true),
            Here::Symlink => {
                if !self.dry_run {
                    sysfs::unlinkat(dir, &cname)?;
                }
                self.note(ChangeKind::Removed, rel);
                Ok(true)
            }
            Here::Dir => self.remove_tree(dir, &cname, rel),
            Here::File(fd) => {
                if is_staging_name(name) {
                    // Left by an interrupted sync or populate: an old version swapped out, or
                    // a new one never swapped in.
                    return self.remove_file(dir, &cname, rel, fd, None, true);
                }
                self.remove_file(dir, &cname, rel, fd, None, false)
            }
            // Not the source's: left alone.
            Here::Other => Ok(false),
        }
    }

    /// Remove the stub `fd` at `name` unless it has local changes (then a conflict, `Ok(false)`).
    /// A file that is not a stub is the user's own: kept, not a conflict. `quiet`: not counted
    /// (leftovers of an interrupted run). `instead`: what the source has at this path now.
    fn remove_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        fd: OwnedFd,
        instead: Option<&Meta>,
        quiet: bool,
    ) -> anyhow::Result<bool> {
        (self.forget)(fd.as_fd());
        let why = if instead.is_some() {
            "the source replaced it with a symlink, and it was changed here; the local version is kept"
        } else {
            "removed at the source, changed here; the local version is kept"
        };
        match records(fd.as_fd())? {
            None if instead.is_none() => {
                // The user's own file; kept. One marked as a conflict stays marked.
                return Ok(false);
            }
            None => {
                self.conflict(rel, Some(fd.as_fd()), why, instead);
                return Ok(false);
            }
            // A stub the user moved here (its record names another path, and this is no
            // leftover of ours): the user's own now, kept as it is.
            Some(r) if !quiet && instead.is_none() && r.source.key != rel => {
                if sysfs::fgetxattr(fd.as_fd(), XATTR_CONFLICT)?.is_some() {
                    self.clear_conflict(fd.as_fd());
                }
                return Ok(false);
            }
            Some(r) if r.changed_locally => {
                self.conflict(rel, Some(fd.as_fd()), why, instead);
                return Ok(false);
            }
            Some(_) => {}
        }
        if !self.dry_run {
            let staged = staging_name();
            sysfs::rename_noreplace(dir, name, dir, &staged)?;
            (self.forget)(fd.as_fd());
            if records(fd.as_fd())?.is_none_or(|r| r.changed_locally) {
                sysfs::rename_noreplace(dir, &staged, dir, name).with_context(|| {
                    format!(
                        "written to while it was removed, and it could not be put back: it is \
                         at {}",
                        String::from_utf8_lossy(staged.as_bytes())
                    )
                })?;
                self.conflict(rel, Some(fd.as_fd()), why, instead);
                return Ok(false);
            }
            sysfs::unlinkat(dir, &staged)?;
        }
        if quiet {
            self.report
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .leftovers_removed += 1;
        } else {
            self.note(ChangeKind::Removed, rel);
        }
        Ok(true)
    }

    /// Remove the directory `name` (at `rel`) and what it holds, but for local changes and
    /// files that are not stubs. Whether it is gone.
    fn remove_tree(&self, dir: BorrowedFd<'_>, name: &CStr, rel: &[u8]) -> anyhow::Result<bool> {
        let sub = sysfs::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let names: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().as_bytes().to_vec()))
            .collect();
        let mut all_gone = true;
        for n in names {
            let path = join(rel, &n);
            match self.extra(sub.as_fd(), &n, &path) {
                Ok(gone) => all_gone &= gone,
                Err(e) => {
                    all_gone = false;
                    self.error(&path, format!("{e:#}"));
                }
            }
        }
        if all_gone {
            if !self.dry_run {
                sysfs::rmdirat(dir, name)?;
            }
            self.note(ChangeKind::Removed, rel);
        }
        Ok(all_gone)
    }
}
