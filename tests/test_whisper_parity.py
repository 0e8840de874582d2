"""Whisper packages against transformers on a tiny random WhisperForConditionalGeneration:
encoder outputs, decoder logits, greedy and beam-search tokens identical; quantized
packages stay close; transcription of a WAV goes through the same search."""

from __future__ import annotations

import dataclasses
import wave

import numpy as np
import pytest
from conftest import make_tokenizer

import edgeinfer
from edgeinfer.errors import GenerationError

VOCAB = 320
START, EOS, PAD = 1, 2, 0
SOURCE_POSITIONS = 32  # 64 log-mel frames = 0.64 s windows at 10 ms hops


def _tiny_whisper(folder, seed: int = 0, eos_boost: float = 0.0):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=SOURCE_POSITIONS, max_target_positions=64,
                        decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=START,
                        suppress_tokens=None, begin_suppress_tokens=None, init_std=0.2)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms and biases off their trivial init, so parity means something
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if eos_boost:  # make EOS likely so beams finish at different lengths
            model.model.decoder.embed_tokens.weight[EOS] *= eos_boost
    model.generation_config.suppress_tokens = None
    model.generation_config.begin_suppress_tokens = None
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(folder)
    make_tokenizer(VOCAB).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def whisper_pair(tmp_path_factory):
    """(HF model, fp32 package path, its folder) for a tiny random Whisper."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("whisper")
    model = _tiny_whisper(root / "hf")
    export_model(str(root / "hf"), root / "fp32", "fp32", progress=False)
    return model, root / "fp32", root


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, 80, 2 * SOURCE_POSITIONS)).astype(np.float32)


def _hf_generate(model, feats, prompt, **kw):
    import torch
    from transformers.generation import GenerationMixin

    with torch.no_grad():  # the plain generate loop (Whisper's own wrapper adds long-form logic)
        out = GenerationMixin.generate(model, input_features=torch.from_numpy(feats),
                                       decoder_input_ids=torch.tensor([prompt]), do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


def test_manifest_is_encoder_decoder(whisper_pair):
    _, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    m = model.package.manifest
    assert m["kind"] == "encoder-decoder" and m["family"] == "whisper"
    assert [g["role"] for g in m["graphs"]] == ["encoder", "cross_kv", "decoder"]
    assert m["audio"]["frames"] == 2 * SOURCE_POSITIONS


def test_encoder_and_decoder_logits_match_transformers(whisper_pair, features):
    import torch

    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    ids = [START, 17, 45, 99, 3, 250]
    with torch.no_grad():
        enc = hf.model.encoder(torch.from_numpy(features)).last_hidden_state
        ref = hf(input_features=torch.from_numpy(features), decoder_input_ids=torch.tensor([ids])).logits[0]
    ours = model.encode(features)
    np.testing.assert_allclose(ours, enc.numpy(), atol=2e-4, rtol=1e-4)
    logits = model.decoder_logits(ids, ours)
    np.testing.assert_allclose(logits, ref.numpy(), atol=2e-4, rtol=1e-4)


def test_cached_steps_match_one_pass(whisper_pair, features):
    """Feeding tokens one at a time through the KV cache gives the logits of one full pass."""
    from edgeinfer.seq2seq.state import DecoderState

    _, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    ids = [START, 17, 45, 99, 3]
    hidden = model.encode(features)
    full = model.decoder_logits(ids, hidden)
    state = DecoderState(model, model.cross_kv(hidden), 1)
    steps = [state.step(np.asarray([[t]], np.int64))[0] for t in ids]
    np.testing.assert_allclose(np.stack(steps), full, atol=1e-4)


def test_greedy_tokens_identical(whisper_pair, features):
    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    ref = _hf_generate(hf, features, [START], max_new_tokens=20)
    assert model.generate_ids(features, [START], max_new_tokens=20) == ref


@pytest.mark.parametrize("beams,length_penalty,ngram", [(3, 1.0, 0), (4, 0.5, 2)])
def test_beam_search_tokens_identical(whisper_pair, features, beams, length_penalty, ngram):
    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    kw = dict(max_new_tokens=16, num_beams=beams, length_penalty=length_penalty, no_repeat_ngram_size=ngram)
    ref = _hf_generate(hf, features, [START], **kw)
    assert model.generate_ids(features, [START], **kw) == ref


def test_beam_search_with_finishing_beams(tmp_path, features):
    """EOS made likely: hypotheses finish at different lengths, the length penalty and the
    early-stop heuristic decide, and the result still equals transformers'."""
    from edgeinfer.export import export_model

    hf = _tiny_whisper(tmp_path / "hf", seed=3, eos_boost=4.0)
    export_model(str(tmp_path / "hf"), tmp_path / "pkg", "fp32", progress=False)
    model = edgeinfer.load(tmp_path / "pkg")
    rng = np.random.default_rng(1)
    finished_early = 0
    for _ in range(4):
        feats = rng.standard_normal(features.shape).astype(np.float32)
        for lp in (1.0, 2.0):
            kw = dict(max_new_tokens=24, num_beams=3, length_penalty=lp)
            ref = _hf_generate(hf, feats, [START], **kw)
            assert model.generate_ids(feats, [START], **kw) == ref
            finished_early += ref[-1] == EOS and len(ref) < 24
    assert finished_early  # the boosted EOS really ended some hypotheses


