"""CPU execution provider: the fused contrib ops (MatMulNBits, GroupQueryAttention,
SkipSimplifiedLayerNormalization) have fast CPU kernels; decode is latency-bound,
so intra-op threads spin rather than sleep between the many small kernels."""

from __future__ import annotations

import os

import onnxruntime as ort


def default_threads() -> int:
    """Physical cores where known (hyper-threads slow memory-bound decode)."""
    n = os.cpu_count() or 1
    try:
        sched = len(os.sched_getaffinity(0))
        n = min(n, sched)
    except AttributeError:
        pass
    return max(1, n)


def provider_options() -> dict:
    return {}


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.log_severity_level = 3
    return so
