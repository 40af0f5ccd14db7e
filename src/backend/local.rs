//! A local directory as the source. Every object is opened beneath the source root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither a `..` in a key nor a symlink placed
//! in the source (even swapped in while we run) can make the daemon read outside it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{bail, Context};

use super::{Backend, FetchError};
use crate::record::SourceRecord;
use crate::sys::fs as sysfs;

pub struct LocalBackend {
    root: PathBuf,
    /// Owner of the root when the daemon started: a replacement root must have the same.
    root_uid: u32,
    /// The root directory, held open: renaming it or a component above it changes nothing;
    /// reopened by name only when it was removed.
    root_fd: RwLock<OwnedFd>,
    /// See [`Backend::reads_may_stall`]: the root, or a mount beneath it, is not a local disk's.
    may_stall: bool,
}

/// Accept `/abs/path` or `file:///abs/path`.
pub fn path_from_url(url: &str) -> anyhow::Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(rest) if rest.starts_with('/') => Ok(PathBuf::from(rest)),
        Some(_) => bail!("a file:// URL needs an absolute path: file:///path/to/dir"),
        None if url.contains("://") => {
            bail!("unsupported source URL scheme in {url:?}: this build knows file:// and local paths")
        }
        None => Ok(std::path::absolute(url)?),
    }
}

fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(root)?.into())
}

impl LocalBackend {
    pub fn open(root: &Path) -> anyhow::Result<LocalBackend> {
        let fd = open_root(root)
            .with_context(|| format!("cannot open source directory {}", root.display()))?;
        if !std::fs::metadata(root)?.is_dir() {
            bail!("source {} is not a directory", root.display());
        }
        let root_uid = sysfs::fstat(fd.as_fd())?.st_uid;
        let may_stall = !sysfs::fs_kind(fd.as_fd())?.is_local_disk() || {
            // Unreadable mountinfo: assume the worst, which costs speed, not correctness.
            let canonical = std::fs::canonicalize(root)?;
            std::fs::read_to_string("/proc/self/mountinfo")
                .map_or(true, |info| network_mount_beneath(&info, &canonical))
        };
        Ok(LocalBackend {
            root_uid,
            root: root.to_path_buf(),
            root_fd: RwLock::new(fd),
            may_stall,
        })
    }

    fn open_object(&self, key: &[u8], flags: i32) -> Result<OwnedFd, FetchError> {
        let attempt = |root: &OwnedFd| {
            sysfs::open_beneath(root.as_fd(), key, libc::O_RDONLY | libc::O_NONBLOCK | flags)
        };
        let first = {
            let root = self.root_fd.read().unwrap_or_else(|p| p.into_inner());
            match attempt(&root) {
                Ok(fd) => return Ok(fd),
                Err(e) => (e, root_deleted(&root)),
            }
        };
        match first {
            // The source root was removed (and maybe put back): reopen it, but only as a real
            // directory owned by the same user as the one populate saw. A root swapped for a
            // symlink (to /etc, say) is refused, never followed.
            (_, true) => {
                let fresh = self.reopen_root().map_err(|_| FetchError::NotFound)?;
                let got = attempt(&fresh);
                *self.root_fd.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                got.map_err(classify)
            }
            (err, false) => Err(classify(err)),
        }
    }

    fn reopen_root(&self) -> std::io::Result<OwnedFd> {
        let dir = self.root.parent().unwrap_or(Path::new("/"));
        let name = self.root.file_name().unwrap_or_default();
        let parent: OwnedFd = std::fs::File::open(dir)?.into();
        let fd = sysfs::openat(
            parent.as_fd(),
            &sysfs::cstring(std::os::unix::ffi::OsStrExt::as_bytes(name))?,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        if sysfs::fstat(fd.as_fd())?.st_uid != self.root_uid {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(fd)
    }
}

/// Has the directory behind `root` been removed?
fn root_deleted(root: &OwnedFd) -> bool {
    sysfs::fstat(root.as_fd()).map_or(true, |st| st.st_nlink == 0)
}

/// Filesystems whose reads are served by a local device or memory (mountinfo's names).
const LOCAL_DISK_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "bcachefs", "zfs",
    "squashfs", "erofs",
];

/// Is anything mounted beneath `root` (canonical) that is not a local disk's filesystem? (The
/// root's own filesystem is judged by its `statfs` magic.)
/// `mountinfo` is `/proc/self/mountinfo`: field 5 is the mount point (spaces and backslashes
/// escaped as octal), the filesystem type follows the ` - ` separator.
fn network_mount_beneath(mountinfo: &str, root: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let root = root.as_os_str().as_bytes();
    mountinfo.lines().any(|line| {
        let Some((fields, rest)) = line.split_once(" - ") else {
            return false;
        };
        let Some(point) = fields.split(' ').nth(4) else {
            return false;
        };
        let point = unescape_octal(point);
        let beneath = point
            .strip_prefix(root)
            .is_some_and(|tail| tail.first() == Some(&b'/') || (root == b"/" && !tail.is_empty()));
        let fstype = rest.split(' ').next().unwrap_or("");
        beneath && !LOCAL_DISK_FS.contains(&fstype)
    })
}

/// mountinfo's `\ooo` escapes back to bytes.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn classify(e: std::io::Error) -> FetchError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => FetchError::NotFound,
        Some(libc::ELOOP) | Some(libc::EXDEV) => FetchError::Escape,
        _ => FetchError::Io(e),
    }
}

