"""Stages and early exits in the decoder of encoder-decoder packages (export --exits/--stages):
staged T5, BART and Whisper packages against transformers (logits, greedy and beam tokens),
the pending rows that fill skipped layers, early-exit and self-speculative decoding, and
the errors for bad exits and bad strategy options. The tiny random models and their
transformers references are those of test_seq2seq_text and test_whisper_parity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_seq2seq_text import INPUT, text_models  # noqa: F401  (text_models: a fixture)
from test_seq2seq_text import _hf_generate as _hf_generate_text
from test_whisper_parity import START, _tiny_whisper, features  # noqa: F401  (features: a fixture)
from test_whisper_parity import _hf_generate as _hf_generate_speech

import edgeinfer
from edgeinfer.errors import ExportError, GenerationError
from edgeinfer.seq2seq.state import StagedDecoderState

EOS = 2
FAMILIES = ["t5", "bart", "whisper"]


@pytest.fixture(scope="module")
def staged(text_models, tmp_path_factory):  # noqa: F811
    """family -> (HF model, fp32 package with exit 1, unstaged fp32 package, HF folder)."""
    from edgeinfer.export import export_model

    cache = {}

    def get(family: str):
        if family not in cache:
            if family == "whisper":
                root = tmp_path_factory.mktemp("whisper_staged")
                hf, plain = _tiny_whisper(root / "hf"), root / "fp32"
                export_model(str(root / "hf"), plain, "fp32", progress=False)
                folder = root / "hf"
            else:
                hf, plain, root = text_models(family)
                folder = root / family
            out = root / f"{family}-fp32-exit1"
            export_model(str(folder), out, "fp32", exits=[1], progress=False)
            cache[family] = (hf, out, plain, folder)
        return cache[family]

    return get


def _inputs(model, features):  # noqa: F811
    """(encoder input, decoder prompt, extra search parameters) of a tiny model. The tiny BART
    and Whisper end within two tokens: EOS is suppressed there to get a sequence (and the
    rules are then applied to exit rows too)."""
    if model.audio:
        return features, [START], {"suppress_tokens": [EOS]}
    extra = {"suppress_tokens": [EOS]} if model.package.manifest["family"] == "bart" else {}
    return np.asarray([INPUT], np.int64), None, extra


def _reference(family, hf, model, inputs, **kw):
    if family == "whisper":
        return _hf_generate_speech(hf, inputs, [START], **kw)
    return _hf_generate_text(hf, list(inputs[0]), model.generation.decoder_start_ids[0], **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_package_matches_transformers(staged, features, family):  # noqa: F811
    import torch

    hf, pkg, plain_pkg, _ = staged(family)
    model, plain = edgeinfer.load(pkg), edgeinfer.load(plain_pkg)
    m = model.package.manifest
    roles = [g["role"] for g in m["graphs"]]
    assert roles == ["encoder", "cross_kv", "decoder_stage", "decoder_stage", "exit_head"]
    assert [g["layers"] for g in m["graphs"] if g["role"] == "decoder_stage"] == [[0, 1], [1, 2]]
    assert m["exits"] == [{"layer": 1, "after_stage": 0, "head": "exit_head", "adapter": None}]
    inputs, prompt, _ = _inputs(model, features)
    hidden = model.encode(inputs)
    dec = [prompt[0] if prompt else model.generation.decoder_start_ids[0], 17, 45, 99, 3]
    with torch.no_grad():
        if family == "whisper":
            ref = hf(input_features=torch.from_numpy(inputs), decoder_input_ids=torch.tensor([dec])).logits[0]
        else:
            ref = hf(input_ids=torch.from_numpy(inputs), decoder_input_ids=torch.tensor([dec])).logits[0]
    ref = ref.numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(model.decoder_logits(dec, hidden) / scale, ref / scale, atol=2e-5)
    greedy = dict(max_new_tokens=16)
    beams = dict(max_new_tokens=12, num_beams=3, length_penalty=0.8, no_repeat_ngram_size=3)
    for kw in (greedy, beams):
        ours = model.generate_ids(inputs, prompt, **kw)
        assert ours == _reference(family, hf, model, inputs, **kw)
        assert ours == plain.generate_ids(inputs, prompt, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_head_applies_the_family_head(staged, features, family):  # noqa: F811
    """The exit at layer 1 equals transformers' final norm and LM head on its layer-1 hidden
    states: T5's d_model**-0.5 before the tied head, BART's final_logits_bias, Whisper's tied proj_out."""
    import torch

    hf, pkg, _, _ = staged(family)
    model = edgeinfer.load(pkg)
    inputs, prompt, _ = _inputs(model, features)
    dec = [prompt[0] if prompt else model.generation.decoder_start_ids[0], 17, 45, 99]
    with torch.no_grad():
        key = "input_features" if family == "whisper" else "input_ids"
        out = hf(**{key: torch.from_numpy(inputs)}, decoder_input_ids=torch.tensor([dec]), output_hidden_states=True)
        h = out.decoder_hidden_states[1]  # after decoder layer 0
        if family == "whisper":
            ref = hf.proj_out(hf.model.decoder.layer_norm(h))
        elif family == "t5":
            h = hf.decoder.final_layer_norm(h)
            ref = hf.lm_head(h * hf.config.d_model ** -0.5 if hf.config.tie_word_embeddings else h)
        else:
            ref = hf.lm_head(h) + hf.final_logits_bias
    ref = ref[0].numpy()
    state = StagedDecoderState(model, model.cross_kv(model.encode(inputs)), 1)
    ours = state.exit_logits(state.forward(np.asarray([dec], np.int64), 1))[0]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours / scale, ref / scale, atol=2e-5)


