//! What the source holds now: every directory, file and symlink with its size, mode, owner,
//! times and version, by path. A local source is walked (directories in parallel, one `lstat`
//! per entry, nothing read); a remote one is listed (S3) or its manifest read (HTTP), by the same
//! code populate plans with. Apart from the comparison because it is the only part that talks
//! to the source, and because remote listings may come from another place later (a listing
//! trait in `backend`): [`list_source`] is the one function to swap.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use anyhow::{bail, Context};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::local::path_from_url;
use crate::backend::{scheme_of, Scheme};
use crate::populate::{Meta, PlanNode, PopulateOptions};
use crate::store::StoreConfig;
use crate::sys::fs as sysfs;

/// One entry of the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Dir(Meta),
    File(Meta),
    /// The target, as bytes.
    Symlink(Vec<u8>, Meta),
}

/// The source's entries by path relative to its root (bytes: names need not be UTF-8); the
/// root itself under the empty path.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Listing {
    pub nodes: BTreeMap<Vec<u8>, Node>,
    /// Entries not reproduced (special files, keys that cannot be paths), with why.
    pub skipped: Vec<String>,
    /// Entries that could not be read: their paths are left as they are in the tree.
    pub errors: Vec<String>,
    /// The paths of those entries (a directory: everything below it too).
    pub unreadable: Vec<Vec<u8>>,
    /// HTTP: file versions are not known yet (no HEAD); they are asked for only for the files
    /// that are new or changed (see [`crate::sync::run`]).
    pub versions_pending: bool,
}

/// The listing of the store's source. Remote sources are listed here and nowhere else in sync.
pub fn list_source(config: &StoreConfig, opts: &super::SyncOptions) -> anyhow::Result<Listing> {
    match scheme_of(&config.source) {
        Scheme::Local => {
            if opts.manifest.is_some() {
                bail!("--manifest is for remote sources");
            }
            list_local(&config.source, opts.threads)
        }
        scheme => {
            let popts = PopulateOptions {
                chunk_size: config.chunk_size,
                whole_below: config.whole_below,
                lazy_sparse: config.lazy_sparse,
                jobs: opts.threads,
                manifest: opts.manifest.clone(),
                ..PopulateOptions::default()
            };
            let plan = crate::populate::plan_for_sync(&config.source, &popts)?;
            let mut listing = Listing {
                skipped: plan.skipped,
                errors: plan.errors,
                versions_pending: scheme == Scheme::Http,
                ..Listing::default()
            };
            for (path, node) in plan.nodes {
                let node = match node {
                    PlanNode::Dir(m) => Node::Dir(m),
                    PlanNode::File(m) => Node::File(m),
                    PlanNode::Symlink(t, m) => Node::Symlink(t.into_bytes(), m),
                };
                listing.nodes.insert(path.into_bytes(), node);
            }
            // The tree's root is not the source's (populate gives it mode 0755 alone): it is
            // compared like any directory, its owner, mode and times left as they are.
            Ok(listing)
        }
    }
}

/// Walk a local source directory.
fn list_local(source: &str, threads: usize) -> anyhow::Result<Listing> {
    let root = path_from_url(source)?;
    let dir: OwnedFd = std::fs::File::open(&root)
        .with_context(|| {
            format!(
                "the source {} cannot be opened (moved or removed?)",
                root.display()
            )
        })?
        .into();
    let st = sysfs::fstat(dir.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        bail!("the source {} is not a directory", root.display());
    }
    let out = Mutex::new(Listing::default());
    lock(&out)
        .nodes
        .insert(Vec::new(), Node::Dir(Meta::of(&st)));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .stack_size(16 << 20)
        .build()?;
    pool.install(|| walk(dir.as_fd(), b"", &out));
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        [rel, b"/", name].concat()
    }
}

fn walk(dir: BorrowedFd<'_>, rel: &[u8], out: &Mutex<Listing>) {
    let names: Vec<Vec<u8>> = match std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
    {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.file_name().as_bytes().to_vec()))
            .collect(),
        Err(e) => {
            let mut out = lock(out);
            out.errors.push(format!(
                "{}: cannot list: {e}",
                String::from_utf8_lossy(rel)
            ));
            out.unreadable.push(rel.to_vec());
            return;
        }
    };
    let found: Vec<(Vec<u8>, Node)> = names
        .par_iter()
        .with_min_len(64)
        .filter_map(|name| {
            let path = join(rel, name);
            let res = (|| -> anyhow::Result<Option<Node>> {
                let cname = CString::new(name.as_slice())?;
                let st = sysfs::lstatat(dir, &cname)?;
                let m = Meta::of(&st);
                Ok(match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => Some(Node::Dir(m)),
                    libc::S_IFREG => Some(Node::File(m)),
                    libc::S_IFLNK => Some(Node::Symlink(sysfs::readlinkat(dir, &cname)?, m)),
                    _ => None,
                })
            })();
            match res {
                Ok(Some(node)) => Some((path, node)),
                Ok(None) => {
                    lock(out).skipped.push(format!(
                        "{}: a special file (socket, FIFO, device)",
                        String::from_utf8_lossy(&path)
                    ));
                    None
                }
                Err(e) => {
                    let mut out = lock(out);
                    out.errors
                        .push(format!("{}: {e:#}", String::from_utf8_lossy(&path)));
                    out.unreadable.push(path);
                    None
                }
            }
        })
        .collect();
    let subdirs: Vec<Vec<u8>> = found
        .iter()
        .filter(|(_, n)| matches!(n, Node::Dir(_)))
        .map(|(p, _)| p.clone())
        .collect();
    lock(out).nodes.extend(found);
    subdirs.par_iter().for_each(|path| {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        let sub = CString::new(name)
            .map_err(std::io::Error::other)
            .and_then(|c| sysfs::openat(dir, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0));
        match sub {
            Ok(fd) => walk(fd.as_fd(), path, out),
            Err(e) => {
                let mut out = lock(out);
                out.errors.push(format!(
                    "{}: cannot open directory: {e}",
                    String::from_utf8_lossy(path)
                ));
                out.unreadable.push(path.clone());
            }
        }
    });
}
