"""CoreML execution provider (Apple CPU, GPU and Neural Engine; macOS/iOS onnxruntime builds).

The Neural Engine only takes static shapes and standard ops, so CoreML is for
the npu target's static graphs; CoreML's ML Program format keeps fp16
precision. The fused contrib ops of the cpu graphs are not CoreML ops: such a
package would run almost entirely on the CPU fallback, so it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest

from . import cpu
from ._common import needs_target
from .provider import Provider

NAME = "coreml"
ORT_NAME = "CoreMLExecutionProvider"
DEVICE_KIND = "npu"
NEEDS = {"static_shapes": True, "qdq": False, "fp16": True,
         "note": "static shapes and standard ops (the npu target); QDQ is dequantized to fp16"}
INSTALL = "the onnxruntime package for macOS/iOS includes it"


def provider_options() -> dict:
    return {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL", "RequireStaticInputShapes": "1"}


def accepts(spec: Manifest | None) -> str | None:
    return needs_target(spec, ("npu",), NAME, "needs static shapes and standard ops")


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=cpu.session_options, provider_options=provider_options, accepts=accepts)
