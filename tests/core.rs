//! Issue 2, "the core", proven on the real kernel: loop-mounted ext4, xfs and btrfs, the real
//! `hsm populate` and `hsm serve`, and real programs and syscalls reading through MOUNTPOINT.
//! Every byte read is compared with the source.
//!
//! Not tested here, because it cannot be produced on this machine: the refusal on a kernel
//! without pre-content events (it runs 6.14+; the check is fanotify_init/fanotify_mark answering
//! EINVAL, which no test can provoke without another kernel).
mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// At least 4 MiB: a cloned stub on xfs/btrfs, fetched range by range; odd, so the tail is partial.
const BIG: usize = 6 * MIB + 4097;

/// Every kind of stub: sparse fetched whole on open (ext4), sparse fetched range by range (ext4
/// `--lazy-sparse`), and cloned zero blocks (xfs, btrfs; smaller files there are sparse-whole).
const CONFIGS: [(&str, &[&str]); 4] = [
    ("ext4", &[]),
    ("ext4", &["--lazy-sparse"]),
    ("xfs", &[]),
    ("btrfs", &[]),
];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `pread` until `len` bytes or end of file.
fn pread_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        // SAFETY: the buffer has `len - done` bytes from `done`.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("pread({off}, {len}): {e}");
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    buf.truncate(done);
    buf
}

/// The bytes a read of `len` at `off` must return from `want`.
fn expect(want: &[u8], off: u64, len: usize) -> &[u8] {
    let s = (off as usize).min(want.len());
    let e = (off as usize).saturating_add(len).min(want.len());
    &want[s..e]
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn slice(&self, n: usize) -> &[u8] {
        // SAFETY: n <= len, memory initialised (zeroed, then written by the kernel).
        unsafe { std::slice::from_raw_parts(self.ptr, n.min(self.layout.size())) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A read-only or private mapping of a whole file, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize, private: bool) -> Map {
        let (prot, flags) = if private {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
        } else {
            (libc::PROT_READ, libc::MAP_SHARED)
        };
        // SAFETY: a fresh mapping of an open file; checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, f.as_raw_fd(), 0) };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map {
            ptr: ptr.cast(),
            len,
        }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; only used on private writable mappings.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The proof of concept's `mmap-validate` file: 1 MiB of 4 KiB pages, page i all `'a' + i % 26`.
fn mmap_pattern() -> Vec<u8> {
    (0..MIB).map(|p| b'a' + ((p / 4096) % 26) as u8).collect()
}

fn mmap_byte(pos: usize) -> u8 {
    b'a' + ((pos / 4096) % 26) as u8
}

/// Pages of a file in random order (every page once).
fn shuffled_pages(len: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut pages: Vec<usize> = (0..len.div_ceil(4096)).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.random_range(0..=i));
    }
    pages
}

/// Every entry under `root` (not following symlinks), relative, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Set atime and mtime of `p` itself (not following a symlink), with nanoseconds.
fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cstr(p);
    // SAFETY: NUL-terminated path, two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// A refused command must fail, quickly, and leave nothing mounted at `view`.
fn refused(cmd: &mut Command, view: Option<&Path>) -> String {
    let mut bounded = Command::new("timeout");
    bounded
        .args(["-s", "KILL", "60"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null());
    let out = bounded.output().expect("run the refused command");
    if let Some(v) = view {
        if is_mounted(v) {
            for _ in 0..2 {
                let _ = Command::new("umount").arg("-l").arg(v).status();
            }
            panic!("{cmd:?} left {} mounted", v.display());
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd:?} should have been refused; stdout: {}; stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(
        out.status.code(),
        None,
        "{cmd:?} was killed (timeout?) instead of refusing: {stderr}"
    );
    stderr
}

#[track_caller]
fn assert_says(stderr: &str, needles: &[&str], what: &str) {
    eprintln!("{what}: {}", stderr.trim_end());
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: message should contain {n:?}, got:\n{stderr}"
        );
    }
}

/// A tmpfs mounted in the scratch dir, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: PathBuf) -> Tmpfs {
        fs::create_dir_all(&at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&at));
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Every way of reading
// ---------------------------------------------------------------------------------------------

fn check_cat(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let out = run(Command::new("cat").arg(fx.at(rel)));
    assert_bytes_eq(&out.stdout, want, &format!("{what}: cat {rel}"));
}

/// Sequential `read(2)` with odd buffer sizes.
fn check_read(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    let sizes = [1usize, 4095, 4097, 65537, MIB + 3, 7, 131072];
    let mut got = Vec::new();
    let mut buf = vec![0u8; MIB + 3];
    for i in 0.. {
        let n = sizes[i % sizes.len()];
        // SAFETY: buf holds at least n bytes.
        let r = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), n) };
        assert!(r >= 0, "read: {}", std::io::Error::last_os_error());
        if r == 0 {
            break;
        }
        got.extend_from_slice(&buf[..r as usize]);
    }
    assert_bytes_eq(&got, want, &format!("{what}: read(2) of {rel}"));
}

/// `pread` at odd offsets and sizes on a fresh stub, then the whole file.
fn check_pread(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    let size = want.len() as u64;
    let mut cases: Vec<(u64, usize)> = vec![
        (12288, 5),
        (0, 1),
        (4095, 2),
        (size - 1, 10),
        (size, 5),
        (size + 4096, 5),
        (3 * MIB as u64 - 1, 2),
        (MIB as u64 + 4097, 3 * MIB + 1),
    ];
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..150 {
        cases.push((
            rng.random_range(0..size + 100),
            rng.random_range(1..300 * KIB),
        ));
    }
    for (off, len) in cases {
        let got = pread_at(&f, off, len);
        assert_bytes_eq(
            &got,
            expect(want, off, len),
            &format!("{what}: pread {rel} at {off} len {len}"),
        );
    }
    assert_bytes_eq(
        &pread_at(&f, 0, want.len() + 10),
        want,
        &format!("{what}: pread all of {rel}"),
    );
}

/// `preadv` with odd iovec sizes at odd offsets.
fn check_preadv(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    let sizes = [1usize, 4095, 7, 10000, 3, 70000, 5100];
    let total: usize = sizes.iter().sum();
    let mut offsets: Vec<u64> = vec![20000, 0, 4 * MIB as u64 + 1, want.len() as u64 - 5000];
    offsets.extend((1..12).map(|i| (i * 513_017) as u64 % want.len() as u64));
    for off in offsets {
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live buffer of its length.
        let n = unsafe {
            libc::preadv(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        };
        assert!(n >= 0, "preadv: {}", std::io::Error::last_os_error());
        let got: Vec<u8> = bufs.concat()[..n as usize].to_vec();
        assert_bytes_eq(
            &got,
            expect(want, off, total),
            &format!("{what}: preadv {rel} at {off}"),
        );
    }
    assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), want, what);
}

/// A shared read-only mapping of a fresh stub, pages touched in random order.
fn check_mmap_shared(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    let map = Map::new(&f, want.len(), false);
    let mut rng = StdRng::seed_from_u64(7);
    let bytes = map.bytes();
    for p in shuffled_pages(want.len(), &mut rng) {
        let r = p * 4096..((p + 1) * 4096).min(want.len());
        assert_bytes_eq(
            &bytes[r.clone()],
            &want[r],
            &format!("{what}: mmap {rel} page {p}"),
        );
    }
}

