"""What the expert cache may hold under a memory budget.

A cached expert's memory: with a session per expert, onnxruntime keeps the record's arrays
(they are the session's initializers) beside its prepacked copy of them (measured on the 1.5 MB
int4 experts of apps/bench/moe.py: 2.3-2.6 MB per loaded expert; counting two records keeps the
budget); with the weights fed as graph inputs, one slot of a preallocated arena that holds the
graph inputs (page-rounded; for int8-channel experts the record itself, read straight into it).
A budget that cannot hold one layer's top-k experts is refused with the minimum.
"""

from __future__ import annotations

from ..errors import MemoryBudgetError
from .formats import CHANNEL_INT8, resident_bytes

PAGE = 4096


def expert_memory(index: dict) -> int:
    """The bytes one cached expert of the store described by INDEX costs (what the budget counts)."""
    if not index.get("weights_as_inputs"):
        return resident_bytes(index)
    need = resident_bytes(index)
    if index.get("precision") == CHANNEL_INT8:  # read straight into its slot: room for the padded record
        need = max(need, int(index["record_size"]))
    return (need + PAGE - 1) // PAGE * PAGE


def all_experts_memory(index: dict) -> int:
    """The bytes every expert of the store costs cached (a budget of 100%)."""
    return expert_memory(index) * sum(len(recs) for recs in index["layers"].values())


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


def malloc_trim() -> None:
    """Hand memory the allocator keeps in its arenas back to the system (glibc; elsewhere nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()
