//! `hsm verify PATH...`: check the present chunks of stubs against the digests recorded at
//! populate time (`hsm populate --digests`), and report per file.
//!
//! It reads through the path given. Under the store's own tree that raises no fanotify event; under
//! the mount point only present chunks are read, which the daemon allows without fetching.

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

/// Find the store that holds `path` (a path under STORE/tree), or use `store` when given.
fn digest_dir_for(path: &Path, store: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(s) = store {
        return Ok(s.join(".hsm/digests"));
    }
    let abs = path.canonicalize()?;
    for dir in abs.ancestors() {
        if dir.join(".hsm/config.json").is_file() {
            return Ok(dir.join(".hsm/digests"));
        }
    }
    bail!(
        "{} is not inside a store's tree; pass --store STORE (paths under a mount point need it)",
        path.display()
    )
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
    let mut failed = 0;
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    for f in &files {
        let digest_dir = digest_dir_for(f, store)?;
        let shown = f.display().to_string().escape_debug().to_string();
        match verify_file(f, &digest_dir) {
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

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
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
        out.push(p.to_path_buf());
    }
    Ok(())
}
