//! Issue 23: stubs are guarded through every mount of the store's filesystem, and fail closed
//! when no daemon runs. On ext4, xfs and btrfs, with the real `hsm serve`, real mounts
//! (`mount --bind`, `unshare -m`, `mount --rbind` in a new namespace) and plain reads: every read
//! returns the source's bytes or fails with EIO; never stub zeros.
mod common;
use common::*;

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Above `--whole-below` (4 MiB): a cloned stub filled range by range on xfs and btrfs.
const BIG: usize = 6 * MIB + 4097;

fn errno_of(r: &io::Result<Vec<u8>>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// The bytes `cat` reads, run in a shell command (in another mount namespace, say).
fn cat_in(script: &str) -> Vec<u8> {
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Wait (bounded) until `counter` is above `from`.
fn wait_above(counter: &AtomicU64, from: u64, what: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::Relaxed) <= from {
        assert!(Instant::now() < end, "{what}: none in 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is gone (or a zombie: it can do nothing more).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        let state = s[s.rfind(')').map_or(0, |i| i + 1)..].trim_start();
        state.starts_with('Z') || state.starts_with('X')
    })
}

/// Whether thread `tid` of this process is asleep waiting for a fanotify permission answer.
fn waits_on_fanotify(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
        .is_ok_and(|w| w.contains("fanotify"))
}

/// Kill both daemon processes at once, as a crash (or an OOM kill of the cgroup) would.
fn kill_both(fx: &mut Fixture) {
    let worker = fx.worker_pid();
    // SAFETY: signalling the worker of our own daemon, by the pid it recorded.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    fx.daemon.as_mut().unwrap().kill9();
    fx.daemon = None;
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{worker}/status")).exists()
        && std::fs::read_to_string(format!("/proc/{worker}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(Instant::now() < end, "worker {worker} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn files(fx: &Fixture, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let rel = format!("sub/f{i}");
            let data = fx.write_source(&rel, 20_000 + i * 7, i as u64 + 1);
            (rel, data)
        })
        .collect();
    v.push(("sub/big".into(), fx.write_source("sub/big", BIG, 99)));
    v
}

fn every_mount_reads_the_source(fs: &str) {
    let mut fx = Fixture::new(fs, "2G");
    let want = files(&fx, 8);
    fx.populate(&[]);
    fx.serve(&[]);
    let get = |rel: &str| want.iter().find(|(r, _)| r == rel).unwrap().1.clone();

    // A bind mount of a subdirectory of the served tree.
    let bind = Mounted::bind(&fx.at("sub"), &fx.scratch.path.join("bind-sub"));
    let got = std::fs::read(bind.0.join("f0")).unwrap();
    assert_bytes_eq(
        &got,
        &get("sub/f0"),
        &format!("{fs}: f0 through a bind of sub/"),
    );
    // A range in the middle of a big file (range by range on xfs/btrfs).
    let mut buf = vec![0u8; 70_000];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(bind.0.join("big")).unwrap();
        f.read_exact_at(&mut buf, 3 * MIB as u64 + 123).unwrap();
    }
    assert_bytes_eq(
        &buf,
        &get("sub/big")[3 * MIB + 123..3 * MIB + 123 + 70_000],
        &format!("{fs}: a range of big through the bind"),
    );

    // A copy of the mount namespace (what systemd gives a service with PrivateTmp= and friends).
    let got = cat_in(&format!("unshare -m cat {}", fx.at("sub/f1").display()));
    assert_bytes_eq(
        &got,
        &get("sub/f1"),
        &format!("{fs}: f1 through unshare -m"),
    );

    // A recursive bind inside a new mount namespace (docker -v, podman -v, bubblewrap).
    let ctr = fx.scratch.path.join("ctr");
    std::fs::create_dir_all(&ctr).unwrap();
    let got = cat_in(&format!(
        "unshare -m --propagation private bash -c 'mount --rbind {} {} && cat {}/sub/f2'",
        fx.view.display(),
        ctr.display(),
        ctr.display()
    ));
    assert_bytes_eq(
        &got,
        &get("sub/f2"),
        &format!("{fs}: f2 through --rbind in a new namespace"),
    );

    // The store's own path.
    let got = std::fs::read(fx.stub("sub/f3")).unwrap();
    assert_bytes_eq(
        &got,
        &get("sub/f3"),
        &format!("{fs}: f3 through the store path"),
    );

    // A complete file costs nothing more, whatever mount it is read through: no event at all.
    let before = fx.settled_metrics();
    let events = |m: &serde_json::Value| metric(m, "events_open") + metric(m, "events_pre_access");
    for p in [bind.0.join("f0"), fx.at("sub/f0"), fx.stub("sub/f0")] {
        assert_bytes_eq(&std::fs::read(&p).unwrap(), &get("sub/f0"), "complete f0");
    }
    let after = fx.settled_metrics();
    assert_eq!(
        events(&after),
        events(&before),
        "{fs}: reading a complete file through three mounts raised events"
    );

    // The whole tree through the bind, every byte.
    for (rel, data) in &want {
        let name = rel.strip_prefix("sub/").unwrap();
        assert_bytes_eq(&std::fs::read(bind.0.join(name)).unwrap(), data, rel);
    }
    drop(bind);
    fx.stop();
}

#[test]
fn every_mount_reads_the_source_ext4() {
    if require_root() {
        every_mount_reads_the_source("ext4");
    }
}

#[test]
fn every_mount_reads_the_source_xfs() {
    if require_root() {
        every_mount_reads_the_source("xfs");
    }
}

#[test]
fn every_mount_reads_the_source_btrfs() {
    if require_root() {
        every_mount_reads_the_source("btrfs");
    }
}

/// A read of a file with bytes not present, while no daemon runs: an error (EIO), never bytes.
#[track_caller]
fn assert_refused(p: &Path, what: &str) {
    let r = std::fs::read(p);
    assert_eq!(
        errno_of(&r),
        Some(libc::EIO),
        "{what}: expected EIO with no daemon, got {}",
        match &r {
            Ok(b) => format!(
                "{} bytes{}",
                b.len(),
                if b.iter().all(|x| *x == 0) {
                    " of zeros"
                } else {
                    ""
                }
            ),
            Err(e) => e.to_string(),
        }
    );
}

fn no_daemon_fails_closed_and_a_restart_resumes(fs: &str) {
    let mut fx = Fixture::new(fs, "2G");
    let want = files(&fx, 10);
    fx.populate(&[]);
    fx.serve(&[]);
    let get = |rel: &str| want.iter().find(|(r, _)| r == rel).unwrap().1.clone();
    let bind = Mounted::bind(&fx.view, &fx.scratch.path.join("leftover"));
    let through = |name: &str| bind.0.join("sub").join(name);
    assert_bytes_eq(&std::fs::read(through("f0")).unwrap(), &get("sub/f0"), "f0");
    // Its record is written once it has been idle for a second.
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(
        &run(Command::new(HSM)
            .arg("status")
            .arg("--json")
            .arg(fx.stub("sub/f0")))
        .stdout,
    )
    .contains("\"complete\"")
    {
        assert!(Instant::now() < end, "f0 never recorded complete");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Stopped: the mount point is gone, the leftover bind mount is not.
    fx.stop();
    assert!(
        !is_mounted(&fx.view),
        "the mount point is still mounted after a stop"
    );
    assert_refused(
        &through("f1"),
        &format!("{fs}: f1 through a leftover bind after a stop"),
    );
    assert_refused(
        &fx.stub("sub/f2"),
        &format!("{fs}: f2 through the store path after a stop"),
    );
    let got = cat_in(&format!(
        "unshare -m cat {} || true",
        through("f1").display()
    ));
    assert!(
        got.is_empty(),
        "{fs}: {} bytes read with no daemon",
        got.len()
    );
    // Complete files stay readable.
    assert_bytes_eq(
        &std::fs::read(through("f0")).unwrap(),
        &get("sub/f0"),
        "f0 after a stop",
    );
    if fs != "ext4" {
        // Range by range: a read of a range not present fails, not zeros.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(through("big")).unwrap();
        let mut b = vec![0u8; 4096];
        let r = f.read_exact_at(&mut b, 5 * MIB as u64);
        assert_eq!(
            r.err().and_then(|e| e.raw_os_error()),
            Some(libc::EIO),
            "{fs}: big"
        );
    }

    // Back: the leftover mount works again, with the right bytes.
    fx.serve(&[]);
    assert_bytes_eq(
        &std::fs::read(through("f1")).unwrap(),
        &get("sub/f1"),
        "f1 after restart",
    );
    assert_bytes_eq(
        &std::fs::read(fx.stub("sub/f2")).unwrap(),
        &get("sub/f2"),
        "f2 after restart",
    );

    // Both processes killed at once.
    kill_both(&mut fx);
    assert_refused(
        &through("f3"),
        &format!("{fs}: f3 through a leftover bind after kill -9"),
    );
    assert_refused(
        &through("big"),
        &format!("{fs}: big through a leftover bind after kill -9"),
    );

    // Back again; a bind mount made after the restart works too.
    fx.serve(&[]);
    assert_bytes_eq(
        &std::fs::read(through("f3")).unwrap(),
        &get("sub/f3"),
        "f3 after kill -9",
    );
    let late = Mounted::bind(&fx.at("sub"), &fx.scratch.path.join("late"));
    assert_bytes_eq(
        &std::fs::read(late.0.join("f4")).unwrap(),
        &get("sub/f4"),
        "f4, late bind",
    );
    for (rel, data) in &want {
        assert_bytes_eq(&std::fs::read(bind.0.join(rel)).unwrap(), data, rel);
    }
    // A second daemon on the same store is refused, naming the running one.
    let out = Command::new(HSM)
        .arg("serve")
        .arg(&fx.store)
        .arg(fx.scratch.path.join("second"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second serve of one store started");
    assert!(
        err.contains("already served")
            && err.contains(&fx.daemon.as_ref().unwrap().pid().to_string()),
        "{err}"
    );
    drop(late);
    drop(bind);
    fx.stop();
}

#[test]
fn no_daemon_fails_closed_and_a_restart_resumes_ext4() {
    if require_root() {
        no_daemon_fails_closed_and_a_restart_resumes("ext4");
    }
}

#[test]
fn no_daemon_fails_closed_and_a_restart_resumes_xfs() {
    if require_root() {
        no_daemon_fails_closed_and_a_restart_resumes("xfs");
    }
}

#[test]
fn no_daemon_fails_closed_and_a_restart_resumes_btrfs() {
    if require_root() {
        no_daemon_fails_closed_and_a_restart_resumes("btrfs");
    }
}

/// Readers in flight through a leftover bind mount while the daemon is killed (both processes),
/// restarted, stopped and restarted: every read returns the source's bytes or fails with an
/// error; at the end every file reads right.
#[test]
fn readers_in_flight_across_kills_and_restarts_never_see_wrong_bytes() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "2G");
    let want: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..4000)
            .map(|i| {
                let rel = format!("d{}/f{i}", i % 40);
                let data = fx.write_source(&rel, 4096 + (i * 997) % 30_000, i as u64 + 7);
                (rel, data)
            })
            .collect(),
    );
    fx.populate(&[]);
    // No prefetch: the readers' own accesses are what is in flight at the kill.
    fx.serve(&["--dir-prefetch", "0"]);
    let bind = Mounted::bind(&fx.view, &fx.scratch.path.join("leftover"));
    let stop = Arc::new(AtomicBool::new(false));
    let (good, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (want, stop, root) = (want.clone(), stop.clone(), bind.0.clone());
            let (good, failed) = (good.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut i = t * 377;
                while !stop.load(Ordering::Relaxed) {
                    let (rel, data) = &want[i % want.len()];
                    i += 1;
                    match std::fs::read(root.join(rel)) {
                        Ok(got) => {
                            assert_bytes_eq(&got, data, rel);
                            good.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let n = e.raw_os_error();
                            assert!(
                                n == Some(libc::EIO) || n == Some(libc::EAGAIN),
                                "{rel}: {e}"
                            );
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    // Each step waits for what it is about: reads getting through, or reads meeting the
    // daemon's absence. Early, while most files are still stubs.
    wait_above(&good, 0, "reads with the daemon up");
    kill_both(&mut fx);
    wait_above(
        &failed,
        failed.load(Ordering::Relaxed),
        "reads refused after the kill",
    );
    fx.serve(&["--dir-prefetch", "0"]);
    wait_above(
        &good,
        good.load(Ordering::Relaxed),
        "reads after the restart",
    );
    fx.stop();
    // Refused if any stub is left; by now the readers may have filled them all.
    wait_above(&good, good.load(Ordering::Relaxed), "reads after the stop");
    fx.serve(&["--dir-prefetch", "0"]);
    wait_above(
        &good,
        good.load(Ordering::Relaxed),
        "reads after the second restart",
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join()
            .expect("a reader saw wrong bytes or an unexpected error");
    }
    eprintln!(
        "reads: {} right, {} refused while no daemon ran",
        good.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "no read met the daemon's absence"
    );
    for (rel, data) in want.iter() {
        assert_bytes_eq(&std::fs::read(bind.0.join(rel)).unwrap(), data, rel);
    }
    drop(bind);
    fx.stop();
}

/// An `hsm serve` this test started by hand: killed (SIGKILL, by its pid) and reaped when
/// dropped, so that a failing test leaves no daemon behind (its guard goes with the unmount).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hsm serve` under a service manager, played by the test: it reports READY=1 and hands the
/// group to the fd store. With the daemon and its guard all killed, the stored group keeps the
/// marks: a reader waits (no zeros, no error) and, once a new serve is started with the stored
/// group (`LISTEN_FDS`), gets the source's bytes.
#[test]
fn the_fd_store_keeps_readers_waiting_across_a_restart_then_serves_them() {
    if !require_root() {
        return;
    }
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;
    use std::os::unix::process::CommandExt;

    let fx = Fixture::new("xfs", "2G");
    let want = files(&fx, 4);
    fx.populate(&[]);
    let sock_path = fx.scratch.path.join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = fx.scratch.path.join("serve.log");

    // Start `hsm serve`, optionally with `stored` as fd 3 named by LISTEN_FDNAMES.
    let start = |stored: Option<&OwnedFd>| -> KilledOnDrop {
        let script = format!(
            "{} exec {HSM} serve {} {}",
            if stored.is_some() {
                "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=hsm-group;"
            } else {
                ""
            },
            fx.store.display(),
            fx.view.display()
        );
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(script)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(fd) = stored {
            let raw = fd.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 onto itself keeps close-on-exec (set on every fd received): when the
                    // stored fd is 3 already, only clearing the flag hands it on. Missing this
                    // made the restart start a new group while this one still held the marks,
                    // and the new serve waited on it (1 run in 3 beside another test).
                    let moved = if raw == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(raw, 3)
                    };
                    if moved < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        KilledOnDrop(cmd.spawn().unwrap())
    };
    // Messages until READY=1, keeping the fd sent with FDSTORE=1.
    let until_ready = || -> Option<OwnedFd> {
        let mut stored = None;
        loop {
            let mut buf = [0u8; 512];
            let (n, fd) = hsm::sys::ipc::recv(notify.as_fd(), &mut buf).unwrap_or_else(|e| {
                panic!(
                    "no READY=1 from hsm serve within 30 s ({e}); {}its log:\n{}",
                    common::stuck_report(&fx.store),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if msg.contains("FDSTORE=1") {
                assert!(msg.contains("FDNAME=hsm-group"), "{msg}");
                stored = Some(fd.expect("FDSTORE=1 without an fd"));
            }
            if msg.contains("READY=1") {
                return stored;
            }
        }
    };

    let first = start(None);
    let stored = until_ready().expect("hsm serve did not hand its group to the fd store");
    let bind = Mounted::bind(&fx.view, &fx.scratch.path.join("leftover"));
    assert_bytes_eq(
        &std::fs::read(bind.0.join("sub/f0")).unwrap(),
        &want[0].1,
        "f0",
    );

    // Everything of hsm killed: only the "service manager" (this test) holds the group.
    let guard = guard_pid(&fx.store).expect("guard.pid");
    let worker = fx.worker_pid();
    for pid in [worker, guard] {
        // SAFETY: signalling processes of our own daemon, by the pids they recorded.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    drop(first);
    let end = Instant::now() + Duration::from_secs(10);
    while !(gone(worker) && gone(guard)) {
        assert!(
            Instant::now() < end,
            "worker or guard alive 10 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let reader = {
        let p = bind.0.join("sub/f1");
        std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            std::fs::read(p)
        })
    };
    let tid = tid_rx.recv().unwrap();
    // Positively: the reader sleeps in the kernel, on its event's answer.
    let end = Instant::now() + Duration::from_secs(10);
    while !waits_on_fanotify(tid) {
        assert!(
            !reader.is_finished() && Instant::now() < end,
            "with the group in the fd store and no process reading it, a reader did not wait \
             for an answer (finished: {})",
            reader.is_finished()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut second = start(Some(&stored));
    assert!(
        until_ready().is_some(),
        "the restarted serve stored its group again"
    );
    let got = reader.join().unwrap().expect("the waiting reader failed");
    assert_bytes_eq(&got, &want[1].1, "f1, read while no process served it");
    for (rel, data) in &want {
        assert_bytes_eq(&std::fs::read(bind.0.join(rel)).unwrap(), data, rel);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(second.0.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(20);
    while second.0.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = second.0.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = second.0.wait();
    drop(bind);
}
