"""Every hand-built family against transformers on tiny random models:
fp32 logits within 1e-4 and 32 identical greedy tokens, with one stage and two."""

import numpy as np
import pytest
import torch
from edgeinfer.export.check import reference_greedy
from transformers import AutoModelForCausalLM

import edgeinfer

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPTS = ["Paris is the capital of", "def add(a, b):", "The quick brown fox jumps over the lazy dog. Once upon"]


@pytest.mark.parametrize("stages", [(), (2,)], ids=["1-stage", "2-stages"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers(family, stages, tiny_models, tiny_packages):
    hf = AutoModelForCausalLM.from_pretrained(tiny_models(family), dtype=torch.float32).eval()
    model = edgeinfer.load(tiny_packages(family, "fp32", stages))
    assert len(model.decoder.stages) == len(stages) + 1
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        ref_tokens, ref_logits = reference_greedy(hf, ids, 32)
        model.reset()
        logits = model.decoder.forward(ids, logits_to_keep=len(ids))
        assert np.abs(logits - ref_logits).max() < 1e-4
        model.reset()
        got = model.complete(ids, max_new_tokens=32, ignore_eos=True).tokens
        assert got == ref_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_steps_match_one_pass(family, tiny_packages):
    """Logits of a prompt fed in chunks, then token by token, equal one full pass."""
    model = edgeinfer.load(tiny_packages(family, "fp32"))
    ids = model.tokenizer.encode(" ".join(PROMPTS))
    full = model.decoder.forward(ids, logits_to_keep=len(ids))
    model.reset()
    parts = [model.decoder.forward(ids[:5], logits_to_keep=5), model.decoder.forward(ids[5:9], logits_to_keep=4)]
    parts += [model.decoder.step(t)[None].copy() for t in ids[9:]]
    assert np.abs(np.concatenate(parts) - full).max() < 1e-4


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantized_packages_track_fp32(family, precision, tiny_packages):
    """Quantized graphs stay close to fp32 (random weights make tokens near-ties, so compare logits)."""
    ref = edgeinfer.load(tiny_packages(family, "fp32"))
    q = edgeinfer.load(tiny_packages(family, precision))
    ids = ref.tokenizer.encode(PROMPTS[0])
    a = ref.decoder.forward(ids, logits_to_keep=len(ids))
    b = q.decoder.forward(ids, logits_to_keep=len(ids))
    tol = {"fp16": 1e-2, "int8": 0.1, "int4": 0.6}[precision]
    assert np.abs(a - b).max() < tol * max(1.0, np.abs(a).max())
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr > {"fp16": 0.9999, "int8": 0.99, "int4": 0.9}[precision]
