//! Manifests: what a source without a listing (an HTTP(S) server) holds.
//!
//! `hsm manifest DIR > DIR/.hsm-manifest.jsonl` writes one for a local tree; `hsm populate
//! http://HOST/BASE/ STORE` reads `BASE/.hsm-manifest.jsonl` from the server unless `--manifest
//! URL-OR-PATH` names another. An S3 source may be given one too (`--manifest`): the listing
//! still decides which objects exist and their size and ETag; the manifest adds modes, owners and
//! times, which S3 listings do not carry (so an executable in a bucket keeps its `x` bit).
//!
//! # Format
//!
//! JSON Lines, UTF-8: one JSON object per line, blank lines ignored. The first line is the header
//! `{"hsm_manifest":1}`. Every other line is one entry:
//!
//! ```text
//! {"hsm_manifest":1}
//! {"path":"bin","type":"dir","mode":493,"mtime":1700000000,"mtime_nsec":0,"uid":0,"gid":0}
//! {"path":"bin/tool","type":"file","size":73216,"mode":493,"mtime":1700000000,"mtime_nsec":5,"blake3":"9f2c…"}
//! {"path":"bin/t","type":"symlink","target":"tool"}
//! ```
//!
//! | field | meaning |
//! | --- | --- |
//! | `path` | required: relative, `/`-separated; no empty, `.` or `..` component, no NUL, each component at most 255 bytes |
//! | `type` | `file` (default), `dir` or `symlink` |
//! | `size` | bytes; required for files |
//! | `mode` | permission bits as a decimal number (`0o755` is 493), set-id and sticky bits included; default 0644 for files, 0755 for directories |
//! | `mtime`, `mtime_nsec` | modification time, seconds since the epoch and nanoseconds; default 0 |
//! | `uid`, `gid` | owner; default 0 (root) |
//! | `blake3` | optional: hex BLAKE3 digest of the content (written by `hsm manifest --digests`, for tools that verify copies) |
//! | `target` | a symlink's target; required for symlinks |
//!
//! Unknown fields are ignored, so that later versions can add some. Directories that files need
//! but the manifest does not list are made with the defaults. Entries whose path is not
//! acceptable are reported and skipped by populate; nothing is ever made outside the store.
//! Paths must be UTF-8: `hsm manifest` reports and leaves out names that are not. Hard links are
//! listed as separate files.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub const DEFAULT_NAME: &str = ".hsm-manifest.jsonl";
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    #[default]
    File,
    Dir,
    Symlink,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    #[serde(rename = "type", default)]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default)]
    pub mtime: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    hsm_manifest: u32,
}

/// Why a path cannot be made into a file under the store, or None when it can.
pub fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("empty path");
    }
    if path.len() > 4000 {
        return Some("path longer than 4000 bytes");
    }
    if path.contains('\0') {
        return Some("NUL in the name");
    }
    for c in path.split('/') {
        match c {
            "" => return Some("empty path component ('//', or a leading or trailing '/')"),
            "." | ".." => return Some("'.' or '..' path component"),
            c if c.len() > 255 => return Some("a path component longer than 255 bytes"),
            c if c.bytes().any(|b| b.is_ascii_control()) => {
                return Some("control character in the name")
            }
            _ => {}
        }
    }
    None
}

/// Parse a manifest. Lines that are not entries are errors (with their line number); entries
/// with unacceptable paths are returned too, for the caller to report and skip.
pub fn parse(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, first)) = lines.next() else {
        bail!("the manifest is empty (it must start with {{\"hsm_manifest\":1}})");
    };
    let header: Header = serde_json::from_str(first)
        .context("the manifest's first line is not the header {\"hsm_manifest\":1}")?;
    if header.hsm_manifest != VERSION {
        bail!(
            "manifest version {} is not supported (this hsm reads version {VERSION})",
            header.hsm_manifest
        );
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let e: Entry = serde_json::from_str(line)
            .with_context(|| format!("manifest line {}: not a valid entry", n + 1))?;
        match e.kind {
            EntryType::File if e.size.is_none() => {
                bail!("manifest line {}: file {:?} has no size", n + 1, e.path)
            }
            EntryType::Symlink if e.target.is_none() => {
                bail!(
                    "manifest line {}: symlink {:?} has no target",
                    n + 1,
                    e.path
                )
            }
            _ => {}
        }
        out.push(e);
    }
    Ok(out)
}

