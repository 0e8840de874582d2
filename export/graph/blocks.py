"""The shared graph vocabulary of decoder models: norms, quantized linears,
embedding, grouped-query attention with a shared KV buffer, gated MLPs.

Each function appends nodes to a :class:`GraphBuilder` and returns the name of
its output. Per-family knowledge (which weights, which quirks) lives in
``models/``; this module only knows the building blocks and the fused
onnxruntime contrib ops that make them fast on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edgeinfer.export.graph.onnx_graph import MS_DOMAIN, GraphBuilder
from edgeinfer.export.quant.quantize import pack_bits, quantize_blockwise
from edgeinfer.export.sources.gguf_tensors import NARROW_TYPES, WIDE_BLOCK, BlockWeight, concat_rows

# "source": a GGUF file's own quantized weights, carried over exactly (export/sources/gguf_tensors.py)
PRECISIONS = ("source", "int4", "int8", "fp16", "fp32")


@dataclass(frozen=True)
class Precision:
    """How weights are stored: ``int4``/``int8`` block-quantized MatMulNBits, or float."""

    name: str = "int4"
    block_size: int = 32
    # 4 = int8 activations inside MatMulNBits: the fastest CPU kernels.
    accuracy_level: int = 4
    # Bits of the LM head (and the tied embedding); None = same as the other weights.
    lm_head_bits: int | None = None
    # Symmetric blocks carry no zero points. None = the method's choice: asymmetric for the
    # default int4 method (zero-point blocks run as fast at accuracy level 4, docs/quality.md),
    # symmetric for rtn.
    symmetric: bool | None = None
    # How blocks are fitted (export/quant/methods.py): "hqq", "mse" or "rtn". None = the default:
    # DEFAULT_INT4_METHOD for 4-bit weights (mse when symmetric blocks are asked for), rtn for
    # 8-bit ones (already near lossless).
    quant_method: str | None = None
    # "source" at accuracy level 4: keep the file's 5- and 6-bit blocks exactly instead of re-blocking them
    exact_blocks: bool = False

    def __post_init__(self):
        from edgeinfer.export.quant.methods import METHODS

        from edgeinfer.errors import ExportError

        if self.quant_method not in (None, *METHODS):
            raise ExportError(f"unknown --quant-method '{self.quant_method}': choose one of {', '.join(METHODS)}.")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.method_for(self.bits or 4) == "rtn")
        if self.symmetric and "hqq" in (self.method_for(4), self.method_for(8)):
            raise ExportError("--quant-method hqq fits a zero point per block: it cannot be symmetric.")

    @property
    def reblocks_narrow_types(self) -> bool:
        """A GGUF's 5- and 6-bit tensors re-blocked into 8-bit blocks of 64 (``reblocked_8bit``): only with
        int8 activations, whose rounding outweighs the re-blocking's; levels 0-3 keep every block exact, and
        so does ``exact_blocks``."""
        return self.name == "source" and self.accuracy_level == 4 and not self.exact_blocks

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.name)

    @property
    def head_bits(self) -> int | None:
        return self.lm_head_bits if self.lm_head_bits is not None else self.bits

    def method_for(self, bits: int) -> str:
        """The quantization method of BITS-bit weights."""
        if self.quant_method is not None:
            return self.quant_method
        if bits != 4:
            return "rtn"
        return "mse" if self.symmetric else DEFAULT_INT4_METHOD

    def describe(self) -> dict:
        d = {"weights": self.name}
        if self.name == "source":
            d.update(accuracy_level=self.accuracy_level,
                     scheme="the GGUF file's own blocks as MatMulNBits scale * (q - zp) + block offsets")
            if self.reblocks_narrow_types:
                d.update(narrow_types=f"{'/'.join(NARROW_TYPES)} re-quantized into symmetric 8-bit blocks of "
                                      f"{WIDE_BLOCK}")
            if self.lm_head_bits:
                d.update(lm_head_bits=self.lm_head_bits, lm_head_scheme="symmetric-rtn, re-quantized")
        if self.bits:
            kind = "symmetric" if self.symmetric else "asymmetric"
            d.update(block_size=self.block_size, accuracy_level=self.accuracy_level,
                     lm_head_bits=self.head_bits, scheme=f"{kind}-{self.method_for(self.bits)}")
            if self.method_for(self.head_bits) != self.method_for(self.bits):
                d["lm_head_scheme"] = f"{kind}-{self.method_for(self.head_bits)}"
        return d


# int4 from float weights: HQQ's zero-point fit, chosen by measurement over rtn and mse (Whisper
# tiny.en WER and teacher-forced KL against fp16: docs/quality.md, "int4 from full-precision weights").
DEFAULT_INT4_METHOD = "hqq"


DEFAULT_MAX_CONTEXT = 4096


def checked_context_and_precision(max_position: int, hidden: int, max_context: int | None, precision: str,
                                  **precision_options) -> tuple[int, Precision]:
    """The KV context to reserve (default: the model's, at most DEFAULT_MAX_CONTEXT) and the Precision,
    both checked against the model's limits; one ExportError sentence otherwise."""
    from edgeinfer.errors import ExportError

    ctx = int(max_context or min(max_position, DEFAULT_MAX_CONTEXT))
    if ctx < 16 or ctx > max_position:
        raise ExportError(f"--max-context {ctx} is outside 16..{max_position} (the model's limit).")
    block_size = precision_options.get("block_size", 32)
    if precision in ("int4", "int8") and hidden % block_size:
        raise ExportError(f"--block-size {block_size} does not divide the hidden size {hidden}: choose a "
                          "smaller power of two.")
    return ctx, Precision(precision, **precision_options)


def float_weight(g: GraphBuilder, name: str, array: np.ndarray, precision: Precision) -> str:
    """A float initializer: stored fp16 and cast up when the precision says fp16."""
    if precision.name == "fp16":
        stored = g.initializer(name + ".fp16", array.astype(np.float16))
        return g.op1("Cast", [stored], to=1)
    return g.initializer(name, array.astype(np.float32))


def linear(g: GraphBuilder, x: str, weight: np.ndarray, name: str, precision: Precision,
           bias: np.ndarray | None = None, bits: int | None = None) -> str:
    """``x @ weight.T (+ bias)`` for a PyTorch-layout weight (out, in)."""
    if isinstance(weight, BlockWeight):
        return _block_linear(g, x, weight, name, precision, bias)
    bits = bits if bits is not None else precision.bits
    n, k = weight.shape
    if bits:
        q = quantize_blockwise(weight, bits=bits, block_size=precision.block_size, symmetric=precision.symmetric,
                               method=precision.method_for(bits))
        inputs = [x, g.initializer(name + ".qweight", q.packed), g.initializer(name + ".scales", q.scales)]
        inputs.append("" if q.symmetric else g.initializer(name + ".zero_points", q.zero_points))
        if bias is not None:
            inputs += ["", g.initializer(name + ".bias", bias.astype(np.float32))]
        while inputs[-1] == "":
            inputs.pop()
        return g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=bits,
                     block_size=precision.block_size, accuracy_level=precision.accuracy_level)
    w = float_weight(g, name + ".weight", np.ascontiguousarray(weight.T), precision)
    y = g.op1("MatMul", [x, w], name=name)
    if bias is not None:
        y = g.op1("Add", [y, g.initializer(name + ".bias", bias.astype(np.float32))])
    return y