def test_suppressed_tokens_never_appear(whisper_pair, features):
    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    free = model.generate_ids(features, [START], max_new_tokens=12)
    banned = sorted(set(free))[:3]
    out = model.generate_ids(features, [START], max_new_tokens=12, suppress_tokens=banned,
                             begin_suppress_tokens=[free[0]])
    assert not set(out) & set(banned) and out[0] != free[0]
    ref = _hf_generate(hf, features, [START], max_new_tokens=12, suppress_tokens=banned,
                       begin_suppress_tokens=[free[0]])
    assert out == ref


def test_repetition_penalty_matches_transformers(whisper_pair, features):
    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    base = dict(max_new_tokens=12, suppress_tokens=[int(model.generation.eos_token_id)])  # all 12 tokens
    free = model.generate_ids(features, [START], **base)
    out = model.generate_ids(features, [START], **base, repetition_penalty=20.0)
    assert out == _hf_generate(hf, features, [START], **base, repetition_penalty=20.0)
    assert len(set(free)) < len(free) and out != free  # the penalty had repeats to act on, and did


def test_lookup_decoding_gives_the_plain_tokens(whisper_pair, features):
    hf, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    base = dict(max_new_tokens=16, suppress_tokens=[int(model.generation.eos_token_id)])
    ref = _hf_generate(hf, features, [START], **base)
    assert model.generate_ids(features, [START], strategy="lookup", **base) == ref
    assert model.strategy_stats["drafted"] > 0
    with pytest.raises(edgeinfer.GenerationError, match="timestamps"):
        model.generate_ids(features, None, timestamps=True, strategy="lookup")


def test_sampling_is_seeded(whisper_pair, features):
    _, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    a = model.generate_ids(features, [START], max_new_tokens=10, temperature=1.0, seed=7)
    b = model.generate_ids(features, [START], max_new_tokens=10, temperature=1.0, seed=7)
    greedy = model.generate_ids(features, [START], max_new_tokens=10)
    assert a == b and len(a) >= 1
    assert a != greedy or len(set(a)) == 1  # with temperature 1 a random model rarely follows the argmax
    with pytest.raises(GenerationError):
        model.generate_ids(features, [START], num_beams=0)


@pytest.mark.parametrize("precision,tol", [("fp16", 0.02), ("int8", 0.08), ("int4", 0.5)])
def test_quantized_packages_stay_close(whisper_pair, features, precision, tol):
    from edgeinfer.export import export_model

    _, pkg, root = whisper_pair
    out = root / precision
    if not out.exists():
        export_model(str(root / "hf"), out, precision, progress=False, block_size=32)
    ids = [START, 17, 45, 99]
    ref_model, q_model = edgeinfer.load(pkg), edgeinfer.load(out)
    ref = ref_model.decoder_logits(ids, ref_model.encode(features))
    got = q_model.decoder_logits(ids, q_model.encode(features))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < tol, f"{precision}: max error {rel:.3f} of the logit range"
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > (0.9 if precision == "int4" else 0.99)
    assert q_model.package.manifest["quantization"]["weights"] == precision


