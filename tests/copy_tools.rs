//! Issue 3: copy tools must get the source's bytes from never-read stubs, never stub zeros.
//!
//! On ext4, xfs and btrfs, through MOUNTPOINT, each tool copies its own never-read files (so no
//! tool benefits from another's fetches): `cp` to another filesystem, `cp` inside the same mount
//! (reflink by default on xfs/btrfs: one event with count 0), `cp --sparse=always`,
//! `tar --sparse -c` then extract, `rsync --sparse`, and `copy_file_range` of the whole file.
//! Files sit below and above the 4 MiB threshold where xfs/btrfs stubs become reflinked zero
//! blocks, and two sources genuinely hold a large zero region (real sparse files).
//!
//! Also: the `df` cost of a ~200 MiB stub tree on each filesystem, the method `hsm populate`
//! announces, and what `stat`/`lseek` show copy tools on a never-read stub, without a fetch.
mod common;
use common::*;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Where xfs/btrfs stubs switch from sparse (fetched whole on open) to reflinked zero blocks.
const WHOLE_BELOW: u64 = 4 * MIB;
/// The zero pool a store keeps on xfs/btrfs: a one-off cost per store.
const ZERO_POOL: u64 = 16 * MIB;

/// One source file: its length and, for a genuinely sparse source, a zero region `[from, to)`
/// left as a hole in the source.
struct Spec {
    name: &'static str,
    len: u64,
    hole: Option<(u64, u64)>,
}

const FILES: &[Spec] = &[
    Spec {
        name: "empty",
        len: 0,
        hole: None,
    },
    Spec {
        name: "small",
        len: 100_003,
        hole: None,
    },
    Spec {
        name: "below",
        len: 3 * MIB + 5,
        hole: None,
    },
    Spec {
        name: "edge",
        len: WHOLE_BELOW,
        hole: None,
    },
    Spec {
        name: "big",
        len: 9 * MIB + 123,
        hole: None,
    },
    // Real sparse sources: data, then a large zero region (a hole in the source), then data.
    Spec {
        name: "holey-small",
        len: 3 * MIB + 77,
        hole: Some((256 * 1024 + 11, 5 * MIB / 2 + 3)),
    },
    Spec {
        name: "holey-big",
        len: 12 * MIB + 4321,
        hole: Some((MIB + 777, 10 * MIB + 13)),
    },
];

const TOOLS: &[&str] = &[
    "cp-other-fs",
    "cp-same-mount",
    "cp-sparse-always",
    "tar-sparse",
    "rsync-sparse",
    "copy-file-range",
];

/// Write one source file; a sparse one is made with `set_len` then writes around the hole, and
/// checked to really be sparse in the source.
fn write_spec(fx: &Fixture, rel: &str, spec: &Spec, seed: u64) {
    let Some((from, to)) = spec.hole else {
        fx.write_source(rel, spec.len as usize, seed);
        return;
    };
    let p = fx.src(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = File::create(&p).unwrap();
    f.set_len(spec.len).unwrap();
    f.write_all_at(&pattern(from as usize, seed), 0).unwrap();
    f.write_all_at(&pattern((spec.len - to) as usize, seed ^ 0xabc), to)
        .unwrap();
    f.sync_all().unwrap();
    let md = f.metadata().unwrap();
    assert!(
        md.blocks() * 512 < spec.len - (to - from) / 2,
        "source {rel} should be sparse: {} blocks for {} bytes",
        md.blocks(),
        spec.len
    );
}

/// Compare every file of a copied tool directory with its source, byte for byte.
fn assert_copy(fx: &Fixture, fs: &str, tool: &str, copied_dir: &Path) {
    for spec in FILES {
        let want = std::fs::read(fx.src(&format!("t-{tool}/{}", spec.name))).unwrap();
        assert_eq!(want.len() as u64, spec.len);
        let got_path = copied_dir.join(spec.name);
        let got = std::fs::read(&got_path)
            .unwrap_or_else(|e| panic!("{fs} {tool}: cannot read {}: {e}", got_path.display()));
        assert_bytes_eq(&got, &want, &format!("{fs} {tool} {}", spec.name));
    }
    eprintln!("{fs}: {tool}: {} files equal to the source", FILES.len());
}

/// `copy_file_range` of each whole file of `src_dir` into `dst_dir`, looping until it returns 0.
fn copy_file_range_dir(src_dir: &Path, dst_dir: &Path) {
    std::fs::create_dir_all(dst_dir).unwrap();
    for spec in FILES {
        let src = File::open(src_dir.join(spec.name)).unwrap();
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst_dir.join(spec.name))
            .unwrap();
        let mut total = 0u64;
        loop {
            // SAFETY: two valid fds, null offsets (the files' own positions are used).
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst.as_raw_fd(),
                    std::ptr::null_mut(),
                    (spec.len - total).max(1 << 20) as usize,
                    0,
                )
            };
            if n < 0 {
                panic!(
                    "copy_file_range of {} failed after {total} bytes: {}",
                    spec.name,
                    std::io::Error::last_os_error()
                );
            }
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, spec.len, "copy_file_range of {}", spec.name);
    }
}

