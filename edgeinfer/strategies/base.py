"""The strategy interface and the shared draft-verification rule."""

from __future__ import annotations

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.generation import Sampler

PREFILL_CHUNK = 512

# (token id, log-probability or None, source: "model", "draft", "exit@L", ...)
Emitted = tuple[int, "float | None", str]


class Strategy:
    """The base of every strategy: ``prefill`` feeds the prompt and returns the last logits,
    ``advance`` emits the next token(s); the hooks below are no-ops unless a strategy needs them."""

    name: str
    stats: dict
    prefill_source = "model"  # which model produced the token sampled from the prefill logits
    decoder = None  # the decoder whose capacity the decode loop checks
    little = None  # the little model's track (big/little strategies), whose cache the model reuses
    # new tokens the loop still takes, set before each advance: drafting strategies draft no further
    tokens_left: int | None = None

    def prefill(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def advance(self, token: int, sampler: Sampler, history: list[int]) -> list[Emitted]:
        raise NotImplementedError

    def begin(self, prompt_ids: list[int], little_fed: list[int] | None = None) -> None:
        """Before the prefill: the whole prompt, and which tokens the little model's cache holds. A
        VocabTrim exit head scores the prompt's tokens besides its own list."""
        decoders = (self.decoder, self.little.decoder if self.little is not None else None)
        for dec in {id(d): d for d in decoders if d is not None}.values():
            dec.set_exit_context(prompt_ids)

    def finish(self, sources: dict[str, int]) -> None:
        """After the last token: the number of emitted tokens per producing model / exit."""

    def resume(self, learned: dict) -> None:
        """Before the prefill: LEARNED is the model's memory across its generations. A strategy that measures
        something about its models on this machine (speculative: costs and acceptance) continues from its
        entry there instead of measuring again, or leaves its own for the next generation."""


def prefill_full(decoder: StagedDecoder, ids: list[int]) -> np.ndarray:
    """Feed a prompt at full depth in chunks; returns the last position's logits."""
    logits = None
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = decoder.forward(ids[start:start + PREFILL_CHUNK], logits_to_keep=1)
    return logits[-1]


def accept_draft(sampler: Sampler, target_logits: np.ndarray, draft: list[int], draft_dists: list[np.ndarray] | None,
                 history: list[int], bonus: bool) -> list[tuple[int, float | None]]:
    """Tokens to emit after verifying DRAFT against the target model.

    ``target_logits[j]`` is the target's distribution for the token after
    ``history + draft[:j]``. Greedy: accept the longest prefix equal to the
    target's argmax, then the target's own token. Sampling: accept ``d`` with
    probability ``min(1, p(d) / q(d))`` (``q`` = the draft's distribution, a
    point mass when ``draft_dists`` is None), else sample the residual
    ``max(p - q, 0)``: the output is distributed exactly as the target's.
    With ``bonus`` (a row for after the whole draft exists) a fully accepted
    draft is followed by one more target token.
    """
    out: list[tuple[int, float | None]] = []
    hist = list(history)
    for j, d in enumerate(draft):
        logits = target_logits[j]
        if sampler.greedy:
            t, lp = sampler(logits, hist)
            out.append((t, lp))
            if t != d:
                return out
        else:
            p = sampler.probabilities(logits, hist)
            q = None if draft_dists is None else draft_dists[j]
            qd = 1.0 if q is None else float(q[d])
            if sampler.rng.random() * qd < p[d]:
                out.append((d, sampler.logprob(logits, d)))
            else:
                residual = p.copy()
                if q is None:
                    residual[d] = 0.0
                else:
                    residual = np.maximum(p - q, 0.0)
                total = residual.sum()
                t = int(sampler.rng.choice(len(p), p=residual / total)) if total > 0 else int(np.argmax(p))
                out.append((t, sampler.logprob(logits, t)))
                return out
        hist.append(d)
    if bonus:
        out.append(sampler(target_logits[len(draft)], hist))
    return out
