"""Parity of a package against its source model run by transformers (torch):
greedy tokens over a few prompts and the largest logit difference on the prompt.
Used by ``edgeinfer export --check`` and by the parity tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHECK_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]


@dataclass
class ParityReport:
    prompts: int = 0
    tokens_compared: int = 0
    tokens_equal: int = 0
    first_divergence: list[int | None] = field(default_factory=list)
    max_logit_diff: float = 0.0
    # teacher-forced on the reference's own continuations: top-1 agreement, and the NLL of those
    # continuations under the package and under the reference (perplexity = exp(mean NLL))
    forced_equal: int = 0
    nll_package: list[float] = field(default_factory=list)
    nll_reference: list[float] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.tokens_equal / self.tokens_compared if self.tokens_compared else 0.0

    @property
    def perplexities(self) -> tuple[float, float]:
        """(package, reference) perplexity of the reference's greedy continuations."""
        return float(np.exp(np.mean(self.nll_package))), float(np.exp(np.mean(self.nll_reference)))

    def summary(self) -> str:
        line = (f"parity: greedy tokens agree {self.tokens_equal}/{self.tokens_compared} "
                f"({100 * self.agreement:.1f}%) over {self.prompts} prompts; first divergence per prompt "
                f"{self.first_divergence}; max |logit diff| on prompts {self.max_logit_diff:.2e}")
        if self.nll_package:
            ppl, ref = self.perplexities
            line += (f"\nquality against the source: teacher-forced top-1 agreement {self.forced_equal}/"
                     f"{self.tokens_compared} ({100 * self.forced_equal / self.tokens_compared:.1f}%); perplexity of "
                     f"the source's continuations {ppl:.3f} (source {ref:.3f}, {100 * (ppl / ref - 1):+.2f}%)")
        return line


def reference_greedy(hf_model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of IDS (N tokens, EOS not special: it
    is taken and decoding goes on, as ``ignore_eos`` does) and its prompt logits."""
    import torch

    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float().numpy()
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, logits


def compare(model, hf_model, prompts: list[str] = CHECK_PROMPTS, n: int = 32) -> ParityReport:
    """Compare a loaded edgeinfer Model with a transformers model on PROMPTS."""
    rep = ParityReport()
    for text in prompts:
        ids = model.tokenizer.encode(text)
        ref_tokens, ref_logits = reference_greedy(hf_model, ids, n)
        model.reset()
        got_logits = model.decoder.forward(ids, logits_to_keep=len(ids))
        model.reset()
        got = model.complete(ids, max_new_tokens=n, ignore_eos=True).tokens
        rep.max_logit_diff = max(rep.max_logit_diff, float(np.abs(got_logits - ref_logits).max()))
        rep.prompts += 1
        rep.tokens_compared += n
        rep.tokens_equal += sum(a == b for a, b in zip(got, ref_tokens))
        rep.first_divergence.append(next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), None))
        _score_forced(rep, model, hf_model, ids, ref_tokens)
    return rep


def _score_forced(rep: ParityReport, model, hf_model, ids: list[int], ref_tokens: list[int]) -> None:
    """Feed the reference's continuation to both: agreement of each next-token argmax, and its NLL."""
    import torch

    from edgeinfer.perplexity import log_softmax

    seq = ids + ref_tokens[:-1]
    n = len(ref_tokens)
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq])).logits[0, -n:].float().numpy()
    model.reset()
    got = model.decoder.forward(seq, logits_to_keep=n)
    model.reset()
    target = np.array(ref_tokens)
    rep.forced_equal += int((got.argmax(-1) == target).sum())
    rows = np.arange(n)
    rep.nll_package += list(-log_softmax(got)[rows, target])
    rep.nll_reference += list(-log_softmax(ref)[rows, target])


def load_reference(source: str):
    """The source model in transformers, float32, for comparison."""
    import torch
    from edgeinfer.export.sources.load import describe_source
    from transformers import AutoModelForCausalLM

    kind, where, gguf_file = describe_source(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs).eval()


def check_package(source: str, package) -> ParityReport:
    import edgeinfer

    return compare(edgeinfer.load(package), load_reference(source))
