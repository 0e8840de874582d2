"""The draft-and-verify cost model, `edgeinfer calibrate` and the pair file it writes: the stored settings
become the strategies' defaults (explicit options win), and a foreign or damaged pair file is refused with
a sentence that says what to do. Tiny random pairs: the mechanics, not the numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_tiny_model

import edgeinfer
from edgeinfer.errors import GenerationError, PackageError
from edgeinfer.strategies.cost_model import (
    CostModel,
    OnlineCosts,
    acceptance_by_position,
    oracle_speedup,
    simulate,
)

N = 16


@pytest.fixture(scope="module")
def pair(tiny_models, tiny_packages, tmp_path_factory):
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("calib-pairs")
    other = root / "other"
    export_model(str(build_tiny_model("llama", root / "other-hf", seed=1)), other, "fp32", max_context=256,
                 progress=False)
    return {"big": tiny_packages("llama", "fp32"), "int4": tiny_packages("llama", "int4"), "other": other}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- the cost model -------------------------------------------------------------------------------------------

def test_cost_model_formulas():
    m = CostModel(draft_s=0.25, verify_s={1: 1.0, 2: 1.2, 4: 1.6}, acceptance=[0.8, 0.5])
    assert m.verify(3) == pytest.approx(1.4) and m.verify(6) == pytest.approx(2.0)  # interpolated, extended
    assert m.expected_tokens(0) == 1.0
    assert m.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.4)
    assert m.expected_tokens(3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)  # past the measured positions: the last
    assert m.speedup(1) == pytest.approx(1.8 / (0.25 + 1.2))
    k, s = m.best(4)
    assert s == max(m.speedup(j) for j in range(5)) and m.speedup(k) == s
    phone = m.project(memory=2.0, compute=4.0)
    assert phone.draft_s == pytest.approx(0.125) and phone.verify(1) == pytest.approx(0.5)
    assert phone.verify(4) == pytest.approx(0.5 + 0.6 / 4)
    assert CostModel.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_trace_replay_and_oracle():
    agree = [True, True, False, True, False, False, True, True, True, False]
    assert acceptance_by_position(agree, 3) == pytest.approx([6 / 10, 3 / 6, 1 / 3])
    m = CostModel(draft_s=0.1, verify_s={1: 1.0, 2: 1.1, 3: 1.2, 4: 1.3}, acceptance=[0.5])
    # k = 2 from position 0: accept 2 (+1), pos 3: accept 1 (+1), pos 5: accept 0 (+1), pos 6: 2 (+1), pos 9: 0 (+1)
    tokens, seconds = simulate(agree, m, 2)
    assert tokens == 3 + 2 + 1 + 3 + 1 and seconds == pytest.approx(5 * (0.2 + 1.2))
    assert oracle_speedup(agree, m) >= max(simulate(agree, m, k)[0] / simulate(agree, m, k)[1] for k in (1, 2, 3))


def test_ead_replay_and_window_choice():
    from edgeinfer.strategies.calibration import ead_by_replay, replay_ead, replay_tau

    # the little model is unsure exactly where it is wrong: a one-token window hands those tokens over alone
    trace = [{"agree": [True, False] * 10, "little_entropy": [0.1, 1.5] * 10, "big_entropy": [0.1] * 20,
              "big_logprob_of_little": [-0.01, -4.0] * 10}]
    assert replay_ead(trace, 1e9, 1) == (0.0, pytest.approx(np.exp(-2.0)))  # the little model alone
    share, quality = replay_ead(trace, 1.0, 1)
    assert share == 0.5 and quality == 1.0
    assert replay_ead(trace, 1.0, 5)[1] < 1.0  # a rolling mean lets some unsure (wrong) tokens through
    assert replay_tau(trace, 0.99, "writer", 1) == 1.45  # the largest tau (0.05 grid) below the unsure 1.5
    assert ead_by_replay(trace, 0.99) == ("writer", 1, 1.45)  # both rules hand over the same tokens: the first
    # the big model is unsure where the little one is wrong, never where it is right: with the writer's
    # entropy deciding, a hand-over lasts until the big model is sure again; with the little model's, one token
    trace = [{"agree": [True, True, False, True] * 5, "little_entropy": [0.1, 0.1, 1.5, 0.1] * 5,
              "big_entropy": [0.1, 0.1, 2.0, 0.1] * 5, "big_logprob_of_little": [-0.01, -0.01, -4.0, -0.01] * 5}]
    assert replay_ead(trace, 1.0, 1) == (0.5, 1.0)
    assert replay_ead(trace, 1.0, 1, entropy_of="little") == (0.25, 1.0)
    assert replay_ead(trace, 1.0, 1, min_hold=2, entropy_of="little") == (0.5, 1.0)
    assert ead_by_replay(trace, 0.99) == ("little", 1, 1.45)


def test_assured_quality_is_a_bound_over_prompts():
    from edgeinfer.strategies.calibration import assured_quality

    assert assured_quality([0.5, 0.5, 0.5], [10, 10, 10]) == pytest.approx(np.exp(-0.05))  # alike: the mean
    extra, tokens = [0.0, 0.0, 0.0, 3.0], [10, 10, 10, 10]
    mean = np.exp(-sum(extra) / sum(tokens))
    bound = assured_quality(extra, tokens)
    assert bound < mean and bound == assured_quality(extra, tokens)  # below the mean, and reproducible
    assert assured_quality(extra, tokens, confidence=0.5) == pytest.approx(mean, abs=0.03)


def test_per_step_rule_drafts_while_it_pays():
    cheap = CostModel(draft_s=0.05, verify_s={1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15, 5: 1.2}, acceptance=[])
    online = OnlineCosts(max_k=6, prior=cheap)
    assert online.keep_drafting([])  # a first draft pays whatever its acceptance, at this price
    assert online.keep_drafting([0.95, 0.95])  # confident drafts: go on
    for _ in range(200):  # the drafter is never right when it is unsure
        online.record_acceptance([0.15], 0)
    assert not online.keep_drafting([0.95, 0.15])  # the last draft was unsure: stop
    dear = CostModel(draft_s=0.9, verify_s={1: 1.0, 2: 1.8}, acceptance=[])
    assert not OnlineCosts(prior=dear).keep_drafting([])  # a draft costs almost a big step: plain steps


# -- calibrate and the pair file ------------------------------------------------------------------------------

def _calibrate(pair, tmp_path, *extra):
    from edgeinfer.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris is the capital of\nOnce upon a time\n")
    return main(["calibrate", str(pair["big"]), "--little", str(pair["other"]), "--prompts", str(prompts),
                 "--new-tokens", "6", "--quality", "0.9", *extra])


def test_calibrate_stores_the_pairs_defaults(pair, home, tmp_path, capsys):
    from edgeinfer.strategies.pair_file import pair_file_path, read_pair_file

    assert _calibrate(pair, tmp_path) == 0
    out = capsys.readouterr().out
    assert "EAD: tau" in out and "BiLD: fallback" in out and "wrote" in out
    model = edgeinfer.load(pair["big"], little=pair["other"])
    path = pair_file_path(model.package, model.little.package)
    assert path.parent == home / "pairs" and path.is_file()
    stored = read_pair_file(path, model.package, model.little.package)
    ead = model.complete("hello", max_new_tokens=N, ignore_eos=True, strategy="ead")
    assert stored.window in (1, 3, 5) and stored.entropy_of in ("writer", "little")
    assert (ead.stats["tau"], ead.stats["window"], ead.stats["entropy_of"]) == (stored.tau, stored.window,
                                                                                stored.entropy_of)
    assert ead.stats["calibration"] == {"file": str(path), "used": ["entropy_of", "tau", "window"]}
    explicit = model.complete("hello", max_new_tokens=N, ignore_eos=True, strategy="ead", tau=0.0)
    assert explicit.stats["tau"] == 0.0 and explicit.stats["calibration"]["used"] == ["entropy_of", "window"]
    bild = model.complete("hello", max_new_tokens=N, ignore_eos=True, strategy="bild")
    assert (bild.stats["fallback_threshold"], bild.stats["rollback_threshold"]) == (stored.fallback_threshold,
                                                                                   stored.rollback_threshold)
    plain = edgeinfer.load(pair["big"]).complete("hello", max_new_tokens=N, ignore_eos=True)
    spec = model.complete("hello", max_new_tokens=N, ignore_eos=True, strategy="speculative")
    assert spec.stats["cost_model"] == "stored" and spec.tokens == plain.tokens  # still lossless
    # another little model: no stored settings, the strategies' own defaults
    other = edgeinfer.load(pair["big"], little=pair["int4"])
    assert "calibration" not in other.complete("hello", max_new_tokens=4, strategy="ead").stats


def test_foreign_or_damaged_pair_files_are_refused(pair, home, tmp_path, capsys):
    pair_file = tmp_path / "pair.json"
    assert _calibrate(pair, tmp_path, "--out", str(pair_file)) == 0
    assert not (home / "pairs").exists()  # --out: nothing in the cache
    right = edgeinfer.load(pair["big"], little=pair["other"])
    assert right.complete("hi", max_new_tokens=4, strategy="ead", pair=str(pair_file)).stats["calibration"]
    from edgeinfer.cli import main

    assert main(["run", str(pair["big"]), "hi", "--little", str(pair["other"]), "--strategy", "bild", "--pair",
                 str(pair_file), "--max-new-tokens", "4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["stats"]["calibration"]["used"] == ["fallback_threshold", "rollback_threshold"]
    assert main(["run", str(pair["big"]), "hi", "--little", str(pair["int4"]), "--strategy", "ead", "--pair",
                 str(pair_file), "--max-new-tokens", "4"]) == 2
    assert "not for these packages" in capsys.readouterr().err
    wrong = edgeinfer.load(pair["big"], little=pair["int4"])
    with pytest.raises(PackageError, match=r"calibrated for '.*' with little 'other', not for these packages.*"
                                           r"edgeinfer calibrate"):
        wrong.complete("hi", max_new_tokens=4, strategy="ead", pair=str(pair_file))
    data = json.loads(pair_file.read_text())
    cases = [("{ not json", "cannot be read as JSON"), (json.dumps({"kind": "other"}), "not an edgeinfer pair file"),
             (json.dumps({**data, "format": 99}), "has format 99"),
             (json.dumps({**data, "ead": {"tau": "high"}}), "is damaged"),
             (json.dumps({**data, "ead": {"tau": 1.0, "window": 0}}), "is damaged"),
             (json.dumps({**data, "ead": {"tau": 1.0, "window": 1, "entropy_of": "big"}}), "is damaged"),
             (json.dumps({**data, "bild": {"fallback_threshold": 7, "rollback_threshold": 1}}), "out-of-range")]
    for text, match in cases:
        pair_file.write_text(text)
        with pytest.raises(PackageError, match=match):
            right.complete("hi", max_new_tokens=4, strategy="bild", pair=str(pair_file))
    # a file written before EAD's rule was calibrated (no entropy_of): read, EAD keeps the paper's rule
    pair_file.write_text(json.dumps({**data, "ead": {"tau": 1.0, "window": 1}}))
    older = right.complete("hi", max_new_tokens=4, strategy="ead", pair=str(pair_file)).stats
    assert older["entropy_of"] == "writer" and older["calibration"]["used"] == ["tau", "window"]
    with pytest.raises(PackageError, match="does not exist"):
        right.complete("hi", max_new_tokens=4, strategy="ead", pair=str(tmp_path / "nope.json"))
    with pytest.raises(GenerationError, match="pair file holds the settings of a big/little pair"):
        right.complete("hi", max_new_tokens=4, pair=str(pair_file))


def test_calibrate_bad_arguments(pair, home, tmp_path, capsys):
    from edgeinfer.cli import main

    assert main(["calibrate", str(pair["big"]), "--little", str(pair["other"]), "--quality", "1.5"]) == 2
    assert "--quality is a share" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["calibrate", str(pair["big"]), "--little", str(pair["other"]), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
