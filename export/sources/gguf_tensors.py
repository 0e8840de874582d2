"""A GGUF file's tensors, read with the ``gguf`` package (numpy, no torch).

Quantized matrices come out as :class:`BlockWeight`: the file's own integers and
scales rearranged into the blocks onnxruntime's MatMulNBits reads, so that the
graph computes with exactly the weights llama.cpp computes with. Every ggml block
type of the common files is ``scale * q + offset`` per block of 16 or 32 weights:

- symmetric types (Q4_0, Q5_0, Q6_K, Q8_0) shift ``q`` onto the kernel's implicit
  zero point (8 for 4 bits, 128 for 8 bits) and need nothing else;
- types with a per-block minimum (Q4_1, Q5_1, Q4_K, Q5_K) keep ``scale * (q - zp)``
  in MatMulNBits and carry ``offset`` per block; its product with the input is the
  input's block sums times an (N, K/block) matrix (``export/graph/blocks.py`` adds it).

5- and 6-bit values sit in 8-bit blocks unchanged. Tensors of other types (IQ*,
Q2_K, Q3_K, ...) have no exact form here: they are dequantized by the ``gguf``
package and re-quantized to 8-bit blocks, and the exporter says so.

Names are mapped to the Hugging Face names the family modules read; llama's q/k
rows are un-permuted (llama.cpp's converter interleaves the rotary halves) and
Gemma's norm weights lose the 1 that llama.cpp folds into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.errors import ExportError

#: ggml types carried over exactly: name -> (block bytes, weights per block)
EXACT_TYPES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q8_0": (34, 32),
               "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class BlockWeight:
    """A weight (N, K) in MatMulNBits blocks along K:
    ``w = scales * (q - 2**(bits-1)) + offsets`` (offsets None: zero)."""

    q: np.ndarray  # uint8 (N, K), values in [0, 2**bits)
    scales: np.ndarray  # float32 (N, K // block_size)
    offsets: np.ndarray | None  # float32 (N, K // block_size)
    bits: int
    block_size: int
    source_type: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.reshape(n, -1, self.block_size).astype(np.float32) - float(1 << (self.bits - 1))
        w = q * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(n, k)

    def take_rows(self, index: np.ndarray) -> BlockWeight:
        return BlockWeight(self.q[index], self.scales[index],
                           None if self.offsets is None else self.offsets[index],
                           self.bits, self.block_size, self.source_type)

    @staticmethod
    def concat_rows(parts: list[BlockWeight]) -> BlockWeight | None:
        """One weight of the stacked rows of PARTS (a fused QKV or gate/up matmul), or None when
        their layouts differ (mixed-type files keep such matmuls apart)."""
        first = parts[0]
        if any(p.bits != first.bits or p.block_size != first.block_size or p.shape[1] != first.shape[1]
               for p in parts):
            return None
        offsets = None
        if any(p.offsets is not None for p in parts):
            offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales)
                                      for p in parts])
        kinds = "+".join(dict.fromkeys(p.source_type for p in parts))
        return BlockWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                           offsets, first.bits, first.block_size, kinds)


def concat_rows(parts: list):
    """Stack weights row-wise: arrays with numpy, BlockWeights when their layouts match (else None)."""
    if all(isinstance(p, BlockWeight) for p in parts):
        return BlockWeight.concat_rows(parts)
    if any(isinstance(p, BlockWeight) for p in parts):
        return None
    return np.concatenate(parts, axis=0)


# --- ggml block layouts -> BlockWeight ------------------------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) per block -> bit j of weight j, as 0/16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # (..., 32): bit j of the uint32
    return bits.astype(np.uint8) << 4


def _blocks_32(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(q in the 4- or 8-bit domain, scales, offsets, bits) for the 32-weight block types."""
    if name == "Q4_0":
        d, q = _f16(raw[..., 0:2]), _nibbles_32(raw[..., 2:18])
        return q, d, None, 4  # d * (q - 8)
    if name == "Q4_1":
        d, m, q = _f16(raw[..., 0:2]), _f16(raw[..., 2:4]), _nibbles_32(raw[..., 4:20])
        return q, d, m + 8 * d, 4  # d * q + m = d * (q - 8) + (m + 8d)
    if name == "Q5_0":
        d = _f16(raw[..., 0:2])
        q = _nibbles_32(raw[..., 6:22]) | _high_bits_32(raw[..., 2:6])
        return q + 112, d, None, 8  # d * (q - 16) = d * ((q + 112) - 128)
    if name == "Q5_1":
        d, m = _f16(raw[..., 0:2]), _f16(raw[..., 2:4])
        q = _nibbles_32(raw[..., 8:24]) | _high_bits_32(raw[..., 4:8])
        return q + 128, d, m, 8  # d * q + m
    if name == "Q8_0":
        d = _f16(raw[..., 0:2])
        q = (raw[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, None, 8
    raise AssertionError(name)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block, from its 12 packed bytes."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 values: per 64-weight chunk c, low nibbles of bytes 32c.. are weights 64c..64c+31
    and the high nibbles weights 64c+32..64c+63."""
    chunks = qs.reshape(qs.shape[:-1] + (4, 32))
    return np.stack([chunks & 0x0F, chunks >> 4], axis=-2).reshape(qs.shape[:-1] + (256,))


def _blocks_k(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """(q, scales, offsets, bits, block size) for the 256-weight super-block types."""
    lead = raw.shape[:-1]
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw[..., 0:2]), _f16(raw[..., 2:4])
        sc, mn = _k_scales(raw[..., 4:16])
        scale = d[..., None] * sc  # (..., 8) one per 32 weights
        minimum = dmin[..., None] * mn
        if name == "Q4_K":
            q = _k_low_nibbles(raw[..., 16:144])
            return (q.reshape(lead + (8, 32)), scale, 8 * scale - minimum, 4, 32)  # s*q - min
        q = _k_low_nibbles(raw[..., 48:176])
        qh = np.unpackbits(raw[..., 16:48][..., None], axis=-1, bitorder="little")  # (..., 32 bytes, 8 bits)
        # weight 64c + l takes bit 2c of qh[l]; weight 64c + 32 + l takes bit 2c + 1
        high = qh.transpose(tuple(range(len(lead))) + (len(lead) + 1, len(lead)))  # (..., 8 bits, 32)
        q = q | (high.reshape(lead + (256,)) << 4)
        return (q.reshape(lead + (8, 32)) + 128, scale, -minimum, 8, 32)  # s*q - min = s*((q+128)-128) - min
    if name == "Q6_K":
        ql, qh, d = raw[..., 0:128], raw[..., 128:192], _f16(raw[..., 208:210])
        sc = raw[..., 192:208].view(np.int8).astype(np.float32)  # (..., 16) one per 16 weights
        out = np.empty(lead + (256,), np.uint8)
        for half in range(2):
            low = ql[..., 64 * half:64 * half + 64]
            hi = qh[..., 32 * half:32 * half + 32]
            base = 128 * half
            out[..., base:base + 32] = (low[..., :32] & 0x0F) | ((hi & 3) << 4)
            out[..., base + 32:base + 64] = (low[..., 32:] & 0x0F) | (((hi >> 2) & 3) << 4)
            out[..., base + 64:base + 96] = (low[..., :32] >> 4) | (((hi >> 4) & 3) << 4)
            out[..., base + 96:base + 128] = (low[..., 32:] >> 4) | (((hi >> 6) & 3) << 4)
        # d * sc * (q - 32) = s * ((q + 96) - 128)
        return ((out + 96).reshape(lead + (16, 16)), d[..., None] * sc, None, 8, 16)
    raise AssertionError(name)


def block_weight(type_name: str, raw: np.ndarray, k: int) -> BlockWeight:
    """The BlockWeight of a ggml tensor of TYPE_NAME whose rows (N, bytes per row) are RAW, K weights a row."""
    block_bytes, per_block = EXACT_TYPES[type_name]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // per_block, block_bytes)
    if per_block == 32:
        q, scales, offsets, bits = _blocks_32(type_name, blocks)
        block_size = 32
    else:
        q, scales, offsets, bits, block_size = _blocks_k(type_name, blocks)
    q = q.reshape(n, k).astype(np.uint8)
    scales = np.ascontiguousarray(scales.reshape(n, -1), np.float32)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets.reshape(n, -1), np.float32)
    return BlockWeight(q, scales, offsets, bits, block_size, type_name)


#: symmetric ggml types whose 5- or 6-bit values travel in 8-bit MatMulNBits blocks (of 16 for Q6_K, 32 for Q5_0)
#: (Q5_1/Q5_K keep their blocks: a block offset can be large against the block's range, so symmetric 8-bit
#: blocks of 64 would not keep their steps)
NARROW_TYPES = ("Q5_0", "Q6_K")
#: the block those are re-blocked into for int8-activation kernels (``reblocked_8bit``)
WIDE_BLOCK = 64


def reblocked_8bit(weight: BlockWeight, values: np.ndarray | None = None) -> BlockWeight:
    """A 5- or 6-bit symmetric ggml weight (NARROW_TYPES) re-quantized into symmetric 8-bit blocks of
    WIDE_BLOCK (32 where K is not a multiple of it); other weights are returned as they are.

    Each new block's step is its largest |weight| / 127: at most 32/127 (Q6_K) or 16/127 (Q5_0) of the largest
    source step in it, so no weight moves by more than 16/127 (about 1/8) of that step. Against the source's
    16- or 32-weight blocks, onnxruntime's int8-activation kernel reads 9 bits a weight instead of 12 or 10
    (a float scale and a block sum per block). Blocks of 128 read less still, but the kernel quantizes the
    activations per block too, and its one-row and multi-row results then part further (docs/gguf.md).
    VALUES: WEIGHT dequantized, when the caller holds it already (GGUFTensors.floats)."""
    k = weight.shape[1]
    block = next((b for b in (WIDE_BLOCK, 32) if k % b == 0 and b >= weight.block_size), None)
    if weight.source_type not in NARROW_TYPES or block is None:
        return weight
    values = weight.dequantize() if values is None else values
    return _symmetric_8bit(values, block, f"{weight.source_type}->8b{block}")


def requantized_int8(weight: np.ndarray, type_name: str) -> BlockWeight:
    """An 8-bit symmetric block-32 weight from float values (for types with no exact form)."""
    return _symmetric_8bit(weight, 32, f"{type_name}->int8")


def _symmetric_8bit(weight: np.ndarray, block: int, source_type: str) -> BlockWeight:
    """Float WEIGHT (N, K) in symmetric 8-bit blocks of BLOCK, each scaled to its largest |value| / 127."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=2) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(blocks / scale[:, :, None]), -127, 127) + 128
    return BlockWeight(q.reshape(n, k).astype(np.uint8), scale, None, 8, block, source_type)


# --- names and layout fixes ------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PERMUTED_QK = ("llama", "mistral")  # llama.cpp's converter interleaves q/k rows for these
NORM_PLUS_ONE = ("gemma3", "gemma3_text", "gemma2", "gemma")  # norm weights stored as 1 + w


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor (None: not a weight the exporter reads)."""
    base, _, kind = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3:
        role = parts[2]
        if arch in NORM_PLUS_ONE and role == "ffn_norm":  # Gemma's pre-FFN norm
            role_name = "pre_feedforward_layernorm"
        else:
            role_name = _LAYER_NAMES.get(role)
        return f"model.layers.{parts[1]}.{role_name}.{kind}" if role_name else None
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{kind}"
    return None


def unpermute_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary interleave of a q or k projection with HEADS heads."""
    half = n_rows // heads // 2
    return np.arange(n_rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(n_rows)


@dataclass
class GGUFTensors:
    """The weights of a GGUF file under Hugging Face names."""

    floats: dict[str, np.ndarray]  # every weight, float32 (quantized ones dequantized exactly)
    blocks: dict[str, BlockWeight]  # the quantized matrices as the file holds them
    types: dict[str, str]  # HF name -> ggml type name
    requantized: dict[str, list[str]]  # ggml type -> HF names re-quantized (no exact form)


def read_gguf_tensors(path: str | Path, arch: str, heads: int, kv_heads: int,
                      reader=None) -> GGUFTensors:
    """Read every weight tensor of the GGUF file PATH (architecture ARCH as in its header)."""
    import gguf

    if reader is None:
        reader = gguf.GGUFReader(str(path))
    floats: dict[str, np.ndarray] = {}
    blocks: dict[str, BlockWeight] = {}
    types: dict[str, str] = {}
    requantized: dict[str, list[str]] = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        type_name = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest axis first
        types[name] = type_name
        if type_name in FLOAT_TYPES:
            value = np.asarray(t.data)
            if type_name == "BF16":
                value = (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            value = value.astype(np.float32).reshape(shape)
            block = None
        elif type_name in EXACT_TYPES and len(shape) == 2:
            block = block_weight(type_name, np.asarray(t.data).reshape(shape[0], -1), shape[1])
            value = None
        else:
            try:
                value = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
            except NotImplementedError:
                raise ExportError(f"tensor '{t.name}' is of GGUF type {type_name}, which the gguf package cannot "
                                  "dequantize: convert the file to another type with llama.cpp's "
                                  "llama-quantize.") from None
            block = None
            if len(shape) == 2 and shape[1] % 32 == 0:
                block = requantized_int8(value, type_name)
                requantized.setdefault(type_name, []).append(name)
        if arch in PERMUTED_QK and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            order = unpermute_rows(shape[0], heads if ".q_proj." in name else kv_heads)
            value = None if value is None else value[order]
            block = None if block is None else block.take_rows(order)
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            value = value - 1.0
        if block is not None:
            blocks[name] = block
            value = block.dequantize() if value is None else value
        floats[name] = value
    return GGUFTensors(floats, blocks, types, requantized)


def describe_types(tensors: GGUFTensors) -> dict[str, int]:
    """How many of the file's weights are of each ggml type (for the manifest and ``info``)."""
    counts: dict[str, int] = {}
    for t in tensors.types.values():
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))
