//! `hsm populate SOURCE STORE`: build the stub tree.
//!
//! Every file is created relative to an open directory fd with `O_NOFOLLOW`/`O_EXCL`, so a path
//! component swapped for a symlink mid-way makes that entry fail rather than write elsewhere, and
//! the source is read the same way. Directories are walked in parallel (rayon); memory holds one
//! directory's subdirectory names per level being walked, not the tree.
//!
//! How a stub is made (see the README, "Stubs and copy tools"):
//! - xfs, btrfs, files of `whole_below` bytes or more: reflinked zero blocks from the store's pool.
//!   They read as data to `SEEK_DATA`/`FIEMAP`, so copy tools read them and each range is fetched.
//! - every other file: sparse, and fetched whole when it is opened (other than for exec), so no
//!   tool can see its holes. On ext4 `--lazy-sparse` trades that guarantee for range fetching.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::backend::local::path_from_url;
use crate::record::{SourceRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::store::{clone_zeros, Store, StoreConfig};
use crate::sys::fs::{self as sysfs, FsKind};

#[derive(Clone, Debug)]
pub struct PopulateOptions {
    pub chunk_size: u32,
    pub whole_below: u64,
    pub lazy_sparse: bool,
    pub jobs: usize,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PopulateReport {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
    pub cloned_stubs: u64,
    pub sparse_stubs: u64,
    pub empty_files: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub kept_existing: u64,
    /// Sockets, FIFOs and device nodes: not reproduced (a device node in a tree exposed to users
    /// would be a way around their permissions), listed here.
    pub skipped_special: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Counters {
    dirs: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
    cloned: AtomicU64,
    sparse: AtomicU64,
    empty: AtomicU64,
    symlinks: AtomicU64,
    hard_links: AtomicU64,
    kept: AtomicU64,
}

/// The first path at which a hard-linked source inode was stubbed; later names link to it.
type LinkCell = Arc<OnceLock<Option<Vec<u8>>>>;

struct Walk<'a> {
    opts: &'a PopulateOptions,
    fs: FsKind,
    tree: OwnedFd,
    pool: Option<File>,
    counters: Counters,
    links: Mutex<HashMap<(u64, u64), LinkCell>>,
    skipped: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
    progress: ProgressBar,
}

fn display(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(rel.len() + 1 + name.len());
        v.extend_from_slice(rel);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

fn open_dir(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    sysfs::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub fn populate(
    source: &str,
    store_root: &Path,
    opts: &PopulateOptions,
) -> anyhow::Result<PopulateReport> {
    if opts.chunk_size == 0 || opts.chunk_size % 4096 != 0 {
        bail!("--chunk-size must be a positive multiple of 4096");
    }
    let src_path = path_from_url(source)?;
    let src_path = src_path.canonicalize().with_context(|| {
        format!(
            "source {} does not exist or cannot be reached",
            src_path.display()
        )
    })?;
    let src_md = std::fs::metadata(&src_path)?;
    if !src_md.is_dir() {
        bail!("source {} is not a directory", src_path.display());
    }
    if let Some(parent) = store_root.parent().filter(|p| !p.as_os_str().is_empty()) {
        let parent = parent.canonicalize().with_context(|| {
            format!(
                "the parent of STORE {} does not exist",
                store_root.display()
            )
        })?;
        if parent.starts_with(&src_path) {
            bail!(
                "STORE {} lies inside SOURCE {}; choose a store outside it",
                store_root.display(),
                src_path.display()
            );
        }
        if src_path.starts_with(parent.join(store_root.file_name().unwrap_or(OsStr::new("")))) {
            bail!("SOURCE lies inside STORE; choose a store outside it");
        }
    }
    let store = Store::create(
        store_root,
        StoreConfig {
            version: 1,
            source: format!("file://{}", src_path.display()),
            fs: FsKind::Other(0),
            chunk_size: opts.chunk_size,
            whole_below: opts.whole_below,
            lazy_sparse: opts.lazy_sparse,
        },
    )?;
    let fs = store.config.fs;
    eprintln!("{}", method_line(&store.config));
    let src_root: OwnedFd = File::open(&src_path)?.into();
    let tree: OwnedFd = File::open(store.tree())
        .with_context(|| format!("cannot open {}", store.tree().display()))?
        .into();
    let progress = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} {human_pos} entries ({per_sec}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let walk = Walk {
        opts,
        fs,
        tree: tree.try_clone()?,
        pool: if fs.reflinks() {
            Some(store.zero_pool()?)
        } else {
            None
        },
        counters: Counters::default(),
        links: Mutex::new(HashMap::new()),
        skipped: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        progress,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .stack_size(16 << 20)
        .build()?;
    pool.install(|| walk.dir(src_root.as_fd(), tree.as_fd(), b""));
    let root_st = sysfs::fstat(src_root.as_fd())?;
    walk.set_meta(tree.as_fd(), None, &root_st, b".");
    walk.progress.finish_and_clear();

    let c = &walk.counters;
    let report = PopulateReport {
        dirs: c.dirs.load(Relaxed),
        files: c.files.load(Relaxed),
        bytes: c.bytes.load(Relaxed),
        cloned_stubs: c.cloned.load(Relaxed),
        sparse_stubs: c.sparse.load(Relaxed),
        empty_files: c.empty.load(Relaxed),
        symlinks: c.symlinks.load(Relaxed),
        hard_links: c.hard_links.load(Relaxed),
        kept_existing: c.kept.load(Relaxed),
        skipped_special: std::mem::take(
            &mut *walk.skipped.lock().unwrap_or_else(|p| p.into_inner()),
        ),
        errors: std::mem::take(&mut *walk.errors.lock().unwrap_or_else(|p| p.into_inner())),
    };
    print_report(&report);
    if !report.errors.is_empty() {
        bail!(
            "{} entries could not be stubbed (listed above)",
            report.errors.len()
        );
    }
    Ok(report)
}

fn method_line(c: &StoreConfig) -> String {
    match c.fs {
        FsKind::Xfs | FsKind::Btrfs => format!(
            "store on {}: files of {} bytes or more become reflinked zero-block stubs, fetched range by \
             range; smaller files are sparse stubs fetched whole when opened",
            c.fs.name(),
            c.whole_below
        ),
        _ if c.lazy_sparse => format!(
            "store on {}: sparse stubs fetched range by range (--lazy-sparse): copy tools that trust \
             SEEK_DATA will copy unfetched ranges as zeros",
            c.fs.name()
        ),
        _ => format!(
            "store on {} (no reflink): sparse stubs, each fetched whole when opened (exec fetches range by range)",
            c.fs.name()
        ),
    }
}

fn print_report(r: &PopulateReport) {
    eprintln!(
        "populated {} files ({} bytes: {} cloned stubs, {} sparse stubs, {} empty), {} directories, \
         {} symlinks, {} hard links{}",
        r.files,
        r.bytes,
        r.cloned_stubs,
        r.sparse_stubs,
        r.empty_files,
        r.dirs,
        r.symlinks,
        r.hard_links,
        if r.kept_existing > 0 { format!(", {} existing stubs kept", r.kept_existing) } else { String::new() }
    );
    if !r.skipped_special.is_empty() {
        eprintln!(
            "skipped {} special files (sockets, FIFOs, devices):",
            r.skipped_special.len()
        );
        for p in r.skipped_special.iter().take(20) {
            eprintln!("  {p}");
        }
    }
    for e in r.errors.iter().take(50) {
        eprintln!("error: {e}");
    }
}

impl Walk<'_> {
    fn error(&self, rel: &[u8], what: impl std::fmt::Display) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {what}", display(rel)));
    }

    fn dir(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &[u8]) {
        let entries = match std::fs::read_dir(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&src)
        )) {
            Ok(e) => e,
            Err(e) => return self.error(rel, format!("cannot list directory: {e}")),
        };
        let mut subdirs: Vec<(CString, libc::stat)> = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.error(rel, format!("cannot list directory: {e}"));
                    break;
                }
            };
            let name_os = entry.file_name();
            let name_bytes = name_os.as_bytes();
            let path = join(rel, name_bytes);
            let Ok(name) = CString::new(name_bytes) else {
                self.error(&path, "name contains NUL");
                continue;
            };
            let st = match sysfs::lstatat(src, &name) {
                Ok(st) => st,
                Err(e) => {
                    self.error(&path, e);
                    continue;
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
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            self.error(&path, e);
                            continue;
                        }
                    }
                    subdirs.push((name, st));
                    Ok(())
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
        }
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
            self.set_meta(d.as_fd(), None, &st, &path);
        });
    }

    /// Owner, mode, times. Owner first: chown clears set-id bits.
    fn set_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: Option<&std::ffi::CStr>,
        st: &libc::stat,
        rel: &[u8],
    ) {
        let res = (|| -> std::io::Result<()> {
            sysfs::chown(dir, name, st.st_uid, st.st_gid)?;
            if name.is_none() {
                sysfs::fchmod(dir, st.st_mode & 0o7777)?;
            }
            sysfs::set_times(
                dir,
                name,
                (st.st_atime, st.st_atime_nsec),
                (st.st_mtime, st.st_mtime_nsec),
            )
        })();
        if let Err(e) = res {
            self.error(rel, format!("cannot set owner, mode or times: {e}"));
        }
    }

    fn symlink(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
    ) -> anyhow::Result<()> {
        let target = sysfs::readlinkat(src, name)?;
        match sysfs::symlinkat(&target, dst, name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if sysfs::readlinkat(dst, name).ok().as_deref() == Some(&target[..]) {
                    self.counters.kept.fetch_add(1, Relaxed);
                    return Ok(());
                }
                bail!(
                    "refusing to replace an existing entry in STORE that is not the same symlink"
                );
            }
            Err(e) => return Err(e.into()),
        }
        self.set_meta(dst, Some(name), st, rel);
        self.counters.symlinks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn file(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
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
                match self.stub(dst, name, rel, st) {
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
                    self.counters.kept.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            self.counters.hard_links.fetch_add(1, Relaxed);
            let _ = src;
            return Ok(());
        }
        self.stub(dst, name, rel, st)
    }

    fn stub(
        &self,
        dst: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        rel: &[u8],
        st: &libc::stat,
    ) -> anyhow::Result<()> {
        let size = st.st_size as u64;
        let kind = if self.fs.reflinks() && size >= self.opts.whole_below {
            StubKind::Cloned
        } else if self.opts.lazy_sparse && !self.fs.reflinks() {
            StubKind::SparseLazy
        } else {
            StubKind::Sparse
        };
        let record = SourceRecord {
            key: rel.to_vec(),
            size,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            version: None,
            chunk_size: self.opts.chunk_size,
            kind,
        };
        let create = || {
            sysfs::openat(
                dst,
                name,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            )
        };
        let fd = match create() {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if !self.replace_existing(dst, name, &record)? {
                    self.counters.kept.fetch_add(1, Relaxed);
                    return Ok(());
                }
                create()?
            }
            Err(e) => return Err(e.into()),
        };
        let file = File::from(fd);
        match kind {
            _ if size == 0 => {
                self.counters.empty.fetch_add(1, Relaxed);
            }
            StubKind::Cloned => {
                let pool = self.pool.as_ref().context("zero pool missing")?;
                clone_zeros(pool, &file, size).context("cannot clone zero blocks into the stub")?;
                self.counters.cloned.fetch_add(1, Relaxed);
            }
            StubKind::Sparse | StubKind::SparseLazy => {
                sysfs::ftruncate(file.as_fd(), size)?;
                self.counters.sparse.fetch_add(1, Relaxed);
            }
        }
        sysfs::fsetxattr(file.as_fd(), XATTR_SOURCE, &record.encode())
            .context("cannot write the stub's record (trusted.* xattrs need root)")?;
        sysfs::chown(file.as_fd(), None, st.st_uid, st.st_gid)?;
        sysfs::fchmod(file.as_fd(), st.st_mode & 0o7777)?;
        sysfs::set_times(
            file.as_fd(),
            None,
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
        )?;
        self.counters.files.fetch_add(1, Relaxed);
        self.counters.bytes.fetch_add(size, Relaxed);
        Ok(())
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
        let fd = sysfs::openat(dst, name, libc::O_RDONLY, 0)
            .context("refusing to replace an existing entry in STORE that is not a regular file")?;
        let Some(raw) = sysfs::fgetxattr(fd.as_fd(), XATTR_SOURCE)? else {
            bail!("refusing to overwrite a file in STORE that is not an hsm stub");
        };
        let have = SourceRecord::decode(&raw).context("existing stub has a corrupt record")?;
        if have.key == want.key && have.size == want.size && have.mtime == want.mtime {
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
