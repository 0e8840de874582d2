"""What a dense package needs in memory, checked against a budget before anything is allocated.

Weights: the bytes of the graph files a session loads (onnxruntime keeps one
copy of each initializer). KV cache: layers × 2 × kv heads × head dim ×
reserved context × bytes per element, reserved once at load and never grown.
A budget too small gets one sentence with the figure needed and the largest
context that would fit.
"""

from __future__ import annotations

from .experts import MemoryBudgetError, parse_memory_budget
from .package import Package

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def dense_needs(pkg: Package, max_context: int | None) -> dict:
    """{'weights', 'kv_per_token', 'context', 'kv', 'total'} in bytes for loading PKG."""
    weights = sum(int(meta.get("size", 0)) for rel, meta in pkg.manifest["files"].items()
                  if rel.startswith("graphs/"))
    kv = pkg.kv_cache
    context = min(int(max_context or kv["max_context"]), int(kv["max_context"]))
    per_token = (int(kv.get("num_layers", 0)) * 2 * int(kv.get("num_kv_heads", 0)) * int(kv.get("head_dim", 0))
                 * _DTYPE_BYTES.get(kv.get("dtype", "float32"), 4))
    return {"weights": weights, "kv_per_token": per_token, "context": context, "kv": per_token * context,
            "total": weights + per_token * context}


def check_dense_budget(pkg: Package, memory_budget, max_context: int | None) -> None:
    budget = parse_memory_budget(memory_budget)
    if budget is None:
        return
    need = dense_needs(pkg, max_context)
    if need["total"] <= budget:
        return
    fits = (budget - need["weights"]) // need["kv_per_token"] if need["kv_per_token"] else 0
    hint = (f"load with max_context={int(fits)} or less" if fits >= 16 else
            "the weights alone do not fit: use a smaller or more quantized package")
    raise MemoryBudgetError(
        f"this model needs {need['total'] / 1e6:.1f} MB ({need['weights'] / 1e6:.1f} MB of weights + "
        f"{need['kv'] / 1e6:.1f} MB of KV cache for a context of {need['context']}) but the memory budget is "
        f"{budget / 1e6:.1f} MB: raise the budget or {hint}.")
