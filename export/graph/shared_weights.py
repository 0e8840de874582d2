"""Store the weights the npu graphs have in common once.

The prefill and decode graphs of an npu package are the same model at two
chunk sizes: their quantized weights are byte for byte the same. Each graph is
quantized on its own (their activation ranges differ), then this rewrites both
to read their large initializers from one ``weights.data`` file, halving the
package on disk. Tensors are matched by content, so a tensor that differs
(an activation scale) is never shared by mistake.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

MIN_EXTERNAL_BYTES = 1024


def share_weights(paths: list[Path], data_name: str = "weights.data") -> Path:
    """Rewrite the ONNX files PATHS (same folder) to keep tensors of MIN_EXTERNAL_BYTES or more in one
    file DATA_NAME, each distinct tensor once; their own data files are removed. Returns the data file."""
    folder = paths[0].parent
    data_path = folder / data_name
    old_data = set()
    for p in paths:
        for tensor in onnx.load_model(str(p), load_external_data=False).graph.initializer:
            old_data |= {folder / e.value for e in tensor.external_data if e.key == "location"}
    models = [onnx.load_model(str(p), load_external_data=True) for p in paths]
    offsets: dict[bytes, tuple[int, int]] = {}
    with open(data_path, "wb") as f:
        for model in models:
            for tensor in model.graph.initializer:
                raw = _raw_bytes(tensor)
                if len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + tensor.data_type.to_bytes(4, "little")
                if key not in offsets:
                    pad = (-f.tell()) % 64  # aligned, so a reader may map tensors in place
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
    for model, path in zip(models, paths):
        onnx.save_model(model, str(path))
    for stale in old_data - {data_path}:
        stale.unlink(missing_ok=True)
    return data_path


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    converted = numpy_helper.from_array(array, tensor.name)
    tensor.CopyFrom(converted)
    return tensor.raw_data
