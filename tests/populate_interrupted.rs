//! Issue 26: no half-made stub is ever served. `hsm populate` killed (SIGKILL, SIGTERM) at random
//! moments, on ext4, xfs and btrfs (loop-mounted images), leaves only whole stubs (every regular
//! file of STORE/tree carries its record) or nothing; run again, it completes the tree, and served,
//! every file reads the source's bytes. And populate without root's privileges refuses before it
//! creates anything.
mod common;
use common::*;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hsm::record::{SourceRecord, XATTR_SOURCE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KILLS: usize = 8;

/// What the source holds, by relative path.
struct Source {
    files: BTreeMap<String, Vec<u8>>,
    /// Groups of names of one inode (the first is the name written).
    links: Vec<Vec<String>>,
    symlinks: BTreeMap<String, String>,
}

/// A few thousand small files in 30 directories (some nested), four files big enough to be cloned
/// stubs on xfs and btrfs, hard links within and across directories (one of a big file), and
/// symlinks.
fn make_source(fx: &Fixture, seed: u64) -> Source {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut files = BTreeMap::new();
    for d in 0..30 {
        for f in 0..100 {
            let rel = if d % 10 == 3 {
                format!("d{d:02}/sub/deeper/f{f:03}")
            } else {
                format!("d{d:02}/f{f:03}")
            };
            let len = if f % 17 == 0 {
                0
            } else {
                rng.random_range(1..6000)
            };
            let data = fx.write_source(&rel, len, seed ^ (d * 1000 + f));
            files.insert(rel, data);
        }
    }
    for i in 0..4u64 {
        let rel = format!("big/b{i}.bin");
        let data = fx.write_source(&rel, (5 << 20) + 4097 * i as usize, seed ^ (90_000 + i));
        files.insert(rel, data);
    }
    let mut links = Vec::new();
    for i in 0..30 {
        let first = format!("d{i:02}/f001");
        let first = if i % 10 == 3 {
            format!("d{i:02}/sub/deeper/f001")
        } else {
            first
        };
        let names = vec![
            first.clone(),
            format!("d{:02}/hl{i}a", (i + 7) % 30),
            format!("hl{i}b"),
        ];
        for n in &names[1..] {
            std::fs::hard_link(fx.src(&first), fx.src(n)).unwrap();
            files.insert(n.clone(), files[&first].clone());
        }
        links.push(names);
    }
    std::fs::hard_link(fx.src("big/b1.bin"), fx.src("d05/big-link.bin")).unwrap();
    files.insert("d05/big-link.bin".into(), files["big/b1.bin"].clone());
    links.push(vec!["big/b1.bin".into(), "d05/big-link.bin".into()]);
    let mut symlinks = BTreeMap::new();
    for i in 0..10 {
        let rel = format!("d{i:02}/sym");
        std::os::unix::fs::symlink("f002", fx.src(&rel)).unwrap();
        symlinks.insert(rel, "f002".to_string());
    }
    Source {
        files,
        links,
        symlinks,
    }
}

/// Every regular file under `dir`, by path relative to `root`.
fn regular_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            regular_files(root, &e.path(), out);
        } else if md.is_file() {
            out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

fn is_staging(rel: &Path) -> bool {
    rel.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".hsm-staging."))
}