def test_transcribe_a_wav_uses_the_same_search(whisper_pair, tmp_path):
    """A 16-bit WAV at 8 kHz of 1.5 s: resampled, cut into 0.64 s windows, each window's
    tokens equal to greedy generation on that window's features."""
    from edgeinfer.seq2seq.whisper.audio import iter_windows, log_mel_spectrogram

    _, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    t = np.arange(12000) / 8000
    sig = (0.3 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((sig * 32767).astype("<i2").tobytes())
    res = model.transcribe(path, max_new_tokens=8)
    assert res.windows == 3 and res.silent_windows == 0 and abs(res.audio_s - 1.5) < 1e-6
    for window, tokens in zip(iter_windows(path, 16000, 0.64), res.tokens):
        feats = log_mel_spectrogram(window, n_samples=2 * SOURCE_POSITIONS * 160)[None]
        assert model.generate_ids(feats, [START], max_new_tokens=8) == tokens
    silent = tmp_path / "silent.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    quiet = model.transcribe(silent)
    assert quiet.text == "" and quiet.silent_windows == quiet.windows == 2 and quiet.new_tokens == 0


def test_manifest_missing_io_is_a_package_error(whisper_pair, tmp_path):
    import json
    import shutil

    from edgeinfer.export.package_writer import write_manifest

    from edgeinfer.errors import PackageError

    _, pkg, _ = whisper_pair
    broken = tmp_path / "broken"
    shutil.copytree(pkg, broken)
    manifest = json.loads((broken / "edgeinfer.json").read_text())
    for key in ("format", "format_version", "files"):
        manifest.pop(key)
    del manifest["io"]["cross_key"]
    write_manifest(broken, manifest)
    with pytest.raises(PackageError, match="cross_key"):
        edgeinfer.load(broken)


def test_language_and_task_tokens(whisper_pair, features):
    """English-only packages refuse other languages; a multilingual generation table puts
    start-of-transcript, language, task (and no-timestamps) first, as forced decoder ids."""
    from edgeinfer.export.seq2seq.export import _whisper_generation
    from edgeinfer.models.whisper import spec_from_hf

    _, pkg, _ = whisper_pair
    model = edgeinfer.load(pkg)
    assert model.decoder_prompt(language="en") == model.decoder_prompt() == [START]
    with pytest.raises(GenerationError, match="English-only"):
        model.decoder_prompt(language="fr")
    specials = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|fr|>": 50265,
                "<|haw|>": 50352, "<|translate|>": 50358, "<|transcribe|>": 50359, "<|nocaptions|>": 50362,
                "<|notimestamps|>": 50363}
    cfg = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": 51865,
           "max_source_positions": 1500, "max_target_positions": 448, "num_mel_bins": 80}
    gen = _whisper_generation(spec_from_hf(cfg), specials, [], [])
    assert gen["language_ids"] == {"en": 50259, "fr": 50265, "haw": 50352}
    assert gen["task_ids"] == {"translate": 50358, "transcribe": 50359}
    assert gen["decoder_start_ids"] == [50258, 50259, 50359, 50363]
    # the same table on the tiny model's ids: the prompt is built and generation starts from it
    model.generation = dataclasses.replace(model.generation, start_of_transcript_id=START, no_timestamps_token_id=9,
                                           language_ids={"en": 5, "fr": 6}, task_ids={"transcribe": 7, "translate": 8})
    assert model.decoder_prompt(language="fr", task="translate") == [START, 6, 8, 9]
    assert model.decoder_prompt(timestamps=True, language="fr") == [START, 6, 7]
    assert model.generate_ids(features, language="fr", task="translate", max_new_tokens=6) == \
        model.generate_ids(features, [START, 6, 8, 9], max_new_tokens=6)
    with pytest.raises(GenerationError, match="unknown language 'xx'"):
        model.decoder_prompt(language="xx")
