//! Recorded access lists (issue 27) on the real kernel: `hsm serve --record-access` records what a
//! scripted run opened and read (files, order, ranges); a list fetched ahead (`--prefetch-list`,
//! `hsm hydrate --list`) makes the same reads find their bytes present (no backend read); a list
//! naming missing or changed files is handled and counted; and a reader is not held up by a
//! list's prefetch running over a slow link (nginx behind a delaying relay on loopback).
mod common;
use common::*;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// One line of a list, parsed by the test itself: (path, size, what, cgroup).
fn list_lines(path: &Path) -> Vec<(String, u64, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hsm-access-list 1"), "{text}");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() == 4 || f.len() == 5, "{l:?}");
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].to_string(),
                f[3].to_string(),
            )
        })
        .collect()
}

fn pread(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// The scripted run: two small files read whole (one with an odd name), two ranges of a big
/// file read with pread, in this order.
fn scripted_run(fx: &Fixture, small: &[u8], odd: &[u8], big: &[u8]) {
    assert_bytes_eq(&std::fs::read(fx.at("lib/small")).unwrap(), small, "small");
    assert_bytes_eq(&std::fs::read(fx.at("lib/odd name%")).unwrap(), odd, "odd");
    let at = |o: u64, n: usize| &big[o as usize..o as usize + n];
    assert_bytes_eq(
        &pread(&fx.at("big"), 2 * MIB, 4096),
        at(2 * MIB, 4096),
        "big 2M",
    );
    assert_bytes_eq(
        &pread(&fx.at("big"), 6 * MIB + 4096, 8192),
        at(6 * MIB + 4096, 8192),
        "big 6M",
    );
}

fn source_files(fx: &Fixture) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let small = fx.write_source("lib/small", 5000, 1);
    let odd = fx.write_source("lib/odd name%", 3000, 2);
    let big = fx.write_source("big", 8 << 20, 3);
    fx.write_source("lib/unread", 7000, 4);
    (small, odd, big)
}

fn hsm(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = Command::new(HSM);
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn a_recorded_list_matches_a_scripted_runs_accesses() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let (small, odd, big) = source_files(&fx);
    fx.populate(&[]);
    let list = fx.scratch.path.join("app.list");
    serve_recording(&mut fx, &list, &[]);
    scripted_run(&fx, &small, &odd, &big);
    let out = hsm(&[&"record", &"--flush", &fx.view]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 files"),
        "{out:?}"
    );
    let lines = list_lines(&list);
    let want_big = format!(
        "open,{}-{},{}-{}",
        2 * MIB,
        2 * MIB + 4096,
        6 * MIB + 4096,
        6 * MIB + 4096 + 8192
    );
    let got: Vec<(&str, u64, &str)> = lines
        .iter()
        .map(|(p, s, w, _)| (p.as_str(), *s, w.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("lib/small", 5000, "open"),
            ("lib/odd%20name%25", 3000, "open"),
            ("big", 8 << 20, want_big.as_str()),
        ],
        "in the order of first access, with the ranges read"
    );
    // The reader's cgroup, as /proc says it.
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mine = mine.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert!(
        lines.iter().all(|l| l.3 == mine.replace(' ', "%20")),
        "{lines:?} vs {mine}"
    );
    // A read of more of a file adds to its line (the kernel reports whole pages); at the stop
    // the list is written again.
    assert_bytes_eq(&pread(&fx.at("big"), 0, 100), &big[..100], "big 0");
    fx.stop();
    let lines = list_lines(&list);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].2.starts_with("open,0-4096,2097152-"), "{lines:?}");

    // The next start records into the same list: merged. It reads only `lib/small` (made a
    // stub again): the files read in one start of two age out.
    release_all(&fx);
    serve_recording(&mut fx, &list, &[]);
    assert_bytes_eq(&std::fs::read(fx.at("lib/small")).unwrap(), &small, "small");
    fx.stop();
    let text = std::fs::read_to_string(&list).unwrap();
    assert_eq!(
        text,
        format!(
            "hsm-access-list 1\nlib/small\t5000\topen\t{}\t2/2\n",
            lines[0].3
        ),
        "merged"
    );
}

