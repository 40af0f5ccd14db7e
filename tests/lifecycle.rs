//! Issue 18 on the real kernel: `hsm hydrate`, `release`, `pin`, `unpin` and `serve
//! --cache-limit`, on loop-mounted ext4, xfs and btrfs. Every byte read is compared with the
//! source; space given back is measured with the filesystem's own free-space figure.
mod common;
use common::*;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn hsm(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(HSM)
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .expect("run hsm")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Bytes free on the filesystem holding `p`, after its pending frees are committed.
fn free_bytes(p: &Path) -> u64 {
    run(Command::new("sync").arg("-f").arg(p));
    let out = run(Command::new("df").args(["-B1", "--output=avail"]).arg(p));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

fn status_json(args: &[&str], p: &Path) -> serde_json::Value {
    let out = run(Command::new(HSM)
        .arg("status")
        .arg("--json")
        .args(args)
        .arg(p));
    serde_json::from_slice(&out.stdout).expect("status --json output")
}

/// `hsm status --json`: (path, state, pinned) of each file.
fn states(p: &Path) -> Vec<(String, String, bool)> {
    let v = status_json(&[], p);
    v["files"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|f| {
                    (
                        f["path"].as_str().unwrap_or_default().to_string(),
                        f["state"].as_str().unwrap_or_default().to_string(),
                        f["pinned"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn present_total(p: &Path) -> u64 {
    status_json(&["--summary"], p)["totals"]["present_bytes"]
        .as_u64()
        .expect("status summary")
}

macro_rules! on_each_fs {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn ext4() {
                super::$body("ext4")
            }
            #[test]
            fn xfs() {
                super::$body("xfs")
            }
            #[test]
            fn btrfs() {
                super::$body("btrfs")
            }
        }
    };
}

/// [`on_each_fs`] for a body that takes the front end's arguments too: the fanotify front end
/// on each filesystem, and the FUSE front end on xfs.
macro_rules! on_each_fs_and_fuse {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn ext4() {
                super::$body("ext4", &[])
            }
            #[test]
            fn xfs() {
                super::$body("xfs", &[])
            }
            #[test]
            fn btrfs() {
                super::$body("btrfs", &[])
            }
            #[test]
            fn fuse_xfs() {
                super::$body("xfs", super::FUSE)
            }
        }
    };
}

/// The sources of a small tree: a big file (a cloned stub on xfs and btrfs), and small ones.
fn small_tree(fx: &Fixture) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("big", fx.write_source("big", 6 * MIB + 4097, 1)),
        ("small", fx.write_source("small", 100 * KIB, 2)),
        ("d/a", fx.write_source("d/a", 300 * KIB + 5, 3)),
        ("d/b", fx.write_source("d/b", 50 * KIB, 4)),
    ]
}

fn read_all_right(fx: &Fixture, files: &[(&str, Vec<u8>)], what: &str) {
    for (rel, want) in files {
        let got = fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_bytes_eq(&got, want, &format!("{what}: {rel}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Hydrate, release, and the space given back
// ---------------------------------------------------------------------------------------------

fn hydrate_then_release(fs_kind: &str, frontend: &[&str]) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} hydrate/release {frontend:?}");
    let mut fx = Fixture::new(fs_kind, "1G");
    let files = small_tree(&fx);
    let total: usize = files.iter().map(|f| f.1.len()).sum();
    fx.populate(&[]);
    fx.serve(frontend);
    let mnt = fx.at("");

    let out = hsm(&["hydrate"], &[&mnt]);
    assert!(out.status.success(), "{what}: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 files complete"),
        "{what}: {}",
        text(&out)
    );
    for (path, state, _) in states(&mnt) {
        assert_eq!(state, "complete", "{what}: {path} after hydrate");
    }
    // Complete on disk: the source is not needed any more.
    for (rel, want) in &files {
        assert_bytes_eq(
            &raw_read(&fx.stub(rel)),
            want,
            &format!("{what}: {rel} on disk"),
        );
    }

    let before = free_bytes(&fx.fs.mnt);
    let out = hsm(&["release"], &[&mnt]);
    assert!(out.status.success(), "{what}: {}", text(&out));
    let after = free_bytes(&fx.fs.mnt);
    let given_back = after.saturating_sub(before);
    eprintln!("{what}: released {total} bytes of files: df shows {given_back} bytes more free");
    assert!(
        given_back as usize >= total / 2,
        "{what}: only {given_back} bytes given back for {total} bytes released"
    );
    for (path, state, _) in states(&mnt) {
        assert_eq!(state, "stub", "{what}: {path} after release");
    }
    // Stubs stay what they were: a cloned stub reads as data to copy tools (no hole), a sparse
    // one holds no block.
    let big = raw_open(&fx.stub("big"), false);
    let size = big.metadata().unwrap().len();
    let first_hole = seek(&big, libc::SEEK_HOLE);
    if fs_kind == "ext4" {
        // An external xattr block may remain (the records).
        let blocks = big.metadata().unwrap().blocks();
        assert!(
            blocks * 512 <= 8192,
            "{what}: big is sparse again: {blocks} blocks"
        );
    } else {
        assert_eq!(
            first_hole, size as i64,
            "{what}: the cloned stub has no hole after release"
        );
    }
    drop(big);
    // Fetched again, right.
    read_all_right(&fx, &files, &what);
    let m = fx.stop();
    assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
}

fn seek(f: &File, whence: i32) -> i64 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open fd.
    unsafe { libc::lseek(f.as_raw_fd(), 0, whence) }
}

on_each_fs_and_fuse!(
    hydrate_then_release_gives_space_back_and_reads_right_again,
    hydrate_then_release
);

// ---------------------------------------------------------------------------------------------
// Refusals: open, mapped, modified, pinned
// ---------------------------------------------------------------------------------------------

fn refusals(fs_kind: &str, frontend: &[&str]) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} refusals {frontend:?}");
    let mut fx = Fixture::new(fs_kind, "1G");
    let files = small_tree(&fx);
    fx.populate(&[]);
    fx.serve(frontend);
    let mnt = fx.at("");
    assert!(hsm(&["hydrate"], &[&mnt]).status.success());

    // Open: refused, named, and the file untouched.
    let open = File::open(fx.at("small")).unwrap();
    let out = hsm(&["release"], &[&fx.at("small")]);
    assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("small") && err.contains("open or mapped"),
        "{what}: {}",
        text(&out)
    );
    let mut got = Vec::new();
    (&open).read_to_end(&mut got).unwrap();
    assert_bytes_eq(&got, &files[1].1, &format!("{what}: small while open"));
    drop(open);

    // Mapped, its fd closed: refused, and the mapping still reads the right bytes.
    let f = File::open(fx.at("d/a")).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let map = Mapping::new(&f, len);
    drop(f);
    let out = hsm(&["release"], &[&fx.at("d/a")]);
    assert_eq!(out.status.code(), Some(1), "{what}: mapped: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("open or mapped"));
    assert_bytes_eq(
        map.bytes(),
        &files[2].1,
        &format!("{what}: the mapping of d/a"),
    );
    drop(map);

    // Modified: refused (its only copy is here), the local bytes kept.
    let local = b"local bytes, the only copy";
    File::options()
        .write(true)
        .open(fx.at("d/b"))
        .unwrap()
        .write_at(local, 10)
        .unwrap();
    let out = hsm(&["release"], &[&fx.at("d/b")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: modified: {}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("local changes"));
    let mut want_b = files[3].1.clone();
    want_b[10..10 + local.len()].copy_from_slice(local);
    assert_bytes_eq(&fs::read(fx.at("d/b")).unwrap(), &want_b, &what);

    // Pinned: shown, refused, and released once unpinned.
    let out = hsm(&["pin"], &[&fx.at("big")]);
    assert!(out.status.success(), "{what}: pin: {}", text(&out));
    let pinned: Vec<_> = states(&mnt).into_iter().filter(|s| s.2).collect();
    assert_eq!(
        pinned.len(),
        1,
        "{what}: status shows one pinned file: {pinned:?}"
    );
    assert!(pinned[0].0.ends_with("big"), "{what}: {pinned:?}");
    let out = hsm(&["release"], &[&fx.at("big")]);
    assert_eq!(out.status.code(), Some(1), "{what}: pinned: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned"));
    assert!(hsm(&["unpin"], &[&fx.at("big")]).status.success());
    let out = hsm(&["release"], &[&fx.at("big")]);
    assert!(out.status.success(), "{what}: unpinned: {}", text(&out));

    // The whole tree: the modified file refused, the others released; exit 1.
    let out = hsm(&["release"], &[&mnt]);
    assert_eq!(out.status.code(), Some(1), "{what}: tree: {}", text(&out));
    read_all_right(&fx, &files[..3], &what);
    assert_bytes_eq(&fs::read(fx.at("d/b")).unwrap(), &want_b, &what);
}

