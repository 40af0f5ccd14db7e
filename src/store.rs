//! A store: the directory that holds the stub tree, the zero pool and the store's configuration.
//!
//! ```text
//! STORE/            mode 0700, root: no user path reaches the stubs except the daemon's mount
//!   tree/           the stub tree, exposed at MOUNTPOINT by `hsm serve`
//!   .hsm/config.json
//!   .hsm/zeros      shared zero blocks that cloned stubs are made of (xfs, btrfs)
//!   .hsm/metrics.json  the daemon's counters, rewritten while it runs and when it stops
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::sys::fs::{self as sysfs, FsKind};

pub const DEFAULT_CHUNK: u32 = 1 << 20;
/// Files below this size are fetched whole on first open; larger ones on reflink filesystems are
/// cloned stubs filled range by range.
pub const DEFAULT_WHOLE_BELOW: u64 = 4 << 20;
const ZERO_POOL_LEN: u64 = 16 << 20;
/// The configuration is written here, then renamed to `config.json`.
const CONFIG_TMP: &str = "config.json.tmp";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreConfig {
    pub version: u32,
    /// The source: a `file://` URL.
    pub source: String,
    pub fs: FsKind,
    pub chunk_size: u32,
    pub whole_below: u64,
    /// ext4 only: the user chose lazy range fetching, accepting that copy tools see holes.
    pub lazy_sparse: bool,
}

pub struct Store {
    pub root: PathBuf,
    pub config: StoreConfig,
}

pub fn filesystem_of(path: &Path) -> anyhow::Result<FsKind> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(sysfs::fs_kind(f.as_fd())?)
}

/// Refuse filesystems without pre-content events, with what to do instead.
pub fn check_supported(kind: FsKind, path: &Path) -> anyhow::Result<()> {
    match kind {
        FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs => Ok(()),
        other => bail!(
            "{} is on {}, which does not support fanotify pre-content events; \
             put the store on ext4, xfs or btrfs (a loop-mounted image will do)",
            path.display(),
            other.name()
        ),
    }
}

impl FsKind {
    pub fn reflinks(self) -> bool {
        matches!(self, FsKind::Xfs | FsKind::Btrfs)
    }
}

impl Store {
    pub fn config_path(root: &Path) -> PathBuf {
        root.join(".hsm/config.json")
    }

    pub fn tree(&self) -> PathBuf {
        self.root.join("tree")
    }

    /// The tree, opened: through the daemon's private view, opening stubs beneath it raises no
    /// event. Each of the daemon's parts holds its own.
    pub fn open_tree(&self) -> anyhow::Result<std::os::fd::OwnedFd> {
        Ok(File::open(self.tree())
            .with_context(|| format!("cannot open the store's tree {}", self.tree().display()))?
            .into())
    }

    pub fn meta(&self) -> PathBuf {
        self.root.join(".hsm")
    }

    pub fn zero_pool_path(&self) -> PathBuf {
        self.root.join(".hsm/zeros")
    }

    pub fn digest_dir(&self) -> PathBuf {
        self.root.join(".hsm/digests")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(".hsm/metrics.json")
    }

