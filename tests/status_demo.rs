//! `hsm status` and `hsm demo`, end to end, as a user would check them.
mod common;
use common::*;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn status_text(paths: &[&Path]) -> String {
    let out = run(Command::new(HSM)
        .arg("status")
        .args(paths)
        .stdin(Stdio::null()));
    String::from_utf8(out.stdout).expect("status output is UTF-8 even for non-UTF-8 names")
}

fn status_json(paths: &[&Path]) -> Value {
    let out = run(Command::new(HSM)
        .arg("status")
        .arg("--json")
        .args(paths)
        .stdin(Stdio::null()));
    serde_json::from_slice(&out.stdout).expect("status --json prints one JSON document")
}

/// The file entry whose path ends with `/suffix`.
fn entry<'a>(doc: &'a Value, suffix: &str) -> &'a Value {
    let want = format!("/{suffix}");
    doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with(&want))
        .unwrap_or_else(|| panic!("no entry for {suffix} in {doc:#}"))
}

/// The totals agree with the entries, and the disk figures are sane.
fn check_totals(doc: &Value) {
    let files = doc["files"].as_array().unwrap();
    let t = &doc["totals"];
    assert_eq!(t["files"], files.len(), "{doc:#}");
    let present: u64 = files
        .iter()
        .map(|f| f["present_bytes"].as_u64().unwrap())
        .sum();
    let size: u64 = files.iter().map(|f| f["size"].as_u64().unwrap()).sum();
    assert_eq!(t["present_bytes"], present, "{doc:#}");
    assert_eq!(t["total_bytes"], size, "{doc:#}");
    let states = t["states"].as_object().unwrap();
    let by_state: u64 = states.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(by_state, files.len() as u64, "{doc:#}");
    for (name, n) in states {
        let count = files.iter().filter(|f| f["state"] == name.as_str()).count();
        assert_eq!(n.as_u64().unwrap(), count as u64, "state {name}: {doc:#}");
    }
    let fss = t["filesystems"].as_array().unwrap();
    assert_eq!(fss.len(), 1, "{doc:#}");
    let used = fss[0]["used_bytes"].as_u64().unwrap();
    assert!(
        used > 0 && used <= fss[0]["total_bytes"].as_u64().unwrap(),
        "{doc:#}"
    );
    assert!(doc["errors"].as_array().unwrap().is_empty(), "{doc:#}");
}

fn line_for<'a>(text: &'a str, suffix: &str) -> &'a str {
    text.lines()
        .find(|l| l.ends_with(&format!("/{suffix}")) || l.contains(&format!("/{suffix}  [")))
        .unwrap_or_else(|| panic!("no line for {suffix} in:\n{text}"))
}