/// O_DIRECT reads into an aligned buffer, at aligned offsets, then the whole file.
fn check_direct(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(fx.at(rel))
        .unwrap();
    let buf = Aligned::new(MIB);
    let size = want.len();
    let mut cases: Vec<(usize, usize)> = vec![(8192, 64 * KIB), (0, 4096), (3 * MIB, MIB)];
    let mut off = 0;
    while off < size {
        cases.push((off, MIB));
        off += MIB;
    }
    for (off, len) in cases {
        // SAFETY: buf is MIB bytes, 4096-aligned; len <= MIB.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), len, off as libc::off_t) };
        assert!(
            n >= 0,
            "{what}: O_DIRECT pread {rel} at {off}: {}",
            std::io::Error::last_os_error()
        );
        assert_bytes_eq(
            buf.slice(n as usize),
            expect(want, off as u64, len),
            &format!("{what}: O_DIRECT {rel} at {off} len {len}"),
        );
    }
}

/// `sendfile` into a file outside the view: an odd range of a fresh stub, then the whole file.
fn check_sendfile(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    for (i, (start, len)) in [(12345u64, 3 * MIB + 7), (0, want.len())]
        .into_iter()
        .enumerate()
    {
        let out_path = fx.scratch.path.join(format!("sendfile-out-{i}"));
        let out = File::create(&out_path).unwrap();
        let mut off = start as libc::off_t;
        let mut done = 0;
        while done < len {
            // SAFETY: two open fds and a valid offset pointer.
            let n = unsafe { libc::sendfile(out.as_raw_fd(), f.as_raw_fd(), &mut off, len - done) };
            assert!(n >= 0, "sendfile: {}", std::io::Error::last_os_error());
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        drop(out);
        assert_bytes_eq(
            &fs::read(&out_path).unwrap(),
            expect(want, start, len),
            &format!("{what}: sendfile {rel} from {start}"),
        );
        fs::remove_file(&out_path).unwrap();
    }
}

/// `copy_file_range` into a file on the same filesystem but outside the store (the kernel
/// refuses cross-filesystem copies between different types): an odd range, then the whole file
/// (which xfs and btrfs may turn into a reflink of the filled blocks).
fn check_copy_file_range(fx: &Fixture, rel: &str, want: &[u8], what: &str) {
    let f = File::open(fx.at(rel)).unwrap();
    for (i, (start, len)) in [(3 * 4097u64, 2 * MIB + 11), (0, want.len())]
        .into_iter()
        .enumerate()
    {
        let mut out_path = fx.fs.mnt.join(format!("cfr-out-{i}"));
        let mut out = File::create(&out_path).unwrap();
        let mut off_in = start as i64;
        let mut off_out = 0i64;
        let mut done = 0;
        while done < len {
            // SAFETY: two open fds and valid offset pointers.
            let n = unsafe {
                libc::copy_file_range(
                    f.as_raw_fd(),
                    &mut off_in,
                    out.as_raw_fd(),
                    &mut off_out,
                    len - done,
                    0,
                )
            };
            let refused = std::io::Error::last_os_error().raw_os_error() == Some(libc::EXDEV);
            if n < 0 && refused && done == 0 && !out_path.starts_with(&fx.view) {
                // The kernel copies across filesystems only between two of one kind (FUSE to
                // ext4 is refused, as `cp` finds and falls back): within the mount, then.
                out_path = fx.at(&format!("cfr-out-{i}"));
                out = File::create(&out_path).unwrap();
                continue;
            }
            assert!(
                n >= 0,
                "copy_file_range: {}",
                std::io::Error::last_os_error()
            );
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        drop(out);
        assert_bytes_eq(
            &fs::read(&out_path).unwrap(),
            expect(want, start, len),
            &format!("{what}: copy_file_range {rel} from {start}"),
        );
        fs::remove_file(&out_path).unwrap();
    }
}

/// The proof of concept's mmap-validate: random `pread`s of one stub, then a `MAP_PRIVATE`
/// mapping of another, fresh one (written to: the file must not change).
fn check_mmap_validate(fx: &Fixture, pread_rel: &str, map_rel: &str, what: &str) {
    let want = mmap_pattern();
    let f = File::open(fx.at(pread_rel)).unwrap();
    let mut rng = StdRng::seed_from_u64(26);
    for _ in 0..2000 {
        let off = rng.random_range(0..MIB as u64);
        let len = rng.random_range(1..9000);
        let got = pread_at(&f, off, len);
        assert_eq!(
            got.len(),
            len.min(MIB - off as usize),
            "{what}: short pread"
        );
        for (i, b) in got.iter().enumerate() {
            let pos = off as usize + i;
            assert_eq!(
                *b,
                mmap_byte(pos),
                "{what}: mmap-validate pread: byte {pos} of {pread_rel}"
            );
        }
    }
    assert_bytes_eq(&fs::read(fx.at(pread_rel)).unwrap(), &want, what);

    let f = File::open(fx.at(map_rel)).unwrap();
    let mut map = Map::new(&f, MIB, true);
    for p in shuffled_pages(MIB, &mut rng) {
        let page = &map.bytes()[p * 4096..(p + 1) * 4096];
        assert!(
            page.iter().all(|&b| b == mmap_byte(p * 4096)),
            "{what}: MAP_PRIVATE page {p} of {map_rel} is not all {:?}",
            mmap_byte(p * 4096) as char
        );
    }
    // A private mapping is copy-on-write: writing to it must not reach the file.
    map.bytes_mut()[3 * 4096..4 * 4096].fill(b'#');
    assert!(map.bytes()[3 * 4096..4 * 4096].iter().all(|&b| b == b'#'));
    drop(map);
    assert_bytes_eq(
        &pread_at(&f, 0, MIB),
        &want,
        &format!("{what}: {map_rel} after writing to its private mapping"),
    );
}

#[test]
fn every_kind_of_read_returns_the_source_bytes() {
    if require_root() {
        every_kind_of_read_returns_the_source_bytes_on(FANOTIFY);
    }
}

#[test]
fn every_kind_of_read_returns_the_source_bytes_fuse() {
    if require_root() {
        every_kind_of_read_returns_the_source_bytes_on(FUSE);
    }
}

fn every_kind_of_read_returns_the_source_bytes_on(frontend: &[&str]) {
    for (fs_kind, opts) in CONFIGS {
        let what = format!("{fs_kind} {opts:?}");
        let t = Instant::now();
        let mut fx = Fixture::new(fs_kind, "1G");
        let names = [
            "cat", "read", "pread", "preadv", "mmap", "direct", "sendfile", "cfr",
        ];
        let mut data: HashMap<&str, Vec<u8>> = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            data.insert(n, fx.write_source(n, BIG, 100 + i as u64));
        }
        fs::write(fx.src("mmap-pread"), mmap_pattern()).unwrap();
        fs::write(fx.src("mmap-private"), mmap_pattern()).unwrap();
        fx.populate(opts);
        fx.serve(frontend);

        check_cat(&fx, "cat", &data["cat"], &what);
        check_read(&fx, "read", &data["read"], &what);
        check_pread(&fx, "pread", &data["pread"], &what);
        check_preadv(&fx, "preadv", &data["preadv"], &what);
        check_mmap_shared(&fx, "mmap", &data["mmap"], &what);
        check_direct(&fx, "direct", &data["direct"], &what);
        check_sendfile(&fx, "sendfile", &data["sendfile"], &what);
        check_copy_file_range(&fx, "cfr", &data["cfr"], &what);
        check_mmap_validate(&fx, "mmap-pread", "mmap-private", &what);
        // Whatever path filled them, every file now holds the source bytes, read plainly.
        for n in names {
            assert_bytes_eq(&fs::read(fx.at(n)).unwrap(), &data[n], &what);
        }

        let m = fx.stop();
        assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
        // Every byte was fetched exactly once, whichever syscalls asked for it.
        assert_eq!(
            metric(&m, "fetched_bytes"),
            (names.len() * BIG + 2 * MIB) as u64,
            "{what}: {m}"
        );
        eprintln!("{what}: every kind of read in {:?}", t.elapsed());
    }
}

// ---------------------------------------------------------------------------------------------
// execve
// ---------------------------------------------------------------------------------------------

#[test]
fn stubs_of_elf_binaries_execute() {
    if require_root() {
        stubs_of_elf_binaries_execute_on(FANOTIFY);
    }
}

#[test]
fn stubs_of_elf_binaries_execute_fuse() {
    if require_root() {
        stubs_of_elf_binaries_execute_on(FUSE);
    }
}

fn stubs_of_elf_binaries_execute_on(frontend: &[&str]) {
    let real_version = run(Command::new(HSM).arg("--version")).stdout;
    for fs_kind in FILESYSTEMS {
        let mut fx = Fixture::new(fs_kind, "1G");
        fs::create_dir_all(fx.src("bin")).unwrap();
        let bins = [
            ("bin/hsm", PathBuf::from(HSM)),
            ("bin/true", PathBuf::from("/usr/bin/true")),
            ("bin/ls", PathBuf::from("/bin/ls")),
        ];
        let mut total = 0;
        for (rel, orig) in &bins {
            total += fs::copy(orig, fx.src(rel)).unwrap();
            fs::set_permissions(fx.src(rel), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let hsm_size = fs::metadata(HSM).unwrap().len();
        fx.populate(&[]);
        fx.serve(frontend);

        let out = run(Command::new(fx.at("bin/hsm")).arg("--version"));
        assert_eq!(out.stdout, real_version, "{fs_kind}: stub of hsm --version");
        run(&mut Command::new(fx.at("bin/true")));
        let listed = run(Command::new(fx.at("bin/ls")).arg("-1a").arg(&fx.source)).stdout;
        let want = run(Command::new("/bin/ls").arg("-1a").arg(&fx.source)).stdout;
        assert_eq!(listed, want, "{fs_kind}: ls from a stub");

        // An exec fetches what it maps (the kernel raises one event per mapped segment, filled
        // whole: faults on pages that readahead brought in as stub zeros would raise no event),
        // never the parts no segment covers, such as the symbol tables at the end of the file.
        let m = fx.settled_metrics();
        assert!(
            metric(&m, "fetched_bytes") < total,
            "{fs_kind}: running the binaries fetched them whole ({total} bytes; hsm is \
             {hsm_size}): {m}"
        );

        // And the rest is there when read plainly.
        for (rel, orig) in &bins {
            run(Command::new("cmp").arg(fx.at(rel)).arg(orig));
        }
        let m = fx.stop();
        assert_eq!(metric(&m, "denied"), 0, "{fs_kind}: {m}");
        assert_eq!(metric(&m, "fetched_bytes"), total, "{fs_kind}: {m}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1 GiB
// ---------------------------------------------------------------------------------------------

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The big file's bytes at `[off, off + len)`: word i is `mix(i)`, so any range can be made
/// without the file.
fn big_bytes(off: u64, len: usize) -> Vec<u8> {
    let first = off / 8;
    let last = (off + len as u64).div_ceil(8);
    let mut v = Vec::with_capacity(((last - first) * 8) as usize);
    for w in first..last {
        v.extend_from_slice(&mix(w).to_le_bytes());
    }
    let s = (off - first * 8) as usize;
    v[s..s + len].to_vec()
}

/// A sequential reader, kept ahead of by readahead, is answered by the supervisor from the ranges
/// the worker published: most of its events never reach the worker, every byte is the source's,
/// and a second file read at the same time (another slot, or the same one taken over) too.
#[test]
fn a_sequential_reader_is_answered_from_published_ranges() {
    if !require_root() {
        return;
    }
    const SIZE: usize = 48 * MIB;
    for fs_kind in ["xfs", "btrfs"] {
        let mut fx = Fixture::new(fs_kind, "1G");
        let a = fx.write_source("a", SIZE, 21);
        let b = fx.write_source("b", SIZE, 22);
        fx.populate(&[]);
        fx.serve(&[]);
        let (at_a, at_b) = (fx.at("a"), fx.at("b"));
        let read_all = |path: &std::path::Path| {
            let mut f = File::open(path).unwrap();
            let mut got = Vec::with_capacity(SIZE);
            let mut buf = vec![0u8; 128 * KIB];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        };
        std::thread::scope(|s| {
            let other = s.spawn(|| read_all(&at_b));
            assert_bytes_eq(&read_all(&at_a), &a, &format!("{fs_kind}: a"));
            assert_bytes_eq(&other.join().unwrap(), &b, &format!("{fs_kind}: b"));
        });
        let m = fx.stop();
        let events = metric(&m, "events_pre_access");
        let published = metric(&m, "answered_published");
        // Not one event per read: once readahead has completed a file (8 MiB ahead of its
        // reader), its ignore mark silences the reads that are left.
        assert!(published > 200, "{fs_kind}: {m}");
        assert!(
            published * 2 > events,
            "{fs_kind}: fewer than half the accesses were answered from published ranges: {m}"
        );
        assert_eq!(metric(&m, "denied"), 0, "{fs_kind}: {m}");
        assert_eq!(
            metric(&m, "fetched_bytes"),
            2 * SIZE as u64,
            "{fs_kind}: {m}"
        );
    }
}

/// Write back and drop `path`'s pages from the page cache.
fn evict_from_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain fadvise on an open fd.
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
}

#[test]
fn a_source_on_disk_is_not_cached_twice_and_one_without_direct_io_still_reads() {
    if require_root() {
        a_source_on_disk_is_not_cached_twice_and_one_without_direct_io_still_reads_on(FANOTIFY);
    }
}

#[test]
fn a_source_on_disk_is_not_cached_twice_and_one_without_direct_io_still_reads_fuse() {
    if require_root() {
        a_source_on_disk_is_not_cached_twice_and_one_without_direct_io_still_reads_on(FUSE);
    }
}

fn a_source_on_disk_is_not_cached_twice_and_one_without_direct_io_still_reads_on(
    frontend: &[&str],
) {
    const SIZE: usize = 24 * MIB + 123;
    // The source on the test's disk (ext4 or xfs, direct I/O): what a reader fetches lands in
    // the stub's page cache only, not in the source's as well.
    let mut fx = Fixture::new("xfs", "1G");
    let want = fx.write_source("big", SIZE, 31);
    fx.populate(&[]);
    evict_from_cache(&fx.src("big"));
    assert!(
        resident_pages(&fx.src("big")) < 16,
        "the source was not evicted"
    );
    fx.serve(frontend);
    assert_bytes_eq(
        &fs::read(fx.at("big")).unwrap(),
        &want,
        "read through the view",
    );
    let m = fx.stop();
    assert_eq!(metric(&m, "fetched_bytes"), SIZE as u64, "{m}");
    // Only the unaligned tail (and what a first small read took) goes through the source's cache.
    let resident = resident_pages(&fx.src("big"));
    assert!(
        resident <= 64,
        "{resident} of {} source pages were cached by the fetch",
        SIZE / 4096
    );

    // The source on ramfs, which has no direct I/O: the same reads go through its page cache.
    let mut fx = Fixture::new("xfs", "1G");
    run(Command::new("mount")
        .args(["-t", "ramfs", "hsm-test"])
        .arg(&fx.source));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _ramfs = Unmount(fx.source.clone());
    let want = fx.write_source("big", SIZE, 32);
    let direct = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(fx.src("big"));
    assert_eq!(
        direct.err().and_then(|e| e.raw_os_error()),
        Some(libc::EINVAL),
        "ramfs was expected to refuse O_DIRECT"
    );
    fx.populate(&[]);
    fx.serve(frontend);
    assert_bytes_eq(&fs::read(fx.at("big")).unwrap(), &want, "ramfs source");
    let m = fx.stop();
    assert_eq!(metric(&m, "denied"), 0, "{m}");
}

#[test]
fn a_1gib_file_read_at_random_then_sequentially_on_xfs() {
    if require_root() {
        a_1gib_file_read_at_random_then_sequentially_on_xfs_on(FANOTIFY);
    }
}

#[test]
fn a_1gib_file_read_at_random_then_sequentially_on_xfs_fuse() {
    if require_root() {
        a_1gib_file_read_at_random_then_sequentially_on_xfs_on(FUSE);
    }
}

fn a_1gib_file_read_at_random_then_sequentially_on_xfs_on(frontend: &[&str]) {
    const SIZE: u64 = 1 << 30;
    let mut fx = Fixture::new("xfs", "4G");
    let t = Instant::now();
    {
        let mut f =
            std::io::BufWriter::with_capacity(8 * MIB, File::create(fx.src("big")).unwrap());
        let block = 8 * MIB as u64;
        for off in (0..SIZE).step_by(block as usize) {
            f.write_all(&big_bytes(off, block as usize)).unwrap();
        }
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let made = t.elapsed();
    fx.populate(&[]);
    fx.serve(frontend);

    let t = Instant::now();
    let f = File::open(fx.at("big")).unwrap();
    let mut rng = StdRng::seed_from_u64(1 << 30);
    let mut random_bytes = 0;
    for i in 0..200 {
        let off = if i == 0 {
            SIZE - 3
        } else {
            rng.random_range(0..SIZE)
        };
        let len = rng.random_range(1..256 * KIB);
        let got = pread_at(&f, off, len);
        let n = len.min((SIZE - off) as usize);
        assert_bytes_eq(
            &got,
            &big_bytes(off, n),
            &format!("1 GiB: pread at {off} len {len}"),
        );
        random_bytes += n;
    }
    drop(f);
    let random = t.elapsed();
    let after_random = fx.settled_metrics();
    assert!(
        metric(&after_random, "fetched_bytes") < SIZE / 2,
        "200 random reads fetched the file whole: {after_random}"
    );

    let t = Instant::now();
    run(Command::new("cmp").arg(fx.src("big")).arg(fx.at("big")));
    let sequential = t.elapsed();

    let m = fx.stop();
    assert_eq!(metric(&m, "denied"), 0, "{m}");
    assert_eq!(
        metric(&m, "fetched_bytes"),
        SIZE,
        "each byte fetched once: {m}"
    );
    eprintln!(
        "1 GiB on xfs: source made in {made:?}; 200 random preads ({random_bytes} bytes, {} fetched) \
         in {random:?}; cmp of the whole file in {sequential:?} ({:.0} MB/s); backend_reads {}",
        metric(&after_random, "fetched_bytes"),
        SIZE as f64 / 1e6 / sequential.as_secs_f64(),
        metric(&m, "backend_reads")
    );
}

// ---------------------------------------------------------------------------------------------
// Thousands of small files
// ---------------------------------------------------------------------------------------------

#[test]
fn a_tree_of_3000_small_files_reads_back() {
    if require_root() {
        a_tree_of_3000_small_files_reads_back_on(FANOTIFY);
    }
}

#[test]
fn a_tree_of_3000_small_files_reads_back_fuse() {
    if require_root() {
        a_tree_of_3000_small_files_reads_back_on(FUSE);
    }
}

fn a_tree_of_3000_small_files_reads_back_on(frontend: &[&str]) {
    for fs_kind in FILESYSTEMS {
        let t = Instant::now();
        let mut fx = Fixture::new(fs_kind, "1G");
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..3000usize {
            let rel = format!("d{}/e{}/f{i}", i % 10, (i / 10) % 10);
            let len = if i % 50 == 0 { 0 } else { (i * 7919) % 16384 };
            let data = fx.write_source(&rel, len, i as u64);
            files.push((rel, data));
        }
        let total: usize = files.iter().map(|f| f.1.len()).sum();
        let nonempty = files.iter().filter(|f| !f.1.is_empty()).count() as u64;
        fx.populate(&[]);
        fx.serve(frontend);
        let t_read = Instant::now();
        std::thread::scope(|s| {
            for part in files.chunks(files.len().div_ceil(4)) {
                let fx = &fx;
                s.spawn(move || {
                    for (rel, data) in part {
                        let got = fs::read(fx.at(rel)).unwrap();
                        assert_bytes_eq(&got, data, &format!("{fs_kind}: {rel}"));
                    }
                });
            }
        });
        let read = t_read.elapsed();
        let m = fx.stop();
        assert_eq!(metric(&m, "denied"), 0, "{fs_kind}: {m}");
        assert_eq!(metric(&m, "fetched_bytes"), total as u64, "{fs_kind}: {m}");
        assert_eq!(metric(&m, "files_completed"), nonempty, "{fs_kind}: {m}");
        eprintln!(
            "{fs_kind}: 3000 files ({total} bytes) read in {read:?} ({:.0} files/s); test {:?}",
            3000.0 / read.as_secs_f64(),
            t.elapsed()
        );
    }
}

/// Directory prefetch (issue 7): three cold opens in one directory fetch its other small files in
/// the background, each byte once, and what was fetched reads back as the source; one or two
/// opens fetch only what they read; the per-window budget holds; `--dir-prefetch 0` turns it off.
#[test]
fn a_walk_through_a_directory_is_fetched_ahead_and_a_few_opens_are_not() {
    if !require_root() {
        return;
    }
    for fs_kind in ["ext4", "xfs"] {
        let mut fx = Fixture::new(fs_kind, "512M");
        let mut sizes: HashMap<String, usize> = HashMap::new();
        let mut data: HashMap<String, Vec<u8>> = HashMap::new();
        for dir in ["walk", "few", "budget", "off"] {
            for i in 0..40usize {
                let rel = format!("{dir}/f{i:02}");
                let bytes = fx.write_source(&rel, 3000 + i * 1000, i as u64 + 7);
                sizes.insert(rel.clone(), bytes.len());
                data.insert(rel, bytes);
            }
        }
        // A subdirectory is not walked by its parent's prefetch.
        let sub = fx.write_source("walk/sub/inner", 5000, 99);
        fx.populate(&[]);
        let read = |fx: &Fixture, rel: &str| {
            let got = fs::read(fx.at(rel)).unwrap();
            assert_bytes_eq(&got, &data[rel], &format!("{fs_kind}: {rel}"));
        };
        let sum = |dir: &str| -> u64 {
            (0..40)
                .map(|i| sizes[&format!("{dir}/f{i:02}")] as u64)
                .sum()
        };

        fx.serve(&["--dir-prefetch", "10"]);
        // Two files of a directory: what they hold, nothing more.
        read(&fx, "few/f00");
        read(&fx, "few/f01");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let m = fx.settled_metrics();
        let two = (sizes["few/f00"] + sizes["few/f01"]) as u64;
        assert_eq!(metric(&m, "prefetched_files"), 0, "{fs_kind}: {m}");
        assert_eq!(metric(&m, "fetched_bytes"), two, "{fs_kind}: {m}");
        // A walk with a window of 10: three opens, then the rest of the directory's first 10
        // files (in listing order), nothing more.
        for i in 0..3 {
            read(&fx, &format!("budget/f{i:02}"));
        }
        let window: Vec<String> = fs::read_dir(fx.store.join("tree/budget"))
            .unwrap()
            .map(|e| format!("budget/{}", e.unwrap().file_name().to_string_lossy()))
            .take(10)
            .collect();
        let opened: Vec<String> = (0..3).map(|i| format!("budget/f{i:02}")).collect();
        let ahead: Vec<&String> = window.iter().filter(|r| !opened.contains(r)).collect();
        let want = ahead.len() as u64;
        let m = wait_for_metric(&fx, "prefetched_files", want);
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let m2 = fx.settled_metrics();
        assert_eq!(metric(&m, "prefetched_files"), want, "{fs_kind}: {m}");
        assert_eq!(metric(&m2, "prefetched_files"), want, "{fs_kind}: {m2}");
        let want_bytes: u64 = opened
            .iter()
            .chain(ahead.iter().copied())
            .map(|r| sizes[r] as u64)
            .sum();
        assert_eq!(
            metric(&m2, "fetched_bytes") - two,
            want_bytes,
            "{fs_kind}: a window of 10 fetched other files than the directory's first 10: {m2}"
        );
        // Every file of the directory reads back right, prefetched or not, each byte fetched once.
        for i in 0..40 {
            read(&fx, &format!("budget/f{i:02}"));
        }
        let m = fx.stop();
        assert_eq!(
            metric(&m, "fetched_bytes"),
            two + sum("budget"),
            "{fs_kind}: {m}"
        );
        assert_eq!(metric(&m, "denied"), 0, "{fs_kind}: {m}");

        // The default window covers a directory of 40 files: the walk finds them all present.
        fx.serve(&[]);
        for i in 0..3 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let before = wait_for_metric(&fx, "prefetched_files", 37);
        assert_eq!(
            metric(&before, "prefetched_files"),
            37,
            "{fs_kind}: {before}"
        );
        let reads_before = metric(&before, "backend_reads");
        for i in 0..40 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let after = fx.settled_metrics();
        assert_eq!(
            metric(&after, "backend_reads"),
            reads_before,
            "{fs_kind}: the walk fetched files the prefetch had made present: {after}"
        );
        // Files made complete ahead got their ignore marks then: the walk raised no event.
        assert_eq!(
            metric(&after, "events_open") + metric(&after, "events_pre_access"),
            metric(&before, "events_open") + metric(&before, "events_pre_access"),
            "{fs_kind}: {before} -> {after}"
        );
        let got = fs::read(fx.at("walk/sub/inner")).unwrap();
        assert_bytes_eq(&got, &sub, &format!("{fs_kind}: walk/sub/inner"));
        let m = fx.stop();
        assert_eq!(
            metric(&m, "fetched_bytes"),
            sum("walk") + sub.len() as u64,
            "{fs_kind}: {m}"
        );

        // Hydrated, after a restart with nothing cached (no ignore mark left): three opens, and
        // the directory's other complete files get their marks ahead of the walk.
        fx.fs.remount();
        fx.serve(&[]);
        for i in 0..3 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let before = wait_for_metric(&fx, "ignore_marks", 43);
        assert!(metric(&before, "ignore_marks") >= 43, "{fs_kind}: {before}");
        assert_eq!(metric(&before, "events_open"), 3, "{fs_kind}: {before}");
        // ...and their bytes are read in ahead of it (the remount left none cached).
        let end = Instant::now() + std::time::Duration::from_secs(10);
        let uncached = || -> Vec<String> {
            (3..40)
                .map(|i| format!("walk/f{i:02}"))
                .filter(|rel| {
                    let path = fx.store.join("tree").join(rel);
                    resident_pages(&path) < sizes[rel].div_ceil(4096)
                })
                .collect()
        };
        while !uncached().is_empty() && Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // WILLNEED is advice: on a machine under load the kernel may drop some of it (3 of 37
        // files, once, in a CI run beside other suites). Most of the window must be read in.
        let missing = uncached();
        assert!(
            missing.len() <= 4,
            "{fs_kind}: files of the window not read ahead of the walk: {missing:?}"
        );
        for i in 0..40 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let walked = fx.settled_metrics();
        assert_eq!(
            metric(&walked, "events_open"),
            3,
            "{fs_kind}: the hydrated walk raised events: {walked}"
        );
        // The marks go with their inodes (memory pressure; here `drop_caches`), and the same
        // daemon sees a second walk, within the 30 s in which the directory's windows start
        // nothing after its last one: the marks are placed ahead of it again.
        std::thread::sleep(std::time::Duration::from_millis(2500));
        drop_caches();
        for i in 0..3 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let before = wait_for_metric(&fx, "ignore_marks", metric(&walked, "ignore_marks") + 43);
        assert_eq!(
            metric(&before, "events_open"),
            6,
            "{fs_kind}: drop_caches left the marks of the walk's first files (this checks nothing \
             then): {before}"
        );
        for i in 0..40 {
            read(&fx, &format!("walk/f{i:02}"));
        }
        let m = fx.stop();
        assert_eq!(
            metric(&m, "events_open"),
            6,
            "{fs_kind}: the second hydrated walk raised events: {walked} -> {m}"
        );
        assert_eq!(metric(&m, "fetched_bytes"), 0, "{fs_kind}: {m}");

        // Off.
        fx.serve(&["--dir-prefetch", "0"]);
        for i in 0..5 {
            read(&fx, &format!("off/f{i:02}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let m = fx.stop();
        let five: u64 = (0..5).map(|i| sizes[&format!("off/f{i:02}")] as u64).sum();
        assert_eq!(metric(&m, "prefetched_files"), 0, "{fs_kind}: {m}");
        assert_eq!(metric(&m, "fetched_bytes"), five, "{fs_kind}: {m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Sizes, names, symlinks, modes, owners, times
// ---------------------------------------------------------------------------------------------

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Build the metadata tree in `src`; return every regular file's relative path and bytes.
fn build_meta_tree(src: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut put = |rel: &Path, len: usize| {
        let p = src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data = pattern(len, files.len() as u64 + 1000);
        fs::write(&p, &data).unwrap();
        files.push((rel.to_path_buf(), data));
    };
    for len in [0usize, 1, 4095, 4096, 4097] {
        put(&Path::new("sizes").join(len.to_string()), len);
    }
    let names: [&[u8]; 8] = [
        b"with space",
        b" lead and trail ",
        b"new\nline",
        b"latin1-caf\xe9",
        b"-dash",
        b"back\\slash",
        "unicode-\u{f1}-\u{65e5}\u{672c}".as_bytes(),
        b"tab\there",
    ];
    for n in names {
        put(&Path::new("names").join(os(n)), 5000);
    }
    put(
        &Path::new("names")
            .join(os(b"\xff\xfe-dir"))
            .join(os(b"inner-\x80")),
        4097,
    );
    for (name, mode) in [
        ("0600", 0o600),
        ("0755", 0o755),
        ("0444", 0o444),
        ("0640", 0o640),
    ] {
        let rel = Path::new("modes").join(name);
        put(&rel, 3000);
        fs::set_permissions(src.join(&rel), fs::Permissions::from_mode(mode)).unwrap();
    }
    put(Path::new("modes/setgid-dir/inside"), 100);
    put(Path::new("modes/sticky-dir/inside"), 100);
    put(Path::new("modes/private-dir/inside"), 100);
    put(Path::new("owners/a"), 2000);
    put(Path::new("owners/dir/b"), 2000);
    put(Path::new("hard/a"), 6000);
    fs::hard_link(src.join("hard/a"), src.join("hard/b")).unwrap();

    // Owners first: chown clears set-id bits.
    std::os::unix::fs::lchown(src.join("owners/a"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(src.join("owners/dir"), Some(4321), Some(8765)).unwrap();
    std::os::unix::fs::lchown(src.join("owners/dir/b"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(src.join("modes/setgid-dir"), Some(0), Some(5678)).unwrap();
    for (dir, mode) in [
        ("modes/setgid-dir", 0o2775),
        ("modes/sticky-dir", 0o1777),
        ("modes/private-dir", 0o700),
        ("owners/dir", 0o750),
    ] {
        fs::set_permissions(src.join(dir), fs::Permissions::from_mode(mode)).unwrap();
    }

    fs::create_dir_all(src.join("links")).unwrap();
    symlink("../sizes/4097", src.join("links/rel")).unwrap();
    symlink("../names", src.join("links/dir")).unwrap();
    symlink(src.join("sizes/4096"), src.join("links/abs")).unwrap();
    symlink(
        "/nonexistent/absolute/target",
        src.join("links/abs-dangling"),
    )
    .unwrap();
    symlink("nowhere", src.join("links/dangling")).unwrap();
    symlink(os(b"target-\xfe\n"), src.join(os(b"links/bin\xffary"))).unwrap();
    std::os::unix::fs::lchown(src.join("links/rel"), Some(1111), Some(2222)).unwrap();

    fs::create_dir_all(src.join("special")).unwrap();
    let fifo = cstr(&src.join("special/fifo"));
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    // Times last, with nanoseconds, every entry different; the root included.
    let mut entries = walk(src);
    entries.push(PathBuf::new());
    for (i, rel) in entries.iter().enumerate() {
        let i = i as i64;
        set_times(
            &src.join(rel),
            (1_500_000_000 + i, 111_111_111 + i),
            (1_600_000_000 + 7 * i, 123_456_789 + i),
        );
    }
    files
}

/// Type, mode, owner, mtime (with nanoseconds), size of files, targets of symlinks.
fn assert_same_meta(src: &Path, view: &Path, rel: &Path, what: &str) {
    let s = fs::symlink_metadata(src.join(rel)).unwrap();
    let v = fs::symlink_metadata(view.join(rel))
        .unwrap_or_else(|e| panic!("{what}: {} missing from the view: {e}", rel.display()));
    let r = rel.display();
    assert_eq!(s.file_type(), v.file_type(), "{what}: file type of {r:?}");
    assert_eq!(
        s.mode(),
        v.mode(),
        "{what}: mode of {r:?}: {:o} vs {:o}",
        s.mode(),
        v.mode()
    );
    assert_eq!(
        (s.uid(), s.gid()),
        (v.uid(), v.gid()),
        "{what}: owner of {r:?}"
    );
    assert_eq!(
        (s.mtime(), s.mtime_nsec()),
        (v.mtime(), v.mtime_nsec()),
        "{what}: mtime of {r:?}"
    );
    if s.is_file() {
        assert_eq!(s.len(), v.len(), "{what}: size of {r:?}");
    }
    if s.file_type().is_symlink() {
        assert_eq!(
            fs::read_link(src.join(rel)).unwrap(),
            fs::read_link(view.join(rel)).unwrap(),
            "{what}: target of {r:?}"
        );
    }
}

#[test]
fn sizes_names_symlinks_modes_owners_and_times_are_reproduced() {
    if require_root() {
        sizes_names_symlinks_modes_owners_and_times_are_reproduced_on(FANOTIFY);
    }
}

#[test]
fn sizes_names_symlinks_modes_owners_and_times_are_reproduced_fuse() {
    if require_root() {
        sizes_names_symlinks_modes_owners_and_times_are_reproduced_on(FUSE);
    }
}

fn sizes_names_symlinks_modes_owners_and_times_are_reproduced_on(frontend: &[&str]) {
    for fs_kind in FILESYSTEMS {
        let what = fs_kind;
        let mut fx = Fixture::new(fs_kind, "1G");
        let files = build_meta_tree(&fx.source);
        let out = fx.populate(&[]);
        let report = String::from_utf8_lossy(&out.stderr);
        assert_says(
            &report,
            &["special/fifo", "1 hard links"],
            &format!("{what}: populate's report"),
        );
        fx.serve(frontend);

        // The same entries, minus the FIFO (not reproduced, reported above).
        let src_entries: BTreeSet<PathBuf> = walk(&fx.source)
            .into_iter()
            .filter(|p| p != Path::new("special/fifo"))
            .collect();
        let view_entries: BTreeSet<PathBuf> = walk(&fx.view).into_iter().collect();
        assert_eq!(src_entries, view_entries, "{what}: entries of the view");

        // atime of files before anything reads them (reading may move it).
        for (rel, _) in &files {
            let s = fs::metadata(fx.source.join(rel)).unwrap();
            let v = fs::metadata(fx.view.join(rel)).unwrap();
            assert_eq!(
                (s.atime(), s.atime_nsec()),
                (v.atime(), v.atime_nsec()),
                "{what}: atime of {rel:?}"
            );
        }
        assert_same_meta(&fx.source, &fx.view, Path::new(""), what);
        for rel in &src_entries {
            assert_same_meta(&fx.source, &fx.view, rel, what);
        }

        let a = fs::metadata(fx.at("hard/a")).unwrap();
        let b = fs::metadata(fx.at("hard/b")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "{what}: hard links");

        for (rel, data) in &files {
            assert_bytes_eq(
                &fs::read(fx.view.join(rel)).unwrap(),
                data,
                &format!("{what}: {rel:?}"),
            );
        }
        assert_bytes_eq(
            &fs::read(fx.at("hard/b")).unwrap(),
            &fs::read(fx.src("hard/a")).unwrap(),
            "hard/b",
        );
        assert_bytes_eq(
            &fs::read(fx.at("links/rel")).unwrap(),
            &fs::read(fx.src("sizes/4097")).unwrap(),
            &format!("{what}: through a relative symlink"),
        );
        assert_bytes_eq(
            &fs::read(fx.at("links/dir/with space")).unwrap(),
            &fs::read(fx.src("names/with space")).unwrap(),
            &format!("{what}: through a symlink to a directory"),
        );

        // Filled files keep the source's mtime, mode and owner.
        for (rel, _) in &files {
            assert_same_meta(&fx.source, &fx.view, rel, &format!("{what}, after reading"));
        }
        let m = fx.stop();
        assert_eq!(metric(&m, "denied"), 0, "{what}: {m}");
    }
}

#[test]
fn set_id_files_keep_their_mode_after_being_filled() {
    if require_root() {
        set_id_files_keep_their_mode_after_being_filled_on(FANOTIFY);
    }
}

#[test]
fn set_id_files_keep_their_mode_after_being_filled_fuse() {
    if require_root() {
        set_id_files_keep_their_mode_after_being_filled_on(FUSE);
    }
}

fn set_id_files_keep_their_mode_after_being_filled_on(frontend: &[&str]) {
    for fs_kind in FILESYSTEMS {
        let mut fx = Fixture::new(fs_kind, "1G");
        let mut files = Vec::new();
        for (name, mode) in [("setuid", 0o4755), ("setgid", 0o2755), ("both", 0o6711)] {
            let data = fx.write_source(name, 9000, mode as u64);
            std::os::unix::fs::lchown(fx.src(name), Some(1234), Some(5678)).unwrap();
            fs::set_permissions(fx.src(name), fs::Permissions::from_mode(mode)).unwrap();
            files.push((name, mode, data));
        }
        // Big enough to be a cloned stub on xfs/btrfs.
        let data = fx.write_source("big-setuid", BIG, 9);
        fs::set_permissions(fx.src("big-setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
        files.push(("big-setuid", 0o4755, data));
        fx.populate(&[]);
        fx.serve(frontend);
        for (name, mode, data) in &files {
            let before = fs::metadata(fx.at(name)).unwrap().mode() & 0o7777;
            assert_eq!(before, *mode, "{fs_kind}: {name} as populated");
            assert_bytes_eq(&fs::read(fx.at(name)).unwrap(), data, name);
            let after = fs::metadata(fx.at(name)).unwrap().mode() & 0o7777;
            assert_eq!(
                after, *mode,
                "{fs_kind}: {name} lost its mode when filled: {after:o}, source {mode:o}"
            );
        }
        fx.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Restart
// ---------------------------------------------------------------------------------------------

#[test]
fn a_restarted_daemon_fetches_only_what_was_missing() {
    if require_root() {
        a_restarted_daemon_fetches_only_what_was_missing_on(FANOTIFY);
    }
}

#[test]
fn a_restarted_daemon_fetches_only_what_was_missing_fuse() {
    if require_root() {
        a_restarted_daemon_fetches_only_what_was_missing_on(FUSE);
    }
}

fn a_restarted_daemon_fetches_only_what_was_missing_on(frontend: &[&str]) {
    for (fs_kind, opts) in CONFIGS {
        let what = format!("{fs_kind} {opts:?}");
        let mut fx = Fixture::new(fs_kind, "1G");
        const SIZE: usize = 40 * MIB + 4097;
        let chunk = MIB as u64;
        let big = fx.write_source("big", SIZE, 7);
        let smalls: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| {
                let rel = format!("small/{i}");
                let d = fx.write_source(&rel, 50_000 + i * 13, 50 + i as u64);
                (rel, d)
            })
            .collect();
        let small_total: usize = smalls.iter().map(|s| s.1.len()).sum();
        let total = (SIZE + small_total) as u64;
        fx.populate(opts);

        // Run 1: part of the big file, half of the small ones (and only those: no directory
        // prefetch, which would fetch the other half ahead of a walk).
        fx.serve(&[&["--dir-prefetch", "0"][..], frontend].concat());
        {
            let f = File::open(fx.at("big")).unwrap();
            for off in (0..3 * MIB as u64).step_by(64 * KIB) {
                assert_bytes_eq(
                    &pread_at(&f, off, 64 * KIB),
                    expect(&big, off, 64 * KIB),
                    &what,
                );
            }
            for (off, len) in [(20 * MIB as u64 + 5, 10), (SIZE as u64 - 100, 100)] {
                assert_bytes_eq(&pread_at(&f, off, len), expect(&big, off, len), &what);
            }
        }
        for (rel, d) in &smalls[..10] {
            assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), d, &what);
        }
        let m1 = fx.stop();
        let f1 = metric(&m1, "fetched_bytes");
        assert_eq!(metric(&m1, "denied"), 0, "{what}: {m1}");
        assert!(
            f1 > 0 && f1 < total,
            "{what}: run 1 fetched {f1} of {total}"
        );

        // The records are on disk: a fresh mount (no page cache) and a new daemon.
        fx.fs.remount();
        fx.serve(frontend);
        assert_bytes_eq(&fs::read(fx.at("big")).unwrap(), &big, &what);
        for (rel, d) in &smalls {
            assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), d, &what);
        }
        let m2 = fx.stop();
        assert_eq!(metric(&m2, "denied"), 0, "{what}: {m2}");
        assert_eq!(
            metric(&m2, "fetched_bytes"),
            total - f1,
            "{what}: run 2 fetched more than run 1 left missing; run 1 {m1}, run 2 {m2}"
        );
        // Only missing chunks were read: each missing whole chunk of the big file at most once,
        // each remaining small file once.
        let small_missing: u64 = smalls[10..].iter().map(|s| s.1.len() as u64).sum();
        let big_missing = total - f1 - small_missing;
        let bound = big_missing.div_ceil(chunk) + 10;
        let reads = metric(&m2, "backend_reads");
        assert!(
            (10..=bound).contains(&reads),
            "{what}: run 2 made {reads} backend reads for {big_missing} missing bytes of the big \
             file and 10 small files (at most {bound}): {m2}"
        );
        eprintln!(
            "{what}: run 1 fetched {f1} bytes; run 2 fetched {} in {reads} backend reads",
            total - f1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Complete files cost no events
// ---------------------------------------------------------------------------------------------

/// Read both files every way that raises events on a stub.
fn reread(fx: &Fixture, files: &[(&str, &Vec<u8>)], what: &str) {
    for (rel, data) in files {
        check_cat(fx, rel, data, what);
        let f = File::open(fx.at(rel)).unwrap();
        for off in [0u64, 4097, data.len() as u64 / 2, data.len() as u64 - 1] {
            assert_bytes_eq(&pread_at(&f, off, 5000), expect(data, off, 5000), what);
        }
        let map = Map::new(&f, data.len(), false);
        assert_bytes_eq(map.bytes(), data, what);
    }
}

/// Held (shared) by tests that count on the ignore marks they placed staying: `drop_caches`
/// evicts every inode, and its marks, of every test running beside it.
static MARKS_KEPT: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn drop_caches() {
    let _alone = MARKS_KEPT.write().unwrap_or_else(|p| p.into_inner());
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

#[test]
fn complete_files_raise_no_more_events() {
    if !require_root() {
        return;
    }
    let _marks = MARKS_KEPT.read().unwrap_or_else(|p| p.into_inner());
    const EVENTS: [&str; 2] = ["events_pre_access", "events_open"];
    for fs_kind in FILESYSTEMS {
        let mut fx = Fixture::new(fs_kind, "1G");
        let small = fx.write_source("small", 100_000, 1);
        let big = fx.write_source("big", BIG, 2);
        let files = [("small", &small), ("big", &big)];
        let total = (small.len() + big.len()) as u64;
        fx.populate(&[]);
        fx.serve(&[]);
        for (rel, data) in &files {
            assert_bytes_eq(&fs::read(fx.at(rel)).unwrap(), data, fs_kind);
        }
        let a = fx.settled_metrics();
        assert_eq!(metric(&a, "files_completed"), 2, "{fs_kind}: {a}");
        assert_eq!(metric(&a, "fetched_bytes"), total, "{fs_kind}: {a}");
        assert!(metric(&a, "ignore_marks") >= 2, "{fs_kind}: {a}");
        assert!(metric(&a, "events_pre_access") + metric(&a, "events_open") > 0);

        reread(&fx, &files, fs_kind);
        let b = fx.settled_metrics();
        for k in EVENTS.iter().chain(&["fetched_bytes", "backend_reads"]) {
            assert_eq!(
                metric(&a, k),
                metric(&b, k),
                "{fs_kind}: reading complete files changed {k}: before {a}, after {b}"
            );
        }
        let c = fx.stop();
        for k in EVENTS {
            assert_eq!(metric(&b, k), metric(&c, k), "{fs_kind}: {k} at stop: {c}");
        }

        // The guard holds the group, and with it the ignore marks, across a restart: a new
        // daemon sees no event for complete files.
        fx.serve(&[]);
        reread(&fx, &files, fs_kind);
        let r = fx.stop();
        for k in EVENTS {
            assert_eq!(metric(&r, k), 0, "{fs_kind}: {k} after a restart: {r}");
        }

        // After a remount no mark is left (as when the kernel evicts one): the first access
        // finds the file complete and marks it again, fetching nothing.
        stop_guard(&fx.store);
        fx.fs.remount_retrying();
        fx.serve(&[]);
        reread(&fx, &files, fs_kind);
        let d = fx.settled_metrics();
        assert!(metric(&d, "ignore_marks") >= 2, "{fs_kind}: {d}");
        reread(&fx, &files, fs_kind);
        let e = fx.settled_metrics();
        for k in EVENTS {
            assert_eq!(
                metric(&d, k),
                metric(&e, k),
                "{fs_kind}: {k} after re-marking: {d} then {e}"
            );
        }
        let f = fx.stop();
        assert_eq!(metric(&f, "fetched_bytes"), 0, "{fs_kind}: {f}");
        assert_eq!(metric(&f, "backend_reads"), 0, "{fs_kind}: {f}");
        assert_eq!(metric(&f, "denied"), 0, "{fs_kind}: {f}");
    }
}

// ---------------------------------------------------------------------------------------------
// Stopping removes the exposure
// ---------------------------------------------------------------------------------------------

#[test]
fn after_a_stop_no_path_under_mountpoint_leads_to_stubs() {
    if require_root() {
        after_a_stop_no_path_under_mountpoint_leads_to_stubs_on(FANOTIFY);
    }
}

#[test]
fn after_a_stop_no_path_under_mountpoint_leads_to_stubs_fuse() {
    if require_root() {
        after_a_stop_no_path_under_mountpoint_leads_to_stubs_on(FUSE);
    }
}

fn after_a_stop_no_path_under_mountpoint_leads_to_stubs_on(frontend: &[&str]) {
    for (i, fs_kind) in FILESYSTEMS.iter().enumerate() {
        let mut fx = Fixture::new(fs_kind, "1G");
        fx.write_source("never-read", 100_000, 1);
        let partial = fx.write_source("dir/partial", 10 * MIB, 2);
        let complete = fx.write_source("complete", 5000, 3);
        fx.write_source("dir/sub/deep", 3000, 4);
        fx.write_source("empty", 0, 5);
        symlink("complete", fx.src("link")).unwrap();
        fx.populate(&[]);
        fx.serve(frontend);
        assert!(is_mounted(&fx.view), "{fs_kind}: serving but not mounted");
        assert_bytes_eq(&fs::read(fx.at("complete")).unwrap(), &complete, fs_kind);
        let f = File::open(fx.at("dir/partial")).unwrap();
        assert_bytes_eq(&pread_at(&f, 0, 10), &partial[..10], fs_kind);
        drop(f);

        // SIGINT once, SIGTERM otherwise: both stop it the same way.
        let sig = if i == 0 { libc::SIGINT } else { libc::SIGTERM };
        let (status, log) = fx.daemon.as_mut().unwrap().stop_with(sig);
        fx.daemon = None;
        let status = status.unwrap_or_else(|| panic!("{fs_kind}: did not exit: {log}"));
        assert!(
            status.success(),
            "{fs_kind}: exit {status} after signal {sig}: {log}"
        );

        let under_view = hsm::sys::mount::mount_points()
            .unwrap()
            .iter()
            .any(|mp| mp.starts_with(&fx.view));
        assert!(
            !under_view,
            "{fs_kind}: a mount is left at or under MOUNTPOINT"
        );
        if fx.view.exists() {
            assert_eq!(
                fs::read_dir(&fx.view).unwrap().count(),
                0,
                "{fs_kind}: MOUNTPOINT still shows entries"
            );
        }
        for rel in walk(&fx.source) {
            let p = fx.view.join(&rel);
            let e = fs::symlink_metadata(&p).expect_err(&format!(
                "{fs_kind}: {} still reachable after stop",
                p.display()
            ));
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{fs_kind}: {rel:?}");
            assert!(File::open(&p).is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn refusals_say_what_is_wrong() {
    if require_root() {
        refusals_say_what_is_wrong_on(FANOTIFY);
    }
}

#[test]
fn refusals_say_what_is_wrong_fuse() {
    if require_root() {
        refusals_say_what_is_wrong_on(FUSE);
    }
}

fn refusals_say_what_is_wrong_on(frontend: &[&str]) {
    // A kernel without pre-content events cannot be produced on this machine (6.14+): not tested.
    let fx = Fixture::new("ext4", "256M");
    fx.write_source("f", 5000, 1);
    fx.populate(&[]);

    // `serve` without CAP_SYS_ADMIN: as an unprivileged user (from a copy of the binary any user
    // can run), and as root with CAP_SYS_ADMIN dropped.
    let bin = fx.scratch.path.join("hsm-copy");
    fs::copy(HSM, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&fx.scratch.path, fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = refused(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&bin)
            .arg("serve")
            .arg(&fx.store)
            .arg(&fx.view)
            .args(frontend),
        Some(&fx.view),
    );
    assert_says(&as_nobody, &["CAP_SYS_ADMIN"], "serve as uid 65534");
    let no_cap = refused(
        Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-sys_admin", "--"])
            .arg(HSM)
            .arg("serve")
            .arg(&fx.store)
            .arg(&fx.view)
            .args(frontend),
        Some(&fx.view),
    );
    assert_says(
        &no_cap,
        &["CAP_SYS_ADMIN"],
        "serve as root without CAP_SYS_ADMIN",
    );

    // `serve` of a directory that is not a store.
    let not_store = fx.fs.mnt.join("not-a-store");
    fs::create_dir_all(&not_store).unwrap();
    let msg = refused(
        Command::new(HSM)
            .arg("serve")
            .arg(&not_store)
            .arg(&fx.view)
            .args(frontend),
        Some(&fx.view),
    );
    assert_says(
        &msg,
        &["not an hsm store", "hsm populate"],
        "serve of a non-store",
    );

    // `populate` from a source that does not exist.
    let missing = fx.scratch.path.join("no-such-source");
    let msg = refused(
        Command::new(HSM)
            .arg("populate")
            .arg(&missing)
            .arg(fx.fs.mnt.join("store2")),
        None,
    );
    assert_says(
        &msg,
        &["no-such-source", "does not exist"],
        "populate of a missing source",
    );
    let msg = refused(
        Command::new(HSM)
            .arg("populate")
            .arg(format!("file://{}", missing.display()))
            .arg(fx.fs.mnt.join("store3")),
        None,
    );
    assert_says(
        &msg,
        &["no-such-source", "does not exist"],
        "populate of a missing file:// source",
    );

    // `populate` into a STORE that is not empty and not a store: nothing in it is touched.
    let full = fx.fs.mnt.join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("precious"), b"mine").unwrap();
    let msg = refused(
        Command::new(HSM).arg("populate").arg(&fx.source).arg(&full),
        None,
    );
    assert_says(
        &msg,
        &["not empty", "not an hsm store"],
        "populate into a non-empty directory",
    );
    assert_eq!(fs::read(full.join("precious")).unwrap(), b"mine");
    assert_eq!(
        fs::read_dir(&full).unwrap().count(),
        1,
        "populate wrote into it"
    );

    // `populate` over a file in the store's tree that is not one of its stubs.
    fx.write_source("g", 100, 2);
    fs::write(fx.stub("g"), b"not a stub").unwrap();
    let msg = refused(
        Command::new(HSM)
            .arg("populate")
            .arg(&fx.source)
            .arg(&fx.store),
        None,
    );
    assert_says(
        &msg,
        &["g", "not an hsm stub"],
        "populate over a foreign file",
    );
    assert_eq!(fs::read(fx.stub("g")).unwrap(), b"not a stub");

    // `populate` with STORE inside SOURCE.
    let msg = refused(
        Command::new(HSM)
            .arg("populate")
            .arg(&fx.source)
            .arg(fx.source.join("store")),
        None,
    );
    assert_says(&msg, &["inside"], "populate with STORE inside SOURCE");

    // STORE on tmpfs: `populate` refuses it; and a store on tmpfs (made by hand, as if copied
    // there) is refused by `serve`, which cannot mark it.
    let tmpfs = Tmpfs::new(fx.scratch.path.join("tmpfs"));
    let msg = refused(
        Command::new(HSM)
            .arg("populate")
            .arg(&fx.source)
            .arg(tmpfs.0.join("store")),
        None,
    );
    assert_says(
        &msg,
        &["tmpfs", "ext4, xfs or btrfs"],
        "populate onto tmpfs",
    );
    let store = tmpfs.0.join("handmade");
    fs::create_dir_all(store.join("tree")).unwrap();
    fs::create_dir_all(store.join(".hsm")).unwrap();
    fs::set_permissions(&store, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        store.join(".hsm/config.json"),
        serde_json::json!({
            "version": 1,
            "source": format!("file://{}", fx.source.display()),
            "fs": "tmpfs",
            "chunk_size": 1048576,
            "whole_below": 4194304,
            "lazy_sparse": false,
        })
        .to_string(),
    )
    .unwrap();
    let view = fx.scratch.path.join("tmpfs-view");
    let msg = refused(
        Command::new(HSM)
            .arg("serve")
            .arg(&store)
            .arg(&view)
            .args(frontend),
        Some(&view),
    );
    // FUSE needs no pre-content events, but a store's stubs still need what those three give.
    let why: &[&str] = if frontend == FUSE {
        &["tmpfs", "ext4, xfs or btrfs"]
    } else {
        &["does not support pre-content events", "ext4, xfs or btrfs"]
    };
    assert_says(&msg, why, "serve of a store on tmpfs");
    drop(tmpfs);
}