def _block_linear(g: GraphBuilder, x: str, weight: BlockWeight, name: str, precision: Precision,
                  bias: np.ndarray | None) -> str:
    """A GGUF block weight as MatMulNBits at the kernel's implicit zero point, plus the block offsets'
    product with the input when the type has them (see export/sources/gguf_tensors.py)."""
    n, k = weight.shape
    packed, scales = block_initializers(g, weight, name)
    inputs = [x, packed, scales]
    if bias is not None:
        inputs += ["", "", g.initializer(name + ".bias", bias.astype(np.float32))]
    y = g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=weight.bits,
              block_size=weight.block_size, accuracy_level=precision.accuracy_level)
    if weight.offsets is None:
        return y
    offsets = g.initializer(name + ".offsets", np.ascontiguousarray(weight.offsets.T))  # (K/block, N)
    return g.op1("Add", [y, g.op1("MatMul", [block_sums(g, x, k, weight.block_size), offsets])])


def block_initializers(g: GraphBuilder, weight: BlockWeight, name: str) -> tuple[str, str]:
    """MatMulNBits' packed weight (N, K/block, block*bits/8) and scales of a block weight."""
    n, k = weight.shape
    packed = pack_bits(weight.q, weight.bits).reshape(n, k // weight.block_size, -1)
    return g.initializer(name + ".qweight", packed), g.initializer(name + ".scales", weight.scales)


def block_sums(g: GraphBuilder, x: str, k: int, block: int) -> str:
    """Sums of X's last axis over blocks of BLOCK: (..., K) -> (..., K/block); one per input and block."""
    key = ("block_sums", x, block)
    if key not in g.shared_values:
        blocks = g.op1("Reshape", [x, g.const_i64([0, 0, k // block, block])])
        g.shared_values[key] = g.op1("ReduceSum", [blocks, g.const_i64([-1])], keepdims=0)
    return g.shared_values[key]


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    w = g.initializer(name + ".weight", weight.astype(np.float32))
    return g.op1("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=eps)


def skip_rms_norm(g: GraphBuilder, x: str, skip: str, weight: np.ndarray, eps: float,
                  name: str) -> tuple[str, str]:
    """Fused ``s = x + skip; rms_norm(s)``; returns (normed, s)."""
    w = g.initializer(name + ".weight", weight.astype(np.float32))
    out = g.op("SkipSimplifiedLayerNormalization", [x, skip, w], 4, domain=MS_DOMAIN, name=name,
               epsilon=eps)
    return out[0], out[3]


def embedding(g: GraphBuilder, ids: str, table: np.ndarray, name: str, precision: Precision,
              bits: int | None) -> tuple[str, str | None]:
    """Token embedding. Returns (hidden, shared_weight_prefix).

    For quantized tables the initializers are named like a MatMulNBits weight so
    that a tied LM head reuses them (GatherBlockQuantized reads the same layout).
    """
    if isinstance(table, BlockWeight):
        vocab, hidden = table.shape
        data, scales = block_table(g, table, name)
        h = g.op1("GatherBlockQuantized", [data, ids, scales], domain=MS_DOMAIN, name=name,
                  bits=table.bits, block_size=table.block_size, gather_axis=0, quantize_axis=1)
        if table.offsets is not None:  # + each block's offset, gathered per token
            per_block = g.op1("Reshape", [h, g.const_i64([0, 0, hidden // table.block_size, table.block_size])])
            offsets = g.op1("Gather", [g.initializer(name + ".offsets", table.offsets), ids], axis=0)
            h = g.op1("Add", [per_block, g.op1("Unsqueeze", [offsets, g.const_i64([-1])])])
            h = g.op1("Reshape", [h, g.const_i64([0, 0, hidden])])
        return h, name
    if bits:
        data, scales, zero_points = quantized_table(g, table, name, precision, bits)
        inputs = [data, ids, scales] + ([zero_points] if zero_points else [])
        h = g.op1("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=name,
                  bits=bits, block_size=precision.block_size, gather_axis=0, quantize_axis=1)
        return h, name
    w = float_weight(g, name + ".weight", table, precision)
    return g.op1("Gather", [w, ids], name=name, axis=0), None


def block_table(g: GraphBuilder, table: BlockWeight, name: str) -> tuple[str, str]:
    """A block-weight (vocab, hidden) table laid out for GatherBlockQuantized, (data, scales); a tied
    LM head reads the same initializers (``tied_lm_head``)."""
    data = pack_bits(table.q, table.bits).reshape(table.shape[0], -1)
    return g.initializer(name + ".qweight", data), g.initializer(name + ".scales", table.scales)


def quantized_table(g: GraphBuilder, table: np.ndarray, name: str, precision: Precision,
                    bits: int) -> tuple[str, str, str | None]:
    """Initializers of a block-quantized (vocab, hidden) table, laid out for both
    GatherBlockQuantized and (reshaped) MatMulNBits: (data, scales, zero points or None)."""
    q = quantize_blockwise(table, bits=bits, block_size=precision.block_size, symmetric=precision.symmetric,
                           method=precision.method_for(bits))
    data = g.initializer(name + ".qweight", q.packed.reshape(table.shape[0], -1))
    scales = g.initializer(name + ".scales", q.scales)
    zero_points = None if q.symmetric else g.initializer(name + ".zero_points", q.zero_points)
    return data, scales, zero_points


def tied_lm_head(g: GraphBuilder, x: str, shared: str, vocab: int, hidden: int, bits: int,
                 precision: Precision, name: str, table: BlockWeight | None = None) -> str:
    """LM head reading the embedding's quantized initializers (tied weights). TABLE: the
    embedding's block weight when it came from a GGUF file as is (its own bits and blocks)."""
    if table is not None:
        block = table.block_size
        packed = g.op1("Reshape", [shared + ".qweight", g.const_i64([vocab, -1, block * table.bits // 8])])
        y = g.op1("MatMulNBits", [x, packed, shared + ".scales"], domain=MS_DOMAIN, name=name, K=hidden, N=vocab,
                  bits=table.bits, block_size=block, accuracy_level=precision.accuracy_level)
        if table.offsets is None:
            return y
        offsets = g.op1("Transpose", [shared + ".offsets"])  # (hidden/block, vocab); folded at load
        return g.op1("Add", [y, g.op1("MatMul", [block_sums(g, x, hidden, block), offsets])])
    packed = g.op1("Reshape", [shared + ".qweight", g.const_i64([vocab, -1, precision.block_size * bits // 8])])
    inputs = [x, packed, shared + ".scales"]
    if not precision.symmetric:
        inputs.append(shared + ".zero_points")
    return g.op1("MatMulNBits", inputs, domain=MS_DOMAIN,
                 name=name, K=hidden, N=vocab, bits=bits, block_size=precision.block_size,
                 accuracy_level=precision.accuracy_level)


@dataclass(frozen=True)
class AttentionIO:
    """Graph-level names an attention layer reads and writes."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str
    seqlens_k: str
    total_seq_len: str
    cos_cache: str
    sin_cache: str
    # int8 KV (export/decoder/kv_precision.py): the scale initializers and the kernel's quantization type
    k_scale: str = ""
    v_scale: str = ""
    kv_quant_type: str = ""


def attention(g: GraphBuilder, x: str, w: dict[str, np.ndarray], io: AttentionIO, *, num_heads: int,
              kv_heads: int, head_dim: int, eps: float, scale: float, window: int, softcap: float,
              name: str, precision: Precision) -> str:
    """Self-attention with rotary, GQA and a KV buffer shared by past and present."""
    gqa_attrs = dict(num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, scale=scale,
                     local_window_size=window, softcap=softcap)
    scales = []
    if io.kv_quant_type:  # int8 buffers: the kernel quantizes new rows and dequantizes as it reads
        gqa_attrs.update(k_quant_type=io.kv_quant_type, v_quant_type=io.kv_quant_type, kv_cache_bit_width=8)
        # inputs 9-11 (position_ids, attention_bias, head_sink) unused; 12, 13: k_scale, v_scale
        scales = ["", "", "", io.k_scale, io.v_scale]
    if "q_norm" not in w:
        # One packed QKV matmul: fewer, larger kernels on the decode hot path.
        wqkv = concat_rows([w["q"], w["k"], w["v"]])
    if "q_norm" not in w and wqkv is not None:
        bias = np.concatenate([w["q_bias"], w["k_bias"], w["v_bias"]]) if "q_bias" in w else None
        qkv = linear(g, x, wqkv, f"{name}.qkv_proj", precision, bias=bias)
        q, k, v = qkv, "", ""
    elif "q_norm" not in w:  # a GGUF file with differently quantized q, k, v: three matmuls
        q, k, v = (linear(g, x, w[n], f"{name}.{n}_proj", precision, bias=w.get(f"{n}_bias")) for n in "qkv")
    else:
        q = linear(g, x, w["q"], f"{name}.q_proj", precision, bias=w.get("q_bias"))
        k = linear(g, x, w["k"], f"{name}.k_proj", precision, bias=w.get("k_bias"))
        v = linear(g, x, w["v"], f"{name}.v_proj", precision, bias=w.get("v_bias"))
        q = _per_head_rms_norm(g, q, w["q_norm"], head_dim, eps, f"{name}.q_norm")
        k = _per_head_rms_norm(g, k, w["k_norm"], head_dim, eps, f"{name}.k_norm")
    out = g.op("GroupQueryAttention",
               [q, k, v, io.past_key, io.past_value, io.seqlens_k, io.total_seq_len, io.cos_cache, io.sin_cache,
                *scales], 3, domain=MS_DOMAIN, name=f"{name}.attn",
               outputs=[f"{name}.attn/out", io.present_key, io.present_value], **gqa_attrs)
    return linear(g, out[0], w["o"], f"{name}.o_proj", precision)


def _per_head_rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, head_dim: int, eps: float, name: str) -> str:
    heads = g.op1("Reshape", [x, g.const_i64([0, 0, -1, head_dim], name + ".shape4")])
    normed = rms_norm(g, heads, weight, eps, name)
    return g.op1("Reshape", [normed, g.const_i64([0, 0, -1], name + ".shape3")])


def gated_mlp(g: GraphBuilder, x: str, w: dict[str, np.ndarray], activation: str, name: str,
              precision: Precision) -> str:
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one matmul."""
    inter = w["gate"].shape[0]
    fused = concat_rows([w["gate"], w["up"]])
    if fused is not None:
        gate_up = linear(g, x, fused, f"{name}.gate_up_proj", precision)
        gate, up = g.op("Split", [gate_up, g.const_i64([inter, inter], name + ".split")], 2, axis=-1)
    else:  # a GGUF file with differently quantized gate and up
        gate = linear(g, x, w["gate"], f"{name}.gate_proj", precision)
        up = linear(g, x, w["up"], f"{name}.up_proj", precision)
    if activation == "silu":
        act = g.op1("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0)  # x * sigmoid(x)
    elif activation == "gelu_tanh":
        act = g.op1("Gelu", [gate], approximate="tanh")
    elif activation == "gelu":
        act = g.op1("Gelu", [gate])
    else:
        raise ValueError(f"unsupported activation {activation}")
    return linear(g, g.op1("Mul", [act, up]), w["down"], f"{name}.down_proj", precision)


def rotary_cache(head_dim: int, max_len: int, theta: float,
                 scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_len, head_dim/2) for non-interleaved rotary embeddings."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind not in ("default", None):
        raise ValueError(f"rotary scaling '{kind}' is not supported yet")
    freqs = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
