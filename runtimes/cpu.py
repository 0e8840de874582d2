"""CPU execution provider: the fused contrib ops (MatMulNBits, GroupQueryAttention,
SkipSimplifiedLayerNormalization) have fast CPU kernels; decode is latency-bound,
so intra-op threads spin rather than sleep between the many small kernels.

All sessions of a process share one global intra-op thread pool. With a pool per
session, the idle pools of the other stage graphs (or of the other model of a
big/little pair) keep spinning while one runs: measured here, a 6-stage package
decoded at 23 tok/s with per-session pools and 143 tok/s with the shared pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest

import os
import warnings

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _C

from .provider import Provider

NAME = "cpu"
ORT_NAME = "CPUExecutionProvider"
DEVICE_KIND = "cpu"
NEEDS = {"static_shapes": False, "qdq": False, "fp16": False,
         "note": "runs every package: the cpu target's fused contrib ops have its fastest kernels; npu (QDQ) "
                 "packages run with their quantization simulated"}
INSTALL = "part of every onnxruntime package"

_global_pool_threads: int | None = None  # set once per process


def default_threads() -> int:
    """Cores this process may use (hyper-threads slow memory-bound decode)."""
    n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    return max(1, n)


def session_config(spec: Manifest | None) -> dict:
    """Session config entries for a package. A static QDQ package with 16-bit activations has no integer
    kernels on the CPU: its weights' DequantizeLinear nodes would run on every call (SmolLM2-135M: 0.9
    tok/s). Treating QDQ as float lets onnxruntime fold them into fp32 weights once at load (5.0 tok/s,
    the same tokens: the activations' Quantize/Dequantize pairs still run, so quantization is simulated
    exactly); it costs fp32 weight memory, acceptable for a fallback."""
    quant = spec.quantization if spec is not None else {}
    if quant.get("scheme") == "static-qdq" and str(quant.get("activations", "")).startswith("uint16"):
        return {"session.disable_quant_qdq": "1"}
    return {}


def accepts(spec: Manifest | None) -> str | None:
    """None: the CPU runs every package (a gpu or npu one more slowly than its own device)."""
    return None


def _shared_pool(threads: int) -> bool:
    """Create the process-wide pool on first use; True if it has THREADS threads."""
    global _global_pool_threads
    if _global_pool_threads is None:
        try:
            _C.set_global_thread_pool_sizes(threads, 1)
            _global_pool_threads = threads
        except Exception:  # the environment already exists (another library made a session first)
            _global_pool_threads = 0
    return _global_pool_threads == threads


def compatible_session_options() -> ort.SessionOptions:
    """Default session options that work in this process: once the global pool exists, onnxruntime
    refuses sessions with their own pools (tools such as the exporter's calibration make sessions too)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if _global_pool_threads:
        so.use_per_session_threads = False
    return so


def session_options(threads: int | None) -> ort.SessionOptions:
    n = threads or default_threads()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if _shared_pool(n):
        so.use_per_session_threads = False
    elif _global_pool_threads:
        # onnxruntime (1.32) refuses a session with its own pool once the process-wide pool exists
        warnings.warn(f"this process already runs models with {_global_pool_threads} threads in onnxruntime's "
                      f"one process-wide pool; a model asking for {n} threads runs with {_global_pool_threads} too "
                      "(load it in another process to give it other threads)", stacklevel=3)
        so.use_per_session_threads = False
    else:  # another library made the environment first: this session gets its own pool
        so.intra_op_num_threads = n
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return so


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=session_options, accepts=accepts, session_config=session_config)
