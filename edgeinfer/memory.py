"""Memory budgets: the parser every budget goes through, and what a dense package needs in memory,
checked against a budget before anything is allocated (an MoE package's budget bounds its expert
cache instead: edgeinfer/moe/budget.py).

Weights: the bytes of the graph files a session loads (onnxruntime keeps one
copy of each initializer). KV cache: layers × 2 × kv heads × head dim ×
reserved context × bytes per element, reserved once at load and never grown.
A budget too small gets one sentence with the figure needed and the largest
context that would fit.
"""

from __future__ import annotations

import re

from .errors import MemoryBudgetError
from .package import Package

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12}


def parse_memory_budget(value: str | int | float | None) -> int | None:
    """Bytes from ``512MB``, ``1.5GiB``, ``2000000`` (None or ``unlimited`` = no limit)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "unlimited")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(f"memory budget {value!r} is not a size: write e.g. 512MB, 1.5GB or 800MiB.")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise MemoryBudgetError(f"memory budget {value!r} must be positive.")
    return n


def dense_needs(pkg: Package, max_context: int | None) -> dict:
    """{'weights', 'kv_per_token', 'context', 'kv', 'total'} in bytes for loading PKG."""
    weights = sum(int(meta.get("size", 0)) for rel, meta in pkg.files.items() if rel.startswith("graphs/"))
    kv = pkg.kv_cache
    context = min(int(max_context or kv.max_context), kv.max_context)
    per_token = kv.num_layers * 2 * kv.num_kv_heads * kv.head_dim * _DTYPE_BYTES.get(kv.dtype, 4)
    return {"weights": weights, "kv_per_token": per_token, "context": context, "kv": per_token * context,
            "total": weights + per_token * context}


def check_dense_budget(pkg: Package, memory_budget, max_context: int | None, parallel: int = 1) -> None:
    """PARALLEL sequences (continuous batching) each reserve a KV cache of the context. Without a
    budget, the KV caches of parallel sequences must still fit this machine's memory."""
    budget = parse_memory_budget(memory_budget)
    need = dense_needs(pkg, max_context)
    kv = need["kv"] * max(1, parallel)
    total = need["weights"] + kv
    if budget is None:
        physical = _physical_memory()
        if parallel <= 1 or physical is None or total <= physical:
            return
        budget, whose = physical, "this machine's memory"
    else:
        whose = "the memory budget"
    if total <= budget:
        return
    per_token = need["kv_per_token"] * max(1, parallel)
    fits = (budget - need["weights"]) // per_token if per_token else 0
    hint = (f"load with max_context={int(fits)} or less" if fits >= 16 else
            "the weights alone do not fit: use a smaller or more quantized package")
    slots = f"{parallel} sequences × " if parallel > 1 else ""
    raise MemoryBudgetError(
        f"this model needs {total / 1e6:.1f} MB ({need['weights'] / 1e6:.1f} MB of weights + {slots}"
        f"{need['kv'] / 1e6:.1f} MB of KV cache for a context of {need['context']}) but {whose} is "
        f"{budget / 1e6:.1f} MB: {'raise the budget, ' if whose == 'the memory budget' else ''}"
        f"{'lower parallel or ' if parallel > 1 else ''}{hint}.")


def _physical_memory() -> int | None:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