/// A read-only shared mapping, unmapped on drop.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(f: &File, len: usize) -> Mapping {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only mapping of an open file, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Mapping(p, len)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `self.1` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.cast::<u8>(), self.1) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

on_each_fs_and_fuse!(
    release_refuses_open_mapped_modified_and_pinned_files,
    refusals
);

// ---------------------------------------------------------------------------------------------
// Release racing readers
// ---------------------------------------------------------------------------------------------

fn release_racing_readers(fs_kind: &str, frontend: &[&str]) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} release racing readers {frontend:?}");
    let mut fx = Fixture::new(fs_kind, "1G");
    let files: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..24)
            .map(|i| {
                let rel = format!("r/f{i:02}");
                let len = [64 * KIB, 300 * KIB + 1, MIB, 5 * MIB + 123][i % 4];
                let d = fx.write_source(&rel, len, 100 + i as u64);
                (rel, d)
            })
            .collect(),
    );
    fx.populate(&[]);
    fx.serve(frontend);
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, wrong) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (files, stop, reads, wrong) =
                (files.clone(), stop.clone(), reads.clone(), wrong.clone());
            let base = fx.at("");
            std::thread::spawn(move || {
                let mut i = t * 7;
                while !stop.load(Ordering::Relaxed) {
                    let (rel, want) = &files[i % files.len()];
                    i += 5;
                    let p = base.join(rel);
                    // What went wrong, if anything: an error, or bytes (zeros: stub bytes).
                    let judge = |got: std::io::Result<Vec<u8>>, want: &[u8]| match got {
                        Err(e) => Some(format!("{rel}: {e}")),
                        Ok(got) if got != want => Some(format!(
                            "{rel}: wrong bytes{}",
                            if got.iter().all(|&b| b == 0) {
                                " (all zero)"
                            } else {
                                ""
                            }
                        )),
                        Ok(_) => None,
                    };
                    let failure = if i % 3 == 0 {
                        // A range read, the file opened and closed around it.
                        let off = (i * 4096) % want.len();
                        let mut buf = vec![0u8; 8192.min(want.len() - off)];
                        let got = File::open(&p)
                            .and_then(|f| f.read_exact_at(&mut buf, off as u64))
                            .map(|()| buf);
                        judge(got, &want[off..off + 8192.min(want.len() - off)])
                    } else {
                        judge(fs::read(&p), want)
                    };
                    if let Some(f) = &failure {
                        eprintln!("reader {t}: {f}");
                    }
                    let ok = failure.is_none();
                    reads.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut released = 0u64;
    let mut rounds = 0;
    let end = Instant::now() + Duration::from_secs(12);
    while Instant::now() < end || rounds < 10 {
        let out = hsm(&["release"], &[&fx.at("r")]);
        let so = String::from_utf8_lossy(&out.stdout);
        released += so
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        rounds += 1;
        if rounds > 400 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let (reads, wrong) = (reads.load(Ordering::Relaxed), wrong.load(Ordering::Relaxed));
    eprintln!(
        "{what}: {rounds} release rounds, {released} files released, {reads} reads, {wrong} wrong"
    );
    assert_eq!(wrong, 0, "{what}: {wrong} of {reads} reads were wrong");
    assert!(reads >= 1000, "{what}: only {reads} reads");
    assert!(released >= 20, "{what}: only {released} files released");
    let m = fx.stop();
    assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
}

on_each_fs_and_fuse!(
    release_racing_readers_never_shows_stub_bytes,
    release_racing_readers
);

// ---------------------------------------------------------------------------------------------
// Without a daemon; and a crash in the middle of a release
// ---------------------------------------------------------------------------------------------

fn without_a_daemon(fs_kind: &str) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} without a daemon");
    let mut fx = Fixture::new(fs_kind, "1G");
    let files = small_tree(&fx);
    fx.populate(&[]);
    let tree = fx.store.join("tree");
    let out = hsm(&["hydrate"], &[&tree]);
    assert!(out.status.success(), "{what}: {}", text(&out));
    for (rel, want) in &files {
        assert_bytes_eq(&fs::read(tree.join(rel)).unwrap(), want, &what);
    }
    assert!(states(&tree).iter().all(|s| s.1 == "complete"), "{what}");
    let out = hsm(&["pin"], &[&tree.join("small")]);
    assert!(out.status.success(), "{what}: {}", text(&out));
    let out = hsm(&["release"], &[&tree]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: the pinned file: {}",
        text(&out)
    );
    let st = states(&tree);
    assert_eq!(
        st.iter().filter(|s| s.1 == "stub").count(),
        3,
        "{what}: {st:?}"
    );
    // Served afterwards: right bytes, and commands go through the daemon.
    fx.serve(&[]);
    read_all_right(&fx, &files, &what);
    let out = hsm(&["release"], &[&tree.join("d")]);
    assert!(
        out.status.success(),
        "{what}: through the daemon: {}",
        text(&out)
    );
    read_all_right(&fx, &files, &what);
}

on_each_fs!(
    commands_work_on_the_store_without_a_daemon,
    without_a_daemon
);

/// SIGKILL the worker and the supervisor together, as a crash of the machine's daemon would.
fn kill_daemon(fx: &mut Fixture, worker: i32) {
    // SAFETY: our daemon's worker, by pid.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    if let Some(mut d) = fx.daemon.take() {
        d.kill9();
    }
}