/// A stop detaches the mount first and serves open files for its drain; accesses made then (and
/// any still on their way to the recorder) are recorded all the same, though their fds' paths no
/// longer show the mount point.
#[test]
fn accesses_during_the_stop_are_recorded() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let (_, _, big) = source_files(&fx);
    fx.populate(&[]);
    let list = fx.scratch.path.join("app.list");
    serve_recording(&mut fx, &list, &["--drain", "5"]);
    let held = std::fs::File::open(fx.at("big")).unwrap();
    let mut buf = vec![0u8; 4096];
    held.read_exact_at(&mut buf, 2 * MIB).unwrap();
    assert_bytes_eq(&buf, &big[2 * MIB as usize..][..4096], "big 2M");
    let pid = fx.daemon.as_ref().unwrap().pid();
    // SAFETY: signalling the daemon this test started, by pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // The mount point is detached at once; the held file is still served.
    let end = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(fx.at("big")).is_ok() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::fs::metadata(fx.at("big")).is_err(),
        "the stop did not detach the mount (this checks nothing then)"
    );
    held.read_exact_at(&mut buf, 6 * MIB).unwrap();
    assert_bytes_eq(
        &buf,
        &big[6 * MIB as usize..][..4096],
        "big 6M, during the drain",
    );
    drop(held);
    fx.stop();
    let lines = list_lines(&list);
    let want = format!(
        "open,{}-{},{}-{}",
        2 * MIB,
        2 * MIB + 4096,
        6 * MIB,
        6 * MIB + 4096
    );
    assert!(
        lines.iter().any(|(p, _, w, _)| p == "big" && *w == want),
        "{}",
        std::fs::read_to_string(&list).unwrap()
    );
}

/// Serve `fx`, recording into `list`, with no directory prefetch (it would open files the run
/// does not), and `extra` options.
fn serve_recording(fx: &mut Fixture, list: &Path, extra: &[&str]) {
    let mut args = vec![
        "--record-access",
        list.to_str().unwrap(),
        "--dir-prefetch",
        "0",
    ];
    args.extend_from_slice(extra);
    fx.serve(&args);
}

/// Make every file a stub again (no daemon runs).
fn release_all(fx: &Fixture) {
    let out = hsm(&[&"release", &fx.store.join("tree")]);
    assert!(out.status.success(), "{out:?}");
}

/// Wait until the daemon's counter `key` stops changing and is at least `min`.
fn settle(fx: &Fixture, key: &str, min: u64) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    loop {
        let m = fx.settled_metrics();
        let v = metric(&m, key);
        if v >= min && v == last {
            return m;
        }
        assert!(Instant::now() < end, "{key} did not settle: {m}");
        last = v;
    }
}

