//! `hsm demo [--fs xfs|ext4|btrfs]`: the whole thing, on a throw-away filesystem, in seconds.
//!
//! As root on a fresh machine: makes a temporary directory under /tmp, a sparse image file in it,
//! formats and loop-mounts it, generates a source tree in the temporary directory (a few hundred
//! small text files, one 64 MiB data file and a copy of `/bin/ls`), runs `hsm populate` and
//! `hsm serve` (this very binary, as child processes), then reads through MOUNTPOINT: `cat` of a
//! small file, 1 MiB from the middle of the big file, and runs the `ls` stub. Every byte read is
//! compared with the source. The report says what was fetched against the tree's size, what the
//! stub tree costs on disk (`df` before and after populate) and what `hsm status` sees.
//!
//! Everything is torn down even on error or Ctrl-C (guards dropped in order: daemon by pid with
//! SIGTERM, then SIGKILL if it does not stop; its mount; the loop mount; the temporary directory).
//! A watchdog kills the daemon by pid if the demo runs for more than [`DAEMON_LIMIT`], so a hung
//! read cannot hang the demo. Exit status: non-zero if any byte read differed from the source.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::metrics::Snapshot;
use crate::status;
use crate::sys::fs as sysfs;

/// The daemon is killed by the watchdog after this long, whatever happens.
pub const DAEMON_LIMIT: Duration = Duration::from_secs(60);
const IMAGE_SIZE: u64 = 1 << 30;
const BIG_SIZE: usize = 64 << 20;
const BIG_READ_AT: u64 = 32 << 20;
const BIG_READ_LEN: usize = 1 << 20;
const SMALL_FILE: &str = "docs/d2/s3/note-4.txt";

struct Demo {
    t0: Instant,
    interrupted: Arc<AtomicBool>,
}