fn killed_mid_release(fs_kind: &str) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} kill -9 mid release");
    let mut fx = Fixture::new(fs_kind, "2G");
    let mut files: Vec<(String, Vec<u8>)> = (0..160)
        .map(|i| {
            let rel = format!("k/f{i:03}");
            let d = fx.write_source(&rel, [20 * KIB, 200 * KIB, MIB][i % 3] + i, 500 + i as u64);
            (rel, d)
        })
        .collect();
    fx.populate(&[]);
    fx.serve(&[]);
    assert!(hsm(&["hydrate"], &[&fx.at("k")]).status.success());
    // Local writes: their only copy is here, and must survive.
    for (rel, want) in files.iter_mut().step_by(16) {
        let local = format!("written here to {rel}");
        File::options()
            .write(true)
            .open(fx.at(rel))
            .unwrap()
            .write_at(local.as_bytes(), 7)
            .unwrap();
        want[7..7 + local.len()].copy_from_slice(local.as_bytes());
    }
    let worker = fx.worker_pid();
    let mut release = Command::new(HSM)
        .arg("release")
        .arg(fx.at("k"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    kill_daemon(&mut fx, worker);
    let _ = release.wait();
    fx.serve(&[]);
    let mut stubs = 0;
    for (path, state, _) in states(&fx.at("k")) {
        stubs += (state == "stub") as usize;
        let _ = path;
    }
    eprintln!(
        "{what}: {stubs} of {} files were released before the kill",
        files.len()
    );
    for (rel, want) in &files {
        let got = fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_bytes_eq(&got, want, &format!("{what}: {rel}"));
    }
}

on_each_fs!(
    a_daemon_killed_mid_release_loses_nothing,
    killed_mid_release
);

// ---------------------------------------------------------------------------------------------
// The control socket: root, a permitted group, and others
// ---------------------------------------------------------------------------------------------

#[test]
fn the_control_socket_serves_root_and_the_control_group_and_refuses_others() {
    if !require_root() {
        return;
    }
    let what = "control socket";
    let mut fx = Fixture::new("xfs", "1G");
    let files = small_tree(&fx);
    fx.populate(&[]);
    // A group of our own, removed at the end.
    let group = format!("hsmctl{}", std::process::id() % 100_000);
    run(Command::new("groupadd").arg(&group));
    struct Group(String);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.0).status();
        }
    }
    let _g = Group(group.clone());
    let gid = String::from_utf8(run(Command::new("getent").args(["group", &group])).stdout)
        .unwrap()
        .split(':')
        .nth(2)
        .unwrap()
        .to_string();
    fx.serve(&["--control-group", &group]);
    let as_user = |groups: Option<&str>, path: &Path| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            Some(g) => c.arg(format!("--groups={g}")),
            None => c.arg("--clear-groups"),
        };
        c.arg(HSM).arg("hydrate").arg(path).stdin(Stdio::null());
        c.output().unwrap()
    };
    let p = fx.at("d/a");
    let refused = as_user(None, &p);
    assert!(!refused.status.success(), "{what}: {}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("permission denied"),
        "{what}: {}",
        text(&refused)
    );
    assert_eq!(
        states(&fx.at("d"))
            .iter()
            .find(|s| s.0.ends_with("d/a"))
            .unwrap()
            .1,
        "stub",
        "{what}: nothing done for a refused caller"
    );
    let permitted = as_user(Some(&gid), &p);
    assert!(permitted.status.success(), "{what}: {}", text(&permitted));
    assert_eq!(
        states(&fx.at("d"))
            .iter()
            .find(|s| s.0.ends_with("d/a"))
            .unwrap()
            .1,
        "complete",
        "{what}: hydrated for a member of the control group"
    );
    assert_bytes_eq(&fs::read(fx.at("d/a")).unwrap(), &files[2].1, what);
}

