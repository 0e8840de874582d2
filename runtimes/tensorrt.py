"""TensorRT execution provider (NVIDIA GPUs, onnxruntime-gpu built with TensorRT).

TensorRT compiles the graph into an engine per input shape profile; it wants
standard ops and fixed or bounded shapes, so it takes the static npu-style
graphs whole and leaves the contrib ops of the cpu/gpu graphs to CUDA (named
as its companion provider). Engines are cached next to the package's graphs
in the user's cache folder because building one takes minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import cpu
from .provider import Provider

NAME = "tensorrt"
ORT_NAME = "TensorrtExecutionProvider"
DEVICE_KIND = "gpu"
DEVICE_MEMORY = "cuda"  # the decoder keeps its KV buffers here (IO binding on device memory)
NEEDS = {"static_shapes": True, "qdq": False, "fp16": True,
         "note": "static or bounded shapes; int8 QDQ graphs are taken as explicit quantization"}
INSTALL = "pip install onnxruntime-gpu with TensorRT libraries (an NVIDIA GPU is needed)"


def provider_options() -> dict:
    cache = Path(os.environ.get("EDGEINFER_CACHE", Path.home() / ".cache" / "edgeinfer")) / "tensorrt"
    return {"device_id": "0", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache)}


def companions() -> list:
    from . import cuda

    return [(cuda.ORT_NAME, cuda.provider_options())]


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    device_memory=DEVICE_MEMORY, session_options=cpu.session_options,
                    provider_options=provider_options, companions=companions)
