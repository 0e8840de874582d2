"""Big/little decoding: speculative is lossless (greedy tokens equal the big
model's; sampling keeps its distribution), EAD and BiLD hand tokens between
the models with correct caches, and bad input gets clear messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import build_tiny_model

import edgeinfer
from edgeinfer.errors import GenerationError, PackageError
from edgeinfer.generation import GenerationConfig, Sampler

PROMPTS = ["Paris is the capital of", "def add(a, b):\n    return a + b\ndef add(a, b):",
           "Once upon a time there was a small model"]
N = 40


@pytest.fixture(scope="module")
def pair_packages(tiny_models, tiny_packages, tmp_path_factory):
    """big = tiny Llama fp32 with an exit at layer 2; little = the same model int4, or another random Llama."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("pairs")
    big = root / "big"
    export_model(str(tiny_models("llama")), big, "fp32", exits=[2], max_context=256, progress=False)
    other = root / "other"
    export_model(str(build_tiny_model("llama", root / "other-hf", seed=1)), other, "fp32", max_context=256,
                 progress=False)
    return {"big": big, "int4": tiny_packages("llama", "int4"), "other": other}


@pytest.fixture(scope="module")
def big_plain(pair_packages):
    model = edgeinfer.load(pair_packages["big"])
    return {p: model.complete(p, max_new_tokens=N, ignore_eos=True).tokens for p in PROMPTS}


def greedy_next(model, ids: list[int], stages: int | None = None) -> int:
    """The model's (or its exit's, after STAGES stages) greedy choice after IDS, computed from scratch."""
    model.reset()
    return int(np.argmax(model.decoder.forward(ids, logits_to_keep=1, stages=stages)[-1]))


@pytest.mark.parametrize("little,opts", [
    ("int4", {}), ("int4", {"draft_len": 2}), ("other", {"draft_len": 5}), ("int4", {"threshold": 1.0}),
    (None, {}),  # the big package's own exit as the little model
])
def test_speculative_greedy_equals_big_model(pair_packages, big_plain, little, opts):
    model = edgeinfer.load(pair_packages["big"], little=pair_packages[little] if little else None)
    for p in PROMPTS:
        res = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="speculative", **opts)
        assert res.tokens == big_plain[p], (little, opts, p)
    st = res.stats
    if opts.get("threshold") == 1.0:  # the little model is never that sure: no drafts, big steps only
        assert st["drafted"] == 0 and st["tokens"]["little"] == 0
    else:
        assert st["rounds"] > 0 and 0 <= st["acceptance_rate"] <= 1
    assert st["tokens"]["big"] + st["tokens"]["little"] == N
    assert st["big_model"]["weight_bytes_read"] > 0 and st["little_model"]["calls"] > 0


def test_speculative_keeps_prefix_reuse_right_across_turns(pair_packages, big_plain):
    """A second generation reuses both caches' common prefix and still gives the big model's tokens."""
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["int4"])
    for p in PROMPTS + PROMPTS[::-1]:
        assert model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="speculative").tokens == big_plain[p]
    # the little model's own generations still see a consistent cache afterwards
    little = model.little
    alone = edgeinfer.load(pair_packages["int4"]).complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True)
    assert little.complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True).tokens == alone.tokens


def test_speculative_continues_from_what_earlier_generations_learned(pair_packages, big_plain):
    """A model's later speculative generations start from the costs and acceptance its earlier ones measured (no
    warm-up rounds), still lossless; another draft length or another little model starts afresh."""
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["int4"])
    spec = dict(max_new_tokens=N, ignore_eos=True, strategy="speculative")
    assert model.complete(PROMPTS[0], **spec).stats["cost_model"] == "measured online"
    for p in PROMPTS:
        res = model.complete(p, **spec)
        assert res.tokens == big_plain[p]
        assert res.stats["cost_model"] == "learned by earlier generations"
    assert model.complete(PROMPTS[0], draft_len=3, **spec).stats["cost_model"] == "measured online"
    model.attach_little(edgeinfer.load(pair_packages["other"]))
    res = model.complete(PROMPTS[0], **spec)
    assert res.stats["cost_model"] == "measured online" and res.tokens == big_plain[PROMPTS[0]]
    assert model.complete(PROMPTS[0], **spec).stats["cost_model"] == "learned by earlier generations"


