//! Test harness: a loop-mounted filesystem, a source tree, a store on the loop filesystem, and
//! the real `hsm serve` exposing it at a mount point. Everything is torn down on drop (daemon
//! killed by pid, mounts detached, images removed), and every daemon is bounded by a watchdog.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const HSM: &str = env!("CARGO_BIN_EXE_hsm");

/// Filesystems the kernel supports pre-content events on.
pub const FILESYSTEMS: [&str; 3] = ["ext4", "xfs", "btrfs"];
/// `serve`'s arguments for each front end a test body is run under.
#[allow(dead_code)]
pub const FANOTIFY: &[&str] = &[];
#[allow(dead_code)]
pub const FUSE: &[&str] = &["--frontend", "fuse"];

/// Run a command, panic with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(script: &str) -> Output {
    run(Command::new("bash").arg("-c").arg(script))
}

/// A scratch directory under /tmp (tmpfs or the root fs: never marked), removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!(
            "hsm-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loop-mounted image of the given filesystem type.
pub struct LoopFs {
    pub mnt: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    pub fn new(dir: &Path, fs: &str, size: &str) -> LoopFs {
        LoopFs::with_mkfs_args(dir, fs, size, &[])
    }

    /// Like `new`, with extra arguments for mkfs (e.g. `["-I", "256"]` for ext4).
    pub fn with_mkfs_args(dir: &Path, fs: &str, size: &str, extra: &[&str]) -> LoopFs {
        let image = dir.join(format!("{fs}.img"));
        let mnt = dir.join(format!("{fs}-mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("truncate").args(["-s", size]).arg(&image));
        let mkfs = format!("mkfs.{fs}");
        let mut cmd = Command::new(&mkfs);
        match fs {
            "ext4" => cmd.args(["-q", "-F"]),
            "xfs" => cmd.args(["-q", "-f"]),
            "btrfs" => cmd.args(["-q", "-f"]),
            other => panic!("unknown fs {other}"),
        };
        run(cmd.args(extra).arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        LoopFs { mnt, image }
    }
}

impl LoopFs {
    /// Unmount the filesystem and mount its image again: the page cache goes, so what is read
    /// afterwards comes from disk (as after a reboot). Needs every user of the filesystem gone
    /// (stop the daemon first).
    pub fn remount(&self) {
        self.remount_retrying();
    }

    /// `remount`, retrying the unmount for up to 10 s while the filesystem is busy (files of
    /// processes just killed may take a moment to be released).
    pub fn remount_retrying(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("umount").arg(&self.mnt).output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < end,
                "umount {} still failing after 10 s: {}",
                self.mnt.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "umount {} failed, retrying: {}",
                self.mnt.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.mount_again();
    }

    fn mount_again(&self) {
        // The loop device is released with the superblock's last reference: wait for it, so the
        // image is never attached twice.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(Command::new("losetup").arg("-j").arg(&self.image));
            if out.stdout.is_empty() {
                break;
            }
            assert!(
                Instant::now() < end,
                "loop device of {} still attached after unmount: {}",
                self.image.display(),
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.image)
            .arg(&self.mnt));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // A lazy unmount always succeeds; the loop device is released with the last user.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A running `hsm serve`, killed by pid on drop.
pub struct Daemon {
    child: Option<Child>,
    mountpoint: PathBuf,
    pub stderr_log: PathBuf,
    watchdog_done: Arc<AtomicBool>,
}

impl Daemon {
    /// Start `hsm serve STORE MOUNTPOINT` and wait for its `ready` line. The watchdog kills it
    /// after `limit`, so a hung daemon cannot hang the test (its pending events are then allowed
    /// by the kernel and the test's byte comparisons fail instead).
    pub fn start(store: &Path, mountpoint: &Path, extra: &[&str], limit: Duration) -> Daemon {
        Daemon::start_with_open_files(store, mountpoint, extra, limit, None)
    }

    /// [`Daemon::start`], with RLIMIT_NOFILE (soft and hard) set to `open_files` for the daemon.
    pub fn start_with_open_files(
        store: &Path,
        mountpoint: &Path,
        extra: &[&str],
        limit: Duration,
        open_files: Option<u64>,
    ) -> Daemon {
        Daemon::start_with_env(store, mountpoint, extra, limit, open_files, &[])
    }

    /// [`Daemon::start_with_open_files`], with `env` added to the daemon's environment.
    pub fn start_with_env(
        store: &Path,
        mountpoint: &Path,
        extra: &[&str],
        limit: Duration,
        open_files: Option<u64>,
        env: &[(&str, &str)],
    ) -> Daemon {
        // Outside the store's filesystem, so that a full disk cannot swallow the daemon's log.
        let stderr_log =
            std::env::temp_dir().join(format!("hsm-serve-{}.log", rand::random::<u64>()));
        let log = std::fs::File::create(&stderr_log).unwrap();
        let mut cmd = Command::new(HSM);
        cmd.arg("serve")
            .arg(store)
            .arg(mountpoint)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(n) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn hsm serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first.and_then(|l| l.ok()));
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        let pid = child.id() as i32;
        let watchdog_done = Arc::new(AtomicBool::new(false));
        {
            let done = watchdog_done.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + limit;
                while Instant::now() < end {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if !done.load(Ordering::Relaxed) {
                    eprintln!("watchdog: killing hsm serve pid {pid} after {limit:?}");
                    // SAFETY: signalling our own child by pid.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            });
        }
        let mut d = Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            stderr_log,
            watchdog_done,
        };
        if line.as_deref() != Some("ready") {
            let stuck = stuck_report(store);
            let log = d.stop_log();
            panic!("hsm serve did not print ready (got {line:?}); {stuck}stderr:\n{log}");
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM, wait for exit (bounded), return its stderr.
    pub fn stop_log(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.watchdog_done.store(true, Ordering::Relaxed);
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Send `sig` (SIGTERM or SIGINT), wait for exit (bounded), return the exit status (None if
    /// it had to be killed) and its stderr.
    pub fn stop_with(&mut self, sig: i32) -> (Option<std::process::ExitStatus>, String) {
        let mut status = None;
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, sig) };
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        status = Some(st);
                        break;
                    }
                    Ok(None) if Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.watchdog_done.store(true, Ordering::Relaxed);
        let log = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        (status, log)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        let st = child.wait().ok();
        self.watchdog_done.store(true, Ordering::Relaxed);
        st.filter(|s| s.signal().is_some())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_log();
        // If it was killed, its mounts are left: remove them (lazy, by path).
        for _ in 0..2 {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// Where the hsm processes of `store` (serve, its worker, its guard: those whose command line
/// names it) are waiting, thread by thread: for the message of a test that timed out waiting on
/// them, so that a hang seen once names its cause.
pub fn stuck_report(store: &Path) -> String {
    let needle = store.to_string_lossy().into_owned();
    // The filesystem as fanotify's fdinfo names it (the kernel's dev_t: major << 20 | minor).
    let sdev = std::fs::metadata(store).map_or(String::new(), |m| {
        use std::os::unix::fs::MetadataExt;
        let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        format!("sdev:{:x} ", (u64::from(major) << 20) | u64::from(minor))
    });
    let mut out = String::from("hsm processes of the store:\n");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&needle) || !cmdline.contains("hsm") {
            // Another process's fanotify group with a mark on the store's filesystem would
            // hold its accesses as well.
            for (n, mark) in fanotify_marks(pid) {
                if !sdev.is_empty() && mark.contains(&sdev) {
                    out += &format!(
                        "  pid {pid} ({}), group at fd {n}: {mark}\n",
                        cmdline.trim_end()
                    );
                }
            }
            continue;
        }
        out += &format!("  pid {pid}: {}\n", cmdline.trim_end());
        // Threads by what they wait on (a worker has about 190), the main thread's stack.
        let mut waits: std::collections::BTreeMap<String, usize> = Default::default();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}"));
            let stat = read("stat").unwrap_or_default();
            let state = stat[stat.rfind(')').map_or(0, |i| i + 1)..]
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string();
            let comm = read("comm").unwrap_or_default();
            let wchan = read("wchan").unwrap_or_default();
            *waits
                .entry(format!("{} {state} {wchan}", comm.trim()))
                .or_default() += 1;
            if wchan.contains("fanotify") {
                out += &format!(
                    "    tid {tid} waits for a fanotify answer: {}\n",
                    syscall_path(pid, &tid)
                );
            }
            if tid == pid.to_string() {
                out += &format!("    main thread {state} in {wchan}\n");
                for frame in read("stack").unwrap_or_default().lines().take(12) {
                    out += &format!("      {frame}\n");
                }
            }
        }
        for (what, n) in waits {
            out += &format!("    {n} thread(s): {what}\n");
        }
        // Its fanotify groups' marks (`fdinfo`: inode, mount and filesystem marks, their masks
        // and ignore masks): which group an event that nobody answers came from.
        for (n, mark) in fanotify_marks(pid).into_iter().take(12) {
            out += &format!("    group at fd {n}: {mark}\n");
        }
    }
    out
}

/// The marks of every fanotify group process `pid` holds (`fdinfo` lines), by fd number.
fn fanotify_marks(pid: u32) -> Vec<(String, String)> {
    let mut marks = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten();
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if !target.to_string_lossy().contains("fanotify") {
            continue;
        }
        let n = fd.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).unwrap_or_default();
        for line in info
            .lines()
            .filter(|l| l.starts_with("fanotify ") && l.contains("mask:"))
        {
            marks.push((n.clone(), line.to_string()));
        }
    }
    marks
}

/// The system call thread `tid` of `pid` is in and, for an `open`/`openat`/`openat2`, the path
/// it opens (read from the process's memory): which file a blocked open waits on.
fn syscall_path(pid: u32, tid: &str) -> String {
    use std::io::{Read, Seek};
    let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) else {
        return "(no syscall info)".into();
    };
    // The number in decimal, then the arguments in hex.
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|x| match x.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(0),
            None => x.parse().unwrap_or(0),
        })
        .collect();
    let (nr, at) = match f.as_slice() {
        [nr, _, path, ..] if *nr == libc::SYS_openat as u64 || *nr == libc::SYS_openat2 as u64 => {
            (*nr, *path)
        }
        [nr, path, ..] if *nr == libc::SYS_open as u64 => (*nr, *path),
        _ => return format!("syscall {}", line.trim()),
    };
    let mut name = vec![0u8; 512];
    let read = std::fs::File::open(format!("/proc/{pid}/mem")).and_then(|mut mem| {
        mem.seek(std::io::SeekFrom::Start(at))?;
        mem.read(&mut name)
    });
    match read {
        Ok(n) => {
            name.truncate(n);
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            format!(
                "syscall {nr}, path {:?}",
                String::from_utf8_lossy(&name[..end])
            )
        }
        Err(e) => format!("syscall {nr}, path unreadable: {e}"),
    }
}

