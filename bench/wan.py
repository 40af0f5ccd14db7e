#!/usr/bin/python3
"""Remote sources over a WAN link: hsm cold beside a plain client fetching the same bytes (issue 21).

    sudo python3 bench/wan.py [--runs N] [--delay-ms 10] [--rate-mbytes 125] [--only http,https,s3]

The sources live on a loop-mounted xfs image and are served on loopback by nginx (Debian's
nginx-light, manifest from `hsm manifest`; `http` over HTTP/1.1, `https` over TLS offering
HTTP/2, with a certificate from a throw-away CA that hsm trusts through SSL_CERT_FILE and curl
through --cacert, curl asked for --http2) and by s3s-fs (an S3 server on a plain directory,
from crates.io: it streams ranges from the file, where moto copies whole objects per request;
the objects are uploaded to it, so that it keeps their ETags instead of hashing a whole file
at every GET, and it runs with bench/nodelay.c preloaded, TCP_NODELAY on its connections),
each behind its own bench/wanlink.py (default 10 ms each way = 20 ms round trip, 125 MB/s each
direction). hsm's stores are on a second loop-mounted xfs image. The page cache is dropped before
every measured run (the servers' and the client's alike). Rows, for each source:

  seq    sequential read of 256 MiB (benchio seq)   vs one `curl` of the object
  rand   N random 4 KiB reads (benchio rand)        vs the same N ranges, one at a time as
                                                       benchio reads them, by one curl on one
                                                       kept-alive connection (one in flight)
  tar    `tar -cf - . | wc -c` of 2,000 files of 4-16 KiB in 20 directories
                                                    vs `curl --parallel --parallel-max 16` of
                                                       the same 2,000 objects
  grep   `grep -r` over the same tree              vs the same curl figure (measured again)
  exec   `benchio firstout BIN --version` of a copy of the release hsm binary
                                                    vs one `curl` of the whole binary

Each hsm run populates a fresh store, starts `hsm serve`, drops caches, runs the row and stops
the daemon. Medians of --runs runs, the spread (min-max) in brackets; the ratio's spread is
best hsm / slowest plain to slowest hsm / best plain. Targets: tar and grep within 1.0x of the
plain client (issue 21's); seq and exec at link speed, within 1.05x; rand within 1.10x (one
round trip per read either way, hsm's 64 KiB piece against curl's 4 KiB). S3 credentials are
the bench's own and the servers listen on 127.0.0.1 only. Everything made is removed on exit
(a failed run keeps its logs in WORKDIR-logs).

Extra `hsm serve` arguments: HSM_SERVE_ARGS="--readahead 32M". The bench installs what it lacks: nginx-light and curl (apt), s3s-fs (`cargo install`).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (bench/bench.py: its helpers)
from bench import CLEANUP, NEEDLE, drop_caches, kill_pid, log, make_loop_fs, sh  # noqa: E402

REPO = os.path.dirname(HERE)
HSM = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "hsm")
S3S_VERSION = "0.14.1"
KEY, SECRET, REGION, BUCKET = "hsmbench", "hsmbenchsecret", "us-east-1", "wan"
SMALL_FILES, SMALL_DIRS = 2000, 20
SEED = 42
TARGETS = {"seq": 1.05, "rand": 1.10, "tar": 1.0, "grep": 1.0, "exec": 1.05}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, p=None):
    end = time.time() + 30
    while time.time() < end:
        if p is not None and p.poll() is not None:
            raise SystemExit(f"{what} exited at start ({p.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def spawn(cmd, what, logpath, env=None):
    """Start a server (its own session), stopped by pid at exit."""
    with open(logpath, "w") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
    CLEANUP.push(f"stop {what} {p.pid}", lambda: (kill_pid(p.pid, os.path.basename(cmd[0])), p.wait()))
    return p


# ---- what the bench needs ----------------------------------------------------------------------


def s3s_binary():
    """The s3s-fs binary: on PATH, in ~/.cargo/bin, or installed now from crates.io."""
    for c in (shutil.which("s3s-fs"), os.path.expanduser("~/.cargo/bin/s3s-fs")):
        if c and os.access(c, os.X_OK):
            return c
    log(f"installing s3s-fs {S3S_VERSION} from crates.io (cargo install, a few minutes)")
    r = subprocess.run(["cargo", "install", "--locked", "s3s-fs", "--version", S3S_VERSION,
                        "--features", "binary"], stdin=subprocess.DEVNULL)
    c = os.path.expanduser("~/.cargo/bin/s3s-fs")
    if r.returncode != 0 or not os.access(c, os.X_OK):
        raise SystemExit("cannot install s3s-fs (cargo install s3s-fs --features binary)")
    return c


def ensure_packages():
    need = [pkg for cmd, pkg in (("curl", "curl"), ("gcc", "gcc"), ("mkfs.xfs", "xfsprogs"))
            if not shutil.which(cmd)]
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        need.append("nginx-light")
    if need:
        log(f"installing: {' '.join(need)}")
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", *need], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


# ---- the sources -------------------------------------------------------------------------------


def gen_sources(root, big_mib):
    """root/big/data.bin, root/small/dNN/fNNNN.txt (2,000 files of 4-16 KiB, 1% hold NEEDLE),
    root/bin/hsm (a copy of the release binary). No manifests yet (see `write_manifests`)."""
    os.makedirs(f"{root}/big")
    with open(f"{root}/big/data.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    rng = random.Random(SEED)
    blob = bench.gen_text(rng, 1 << 20)
    per = SMALL_FILES // SMALL_DIRS
    for i in range(SMALL_FILES):
        d = f"{root}/small/d{i // per:02d}"
        os.makedirs(d, exist_ok=True)
        size = rng.randint(4096, 16384)
        off = rng.randrange(0, len(blob) - size)
        body = blob[off:off + size]
        if i % 100 == 37:
            body = body[: size // 2] + f" {NEEDLE} " + body[size // 2:]
        with open(f"{d}/f{i:04d}.txt", "w") as f:
            f.write(body)
    os.makedirs(f"{root}/bin")
    shutil.copy2(HSM, f"{root}/bin/hsm")


def write_manifests(root, work):
    """The trees' manifests, kept outside them (an S3 listing would list them as objects)."""
    for tree in ("big", "small", "bin"):
        with open(f"{work}/manifest-{tree}.jsonl", "w") as f:
            subprocess.run([HSM, "manifest", f"{root}/{tree}"], stdout=f, stderr=subprocess.DEVNULL,
                           check=True)


