//! `hsm status [--json] [--summary] PATH...`: how much of each file is present.
//!
//! PATH is a file or a directory, reached through MOUNTPOINT (while `hsm serve` runs) or through
//! `STORE/tree`: both lead to the same inodes and the same records. Directories are walked
//! recursively without following symlinks. A store's own root (STORE, or a store met on the
//! walk) stands for its tree: its `.hsm` directory holds the store's internals, not files. When
//! no file under PATH is a stub, a hint says what to pass instead (an empty directory is most
//! likely a mount point no daemon serves now).
//!
//! Status never opens a file: it reads each file's records with `lgetxattr` and its size and mtime
//! with `lstat`, neither of which raises a fanotify event, so asking for status fetches nothing and
//! never waits for the daemon. The records are `trusted.*` xattrs, which only a process with
//! CAP_SYS_ADMIN can read (without it they are silently invisible, so every stub would look like a
//! plain local file): status refuses to run without it.
//!
//! Each regular file is one of:
//! - `stub`: nothing present yet;
//! - `partial NN.N%`: some ranges present (the percentage is of the file's size, rounded down);
//! - `complete`: every byte that comes from the source is present (empty files are complete);
//! - `modified`: changed locally: the state record says so, or the file's current mtime or size
//!   differs from what the source record says the source had. Such a file is never refetched over;
//! - `local`: no record, not managed by hsm (e.g. a file created through MOUNTPOINT);
//! - `[conflict]` after any of these: `hsm sync` found the file changed here and at the source;
//!   the local version is kept.
//! - `corrupt`: a record that fails its checksum or does not decode; the daemon serves such a file
//!   with EIO. The reason is printed after the path.
//!
//! **Lag**: the daemon keeps what it fetched in memory and persists the state records every 0.5 s
//! (after a `syncfs`, so a record never claims bytes that are not on disk). Status reads those
//! records, so while `hsm serve` runs it may show up to about 0.5 s less than is really present;
//! after the daemon has stopped, the records are final.
//!
//! Output: one line per file (`STATE PRESENT / SIZE PATH`, byte counts exact), then one totals line
//! with the count of files per state, present against total bytes, and the space used on each
//! filesystem involved as `df` reports it (`statvfs`; cloned stubs count in full for `du` but
//! not there). Paths are printed with control characters, backslashes, invalid UTF-8 and
//! bidirectional overrides escaped (`\n`, `\\`, `\xff`, `\u{202e}`), so that no file name can
//! forge or disguise a line. `--json` prints one JSON document instead (same escaped paths).
//! `--summary` prints the totals alone (in JSON: no `files` list), for big trees.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::record::{SourceRecord, StateRecord, StubKind, XATTR_SOURCE, XATTR_STATE};
use crate::sys::fs as sysfs;

/// What a file is, as far as hsm is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stub,
    Partial,
    Complete,
    Modified,
    Local,
    Corrupt,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Stub => "stub",
            State::Partial => "partial",
            State::Complete => "complete",
            State::Modified => "modified",
            State::Local => "local",
            State::Corrupt => "corrupt",
        }
    }
}

/// One regular file's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileStatus {
    /// The path as walked, escaped (see [`escape_path`]).
    pub path: String,
    pub state: State,
    /// Bytes present: for stubs, those the state record holds; a local file is all present; a
    /// corrupt one counts nothing.
    pub present_bytes: u64,
    /// The file's current size.
    pub size: u64,
    /// `present_bytes / size` in percent (100 for an empty file).
    pub percent: f64,
    /// How the stub is filled: `sparse`, `cloned`, `sparselazy`; absent for local or corrupt files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Why a record is corrupt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The loop device this stub backs (`/dev/loopN`): the loop driver reads it with no event,
    /// so it must be complete (see `kernel_reader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<String>,
    /// Pinned (`hsm pin`): kept complete, never released or evicted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Changed here and at the source (`hsm sync`): the local version is kept; move it away to
    /// get the source's at the next sync.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
}

