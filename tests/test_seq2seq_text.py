"""T5 (v1.0 and v1.1/Flan style), BART, mBART and Marian against transformers on tiny
random models: encoder outputs, decoder logits, greedy and beam-search tokens
identical; the text API and CLI; an input longer than the encoder takes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tokenizer

import edgeinfer
from edgeinfer.errors import ContextLengthError

VOCAB = 320
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ["t5", "t5-gated", "bart", "mbart", "marian"]


def _config(family: str):
    from transformers import BartConfig, MarianConfig, MBartConfig, T5Config

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS)
    if family.startswith("t5"):
        gated = family == "t5-gated"
        return T5Config(**common, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                        decoder_start_token_id=PAD, n_positions=64)
    cls = {"bart": BartConfig, "mbart": MBartConfig, "marian": MarianConfig}[family]
    extra = {"marian": dict(activation_function="swish", scale_embedding=True, decoder_start_token_id=PAD),
             "mbart": dict(scale_embedding=True, decoder_start_token_id=EOS),
             "bart": dict(decoder_start_token_id=EOS)}[family]
    return cls(**common, bos_token_id=BOS, d_model=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
               max_position_embeddings=64, forced_eos_token_id=None, **extra)


def _build(family: str, folder, seed: int = 0):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(_config(family)).eval()
    with torch.no_grad():  # norms, biases and position tables off their trivial init
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2 and "embed_positions" not in name:  # Marian recomputes its sinusoids
                p.mul_(4.0)  # larger weights: peaked distributions make token parity a real test
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.add_(torch.randn_like(model.final_logits_bias))
    model.generation_config.forced_eos_token_id = None
    model.generation_config.forced_bos_token_id = None
    model.save_pretrained(folder)
    make_tokenizer(VOCAB).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("text_seq2seq")
    cache = {}

    def get(family: str):
        if family not in cache:
            hf = _build(family, root / family)
            export_model(str(root / family), root / f"{family}-fp32", "fp32", progress=False)
            cache[family] = (hf, root / f"{family}-fp32", root)
        return cache[family]

    return get


def _hf_generate(model, ids, start, **kw):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[start]]),
                             do_sample=False, **kw)
    return out[0, 1:].tolist()


INPUT = [5, 17, 42, 99, 7, 250, 31, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_and_logits_match_transformers(text_models, family):
    import torch

    hf, pkg, _ = text_models(family)
    model = edgeinfer.load(pkg)
    assert model.package.manifest["kind"] == "encoder-decoder"
    start = model.generation.decoder_start_ids[0]
    dec = [start, 12, 40, 77, 3]
    with torch.no_grad():
        enc = hf.get_encoder()(input_ids=torch.tensor([INPUT])).last_hidden_state.numpy()
        ref = hf(input_ids=torch.tensor([INPUT]), decoder_input_ids=torch.tensor([dec])).logits[0].numpy()
    hidden = model.encode(np.asarray([INPUT], np.int64))
    np.testing.assert_allclose(hidden, enc, atol=1e-3, rtol=1e-4)
    logits = model.decoder_logits(dec, hidden)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(logits / scale, ref / scale, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_beam_tokens_identical(text_models, family):
    hf, pkg, _ = text_models(family)
    model = edgeinfer.load(pkg)
    start = model.generation.decoder_start_ids[0]
    ids = np.asarray([INPUT], np.int64)
    assert model.generate_ids(ids, max_new_tokens=16) == _hf_generate(hf, INPUT, start, max_new_tokens=16)
    kw = dict(max_new_tokens=12, num_beams=3, length_penalty=0.8, no_repeat_ngram_size=3)
    assert model.generate_ids(ids, **kw) == _hf_generate(hf, INPUT, start, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_penalty_matches_transformers(text_models, family):
    """The decoder packages' repetition penalty, through the same chain of logits processors."""
    hf, pkg, _ = text_models(family)
    model = edgeinfer.load(pkg)
    start = model.generation.decoder_start_ids[0]
    ids = np.asarray([INPUT], np.int64)
    base = dict(max_new_tokens=16, suppress_tokens=[int(model.generation.eos_token_id)])  # all 16 tokens
    free = model.generate_ids(ids, **base)
    outs = []
    for kw in (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8, num_beams=3), dict(repetition_penalty=20.0)):
        outs.append(model.generate_ids(ids, **base, **kw))
        assert outs[-1] == _hf_generate(hf, INPUT, start, **base, **kw)
    assert len(set(free)) < len(free) and outs[-1] != free  # the penalty had repeats to act on, and did


