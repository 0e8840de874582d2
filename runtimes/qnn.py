"""QNN execution provider (Qualcomm Hexagon NPU via the HTP backend; the onnxruntime-qnn package).

onnxruntime-qnn ships the provider as a *plugin* library plus Qualcomm's
backend libraries; on x86-64 Linux the HTP backend emulates the NPU on the
CPU (bit-accurate, slow), which is how the npu target is tested here. HTP runs
only quantized graphs with static shapes and ops from its list: the npu
target's static QDQ packages. Other packages are refused (their contrib ops
and float math would fall back to the CPU node by node).

Session options: ``backend_path`` picks the HTP backend; ``htp_performance_mode``
asks for the highest clocks on a real device (ignored by the emulator).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest

import onnxruntime as ort

from . import cpu
from ._common import needs_target
from .provider import Provider

NAME = "qnn"
ORT_NAME = "QNNExecutionProvider"
DEVICE_KIND = "npu"
NEEDS = {"static_shapes": True, "qdq": True, "fp16": False,
         "note": "static shapes, QDQ int8/int16 activations with int8/int4 weights, HTP-supported ops"}
INSTALL = "pip install 'edgeinfer[npu]' (onnxruntime-qnn; Linux x86-64 emulates the HTP on the CPU)"


def _qnn():
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return onnxruntime_qnn


def plugin_library() -> str | None:
    q = _qnn()
    return q.get_library_path() if q is not None else None


def provider_options() -> dict:
    q = _qnn()
    if q is None:
        return {}
    return {"backend_path": q.get_qnn_htp_path(), "htp_performance_mode": "burst"}


def emulated(devices: list) -> bool:
    """True when the HTP is the emulator (the provider's devices are CPUs, as on x86-64 Linux): `auto` does
    not pick it — it is a correctness tool ~100x slower than the CPU provider; `--provider qnn` still runs it."""
    return bool(devices) and all(d.device.type == ort.OrtHardwareDeviceType.CPU for d in devices)


def accepts(spec: Manifest | None) -> str | None:
    return needs_target(spec, ("npu",), NAME, "(HTP) runs only static-shape QDQ graphs")


PROVIDER = Provider(name=NAME, ort_name=ORT_NAME, device_kind=DEVICE_KIND, needs=NEEDS, install=INSTALL,
                    session_options=cpu.session_options, plugin_library=plugin_library,
                    provider_options=provider_options, accepts=accepts, emulated=emulated)