// ---------------------------------------------------------------------------------------------
// The cache limit
// ---------------------------------------------------------------------------------------------

fn cache_limit(fs_kind: &str, frontend: &[&str]) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} cache limit {frontend:?}");
    let mut fx = Fixture::new(fs_kind, "1G");
    let n = 40;
    let files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let rel = format!("c/f{i:02}");
            (
                rel.clone(),
                fx.write_source(&rel, 512 * KIB + i, 900 + i as u64),
            )
        })
        .collect();
    let hot = fx.write_source("hot", 256 * KIB, 7);
    let limit = 4 * MIB as u64;
    fx.populate(&[]);
    // Eviction's choices (`debug`), for the message of a failure.
    fx.serve_with_env(
        &[frontend, &["--cache-limit", "4M"]].concat(),
        &[("RUST_LOG", "info,hsm::evict=debug,hsm::lifecycle=debug")],
    );
    // What the store holds on disk: the filesystem's own figure (records lag the bytes).
    let base = free_bytes(&fx.fs.mnt);
    let mut peak = 0;
    for (i, (rel, want)) in files.iter().enumerate() {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel}"),
        );
        if i % 4 == 0 {
            // Used often: the least recently used files go first, never this one.
            assert_bytes_eq(&fs::read(fx.at("hot")).unwrap(), &hot, &what);
        }
        if i % 4 == 3 {
            peak = peak.max(base.saturating_sub(free_bytes(&fx.fs.mnt)));
        }
    }
    let total: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    // Eviction runs behind the reads (a release syncs each file): it catches up within seconds
    // (FUSE's reads outrun it by far).
    // Present = fetched - evicted (the store started empty); fetched counts what the directory
    // prefetch took ahead too. Settled: a snapshot taken before the last reads would pass.
    let present_now = || {
        let m = fx.settled_metrics();
        metric(&m, "fetched_bytes").saturating_sub(metric(&m, "evicted_bytes"))
    };
    let waited = Instant::now();
    let mut tallied = present_now();
    while tallied > limit && waited.elapsed() < Duration::from_secs(20) {
        tallied = present_now();
    }
    let waited = waited.elapsed();
    let log = fx.daemon.take().expect("serving").stop_log();
    let m = fx.metrics();
    // Stopped: every record is written, and says what is present.
    let present = present_total(&fx.store.join("tree"));
    eprintln!(
        "{what}: read {total} bytes through a {limit}-byte limit; present at the end {present}; \
         peak disk use {peak}; evicted {}",
        metric(&m, "evicted_bytes")
    );
    assert!(
        present <= limit,
        "{what}: {present} bytes present over a {limit}-byte limit (waited {waited:?}, \
         {tallied} tallied then); {m}; {:?}; the daemon's last eviction lines:\n{}",
        states(&fx.store.join("tree/c")),
        log.lines()
            .filter(|l| l.contains("evict") || l.contains("release") || l.contains("WARN"))
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Eviction runs behind the reads (it waits for files being recorded): over the limit for a
    // moment, never holding the tree.
    assert!(
        peak < total * 3 / 4,
        "{what}: peak disk use {peak} of a {total}-byte tree"
    );
    let hot_state = states(&fx.store.join("tree/hot"));
    assert_eq!(
        hot_state[0].1, "complete",
        "{what}: the hot file was evicted: {hot_state:?}"
    );
    assert!(metric(&m, "evicted_bytes") >= total - limit, "{what}: {m}");
    assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
    // Everything still reads right, fetched again where it was evicted.
    fx.serve(&[frontend, &["--cache-limit", "4M"]].concat());
    for (rel, want) in &files {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel} again"),
        );
    }
}

