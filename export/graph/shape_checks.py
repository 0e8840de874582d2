"""Shapes a graph must have to run, checked before anything is built.

onnxruntime's GroupQueryAttention (com.microsoft, CPU kernel, checked on 1.32) refuses at *run time*
any head size that is not a multiple of 16 ("head_size shall be a multiple of 16"), with or without
fused rotary; its cos/sin cache width must be a multiple of 8. An exporter that builds GQA for such a
model writes a package that never runs. Two ways out, both here:

* :func:`check_attention_shapes` refuses at export time with one sentence, or
* the model is exported with every head zero-padded to :func:`padded_head_dim`, which is exact:
  padded query/key dimensions add 0 to every dot product, padded value dimensions produce outputs
  that the padded (zero) input columns of o_proj ignore, the rotary halves are padded separately so
  each (i, i + d/2) pair stays a pair, and a per-head RMSNorm over the padded head is corrected by
  its weight and epsilon. :func:`pad_head_rows`, :func:`pad_head_columns`, :func:`pad_rotary_cache`
  and :func:`pad_head_norm` transform the weights; the graph and the KV cache then use the padded
  head size (KV cache and attention cost padded / head_dim: 4/3 for OLMoE-shaped 24-wide heads).
  Gemma's (1 + w) norm offset is folded into the weights before they are padded.
"""

from __future__ import annotations

import numpy as np

from edgeinfer.errors import ExportError

GQA_HEAD_MULTIPLE = 16
GQA_ROTARY_MULTIPLE = 8  # cos/sin cache columns (head_size / 2 with full rotary)
# targets whose graphs use GroupQueryAttention (the npu target builds its attention from plain ops)
GQA_TARGETS = ("cpu", "gpu")


def gqa_supports(head_dim: int) -> bool:
    """Whether onnxruntime's GroupQueryAttention runs heads of this size."""
    return head_dim > 0 and head_dim % GQA_HEAD_MULTIPLE == 0 and (head_dim // 2) % GQA_ROTARY_MULTIPLE == 0


def padded_head_dim(head_dim: int) -> int:
    """The smallest head size GroupQueryAttention runs that holds HEAD_DIM (HEAD_DIM itself when it runs)."""
    if head_dim <= 0 or head_dim % 2:
        raise ExportError(f"a head size of {head_dim} cannot carry rotary embeddings (it must be even and "
                          "positive): this model cannot be exported.")
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def check_attention_shapes(head_dim: int, target: str = "cpu", family: str = "this model",
                           pad: bool = False) -> int:
    """The head size to build the graphs with, or a one-sentence ExportError.

    Returns HEAD_DIM when GroupQueryAttention runs it (or TARGET does not use GQA); with PAD, the
    padded head size (the caller then pads the weights with the functions below); without PAD, a
    head size GQA cannot run is refused."""
    if target not in GQA_TARGETS or gqa_supports(head_dim):
        return head_dim
    padded = padded_head_dim(head_dim)
    if pad:
        return padded
    raise ExportError(f"{family} has attention heads of size {head_dim}, which onnxruntime's "
                      f"GroupQueryAttention cannot run (it needs a multiple of {GQA_HEAD_MULTIPLE}): this model "
                      f"cannot be exported for the {target} target.")


def check_config_attention(cfg: dict, target: str = "cpu", pad: bool = False) -> int:
    """:func:`check_attention_shapes` for a Hugging Face config dict (dense, MoE, or with a text_config):
    call it in export_model before the family's graphs are built, MoE included."""
    text = cfg.get("text_config", cfg)
    try:
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0  # not an attention model this check knows; the family module reports what is missing
    return check_attention_shapes(head_dim, target, family=str(cfg.get("model_type") or "this model"), pad=pad)


def _head_slots(head_dim: int, padded: int) -> np.ndarray:
    """Where each of a head's HEAD_DIM dimensions goes in the padded head: the first rotary half at
    0.., the second at padded/2.. (GQA's rotary pairs dimension i with i + size/2)."""
    half, phalf = head_dim // 2, padded // 2
    return np.concatenate([np.arange(half), phalf + np.arange(half)])


def pad_head_rows(w: np.ndarray, heads: int, head_dim: int, padded: int) -> np.ndarray:
    """A q/k/v projection (HF layout: out = heads*head_dim rows, or a bias vector) with each head's rows
    moved to their padded slots and zero rows between."""
    if padded == head_dim:
        return w
    rows = w.reshape(heads, head_dim, *w.shape[1:])
    out = np.zeros((heads, padded, *w.shape[1:]), dtype=w.dtype)
    out[:, _head_slots(head_dim, padded)] = rows
    return out.reshape(heads * padded, *w.shape[1:])


def pad_head_columns(w: np.ndarray, heads: int, head_dim: int, padded: int) -> np.ndarray:
    """o_proj (HF layout: hidden rows, heads*head_dim columns) reading the padded attention output."""
    if padded == head_dim:
        return w
    cols = w.reshape(w.shape[0], heads, head_dim)
    out = np.zeros((w.shape[0], heads, padded), dtype=w.dtype)
    out[:, :, _head_slots(head_dim, padded)] = cols
    return out.reshape(w.shape[0], heads * padded)


def pad_rotary_cache(cos: np.ndarray, sin: np.ndarray, padded: int) -> tuple[np.ndarray, np.ndarray]:
    """GQA's (positions, head_dim/2) cos/sin caches widened to padded/2 columns: the padded pairs rotate
    by angle 0 (cos 1, sin 0), so the zeros in them stay zeros."""
    width = padded // 2
    if cos.shape[-1] == width:
        return cos, sin
    c = np.ones((*cos.shape[:-1], width), dtype=cos.dtype)
    s = np.zeros((*sin.shape[:-1], width), dtype=sin.dtype)
    c[..., :cos.shape[-1]], s[..., :sin.shape[-1]] = cos, sin
    return c, s


def pad_head_norm(weight: np.ndarray, eps: float, head_dim: int, padded: int) -> tuple[np.ndarray, float]:
    """A per-head RMSNorm (Qwen3 / Gemma3 q_norm, k_norm) computed over the padded head, made exact.

    Over PADDED dimensions of which only HEAD_DIM are non-zero, mean(x^2) shrinks by d/p. With
    eps' = eps * d/p the normalizer is sqrt(p/d) times the true one's inverse; a weight scaled by
    sqrt(d/p) undoes that. The padded slots get weight 0 (their input is 0 anyway)."""
    if padded == head_dim:
        return weight, eps
    ratio = head_dim / padded
    out = np.zeros(padded, dtype=weight.dtype)
    out[_head_slots(head_dim, padded)] = weight * np.sqrt(ratio)
    return out, eps * ratio
