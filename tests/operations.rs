//! Operating the daemon (issue 20): Prometheus metrics scraped while reads run, the config file,
//! the fetch policy against real readers, one id per event across the supervisor's and the
//! worker's log lines, and the service manager's notifications.
mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:PORT/metrics: (status line, content type, body).
fn scrape(port: u16) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap_or("").to_string();
    let ctype = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

/// The value of a sample (a counter's `_total`, a gauge), parsed with a Prometheus parser.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    use prometheus_parse::Value;
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name}: {other:?}"),
    }
}

fn parse(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition parses")
}

/// Scraped again and again while four readers run; every scrape parses, the fetched bytes only
/// grow, and at the end they equal the bytes read (each byte fetched once).
#[test]
fn metrics_are_scraped_while_reads_run_and_count_the_bytes_read() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let rel = format!("d/f{i}");
            let data = fx.write_source(&rel, (6 << 20) + i * 12345, i as u64 + 1);
            (rel, data)
        })
        .collect();
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    fx.populate(&[]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    fx.serve(&["--metrics", &addr, "--dir-prefetch", "0"]);

    let (status, ctype, body) = scrape(port);
    assert!(status.contains("200"), "{status}");
    assert!(ctype.contains("openmetrics-text"), "{ctype}");
    let before = parse(&body);
    assert_eq!(
        sample(
            &before,
            "hsm_fetched_bytes_total",
            Some(("backend", "local"))
        ),
        0.0
    );

    let readers: Vec<_> = files
        .iter()
        .map(|(rel, data)| {
            let (p, data) = (fx.at(rel), data.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::File::open(&p).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    // Slow enough for scrapes to land mid-read.
                    std::thread::sleep(Duration::from_micros(1500));
                }
                assert_bytes_eq(&got, &data, "read through the mount");
            })
        })
        .collect();
    let mut scrapes = 0;
    let mut last = 0.0;
    while !readers.iter().all(|r| r.is_finished()) {
        let (_, _, body) = scrape(port);
        let now = sample(
            &parse(&body),
            "hsm_fetched_bytes_total",
            Some(("backend", "local")),
        );
        assert!(now >= last, "fetched bytes went down: {last} -> {now}");
        last = now;
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in readers {
        r.join().unwrap();
    }
    assert!(scrapes >= 3, "only {scrapes} scrapes while the reads ran");

    // The worker's last fills are counted by the time their reads return.
    let (_, _, body) = scrape(port);
    let after = parse(&body);
    let fetched = sample(
        &after,
        "hsm_fetched_bytes_total",
        Some(("backend", "local")),
    );
    assert_eq!(fetched as usize, total, "fetched bytes against bytes read");
    let fetches = sample(&after, "hsm_fetch_duration_seconds_count", None);
    let reads = sample(&after, "hsm_backend_reads_total", None);
    assert!(
        fetches >= 1.0 && fetches == reads,
        "{fetches} timed, {reads} reads"
    );
    assert!(sample(&after, "hsm_events_total", Some(("outcome", "allowed"))) > 0.0);
    assert_eq!(sample(&after, "hsm_evicted_bytes_total", None), 0.0);
    assert_eq!(sample(&after, "hsm_worker_restarts_total", None), 0.0);
    assert_eq!(sample(&after, "hsm_pending_events", None), 0.0);
    assert_eq!(
        sample(&after, "hsm_denials_total", Some(("errno", "EIO"))),
        0.0
    );
    assert!(body.contains("# TYPE hsm_fetch_duration_seconds histogram"));
    assert!(body.contains("hsm_fetch_duration_seconds_bucket{le=\"+Inf\"}"));
    for family in [
        "hsm_present_bytes",
        "hsm_policy_denials",
        "hsm_readahead_bytes",
        "hsm_prefetched_files",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family}:\n{body}"
        );
    }
    eprintln!("{scrapes} scrapes during the reads; {total} bytes read, {fetched} fetched, {fetches} backend reads timed");

    // Anything but /metrics: 404.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(
        raw.starts_with("HTTP/1.0 404") || raw.starts_with("HTTP/1.1 404"),
        "{raw}"
    );
}