fn check_method_line(fs: &str, populate_stderr: &[u8]) {
    let text = String::from_utf8_lossy(populate_stderr);
    let line = text
        .lines()
        .find(|l| l.contains("store on"))
        .unwrap_or_else(|| panic!("{fs}: populate did not say which stub method: {text}"));
    eprintln!("{fs}: populate says: {line}");
    assert!(
        line.contains(fs),
        "{fs}: method line names another fs: {line}"
    );
    if fs == "ext4" {
        assert!(line.contains("sparse"), "{fs}: {line}");
        assert!(!line.contains("reflinked"), "{fs}: {line}");
    } else {
        assert!(line.contains("reflinked"), "{fs}: {line}");
    }
}

/// `tar --sparse -cf TAR -C DIR NAME`. GNU tar exits 1 with "file changed as we read it" when a
/// file's ctime moves while it reads it, which fetching does (see
/// `tar_exits_0_on_never_read_stubs_*`, ignored as a bug). That warning alone is tolerated
/// here, so that the archive's bytes are still checked; anything else fails.
fn tar_create(tar: &Path, dir: &Path, name: &str, fs: &str) {
    let out = Command::new("tar")
        .arg("--sparse")
        .arg("-cf")
        .arg(tar)
        .arg("-C")
        .arg(dir)
        .arg(name)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{fs}: tar exited {}: {stderr}", out.status);
        assert_eq!(out.status.code(), Some(1), "{fs}: tar: {stderr}");
        assert!(
            stderr
                .lines()
                .all(|l| l.ends_with(": file changed as we read it")),
            "{fs}: tar: {stderr}"
        );
    }
}

