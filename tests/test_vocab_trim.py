"""VocabTrim exit heads (export --exit-vocab): the trimmed head scores the kept tokens exactly as the full
head does and leaves every other token out of reach; an exit after the last layer is a drafting head that a
little model drafts through; self-speculative and speculative decoding stay lossless with trimmed drafts."""

from __future__ import annotations

import numpy as np
import pytest

import edgeinfer
from edgeinfer.errors import ExportError

PROMPTS = ["Paris is the capital of", "def add(a, b):\n    return a + b\ndef add(a, b):"]
N = 24
KEEP = 64


@pytest.fixture(scope="module")
def trimmed(tiny_models, tmp_path_factory):
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("vocab-trim")
    src = str(tiny_models("llama"))
    out = {"plain": root / "plain", "full-exits": root / "full-exits", "trimmed": root / "trimmed"}
    export_model(src, out["plain"], "fp32", max_context=256, progress=False)
    export_model(src, out["full-exits"], "fp32", exits=[2, 4], max_context=256, progress=False)
    export_model(src, out["trimmed"], "fp32", exits=[2, 4], exit_vocab=KEEP, max_context=256, progress=False)
    return out


def test_exit_after_the_last_layer_keeps_the_models_output(trimmed):
    """--exits 4 on a 4-layer model cuts a head-only last stage: plain decoding is unchanged."""
    plain = edgeinfer.load(trimmed["plain"])
    staged = edgeinfer.load(trimmed["trimmed"])
    assert sorted(staged.decoder.exits) == [2, 4]
    for p in PROMPTS:
        assert staged.complete(p, max_new_tokens=N, ignore_eos=True).tokens == \
            plain.complete(p, max_new_tokens=N, ignore_eos=True).tokens


def test_trimmed_head_scores_kept_and_context_tokens_like_the_full_head(trimmed):
    full = edgeinfer.load(trimmed["full-exits"]).decoder
    trim = edgeinfer.load(trimmed["trimmed"]).decoder
    ids = edgeinfer.load(trimmed["plain"]).tokenizer.encode(PROMPTS[1])
    outside = [t for t in range(trim.vocab_size) if t not in set(ids)]
    for layer in (2, 4):
        stages = trim.exits[layer]
        a = full.forward(ids, logits_to_keep=len(ids), stages=stages)
        full.reset()
        trim.set_exit_context([outside[-1]])  # one token that is not in the prompt
        base = trim.forward(ids, logits_to_keep=len(ids), stages=stages)
        trim.reset()
        probe = outside[-1]
        listed = set(np.flatnonzero(base[0] > -1e8).tolist())
        assert probe in listed and np.all(base[0][base[0] <= -1e8] == -1e9)
        kept_list = listed - {probe} if len(listed) == KEEP + 1 else listed
        assert len(kept_list) == KEEP
        trim.set_exit_context(ids)  # the prompt's tokens are scored too, whether listed or not
        b = trim.forward(ids, logits_to_keep=len(ids), stages=stages)
        trim.reset()
        assert set(np.flatnonzero(b[0] > -1e8).tolist()) == kept_list | set(ids)
        scored = b[0] > -1e8
        np.testing.assert_allclose(b[:, scored], a[:, scored], rtol=1e-4, atol=1e-4)


def test_self_speculative_with_a_trimmed_exit_is_lossless(trimmed):
    plain = edgeinfer.load(trimmed["plain"])
    model = edgeinfer.load(trimmed["trimmed"])
    for p in PROMPTS:
        want = plain.complete(p, max_new_tokens=N, ignore_eos=True).tokens
        res = model.complete(p, max_new_tokens=N, ignore_eos=True, strategy="self-speculative", exit_layer=2,
                             draft_len=3)
        assert res.tokens == want and res.stats["drafted"] > 0


def test_little_model_drafts_through_its_drafting_head(trimmed):
    """A little package with an exit after its last layer drafts through that (trimmed) head; the output
    is still the big model's."""
    big = edgeinfer.load(trimmed["plain"], little=trimmed["trimmed"])
    alone = edgeinfer.load(trimmed["plain"])
    for p in PROMPTS:
        res = big.complete(p, max_new_tokens=N, ignore_eos=True, strategy="speculative")
        assert res.tokens == alone.complete(p, max_new_tokens=N, ignore_eos=True).tokens
    assert res.stats["little"] == "little/drafting-head" and res.stats["little_model"]["calls"] > 0
    little = big.little.decoder
    assert all(p is None for p in little.pending[1:])  # nothing left waiting for the head-only stage
    # the little model still runs alone at full depth afterwards
    assert big.little.complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True).tokens == \
        alone.complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True).tokens


@pytest.mark.parametrize("kwargs,match", [
    (dict(exit_vocab=32), "--exit-vocab trims the exit head: give the exits"),
    (dict(exits=[2], exit_vocab=0), "--exit-vocab keeps between 1 and"),
    (dict(exits=[2], exit_vocab=100000), "--exit-vocab keeps between 1 and"),
    (dict(exits=[5]), r"outside 1\.\.4"),
])
def test_bad_exit_vocab_is_refused(tiny_models, tmp_path, kwargs, match):
    from edgeinfer.export import export_model

    with pytest.raises(ExportError, match=match):
        export_model(str(tiny_models("llama")), tmp_path / "pkg", "fp32", max_context=256, progress=False, **kwargs)
