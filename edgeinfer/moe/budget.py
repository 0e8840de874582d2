"""What the expert cache may hold under a memory budget.

A cached expert's memory is counted in store records: with a session per expert,
onnxruntime keeps the record's arrays (they are the session's initializers)
beside its prepacked copy of them (measured on the 1.5 MB int4 experts of
apps/bench/moe.py: 2.3-2.6 MB per loaded expert; counting two records keeps the
budget); with the weights fed as graph inputs, the record alone. A budget that
cannot hold one layer's top-k experts is refused with the minimum.
"""

from __future__ import annotations

from ..errors import MemoryBudgetError


def resident_records(index: dict) -> int:
    """What one cached expert of this store costs in memory, in store records: the record alone when
    its weights are graph inputs; the record and onnxruntime's prepacked copy of it otherwise."""
    return 1 if index.get("weights_as_inputs") else 2


def cache_budget(budget: int | None, expert_bytes: int, experts: int, top_k: int) -> int:
    """The bytes the expert cache may hold: BUDGET (None: no limit) capped at all EXPERTS resident,
    each EXPERT_BYTES in memory; a budget below TOP_K experts (one layer's) raises MemoryBudgetError."""
    minimum = top_k * expert_bytes
    total = experts * expert_bytes
    if budget is not None and budget < minimum:
        raise MemoryBudgetError(f"a memory budget of {budget} bytes cannot hold one layer's {top_k} experts: "
                                f"give at least {minimum} bytes ({_human(minimum)}; all experts take "
                                f"{_human(total)}, {_human(expert_bytes)} each in memory).")
    return total if budget is None else min(budget, total)


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