fn copy_tools_on(fs: &str, frontend: &[&str]) {
    let t0 = Instant::now();
    let mut fx = Fixture::new(fs, "2G");
    for (t, tool) in TOOLS.iter().enumerate() {
        for (i, spec) in FILES.iter().enumerate() {
            write_spec(
                &fx,
                &format!("t-{tool}/{}", spec.name),
                spec,
                (t * 100 + i) as u64 + 7,
            );
        }
    }
    let out = fx.populate(&[]);
    check_method_line(fs, &out.stderr);
    fx.serve(frontend);
    let out_dir = fx.scratch.path.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let view = fx.view.clone();
    let ts = |t: &str| format!("t-{t}");

    // cp to another filesystem (the scratch dir is on the root fs).
    run(Command::new("cp")
        .arg("-r")
        .arg(view.join(ts("cp-other-fs")))
        .arg(out_dir.join("cp-other-fs")));
    assert_copy(&fx, fs, "cp-other-fs", &out_dir.join("cp-other-fs"));

    // cp inside the same mount: reflink (FICLONE) by default on xfs/btrfs.
    run(Command::new("cp")
        .arg("-r")
        .arg(view.join(ts("cp-same-mount")))
        .arg(view.join("copy-of-cp-same-mount")));
    assert_copy(
        &fx,
        fs,
        "cp-same-mount",
        &view.join("copy-of-cp-same-mount"),
    );

    run(Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(view.join(ts("cp-sparse-always")))
        .arg(out_dir.join("cp-sparse-always")));
    assert_copy(
        &fx,
        fs,
        "cp-sparse-always",
        &out_dir.join("cp-sparse-always"),
    );

    let tar = out_dir.join("t.tar");
    tar_create(&tar, &view, &ts("tar-sparse"), fs);
    let tar_out = out_dir.join("tar-x");
    std::fs::create_dir_all(&tar_out).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&tar_out));
    assert_copy(&fx, fs, "tar-sparse", &tar_out.join(ts("tar-sparse")));

    let mut rsync_src = view.join(ts("rsync-sparse")).into_os_string();
    rsync_src.push("/");
    run(Command::new("rsync")
        .args(["-r", "--sparse"])
        .arg(rsync_src)
        .arg(out_dir.join("rsync-sparse")));
    assert_copy(&fx, fs, "rsync-sparse", &out_dir.join("rsync-sparse"));

    // copy_file_range across filesystems is EXDEV on this kernel: copy within the mount, where
    // xfs/btrfs remap (clone) and ext4 copies in the kernel.
    copy_file_range_dir(&view.join(ts("copy-file-range")), &view.join("cfr-out"));
    assert_copy(&fx, fs, "copy-file-range", &view.join("cfr-out"));

    let m = fx.stop();
    eprintln!("{fs}: daemon metrics: {m}");
    assert_eq!(m["denied"], 0, "{fs}: {m}");
    // Every managed byte was copied by exactly one tool: each is fetched once, none twice.
    let total: u64 = FILES.iter().map(|s| s.len).sum::<u64>() * TOOLS.len() as u64;
    assert_eq!(m["fetched_bytes"], total, "{fs}: {m}");
    eprintln!("{fs}: copy tools done in {:?}", t0.elapsed());
}

#[test]
fn copy_tools_get_source_bytes_ext4() {
    if require_root() {
        copy_tools_on("ext4", FANOTIFY);
    }
}

#[test]
fn copy_tools_get_source_bytes_xfs() {
    if require_root() {
        copy_tools_on("xfs", FANOTIFY);
    }
}

#[test]
fn copy_tools_get_source_bytes_ext4_fuse() {
    if require_root() {
        copy_tools_on("ext4", FUSE);
    }
}

#[test]
fn copy_tools_get_source_bytes_xfs_fuse() {
    if require_root() {
        copy_tools_on("xfs", FUSE);
    }
}

#[test]
fn copy_tools_get_source_bytes_btrfs() {
    if require_root() {
        copy_tools_on("btrfs", FANOTIFY);
    }
}

