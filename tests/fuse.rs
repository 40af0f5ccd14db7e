//! Issue 22, the FUSE front end, on the real kernel: loop-mounted xfs and ext4 stores, the real
//! `hsm serve --frontend fuse`, and real programs reading and writing through the FUSE mount.
//! Every byte read is compared with the source; what was fetched is read from the daemon's
//! counters.
mod common;
use common::*;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;
/// Fetched range by range (a cloned stub on xfs; `--lazy-sparse` on ext4); odd-sized.
const BIG: usize = 9 * MIB + 4097;

/// A source of one big file and `small` small ones in two directories, populated.
fn fixture(fs: &str, small: usize) -> (Fixture, Vec<(String, Vec<u8>)>) {
    fixture_with(fs, small, &[])
}

/// [`fixture`], with `extra` source files (copied from paths on this machine, executable).
fn fixture_with(
    fs: &str,
    small: usize,
    extra: &[(&str, &str)],
) -> (Fixture, Vec<(String, Vec<u8>)>) {
    let fx = Fixture::new(fs, "1G");
    let mut files = vec![("big".to_string(), pattern(BIG, 7))];
    for i in 0..small {
        files.push((
            format!("d{}/f{i}", i % 2),
            pattern(1000 + i * 37, i as u64 + 11),
        ));
    }
    for (rel, data) in &files {
        let p = fx.src(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    for (rel, from) in extra {
        let p = fx.src(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::copy(from, &p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let lazy: &[&str] = if fs == "ext4" {
        &["--lazy-sparse"]
    } else {
        &[]
    };
    fx.populate(lazy);
    (fx, files)
}

/// [`fixture`], every file read once through FUSE (checked against its source), the daemon
/// stopped: a hydrated store.
fn hydrated_fixture(fs_kind: &str, small: usize) -> (Fixture, Vec<(String, Vec<u8>)>) {
    let (mut fx, files) = fixture(fs_kind, small);
    fx.serve(FUSE);
    for (rel, data) in &files {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, rel);
    }
    fx.stop();
    (fx, files)
}

fn status_of(p: &std::path::Path) -> String {
    let out = run(Command::new(HSM).arg("status").arg(p));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn stubs_read_through_fuse_as_their_source_and_only_what_is_read_is_fetched() {
    if !require_root() {
        return;
    }
    for fs in ["xfs", "ext4"] {
        let (mut fx, files) = fixture(fs, 40);
        fx.serve(FUSE);
        let big = &files[0].1;
        // One random read in the middle of the big stub: its bytes, and not the whole file.
        let f = File::open(fx.at("big")).unwrap();
        let mut got = vec![0u8; 64 << 10];
        f.read_exact_at(&mut got, 5 * MIB as u64 + 123).unwrap();
        assert_bytes_eq(
            &got,
            &big[5 * MIB + 123..5 * MIB + 123 + (64 << 10)],
            "pread",
        );
        let m = fx.settled_metrics();
        let fetched = metric(&m, "fetched_bytes");
        assert!(
            fetched > 0 && fetched < (BIG / 2) as u64,
            "{fs}: one 64 KiB read fetched {fetched} bytes of {BIG}"
        );
        // Every file, whole, by cat and by std reads.
        for (rel, data) in &files {
            let out = run(Command::new("cat").arg(fx.at(rel)));
            assert_bytes_eq(&out.stdout, data, &format!("{fs}: cat {rel}"));
        }
        // A tree copy through the mount equals the source.
        let copy = fx.scratch.path.join("copy");
        run(Command::new("cp").arg("-a").arg(&fx.view).arg(&copy));
        for (rel, data) in &files {
            assert_bytes_eq(
                &fs::read(copy.join(rel)).unwrap(),
                data,
                &format!("cp -a {rel}"),
            );
        }
        let m = fx.stop();
        let total: usize = files.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(
            metric(&m, "fetched_bytes"),
            total as u64,
            "{fs}: each byte fetched once"
        );
        let status = status_of(&fx.store.join("tree"));
        assert!(
            status.contains(&format!("{} complete", files.len())),
            "{fs}: {status}"
        );
    }
}

#[test]
fn a_stub_binary_runs_from_the_fuse_mount_and_complete_files_map_shared() {
    if !require_root() {
        return;
    }
    let (mut fx, files) = fixture_with("xfs", 2, &[("tools/ls", "/usr/bin/ls")]);
    fx.serve(FUSE);
    let out = run(Command::new(fx.at("tools/ls")).arg(fx.at("d0")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f0");
    // Once its record says complete, the binary is opened in passthrough: it runs again.
    let before = metric(&fx.settled_metrics(), "fuse_passthrough_opens");
    let out = run(Command::new(fx.at("tools/ls")).arg(fx.at("d1")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f1");
    assert!(
        metric(&fx.settled_metrics(), "fuse_passthrough_opens") > before,
        "the complete binary was not opened in passthrough (kernel {})",
        String::from_utf8_lossy(&run(Command::new("uname").arg("-r")).stdout)
    );
    // Read whole (complete), then reopened (passthrough where the kernel offers it) and
    // written through a shared mapping: the write reaches the store's file.
    let small = &files[1];
    assert_bytes_eq(&fs::read(fx.at(&small.0)).unwrap(), &small.1, "read");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.at(&small.0))
        .unwrap();
    let len = small.1.len();
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let bytes = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
        assert_bytes_eq(bytes, &small.1, "mapped bytes");
        bytes[..4].copy_from_slice(b"MMAP");
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
    drop(f);
    fx.stop();
    let mut want = small.1.clone();
    want[..4].copy_from_slice(b"MMAP");
    assert_bytes_eq(
        &fs::read(fx.store.join("tree").join(&small.0)).unwrap(),
        &want,
        "the store's file after the mapped write",
    );
}

#[test]
fn writes_through_fuse_land_on_filled_pages_and_a_truncation_is_never_refetched() {
    if !require_root() {
        return;
    }
    for fs in ["xfs", "ext4"] {
        let (mut fx, files) = fixture(fs, 2);
        fx.serve(FUSE);
        let big = &files[0].1;
        // A 3-byte write into a stub that nobody read: the page around it is the source's.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(fx.at("big"))
            .unwrap();
        f.write_all_at(b"abc", 3 * MIB as u64 + 100).unwrap();
        drop(f);
        let mut want = big.clone();
        want[3 * MIB + 100..3 * MIB + 103].copy_from_slice(b"abc");
        assert_bytes_eq(
            &fs::read(fx.at("big")).unwrap(),
            &want,
            &format!("{fs}: after write"),
        );

        // Cut, then grown again: what was cut reads as zeros, never as the source's bytes.
        let small = &files[1];
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fx.at(&small.0))
            .unwrap();
        f.set_len(500).unwrap();
        f.set_len(small.1.len() as u64).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        let mut want = small.1[..500].to_vec();
        want.resize(small.1.len(), 0);
        assert_bytes_eq(&got, &want, &format!("{fs}: cut and grown"));
        // O_TRUNC, then a write: the file is the user's bytes alone.
        let other = &files[2];
        let mut f = File::create(fx.at(&other.0)).unwrap();
        f.write_all(b"mine").unwrap();
        drop(f);
        assert_eq!(fs::read(fx.at(&other.0)).unwrap(), b"mine");
        // A new file, a rename and a directory: plain files of the store.
        fs::create_dir(fx.at("new")).unwrap();
        fs::write(fx.at("new/x"), b"new file").unwrap();
        fs::rename(fx.at("new/x"), fx.at("new/y")).unwrap();
        assert_eq!(fs::read(fx.at("new/y")).unwrap(), b"new file");
        fx.stop();
        let status = status_of(&fx.store.join("tree"));
        assert!(status.contains("3 modified"), "{fs}: {status}");
        assert!(status.contains("1 local"), "{fs}: {status}");
    }
}

#[test]
fn the_fuse_mount_fails_closed_when_its_daemon_dies_and_a_restart_clears_it() {
    if !require_root() {
        return;
    }
    let (mut fx, files) = fixture("xfs", 2);
    fx.serve(FUSE);
    let big = &files[0].1;
    let mut head = vec![0u8; 4096];
    File::open(fx.at("big"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_bytes_eq(&head, &big[..4096], "head");
    let mut daemon = fx.daemon.take().unwrap();
    daemon.kill9();
    // Never the stub's zeros: the kernel fails every access of a dead FUSE mount.
    let err = File::open(fx.at("big"))
        .and_then(|mut f| f.read_exact(&mut head))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // Dropped without unmounting: the dead mount is what the next serve finds.
    std::mem::forget(daemon);
    fx.serve(FUSE);
    assert_bytes_eq(&fs::read(fx.at("big")).unwrap(), big, "after the restart");
}

#[test]
fn one_store_served_by_fanotify_then_fuse_then_fanotify_refetches_nothing() {
    if !require_root() {
        return;
    }
    let (mut fx, files) = fixture("xfs", 4);
    let (a, b) = (&files[0], &files[1]);
    fx.serve(&["--frontend", "fanotify"]);
    assert_bytes_eq(&fs::read(fx.at(&a.0)).unwrap(), &a.1, "fanotify: a");
    assert_eq!(metric(&fx.stop(), "fetched_bytes"), a.1.len() as u64);

    fx.serve(FUSE);
    assert_bytes_eq(&fs::read(fx.at(&a.0)).unwrap(), &a.1, "fuse: a");
    assert_bytes_eq(&fs::read(fx.at(&b.0)).unwrap(), &b.1, "fuse: b");
    assert_eq!(
        metric(&fx.stop(), "fetched_bytes"),
        b.1.len() as u64,
        "fuse fetched only what fanotify had not"
    );

    fx.serve(&["--frontend", "fanotify"]);
    assert_bytes_eq(&fs::read(fx.at(&a.0)).unwrap(), &a.1, "fanotify again: a");
    assert_bytes_eq(&fs::read(fx.at(&b.0)).unwrap(), &b.1, "fanotify again: b");
    assert_eq!(metric(&fx.stop(), "fetched_bytes"), 0, "nothing refetched");
}

/// The directory prefetch, the access recorder and list replay run under FUSE as under
/// fanotify: a walk's cold opens fetch the rest of the directory ahead; a recorded run's list,
/// replayed at the next start, makes that run read nothing from the source.
#[test]
fn a_walk_is_fetched_ahead_and_a_recorded_list_is_replayed_under_fuse() {
    if !require_root() {
        return;
    }
    let (mut fx, files) = fixture("xfs", 200);
    // A walk: every file of d0, in order, through the mount.
    fx.serve(FUSE);
    for (rel, data) in files.iter().filter(|(r, _)| r.starts_with("d0/")) {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, rel);
    }
    let m = fx.stop();
    assert!(
        metric(&m, "prefetched_files") >= 50,
        "the walk of 100 files fetched few ahead: {m}"
    );
    let d0: u64 = files
        .iter()
        .filter(|(r, _)| r.starts_with("d0/"))
        .map(|(_, d)| d.len() as u64)
        .sum();
    assert_eq!(metric(&m, "fetched_bytes"), d0, "each byte of d0 once: {m}");

    // Recorded: d1's first ten files and two ranges of the big file, in that order.
    let list = fx.scratch.path.join("app.list");
    let run = |fx: &Fixture| {
        for (rel, data) in files.iter().filter(|(r, _)| r.starts_with("d1/")).take(10) {
            assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, rel);
        }
        let f = File::open(fx.at("big")).unwrap();
        for off in [MIB, 7 * MIB] {
            let mut got = vec![0u8; 8192];
            f.read_exact_at(&mut got, off as u64).unwrap();
            assert_bytes_eq(&got, &files[0].1[off..off + 8192], "big");
        }
    };
    let recording = [
        FUSE,
        &[
            "--record-access",
            list.to_str().unwrap(),
            "--dir-prefetch",
            "0",
        ],
    ]
    .concat();
    fx.serve(&recording);
    run(&fx);
    let recorded = metric(&fx.stop(), "fetched_bytes");
    let text = fs::read_to_string(&list).unwrap();
    let names: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    let want: Vec<&str> = files
        .iter()
        .filter(|(r, _)| r.starts_with("d1/"))
        .take(10)
        .map(|(r, _)| r.as_str())
        .chain(["big"])
        .collect();
    assert_eq!(
        names, want,
        "the list, in the order of first access:\n{text}"
    );

    // Made stubs again, then served with the list: fetched ahead, and the run fetches nothing.
    let out = run_hsm(&["release"], &fx.store.join("tree"));
    assert!(out.status.success(), "{out:?}");
    let replaying = [
        FUSE,
        &[
            "--prefetch-list",
            list.to_str().unwrap(),
            "--dir-prefetch",
            "0",
        ],
    ]
    .concat();
    fx.serve(&replaying);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(&fx.metrics(), "list_prefetched_bytes") < recorded {
        assert!(std::time::Instant::now() < end, "{}", fx.metrics());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = metric(&fx.settled_metrics(), "backend_reads");
    run(&fx);
    let m = fx.stop();
    assert_eq!(
        metric(&m, "backend_reads"),
        before,
        "the replayed run read from the source: {m}"
    );
    assert!(metric(&m, "list_hit_bytes") > 0, "{m}");
}

fn run_hsm(args: &[&str], path: &std::path::Path) -> std::process::Output {
    Command::new(HSM)
        .args(args)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// `find` over `root`: each entry's path, type, size, mode, owner and mtime, sorted.
fn listing(root: &std::path::Path) -> String {
    let out = run(Command::new("find").arg(root).args([
        "-mindepth",
        "1",
        "-printf",
        "%P %y %s %m %U %G %T@\n",
    ]));
    let mut lines: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

#[test]
fn a_hydrated_tree_is_walked_through_fuse_with_its_attributes_and_read_in_passthrough() {
    if !require_root() {
        return;
    }
    // 150 files a directory: a listing with attributes (READDIRPLUS) takes several replies.
    let (mut fx, files) = hydrated_fixture("xfs", 300);
    let tree = fx.store.join("tree");
    fx.serve(FUSE);
    // A fresh daemon: the walk sees what the store's own tree holds, entry for entry.
    assert_eq!(listing(&fx.view), listing(&tree), "find through the mount");
    for (rel, data) in &files {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            data,
            &format!("walk: {rel}"),
        );
    }
    // The kernel forgets its inodes (each forget must match the lookups the listings gave it):
    // every file is still found and read right, listed again or opened by name.
    sh("sync; echo 2 > /proc/sys/vm/drop_caches");
    assert_eq!(
        listing(&fx.view),
        listing(&tree),
        "find after the kernel forgot"
    );
    sh("echo 2 > /proc/sys/vm/drop_caches");
    for (rel, data) in &files {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            data,
            &format!("by name: {rel}"),
        );
    }
    // Names changed through the mount are listed as they are now.
    fs::remove_file(fx.at(&files[1].0)).unwrap();
    fs::rename(fx.at(&files[2].0), fx.at("d0/renamed")).unwrap();
    fs::write(fx.at("d1/new"), b"made through the mount").unwrap();
    assert_eq!(listing(&fx.view), listing(&tree), "find after changes");
    assert_bytes_eq(
        &fs::read(fx.at("d0/renamed")).unwrap(),
        &files[2].1,
        "renamed",
    );
    let m = fx.stop();
    assert_eq!(
        metric(&m, "fetched_bytes"),
        0,
        "a hydrated tree fetches nothing"
    );
    let reads = 2 * files.len() as u64 + 1;
    assert!(
        metric(&m, "fuse_passthrough_opens") >= reads,
        "complete files open in passthrough: {} of {reads} opens",
        metric(&m, "fuse_passthrough_opens")
    );
}

/// A hydrated tree whose pages are gone (a reboot; here a remount) is walked as on disk, not
/// at one disk wait per file: after three opens in a directory, its other complete files are
/// read into the page cache ahead of the walk, as under fanotify. A walk through a warm tree
/// reads nothing ahead.
#[test]
fn a_cold_hydrated_walk_through_fuse_finds_the_next_files_read_in_ahead() {
    if !require_root() {
        return;
    }
    // 40 files in each of d0 (even i) and d1 (odd i).
    let (mut fx, files) = hydrated_fixture("xfs", 80);
    fx.fs.remount();
    let in_d0: Vec<&(String, Vec<u8>)> =
        files.iter().filter(|(r, _)| r.starts_with("d0/")).collect();
    let tree = fx.store.join("tree");
    let uncached = || -> Vec<&str> {
        in_d0[3..]
            .iter()
            .filter(|(rel, data)| resident_pages(&tree.join(rel)) < data.len().div_ceil(4096))
            .map(|(rel, _)| rel.as_str())
            .collect()
    };
    assert_eq!(
        uncached().len(),
        37,
        "the remount left pages cached (this checks nothing then)"
    );

    fx.serve(FUSE);
    for (rel, data) in &in_d0[..3] {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, rel);
    }
    let m = wait_for_metric(&fx, "read_ahead_files", 37);
    assert!(
        metric(&m, "read_ahead_files") >= 37,
        "d0 not read ahead: {m}"
    );
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !uncached().is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    // WILLNEED is advice the kernel may drop some of under load (see the fanotify test).
    let missing = uncached();
    assert!(
        missing.len() <= 4,
        "files of d0 not read ahead of the walk: {missing:?}"
    );
    for (rel, data) in &files {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            data,
            &format!("walk: {rel}"),
        );
    }
    // Every file is in the page cache now: a second walk finds them there and starts nothing.
    let walked = fx.settled_metrics();
    for (rel, data) in &files {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            data,
            &format!("warm walk: {rel}"),
        );
    }
    let m = fx.stop();
    assert_eq!(
        metric(&m, "read_ahead_files"),
        metric(&walked, "read_ahead_files"),
        "a warm walk read files ahead: {walked} -> {m}"
    );
    assert_eq!(
        metric(&m, "fetched_bytes"),
        0,
        "a hydrated tree fetches nothing: {m}"
    );
}

#[test]
fn a_walk_of_more_files_than_the_daemon_may_open_reads_through_fuse() {
    if !require_root() {
        return;
    }
    // The daemon holds an fd for each inode the kernel knows, and the kernel forgets none while
    // it has memory: here the daemon may open 1,024 files in all (its hard limit too), and the
    // tree has 3,000. Past its budget it closes the fds used least recently, and opens them
    // again by handle when asked; no access may fail with EMFILE.
    const LIMIT: u64 = 1024;
    let (mut fx, files) = fixture("xfs", 3000);
    fx.serve_with_open_files(FUSE, LIMIT);
    let pid = fx.daemon.as_ref().map_or(0, |d| d.pid());
    let fds = |pid: u32| fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // A file removed while open, asked about after the walks have pushed its node out of the
    // daemon's open fds: opened again by its handle all the same (the inode lives on).
    let kept = pattern(70_000, 5);
    let mut open_removed = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fx.at("removed-while-open"))
        .unwrap();
    open_removed.write_all(&kept).unwrap();
    fs::remove_file(fx.at("removed-while-open")).unwrap();
    for _walk in 0..2 {
        tar_and_read_every_file(&fx, &files);
    }
    // Past the attribute cache's second: the kernel asks the daemon.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(open_removed.metadata().unwrap().len(), kept.len() as u64);
    let mut back = vec![0; kept.len()];
    open_removed.read_exact_at(&mut back, 0).unwrap();
    assert_bytes_eq(&back, &kept, "removed while open");
    open_removed.set_len(1000).unwrap();
    assert_eq!(open_removed.metadata().unwrap().len(), 1000);
    let held = fds(pid);
    assert!(held < LIMIT as usize, "the daemon holds {held} fds");
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
}

#[test]
fn a_walk_of_more_files_than_a_login_may_open_reads_through_fuse() {
    if !require_root() {
        return;
    }
    // More inodes than the 1,024 open files of a login's soft limit: the FUSE daemon holds an
    // fd for each inode the kernel knows, so it raises its own limit, as the fanotify one does.
    let (mut fx, files) = fixture("xfs", 1500);
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let login = Rlimit {
        current: Some(1024),
        maximum: before.maximum,
    };
    // The daemon inherits this process's soft limit, restored as soon as it has started.
    setrlimit(Resource::Nofile, login).unwrap();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fx.serve(FUSE)));
    setrlimit(Resource::Nofile, before).unwrap();
    started.unwrap();
    tar_and_read_every_file(&fx, &files);
    fx.stop();
}

/// `tar` the whole view (it must succeed and write every file's bytes), then read each file
/// and compare it with the source's.
fn tar_and_read_every_file(fx: &Fixture, files: &[(String, Vec<u8>)]) {
    let out = run(Command::new("tar")
        .arg("-cf")
        .arg("-")
        .arg("-C")
        .arg(&fx.view)
        .arg("."));
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert!(
        out.stdout.len() > total,
        "tar wrote {} bytes",
        out.stdout.len()
    );
    for (rel, data) in files {
        assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, rel);
    }
}
