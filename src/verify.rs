//! `hsm verify PATH...`: check the present chunks of stubs against the digests recorded at
//! populate time (`hsm populate --digests`), and report per file.
//!
//! It reads through the path given. Under the store's own tree that raises no fanotify event; under
//! the mount point only present chunks are read (without readahead, which a FUSE mount would
//! pass on to the daemon), which the daemon allows without fetching.
//!
//! The digest lists live in the store (`STORE/.hsm/digests`). The store is found from the path:
//! a path under `STORE/tree` has it among its ancestors; a path under the mount point of `hsm
//! serve` is followed, through `/proc/self/mountinfo`, to the directory of its filesystem that
//! the mount shows (`STORE/tree`) and to another mount of that filesystem that reaches STORE.
//! `--store` names it instead. STORE itself stands for its tree.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::digest::{chunk_digest, load_list};
use crate::record::{SourceRecord, StateRecord, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every fully present chunk matches.
    Ok {
        chunks: u64,
    },
    NoDigests,
    NotAStub,
    /// Chunks whose bytes differ from the source's digest.
    Mismatch {
        chunks: Vec<u64>,
    },
    /// The file was changed locally (its record says so, or its mtime is no longer the
    /// source's): differing chunks are the user's writes, not corruption.
    Modified {
        chunks: Vec<u64>,
    },
}

/// Find the store that holds `path`, or use `store` when given.
fn digest_dir_for(path: &Path, store: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(s) = store {
        return Ok(s.join(".hsm/digests"));
    }
    match find_store(path) {
        Some(s) => Ok(s.join(".hsm/digests")),
        None => bail!(
            "{} is neither under a store's tree (STORE/tree) nor under the mount point of a \
             running `hsm serve`; pass --store STORE",
            path.display()
        ),
    }
}

/// The store whose tree holds `path`: a path under `STORE/tree` (or STORE itself), or under a
/// mount of a store's tree (the mount point of `hsm serve`) when another mount of the same
/// filesystem reaches the store.
pub fn find_store(path: &Path) -> Option<PathBuf> {
    locate(path).map(|(store, _)| store)
}

/// The store whose tree holds `path` (as [`find_store`]) and the path's place in that tree
/// (empty for the tree itself).
pub fn locate(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let abs = path.canonicalize().ok()?;
    if let Some(dir) = abs
        .ancestors()
        .find(|d| crate::store::Store::config_path(d).is_file())
    {
        // STORE itself stands for its tree; nothing else of STORE is in the tree.
        let rel = match abs.strip_prefix(dir.join("tree")) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) if abs == dir => PathBuf::new(),
            Err(_) => return None,
        };
        return Some((dir.to_path_buf(), rel));
    }
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&abs).ok()?;
    let dev = (libc::major(md.dev()), libc::minor(md.dev()));
    let mounts: Vec<MountInfo> = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .filter_map(MountInfo::parse)
        .filter(|m| m.dev == dev)
        .collect();
    // The mount `abs` is reached through, and the path within its filesystem.
    let mount = mounts
        .iter()
        .filter(|m| abs.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())?;
    let in_fs = mount.root.join(abs.strip_prefix(&mount.point).ok()?);
    for tree in in_fs.ancestors() {
        if tree.file_name() != Some(std::ffi::OsStr::new("tree")) {
            continue;
        }
        let (Some(store_in_fs), Ok(below)) = (tree.parent(), in_fs.strip_prefix(tree)) else {
            continue;
        };
        for other in &mounts {
            let Ok(rel) = store_in_fs.strip_prefix(&other.root) else {
                continue;
            };
            let store = other.point.join(rel);
            if !crate::store::Store::config_path(&store).is_file() {
                continue;
            }
            // The same inode through the store: not a look-alike path on another mount.
            let same = std::fs::metadata(store.join("tree").join(below))
                .is_ok_and(|m| (m.dev(), m.ino()) == (md.dev(), md.ino()));
            if same {
                return Some((store, below.to_path_buf()));
            }
        }
    }
    None
}

/// One line of `/proc/self/mountinfo`: the filesystem's device, the directory of it the mount
/// shows, and where.
struct MountInfo {
    dev: (u32, u32),
    root: PathBuf,
    point: PathBuf,
}

