"""Move the quantize/dequantize steps at the npu graphs' edges to the host.

After QDQ quantization the graph takes float KV buffers and a float mask and
quantizes them first thing, and dequantizes its new keys/values and logits last
thing. On an NPU those edge conversions are float work the accelerator leaves
to the CPU (QNN with CPU fallback allowed: 4 per layer + 2 nodes), and the KV
buffers cost twice the memory of their 16-bit values. This rewrite removes
those QuantizeLinear/DequantizeLinear nodes: the graph reads and writes the
16-bit values directly, and the manifest records each edge tensor's scale and
zero point so the runtime (``StaticDecoder``) keeps its KV cache in uint16,
writes the mask quantized and dequantizes the logits it reads.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, numpy_helper


def quantize_graph_io(path: Path, inputs: list[str], outputs: list[str]) -> dict[str, dict]:
    """Rewrite the ONNX file PATH so the graph INPUTS and OUTPUTS carry their quantized values.

    Returns ``{tensor name: {"scale", "zero_point", "dtype"}}`` for each rewritten edge. Weights stay where
    they are (the model is loaded without its external data and saved with the same references).
    """
    model = onnx.load_model(str(path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    params: dict[str, dict] = {}
    for name in inputs:
        q = _single(graph, lambda n, name=name: n.op_type == "QuantizeLinear" and n.input[0] == name, name)
        params[name] = _params(inits, q)
        graph.node.remove(q)
        for node in graph.node:
            for k, inp in enumerate(node.input):
                if inp == q.output[0]:
                    node.input[k] = name
        _retype(graph.input, name, inits[q.input[2]].data_type)
    for name in outputs:
        dq = _single(graph, lambda n, name=name: n.op_type == "DequantizeLinear" and n.output[0] == name, name)
        params[name] = _params(inits, dq)
        consumers = [n for n in graph.node if name in n.input]
        if consumers:  # the graph also uses the float value (new keys feed the attention): keep it inside
            dq.output[0] = f"{name}/float"
            for node in consumers:
                for k, inp in enumerate(node.input):
                    if inp == name:
                        node.input[k] = dq.output[0]
        else:
            graph.node.remove(dq)
        quantized = dq.input[0]
        for node in graph.node:
            for k, out in enumerate(node.output):
                if out == quantized:
                    node.output[k] = name
            for k, inp in enumerate(node.input):
                if inp == quantized:
                    node.input[k] = name
        _retype(graph.output, name, inits[dq.input[2]].data_type)
    onnx.save_model(model, str(path))
    return params


def _single(graph, match, name: str):
    found = [n for n in graph.node if match(n)]
    if len(found) != 1:
        raise ValueError(f"expected one quantize/dequantize node at the graph edge '{name}', found {len(found)}")
    return found[0]


def _params(inits: dict, node) -> dict:
    scale = numpy_helper.to_array(inits[node.input[1]])
    zero_point = numpy_helper.to_array(inits[node.input[2]])
    if scale.size != 1:
        raise ValueError(f"edge tensor of '{node.name}' is not quantized per tensor")
    return {"scale": float(scale.reshape(())), "zero_point": int(zero_point.reshape(())),
            "dtype": str(zero_point.dtype)}


def _retype(values, name: str, elem_type: int) -> None:
    for i, vi in enumerate(values):
        if vi.name == name:
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            values[i].CopyFrom(helper.make_tensor_value_info(name, elem_type, dims))
            return
    raise ValueError(f"'{name}' is not a graph input or output")