/// The endpoint is loopback-only unless the config file allows otherwise; a config file with an
/// unknown key is refused, naming it. Neither starts anything.
#[test]
fn remote_metrics_and_unknown_config_keys_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(HSM)
            .arg("serve")
            .arg(dir.path().join("store"))
            .arg(dir.path().join("mnt"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--metrics", "0.0.0.0:9"]);
    assert!(e.contains("metrics_allow_remote"), "{e}");
    let cfg = dir.path().join("hsm.toml");
    std::fs::write(&cfg, "threads = 2\nreadahed = 5\n").unwrap();
    let e = run(&["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("readahed") && e.contains("unknown field"), "{e}");
    assert!(!dir.path().join("mnt").exists(), "nothing was made");
}

/// Run `exe args` and return (success, stdout, stderr).
fn run_as(exe: &Path, args: &[&Path]) -> (bool, Vec<u8>, String) {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A scanner (a `cat` named `updatedb`) is denied what is not present, with the configured
/// errno; a plain reader of the same stub gets its bytes; then the scanner reads the complete
/// file like anyone. A uid over its fetch rate is denied with EAGAIN. Denials are counted.
#[test]
fn a_listed_scanner_is_denied_and_an_allowed_reader_is_served() {
    a_listed_scanner_is_denied_and_an_allowed_reader_is_served_on(&[]);
}

#[test]
fn a_listed_scanner_is_denied_and_an_allowed_reader_is_served_fuse() {
    a_listed_scanner_is_denied_and_an_allowed_reader_is_served_on(&["--frontend", "fuse"]);
}

fn a_listed_scanner_is_denied_and_an_allowed_reader_is_served_on(frontend: &[&str]) {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let big = fx.write_source("scan/big", 3 << 20, 7);
    let small: Vec<Vec<u8>> = (0..6)
        .map(|i| fx.write_source(&format!("rate/s{i}"), 20_000, 100 + i))
        .collect();
    fx.populate(&[]);
    let cfg = fx.scratch.path.join("hsm.toml");
    std::fs::write(
        &cfg,
        "deny_comm = [\"updatedb\"]\ndeny_errno = \"EPERM\"\ndir_prefetch = 0\n",
    )
    .unwrap();
    fx.serve(&[frontend, &["--config", cfg.to_str().unwrap()]].concat());
    let updatedb = fx.scratch.path.join("updatedb");
    std::fs::copy("/bin/cat", &updatedb).unwrap();
    let cat = Path::new("/bin/cat");

    let (ok, out, err) = run_as(&updatedb, &[&fx.at("scan/big")]);
    assert!(
        !ok && out.is_empty(),
        "the scanner read {} bytes",
        out.len()
    );
    assert!(err.contains("Operation not permitted"), "{err}");
    let (ok, out, err) = run_as(cat, &[&fx.at("scan/big")]);
    assert!(ok, "{err}");
    assert_bytes_eq(&out, &big, "cat, after the scanner was denied");
    // Complete content is never affected.
    let (ok, out, err) = run_as(&updatedb, &[&fx.at("scan/big")]);
    assert!(ok, "the scanner on a complete file: {err}");
    assert_bytes_eq(&out, &big, "the scanner on a complete file");
    let m = fx.stop();
    assert!(metric(&m, "policy_denied_listed") >= 1, "{m}");
    assert!(metric(&m, "denied_eperm") >= 1, "{m}");
    assert_eq!(metric(&m, "policy_denied_rate"), 0, "{m}");

    // Two fetches at once, then one every 100 s: of six small files read at once by one uid,
    // two are served and four fail with EAGAIN until their uid's bucket fills again.
    fx.serve(
        &[
            frontend,
            &[
                "--uid-fetch-rate",
                "0.01",
                "--uid-fetch-burst",
                "2",
                "--dir-prefetch",
                "0",
            ],
        ]
        .concat(),
    );
    let mut served = 0;
    for (i, want) in small.iter().enumerate() {
        let (ok, out, err) = run_as(cat, &[&fx.at(&format!("rate/s{i}"))]);
        if ok {
            assert_bytes_eq(&out, want, "a file served under the rate");
            served += 1;
        } else {
            assert!(err.contains("Resource temporarily unavailable"), "{err}");
        }
    }
    assert_eq!(served, 2, "fetches allowed at a burst of 2");
    // The file already fetched is read again, over the rate or not.
    let (ok, out, _) = run_as(cat, &[&fx.at("rate/s0")]);
    assert!(ok);
    assert_bytes_eq(&out, &small[0], "a complete file over the rate");
    let m = fx.stop();
    assert_eq!(metric(&m, "policy_denied_rate"), 4, "{m}");
    assert_eq!(metric(&m, "denied_eagain"), 4, "{m}");
}

/// `hsm serve` with RUST_LOG=debug and NOTIFY_SOCKET: READY=1 once exposed, WATCHDOG=1 while it
/// runs, STOPPING=1 at SIGTERM; and one event's lines from the supervisor and from the worker
/// carry the same `event{id=N}`.
#[test]
fn notifications_and_one_event_id_across_both_processes() {
    if !require_root() {
        return;
    }
    use std::os::unix::net::UnixDatagram;
    let fx = Fixture::new("xfs", "1G");
    let data = fx.write_source("a", 300_000, 3);
    fx.populate(&[]);
    let sock_path = fx.scratch.path.join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = fx.scratch.path.join("serve.log");
    let mut child: Child = Command::new(HSM)
        .arg("serve")
        .arg(&fx.store)
        .arg(&fx.view)
        .env("RUST_LOG", "hsm=debug")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let kill = |child: &mut Child| {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
    };
    let mut messages = Vec::new();
    let until = |what: &str, messages: &mut Vec<String>| {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            let mut buf = [0u8; 512];
            let Ok(n) = notify.recv(&mut buf) else { break };
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            messages.push(msg.clone());
            if msg.lines().any(|l| l == what) {
                return true;
            }
        }
        false
    };
    if !until("READY=1", &mut messages) {
        kill(&mut child);
        panic!(
            "no READY=1: {messages:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "ready");
    let ready_at = Instant::now();
    assert!(
        until("WATCHDOG=1", &mut messages),
        "no WATCHDOG=1: {messages:?}"
    );
    assert!(ready_at.elapsed() < Duration::from_secs(2));
    assert_bytes_eq(&std::fs::read(fx.at("a")).unwrap(), &data, "a");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        until("STOPPING=1", &mut messages),
        "no STOPPING=1: {messages:?}"
    );
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            kill(&mut child);
            panic!("hsm serve did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let id_of = |line: &str| -> Option<String> {
        let at = line.find("event{id=")? + "event{id=".len();
        let len = line[at..].find('}')?;
        Some(line[at..at + len].to_string())
    };
    let passed: Vec<String> = text
        .lines()
        .filter(|l| l.contains("held; passed to the worker"))
        .filter_map(id_of)
        .collect();
    assert!(
        !passed.is_empty(),
        "no supervisor line with an event id:\n{text}"
    );
    let answered: Vec<String> = text
        .lines()
        .filter(|l| l.contains("answered: allowed"))
        .filter_map(id_of)
        .collect();
    let shared = passed.iter().find(|id| answered.contains(id));
    assert!(
        shared.is_some(),
        "no event id in both the supervisor's ({passed:?}) and the worker's ({answered:?}) lines:\n{text}"
    );
}

/// `hsm stats STORE [--json]`.
fn stats(path: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(HSM)
        .arg("stats")
        .arg(path)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Known files read through a served store: `hsm stats` shows the bytes read as fetched, the
/// files read most at the top (and none that was not read), latency percentiles in order, and
/// its `--json` parses; asked by the store or by the mount point alike. With no daemon, a clear
/// error.
#[test]
fn stats_show_the_bytes_read_and_the_files_read_most() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "1G");
    let sizes = [
        ("d/big", (9 << 20) + 123),
        ("d/mid", 5 << 20),
        ("d/small", (1 << 20) + 7),
    ];
    let files: Vec<(&str, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(rel, len))| (rel, fx.write_source(rel, len, i as u64 + 7)))
        .collect();
    fx.write_source("d/unread", 2 << 20, 99);
    fx.populate(&[]);
    fx.serve(&["--dir-prefetch", "0"]);
    // Smallest first, the small one twice: the order shown is by bytes, not by time or reads.
    for (rel, data) in files.iter().rev().chain(files.last()) {
        assert_bytes_eq(&std::fs::read(fx.at(rel)).unwrap(), data, rel);
    }
    let total: usize = sizes.iter().map(|s| s.1).sum();
    // A SIGHUP (credentials reload) neither stops nor restarts a daemon of a local source.
    let daemon = fx.daemon.as_ref().unwrap();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let end = Instant::now() + Duration::from_secs(10);
    let log = || std::fs::read_to_string(&daemon.stderr_log).unwrap_or_default();
    while !log().contains("SIGHUP: this source has no credentials to re-read") {
        assert!(Instant::now() < end, "SIGHUP not handled:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = stats(&fx.store, &["--json"]);
    assert!(
        out.status.success(),
        "hsm stats --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json parses");
    assert_eq!(s["backend"], "local", "{s:#}");
    assert_eq!(s["counters"]["fetched_bytes"], total as u64, "{s:#}");
    let top = s["top_files"].as_array().unwrap();
    let shown: Vec<(&str, u64)> = top
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["bytes"].as_u64().unwrap()))
        .collect();
    let want: Vec<(&str, u64)> = sizes.iter().map(|&(r, l)| (r, l as u64)).collect();
    assert_eq!(shown, want, "the files fetched most, most first");
    assert!(top.iter().all(|f| f["overcount"] == 0));
    let lat = &s["latency"];
    let us = |k: &str| {
        lat[k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency {k}: {lat}"))
    };
    assert_eq!(lat["count"], s["counters"]["backend_reads"]);
    assert!(us("count") >= 1);
    assert!(us("p50_us") <= us("p90_us") && us("p90_us") <= us("p99_us"));
    assert!(us("p99_us") <= us("max_us") && us("max_us") > 0, "{lat}");
    let allowed = |k: &str| s["counters"][k].as_u64().unwrap();
    assert!(
        allowed("open_allowed") + allowed("access_allowed") >= 3,
        "{s:#}"
    );
    assert_eq!(s["counters"]["pending_events"], 0);
    assert_eq!(s["counters"]["worker_starts"], 1, "the worker restarted");
    // The walk of the records: what was read is present, the unread file is not.
    assert_eq!(s["present_bytes"], total as u64, "{s:#}");
    assert_eq!(s["total_bytes"], (total + (2 << 20)) as u64);

    // For a person, through the mount point, the top two only.
    let out = stats(&fx.view, &["--top", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let big = text.find("d/big").expect("d/big shown");
    let mid = text.find("d/mid").expect("d/mid shown");
    assert!(big < mid, "{text}");
    assert!(
        !text.contains("d/small") && !text.contains("d/unread"),
        "{text}"
    );
    for line in [
        "fetched      ",
        "latency      p50 ",
        "denials      none",
        "present      ",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    eprintln!("{text}");

    fx.stop();
    let out = stats(&fx.store, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no hsm serve serves"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
