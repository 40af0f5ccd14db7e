//! The new mount API: a detached clone of a directory tree that is marked for fanotify *before*
//! it becomes reachable, then attached at the mount point in one step, so that no file can be
//! opened through the exposed tree without the daemon's mark.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::CWD;
use rustix::mount::{
    mount_bind, mount_change, move_mount, open_tree, unmount, MountPropagationFlags,
    MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

/// `open_tree(OPEN_TREE_CLONE)`: a detached bind mount of `dir`, reachable only through the fd.
pub fn clone_tree(dir: &Path) -> io::Result<OwnedFd> {
    Ok(open_tree(
        CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?)
}

/// Attach a detached mount at `target`.
pub fn attach(tree: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    Ok(move_mount(
        tree,
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?)
}

/// Lazily detach the mount at `target`: new lookups fail at once; files already open stay open.
pub fn detach(target: &Path) -> io::Result<()> {
    Ok(unmount(target, UnmountFlags::DETACH)?)
}

/// Bind `dir` onto itself with private propagation. Attaching the tree on top of this private
/// mount keeps it from propagating into peer mount namespaces, where copies would carry no mark.
pub fn bind_self_private(dir: &Path) -> io::Result<()> {
    mount_bind(dir, dir)?;
    if let Err(e) = mount_change(dir, MountPropagationFlags::PRIVATE) {
        let _ = detach(dir);
        return Err(e.into());
    }
    Ok(())
}

/// Is anything mounted exactly at `dir` (a canonical path)?
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|mp| mp == dir))
}

/// Every mount point in this mount namespace, from `/proc/self/mountinfo`.
pub fn mount_points() -> io::Result<Vec<std::path::PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| std::ffi::OsString::from_vec(unescape_mountinfo(mp)).into())
        .collect())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// The directory of the filesystem that is mounted (`/` for a whole filesystem).
    pub root: std::path::PathBuf,
    pub mount_point: std::path::PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Every mount of this namespace, in mountinfo's order (a mount stacked on another comes after).
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

fn parse_mountinfo(info: &str) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    let path = |s: &str| -> std::path::PathBuf {
        std::ffi::OsString::from_vec(unescape_mountinfo(s)).into()
    };
    info.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let f: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            Some(MountEntry {
                id: f.first()?.parse().ok()?,
                parent: f.get(1)?.parse().ok()?,
                dev: f.get(2)?.to_string(),
                root: path(f.get(3)?),
                mount_point: path(f.get(4)?),
                fstype: t.first()?.to_string(),
                source: t.get(1).map_or(String::new(), |s| s.to_string()),
            })
        })
        .collect()
}

/// The mount on top at `dir` (canonical), if something is mounted exactly there.
pub fn top_mount_at(mounts: &[MountEntry], dir: &Path) -> Option<MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == dir).cloned()
}

/// Whether `m` is a bind of its own mount point onto itself (what `bind_self_private` makes):
/// the same filesystem as the mount it sits on, rooted at the directory it covers.
pub fn is_self_bind(mounts: &[MountEntry], m: &MountEntry) -> bool {
    let Some(under) = mounts.iter().find(|p| p.id == m.parent) else {
        return false;
    };
    let Ok(rel) = m.mount_point.strip_prefix(&under.mount_point) else {
        return false;
    };
    under.dev == m.dev && m.root == under.root.join(rel)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_self_bind_is_told_from_another_filesystem_at_the_same_place() {
        let info = "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n\
                    60 22 8:1 /srv/mp /srv/mp rw - ext4 /dev/sda1 rw\n\
                    61 60 7:1 /store/tree /srv/mp rw - xfs /dev/loop1 rw\n\
                    62 22 0:50 / /srv/other rw - tmpfs tmpfs rw\n";
        let m = super::parse_mountinfo(info);
        assert_eq!(m.len(), 4);
        let top = super::top_mount_at(&m, std::path::Path::new("/srv/mp")).unwrap();
        assert_eq!((top.id, top.fstype.as_str()), (61, "xfs"));
        assert!(super::is_self_bind(&m, &m[1]));
        assert!(!super::is_self_bind(&m, &m[2]));
        assert!(!super::is_self_bind(&m, &m[3]));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(super::unescape_mountinfo(r"/a\040b\012c"), b"/a b\nc");
        assert_eq!(super::unescape_mountinfo(r"/x\"), b"/x\\");
    }
}
