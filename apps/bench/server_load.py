"""Bounded load test of `edgeinfer serve` on loopback: N concurrent clients × M
requests each (mixed streaming / non-streaming chat), then a report of status
codes, latency, throughput and the server's memory before and after.

    .venv/bin/python apps/bench/server_load.py --package build/bench/smollm2-int4 --clients 8 --requests 50
    .venv/bin/python apps/bench/server_load.py --clients 8 --requests 60 --parallel 4   # continuous batching

Only 127.0.0.1 is ever contacted; the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(ROOT / "build" / "bench" / "smollm2-int4"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=6)
    ap.add_argument("--parallel", type=int, default=1, help="requests decoded together (serve --parallel)")
    args = ap.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "edgeinfer"), "serve", args.package, "--port", str(port),
                             "--max-queue", str(args.max_queue), "--parallel", str(args.parallel)],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rss_start = rss_mb(proc.pid)
        codes: Counter = Counter()
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                for j in range(args.requests):
                    body = {"messages": [{"role": "user", "content": f"Say something about the number {i * 100 + j}."}],
                            "max_tokens": args.max_tokens, "temperature": 0.7, "seed": j, "stream": bool(j % 2)}
                    t = time.perf_counter()
                    try:
                        if body["stream"]:
                            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                                data = [line for line in r.iter_lines() if line]
                                code = r.status_code
                                if code == 200 and data[-1] != "data: [DONE]":
                                    raise RuntimeError("stream did not end with [DONE]")
                        else:
                            r = c.post(url + "/v1/chat/completions", json=body)
                            code = r.status_code
                            if code == 200:
                                r.json()["choices"][0]["message"]["content"]
                    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                        continue
                    with lock:
                        codes[code] += 1
                        if code == 200:
                            latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []  # (seconds, server RSS MB) while the load runs
        while any(t.is_alive() for t in threads):
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_end = rss_mb(proc.pid)
        health = httpx.get(url + "/health").json()
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    lat = sorted(latencies)
    report = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "max_queue": args.max_queue, "parallel": args.parallel, "status_codes": dict(codes),
        "client_errors": errors[:5],
        "client_error_count": len(errors), "wall_s": wall, "ok_per_s": codes[200] / wall,
        "latency_ok_s": {"p50": lat[len(lat) // 2], "p95": lat[int(len(lat) * 0.95)], "max": lat[-1]} if lat else {},
        "server_rss_mb": {"start": rss_start, "end": rss_end, "max": max(r for _, r in samples),
                          "first_half_max": max(r for s, r in samples if s <= wall / 2),
                          "second_half_max": max(r for s, r in samples if s > wall / 2)},
        "server_alive": alive, "server_health": health,
    }
    print(json.dumps(report, indent=1))
    ok = alive and not errors and set(codes) <= {200, 429}
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