on_each_fs_and_fuse!(a_cache_limit_holds_while_a_bigger_tree_is_read, cache_limit);

/// What is fetched ahead of any reader (an access list, a directory prefetch) only fills the
/// room below the limit's low watermark, however many such fetches run at once: it never
/// evicts what was read, and never takes the store over the limit.
#[test]
fn fetching_ahead_never_evicts_what_was_read() {
    if !require_root() {
        return;
    }
    let what = "fetching ahead under a cache limit";
    let mut fx = Fixture::new("xfs", "1G");
    let hot: Vec<Vec<u8>> = (0..2)
        .map(|i| fx.write_source(&format!("hot/h{i}"), MIB, 70 + i as u64))
        .collect();
    let ahead: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let rel = format!("ahead/a{i:02}");
            let data = fx.write_source(&rel, 256 * KIB, 100 + i as u64);
            (rel, data)
        })
        .collect();
    let list = fx.scratch.path.join("list");
    let mut text = String::from("hsm-access-list 1\n");
    for (rel, _) in &ahead {
        text.push_str(&format!("{rel}\t{}\topen\t-\n", 256 * KIB));
    }
    fs::write(&list, text).unwrap();
    fx.populate(&[]);
    // 90% of 4 MiB: what fetching ahead may fill the store up to.
    let watermark = 4 * MIB as u64 * 9 / 10;
    let read_hot = |fx: &Fixture| {
        for (i, want) in hot.iter().enumerate() {
            assert_bytes_eq(&fs::read(fx.at(&format!("hot/h{i}"))).unwrap(), want, what);
        }
    };
    let present = |m: &serde_json::Value| {
        metric(m, "fetched_bytes").saturating_sub(metric(m, "evicted_bytes"))
    };

    // An access list: 5 MiB asked for, with 2 MiB read.
    fx.serve(&["--cache-limit", "4M", "--dir-prefetch", "0"]);
    read_hot(&fx);
    let out = Command::new(HSM)
        .args(["hydrate", "--list"])
        .arg(&list)
        .arg(&fx.view)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: {out:?}");
    let m = fx.settled_metrics();
    assert_eq!(
        metric(&m, "evicted_bytes"),
        0,
        "{what}: the list evicted: {m}"
    );
    assert!(
        present(&m) <= watermark,
        "{what}: the list filled the store past 90% of its limit: {m}"
    );
    assert!(
        metric(&m, "list_prefetched_bytes") >= 256 * KIB as u64,
        "{what}: the list fetched nothing into the room there was: {m}"
    );
    fx.stop();
    for i in 0..2 {
        let state = states(&fx.store.join(format!("tree/hot/h{i}")));
        assert_eq!(state[0].1, "complete", "{what}: {state:?}");
    }

    // A directory prefetch, which fetches many files at once: from the hot files alone, three
    // files opened (its trigger), 17 to fetch ahead into 1 MiB of room.
    let out = Command::new(HSM)
        .arg("release")
        .arg(fx.store.join("tree/ahead"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: {out:?}");
    fx.serve(&["--cache-limit", "4M"]);
    for (rel, want) in &ahead[..3] {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), want, what);
    }
    // The prefetch done: nothing more fetched between two settled snapshots.
    let fetched = |m: &serde_json::Value| {
        (
            metric(m, "fetched_bytes"),
            metric(m, "evicted_bytes"),
            metric(m, "prefetched_files"),
        )
    };
    let end = Instant::now() + Duration::from_secs(30);
    let mut m = fx.settled_metrics();
    loop {
        let again = fx.settled_metrics();
        if fetched(&again) == fetched(&m) {
            break;
        }
        assert!(
            Instant::now() < end,
            "{what}: still fetching after 30 s: {again}"
        );
        m = again;
    }
    assert_eq!(
        metric(&m, "evicted_bytes"),
        0,
        "{what}: the prefetch evicted: {m}"
    );
    assert!(
        metric(&m, "prefetched_files") >= 1,
        "{what}: the prefetch fetched nothing into the room there was: {m}"
    );
    let m = fx.stop();
    assert!(
        present_total(&fx.store.join("tree")) <= watermark,
        "{what}: the prefetch filled the store past 90% of its limit: {m}"
    );
    // Every byte reads right, whatever was fetched ahead.
    fx.serve(&["--cache-limit", "4M"]);
    read_hot(&fx);
    for (rel, want) in &ahead {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), want, what);
    }
}