#[test]
fn status_stub_complete_modified_local_corrupt() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "1G");
    let one = fx.write_source("a/one.txt", 5000, 1);
    fx.write_source("a/two.txt", 7000, 2);
    fx.write_source("b/c/three.bin", 300_000, 3);
    fx.write_source("four.txt", 2000, 4);
    fx.write_source("evil\nstub 0 / 1 forged", 100, 5);
    fx.write_source("empty", 0, 6);
    std::fs::write(
        fx.source.join(OsStr::from_bytes(b"caf\xe9.txt")),
        pattern(10, 7),
    )
    .unwrap();
    let total = 5000 + 7000 + 300_000 + 2000 + 100 + 10;
    fx.populate(&[]);
    let tree = fx.store.join("tree");

    // Fresh: every non-empty file a stub, nothing present; an empty file has nothing to fetch.
    let doc = status_json(&[&tree]);
    check_totals(&doc);
    assert_eq!(doc["totals"]["files"], 7);
    assert_eq!(doc["totals"]["states"]["stub"], 6, "{doc:#}");
    assert_eq!(doc["totals"]["states"]["complete"], 1, "{doc:#}");
    assert_eq!(entry(&doc, "empty")["state"], "complete");
    assert_eq!(doc["totals"]["present_bytes"], 0);
    assert_eq!(doc["totals"]["total_bytes"], total);
    assert_eq!(entry(&doc, "a/one.txt")["size"], 5000);
    assert_eq!(entry(&doc, "a/one.txt")["kind"], "sparse");

    // Text: one line per file and a totals line; a newline in a name cannot forge a line, a
    // non-UTF-8 name is escaped.
    let text = status_text(&[&tree]);
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(
        text.lines().last().unwrap().starts_with(
            "total: 7 files (6 stub, 0 partial, 1 complete, 0 modified, 0 local, 0 corrupt)"
        ),
        "{text}"
    );
    assert!(text.contains("/evil\\nstub 0 / 1 forged\n"), "{text}");
    assert!(text.contains("/caf\\xe9.txt\n"), "{text}");
    assert!(line_for(&text, "a/one.txt").starts_with("stub "), "{text}");

    // Through the mount point while serving: the same, and status raises no event (it opens
    // nothing).
    fx.serve(&[]);
    let via_view = status_json(&[&fx.view]);
    check_totals(&via_view);
    assert_eq!(via_view["totals"], {
        let mut t = doc["totals"].clone();
        t["filesystems"] = via_view["totals"]["filesystems"].clone();
        t
    });
    // Two rewrites of the metrics after the status runs: everything it raised is counted.
    let m = fx.settled_metrics();
    assert_eq!(m["events_pre_access"], 0, "status raised events: {m}");
    assert_eq!(m["events_open"], 0, "status raised events: {m}");

    // Read one file whole, write into another, create a local one; corrupt a record.
    assert_bytes_eq(&std::fs::read(fx.at("a/one.txt")).unwrap(), &one, "one.txt");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.at("a/two.txt"))
        .unwrap();
    f.write_all_at(b"LOCAL", 10).unwrap();
    drop(f);
    std::fs::write(fx.at("new-local.txt"), b"hello").unwrap();
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
    sh(&format!(
        "setfattr -n trusted.hsm.state -v 0x48537431000000000000000000 '{}'",
        fx.stub("four.txt").display()
    ));

    let doc = status_json(&[&tree]);
    check_totals(&doc);
    let one_e = entry(&doc, "a/one.txt");
    assert_eq!(one_e["state"], "complete", "{doc:#}");
    assert_eq!(one_e["present_bytes"], 5000);
    assert_eq!(entry(&doc, "a/two.txt")["state"], "modified", "{doc:#}");
    assert_eq!(entry(&doc, "new-local.txt")["state"], "local", "{doc:#}");
    assert_eq!(entry(&doc, "new-local.txt")["present_bytes"], 5);
    let four = entry(&doc, "four.txt");
    assert_eq!(four["state"], "corrupt", "{doc:#}");
    assert!(
        four["reason"].as_str().unwrap().contains("checksum"),
        "{doc:#}"
    );
    assert_eq!(entry(&doc, "b/c/three.bin")["state"], "stub");
    assert_eq!(doc["totals"]["files"], 8);
    let s = &doc["totals"]["states"];
    assert_eq!(
        (
            &s["stub"],
            &s["complete"],
            &s["modified"],
            &s["local"],
            &s["corrupt"]
        ),
        (
            &Value::from(3),
            &Value::from(2),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1)
        ),
        "{doc:#}"
    );

    let text = status_text(&[&tree]);
    assert!(
        line_for(&text, "a/one.txt").starts_with("complete "),
        "{text}"
    );
    assert!(
        line_for(&text, "a/two.txt").starts_with("modified "),
        "{text}"
    );
    assert!(
        line_for(&text, "four.txt").contains("[state record: record checksum mismatch"),
        "{text}"
    );
    // A single file as PATH.
    let one_text = status_text(&[&tree.join("a/one.txt")]);
    assert_eq!(one_text.lines().count(), 2, "{one_text}");
    let one_path = tree.join("a/one.txt");
    let words: Vec<&str> = one_text.split_whitespace().take(5).collect();
    assert_eq!(
        words,
        ["complete", "5000", "/", "5000", one_path.to_str().unwrap()],
        "{one_text}"
    );
}

#[test]
fn status_partial_cloned_stub_on_xfs() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let big = fx.write_source("big.bin", 16 << 20, 11);
    fx.populate(&[]);
    fx.serve(&[]);
    let f = std::fs::File::open(fx.at("big.bin")).unwrap();
    for off in [4usize << 20, 10 << 20] {
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_bytes_eq(&buf, &big[off..off + (1 << 20)], "big.bin range");
    }
    drop(f);

    // While the daemon runs, the records follow within its flush interval (0.5 s).
    let end = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = status_text(&[&fx.at("big.bin")]);
        if text.starts_with("partial 12.5% ") || Instant::now() > end {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let words: Vec<&str> = text.split_whitespace().take(5).collect();
    assert_eq!(
        words,
        ["partial", "12.5%", "2097152", "/", "16777216"],
        "{text}"
    );

    let m = fx.stop();
    let doc = status_json(&[&fx.store.join("tree")]);
    check_totals(&doc);
    let e = entry(&doc, "big.bin");
    assert_eq!(e["state"], "partial", "{doc:#}");
    assert_eq!(e["kind"], "cloned", "{doc:#}");
    assert_eq!(e["present_bytes"], 2 << 20, "{doc:#}");
    assert_eq!(e["present_bytes"], m["fetched_bytes"], "{doc:#} {m}");
    assert_eq!(e["percent"], 12.5);
    // The disk use reported is the filesystem's, as df sees it.
    let df = sh(&format!(
        "df -B1 --output=used '{}' | tail -1",
        fx.fs.mnt.display()
    ));
    let df_used: u64 = String::from_utf8_lossy(&df.stdout).trim().parse().unwrap();
    let used = doc["totals"]["filesystems"][0]["used_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        used.abs_diff(df_used) < 1 << 20,
        "status {used}, df {df_used}"
    );
}