def test_a_catch_up_is_not_timed_as_a_draft(pair_packages, big_plain, tmp_path):
    """Drafts cost almost a big step (a stored cost model): plain rounds, a one-draft probe every PROBE_EVERY
    rounds. A probe's little model first catches up on the rounds it missed; that call is not the cost of a
    draft (timed as one, it kept drafting off for good), so the estimate stays the stored one."""
    from edgeinfer.strategies.cost_model import CostModel
    from edgeinfer.strategies.pair_file import PairSettings, package_identity, write_pair_file
    from edgeinfer.strategies.speculative import PROBE_EVERY

    model = edgeinfer.load(pair_packages["big"], little=pair_packages["int4"])
    ident = lambda m: {"name": m.name, "identity": package_identity(m.package)}  # noqa: E731
    dear = CostModel(draft_s=0.9, verify_s={1: 1.0, 2: 1.8}, acceptance=[0.5])
    pair = write_pair_file(PairSettings(ident(model), ident(model.little), 0.95, cost_model=dear),
                           tmp_path / "pair.json")
    res = model.complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True, strategy="speculative", pair=str(pair))
    st = res.stats
    assert res.tokens == big_plain[PROMPTS[0]] and st["cost_model"] == "stored"
    assert st["drafted"] >= 2 and set(st["draft_lengths"]) == {0, 1} and st["draft_lengths"][0] >= 2 * PROBE_EVERY
    assert st["estimates"]["draft_ms"] == 900.0


def test_speculative_sampling_keeps_big_models_distribution(pair_packages):
    """Two sampled tokens, top-3 at temperature 1: the joint frequencies match the big model's exact
    p(t1) p(t2 | t1) (chi-square), though the little model (a different random model) proposes t2."""
    big = edgeinfer.load(pair_packages["big"])
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["other"])
    cfg = dict(temperature=1.0, top_k=3)
    ids = big.tokenizer.encode(PROMPTS[0])
    sampler = Sampler(GenerationConfig(**cfg))
    big.reset()
    p1 = sampler.probabilities(big.decoder.forward(ids)[-1])
    exact = {}
    for t1 in np.flatnonzero(p1):
        big.reset()
        p2 = sampler.probabilities(big.decoder.forward(ids + [int(t1)])[-1])
        for t2 in np.flatnonzero(p2):
            exact[(int(t1), int(t2))] = p1[t1] * p2[t2]
    n = 1500
    counts = dict.fromkeys(exact, 0)
    for seed in range(n):
        toks = tuple(model.complete(ids, max_new_tokens=2, ignore_eos=True, strategy="speculative", seed=seed,
                                    **cfg).tokens)
        assert toks in counts, toks
        counts[toks] += 1
    expected = np.array([exact[k] * n for k in exact])
    observed = np.array([counts[k] for k in exact])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 8 degrees of freedom: P(chi2 > 26.1) = 0.001
    assert chi2 < 26.1, (chi2, counts, exact)


def test_ead_extremes_are_each_model_alone(pair_packages, big_plain):
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["other"])
    little_alone = edgeinfer.load(pair_packages["other"])
    p = PROMPTS[0]
    all_big = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="ead", tau=0.0)
    assert all_big.tokens == big_plain[p] and all_big.stats["big_share"] == 1.0
    all_little = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="ead", tau=1e9)
    assert all_little.tokens == little_alone.complete(p, max_new_tokens=N, ignore_eos=True).tokens
    assert all_little.stats["big_share"] == 0.0 and all_little.stats["big_model"]["calls"] == 0


@pytest.mark.parametrize("little", ["other", None])
def test_ead_hands_over_with_caches_caught_up(pair_packages, little):
    """At a threshold between the extremes both models write; every token is exactly the greedy
    choice of the model that wrote it given everything before it (so catch-up filled the caches)."""
    model = edgeinfer.load(pair_packages["big"], little=pair_packages[little] if little else None)
    little_model = model.little or model
    ids = model.tokenizer.encode(PROMPTS[2])
    probe = model.complete(ids, max_new_tokens=N, ignore_eos=True, strategy="ead", tau=1e9)
    tau = float(np.median([s for s in _entropies(little_model, ids, probe.tokens, little is None)]))
    events = list(model.generate(ids, max_new_tokens=N, ignore_eos=True, strategy="ead", tau=tau, window=2))
    sources = [ev.source for ev in events]
    assert {"big", "little"} <= set(sources[1:]), sources
    fresh_big = edgeinfer.load(pair_packages["big"])
    fresh_little, stages = edgeinfer.load(pair_packages[little]) if little else fresh_big, None
    if little is None:
        stages = fresh_big.decoder.exits[2]
    seq = list(ids) + [events[0].token_id]
    for ev in events[1:]:
        if ev.source == "big":
            assert ev.token_id == greedy_next(fresh_big, seq)
        else:
            assert ev.token_id == greedy_next(fresh_little, seq, stages)
        seq.append(ev.token_id)