impl MountInfo {
    fn parse(line: &str) -> Option<MountInfo> {
        use std::os::unix::ffi::OsStringExt;
        let mut f = line.split(' ');
        let (_, _, dev, root, point) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (maj, min) = dev.split_once(':')?;
        let path = |s: &str| PathBuf::from(std::ffi::OsString::from_vec(unescape_octal(s)));
        Some(MountInfo {
            dev: (maj.parse().ok()?, min.parse().ok()?),
            root: path(root),
            point: path(point),
        })
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b.get(i + 1..i + 4) {
            Some(o) if b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Refuse to run where the records and digest lists cannot be read.
pub fn require_cap() -> anyhow::Result<()> {
    if !sysfs::has_cap_sys_admin() {
        bail!(
            "run as root: hsm verify reads the trusted.hsm.* records (CAP_SYS_ADMIN) and the \
             digest lists in the root-only store, e.g. `sudo hsm verify PATH`"
        );
    }
    Ok(())
}

pub fn verify_file(path: &Path, digest_dir: &Path) -> anyhow::Result<Verdict> {
    let Some(raw) = sysfs::lgetxattr(path, XATTR_SOURCE)? else {
        return Ok(Verdict::NotAStub);
    };
    let source = SourceRecord::decode(&raw).context("corrupt source record")?;
    let state = match sysfs::lgetxattr(path, XATTR_STATE)? {
        Some(raw) => StateRecord::decode(&raw, &source).context("corrupt state record")?,
        None => source.fresh_state(),
    };
    let Some(digests) = load_list(digest_dir, &source).context("digest list unusable")? else {
        return Ok(Verdict::NoDigests);
    };
    // Through a private view when the store is guarded: a stub's open then raises no event.
    let file = crate::guard::open_for_tool(path, File::options().read(true))?;
    // Through a FUSE mount, the kernel's readahead would ask the daemon for pages beyond the
    // present chunks read here, and have it fetch them.
    let _ = sysfs::no_readahead(file.as_fd());
    let chunk = source.chunk_size as u64;
    let mut buf = vec![0u8; chunk as usize];
    let mut checked = 0;
    let mut bad = Vec::new();
    for (c, want) in digests.iter().enumerate() {
        let (s, e) = (c as u64 * chunk, ((c as u64 + 1) * chunk).min(source.size));
        // Only whole chunks still backed by the source can be checked.
        if e > state.backed_len || !state.present.contains(s, e) {
            continue;
        }
        let n = sysfs::pread_full(file.as_fd(), &mut buf[..(e - s) as usize], s)?;
        if n as u64 != e - s || chunk_digest(&buf[..n]) != *want {
            bad.push(c as u64);
        }
        checked += 1;
    }
    let md = std::fs::symlink_metadata(path)?;
    use std::os::unix::fs::MetadataExt;
    let modified = state.modified || (md.mtime(), md.mtime_nsec() as u32) != source.mtime;
    Ok(if bad.is_empty() {
        Verdict::Ok { chunks: checked }
    } else if modified {
        Verdict::Modified { chunks: bad }
    } else {
        Verdict::Mismatch { chunks: bad }
    })
}

/// Verify every file under `paths`; returns an error if any file failed.
pub fn run(paths: &[PathBuf], store: Option<&Path>) -> anyhow::Result<()> {
    if paths.is_empty() {
        bail!("give at least one PATH: a file or directory under MOUNTPOINT or STORE/tree");
    }
    require_cap()?;
    let mut failed = 0;
    let mut files = Vec::new();
    for p in paths {
        // STORE itself: its tree, not its internals.
        let p = if crate::status::is_store_root(p) {
            p.join("tree")
        } else {
            p.to_path_buf()
        };
        let digest_dir = digest_dir_for(&p, store)?;
        let start = files.len();
        collect(&p, &mut files)?;
        for f in &mut files[start..] {
            f.1 = digest_dir.clone();
        }
    }
    for (f, digest_dir) in &files {
        let shown = f.display().to_string().escape_debug().to_string();
        match verify_file(f, digest_dir) {
            Ok(Verdict::Ok { chunks }) => println!("ok        {chunks} chunks verified  {shown}"),
            Ok(Verdict::NoDigests) => println!("unchecked no digests recorded  {shown}"),
            Ok(Verdict::NotAStub) => println!("local     not a stub  {shown}"),
            Ok(Verdict::Modified { chunks }) => {
                println!("modified  chunks {chunks:?} changed locally  {shown}")
            }
            Ok(Verdict::Mismatch { chunks }) => {
                failed += 1;
                println!("MISMATCH  chunks {chunks:?} differ from the source  {shown}");
            }
            Err(e) => {
                failed += 1;
                println!("ERROR     {e:#}  {shown}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} files failed verification", files.len());
    }
    Ok(())
}

/// Regular files under `p` (with an empty digest directory, filled in by the caller).
fn collect(p: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> anyhow::Result<()> {
    let md =
        std::fs::symlink_metadata(p).with_context(|| format!("cannot stat {}", p.display()))?;
    if md.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else if md.is_file() {
        out.push((p.to_path_buf(), PathBuf::new()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let m = MountInfo::parse(
            "36 35 7:3 /store/tree /tmp/a\\040b/view rw,relatime shared:1 - xfs /dev/loop3 rw",
        )
        .unwrap();
        assert_eq!(m.dev, (7, 3));
        assert_eq!(m.root, Path::new("/store/tree"));
        assert_eq!(m.point, Path::new("/tmp/a b/view"));
        assert!(MountInfo::parse("garbage").is_none());
        assert_eq!(unescape_octal(r"/x\134y\"), b"/x\\y\\");
    }
}