#[test]
fn a_list_fetched_ahead_makes_its_reads_find_their_bytes_present() {
    if !require_root() {
        return;
    }
    // xfs: a big file's stub is filled range by range (on ext4 it is fetched whole at open).
    let mut fx = Fixture::new("xfs", "1G");
    let (small, odd, big) = source_files(&fx);
    fx.populate(&[]);
    let list = fx.scratch.path.join("app.list");
    serve_recording(&mut fx, &list, &[]);
    scripted_run(&fx, &small, &odd, &big);
    let recorded = metric(&fx.stop(), "fetched_bytes");
    assert!(recorded >= 8000, "the recording run fetched {recorded}");

    // Served with the list: fetched ahead at start, then the run reads nothing from the source.
    release_all(&fx);
    fx.serve(&[
        "--prefetch-list",
        list.to_str().unwrap(),
        "--dir-prefetch",
        "0",
    ]);
    let m = settle(&fx, "list_prefetched_bytes", 8000);
    let (reads, ahead) = (
        metric(&m, "backend_reads"),
        metric(&m, "list_prefetched_bytes"),
    );
    // The two small files whole, the pages read of the big one: nothing else.
    assert_eq!(
        ahead,
        5000 + 3000 + 4096 + 8192,
        "{m}\n{}",
        std::fs::read_to_string(&list).unwrap()
    );
    scripted_run(&fx, &small, &odd, &big);
    let m = fx.settled_metrics();
    assert_eq!(metric(&m, "backend_reads"), reads, "the run fetched: {m}");
    assert_eq!(
        metric(&m, "list_hit_bytes"),
        ahead,
        "every byte fetched ahead was read: {m}"
    );
    fx.stop();

    // `hsm hydrate --list` without a daemon, into STORE/tree: the same.
    release_all(&fx);
    let out = hsm(&[&"hydrate", &"--list", &list, &fx.store.join("tree")]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.starts_with("3 files in the list"), "{said}");
    assert!(said.contains(" 0 missing"), "{said}");
    fx.serve(&["--dir-prefetch", "0"]);
    scripted_run(&fx, &small, &odd, &big);
    let m = fx.stop();
    assert_eq!(metric(&m, "backend_reads"), 0, "{m}");

    // --prefetch-on-first-open: nothing is fetched until the list's first file is opened.
    release_all(&fx);
    fx.serve(&[
        "--prefetch-list",
        list.to_str().unwrap(),
        "--prefetch-on-first-open",
        "--dir-prefetch",
        "0",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let m = fx.settled_metrics();
    assert_eq!(
        metric(&m, "backend_reads"),
        0,
        "fetched before the first open: {m}"
    );
    assert_bytes_eq(&std::fs::read(fx.at("lib/small")).unwrap(), &small, "small");
    let m = settle(&fx, "list_prefetched_bytes", 3000);
    // The list the rest (and the first file too if it got there before the reader's fill),
    // each piece read from the source once.
    let ahead = metric(&m, "list_prefetched_bytes");
    assert!((15288..=20288).contains(&ahead), "{m}");
    let reads = metric(&m, "backend_reads");
    assert_eq!(reads, 4, "{m}");
    scripted_run(&fx, &small, &odd, &big);
    assert_eq!(metric(&fx.settled_metrics(), "backend_reads"), reads);
    fx.stop();
}

#[test]
fn a_list_naming_missing_or_changed_files_is_handled_and_counted() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("btrfs", "1G");
    let small = fx.write_source("small", 5000, 7);
    let big = fx.write_source("big", 6 << 20, 8);
    std::fs::create_dir_all(fx.src("dir")).unwrap();
    fx.populate(&[]);
    let list = fx.scratch.path.join("edited.list");
    // Recorded against an older tree: `gone` is no more, `dir` is a directory now, `big` was
    // 9 MiB (a range past its end now, one straddling it), `small` has an unchanged size.
    std::fs::write(
        &list,
        format!(
            "hsm-access-list 1\n# edited by hand\ngone\t10\topen\t-\ndir\t10\topen\t-\n\
             big\t{}\topen,{}-{},{}-{}\t-\nsmall\t5000\topen\t/x\n../escape\t1\topen\t-\n",
            9 << 20,
            5 * MIB,
            7 * MIB,
            8 * MIB,
            9 * MIB
        ),
    )
    .unwrap();
    fx.serve(&["--dir-prefetch", "0"]);
    let out = hsm(&[&"hydrate", &"--list", &list, &fx.view]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("5 files in the list") && said.contains("3 missing"),
        "{said}"
    );
    assert!(said.contains("1 changed since recorded"), "{said}");
    let m = fx.settled_metrics();
    assert_eq!(metric(&m, "list_missing_files"), 3, "{m}");
    assert_eq!(metric(&m, "list_changed_files"), 1, "{m}");
    // Fetched: small whole, big from 5 MiB to its end (clipped), nothing else.
    assert_eq!(metric(&m, "list_prefetched_bytes"), 5000 + MIB, "{m}");
    let reads = metric(&m, "backend_reads");
    assert_bytes_eq(&std::fs::read(fx.at("small")).unwrap(), &small, "small");
    assert_bytes_eq(
        &pread(&fx.at("big"), 5 * MIB, MIB as usize),
        &big[5 * MIB as usize..],
        "big tail",
    );
    assert_eq!(metric(&fx.settled_metrics(), "backend_reads"), reads);
    // A malformed list is refused with its line, and fetches nothing.
    std::fs::write(&list, "hsm-access-list 1\nsmall\t5000\topen,9-3\t-\n").unwrap();
    let out = hsm(&[&"hydrate", &"--list", &list, &fx.view]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("line 2") && err.contains("9-3"), "{err}");
    // So is one at serve start.
    fx.stop();
    let out = hsm(&[&"serve", &fx.store, &fx.view, &"--prefetch-list", &list]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("edited.list") && err.contains("line 2"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// A slow source: nginx behind a relay that delays every byte (as in tests/remote.rs).

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nginx {
    child: Child,
    port: u16,
    root: PathBuf,
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let root = dir.join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}; root {d}/www; }}
}}
"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light; .ci/run does)");
        let end = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, port, root }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay on loopback adding `rtt` of round trip (half each way), no bandwidth cap.
