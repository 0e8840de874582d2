"""Whisper long-form robustness on a tiny random Whisper: temperature fallback (seeded,
reproducible, scored from the decoder's own log-probabilities), silence by the no-speech
probability, conditioning on previous text (the decoder's input ids), option errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import wave

import numpy as np
import pytest
from test_whisper_parity import SOURCE_POSITIONS, START, _tiny_whisper

import edgeinfer
from edgeinfer.errors import GenerationError
from edgeinfer.seq2seq.whisper.longform import (
    LongFormOptions,
    compression_ratio,
    decode_window,
    kept_tokens,
    previous_text_prompt,
)

PREV, NO_SPEECH = 3, 5  # tokens of the tiny vocabulary standing for <|startofprev|> and <|nocaptions|>


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("whisper-longform")
    _tiny_whisper(root / "hf")
    export_model(str(root / "hf"), root / "fp32", "fp32", progress=False)
    return root / "fp32"


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """1.5 s of a modulated tone at 16 kHz: three 0.64 s windows of the tiny model."""
    t = np.arange(24000) / 16000
    sig = (0.3 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32)
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((sig * 32767).astype("<i2").tobytes())
    return path


def _model(package):
    model = edgeinfer.load(package)
    model.generation = dataclasses.replace(model.generation, start_of_prev_id=PREV, no_speech_token_id=NO_SPEECH)
    return model


def _hidden(model, seed=0):
    feats = np.random.default_rng(seed).standard_normal((1, 80, 2 * SOURCE_POSITIONS)).astype(np.float32)
    return model.encode(feats)


def _reference_scores(model, hidden, prompt, tokens):
    """Average log-probability (text tokens + 1) and no-speech probability, by hand."""
    logits = model.decoder_logits(list(prompt) + list(tokens), hidden).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    total = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens))
    text = sum(1 for t in tokens if t not in model.eos)
    return total / (text + 1), float(np.exp(logp[prompt.index(START), NO_SPEECH]))


def test_compression_ratio_flags_repetition():
    prose = "The quick brown fox jumps over the lazy dog while the cat sleeps."
    assert compression_ratio(prose) < 1.5
    assert compression_ratio(" the the the the" * 30) > 2.4
    assert compression_ratio("") == 0.0


def test_fallback_tries_the_next_temperature_seeded(package):
    """An impossible log-prob threshold fails every decoding: each temperature is tried in
    order, the sampled ones are exactly seeded sampling, the best by average log-prob is kept."""
    model = _model(package)
    hidden = _hidden(model)
    params = dict(max_new_tokens=10)
    options = LongFormOptions(temperatures=(0.0, 0.4, 1.0), logprob_threshold=0.0).validate()
    got = decode_window(model, hidden, [START], 0, False, params, options, seed=7)
    assert [a["temperature"] for a in got.attempts] == [0.0, 0.4, 1.0]
    assert got.avg_logprob == pytest.approx(max(a["avg_logprob"] for a in got.attempts), abs=1e-4)
    # the kept tokens are what the search gives at that temperature and seed
    i = [a["temperature"] for a in got.attempts].index(got.temperature)
    again = model.search(hidden, [START], False, None, dict(max_new_tokens=10, temperature=got.temperature,
                                                              **({"seed": 7 + i} if got.temperature else {})))
    assert got.tokens == again
    avg, nsp = _reference_scores(model, hidden, [START], got.tokens)
    assert got.avg_logprob == pytest.approx(avg, abs=1e-4) and got.no_speech_prob == pytest.approx(nsp, abs=1e-5)
    # reproducible: the same seed gives the same attempts; another seed samples differently
    assert decode_window(model, hidden, [START], 0, False, params, options, seed=7).attempts == got.attempts
    other = [decode_window(model, hidden, [START], 0, False, params, options, seed=s).attempts for s in (8, 9, 10)]
    assert any(o[1:] != got.attempts[1:] for o in other)


def test_logged_step_logits_score_like_a_teacher_forced_pass(package):
    """Greedy's logged logits and a separate decoder pass over its tokens give the same scores."""
    from edgeinfer.seq2seq.whisper.longform import score_tokens

    model = _model(package)
    hidden = _hidden(model, seed=1)
    cross, logged = model.cross_kv(hidden), []
    prompt = [PREV, 40, 41, START, 9]  # start-of-transcript then another forced token (no-timestamps)
    tokens = model.search(hidden, prompt, False, None, dict(max_new_tokens=8), cross=cross, step_logits=logged)
    assert len(logged) == len(tokens) == 8
    fast = score_tokens(model, cross, prompt, tokens, False, {}, NO_SPEECH, 3, logged)
    full = score_tokens(model, cross, prompt, tokens, False, {}, NO_SPEECH, 3)
    np.testing.assert_allclose(fast, full, atol=1e-4)
    np.testing.assert_allclose(full, _reference_scores(model, hidden, prompt, tokens), atol=1e-4)
    # start-of-transcript last in the prompt (timestamps): the first logged step is its row
    logged, prompt = [], [PREV, 40, 41, START]
    tokens = model.search(hidden, prompt, False, None, dict(max_new_tokens=6), cross=cross, step_logits=logged)
    np.testing.assert_allclose(score_tokens(model, cross, prompt, tokens, False, {}, NO_SPEECH, 3, logged),
                               _reference_scores(model, hidden, prompt, tokens), atol=1e-4)


