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
