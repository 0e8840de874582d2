"""XNNPACK execution provider (optimized fp32/int8 kernels for Arm and x86 CPUs; mobile builds).

XNNPACK takes standard float and QDQ-int8 ops (MatMul, Conv, Softmax, ...);
the contrib ops of the cpu graphs stay on the CPU provider. It runs its own
thread pool, so the session's intra-op pool is one thread.
"""

from __future__ import annotations

import onnxruntime as ort

from . import cpu
from .provider import Provider

NAME = "xnnpack"
ORT_NAME = "XnnpackExecutionProvider"
DEVICE_KIND = "cpu"
NEEDS = {"static_shapes": False, "qdq": False, "fp16": False,
         "note": "standard ops; QDQ int8 MatMuls run as int8 kernels"}
INSTALL = "onnxruntime builds with --use_xnnpack (Android/iOS packages include it)"


def provider_options() -> dict:
    return {"intra_op_num_threads": str(cpu.default_threads())}


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1  # XNNPACK has its own pool
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=session_options, provider_options=provider_options)