def test_first_passing_result_is_kept(package):
    model = _model(package)
    hidden = _hidden(model)
    options = LongFormOptions(temperatures=(0.0, 0.4), logprob_threshold=-100.0,
                              compression_ratio_threshold=100.0).validate()
    got = decode_window(model, hidden, [START], 0, False, dict(max_new_tokens=10), options, seed=0)
    assert got.temperature == 0.0 and len(got.attempts) == 1
    assert got.tokens == model.search(hidden, [START], False, None, dict(max_new_tokens=10))


def test_transcribe_reports_fallback_per_window(package, wav):
    model = _model(package)
    res = model.transcribe(wav, max_new_tokens=6, temperatures=[0.0, 0.3], logprob_threshold=0.0,
                           condition_on_previous_text=False, seed=3)
    assert res.windows == len(res.window_stats) == 3
    assert all(w["attempts"] == 2 and w["temperature"] in (0.0, 0.3) for w in res.window_stats)
    assert {"compression_ratio", "avg_logprob", "no_speech_prob", "start_s"} <= set(res.window_stats[0])
    again = model.transcribe(wav, max_new_tokens=6, temperatures=[0.0, 0.3], logprob_threshold=0.0,
                             condition_on_previous_text=False, seed=3)
    assert again.tokens == res.tokens and again.window_stats == res.window_stats
    off = model.transcribe(wav, max_new_tokens=6, logprob_threshold=0.0, temperature_fallback=False,
                           condition_on_previous_text=False)
    assert all(w["attempts"] == 1 and w["temperature"] == 0.0 for w in off.window_stats)
    assert "window_stats" in res.as_dict()
    fixed = model.transcribe(wav, max_new_tokens=6, temperature=0.5, seed=2, logprob_threshold=0.0)
    assert all(w["attempts"] == 1 and w["temperature"] == 0.5 for w in fixed.window_stats)
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        model.transcribe(wav, temperature=-1.0)


def test_no_speech_window_is_silence(package, wav):
    """No-speech probability above the threshold with unsure tokens: the window is empty."""
    model = _model(package)
    res = model.transcribe(wav, max_new_tokens=6, no_speech_threshold=0.0, logprob_threshold=0.0)
    assert res.text == "" and res.silent_windows == res.windows == 3 and not res.segments
    assert all(w["silent"] and w["attempts"] == 1 and w["no_speech_prob"] > 0 for w in res.window_stats)
    kept = model.transcribe(wav, max_new_tokens=6, no_speech_threshold=1.0, logprob_threshold=0.0)
    assert kept.silent_windows == 0 and not any(w["silent"] for w in kept.window_stats)


