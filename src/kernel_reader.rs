//! Opens after which the kernel reads the file itself, with no pre-content event: such a stub
//! must be complete before the open returns (the daemon fetches it whole; the guard refuses it).
//!
//! Two cases are recognised:
//! - a loop device: `losetup`, `mount -o loop` (which attaches the device itself) and the other
//!   tools of [`LOOP_TOOLS`] open the backing file, then the loop driver reads it from inside
//!   the kernel. Told by the opener's name, which its own open event carries (a program of
//!   another name that attaches loop devices is not recognised: see the README, "Kernel
//!   readers").
//! - overlayfs (and any other stacking filesystem) opening a layer's file: it opens the real
//!   file through a private clone of the layer's mount, which is in no mount namespace, and
//!   then maps its pages for the overlay file's `mmap` and `execve` without raising an event on
//!   the real file. Told by the event fd's mount: not one of the opener's own mounts. A
//!   container's volume is a real mount in the container's namespace, so its files are still
//!   filled range by range.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether the open that `pid` made of the file behind `event_fd` hands it to a kernel reader.
pub fn opened_for_kernel_reader(pid: i32, event_fd: BorrowedFd<'_>) -> bool {
    opened_by_loop_tool(pid) || opened_through_hidden_mount(pid, event_fd)
}

/// Programs known to attach the files they open to loop devices (`comm`, at most 15 bytes):
/// util-linux, udisks, snapd (snaps are squashfs images), and the systemd tools that mount
/// disk images (dissect, nspawn, sysext and confext, portabled, mountfsd).
const LOOP_TOOLS: &[&[u8]] = &[
    b"losetup",
    b"mount",
    b"udisksd",
    b"snapd",
    b"systemd-dissect",
    b"systemd-nspawn",
    b"systemd-sysext",
    b"systemd-confext",
    b"systemd-portabl",
    b"systemd-mountfs",
];

/// Said once by `hsm serve` at start: what the name check leaves open. The exact guard, a BPF LSM
/// hook on the loop-attach ioctls, is not loaded (see the README, "Kernel readers": the project's
/// kernel refuses BPF LSM programs although it lists the BPF LSM).
pub fn log_loop_attach_limit() {
    tracing::info!(
        "loop devices: attaches are recognised by the attaching program's name only (losetup, \
         mount, udisksd, snapd, the systemd image tools), which fill a stub first; a program of \
         another name attaching a stub that is not complete gets a device that reads zeros where \
         the stub is filled range by range: run `hsm hydrate FILE` before attaching FILE with it"
    );
}

fn opened_by_loop_tool(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| LOOP_TOOLS.contains(&comm.trim_ascii_end()))
}

/// The event fd is opened on the mount the access came through. Not in the opener's mount
/// namespace: a stacking filesystem's private mount. Unknown (the opener is gone): no.
fn opened_through_hidden_mount(pid: i32, event_fd: BorrowedFd<'_>) -> bool {
    let Some(mnt_id) = mount_id(event_fd) else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
        Ok(info) => !mount_listed(&info, mnt_id),
        Err(_) => false,
    }
}

/// The mount id of an open file, from `/proc/self/fdinfo`.
fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn mount_listed(mountinfo: &str, mnt_id: u64) -> bool {
    mountinfo
        .lines()
        .any(|l| l.split(' ').next().and_then(|id| id.parse().ok()) == Some(mnt_id))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn a_file_of_one_of_our_own_mounts_is_not_hidden() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let id = super::mount_id(f.as_fd()).expect("mnt_id in fdinfo");
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(super::mount_listed(&info, id));
        assert!(!super::mount_listed(&info, u64::MAX));
        assert!(!super::opened_through_hidden_mount(
            std::process::id() as i32,
            f.as_fd()
        ));
        assert!(!super::opened_by_loop_tool(std::process::id() as i32));
    }
}