#[test]
fn a_full_store_evicts_and_the_fill_goes_on() {
    if !require_root() {
        return;
    }
    let what = "ENOSPC";
    // 160 MiB of files through a 128 MiB filesystem, with a limit above what it holds.
    let mut fx = Fixture::new("ext4", "128M");
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let rel = format!("e/f{i:02}");
            (
                rel.clone(),
                fx.write_source(&rel, 8 * MIB + i, 1200 + i as u64),
            )
        })
        .collect();
    fx.populate(&[]);
    fx.serve(&["--cache-limit", "1G", "--dir-prefetch", "0"]);
    for (rel, want) in &files {
        let got = fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_bytes_eq(&got, want, &format!("{what}: {rel}"));
    }
    let m = fx.stop();
    eprintln!(
        "{what}: 160 MiB read through a 128 MiB filesystem: evicted {} bytes",
        metric(&m, "evicted_bytes")
    );
    assert!(metric(&m, "evicted_bytes") > 0, "{what}: {m}");
    assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
}

#[test]
fn populate_of_a_served_store_is_refused_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let what = "populate while served";
    let mut fx = Fixture::new("xfs", "1G");
    let files = small_tree(&fx);
    fx.populate(&[]);
    fx.serve(&[]);
    fx.write_source("new", 1000, 9);
    let out = Command::new(HSM)
        .arg("populate")
        .arg(&fx.source)
        .arg(&fx.store)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{what}: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by hsm serve"),
        "{what}: {}",
        text(&out)
    );
    assert!(!fx.at("new").exists(), "{what}: the tree changed");
    read_all_right(&fx, &files, what);
    fx.stop();
    // Stopped: populate works again.
    fx.populate(&[]);
    assert!(fx.stub("new").exists(), "{what}: populate after the stop");
}

