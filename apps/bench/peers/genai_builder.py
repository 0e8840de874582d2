"""Run onnxruntime-genai's model builder, adapting what its Gemma-3 support reads.

Run with the genai peer venv, with the builder's own arguments:

    .venv-peers/genai/bin/python apps/bench/peers/genai_builder.py -i HF_DIR -o OUT -p int4 -e cpu

The builder (onnxruntime-genai 0.18) reads a Gemma-3 config in the shape that
transformers 4.x gave it: ``rope_local_base_freq`` for the sliding-window layers
and one flat ``rope_parameters`` dict. transformers 5.x, which the peer venv
installs, keeps one RoPE entry per layer type instead, and the builder stops
with ``KeyError: 'rope_type'``. This wrapper fills in the 4.x fields from the
5.x ones (same values: global theta from ``full_attention``, local theta from
``sliding_attention``) and then runs the builder unchanged. Other models pass
through untouched.
"""

from __future__ import annotations

import runpy

from transformers import AutoConfig

_from_pretrained = AutoConfig.from_pretrained


def _adapted(*args, **kwargs):
    config = _from_pretrained(*args, **kwargs)
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        text.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        text.rope_parameters = dict(rope["full_attention"])
    return config


AutoConfig.from_pretrained = _adapted

if __name__ == "__main__":
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
