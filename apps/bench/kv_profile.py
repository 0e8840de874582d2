"""Where a long-context decode step goes, by operator: onnxruntime's profiler on a prompt and decode steps.

    .venv/bin/python apps/bench/kv_profile.py build/bench/smollm2-kv-fp32 build/bench/smollm2-kv-int8

For each package (apps/bench/kv_dtype.py exports them): prefill PROMPT tokens of the synthetic prompt
apps/bench/kv_dtype.py uses, then STEPS one-token steps, with profiling on; prints the prefill's and the mean
decode step's milliseconds in GroupQueryAttention and MatMulNBits, and GroupQueryAttention's median per layer
and step, in the package's first graph (a kv_dtype.py package has one). Profiling adds a little to every
kernel alike: compare packages, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import onnxruntime as ort

OPS = ("GroupQueryAttention", "MatMulNBits")


def profile(package: str, prompt: int, steps: int, threads: int) -> dict:
    import edgeinfer
    from edgeinfer.bench import synthetic_prompt

    made = ort.InferenceSession

    class Profiled(made):  # every session edgeinfer makes for the package, with the profiler on
        def __init__(self, path, sess_options=None, *args, **kwargs):
            sess_options = sess_options or ort.SessionOptions()
            sess_options.enable_profiling = True
            super().__init__(path, sess_options, *args, **kwargs)

    ort.InferenceSession = Profiled
    try:
        model = edgeinfer.load(package, threads=threads)
    finally:
        ort.InferenceSession = made
    ids = synthetic_prompt(model, prompt)
    model.decoder.forward(ids)
    for i in range(steps):
        model.decoder.step(ids[i % len(ids)])
    path = Path(model.decoder.stages[0].session.end_profiling())  # the first graph's (the packages have one)
    events = json.loads(path.read_text())
    path.unlink()
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs: list[dict[str, list[int]]] = [{} for _ in spans]  # per session run: op -> kernel microseconds
    for e in events:
        op = e.get("args", {}).get("op_name")
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and op in OPS:
            run = next(i for i, (start, end) in enumerate(spans) if start <= e["ts"] <= end)
            runs[run].setdefault(op, []).append(int(e["dur"]))
    prefill, decode = runs[0], runs[1:]
    return {"package": package, "prompt_tokens": len(ids), "steps": len(decode),
            "prefill_ms": {op: sum(prefill.get(op, [])) / 1000 for op in OPS},
            "step_ms": {op: statistics.mean(sum(r.get(op, [])) for r in decode) / 1000 for op in OPS},
            "attention_us_per_layer": statistics.median(d for r in decode for d in r.get(OPS[0], []))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--prompt", type=int, default=2040)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print("| package | prompt | prefill: attention / matmuls (ms) | decode step: attention / matmuls (ms) | "
          "attention per layer (µs) |\n|---|---|---|---|---|")
    for pkg in args.packages:
        r = profile(pkg, args.prompt, args.steps, args.threads)
        pre, step = r["prefill_ms"], r["step_ms"]
        print(f"| {Path(pkg).name} | {r['prompt_tokens']} | {pre[OPS[0]]:.0f} / {pre[OPS[1]]:.0f} "
              f"| {step[OPS[0]]:.2f} / {step[OPS[1]]:.2f} | {r['attention_us_per_layer']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