struct Link {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

impl Link {
    fn start(target: u16, rtt: Duration) -> Link {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
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
                    tokio::join!(relay(cr, sw, rtt / 2), relay(sr, cw, rtt / 2));
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
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() || n == 0 {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if data.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

#[test]
fn a_reader_is_not_held_up_by_a_running_list_prefetch() {
    if !require_root() {
        return;
    }
    let rtt = Duration::from_millis(200);
    let mut fx = Fixture::new("xfs", "1G");
    let nginx = Nginx::start(&fx.scratch.path.join("nginx"));
    // 640 listed files: at 32 in flight, 20 round trips (4 s) to fetch ahead.
    let mut list = String::from("hsm-access-list 1\n");
    for i in 0..640 {
        let rel = format!("listed/d{}/f{i}", i % 16);
        let p = nginx.root.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, pattern(8192, i)).unwrap();
        list.push_str(&format!("{rel}\t8192\topen\t-\n"));
    }
    let mut readers = Vec::new();
    for i in 0..3 {
        let data = pattern(20000, 1000 + i);
        std::fs::write(nginx.root.join(format!("reader{i}")), &data).unwrap();
        readers.push(data);
    }
    let manifest = run(Command::new(HSM).arg("manifest").arg(&nginx.root)).stdout;
    std::fs::write(nginx.root.join(".hsm-manifest.jsonl"), manifest).unwrap();
    let link = Link::start(nginx.port, rtt);
    let out = Command::new(HSM)
        .arg("populate")
        .arg(format!("http://127.0.0.1:{}/", link.port))
        .arg(&fx.store)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list_path = fx.scratch.path.join("many.list");
    std::fs::write(&list_path, list).unwrap();

    fx.serve(&[
        "--prefetch-list",
        list_path.to_str().unwrap(),
        "--dir-prefetch",
        "0",
    ]);
    let started = Instant::now();
    // Readers of files the list does not name, while it is being fetched: each takes about
    // one round trip (a new connection costs nothing more: the relay is on loopback), not
    // the wait behind the list's requests.
    std::thread::sleep(rtt);
    let mut took = Vec::new();
    for (i, data) in readers.iter().enumerate() {
        let t = Instant::now();
        let got = std::fs::read(fx.at(&format!("reader{i}"))).unwrap();
        took.push(t.elapsed());
        assert_bytes_eq(&got, data, "reader");
    }
    let readers_done = started.elapsed();
    let m = settle(&fx, "list_prefetched_bytes", 640 * 8192);
    let list_took = started.elapsed();
    assert_eq!(metric(&m, "list_prefetched_bytes"), 640 * 8192, "{m}");
    assert!(
        readers_done < list_took / 2,
        "the readers ended at {readers_done:?}, the list at {list_took:?}: not while it ran"
    );
    for t in &took {
        assert!(
            *t < rtt * 2,
            "a reader took {t:?} with a list prefetch running (round trip {rtt:?}): {took:?}"
        );
    }
    // The listed files are all there.
    assert_bytes_eq(
        &std::fs::read(fx.at("listed/d5/f101")).unwrap(),
        &pattern(8192, 101),
        "listed",
    );
    let m = fx.stop();
    assert_eq!(metric(&m, "denied"), 0, "{m}");
}

/// A walk through a directory sets off its prefetch; the files it fetched ahead are still
/// recorded when the walk opens them (they get no ignore mark while accesses are recorded).
#[test]
fn files_fetched_ahead_by_a_directory_walk_are_recorded_when_opened() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let mut files = Vec::new();
    for i in 0..12 {
        files.push(fx.write_source(&format!("walk/f{i:02}"), 3000 + i, 100 + i as u64));
    }
    fx.populate(&[]);
    let list = fx.scratch.path.join("walk.list");
    fx.serve(&["--record-access", list.to_str().unwrap()]);
    // Opened in reverse listing order, one at a time, slowly enough for the prefetch to have
    // fetched the rest after the first three.
    for i in (0..12).rev() {
        let got = std::fs::read(fx.at(&format!("walk/f{i:02}"))).unwrap();
        assert_bytes_eq(&got, &files[i], "walk");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = fx.stop();
    assert!(metric(&m, "prefetched_files") > 0, "no walk detected: {m}");
    let lines = list_lines(&list);
    let want: Vec<String> = (0..12).rev().map(|i| format!("walk/f{i:02}")).collect();
    let got: Vec<String> = lines.iter().map(|l| l.0.clone()).collect();
    assert_eq!(got, want, "{lines:?}");
}
