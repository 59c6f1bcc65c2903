#!/usr/bin/env python3
"""Load benchmark for `lcm serve`: N concurrent clients for T seconds on loopback.

For each --max-batch value it starts `lcm serve` (ephemeral port) with one model, lets N client
threads post requests back to back for T seconds (no new request after T; in-flight ones get
--grace seconds), then reads /metrics and stops the server with SIGTERM. Reports throughput,
p50/p99 latency of successful requests, error counts by status and the mean batch size.
--kind image posts OpenAI-style image requests; --kind motion posts /v1/motions/generations.

    python3 scripts/bench_serve.py --lcm target/release/lcm --model tests/fixtures/tiny-lcm \
        --clients 16 --seconds 30 --max-batch 1 8 --out docs/bench-results/serve_fixture.json
    python3 scripts/bench_serve.py --kind motion --model tiny-motion --seconds-per-motion 4 \
        --clients 16 --seconds 30 --max-batch 1 8 --out docs/bench-results/serve_motion.json

Standard library only.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def start_server(args, max_batch):
    # One model per server: the other kind is not loaded.
    models = (["--model", args.model, "--motion-model", "none"] if args.kind == "image"
              else ["--model", "none", "--motion-model", args.model])
    cmd = [args.lcm, "serve", *models, "--addr", "127.0.0.1:0",
           "--max-batch", str(max_batch), "--max-queue", str(args.max_queue),
           "--batch-window-ms", str(args.window_ms)]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"lcm serve did not start: {line!r}")
    addr = line.split("http://")[1].split()[0]
    return proc, f"http://{addr}"


def run_load(base, args):
    if args.kind == "image":
        route = "/v1/images/generations"
        body = {"prompt": "a photo of a cat", "steps": args.steps, "size": args.size, "n": 1}
    else:
        route = "/v1/motions/generations"
        body = {"prompt": "a person walks forward", "steps": args.steps,
                "seconds": args.seconds_per_motion, "n": 1, "format": "json"}
    results = []  # (status, seconds)
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(i):
        seed = i * 1_000_000
        while time.monotonic() < stop_at:
            seed += 1
            data = json.dumps(dict(body, seed=seed)).encode()
            req = urllib.request.Request(base + route, data=data,
                                         headers={"Content-Type": "application/json"})
            t = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=args.seconds + args.grace) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                e.read()
                status = e.code
                if status == 429:
                    # Honour Retry-After, but never beyond the run.
                    time.sleep(min(float(e.headers.get("Retry-After", "1")),
                                   max(0.0, stop_at - time.monotonic())))
            except Exception:  # connection errors, timeouts
                status = "error"
            with lock:
                results.append((status, time.monotonic() - t))

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(args.clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, stop_at + args.grace - time.monotonic()))
    wall = time.monotonic() - t0
    hung = sum(th.is_alive() for th in threads)
    return results, wall, hung


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lcm", default="target/release/lcm")
    ap.add_argument("--kind", choices=["image", "motion"], default="image")
    ap.add_argument("--model", default=None,
                    help="default: tests/fixtures/tiny-lcm (image), tiny-motion (motion)")
    ap.add_argument("--seconds-per-motion", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--grace", type=float, default=60, help="wait for in-flight requests")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--window-ms", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="32x32")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the --max-batch values this many times (a shared machine's load varies)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.model is None:
        args.model = "tests/fixtures/tiny-lcm" if args.kind == "image" else "tiny-motion"

    runs = []
    for mb in [mb for _ in range(args.rounds) for mb in args.max_batch]:
        load_before = os.getloadavg()[0]
        proc, base = start_server(args, mb)
        try:
            results, wall, hung = run_load(base, args)
            metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        ok = sorted(s for st, s in results if st == 200)
        errors = {}
        for st, _ in results:
            if st != 200:
                errors[str(st)] = errors.get(str(st), 0) + 1
        batches = metric(metrics, f'lcm_batch_size_count{{model="{args.kind}"}}')
        outputs = metric(metrics, f'lcm_batch_size_sum{{model="{args.kind}"}}')
        run = {
            "max_batch": mb,
            "requests_ok": len(ok),
            "throughput_per_s": len(ok) / wall,
            "p50_s": percentile(ok, 0.50),
            "p99_s": percentile(ok, 0.99),
            "errors": errors,
            "non_429_errors": sum(n for k, n in errors.items() if k != "429"),
            "mean_batch": outputs / batches if batches else None,
            "wall_s": wall,
            "clients_hung": hung,
            "loadavg_1m_before": load_before,
        }
        runs.append(run)
        print(json.dumps(run))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "kind": args.kind,
        "model": args.model,
        "clients": args.clients,
        "seconds": args.seconds,
        "steps": args.steps,
        "size": args.size if args.kind == "image" else None,
        "seconds_per_motion": args.seconds_per_motion if args.kind == "motion" else None,
        "window_ms": args.window_ms,
        "candle_num_threads": os.environ.get("CANDLE_NUM_THREADS", "unset (all cores)"),
        "runs": runs,
        "median_throughput_per_s": {
            str(mb): sorted(r["throughput_per_s"] for r in runs if r["max_batch"] == mb)[
                len([r for r in runs if r["max_batch"] == mb]) // 2]
            for mb in args.max_batch
        },
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
