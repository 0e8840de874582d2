"""Head sizes GroupQueryAttention cannot run: refused at export, or padded exactly."""

from __future__ import annotations

import numpy as np
import pytest
from edgeinfer.export.graph.shape_checks import (
    check_attention_shapes,
    check_config_attention,
    gqa_supports,
    pad_head_columns,
    pad_head_norm,
    pad_head_rows,
    pad_rotary_cache,
    padded_head_dim,
)

from edgeinfer.errors import ExportError

H, KV, HIDDEN, EPS = 4, 2, 40, 1e-6


def test_check_refuses_or_pads():
    assert [d for d in range(2, 140, 2) if gqa_supports(d)] == list(range(16, 140, 16))
    assert check_attention_shapes(64) == 64 and check_attention_shapes(256, "gpu") == 256
    assert check_attention_shapes(24, "npu") == 24  # static QDQ graphs do not use GQA
    refusal = r"^olmoe has attention heads of size 24, .*multiple of 16\): this model cannot be exported for the cpu"
    with pytest.raises(ExportError, match=refusal + r" target\.$"):
        check_attention_shapes(24, family="olmoe")
    assert check_attention_shapes(24, pad=True) == 32 and padded_head_dim(72) == 80
    with pytest.raises(ExportError, match="must be even"):
        check_attention_shapes(23, pad=True)


def _gqa_session(head_dim: int, scale: float):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl", "cos", "sin"],
                            ["o", "present_k", "present_v"], domain="com.microsoft", num_heads=H, kv_num_heads=KV,
                            do_rotary=1, scale=scale)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, None, H * head_dim]),
              helper.make_tensor_value_info("k", f, [1, None, KV * head_dim]),
              helper.make_tensor_value_info("v", f, [1, None, KV * head_dim]),
              helper.make_tensor_value_info("pk", f, [1, KV, None, head_dim]),
              helper.make_tensor_value_info("pv", f, [1, KV, None, head_dim]),
              helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("tl", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", f, [None, head_dim // 2]),
              helper.make_tensor_value_info("sin", f, [None, head_dim // 2])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "present_k", "present_v")]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    from edgeinfer.runtimes.cpu import compatible_session_options  # works after the runtime's global pool is set

    return ort.InferenceSession(model.SerializeToString(), compatible_session_options(),
                                providers=["CPUExecutionProvider"])


def _rms(x, w, eps, d):
    heads = x.reshape(*x.shape[:-1], -1, d)
    return (heads / np.sqrt((heads ** 2).mean(-1, keepdims=True) + eps) * w).reshape(x.shape)


def _reference(x, wq, wk, wv, wo, bq, qn, kn, cos, sin, d):
    """Plain causal GQA with rotate-half rotary, in float64."""
    n = len(x)
    q, k, v = x @ wq.T + bq, x @ wk.T, x @ wv.T
    if qn is not None:
        q, k = _rms(q, qn, EPS, d), _rms(k, kn, EPS, d)
    q, k, v = q.reshape(n, H, d), k.reshape(n, KV, d), v.reshape(n, KV, d)

    def rotate(t):
        c, s = np.concatenate([cos[:n]] * 2, -1)[:, None], np.concatenate([sin[:n]] * 2, -1)[:, None]
        return t * c + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * s

    q, k = rotate(q), rotate(k)
    out = np.zeros((n, H, d))
    for h in range(H):
        scores = q[:, h] @ k[:, h // (H // KV)].T * d ** -0.5 + np.triu(np.full((n, n), -np.inf), 1)
        p = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ v[:, h // (H // KV)]
    return out.reshape(n, H * d) @ wo.T


@pytest.mark.parametrize("qk_norm", [False, True])
def test_padded_heads_run_and_match(qk_norm):
    """A 24-wide head fails in GQA; padded to 32 with these functions it gives the same attention, over a
    prefill and a decode step that reads the padded KV cache."""
    d = 24
    p = check_attention_shapes(d, pad=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, HIDDEN))
    wq, wk, wv = (rng.standard_normal((n * d, HIDDEN)) * 0.3 for n in (H, KV, KV))
    wo, bq = rng.standard_normal((HIDDEN, H * d)) * 0.3, rng.standard_normal(H * d) * 0.1
    qn, kn = (1 + 0.2 * rng.standard_normal(d), 1 + 0.2 * rng.standard_normal(d)) if qk_norm else (None, None)
    cap = 16
    angles = np.arange(cap)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angles), np.sin(angles)
    expect = _reference(x, wq, wk, wv, wo, bq, qn, kn, cos, sin, d)

    with pytest.raises(Exception, match="multiple of 16"):  # the shape the issue found: fails at run time
        sess = _gqa_session(d, d ** -0.5)
        z = np.zeros
        sess.run(None, dict(q=z((1, 1, H * d), np.float32), k=z((1, 1, KV * d), np.float32),
                            v=z((1, 1, KV * d), np.float32), pk=z((1, KV, cap, d), np.float32),
                            pv=z((1, KV, cap, d), np.float32), sl=np.array([0], np.int32),
                            tl=np.array(1, np.int32), cos=cos[:, :d // 2].astype(np.float32),
                            sin=sin[:, :d // 2].astype(np.float32)))

    pq, pk, pv = pad_head_rows(wq, H, d, p), pad_head_rows(wk, KV, d, p), pad_head_rows(wv, KV, d, p)
    pbq, pwo = pad_head_rows(bq, H, d, p), pad_head_columns(wo, H, d, p)
    pcos, psin = pad_rotary_cache(cos, sin, p)
    sess = _gqa_session(p, d ** -0.5)  # the scale stays the true head size's
    past_k = np.zeros((1, KV, cap, p), np.float32)
    past_v = np.zeros((1, KV, cap, p), np.float32)

    def step(rows, start):
        q, k, v = rows @ pq.T + pbq, rows @ pk.T, rows @ pv.T
        if qk_norm:
            (qw, qe), (kw, ke) = pad_head_norm(qn, EPS, d, p), pad_head_norm(kn, EPS, d, p)
            q, k = _rms(q, qw, qe, p), _rms(k, kw, ke, p)
        n = len(rows)
        out, pk_, pv_ = sess.run(None, dict(
            q=q[None].astype(np.float32), k=k[None].astype(np.float32), v=v[None].astype(np.float32),
            pk=past_k, pv=past_v, sl=np.array([start + n - 1], np.int32), tl=np.array(start + n, np.int32),
            cos=pcos.astype(np.float32), sin=psin.astype(np.float32)))
        past_k[:], past_v[:] = pk_, pv_
        return out[0] @ pwo.T

    got = np.concatenate([step(x[:5], 0), step(x[5:], 5)])
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_padding_is_identity_when_gqa_runs():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    wt = w.T
    assert pad_head_rows(w, 1, 64, 64) is w and pad_head_columns(wt, 1, 64, 64) is wt
    assert pad_head_norm(w[:, 0], 1e-6, 64, 64)[1] == 1e-6


def test_config_check_covers_moe_and_text_configs():
    olmoe = {"model_type": "olmoe", "hidden_size": 96, "num_attention_heads": 4, "num_experts": 8}
    with pytest.raises(ExportError, match="^olmoe has attention heads of size 24"):
        check_config_attention(olmoe)
    assert check_config_attention(olmoe, pad=True) == 32
    assert check_config_attention({"model_type": "gemma3", "text_config": {"hidden_size": 640,
                                   "num_attention_heads": 4, "head_dim": 256}}) == 256
    assert check_config_attention({"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9}) == 64
    assert check_config_attention({"model_type": "whisper"}) == 0
