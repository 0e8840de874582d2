"""A small, explicit ONNX graph builder: nodes, initializers, inputs and outputs.

The exporter builds graphs directly from numpy weights. This module knows
nothing about transformers; ``export/graph/blocks.py`` builds the shared vocabulary
(norms, quantized linears, attention, MLPs) on top of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OPSET = 21

_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
}


class GraphBuilder:
    """Accumulates one ONNX graph; names are made unique with a running counter."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._init_names: set[str] = set()
        # values computed once per graph and reused by later nodes, e.g. an input's block sums
        self.shared_values: dict[tuple, str] = {}

    def unique(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        return name

    def output(self, name: str, dtype: str, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant once; a second call with the same name reuses the first."""
        if name not in self._init_names:
            self._init_names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def has_initializer(self, name: str) -> bool:
        return name in self._init_names

    def add_initializer_proto(self, tensor: onnx.TensorProto) -> str:
        """Add a ready-made initializer (e.g. one whose data lives outside the graph) once."""
        if tensor.name not in self._init_names:
            self._init_names.add(tensor.name)
            self.initializers.append(tensor)
        return tensor.name

    def const_i64(self, values: list[int], name: str | None = None) -> str:
        name = name or self.unique("const")
        return self.initializer(name, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, *, domain: str = "",
           name: str | None = None, outputs: list[str] | None = None, **attrs) -> list[str]:
        """Add one node; returns its output names."""
        node_name = name or self.unique(op_type)
        outs = outputs or [f"{node_name}/out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kwargs) -> str:
        return self.op(op_type, inputs, 1, **kwargs)[0]

    def to_model(self) -> onnx.ModelProto:
        from edgeinfer.export.graph.int8_halves import split_int8_matmuls

        # 8-bit matmuls at float accuracy levels as two 4-bit halves: ~100x faster kernels (int8_halves.py)
        nodes, initializers = split_int8_matmuls(self.nodes, self.initializers)
        graph = helper.make_graph(nodes, self.name, self.inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeinfer")
        model.ir_version = 10
        return model

    def save(self, path: Path) -> list[Path]:
        """Write ``path`` and its external weights file ``path.data``; returns both paths."""
        model = self.to_model()
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        written = [path]
        if (path.parent / data_name).exists():
            written.append(path.parent / data_name)
        return written
