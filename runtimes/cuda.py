"""CUDA execution provider (NVIDIA GPUs; the onnxruntime-gpu package).

The cpu and gpu targets' graphs run on it as they are: onnxruntime's CUDA
kernels cover MatMulNBits (int4/int8 weights), GroupQueryAttention and the
fused norms. gpu-target packages store fp16 weights. Newer onnxruntime-gpu
builds ship CUDA as a plugin EP library; older ones compile it in (classic).
The decoder's KV buffers are allocated in CUDA memory (``DEVICE_MEMORY``) and
bound once with IO binding, so they never cross the bus; only token ids, hidden
states between stages and the logits do. (Not run here: no GPU on these machines.)
"""

from __future__ import annotations

import onnxruntime as ort

from . import cpu
from .provider import Provider

NAME = "cuda"
ORT_NAME = "CUDAExecutionProvider"
DEVICE_KIND = "gpu"
DEVICE_MEMORY = "cuda"  # the decoder keeps its KV buffers here (IO binding on device memory)
NEEDS = {"static_shapes": False, "qdq": False, "fp16": True,
         "note": "fp16 activations are fastest; int4 MatMulNBits is supported"}
INSTALL = "pip install onnxruntime-gpu (an NVIDIA GPU and driver are needed)"


def plugin_library() -> str | None:
    finder = getattr(ort, "_get_cuda_plugin_ep_library_path", None)
    return finder() if finder else None


def provider_options() -> dict:
    # kSameAsRequested: decode allocates the same shapes every step; do not round arenas up to powers of two.
    return {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": "1"}


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    device_memory=DEVICE_MEMORY, session_options=cpu.session_options, plugin_library=plugin_library,
                    provider_options=provider_options)
