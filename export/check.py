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

    @property
    def agreement(self) -> float:
        return self.tokens_equal / self.tokens_compared if self.tokens_compared else 0.0

    def summary(self) -> str:
        return (f"parity: greedy tokens agree {self.tokens_equal}/{self.tokens_compared} "
                f"({100 * self.agreement:.1f}%) over {self.prompts} prompts; first divergence per prompt "
                f"{self.first_divergence}; max |logit diff| on prompts {self.max_logit_diff:.2e}")


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
    return rep


def load_reference(source: str):
    """The source model in transformers, float32, for comparison."""
    import torch
    from transformers import AutoModelForCausalLM

    from .sources import describe_source

    kind, where, gguf_file = describe_source(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs).eval()


def check_package(source: str, package) -> ParityReport:
    import edgeinfer

    return compare(edgeinfer.load(package), load_reference(source))
