"""What an encoder-decoder graph needs to know about a family: dimensions and quirks.

A family module (``whisper``, later ``t5``/``bart``) turns its source weights into
the canonical names below, so the graph builder in ``export/seq2seq_graph.py``
never sees a family's own naming:

    enc.conv{1,2}.{w,b}, enc.pos                      (audio front-end, Whisper)
    enc.embed                                         (token front-end)
    enc.{i}.attn_norm.{w,b}   enc.{i}.attn.{q,k,v,o}.{w,b}
    enc.{i}.mlp_norm.{w,b}    enc.{i}.fc1.{w,b}  enc.{i}.fc2.{w,b}
    enc.norm.{w,b}
    dec.embed, dec.pos
    dec.{i}.self_norm / self.{q,k,v,o} / cross_norm / cross.{q,k,v,o} / mlp_norm / fc1 / fc2
    dec.norm.{w,b}, lm_head.w (absent = tied to dec.embed)

Biases that a family lacks (Whisper's k projections) are simply absent.
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
    norm: str = "layer"  # "layer" (LayerNorm with bias) or "rms"
    norm_eps: float = 1e-5
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def as_manifest(self) -> dict:
        d = asdict(self)
        d["head_dim"] = self.head_dim
        return d