def upload(src, root, work):
    """PUT every file of `root` to the S3 server under its own path (the server then keeps each
    object's ETag; s3s-fs hashes a whole file at every GET of one it was not given by a PUT)."""
    rels = [os.path.relpath(os.path.join(d, n), root) for d, _, files in os.walk(root) for n in files]
    cfg = os.path.join(work, "upload.cfg")
    with open(cfg, "w") as f:
        for i, rel in enumerate(rels):
            if i:
                f.write("next\n")
            f.write("\n".join(["silent", "show-error", "fail", f'url = "{src.object_url(rel)}"',
                               f'upload-file = "{os.path.join(root, rel)}"', *src.curl_auth]) + "\n")
    sh(["curl", "--parallel", "--parallel-max", "16", "-K", cfg])


def small_paths(root):
    out = []
    for d, _, files in sorted(os.walk(f"{root}/small")):
        for name in sorted(files):
            if name.endswith(".txt"):
                out.append(os.path.relpath(os.path.join(d, name), root))
    return out


class Source:
    """One server behind its link: how hsm reaches it and how curl asks for an object."""

    def __init__(self, kind, base, populate_args, env, curl_auth):
        self.kind, self.base, self.populate_args, self.env, self.curl_auth = (
            kind, base, populate_args, env, curl_auth)

    def hsm_url(self, tree):
        return f"s3://{BUCKET}/{tree}/" if self.kind == "s3" else f"{self.base}/{tree}/"

    def object_url(self, rel):
        return f"{self.base}/{BUCKET}/{rel}" if self.kind == "s3" else f"{self.base}/{rel}"


