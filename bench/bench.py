#!/usr/bin/python3
"""The hsm benchmark suite (issue 7). Started by bench/run; see bench/README.md.

Every figure of a row is measured in the same run, on the same two loop-mounted filesystems:

  SRCFS   (xfs image)  the source trees: what hsm and rclone fetch from;
  BENCHFS (xfs image, reflink) the native copies, the hsm stores, rclone's cache and the mount
                       points of both.

Columns: native (the tree as plain files on BENCHFS), hsm cold (a fresh stub store, nothing
present), hsm hydrated (every byte present, daemon restarted), the same two served by the FUSE
front end (`hsm serve --frontend fuse`), rclone cold (`rclone mount --vfs-cache-mode full`, cache
emptied), rclone warm (its cache full, rclone restarted). The page
cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every measured run of every
column. Figures are medians of --runs runs.
"""

import argparse
import glob
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------
# configuration


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


def parse_args():
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="hsm against native files and rclone mount, same run, medians.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run: a couple of minutes")
    p.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    p.add_argument(
        "--only",
        help="comma-separated workloads: seq,rand,tar,grep,exec,build,populate (default all)",
    )
    p.add_argument("--no-rclone", action="store_true", help="skip the rclone columns")
    p.add_argument("--no-http", action="store_true", help="skip the hsm-over-HTTP (nginx) column")
    p.add_argument("--no-fuse", action="store_true", help="skip the FUSE front end's columns")
    p.add_argument("--no-build", action="store_true", help="use the existing release binary")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the work dir's logs")
    p.add_argument(
        "--profile",
        choices=["none", "strace", "perf"],
        default="none",
        help="also profile the worker during one extra hsm cold run of each workload",
    )
    a = p.parse_args()
    q = a.quick
    cfg = argparse.Namespace(
        runs=a.runs or env_int("BENCH_RUNS", 1 if q else 3),
        big_mb=env_int("BENCH_BIG_MB", 128 if q else 1024),
        rand_reads=env_int("BENCH_RAND_READS", 500 if q else 2000),
        rand_seed=env_int("BENCH_RAND_SEED", 42),
        small_files=env_int("BENCH_SMALL_FILES", 2000 if q else 12000),
        build_files=env_int("BENCH_BUILD_FILES", 40 if q else 300),
        pop_files=env_int("BENCH_POP_FILES", 10000 if q else 100000),
        timeout=env_int("BENCH_TIMEOUT", 900),
        quiet_wait=env_int("BENCH_QUIET_WAIT", 3),
        nofile=env_int("BENCH_NOFILE", 1048576),
        workdir_parent=os.environ.get("BENCH_DIR", "/var/tmp"),
        hsm=os.environ.get("HSM_BIN")
        or os.path.join(
            os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "hsm"
        ),
        populate_args=os.environ.get("HSM_POPULATE_ARGS", "").split(),
        serve_args=os.environ.get("HSM_SERVE_ARGS", "").split(),
        rclone=not a.no_rclone and os.environ.get("BENCH_RCLONE", "1") != "0",
        http=not a.no_http,
        fuse=not a.no_fuse,
        only=(a.only.split(",") if a.only else None),
        json=a.json,
        keep_logs=a.keep_logs,
        profile=a.profile,
        quick=q,
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# cleanup: every resource registers its undo; run in reverse order on any exit


class Cleanup:
    def __init__(self):
        self.steps = []

    def push(self, what, fn):
        self.steps.append((what, fn))
        return len(self.steps) - 1

    def pop(self, idx):
        """Run one step now (and forget it)."""
        what, fn = self.steps[idx]
        self.steps[idx] = (what, None)
        if fn:
            fn()

    def mark(self):
        return len(self.steps)

    def unwind_to(self, mark):
        """Undo everything registered since `mark` (a workload that failed half-way)."""
        while len(self.steps) > mark:
            what, fn = self.steps.pop()
            if fn is None:
                continue
            try:
                fn()
            except Exception as e:
                print(f"cleanup: {what}: {e}", file=sys.stderr)

    def run_all(self):
        while self.steps:
            what, fn = self.steps.pop()
            if fn is None:
                continue
            try:
                fn()
            except Exception as e:  # keep cleaning
                print(f"cleanup: {what}: {e}", file=sys.stderr)


CLEANUP = Cleanup()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sh(cmd, check=True, quiet=False, **kw):
    """Run a command (list), return CompletedProcess with text output."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}"
        )
    return r


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def is_mount(path):
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def umount_all(path):
    for _ in range(4):
        if not is_mount(path):
            return
        sh(["umount", "-l", path], check=False)


def pid_alive(pid, needle=None):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    if not cmd:  # zombie
        return False
    return needle is None or needle.encode() in cmd


def kill_pid(pid, needle, sig=signal.SIGKILL):
    """Kill one process by pid, only if it is still the process we started."""
    if pid and pid_alive(pid, needle):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reports_free_pages():
    """Whether this machine is a VM that hands freed memory back to its host (virtio-balloon free
    page reporting, feature bit 5): its memory, once freed, costs a fault through the host at the
    next touch."""
    for path in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"):
        try:
            with open(path) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


# Seconds to wait after dropping the page cache where freed memory goes back to the host. The
# host takes it within a second: a cold 1 GiB read started at once after the drop ran 0.41-0.56 s
# here, one started 1-8 s after it 1.31-1.79 s, paying a fault per page. A measurement that
# starts at once runs in that window only if it is short, so the faster column got the cheaper
# memory; after the wait every column pays for its fresh pages alike.
MEMORY_SETTLE = 2.0 if reports_free_pages() else 0.0


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(MEMORY_SETTLE)


def io_stall_us():
    """Total microseconds some task stalled on I/O (PSI), or None without PSI."""
    try:
        with open("/proc/pressure/io") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.split("total=")[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def wait_quiet(max_wait):
    """Wait (at most max_wait s) for a 0.25 s window in which tasks stalled on I/O < 10% of it:
    the machine may be shared, and other users' I/O lands on the same disk."""
    end = time.time() + max_wait
    while True:
        a = io_stall_us()
        if a is None:
            return True
        time.sleep(0.25)
        b = io_stall_us()
        if b - a < 25000:
            return True
        if time.time() >= end:
            return False


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# loop filesystems


def make_loop_fs(work, name, size_gb, mkfs):
    img = os.path.join(work, f"{name}.img")
    mnt = os.path.join(work, name)
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    CLEANUP.push(f"remove {img}", lambda: os.path.exists(img) and os.unlink(img))
    dev = sh(["losetup", "--direct-io=on", "--find", "--show", img]).stdout.strip()
    CLEANUP.push(f"detach {dev}", lambda: sh(["losetup", "-d", dev], check=False))
    sh(mkfs + [dev])
    sh(["mount", dev, mnt])
    CLEANUP.push(f"unmount {mnt}", lambda: umount_all(mnt))
    return mnt, dev


# ---------------------------------------------------------------------------------------------
# data sets

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu storage "
    "chunk stub fetch kernel event range record source store mount file tree daemon worker"
).split()
NEEDLE = "needle_hsm_bench"