/// Bytes in use on the filesystem holding `path`, as `df` reports them, after a sync.
fn df_used(path: &Path) -> u64 {
    // SAFETY: plain syscalls on a valid path and a zeroed out-struct.
    unsafe {
        libc::sync();
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

/// Sum of apparent sizes and of allocated bytes (what `du` counts) under `dir`.
fn sizes_under(dir: &Path) -> (u64, u64) {
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                apparent += md.len();
                allocated += md.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

/// The daemon's counters, with everything done before the call (see `settled_metrics`).
fn flushed_metrics(fx: &Fixture) -> serde_json::Value {
    fx.settled_metrics()
}

fn lseek(fd: i32, whence: i32) -> i64 {
    // SAFETY: lseek on a valid fd.
    let r = unsafe { libc::lseek(fd, 0, whence) };
    assert!(r >= 0, "lseek: {}", std::io::Error::last_os_error());
    r
}

fn stub_tree_cost_on(fs: &str) {
    let t0 = Instant::now();
    let mut fx = Fixture::new(fs, "2G");
    // ~200 MiB: 10 files of 16 MiB (+ odd tails), 400 files of ~100 kB in 4 directories.
    for i in 0..10u64 {
        fx.write_source(&format!("bulk/large{i}"), (16 * MIB + i * 999) as usize, i);
    }
    for i in 0..400u64 {
        fx.write_source(
            &format!("bulk/d{}/small{i}", i % 4),
            100_000 + i as usize,
            1000 + i,
        );
    }
    let (src_bytes, _) = sizes_under(&fx.source);
    let before = df_used(&fx.fs.mnt);
    let out = fx.populate(&[]);
    let after = df_used(&fx.fs.mnt);
    check_method_line(fs, &out.stderr);
    let cost = after.saturating_sub(before);
    let (_, du_tree) = sizes_under(&fx.store.join("tree"));
    let pool = std::fs::metadata(fx.store.join(".hsm/zeros"))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    eprintln!(
        "{fs}: df cost of a stub tree: source {:.1} MiB in 410 files; df used {:.1} -> {:.1} MiB, \
         +{:.2} MiB = {:.2}% of the source (zero pool {:.1} MiB of it, the rest {:.2}% of the \
         source); du of the stub tree says {:.1} MiB",
        src_bytes as f64 / MIB as f64,
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        cost as f64 / MIB as f64,
        cost as f64 * 100.0 / src_bytes as f64,
        pool as f64 / MIB as f64,
        cost.saturating_sub(pool) as f64 * 100.0 / src_bytes as f64,
        du_tree as f64 / MIB as f64,
    );
    // What a user would call "almost no disk": under 10% of the source in all. The zero pool is
    // paid once per store on xfs/btrfs; beyond it, stubs must cost under 2% of what they stand
    // for (inodes, records, extent maps), so the saving grows with the tree.
    assert!(
        cost * 10 < src_bytes,
        "{fs}: stub tree costs {cost} bytes for {src_bytes}"
    );
    let one_off = if fs == "ext4" { 0 } else { ZERO_POOL };
    assert!(
        cost.saturating_sub(one_off) * 50 < src_bytes,
        "{fs}: stubs cost {cost} bytes (pool {one_off}) for {src_bytes}"
    );

    // What copy tools see of a never-read stub, and that looking does not fetch.
    fx.serve(&[]);
    let large = "bulk/large3";
    let size = fx.src(large).metadata().unwrap().len();
    let m0 = flushed_metrics(&fx);
    assert_eq!(m0["fetched_bytes"], 0, "{fs}: {m0}");
    let by_path = std::fs::metadata(fx.at(large)).unwrap();
    let f = File::open(fx.at(large)).unwrap();
    let by_fd = f.metadata().unwrap();
    let data = lseek(f.as_raw_fd(), libc::SEEK_DATA);
    let hole = lseek(f.as_raw_fd(), libc::SEEK_HOLE);
    eprintln!(
        "{fs}: never-read {large} via the view: size {size}, st_blocks*512 {} by path, {} after \
         open; SEEK_DATA 0 -> {data}, SEEK_HOLE -> {hole}",
        by_path.blocks() * 512,
        by_fd.blocks() * 512
    );
    // Copy tools look at fstat after open and at SEEK_DATA/SEEK_HOLE: all must say "data".
    assert!(
        by_fd.blocks() * 512 >= size,
        "{fs}: stub looks sparse to cp"
    );
    assert_eq!(data, 0, "{fs}: SEEK_DATA");
    assert_eq!(hole as u64, size, "{fs}: SEEK_HOLE");
    drop(f);
    let m1 = flushed_metrics(&fx);
    if fs == "ext4" {
        // No reflink: the defence is that an open fetches the whole file before it completes.
        assert_eq!(m1["fetched_bytes"], size, "{fs}: {m1}");
    } else {
        // A cloned stub reads as data without being fetched: stat, open, lseek fetch nothing.
        assert!(
            by_path.blocks() * 512 >= size,
            "{fs}: stub looks sparse to stat"
        );
        assert_eq!(
            m1["fetched_bytes"], 0,
            "{fs}: stat/open/lseek fetched: {m1}"
        );
        assert_eq!(m1["events_pre_access"], 0, "{fs}: {m1}");
    }
    assert_bytes_eq(
        &std::fs::read(fx.at(large)).unwrap(),
        &std::fs::read(fx.src(large)).unwrap(),
        &format!("{fs} {large}"),
    );
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{fs}: {m}");
    assert_eq!(m["fetched_bytes"], size, "{fs}: {m}");
    let filled = df_used(&fx.fs.mnt);
    eprintln!(
        "{fs}: after fetching {large} ({:.1} MiB): df used {:.1} MiB (+{:.1} MiB since populate)",
        size as f64 / MIB as f64,
        filled as f64 / MIB as f64,
        filled.saturating_sub(after) as f64 / MIB as f64
    );
    eprintln!("{fs}: stub tree cost test done in {:?}", t0.elapsed());
}

#[test]
fn stub_tree_df_cost_and_seek_ext4() {
    if require_root() {
        stub_tree_cost_on("ext4");
    }
}

#[test]
fn stub_tree_df_cost_and_seek_xfs() {
    if require_root() {
        stub_tree_cost_on("xfs");
    }
}

#[test]
fn stub_tree_df_cost_and_seek_btrfs() {
    if require_root() {
        stub_tree_cost_on("btrfs");
    }
}

/// GNU tar must archive a never-read tree without "file changed as we read it" (exit 1, which
/// fails scripts and backups). tar compares the ctime of `fstat` after open with `fstat` after
/// reading; the bytes it archives are right (checked in `copy_tools_get_source_bytes_*`).
/// Fills go through xfs's invisible-I/O handles (no ctime change), and a file's state record,
/// whose write does move ctime, is written only once the file has had no access for 1 s. The
/// second half checks that window directly: ctime must not move between the open, the end of
/// the read and 0.4 s later (a reader slower than that is outside what hsm promises).
fn tar_exits_0_on(fs: &str, frontend: &[&str]) {
    let mut fx = Fixture::new(fs, "1G");
    fx.write_source("t/big", (24 * MIB + 5) as usize, 1);
    fx.write_source("t/small", 100_000, 2);
    for name in ["probe-big", "probe-small"] {
        let len = if name == "probe-big" { 12 * MIB } else { MIB };
        fx.write_source(name, len as usize, 3);
    }
    fx.populate(&[]);
    fx.serve(frontend);
    let tar = fx.scratch.path.join("t.tar");
    let out = Command::new("tar")
        .arg("--sparse")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&fx.view)
        .arg("t")
        .output()
        .unwrap();
    let mut moved = Vec::new();
    for name in ["probe-big", "probe-small"] {
        let mut f = File::open(fx.at(name)).unwrap();
        let md = f.metadata().unwrap();
        let opened = (md.ctime(), md.ctime_nsec());
        std::io::copy(&mut f, &mut std::io::sink()).unwrap();
        let md = f.metadata().unwrap();
        let read = (md.ctime(), md.ctime_nsec());
        // Not ordering: the promise is about this window (see above), so it is waited out.
        std::thread::sleep(Duration::from_millis(400));
        let md = f.metadata().unwrap();
        let later = (md.ctime(), md.ctime_nsec());
        eprintln!(
            "{fs}: {name} ctime after open {opened:?}, after read {read:?}, 0.4 s later {later:?}"
        );
        if read != opened || later != opened {
            moved.push(name);
        }
    }
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{fs}: {m}");
    assert!(
        out.status.success(),
        "{fs}: tar --sparse -c of never-read stubs: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        moved.is_empty(),
        "{fs}: ctime moved after open for {moved:?}"
    );
}

#[test]
fn tar_exits_0_on_never_read_stubs_ext4() {
    if require_root() {
        tar_exits_0_on("ext4", FANOTIFY);
    }
}

#[test]
fn tar_exits_0_on_never_read_stubs_xfs_fuse() {
    if require_root() {
        tar_exits_0_on("xfs", FUSE);
    }
}

#[test]
fn tar_exits_0_on_never_read_stubs_ext4_fuse() {
    if require_root() {
        tar_exits_0_on("ext4", FUSE);
    }
}

#[test]
fn tar_exits_0_on_never_read_stubs_xfs() {
    if require_root() {
        tar_exits_0_on("xfs", FANOTIFY);
    }
}

#[test]
#[ignore = "known limitation: btrfs has no invisible I/O, so filling a cloned stub's ranges while tar reads it moves its ctime and tar exits 1, 'file changed as we read it' (the bytes are right)"]
fn tar_exits_0_on_never_read_stubs_btrfs() {
    if require_root() {
        tar_exits_0_on("btrfs", FANOTIFY);
    }
}
