"""Families without a hand-built graph go through optimum as one monolithic graph
(plain and lookup decoding only), and say so."""

import json

import numpy as np
import pytest
import torch
from edgeinfer.export import export_model
from edgeinfer.export.check import reference_greedy
from transformers import AutoModelForCausalLM

import edgeinfer
from edgeinfer.errors import ExportError

PROMPTS = ["Paris is the capital of", "def add(a, b):"]


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    return tiny_models("gpt2")


def test_monolithic_fp32_matches_transformers(gpt2, tmp_path, capfd):
    out = tmp_path / "gpt2-fp32"
    export_model(str(gpt2), out, "fp32", max_context=128, progress=False)
    assert "exporting through optimum as one monolithic graph" in capfd.readouterr().err
    manifest = json.loads((out / "edgeinfer.json").read_text())
    assert manifest["exporter"]["via"] == "optimum" and manifest["graphs"][0]["role"] == "monolithic"
    hf = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32).eval()
    model = edgeinfer.load(out)
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        ref, ref_logits = reference_greedy(hf, ids, 32)
        model.reset()
        assert np.abs(model.decoder.forward(ids, logits_to_keep=len(ids)) - ref_logits).max() < 1e-4
        model.reset()
        assert model.complete(ids, max_new_tokens=32, ignore_eos=True).tokens == ref
        assert model.complete(ids, max_new_tokens=32, ignore_eos=True, strategy="lookup").tokens == ref


def test_monolithic_int4_runs_and_stays_close(gpt2, tmp_path):
    ref = tmp_path / "f"
    q = tmp_path / "q"
    export_model(str(gpt2), ref, "fp32", max_context=128, progress=False)
    export_model(str(gpt2), q, "int4", max_context=128, progress=False)
    a, b = edgeinfer.load(ref), edgeinfer.load(q)
    ids = a.tokenizer.encode(PROMPTS[0])
    la, lb = a.decoder.forward(ids, logits_to_keep=len(ids)), b.decoder.forward(ids, logits_to_keep=len(ids))
    assert np.corrcoef(la.ravel(), lb.ravel())[0, 1] > 0.9
    assert b.complete(PROMPTS[0], max_new_tokens=8, ignore_eos=True).new_tokens == 8
    assert (q / "graphs" / "model.onnx").stat().st_size < (ref / "graphs" / "model.onnx").stat().st_size * 2


def test_monolithic_refuses_stages_and_exit_strategies(gpt2, tmp_path):
    with pytest.raises(ExportError, match="stages and exits need one"):
        export_model(str(gpt2), tmp_path / "x", "fp32", exits=[1])
    out = tmp_path / "m"
    export_model(str(gpt2), out, "fp32", max_context=64, progress=False)
    with pytest.raises(edgeinfer.GenerationError, match="no early exits"):
        edgeinfer.load(out).complete("hi", strategy="self-speculative")
