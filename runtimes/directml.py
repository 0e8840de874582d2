"""DirectML execution provider (any DirectX 12 GPU on Windows; onnxruntime-directml).

DirectML runs MatMulNBits and GroupQueryAttention, so cpu and gpu graphs run
as they are. It cannot run with memory patterns or parallel execution, which
its sessions turn off. Nothing to install on Linux or macOS.
"""

from __future__ import annotations

import onnxruntime as ort

from . import cpu
from .provider import Provider

NAME = "directml"
ORT_NAME = "DmlExecutionProvider"
DEVICE_KIND = "gpu"
NEEDS = {"static_shapes": False, "qdq": False, "fp16": True, "note": "Windows only; fp16 weights are fastest"}
INSTALL = "pip install onnxruntime-directml (Windows only)"


def provider_options() -> dict:
    return {"device_id": "0"}


def session_options(threads: int | None) -> ort.SessionOptions:
    so = cpu.session_options(threads)
    so.enable_mem_pattern = False  # required by DirectML
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=session_options, provider_options=provider_options)
