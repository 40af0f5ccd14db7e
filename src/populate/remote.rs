//! Populate from a remote source: an object store's prefix (S3, GCS, Azure: listed by the
//! backend's [`Lister`]) or an HTTP(S) base (a manifest). The
//! whole plan is made and checked first (credentials, listing, HEADs), then the store is created
//! and the tree built under it; every name is created relative to a directory opened beneath the
//! tree with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no key can write outside it.
//!
//! Apart from the local walk because it plans first: the listing or manifest is read and checked
//! in full (the plan) before anything is created.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::{bail, Context};
use rayon::prelude::*;

use super::{Meta, PopulateOptions, PopulateReport, Walk};
use crate::backend::http::{HttpBackend, HttpUrl};
use crate::backend::object::{self, LAST_MODIFIED_PREFIX};
use crate::backend::{scheme_of, FetchError, Lister, Scheme};
use crate::manifest::{self, EntryType};
use crate::store::{Store, StoreConfig};
use crate::sys::fs::{self as sysfs, FsKind};

const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;
const MANIFEST_LIMIT: u64 = 1 << 30;

pub(crate) enum Node {
    Dir(Meta),
    File(Meta),
    Symlink(String, Meta),
}

/// What will be made, by relative path, plus what was refused and why.
#[derive(Default)]
pub(crate) struct Plan {
    pub(crate) nodes: BTreeMap<String, Node>,
    pub(crate) skipped: Vec<String>,
    pub(crate) errors: Vec<String>,
}

/// For `hsm sync`: the source's listing (S3) or manifest (HTTP) as a plan, every ancestor
/// directory in it, and the source URL as the store records it. HTTP files are not checked on
/// the server here (no HEAD): their versions are `None` until [`http_versions`] asks.
pub(crate) fn plan_for_sync(source: &str, opts: &PopulateOptions) -> anyhow::Result<Plan> {
    let (_, mut plan) = match scheme_of(source) {
        Scheme::S3 | Scheme::Gcs | Scheme::Azure => plan_listed(source, opts)?,
        Scheme::Http => plan_http_with(source, opts, false)?,
        Scheme::Local => bail!("a local source is walked, not planned"),
    };
    complete(&mut plan);
    Ok(plan)
}

/// One file's size and version on the server, or why not.
pub(crate) type Head = Result<(u64, Option<String>), String>;

/// For `hsm sync`: the size and version (ETag, else Last-Modified) of each of `paths` on the
/// HTTP(S) server of `source`, by HEAD requests, several at once.
pub(crate) fn http_versions(
    source: &str,
    paths: &[String],
    jobs: usize,
) -> anyhow::Result<Vec<Head>> {
    let backend = HttpBackend::open(HttpUrl::parse(source)?)?;
    Ok(backend
        .head_all(paths, jobs.max(1) * 8)
        .into_iter()
        .map(|h| match h {
            Ok(h) => Ok((h.size, version_of(h.e_tag, h.last_modified.timestamp()))),
            Err(e) => Err(e.to_string()),
        })
        .collect())
}

/// An HTTP object's version: its ETag, else its Last-Modified time.
fn version_of(e_tag: Option<String>, last_modified_secs: i64) -> Option<String> {
    match (e_tag, last_modified_secs) {
        (Some(tag), _) => Some(tag),
        (None, secs) if secs > 0 => Some(format!("{LAST_MODIFIED_PREFIX}{secs}")),
        _ => None,
    }
}

fn default_meta(mode: u32) -> Meta {
    Meta {
        mode,
        ..Meta::default()
    }
}

fn load_manifest(
    spec: &str,
    http: Option<&HttpBackend>,
    jobs_deadline: Option<f64>,
) -> anyhow::Result<Vec<manifest::Entry>> {
    let bytes = if scheme_of(spec) == Scheme::Http {
        let deadline = jobs_deadline
            .map(std::time::Duration::from_secs_f64)
            .unwrap_or(object::DEFAULT_DEADLINE);
        crate::backend::http::fetch_url(spec, deadline, MANIFEST_LIMIT)?
    } else if let (Some(h), "") = (http, spec) {
        h.get_small(manifest::DEFAULT_NAME, MANIFEST_LIMIT)?
    } else {
        std::fs::read(spec).with_context(|| format!("cannot read the manifest {spec}"))?
    };
    let text = String::from_utf8(bytes).context("the manifest is not UTF-8")?;
    manifest::parse(&text)
}

