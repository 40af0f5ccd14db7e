#!/usr/bin/python3
"""A program's cold start over a WAN, with and without a recorded access list (issue 27).

    sudo python3 bench/wan_start.py [--runs N] [--delay-ms 10] [--rate-mbytes 125]

The program: Python importing moto, boto3 and botocore from a copy of /opt/hsm-ci-venv's
site-packages (`python3 -S`, the copy first on sys.path, no bytecode written). The copy is
served by nginx on loopback (manifest from `hsm manifest`) behind bench/wanlink.py (10 ms each
way, 125 MB/s each direction by default). Columns, in one run, page cache dropped before each:

  native       the copy as plain files on the bench filesystem (a loop-mounted xfs image);
  cold         a fresh stub store (`hsm populate http://...`) served by `hsm serve`, nothing
               present, recording its accesses (`--record-access`);
  cold + list  another fresh store, served with `--prefetch-list` of the list the cold run
               recorded, the program started as soon as the daemon is ready.

Times are medians of --runs runs (each hsm run on a store populated anew); fetched bytes are
the daemon's `fetched_bytes`. Target: cold + list within 1.5x native, fetching at most 2x the
bytes the recorded (cold) run fetched. Everything made (mounts, loop device, processes, files)
is removed on exit.
"""

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HSM = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "hsm")
VENV_PY = "/opt/hsm-ci-venv/bin/python3"

CLEANUP = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cleanup():
    while CLEANUP:
        what, fn = CLEANUP.pop()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            log(f"cleanup: {what}: {e}")


def kill(p):
    if p.poll() is None:
        p.kill()
        p.wait()


def start_nginx(work, root):
    d = os.path.join(work, "nginx")
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
        )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([nginx, "-c", conf, "-p", d], stdin=subprocess.DEVNULL)
    CLEANUP.append(("nginx", lambda: kill(p)))
    end = time.time() + 30
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.1)
    raise SystemExit("nginx did not start")


def start_link(to_port, delay_ms, rate):
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "wanlink.py"), "--to", str(to_port),
         "--delay-ms", str(delay_ms), "--rate-mbytes", str(rate)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    CLEANUP.append(("wanlink", lambda: kill(p)))
    line = p.stdout.readline().split()
    if len(line) != 2 or line[0] != "listening":
        raise SystemExit(f"wanlink.py did not start: {line}")
    return int(line[1])


def python_start(site):
    """Seconds the import takes from `site` (a path first on sys.path)."""
    code = f"import sys; sys.path.insert(0, {site!r}); import moto, boto3, botocore"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t = time.monotonic()
    sh([VENV_PY, "-S", "-c", code], env=env, stdin=subprocess.DEVNULL, cwd="/")
    return time.monotonic() - t