/// Space use of one filesystem, as `df` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    /// A path on that filesystem (the first one walked), escaped.
    pub path: String,
    /// `df`'s "Used": (blocks - free blocks) * fragment size.
    pub used_bytes: u64,
    pub total_bytes: u64,
    /// Available to unprivileged users.
    pub avail_bytes: u64,
}

/// Files per state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub stub: u64,
    pub partial: u64,
    pub complete: u64,
    pub modified: u64,
    pub local: u64,
    pub corrupt: u64,
}

impl StateCounts {
    fn add(&mut self, s: State) {
        *match s {
            State::Stub => &mut self.stub,
            State::Partial => &mut self.partial,
            State::Complete => &mut self.complete,
            State::Modified => &mut self.modified,
            State::Local => &mut self.local,
            State::Corrupt => &mut self.corrupt,
        } += 1;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub states: StateCounts,
    pub present_bytes: u64,
    pub total_bytes: u64,
    pub filesystems: Vec<DiskUse>,
}

impl Totals {
    fn add(&mut self, f: &FileStatus) {
        self.files += 1;
        self.states.add(f.state);
        self.present_bytes += f.present_bytes;
        self.total_bytes += f.size;
    }

    /// The one-line summary printed at the end of `hsm status`.
    pub fn line(&self) -> String {
        let s = &self.states;
        let mut line = format!(
            "total: {} files ({} stub, {} partial, {} complete, {} modified, {} local, {} corrupt); \
             present {} of {} ({} of {} bytes, {:.1}%)",
            self.files,
            s.stub,
            s.partial,
            s.complete,
            s.modified,
            s.local,
            s.corrupt,
            human(self.present_bytes),
            human(self.total_bytes),
            self.present_bytes,
            self.total_bytes,
            percent(self.present_bytes, self.total_bytes),
        );
        for d in &self.filesystems {
            line.push_str(&format!(
                "; disk used {} of {} on the filesystem of {} (df)",
                human(d.used_bytes),
                human(d.total_bytes),
                d.path
            ));
        }
        line
    }
}

/// The result of a walk, without the per-file entries (those go to the caller as they are found).
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub totals: Totals,
    /// Paths that could not be read, with why.
    pub errors: Vec<String>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<&'a [FileStatus]>,
    totals: &'a Totals,
    errors: &'a [String],
}

/// `hsm status`. `summary`: the totals alone.
pub fn run(paths: &[PathBuf], json: bool, summary: bool) -> anyhow::Result<()> {
    if paths.is_empty() {
        bail!("give at least one PATH: a file or directory under MOUNTPOINT or STORE/tree");
    }
    require_cap()?;
    let scan;
    let mut broken_pipe = false;
    if json {
        let mut files = Vec::new();
        scan = self::scan(paths, |f| {
            if !summary {
                files.push(f)
            }
        })?;
        let doc = JsonReport {
            files: (!summary).then_some(&files[..]),
            totals: &scan.totals,
            errors: &scan.errors,
        };
        let mut out = io::stdout().lock();
        let res = serde_json::to_writer_pretty(&mut out, &doc)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
            .and_then(|()| out.flush());
        broken_pipe = check_write(res)?;
    } else {
        let mut out = io::BufWriter::new(io::stdout().lock());
        scan = self::scan(paths, |f| {
            if !broken_pipe && !summary {
                broken_pipe = check_write(writeln!(out, "{}", file_line(&f))).unwrap_or(true);
            }
        })?;
        if !broken_pipe {
            let res = writeln!(out, "{}", scan.totals.line()).and_then(|()| out.flush());
            broken_pipe = check_write(res)?;
        }
    }
    if broken_pipe {
        return Ok(());
    }
    if let Some(hint) = hint(paths, &scan.totals) {
        eprintln!("hsm status: {hint}");
    }
    if !scan.errors.is_empty() {
        bail!(
            "{} path(s) could not be read (listed above)",
            scan.errors.len()
        );
    }
    Ok(())
}

/// `Ok(true)` when the reader went away (`hsm status | head`): stop quietly.
fn check_write(res: io::Result<()>) -> io::Result<bool> {
    match res {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(true),
        Err(e) => Err(e),
    }
}

