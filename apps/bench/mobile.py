"""Phone-class constraints on one package: thread counts, a memory cap, a sustained
run (thermal-like: tokens/s over time), an energy proxy (CPU-seconds per token),
and the memory-bandwidth roofline.

    .venv/bin/python apps/bench/mobile.py --package packages/smollm2-135m-int4            # 10-minute sustained run
    .venv/bin/python apps/bench/mobile.py --package packages/smollm2-135m-int4 --quick    # < 1 minute
    .venv/bin/python apps/bench/mobile.py --package qwen2.5-coder-1.5b --threads 1,2 \
        --mem-cap-mb 1800,2200,2600 --sustained-s 300          # the 1.5B (docs/big-little.md)

--package takes a folder, a cached name or an alias. Every --mem-cap-mb value is one capped run (RLIMIT_AS: the
address space, which also counts what onnxruntime reserves beyond the weights), so a list brackets the
smallest cap the model runs under.

Each measurement runs in a child process (so a memory cap applies to it alone and
peak RSS is its own). Writes OUT/mobile.json and OUT/mobile-*.png (default OUT:
build/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, resource, sys, time
import edgeinfer
from edgeinfer.bench import peak_rss_mb
args = json.loads(sys.argv[1])
if args.get("mem_cap_mb"):
    cap = int(args["mem_cap_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    model = edgeinfer.load(args["package"], threads=args["threads"], max_context=args["max_context"])
    ids = model.encode([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    out = {"threads": args["threads"], "windows": []}
    t_end = time.perf_counter() + args["seconds"]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    tokens = 0
    window_start, window_tokens = time.perf_counter(), 0
    ttfts, rates = [], []
    while time.perf_counter() < t_end:
        model.reset()
        res = model.complete(ids, max_new_tokens=args["new_tokens"], ignore_eos=True)
        tokens += res.new_tokens
        window_tokens += res.new_tokens
        ttfts.append(res.ttft_s)
        rates.append(res.decode_tok_s)
        now = time.perf_counter()
        if now - window_start >= args["window_s"]:
            out["windows"].append({"t": round(now - (t_end - args["seconds"]), 2),
                                   "tok_s": window_tokens / (now - window_start)})
            window_start, window_tokens = now, 0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rates.sort(); ttfts.sort()
    out.update(ok=True, tokens=tokens, decode_tok_s_median=rates[len(rates) // 2], ttft_s_median=ttfts[len(ttfts) // 2],
               cpu_s_per_token=cpu / max(1, tokens), peak_rss_mb=peak_rss_mb())
except (MemoryError, edgeinfer.EdgeInferError, RuntimeError) as e:
    out = {"threads": args["threads"], "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}",
           "peak_rss_mb": peak_rss_mb()}
print(json.dumps(out))
"""


def child(package: str, threads: int, seconds: float, new_tokens: int, window_s: float,
          mem_cap_mb: int | None = None, max_context: int = 1024) -> dict:
    args = dict(package=package, threads=threads, seconds=seconds, new_tokens=new_tokens, window_s=window_s,
                mem_cap_mb=mem_cap_mb, max_context=max_context)
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0 or not r.stdout.strip():
        return {"threads": threads, "ok": False, "error": (r.stderr.strip().splitlines() or ["crashed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bandwidth_gbs() -> float:
    """Read bandwidth, measured as compare.py does (one method for every roofline in the report)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import memory_bandwidth_gbs

    return memory_bandwidth_gbs()


def weight_bytes(package: Path) -> int:
    m = json.loads((package / "edgeinfer.json").read_text())
    return sum(f["size"] for rel, f in m["files"].items() if rel.startswith("graphs/"))


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in report["sustained"]:
        if run.get("windows"):
            ax.plot([w["t"] for w in run["windows"]], [w["tok_s"] for w in run["windows"]],
                    label=f"{run['threads']} thread(s)")
    ax.set_xlabel("seconds of continuous decoding")
    ax.set_ylabel("tokens/s")
    ax.set_title("Sustained decode")
    ax.axhline(report["roofline_tok_s"], color="grey", ls="--", lw=0.8, label="memory roofline")
    ax.legend()
    fig.tight_layout()
    files.append(str(out / "mobile-sustained.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ok = [r for r in report["threads"] if r.get("ok")]
    ax.bar([str(r["threads"]) for r in ok], [r["decode_tok_s_median"] for r in ok])
    ax.set_xlabel("threads")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed by thread count")
    fig.tight_layout()
    files.append(str(out / "mobile-threads.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--quick", action="store_true", help="short runs: the whole script in under a minute")
    ap.add_argument("--sustained-s", type=float, default=600.0)
    ap.add_argument("--mem-cap-mb", default="1024", help="address-space cap(s) in MB, comma-separated: one capped "
                    "run each")
    ap.add_argument("--threads", default=None, help="thread counts, comma-separated (default 1,2,4 up to the cores)")
    ap.add_argument("--out", default=str(ROOT / "build" / "bench"))
    args = ap.parse_args(argv)
    from edgeinfer.package_cache import resolve_model

    pkg = resolve_model(args.package)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                     else [t for t in (1, 2, 4) if t <= cores])
    caps = [int(c) for c in str(args.mem_cap_mb).split(",")]
    short, sustained = (3.0, 10.0) if args.quick else (20.0, args.sustained_s)
    window = 2.0 if args.quick else 10.0
    report = {"package": str(pkg), "cores": cores, "date": time.strftime("%Y-%m-%d %H:%M"),
              "bandwidth_gbs": bandwidth_gbs(), "weight_bytes": weight_bytes(pkg)}
    report["roofline_tok_s"] = report["bandwidth_gbs"] * 1e9 / report["weight_bytes"]
    report["threads"] = [child(str(pkg), t, short, 32, window) for t in thread_counts]
    report["memory_caps"] = [{**child(str(pkg), max(thread_counts), short, 32, window, mem_cap_mb=c), "cap_mb": c}
                             for c in caps]
    report["memory_cap"] = report["memory_caps"][0]
    report["sustained"] = [child(str(pkg), max(thread_counts), sustained, 64, window)]
    report["plots"] = plot(report, out)
    (out / "mobile.json").write_text(json.dumps(report, indent=1))
    for r in report["threads"]:
        if r.get("ok"):
            print(f"{r['threads']} thread(s): {r['decode_tok_s_median']:.1f} tok/s, "
                  f"TTFT {1000 * r['ttft_s_median']:.0f} ms, {1000 * r['cpu_s_per_token']:.1f} CPU-ms/token, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
    for cap in report["memory_caps"]:
        print(f"under a {cap['cap_mb']} MB address-space cap: " + (
            f"ok, {cap['decode_tok_s_median']:.1f} tok/s, peak RSS {cap['peak_rss_mb']:.0f} MB" if cap.get("ok")
            else f"failed: {cap.get('error')}"))
    s = report["sustained"][0]
    if s.get("windows"):
        rates = [w["tok_s"] for w in s["windows"]]
        print(f"sustained {sustained:.0f} s: first window {rates[0]:.1f} tok/s, last {rates[-1]:.1f}, "
              f"min {min(rates):.1f}; roofline {report['roofline_tok_s']:.0f} tok/s")
    print(f"wrote {out / 'mobile.json'} and {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
