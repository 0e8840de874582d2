"""The decode loop: streaming, stop strings, sampling, prefix reuse, the CLI's JSON."""

import json
import subprocess
import sys

import numpy as np

import edgeinfer
from edgeinfer.generation import GenerationConfig, Sampler, StopMatcher


def test_stream_pieces_join_to_text(tiny_packages):
    model = edgeinfer.load(tiny_packages("qwen3", "int4"))
    gen = model.generate("The quick brown", max_new_tokens=20, ignore_eos=True)
    pieces = [ev.text for ev in gen]
    assert "".join(pieces) == gen.result.text
    assert gen.result.text == model.tokenizer.decode(gen.result.tokens)
    assert gen.result.new_tokens == 20 and gen.result.finish_reason == "length"


def test_stop_matcher_never_leaks():
    m = StopMatcher(["STOP", "\n\n"])
    out = [m.feed(p) for p in ["Hello ", "ST", "O", "x and S", "TO", "P more"]]
    assert "".join(t for t, _ in out) == "Hello STOx and "
    assert out[-1][1] is True
    m2 = StopMatcher(["END"])
    assert m2.feed("abcE")[0] == "abc" and m2.feed("", final=True)[0] == "E"


def test_seeded_sampling_is_reproducible(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    a = model.complete("Once upon", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    b = model.complete("Once upon", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    c = model.complete("Once upon", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_top_k_top_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.05, 0.05], np.float32))
    p = Sampler(GenerationConfig(temperature=1.0, top_k=2)).probabilities(logits)
    assert np.count_nonzero(p) == 2 and np.isclose(p.sum(), 1)
    p = Sampler(GenerationConfig(temperature=1.0, top_p=0.85)).probabilities(logits)
    assert np.count_nonzero(p) == 3
    p = Sampler(GenerationConfig(temperature=1.0, repetition_penalty=2.0)).probabilities(logits, [0])
    assert p[0] < 0.5


def test_prefix_reuse_gives_same_tokens_and_skips_work(tiny_packages):
    model = edgeinfer.load(tiny_packages("gemma3", "fp32"))
    history = [{"role": "user", "content": "Paris is the capital of"}]
    first = model.complete(history, max_new_tokens=8, ignore_eos=True)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and Berlin?"}]
    second = model.complete(history, max_new_tokens=8, ignore_eos=True)
    assert second.reused_prompt_tokens > first.prompt_tokens // 2
    model.reset()
    fresh = model.complete(history, max_new_tokens=8, ignore_eos=True)
    assert fresh.reused_prompt_tokens == 0 and fresh.tokens == second.tokens


def test_cancel_by_breaking_leaves_model_usable(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    ref = model.complete("hello there", max_new_tokens=10, ignore_eos=True).tokens
    gen = model.generate("hello there", max_new_tokens=50, ignore_eos=True)
    for i, _ in enumerate(gen):
        if i == 3:
            break
    gen.close() if hasattr(gen, "close") else None
    assert model.complete("hello there", max_new_tokens=10, ignore_eos=True).tokens == ref


def test_cli_run_json(tiny_packages):
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(tiny_packages("llama", "int4")),
                        "Paris is", "--max-new-tokens", "6", "--json"], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    for key in ("text", "prompt_tokens", "new_tokens", "ttft_s", "decode_tok_s"):
        assert key in out
    assert out["prompt_tokens"] > 0 and 1 <= out["new_tokens"] <= 6


def test_cli_info_and_bench(tiny_packages):
    pkg = str(tiny_packages("llama", "int4"))
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "info", pkg, "--json"], capture_output=True,
                       text=True, check=True)
    info = json.loads(r.stdout)
    assert info["package"]["family"] == "llama" and "cpu" in info["providers"]
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "bench", pkg, "--json", "--repeats", "2",
                        "--new-tokens", "8"], capture_output=True, text=True, check=True)
    rep = json.loads(r.stdout)
    assert rep["summary"]["decode_tok_s"]["median"] > 0 and rep["peak_rss_mb"] > 0
    assert len(rep["summary"]["ttft_s"]["runs"]) == 2
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "verify", pkg], capture_output=True, text=True)
    assert r.returncode == 0 and "match their sha256" in r.stdout


def test_cli_export_with_check_reports_parity(tiny_models, tmp_path):
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "export", str(tiny_models("qwen2")), "-o", str(out),
                        "--precision", "fp32", "--max-context", "128", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "parity: greedy tokens agree 128/128 (100.0%)" in r.stdout
    # fp32: the source's own continuations score the same under the package as under the source
    assert "teacher-forced top-1 agreement 128/128 (100.0%)" in r.stdout, r.stdout
    assert "+0.00%)" in r.stdout or "-0.00%)" in r.stdout, r.stdout
