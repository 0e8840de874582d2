"""Quality of the Qwen2.5-Coder pair's packages against llama.cpp on the same GGUF files: the quality every
big/little speed figure in docs/big-little.md is stated at.

    .venv/bin/python apps/bench/pair_quality.py                 # both models, 12 windows of 256 tokens
    .venv/bin/python apps/bench/pair_quality.py --windows 4     # quicker

apps/bench/quality.py's code (edgeinfer.perplexity's scoring, llama-cpp-python fed the same token ids from
the peer venv, the Lee corpus from gensim 4.4.0's wheel), applied to the default packages of
``qwen2.5-coder-1.5b`` and ``-0.5b`` (the GGUF's own blocks) and the 0.5B re-quantized to int4 (the faster
drafter), with the pair's questions (apps/bench/pair_questions.py: general and code). Top-1 agreement is
with the model's default package; there is no fp32 package here (6 GB for the 1.5B). Writes
build/bench/pair_quality.json and docs/big-little-quality.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pair_questions  # noqa: E402
import quality  # noqa: E402

BUILD = ROOT / "build" / "bench"


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def versions() -> dict:
    import importlib.metadata

    out = {}
    for dist in ("edgeinfer", "onnxruntime", "numpy", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "big-little-quality.md")
    args = ap.parse_args(argv)
    from edgeinfer.export.sources.aliases import ALIASES, resolve_alias

    from edgeinfer.package_cache import resolve_model

    quality.QUESTIONS = pair_questions.QUESTIONS  # the pair's questions, general and code
    text, source = quality.evaluation_text()
    t0 = time.perf_counter()
    rep = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python apps/bench/pair_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                       "loadavg": f"{os.getloadavg()[0]:.2f}"},
           "threads": args.threads, "context": args.context, "versions": {}, "text": source, "models": {}}
    for alias in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        packages = {"source": resolve_model(alias)}
        if alias.endswith("0.5b"):
            int4 = BUILD / "qwen2.5-coder-0.5b-int4"
            if (int4 / "edgeinfer.json").exists():
                packages["int4"] = int4
        gguf = resolve_alias(alias)
        res = quality.evaluate_packages(packages, text, args.windows, args.context, args.threads, True,
                                        reference="source", llamacpp=gguf)
        res.update({"description": ALIASES[alias].description, "gguf": Path(gguf).name, "refused": {}})
        rep["models"][alias] = res
    rep["total_s"] = time.perf_counter() - t0
    rep["versions"] = versions()
    BUILD.mkdir(parents=True, exist_ok=True)
    (BUILD / "pair_quality.json").write_text(json.dumps(rep, indent=1))
    section = quality.markdown(rep).replace("top-1 agreement with fp32", "top-1 agreement with the default package")
    args.out.write_text("# Qwen2.5-Coder pair: quality against llama.cpp\n\n" + section)
    print(f"wrote {args.out} in {rep['total_s'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