/// `hsm status ARGS PATHS`, asserting success: (stdout, stderr).
fn status_with(args: &[&str], paths: &[&Path]) -> (String, String) {
    let out = run(Command::new(HSM)
        .arg("status")
        .args(args)
        .args(paths)
        .stdin(Stdio::null()));
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Issue 26: a file rewritten shorter showed `modified 1892 / 7` (present bytes counted from the
/// source's size); `status STORE` listed the store's `.hsm` internals as local files.
#[test]
fn status_present_never_exceeds_size_and_a_store_shows_its_tree() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("ext4", "1G");
    let a = fx.write_source("a.txt", 1892, 21);
    fx.write_source("b/c.txt", 5000, 22);
    let d = fx.write_source("d.txt", 3000, 23);
    fx.populate(&["--digests"]);
    fx.serve(&[]);
    assert_bytes_eq(&std::fs::read(fx.at("a.txt")).unwrap(), &a, "a.txt");
    assert_bytes_eq(&std::fs::read(fx.at("d.txt")).unwrap(), &d, "d.txt");
    // Rewritten shorter through the mount, as an editor saves a file: O_TRUNC, then 7 bytes.
    std::fs::write(fx.at("a.txt"), b"7 bytes").unwrap();
    let m = fx.stop();
    assert_eq!(m["denied"], 0, "{m}");
    // Cut short where no daemon saw it: the records still say 3,000 bytes backed and present.
    raw_open(&fx.stub("d.txt"), true).set_len(5).unwrap();

    let tree = fx.store.join("tree");
    let doc = status_json(&[&tree]);
    check_totals(&doc);
    for f in doc["files"].as_array().unwrap() {
        assert!(
            f["present_bytes"].as_u64() <= f["size"].as_u64(),
            "present above the size: {f:#}"
        );
    }
    for (name, size) in [("a.txt", 7), ("d.txt", 5)] {
        let e = entry(&doc, name);
        assert_eq!(e["state"], "modified", "{doc:#}");
        assert_eq!(e["size"], size, "{doc:#}");
        assert_eq!(e["present_bytes"], size, "{doc:#}");
        assert_eq!(e["percent"], 100.0, "{doc:#}");
    }
    let text = status_text(&[&tree]);
    for (name, size) in [("a.txt", "7"), ("d.txt", "5")] {
        let words: Vec<&str> = line_for(&text, name).split_whitespace().take(4).collect();
        assert_eq!(words, ["modified", size, "/", size], "{text}");
    }

    // STORE itself: its tree, said so, and nothing of .hsm.
    let (out, err) = status_with(&["--json"], &[&fx.store]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    check_totals(&doc);
    assert_eq!(doc["totals"]["files"], 3, "{doc:#}");
    assert_eq!(doc["totals"]["states"]["local"], 0, "{doc:#}");
    for f in doc["files"].as_array().unwrap() {
        let p = f["path"].as_str().unwrap();
        assert!(p.contains("/tree/") && !p.contains("/.hsm/"), "{doc:#}");
    }
    assert!(err.contains("is a store: showing its tree"), "{err}");
    let (text, _) = status_with(&[], &[&fx.store]);
    assert!(!text.contains(".hsm"), "{text}");

    // --summary: the totals alone.
    let (text, err) = status_with(&["--summary"], &[&tree]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("total: 3 files (1 stub, 0 partial, 0 complete, 2 modified"),
        "{text}"
    );
    assert!(err.is_empty(), "{err}");
    let (out, _) = status_with(&["--summary", "--json"], &[&tree]);
    let sum: Value = serde_json::from_str(&out).unwrap();
    assert!(sum.get("files").is_none(), "{sum:#}");
    assert_eq!(sum["totals"], doc["totals"], "{sum:#}");
}

/// Issue 26: an unserved mount point or a path that holds no stub gave no hint.
#[test]
fn status_says_what_to_pass_for_an_unserved_or_plain_path() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new("ext4", "1G");
    fx.write_source("f.txt", 100, 31);
    fx.populate(&[]);
    std::fs::create_dir_all(&fx.view).unwrap();

    let (text, err) = status_with(&[], &[&fx.view]);
    assert!(text.starts_with("total: 0 files"), "{text}");
    assert!(
        err.contains("is an empty directory") && err.contains("hsm serve STORE MOUNTPOINT"),
        "{err}"
    );
    let (_, err) = status_with(&[], &[&fx.source]);
    assert!(
        err.contains("no file under") && err.contains("STORE/tree"),
        "{err}"
    );
    let (_, err) = status_with(&[], &[&fx.store.join("tree")]);
    assert!(err.is_empty(), "no hint where there are stubs: {err}");
}

/// Issue 26: `verify` on a path under the mount point asked for --store; STORE listed .hsm.
#[test]
fn verify_finds_the_store_from_the_mount_point() {
    if !require_root() {
        return;
    }
    let mut fx = Fixture::new("xfs", "1G");
    let small = fx.write_source("d/small.txt", 9000, 41);
    let big = fx.write_source("big.bin", 6 << 20, 42);
    fx.populate(&["--digests"]);
    fx.serve(&[]);
    assert_bytes_eq(
        &std::fs::read(fx.at("d/small.txt")).unwrap(),
        &small,
        "small",
    );
    let mut buf = vec![0u8; 1 << 20];
    std::fs::File::open(fx.at("big.bin"))
        .unwrap()
        .read_exact_at(&mut buf, 2 << 20)
        .unwrap();
    assert_bytes_eq(&buf, &big[2 << 20..3 << 20], "big.bin range");
    // Until the records of what was read are persisted (a file's, once it has had no access
    // for 1 s): one for each file. Counted from the metrics, which touch no file.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let m = fx.settled_metrics();
        if m["records_written"].as_u64().unwrap_or(0) >= 2 || Instant::now() > end {
            break;
        }
    }

    for (path, want) in [
        (fx.at("d/small.txt"), &["ok        1 chunks verified"][..]),
        (
            fx.view.clone(),
            &["ok        1 chunks verified", "ok        1 chunks verified"][..],
        ),
    ] {
        let out = run(Command::new(HSM)
            .arg("verify")
            .arg(&path)
            .stdin(Stdio::null()));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.matches(want[0]).count(),
            want.len(),
            "{}: {text}",
            path.display()
        );
    }
    // Its log, written to a file, carries no colour codes.
    let log = fx.daemon.take().unwrap().stop_log();
    assert!(
        log.contains(" INFO ") && !log.contains('\x1b'),
        "a log written to a file must be plain text:\n{log:?}"
    );
    let m = fx.metrics();
    assert_eq!(m["denied"], 0, "{m}");
    let out = run(Command::new(HSM)
        .arg("verify")
        .arg(&fx.store)
        .stdin(Stdio::null()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(!text.contains(".hsm"), "{text}");
}

#[test]
fn status_and_demo_refuse_without_privilege() {
    if !require_root() {
        return;
    }
    // A copy of the binary that an unprivileged user can run wherever the target dir is.
    let scratch = Scratch::new("nopriv");
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = scratch.path.join("hsm");
    std::fs::copy(HSM, &exe).unwrap();
    for (args, wants) in [
        (
            &["status", "/tmp"][..],
            &["run as root", "CAP_SYS_ADMIN"][..],
        ),
        (
            &["verify", "/tmp"][..],
            &["run as root", "CAP_SYS_ADMIN"][..],
        ),
        (&["demo"][..], &["must run as root"][..]),
    ] {
        let out = Command::new("setpriv")
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
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded unprivileged");
        for want in wants {
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}

#[test]
fn demo_runs_on_xfs_and_cleans_up() {
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("demo");
    let out_path = scratch.path.join("demo.out");
    let err_path = scratch.path.join("demo.err");
    let mut child = Command::new(HSM)
        .args(["demo", "--fs", "xfs"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(150) {
            let _ = child.kill(); // by pid, our own child
            let _ = child.wait();
            panic!(
                "hsm demo ran over 150 s; output:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    eprintln!("hsm demo took {:?}:\n{out}", t0.elapsed());
    assert!(status.success(), "demo failed ({status}):\n{out}\n{err}");
    for want in [
        "cat docs/d2/s3/note-4.txt: ",
        "1.0 MiB at offset 32.0 MiB of data/big.bin (64.0 MiB): 1048576 bytes, identical",
        "ran the stub bin/ls (an ELF executable): its output against /bin/ls's: ",
        "fetched from the source: ",
        "disk cost of the stub tree: ",
        "total: 302 files (",
        "result: OK",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(out.matches(", identical").count(), 6, "{out}"); // progress + report
    assert!(!out.contains("DIFFERENT"), "{out}");

    // Cleaned up: no temp dir, no mount under it, no process still using it.
    let work = out
        .lines()
        .find_map(|l| l.split("working in ").nth(1))
        .and_then(|r| r.split(' ').next())
        .expect("demo names its working directory");
    assert!(work.starts_with("/tmp/hsm-demo-"), "{work}");
    assert!(!Path::new(work).exists(), "{work} left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(work),
        "mounts left under {work}:\n{mounts}"
    );
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(work),
            "process {:?} still runs on {work}",
            p.file_name()
        );
    }
}
