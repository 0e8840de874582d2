"""The benchmark's models and where their packages, results and page live."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "build" / "moe-bench"
DOC = ROOT / "docs" / "moe.md"

CONFIG = dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, intermediate_size=3072, moe_intermediate_size=768,
              num_experts=48, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=320, rms_norm_eps=1e-6,
              max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu")

PKG = OUT / "pkg-int4"
PKG_INT8 = OUT / "pkg-int4-int8experts"
MOEFIED = OUT / "pkg-smollm2-moefied-int4"
MOEFIED_INT8 = OUT / "pkg-smollm2-moefied-int4-int8experts"
PKG_INT4CH = OUT / "pkg-int4-int4chexperts"
MOEFIED_INT4CH = OUT / "pkg-smollm2-moefied-int4-int4chexperts"
# name -> package: int4 experts (a prepacked session per loaded expert), int8-channel and int4-channel
# experts (weights fed to one shared graph), on the same weights; EXPERT_BITS: the export's expert_bits.
MODELS = {"random": PKG, "random-int8": PKG_INT8, "random-int4ch": PKG_INT4CH,
          "moefied": MOEFIED, "moefied-int8": MOEFIED_INT8, "moefied-int4ch": MOEFIED_INT4CH}
EXPERT_BITS = {"random": None, "random-int8": 8, "random-int4ch": 4, "moefied": None, "moefied-int8": 8,
               "moefied-int4ch": 4}
