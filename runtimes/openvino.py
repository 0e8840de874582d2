"""OpenVINO execution provider (Intel CPUs, integrated GPUs and NPUs; onnxruntime-openvino).

onnxruntime-openvino ships its own ``onnxruntime`` module (a different version
from the plain package), so it lives in its own virtual environment
(``runtimes/make_openvino_venv.sh`` makes ``.venv-openvino``). The provider is
classic (compiled in). It takes standard ops — the npu target's static QDQ
graphs, which it compiles for ``device_type`` CPU, GPU or NPU; the cpu graphs'
contrib ops are not OpenVINO ops, so those packages are refused. The device
comes from EDGEINFER_OPENVINO_DEVICE, else the first of NPU, GPU, CPU that
OpenVINO reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest

import os

from . import cpu
from ._common import needs_target
from .provider import Provider

NAME = "openvino"
ORT_NAME = "OpenVINOExecutionProvider"
DEVICE_KIND = "npu"
NEEDS = {"static_shapes": True, "qdq": True, "fp16": False,
         "note": "standard ops; static shapes for its NPU; QDQ int8 runs as int8 on CPU/NPU"}
INSTALL = "pip install onnxruntime-openvino in its own venv (runtimes/make_openvino_venv.sh)"


def device_type() -> str:
    chosen = os.environ.get("EDGEINFER_OPENVINO_DEVICE")
    if chosen:
        return chosen
    try:
        from onnxruntime.capi import _pybind_state

        found = list(_pybind_state.get_available_openvino_device_ids())
    except Exception:  # not an OpenVINO build
        found = []
    for dev in ("NPU", "GPU", "CPU"):
        if any(str(f).startswith(dev) for f in found):
            return dev
    return "CPU"


def provider_options() -> dict:
    return {"device_type": device_type()}


def accepts(spec: Manifest | None) -> str | None:
    return needs_target(spec, ("npu",), NAME, "takes only standard ops")


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=cpu.session_options, provider_options=provider_options, accepts=accepts)