def test_pending_rows_fill_the_skipped_layers(staged, features):  # noqa: F811
    """Tokens run only up to the exit wait as pending rows; the next full-depth token runs
    them first, so its logits are those of one full pass over the whole sequence."""
    _, pkg, _, _ = staged("whisper")
    model = edgeinfer.load(pkg)
    hidden = model.encode(features)
    ids = [START, 17, 45, 99, 3, 250]
    full = model.decoder_logits(ids, hidden)
    state = StagedDecoderState(model, model.cross_kv(hidden), 1)
    state.step(np.asarray([ids[:2]], np.int64))
    for t in ids[2:5]:  # exit-depth only: stage 1 lags by three positions
        out = state.forward(np.asarray([[t]], np.int64), 1)
        assert out.shape == (1, 1, 64)
    assert state.stage_length(0) == 5 and state.stage_length(1) == 2 and state.pending[1].shape[1] == 3
    last = state.step(np.asarray([[ids[5]]], np.int64))[0]
    assert state.stage_length(1) == 6 and state.pending[1] is None
    np.testing.assert_allclose(last, full[-1], atol=1e-4)
    state.truncate(4)  # back to four positions in every stage
    assert state.stage_length(0) == state.stage_length(1) == 4
    np.testing.assert_allclose(state.step(np.asarray([[ids[4]]], np.int64))[0], full[4], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_speculative_equals_greedy_and_early_exit_at_one(staged, features, family):  # noqa: F811
    _, pkg, _, _ = staged(family)
    model = edgeinfer.load(pkg)
    inputs, prompt, extra = _inputs(model, features)
    plain = model.generate_ids(inputs, prompt, max_new_tokens=24, **extra)
    assert len(plain) >= 8
    for k, stop in ((1, 0.0), (3, 0.0), (6, 0.0), (4, 0.6)):  # 0.6: drafting stops at unsure exit rows
        ours = model.generate_ids(inputs, prompt, max_new_tokens=24, strategy="self-speculative", draft_len=k,
                                  threshold=stop, **extra)
        stats = model.strategy_stats
        assert ours == plain
        assert stats["rounds"] >= 1 and stats["drafted"] >= stats["accepted"]
        assert stats["emitted"] == len(plain) - 1  # the first token comes from the prompt's pass
    ours = model.generate_ids(inputs, prompt, max_new_tokens=24, strategy="early-exit", threshold=1.0, **extra)
    assert ours == plain and model.strategy_stats["full"] == len(plain) - 1
    assert model.strategy_stats["exits"] == {"1": 0} and model.strategy_stats["average_depth"] == 2
    # threshold 0: every token after the first leaves at layer 1
    lossy = model.generate_ids(inputs, prompt, max_new_tokens=24, strategy="early-exit", threshold=0.0, **extra)
    stats = model.strategy_stats
    assert lossy[0] == plain[0] and stats["full"] == 0 and stats["exits"]["1"] == len(lossy) - 1
    assert stats["average_depth"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_strategy_keeps_the_processors_and_transformers_tokens(staged, features, family):  # noqa: F811
    """The one decode loop with the one logits chain: on a staged package, every lossless
    strategy gives transformers' greedy tokens under a repetition penalty and no-repeat
    bigrams, exit rows and drafts included (the seq2seq-only loops these replaced took
    neither)."""
    hf, pkg, _, _ = staged(family)
    model = edgeinfer.load(pkg)
    inputs, prompt, extra = _inputs(model, features)
    rules = dict(extra, repetition_penalty=1.3, no_repeat_ngram_size=2)
    ref = _reference(family, hf, model, inputs, max_new_tokens=16, **rules)
    assert ref != _reference(family, hf, model, inputs, max_new_tokens=16, **extra)  # the rules change the output
    for strategy, options in (("plain", {}), ("lookup", {"draft_len": 3}), ("adaptive", {}),
                              ("self-speculative", {"draft_len": 3}), ("early-exit", {"threshold": 1.0})):
        got = model.generate_ids(inputs, prompt, max_new_tokens=16, strategy=strategy, **options, **rules)
        assert got[:len(ref)] == ref, strategy


def test_sampled_strategies_run_on_a_staged_package(staged):
    """Sampling with early exit and self-speculative decoding (refused before they shared the
    decoder-only strategies): seeded runs repeat, and self-speculative sampling at a
    near-zero temperature gives the greedy tokens."""
    _, pkg, _, _ = staged("t5")
    model = edgeinfer.load(pkg)
    ids = np.asarray([INPUT], np.int64)
    plain = model.generate_ids(ids, max_new_tokens=12)
    for strategy in ("early-exit", "self-speculative"):
        a = model.generate_ids(ids, max_new_tokens=12, strategy=strategy, temperature=0.8, seed=3)
        assert a == model.generate_ids(ids, max_new_tokens=12, strategy=strategy, temperature=0.8, seed=3)
    cold = model.generate_ids(ids, max_new_tokens=12, strategy="self-speculative", temperature=1e-4, seed=1)
    assert cold == plain


def test_quantized_staged_packages_equal_unstaged(staged):
    from edgeinfer.export import export_model

    _, _, _, folder = staged("t5")
    ids = np.asarray([INPUT], np.int64)
    for precision in ("int8", "int4"):
        plain, cut = folder.parent / f"t5-{precision}", folder.parent / f"t5-{precision}-x1"
        export_model(str(folder), plain, precision, progress=False, block_size=16, force=True)
        export_model(str(folder), cut, precision, progress=False, block_size=16, exits=[1], force=True)
        a, b = edgeinfer.load(plain), edgeinfer.load(cut)
        assert b.package.manifest["exits"][0]["layer"] == 1
        assert a.generate_ids(ids, max_new_tokens=12) == b.generate_ids(ids, max_new_tokens=12)
        assert b.generate_ids(ids, max_new_tokens=12, strategy="self-speculative") == \
            a.generate_ids(ids, max_new_tokens=12)


@pytest.mark.parametrize("exits,stages,message", [
    ([0], None, "--exits 0 is outside 1..1"),
    ([2], None, "--exits 2 is outside 1..1"),
    ([1, 1], None, "strictly increasing"),
    (None, [3], "--stages 3 is outside 1..1"),
])
def test_bad_exits_are_refused_before_writing(staged, tmp_path, exits, stages, message):
    from edgeinfer.export import export_model

    _, _, _, folder = staged("bart")
    with pytest.raises(ExportError, match=message):
        export_model(str(folder), tmp_path / "out", "fp32", exits=exits, stages=stages, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--exit-adapters"):
        export_model(str(folder), tmp_path / "out", "fp32", exits=[1], exit_adapters=True, progress=False)


def test_bad_strategy_options(staged, features):  # noqa: F811
    _, pkg, plain_pkg, _ = staged("t5")
    model = edgeinfer.load(pkg)
    ids = np.asarray([INPUT], np.int64)
    cases = [(dict(strategy="early-exit", exit_layer=2), "exit layer 2 is not in this package"),
             (dict(strategy="early-exit", threshold=1.5), "threshold must be in"),
             (dict(strategy="self-speculative", draft_len=0), "draft length must be"),
             (dict(strategy="self-speculative", threshold=-0.1), "threshold must be in"),
             (dict(strategy="self-speculative", num_beams=2), "decodes one sequence"),
             (dict(strategy="lookup", num_beams=2), "decodes one sequence"),
                 (dict(strategy="lookahead"), "unknown strategy 'lookahead'")]
    for params, message in cases:
        with pytest.raises(GenerationError, match=message):
            model.generate_ids(ids, max_new_tokens=4, **params)
    with pytest.raises(GenerationError, match="no early exits"):
        edgeinfer.load(plain_pkg).generate_ids(ids, max_new_tokens=4, strategy="early-exit")


def test_cli_reports_strategy_stats(staged):
    _, pkg, _, _ = staged("t5")
    run = [sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "Paris is the capital", "--json",
           "--max-new-tokens", "10"]
    out = subprocess.run(run + ["--strategy", "self-speculative", "--exit-layer", "1", "--draft-len", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    plain = edgeinfer.load(pkg).generate("Paris is the capital", max_new_tokens=10)
    assert data["tokens"] == plain.tokens
    assert data["stats"]["strategy"] == "self-speculative" and data["stats"]["exit_layer"] == 1
    bad = subprocess.run(run + ["--strategy", "early-exit", "--threshold", "2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "threshold must be in [0, 1]" in bad.stderr


@pytest.mark.parametrize("damage,message", [
    ("drop_stage", "no complete chain of decoder stages"),
    ("exit_layer", "exits its decoder stages do not match"),
    ("drop_head", "exits its decoder stages do not match"),
])
def test_inconsistent_staged_manifest_is_a_package_error(staged, tmp_path, damage, message):
    import shutil

    from edgeinfer.export.package_writer import write_manifest

    from edgeinfer.errors import PackageError

    _, pkg, _, _ = staged("whisper")
    broken = tmp_path / "broken"
    shutil.copytree(pkg, broken)
    manifest = json.loads((broken / "edgeinfer.json").read_text())
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    if damage == "drop_stage":
        manifest["graphs"] = [g for g in manifest["graphs"] if g["name"] != "decoder_stage1"]
    elif damage == "exit_layer":
        manifest["exits"][0]["layer"] = 2
    else:
        manifest["graphs"] = [g for g in manifest["graphs"] if g["role"] != "exit_head"]
    write_manifest(broken, manifest)
    with pytest.raises(PackageError, match=message):
        edgeinfer.load(broken)