def test_previous_text_goes_after_startofprev(package, wav, monkeypatch):
    """The decoder's input ids: window k starts with <|startofprev|>, the tokens of windows
    before it (end-of-text dropped), then start-of-transcript."""
    model = _model(package)
    prompts, search = [], model.search

    def recording(hidden, prompt, *args, **kwargs):
        prompts.append(list(prompt))
        return search(hidden, prompt, *args, **kwargs)

    monkeypatch.setattr(model, "search", recording)
    res = model.transcribe(wav, max_new_tokens=5, temperature_fallback=False)
    text = [[t for t in toks if t not in model.eos] for toks in res.tokens]
    assert text[0] and text[1], res.tokens  # the random model writes something in every window
    assert prompts == [[START], [PREV] + text[0] + [START], [PREV] + text[0] + text[1] + [START]]
    assert [w["prompt_tokens"] for w in res.window_stats] == [len(p) for p in prompts]
    prompts.clear()
    model.transcribe(wav, max_new_tokens=5, temperature_fallback=False, condition_on_previous_text=False)
    assert prompts == [[START]] * 3


def test_hot_window_resets_the_prompt(package, wav, monkeypatch):
    """A window decoded at temperature >= 0.5 does not condition the next one."""
    model = _model(package)
    prompts, search = [], model.search
    monkeypatch.setattr(model, "search", lambda hidden, prompt, *a, **kw: (prompts.append(list(prompt)),
                                                                             search(hidden, prompt, *a, **kw))[1])
    res = model.transcribe(wav, max_new_tokens=5, temperatures=[0.6], seed=1)
    assert res.tokens[0] and res.tokens[0][0] not in model.eos  # there was text to condition on
    assert prompts == [[START]] * 3


def test_prompt_cap_and_kept_tokens():
    history = list(range(100, 400))
    assert previous_text_prompt(PREV, history, [START, 9]) == [PREV] + history[-223:] + [START, 9]
    assert previous_text_prompt(PREV, history, [START], max_positions=64) == [PREV] + history[-31:] + [START]
    assert previous_text_prompt(PREV, [], [START]) == [START]
    begin, eos = 1000, {2}
    closed = [1000, 11, 12, 1010, 1010, 13, 1020, 2]
    assert kept_tokens(closed, eos, begin, resumed=True) == closed[:-1]
    open_segment = [1000, 11, 1010, 1012, 13, 14]
    assert kept_tokens(open_segment, eos, begin, resumed=True) == [1000, 11, 1010]
    assert kept_tokens(open_segment, eos, begin, resumed=False) == open_segment


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperatures=[0.0, 0.4, 0.2]), "increase strictly"),
    (dict(temperatures=[0.0, 0.0]), "increase strictly"),
    (dict(temperatures=[-0.2, 0.0]), ">= 0"),
    (dict(temperatures=[]), "at least one"),
    (dict(temperatures=["hot"]), "list of numbers"),
    (dict(compression_ratio_threshold=float("nan")), "compression_ratio_threshold"),
    (dict(no_speech_threshold=1.5), r"\[0, 1\]"),
])
def test_bad_options_are_clear_errors(package, wav, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        _model(package).transcribe(wav, **kwargs)


def test_cli_flags_and_json_stats(package, wav):
    base = [sys.executable, "-m", "edgeinfer.cli", "run", str(package), str(wav), "--json", "--max-new-tokens", "4"]
    out = subprocess.run(base + ["--no-temperature-fallback", "--no-condition-on-previous-text"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["window_stats"]
    assert len(stats) == 3 and all(w["attempts"] == 1 and w["prompt_tokens"] == 1 for w in stats)
