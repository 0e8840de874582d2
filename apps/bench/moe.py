"""Sparse-MoE benchmark: decode speed under expert-memory budgets, with reads that hit the disk.

    python apps/bench/moe.py all          # build the models if needed, measure, write docs/moe.md
    python apps/bench/moe.py all --quick  # 100/50/25% budgets, one round, 12 tokens (2.6 min measured)
    python apps/bench/moe.py build --model random-int8  # only export one package
    python apps/bench/moe.py ffn-options  # how to run an expert from cached weights: the options, timed

The model is a Qwen3-MoE-shaped decoder with random weights, built from a config
without transformers (a lazy state dict generates each tensor when the exporter
asks for it, so the fp32 experts never sit in memory together): 24 layers x 48
experts, top-4, int4 experts of ~1.5 MB; ~1.7 GB of expert store. Random routers
route near-uniformly: the worst case for a cache. Each model comes twice: int4
experts (``random``, ``moefied``: a prepacked session per loaded expert) and
int8-channel experts (``random-int8``, ``moefied-int8``: ``--expert-bits 8``, fed to
one shared graph), everything else equal. The MoEfied model needs SmolLM2-135M's
transformers folder in build/smollm2-hf.

Every configuration runs in its own process (so peak RSS is its own), after the
page cache is dropped, with experts read through O_DIRECT: every miss is a real
disk read. Tokens are a fixed random sequence fed one at a time (a random model
decoding greedily would repeat itself and flatter the cache).
"""

# This script parses the arguments and orders the runs; the parts live in apps/bench/moe_bench/
# (models, weights and k-means, disk, one decode run, FFN micro-benchmarks, Markdown).

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from moe_bench.decode import run_one
from moe_bench.disk import disk_bandwidth, drop_page_cache
from moe_bench.markdown import write_doc
from moe_bench.micro import ffn_options
from moe_bench.models import CONFIG, MODELS, OUT, PKG
from moe_bench.weights import build_model, build_moefied