fn entry_meta(e: &manifest::Entry, default_mode: u32) -> Meta {
    Meta {
        size: e.size.unwrap_or(0),
        mode: e.mode.unwrap_or(default_mode) & 0o7777,
        uid: e.uid.unwrap_or(0),
        gid: e.gid.unwrap_or(0),
        atime: (e.mtime, e.mtime_nsec as i64),
        mtime: (e.mtime, e.mtime_nsec as i64),
        version: None,
    }
}

fn plan_listed(source: &str, opts: &PopulateOptions) -> anyhow::Result<(String, Plan)> {
    let url = crate::backend::with_overrides(
        source,
        opts.endpoint.as_deref(),
        opts.region.as_deref(),
        opts.deadline,
    )?;
    let lister: Box<dyn Lister> = crate::backend::lister(&url)?;
    eprintln!("listing {}", lister.describe());
    let listed = lister.list()?;
    let mut plan = Plan::default();
    for o in listed {
        if let Some(dir) = o.key.strip_suffix('/') {
            // A directory marker (what consoles make for "folders").
            if o.size != 0 {
                plan.skipped.push(format!(
                    "{:?}: a key ending in '/' with content ({} bytes)",
                    o.key, o.size
                ));
            } else if dir.is_empty() {
            } else if let Some(why) = manifest::path_problem(dir) {
                plan.skipped.push(format!("{:?}: {why}", o.key));
            } else {
                let mut m = default_meta(DIR_MODE);
                m.mtime = (o.mtime.0, o.mtime.1 as i64);
                m.atime = m.mtime;
                plan.nodes.insert(dir.to_string(), Node::Dir(m));
            }
            continue;
        }
        if let Some(why) = manifest::path_problem(&o.key) {
            plan.skipped.push(format!("{:?}: {why}", o.key));
            continue;
        }
        let mtime = (o.mtime.0, o.mtime.1 as i64);
        plan.nodes.insert(
            o.key.clone(),
            Node::File(Meta {
                size: o.size,
                mode: FILE_MODE,
                uid: 0,
                gid: 0,
                atime: mtime,
                mtime,
                version: o.etag.clone(),
            }),
        );
    }
    if let Some(spec) = &opts.manifest {
        for e in load_manifest(spec, None, opts.deadline)? {
            if let Some(why) = manifest::path_problem(&e.path) {
                plan.skipped.push(format!("manifest {:?}: {why}", e.path));
                continue;
            }
            match (e.kind, plan.nodes.get_mut(&e.path)) {
                (EntryType::File, Some(Node::File(m))) => {
                    if e.size != Some(m.size) {
                        plan.errors.push(format!(
                            "{}: the manifest says {} bytes, the bucket has {}; not stubbed",
                            e.path,
                            e.size.unwrap_or(0),
                            m.size
                        ));
                        plan.nodes.remove(&e.path);
                        continue;
                    }
                    let n = entry_meta(&e, FILE_MODE);
                    m.mode = n.mode;
                    m.uid = n.uid;
                    m.gid = n.gid;
                    m.mtime = n.mtime;
                    m.atime = n.atime;
                }
                (EntryType::File, _) => plan.errors.push(format!(
                    "{}: in the manifest but not a file in the bucket; not stubbed",
                    e.path
                )),
                (EntryType::Dir, _) => {
                    plan.nodes
                        .insert(e.path.clone(), Node::Dir(entry_meta(&e, DIR_MODE)));
                }
                (EntryType::Symlink, _) => {
                    let target = e.target.clone().unwrap_or_default();
                    plan.nodes
                        .insert(e.path.clone(), Node::Symlink(target, entry_meta(&e, 0o777)));
                }
            }
        }
    }
    Ok((lister.source_url(), plan))
}

fn plan_http(source: &str, opts: &PopulateOptions) -> anyhow::Result<(String, Plan)> {
    plan_http_with(source, opts, true)
}