    /// Create a new store, or reopen an existing one made from the same source. A directory that
    /// is not empty and not a store is refused: populate never writes over files it did not make.
    pub fn create(root: &Path, mut config: StoreConfig) -> anyhow::Result<Store> {
        if root.exists() {
            if Store::config_path(root).exists() {
                let store = Store::open(root)?;
                store.check_private()?;
                if store.config.source != config.source {
                    bail!(
                        "{} is a store of {}, not of {}; use a new STORE directory",
                        root.display(),
                        store.config.source,
                        config.source
                    );
                }
                return Ok(store);
            }
            if !root.is_dir() {
                bail!("STORE {} exists and is not a directory", root.display());
            }
            if fs::read_dir(root)?.next().is_some() && !Store::unfinished(root)? {
                bail!(
                    "STORE {} is not empty and is not an hsm store; refusing to write into it",
                    root.display()
                );
            }
        } else {
            // Refuse an unsupported filesystem before leaving an empty STORE behind.
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                check_supported(filesystem_of(parent)?, root)?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(root)
                .with_context(|| format!("cannot create STORE {}", root.display()))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
        let kind = filesystem_of(root)?;
        check_supported(kind, root)?;
        config.fs = kind;
        if kind.reflinks() {
            config.lazy_sparse = false;
        }
        let store = Store {
            root: root.to_path_buf(),
            config,
        };
        // A populate killed while it made the store left some of these (see `unfinished`).
        let mkdir = |path: PathBuf, mode: u32| match fs::DirBuilder::new().mode(mode).create(&path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            other => other,
        };
        mkdir(store.meta(), 0o700)?;
        mkdir(store.digest_dir(), 0o700)?;
        mkdir(store.tree(), 0o755)?;
        if kind.reflinks() {
            store.make_zero_pool()?;
        }
        // The configuration last, whole or not at all: a store with one is complete.
        let tmp = store.meta().join(CONFIG_TMP);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&store.config)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, Store::config_path(root))?;
        Ok(store)
    }

    /// A store whose making was interrupted (populate killed before it wrote the configuration):
    /// nothing in it but what `create` makes before the configuration, with an empty tree and no
    /// digest list. `create` finishes it.
    fn unfinished(root: &Path) -> anyhow::Result<bool> {
        let names = |dir: &Path| -> std::io::Result<Vec<std::ffi::OsString>> {
            fs::read_dir(dir)?
                .map(|e| e.map(|e| e.file_name()))
                .collect()
        };
        let empty_dir = |dir: &Path| -> bool {
            fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
                && names(dir).is_ok_and(|n| n.is_empty())
        };
        let md = fs::symlink_metadata(root)?;
        if md.uid() != 0 {
            return Ok(false);
        }
        for name in names(root)? {
            let path = root.join(&name);
            let ok = match name.to_str() {
                Some("tree") => empty_dir(&path),
                Some(".hsm") => {
                    fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir())
                        && names(&path)?.iter().all(|n| match n.to_str() {
                            Some("digests") => empty_dir(&path.join("digests")),
                            Some("zeros") | Some(CONFIG_TMP) => {
                                fs::symlink_metadata(path.join(n)).is_ok_and(|m| m.is_file())
                            }
                            _ => false,
                        })
                }
                _ => false,
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn open(root: &Path) -> anyhow::Result<Store> {
        let path = Store::config_path(root);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not an hsm store (no {}); make one with `hsm populate SOURCE {}`",
                root.display(),
                path.display(),
                root.display()
            )
        })?;
        let config: StoreConfig = serde_json::from_str(&text)
            .with_context(|| format!("store configuration {} is malformed", path.display()))?;
        if config.version != 1 {
            bail!(
                "store version {} is not supported by this hsm",
                config.version
            );
        }
        if config.chunk_size == 0 || !config.chunk_size.is_multiple_of(4096) {
            bail!(
                "store chunk size {} is not a multiple of 4096",
                config.chunk_size
            );
        }
        let store = Store {
            root: root.to_path_buf(),
            config,
        };
        let actual = filesystem_of(root)?;
        if actual != store.config.fs {
            bail!(
                "store {} was made on {} but is now on {}; stubs do not survive a copy between \
                 filesystems, populate a new store",
                root.display(),
                store.config.fs.name(),
                actual.name()
            );
        }
        Ok(store)
    }

    /// STORE must be reachable by root only: otherwise users could read stub zeros directly.
    pub fn check_private(&self) -> anyhow::Result<()> {
        Store::check_private_at(&self.root)
    }

    fn make_zero_pool(&self) -> anyhow::Result<()> {
        let path = self.zero_pool_path();
        // One left by an interrupted `create` may be short: no stub was cloned from it yet.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // Real zero blocks, not fallocate: unwritten extents would read as holes to SEEK_DATA.
        let block = vec![0u8; 1 << 20];
        for _ in 0..ZERO_POOL_LEN / block.len() as u64 {
            f.write_all(&block)?;
        }
        f.sync_all()?;
        Ok(())
    }

    pub fn zero_pool(&self) -> anyhow::Result<File> {
        File::open(self.zero_pool_path()).context("the store's zero pool is missing")
    }
}

/// Make `file` `len` bytes long and read as data everywhere, by cloning zero blocks into it. The
/// last block is cloned whole (clones must be block-aligned) and the size is then cut back to
/// `len`, so that no tail of the file is a hole that `SEEK_HOLE` could report.
pub fn clone_zeros(pool: &File, file: &File, len: u64) -> std::io::Result<()> {
    let aligned = len.div_ceil(4096) * 4096;
    let mut off = 0;
    while off < aligned {
        let n = (aligned - off).min(ZERO_POOL_LEN);
        sysfs::clone_range(pool.as_fd(), 0, file.as_fd(), off, n)?;
        off += n;
    }
    sysfs::ftruncate(file.as_fd(), len)
}

