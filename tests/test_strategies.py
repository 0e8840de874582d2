"""Decoding strategies: lossless ones give exactly the plain decoder's tokens,
the sampling acceptance rule keeps the target distribution, early exit reports
its depth, and bad options get clear messages."""

import numpy as np
import pytest

import edgeinfer
from edgeinfer.errors import GenerationError
from edgeinfer.generation import GenerationConfig, Sampler
from edgeinfer.strategies import accept_draft
from edgeinfer.strategies.lookup import DraftLengthPolicy, NgramIndex

PROMPTS = ["Paris is the capital of", "def add(a, b):\n    return a + b\ndef add(a, b):",
           "The quick brown fox jumps over the lazy dog. The quick brown fox"]


@pytest.fixture(scope="module")
def exit_package(tiny_models, tmp_path_factory):
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("exits") / "llama-exits"
    export_model(str(tiny_models("llama")), out, "fp32", exits=[1, 2], max_context=256, progress=False)
    return out


@pytest.fixture(scope="module")
def gemma_exit_package(tiny_models, tmp_path_factory):
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("exits") / "gemma-exits"
    export_model(str(tiny_models("gemma3")), out, "int4", exits=[2], max_context=256, progress=False)
    return out


def test_exit_head_matches_a_truncated_model(exit_package):
    """Exit logits at layer L equal final norm + LM head applied after L layers."""
    import json

    manifest = json.loads((exit_package / "edgeinfer.json").read_text())
    assert [e["layer"] for e in manifest["exits"]] == [1, 2]
    model = edgeinfer.load(exit_package)
    ids = model.tokenizer.encode(PROMPTS[0])
    exit_logits = model.decoder.forward(ids, logits_to_keep=1, stages=model.decoder.exits[2])
    model.reset()
    full = model.decoder.forward(ids, logits_to_keep=1)
    assert exit_logits.shape == full.shape and not np.allclose(exit_logits, full)
    # Catching the lagging stage up afterwards gives the same logits as one full pass.
    model.reset()
    model.decoder.forward(ids, logits_to_keep=1, stages=1)
    assert np.abs(model.decoder.catch_up()[-1] - full[-1]).max() < 1e-4


@pytest.mark.parametrize("strategy,opts", [
    ("lookup", {}), ("lookup", {"draft_len": 2}),
    ("self-speculative", {"exit_layer": 1}), ("self-speculative", {"exit_layer": 2, "draft_len": 6}),
    ("self-speculative", {"exit_layer": 2, "threshold": 0.05}),
    ("adaptive", {}),
])
@pytest.mark.parametrize("package", ["exit_package", "gemma_exit_package"])
def test_lossless_strategies_equal_plain_greedy(package, strategy, opts, request):
    pkg = request.getfixturevalue(package)
    if "exit_layer" in opts and package == "gemma_exit_package":
        opts = {**opts, "exit_layer": 2}
    model = edgeinfer.load(pkg)
    for text in PROMPTS:
        model.reset()
        plain = model.complete(text, max_new_tokens=40, ignore_eos=True)
        model.reset()
        fast = model.complete(text, max_new_tokens=40, ignore_eos=True, strategy=strategy, **opts)
        assert fast.tokens == plain.tokens, (strategy, opts, text)
        assert fast.stats["strategy"] == strategy


def test_lookup_accepts_repeated_text(exit_package):
    model = edgeinfer.load(exit_package)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    res = model.complete(text, max_new_tokens=40, ignore_eos=True, strategy="lookup")
    assert res.stats["verify_calls"] > 0 and res.stats["tokens_per_verify"] >= 1.0


def test_lossless_with_prefix_reuse_and_chat(exit_package):
    model = edgeinfer.load(exit_package)
    msgs = [{"role": "user", "content": "Paris is the capital of"}]
    a = model.complete(msgs, max_new_tokens=12, ignore_eos=True, strategy="self-speculative", exit_layer=1)
    msgs2 = msgs + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "and Berlin"}]
    b = model.complete(msgs2, max_new_tokens=12, ignore_eos=True, strategy="lookup")
    model.reset()
    assert b.reused_prompt_tokens > 0
    assert model.complete(msgs2, max_new_tokens=12, ignore_eos=True).tokens == b.tokens


def test_draft_length_policy_follows_acceptance_and_cost():
    """Verifying k drafts costs c_step + k * c_token: the policy drafts long when drafts are
    accepted and verification rows are cheap, and not at all when drafts are always rejected."""
    good = DraftLengthPolicy(8)
    assert good.choose(5) == 5  # costs not measured yet: verify all that is offered
    good.observe_step(0.010)
    for _ in range(20):
        good.observe_verify(8, 8, 0.010 + 8 * 0.001)
    assert good.choose(8) == 8 and good.choose(3) == 3
    bad = DraftLengthPolicy(8)
    bad.observe_step(0.010)
    for _ in range(20):
        bad.observe_verify(4, 0, 0.010 + 4 * 0.003)
    assert bad.choose(8) == 0
    costly = DraftLengthPolicy(8)  # each row costs as much as a step: only near-certain drafts pay
    costly.observe_step(0.010)
    for _ in range(20):
        costly.observe_verify(2, 1, 0.010 + 2 * 0.010)
    assert costly.choose(8) == 0


def test_ngram_index_proposes_continuation_of_latest_match():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3])
    assert idx.propose(3) == [5, 7, 1]  # "1 2 3" last seen before the tail at position 5
    idx2 = NgramIndex(1, 2)
    idx2.extend([4, 5, 6])
    assert idx2.propose(4) == []


