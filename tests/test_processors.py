"""The one chain of logits processors (edgeinfer.generation.processors) on decoder packages,
against transformers' generate(): no-repeat n-grams, suppressed tokens and the repetition
penalty, with plain decoding and with lossless strategies (which must give the same tokens)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import edgeinfer
from edgeinfer.generation import LogitsProcessors, no_repeat_ngram_bans

N = 24
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon"


def _hf_greedy(hf, ids, **kw):
    hf.generation_config.eos_token_id = None  # as ignore_eos: decode all N tokens
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N, min_new_tokens=N, **kw)
    return out[0, len(ids):].tolist()


def _repeats_a_bigram(tokens):
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) < len(pairs)


@pytest.fixture(scope="module")
def llama(tiny_models, tiny_packages):
    hf = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()
    return hf, edgeinfer.load(tiny_packages("llama", "fp32"))


@pytest.mark.parametrize("strategy", ["plain", "lookup"])
def test_no_repeat_ngram_on_a_decoder_package_matches_transformers(llama, strategy):
    hf, model = llama
    ids = model.tokenizer.encode(PROMPT)
    free = model.complete(ids, max_new_tokens=N, ignore_eos=True).tokens
    assert free == _hf_greedy(hf, ids)
    assert _repeats_a_bigram(ids + free)  # a random tiny model loops: the processor has work to do
    got = model.complete(ids, max_new_tokens=N, ignore_eos=True, no_repeat_ngram_size=2, strategy=strategy).tokens
    assert got == _hf_greedy(hf, ids, no_repeat_ngram_size=2)
    assert not _repeats_a_bigram(ids + got) and got != free


def test_suppress_tokens_and_repetition_penalty_on_a_decoder_package(llama):
    hf, model = llama
    ids = model.tokenizer.encode(PROMPT)
    free = model.complete(ids, max_new_tokens=N, ignore_eos=True).tokens
    banned = sorted(set(free[:4]))
    kw = dict(suppress_tokens=banned, begin_suppress_tokens=[free[4]], repetition_penalty=1.3)
    got = model.complete(ids, max_new_tokens=N, ignore_eos=True, **kw).tokens
    assert got == _hf_greedy(hf, ids, **kw)
    assert not set(got) & set(banned) and got[0] != free[4]


def test_bad_processor_parameters_are_refused(llama):
    _, model = llama
    for kw in (dict(no_repeat_ngram_size=-1), dict(suppress_tokens="3"), dict(forced_eos_token_id=-2)):
        with pytest.raises(edgeinfer.GenerationError):
            model.complete("hi", max_new_tokens=2, **kw)
    # the beam parameters share GenerationConfig with encoder-decoder packages: refused here, not ignored
    for kw in (dict(num_beams=2), dict(length_penalty=0.5), dict(early_stopping=True)):
        with pytest.raises(edgeinfer.GenerationError, match="decodes one sequence"):
            model.complete("hi", max_new_tokens=2, **kw)


def test_cli_refuses_beam_search_on_a_decoder_package(tiny_packages, capsys):
    from edgeinfer.cli import main

    pkg = str(tiny_packages("llama", "fp32"))
    for flags in (["--num-beams", "2"], ["--length-penalty", "0.5"]):
        assert main(["run", pkg, "hi", "--max-new-tokens", "2", *flags]) == 2
        assert "decodes one sequence" in capsys.readouterr().err


def test_the_chain_is_a_no_op_unless_asked():
    from edgeinfer.generation import GenerationConfig

    chain = LogitsProcessors(GenerationConfig(), prompt_len=3)
    row = np.arange(5, dtype=np.float32)
    assert chain.row(row, [1, 2, 3]) is row  # the hot path copies nothing
    assert no_repeat_ngram_bans([1, 2, 3, 1, 2], 3) == [3] and no_repeat_ngram_bans([1, 2], 3) == []
