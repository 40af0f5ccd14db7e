//! A seccomp filter for the unprivileged fetcher: a deny-list, not an allow-list.
//!
//! An allow-list would have to name every syscall that tokio, reqwest, rustls, glibc and its
//! NSS modules make on any machine (DNS resolution alone loads modules that may read files, talk
//! to nscd or systemd-resolved over a unix socket or open netlink sockets, depending on the
//! host's `nsswitch.conf`), and a syscall missed there fails or kills the fetcher on someone
//! else's machine only, which is worse than no filter. So the filter allows by default and
//! answers `EPERM` to the syscalls the fetcher never makes and an attacker holding it would want:
//! other processes (`ptrace`, `process_vm_*`, `pidfd_getfd`), new namespaces (`unshare`,
//! `setns`, `clone` with `CLONE_NEW*`), mounts, `exec`, and the kernel interfaces with the
//! largest attack surface (`bpf`, `perf_event_open`, `io_uring`, `userfaultfd`, keyrings,
//! modules, kexec, terminal input injection). Being an errno, never a kill, a denied call can
//! only fail a code path the fetcher does not have.
//!
//! `clone3` is answered `ENOSYS`, as container runtimes do, because its flags sit in memory the
//! filter cannot read: glibc then creates threads with `clone`, whose flags it can. On x86_64,
//! x32 syscall numbers (which would reach the same kernel code under other numbers) are
//! `ENOSYS` too; calls of another architecture (`int 0x80`) kill the process, as
//! `seccompiler`'s filters do for any foreign architecture: the fetcher makes none.
//!
//! Filters are inherited by every thread created later, and installing one needs
//! `no_new_privs` (set by [`super::privilege::drop_to`]) or `CAP_SYS_ADMIN`.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls denied outright.
const DENIED: &[i64] = &[
    // Other processes.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    // Namespaces and mounts.
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Running other programs.
    libc::SYS_execve,
    libc::SYS_execveat,
    // Large kernel attack surface.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_fanotify_init,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    // Root's business (refused anyway without capabilities; listed to be plain).
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
];

/// `clone` flags that make a new namespace (`CLONE_NEWTIME` shares its bit with the exit signal
/// in `clone`, which cannot create a time namespace anyway).
const CLONE_NEW: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// Terminal `ioctl`s that inject input or drive the console.
#[allow(clippy::unnecessary_cast)] // the type of ioctl numbers differs between targets
const DENIED_IOCTLS: &[u64] = &[libc::TIOCSTI as u64, libc::TIOCLINUX as u64];

fn arch() -> Option<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH).ok()
}

fn err(e: seccompiler::BackendError) -> io::Error {
    io::Error::other(format!("seccomp filter: {e}"))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> io::Result<SeccompRule> {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(err)?;
    SeccompRule::new(vec![c]).map_err(err)
}

/// The `EPERM` filter.
fn deny_filter(arch: TargetArch) -> io::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Any one namespace flag is enough (rules of a syscall are or-ed).
    rules.insert(
        libc::SYS_clone,
        CLONE_NEW
            .iter()
            .map(|&f| condition(0, SeccompCmpOp::MaskedEq(f), f))
            .collect::<io::Result<_>>()?,
    );
    rules.insert(
        libc::SYS_ioctl,
        DENIED_IOCTLS
            .iter()
            .map(|&r| condition(1, SeccompCmpOp::Eq, r))
            .collect::<io::Result<_>>()?,
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The `ENOSYS` filter: `clone3`.
fn nosys_filter(arch: TargetArch) -> io::Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// x86_64 only: `ENOSYS` for syscall numbers with the x32 bit, whatever they name.
#[cfg(target_arch = "x86_64")]
fn x32_filter() -> BpfProgram {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K (0)
    const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data: nr at 0, arch at 4.
        op(BPF_LD_W_ABS, 0, 0, 4),
        op(BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(BPF_LD_W_ABS, 0, 0, 0),
        op(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Install the filters (see the module doc) on every thread of this process. `Ok(false)` on an
/// architecture `seccompiler` does not know, or a kernel built without seccomp filters (EINVAL):
/// the fetcher then runs without one.
pub fn restrict_fetcher() -> io::Result<bool> {
    let Some(arch) = arch() else {
        return Ok(false);
    };
    let mut programs = vec![deny_filter(arch)?, nosys_filter(arch)?];
    #[cfg(target_arch = "x86_64")]
    programs.push(x32_filter());
    for (i, p) in programs.iter().enumerate() {
        match seccompiler::apply_filter_all_threads(p) {
            Ok(()) => {}
            Err(seccompiler::Error::Seccomp(e))
                if i == 0 && e.raw_os_error() == Some(libc::EINVAL) =>
            {
                return Ok(false);
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "cannot install a seccomp filter: {e}"
                )))
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        let Some(arch) = arch() else { return };
        assert!(deny_filter(arch).unwrap().len() > DENIED.len());
        assert!(!nosys_filter(arch).unwrap().is_empty());
    }

    /// In a child process (a filter cannot be removed): denied calls fail with their errno, a
    /// thread still starts (through `clone` after `clone3`'s ENOSYS), and ordinary calls work.
    #[test]
    fn denied_calls_fail_and_threads_still_start() {
        if arch().is_none() {
            return;
        }
        // A filter cannot be removed: the checks run in a new process, this test binary anew.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "sys::seccomp::tests::check_in_child",
                "--nocapture",
            ])
            .env("HSM_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("seccomp child ok"), "{text}");
    }

    #[test]
    fn check_in_child() {
        if std::env::var_os("HSM_SECCOMP_CHILD").is_none() {
            return;
        }
        // SAFETY: plain prctl; the filter needs no_new_privs without CAP_SYS_ADMIN.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            0
        );
        assert!(restrict_fetcher().unwrap());
        let errno_of = |r: i64| (r == -1).then(|| io::Error::last_os_error().raw_os_error());
        // SAFETY: plain syscalls with integer arguments; each is expected to fail.
        unsafe {
            let r = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            assert_eq!(errno_of(r), Some(Some(libc::EPERM)), "ptrace");
            let r = libc::unshare(libc::CLONE_NEWUSER);
            assert_eq!(errno_of(r.into()), Some(Some(libc::EPERM)), "unshare");
            let r = libc::syscall(libc::SYS_clone3, 0usize, 0usize);
            assert_eq!(errno_of(r), Some(Some(libc::ENOSYS)), "clone3");
            let r = libc::syscall(libc::SYS_getpid | 0x4000_0000);
            if cfg!(target_arch = "x86_64") {
                assert_eq!(errno_of(r), Some(Some(libc::ENOSYS)), "x32 getpid");
            }
        }
        let t = std::thread::spawn(|| 7).join().unwrap();
        assert_eq!(t, 7);
        assert!(std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')));
        println!("seccomp child ok");
    }
}