/// Checks by path that open nothing (a stat raises no fanotify event), for `hsm serve`, which
/// must not open the store by its path before it holds the store's group (see `supervisor`).
impl Store {
    /// STORE holds a store's configuration.
    pub fn check_exists(root: &Path) -> anyhow::Result<()> {
        let path = Store::config_path(root);
        if !path.is_file() {
            bail!(
                "{} is not an hsm store (no {}); make one with `hsm populate SOURCE {}`",
                root.display(),
                path.display(),
                root.display()
            );
        }
        Ok(())
    }

    /// STORE (at `root`) must be reachable by root only: otherwise users could read stub zeros
    /// directly.
    pub fn check_private_at(root: &Path) -> anyhow::Result<()> {
        let md = fs::metadata(root)?;
        if md.uid() != 0 || md.mode() & 0o077 != 0 {
            bail!(
                "STORE {} is reachable by other users (owner uid {}, mode {:o}); \
                 run `chown root: {0} && chmod 700 {0}`",
                root.display(),
                md.uid(),
                md.mode() & 0o7777
            );
        }
        Ok(())
    }
}

/// The store's lock (`flock` on `.hsm/lock`): `hsm serve` holds it while it runs, and so does a
/// command that changes the store in its own process when no daemon serves it (`hsm hydrate`,
/// `release`, `pin`), so that two processes never fill or free one store's files at once. Let go
/// when dropped, or when its holder dies.
pub struct StoreLock(#[allow(dead_code)] File);

impl Store {
    /// Take the lock, saying in it who holds it; `Ok(Err(holder))` when another process holds it.
    pub fn try_lock(&self, holder: &str) -> anyhow::Result<Result<StoreLock, String>> {
        let path = self.meta().join("lock");
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open the store's lock {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {
                // Who holds it, for the message of whoever finds it taken; a full disk may
                // refuse the line, which changes nothing to the lock.
                let _ = (|| -> std::io::Result<()> {
                    use std::io::Seek;
                    f.set_len(0)?;
                    f.seek(std::io::SeekFrom::Start(0))?;
                    writeln!(f, "{holder} (pid {})", std::process::id())
                })();
                Ok(Ok(StoreLock(f)))
            }
            Err(fs::TryLockError::WouldBlock) => {
                let who = fs::read_to_string(&path).unwrap_or_default();
                Ok(Err(who.trim().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    /// The lock, for a command (`holder`) about to work on the store in its own process; or a
    /// connection to the daemon serving it, once one answers on the control socket of `tree`
    /// (the store's tree, as the user named it): go through the daemon then. A daemon whose
    /// worker is restarting (after a crash, or a kill) holds the lock but answers only a moment
    /// later: it is waited for, up to [`DAEMON_ANSWER_WAIT`], rather than refused (a cron job's
    /// `hsm sync` landing in that second would fail). Any other holder is refused at once.
    pub fn lock_unless_served(&self, holder: &str, tree: &Path) -> anyhow::Result<Worker> {
        let deadline = std::time::Instant::now() + DAEMON_ANSWER_WAIT;
        loop {
            let who = match self.try_lock(holder)? {
                Ok(lock) => return Ok(Worker::Here(lock)),
                Err(who) => who,
            };
            if let Some((client, _)) = crate::control::Client::find(tree)? {
                return Ok(Worker::Daemon(client));
            }
            let daemon = who.starts_with("hsm serve");
            if !daemon || std::time::Instant::now() >= deadline {
                bail!(
                    "the store {} is in use by {who}{}; try again when it is done",
                    tree.parent().unwrap_or(tree).display(),
                    if daemon {
                        ", whose control socket does not answer"
                    } else {
                        ""
                    }
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Who works on the store for a command (see [`Store::lock_unless_served`]).
pub enum Worker {
    /// This process, holding the store's lock.
    Here(StoreLock),
    /// The daemon serving it.
    Daemon(crate::control::Client),
}

/// How long a command waits for a serving daemon that holds the store's lock to answer on its
/// control socket: a worker restart takes about a second.
pub const DAEMON_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