/// Refuse to run where the records cannot be seen.
pub fn require_cap() -> anyhow::Result<()> {
    if !sysfs::has_cap_sys_admin() {
        bail!(
            "run as root: hsm status reads the trusted.hsm.* extended attributes, which only a \
             process with CAP_SYS_ADMIN can see (to others every stub would look like a plain \
             file), e.g. `sudo hsm status PATH`"
        );
    }
    Ok(())
}

/// Is `dir` the root of a store (not its tree)?
pub fn is_store_root(dir: &Path) -> bool {
    crate::store::Store::config_path(dir).is_file() && dir.join("tree").is_dir()
}

/// What to pass instead, when nothing under `paths` is a stub.
fn hint(paths: &[PathBuf], totals: &Totals) -> Option<String> {
    let s = &totals.states;
    if s.stub + s.partial + s.complete + s.modified + s.corrupt > 0 {
        return None;
    }
    let shown = |p: &Path| escape_path(p.as_os_str().as_bytes());
    let empty: Vec<String> = paths
        .iter()
        .filter(|p| std::fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none()))
        .map(|p| shown(p))
        .collect();
    Some(if !empty.is_empty() {
        format!(
            "{} is an empty directory. If it is the MOUNTPOINT of `hsm serve`, no daemon serves it \
             now: the tree appears there only while `hsm serve STORE MOUNTPOINT` runs. STORE/tree \
             shows the stubs at any time",
            empty.join(", ")
        )
    } else {
        format!(
            "no file under {} is an hsm stub: pass STORE/tree (the tree `hsm populate SOURCE \
             STORE` built) or the MOUNTPOINT of a running `hsm serve`",
            paths
                .iter()
                .map(|p| shown(p))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The loop device backed by the file of `md`, if any (the attached devices are listed once).
fn loop_device_of(md: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    static ATTACHED: std::sync::OnceLock<Vec<(String, u64, u64)>> = std::sync::OnceLock::new();
    let attached = ATTACHED.get_or_init(|| crate::sys::loopdev::attached().unwrap_or_default());
    attached
        .iter()
        .find(|(_, dev, ino)| *dev == md.dev() && *ino == md.ino())
        .map(|(name, _, _)| name.clone())
}

/// The text line for one file: `STATE PRESENT / SIZE PATH[  [reason]][  [attached to DEV]]`.
pub fn file_line(f: &FileStatus) -> String {
    let state = match f.state {
        State::Partial => format!("partial {:.1}%", floor_tenth(f.present_bytes, f.size)),
        s => s.name().to_string(),
    };
    let mut line = format!(
        "{state:<14} {:>13} / {:<13} {}",
        f.present_bytes, f.size, f.path
    );
    if let Some(r) = &f.reason {
        line.push_str("  [");
        line.push_str(&escape_path(r.as_bytes()));
        line.push(']');
    }
    if let Some(dev) = &f.loop_device {
        line.push_str(&format!("  [attached to {dev}]"));
    }
    if f.pinned {
        line.push_str("  [pinned]");
    }
    if f.conflict {
        line.push_str("  [conflict: changed here and at the source]");
    }
    line
}

/// Walk `paths`, handing each regular file's status to `each`. Errors on single paths are
/// collected (and printed to stderr), not fatal.
pub fn scan(paths: &[PathBuf], mut each: impl FnMut(FileStatus)) -> anyhow::Result<Scan> {
    let mut w = Walker {
        scan: Scan::default(),
        devs: HashSet::new(),
        each: &mut each,
    };
    for p in paths {
        match std::fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() && is_store_root(p) => {
                eprintln!(
                    "hsm status: {} is a store: showing its tree, {}",
                    escape_path(p.as_os_str().as_bytes()),
                    escape_path(p.join("tree").as_os_str().as_bytes())
                );
                w.store(p)
            }
            Ok(md) if md.is_dir() => w.dir(p, &md),
            Ok(md) if md.is_file() => {
                w.note_fs(p, &md);
                w.file(p, &md)
            }
            Ok(_) => w.error(
                p,
                "not a regular file or directory (symlinks are not followed)",
            ),
            Err(e) => w.error(p, e),
        }
    }
    Ok(w.scan)
}

struct Walker<'a, F: FnMut(FileStatus)> {
    scan: Scan,
    devs: HashSet<u64>,
    each: &'a mut F,
}

impl<F: FnMut(FileStatus)> Walker<'_, F> {
    fn error(&mut self, path: &Path, e: impl std::fmt::Display) {
        let msg = format!("{}: {e}", escape_path(path.as_os_str().as_bytes()));
        eprintln!("hsm status: {msg}");
        self.scan.errors.push(msg);
    }

    fn note_fs(&mut self, path: &Path, md: &std::fs::Metadata) {
        if self.devs.insert(md.dev()) {
            match disk_use(path) {
                Ok(d) => self.scan.totals.filesystems.push(d),
                Err(e) => self.error(path, format!("statvfs: {e}")),
            }
        }
    }

    /// A store's root: its tree alone.
    fn store(&mut self, root: &Path) {
        let tree = root.join("tree");
        match std::fs::symlink_metadata(&tree) {
            Ok(md) if md.is_dir() => self.dir(&tree, &md),
            Ok(_) => self.error(&tree, "not a directory"),
            Err(e) => self.error(&tree, e),
        }
    }

    fn dir(&mut self, path: &Path, md: &std::fs::Metadata) {
        self.note_fs(path, md);
        let mut entries: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => return self.error(path, e),
        };
        for entry in rd {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.error(path, e);
                    break;
                }
            };
            let p = entry.path();
            // DirEntry::metadata is an lstat: symlinks are not followed.
            match entry.metadata() {
                Ok(md) => entries.push((p, md)),
                Err(e) => self.error(&p, e),
            }
        }
        entries.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
        // A store met on the walk: its tree only, not its internals.
        if entries
            .iter()
            .any(|(p, md)| md.is_dir() && p.file_name() == Some(std::ffi::OsStr::new(".hsm")))
            && is_store_root(path)
        {
            return self.store(path);
        }
        for (p, md) in entries {
            if md.is_dir() {
                self.dir(&p, &md);
            } else if md.is_file() {
                self.file(&p, &md);
            }
        }
    }

    fn file(&mut self, path: &Path, md: &std::fs::Metadata) {
        match file_status(path, md) {
            Ok(f) => {
                self.scan.totals.add(&f);
                (self.each)(f);
            }
            Err(e) => self.error(path, e),
        }
    }
}