def gen_text(rng, nbytes):
    out = []
    n = 0
    while n < nbytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out)


def gen_small_tree(root, nfiles, seed=7):
    """nfiles text files of 512 B .. 16 KiB (mean ~6 KiB) in directories of 100; 1% hold NEEDLE."""
    rng = random.Random(seed)
    blob = gen_text(rng, 1 << 20)
    matches = 0
    for i in range(nfiles):
        d = os.path.join(root, f"d{i // 1000:03d}", f"s{(i // 100) % 10}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        size = int(min(16384, max(512, rng.expovariate(1 / 6000))))
        off = rng.randrange(0, len(blob) - size)
        body = blob[off : off + size]
        if i % 100 == 37:
            body = body[: size // 2] + f" {NEEDLE} " + body[size // 2 :]
            matches += 1
        with open(os.path.join(d, f"f{i:06d}.txt"), "w") as f:
            f.write(body)
    return matches


def gen_pop_tree(root, nfiles):
    """nfiles tiny files (0..200 bytes) in directories of 1000 (two levels)."""
    payload = b"x" * 200
    for i in range(nfiles):
        d = os.path.join(root, f"p{i // 10000:02d}", f"q{(i // 1000) % 10}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:07d}"), "wb") as f:
            f.write(payload[: i % 201])


C_HEADER = """\
#ifndef H{n}_H
#define H{n}_H
#include "common.h"
struct rec{n} {{ int a, b, c; double w[8]; unsigned char tag[16]; }};
static inline int h{n}_mix(int x, int y) {{
    for (int i = 0; i < 7; i++) {{ x = (x * 31 + y) ^ (x >> 3); y += x & 0xff; }}
    return x ^ y;
}}
static inline double h{n}_norm(const struct rec{n} *r) {{
    double s = 0; for (int i = 0; i < 8; i++) s += r->w[i] * r->w[i]; return s + r->a;
}}
int h{n}_extern(int);
#endif
"""

C_COMMON = """\
#ifndef COMMON_H
#define COMMON_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <math.h>
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
typedef struct {{ uint64_t s; }} rng_t;
static inline uint64_t rng_next(rng_t *r) {{ r->s ^= r->s << 13; r->s ^= r->s >> 7; r->s ^= r->s << 17; return r->s; }}
#endif
"""


def gen_c_module(rng, i, nheaders, nfuncs=6):
    hs = rng.sample(range(nheaders), 3)
    out = ['#include "common.h"'] + [f'#include "h{h:02d}.h"' for h in hs]
    for j in range(nfuncs):
        h = hs[j % 3]
        k1, k2, k3 = rng.randint(3, 97), rng.randint(3, 97), rng.randint(2, 9)
        out.append(
            f"""
static int m{i}_f{j}(int *v, int n, struct rec{h:02d} *r) {{
    int acc = {k1};
    for (int x = 0; x < n; x++) {{
        switch ((v[x] + x) % {k3}) {{
        case 0: acc += h{h:02d}_mix(v[x], acc) * {k2}; break;
        case 1: acc ^= v[x] << (x % 7); r->a += acc; break;
        case 2: acc -= (int)(r->w[x % 8] * {k1}); break;
        default: acc = acc * {k2} + (int)h{h:02d}_norm(r); break;
        }}
        if (acc > {k1 * 1000}) {{ acc /= {k3}; r->tag[x % 16] = (unsigned char)acc; }}
    }}
    for (int x = 0; x < 16; x++) acc += r->tag[x] * (x + {k3});
    return acc;
}}"""
        )
    calls = " + ".join(f"m{i}_f{j}(v, n, &r{hs[j % 3]:02d})" for j in range(nfuncs))
    decls = "".join(f" struct rec{h:02d} r{h:02d}; memset(&r{h:02d}, 0, sizeof r{h:02d});" for h in hs)
    out.append(f"\nint m{i}_entry(int *v, int n) {{{decls}\n    return {calls};\n}}\n")
    return "\n".join(out)


MAKEFILE = """\
# Generated by bench/bench.py: an out-of-tree build (objects in $(OUT)).
OUT ?= out
CC ?= cc
CFLAGS ?= -O2 -Iinclude
SRCS := $(sort $(wildcard src/*.c))
OBJS := $(patsubst src/%.c,$(OUT)/%.o,$(SRCS))

$(OUT)/app: $(OBJS)
\t$(CC) -o $@ $^ -lm

$(OUT)/%.o: src/%.c | $(OUT)
\t$(CC) $(CFLAGS) -c -o $@ $<

$(OUT):
\tmkdir -p $@
"""


def gen_build_tree(root, nfiles, seed=11):
    rng = random.Random(seed)
    nheaders = max(4, nfiles // 10)
    os.makedirs(os.path.join(root, "src"))
    os.makedirs(os.path.join(root, "include"))
    with open(os.path.join(root, "include", "common.h"), "w") as f:
        f.write(C_COMMON.format())
    for h in range(nheaders):
        with open(os.path.join(root, "include", f"h{h:02d}.h"), "w") as f:
            f.write(C_HEADER.format(n=f"{h:02d}"))
    for i in range(nfiles):
        with open(os.path.join(root, "src", f"m{i:04d}.c"), "w") as f:
            f.write(gen_c_module(rng, i, nheaders))
    entries = "".join(f"int m{i}_entry(int *, int);\n" for i in range(nfiles))
    body = "".join(f"    s += m{i}_entry(v, n);\n" for i in range(nfiles))
    with open(os.path.join(root, "src", "main.c"), "w") as f:
        f.write(
            '#include "common.h"\n'
            + entries
            + "int main(void) { int v[64]; int n = 64; long s = 0;\n"
            + "    for (int i = 0; i < n; i++) v[i] = i * 7;\n"
            + body
            + '    printf("%ld\\n", s); return 0; }\n'
        )
    hdrs = "".join(f"int h{h:02d}_extern(int x) {{ return x + {h}; }}\n" for h in range(nheaders))
    with open(os.path.join(root, "src", "hext.c"), "w") as f:
        f.write("".join(f'#include "h{h:02d}.h"\n' for h in range(nheaders)) + hdrs)
    with open(os.path.join(root, "Makefile"), "w") as f:
        f.write(MAKEFILE)


def tree_files(root):
    n = 0
    for _, _, files in os.walk(root):
        n += len(files)
    return n


# ---------------------------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, cfg):
        self.cfg = cfg
        self.results = {}  # workload -> column -> list of seconds
        self.checks = {}  # workload -> column -> set of check values
        self.hwm = {}  # workload -> column -> (sup KiB, worker KiB) max
        self.counters = {}  # workload -> metrics.json of the last hsm cold run
        self.populates = []  # dicts
        self.notes = []
        self.rclone_reason = None
        self.http_reason = None  # why there is no "hsm cold http" column
        self.fuse_reason = None  # why there are no "hsm fuse" columns
        self.http_base = None
        self.fds = {}  # workload -> open fds of the worker at the end of a cold run (max)
        self.failed = {}  # workload -> error
        self.noise = []  # per measurement: did it start in a quiet window (others' I/O)?

    # ---- setup -------------------------------------------------------------------------------

    def setup(self):
        cfg = self.cfg
        self.work = tempfile.mkdtemp(prefix="hsm-bench.", dir=cfg.workdir_parent)
        CLEANUP.push(f"remove {self.work}", lambda: shutil.rmtree(self.work, ignore_errors=True))
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        src_gb = (cfg.big_mb >> 10) + 4 + cfg.pop_files // 50000
        bench_gb = 4 * (cfg.big_mb >> 10) + 12
        log(f"work dir {self.work}: source fs {src_gb} GiB, bench fs {bench_gb} GiB (sparse images)")
        self.srcfs, _ = make_loop_fs(self.work, "srcfs", src_gb, ["mkfs.xfs", "-q", "-f"])
        self.benchfs, _ = make_loop_fs(
            self.work, "benchfs", bench_gb, ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]
        )
        for d in ("native", "stores", "mnt/hsm", "mnt/rclone", "rclone-cache", "obj"):
            os.makedirs(os.path.join(self.benchfs, d))
        self.mnt_hsm = os.path.join(self.benchfs, "mnt/hsm")
        self.mnt_rclone = os.path.join(self.benchfs, "mnt/rclone")
        # benchio
        self.benchio = os.path.join(self.work, "benchio")
        sh(["gcc", "-O2", "-o", self.benchio, os.path.join(HERE, "benchio.c")])
        drop_caches()
        self.memory_touch = [float(x) for x in sh([self.benchio, "touch", "256"]).stdout.split()]
        self.gen_data()
        self.http_setup()

    def http_setup(self):
        """nginx on a loopback port serving the source fs, and a manifest per source tree: the
        same rows with hsm's remote backend path (object_store over HTTP, reads in the
        unprivileged fetcher process), against a real web server."""
        if not self.cfg.http:
            self.http_reason = "skipped (--no-http)"
        elif not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
            self.http_reason = "nginx is not installed (apt-get install nginx-light)"
        if self.http_reason:
            log(f"http column: {self.http_reason}")
            return
        d = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(d, "tmp"))
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            port = s_.getsockname()[1]
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                f"""daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; sendfile on; keepalive_requests 100000;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {self.srcfs}; }}
}}
"""
            )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = subprocess.Popen(
            [nginx, "-c", conf, "-p", d],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.logs, "nginx.log"), "w"),
            start_new_session=True,
        )  # fmt: skip
        CLEANUP.push(f"stop nginx {p.pid}", lambda: kill_pid(p.pid, "nginx"))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.http_reason = "nginx did not start (see logs/nginx.log)"
            log(f"http column: {self.http_reason}")
            return
        self.http_base = f"http://127.0.0.1:{port}"
        for src in sorted(self.needed_sources() - {"pop"}):
            with open(os.path.join(self.work, f"manifest-{src}.jsonl"), "w") as f:
                subprocess.run([self.cfg.hsm, "manifest", f"{self.srcfs}/{src}"], stdout=f, check=True)

    def gen_data(self):
        cfg = self.cfg
        t0 = time.time()
        S = self.srcfs
        need = self.needed_sources()
        if "big" in need:
            os.makedirs(f"{S}/big")
            log(f"writing a {cfg.big_mb} MiB file of random bytes")
            sh(
                ["dd", "if=/dev/urandom", f"of={S}/big/data.bin", "bs=1M", f"count={cfg.big_mb}"],
            )
        if "small" in need:
            log(f"writing {cfg.small_files} small files")
            self.needle_matches = gen_small_tree(f"{S}/small", cfg.small_files)
        if "bin" in need:
            os.makedirs(f"{S}/bin")
            shutil.copy2(cfg.hsm, f"{S}/bin/hsm")
        if "build" in need:
            log(f"writing a C project of {cfg.build_files} modules")
            gen_build_tree(f"{S}/build", cfg.build_files)
        if "pop" in need:
            log(f"writing {cfg.pop_files} tiny files for populate")
            gen_pop_tree(f"{S}/pop", cfg.pop_files)
        for d in sorted(need - {"pop"}):
            # A tiny file read through the tree right after the caches are dropped, in every
            # column: it pages the serving process (hsm's worker, rclone) back in, so that the
            # figure measures the workload, not the reload of the daemon's own code.
            with open(f"{S}/{d}/.warmup", "wb") as f:
                f.write(b"w" * 4096)
            sh(["cp", "-a", f"{S}/{d}", f"{self.benchfs}/native/{d}"])
        os.sync()
        log(f"data sets ready in {time.time() - t0:.1f} s")

    def needed_sources(self):
        need = set()
        for w in self.workloads():
            need.add(w["src"])
        if not self.cfg.only or "populate" in self.cfg.only:
            need.add("pop")
        return need

    # ---- workloads ---------------------------------------------------------------------------

    def workloads(self):
        cfg = self.cfg
        all_ = [
            dict(
                name="seq",
                label=f"sequential read {cfg.big_mb} MiB (128 KiB reads)",
                src="big",
                run=lambda root: self.benchio_run(["seq", f"{root}/data.bin"], check_field=1),
                copy=lambda src, dst: self.benchio_run(["copyseq", src, dst], check_field=1),
            ),
            dict(
                name="rand",
                label=f"random 4 KiB reads x{cfg.rand_reads} of it",
                src="big",
                run=lambda root: self.benchio_run(
                    ["rand", f"{root}/data.bin", str(cfg.rand_reads), str(cfg.rand_seed)],
                    check_field=1,
                ),
                copy=lambda src, dst: self.benchio_run(
                    ["copyrand", src, dst, str(cfg.rand_reads), str(cfg.rand_seed)],
                    check_field=1,
                ),
            ),
            dict(
                name="tar",
                label=f"tar -cf - of {cfg.small_files} small files",
                src="small",
                run=lambda root: self.shell_run(f"tar -cf - -C {root} . | wc -c"),
            ),
            dict(
                name="grep",
                label=f"grep -r over {cfg.small_files} small files",
                src="small",
                run=lambda root: self.shell_run(f"grep -r {NEEDLE} {root} | wc -l"),
            ),
            dict(
                name="exec",
                label="execve hsm --version, to first output",
                src="bin",
                run=lambda root: self.benchio_run(["firstout", f"{root}/hsm", "--version"]),
            ),
            dict(
                name="build",
                label=f"make -j2, C project of {cfg.build_files} files",
                src="build",
                run=self.build_run,
                prepare=self.build_prepare,
            ),
        ]
        if cfg.only:
            all_ = [w for w in all_ if w["name"] in cfg.only]
        return all_

    def timed(self, cmd, **kw):
        t0 = time.perf_counter()
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=self.cfg.timeout,
            start_new_session=True,
            **kw,
        )
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return dt, r.stdout

    def benchio_run(self, args, check_field=None):
        _, out = self.timed([self.benchio] + args)
        fields = out.split()
        return float(fields[0]), (fields[check_field] if check_field else None)

    def shell_run(self, script):
        dt, out = self.timed(["bash", "-c", "set -o pipefail; " + script])
        return dt, out.strip()

    def build_prepare(self, _root):
        shutil.rmtree(os.path.join(self.benchfs, "obj", "out"), ignore_errors=True)

    def build_run(self, root):
        obj = os.path.join(self.benchfs, "obj", "out")
        dt, _ = self.timed(["make", "-s", "-j2", "-C", root, f"OUT={obj}"])
        r = sh([f"{obj}/app"])
        return dt, r.stdout.strip()

    # ---- hsm ---------------------------------------------------------------------------------

    def populate(self, src, store, tag, extra=()):
        shutil.rmtree(store, ignore_errors=True)
        tfile = os.path.join(self.logs, f"time-{tag}.txt")
        cmd = ["/usr/bin/time", "-v", "-o", tfile, self.cfg.hsm, "populate", src, store]
        cmd += self.cfg.populate_args + list(extra)
        with open(os.path.join(self.logs, f"populate-{tag}.log"), "w") as errf:
            r = subprocess.run(cmd, stdout=errf, stderr=errf, timeout=self.cfg.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"hsm populate {src} failed; see {errf.name}")
        return parse_time_v(tfile)

    def fuse_check(self):
        if not self.cfg.fuse:
            self.fuse_reason = "skipped (--no-fuse)"
        elif not os.path.exists("/dev/fuse"):
            self.fuse_reason = "/dev/fuse does not exist (no FUSE in this kernel or container)"
        if self.fuse_reason:
            log(f"fuse columns: {self.fuse_reason}")

    def serve(self, store, tag, frontend="fanotify"):
        log_path = os.path.join(self.logs, f"serve-{tag}.log")
        errf = open(log_path, "w")
        cmd = [self.cfg.hsm, "serve", store, self.mnt_hsm, "--frontend", frontend, "--drain", "0.2"]
        cmd += self.cfg.serve_args
        nofile = self.cfg.nofile

        def limits():
            # What contrib/hsm@.service gives the daemon (LimitNOFILE=1048576): every cached file
            # and every held event costs the daemon an fd.
            # Best effort: raising the hard limit needs CAP_SYS_RESOURCE.
            if nofile:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
                except (ValueError, OSError):
                    pass

        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errf, start_new_session=True, preexec_fn=limits
        )
        errf.close()
        d = Daemon(p, store, self.mnt_hsm, log_path, self.cfg.hsm, frontend)
        d.undo = CLEANUP.push(f"stop hsm serve {p.pid}", d.stop)
        d.wait_ready()
        return d

    def hydrate(self, root):
        # Every file read whole, once. Not tar: it exits 1 when a file's ctime moves while it
        # reads it, which the record written during a long fill does (see bench/README.md).
        sh(["bash", "-c", f"set -o pipefail; find {root} -type f -print0 | xargs -0 -r cat > /dev/null"])

    def hsm_status(self, path):
        r = sh([self.cfg.hsm, "status", "--json", path], check=False)
        try:
            t = json.loads(r.stdout)["totals"]
            return t["present_bytes"], t["total_bytes"], t["states"]
        except Exception:
            return None

    # ---- rclone ------------------------------------------------------------------------------

    def rclone_check(self):
        if not self.cfg.rclone:
            self.rclone_reason = "skipped (--no-rclone)"
            return
        if not shutil.which("rclone"):
            self.rclone_reason = "rclone is not installed (apt-get install rclone)"
        elif not os.path.exists("/dev/fuse"):
            self.rclone_reason = "/dev/fuse does not exist (no FUSE in this kernel or container)"
        elif not (shutil.which("fusermount3") or shutil.which("fusermount")):
            self.rclone_reason = "fusermount3 is missing (apt-get install fuse3)"
        if self.rclone_reason:
            log(f"rclone columns: {self.rclone_reason}")

    def rclone_mount(self, src, cache, tag):
        log_path = os.path.join(self.logs, f"rclone-{tag}.log")
        conf = os.path.join(self.work, "rclone.conf")
        open(conf, "a").close()
        cmd = [
            "rclone", "mount", src, self.mnt_rclone,
            "--config", conf,
            "--vfs-cache-mode", "full",
            "--cache-dir", cache,
            "--file-perms", "0755",
            "--log-file", log_path,
        ]  # fmt: skip
        p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        r = Rclone(p, self.mnt_rclone, log_path)
        r.undo = CLEANUP.push(f"stop rclone {p.pid}", r.stop)
        r.wait_ready()
        return r

    # ---- measuring ---------------------------------------------------------------------------

    def record(self, w, col, value, check, hwm=None):
        self.results.setdefault(w, {}).setdefault(col, []).append(value)
        self.checks.setdefault(w, {}).setdefault(col, []).append(check)
        if hwm:
            old = self.hwm.setdefault(w, {}).get(col, (0, 0))
            self.hwm[w][col] = (max(old[0], hwm[0] or 0), max(old[1], hwm[1] or 0))

    def measure(self, w, root, cold=True):
        if "prepare" in w:
            w["prepare"](root)
        if cold:
            drop_caches()
            with open(f"{root}/.warmup", "rb") as f:
                f.read()
        self.noise.append(wait_quiet(self.cfg.quiet_wait))
        return w["run"](root)

    def measure_hsm(self, w, store, tag, col, counters_key, frontend="fanotify"):
        """Serve `store`, run the workload through the mount once, stop; record it as `col`."""
        name = w["name"]
        d = self.serve(store, tag, frontend)
        try:
            v, c = self.measure(w, self.mnt_hsm)
            hwm = d.hwm()
            if col == "hsm cold":
                self.fds[name] = max(self.fds.get(name, 0), d.fds() or 0)
        finally:
            d.stop_and_forget()
        self.counters[counters_key] = d.metrics()
        self.record(name, col, v, c, hwm)
        return v, hwm

    def run_workload(self, w):
        cfg = self.cfg
        name, src = w["name"], f"{self.srcfs}/{w['src']}"
        native = f"{self.benchfs}/native/{w['src']}"
        st_cold = f"{self.benchfs}/stores/{name}-cold"
        st_hyd = f"{self.benchfs}/stores/{name}-hyd"
        log(f"== {name}: {w['label']}")

        # hydrated store, prepared once
        self.populate(src, st_hyd, f"{name}-hyd")
        d = self.serve(st_hyd, f"{name}-hydrate")
        self.hydrate(self.mnt_hsm)
        d.stop_and_forget()
        st = self.hsm_status(f"{st_hyd}/tree")
        if st and st[0] != st[1]:
            self.notes.append(f"{name}: hydrated store holds {st[0]} of {st[1]} bytes ({st[2]})")

        rclone_ok = self.rclone_reason is None
        cache_cold = f"{self.benchfs}/rclone-cache/{name}-cold"
        cache_warm = f"{self.benchfs}/rclone-cache/{name}-warm"
        if rclone_ok:
            try:
                shutil.rmtree(cache_warm, ignore_errors=True)
                r = self.rclone_mount(src, cache_warm, f"{name}-hydrate")
                self.hydrate(self.mnt_rclone)
                r.stop_and_forget()
            except Exception as e:
                self.rclone_reason = f"rclone mount failed: {e}"
                log(self.rclone_reason)
                rclone_ok = False

        for i in range(cfg.runs):
            # native
            v, c = self.measure(w, native)
            self.record(name, "native", v, c)
            log(f"  run {i + 1}: native {v:.3f}s")
            if "copy" in w:
                # What copying the bytes from the source costs, without a daemon: the same reads,
                # each preceded by the copy of what it reads into a new file on the store's fs.
                dst = f"{self.benchfs}/copy-reference.bin"
                drop_caches()
                self.noise.append(wait_quiet(self.cfg.quiet_wait))
                v, c = w["copy"](f"{src}/data.bin", dst)
                os.unlink(dst)
                self.record(name, "copy, no daemon", v, c)
                log(f"  run {i + 1}: copy, no daemon {v:.3f}s")
            # hsm cold
            pop = self.populate(src, st_cold, f"{name}-cold-{i}")
            if w["src"] == "small" and name == "tar":
                self.populates.append(dict(tree="small", files=self.count(src), **pop))
            v, hwm = self.measure_hsm(w, st_cold, f"{name}-cold-{i}", "hsm cold", name)
            log(f"  run {i + 1}: hsm cold {v:.3f}s  (daemon HWM sup {hwm[0]} KiB, worker {hwm[1]} KiB)")
            v, _ = self.measure_hsm(w, st_hyd, f"{name}-hyd-{i}", "hsm hydrated", name + " (hydrated)")
            log(f"  run {i + 1}: hsm hydrated {v:.3f}s")
            if self.fuse_reason is None:
                # The same two through the FUSE front end: a fresh store, and the hydrated store
                # above (the same files: a store fetched under one front end is complete under
                # the other), the daemon restarted before each run.
                self.populate(src, st_cold, f"{name}-fuse-{i}")
                v, _ = self.measure_hsm(w, st_cold, f"{name}-fuse-{i}", "hsm fuse cold",
                                        name + " (fuse)", "fuse")  # fmt: skip
                log(f"  run {i + 1}: hsm fuse cold {v:.3f}s")
                v, _ = self.measure_hsm(w, st_hyd, f"{name}-fuse-hyd-{i}", "hsm fuse hydrated",
                                        name + " (fuse hydrated)", "fuse")  # fmt: skip
                log(f"  run {i + 1}: hsm fuse hydrated {v:.3f}s")
            if self.http_base:
                # hsm cold over HTTP: the same stubs, fetched from nginx
                manifest = os.path.join(self.work, f"manifest-{w['src']}.jsonl")
                url = f"{self.http_base}/{w['src']}/"
                self.populate(url, st_cold, f"{name}-http-{i}", ["--manifest", manifest])
                v, _ = self.measure_hsm(w, st_cold, f"{name}-http-{i}", "hsm cold http", name + " (http)")
                log(f"  run {i + 1}: hsm cold http {v:.3f}s")
            if rclone_ok:
                # rclone cold: empty cache
                shutil.rmtree(cache_cold, ignore_errors=True)
                r = self.rclone_mount(src, cache_cold, f"{name}-cold-{i}")
                try:
                    v, c = self.measure(w, self.mnt_rclone)
                    rh = r.hwm()
                finally:
                    r.stop_and_forget()
                self.record(name, "rclone cold", v, c, (None, rh))
                log(f"  run {i + 1}: rclone cold {v:.3f}s")
                r = self.rclone_mount(src, cache_warm, f"{name}-warm-{i}")
                try:
                    v, c = self.measure(w, self.mnt_rclone)
                    rh = r.hwm()
                finally:
                    r.stop_and_forget()
                self.record(name, "rclone warm", v, c, (None, rh))
                log(f"  run {i + 1}: rclone warm {v:.3f}s")
            if w["name"] != "build":
                # Diagnostic: page cache warm, daemon fresh (no ignore marks yet): every open
                # and access still raises its event, but no disk is read, so the difference to
                # native warm is the daemon's own cost.
                self.measure(w, native, cold=False)
                v, c = self.measure(w, native, cold=False)
                self.record(name, "native warm", v, c)
                log(f"  run {i + 1}: warm cache: native {v:.3f}s")
                # (front end, log tag, column, counters' label)
                fronts = [("fanotify", "", "hsm", "hydrated, warm")]
                if self.fuse_reason is None:
                    fronts.append(("fuse", "fuse-", "hsm fuse", "fuse hydrated, warm"))
                for frontend, tag, col, label in fronts:
                    self.hydrate(f"{st_hyd}/tree")
                    d = self.serve(st_hyd, f"{name}-{tag}warm-{i}", frontend)
                    try:
                        v, c = self.measure(w, self.mnt_hsm, cold=False)
                    finally:
                        d.stop_and_forget()
                    self.counters[f"{name} ({label})"] = d.metrics()
                    self.record(name, f"{col} hydrated warm", v, c)
                    log(f"  run {i + 1}: warm cache: {col} hydrated (fresh daemon) {v:.3f}s")
        if cfg.profile != "none":
            self.profile(w, src, st_cold)
        for s in (st_cold, st_hyd):
            shutil.rmtree(s, ignore_errors=True)
        for c in (cache_cold, cache_warm):
            shutil.rmtree(c, ignore_errors=True)

    def count(self, path):
        if not hasattr(self, "_counts"):
            self._counts = {}
        if path not in self._counts:
            self._counts[path] = tree_files(path)
        return self._counts[path]

    def profile(self, w, src, store):
        """One more hsm cold run with the worker under strace -c -f or perf record."""
        name = w["name"]
        self.populate(src, store, f"{name}-prof")
        d = self.serve(store, f"{name}-prof")
        out = os.path.join(self.logs, f"profile-{name}.{self.cfg.profile}")
        if self.cfg.profile == "strace":
            prof = ["strace", "-c", "-f", "-o", out, "-p", str(d.worker_pid)]
        else:
            prof = ["perf", "record", "-g", "-o", out, "-p", f"{d.worker_pid},{d.p.pid}"]
        pp = subprocess.Popen(prof, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        undo = CLEANUP.push(f"stop profiler {pp.pid}", lambda: kill_pid(pp.pid, prof[0]))
        time.sleep(1.0)
        try:
            v, _ = self.measure(w, self.mnt_hsm)
        finally:
            kill_pid(pp.pid, prof[0], signal.SIGINT)
            try:
                pp.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kill_pid(pp.pid, prof[0])
            CLEANUP.pop(undo)
            d.stop_and_forget()
        self.notes.append(
            f"{name}: profiled cold run took {v:.3f}s; profile in logs/{os.path.basename(out)} "
            f"(kept with --keep-logs)"
        )
        log(f"  profile ({self.cfg.profile}) {v:.3f}s -> {out}")

    def run_populate(self):
        cfg = self.cfg
        src = f"{self.srcfs}/pop"
        store = f"{self.benchfs}/stores/pop"
        log(f"== populate: {cfg.pop_files} files")
        for i in range(cfg.runs):
            drop_caches()
            pop = self.populate(src, store, f"pop-{i}")
            self.populates.append(dict(tree="pop", files=cfg.pop_files, **pop))
            log(f"  run {i + 1}: populate {pop['elapsed']:.3f}s, max RSS {pop['maxrss_kib']} KiB")
            shutil.rmtree(store, ignore_errors=True)
            # the floor: the same system calls per file from C, on as many threads, nothing else
            floor = f"{self.benchfs}/stores/pop-floor"
            drop_caches()
            out = sh([self.benchio, "mkstubs", src, floor, str(os.cpu_count() or 1)]).stdout.split()
            if int(out[1]) != cfg.pop_files:
                raise RuntimeError(f"benchio mkstubs made {out[1]} files, not {cfg.pop_files}")
            self.record("populate", "floor", float(out[0]), None)
            shutil.rmtree(floor, ignore_errors=True)
            log(f"  run {i + 1}: the same system calls from C {float(out[0]):.3f}s")
            if i > 0:
                continue
            # the alternative: copy everything up front (measured once: it is slow)
            dst = f"{self.benchfs}/native/pop"
            drop_caches()
            t0 = time.perf_counter()
            sh(["cp", "-a", src, dst])
            os.sync()
            dt = time.perf_counter() - t0
            self.record("populate", "native", dt, None)
            shutil.rmtree(dst, ignore_errors=True)
            log(f"  run {i + 1}: cp -a + sync {dt:.3f}s")

    # ---- report ------------------------------------------------------------------------------

    def native_spread(self, w):
        """Native's slowest run of workload `w` over its fastest (None under two runs): how far
        apart two runs of the same thing land on this machine."""
        nat = self.results.get(w, {}).get("native", [])
        return max(nat) / min(nat) if len(nat) > 1 else None

    def report(self):
        cfg = self.cfg
        cols = ["native", "hsm cold", "hsm hydrated", "hsm fuse cold", "hsm fuse hydrated",
                "hsm cold http", "rclone cold", "rclone warm"]  # fmt: skip
        med = {w: {c: statistics.median(v) for c, v in cols_.items()} for w, cols_ in self.results.items()}
        lines = []
        lines.append(
            f"hsm bench: {cfg.runs} run(s) per figure, medians in seconds; page cache dropped "
            f"before every run; {time.strftime('%Y-%m-%d %H:%M')}, kernel {os.uname().release}, "
            f"{os.cpu_count()} CPUs"
        )
        if self.rclone_reason:
            lines.append(f"rclone: {self.rclone_reason}")
        if self.http_reason:
            lines.append(f"hsm cold http: {self.http_reason}")
        if self.fuse_reason:
            lines.append(f"hsm fuse: {self.fuse_reason}")
        first, again = self.memory_touch
        lines.append(
            f"memory: the first touch of 256 MiB of fresh memory took {first:.3f} s, the second "
            f"{again:.3f} s"
            + (
                f"; this VM hands freed memory back to its host (free page reporting), so every "
                f"measurement starts {MEMORY_SETTLE:.0f} s after the page cache is dropped, when "
                f"that has happened, and every column pays for its fresh pages alike"
                if MEMORY_SETTLE
                else ""
            )
        )
        if self.noise:
            loud = sum(1 for q in self.noise if not q)
            lines.append(
                f"machine noise: {loud} of {len(self.noise)} measurements found no quiet 0.25 s "
                f"window (I/O stall < 10%) within {cfg.quiet_wait} s before starting; load "
                f"average at the end {os.getloadavg()[0]:.1f} (the machine may be shared)"
            )
        lines.append("")
        hdr = ["workload"] + cols + ["cold/native", "hydrated/native", "fuse cold/native",
               "fuse hydrated/native", "http cold/native", "rclone cold/native",
               "hsm RSS MiB sup/worker", "fuse RSS MiB"]  # fmt: skip
        rows = []
        labels = {w["name"]: w["label"] for w in self.workloads()}
        for w in [x["name"] for x in self.workloads()]:
            if w not in med:
                continue
            m = med[w]
            nat = m.get("native")

            def f(c):
                return f"{m[c]:.3f}" if c in m else "n/a"

            def ratio(c):
                return f"{m[c] / nat:.2f}x" if c in m and nat else "n/a"

            hw = self.hwm.get(w, {})
            sup = max(hw.get("hsm cold", (0, 0))[0], hw.get("hsm hydrated", (0, 0))[0])
            wk = max(hw.get("hsm cold", (0, 0))[1], hw.get("hsm hydrated", (0, 0))[1])
            fuse = max(hw.get("hsm fuse cold", (0, 0))[0], hw.get("hsm fuse hydrated", (0, 0))[0])
            rows.append([labels[w]] + [f(c) for c in cols]
                        + [ratio("hsm cold"), ratio("hsm hydrated"), ratio("hsm fuse cold"),
                           ratio("hsm fuse hydrated"), ratio("hsm cold http"), ratio("rclone cold"),
                           f"{sup / 1024:.1f} / {wk / 1024:.1f}",
                           f"{fuse / 1024:.1f}" if fuse else "n/a"])  # fmt: skip
        lines += md_table(hdr, rows)
        # Spread: run i measures native, cold and hydrated back to back, so its ratios are paired;
        # native's own max/min says how far apart two runs of the same thing land. A target
        # closer to 1.00x than that spread cannot be judged from one run of the table.
        srows = []
        for w in [x["name"] for x in self.workloads()]:
            spread = self.native_spread(w)
            if spread is None:
                continue
            r = self.results[w]
            nat = r["native"]

            def paired(c):
                v = r.get(c, [])
                return " ".join(f"{a / n:.2f}" for a, n in zip(v, nat)) if v else "n/a"

            srows.append([labels[w], f"{spread:.3f}", paired("hsm cold"), paired("hsm hydrated"),
                          paired("hsm fuse cold"), paired("hsm fuse hydrated")])  # fmt: skip
        if srows:
            lines.append("")
            lines.append("spread: native's slowest run over its fastest, and each run's ratios to the native")
            lines.append("run measured just before it (see the targets for how noise is judged):")
            lines += md_table(["workload", "native max/min", "cold/native per run",
                               "hydrated/native per run", "fuse cold/native per run",
                               "fuse hydrated/native per run"], srows)  # fmt: skip
        # warm diagnostic
        wrows = []
        for w in [x["name"] for x in self.workloads()]:
            m = med.get(w, {})
            if "native warm" not in m or "hsm hydrated warm" not in m:
                continue
            cnt = self.counters.get(w + " (hydrated, warm)") or {}
            ev = cnt.get("events_open", 0) + cnt.get("events_pre_access", 0)
            extra = m["hsm hydrated warm"] - m["native warm"]
            fw = m.get("hsm fuse hydrated warm")
            wrows.append([labels[w], f"{m['native warm']:.3f}", f"{m['hsm hydrated warm']:.3f}",
                          f"{m['hsm hydrated warm'] / m['native warm']:.2f}x", str(ev),
                          f"{extra / ev * 1e6:.0f}" if ev >= 100 else "(too few)",
                          f"{fw:.3f}" if fw else "n/a",
                          f"{fw / m['native warm']:.2f}x" if fw else "n/a"])  # fmt: skip
        if wrows:
            lines.append("")
            lines.append("daemon cost without disk I/O: page cache warm, hsm daemon just started (no ignore marks yet,")
            lines.append("so every file raises its events once); the difference is what the events cost. Under FUSE,")
            lines.append("every lookup, open and close of a fresh mount is a request to the daemon:")
            lines += md_table(["workload", "native warm", "hsm hydrated warm", "ratio", "events",
                               "extra us/event", "fuse hydrated warm", "fuse ratio"], wrows)  # fmt: skip
        crows = []
        for w in [x["name"] for x in self.workloads()]:
            m = med.get(w, {})
            if "copy, no daemon" not in m or "native" not in m:
                continue
            cp, nat = m["copy, no daemon"], m["native"]
            cold = m.get("hsm cold")
            crows.append([labels[w], f"{nat:.3f}", f"{cp:.3f}", f"{cold:.3f}" if cold else "n/a",
                          f"{cp / nat:.2f}x", f"{cold / cp:.2f}x" if cold else "n/a"])  # fmt: skip
        if crows:
            lines.append("")
            lines.append("the copy alone, no daemon: each read preceded by copying what it reads from the source")
            lines.append("into a new file on the store's fs (`benchio copyseq`: 1 MiB direct reads into a huge page, pwrite; `copyrand`:")
            lines.append("pread + pwrite of the 4 KiB page), one thread, page cache dropped: what the bytes cost")
            lines.append("before any event is handled")
            lines += md_table(["workload", "native", "copy, no daemon", "hsm cold", "copy/native",
                               "hsm cold/copy"], crows)  # fmt: skip
        # populate
        if self.populates:
            lines.append("")
            prow = []
            for tree in ("pop", "small"):
                ps = [p for p in self.populates if p["tree"] == tree]
                if not ps:
                    continue
                el = statistics.median(p["elapsed"] for p in ps)
                rss = max(p["maxrss_kib"] for p in ps)
                n = ps[0]["files"]
                native = floor = "n/a"
                if tree == "pop" and "populate" in med:
                    native = f"{med['populate']['native']:.3f}" if "native" in med["populate"] else "n/a"
                    if "floor" in med["populate"]:
                        f = med["populate"]["floor"]
                        floor = f"{f:.3f} ({n / f:,.0f} files/s)"
                prow.append([f"hsm populate, {n} files" + (" (cold cache)" if tree == "pop" else ""),
                             f"{el:.3f}", f"{n / el:,.0f}", f"{rss / 1024:.1f}", floor, native])  # fmt: skip
            lines += md_table(["populate", "seconds", "files/s", "peak RSS MiB",
                               "same syscalls from C s", "cp -a + sync s"], prow)  # fmt: skip
            lines.append("(same syscalls from C: `benchio mkstubs`, per file the lstat, O_TMPFILE create, ftruncate,")
            lines.append(" xattr, fstat, futimens and linkat a stub needs, on as many threads as CPUs: the kernel's floor)")
        for w, e in self.failed.items():
            err = [x for x in e.splitlines() if x.strip()]
            lines.append(f"FAILED: {w}: {err[0][:300] if err else e}")
            lines += ["    " + x[:200] for x in err[-3:][1:]]
        # correctness cross-checks
        bad = []
        for w, cols_ in self.checks.items():
            ref = cols_.get("native", [None])[0]
            for c, vals in cols_.items():
                for v in vals:
                    if v != ref:
                        bad.append(f"{w}/{c}: got {v!r}, native {ref!r}")
        lines.append("")
        if bad:
            lines.append("CHECK MISMATCHES (bytes read differ from native):")
            lines += ["  " + b for b in bad]
        else:
            lines.append("checks: every column read the same bytes as native (sizes, checksums, match counts, build output)")
        # targets
        lines.append("")
        lines.append("targets:")
        lines += self.targets(med)
        if self.notes:
            lines.append("")
            lines.append("notes:")
            lines += ["  " + n for n in self.notes]
        # counters
        if self.counters:
            lines.append("")
            lines.append("hsm daemon counters (last run of each column):")
            keys = ["events_open", "events_pre_access", "backend_reads", "fetched_bytes",
                    "answered_published", "readahead_bytes", "prefetched_files", "read_ahead_files",
                    "files_completed", "ignore_marks", "records_written", "fuse_passthrough_opens"]  # fmt: skip
            crow = []
            for w, m in self.counters.items():
                if m:
                    crow.append([w] + [str(m.get(k, "")) for k in keys]
                                + [str(self.fds.get(w, ""))])  # fmt: skip
            lines += md_table(["workload"] + keys + ["worker fds at end"], crow)
        text = "\n".join(lines)
        print(text)
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump(
                    dict(results=self.results, medians=med, hwm_kib=self.hwm,
                         populate=self.populates, counters=self.counters,
                         rclone=self.rclone_reason, notes=self.notes, table=text),
                    f, indent=1,
                )  # fmt: skip

    def targets(self, med):
        """Each target as met, within noise or missed, with the spread of its runs.

        Noise is judged from the samples, not the medians: a target missed by the median ratio
        is "within noise" when the column's fastest run is within the limit of native's slowest
        run (the two spreads overlap once the limit is allowed), so that the same machine state
        could have given a met ratio; otherwise it is missed."""
        out = []
        res = self.results

        def judge(w, col, lim, what, extra=""):
            nat, got = res.get(w, {}).get("native"), res.get(w, {}).get(col)
            if not nat or not got or col not in med.get(w, {}):
                return
            x = med[w][col] / med[w]["native"]
            per = [a / n for a, n in zip(got, nat)]
            if x <= lim:
                verdict = "met"
            elif min(got) <= lim * max(nat):
                verdict = "within noise"
            else:
                verdict = "MISSED"
            out.append(
                f"  [{verdict}] {w}: {what} within {lim:.2f}x of native: {x:.3f}x "
                f"(runs {min(per):.2f}-{max(per):.2f}x; {col} {min(got):.3f}-{max(got):.3f} s, "
                f"native {min(nat):.3f}-{max(nat):.3f} s){extra}"
            )

        names = [w["name"] for w in self.workloads()]
        # issue 21: the raised local targets
        for w in names:
            judge(w, "hsm hydrated", 1.00, "hsm hydrated")
        for w, lim in {"seq": 1.05, "tar": 1.05, "rand": 1.5, "build": 1.01}.items():
            cp = med.get(w, {}).get("copy, no daemon")
            also = f" (the copy alone, no daemon: {cp / med[w]['native']:.3f}x)" if cp else ""
            judge(w, "hsm cold", lim, "hsm cold", also)
        # issue 22: the FUSE front end, complete files in passthrough
        for w, lim in {"seq": 1.05, "tar": 1.3}.items():
            cnt = self.counters.get(w + " (fuse hydrated)") or {}
            pt = cnt.get("fuse_passthrough_opens")
            also = f" ({pt} opens in passthrough in the last run)" if pt is not None else ""
            judge(w, "hsm fuse hydrated", lim, "hsm fuse hydrated", also)
        for w in names:
            cnt = self.counters.get(w + " (fuse hydrated)")
            if cnt is not None:
                pt = cnt.get("fuse_passthrough_opens", 0)
                out.append(f"  [{'met' if pt else 'MISSED'}] {w}: complete files open in passthrough "
                           f"under FUSE: {pt} passthrough opens in the last hydrated run")  # fmt: skip
        for w in names:
            m = med.get(w, {})
            if "rclone cold" in m and "hsm cold" in m:
                ok = m["hsm cold"] < m["rclone cold"]
                out.append(
                    f"  [{'met' if ok else 'MISSED'}] {w}: hsm cold faster than rclone cold: "
                    f"{m['hsm cold']:.3f}s vs {m['rclone cold']:.3f}s"
                )
        ps = [p for p in self.populates if p["tree"] == "pop"]
        if ps:
            el = statistics.median(p["elapsed"] for p in ps)
            rate = ps[0]["files"] / el
            floor = med.get("populate", {}).get("floor")
            also = f" (the same system calls from C: {ps[0]['files'] / floor:,.0f} files/s)" if floor else ""
            out.append(f"  [{'met' if rate >= 50000 else 'MISSED'}] populate >= 50,000 files/s: "
                       f"{rate:,.0f} files/s{also}")  # fmt: skip
        if out:
            out.append("  (within noise: missed by the medians, but the column's fastest run is within the")
            out.append("  limit of native's slowest run; runs: each run's ratio to the native run just before it)")
        return out


def md_table(hdr, rows):
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)] if rows else [len(h) for h in hdr]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"  # noqa
    return [fmt(hdr), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows]