/// The manifest as a plan; `head`: each file checked on the server (size, version).
fn plan_http_with(
    source: &str,
    opts: &PopulateOptions,
    head: bool,
) -> anyhow::Result<(String, Plan)> {
    if opts.endpoint.is_some() || opts.region.is_some() {
        bail!("--endpoint and --region are for object stores (s3://, gs://, az://)");
    }
    let mut url = HttpUrl::parse(source)?;
    if let Some(d) = opts.deadline {
        url.deadline = Some(object::parse_deadline(&d.to_string())?);
    }
    let backend = HttpBackend::open(url)?;
    backend.check_strict()?;
    let spec = opts.manifest.clone().unwrap_or_default();
    eprintln!(
        "reading the manifest {}",
        if spec.is_empty() {
            object::redact_url(&backend.url.join(manifest::DEFAULT_NAME))
        } else if scheme_of(&spec) == Scheme::Http {
            object::redact_url(&spec)
        } else {
            spec.clone()
        }
    );
    let entries = load_manifest(&spec, Some(&backend), opts.deadline)?;
    let mut plan = Plan::default();
    let mut files = Vec::new();
    for e in entries {
        if let Some(why) = manifest::path_problem(&e.path) {
            plan.skipped.push(format!("manifest {:?}: {why}", e.path));
            continue;
        }
        match e.kind {
            EntryType::Dir => {
                plan.nodes
                    .insert(e.path.clone(), Node::Dir(entry_meta(&e, DIR_MODE)));
            }
            EntryType::Symlink => {
                let target = e.target.clone().unwrap_or_default();
                plan.nodes
                    .insert(e.path.clone(), Node::Symlink(target, entry_meta(&e, 0o777)));
            }
            EntryType::File => files.push(e),
        }
    }
    if !head {
        for e in files {
            plan.nodes
                .insert(e.path.clone(), Node::File(entry_meta(&e, FILE_MODE)));
        }
        return Ok((backend.url.to_url(), plan));
    }
    eprintln!("checking {} files on the server (HEAD)", files.len());
    let paths: Vec<String> = files.iter().map(|e| e.path.clone()).collect();
    let heads = backend.head_all(&paths, opts.jobs.max(1) * 8);
    let mut unversioned = 0u64;
    for (e, head) in files.into_iter().zip(heads) {
        let mut m = entry_meta(&e, FILE_MODE);
        match head {
            Ok(h) if h.size != m.size => plan.errors.push(format!(
                "{}: the manifest says {} bytes, the server has {}; not stubbed",
                e.path, m.size, h.size
            )),
            Ok(h) => {
                m.version = version_of(h.e_tag, h.last_modified.timestamp());
                if m.version.is_none() {
                    unversioned += 1;
                }
                plan.nodes.insert(e.path.clone(), Node::File(m));
            }
            Err(FetchError::NotFound) => plan.errors.push(format!(
                "{}: in the manifest but not on the server (404); not stubbed",
                e.path
            )),
            Err(err) => plan.errors.push(format!("{}: HEAD failed: {err}", e.path)),
        }
    }
    if unversioned > 0 {
        eprintln!(
            "warning: the server sent neither ETag nor Last-Modified for {unversioned} files: \
             if one is replaced by another of the same size, reads cannot tell"
        );
    }
    Ok((backend.url.to_url(), plan))
}

/// Every ancestor directory exists in the plan; a file or symlink where a directory is
/// needed is refused.
/// Directories the source does not describe get mode 0755, root, and the newest mtime
/// found beneath them.
fn complete(plan: &mut Plan) {
    let mut needed: BTreeMap<String, sysfs::Timespec> = BTreeMap::new();
    for (path, node) in &plan.nodes {
        let (Node::Dir(m) | Node::File(m) | Node::Symlink(_, m)) = node;
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            let t = needed.entry(parent.to_string()).or_insert((0, 0));
            *t = (*t).max(m.mtime);
            p = parent;
        }
    }
    for (d, newest) in needed {
        let implicit = Meta {
            atime: newest,
            mtime: newest,
            ..default_meta(DIR_MODE)
        };
        match plan.nodes.get(&d) {
            Some(Node::Dir(_)) => {}
            // A "folder" marker where a store shows `dir/` as a zero-byte `dir` (GCS, Azure).
            Some(Node::File(m)) if m.size == 0 => {
                let marker = Meta {
                    mtime: m.mtime,
                    atime: m.atime,
                    ..default_meta(DIR_MODE)
                };
                plan.nodes.insert(d, Node::Dir(marker));
            }
            Some(_) => {
                plan.skipped.push(format!(
                    "{d:?}: is both an object and a directory of other objects; the directory wins"
                ));
                plan.nodes.insert(d, Node::Dir(implicit));
            }
            None => {
                plan.nodes.insert(d, Node::Dir(implicit));
            }
        }
    }
}

fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

fn open_parent(tree: &OwnedFd, parent: &str) -> std::io::Result<OwnedFd> {
    sysfs::open_beneath(
        tree.as_fd(),
        parent.as_bytes(),
        libc::O_RDONLY | libc::O_DIRECTORY,
    )
}