/// After a kill: every regular file of STORE/tree at a name is a whole stub (a record that
/// decodes, naming that file of the source), and `hsm status` finds no local or corrupt file.
/// Files under staging names (made where O_TMPFILE is not used) are the only others allowed,
/// and only when `staging`. Returns how many stubs there are.
fn check_whole(fx: &Fixture, src: &Source, staging: bool, what: &str) -> usize {
    let tree = fx.store.join("tree");
    if !tree.exists() {
        return 0;
    }
    let mut files = Vec::new();
    regular_files(&tree, &tree, &mut files);
    let mut stubs = 0;
    for rel in &files {
        if is_staging(rel) {
            assert!(staging, "{what}: a staging name without staging: {rel:?}");
            continue;
        }
        let path = tree.join(rel);
        let raw = hsm::sys::fs::lgetxattr(&path, XATTR_SOURCE)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: {rel:?} is in the tree without its record"));
        let rec = SourceRecord::decode(&raw)
            .unwrap_or_else(|e| panic!("{what}: {rel:?} has a bad record: {e}"));
        let rel_s = rel.to_str().unwrap();
        let want = src
            .files
            .get(rel_s)
            .unwrap_or_else(|| panic!("{what}: {rel:?} is not a file of the source"));
        assert_eq!(rec.size, want.len() as u64, "{what}: {rel:?}");
        assert_eq!(
            std::fs::symlink_metadata(&path).unwrap().len(),
            want.len() as u64,
            "{what}: {rel:?} has the wrong size"
        );
        stubs += 1;
    }
    let out = run(Command::new(HSM)
        .args(["status", "--json", "--summary"])
        .arg(&tree)
        .stdin(Stdio::null()));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states = &doc["totals"]["states"];
    let staged = files.iter().filter(|r| is_staging(r)).count() as u64;
    // A staging name killed before its record was written is the only record-less file.
    assert!(
        states["local"].as_u64().unwrap() <= staged,
        "{what}: status finds local files: {doc:#}"
    );
    assert_eq!(states["corrupt"], 0, "{what}: {doc:#}");
    stubs
}