impl LocalBackend {
    /// Open the object (with `flags` besides read-only), proving it is still the file populate
    /// recorded.
    fn open_unchanged(&self, obj: &SourceRecord, flags: i32) -> Result<OwnedFd, FetchError> {
        let fd = self.open_object(&obj.key, flags)?;
        let st = sysfs::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FetchError::Changed("no longer a regular file".into()));
        }
        let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
        if st.st_size as u64 != obj.size || mtime != obj.mtime {
            return Err(FetchError::Changed(format!(
                "size {} mtime {}.{:09}, recorded size {} mtime {}.{:09}",
                st.st_size, mtime.0, mtime.1, obj.size, obj.mtime.0, obj.mtime.1
            )));
        }
        Ok(fd)
    }
}

/// Alignment of offset, length and memory that direct reads from any Linux block device accept.
const DIRECT_ALIGN: u64 = 4096;

/// Reads into memory that is not aligned for a direct read (a small piece in the heap) go
/// through the thread's aligned buffer up to this long; longer ones through the page cache.
const BOUNCE_MAX: usize = 64 << 10;

thread_local! {
    /// Each thread's buffer for direct reads, of which a 4 KiB-aligned slice is used.
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Read `buf.len()` bytes at `offset` (aligned) from `fd` (opened `O_DIRECT`): whole blocks
/// straight into `buf` when its memory is aligned (a huge-page buffer: see `crate::sys::mem`),
/// the rest (a file's last partial block, or a small piece in the heap) through the thread's
/// aligned buffer. `Ok(false)`: it came back short (at the end of the file, or a filesystem that
/// reads less at once): the caller reads again through the page cache, which tells the two apart.
fn read_direct(
    fd: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let align = DIRECT_ALIGN as usize;
    let whole = if (buf.as_ptr() as usize).is_multiple_of(align) {
        buf.len() / align * align
    } else {
        0
    };
    if whole > 0 && sysfs::pread_once(fd, &mut buf[..whole], offset)? < whole {
        return Ok(false);
    }
    let rest = &mut buf[whole..];
    if rest.is_empty() {
        return Ok(true);
    }
    let span = rest.len().next_multiple_of(align);
    DIRECT_BUF.with_borrow_mut(|space| {
        if space.len() < span + align {
            space.resize(span + align, 0);
        }
        let at = space.as_ptr().align_offset(align);
        let aligned = &mut space[at..at + span];
        let got = sysfs::pread_once(fd, aligned, offset + whole as u64)?;
        if got < rest.len() {
            return Ok(false);
        }
        rest.copy_from_slice(&aligned[..rest.len()]);
        Ok(true)
    })
}

fn short_unless_all(offset: u64, want: usize, got: usize) -> Result<(), FetchError> {
    if got != want {
        return Err(FetchError::Short { offset, want, got });
    }
    Ok(())
}

impl Backend for LocalBackend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        // Around the page cache: the stub is the cache. A source read through it takes as much
        // memory again, and its allocation's time (a cold walk of 12,000 small files, reads
        // from C: 0.10-0.12 s of system time direct, 0.14-0.16 s through the cache; a cold
        // 1 GiB read: 1.58 s -> 1.40 s, native 1.52 s). Where the filesystem or the alignment
        // says no, it goes through the page cache.
        let unaligned_big = !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize)
            && buf.len() > BOUNCE_MAX;
        let wants_direct = offset.is_multiple_of(DIRECT_ALIGN) && !buf.is_empty() && !unaligned_big;
        let (fd, direct) = match wants_direct.then(|| self.open_unchanged(obj, libc::O_DIRECT)) {
            Some(Err(FetchError::Io(e))) if e.raw_os_error() == Some(libc::EINVAL) => {
                (self.open_unchanged(obj, 0)?, false)
            }
            Some(fd) => (fd?, true),
            None => (self.open_unchanged(obj, 0)?, false),
        };
        if direct {
            match read_direct(fd.as_fd(), offset, buf) {
                Ok(true) => return Ok(()),
                Ok(false) => sysfs::set_direct(fd.as_fd(), false)?,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    sysfs::set_direct(fd.as_fd(), false)?
                }
                Err(e) => return Err(e.into()),
            }
        }
        let got = sysfs::pread_full(fd.as_fd(), buf, offset)?;
        short_unless_all(offset, buf.len(), got)
    }

    fn reads_may_stall(&self) -> bool {
        self.may_stall
    }

    fn random_piece(&self) -> u64 {
        // A disk is paid by the byte, not by the request: read what the kernel asks for, as it
        // would natively (a random 4 KiB `pread` reads 4 KiB). 2,000 cold random 4 KiB reads
        // here: 64 KiB pieces 0.79 s, 16 KiB 0.52 s, 4 KiB 0.38 s (native 0.31 s).
        4 << 10
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /srv/data rw,relatime shared:5 - xfs /dev/loop0 rw
31 30 0:27 / /srv/data/scratch rw shared:6 - tmpfs tmpfs rw
40 22 0:40 / /srv/data2 rw shared:9 - nfs4 server:/export rw
41 22 0:41 / /srv/my\\040files/archive rw shared:10 - fuse.rclone remote: rw
";

    #[test]
    fn a_network_or_fuse_mount_beneath_the_root_makes_reads_stall_prone() {
        let stalls = |root: &str| network_mount_beneath(MOUNTINFO, Path::new(root));
        // Local disks and memory beneath: no.
        assert!(!stalls("/srv/data"));
        assert!(!stalls("/srv/data/scratch"));
        // /srv/data2 is a sibling that shares a prefix, not beneath /srv/data; beneath /srv it is.
        assert!(stalls("/srv"));
        assert!(stalls("/"));
        // The root's own mount is judged by its statfs magic, not here.
        assert!(!stalls("/srv/data2"));
        // Mount points with escaped spaces.
        assert!(stalls("/srv/my files"));
        assert!(!stalls("/srv/my"));
    }

    /// A source file of `size` bytes of a pattern, and its record as populate would make it.
    fn source_file(dir: &Path, name: &str, size: usize) -> (Vec<u8>, SourceRecord) {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let st = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        let record = SourceRecord {
            key: name.as_bytes().to_vec(),
            size: size as u64,
            mtime: (st.mtime(), st.mtime_nsec() as u32),
            version: None,
            chunk_size: 1 << 20,
            kind: crate::record::StubKind::Sparse,
            digests: None,
        };
        (bytes, record)
    }

    #[test]
    fn reads_direct_or_not_return_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::open(dir.path()).unwrap();
        // Into heap memory (small pieces) and into aligned memory (a huge-page buffer, as big
        // pieces are read), which a direct read fills without the thread's buffer.
        let mut huge = crate::sys::mem::HugeBuf::new(4 << 20).unwrap();
        let mut check = |record: &SourceRecord, bytes: &[u8], offset: usize, len: usize| {
            let mut heap = vec![0u8; len];
            backend
                .read_range(record, offset as u64, &mut heap)
                .unwrap();
            assert!(
                heap == bytes[offset..offset + len],
                "{len} bytes at {offset}, heap"
            );
            huge.fill(0);
            backend
                .read_range(record, offset as u64, &mut huge[..len])
                .unwrap();
            assert!(
                huge[..len] == bytes[offset..offset + len],
                "{len} bytes at {offset}, aligned"
            );
        };
        // Whole small files whose ends are not block-aligned, one exactly a block, one past
        // the thread's buffer; then pieces: aligned, unaligned, and the tail.
        for size in [1, 4095, 4096, 6001, BOUNCE_MAX + 1, (1 << 20) + 123] {
            let (bytes, record) = source_file(dir.path(), &format!("f{size}"), size);
            check(&record, &bytes, 0, size);
        }
        let size = 3 * BOUNCE_MAX + 123;
        let (bytes, record) = source_file(dir.path(), "big", size);
        for (offset, len) in [
            (4096, 4096),
            (8192, 100),
            (4097, 5000),
            (4096, 2 * BOUNCE_MAX),
            (size - 123, 123),
            (size - 4219, 4219),
        ] {
            check(&record, &bytes, offset, len);
        }
        // Past the end: a short read is an error, never zeros.
        let mut buf = vec![0u8; 4096];
        let err = backend
            .read_range(&record, (size - 100) as u64, &mut buf)
            .unwrap_err();
        assert!(matches!(err, FetchError::Short { .. }), "{err:?}");
    }

    #[test]
    fn octal_escapes_decode_and_other_backslashes_stay() {
        assert_eq!(unescape_octal("a\\040b\\134c"), b"a b\\c");
        assert_eq!(unescape_octal("x\\9y\\"), b"x\\9y\\");
    }
}