def start_link(to_port, a, logs, name):
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "wanlink.py"), "--to", str(to_port),
         "--delay-ms", str(a.delay_ms), "--rate-mbytes", str(a.rate_mbytes)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=open(f"{logs}/{name}.log", "w"),
        text=True, start_new_session=True,
    )
    CLEANUP.push(f"stop wanlink {p.pid}", lambda: (kill_pid(p.pid, "wanlink"), p.wait()))
    line = p.stdout.readline().split()
    if len(line) != 2 or line[0] != "listening":
        raise SystemExit(f"wanlink.py did not start: {line}")
    return int(line[1])


def make_certificate(work):
    """A throw-away CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key) paths."""
    d = os.path.join(work, "pki")
    os.makedirs(d)
    sh(["bash", "-c", f"""set -e; cd {d}
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \\
          -subj /CN=hsm-bench-ca 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem \\
          -days 2 -extfile ext 2>/dev/null"""])
    return tuple(os.path.join(d, n) for n in ("ca.pem", "srv.pem", "srv.key"))


def start_nginx(work, root, logs, tls=None):
    """nginx serving `root`; with `tls` (cert, key), over TLS offering HTTP/2."""
    d = os.path.join(work, "nginx-tls" if tls else "nginx")
    os.makedirs(os.path.join(d, "tmp"))
    port = free_port()
    listen = f"listen 127.0.0.1:{port}"
    if tls:
        listen += f" ssl http2; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}"
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream;
  server {{ {listen}; root {root}; http2_max_concurrent_streams 1000; }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = spawn([nginx, "-c", conf, "-p", d], "nginx", f"{logs}/{os.path.basename(d)}.log")
    wait_port(port, "nginx", p)
    return port


def start_s3s(srcfs, work, logs):
    """s3s-fs on `srcfs` (a bucket per directory), with TCP_NODELAY on its connections
    (bench/nodelay.c: without it every answer waits 25-50 ms for a delayed ACK)."""
    shim = os.path.join(work, "nodelay.so")
    sh(["gcc", "-shared", "-fPIC", "-O2", "-o", shim, os.path.join(HERE, "nodelay.c"), "-ldl"])
    port = free_port()
    p = spawn([s3s_binary(), "--host", "127.0.0.1", "--port", str(port), "--access-key", KEY,
               "--secret-key", SECRET, srcfs], "s3s-fs", f"{logs}/s3s-fs.log",
              env=dict(os.environ, LD_PRELOAD=shim))
    wait_port(port, "s3s-fs", p)
    return port


# ---- measuring ---------------------------------------------------------------------------------


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return dt, r.stdout


def curl_config(src, rels, ranges=None):
    """A curl config asking for each of `rels` (with `ranges`, one range each), bodies dropped."""
    lines = []
    for i, rel in enumerate(rels):
        if i:
            lines.append("next")
        lines += ["silent", "fail", f'url = "{src.object_url(rel)}"', 'output = "/dev/null"']
        lines += src.curl_auth
        if ranges:
            lines.append(f'range = "{ranges[i][0]}-{ranges[i][1] - 1}"')
    return "\n".join(lines) + "\n"


def bench_offsets(size, count, seed):
    """The offsets `benchio rand` reads (its xorshift64*), for the plain client's same ranges."""
    mask = (1 << 64) - 1
    state, pages, out = seed or 1, size // 4096, []
    for _ in range(count):
        x = state
        x ^= x >> 12
        x ^= (x << 25) & mask
        x ^= x >> 27
        state = x
        out.append(((x * 0x2545F4914F6CDD1D) & mask) % pages * 4096)
    return out


class Daemon:
    def __init__(self, store, mnt, env, logpath):
        errf = open(logpath, "w")
        extra = os.environ.get("HSM_SERVE_ARGS", "").split()
        p = subprocess.Popen([HSM, "serve", store, mnt, "--drain", "0.2", *extra], stdout=subprocess.PIPE,
                             stderr=errf, env=env, start_new_session=True)
        errf.close()
        self.d = bench.Daemon(p, store, mnt, logpath, HSM, "fanotify")
        self.d.undo = CLEANUP.push(f"stop hsm serve {p.pid}", self.d.stop)
        self.d.wait_ready()

    def stop(self):
        self.d.stop()
        self.d.stop_and_forget()
        return self.d.metrics() or {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (default 3)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--rate-mbytes", type=float, default=125.0, help="MB/s each way (default 125)")
    ap.add_argument("--big-mib", type=int, default=256, help="size of the sequential file (256)")
    ap.add_argument("--rand-reads", type=int, default=200, help="random 4 KiB reads (200)")
    ap.add_argument("--only", default="", help="comma list of sources (http,https,s3) and rows")
    ap.add_argument("--json", help="also write every measurement to this file")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mounts, fanotify, drop_caches)")
    if not os.path.exists(HSM):
        raise SystemExit(f"{HSM} missing: cargo build --release")
    only = {x for x in a.only.split(",") if x}
    sources = [s for s in ("http", "https", "s3") if not only & {"http", "https", "s3"} or s in only]
    rows = [r for r in TARGETS if not only & set(TARGETS) or r in only]
    ensure_packages()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, bench.on_signal)
    work = tempfile.mkdtemp(prefix="hsm-wan-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    CLEANUP.push("remove the work dir", lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        results = run(a, work, sources, rows)
    except BaseException:
        # The daemons' and servers' logs outlive a failed run.
        kept = work + "-logs"
        shutil.copytree(os.path.join(work, "logs"), kept, dirs_exist_ok=True)
        log(f"failed; logs kept in {kept}")
        raise
    finally:
        CLEANUP.run_all()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


def run(a, work, sources, rows):
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    benchio = os.path.join(work, "benchio")
    sh(["gcc", "-O2", "-o", benchio, os.path.join(HERE, "benchio.c")])
    srcfs, _ = make_loop_fs(work, "src", 2, ["mkfs.xfs", "-q", "-f"])
    benchfs, _ = make_loop_fs(work, "bench", 2, ["mkfs.xfs", "-q", "-f"])
    root = os.path.join(srcfs, BUCKET)
    log("writing the sources")
    gen_sources(root, a.big_mib)
    rels = small_paths(root)
    big_size = os.path.getsize(f"{root}/big/data.bin")
    offsets = bench_offsets(big_size, a.rand_reads, SEED)

    srcs = {}
    if "s3" in sources:
        s3_port = start_s3s(srcfs, work, logs)
        env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}
        # curl 7.88 signs no payload hash of its own: the server requires the header.
        auth = [f'user = "{KEY}:{SECRET}"', f'aws-sigv4 = "aws:amz:{REGION}:s3"',
                'header = "x-amz-content-sha256: UNSIGNED-PAYLOAD"']
        log("uploading the sources to s3s-fs")
        upload(Source("s3", f"http://127.0.0.1:{s3_port}", [], env, auth), root, work)
        port = start_link(s3_port, a, logs, "link-s3")
        endpoint = f"http://127.0.0.1:{port}"
        srcs["s3"] = Source("s3", endpoint, ["--endpoint", endpoint, "--region", REGION], env, auth)
    # After the upload, which rewrote the files (times, and modes 0644): the manifests record
    # the times, and the binary's mode is given back.
    os.chmod(f"{root}/bin/hsm", 0o755)
    write_manifests(root, work)
    if "http" in sources:
        port = start_link(start_nginx(work, root, logs), a, logs, "link-http")
        srcs["http"] = Source("http", f"http://127.0.0.1:{port}", [], {}, [])
    if "https" in sources:
        ca, cert, key = make_certificate(work)
        port = start_link(start_nginx(work, root, logs, (cert, key)), a, logs, "link-https")
        srcs["https"] = Source("https", f"https://127.0.0.1:{port}", [], {"SSL_CERT_FILE": ca},
                               [f'cacert = "{ca}"', "http2"])

    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    results = {}

    def hsm_cold(src, tree, tag, body):
        store = os.path.join(benchfs, "store")
        shutil.rmtree(store, ignore_errors=True)
        env = dict(os.environ, **src.env)
        extra = list(src.populate_args)
        if src.kind != "s3" or tree == "bin":
            extra += ["--manifest", f"{work}/manifest-{tree}.jsonl"]
        with open(f"{logs}/populate-{tag}.log", "w") as f:
            subprocess.run([HSM, "populate", src.hsm_url(tree), store, *extra], stdout=f, stderr=f,
                           env=env, check=True, stdin=subprocess.DEVNULL)
        d = Daemon(store, mnt, env, f"{logs}/serve-{tag}.log")
        try:
            drop_caches()
            dt = body(mnt)
        finally:
            m = d.stop()
        return dt, m

    def plain(src, tree_rels, ranges=None, parallel=False):
        cfg = os.path.join(work, "curl.cfg")
        with open(cfg, "w") as f:
            f.write(curl_config(src, tree_rels, ranges))
        cmd = ["curl", "-K", cfg]
        if parallel:
            cmd[1:1] = ["--parallel", "--parallel-max", "16"]
        drop_caches()
        dt, _ = timed(cmd)
        return dt

    def row_hsm(row):
        if row == "seq":
            return "big", lambda m: float(timed([benchio, "seq", f"{m}/data.bin"])[1].split()[0])
        if row == "rand":
            cmd = lambda m: [benchio, "rand", f"{m}/data.bin", str(a.rand_reads), str(SEED)]  # noqa
            return "big", lambda m: float(timed(cmd(m))[1].split()[0])
        if row == "tar":
            return "small", lambda m: timed(["bash", "-c", f"set -o pipefail; tar -cf - -C {m} . | wc -c"])[0]
        if row == "grep":
            # 1% of the files hold the needle: grep finds matches (exit status 0).
            return "small", lambda m: timed(["bash", "-c", f"set -o pipefail; grep -r {NEEDLE} {m} | wc -l"])[0]
        return "bin", lambda m: float(timed([benchio, "firstout", f"{m}/hsm", "--version"])[1].split()[0])

    def row_plain(src, row):
        if row == "seq":
            return plain(src, ["big/data.bin"])
        if row == "rand":
            return plain(src, ["big/data.bin"] * len(offsets), [(o, o + 4096) for o in offsets])
        if row in ("tar", "grep"):
            return plain(src, rels, parallel=True)
        return plain(src, ["bin/hsm"])

    for kind in sources:
        src = srcs[kind]
        for row in rows:
            tree, body = row_hsm(row)
            cell = results.setdefault(f"{kind} {row}", {"hsm": [], "plain": [], "fetched": []})
            for i in range(a.runs):
                t_plain = row_plain(src, row)
                t_hsm, m = hsm_cold(src, tree, f"{kind}-{row}-{i}", body)
                cell["plain"].append(t_plain)
                cell["hsm"].append(t_hsm)
                cell["fetched"].append(m.get("fetched_bytes", 0))
                log(f"{kind} {row} run {i + 1}: hsm cold {t_hsm:.3f} s "
                    f"({m.get('fetched_bytes', 0) / 1e6:.1f} MB fetched, "
                    f"{m.get('prefetched_files', 0)} files ahead of the reader, "
                    f"{m.get('events_open', 0)} cold opens), plain {t_plain:.3f} s")
    report(a, results)
    return results