class Daemon:
    def __init__(self, store, mnt, extra, logpath):
        self.mnt = mnt
        self.store = store
        self.p = subprocess.Popen(
            [HSM, "serve", store, mnt, *extra], stdout=subprocess.PIPE,
            stderr=open(logpath, "w"), stdin=subprocess.DEVNULL, text=True,
        )
        CLEANUP.append(("hsm serve", self.stop))
        if self.p.stdout.readline().strip() != "ready":
            raise SystemExit(f"hsm serve did not start: see {logpath}")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        with open(os.path.join(self.store, ".hsm", "metrics.json")) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per column (default 3)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--rate-mbytes", type=float, default=125.0, help="MB/s each way (default 125)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop device, mount, fanotify, drop_caches)")
    site = glob.glob("/opt/hsm-ci-venv/lib/python3*/site-packages")
    if not site or not os.path.exists(VENV_PY):
        raise SystemExit("no /opt/hsm-ci-venv (.ci/run makes it)")
    site = site[0]
    if not os.path.exists(HSM):
        raise SystemExit(f"{HSM} missing: cargo build --release")
    work = tempfile.mkdtemp(prefix="hsm-wan-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    CLEANUP.append(("work dir", lambda: shutil.rmtree(work, ignore_errors=True)))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(1))
    try:
        run(a, site, work)
    finally:
        cleanup()


def run(a, site, work):
    # The server's side: a copy of site-packages with its manifest, served by nginx.
    www = os.path.join(work, "www")
    log(f"copying {site} (the source)")
    shutil.copytree(site, www, symlinks=True)
    with open(os.path.join(www, ".hsm-manifest.jsonl"), "wb") as f:
        sh([HSM, "manifest", www], stdout=f)
    nginx_port = start_nginx(work, www)
    link_port = start_link(nginx_port, a.delay_ms, a.rate_mbytes)
    url = f"http://127.0.0.1:{link_port}/"

    # The client's side: a loop-mounted xfs image holding the native copy, stores, mount points.
    img = os.path.join(work, "bench.img")
    with open(img, "wb") as f:
        f.truncate(8 << 30)
    sh(["mkfs.xfs", "-q", img])
    fs = os.path.join(work, "fs")
    os.makedirs(fs)
    sh(["mount", "-o", "loop", img, fs])
    CLEANUP.append(("bench fs", lambda: sh(["umount", "-l", fs])))
    native = os.path.join(fs, "native")
    log("copying the native tree")
    shutil.copytree(site, native, symlinks=True)

    def fresh_store(i):
        store, mnt = os.path.join(fs, f"store{i}"), os.path.join(work, f"mnt{i}")
        os.makedirs(mnt, exist_ok=True)
        sh([HSM, "populate", url, store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return store, mnt

    def hsm_run(i, extra):
        store, mnt = fresh_store(i)
        drop_caches()
        d = Daemon(store, mnt, extra, os.path.join(work, f"serve{i}.log"))
        t = python_start(mnt)
        m = d.stop()
        CLEANUP.remove(("hsm serve", d.stop))
        with open(os.path.join(work, f"serve{i}.log")) as f:
            for line in f:
                if "access list" in line:
                    log("  " + line.strip())
        sh([HSM, "guard", "--stop", store], stderr=subprocess.DEVNULL, check=False)
        return t, m

    rows = {"native": [], "cold": [], "list": []}
    fetched = {"cold": [], "list": []}
    n = 0
    for r in range(a.runs):
        drop_caches()
        rows["native"].append(python_start(native))
        lst = os.path.join(work, f"start{r}.list")
        n += 1
        t, m = hsm_run(n, ["--record-access", lst])
        rows["cold"].append(t)
        fetched["cold"].append(m["fetched_bytes"])
        n += 1
        t, m = hsm_run(n, ["--prefetch-list", lst])
        rows["list"].append(t)
        fetched["list"].append(m["fetched_bytes"])
        log(
            f"run {r + 1}: native {rows['native'][-1]:.2f} s, cold {rows['cold'][-1]:.2f} s "
            f"({fetched['cold'][-1] / 1e6:.1f} MB), cold + list {t:.2f} s "
            f"({m['fetched_bytes'] / 1e6:.1f} MB, list hits {m.get('list_hit_bytes', 0) / 1e6:.1f} MB)"
        )

    med = {k: statistics.median(v) for k, v in rows.items()}
    spread = {k: (min(v), max(v)) for k, v in rows.items()}
    mb = {k: statistics.median(v) / 1e6 for k, v in fetched.items()}
    print(f"\nPython start importing moto, boto3, botocore over a link of {a.delay_ms:g} ms each way, "
          f"{a.rate_mbytes:g} MB/s (HTTP, nginx); medians of {a.runs}, spread in brackets\n")
    print("| column | time | x native | fetched |")
    print("|---|---|---|---|")
    for k, name in (("native", "native"), ("cold", "hsm cold (recording)"), ("list", "hsm cold + list")):
        lo, hi = spread[k]
        f = f"{mb[k]:.1f} MB" if k in mb else "-"
        print(f"| {name} | {med[k]:.2f} s [{lo:.2f}-{hi:.2f}] | {med[k] / med['native']:.2f}x | {f} |")
    ratio = med["list"] / med["native"]
    bytes_ratio = mb["list"] / mb["cold"] if mb["cold"] else float("inf")
    ok_t, ok_b = ratio <= 1.5, bytes_ratio <= 2.0
    print(f"\ntarget: cold + list within 1.5x native: {ratio:.2f}x: {'met' if ok_t else 'missed'}")
    print(f"target: at most 2x the recorded run's bytes: {bytes_ratio:.2f}x: {'met' if ok_b else 'missed'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"times": rows, "fetched": fetched, "ratio": ratio, "bytes_ratio": bytes_ratio}, f)


if __name__ == "__main__":
    main()
