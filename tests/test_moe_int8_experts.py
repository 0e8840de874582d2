"""int8-channel experts (``expert_bits=8``): routed experts stored as per-channel int8 and
fed to one shared graph, so loading an expert builds no session. They must still match
transformers (greedy tokens; logits as closely as int8 weights and activations allow),
with every expert cached and with a cache that keeps reloading, prompt and one-token paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_moe import PROMPT, few_experts_budget, moe_models, reference_greedy, reference_logits  # noqa: F401

from edgeinfer.errors import ExportError


@pytest.fixture(scope="module")
def int8_expert_packages(moe_models, tmp_path_factory):  # noqa: F811
    """family -> (transformers model, package with fp32 dense weights and int8-channel experts)."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("moe-int8-experts")
    made: dict = {}

    def get(family: str, precision: str = "fp32"):
        if (family, precision) not in made:
            model, hf, _ = moe_models(family)
            pkg = root / f"{family}-{precision}"
            export_model(str(hf), pkg, precision, max_context=128, expert_bits=8, progress=False)
            made[family, precision] = (model, pkg)
        return made[family, precision]

    return get


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_int8_channel_experts_match_transformers(int8_expert_packages, family):
    import edgeinfer

    hf_model, pkg = int8_expert_packages(family)
    index = json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]
    assert index["precision"] == "int8-channel" and index["weights_as_inputs"] is True
    dtypes = {t["name"]: t["dtype"] for t in index["tensors"]}
    assert dtypes["gate_up.qweight"] == "int8" and dtypes["down.scales"] == "float32"
    ref = reference_logits(hf_model, PROMPT)
    greedy = reference_greedy(hf_model, PROMPT, 8)
    for budget in (None, few_experts_budget(pkg)):
        model = edgeinfer.load(pkg, memory_budget=budget)
        dec = model.decoder
        assert dec.cache.expert_bytes == index["record_size"]  # the record alone: no prepacked copy
        got = dec.forward(PROMPT, logits_to_keep=len(PROMPT))
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 0.02, err
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
        dec.reset()  # one token at a time: bindings over the cached records
        dec.forward(PROMPT[:3])
        steps = np.stack([dec.step(t).copy() for t in PROMPT[3:]])
        # Not bit-equal to the prompt path: int8 activations are scaled over the rows run together.
        assert np.abs(steps - ref[3:]).max() / np.abs(ref).max() < 0.02
        res = model.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
        assert res.tokens == greedy, (budget, res.tokens, greedy)
        stats = res.stats["experts"]
        if budget is not None:
            assert stats["misses"] + stats["late_prefetches"] > 0 and dec.cache.resident_bytes <= budget
        built = [e for layer in dec.cache.layers.values() for e in layer.values() if e.session is not None]
        assert built and all(e.session is dec.cache.shared_session for e in built)  # no session per expert
        dec.close()


def test_int4_package_with_int8_experts(moe_models, int8_expert_packages, tmp_path):  # noqa: F811
    """The useful mix for streaming: int4 attention and head, int8 experts. Its experts are finer than
    int4 ones, so it must track transformers at least as well as the all-int4 package."""
    from edgeinfer.export import export_model

    import edgeinfer

    hf_model, hf, _ = moe_models("qwen3_moe")
    _, mixed = int8_expert_packages("qwen3_moe", "int4")
    plain = tmp_path / "int4"
    export_model(str(hf), plain, "int4", max_context=128, progress=False)
    ref = reference_logits(hf_model, PROMPT).ravel()
    corr = {}
    for name, pkg in (("mixed", mixed), ("int4", plain)):
        got = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg)).decoder.forward(PROMPT, len(PROMPT))
        corr[name] = np.corrcoef(got.ravel(), ref)[0, 1]
    assert corr["mixed"] > 0.95 and corr["mixed"] >= corr["int4"] - 1e-3, corr


def test_expert_bits_is_checked(moe_models, tiny_models, tmp_path):  # noqa: F811
    from edgeinfer.export import export_model

    _, hf, _ = moe_models("mixtral")
    with pytest.raises(ExportError, match="--expert-bits takes 4 or 8"):
        export_model(str(hf), tmp_path / "x", "fp32", max_context=64, expert_bits=3, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="sparse-MoE models only"):
        export_model(str(tiny_models("llama")), tmp_path / "y", "fp32", max_context=64,
                     expert_bits=8, progress=False)
    assert not (tmp_path / "y").exists()


def test_cli_export_with_expert_bits(moe_models, tmp_path):  # noqa: F811
    import subprocess
    import sys

    _, hf, _ = moe_models("olmoe")
    pkg = tmp_path / "pkg"
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "export", str(hf), "-o", str(pkg), "--precision",
                          "fp32", "--max-context", "64", "--expert-bits", "8"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]["precision"] == "int8-channel"
    run = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "hello", "--json",
                          "--max-new-tokens", "3", "--memory-budget", str(few_experts_budget(pkg))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["stats"]["experts"]["bytes_read"] > 0
