"""One configuration (experts mode, budget, compute threads) decoded in this process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .models import ROOT


def real_text_ids(pkg: Path, n: int) -> list[int]:
    """N tokens of English prose (this repository's docs), through the package's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    text = "\n\n".join((ROOT / p).read_text() for p in ("docs/architecture.md", "README.md", "docs/security.md"))
    ids = tok.encode(text).ids
    return ids[:n]


MODES = ("resident", "prefetch", "naive")  # all in memory; read-ahead; on demand (a layer's misses together)


def run_one(pkg: Path, mode: str, frac: float, tokens: int, warmup: int, text: bool = False,
            readers: int = 0, threads: int | None = None, predict_from: str = "stream",
            resident_fraction: float | None = None, budget_split: str = "miss-cost") -> dict:
    """One configuration, in this process: decode WARMUP then TOKENS tokens one at a time."""
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.bench import peak_rss_mb
    from edgeinfer.moe.budget import all_experts_memory
    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    pkg_ = open_package(pkg, verify=False)
    store = pkg_.manifest["moe"]["expert_store"]
    total = all_experts_memory(store)  # all experts in memory, as the cache counts them
    budget = int(total * frac)
    dec = MoEDecoder(pkg_, resolve_provider("cpu", threads), max_context=512, memory_budget=budget,
                     prefetch=mode == "prefetch", direct_io=True, readers=readers,
                     predict_from=predict_from, resident_fraction=resident_fraction, budget_split=budget_split)
    rss_loaded = peak_rss_mb()
    # Start from a full cache: the resident sets, then the first experts of every layer up to the budget;
    # the warm-up then only has to adapt it, and the timed tokens see the steady state.
    cache = dec.cache
    cache.warm()
    per_layer = min(len(r) for r in store["layers"].values())
    for e in range(per_layer):
        for layer in store["layers"]:
            if cache.count >= cache.capacity:
                break
            cache.acquire(int(layer), [e])
            cache.release(int(layer), [e])
    if text:  # real prose: routing with real locality
        ids = real_text_ids(pkg, 8 + warmup + tokens)
    else:
        rng = np.random.default_rng(1234)
        ids = rng.integers(3, pkg_.manifest["architecture"]["vocab_size"], size=8 + warmup + tokens).tolist()
    dec.forward(ids[:8])
    for t in ids[8:8 + warmup]:
        dec.step(t)
    before = dec.expert_stats()
    t0 = time.perf_counter()
    for t in ids[8 + warmup:]:
        dec.step(t)
    dt = time.perf_counter() - t0
    stats = dec.expert_stats(before)
    stats.tokens = tokens
    s = stats.as_dict()
    record = store["record_size"]
    dense_bytes = sum(f["size"] for rel, f in pkg_.manifest["files"].items() if not rel.startswith("experts/"))
    dec.close()
    return {"mode": mode, "threads": threads, "readers": readers, "predict_from": predict_from,
            "resident_fraction": resident_fraction, "budget_split": budget_split, "loadavg": os.getloadavg(),
            "budget_fraction": frac, "budget_bytes": budget, "tokens": tokens, "tok_s": tokens / dt,
            "ms_per_token": dt / tokens * 1e3, "stats": s,
            # needed experts whose bytes came from disk for this use (read on demand or ahead): what the
            # disk must deliver per token under this cache; the read bound divides the disk's speed by it
            "missed_bytes_per_token": s["needed_reads"] * record / tokens,
            "record_bytes": record,
            "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded, "dense_bytes": dense_bytes,
            "resident_expert_bytes": dec.cache.resident_bytes}
