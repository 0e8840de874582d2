"""8-bit MatMulNBits at float accuracy levels, run as two 4-bit halves.

onnxruntime's CPU MatMulNBits (1.32) has fast kernels for 8-bit weights only with int8 activations
(accuracy level 4). At a float level (0-3) it takes a fallback that dequantizes the whole weight on
every call: ~100x slower (measured on this 2-core VM: 127-186 ms for SmolLM2's 49152 x 576 head,
against 1.2 ms at level 4). A package exported with ``--accuracy-level 0`` therefore decoded ~10x
slower than it should, all of it in its 8-bit tensors (the tied head; a GGUF file's Q8_0 / Q6_K ones).

Each 8-bit code q is ``16 * hi + lo`` with hi and lo in 0..15, so with q's zero point z = 16 zh + zl,

    (q - z) * s  =  (hi - zh) * (16 s)  +  (lo - zl) * s,

the sum of two 4-bit MatMulNBits over the same input, whose float kernels are fast (~5 ms for that
head). The weights are the same bits (two nibbles where one byte was); the product differs from the
8-bit one only by float rounding (one more addition per output). Nodes whose weight is not a constant
(the MoE experts' shared graph feeds them as inputs) or whose zero points are not uint8 stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from edgeinfer.export.quant.quantize import pack_bits
from onnx import helper, numpy_helper

FLOAT_LEVELS = (0, 1, 2, 3)  # accuracy levels whose 8-bit kernel is the slow fallback


def split_int8_matmuls(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]
                       ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """NODES and INITIALIZERS with every 8-bit MatMulNBits at a float accuracy level (and a constant weight)
    replaced by two 4-bit ones and an Add; initializers and Reshapes no longer read are dropped."""
    inits = {t.name: t for t in initializers}
    producers = {out: n for n in nodes for out in n.output}
    out_nodes, new_inits, replaced = [], [], set()
    halves: dict[tuple, list[str]] = {}  # (weight, scales, zero points) -> its halves' initializers: made once
    for node in nodes:
        parts = _split(node, inits, producers, halves) if _is_slow_int8(node) else None
        if parts is None:
            out_nodes.append(node)
            continue
        replaced |= set(node.input[1:4])
        out_nodes += parts[0]
        new_inits += parts[1]
    if not replaced:
        return nodes, initializers
    return _prune(out_nodes, initializers + new_inits, replaced)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_slow_int8(node: onnx.NodeProto) -> bool:
    if node.op_type != "MatMulNBits":
        return False
    a = _attrs(node)
    return a.get("bits", 4) == 8 and a.get("accuracy_level", 0) in FLOAT_LEVELS


def _constant(name: str, inits: dict, producers: dict) -> np.ndarray | None:
    """NAME's value when it is an initializer, or a Reshape of one to a constant shape; else None."""
    if name in inits:
        return numpy_helper.to_array(inits[name]) if not _external(inits[name]) else None
    node = producers.get(name)
    if node is not None and node.op_type == "Reshape" and all(i in inits for i in node.input[:2]):
        data, shape = (_constant(i, inits, producers) for i in node.input[:2])
        if data is not None and shape is not None:
            return data.reshape(shape.astype(np.int64))
    return None


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _split(node: onnx.NodeProto, inits: dict, producers: dict, halves: dict):
    """(nodes, new initializers) computing NODE as two 4-bit halves, or None when it cannot be split. HALVES:
    the initializers made for weights split before (an exit head reading the final head's weights reuses them)."""
    a = _attrs(node)
    n, k, block = a["N"], a["K"], a["block_size"]
    blocks = -(-k // block)
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if inputs[4]:  # g_idx: an act-order layout, not made by this exporter
        return None
    key = tuple(inputs[1:4])
    if key in halves:
        return _halves_nodes(node, a, inputs, halves[key]), []
    q = _constant(inputs[1], inits, producers)
    scales = _constant(inputs[2], inits, producers)
    if q is None or scales is None:
        return None
    q = q.reshape(n, blocks, block)
    if inputs[3]:
        zp = _constant(inputs[3], inits, producers)
        if zp is None or zp.dtype != np.uint8:  # float zero points: no integer split
            return None
        zp = zp.reshape(n, -1)[:, :blocks]
    else:
        zp = np.full((n, blocks), 128, np.uint8)  # the kernel's implicit 8-bit zero point
    scales = scales.reshape(n, blocks)
    first = node.name or node.output[0]  # the halves are named after the first matmul that reads the weight
    tensors = [
        numpy_helper.from_array(pack_bits(q >> 4, 4), first + ".hi.qweight"),
        numpy_helper.from_array((scales * 16).astype(scales.dtype), first + ".hi.scales"),
        numpy_helper.from_array(pack_bits(zp >> 4, 4), first + ".hi.zero_points"),
        numpy_helper.from_array(pack_bits(q & 15, 4), first + ".lo.qweight"),
        numpy_helper.from_array(scales, first + ".lo.scales"),
        numpy_helper.from_array(pack_bits(zp & 15, 4), first + ".lo.zero_points"),
    ]
    halves[key] = [t.name for t in tensors]
    return _halves_nodes(node, a, inputs, halves[key]), tensors


def _halves_nodes(node: onnx.NodeProto, attrs: dict, inputs: list[str], names: list[str]) -> list[onnx.NodeProto]:
    """The two 4-bit MatMulNBits over NAMES (hi's weight, scales, zero points, then lo's) and their Add,
    which writes NODE's output."""
    base = node.name or node.output[0]
    attrs = {**attrs, "bits": 4}
    hi = helper.make_node("MatMulNBits", [inputs[0], *names[:3]], [base + ".hi/out"], name=base + ".hi",
                          domain=node.domain, **attrs)
    lo_inputs = [inputs[0], *names[3:]]
    if inputs[5]:  # the bias, added once
        lo_inputs += ["", inputs[5]]
    lo = helper.make_node("MatMulNBits", lo_inputs, [base + ".lo/out"], name=base + ".lo", domain=node.domain,
                          **attrs)
    return [hi, lo, helper.make_node("Add", [hi.output[0], lo.output[0]], list(node.output), name=base + ".halves")]


def _prune(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], replaced: set[str]):
    """Drop what only the replaced matmuls read: the Reshapes that made their weights, and the REPLACED
    initializers (and those Reshapes' inputs) that no node reads any more; a tied embedding's table stays
    for its Gather."""
    read = {i for n in nodes for i in n.input}
    reshapes = [n for n in nodes if n.op_type == "Reshape" and n.output[0] in replaced - read]
    nodes = [n for n in nodes if n not in reshapes]
    candidates = replaced | {i for n in reshapes for i in n.input}
    read = {i for n in nodes for i in n.input}
    return nodes, [t for t in initializers if t.name in read or t.name not in candidates]