@pytest.mark.parametrize("little", ["other", None])
def test_ead_by_the_little_models_entropy(pair_packages, big_plain, little):
    """entropy_of="little": the big model writes exactly the positions where the little model (another package,
    or the big package's own exit), given everything before them, is unsure (window 1), each the writer's greedy
    choice; the extremes are each model alone."""
    from edgeinfer.strategies.pair import entropy

    model = edgeinfer.load(pair_packages["big"], little=pair_packages[little] if little else None)
    fresh_big = edgeinfer.load(pair_packages["big"])
    little_alone, stages = (edgeinfer.load(pair_packages[little]), None) if little else (fresh_big, None)
    if little is None:
        stages = fresh_big.decoder.exits[max(fresh_big.decoder.exits)]
    p = PROMPTS[0]
    opts = dict(max_new_tokens=N, ignore_eos=True, strategy="ead", entropy_of="little", window=1)
    all_big = model.complete(p, **opts, tau=0.0)
    assert all_big.tokens == big_plain[p] and all_big.stats["big_share"] == 1.0
    all_little = model.complete(p, **opts, tau=1e9)
    assert all_little.stats["big_share"] == 0.0 and all_little.stats["big_model"]["calls"] == 0
    if little:
        assert all_little.tokens == little_alone.complete(p, max_new_tokens=N, ignore_eos=True).tokens
    ids = model.tokenizer.encode(PROMPTS[2])
    probe = model.complete(ids, **opts, tau=1e9)
    tau = float(np.median(_entropies(little_alone, ids, probe.tokens, little is None)))
    events = list(model.generate(ids, **{**opts, "tau": tau}))
    assert {"big", "little"} <= {ev.source for ev in events}
    seq = list(ids)
    for ev in events:
        little_alone.reset()
        unsure = entropy(little_alone.decoder.forward(seq, logits_to_keep=1, stages=stages)[-1]) > tau
        assert ev.source == ("big" if unsure else "little")
        assert ev.token_id == (greedy_next(fresh_big, seq) if unsure else greedy_next(little_alone, seq, stages))
        seq.append(ev.token_id)


def _entropies(model, ids, tokens, exit_view):
    from edgeinfer.strategies.pair import entropy

    model.reset()
    if exit_view:
        stages = model.decoder.exits[max(model.decoder.exits)]
        logits = model.decoder.forward(ids + tokens, logits_to_keep=len(tokens), stages=stages)
    else:
        logits = model.decoder.forward(ids + tokens, logits_to_keep=len(tokens))
    model.reset()
    return [entropy(row) for row in logits]


def test_bild_extremes_and_rollback(pair_packages, big_plain):
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["other"])
    p = PROMPTS[1]
    # The little model never confident enough: every token falls back to the big model.
    fb = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="bild", fallback_threshold=1.0)
    assert fb.tokens == big_plain[p] and fb.stats["big_share"] == 1.0
    # Any little token the big model does not find certain is rolled back: the big model's output again.
    rb = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="bild", fallback_threshold=0.0,
                        rollback_threshold=0.0)
    assert rb.tokens == big_plain[p] and rb.stats["rollbacks"] > 0
    # Never rolled back, always confident: runs of draft_len little tokens, then one big token.
    free = list(model.generate(p, max_new_tokens=N, ignore_eos=True, strategy="bild", fallback_threshold=0.0,
                               rollback_threshold=1e9, draft_len=4))
    assert [ev.source for ev in free[1:11]] == ["little"] * 4 + ["big"] + ["little"] * 4 + ["big"]
    fresh_big, fresh_little = edgeinfer.load(pair_packages["big"]), edgeinfer.load(pair_packages["other"])
    seq = model.tokenizer.encode(p) + [free[0].token_id]
    for ev in free[1:]:
        assert ev.token_id == greedy_next(fresh_big if ev.source == "big" else fresh_little, seq)
        seq.append(ev.token_id)