/// The status of one regular file, from its records (read without opening it) and `md` (its
/// `lstat`).
pub fn file_status(path: &Path, md: &std::fs::Metadata) -> io::Result<FileStatus> {
    let size = md.len();
    let mut f = FileStatus {
        path: escape_path(path.as_os_str().as_bytes()),
        state: State::Local,
        present_bytes: size,
        size,
        percent: 100.0,
        kind: None,
        reason: None,
        loop_device: None,
        pinned: false,
        conflict: matches!(
            sysfs::lgetxattr(path, crate::sync::XATTR_CONFLICT),
            Ok(Some(_))
        ),
    };
    let raw = match sysfs::lgetxattr(path, XATTR_SOURCE) {
        Ok(Some(raw)) => raw,
        Ok(None) => return Ok(f),
        // A filesystem without xattrs holds no stubs.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(f),
        Err(e) => return Err(e),
    };
    f.loop_device = loop_device_of(md);
    f.pinned = matches!(
        sysfs::lgetxattr(path, crate::lifecycle::XATTR_PIN),
        Ok(Some(_))
    );
    let corrupt = |mut f: FileStatus, why: String| {
        f.state = State::Corrupt;
        f.present_bytes = 0;
        f.percent = 0.0;
        f.reason = Some(why);
        f
    };
    let source = match SourceRecord::decode(&raw) {
        Ok(s) => s,
        Err(e) => return Ok(corrupt(f, format!("source record: {e}"))),
    };
    let state = match sysfs::lgetxattr(path, XATTR_STATE)? {
        None => source.fresh_state(),
        Some(raw) => match StateRecord::decode(&raw, &source) {
            Ok(s) => s,
            Err(e) => return Ok(corrupt(f, format!("state record: {e}"))),
        },
    };
    f.kind = Some(
        match source.kind {
            StubKind::Sparse => "sparse",
            StubKind::Cloned => "cloned",
            StubKind::SparseLazy => "sparselazy",
        }
        .to_string(),
    );
    // Of the file as it is now: ranges present below its size and below the length still
    // backed by the source, and every byte beyond that length (the user's own). A file cut
    // short locally never shows more present than its size.
    f.present_bytes =
        state.present.covered(state.backed_len.min(size)) + size.saturating_sub(state.backed_len);
    f.percent = percent(f.present_bytes, size);
    let mtime = (md.mtime(), md.mtime_nsec() as u32);
    f.state = if state.changed_locally(&source, size, mtime) {
        State::Modified
    } else if state.is_complete() {
        State::Complete
    } else if f.present_bytes == 0 {
        State::Stub
    } else {
        State::Partial
    };
    Ok(f)
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A percentage rounded down to a tenth, but never shown as 0.0 when something is present nor as
/// 100.0 when something is missing.
fn floor_tenth(part: u64, whole: u64) -> f64 {
    if whole == 0 || part >= whole {
        return 100.0;
    }
    let tenths = (part as u128 * 1000 / whole as u128) as f64;
    (tenths / 10.0).clamp(if part > 0 { 0.1 } else { 0.0 }, 99.9)
}

/// Bytes for humans: `5.0 KiB`, `64.0 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A file name for one line of output: valid UTF-8 as it is, except that backslashes, control
/// characters (newlines included), line and paragraph separators and bidirectional formatting
/// characters are escaped, and invalid bytes are shown as `\xNN`. The result is on one line, and
/// distinct names give distinct strings.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    out.push_str(&format!("\\x{:02x}", c as u32))
                }
                c if c.is_control()
                    || matches!(
                        c,
                        '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
                    )
                    || ('\u{202a}'..='\u{202e}').contains(&c)
                    || ('\u{2066}'..='\u{2069}').contains(&c) =>
                {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32))
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `df`'s figures for the filesystem holding `path` (`statvfs`, which opens nothing).
pub fn disk_use(path: &Path) -> io::Result<DiskUse> {
    let (used_bytes, total_bytes, avail_bytes) = sysfs::disk_use(path)?;
    Ok(DiskUse {
        path: escape_path(path.as_os_str().as_bytes()),
        used_bytes,
        total_bytes,
        avail_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_one_line_and_is_injective() {
        assert_eq!(escape_path(b"a/b c.txt"), "a/b c.txt");
        assert_eq!(escape_path("été/ü".as_bytes()), "été/ü");
        assert_eq!(escape_path(b"evil\nstub 0 / 1 x"), "evil\\nstub 0 / 1 x");
        assert_eq!(escape_path(b"a\\nb"), "a\\\\nb");
        assert_eq!(escape_path(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(escape_path(b"\x1b[2J"), "\\x1b[2J");
        assert_eq!(
            escape_path("x\u{202e}txt.exe".as_bytes()),
            "x\\u{202e}txt.exe"
        );
        assert_eq!(escape_path("a\u{2028}b".as_bytes()), "a\\u{2028}b");
        // The byte \xff and the text "\xff" differ.
        assert_ne!(escape_path(b"\xff"), escape_path(b"\\xff"));
        for s in [&b"a\nb"[..], b"\r", b"\x00\x85", "\u{85}".as_bytes()] {
            assert!(!escape_path(s).contains(['\n', '\r', '\u{85}']));
        }
    }

    #[test]
    fn percentages_round_down_and_never_lie_at_the_ends() {
        assert_eq!(floor_tenth(1, 8), 12.5);
        assert_eq!(floor_tenth(2 << 20, 16 << 20), 12.5);
        assert_eq!(floor_tenth(1, 1 << 40), 0.1);
        assert_eq!(floor_tenth(0, 10), 0.0);
        assert_eq!(floor_tenth((1 << 40) - 1, 1 << 40), 99.9);
        assert_eq!(floor_tenth(2, 3), 66.6);
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(64 << 20), "64.0 MiB");
    }
}
