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
