//! The walk of a local source directory: every entry reproduced in the store's tree, relative
//! to open directory fds, directories in parallel. Hard-linked files are stubbed once and linked;
//! with `--digests` each file is read once to record its chunks' digests. Apart from stub making
//! because it is the one part of populate that reads a local tree.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::{bail, Context};
use rayon::prelude::*;

use super::report::progress_style;
use super::{display, join, Meta, Walk};
use crate::record::{SourceRecord, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;

/// BLAKE3 of each `chunk`-sized piece of the file's first `size` bytes.
pub(super) fn chunk_digests(
    fd: BorrowedFd<'_>,
    size: u64,
    chunk: u32,
) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut buf = vec![0u8; chunk as usize];
    let mut out = Vec::with_capacity(size.div_ceil(chunk as u64) as usize);
    let mut off = 0;
    while off < size {
        let len = (size - off).min(chunk as u64) as usize;
        let n = sysfs::pread_full(fd, &mut buf[..len], off)?;
        if n != len {
            bail!("the source file shrank while it was read");
        }
        out.push(crate::digest::chunk_digest(&buf[..len]));
        off += len as u64;
    }
    Ok(out)
}

fn open_dir(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    sysfs::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

impl Walk<'_> {
    /// Count the source's entries in a thread of its own (names only, no `stat`), and give the
    /// progress bar its total and an ETA once counted. Only when the bar is shown (stderr is a
    /// terminal): otherwise the count would cost and show nothing.
    pub(super) fn count_in_background(&self, root: &Path) {
        if self.progress.is_hidden() {
            return;
        }
        let (progress, done, root) = (self.progress.clone(), self.done.clone(), root.to_path_buf());
        let _ = std::thread::Builder::new()
            .name("populate-count".into())
            .spawn(move || {
                let mut n = 0u64;
                let mut dirs = vec![root];
                while let Some(dir) = dirs.pop() {
                    if done.load(Relaxed) {
                        return;
                    }
                    let Ok(rd) = std::fs::read_dir(&dir) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        n += 1;
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            dirs.push(e.path());
                        }
                    }
                }
                if !done.load(Relaxed) {
                    progress.set_length(n);
                    progress.set_style(progress_style(true));
                }
            });
    }

    /// Reproduce one directory entry; returns the subdirectories to walk next.
    fn entry(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        rel: &[u8],
        name_bytes: &[u8],
    ) -> Option<(CString, sysfs::Stat)> {
        let path = join(rel, name_bytes);
        let Ok(name) = CString::new(name_bytes) else {
            self.error(&path, "name contains NUL");
            return None;
        };
        let st = match sysfs::lstatat(src, &name) {
            Ok(st) => st,
            Err(e) => {
                self.error(&path, e);
                return None;
            }
        };
        self.progress.inc(1);
        let res = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                match sysfs::mkdirat(dst, &name, 0o700) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        match sysfs::lstatat(dst, &name) {
                            Ok(d) if d.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                            _ => {
                                self.error(
                                    &path,
                                    "refusing to replace an existing non-directory in STORE",
                                );
                                return None;
                            }
                        }
                    }
                    Err(e) => {
                        self.error(&path, e);
                        return None;
                    }
                }
                return Some((name, st));
            }
            libc::S_IFREG => self.file(src, dst, &name, &path, &st),
            libc::S_IFLNK => self.symlink(src, dst, &name, &path, &st),
            _ => {
                self.skipped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(display(&path));
                Ok(())
            }
        };
        if let Err(e) = res {
            self.error(&path, format!("{e:#}"));
        }
        None
    }

    pub(super) fn dir(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &[u8]) {
        let entries = match std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&src)
        )) {
            Ok(e) => e,
            Err(e) => return self.error(rel, format!("cannot list directory: {e}")),
        };
        // Names first (one directory's worth of memory), then the entries in parallel: a
        // directory of many files is as parallel as a tree of many directories.
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) => {
                    self.error(rel, format!("cannot list directory: {e}"));
                    break;
                }
            }
        }
        self.sweep_staging(dst, rel, |n| names.iter().any(|s| s.as_bytes() == n));
        let subdirs: Vec<(CString, sysfs::Stat)> = names
            .par_iter()
            .with_min_len(64)
            .filter_map(|name_os| self.entry(src, dst, rel, name_os.as_bytes()))
            .collect();
        subdirs.into_par_iter().for_each(|(name, st)| {
            let path = join(rel, name.as_bytes());
            let (s, d) = match (open_dir(src, &name), open_dir(dst, &name)) {
                (Ok(s), Ok(d)) => (s, d),
                (Err(e), _) | (_, Err(e)) => {
                    return self.error(&path, format!("cannot open directory: {e}"))
                }
            };
            self.counters.dirs.fetch_add(1, Relaxed);
            self.dir(s.as_fd(), d.as_fd(), &path);
            // After the children: creating them moved the directory's mtime.
            self.set_meta(d.as_fd(), None, &Meta::of(&st), &path);
        });
    }

    fn symlink(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &sysfs::Stat,
    ) -> anyhow::Result<()> {
        let target = sysfs::readlinkat(src, name)?;
        match sysfs::symlinkat(&target, dst, name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if sysfs::readlinkat(dst, name).ok().as_deref() == Some(&target[..]) {
                    self.keep_symlink(dst, name, &Meta::of(st), rel);
                    return Ok(());
                }
                bail!(
                    "refusing to replace an existing entry in STORE that is not the same symlink"
                );
            }
            Err(e) => return Err(e.into()),
        }
        self.set_meta(dst, Some(name), &Meta::of(st), rel);
        self.counters.symlinks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn file(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &sysfs::Stat,
    ) -> anyhow::Result<()> {
        if st.st_nlink > 1 {
            let cell = self
                .links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((st.st_dev, st.st_ino))
                .or_default()
                .clone();
            let mut made_here = false;
            let first = cell.get_or_init(|| {
                made_here = true;
                match self.stub_local(src, dst, name, rel, st) {
                    Ok(()) => Some(rel.to_vec()),
                    Err(e) => {
                        self.error(rel, format!("{e:#}"));
                        None
                    }
                }
            });
            if made_here {
                return Ok(());
            }
            let Some(first) = first else {
                bail!("not linked: the first name of this hard-linked file failed");
            };
            let first = CString::new(first.clone())?;
            match sysfs::linkat(self.tree.as_fd(), &first, dst, name) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    if !self.relink(dst, name, &first)? {
                        self.counters.kept.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
            self.counters.hard_links.fetch_add(1, Relaxed);
            return Ok(());
        }
        self.stub_local(src, dst, name, rel, st)
    }

    /// A later name of a hard-linked source file is taken. The same inode as the first name:
    /// keep it (`false`). A stub of its own that was never filled (made by an earlier, interrupted
    /// run that stubbed this name first): replace it with a link to the first name (`true`).
    /// A stub holding fetched or local content is kept; anything else is refused.
    fn relink(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        first: &std::ffi::CStr,
    ) -> anyhow::Result<bool> {
        let want = sysfs::lstatat(self.tree.as_fd(), first)?;
        let have = sysfs::lstatat(dst, name)?;
        if (have.st_dev, have.st_ino) == (want.st_dev, want.st_ino) {
            return Ok(false);
        }
        let fd = sysfs::openat(dst, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .context("refusing to replace an existing entry in STORE that is not a regular file")?;
        if sysfs::fstat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("refusing to replace an existing entry in STORE that is not a regular file");
        }
        let Some(raw) = sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE)? else {
            bail!("refusing to overwrite a file in STORE that is not an hsm stub");
        };
        SourceRecord::decode(&raw).context("existing stub has a corrupt record")?;
        if sysfs::fgetxattr(fd.as_fd(), XATTR_STATE)?.is_some() {
            return Ok(false);
        }
        drop(fd);
        sysfs::unlinkat(dst, name)?;
        sysfs::linkat(self.tree.as_fd(), first, dst, name)?;
        Ok(true)
    }

    /// A local source file: with `--digests`, read it once to record a digest per chunk.
    fn stub_local(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &sysfs::Stat,
    ) -> anyhow::Result<()> {
        let digests = match &self.digest_dir {
            Some(dir) if st.st_size > 0 => {
                let f = sysfs::openat(src, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                let list = chunk_digests(f.as_fd(), st.st_size as u64, self.opts.chunk_size)
                    .context("cannot read the source file to digest it")?;
                Some(crate::digest::write_list(dir, &list)?)
            }
            _ => None,
        };
        self.stub_with(dst, name, rel, &Meta::of(st), digests)
    }
}