/// The pid of the store's guard process (`hsm guard`), if `hsm serve` started one.
pub fn guard_pid(store: &Path) -> Option<i32> {
    std::fs::read_to_string(store.join(".hsm/guard.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` is `hsm guard` of `store` (so that a recycled pid is never signalled).
fn is_guard_of(pid: i32, store: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.get(1) == Some(&&b"guard"[..])
        && args.get(2).is_some_and(|a| {
            Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a)) == store
        })
}

/// End the store's guard (SIGTERM by pid), waiting up to 10 s for it to go. After this, stubs
/// reached through leftover mounts are no longer guarded: for teardown.
pub fn stop_guard(store: &Path) {
    let Some(pid) = guard_pid(store) else { return };
    let store = store.canonicalize().unwrap_or_else(|_| store.to_path_buf());
    if !is_guard_of(pid, &store) {
        return;
    }
    // SAFETY: signalling a process we checked is this store's guard.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    while is_guard_of(pid, &store) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Source tree, store on a loop filesystem, and a mount point: the usual test setup.
/// Field order matters: the daemon goes first, then the filesystem, then the scratch dir.
pub struct Fixture {
    pub daemon: Option<Daemon>,
    pub fs_kind: String,
    pub source: PathBuf,
    pub store: PathBuf,
    pub view: PathBuf,
    pub fs: LoopFs,
    pub scratch: Scratch,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The daemon first, then its guard, then (by field order) the filesystem.
        self.daemon.take();
        stop_guard(&self.store);
    }
}

impl Fixture {
    /// `size` is the loop image size ("2G"); the image is sparse, so big sizes cost nothing.
    pub fn new(fs: &str, size: &str) -> Fixture {
        Fixture::with_mkfs_args(fs, size, &[])
    }

    /// Like `new`, with extra arguments for mkfs.
    pub fn with_mkfs_args(fs: &str, size: &str, mkfs_extra: &[&str]) -> Fixture {
        let scratch = Scratch::new(fs);
        let source = scratch.path.join("src");
        std::fs::create_dir_all(&source).unwrap();
        let lfs = LoopFs::with_mkfs_args(&scratch.path, fs, size, mkfs_extra);
        let store = lfs.mnt.join("store");
        let view = scratch.path.join("view");
        Fixture {
            daemon: None,
            fs_kind: fs.to_string(),
            source,
            store,
            view,
            fs: lfs,
            scratch,
        }
    }

    /// `hsm populate SOURCE STORE [extra]`, asserting success.
    pub fn populate(&self, extra: &[&str]) -> Output {
        run(Command::new(HSM)
            .arg("populate")
            .arg(&self.source)
            .arg(&self.store)
            .args(extra)
            .stdin(Stdio::null()))
    }

    pub fn serve(&mut self, extra: &[&str]) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.daemon = Some(Daemon::start(
            &self.store,
            &self.view,
            extra,
            Duration::from_secs(600),
        ));
    }

    /// [`Fixture::serve`] with `env` added to the daemon's environment.
    pub fn serve_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.daemon = Some(Daemon::start_with_env(
            &self.store,
            &self.view,
            extra,
            Duration::from_secs(600),
            None,
            env,
        ));
    }

    /// [`Fixture::serve`] with the daemon's open-files limit set to `n`.
    pub fn serve_with_open_files(&mut self, extra: &[&str], n: u64) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.daemon = Some(Daemon::start_with_open_files(
            &self.store,
            &self.view,
            extra,
            Duration::from_secs(600),
            Some(n),
        ));
    }

    /// The pid of the daemon's worker (`.hsm/worker.pid`), once it is up.
    pub fn worker_pid(&self) -> i32 {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let pid = std::fs::read_to_string(self.store.join(".hsm/worker.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| Path::new(&format!("/proc/{p}")).exists()) {
                return pid;
            }
            assert!(Instant::now() < end, "no worker within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the daemon (SIGTERM) and return its final metrics.
    pub fn stop(&mut self) -> serde_json::Value {
        if let Some(mut d) = self.daemon.take() {
            d.stop_log();
        }
        self.metrics()
    }

    /// The daemon rewrites metrics.json (to a temporary file renamed over it: a new inode each
    /// time) every 500 ms while it runs. Wait for two rewrites after this call: the second
    /// one's snapshot was taken after the call, so it counts everything done before it.
    pub fn settled_metrics(&self) -> serde_json::Value {
        use std::os::unix::fs::MetadataExt;
        let path = self.store.join(".hsm/metrics.json");
        let ino = || std::fs::metadata(&path).map(|m| m.ino()).ok();
        let mut last = ino();
        let mut rewrites = 0;
        let end = Instant::now() + Duration::from_secs(60);
        while rewrites < 2 {
            assert!(Instant::now() < end, "metrics.json not rewritten for 60 s");
            std::thread::sleep(Duration::from_millis(50));
            let now = ino();
            if now.is_some() && now != last {
                rewrites += 1;
                last = now;
            }
        }
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    pub fn metrics(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.store.join(".hsm/metrics.json"))
            .expect("metrics.json written by hsm serve");
        serde_json::from_str(&text).unwrap()
    }

    pub fn src(&self, rel: &str) -> PathBuf {
        self.source.join(rel)
    }

    pub fn at(&self, rel: &str) -> PathBuf {
        self.view.join(rel)
    }

    /// The stub itself, by the store's private path (never marked: reading it gives stub bytes).
    pub fn stub(&self, rel: &str) -> PathBuf {
        self.store.join("tree").join(rel)
    }

    /// Write a file of deterministic pseudo-random bytes into the source.
    pub fn write_source(&self, rel: &str, len: usize, seed: u64) -> Vec<u8> {
        let data = pattern(len, seed);
        let p = self.src(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, &data).unwrap();
        data
    }
}

/// Deterministic pseudo-random bytes: never zeros for long, so stub zeros cannot pass as content.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Assert two byte strings are equal, reporting the first difference rather than dumping them.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes read, {} expected, first difference at byte {first}",
        got.len(),
        want.len()
    );
}