fn killed_mid_eviction(fs_kind: &str) {
    if !require_root() {
        return;
    }
    let what = format!("{fs_kind} kill -9 mid eviction");
    let mut fx = Fixture::new(fs_kind, "1G");
    let mut files: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| {
            let rel = format!("v/f{i:02}");
            (
                rel.clone(),
                fx.write_source(&rel, 300 * KIB + i, 1500 + i as u64),
            )
        })
        .collect();
    fx.populate(&[]);
    fx.serve(&["--cache-limit", "2M"]);
    // A local write: its only copy is here, never evicted.
    let local = b"written here, kept";
    let (rel0, want0) = &mut files[0];
    let _ = fs::read(fx.at(rel0)).unwrap();
    File::options()
        .write(true)
        .open(fx.at(rel0))
        .unwrap()
        .write_at(local, 100)
        .unwrap();
    want0[100..100 + local.len()].copy_from_slice(local);
    // Read on while evictions run, then kill both processes in the middle of them.
    for (rel, want) in &files[1..40] {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel}"),
        );
    }
    let worker = fx.worker_pid();
    kill_daemon(&mut fx, worker);
    fx.serve(&["--cache-limit", "2M"]);
    for (rel, want) in &files {
        let got = fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_bytes_eq(&got, want, &format!("{what}: {rel} after the restart"));
    }
    let m = fx.stop();
    assert!(metric(&m, "evicted_bytes") > 0, "{what}: {m}");
}

on_each_fs!(
    a_daemon_killed_mid_eviction_loses_nothing,
    killed_mid_eviction
);

#[test]
fn serve_mounts_over_a_non_empty_directory_only_when_asked() {
    if !require_root() {
        return;
    }
    let what = "nonempty";
    let mut fx = Fixture::new("xfs", "1G");
    let files = small_tree(&fx);
    fx.populate(&[]);
    fs::create_dir_all(&fx.view).unwrap();
    fs::write(fx.view.join("already-here"), b"x").unwrap();
    let out = Command::new(HSM)
        .arg("serve")
        .arg(&fx.store)
        .arg(&fx.view)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{what}: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nonempty"),
        "{what}: {}",
        text(&out)
    );
    fx.serve(&["--nonempty"]);
    read_all_right(&fx, &files, what);
    assert!(
        !fx.view.join("already-here").exists(),
        "{what}: hidden while served"
    );
    fx.stop();
    assert!(
        fx.view.join("already-here").exists(),
        "{what}: back after the stop"
    );
}
