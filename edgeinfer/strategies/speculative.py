"""Speculative decoding with a little model (lossless).

The little model drafts up to k tokens; the big model verifies them in one
pass and :func:`accept_draft` keeps the longest prefix it agrees with
(greedy) or applies the speculative sampling rule with residual resampling
(sampling), so the output is the big model's. Both caches are trimmed to what
was accepted.

k adapts online: with per-token acceptance α, a round of k drafts yields
E(α, k) = (1 − α^(k+1)) / (1 − α) tokens and costs k·c_little + c_verify
(both timed as we go); k is the one with the most tokens per second.
Drafting also stops early when the little model's top probability falls
below ``threshold``.
"""

from __future__ import annotations

import time

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler

from .base import accept_draft
from .pair import PairStrategy, max_probability
from .self_speculative import check_threshold


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per round when each draft is accepted with probability ALPHA (the bonus included)."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


class Speculative(PairStrategy):
    name = "speculative"

    def __init__(self, big: StagedDecoder, little: StagedDecoder | None = None,
                 exit_layer: int | None = None, draft_len: int = 6, threshold: float = 0.0,
                 adaptive: bool = True):
        if not isinstance(draft_len, int) or draft_len < 1:
            raise GenerationError(f"draft length must be an integer >= 1, got {draft_len!r}.")
        super().__init__(big, little, exit_layer)
        self.threshold = check_threshold(threshold)
        self.max_k, self.k, self.adaptive = draft_len, min(draft_len, 4) if adaptive else draft_len, adaptive
        self.alpha = 0.7  # prior per-token acceptance, refined by EMA
        self.c_little: float | None = None
        self.c_verify: float | None = None
        self.stats.update(rounds=0, drafted=0, accepted=0)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.count("big")
        return self.big.logits(self.prompt or list(ids))[-1]

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        seq = history
        room = min(self.big.decoder.capacity, self.little.decoder.capacity) - len(seq) - 1
        k = max(0, min(self.k, room))
        drafts: list[int] = []
        dists: list[np.ndarray] = []
        t0 = time.perf_counter()
        while len(drafts) < k:
            ctx = seq + drafts
            logits = self.little.logits(ctx)[-1]
            if sampler.greedy:
                conf = max_probability(logits) if self.threshold > 0 else 1.0
                d = int(np.argmax(sampler.penalized(logits, ctx)))
            else:
                q = sampler.probabilities(logits, ctx)
                conf = float(q.max())
                d = int(sampler.rng.choice(len(q), p=q))
            if conf < self.threshold:
                break
            drafts.append(d)
            if not sampler.greedy:
                dists.append(q)
        t1 = time.perf_counter()
        rows = self.big.logits(seq + drafts, keep=len(drafts) + 1)
        out = accept_draft(sampler, rows, drafts, None if sampler.greedy else dists, history, bonus=True)
        t2 = time.perf_counter()
        accepted = len(out) - 1
        self.big.truncate(len(seq) + accepted)
        self.little.truncate(len(seq) + accepted)
        self._learn(len(drafts), accepted, t1 - t0, t2 - t1)
        self.count("little", accepted)
        self.count("big")
        return [(t, lp, "little" if i < accepted else "big") for i, (t, lp) in enumerate(out)]

    def _learn(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        st = self.stats
        st["rounds"] += 1
        st["drafted"] += drafted
        st["accepted"] += accepted
        st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else None
        st["tokens_per_verify"] = (st["accepted"] + st["rounds"]) / st["rounds"]
        if drafted:
            ema = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
            self.alpha = ema(self.alpha, accepted / drafted)
            self.c_little = ema(self.c_little, draft_s / drafted)
            self.c_verify = ema(self.c_verify, verify_s)
        if self.adaptive and self.c_little and self.c_verify:
            self.k = max(range(1, self.max_k + 1),
                         key=lambda k: expected_tokens(self.alpha, k) / (k * self.c_little + self.c_verify))
        st["draft_len"] = self.k
        self._refresh()
