"""CoreML execution provider (Apple CPU, GPU and Neural Engine; macOS/iOS onnxruntime builds).

The Neural Engine only takes static shapes and standard ops, so CoreML is for
the npu target's static graphs; CoreML's ML Program format keeps fp16
precision. The fused contrib ops of the cpu graphs are not CoreML ops: such a
package would run almost entirely on the CPU fallback, so it is refused.
"""

from __future__ import annotations

import onnxruntime as ort

from . import cpu
from ._common import needs_target

NAME = "coreml"
ORT_NAME = "CoreMLExecutionProvider"
DEVICE_KIND = "npu"
NEEDS = {"static_shapes": True, "qdq": False, "fp16": True,
         "note": "static shapes and standard ops (the npu target); QDQ is dequantized to fp16"}
INSTALL = "the onnxruntime package for macOS/iOS includes it"


def plugin_library() -> str | None:
    return None


def provider_options() -> dict:
    return {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL", "RequireStaticInputShapes": "1"}


def session_options(threads: int | None) -> ort.SessionOptions:
    return cpu.session_options(threads)


def companions() -> list:
    return []


def accepts(manifest: dict) -> str | None:
    return needs_target(manifest, ("npu",), NAME, "needs static shapes and standard ops")