@pytest.mark.parametrize("point_mass", [True, False])
def test_speculative_sampling_rule_preserves_target_distribution(point_mass):
    """Exhaustively on a 4-token vocabulary: P(first emitted token) equals the target's p."""
    rng = np.random.default_rng(0)
    p_logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    q = np.array([0.4, 0.3, 0.2, 0.1])
    cfg = GenerationConfig(temperature=1.0)
    counts = np.zeros(4)
    n = 40000
    sampler = Sampler(cfg)
    sampler.rng = rng
    for _ in range(n):
        if point_mass:
            draft, dists = [2], None  # a deterministic proposal (lookup)
        else:
            draft, dists = [int(rng.choice(4, p=q))], [q]
        out = accept_draft(sampler, np.stack([p_logits, p_logits]), draft, dists, [], bonus=True)
        counts[out[0][0]] += 1
    freq = counts / n
    assert np.abs(freq - np.array([0.1, 0.2, 0.3, 0.4])).max() < 0.012


def test_early_exit_reports_depth_and_trades_quality(exit_package):
    model = edgeinfer.load(exit_package)
    plain = model.complete(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    never = model.complete(PROMPTS[0], max_new_tokens=30, ignore_eos=True, strategy="early-exit", threshold=1.0)
    assert never.tokens == plain.tokens and never.stats["average_depth_fraction"] == 1.0
    always = model.complete(PROMPTS[0], max_new_tokens=30, ignore_eos=True, strategy="early-exit", threshold=0.0)
    # the first token comes from the prompt pass at full depth; every later one exits at layer 1
    assert always.stats["exits"] == {"1": 29, "2": 0} and always.stats["average_depth"] == 1.0
    # After exiting, the skipped layers' KV was filled: a plain continuation matches a fresh run.
    model.reset()
    assert model.complete(PROMPTS[0], max_new_tokens=30, ignore_eos=True).tokens == plain.tokens


@pytest.mark.parametrize("opts,match", [
    (dict(strategy="self-speculative", exit_layer=3), "exit layer 3 is not in this package"),
    (dict(strategy="early-exit", threshold=1.5), r"threshold must be in \[0, 1\]"),
    (dict(strategy="lookup", draft_len=0), "draft length must be >= 1"),
    (dict(strategy="warp-drive"), "unknown strategy"),
    (dict(strategy="plain", threshold=0.5), "does not take"),
])
def test_bad_strategy_options(exit_package, opts, match):
    model = edgeinfer.load(exit_package)
    with pytest.raises(GenerationError, match=match):
        model.complete("hello", max_new_tokens=4, **opts)


def test_exit_strategies_need_exits(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    with pytest.raises(GenerationError, match="no early exits"):
        model.complete("hello", max_new_tokens=4, strategy="self-speculative")


@pytest.fixture(scope="module")
def adapter_package(tiny_models, tmp_path_factory):
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("adapters") / "llama-exit-adapters"
    export_model(str(tiny_models("llama")), out, "fp32", exits=[1, 2], max_context=256, exit_adapters=True,
                 adapter_rank=16, progress=False)
    return out


def test_exit_adapters_are_fitted_listed_and_used(adapter_package, exit_package):
    """Each exit gets an adapter graph in the manifest (held-out agreement recorded, not worse than raw),
    the exit logits change with it, and drafting from adapted exits stays lossless."""
    import json

    manifest = json.loads((adapter_package / "edgeinfer.json").read_text())
    roles = [g["role"] for g in manifest["graphs"]]
    assert roles.count("exit_adapter") == 2
    for e in manifest["exits"]:
        fit = e["adapter_fit"]
        assert e["adapter"] and fit["rank"] == 16 and fit["train_tokens"] > 1000
        assert fit["agreement_adapted"] >= fit["agreement_raw"] - 0.01
    adapted, raw = edgeinfer.load(adapter_package), edgeinfer.load(exit_package)
    ids = adapted.tokenizer.encode(PROMPTS[2])
    a = adapted.decoder.forward(ids, logits_to_keep=1, stages=adapted.decoder.exits[1])
    r = raw.decoder.forward(ids, logits_to_keep=1, stages=raw.decoder.exits[1])
    assert not np.allclose(a, r)
    for p in PROMPTS:
        adapted.reset()
        plain = adapted.complete(p, max_new_tokens=24, ignore_eos=True).tokens
        for strategy in ("self-speculative", "speculative"):
            assert adapted.complete(p, max_new_tokens=24, ignore_eos=True, strategy=strategy, exit_layer=1).tokens \
                == plain


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_adapter_fit_reference_model_takes_the_exporters_arrays(tiny_models, family):
    """The float model exit adapters are fitted against takes the exporter's weight arrays as its parameters
    (no second copy: a 1.5B model's fit peaked at 21 GB with one), tied heads included, nothing left unset."""
    from edgeinfer.export.decoder.exit_adapters import _reference_model
    from edgeinfer.export.sources.load import load_source

    src = load_source(str(tiny_models(family)))
    model = _reference_model(src)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in model.parameters())
    shared = [k for k, v in src.state_dict.items() if k in params and v.dtype == np.float32]
    assert shared and all(params[k].data_ptr() == src.state_dict[k].ctypes.data for k in shared)


def test_exit_adapters_need_exits(tiny_models, tmp_path):
    from edgeinfer.export import export_model

    from edgeinfer.errors import ExportError

    with pytest.raises(ExportError, match="--exit-adapters fits one adapter per exit"):
        export_model(str(tiny_models("llama")), tmp_path / "x", "fp32", exit_adapters=True, progress=False)
    assert not (tmp_path / "x").exists()
