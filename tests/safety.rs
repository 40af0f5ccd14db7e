//! Issue 4, parts 1 and 4, on the real kernel: crashes never show zeros, a hung backend never
//! hangs a reader, a full disk gives ENOSPC and records nothing that is not on disk, and many
//! readers at once get the right bytes from a daemon of bounded memory.
//!
//! Readers run as separate processes: this test binary started again on the ignored test
//! `reader_process`, configured through the environment (`HSM_SAFETY_READER`). Each compares
//! every byte it reads through MOUNTPOINT with the source file's bytes at the same offset.
//!
//! Figures (kills, reads, bytes checked, wrong bytes, errors by errno, peak memory) are printed
//! with `eprintln!`: run with `cargo test --test safety -- --nocapture --test-threads=1`.
//!
//! The hanging backend is a FUSE view of the source (`bindfs`) whose daemon is stopped with
//! SIGSTOP: every open and read of the source then waits in the kernel, as on a dead NFS server
//! or a suspended block device (device-mapper is not built into this machine's kernel).
mod common;
use common::*;

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm::record::{SourceRecord, StateRecord, XATTR_SOURCE, XATTR_STATE};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn errno_name(e: Option<i32>) -> String {
    let Some(e) = e else {
        return "no errno".into();
    };
    let name = match e {
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EPERM => "EPERM",
        libc::EBUSY => "EBUSY",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::ENOTCONN => "ENOTCONN",
        libc::EACCES => "EACCES",
        libc::ESTALE => "ESTALE",
        _ => return format!("errno {e}"),
    };
    name.into()
}

fn get(m: &Value, key: &str) -> u64 {
    m[key].as_u64().unwrap_or(0)
}

/// Is `pid` alive (not gone, not a zombie)?
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // "pid (comm) S ppid ...": the state follows the last ')'.
            let rest = &s[s.rfind(')').map_or(0, |i| i + 1)..];
            !rest.trim_start().starts_with('Z') && !rest.trim_start().starts_with('X')
        }
        Err(_) => false,
    }
}

fn ppid_of(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn is_hsm_worker(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|&b| b == 0)
                .any(|a| a == b"serve-worker".as_slice())
        })
        .unwrap_or(false)
}

