"""Measure a package: load time, TTFT, decode tokens/s, prefill tokens/s, peak RSS.

Used by ``edgeinfer bench`` and by the side-by-side comparison in ``apps/bench``.
Decode tokens/s excludes the first token (it is TTFT's); every run generates
exactly ``new_tokens`` (EOS ignored) so runs are comparable.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import onnxruntime as ort

from . import __version__


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM on Linux: unlike ru_maxrss it
    does not inherit a parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def synthetic_prompt(model, n: int) -> list[int]:
    """A prompt of exactly N tokens cut from repeated English text."""
    text = ("The quick brown fox jumps over the lazy dog while the patient farmer counts his sheep "
            "under a pale autumn sky, and the river keeps flowing toward the distant sea. ")
    ids: list[int] = []
    while len(ids) < n:
        ids += model.tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def bench_package(path: str, prompt: str = "What is the capital of France?", chat: bool = True,
                  prompt_tokens: int | None = None, new_tokens: int = 128, repeats: int = 5, warmup: int = 1,
                  threads: int | None = None, provider: str = "auto", model=None,
                  memory_budget: int | str | None = None, allow_fallback: bool = False,
                  kv_dtype: str | None = None) -> dict:
    from . import load

    t0 = time.perf_counter()
    if model is None:
        model = load(path, provider=provider, threads=threads, memory_budget=memory_budget,
                     allow_fallback=allow_fallback, kv_dtype=kv_dtype)
    load_s = time.perf_counter() - t0
    if prompt_tokens:
        ids = synthetic_prompt(model, prompt_tokens)
    else:
        ids = model.encode([{"role": "user", "content": prompt}] if chat else prompt)
    runs = []
    for i in range(warmup + repeats):
        model.reset()  # no prefix reuse: every run pays its prefill
        res = model.complete(ids, max_new_tokens=new_tokens, ignore_eos=True)
        if i >= warmup:
            runs.append(res)
    from edgeinfer.runtimes.cpu import default_threads

    return {
        "engine": "edgeinfer", "version": __version__, "onnxruntime": ort.__version__, "package": str(path),
        "precision": model.package.spec.weights,
        "provider": model.target.name, "provider_reason": model.target.reason,
        "threads": threads or default_threads(), "prompt_tokens": len(ids),
        "new_tokens": new_tokens, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "pid": os.getpid(),
        "summary": {
            "decode_tok_s": spread([r.decode_tok_s for r in runs]),
            "ttft_s": spread([r.ttft_s for r in runs]),
            "prefill_tok_s": spread([len(ids) / r.ttft_s for r in runs]),
        },
        "tokens": runs[0].tokens if runs else [],
        **({"experts": [r.stats["experts"] for r in runs]} if runs and "experts" in runs[0].stats else {}),
    }