/// `hsm populate SOURCE STORE` killed with `sig` after `delay`; whether it was still running.
fn populate_killed(fx: &Fixture, sig: i32, delay: Duration, staging: bool) -> bool {
    let mut cmd = Command::new(HSM);
    cmd.arg("populate")
        .arg(&fx.source)
        .arg(&fx.store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if staging {
        cmd.env("HSM_POPULATE_STAGING", "1");
    }
    let mut child = cmd.spawn().unwrap();
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    // SAFETY: signalling our own child by pid (not yet reaped: it is waited for below).
    unsafe { libc::kill(child.id() as i32, sig) };
    let status = child.wait().unwrap();
    if running {
        use std::os::unix::process::ExitStatusExt;
        // It may have finished between the check and the signal.
        assert!(
            status.signal() == Some(sig) || status.success(),
            "populate ended with {status}"
        );
    }
    running
}

fn killed_populates(fs: &str, staging: bool) {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new(fs, "3G");
    let seed = 0x26_0000 + fs.len() as u64 + staging as u64;
    let src = make_source(&fx, seed);

    // How long a whole populate takes here, so that the kills land while it runs.
    let timing = fx.fs.mnt.join("timing");
    let t0 = Instant::now();
    run(Command::new(HSM)
        .arg("populate")
        .arg(&fx.source)
        .arg(&timing)
        .stdin(Stdio::null()));
    let whole = t0.elapsed();
    std::fs::remove_dir_all(&timing).unwrap();
    let longest = whole.clamp(Duration::from_millis(40), Duration::from_secs(1));
    eprintln!("{fs}: a whole populate takes {whole:?}; kills within 20 ms - {longest:?}");

    let mut rng = StdRng::seed_from_u64(seed);
    let mut mid_run = 0;
    for round in 0..KILLS {
        // Every third round from scratch (a kill can land while the store itself is made),
        // the others over what the last one left.
        if round % 3 == 0 && fx.store.exists() {
            std::fs::remove_dir_all(&fx.store).unwrap();
        }
        let (sig, name) = if round % 2 == 0 {
            (libc::SIGKILL, "SIGKILL")
        } else {
            (libc::SIGTERM, "SIGTERM")
        };
        let delay = Duration::from_millis(rng.random_range(20..=longest.as_millis() as u64));
        let running = populate_killed(&fx, sig, delay, staging);
        mid_run += running as usize;
        let what = format!("{fs} round {round}, {name} after {delay:?}");
        let stubs = check_whole(&fx, &src, staging, &what);
        eprintln!(
            "{what}: {} ; {stubs} whole stubs",
            if running {
                "killed mid-run"
            } else {
                "had finished"
            }
        );
    }
    assert!(
        mid_run >= KILLS / 2,
        "only {mid_run} of {KILLS} kills landed while populate ran"
    );

    // Run again to the end: the tree is complete, no staging name is left.
    let mut cmd = Command::new(HSM);
    cmd.arg("populate")
        .arg(&fx.source)
        .arg(&fx.store)
        .stdin(Stdio::null());
    if staging {
        cmd.env("HSM_POPULATE_STAGING", "1");
    }
    let out = run(&mut cmd);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let stubs = check_whole(&fx, &src, false, &format!("{fs} after the last run"));
    assert_eq!(stubs, src.files.len(), "every source file has its stub");

    // Served: every file reads the source's bytes; hard links are one inode; symlinks as made.
    fx.serve(&[]);
    for (rel, want) in &src.files {
        let got = std::fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{fs}: read {rel}: {e}"));
        assert_bytes_eq(&got, want, &format!("{fs}: {rel} through the mount"));
    }
    for names in &src.links {
        let inos: Vec<u64> = names
            .iter()
            .map(|n| std::fs::metadata(fx.at(n)).unwrap().ino())
            .collect();
        assert!(
            inos.iter().all(|i| *i == inos[0]),
            "{fs}: {names:?} are not one inode: {inos:?}"
        );
    }
    for (rel, target) in &src.symlinks {
        assert_eq!(
            std::fs::read_link(fx.at(rel)).unwrap(),
            Path::new(target),
            "{fs}: {rel}"
        );
    }
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{fs}: {m}");
}

#[test]
fn populate_killed_at_random_moments_on_ext4_leaves_whole_stubs() {
    killed_populates("ext4", false);
}

#[test]
fn populate_killed_at_random_moments_on_xfs_leaves_whole_stubs() {
    killed_populates("xfs", false);
}

#[test]
fn populate_killed_at_random_moments_on_btrfs_leaves_whole_stubs() {
    killed_populates("btrfs", false);
}

/// Where O_TMPFILE is refused, stubs are made under staging names and renamed into place:
/// killed, that leaves staging names (never a source name without its record), which the next
/// run removes.
#[test]
fn populate_killed_with_staging_names_on_xfs_leaves_whole_stubs() {
    killed_populates("xfs", true);
}

/// A copy of the binary that an unprivileged user can run, wherever the build directory is.
fn unprivileged_copy(scratch: &Scratch) -> PathBuf {
    let dir = scratch.path.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("hsm");
    std::fs::copy(HSM, &exe).unwrap();
    exe
}

/// Every name under `dir`, recursively (relative), with its inode.
fn names_under(dir: &Path) -> HashMap<PathBuf, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut HashMap<PathBuf, u64>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            out.insert(e.path().strip_prefix(root).unwrap().to_path_buf(), md.ino());
            if md.is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    let mut out = HashMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn populate_without_root_refuses_before_creating_anything() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new("ext4", "1G");
    for i in 0..20 {
        fx.write_source(&format!("d/f{i}"), 100 + i, i as u64);
    }
    fx.write_source("seven", 7, 99);
    let exe = unprivileged_copy(&fx.scratch);
    // A directory the user may write in: without the check, STORE would be made there.
    let open = fx.fs.mnt.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let store = open.join("store");

    let as_nobody = |args: &[&std::ffi::OsStr]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&exe)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = as_nobody(&[
        "populate".as_ref(),
        fx.source.as_os_str(),
        store.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("unprivileged populate: {}\n{err}", out.status);
    assert!(!out.status.success(), "populate succeeded without root");
    assert!(err.contains("run as root"), "{err}");
    assert!(err.contains("nothing was created"), "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "one message, not one per entry:\n{err}"
    );
    assert!(!store.exists(), "populate made {}", store.display());
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);

    // Root, but without CAP_SYS_ADMIN (no trusted.* records): refused too, naming what lacks.
    let out = Command::new("setpriv")
        .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"])
        .arg(&exe)
        .arg("populate")
        .arg(&fx.source)
        .arg(&store)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("populate without CAP_SYS_ADMIN: {}\n{err}", out.status);
    assert!(!out.status.success());
    assert!(
        err.contains("run as root") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
    assert!(!store.exists(), "populate made {}", store.display());

    // Over an existing store: nothing in it changes.
    fx.populate(&[]);
    fx.write_source("new-file", 50, 7);
    let before = names_under(&fx.store);
    let out = as_nobody(&[
        "populate".as_ref(),
        fx.source.as_os_str(),
        fx.store.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("run as root"), "{err}");
    assert_eq!(names_under(&fx.store), before, "the store changed");
    assert!(!fx.stub("new-file").exists());
}