/// The worker of the supervisor `sup`, by STORE/.hsm/worker.pid, checked to be that
/// supervisor's live `serve-worker` child (never some other process that reused the pid).
fn worker_of(store: &Path, sup: i32) -> Option<i32> {
    let pid: i32 = fs::read_to_string(store.join(".hsm/worker.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (ppid_of(pid) == Some(sup) && is_hsm_worker(pid) && alive(pid)).then_some(pid)
}

/// Wait (bounded) for a live worker of `sup`.
fn wait_worker(store: &Path, sup: i32, limit: Duration) -> i32 {
    let end = Instant::now() + limit;
    loop {
        if let Some(p) = worker_of(store, sup) {
            return p;
        }
        assert!(
            Instant::now() < end,
            "no live worker of supervisor {sup} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn xattr(p: &Path, name: &CStr) -> Option<Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENODATA),
            "getxattr {name:?} of {}: {e}",
            p.display()
        );
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// Read `[start, end)` of `f` into a vector (short at EOF).
fn read_range(f: &File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; (end - start) as usize];
    let mut done = 0;
    while done < out.len() {
        let n = f.read_at(&mut out[done..], start + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    out.truncate(done);
    Ok(out)
}

/// With no daemon running and a fresh page cache (remount first): for every file, each range its
/// state record claims present reads back from the stub, by the store's own path, equal to the
/// source. Returns (bytes recorded present, files complete).
fn check_records_against_disk(fx: &Fixture, files: &[(String, u64)], what: &str) -> (u64, usize) {
    let mut present = 0;
    let mut complete = 0;
    for (rel, size) in files {
        let stub = fx.stub(rel);
        let raw = xattr(&stub, XATTR_SOURCE)
            .unwrap_or_else(|| panic!("{what}: {rel} has no source record"));
        let source = SourceRecord::decode(&raw).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_eq!(source.size, *size, "{what}: {rel}");
        let state = match xattr(&stub, XATTR_STATE) {
            None => source.fresh_state(),
            Some(raw) => StateRecord::decode(&raw, &source)
                .unwrap_or_else(|e| panic!("{what}: {rel}: corrupt state record: {e}")),
        };
        assert!(!state.modified, "{what}: {rel} recorded modified");
        let f = File::open(&stub).unwrap();
        let s = File::open(fx.src(rel)).unwrap();
        for &(a, b) in state.present.pairs() {
            let got = read_range(&f, a, b).unwrap();
            let want = read_range(&s, a, b).unwrap();
            assert_bytes_eq(
                &got,
                &want,
                &format!("{what}: {rel} bytes {a}..{b} recorded present but not on disk"),
            );
            present += b - a;
        }
        if state.is_complete() {
            complete += 1;
        }
    }
    (present, complete)
}

/// The state record of a stub as stored (read by the store's path, without opening the file).
fn recorded_state(fx: &Fixture, rel: &str) -> StateRecord {
    let stub = fx.stub(rel);
    let src = SourceRecord::decode(&xattr(&stub, XATTR_SOURCE).unwrap()).unwrap();
    xattr(&stub, XATTR_STATE)
        .map(|raw| StateRecord::decode(&raw, &src).unwrap())
        .unwrap_or_else(|| src.fresh_state())
}

/// Read every file whole through MOUNTPOINT and compare it with the source.
fn read_all_and_compare(fx: &Fixture, files: &[(String, u64)], what: &str) -> u64 {
    let mut bytes = 0;
    for (rel, size) in files {
        let got = fs::read(fx.at(rel))
            .unwrap_or_else(|e| panic!("{what}: final read of {rel} failed: {e}"));
        let want = fs::read(fx.src(rel)).unwrap();
        assert_eq!(got.len() as u64, *size, "{what}: {rel}");
        assert_bytes_eq(&got, &want, &format!("{what}: final read of {rel}"));
        bytes += *size;
    }
    bytes
}

/// Warnings and errors of a daemon log, counted by message (ANSI colours, times and fields
/// stripped).
fn log_summary(log: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let mut plain = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        let Some(level) = ["WARN", "ERROR"].into_iter().find(|l| plain.contains(l)) else {
            continue;
        };
        // "TIME LEVEL target: message field=value ..."
        let msg = plain.split_once(": ").map(|x| x.1).unwrap_or(&plain);
        let msg: Vec<&str> = msg.split(' ').take_while(|w| !w.contains('=')).collect();
        *out.entry(format!("{level} {}", msg.join(" "))).or_default() += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reader processes
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct ReaderCfg {
    view: PathBuf,
    source: PathBuf,
    /// (relative path, size)
    files: Vec<(String, u64)>,
    secs: f64,
    seed: u64,
    /// Longest pread of a random range.
    max_len: u64,
    /// Percentage of operations that read a whole file (the others pread a random range).
    whole_percent: u32,
    /// Files at least this big are picked `big_percent` % of the time.
    big_from: u64,
    big_percent: u32,
    /// Small files: walk them in a shuffled order (each file once per pass) rather than at random.
    shuffle: bool,
    out: PathBuf,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct ReaderReport {
    ops: u64,
    ok: u64,
    failed: u64,
    /// Reads that returned fewer bytes than the file holds there, without an error.
    short: u64,
    bytes_checked: u64,
    wrong_bytes: u64,
    /// Of the wrong bytes, those read as zeros (stub bytes taken for content).
    wrong_zero_bytes: u64,
    errors: BTreeMap<String, u64>,
    max_latency_ms: u64,
    first_wrong: Vec<String>,
}

impl ReaderReport {
    fn add(&mut self, o: &ReaderReport) {
        self.ops += o.ops;
        self.ok += o.ok;
        self.failed += o.failed;
        self.short += o.short;
        self.bytes_checked += o.bytes_checked;
        self.wrong_bytes += o.wrong_bytes;
        self.wrong_zero_bytes += o.wrong_zero_bytes;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.max_latency_ms = self.max_latency_ms.max(o.max_latency_ms);
        self.first_wrong
            .extend(o.first_wrong.iter().take(5).cloned());
    }

    fn compare(&mut self, rel: &str, off: u64, got: &[u8], want: &[u8]) {
        let mut wrong = 0;
        let mut zero = 0;
        let mut first = None;
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            if a != b {
                wrong += 1;
                if *a == 0 {
                    zero += 1;
                }
                first.get_or_insert(i);
            }
        }
        self.bytes_checked += got.len().min(want.len()) as u64;
        self.wrong_bytes += wrong;
        self.wrong_zero_bytes += zero;
        if let Some(i) = first {
            if self.first_wrong.len() < 10 {
                self.first_wrong.push(format!(
                    "{rel}: {wrong} wrong bytes ({zero} zeros) in {} at {off}, first at {}",
                    got.len(),
                    off + i as u64
                ));
            }
        }
    }
}

/// One read through MOUNTPOINT, checked against the source. Err: the errno the reader got.
fn reader_op(
    cfg: &ReaderCfg,
    rel: &str,
    size: u64,
    rng: &mut StdRng,
    rep: &mut ReaderReport,
) -> Result<(), Option<i32>> {
    let src = File::open(cfg.source.join(rel)).expect("source file");
    let f = File::open(cfg.view.join(rel)).map_err(|e| e.raw_os_error())?;
    let whole = size == 0 || rng.random_range(0..100) < cfg.whole_percent;
    if whole {
        let mut buf = vec![0u8; 128 * KIB as usize];
        let mut off = 0u64;
        loop {
            let n = f.read_at(&mut buf, off).map_err(|e| e.raw_os_error())?;
            if n == 0 {
                break;
            }
            let want = read_range(&src, off, off + n as u64).unwrap();
            rep.compare(rel, off, &buf[..n], &want);
            if want.len() < n {
                // Bytes past the source's end.
                rep.wrong_bytes += (n - want.len()) as u64;
            }
            off += n as u64;
        }
        if off < size {
            rep.short += 1;
        }
    } else {
        let off = rng.random_range(0..size);
        let len = rng.random_range(1..=cfg.max_len);
        let mut buf = vec![0u8; len as usize];
        let n = f.read_at(&mut buf, off).map_err(|e| e.raw_os_error())?;
        let expect = len.min(size - off) as usize;
        if n < expect {
            rep.short += 1;
        }
        let want = read_range(&src, off, off + n as u64).unwrap();
        rep.compare(rel, off, &buf[..n], &want);
    }
    Ok(())
}

fn reader_main(cfg: ReaderCfg) -> ReaderReport {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut rep = ReaderReport::default();
    let big: Vec<&(String, u64)> = cfg.files.iter().filter(|f| f.1 >= cfg.big_from).collect();
    let mut small: Vec<&(String, u64)> = cfg.files.iter().filter(|f| f.1 < cfg.big_from).collect();
    small.shuffle(&mut rng);
    let mut next_small = 0;
    let end = Instant::now() + Duration::from_secs_f64(cfg.secs);
    while Instant::now() < end {
        let pick_big =
            !big.is_empty() && (small.is_empty() || rng.random_range(0..100) < cfg.big_percent);
        let (rel, size) = if pick_big {
            big[rng.random_range(0..big.len())]
        } else if cfg.shuffle {
            if next_small == small.len() {
                small.shuffle(&mut rng);
                next_small = 0;
            }
            next_small += 1;
            small[next_small - 1]
        } else {
            small[rng.random_range(0..small.len())]
        };
        let t = Instant::now();
        let res = reader_op(&cfg, rel, *size, &mut rng, &mut rep);
        rep.max_latency_ms = rep.max_latency_ms.max(t.elapsed().as_millis() as u64);
        rep.ops += 1;
        match res {
            Ok(()) => rep.ok += 1,
            Err(errno) => {
                rep.failed += 1;
                *rep.errors.entry(errno_name(errno)).or_default() += 1;
            }
        }
    }
    rep
}

/// Not a test: the body of a reader process started by the tests below.
#[test]
#[ignore = "helper: a reader process started by the other tests of this file"]
fn reader_process() {
    let Ok(cfg_path) = std::env::var("HSM_SAFETY_READER") else {
        eprintln!("reader_process: a helper, started with HSM_SAFETY_READER set");
        return;
    };
    let cfg: ReaderCfg = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
    let out = cfg.out.clone();
    let rep = reader_main(cfg);
    fs::write(&out, serde_json::to_vec(&rep).unwrap()).unwrap();
}

/// Run `n` reader processes with `base` (seed and output varied), wait for them (bounded), and
/// return their reports summed. A reader still running long after its time is a hung reader:
/// it is killed and the test fails.
fn run_readers(base: &ReaderCfg, n: usize, dir: &Path) -> (ReaderReport, Vec<ReaderReport>) {
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    for i in 0..n {
        let mut cfg = base.clone();
        cfg.seed = base.seed.wrapping_mul(31).wrapping_add(i as u64 + 1);
        cfg.out = dir.join(format!("reader-{i}.json"));
        let _ = fs::remove_file(&cfg.out);
        let cfg_path = dir.join(format!("reader-{i}.cfg.json"));
        fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let child = Command::new(&exe)
            .args([
                "--exact",
                "reader_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HSM_SAFETY_READER", &cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn reader process");
        children.push((child, cfg.out));
    }
    let end = Instant::now() + Duration::from_secs_f64(base.secs) + Duration::from_secs(60);
    let mut hung = Vec::new();
    let mut total = ReaderReport::default();
    let mut each = Vec::new();
    for (mut child, out) in children {
        let status = loop {
            match child.try_wait().unwrap() {
                Some(st) => break Some(st),
                None if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    hung.push(child.id());
                    break None;
                }
            }
        };
        if let Some(st) = status {
            assert!(st.success(), "reader process failed: {st}");
            let rep: ReaderReport = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
            total.add(&rep);
            each.push(rep);
        }
    }
    assert!(
        hung.is_empty(),
        "hung readers (still running 60 s after their time, killed): {hung:?}"
    );
    (total, each)
}

/// Samples VmRSS of the supervisor and of whichever worker is current, every 100 ms.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_sup: Arc<AtomicU64>,
    peak_worker: Arc<AtomicU64>,
    peak_worker_fds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(store: &Path, sup: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_sup = Arc::new(AtomicU64::new(0));
        let peak_worker = Arc::new(AtomicU64::new(0));
        let peak_worker_fds = Arc::new(AtomicU64::new(0));
        let (s, ps, pw, pf, store) = (
            stop.clone(),
            peak_sup.clone(),
            peak_worker.clone(),
            peak_worker_fds.clone(),
            store.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = vm_rss_kib(sup) {
                    ps.fetch_max(r, Ordering::Relaxed);
                }
                if let Some(w) = worker_of(&store, sup) {
                    if let Some(r) = vm_rss_kib(w) {
                        pw.fetch_max(r, Ordering::Relaxed);
                    }
                    pf.fetch_max(open_fds(w) as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak_sup,
            peak_worker,
            peak_worker_fds,
            thread: Some(thread),
        }
    }

    /// The most files the worker had open at once.
    fn peak_worker_fds(&self) -> u64 {
        self.peak_worker_fds.load(Ordering::Relaxed)
    }

    /// Stop sampling; (supervisor peak, worker peak) in KiB.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.peak_sup.load(Ordering::Relaxed),
            self.peak_worker.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Crashes never show zeros
// ---------------------------------------------------------------------------------------------

/// A source tree of mixed sizes: empty files, small ones, medium ones, and big ones (> 4 MiB:
/// cloned stubs on xfs, fetched range by range).
fn mixed_tree(fx: &Fixture, n_small: usize, n_medium: usize, n_big: usize) -> Vec<(String, u64)> {
    let mut rng = StdRng::seed_from_u64(4242);
    let mut files = Vec::new();
    let mut add = |rel: String, len: u64, seed: u64| {
        fx.write_source(&rel, len as usize, seed);
        files.push((rel, len));
    };
    for i in 0..4 {
        add(format!("empty/{i}"), 0, 0);
    }
    for i in 0..n_small {
        let len = rng.random_range(1..128 * KIB);
        add(format!("small/d{}/f{i}", i % 10), len, 1000 + i as u64);
    }
    for i in 0..n_medium {
        let len = rng.random_range(128 * KIB..4 * MIB);
        add(format!("medium/m{i}"), len, 5000 + i as u64);
    }
    for i in 0..n_big {
        let len = rng.random_range(5 * MIB..40 * MIB) + rng.random_range(0..4096);
        add(format!("big/b{i}"), len, 9000 + i as u64);
    }
    files
}

/// Processes with an open file, cwd or mapping under `dir` (pid, what).
fn users_of(dir: &Path) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let base = p.path();
        let mut links = vec![base.join("cwd"), base.join("root")];
        if let Ok(fds) = fs::read_dir(base.join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        for l in links {
            if let Ok(t) = fs::read_link(&l) {
                if t.starts_with(dir) {
                    let cmd = fs::read_to_string(base.join("comm")).unwrap_or_default();
                    out.push((pid, format!("{} {}", cmd.trim(), t.display())));
                }
            }
        }
    }
    out
}

/// Wait (bounded) until no process uses anything under `dir`; report who did.
fn wait_no_users(dir: &Path, what: &str) {
    let end = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let users = users_of(dir);
        if users.is_empty() {
            break;
        }
        if seen.is_empty() {
            eprintln!("{what}: still using {}: {users:?}", dir.display());
        }
        seen = users;
        assert!(
            Instant::now() < end,
            "{what}: processes still use {} 15 s after the daemon died: {seen:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One phase of the crash test: reader processes for `secs` while the worker is SIGKILLed at
/// random moments, each worker at most once. Returns (kills, readers' report). Asserts what must
/// hold whatever the kill rate: no wrong byte, every failed read has an errno, no hung reader.
fn kill_phase(
    fx: &Fixture,
    files: &[(String, u64)],
    sup: i32,
    secs: f64,
    gentle: bool,
    seed: u64,
    what: &str,
) -> (u64, ReaderReport) {
    const READERS: usize = 4;
    let what = format!("{what} ({})", if gentle { "gentle" } else { "brutal" });
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        let store = fx.store.clone();
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut kills = 0u64;
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let ms = if gentle {
                    rng.random_range(2200..3000)
                } else if rng.random_range(0..4) == 0 {
                    rng.random_range(500..2500)
                } else {
                    rng.random_range(50..400)
                };
                let end = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some(w) = worker_of(&store, sup) else {
                    continue;
                };
                if w == last {
                    continue;
                }
                // SAFETY: signalling a process checked to be this test's daemon's worker.
                if unsafe { libc::kill(w, libc::SIGKILL) } == 0 {
                    kills += 1;
                    last = w;
                }
            }
            kills
        })
    };
    let rss = RssSampler::start(&fx.store, sup);
    let base = ReaderCfg {
        view: fx.view.clone(),
        source: fx.source.clone(),
        files: files.to_vec(),
        secs,
        seed,
        max_len: 256 * KIB,
        whole_percent: 10,
        big_from: 4 * MIB,
        big_percent: 50,
        shuffle: false,
        out: PathBuf::new(),
    };
    let t0 = Instant::now();
    let (rep, _) = run_readers(&base, READERS, &fx.scratch.path);
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let elapsed = t0.elapsed();
    let (peak_sup, peak_worker) = rss.finish();
    eprintln!(
        "{what}: {:.1} s, {READERS} reader processes, {kills} worker kills; reads {} (ok {}, \
         failed {}, short {}), bytes checked {}, wrong bytes {} ({} of them zeros), errors by \
         errno {:?}, slowest read {} ms; peak RSS supervisor {} KiB, worker {} KiB",
        elapsed.as_secs_f64(),
        rep.ops,
        rep.ok,
        rep.failed,
        rep.short,
        rep.bytes_checked,
        rep.wrong_bytes,
        rep.wrong_zero_bytes,
        rep.errors,
        rep.max_latency_ms,
        peak_sup,
        peak_worker
    );
    assert!(
        kills as f64 >= secs / if gentle { 4.0 } else { 2.5 },
        "{what}: only {kills} kills"
    );
    assert_eq!(
        rep.wrong_bytes, 0,
        "{what}: wrong bytes: {:?}",
        rep.first_wrong
    );
    assert_eq!(rep.short, 0, "{what}: short reads without an error");
    assert!(
        !rep.errors.contains_key("no errno"),
        "{what}: failed reads without an errno: {:?}",
        rep.errors
    );
    assert!(rep.ok > 0 && rep.bytes_checked > 0, "{what}: nothing read");
    assert!(
        rep.max_latency_ms < 60_000,
        "{what}: a read took {} ms",
        rep.max_latency_ms
    );
    (kills, rep)
}

fn worker_killed_repeatedly(fs_kind: &str) {
    let what = format!("{fs_kind} worker kills");
    let mut fx = Fixture::new(fs_kind, "4G");
    let files = mixed_tree(&fx, 220, 60, 12);
    let total: u64 = files.iter().map(|f| f.1).sum();
    // 256 KiB chunks: more fetches, so more kills land in the middle of one.
    fx.populate(&["--chunk-size", "262144"]);
    fx.serve(&["--fetch-deadline", "10"]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let first_worker = wait_worker(&fx.store, sup, Duration::from_secs(10));

    // Gentle first (the supervisor counts deaths over the last 10 s): one kill every 2.2-3 s,
    // under its crash-loop threshold. No read may fail at all: readers wait for the next worker
    // and get the right bytes.
    let gentle = kill_phase(&fx, &files, sup, 12.0, true, 12, &what);
    assert_eq!(
        gentle.1.failed, 0,
        "{what}: reads failed with one kill every 2.2-3 s: {:?}",
        gentle.1.errors
    );
    // Brutal: mostly 50-400 ms between kills (before a worker has persisted anything), sometimes
    // 0.5-2.5 s (after it has written records, while it writes more). More than 5 deaths in 10 s
    // is a crash loop for the supervisor, which then fails what it holds with EIO.
    let brutal = kill_phase(&fx, &files, sup, 25.0, false, 11, &what);
    let kills = brutal.0 + gentle.0;

    // The same daemon keeps serving after the kills: a third of the files, whole, all right.
    let last_worker = wait_worker(&fx.store, sup, Duration::from_secs(30));
    // Until that worker is up: it rewrites the metrics twice (see `settled_metrics`).
    fx.settled_metrics();
    let third: Vec<(String, u64)> = files.iter().step_by(3).cloned().collect();
    let after_bytes = read_all_and_compare(&fx, &third, &what);

    // Then both processes die at once (the supervisor stopped first, so it cannot start another
    // worker): whatever the records say is present must be on disk.
    let mut killed = fx.daemon.take().unwrap();
    // SAFETY: signalling this test's daemon (our child) and its worker, checked by worker_of.
    unsafe { libc::kill(sup, libc::SIGSTOP) };
    let w = worker_of(&fx.store, sup).unwrap_or(last_worker);
    if is_hsm_worker(w) {
        // SAFETY: as above.
        unsafe { libc::kill(w, libc::SIGKILL) };
    }
    killed.kill9();
    let end = Instant::now() + Duration::from_secs(10);
    while alive(w) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(w), "{what}: worker {w} survived SIGKILL");
    let log = fs::read_to_string(&killed.stderr_log).unwrap_or_default();
    let restarts = log.matches("worker died").count();
    eprintln!(
        "{what}: daemon warnings and errors: {:?}",
        log_summary(&log)
    );
    // Its Drop removes the stale mount, which holds the filesystem.
    drop(killed);
    wait_no_users(&fx.fs.mnt, &what);
    fx.fs.remount_retrying();
    let (present, complete) = check_records_against_disk(&fx, &files, &what);
    eprintln!(
        "{what}: {kills} kills in all (first worker {first_worker}); supervisor saw {restarts} worker deaths; after them the same daemon read {} files \
         ({after_bytes} bytes) right; then both processes were killed: after a remount {complete} \
         of {} files are recorded complete and {present} bytes recorded present, all equal to the \
         source on disk",
        third.len(),
        files.len()
    );

    // A fresh daemon fetches only what the records do not claim, and everything reads right.
    fx.serve(&[]);
    let final_bytes = read_all_and_compare(&fx, &files, &what);
    let m = fx.stop();
    eprintln!(
        "{what}: fresh daemon: final full read {final_bytes} bytes right, fetched {} bytes \
         (total {total} - recorded {present})",
        get(&m, "fetched_bytes")
    );
    assert_eq!(
        get(&m, "fetched_bytes"),
        total - present,
        "{what}: the fresh daemon fetched more or less than the records left missing: {m}"
    );
    assert_eq!(get(&m, "denied"), 0, "{what}: {m}");
}

#[test]
fn worker_killed_repeatedly_on_xfs_readers_never_see_wrong_bytes() {
    if !require_root() {
        return;
    }
    worker_killed_repeatedly("xfs");
}

#[test]
fn worker_killed_repeatedly_on_ext4_readers_never_see_wrong_bytes() {
    if !require_root() {
        return;
    }
    worker_killed_repeatedly("ext4");
}

/// Kills a process by pid on drop if it still is an `hsm serve-worker` (an orphaned worker).
struct OrphanGuard(i32);

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        if alive(self.0) && is_hsm_worker(self.0) {
            // SAFETY: signalling a process checked to be an hsm worker started by this test.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

#[test]
fn supervisor_killed_no_stub_zeros_and_a_new_serve_takes_over() {
    if !require_root() {
        return;
    }
    let what = "supervisor kill";
    let mut fx = Fixture::new("xfs", "1G");
    let small = fx.write_source("small", 100 * KIB as usize, 1);
    let big = fx.write_source("big", 32 * MIB as usize + 123, 2);
    let other = fx.write_source("other", 6 * MIB as usize, 3);
    fx.populate(&[]);
    fx.serve(&["--drain", "3"]);
    let view = fx.view.canonicalize().unwrap();
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let worker = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let _guard = OrphanGuard(worker);

    assert_bytes_eq(&fs::read(fx.at("small")).unwrap(), &small, what);
    let open_big = File::open(fx.at("big")).unwrap();
    assert_bytes_eq(
        &read_range(&open_big, 0, 64 * KIB).unwrap(),
        &big[..64 * KIB as usize],
        what,
    );

    let t = Instant::now();
    // Kept (not dropped) until the checks are done: its Drop would unmount MOUNTPOINT itself.
    let mut killed = fx.daemon.take().unwrap();
    killed.kill9();
    // The worker answers what it holds and exits; the guard then answers from the records: a
    // range of the open file not fetched yet fails with EIO, never reads as stub zeros.
    let off = 20 * MIB;
    match read_range(&open_big, off, off + 256 * KIB) {
        Ok(got) => assert_bytes_eq(
            &got,
            &big[off as usize..(off + 256 * KIB) as usize],
            &format!("{what}: open file read after the kill"),
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
    let refused_read = t.elapsed();

    // The orphaned worker exits.
    let end = Instant::now() + Duration::from_secs(20);
    while alive(worker) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(worker),
        "{what}: worker {worker} still running 20 s after its supervisor died"
    );
    let worker_gone = t.elapsed();
    // The exposure left behind is guarded like any other mount: a never-read file fails.
    assert!(is_mounted(&view), "{what}: MOUNTPOINT gone");
    let r = fs::read(fx.at("other"));
    assert_eq!(
        r.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::EIO),
        "{what}: a never-read file through the leftover exposure: {:?}",
        r.map(|b| b.len())
    );
    drop(open_big);
    drop(killed);

    // A new serve on the same store and mount point serves the right bytes.
    fx.serve(&[]);
    assert!(is_mounted(&view), "{what}: new serve did not mount");
    for (rel, want) in [("small", &small), ("big", &big), ("other", &other)] {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel} through the new serve"),
        );
    }
    let m = fx.stop();
    assert_eq!(get(&m, "denied"), 0, "{what}: {m}");
    eprintln!(
        "{what}: open file's unfetched range refused {:?} after the kill; worker exited after \
         {:?}; a new serve took over and read {} bytes right",
        refused_read,
        worker_gone,
        small.len() + big.len() + other.len()
    );
}

#[test]
fn supervisor_and_worker_killed_together_a_new_serve_removes_the_stale_mount() {
    if !require_root() {
        return;
    }
    let what = "supervisor and worker kill";
    let mut fx = Fixture::new("xfs", "1G");
    let small = fx.write_source("small", 100 * KIB as usize, 1);
    let big = fx.write_source("big", 12 * MIB as usize + 5, 2);
    fx.populate(&[]);
    fx.serve(&[]);
    let view = fx.view.canonicalize().unwrap();
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let worker = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let _guard = OrphanGuard(worker);
    assert_bytes_eq(&fs::read(fx.at("small")).unwrap(), &small, what);

    // Both at once: the worker first, so it cannot unmount anything.
    // SAFETY: signalling this test's daemon's worker, checked above.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let mut killed = fx.daemon.take().unwrap();
    killed.kill9();
    let end = Instant::now() + Duration::from_secs(10);
    while alive(worker) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(worker), "{what}: worker survived SIGKILL");
    // The documented window: the stale mount is still there (nobody left to remove it).
    let stale = is_mounted(&view);
    // Its Drop would remove the stale mount: leave that to the new serve.
    std::mem::forget(killed);

    fx.serve(&[]);
    assert!(is_mounted(&view), "{what}: new serve did not mount");
    assert_bytes_eq(
        &fs::read(fx.at("big")).unwrap(),
        &big,
        &format!("{what}: big through the new serve"),
    );
    assert_bytes_eq(&fs::read(fx.at("small")).unwrap(), &small, what);
    let m = fx.stop();
    assert_eq!(get(&m, "denied"), 0, "{what}: {m}");
    eprintln!("{what}: stale mount left: {stale}; the new serve removed it and served right bytes");
}

// ---------------------------------------------------------------------------------------------
// 1b. A fetch that crashes (fault injection: HSM_FAULT_INJECT, see src/fault.rs)
// ---------------------------------------------------------------------------------------------

/// Files for the fault tests: the faulty one alone in its directory (`--dir-prefetch 0` too, so
/// nothing fills it without going through the fault), the others beside it in `ok/`: small
/// ones (filled whole at open) and a big one (filled range by range, on reads).
fn fault_tree(fx: &Fixture) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let bad = fx.write_source("trap/bad", 100 * KIB as usize, 90);
    let mut good: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let rel = format!("ok/small{i}");
            let data = fx.write_source(&rel, 50 * KIB as usize + i, 91 + i as u64);
            (rel, data)
        })
        .collect();
    good.push((
        "ok/big".into(),
        fx.write_source("ok/big", 12 * MIB as usize + 3, 99),
    ));
    (bad, good)
}

/// The errno of reading all of `rel` through the mount point, bounded in time.
fn read_errno(fx: &Fixture, rel: &str, limit: Duration, what: &str) -> (Option<i32>, Duration) {
    let p = fx.at(rel);
    let (res, took) = bounded(limit, move || fs::read(p))
        .unwrap_or_else(|| panic!("{what}: reading {rel} hung for more than {limit:?}"));
    (res.err().map(|e| e.raw_os_error().unwrap_or(-1)), took)
}

/// Issue 17: a panic in a fill fails only that access, with EIO. The worker catches it: the same
/// worker process goes on serving every other file with the right bytes, and is never restarted.
#[test]
fn a_panic_while_serving_one_file_fails_only_that_access() {
    if !require_root() {
        return;
    }
    let what = "panic in a fill";
    let mut fx = Fixture::new("xfs", "1G");
    let (_bad, good) = fault_tree(&fx);
    fx.populate(&[]);
    fx.serve_with_env(&["--dir-prefetch", "0"], &[(hsm::fault::ENV, "panic:bad")]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let worker = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let mut unread = good.iter();
    let mut fails = 0;
    // Interleaved: each failed access of the faulty file is followed by reads of other files,
    // some of them never read before (so they need a fill from the same worker).
    for round in 0..3 {
        let (errno, took) = read_errno(&fx, "trap/bad", Duration::from_secs(30), what);
        assert_eq!(
            errno,
            Some(libc::EIO),
            "{what}: round {round}: reading the faulty file ({took:?})"
        );
        fails += 1;
        for (rel, want) in unread.by_ref().take(2) {
            assert_bytes_eq(
                &fs::read(fx.at(rel)).unwrap(),
                want,
                &format!("{what}: {rel}"),
            );
        }
        let (rel, want) = &good[0];
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel} again"),
        );
    }
    for (rel, want) in unread {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel}"),
        );
    }
    assert_eq!(
        worker_of(&fx.store, sup),
        Some(worker),
        "{what}: the worker was replaced"
    );
    let log = fx.daemon.take().unwrap().stop_log();
    let m = fx.metrics();
    assert_eq!(get(&m, "worker_starts"), 1, "{what}: {m}");
    assert_eq!(get(&m, "denied"), fails, "{what}: {m}");
    // The failures came from the injected panic, caught by the worker.
    assert_eq!(
        log.matches("fault injected").count(),
        fails as usize,
        "{what}: log:\n{log}"
    );
    assert!(
        log.contains("a fetch panicked"),
        "{what}: no caught panic in the log:\n{log}"
    );
    assert!(!log.contains("worker died"), "{what}: log:\n{log}");
    eprintln!(
        "{what}: {fails} accesses of the faulty file failed with EIO; {} other files read right \
         by the same worker (worker_starts 1)",
        good.len()
    );
}

