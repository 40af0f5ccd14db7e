//! The shortest end-to-end path on every filesystem: populate, serve, read back, stop.
mod common;
use common::*;

#[test]
fn populate_serve_read_back_on_every_filesystem() {
    if !require_root() {
        return;
    }
    for fs in FILESYSTEMS {
        let mut fx = Fixture::new(fs, "1G");
        let big = fx.write_source("dir/big", 6 << 20, 1);
        let small = fx.write_source("small", 5000, 2);
        fx.populate(&[]);
        fx.serve(&[]);
        assert_bytes_eq(&std::fs::read(fx.at("dir/big")).unwrap(), &big, fs);
        assert_bytes_eq(&std::fs::read(fx.at("small")).unwrap(), &small, fs);
        let m = fx.stop();
        assert_eq!(m["denied"], 0, "{fs}: {m}");
        assert_eq!(m["fetched_bytes"], (6 << 20) + 5000, "{fs}: {m}");
    }
}

/// Every positional argument of every command says what it is in `--help` (issue 26).
#[test]
fn every_positional_argument_has_help_text() {
    for cmd in ["populate", "manifest", "serve", "status", "verify", "guard"] {
        let out = run(std::process::Command::new(HSM).args([cmd, "--help"]));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let args = text
            .split("Arguments:\n")
            .nth(1)
            .unwrap_or_else(|| panic!("hsm {cmd} --help lists no arguments:\n{text}"));
        for line in args.lines().take_while(|l| !l.trim().is_empty()) {
            let line = line.trim();
            let (name, help) = line.split_once("  ").unwrap_or((line, ""));
            assert!(
                !help.trim().is_empty(),
                "hsm {cmd}: argument {name} has no help text:\n{text}"
            );
        }
    }
}

/// Options renamed for one name per concept (issue 25): the old names still work for a release,
/// with a warning on stderr, and `--help` shows only the new ones. (That each old name parses
/// to the same value as the new one is checked on the parsed command line, in src/main.rs.)
#[test]
fn old_option_names_still_work_with_a_warning() {
    use std::process::Command;
    let hsm = |args: &[&str]| Command::new(HSM).args(args).output().unwrap();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    // End to end: `manifest --digest` writes what `manifest --digests` writes.
    let dir = std::env::temp_dir().join(format!("hsm-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("f"), b"some bytes").unwrap();
    let d = dir.to_str().unwrap();
    let old = hsm(&["manifest", d, "--digest"]);
    let new = hsm(&["manifest", d, "--digests"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        old.status.success() && new.status.success(),
        "{}",
        stderr(&old)
    );
    assert_eq!(old.stdout, new.stdout);
    assert!(String::from_utf8_lossy(&new.stdout).contains("\"blake3\""));
    let warning = "hsm: warning: --digest is deprecated, use --digests";
    assert!(stderr(&old).contains(warning), "{}", stderr(&old));
    assert!(!stderr(&new).contains("warning"), "{}", stderr(&new));

    // The warnings come before the command runs (here it then fails: no such store).
    let out = hsm(&[
        "populate",
        "s3://bucket/prefix?deadline=5",
        "/nonexistent/hsm-store",
        "--jobs",
        "2",
    ]);
    for w in [
        "hsm: warning: --jobs is deprecated, use --threads",
        "hsm: warning: deadline= in a source URL is deprecated, use fetch_deadline=",
    ] {
        assert!(stderr(&out).contains(w), "{w}: {}", stderr(&out));
    }
    let out = hsm(&[
        "serve",
        "/nonexistent/hsm-store",
        "/nonexistent/hsm-mnt",
        "--workers",
        "3",
        "--fetch-timeout",
        "4",
    ]);
    for w in [
        "hsm: warning: --workers is deprecated, use --threads",
        "hsm: warning: --fetch-timeout is deprecated, use --fetch-deadline",
    ] {
        assert!(stderr(&out).contains(w), "{w}: {}", stderr(&out));
    }
    // An old name and its new one together are refused.
    let out = hsm(&["serve", "st", "mnt", "--workers", "3", "--threads", "3"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    for (cmd, new, old) in [
        ("populate", "--threads", "--jobs"),
        ("populate", "--fetch-deadline", "--fetch-timeout"),
        ("manifest", "--digests", "--digest "),
        ("serve", "--threads", "--workers"),
        ("serve", "--fetch-deadline", "--fetch-timeout"),
    ] {
        let help = String::from_utf8_lossy(&hsm(&[cmd, "--help"]).stdout).to_string();
        assert!(help.contains(new), "hsm {cmd} --help lacks {new}:\n{help}");
        assert!(!help.contains(old), "hsm {cmd} --help shows {old}:\n{help}");
    }
}
