"""Routing measured at export: the staged package run over calibration text.

The exporter writes the graphs and the expert store, then runs the package (the runtime's own
MoEDecoder, on the CPU, a small expert budget) over the calibration paragraphs and records, per
sparse layer, which experts each token was routed to. From that it writes into the manifest:

- ``moe.routing.frequencies``: per layer, how often each expert was chosen per token (they sum to
  top_k): the runtime splits its budget across layers and picks resident experts from them
  (edgeinfer/moe/residency.py);
- the store's layout: within each layer, experts that were chosen together lie next to each other
  (a greedy chain: from the most frequent expert, always the unplaced one most often co-chosen with
  the last placed), so one read brings neighbouring records a token is likely to need; the store
  is rewritten in that order, the index keeps expert ids and gets the new offsets and each record's
  CRC-32 (checked when the runtime reads a record).

Random routers route near-uniformly: their frequencies are flat up to noise and the split comes
out equal. The calibration text is the exporter's ``calibration.txt`` (English prose).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import numpy as np
from edgeinfer.export.quant.calibrate import calibration_samples

from edgeinfer.package import ExpertsSpec

MAX_TOKENS = 2048  # calibration tokens in all
CALIBRATION_BUDGET = 256 << 20  # expert memory while calibrating (the prompt path pins one expert at a time)


def measure_routing(folder: Path, max_tokens: int = MAX_TOKENS) -> dict:
    """Run the staged package in FOLDER over the calibration text: {"tokens", "counts" (layer -> per
    expert), "co" (layer -> experts x experts co-chosen counts)}."""
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.budget import expert_memory
    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    pkg = open_package(folder, verify=False)
    moe = pkg.spec.moe
    n_exp, top_k = moe.num_experts, moe.top_k
    ctx = int(pkg.kv_cache.max_context)
    budget = max(CALIBRATION_BUDGET, (top_k + 1) * expert_memory(moe.expert_store))
    dec = MoEDecoder(pkg, resolve_provider("cpu"), max_context=ctx, memory_budget=budget, prefetch=False, readers=0)
    counts: dict[int, np.ndarray] = {}
    co: dict[int, np.ndarray] = {}

    def trace(layer: int, x: np.ndarray, stream: np.ndarray, experts: np.ndarray) -> None:
        onehot = np.zeros((experts.shape[0], n_exp), np.float64)
        np.put_along_axis(onehot, experts, 1.0, axis=1)
        counts[layer] = counts.get(layer, 0) + onehot.sum(axis=0)
        co[layer] = co.get(layer, 0) + onehot.T @ onehot

    dec.trace = trace
    tokens = 0
    try:
        for ids in calibration_samples((folder / "tokenizer.json").read_text(encoding="utf-8"), None, ctx):
            ids = ids[: max_tokens - tokens]
            if len(ids) < 2:
                break
            dec.reset()
            dec.forward(ids)
            tokens += len(ids)
    finally:
        dec.close()
    return {"tokens": tokens, "counts": counts, "co": co}


def coactivation_order(counts: np.ndarray, co: np.ndarray) -> list[int]:
    """Experts in a greedy chain: the most frequent first, then always the unplaced expert most often
    chosen together with the last placed one (ties: the more frequent)."""
    n = len(counts)
    left = set(range(n))
    order = [int(np.argmax(counts))]
    left.discard(order[0])
    while left:
        last = order[-1]
        nxt = max(left, key=lambda e: (co[last, e], counts[e], -e))
        order.append(nxt)
        left.discard(nxt)
    return order


def rewrite_store(path: Path, index: dict, orders: dict[str, list[int]]) -> dict:
    """Rewrite the store at PATH with each layer's records in ORDERS (expert ids, disk order); returns
    the index with the new offsets and every record's CRC-32."""
    size = int(index["record_size"])
    tmp = path.with_suffix(".reordered")
    layers, sums = {}, {}
    offset = 0
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for layer, recs in index["layers"].items():
            order = orders.get(layer, list(range(len(recs))))
            new = [None] * len(recs)
            crc = [0] * len(recs)
            for e in order:
                src.seek(recs[e][0])
                data = src.read(size)
                dst.write(data)
                new[e], crc[e] = [offset, size], zlib.crc32(data)
                offset += size
            layers[layer], sums[layer] = new, crc
    os.replace(tmp, path)
    return {**index, "layers": layers, "checksums": sums, "total_bytes": offset}


def calibrate(folder: Path, moe: ExpertsSpec, store_rel: str) -> ExpertsSpec:
    """Measure routing on calibration text, lay the store out by co-activation; returns the manifest's
    moe section with ``routing`` and the new ``expert_store`` index."""
    routing = measure_routing(folder)
    if routing["tokens"] == 0:  # a tokenizer that makes nothing of the text: no routing to record
        return moe
    n = routing["tokens"]
    orders = {str(layer): coactivation_order(c, routing["co"][layer]) for layer, c in routing["counts"].items()}
    index = rewrite_store(folder / store_rel, moe.expert_store, orders)
    freqs = {str(layer): [round(float(v) / n, 5) for v in c] for layer, c in sorted(routing["counts"].items())}
    return dataclasses.replace(moe, expert_store={**index, "layout": "co-activation"},
                               routing={"frequencies": freqs, "calibration_tokens": routing["tokens"],
                                        "calibration_text": "calibration.txt"})