pub(super) fn populate(
    source: &str,
    store_root: &Path,
    opts: &PopulateOptions,
) -> anyhow::Result<PopulateReport> {
    let (url, mut plan) = match scheme_of(source) {
        Scheme::S3 | Scheme::Gcs | Scheme::Azure => plan_listed(source, opts)?,
        Scheme::Http => plan_http(source, opts)?,
        Scheme::Local => unreachable!("local sources are populated by the walk"),
    };
    complete(&mut plan);
    let store = Store::create(
        store_root,
        StoreConfig {
            version: 1,
            source: url,
            fs: FsKind::Other(0),
            chunk_size: opts.chunk_size,
            whole_below: opts.whole_below,
            lazy_sparse: opts.lazy_sparse,
        },
    )?;
    let (walk, tree) = Walk::new(opts, &store, false)?;
    walk.set_total(plan.nodes.len() as u64);
    walk.errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .append(&mut plan.errors);
    // Directories, parents first (a parent's path sorts before its children's).
    let mut failed_dirs: Vec<String> = Vec::new();
    for (rel, node) in &plan.nodes {
        let Node::Dir(_) = node else { continue };
        if failed_dirs
            .iter()
            .any(|f| rel.starts_with(&format!("{f}/")))
        {
            continue;
        }
        let (parent, name) = split(rel);
        let res = (|| -> anyhow::Result<()> {
            let pfd = open_parent(&tree, parent)?;
            let cname = CString::new(name)?;
            match sysfs::mkdirat(pfd.as_fd(), &cname, 0o700) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let st = sysfs::lstatat(pfd.as_fd(), &cname)?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        bail!("refusing to replace an existing non-directory in STORE");
                    }
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        })();
        walk.progress.inc(1);
        match res {
            Ok(()) => {
                walk.counters.dirs.fetch_add(1, Relaxed);
            }
            Err(e) => {
                walk.error(rel.as_bytes(), format!("{e:#}"));
                failed_dirs.push(rel.clone());
            }
        }
    }
    // Files and symlinks, one directory at a time, directories in parallel.
    let mut by_dir: BTreeMap<&str, Vec<(&str, &Node)>> = BTreeMap::new();
    for (rel, node) in &plan.nodes {
        if matches!(node, Node::Dir(_))
            || failed_dirs
                .iter()
                .any(|f| rel.starts_with(&format!("{f}/")))
        {
            continue;
        }
        by_dir
            .entry(split(rel).0)
            .or_default()
            .push((rel.as_str(), node));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .build()?;
    pool.install(|| {
        by_dir.into_par_iter().for_each(|(parent, entries)| {
            let pfd = match open_parent(&tree, parent) {
                Ok(fd) => fd,
                Err(e) => {
                    return walk.error(parent.as_bytes(), format!("cannot open directory: {e}"))
                }
            };
            walk.sweep_staging(pfd.as_fd(), parent.as_bytes(), |n| {
                entries.iter().any(|(rel, _)| split(rel).1.as_bytes() == n)
            });
            for (rel, node) in entries {
                walk.progress.inc(1);
                let res = (|| -> anyhow::Result<()> {
                    let cname = CString::new(split(rel).1)?;
                    match node {
                        Node::File(m) => walk.stub(pfd.as_fd(), &cname, rel.as_bytes(), m),
                        Node::Symlink(target, m) => {
                            match sysfs::symlinkat(target.as_bytes(), pfd.as_fd(), &cname) {
                                Ok(()) => {}
                                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                                    if sysfs::readlinkat(pfd.as_fd(), &cname).ok().as_deref()
                                        == Some(target.as_bytes())
                                    {
                                        walk.keep_symlink(pfd.as_fd(), &cname, m, rel.as_bytes());
                                        return Ok(());
                                    }
                                    bail!("refusing to replace an existing entry in STORE that is not the same symlink");
                                }
                                Err(e) => return Err(e.into()),
                            }
                            walk.set_meta(pfd.as_fd(), Some(&cname), m, rel.as_bytes());
                            walk.counters.symlinks.fetch_add(1, Relaxed);
                            Ok(())
                        }
                        Node::Dir(_) => Ok(()),
                    }
                })();
                if let Err(e) = res {
                    walk.error(rel.as_bytes(), format!("{e:#}"));
                }
            }
        });
    });
    // Directory owners, modes and times last, children first: making entries moves mtimes.
    for (rel, node) in plan.nodes.iter().rev() {
        let Node::Dir(m) = node else { continue };
        if failed_dirs
            .iter()
            .any(|f| rel == f || rel.starts_with(&format!("{f}/")))
        {
            continue;
        }
        match open_parent(&tree, rel) {
            Ok(fd) => walk.set_meta(fd.as_fd(), None, m, rel.as_bytes()),
            Err(e) => walk.error(rel.as_bytes(), format!("cannot open directory: {e}")),
        }
    }
    let _ = sysfs::fchmod(tree.as_fd(), DIR_MODE);
    walk.finish(std::mem::take(&mut plan.skipped))
}
