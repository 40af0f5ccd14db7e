//! Issue 26, mount points: `hsm serve` unmounts only a mount it can prove is its own and dead;
//! anything else at MOUNTPOINT is refused with a clear message and left as it was. Real loop-
//! mounted xfs, the real `hsm serve`, real tmpfs and bind mounts.
mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};

/// `hsm serve STORE MOUNTPOINT` expected to fail at start: its stderr.
fn serve_refused(store: &Path, mountpoint: &Path) -> String {
    let out = Command::new(HSM)
        .arg("serve")
        .arg(store)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "hsm serve started on {}",
        mountpoint.display()
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn serve_refuses_what_is_not_its_own_at_the_mount_point_and_cleans_up_after_itself() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let data = fx.write_source("f", 100_000, 3);
    fx.populate(&[]);

    // A missing mount point is made, and removed at the stop.
    assert!(!fx.view.exists());
    fx.serve(&[]);
    assert_bytes_eq(&std::fs::read(fx.at("f")).unwrap(), &data, "f");

    // A second serve of the same store, on the same mount point: refused, naming the first,
    // whose mount stays and keeps serving.
    let pid = fx.daemon.as_ref().unwrap().pid();
    let err = serve_refused(&fx.store, &fx.view);
    assert!(
        err.contains("already served") && err.contains(&pid.to_string()),
        "{err}"
    );
    assert!(
        is_mounted(&fx.view),
        "the first serve's mount was taken down"
    );
    assert_bytes_eq(
        &std::fs::read(fx.at("f")).unwrap(),
        &data,
        "f after the refusal",
    );
    fx.stop();
    assert!(
        !fx.view.exists(),
        "the mount point made by serve was left behind"
    );

    // A user's empty tmpfs at the mount point: refused, still mounted, its file kept.
    std::fs::create_dir_all(&fx.view).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "usertmp"])
        .arg(&fx.view));
    let err = serve_refused(&fx.store, &fx.view);
    assert!(
        err.contains("mount point of something else") && err.contains("tmpfs"),
        "{err}"
    );
    assert!(is_mounted(&fx.view), "the user's tmpfs was unmounted");
    std::fs::write(fx.view.join("mine"), b"user data").unwrap();
    let err = serve_refused(&fx.store, &fx.view);
    assert!(err.contains("mount point of something else"), "{err}");
    assert_eq!(std::fs::read(fx.view.join("mine")).unwrap(), b"user data");
    run(Command::new("umount").arg(&fx.view));

    // A directory with files: refused, the files untouched (not hidden under the tree).
    std::fs::write(fx.view.join("keep"), b"keep me").unwrap();
    let err = serve_refused(&fx.store, &fx.view);
    assert!(err.contains("not empty"), "{err}");
    assert!(!is_mounted(&fx.view));
    assert_eq!(std::fs::read(fx.view.join("keep")).unwrap(), b"keep me");
    std::fs::remove_file(fx.view.join("keep")).unwrap();

    // An existing empty directory is used and kept at the stop.
    fx.serve(&[]);
    fx.stop();
    assert!(fx.view.is_dir(), "a mount point the user made was removed");

    // The stale exposure left by a daemon killed with its worker: removed by the next serve,
    // which serves the right bytes there.
    fx.serve(&[]);
    let worker: i32 = std::fs::read_to_string(fx.store.join(".hsm/worker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the worker of our own daemon, by the pid it recorded.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    // Kept until the new serve runs: the harness's Drop would unmount MOUNTPOINT itself.
    let mut killed = fx.daemon.take().unwrap();
    killed.kill9();
    assert!(
        is_mounted(&fx.view),
        "the dead daemon's mount is gone already"
    );
    fx.serve(&[]);
    std::mem::forget(killed);
    let log = std::fs::read_to_string(&fx.daemon.as_ref().unwrap().stderr_log).unwrap();
    assert!(log.contains("removing the stale mount"), "{log}");
    assert_bytes_eq(
        &std::fs::read(fx.at("f")).unwrap(),
        &data,
        "f after the takeover",
    );
    fx.stop();
    assert!(
        !is_mounted(&fx.view),
        "mounts left at the mount point after the stop"
    );
}

/// The unit cleans up through hsm itself: no blind `umount` of MOUNTPOINT.
#[test]
fn the_systemd_unit_never_unmounts_blindly() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/hsm@.service"))
            .unwrap();
    let commands: Vec<&str> = unit
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.starts_with("Exec"))
        .collect();
    assert!(
        commands.iter().all(|l| !l.contains("umount")),
        "{commands:?}"
    );
    for key in [
        "Type=notify",
        "KillMode=process",
        "FileDescriptorStoreMax=",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
}

/// One guarded store per filesystem: a second store's serve on it is refused, naming what to do.
#[test]
fn a_second_store_on_a_guarded_filesystem_is_refused_until_its_guard_stops() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "512M");
    let data = fx.write_source("f", 50_000, 5);
    fx.populate(&[]);
    let other = fx.fs.mnt.join("other-store");
    run(Command::new(HSM)
        .arg("populate")
        .arg(&fx.source)
        .arg(&other)
        .stdin(Stdio::null()));
    fx.serve(&[]);
    fx.stop();
    let err = serve_refused(&other, &fx.scratch.path.join("other-view"));
    assert!(
        err.contains("one guarded store per filesystem") && err.contains("hsm guard --stop"),
        "{err}"
    );
    run(Command::new(HSM).arg("guard").arg("--stop").arg(&fx.store));
    let mut d = Daemon::start(
        &other,
        &fx.scratch.path.join("other-view"),
        &[],
        std::time::Duration::from_secs(120),
    );
    assert_bytes_eq(
        &std::fs::read(fx.scratch.path.join("other-view/f")).unwrap(),
        &data,
        "f from the other store",
    );
    d.stop_log();
    stop_guard(&other);
}
