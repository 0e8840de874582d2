"""edgeinfer perplexity: the figures equal an independent computation with transformers on the
same tiny model, agreement means what it says, and bad input is one clear sentence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import CORPUS, build_from_config, tiny_config

from edgeinfer.errors import EvaluationError
from edgeinfer.perplexity import evaluate, make_windows

TEXT = "\n".join(CORPUS)
CONTEXT = 48


@pytest.fixture(scope="module")
def fp32(tiny_packages):
    import edgeinfer

    return edgeinfer.load(tiny_packages("llama", "fp32"))


def transformers_perplexity(folder, text: str, context: int, first: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping CONTEXT-token windows, scoring rows FIRST.. of each."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll = []
    for start in range(0, len(ids) - context + 1, context):
        window = torch.tensor([ids[start:start + context]])
        with torch.no_grad():
            logits = model(window).logits[0].double()
        lp = torch.log_softmax(logits[first:-1], dim=-1)
        nll += (-lp[torch.arange(len(lp)), window[0, first + 1:]]).tolist()
    return math.exp(sum(nll) / len(nll)), len(nll)


@pytest.mark.parametrize("scoring, first", [("all", 0), ("second-half", CONTEXT // 2)])
def test_perplexity_equals_transformers(fp32, tiny_models, scoring, first):
    rep = evaluate(fp32, TEXT, context=CONTEXT, scoring=scoring, progress=False)
    ref, scored = transformers_perplexity(tiny_models("llama"), TEXT, CONTEXT, first)
    assert not rep.bos  # the tiny tokenizer adds no BOS: windows are plain text tokens
    assert rep.scored_tokens == scored and rep.windows * (CONTEXT - 1 - first) == scored
    assert rep.perplexity == pytest.approx(ref, rel=1e-4)
    assert rep.tokens_per_s > 0 and rep.seconds > 0


def test_agreement_with_itself_is_one_and_with_another_model_is_low(fp32, tiny_packages, tmp_path):
    from conftest import TINY
    from edgeinfer.export import export_model
    from transformers import LlamaConfig

    import edgeinfer

    same = evaluate(fp32, TEXT, context=CONTEXT, against=fp32, progress=False)
    assert same.top1_agreement == 1.0 and same.against_perplexity == pytest.approx(same.perplexity)
    # a random llama with an untied head and the same tokenizer: its argmaxes are other tokens (a
    # random tied llama mostly predicts its input token, so two of those agree a lot)
    hf = build_from_config(LlamaConfig(**TINY, tie_word_embeddings=False), tmp_path / "hf", seed=7)
    export_model(str(hf), tmp_path / "pkg", "fp32", max_context=256, progress=False)
    other = edgeinfer.load(tmp_path / "pkg")
    rep = evaluate(fp32, TEXT, context=CONTEXT, against=other, progress=False)
    assert rep.top1_agreement < 0.5
    assert rep.against_perplexity != pytest.approx(rep.perplexity)
    # int4 of the same model: far closer than another model, and never above identical
    int4 = edgeinfer.load(tiny_packages("llama", "int4"))
    q = evaluate(int4, TEXT, context=CONTEXT, against=fp32, progress=False)
    assert rep.top1_agreement < q.top1_agreement <= 1.0


def test_windows_are_led_by_bos_when_the_tokenizer_adds_one():
    assert make_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(list(range(10)), 4, bos=99) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(EvaluationError, match="fewer than one window"):
        make_windows(list(range(2)), 4, bos=99)


def test_cli_json(fp32, tiny_packages, tmp_path, capsys):
    from edgeinfer.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    pkg = str(tiny_packages("llama", "fp32"))
    assert main(["perplexity", pkg, str(text), "--against", pkg, "--context", str(CONTEXT), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = evaluate(fp32, TEXT, context=CONTEXT, progress=False)
    assert out["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert out["top1_agreement"] == 1.0 and out["context"] == CONTEXT and out["scoring"] == "all"
    assert out["scored_tokens"] == ref.scored_tokens and out["tokens_per_s"] > 0
    assert main(["perplexity", pkg, str(text), "--against", pkg, "--context", str(CONTEXT)]) == 0
    human = capsys.readouterr().out
    assert f"perplexity {ref.perplexity:.3f} over {ref.scored_tokens} scored tokens" in human
    assert "top-1 agreement 1.0000" in human


def _one_error(capsys, argv) -> str:
    from edgeinfer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeinfer: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_clear_errors(tiny_packages, tmp_path, capsys):
    pkg = str(tiny_packages("llama", "fp32"))
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.", encoding="utf-8")
    assert "fewer than one window" in _one_error(capsys, ["perplexity", pkg, str(short), "--context", "64"])
    assert "does not exist" in _one_error(capsys, ["perplexity", pkg, str(tmp_path / "missing.txt")])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc\x80")
    assert "not UTF-8" in _one_error(capsys, ["perplexity", pkg, str(binary)])
    long = tmp_path / "long.txt"
    long.write_text(TEXT, encoding="utf-8")
    assert "smaller --context" in _one_error(capsys, ["perplexity", pkg, str(long), "--context", "4096"])


def test_against_a_package_of_another_vocabulary_is_refused(fp32, tmp_path):
    from edgeinfer.export import export_model

    import edgeinfer

    cfg = tiny_config("llama")
    cfg.vocab_size = 300  # the tokenizer is trained to this size: a different vocabulary
    export_model(str(build_from_config(cfg, tmp_path / "hf")), tmp_path / "pkg", "fp32", max_context=256,
                 progress=False)
    other = edgeinfer.load(tmp_path / "pkg")
    with pytest.raises(EvaluationError, match="different tokenizer"):
        evaluate(fp32, TEXT, context=CONTEXT, against=other, progress=False)
    assert np.isfinite(evaluate(other, TEXT, context=CONTEXT, progress=False).perplexity)