impl Demo {
    fn step(&self, msg: impl AsRef<str>) -> anyhow::Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("interrupted; cleaning up");
        }
        println!(
            "[{:5.1}s] {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

pub fn run(fs: &str) -> anyhow::Result<()> {
    let (mkfs, mkfs_args): (&str, &[&str]) = match fs {
        "xfs" => ("mkfs.xfs", &["-q", "-f"]),
        "ext4" => ("mkfs.ext4", &["-q", "-F"]),
        "btrfs" => ("mkfs.btrfs", &["-q", "-f"]),
        other => bail!("--fs {other:?}: the demo runs on xfs, ext4 or btrfs"),
    };
    if !sysfs::has_cap_sys_admin() {
        bail!(
            "hsm demo must run as root: it formats and loop-mounts a filesystem image, and \
             hsm serve needs CAP_SYS_ADMIN for fanotify pre-content events; run `sudo hsm demo`"
        );
    }
    if find_program(mkfs).is_none() {
        let pkg = match fs {
            "xfs" => "xfsprogs",
            "btrfs" => "btrfs-progs",
            _ => "e2fsprogs",
        };
        bail!("{mkfs} not found: install it (`apt-get install {pkg}`) or choose another --fs");
    }
    let demo = Demo {
        t0: Instant::now(),
        interrupted: Arc::new(AtomicBool::new(false)),
    };
    // Ctrl-C or SIGTERM: finish the current step, then clean up through the guards.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, demo.interrupted.clone())?;
    }
    let exe = std::env::current_exe().context("cannot find the hsm executable")?;

    // Guards, dropped in reverse order: daemon, loop mount, then the directory.
    let work = WorkDir::new()?;
    demo.step(format!(
        "working in {} (removed at the end)",
        work.path.display()
    ))?;
    let image = work.path.join(format!("{fs}.img"));
    let mnt = work.path.join("mnt");
    let view = work.path.join("view");
    let src = work.path.join("source");
    let store = mnt.join("store");
    for d in [&mnt, &view, &src] {
        fs::create_dir(d)?;
    }
    File::create(&image)?.set_len(IMAGE_SIZE)?;
    demo.step(format!(
        "formatting a {} sparse image with {mkfs}",
        status::human(IMAGE_SIZE)
    ))?;
    run_bounded(
        Command::new(mkfs).args(mkfs_args).arg(&image),
        &work.path.join("mkfs.log"),
        Duration::from_secs(60),
    )?;
    let _loop_mount = LoopMount::new(&image, &mnt, &work.path)?;
    demo.step(format!("loop-mounted it at {}", mnt.display()))?;

    let source = generate_source(&src)?;
    demo.step(format!(
        "generated the source tree {}: {} files, {} ({} small text files, a {} data file, a copy of /bin/ls)",
        src.display(),
        source.files,
        status::human(source.bytes),
        source.files - 2,
        status::human(BIG_SIZE as u64),
    ))?;

    let before = synced_disk_use(&mnt)?;
    demo.step(format!(
        "hsm populate {} {}",
        src.display(),
        store.display()
    ))?;
    let log = work.path.join("populate.log");
    run_bounded(
        Command::new(&exe).arg("populate").arg(&src).arg(&store),
        &log,
        Duration::from_secs(60),
    )?;
    for line in fs::read_to_string(log.with_extension("err"))
        .unwrap_or_default()
        .lines()
    {
        if line.starts_with("store on") || line.starts_with("populated") {
            demo.step(format!("  {line}"))?;
        }
    }
    let after = synced_disk_use(&mnt)?;

    demo.step(format!("hsm serve {} {}", store.display(), view.display()))?;
    let mut daemon = Daemon::start(&exe, &store, &view, &work.path.join("serve.log"))?;
    demo.step(format!(
        "daemon ready (pid {}); reading through {}",
        daemon.pid,
        view.display()
    ))?;

    let mut reads: Vec<Read> = Vec::new();

    // 1. cat a small file.
    let want = fs::read(src.join(SMALL_FILE))?;
    let out = work.path.join("cat.out");
    let st = run_bounded(
        Command::new("cat").arg(view.join(SMALL_FILE)),
        &out,
        Duration::from_secs(30),
    );
    let got = fs::read(&out).unwrap_or_default();
    reads.push(Read::compare(
        format!("cat {SMALL_FILE}"),
        &got,
        &want,
        st.err(),
    ));
    demo.step(reads.last().unwrap().line())?;

    // 2. 1 MiB from the middle of the big file.
    let mut want = vec![0u8; BIG_READ_LEN];
    File::open(src.join("data/big.bin"))?.read_exact_at(&mut want, BIG_READ_AT)?;
    let mut got = vec![0u8; BIG_READ_LEN];
    let res =
        File::open(view.join("data/big.bin")).and_then(|f| f.read_exact_at(&mut got, BIG_READ_AT));
    reads.push(Read::compare(
        format!(
            "{} at offset {} of data/big.bin ({})",
            status::human(BIG_READ_LEN as u64),
            status::human(BIG_READ_AT),
            status::human(BIG_SIZE as u64)
        ),
        &got,
        &want,
        res.err().map(anyhow::Error::from),
    ));
    demo.step(reads.last().unwrap().line())?;

    // 3. Run the ls stub; its output must be that of the real ls.
    let list_dir = src.join("docs/d1");
    let ls_args = ["-laR", "--time-style=+%s"];
    let want_out = work.path.join("ls-real.out");
    run_bounded(
        Command::new("/bin/ls")
            .args(ls_args)
            .arg(&list_dir)
            .env("LC_ALL", "C"),
        &want_out,
        Duration::from_secs(30),
    )?;
    let got_out = work.path.join("ls-stub.out");
    let st = run_bounded(
        Command::new(view.join("bin/ls"))
            .args(ls_args)
            .arg(&list_dir)
            .env("LC_ALL", "C"),
        &got_out,
        Duration::from_secs(30),
    );
    reads.push(Read::compare(
        "ran the stub bin/ls (an ELF executable): its output against /bin/ls's".into(),
        &fs::read(&got_out).unwrap_or_default(),
        &fs::read(&want_out)?,
        st.err(),
    ));
    demo.step(reads.last().unwrap().line())?;

    demo.step("stopping the daemon (SIGTERM)")?;
    let exit = daemon.stop();
    let metrics: Snapshot = fs::read_to_string(store.join(".hsm/metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .context("the daemon left no readable metrics.json")?;
    let scan = status::scan(&[store.join("tree")], |_| {})?;

    // The report.
    let failed: Vec<&Read> = reads.iter().filter(|r| !r.ok()).collect();
    let stub_cost = after.used_bytes.saturating_sub(before.used_bytes);
    let pool = fs::metadata(store.join(".hsm/zeros")).map_or(0, |m| m.len());
    println!();
    println!("hsm demo on {fs}: report");
    println!("  read through the mount point, compared byte for byte with the source:");
    for r in &reads {
        println!("    {}", r.line());
    }
    println!(
        "  fetched from the source: {} in {} backend reads, of a tree of {} ({:.2}%); \
         {} events answered, {} denied",
        status::human(metrics.fetched_bytes),
        metrics.backend_reads,
        status::human(source.bytes),
        metrics.fetched_bytes as f64 * 100.0 / source.bytes as f64,
        metrics.allowed + metrics.denied,
        metrics.denied,
    );
    println!(
        "  disk cost of the stub tree: {} on {fs} (df used, before and after populate){}, for a \
         source of {}",
        status::human(stub_cost),
        if pool > 0 {
            format!(
                ": the {} zero pool that cloned stubs share (paid once per filesystem) and {} \
                 for the {} stubs themselves",
                status::human(pool),
                status::human(stub_cost.saturating_sub(pool)),
                source.files
            )
        } else {
            String::new()
        },
        status::human(source.bytes),
    );
    if fs == "ext4" {
        println!(
            "  (ext4 has no reflinks: stubs there are sparse files, fetched whole when opened so \
             that no copy tool sees their holes; xfs and btrfs fetch big files range by range)"
        );
    }
    println!("  hsm status {}/tree:", store.display());
    println!("    {}", scan.totals.line());
    match exit {
        Some(st) if st.success() => {}
        other => println!("  warning: the daemon did not exit cleanly ({other:?})"),
    }
    if failed.is_empty() {
        println!(
            "  result: OK, all {} bytes read matched the source",
            reads.iter().map(|r| r.len).sum::<usize>()
        );
    } else {
        println!(
            "  result: FAILED, {} read(s) differed from the source",
            failed.len()
        );
    }
    let _ = std::io::stdout().flush();
    demo.step("cleaning up")?;
    drop(daemon);
    drop(_loop_mount);
    drop(work);
    println!("[{:5.1}s] done", demo.t0.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!(
            "{} read(s) did not return the source's bytes: {}",
            failed.len(),
            failed
                .iter()
                .map(|r| r.what.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// One read and how it compared with the source.
struct Read {
    what: String,
    len: usize,
    /// None: identical. Some: what went wrong.
    problem: Option<String>,
}

impl Read {
    fn compare(what: String, got: &[u8], want: &[u8], err: Option<anyhow::Error>) -> Read {
        let problem = if let Some(e) = err {
            Some(format!("failed: {e:#}"))
        } else if got.len() != want.len() {
            Some(format!("{} bytes, {} expected", got.len(), want.len()))
        } else {
            got.iter().zip(want).position(|(a, b)| a != b).map(|i| {
                let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
                format!("{n} bytes differ, the first at byte {i}")
            })
        };
        Read {
            what,
            len: got.len(),
            problem,
        }
    }

    fn ok(&self) -> bool {
        self.problem.is_none()
    }

    fn line(&self) -> String {
        match &self.problem {
            None => format!("{}: {} bytes, identical", self.what, self.len),
            Some(p) => format!("{}: DIFFERENT: {p}", self.what),
        }
    }
}

struct Source {
    files: u64,
    bytes: u64,
}

/// A few hundred small text files in nested directories, one 64 MiB data file, a copy of /bin/ls.
fn generate_source(root: &Path) -> anyhow::Result<Source> {
    let mut files = 0;
    let mut bytes = 0;
    for d in 0..6 {
        for s in 0..5 {
            let dir = root.join(format!("docs/d{d}/s{s}"));
            fs::create_dir_all(&dir)?;
            for n in 0..10 {
                let mut text = String::new();
                for line in 0..(5 + (d * 7 + s * 3 + n * 11) % 60) {
                    text.push_str(&format!(
                        "docs/d{d}/s{s}/note-{n}.txt line {line}: the quick brown fox jumps over \
                         the lazy dog {}\n",
                        (d + 1) * (s + 2) * (n + 3) * (line + 5)
                    ));
                }
                fs::write(dir.join(format!("note-{n}.txt")), &text)?;
                files += 1;
                bytes += text.len() as u64;
            }
        }
    }
    fs::create_dir_all(root.join("data"))?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut big = Vec::with_capacity(BIG_SIZE);
    while big.len() < BIG_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    fs::write(root.join("data/big.bin"), &big)?;
    files += 1;
    bytes += big.len() as u64;
    fs::create_dir_all(root.join("bin"))?;
    let ls = root.join("bin/ls");
    fs::copy("/bin/ls", &ls).context("cannot copy /bin/ls into the demo source")?;
    fs::set_permissions(&ls, fs::Permissions::from_mode(0o755))?;
    files += 1;
    bytes += fs::metadata(&ls)?.len();
    Ok(Source { files, bytes })
}

fn synced_disk_use(mnt: &Path) -> anyhow::Result<status::DiskUse> {
    let dir = File::open(mnt)?;
    sysfs::syncfs(std::os::fd::AsFd::as_fd(&dir))?;
    Ok(status::disk_use(mnt)?)
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Run a command with stdout to `out` and stderr to `out`.err, killing it by pid after `limit`.
/// Fails with its stderr when it fails.
fn run_bounded(cmd: &mut Command, out: &Path, limit: Duration) -> anyhow::Result<()> {
    let err_path = out.with_extension("err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(out)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}): {}",
            fs::read_to_string(&err_path).unwrap_or_default().trim()
        );
    }
    Ok(())
}

/// Send a signal to our own child by pid (never by name).
fn signal(pid: i32, sig: libc::c_int) {
    // Callers pass the pid of a child they have not reaped yet.
    let _ = crate::sys::process::kill(pid, sig);
}

fn is_mount_point(p: &Path) -> bool {
    // On error (no mountinfo), assume the worst: nothing is removed through it.
    crate::sys::mount::is_mount_point(p).unwrap_or(true)
}

/// The temporary directory, removed on drop, but never through a mount still attached in it.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = PathBuf::from(format!("/tmp/hsm-demo-{}-{nanos:08x}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for sub in ["mnt", "view"] {
            let p = self.path.join(sub);
            if is_mount_point(&p) {
                eprintln!(
                    "hsm demo: {} is still mounted; leaving {} in place",
                    p.display(),
                    self.path.display()
                );
                return;
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("hsm demo: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A loop mount, unmounted on drop (lazily if it is busy: the loop device is freed with its last
/// user).
struct LoopMount {
    mnt: PathBuf,
}

impl LoopMount {
    fn new(image: &Path, mnt: &Path, work: &Path) -> anyhow::Result<LoopMount> {
        run_bounded(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(mnt),
            &work.join("mount.log"),
            Duration::from_secs(30),
        )?;
        Ok(LoopMount {
            mnt: mnt.to_path_buf(),
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // The store's guard (started by serve) ends with the filesystem anyway; ended first, so
        // that nothing of the demo outlives it.
        let _ = crate::guard::stop(&self.mnt.join("store"));
        let quiet = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.mnt)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(false) && !quiet(true) {
            eprintln!("hsm demo: cannot unmount {}", self.mnt.display());
        }
    }
}

/// `hsm serve` as a child: stopped by pid (SIGTERM, then SIGKILL) on drop, killed by a watchdog
/// after [`DAEMON_LIMIT`]. Its mount point is detached on drop if it was left behind.
struct Daemon {
    child: Option<Child>,
    pid: u32,
    /// The pid the watchdog may kill; taken before the child is reaped so a reused pid is safe.
    live_pid: Arc<Mutex<Option<i32>>>,
    view: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(exe: &Path, store: &Path, view: &Path, log: &Path) -> anyhow::Result<Daemon> {
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(store)
            .arg(view)
            .args(["--drain", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(log)?)
            .spawn()
            .context("cannot start hsm serve")?;
        let pid = child.id();
        let live_pid = Arc::new(Mutex::new(Some(pid as i32)));
        {
            let live = live_pid.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + DAEMON_LIMIT;
                while Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(100));
                    if live.lock().map_or(true, |p| p.is_none()) {
                        return;
                    }
                }
                // Holding the lock: the child cannot be reaped (and its pid reused) meanwhile.
                if let Ok(p) = live.lock() {
                    if let Some(pid) = *p {
                        eprintln!("hsm demo: watchdog: killing hsm serve (pid {pid})");
                        signal(pid, libc::SIGKILL);
                    }
                }
            });
        }
        let stdout = child.stdout.take().context("no stdout from hsm serve")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(|l| l.ok()));
            for _ in lines {}
        });
        let mut d = Daemon {
            child: Some(child),
            pid,
            live_pid,
            view: view.to_path_buf(),
            log: log.to_path_buf(),
        };
        let line = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        if line.as_deref() != Some("ready") {
            d.stop();
            bail!(
                "hsm serve did not become ready (got {line:?}); its log:\n{}",
                fs::read_to_string(&d.log).unwrap_or_default()
            );
        }
        Ok(d)
    }

    /// SIGTERM, wait up to 20 s, then SIGKILL. Returns the exit status the first time.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // From here on the watchdog leaves the pid alone: we reap it ourselves, bounded.
        if let Ok(mut p) = self.live_pid.lock() {
            *p = None;
        }
        signal(child.id() as i32, libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // A daemon that was killed leaves its mounts (the tree over a private self-bind).
        for _ in 0..2 {
            if !is_mount_point(&self.view) {
                break;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.view)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
