"""What an encoder-decoder graph needs to know about a family: dimensions and quirks.

A family module (``whisper``, later ``t5``/``bart``) turns its source weights into
the canonical names below, so the graph builder in ``export/seq2seq/graph.py``
never sees a family's own naming:

    enc.conv{1,2}.{w,b}, enc.pos                      (audio front-end, Whisper)
    enc.embed, enc.pos, enc.embed_norm.{w,b}          (token front-end; pos and embed_norm optional)
    enc.rel_bias, dec.rel_bias                        (T5: (2L-1, heads) bias by relative position)
    enc.{i}.attn_norm.{w,b}   enc.{i}.attn.{q,k,v,o}.{w,b}
    enc.{i}.mlp_norm.{w,b}    enc.{i}.fc1.{w,b}  enc.{i}.fc2.{w,b}
    enc.norm.{w,b}
    dec.embed, dec.pos, dec.embed_norm.{w,b}
    dec.{i}.self_norm / self.{q,k,v,o} / cross_norm / cross.{q,k,v,o} / mlp_norm / fc1 / fc2
    dec.norm.{w,b}, lm_head.w (absent = tied to dec.embed), lm_head.b (final_logits_bias)
    {enc,dec}.{i}.fc_gate.w                           (gated MLPs)

Biases, norms and tables that a family lacks are simply absent; position tables
start at position 0 (BART's offset of 2 is sliced off when mapping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Seq2SeqSpec:
    family: str
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    ffn: int
    vocab_size: int
    max_source_positions: int  # encoder positions (Whisper: 1500 frames after the stride-2 conv)
    max_target_positions: int  # decoder positions
    frontend: str = "audio"  # "audio" (conv over log-mel) or "tokens"
    num_mel_bins: int = 80
    norm: str = "layer"  # "layer" (LayerNorm with bias) or "rms" (T5: no mean, no bias)
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False: BART/Marian normalise after each residual add
    activation: str = "gelu"  # gelu | gelu_tanh | relu | silu
    gated: bool = False  # T5 v1.1: act(fc_gate(x)) * fc1(x)
    kv_dim: int | None = None  # per-head width when not d_model / heads (T5's d_kv)
    attention_scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1
    position: str = "table"  # "table" (learned or sinusoidal rows) or "relative" (T5 bucketed bias)
    embed_scale: float = 1.0  # BART/Marian scale_embedding: sqrt(d_model)
    head_scale: float = 1.0  # T5 with tied head: d_model ** -0.5 before the head

    @property
    def head_dim(self) -> int:
        return self.kv_dim or self.d_model // self.heads

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    def as_manifest(self) -> dict:
        d = asdict(self)
        d["head_dim"] = self.head_dim
        return d


class WeightMap:
    """Collects canonical weights from a transformers state dict: ``linear`` copies a module's
    weight (and bias, when there is one); ``attention`` the four projections of a BART-style
    attention block (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, sd: dict):
        self.sd, self.w = sd, {}

    def linear(self, dst: str, src: str) -> None:
        self.w[f"{dst}.w"] = self.sd[f"{src}.weight"]
        if f"{src}.bias" in self.sd:
            self.w[f"{dst}.b"] = self.sd[f"{src}.bias"]

    def attention(self, dst: str, src: str) -> None:
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            self.linear(f"{dst}.{a}", f"{src}.{b}")

    def bart_layer(self, side: str, i: int, src: str) -> None:
        """Layer I of the encoder (SIDE "enc") or decoder ("dec") from a BART-style layer SRC
        (self_attn, encoder_attn on the decoder side, fc1/fc2, one layer norm each): BART,
        mBART, Marian and Whisper name their layers alike in transformers."""
        if side == "enc":
            self.linear(f"enc.{i}.attn_norm", f"{src}.self_attn_layer_norm")
            self.attention(f"enc.{i}.attn", f"{src}.self_attn")
        else:
            self.linear(f"dec.{i}.self_norm", f"{src}.self_attn_layer_norm")
            self.attention(f"dec.{i}.self", f"{src}.self_attn")
            self.linear(f"dec.{i}.cross_norm", f"{src}.encoder_attn_layer_norm")
            self.attention(f"dec.{i}.cross", f"{src}.encoder_attn")
        self.linear(f"{side}.{i}.mlp_norm", f"{src}.final_layer_norm")
        self.linear(f"{side}.{i}.fc1", f"{src}.fc1")
        self.linear(f"{side}.{i}.fc2", f"{src}.fc2")