@pytest.mark.parametrize("family", ["t5", "bart", "mbart", "marian"])
def test_lookup_decoding_gives_transformers_tokens(text_models, family):
    """strategy="lookup": the decoder-only PromptLookup on the encoder-decoder decoder, through the
    one decode loop and the same processors; lossless, so transformers' greedy tokens."""
    hf, pkg, _ = text_models(family)
    model = edgeinfer.load(pkg)
    start = model.generation.decoder_start_ids[0]
    ids = np.asarray([INPUT], np.int64)
    base = dict(max_new_tokens=24, suppress_tokens=[int(model.generation.eos_token_id)])
    for kw in (base, dict(base, repetition_penalty=1.3)):
        ref = _hf_generate(hf, INPUT, start, **kw)
        assert model.generate_ids(ids, strategy="lookup", **kw) == ref == model.generate_ids(ids, **kw)
    model.generate_ids(ids, strategy="lookup", **base)
    stats = model.strategy_stats
    assert stats["strategy"] == "lookup" and stats["drafted"] > 0  # drafts were verified
    if family == "mbart":  # its tiny random decoder loops on one token: the drafts are accepted
        assert stats["accepted"] > 0
    res = model.generate(INPUT, strategy="lookup", max_new_tokens=12)
    assert res.tokens == model.generate_ids(ids, max_new_tokens=12) and res.strategy["strategy"] == "lookup"
    with pytest.raises(edgeinfer.GenerationError, match="one sequence"):
        model.generate_ids(ids, strategy="lookup", num_beams=2)


def test_forced_bos_matches_transformers(text_models):
    hf, pkg, _ = text_models("bart")
    model = edgeinfer.load(pkg)
    ours = model.generate_ids(np.asarray([INPUT], np.int64), max_new_tokens=8, forced_bos_token_id=BOS,
                              forced_eos_token_id=EOS)
    ref = _hf_generate(hf, INPUT, EOS, max_new_tokens=8, forced_bos_token_id=BOS, forced_eos_token_id=EOS)
    assert ours == ref and ours[0] == BOS and ours[-1] == EOS


# Bounds on the correlation with the fp32 logits. The tiny T5 v1.1 here is ill-conditioned (weights x4,
# gated MLP): plain per-row int8 rounding of its weights in torch already gives 0.978, ours 0.91-0.93.
@pytest.mark.parametrize("family,precision,bound", [("bart", "int8", 0.999), ("bart", "int4", 0.98),
                                                    ("bart", "fp16", 0.9999), ("t5-gated", "int8", 0.85),
                                                    ("t5-gated", "fp16", 0.999)])
def test_quantized_packages_stay_close(text_models, family, precision, bound):
    from edgeinfer.export import export_model

    _, pkg, root = text_models(family)
    out = root / f"{family}-{precision}"
    export_model(str(root / family), out, precision, progress=False, block_size=16)
    ref_model, q_model = edgeinfer.load(pkg), edgeinfer.load(out)
    ids = np.asarray([INPUT], np.int64)
    dec = [ref_model.generation.decoder_start_ids[0], 12, 40]
    ref = ref_model.decoder_logits(dec, ref_model.encode(ids))
    got = q_model.decoder_logits(dec, q_model.encode(ids))
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > bound
    assert q_model.package.manifest["quantization"]["weights"] == precision


def test_text_api_cli_and_limits(text_models):
    _, pkg, _ = text_models("t5")
    model = edgeinfer.load(pkg)
    pieces = []
    res = model.generate("Paris is the capital of France.", on_text=pieces.append, max_new_tokens=10)
    assert res.input_tokens > 3 and 1 <= len(res.tokens) <= 10
    assert "".join(pieces) == res.text and res.ttft_s >= res.encoder_s > 0
    with pytest.raises(ContextLengthError, match="encoder takes at most 64"):
        model.generate("the quick brown fox " * 40)
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "Paris is the capital",
                          "--json", "--num-beams", "2", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["new_tokens"] <= 6 and data["input_tokens"] > 1
    long = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "the fox " * 80],
                          capture_output=True, text=True, timeout=120)
    assert long.returncode == 2 and "encoder takes at most" in long.stderr


def test_export_options_an_encoder_decoder_package_does_not_use_are_refused(text_models, tmp_path):
    from edgeinfer.export import export_model

    from edgeinfer.errors import ExportError

    _, _, root = text_models("t5")
    for options, message in ((dict(max_context=64), "--max-context does not apply to an encoder-decoder"),
                             (dict(lm_head_bits=8, expert_bits=8), "--lm-head-bits, --expert-bits do not apply")):
        with pytest.raises(ExportError, match=message):
            export_model(str(root / "t5"), tmp_path / "pkg", "int8", progress=False, **options)
        assert not (tmp_path / "pkg").exists()
