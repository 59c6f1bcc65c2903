#!/usr/bin/env python3
"""Soak test for `lcm serve`: N clients for T seconds on loopback, mixing good, expensive and
malformed requests with clients that hang up early, against the default models (tiny and
tiny-motion). Reports status counts, 5xx (must be 0), p50/p99 latency of good requests, the
slowest expensive request against the deadline, and the server's RSS over time.

    python3 scripts/soak.py --lcm target/release/lcm --clients 32 --seconds 600 \
        --out docs/bench-results/soak.json

Standard library only.
"""

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from bench_serve import percentile  # this folder: the load benchmark's percentile

GOOD = [
    ("/v1/images/generations", {"prompt": "a small red triangle on a blue background"}),
    ("/v1/images/generations", {"prompt": "a yellow star on black", "n": 2, "steps": 2}),
    ("/sdapi/v1/txt2img", {"prompt": "a red circle on blue", "steps": 4}),
    ("/v1/motions/generations", {"prompt": "a person walks forward", "seconds": 2}),
    ("/v1/motions/generations", {"prompt": "a person walks backward", "seconds": 4, "format": "bvh"}),
]
# Within the cost cap but slow on 2 cores: must finish or get 504 by the deadline.
EXPENSIVE = [
    ("/v1/images/generations", {"prompt": "a cat", "n": 4, "size": "128x128", "steps": 20,
                                "sampler": "ddim"}),
    ("/v1/motions/generations", {"prompt": "a person walks", "seconds": 60, "n": 4, "steps": 8}),
]
# Over the cost cap: must be refused at once with 400.
OVER_CAP = [
    ("/v1/images/generations", {"prompt": "a", "n": 10, "size": "256x256", "steps": 50,
                                "sampler": "ddim", "guidance_scale": 30, "negative_prompt": "b"}),
]
MALFORMED = [
    ("/v1/images/generations", b"{not json"),
    ("/v1/images/generations", b'{"prompt": "x", "n": 0}'),
    ("/v1/images/generations", b'{"prompt": "x", "size": "33x9"}'),
    ("/v1/motions/generations", b'{"prompt": "", "seconds": 2}'),
    ("/v1/motions/generations", b'{"prompt": "x", "seconds": 1e9}'),
    ("/v1/motions/generations", b'{"prompt": "x", "format": "fbx"}'),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": "NaN"}'),
    ("/v1/images/generations", b'{"prompt": "x"} trailing'),
    ("/nope", b"{}"),
]


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def post(base, path, body, timeout):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.monotonic() - t
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.monotonic() - t
    except Exception:
        return "error", time.monotonic() - t


def hang_up(host, port, path, body):
    """Send a request and close the connection without reading the answer."""
    data = json.dumps(body).encode()
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
                  .encode() + data)
        time.sleep(random.uniform(0.01, 0.3))
        s.close()
    except OSError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lcm", default="target/release/lcm")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--timeout-s", type=float, default=10, help="the server's request deadline")
    ap.add_argument("--out")
    args = ap.parse_args()

    proc = subprocess.Popen([args.lcm, "serve", "--addr", "127.0.0.1:0",
                             "--timeout-s", str(args.timeout_s)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"lcm serve did not start: {line!r}")
    hostport = line.split("http://")[1].split()[0]
    host, port = hostport.rsplit(":", 1)
    base = f"http://{hostport}"
    rss = [(0.0, rss_mb(proc.pid))]
    results = []  # (kind, status, seconds)
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + args.seconds

    def client(i):
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            r = rng.random()
            if r < 0.55:
                path, body = rng.choice(GOOD)
                body = dict(body, seed=rng.randrange(2**32))
                kind = "good"
            elif r < 0.65:
                path, body = rng.choice(EXPENSIVE)
                kind = "expensive"
            elif r < 0.70:
                path, body = rng.choice(OVER_CAP)
                kind = "over_cap"
            elif r < 0.90:
                path, body = rng.choice(MALFORMED)
                kind = "malformed"
            else:
                path, body = rng.choice(GOOD + EXPENSIVE)
                hang_up(host, int(port), path, body)
                with lock:
                    results.append(("hang_up", "sent", 0.0))
                continue
            status, secs = post(base, path, body, timeout=args.timeout_s + 60)
            with lock:
                results.append((kind, status, secs))
            if status == 429:
                time.sleep(rng.uniform(0.2, 1.0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(args.clients)]
    for th in threads:
        th.start()
    while time.monotonic() < stop_at:
        time.sleep(min(30, max(0.0, stop_at - time.monotonic())))
        rss.append((round(time.monotonic() - t0), rss_mb(proc.pid)))
    for th in threads:
        th.join(timeout=args.timeout_s + 90)
    metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)

    def by(kind):
        return [(s, t) for k, s, t in results if k == kind]

    counts = {}
    for k, s, _ in results:
        counts.setdefault(k, {}).setdefault(str(s), 0)
        counts[k][str(s)] += 1
    fivexx = sum(n for k in counts.values() for s, n in k.items()
                 if s.isdigit() and int(s) >= 500)
    good_ok = sorted(t for s, t in by("good") if s == 200)
    expensive = by("expensive")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clients": args.clients,
        "seconds": args.seconds,
        "timeout_s": args.timeout_s,
        "requests": len(results),
        "counts": counts,
        "5xx": fivexx,
        "connection_errors": sum(1 for _, s, _ in results if s == "error"),
        "good_p50_s": percentile(good_ok, 0.5),
        "good_p99_s": percentile(good_ok, 0.99),
        "expensive_slowest_s": max((t for _, t in expensive), default=None),
        "expensive_over_deadline": sum(1 for _, t in expensive if t > args.timeout_s + 5),
        "over_cap_slowest_s": max((t for _, t in by("over_cap")), default=None),
        "rss_mb": rss,
        "jobs_cancelled": sum(float(l.split()[-1]) for l in metrics.splitlines()
                              if l.startswith("lcm_jobs_dropped_total")
                              and 'reason="cancelled"' in l),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