/// Skip (pass with a note) when not root: these tests need loop mounts and CAP_SYS_ADMIN. Under
/// CI (`CI=true`) a test that cannot run fails instead: it never passes silently there.
pub fn require_root() -> bool {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "this test needs root (loop mounts, CAP_SYS_ADMIN) and CI=true is set"
        );
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

/// A counter from metrics.json.
pub fn metric(m: &serde_json::Value, key: &str) -> u64 {
    m[key]
        .as_u64()
        .unwrap_or_else(|| panic!("metric {key} missing in {m}"))
}

/// Is `p` a mount point in our mount namespace?
pub fn is_mounted(p: &Path) -> bool {
    hsm::sys::mount::is_mount_point(p).expect("read /proc/self/mountinfo")
}

/// Open a stub for its raw bytes (unfilled ranges as the stub holds them), raising no event and
/// needing no daemon: through a private view of the store (see `hsm::guard::open_for_tool`).
pub fn raw_open(p: &Path, write: bool) -> std::fs::File {
    hsm::guard::open_for_tool(p, std::fs::File::options().read(true).write(write))
        .unwrap_or_else(|e| panic!("raw open of {}: {e}", p.display()))
}

/// A stub's raw bytes (see [`raw_open`]).
pub fn raw_read(p: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut v = Vec::new();
    raw_open(p, false).read_to_end(&mut v).unwrap();
    v
}

/// A mount made by a test (a bind, an overlay, a loop mount), detached lazily by path on drop.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

impl Mounted {
    /// `mount --bind FROM TO` (TO is made if missing).
    pub fn bind(from: &Path, to: &Path) -> Mounted {
        std::fs::create_dir_all(to).unwrap();
        run(Command::new("mount").arg("--bind").arg(from).arg(to));
        Mounted(to.to_path_buf())
    }

    /// Unmount now (not lazily), so that a loop device set up by `mount -o loop` is released.
    pub fn unmount(self) {
        let out = Command::new("umount").arg(&self.0).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "umount {}: {}",
                self.0.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Drop retries lazily.
    }
}

/// Pages of `path` in the page cache.
pub fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared map of the whole file, unmapped below; `vec` has one byte per
    // page of it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

/// Wait (10 s at most) until the daemon's counter `key` reaches `want`; its last value.
pub fn wait_for_metric(fx: &Fixture, key: &str, want: u64) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = fx.settled_metrics();
        if metric(&m, key) >= want || Instant::now() > end {
            return m;
        }
    }
}