def parse_time_v(path):
    el, rss = None, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Elapsed (wall clock) time"):
                v = line.rsplit(" ", 1)[1]
                parts = [float(x) for x in v.split(":")]
                el = 0.0
                for x in parts:
                    el = el * 60 + x
            elif line.startswith("Maximum resident set size"):
                rss = int(line.rsplit(" ", 1)[1])
    return dict(elapsed=el, maxrss_kib=rss)


class Daemon:
    """A running `hsm serve`: supervisor (our child) + worker (its child)."""

    def __init__(self, p, store, mnt, log_path, hsm, frontend):
        self.p, self.store, self.mnt, self.log_path, self.hsm = p, store, mnt, log_path, hsm
        self.frontend = frontend
        self.worker_pid = None
        self.undo = None
        self._metrics = None

    def wait_ready(self):
        end = time.time() + 60
        line = b""
        while time.time() < end:
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                line = self.p.stdout.readline()
                break
            if self.p.poll() is not None:
                break
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"hsm serve did not start; see {self.log_path}")
        if self.frontend == "fuse":
            # One process: the FUSE front end has no supervisor (see src/fuse.rs).
            self.worker_pid = self.p.pid
            return
        with open(os.path.join(self.store, ".hsm/worker.pid")) as f:
            self.worker_pid = int(f.read().strip())

    def hwm(self):
        return (vm_hwm_kib(self.p.pid), vm_hwm_kib(self.worker_pid))

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.worker_pid}/fd"))
        except OSError:
            return None

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                log(f"hsm serve {self.p.pid} did not stop; killing it and its worker")
                self.p.kill()
                self.p.wait()
        if self.worker_pid:
            end = time.time() + 10
            while (
                self.worker_pid != self.p.pid
                and pid_alive(self.worker_pid, "serve-worker")
                and time.time() < end
            ):
                time.sleep(0.05)
            kill_pid(self.worker_pid, "serve-worker")
        umount_all(self.mnt)
        # The store's guard (one guarded store per filesystem: the next store measured on the
        # same filesystem needs it gone; nothing else must run between measurements either).
        subprocess.run([self.hsm, "guard", "--stop", self.store], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.p.stdout:
            self.p.stdout.close()

    def stop_and_forget(self):
        CLEANUP.pop(self.undo)
        if self.p.returncode not in (0, None):
            log(f"hsm serve exited with {self.p.returncode}; see {self.log_path}")

    def metrics(self):
        try:
            with open(os.path.join(self.store, ".hsm/metrics.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


class Rclone:
    def __init__(self, p, mnt, log_path):
        self.p, self.mnt, self.log_path = p, mnt, log_path
        self.undo = None

    def wait_ready(self):
        end = time.time() + 30
        while time.time() < end:
            if is_mount(self.mnt):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        tail = ""
        try:
            with open(self.log_path) as f:
                tail = f.read()[-800:]
        except OSError:
            pass
        self.stop()
        raise RuntimeError(f"rclone mount did not come up: {tail.strip()}")

    def hwm(self):
        return vm_hwm_kib(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for _ in range(3):
            if not is_mount(self.mnt):
                break
            fm = shutil.which("fusermount3") or "fusermount"
            sh([fm, "-u", "-z", self.mnt], check=False)
        umount_all(self.mnt)

    def stop_and_forget(self):
        CLEANUP.pop(self.undo)


def main():
    cfg = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/run needs root (loop devices, mounts, fanotify, drop_caches)")
    if not os.access(cfg.hsm, os.X_OK):
        sys.exit(f"no hsm binary at {cfg.hsm}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    b = Bench(cfg)
    t0 = time.time()
    status = 0
    try:
        b.rclone_check()
        b.fuse_check()
        b.setup()
        for w in b.workloads():
            mark = CLEANUP.mark()
            try:
                b.run_workload(w)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                # Record it, undo what this workload left (daemons, mounts), go on.
                msg = str(e)
                if "failed (" in msg:  # keep the command and the end of its stderr
                    msg = msg[: msg.index("failed (") + 12] + "\n" + "\n".join(msg.splitlines()[-4:])
                b.failed[w["name"]] = msg
                log(f"{w['name']} FAILED: {str(e)[-1500:]}")
                CLEANUP.unwind_to(mark)
        if not cfg.only or "populate" in cfg.only:
            b.run_populate()
        b.report()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        status = 130
    except Exception:
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        logs = getattr(b, "logs", None)
        if logs and os.path.isdir(logs) and (cfg.keep_logs or status == 1):
            keep = tempfile.mkdtemp(prefix="hsm-bench-logs.", dir=cfg.workdir_parent)
            shutil.copytree(logs, keep, dirs_exist_ok=True)
            log(f"logs kept in {keep}")
        CLEANUP.run_all()
        log(f"total {time.time() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
