"""Where batching's gain goes: the kernel's ceiling, the engine in process, and (batching.py) the server.

    .venv/bin/python apps/bench/batching_ceiling.py --rows 1,2,4 --rounds 3

1. Kernel ceiling: one batched step of the package's graphs over N rows (SlotCaches.step, every
   row at the same context), timed alone: N rows per step give at most N × t(1) / t(N) times the
   tokens/s of one row. Nothing else (sampling, threads, HTTP) is in it.
2. Engine in process: N threads each ``complete`` a prompt (greedy, EOS ignored) on one model
   loaded with ``parallel=N``, all started together, after a warm-up round: aggregate tokens/s
   against one thread on the same model. Sampling, the decode loops and the prompt prefills are in
   it; HTTP is not.

The rounds interleave the row counts; medians. What the server adds on top (HTTP, SSE, each new
request's prefill stalling the running streams) is apps/bench/batching.py's figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import edgeinfer
from edgeinfer.batching.slots import SlotCaches

sys.path.insert(0, str(Path(__file__).parent))
from batching import PROMPTS  # noqa: E402  (the server benchmark's prompts)


def step_ms(caches: SlotCaches, rows: int, context: int, steps: int) -> float:
    """Median wall time of one batched step over ROWS rows, each at CONTEXT tokens."""
    times = []
    for k in range(steps):
        caches.lengths[:rows] = context
        t = time.perf_counter()
        caches.step({s: 100 + k for s in range(rows)})
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def engine_tok_s(model, rows: int, new_tokens: int) -> float:
    """Aggregate tokens/s of ROWS threads completing together on MODEL (loaded with parallel >= ROWS)."""
    def run(prompt):
        model.complete(prompt, max_new_tokens=new_tokens, ignore_eos=True, temperature=0)

    threads = [threading.Thread(target=run, args=(PROMPTS[i % len(PROMPTS)],)) for i in range(rows)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return rows * new_tokens / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="smollm2-135m", help="edgeinfer package or alias")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=32, help="tokens in each row's cache for the kernel timing")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per row count and round")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    model = edgeinfer.load(args.package, threads=args.threads, parallel=max(rows))
    caches = SlotCaches(model.decoder, max(rows))  # its own buffers: the model's engine keeps its slots
    kernel: dict = {n: [] for n in rows}
    engine: dict = {n: [] for n in rows}
    for n in rows:  # warm-up: first runs of each shape
        step_ms(caches, n, args.context, 3)
        engine_tok_s(model, n, 8)
    for rnd in range(args.rounds):
        for n in (rows if rnd % 2 == 0 else rows[::-1]):
            kernel[n].append(step_ms(caches, n, args.context, args.steps))
            engine[n].append(engine_tok_s(model, n, args.new_tokens))
        print(f"round {rnd + 1}: step ms " + ", ".join(f"{n}: {kernel[n][-1]:.2f}" for n in rows)
              + "; engine tok/s " + ", ".join(f"{n}: {engine[n][-1]:.1f}" for n in rows), file=sys.stderr, flush=True)
    med = statistics.median
    base_ms, base_tok_s = med(kernel[rows[0]]), med(engine[rows[0]])
    rep = {"package": args.package, "threads": args.threads, "rounds": args.rounds, "context": args.context,
           "new_tokens": args.new_tokens, "rows": {}}
    print(f"| rows | step ms | kernel ceiling (× {rows[0]} row) | engine tok/s in process | engine × {rows[0]} row |")
    print("|---|---|---|---|---|")
    for n in rows:
        ceiling = n * base_ms / med(kernel[n]) / rows[0]
        scaling = med(engine[n]) / base_tok_s
        rep["rows"][n] = {"step_ms": med(kernel[n]), "ceiling": ceiling, "engine_tok_s": med(engine[n]),
                          "engine_scaling": scaling}
        print(f"| {n} | {med(kernel[n]):.2f} | {ceiling:.2f}× | {med(engine[n]):.1f} | {scaling:.2f}× |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