def report(a, results):
    print(f"\nhsm cold over a link of {a.delay_ms:g} ms each way ({2 * a.delay_ms:g} ms round trip), "
          f"{a.rate_mbytes:g} MB/s each direction; medians of {a.runs} runs, spread (min-max) in "
          "brackets; page cache dropped before each run\n")
    hdr = ["row", "hsm cold (s)", "plain client (s)", "ratio", "target", "result"]
    out = []
    for name, c in results.items():
        h, p = statistics.median(c["hsm"]), statistics.median(c["plain"])
        ratio = h / p if p else float("inf")
        worst = max(c["hsm"]) / min(c["plain"]) if min(c["plain"]) else float("inf")
        best = min(c["hsm"]) / max(c["plain"]) if max(c["plain"]) else float("inf")
        target = TARGETS[name.split()[1]]
        verdict = "met" if ratio <= target else "missed"
        out.append([name, f"{h:.3f} [{min(c['hsm']):.3f}-{max(c['hsm']):.3f}]",
                    f"{p:.3f} [{min(c['plain']):.3f}-{max(c['plain']):.3f}]",
                    f"{ratio:.2f}x [{best:.2f}-{worst:.2f}]", f"<= {target:.2f}x", verdict])
    for line in bench.md_table(hdr, out):
        print(line)
    print("\nplain client: seq, exec: one curl of the object; rand: the same ranges, one at a time on "
          "one connection; tar, grep: curl --parallel --parallel-max 16 of the 2,000 files.")


if __name__ == "__main__":
    main()