/// Issue 17: the crash-loop rule. An access that kills every worker it reaches (an abort, not a
/// panic: nothing catches it) is resent to each new worker; once more than 5 workers have died
/// in 10 s the supervisor fails it with EIO rather than hang the reader, and goes on serving
/// every other file with a new worker.
#[test]
fn an_access_that_kills_every_worker_gets_eio_after_five_deaths_in_ten_seconds() {
    if !require_root() {
        return;
    }
    let what = "crash loop";
    let mut fx = Fixture::new("xfs", "1G");
    let (_bad, good) = fault_tree(&fx);
    fx.populate(&[]);
    fx.serve_with_env(&["--dir-prefetch", "0"], &[(hsm::fault::ENV, "abort:bad")]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let first = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let (rel, want) = &good[0];
    assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), want, what);

    // The supervisor's own deadline (fetch deadline + 15 s) would give EAGAIN, not EIO: EIO
    // within it is the crash-loop rule's.
    let (errno, took) = read_errno(&fx, "trap/bad", Duration::from_secs(60), what);
    assert_eq!(
        errno,
        Some(libc::EIO),
        "{what}: the access that kills every worker, after {took:?}"
    );
    // A new worker serves everything else, files already read and files never read.
    let now = wait_worker(&fx.store, sup, Duration::from_secs(10));
    assert_ne!(now, first, "{what}: the first worker survived");
    for (rel, want) in &good {
        assert_bytes_eq(
            &fs::read(fx.at(rel)).unwrap(),
            want,
            &format!("{what}: {rel} after the crash loop"),
        );
    }
    let log = fx.daemon.take().unwrap().stop_log();
    let m = fx.metrics();
    let deaths = log.matches("worker died; starting another").count();
    assert!(deaths > 5, "{what}: {deaths} worker deaths; log:\n{log}");
    assert!(
        log.contains("the worker keeps dying"),
        "{what}: no crash-loop denial in the log:\n{log}"
    );
    assert_eq!(
        log.matches("fault injected").count(),
        deaths,
        "{what}: every death was the injected abort; log:\n{log}"
    );
    assert_eq!(get(&m, "worker_starts"), deaths as u64 + 1, "{what}: {m}");
    eprintln!(
        "{what}: the access failed with EIO after {took:?} and {deaths} worker deaths; then {} \
         files read right by a new worker",
        good.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A backend that hangs
// ---------------------------------------------------------------------------------------------

/// A FUSE view (bindfs) of a real directory, mounted on the fixture's source directory. Its
/// daemon is our child: SIGSTOP makes every access to the source hang; Drop resumes it, unmounts
/// and kills it.
struct FuseSource {
    child: Option<Child>,
    mnt: PathBuf,
}

impl FuseSource {
    fn mount(real: &Path, mnt: &Path) -> FuseSource {
        let child = Command::new("bindfs")
            .arg("-f")
            .arg(real)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("bindfs (apt-get install bindfs)");
        let fuse = FuseSource {
            child: Some(child),
            mnt: mnt.canonicalize().unwrap(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !is_mounted(&fuse.mnt) {
            assert!(Instant::now() < end, "bindfs did not mount within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        fuse
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for FuseSource {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `f` on a thread; its result and how long it took, or None if it is still running after
/// `limit` (the thread is left to finish once the hang is released).
fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<(T, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let r = f();
        let _ = tx.send((r, t.elapsed()));
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_hung_backend_fails_reads_with_eagain_in_bounded_time_and_recovers() {
    if !require_root() {
        return;
    }
    let what = "hung backend";
    let mut fx = Fixture::new("xfs", "1G");
    let real = fx.scratch.path.join("real");
    let write = |rel: &str, len: u64, seed: u64| {
        let d = pattern(len as usize, seed);
        fs::write(real.join(rel), &d).unwrap();
        d
    };
    fs::create_dir_all(&real).unwrap();
    let present = write("present", 100 * KIB, 1);
    let big = write("big", 16 * MIB + 7, 2);
    let never = write("never", 300 * KIB, 3);
    let never_big = write("never_big", 8 * MIB, 4);
    let fuse = FuseSource::mount(&real, &fx.source);
    fx.populate(&[]);
    fx.serve(&["--fetch-deadline", "2"]);

    // Fill what will be present: a whole small file and the first chunk of a big one.
    assert_bytes_eq(&fs::read(fx.at("present")).unwrap(), &present, what);
    let big_f = File::open(fx.at("big")).unwrap();
    assert_bytes_eq(
        &read_range(&big_f, 0, 64 * KIB).unwrap(),
        &big[..64 * KIB as usize],
        what,
    );

    fuse.signal(libc::SIGSTOP);
    // Prove the backend really hangs: a plain read of the source does not return.
    let src_never = fx.src("never");
    let probe = bounded(Duration::from_secs(2), move || {
        fs::read(src_never).map(|_| ())
    });
    assert!(
        probe.is_none(),
        "{what}: the source still answers while its FUSE daemon is stopped"
    );

    let mut outcomes = Vec::new();
    for (rel, off, len) in [("never", 0, 4096u64), ("never_big", 4 * MIB, 4096)] {
        let p = fx.at(rel);
        let got = bounded(Duration::from_secs(10), move || {
            let f = File::open(&p)?;
            read_range(&f, off, off + len)
        });
        let Some((res, took)) = got else {
            fuse.signal(libc::SIGCONT);
            panic!("{what}: a read of {rel} hung for more than 10 s with --fetch-deadline 2");
        };
        let errno = res.as_ref().err().and_then(|e| e.raw_os_error());
        // The timeout's own errno: a retry may succeed (EIO would say the data is bad).
        assert_eq!(
            errno,
            Some(libc::EAGAIN),
            "{what}: read of {rel} with the backend hung: {res:?} after {took:?}"
        );
        outcomes.push(format!("{rel}: {} after {took:?}", errno_name(errno)));
    }
    // What is present keeps reading, quickly.
    let t = Instant::now();
    assert_bytes_eq(&fs::read(fx.at("present")).unwrap(), &present, what);
    assert_bytes_eq(
        &read_range(&big_f, 0, 64 * KIB).unwrap(),
        &big[..64 * KIB as usize],
        what,
    );
    // Right bytes prove the backend was not needed (it would have failed them with EAGAIN).
    let present_took = t.elapsed();
    assert!(
        present_took < Duration::from_secs(10),
        "{what}: present files took {present_took:?} while the backend hung"
    );

    fuse.signal(libc::SIGCONT);
    for (rel, want) in [("never", &never), ("never_big", &never_big), ("big", &big)] {
        let p = fx.at(rel);
        let got = bounded(Duration::from_secs(30), move || fs::read(p))
            .unwrap_or_else(|| panic!("{what}: {rel} hangs after the backend came back"));
        let got = got
            .0
            .unwrap_or_else(|e| panic!("{what}: {rel} after the backend came back: {e}"));
        assert_bytes_eq(
            &got,
            want,
            &format!("{what}: {rel} after the backend came back"),
        );
    }
    drop(big_f);
    let m = fx.stop();
    eprintln!(
        "{what}: with --fetch-deadline 2: {}; present files read in {present_took:?} meanwhile; \
         all read right after the backend came back; metrics denied {}",
        outcomes.join(", "),
        get(&m, "denied")
    );
    drop(fuse);
}

/// Continues a stopped process when dropped, so that a failing assertion never leaves it stopped.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        // SAFETY: plain syscall on a pid checked to be our daemon's worker.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Whether process `pid` has a file named `name` open (an event's fd, say).
fn holds_fd_on(pid: i32, name: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|p| p.file_name() == Some(name.as_ref())))
    })
}

/// The worker answers the kernel itself, by the supervisor's fd number for the event. When the
/// supervisor gives up on an event at its deadline (EAGAIN), the worker may still answer it
/// later: the supervisor must keep that event's fd open until then, or a newer event gets the
/// same number and the late answer lets that newer read through before its bytes are fetched
/// (the reader would get the stub's zeros). Checked with a stopped worker: a read of a present
/// range (not the one published for the supervisor) is denied at the deadline, a read of another
/// file's missing range is then waiting when the worker goes on.
#[test]
fn an_answer_the_supervisor_gave_up_on_never_reaches_a_newer_event() {
    if !require_root() {
        return;
    }
    let what = "late answer";
    let mut fx = Fixture::new("xfs", "1G");
    // Cloned stubs (4 MiB and more on xfs): an open fetches nothing, each read raises its event.
    let first = fx.write_source("first", 8 * MIB as usize, 11);
    let second = fx.write_source("second", 8 * MIB as usize, 12);
    fx.populate(&[]);
    // The supervisor's deadline is the fetch deadline + 15 s.
    fx.serve(&["--fetch-deadline", "1"]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    let worker = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let first_f = File::open(fx.at("first")).unwrap();
    let second_f = File::open(fx.at("second")).unwrap();
    // Present already, so that the worker answers the old event at once when it goes on (on
    // the thread that receives it), ahead of the newer one, which needs a fetch. Then a read
    // elsewhere, so that the range the worker publishes for the supervisor (the last one it
    // wrote) is not this one: the supervisor would answer the old event itself.
    assert_bytes_eq(
        &read_range(&first_f, 0, 4096).unwrap(),
        &first[..4096],
        what,
    );
    let elsewhere = 6 * MIB as usize;
    assert_bytes_eq(
        &read_range(&first_f, elsewhere as u64, elsewhere as u64 + 4096).unwrap(),
        &first[elsewhere..elsewhere + 4096],
        what,
    );

    let stopped = Stopped::stop(worker);
    let f = first_f.try_clone().unwrap();
    let denied = bounded(Duration::from_secs(40), move || read_range(&f, 0, 4096))
        .unwrap_or_else(|| panic!("{what}: a read with the worker stopped was not denied in 40 s"));
    assert_eq!(
        denied.0.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::EAGAIN),
        "{what}: a read the worker never answered: {:?} after {:?}",
        denied.0.as_ref().map(|b| b.len()),
        denied.1
    );

    let f = second_f.try_clone().unwrap();
    // All of it in one read: one event whose fill (8 chunks) takes far longer than the reader
    // needs to find stub zeros, should a late answer let it through early.
    let newer = std::thread::spawn(move || read_range(&f, 0, 8 * MIB));
    // Until the supervisor has read the newer event (it holds the event's fd, on `second`) and
    // so passed it on, behind the old one.
    let end = Instant::now() + Duration::from_secs(20);
    while !holds_fd_on(sup, "second") {
        assert!(
            Instant::now() < end,
            "{what}: the supervisor did not read the newer event in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stopped);
    let got = newer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: the newer read failed: {e}"));
    assert_bytes_eq(&got, &second, &format!("{what}: the newer read"));
    assert_bytes_eq(
        &read_range(&first_f, 0, 4096).unwrap(),
        &first[..4096],
        &format!("{what}: the denied file, read again"),
    );
    drop((first_f, second_f));
    let m = fx.stop();
    assert_eq!(
        get(&m, "denied"),
        0,
        "{what}: the worker denied something: {m}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Disk full while filling
// ---------------------------------------------------------------------------------------------

/// Fill a 64 MiB ext4 store until it is full. `mkfs_extra`: the inode size decides whether the
/// records fit in the inode or need a block of their own (which a full disk cannot give).
/// Returns the bytes of the file that met ENOSPC recorded present (all checked on disk).
fn disk_full(mkfs_extra: &[&str]) -> u64 {
    let what = format!("disk full (mkfs.ext4 {})", mkfs_extra.join(" "));
    let what = what.as_str();
    let mut fx = Fixture::with_mkfs_args("ext4", "64M", mkfs_extra);
    let n = 8;
    let size = 12 * MIB + 4097;
    let files: Vec<(String, u64)> = (0..n)
        .map(|i| {
            let rel = format!("f{i}");
            fx.write_source(&rel, size as usize, 100 + i as u64);
            (rel, size)
        })
        .collect();
    fx.populate(&[]);
    fx.serve(&[]);

    let mut full_at = None;
    let mut read_ok = Vec::new();
    for (i, (rel, _)) in files.iter().enumerate() {
        match fs::read(fx.at(rel)) {
            Ok(got) => {
                assert_bytes_eq(&got, &fs::read(fx.src(rel)).unwrap(), what);
                read_ok.push(i);
                // Let the daemon record it (a file's record is written once it is quiet), so
                // that only the file that meets the full disk is partly recorded.
                let end = Instant::now() + Duration::from_secs(20);
                while !recorded_state(&fx, rel).is_complete() {
                    assert!(
                        Instant::now() < end,
                        "{what}: {rel} read whole but not recorded complete within 20 s"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC),
                    "{what}: reading {rel} on a full disk: {e}"
                );
                full_at = Some(i);
                break;
            }
        }
    }
    let full = full_at.unwrap_or_else(|| panic!("{what}: {n} files of {size} fit in 64 MiB?"));
    assert!(
        full >= 2,
        "{what}: the disk was full at file {full} already"
    );
    let failing = files[full].0.clone();
    // A second try fails the same way, and the files already there still read right.
    let again = fs::read(fx.at(&failing)).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::ENOSPC), "{what}: {again}");
    for &i in &read_ok {
        assert_bytes_eq(
            &fs::read(fx.at(&files[i].0)).unwrap(),
            &fs::read(fx.src(&files[i].0)).unwrap(),
            what,
        );
    }
    // On a full disk the daemon may be unable to write metrics.json: stop it without asking.
    let log = fx.daemon.take().unwrap().stop_log();
    let m: Value = fs::read(fx.store.join(".hsm/metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);

    // Nothing recorded present that is not on disk (fresh page cache, by the store's path).
    fx.fs.remount();
    let (present, complete) = check_records_against_disk(&fx, &files, what);
    let fail_state = recorded_state(&fx, &failing);
    assert!(
        !fail_state.is_complete(),
        "{what}: {failing} recorded complete after ENOSPC"
    );
    let status = run(Command::new(HSM)
        .args(["status", "--json"])
        .arg(fx.stub(&failing)));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let status_text = status.to_string();
    assert!(
        status_text.contains(&format!("\"present_bytes\":{}", fail_state.present_bytes())),
        "{what}: hsm status disagrees with the record ({} bytes): {status_text}",
        fail_state.present_bytes()
    );
    // Files read whole before the disk filled: recorded complete, unless the record itself could
    // not be written for lack of space (then they are only fetched again: a cost, not a loss).
    assert_eq!(
        complete,
        read_ok.len(),
        "{what}: files read whole before the disk filled"
    );

    // Free space: delete two complete files through MOUNTPOINT; the failing file then reads right
    // through a fresh daemon.
    fx.serve(&[]);
    for &i in &read_ok[..2] {
        fs::remove_file(fx.at(&files[i].0)).unwrap();
    }
    let got = fs::read(fx.at(&failing)).unwrap_or_else(|e| {
        panic!("{what}: {failing} after freeing space: {e}; first daemon's log:\n{log}")
    });
    assert_bytes_eq(&got, &fs::read(fx.src(&failing)).unwrap(), what);
    let m2 = fx.stop();
    // Only what the record did not claim was fetched again.
    assert_eq!(
        get(&m2, "fetched_bytes"),
        size - fail_state.present_bytes(),
        "{what}: {m2}"
    );
    eprintln!(
        "{what}: 64 MiB ext4, {n} files of {size} bytes: {} read, then ENOSPC on {failing} \
         ({} bytes of it recorded present, all on disk; {present} bytes recorded in all; last \
         metrics.json the daemon could write: denied {}, fetched_bytes {}); after deleting two \
         files it read right (fetched {} bytes)",
        read_ok.len(),
        fail_state.present_bytes(),
        get(&m, "denied"),
        get(&m, "fetched_bytes"),
        get(&m2, "fetched_bytes")
    );
    fail_state.present_bytes()
}

#[test]
fn disk_full_while_filling_gives_enospc_records_nothing_false_and_recovers() {
    if !require_root() {
        return;
    }
    // Default inodes (128 bytes on a filesystem this small): records need an xattr block.
    disk_full(&[]);
    // 512-byte inodes: records fit in the inode, so a partly filled file gets one.
    let recorded = disk_full(&["-I", "512"]);
    assert!(
        recorded > 0,
        "with records in the inode, the file filled when the disk ran out recorded nothing present"
    );
}

/// Open files of a process (count of /proc/PID/fd entries).
fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Free bytes of the filesystem holding `p`.
fn free_bytes(p: &Path) -> u64 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path and a zeroed statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

#[test]
fn the_worker_closes_complete_files_deleted_files_free_their_space() {
    if !require_root() {
        return;
    }
    let what = "worker fds";
    let mut fx = Fixture::new("xfs", "2G");
    // More files than the worker may keep open (the hard RLIMIT_NOFILE, 20000 on this machine,
    // two fds per cached file on xfs).
    let n = 12_000;
    let files: Vec<(String, u64)> = (0..n)
        .map(|i| {
            let rel = format!("d{:02}/f{i}", i % 50);
            let len = 1000 + (i as u64 * 7919) % 3000;
            fx.write_source(&rel, len as usize, 40_000 + i as u64);
            (rel, len)
        })
        .collect();
    let big_a = fx.write_source("big_a", 40 * MIB as usize, 1);
    let big_b = fx.write_source("big_b", 40 * MIB as usize, 2);
    fx.populate(&[]);
    fx.serve(&[]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;

    // Deleting complete files through MOUNTPOINT gives their space back while the daemon runs.
    let w = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let before = free_bytes(&fx.fs.mnt);
    assert_bytes_eq(&fs::read(fx.at("big_a")).unwrap(), &big_a, what);
    assert_bytes_eq(&fs::read(fx.at("big_b")).unwrap(), &big_b, what);
    let filled = free_bytes(&fx.fs.mnt);
    fs::remove_file(fx.at("big_a")).unwrap();
    fs::remove_file(fx.at("big_b")).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let mut after = free_bytes(&fx.fs.mnt);
    while after < before.saturating_sub(8 * MIB) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        after = free_bytes(&fx.fs.mnt);
    }
    let deleted_open = fs::read_dir(format!("/proc/{w}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|p| p.to_string_lossy().ends_with("(deleted)"))
        .count();
    eprintln!(
        "{what}: free bytes {before} before reading two 40 MiB files, {filled} after, {after} \
         10 s after deleting them through MOUNTPOINT; worker fds on deleted files: {deleted_open}"
    );
    assert!(
        after + 8 * MIB >= before,
        "{what}: deleting two complete 40 MiB files through MOUNTPOINT freed {} bytes in 10 s \
         ({deleted_open} deleted files still open in the worker)",
        after.saturating_sub(filled)
    );
    // Every file read once: all must succeed.
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = None;
    let mut peak_fds = 0;
    for (i, (rel, _)) in files.iter().enumerate() {
        match fs::read(fx.at(rel)) {
            Ok(got) => assert_bytes_eq(&got, &fs::read(fx.src(rel)).unwrap(), what),
            Err(e) => {
                first_failure.get_or_insert(i);
                *failed.entry(errno_name(e.raw_os_error())).or_default() += 1;
            }
        }
        if i % 500 == 0 {
            if let Some(w) = worker_of(&fx.store, sup) {
                peak_fds = peak_fds.max(open_fds(w));
            }
        }
    }
    // Until the worker has let go of what it no longer needs (bounded: asserted below).
    let w = wait_worker(&fx.store, sup, Duration::from_secs(10));
    let t = Instant::now();
    let mut idle_fds = open_fds(w);
    while idle_fds >= 4096 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        idle_fds = open_fds(w);
    }
    eprintln!(
        "{what}: {n} files read once: failures {failed:?} (first at file {first_failure:?}); \
         worker fds: peak {peak_fds} while reading, {idle_fds} {:?} after",
        t.elapsed()
    );
    assert!(failed.is_empty(), "{what}: reads failed: {failed:?}");

    assert!(
        idle_fds < 4096,
        "{what}: the worker keeps {idle_fds} files open after reading {n}"
    );
    fx.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. Many readers at once
// ---------------------------------------------------------------------------------------------

#[test]
fn stress_many_reader_processes_thousands_of_files_bounded_memory() {
    if !require_root() {
        return;
    }
    const SECS: f64 = 20.0;
    const READERS: usize = 6;
    const RSS_LIMIT_KIB: u64 = 300 * 1024;
    let what = "stress";
    let mut fx = Fixture::new("xfs", "2G");
    let mut rng = StdRng::seed_from_u64(99);
    let mut files = Vec::new();
    for i in 0..6000 {
        let len = rng.random_range(0..32 * KIB);
        let rel = format!("d{:02}/e{:02}/f{i}", i % 37, i % 11);
        fx.write_source(&rel, len as usize, 20_000 + i as u64);
        files.push((rel, len));
    }
    for i in 0..8 {
        let len = rng.random_range(4 * MIB..24 * MIB) + 17;
        let rel = format!("big/b{i}");
        fx.write_source(&rel, len as usize, 30_000 + i as u64);
        files.push((rel, len));
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    fx.populate(&[]);
    fx.serve(&[]);
    let sup = fx.daemon.as_ref().unwrap().pid() as i32;
    wait_worker(&fx.store, sup, Duration::from_secs(10));
    let rss = RssSampler::start(&fx.store, sup);
    let base = ReaderCfg {
        view: fx.view.clone(),
        source: fx.source.clone(),
        files: files.clone(),
        secs: SECS,
        seed: 5,
        max_len: MIB,
        whole_percent: 30,
        big_from: 4 * MIB,
        big_percent: 5,
        shuffle: true,
        out: PathBuf::new(),
    };
    let t0 = Instant::now();
    let (rep, each) = run_readers(&base, READERS, &fx.scratch.path);
    let elapsed = t0.elapsed();
    let peak_fds = rss.peak_worker_fds();
    let (peak_sup, peak_worker) = rss.finish();
    let m = fx.stop();
    eprintln!(
        "{what}: {READERS} reader processes for {:.1} s over {} files ({} bytes): reads {} (ok {}, \
         failed {}, short {}), bytes checked {}, wrong bytes {}, errors {:?}, slowest read {} ms, \
         reads per process {:?}; peak RSS supervisor {} KiB, worker {} KiB; peak worker fds \
         {peak_fds}; metrics: \
         events_open {}, events_pre_access {}, fetched_bytes {}, files_completed {}, denied {}",
        elapsed.as_secs_f64(),
        files.len(),
        total,
        rep.ops,
        rep.ok,
        rep.failed,
        rep.short,
        rep.bytes_checked,
        rep.wrong_bytes,
        rep.errors,
        rep.max_latency_ms,
        each.iter().map(|r| r.ops).collect::<Vec<_>>(),
        peak_sup,
        peak_worker,
        get(&m, "events_open"),
        get(&m, "events_pre_access"),
        get(&m, "fetched_bytes"),
        get(&m, "files_completed"),
        get(&m, "denied"),
    );
    assert_eq!(rep.wrong_bytes, 0, "{what}: {:?}", rep.first_wrong);
    assert_eq!(rep.failed, 0, "{what}: failed reads: {:?}", rep.errors);
    assert_eq!(rep.short, 0, "{what}: short reads");
    assert!(
        rep.max_latency_ms < 10_000,
        "{what}: a read took {} ms",
        rep.max_latency_ms
    );
    assert!(
        rep.ops as usize >= files.len(),
        "{what}: only {} reads",
        rep.ops
    );
    assert!(peak_sup > 0 && peak_worker > 0, "{what}: no RSS samples");
    assert!(
        peak_sup < RSS_LIMIT_KIB && peak_worker < RSS_LIMIT_KIB,
        "{what}: peak RSS supervisor {peak_sup} KiB, worker {peak_worker} KiB (limit {RSS_LIMIT_KIB})"
    );
    assert_eq!(get(&m, "denied"), 0, "{what}: {m}");
}

/// A walk over many more files than the daemon may hold open: every file it serves is cached
/// with its fds, and a tree walk outruns the periodic flush. With 256 open files allowed, 3,000
/// files read by `tar` must all come out whole (this hit EMFILE in the worker, then EIO and a
/// 45 s EAGAIN, before the cache was bounded by the limit).
#[test]
fn a_tree_walk_over_more_files_than_the_open_files_limit() {
    if !require_root() {
        return;
    }
    // Directory prefetch is off below `MIN_OPEN_FILES` (at 256 and at 2,048 its entries and fds
    // starved the events: EMFILE, then EIO for the walk); at that limit it runs with the fewest
    // fds it is ever given, so the walk is checked there too.
    let prefetch_from = hsm::prefetch::MIN_OPEN_FILES;
    for (fs_kind, open_files) in [("xfs", 256), ("ext4", 256), ("xfs", prefetch_from)] {
        let mut fx = Fixture::new(fs_kind, "1G");
        let mut files = Vec::new();
        for i in 0..3000u64 {
            let rel = format!("d{}/f{i}", i % 30);
            let data = fx.write_source(&rel, 200 + (i as usize * 37) % 9000, i);
            files.push((rel, data));
        }
        fx.populate(&[]);
        fx.serve_with_open_files(&[], open_files);
        let out = Command::new("tar")
            .args(["-cf", "-", "-C"])
            .arg(fx.at(""))
            .arg(".")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{fs_kind}: tar over 3,000 files with {open_files} open files allowed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (rel, data) in &files {
            let got = match fs::read(fx.at(rel)) {
                Ok(got) => got,
                Err(e) => {
                    let log = fx.daemon.as_mut().map(|d| d.stop_log()).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "{fs_kind} {open_files} fds: {rel}: {e}; daemon log (last lines first):\n{}",
                        tail.join("\n")
                    );
                }
            };
            assert_bytes_eq(&got, data, &format!("{fs_kind} {rel}"));
        }
        let m = fx.stop();
        assert_eq!(get(&m, "denied"), 0, "{fs_kind}: {m}");
        assert_eq!(get(&m, "files_completed"), 3000, "{fs_kind}: {m}");
        assert_eq!(
            get(&m, "prefetched_files") > 0,
            open_files >= prefetch_from,
            "{fs_kind} {open_files} fds: directory prefetch on exactly from {prefetch_from} fds: {m}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A flood of cold accesses through a slow source
// ---------------------------------------------------------------------------------------------

/// Pauses and resumes a process over and over (stopped `stopped` out of every `period`) while
/// it lives: a source that answers, slowly. Drop resumes it for good.
struct Throttle {
    pid: i32,
    on: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(pid: i32, stopped: Duration, period: Duration) -> Throttle {
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let thread = std::thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                // SAFETY: signalling our own child (the FUSE daemon) by pid.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(stopped);
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(period.saturating_sub(stopped));
            }
        });
        Throttle {
            pid,
            on,
            thread: Some(thread),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

/// One reader's access: a whole small file, or a 4 KiB range of a big one (read twice: the
/// second read finds it present).
#[derive(Clone)]
enum Access {
    Whole(PathBuf, Arc<Vec<u8>>),
    Range(PathBuf, u64, Arc<Vec<u8>>),
}

#[derive(Default, Debug)]
struct FloodReport {
    right: u64,
    wrong: u64,
    eagain: u64,
    other: BTreeMap<String, u64>,
    slowest: Duration,
}

/// Run every access on its own thread, all released at once. `retry_eagain`: a reader that gets
/// EAGAIN tries again (as a program told "try again" does) until `limit`. Returns the outcomes,
/// or fails the test when some access is still waiting at `limit`.
fn flood(accesses: Vec<Access>, retry_eagain: bool, limit: Duration, what: &str) -> FloodReport {
    let n = accesses.len();
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    for a in accesses {
        let (barrier, tx) = (barrier.clone(), tx.clone());
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                barrier.wait();
                let one = || -> io::Result<bool> {
                    match &a {
                        Access::Whole(p, want) => Ok(fs::read(p)? == **want),
                        Access::Range(p, off, big) => {
                            let f = File::open(p)?;
                            let want = &big[*off as usize..(*off + 4 * KIB) as usize];
                            let first = read_range(&f, *off, *off + 4 * KIB)?;
                            let again = read_range(&f, *off, *off + 4 * KIB)?;
                            Ok(first == want && again == want)
                        }
                    }
                };
                loop {
                    let t = Instant::now();
                    let got = one();
                    let took = t.elapsed();
                    let again = matches!(&got, Err(e) if e.raw_os_error() == Some(libc::EAGAIN));
                    if again && retry_eagain && start.elapsed() < limit {
                        let _ = tx.send((None, took));
                        continue;
                    }
                    let _ = tx.send((Some(got), took));
                    break;
                }
            })
            .expect("spawning a reader thread");
    }
    drop(tx);
    let mut report = FloodReport::default();
    let mut done = 0;
    while done < n {
        let left = limit.saturating_sub(start.elapsed());
        let received = rx.recv_timeout(left);
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = received {
            panic!("{what}: {} reader threads died", n - done);
        }
        let Ok((got, took)) = received else {
            panic!(
                "{what}: {} of {n} accesses still waiting after {limit:?}: the pipeline is \
                 wedged or the deadline is not enforced ({report:?})",
                n - done
            );
        };
        report.slowest = report.slowest.max(took);
        match got {
            None => report.eagain += 1,
            Some(got) => {
                done += 1;
                match got {
                    Ok(true) => report.right += 1,
                    Ok(false) => report.wrong += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => report.eagain += 1,
                    Err(e) => {
                        *report
                            .other
                            .entry(errno_name(e.raw_os_error()))
                            .or_default() += 1
                    }
                }
            }
        }
    }
    report
}

/// Issue 25: thousands of cold accesses at once (many readers, many small files, a slow source)
/// neither wedge the supervisor–worker pipeline nor stop the deadline. Every byte is checked.
#[test]
fn thousands_of_cold_accesses_through_a_slow_source_never_wedge_and_keep_the_deadline() {
    if !require_root() {
        return;
    }
    let what = "flood";
    let mut fx = Fixture::new("xfs", "2G");
    let real = fx.scratch.path.join("real");
    fs::create_dir_all(real.join("small")).unwrap();
    let mut rng = StdRng::seed_from_u64(25);
    let small: Vec<(String, Arc<Vec<u8>>)> = (0..2400)
        .map(|i| {
            let rel = format!("small/f{i:04}");
            let d = pattern(
                rng.random_range(1..=12) * KIB as usize + i % 97,
                1000 + i as u64,
            );
            fs::write(real.join(&rel), &d).unwrap();
            (rel, Arc::new(d))
        })
        .collect();
    let big: Vec<(String, Arc<Vec<u8>>)> = (0..8)
        .map(|i| {
            let rel = format!("big{i}");
            let d = pattern(8 * MIB as usize, 50 + i);
            fs::write(real.join(&rel), &d).unwrap();
            (rel, Arc::new(d))
        })
        .collect();
    let fuse = FuseSource::mount(&real, &fx.source);
    let fuse_pid = fuse.child.as_ref().map(|c| c.id() as i32).unwrap();
    fx.populate(&[]);
    // No directory prefetch: every access of phase 2 must be cold.
    fx.serve(&["--fetch-deadline", "3", "--dir-prefetch", "0"]);

    // Phase 1: 2,000 readers at once while the source answers slowly (stopped 15 ms of every
    // 20): 1,600 small files whole and 400 ranges of the big files, all cold.
    let mut phase1: Vec<Access> = small[..1600]
        .iter()
        .map(|(rel, d)| Access::Whole(fx.at(rel), d.clone()))
        .collect();
    for i in 0..400u64 {
        let (rel, d) = &big[(i % 4) as usize];
        // Spread over the file, 80 KiB apart.
        phase1.push(Access::Range(
            fx.at(rel),
            (i / 4) * 80 * KIB + (i % 3) * 4 * KIB,
            d.clone(),
        ));
    }
    let throttle = Throttle::start(
        fuse_pid,
        Duration::from_millis(15),
        Duration::from_millis(20),
    );
    let slow = flood(
        phase1,
        true,
        Duration::from_secs(300),
        &format!("{what}, slow source"),
    );
    drop(throttle);
    eprintln!("{what}: 2,000 cold readers at once, slow source: {slow:?}");
    assert_eq!(slow.wrong, 0, "{what}: wrong bytes read: {slow:?}");
    assert!(slow.other.is_empty(), "{what}: unexpected errors: {slow:?}");
    assert_eq!(slow.right, 2000, "{what}: {slow:?}");

    // Phase 2: the source hangs outright under 1,500 new cold readers. Every one of them must
    // come back (EAGAIN from the fetch timeout, or the supervisor's deadline behind it) in
    // bounded time, with no wrong byte, while the pipeline is full.
    fuse.signal(libc::SIGSTOP);
    let mut phase2: Vec<Access> = small[1600..]
        .iter()
        .map(|(rel, d)| Access::Whole(fx.at(rel), d.clone()))
        .collect();
    for i in 0..700u64 {
        let (rel, d) = &big[4 + (i % 4) as usize];
        phase2.push(Access::Range(fx.at(rel), (i / 4) * 32 * KIB, d.clone()));
    }
    let n2 = phase2.len() as u64;
    let hung = flood(
        phase2,
        false,
        Duration::from_secs(60),
        &format!("{what}, hung source"),
    );
    fuse.signal(libc::SIGCONT);
    eprintln!("{what}: {n2} cold readers at once, source hung: {hung:?}");
    assert_eq!(hung.wrong, 0, "{what}: wrong bytes read: {hung:?}");
    assert!(hung.other.is_empty(), "{what}: unexpected errors: {hung:?}");
    assert_eq!(hung.right + hung.eagain, n2, "{what}: {hung:?}");
    assert!(hung.eagain > 0, "{what}: the hang was not felt: {hung:?}");

    // The source is back: everything reads right.
    for (rel, d) in small.iter().chain(big.iter()) {
        let got = fs::read(fx.at(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert_bytes_eq(&got, d, &format!("{what}: {rel} after the hang"));
    }
    let m = fx.stop();
    eprintln!(
        "{what}: metrics after: allowed {}, denied {}",
        get(&m, "allowed"),
        get(&m, "denied")
    );
    drop(fuse);
}