def test_cli_runs_big_little_with_stats(pair_packages, capsys):
    from edgeinfer.cli import main

    rc = main(["run", str(pair_packages["big"]), PROMPTS[0], "--little", str(pair_packages["int4"]),
               "--strategy", "ead", "--tau", "2.0", "--entropy-of", "little", "--max-new-tokens", "12", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_tokens"] <= 12 and 0.0 <= out["stats"]["big_share"] <= 1.0
    assert out["stats"]["entropy_of"] == "little"
    assert out["stats"]["compute_vs_big_alone"] > 0


def test_mismatched_tokenizers_are_refused(pair_packages, tmp_path):
    from conftest import make_tokenizer
    from edgeinfer.export import export_model

    folder = build_tiny_model("llama", tmp_path / "hf")
    make_tokenizer(300).save_pretrained(folder)  # another vocabulary, same model size
    pkg = tmp_path / "pkg"
    export_model(str(folder), pkg, "int4", max_context=256, progress=False)
    with pytest.raises(PackageError, match="different vocabularies"):
        edgeinfer.load(pair_packages["big"], little=pkg)


def test_little_must_be_a_decoder(pair_packages, tmp_path):
    copy = tmp_path / "not-a-decoder"
    shutil.copytree(pair_packages["int4"], copy)
    manifest = json.loads((copy / "edgeinfer.json").read_text())
    manifest["kind"] = "encoder-decoder"
    (copy / "edgeinfer.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="little package .* is a encoder-decoder package"):
        edgeinfer.load(pair_packages["big"], little=copy)


@pytest.mark.parametrize("opts,match", [
    (dict(strategy="ead", tau=-1.0), "tau .* must be a number >= 0"),
    (dict(strategy="ead", tau=float("nan")), "tau .* must be a number >= 0"),
    (dict(strategy="ead", window=0), "window must be an integer >= 1"),
    (dict(strategy="ead", entropy_of="big"), "entropy_of must be one of writer, little"),
    (dict(strategy="bild", fallback_threshold=1.5), r"fallback_threshold must be a probability in \[0, 1\]"),
    (dict(strategy="bild", rollback_threshold=-2.0), "rollback_threshold .* must be >= 0"),
    (dict(strategy="speculative", draft_len=0), "draft length must be an integer >= 1"),
    (dict(strategy="speculative", exit_layer=2), "exit_layer applies when"),
    (dict(strategy="plain", tau=1.0), "does not take tau"),
])
def test_bad_big_little_options(pair_packages, opts, match):
    model = edgeinfer.load(pair_packages["big"], little=pair_packages["int4"])
    with pytest.raises(GenerationError, match=match):
        model.complete("hello", max_new_tokens=4, **opts)


def test_pair_strategy_without_little_or_exits(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    with pytest.raises(GenerationError, match="needs a little model"):
        model.complete("hello", max_new_tokens=4, strategy="ead")


def test_server_decodes_every_request_speculatively(pair_packages, big_plain):
    """`edgeinfer serve BIG --little LITTLE --strategy speculative`: completions equal the big model's."""
    from starlette.testclient import TestClient

    from edgeinfer.server import create_app

    model = edgeinfer.load(pair_packages["big"], little=pair_packages["int4"])
    app = create_app(model, strategy="speculative", strategy_options={"draft_len": 4})
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == model.tokenizer.decode(big_plain[PROMPTS[0]])
    with pytest.raises(GenerationError, match="tau"):
        create_app(model, strategy="ead", strategy_options={"tau": -1.0})
    with pytest.raises(GenerationError, match="pair file"):  # a strategy option with plain decoding: at start
        create_app(model, strategy_options={"pair": "pair.json"})


def test_serve_takes_every_strategy_option_run_does(pair_packages, monkeypatch, capsys):
    """`serve` and `run` share the strategy flags: EAD's rule and window reach every request."""
    import uvicorn

    from edgeinfer.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    args = ["serve", str(pair_packages["big"]), "--little", str(pair_packages["int4"]), "--no-prompt-cache",
            "--strategy", "ead", "--entropy-of", "little", "--window", "1", "--tau", "0.5", "--min-hold", "2"]
    assert main(args) == 0
    decoding = apps[-1].state.edgeinfer.decoding
    assert {k: v for k, v in decoding.items() if v is not None} == {
        "strategy": "ead", "entropy_of": "little", "window": 1, "tau": 0.5, "min_hold": 2}
    assert main(args[:-2] + ["--min-hold", "0"]) == 2  # refused at start, with the strategy's own message
    assert "min_hold" in capsys.readouterr().err