def _subprocess_run(model: str, mode: str, frac: float, tokens: int, warmup: int, threads: int | None) -> dict:
    dropped = drop_page_cache()
    cmd = [sys.executable, __file__, "run-one", "--model", model, "--mode", mode, "--frac", str(frac),
           "--tokens", str(tokens), "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {frac}: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["page_cache_dropped"] = dropped
    print(f"  {mode:9s} {frac:4.0%}: {out['tok_s']:6.2f} tok/s, hit rate {out['stats']['hit_rate']}, "
          f"read {out['stats']['bytes_read_per_token'] / 1e6:.1f} MB/token, wait {out['stats']['wait_s']:.2f} s, "
          f"accuracy {out['stats']['prefetch_accuracy']}, peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
    return out


def bench_configs(model: str, mode: str) -> list[tuple[str, float, int | None]]:
    """(experts mode, budget fraction, compute threads) to run. MODE: quick (the issue's 100/50/25%
    budgets), default (+75%), full (+90% and read-and-build-ahead, for int4 experts: int8-channel ones
    have nothing to build)."""
    # Streaming configurations compute on one thread: loading an expert is CPU work and on 2 cores a
    # second spinning compute thread takes the core the loads need (measured: docs/moe.md, "compute
    # threads"); all-resident keeps every core.
    streaming = max(1, (os.cpu_count() or 2) - 1)
    configs = [("resident", 1.0, None)]
    for frac in (0.9, 0.75, 0.5, 0.25):
        configs += [("prefetch", frac, streaming), ("naive", frac, streaming)]
    keep = (1.0, 0.5, 0.25) if mode == "quick" else (1.0, 0.9, 0.75, 0.5, 0.25) if mode == "full" else (
        1.0, 0.75, 0.5, 0.25)
    return [c for c in configs if c[1] in keep]


def measure_all(models: list[str], tokens: int, warmup: int, repeats: int, mode: str = "default") -> None:
    """Every configuration of every model once per round, rounds interleaved, each run its own
    process after the page cache is dropped; writes results-<model>.json."""
    OUT.mkdir(parents=True, exist_ok=True)
    loadavg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    disks, runs = {}, {m: [] for m in models}
    for model in models:
        pkg = MODELS[model]
        if not (pkg / "edgeinfer.json").is_file():
            build_model(model)
        drop_page_cache()
        bw = disks[model] = disk_bandwidth(pkg)
        print(f"{model} disk: {bw['gb_s']:.2f} GB/s, {bw['ms_per_read']:.2f} ms per {bw['read_bytes'] / 1e6:.2f} MB "
              "O_DIRECT read")
    for r in range(repeats):
        print(f"round {r + 1}/{repeats}")
        for model in models:
            print(f"== {model}")
            for exp_mode, frac, threads in bench_configs(model, mode):
                runs[model].append(_subprocess_run(model, exp_mode, frac, tokens, warmup, threads))
            (OUT / f"runs-{model}.json").write_text(json.dumps(runs[model], indent=1))  # kept if what follows fails
    from edgeinfer.moe.budget import expert_memory

    for model in models:
        pkg = MODELS[model]
        # Measured again after the runs; the bound uses the faster of the two (other jobs on a shared
        # machine only ever slow the disk down), both are kept.
        drop_page_cache()
        after = disk_bandwidth(pkg)
        before = disks[model]
        disks[model] = dict(max(before, after, key=lambda d: d["gb_s"]), before=before["gb_s"], after=after["gb_s"])
        manifest = json.loads((pkg / "edgeinfer.json").read_text())
        options = None
        if model == "random":
            print("expert FFN options")
            options = ffn_options(pkg)
        store = manifest["moe"]["expert_store"]
        result = {"model": model, "expert_format": store["precision"], "expert_memory": expert_memory(store),
                  "loadavg": loadavg, "config": CONFIG if model.startswith("random") else manifest["moe"],
                  "expert_store_bytes": store["total_bytes"], "record_bytes": store["record_size"],
                  "disk": disks[model], "runs": runs[model], "ffn_options": options, "cpu_count": os.cpu_count(),
                  "tokens": tokens, "warmup": warmup}
        (OUT / f"results-{model}.json").write_text(json.dumps(result, indent=1))


def _load_results() -> dict[str, dict]:
    files = {m: OUT / f"results-{m}.json" for m in MODELS}
    return {m: json.loads(f.read_text()) for m, f in files.items() if f.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["all", "build", "build-moefied", "run-one", "ffn-options", "doc"])
    ap.add_argument("--model", default="random", choices=list(MODELS))
    ap.add_argument("--models", default="random,random-int8,moefied,moefied-int8",
                    help="for 'all': which models to measure")
    ap.add_argument("--quick", action="store_true", help="for 'all': 100/50/25%% budgets only, one round, "
                    "12 tokens")
    ap.add_argument("--full", action="store_true", help="for 'all': also the 90%% budget and, for int4 experts, "
                    "building ahead in the reader")
    ap.add_argument("--no-doc", action="store_true",
                    help="for 'all': leave docs/moe.md alone (the benchmark report reads results-*.json)")
    ap.add_argument("--mode", default="prefetch", choices=["resident", "prefetch", "naive", "serial"])
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--readers", type=int, default=3, help="reader threads (prefetch, naive)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.command == "build":  # --model picks which (default: the random int4 one)
        build_model(args.model)
    elif args.command == "build-moefied":
        build_moefied()
    elif args.command == "run-one":
        print(json.dumps(run_one(MODELS[args.model], args.mode, args.frac, args.tokens, args.warmup,
                                 text=args.model.startswith("moefied"), readers=args.readers, threads=args.threads)))
    elif args.command == "ffn-options":
        print(json.dumps(ffn_options(PKG), indent=1))
    elif args.command == "doc":
        write_doc(_load_results())
    else:
        if args.quick:
            args.repeats, args.tokens, args.warmup = 1, min(args.tokens, 12), min(args.warmup, 8)
        measure_all(args.models.split(","), args.tokens, args.warmup, args.repeats,
                    "quick" if args.quick else "full" if args.full else "default")
        if not args.no_doc:
            write_doc(_load_results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