/// Write the manifest of the tree at `dir` to `out`, entries in sorted order, parents first.
/// Returns the number of entries; names that are not UTF-8 and special files are reported on
/// stderr and left out. With `digest`, every file is read to compute its BLAKE3 digest.
pub fn generate(dir: &Path, digest: bool, out: &mut dyn Write) -> anyhow::Result<u64> {
    let md = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if !md.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    writeln!(out, "{}", serde_json::json!({ "hsm_manifest": VERSION }))?;
    let mut count = 0;
    walk(dir, "", digest, out, &mut count)?;
    out.flush()?;
    Ok(count)
}

fn walk(
    dir: &Path,
    rel: &str,
    digest: bool,
    out: &mut dyn Write,
    count: &mut u64,
) -> anyhow::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let full = dir.join(&name);
        let Some(name) = name.to_str() else {
            eprintln!(
                "hsm manifest: skipped {}: name is not UTF-8",
                full.display()
            );
            continue;
        };
        if rel.is_empty() && name == DEFAULT_NAME {
            continue;
        }
        let path = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        if let Some(why) = path_problem(&path) {
            eprintln!("hsm manifest: skipped {}: {why}", full.display());
            continue;
        }
        let md = std::fs::symlink_metadata(&full)?;
        let ft = md.file_type();
        let mut e = Entry {
            path: path.clone(),
            mode: Some(md.mode() & 0o7777),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            uid: Some(md.uid()),
            gid: Some(md.gid()),
            ..Default::default()
        };
        if ft.is_dir() {
            e.kind = EntryType::Dir;
        } else if ft.is_file() {
            e.kind = EntryType::File;
            e.size = Some(md.len());
            if digest {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(&full)?)
                    .with_context(|| format!("cannot read {}", full.display()))?;
                e.blake3 = Some(h.finalize().to_hex().to_string());
            }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full)?;
            let Some(t) = target.to_str() else {
                eprintln!(
                    "hsm manifest: skipped {}: symlink target is not UTF-8",
                    full.display()
                );
                continue;
            };
            e.kind = EntryType::Symlink;
            e.target = Some(t.to_string());
            e.mode = None;
        } else {
            eprintln!(
                "hsm manifest: skipped {}: not a file, directory or symlink",
                full.display()
            );
            continue;
        }
        writeln!(out, "{}", serde_json::to_string(&e)?)?;
        *count += 1;
        if ft.is_dir() {
            walk(&full, &path, digest, out, count)?;
        }
    }
    Ok(())
}

/// `hsm manifest DIR [--digests]`: the manifest on stdout.
pub fn run(dir: &Path, digest: bool) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let n = generate(dir, digest, &mut out)?;
    eprintln!("hsm manifest: {n} entries");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        assert_eq!(path_problem("a/b c/d"), None);
        for bad in ["", "/a", "a/", "a//b", "./a", "a/..", "a\0b", "a\nb"] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
        assert!(path_problem(&"x".repeat(256)).is_some());
        assert!(path_problem(&"x".repeat(255)).is_none());
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"hello").unwrap();
        std::os::unix::fs::symlink("d/f", dir.path().join("l")).unwrap();
        std::fs::write(dir.path().join(DEFAULT_NAME), b"old").unwrap();
        let mut out = Vec::new();
        assert_eq!(generate(dir.path(), true, &mut out).unwrap(), 3);
        let entries = parse(std::str::from_utf8(&out).unwrap()).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["d", "d/f", "l"]);
        assert_eq!(entries[1].size, Some(5));
        assert_eq!(
            entries[1].blake3.as_deref(),
            Some(blake3::hash(b"hello").to_hex().as_str())
        );
        assert_eq!(entries[2].target.as_deref(), Some("d/f"));
        assert!(parse("{\"hsm_manifest\":2}\n").is_err());
        assert!(parse("{\"hsm_manifest\":1}\n{\"path\":\"f\"}\n").is_err());
    }
}
