"""The benchmark models' weights and their export: a random Qwen3-MoE-shaped decoder whose tensors
are generated on access, and SmolLM2-135M with its MLPs cut into experts (MoEfied)."""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .kmeans import balanced_clusters
from .models import CONFIG, EXPERT_BITS, MODELS, MOEFIED, PKG, ROOT

SMOL = ROOT / "build" / "smollm2-hf"
MOEFY_EXPERTS, MOEFY_TOP_K = 16, 4
PRECISION = "int4"


class RandomWeights(Mapping):
    """A state dict whose tensors are generated on access (seeded by name): nothing is kept."""

    def __init__(self, cfg: dict):
        h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        hd, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        e, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
        self.shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
                       "lm_head.weight": (cfg["vocab_size"], h)}
        for i in range(n_layers):
            p = f"model.layers.{i}."
            self.shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * inter, h),
                p + "mlp.experts.down_proj": (e, h, inter)})

    def __getitem__(self, key: str) -> np.ndarray:
        shape = self.shapes[key]
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if len(shape) == 1:  # norms: around one
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if key == "model.embed_tokens.weight":
            # Token identity must dominate the residual stream, or every token routes alike: with
            # embeddings as small as the random layers' outputs, 24 layers in, all tokens chose the
            # same ~8 of 48 experts (measured) -- a cache's best case, not the uniform worst case.
            return rng.standard_normal(shape, dtype=np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def __contains__(self, key) -> bool:  # without generating the tensor
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build(out: Path = PKG, expert_bits: int | None = None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer
    from edgeinfer.export import export_model
    from edgeinfer.export.sources.load import SourceModel

    tok = make_tokenizer(CONFIG["vocab_size"])
    src = SourceModel(name="random-qwen3-moe-24x48", kind="hf-folder", location="random (apps/bench/moe.py)",
                      config=dict(CONFIG), state_dict=RandomWeights(CONFIG),
                      tokenizer_json=tok.backend_tokenizer.to_str(), chat_template=None,
                      special={"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 0})
    t0 = time.perf_counter()
    res = export_model(src, out, "int4", max_context=512, force=True, progress=True, expert_bits=expert_bits)
    store = res.manifest["moe"]["expert_store"]
    print(f"exported {out} in {time.perf_counter() - t0:.0f} s: {res.size_bytes / 1e9:.2f} GB, expert store "
          f"{store['total_bytes'] / 1e9:.2f} GB ({store['record_size']} bytes per expert)")


class MoefiedWeights(Mapping):
    """SmolLM2-135M with each MLP cut into experts (MoEfication): neurons clustered by their gate
    vectors, the router made of the clusters' mean gate vectors.

    MoEfication sums the selected experts unweighted; the runtime weights them by renormalized
    softmax probabilities. Scaling the router by a tiny factor keeps its ranking (the same experts
    are chosen) but makes the probabilities nearly equal, so each selected expert's weight is ~1/k;
    down projections are multiplied by k. With k = all experts this is the dense model again."""

    def __init__(self, sd: dict, layers: int, experts: int, top_k: int):
        self.sd, self.layers, self.experts, self.top_k = sd, layers, experts, top_k
        self.keys = [k for k in sd if ".mlp." not in k]
        for i in range(layers):
            p = f"model.layers.{i}.mlp."
            self.keys += [p + "gate.weight", p + "experts.gate_up_proj", p + "experts.down_proj"]
        self._split: dict[int, tuple] = {}

    def _layer(self, i: int):
        if i not in self._split:
            p = f"model.layers.{i}.mlp."
            gate, up = self.sd[p + "gate_proj.weight"], self.sd[p + "up_proj.weight"]
            down = self.sd[p + "down_proj.weight"]
            assign = balanced_clusters(gate, self.experts, seed=i)
            groups = [np.nonzero(assign == c)[0] for c in range(self.experts)]
            router = (1e-3 * np.stack([gate[g].mean(axis=0) for g in groups])).astype(np.float32)
            gate_up = np.stack([np.concatenate([gate[g], up[g]]) for g in groups]).astype(np.float32)
            down_e = np.stack([down[:, g] * self.top_k for g in groups]).astype(np.float32)
            self._split = {i: (router, gate_up, down_e)}  # one layer at a time
        return self._split[i]

    def __getitem__(self, key: str) -> np.ndarray:
        if ".mlp." not in key:
            return self.sd[key]
        i = int(key.split(".")[2])
        part = {"gate.weight": 0, "experts.gate_up_proj": 1, "experts.down_proj": 2}[key.split(".mlp.")[1]]
        return self._layer(i)[part]

    def __contains__(self, key) -> bool:
        return key in self.keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def build_moefied(out: Path = MOEFIED, expert_bits: int | None = None, top_k: int = MOEFY_TOP_K) -> None:
    """TOP_K: experts per token (all 16: the dense model again, cut into experts -- for quality checks)."""
    from edgeinfer.export import export_model
    from edgeinfer.export.sources.load import load_source

    # The transformers folder if apps/bench/peers/prepare_hf.py made one, else the alias (the same GGUF).
    src = load_source(str(SMOL) if (SMOL / "config.json").exists() else "smollm2-135m")
    cfg = src.config
    inter = int(cfg["intermediate_size"]) // MOEFY_EXPERTS
    src.config = dict(model_type="mixtral", hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                      num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                      head_dim=cfg.get("head_dim"), intermediate_size=inter, num_local_experts=MOEFY_EXPERTS,
                      num_experts_per_tok=top_k, vocab_size=cfg["vocab_size"], rms_norm_eps=cfg["rms_norm_eps"],
                      max_position_embeddings=cfg["max_position_embeddings"],
                      rope_parameters=cfg.get("rope_parameters"),
                      rope_theta=cfg.get("rope_theta", 100000.0), tie_word_embeddings=cfg["tie_word_embeddings"],
                      hidden_act="silu")
    src.state_dict = MoefiedWeights(src.state_dict, int(cfg["num_hidden_layers"]), MOEFY_EXPERTS, top_k)
    src.name = "smollm2-135m-moefied"
    res = export_model(src, out, PRECISION, max_context=1024, force=True, progress=True, expert_bits=expert_bits)
    store = res.manifest["moe"]["expert_store"]
    print(f"exported {out}: expert store {store['total_bytes'] / 1e6:.1f} MB ({store['record_size']} bytes per expert)")


def build_model(model: str) -> None:
    (build if model.startswith("random") else build_moefied)(MODELS[model], EXPERT_BITS[model])
